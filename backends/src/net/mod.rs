//! Network back ends: a TAP interface with virtio-net headers.

mod tap;

pub use tap::{offload_flags, Tap, TapError, MAX_TAP_QUEUES, VNET_HDR_LEN};
