//! Parsing of virtio-blk requests.
//!
//! A request is a descriptor chain: device-readable buffers holding the
//! 16-byte `virtio_blk_outhdr` and any data to write, then device-writable
//! buffers for data to read and, in their last byte, the status. Buffers
//! are treated as scatter-gather lists ([`SgList`]) without framing
//! assumptions. Every guest address is checked against guest memory before
//! use; a malformed request fails with `VIRTIO_BLK_S_IOERR` and never
//! panics.

use thiserror::Error;
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::guest_sg::{Segment, SgList};
use crate::virtio::GuestMemory;

/// Size of `struct virtio_blk_outhdr`.
pub(super) const OUTHDR_SIZE: u64 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const DWZ_SEGMENT_SIZE: u64 = 16;
/// Log2 of the virtio-blk sector size.
pub(super) const SECTOR_SHIFT: u32 = 9;
/// The virtio-blk sector size.
pub(super) const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// Status byte values.
pub(super) const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// I/O error.
pub(super) const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Unsupported request.
pub(super) const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// A chain, split into its device-readable and device-writable buffers
/// and translated.
#[derive(Debug)]
pub(super) struct Request<'m> {
    /// Device-readable buffers: the header, then any data to write.
    pub(super) readable: SgList<'m>,
    /// Device-writable buffers for data, without the status byte.
    pub(super) writable: SgList<'m>,
    /// The status byte: the last device-writable byte.
    pub(super) status: Option<Segment<'m>>,
    /// A readable buffer follows a writable one, or a buffer lies (partly)
    /// outside guest memory: the request fails with IOERR.
    pub(super) malformed: bool,
}

/// Why a chain cannot even be failed with a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub(super) enum BadChain {
    /// More descriptors than the device accepts.
    #[error("too long")]
    TooLong,
    /// No device-writable byte in guest memory for the status.
    #[error("no status byte")]
    NoStatus,
}

impl<'m> Request<'m> {
    /// An empty request, to parse a chain of `mem` into.
    pub(super) fn new(mem: &'m GuestMemory) -> Self {
        Request {
            readable: SgList::new(mem),
            writable: SgList::new(mem),
            status: None,
            malformed: false,
        }
    }

    /// Splits and translates `descriptors` (at most `max` of them) into
    /// this request, which must be empty (parsing in place spares moving
    /// the request around: it holds its lists inline).
    pub(super) fn parse<I>(&mut self, descriptors: I, max: usize) -> Result<(), BadChain>
    where
        I: Iterator<Item = Descriptor>,
    {
        let mem = self.readable.memory();
        let mut seen_writable = false;
        // The last non-empty device-writable buffer holds the status.
        let mut last_writable = None;
        for (count, desc) in descriptors.enumerate() {
            if count >= max {
                return Err(BadChain::TooLong);
            }
            let list = if desc.is_write_only() {
                seen_writable = true;
                if desc.len() > 0 {
                    last_writable = Some((desc.addr(), desc.len()));
                }
                &mut self.writable
            } else {
                self.malformed |= seen_writable;
                &mut self.readable
            };
            self.malformed |= !list.push_buffer(desc.addr(), desc.len());
        }
        let (addr, len) = last_writable.ok_or(BadChain::NoStatus)?;
        let status_addr = addr
            .0
            .checked_add(u64::from(len) - 1)
            .ok_or(BadChain::NoStatus)?;
        self.status = if self.malformed {
            // The data buffers do not matter, but the status byte may still
            // be writable.
            mem.get_slice(GuestAddress(status_addr), 1)
                .ok()
                .map(|slice| Segment {
                    addr: GuestAddress(status_addr),
                    slice,
                })
        } else {
            self.writable.split_last_byte()
        };
        match self.status {
            Some(_) => Ok(()),
            None => Err(BadChain::NoStatus),
        }
    }

    /// Writes the status byte; returns the used length: `written` data
    /// bytes and the status.
    pub(super) fn finish(&self, status: u8, written: u64) -> u32 {
        match &self.status {
            // `write_obj` marks the byte dirty. `written` is at most the
            // writable length, itself bounded by the chain length, a u32
            // sum checked by virtio-queue.
            Some(s) if s.slice.write_obj(status, 0).is_ok() => {
                u32::try_from(written + 1).unwrap_or(u32::MAX)
            }
            _ => 0,
        }
    }
}

/// The request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct OutHeader {
    /// `VIRTIO_BLK_T_*`.
    pub(super) request_type: u32,
    /// First sector.
    pub(super) sector: u64,
}

impl OutHeader {
    pub(super) fn parse(b: &[u8; OUTHDR_SIZE as usize]) -> Self {
        let mut t = [0u8; 4];
        t.copy_from_slice(&b[0..4]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[8..16]);
        OutHeader {
            request_type: u32::from_le_bytes(t),
            sector: u64::from_le_bytes(s),
        }
    }
}

/// One `struct virtio_blk_discard_write_zeroes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DwzSegment {
    pub(super) sector: u64,
    pub(super) num_sectors: u32,
    pub(super) flags: u32,
}

/// Reads the discard / write-zeroes segments following the header.
pub(super) fn read_dwz_segments(
    readable: &SgList<'_>,
    max_segments: u32,
) -> Result<Vec<DwzSegment>, u8> {
    let data_len = readable.len() - OUTHDR_SIZE;
    if data_len == 0 || data_len & (DWZ_SEGMENT_SIZE - 1) != 0 {
        return Err(S_IOERR);
    }
    let count = data_len / DWZ_SEGMENT_SIZE;
    if count > u64::from(max_segments) {
        return Err(S_IOERR);
    }
    let mut segments = Vec::with_capacity(count as usize);
    for i in 0..count {
        let mut b = [0u8; DWZ_SEGMENT_SIZE as usize];
        readable
            .read_at(OUTHDR_SIZE + i * DWZ_SEGMENT_SIZE, &mut b)
            .map_err(|_| S_IOERR)?;
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[0..8]);
        let mut n = [0u8; 4];
        n.copy_from_slice(&b[8..12]);
        let mut f = [0u8; 4];
        f.copy_from_slice(&b[12..16]);
        segments.push(DwzSegment {
            sector: u64::from_le_bytes(s),
            num_sectors: u32::from_le_bytes(n),
            flags: u32::from_le_bytes(f),
        });
    }
    Ok(segments)
}

/// Byte range `(offset, len)` of `len` bytes from `sector`, if it lies
/// within `capacity` sectors.
pub(super) fn sector_range(sector: u64, len: u64, capacity: u64) -> Option<(u64, u64)> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    let limit = capacity.checked_mul(SECTOR_SIZE)?;
    (end <= limit).then_some((offset, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::AtomicBitmap;

    fn mem() -> GuestMemory {
        vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x3000), 0x1000),
        ])
        .unwrap()
    }

    fn desc(addr: u64, len: u32, write: bool) -> Descriptor {
        let flags = if write {
            virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        Descriptor::new(addr, len, flags, 0)
    }

    #[test]
    fn requests_are_split_and_the_status_is_the_last_writable_byte() {
        let m = mem();
        let parse = |d: &[Descriptor]| {
            let mut r = Request::new(&m);
            r.parse(d.iter().copied(), 4).map(|()| r)
        };
        // Header, data, separate status.
        let r = parse(&[
            desc(0x1000, 16, false),
            desc(0x1100, 512, true),
            desc(0x1400, 1, true),
        ])
        .unwrap();
        assert!(!r.malformed);
        assert_eq!((r.readable.len(), r.writable.len()), (16, 512));
        assert_eq!(r.status.unwrap().addr, GuestAddress(0x1400));
        assert_eq!(r.finish(S_OK, 512), 513);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x1400)).unwrap(), S_OK);
        // Status in the last byte of the data buffer, and an empty
        // writable buffer after it.
        let r = parse(&[
            desc(0x1000, 16, false),
            desc(0x1100, 513, true),
            desc(0x3000, 0, true),
        ])
        .unwrap();
        assert_eq!(r.writable.len(), 512);
        assert_eq!(r.status.unwrap().addr, GuestAddress(0x1300));
        // A readable buffer after a writable one, even an empty one.
        let r = parse(&[
            desc(0x1000, 16, false),
            desc(0x3000, 0, true),
            desc(0x1100, 16, false),
            desc(0x1400, 1, true),
        ])
        .unwrap();
        assert!(r.malformed);
        assert_eq!(r.finish(S_IOERR, 0), 1);
        // A data buffer outside guest memory: IOERR, status still written.
        let r = parse(&[
            desc(0x1000, 16, false),
            desc(0x2000, 512, true),
            desc(0x1400, 1, true),
        ])
        .unwrap();
        assert!(r.malformed);
        assert_eq!(r.status.unwrap().addr, GuestAddress(0x1400));
        // The status byte outside guest memory, or none at all.
        for d in [
            &[desc(0x1000, 16, false), desc(0x1fff, 2, true)][..],
            &[desc(0x1000, 16, false), desc(u64::MAX, 2, true)][..],
            &[desc(0x1000, 16, false), desc(0x1100, 0, true)][..],
            &[desc(0x1000, 16, false)][..],
        ] {
            assert_eq!(parse(d).unwrap_err(), BadChain::NoStatus);
        }
        // More than `max` descriptors.
        let long = [desc(0x1000, 1, false); 5];
        assert_eq!(parse(&long).unwrap_err(), BadChain::TooLong);
    }

    #[test]
    fn ranges() {
        assert_eq!(sector_range(1, 512, 2), Some((512, 512)));
        assert_eq!(sector_range(1, 513, 2), None);
        assert_eq!(sector_range(u64::MAX, 0, 2), None);
        assert_eq!(sector_range(2, 0, 2), Some((1024, 0)));
        assert_eq!(sector_range(0, u64::MAX, u64::MAX), None);
    }

    #[test]
    fn header() {
        let mut b = [0u8; 16];
        b[0] = 1;
        b[8] = 0x10;
        b[15] = 0x80;
        let h = OutHeader::parse(&b);
        assert_eq!(h.request_type, 1);
        assert_eq!(h.sector, 0x8000_0000_0000_0010);
    }
}
