//! Drop-in compatibility: a device written against the published
//! `vfio_user::ServerBackend` trait runs unchanged on our server through
//! `compat::RustVmmBackend`. The same client script is run against the
//! published `vfio_user::Server` and against ours, and the backend hooks
//! must be called with the same arguments in the same order.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::proto::*;
use integration_tests::*;
use vfio_bindings::bindings::vfio::vfio_region_info;
use vfio_user::{
    Client, DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion, SparseArea,
};
use vfio_user_server::compat::RustVmmBackend;
use vfio_user_server::{DeviceContext, ServerConfig};

/// One hook call as the backend saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Read(u32, u64, usize),
    Write(u32, u64, Vec<u8>),
    /// flags, offset, address, size, (st_dev, st_ino) of the fd.
    DmaMap(u32, u64, u64, u64, Option<(u64, u64)>),
    DmaUnmap(u32, u64, u64),
    Reset,
    /// index, flags, start, count, number of fds.
    SetIrqs(u32, u32, u32, u32, usize),
}

type Log = Arc<Mutex<Vec<Call>>>;

const GPIO_BAR: u32 = 2;
const MMIO_BAR: u32 = 0;
const MMIO_SIZE: u64 = 0x4000;
/// A guest address whose DMA_MAP the backend refuses (EPERM).
const REFUSED_MAP: u64 = 0x66_0000;

/// A GPIO-like backend in the style of the crate's example: config space,
/// an I/O BAR whose register 0 raises INTx every third read, and an
/// mmap-able memory BAR.
struct GpioBackend {
    config: [u8; 256],
    gpio: [u8; 256],
    reads: u8,
    irq: Option<File>,
    log: Log,
}

impl GpioBackend {
    fn new(log: Log) -> Self {
        let mut config = [0u8; 256];
        config[0..2].copy_from_slice(&0x494fu16.to_le_bytes());
        config[2..4].copy_from_slice(&0x0dc8u16.to_le_bytes());
        GpioBackend {
            config,
            gpio: [0; 256],
            reads: 0,
            irq: None,
            log,
        }
    }

    fn record(&self, c: Call) {
        self.log.lock().unwrap().push(c);
    }
}

impl ServerBackend for GpioBackend {
    fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), std::io::Error> {
        self.record(Call::Read(region, offset, data.len()));
        let o = offset as usize;
        match region {
            7 => data.copy_from_slice(&self.config[o..o + data.len()]),
            GPIO_BAR if offset == 0 => {
                self.reads += 1;
                data.fill(0);
                if self.reads == 3 {
                    self.reads = 0;
                    data[0] = 1;
                    if let Some(irq) = &mut self.irq {
                        irq.write_all(&1u64.to_le_bytes())?;
                    }
                }
            }
            GPIO_BAR => data.copy_from_slice(&self.gpio[o..o + data.len()]),
            _ if offset == 0x666 => return Err(std::io::Error::from_raw_os_error(libc::EIO)),
            _ => data.fill(0),
        }
        Ok(())
    }

    fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), std::io::Error> {
        self.record(Call::Write(region, offset, data.to_vec()));
        let o = offset as usize;
        match region {
            7 if o >= 4 => self.config[o..o + data.len()].copy_from_slice(data),
            GPIO_BAR => self.gpio[o..o + data.len()].copy_from_slice(data),
            _ => {}
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), std::io::Error> {
        let id = fd.map(|f| {
            let m = f.metadata().unwrap();
            (m.dev(), m.ino())
        });
        self.record(Call::DmaMap(flags.bits(), offset, address, size, id));
        if address == REFUSED_MAP {
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        flags: DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> Result<(), std::io::Error> {
        self.record(Call::DmaUnmap(flags.bits(), address, size));
        Ok(())
    }

    fn reset(&mut self) -> Result<(), std::io::Error> {
        self.record(Call::Reset);
        self.gpio = [0; 256];
        self.reads = 0;
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), std::io::Error> {
        self.record(Call::SetIrqs(index, flags, start, count, fds.len()));
        if (index, start, count) == (IRQ_MSIX, 1, 1) {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        if index == IRQ_INTX && flags & IRQ_DATA_EVENTFD != 0 && flags & IRQ_ACTION_TRIGGER != 0 {
            self.irq = fds.into_iter().next();
        }
        Ok(())
    }
}

/// The region table, built as the crate's example builds it (plus an
/// mmap-able BAR0 backed by `mmio`).
fn regions(mmio: RawFd) -> Vec<ServerRegion> {
    (0..9u32)
        .map(|index| {
            let mut info = vfio_region_info {
                argsz: std::mem::size_of::<vfio_region_info>() as u32,
                index,
                ..Default::default()
            };
            let mut sparse_areas = Vec::new();
            let mut mmap_fd = None;
            match index {
                GPIO_BAR | 7 => {
                    info.size = 256;
                    info.flags = REGION_READ | REGION_WRITE;
                }
                MMIO_BAR => {
                    info.size = MMIO_SIZE;
                    info.flags = REGION_READ | REGION_WRITE | REGION_MMAP;
                    info.offset = 0x1000;
                    let mut a = SparseArea {
                        area: Default::default(),
                    };
                    a.area.offset = 0;
                    a.area.size = 0x1000;
                    sparse_areas.push(a);
                    mmap_fd = Some(mmio);
                }
                _ => {}
            }
            ServerRegion {
                region_info: info,
                sparse_areas,
                mmap_fd,
            }
        })
        .collect()
}

fn irqs() -> Vec<IrqInfo> {
    (0..5u32)
        .map(|index| IrqInfo {
            index,
            flags: if index == IRQ_INTX || index == IRQ_MSIX {
                IRQ_INFO_EVENTFD
            } else {
                0
            },
            count: match index {
                IRQ_INTX => 1,
                IRQ_MSIX => 2,
                _ => 0,
            },
        })
        .collect()
}

fn mmio_file() -> File {
    let f = memfd("mmio", 0x1000 + MMIO_SIZE);
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xc3], 0x1000 + 0x10).unwrap();
    f
}

/// What the client script observed.
#[derive(Debug, PartialEq)]
struct Observed {
    resettable: bool,
    config_id: u32,
    gpio_value: [u8; 3],
    irq_count: Option<u64>,
    gpio_reg: [u8; 2],
    mmio_areas: Vec<(u64, u64)>,
    mmio_offset: Option<u64>,
    mmio_byte: u8,
}

/// The client script, run against both servers.
fn script(path: &Path, ram: &File) -> Observed {
    let mut client = Client::new(path).expect("Client::new");
    let mut id = [0u8; 4];
    client.region_read(7, 0, &mut id).unwrap();
    client.region_write(GPIO_BAR, 4, &[1, 2]).unwrap();
    let e = eventfd();
    client
        .set_irqs(
            IRQ_INTX,
            IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
            0,
            1,
            &[e.as_raw_fd()],
        )
        .unwrap();
    let mut gpio_value = [0u8; 3];
    for v in gpio_value.iter_mut() {
        let mut b = [0u8; 1];
        client.region_read(GPIO_BAR, 0, &mut b).unwrap();
        *v = b[0];
    }
    let irq_count = eventfd_wait(&e, 5000);
    let mut gpio_reg = [0u8; 2];
    client.region_read(GPIO_BAR, 4, &mut gpio_reg).unwrap();
    client
        .dma_map(0x1000, GUEST_RAM_BASE, 0x2000, ram.as_raw_fd())
        .unwrap();
    client.dma_unmap(GUEST_RAM_BASE, 0x2000).unwrap();
    client.reset().unwrap();
    let bar0 = client.region(MMIO_BAR).unwrap();
    let mmio_areas = bar0
        .sparse_areas
        .iter()
        .map(|a| (a.offset, a.size))
        .collect();
    let mmio_offset = bar0.file_offset.as_ref().map(|f| f.start());
    let mmio_byte = bar0
        .file_offset
        .as_ref()
        .map(|f| {
            let m = Mapping::new(f.file().as_raw_fd(), 0x1000, f.start()).unwrap();
            m.read(0x10, 1)[0]
        })
        .unwrap_or(0);
    let resettable = client.resettable();
    client.shutdown().unwrap();
    Observed {
        resettable,
        config_id: u32::from_le_bytes(id),
        gpio_value,
        irq_count,
        gpio_reg,
        mmio_areas,
        mmio_offset,
        mmio_byte,
    }
}

/// Runs the script against the published `vfio_user::Server`.
fn run_on_rust_vmm_server(ram: &File) -> (Observed, Vec<Call>) {
    let dir = socket_dir();
    let path = dir.as_path().join("rust-vmm.sock");
    let log = Log::default();
    let mmio = mmio_file();
    let server = vfio_user::Server::new(&path, true, irqs(), regions(mmio.as_raw_fd())).unwrap();
    let mut backend = GpioBackend::new(log.clone());
    let t = std::thread::spawn(move || {
        let r = server.run(&mut backend);
        drop(mmio);
        r.is_ok()
    });
    let p = path.clone();
    let ram2 = ram.try_clone().unwrap();
    let observed = with_deadline(move || script(&p, &ram2));
    assert!(t.join().unwrap(), "rust-vmm server failed");
    let calls = log.lock().unwrap().clone();
    (observed, calls)
}

/// Runs the script against our server with the same backend.
fn run_on_our_server(ram: &File) -> (Observed, Vec<Call>, Log) {
    let log = Log::default();
    let mmio = mmio_file();
    let dev = RustVmmBackend::new(
        GpioBackend::new(log.clone()),
        true,
        irqs(),
        regions(mmio.as_raw_fd()),
    );
    let s = spawn_devices(
        vec![(Box::new(dev), DeviceContext::default())],
        ServerConfig::default(),
    );
    let p: PathBuf = s.path().to_path_buf();
    let ram2 = ram.try_clone().unwrap();
    let observed = with_deadline(move || script(&p, &ram2));
    // Our server also resets the device when the client leaves.
    assert!(wait_until(Duration::from_secs(5), || {
        log.lock().unwrap().last() == Some(&Call::Reset) && log.lock().unwrap().len() > 1
    }));
    drop(s);
    drop(mmio);
    let calls = log.lock().unwrap().clone();
    (observed, calls, log)
}

#[test]
fn same_hook_calls_as_on_the_published_server() {
    let ram = memfd("guest-ram", 0x4000);
    let ram_id = {
        let m = ram.metadata().unwrap();
        (m.dev(), m.ino())
    };
    let (theirs, their_calls) = run_on_rust_vmm_server(&ram);
    let (ours, mut our_calls, _log) = run_on_our_server(&ram);

    // What the client saw is the same.
    assert_eq!(ours, theirs);
    assert_eq!(ours.config_id, 0x0dc8_494f);
    assert_eq!(ours.gpio_value, [0, 0, 1]);
    assert_eq!(ours.irq_count, Some(1));
    assert_eq!(ours.gpio_reg, [1, 2]);
    assert_eq!(ours.mmio_areas, vec![(0, 0x1000)]);
    assert_eq!(ours.mmio_offset, Some(0x1000));
    assert_eq!(ours.mmio_byte, 0xc3);
    assert!(
        !ours.resettable,
        "RESET advertised (the client's test is inverted)"
    );

    // The hooks were called identically; ours adds the reset on
    // disconnect.
    assert_eq!(our_calls.pop(), Some(Call::Reset));
    assert_eq!(our_calls, their_calls);
    let want = vec![
        Call::Read(7, 0, 4),
        Call::Write(GPIO_BAR, 4, vec![1, 2]),
        Call::SetIrqs(IRQ_INTX, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, 0, 1, 1),
        Call::Read(GPIO_BAR, 0, 1),
        Call::Read(GPIO_BAR, 0, 1),
        Call::Read(GPIO_BAR, 0, 1),
        Call::Read(GPIO_BAR, 4, 2),
        Call::DmaMap(
            DMA_READ | DMA_WRITE,
            0x1000,
            GUEST_RAM_BASE,
            0x2000,
            Some(ram_id),
        ),
        Call::DmaUnmap(0, GUEST_RAM_BASE, 0x2000),
        Call::Reset,
    ];
    assert_eq!(our_calls, want);
}

#[test]
fn backend_sees_cleanup_on_disconnect_and_errors_map_to_errnos() {
    let log = Log::default();
    let mmio = mmio_file();
    let dev = RustVmmBackend::new(
        GpioBackend::new(log.clone()),
        false,
        irqs(),
        regions(mmio.as_raw_fd()),
    );
    let s = spawn_devices(
        vec![(Box::new(dev), DeviceContext::default())],
        ServerConfig::default(),
    );
    let mut c = RawClient::connect_negotiated(s.path());
    // Not resettable: no RESET flag; 9 regions, 5 irqs from the tables.
    let r = c.get_info().ok();
    assert_eq!(le32(&r.payload, 4), DEVICE_FLAGS_PCI);
    assert_eq!(le32(&r.payload, 8), 9);
    assert_eq!(le32(&r.payload, 12), 5);
    // IRQ info comes from the table.
    let r = c.irq_info(IRQ_MSIX).ok();
    assert_eq!(
        (le32(&r.payload, 4), le32(&r.payload, 12)),
        (IRQ_INFO_EVENTFD, 2)
    );
    // A backend error becomes its errno.
    assert_eq!(
        c.region_read(4, 0x666, 1).err(),
        libc::EINVAL,
        "absent region"
    );
    assert_eq!(c.region_read(MMIO_BAR, 0x666, 1).err(), libc::EIO);
    c.ping();
    // A map the backend refuses is refused, and undone; so is a SET_IRQS.
    let page = memfd("page", 0x1000);
    assert_eq!(
        c.dma_map(0, REFUSED_MAP, 0x1000, Some(page.as_raw_fd()))
            .err(),
        libc::EPERM
    );
    assert_eq!(c.dma_unmap(0, REFUSED_MAP, 0x1000).err(), libc::ENOENT);
    let e = eventfd();
    assert_eq!(
        c.set_irqs(
            IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
            IRQ_MSIX,
            1,
            1,
            &[],
            &[e.as_raw_fd()]
        )
        .err(),
        libc::EBUSY
    );
    // Out-of-range requests never reach the backend.
    let before = log.lock().unwrap().len();
    assert_eq!(c.region_read(GPIO_BAR, 250, 8).err(), libc::EINVAL);
    assert_eq!(
        c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSI, 0, 1, &[], &[])
            .err(),
        libc::EINVAL
    );
    assert_eq!(c.dma_unmap(0, 0x1000, 0x1000).err(), libc::ENOENT);
    assert_eq!(log.lock().unwrap().len(), before);
    // Two maps left in place, then the client goes away.
    let ram = memfd("ram", 0x4000);
    c.dma_map(0, 0x10000, 0x1000, Some(ram.as_raw_fd())).ok();
    c.dma_map(0x1000, 0x20000, 0x1000, None).ok();
    // A partial unmap is refused without telling the backend.
    assert_eq!(c.dma_unmap(0, 0x10000, 0x800).err(), libc::ENOENT);
    // MSI-X eventfds are passed through.
    let e1 = eventfd();
    let e2 = eventfd();
    c.set_irqs(
        IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
        IRQ_MSIX,
        0,
        2,
        &[],
        &[e1.as_raw_fd(), e2.as_raw_fd()],
    )
    .ok();
    drop(c);
    assert!(wait_until(Duration::from_secs(5), || {
        log.lock().unwrap().last() == Some(&Call::Reset)
    }));
    let calls = log.lock().unwrap()[before..].to_vec();
    let ram_id = {
        let m = ram.metadata().unwrap();
        (m.dev(), m.ino())
    };
    assert_eq!(
        calls,
        vec![
            Call::DmaMap(DMA_READ | DMA_WRITE, 0, 0x10000, 0x1000, Some(ram_id)),
            Call::DmaMap(DMA_READ | DMA_WRITE, 0x1000, 0x20000, 0x1000, None),
            Call::SetIrqs(IRQ_MSIX, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, 0, 2, 2),
            Call::DmaUnmap(0, 0x10000, 0x1000),
            Call::DmaUnmap(0, 0x20000, 0x1000),
            Call::Reset,
        ]
    );
    drop(s);
    drop(mmio);
}

#[test]
fn unmap_all_reaches_the_backend_per_range() {
    let log = Log::default();
    let mmio = mmio_file();
    let dev = RustVmmBackend::new(
        GpioBackend::new(log.clone()),
        true,
        irqs(),
        regions(mmio.as_raw_fd()),
    );
    let s = spawn_devices(
        vec![(Box::new(dev), DeviceContext::default())],
        ServerConfig::default(),
    );
    let mut c = RawClient::connect_negotiated(s.path());
    c.dma_map(0, 0x10000, 0x1000, None).ok();
    c.dma_map(0, 0x30000, 0x2000, None).ok();
    c.dma_unmap(UNMAP_ALL, 0, 0).ok();
    let calls = log.lock().unwrap().clone();
    assert_eq!(
        &calls[2..],
        &[
            Call::DmaUnmap(0, 0x10000, 0x1000),
            Call::DmaUnmap(0, 0x30000, 0x2000)
        ]
    );
    c.ping();
    drop(c);
    drop(s);
    drop(mmio);
}
