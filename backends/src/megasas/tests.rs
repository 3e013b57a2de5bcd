//! The controller driven through its BARs, with frames, SGLs and the reply
//! queue in guest memory, as a driver would.

use std::os::fd::{FromRawFd, IntoRawFd};

use vfio_user_server::guest_memory::GuestMemory;
use vfio_user_server::irq::{IrqIndexInfo, Irqs};
use vfio_user_server::pci::{BarAllocator, PciAdapter};
use vfio_user_server::wire::{
    IrqSet, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
    PCI_INTX_IRQ_INDEX, PCI_MSIX_IRQ_INDEX,
};
use vfio_user_server::Device;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::dcmd::opcode as op;
use super::frame::{cmd, flags, status};
use super::regs::reg;
use super::*;
use crate::storage::faulty::{Call, FaultyDisk};
use crate::storage::MemoryDisk;

const HIGH: u64 = 0x1_0000_0000;
const DISK_BYTES: usize = 1 << 20;
/// Where the tests put things in low memory.
const FRAME: u64 = 0x1000;
const QINFO: u64 = FRAME + 64;
const RING: u64 = 0x4000;
const PI: u64 = 0x5000;
const CI: u64 = 0x5004;
const SENSE: u64 = 0x6000;
const BUF: u64 = 0x10000;
const DIR_READ: u16 = 0x10;
const IEEE: u16 = flags::IEEE | flags::SGL64;

struct Hba {
    hba: Megasas,
    mem: GuestMemoryHandle,
    disks: Vec<Arc<FaultyDisk<MemoryDisk>>>,
    mmio: u64,
    io: u64,
    msix: EventFd,
    intx: EventFd,
    irqs: Irqs,
}

fn eventfd_file(e: &EventFd) -> std::fs::File {
    // SAFETY: a fresh duplicate, owned by the File.
    unsafe { std::fs::File::from_raw_fd(e.try_clone().unwrap().into_raw_fd()) }
}

impl Hba {
    fn new(disks: usize, config: MegasasConfig) -> Hba {
        let ram = vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), 0x20_0000),
            (GuestAddress(HIGH), 0x10_0000),
        ])
        .unwrap();
        let ctx = DeviceContext {
            memory: GuestMemoryHandle::new(ram),
            ..Default::default()
        };
        let images: Vec<Arc<FaultyDisk<MemoryDisk>>> = (0..disks)
            .map(|d| {
                let data: Vec<u8> = (0..DISK_BYTES).map(|i| (i >> 9) as u8 ^ d as u8).collect();
                // On io_uring, the ring reads and writes the disk's file.
                Arc::new(FaultyDisk::new(if config.aio == Aio::IoUring {
                    MemoryDisk::in_memfd(&data, false).unwrap()
                } else {
                    MemoryDisk::from_vec(data, false)
                }))
            })
            .collect();
        let backends = images
            .iter()
            .map(|d| d.clone() as Arc<dyn BlockBackend>)
            .collect();
        let mut hba = Megasas::new(&ctx, backends, &config).unwrap();
        let bars = hba.allocate_bars(&mut BarAllocator::default()).unwrap();
        let base = |i| bars.iter().find(|b| b.idx == i).unwrap().addr;
        ctx.irqs.configure(&IrqIndexInfo::pci_layout(true, 0, 1));
        let (msix, intx) = (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        for (index, fd) in [(PCI_MSIX_IRQ_INDEX, &msix), (PCI_INTX_IRQ_INDEX, &intx)] {
            let set = IrqSet {
                argsz: 24,
                flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                index,
                start: 0,
                count: 1,
            };
            ctx.irqs
                .set_irqs(&set, &[], vec![eventfd_file(fd)])
                .unwrap();
        }
        // I/O, memory, bus master.
        hba.write_config_register(1, 0, &[0x07]);
        Hba {
            mmio: base(MMIO_BAR),
            io: base(IO_BAR),
            hba,
            mem: ctx.memory,
            disks: images,
            msix,
            intx,
            irqs: ctx.irqs,
        }
    }

    /// Unmasks INTx, as the VMM does at the guest's end of interrupt
    /// (the line is masked from each edge it delivers till then).
    fn intx_eoi(&self) {
        let set = IrqSet {
            argsz: 20,
            flags: IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK,
            index: PCI_INTX_IRQ_INDEX,
            start: 0,
            count: 1,
        };
        self.irqs.set_irqs(&set, &[], Vec::new()).unwrap();
    }

    /// Makes the disks fail with `errno` from now on (`None`: work again).
    fn set_fault(&self, errno: Option<i32>) {
        let sectors = DISK_BYTES as u64 / 512;
        for d in &self.disks {
            d.clear();
            if let Some(errno) = errno {
                for call in [Call::Read, Call::Write, Call::Flush] {
                    d.fail(call, 0, sectors, errno, None);
                }
            }
        }
    }

    fn mem(&self) -> Arc<GuestMemory> {
        self.mem.memory().into_inner()
    }

    fn enable_msix(&mut self) {
        let cap = (self.hba.read_config_register(13) & 0xfc) as usize;
        self.hba.write_config_register(cap / 4, 3, &[0x80]);
    }

    fn r32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.hba.read_bar(self.mmio, offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&mut self, offset: u64, v: u32) {
        self.hba.write_bar(self.mmio, offset, &v.to_le_bytes());
    }

    /// Posts the frame at `addr` (ppc encoding) and runs what is queued.
    fn post(&mut self, addr: u64) {
        self.w32(reg::IQP, addr as u32 | 1);
        while self.hba.run_deferred() {}
    }

    fn write(&self, addr: u64, b: &[u8]) {
        self.mem().write_slice(b, GuestAddress(addr)).unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem().read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    fn rd32(&self, addr: u64) -> u32 {
        self.mem().read_obj(GuestAddress(addr)).unwrap()
    }

    fn frame_status(&self, addr: u64) -> u8 {
        self.read(addr + 2, 1)[0]
    }

    /// INIT with `entries` reply entries (polled, as Linux does).
    fn init(&mut self, entries: u32, ctx64: bool) {
        let mut q = Vec::new();
        q.extend_from_slice(&(if ctx64 { 2u32 } else { 0 }).to_le_bytes());
        q.extend_from_slice(&entries.to_le_bytes());
        for a in [RING, PI, CI] {
            q.extend_from_slice(&a.to_le_bytes());
        }
        self.write(QINFO, &q);
        let mut f = header(cmd::INIT, flags::DONT_POST, 0, 0, 99);
        set(&mut f, 0x18, &QINFO.to_le_bytes());
        self.write(FRAME, &f);
        self.post(FRAME);
        assert_eq!(self.frame_status(FRAME), status::OK);
        assert_eq!(self.hba.fw_state(), FwState::Operational);
    }
}

fn set(f: &mut [u8], at: usize, b: &[u8]) {
    f[at..at + b.len()].copy_from_slice(b);
}

fn header(cmd: u8, flags: u16, sge_count: u8, data_len: u32, context: u32) -> [u8; 64] {
    let mut f = [0u8; 64];
    f[0] = cmd;
    f[2] = 0xff;
    f[7] = sge_count;
    set(&mut f, 0x08, &context.to_le_bytes());
    set(&mut f, 0x10, &flags.to_le_bytes());
    set(&mut f, 0x14, &data_len.to_le_bytes());
    f
}

/// A DCMD with one 32-bit SGE of `len` bytes at BUF.
fn dcmd_frame(opcode: u32, flags: u16, len: u32, context: u32) -> [u8; 64] {
    let mut f = header(cmd::DCMD, flags | DIR_READ, 1, len, context);
    set(&mut f, 0x18, &opcode.to_le_bytes());
    set(&mut f, 0x28, &(BUF as u32).to_le_bytes());
    set(&mut f, 0x2c, &len.to_le_bytes());
    f
}

/// An LD_SCSI_IO frame for `target`:`lun` with one IEEE SGE of `len`
/// bytes at BUF (none if `len` is 0), sense buffer at SENSE.
fn scsi_frame(target: u8, lun: u8, cdb: &[u8], len: u32, flags: u16, context: u32) -> Vec<u8> {
    let sges = u8::from(len > 0);
    let mut f = header(cmd::LD_SCSI_IO, flags | IEEE, sges, len, context).to_vec();
    f[1] = 96;
    f[4] = target;
    f[5] = lun;
    f[6] = cdb.len() as u8;
    set(&mut f, 0x18, &(SENSE as u32).to_le_bytes());
    set(&mut f, 0x20, cdb);
    if len > 0 {
        set(&mut f, 0x30, &BUF.to_le_bytes());
        set(&mut f, 0x38, &len.to_le_bytes());
    }
    f
}

/// An LD_READ/LD_WRITE frame with IEEE SGEs `sges`.
fn ld_frame(
    write: bool,
    target: u8,
    lba: u64,
    blocks: u32,
    sges: &[(u64, u32)],
    context: u32,
) -> Vec<u8> {
    let c = if write { cmd::LD_WRITE } else { cmd::LD_READ };
    let mut f = header(c, IEEE, sges.len() as u8, blocks, context).to_vec();
    f[1] = 96;
    f[4] = target;
    set(&mut f, 0x18, &(SENSE as u32).to_le_bytes());
    set(&mut f, 0x20, &lba.to_le_bytes());
    for (addr, len) in sges {
        f.extend_from_slice(&addr.to_le_bytes());
        f.extend_from_slice(&len.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
    }
    // The SGL starts at 0x28: drop the padding between.
    f.drain(0x28..0x40);
    f
}

#[test]
fn pci_identity_and_bars() {
    let t = Hba::new(1, MegasasConfig::default());
    let mut a = PciAdapter::new(t.hba).unwrap();
    let mut cfg = [0u8; 64];
    a.region_read(7, 0, &mut cfg).unwrap();
    assert_eq!(cfg[0..4], [0x00, 0x10, 0x60, 0x00]);
    assert_eq!(cfg[9..12], [0x00, 0x04, 0x01], "class 010400");
    assert_eq!(cfg[0x2c..0x30], [0x00, 0x10, 0x13, 0x10]);
    assert_eq!(cfg[0x3d], 1, "INTA");
    assert_eq!(cfg[0x10] & 0x7, 0x4, "BAR0: 64-bit memory");
    assert_eq!(cfg[0x18] & 0x1, 0x1, "BAR2: I/O");
    assert_eq!(a.region(0).size, MMIO_BAR_SIZE);
    assert_eq!(a.region(2).size, IO_BAR_SIZE);
    assert!(a.region(0).mmap.is_none() && a.region(2).mmap.is_none());
    let counts: Vec<u32> = a.irq_layout().iter().map(|i| i.count).collect();
    assert_eq!(counts[..3], [1, 0, 1], "INTx, no MSI, one MSI-X vector");
    assert_eq!(a.region(7).size, 256);
}

#[test]
fn registers_through_both_bars() {
    let mut t = Hba::new(1, MegasasConfig::default());
    assert_eq!(t.r32(reg::OSP0), 0xb450_03e8);
    let mut b = [0u8; 4];
    t.hba.read_bar(t.io, reg::OSP0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xb450_03e8, "the I/O BAR aliases");
    // A narrow read of the state nibble.
    let mut hi = [0u8; 1];
    t.hba.read_bar(t.io, reg::OSP0 + 3, &mut hi);
    assert_eq!(hi[0], 0xb4);
    // Unaligned or wide accesses read 0 and write nothing.
    let mut w = [0xffu8; 8];
    t.hba.read_bar(t.mmio, reg::OSP0, &mut w);
    assert_eq!(w, [0; 8]);
    t.hba.write_bar(t.mmio, reg::IQP + 1, &[1, 2, 3]);
    assert_eq!(t.hba.queued_frames(), 0);
    assert_eq!(t.r32(0x100), 0);
    // Frames through the I/O BAR (SeaBIOS).
    t.hba.write_bar(t.io, reg::IQP, &0x2001u32.to_le_bytes());
    assert_eq!(t.hba.queued_frames(), 1);

    t.init(8, false);
    assert_eq!(t.r32(reg::OSP0) >> 28, 0xc);
    // The doorbell's READY reset.
    t.w32(reg::IDB, 7);
    assert_eq!(t.hba.fw_state(), FwState::Ready);
    assert_eq!(t.r32(reg::OSP0), 0xb450_03e8);
    // Kill HBA: FAULT, frames refused; an adapter reset brings it back.
    t.w32(reg::IDB, 0x20);
    assert_eq!(t.r32(reg::OSP0) >> 28, 0xf);
    t.w32(reg::IQP, 0x2001);
    assert_eq!(t.hba.queued_frames(), 0);
    t.w32(reg::IDB, 0x40);
    assert_eq!(t.hba.fw_state(), FwState::Ready);
    // Abort alone drops queued frames but keeps the state.
    t.w32(reg::IQP, 0x2001);
    t.w32(reg::IDB, 1);
    assert_eq!(
        (t.hba.queued_frames(), t.hba.fw_state()),
        (0, FwState::Ready)
    );
}

#[test]
fn polled_frames_before_init() {
    let mut t = Hba::new(2, MegasasConfig::default());
    // SeaBIOS: LD_GET_LIST, polled, 32-bit SGE, in READY.
    t.write(
        FRAME,
        &dcmd_frame(op::LD_GET_LIST, flags::DONT_POST, 1032, 0),
    );
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
    let l = t.read(BUF, 40);
    assert_eq!(l[0], 2);
    assert_eq!((l[8], l[12]), (0, 3));
    assert_eq!((l[24], l[28]), (1, 3));
    assert_eq!(u64::from_le_bytes(l[16..24].try_into().unwrap()), 2048);
    // SeaBIOS: INQUIRY through LD_SCSI_IO, 16-byte CDB length, polled.
    let mut f = scsi_frame(1, 0, &[0x12, 0, 0, 0, 36, 0], 36, flags::DONT_POST, 0);
    f[6] = 16;
    f[1] = 0;
    t.write(FRAME, &f);
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
    assert_eq!(t.read(BUF, 1), [0], "a disk");
    // A posted frame before INIT completes in place.
    t.write(FRAME, &scsi_frame(0, 0, &[0, 0, 0, 0, 0, 0], 0, 0, 5));
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
    assert_eq!(t.msix.read().ok(), None);
    assert_eq!(t.intx.read().ok(), None);
}

#[test]
fn init_then_posted_frames_interrupt() {
    let mut t = Hba::new(1, MegasasConfig::default());
    t.enable_msix();
    // Linux starts at producer 0 (it zeroes both indices).
    t.init(16, false);
    assert_eq!(t.rd32(PI), 0);
    // Interrupts masked: posted, no interrupt.
    t.write(FRAME, &dcmd_frame(op::CTRL_GET_INFO, 0, 2384, 42));
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
    assert_eq!((t.rd32(RING), t.rd32(PI)), (42, 1));
    assert!(t.msix.read().is_err());
    assert_eq!(t.r32(reg::OSTS), 0x8000_0000);
    // Linux enables replies: the pending one interrupts. Under MSI-X the
    // message acknowledges it: the status no longer shows it.
    t.w32(reg::OMSK, !0x8000_0000);
    assert_eq!(t.msix.read().unwrap(), 1);
    assert_eq!(t.r32(reg::OSTS), 0);
    // The controller information is there.
    let info = t.read(BUF, 0x600);
    assert_eq!(info[0..4], [0x00, 0x10, 0x60, 0x00]);
    assert_eq!(u16::from_le_bytes([info[0x5c0], info[0x5c1]]), 1);
    // Another posted frame interrupts at once; a polled one does not post.
    t.write(FRAME, &scsi_frame(0, 0, &[0, 0, 0, 0, 0, 0], 0, 0, 43));
    t.post(FRAME);
    assert_eq!((t.rd32(RING + 4), t.rd32(PI)), (43, 2));
    assert_eq!(t.msix.read().unwrap(), 1);
    assert_eq!(t.r32(reg::OSTS), 0);
    t.write(
        FRAME,
        &scsi_frame(0, 0, &[0, 0, 0, 0, 0, 0], 0, flags::DONT_POST, 44),
    );
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
    assert_eq!(t.rd32(PI), 2, "DONT_POST honoured");
    assert!(t.msix.read().is_err());
    // INTx when MSI-X is off.
    let cap = (t.hba.read_config_register(13) & 0xfc) as usize;
    t.hba.write_config_register(cap / 4, 3, &[0]);
    t.post(FRAME + 0x100);
    t.write(FRAME, &scsi_frame(0, 0, &[0, 0, 0, 0, 0, 0], 0, 0, 45));
    t.post(FRAME);
    assert_eq!(t.intx.read().unwrap(), 1);
    // INTx stays pending until the driver clears it; replies meanwhile
    // raise no second edge (the handler to come takes them too).
    assert_eq!(t.r32(reg::OSTS), 0x8000_0000);
    t.write(FRAME, &scsi_frame(0, 0, &[0, 0, 0, 0, 0, 0], 0, 0, 46));
    t.post(FRAME);
    assert!(t.intx.read().is_err(), "an edge while the line is up");
    t.w32(reg::ODCR0, 0x8000_0000);
    assert_eq!(t.r32(reg::OSTS), 0);
    t.intx_eoi();
    assert!(
        t.intx.read().is_err(),
        "an edge held back for the same replies"
    );
    // Once cleared, the next reply raises it again.
    t.post(FRAME);
    assert_eq!(t.intx.read().unwrap(), 1);
    t.w32(reg::ODCR0, 0x8000_0000);
    // INIT again while operational is refused.
    t.write(FRAME, &header(cmd::INIT, flags::DONT_POST, 0, 0, 0));
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::WRONG_STATE);
}

/// Under MSI-X, replies posted before the driver's handler read a
/// register ride on the message already sent; after a read (or a write
/// other than posting frames), the next reply sends a message again.
/// (INTx is raised when the line goes up: `init_then_posted_frames_interrupt`.)
#[test]
fn msix_messages_cover_replies_until_the_handler_reads() {
    let mut t = Hba::new(1, MegasasConfig::default());
    t.enable_msix();
    t.init(16, false);
    t.w32(reg::OMSK, !0x8000_0000);
    let tur = |context| scsi_frame(0, 0, &[0, 0, 0, 0, 0, 0], 0, 0, context);
    t.write(FRAME, &tur(1));
    t.post(FRAME);
    assert_eq!(t.msix.read().unwrap(), 1);
    // The handler has not run yet: posted, no second message.
    t.write(FRAME, &tur(2));
    t.post(FRAME);
    assert_eq!(t.rd32(PI), 2);
    assert!(t.msix.read().is_err(), "covered by the first message");
    // The handler reads the status, then takes both replies.
    assert_eq!(t.r32(reg::OSTS), 0);
    t.write(FRAME, &tur(3));
    t.post(FRAME);
    assert_eq!((t.rd32(RING + 8), t.rd32(PI)), (3, 3));
    assert_eq!(t.msix.read().unwrap(), 1, "a new message after the read");
    // Masking and unmasking sends one again.
    t.w32(reg::OMSK, u32::MAX);
    t.write(FRAME, &tur(4));
    t.post(FRAME);
    assert!(t.msix.read().is_err(), "masked");
    t.w32(reg::OMSK, !0x8000_0000);
    assert_eq!(t.msix.read().unwrap(), 1);
    assert_eq!(t.rd32(PI), 4);
}

#[test]
fn reply_queue_wraps_with_64_bit_contexts() {
    let mut t = Hba::new(1, MegasasConfig::default());
    t.init(3, true);
    for i in 0..7u32 {
        let mut f = scsi_frame(0, 0, &[0, 0, 0, 0, 0, 0], 0, 0, i);
        set(&mut f, 0x0c, &0xabcd_u32.to_le_bytes());
        t.write(FRAME + 0x100 * u64::from(i), &f);
        t.post(FRAME + 0x100 * u64::from(i));
    }
    // Seven completions in three slots: 6 in slot 0, 4 in 1, 5 in 2.
    let slot = |i: u64| u64::from_le_bytes(t.read(RING + 8 * i, 8).try_into().unwrap());
    assert_eq!(
        [slot(0), slot(1), slot(2)],
        [0xabcd_0000_0006, 0xabcd_0000_0004, 0xabcd_0000_0005]
    );
    assert_eq!(t.rd32(PI), 1);
}

#[test]
fn zero_sge_frames_and_missing_drives() {
    let mut t = Hba::new(1, MegasasConfig::default());
    t.init(8, false);
    // TEST UNIT READY with no SGE.
    t.write(FRAME, &scsi_frame(0, 0, &[0, 0, 0, 0, 0, 0], 0, 0, 1));
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
    // Drive 1, LUN 1, a physical drive, an LD read of drive 9.
    for f in [
        scsi_frame(1, 0, &[0x12, 0, 0, 0, 36, 0], 36, 0, 2),
        scsi_frame(0, 1, &[0x12, 0, 0, 0, 36, 0], 36, 0, 3),
        {
            let mut f = scsi_frame(0, 0, &[0x12, 0, 0, 0, 36, 0], 36, 0, 4);
            f[0] = cmd::PD_SCSI_IO;
            f
        },
        ld_frame(false, 9, 0, 1, &[(BUF, 512)], 5),
    ] {
        t.write(FRAME, &f);
        t.post(FRAME);
        assert_eq!(t.frame_status(FRAME), status::DEVICE_NOT_FOUND);
    }
    assert_eq!(t.rd32(PI), 5);
    // Unknown commands.
    t.write(FRAME, &header(0x07, 0, 0, 0, 6));
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::INVALID_CMD);
}

#[test]
fn ld_read_and_write_block_math() {
    let mut t = Hba::new(2, MegasasConfig::default());
    t.init(8, false);
    // Write blocks 5-7 of drive 1 from two buffers, one above 4 GiB.
    let data: Vec<u8> = (0..1536).map(|i| (i % 251) as u8).collect();
    t.write(HIGH + 0x200, &data[..1024]);
    t.write(BUF, &data[1024..]);
    t.write(
        FRAME,
        &ld_frame(true, 1, 5, 3, &[(HIGH + 0x200, 1024), (BUF, 4096)], 7),
    );
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
    assert_eq!(t.disks[1].inner().contents()[5 * 512..8 * 512], data[..]);
    assert_eq!(
        t.disks[0].inner().contents()[5 * 512],
        5,
        "drive 0 untouched"
    );
    // Read them back at another LBA: blocks 6-7.
    t.write(FRAME, &ld_frame(false, 1, 6, 2, &[(HIGH, 1024)], 8));
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
    assert_eq!(t.read(HIGH, 1024), data[512..]);
    assert_eq!(t.rd32(RING), 7);
    assert_eq!(t.rd32(RING + 4), 8);
    // A 64-bit LBA past the end: CHECK CONDITION, sense in the buffer.
    t.write(SENSE, &[0xee; 96]);
    t.write(FRAME, &ld_frame(false, 0, 1 << 32, 1, &[(BUF, 512)], 9));
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::SCSI_DONE_WITH_ERROR);
    let hdr = t.read(FRAME, 4);
    assert_eq!((hdr[1], hdr[3]), (18, 2), "sense length, CHECK CONDITION");
    let sense = t.read(SENSE, 19);
    assert_eq!(
        (sense[0], sense[2], sense[12], sense[13]),
        (0x70, 5, 0x21, 0)
    );
    assert_eq!(sense[18], 0xee, "18 bytes of sense");
    // A buffer shorter than the blocks.
    t.write(FRAME, &ld_frame(false, 0, 0, 2, &[(BUF, 512)], 10));
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::SCSI_DONE_WITH_ERROR);
    // Zero blocks, zero SGEs.
    t.write(FRAME, &ld_frame(true, 0, 0, 0, &[], 11));
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
}

/// Write-back (the default): a write completes without a flush; a device
/// reset and a pause flush (CACHE_FLUSH and SHUTDOWN:
/// `dcmds_linux_and_seabios_send`), the driver's doorbell reset does not,
/// and MODE SENSE says WCE=1. Write-through: every write is flushed
/// before it completes.
#[test]
fn write_back_and_write_through() {
    let flushes = |t: &Hba| t.disks[0].inner().flush_count();
    let mode_sense_caching = [0x1a, 0x08, 0x08, 0, 0xff, 0];
    for write_through in [false, true] {
        let mut t = Hba::new(
            1,
            MegasasConfig {
                write_through,
                ..Default::default()
            },
        );
        t.init(8, false);
        t.write(FRAME, &scsi_frame(0, 0, &mode_sense_caching, 255, 0, 1));
        t.post(FRAME);
        assert_eq!(t.frame_status(FRAME), status::OK);
        let wce = t.read(BUF + 6, 1)[0] & 0x04 != 0;
        assert_eq!(wce, !write_through, "WCE");

        let before = flushes(&t);
        t.write(BUF, &[0x4b; 1024]);
        t.write(FRAME, &ld_frame(true, 0, 2, 2, &[(BUF, 1024)], 2));
        t.post(FRAME);
        assert_eq!(t.frame_status(FRAME), status::OK);
        assert_eq!(t.disks[0].inner().contents()[1024..2048], [0x4b; 1024]);
        let per_write = u64::from(write_through);
        assert_eq!(
            flushes(&t),
            before + per_write,
            "write-through: {write_through}"
        );

        // Device resets and pauses flush a write cache, and only a write
        // cache; the driver's doorbell reset does not wait for one.
        let cached = u64::from(!write_through);
        t.hba.reset(ResetReason::Command);
        assert_eq!(flushes(&t), before + per_write + cached);
        t.hba.write_config_register(1, 0, &[0x07]);
        t.init(8, false);
        t.w32(reg::IDB, 7);
        assert_eq!(flushes(&t), before + per_write + cached);
        Pausable::pause(&mut t.hba).unwrap();
        assert_eq!(flushes(&t), before + per_write + 2 * cached);
    }
}

#[test]
fn read_only_drives_refuse_writes() {
    let mut t = Hba::new(
        1,
        MegasasConfig {
            read_only: true,
            ..Default::default()
        },
    );
    assert!(t.hba.read_only());
    t.init(8, false);
    let before = t.disks[0].inner().contents();
    t.write(FRAME, &ld_frame(true, 0, 0, 1, &[(BUF, 512)], 1));
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::SCSI_DONE_WITH_ERROR);
    assert_eq!(t.read(SENSE, 14)[12..14], [0x27, 0]);
    t.write(
        FRAME,
        &scsi_frame(0, 0, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512, 0, 2),
    );
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::SCSI_DONE_WITH_ERROR);
    assert_eq!(t.read(SENSE, 3)[2], 7, "DATA PROTECT");
    assert_eq!(t.disks[0].inner().contents(), before);
}

#[test]
fn the_three_sgl_formats() {
    let mut t = Hba::new(1, MegasasConfig::default());
    t.init(8, false);
    let read10 = [0x28, 0, 0, 0, 0, 3, 0, 0, 2, 0];
    // sg32: two 512-byte buffers.
    let mut f = scsi_frame(0, 0, &read10, 1024, 0, 1);
    set(&mut f, 0x10, &0u16.to_le_bytes());
    f[7] = 2;
    f.truncate(0x30);
    for (a, l) in [(BUF as u32, 512u32), (BUF as u32 + 0x1000, 512)] {
        f.extend_from_slice(&a.to_le_bytes());
        f.extend_from_slice(&l.to_le_bytes());
    }
    t.write(FRAME, &f);
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
    assert_eq!((t.read(BUF, 1)[0], t.read(BUF + 0x1000, 1)[0]), (3, 4));
    // sg64: packed 12-byte entries, above 4 GiB.
    f.truncate(0x30);
    set(&mut f, 0x10, &flags::SGL64.to_le_bytes());
    for (a, l) in [(HIGH, 512u32), (HIGH + 0x800, 512)] {
        f.extend_from_slice(&a.to_le_bytes());
        f.extend_from_slice(&l.to_le_bytes());
    }
    t.write(FRAME, &f);
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
    assert_eq!((t.read(HIGH, 1)[0], t.read(HIGH + 0x800, 1)[0]), (3, 4));
    // IEEE (from the frame builder), one buffer.
    t.write(BUF, &[0; 1024]);
    t.write(FRAME, &scsi_frame(0, 0, &read10, 1024, 0, 2));
    t.post(FRAME);
    assert_eq!((t.read(BUF, 1)[0], t.read(BUF + 512, 1)[0]), (3, 4));
}

#[test]
fn dcmds_linux_and_seabios_send() {
    let mut t = Hba::new(2, MegasasConfig::default());
    t.init(16, false);
    let run = |t: &mut Hba, opcode: u32, len: u32| {
        t.write(BUF, &vec![0xee; len as usize]);
        t.write(FRAME, &dcmd_frame(opcode, flags::DONT_POST, len, 0));
        t.post(FRAME);
        (t.frame_status(FRAME), t.read(BUF, len as usize))
    };
    let (s, b) = run(&mut t, op::PD_LIST_QUERY, 8192);
    assert_eq!((s, &b[..8]), (status::OK, &[8, 0, 0, 0, 0, 0, 0, 0][..]));
    assert_eq!(b[8], 0xee, "nothing past the list");
    let (s, b) = run(&mut t, op::LD_LIST_QUERY, 268);
    assert_eq!((s, b[4], b[11], b[12]), (status::OK, 2, 0, 1));
    let (s, b) = run(&mut t, op::EVENT_GET_INFO, 20);
    assert_eq!((s, b), (status::OK, vec![0; 20]));
    let (s, _) = run(&mut t, op::CTRL_GET_PROPERTIES, 64);
    assert_eq!(s, status::OK);
    let (s, b) = run(&mut t, 0x0102_0300, 16);
    assert_eq!((s, b[0]), (status::INVALID_DCMD, 0xee));
    // Cut to the buffer: 16 bytes of the controller information.
    let (s, b) = run(&mut t, op::CTRL_GET_INFO, 16);
    assert_eq!((s, &b[..4]), (status::OK, &[0x00, 0x10, 0x60, 0x00][..]));
    // CACHE_FLUSH and SHUTDOWN flush every drive, when it has something
    // to flush: a SHUTDOWN right after a CACHE_FLUSH has nothing left on
    // drive 1, while drive 0 took a write in between.
    let flushes: Vec<u64> = t.disks.iter().map(|d| d.inner().flush_count()).collect();
    assert_eq!(run(&mut t, op::CACHE_FLUSH, 0).0, status::OK);
    t.write(FRAME + 0x800, &ld_frame(true, 0, 4, 1, &[(BUF, 512)], 80));
    t.post(FRAME + 0x800);
    assert_eq!(t.frame_status(FRAME + 0x800), status::OK);
    assert_eq!(run(&mut t, op::CTRL_SHUTDOWN, 0).0, status::OK);
    let now: Vec<u64> = t.disks.iter().map(|d| d.inner().flush_count()).collect();
    assert_eq!(now, [flushes[0] + 2, flushes[1] + 1]);

    // EVENT_WAIT is held; a second one is refused; ABORT drops it.
    let wait = FRAME + 0x400;
    t.write(wait, &dcmd_frame(op::EVENT_WAIT, 0, 256, 77));
    t.post(wait);
    assert!(t.hba.event_wait_held());
    assert_eq!(t.frame_status(wait), 0xff);
    let pi = t.rd32(PI);
    t.write(FRAME, &dcmd_frame(op::EVENT_WAIT, 0, 256, 78));
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::WRONG_STATE);
    let mut abort = header(cmd::ABORT, 0, 0, 0, 79);
    set(&mut abort, 0x18, &77u64.to_le_bytes());
    set(&mut abort, 0x20, &wait.to_le_bytes());
    t.write(FRAME, &abort);
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
    assert!(!t.hba.event_wait_held());
    assert_eq!(
        t.frame_status(wait),
        0xff,
        "the aborted frame never completes"
    );
    assert_eq!(t.rd32(PI), pi + 2, "the refused wait and the abort posted");
    // Aborting what is not held is fine too.
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::OK);
}

#[test]
fn resets_drop_what_is_held() {
    let mut t = Hba::new(1, MegasasConfig::default());
    t.init(8, false);
    t.write(FRAME, &dcmd_frame(op::EVENT_WAIT, 0, 256, 1));
    t.post(FRAME);
    assert!(t.hba.event_wait_held());
    // Masked interrupts, a queued frame.
    t.w32(reg::OMSK, 0);
    t.w32(reg::IQP, 0x3001);
    t.hba.reset(ResetReason::Command);
    assert_eq!(t.hba.fw_state(), FwState::Ready);
    assert!(!t.hba.event_wait_held());
    assert_eq!(t.hba.queued_frames(), 0);
    assert_eq!(t.r32(reg::OMSK), u32::MAX);
    assert_eq!(
        t.hba.read_config_register(1) & 0x7,
        0,
        "PCI command cleared"
    );
    // The next driver starts over: READY, INIT.
    t.hba.write_config_register(1, 0, &[0x07]);
    t.init(8, false);
    // The doorbell reset drops the EVENT_WAIT too.
    t.write(FRAME, &dcmd_frame(op::EVENT_WAIT, 0, 256, 1));
    t.post(FRAME);
    t.w32(reg::IDB, 7);
    assert!(!t.hba.event_wait_held());
}

#[test]
fn hostile_frames_are_contained() {
    let mut t = Hba::new(1, MegasasConfig::default());
    // Frames outside guest memory, at the top of the address space.
    for addr in [0x30_0000u32, 0xffff_ffe0] {
        t.w32(reg::IQP, addr);
    }
    t.w32(reg::IQPH, u32::MAX);
    t.w32(reg::IQPL, 0xffff_ffe0);
    while t.hba.run_deferred() {}
    // INIT with its queue outside guest memory.
    let mut f = header(cmd::INIT, flags::DONT_POST, 0, 0, 0);
    set(&mut f, 0x18, &0x30_0000u64.to_le_bytes());
    t.write(FRAME, &f);
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::INVALID_PARAMETER);
    assert_eq!(t.hba.fw_state(), FwState::Ready);
    t.init(8, false);
    // An SGE outside guest memory, a sense buffer outside it.
    let mut f = scsi_frame(0, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512, 0, 1);
    set(&mut f, 0x30, &0x30_0000u64.to_le_bytes());
    t.write(FRAME, &f);
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::INVALID_SGL);
    let mut f = scsi_frame(0, 0, &[0x04, 0, 0, 0, 0, 0], 0, 0, 2);
    set(&mut f, 0x18, &0x30_0000u32.to_le_bytes());
    t.write(FRAME, &f);
    t.post(FRAME);
    assert_eq!(t.frame_status(FRAME), status::SCSI_DONE_WITH_ERROR);
    assert_eq!(t.read(FRAME + 1, 1)[0], 0, "no sense written");
    // 255 SGEs that run off the end of guest memory.
    let mut f = scsi_frame(0, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512, 0, 3);
    f[7] = 255;
    t.write(0x1f_ff00, &f);
    t.post(0x1f_ff00);
    assert_eq!(t.frame_status(0x1f_ff00), status::INVALID_SGL);
    // The queue port is bounded.
    for _ in 0..MAX_QUEUED_FRAMES + 10 {
        t.w32(reg::IQP, FRAME as u32);
    }
    assert_eq!(t.hba.queued_frames(), MAX_QUEUED_FRAMES);
    // Bus mastering off: frames are dropped, nothing is touched.
    t.hba.write_config_register(1, 0, &[0x03]);
    t.write(FRAME, &scsi_frame(0, 0, &[0, 0, 0, 0, 0, 0], 0, 0, 4));
    assert!(!t.hba.run_deferred());
    assert_eq!(t.hba.queued_frames(), 0);
    assert_eq!(t.frame_status(FRAME), 0xff);
}

#[test]
fn frames_held_in_every_state_stay_bounded() {
    let mut t = Hba::new(
        1,
        MegasasConfig {
            on_error: ErrorPolicy::Stop,
            ..Default::default()
        },
    );
    t.init(8, false);
    t.set_fault(Some(libc::ENOSPC));
    t.write(FRAME, &ld_frame(true, 0, 4, 1, &[(BUF, 512)], 1));
    t.post(FRAME);
    t.hba.complete_in_flight(None);
    assert_eq!(t.hba.kept_frames(), 1);
    // Stopped: posts queue up, and the kept frame counts against the
    // bound, so that resuming cannot queue more than it.
    for _ in 0..MAX_QUEUED_FRAMES + 10 {
        t.w32(reg::IQP, FRAME as u32);
    }
    assert_eq!(
        t.hba.queued_frames() + t.hba.kept_frames(),
        MAX_QUEUED_FRAMES
    );
    Pausable::resume(&mut t.hba).unwrap();
    assert_eq!(t.hba.queued_frames(), MAX_QUEUED_FRAMES);
}

#[test]
fn transfers_on_io_threads() {
    transfers_in_flight(Aio::Threads(2));
}

#[test]
fn transfers_on_io_uring() {
    on_io_uring(transfers_in_flight);
}

/// Runs `test` with [`Aio::IoUring`], or says it skips where the kernel
/// has no io_uring for us.
fn on_io_uring(test: fn(Aio)) {
    match crate::block_io::io_uring_support() {
        Ok(()) => test(Aio::IoUring),
        Err(why) => eprintln!("SKIP io_uring: {why}"),
    }
}

fn transfers_in_flight(aio: Aio) {
    let mut t = Hba::new(
        1,
        MegasasConfig {
            aio,
            ..Default::default()
        },
    );
    assert_eq!(t.hba.aio(), aio);
    assert_eq!(t.hba.watched_fds().len(), 1);
    let fd = t.hba.watched_fds()[0].fd;
    t.enable_msix();
    t.init(8, false);
    t.w32(reg::OMSK, 0);
    t.write(BUF, &[0x5a; 1024]);
    t.write(FRAME, &ld_frame(true, 0, 10, 2, &[(BUF, 1024)], 3));
    t.write(FRAME + 0x100, &ld_frame(false, 0, 20, 1, &[(HIGH, 512)], 4));
    t.w32(reg::IQP, FRAME as u32);
    t.post(FRAME + 0x100);
    // Wait for the completion eventfd, then complete.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while t.rd32(PI) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "transfers never completed"
        );
        t.hba.handle_event(fd, Interest::READ);
        std::thread::yield_now();
    }
    assert_eq!(t.hba.in_flight(), 0);
    assert_eq!(
        (t.frame_status(FRAME), t.frame_status(FRAME + 0x100)),
        (0, 0)
    );
    assert_eq!(
        t.disks[0].inner().contents()[10 * 512..12 * 512],
        [0x5a; 1024]
    );
    assert_eq!(t.read(HIGH, 1)[0], 20);
    assert!(t.msix.read().unwrap() >= 1);
    // Pausing completes what is in flight; nothing runs while paused.
    t.write(FRAME, &ld_frame(false, 0, 30, 1, &[(BUF, 512)], 5));
    t.post(FRAME);
    Pausable::pause(&mut t.hba).unwrap();
    assert_eq!((t.hba.in_flight(), t.frame_status(FRAME)), (0, 0));
    t.w32(reg::IQP, FRAME as u32);
    assert!(!t.hba.run_deferred());
    assert_eq!(t.hba.queued_frames(), 1);
    Pausable::resume(&mut t.hba).unwrap();
    assert!(!t.hba.run_deferred());
    assert_eq!(t.hba.queued_frames(), 0);
}

#[test]
fn cache_flushes_on_io_threads() {
    cache_flushes_in_flight(Aio::Threads(2));
}

#[test]
fn cache_flushes_on_io_uring() {
    on_io_uring(cache_flushes_in_flight);
}

/// CACHE_FLUSH and SHUTDOWN run on the drives' I/O threads or io_uring,
/// not on the event loop: the frame completes when the last drive's
/// flush is collected, FLUSH_FAILED if one failed (and the next flush
/// tries that drive again); a reset drops a flush in flight.
fn cache_flushes_in_flight(aio: Aio) {
    let mut t = Hba::new(
        2,
        MegasasConfig {
            aio,
            ..Default::default()
        },
    );
    t.init(8, false);
    let flush = |t: &mut Hba, opcode: u32, context: u32| {
        t.write(FRAME, &dcmd_frame(opcode, 0, 0, context));
        t.post(FRAME);
    };
    // The ring takes no flush of an in-memory disk (nothing to wait
    // for): it is done on the spot. (Its flush of a file is the block
    // layer's test.)
    let on_ring = aio == Aio::IoUring;
    let running = |t: &Hba, drives: usize| {
        let expect = if on_ring {
            (status::OK, 0)
        } else {
            (0xff, drives)
        };
        assert_eq!(
            (t.frame_status(FRAME), t.hba.in_flight()),
            expect,
            "{aio:?}"
        );
    };
    // Both drives hold what was there before: both flush, in flight.
    flush(&mut t, op::CACHE_FLUSH, 1);
    running(&t, 2);
    t.hba.complete_in_flight(None);
    assert_eq!((t.frame_status(FRAME), t.rd32(PI)), (status::OK, 1));
    assert_eq!(t.rd32(RING), 1, "the flush's context is posted");
    // Only drive 1 took a write since: only it flushes.
    t.write(FRAME + 0x800, &ld_frame(true, 1, 4, 1, &[(BUF, 512)], 2));
    t.post(FRAME + 0x800);
    t.hba.complete_in_flight(None);
    flush(&mut t, op::CTRL_SHUTDOWN, 3);
    running(&t, 1);
    t.hba.complete_in_flight(None);
    assert_eq!((t.frame_status(FRAME), t.rd32(PI)), (status::OK, 3));
    // Nothing written since: done on the spot.
    flush(&mut t, op::CACHE_FLUSH, 4);
    assert_eq!((t.frame_status(FRAME), t.hba.in_flight()), (status::OK, 0));

    // Drive 0 cannot flush: the frame fails, and the next flush tries
    // drive 0 again (and drive 1, which took a write).
    t.write(FRAME + 0x800, &ld_frame(true, 0, 4, 1, &[(BUF, 512)], 5));
    t.post(FRAME + 0x800);
    t.write(FRAME + 0x900, &ld_frame(true, 1, 4, 1, &[(BUF, 512)], 6));
    t.post(FRAME + 0x900);
    t.hba.complete_in_flight(None);
    t.disks[0].fail(Call::Flush, 0, 0, libc::EIO, Some(1));
    flush(&mut t, op::CACHE_FLUSH, 7);
    t.hba.complete_in_flight(None);
    assert_eq!(t.frame_status(FRAME), status::FLUSH_FAILED);
    assert_eq!(t.disks[0].failed(), 1);
    let counts = |t: &Hba| {
        t.disks
            .iter()
            .map(|d| d.inner().flush_count())
            .collect::<Vec<_>>()
    };
    let before = counts(&t);
    flush(&mut t, op::CACHE_FLUSH, 8);
    t.hba.complete_in_flight(None);
    assert_eq!(t.frame_status(FRAME), status::OK);
    assert_eq!(
        counts(&t),
        [before[0] + 1, before[1]],
        "drive 0 again, drive 1 was clean"
    );
    if on_ring {
        return;
    }

    // A second flush while the first is in flight does not answer before
    // it: it flushes too (the first may not even have started).
    t.write(FRAME + 0x800, &ld_frame(true, 0, 4, 1, &[(BUF, 512)], 11));
    t.post(FRAME + 0x800);
    t.hba.complete_in_flight(None);
    flush(&mut t, op::CACHE_FLUSH, 12);
    let second = FRAME + 0x400;
    t.write(second, &dcmd_frame(op::CTRL_SHUTDOWN, 0, 0, 13));
    t.post(second);
    assert_eq!(
        (
            t.frame_status(FRAME),
            t.frame_status(second),
            t.hba.in_flight()
        ),
        (0xff, 0xff, 2)
    );
    t.hba.complete_in_flight(None);
    assert_eq!(
        (t.frame_status(FRAME), t.frame_status(second)),
        (status::OK, status::OK)
    );

    // A reset drops a flush in flight: its frame never completes.
    t.write(FRAME + 0x800, &ld_frame(true, 0, 4, 1, &[(BUF, 512)], 9));
    t.post(FRAME + 0x800);
    t.hba.complete_in_flight(None);
    let pi = t.rd32(PI);
    flush(&mut t, op::CACHE_FLUSH, 10);
    assert_eq!(t.hba.in_flight(), 1);
    t.w32(reg::IDB, super::regs::doorbell::READY);
    t.hba.complete_in_flight(None);
    assert_eq!((t.frame_status(FRAME), t.rd32(PI)), (0xff, pi));
    assert_eq!(t.hba.in_flight(), 0);
}

#[test]
fn snapshot_and_restore() {
    let mut t = Hba::new(2, MegasasConfig::default());
    t.init(8, true);
    t.w32(reg::OMSK, !0x8000_0000);
    t.write(FRAME + 0x400, &dcmd_frame(op::EVENT_WAIT, 0, 256, 9));
    t.post(FRAME + 0x400);
    t.write(FRAME, &scsi_frame(0, 0, &[0, 0, 0, 0, 0, 0], 0, 0, 10));
    t.post(FRAME);
    // A frame queued and not run yet travels with the state.
    t.write(
        FRAME + 0x200,
        &scsi_frame(1, 0, &[0, 0, 0, 0, 0, 0], 0, 0, 11),
    );
    t.w32(reg::IQP, (FRAME + 0x200) as u32);
    Pausable::pause(&mut t.hba).unwrap();
    let snap = t.hba.snapshot().unwrap();
    assert_eq!(t.hba.id(), "megasas");
    assert!(t.hba.migratable());

    // Restored into a controller on the same guest memory.
    let mut u = Hba::new(2, MegasasConfig::default());
    u.mem = t.mem.clone();
    u.hba.memory = t.mem.clone();
    u.hba.restore(&snap).unwrap();
    assert_eq!(u.hba.fw_state(), FwState::Operational);
    assert!(u.hba.event_wait_held());
    assert_eq!(u.hba.queued_frames(), 1);
    assert_eq!(u.r32(reg::OMSK), !0x8000_0000);
    while u.hba.run_deferred() {}
    assert_eq!(u.frame_status(FRAME + 0x200), status::OK);
    assert_eq!(u.rd32(PI), 2, "posted after the first, 64-bit contexts");
    assert_eq!(
        u64::from_le_bytes(u.read(RING + 8, 8).try_into().unwrap()),
        11
    );
    // The held EVENT_WAIT can be aborted on the new controller.
    let mut abort = header(cmd::ABORT, 0, 0, 0, 12);
    set(&mut abort, 0x20, &(FRAME + 0x400).to_le_bytes());
    u.write(FRAME, &abort);
    u.post(FRAME);
    assert!(!u.hba.event_wait_held());

    // A controller with other disks refuses it, unchanged.
    let mut v = Hba::new(1, MegasasConfig::default());
    assert!(v.hba.restore(&snap).is_err());
    assert_eq!(v.hba.fw_state(), FwState::Ready);
    let mut bad = snap.clone();
    bad.snapshots.clear();
    assert!(Hba::new(2, MegasasConfig::default())
        .hba
        .restore(&bad)
        .is_err());
    v.hba.reset(ResetReason::LostConnection);
    assert!(!v.hba.event_wait_held());
    assert_eq!(v.hba.num_disks(), 1);
    assert_eq!(v.hba.disk_blocks(0), Some(2048));
    assert_eq!(v.hba.disk_blocks(1), None);
}

#[test]
fn bad_configurations() {
    let ctx = DeviceContext::default();
    assert!(matches!(
        Megasas::new(&ctx, Vec::new(), &MegasasConfig::default()),
        Err(MegasasError::NoDisks)
    ));
    let d: Arc<dyn BlockBackend> = Arc::new(MemoryDisk::from_vec(vec![0; 4096], false));
    assert!(matches!(
        Megasas::new(
            &ctx,
            vec![d.clone(); MAX_LDS + 1],
            &MegasasConfig::default()
        ),
        Err(MegasasError::TooManyDisks(65))
    ));
    let tiny: Arc<dyn BlockBackend> = Arc::new(MemoryDisk::from_vec(vec![0; 100], false));
    assert!(matches!(
        Megasas::new(&ctx, vec![d, tiny], &MegasasConfig::default()),
        Err(MegasasError::Disk(1, _))
    ));
}

#[test]
fn restored_frames_wait_for_their_memory() {
    let mut t = Hba::new(1, MegasasConfig::default());
    t.init(8, false);
    let read = ld_frame(false, 0, 3, 1, &[(HIGH, 512)], 5);
    t.write(FRAME, &read);
    t.w32(reg::IQP, FRAME as u32);
    Pausable::pause(&mut t.hba).unwrap();
    let snap = t.hba.snapshot().unwrap();

    // The new client has mapped the low region only: the frame waits.
    let low_only = || {
        let low = vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(
            GuestAddress(0),
            0x20_0000,
        )])
        .unwrap();
        low.write_slice(&read, GuestAddress(FRAME)).unwrap();
        low
    };
    let mut u = Hba::new(1, MegasasConfig::default());
    u.mem.lock().unwrap().replace(low_only());
    u.hba.restore(&snap).unwrap();
    assert!(!u.hba.run_deferred());
    assert_eq!(u.hba.queued_frames(), 1);
    // The high region arrives: it runs.
    u.mem.lock().unwrap().replace((*t.mem()).clone());
    assert!(!u.hba.run_deferred());
    assert_eq!(u.hba.queued_frames(), 0);
    assert_eq!(t.frame_status(FRAME), status::OK);
    assert_eq!(t.read(HIGH, 1)[0], 3);

    // A register access means the guest runs: the frame runs as it is.
    let mut v = Hba::new(1, MegasasConfig::default());
    v.mem.lock().unwrap().replace(low_only());
    v.hba.restore(&snap).unwrap();
    assert!(!v.hba.run_deferred());
    assert_eq!(v.r32(reg::OSP0) >> 28, 0xc);
    assert!(!v.hba.run_deferred());
    assert_eq!(v.hba.queued_frames(), 0);
    assert_eq!(v.frame_status(FRAME), status::INVALID_SGL);
}

/// A queued INIT waits, like any frame, for its queue information and the
/// queue it sets up to be mapped.
#[test]
fn a_restored_init_waits_for_its_queue() {
    let mut t = Hba::new(1, MegasasConfig::default());
    let mut q = Vec::new();
    q.extend_from_slice(&0u32.to_le_bytes());
    q.extend_from_slice(&8u32.to_le_bytes());
    for a in [HIGH, HIGH + 0x1000, HIGH + 0x1004] {
        q.extend_from_slice(&a.to_le_bytes());
    }
    t.write(QINFO, &q);
    let mut f = header(cmd::INIT, 0, 0, 0, 7);
    set(&mut f, 0x18, &QINFO.to_le_bytes());
    t.write(FRAME, &f);
    t.w32(reg::IQP, FRAME as u32);
    Pausable::pause(&mut t.hba).unwrap();
    let snap = t.hba.snapshot().unwrap();

    let mut u = Hba::new(1, MegasasConfig::default());
    let low =
        vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x20_0000)])
            .unwrap();
    low.write_slice(&f, GuestAddress(FRAME)).unwrap();
    low.write_slice(&q, GuestAddress(QINFO)).unwrap();
    u.mem.lock().unwrap().replace(low);
    u.hba.restore(&snap).unwrap();
    assert!(!u.hba.run_deferred());
    assert_eq!(u.hba.queued_frames(), 1, "INIT ran without its queue");
    assert_eq!(u.hba.fw_state(), FwState::Ready);
    u.mem.lock().unwrap().replace((*t.mem()).clone());
    assert!(!u.hba.run_deferred());
    assert_eq!(u.hba.queued_frames(), 0);
    assert_eq!(u.hba.fw_state(), FwState::Operational);
    assert_eq!(t.frame_status(FRAME), status::OK);
}

/// Back-end errors: reported as a medium error, or (stop) the frame kept,
/// nothing more run until resume, then the kept frame and the queued ones
/// run, across a snapshot too.
#[test]
fn back_end_errors_report_or_stop() {
    for aio in [Aio::Sync, Aio::Threads(2), Aio::IoUring] {
        // Report: the guest gets MEDIUM ERROR, and the next frame works.
        let mut t = Hba::new(
            1,
            MegasasConfig {
                aio,
                ..Default::default()
            },
        );
        t.init(8, false);
        t.set_fault(Some(libc::EIO));
        t.write(FRAME, &ld_frame(true, 0, 4, 1, &[(BUF, 512)], 1));
        t.post(FRAME);
        t.hba.complete_in_flight(None);
        assert_eq!(
            t.frame_status(FRAME),
            status::SCSI_DONE_WITH_ERROR,
            "{aio:?}"
        );
        let sense = t.read(SENSE, 14);
        assert_eq!(
            (sense[2], sense[12]),
            (3, 0x0c),
            "MEDIUM ERROR, write error"
        );
        assert_eq!(t.hba.stopped_on_error(), None);
        // The write cache cannot be flushed: the controller refuses to
        // pause (a snapshot would not hold what the guest wrote).
        assert!(Pausable::pause(&mut t.hba).is_err());
        t.set_fault(None);
        t.write(FRAME, &ld_frame(true, 0, 4, 1, &[(BUF, 512)], 2));
        t.post(FRAME);
        t.hba.complete_in_flight(None);
        assert_eq!(t.frame_status(FRAME), status::OK);

        // Stop: ENOSPC keeps the write; a read queued after it waits.
        let mut t = Hba::new(
            1,
            MegasasConfig {
                aio,
                on_error: ErrorPolicy::Stop,
                ..Default::default()
            },
        );
        t.init(8, false);
        t.write(BUF, &[0x3c; 512]);
        t.set_fault(Some(libc::ENOSPC));
        t.write(FRAME, &ld_frame(true, 0, 4, 1, &[(BUF, 512)], 1));
        t.post(FRAME);
        t.hba.complete_in_flight(None);
        let reason = t.hba.stopped_on_error().expect("stopped");
        assert!(reason.contains("write of 512 bytes at block 4"), "{reason}");
        assert_eq!((t.frame_status(FRAME), t.hba.kept_frames()), (0xff, 1));
        // (Another block: on I/O threads the two run at the same time.)
        t.write(FRAME + 0x100, &ld_frame(false, 0, 8, 1, &[(HIGH, 512)], 2));
        t.post(FRAME + 0x100);
        assert_eq!(
            (t.frame_status(FRAME + 0x100), t.hba.queued_frames()),
            (0xff, 1)
        );
        assert_eq!(t.rd32(PI), 0, "nothing completed");

        // Moved while stopped: the new controller keeps the stop. (The
        // storage takes the pause's cache flush.)
        t.set_fault(None);
        Pausable::pause(&mut t.hba).unwrap();
        let snap = Snapshottable::snapshot(&mut t.hba).unwrap();
        let mut u = Hba::new(
            1,
            MegasasConfig {
                aio,
                on_error: ErrorPolicy::Stop,
                ..Default::default()
            },
        );
        for (addr, len) in [(0u64, 0x20_0000usize), (HIGH, 0x10_0000)] {
            let b = t.read(addr, len);
            u.write(addr, &b);
        }
        Lifecycle::restore(&mut u.hba, &snap).unwrap();
        assert!(u.hba.stopped_on_error().is_some());
        assert_eq!(u.hba.kept_frames(), 1);
        assert!(!u.hba.run_deferred(), "stopped: nothing runs");

        // The storage has room again: resume runs the write, then the read.
        Pausable::resume(&mut u.hba).unwrap();
        assert_eq!(u.hba.stopped_on_error(), None);
        while u.hba.run_deferred() {}
        u.hba.complete_in_flight(None);
        assert_eq!(
            (u.frame_status(FRAME), u.frame_status(FRAME + 0x100)),
            (status::OK, status::OK),
            "{aio:?}"
        );
        assert_eq!(u.disks[0].inner().contents()[4 * 512..5 * 512], [0x3c; 512]);
        assert_eq!(u.read(HIGH, 512), [8; 512]);
        let mut posted = [u.rd32(RING), u.rd32(RING + 4)];
        posted.sort();
        assert_eq!((posted, u.rd32(PI)), ([1, 2], 2), "each posted once");

        // A reset forgets a stop and what it kept.
        u.set_fault(Some(libc::EIO));
        u.write(FRAME, &ld_frame(true, 0, 4, 1, &[(BUF, 512)], 3));
        u.post(FRAME);
        u.hba.complete_in_flight(None);
        assert!(u.hba.stopped_on_error().is_some());
        Lifecycle::reset(&mut u.hba, ResetReason::Command);
        assert_eq!((u.hba.stopped_on_error(), u.hba.kept_frames()), (None, 0));
    }
}
