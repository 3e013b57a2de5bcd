//! The device kinds the daemon serves. A kind is one file here (its
//! options, flattening [`CommonOptions`], and its `build`) and one
//! [`DeviceKind`] variant, which is also its subcommand.

pub mod megasas;
pub mod virtio_blk;
pub mod virtio_net;

use backends::block_io::{io_uring_support, Aio, FALLBACK_IO_THREADS};
use clap::{Subcommand, ValueEnum};
use vfio_user_server::{Device, DeviceContext};

use crate::cli::CommonOptions;

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
#[derive(Debug, Subcommand)]
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

    /// Builds the device.
    pub fn build(&self) -> Result<Built, String> {
        match self {
            DeviceKind::VirtioBlk(args) => virtio_blk::build(args),
            DeviceKind::VirtioNet(args) => virtio_net::build(args),
            DeviceKind::Megasas(args) => megasas::build(args),
        }
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
