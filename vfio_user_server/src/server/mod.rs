//! One device on one listening socket.
//!
//! The server is driven by [`crate::event_loop::EventLoop`] and never
//! blocks. Its jobs, one module each:
//! - `socket_file`: the listening socket and its file;
//! - `connection`: the client's byte stream (framing, fds, the reply
//!   queue);
//! - `commands` and `version`: the client's commands, validated and
//!   dispatched to the device (`served_device` holds the device and what
//!   the server keeps for it);
//! - `message_dma_pump`: our DMA_READ/DMA_WRITE commands;
//! - `migration` and `saved_state`: migration v2 and the device state
//!   it moves; pause, resume, snapshot and restore are Cloud Hypervisor's
//!   traits, implemented here for the whole served device;
//! - `handover`: the whole server, fds included, handed to another
//!   process under a client that stays connected.

mod commands;
mod config;
mod connection;
pub mod handover;
mod message_dma_pump;
mod migration;
mod saved_state;
mod served_device;
mod socket_file;
mod version;

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use log::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use self::connection::Connection;
use self::served_device::ServedDevice;
use self::socket_file::SocketFile;
use crate::device::{Device, DeviceContext, Interest, WatchedFd};
use crate::state_stream::{decode_stream, encode_stream};
use crate::vm_migration::{
    Migratable, MigratableError, Pausable, Snapshot, Snapshottable, Transportable,
};

pub use self::config::{ServerConfig, DEFAULT_HANDSHAKE_TIMEOUT};
pub use self::handover::{Handover, HandoverError, HandoverState, HANDOVER_FORMAT};
pub use self::migration::MigState;
pub use self::saved_state::IRQS_SNAPSHOT_ID;
pub use self::socket_file::{listen_at, listen_in_place_of_stale, ServerError};
pub use self::version::{ADVERTISED_MAX_MSG_FDS, OUR_MINOR};

/// One device on one listening socket.
pub struct Server {
    socket: SocketFile,
    conn: Option<Connection>,
    /// How many clients were attached so far: tells a new connection from
    /// an old one that had the same fd number.
    attached: u64,
    served: ServedDevice,
    phase: Phase,
}

/// Where the server is in a hand-over to another process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Serving its client.
    Serving,
    /// Exported, waiting for the other process; whether the export paused
    /// the device (else the control socket held it paused already).
    Exported { we_paused: bool },
    /// The other process serves the client.
    HandedOver,
}

impl Server {
    /// Binds `path` (which must not exist, unless it is a socket nobody
    /// listens on) and serves `device` there. `ctx` must be the context
    /// the device was built with.
    pub fn new(
        path: &Path,
        device: Box<dyn Device>,
        ctx: DeviceContext,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        let socket = SocketFile::bind(path, config.socket_mode)?;
        Ok(Self::with_socket(socket, device, ctx, config))
    }

    /// Serves `device` on an already listening socket.
    pub fn from_listener(
        listener: std::os::unix::net::UnixListener,
        device: Box<dyn Device>,
        ctx: DeviceContext,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        let socket = SocketFile::from_listener(listener)?;
        Ok(Self::with_socket(socket, device, ctx, config))
    }

    fn with_socket(
        socket: SocketFile,
        device: Box<dyn Device>,
        ctx: DeviceContext,
        config: ServerConfig,
    ) -> Server {
        Server {
            socket,
            conn: None,
            attached: 0,
            served: ServedDevice::new(device, ctx, config),
            phase: Phase::Serving,
        }
    }

    /// Whether the device is paused through [`Pausable::pause`].
    pub fn paused(&self) -> bool {
        self.served.paused
    }

    /// Why the device stopped by itself, if it did
    /// ([`crate::device::Lifecycle::stopped_on_error`]); [`Pausable::resume`]
    /// lets it go on.
    pub fn stopped_on_error(&mut self) -> Option<String> {
        self.served.lifecycle().stopped_on_error()
    }

    /// Replaces the device state with `snapshot` (from
    /// [`Snapshottable::snapshot`] of a server of the same kind, or
    /// [`Transportable::recv`]), checking it completely before applying
    /// it, then lets the device run. Only allowed with no client attached.
    pub fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        if self.conn.is_some() {
            return Err(MigratableError::Restore("a client is attached".into()));
        }
        self.served.restore(snapshot)
    }

    /// The migration state of the device.
    pub fn migration_state(&self) -> MigState {
        self.served.mig.state()
    }

    /// The socket path, if bound by [`Server::new`].
    pub fn path(&self) -> Option<&Path> {
        self.socket.path()
    }

    /// The listening socket's fd.
    pub fn listener_fd(&self) -> RawFd {
        self.socket.fd()
    }

    /// The attached client's fd.
    pub fn connection_fd(&self) -> Option<RawFd> {
        self.conn.as_ref().map(Connection::fd)
    }

    /// Which client is attached: its serial number (counting attaches)
    /// and fd. The serial tells a new connection from a closed one that
    /// had the same fd number.
    pub fn connection(&self) -> Option<(u64, RawFd)> {
        self.conn.as_ref().map(|c| (self.attached, c.fd()))
    }

    /// Whether a client is attached.
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The device.
    pub fn device(&mut self) -> &mut dyn Device {
        self.served.device.as_mut()
    }

    /// The device's own fds and what to watch them for.
    pub fn device_watched_fds(&mut self) -> &[WatchedFd] {
        if self.handed_over() || self.served.resume_on_irqs {
            return &[];
        }
        self.served.lifecycle().watched_fds()
    }

    /// The generation of the interrupt unmask eventfd the client installed
    /// (`Irqs::unmask_generation`).
    pub fn irq_unmask_generation(&self) -> u64 {
        self.served.irqs.unmask_generation()
    }

    /// A duplicate of the interrupt unmask eventfd the client installed,
    /// if any, with its generation (`Irqs::unmask_fd`).
    pub fn irq_unmask_fd(&self) -> (u64, Option<io::Result<EventFd>>) {
        self.served.irqs.unmask_fd()
    }

    /// The client signalled its interrupt unmask eventfd (the guest's EOI
    /// of INTx under KVM): unmask, and deliver what is pending.
    pub fn handle_irq_unmask(&mut self) {
        if self.handed_over() {
            return;
        }
        self.served.irq_unmask_signalled();
    }

    /// Drops the client if the device touched guest memory that the client
    /// took away by truncating its file (the device read zeros there: see
    /// [`crate::sigbus`], whose handler must be installed). Cheap when
    /// nothing happened; the event loop calls it after every burst.
    /// Returns whether the client was dropped.
    pub fn check_guest_memory(&mut self) -> bool {
        if !self.served.guest_memory_lost() {
            return false;
        }
        self.disconnect();
        true
    }

    /// A device fd is ready.
    pub fn handle_device_event(&mut self, fd: RawFd, ready: Interest) {
        // Another process owns the device's fds now (a TAP's frames are
        // its to read).
        if self.handed_over() {
            return;
        }
        self.served.lifecycle().handle_event(fd, ready);
        self.send_queued();
    }

    /// Runs the device's deferred work
    /// ([`crate::device::Lifecycle::run_deferred`]) while a client is
    /// attached and the device is not paused (by [`Pausable::pause`], or
    /// by a migration state that stops it); returns whether work is left.
    pub fn run_deferred(&mut self) -> bool {
        if self.conn.is_none()
            || self.served.paused
            || self.served.mig.device_stopped()
            || self.served.resume_on_irqs
        {
            return false;
        }
        let more = self.served.lifecycle().run_deferred();
        self.send_queued() && more
    }

    /// Sends what the device queued (message-DMA requests) and what is
    /// waiting; drops the client if its socket failed. Returns whether the
    /// client is still there.
    fn send_queued(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        message_dma_pump::pump(conn, &mut self.served);
        if conn.flush().is_err() {
            self.disconnect();
            return false;
        }
        true
    }

    /// What to watch on the connection.
    pub fn interest(&self) -> Interest {
        // Nothing is read during a hand-over: it waits for the next process.
        if self.phase != Phase::Serving {
            return Interest::NONE;
        }
        self.conn
            .as_ref()
            .map_or(Interest::NONE, Connection::interest)
    }

    /// Accepts pending connections: the first becomes the client, any
    /// other is closed at once (one client per device). Whether a client
    /// is already there is decided on its socket, not on bookkeeping: one
    /// that hung up (perhaps before it finished VERSION) gives way.
    pub fn accept(&mut self) -> io::Result<bool> {
        if self.handed_over() {
            return Ok(false);
        }
        let mut attached = false;
        loop {
            match self.socket.listener().accept() {
                Ok((stream, _)) => {
                    // The new socket is held open while the old one closes,
                    // so the two never share an fd number in the loop's
                    // epoll set.
                    self.finish_if_hung_up();
                    if self.conn.is_some() {
                        crate::warn_limited!("refusing a second client on {:?}", self.path());
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

    /// If the client hung up, works through what it sent before (its
    /// messages still count, as the device is only reset when it is gone)
    /// and drops it.
    fn finish_if_hung_up(&mut self) {
        // What a client sent is bounded by the socket buffer: a few rounds
        // reach its EOF (or a failed reply) unless it only shut down its
        // sending side and stopped reading; it goes then too.
        const ROUNDS: usize = 16;
        if !self.conn.as_ref().is_some_and(Connection::peer_hung_up) {
            return;
        }
        for _ in 0..ROUNDS {
            if !self.handle_connection_event(true, true) {
                return;
            }
        }
        self.disconnect();
    }

    /// Makes `stream` the client connection (what `accept` does with the
    /// first connection; also used to serve a socketpair directly).
    pub fn attach(&mut self, stream: UnixStream) -> io::Result<()> {
        let config = &self.served.config;
        let conn = Connection::new(stream, config.max_msg_size(), config.max_queued_reply_bytes)?;
        info!("client attached on {:?}", self.path());
        self.conn = Some(conn);
        self.attached += 1;
        Ok(())
    }

    /// When the attached client must have finished VERSION, if it has
    /// not yet (none once it has, or with no deadline configured).
    pub fn handshake_deadline(&self) -> Option<Instant> {
        let timeout = self.served.config.handshake_timeout?;
        self.conn
            .as_ref()
            .filter(|c| !c.session.negotiated)
            .map(|c| c.accepted + timeout)
    }

    /// Drops a client that did not finish VERSION by its deadline (one that
    /// connects and says nothing would otherwise hold the device from every
    /// real VMM). Returns whether it was dropped.
    pub fn expire_handshake(&mut self, now: Instant) -> bool {
        match self.handshake_deadline() {
            Some(deadline) if now >= deadline => {
                warn!(
                    "client on {:?} did not negotiate within {:?}: dropping it",
                    self.path(),
                    self.served.config.handshake_timeout.unwrap_or_default()
                );
                self.disconnect();
                true
            }
            _ => false,
        }
    }

    /// Drops the client: DMA maps and interrupt fds go, the device is
    /// reset, and the next client can attach. A client that never finished
    /// VERSION could change nothing, and the device is left as it is: a
    /// restored device waiting for its VMM outlives a stray connection
    /// (another daemon's check for a stale socket, a health probe).
    pub fn disconnect(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !conn.session.negotiated {
            info!(
                "client left {:?} before negotiating: device untouched",
                self.path()
            );
            return;
        }
        message_dma_pump::fail_all(&mut conn.session, &mut self.served);
        info!("client detached from {:?}", self.path());
        self.served.client_gone();
    }

    /// Whether messages the client sent wait to be handled without its
    /// socket becoming readable: the last turn stopped at its time limit
    /// (or a hand-over brought them). [`Server::handle_connection_event`]
    /// handles them.
    pub fn has_message_backlog(&self) -> bool {
        self.conn.as_ref().is_some_and(Connection::has_backlog)
    }

    /// Handles readable/writable/hang-up events on the connection, and the
    /// messages waiting from its last turn ([`Server::has_message_backlog`]).
    /// Returns false once the client is gone.
    pub fn handle_connection_event(&mut self, readable: bool, writable: bool) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let served = &mut self.served;
        let ok = (!writable || conn.flush().is_ok())
            && (!(readable || conn.has_backlog())
                || conn.read_messages(&mut |session, message| served.dispatch(session, message)));
        // Requests the handlers queued go out only now, after their replies.
        if !ok || !self.send_queued() {
            self.disconnect();
            return false;
        }
        true
    }
}

/// Path of a `file://` URL (or a plain path).
fn url_path(url: &str) -> PathBuf {
    PathBuf::from(url.strip_prefix("file://").unwrap_or(url))
}

/// Pauses the whole served device: in-flight requests complete, then no
/// DMA and no interrupts until [`Pausable::resume`]. Also what the
/// daemon's control socket does.
impl Pausable for Server {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.served.pause()
    }

    /// Also lets a device that stopped by itself on an error go on,
    /// retrying what failed. A device the migration state holds stopped
    /// stays stopped until that state lets it run.
    fn resume(&mut self) -> Result<(), MigratableError> {
        self.served.resume()
    }
}

impl Snapshottable for Server {
    /// The device's id, which names the kind of its state.
    fn id(&self) -> String {
        self.served.device_id()
    }

    /// The device state and its interrupt state; the device must be paused.
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        self.served.snapshot()
    }
}

/// Snapshots travel as the self-describing stream of
/// [`crate::state_stream`], in files named by `file://` URLs.
impl Transportable for Server {
    /// Writes `snapshot` to the file at `destination_url` through a synced
    /// temporary file and a rename, so a crash never leaves a half-written
    /// snapshot under the final name.
    fn send(&self, snapshot: &Snapshot, destination_url: &str) -> Result<(), MigratableError> {
        let fail = |e: io::Error| MigratableError::MigrateSend(format!("{destination_url}: {e}"));
        let bytes = encode_stream(&self.id(), snapshot)?;
        let path = url_path(destination_url);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(&bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &path).map_err(fail)
    }

    /// Reads the snapshot of a device with id `id` from the file at
    /// `source_url` (at most `max_migration_bytes`), refusing a corrupt,
    /// truncated or foreign one.
    fn recv(&self, source_url: &str, id: &str) -> Result<Snapshot, MigratableError> {
        let fail = |e: String| MigratableError::MigrateReceive(format!("{source_url}: {e}"));
        let path = url_path(source_url);
        let limit = self.served.config.max_migration_bytes as u64;
        let f = std::fs::File::open(&path).map_err(|e| fail(e.to_string()))?;
        let mut bytes = Vec::new();
        f.take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| fail(e.to_string()))?;
        if bytes.len() as u64 > limit {
            return Err(fail("too large".into()));
        }
        decode_stream(&bytes, id)
    }
}

impl Migratable for Server {}
