//! Socket-level tests of the vfio-user server: a raw client written
//! independently of the server's `wire` module ([`client`], [`proto`]), a
//! test device ([`device`]), helpers to run servers ([`harness`]) and a
//! virtio-pci driver that drives a device through either client like a
//! VMM's guest ([`virtio_driver`]; used by `ch-integration`'s tests and the
//! virtio-blk benchmark).
#![deny(missing_docs)]

pub mod client;
pub mod device;
pub mod harness;
pub mod proto;
pub mod virtio_driver;

pub use client::{le16, le32, le64, payload, RawClient, Reply};
pub use device::*;
pub use harness::*;
