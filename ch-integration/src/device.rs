//! Builds the device the daemon serves from its options.

use std::sync::Arc;

use backends::storage::{BlockBackend, MemoryDisk, RawFile, RawFileOptions};
use backends::virtio_blk::{VirtioBlkConfig, VirtioBlkPci};
use vfio_user_server::pci::PciAdapter;
use vfio_user_server::{Device, DeviceContext};

use crate::cli::Options;

/// Size of the default in-memory disk.
pub const DEFAULT_DISK_BYTES: u64 = 64 << 20;

/// A device ready to serve.
pub struct Built {
    /// The device.
    pub device: Box<dyn Device>,
    /// The context it was built with.
    pub ctx: DeviceContext,
    /// One line for the operator.
    pub description: String,
}

/// Builds the virtio-blk device described by `opts`.
pub fn build(opts: &Options) -> Result<Built, String> {
    let (backend, what): (Arc<dyn BlockBackend>, String) = match &opts.disk {
        None => (
            Arc::new(MemoryDisk::new(DEFAULT_DISK_BYTES).map_err(|e| e.to_string())?),
            format!("a {} MiB in-memory disk", DEFAULT_DISK_BYTES >> 20),
        ),
        Some(path) => {
            let file = RawFile::open(
                path,
                RawFileOptions {
                    read_only: opts.readonly,
                    direct: opts.direct,
                },
            )
            .map_err(|e| format!("cannot open disk {}: {e}", path.display()))?;
            let size = file.size();
            (
                Arc::new(file),
                format!("{} ({} bytes)", path.display(), size),
            )
        }
    };
    let ctx = DeviceContext::default();
    let blk = VirtioBlkPci::new(
        ctx.clone(),
        backend,
        VirtioBlkConfig {
            num_queues: opts.num_queues,
            queue_size: opts.queue_size,
            read_only: opts.readonly,
            io_threads: opts.io_threads,
            ..Default::default()
        },
    )
    .map_err(|e| format!("cannot create virtio-blk: {e}"))?;
    let adapter = PciAdapter::new(blk).map_err(|e| format!("cannot create PCI device: {e}"))?;
    let ro = if opts.readonly { ", read-only" } else { "" };
    Ok(Built {
        device: Box::new(adapter),
        ctx,
        description: format!(
            "virtio-blk on {what}{ro}, {} queue(s) of {} ({})",
            opts.num_queues,
            opts.queue_size,
            match opts.io_threads {
                0 => "no I/O threads".to_string(),
                n => format!("{n} I/O thread(s)"),
            }
        ),
    })
}
