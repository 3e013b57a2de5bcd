//! A test-side VMM: drives the daemon exactly as Cloud Hypervisor does,
//! through the published `vfio_user::Client`, plus a small virtio-pci
//! driver with split virtqueues living in a memfd that plays guest RAM.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfio_user::Client;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

pub const CONFIG_REGION: u32 = 7;
pub const MSIX_INDEX: u32 = 2;
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// Guest-physical base of the test's RAM.
pub const GUEST_BASE: u64 = 0x1_0000_0000;
pub const GUEST_SIZE: u64 = 64 << 20;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// The daemon process, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl Daemon {
    /// Starts `vfio-user-device` with `args` (after `virtio-blk --socket S`)
    /// and waits for its socket.
    pub fn start(args: &[&str]) -> Daemon {
        let dir = TempDir::new().expect("tempdir");
        Self::start_in(dir, args)
    }

    pub fn start_in(dir: TempDir, args: &[&str]) -> Daemon {
        let socket = dir.as_path().join("blk.sock");
        let child = spawn(&socket, args);
        wait_for_socket(&socket);
        Daemon { child, socket, dir }
    }

    /// Restarts on the same socket (after a kill).
    pub fn restart(&mut self, args: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        self.child = spawn(&self.socket, args);
        wait_for_socket(&self.socket);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(socket: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vfio-user-device"))
        .arg("virtio-blk")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vfio-user-device")
}

pub fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "daemon socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Guest RAM: a memfd mapped here and shared with the server by DMA_MAP.
pub struct GuestRam {
    pub file: File,
    ptr: *mut u8,
    next: u64,
}

// SAFETY: the mapping is owned by this struct and only accessed through it.
unsafe impl Send for GuestRam {}

impl GuestRam {
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

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let off = self.offset(gpa, len);
        // SAFETY: in bounds of the live mapping (checked by offset()).
        (0..len)
            .map(|i| unsafe { self.ptr.add(off + i).read_volatile() })
            .collect()
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }
    pub fn write_u32(&self, gpa: u64, v: u32) {
        self.write(gpa, &v.to_le_bytes());
    }
    pub fn write_u64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }
    pub fn read_u16(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.read(gpa, 2).try_into().unwrap())
    }
    pub fn read_u32(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.read(gpa, 4).try_into().unwrap())
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
    pub bar: u32,
    pub offset: u64,
    pub length: u32,
}

/// One split virtqueue in guest RAM.
pub struct Vq {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub last_used: u16,
    pub free_head: u16,
    pub notify_off: u16,
    pub eventfd: EventFd,
}

/// A submitted request: (queue, head, status address, data-in buffer).
type PendingRequest = (usize, u16, u64, Option<(u64, u32, bool)>);

/// A virtio-pci driver over `vfio_user::Client`.
pub struct VirtioDriver {
    pub client: Client,
    pub ram: GuestRam,
    pub common: CapLoc,
    pub notify: CapLoc,
    pub notify_mult: u32,
    pub isr: CapLoc,
    pub device: CapLoc,
    pub queues: Vec<Vq>,
    pub config_eventfd: EventFd,
    pub features: u64,
    pub bar_sizes: [u64; 6],
    /// Submitted requests.
    pending: Vec<PendingRequest>,
    /// Completed heads not yet collected.
    done: std::collections::HashSet<(usize, u16)>,
}

pub fn cfg_read(client: &mut Client, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    client.region_read(CONFIG_REGION, off, &mut b).unwrap();
    b
}

pub fn cfg_read32(client: &mut Client, off: u64) -> u32 {
    u32::from_le_bytes(cfg_read(client, off, 4).try_into().unwrap())
}

pub fn cfg_write(client: &mut Client, off: u64, data: &[u8]) {
    client.region_write(CONFIG_REGION, off, data).unwrap();
}

/// Sizes the BARs through config space, as Cloud Hypervisor does.
pub fn size_bars(client: &mut Client) -> [u64; 6] {
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

impl VirtioDriver {
    /// Connects like Cloud Hypervisor: VERSION + regions (in Client::new),
    /// DMA_MAP of guest RAM, BAR sizing, capability walk.
    pub fn connect(socket: &Path) -> VirtioDriver {
        let mut client = Client::new(socket).expect("vfio_user::Client::new");
        let ram = GuestRam::new();
        client
            .dma_map(0, GUEST_BASE, GUEST_SIZE, ram.file.as_raw_fd())
            .unwrap();
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

    pub fn common_write(&mut self, off: u64, data: &[u8]) {
        let (bar, base) = (self.common.bar, self.common.offset);
        self.client.region_write(bar, base + off, data).unwrap();
    }

    pub fn common_read(&mut self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        let (bar, base) = (self.common.bar, self.common.offset);
        self.client.region_read(bar, base + off, &mut b).unwrap();
        b
    }

    pub fn status(&mut self) -> u8 {
        self.common_read(0x14, 1)[0]
    }

    pub fn set_status(&mut self, s: u8) {
        self.common_write(0x14, &[s]);
    }

    pub fn device_features(&mut self) -> u64 {
        self.common_write(0x00, &0u32.to_le_bytes());
        let lo = u32::from_le_bytes(self.common_read(0x04, 4).try_into().unwrap()) as u64;
        self.common_write(0x00, &1u32.to_le_bytes());
        let hi = u32::from_le_bytes(self.common_read(0x04, 4).try_into().unwrap()) as u64;
        lo | (hi << 32)
    }

    pub fn device_config(&mut self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        let (bar, base) = (self.device.bar, self.device.offset);
        self.client.region_read(bar, base + off, &mut b).unwrap();
        b
    }

    /// Enables MSI-X with one eventfd per vector (config + queues) the way
    /// Cloud Hypervisor does: SET_IRQS first, then the enable bit.
    pub fn enable_msix(&mut self, nvec: u32) -> Vec<EventFd> {
        let fds: Vec<EventFd> = (0..nvec)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let raw: Vec<i32> = fds.iter().map(|e| e.as_raw_fd()).collect();
        self.client
            .set_irqs(
                MSIX_INDEX,
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                0,
                nvec,
                &raw,
            )
            .unwrap();
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
    /// queue eventfds' owner vector (index 0 = config).
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
        let off = self.notify.offset + self.queues[q].notify_off as u64 * self.notify_mult as u64;
        self.client
            .region_write(self.notify.bar, off, &(q as u16).to_le_bytes())
            .unwrap();
    }

    /// Collects used entries `(head, len)` of queue `q` until `n` arrived,
    /// waiting on its interrupt eventfd.
    pub fn wait_used(&mut self, q: usize, n: usize) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        loop {
            let used_idx = self.ram.read_u16(self.queues[q].used + 2);
            while self.queues[q].last_used != used_idx {
                let vq = &mut self.queues[q];
                let e = vq.used + 4 + 8 * (vq.last_used % vq.size) as u64;
                vq.last_used = vq.last_used.wrapping_add(1);
                let id = self.ram.read_u32(e) as u16;
                let len = self.ram.read_u32(e + 4);
                out.push((id, len));
                self.free_chain(q, id);
            }
            if out.len() >= n {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for used entries"
            );
            if self.features & (1 << 29) != 0 {
                // VIRTIO_F_EVENT_IDX: ask for an interrupt at the next entry.
                let vq = &self.queues[q];
                let used_event = vq.avail + 4 + 2 * vq.size as u64;
                self.ram.write_u16(used_event, vq.last_used);
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                if self.ram.read_u16(vq.used + 2) != vq.last_used {
                    continue;
                }
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
        let hdr = self.ram.alloc(16, 16);
        self.ram.write_u32(hdr, req_type);
        self.ram.write_u32(hdr + 4, 0);
        self.ram.write_u64(hdr + 8, sector);
        let status = self.ram.alloc(1, 1);
        self.ram.write(status, &[0xff]);
        let mut bufs = vec![(hdr, 16, false)];
        if !data.is_empty() {
            let b = self.ram.alloc(data.len() as u64, 512);
            self.ram.write(b, data);
            bufs.push((b, data.len() as u32, false));
        }
        if data_in_len > 0 {
            let b = self.ram.alloc(data_in_len as u64, 512);
            bufs.push((b, data_in_len, true));
        }
        bufs.push((status, 1, true));
        let head = self.push(q, &bufs);
        let read_buf = bufs.get(1).copied().filter(|b| b.2);
        self.pending.push((q, head, status, read_buf));
        head
    }

    /// Waits for request `head` on queue `q`; returns (status, data in).
    pub fn blk_complete(&mut self, q: usize, head: u16) -> (u8, Vec<u8>) {
        while !self.done.remove(&(q, head)) {
            for (id, _len) in self.wait_used(q, 1) {
                self.done.insert((q, id));
            }
        }
        let i = self
            .pending
            .iter()
            .position(|m| m.0 == q && m.1 == head)
            .expect("unknown request");
        let meta = self.pending.remove(i);
        let meta = (meta.1, meta.2, meta.3);
        let status = self.ram.read(meta.1, 1)[0];
        let data = meta
            .2
            .map(|(a, l, _)| self.ram.read(a, l as usize))
            .unwrap_or_default();
        (status, data)
    }
}
