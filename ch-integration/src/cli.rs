//! Command line of `vfio-user-device`: one subcommand per device kind (see
//! [`crate::devices`]), the options every kind shares, and the `api` client.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{value_parser, Args, CommandFactory, Parser, Subcommand};
use log::LevelFilter;
use thiserror::Error;

use crate::devices::DeviceKind;

/// Serves a PCI device over vfio-user on a UNIX socket, for Cloud Hypervisor
/// (--user-device socket=PATH) or QEMU 10.1+
/// (-device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"PATH"}}').
/// Guest memory must be shared with this process (see the start-up text).
#[derive(Debug, Parser)]
// Help is not wrapped to the terminal (that needs another dependency): the
// longer texts are broken by hand and kept verbatim.
#[command(
    name = "vfio-user-device",
    version,
    verbatim_doc_comment,
    disable_help_subcommand = true,
    // Like the hand-written parser this replaces: a repeated option wins.
    args_override_self = true
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The daemon's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// One subcommand per device kind.
    #[command(flatten)]
    Device(DeviceKind),
    /// Sends a command to a running daemon's --api-socket and prints its reply
    Api(ApiArgs),
}

/// Options every device kind takes, flattened into each kind's subcommand.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
#[command(next_help_heading = "Common options")]
pub struct CommonOptions {
    /// Socket to listen on (a stale socket left by a killed daemon
    /// is replaced; any other existing file is refused)
    #[arg(long, value_name = "PATH", verbatim_doc_comment)]
    pub socket: PathBuf,
    /// Octal permissions of the socket
    #[arg(long, value_name = "MODE", default_value = "600", value_parser = parse_socket_mode)]
    pub socket_mode: u32,
    /// Control socket for pause, resume, snapshot, status (see `api`)
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Start from a snapshot taken with `api ... snapshot`
    #[arg(long, value_name = "FILE")]
    pub restore: Option<PathBuf>,
    /// Keep polling N µs after each burst of messages before
    /// sleeping (lower latency, more CPU; 0 = off)
    #[arg(
        long,
        value_name = "N",
        verbatim_doc_comment,
        default_value_t = 0,
        value_parser = value_parser!(u32).range(0..=1_000_000)
    )]
    pub busy_poll_us: u32,
    /// Seconds a client has after connecting to finish VERSION before it
    /// is dropped, so a silent connection cannot hold the device (0 = no
    /// limit; a negotiated client never times out)
    #[arg(
        long,
        value_name = "SECS",
        verbatim_doc_comment,
        default_value = "5",
        value_parser = parse_timeout
    )]
    pub handshake_timeout: Duration,
    /// Log level on stderr: error, warn, info, debug or trace
    /// (default: RUST_LOG, else info)
    #[arg(
        long,
        value_name = "LEVEL",
        verbatim_doc_comment,
        hide_possible_values = true,
        value_parser = PossibleValuesParser::new(["error", "warn", "info", "debug", "trace"])
            .try_map(|s| s.parse::<LevelFilter>())
    )]
    pub log_level: Option<LevelFilter>,
    /// Take the device over from the running daemon that listens on this
    /// hand-over socket (how `api ... upgrade` starts the new daemon)
    #[arg(long, value_name = "PATH", hide = true)]
    pub handover_socket: Option<PathBuf>,
}

/// The name of the hidden option a daemon starts its successor with.
pub const HANDOVER_OPTION: &str = "--handover-socket";

/// `api --api-socket PATH COMMAND`.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct ApiArgs {
    /// The daemon's control socket (its --api-socket)
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// What to ask.
    #[command(subcommand)]
    pub command: ApiCommand,
}

/// The commands of the control socket.
#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum ApiCommand {
    /// Pauses the device (no DMA, no interrupts), before a snapshot
    Pause,
    /// Resumes the device after pause, or after it stopped on a storage
    /// error (--on-error stop), retrying the requests that failed
    #[command(verbatim_doc_comment)]
    Resume,
    /// Prints whether the device is paused, stopped on an error (and
    /// which), connected, and its migration state
    #[command(verbatim_doc_comment)]
    Status,
    /// Writes the paused device's state to FILE, for --restore
    Snapshot {
        /// Snapshot file to write (replaced as a whole)
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Replaces the daemon by a new process that takes over the device,
    /// its client and its sockets while the VMM stays connected: the
    /// device pauses (requests in flight complete), the new process
    /// restores it and serves on, the old one exits 0. If the new process
    /// fails before it takes over, the old one goes on as before and this
    /// prints why
    #[command(verbatim_doc_comment)]
    Upgrade {
        /// The new binary (default: the one at the path the daemon was
        /// started from, which after a package upgrade is the new version)
        #[arg(long, value_name = "PATH", verbatim_doc_comment)]
        exec: Option<PathBuf>,
        /// Seconds the new process has to start and connect
        #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_upgrade_timeout)]
        timeout: Duration,
        /// The new daemon's command line, after `--`: its kind and options
        /// (default: the running daemon's). Options that change what is
        /// served (another image, TAP, socket, queue layout, write cache)
        /// are refused; --aio, --io-threads, --busy-poll-us, --on-error,
        /// --log-level and --handshake-timeout may change. Relative paths
        /// are taken from the daemon's working directory
        #[arg(last = true, value_name = "ARGS", verbatim_doc_comment)]
        args: Vec<String>,
    },
}

impl ApiCommand {
    /// The command's name on the control socket.
    pub fn name(&self) -> &'static str {
        match self {
            ApiCommand::Pause => "pause",
            ApiCommand::Resume => "resume",
            ApiCommand::Status => "status",
            ApiCommand::Snapshot { .. } => "snapshot",
            ApiCommand::Upgrade { .. } => "upgrade",
        }
    }

    /// The file the command names, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ApiCommand::Snapshot { file } => Some(file),
            _ => None,
        }
    }
}

/// How the command line failed to give something to run.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CliError {
    /// Help or the version was asked for: print this text and exit 0.
    #[error("help requested")]
    Help(String),
    /// The command line is wrong: one line for the operator.
    #[error("{0}")]
    Invalid(String),
}

fn parse_socket_mode(v: &str) -> Result<u32, String> {
    u32::from_str_radix(v, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| "an octal mode, at most 777".to_string())
}

/// Parses the arguments after the program name.
pub fn parse<I, T>(args: I) -> Result<Cli, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let argv = std::iter::once(OsString::from("vfio-user-device")).chain(args.iter().cloned());
    Cli::try_parse_from(argv).map_err(|e| match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => CliError::Help(e.to_string()),
        _ => CliError::Invalid(one_line(
            &e,
            args.first().map(|a| a.to_string_lossy()).as_deref(),
        )),
    })
}

/// The device kinds, for messages.
fn kinds() -> String {
    let cmd = DeviceKind::augment_subcommands(clap::Command::new("kinds"));
    let names: Vec<&str> = cmd.get_subcommands().map(|c| c.get_name()).collect();
    names.join(", ")
}

fn strings(e: &clap::Error, kind: ContextKind) -> Vec<String> {
    match e.get(kind) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        _ => Vec::new(),
    }
}

/// Renders a clap error as one line: clap's own text spans several lines
/// (tips, usage) and callers print it after the program name.
fn one_line(e: &clap::Error, first: Option<&str>) -> String {
    let cmd = Cli::command();
    let Some(sub) = first.and_then(|f| cmd.find_subcommand(f)) else {
        // The first word is what is wrong: it must name a kind or `api`.
        let kinds = kinds();
        return match first {
            None => format!("expected a device kind ({kinds})"),
            Some(f) if f.starts_with('-') => {
                format!("expected a device kind ({kinds}) before '{f}'")
            }
            Some(f) => format!("unknown device kind '{f}' (expected {kinds})"),
        };
    };
    let name = sub.get_name();
    let commands = || {
        let names: Vec<&str> = sub.get_subcommands().map(|c| c.get_name()).collect();
        names.join(", ")
    };
    match e.kind() {
        ErrorKind::MissingRequiredArgument => {
            format!("missing {}", strings(e, ContextKind::InvalidArg).join(", "))
        }
        // The derive asks for help when a subcommand comes with nothing.
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            format!("expected a command after '{name}' ({})", commands())
        }
        ErrorKind::InvalidSubcommand => format!(
            "unknown command '{}' after '{name}' (expected {})",
            strings(e, ContextKind::InvalidSubcommand).join(" "),
            commands()
        ),
        kind => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or_default();
            let mut line = line.strip_prefix("error: ").unwrap_or(line).to_string();
            let suggested = strings(e, ContextKind::SuggestedArg);
            if kind == ErrorKind::UnknownArgument && !suggested.is_empty() {
                line.push_str(&format!(" (did you mean '{}'?)", suggested.join(" ")));
            }
            // clap lists the possible values on a line of their own.
            let valid = strings(e, ContextKind::ValidValue);
            if kind == ErrorKind::InvalidValue && !valid.is_empty() {
                line.push_str(&format!(" (expected {})", valid.join(", ")));
            }
            line
        }
    }
}

/// Parses the time a new daemon has to take over: 0.1 to 600 seconds.
fn parse_upgrade_timeout(v: &str) -> Result<Duration, String> {
    match v.parse::<f64>() {
        Ok(s) if (0.1..=600.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
        _ => Err("seconds from 0.1 to 600".into()),
    }
}

/// The command line a daemon started with `args` (after the program name)
/// gives its successor: the same, without the hand-over socket it was
/// itself started with, nor `--restore` (the successor restores from the
/// hand-over).
pub fn successor_args(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) {
            continue;
        }
        let text = a.to_string_lossy();
        let mut dropped = false;
        for opt in [HANDOVER_OPTION, "--restore"] {
            if text == opt {
                skip = true;
                dropped = true;
            } else if text.starts_with(&format!("{opt}=")) {
                dropped = true;
            }
        }
        if !dropped {
            out.push(a.clone());
        }
    }
    out
}

/// Parses a number of seconds (decimals allowed), at most an hour.
fn parse_timeout(v: &str) -> Result<Duration, String> {
    match v.parse::<f64>() {
        Ok(s) if (0.0..=3600.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
        _ => Err("seconds from 0 to 3600".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio_blk::VirtioBlkArgs;
    use backends::block_io::ErrorPolicy;

    fn parse_line(s: &str) -> Result<Cli, CliError> {
        parse(s.split_whitespace())
    }

    fn blk(s: &str) -> VirtioBlkArgs {
        match parse_line(s) {
            Ok(Cli {
                command: Command::Device(DeviceKind::VirtioBlk(a)),
            }) => a,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn api(s: &str) -> ApiArgs {
        match parse_line(s) {
            Ok(Cli {
                command: Command::Api(a),
            }) => a,
            other => panic!("{s}: {other:?}"),
        }
    }

    /// The one-line error for `s`.
    fn error(s: &str) -> String {
        match parse_line(s) {
            Err(CliError::Invalid(e)) => {
                assert_eq!(e.lines().count(), 1, "{s}: {e}");
                e
            }
            other => panic!("{s}: {other:?}"),
        }
    }

    fn help(s: &str) -> String {
        match parse_line(s) {
            Err(CliError::Help(h)) => h,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_a_valid_line() {
        let a = blk("virtio-blk --socket /tmp/s --num-queues 2 --readonly");
        assert_eq!(a.common.socket, PathBuf::from("/tmp/s"));
        assert_eq!(a.num_queues, 2);
        assert!(a.storage.readonly);
        assert!(!a.storage.direct);
        assert_eq!(a.disk, None);
        assert_eq!(a.queue_size, 256);
        assert_eq!(a.storage.io_threads, None);
        assert_eq!(a.storage.aio, None);
        assert_eq!(a.common.socket_mode, 0o600);
        assert_eq!(a.common.busy_poll_us, 0);
        assert_eq!(a.common.api_socket, None);
        assert_eq!(a.common.restore, None);
        assert_eq!(a.common.log_level, None);
        let a = blk("virtio-blk --socket s --disk d --direct --api-socket a --restore r");
        assert_eq!(a.disk, Some(PathBuf::from("d")));
        assert!(a.storage.direct);
        assert_eq!(a.common.api_socket, Some(PathBuf::from("a")));
        assert_eq!(a.common.restore, Some(PathBuf::from("r")));
        // As before: the last of a repeated option wins.
        assert_eq!(
            blk("virtio-blk --socket a --socket b").common.socket,
            PathBuf::from("b")
        );
    }

    #[test]
    fn refuses_with_one_line() {
        assert!(error("virtio-blk").contains("--socket"));
        assert_eq!(
            error(""),
            "expected a device kind (virtio-blk, virtio-net, megasas)"
        );
        assert_eq!(
            error("net --socket x"),
            "unknown device kind 'net' (expected virtio-blk, virtio-net, megasas)"
        );
        assert!(error("--socket x").contains("device kind"));
        let e = error("virtio-blk --socket x --bogus");
        assert!(e.contains("'--bogus'"), "{e}");
        let e = error("virtio-blk --socket");
        assert!(e.contains("--socket") && e.contains("value"), "{e}");
        let e = error("virtio-blk --socket x --queue-size 100");
        assert!(
            e.contains("--queue-size") && e.contains("'100'") && e.contains("power of two"),
            "{e}"
        );
        let e = error("virtio-blk --socket x --num-queues 0");
        assert!(e.contains("--num-queues") && e.contains("'0'"), "{e}");
        let e = error("virtio-blk --socket x --socket-mode 1777");
        assert!(e.contains("--socket-mode") && e.contains("'1777'"), "{e}");
        assert!(error("virtio-blk --socket x --socket-mode rw").contains("octal"));
    }

    #[test]
    fn socket_mode_is_octal() {
        assert_eq!(
            blk("virtio-blk --socket x --socket-mode 660")
                .common
                .socket_mode,
            0o660
        );
    }

    #[test]
    fn help_is_not_an_error() {
        for line in ["--help", "-h"] {
            let h = help(line);
            assert!(h.contains("virtio-blk") && h.contains("api"), "{h}");
        }
        for line in [
            "virtio-blk --help",
            "virtio-blk -h",
            "virtio-blk --socket x --help",
        ] {
            let h = help(line);
            for opt in [
                "--socket",
                "--disk",
                "--io-threads",
                "--busy-poll-us",
                "--log-level",
            ] {
                assert!(h.contains(opt), "{line}: no {opt} in {h}");
            }
        }
        assert!(help("api --help").contains("--api-socket"));
        assert!(help("api snapshot --help").contains("FILE"));
    }

    #[test]
    fn handshake_timeout() {
        let t = |line: &str| blk(line).common.handshake_timeout;
        assert_eq!(t("virtio-blk --socket x"), Duration::from_secs(5));
        assert_eq!(
            t("virtio-blk --socket x --handshake-timeout 0.25"),
            Duration::from_millis(250)
        );
        assert_eq!(
            t("virtio-blk --socket x --handshake-timeout 0"),
            Duration::ZERO
        );
        assert!(error("virtio-blk --socket x --handshake-timeout -1").contains("-1"));
        assert!(error("virtio-blk --socket x --handshake-timeout soon").contains("seconds"));
    }

    #[test]
    fn busy_poll_range() {
        assert_eq!(
            blk("virtio-blk --socket x --busy-poll-us 50")
                .common
                .busy_poll_us,
            50
        );
        assert!(error("virtio-blk --socket x --busy-poll-us -1").contains("-1"));
        assert!(error("virtio-blk --socket x --busy-poll-us 1000001").contains("--busy-poll-us"));
    }

    #[test]
    fn on_error_policy() {
        assert_eq!(
            blk("virtio-blk --socket x").storage.on_error,
            ErrorPolicy::Report
        );
        assert_eq!(
            blk("virtio-blk --socket x --on-error stop")
                .storage
                .on_error,
            ErrorPolicy::Stop
        );
        assert_eq!(
            blk("virtio-blk --socket x --on-error report")
                .storage
                .on_error,
            ErrorPolicy::Report
        );
        let e = error("virtio-blk --socket x --on-error ignore");
        assert!(
            e.contains("--on-error") && e.contains("'ignore'") && e.contains("stop"),
            "{e}"
        );
        assert!(help("virtio-blk --help").contains("--on-error <POLICY>"));
    }

    #[test]
    fn io_threads_range() {
        assert_eq!(
            blk("virtio-blk --socket x --io-threads 4")
                .storage
                .io_threads,
            Some(4)
        );
        let a = blk("virtio-blk --socket x --aio io_uring");
        assert_eq!(
            a.storage.aio,
            Some(crate::devices::storage::AioArg::IoUring)
        );
        assert_eq!(
            blk("virtio-blk --socket x --aio sync").storage.aio,
            Some(crate::devices::storage::AioArg::Sync)
        );
        let e = error("virtio-blk --socket x --aio posix");
        assert!(e.contains("--aio") && e.contains("'posix'"), "{e}");
        let e = error("virtio-blk --socket x --io-threads 65");
        assert!(e.contains("--io-threads") && e.contains("'65'"), "{e}");
    }

    #[test]
    fn log_level() {
        assert_eq!(
            blk("virtio-blk --socket x --log-level debug")
                .common
                .log_level,
            Some(LevelFilter::Debug)
        );
        for (name, level) in [
            ("error", LevelFilter::Error),
            ("warn", LevelFilter::Warn),
            ("info", LevelFilter::Info),
            ("trace", LevelFilter::Trace),
        ] {
            let line = format!("virtio-blk --socket x --log-level {name}");
            assert_eq!(blk(&line).common.log_level, Some(level));
        }
        let e = error("virtio-blk --socket x --log-level loud");
        assert!(e.contains("--log-level") && e.contains("'loud'"), "{e}");
    }

    #[test]
    fn api_commands() {
        let a = api("api --api-socket /a snapshot /f");
        assert_eq!(a.api_socket, PathBuf::from("/a"));
        assert_eq!(a.command.name(), "snapshot");
        assert_eq!(a.command.path(), Some(Path::new("/f")));
        for c in ["pause", "resume", "status"] {
            let a = api(&format!("api --api-socket /a {c}"));
            assert_eq!(a.command.name(), c);
            assert_eq!(a.command.path(), None);
        }
        let e = error("api --api-socket /a frobnicate");
        assert!(e.contains("frobnicate") && e.contains("pause"), "{e}");
        assert!(error("api pause").contains("--api-socket"));
        assert!(error("api --api-socket /a").contains("snapshot"));
        assert!(error("api").contains("snapshot"));
        assert!(error("api --api-socket /a snapshot").contains("FILE"));
    }

    #[test]
    fn upgrade_command() {
        let a = api("api --api-socket /a upgrade");
        assert_eq!(a.command.name(), "upgrade");
        match a.command {
            ApiCommand::Upgrade {
                exec,
                timeout,
                args,
            } => {
                assert_eq!(exec, None);
                assert_eq!(timeout, Duration::from_secs(10));
                assert!(args.is_empty());
            }
            other => panic!("{other:?}"),
        }
        let a =
            api("api --api-socket /a upgrade --exec /bin/x --timeout 2 -- virtio-blk --socket s");
        match a.command {
            ApiCommand::Upgrade {
                exec,
                timeout,
                args,
                ..
            } => {
                assert_eq!(exec, Some(PathBuf::from("/bin/x")));
                assert_eq!(timeout, Duration::from_secs(2));
                assert_eq!(args, ["virtio-blk", "--socket", "s"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(error("api --api-socket /a upgrade --timeout 0").contains("--timeout"));
        // The hand-over option is accepted, and hidden.
        let a = blk("virtio-blk --socket s --handover-socket /h");
        assert_eq!(a.common.handover_socket, Some(PathBuf::from("/h")));
        assert!(!help("virtio-blk --help").contains("handover"));
    }

    #[test]
    fn successor_args_drop_the_hand_over_and_restore() {
        let v = |s: &str| -> Vec<OsString> { s.split_whitespace().map(OsString::from).collect() };
        assert_eq!(
            successor_args(&v(
                "virtio-blk --socket s --restore f --handover-socket /h --io-threads 2"
            )),
            v("virtio-blk --socket s --io-threads 2")
        );
        assert_eq!(
            successor_args(&v("virtio-blk --restore=f --handover-socket=/h --socket s")),
            v("virtio-blk --socket s")
        );
    }
}
