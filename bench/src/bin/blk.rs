//! `vfio-user-blk-bench`: 4 KiB random reads and writes through our
//! virtio-blk device, driven over the vfio-user socket as Cloud Hypervisor
//! drives it, beside plain `pread`/`pwrite` of the same file (the limit).
//!
//! * The disk is a raw image (256 MiB by default) in `/dev/shm` (tmpfs),
//!   filled with data first, so that neither side reads holes.
//! * **ours**: `backends::virtio_blk::VirtioBlkPci` on a
//!   `backends::storage::RawFile` of that image, behind
//!   `vfio_user_server::pci::PciAdapter`, served by `Server` + `EventLoop`
//!   in a thread of this process. There is one device with one queue and
//!   one with two. The driver is `integration_tests::virtio_driver`, the
//!   same one the daemon tests use: it connects with the published
//!   `vfio_user::Client`, maps a 64 MiB memfd as guest RAM (DMA_MAP),
//!   negotiates `VERSION_1 | FLUSH | BLK_SIZE | SEG_MAX | SIZE_MAX |
//!   EVENT_IDX` (and `MQ`; no indirect descriptors), sets up split queues
//!   of `--queue-size` descriptors and MSI-X eventfds, and sets DRIVER_OK.
//!   Each request is a 3-descriptor chain (header, 4 KiB data, status).
//! * **plain (limit)**: one thread calling `pread`/`pwrite` of 4 KiB on the
//!   same file at the same offsets.
//!
//! Queue depth is per queue: "QD 32, 2 queues" keeps 32 requests in flight
//! on each queue, 64 in all. The driver runs in one thread and behaves like
//! Linux's `virtio_blk` under fio: for each queue it fills every free slot,
//! rings the doorbell (a REGION_WRITE of the notify register, answered at
//! once: the device works afterwards) only when the device's available
//! event asks for it, then collects the used entries of every queue; if
//! there are none it asks for an interrupt and waits for the queues'
//! MSI-X eventfds. Offsets are 4 KiB-aligned, uniformly random over the
//! disk, from a xorshift generator with a fixed seed per case; the plain
//! side replays the same sequence.
//!
//! The device executes requests on the event-loop thread (`--aio sync`,
//! the default), in flight on `--io-threads N` threads (`--aio threads`)
//! or on an io_uring (`--aio io_uring`), and the plain side is one
//! synchronous thread,
//! so the figure to compare is the cost per request, wall time / requests
//! = 1 / IOPS. The table also gives the CPU time per request of the server
//! thread and of the driver (client) thread, from
//! `/proc/self/task/*/schedstat`.
//!
//! Every case runs in `--rounds` slices alternating ours and plain, and the
//! cases are interleaved round by round, so slow drifts of the machine's
//! load hit every row alike. With two CPUs or more the driver (the guest's
//! vCPU) is pinned to CPU 0, the event loops and the plain side to CPU 1
//! (`--no-pin` leaves placement to the scheduler).
//!
//! Run with `cargo run --release -p bench --bin vfio-user-blk-bench`;
//! `--help` lists the options. Output is markdown.

use std::error::Error;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use backends::block_io::{Aio, FALLBACK_IO_THREADS};
use backends::storage::{RawFile, RawFileOptions, MAX_IO_THREADS};
use backends::virtio_blk::{VirtioBlkConfig, VirtioBlkPci};
use bench::{
    cpu_model, gettid, load_average, online_cpus, pin_to_cpu, task_ids, thread_cpu, threads_cpu,
    threads_user_sys, us, CpuTimes, TempPath,
};
use integration_tests::virtio_driver::{
    BlkBuffers, VirtioDriver, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vfio_user_server::pci::PciAdapter;
use vfio_user_server::{DeviceContext, EventLoop, Server, ServerConfig, StopHandle};

/// Result type of the benchmark plumbing.
type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Bytes per request.
const BLOCK: usize = 4096;
/// virtio-blk sector size.
const SECTOR: u64 = 512;

/// Feature bits the driver asks for.
mod features {
    /// `VIRTIO_BLK_F_SIZE_MAX`.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `VIRTIO_BLK_F_SEG_MAX`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// `VIRTIO_BLK_F_BLK_SIZE`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// `VIRTIO_BLK_F_FLUSH`: writes are not followed by a flush.
    pub const FLUSH: u64 = 1 << 9;
    /// `VIRTIO_BLK_F_MQ`.
    pub const MQ: u64 = 1 << 12;
    /// `VIRTIO_RING_F_EVENT_IDX`: the driver kicks and the device
    /// interrupts only when the other side asked for it.
    pub const EVENT_IDX: u64 = 1 << 29;
    /// `VIRTIO_F_VERSION_1`.
    pub const VERSION_1: u64 = 1 << 32;
    /// Everything above.
    pub const WANTED: u64 = SIZE_MAX | SEG_MAX | BLK_SIZE | FLUSH | MQ | EVENT_IDX | VERSION_1;
}

/// Read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// `VIRTIO_BLK_T_IN` / `pread`.
    Read,
    /// `VIRTIO_BLK_T_OUT` / `pwrite`.
    Write,
}

impl Op {
    /// The fio-style name.
    fn name(self) -> &'static str {
        match self {
            Op::Read => "randread",
            Op::Write => "randwrite",
        }
    }
}

/// One benchmark case.
#[derive(Clone, Copy, Debug)]
struct Case {
    /// Read or write.
    op: Op,
    /// Requests in flight per queue.
    qd: usize,
    /// Queues used (1 or 2).
    queues: usize,
}

impl Case {
    /// Every case, in table order.
    fn all() -> Vec<Case> {
        let mut v = Vec::new();
        for op in [Op::Read, Op::Write] {
            for qd in [1, 32] {
                for queues in [1, 2] {
                    v.push(Case { op, qd, queues });
                }
            }
        }
        v
    }

    /// The name `--case` takes, e.g. `randread-qd32-2q`.
    fn name(&self) -> String {
        format!("{}-qd{}-{}q", self.op.name(), self.qd, self.queues)
    }

    /// The PRNG seed of the case (ours and plain use the same).
    fn seed(&self) -> u64 {
        0x9e37_79b9_7f4a_7c15
            ^ ((self.op as u64) << 40 | (self.qd as u64) << 8 | self.queues as u64)
    }
}

/// xorshift64*: random 4 KiB-aligned offsets.
#[derive(Clone, Debug)]
struct Offsets {
    /// Generator state.
    state: u64,
    /// Blocks on the disk.
    blocks: u64,
}

impl Offsets {
    /// A generator over `blocks` blocks.
    fn new(seed: u64, blocks: u64) -> Offsets {
        Offsets {
            state: seed | 1,
            blocks,
        }
    }

    /// The next byte offset.
    #[inline]
    fn next_offset(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) % self.blocks * BLOCK as u64
    }
}

/// The CPU of the driver thread when pinning.
const DRIVER_CPU: usize = 0;
/// The CPU of the event loops and of the plain side when pinning.
const SERVER_CPU: usize = 1;

/// A 4 KiB-aligned buffer for the plain side.
struct AlignedBlock {
    /// Storage, one block longer than needed.
    storage: Vec<u8>,
    /// Offset of the aligned start.
    start: usize,
}

impl AlignedBlock {
    /// A block filled with `fill`.
    fn new(fill: u8) -> AlignedBlock {
        let storage = vec![fill; 2 * BLOCK];
        let start = storage.as_ptr().align_offset(BLOCK).min(BLOCK);
        AlignedBlock { storage, start }
    }

    /// The aligned block.
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + BLOCK]
    }
}

/// A device served by our event loop in a thread of this process.
struct Served {
    /// The event-loop thread.
    thread: JoinHandle<BenchResult<()>>,
    /// Stops the loop.
    stop: StopHandle,
    /// The kernel ids of the event-loop thread and the device's I/O
    /// threads (for their CPU time).
    tids: Vec<i32>,
    /// How the device runs its I/O.
    aio: Aio,
}

impl Served {
    /// Serves a virtio-blk device with `num_queues` queues of `queue_size`
    /// on the image at `image`, listening at `socket`.
    fn start(
        image: &Path,
        socket: &Path,
        num_queues: u16,
        queue_size: u16,
        aio: Aio,
        direct: bool,
    ) -> BenchResult<Served> {
        let options = RawFileOptions {
            direct,
            ..Default::default()
        };
        let file = RawFile::open(image, options)?;
        let ctx = DeviceContext::default();
        let tasks_before = task_ids();
        let blk = VirtioBlkPci::new(
            ctx.clone(),
            Arc::new(file),
            VirtioBlkConfig {
                num_queues,
                queue_size,
                aio,
                ..Default::default()
            },
        )?;
        let aio = blk.device().aio();
        // The device's I/O threads are the threads it started.
        let mut tids: Vec<i32> = task_ids()
            .into_iter()
            .filter(|t| !tasks_before.contains(t))
            .collect();
        let adapter = PciAdapter::new(blk)?;
        let server = Server::new(socket, Box::new(adapter), ctx, ServerConfig::default())?;
        let mut ev = EventLoop::new()?;
        ev.add_server(server)?;
        let stop = ev.stop_handle();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name(format!("blk-{num_queues}q"))
            .spawn(move || {
                let _ = tx.send(gettid());
                ev.run().map_err(Into::into)
            })?;
        tids.insert(0, rx.recv()?);
        Ok(Served {
            thread,
            stop,
            tids,
            aio,
        })
    }

    /// Stops the loop (the client must already be dropped) and waits.
    fn finish(self) -> BenchResult<()> {
        self.stop.stop();
        self.thread.join().map_err(|_| "server thread panicked")?
    }
}

/// The driver side of one device: a [`VirtioDriver`] over the published
/// client, with `max_qd` reusable request buffers per queue.
struct Driver {
    /// The virtio-pci driver.
    virtio: VirtioDriver,
    /// Request buffers, `[queue][slot]`.
    slots: Vec<Vec<BlkBuffers>>,
    /// Which slot each head of each queue uses, `[queue][head]`.
    by_head: Vec<Vec<usize>>,
    /// Used entries collected by the last poll.
    used: Vec<(u16, u32)>,
}

impl Driver {
    /// Connects to `socket` and brings the device up with every queue of
    /// `queue_size` descriptors and `max_qd` request buffers per queue.
    fn connect(socket: &Path, queue_size: u16, max_qd: usize) -> BenchResult<Driver> {
        let mut virtio = VirtioDriver::connect(socket);
        let got = virtio.init(features::WANTED, queue_size);
        let need = features::VERSION_1 | features::FLUSH;
        if got & need != need {
            return Err(format!("device refused VERSION_1 | FLUSH: {got:#x}").into());
        }
        let pattern: Vec<u8> = (0..BLOCK).map(|i| (i * 13 + 7) as u8).collect();
        let mut slots = Vec::new();
        for q in 0..virtio.queues.len() {
            if usize::from(virtio.queues[q].size) < 3 * max_qd {
                return Err(format!("queue size {} too small for QD {max_qd}", queue_size).into());
            }
            let mut v = Vec::new();
            for _ in 0..max_qd {
                let b = virtio.blk_buffers(BLOCK as u32);
                virtio.ram.write(b.data, &pattern);
                v.push(b);
            }
            slots.push(v);
        }
        let by_head = virtio
            .queues
            .iter()
            .map(|q| vec![usize::MAX; usize::from(q.size)])
            .collect();
        Ok(Driver {
            virtio,
            slots,
            by_head,
            used: Vec::with_capacity(256),
        })
    }

    /// Submits one request on `q` using `slot`.
    #[inline]
    fn submit(&mut self, q: usize, slot: usize, op: Op, offset: u64) {
        let t = match op {
            Op::Read => VIRTIO_BLK_T_IN,
            Op::Write => VIRTIO_BLK_T_OUT,
        };
        let bufs = self.slots[q][slot];
        let head = self.virtio.blk_push(q, t, offset / SECTOR, &bufs);
        self.by_head[q][usize::from(head)] = slot;
    }

    /// Waits for at least one used entry on `q` (after its interrupt) and
    /// collects them all into `self.used`.
    fn wait_used(&mut self, q: usize) {
        loop {
            if self.virtio.poll_used_into(q, &mut self.used) > 0 {
                return;
            }
            self.sleep_until_interrupt(&[q]);
        }
    }

    /// Sleeps until one of `queues` interrupts, as the guest's driver does
    /// when it has nothing to complete: asks each for an interrupt at its
    /// next used entry and returns at once if one came meanwhile.
    fn sleep_until_interrupt(&mut self, queues: &[usize]) {
        let mut pfds = Vec::with_capacity(queues.len());
        for &q in queues {
            if !self.virtio.enable_interrupt(q) {
                return;
            }
            pfds.push(libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(self.virtio.queue_interrupt(q).eventfd()),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 1000) };
        for &q in queues {
            let _ = self.virtio.queue_interrupt(q).eventfd().read();
        }
    }

    /// One request through the device, waited for; returns the status.
    fn one(&mut self, op: Op, offset: u64) -> u8 {
        self.submit(0, 0, op, offset);
        self.virtio.kick(0);
        self.used.clear();
        self.wait_used(0);
        assert_eq!(self.used.len(), 1);
        self.slots[0][0].status(&self.virtio.ram)
    }

    /// Retires the used entries of queue `q` in `self.used`: checks their
    /// status, adds their latencies and frees their slots. Returns how many.
    fn complete(
        &mut self,
        q: usize,
        free: &mut Vec<usize>,
        submitted: &[Instant],
        latency: &mut Duration,
    ) -> usize {
        let now = Instant::now();
        for &(head, _len) in &self.used {
            let slot = self.by_head[q][usize::from(head)];
            let status = self.slots[q][slot].status(&self.virtio.ram);
            assert_eq!(status, VIRTIO_BLK_S_OK, "request failed: {status}");
            *latency += now - submitted[slot];
            free.push(slot);
        }
        self.used.len()
    }

    /// Runs `case` for `time` from the offsets `rng`; returns what it did.
    fn run(&mut self, case: Case, rng: &mut Offsets, time: Duration, server: &[i32]) -> Measure {
        let me = gettid();
        let (server_before, client_before) = (threads_cpu(server), thread_cpu(me));
        let split_before = threads_user_sys(server);
        // free[q] = slots not in flight; submitted[q][slot] = when.
        let mut free: Vec<Vec<usize>> = (0..case.queues).map(|_| (0..case.qd).collect()).collect();
        let mut submitted = vec![vec![Instant::now(); case.qd]; case.queues];
        let mut in_flight = 0usize;
        let mut done = 0u64;
        let mut latency = Duration::ZERO;
        let start = Instant::now();
        let deadline = start + time;
        let mut now = start;
        let mut kicks = 0u64;
        let mut busy = Vec::with_capacity(case.queues);
        while now < deadline || in_flight > 0 {
            // Like Linux's virtio-blk under fio: refill every free slot,
            // ring the doorbell only if the device asked for it, complete
            // what is used, and sleep on the interrupt only when nothing is.
            for q in 0..case.queues {
                if now < deadline && !free[q].is_empty() {
                    let old = self.virtio.queues[q].next_avail;
                    while let Some(slot) = free[q].pop() {
                        self.submit(q, slot, case.op, rng.next_offset());
                        submitted[q][slot] = now;
                        in_flight += 1;
                    }
                    if self.virtio.kick_needed(q, old) {
                        self.virtio.kick(q);
                        kicks += 1;
                    }
                }
            }
            let mut got = 0;
            for q in 0..case.queues {
                self.used.clear();
                self.virtio.poll_used_into(q, &mut self.used);
                got += self.complete(q, &mut free[q], &submitted[q], &mut latency);
            }
            if got == 0 && in_flight > 0 {
                busy.clear();
                busy.extend((0..case.queues).filter(|&q| free[q].len() < case.qd));
                self.sleep_until_interrupt(&busy);
            }
            in_flight -= got;
            done += got as u64;
            now = Instant::now();
        }
        let split_after = threads_user_sys(server);
        Measure {
            requests: done,
            wall: now - start,
            latency,
            server_cpu: threads_cpu(server).saturating_sub(server_before),
            server_user: split_after.0.saturating_sub(split_before.0),
            server_sys: split_after.1.saturating_sub(split_before.1),
            client_cpu: thread_cpu(me).saturating_sub(client_before),
            kicks,
        }
    }
}

/// What one slice of a case did.
#[derive(Clone, Copy, Debug, Default)]
struct Measure {
    /// Requests completed.
    requests: u64,
    /// Wall time.
    wall: Duration,
    /// Sum of the request latencies (submit to completion seen).
    latency: Duration,
    /// CPU time of the server thread.
    server_cpu: Duration,
    /// User time of the server thread (clock ticks).
    server_user: Duration,
    /// System time of the server thread (clock ticks).
    server_sys: Duration,
    /// CPU time of the driver (or plain) thread.
    client_cpu: Duration,
    /// Doorbells the driver rang.
    kicks: u64,
}

impl Measure {
    /// Adds another slice.
    fn add(&mut self, o: &Measure) {
        self.requests += o.requests;
        self.wall += o.wall;
        self.latency += o.latency;
        self.server_cpu += o.server_cpu;
        self.server_user += o.server_user;
        self.server_sys += o.server_sys;
        self.client_cpu += o.client_cpu;
        self.kicks += o.kicks;
    }

    /// Requests per second.
    fn iops(&self) -> f64 {
        self.requests as f64 / self.wall.as_secs_f64()
    }

    /// `d` per request.
    fn per_req(&self, d: Duration) -> Duration {
        d.div_f64(self.requests.max(1) as f64)
    }
}

/// Plain `pread`/`pwrite` of 4 KiB at the offsets of `rng` for `time`.
fn run_plain(file: &File, op: Op, rng: &mut Offsets, time: Duration) -> BenchResult<Measure> {
    let me = gettid();
    let cpu_before = thread_cpu(me);
    let mut block = AlignedBlock::new(0x5a);
    let buf = block.as_mut();
    let mut done = 0u64;
    let start = Instant::now();
    let deadline = start + time;
    let mut now = start;
    let mut latency = Duration::ZERO;
    while now < deadline {
        // Batches of 64 between clock reads, like the device's batches.
        for _ in 0..64 {
            let off = rng.next_offset();
            match op {
                Op::Read => file.read_exact_at(buf, off)?,
                Op::Write => file.write_all_at(buf, off)?,
            }
        }
        done += 64;
        let t = Instant::now();
        // Sequential: each request's latency is its share of the batch.
        latency += t - now;
        now = t;
    }
    Ok(Measure {
        requests: done,
        wall: now - start,
        latency,
        server_cpu: Duration::ZERO,
        server_user: Duration::ZERO,
        server_sys: Duration::ZERO,
        client_cpu: thread_cpu(me).saturating_sub(cpu_before),
        kicks: 0,
    })
}

/// Command-line options.
struct Options {
    /// Time per case through the device.
    secs: f64,
    /// Time per case of the plain side.
    plain_secs: f64,
    /// Slices each case is split into.
    rounds: u32,
    /// Disk size in MiB.
    size_mib: u64,
    /// Directory of the image.
    dir: PathBuf,
    /// Descriptors per queue.
    queue_size: u16,
    /// Cases to run (all when empty).
    cases: Vec<String>,
    /// Skip the plain side.
    no_plain: bool,
    /// Skip the device.
    no_ours: bool,
    /// I/O threads of the device (0: I/O on the event loop thread).
    io_threads: usize,
    /// `--aio`, if given.
    aio: Option<String>,
    /// Both sides open the image with `O_DIRECT`.
    direct: bool,
    /// Pin the driver to one CPU and the event loops and the plain side
    /// to another.
    pin: bool,
}

/// The usage text.
const USAGE: &str =
    "usage: vfio-user-blk-bench [--secs S] [--plain-secs S] [--rounds N] [--size-mib N]
                           [--dir DIR] [--queue-size N] [--case LIST] [--no-plain] [--no-ours]
                           [--aio MODE] [--io-threads N] [--direct] [--no-pin]
  --secs S        seconds per case through the device (default 2)
  --plain-secs S  seconds per case of plain pread/pwrite (default 1)
  --rounds N      split every case into N slices, interleaving all cases (default 4)
  --size-mib N    size of the image (default 256)
  --dir DIR       where the image is created (default /dev/shm, a tmpfs)
  --queue-size N  descriptors per virtqueue (default 256; at least 3 x 32)
  --case LIST     only these cases, comma-separated, e.g. randread-qd32-1q,randwrite-qd1-2q
  --no-plain      skip plain pread/pwrite (for profiling the device)
  --no-ours       skip the device
  --aio MODE      how the device runs I/O: sync (on the event loop, the default), threads
                  (on --io-threads threads, default 4) or io_uring
  --io-threads N  the device's I/O threads; without --aio, N > 0 means --aio threads
  --direct        both sides open the image with O_DIRECT (use --dir on a real disk)
  --no-pin        let the scheduler place the threads (by default, with 2 CPUs or more,
                  the driver runs on CPU 0, the event loops and the plain side on CPU 1)";

/// Parses the command line.
fn parse_args() -> BenchResult<Options> {
    let mut o = Options {
        secs: 2.0,
        plain_secs: 1.0,
        rounds: 4,
        size_mib: 256,
        dir: PathBuf::from("/dev/shm"),
        queue_size: 256,
        cases: Vec::new(),
        no_plain: false,
        no_ours: false,
        io_threads: 0,
        aio: None,
        direct: false,
        pin: online_cpus() >= 2,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        let bad = |v: &str| format!("bad value {v} for {a}");
        match a.as_str() {
            "--secs" | "--plain-secs" => {
                let v = val()?;
                let s: f64 = v.parse().map_err(|_| bad(&v))?;
                if !(s > 0.0 && s < 600.0) {
                    return Err(bad(&v).into());
                }
                if a == "--secs" {
                    o.secs = s;
                } else {
                    o.plain_secs = s;
                }
            }
            "--rounds" => {
                let v = val()?;
                o.rounds = v.parse().ok().filter(|&n| n > 0).ok_or_else(|| bad(&v))?;
            }
            "--size-mib" => {
                let v = val()?;
                o.size_mib = v.parse().ok().filter(|&n| n > 0).ok_or_else(|| bad(&v))?;
            }
            "--queue-size" => {
                let v = val()?;
                o.queue_size = v.parse().map_err(|_| bad(&v))?;
            }
            "--dir" => o.dir = PathBuf::from(val()?),
            "--case" => o.cases.extend(val()?.split(',').map(String::from)),
            "--no-plain" => o.no_plain = true,
            "--no-ours" => o.no_ours = true,
            "--direct" => o.direct = true,
            "--aio" => {
                let v = val()?;
                if !["sync", "threads", "io_uring"].contains(&v.as_str()) {
                    return Err(bad(&v).into());
                }
                o.aio = Some(v);
            }
            "--no-pin" => o.pin = false,
            "--io-threads" => {
                let v = val()?;
                o.io_threads = v
                    .parse()
                    .ok()
                    .filter(|&n| n <= MAX_IO_THREADS)
                    .ok_or_else(|| bad(&v))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a}\n{USAGE}").into()),
        }
    }
    Ok(o)
}

impl Options {
    /// How the device runs its I/O.
    fn aio(&self) -> Aio {
        let threads = match self.io_threads {
            0 => FALLBACK_IO_THREADS,
            n => n,
        };
        match (self.aio.as_deref(), self.io_threads) {
            (Some("io_uring"), _) => Aio::IoUring,
            (Some("threads"), _) | (None, 1..) => Aio::Threads(threads),
            _ => Aio::Sync,
        }
    }
}

/// Creates the image: `size` bytes of non-zero data.
fn create_image(path: &Path, size: u64) -> BenchResult<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x1234_5678_9abc_def1u64;
    for b in chunk.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    let mut off = 0;
    while off < size {
        let n = (size - off).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk[..n], off)?;
        off += n as u64;
    }
    file.sync_all()?;
    Ok(file)
}

/// Checks that both paths see the same disk: a write through the device
/// is read back with `pread`, a `pwrite` is read back through the device.
fn self_check(d: &mut Driver, file: &File) -> BenchResult<()> {
    let ram = |d: &Driver| d.virtio.ram.read(d.slots[0][0].data, BLOCK);
    let ours = ram(d);
    if d.one(Op::Write, 3 * BLOCK as u64) != VIRTIO_BLK_S_OK {
        return Err("write through the device failed".into());
    }
    let mut back = vec![0u8; BLOCK];
    file.read_exact_at(&mut back, 3 * BLOCK as u64)?;
    if back != ours {
        return Err("pread does not see the device's write".into());
    }
    let theirs: Vec<u8> = (0..BLOCK).map(|i| (i * 31 + 1) as u8).collect();
    file.write_all_at(&theirs, 5 * BLOCK as u64)?;
    if d.one(Op::Read, 5 * BLOCK as u64) != VIRTIO_BLK_S_OK {
        return Err("read through the device failed".into());
    }
    if ram(d) != theirs {
        return Err("the device does not read what pwrite wrote".into());
    }
    // Restore the pattern the writes use.
    d.virtio.ram.write(d.slots[0][0].data, &ours);
    Ok(())
}

/// Results of one case.
struct Row {
    /// The case.
    case: Case,
    /// Through the device.
    ours: Measure,
    /// Plain.
    plain: Measure,
}

fn main() -> BenchResult<()> {
    let opts = parse_args()?;
    let all = Case::all();
    for c in &opts.cases {
        if !all.iter().any(|k| &k.name() == c) {
            let names: Vec<String> = all.iter().map(Case::name).collect();
            return Err(format!("unknown case {c}; cases: {}", names.join(",")).into());
        }
    }
    let cases: Vec<Case> = all
        .into_iter()
        .filter(|c| opts.cases.is_empty() || opts.cases.contains(&c.name()))
        .collect();
    let max_qd = cases.iter().map(|c| c.qd).max().unwrap_or(1);

    let pid = std::process::id();
    let image = TempPath(opts.dir.join(format!("vfio-user-blk-bench-{pid}.img")));
    let sockets = TempPath(std::env::temp_dir().join(format!("vfio-user-blk-bench-{pid}")));
    std::fs::create_dir_all(&sockets.0)?;
    let size = opts.size_mib << 20;
    let load_start = load_average();
    let began = Instant::now();
    let plain_file = create_image(&image.0, size)?;
    let blocks = size / BLOCK as u64;

    // Devices with one and two queues, each in its own event loop.
    let mut served = Vec::new();
    let mut drivers = Vec::new();
    for nq in [1u16, 2] {
        let sock = sockets.0.join(format!("blk{nq}.sock"));
        served.push(Served::start(
            &image.0,
            &sock,
            nq,
            opts.queue_size,
            opts.aio(),
            opts.direct,
        )?);
        let mut d = Driver::connect(&sock, opts.queue_size, max_qd)?;
        if d.virtio.queues.len() != usize::from(nq) {
            return Err(format!("device has {} queues", d.virtio.queues.len()).into());
        }
        self_check(&mut d, &plain_file)?;
        drivers.push(d);
    }
    // The driver stands for a guest's vCPU, which is not the device's CPU.
    // Left to itself, the scheduler sometimes wakes the driver on the
    // event loop's CPU, and the device's figures then include the
    // driver's time. The plain side runs on the event loops' CPU.
    let pin = |cpu: usize| {
        if opts.pin && !pin_to_cpu(0, cpu) {
            eprintln!("warning: cannot pin to CPU {cpu}");
        }
    };
    if opts.pin {
        for s in &served {
            if !pin_to_cpu(s.tids[0], SERVER_CPU) {
                eprintln!("warning: cannot pin the event loop to CPU {SERVER_CPU}");
            }
        }
    }

    // The plain side's own handle: O_DIRECT like ours when asked.
    let plain_file = if opts.direct {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&image.0)?
    } else {
        plain_file
    };
    let cpu_before = CpuTimes::now();
    let measure_start = Instant::now();
    let mut rows: Vec<Row> = cases
        .iter()
        .map(|&case| Row {
            case,
            ours: Measure::default(),
            plain: Measure::default(),
        })
        .collect();
    let mut rngs: Vec<(Offsets, Offsets)> = cases
        .iter()
        .map(|c| {
            let r = Offsets::new(c.seed(), blocks);
            (r.clone(), r)
        })
        .collect();
    let slice = Duration::from_secs_f64(opts.secs / f64::from(opts.rounds));
    let plain_slice = Duration::from_secs_f64(opts.plain_secs / f64::from(opts.rounds));
    for round in 0..opts.rounds {
        for (i, row) in rows.iter_mut().enumerate() {
            let (ours_rng, plain_rng) = &mut rngs[i];
            let dev = row.case.queues - 1;
            // Alternate which side goes first.
            for side in 0..2 {
                if (side + round) % 2 == 0 {
                    if !opts.no_ours {
                        pin(DRIVER_CPU);
                        let m = drivers[dev].run(row.case, ours_rng, slice, &served[dev].tids);
                        row.ours.add(&m);
                    }
                } else if !opts.no_plain {
                    pin(SERVER_CPU);
                    let m = run_plain(&plain_file, row.case.op, plain_rng, plain_slice)?;
                    row.plain.add(&m);
                }
            }
        }
    }
    let measured = measure_start.elapsed();
    let served_aio = served.first().map_or(Aio::Sync, |s| s.aio);
    let others = cpu_before.and_then(|b| Some(CpuTimes::now()?.others_since(&b, measured)));
    drop(drivers);
    for s in served {
        s.finish()?;
    }

    let ncpu = online_cpus();
    println!(
        "4 KiB random I/O on a {} MiB image in {} ({}{}), {} CPUs, {}, queue size {}, \
         {} rounds, aio: {}, {}, total {:.1} s; load average {} at start, {} at end; \
         other processes used {} CPUs meanwhile\n",
        opts.size_mib,
        opts.dir.display(),
        fs_type(&opts.dir),
        if opts.direct { ", O_DIRECT" } else { "" },
        ncpu,
        cpu_model(),
        opts.queue_size,
        opts.rounds,
        served_aio,
        if opts.pin {
            "driver pinned to CPU 0, event loops and plain side to CPU 1"
        } else {
            "not pinned"
        },
        began.elapsed().as_secs_f64(),
        load_start,
        load_average(),
        others.map_or("?".into(), |o| format!("{o:.2}")),
    );
    println!(
        "| case | queues | QD/queue | ours IOPS | ours mean lat µs | ours µs/req | \
         plain IOPS | plain µs/req | ours / plain | server CPU µs/req | server sys % | driver CPU µs/req | \
         doorbells / 1000 req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let f = |m: &Measure, d: Duration| {
        if m.requests == 0 {
            "-".to_string()
        } else {
            us(m.per_req(d))
        }
    };
    let iops = |m: &Measure| {
        if m.requests == 0 {
            "-".to_string()
        } else {
            format!("{:.0}", m.iops())
        }
    };
    for r in &rows {
        let ratio = if r.ours.requests > 0 && r.plain.requests > 0 {
            format!("{:.2}x", r.plain.iops() / r.ours.iops())
        } else {
            "-".into()
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.case.op.name(),
            r.case.queues,
            r.case.qd,
            iops(&r.ours),
            f(&r.ours, r.ours.latency),
            f(&r.ours, r.ours.wall),
            iops(&r.plain),
            f(&r.plain, r.plain.wall),
            ratio,
            f(&r.ours, r.ours.server_cpu),
            sys_share(&r.ours),
            f(&r.ours, r.ours.client_cpu),
            if r.ours.requests == 0 {
                "-".to_string()
            } else {
                format!(
                    "{:.1}",
                    r.ours.kicks as f64 * 1000.0 / r.ours.requests as f64
                )
            },
        );
    }
    Ok(())
}

/// The share of system time in the server thread's CPU time.
fn sys_share(m: &Measure) -> String {
    let total = m.server_user + m.server_sys;
    if total.is_zero() {
        "-".into()
    } else {
        format!(
            "{:.0}%",
            100.0 * m.server_sys.as_secs_f64() / total.as_secs_f64()
        )
    }
}

/// The file system type of `dir` (tmpfs or not).
fn fs_type(dir: &Path) -> &'static str {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return "?";
    };
    // SAFETY: statfs writes into a zeroed struct we own; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "?";
    }
    if st.f_type == libc::TMPFS_MAGIC {
        "tmpfs"
    } else {
        "not tmpfs"
    }
}
