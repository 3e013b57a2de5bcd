//! The device kinds the daemon serves. A kind is one file here (its
//! options, flattening [`CommonOptions`], and its `build`) and one
//! [`DeviceKind`] variant, which is also its subcommand.

pub mod megasas;
pub mod virtio_blk;
pub mod virtio_net;

use clap::Subcommand;
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
