#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod compat;
pub mod device;
pub mod event_loop;
pub mod guest_memory;
pub mod irq;
pub mod log_limit;
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
pub use server::{
    Handover, HandoverError, HandoverState, MigState, Server, ServerConfig, ServerError,
    HANDOVER_FORMAT,
};
