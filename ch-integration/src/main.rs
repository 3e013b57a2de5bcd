//! `vfio-user-device`: the daemon users run beside their VMM. It serves a
//! device over vfio-user on a UNIX socket until SIGINT/SIGTERM.

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

fn run(args: &[String]) -> Result<(), String> {
    let opts = match cli::parse(args) {
        Ok(o) => o,
        Err(cli::CliError::Help) => {
            println!("{}", cli::USAGE);
            return Ok(());
        }
        Err(e) => return Err(format!("{e} (see --help)")),
    };
    let built = device::build(&opts)?;
    let config = ServerConfig {
        socket_mode: opts.socket_mode,
        ..ServerConfig::default()
    };
    let server =
        Server::new(&opts.socket, built.device, built.ctx, config).map_err(|e| e.to_string())?;
    let mut event_loop = EventLoop::new().map_err(|e| format!("cannot create event loop: {e}"))?;
    event_loop
        .add_server(server)
        .map_err(|e| format!("cannot watch the socket: {e}"))?;
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
    let s = socket.display();
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
