//! Device models and their storage back ends.
//!
//! - [`storage`]: the [`storage::BlockBackend`] trait with a raw file and an
//!   in-memory implementation.
//! - [`guest_sg`]: scatter-gather lists of guest memory, translated once.
//! - [`block_io`]: block I/O between those lists and a back end, on the
//!   caller's thread or on I/O threads, for any storage device model.
//! - [`virtio`]: a virtio 1.x modern PCI transport that turns any
//!   [`virtio::VirtioDevice`] into a [`vfio_user_server::pci::PciDevice`].
//! - [`virtio_blk`]: a virtio block device over a `BlockBackend`.
//! - [`scsi`]: a SCSI disk over a `BlockBackend`, for any host bus adapter.
//! - [`megasas`]: an LSI MegaRAID SAS 1078 controller (MFI) whose logical
//!   drives are [`scsi::ScsiDisk`]s.
//!
//! Serving a disk image as a virtio-blk PCI function:
//!
//! ```
//! use std::sync::Arc;
//!
//! use backends::{MemoryDisk, VirtioBlkConfig, VirtioBlkPci};
//! use vfio_user_server::pci::PciAdapter;
//! use vfio_user_server::DeviceContext;
//!
//! let ctx = DeviceContext::default();
//! let disk = Arc::new(MemoryDisk::new(1 << 20)?);
//! let config = VirtioBlkConfig {
//!     num_queues: 2,
//!     queue_size: 256,
//!     read_only: false,
//!     ..Default::default()
//! };
//! let dev = VirtioBlkPci::new(ctx.clone(), disk, config)?;
//! let adapter = PciAdapter::new(dev)?;
//! # let _ = adapter;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod block_io;
pub mod guest_sg;
pub mod megasas;
pub mod net;
pub mod scsi;
pub mod storage;
pub mod virtio;
pub mod virtio_blk;
pub mod virtio_net;

pub use storage::{BlockBackend, MemoryDisk, RawFile, RawFileOptions};
pub use virtio::{VirtioDevice, VirtioPciDevice};
pub use virtio_blk::{VirtioBlk, VirtioBlkConfig, VirtioBlkError, VirtioBlkPci};
