//! Server settings.

use std::time::Duration;

use crate::guest_memory::DmaLimits;
use crate::wire::{RegionAccess, DEFAULT_MAX_DATA_XFER_SIZE, HEADER_SIZE};

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest REGION_READ/WRITE, MIG_DATA size we receive.
    pub max_data_xfer_size: u32,
    /// DMA limits.
    pub dma_limits: DmaLimits,
    /// Advertise and accept REGION_WRITE_MULTI.
    pub write_multiple: bool,
    /// Mode of the socket file.
    pub socket_mode: u32,
    /// Largest migration stream accepted in RESUMING (and largest snapshot
    /// file read).
    pub max_migration_bytes: usize,
    /// Replies queued for a client that does not read before we stop
    /// reading it.
    pub max_queued_reply_bytes: usize,
    /// How long a client has after connecting to finish VERSION before it
    /// is dropped (`None`: forever). A negotiated client never times out.
    pub handshake_timeout: Option<Duration>,
}

/// Default of [`ServerConfig::handshake_timeout`]: VMMs send VERSION as
/// soon as they connect.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Default of [`ServerConfig::max_migration_bytes`].
pub const DEFAULT_MAX_MIGRATION_BYTES: usize = 16 << 20;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            dma_limits: DmaLimits::default(),
            write_multiple: true,
            socket_mode: 0o600,
            // A device's state is KiBs to a few MiB; parsing it can take
            // many times its size (serde's buffering of unknown fields).
            max_migration_bytes: DEFAULT_MAX_MIGRATION_BYTES,
            max_queued_reply_bytes: 4 << 20,
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
        }
    }
}

impl ServerConfig {
    /// Largest message we accept: a region write of the maximum size.
    pub fn max_msg_size(&self) -> usize {
        HEADER_SIZE + RegionAccess::SIZE + self.max_data_xfer_size as usize
    }
}
