//! `server_stream`: the whole server fed a stream of messages over a
//! socketpair, as a hostile client would send them.
//!
//! Input format (all integers little-endian, missing bytes read as 0):
//!
//! ```text
//! input   := device:u8 op*
//! device  := bit 0: 0 = the fuzz test device, 1 = virtio-blk (backends);
//!            bit 1: PCI Express (4 KiB config space) instead of PCI
//! op      := tag:u8 (mod 6) body
//!   0 MSG       msg_id:u16 cmd:u16 flags:u32 error_no:u32
//!               size_mode:u8 [delta:i16 | raw:u32] fd_mode:u8 len:u16 payload
//!   1 RAW       fd_mode:u8 len:u16 bytes          (sent as they are)
//!   2 GUEST     offset:u16 len:u16 bytes          (written to guest RAM)
//!   3 RECONNECT                                   (Server::disconnect + attach)
//!   4 HANGUP                                      (client shuts down writing)
//!   5 ANSWER    how:u8 [errno:u32 | len:u16 bytes] (answer the server's
//!               DMA_READ/DMA_WRITE requests: how % 3 = 0 all of them
//!               correctly, 1 the oldest with an error, 2 the oldest with
//!               these payload bytes)
//! size_mode := mod 3: 0 exact (16 + len), 1 exact + delta, 2 raw
//! fd_mode   := 0 what the message asks for (DMA_MAP: the guest RAM memfd;
//!              SET_IRQS TRIGGER|EVENTFD: `count` eventfds), 1 none,
//!              2 the memfd, 3 <= n < 255: n - 3 eventfds (at most 80),
//!              255: one blocking eventfd with a full counter
//! ```
//!
//! After every op the server handles whatever is readable
//! (`handle_connection_event`) until the socket is drained, and every
//! reply frame is checked: type reply, `msg_size >= 16`, error replies
//! header-only with a nonzero errno, success replies shaped as their
//! command requires (VERSION JSON NUL-terminated and parseable, REGION_READ
//! carrying `count` bytes, ...).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use backends::storage::MemoryDisk;
use backends::virtio_blk::{VirtioBlkConfig, VirtioBlkPci};
use vfio_user_server::device::{Device, DeviceContext};
use vfio_user_server::pci::PciAdapter;
use vfio_user_server::socket::{recv_with_fds, send_with_fds};
use vfio_user_server::wire::*;
use vfio_user_server::{Server, ServerConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::test_device::TestDevice;
use crate::{Reader, Writer};

/// Device selector: the fuzz test device.
pub const DEV_TEST: u8 = 0;
/// Device selector: virtio-blk over a memory disk.
pub const DEV_BLK: u8 = 1;
/// Device selector bit: a PCI Express function (4 KiB config space).
pub const DEV_PCIE: u8 = 2;

/// Op tags.
pub const OP_MSG: u8 = 0;
/// Raw bytes.
pub const OP_RAW: u8 = 1;
/// Write guest RAM (the client's memfd); with no bytes, truncate the memfd
/// to the offset (whole pages), or give it its size back if it was.
pub const OP_GUEST: u8 = 2;
/// Disconnect and attach a new client.
pub const OP_RECONNECT: u8 = 3;
/// The client shuts its sending side.
pub const OP_HANGUP: u8 = 4;
/// Answer the server's DMA_READ/DMA_WRITE requests.
pub const OP_ANSWER: u8 = 5;
const NUM_OPS: u8 = 6;

/// fd modes.
pub const FD_AUTO: u8 = 0;
/// No fds.
pub const FD_NONE: u8 = 1;
/// The guest RAM memfd.
pub const FD_MEMFD: u8 = 2;
/// `n - FD_EVENTFDS` eventfds.
pub const FD_EVENTFDS: u8 = 3;
/// One *blocking* eventfd whose counter is full, so that a write to it
/// would block: what a hostile client can pass as an interrupt eventfd.
pub const FD_BLOCKING_FULL: u8 = 255;
/// Most fds sent with one message (more than the server's 64 so that the
/// truncation path is reached).
pub const MAX_SEND_FDS: usize = 80;

/// Size of the client's guest RAM memfd (a few pages).
pub const GUEST_RAM_SIZE: u64 = 0x8000;
/// Size of the virtio-blk memory disk.
pub const BLK_DISK_SIZE: u64 = 0x1_0000;
/// virtio-blk queues and their maximum size.
pub const BLK_NUM_QUEUES: u16 = 2;
/// Maximum queue size of the virtio-blk device.
pub const BLK_QUEUE_SIZE: u16 = 16;

/// Ops handled per input.
const MAX_OPS: usize = 512;
/// Rounds of deferred work run after each `handle_connection_event`.
const MAX_DEFERRED_ROUNDS: usize = 64;
/// Rounds of `handle_connection_event` after which the server is
/// considered stuck.
const MAX_PUMP_ROUNDS: usize = 100_000;

/// How `msg_size` is set.
#[derive(Clone, Copy, Debug)]
pub enum Size {
    /// 16 + payload length.
    Exact,
    /// Exact plus a signed delta.
    Delta(i16),
    /// This value.
    Raw(u32),
}

/// One message of the seed generator.
#[derive(Clone, Debug)]
pub struct Msg {
    /// Header msg_id.
    pub msg_id: u16,
    /// Header cmd.
    pub cmd: u16,
    /// Header flags.
    pub flags: u32,
    /// Header error_no.
    pub error_no: u32,
    /// msg_size mode.
    pub size: Size,
    /// fd mode (`FD_*`).
    pub fd_mode: u8,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Msg {
    /// A command with an exact size and the fds it asks for.
    pub fn command(msg_id: u16, cmd: u16, payload: Vec<u8>) -> Msg {
        Msg {
            msg_id,
            cmd,
            flags: flags::TYPE_COMMAND,
            error_no: 0,
            size: Size::Exact,
            fd_mode: FD_AUTO,
            payload,
        }
    }

    /// The same with NO_REPLY set.
    pub fn no_reply(mut self) -> Msg {
        self.flags |= flags::NO_REPLY;
        self
    }
}

/// Encodes ops in the input format.
#[derive(Default)]
pub struct Input(pub Writer);

impl Input {
    /// Starts an input for `device`.
    pub fn new(device: u8) -> Input {
        let mut w = Writer::default();
        w.u8(device);
        Input(w)
    }

    /// Appends a message.
    pub fn msg(&mut self, m: &Msg) -> &mut Self {
        let w = &mut self.0;
        w.u8(OP_MSG)
            .u16(m.msg_id)
            .u16(m.cmd)
            .u32(m.flags)
            .u32(m.error_no);
        match m.size {
            Size::Exact => w.u8(0),
            Size::Delta(d) => w.u8(1).u16(d as u16),
            Size::Raw(v) => w.u8(2).u32(v),
        };
        w.u8(m.fd_mode).blob(&m.payload);
        self
    }

    /// Appends raw bytes.
    pub fn raw(&mut self, fd_mode: u8, bytes: &[u8]) -> &mut Self {
        self.0.u8(OP_RAW).u8(fd_mode).blob(bytes);
        self
    }

    /// Appends a guest RAM write.
    pub fn guest(&mut self, offset: u16, bytes: &[u8]) -> &mut Self {
        self.0.u8(OP_GUEST).u16(offset).blob(bytes);
        self
    }

    /// Appends a truncation of guest RAM to `len` bytes (whole pages), or
    /// the restoring of its size if it is truncated.
    pub fn truncate_guest(&mut self, len: u16) -> &mut Self {
        self.guest(len, &[])
    }

    /// Appends a reconnect.
    pub fn reconnect(&mut self) -> &mut Self {
        self.0.u8(OP_RECONNECT);
        self
    }

    /// Appends a hang-up.
    pub fn hangup(&mut self) -> &mut Self {
        self.0.u8(OP_HANGUP);
        self
    }

    /// Appends "answer every server request correctly".
    pub fn answer(&mut self) -> &mut Self {
        self.0.u8(OP_ANSWER).u8(0);
        self
    }

    /// Appends "answer the oldest server request with `errno`".
    pub fn answer_error(&mut self, errno: u32) -> &mut Self {
        self.0.u8(OP_ANSWER).u8(1).u32(errno);
        self
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0 .0
    }
}

/// Builds the device `kind` (the selector byte) on `ctx`.
pub fn build_device(kind: u8, ctx: &DeviceContext) -> Box<dyn Device> {
    let pcie = kind & DEV_PCIE != 0;
    if kind & 1 == DEV_BLK {
        let disk = MemoryDisk::new(BLK_DISK_SIZE).unwrap().with_id("fuzz-disk");
        let config = VirtioBlkConfig {
            num_queues: BLK_NUM_QUEUES,
            queue_size: BLK_QUEUE_SIZE,
            read_only: false,
            serial: None,
            pcie,
            aio: backends::block_io::Aio::Sync,
            on_error: backends::block_io::ErrorPolicy::Report,
        };
        let blk = VirtioBlkPci::new(ctx.clone(), Arc::new(disk), config).unwrap();
        Box::new(PciAdapter::new(blk).unwrap())
    } else {
        Box::new(PciAdapter::new(TestDevice::new(ctx.clone(), pcie)).unwrap())
    }
}

/// A listening socket for `Server::from_listener`. It is never accepted
/// on (the client is attached directly), so it need not be bound.
fn listener() -> UnixListener {
    // SAFETY: plain socket(2); the result is checked and then owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    UnixListener::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

/// The server, its client end, and the client's resources.
pub struct Harness {
    server: Server,
    client: UnixStream,
    ram: File,
    eventfds: Vec<EventFd>,
    blocking: Option<EventFd>,
    rx: Vec<u8>,
    buf: Vec<u8>,
    max_reply: usize,
    /// The server's DMA_READ/DMA_WRITE requests not answered yet.
    requests: VecDeque<Request>,
    /// The server answered VERSION with minor 0: QEMU's message DMA layout.
    qemu_layout: bool,
    /// Server requests seen (for the seed generator's self-check).
    pub requests_seen: usize,
    /// Replies seen (for the seed generator's self-check).
    pub replies: Vec<Header>,
    keep_replies: bool,
}

impl Harness {
    /// A server for device `kind` with a client attached.
    pub fn new(kind: u8) -> Harness {
        // As the daemon does: a client that truncates its guest memory is
        // dropped instead of killing the process.
        vfio_user_server::sigbus::install().unwrap();
        let ctx = DeviceContext::default();
        let device = build_device(kind, &ctx);
        let config = ServerConfig::default();
        // The largest reply: a REGION_READ or a dirty bitmap of
        // max_data_xfer_size bytes plus their heads.
        let max_reply = config.max_msg_size() + 64;
        let mut server = Server::from_listener(listener(), device, ctx, config).unwrap();
        let (client, server_end) = UnixStream::pair().unwrap();
        client.set_nonblocking(true).unwrap();
        server.attach(server_end).unwrap();
        Harness {
            server,
            client,
            ram: crate::memfd(c"fuzz-guest-ram", GUEST_RAM_SIZE),
            eventfds: Vec::new(),
            blocking: None,
            rx: Vec::new(),
            buf: vec![0; 64 * 1024],
            max_reply,
            requests: VecDeque::new(),
            qemu_layout: false,
            requests_seen: 0,
            replies: Vec::new(),
            keep_replies: false,
        }
    }

    /// Records every reply header in [`Harness::replies`].
    pub fn keep_replies(&mut self) {
        self.keep_replies = true;
    }

    fn attach_new(&mut self) {
        let (client, server_end) = UnixStream::pair().unwrap();
        client.set_nonblocking(true).unwrap();
        self.server.attach(server_end).unwrap();
        self.client = client;
        self.rx.clear();
        self.requests.clear();
        self.qemu_layout = false;
    }

    fn eventfd_fds(&mut self, n: usize) -> Vec<RawFd> {
        // A few eventfds, repeated: SCM_RIGHTS dups each entry anyway.
        while self.eventfds.len() < n.min(4) {
            self.eventfds.push(EventFd::new(EFD_NONBLOCK).unwrap());
        }
        (0..n).map(|i| self.eventfds[i % 4].as_raw_fd()).collect()
    }

    fn fds_for(&mut self, fd_mode: u8, cmd: u16, payload: &[u8]) -> Vec<RawFd> {
        match fd_mode {
            FD_AUTO => match cmd {
                cmd::DMA_MAP => vec![self.ram.as_raw_fd()],
                cmd::DEVICE_SET_IRQS => {
                    let f = read_u32(payload, 4).unwrap_or(0);
                    let count = read_u32(payload, 16).unwrap_or(0) as usize;
                    let takes_fds = IRQ_SET_ACTION_TRIGGER | IRQ_SET_ACTION_UNMASK;
                    if f & IRQ_SET_DATA_EVENTFD != 0 && f & takes_fds != 0 {
                        self.eventfd_fds(count.min(64))
                    } else {
                        Vec::new()
                    }
                }
                _ => Vec::new(),
            },
            FD_NONE => Vec::new(),
            FD_MEMFD => vec![self.ram.as_raw_fd()],
            FD_BLOCKING_FULL => {
                if self.blocking.is_none() {
                    let e = EventFd::new(0).unwrap();
                    e.write(u64::MAX - 1).unwrap();
                    self.blocking = Some(e);
                }
                vec![self.blocking.as_ref().unwrap().as_raw_fd()]
            }
            n => self.eventfd_fds(((n - FD_EVENTFDS) as usize).min(MAX_SEND_FDS)),
        }
    }

    /// Sends `bytes` with `fds` on the first byte, letting the server run
    /// whenever the socket is full. Stops early if the server drops us.
    fn send(&mut self, bytes: &[u8], fds: &[RawFd]) {
        let mut sent = 0;
        let mut stalls = 0;
        while sent < bytes.len() {
            let f: &[RawFd] = if sent == 0 { fds } else { &[] };
            match send_with_fds(self.client.as_raw_fd(), &[&bytes[sent..]], f) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.pump() {
                        return;
                    }
                    stalls += 1;
                    assert!(stalls < MAX_PUMP_ROUNDS, "server stopped reading");
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The server closed the connection (EPIPE/ECONNRESET).
                    assert!(!self.server.connected(), "send failed: {e}");
                    self.attach_new();
                    return;
                }
            }
        }
    }

    /// Lets the server handle everything sent so far. Returns false (and
    /// attaches a fresh client) if the server dropped the connection.
    pub fn pump(&mut self) -> bool {
        for _ in 0..MAX_PUMP_ROUNDS {
            let Some(fd) = self.server.connection_fd() else {
                self.drain();
                self.attach_new();
                return false;
            };
            let interest = self.server.interest();
            let read = interest.read && readable(fd);
            if !read && !interest.write {
                self.drain();
                return true;
            }
            let mut alive = self.server.handle_connection_event(read, interest.write);
            // The deferred work (queue processing) the event loop runs after
            // each wake-up, bounded here as a busy device gets rounds.
            for _ in 0..MAX_DEFERRED_ROUNDS {
                if !alive || !self.server.run_deferred() {
                    break;
                }
            }
            // As the event loop does after each burst: drop a client that
            // truncated the guest memory the device touched.
            self.server.check_guest_memory();
            // The event loop watches the INTx unmask eventfd: a signal (the
            // server's own trigger writes, when the client passed the same
            // eventfd for both) unmasks.
            if let (_, Some(Ok(fd))) = self.server.irq_unmask_fd() {
                if readable(fd.as_raw_fd()) {
                    self.server.handle_irq_unmask();
                }
            }
            alive &= self.server.connected();
            self.drain();
            if !alive {
                assert!(!self.server.connected());
                self.attach_new();
                return false;
            }
        }
        panic!("server still busy after {MAX_PUMP_ROUNDS} rounds");
    }

    /// Reads every reply available on the client end, closing any fds.
    fn drain(&mut self) {
        loop {
            match recv_with_fds(self.client.as_raw_fd(), &mut self.buf) {
                Ok(r) if r.bytes == 0 => break,
                Ok(r) => {
                    assert!(r.fds.len() <= 1, "{} fds with one reply", r.fds.len());
                    self.rx.extend_from_slice(&self.buf[..r.bytes]);
                    self.check_frames();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => break,
                Err(e) => panic!("client recv: {e}"),
            }
        }
    }

    /// The oracle: every reply frame must be well formed.
    fn check_frames(&mut self) {
        let mut pos = 0;
        while self.rx.len() - pos >= HEADER_SIZE {
            let h = Header::decode(&self.rx[pos..]).unwrap();
            let size = h.msg_size as usize;
            if h.msg_type() == flags::TYPE_COMMAND {
                // A server-to-client request (message DMA).
                assert!(
                    h.cmd == cmd::DMA_READ || h.cmd == cmd::DMA_WRITE,
                    "server sent command {h:?}"
                );
                assert_eq!(h.flags, flags::TYPE_COMMAND, "{h:?}");
                assert_eq!(h.error_no, 0, "{h:?}");
                assert!(size >= HEADER_SIZE + 16, "short DMA request {h:?}");
                assert!(size <= self.max_reply, "oversized request: {h:?}");
                if self.rx.len() - pos < size {
                    break;
                }
                let p = &self.rx[pos + HEADER_SIZE..pos + size];
                self.requests
                    .push_back(parse_request(&h, p, self.qemu_layout));
                self.requests_seen += 1;
                pos += size;
                continue;
            }
            assert_eq!(h.msg_type(), flags::TYPE_REPLY, "not a reply: {h:?}");
            assert!(size >= HEADER_SIZE, "msg_size below the header: {h:?}");
            assert!(size <= self.max_reply, "oversized reply: {h:?}");
            if h.flags & flags::ERROR != 0 {
                assert_eq!(h.flags, flags::TYPE_REPLY | flags::ERROR, "{h:?}");
                assert_eq!(size, HEADER_SIZE, "error reply with a payload: {h:?}");
                assert_ne!(h.error_no, 0, "error reply with errno 0: {h:?}");
            } else {
                assert_eq!(h.flags, flags::TYPE_REPLY, "{h:?}");
                assert_eq!(h.error_no, 0, "success reply with an errno: {h:?}");
            }
            if self.rx.len() - pos < size {
                break;
            }
            if h.flags & flags::ERROR == 0 {
                let p = &self.rx[pos + HEADER_SIZE..pos + size];
                check_success(&h, p);
                if h.cmd == cmd::VERSION {
                    self.qemu_layout = read_u32(p, 0).is_ok_and(|v| v >> 16 == 0);
                }
            }
            if self.keep_replies {
                self.replies.push(h);
            }
            pos += size;
        }
        self.rx.drain(..pos);
    }

    fn write_guest(&mut self, offset: u16, bytes: &[u8]) {
        if bytes.is_empty() {
            let len = self.ram.metadata().map_or(0, |m| m.len());
            let new = if len < GUEST_RAM_SIZE {
                GUEST_RAM_SIZE
            } else {
                (u64::from(offset) % GUEST_RAM_SIZE) & !0xfff
            };
            self.ram.set_len(new).unwrap();
            return;
        }
        let off = u64::from(offset) % GUEST_RAM_SIZE;
        let n = bytes.len().min((GUEST_RAM_SIZE - off) as usize);
        self.ram.write_all_at(&bytes[..n], off).unwrap();
    }

    /// Answers the server's requests (OP_ANSWER).
    fn answer(&mut self, r: &mut Reader) {
        let how = r.u8() % 3;
        let mut out = Vec::new();
        match how {
            0 => {
                while let Some(q) = self.requests.pop_front() {
                    out.extend(q.reply(self.qemu_layout));
                }
            }
            1 => {
                let errno = r.u32();
                if let Some(q) = self.requests.pop_front() {
                    let h = Header {
                        msg_id: q.msg_id,
                        cmd: q.cmd,
                        msg_size: HEADER_SIZE as u32,
                        flags: flags::TYPE_REPLY | flags::ERROR,
                        error_no: errno,
                    };
                    out.extend(h.encode());
                }
            }
            _ => {
                let payload = r.blob();
                if let Some(q) = self.requests.pop_front() {
                    let h = Header {
                        msg_id: q.msg_id,
                        cmd: q.cmd,
                        msg_size: (HEADER_SIZE + payload.len()) as u32,
                        flags: flags::TYPE_REPLY,
                        error_no: 0,
                    };
                    out.extend(h.encode());
                    out.extend(payload);
                }
            }
        }
        if !out.is_empty() {
            self.send(&out, &[]);
            self.pump();
        }
    }

    fn hangup(&mut self) {
        let _ = self.client.shutdown(std::net::Shutdown::Write);
        if self.pump() {
            // Not seen yet (the server stopped reading): let it go.
            self.server.disconnect();
            self.attach_new();
        }
    }

    /// Runs one op from `r`.
    fn op(&mut self, r: &mut Reader) {
        match r.u8() % NUM_OPS {
            OP_MSG => {
                let msg_id = r.u16();
                let cmd = r.u16();
                let hflags = r.u32();
                let error_no = r.u32();
                let size_mode = r.u8() % 3;
                let arg = match size_mode {
                    1 => i64::from(r.u16() as i16),
                    2 => i64::from(r.u32()),
                    _ => 0,
                };
                let fd_mode = r.u8();
                let payload = r.blob();
                let exact = (HEADER_SIZE + payload.len()) as i64;
                let msg_size = match size_mode {
                    0 => exact,
                    1 => (exact + arg).clamp(0, i64::from(u32::MAX)),
                    _ => arg,
                } as u32;
                let h = Header {
                    msg_id,
                    cmd,
                    msg_size,
                    flags: hflags,
                    error_no,
                };
                let mut bytes = h.encode().to_vec();
                bytes.extend_from_slice(payload);
                let fds = self.fds_for(fd_mode, cmd, payload);
                self.send(&bytes, &fds);
                self.pump();
            }
            OP_RAW => {
                let fd_mode = r.u8();
                let bytes = r.blob();
                let fds = self.fds_for(fd_mode, 0, bytes);
                self.send(bytes, &fds);
                self.pump();
            }
            OP_GUEST => {
                let offset = r.u16();
                let bytes = r.blob();
                self.write_guest(offset, bytes);
            }
            OP_RECONNECT => {
                self.pump();
                self.server.disconnect();
                self.attach_new();
            }
            OP_HANGUP => self.hangup(),
            _ => self.answer(r),
        }
    }

    /// Ends the run: everything handled, then the client goes away.
    pub fn finish(mut self) {
        self.pump();
        self.server.disconnect();
        assert!(!self.server.connected());
    }
}

/// A DMA_READ/DMA_WRITE the server sent us.
#[derive(Debug)]
struct Request {
    msg_id: u16,
    cmd: u16,
    address: u64,
    count: usize,
}

/// Checks and records a server request. Both layouts have a 16-byte read
/// request and 16 + count bytes of write request (QEMU's: address u64,
/// count u32, data, 4 pad bytes; the spec's: address u64, count u64, data).
fn parse_request(h: &Header, p: &[u8], qemu: bool) -> Request {
    let address = read_u64(p, 0).unwrap();
    let field = if qemu {
        u64::from(read_u32(p, 8).unwrap())
    } else {
        read_u64(p, 8).unwrap()
    };
    let count = if h.cmd == cmd::DMA_READ {
        assert_eq!(p.len(), 16, "DMA_READ request {h:?}");
        read_u64(p, 8).unwrap() as usize
    } else {
        p.len() - 16
    };
    assert_eq!(field, count as u64, "DMA request count {h:?} {p:?}");
    assert!(count > 0, "empty DMA request {h:?}");
    Request {
        msg_id: h.msg_id,
        cmd: h.cmd,
        address,
        count,
    }
}

impl Request {
    /// A correct reply in the negotiated layout; reads return a pattern.
    fn reply(&self, qemu: bool) -> Vec<u8> {
        let mut w = Writer::default();
        match (self.cmd == cmd::DMA_READ, qemu) {
            (true, false) => {
                w.u64(self.address).u64(self.count as u64);
                w.0.extend((0..self.count).map(|i| i as u8));
            }
            (true, true) => {
                w.u64(self.address).u32(self.count as u32);
                w.0.extend((0..self.count).map(|i| i as u8));
            }
            (false, false) => {
                w.u64(self.address).u64(self.count as u64);
            }
            (false, true) => {}
        }
        let h = Header {
            msg_id: self.msg_id,
            cmd: self.cmd,
            msg_size: (HEADER_SIZE + w.0.len()) as u32,
            flags: flags::TYPE_REPLY,
            error_no: 0,
        };
        let mut out = h.encode().to_vec();
        out.extend(w.0);
        out
    }
}

/// Checks the shape of a success reply payload.
fn check_success(h: &Header, p: &[u8]) {
    let u32_at = |o: usize| read_u32(p, o).unwrap();
    match h.cmd {
        cmd::VERSION => {
            // Clients strip the trailing NUL and parse the rest (the rust
            // client panics on anything else).
            let v = Version::decode(p).expect("VERSION reply decodes");
            assert_eq!(v.major, 0);
            assert!(v.minor <= vfio_user_server::server::OUR_MINOR);
            assert_eq!(p.last(), Some(&0), "VERSION JSON not NUL-terminated");
            let json: serde_json::Value =
                serde_json::from_slice(&v.json).expect("VERSION reply JSON");
            assert!(json["capabilities"].is_object(), "{json}");
        }
        cmd::DMA_MAP | cmd::DEVICE_SET_IRQS | cmd::DEVICE_RESET | cmd::MIG_DATA_WRITE => {
            assert!(p.is_empty(), "cmd {} reply {p:?}", h.cmd)
        }
        cmd::DMA_UNMAP => assert_eq!(p.len(), DmaUnmap::SIZE),
        cmd::DEVICE_GET_INFO => {
            assert_eq!(p.len(), DeviceInfo::SIZE);
            let info = DeviceInfo::decode(p).unwrap();
            assert!(info.num_regions > PCI_CONFIG_REGION_INDEX);
            assert!(info.num_irqs > PCI_MSIX_IRQ_INDEX);
        }
        cmd::DEVICE_GET_REGION_INFO => {
            let info = RegionInfo::decode(p).expect("REGION_INFO reply");
            if info.flags & REGION_INFO_FLAG_MMAP != 0 {
                assert_ne!(info.flags & REGION_INFO_FLAG_CAPS, 0, "MMAP without caps");
            }
            if info.flags & REGION_INFO_FLAG_CAPS != 0 {
                assert_eq!(info.cap_offset as usize, RegionInfo::SIZE);
                assert_eq!(info.argsz as usize, p.len(), "{info:?}");
                let nr = u32_at(RegionInfo::SIZE + 8) as usize;
                assert_eq!(p.len(), RegionInfo::SIZE + 16 + 16 * nr);
            } else {
                assert_eq!(p.len(), RegionInfo::SIZE);
                assert!(info.argsz as usize >= RegionInfo::SIZE);
            }
        }
        cmd::DEVICE_GET_REGION_IO_FDS => assert_eq!(p.len(), RegionIoFds::SIZE),
        cmd::DEVICE_GET_IRQ_INFO => assert_eq!(p.len(), IrqInfo::SIZE),
        cmd::REGION_READ => {
            let a = RegionAccess::decode(p).expect("REGION_READ reply");
            assert_eq!(p.len(), RegionAccess::SIZE + a.count as usize);
        }
        cmd::REGION_WRITE => assert_eq!(p.len(), RegionAccess::SIZE),
        cmd::REGION_WRITE_MULTI => assert_eq!(p.len(), 8),
        cmd::DEVICE_FEATURE => assert!(p.len() >= DeviceFeature::SIZE),
        cmd::MIG_DATA_READ => {
            let m = MigData::decode(p).expect("MIG_DATA_READ reply");
            assert_eq!(m.size as usize + MigData::SIZE, p.len());
            assert_eq!(m.argsz as usize, p.len());
        }
        c => panic!("success reply to command {c}"),
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let mut h = Harness::new(r.u8());
    let mut ops = 0;
    while !r.is_empty() && ops < MAX_OPS {
        h.op(&mut r);
        ops += 1;
    }
    h.finish();
}

/// Runs one input and returns the reply headers, the final guest RAM and
/// the number of server requests (the seed generator checks its seeds).
pub fn run_collect(data: &[u8]) -> (Vec<Header>, Vec<u8>, usize) {
    let mut r = Reader::new(data);
    let mut h = Harness::new(r.u8());
    h.keep_replies();
    while !r.is_empty() {
        h.op(&mut r);
    }
    h.pump();
    let mut ram = vec![0u8; GUEST_RAM_SIZE as usize];
    h.ram.read_exact_at(&mut ram, 0).unwrap();
    (std::mem::take(&mut h.replies), ram, h.requests_seen)
}
