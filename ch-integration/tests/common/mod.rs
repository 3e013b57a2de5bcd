//! A test-side VMM: drives the daemon exactly as Cloud Hypervisor does,
//! through the published `vfio_user::Client`, with the virtio-pci driver of
//! `integration_tests::virtio_driver` (split virtqueues in a memfd that
//! plays guest RAM), re-exported here. This module adds the daemon process,
//! its `api` subcommand, the migration commands over the raw client
//! ([`mig`]) and the device state stream ([`stream`]).
// Each test binary uses a different part of this module and of the
// re-exported driver.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod netns;
pub mod small_fs;

pub use integration_tests::virtio_driver::*;
pub use integration_tests::{payload, proto, RawClient, Reply};
use vmm_sys_util::tempdir::TempDir;

/// The daemon process, killed on drop (and so are the processes that
/// took it over in upgrades).
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: TempDir,
    /// The device kind (subcommand).
    pub kind: &'static str,
    /// The pids of the daemons that took over from it, in order.
    pub successors: Vec<u32>,
}

impl Daemon {
    /// Starts `vfio-user-device` with `args` (after `virtio-blk --socket S`)
    /// and waits for its socket.
    pub fn start(args: &[&str]) -> Daemon {
        let dir = TempDir::new().expect("tempdir");
        Self::start_in(dir, args)
    }

    pub fn start_in(dir: TempDir, args: &[&str]) -> Daemon {
        Self::start_kind_in("virtio-blk", dir, args)
    }

    /// Starts device kind `kind` with `args` in `dir`.
    pub fn start_kind_in(kind: &'static str, dir: TempDir, args: &[&str]) -> Daemon {
        Self::start_with_env(kind, dir, args, &[])
    }

    /// [`Daemon::start_kind_in`] with extra environment variables.
    pub fn start_with_env(
        kind: &'static str,
        dir: TempDir,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let socket = dir.as_path().join("blk.sock");
        let child = spawn_with_env(kind, &socket, args, env);
        wait_for_socket(&socket);
        Daemon {
            child,
            socket,
            dir,
            kind,
            successors: Vec::new(),
        }
    }

    /// The pid of the daemon serving now.
    pub fn pid(&self) -> u32 {
        self.successors.last().copied().unwrap_or(self.child.id())
    }

    /// `api ... upgrade ARGS` on the control socket `api`, which must
    /// succeed; returns the reply and remembers the new daemon.
    #[track_caller]
    pub fn upgrade(&mut self, api_socket: &Path, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["upgrade"];
        all.extend_from_slice(args);
        let v = api_ok(api_socket, &all);
        let pid = v["pid"].as_u64().expect("new pid") as u32;
        assert_ne!(pid, self.pid(), "the same daemon after an upgrade");
        self.successors.push(pid);
        v
    }

    /// Restarts on the same socket (after a kill).
    pub fn restart(&mut self, args: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        self.child = spawn(self.kind, &self.socket, args);
        wait_for_socket(&self.socket);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in &self.successors {
            upgrade::kill(*pid);
        }
    }
}

fn spawn(kind: &str, socket: &Path, args: &[&str]) -> Child {
    spawn_with_env(kind, socket, args, &[])
}

fn spawn_with_env(kind: &str, socket: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vfio-user-device"))
        .arg(kind)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vfio-user-device")
}

/// The processes an upgrade leaves: a daemon that took over is the child
/// of the one it replaced, which exits. With the test process as the
/// "subreaper" of its descendants, such orphans become its children, so
/// that their exit status can be checked and nothing is left behind.
pub mod upgrade {
    use std::time::{Duration, Instant};

    /// Makes orphaned descendants of this process its children.
    pub fn become_subreaper() {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
    }

    /// Waits (at most `timeout`) for process `pid`, a child of this one
    /// (see [`become_subreaper`]), to exit; returns its exit code
    /// (128 + N for a signal N), or `None` if it still runs.
    pub fn wait_exit(pid: u32, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut status = 0;
            // SAFETY: waitpid on a pid, writing into a local int.
            let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
            if r == pid as i32 {
                return Some(if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                });
            }
            if r < 0 {
                // Not our child (no subreaper): see whether it is gone.
                let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
                if gone {
                    return Some(-1);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs `pid` and reaps it if it is ours.
    pub fn kill(pid: u32) {
        // SAFETY: signalling a pid; no memory involved.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let _ = wait_exit(pid, Duration::from_secs(2));
    }

    /// Sends `signal` to `pid`.
    pub fn signal(pid: u32, signal: i32) {
        // SAFETY: signalling a pid; no memory involved.
        unsafe { libc::kill(pid as i32, signal) };
    }
}

pub fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "daemon socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until something listens on `socket` (a stale socket file left by
/// a killed daemon exists before its successor takes it over).
pub fn wait_for_listener(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {socket:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The daemon binary.
pub fn daemon_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vfio-user-device"))
}

impl Daemon {
    /// SIGKILL and reap (no clean-up by the daemon: its sockets stay).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vfio-user-device api --api-socket API ARGS...`: returns whether it
/// exited successfully and the JSON reply line it printed.
pub fn api(api_socket: &Path, args: &[&str]) -> (bool, serde_json::Value) {
    let out = daemon_bin()
        .arg("api")
        .arg("--api-socket")
        .arg(api_socket)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run vfio-user-device api");
    let text = String::from_utf8(out.stdout).expect("utf-8 reply");
    let line = text.lines().next().unwrap_or_default();
    let v = serde_json::from_str(line).unwrap_or_else(|e| panic!("bad api reply {text:?}: {e}"));
    (out.status.success(), v)
}

/// `api` that must succeed with `"ok": true`.
#[track_caller]
pub fn api_ok(api_socket: &Path, args: &[&str]) -> serde_json::Value {
    let (ok, v) = api(api_socket, args);
    assert!(ok && v["ok"] == true, "api {args:?} failed: {v}");
    v
}

/// Runs the daemon with `args` expecting it to fail on its own within
/// 10 s (it is killed and the test fails otherwise); returns its stderr.
pub fn daemon_fails(args: &[&str]) -> String {
    use std::io::Read;
    let mut child = daemon_bin()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vfio-user-device");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("daemon {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "daemon {args:?} exited successfully");
    err
}

/// Migration v2 over the raw client (protocol.md 4.12-4.13).
pub mod mig {
    use std::collections::BTreeSet;

    use super::{payload, proto::cmd, RawClient, Reply};
    use integration_tests::{le32, le64};

    pub const FEATURE_GET: u32 = 1 << 16;
    pub const FEATURE_SET: u32 = 1 << 17;
    pub const FEATURE_PROBE: u32 = 1 << 18;
    pub const MIGRATION: u32 = 1;
    pub const MIG_DEVICE_STATE: u32 = 2;
    pub const DMA_LOGGING_START: u32 = 6;
    pub const DMA_LOGGING_STOP: u32 = 7;
    pub const DMA_LOGGING_REPORT: u32 = 8;
    pub const MIGRATION_STOP_COPY: u64 = 1;
    pub const MIGRATION_P2P: u64 = 2;
    pub const MIGRATION_PRE_COPY: u64 = 4;

    pub const ERROR: u32 = 0;
    pub const STOP: u32 = 1;
    pub const RUNNING: u32 = 2;
    pub const STOP_COPY: u32 = 3;
    pub const RESUMING: u32 = 4;
    pub const RUNNING_P2P: u32 = 5;
    pub const PRE_COPY: u32 = 6;
    pub const PRE_COPY_P2P: u32 = 7;

    /// DEVICE_FEATURE with an explicit argsz.
    #[track_caller]
    pub fn feature(c: &mut RawClient, argsz: u32, flags: u32, data: &[u8]) -> Reply {
        c.call(
            cmd::DEVICE_FEATURE,
            &payload::device_feature(argsz, flags, data),
        )
    }

    /// SET of MIG_DEVICE_STATE (data_fd -1, as the kernel's users send).
    #[track_caller]
    pub fn set_state(c: &mut RawClient, state: u32) -> Reply {
        let data = [state.to_le_bytes(), u32::MAX.to_le_bytes()].concat();
        feature(c, 16, FEATURE_SET | MIG_DEVICE_STATE, &data)
    }

    /// SET of MIG_DEVICE_STATE that must succeed; checks the echo and that
    /// GET reports the new state.
    #[track_caller]
    pub fn set_state_ok(c: &mut RawClient, state: u32) {
        let r = set_state(c, state).ok();
        assert_eq!(le32(&r.payload, 8), state, "SET echo");
        assert_eq!(get_state(c), state);
    }

    /// GET of MIG_DEVICE_STATE.
    #[track_caller]
    pub fn get_state(c: &mut RawClient) -> u32 {
        let r = feature(c, 16, FEATURE_GET | MIG_DEVICE_STATE, &[0; 8]).ok();
        assert_eq!(r.payload.len(), 16);
        assert_eq!(le32(&r.payload, 0), 16, "argsz");
        le32(&r.payload, 8)
    }

    /// MIG_DATA_READ of up to `size` bytes (request argsz 8 + size).
    #[track_caller]
    pub fn read_raw(c: &mut RawClient, size: u32) -> Reply {
        c.call(cmd::MIG_DATA_READ, &payload::mig_data(8 + size, size, &[]))
    }

    /// One MIG_DATA_READ that must succeed; returns the data.
    #[track_caller]
    pub fn read_chunk(c: &mut RawClient, size: u32) -> Vec<u8> {
        let r = read_raw(c, size).ok();
        let n = le32(&r.payload, 4) as usize;
        assert!(n <= size as usize, "more data than asked for");
        assert_eq!(le32(&r.payload, 0) as usize, 8 + n, "reply argsz");
        assert_eq!(r.payload.len(), 8 + n, "reply length");
        r.payload[8..].to_vec()
    }

    /// Reads the stream in `chunk`-byte pieces until a short read.
    #[track_caller]
    pub fn read_stream(c: &mut RawClient, chunk: u32) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let d = read_chunk(c, chunk);
            let short = d.len() < chunk as usize;
            out.extend_from_slice(&d);
            if short {
                return out;
            }
        }
    }

    /// MIG_DATA_WRITE of `data` (argsz = 8 + size, size = data length).
    #[track_caller]
    pub fn write_raw(c: &mut RawClient, data: &[u8]) -> Reply {
        c.call(
            cmd::MIG_DATA_WRITE,
            &payload::mig_data(8 + data.len() as u32, data.len() as u32, data),
        )
    }

    /// Writes `bytes` in `chunk`-byte MIG_DATA_WRITEs that must succeed.
    #[track_caller]
    pub fn write_stream(c: &mut RawClient, bytes: &[u8], chunk: usize) {
        for piece in bytes.chunks(chunk) {
            let r = write_raw(c, piece).ok();
            assert_eq!(r.msg_size, 16, "MIG_DATA_WRITE replies header-only");
        }
    }

    /// DMA_LOGGING_START with `page_size` and `ranges` `(iova, length)`.
    #[track_caller]
    pub fn logging_start(c: &mut RawClient, page_size: u64, ranges: &[(u64, u64)]) -> Reply {
        let mut data = Vec::new();
        data.extend_from_slice(&page_size.to_le_bytes());
        data.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        data.extend_from_slice(&0u32.to_le_bytes());
        for (iova, len) in ranges {
            data.extend_from_slice(&iova.to_le_bytes());
            data.extend_from_slice(&len.to_le_bytes());
        }
        feature(
            c,
            8 + data.len() as u32,
            FEATURE_SET | DMA_LOGGING_START,
            &data,
        )
    }

    /// DMA_LOGGING_STOP.
    #[track_caller]
    pub fn logging_stop(c: &mut RawClient) -> Reply {
        feature(c, 8, FEATURE_SET | DMA_LOGGING_STOP, &[])
    }

    /// DMA_LOGGING_REPORT with room for the whole bitmap.
    #[track_caller]
    pub fn report_raw(c: &mut RawClient, iova: u64, length: u64, page_size: u64) -> Reply {
        let bitmap = length.div_ceil(page_size).div_ceil(64) * 8;
        let data = [
            iova.to_le_bytes(),
            length.to_le_bytes(),
            page_size.to_le_bytes(),
        ]
        .concat();
        feature(
            c,
            (8 + 24 + bitmap) as u32,
            FEATURE_GET | DMA_LOGGING_REPORT,
            &data,
        )
    }

    /// DMA_LOGGING_REPORT that must succeed; returns the dirty page
    /// addresses (page-aligned relative to `iova`).
    #[track_caller]
    pub fn report(c: &mut RawClient, iova: u64, length: u64, page_size: u64) -> BTreeSet<u64> {
        let r = report_raw(c, iova, length, page_size).ok();
        let pages = length.div_ceil(page_size);
        let bitmap_len = (pages.div_ceil(64) * 8) as usize;
        assert_eq!(r.payload.len(), 8 + 24 + bitmap_len, "report length");
        assert_eq!(le32(&r.payload, 0) as usize, r.payload.len(), "argsz");
        assert_eq!(le64(&r.payload, 8), iova);
        assert_eq!(le64(&r.payload, 16), length);
        assert_eq!(le64(&r.payload, 24), page_size);
        let bitmap = &r.payload[32..];
        let mut out = BTreeSet::new();
        for k in 0..bitmap_len as u64 * 8 {
            if bitmap[(k / 8) as usize] & (1 << (k % 8)) != 0 {
                assert!(k < pages, "bit {k} beyond the range is set");
                out.insert(iova + k * page_size);
            }
        }
        out
    }

    /// The pages (of `page_size`, aligned to `base`) that `[addr, addr +
    /// len)` touches.
    pub fn pages_of(base: u64, page_size: u64, addr: u64, len: u64) -> BTreeSet<u64> {
        let first = (addr - base) / page_size;
        let last = (addr + len.max(1) - 1 - base) / page_size;
        (first..=last).map(|k| base + k * page_size).collect()
    }
}

/// The device state stream (snapshot file / MIG_DATA stream), decoded and
/// encoded independently of the server: magic `VFUSNAP\0`, u32 format
/// version, u32 kind length, kind, u64 body length, JSON body, CRC-32
/// (IEEE) of everything before it; all little-endian.
pub mod stream {
    pub const MAGIC: &[u8; 8] = b"VFUSNAP\0";

    /// A decoded stream.
    #[derive(Debug)]
    pub struct Stream {
        pub version: u32,
        pub kind: String,
        pub body: serde_json::Value,
    }

    impl Stream {
        /// The transport state (`snapshot_data.state`, itself JSON text).
        pub fn state(&self) -> serde_json::Value {
            let text = self.body["snapshot_data"]["state"]
                .as_str()
                .expect("snapshot_data.state");
            serde_json::from_str(text).expect("state JSON")
        }

        /// Replaces the transport state.
        pub fn set_state(&mut self, state: &serde_json::Value) {
            self.body["snapshot_data"]["state"] = serde_json::Value::String(state.to_string());
        }

        /// Encodes it again (with a correct checksum).
        pub fn encode(&self) -> Vec<u8> {
            encode(
                self.version,
                &self.kind,
                &serde_json::to_vec(&self.body).unwrap(),
            )
        }
    }

    pub fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// Parses a stream, panicking unless it is well formed.
    #[track_caller]
    pub fn decode(b: &[u8]) -> Stream {
        assert!(b.len() >= 28, "stream too short");
        assert_eq!(&b[..8], MAGIC, "magic");
        let (content, crc) = b.split_at(b.len() - 4);
        assert_eq!(
            crc32(content),
            u32::from_le_bytes(crc.try_into().unwrap()),
            "CRC-32"
        );
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
        let kind_len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        let kind = String::from_utf8(b[16..16 + kind_len].to_vec()).unwrap();
        let off = 16 + kind_len;
        let body_len = u64::from_le_bytes(b[off..off + 8].try_into().unwrap()) as usize;
        let body = &content[off + 8..];
        assert_eq!(body.len(), body_len, "body length");
        Stream {
            version,
            kind,
            body: serde_json::from_slice(body).expect("JSON body"),
        }
    }

    /// Encodes a stream from its parts.
    pub fn encode(version: u32, kind: &str, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(kind.len() as u32).to_le_bytes());
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(body);
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }
}

/// Deterministic pseudo-random bytes (xorshift), for "foreign" input.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The bytes the tests fill images and buffers with: a different run for
/// each `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// `len` bytes of the file at `path`, from `off`.
pub fn read_image(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).unwrap();
    b
}
