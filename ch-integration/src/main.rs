//! `vfio-user-device`: the daemon users run beside their VMM. It serves a
//! device over vfio-user on a UNIX socket until SIGINT/SIGTERM.

mod api;
mod cli;
mod device;

use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use log::info;
use vfio_user_server::{EventLoop, Server, ServerConfig};

/// The stop eventfd, for the signal handler.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_sig: libc::c_int) {
    let fd = STOP_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

fn install_signal_handlers(stop_fd: i32) {
    STOP_FD.store(stop_fd, Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only performs an async-signal-safe write.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    // A client vanishing mid-write must be an error, not a death.
    // SAFETY: ignoring SIGPIPE has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Largest snapshot file read by `--restore`.
const MAX_SNAPSHOT_BYTES: u64 = 256 << 20;

fn run_api(args: &[String]) -> Result<(), String> {
    let call = match cli::parse_api(args) {
        Ok(c) => c,
        Err(cli::CliError::Help) => {
            println!("{}", cli::USAGE);
            return Ok(());
        }
        Err(e) => return Err(format!("{e} (see --help)")),
    };
    let mut req = serde_json::json!({ "command": call.command });
    if let Some(p) = call.path {
        // The daemon may run in another directory.
        let abs = std::path::absolute(&p).map_err(|e| format!("bad path {p}: {e}"))?;
        req["path"] = serde_json::Value::String(abs.display().to_string());
    }
    let reply = api::call(&call.socket, &req)?;
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

fn read_snapshot(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path)
        .map_err(|e| format!("cannot open snapshot {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(MAX_SNAPSHOT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read snapshot {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_SNAPSHOT_BYTES {
        return Err(format!("snapshot {} is too large", path.display()));
    }
    Ok(bytes)
}

fn run(args: &[String]) -> Result<(), String> {
    if args.first().map(String::as_str) == Some("api") {
        return run_api(&args[1..]);
    }
    let opts = match cli::parse(args) {
        Ok(o) => o,
        Err(cli::CliError::Help) => {
            println!("{}", cli::USAGE);
            return Ok(());
        }
        Err(e) => return Err(format!("{e} (see --help)")),
    };
    let snapshot = opts.restore.as_deref().map(read_snapshot).transpose()?;
    let built = device::build(&opts)?;
    let config = ServerConfig {
        socket_mode: opts.socket_mode,
        ..ServerConfig::default()
    };
    let mut server =
        Server::new(&opts.socket, built.device, built.ctx, config).map_err(|e| e.to_string())?;
    if let (Some(bytes), Some(path)) = (snapshot, &opts.restore) {
        // Refused as a whole before any client can attach; dropping the
        // server on error removes its socket.
        server
            .restore(&bytes)
            .map_err(|e| format!("cannot restore from {}: {e}", path.display()))?;
        info!("restored device state from {}", path.display());
    }
    // A client that truncates its guest memory gets dropped instead of
    // killing the daemon with SIGBUS.
    vfio_user_server::sigbus::install()
        .map_err(|e| format!("cannot install the SIGBUS handler: {e}"))?;
    let mut event_loop = EventLoop::new().map_err(|e| format!("cannot create event loop: {e}"))?;
    event_loop.set_busy_poll(std::time::Duration::from_micros(opts.busy_poll_us.into()));
    event_loop
        .add_server(server)
        .map_err(|e| format!("cannot watch the socket: {e}"))?;
    if let Some(path) = &opts.api_socket {
        let api = api::ApiServer::bind(path)?;
        event_loop
            .add_handler(Box::new(api))
            .map_err(|e| format!("cannot watch the api socket: {e}"))?;
    }
    install_signal_handlers(event_loop.stop_handle().raw_fd());
    print_attach_help(&opts.socket, &built.description);
    event_loop
        .run()
        .map_err(|e| format!("event loop failed: {e}"))?;
    info!("stopping; removing {}", opts.socket.display());
    // Dropping the loop drops the server, which removes the socket.
    drop(event_loop);
    Ok(())
}

fn print_attach_help(socket: &std::path::Path, description: &str) {
    let abs = std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf());
    let s = abs.display();
    println!("vfio-user-device: serving {description} on {s}");
    println!("Attach Cloud Hypervisor (guest memory must be shared):");
    println!(
        "  cloud-hypervisor --kernel vmlinux --cmdline 'console=ttyS0 root=/dev/vda' \\\n    --memory size=1G,shared=on --user-device socket={s}"
    );
    println!("Attach QEMU 10.1+ (guest memory must be shared):");
    println!(
        "  qemu-system-x86_64 -machine q35 -m 1G \\\n    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n    -device '{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"path\":\"{s}\",\"type\":\"unix\"}}}}'"
    );
    println!("Stop with Ctrl-C (SIGINT) or SIGTERM.");
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfio-user-device: {e}");
            ExitCode::FAILURE
        }
    }
}
