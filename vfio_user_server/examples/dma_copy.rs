//! A DMA copy engine: a small PCI device built on [`PciFunction`], served
//! over vfio-user. Run it with
//! `cargo run -p vfio_user_server --example dma_copy -- /tmp/dma.sock`.
//!
//! BAR 0 (4 KiB) holds the registers, then the MSI-X table (one vector) at
//! 0x800 and its PBA at 0xc00. All registers are little-endian.
//!
//! | offset | register                                                |
//! |--------|---------------------------------------------------------|
//! | 0x00   | `SRC`: source guest address (64 bits)                   |
//! | 0x08   | `DST`: destination guest address (64 bits)              |
//! | 0x10   | `LEN`: bytes to copy, at most 1 MiB (32 bits)           |
//! | 0x14   | `DOORBELL`: a write starts the copy; reads 1 until done |
//! | 0x18   | `STATUS`: 0 after a good copy, 1 after a failed one     |
//! | 0x1c   | `COUNT`: copies finished, good or failed                |
//!
//! A finished copy raises MSI-X vector 0, or INTx if MSI-X is off. Copies
//! fail unless the guest enabled bus mastering.

use std::error::Error;
use std::path::{Path, PathBuf};

use vfio_user_server::guest_memory::GuestMemoryHandle;
use vfio_user_server::pci::{
    PciAdapter, PciBarConfiguration, PciBarPrefetchable, PciBarRegionType, PciConfigurationParams,
    PciDevice, PciDeviceError, PciFunction,
};
use vfio_user_server::vm_migration::{
    Migratable, MigratableError, Pausable, Snapshot, Snapshottable, Transportable,
};
use vfio_user_server::{DeviceContext, EventLoop, Lifecycle, ResetReason, Server, StopHandle};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

// Register offsets in BAR 0, and the size of the register file.
const SRC: usize = 0x00;
const DST: usize = 0x08;
const LEN: usize = 0x10;
const DOORBELL: usize = 0x14;
const STATUS: usize = 0x18;
const COUNT: usize = 0x1c;
const REGS: usize = 0x20;
/// Largest copy, which bounds what one doorbell costs.
const MAX_LEN: u64 = 1 << 20;
/// The child snapshot holding the PCI function's state.
const PCI_SNAPSHOT_ID: &str = "pci";

/// The DMA copy engine.
pub struct DmaCopy {
    pci: PciFunction,
    memory: GuestMemoryHandle,
    /// The register file, which is all the state besides the function's.
    regs: [u8; REGS],
}

impl DmaCopy {
    /// A device that reaches guest memory and raises interrupts through
    /// `ctx`, the context the server gets with it.
    pub fn new(ctx: &DeviceContext) -> Result<Self, PciDeviceError> {
        let params = PciConfigurationParams {
            vendor_id: 0x1234, // QEMU's vendor id for emulated devices.
            device_id: 0xdc01,
            class_code: 0xff,
            interrupt_pin: 1,
            ..Default::default()
        };
        let mut pci = PciFunction::new(params, ctx.irqs.clone());
        let (mem32, np) = (
            PciBarRegionType::Memory32BitRegion,
            PciBarPrefetchable::NotPrefetchable,
        );
        pci.add_bar(PciBarConfiguration::new(0, 0x1000, mem32, np))?;
        pci.add_msix(1, 0, 0x800, 0xc00)?;
        let (memory, regs) = (ctx.memory.clone(), [0; REGS]);
        Ok(DmaCopy { pci, memory, regs })
    }

    /// The `len`-byte register at `at`.
    fn reg(&self, at: usize, len: usize) -> u64 {
        let bytes = self.regs[at..at + len].iter().rev();
        bytes.fold(0, |value, &b| value << 8 | u64::from(b))
    }

    fn set_reg(&mut self, at: usize, value: u32) {
        self.regs[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// Copies `LEN` bytes from `SRC` to `DST`. vm-memory checks every
    /// access: memory the client did not map fails the copy, which then
    /// writes nothing (the destination is checked first).
    fn copy(&self) -> bool {
        let (src, dst, len) = (self.reg(SRC, 8), self.reg(DST, 8), self.reg(LEN, 4));
        if !self.pci.config().bus_master() || len > MAX_LEN {
            return false;
        }
        let memory = self.memory.memory();
        let mut buf = vec![0; len as usize];
        memory.check_range(GuestAddress(dst), buf.len())
            && memory.read_slice(&mut buf, GuestAddress(src)).is_ok()
            && memory.write_slice(&buf, GuestAddress(dst)).is_ok()
    }
}

/// BAR 0 is the only BAR, so `base` is its address, and the server checked
/// that accesses lie within it.
impl PciDevice for DmaCopy {
    /// Config space, BARs and the MSI-X table are the function's.
    fn pci_function(&mut self) -> Option<&mut PciFunction> {
        Some(&mut self.pci)
    }

    fn read_bar(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (at, byte) in (offset as usize..).zip(data) {
            *byte = self.regs.get(at).copied().unwrap_or(0);
        }
    }

    fn write_bar(&mut self, _base: u64, offset: u64, data: &[u8]) {
        for (at, &byte) in (offset as usize..).zip(data) {
            match at {
                ..DOORBELL => self.regs[at] = byte,
                // The copy runs in `run_deferred`, once the write is answered.
                DOORBELL..STATUS => self.regs[DOORBELL] = 1,
                _ => {} // Read-only.
            }
        }
    }
}

impl Lifecycle for DmaCopy {
    fn reset(&mut self, _reason: ResetReason) {
        self.regs = [0; REGS];
        self.pci.reset();
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        let regs = snapshot.to_state()?;
        let pci = snapshot.snapshots.get(PCI_SNAPSHOT_ID);
        self.pci
            .restore(pci.ok_or(MigratableError::Restore("no PCI state".into()))?)?;
        self.regs = regs;
        Ok(())
    }

    fn migratable(&self) -> bool {
        true
    }

    fn run_deferred(&mut self) -> bool {
        // Restored before the client mapped guest memory: the copy waits
        // (the server calls again after every message).
        if self.regs[DOORBELL] == 0 || self.memory.memory().num_regions() == 0 {
            return false;
        }
        let status = if self.copy() { 0 } else { 1 };
        self.regs[DOORBELL] = 0;
        self.set_reg(STATUS, status);
        self.set_reg(COUNT, (self.reg(COUNT, 4) as u32).wrapping_add(1));
        self.pci.signal_or_log(0);
        false
    }
}

/// Copies run in `run_deferred`, which the server does not call while the
/// device is paused: pausing has nothing to stop.
impl Pausable for DmaCopy {}

impl Snapshottable for DmaCopy {
    fn id(&self) -> String {
        "dma-copy".into()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let mut snapshot = Snapshot::new_from_state(&self.regs)?;
        snapshot.add_snapshot(PCI_SNAPSHOT_ID.into(), self.pci.snapshot()?);
        Ok(snapshot)
    }
}

impl Transportable for DmaCopy {}
impl Migratable for DmaCopy {}

/// Serves a [`DmaCopy`] on `socket` until the stop handle given to `ready`
/// (once the socket listens) is used.
pub fn serve(
    socket: &Path,
    ready: impl FnOnce(StopHandle),
) -> Result<(), Box<dyn Error + Send + Sync>> {
    let ctx = DeviceContext::default();
    let device = Box::new(PciAdapter::new(DmaCopy::new(&ctx)?)?);
    let server = Server::new(socket, device, ctx, Default::default())?;
    // A client that truncates its guest memory is dropped instead of
    // killing the process with SIGBUS.
    vfio_user_server::sigbus::install()?;
    let mut event_loop = EventLoop::new()?;
    event_loop.add_server(server)?;
    ready(event_loop.stop_handle());
    // Dropping the loop drops the server, which removes the socket.
    Ok(event_loop.run()?)
}

fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let socket = PathBuf::from(std::env::args_os().nth(1).ok_or("usage: dma_copy SOCKET")?);
    serve(&socket, |stop| {
        if let Err(e) = stop.stop_on_termination_signals() {
            log::warn!("signals will not stop the server: {e}");
        }
        let s = std::path::absolute(&socket).unwrap_or_else(|_| socket.clone());
        let s = s.display();
        println!("dma_copy: serving {s}; Ctrl-C or SIGTERM stops. Attach (guest RAM shared):");
        println!("  qemu-system-x86_64 ... -numa node,memdev=mem \\");
        println!("    -object memory-backend-memfd,id=mem,size=1G,share=on \\");
        println!("    -device '{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"type\":\"unix\",\"path\":\"{s}\"}}}}'");
        println!("  cloud-hypervisor ... --memory size=1G,shared=on --user-device socket={s}");
    })
}
