//! Guest RAM for the test-side drivers: one memfd, mapped here and shared
//! with the device by DMA_MAP, laid out as one or more regions of guest
//! physical memory, with holes between them if the test asks for it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

use crate::transport::Transport;

/// Guest-physical base of the default RAM ([`GuestRam::new`]).
pub const GUEST_BASE: u64 = 0x1_0000_0000;
/// Size of the default RAM.
pub const GUEST_SIZE: u64 = 64 << 20;

/// Allocation starts this far into each region, so that no buffer starts
/// at a region's base (address 0 in layouts that start there).
const FIRST_ALLOC: u64 = 0x1000;

/// One region of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical address of its first byte.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
    /// Where it starts in [`GuestRam::file`] (and in the local mapping).
    pub file_offset: u64,
}

impl RamRegion {
    /// The offset in the file of `[gpa, gpa + len)`, if it lies in this
    /// region.
    #[inline(always)]
    fn offset_of(&self, gpa: u64, len: usize) -> Option<usize> {
        let rel = gpa.checked_sub(self.base)?;
        let end = rel.checked_add(len as u64)?;
        (end <= self.size).then_some((self.file_offset + rel) as usize)
    }
}

/// Guest RAM: a memfd mapped here and shared with the device by DMA_MAP,
/// one region of guest-physical memory per DMA map.
pub struct GuestRam {
    /// The memfd (passed with DMA_MAP).
    pub file: File,
    ptr: *mut u8,
    len: usize,
    /// `regions[0]`.
    first: RamRegion,
    regions: Vec<RamRegion>,
    /// Allocation cursor of each region (an offset into it).
    next: Vec<u64>,
}

// SAFETY: the mapping is owned by this struct and only accessed through it.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// [`GUEST_SIZE`] bytes of fresh, zeroed RAM at [`GUEST_BASE`], one
    /// region.
    #[allow(clippy::new_without_default)]
    pub fn new() -> GuestRam {
        GuestRam::with_regions(&[(GUEST_BASE, GUEST_SIZE)])
    }

    /// Fresh, zeroed RAM laid out as `regions` (`(base, size)`, in address
    /// order, not overlapping, each of two pages or more and page-aligned);
    /// whatever lies between them is a hole the device cannot reach.
    pub fn with_regions(regions: &[(u64, u64)]) -> GuestRam {
        assert!(!regions.is_empty(), "guest RAM without a region");
        let mut layout: Vec<RamRegion> = Vec::with_capacity(regions.len());
        let mut file_offset = 0;
        for (i, &(base, size)) in regions.iter().enumerate() {
            assert!(
                base % 4096 == 0 && size % 4096 == 0 && size > FIRST_ALLOC,
                "region {i} is not two or more whole pages"
            );
            if let Some(prev) = layout.last() {
                assert!(prev.base + prev.size <= base, "regions out of order");
            }
            layout.push(RamRegion {
                base,
                size,
                file_offset,
            });
            file_offset += size;
        }
        let file = memfd(c"guest-ram", file_offset);
        let len = usize::try_from(file_offset).expect("guest RAM too large");
        // SAFETY: mapping a file we own, MAP_SHARED, whole length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        GuestRam {
            file,
            ptr: ptr.cast(),
            len,
            first: layout[0],
            next: vec![FIRST_ALLOC; layout.len()],
            regions: layout,
        }
    }

    /// A memfd of `len` bytes that is never touched (no memory used).
    pub fn sparse_file(len: u64) -> File {
        memfd(c"sparse", len)
    }

    /// The regions, in address order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// DMA_MAPs every region into the device behind `transport`.
    pub fn map_into(&self, transport: &mut impl Transport) {
        for r in &self.regions {
            transport.map_dma(r.file_offset, r.base, r.size, self.file.as_raw_fd());
        }
    }

    /// Allocates `len` bytes aligned to `align` in the first region with
    /// room; returns the guest address.
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        (0..self.regions.len())
            .find_map(|i| self.try_alloc_in(i, len, align))
            .expect("guest RAM exhausted")
    }

    /// Allocates `len` bytes aligned to `align` in region `region`; returns
    /// the guest address.
    pub fn alloc_in(&mut self, region: usize, len: u64, align: u64) -> u64 {
        self.try_alloc_in(region, len, align)
            .unwrap_or_else(|| panic!("region {region} of guest RAM exhausted"))
    }

    fn try_alloc_in(&mut self, region: usize, len: u64, align: u64) -> Option<u64> {
        let r = self.regions[region];
        let base = r
            .base
            .checked_add(self.next[region])?
            .next_multiple_of(align);
        let end = base.checked_add(len)?;
        if end > r.base + r.size {
            return None;
        }
        self.next[region] = end - r.base;
        Some(base)
    }

    /// The offset in the local mapping of `[gpa, gpa + len)`, which must
    /// lie within one region.
    #[inline(always)]
    fn offset(&self, gpa: u64, len: usize) -> usize {
        // The first region, kept beside the list, is tried inline: it is
        // the only one in most layouts, and this runs for every access.
        match self.first.offset_of(gpa, len) {
            Some(off) => off,
            None => self.offset_in_others(gpa, len),
        }
    }

    /// [`GuestRam::offset`] beyond the first region.
    #[cold]
    #[inline(never)]
    fn offset_in_others(&self, gpa: u64, len: usize) -> usize {
        self.regions[1..]
            .iter()
            .find_map(|r| r.offset_of(gpa, len))
            .unwrap_or_else(|| panic!("{gpa:#x}+{len:#x} is not in one region of guest RAM"))
    }

    /// Volatile copies: the device writes the same memory concurrently.
    #[inline(always)]
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let off = self.offset(gpa, data.len());
        for (i, b) in data.iter().enumerate() {
            // SAFETY: in bounds of the live mapping (checked by offset()).
            unsafe { self.ptr.add(off + i).write_volatile(*b) };
        }
    }

    /// Reads `len` bytes at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.read_into(gpa, &mut out);
        out
    }

    /// Reads `buf.len()` bytes at `gpa` into `buf` (volatile, no
    /// allocation).
    #[inline(always)]
    pub fn read_into(&self, gpa: u64, buf: &mut [u8]) {
        let off = self.offset(gpa, buf.len());
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: in bounds of the live mapping (checked by offset()).
            *b = unsafe { self.ptr.add(off + i).read_volatile() };
        }
    }

    /// Reads the byte at `gpa`.
    #[inline(always)]
    pub fn read_u8(&self, gpa: u64) -> u8 {
        let mut b = [0u8];
        self.read_into(gpa, &mut b);
        b[0]
    }

    /// Writes a little-endian u16 at `gpa`; one atomic store when aligned
    /// (ring indices: the device reads them while the driver writes).
    #[inline(always)]
    pub fn write_u16(&self, gpa: u64, v: u16) {
        match self.aligned::<AtomicU16>(gpa) {
            Some(a) => a.store(v.to_le(), Ordering::Release),
            None => self.write(gpa, &v.to_le_bytes()),
        }
    }

    /// Writes a little-endian u32 at `gpa` (atomically when aligned).
    #[inline(always)]
    pub fn write_u32(&self, gpa: u64, v: u32) {
        match self.aligned::<AtomicU32>(gpa) {
            Some(a) => a.store(v.to_le(), Ordering::Release),
            None => self.write(gpa, &v.to_le_bytes()),
        }
    }

    /// Writes a little-endian u64 at `gpa` (atomically when aligned).
    #[inline(always)]
    pub fn write_u64(&self, gpa: u64, v: u64) {
        match self.aligned::<AtomicU64>(gpa) {
            Some(a) => a.store(v.to_le(), Ordering::Release),
            None => self.write(gpa, &v.to_le_bytes()),
        }
    }

    /// Writes little-endian u64s at `gpa` one after the other, each in one
    /// atomic store when aligned; the range is looked up once (descriptors
    /// and request headers, written for every request).
    #[inline(always)]
    pub fn write_u64s(&self, gpa: u64, values: &[u64]) {
        let off = self.offset(gpa, 8 * values.len());
        // SAFETY: in bounds of the live mapping (checked by offset()).
        let ptr = unsafe { self.ptr.add(off) };
        if !(ptr as usize).is_multiple_of(std::mem::align_of::<AtomicU64>()) {
            for (i, v) in values.iter().enumerate() {
                self.write(gpa + 8 * i as u64, &v.to_le_bytes());
            }
            return;
        }
        for (i, v) in values.iter().enumerate() {
            // SAFETY: `ptr + 8 * i` is within the range checked above,
            // aligned for `AtomicU64` (checked), and the mapping is only
            // ever accessed by volatile or atomic accesses.
            let a = unsafe { &*ptr.add(8 * i).cast::<AtomicU64>() };
            a.store(v.to_le(), Ordering::Release);
        }
    }

    /// Writes the byte `v` at `gpa`.
    #[inline(always)]
    pub fn write_u8(&self, gpa: u64, v: u8) {
        let off = self.offset(gpa, 1);
        // SAFETY: in bounds of the live mapping (checked by offset()).
        unsafe { self.ptr.add(off).write_volatile(v) };
    }

    /// Reads a little-endian u16 at `gpa`; one atomic load when aligned,
    /// so an index the device is updating is never read torn.
    #[inline(always)]
    pub fn read_u16(&self, gpa: u64) -> u16 {
        match self.aligned::<AtomicU16>(gpa) {
            Some(a) => u16::from_le(a.load(Ordering::Acquire)),
            None => {
                let mut b = [0u8; 2];
                self.read_into(gpa, &mut b);
                u16::from_le_bytes(b)
            }
        }
    }

    /// Reads a little-endian u32 at `gpa` (atomically when aligned).
    #[inline(always)]
    pub fn read_u32(&self, gpa: u64) -> u32 {
        match self.aligned::<AtomicU32>(gpa) {
            Some(a) => u32::from_le(a.load(Ordering::Acquire)),
            None => {
                let mut b = [0u8; 4];
                self.read_into(gpa, &mut b);
                u32::from_le_bytes(b)
            }
        }
    }

    /// Reads a little-endian u64 at `gpa` (atomically when aligned).
    #[inline(always)]
    pub fn read_u64(&self, gpa: u64) -> u64 {
        match self.aligned::<AtomicU64>(gpa) {
            Some(a) => u64::from_le(a.load(Ordering::Acquire)),
            None => {
                let mut b = [0u8; 8];
                self.read_into(gpa, &mut b);
                u64::from_le_bytes(b)
            }
        }
    }

    /// The atomic `A` at `gpa`, if `gpa` is aligned for it.
    #[inline(always)]
    fn aligned<A>(&self, gpa: u64) -> Option<&A> {
        let size = std::mem::size_of::<A>();
        let off = self.offset(gpa, size);
        // SAFETY: in bounds of the live mapping (checked by offset()).
        let ptr = unsafe { self.ptr.add(off) };
        // SAFETY: `ptr` is valid for `size` bytes while `self` lives, aligned
        // for `A` (checked), and the mapping is only ever accessed by
        // volatile or atomic accesses, here and in the device.
        (ptr as usize)
            .is_multiple_of(std::mem::align_of::<A>())
            .then(|| unsafe { &*ptr.cast::<A>() })
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in with_regions().
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A new memfd named `name` of `len` bytes.
fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd is a new, owned descriptor.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}
