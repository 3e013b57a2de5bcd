//! The device kinds the daemon serves. A kind is one file here (its
//! options, flattening [`CommonOptions`], and its `build`) and one
//! [`DeviceKind`] variant, which is also its subcommand.

pub mod virtio_blk;

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
}

/// The device kinds, one subcommand each.
#[derive(Debug, Subcommand)]
pub enum DeviceKind {
    /// Serves a virtio-blk PCI device: a raw image, or an in-memory disk
    VirtioBlk(virtio_blk::VirtioBlkArgs),
}

impl DeviceKind {
    /// The options every kind takes.
    pub fn common(&self) -> &CommonOptions {
        match self {
            DeviceKind::VirtioBlk(args) => &args.common,
        }
    }

    /// Builds the device.
    pub fn build(&self) -> Result<Built, String> {
        match self {
            DeviceKind::VirtioBlk(args) => virtio_blk::build(args),
        }
    }
}
