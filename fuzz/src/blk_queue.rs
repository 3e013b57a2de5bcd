//! `virtio_blk_queue`: the virtio-blk device model of `backends` fed
//! arbitrary descriptor tables, available and used rings and indices in
//! arbitrary guest memory, then its queue processed the way the virtio PCI
//! transport does it. Must not panic and must not hang.
//!
//! Input format (little-endian, missing bytes read as 0):
//!
//! ```text
//! flags:u8        bit 0 read-only disk, bit 1 EVENT_IDX
//! features:u64    acknowledged by the driver (masked by what is offered)
//! size:u16        queue size (invalid sizes keep the maximum, 256)
//! desc:u32 avail:u32 used:u32     ring addresses (misaligned ones keep 0)
//! next_avail:u16 next_used:u16
//! rounds:u8       notifications (1 + rounds % 4)
//! config:u16 len:u8               a device config space read
//! memory...       the rest fills guest memory from address 0
//! ```
//!
//! Guest memory is two regions, [0, 0x8000) and [0x9000, 0x11000), with a
//! hole between them; the rest of the input is written contiguously over
//! them (the hole is skipped).

use std::cell::RefCell;
use std::sync::Arc;

use backends::storage::{BlockBackend, MemoryDisk};
use backends::virtio::{GuestMemory, VirtioDevice};
use backends::virtio_blk::{VirtioBlk, VirtioBlkConfig};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::{Reader, Writer};

/// Guest memory regions `(start, size)`.
pub const REGIONS: [(u64, usize); 2] = [(0, 0x8000), (0x9000, 0x8000)];
/// Maximum queue size.
pub const QUEUE_MAX: u16 = 256;
/// Disk size.
pub const DISK_SIZE: u64 = 0x1_0000;

/// The fixed part of an input (the seed generator's view).
#[derive(Clone, Debug, Default)]
pub struct Setup {
    /// Flags (bit 0 read-only, bit 1 EVENT_IDX).
    pub flags: u8,
    /// Driver features.
    pub features: u64,
    /// Queue size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u32,
    /// Available ring address.
    pub avail: u32,
    /// Used ring address.
    pub used: u32,
    /// next_avail.
    pub next_avail: u16,
    /// next_used.
    pub next_used: u16,
    /// Notification rounds - 1.
    pub rounds: u8,
    /// Config read offset.
    pub config_offset: u16,
    /// Config read length.
    pub config_len: u8,
}

impl Setup {
    /// Encodes the setup followed by the guest memory image.
    pub fn encode(&self, memory: &[u8]) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.flags)
            .u64(self.features)
            .u16(self.size)
            .u32(self.desc)
            .u32(self.avail)
            .u32(self.used)
            .u16(self.next_avail)
            .u16(self.next_used)
            .u8(self.rounds)
            .u16(self.config_offset)
            .u8(self.config_len)
            .bytes(memory);
        w.0
    }
}

fn guest_memory() -> GuestMemory {
    let ranges: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
    GuestMemory::from_ranges(&ranges).expect("guest memory")
}

/// Overwrites guest memory with `image`, zeroes after it.
fn fill(mem: &GuestMemory, image: &[u8]) {
    let mut rest = image;
    for (start, size) in REGIONS {
        static ZEROS: [u8; 0x8000] = [0; 0x8000];
        let n = rest.len().min(size);
        mem.write_slice(&rest[..n], GuestAddress(start)).unwrap();
        if n < size {
            mem.write_slice(&ZEROS[..size - n], GuestAddress(start + n as u64))
                .unwrap();
        }
        rest = &rest[n..];
    }
}

/// What one run needs, kept between runs: building a device, its 256 KiB
/// bounce buffer, the disk and guest memory every run would make the
/// target spend most of its time in page faults. Each run starts from the
/// same state: the disk is zeroed, the device reset, memory rewritten.
struct Cached {
    mem: GuestMemory,
    /// (disk, device) writable and read-only.
    devices: [(Arc<MemoryDisk>, VirtioBlk); 2],
}

fn device(read_only: bool) -> (Arc<MemoryDisk>, VirtioBlk) {
    let disk = Arc::new(MemoryDisk::from_vec(vec![0; DISK_SIZE as usize], read_only));
    let config = VirtioBlkConfig {
        num_queues: 1,
        queue_size: QUEUE_MAX,
        read_only: false,
        serial: Some("fuzz-serial".into()),
        pcie: false,
        aio: backends::block_io::Aio::Sync,
        on_error: backends::block_io::ErrorPolicy::Report,
    };
    let blk = VirtioBlk::new(
        disk.clone(),
        &config,
        vfio_user_server::DeviceContext::default().memory,
    )
    .unwrap();
    (disk, blk)
}

thread_local! {
    static CACHED: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

/// Runs one input.
pub fn run(data: &[u8]) {
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        let c = c.get_or_insert_with(|| Cached {
            mem: guest_memory(),
            devices: [device(false), device(true)],
        });
        run_with(data, c);
    });
}

fn run_with(data: &[u8], cached: &mut Cached) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let features = r.u64();
    let size = r.u16();
    let (desc, avail, used) = (r.u32(), r.u32(), r.u32());
    let (next_avail, next_used) = (r.u16(), r.u16());
    let rounds = 1 + r.u8() % 4;
    let (config_offset, config_len) = (r.u16(), r.u8());
    let mem = &cached.mem;
    fill(mem, r.rest());
    let (disk, blk) = &mut cached.devices[usize::from(flags & 1)];
    if !disk.read_only() {
        disk.write_zeroes(0, DISK_SIZE).unwrap();
    }
    blk.reset();

    let mut cfg = vec![0u8; config_len as usize];
    blk.read_config(u64::from(config_offset), &mut cfg);
    blk.activate(features).unwrap();

    let mut q = Queue::new(QUEUE_MAX).unwrap();
    let _ = q.try_set_size(size);
    let _ = q.try_set_desc_table_address(GuestAddress(desc.into()));
    let _ = q.try_set_avail_ring_address(GuestAddress(avail.into()));
    let _ = q.try_set_used_ring_address(GuestAddress(used.into()));
    q.set_next_avail(next_avail);
    q.set_next_used(next_used);
    q.set_event_idx(flags & 2 != 0);
    q.set_ready(true);

    for _ in 0..rounds {
        // What VirtioPciDevice::process_queue does on a notification:
        // batches of 16 chains, an interrupt check after each, bounded.
        if q.disable_notification(mem).is_err() {
            continue;
        }
        for _ in 0..64 {
            match blk.process_queue(0, &mut q, mem, 16) {
                Ok(16) => {
                    let _ = q.needs_notification(mem);
                    continue;
                }
                Ok(_) => {}
                Err(_) => break,
            }
            let _ = q.needs_notification(mem);
            match q.enable_notification(mem) {
                Ok(true) if q.disable_notification(mem).is_ok() => continue,
                _ => break,
            }
        }
        let _ = q.needs_notification(mem);
    }
}
