//! One device served on one listening socket: framing, validation and
//! dispatch of every client command.
//!
//! The server is driven by [`crate::event_loop::EventLoop`]: it never
//! blocks. Bytes are received into a buffer, complete messages are handled
//! in arrival order, and replies are queued and flushed; a client that does
//! not read its replies stops being read (bounded memory).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::{debug, info, warn};
use thiserror::Error;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Device, DeviceContext, ResetReason};
use crate::guest_memory::{DmaLimits, DmaTable, DIRTY_PAGE_SIZE};
use crate::irq::Irqs;
use crate::irq::IrqsState;
use crate::mig::{DeviceSide, MigrationState};
use crate::state_stream::{decode_stream, encode_stream};
use crate::vm_migration::{MigratableError, Snapshot};
use crate::message_dma::{
    decode_reply, encode_request, MessageDma, MessageDmaLayout, MessageDmaOp, MAX_PENDING_REQUESTS,
};
use crate::socket::{recv_with_fds, send_with_fds};
use crate::wire::*;

/// Replies with more payload than this go out in two writes (see `flush`).
const SPLIT_REPLY_ABOVE: usize = 2048;

/// Id of the interrupt state in a device snapshot.
pub const IRQS_SNAPSHOT_ID: &str = "vfio-user-irqs";

/// The minor protocol version we speak.
pub const OUR_MINOR: u16 = 2;
/// fds we advertise in `max_msg_fds` (and accept per message; Cloud
/// Hypervisor sends up to 16 whatever we say).
pub const ADVERTISED_MAX_MSG_FDS: u32 = 16;

/// Errors setting up a server.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The socket path is taken.
    #[error("socket path {0} already exists")]
    PathExists(PathBuf),
    /// bind/listen failed.
    #[error("cannot listen on {0}: {1}")]
    Bind(PathBuf, #[source] io::Error),
    /// Setting permissions failed.
    #[error("cannot set permissions of {0}: {1}")]
    Permissions(PathBuf, #[source] io::Error),
    /// Socket I/O failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest REGION_READ/WRITE, MIG_DATA size we receive.
    pub max_data_xfer_size: u32,
    /// DMA limits.
    pub dma_limits: DmaLimits,
    /// Advertise and accept REGION_WRITE_MULTI.
    pub write_multiple: bool,
    /// Mode of the socket file.
    pub socket_mode: u32,
    /// Largest migration stream accepted in RESUMING.
    pub max_migration_bytes: usize,
    /// Replies queued for a client that does not read before we stop
    /// reading it.
    pub max_queued_reply_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            dma_limits: DmaLimits::default(),
            write_multiple: true,
            socket_mode: 0o600,
            max_migration_bytes: 256 << 20,
            max_queued_reply_bytes: 4 << 20,
        }
    }
}

impl ServerConfig {
    /// Largest message we accept: a region write of the maximum size.
    pub fn max_msg_size(&self) -> usize {
        HEADER_SIZE + RegionAccess::SIZE + self.max_data_xfer_size as usize
    }
}

/// What every access to a region is checked against.
struct RegionLimits {
    size: u64,
    read: bool,
    write: bool,
}

/// What a handler answers.
pub(crate) enum Reply {
    /// Success with this payload and fds.
    Ok(Vec<u8>, Vec<RawFd>),
    /// Error with this errno.
    Err(i32),
}

impl Reply {
    pub(crate) fn empty() -> Reply {
        Reply::Ok(Vec::new(), Vec::new())
    }
    pub(crate) fn data(v: Vec<u8>) -> Reply {
        Reply::Ok(v, Vec::new())
    }
}

/// A queued message: its header and payload go out as two iovecs, so the
/// payload a handler built is never copied again.
struct Outgoing {
    head: [u8; HEADER_SIZE],
    payload: Vec<u8>,
    sent: usize,
    /// Borrowed fds (owned by the device), sent with the first byte.
    fds: Vec<RawFd>,
}

impl Outgoing {
    fn len(&self) -> usize {
        HEADER_SIZE + self.payload.len()
    }
}

/// fds that arrived with the message starting at `offset` of the receive
/// buffer.
struct ReceivedFds {
    offset: usize,
    fds: Vec<File>,
    /// The control data was truncated: some fds were lost.
    truncated: bool,
}

/// Offset of the last message that starts in `rx[from..filled]`, walking
/// the messages from the start of the buffer (always a message start) the
/// way `process_buffer` will consume them.
fn last_message_start(rx: &[u8], filled: usize, from: usize) -> Option<usize> {
    let mut at = 0;
    let mut last = None;
    while at < filled {
        if at >= from {
            last = Some(at);
        }
        let Ok(h) = Header::decode(rx.get(at..filled).unwrap_or(&[])) else {
            break;
        };
        // A size below the header consumes the header only; an oversized
        // one its whole claimed body (skipped).
        at = at.saturating_add((h.msg_size as usize).max(HEADER_SIZE));
    }
    last
}

/// Where the reader is in the byte stream.
enum ReadState {
    /// Collecting a message into `rx`.
    Message,
    /// Skipping the body of an oversized message.
    Discard(usize),
}

/// The attached client.
struct Connection {
    stream: UnixStream,
    rx: Vec<u8>,
    rx_len: usize,
    /// fds received, by the offset in `rx` of the message they came with.
    rx_fds: Vec<ReceivedFds>,
    read_state: ReadState,
    tx: VecDeque<Outgoing>,
    tx_bytes: usize,
    negotiated: bool,
    /// Client's `max_data_xfer_size` (bounds what we send it).
    client_max_xfer: u32,
    /// Layout of our DMA_READ/DMA_WRITE for this client.
    dma_layout: MessageDmaLayout,
    /// Id of our next server-to-client command.
    next_msg_id: u16,
    /// Our commands awaiting a reply, by message id.
    pending: HashMap<u16, (u64, MessageDmaOp)>,
}

/// Events the loop should watch for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Wants readable events.
    pub read: bool,
    /// Wants writable events.
    pub write: bool,
}

/// One device on one listening socket.
pub struct Server {
    path: Option<PathBuf>,
    listener: UnixListener,
    conn: Option<Connection>,
    device: Box<dyn Device>,
    irqs: Irqs,
    dma: DmaTable,
    config: ServerConfig,
    mig: MigrationState,
    num_regions: u32,
    /// Size and access of every region, read once (region layouts are
    /// fixed for a device's lifetime); checked on every access.
    regions: Vec<RegionLimits>,
    paused: bool,
    /// Set by [`Server::restore`]: the restored queues may hold requests
    /// made available before the snapshot; pick them up once the client
    /// can receive interrupts.
    resume_on_irqs: bool,
    message_dma: MessageDma,
    /// `sigbus::faults()` when guest memory was last checked.
    faults_seen: u64,
}

impl Server {
    /// Binds `path` (which must not exist) and serves `device` there.
    /// `ctx` must be the context the device was built with.
    pub fn new(
        path: &Path,
        device: Box<dyn Device>,
        ctx: DeviceContext,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        if let Ok(meta) = path.symlink_metadata() {
            // A socket nobody listens on is what a killed server leaves
            // behind: take it over. Anything else is somebody's file.
            use std::os::unix::fs::FileTypeExt;
            let stale = meta.file_type().is_socket()
                && UnixStream::connect(path)
                    .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused);
            if !stale {
                return Err(ServerError::PathExists(path.to_path_buf()));
            }
            info!("removing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
        }
        // Bind and listen under a temporary name, then move the socket into
        // place: a client that sees the path can connect at once.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener =
            UnixListener::bind(&tmp).map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
        let placed =
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(config.socket_mode))
                .map_err(|e| ServerError::Permissions(path.to_path_buf(), e))
                .and_then(|()| rename_noreplace(&tmp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let mut s = Self::from_listener(listener, device, ctx, config)?;
        s.path = Some(path.to_path_buf());
        Ok(s)
    }

    /// Serves `device` on an already listening socket.
    pub fn from_listener(
        listener: UnixListener,
        device: Box<dyn Device>,
        ctx: DeviceContext,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        listener.set_nonblocking(true)?;
        ctx.irqs.configure(&device.irq_layout());
        let num_regions = device.num_regions();
        let regions = (0..num_regions)
            .map(|i| {
                let d = device.region(i);
                RegionLimits {
                    size: d.size,
                    read: d.read,
                    write: d.write,
                }
            })
            .collect();
        Ok(Server {
            path: None,
            listener,
            conn: None,
            irqs: ctx.irqs,
            dma: DmaTable::new(ctx.memory, config.dma_limits),
            config,
            device,
            mig: MigrationState::default(),
            num_regions,
            regions,
            paused: false,
            resume_on_irqs: false,
            message_dma: ctx.message_dma,
            faults_seen: crate::sigbus::faults(),
        })
    }

    /// Pauses the device (no DMA, no interrupts) for a snapshot.
    pub fn pause(&mut self) -> Result<(), MigratableError> {
        if !self.paused {
            self.device.pause()?;
            self.paused = true;
        }
        Ok(())
    }

    /// Resumes after [`Server::pause`]; a device the migration state
    /// holds stopped stays stopped until that state lets it run.
    pub fn resume(&mut self) -> Result<(), MigratableError> {
        if self.paused {
            if !self.mig.device_stopped() {
                self.device.resume()?;
            }
            self.paused = false;
        }
        Ok(())
    }

    /// Whether [`Server::pause`] is in force.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The device state as a self-describing stream (see
    /// [`crate::state_stream::encode_stream`]); the device must be paused.
    pub fn snapshot(&mut self) -> Result<Vec<u8>, MigratableError> {
        if !self.paused {
            return Err(MigratableError::Snapshot("pause the device first".into()));
        }
        save_device_state(self.device.as_mut(), &self.irqs)
    }

    /// Replaces the device state with a stream made by
    /// [`Server::snapshot`], checking it completely before applying it,
    /// then lets the device run. Only allowed with no client attached.
    pub fn restore(&mut self, stream: &[u8]) -> Result<(), MigratableError> {
        if self.conn.is_some() {
            return Err(MigratableError::Restore("a client is attached".into()));
        }
        self.device.pause()?;
        load_device_state(self.device.as_mut(), &self.irqs, stream)?;
        self.paused = false;
        self.resume_on_irqs = true;
        self.device.resume()
    }

    /// The migration state of the device.
    pub fn migration_state(&self) -> crate::mig::MigState {
        self.mig.state()
    }

    /// The socket path, if bound by [`Server::new`].
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The listening socket's fd.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The attached client's fd.
    pub fn connection_fd(&self) -> Option<RawFd> {
        self.conn.as_ref().map(|c| c.stream.as_raw_fd())
    }

    /// Whether a client is attached.
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The device.
    pub fn device(&mut self) -> &mut dyn Device {
        self.device.as_mut()
    }

    /// fds the device wants watched.
    pub fn device_event_fds(&self) -> Vec<RawFd> {
        self.device.event_fds()
    }

    /// The generation of the interrupt unmask eventfd the client installed
    /// (`Irqs::unmask_generation`).
    pub fn irq_unmask_generation(&self) -> u64 {
        self.irqs.unmask_generation()
    }

    /// A duplicate of the interrupt unmask eventfd the client installed,
    /// if any, with its generation (`Irqs::unmask_fd`).
    pub fn irq_unmask_fd(&self) -> (u64, Option<io::Result<EventFd>>) {
        self.irqs.unmask_fd()
    }

    /// The client signalled its interrupt unmask eventfd (the guest's EOI
    /// of INTx under KVM): unmask, and deliver what is pending.
    pub fn handle_irq_unmask(&mut self) {
        if let Some(index) = self.irqs.unmask_signalled() {
            self.device.irq_mask_changed(index, 0, 1, false);
        }
    }

    /// Drops the client if the device touched guest memory that the client
    /// took away by truncating its file (the device read zeros there: see
    /// [`crate::sigbus`], whose handler must be installed). Cheap when
    /// nothing happened; the event loop calls it after every burst.
    /// Returns whether the client was dropped.
    pub fn check_guest_memory(&mut self) -> bool {
        let faults = crate::sigbus::faults();
        if faults == self.faults_seen {
            return false;
        }
        self.faults_seen = faults;
        let Some(address) = self.dma.take_fault() else {
            return false;
        };
        warn!("the client truncated the guest memory mapped at {address:#x}: dropping it");
        self.disconnect();
        true
    }

    /// A device fd is readable.
    pub fn handle_device_event(&mut self, fd: RawFd) {
        self.device.handle_event(fd);
        self.pump_message_dma();
        if self.flush().is_err() {
            self.disconnect();
        }
    }

    /// Runs the device's deferred work ([`Device::run_deferred`]) while a
    /// client is attached and the device is not paused; returns whether
    /// work is left.
    pub fn run_deferred(&mut self) -> bool {
        if self.conn.is_none() || self.paused {
            return false;
        }
        let more = self.device.run_deferred();
        self.pump_message_dma();
        if self.flush().is_err() {
            self.disconnect();
            return false;
        }
        more
    }

    /// Sends queued message-DMA requests, up to [`MAX_PENDING_REQUESTS`]
    /// outstanding. Requests that cannot be sent fail at once.
    fn pump_message_dma(&mut self) {
        loop {
            let Some(c) = self.conn.as_ref() else {
                return;
            };
            if !c.negotiated || c.pending.len() >= MAX_PENDING_REQUESTS {
                return;
            }
            let Some(req) = self.message_dma.pop() else {
                return;
            };
            let (address, len) = match &req.op {
                MessageDmaOp::Read { address, len } => (*address, *len as u64),
                MessageDmaOp::Write { address, data } => (*address, data.len() as u64),
            };
            let errno = if len == 0 || len > c.client_max_xfer as u64 {
                Some(libc::E2BIG)
            } else if self.dma.find(address, len).is_none() {
                Some(libc::EFAULT)
            } else {
                None
            };
            if let Some(e) = errno {
                self.device.message_dma_done(req.id, Err(e));
                continue;
            }
            let Some(c) = self.conn.as_mut() else {
                return;
            };
            let cmd = match req.op {
                MessageDmaOp::Read { .. } => cmd::DMA_READ,
                MessageDmaOp::Write { .. } => cmd::DMA_WRITE,
            };
            let payload = encode_request(&req.op, c.dma_layout);
            let msg_id = c.next_msg_id;
            c.next_msg_id = c.next_msg_id.wrapping_add(1);
            let hdr = Header {
                msg_id,
                cmd,
                msg_size: (HEADER_SIZE + payload.len()) as u32,
                flags: flags::TYPE_COMMAND,
                error_no: 0,
            };
            c.tx_bytes += HEADER_SIZE + payload.len();
            c.tx.push_back(Outgoing {
                head: hdr.encode(),
                payload,
                sent: 0,
                fds: Vec::new(),
            });
            c.pending.insert(msg_id, (req.id, req.op));
        }
    }

    /// Matches a reply to one of our commands; false if it is unsolicited.
    fn complete_message_dma(&mut self, hdr: &Header, payload: &[u8]) -> bool {
        let Some(c) = self.conn.as_mut() else {
            return false;
        };
        let matches = c.pending.get(&hdr.msg_id).is_some_and(|(_, op)| {
            hdr.cmd
                == match op {
                    MessageDmaOp::Read { .. } => cmd::DMA_READ,
                    MessageDmaOp::Write { .. } => cmd::DMA_WRITE,
                }
        });
        if !matches {
            return false;
        }
        let layout = c.dma_layout;
        let Some((id, op)) = c.pending.remove(&hdr.msg_id) else {
            return false;
        };
        let result = if hdr.flags & flags::ERROR != 0 {
            Err(if hdr.error_no == 0 || hdr.error_no > 4096 {
                libc::EIO
            } else {
                hdr.error_no as i32
            })
        } else {
            decode_reply(&op, layout, payload)
        };
        self.device.message_dma_done(id, result);
        true
    }

    /// What to watch on the connection.
    pub fn interest(&self) -> Interest {
        match &self.conn {
            None => Interest {
                read: false,
                write: false,
            },
            Some(c) => Interest {
                read: c.tx_bytes < self.config.max_queued_reply_bytes,
                write: !c.tx.is_empty(),
            },
        }
    }

    /// Accepts pending connections: the first becomes the client, any
    /// other is closed at once (one client per device).
    pub fn accept(&mut self) -> io::Result<bool> {
        if self
            .conn
            .as_ref()
            .is_some_and(|c| peer_hung_up(c.stream.as_raw_fd()))
        {
            // The client hung up but its input is not worked through yet
            // (more than one wake-up's worth). Finish it instead of refusing
            // a client that reconnects at once (Cloud Hypervisor on guest
            // reboot); the new connection waits in the backlog until the
            // next wake-up, when the loop has forgotten the old fd.
            self.handle_connection_event(true, true);
            return Ok(false);
        }
        let mut attached = false;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conn.is_some() {
                        warn!("refusing a second client on {:?}", self.path);
                        drop(stream);
                        continue;
                    }
                    self.attach(stream)?;
                    attached = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(attached),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes `stream` the client connection (what `accept` does with the
    /// first connection; also used to serve a socketpair directly).
    pub fn attach(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        info!("client attached on {:?}", self.path);
        self.conn = Some(Connection {
            stream,
            rx: vec![0; 64 * 1024],
            rx_len: 0,
            rx_fds: Vec::new(),
            read_state: ReadState::Message,
            tx: VecDeque::new(),
            tx_bytes: 0,
            negotiated: false,
            client_max_xfer: DEFAULT_MAX_DATA_XFER_SIZE,
            dma_layout: MessageDmaLayout::Spec,
            next_msg_id: 1,
            pending: HashMap::new(),
        });
        Ok(())
    }

    /// Drops the client: DMA maps and interrupt fds go, the device is
    /// reset, and the next client can attach.
    pub fn disconnect(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        for (id, _) in conn.pending.into_values() {
            self.device.message_dma_done(id, Err(libc::ECONNRESET));
        }
        for id in self.message_dma.drain() {
            self.device.message_dma_done(id, Err(libc::ECONNRESET));
        }
        info!("client detached from {:?}", self.path);
        self.unmap_all();
        self.irqs.clear();
        self.mig.reset(self.device.as_mut(), self.paused);
        if self.paused {
            // A snapshot may still be taken of a paused device whose
            // client left; its state is kept until resume.
            info!("client left while paused: device state kept");
            return;
        }
        self.device.reset(ResetReason::LostConnection);
    }

    /// Tells the device every DMA range is going away, then drops them all.
    fn unmap_all(&mut self) {
        let ranges: Vec<(u64, u64)> = self.dma.ranges().map(|r| (r.address, r.size)).collect();
        for (a, s) in ranges {
            self.device.dma_unmapping(a, s);
        }
        self.dma.unmap_all();
    }

    /// Handles readable/writable/hang-up events on the connection.
    /// Returns false once the client is gone.
    pub fn handle_connection_event(&mut self, readable: bool, writable: bool) -> bool {
        if self.conn.is_none() {
            return false;
        }
        let ok = (!writable || self.flush().is_ok()) && (!readable || self.read_and_handle());
        if !ok {
            self.disconnect();
        }
        ok
    }

    /// Reads what is available and handles every complete message.
    fn read_and_handle(&mut self) -> bool {
        // Bounded work per wake-up keeps other devices on the loop served.
        for _ in 0..64 {
            let Some(c) = self.conn.as_mut() else {
                return false;
            };
            if c.tx_bytes >= self.config.max_queued_reply_bytes {
                return true;
            }
            if c.rx_len == c.rx.len() {
                // Only reached when a message is bigger than the buffer.
                let want = (c.rx.len() * 2).min(self.config.max_msg_size());
                c.rx.resize(want.max(c.rx.len()), 0);
            }
            // Read as much as is there: header and body in one go, several
            // pipelined messages at once. Linux hands the fds of a message
            // to the recvmsg that reaches its first segment, together with
            // the bytes before it, and stops right after that segment: so
            // fds belong to the last message that starts in this read
            // (clients send each message's fds with its first byte).
            let want = match c.read_state {
                ReadState::Discard(left) => left,
                ReadState::Message => c.rx.len() - c.rx_len,
            };
            let fd = c.stream.as_raw_fd();
            let start = c.rx_len;
            let end = c.rx.len().min(start.saturating_add(want));
            let r = match recv_with_fds(fd, &mut c.rx[start..end]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("recv: {e}");
                    return false;
                }
            };
            if r.bytes == 0 {
                return false;
            }
            if (!r.fds.is_empty() || r.truncated) && matches!(c.read_state, ReadState::Discard(_)) {
                // fds riding on a body being skipped are closed with it.
                drop(r.fds);
            } else if !r.fds.is_empty() || r.truncated {
                let Some(offset) = last_message_start(&c.rx, start + r.bytes, start) else {
                    // fds not at a message start: protocol violation.
                    warn!("fds received mid-message; dropping the client");
                    return false;
                };
                if c.rx_fds.iter().any(|f| f.offset == offset) {
                    warn!("two sets of fds for one message; dropping the client");
                    return false;
                }
                c.rx_fds.push(ReceivedFds {
                    offset,
                    fds: r.fds,
                    truncated: r.truncated,
                });
            }
            c.rx_len += r.bytes;
            if !self.process_buffer() {
                return false;
            }
            if self.conn.is_none() {
                return false;
            }
            let at_boundary = self
                .conn
                .as_ref()
                .is_some_and(|c| c.rx_len == 0 && matches!(c.read_state, ReadState::Message));
            if r.bytes < end - start || at_boundary {
                // Short read (the socket is most likely drained) or a whole
                // message handled: level-triggered epoll says if more came,
                // which saves a read that would fail with EAGAIN.
                break;
            }
        }
        // Requests the handlers queued go out only now, after their replies.
        self.pump_message_dma();
        self.flush().is_ok()
    }

    /// Handles every complete message in the receive buffer.
    fn process_buffer(&mut self) -> bool {
        let max_msg = self.config.max_msg_size();
        let mut consumed = 0;
        loop {
            let Some(c) = self.conn.as_mut() else {
                return false;
            };
            let avail = c.rx_len - consumed;
            if let ReadState::Discard(left) = c.read_state {
                let n = left.min(avail);
                consumed += n;
                c.read_state = if left == n {
                    ReadState::Message
                } else {
                    ReadState::Discard(left - n)
                };
                if avail == n {
                    break;
                }
                continue;
            }
            if avail < HEADER_SIZE {
                break;
            }
            let hdr = match Header::decode(&c.rx[consumed..consumed + HEADER_SIZE]) {
                Ok(h) => h,
                Err(_) => break,
            };
            let size = hdr.msg_size as usize;
            if size < HEADER_SIZE || size > max_msg {
                // Answer, then skip whatever body the size claims.
                warn!("bad msg_size {size} for command {}", hdr.cmd);
                let body = size.saturating_sub(HEADER_SIZE);
                c.rx_fds.retain(|f| f.offset != consumed);
                consumed += HEADER_SIZE;
                c.read_state = ReadState::Discard(body);
                let errno = if size > max_msg {
                    libc::E2BIG
                } else {
                    libc::EINVAL
                };
                self.queue_reply(&hdr, Reply::Err(errno));
                continue;
            }
            if avail < size {
                break;
            }
            let (fds, truncated) = match c.rx_fds.iter().position(|f| f.offset == consumed) {
                Some(i) => {
                    let r = c.rx_fds.swap_remove(i);
                    (r.fds, r.truncated)
                }
                None => (Vec::new(), false),
            };
            // Lend the buffer out so handlers can borrow `self` mutably
            // without copying the payload.
            let rx = std::mem::take(&mut c.rx);
            self.dispatch(
                &hdr,
                &rx[consumed + HEADER_SIZE..consumed + size],
                fds,
                truncated,
            );
            consumed += size;
            match self.conn.as_mut() {
                Some(c) => c.rx = rx,
                None => return false,
            }
        }
        if let Some(c) = self.conn.as_mut() {
            c.rx.copy_within(consumed..c.rx_len, 0);
            c.rx_len -= consumed;
            // fds of messages still incomplete move with their bytes.
            c.rx_fds.retain(|f| f.offset >= consumed);
            for f in c.rx_fds.iter_mut() {
                f.offset -= consumed;
            }
            // Give back memory a large message made us take.
            if c.rx_len == 0 && c.rx.len() > 64 * 1024 {
                c.rx.truncate(64 * 1024);
                c.rx.shrink_to_fit();
            }
            true
        } else {
            false
        }
    }

    fn dispatch(&mut self, hdr: &Header, payload: &[u8], fds: Vec<File>, truncated: bool) {
        if hdr.msg_type() == flags::TYPE_REPLY
            && fds.is_empty()
            && self.complete_message_dma(hdr, payload)
        {
            return;
        }
        let reply = if hdr.msg_type() != flags::TYPE_COMMAND {
            // No server-to-client request is outstanding, so any reply is
            // unsolicited; other types are invalid.
            warn!("unexpected message type {:#x}", hdr.flags);
            Reply::Err(libc::EINVAL)
        } else if truncated {
            Reply::Err(libc::EINVAL)
        } else {
            self.handle_command(hdr, payload, fds)
        };
        if hdr.no_reply() && hdr.msg_type() == flags::TYPE_COMMAND {
            if let Reply::Err(e) = reply {
                debug!("command {} (no reply) failed: errno {e}", hdr.cmd);
            }
            return;
        }
        self.queue_reply(hdr, reply);
    }

    fn queue_reply(&mut self, hdr: &Header, reply: Reply) {
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        let (h, payload, fds) = match reply {
            Reply::Ok(p, fds) => (hdr.reply(p.len()), p, fds),
            Reply::Err(e) => {
                debug!("command {} failed: errno {e}", hdr.cmd);
                (hdr.error_reply(e), Vec::new(), Vec::new())
            }
        };
        c.tx_bytes += HEADER_SIZE + payload.len();
        c.tx.push_back(Outgoing {
            head: h.encode(),
            payload,
            sent: 0,
            fds,
        });
    }

    /// Sends queued replies until done or the socket is full.
    fn flush(&mut self) -> io::Result<()> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        while let Some(out) = c.tx.front_mut() {
            let fds: &[RawFd] = if out.sent == 0 { &out.fds } else { &[] };
            let sent = if out.sent < HEADER_SIZE && out.payload.len() > SPLIT_REPLY_ABOVE {
                // Clients read the header and the fixed head first: send
                // those on their own so the client wakes while the bulk
                // data is still being copied.
                let head_end = out.payload.len().min(RegionAccess::SIZE);
                send_with_fds(
                    c.stream.as_raw_fd(),
                    &[&out.head[out.sent..], &out.payload[..head_end]],
                    fds,
                )
            } else if out.sent < HEADER_SIZE {
                send_with_fds(
                    c.stream.as_raw_fd(),
                    &[&out.head[out.sent..], &out.payload],
                    fds,
                )
            } else {
                send_with_fds(
                    c.stream.as_raw_fd(),
                    &[&out.payload[out.sent - HEADER_SIZE..]],
                    fds,
                )
            };
            match sent {
                Ok(n) => {
                    out.sent += n;
                    c.tx_bytes -= n;
                    if out.sent == out.len() {
                        c.tx.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn negotiated(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.negotiated)
    }

    fn handle_command(&mut self, hdr: &Header, payload: &[u8], fds: Vec<File>) -> Reply {
        if hdr.cmd == cmd::VERSION {
            return self.handle_version(payload, fds);
        }
        if !self.negotiated() {
            return Reply::Err(libc::EINVAL);
        }
        let takes_fds = matches!(hdr.cmd, cmd::DMA_MAP | cmd::DEVICE_SET_IRQS);
        if !takes_fds && !fds.is_empty() {
            return Reply::Err(libc::EINVAL);
        }
        if !self.mig.command_allowed(hdr.cmd) {
            return Reply::Err(libc::EBUSY);
        }
        match hdr.cmd {
            cmd::DMA_MAP => self.handle_dma_map(payload, fds),
            cmd::DMA_UNMAP => self.handle_dma_unmap(payload),
            cmd::DEVICE_GET_INFO => self.handle_get_info(payload),
            cmd::DEVICE_GET_REGION_INFO => self.handle_region_info(payload),
            cmd::DEVICE_GET_REGION_IO_FDS => self.handle_region_io_fds(payload),
            cmd::DEVICE_GET_IRQ_INFO => self.handle_irq_info(payload),
            cmd::DEVICE_SET_IRQS => self.handle_set_irqs(payload, fds),
            cmd::REGION_READ => self.handle_region_read(payload),
            cmd::REGION_WRITE => self.handle_region_write(payload),
            cmd::REGION_WRITE_MULTI => self.handle_write_multi(payload),
            cmd::DEVICE_RESET => self.handle_reset(payload),
            cmd::DEVICE_FEATURE => self.handle_device_feature(payload),
            cmd::MIG_DATA_READ => self.mig.data_read(payload, self.client_max_xfer()),
            cmd::MIG_DATA_WRITE => self
                .mig
                .data_write(payload, self.config.max_migration_bytes),
            // Server-to-client commands sent to us.
            cmd::DMA_READ | cmd::DMA_WRITE => Reply::Err(libc::EINVAL),
            // The removed DIRTY_PAGES (14) and anything unknown.
            _ => Reply::Err(libc::ENOSYS),
        }
    }

    fn client_max_xfer(&self) -> u32 {
        self.conn
            .as_ref()
            .map_or(DEFAULT_MAX_DATA_XFER_SIZE, |c| c.client_max_xfer)
    }

    fn handle_version(&mut self, payload: &[u8], fds: Vec<File>) -> Reply {
        if self.negotiated() || !fds.is_empty() {
            return Reply::Err(libc::EINVAL);
        }
        let Ok(v) = Version::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if v.major != 0 {
            return Reply::Err(libc::ENOTSUP);
        }
        let Ok(caps) = ClientCaps::parse(&v.json) else {
            return Reply::Err(libc::EINVAL);
        };
        let mut json = serde_json::json!({
            "capabilities": {
                "max_msg_fds": ADVERTISED_MAX_MSG_FDS,
                "max_data_xfer_size": self.config.max_data_xfer_size,
                "pgsizes": DIRTY_PAGE_SIZE,
                "max_dma_maps": self.config.dma_limits.max_maps,
                "write_multiple": self.config.write_multiple,
            }
        });
        if self.device.migratable() {
            json["capabilities"]["migration"] = serde_json::json!({
                "pgsize": DIRTY_PAGE_SIZE,
                "max_bitmap_size": 256u64 << 20,
            });
        }
        let reply = Version {
            major: 0,
            minor: v.minor.min(OUR_MINOR),
            json: json.to_string().into_bytes(),
        };
        if let Some(c) = self.conn.as_mut() {
            c.negotiated = true;
            c.client_max_xfer = caps.max_data_xfer_size;
            // QEMU proposes 0.0 and uses its own DMA_READ/WRITE layout;
            // libvfio-user-style clients propose a later minor.
            c.dma_layout = if v.minor == 0 {
                MessageDmaLayout::Qemu
            } else {
                MessageDmaLayout::Spec
            };
        }
        Reply::data(reply.encode())
    }

    fn handle_dma_map(&mut self, payload: &[u8], mut fds: Vec<File>) -> Reply {
        let Ok(m) = DmaMap::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if (m.argsz as usize) < DmaMap::SIZE || fds.len() > 1 {
            return Reply::Err(libc::EINVAL);
        }
        let file = fds.pop();
        let dup = if self.device.observes_raw_requests() {
            file.as_ref().and_then(|f| f.try_clone().ok())
        } else {
            None
        };
        match self.dma.map(m.flags, m.offset, m.address, m.size, file) {
            Ok(()) => {
                if self.device.observes_raw_requests() {
                    self.device
                        .dma_mapped(m.flags, m.offset, m.address, m.size, dup);
                }
                Reply::empty()
            }
            Err(e) => {
                debug!("DMA_MAP {:#x}+{:#x}: {e}", m.address, m.size);
                Reply::Err(e.errno())
            }
        }
    }

    fn handle_dma_unmap(&mut self, payload: &[u8]) -> Reply {
        let Ok(u) = DmaUnmap::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if (u.argsz as usize) < DmaUnmap::SIZE
            || u.flags & !DMA_UNMAP_FLAG_ALL != 0
            || payload.len() != DmaUnmap::SIZE
        {
            // The legacy dirty-bitmap variant is not supported.
            return Reply::Err(libc::EINVAL);
        }
        if u.flags & DMA_UNMAP_FLAG_ALL != 0 {
            if u.address != 0 || u.size != 0 {
                return Reply::Err(libc::EINVAL);
            }
            self.unmap_all();
        } else {
            // Only an exact match is unmapped: don't tell the device to
            // stop using a range that stays mapped.
            let exact = self
                .dma
                .find(u.address, u.size)
                .is_some_and(|r| r.address == u.address && r.size == u.size);
            if !exact {
                return Reply::Err(libc::ENOENT);
            }
            self.device.dma_unmapping(u.address, u.size);
            if let Err(e) = self.dma.unmap(u.address, u.size) {
                return Reply::Err(e.errno());
            }
        }
        let echo = DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            ..u
        };
        Reply::data(echo.encode())
    }

    fn handle_get_info(&mut self, payload: &[u8]) -> Reply {
        let Ok(req) = DeviceInfo::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        // Cloud Hypervisor's client sends 32 (it counts the header).
        if (req.argsz as usize) < DeviceInfo::SIZE {
            return Reply::Err(libc::EINVAL);
        }
        let mut dflags = DEVICE_FLAGS_PCI;
        if self.device.resettable() {
            dflags |= DEVICE_FLAGS_RESET;
        }
        Reply::data(
            DeviceInfo {
                argsz: DeviceInfo::SIZE as u32,
                flags: dflags,
                num_regions: self.num_regions,
                num_irqs: self.irqs.num_irqs(),
            }
            .encode(),
        )
    }

    fn handle_region_info(&mut self, payload: &[u8]) -> Reply {
        let Ok(req) = RegionInfo::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if (req.argsz as usize) < RegionInfo::SIZE || req.index >= self.num_regions {
            return Reply::Err(libc::EINVAL);
        }
        let desc = self.device.region(req.index);
        let mut info = RegionInfo {
            argsz: RegionInfo::SIZE as u32,
            flags: 0,
            index: req.index,
            cap_offset: 0,
            size: desc.size,
            offset: 0,
        };
        if desc.read {
            info.flags |= REGION_INFO_FLAG_READ;
        }
        if desc.write {
            info.flags |= REGION_INFO_FLAG_WRITE;
        }
        let Some(mmap) = desc.mmap.filter(|_| desc.size > 0) else {
            return Reply::data(info.encode());
        };
        let areas = if mmap.areas.is_empty() {
            vec![(0, desc.size)]
        } else {
            mmap.areas.clone()
        };
        let cap = encode_sparse_mmap_cap(&areas);
        let need = RegionInfo::SIZE + cap.len();
        info.argsz = need as u32;
        info.offset = mmap.offset;
        if (req.argsz as usize) < need {
            // Too small for the caps: report the size needed, no MMAP and
            // no fd until the client asks again with room.
            return Reply::data(info.encode());
        }
        info.flags |= REGION_INFO_FLAG_MMAP | REGION_INFO_FLAG_CAPS;
        info.cap_offset = RegionInfo::SIZE as u32;
        let mut out = info.encode();
        out.extend_from_slice(&cap);
        Reply::Ok(out, vec![mmap.fd])
    }

    fn handle_region_io_fds(&mut self, payload: &[u8]) -> Reply {
        let Ok(req) = RegionIoFds::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if (req.argsz as usize) < RegionIoFds::SIZE
            || req.flags != 0
            || req.count != 0
            || req.index >= self.num_regions
        {
            return Reply::Err(libc::EINVAL);
        }
        // No device offers ioeventfds: an empty list.
        Reply::data(
            RegionIoFds {
                argsz: RegionIoFds::SIZE as u32,
                flags: 0,
                index: req.index,
                count: 0,
            }
            .encode(),
        )
    }

    fn handle_irq_info(&mut self, payload: &[u8]) -> Reply {
        let Ok(req) = IrqInfo::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if (req.argsz as usize) < IrqInfo::SIZE {
            return Reply::Err(libc::EINVAL);
        }
        let Some(info) = self.irqs.info(req.index) else {
            return Reply::Err(libc::EINVAL);
        };
        Reply::data(
            IrqInfo {
                argsz: IrqInfo::SIZE as u32,
                flags: info.flags,
                index: req.index,
                count: info.count,
            }
            .encode(),
        )
    }

    fn handle_set_irqs(&mut self, payload: &[u8], fds: Vec<File>) -> Reply {
        let Ok(set) = IrqSet::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if (set.argsz as usize) < IrqSet::SIZE {
            return Reply::Err(libc::EINVAL);
        }
        let had_fds = !fds.is_empty();
        let dups: Vec<File> = if self.device.observes_raw_requests() {
            fds.iter().filter_map(|f| f.try_clone().ok()).collect()
        } else {
            Vec::new()
        };
        match self.irqs.set_irqs(&set, &payload[IrqSet::SIZE..], fds) {
            Ok(changed) => {
                if let Some((start, count, masked)) = changed {
                    self.device
                        .irq_mask_changed(set.index, start, count, masked);
                }
                if self.device.observes_raw_requests() {
                    self.device.irqs_set(&set, dups);
                }
                let installed = set.flags & IRQ_SET_DATA_EVENTFD != 0 && had_fds;
                if installed && self.resume_on_irqs && !self.paused && !self.mig.device_stopped() {
                    // Guest memory is mapped and interrupts can be
                    // delivered: serve what was pending at the snapshot.
                    self.resume_on_irqs = false;
                    if let Err(e) = self.device.resume() {
                        warn!("resume after restore failed: {e}");
                    }
                }
                Reply::empty()
            }
            Err(e) => {
                debug!("SET_IRQS {set:?}: {e}");
                Reply::Err(e.errno())
            }
        }
    }

    /// Checks a region access; returns the region size.
    fn check_access(&self, index: u32, offset: u64, count: u32, write: bool) -> Result<(), i32> {
        if count > self.config.max_data_xfer_size {
            return Err(libc::EINVAL);
        }
        let Some(r) = self.regions.get(index as usize) else {
            return Err(libc::EINVAL);
        };
        let allowed = if write { r.write } else { r.read };
        match offset.checked_add(count as u64) {
            Some(end) if end <= r.size && allowed => Ok(()),
            _ => Err(libc::EINVAL),
        }
    }

    fn handle_region_read(&mut self, payload: &[u8]) -> Reply {
        let Ok(req) = RegionAccess::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if payload.len() != RegionAccess::SIZE {
            return Reply::Err(libc::EINVAL);
        }
        if let Err(e) = self.check_access(req.region, req.offset, req.count, false) {
            return Reply::Err(e);
        }
        let mut out = vec![0u8; RegionAccess::SIZE + req.count as usize];
        req.encode_into(&mut out);
        if req.count > 0 {
            if let Err(e) =
                self.device
                    .region_read(req.region, req.offset, &mut out[RegionAccess::SIZE..])
            {
                return Reply::Err(e.errno());
            }
        }
        Reply::data(out)
    }

    fn handle_region_write(&mut self, payload: &[u8]) -> Reply {
        let Ok(req) = RegionAccess::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        let data = &payload[RegionAccess::SIZE..];
        if data.len() != req.count as usize {
            return Reply::Err(libc::EINVAL);
        }
        if let Err(e) = self.check_access(req.region, req.offset, req.count, true) {
            return Reply::Err(e);
        }
        if req.count > 0 {
            if let Err(e) = self.device.region_write(req.region, req.offset, data) {
                return Reply::Err(e.errno());
            }
        }
        Reply::data(req.encode())
    }

    fn handle_write_multi(&mut self, payload: &[u8]) -> Reply {
        if !self.config.write_multiple {
            return Reply::Err(libc::ENOSYS);
        }
        let Ok(n) = read_u64(payload, 0) else {
            return Reply::Err(libc::EINVAL);
        };
        let records = &payload[8..];
        if n == 0 || (n as usize).checked_mul(WriteMultiRecord::SIZE) != Some(records.len()) {
            return Reply::Err(libc::EINVAL);
        }
        // Validate every record first so a bad one applies none.
        let mut writes = Vec::with_capacity(n as usize);
        for chunk in records.chunks_exact(WriteMultiRecord::SIZE) {
            let Ok(rec) = WriteMultiRecord::decode(chunk) else {
                return Reply::Err(libc::EINVAL);
            };
            if rec.count == 0 || rec.count > WriteMultiRecord::MAX_DATA {
                return Reply::Err(libc::EINVAL);
            }
            if let Err(e) = self.check_access(rec.region, rec.offset, rec.count, true) {
                return Reply::Err(e);
            }
            writes.push(rec);
        }
        for rec in &writes {
            let data = &rec.data[..rec.count as usize];
            if let Err(e) = self.device.region_write(rec.region, rec.offset, data) {
                return Reply::Err(e.errno());
            }
        }
        Reply::data(n.to_le_bytes().to_vec())
    }

    fn handle_reset(&mut self, payload: &[u8]) -> Reply {
        if !payload.is_empty() {
            return Reply::Err(libc::EINVAL);
        }
        debug!("DEVICE_RESET from the client");
        self.device.reset(ResetReason::Command);
        self.mig.device_reset();
        // A reset device runs again; one that the migration state or the
        // control socket holds stopped must stay stopped.
        if self.paused || self.mig.device_stopped() {
            if let Err(e) = self.device.pause() {
                warn!("cannot keep the reset device paused: {e}");
            }
        }
        Reply::empty()
    }

    fn handle_device_feature(&mut self, payload: &[u8]) -> Reply {
        let memory = self.dma.memory();
        let mem = memory.memory();
        let side = DeviceSide {
            device: self.device.as_mut(),
            irqs: &self.irqs,
            held: self.paused,
        };
        self.mig.device_feature(
            payload,
            side,
            &mem,
            self.dma.ranges(),
            self.config.max_data_xfer_size,
        )
    }
}

/// Whether the peer of a connected socket has closed or shut down its end.
fn peer_hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The device state and its interrupt state as one stream (the device is
/// paused).
pub(crate) fn save_device_state(
    device: &mut dyn Device,
    irqs: &Irqs,
) -> Result<Vec<u8>, MigratableError> {
    let kind = device.snapshot_kind();
    let mut snap = device.snapshot()?;
    snap.add_snapshot(
        IRQS_SNAPSHOT_ID.into(),
        Snapshot::new_from_state(&irqs.state())?,
    );
    encode_stream(&kind, &snap)
}

/// Checks a stream made by [`save_device_state`] and applies it to a paused
/// device: nothing is applied unless the stream is whole and of this kind.
pub(crate) fn load_device_state(
    device: &mut dyn Device,
    irqs: &Irqs,
    stream: &[u8],
) -> Result<(), MigratableError> {
    let kind = device.snapshot_kind();
    let mut snap = decode_stream(stream, &kind)?;
    let irq_state = match snap.snapshots.remove(IRQS_SNAPSHOT_ID) {
        Some(s) => Some(s.to_state::<IrqsState>()?),
        None => None,
    };
    let before = irqs.state();
    if let Some(st) = &irq_state {
        irqs.set_state(st)
            .map_err(|e| MigratableError::Restore(format!("interrupt layout: {e}")))?;
    }
    if let Err(e) = device.restore(&snap) {
        let _ = irqs.set_state(&before);
        return Err(e);
    }
    Ok(())
}

/// Renames `from` to `to`, failing if `to` exists.
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), ServerError> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (Ok(f), Ok(t)) = (c(from), c(to)) else {
        return Err(ServerError::Bind(
            to.to_path_buf(),
            io::ErrorKind::InvalidInput.into(),
        ));
    };
    // SAFETY: two valid NUL-terminated paths; no memory is retained.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        Err(ServerError::PathExists(to.to_path_buf()))
    } else {
        Err(ServerError::Bind(to.to_path_buf(), e))
    }
}

/// What we keep of the client's VERSION capabilities.
struct ClientCaps {
    max_data_xfer_size: u32,
}

impl ClientCaps {
    /// Parses and type-checks the client's JSON (absent JSON or absent
    /// keys take the defaults).
    fn parse(json: &[u8]) -> Result<ClientCaps, ()> {
        let mut caps = ClientCaps {
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
        };
        if json.is_empty() {
            return Ok(caps);
        }
        let v: serde_json::Value = serde_json::from_slice(json).map_err(|_| ())?;
        let top = v.as_object().ok_or(())?;
        let Some(c) = top.get("capabilities") else {
            return Ok(caps);
        };
        let c = c.as_object().ok_or(())?;
        let num = |k: &str| -> Result<Option<u64>, ()> {
            match c.get(k) {
                None => Ok(None),
                Some(x) => x.as_u64().map(Some).ok_or(()),
            }
        };
        if let Some(fds) = num("max_msg_fds")? {
            if fds == 0 || fds > 1024 {
                return Err(());
            }
        }
        if let Some(x) = num("max_data_xfer_size")? {
            if x < 4096 {
                return Err(());
            }
            caps.max_data_xfer_size = u32::try_from(x).unwrap_or(u32::MAX);
        }
        if let Some(p) = num("pgsizes")? {
            if p & DIRTY_PAGE_SIZE as u64 == 0 {
                return Err(());
            }
        }
        num("max_dma_maps")?;
        if let Some(m) = c.get("migration") {
            let m = m.as_object().ok_or(())?;
            if let Some(p) = m.get("pgsize") {
                // Dirty pages are tracked at 4 KiB.
                if p.as_u64() != Some(DIRTY_PAGE_SIZE as u64) {
                    return Err(());
                }
            }
        }
        if let Some(w) = c.get("write_multiple") {
            w.as_bool().ok_or(())?;
        }
        Ok(caps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(size: u32) -> Vec<u8> {
        let mut m = Header {
            msg_size: size,
            ..Header::default()
        }
        .encode()
        .to_vec();
        m.resize(size.max(16) as usize, 0);
        m
    }

    #[test]
    fn fds_go_to_the_last_message_starting_in_a_read() {
        let mut rx = msg(32);
        rx.extend(msg(20));
        rx.extend(msg(40));
        // The read covered the 2nd and 3rd messages: the 3rd gets them.
        assert_eq!(last_message_start(&rx, rx.len(), 32), Some(52));
        // A read ending inside the 3rd message's header still starts it.
        assert_eq!(last_message_start(&rx, 60, 32), Some(52));
        // A read of the 1st message's body only: no message starts there.
        assert_eq!(last_message_start(&rx, 30, 10), None);
        assert_eq!(last_message_start(&rx, 32, 0), Some(0));
        // A size below the header consumes 16 bytes.
        let mut bad = msg(3);
        bad.extend(msg(16));
        assert_eq!(last_message_start(&bad, bad.len(), 1), Some(16));
        // An oversized message's claimed body is skipped whole.
        let mut huge = Header {
            msg_size: 1 << 30,
            ..Header::default()
        }
        .encode()
        .to_vec();
        huge.resize(64, 0);
        assert_eq!(last_message_start(&huge, 64, 0), Some(0));
    }

    #[test]
    fn client_caps_parsing() {
        assert!(ClientCaps::parse(b"").is_ok());
        assert!(ClientCaps::parse(b"{}").is_ok());
        let qemu = br#"{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#;
        assert_eq!(ClientCaps::parse(qemu).unwrap().max_data_xfer_size, 1 << 20);
        let ch = br#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#;
        assert!(ClientCaps::parse(ch).is_ok());
        for bad in [
            &b"{"[..],
            b"[]",
            br#"{"capabilities":3}"#,
            br#"{"capabilities":{"max_msg_fds":"x"}}"#,
            br#"{"capabilities":{"max_msg_fds":0}}"#,
            br#"{"capabilities":{"max_data_xfer_size":-1}}"#,
            br#"{"capabilities":{"migration":{"pgsize":65536}}}"#,
            br#"{"capabilities":{"pgsizes":8192}}"#,
            br#"{"capabilities":{"write_multiple":1}}"#,
        ] {
            assert!(
                ClientCaps::parse(bad).is_err(),
                "{:?}",
                std::str::from_utf8(bad)
            );
        }
    }
}
