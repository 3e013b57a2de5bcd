//! The doorbell is a posted write: the server answers a queue notification
//! before the device works through the queue, and that work runs between
//! the event loop's other duties, so one busy (or hostile) queue never
//! holds up the client that rang, nor the other devices on the loop.
//!
//! These tests serve virtio-blk devices in-process (`Server` + `EventLoop`
//! in a thread, as an embedder of the library would) and drive them like
//! Cloud Hypervisor, with the published `vfio_user::Client`.

mod common;

#[allow(dead_code)]
#[path = "../../vfio_user_server/examples/dma_copy.rs"]
mod dma_copy;

use std::fs::File;
use std::io;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backends::block_io::{io_uring_support, Aio};
use backends::storage::{BlockBackend, FdAccess, MemoryDisk};
use backends::virtio_blk::{VirtioBlkConfig, VirtioBlkPci};
use common::*;
use vfio_user_server::pci::PciAdapter;
use vfio_user_server::{DeviceContext, EventLoop, Server, ServerConfig, StopHandle};
use vmm_sys_util::tempdir::TempDir;

/// `VIRTIO_F_VERSION_1`.
const VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
const EVENT_IDX: u64 = 1 << 29;

/// A disk whose reads wait until the test opens the gate, and which says
/// when a read is waiting.
struct GatedDisk {
    inner: MemoryDisk,
    /// (a read is waiting, the gate is open)
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl GatedDisk {
    fn new(data: Vec<u8>) -> GatedDisk {
        GatedDisk {
            inner: MemoryDisk::from_vec(data, false),
            state: Mutex::new((false, false)),
            changed: Condvar::new(),
        }
    }

    /// Waits until a read is blocked at the gate.
    fn wait_for_blocked_read(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = self.state.lock().unwrap();
        while !s.0 {
            assert!(Instant::now() < deadline, "no read reached the back end");
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }
}

impl BlockBackend for GatedDisk {
    integration_tests::forward_to_inner_disk!();
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        self.changed.notify_all();
        while !s.1 {
            s = self.changed.wait(s).unwrap();
        }
        drop(s);
        self.inner.read_at(buf, offset)
    }
    fn id(&self) -> String {
        "gated".into()
    }
}

/// A disk whose reads the io_uring runs on the read end of a pipe: they
/// stay in flight in the kernel until the test writes their data into it.
struct PipeDisk {
    inner: MemoryDisk,
    read_end: File,
    write_end: Mutex<File>,
}

impl PipeDisk {
    fn new(size: usize) -> PipeDisk {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: new descriptors that nothing else owns.
        let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        PipeDisk {
            inner: MemoryDisk::new(size as u64).unwrap(),
            read_end: r,
            write_end: Mutex::new(w),
        }
    }

    /// Lets the read waiting in the kernel complete with `data`.
    fn feed(&self, data: &[u8]) {
        self.write_end.lock().unwrap().write_all(data).unwrap();
    }
}

impl BlockBackend for PipeDisk {
    integration_tests::forward_to_inner_disk!();
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn id(&self) -> String {
        "pipe".into()
    }
    fn file_backed(&self) -> bool {
        true
    }
    fn fd_for(&self, access: FdAccess<'_>) -> Option<RawFd> {
        // A pipe ignores the offset: the read waits for the test's bytes.
        matches!(access, FdAccess::Read { .. }).then(|| self.read_end.as_raw_fd())
    }
}

/// A read held in flight in the kernel by a [`PipeDisk`] on the io_uring,
/// then `stop` with it in flight: `stop` returns only once the read
/// completed, into memory that was still mapped (as on I/O threads).
fn in_flight_ring_read_completes_before<T: Transport>(
    mut d: VirtioDriver<T>,
    disk: &Arc<PipeDisk>,
    stop: impl FnOnce(&mut VirtioDriver<T>),
) {
    d.init(VERSION_1 | EVENT_IDX, 64);
    let head = d.blk_submit(0, VIRTIO_BLK_T_IN, 16, &[], 4096);
    d.kick(0);
    // The event loop is free while the read waits in the kernel.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.status() & 4, 4);
    assert_eq!(d.used_idx(0), 0, "the read did not wait for its data");
    let data = pattern(4096);
    let (feeder, fed) = {
        let (disk, data) = (disk.clone(), data.clone());
        release_later(Duration::from_millis(200), move || disk.feed(&data))
    };
    stop(&mut d);
    assert!(
        fed.load(Ordering::SeqCst),
        "answered before the read in flight finished"
    );
    feeder.join().unwrap();
    assert_eq!(d.used_idx(0), 1, "the read in flight was not completed");
    let (status, got) = d.take_result(0, head);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(got, data);
}

/// Whether io_uring can be tested here; says why not.
fn have_io_uring() -> bool {
    match io_uring_support() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIP io_uring: {why}");
            false
        }
    }
}

#[test]
fn dma_unmap_waits_for_io_in_flight_on_io_uring() {
    if !have_io_uring() {
        return;
    }
    let disk = Arc::new(PipeDisk::new(1 << 20));
    let served = Loop::serve_with(vec![disk.clone()], Aio::IoUring);
    let d = VirtioDriver::connect(served.socket(0));
    in_flight_ring_read_completes_before(d, &disk, |d| {
        d.transport.dma_unmap(GUEST_BASE, GUEST_SIZE).unwrap();
    });
}

#[test]
fn stopping_for_migration_completes_io_in_flight_on_io_uring() {
    if !have_io_uring() {
        return;
    }
    let disk = Arc::new(PipeDisk::new(1 << 20));
    let served = Loop::serve_with(vec![disk.clone()], Aio::IoUring);
    let d = VirtioDriver::connect_raw(served.socket(0));
    in_flight_ring_read_completes_before(d, &disk, |d| {
        mig::set_state_ok(d.raw(), mig::STOP);
    });
}

#[test]
fn a_reset_waits_for_io_in_flight_on_io_uring() {
    if !have_io_uring() {
        return;
    }
    let disk = Arc::new(PipeDisk::new(1 << 20));
    let served = Loop::serve_with(vec![disk.clone()], Aio::IoUring);
    let mut d = VirtioDriver::connect(served.socket(0));
    d.init(VERSION_1 | EVENT_IDX, 64);
    let _head = d.blk_submit(0, VIRTIO_BLK_T_IN, 16, &[], 4096);
    d.kick(0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.used_idx(0), 0, "the read did not wait for its data");
    let (feeder, fed) = {
        let disk = disk.clone();
        release_later(Duration::from_millis(200), move || {
            disk.feed(&pattern(4096))
        })
    };
    // The driver resets the device (status 0): the device forgets the read
    // but waits until the kernel is done with the guest's buffer.
    d.set_status(0);
    assert_eq!(d.status(), 0);
    assert!(
        fed.load(Ordering::SeqCst),
        "reset before the read in flight finished"
    );
    feeder.join().unwrap();
    // It works again, from scratch.
    d.init(VERSION_1 | EVENT_IDX, 64);
    assert_eq!(d.used_idx(0), 0);
}

/// virtio-blk devices served by one event loop in a thread.
struct Loop {
    thread: Option<JoinHandle<io::Result<()>>>,
    stop: StopHandle,
    sockets: Vec<PathBuf>,
    _dir: TempDir,
}

impl Loop {
    fn serve(disks: Vec<Arc<dyn BlockBackend>>) -> Loop {
        Self::serve_with(disks, Aio::Sync)
    }

    /// Devices running their I/O as `aio` says.
    fn serve_with(disks: Vec<Arc<dyn BlockBackend>>, aio: Aio) -> Loop {
        let dir = TempDir::new().unwrap();
        let mut ev = EventLoop::new().unwrap();
        let mut sockets = Vec::new();
        for (i, disk) in disks.into_iter().enumerate() {
            let socket = dir.as_path().join(format!("blk{i}.sock"));
            let ctx = DeviceContext::default();
            let config = VirtioBlkConfig {
                aio,
                ..Default::default()
            };
            let blk = VirtioBlkPci::new(ctx.clone(), disk, config).unwrap();
            let adapter = PciAdapter::new(blk).unwrap();
            let server =
                Server::new(&socket, Box::new(adapter), ctx, ServerConfig::default()).unwrap();
            ev.add_server(server).unwrap();
            sockets.push(socket);
        }
        let stop = ev.stop_handle();
        let thread = std::thread::spawn(move || ev.run());
        Loop {
            thread: Some(thread),
            stop,
            sockets,
            _dir: dir,
        }
    }

    fn socket(&self, i: usize) -> &Path {
        &self.sockets[i]
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn doorbell_is_answered_before_the_io_runs() {
    let disk = Arc::new(GatedDisk::new(pattern(1 << 20)));
    let served = Loop::serve(vec![disk.clone()]);
    let mut d = VirtioDriver::connect(served.socket(0));
    d.init(VERSION_1 | EVENT_IDX, 64);
    // Let the device look at its (empty) queue after DRIVER_OK and go idle,
    // so that only the doorbell below starts the request.
    d.settle();

    let head = d.blk_submit(0, VIRTIO_BLK_T_IN, 8, &[], 4096);
    // Were the doorbell answered only after the I/O, the kick would wait
    // for the gate: open it late, so that case fails below, not hangs.
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            if finished.recv_timeout(Duration::from_secs(5)).is_err() {
                disk.open();
            }
        })
    };
    d.kick(0);
    // The doorbell's reply is in: the read is only now reaching the back
    // end, which holds it.
    disk.wait_for_blocked_read();
    assert_eq!(d.used_idx(0), 0, "completed before the gate opened");
    disk.open();
    d.wait_used(0, 1);
    let (status, data) = d.take_result(0, head);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(data, pattern(1 << 20)[8 * 512..8 * 512 + 4096]);
    let _ = done.send(());
    watchdog.join().unwrap();
}

#[test]
fn a_busy_device_does_not_starve_its_neighbour() {
    let served = Loop::serve(vec![
        Arc::new(MemoryDisk::new(4 << 20).unwrap()),
        Arc::new(MemoryDisk::from_vec(pattern(1 << 20), false)),
    ]);
    // Device 0: a driver keeping 32 writes in flight all the time, so its
    // queue is never empty and the device always has deferred work.
    let busy_socket = served.socket(0).to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_busy = stop.clone();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done_busy = done.clone();
    let busy = std::thread::spawn(move || {
        let mut d = VirtioDriver::connect(&busy_socket);
        d.init(VERSION_1 | EVENT_IDX, 128);
        let mut in_flight = Vec::new();
        while !stop_busy.load(Ordering::Relaxed) {
            while in_flight.len() < 32 {
                let n = done_busy.load(Ordering::Relaxed);
                let sector = (n + in_flight.len() as u64) % 1024 * 8;
                in_flight.push(d.blk_submit(0, VIRTIO_BLK_T_OUT, sector, &[0xa5; 4096], 0));
            }
            d.kick(0);
            for (head, _) in d.wait_used(0, 1) {
                in_flight.retain(|&h| h != head);
                done_busy.fetch_add(1, Ordering::Relaxed);
            }
        }
        d.wait_used(0, in_flight.len());
    });
    // The busy device is busy before the other one's client starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.load(Ordering::Relaxed) < 100 {
        assert!(
            Instant::now() < deadline,
            "the busy device completed nothing"
        );
        std::thread::sleep(Duration::from_millis(1));
    }

    // Device 1, on the same loop, serves its client meanwhile.
    let mut good = VirtioDriver::connect(served.socket(1));
    good.init(VERSION_1 | EVENT_IDX, 64);
    let before = done.load(Ordering::Relaxed);
    for i in 0..50u64 {
        let (status, data) = good.blk_request(0, VIRTIO_BLK_T_IN, i * 8, &[], 4096);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert_eq!(data, pattern(1 << 20)[(i * 4096) as usize..][..4096]);
    }
    // ...while the busy one went on.
    let during = done.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();
    assert!(
        during > 0,
        "the busy device stopped while the other was served"
    );
}

/// Runs `release` (what lets the I/O in flight finish) after `delay`, from
/// another thread; the flag says it ran, set just before. A call that
/// must wait for that I/O finds the flag set when it returns, whatever the
/// machine's load (a wall-clock bound would not).
fn release_later(
    delay: Duration,
    release: impl FnOnce() + Send + 'static,
) -> (JoinHandle<()>, Arc<AtomicBool>) {
    let released = Arc::new(AtomicBool::new(false));
    let flag = released.clone();
    let handle = std::thread::spawn(move || {
        std::thread::sleep(delay);
        flag.store(true, Ordering::SeqCst);
        release();
    });
    (handle, released)
}

/// Opens `disk`'s gate after `delay`, from another thread.
fn open_later(disk: &Arc<GatedDisk>, delay: Duration) -> (JoinHandle<()>, Arc<AtomicBool>) {
    let disk = disk.clone();
    release_later(delay, move || disk.open())
}

/// A read held by the back end on an I/O thread, then `stop` with it in
/// flight: `stop` returns only once the read completed, into memory that
/// was still mapped.
fn in_flight_read_completes_before<T: Transport>(
    mut d: VirtioDriver<T>,
    disk: &Arc<GatedDisk>,
    stop: impl FnOnce(&mut VirtioDriver<T>),
) {
    d.init(VERSION_1 | EVENT_IDX, 64);
    let head = d.blk_submit(0, VIRTIO_BLK_T_IN, 16, &[], 4096);
    d.kick(0);
    disk.wait_for_blocked_read();
    // The event loop is free while the I/O thread waits: it answers.
    assert_eq!(d.status() & 4, 4);
    assert_eq!(d.used_idx(0), 0);
    let (opener, opened) = open_later(disk, Duration::from_millis(200));
    stop(&mut d);
    assert!(
        opened.load(Ordering::SeqCst),
        "answered before the read in flight finished"
    );
    opener.join().unwrap();
    assert_eq!(d.used_idx(0), 1, "the read in flight was not completed");
    let (status, data) = d.take_result(0, head);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(data, pattern(1 << 20)[16 * 512..][..4096]);
}

#[test]
fn dma_unmap_waits_for_io_in_flight() {
    let disk = Arc::new(GatedDisk::new(pattern(1 << 20)));
    let served = Loop::serve_with(vec![disk.clone()], Aio::Threads(1));
    let d = VirtioDriver::connect(served.socket(0));
    in_flight_read_completes_before(d, &disk, |d| {
        d.transport.dma_unmap(GUEST_BASE, GUEST_SIZE).unwrap();
    });
}

#[test]
fn stopping_for_migration_completes_io_in_flight() {
    let disk = Arc::new(GatedDisk::new(pattern(1 << 20)));
    let served = Loop::serve_with(vec![disk.clone()], Aio::Threads(1));
    let d = VirtioDriver::connect_raw(served.socket(0));
    in_flight_read_completes_before(d, &disk, |d| {
        mig::set_state_ok(d.raw(), mig::STOP);
    });
}

/// A device the migration state stops does no deferred work until it runs
/// again: a doorbell of the DMA copy example rung in STOP copies nothing
/// and raises nothing until RUNNING.
#[test]
fn migration_stop_holds_deferred_work() {
    use integration_tests::proto::{CONFIG_REGION, IRQ_ACTION_TRIGGER, IRQ_DATA_EVENTFD, IRQ_INTX};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    let dir = TempDir::new().unwrap();
    let socket = dir.as_path().join("dma.sock");
    let (tx, rx) = std::sync::mpsc::channel();
    let path = socket.clone();
    let thread = std::thread::spawn(move || {
        dma_copy::serve(&path, |stop| tx.send(stop).unwrap()).map_err(|e| e.to_string())
    });
    let stop = rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let mut c = RawClient::connect_negotiated(&socket);
    let ram = integration_tests::memfd("guest-ram", 0x2000);
    ram.write_all_at(&pattern(0x1000), 0).unwrap();
    c.dma_map(0, GUEST_BASE, 0x2000, Some(ram.as_raw_fd())).ok();
    let intx = integration_tests::eventfd();
    let trigger = IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER;
    c.set_irqs(trigger, IRQ_INTX, 0, 1, &[], &[intx.as_raw_fd()])
        .ok();
    c.write_ok(CONFIG_REGION, 4, &[0x06, 0]); // memory, bus master
    c.write_ok(0, 0x00, &GUEST_BASE.to_le_bytes()); // SRC
    c.write_ok(0, 0x08, &(GUEST_BASE + 0x1000).to_le_bytes()); // DST
    c.write_ok(0, 0x10, &0x1000u32.to_le_bytes()); // LEN

    mig::set_state_ok(&mut c, mig::STOP);
    c.write_ok(0, 0x14, &[1]); // DOORBELL
    c.ping();
    assert_eq!(integration_tests::eventfd_wait(&intx, 200), None);
    assert_eq!(c.read_ok(0, 0x14, 4), [1, 0, 0, 0], "copy not pending");
    let mut dst = vec![0u8; 0x1000];
    ram.read_exact_at(&mut dst, 0x1000).unwrap();
    assert!(dst.iter().all(|&b| b == 0), "copied while stopped");

    mig::set_state_ok(&mut c, mig::RUNNING);
    assert_eq!(integration_tests::eventfd_wait(&intx, 5000), Some(1));
    assert_eq!(
        c.read_ok(0, 0x18, 8),
        [0, 0, 0, 0, 1, 0, 0, 0],
        "STATUS, COUNT"
    );
    ram.read_exact_at(&mut dst, 0x1000).unwrap();
    assert_eq!(dst, pattern(0x1000));
    drop(c);
    stop.stop();
    assert_eq!(thread.join().unwrap(), Ok(()));
}
