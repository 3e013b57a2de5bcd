//! Parsing and execution of virtio-blk requests.
//!
//! A request is a descriptor chain: device-readable buffers holding the
//! 16-byte `virtio_blk_outhdr` and any data to write, then device-writable
//! buffers for data to read and, in their last byte, the status. Buffers
//! are treated as scatter-gather lists without framing assumptions. Every
//! guest address is checked against guest memory before use; a malformed
//! request fails with `VIRTIO_BLK_S_IOERR` and never panics.

use std::io;

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::MS;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

use crate::virtio::GuestMemory;

/// A piece of guest memory, with its dirty bitmap.
pub(super) type GuestSlice<'m> = VolatileSlice<'m, MS<'m, GuestMemory>>;

fn invalid<E: std::error::Error + Send + Sync + 'static>(e: E) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

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

/// A list of guest buffers addressed as one contiguous byte range.
#[derive(Debug, Default)]
pub(super) struct SgList {
    segments: Vec<(GuestAddress, u32)>,
    len: u64,
}

impl SgList {
    /// Empties the list, keeping its storage.
    pub(super) fn clear(&mut self) {
        self.segments.clear();
        self.len = 0;
    }

    pub(super) fn push(&mut self, addr: GuestAddress, len: u32) {
        self.segments.push((addr, len));
        self.len += u64::from(len);
    }

    /// Total length in bytes.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Whether every buffer lies in guest memory.
    pub(super) fn in_memory(&self, mem: &GuestMemory) -> bool {
        self.segments.iter().all(|&(addr, len)| {
            let len = len as usize;
            // One region lookup in the usual case; the slice iterator
            // only for buffers that cross regions (or are outside).
            len == 0 || mem.get_slice(addr, len).is_ok() || mem.check_range(addr, len)
        })
    }

    /// Calls `f(guest_address, buffer_offset, length)` for the pieces of
    /// `[offset, offset + len)`; fails if the range exceeds the list.
    fn walk<F>(&self, offset: u64, len: usize, mut f: F) -> io::Result<()>
    where
        F: FnMut(GuestAddress, usize, usize) -> io::Result<()>,
    {
        let end = offset
            .checked_add(len as u64)
            .filter(|e| *e <= self.len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let mut seg_start = 0u64;
        let mut pos = offset;
        for &(addr, seg_len) in &self.segments {
            let seg_end = seg_start + u64::from(seg_len);
            if pos >= end {
                break;
            }
            if pos < seg_end {
                let n = (seg_end.min(end) - pos) as usize;
                let a = addr
                    .0
                    .checked_add(pos - seg_start)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
                f(GuestAddress(a), (pos - offset) as usize, n)?;
                pos += n as u64;
            }
            seg_start = seg_end;
        }
        Ok(())
    }

    /// Calls `f` with the guest memory of `[offset, offset + len)` of the
    /// list, in order, as slices; fails if the range exceeds the list or a
    /// piece lies outside guest memory.
    pub(super) fn for_each_slice<'m, F>(
        &self,
        mem: &'m GuestMemory,
        offset: u64,
        len: usize,
        mut f: F,
    ) -> io::Result<()>
    where
        F: FnMut(GuestSlice<'m>) -> io::Result<()>,
    {
        self.walk(offset, len, |addr, _, n| match mem.get_slice(addr, n) {
            Ok(slice) => f(slice),
            // Crosses a region boundary, or is (partly) outside guest
            // memory: the iterator splits or reports it.
            Err(_) => mem
                .get_slices(addr, n)
                .try_for_each(|slice| f(slice.map_err(invalid)?)),
        })
    }

    /// Copies `buf.len()` bytes at `offset` of the list into `buf`.
    pub(super) fn read_at(&self, mem: &GuestMemory, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        self.for_each_slice(mem, offset, buf.len(), |slice| {
            at += slice.copy_to(&mut buf[at..]);
            Ok(())
        })
    }

    /// Copies `buf` to `offset` of the list, marking it dirty.
    pub(super) fn write_at(&self, mem: &GuestMemory, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut at = 0;
        self.for_each_slice(mem, offset, buf.len(), |slice| {
            // `copy_from` marks the bytes it writes dirty.
            slice.copy_from(&buf[at..]);
            at += slice.len();
            Ok(())
        })
    }
}

/// A chain split into its device-readable and device-writable parts.
#[derive(Debug, Default)]
pub(super) struct Buffers {
    /// Device-readable buffers.
    pub(super) readable: SgList,
    /// Device-writable buffers.
    pub(super) writable: SgList,
    /// A readable buffer followed a writable one.
    pub(super) misordered: bool,
}

/// Splits `descriptors` into `b`, replacing its contents (its storage is
/// reused, so steady-state requests allocate nothing); `false` if there are
/// more than `max`.
pub(super) fn split_chain<I>(descriptors: I, max: usize, b: &mut Buffers) -> bool
where
    I: Iterator<Item = Descriptor>,
{
    b.readable.clear();
    b.writable.clear();
    b.misordered = false;
    for (count, desc) in descriptors.enumerate() {
        if count >= max {
            return false;
        }
        if desc.is_write_only() {
            b.writable.push(desc.addr(), desc.len());
        } else {
            if !b.writable.segments.is_empty() {
                b.misordered = true;
            }
            b.readable.push(desc.addr(), desc.len());
        }
    }
    true
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
    mem: &GuestMemory,
    readable: &SgList,
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
            .read_at(mem, OUTHDR_SIZE + i * DWZ_SEGMENT_SIZE, &mut b)
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

    #[test]
    fn sg_list_spans_segments() {
        let m = mem();
        let mut sg = SgList::default();
        sg.push(GuestAddress(0x1ffc), 4);
        sg.push(GuestAddress(0x3000), 0);
        sg.push(GuestAddress(0x3000), 8);
        assert_eq!(sg.len(), 12);
        assert!(sg.in_memory(&m));
        sg.write_at(&m, 2, &[1, 2, 3, 4, 5]).unwrap();
        let mut b = [0u8; 12];
        sg.read_at(&m, 0, &mut b).unwrap();
        assert_eq!(b, [0, 0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0]);
        assert!(sg.read_at(&m, 11, &mut [0u8; 2]).is_err());
        assert!(sg.read_at(&m, u64::MAX, &mut [0u8; 2]).is_err());
        sg.read_at(&m, 12, &mut []).unwrap();
        // Outside guest memory.
        sg.push(GuestAddress(0x2000), 1);
        assert!(!sg.in_memory(&m));
        assert!(sg.write_at(&m, 12, &[1]).is_err());
        let mut wrap = SgList::default();
        wrap.push(GuestAddress(u64::MAX - 1), 16);
        assert!(!wrap.in_memory(&m));
        assert!(wrap.read_at(&m, 4, &mut [0u8; 4]).is_err());
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
