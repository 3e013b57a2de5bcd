//! A [`NetBackend`] over one end of a `SOCK_SEQPACKET` socket pair, for
//! tests and fuzzing (feature `test-support`).
//!
//! A TAP carries frames to the host's network stack, which decides when
//! frames arrive and never refuses a write. A socket pair is a kernel
//! packet channel that keeps frame boundaries like a TAP does, and its
//! other end, a [`SeqPacketPeer`], is in the test's hands: it injects
//! frames of any size for the device to receive, reads the frames the
//! device transmitted, and fills the device's side so that the device's
//! next write is refused with `WouldBlock`.
//!
//! The device end reads and writes like [`crate::net::Tap`] does: one
//! `readv` or `writev` per frame over at most `UIO_MAXIOV` buffers. A frame
//! larger than the buffers it is read into is truncated to them and the
//! length copied is returned (the kernel's `readv` on a datagram socket).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::NetBackend;
use crate::storage::IoBuf;

/// Size of each frame [`SeqPacketPeer::fill`] queues: large, so that a few
/// of them use up the device end's send buffer.
pub const FILL_FRAME_LEN: usize = 32 * 1024;

/// What both ends see: the link and the offloads the device set.
#[derive(Debug)]
struct Shared {
    link_up: AtomicBool,
    offloads: AtomicU32,
    offload_calls: AtomicU64,
}

/// The device's end of the pair.
#[derive(Debug)]
pub struct SeqPacket {
    fd: OwnedFd,
    shared: Arc<Shared>,
}

/// The other end of the pair, and a second handle on the device's end (to
/// fill it).
#[derive(Debug)]
pub struct SeqPacketPeer {
    fd: OwnedFd,
    device_end: OwnedFd,
    shared: Arc<Shared>,
}

/// A non-blocking `SOCK_SEQPACKET` socket pair: the back end to hand to a
/// device and the end the test keeps. The link starts up.
pub fn seqpacket_pair() -> io::Result<(SeqPacket, SeqPacketPeer)> {
    let mut fds = [0; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: `fds` has room for the two descriptors; the result is checked.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors nobody else owns.
    let (device, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let device_end = device.try_clone()?;
    let shared = Arc::new(Shared {
        link_up: AtomicBool::new(true),
        offloads: AtomicU32::new(0),
        offload_calls: AtomicU64::new(0),
    });
    Ok((
        SeqPacket {
            fd: device,
            shared: shared.clone(),
        },
        SeqPacketPeer {
            fd: peer,
            device_end,
            shared,
        },
    ))
}

/// `Ok(n)` or the error of a syscall that returned `r`.
fn result(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// `send` without blocking and without `SIGPIPE`.
fn send(fd: RawFd, frame: &[u8]) -> io::Result<usize> {
    // SAFETY: `frame` is valid for reads of its length.
    result(unsafe {
        libc::send(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// The `SO_SNDBUF` of `fd`.
fn send_buffer(fd: RawFd) -> io::Result<usize> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for the kernel to write an int.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v.max(0) as usize)
}

/// Whether `fd` is ready for `events` now.
fn ready(fd: RawFd, events: libc::c_short) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd; no waiting.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & events != 0
}

/// A datagram socket refuses a frame longer than its send buffer less this
/// (`EMSGSIZE`; see the kernel's `unix_dgram_sendmsg`).
const SEND_OVERHEAD: usize = 32;

impl NetBackend for SeqPacket {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn read_frame(&self, bufs: &[IoBuf<'_>]) -> io::Result<usize> {
        let n = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: `bufs` are valid iovecs (IoBuf's contract) over memory
        // accessed as raw bytes only.
        result(unsafe { libc::readv(self.fd.as_raw_fd(), IoBuf::as_iovecs(bufs), n) })
    }

    fn write_frame(&self, bufs: &[IoBuf<'_>]) -> io::Result<usize> {
        let n = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: as in `read_frame`; the kernel only reads the memory.
        result(unsafe { libc::writev(self.fd.as_raw_fd(), IoBuf::as_iovecs(bufs), n) })
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        self.shared.offloads.store(flags, Ordering::Relaxed);
        self.shared.offload_calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn link_up(&self) -> bool {
        self.shared.link_up.load(Ordering::Relaxed)
    }
}

impl SeqPacketPeer {
    /// Queues `frame` for the device; `WouldBlock` when the device has not
    /// read enough of what was queued before, `EMSGSIZE` when the frame is
    /// longer than [`SeqPacketPeer::max_send`].
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        send(self.fd.as_raw_fd(), frame).map(|_| ())
    }

    /// The next frame the device wrote, `None` when there is none.
    pub fn recv(&self) -> io::Result<Option<Vec<u8>>> {
        let fd = self.fd.as_raw_fd();
        let flags = libc::MSG_DONTWAIT | libc::MSG_PEEK | libc::MSG_TRUNC;
        // SAFETY: a zero-length peek writes nothing; MSG_TRUNC makes it
        // return the length of the frame waiting.
        let len = match result(unsafe { libc::recv(fd, std::ptr::null_mut(), 0, flags) }) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut frame = vec![0u8; len];
        // SAFETY: `frame` is valid for writes of its length.
        let n = result(unsafe {
            libc::recv(
                fd,
                frame.as_mut_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        })?;
        frame.truncate(n);
        Ok(Some(frame))
    }

    /// Fills the device end's send buffer with frames of
    /// [`FILL_FRAME_LEN`] zero bytes (written through the device's end, so
    /// [`SeqPacketPeer::recv`] returns them in order with the device's
    /// own), until the device's next write would get `WouldBlock`.
    /// Returns how many frames it queued.
    pub fn fill(&self) -> usize {
        static ZEROS: [u8; FILL_FRAME_LEN] = [0; FILL_FRAME_LEN];
        let mut n = 0;
        while send(self.device_end.as_raw_fd(), &ZEROS).is_ok() {
            n += 1;
        }
        n
    }

    /// Whether the device's next write would be taken (its end is
    /// writable).
    pub fn device_can_write(&self) -> bool {
        ready(self.device_end.as_raw_fd(), libc::POLLOUT)
    }

    /// Whether a frame waits for the device to read it.
    pub fn device_has_input(&self) -> bool {
        ready(self.device_end.as_raw_fd(), libc::POLLIN)
    }

    /// The longest frame the device can write: longer ones get `EMSGSIZE`.
    pub fn max_device_write(&self) -> usize {
        send_buffer(self.device_end.as_raw_fd()).map_or(0, |n| n.saturating_sub(SEND_OVERHEAD))
    }

    /// The longest frame [`SeqPacketPeer::send`] takes.
    pub fn max_send(&self) -> usize {
        send_buffer(self.fd.as_raw_fd()).map_or(0, |n| n.saturating_sub(SEND_OVERHEAD))
    }

    /// Sets the link state the device sees.
    pub fn set_link(&self, up: bool) {
        self.shared.link_up.store(up, Ordering::Relaxed);
    }

    /// The `TUN_F_*` offloads the device last set.
    pub fn offloads(&self) -> u32 {
        self.shared.offloads.load(Ordering::Relaxed)
    }

    /// How many times the device set offloads.
    pub fn offload_calls(&self) -> u64 {
        self.shared.offload_calls.load(Ordering::Relaxed)
    }
}

impl AsRawFd for SeqPacketPeer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_their_boundaries_and_truncate() {
        let (dev, peer) = seqpacket_pair().unwrap();
        let mut a = [0u8; 4];
        let mut b = [0u8; 3];
        let read = |a: &mut [u8], b: &mut [u8]| dev.read_frame(&[IoBuf::from(a), IoBuf::from(b)]);
        assert_eq!(
            read(&mut a, &mut b).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        peer.send(b"hello").unwrap();
        peer.send(b"0123456789").unwrap();
        assert!(peer.device_has_input());
        assert_eq!(read(&mut a, &mut b).unwrap(), 5);
        assert_eq!((&a, &b[..1]), (b"hell", &b"o"[..]));
        // Longer than the buffers: the rest is lost, the copied length
        // returned.
        assert_eq!(read(&mut a, &mut b).unwrap(), 7);
        assert_eq!((&a, &b), (b"0123", b"456"));
        assert!(!peer.device_has_input());

        let mut x = *b"abc";
        let mut y = *b"de";
        dev.write_frame(&[IoBuf::from(&mut x[..]), IoBuf::from(&mut y[..])])
            .unwrap();
        assert_eq!(peer.recv().unwrap().unwrap(), b"abcde");
        assert_eq!(peer.recv().unwrap(), None);
    }

    #[test]
    fn fill_blocks_the_device_until_the_peer_reads() {
        let (dev, peer) = seqpacket_pair().unwrap();
        assert!(peer.device_can_write());
        let n = peer.fill();
        assert!(n > 0);
        assert!(!peer.device_can_write());
        let mut f = [1u8; 60];
        let e = dev.write_frame(&[IoBuf::from(&mut f[..])]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        for _ in 0..n {
            assert_eq!(peer.recv().unwrap().unwrap().len(), FILL_FRAME_LEN);
        }
        assert!(peer.device_can_write());
        assert_eq!(dev.write_frame(&[IoBuf::from(&mut f[..])]).unwrap(), 60);
        assert_eq!(peer.recv().unwrap().unwrap(), [1u8; 60]);
        // Too long for the send buffer.
        let mut big = vec![0u8; peer.max_device_write() + 1];
        let e = dev.write_frame(&[IoBuf::from(&mut big[..])]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
    }

    #[test]
    fn link_and_offloads_are_shared() {
        let (dev, peer) = seqpacket_pair().unwrap();
        assert!(dev.link_up());
        peer.set_link(false);
        assert!(!dev.link_up());
        dev.set_offload(libc::TUN_F_CSUM).unwrap();
        assert_eq!(
            (peer.offloads(), peer.offload_calls()),
            (libc::TUN_F_CSUM, 1)
        );
    }
}
