//! `virtio-blk`: a disk, on a raw image or in memory.

use std::path::PathBuf;
use std::sync::Arc;

use backends::block_io::ErrorPolicy;
use backends::storage::{BlockBackend, MAX_IO_THREADS};
use backends::virtio_blk::{VirtioBlkConfig, VirtioBlkPci};
use clap::builder::{PossibleValuesParser, RangedU64ValueParser, TypedValueParser};
use clap::{value_parser, Args};
use vfio_user_server::pci::PciAdapter;
use vfio_user_server::DeviceContext;

use serde::{Deserialize, Serialize};

use super::{
    disk_fds, disk_from_fds, open_disk, parse_queue_size, resolve_aio, same_path, AioArg, Built,
    DeviceFds, DiskFds,
};
use crate::cli::CommonOptions;

/// Size of the default in-memory disk.
pub const DEFAULT_DISK_BYTES: u64 = 64 << 20;

/// Options of `virtio-blk`.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct VirtioBlkArgs {
    /// Raw image to serve (default: a 64 MiB in-memory disk)
    #[arg(long, value_name = "FILE")]
    pub disk: Option<PathBuf>,
    /// Refuse guest writes
    #[arg(long)]
    pub readonly: bool,
    /// Open the image with O_DIRECT: no host page cache; aligned
    /// requests go straight between the image and guest memory
    #[arg(long, verbatim_doc_comment)]
    pub direct: bool,
    /// Request queues, at most 16
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = value_parser!(u16).range(1..=16)
    )]
    pub num_queues: u16,
    /// Descriptors per queue: a power of two, at most 1024
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// How reads, writes and flushes (and discards) run: io_uring =
    /// in flight on an io_uring; threads = in flight on
    /// --io-threads threads; sync = on the event loop, one at a time.
    /// Default: the best the host has (io_uring, else threads; the
    /// start-up line says which)
    #[arg(
        long,
        value_name = "MODE",
        verbatim_doc_comment,
        hide_possible_values = true
    )]
    pub aio: Option<AioArg>,
    /// I/O threads of --aio threads (at most 64; default 4). Without
    /// --aio: 0 = --aio sync, N = --aio threads
    #[arg(
        long,
        value_name = "N",
        verbatim_doc_comment,
        value_parser = RangedU64ValueParser::<usize>::new().range(0..=MAX_IO_THREADS as u64)
    )]
    pub io_threads: Option<usize>,
    /// What a failed read, write or flush of the image (EIO, ENOSPC,
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
    /// The options every kind takes.
    #[command(flatten)]
    pub common: CommonOptions,
}

/// The fds a virtio-blk daemon hands over: its one image.
#[derive(Serialize, Deserialize)]
struct Layout {
    disk: DiskFds,
}

/// Builds the virtio-blk device described by `args`, on its image, or on
/// the image fd a running daemon handed over (`inherited`).
pub fn build(args: &VirtioBlkArgs, inherited: Option<DeviceFds>) -> Result<Built, String> {
    let disk = match inherited {
        None => open_disk(
            args.disk.as_deref(),
            args.readonly,
            args.direct,
            DEFAULT_DISK_BYTES,
        )?,
        Some(fds) => {
            let layout: Layout =
                serde_json::from_value(fds.layout).map_err(|e| format!("handed-over fds: {e}"))?;
            disk_from_fds(&layout.disk, &mut fds.files.into_iter(), args.readonly)?
        }
    };
    let (aio, aio_note) = resolve_aio(args.aio, args.io_threads, args.disk.is_some())?;
    let mut files = Vec::new();
    let layout = Layout {
        disk: disk_fds(&disk, &mut files)?,
    };
    let fds = DeviceFds {
        layout: serde_json::to_value(&layout).map_err(|e| e.to_string())?,
        files,
    };
    let what = match &args.disk {
        None => format!("a {} MiB in-memory disk", DEFAULT_DISK_BYTES >> 20),
        Some(path) => format!("{} ({} bytes)", path.display(), disk.size()),
    };
    let backend: Arc<dyn BlockBackend> = Arc::new(disk);
    let ctx = DeviceContext::default();
    let blk = VirtioBlkPci::new(
        ctx.clone(),
        backend,
        VirtioBlkConfig {
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            read_only: args.readonly,
            aio,
            on_error: args.on_error,
            ..Default::default()
        },
    )
    .map_err(|e| format!("cannot create virtio-blk: {e}"))?;
    let aio = blk.device().aio();
    let adapter = PciAdapter::new(blk).map_err(|e| format!("cannot create PCI device: {e}"))?;
    let ro = if args.readonly { ", read-only" } else { "" };
    let direct = if args.direct { ", O_DIRECT" } else { "" };
    let mut notes: Vec<String> = aio_note.into_iter().collect();
    if args.on_error == ErrorPolicy::Stop {
        notes.push(match &args.common.api_socket {
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
    Ok(Built {
        device: Box::new(adapter),
        ctx,
        description: format!(
            "virtio-blk on {what}{ro}{direct}, {} queue(s) of {} (aio: {aio}, on error: {})",
            args.num_queues, args.queue_size, args.on_error
        ),
        notes,
        fds,
    })
}

/// What an upgrade from `old` to `new` may not change: the image and how
/// it is served (the device state assumes them).
pub fn upgrade_refusals(old: &VirtioBlkArgs, new: &VirtioBlkArgs) -> Vec<String> {
    let mut out = Vec::new();
    let same_disk = match (&old.disk, &new.disk) {
        (None, None) => true,
        (Some(a), Some(b)) => same_path(a, b),
        _ => false,
    };
    if !same_disk {
        out.push("--disk (a different image)".to_string());
    }
    for (name, same) in [
        ("--readonly", old.readonly == new.readonly),
        ("--direct", old.direct == new.direct),
        ("--num-queues", old.num_queues == new.num_queues),
        ("--queue-size", old.queue_size == new.queue_size),
    ] {
        if !same {
            out.push(name.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use crate::cli::Cli;

    #[test]
    fn help_states_the_bounds_the_parser_enforces() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("virtio-blk")
            .map(|c| c.render_help().to_string())
            .unwrap_or_default();
        // The help text is a literal; this keeps it in step with backends.
        let bound = format!("at most {}", backends::storage::MAX_IO_THREADS);
        assert!(help.contains(&bound), "{help}");
        assert!(help.contains(&format!("{} MiB", super::DEFAULT_DISK_BYTES >> 20)));
    }
}
