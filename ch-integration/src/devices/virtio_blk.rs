//! `virtio-blk`: a disk, on a raw image or in memory.

use std::path::PathBuf;
use std::sync::Arc;

use backends::storage::BlockBackend;
use backends::virtio_blk::{VirtioBlkConfig, VirtioBlkPci};
use clap::{value_parser, Args};
use serde::{Deserialize, Serialize};
use vfio_user_server::pci::PciAdapter;
use vfio_user_server::DeviceContext;

use super::storage::{disk_fds, disk_from_fds, open_disk, DiskFds, StorageOptions};
use super::{parse_queue_size, same_path, Built, DeviceFds};
use crate::cli::CommonOptions;

/// Size of the default in-memory disk.
pub const DEFAULT_DISK_BYTES: u64 = 64 << 20;

/// Options of `virtio-blk`.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct VirtioBlkArgs {
    /// Raw image to serve (default: a 64 MiB in-memory disk)
    #[arg(long, value_name = "FILE")]
    pub disk: Option<PathBuf>,
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
    /// The options of every storage kind.
    #[command(flatten)]
    pub storage: StorageOptions,
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
            args.storage.readonly,
            args.storage.direct,
            DEFAULT_DISK_BYTES,
        )?,
        Some(fds) => {
            let layout: Layout =
                serde_json::from_value(fds.layout).map_err(|e| format!("handed-over fds: {e}"))?;
            disk_from_fds(
                &layout.disk,
                &mut fds.files.into_iter(),
                args.storage.readonly,
            )?
        }
    };
    let (aio, aio_note) = args.storage.aio(args.disk.is_some())?;
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
            read_only: args.storage.readonly,
            aio,
            on_error: args.storage.on_error,
            ..Default::default()
        },
    )
    .map_err(|e| format!("cannot create virtio-blk: {e}"))?;
    let aio = blk.device().aio();
    let adapter = PciAdapter::new(blk).map_err(|e| format!("cannot create PCI device: {e}"))?;
    let notes = args.storage.notes(&args.common, aio_note);
    Ok(Built {
        device: Box::new(adapter),
        ctx,
        description: format!(
            "virtio-blk on {what}{}, {} queue(s) of {} (aio: {aio}, on error: {})",
            args.storage.describe(),
            args.num_queues,
            args.queue_size,
            args.storage.on_error
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
    out.extend(old.storage.upgrade_refusals(&new.storage));
    for (name, same) in [
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
