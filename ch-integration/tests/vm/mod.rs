//! Support for the tests that boot a real QEMU + Linux guest
//! (`ch-integration/vmm-env`) against the `vfio-user-device` daemon.
//!
//! * [`env`]: runs `vmm-env/setup.sh` once per test binary; decides skips.
//! * [`Vm`]: one `run-qemu.sh` process (its PID is QEMU's), with the serial
//!   console collected line by line, a hard deadline, and SIGKILL on drop.
//!   At most [`MAX_VMS`] run at once in a test binary.
//! * [`Markers`]: the guest's `VMTEST-*` console protocol.
//! * [`Daemon`]: the daemon under test, logging at debug level to a file.
//! * [`qmp`]: a QMP client.
#![allow(dead_code)]

pub mod qmp;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `vmm-env/setup.sh` and `run-qemu.sh`.
pub const SETUP_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/vmm-env/setup.sh");
pub const RUN_QEMU_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/vmm-env/run-qemu.sh");
/// The daemon binary.
pub const DAEMON: &str = env!("CARGO_BIN_EXE_vfio-user-device");

/// Most VMs running at once in one test binary (each takes a core under TCG).
pub const MAX_VMS: usize = 2;
/// Limit for a from-scratch `setup.sh` (70 to 160 s measured).
const SETUP_TIMEOUT: Duration = Duration::from_secs(900);
/// `setup.sh`'s "archive unreachable, skip" exit code.
const SETUP_EXIT_UNREACHABLE: i32 = 3;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// the environment

enum Setup {
    Ready(PathBuf),
    Skip(String),
}

static ENV: OnceLock<Result<Setup, String>> = OnceLock::new();

/// The vmm-env directory, building it on first use. `None` (after printing
/// `SKIP vm tests: <reason>` on stderr) when the tests cannot run here: not
/// root, or the Debian archive is unreachable. Any other setup failure
/// panics: it is breakage, not an environment limit.
pub fn env() -> Option<PathBuf> {
    match ENV.get_or_init(setup) {
        Ok(Setup::Ready(p)) => Some(p.clone()),
        Ok(Setup::Skip(why)) => {
            eprintln!("SKIP vm tests: {why}");
            None
        }
        Err(e) => panic!("vmm-env setup failed: {e}"),
    }
}

fn setup() -> Result<Setup, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(Setup::Skip(
            "not running as root (the VM environment needs debootstrap, chroot and mount namespaces)"
                .into(),
        ));
    }
    let mut child = Command::new("bash")
        .arg(SETUP_SH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {SETUP_SH}: {e}"))?;
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{SETUP_SH} did not finish within {SETUP_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    match status.code() {
        Some(0) => {
            let dir = out.lines().last().unwrap_or("").trim();
            let dir = PathBuf::from(dir);
            if !dir.join(".complete").is_file() {
                return Err(format!(
                    "setup.sh succeeded but its last stdout line {dir:?} is not a complete env\nstderr:\n{err}"
                ));
            }
            Ok(Setup::Ready(dir))
        }
        Some(SETUP_EXIT_UNREACHABLE) => Ok(Setup::Skip(format!(
            "setup.sh: Debian package archive unreachable ({})",
            err.lines().last().unwrap_or("").trim()
        ))),
        _ => Err(format!("{SETUP_SH} failed ({status}); stderr:\n{err}")),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = r.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    })
}

// ---------------------------------------------------------------------------
// VM slots

static SLOTS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// One of the [`MAX_VMS`] slots, released on drop.
struct VmSlot;

impl VmSlot {
    fn acquire() -> VmSlot {
        let mut used = lock(&SLOTS.0);
        while *used >= MAX_VMS {
            used = SLOTS.1.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        VmSlot
    }
}

impl Drop for VmSlot {
    fn drop(&mut self) {
        *lock(&SLOTS.0) -= 1;
        SLOTS.1.notify_one();
    }
}

// ---------------------------------------------------------------------------
// one VM

/// What to boot.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// The guest test (`/tests/NAME.sh`).
    pub test: String,
    /// `vt.KEY=VALUE` parameters.
    pub params: Vec<(String, String)>,
    /// Other kernel parameters (e.g. `pci=nomsi`).
    pub kernel_params: Vec<String>,
    /// Extra QEMU arguments.
    pub args: Vec<String>,
    /// Let the guest reboot (no `-no-reboot`).
    pub reboot: bool,
    /// Boot the initramfs that holds fio (`VMTEST_FIO=1`).
    pub fio: bool,
    /// Hard limit for the whole VM run; QEMU is killed after it.
    pub timeout: Duration,
}

/// The QEMU JSON `-device` / `device_add` object for a vfio-user-pci device.
pub fn vfio_user_device(socket: &Path, id: &str, bus: Option<&str>) -> qmp::Json {
    use qmp::Json;
    let mut m = vec![
        ("driver", Json::str("vfio-user-pci")),
        (
            "socket",
            Json::obj([
                ("type", Json::str("unix")),
                (
                    "path",
                    Json::str(socket.to_str().expect("UTF-8 socket path")),
                ),
            ]),
        ),
        ("id", Json::str(id)),
    ];
    if let Some(b) = bus {
        m.push(("bus", Json::str(b)));
    }
    Json::obj(m)
}

/// A storage device hot-plugged by [`hotplug_and_unplug`], and what the
/// guest must find.
pub struct Hotplug<'a> {
    /// The test, for the log.
    pub test: &'a str,
    /// The device's PCI vendor and device ID.
    pub ids: (u16, u16),
    /// The guest's name of the disk starts with this (`vd`, `sd`).
    pub disk_prefix: &'a str,
    /// The image served, and its bytes before the guest ran.
    pub image: &'a Path,
    pub original: &'a [u8],
    /// Where and how much the guest writes.
    pub write: (usize, usize),
    /// Whether the guest writes with O_DIRECT.
    pub odirect: bool,
}

/// Boots a guest with an empty PCIe root port, plugs `daemon`'s device
/// into it with QMP `device_add` once the guest waits for a disk (a real
/// hot-plug: neither QEMU nor the daemon saw the device before, and QEMU
/// attaches once, at the plug), checks the guest's
/// I/O on the disk (the `hotplug` script: a read, then random bytes written
/// and read back) and that the image holds the write and nothing else
/// changed, then unplugs it ([`unplug_and_finish`]). `dir` holds the QMP
/// socket.
pub fn hotplug_and_unplug(env: &Path, dir: &Path, daemon: &Daemon, h: &Hotplug<'_>) {
    use qmp::{find_pci_device, Json, Qmp};
    let t = Duration::from_secs;
    let qmp_sock = dir.join("qmp.sock");
    let (w_off, w_len) = h.write;
    let spec = VmSpec::new("hotplug")
        .param("pattern", "random")
        .param("offset", w_off)
        .param("count", w_len)
        .param("odirect", u8::from(h.odirect))
        .param("plug_wait", 150)
        .param("unplug_wait", 60)
        .arg("-device")
        .arg("pcie-root-port,id=rp0,chassis=1")
        .qmp(&qmp_sock);
    let vm = Vm::start(env, spec);
    let mut qmp = Qmp::connect(&qmp_sock, t(30)).expect("QMP connect");
    let pci = qmp.execute("query-pci", None).expect("query-pci");
    assert!(find_pci_device(&pci, "vfu0").is_none());
    assert!(
        find_pci_device(&pci, "rp0").is_some(),
        "no root port: {pci}"
    );
    if vm.wait_result("waiting_for_disk", t(150)).is_none() {
        panic!("guest never got ready\n{}", vm.kill_and_collect().report());
    }
    assert_eq!(daemon.log_count("client attached"), 0);
    let dev = vfio_user_device(&daemon.socket, "vfu0", Some("rp0"));
    if let Err(e) = qmp.execute("device_add", Some(dev)) {
        panic!("device_add: {e}\n{}", vm.kill_and_collect().report());
    }
    let pci = qmp.execute("query-pci", None).expect("query-pci");
    let d = find_pci_device(&pci, "vfu0").unwrap_or_else(|| panic!("vfu0 not in query-pci: {pci}"));
    let id = d.get("id").expect("id");
    assert_eq!(
        id.get("vendor").and_then(Json::as_i64),
        Some(i64::from(h.ids.0)),
        "{d}"
    );
    assert_eq!(
        id.get("device").and_then(Json::as_i64),
        Some(i64::from(h.ids.1)),
        "{d}"
    );
    assert_eq!(daemon.log_count("client attached"), 1);

    // The guest found the disk and did its I/O.
    if vm.wait_result("waiting_for_unplug", t(150)).is_none() {
        panic!(
            "guest did not finish its I/O\n{}",
            vm.kill_and_collect().report()
        );
    }
    let console = Markers::parse(&vm.console());
    let get = |k: &str| console.get(k).unwrap_or("<missing>").to_string();
    assert!(get("plugged").starts_with(h.disk_prefix), "{console:?}");
    let pci_id = format!(" {:04X}:{:04X}", h.ids.0, h.ids.1);
    assert!(
        console.all("pci").iter().any(|p| p.ends_with(&pci_id)),
        "{console:?}"
    );
    assert_eq!(get("blk_rc"), "0", "{console:?}");
    assert_eq!(get("size_sectors"), (h.original.len() / 512).to_string());
    assert_eq!(get("read_sha256"), sha256_hex(&h.original[..4096]));
    assert_eq!(get("readback_match"), "1", "{console:?}");
    let after = std::fs::read(h.image).expect("read image");
    assert_eq!(
        changed_only_at(h.original, &after, w_off, w_len),
        get("pattern_sha256")
    );
    unplug_and_finish(&mut qmp, vm, "vfu0", h.test);
}

/// Asserts `after` equals `before` except in `[off, off+len)`, and returns
/// the SHA-256 of that range of `after`.
pub fn changed_only_at(before: &[u8], after: &[u8], off: usize, len: usize) -> String {
    assert_eq!(before.len(), after.len(), "image size changed");
    assert!(
        before[..off] == after[..off] && before[off + len..] == after[off + len..],
        "image changed outside the guest's write at {off}+{len}"
    );
    sha256_hex(&after[off..off + len])
}

/// QEMU 11.1.3 aborts when a vfio-user-pci device with MSI-X is finalized
/// (hot-unplug): `vfio_user_msix_teardown()` removes the PBA region from a
/// BAR that QOM has already torn down. Upstream patch: "vfio-user: do not
/// remove the PBA region" (qemu-devel, Oct 2025). Not in Debian's 11.1.3.
pub const QEMU_UNPLUG_ABORT: &str =
    "memory_region_del_subregion: Assertion `subregion->container == mr' failed";

/// Unplugs device `id` with QMP `device_del` and lets the guest finish: it
/// must see the device go (its `unplugged` marker) and QEMU no longer list
/// it, unless QEMU died of [`QEMU_UNPLUG_ABORT`] (said in a NOTE line
/// naming `test`).
pub fn unplug_and_finish(qmp: &mut qmp::Qmp, mut vm: Vm, id: &str, test: &str) {
    use qmp::Json;
    let t = Duration::from_secs;
    qmp.execute("device_del", Some(Json::obj([("id", Json::str(id))])))
        .expect("device_del");
    let deleted = qmp.wait_event(
        "DEVICE_DELETED",
        |e| {
            e.get("data")
                .and_then(|d| d.get("device"))
                .and_then(Json::as_str)
                == Some(id)
        },
        t(60),
    );
    match deleted {
        Ok(ev) => {
            eprintln!("{test}: {ev}");
            let pci = qmp.execute("query-pci", None).expect("query-pci");
            assert!(
                qmp::find_pci_device(&pci, id).is_none(),
                "{id} still present: {pci}"
            );
            let run = vm.finish();
            run.assert_passed();
            run.expect("unplugged", "1");
        }
        Err(e) => {
            // Without the event, QEMU must have died of the known bug.
            let exited = vm.wait_exit(t(10)).is_some();
            let run = vm.kill_and_collect();
            assert!(
                exited && run.stderr_has(QEMU_UNPLUG_ABORT),
                "no DEVICE_DELETED ({e}) and not the known QEMU abort\nQMP:\n{}\n{}",
                qmp.transcript.join("\n"),
                run.report()
            );
            eprintln!(
                "{test}: NOTE: known QEMU 11.1 bug: device_del aborted QEMU ({}): {}; \
                 guest printed unplugged={}",
                run.status_text(),
                QEMU_UNPLUG_ABORT,
                run.markers.get("unplugged").unwrap_or("<nothing>")
            );
        }
    }
}

impl VmSpec {
    pub fn new(test: &str) -> VmSpec {
        VmSpec {
            test: test.into(),
            params: Vec::new(),
            kernel_params: Vec::new(),
            args: Vec::new(),
            reboot: false,
            fio: false,
            timeout: Duration::from_secs(240),
        }
    }

    /// Adds the guest parameter `vt.KEY=VALUE`.
    pub fn param(mut self, key: &str, value: impl ToString) -> VmSpec {
        self.params.push((key.into(), value.to_string()));
        self
    }

    /// Adds the kernel parameter `p` as it is.
    pub fn kernel_param(mut self, p: impl Into<String>) -> VmSpec {
        self.kernel_params.push(p.into());
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> VmSpec {
        self.args.push(a.into());
        self
    }

    /// `-device '{"driver":"vfio-user-pci",...}'` on `socket`.
    pub fn vfio_user(self, socket: &Path, id: &str) -> VmSpec {
        self.arg("-device")
            .arg(vfio_user_device(socket, id, None).to_string())
    }

    /// A QMP server on `socket`.
    pub fn qmp(self, socket: &Path) -> VmSpec {
        self.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
    }

    /// Boots the initramfs that also holds fio (larger: only for the tests
    /// that run it).
    pub fn with_fio(mut self) -> VmSpec {
        self.fio = true;
        self
    }

    pub fn allow_reboot(mut self) -> VmSpec {
        self.reboot = true;
        self
    }

    pub fn timeout(mut self, t: Duration) -> VmSpec {
        self.timeout = t;
        self
    }

    /// The kernel command line tail (`VMTEST_APPEND`).
    pub fn append(&self) -> String {
        let mut s = format!("vmtest={}", self.test);
        // The guest's own watchdog, a little below ours.
        if !self.params.iter().any(|(k, _)| k == "timeout") {
            let secs = self.timeout.as_secs().saturating_sub(30).max(30);
            s.push_str(&format!(" vt.timeout={secs}"));
        }
        for (k, v) in &self.params {
            s.push_str(&format!(" vt.{k}={v}"));
        }
        for p in &self.kernel_params {
            s.push(' ');
            s.push_str(p);
        }
        s
    }
}

#[derive(Default)]
struct Console {
    lines: Vec<String>,
    eof: bool,
}

/// QEMU's stderr: the first lines and the count (it can flood).
#[derive(Default)]
struct Stderr {
    head: Vec<String>,
    total: usize,
}

const STDERR_KEPT: usize = 500;

/// A running VM. Killed (SIGKILL) on drop.
pub struct Vm {
    child: Child,
    console: Arc<(Mutex<Console>, Condvar)>,
    stderr: Arc<Mutex<Stderr>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    deadline: Instant,
    status: Option<ExitStatus>,
    spec: VmSpec,
    _slot: VmSlot,
}

impl Vm {
    /// Boots `spec` with the env's QEMU (waits for a free slot first).
    pub fn start(env: &Path, spec: VmSpec) -> Vm {
        let slot = VmSlot::acquire();
        let mut cmd = Command::new("bash");
        cmd.arg(RUN_QEMU_SH)
            .arg(env)
            .arg("--")
            .args(&spec.args)
            .env("VMTEST_APPEND", spec.append())
            .env("VMTEST_NO_REBOOT", if spec.reboot { "0" } else { "1" })
            .env("VMTEST_FIO", if spec.fio { "1" } else { "0" })
            .env_remove("VMTEST_DRY_RUN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn run-qemu.sh");
        let console: Arc<(Mutex<Console>, Condvar)> = Arc::default();
        let stderr: Arc<Mutex<Stderr>> = Arc::default();
        let out = child.stdout.take().unwrap();
        let c = console.clone();
        let r1 = std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let s = String::from_utf8_lossy(&line);
                        let s = s.trim_end_matches(['\n', '\r']).to_string();
                        lock(&c.0).lines.push(s);
                        c.1.notify_all();
                    }
                }
            }
            lock(&c.0).eof = true;
            c.1.notify_all();
        });
        let err = child.stderr.take().unwrap();
        let e = stderr.clone();
        let r2 = std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let mut e = lock(&e);
                        e.total += 1;
                        if e.head.len() < STDERR_KEPT {
                            let s = String::from_utf8_lossy(&line);
                            e.head.push(s.trim_end().to_string());
                        }
                    }
                }
            }
        });
        let now = Instant::now();
        Vm {
            child,
            console,
            stderr,
            readers: vec![r1, r2],
            started: now,
            deadline: now + spec.timeout,
            status: None,
            spec,
            _slot: slot,
        }
    }

    /// QEMU's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time left before the hard deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Waits until a console line satisfies `pred` (earlier lines count),
    /// at most `timeout` (and never past the VM's deadline). `None` when
    /// the time is up or QEMU closed its console first.
    pub fn wait_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let end = (Instant::now() + timeout).min(self.deadline);
        let (m, cv) = &*self.console;
        let mut c = lock(m);
        let mut seen = 0;
        loop {
            if let Some(l) = c.lines[seen..].iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            seen = c.lines.len();
            let now = Instant::now();
            if c.eof || now >= end {
                return None;
            }
            c = cv
                .wait_timeout(c, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for `VMTEST-RESULT KEY=...` and returns the value.
    pub fn wait_result(&self, key: &str, timeout: Duration) -> Option<String> {
        let prefix = format!("VMTEST-RESULT {key}=");
        self.wait_line(|l| l.starts_with(&prefix), timeout)
            .map(|l| l[prefix.len()..].to_string())
    }

    /// Whether QEMU still runs.
    pub fn is_running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(s)) => {
                self.status = Some(s);
                false
            }
            _ => true,
        }
    }

    /// Waits for QEMU to exit, at most `timeout` (and the deadline).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = (Instant::now() + timeout).min(self.deadline);
        while self.is_running() {
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.status
    }

    /// SIGKILLs QEMU (if still running) and reaps it.
    pub fn kill(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    pub fn console(&self) -> Vec<String> {
        lock(&self.console.0).lines.clone()
    }

    /// The first (at most 500) lines of QEMU's stderr, and how many there were.
    pub fn stderr(&self) -> (Vec<String>, usize) {
        let e = lock(&self.stderr);
        (e.head.clone(), e.total)
    }

    /// Waits for QEMU to exit by itself until the deadline (then kills it),
    /// and returns what happened.
    pub fn finish(mut self) -> VmRun {
        let status = self.wait_exit(self.remaining());
        let timed_out = status.is_none();
        self.kill();
        self.collect(timed_out)
    }

    /// Kills QEMU now and returns what happened so far.
    pub fn kill_and_collect(mut self) -> VmRun {
        self.kill();
        self.collect(false)
    }

    fn collect(&mut self, timed_out: bool) -> VmRun {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let console = self.console();
        let (stderr, stderr_total) = self.stderr();
        VmRun {
            markers: Markers::parse(&console),
            status: self.status,
            timed_out,
            console,
            stderr,
            stderr_total,
            elapsed: self.started.elapsed(),
            append: self.spec.append(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The guest's `VMTEST-*` markers.
#[derive(Clone, Debug, Default)]
pub struct Markers {
    /// `VMTEST-RESULT key=value`, in order (keys may repeat).
    pub results: Vec<(String, String)>,
    /// Every `VMTEST-DONE rc=N`.
    pub done: Vec<i32>,
    /// Every `VMTEST-ERROR ...`.
    pub errors: Vec<String>,
    /// Every `VMTEST-START test=NAME`.
    pub starts: Vec<String>,
}

impl Markers {
    pub fn parse(lines: &[String]) -> Markers {
        let mut m = Markers::default();
        for l in lines {
            if let Some(r) = l.strip_prefix("VMTEST-RESULT ") {
                let (k, v) = r.split_once('=').unwrap_or((r, ""));
                m.results.push((k.to_string(), v.to_string()));
            } else if let Some(r) = l.strip_prefix("VMTEST-DONE rc=") {
                m.done.push(r.trim().parse().unwrap_or(-1));
            } else if let Some(r) = l.strip_prefix("VMTEST-ERROR ") {
                m.errors.push(r.to_string());
            } else if let Some(r) = l.strip_prefix("VMTEST-START test=") {
                m.starts.push(r.to_string());
            }
        }
        m
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.results
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.results
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A finished VM.
pub struct VmRun {
    /// QEMU's exit status (`None`: could not be reaped).
    pub status: Option<ExitStatus>,
    /// QEMU was killed at the deadline.
    pub timed_out: bool,
    pub console: Vec<String>,
    pub stderr: Vec<String>,
    pub stderr_total: usize,
    pub markers: Markers,
    pub elapsed: Duration,
    pub append: String,
}

impl VmRun {
    /// A summary for failure messages: status, markers, the console's
    /// last lines and QEMU's first stderr lines.
    pub fn report(&self) -> String {
        let mut s = format!(
            "--- VM run ({}) after {:.1}s: status {:?}{}, DONE {:?}\n",
            self.append,
            self.elapsed.as_secs_f64(),
            self.status,
            if self.timed_out {
                " (KILLED AT DEADLINE)"
            } else {
                ""
            },
            self.markers.done
        );
        s.push_str("--- console (last 60 lines):\n");
        let from = self.console.len().saturating_sub(60);
        for l in &self.console[from..] {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(&format!(
            "--- QEMU stderr ({} lines, first 30):\n",
            self.stderr_total
        ));
        for l in self.stderr.iter().take(30) {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// The value of result `key`; panics (with the report) if missing.
    pub fn result(&self, key: &str) -> &str {
        match self.markers.get(key) {
            Some(v) => v,
            None => panic!("guest printed no result {key}\n{}", self.report()),
        }
    }

    /// Asserts that each fio job of `jobs` reported more than 0 IOPS.
    pub fn expect_fio_jobs(&self, jobs: &[&str]) {
        for job in jobs {
            let r = self.result(&format!("job_{job}"));
            let iops: f64 = r
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            assert!(iops > 0.0, "{job}: {r}\n{}", self.report());
        }
    }

    /// Asserts result `key` equals `want`.
    pub fn expect(&self, key: &str, want: &str) {
        let got = self.result(key);
        assert_eq!(got, want, "result {key}\n{}", self.report());
    }

    /// Asserts a clean guest run: one `VMTEST-DONE rc=0`, no errors, QEMU
    /// exited by itself with status 0.
    pub fn assert_passed(&self) {
        assert!(
            !self.timed_out && self.markers.done == [0] && self.markers.errors.is_empty(),
            "guest test failed\n{}",
            self.report()
        );
        assert_eq!(
            self.status.and_then(|s| s.code()),
            Some(0),
            "QEMU exit status\n{}",
            self.report()
        );
    }

    /// QEMU's stderr (the kept part) has a line containing `needle`.
    pub fn stderr_has(&self, needle: &str) -> bool {
        self.stderr.iter().any(|l| l.contains(needle))
    }

    /// `exit N` or `signal N`.
    pub fn status_text(&self) -> String {
        match self.status {
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit {c}"),
                (_, Some(sig)) => format!("signal {sig}"),
                _ => format!("{s}"),
            },
            None => "unknown".into(),
        }
    }
}

// ---------------------------------------------------------------------------
// the daemon

/// `vfio-user-device KIND --socket DIR/vfu.sock ARGS...` (virtio-blk
/// unless told), with `RUST_LOG=debug` and its stderr appended to
/// `DIR/daemon.log`. Killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    /// What runs the daemon (e.g. `ip netns exec NS`), if anything.
    launcher: Vec<String>,
    kind: String,
    args: Vec<String>,
    status: Option<ExitStatus>,
}

impl Daemon {
    pub fn start(dir: &Path, args: &[&str]) -> Daemon {
        Self::start_kind(dir, &[], "virtio-blk", args)
    }

    /// Starts device kind `kind` through `launcher` (a command that execs
    /// its arguments, so the daemon keeps its PID).
    pub fn start_kind(dir: &Path, launcher: &[&str], kind: &str, args: &[&str]) -> Daemon {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let mut d = Daemon {
            child: None,
            socket: dir.join("vfu.sock"),
            log_path: dir.join("daemon.log"),
            launcher: owned(launcher),
            kind: kind.to_string(),
            args: owned(args),
            status: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("daemon log");
        let out = File::create(self.log_path.with_file_name("daemon.out")).expect("daemon.out");
        let mut cmd = match self.launcher.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(DAEMON);
                c
            }
            None => Command::new(DAEMON),
        };
        let mut child = cmd
            .arg(&self.kind)
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawn vfio-user-device");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The start-up text is printed once the socket listens (a stale
            // socket file from a killed daemon may exist before that).
            let serving = std::fs::read_to_string(self.log_path.with_file_name("daemon.out"))
                .is_ok_and(|o| o.contains("vfio-user-device: serving"));
            if serving
                && std::fs::symlink_metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket())
            {
                break;
            }
            if let Ok(Some(s)) = child.try_wait() {
                panic!("daemon exited at start ({s}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon socket never appeared; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
        self.status = None;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            None => false,
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                Ok(Some(s)) => {
                    self.status = Some(s);
                    self.child = None;
                    false
                }
                Err(_) => false,
            },
        }
    }

    /// Exit status once it has died.
    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// SIGKILL, as a crash would.
    pub fn sigkill(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("daemon not running");
        let _ = c.kill();
        let s = c.wait().expect("reap daemon");
        self.status = Some(s);
        s
    }

    /// SIGTERM, then waits (10 s at most) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("daemon not running");
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait().expect("try_wait") {
                self.status = Some(s);
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("daemon ignored SIGTERM for 10 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the daemon again on the same socket path; the socket file a
    /// killed daemon left behind is taken over by the new one.
    pub fn restart(&mut self) {
        assert!(!self.is_running(), "restart of a running daemon");
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The start-up line: what is served, and how its I/O runs.
    pub fn serving_line(&self) -> String {
        std::fs::read_to_string(self.log_path.with_file_name("daemon.out"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("vfio-user-device: serving"))
            .unwrap_or_default()
            .to_string()
    }

    /// Lines of the log containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits (`timeout` at most) until the log has `n` lines containing `needle`.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_count(needle) >= n {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Lines at WARN or ERROR level.
    pub fn log_problems(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(String::from)
            .collect()
    }

    /// Asserts the daemon runs and serves a new client: a
    /// `vfio_user::Client` connects (VERSION + region info) and reads the
    /// virtio-blk IDs from config space. Retries for 10 s, since the
    /// previous client's disconnect is handled asynchronously.
    pub fn assert_serves_new_client(&mut self) {
        assert!(
            self.is_running(),
            "daemon died ({:?}); log:\n{}",
            self.status,
            self.log()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = String::new();
        while Instant::now() < deadline {
            match vfio_user::Client::new(&self.socket) {
                Ok(mut c) => {
                    let mut id = [0u8; 4];
                    match c.region_read(7, 0, &mut id) {
                        Ok(()) => {
                            assert_eq!(
                                id,
                                pci_id(&self.kind),
                                "vendor/device ID read by a new client"
                            );
                            return;
                        }
                        Err(e) => last = format!("config read: {e:?}"),
                    }
                }
                Err(e) => last = format!("connect: {e:?}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "daemon does not serve a new client ({last}); log:\n{}",
            self.log()
        );
    }
}

/// `vfio-user-device api --api-socket API ARGS...`, which must succeed;
/// returns its JSON reply.
#[track_caller]
pub fn api(api_socket: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(DAEMON)
        .arg("api")
        .arg("--api-socket")
        .arg(api_socket)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run vfio-user-device api");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("bad api reply {text:?}: {e}"));
    assert!(
        out.status.success() && v["ok"] == true,
        "api {args:?} failed: {v}"
    );
    v
}

/// Vendor and device id (config space bytes 0..4) of a device kind.
fn pci_id(kind: &str) -> [u8; 4] {
    match kind {
        "virtio-net" => [0xf4, 0x1a, 0x41, 0x10],
        "megasas" => [0x00, 0x10, 0x60, 0x00],
        _ => [0xf4, 0x1a, 0x42, 0x10],
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// data helpers

/// `n` random bytes from /dev/urandom.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    b
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
