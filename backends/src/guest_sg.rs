//! Scatter-gather lists of guest memory.
//!
//! A device request names its data as a list of guest buffers (virtio
//! descriptors, the SGEs of a storage controller's frame). An [`SgList`]
//! translates each buffer into slices of guest memory once, when it is
//! added, and then addresses the whole list as one contiguous byte range:
//! headers are read, data is moved and statuses are written through those
//! slices without looking guest memory up again. A guest address outside
//! guest memory is refused when it is added, never followed.

use std::io;

use smallvec::SmallVec;
use vfio_user_server::guest_memory::GuestMemory;
use vm_memory::bitmap::MS;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

/// A piece of guest memory, with its dirty bitmap.
pub type GuestSlice<'m> = VolatileSlice<'m, MS<'m, GuestMemory>>;

/// Segments kept inline (without allocating) per list: a usual request
/// has one or two buffers in each direction.
const INLINE_SEGMENTS: usize = 4;

fn invalid<E: std::error::Error + Send + Sync + 'static>(e: E) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// A translated guest buffer, or the piece of one that lies in one guest
/// memory region.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'m> {
    /// Guest address of its first byte.
    pub addr: GuestAddress,
    /// Its memory.
    pub slice: GuestSlice<'m>,
}

/// Guest buffers of one guest memory, addressed as one contiguous byte
/// range.
///
/// Each buffer is translated once, when it is added; nothing after that
/// looks guest memory up again. Up to four segments are held inline, so
/// building a usual list does not allocate. Segments are never empty.
#[derive(Clone)]
pub struct SgList<'m> {
    mem: &'m GuestMemory,
    segments: SmallVec<[Segment<'m>; INLINE_SEGMENTS]>,
    len: u64,
}

impl std::fmt::Debug for SgList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the guest memory: its region list says nothing about the list.
        f.debug_struct("SgList")
            .field("segments", &self.segments)
            .field("len", &self.len)
            .finish()
    }
}

impl<'m> SgList<'m> {
    /// An empty list of buffers of `mem`.
    pub fn new(mem: &'m GuestMemory) -> Self {
        SgList {
            mem,
            segments: SmallVec::new(),
            len: 0,
        }
    }

    /// The guest memory the buffers were translated in.
    pub fn memory(&self) -> &'m GuestMemory {
        self.mem
    }

    /// Appends the guest buffer `[addr, addr + len)`; `false` if part of
    /// it lies outside guest memory (then only the part before that is
    /// added). A buffer that crosses guest memory regions becomes several
    /// segments; an empty one adds nothing.
    pub fn push_buffer(&mut self, addr: GuestAddress, len: u32) -> bool {
        if len == 0 {
            return true;
        }
        let mem = self.mem;
        // One region lookup in the usual case; the slice iterator only for
        // buffers that cross regions (or are outside guest memory).
        if let Ok(slice) = mem.get_slice(addr, len as usize) {
            self.push(Segment { addr, slice });
            return true;
        }
        let mut at = addr;
        for slice in mem.get_slices(addr, len as usize) {
            let Ok(slice) = slice else {
                return false;
            };
            self.push(Segment { addr: at, slice });
            at = GuestAddress(at.0.wrapping_add(slice.len() as u64));
        }
        true
    }

    fn push(&mut self, segment: Segment<'m>) {
        // Keeps the segments non-empty, which `split_last_byte` relies on.
        if segment.slice.is_empty() {
            return;
        }
        self.len += segment.slice.len() as u64;
        self.segments.push(segment);
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the list holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments, in order.
    pub fn segments(&self) -> &[Segment<'m>] {
        &self.segments
    }

    /// Removes the last byte of the list and returns it, if the list is
    /// not empty. A device whose status byte ends its last buffer (such as
    /// virtio-blk) splits it off this way.
    pub fn split_last_byte(&mut self) -> Option<Segment<'m>> {
        let last = self.segments.last_mut()?;
        // Segments are never empty.
        let n = last.slice.len() - 1;
        let byte = Segment {
            addr: GuestAddress(last.addr.0.wrapping_add(n as u64)),
            slice: last.slice.subslice(n, 1).ok()?,
        };
        if n == 0 {
            self.segments.pop();
        } else {
            last.slice = last.slice.subslice(0, n).ok()?;
        }
        self.len -= 1;
        Some(byte)
    }

    /// Calls `f` with the pieces of `[offset, offset + len)` of the list,
    /// in order; fails if the range exceeds the list, or with the first
    /// error of `f`.
    pub fn for_each<F>(&self, offset: u64, len: u64, mut f: F) -> io::Result<()>
    where
        F: FnMut(Segment<'m>) -> io::Result<()>,
    {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let mut seg_start = 0u64;
        let mut pos = offset;
        for seg in &self.segments {
            if pos >= end {
                break;
            }
            let seg_end = seg_start + seg.slice.len() as u64;
            if pos < seg_end {
                // Both below the segment's length, a usize.
                let skip = (pos - seg_start) as usize;
                let n = (seg_end.min(end) - pos) as usize;
                f(Segment {
                    addr: GuestAddress(seg.addr.0.wrapping_add(skip as u64)),
                    slice: seg.slice.subslice(skip, n).map_err(invalid)?,
                })?;
                pos += n as u64;
            }
            seg_start = seg_end;
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` of the list into `buf`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        self.for_each(offset, buf.len() as u64, |piece| {
            at += piece.slice.copy_to(&mut buf[at..]);
            Ok(())
        })
    }

    /// Copies `buf` to `offset` of the list, marking it dirty.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut at = 0;
        self.for_each(offset, buf.len() as u64, |piece| {
            // `copy_from` marks the bytes it writes dirty.
            piece.slice.copy_from(&buf[at..]);
            at += piece.slice.len();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::Bytes;

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
        let mut sg = SgList::new(&m);
        assert!(sg.is_empty());
        assert!(sg.push_buffer(GuestAddress(0x1ffc), 4));
        assert!(sg.push_buffer(GuestAddress(0x3000), 0));
        assert!(sg.push_buffer(GuestAddress(0x3000), 8));
        assert_eq!(sg.len(), 12);
        assert_eq!(sg.segments().len(), 2);
        assert!(std::ptr::eq(sg.memory(), &m));
        sg.write_at(2, &[1, 2, 3, 4, 5]).unwrap();
        let mut b = [0u8; 12];
        sg.read_at(0, &mut b).unwrap();
        assert_eq!(b, [0, 0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0]);
        assert!(sg.read_at(11, &mut [0u8; 2]).is_err());
        assert!(sg.read_at(u64::MAX, &mut [0u8; 2]).is_err());
        sg.read_at(12, &mut []).unwrap();
        assert!(sg.write_at(12, &[1]).is_err());
        let last = sg.split_last_byte().unwrap();
        assert_eq!(last.addr, GuestAddress(0x3007));
        assert_eq!(sg.len(), 11);
        assert!(sg.read_at(11, &mut [0u8; 1]).is_err());
        // Outside guest memory.
        assert!(!sg.push_buffer(GuestAddress(0x2000), 1));
        assert!(!sg.push_buffer(GuestAddress(u64::MAX - 1), 16));
    }

    #[test]
    fn a_buffer_across_regions_is_split() {
        let m = vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x2000), 0x1000),
        ])
        .unwrap();
        let mut sg = SgList::new(&m);
        assert!(sg.push_buffer(GuestAddress(0x1ff0), 0x20));
        assert_eq!(sg.segments().len(), 2);
        assert_eq!(sg.segments()[1].addr, GuestAddress(0x2000));
        sg.write_at(0x0e, &[7, 8, 9, 10]).unwrap();
        let mut b = [0u8; 4];
        m.read_slice(&mut b, GuestAddress(0x1ffe)).unwrap();
        assert_eq!(b, [7, 8, 9, 10]);
        // The last byte of a buffer split across regions.
        let status = sg.split_last_byte().unwrap();
        assert_eq!(status.addr, GuestAddress(0x200f));
        status.slice.write_obj(0xaa_u8, 0).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x200f)).unwrap(), 0xaa);
        assert_eq!(sg.len(), 0x1f);
        // A buffer that runs off the end of guest memory.
        assert!(!sg.push_buffer(GuestAddress(0x2ff0), 0x20));
    }

    #[test]
    fn split_last_byte_empties_the_list_byte_by_byte() {
        let m = mem();
        let mut sg = SgList::new(&m);
        assert!(sg.split_last_byte().is_none());
        assert!(sg.push_buffer(GuestAddress(0x1000), 1));
        assert!(sg.push_buffer(GuestAddress(0x3000), 2));
        let addrs: Vec<_> = std::iter::from_fn(|| sg.split_last_byte())
            .map(|s| (s.addr.0, s.slice.len()))
            .collect();
        assert_eq!(addrs, [(0x3001, 1), (0x3000, 1), (0x1000, 1)]);
        assert!(sg.is_empty() && sg.segments().is_empty());
    }

    #[test]
    fn for_each_yields_the_range_and_stops_at_errors() {
        let m = mem();
        let mut sg = SgList::new(&m);
        assert!(sg.push_buffer(GuestAddress(0x1000), 8));
        assert!(sg.push_buffer(GuestAddress(0x3000), 8));
        let mut seen = Vec::new();
        sg.for_each(6, 4, |p| {
            seen.push((p.addr.0, p.slice.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [(0x1006, 2), (0x3000, 2)]);
        let mut calls = 0;
        let e = sg
            .for_each(0, 16, |_| {
                calls += 1;
                Err(io::Error::other("stop"))
            })
            .unwrap_err();
        assert_eq!((calls, e.kind()), (1, io::ErrorKind::Other));
        assert!(sg.for_each(8, 9, |_| Ok(())).is_err());
    }
}
