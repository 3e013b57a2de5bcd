//! `vfio-user-device`: the daemon users run beside their VMM. It serves a
//! device over vfio-user on a UNIX socket until SIGINT/SIGTERM.

mod api;
mod cli;
mod devices;
mod notify;
mod upgrade;

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use cli::{ApiCommand, Command};
use devices::{DeviceFds, DeviceKind};
use log::{info, LevelFilter};
use vfio_user_server::vm_migration::{Snapshottable, Transportable};
use vfio_user_server::{EventLoop, Server, ServerConfig};

use crate::notify::notify_or_warn;
use crate::upgrade::{UpgradeEvents, Upgrader};

fn run_api(args: &cli::ApiArgs) -> Result<(), String> {
    let mut req = serde_json::json!({ "command": args.command.name() });
    // The daemon may run in another directory.
    let abs = |p: &std::path::Path| {
        std::path::absolute(p)
            .map(|a| serde_json::Value::String(a.display().to_string()))
            .map_err(|e| format!("bad path {}: {e}", p.display()))
    };
    if let Some(p) = args.command.path() {
        req["path"] = abs(p)?;
    }
    let mut wait = Duration::from_secs(30);
    if let ApiCommand::Upgrade {
        exec,
        timeout,
        args: new_args,
    } = &args.command
    {
        if let Some(exec) = exec {
            req["exec"] = abs(exec)?;
        }
        req["timeout_ms"] = serde_json::json!(timeout.as_millis() as u64);
        req["args"] = serde_json::json!(new_args);
        // The new process's start, then the pause, are bounded.
        wait = *timeout + upgrade::PAUSE_LIMIT + Duration::from_secs(30);
    }
    let reply = api::call(&args.api_socket, &req, wait)?;
    println!("{reply}");
    if reply.get("ok").and_then(serde_json::Value::as_bool) == Some(true) {
        Ok(())
    } else {
        Err(reply
            .get("error")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("request failed")
            .to_string())
    }
}

/// Settings of the server from the common options.
fn server_config(opts: &cli::CommonOptions) -> ServerConfig {
    ServerConfig {
        socket_mode: opts.socket_mode,
        handshake_timeout: (!opts.handshake_timeout.is_zero()).then_some(opts.handshake_timeout),
        ..ServerConfig::default()
    }
}

/// Serves `kind` until SIGINT/SIGTERM, or until an upgrade hands it to a
/// new process; `argv` is this process's command line (after the program
/// name), which an upgrade starts the new process with by default.
fn serve(kind: &DeviceKind, argv: &[OsString]) -> Result<(), String> {
    let opts = kind.common();
    // A client that truncates its guest memory gets dropped instead of
    // killing the daemon with SIGBUS (a hand-over maps guest memory at
    // once).
    vfio_user_server::sigbus::install()
        .map_err(|e| format!("cannot install the SIGBUS handler: {e}"))?;
    let (mut server, description, notes, device_fds, api, taken_from) = match &opts.handover_socket
    {
        Some(path) => {
            let r = upgrade::receive(kind, path, server_config(opts))?;
            let api = match (r.api, &opts.api_socket) {
                (Some(listener), Some(path)) => {
                    Some(api::ApiServer::from_listener(listener, path)?)
                }
                _ => None,
            };
            (
                r.server,
                r.description,
                Vec::new(),
                r.device_fds,
                api,
                Some(r.from_pid),
            )
        }
        None => {
            let built = kind.build(None)?;
            let mut server =
                Server::new(&opts.socket, built.device, built.ctx, server_config(opts))
                    .map_err(|e| e.to_string())?;
            if let Some(path) = &opts.restore {
                // Refused as a whole before any client can attach;
                // dropping the server on error removes its socket.
                let url = format!("file://{}", path.display());
                server
                    .recv(&url, &server.id())
                    .and_then(|snapshot| server.restore(&snapshot))
                    .map_err(|e| format!("cannot restore from {}: {e}", path.display()))?;
                info!("restored device state from {}", path.display());
            }
            let api = opts
                .api_socket
                .as_deref()
                .map(api::ApiServer::bind)
                .transpose()?;
            (server, built.description, built.notes, built.fds, api, None)
        }
    };
    if taken_from.is_some() {
        // The socket files are ours from now on. (Complete messages the
        // hand-over brought are the connection's backlog: the event loop's
        // first turn handles them.)
        server.claim_socket_path(&opts.socket);
    }
    run(
        kind,
        argv,
        server,
        api,
        device_fds,
        &description,
        &notes,
        taken_from,
    )
}

/// Runs the event loop for `server` (and the control socket `api`).
#[allow(clippy::too_many_arguments)]
fn run(
    kind: &DeviceKind,
    argv: &[OsString],
    server: Server,
    mut api: Option<api::ApiServer>,
    device_fds: DeviceFds,
    description: &str,
    notes: &[String],
    taken_from: Option<u32>,
) -> Result<(), String> {
    let opts = kind.common();
    let mut event_loop = EventLoop::new().map_err(|e| format!("cannot create event loop: {e}"))?;
    event_loop.set_busy_poll(Duration::from_micros(opts.busy_poll_us.into()));
    event_loop
        .add_server(server)
        .map_err(|e| format!("cannot watch the socket: {e}"))?;
    let api_fd = api
        .as_ref()
        .map(api::ApiServer::listener_fd)
        .transpose()
        .map_err(|e| format!("api socket: {e}"))?;
    let upgrader = Arc::new(
        Upgrader::new(
            argv,
            kind.clone(),
            device_fds,
            api_fd,
            event_loop.stop_handle(),
        )
        .map_err(|e| format!("cannot prepare for upgrades: {e}"))?,
    );
    event_loop
        .add_handler(Box::new(UpgradeEvents(upgrader.clone())))
        .map_err(|e| format!("cannot watch upgrades: {e}"))?;
    if let Some(mut api) = api.take() {
        api.set_upgrader(upgrader.clone(), description.to_string());
        event_loop
            .add_handler(Box::new(api))
            .map_err(|e| format!("cannot watch the api socket: {e}"))?;
    }
    event_loop
        .stop_handle()
        .stop_on_termination_signals()
        .map_err(|e| format!("cannot handle signals: {e}"))?;
    match taken_from {
        None => print_attach_help(&opts.socket, description, notes),
        Some(pid) => {
            info!("serving {description}, taken over from pid {pid}");
            // Stdout is the old daemon's; whoever read it may be gone.
            let _ = writeln!(
                std::io::stdout(),
                "vfio-user-device: serving {description} on {} (taken over from pid {pid})",
                opts.socket.display()
            );
            // The service manager tracks this process from now on.
            notify_or_warn(&format!("MAINPID={}\nREADY=1", std::process::id()));
        }
    }
    if taken_from.is_none() {
        notify_or_warn("READY=1");
    }
    event_loop
        .run()
        .map_err(|e| format!("event loop failed: {e}"))?;
    if upgrader.done() {
        // Everything is the new process's now: leave without closing or
        // removing anything on the way out (no destructors).
        info!("handed over; exiting");
        std::process::exit(0);
    }
    info!("stopping; removing {}", opts.socket.display());
    // Dropping the loop drops the server, which removes the socket.
    drop(event_loop);
    Ok(())
}

/// Prints how to attach the VMMs. A closed stdout (`| head -1`, a script
/// that read the first line) is no reason to stop serving.
fn print_attach_help(socket: &std::path::Path, description: &str, notes: &[String]) {
    let abs = std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf());
    let s = abs.display();
    let mut text = format!("vfio-user-device: serving {description} on {s}\n");
    for note in notes {
        text.push_str(note);
        text.push('\n');
    }
    text.push_str(&format!(
        "Attach Cloud Hypervisor (guest memory must be shared):\n\
         \x20 cloud-hypervisor --kernel vmlinux --cmdline 'console=ttyS0 root=/dev/vda' \\\n\
         \x20   --memory size=1G,shared=on --user-device socket={s}\n\
         Attach QEMU 10.1+ (guest memory must be shared):\n\
         \x20 qemu-system-x86_64 -machine q35 -m 1G \\\n\
         \x20   -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n\
         \x20   -device '{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"path\":\"{s}\",\"type\":\"unix\"}}}}'\n\
         Stop with Ctrl-C (SIGINT) or SIGTERM.\n"
    ));
    let mut out = std::io::stdout();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Sets up logging to stderr: `level` if given, else RUST_LOG (default info).
fn init_logging(level: Option<LevelFilter>) {
    let mut builder = match level {
        Some(level) => {
            // The option wins over RUST_LOG, module directives included.
            let mut b = env_logger::Builder::from_env(
                env_logger::Env::new().write_style(env_logger::DEFAULT_WRITE_STYLE_ENV),
            );
            b.filter_level(level);
            b
        }
        // The virtqueue crate logs an error for every malformed ring a
        // guest may post: not by default (our own such warnings are
        // rate-limited).
        None => env_logger::Builder::from_env(
            env_logger::Env::default().default_filter_or("info,virtio_queue=off"),
        ),
    };
    // Microseconds: the two processes of an upgrade log to the same place,
    // and the pause between them is read from their timestamps.
    builder.format_timestamp_micros();
    builder.init();
}

fn main() -> ExitCode {
    let cli = match cli::parse(std::env::args_os().skip(1)) {
        Ok(cli) => cli,
        Err(cli::CliError::Help(text)) => {
            // A closed stdout (`| head`) is not worth a panic.
            let _ = write!(std::io::stdout(), "{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vfio-user-device: {e} (see --help)");
            return ExitCode::FAILURE;
        }
    };
    let result = match &cli.command {
        Command::Api(args) => {
            init_logging(None);
            run_api(args)
        }
        Command::Device(kind) => {
            init_logging(kind.common().log_level);
            let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
            serve(kind, &argv)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfio-user-device: {e}");
            ExitCode::FAILURE
        }
    }
}
