//! Network namespaces the tests make (and remove), with TAP interfaces in
//! them and packet sockets on those TAPs. Traffic never leaves a
//! namespace the test made: frames go only to addresses inside it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A network namespace, removed on drop.
pub struct NetNs {
    pub name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl NetNs {
    /// A fresh namespace with `lo` up and IPv6 off (no router
    /// solicitations or DAD frames in the tests' way). `None`, after
    /// printing `SKIP net tests: <why>`, where namespaces and TAPs cannot
    /// be made (not root, no `ip`, no `/dev/net/tun`).
    pub fn new() -> Option<NetNs> {
        // SAFETY: geteuid has no preconditions.
        let why = if unsafe { libc::geteuid() } != 0 {
            Some("not root")
        } else if !std::path::Path::new("/dev/net/tun").exists() {
            Some("no /dev/net/tun")
        } else if Command::new("ip").arg("-V").output().is_err() {
            Some("no `ip` (iproute2)")
        } else {
            None
        };
        if let Some(why) = why {
            eprintln!("SKIP net tests: {why}");
            return None;
        }
        let name = format!(
            "vfu-t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        for key in ["all", "default"] {
            ns.sysctl(&format!("net.ipv6.conf.{key}.disable_ipv6=1"));
        }
        Some(ns)
    }

    /// `ip -n NS ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        run(Command::new("ip").args(["-n", &self.name]).args(args));
    }

    fn sysctl(&self, setting: &str) {
        run(self.exec("sysctl").args(["-q", "-w", setting]));
    }

    /// `ip netns exec NS PROGRAM`: a command run inside the namespace.
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Makes TAP `name` (multi-queue if asked), with `addr` (CIDR), up.
    pub fn add_tap(&self, name: &str, multi_queue: bool, addr: Option<&str>) {
        let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap"];
        if multi_queue {
            args.push("multi_queue");
        }
        self.ip(&args);
        if let Some(a) = addr {
            self.ip(&["addr", "add", a, "dev", name]);
        }
        self.ip(&["link", "set", name, "up"]);
    }

    /// A packet socket on interface `ifname` of this namespace: it sends
    /// frames out of the interface and sees the frames it receives.
    pub fn packet_socket(&self, ifname: &str) -> PacketSocket {
        let path = format!("/run/netns/{}", self.name);
        let ifname = ifname.to_string();
        // setns changes the calling thread only; the socket keeps the
        // namespace it was made in.
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: a valid namespace fd; this thread is ours.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            PacketSocket::bind(&ifname)
        })
        .join()
        .expect("packet socket thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// An `AF_PACKET` socket bound to one interface.
pub struct PacketSocket {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

impl PacketSocket {
    fn bind(ifname: &str) -> PacketSocket {
        let proto = ETH_P_ALL.to_be();
        // SAFETY: no pointers; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto.into()) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a valid C string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert_ne!(index, 0, "no interface {ifname}");
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = index as i32;
        // SAFETY: `sa` is a valid sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        PacketSocket { fd }
    }

    /// Sends `frame` (Ethernet header first) out of the interface.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: a valid buffer of its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame the interface received for which `wanted` holds,
    /// within `timeout`.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        wanted: impl Fn(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: valid buffers of the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            // Frames we sent ourselves show up as outgoing: skip them.
            if n > 0 && from.sll_pkttype != libc::PACKET_OUTGOING && wanted(&buf[..n as usize]) {
                return Some(buf[..n as usize].to_vec());
            }
        }
    }
}
