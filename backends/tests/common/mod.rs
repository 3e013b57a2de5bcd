//! A minimal virtio-pci driver for tests: guest memory from memfds, rings
//! written by hand, the device driven through the vfio-user `Device`
//! interface of `PciAdapter` (config space region and BAR 0) exactly as a
//! client would.

#![allow(dead_code)]

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;

use backends::storage::BlockBackend;
use backends::virtio_blk::{VirtioBlkConfig, VirtioBlkPci};
use vfio_user_server::device::{AsLifecycle, Device, DeviceContext, Interest};
use vfio_user_server::guest_memory::{GuestMemory, GuestMemoryHandle};
use vfio_user_server::irq::Irqs;
use vfio_user_server::pci::PciAdapter;
use vfio_user_server::wire::*;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryAtomic, GuestRegionMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest RAM: two 1 MiB regions with a hole in between.
pub const RAM_A: u64 = 0;
pub const RAM_B: u64 = 0x20_0000;
pub const RAM_SIZE: u64 = 0x10_0000;
/// An address in the hole.
pub const HOLE: u64 = 0x15_0000;
/// Where data buffers are allocated from.
pub const DATA_BASE: u64 = 0x8_0000;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

pub const S_ACKNOWLEDGE: u8 = 1;
pub const S_DRIVER: u8 = 2;
pub const S_DRIVER_OK: u8 = 4;
pub const S_FEATURES_OK: u8 = 8;

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_INDIRECT: u64 = 1 << 28;
pub const BLK_F_FLUSH: u64 = 1 << 9;
pub const BLK_F_DISCARD: u64 = 1 << 13;
pub const BLK_F_WRITE_ZEROES: u64 = 1 << 14;
pub const BLK_F_MQ: u64 = 1 << 12;
pub const BLK_F_RO: u64 = 1 << 5;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Common config offsets.
pub mod cc {
    pub const DFSELECT: u64 = 0x00;
    pub const DF: u64 = 0x04;
    pub const GFSELECT: u64 = 0x08;
    pub const GF: u64 = 0x0c;
    pub const MSIX: u64 = 0x10;
    pub const NUMQ: u64 = 0x12;
    pub const STATUS: u64 = 0x14;
    pub const CFGGEN: u64 = 0x15;
    pub const Q_SELECT: u64 = 0x16;
    pub const Q_SIZE: u64 = 0x18;
    pub const Q_MSIX: u64 = 0x1a;
    pub const Q_ENABLE: u64 = 0x1c;
    pub const Q_NOFF: u64 = 0x1e;
    pub const Q_DESCLO: u64 = 0x20;
    pub const Q_DESCHI: u64 = 0x24;
    pub const Q_AVAILLO: u64 = 0x28;
    pub const Q_AVAILHI: u64 = 0x2c;
    pub const Q_USEDLO: u64 = 0x30;
    pub const Q_USEDHI: u64 = 0x34;
}

fn memfd(size: u64) -> File {
    let name = c"guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the returned fd is
    // checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a freshly created, owned descriptor.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// Guest memory as the server builds it: shared memfd mappings with dirty
/// bitmaps.
pub fn guest_memory() -> GuestMemory {
    let regions = [RAM_A, RAM_B]
        .iter()
        .map(|&base| {
            let len = RAM_SIZE as usize;
            let region = MmapRegionBuilder::new_with_bitmap(
                len,
                AtomicBitmap::new(len, NonZeroUsize::new(4096).unwrap()),
            )
            .with_file_offset(FileOffset::new(memfd(RAM_SIZE), 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .unwrap();
            GuestRegionMmap::new(region, GuestAddress(base)).unwrap()
        })
        .collect::<Vec<_>>();
    GuestMemory::from_regions(regions).unwrap()
}

/// An eventfd and a dup of it to hand to `Irqs::set_irqs`.
pub fn eventfd() -> (EventFd, File) {
    let e = EventFd::new(EFD_NONBLOCK).unwrap();
    let dup = e.try_clone().unwrap();
    // SAFETY: `into_raw_fd` hands over ownership of a valid descriptor.
    let f = unsafe { File::from_raw_fd(dup.into_raw_fd()) };
    (e, f)
}

/// Whether `e` was signalled (and consumes the count).
pub fn fired(e: &EventFd) -> bool {
    e.read().is_ok()
}

/// A descriptor to place in a chain.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

/// Device-readable buffer.
pub fn r(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        flags: 0,
    }
}

/// Device-writable buffer.
pub fn w(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        flags: VRING_DESC_F_WRITE,
    }
}

/// Driver-side view of one split virtqueue.
#[derive(Clone, Debug)]
pub struct Vq {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub avail_idx: u16,
    pub used_seen: u16,
    pub next_desc: u16,
    pub notify_off: u16,
}

impl Vq {
    pub fn used_event_addr(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }
    pub fn avail_event_addr(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }
}

/// Capability offsets found in config space.
#[derive(Clone, Debug, Default)]
pub struct Caps {
    pub msix: usize,
    pub pcie: Option<usize>,
    pub pm: Option<usize>,
    pub common: u64,
    pub isr: u64,
    pub device: u64,
    pub notify: u64,
    pub notify_mult: u32,
    pub pci_cfg: Option<usize>,
    /// (cfg_type, bar, offset, length) of every virtio capability.
    pub virtio: Vec<(u8, u8, u32, u32)>,
}

/// The test driver.
pub struct Driver {
    pub adapter: PciAdapter<VirtioBlkPci>,
    pub irqs: Irqs,
    pub memory: GuestMemoryHandle,
    pub mem: GuestMemory,
    pub caps: Caps,
    pub vqs: Vec<Vq>,
    pub msix: Vec<EventFd>,
    pub intx: EventFd,
    next_data: u64,
}

impl Driver {
    /// A device over `backend`; interrupts wired to eventfds; nothing
    /// negotiated yet.
    pub fn new(backend: Arc<dyn BlockBackend>, config: VirtioBlkConfig) -> Self {
        let mem = guest_memory();
        let ctx = DeviceContext {
            memory: GuestMemoryAtomic::new(mem.clone()),
            irqs: Irqs::default(),
            ..Default::default()
        };
        let dev = VirtioBlkPci::new(ctx.clone(), backend, config).unwrap();
        Self::with_device(ctx, mem, dev)
    }

    /// Wraps an already built device sharing `ctx` and `mem`.
    pub fn with_device(ctx: DeviceContext, mem: GuestMemory, dev: VirtioBlkPci) -> Self {
        let adapter = PciAdapter::new(dev).unwrap();
        let layout = adapter.irq_layout();
        ctx.irqs.configure(&layout);
        let nvec = layout[PCI_MSIX_IRQ_INDEX as usize].count;
        let mut msix = Vec::new();
        let mut files = Vec::new();
        for _ in 0..nvec {
            let (e, f) = eventfd();
            msix.push(e);
            files.push(f);
        }
        let set = |index, count| IrqSet {
            argsz: 20,
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count,
        };
        ctx.irqs
            .set_irqs(&set(PCI_MSIX_IRQ_INDEX, nvec), &[], files)
            .unwrap();
        let (intx, f) = eventfd();
        ctx.irqs
            .set_irqs(&set(PCI_INTX_IRQ_INDEX, 1), &[], vec![f])
            .unwrap();
        let mut d = Driver {
            adapter,
            irqs: ctx.irqs.clone(),
            memory: ctx.memory.clone(),
            mem,
            caps: Caps::default(),
            vqs: Vec::new(),
            msix,
            intx,
            next_data: DATA_BASE,
        };
        d.caps = d.find_caps();
        d
    }

    // --- raw accesses -------------------------------------------------

    pub fn cfg_read(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.adapter
            .region_read(PCI_CONFIG_REGION_INDEX, offset, &mut b[..len])
            .unwrap();
        u64::from_le_bytes(b)
    }

    pub fn cfg_write(&mut self, offset: u64, len: usize, v: u64) {
        self.adapter
            .region_write(PCI_CONFIG_REGION_INDEX, offset, &v.to_le_bytes()[..len])
            .unwrap();
    }

    pub fn bar_read(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.adapter.region_read(0, offset, &mut b[..len]).unwrap();
        u64::from_le_bytes(b)
    }

    /// Writes BAR 0, then lets the device do the work the write deferred
    /// (a doorbell's queue processing), as the server does once its reply
    /// is sent.
    pub fn bar_write(&mut self, offset: u64, len: usize, v: u64) {
        self.adapter
            .region_write(0, offset, &v.to_le_bytes()[..len])
            .unwrap();
        self.run_deferred();
    }

    pub fn common_read(&mut self, off: u64, len: usize) -> u64 {
        self.bar_read(self.caps.common + off, len)
    }

    pub fn common_write(&mut self, off: u64, len: usize, v: u64) {
        self.bar_write(self.caps.common + off, len, v)
    }

    pub fn status(&mut self) -> u8 {
        self.common_read(cc::STATUS, 1) as u8
    }

    pub fn set_status(&mut self, s: u8) {
        self.common_write(cc::STATUS, 1, u64::from(s))
    }

    pub fn device_features(&mut self) -> u64 {
        self.common_write(cc::DFSELECT, 4, 0);
        let lo = self.common_read(cc::DF, 4);
        self.common_write(cc::DFSELECT, 4, 1);
        let hi = self.common_read(cc::DF, 4);
        lo | (hi << 32)
    }

    pub fn write_driver_features(&mut self, f: u64) {
        self.common_write(cc::GFSELECT, 4, 0);
        self.common_write(cc::GF, 4, f & 0xffff_ffff);
        self.common_write(cc::GFSELECT, 4, 1);
        self.common_write(cc::GF, 4, f >> 32);
    }

    pub fn driver_features(&mut self) -> u64 {
        self.common_write(cc::GFSELECT, 4, 0);
        let lo = self.common_read(cc::GF, 4);
        self.common_write(cc::GFSELECT, 4, 1);
        let hi = self.common_read(cc::GF, 4);
        lo | (hi << 32)
    }

    pub fn isr(&mut self) -> u8 {
        self.bar_read(self.caps.isr, 1) as u8
    }

    pub fn device_cfg(&mut self, off: u64, len: usize) -> u64 {
        self.bar_read(self.caps.device + off, len)
    }

    // --- discovery ----------------------------------------------------

    fn find_caps(&mut self) -> Caps {
        let mut caps = Caps::default();
        let mut p = self.cfg_read(0x34, 1) as usize & 0xfc;
        let mut guard = 0;
        while p != 0 && guard < 64 {
            guard += 1;
            let id = self.cfg_read(p as u64, 1) as u8;
            match id {
                0x11 => caps.msix = p,
                0x10 => caps.pcie = Some(p),
                0x01 => caps.pm = Some(p),
                0x09 => {
                    let t = self.cfg_read(p as u64 + 3, 1) as u8;
                    let bar = self.cfg_read(p as u64 + 4, 1) as u8;
                    let off = self.cfg_read(p as u64 + 8, 4) as u32;
                    let len = self.cfg_read(p as u64 + 12, 4) as u32;
                    caps.virtio.push((t, bar, off, len));
                    match t {
                        1 => caps.common = u64::from(off),
                        2 => {
                            caps.notify = u64::from(off);
                            caps.notify_mult = self.cfg_read(p as u64 + 16, 4) as u32;
                        }
                        3 => caps.isr = u64::from(off),
                        4 => caps.device = u64::from(off),
                        5 => caps.pci_cfg = Some(p),
                        _ => {}
                    }
                }
                _ => {}
            }
            p = self.cfg_read(p as u64 + 1, 1) as usize & 0xfc;
        }
        caps
    }

    pub fn enable_msix(&mut self, on: bool) {
        let ctl = self.caps.msix as u64 + 3;
        self.cfg_write(ctl, 1, if on { 0x80 } else { 0 });
    }

    // --- initialisation -----------------------------------------------

    /// Negotiates `features` (intersected with the offer) and returns what
    /// was accepted.
    pub fn negotiate(&mut self, features: u64) -> u64 {
        self.set_status(0);
        self.set_status(S_ACKNOWLEDGE);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER);
        let offered = self.device_features();
        let f = features & offered;
        self.write_driver_features(f);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_ne!(self.status() & S_FEATURES_OK, 0, "FEATURES_OK refused");
        f
    }

    /// Sets up every queue (vector `1 + i` for queue `i`) and sets
    /// DRIVER_OK.
    pub fn setup_queues(&mut self, size: u16) {
        let n = self.common_read(cc::NUMQ, 2) as u16;
        self.vqs.clear();
        for i in 0..n {
            let base = RAM_A + u64::from(i) * 0x1_0000;
            self.common_write(cc::Q_SELECT, 2, u64::from(i));
            let max = self.common_read(cc::Q_SIZE, 2) as u16;
            assert!(size <= max);
            self.common_write(cc::Q_SIZE, 2, u64::from(size));
            self.common_write(cc::Q_MSIX, 2, u64::from(i) + 1);
            let vq = Vq {
                size,
                desc: base,
                avail: base + 0x4000,
                used: base + 0x8000,
                avail_idx: 0,
                used_seen: 0,
                next_desc: 0,
                notify_off: self.common_read(cc::Q_NOFF, 2) as u16,
            };
            // Zero the rings.
            self.mem
                .write_slice(&vec![0u8; 0x1_0000], GuestAddress(base))
                .unwrap();
            for (lo, addr) in [
                (cc::Q_DESCLO, vq.desc),
                (cc::Q_AVAILLO, vq.avail),
                (cc::Q_USEDLO, vq.used),
            ] {
                self.common_write(lo, 4, addr & 0xffff_ffff);
                self.common_write(lo + 4, 4, addr >> 32);
            }
            self.common_write(cc::Q_ENABLE, 2, 1);
            self.vqs.push(vq);
        }
        let s = self.status();
        self.set_status(s | S_DRIVER_OK);
    }

    /// Full bring-up: MSI-X on, `features` negotiated, queues of `size`.
    pub fn init(&mut self, features: u64, size: u16) -> u64 {
        self.enable_msix(true);
        let f = self.negotiate(features);
        self.config_msix_vector(0);
        self.setup_queues(size);
        f
    }

    pub fn config_msix_vector(&mut self, v: u16) {
        self.common_write(cc::MSIX, 2, u64::from(v));
    }

    // --- guest memory helpers -----------------------------------------

    /// Allocates `len` bytes of data buffer (16-byte aligned).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_data;
        self.next_data = (a + len + 15) & !15;
        assert!(self.next_data <= RAM_A + RAM_SIZE, "test data overflow");
        a
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn read_u16(&self, addr: u64) -> u16 {
        self.mem.read_obj::<u16>(GuestAddress(addr)).unwrap()
    }

    pub fn write_u16(&self, addr: u64, v: u16) {
        self.mem.write_obj(v, GuestAddress(addr)).unwrap()
    }

    pub fn write_desc(&self, table: u64, index: u16, d: Desc, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(table + u64::from(index) * 16, &b);
    }

    /// A block request header.
    pub fn header(&mut self, t: u32, sector: u64) -> u64 {
        let a = self.alloc(16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write(a, &h);
        a
    }

    /// A status byte preset to 0xff.
    pub fn status_buf(&mut self) -> u64 {
        let a = self.alloc(1);
        self.write(a, &[0xff]);
        a
    }

    // --- queue operations ---------------------------------------------

    /// Writes `descs` as a chain into the descriptor table of queue `q`
    /// and returns the head index (without publishing it).
    pub fn place_chain(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let vq = self.vqs[q].clone();
        let head = vq.next_desc;
        let n = descs.len() as u16;
        for (i, d) in descs.iter().enumerate() {
            let idx = (head + i as u16) % vq.size;
            let next = (idx + 1) % vq.size;
            let mut d = *d;
            if i + 1 < descs.len() {
                d.flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(vq.desc, idx, d, next);
        }
        self.vqs[q].next_desc = (head + n) % vq.size;
        head
    }

    /// Puts `head` in the avail ring and bumps avail idx.
    pub fn publish(&mut self, q: usize, head: u16) {
        let vq = &mut self.vqs[q];
        let slot = vq.avail + 4 + 2 * u64::from(vq.avail_idx % vq.size);
        let (slot_addr, idx_addr) = (slot, vq.avail + 2);
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
        let idx = vq.avail_idx;
        self.write_u16(slot_addr, head);
        self.write_u16(idx_addr, idx);
    }

    /// Kicks queue `q`.
    pub fn kick(&mut self, q: usize) {
        let off =
            self.caps.notify + u64::from(self.vqs[q].notify_off) * u64::from(self.caps.notify_mult);
        self.bar_write(off, 2, q as u64);
    }

    /// Runs the device's deferred work until none is left (the server
    /// calls it after every burst of messages).
    pub fn run_deferred(&mut self) {
        loop {
            while self.adapter.lifecycle().run_deferred() {}
            if self.adapter.device().device().in_flight() == 0 {
                return;
            }
            // Requests on I/O threads: wait for their completion fd and
            // complete them, as the event loop does.
            let fds: Vec<_> = self.adapter.lifecycle().watched_fds().to_vec();
            for w in fds {
                let fd = w.fd;
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: polling one valid fd.
                let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
                assert_eq!(n, 1, "I/O threads never completed");
                self.adapter.lifecycle().handle_event(fd, Interest::READ);
            }
        }
    }

    /// Places, publishes and kicks a chain; returns the head.
    pub fn submit(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let head = self.place_chain(q, descs);
        self.publish(q, head);
        self.kick(q);
        head
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.read_u16(self.vqs[q].used + 2)
    }

    /// Pops the next used element `(id, len)`, if any.
    pub fn pop_used(&mut self, q: usize) -> Option<(u32, u32)> {
        let vq = self.vqs[q].clone();
        if self.used_idx(q) == vq.used_seen {
            return None;
        }
        let e = vq.used + 4 + 8 * u64::from(vq.used_seen % vq.size);
        let b = self.read(e, 8);
        self.vqs[q].used_seen = vq.used_seen.wrapping_add(1);
        Some((
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        ))
    }

    /// Submits a whole block request on queue `q` and returns
    /// `(status, used len)`. `data` descriptors go between header and
    /// status.
    pub fn request(&mut self, q: usize, t: u32, sector: u64, data: &[Desc]) -> (u8, u32) {
        let h = self.header(t, sector);
        let s = self.status_buf();
        let mut descs = vec![r(h, 16)];
        descs.extend_from_slice(data);
        descs.push(w(s, 1));
        let head = self.submit(q, &descs);
        let (id, len) = self.pop_used(q).expect("request not completed");
        assert_eq!(id, u32::from(head));
        assert!(self.pop_used(q).is_none());
        (self.read(s, 1)[0], len)
    }

    /// Writes `data` to `sector` through queue `q`; returns the status.
    pub fn write_sectors(&mut self, q: usize, sector: u64, data: &[u8]) -> u8 {
        let buf = self.alloc(data.len() as u64);
        self.write(buf, data);
        let (status, len) = self.request(q, T_OUT, sector, &[r(buf, data.len() as u32)]);
        assert_eq!(len, 1);
        status
    }

    /// Reads `len` bytes from `sector` through queue `q`.
    pub fn read_sectors(&mut self, q: usize, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let buf = self.alloc(len as u64);
        self.write(buf, &vec![0x5a; len]);
        let (status, used) = self.request(q, T_IN, sector, &[w(buf, len as u32)]);
        if status == S_OK {
            assert_eq!(used as usize, len + 1);
        }
        (status, self.read(buf, len))
    }

    /// Resets the data allocator (buffers are reused between requests).
    pub fn reset_alloc(&mut self) {
        self.next_data = DATA_BASE;
    }
}

/// A test pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(13)
                .wrapping_add(seed)
                .wrapping_add((i >> 8) as u8)
        })
        .collect()
}
