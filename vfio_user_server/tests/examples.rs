//! The examples, driven through the published `vfio_user::Client` as Cloud
//! Hypervisor drives a `--user-device`: each example's `serve` (what its
//! `main` runs) on a socket in a temporary directory, on its own thread.

#[allow(dead_code)]
#[path = "../examples/dma_copy.rs"]
mod dma_copy;
#[allow(dead_code)]
#[path = "../examples/rust_vmm_backend.rs"]
mod rust_vmm_backend;

use std::error::Error;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::Client;
use vfio_user_server::pci::PciAdapter;
use vfio_user_server::{AsLifecycle, Device, DeviceContext, ResetReason, StopHandle};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
const EVENTFD_TRIGGER: u32 = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;

/// The DMA copy engine's registers in BAR 0, as its documentation gives
/// them.
const SRC: u64 = 0x00;
const DST: u64 = 0x08;
const LEN: u64 = 0x10;
const DOORBELL: u64 = 0x14;
const STATUS: u64 = 0x18;
const COUNT: u64 = 0x1c;
const MSIX_TABLE: u64 = 0x800;

/// Guest RAM the tests map: where it sits in the guest and its size.
const RAM_BASE: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 4 << 20;

type ServeResult = Result<(), Box<dyn Error + Send + Sync>>;

/// An example's `serve` running on its own thread.
struct Running {
    path: PathBuf,
    stop: StopHandle,
    thread: Option<JoinHandle<Result<(), String>>>,
    _dir: TempDir,
}

impl Running {
    fn start<F>(serve: F) -> Running
    where
        F: FnOnce(&Path, Box<dyn FnOnce(StopHandle) + Send>) -> ServeResult + Send + 'static,
    {
        let dir = TempDir::new_with_prefix("/tmp/vfu-example-").unwrap();
        let path = dir.as_path().join("dev.sock");
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        let thread = std::thread::spawn(move || {
            let ready = Box::new(move |stop| tx.send(stop).unwrap());
            serve(&p, ready).map_err(|e| e.to_string())
        });
        let stop = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Running {
            path,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Stops the loop: `serve` returns Ok and its socket is gone.
    fn stop(mut self) {
        self.stop.stop();
        let result = self.thread.take().unwrap().join().unwrap();
        assert_eq!(result, Ok(()));
        assert!(!self.path.exists(), "socket left behind");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

fn memfd(size: u64) -> File {
    // SAFETY: a valid NUL-terminated name; the fd is checked and owned.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

/// Waits (5 s at most) for `e` to be signalled and consumes the count.
fn fired(e: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: e.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    n == 1 && e.read().is_ok()
}

fn read32(c: &mut Client, region: u32, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(region, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn write32(c: &mut Client, region: u32, offset: u64, value: u32) {
    c.region_write(region, offset, &value.to_le_bytes())
        .unwrap();
}

/// Offset of capability `id` in config space, walking the list.
fn capability(c: &mut Client, id: u8) -> Option<u64> {
    let mut at = u64::from(read32(c, CONFIG, 0x34) & 0xfc);
    while at != 0 {
        let header = read32(c, CONFIG, at);
        if header as u8 == id {
            return Some(at);
        }
        at = u64::from((header >> 8) & 0xfc);
    }
    None
}

/// Programs a copy and rings the doorbell; waits for `irq`; returns
/// `STATUS` and `COUNT`.
fn copy(c: &mut Client, irq: &EventFd, src: u64, dst: u64, len: u32) -> (u32, u32) {
    c.region_write(0, SRC, &src.to_le_bytes()).unwrap();
    c.region_write(0, DST, &dst.to_le_bytes()).unwrap();
    write32(c, 0, LEN, len);
    write32(c, 0, DOORBELL, 1);
    assert!(fired(irq), "no interrupt for the copy");
    assert_eq!(read32(c, 0, DOORBELL), 0, "copy still pending");
    (read32(c, 0, STATUS), read32(c, 0, COUNT))
}

#[test]
fn dma_copy_copies_guest_memory_and_interrupts() {
    let server = Running::start(dma_copy::serve);
    let mut c = Client::new(&server.path).unwrap();
    assert_eq!(read32(&mut c, CONFIG, 0), 0xdc01_1234, "vendor and device");
    assert_eq!(read32(&mut c, CONFIG, 8) >> 24, 0xff, "class");
    assert_eq!(c.region(0).unwrap().size, 0x1000);

    let ram = memfd(RAM_SIZE);
    c.dma_map(0, RAM_BASE, RAM_SIZE, ram.as_raw_fd()).unwrap();
    let max = 1u32 << 20;
    let pattern: Vec<u8> = (0..max).map(|i| (i * 7 + i / 4096) as u8).collect();
    ram.write_all_at(&pattern, 0).unwrap();
    let dst = |n: u64| RAM_BASE + n * u64::from(max);
    let read_ram = |n: u64| {
        let mut b = vec![0u8; max as usize];
        ram.read_exact_at(&mut b, n * u64::from(max)).unwrap();
        b
    };

    // MSI-X is off: INTx, once the driver enabled memory and bus mastering.
    let intx = EventFd::new(EFD_NONBLOCK).unwrap();
    let msix = EventFd::new(EFD_NONBLOCK).unwrap();
    for (index, e) in [
        (VFIO_PCI_INTX_IRQ_INDEX, &intx),
        (VFIO_PCI_MSIX_IRQ_INDEX, &msix),
    ] {
        c.set_irqs(index, EVENTFD_TRIGGER, 0, 1, &[e.as_raw_fd()])
            .unwrap();
    }
    c.region_write(CONFIG, 4, &0x0006u16.to_le_bytes()).unwrap();
    assert_eq!(copy(&mut c, &intx, RAM_BASE, dst(1), max), (0, 1));
    assert!(read_ram(1) == pattern, "first copy");
    // INTx is automasked once raised: unmask it, as on the guest's EOI.
    let unmask = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK;
    c.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, unmask, 0, 1, &[])
        .unwrap();

    // MSI-X on: vector 0, entry unmasked in the table.
    let cap = capability(&mut c, 0x11).expect("MSI-X capability");
    assert_eq!(
        read32(&mut c, CONFIG, cap + 4),
        MSIX_TABLE as u32,
        "table in BAR 0"
    );
    write32(&mut c, 0, MSIX_TABLE + 12, 0);
    let control = (read32(&mut c, CONFIG, cap) >> 16) as u16 | 0x8000;
    c.region_write(CONFIG, cap + 2, &control.to_le_bytes())
        .unwrap();
    assert_eq!(copy(&mut c, &msix, RAM_BASE + 1, dst(2), 100), (0, 2));
    assert_eq!(read_ram(2)[..100], pattern[1..101]);
    assert!(intx.read().is_err(), "INTx raised with MSI-X on");

    // Failed copies write nothing: unmapped source, destination running
    // off the end of RAM, too long, no bus mastering. The device serves on.
    let before = read_ram(3);
    assert_eq!(copy(&mut c, &msix, 0x1000, dst(3), 16), (1, 3));
    assert_eq!(
        copy(&mut c, &msix, RAM_BASE, RAM_BASE + RAM_SIZE - 8, 16),
        (1, 4)
    );
    assert_eq!(copy(&mut c, &msix, RAM_BASE, dst(3), max + 1), (1, 5));
    c.region_write(CONFIG, 4, &0x0002u16.to_le_bytes()).unwrap();
    assert_eq!(copy(&mut c, &msix, RAM_BASE, dst(3), 16), (1, 6));
    assert!(read_ram(3) == before, "a failed copy wrote");
    c.region_write(CONFIG, 4, &0x0006u16.to_le_bytes()).unwrap();
    assert_eq!(copy(&mut c, &msix, RAM_BASE, dst(3), 4096), (0, 7));
    assert_eq!(read_ram(3)[..4096], pattern[..4096]);

    // STATUS and COUNT are read-only; a reset clears the registers.
    write32(&mut c, 0, STATUS, 0xffff_ffff);
    write32(&mut c, 0, COUNT, 0);
    assert_eq!(
        (read32(&mut c, 0, STATUS), read32(&mut c, 0, COUNT)),
        (0, 7)
    );
    c.reset().unwrap();
    assert_eq!(read32(&mut c, 0, COUNT), 0);
    assert_eq!(read32(&mut c, 0, LEN), 0);
    c.shutdown().unwrap();
    drop(c);
    server.stop();
}

#[test]
fn dma_copy_state_survives_snapshot_and_restore() {
    let new = || {
        let ctx = DeviceContext::default();
        PciAdapter::new(dma_copy::DmaCopy::new(&ctx).unwrap()).unwrap()
    };
    let regs = |d: &mut PciAdapter<dma_copy::DmaCopy>| {
        let mut b = vec![0u8; 0x20];
        d.region_read(0, 0, &mut b).unwrap();
        let mut config = vec![0u8; 256];
        d.region_read(CONFIG, 0, &mut config).unwrap();
        let mut entry = vec![0u8; 16];
        d.region_read(0, MSIX_TABLE, &mut entry).unwrap();
        (b, config, entry)
    };
    let mut a = new();
    a.region_write(0, SRC, &0x1234_5678_9abc_def0u64.to_le_bytes())
        .unwrap();
    a.region_write(0, LEN, &[0x10, 0x20]).unwrap();
    // A doorbell with no client (nothing mapped): the copy stays pending.
    a.region_write(0, DOORBELL, &[1]).unwrap();
    assert!(!a.lifecycle().run_deferred());
    a.region_write(CONFIG, 4, &[0x06]).unwrap();
    a.region_write(0, MSIX_TABLE, &0xfee0_0000u32.to_le_bytes())
        .unwrap();
    let saved = regs(&mut a);
    assert_eq!(saved.0[0x14], 1, "doorbell pending");

    let lifecycle = a.lifecycle();
    assert!(lifecycle.migratable());
    assert_eq!(lifecycle.id(), "dma-copy");
    lifecycle.pause().unwrap();
    let snapshot = lifecycle.snapshot().unwrap();
    let mut b = new();
    b.lifecycle().restore(&snapshot).unwrap();
    assert_eq!(regs(&mut b), saved);

    // A snapshot without the function's state is refused, unapplied.
    let mut partial = snapshot.clone();
    partial.snapshots.clear();
    let mut c = new();
    let fresh = regs(&mut c);
    assert!(c.lifecycle().restore(&partial).is_err());
    assert_eq!(regs(&mut c), fresh);

    b.lifecycle().reset(ResetReason::Command);
    assert_eq!(regs(&mut b), fresh);
}

/// Drives the scratch pad: identity, a BAR round trip, the doorbell's
/// INTx, and a reset.
fn scratchpad_script(path: &Path) {
    let mut c = Client::new(path).unwrap();
    assert_eq!(read32(&mut c, CONFIG, 0), 0xdc02_1234, "vendor and device");
    assert_eq!(read32(&mut c, CONFIG, 8) >> 24, 0xff, "class");
    assert_eq!(c.region(0).unwrap().size, 0x1000);

    let text = b"written through vfio-user";
    c.region_write(0, 0x100, text).unwrap();
    let mut back = vec![0u8; text.len()];
    c.region_read(0, 0x100, &mut back).unwrap();
    assert_eq!(back, text);

    // The doorbell raises INTx through the eventfd the backend was given.
    let intx = EventFd::new(EFD_NONBLOCK).unwrap();
    let fds = [intx.as_raw_fd()];
    c.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, EVENTFD_TRIGGER, 0, 1, &fds)
        .unwrap();
    write32(&mut c, 0, rust_vmm_backend::DOORBELL as u64, 1);
    assert!(fired(&intx), "no INTx for the doorbell");

    // The backend's reset clears its memory.
    c.reset().unwrap();
    c.region_read(0, 0x100, &mut back).unwrap();
    assert_eq!(back, vec![0u8; text.len()]);
    c.shutdown().unwrap();
}

#[test]
fn rust_vmm_backend_round_trip() {
    let server = Running::start(rust_vmm_backend::serve);
    scratchpad_script(&server.path);
    server.stop();

    // The same script passes on the server the backend was written for.
    let dir = TempDir::new_with_prefix("/tmp/vfu-example-").unwrap();
    let path = dir.as_path().join("published.sock");
    let (irqs, regions) = (rust_vmm_backend::irqs(), rust_vmm_backend::regions());
    let published = vfio_user::Server::new(&path, true, irqs, regions).unwrap();
    let thread = std::thread::spawn(move || {
        let mut backend = rust_vmm_backend::Scratchpad::new().unwrap();
        published.run(&mut backend).is_ok()
    });
    scratchpad_script(&path);
    assert!(thread.join().unwrap(), "the published server failed");
}
