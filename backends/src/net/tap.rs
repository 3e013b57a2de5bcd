//! A TAP interface with virtio-net headers, one fd per queue pair.
//!
//! Every fd is opened non-blocking with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR` (and `IFF_MULTI_QUEUE` when the interface was created
//! with it) and a 12-byte vnet header (`virtio_net_hdr_v1`; the kernel
//! default is the legacy 10 bytes). Frames cross with their header in
//! front, so the kernel finishes checksums and segments what the guest
//! hands it, and hands the guest what the offloads it enabled allow.
//!
//! `TUNSETIFF` on a name that does not exist creates a new interface, so
//! [`Tap::open`] first requires the interface to exist and be a TAP
//! (`/sys/class/net/NAME/tun_flags`), and checks afterwards that it got
//! that same interface.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use thiserror::Error;
use vfio_user_server::event_loop::set_nonblocking;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use crate::storage::IoBuf;

/// Size of the vnet header on every frame (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;
/// Most queue pairs of one TAP (the kernel's `MAX_TAP_QUEUES`).
pub const MAX_TAP_QUEUES: usize = 256;

/// Errors opening or configuring a TAP.
#[derive(Debug, Error)]
pub enum TapError {
    /// No interface of that name in this network namespace.
    #[error("TAP interface '{0}' does not exist (create it first, e.g. `ip tuntap add dev {0} mode tap`)")]
    NotFound(String),
    /// The interface exists but is not a TAP.
    #[error("interface '{0}' is not a TAP")]
    NotTap(String),
    /// The name is empty, too long or not printable.
    #[error("invalid interface name '{0}'")]
    BadName(String),
    /// More queue pairs than a single-queue TAP has.
    #[error(
        "TAP '{0}' was created without multi_queue, so it serves 1 queue pair, not {1} \
         (recreate it with `ip tuntap add dev {0} mode tap multi_queue`)"
    )]
    NotMultiQueue(String, usize),
    /// Queue pair count out of range.
    #[error("{0} queue pairs (1 to {MAX_TAP_QUEUES})")]
    QueueCount(usize),
    /// The interface changed under us (removed and recreated).
    #[error("TAP '{0}' changed while it was being opened")]
    Changed(String),
    /// An ioctl or open failed.
    #[error("TAP '{0}': {1}: {2}")]
    Io(String, &'static str, #[source] io::Error),
}

/// One queue of a TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `ifreq` for `name`, everything else zero.
fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() >= libc::IFNAMSIZ
        || !bytes.iter().all(|b| b.is_ascii_graphic() && *b != b'/')
    {
        return Err(TapError::BadName(name.to_string()));
    }
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

/// The name in an `ifreq`.
fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads a sysfs attribute of interface `name`.
fn sysfs(name: &str, attr: &str) -> io::Result<String> {
    let path: PathBuf = ["/sys/class/net", name, attr].iter().collect();
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

/// The `tun_flags` of an existing TAP, checked.
fn tun_flags(name: &str) -> Result<libc::c_int, TapError> {
    let text = sysfs(name, "tun_flags").map_err(|_| {
        if sysfs(name, "ifindex").is_ok() {
            TapError::NotTap(name.to_string())
        } else {
            TapError::NotFound(name.to_string())
        }
    })?;
    let flags = i64::from_str_radix(text.trim_start_matches("0x"), 16)
        .map_err(|_| TapError::NotTap(name.to_string()))? as libc::c_int;
    if flags & libc::IFF_TAP == 0 {
        return Err(TapError::NotTap(name.to_string()));
    }
    Ok(flags)
}

fn open_tun(name: &str) -> Result<File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| TapError::Io(name.to_string(), "open /dev/net/tun", e))
}

/// An `AF_INET` datagram socket for the interface ioctls.
fn control_socket(name: &str) -> Result<OwnedFd, TapError> {
    // SAFETY: no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(TapError::Io(
            name.to_string(),
            "socket",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Tap {
    /// Opens `pairs` queues of the existing TAP `name`. A TAP created
    /// without `multi_queue` serves exactly one pair.
    pub fn open(name: &str, pairs: usize) -> Result<Vec<Tap>, TapError> {
        if pairs == 0 || pairs > MAX_TAP_QUEUES {
            return Err(TapError::QueueCount(pairs));
        }
        ifreq(name)?;
        let flags = tun_flags(name)?;
        let multi_queue = flags & libc::IFF_MULTI_QUEUE != 0;
        if pairs > 1 && !multi_queue {
            return Err(TapError::NotMultiQueue(name.to_string(), pairs));
        }
        let index = sysfs(name, "ifindex").map_err(|_| TapError::NotFound(name.to_string()))?;
        let taps = (0..pairs)
            .map(|_| Self::attach(name, multi_queue))
            .collect::<Result<Vec<_>, _>>()?;
        // A TAP removed between the check and TUNSETIFF would have been
        // created anew (and goes away with our fds): refuse that.
        if sysfs(name, "ifindex").ok().as_deref() != Some(index.as_str()) {
            return Err(TapError::Changed(name.to_string()));
        }
        Ok(taps)
    }

    /// Creates a TAP owned by this process (it goes away with it), named
    /// from `template` (e.g. `vfu-tap%d`), with `pairs` queues, and sets
    /// it up.
    pub fn create(template: &str, pairs: usize) -> Result<Vec<Tap>, TapError> {
        if pairs == 0 || pairs > MAX_TAP_QUEUES {
            return Err(TapError::QueueCount(pairs));
        }
        let multi_queue = pairs > 1;
        let first = Self::attach(template, multi_queue)?;
        let name = first.name.clone();
        let mut taps = vec![first];
        for _ in 1..pairs {
            taps.push(Self::attach(&name, multi_queue)?);
        }
        taps[0].set_up()?;
        Ok(taps)
    }

    /// One fd on interface `name` (TUNSETIFF), with the 12-byte header.
    fn attach(name: &str, multi_queue: bool) -> Result<Tap, TapError> {
        let file = open_tun(name)?;
        let mut req = ifreq(name)?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `req` is.
        let r = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as libc::c_ulong, &mut req) };
        if r < 0 {
            return Err(TapError::Io(
                name.to_string(),
                "TUNSETIFF",
                io::Error::last_os_error(),
            ));
        }
        let tap = Tap {
            file,
            name: ifreq_name(&req),
        };
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `size` is.
        let r = unsafe { ioctl_with_ref(&tap.file, libc::TUNSETVNETHDRSZ as libc::c_ulong, &size) };
        if r < 0 {
            return Err(tap.error("TUNSETVNETHDRSZ"));
        }
        Ok(tap)
    }

    /// A queue of a TAP opened elsewhere (another process handed it over):
    /// `file` must be a tun fd attached to a TAP interface with
    /// `IFF_NO_PI` and `IFF_VNET_HDR` (as [`Tap::open`] and [`Tap::create`]
    /// attach them); its name comes from the kernel. Non-blocking from
    /// then on.
    pub fn from_file(file: File) -> Result<Tap, TapError> {
        let err = |what: &'static str, e: io::Error| TapError::Io("<inherited>".into(), what, e);
        // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes an `ifreq`, which `req` is.
        let r = unsafe { ioctl_with_mut_ref(&file, libc::TUNGETIFF as libc::c_ulong, &mut req) };
        if r < 0 {
            return Err(err("TUNGETIFF", io::Error::last_os_error()));
        }
        let name = ifreq_name(&req);
        // SAFETY: the kernel filled the `ifru_flags` member.
        let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags });
        let want = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & want != want {
            return Err(TapError::NotTap(name));
        }
        set_nonblocking(file.as_raw_fd()).map_err(|e| err("F_SETFL", e))?;
        Ok(Tap { file, name })
    }

    /// The queue's fd.
    pub fn into_file(self) -> File {
        self.file
    }

    /// Another fd on the same queue (for handing it to another process).
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    fn error(&self, what: &'static str) -> TapError {
        TapError::Io(self.name.clone(), what, io::Error::last_os_error())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the offloads the kernel may hand us (`TUN_F_*`): what the
    /// guest accepts (its acked `GUEST_*` features).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe {
            ioctl_with_val(
                &self.file,
                libc::TUNSETOFFLOAD as libc::c_ulong,
                flags.into(),
            )
        };
        if r < 0 {
            return Err(self.error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// The interface's MTU.
    pub fn mtu(&self) -> Result<u16, TapError> {
        let sock = control_socket(&self.name)?;
        let mut req = ifreq(&self.name)?;
        // SAFETY: SIOCGIFMTU reads and writes an `ifreq`, which `req` is.
        let r = unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFMTU as libc::c_ulong, &mut req) };
        if r < 0 {
            return Err(self.error("SIOCGIFMTU"));
        }
        // SAFETY: the kernel filled the `ifru_mtu` member.
        let mtu = unsafe { req.ifr_ifru.ifru_mtu };
        Ok(u16::try_from(mtu).unwrap_or(u16::MAX))
    }

    fn flags(&self, sock: &OwnedFd) -> Result<libc::c_short, TapError> {
        let mut req = ifreq(&self.name)?;
        // SAFETY: SIOCGIFFLAGS reads and writes an `ifreq`, which `req` is.
        let r = unsafe { ioctl_with_mut_ref(sock, libc::SIOCGIFFLAGS as libc::c_ulong, &mut req) };
        if r < 0 {
            return Err(self.error("SIOCGIFFLAGS"));
        }
        // SAFETY: the kernel filled the `ifru_flags` member.
        Ok(unsafe { req.ifr_ifru.ifru_flags })
    }

    /// Whether the interface is administratively up (the guest's link
    /// follows it).
    pub fn is_up(&self) -> Result<bool, TapError> {
        let sock = control_socket(&self.name)?;
        Ok(self.flags(&sock)? & libc::IFF_UP as libc::c_short != 0)
    }

    /// Sets the interface up.
    pub fn set_up(&self) -> Result<(), TapError> {
        let sock = control_socket(&self.name)?;
        let mut req = ifreq(&self.name)?;
        req.ifr_ifru.ifru_flags = self.flags(&sock)? | libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads an `ifreq`, which `req` is.
        let r = unsafe { ioctl_with_ref(&sock, libc::SIOCSIFFLAGS as libc::c_ulong, &req) };
        if r < 0 {
            return Err(self.error("SIOCSIFFLAGS"));
        }
        Ok(())
    }

    /// Reads one frame (vnet header first) into `bufs`; `WouldBlock` when
    /// none is waiting.
    pub fn read_vectored(&self, bufs: &[IoBuf<'_>]) -> io::Result<usize> {
        let n = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: `bufs` are valid iovecs (IoBuf's contract) over memory
        // accessed as raw bytes only.
        let r = unsafe { libc::readv(self.file.as_raw_fd(), IoBuf::as_iovecs(bufs), n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Writes one frame (vnet header first) gathered from `bufs`;
    /// `WouldBlock` when the interface cannot take it now.
    pub fn write_vectored(&self, bufs: &[IoBuf<'_>]) -> io::Result<usize> {
        let n = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: as in `read_vectored`; the kernel only reads the memory.
        let r = unsafe { libc::writev(self.file.as_raw_fd(), IoBuf::as_iovecs(bufs), n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// `TUN_F_*` offloads for the acked virtio-net features: the kernel may
/// hand the guest only what it said it takes.
pub fn offload_flags(acked: u64) -> u32 {
    use virtio_bindings::virtio_net::*;
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        // Segmentation offloads need checksum offload.
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::*;

    #[test]
    fn offloads_follow_the_acked_features() {
        let f = |bits: &[u32]| offload_flags(bits.iter().fold(0, |a, b| a | 1u64 << b));
        use libc::{TUN_F_CSUM as C, TUN_F_TSO4 as T4, TUN_F_TSO6 as T6, TUN_F_TSO_ECN as E};
        for (acked, want) in [
            (&[][..], 0),
            (&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4][..], 0),
            (&[VIRTIO_NET_F_GUEST_CSUM][..], C),
            (&[VIRTIO_NET_F_GUEST_TSO4][..], 0),
            (
                &[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4][..],
                C | T4,
            ),
            (
                &[
                    VIRTIO_NET_F_GUEST_CSUM,
                    VIRTIO_NET_F_GUEST_TSO4,
                    VIRTIO_NET_F_GUEST_TSO6,
                    VIRTIO_NET_F_GUEST_ECN,
                ][..],
                C | T4 | T6 | E,
            ),
            (&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN][..], C),
            (&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_UFO][..], C),
        ] {
            assert_eq!(f(acked), want, "{acked:?}");
        }
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "has space", "0123456789abcdef"] {
            assert!(matches!(ifreq(bad), Err(TapError::BadName(_))), "{bad:?}");
        }
        let r = ifreq("vtap0").unwrap();
        assert_eq!(ifreq_name(&r), "vtap0");
    }

    #[test]
    fn missing_and_non_tap_interfaces_are_refused() {
        assert!(matches!(
            Tap::open("no-such-tap9", 1),
            Err(TapError::NotFound(_))
        ));
        assert!(matches!(Tap::open("lo", 1), Err(TapError::NotTap(_))));
        assert!(matches!(Tap::open("lo", 0), Err(TapError::QueueCount(0))));
        // Nothing was created by trying.
        assert!(!std::path::Path::new("/sys/class/net/no-such-tap9").exists());
    }
}
