//! Guest memory shared by the client with DMA_MAP.
//!
//! fd-backed maps become regions of a `vm-memory` [`GuestMemoryMmap`](vm_memory::GuestMemoryMmap) with a
//! dirty bitmap; devices see it through a [`GuestMemoryHandle`] and every
//! access is bounds-checked by `vm-memory`. fd-less maps are recorded (the
//! client may unmap them) but are not reachable by devices.

use std::collections::BTreeMap;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion, GuestRegionMmap,
};

use crate::sigbus;
use crate::wire::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};

/// Guest memory as devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// A shared, swappable handle on the guest memory; clone it into devices.
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemory>;
/// Page size of the dirty bitmap.
pub const DIRTY_PAGE_SIZE: usize = 4096;

/// Errors of DMA map and unmap requests.
#[derive(Debug, Error)]
pub enum DmaError {
    /// Unknown flag bits, zero size, overflow or misalignment.
    #[error("invalid DMA map request")]
    Invalid,
    /// The range overlaps an existing map.
    #[error("range {0:#x}+{1:#x} overlaps an existing map")]
    Overlap(u64, u64),
    /// Too many maps or too much memory.
    #[error("DMA map limit reached")]
    Limit,
    /// No map matches the range.
    #[error("no map at {0:#x}+{1:#x}")]
    NotFound(u64, u64),
    /// The fd cannot back the range.
    #[error("the fd cannot back {0:#x} bytes at offset {1:#x}")]
    BadFile(u64, u64),
    /// mmap failed.
    #[error("mmap failed: {0}")]
    Mmap(String),
}

impl DmaError {
    /// The errno to send in the reply.
    pub fn errno(&self) -> i32 {
        match self {
            DmaError::Invalid | DmaError::BadFile(..) | DmaError::Mmap(_) => libc::EINVAL,
            DmaError::Overlap(..) => libc::EEXIST,
            DmaError::Limit => libc::ENOSPC,
            DmaError::NotFound(..) => libc::ENOENT,
        }
    }
}

/// Limits on what a client can make us map.
#[derive(Clone, Copy, Debug)]
pub struct DmaLimits {
    /// Simultaneous maps (advertised as `max_dma_maps`).
    pub max_maps: usize,
    /// Total bytes mapped with fds.
    pub max_total_bytes: u64,
}

impl Default for DmaLimits {
    fn default() -> Self {
        DmaLimits {
            max_maps: 65535,
            max_total_bytes: 1 << 40,
        }
    }
}

/// One DMA map as the client described it.
#[derive(Clone, Debug)]
pub struct DmaRange {
    /// Guest address.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
    /// `DMA_MAP_FLAG_*`.
    pub flags: u32,
    /// Offset of the range in the client's fd (0 without one).
    pub offset: u64,
    /// Whether it is backed by an fd (reachable by devices).
    pub mapped: bool,
}

/// The table of DMA maps of the attached client.
pub struct DmaTable {
    maps: BTreeMap<u64, DmaRange>,
    /// The SIGBUS registrations of the mapped ranges, by address.
    guards: BTreeMap<u64, sigbus::GuestMapping>,
    /// A range unmapped after the device hit a hole in it.
    unmapped_fault: Option<u64>,
    memory: GuestMemoryHandle,
    limits: DmaLimits,
    mapped_bytes: u64,
}

impl DmaTable {
    /// Creates an empty table publishing into `memory`.
    pub fn new(memory: GuestMemoryHandle, limits: DmaLimits) -> Self {
        DmaTable {
            maps: BTreeMap::new(),
            guards: BTreeMap::new(),
            unmapped_fault: None,
            memory,
            limits,
            mapped_bytes: 0,
        }
    }

    /// The guest memory handle the table publishes into.
    pub fn memory(&self) -> GuestMemoryHandle {
        self.memory.clone()
    }

    /// The limits in force.
    pub fn limits(&self) -> DmaLimits {
        self.limits
    }

    /// The maps, in address order.
    pub fn ranges(&self) -> impl Iterator<Item = &DmaRange> {
        self.maps.values()
    }

    /// A duplicate of the client's fd behind the map at `address` (for a
    /// hand-over to another process), or `None` for an fd-less map or no
    /// map there.
    pub fn file(&self, address: u64) -> Option<std::io::Result<std::os::fd::OwnedFd>> {
        use std::os::fd::AsFd;
        let r = self.maps.get(&address).filter(|r| r.mapped)?;
        let memory = self.memory.memory();
        let region = memory.find_region(GuestAddress(r.address))?;
        let file = region.file_offset()?.file();
        Some(file.as_fd().try_clone_to_owned())
    }

    /// Finds the map containing `[address, address + len)`.
    pub fn find(&self, address: u64, len: u64) -> Option<&DmaRange> {
        let (_, r) = self.maps.range(..=address).next_back()?;
        let end = address.checked_add(len)?;
        (end <= r.address + r.size).then_some(r)
    }

    fn overlaps(&self, address: u64, end: u64) -> bool {
        if let Some((_, r)) = self.maps.range(..end).next_back() {
            return r.address + r.size > address;
        }
        false
    }

    /// Handles DMA_MAP.
    pub fn map(
        &mut self,
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        file: Option<File>,
    ) -> Result<(), DmaError> {
        if flags & !(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE) != 0 || size == 0 {
            return Err(DmaError::Invalid);
        }
        let end = address.checked_add(size).ok_or(DmaError::Invalid)?;
        // Anything over an existing map is refused, an exact duplicate too
        // (the spec's rule): success would tell the client its new memory
        // is mapped while the device goes on using the old. Neither QEMU
        // nor Cloud Hypervisor maps a range twice without unmapping it.
        if self.overlaps(address, end) {
            return Err(DmaError::Overlap(address, size));
        }
        if self.maps.len() >= self.limits.max_maps {
            return Err(DmaError::Limit);
        }
        let mapped = file.is_some();
        if let Some(file) = file {
            if self.mapped_bytes.saturating_add(size) > self.limits.max_total_bytes {
                return Err(DmaError::Limit);
            }
            let region = Arc::new(map_file(file, offset, address, size, flags)?);
            // `region` outlives `guard` on every path below: a registered
            // range must never be unmapped.
            let guard = sigbus::register(region.as_ptr(), region.len() as usize)
                .map_err(|_| DmaError::Limit)?;
            let new = self
                .memory
                .memory()
                .insert_region(region.clone())
                .map_err(|e| DmaError::Mmap(e.to_string()))?;
            self.memory
                .lock()
                .map_err(|_| DmaError::Invalid)?
                .replace(new);
            if let Some(guard) = guard {
                self.guards.insert(address, guard);
            }
            self.mapped_bytes += size;
        }
        self.maps.insert(
            address,
            DmaRange {
                address,
                size,
                flags,
                offset: if mapped { offset } else { 0 },
                mapped,
            },
        );
        Ok(())
    }

    /// Handles DMA_UNMAP of one exact range.
    pub fn unmap(&mut self, address: u64, size: u64) -> Result<DmaRange, DmaError> {
        match self.maps.get(&address) {
            Some(r) if r.size == size => {}
            _ => return Err(DmaError::NotFound(address, size)),
        }
        let r = self
            .maps
            .remove(&address)
            .ok_or(DmaError::NotFound(address, size))?;
        if r.mapped {
            // Unregistered before it can be unmapped; a fault taken while
            // the device finished with it still counts.
            if let Some(guard) = self.guards.remove(&address) {
                if guard.take_fault() {
                    self.unmapped_fault.get_or_insert(address);
                }
            }
            self.remove_region(address, size);
            self.mapped_bytes -= size;
        }
        Ok(r)
    }

    /// The address of a map whose pages the client took away (truncated
    /// its file) and the device touched since the last call; see
    /// [`sigbus`].
    pub fn take_fault(&mut self) -> Option<u64> {
        self.unmapped_fault.take().or_else(|| {
            self.guards
                .iter()
                .find(|(_, g)| g.take_fault())
                .map(|(address, _)| *address)
        })
    }

    /// Removes every map (UNMAP_ALL and disconnect).
    pub fn unmap_all(&mut self) {
        self.maps.clear();
        self.guards.clear();
        self.unmapped_fault = None;
        self.mapped_bytes = 0;
        if let Ok(guard) = self.memory.lock() {
            guard.replace(GuestMemory::new());
        }
    }

    fn remove_region(&mut self, address: u64, size: u64) {
        let current = self.memory.memory();
        if let Ok((new, _old)) = current.remove_region(GuestAddress(address), size) {
            if let Ok(guard) = self.memory.lock() {
                guard.replace(new);
            }
        }
    }
}

fn map_file(
    file: File,
    offset: u64,
    address: u64,
    size: u64,
    flags: u32,
) -> Result<GuestRegionMmap<AtomicBitmap>, DmaError> {
    let len = usize::try_from(size).map_err(|_| DmaError::Invalid)?;
    let end = offset.checked_add(size).ok_or(DmaError::Invalid)?;
    // Mapping past the end of the file would turn a guest access into SIGBUS.
    let meta = file
        .metadata()
        .map_err(|_| DmaError::BadFile(size, offset))?;
    if !meta.file_type().is_file() || meta.len() < end {
        return Err(DmaError::BadFile(size, offset));
    }
    // The kernel maps a hugetlbfs file in whole huge pages: a map of part
    // of one could never be unmapped (nor replaced after a truncation).
    if on_hugetlbfs(&file) {
        use std::os::unix::fs::MetadataExt;
        let huge = meta.blksize().max(1);
        if !offset.is_multiple_of(huge) || !size.is_multiple_of(huge) {
            return Err(DmaError::BadFile(size, offset));
        }
    }
    // vm-memory has no per-region permissions: a device write into a
    // read-only mapping (a guest pointing a DMA buffer at memory the client
    // mapped without WRITE, e.g. a ROM) would kill the whole process with
    // SIGSEGV. So every map is readable and writable, and one the client
    // did not make writable is private: device writes land in copies the
    // client never sees, and its memory is never modified.
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let share = if flags & DMA_MAP_FLAG_WRITE != 0 {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    log::debug!(
        "DMA map {:#x}+{:#x} fd {} offset {:#x}",
        address,
        size,
        file.as_raw_fd(),
        offset
    );
    let page = NonZeroUsize::new(DIRTY_PAGE_SIZE).ok_or(DmaError::Invalid)?;
    let region = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::new(len, page))
        .with_file_offset(FileOffset::new(file, offset))
        .with_mmap_prot(prot)
        .with_mmap_flags(share | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| DmaError::Mmap(e.to_string()))?;
    GuestRegionMmap::new(region, GuestAddress(address)).ok_or(DmaError::Invalid)
}

/// Whether `file` lies on hugetlbfs.
fn on_hugetlbfs(file: &File) -> bool {
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // SAFETY: `statfs` is plain integers: all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer for the call; the fd is open.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    r == 0 && st.f_type as i64 == HUGETLBFS_MAGIC
}

/// Returns and clears the dirty bits of `[iova, iova + length)` as a bitmap
/// with one bit per `page_size` bytes (`page_size` a multiple of 4 KiB).
///
/// The server calls it on its event-loop thread, the thread that runs the
/// device's queues: a device that has the kernel write guest memory on that
/// thread (virtio-blk reads) may mark the pages before the write. Writes
/// made on other threads must be marked after they complete.
pub fn take_dirty_bitmap(
    memory: &GuestMemory,
    iova: u64,
    length: u64,
    page_size: u64,
) -> Option<Vec<u8>> {
    if page_size == 0 || !page_size.is_multiple_of(DIRTY_PAGE_SIZE as u64) || length == 0 {
        return None;
    }
    let pages = length.div_ceil(page_size);
    let mut bitmap = vec![0u8; (pages.div_ceil(64) * 8) as usize];
    for region in memory.iter() {
        let start = region.start_addr().0;
        let end = start + region.len();
        let from = iova.max(start);
        let to = iova.saturating_add(length).min(end);
        if from >= to {
            continue;
        }
        let mmap = region.get_mmap();
        let bits = mmap.bitmap();
        // Both ends of the range and of the region are at most 2^64 (a map
        // may end at the top of the address space): u128, so that no page
        // end wraps around.
        let end_of_range = u128::from(iova) + u128::from(length);
        let (start, to) = (u128::from(start), u128::from(to));
        // Walk the tracked 4 KiB pages (aligned to the region start) that
        // overlap the range; each sets every reported bit it touches.
        let page = DIRTY_PAGE_SIZE as u128;
        let mut off = (u128::from(from) - start) / page * page;
        while start + off < to {
            let page_start = start + off;
            let page_end = page_start + page;
            // Below the region's length, a usize.
            let at = off as usize;
            if bits.is_addr_set(at) {
                // Clear only pages wholly reported, so nothing is lost.
                if page_start >= u128::from(iova) && page_end <= end_of_range {
                    bits.reset_addr_range(at, 1);
                }
                let first =
                    (page_start.max(u128::from(iova)) - u128::from(iova)) / u128::from(page_size);
                let last =
                    (page_end.min(end_of_range) - 1 - u128::from(iova)) / u128::from(page_size);
                for k in first..=last {
                    bitmap[(k / 8) as usize] |= 1 << (k % 8);
                }
            }
            off += page;
        }
    }
    Some(bitmap)
}

/// Marks `[gpa, gpa + len)` dirty, for writes made behind vm-memory's
/// back (the kernel's, or a device's through raw pointers); the parts
/// outside guest memory are ignored.
pub fn mark_dirty(memory: &GuestMemory, gpa: u64, len: u64) {
    use vm_memory::bitmap::Bitmap;
    let Ok(len) = usize::try_from(len) else {
        return;
    };
    for slice in memory.get_slices(GuestAddress(gpa), len).flatten() {
        slice.bitmap().mark_dirty(0, slice.len());
    }
}

/// Clears every dirty bit.
pub fn clear_dirty(memory: &GuestMemory) {
    for region in memory.iter() {
        region.get_mmap().bitmap().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;
    use vmm_sys_util::tempfile::TempFile;

    fn file(size: u64) -> File {
        let f = TempFile::new().unwrap().into_file();
        f.set_len(size).unwrap();
        f
    }

    fn table() -> DmaTable {
        DmaTable::new(
            GuestMemoryAtomic::new(GuestMemory::new()),
            DmaLimits::default(),
        )
    }

    /// A map that ends at the top of the address space: its dirty pages
    /// are reported, and the walk ends (it wrapped around before).
    #[test]
    fn a_report_at_the_top_of_the_address_space() {
        let mut t = table();
        let top = 0xffff_ffff_ffff_f000;
        t.map(3, 0, top, 0xfff, Some(file(0x1000))).unwrap();
        let mem = t.memory.memory();
        mark_dirty(&mem, top + 0x10, 4);
        let bitmap = take_dirty_bitmap(&mem, top, 0xfff, DIRTY_PAGE_SIZE as u64).unwrap();
        assert_eq!(bitmap, [1, 0, 0, 0, 0, 0, 0, 0]);
    }

    /// A hugetlbfs file is mapped in whole huge pages only (skipped where
    /// the host has no free huge page).
    #[test]
    fn hugetlbfs_maps_take_whole_huge_pages() {
        // SAFETY: a valid NUL-terminated name; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"huge".as_ptr(), libc::MFD_HUGETLB) };
        if fd < 0 {
            eprintln!("SKIP: no hugetlbfs memfd here");
            return;
        }
        // SAFETY: a fresh fd, owned by the File.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let huge = 2 << 20;
        if f.set_len(huge).is_err() {
            eprintln!("SKIP: no free huge page here");
            return;
        }
        let mut t = table();
        let part = t.map(3, 0, 0x4000_0000, 0x1000, Some(f.try_clone().unwrap()));
        assert!(matches!(part, Err(DmaError::BadFile(..))), "{part:?}");
        t.map(3, 0, 0x4000_0000, huge, Some(f)).unwrap();
        t.unmap(0x4000_0000, huge).unwrap();
    }

    #[test]
    fn map_access_unmap() {
        let mut t = table();
        t.map(3, 0, 0x10000, 0x4000, Some(file(0x4000))).unwrap();
        let mem = t.memory.memory();
        mem.write_obj(0xdeadu32, GuestAddress(0x10010)).unwrap();
        assert!(mem.write_obj(0u32, GuestAddress(0x14000)).is_err());
        assert!(mem.read_obj::<u32>(GuestAddress(0xfffe)).is_err());
        assert_eq!(t.unmap(0x10000, 0x1000).unwrap_err().errno(), libc::ENOENT);
        t.unmap(0x10000, 0x4000).unwrap();
        assert!(t
            .memory
            .memory()
            .read_obj::<u32>(GuestAddress(0x10010))
            .is_err());
        // The old snapshot keeps its mapping alive, so no stray access.
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x10010)).unwrap(), 0xdead);
    }

    #[test]
    fn device_writes_to_a_read_only_map_do_not_fault() {
        let mut t = table();
        let f = file(0x2000);
        let client = f.try_clone().unwrap();
        for (flags, address) in [(DMA_MAP_FLAG_READ, 0x10000), (0, 0x20000)] {
            t.map(flags, 0, address, 0x2000, Some(f.try_clone().unwrap()))
                .unwrap();
            let mem = t.memory.memory();
            // Would be SIGSEGV with a PROT_READ mapping.
            mem.write_obj(0xdeadu32, GuestAddress(address + 0x10))
                .unwrap();
            assert_eq!(
                mem.read_obj::<u32>(GuestAddress(address + 0x10)).unwrap(),
                0xdead
            );
        }
        // The client's memory is untouched.
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&client, &mut b, 0x10).unwrap();
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn overlap_and_limits() {
        let mut t = table();
        t.map(3, 0, 0x1000, 0x2000, None).unwrap();
        let e = t.map(3, 0, 0x2000, 0x2000, None).unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST);
        let e = t.map(3, 0, u64::MAX - 10, 0x2000, None).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        let e = t.map(0x100, 0, 0x8000, 0x1000, None).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        // Beyond the end of the file.
        let e = t
            .map(3, 0x1000, 0x8000, 0x1000, Some(file(0x1000)))
            .unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        t.limits.max_maps = 1;
        assert_eq!(
            t.map(3, 0, 0x9000, 0x1000, None).unwrap_err().errno(),
            libc::ENOSPC
        );
        // Total bytes mapped with fds.
        let mut t = table();
        t.limits.max_total_bytes = 0x3000;
        t.map(3, 0, 0x10000, 0x2000, Some(file(0x2000))).unwrap();
        let e = t
            .map(3, 0, 0x20000, 0x2000, Some(file(0x2000)))
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        t.unmap(0x10000, 0x2000).unwrap();
        t.map(3, 0, 0x20000, 0x2000, Some(file(0x2000))).unwrap();
    }

    #[test]
    fn dirty_bitmap_reports_written_pages() {
        let mut t = table();
        t.map(3, 0, 0x100000, 0x10000, Some(file(0x10000))).unwrap();
        let mem = t.memory.memory();
        clear_dirty(&mem);
        mem.write_obj(1u8, GuestAddress(0x100000 + 0x3000)).unwrap();
        mem.write_obj(1u8, GuestAddress(0x100000 + 0x9fff)).unwrap();
        let bm = take_dirty_bitmap(&mem, 0x100000, 0x10000, 4096).unwrap();
        assert_eq!(bm.len(), 8);
        assert_eq!(bm[0], 1 << 3);
        assert_eq!(bm[1], 1 << 1);
        let bm = take_dirty_bitmap(&mem, 0x100000, 0x10000, 4096).unwrap();
        assert!(bm.iter().all(|b| *b == 0));
        // A range off the 4 KiB grid: the dirty page at +0x3000 straddles
        // its end, so it is reported but not cleared.
        mem.write_obj(1u8, GuestAddress(0x100000 + 0x3000)).unwrap();
        let bm = take_dirty_bitmap(&mem, 0x100000 + 0x2800, 0x1000, 4096).unwrap();
        assert_eq!(bm[0], 1);
        // Straddling pages are not cleared by a partial report.
        let bm = take_dirty_bitmap(&mem, 0x100000, 0x10000, 4096).unwrap();
        assert_eq!(bm[0], 1 << 3);
        // 2 MiB report pages fold the 4 KiB ones.
        mem.write_obj(1u8, GuestAddress(0x100000 + 0xf000)).unwrap();
        let bm = take_dirty_bitmap(&mem, 0x100000, 0x10000, 2 << 20).unwrap();
        assert_eq!(bm, vec![1, 0, 0, 0, 0, 0, 0, 0]);
    }
}
