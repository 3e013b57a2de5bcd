//! `api ... upgrade`: the running daemon hands its device, its client and
//! its sockets to a new process, under a VMM that never notices.
//!
//! The old process (the one serving):
//! 1. checks the new command line (only options that do not change what
//!    is served may differ), makes a private directory (0700) with a
//!    hand-over socket (0600), and starts the new binary with the new
//!    command line and `--handover-socket PATH`;
//! 2. keeps serving while a thread waits, up to the timeout, for that
//!    process (and no other: its pid is checked) to connect and say hello;
//! 3. on the event loop: pauses the device (requests in flight complete),
//!    and sends the state with every fd: the listening socket, the client
//!    socket, the DMA maps, the interrupt eventfds, the device's own fds
//!    (images, TAP queues), the control socket ([`crate::upgrade`] frames,
//!    `SCM_RIGHTS` in chunks);
//! 4. waits (at most [`PAUSE_LIMIT`]) for the new process to say it is
//!    ready, tells it to go, lets go of everything without closing or
//!    removing anything, tells the service manager the new main pid,
//!    answers the `api` client and exits 0.
//!
//! Anything that fails before the new process is told to go (it does not
//! start, exits, hangs, refuses the state) kills it, and the old process
//! resumes as if nothing happened; `api` prints why. The new process
//! ([`receive`]) touches nothing of the client's before it is told to go.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vfio_user_server::event_loop::EventHandler;
use vfio_user_server::server::handover::{peer_pid, recv_frame, send_frame};
use vfio_user_server::{Handover, HandoverError, HandoverState, Server, ServerConfig, StopHandle};
use vmm_sys_util::eventfd::EventFd;

use crate::cli::{self, Command as CliCommand, HANDOVER_OPTION};
use crate::devices::{Built, DeviceFds, DeviceKind};
use crate::notify::notify_or_warn;

/// How long the device may stay paused: from the pause until the new
/// process says it has taken over. Past it the old process resumes.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(3);
/// How long the client has to take the replies already queued for it
/// before the device state is taken.
const FLUSH_LIMIT: Duration = Duration::from_millis(500);
/// Largest hand-over message accepted (a device state, a message being
/// received and those waiting for their turn, hex-encoded).
const MAX_STATE_BYTES: usize = 300 << 20;
/// Largest hello, ready or go message.
const MAX_SMALL_BYTES: usize = 64 << 10;
/// How long the new process waits for the state, and then to be told to
/// go; the old process's own limits are shorter.
const NEW_SIDE_LIMIT: Duration = Duration::from_secs(60);
/// For tests only: the old process writes this format number into the
/// state instead of its own, so that the new process refuses it.
pub const TEST_FORMAT_ENV: &str = "VFIO_USER_DEVICE_TEST_HANDOVER_FORMAT";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the old process sends with its fds: the server's state (its fds
/// come first), then what the device's own fds are, then whether the
/// control socket follows.
#[derive(Serialize, Deserialize)]
struct StateMessage {
    /// The server; its fds are the first `server_fds`.
    state: HandoverState,
    server_fds: usize,
    /// The device's own fds: what they are, and how many follow.
    device_layout: Value,
    device_fds: usize,
    /// The control socket's listener is the last fd.
    api_socket: bool,
    /// The old process.
    from_pid: u32,
}

/// What the new process says when it connects.
#[derive(Serialize, Deserialize)]
struct Hello {
    pid: u32,
    version: String,
}

/// The private directory of one hand-over, and the socket in it; both
/// removed on drop.
struct HandoverDir {
    dir: PathBuf,
    socket: PathBuf,
}

impl HandoverDir {
    /// A fresh directory only we can enter (mkdtemp makes it 0700), with
    /// a listening socket only we can use (0600).
    fn new() -> Result<(HandoverDir, UnixListener), String> {
        use std::os::unix::ffi::OsStringExt;
        let mut template = std::env::temp_dir()
            .join("vfio-user-upgrade.XXXXXX")
            .into_os_string()
            .into_vec();
        template.push(0);
        // SAFETY: a writable NUL-terminated template, as mkdtemp wants.
        let p = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(format!(
                "cannot make a private directory in {}: {}",
                std::env::temp_dir().display(),
                std::io::Error::last_os_error()
            ));
        }
        template.pop();
        let dir = PathBuf::from(OsString::from_vec(template));
        let d = HandoverDir {
            socket: dir.join("handover.sock"),
            dir,
        };
        let listener = UnixListener::bind(&d.socket)
            .map_err(|e| format!("cannot listen on {}: {e}", d.socket.display()))?;
        std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot set permissions of {}: {e}", d.socket.display()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("hand-over socket: {e}"))?;
        Ok((d, listener))
    }
}

impl Drop for HandoverDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The binary an upgrade starts by default: the file at the path this one
/// was started from (after a package upgrade replaced it, the new
/// version), else this very binary.
fn default_exe() -> PathBuf {
    if let Ok(p) = std::fs::read_link("/proc/self/exe") {
        let text = p.to_string_lossy();
        let path = PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text));
        if path.is_file() {
            return path;
        }
    }
    PathBuf::from("/proc/self/exe")
}

/// Kills and reaps a new process that did not take over.
fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// How the wait for the new process ended.
enum Waited {
    /// It connected and said hello.
    Connected {
        sock: UnixStream,
        child: Child,
        hello: Hello,
    },
    /// It did not.
    Failed { child: Child, error: String },
}

/// Where the thread that waits for the new process leaves the outcome.
type WaitSlot = Arc<Mutex<Option<Waited>>>;

/// An upgrade under way.
struct Pending {
    /// The `api` client, answered at the end.
    reply_to: UnixStream,
    /// Removed when the upgrade ends.
    _dir: HandoverDir,
    started: Instant,
    /// Set by the thread that waits for the new process.
    waited: WaitSlot,
}

/// What the daemon keeps for upgrades: its command line and kind, its
/// device's fds and control socket, and the upgrade under way.
pub struct Upgrader {
    /// The successor's command line unless the request gives one.
    argv: Vec<OsString>,
    kind: DeviceKind,
    device_fds: DeviceFds,
    api_fd: Option<OwnedFd>,
    stop: StopHandle,
    wake: EventFd,
    pending: Mutex<Option<Pending>>,
    done: AtomicBool,
}

impl Upgrader {
    /// The daemon started with `argv` (after the program name) serving
    /// `kind`, whose device's own fds are `device_fds`, with the control
    /// socket `api_fd` if any; `stop` ends its event loop.
    pub fn new(
        argv: &[OsString],
        kind: DeviceKind,
        device_fds: DeviceFds,
        api_fd: Option<OwnedFd>,
        stop: StopHandle,
    ) -> std::io::Result<Upgrader> {
        Ok(Upgrader {
            argv: cli::successor_args(argv),
            kind,
            device_fds,
            api_fd,
            stop,
            wake: vfio_user_server::event_loop::new_eventfd()?,
            pending: Mutex::new(None),
            done: AtomicBool::new(false),
        })
    }

    /// Whether another process serves everything now: this one must not
    /// touch the client or the sockets again, and exits.
    pub fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Starts the upgrade `req` asks for (`exec`, `args`, `timeout_ms`);
    /// `reply_to` gets the answer, now if it is refused, else when the
    /// upgrade ends.
    pub fn start(&self, req: &Value, reply_to: UnixStream) {
        match self.try_start(req) {
            Ok((dir, waited)) => {
                *lock(&self.pending) = Some(Pending {
                    reply_to,
                    _dir: dir,
                    started: Instant::now(),
                    waited,
                });
            }
            Err(e) => {
                warn!("upgrade refused: {e}");
                reply(&reply_to, &json!({"ok": false, "error": e}));
            }
        }
    }

    /// Checks the request, starts the new process and the thread that
    /// waits for it.
    fn try_start(&self, req: &Value) -> Result<(HandoverDir, WaitSlot), String> {
        if self.done() || lock(&self.pending).is_some() {
            return Err("an upgrade is already under way".into());
        }
        let args: Vec<OsString> = match req.get("args").and_then(Value::as_array) {
            Some(a) if !a.is_empty() => {
                let words: Option<Vec<OsString>> =
                    a.iter().map(|w| w.as_str().map(OsString::from)).collect();
                cli::successor_args(&words.ok_or("\"args\" must be strings")?)
            }
            _ => self.argv.clone(),
        };
        let new_kind = match cli::parse(args.iter().cloned()) {
            Ok(cli::Cli {
                command: CliCommand::Device(kind),
            }) => kind,
            Ok(_) => {
                return Err("the new command line must be a device kind and its options".into())
            }
            Err(e) => return Err(format!("the new command line is wrong: {e}")),
        };
        let refused = self.kind.upgrade_refusals(&new_kind);
        if !refused.is_empty() {
            return Err(format!(
                "an upgrade cannot change {} (start a new daemon for that)",
                refused.join(", ")
            ));
        }
        let exe = match req.get("exec").and_then(Value::as_str) {
            Some(p) => PathBuf::from(p),
            None => default_exe(),
        };
        let timeout = req
            .get("timeout_ms")
            .and_then(Value::as_u64)
            .map_or(Duration::from_secs(10), Duration::from_millis);
        let (dir, listener) = HandoverDir::new()?;
        let child = Command::new(&exe)
            .args(&args)
            .arg(HANDOVER_OPTION)
            .arg(&dir.socket)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        info!(
            "upgrade: started {} as pid {}; waiting up to {timeout:?} for it on {}",
            exe.display(),
            child.id(),
            dir.socket.display()
        );
        let waited = Arc::new(Mutex::new(None));
        let slot = waited.clone();
        let wake = self.wake.try_clone().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        std::thread::Builder::new()
            .name("upgrade-wait".into())
            .spawn(move || {
                let w = wait_for_child(&listener, child, deadline, timeout);
                *lock(&slot) = Some(w);
                let _ = wake.write(1);
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok((dir, waited))
    }

    /// The wait for the new process ended (the wake fd fired): hands over,
    /// or rolls back. Runs on the event loop, so nothing else touches the
    /// client meanwhile.
    fn finish(&self, servers: &mut [Server]) {
        let _ = self.wake.read();
        let mut guard = lock(&self.pending);
        let ready = guard.as_ref().is_some_and(|p| lock(&p.waited).is_some());
        if !ready {
            return;
        }
        let Some(pending) = guard.take() else {
            return;
        };
        drop(guard);
        let Some(waited) = lock(&pending.waited).take() else {
            return;
        };
        let outcome = match (waited, servers.first_mut()) {
            (Waited::Failed { child, error }, _) => {
                kill(child);
                Err(error)
            }
            (Waited::Connected { child, .. }, None) => {
                kill(child);
                Err("no device to hand over".into())
            }
            (Waited::Connected { sock, child, hello }, Some(server)) => {
                self.hand_over(server, &sock, child, &hello)
            }
        };
        let answer = match outcome {
            Ok(v) => v,
            Err(e) => {
                error!(
                    "upgrade failed after {:?}; still serving: {e}",
                    pending.started.elapsed()
                );
                json!({"ok": false, "error": e})
            }
        };
        // The hand-over directory goes before the answer: whoever reads
        // it finds the upgrade over, its traces included.
        let Pending {
            reply_to,
            _dir: dir,
            ..
        } = pending;
        drop(dir);
        reply(&reply_to, &answer);
        if self.done() {
            self.stop.stop();
        }
    }

    /// Pauses the device, sends everything to the new process and, once
    /// it is ready, lets it go on. Any failure before that resumes here.
    fn hand_over(
        &self,
        server: &mut Server,
        sock: &UnixStream,
        child: Child,
        hello: &Hello,
    ) -> Result<Value, String> {
        let pid = child.id();
        if hello.pid != pid {
            kill(child);
            return Err(format!("the new process says it is pid {}", hello.pid));
        }
        let t0 = Instant::now();
        let handover = match server.export_handover(FLUSH_LIMIT) {
            Ok(h) => h,
            Err(e) => {
                kill(child);
                return Err(format!("cannot hand the device over: {e}"));
            }
        };
        let paused = Instant::now();
        info!(
            "upgrade: device paused in {} us; handing over to pid {pid} ({} {})",
            paused.duration_since(t0).as_micros(),
            hello.version,
            if hello.version == env!("CARGO_PKG_VERSION") {
                "same version"
            } else {
                "another version"
            }
        );
        // On failure the new process is dead and reaped before the device
        // runs here again: two processes never serve one client.
        match self.send_and_wait(handover, sock, paused + PAUSE_LIMIT) {
            Ok(()) => {}
            Err(e) => {
                kill(child);
                server.abort_handover();
                return Err(e);
            }
        }
        if let Err(e) = send_frame(sock, br#"{"go":true}"#, &[], paused + PAUSE_LIMIT) {
            kill(child);
            server.abort_handover();
            return Err(format!("the new process went away: {e}"));
        }
        server.finish_handover();
        self.done.store(true, Ordering::Release);
        // From the pause (the last completion here) to the go (the new
        // process serves from then on).
        let pause = t0.elapsed();
        info!(
            "upgrade: pid {pid} took over; the device was paused for {:.3} ms; this process exits",
            pause.as_secs_f64() * 1e3
        );
        notify_or_warn(&format!("MAINPID={pid}"));
        // The new process runs on by itself.
        drop(child);
        Ok(json!({
            "ok": true,
            "pid": pid,
            "pause_ms": (pause.as_secs_f64() * 1e6).round() / 1e3,
        }))
    }

    /// Sends the state and the fds, and waits for the new process to be
    /// ready.
    fn send_and_wait(
        &self,
        handover: Handover,
        sock: &UnixStream,
        deadline: Instant,
    ) -> Result<(), String> {
        let Handover { mut state, mut fds } = handover;
        if let Some(f) = std::env::var(TEST_FORMAT_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
        {
            warn!("upgrade: writing state format {f} ({TEST_FORMAT_ENV} is set)");
            state.format = f;
        }
        let server_fds = fds.len();
        let device = self
            .device_fds
            .try_clone()
            .map_err(|e| format!("cannot duplicate the device's fds: {e}"))?;
        let device_fds = device.files.len();
        fds.extend(device.files.into_iter().map(OwnedFd::from));
        if let Some(api) = &self.api_fd {
            fds.push(
                api.try_clone()
                    .map_err(|e| format!("cannot duplicate the control socket: {e}"))?,
            );
        }
        let msg = StateMessage {
            state,
            server_fds,
            device_layout: device.layout,
            device_fds,
            api_socket: self.api_fd.is_some(),
            from_pid: std::process::id(),
        };
        let body = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
        send_frame(sock, &body, &fds, deadline)
            .map_err(|e| format!("cannot send the state to the new process: {e}"))?;
        info!(
            "upgrade: sent {} bytes of state and {} fds",
            body.len(),
            fds.len()
        );
        drop(fds);
        let (answer, _) = recv_frame(sock, MAX_SMALL_BYTES, deadline).map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                format!("the new process was not ready within {PAUSE_LIMIT:?}")
            } else {
                format!("the new process did not take over: {e}")
            }
        })?;
        let answer: Value =
            serde_json::from_slice(&answer).map_err(|e| format!("bad answer: {e}"))?;
        if answer.get("ready").and_then(Value::as_bool) == Some(true) {
            return Ok(());
        }
        Err(format!(
            "the new process refused the state: {}",
            answer
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
        ))
    }
}

/// Waits for `child` to connect to `listener` and say hello: connections
/// from any other process get nothing and are closed.
fn wait_for_child(
    listener: &UnixListener,
    mut child: Child,
    deadline: Instant,
    timeout: Duration,
) -> Waited {
    let pid = child.id();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return Waited::Failed {
                    child,
                    error: format!("the new process exited ({status}) before taking over"),
                };
            }
            Ok(None) => {}
            Err(e) => {
                return Waited::Failed {
                    child,
                    error: format!("cannot watch the new process: {e}"),
                }
            }
        }
        if Instant::now() >= deadline {
            return Waited::Failed {
                child,
                error: format!("the new process did not connect within {timeout:?}"),
            };
        }
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(listener),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; 50 ms at most, to watch the
                // child too.
                unsafe { libc::poll(&mut p, 1, 50) };
                continue;
            }
            Err(e) => {
                return Waited::Failed {
                    child,
                    error: format!("hand-over socket: {e}"),
                }
            }
        };
        match peer_pid(&sock) {
            Ok(p) if p as u32 == pid => {}
            other => {
                warn!("upgrade: refusing a connection to the hand-over socket from {other:?}, not pid {pid}");
                continue;
            }
        }
        let hello = recv_frame(&sock, MAX_SMALL_BYTES, deadline)
            .map_err(|e| e.to_string())
            .and_then(|(b, _)| serde_json::from_slice::<Hello>(&b).map_err(|e| e.to_string()));
        return match hello {
            Ok(hello) => Waited::Connected { sock, child, hello },
            Err(e) => Waited::Failed {
                child,
                error: format!("no hello from the new process: {e}"),
            },
        };
    }
}

/// Writes one JSON line to the `api` client.
fn reply(stream: &UnixStream, v: &Value) {
    use std::io::Write;
    let mut line = v.to_string();
    line.push('\n');
    if let Err(e) = (&*stream).write_all(line.as_bytes()) {
        warn!("cannot answer the api client: {e}");
    }
}

/// Wakes the event loop when the wait for a new process ended.
pub struct UpgradeEvents(pub Arc<Upgrader>);

impl EventHandler for UpgradeEvents {
    fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0.wake)
    }

    fn handle(&mut self, servers: &mut [Server]) {
        self.0.finish(servers);
    }
}

/// What a new process took over.
pub struct Received {
    /// The server, with its client.
    pub server: Server,
    /// The device, for the operator.
    pub description: String,
    /// The device's own fds, for the next upgrade.
    pub device_fds: DeviceFds,
    /// The control socket's listener, if the old process had one.
    pub api: Option<UnixListener>,
    /// The old process.
    pub from_pid: u32,
}

/// The new process's side: connects to the old one through
/// `handover_socket`, receives the state and the fds, builds the device
/// (`kind`, with this process's options) on them, restores everything,
/// says it is ready and waits to be told to go. On failure the old
/// process is told why and goes on; this one has touched nothing.
pub fn receive(
    kind: &DeviceKind,
    handover_socket: &Path,
    config: ServerConfig,
) -> Result<Received, String> {
    let sock = UnixStream::connect(handover_socket)
        .map_err(|e| format!("cannot connect to {}: {e}", handover_socket.display()))?;
    let deadline = Instant::now() + NEW_SIDE_LIMIT;
    let hello = Hello {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let body = serde_json::to_vec(&hello).map_err(|e| e.to_string())?;
    send_frame(&sock, &body, &[], deadline).map_err(|e| format!("hello: {e}"))?;
    let (body, fds) = recv_frame(&sock, MAX_STATE_BYTES, deadline)
        .map_err(|e| format!("no state from the old process: {e}"))?;
    let t0 = Instant::now();
    let mut received = match take(kind, &body, fds, config) {
        Ok(r) => r,
        Err(e) => {
            let answer = json!({ "error": e }).to_string();
            let _ = send_frame(&sock, answer.as_bytes(), &[], deadline);
            return Err(format!("refused the hand-over: {e}"));
        }
    };
    info!(
        "took over the state of pid {} in {} us; ready",
        received.from_pid,
        t0.elapsed().as_micros()
    );
    send_frame(&sock, br#"{"ready":true}"#, &[], deadline)
        .map_err(|e| format!("the old process went away: {e}"))?;
    let (go, _) = recv_frame(&sock, MAX_SMALL_BYTES, deadline)
        .map_err(|e| format!("the old process did not let go: {e}"))?;
    let go: Value = serde_json::from_slice(&go).map_err(|e| format!("bad go: {e}"))?;
    if go.get("go").and_then(Value::as_bool) != Some(true) {
        return Err("the old process did not let go".into());
    }
    // The device is ours: it goes on (before, it touched nothing of the
    // client's, not even an interrupt).
    received
        .server
        .start_handed_over()
        .map_err(|e| format!("the device does not go on: {e}"))?;
    Ok(received)
}

/// Checks the state's format, builds the device on the fds and imports
/// the server.
fn take(
    kind: &DeviceKind,
    body: &[u8],
    fds: Vec<OwnedFd>,
    config: ServerConfig,
) -> Result<Received, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("bad state: {e}"))?;
    // The format first: a state of another format may not even parse.
    let format = v
        .get("state")
        .and_then(|s| s.get("format"))
        .and_then(Value::as_u64)
        .ok_or("the state has no format")?;
    if format != u64::from(vfio_user_server::HANDOVER_FORMAT) {
        return Err(HandoverError::Format {
            got: u32::try_from(format).unwrap_or(u32::MAX),
            want: vfio_user_server::HANDOVER_FORMAT,
        }
        .to_string());
    }
    let msg: StateMessage = serde_json::from_value(v).map_err(|e| format!("bad state: {e}"))?;
    let want = msg
        .server_fds
        .checked_add(msg.device_fds)
        .and_then(|n| n.checked_add(usize::from(msg.api_socket)));
    if want != Some(fds.len()) {
        return Err(format!(
            "{} fds for a state that names {} + {} + {}",
            fds.len(),
            msg.server_fds,
            msg.device_fds,
            usize::from(msg.api_socket)
        ));
    }
    let mut fds = fds.into_iter();
    let server_fds: Vec<OwnedFd> = fds.by_ref().take(msg.server_fds).collect();
    let device = DeviceFds {
        layout: msg.device_layout,
        files: fds
            .by_ref()
            .take(msg.device_fds)
            .map(std::fs::File::from)
            .collect(),
    };
    let api = fds.next().map(UnixListener::from);
    let Built {
        device,
        ctx,
        description,
        fds: device_fds,
        ..
    } = kind.build(Some(device))?;
    let server = Server::import_handover(
        Handover {
            state: msg.state,
            fds: server_fds,
        },
        device,
        ctx,
        config,
    )
    .map_err(|e| e.to_string())?;
    if let Some(api) = &api {
        api.set_nonblocking(true)
            .map_err(|e| format!("control socket: {e}"))?;
    }
    Ok(Received {
        server,
        description,
        device_fds,
        api,
        from_pid: msg.from_pid,
    })
}
