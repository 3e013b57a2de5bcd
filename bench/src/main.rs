//! `vfio-user-bench`: REGION_READ round-trip latency of our vfio-user
//! server, compared in the same run with
//!
//! * `ping-pong`: the limit, a plain UNIX-socket exchange of the same
//!   message sizes (a thread blocking-reads the 32-byte request and writes
//!   the 32+N-byte reply);
//! * `ours`: [`vfio_user_server::EventLoop`] serving a trivial device;
//! * `rust-vmm`: the published `vfio_user::Server` with the same trivial
//!   device as a `vfio_user::ServerBackend`;
//! * `ours+compat`: our server running that same `ServerBackend` through
//!   [`vfio_user_server::compat::RustVmmBackend`].
//!
//! The three vfio-user servers are driven by the same client, the
//! published `vfio_user::Client`. The ping-pong client issues exactly the
//! syscalls `vfio_user::Client::region_read` issues (one `write` of the
//! request, one `read` of the 32-byte reply head, one `read` of the data),
//! so every row differs only in the server.
//!
//! The servers all run, each in its own thread, for the whole run; the
//! iterations are split into rounds and every round times every server in
//! turn, so slow drifts of the machine affect all rows alike. Besides the
//! wall-clock latency of each round trip, the table gives the CPU time per
//! round trip of the server thread and of the client thread (from
//! `/proc/self/task/*/schedstat`), and the header says how much CPU other
//! processes used during the run (from `/proc/stat`): the numbers are
//! only comparable between runs on an otherwise idle machine.
//!
//! Run with `cargo run --release -p bench --bin vfio-user-bench`; `--help`
//! lists the options. Output is markdown.

use std::error::Error;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bench::{cpu_model, online_cpus, thread_cpu, us, CpuTimes, TempPath};
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, ServerBackend, ServerRegion};
use vfio_user_server::compat::RustVmmBackend;
use vfio_user_server::irq::IrqIndexInfo;
use vfio_user_server::vm_migration::{Migratable, Pausable, Snapshottable, Transportable};
use vfio_user_server::{
    Device, DeviceContext, DeviceError, EventLoop, Lifecycle, RegionDescription, ResetReason,
    Server, ServerConfig, StopHandle,
};

/// Result type of the benchmark plumbing.
type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Regions the device reports (the PCI layout: BAR0-5, ROM, config, VGA).
const NUM_REGIONS: u32 = 9;
/// Index of the PCI config space region.
const CONFIG_INDEX: u32 = 7;
/// Size of BAR0, the region every read targets.
const BAR0_SIZE: usize = 64 * 1024;
/// Size of the config space region.
const CONFIG_SIZE: usize = 256;
/// vfio-user message header size.
const HEADER_SIZE: usize = 16;
/// Header plus `struct vfio_user_region_access` (offset, count, region).
const ACCESS_SIZE: usize = HEADER_SIZE + 16;
/// `VFIO_USER_REGION_READ`.
const CMD_REGION_READ: u16 = 9;
/// Header flag marking a reply.
const FLAG_REPLY: u32 = 1;

/// Size in bytes of region `index` of the trivial device.
fn region_size(index: u32) -> usize {
    match index {
        0 => BAR0_SIZE,
        CONFIG_INDEX => CONFIG_SIZE,
        _ => 0,
    }
}

/// The state of the trivial device: BAR0 and config space, each a buffer
/// that reads copy from and writes copy to.
struct Regions {
    /// BAR0 contents.
    bar0: Vec<u8>,
    /// Config space contents.
    config: Vec<u8>,
}

impl Regions {
    /// Fills the regions with a recognisable pattern.
    fn new() -> Regions {
        Regions {
            bar0: pattern(BAR0_SIZE),
            config: pattern(CONFIG_SIZE),
        }
    }

    /// The buffer behind region `index` and the byte range `offset..+len`.
    fn range(&mut self, index: u32, offset: u64, len: usize) -> Option<&mut [u8]> {
        let buf = match index {
            0 => &mut self.bar0,
            CONFIG_INDEX => &mut self.config,
            _ => return None,
        };
        let start = usize::try_from(offset).ok()?;
        buf.get_mut(start..start.checked_add(len)?)
    }

    /// Copies `data.len()` bytes at `offset` of region `index` into `data`.
    fn read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Option<()> {
        data.copy_from_slice(self.range(index, offset, data.len())?);
        Some(())
    }

    /// Copies `data` to `offset` of region `index`.
    fn write(&mut self, index: u32, offset: u64, data: &[u8]) -> Option<()> {
        self.range(index, offset, data.len())?.copy_from_slice(data);
        Some(())
    }
}

/// The byte pattern every region starts with.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(7) + 3) as u8).collect()
}

/// The trivial device written against our [`Device`] trait.
struct OurDevice(Regions);

impl Device for OurDevice {
    fn num_regions(&self) -> u32 {
        NUM_REGIONS
    }

    fn region(&self, index: u32) -> RegionDescription {
        let size = region_size(index) as u64;
        RegionDescription {
            size,
            read: size > 0,
            write: size > 0,
            mmap: None,
        }
    }

    fn irq_layout(&self) -> Vec<IrqIndexInfo> {
        vec![IrqIndexInfo {
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: 1,
        }]
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.0
            .read(index, offset, data)
            .ok_or(DeviceError::InvalidAccess)
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.0
            .write(index, offset, data)
            .ok_or(DeviceError::InvalidAccess)
    }
}

impl Pausable for OurDevice {}
impl Snapshottable for OurDevice {}
impl Transportable for OurDevice {}
impl Migratable for OurDevice {}

impl Lifecycle for OurDevice {
    fn reset(&mut self, _reason: ResetReason) {}
}

/// The same trivial device written against `vfio_user::ServerBackend`.
struct TrivialBackend(Regions);

/// The error a backend returns for an out-of-range access.
fn invalid() -> io::Error {
    io::Error::from(io::ErrorKind::InvalidInput)
}

impl ServerBackend for TrivialBackend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.0.read(region, offset, data).ok_or_else(invalid)
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(region, offset, data).ok_or_else(invalid)
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        _offset: u64,
        _address: u64,
        _size: u64,
        _fd: Option<std::fs::File>,
    ) -> io::Result<()> {
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, _address: u64, _size: u64) -> io::Result<()> {
        Ok(())
    }

    fn reset(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn set_irqs(
        &mut self,
        _index: u32,
        _flags: u32,
        _start: u32,
        _count: u32,
        _fds: Vec<std::fs::File>,
    ) -> io::Result<()> {
        Ok(())
    }
}

/// The region table `vfio_user::Server::new` (and `RustVmmBackend::new`)
/// take for the trivial device.
fn rust_vmm_regions() -> Vec<ServerRegion> {
    (0..NUM_REGIONS)
        .map(|index| {
            let size = region_size(index) as u64;
            let flags = if size > 0 {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            } else {
                0
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

/// The IRQ table matching [`OurDevice::irq_layout`].
fn rust_vmm_irqs() -> Vec<vfio_user::IrqInfo> {
    vec![vfio_user::IrqInfo {
        index: 0,
        flags: VFIO_IRQ_INFO_EVENTFD,
        count: 1,
    }]
}

/// The servers measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// Plain UNIX-socket ping-pong (the limit).
    PingPong,
    /// Our server with [`OurDevice`].
    Ours,
    /// rust-vmm's `vfio_user::Server` with [`TrivialBackend`].
    RustVmm,
    /// Our server with [`TrivialBackend`] through `RustVmmBackend`.
    OursCompat,
    /// Our server with [`OurDevice`], busy-polling 50 µs after each burst.
    OursBusyPoll,
}

impl Target {
    /// Every server, in table order.
    const ALL: [Target; 5] = [
        Target::PingPong,
        Target::Ours,
        Target::RustVmm,
        Target::OursCompat,
        Target::OursBusyPoll,
    ];

    /// Parses a `--only` name.
    fn from_arg(name: &str) -> BenchResult<Target> {
        match name {
            "ping-pong" => Ok(Target::PingPong),
            "ours" => Ok(Target::Ours),
            "rust-vmm" => Ok(Target::RustVmm),
            "compat" => Ok(Target::OursCompat),
            "ours-poll" => Ok(Target::OursBusyPoll),
            _ => Err(format!("unknown server {name}\n{USAGE}").into()),
        }
    }

    /// The name printed in the table.
    fn name(self) -> &'static str {
        match self {
            Target::PingPong => "ping-pong (limit)",
            Target::Ours => "ours",
            Target::RustVmm => "rust-vmm vfio_user::Server",
            Target::OursCompat => "ours + compat::RustVmmBackend",
            Target::OursBusyPoll => "ours, busy-poll 50 µs",
        }
    }
}

/// A server running in its own thread.
struct Running {
    /// The server thread.
    thread: JoinHandle<BenchResult<()>>,
    /// Stops our event loop (the other servers return when the client
    /// disconnects).
    stop: Option<StopHandle>,
    /// The server thread's kernel thread id (for its CPU time).
    tid: i32,
}

/// Runs `serve` in a new thread named `name`.
fn spawn_server<F>(name: &str, stop: Option<StopHandle>, serve: F) -> BenchResult<Running>
where
    F: FnOnce() -> BenchResult<()> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = thread::Builder::new().name(name.into()).spawn(move || {
        // SAFETY: gettid has no preconditions.
        let _ = tx.send(unsafe { libc::gettid() });
        serve()
    })?;
    let tid = rx.recv()?;
    Ok(Running { thread, stop, tid })
}

impl Running {
    /// Stops the server (the client must already be dropped) and waits.
    fn finish(self) -> BenchResult<()> {
        if let Some(stop) = &self.stop {
            stop.stop();
        }
        self.thread.join().map_err(|_| "server thread panicked")?
    }
}

/// Starts our event loop serving `device` at `path`.
fn start_ours(
    path: &Path,
    device: Box<dyn Device>,
    busy_poll: std::time::Duration,
) -> BenchResult<Running> {
    let ctx = DeviceContext::default();
    let server = Server::new(path, device, ctx, ServerConfig::default())?;
    let mut ev = EventLoop::new()?;
    ev.set_busy_poll(busy_poll);
    ev.add_server(server)?;
    let stop = ev.stop_handle();
    spawn_server("ours", Some(stop), move || ev.run().map_err(Into::into))
}

/// Starts the server for `target` listening at `path`.
fn start(target: Target, path: &Path) -> BenchResult<Running> {
    match target {
        Target::PingPong => {
            let listener = UnixListener::bind(path)?;
            spawn_server("ping-pong", None, move || ping_pong_server(listener))
        }
        Target::Ours => start_ours(
            path,
            Box::new(OurDevice(Regions::new())),
            std::time::Duration::ZERO,
        ),
        Target::OursBusyPoll => start_ours(
            path,
            Box::new(OurDevice(Regions::new())),
            std::time::Duration::from_micros(50),
        ),
        Target::OursCompat => {
            let dev = RustVmmBackend::new(
                TrivialBackend(Regions::new()),
                true,
                rust_vmm_irqs(),
                rust_vmm_regions(),
            );
            start_ours(path, Box::new(dev), std::time::Duration::ZERO)
        }
        Target::RustVmm => {
            let server = vfio_user::Server::new(path, true, rust_vmm_irqs(), rust_vmm_regions())
                .map_err(|e| format!("vfio_user::Server::new: {e}"))?;
            spawn_server("rust-vmm", None, move || {
                let mut backend = TrivialBackend(Regions::new());
                server
                    .run(&mut backend)
                    .map_err(|e| format!("vfio_user::Server::run: {e}").into())
            })
        }
    }
}

/// The ping-pong server: blocking-reads each 32-byte request and writes
/// the 32-byte reply head and the data in one `write`, until EOF.
fn ping_pong_server(listener: UnixListener) -> BenchResult<()> {
    let (mut stream, _) = listener.accept()?;
    let mut regions = Regions::new();
    let mut req = [0u8; ACCESS_SIZE];
    let mut reply = vec![0u8; ACCESS_SIZE + BAR0_SIZE];
    loop {
        match stream.read_exact(&mut req) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let offset = u64::from_le_bytes(req[16..24].try_into()?);
        let count = u32::from_le_bytes(req[24..28].try_into()?) as usize;
        let region = u32::from_le_bytes(req[28..32].try_into()?);
        let len = ACCESS_SIZE + count;
        if len > reply.len() {
            return Err("request larger than BAR0".into());
        }
        // Header: id and command echoed, size, reply flag, no error; then
        // the access echoed and the data.
        reply[0..4].copy_from_slice(&req[0..4]);
        reply[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        reply[8..12].copy_from_slice(&FLAG_REPLY.to_le_bytes());
        reply[12..16].fill(0);
        reply[16..ACCESS_SIZE].copy_from_slice(&req[16..ACCESS_SIZE]);
        regions
            .read(region, offset, &mut reply[ACCESS_SIZE..len])
            .ok_or("read out of range")?;
        stream.write_all(&reply[..len])?;
    }
}

/// A client issuing REGION_READs of region 0 at offset 0.
enum Client {
    /// The raw client for the ping-pong server.
    Raw {
        /// The connection.
        stream: UnixStream,
        /// Next message id.
        id: u16,
    },
    /// The published rust-vmm client.
    VfioUser(Box<vfio_user::Client>),
}

impl Client {
    /// Connects to the server of `target` at `path`.
    fn connect(target: Target, path: &Path) -> BenchResult<Client> {
        Ok(match target {
            Target::PingPong => Client::Raw {
                stream: UnixStream::connect(path)?,
                id: 0,
            },
            _ => Client::VfioUser(Box::new(
                vfio_user::Client::new(path).map_err(|e| format!("vfio_user::Client::new: {e}"))?,
            )),
        })
    }

    /// Reads `data.len()` bytes at offset 0 of BAR0.
    #[inline]
    fn region_read(&mut self, data: &mut [u8]) -> BenchResult<()> {
        match self {
            Client::Raw { stream, id } => {
                // The same three syscalls as vfio_user::Client::region_read.
                let mut req = [0u8; ACCESS_SIZE];
                req[0..2].copy_from_slice(&id.to_le_bytes());
                req[2..4].copy_from_slice(&CMD_REGION_READ.to_le_bytes());
                req[4..8].copy_from_slice(&(ACCESS_SIZE as u32).to_le_bytes());
                // flags, error, offset: 0
                req[24..28].copy_from_slice(&(data.len() as u32).to_le_bytes());
                // region: 0
                *id = id.wrapping_add(1);
                stream.write_all(&req)?;
                let mut head = [0u8; ACCESS_SIZE];
                stream.read_exact(&mut head)?;
                stream.read_exact(data)?;
                Ok(())
            }
            Client::VfioUser(c) => c
                .region_read(0, 0, data)
                .map_err(|e| format!("region_read: {e}").into()),
        }
    }
}

/// Latency statistics of one measurement.
struct Stats {
    /// Server measured.
    target: Target,
    /// Bytes read per round trip.
    size: usize,
    /// Round trips timed.
    iters: usize,
    /// Wall time of all round trips / `iters`.
    mean: Duration,
    /// Median round trip.
    p50: Duration,
    /// 99th percentile round trip.
    p99: Duration,
    /// CPU time (user and system) of the server thread per round trip.
    server_cpu: Duration,
    /// CPU time of the client thread per round trip.
    client_cpu: Duration,
}

impl Stats {
    /// Round trips per second.
    fn ops_per_sec(&self) -> f64 {
        1.0 / self.mean.as_secs_f64()
    }
}

/// Samples collected for one server and size.
struct Samples {
    /// Server measured.
    target: Target,
    /// Bytes read per round trip.
    size: usize,
    /// Each timed round trip, in nanoseconds.
    nanos: Vec<u32>,
    /// Wall time of all timed round trips.
    total: Duration,
    /// CPU time of the server thread during the timed round trips.
    server_cpu: Duration,
    /// CPU time of the client (this) thread during the timed round trips.
    client_cpu: Duration,
}

impl Samples {
    /// Checks the data once, then times `iters` reads after `warmup`
    /// untimed ones, appending to the samples. `server_tid` is the server
    /// thread, whose CPU time is accounted too.
    fn run(
        &mut self,
        client: &mut Client,
        server_tid: i32,
        warmup: usize,
        iters: usize,
    ) -> BenchResult<()> {
        let mut buf = vec![0u8; self.size];
        client.region_read(&mut buf)?;
        if buf[..] != pattern(self.size)[..] {
            return Err(format!("{}: wrong data read", self.target.name()).into());
        }
        for _ in 0..warmup {
            client.region_read(&mut buf)?;
        }
        // SAFETY: gettid has no preconditions.
        let client_tid = unsafe { libc::gettid() };
        let cpu_before = thread_cpu(server_tid);
        let client_before = thread_cpu(client_tid);
        let start = Instant::now();
        let mut prev = start;
        for _ in 0..iters {
            client.region_read(&mut buf)?;
            let now = Instant::now();
            self.nanos
                .push(u32::try_from((now - prev).as_nanos()).unwrap_or(u32::MAX));
            prev = now;
        }
        self.total += prev - start;
        self.client_cpu += thread_cpu(client_tid).saturating_sub(client_before);
        self.server_cpu += thread_cpu(server_tid).saturating_sub(cpu_before);
        Ok(())
    }

    /// The statistics of everything collected.
    fn stats(mut self) -> Stats {
        self.nanos.sort_unstable();
        let n = self.nanos.len();
        let pct = |p: usize| Duration::from_nanos(u64::from(self.nanos[(n - 1) * p / 100]));
        Stats {
            target: self.target,
            size: self.size,
            iters: n,
            mean: self.total / n as u32,
            p50: pct(50),
            p99: pct(99),
            server_cpu: self.server_cpu / n as u32,
            client_cpu: self.client_cpu / n as u32,
        }
    }
}

/// Command-line options.
struct Options {
    /// Timed 4-byte reads per server.
    iters_small: usize,
    /// Timed 4 KiB reads per server.
    iters_large: usize,
    /// Untimed reads per server and size before timing.
    warmup: usize,
    /// Rounds the iterations are split into; each round times every
    /// server in turn, so slow drifts of the machine hit all alike.
    rounds: usize,
    /// Stop after the round that makes the run likely to exceed this.
    budget: Duration,
    /// Skip `ours + compat`.
    skip_compat: bool,
    /// Measure only these servers (all when empty).
    only: Vec<Target>,
}

/// The usage text.
const USAGE: &str = "usage: vfio-user-bench [--iters N] [--iters-4k N] [--warmup N] [--rounds N]
                       [--budget SECONDS] [--no-compat] [--only LIST]
  --iters N     timed 4-byte REGION_READs per server (default 200000)
  --iters-4k N  timed 4 KiB REGION_READs per server (default 50000)
  --warmup N    untimed reads per server and size, spread over the rounds (default 10000)
  --rounds N    interleave the servers in N rounds (default 20)
  --budget S    skip the remaining rounds when the next one would end after S seconds
                (default 50; the table shows the iterations actually timed)
  --no-compat   skip our server running the ServerBackend through compat
  --only LIST   measure only these servers, comma-separated: ping-pong,ours,rust-vmm,compat
                (for profiling one server)";

/// Parses the command line.
fn parse_args() -> BenchResult<Options> {
    let mut o = Options {
        iters_small: 200_000,
        iters_large: 50_000,
        warmup: 10_000,
        rounds: 20,
        budget: Duration::from_secs(50),
        skip_compat: false,
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || -> BenchResult<usize> {
            let v = args.next().ok_or_else(|| format!("{a} needs a value"))?;
            let n: usize = v.parse().map_err(|_| format!("bad number {v}"))?;
            if n == 0 {
                return Err(format!("{a} must be positive").into());
            }
            Ok(n)
        };
        match a.as_str() {
            "--iters" => o.iters_small = num()?,
            "--iters-4k" => o.iters_large = num()?,
            "--warmup" => o.warmup = num()?,
            "--rounds" => o.rounds = num()?,
            "--budget" => o.budget = Duration::from_secs(num()? as u64),
            "--no-compat" => o.skip_compat = true,
            "--only" => {
                let v = args.next().ok_or("--only needs a value")?;
                for name in v.split(',') {
                    o.only.push(Target::from_arg(name)?);
                }
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

fn main() -> BenchResult<()> {
    let opts = parse_args()?;
    let dir =
        TempPath(std::env::temp_dir().join(format!("vfio-user-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;

    let targets: Vec<Target> = Target::ALL
        .into_iter()
        .filter(|t| opts.only.is_empty() || opts.only.contains(t))
        .filter(|&t| !(opts.skip_compat && t == Target::OursCompat))
        .collect();
    if targets.is_empty() {
        return Err("no server selected".into());
    }
    let sizes = [(4usize, opts.iters_small), (4096usize, opts.iters_large)];

    let began = Instant::now();
    let load_before = CpuTimes::now();
    // Every server runs (idle when not measured) for the whole run.
    let mut running = Vec::new();
    let mut clients = Vec::new();
    for (i, &target) in targets.iter().enumerate() {
        let path = dir.0.join(format!("{i}.sock"));
        running.push(start(target, &path)?);
        clients.push(Client::connect(target, &path)?);
    }
    let mut samples: Vec<Samples> = sizes
        .iter()
        .flat_map(|&(size, iters)| {
            targets.iter().map(move |&target| Samples {
                target,
                size,
                nanos: Vec::with_capacity(iters),
                total: Duration::ZERO,
                server_cpu: Duration::ZERO,
                client_cpu: Duration::ZERO,
            })
        })
        .collect();
    let rounds = opts.rounds;
    let warmup = opts.warmup.div_ceil(rounds);
    let mut done = 0;
    for round in 0..rounds {
        let spent = began.elapsed();
        if round > 0 && spent + spent / round as u32 > opts.budget {
            break;
        }
        done += 1;
        for (s, &(_, iters)) in sizes.iter().enumerate() {
            // This round's share of the iterations.
            let chunk = iters * (round + 1) / rounds - iters * round / rounds;
            // Rotate the order so no server always goes first.
            for k in 0..targets.len() {
                let t = (k + round) % targets.len();
                samples[s * targets.len() + t].run(
                    &mut clients[t],
                    running[t].tid,
                    warmup,
                    chunk,
                )?;
            }
        }
    }
    drop(clients);
    for r in running {
        r.finish()?;
    }
    let results: Vec<Stats> = samples.into_iter().map(Samples::stats).collect();
    let elapsed = began.elapsed();
    let others = load_before.and_then(|b| Some(CpuTimes::now()?.others_since(&b, elapsed)));

    let ncpu = online_cpus();
    println!(
        "REGION_READ round trip, {} CPUs, {}, {} of {} rounds, {} warm-up reads per case, \
         total {:.1} s, other processes used {} CPUs meanwhile\n",
        ncpu,
        cpu_model(),
        done,
        rounds,
        warmup * done,
        elapsed.as_secs_f64(),
        others.map_or("?".into(), |o| format!("{o:.2}")),
    );
    println!(
        "| server | bytes | iterations | mean µs | p50 µs | p99 µs | ops/s | mean / ping-pong \
         | server CPU µs/op | client CPU µs/op |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let find = |t: Target, size: usize| results.iter().find(|s| s.target == t && s.size == size);
    for s in &results {
        let vs_limit = find(Target::PingPong, s.size).map_or("-".into(), |b| {
            format!("{:.2}x", s.mean.as_secs_f64() / b.mean.as_secs_f64())
        });
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} |",
            s.target.name(),
            s.size,
            s.iters,
            us(s.mean),
            us(s.p50),
            us(s.p99),
            s.ops_per_sec(),
            vs_limit,
            us(s.server_cpu),
            us(s.client_cpu)
        );
    }
    println!();
    println!("| ratio (mean, p50) | 4 B | 4 KiB |");
    println!("|---|---:|---:|");
    let ratio = |a: Target, b: Target| -> String {
        sizes
            .iter()
            .map(|&(size, _)| match (find(a, size), find(b, size)) {
                (Some(x), Some(y)) => format!(
                    "{:.2}x, {:.2}x",
                    x.mean.as_secs_f64() / y.mean.as_secs_f64(),
                    x.p50.as_secs_f64() / y.p50.as_secs_f64()
                ),
                _ => "-".into(),
            })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!(
        "| ours / ping-pong | {} |",
        ratio(Target::Ours, Target::PingPong)
    );
    println!(
        "| ours / rust-vmm | {} |",
        ratio(Target::Ours, Target::RustVmm)
    );
    if targets.contains(&Target::OursCompat) {
        println!(
            "| ours+compat / rust-vmm | {} |",
            ratio(Target::OursCompat, Target::RustVmm)
        );
    }
    if targets.contains(&Target::OursBusyPoll) {
        println!(
            "| ours busy-poll / ping-pong | {} |",
            ratio(Target::OursBusyPoll, Target::PingPong)
        );
        println!(
            "| ours busy-poll / rust-vmm | {} |",
            ratio(Target::OursBusyPoll, Target::RustVmm)
        );
    }
    Ok(())
}
