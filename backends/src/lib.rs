//! Device models and their storage back ends.
//!
//! - [`storage`]: the [`storage::BlockBackend`] trait with a raw file and an
//!   in-memory implementation.
//! - [`virtio`]: a virtio 1.x modern PCI transport that turns any
//!   [`virtio::VirtioDevice`] into a [`vfio_user_server::pci::PciDevice`].
//! - [`virtio_blk`]: a virtio block device over a `BlockBackend`.
#![deny(missing_docs)]

pub mod storage;
