//! Command-line parsing of `vfio-user-device`.

use std::path::PathBuf;

use backends::storage::MAX_IO_THREADS;
use thiserror::Error;

/// Usage text.
pub const USAGE: &str = "\
usage: vfio-user-device virtio-blk --socket PATH [options]
       vfio-user-device api --api-socket PATH pause|resume|status|snapshot FILE

Serves a virtio-blk PCI device over vfio-user on the UNIX socket PATH, for
Cloud Hypervisor (--user-device socket=PATH) or QEMU 10.1+
(-device '{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"PATH\"}}').
Guest memory must be shared with this process (see the start-up text).

options:
  --socket PATH        socket to listen on (a stale socket left by a killed
                       daemon is replaced; any other existing file is refused)
  --disk FILE          raw image to serve (default: a 64 MiB in-memory disk)
  --readonly           refuse guest writes
  --direct             open the image with O_DIRECT
  --num-queues N       request queues (default 1, at most 16)
  --queue-size N       descriptors per queue, a power of two (default 256, at most 1024)
  --socket-mode MODE   octal permissions of the socket (default 600)
  --busy-poll-us N     keep polling N µs after each burst of messages before
                       sleeping (lower latency, more CPU; default 0 = off)
  --io-threads N       run reads, writes and flushes on N threads, so that
                       requests that wait for the disk overlap (for --direct
                       or slow storage; default 0 = on the event loop)
  --api-socket PATH    control socket for pause, resume, snapshot, status
  --restore FILE       start from a snapshot taken with `api ... snapshot`
  -h, --help           this text

Logging: RUST_LOG=debug|info|warn (default info).";

/// Errors in the command line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CliError {
    /// Help was asked for.
    #[error("help requested")]
    Help,
    /// Missing or unknown device kind.
    #[error("expected a device kind (virtio-blk)")]
    NoDevice,
    /// Unknown device kind.
    #[error("unknown device kind '{0}' (expected virtio-blk)")]
    UnknownDevice(String),
    /// Unknown option.
    #[error("unknown option '{0}'")]
    UnknownOption(String),
    /// Option without its value.
    #[error("option {0} needs a value")]
    MissingValue(String),
    /// Value that does not parse or is out of range.
    #[error("invalid value '{1}' for {0}: {2}")]
    BadValue(String, String, String),
    /// --socket is required.
    #[error("--socket PATH is required")]
    NoSocket,
}

/// Parsed options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Socket path.
    pub socket: PathBuf,
    /// Image file, or None for the in-memory disk.
    pub disk: Option<PathBuf>,
    /// Read-only disk.
    pub readonly: bool,
    /// O_DIRECT.
    pub direct: bool,
    /// Number of request queues.
    pub num_queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Socket file mode.
    pub socket_mode: u32,
    /// Control socket.
    pub api_socket: Option<PathBuf>,
    /// Snapshot to start from.
    pub restore: Option<PathBuf>,
    /// Busy-poll window of the event loop, in microseconds.
    pub busy_poll_us: u32,
    /// I/O threads of the device (0: I/O on the event loop).
    pub io_threads: usize,
}

/// An `api` client invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiCall {
    /// The daemon's control socket.
    pub socket: PathBuf,
    /// Command name.
    pub command: String,
    /// Snapshot file for `snapshot`.
    pub path: Option<String>,
}

/// Parses `api --api-socket PATH COMMAND [FILE]`.
pub fn parse_api(args: &[String]) -> Result<ApiCall, CliError> {
    let mut socket = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Err(CliError::Help),
            "--api-socket" => {
                socket = Some(PathBuf::from(
                    it.next().ok_or_else(|| CliError::MissingValue(a.clone()))?,
                ))
            }
            _ => rest.push(a.clone()),
        }
    }
    let socket = socket.ok_or_else(|| CliError::MissingValue("--api-socket".into()))?;
    match rest.as_slice() {
        [c] if c == "pause" || c == "resume" || c == "status" => Ok(ApiCall {
            socket,
            command: c.clone(),
            path: None,
        }),
        [c, f] if c == "snapshot" => Ok(ApiCall {
            socket,
            command: c.clone(),
            path: Some(f.clone()),
        }),
        [c, ..] => Err(CliError::UnknownOption(c.clone())),
        [] => Err(CliError::BadValue(
            "api".into(),
            String::new(),
            "pause, resume, status or snapshot FILE".into(),
        )),
    }
}

fn number<T: std::str::FromStr>(
    opt: &str,
    v: &str,
    ok: impl Fn(&T) -> bool,
    why: &str,
) -> Result<T, CliError> {
    match v.parse::<T>() {
        Ok(n) if ok(&n) => Ok(n),
        _ => Err(CliError::BadValue(opt.into(), v.into(), why.into())),
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Options, CliError> {
    let mut it = args.iter();
    let kind = match it.next() {
        None => return Err(CliError::NoDevice),
        Some(a) if a == "-h" || a == "--help" => return Err(CliError::Help),
        Some(a) => a,
    };
    if kind != "virtio-blk" {
        return Err(CliError::UnknownDevice(kind.clone()));
    }
    let mut o = Options {
        socket: PathBuf::new(),
        disk: None,
        readonly: false,
        direct: false,
        num_queues: 1,
        queue_size: 256,
        socket_mode: 0o600,
        api_socket: None,
        restore: None,
        busy_poll_us: 0,
        io_threads: 0,
    };
    let mut socket = None;
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| CliError::MissingValue(a.clone()))
        };
        match a.as_str() {
            "-h" | "--help" => return Err(CliError::Help),
            "--socket" => socket = Some(PathBuf::from(value()?)),
            "--disk" => o.disk = Some(PathBuf::from(value()?)),
            "--readonly" => o.readonly = true,
            "--direct" => o.direct = true,
            "--num-queues" => {
                o.num_queues = number(a, &value()?, |n: &u16| (1..=16).contains(n), "1 to 16")?
            }
            "--queue-size" => {
                o.queue_size = number(
                    a,
                    &value()?,
                    |n: &u16| n.is_power_of_two() && (2..=1024).contains(n),
                    "a power of two from 2 to 1024",
                )?
            }
            "--api-socket" => o.api_socket = Some(PathBuf::from(value()?)),
            "--busy-poll-us" => {
                o.busy_poll_us = number(a, &value()?, |n: &u32| *n <= 1_000_000, "0 to 1000000")?
            }
            "--io-threads" => {
                o.io_threads = number(a, &value()?, |n: &usize| *n <= MAX_IO_THREADS, "0 to 64")?
            }
            "--restore" => o.restore = Some(PathBuf::from(value()?)),
            "--socket-mode" => {
                let v = value()?;
                o.socket_mode = u32::from_str_radix(&v, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| CliError::BadValue(a.clone(), v.clone(), "octal mode".into()))?;
            }
            _ => return Err(CliError::UnknownOption(a.clone())),
        }
    }
    o.socket = socket.ok_or(CliError::NoSocket)?;
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_and_refuses() {
        let o = parse(&args(
            "virtio-blk --socket /tmp/s --num-queues 2 --readonly",
        ))
        .unwrap();
        assert_eq!(o.socket, PathBuf::from("/tmp/s"));
        assert_eq!(o.num_queues, 2);
        assert!(o.readonly);
        assert_eq!(o.disk, None);
        assert_eq!(parse(&args("virtio-blk")), Err(CliError::NoSocket));
        assert_eq!(parse(&args("")), Err(CliError::NoDevice));
        assert!(matches!(
            parse(&args("net --socket x")),
            Err(CliError::UnknownDevice(_))
        ));
        assert!(matches!(
            parse(&args("virtio-blk --socket x --bogus")),
            Err(CliError::UnknownOption(_))
        ));
        assert!(matches!(
            parse(&args("virtio-blk --socket")),
            Err(CliError::MissingValue(_))
        ));
        assert!(matches!(
            parse(&args("virtio-blk --socket x --queue-size 100")),
            Err(CliError::BadValue(..))
        ));
        assert!(matches!(
            parse(&args("virtio-blk --socket x --num-queues 0")),
            Err(CliError::BadValue(..))
        ));
        assert_eq!(
            parse(&args("virtio-blk --socket x --socket-mode 660"))
                .unwrap()
                .socket_mode,
            0o660
        );
        assert_eq!(parse(&args("--help")), Err(CliError::Help));
        assert_eq!(
            parse(&args("virtio-blk --socket x --busy-poll-us 50"))
                .unwrap()
                .busy_poll_us,
            50
        );
        assert!(parse(&args("virtio-blk --socket x --busy-poll-us -1")).is_err());
        assert_eq!(
            parse(&args("virtio-blk --socket x --io-threads 4"))
                .unwrap()
                .io_threads,
            4
        );
        assert!(parse(&args("virtio-blk --socket x --io-threads 65")).is_err());
        let a = parse_api(&args("--api-socket /a snapshot /f")).unwrap();
        assert_eq!(a.command, "snapshot");
        assert_eq!(a.path.as_deref(), Some("/f"));
        assert!(parse_api(&args("--api-socket /a frobnicate")).is_err());
        assert!(parse_api(&args("pause")).is_err());
    }
}
