//! The control socket (`--api-socket`): one JSON request per connection,
//! one JSON reply line. Commands: `pause`, `resume` (also of a device
//! stopped on a storage error, which retries what failed), `snapshot`
//! (with a `path`), `status` (with `stopped_on_error` and the `stop_error`),
//! `upgrade` (answered once a new process took over, or failed to: see
//! [`crate::upgrade`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use serde_json::{json, Value};
use vfio_user_server::event_loop::EventHandler;
use vfio_user_server::vm_migration::{Pausable, Snapshottable, Transportable};
use vfio_user_server::Server;

use crate::upgrade::Upgrader;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// The listening control socket.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    /// The device, for `status`.
    description: String,
    upgrader: Option<Arc<Upgrader>>,
}

impl ApiServer {
    /// Listens on `path` (which must not exist), owner-only; the socket
    /// appears there once it takes connections.
    pub fn bind(path: &Path) -> Result<ApiServer, String> {
        if path.symlink_metadata().is_ok() {
            return Err(format!("api socket path {} already exists", path.display()));
        }
        let listener = vfio_user_server::server::listen_at(path, 0o600)
            .map_err(|e| format!("api socket: {e}"))?;
        Self::from_listener(listener, path)
    }

    /// Serves on `listener`, bound at `path` (handed over by the daemon
    /// this one replaces); the file goes away with it.
    pub fn from_listener(listener: UnixListener, path: &Path) -> Result<ApiServer, String> {
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("api socket: {e}"))?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
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

    fn serve(&self, stream: UnixStream, server: &mut Server) -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        let mut line = String::new();
        BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
        let reply = match serde_json::from_str::<Value>(&line) {
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
        self.listener.as_raw_fd()
    }

    fn handle(&mut self, servers: &mut [Server]) {
        // The socket is the new process's to serve once it took over.
        if self.upgrader.as_ref().is_some_and(|u| u.done()) {
            return;
        }
        while let Ok((stream, _)) = self.listener.accept() {
            let Some(server) = servers.first_mut() else {
                return;
            };
            if let Err(e) = self.serve(stream, server) {
                warn!("api request failed: {e}");
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
