//! Scatter-gather lists of MFI frames, in their three formats, translated
//! into an [`SgList`] of guest memory.
//!
//! The SGL starts inside the frame and may run on into the frames that
//! follow it. Its entries are read from guest memory in one piece, decoded
//! little-endian, and each buffer is checked against guest memory as it is
//! added.

use thiserror::Error;
use vfio_user_server::guest_memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use super::frame::{flags, Frame};
use crate::guest_sg::SgList;

/// Entries read at most (the SGE count is a byte).
const MAX_ENTRIES: usize = u8::MAX as usize;

/// Format of the SGEs, from the frame's flags (IEEE before 64-bit before
/// 32-bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SglFormat {
    /// `{addr: u32, len: u32}`.
    Sg32,
    /// `{addr: u64, len: u32}`, packed.
    Sg64,
    /// `{addr: u64, len: u32, flags: u32}`.
    Ieee,
}

impl SglFormat {
    /// The format `frame` says its SGEs have.
    pub fn of(frame: &Frame) -> Self {
        let f = frame.flags();
        if f & flags::IEEE != 0 {
            SglFormat::Ieee
        } else if f & flags::SGL64 != 0 {
            SglFormat::Sg64
        } else {
            SglFormat::Sg32
        }
    }

    /// Size of one entry.
    pub fn entry_size(self) -> usize {
        match self {
            SglFormat::Sg32 => 8,
            SglFormat::Sg64 => 12,
            SglFormat::Ieee => 16,
        }
    }

    /// `(address, length)` of the entry in `e` (`entry_size` bytes).
    fn decode(self, e: &[u8]) -> (u64, u32) {
        let le32 = |at: usize| u32::from_le_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]]);
        match self {
            SglFormat::Sg32 => (u64::from(le32(0)), le32(4)),
            SglFormat::Sg64 | SglFormat::Ieee => {
                (u64::from(le32(0)) | u64::from(le32(4)) << 32, le32(8))
            }
        }
    }
}

/// Why an SGL cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum SglError {
    /// The entries themselves lie outside guest memory.
    #[error("SGL at {0:#x} outside guest memory")]
    Entries(u64),
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer at {0:#x} outside guest memory")]
    Buffer(u64),
}

/// The buffers of the `count` entries of `format` at guest address `at`,
/// cut to `limit` bytes in all (a frame's data length).
pub fn read_sgl<'m>(
    mem: &'m GuestMemory,
    at: u64,
    count: u8,
    format: SglFormat,
    limit: u64,
) -> Result<SgList<'m>, SglError> {
    let mut sg = SgList::new(mem);
    if count == 0 || limit == 0 {
        return Ok(sg);
    }
    let size = format.entry_size();
    let mut raw = [0u8; MAX_ENTRIES * 16];
    let raw = &mut raw[..usize::from(count) * size];
    mem.read_slice(raw, GuestAddress(at))
        .map_err(|_| SglError::Entries(at))?;
    let mut left = limit;
    for e in raw.chunks_exact(size) {
        if left == 0 {
            break;
        }
        let (addr, len) = format.decode(e);
        // Below `len`, a u32.
        let len = u64::from(len).min(left) as u32;
        if !sg.push_buffer(GuestAddress(addr), len) {
            return Err(SglError::Buffer(addr));
        }
        left -= u64::from(len);
    }
    Ok(sg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::megasas::frame::FRAME_SIZE;
    use vm_memory::bitmap::AtomicBitmap;

    fn mem() -> GuestMemory {
        vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x1_0000_0000), 0x10000),
        ])
        .unwrap()
    }

    fn frame_with_flags(f: u16) -> Frame {
        let mut b = [0u8; FRAME_SIZE];
        b[0x10..0x12].copy_from_slice(&f.to_le_bytes());
        Frame::new(b)
    }

    #[test]
    fn format_precedence() {
        assert_eq!(SglFormat::of(&frame_with_flags(0)), SglFormat::Sg32);
        assert_eq!(SglFormat::of(&frame_with_flags(0x02)), SglFormat::Sg64);
        assert_eq!(SglFormat::of(&frame_with_flags(0x22)), SglFormat::Ieee);
        assert_eq!(SglFormat::of(&frame_with_flags(0x20)), SglFormat::Ieee);
    }

    #[test]
    fn the_three_formats() {
        let m = mem();
        // sg32: two entries.
        let mut e = Vec::new();
        for (a, l) in [(0x1000u32, 0x100u32), (0x3000, 0x200)] {
            e.extend_from_slice(&a.to_le_bytes());
            e.extend_from_slice(&l.to_le_bytes());
        }
        m.write_slice(&e, GuestAddress(0x100)).unwrap();
        let sg = read_sgl(&m, 0x100, 2, SglFormat::Sg32, u64::MAX).unwrap();
        assert_eq!(sg.len(), 0x300);
        assert_eq!(sg.segments()[1].addr, GuestAddress(0x3000));
        // sg64, packed 12-byte entries, one buffer above 4 GiB.
        let mut e = Vec::new();
        for (a, l) in [(0x1_0000_1000u64, 0x80u32), (0x2000, 0x80)] {
            e.extend_from_slice(&a.to_le_bytes());
            e.extend_from_slice(&l.to_le_bytes());
        }
        m.write_slice(&e, GuestAddress(0x200)).unwrap();
        let sg = read_sgl(&m, 0x200, 2, SglFormat::Sg64, u64::MAX).unwrap();
        assert_eq!(sg.segments()[0].addr, GuestAddress(0x1_0000_1000));
        assert_eq!(sg.segments()[1].addr, GuestAddress(0x2000));
        // IEEE, 16-byte entries whose flags are ignored.
        let mut e = Vec::new();
        for (a, l) in [(0x1_0000_2000u64, 0x1000u32), (0x4000, 0x1000)] {
            e.extend_from_slice(&a.to_le_bytes());
            e.extend_from_slice(&l.to_le_bytes());
            e.extend_from_slice(&0xffff_ffffu32.to_le_bytes());
        }
        m.write_slice(&e, GuestAddress(0x300)).unwrap();
        let sg = read_sgl(&m, 0x300, 2, SglFormat::Ieee, u64::MAX).unwrap();
        assert_eq!(sg.len(), 0x2000);
        assert_eq!(sg.segments()[1].addr, GuestAddress(0x4000));
        // Cut to the data length: the second buffer in part only.
        let sg = read_sgl(&m, 0x300, 2, SglFormat::Ieee, 0x1800).unwrap();
        assert_eq!(sg.len(), 0x1800);
        let sg = read_sgl(&m, 0x300, 2, SglFormat::Ieee, 0x1000).unwrap();
        assert_eq!(sg.segments().len(), 1);
    }

    #[test]
    fn empty_and_bad_lists() {
        let m = mem();
        assert!(read_sgl(&m, 0xdead_0000, 0, SglFormat::Ieee, 512)
            .unwrap()
            .is_empty());
        assert!(read_sgl(&m, 0xdead_0000, 4, SglFormat::Ieee, 0)
            .unwrap()
            .is_empty());
        assert_eq!(
            read_sgl(&m, 0xfff0, 2, SglFormat::Ieee, 512).unwrap_err(),
            SglError::Entries(0xfff0)
        );
        let mut e = 0x2_0000u32.to_le_bytes().to_vec();
        e.extend_from_slice(&16u32.to_le_bytes());
        m.write_slice(&e, GuestAddress(0x100)).unwrap();
        assert_eq!(
            read_sgl(&m, 0x100, 1, SglFormat::Sg32, 512).unwrap_err(),
            SglError::Buffer(0x2_0000)
        );
        // 255 entries, the most a frame can name.
        assert_eq!(
            read_sgl(&m, 0x1000, 255, SglFormat::Ieee, 512)
                .unwrap()
                .len(),
            0
        );
    }
}
