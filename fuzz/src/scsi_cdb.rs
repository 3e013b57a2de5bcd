//! `scsi_cdb`: the SCSI disk of `backends` fed arbitrary CDBs with a data
//! buffer of arbitrary length in guest memory, planned and run as a host
//! bus adapter runs them. Must not panic, must report sense with every
//! CHECK CONDITION and must not transfer more than the buffer holds.
//!
//! Input format (little-endian, missing bytes read as 0):
//!
//! ```text
//! flags:u8      bit 0 read-only disk, bit 1 the buffer crosses into the
//!               second guest memory region (two segments)
//! len:u16       data buffer length
//! cdb...        the rest: the CDB (at most 32 bytes are used)
//! ```

use std::cell::RefCell;
use std::sync::Arc;

use backends::guest_sg::SgList;
use backends::scsi::{Plan, ScsiDisk, ScsiDiskConfig, STATUS_GOOD};
use backends::storage::{BlockBackend, MemoryDisk};
use vfio_user_server::guest_memory::GuestMemory;
use vm_memory::GuestAddress;

use crate::{Reader, Writer};

/// Guest memory regions `(start, size)`: a buffer may span both.
pub const REGIONS: [(u64, usize); 2] = [(0, 0x10000), (0x10000, 0x10000)];
/// Size of the disk (256 blocks).
pub const DISK_SIZE: usize = 0x20000;
/// Flag bits.
pub const F_READ_ONLY: u8 = 1;
/// The buffer crosses regions.
pub const F_SPLIT: u8 = 2;

/// Encodes an input.
pub fn encode(flags: u8, len: u16, cdb: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(flags).u16(len).bytes(cdb);
    w.0
}

struct Cached {
    mem: Arc<GuestMemory>,
    /// Writable and read-only.
    disks: [(Arc<MemoryDisk>, ScsiDisk<()>); 2],
}

fn disk(read_only: bool) -> (Arc<MemoryDisk>, ScsiDisk<()>) {
    let d = Arc::new(MemoryDisk::from_vec(vec![0; DISK_SIZE], read_only).with_id("fuzz"));
    let s = ScsiDisk::new(
        d.clone() as Arc<dyn BlockBackend>,
        &ScsiDiskConfig::default(),
    )
    .expect("disk");
    (d, s)
}

thread_local! {
    static CACHED: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

/// Runs one input.
pub fn run(data: &[u8]) {
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        let c = c.get_or_insert_with(|| {
            let ranges: Vec<(GuestAddress, usize)> =
                REGIONS.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
            Cached {
                mem: Arc::new(GuestMemory::from_ranges(&ranges).expect("guest memory")),
                disks: [disk(false), disk(true)],
            }
        });
        run_with(data, c);
    });
}

fn run_with(data: &[u8], cached: &mut Cached) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let len = u32::from(r.u16());
    let cdb = r.bytes(32);
    let mem = &cached.mem;
    let start = if flags & F_SPLIT != 0 {
        0x10000 - 0x800
    } else {
        0
    };
    let mut sg = SgList::new(mem);
    assert!(sg.push_buffer(GuestAddress(start), len));
    let (_, disk) = &mut cached.disks[usize::from(flags & F_READ_ONLY)];
    let plan = disk.plan(cdb, &sg);
    if let Plan::Transfer(t) = plan {
        assert!(t.len <= sg.len(), "a transfer beyond the buffer");
    }
    let (_, outcome) = disk.execute(plan, &sg, mem, ()).expect("no I/O threads");
    assert!(
        outcome.data_in <= sg.len(),
        "more data than the buffer holds"
    );
    assert_eq!(outcome.sense.is_none(), outcome.status() == STATUS_GOOD);
}
