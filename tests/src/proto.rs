//! Protocol constants, written down independently of the server's `wire`
//! module (from the vfio-user specification and `<linux/vfio.h>`).

/// Size of the message header.
pub const HDR: usize = 16;

/// Command numbers.
pub mod cmd {
    /// VFIO_USER_VERSION.
    pub const VERSION: u16 = 1;
    /// VFIO_USER_DMA_MAP.
    pub const DMA_MAP: u16 = 2;
    /// VFIO_USER_DMA_UNMAP.
    pub const DMA_UNMAP: u16 = 3;
    /// VFIO_USER_DEVICE_GET_INFO.
    pub const GET_INFO: u16 = 4;
    /// VFIO_USER_DEVICE_GET_REGION_INFO.
    pub const REGION_INFO: u16 = 5;
    /// VFIO_USER_DEVICE_GET_REGION_IO_FDS.
    pub const REGION_IO_FDS: u16 = 6;
    /// VFIO_USER_DEVICE_GET_IRQ_INFO.
    pub const IRQ_INFO: u16 = 7;
    /// VFIO_USER_DEVICE_SET_IRQS.
    pub const SET_IRQS: u16 = 8;
    /// VFIO_USER_REGION_READ.
    pub const REGION_READ: u16 = 9;
    /// VFIO_USER_REGION_WRITE.
    pub const REGION_WRITE: u16 = 10;
    /// VFIO_USER_DMA_READ (server to client).
    pub const DMA_READ: u16 = 11;
    /// VFIO_USER_DMA_WRITE (server to client).
    pub const DMA_WRITE: u16 = 12;
    /// VFIO_USER_DEVICE_RESET.
    pub const RESET: u16 = 13;
    /// The removed VFIO_USER_DIRTY_PAGES.
    pub const DIRTY_PAGES: u16 = 14;
    /// VFIO_USER_REGION_WRITE_MULTI.
    pub const WRITE_MULTI: u16 = 15;
    /// VFIO_USER_DEVICE_FEATURE.
    pub const DEVICE_FEATURE: u16 = 16;
    /// VFIO_USER_MIG_DATA_READ.
    pub const MIG_DATA_READ: u16 = 17;
    /// VFIO_USER_MIG_DATA_WRITE.
    pub const MIG_DATA_WRITE: u16 = 18;
}

/// Header flags.
pub mod hflags {
    /// Type bits.
    pub const TYPE_MASK: u32 = 0xf;
    /// A command.
    pub const COMMAND: u32 = 0;
    /// A reply.
    pub const REPLY: u32 = 1;
    /// No reply wanted.
    pub const NO_REPLY: u32 = 0x10;
    /// Error reply.
    pub const ERROR: u32 = 0x20;
}

/// `VFIO_DEVICE_FLAGS_RESET`.
pub const DEVICE_FLAGS_RESET: u32 = 1;
/// `VFIO_DEVICE_FLAGS_PCI`.
pub const DEVICE_FLAGS_PCI: u32 = 2;

/// `VFIO_REGION_INFO_FLAG_READ`.
pub const REGION_READ: u32 = 1;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const REGION_WRITE: u32 = 2;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
pub const REGION_MMAP: u32 = 4;
/// `VFIO_REGION_INFO_FLAG_CAPS`.
pub const REGION_CAPS: u32 = 8;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
pub const CAP_SPARSE_MMAP: u16 = 1;

/// `VFIO_IRQ_INFO_EVENTFD`.
pub const IRQ_INFO_EVENTFD: u32 = 1;
/// `VFIO_IRQ_INFO_MASKABLE`.
pub const IRQ_INFO_MASKABLE: u32 = 2;
/// `VFIO_IRQ_INFO_AUTOMASKED`.
pub const IRQ_INFO_AUTOMASKED: u32 = 4;
/// `VFIO_IRQ_INFO_NORESIZE`.
pub const IRQ_INFO_NORESIZE: u32 = 8;

/// `VFIO_IRQ_SET_DATA_NONE`.
pub const IRQ_DATA_NONE: u32 = 1;
/// `VFIO_IRQ_SET_DATA_BOOL`.
pub const IRQ_DATA_BOOL: u32 = 2;
/// `VFIO_IRQ_SET_DATA_EVENTFD`.
pub const IRQ_DATA_EVENTFD: u32 = 4;
/// `VFIO_IRQ_SET_ACTION_MASK`.
pub const IRQ_ACTION_MASK: u32 = 8;
/// `VFIO_IRQ_SET_ACTION_UNMASK`.
pub const IRQ_ACTION_UNMASK: u32 = 0x10;
/// `VFIO_IRQ_SET_ACTION_TRIGGER`.
pub const IRQ_ACTION_TRIGGER: u32 = 0x20;

/// PCI IRQ index of INTx.
pub const IRQ_INTX: u32 = 0;
/// PCI IRQ index of MSI.
pub const IRQ_MSI: u32 = 1;
/// PCI IRQ index of MSI-X.
pub const IRQ_MSIX: u32 = 2;
/// PCI IRQ index of ERR.
pub const IRQ_ERR: u32 = 3;
/// PCI IRQ index of REQ.
pub const IRQ_REQ: u32 = 4;

/// `VFIO_DMA_MAP_FLAG_READ`.
pub const DMA_READ: u32 = 1;
/// `VFIO_DMA_MAP_FLAG_WRITE`.
pub const DMA_WRITE: u32 = 2;
/// `VFIO_DMA_UNMAP_FLAG_ALL`.
pub const UNMAP_ALL: u32 = 2;

/// PCI region index of the config space.
pub const CONFIG_REGION: u32 = 7;

/// `VFIO_DEVICE_FEATURE_GET`.
pub const FEATURE_GET: u32 = 1 << 16;
/// `VFIO_DEVICE_FEATURE_SET`.
pub const FEATURE_SET: u32 = 1 << 17;
/// `VFIO_DEVICE_FEATURE_PROBE`.
pub const FEATURE_PROBE: u32 = 1 << 18;
/// `VFIO_DEVICE_FEATURE_MIGRATION`.
pub const FEATURE_MIGRATION: u32 = 1;
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`.
pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
