//! `megasas_frames`: the MegaRAID SAS controller of `backends` fed
//! arbitrary register writes (queue ports, doorbell, interrupt mask and
//! clear, through either BAR) over arbitrary guest memory holding frames,
//! SGLs, queue information and buffers; the queued frames run after each
//! write, as the server runs deferred work. Must not panic and must not
//! hang.
//!
//! Input format (little-endian, missing bytes read as 0):
//!
//! ```text
//! flags:u8        bit 0 read-only disks, bit 1 MSI-X on, bit 2 bus
//!                 mastering off, bit 3 snapshot and restore at the end
//! nops:u8         register operations (1 + nops % 32)
//! op*             where:u8 value:u32
//!                   where bit 0: the I/O BAR (else the memory BAR);
//!                   where >> 1 picks the register (% 10; 9 reads them all)
//! memory...       the rest fills guest memory from address 0
//! ```
//!
//! Guest memory is two regions, [0, 0x10000) and [0x11000, 0x19000), with
//! a hole between them; the rest of the input is written contiguously over
//! them (the hole is skipped). Each of the two logical drives is 64 KiB.

use std::cell::RefCell;
use std::sync::Arc;

use backends::megasas::regs::reg;
use backends::megasas::{Megasas, MegasasConfig, IO_BAR, MMIO_BAR};
use backends::storage::{BlockBackend, MemoryDisk};
use vfio_user_server::device::{DeviceContext, Lifecycle, ResetReason};
use vfio_user_server::guest_memory::{GuestMemory, GuestMemoryHandle};
use vfio_user_server::pci::{BarAllocator, PciDevice};
use vfio_user_server::vm_migration::{Pausable, Snapshottable};
use vm_memory::{Bytes, GuestAddress};

use crate::{Reader, Writer};

/// Guest memory regions `(start, size)`.
pub const REGIONS: [(u64, usize); 2] = [(0, 0x10000), (0x11000, 0x8000)];
/// Size of each disk.
pub const DISK_SIZE: usize = 0x10000;
/// The registers an operation can name (`where >> 1`, modulo 10; the last
/// is "read every register").
pub const REGISTERS: [u64; 9] = [
    reg::IQP,
    reg::IQPL,
    reg::IQPH,
    reg::IDB,
    reg::OMSK,
    reg::ODCR0,
    reg::OSTS,
    reg::OSP0,
    0x3c,
];
/// Flag bits.
pub const F_READ_ONLY: u8 = 1;
/// MSI-X on.
pub const F_MSIX: u8 = 2;
/// Bus mastering off.
pub const F_NO_MASTER: u8 = 4;
/// Snapshot and restore at the end.
pub const F_SNAPSHOT: u8 = 8;

/// The fixed part of an input (the seed generator's view).
#[derive(Clone, Debug, Default)]
pub struct Setup {
    /// Flags.
    pub flags: u8,
    /// `(where, value)` register operations.
    pub ops: Vec<(u8, u32)>,
}

impl Setup {
    /// Encodes the setup followed by the guest memory image.
    pub fn encode(&self, memory: &[u8]) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.flags)
            .u8(self.ops.len().saturating_sub(1).min(31) as u8);
        for &(at, v) in &self.ops {
            w.u8(at).u32(v);
        }
        w.bytes(memory);
        w.0
    }
}

/// An operation writing `value` to `register` (an offset of [`REGISTERS`])
/// through the memory BAR.
pub fn write_op(register: u64, value: u32) -> (u8, u32) {
    let i = REGISTERS.iter().position(|&r| r == register).unwrap_or(0);
    ((i as u8) << 1, value)
}

struct Cached {
    memory: GuestMemoryHandle,
    /// Writable and read-only: (disks, controller, memory BAR, I/O BAR).
    devices: [(Vec<Arc<MemoryDisk>>, Megasas, u64, u64); 2],
}

fn device(
    memory: &GuestMemoryHandle,
    read_only: bool,
) -> (Vec<Arc<MemoryDisk>>, Megasas, u64, u64) {
    let ctx = DeviceContext {
        memory: memory.clone(),
        ..Default::default()
    };
    let disks: Vec<Arc<MemoryDisk>> = (0..2)
        .map(|_| Arc::new(MemoryDisk::from_vec(vec![0; DISK_SIZE], read_only)))
        .collect();
    let backends = disks
        .iter()
        .map(|d| d.clone() as Arc<dyn BlockBackend>)
        .collect();
    let config = MegasasConfig {
        read_only,
        aio: backends::block_io::Aio::Sync,
        ..Default::default()
    };
    let mut hba = Megasas::new(&ctx, backends, &config).expect("megasas");
    let bars = hba
        .allocate_bars(&mut BarAllocator::default())
        .expect("BARs");
    let base = |i| bars.iter().find(|b| b.idx == i).map_or(0, |b| b.addr);
    let (mmio, io) = (base(MMIO_BAR), base(IO_BAR));
    (disks, hba, mmio, io)
}

fn guest_memory() -> GuestMemory {
    let ranges: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
    GuestMemory::from_ranges(&ranges).expect("guest memory")
}

/// Overwrites guest memory with `image`, zeroes after it.
fn fill(mem: &GuestMemory, image: &[u8]) {
    static ZEROS: [u8; 0x10000] = [0; 0x10000];
    let mut rest = image;
    for (start, size) in REGIONS {
        let n = rest.len().min(size);
        mem.write_slice(&rest[..n], GuestAddress(start))
            .expect("fill");
        mem.write_slice(&ZEROS[..size - n], GuestAddress(start + n as u64))
            .expect("fill");
        rest = &rest[n..];
    }
}

thread_local! {
    static CACHED: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

/// Runs one input.
pub fn run(data: &[u8]) {
    run_memory(data);
}

/// Runs one input; returns the first guest memory region afterwards (for
/// the seed generator, which checks the frames' statuses).
pub fn run_memory(data: &[u8]) -> Vec<u8> {
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        let c = c.get_or_insert_with(|| {
            let memory = GuestMemoryHandle::new(guest_memory());
            let devices = [device(&memory, false), device(&memory, true)];
            Cached { memory, devices }
        });
        run_with(data, c)
    })
}

fn run_with(data: &[u8], cached: &mut Cached) -> Vec<u8> {
    use vm_memory::GuestAddressSpace;
    let mut r = Reader::new(data);
    let flags = r.u8();
    let nops = 1 + usize::from(r.u8() % 32);
    let ops: Vec<(u8, u32)> = (0..nops).map(|_| (r.u8(), r.u32())).collect();
    let mem = cached.memory.memory();
    fill(&mem, r.rest());
    let (disks, hba, mmio, io) = &mut cached.devices[usize::from(flags & F_READ_ONLY)];
    for d in disks.iter() {
        if !d.read_only() {
            let _ = d.write_zeroes(0, DISK_SIZE as u64);
        }
    }
    hba.reset(ResetReason::Command);
    let command = if flags & F_NO_MASTER != 0 { 0x03 } else { 0x07 };
    hba.write_config_register(1, 0, &[command]);
    if flags & F_MSIX != 0 {
        let cap = (hba.read_config_register(13) & 0xfc) as usize;
        hba.write_config_register(cap / 4, 3, &[0x80]);
    }
    for (at, value) in ops {
        let base = if at & 1 != 0 { *io } else { *mmio };
        match REGISTERS.get(usize::from(at >> 1) % (REGISTERS.len() + 1)) {
            Some(&offset) => hba.write_bar(base, offset, &value.to_le_bytes()),
            None => {
                for offset in REGISTERS {
                    let mut b = [0u8; 4];
                    hba.read_bar(base, offset, &mut b);
                }
            }
        }
        // What the server does after each message: deferred work, bounded
        // by the controller's own budget per call.
        for _ in 0..16 {
            if !hba.run_deferred() {
                break;
            }
        }
    }
    if flags & F_SNAPSHOT != 0 {
        let _ = Pausable::pause(hba);
        if let Ok(s) = hba.snapshot() {
            let _ = hba.restore(&s);
        }
        let _ = Pausable::resume(hba);
        let _ = hba.run_deferred();
    }
    let mut out = vec![0u8; REGIONS[0].1];
    let _ = mem.read_slice(&mut out, GuestAddress(REGIONS[0].0));
    out
}
