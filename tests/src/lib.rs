//! Socket-level tests of the vfio-user server: a raw client written
//! independently of the server's `wire` module ([`client`], [`proto`]), a
//! test device ([`device`]), helpers to run servers ([`harness`]) and the
//! virtio-pci driver that drives a device like a VMM's guest
//! ([`virtio_driver`]) through either client or in-process
//! ([`in_process`]), in guest RAM shared by DMA_MAP ([`guest_ram`]), and a
//! seccomp filter that takes io_uring away ([`seccomp`]); used
//! by the device tests of `backends`, `ch-integration`'s tests and the
//! virtio-blk benchmark.
#![deny(missing_docs)]

pub mod client;
pub mod device;
pub mod forwarding_disk;
pub mod guest_ram;
pub mod harness;
pub mod in_process;
pub mod proto;
pub mod seccomp;
pub mod transport;
pub mod virtio_driver;

pub use client::{le16, le32, le64, payload, RawClient, Reply};
pub use device::*;
pub use harness::*;
