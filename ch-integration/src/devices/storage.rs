//! What the storage kinds (virtio-blk, megasas) share: their options
//! besides the images, how they pick an I/O mode, and how their images
//! are opened and handed over in an upgrade.

use std::fs::File;
use std::path::Path;

use backends::block_io::{io_uring_support, Aio, ErrorPolicy, FALLBACK_IO_THREADS};
use backends::storage::{RawFile, MAX_IO_THREADS};
use clap::builder::{PossibleValuesParser, RangedU64ValueParser, TypedValueParser};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::cli::CommonOptions;

/// Options of every storage kind, besides its images.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct StorageOptions {
    /// Refuse guest writes
    #[arg(long)]
    pub readonly: bool,
    /// Open the images with O_DIRECT: no host page cache; aligned
    /// requests go straight between the images and guest memory
    #[arg(long, verbatim_doc_comment)]
    pub direct: bool,
    /// How reads, writes and flushes (and discards) run: io_uring =
    /// in flight on an io_uring (one per disk); threads = in flight
    /// on --io-threads threads (per disk); sync = on the event loop,
    /// one at a time. Default: the best the host has (io_uring, else
    /// threads; the start-up line says which)
    #[arg(
        long,
        value_name = "MODE",
        verbatim_doc_comment,
        hide_possible_values = true
    )]
    pub aio: Option<AioArg>,
    /// I/O threads of --aio threads, per disk (at most 64; default
    /// 4). Without --aio: 0 = --aio sync, N = --aio threads
    #[arg(
        long,
        value_name = "N",
        verbatim_doc_comment,
        value_parser = RangedU64ValueParser::<usize>::new().range(0..=MAX_IO_THREADS as u64)
    )]
    pub io_threads: Option<usize>,
    /// What a failed read, write or flush of an image (EIO, ENOSPC,
    /// ...) does: report = the guest gets an I/O error; stop = the
    /// request waits and the device takes no more (`api ... status`
    /// says why) until `api ... resume` retries it, once the storage
    /// is fixed (a full disk given room)
    #[arg(
        long,
        value_name = "POLICY",
        verbatim_doc_comment,
        hide_possible_values = true,
        default_value = "report",
        value_parser = PossibleValuesParser::new(["report", "stop"])
            .try_map(|s| s.parse::<ErrorPolicy>())
    )]
    pub on_error: ErrorPolicy,
}

impl StorageOptions {
    /// How the I/O runs ([`resolve_aio`]); `files` says whether the disks
    /// are image files.
    pub fn aio(&self, files: bool) -> Result<(Aio, Option<String>), String> {
        resolve_aio(self.aio, self.io_threads, files)
    }

    /// What the start-up line adds after the images: read-only, O_DIRECT.
    pub fn describe(&self) -> String {
        let ro = if self.readonly { ", read-only" } else { "" };
        let direct = if self.direct { ", O_DIRECT" } else { "" };
        format!("{ro}{direct}")
    }

    /// Lines for the operator: `aio_note` (from [`StorageOptions::aio`]),
    /// and how to resume a device that stops on errors.
    pub fn notes(&self, common: &CommonOptions, aio_note: Option<String>) -> Vec<String> {
        let mut notes: Vec<String> = aio_note.into_iter().collect();
        if self.on_error == ErrorPolicy::Stop {
            notes.push(match &common.api_socket {
                Some(api) => format!(
                    "On a storage error the device stops; once the storage is fixed, resume it \
                     with: vfio-user-device api --api-socket {} resume",
                    api.display()
                ),
                None => "On a storage error the device stops, and only the VMM can resume it \
                         (pass --api-socket to resume it from here)"
                    .to_string(),
            });
        }
        notes
    }

    /// What an upgrade from `self` to `new` may not change (the device
    /// state assumes how the images are served).
    pub fn upgrade_refusals(&self, new: &StorageOptions) -> Vec<String> {
        [
            ("--readonly", self.readonly == new.readonly),
            ("--direct", self.direct == new.direct),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| name.to_string())
        .collect()
    }
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
