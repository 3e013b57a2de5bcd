//! Spawning servers on fresh sockets, and small OS helpers (eventfds,
//! shared mappings, fd counting, polling for a condition).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::MutexGuard;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfio_user_server::{Device, DeviceContext, EventLoop, Server, ServerConfig, StopHandle};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use crate::client::poll_readable;
use crate::device::{lock, DeviceState, SharedState, TestDevice};

/// Servers running on one event loop thread, each on its own socket in a
/// temporary directory. Dropping it stops the loop (which drops the
/// servers, removing their sockets) and removes the directory.
pub struct TestServer {
    /// The socket paths, one per device.
    pub paths: Vec<PathBuf>,
    /// The device states (TestDevice servers only).
    pub states: Vec<SharedState>,
    /// Stops the loop.
    pub stop: StopHandle,
    /// The loop thread.
    pub join: Option<JoinHandle<io::Result<()>>>,
    /// The directory holding the sockets (removed last).
    pub dir: TempDir,
}

impl TestServer {
    /// The first socket.
    pub fn path(&self) -> &Path {
        &self.paths[0]
    }

    /// The first device's state.
    pub fn state(&self) -> MutexGuard<'_, DeviceState> {
        lock(&self.states[0])
    }

    /// CPU time the loop thread has used so far: a loop that spins on an
    /// event nobody consumes shows here.
    pub fn loop_cpu_time(&self) -> Duration {
        use std::os::unix::thread::JoinHandleExt;
        let join = self.join.as_ref().expect("the loop is running");
        let mut clock: libc::clockid_t = 0;
        // SAFETY: the thread is alive (joined only by `shutdown`, which
        // takes the handle), and `clock` is a valid out-pointer.
        let r = unsafe { libc::pthread_getcpuclockid(join.as_pthread_t(), &mut clock) };
        assert_eq!(r, 0, "pthread_getcpuclockid");
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and out-pointer.
        assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// Stops the loop and waits for its thread; returns its result.
    pub fn shutdown(&mut self) -> io::Result<()> {
        self.stop.stop();
        match self.join.take() {
            Some(j) => j.join().expect("event loop thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// A fresh temporary directory for sockets.
pub fn socket_dir() -> TempDir {
    TempDir::new_with_prefix("/tmp/vfu-it-").expect("tempdir")
}

/// Serves the given devices (each with the context it was built with) on
/// one event loop, one socket each.
pub fn spawn_devices(
    devices: Vec<(Box<dyn Device>, DeviceContext)>,
    config: ServerConfig,
) -> TestServer {
    let dir = socket_dir();
    let mut ev = EventLoop::new().expect("event loop");
    let mut paths = Vec::new();
    for (i, (dev, ctx)) in devices.into_iter().enumerate() {
        let path = dir.as_path().join(format!("dev{i}.sock"));
        let server = Server::new(&path, dev, ctx, config.clone()).expect("server");
        ev.add_server(server).expect("add server");
        paths.push(path);
    }
    let stop = ev.stop_handle();
    let join = std::thread::Builder::new()
        .name("vfu-loop".into())
        .spawn(move || ev.run())
        .expect("spawn");
    TestServer {
        paths,
        states: Vec::new(),
        stop,
        join: Some(join),
        dir,
    }
}

/// `n` TestDevices on one loop with `config`.
pub fn spawn_test_servers(n: usize, config: ServerConfig) -> TestServer {
    let mut devices: Vec<(Box<dyn Device>, DeviceContext)> = Vec::new();
    let mut states = Vec::new();
    for _ in 0..n {
        let ctx = DeviceContext::default();
        let (dev, state) = TestDevice::new(ctx.clone());
        devices.push((Box::new(dev), ctx));
        states.push(state);
    }
    let mut s = spawn_devices(devices, config);
    s.states = states;
    s
}

/// One TestDevice with the default configuration.
pub fn spawn_server() -> TestServer {
    spawn_test_servers(1, ServerConfig::default())
}

/// Polls `cond` every 2 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A non-blocking eventfd.
pub fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("eventfd")
}

/// Waits up to `ms` for the eventfd to be signalled; returns its counter.
pub fn eventfd_wait(e: &EventFd, ms: i32) -> Option<u64> {
    if !poll_readable(e.as_raw_fd(), ms) {
        return None;
    }
    e.read().ok()
}

/// Number of open fds of this process.
pub fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// A shared mapping of an fd, unmapped on drop.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; access goes through
// volatile reads and writes.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset`, read-write, shared.
    pub fn new(fd: RawFd, len: usize, offset: u64) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping; the kernel validates fd/offset/len.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Reads `n` bytes at `off`.
    pub fn read(&self, off: usize, n: usize) -> Vec<u8> {
        assert!(off + n <= self.len);
        // SAFETY: in bounds of the live mapping.
        (0..n)
            .map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(off + i)) })
            .collect()
    }

    /// Writes `data` at `off`.
    pub fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: in bounds of the live mapping.
            unsafe { std::ptr::write_volatile(self.ptr.add(off + i), *b) };
        }
    }

    /// Reads a little-endian u64 at `off`.
    pub fn read_u64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.read(off, 8).try_into().unwrap())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Installs one eventfd per MSI-X vector of the test device (SET_IRQS
/// TRIGGER|EVENTFD) and returns them.
pub fn msix_eventfds(c: &mut crate::client::RawClient) -> Vec<EventFd> {
    use crate::proto::{IRQ_ACTION_TRIGGER, IRQ_DATA_EVENTFD, IRQ_MSIX};
    let efds: Vec<_> = (0..crate::device::MSIX_VECTORS)
        .map(|_| eventfd())
        .collect();
    let raw: Vec<RawFd> = efds.iter().map(|e| e.as_raw_fd()).collect();
    c.set_irqs(
        IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
        IRQ_MSIX,
        0,
        crate::device::MSIX_VECTORS,
        &[],
        &raw,
    )
    .ok();
    efds
}

/// Runs `f` on its own thread and fails the test if it takes more than
/// 20 s: the published rust-vmm client has no timeouts and would hang the
/// test on a protocol mismatch. A panic in `f` is re-raised here.
pub fn with_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(v) => {
            t.join().unwrap();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("the body returned without sending"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("the rust-vmm client hung"),
    }
}
