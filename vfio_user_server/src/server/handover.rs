//! Handing a live server to another process, so that a daemon can be
//! upgraded or restarted under a client that never reconnects.
//!
//! Everything the server serves is a file descriptor or plain state: the
//! listening socket, the client's socket, every fd-backed DMA map, every
//! interrupt eventfd. [`Server::export_handover`] pauses the device (its
//! in-flight requests complete, as for a snapshot), sends whatever replies
//! are queued, and describes the rest as a [`HandoverState`] (serde, JSON
//! on the wire) plus an ordered list of duplicated fds that the state
//! refers to by index. [`Server::import_handover`], in the other process,
//! maps the same guest memory again, installs the same eventfds, restores
//! the device from the snapshot and goes on with the same connection,
//! including a message the client had only partly sent.
//!
//! Until the other process has taken over, the exporting server can go on
//! as if nothing happened ([`Server::abort_handover`]); once it has, the
//! exporting server must never touch the client again
//! ([`Server::finish_handover`]).
//!
//! [`send_frame`] and [`recv_frame`] carry a body and any number of fds over
//! a UNIX stream socket, in chunks of fds that fit one `SCM_RIGHTS`
//! message.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use log::info;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::connection::Connection;
use super::served_device::ServedDevice;
use super::socket_file::SocketFile;
use super::{MigState, Phase, Server, ServerConfig};
use crate::device::{Device, DeviceContext};
use crate::irq::IrqFds;
use crate::message_dma::MessageDmaLayout;
use crate::socket::{recv_with_fds, send_with_fds, MAX_RECV_FDS};
use crate::vm_migration::{MigratableError, Snapshot};
use crate::wire::{IrqSet, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD};

/// Version of [`HandoverState`]. A process refuses a state of any other
/// version: the exporting process then goes on serving.
pub const HANDOVER_FORMAT: u32 = 1;

/// Most fds one frame carries ([`send_frame`]).
pub const MAX_FRAME_FDS: usize = 4096;

/// Errors of a hand-over.
#[derive(Debug, Error)]
pub enum HandoverError {
    /// The server cannot be handed over now.
    #[error("cannot hand over now: {0}")]
    Busy(String),
    /// The state is of a format this server does not read.
    #[error("hand-over state format {got} is not supported (this binary reads format {want})")]
    Format {
        /// The state's format.
        got: u32,
        /// The format this binary reads.
        want: u32,
    },
    /// The state is for another kind of device.
    #[error("the hand-over state is for a {got} device, not {want}")]
    Kind {
        /// The state's device kind.
        got: String,
        /// This server's device kind.
        want: String,
    },
    /// The state or its fds do not describe a server this one can be.
    #[error("bad hand-over state: {0}")]
    Invalid(String),
    /// The device refused to pause, snapshot or restore.
    #[error(transparent)]
    Device(#[from] MigratableError),
    /// A system call failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One DMA map, as the client made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaMapState {
    /// Guest address.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
    /// `DMA_MAP_FLAG_*`.
    pub flags: u32,
    /// Offset in the fd.
    pub offset: u64,
    /// The fd (an index into the hand-over's fds); none for a map the
    /// client made without one.
    pub fd: Option<usize>,
}

/// An interrupt eventfd the client installed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqFdState {
    /// IRQ index.
    pub index: u32,
    /// Vector (0 for the unmask eventfd).
    pub vector: u32,
    /// The eventfd (an index into the hand-over's fds).
    pub fd: usize,
}

/// fds received with a message that is not complete yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxFdsState {
    /// Offset of the message in the received bytes.
    pub offset: usize,
    /// The fds (indices into the hand-over's fds).
    pub fds: Vec<usize>,
    /// Some fds that came with the message were lost.
    pub truncated: bool,
}

/// The client connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionState {
    /// The client's socket (an index into the hand-over's fds).
    pub fd: usize,
    /// VERSION was answered.
    pub negotiated: bool,
    /// The client's `max_data_xfer_size`.
    pub client_max_xfer: u32,
    /// Layout of our DMA_READ/DMA_WRITE for this client.
    pub dma_layout: MessageDmaLayout,
    /// Id of our next server-to-client command.
    pub next_msg_id: u16,
    /// Bytes received and not handled yet (the start of a message the
    /// client has not finished sending), in hex.
    pub rx: String,
    /// The fds that came with those bytes.
    pub rx_fds: Vec<RxFdsState>,
    /// Bytes of an oversized message still to be skipped, if any.
    pub discard: Option<usize>,
}

/// Everything a server hands over besides its fds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HandoverState {
    /// [`HANDOVER_FORMAT`] of the process that made it.
    pub format: u32,
    /// The device's kind ([`crate::vm_migration::Snapshottable::id`]).
    pub kind: String,
    /// The listening socket (an index into the hand-over's fds).
    pub listener: usize,
    /// The device's snapshot, with the interrupt mask and pending bits.
    pub device: Snapshot,
    /// The control socket held the device paused before the hand-over.
    pub held: bool,
    /// The device was restored from a snapshot and waits for the client's
    /// interrupt eventfds to pick up its rings.
    pub resume_on_irqs: bool,
    /// The DMA maps, in address order.
    pub dma: Vec<DmaMapState>,
    /// The interrupt eventfds.
    pub irqs: Vec<IrqFdState>,
    /// The interrupt unmask eventfd.
    pub unmask: Option<IrqFdState>,
    /// The client connection, if a client is attached.
    pub connection: Option<ConnectionState>,
}

/// A server as another process takes it over: the state, and the fds it
/// refers to by index (duplicates, owned by this value).
#[derive(Debug)]
pub struct Handover {
    /// What to restore.
    pub state: HandoverState,
    /// The fds, in the order the state's indices give.
    pub fds: Vec<OwnedFd>,
}

/// The fds of a received hand-over, each taken once.
pub(super) struct FdTable(Vec<Option<OwnedFd>>);

impl FdTable {
    fn new(fds: Vec<OwnedFd>) -> FdTable {
        FdTable(fds.into_iter().map(Some).collect())
    }

    /// The fd at index `i`; every index may be used once.
    pub(super) fn take(&mut self, i: usize) -> Result<OwnedFd, HandoverError> {
        self.0
            .get_mut(i)
            .and_then(Option::take)
            .ok_or_else(|| HandoverError::Invalid(format!("fd {i} is missing or used twice")))
    }
}

/// Lower-case hex of `bytes`.
pub(super) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The bytes of hex text, if it is hex.
pub(super) fn from_hex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let t = text.as_bytes();
    if !t.len().is_multiple_of(2) {
        return None;
    }
    t.chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// An eventfd as a plain owned fd.
fn eventfd_into_owned(fd: EventFd) -> OwnedFd {
    // SAFETY: `into_raw_fd` hands over the one owner of an open fd.
    unsafe { OwnedFd::from_raw_fd(fd.into_raw_fd()) }
}

/// A received fd as an eventfd (the client installed it as one).
fn owned_into_eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: `into_raw_fd` hands over the one owner of an open fd.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

/// Whether `fd` is a listening socket.
fn is_listening_socket(fd: RawFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writing, sized as declared.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && v != 0
}

impl Server {
    /// Pauses the device (requests in flight complete, as for a snapshot),
    /// sends the replies queued for the client (waiting up to
    /// `flush_timeout` for it to take them), and describes the server for
    /// another process. Nothing is read from the client from then on;
    /// what it sends waits in its socket for the next process. Refused
    /// while a migration is under way or our message-DMA commands await
    /// replies, and after a hand-over began.
    ///
    /// Follow with [`Server::finish_handover`] once the other process
    /// has taken over, or [`Server::abort_handover`] to go on serving.
    pub fn export_handover(&mut self, flush_timeout: Duration) -> Result<Handover, HandoverError> {
        if !matches!(self.phase, Phase::Serving) {
            return Err(HandoverError::Busy(
                "a hand-over is already under way".into(),
            ));
        }
        if self.served.mig.state() != MigState::Running || self.served.mig.dirty_logging() {
            return Err(HandoverError::Busy("a migration is under way".into()));
        }
        let we_paused = !self.served.paused;
        self.served.pause()?;
        self.phase = Phase::Exported { we_paused };
        match self.export_paused(flush_timeout) {
            Ok(h) => Ok(h),
            Err(e) => {
                self.abort_handover();
                Err(e)
            }
        }
    }

    fn export_paused(&mut self, flush_timeout: Duration) -> Result<Handover, HandoverError> {
        let mut fds: Vec<OwnedFd> = Vec::new();
        fds.push(self.socket.listener().as_fd().try_clone_to_owned()?);
        let connection = match self.conn.as_mut() {
            None => None,
            Some(conn) => {
                conn.flush_within(flush_timeout).map_err(|e| {
                    HandoverError::Busy(format!("the client does not take its replies ({e})"))
                })?;
                if !conn.session.pending.is_empty() {
                    return Err(HandoverError::Busy(
                        "message-DMA requests await the client's replies".into(),
                    ));
                }
                Some(conn.export(&mut fds)?)
            }
        };
        let device = self.served.snapshot()?;
        let mut dma = Vec::new();
        for r in self.served.dma.ranges() {
            let fd = match self.served.dma.file(r.address) {
                None => None,
                Some(f) => {
                    fds.push(f?);
                    Some(fds.len() - 1)
                }
            };
            dma.push(DmaMapState {
                address: r.address,
                size: r.size,
                flags: r.flags,
                offset: r.offset,
                fd,
            });
        }
        let IrqFds { vectors, unmask } = self.served.irqs.export_fds()?;
        let mut slot = |fd: EventFd| {
            fds.push(eventfd_into_owned(fd));
            fds.len() - 1
        };
        let irqs = vectors
            .into_iter()
            .map(|(index, vector, fd)| IrqFdState {
                index,
                vector,
                fd: slot(fd),
            })
            .collect();
        let unmask = unmask.map(|(index, fd)| IrqFdState {
            index,
            vector: 0,
            fd: slot(fd),
        });
        let we_paused = matches!(self.phase, Phase::Exported { we_paused: true });
        Ok(Handover {
            state: HandoverState {
                format: HANDOVER_FORMAT,
                kind: self.served.device_id(),
                listener: 0,
                device,
                held: !we_paused,
                resume_on_irqs: self.served.resume_on_irqs,
                dma,
                irqs,
                unmask,
                connection,
            },
            fds,
        })
    }

    /// The other process did not take over: the server goes on as before
    /// [`Server::export_handover`] (the device runs again unless the
    /// control socket held it paused).
    pub fn abort_handover(&mut self) {
        if let Phase::Exported { we_paused } = self.phase {
            self.phase = Phase::Serving;
            if we_paused {
                if let Err(e) = self.served.resume() {
                    log::warn!("cannot resume after a failed hand-over: {e}");
                }
            }
        }
    }

    /// The other process serves the client now: this server lets go of
    /// the connection and the interrupt eventfds, never reads, writes or
    /// signals anything of the client's again, accepts nobody, and leaves
    /// the socket file in place when dropped.
    pub fn finish_handover(&mut self) {
        self.phase = Phase::HandedOver;
        self.conn = None;
        self.served.irqs.clear();
        self.socket.disown();
        info!("handed over {:?} to another process", self.path());
    }

    /// Whether [`Server::finish_handover`] was called.
    pub fn handed_over(&self) -> bool {
        matches!(self.phase, Phase::HandedOver)
    }

    /// Builds the server another process described with
    /// [`Server::export_handover`]: `device` (built with `ctx` from the
    /// same options and the same back-end fds) gets the same guest memory,
    /// interrupt eventfds and state, and goes on with the same client. The
    /// state's format and device kind are checked first. Nothing is read
    /// from the client until the event loop serves the server, and the
    /// device stays paused; once the other process has let go, call
    /// [`Server::start_handed_over`] and [`Server::claim_socket_path`].
    pub fn import_handover(
        handover: Handover,
        device: Box<dyn Device>,
        ctx: DeviceContext,
        config: ServerConfig,
    ) -> Result<Server, HandoverError> {
        let Handover { state, fds } = handover;
        if state.format != HANDOVER_FORMAT {
            return Err(HandoverError::Format {
                got: state.format,
                want: HANDOVER_FORMAT,
            });
        }
        let mut fds = FdTable::new(fds);
        let listener = fds.take(state.listener)?;
        if !is_listening_socket(listener.as_raw_fd()) {
            return Err(HandoverError::Invalid(
                "the listener is not a listening socket".into(),
            ));
        }
        let socket = SocketFile::from_listener(UnixListener::from(listener))
            .map_err(|e| HandoverError::Invalid(e.to_string()))?;
        let max_msg_size = config.max_msg_size();
        let max_queued = config.max_queued_reply_bytes;
        let mut served = ServedDevice::new(device, ctx, config);
        if served.device_id() != state.kind {
            return Err(HandoverError::Kind {
                got: state.kind,
                want: served.device_id(),
            });
        }
        import_memory(&mut served, &state.dma, &mut fds)?;
        import_irqs(&mut served, &state, &mut fds)?;
        served.restore_handed_over(&state.device, state.held)?;
        served.resume_on_irqs = state.resume_on_irqs;
        let conn = state
            .connection
            .as_ref()
            .map(|c| Connection::import(c, &mut fds, max_msg_size, max_queued))
            .transpose()?;
        Ok(Server {
            socket,
            attached: u64::from(conn.is_some()),
            conn,
            served,
            phase: Phase::Serving,
        })
    }

    /// The listening socket handed over is bound at `path`: the file goes
    /// away with this server from now on.
    pub fn claim_socket_path(&mut self, path: &std::path::Path) {
        self.socket.claim(path);
    }

    /// The other process let go: the device imported by
    /// [`Server::import_handover`], paused until now, goes on (unless the
    /// control socket held it paused there).
    pub fn start_handed_over(&mut self) -> Result<(), MigratableError> {
        self.served.start_handed_over()
    }
}

/// Maps the guest memory of a hand-over again.
fn import_memory(
    served: &mut ServedDevice,
    dma: &[DmaMapState],
    fds: &mut FdTable,
) -> Result<(), HandoverError> {
    for m in dma {
        let file = m.fd.map(|i| fds.take(i)).transpose()?.map(File::from);
        let dup = if served.device.observes_raw_requests() {
            file.as_ref().and_then(|f| f.try_clone().ok())
        } else {
            None
        };
        served
            .dma
            .map(m.flags, m.offset, m.address, m.size, file)
            .map_err(|e| {
                HandoverError::Invalid(format!("DMA map {:#x}+{:#x}: {e}", m.address, m.size))
            })?;
        if served.device.observes_raw_requests() {
            served
                .device
                .dma_mapped(m.flags, m.offset, m.address, m.size, dup)
                .map_err(|e| {
                    HandoverError::Invalid(format!("DMA map {:#x}+{:#x}: {e}", m.address, m.size))
                })?;
        }
    }
    Ok(())
}

/// Installs the interrupt eventfds of a hand-over again.
fn import_irqs(
    served: &mut ServedDevice,
    state: &HandoverState,
    fds: &mut FdTable,
) -> Result<(), HandoverError> {
    let mut vectors = Vec::with_capacity(state.irqs.len());
    for i in &state.irqs {
        vectors.push((i.index, i.vector, owned_into_eventfd(fds.take(i.fd)?)));
    }
    let unmask = match &state.unmask {
        Some(u) => Some((u.index, owned_into_eventfd(fds.take(u.fd)?))),
        None => None,
    };
    if served.device.observes_raw_requests() {
        for (index, vector, fd) in &vectors {
            let set = IrqSet {
                argsz: IrqSet::SIZE as u32,
                flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                index: *index,
                start: *vector,
                count: 1,
            };
            let dup = fd
                .try_clone()
                .map(|e| vec![File::from(eventfd_into_owned(e))])
                .unwrap_or_default();
            served
                .device
                .irqs_set(&set, dup)
                .map_err(|e| HandoverError::Invalid(format!("interrupt {index}/{vector}: {e}")))?;
        }
    }
    served
        .irqs
        .import_fds(IrqFds { vectors, unmask })
        .map_err(|e| HandoverError::Invalid(format!("interrupts: {e}")))
}

/// Waits until `sock` is ready for `events`, at most until `deadline`.
fn wait_ready(sock: &UnixStream, events: libc::c_short, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Sends all of `data`, with `fds` on its first byte.
fn send_all(
    sock: &UnixStream,
    mut data: &[u8],
    mut fds: &[RawFd],
    deadline: Instant,
) -> io::Result<()> {
    while !data.is_empty() {
        match send_with_fds(sock.as_raw_fd(), &[data], fds) {
            Ok(n) => {
                data = data.get(n..).unwrap_or_default();
                fds = &[];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_ready(sock, libc::POLLOUT, deadline)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fills `buf`, adding the fds that come with it to `fds`, or failing if
/// fds come where none may (`fds` is `None`).
fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    mut fds: Option<&mut Vec<OwnedFd>>,
    deadline: Instant,
) -> io::Result<()> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut filled = 0;
    while filled < buf.len() {
        let r = match recv_with_fds(sock.as_raw_fd(), &mut buf[filled..]) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_ready(sock, libc::POLLIN, deadline)?;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if r.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if r.truncated {
            return Err(bad("fds were lost"));
        }
        if !r.fds.is_empty() {
            match fds.as_deref_mut() {
                Some(v) => v.extend(r.fds.into_iter().map(OwnedFd::from)),
                None => return Err(bad("fds where none belong")),
            }
        }
        filled += r.bytes;
    }
    Ok(())
}

const FRAME_MAGIC: &[u8; 4] = b"VFUH";
const FRAME_HEADER: usize = 16;

/// Sends `body` and `fds` over `sock` as one frame: a 16-byte header
/// (magic `VFUH`, fd count as u32 and body length as u64, little-endian),
/// one byte per chunk of at most [`MAX_RECV_FDS`] fds with the chunk
/// attached (`SCM_RIGHTS`), then the body. Fails with `TimedOut` at
/// `deadline`.
pub fn send_frame(
    sock: &UnixStream,
    body: &[u8],
    fds: &[OwnedFd],
    deadline: Instant,
) -> io::Result<()> {
    if fds.len() > MAX_FRAME_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} fds, at most {MAX_FRAME_FDS}", fds.len()),
        ));
    }
    let mut head = [0u8; FRAME_HEADER];
    head[..4].copy_from_slice(FRAME_MAGIC);
    head[4..8].copy_from_slice(&(fds.len() as u32).to_le_bytes());
    head[8..].copy_from_slice(&(body.len() as u64).to_le_bytes());
    send_all(sock, &head, &[], deadline)?;
    for chunk in fds.chunks(MAX_RECV_FDS) {
        let raw: Vec<RawFd> = chunk.iter().map(AsRawFd::as_raw_fd).collect();
        send_all(sock, b"F", &raw, deadline)?;
    }
    send_all(sock, body, &[], deadline)
}

/// Receives a frame sent by [`send_frame`]: its body (at most `max_body`
/// bytes) and its fds (close-on-exec). Fails with `TimedOut` at
/// `deadline`, `UnexpectedEof` if the peer closed, `InvalidData` on
/// anything malformed.
pub fn recv_frame(
    sock: &UnixStream,
    max_body: usize,
    deadline: Instant,
) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut head = [0u8; FRAME_HEADER];
    recv_exact(sock, &mut head, None, deadline)?;
    if &head[..4] != FRAME_MAGIC {
        return Err(bad("not a hand-over frame".into()));
    }
    let mut n = [0u8; 4];
    n.copy_from_slice(&head[4..8]);
    let count = u32::from_le_bytes(n) as usize;
    let mut l = [0u8; 8];
    l.copy_from_slice(&head[8..]);
    let len = u64::from_le_bytes(l);
    if count > MAX_FRAME_FDS {
        return Err(bad(format!("{count} fds, at most {MAX_FRAME_FDS}")));
    }
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= max_body)
        .ok_or_else(|| bad(format!("a body of {len} bytes, at most {max_body}")))?;
    let mut fds = Vec::with_capacity(count);
    while fds.len() < count {
        let before = fds.len();
        let mut marker = [0u8; 1];
        recv_exact(sock, &mut marker, Some(&mut fds), deadline)?;
        if marker != *b"F" || fds.len() == before || fds.len() > count {
            return Err(bad("malformed fd chunk".into()));
        }
    }
    let mut body = vec![0u8; len];
    recv_exact(sock, &mut body, None, deadline)?;
    Ok((body, fds))
}

/// The process id of the peer of `sock` (`SO_PEERCRED`): a hand-over
/// socket accepts only the process it expects.
pub fn peer_pid(sock: &UnixStream) -> io::Result<i32> {
    // SAFETY: `ucred` is plain data; all-zero is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writing, sized as declared.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid)
}

#[cfg(test)]
mod tests;
