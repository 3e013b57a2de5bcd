//! The control socket (`--api-socket`): one JSON request per connection,
//! one JSON reply line. Commands: `pause`, `resume` (also of a device
//! stopped on a storage error, which retries what failed), `snapshot`
//! (with a `path`), `status` (with `stopped_on_error` and the `stop_error`),
//! `upgrade` (answered once a new process took over, or failed to: see
//! [`crate::upgrade`]).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read as _, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use serde_json::{json, Value};
use vfio_user_server::event_loop::EventHandler;
use vfio_user_server::vm_migration::{Pausable, Snapshottable, Transportable};
use vfio_user_server::Server;

use crate::upgrade::Upgrader;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// Requests waiting for the rest of their line; a new connection beyond
/// this many closes the oldest.
const MAX_WAITING: usize = 8;

/// How long a connection may take to send its request line.
const REQUEST_TIME: Duration = Duration::from_secs(5);

/// A connection whose request line has not all come yet.
struct WaitingRequest {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// What reading a waiting request found.
enum Read {
    /// The whole line, or all the peer sent before it stopped sending.
    Complete,
    /// More to come.
    Waiting,
    /// Too long, nothing sent at all, or the connection failed: dropped.
    Failed,
}

impl WaitingRequest {
    /// Reads what has come, without waiting.
    fn read(&mut self) -> Read {
        let mut chunk = [0u8; 4096];
        loop {
            match (&self.stream).read(&mut chunk) {
                // A peer that only checked the socket listens.
                Ok(0) if self.line.is_empty() => return Read::Failed,
                Ok(0) => return Read::Complete,
                Ok(n) => {
                    self.line.extend_from_slice(&chunk[..n]);
                    if let Some(end) = self.line.iter().position(|&b| b == b'\n') {
                        self.line.truncate(end);
                        return Read::Complete;
                    }
                    if self.line.len() as u64 > MAX_REQUEST {
                        warn!("api request longer than {MAX_REQUEST} bytes: dropped");
                        return Read::Failed;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Read::Waiting,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("api request failed: {e}");
                    return Read::Failed;
                }
            }
        }
    }
}

/// The listening control socket. Requests are read as they come, on the
/// event loop, never waited for: a peer that connects and sends nothing
/// (or a byte at a time) costs the device nothing.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    /// Watches the listener and the waiting connections; the event loop
    /// watches it.
    epoll: OwnedFd,
    waiting: VecDeque<WaitingRequest>,
    /// The device, for `status`.
    description: String,
    upgrader: Option<Arc<Upgrader>>,
}

impl ApiServer {
    /// Listens on `path` (which must not exist, unless it is a stale socket
    /// that a killed daemon left), owner-only; the socket appears there
    /// once it takes connections.
    pub fn bind(path: &Path) -> Result<ApiServer, String> {
        let listener = vfio_user_server::server::listen_in_place_of_stale(path, 0o600)
            .map_err(|e| format!("api socket: {e}"))?;
        Self::from_listener(listener, path)
    }

    /// Serves on `listener`, bound at `path` (handed over by the daemon
    /// this one replaces); the file goes away with it.
    pub fn from_listener(listener: UnixListener, path: &Path) -> Result<ApiServer, String> {
        let fail = |e: std::io::Error| format!("api socket: {e}");
        listener.set_nonblocking(true).map_err(fail)?;
        // SAFETY: epoll_create1 returns a new descriptor, owned here.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll::create(true).map_err(fail)?) };
        watch(&epoll, listener.as_raw_fd()).map_err(fail)?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            epoll,
            waiting: VecDeque::new(),
            description: String::new(),
            upgrader: None,
        })
    }

    /// A duplicate of the listening socket, for an upgrade.
    pub fn listener_fd(&self) -> std::io::Result<OwnedFd> {
        self.listener.as_fd().try_clone_to_owned()
    }

    /// Makes `upgrade` requests go to `upgrader`, and `status` describe
    /// the device as `description`.
    pub fn set_upgrader(&mut self, upgrader: Arc<Upgrader>, description: String) {
        self.upgrader = Some(upgrader);
        self.description = description;
    }

    /// Takes the new connections, oldest waiting ones making room.
    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let watched = stream
                .set_nonblocking(true)
                .and_then(|()| watch(&self.epoll, stream.as_raw_fd()));
            if let Err(e) = watched {
                warn!("api connection: {e}");
                continue;
            }
            if self.waiting.len() == MAX_WAITING {
                // Closing it takes it out of the epoll set.
                self.waiting.pop_front();
            }
            self.waiting.push_back(WaitingRequest {
                stream,
                line: Vec::new(),
                since: Instant::now(),
            });
        }
    }

    fn serve(&self, request: WaitingRequest, server: &mut Server) -> std::io::Result<()> {
        let WaitingRequest { stream, line, .. } = request;
        // Nothing of ours watches it any more, and the reply (a line) fits
        // in the socket's buffer.
        epoll::ctl(
            self.epoll.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_DEL,
            stream.as_raw_fd(),
            epoll::Event::new(epoll::Events::empty(), 0),
        )?;
        stream.set_nonblocking(false)?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        let reply = match serde_json::from_slice::<Value>(&line) {
            Ok(req) if req.get("command").and_then(Value::as_str) == Some("upgrade") => {
                match &self.upgrader {
                    // Answered when the upgrade ends.
                    Some(u) => {
                        u.start(&req, stream);
                        return Ok(());
                    }
                    None => json!({"ok": false, "error": "this daemon cannot be upgraded"}),
                }
            }
            Ok(req) => execute(&req, server, &self.description),
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        let mut out = reply.to_string();
        out.push('\n');
        (&stream).write_all(out.as_bytes())
    }
}

/// Adds `fd` to `epoll`, for reading.
fn watch(epoll: &OwnedFd, fd: RawFd) -> std::io::Result<()> {
    epoll::ctl(
        epoll.as_raw_fd(),
        epoll::ControlOptions::EPOLL_CTL_ADD,
        fd,
        epoll::Event::new(epoll::Events::EPOLLIN, fd as u64),
    )
}

fn execute(req: &Value, server: &mut Server, description: &str) -> Value {
    let fail = |e: String| json!({"ok": false, "error": e});
    match req.get("command").and_then(Value::as_str) {
        Some("pause") => match Pausable::pause(server) {
            Ok(()) => json!({"ok": true}),
            Err(e) => fail(e.to_string()),
        },
        Some("resume") => match Pausable::resume(server) {
            Ok(()) => json!({"ok": true}),
            Err(e) => fail(e.to_string()),
        },
        Some("status") => {
            let stopped_on = server.stopped_on_error();
            json!({
                "ok": true,
                "paused": server.paused(),
                "stopped_on_error": stopped_on.is_some(),
                "stop_error": stopped_on,
                "connected": server.connected(),
                "migration_state": format!("{:?}", server.migration_state()),
                "socket": server.path().map(|p| p.display().to_string()),
                "pid": std::process::id(),
                "device": description,
            })
        }
        Some("snapshot") => {
            let Some(path) = req.get("path").and_then(Value::as_str) else {
                return fail("snapshot needs a \"path\"".into());
            };
            let url = format!("file://{path}");
            match server
                .snapshot()
                .and_then(|snapshot| server.send(&snapshot, &url))
            {
                Ok(()) => {
                    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                    info!("snapshot of {bytes} bytes written to {path}");
                    json!({"ok": true, "bytes": bytes})
                }
                Err(e) => fail(e.to_string()),
            }
        }
        Some(other) => fail(format!("unknown command '{other}'")),
        None => fail("missing \"command\"".into()),
    }
}

impl EventHandler for ApiServer {
    fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn handle(&mut self, servers: &mut [Server]) {
        // The socket is the new process's to serve once it took over.
        if self.upgrader.as_ref().is_some_and(|u| u.done()) {
            return;
        }
        // What is ready is found by trying every waiting connection (a
        // few at most); the epoll set only wakes the loop.
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); MAX_WAITING + 1];
        let _ = epoll::wait(self.epoll.as_raw_fd(), 0, &mut events);
        self.accept();
        let Some(server) = servers.first_mut() else {
            return;
        };
        for mut request in std::mem::take(&mut self.waiting) {
            match request.read() {
                Read::Complete => {
                    if let Err(e) = self.serve(request, server) {
                        warn!("api request failed: {e}");
                    }
                }
                Read::Waiting if request.since.elapsed() < REQUEST_TIME => {
                    self.waiting.push_back(request)
                }
                Read::Waiting => warn!("api request not sent within {REQUEST_TIME:?}: dropped"),
                Read::Failed => {}
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // After an upgrade the file is the new process's.
        if !self.upgrader.as_ref().is_some_and(|u| u.done()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Client side: sends `request` to the API socket and returns the reply,
/// waiting for it up to `timeout`.
pub fn call(path: &Path, request: &Value, timeout: Duration) -> Result<Value, String> {
    let stream = UnixStream::connect(path)
        .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut line = request.to_string();
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .map_err(|e| format!("cannot send request: {e}"))?;
    let mut reply = String::new();
    BufReader::new((&stream).take(MAX_REQUEST))
        .read_line(&mut reply)
        .map_err(|e| format!("no reply: {e}"))?;
    serde_json::from_str(&reply).map_err(|e| format!("bad reply: {e}"))
}
