//! The vfio-user wire format: constants and every message structure, with
//! explicit little-endian encoding and size-checked decoding.
//!
//! Offsets follow `docs/interop/vfio-user.rst`; payload offsets are relative
//! to the end of the 16-byte header.

use thiserror::Error;

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;

/// Command numbers.
pub mod cmd {
    /// Version negotiation.
    pub const VERSION: u16 = 1;
    /// Map guest memory.
    pub const DMA_MAP: u16 = 2;
    /// Unmap guest memory.
    pub const DMA_UNMAP: u16 = 3;
    /// Device information.
    pub const DEVICE_GET_INFO: u16 = 4;
    /// Region information.
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    /// Region I/O file descriptors (ioeventfds).
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    /// Interrupt information.
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    /// Interrupt configuration.
    pub const DEVICE_SET_IRQS: u16 = 8;
    /// Read from a region.
    pub const REGION_READ: u16 = 9;
    /// Write to a region.
    pub const REGION_WRITE: u16 = 10;
    /// Server-to-client guest memory read.
    pub const DMA_READ: u16 = 11;
    /// Server-to-client guest memory write.
    pub const DMA_WRITE: u16 = 12;
    /// Reset the device.
    pub const DEVICE_RESET: u16 = 13;
    /// Removed legacy dirty page command.
    pub const DIRTY_PAGES: u16 = 14;
    /// Several small region writes in one message.
    pub const REGION_WRITE_MULTI: u16 = 15;
    /// Device features (migration v2).
    pub const DEVICE_FEATURE: u16 = 16;
    /// Read migration data.
    pub const MIG_DATA_READ: u16 = 17;
    /// Write migration data.
    pub const MIG_DATA_WRITE: u16 = 18;
}

/// Header flag bits.
pub mod flags {
    /// Mask of the message type bits.
    pub const TYPE_MASK: u32 = 0xf;
    /// Message is a command.
    pub const TYPE_COMMAND: u32 = 0;
    /// Message is a reply.
    pub const TYPE_REPLY: u32 = 1;
    /// The sender expects no reply.
    pub const NO_REPLY: u32 = 0x10;
    /// The reply reports an error in `error_no`.
    pub const ERROR: u32 = 0x20;
}

/// `VFIO_DEVICE_FLAGS_*`.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// The device is a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `VFIO_REGION_INFO_FLAG_*`.
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// Region may be written.
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// Region may be mapped with the fd sent along the reply.
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// Region info carries a capability chain.
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
/// Sparse mmap capability id.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;

/// `VFIO_IRQ_INFO_*`.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// Vectors can be masked.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// Vectors mask themselves after firing (INTx).
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// The vector set cannot be resized while enabled.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// `VFIO_IRQ_SET_*` data types.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// Data is one boolean byte per vector.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// Data is one eventfd per vector, passed as SCM_RIGHTS.
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// Mask of the data type bits.
pub const IRQ_SET_DATA_TYPE_MASK: u32 = 0x7;
/// Mask vectors.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// Unmask vectors.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// Trigger vectors or install their eventfds.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// Mask of the action bits.
pub const IRQ_SET_ACTION_TYPE_MASK: u32 = 0x38;

/// `VFIO_DMA_MAP_FLAG_READ`.
pub const DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// The device may write the region.
pub const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP` (legacy, refused).
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// Unmap every region.
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// PCI region indices.
pub const PCI_BAR0_REGION_INDEX: u32 = 0;
/// Expansion ROM region.
pub const PCI_ROM_REGION_INDEX: u32 = 6;
/// Config space region.
pub const PCI_CONFIG_REGION_INDEX: u32 = 7;
/// VGA region.
pub const PCI_VGA_REGION_INDEX: u32 = 8;
/// Number of PCI regions.
pub const PCI_NUM_REGIONS: u32 = 9;

/// PCI IRQ indices.
pub const PCI_INTX_IRQ_INDEX: u32 = 0;
/// MSI.
pub const PCI_MSI_IRQ_INDEX: u32 = 1;
/// MSI-X.
pub const PCI_MSIX_IRQ_INDEX: u32 = 2;
/// Error notification.
pub const PCI_ERR_IRQ_INDEX: u32 = 3;
/// Device request notification.
pub const PCI_REQ_IRQ_INDEX: u32 = 4;
/// Number of PCI IRQ indices.
pub const PCI_NUM_IRQS: u32 = 5;

/// `VFIO_DEVICE_FEATURE_*`.
pub const DEVICE_FEATURE_MASK: u32 = 0xffff;
/// Get the feature.
pub const DEVICE_FEATURE_GET: u32 = 1 << 16;
/// Set the feature.
pub const DEVICE_FEATURE_SET: u32 = 1 << 17;
/// Probe for support.
pub const DEVICE_FEATURE_PROBE: u32 = 1 << 18;
/// Migration capability flags.
pub const DEVICE_FEATURE_MIGRATION: u32 = 1;
/// Migration device state.
pub const DEVICE_FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// Start dirty page logging.
pub const DEVICE_FEATURE_DMA_LOGGING_START: u32 = 6;
/// Stop dirty page logging.
pub const DEVICE_FEATURE_DMA_LOGGING_STOP: u32 = 7;
/// Report dirty pages.
pub const DEVICE_FEATURE_DMA_LOGGING_REPORT: u32 = 8;

/// `VFIO_MIGRATION_STOP_COPY`.
pub const MIGRATION_STOP_COPY: u64 = 1;
/// `VFIO_MIGRATION_PRE_COPY`.
pub const MIGRATION_PRE_COPY: u64 = 4;

/// Default `max_data_xfer_size`.
pub const DEFAULT_MAX_DATA_XFER_SIZE: u32 = 1 << 20;

/// Errors decoding a message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    /// Fewer bytes than the structure needs.
    #[error("message too short: need {need} bytes, have {have}")]
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
}

/// Reads a little-endian u16 at `off`; the caller checked the length.
fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Reads a little-endian u32 at `off`; the caller checked the length.
fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

/// Reads a little-endian u64 at `off`; the caller checked the length.
fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn need(b: &[u8], n: usize) -> Result<(), WireError> {
    if b.len() < n {
        Err(WireError::Short {
            need: n,
            have: b.len(),
        })
    } else {
        Ok(())
    }
}

/// A little-endian integer field of a wire structure.
trait LeField: Sized {
    fn get(b: &[u8], off: usize) -> Self;
    fn put(self, b: &mut [u8], off: usize);
}

impl LeField for u32 {
    fn get(b: &[u8], off: usize) -> Self {
        u32_at(b, off)
    }
    fn put(self, b: &mut [u8], off: usize) {
        b[off..off + 4].copy_from_slice(&self.to_le_bytes());
    }
}

impl LeField for u64 {
    fn get(b: &[u8], off: usize) -> Self {
        u64_at(b, off)
    }
    fn put(self, b: &mut [u8], off: usize) {
        b[off..off + 8].copy_from_slice(&self.to_le_bytes());
    }
}

/// Defines a fixed-size wire structure of little-endian integer fields at
/// explicit offsets, with a size-checked `decode` and an `encode`.
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        $name:ident, $size:literal {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ident @ $off:expr, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $name {
            /// Encoded size.
            pub const SIZE: usize = $size;

            /// Decodes from the start of `b`.
            pub fn decode(b: &[u8]) -> Result<Self, WireError> {
                need(b, Self::SIZE)?;
                Ok($name { $( $field: <$ty as LeField>::get(b, $off), )* })
            }

            /// Encodes the structure.
            pub fn encode(&self) -> Vec<u8> {
                let mut out = vec![0u8; Self::SIZE];
                self.encode_into(&mut out);
                out
            }

            /// Encodes into the first [`Self::SIZE`] bytes of `out`
            /// (which must hold them).
            pub fn encode_into(&self, out: &mut [u8]) {
                $( LeField::put(self.$field, out, $off); )*
            }
        }
    };
}

/// Little-endian writer over a growing buffer.
#[derive(Default)]
pub struct Encoder(pub Vec<u8>);

impl Encoder {
    /// Appends a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends raw bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// The 16-byte message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Message id, chosen by the sender of a command.
    pub msg_id: u16,
    /// Command number.
    pub cmd: u16,
    /// Size of the whole message including the header.
    pub msg_size: u32,
    /// Type and flag bits.
    pub flags: u32,
    /// errno of an error reply.
    pub error_no: u32,
}

impl Header {
    /// Decodes a header from the first 16 bytes of `b`.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        need(b, HEADER_SIZE)?;
        Ok(Header {
            msg_id: u16_at(b, 0),
            cmd: u16_at(b, 2),
            msg_size: u32_at(b, 4),
            flags: u32_at(b, 8),
            error_no: u32_at(b, 12),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        out[2..4].copy_from_slice(&self.cmd.to_le_bytes());
        out[4..8].copy_from_slice(&self.msg_size.to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..16].copy_from_slice(&self.error_no.to_le_bytes());
        out
    }

    /// The message type bits.
    pub fn msg_type(&self) -> u32 {
        self.flags & flags::TYPE_MASK
    }

    /// Whether the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & flags::NO_REPLY != 0
    }

    /// A success reply header for this command carrying `payload_len` bytes.
    pub fn reply(&self, payload_len: usize) -> Header {
        Header {
            msg_id: self.msg_id,
            cmd: self.cmd,
            msg_size: (HEADER_SIZE + payload_len) as u32,
            flags: flags::TYPE_REPLY,
            error_no: 0,
        }
    }

    /// A header-only error reply for this command.
    pub fn error_reply(&self, errno: i32) -> Header {
        // A zero errno reads as success to QEMU: never send it.
        let errno = if errno <= 0 { libc::EINVAL } else { errno };
        Header {
            msg_id: self.msg_id,
            cmd: self.cmd,
            msg_size: HEADER_SIZE as u32,
            flags: flags::TYPE_REPLY | flags::ERROR,
            error_no: errno as u32,
        }
    }
}

/// VERSION payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// JSON bytes, without the terminating NUL (empty if absent).
    pub json: Vec<u8>,
}

/// Reasons a VERSION payload is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VersionError {
    /// Too short.
    #[error(transparent)]
    Short(#[from] WireError),
    /// JSON not NUL-terminated.
    #[error("version JSON is not NUL-terminated")]
    Unterminated,
    /// NUL inside the JSON.
    #[error("version JSON contains an embedded NUL")]
    EmbeddedNul,
}

impl Version {
    /// Decodes a VERSION payload.
    pub fn decode(b: &[u8]) -> Result<Self, VersionError> {
        need(b, 4)?;
        let rest = &b[4..];
        let json = match rest.split_last() {
            None => Vec::new(),
            Some((0, body)) => {
                if body.contains(&0) {
                    return Err(VersionError::EmbeddedNul);
                }
                body.to_vec()
            }
            Some(_) => return Err(VersionError::Unterminated),
        };
        Ok(Version {
            major: u16_at(b, 0),
            minor: u16_at(b, 2),
            json,
        })
    }

    /// Encodes the payload with a NUL-terminated JSON.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u16(self.major)
            .u16(self.minor)
            .bytes(&self.json)
            .bytes(&[0]);
        e.0
    }
}

wire_struct! {
    /// DMA_MAP payload (32 bytes).
    DmaMap, 32 {
        /// Argument size (32).
        argsz: u32 @ 0,
        /// READ/WRITE flags.
        flags: u32 @ 4,
        /// Offset into the passed fd.
        offset: u64 @ 8,
        /// Guest (IOVA) address.
        address: u64 @ 16,
        /// Size in bytes.
        size: u64 @ 24,
    }
}

wire_struct! {
    /// DMA_UNMAP payload (24 bytes), also the reply.
    DmaUnmap, 24 {
        /// Argument size.
        argsz: u32 @ 0,
        /// Flags (`DMA_UNMAP_FLAG_*`).
        flags: u32 @ 4,
        /// Guest address.
        address: u64 @ 8,
        /// Size in bytes.
        size: u64 @ 16,
    }
}

wire_struct! {
    /// DEVICE_GET_INFO payload (16 bytes).
    DeviceInfo, 16 {
        /// Argument size.
        argsz: u32 @ 0,
        /// `DEVICE_FLAGS_*`.
        flags: u32 @ 4,
        /// Number of regions.
        num_regions: u32 @ 8,
        /// Number of IRQ indices.
        num_irqs: u32 @ 12,
    }
}

wire_struct! {
    /// DEVICE_GET_REGION_INFO fixed part (32 bytes).
    RegionInfo, 32 {
        /// Argument size.
        argsz: u32 @ 0,
        /// `REGION_INFO_FLAG_*`.
        flags: u32 @ 4,
        /// Region index.
        index: u32 @ 8,
        /// Offset of the first capability.
        cap_offset: u32 @ 12,
        /// Region size.
        size: u64 @ 16,
        /// mmap offset into the fd.
        offset: u64 @ 24,
    }
}

/// Encodes a sparse mmap capability with `next` = 0.
pub fn encode_sparse_mmap_cap(areas: &[(u64, u64)]) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u16(REGION_INFO_CAP_SPARSE_MMAP)
        .u16(1)
        .u32(0)
        .u32(areas.len() as u32)
        .u32(0);
    for (off, size) in areas {
        e.u64(*off).u64(*size);
    }
    e.0
}

wire_struct! {
    /// DEVICE_GET_REGION_IO_FDS request head (16 bytes).
    RegionIoFds, 16 {
        /// Argument size.
        argsz: u32 @ 0,
        /// Flags (must be 0).
        flags: u32 @ 4,
        /// Region index.
        index: u32 @ 8,
        /// Count (0 in the request).
        count: u32 @ 12,
    }
}

wire_struct! {
    /// DEVICE_GET_IRQ_INFO payload (16 bytes).
    IrqInfo, 16 {
        /// Argument size.
        argsz: u32 @ 0,
        /// `IRQ_INFO_*`.
        flags: u32 @ 4,
        /// IRQ index.
        index: u32 @ 8,
        /// Number of vectors.
        count: u32 @ 12,
    }
}

wire_struct! {
    /// DEVICE_SET_IRQS fixed part (20 bytes).
    IrqSet, 20 {
        /// Argument size.
        argsz: u32 @ 0,
        /// Data type and action bits.
        flags: u32 @ 4,
        /// IRQ index.
        index: u32 @ 8,
        /// First vector.
        start: u32 @ 12,
        /// Number of vectors.
        count: u32 @ 16,
    }
}

wire_struct! {
    /// REGION_READ / REGION_WRITE head (16 bytes); data follows.
    RegionAccess, 16 {
        /// Offset in the region.
        offset: u64 @ 0,
        /// Region index.
        region: u32 @ 8,
        /// Byte count.
        count: u32 @ 12,
    }
}

/// One record of REGION_WRITE_MULTI (24 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteMultiRecord {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes used of `data` (at most 8).
    pub count: u32,
    /// Data bytes.
    pub data: [u8; 8],
}

impl WriteMultiRecord {
    /// Encoded size.
    pub const SIZE: usize = 24;
    /// Largest `count` of one record.
    pub const MAX_DATA: u32 = 8;

    /// Decodes one record.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        need(b, Self::SIZE)?;
        let mut data = [0u8; 8];
        data.copy_from_slice(&b[16..24]);
        Ok(WriteMultiRecord {
            offset: u64_at(b, 0),
            region: u32_at(b, 8),
            count: u32_at(b, 12),
            data,
        })
    }

    /// Encodes one record.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u64(self.offset)
            .u32(self.region)
            .u32(self.count)
            .bytes(&self.data);
        e.0
    }
}

wire_struct! {
    /// Server-to-client DMA_READ/DMA_WRITE head, spec layout (16 bytes).
    DmaAccess, 16 {
        /// Guest address.
        address: u64 @ 0,
        /// Byte count.
        count: u64 @ 8,
    }
}

wire_struct! {
    /// DEVICE_FEATURE head (8 bytes); feature data follows.
    DeviceFeature, 8 {
        /// Argument size.
        argsz: u32 @ 0,
        /// Feature index and GET/SET/PROBE bits.
        flags: u32 @ 4,
    }
}

wire_struct! {
    /// MIG_DATA_READ / MIG_DATA_WRITE head (8 bytes); data follows.
    MigData, 8 {
        /// Argument size.
        argsz: u32 @ 0,
        /// Data size.
        size: u32 @ 4,
    }
}

/// Reads a little-endian u32 at `off` of `b`, if present.
pub fn read_u32(b: &[u8], off: usize) -> Result<u32, WireError> {
    need(b, off.saturating_add(4))?;
    Ok(u32_at(b, off))
}

/// Reads a little-endian u64 at `off` of `b`, if present.
pub fn read_u64(b: &[u8], off: usize) -> Result<u64, WireError> {
    need(b, off.saturating_add(8))?;
    Ok(u64_at(b, off))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            msg_id: 7,
            cmd: cmd::REGION_READ,
            msg_size: 32,
            flags: flags::NO_REPLY,
            error_no: 0,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        assert_eq!(h.encode()[4], 32);
    }

    #[test]
    fn short_input_is_refused() {
        assert_eq!(
            Header::decode(&[0; 15]),
            Err(WireError::Short { need: 16, have: 15 })
        );
        assert!(DmaMap::decode(&[0; 31]).is_err());
        assert!(IrqSet::decode(&[0; 19]).is_err());
        assert!(read_u64(&[0; 8], usize::MAX).is_err());
    }

    #[test]
    fn version_json_must_be_terminated() {
        assert_eq!(
            Version::decode(&[0, 0, 1, 0, b'{', b'}']),
            Err(VersionError::Unterminated)
        );
        assert_eq!(
            Version::decode(&[0, 0, 1, 0, b'{', 0, b'}', 0]),
            Err(VersionError::EmbeddedNul)
        );
        let v = Version::decode(&[0, 0, 1, 0, b'{', b'}', 0]).unwrap();
        assert_eq!(v.minor, 1);
        assert_eq!(v.json, b"{}");
        assert!(Version::decode(&[0, 0, 1, 0]).unwrap().json.is_empty());
    }

    #[test]
    fn error_reply_never_carries_zero() {
        let h = Header::default().error_reply(0);
        assert_eq!(h.error_no, libc::EINVAL as u32);
        assert_eq!(h.flags, flags::TYPE_REPLY | flags::ERROR);
    }
}
