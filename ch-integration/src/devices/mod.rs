//! The device kinds the daemon serves. A kind is one file here (its
//! options, flattening [`CommonOptions`], its `build`, and which options an
//! upgrade may change) and one [`DeviceKind`] variant, which is also its
//! subcommand.
//!
//! Every kind builds either from its options (opening its image or TAP)
//! or from the fds a running daemon hands over in an upgrade
//! ([`DeviceFds`]), and lists the fds it would hand over itself.

pub mod megasas;
pub mod virtio_blk;
pub mod virtio_net;

use std::fs::File;
use std::path::Path;

use backends::block_io::{io_uring_support, Aio, FALLBACK_IO_THREADS};
use backends::storage::RawFile;
use clap::{Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use vfio_user_server::{Device, DeviceContext};

use crate::cli::CommonOptions;

/// A device's own fds (images, TAP queues), as a daemon hands them over in
/// an upgrade: how the kind rebuilds its back ends from them, and the fds.
#[derive(Debug, Default)]
pub struct DeviceFds {
    /// What the fds are, per kind (JSON).
    pub layout: serde_json::Value,
    /// The fds, in the order the layout gives.
    pub files: Vec<File>,
}

impl DeviceFds {
    /// Duplicates of the fds, for another process.
    pub fn try_clone(&self) -> std::io::Result<DeviceFds> {
        Ok(DeviceFds {
            layout: self.layout.clone(),
            files: self
                .files
                .iter()
                .map(File::try_clone)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// One disk image as it is handed over: the files [`RawFile::files`]
/// gives, in that order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFds {
    /// The id the guest sees (serial).
    pub id: String,
    /// A second fd, opened with `O_DIRECT`, follows the first.
    pub direct: bool,
}

/// The image at `path` (or, with no path, a zeroed in-memory disk of
/// `memory_size` bytes on a memfd, so that an upgrade keeps its data).
pub fn open_disk(
    path: Option<&Path>,
    read_only: bool,
    direct: bool,
    memory_size: u64,
) -> Result<RawFile, String> {
    match path {
        None => Ok(RawFile::in_memory(memory_size)
            .map_err(|e| e.to_string())?
            .with_id("memdisk")),
        Some(path) => RawFile::open(
            path,
            backends::storage::RawFileOptions { read_only, direct },
        )
        .map_err(|e| format!("cannot open disk {}: {e}", path.display())),
    }
}

/// Appends duplicates of the fds of `disk` to `files`; returns what they
/// are.
pub fn disk_fds(disk: &RawFile, files: &mut Vec<File>) -> Result<DiskFds, String> {
    use backends::storage::BlockBackend;
    let dup = |f: &File| {
        f.try_clone()
            .map_err(|e| format!("cannot keep the image's fd for an upgrade: {e}"))
    };
    let (file, direct) = disk.files();
    files.push(dup(file)?);
    if let Some(d) = direct {
        files.push(dup(d)?);
    }
    Ok(DiskFds {
        id: disk.id(),
        direct: direct.is_some(),
    })
}

/// The disk [`disk_fds`] described, on the next fds of `files`.
pub fn disk_from_fds(
    disk: &DiskFds,
    files: &mut impl Iterator<Item = File>,
    read_only: bool,
) -> Result<RawFile, String> {
    let missing = || "an image fd is missing from the hand-over".to_string();
    let file = files.next().ok_or_else(missing)?;
    let direct = if disk.direct {
        Some(files.next().ok_or_else(missing)?)
    } else {
        None
    };
    Ok(RawFile::from_files(file, direct, read_only)
        .map_err(|e| format!("handed-over image: {e}"))?
        .with_id(&disk.id))
}

/// Whether two paths name the same file as given (relative ones resolved
/// against the working directory, which the new daemon shares).
pub fn same_path(a: &Path, b: &Path) -> bool {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    abs(a) == abs(b)
}

/// A device ready to serve.
pub struct Built {
    /// The device.
    pub device: Box<dyn Device>,
    /// The context it was built with.
    pub ctx: DeviceContext,
    /// One line for the operator.
    pub description: String,
    /// More lines for the operator (what to set up on the host).
    pub notes: Vec<String>,
    /// Duplicates of the device's own fds, for an upgrade.
    pub fds: DeviceFds,
}

/// Parses a queue size: a power of two from 2 to 1024.
pub fn parse_queue_size(v: &str) -> Result<u16, String> {
    v.parse::<u16>()
        .ok()
        .filter(|n| n.is_power_of_two() && (2..=1024).contains(n))
        .ok_or_else(|| "not a power of two from 2 to 1024".to_string())
}

/// The `--aio` modes of the storage kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AioArg {
    /// In flight on an io_uring
    #[value(name = "io_uring")]
    IoUring,
    /// In flight on a pool of I/O threads
    Threads,
    /// On the event loop thread
    Sync,
}

/// How a storage kind runs its I/O, from `--aio` and `--io-threads`, and
/// a line for the operator if io_uring was asked for (or would have been
/// the default) but cannot be used here. `files` says whether the disks
/// are files: an in-memory disk runs on the event loop unless told
/// otherwise.
///
/// Without `--aio`, `--io-threads 0` means `sync` and `--io-threads N`
/// means `threads` (as before `--aio` existed); with neither, the best
/// mode available: io_uring, else threads.
pub fn resolve_aio(
    aio: Option<AioArg>,
    io_threads: Option<usize>,
    files: bool,
) -> Result<(Aio, Option<String>), String> {
    let threads = io_threads.unwrap_or(FALLBACK_IO_THREADS);
    let uring = || match io_uring_support() {
        Ok(()) => (Aio::IoUring, None),
        Err(why) => (
            Aio::Threads(threads),
            Some(format!(
                "io_uring is unavailable ({why}): using {threads} I/O threads instead"
            )),
        ),
    };
    match (aio, io_threads) {
        (None, None) if !files => Ok((Aio::Sync, None)),
        (None, None) => Ok(uring()),
        (None, Some(0)) => Ok((Aio::Sync, None)),
        (None, Some(n)) => Ok((Aio::Threads(n), None)),
        (Some(AioArg::Sync), None | Some(0)) => Ok((Aio::Sync, None)),
        (Some(AioArg::Threads), Some(0)) => {
            Err("--aio threads needs --io-threads of 1 or more".into())
        }
        (Some(AioArg::Threads), _) => Ok((Aio::Threads(threads), None)),
        (Some(AioArg::IoUring), Some(0)) => {
            Err("--io-threads 0 with --aio io_uring: leave --io-threads out".into())
        }
        (Some(AioArg::IoUring), _) if !files => Ok((Aio::Sync, None)),
        (Some(AioArg::IoUring), _) => Ok(uring()),
        (Some(AioArg::Sync), Some(_)) => {
            Err("--io-threads needs --aio threads (or no --aio)".into())
        }
    }
}

/// The device kinds, one subcommand each.
#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum DeviceKind {
    /// Serves a virtio-blk PCI device: a raw image, or an in-memory disk
    VirtioBlk(virtio_blk::VirtioBlkArgs),
    /// Serves a virtio-net PCI device on a host TAP interface
    VirtioNet(virtio_net::VirtioNetArgs),
    /// Serves a MegaRAID SAS 1078 controller (megaraid_sas) whose logical
    /// drives are raw images, or an in-memory disk
    Megasas(megasas::MegasasArgs),
}

impl DeviceKind {
    /// The options every kind takes.
    pub fn common(&self) -> &CommonOptions {
        match self {
            DeviceKind::VirtioBlk(args) => &args.common,
            DeviceKind::VirtioNet(args) => &args.common,
            DeviceKind::Megasas(args) => &args.common,
        }
    }

    /// The kind's name (its subcommand).
    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::VirtioBlk(_) => "virtio-blk",
            DeviceKind::VirtioNet(_) => "virtio-net",
            DeviceKind::Megasas(_) => "megasas",
        }
    }

    /// Builds the device from its options, or on the fds a running daemon
    /// handed over (`inherited`).
    pub fn build(&self, inherited: Option<DeviceFds>) -> Result<Built, String> {
        match self {
            DeviceKind::VirtioBlk(args) => virtio_blk::build(args, inherited),
            DeviceKind::VirtioNet(args) => virtio_net::build(args, inherited),
            DeviceKind::Megasas(args) => megasas::build(args, inherited),
        }
    }

    /// The options of `new` that an upgrade from `self` may not change,
    /// each with why; empty if the upgrade is safe. Changing I/O threads,
    /// the error policy, busy polling, the log level or the handshake
    /// timeout is; serving something else (another image, TAP, queue
    /// layout, kind) or elsewhere is not.
    pub fn upgrade_refusals(&self, new: &DeviceKind) -> Vec<String> {
        let mut out = Vec::new();
        let (a, b) = (self.common(), new.common());
        if a.socket != b.socket {
            out.push("--socket (the client is connected to this one)".to_string());
        }
        if a.socket_mode != b.socket_mode {
            out.push("--socket-mode (the socket file exists already)".to_string());
        }
        if a.api_socket != b.api_socket {
            out.push("--api-socket (it is handed over as it is)".to_string());
        }
        let kind = match (self, new) {
            (DeviceKind::VirtioBlk(a), DeviceKind::VirtioBlk(b)) => {
                virtio_blk::upgrade_refusals(a, b)
            }
            (DeviceKind::VirtioNet(a), DeviceKind::VirtioNet(b)) => {
                virtio_net::upgrade_refusals(a, b)
            }
            (DeviceKind::Megasas(a), DeviceKind::Megasas(b)) => megasas::upgrade_refusals(a, b),
            _ => vec![format!(
                "the device kind ({} -> {})",
                self.name(),
                new.name()
            )],
        };
        out.extend(kind);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aio_resolution() {
        let auto = if io_uring_support().is_ok() {
            Aio::IoUring
        } else {
            Aio::Threads(FALLBACK_IO_THREADS)
        };
        let ok = |a, t, files| resolve_aio(a, t, files).map(|r| r.0);
        assert_eq!(ok(None, None, true), Ok(auto));
        assert_eq!(ok(None, None, false), Ok(Aio::Sync));
        assert_eq!(ok(None, Some(0), true), Ok(Aio::Sync));
        assert_eq!(ok(None, Some(3), true), Ok(Aio::Threads(3)));
        assert_eq!(ok(Some(AioArg::Sync), None, true), Ok(Aio::Sync));
        assert_eq!(
            ok(Some(AioArg::Threads), None, true),
            Ok(Aio::Threads(FALLBACK_IO_THREADS))
        );
        assert_eq!(
            ok(Some(AioArg::Threads), Some(2), false),
            Ok(Aio::Threads(2))
        );
        assert_eq!(ok(Some(AioArg::IoUring), None, true), Ok(auto));
        assert_eq!(ok(Some(AioArg::IoUring), None, false), Ok(Aio::Sync));
        assert!(resolve_aio(Some(AioArg::Sync), Some(2), true).is_err());
        assert!(resolve_aio(Some(AioArg::Threads), Some(0), true).is_err());
        assert!(resolve_aio(Some(AioArg::IoUring), Some(0), true).is_err());
        // The operator hears about io_uring only when it is missing.
        let note = resolve_aio(None, None, true).unwrap().1;
        assert_eq!(note.is_some(), io_uring_support().is_err());
    }
}
