//! A raw-socket vfio-user client: explicit little-endian encoding,
//! `SCM_RIGHTS` on the header bytes, a receive timeout on every reply.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::proto::{cmd, hflags, HDR};

/// Default receive timeout: a missing reply fails the test instead of
/// hanging it.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Most fds accepted with one received message.
const MAX_RX_FDS: usize = 16;

/// Little-endian encoder.
#[derive(Default, Clone, Debug)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// An empty buffer.
    pub fn new() -> Self {
        Enc(Vec::new())
    }
    /// Appends a u16.
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends bytes.
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
    /// The bytes.
    pub fn done(self) -> Vec<u8> {
        self.0
    }
}

/// Reads a little-endian u16 at `off` (panics when out of range).
pub fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

/// Reads a little-endian u32 at `off` (panics when out of range).
pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Reads a little-endian u64 at `off` (panics when out of range).
pub fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Encodes a 16-byte header.
pub fn header(msg_id: u16, command: u16, msg_size: u32, flags: u32, error_no: u32) -> Vec<u8> {
    Enc::new()
        .u16(msg_id)
        .u16(command)
        .u32(msg_size)
        .u32(flags)
        .u32(error_no)
        .done()
}

/// Payload builders for every command (offsets relative to the end of the
/// header).
pub mod payload {
    use super::Enc;

    /// VERSION: major, minor, optional JSON (NUL appended when `nul`).
    pub fn version(major: u16, minor: u16, json: Option<&str>, nul: bool) -> Vec<u8> {
        let mut e = Enc::new().u16(major).u16(minor);
        if let Some(j) = json {
            e = e.bytes(j.as_bytes());
            if nul {
                e = e.bytes(&[0]);
            }
        }
        e.done()
    }

    /// DMA_MAP (32 bytes).
    pub fn dma_map(argsz: u32, flags: u32, offset: u64, address: u64, size: u64) -> Vec<u8> {
        Enc::new()
            .u32(argsz)
            .u32(flags)
            .u64(offset)
            .u64(address)
            .u64(size)
            .done()
    }

    /// DMA_UNMAP (24 bytes).
    pub fn dma_unmap(argsz: u32, flags: u32, address: u64, size: u64) -> Vec<u8> {
        Enc::new()
            .u32(argsz)
            .u32(flags)
            .u64(address)
            .u64(size)
            .done()
    }

    /// DEVICE_GET_INFO (16 bytes).
    pub fn get_info(argsz: u32) -> Vec<u8> {
        Enc::new().u32(argsz).u32(0).u32(0).u32(0).done()
    }

    /// DEVICE_GET_REGION_INFO (32 bytes).
    pub fn region_info(argsz: u32, index: u32) -> Vec<u8> {
        Enc::new()
            .u32(argsz)
            .u32(0)
            .u32(index)
            .u32(0)
            .u64(0)
            .u64(0)
            .done()
    }

    /// DEVICE_GET_REGION_IO_FDS (16 bytes).
    pub fn region_io_fds(argsz: u32, flags: u32, index: u32, count: u32) -> Vec<u8> {
        Enc::new()
            .u32(argsz)
            .u32(flags)
            .u32(index)
            .u32(count)
            .done()
    }

    /// DEVICE_GET_IRQ_INFO (16 bytes).
    pub fn irq_info(argsz: u32, index: u32) -> Vec<u8> {
        Enc::new().u32(argsz).u32(0).u32(index).u32(0).done()
    }

    /// DEVICE_SET_IRQS (20 bytes + `data`); argsz = 20 + data.
    pub fn set_irqs(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
        Enc::new()
            .u32(20 + data.len() as u32)
            .u32(flags)
            .u32(index)
            .u32(start)
            .u32(count)
            .bytes(data)
            .done()
    }

    /// REGION_READ / REGION_WRITE head (16 bytes) plus `data`.
    pub fn region_access(index: u32, offset: u64, count: u32, data: &[u8]) -> Vec<u8> {
        Enc::new()
            .u64(offset)
            .u32(index)
            .u32(count)
            .bytes(data)
            .done()
    }

    /// One REGION_WRITE_MULTI record (24 bytes).
    pub fn write_multi_record(index: u32, offset: u64, data: &[u8]) -> Vec<u8> {
        assert!(data.len() <= 8);
        let mut d = [0u8; 8];
        d[..data.len()].copy_from_slice(data);
        Enc::new()
            .u64(offset)
            .u32(index)
            .u32(data.len() as u32)
            .bytes(&d)
            .done()
    }

    /// REGION_WRITE_MULTI: count then records.
    pub fn write_multi(records: &[(u32, u64, &[u8])]) -> Vec<u8> {
        let mut e = Enc::new().u64(records.len() as u64);
        for (i, o, d) in records {
            e = e.bytes(&write_multi_record(*i, *o, d));
        }
        e.done()
    }

    /// DEVICE_FEATURE head plus data.
    pub fn device_feature(argsz: u32, flags: u32, data: &[u8]) -> Vec<u8> {
        Enc::new().u32(argsz).u32(flags).bytes(data).done()
    }

    /// MIG_DATA_READ / WRITE head plus data.
    pub fn mig_data(argsz: u32, size: u32, data: &[u8]) -> Vec<u8> {
        Enc::new().u32(argsz).u32(size).bytes(data).done()
    }
}

/// A received message.
#[derive(Debug)]
pub struct Reply {
    /// Message id.
    pub msg_id: u16,
    /// Command.
    pub cmd: u16,
    /// msg_size from the header.
    pub msg_size: u32,
    /// Flags.
    pub flags: u32,
    /// errno.
    pub error_no: u32,
    /// Bytes after the header.
    pub payload: Vec<u8>,
    /// Descriptors received with the message.
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    /// Whether the ERROR flag is set.
    pub fn is_error(&self) -> bool {
        self.flags & hflags::ERROR != 0
    }

    /// The errno of an error reply, `None` on success.
    pub fn errno(&self) -> Option<i32> {
        self.is_error().then_some(self.error_no as i32)
    }

    /// Panics unless this is a success reply; returns it.
    #[track_caller]
    pub fn ok(self) -> Reply {
        assert!(
            !self.is_error(),
            "command {} failed with errno {}",
            self.cmd,
            self.error_no
        );
        assert_eq!(self.error_no, 0, "success reply with an errno");
        self
    }

    /// Panics unless this is a well-formed error reply; returns the errno.
    #[track_caller]
    pub fn err(self) -> i32 {
        assert!(
            self.is_error(),
            "command {} succeeded ({} payload bytes) but an error was expected",
            self.cmd,
            self.payload.len()
        );
        assert_eq!(self.msg_size as usize, HDR, "error replies are header-only");
        assert!(self.payload.is_empty());
        assert!(self.fds.is_empty(), "error reply carries fds");
        assert_ne!(self.error_no, 0, "error reply with errno 0");
        self.error_no as i32
    }
}

/// The raw client.
pub struct RawClient {
    stream: UnixStream,
    next_id: u16,
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// `sendmsg` with `fds` attached (when non-empty). Returns the bytes sent.
pub fn sendmsg_fds(fd: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one cmsghdr with `fds`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), payload);
        }
    }
    // SAFETY: msg points at live buffers.
    cvt(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) })
}

/// `recvmsg` into `buf`, collecting received fds. Returns the bytes read
/// (0 = EOF).
pub fn recvmsg_fds(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: size computation only.
    let space = unsafe { libc::CMSG_SPACE((MAX_RX_FDS * 4) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live buffers of the declared sizes.
    let n = cvt(unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) })?;
    // SAFETY: walking the control data the kernel filled in.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / 4 {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    assert_eq!(
        msg.msg_flags & libc::MSG_CTRUNC,
        0,
        "received fds truncated"
    );
    Ok(n)
}

/// Waits up to `ms` for `fd` to become readable (or hung up).
pub fn poll_readable(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return r > 0;
    }
}

impl RawClient {
    /// Connects (no VERSION sent).
    pub fn connect(path: &Path) -> io::Result<RawClient> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(RECV_TIMEOUT))?;
        stream.set_write_timeout(Some(RECV_TIMEOUT))?;
        Ok(RawClient {
            stream,
            next_id: 0x100,
        })
    }

    /// A client on a socket already connected.
    pub fn from_stream(stream: UnixStream) -> io::Result<RawClient> {
        stream.set_read_timeout(Some(RECV_TIMEOUT))?;
        stream.set_write_timeout(Some(RECV_TIMEOUT))?;
        Ok(RawClient {
            stream,
            next_id: 0x100,
        })
    }

    /// Connects and negotiates the version.
    pub fn connect_negotiated(path: &Path) -> RawClient {
        let mut c = RawClient::connect(path).expect("connect");
        c.negotiate();
        c
    }

    /// The socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The raw socket fd.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// A fresh message id.
    pub fn next_id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    /// Sends raw bytes, with `fds` attached to the first byte.
    pub fn send_bytes(&mut self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut sent = 0;
        if !fds.is_empty() || !bytes.is_empty() {
            sent = sendmsg_fds(self.fd(), bytes, fds)?;
        }
        self.stream.write_all(&bytes[sent..])
    }

    /// Builds one message with a fresh id, without sending it (to send
    /// several in one write); returns the id and the bytes.
    pub fn message(&mut self, command: u16, flags: u32, payload: &[u8]) -> (u16, Vec<u8>) {
        let id = self.next_id();
        let mut m = header(id, command, (HDR + payload.len()) as u32, flags, 0);
        m.extend_from_slice(payload);
        (id, m)
    }

    /// Builds and sends one message; returns its id.
    pub fn send(&mut self, command: u16, flags: u32, payload: &[u8], fds: &[RawFd]) -> u16 {
        let (id, m) = self.message(command, flags, payload);
        self.send_bytes(&m, fds).expect("send");
        id
    }

    /// Receives one whole message (header, payload, fds).
    pub fn recv(&mut self) -> io::Result<Reply> {
        let mut fds = Vec::new();
        let mut hdr = [0u8; HDR];
        self.read_full(&mut hdr, &mut fds)?;
        let msg_size = le32(&hdr, 4);
        assert!(msg_size as usize >= HDR, "reply msg_size {msg_size} < 16");
        let mut payload = vec![0u8; msg_size as usize - HDR];
        self.read_full(&mut payload, &mut fds)?;
        Ok(Reply {
            msg_id: le16(&hdr, 0),
            cmd: le16(&hdr, 2),
            msg_size,
            flags: le32(&hdr, 8),
            error_no: le32(&hdr, 12),
            payload,
            fds,
        })
    }

    fn read_full(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match recvmsg_fds(self.fd(), &mut buf[got..], fds) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Receives the reply to message `id` of `command` and checks its
    /// header (id, command, type).
    #[track_caller]
    pub fn recv_reply(&mut self, id: u16, command: u16) -> Reply {
        let r = self
            .recv()
            .unwrap_or_else(|e| panic!("no reply to command {command} (id {id:#x}): {e}"));
        assert_eq!(r.msg_id, id, "reply id");
        assert_eq!(r.cmd, command, "reply command");
        assert_eq!(r.flags & hflags::TYPE_MASK, hflags::REPLY, "reply type");
        assert_eq!(
            r.flags & !(hflags::TYPE_MASK | hflags::ERROR),
            0,
            "reply flags"
        );
        r
    }

    /// Sends a command and returns its reply.
    #[track_caller]
    pub fn call(&mut self, command: u16, payload: &[u8]) -> Reply {
        self.call_fds(command, payload, &[])
    }

    /// Sends a command with fds and returns its reply.
    #[track_caller]
    pub fn call_fds(&mut self, command: u16, payload: &[u8], fds: &[RawFd]) -> Reply {
        let id = self.send(command, hflags::COMMAND, payload, fds);
        self.recv_reply(id, command)
    }

    /// Asserts that nothing arrives within `ms` milliseconds.
    #[track_caller]
    pub fn expect_no_reply_within(&mut self, ms: i32) {
        if poll_readable(self.fd(), ms) {
            let r = self.recv();
            panic!("unexpected message: {r:?}");
        }
    }

    /// Asserts that the server closed the connection (EOF or reset) within
    /// the receive timeout.
    #[track_caller]
    pub fn expect_eof(&mut self) {
        let mut b = [0u8; 1];
        let mut fds = Vec::new();
        match recvmsg_fds(self.fd(), &mut b, &mut fds) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("expected EOF, got {other:?}"),
        }
    }

    /// Reads (and drops) whatever the server still sends until it closes
    /// the connection (EOF or reset) within the receive timeout.
    #[track_caller]
    pub fn expect_closed(&mut self) {
        let mut b = [0u8; 4096];
        loop {
            let mut fds = Vec::new();
            match recvmsg_fds(self.fd(), &mut b, &mut fds) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("expected the connection to close, got {e}"),
            }
        }
    }

    // ---- per-command helpers ----

    /// VERSION with the given payload.
    #[track_caller]
    pub fn version_raw(&mut self, payload: &[u8]) -> Reply {
        self.call(cmd::VERSION, payload)
    }

    /// A proper VERSION 0.2 with QEMU-like capabilities; asserts success.
    #[track_caller]
    pub fn negotiate(&mut self) -> Reply {
        let json = r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#;
        self.version_raw(&payload::version(0, 2, Some(json), true))
            .ok()
    }

    /// DEVICE_GET_INFO with argsz 16.
    #[track_caller]
    pub fn get_info(&mut self) -> Reply {
        self.call(cmd::GET_INFO, &payload::get_info(16))
    }

    /// A GET_INFO round trip that must succeed with the test device's
    /// numbers: proves the server still answers.
    #[track_caller]
    pub fn ping(&mut self) {
        let r = self.get_info().ok();
        assert_eq!(r.payload.len(), 16);
        assert_eq!(le32(&r.payload, 0), 16);
        assert_eq!(le32(&r.payload, 8), 9, "num_regions");
        assert_eq!(le32(&r.payload, 12), 5, "num_irqs");
    }

    /// DEVICE_GET_REGION_INFO.
    #[track_caller]
    pub fn region_info(&mut self, index: u32, argsz: u32) -> Reply {
        self.call(cmd::REGION_INFO, &payload::region_info(argsz, index))
    }

    /// DEVICE_GET_IRQ_INFO.
    #[track_caller]
    pub fn irq_info(&mut self, index: u32) -> Reply {
        self.call(cmd::IRQ_INFO, &payload::irq_info(16, index))
    }

    /// DEVICE_SET_IRQS.
    #[track_caller]
    pub fn set_irqs(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        data: &[u8],
        fds: &[RawFd],
    ) -> Reply {
        self.call_fds(
            cmd::SET_IRQS,
            &payload::set_irqs(flags, index, start, count, data),
            fds,
        )
    }

    /// REGION_READ.
    #[track_caller]
    pub fn region_read(&mut self, index: u32, offset: u64, count: u32) -> Reply {
        self.call(
            cmd::REGION_READ,
            &payload::region_access(index, offset, count, &[]),
        )
    }

    /// REGION_READ that must succeed; returns the data.
    #[track_caller]
    pub fn read_ok(&mut self, index: u32, offset: u64, count: u32) -> Vec<u8> {
        let r = self.region_read(index, offset, count).ok();
        assert_eq!(r.payload.len(), 16 + count as usize);
        assert_eq!(le64(&r.payload, 0), offset);
        assert_eq!(le32(&r.payload, 8), index);
        assert_eq!(le32(&r.payload, 12), count);
        r.payload[16..].to_vec()
    }

    /// REGION_WRITE.
    #[track_caller]
    pub fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Reply {
        self.call(
            cmd::REGION_WRITE,
            &payload::region_access(index, offset, data.len() as u32, data),
        )
    }

    /// REGION_WRITE that must succeed.
    #[track_caller]
    pub fn write_ok(&mut self, index: u32, offset: u64, data: &[u8]) {
        let r = self.region_write(index, offset, data).ok();
        assert_eq!(
            r.payload,
            payload::region_access(index, offset, data.len() as u32, &[])
        );
    }

    /// DMA_MAP with an optional backing fd.
    #[track_caller]
    pub fn dma_map(&mut self, offset: u64, address: u64, size: u64, fd: Option<RawFd>) -> Reply {
        let fds: Vec<RawFd> = fd.into_iter().collect();
        self.call_fds(
            cmd::DMA_MAP,
            &payload::dma_map(
                32,
                crate::proto::DMA_READ | crate::proto::DMA_WRITE,
                offset,
                address,
                size,
            ),
            &fds,
        )
    }

    /// DMA_UNMAP.
    #[track_caller]
    pub fn dma_unmap(&mut self, flags: u32, address: u64, size: u64) -> Reply {
        self.call(
            cmd::DMA_UNMAP,
            &payload::dma_unmap(24, flags, address, size),
        )
    }

    /// DEVICE_RESET.
    #[track_caller]
    pub fn reset(&mut self) -> Reply {
        self.call(cmd::RESET, &[])
    }
}
