//! `TestDevice`: a small device with RAM, an mmap-able memfd BAR, config
//! space, MSI-X, a DMA doorbell, and a shared record of what the server
//! asked of it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_user_server::irq::IrqIndexInfo;
use vfio_user_server::vm_migration::{Migratable, Pausable, Snapshottable, Transportable};
use vfio_user_server::{
    Device, DeviceContext, DeviceError, Lifecycle, RegionDescription, RegionMmap, ResetReason,
};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

/// BAR0 size (plain RAM, message access only).
pub const BAR0_SIZE: u64 = 4096;
/// BAR1 size (memfd, sparse-mmap-able).
pub const BAR1_SIZE: u64 = 16384;
/// BAR1 mmap-able areas.
pub const BAR1_AREAS: [(u64, u64); 2] = [(0, 4096), (8192, 4096)];
/// Config space size.
pub const CONFIG_SIZE: u64 = 256;
/// Vendor id in config space.
pub const VENDOR_ID: u16 = 0x1234;
/// Device id in config space.
pub const DEVICE_ID: u16 = 0x11e8;
/// Offset in BAR1 where the device keeps a marker byte.
pub const BAR1_MARKER_OFFSET: u64 = 0x10;
/// The marker byte.
pub const BAR1_MARKER: u8 = 0x5a;
/// BAR0 doorbell: a 4-byte write of N here makes the device DMA
/// [`dma_pattern`]`(N)` to [`DMA_TARGET`] and raise MSI-X vector 0.
pub const DMA_DOORBELL: u64 = 0xff0;
/// BAR0 stall register: a 4-byte write of N makes the device block the
/// event loop for N milliseconds (to queue up input deterministically).
pub const STALL_REGISTER: u64 = 0xff8;
/// Where tests map guest RAM.
pub const GUEST_RAM_BASE: u64 = 0x10_0000;
/// Size of the guest RAM tests map.
pub const GUEST_RAM_SIZE: u64 = 0x4000;
/// Guest address the device writes to.
pub const DMA_TARGET: u64 = GUEST_RAM_BASE + 0x200;
/// Number of MSI-X vectors.
pub const MSIX_VECTORS: u32 = 4;

/// The 8 bytes the device writes for doorbell value `n`.
pub fn dma_pattern(n: u32) -> u64 {
    ((n as u64) << 32) | (!n) as u64
}

/// The regions of a minimal PCI device: BAR0 of [`BAR0_SIZE`] bytes and
/// config space of [`CONFIG_SIZE`], both read and written through
/// messages, nothing else.
pub fn bar0_and_config_region(index: u32) -> RegionDescription {
    let size = match index {
        0 => BAR0_SIZE,
        7 => CONFIG_SIZE,
        _ => 0,
    };
    RegionDescription {
        size,
        read: size > 0,
        write: size > 0,
        mmap: None,
    }
}

/// What the device saw, shared with the test.
#[derive(Debug, Default)]
pub struct DeviceState {
    /// Resets, in order.
    pub resets: Vec<ResetReason>,
    /// `dma_unmapping` calls `(address, size)`, in order.
    pub unmapping: Vec<(u64, u64)>,
    /// Doorbell DMAs `(address, value, succeeded)`.
    pub dma: Vec<(u64, u64, bool)>,
    /// `irq_mask_changed` calls `(index, start, count, masked)`.
    pub mask_changes: Vec<(u32, u32, u32, bool)>,
    /// Region writes `(index, offset, data)`, in order.
    pub writes: Vec<(u32, u64, Vec<u8>)>,
}

/// State handle.
pub type SharedState = Arc<Mutex<DeviceState>>;

/// Locks a state handle (ignoring poisoning from a failed test thread).
pub fn lock(s: &SharedState) -> MutexGuard<'_, DeviceState> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Creates a memfd of `size` bytes.
pub fn memfd(name: &str, size: u64) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated name; the returned fd is new and owned.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// The test device.
pub struct TestDevice {
    ctx: DeviceContext,
    state: SharedState,
    bar0: Vec<u8>,
    bar1: File,
    config: Vec<u8>,
}

impl TestDevice {
    /// Creates the device and the handle on its state.
    pub fn new(ctx: DeviceContext) -> (TestDevice, SharedState) {
        let state = SharedState::default();
        let mut d = TestDevice {
            ctx,
            state: state.clone(),
            bar0: Vec::new(),
            bar1: memfd("test-bar1", BAR1_SIZE),
            config: Vec::new(),
        };
        d.power_on();
        (d, state)
    }

    fn power_on(&mut self) {
        self.bar0 = vec![0; BAR0_SIZE as usize];
        self.config = vec![0; CONFIG_SIZE as usize];
        self.config[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
        self.config[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
        let zero = vec![0u8; BAR1_SIZE as usize];
        self.bar1.write_all_at(&zero, 0).unwrap();
        self.bar1
            .write_all_at(&[BAR1_MARKER], BAR1_MARKER_OFFSET)
            .unwrap();
    }

    fn doorbell(&mut self, n: u32) -> Result<(), DeviceError> {
        let value = dma_pattern(n);
        let mem = self.ctx.memory.memory();
        let ok = mem.write_obj(value, GuestAddress(DMA_TARGET)).is_ok();
        lock(&self.state).dma.push((DMA_TARGET, value, ok));
        if !ok {
            return Err(DeviceError::Errno(libc::EFAULT));
        }
        let _ = self.ctx.irqs.trigger(2, 0);
        Ok(())
    }
}

impl Device for TestDevice {
    fn region(&self, index: u32) -> RegionDescription {
        match index {
            0 => RegionDescription {
                size: BAR0_SIZE,
                read: true,
                write: true,
                mmap: None,
            },
            1 => RegionDescription {
                size: BAR1_SIZE,
                read: true,
                write: true,
                mmap: Some(RegionMmap {
                    fd: self.bar1.as_raw_fd(),
                    offset: 0,
                    areas: BAR1_AREAS.to_vec(),
                }),
            },
            7 => RegionDescription {
                size: CONFIG_SIZE,
                read: true,
                write: true,
                mmap: None,
            },
            _ => RegionDescription::default(),
        }
    }

    fn irq_layout(&self) -> Vec<IrqIndexInfo> {
        IrqIndexInfo::pci_layout(true, 0, MSIX_VECTORS)
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let o = offset as usize;
        match index {
            0 => data.copy_from_slice(&self.bar0[o..o + data.len()]),
            1 => self
                .bar1
                .read_exact_at(data, offset)
                .map_err(|_| DeviceError::Errno(libc::EIO))?,
            7 => data.copy_from_slice(&self.config[o..o + data.len()]),
            _ => return Err(DeviceError::InvalidAccess),
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        lock(&self.state)
            .writes
            .push((index, offset, data.to_vec()));
        let o = offset as usize;
        match index {
            0 => {
                self.bar0[o..o + data.len()].copy_from_slice(data);
                if offset == DMA_DOORBELL && data.len() == 4 {
                    let n = u32::from_le_bytes(data.try_into().unwrap());
                    return self.doorbell(n);
                }
                if offset == STALL_REGISTER && data.len() == 4 {
                    let ms = u32::from_le_bytes(data.try_into().unwrap());
                    std::thread::sleep(std::time::Duration::from_millis(ms.into()));
                }
            }
            1 => self
                .bar1
                .write_all_at(data, offset)
                .map_err(|_| DeviceError::Errno(libc::EIO))?,
            7 => {
                // The id dword is read-only.
                for (i, b) in data.iter().enumerate() {
                    if o + i >= 4 {
                        self.config[o + i] = *b;
                    }
                }
            }
            _ => return Err(DeviceError::InvalidAccess),
        }
        Ok(())
    }
}

impl Pausable for TestDevice {}
impl Snapshottable for TestDevice {}
impl Transportable for TestDevice {}
impl Migratable for TestDevice {}

impl Lifecycle for TestDevice {
    fn reset(&mut self, reason: ResetReason) {
        lock(&self.state).resets.push(reason);
        self.power_on();
    }

    fn dma_unmapping(&mut self, address: u64, size: u64) {
        lock(&self.state).unmapping.push((address, size));
    }

    fn irq_mask_changed(&mut self, index: u32, start: u32, count: u32, masked: bool) {
        lock(&self.state)
            .mask_changes
            .push((index, start, count, masked));
    }
}
