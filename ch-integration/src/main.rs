//! `vfio-user-device`: the daemon users run beside their VMM. It serves a
//! device over vfio-user on a UNIX socket until SIGINT/SIGTERM.

mod api;
mod cli;
mod devices;

use std::io::Write;
use std::process::ExitCode;

use cli::Command;
use devices::DeviceKind;
use log::{info, LevelFilter};
use vfio_user_server::vm_migration::{Snapshottable, Transportable};
use vfio_user_server::{EventLoop, Server, ServerConfig};

fn run_api(args: &cli::ApiArgs) -> Result<(), String> {
    let mut req = serde_json::json!({ "command": args.command.name() });
    if let Some(p) = args.command.path() {
        // The daemon may run in another directory.
        let abs = std::path::absolute(p).map_err(|e| format!("bad path {}: {e}", p.display()))?;
        req["path"] = serde_json::Value::String(abs.display().to_string());
    }
    let reply = api::call(&args.api_socket, &req)?;
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

fn serve(kind: &DeviceKind) -> Result<(), String> {
    let opts = kind.common();
    let built = kind.build()?;
    let config = ServerConfig {
        socket_mode: opts.socket_mode,
        handshake_timeout: (!opts.handshake_timeout.is_zero()).then_some(opts.handshake_timeout),
        ..ServerConfig::default()
    };
    let mut server =
        Server::new(&opts.socket, built.device, built.ctx, config).map_err(|e| e.to_string())?;
    if let Some(path) = &opts.restore {
        // Refused as a whole before any client can attach; dropping the
        // server on error removes its socket.
        let url = format!("file://{}", path.display());
        server
            .recv(&url, &server.id())
            .and_then(|snapshot| server.restore(&snapshot))
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
    event_loop
        .stop_handle()
        .stop_on_termination_signals()
        .map_err(|e| format!("cannot handle signals: {e}"))?;
    print_attach_help(&opts.socket, &built.description, &built.notes);
    event_loop
        .run()
        .map_err(|e| format!("event loop failed: {e}"))?;
    info!("stopping; removing {}", opts.socket.display());
    // Dropping the loop drops the server, which removes the socket.
    drop(event_loop);
    Ok(())
}

fn print_attach_help(socket: &std::path::Path, description: &str, notes: &[String]) {
    let abs = std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf());
    let s = abs.display();
    println!("vfio-user-device: serving {description} on {s}");
    for note in notes {
        println!("{note}");
    }
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
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")),
    };
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
            serve(kind)
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
