//! A test-side virtio-pci driver, as a VMM's guest would run it: split
//! virtqueues in a memfd that plays guest RAM ([`GuestRam`]), shared with
//! the server by DMA_MAP, and driven through a vfio-user connection
//! ([`Transport`]) exactly as Cloud Hypervisor drives a `--user-device`.
//!
//! The driver ([`VirtioDriver`]) is generic over the [`Transport`]: the
//! published `vfio_user::Client` (what Cloud Hypervisor uses) or the
//! raw-socket [`RawClient`], which can also send the migration commands
//! (DEVICE_FEATURE, MIG_DATA_READ/WRITE) the published client cannot. The
//! same driver (same guest memory, queues and indices) can move from one
//! connection to another ([`VirtioDriver::attach_to`],
//! [`VirtioDriver::replace_client`]), as a VMM does across a migration or a
//! restore.
//!
//! virtio-blk requests are built by [`VirtioDriver::blk_request`] and
//! friends (fresh buffers per request, for tests) or by
//! [`VirtioDriver::blk_push`] on buffers allocated once with
//! [`VirtioDriver::blk_buffers`] (for benchmarks that run millions of
//! requests). Failures panic: this is test and benchmark code.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vfio_user::Client;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::RawClient;

/// vfio-user region index of PCI config space.
pub const CONFIG_REGION: u32 = 7;
/// vfio-user IRQ index of MSI-X.
pub const MSIX_INDEX: u32 = 2;
/// SET_IRQS flag: the data are eventfds.
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// SET_IRQS flag: no data.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// SET_IRQS flag: the trigger action.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// Guest-physical base of the test's RAM.
pub const GUEST_BASE: u64 = 0x1_0000_0000;
/// Size of the test's RAM.
pub const GUEST_SIZE: u64 = 64 << 20;

/// virtio-blk request type: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// virtio-blk request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// virtio-blk request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// virtio-blk request type: get the serial.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// virtio-blk request type: discard.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// virtio-blk request type: write zeroes.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// virtio-blk status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// virtio-blk status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// virtio-blk status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Descriptor flag: the chain continues in `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes the buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Guest RAM: a memfd mapped here and shared with the server by DMA_MAP.
pub struct GuestRam {
    /// The memfd (passed with DMA_MAP).
    pub file: File,
    ptr: *mut u8,
    next: u64,
}

// SAFETY: the mapping is owned by this struct and only accessed through it.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// [`GUEST_SIZE`] bytes of fresh, zeroed RAM, mapped here.
    #[allow(clippy::new_without_default)]
    pub fn new() -> GuestRam {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a new, owned descriptor.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(GUEST_SIZE).unwrap();
        // SAFETY: mapping a file we own, MAP_SHARED, whole length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                GUEST_SIZE as usize,
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
            next: 0x1000,
        }
    }

    /// A memfd of `len` bytes that is never touched (no memory used).
    pub fn sparse_file(len: u64) -> File {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"sparse".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a new, owned descriptor.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    /// Allocates `len` bytes aligned to `align`; returns the guest address.
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let off = self.next.next_multiple_of(align);
        self.next = off + len;
        assert!(self.next <= GUEST_SIZE, "guest RAM exhausted");
        GUEST_BASE + off
    }

    fn offset(&self, gpa: u64, len: usize) -> usize {
        let off = gpa.checked_sub(GUEST_BASE).expect("address below RAM") as usize;
        assert!(off + len <= GUEST_SIZE as usize);
        off
    }

    /// Volatile copies: the server writes the same memory concurrently.
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
    pub fn read_into(&self, gpa: u64, buf: &mut [u8]) {
        let off = self.offset(gpa, buf.len());
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: in bounds of the live mapping (checked by offset()).
            *b = unsafe { self.ptr.add(off + i).read_volatile() };
        }
    }

    /// Writes a little-endian u16 at `gpa`; one atomic store when aligned
    /// (ring indices: the server reads them while the driver writes).
    pub fn write_u16(&self, gpa: u64, v: u16) {
        match self.aligned::<AtomicU16>(gpa) {
            Some(a) => a.store(v.to_le(), Ordering::Release),
            None => self.write(gpa, &v.to_le_bytes()),
        }
    }
    /// Writes a little-endian u32 at `gpa` (atomically when aligned).
    pub fn write_u32(&self, gpa: u64, v: u32) {
        match self.aligned::<AtomicU32>(gpa) {
            Some(a) => a.store(v.to_le(), Ordering::Release),
            None => self.write(gpa, &v.to_le_bytes()),
        }
    }
    /// Writes a little-endian u64 at `gpa` (atomically when aligned).
    pub fn write_u64(&self, gpa: u64, v: u64) {
        match self.aligned::<AtomicU64>(gpa) {
            Some(a) => a.store(v.to_le(), Ordering::Release),
            None => self.write(gpa, &v.to_le_bytes()),
        }
    }
    /// Reads a little-endian u16 at `gpa`; one atomic load when aligned,
    /// so an index the server is updating is never read torn.
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

    /// The atomic `A` at `gpa`, if `gpa` is aligned for it.
    fn aligned<A>(&self, gpa: u64) -> Option<&A> {
        let size = std::mem::size_of::<A>();
        let off = self.offset(gpa, size);
        // SAFETY: in bounds of the live mapping (checked by offset()).
        let ptr = unsafe { self.ptr.add(off) };
        // SAFETY: `ptr` is valid for `size` bytes while `self` lives, aligned
        // for `A` (checked), and the mapping is only ever accessed by
        // volatile or atomic accesses, here and in the server.
        (ptr as usize)
            .is_multiple_of(std::mem::align_of::<A>())
            .then(|| unsafe { &*ptr.cast::<A>() })
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in new().
        unsafe { libc::munmap(self.ptr.cast(), GUEST_SIZE as usize) };
    }
}

/// Where a virtio structure lives.
#[derive(Clone, Copy, Debug, Default)]
pub struct CapLoc {
    /// BAR index.
    pub bar: u32,
    /// Offset in the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

/// What the virtio driver needs from a vfio-user connection. Failures
/// panic: these are tests.
pub trait Transport {
    /// REGION_READ.
    fn read_region(&mut self, index: u32, offset: u64, data: &mut [u8]);
    /// REGION_WRITE.
    fn write_region(&mut self, index: u32, offset: u64, data: &[u8]);
    /// DMA_MAP of `size` bytes of `fd` at `offset` to guest address `address`.
    fn map_dma(&mut self, offset: u64, address: u64, size: u64, fd: RawFd);
    /// SET_IRQS TRIGGER|EVENTFD of `fds` on vectors `start..` of `index`.
    fn set_irq_eventfds(&mut self, index: u32, start: u32, fds: &[RawFd]);
    /// DEVICE_RESET.
    fn reset_device(&mut self);
    /// The raw client, for the commands the published client cannot send
    /// (migration).
    fn raw(&mut self) -> Option<&mut RawClient> {
        None
    }
}

impl Transport for Client {
    fn read_region(&mut self, index: u32, offset: u64, data: &mut [u8]) {
        self.region_read(index, offset, data).unwrap();
    }
    fn write_region(&mut self, index: u32, offset: u64, data: &[u8]) {
        self.region_write(index, offset, data).unwrap();
    }
    fn map_dma(&mut self, offset: u64, address: u64, size: u64, fd: RawFd) {
        self.dma_map(offset, address, size, fd).unwrap();
    }
    fn set_irq_eventfds(&mut self, index: u32, start: u32, fds: &[RawFd]) {
        self.set_irqs(
            index,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            start,
            fds.len() as u32,
            fds,
        )
        .unwrap();
    }
    fn reset_device(&mut self) {
        self.reset().unwrap();
    }
}

impl Transport for RawClient {
    #[track_caller]
    fn read_region(&mut self, index: u32, offset: u64, data: &mut [u8]) {
        let got = self.read_ok(index, offset, data.len() as u32);
        data.copy_from_slice(&got);
    }
    #[track_caller]
    fn write_region(&mut self, index: u32, offset: u64, data: &[u8]) {
        self.write_ok(index, offset, data);
    }
    #[track_caller]
    fn map_dma(&mut self, offset: u64, address: u64, size: u64, fd: RawFd) {
        self.dma_map(offset, address, size, Some(fd)).ok();
    }
    #[track_caller]
    fn set_irq_eventfds(&mut self, index: u32, start: u32, fds: &[RawFd]) {
        self.set_irqs(
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            fds.len() as u32,
            &[],
            fds,
        )
        .ok();
    }
    #[track_caller]
    fn reset_device(&mut self) {
        self.reset().ok();
    }
    fn raw(&mut self) -> Option<&mut RawClient> {
        Some(self)
    }
}

/// One split virtqueue in guest RAM.
pub struct Vq {
    /// Number of descriptors.
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
    /// The driver's next `avail.idx`.
    pub next_avail: u16,
    /// The used entries collected so far.
    pub last_used: u16,
    /// Head of the free descriptor list.
    pub free_head: u16,
    /// `queue_notify_off` read from the device.
    pub notify_off: u16,
    /// The MSI-X eventfd of the queue's vector.
    pub eventfd: EventFd,
}

/// A submitted virtio-blk request and the guest addresses it uses.
#[derive(Clone, Debug)]
pub struct BlkReq {
    /// Queue index.
    pub queue: usize,
    /// Head descriptor (the request's id).
    pub head: u16,
    /// The 16-byte request header (device-readable).
    pub header: u64,
    /// The status byte (device-writable).
    pub status: u64,
    /// Data the device reads (`OUT` and friends).
    pub data_out: Option<(u64, u32)>,
    /// Data the device writes (`IN`, `GET_ID`).
    pub data_in: Option<(u64, u32)>,
}

/// A virtio-pci driver over a [`Transport`] (by default the published
/// `vfio_user::Client`, as Cloud Hypervisor).
pub struct VirtioDriver<T: Transport = Client> {
    /// The connection to the device.
    pub client: T,
    /// Guest RAM, DMA-mapped into the device.
    pub ram: GuestRam,
    /// The common configuration structure.
    pub common: CapLoc,
    /// The notification area.
    pub notify: CapLoc,
    /// `notify_off_multiplier`.
    pub notify_mult: u32,
    /// The ISR status byte.
    pub isr: CapLoc,
    /// The device configuration space.
    pub device: CapLoc,
    /// The queues set up by [`VirtioDriver::init`].
    pub queues: Vec<Vq>,
    /// The MSI-X eventfd of the configuration vector (0).
    pub config_eventfd: EventFd,
    /// The negotiated features.
    pub features: u64,
    /// BAR sizes found by sizing (0: no BAR).
    pub bar_sizes: [u64; 6],
    /// Submitted requests not yet collected.
    pending: Vec<BlkReq>,
    /// Completed heads not yet collected.
    done: std::collections::HashSet<(usize, u16)>,
}

/// Reads `len` bytes of PCI config space at `off`.
pub fn cfg_read(client: &mut impl Transport, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    client.read_region(CONFIG_REGION, off, &mut b);
    b
}

/// Reads a little-endian u32 of PCI config space at `off`.
pub fn cfg_read32(client: &mut impl Transport, off: u64) -> u32 {
    u32::from_le_bytes(cfg_read(client, off, 4).try_into().unwrap())
}

/// Writes `data` to PCI config space at `off`.
pub fn cfg_write(client: &mut impl Transport, off: u64, data: &[u8]) {
    client.write_region(CONFIG_REGION, off, data);
}

/// Sizes the BARs through config space, as Cloud Hypervisor does.
pub fn size_bars(client: &mut impl Transport) -> [u64; 6] {
    let mut sizes = [0u64; 6];
    let mut i = 0;
    while i < 6 {
        let off = 0x10 + 4 * i as u64;
        let orig = cfg_read32(client, off);
        cfg_write(client, off, &0xffff_ffffu32.to_le_bytes());
        let low = cfg_read32(client, off);
        cfg_write(client, off, &orig.to_le_bytes());
        if low == 0 {
            i += 1;
            continue;
        }
        let is_io = low & 1 == 1;
        let is_64 = !is_io && (low >> 1) & 3 == 2;
        let mask_low = if is_io { low & !3 } else { low & !0xf };
        let mut mask = mask_low as u64;
        if is_64 {
            let off_hi = off + 4;
            let orig_hi = cfg_read32(client, off_hi);
            cfg_write(client, off_hi, &0xffff_ffffu32.to_le_bytes());
            let hi = cfg_read32(client, off_hi);
            cfg_write(client, off_hi, &orig_hi.to_le_bytes());
            mask |= (hi as u64) << 32;
        } else {
            mask |= 0xffff_ffff_0000_0000;
        }
        sizes[i] = (!mask).wrapping_add(1);
        i += if is_64 { 2 } else { 1 };
    }
    sizes
}

impl VirtioDriver<Client> {
    /// Connects like Cloud Hypervisor: VERSION + regions (in Client::new),
    /// DMA_MAP of guest RAM, BAR sizing, capability walk.
    pub fn connect(socket: &Path) -> VirtioDriver<Client> {
        let client = Client::new(socket).expect("vfio_user::Client::new");
        VirtioDriver::connect_with(client)
    }
}

impl VirtioDriver<RawClient> {
    /// The same over the raw client (VERSION with QEMU-like capabilities,
    /// no region queries).
    pub fn connect_raw(socket: &Path) -> VirtioDriver<RawClient> {
        VirtioDriver::connect_with(RawClient::connect_negotiated(socket))
    }

    /// The raw client (migration commands).
    pub fn raw(&mut self) -> &mut RawClient {
        &mut self.client
    }
}

impl<T: Transport> VirtioDriver<T> {
    /// Fresh guest RAM mapped into the device, BARs sized, capabilities
    /// found; the device is not initialised.
    pub fn connect_with(mut client: T) -> VirtioDriver<T> {
        let ram = GuestRam::new();
        client.map_dma(0, GUEST_BASE, GUEST_SIZE, ram.file.as_raw_fd());
        let bar_sizes = size_bars(&mut client);
        let mut d = VirtioDriver {
            client,
            ram,
            common: CapLoc::default(),
            notify: CapLoc::default(),
            notify_mult: 0,
            isr: CapLoc::default(),
            device: CapLoc::default(),
            queues: Vec::new(),
            config_eventfd: EventFd::new(EFD_NONBLOCK).unwrap(),
            features: 0,
            bar_sizes,
            pending: Vec::new(),
            done: std::collections::HashSet::new(),
        };
        d.find_caps();
        d
    }

    /// The MSI-X eventfds by vector: 0 = configuration, i + 1 = queue i.
    pub fn msix_fds(&self) -> Vec<RawFd> {
        std::iter::once(self.config_eventfd.as_raw_fd())
            .chain(self.queues.iter().map(|q| q.eventfd.as_raw_fd()))
            .collect()
    }

    /// Gives another connection what the VMM gives every device: DMA_MAP
    /// of the SAME guest memory and SET_IRQS with the SAME MSI-X eventfds
    /// (the VMM's irqfds). Nothing is written to the device itself.
    pub fn attach_to(&self, other: &mut impl Transport) {
        other.map_dma(0, GUEST_BASE, GUEST_SIZE, self.ram.file.as_raw_fd());
        let fds = self.msix_fds();
        other.set_irq_eventfds(MSIX_INDEX, 0, &fds);
    }

    /// Continues on `client` (already attached with
    /// [`VirtioDriver::attach_to`]); returns the old connection.
    pub fn replace_client(&mut self, client: T) -> T {
        std::mem::replace(&mut self.client, client)
    }

    /// [`VirtioDriver::attach_to`] then [`VirtioDriver::replace_client`]:
    /// the driver carries on with a device restored from a snapshot.
    pub fn reconnect(&mut self, mut client: T) -> T {
        self.attach_to(&mut client);
        self.replace_client(client)
    }

    fn find_caps(&mut self) {
        let status = u16::from_le_bytes(cfg_read(&mut self.client, 6, 2).try_into().unwrap());
        assert!(status & 0x10 != 0, "no capability list");
        let mut ptr = cfg_read(&mut self.client, 0x34, 1)[0] as u64;
        let mut seen = 0;
        while ptr != 0 && seen < 48 {
            let c = cfg_read(&mut self.client, ptr, 20);
            if c[0] == 0x09 {
                let loc = CapLoc {
                    bar: c[4] as u32,
                    offset: u32::from_le_bytes(c[8..12].try_into().unwrap()) as u64,
                    length: u32::from_le_bytes(c[12..16].try_into().unwrap()),
                };
                match c[3] {
                    1 => self.common = loc,
                    2 => {
                        self.notify = loc;
                        self.notify_mult = u32::from_le_bytes(c[16..20].try_into().unwrap());
                    }
                    3 => self.isr = loc,
                    4 => self.device = loc,
                    _ => {}
                }
            }
            ptr = c[1] as u64;
            seen += 1;
        }
        assert!(self.common.length >= 0x38, "no common cfg capability");
        assert!(self.notify.length > 0, "no notify capability");
    }

    /// Writes `data` at `off` of the common configuration structure.
    pub fn common_write(&mut self, off: u64, data: &[u8]) {
        let (bar, base) = (self.common.bar, self.common.offset);
        self.client.write_region(bar, base + off, data);
    }

    /// Reads `len` bytes at `off` of the common configuration structure.
    pub fn common_read(&mut self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        let (bar, base) = (self.common.bar, self.common.offset);
        self.client.read_region(bar, base + off, &mut b);
        b
    }

    /// Reads a little-endian u64 at `off` of the common configuration
    /// structure.
    pub fn common_read_u64(&mut self, off: u64) -> u64 {
        u64::from_le_bytes(self.common_read(off, 8).try_into().unwrap())
    }

    /// The device status.
    pub fn status(&mut self) -> u8 {
        self.common_read(0x14, 1)[0]
    }

    /// Writes the device status.
    pub fn set_status(&mut self, s: u8) {
        self.common_write(0x14, &[s]);
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&mut self) -> u64 {
        self.common_write(0x00, &0u32.to_le_bytes());
        let lo = u32::from_le_bytes(self.common_read(0x04, 4).try_into().unwrap()) as u64;
        self.common_write(0x00, &1u32.to_le_bytes());
        let hi = u32::from_le_bytes(self.common_read(0x04, 4).try_into().unwrap()) as u64;
        lo | (hi << 32)
    }

    /// Reads `len` bytes at `off` of the device configuration space.
    pub fn device_config(&mut self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        let (bar, base) = (self.device.bar, self.device.offset);
        self.client.read_region(bar, base + off, &mut b);
        b
    }

    /// Enables MSI-X with one eventfd per vector (config + queues) the way
    /// Cloud Hypervisor does: SET_IRQS first, then the enable bit.
    pub fn enable_msix(&mut self, nvec: u32) -> Vec<EventFd> {
        let fds: Vec<EventFd> = (0..nvec)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let raw: Vec<i32> = fds.iter().map(|e| e.as_raw_fd()).collect();
        self.client.set_irq_eventfds(MSIX_INDEX, 0, &raw);
        // Find the MSI-X capability and set the enable bit.
        let mut ptr = cfg_read(&mut self.client, 0x34, 1)[0] as u64;
        while ptr != 0 {
            let c = cfg_read(&mut self.client, ptr, 4);
            if c[0] == 0x11 {
                let ctl = u16::from_le_bytes([c[2], c[3]]) | 0x8000;
                cfg_write(&mut self.client, ptr + 2, &ctl.to_le_bytes());
                break;
            }
            ptr = c[1] as u64;
        }
        fds
    }

    /// Full initialisation: reset, features (`want` & offered), every queue
    /// with `size` descriptors and vector i+1, DRIVER_OK. Returns the
    /// negotiated features.
    pub fn init(&mut self, want: u64, size: u16) -> u64 {
        self.set_status(0);
        assert_eq!(self.status(), 0);
        self.set_status(1);
        self.set_status(1 | 2);
        let offered = self.device_features();
        let features = offered & want;
        self.common_write(0x08, &0u32.to_le_bytes());
        self.common_write(0x0c, &(features as u32).to_le_bytes());
        self.common_write(0x08, &1u32.to_le_bytes());
        self.common_write(0x0c, &((features >> 32) as u32).to_le_bytes());
        self.set_status(1 | 2 | 8);
        assert!(self.status() & 8 != 0, "FEATURES_OK refused");
        self.common_write(0x10, &0u16.to_le_bytes()); // msix_config = 0
        let nq = u16::from_le_bytes(self.common_read(0x12, 2).try_into().unwrap());
        let mut fds = self.enable_msix(nq as u32 + 1);
        self.config_eventfd = fds.remove(0);
        self.queues.clear();
        self.pending.clear();
        self.done.clear();
        for (q, eventfd) in (0..nq).zip(fds) {
            self.common_write(0x16, &q.to_le_bytes());
            let max = u16::from_le_bytes(self.common_read(0x18, 2).try_into().unwrap());
            let size = size.min(max);
            self.common_write(0x18, &size.to_le_bytes());
            self.common_write(0x1a, &(q + 1).to_le_bytes());
            let n = size as u64;
            let desc = self.ram.alloc(16 * n, 4096);
            let avail = self.ram.alloc(6 + 2 * n, 2);
            let used = self.ram.alloc(6 + 8 * n, 4096);
            self.common_write(0x20, &desc.to_le_bytes());
            self.common_write(0x28, &avail.to_le_bytes());
            self.common_write(0x30, &used.to_le_bytes());
            let notify_off = u16::from_le_bytes(self.common_read(0x1e, 2).try_into().unwrap());
            self.common_write(0x1c, &1u16.to_le_bytes());
            // Free list: chain every descriptor.
            for i in 0..size {
                self.ram
                    .write_u16(desc + 16 * i as u64 + 14, (i + 1) % size);
            }
            self.queues.push(Vq {
                size,
                desc,
                avail,
                used,
                next_avail: 0,
                last_used: 0,
                free_head: 0,
                notify_off,
                eventfd,
            });
        }
        self.set_status(1 | 2 | 8 | 4);
        self.features = features;
        features
    }

    /// Puts a chain of `(addr, len, device_writes)` buffers on queue `q`
    /// and returns its head; does not notify.
    pub fn push(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let in_flight = self.queues[q]
            .next_avail
            .wrapping_sub(self.queues[q].last_used);
        assert!(
            (in_flight as usize + 1) * bufs.len() <= self.queues[q].size as usize,
            "test bug: descriptor table of queue {q} would overflow"
        );
        let vq = &mut self.queues[q];
        let head = vq.free_head;
        let mut idx = head;
        for (i, (addr, len, w)) in bufs.iter().enumerate() {
            let d = vq.desc + 16 * idx as u64;
            self.ram.write_u64(d, *addr);
            self.ram.write_u32(d + 8, *len);
            let mut flags = if *w { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = self.ram.read_u16(d + 14);
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.ram.write_u16(d + 12, flags);
            if i + 1 < bufs.len() {
                idx = next;
            } else {
                vq.free_head = next;
            }
        }
        let slot = vq.avail + 4 + 2 * (vq.next_avail % vq.size) as u64;
        self.ram.write_u16(slot, head);
        vq.next_avail = vq.next_avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.ram.write_u16(vq.avail + 2, vq.next_avail);
        head
    }

    /// Notifies queue `q` (a BAR write, as the guest's doorbell).
    pub fn kick(&mut self, q: usize) {
        let (bar, off) = self.notify_register(q);
        self.client
            .write_region(bar, off, &(q as u16).to_le_bytes());
    }

    /// Region index and offset of queue `q`'s notify register (what
    /// [`VirtioDriver::kick`] writes `q` to).
    pub fn notify_register(&self, q: usize) -> (u32, u64) {
        let off = self.notify.offset + self.queues[q].notify_off as u64 * self.notify_mult as u64;
        (self.notify.bar, off)
    }

    /// Whether queue `q` needs a doorbell for the buffers added since
    /// its `avail.idx` was `old` (Linux's `virtqueue_kick_prepare`): with
    /// `VIRTIO_F_EVENT_IDX` when the device's available event lies in
    /// `[old, next_avail)`, otherwise unless the device set
    /// `VRING_USED_F_NO_NOTIFY`.
    pub fn kick_needed(&self, q: usize, old: u16) -> bool {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let vq = &self.queues[q];
        if self.features & (1 << 29) != 0 {
            let avail_event = self.ram.read_u16(vq.used + 4 + 8 * vq.size as u64);
            vq.next_avail.wrapping_sub(avail_event).wrapping_sub(1)
                < vq.next_avail.wrapping_sub(old)
        } else {
            self.ram.read_u16(vq.used) & 1 == 0
        }
    }

    /// Asks for an interrupt at the next used entry of queue `q` (Linux's
    /// `virtqueue_enable_cb`); returns false if entries arrived meanwhile,
    /// so the caller collects them instead of sleeping.
    pub fn enable_interrupt(&mut self, q: usize) -> bool {
        let vq = &self.queues[q];
        if self.features & (1 << 29) != 0 {
            let used_event = vq.avail + 4 + 2 * vq.size as u64;
            self.ram.write_u16(used_event, vq.last_used);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.ram.read_u16(vq.used + 2) == vq.last_used
    }

    /// One round trip (a read of the device status): the server runs the
    /// device's deferred work after every reply, so once this returns the
    /// device has worked on the queues the earlier doorbells marked (at
    /// least one batch of each). A device that did nothing by then is not
    /// going to.
    pub fn settle(&mut self) {
        self.status();
    }

    /// Waits (up to 10 s) until the device's `used.idx` of queue `q` is
    /// `idx`, without collecting the entries.
    #[track_caller]
    pub fn wait_used_idx(&self, q: usize, idx: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx(q) != idx {
            assert!(
                Instant::now() < deadline,
                "used.idx of queue {q} stuck at {}, want {idx}",
                self.used_idx(q)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The device's `used.idx` of queue `q`, read from guest RAM.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.ram.read_u16(self.queues[q].used + 2)
    }

    /// Collects the used entries `(head, len)` of queue `q` that are there
    /// now (no waiting), returning their chains to the free list.
    pub fn poll_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        self.poll_used_into(q, &mut out);
        out
    }

    /// [`VirtioDriver::poll_used`] appending to `out` (no allocation once
    /// `out` has grown); returns the number of entries appended.
    pub fn poll_used_into(&mut self, q: usize, out: &mut Vec<(u16, u32)>) -> usize {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let used_idx = self.used_idx(q);
        let before = out.len();
        while self.queues[q].last_used != used_idx {
            let vq = &mut self.queues[q];
            let e = vq.used + 4 + 8 * (vq.last_used % vq.size) as u64;
            vq.last_used = vq.last_used.wrapping_add(1);
            let id = self.ram.read_u32(e) as u16;
            let len = self.ram.read_u32(e + 4);
            out.push((id, len));
            self.free_chain(q, id);
        }
        out.len() - before
    }

    /// Collects used entries `(head, len)` of queue `q` until `n` arrived,
    /// waiting on its interrupt eventfd.
    pub fn wait_used(&mut self, q: usize, n: usize) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        loop {
            out.extend(self.poll_used(q));
            if out.len() >= n {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for used entries"
            );
            if !self.enable_interrupt(q) {
                continue;
            }
            let mut pfd = libc::pollfd {
                fd: self.queues[q].eventfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one valid fd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let _ = self.queues[q].eventfd.read();
        }
    }

    /// Waits up to 5 s for the interrupt eventfd of queue `q`; returns the
    /// count read (panics on timeout).
    #[track_caller]
    pub fn expect_interrupt(&self, q: usize) -> u64 {
        let fd = &self.queues[q].eventfd;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(n) = fd.read() {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "no interrupt on queue {q}'s vector"
            );
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one valid fd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
        }
    }

    /// Drops any interrupt already signalled on queue `q`'s eventfd.
    pub fn drain_interrupt(&self, q: usize) {
        let _ = self.queues[q].eventfd.read();
    }

    fn free_chain(&mut self, q: usize, head: u16) {
        let vq = &mut self.queues[q];
        let mut idx = head;
        loop {
            let d = vq.desc + 16 * idx as u64;
            let flags = self.ram.read_u16(d + 12);
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                self.ram.write_u16(d + 14, vq.free_head);
                break;
            }
            idx = self.ram.read_u16(d + 14);
        }
        vq.free_head = head;
    }

    /// One virtio-blk request: returns (status, data read back).
    pub fn blk_request(
        &mut self,
        q: usize,
        req_type: u32,
        sector: u64,
        data: &[u8],
        data_in_len: u32,
    ) -> (u8, Vec<u8>) {
        let head = self.blk_submit(q, req_type, sector, data, data_in_len);
        self.kick(q);
        self.blk_complete(q, head)
    }

    /// Queues a request without kicking; returns its id (head).
    pub fn blk_submit(
        &mut self,
        q: usize,
        req_type: u32,
        sector: u64,
        data: &[u8],
        data_in_len: u32,
    ) -> u16 {
        self.blk_submit_req(q, req_type, sector, data, data_in_len)
            .head
    }

    /// Queues a request without kicking; returns where everything is.
    pub fn blk_submit_req(
        &mut self,
        q: usize,
        req_type: u32,
        sector: u64,
        data: &[u8],
        data_in_len: u32,
    ) -> BlkReq {
        let hdr = self.ram.alloc(16, 16);
        self.ram.write_u32(hdr, req_type);
        self.ram.write_u32(hdr + 4, 0);
        self.ram.write_u64(hdr + 8, sector);
        let status = self.ram.alloc(1, 1);
        self.ram.write(status, &[0xff]);
        let mut bufs = vec![(hdr, 16, false)];
        let mut data_out = None;
        let mut data_in = None;
        if !data.is_empty() {
            let b = self.ram.alloc(data.len() as u64, 512);
            self.ram.write(b, data);
            bufs.push((b, data.len() as u32, false));
            data_out = Some((b, data.len() as u32));
        }
        if data_in_len > 0 {
            let b = self.ram.alloc(data_in_len as u64, 512);
            bufs.push((b, data_in_len, true));
            data_in = Some((b, data_in_len));
        }
        bufs.push((status, 1, true));
        let head = self.push(q, &bufs);
        let req = BlkReq {
            queue: q,
            head,
            header: hdr,
            status,
            data_out,
            data_in,
        };
        self.pending.push(req.clone());
        req
    }

    /// Status and data-in of a submitted request whose used entry was
    /// collected (by [`VirtioDriver::poll_used`] or
    /// [`VirtioDriver::wait_used`]); forgets the request.
    pub fn take_result(&mut self, q: usize, head: u16) -> (u8, Vec<u8>) {
        self.done.remove(&(q, head));
        let i = self
            .pending
            .iter()
            .position(|m| m.queue == q && m.head == head)
            .expect("unknown request");
        let req = self.pending.remove(i);
        let status = self.ram.read(req.status, 1)[0];
        let data = req
            .data_in
            .map(|(a, l)| self.ram.read(a, l as usize))
            .unwrap_or_default();
        (status, data)
    }

    /// Waits for request `head` on queue `q`; returns (status, data in).
    pub fn blk_complete(&mut self, q: usize, head: u16) -> (u8, Vec<u8>) {
        while !self.done.contains(&(q, head)) {
            for (id, _len) in self.wait_used(q, 1) {
                self.done.insert((q, id));
            }
        }
        self.take_result(q, head)
    }

    /// Allocates, once, the guest buffers of a virtio-blk request with
    /// `data_len` bytes of data, for [`VirtioDriver::blk_push`].
    pub fn blk_buffers(&mut self, data_len: u32) -> BlkBuffers {
        BlkBuffers {
            header: self.ram.alloc(16, 16),
            data: self.ram.alloc(u64::from(data_len), 4096),
            data_len,
            status: self.ram.alloc(1, 1),
        }
    }

    /// Queues a virtio-blk request of `req_type` at `sector` on `bufs`
    /// without kicking; returns its head. The data buffer is
    /// device-writable for [`VIRTIO_BLK_T_IN`] and device-readable for
    /// every other type; its contents are left as they are. Unlike
    /// [`VirtioDriver::blk_submit`] nothing is allocated and the request is
    /// not remembered: collect it with [`VirtioDriver::poll_used_into`] and
    /// read its status with [`BlkBuffers::status`]. `bufs` must not be in
    /// use by another request in flight.
    pub fn blk_push(&mut self, q: usize, req_type: u32, sector: u64, bufs: &BlkBuffers) -> u16 {
        self.ram.write_u32(bufs.header, req_type);
        self.ram.write_u32(bufs.header + 4, 0);
        self.ram.write_u64(bufs.header + 8, sector);
        self.ram.write(bufs.status, &[0xff]);
        let data_in = req_type == VIRTIO_BLK_T_IN;
        self.push(
            q,
            &[
                (bufs.header, 16, false),
                (bufs.data, bufs.data_len, data_in),
                (bufs.status, 1, true),
            ],
        )
    }
}

/// The guest buffers of one reusable virtio-blk request (from
/// [`VirtioDriver::blk_buffers`]).
#[derive(Clone, Copy, Debug)]
pub struct BlkBuffers {
    /// The 16-byte request header.
    pub header: u64,
    /// The data buffer.
    pub data: u64,
    /// Its length in bytes.
    pub data_len: u32,
    /// The status byte.
    pub status: u64,
}

impl BlkBuffers {
    /// The status byte the device wrote (0xff until it completes).
    pub fn status(&self, ram: &GuestRam) -> u8 {
        let mut b = [0u8];
        ram.read_into(self.status, &mut b);
        b[0]
    }
}
