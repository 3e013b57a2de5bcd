//! A vfio-user device server.
//!
//! The crate speaks the whole vfio-user protocol on behalf of a device
//! model: [`wire`] encodes and decodes every message, [`server`] runs the
//! per-client protocol state machine, [`event_loop`] serves any number of
//! devices, each on its own socket, from one epoll loop. Guest memory
//! ([`guest_memory`]) and interrupts ([`irq`]) are kept by the server and handed to
//! devices as bounds-checked handles. [`pci`] exports any device written
//! against a Cloud-Hypervisor-shaped `PciDevice` trait, and [`compat`] runs
//! a device written for the published `vfio_user::ServerBackend` trait.
#![deny(missing_docs)]

pub mod compat;
pub mod device;
pub mod event_loop;
pub mod guest_memory;
pub mod irq;
pub mod message_dma;
pub mod pci;
pub mod server;
pub mod sigbus;
pub mod socket;
pub mod state_stream;
pub mod vm_migration;
pub mod wire;

pub use device::{
    AsLifecycle, Device, DeviceContext, DeviceError, Interest, Lifecycle, RegionDescription,
    RegionMmap, ResetReason, WatchedFd,
};
pub use event_loop::{EventLoop, StopHandle};
pub use server::{MigState, Server, ServerConfig, ServerError};
