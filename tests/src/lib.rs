//! Socket-level tests of the vfio-user server: a raw client written
//! independently of the server's `wire` module ([`client`], [`proto`]), a
//! test device ([`device`]) and helpers to run servers ([`harness`]).
#![deny(missing_docs)]

pub mod client;
pub mod device;
pub mod harness;
pub mod proto;

pub use client::{le16, le32, le64, payload, RawClient, Reply};
pub use device::*;
pub use harness::*;
