//! The device kinds the daemon serves. A kind is one file here (its
//! options, flattening [`CommonOptions`], its `build`, and which options an
//! upgrade may change) and one [`DeviceKind`] variant, which is also its
//! subcommand.
//!
//! Every kind builds either from its options (opening its image or TAP)
//! or from the fds a running daemon hands over in an upgrade
//! ([`DeviceFds`]), and lists the fds it would hand over itself.

pub mod megasas;
pub mod storage;
pub mod virtio_blk;
pub mod virtio_net;

use std::fs::File;
use std::path::Path;

use clap::Subcommand;
use vfio_user_server::{Device, DeviceContext};

use crate::cli::CommonOptions;

/// A device's own fds (images, TAP queues), as a daemon hands them over in
/// an upgrade: how the kind rebuilds its back ends from them, and the fds.
#[derive(Debug, Default)]
pub struct DeviceFds {
    /// What the fds are, per kind (JSON).
    pub layout: serde_json::Value,
    /// The fds, in the order the layout gives.
    pub files: Vec<File>,
}

impl DeviceFds {
    /// Duplicates of the fds, for another process.
    pub fn try_clone(&self) -> std::io::Result<DeviceFds> {
        Ok(DeviceFds {
            layout: self.layout.clone(),
            files: self
                .files
                .iter()
                .map(File::try_clone)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Whether two paths name the same file as given (relative ones resolved
/// against the working directory, which the new daemon shares).
pub fn same_path(a: &Path, b: &Path) -> bool {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    abs(a) == abs(b)
}

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
    /// Duplicates of the device's own fds, for an upgrade.
    pub fds: DeviceFds,
}

/// Parses a queue size: a power of two from 2 to 1024.
pub fn parse_queue_size(v: &str) -> Result<u16, String> {
    v.parse::<u16>()
        .ok()
        .filter(|n| n.is_power_of_two() && (2..=1024).contains(n))
        .ok_or_else(|| "not a power of two from 2 to 1024".to_string())
}

/// The device kinds, one subcommand each.
#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
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

    /// The kind's name (its subcommand).
    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::VirtioBlk(_) => "virtio-blk",
            DeviceKind::VirtioNet(_) => "virtio-net",
            DeviceKind::Megasas(_) => "megasas",
        }
    }

    /// Builds the device from its options, or on the fds a running daemon
    /// handed over (`inherited`).
    pub fn build(&self, inherited: Option<DeviceFds>) -> Result<Built, String> {
        match self {
            DeviceKind::VirtioBlk(args) => virtio_blk::build(args, inherited),
            DeviceKind::VirtioNet(args) => virtio_net::build(args, inherited),
            DeviceKind::Megasas(args) => megasas::build(args, inherited),
        }
    }

    /// The options of `new` that an upgrade from `self` may not change,
    /// each with why; empty if the upgrade is safe. Changing I/O threads,
    /// the error policy, busy polling, the log level or the handshake
    /// timeout is; serving something else (another image, TAP, queue
    /// layout, kind) or elsewhere is not.
    pub fn upgrade_refusals(&self, new: &DeviceKind) -> Vec<String> {
        let mut out = Vec::new();
        let (a, b) = (self.common(), new.common());
        if a.socket != b.socket {
            out.push("--socket (the client is connected to this one)".to_string());
        }
        if a.socket_mode != b.socket_mode {
            out.push("--socket-mode (the socket file exists already)".to_string());
        }
        if a.api_socket != b.api_socket {
            out.push("--api-socket (it is handed over as it is)".to_string());
        }
        let kind = match (self, new) {
            (DeviceKind::VirtioBlk(a), DeviceKind::VirtioBlk(b)) => {
                virtio_blk::upgrade_refusals(a, b)
            }
            (DeviceKind::VirtioNet(a), DeviceKind::VirtioNet(b)) => {
                virtio_net::upgrade_refusals(a, b)
            }
            (DeviceKind::Megasas(a), DeviceKind::Megasas(b)) => megasas::upgrade_refusals(a, b),
            _ => vec![format!(
                "the device kind ({} -> {})",
                self.name(),
                new.name()
            )],
        };
        out.extend(kind);
        out
    }
}
