//! The daemon serving a real Linux guest under a real QEMU (11.1, TCG):
//! `-device vfio-user-pci` on the daemon's socket, the guest's virtio-blk
//! driver on top, checked from both sides (the guest's console markers and
//! the host's image file / daemon).
//!
//! Needs root and the vmm-env (`ch-integration/vmm-env`, built on first use
//! by `setup.sh`, about 70-160 s, cached afterwards). Without root, or when
//! the Debian archive is unreachable, each test prints
//! `SKIP vm tests: <reason>` and passes. At most two VMs run at once.

mod common;
mod vm;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::small_fs::{in_private_mount_ns, SmallFs};
use vm::{random_bytes, sha256_hex, Daemon, Vm, VmSpec};
use vmm_sys_util::tempdir::TempDir;

const MIB: usize = 1 << 20;
/// Image size for the tests (the guest must see IMAGE_SIZE / 512 sectors).
const IMAGE_SIZE: usize = 32 * MIB;
/// Where and how much the guest writes.
const W_OFF: usize = MIB;
const W_LEN: usize = 64 * 1024;

/// A TempDir holding `disk.img` filled with random bytes; returns the bytes.
fn image(size: usize) -> (TempDir, PathBuf, Vec<u8>) {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.as_path().join("disk.img");
    let data = random_bytes(size);
    std::fs::write(&path, &data).expect("write image");
    (dir, path, data)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The `vmtest=blk` read/write checks shared by two tests.
fn blk_spec(socket: &Path) -> VmSpec {
    VmSpec::new("blk")
        .param("pattern", "random")
        .param("offset", W_OFF)
        .param("count", W_LEN)
        .vfio_user(socket, "vfu0")
}

fn check_blk_run(run: &vm::VmRun, original: &[u8], img: &Path) {
    run.assert_passed();
    run.expect("dev", "vda");
    run.expect("size_sectors", &(original.len() / 512).to_string());
    run.expect("ro", "0");
    run.expect("read_sha256", &sha256_hex(&original[..4096]));
    run.expect("write_rc", "0");
    run.expect("readback_match", "1");
    let pattern = run.result("pattern_sha256").to_string();
    run.expect("readback_sha256", &pattern);
    // The guest's bytes are in the image, at the guest's offset, and
    // nothing else changed.
    let after = std::fs::read(img).expect("read image");
    assert_eq!(
        vm::changed_only_at(original, &after, W_OFF, W_LEN),
        pattern,
        "image bytes at the guest's write offset"
    );
}

/// Daemon-side checks after a clean VM run: still running, no WARN/ERROR,
/// QEMU's connection gone, a new client served.
fn check_daemon_after(daemon: &mut Daemon) {
    assert!(
        daemon.wait_log_count("client detached", 1, Duration::from_secs(10)),
        "daemon never saw QEMU go; log:\n{}",
        daemon.log()
    );
    let problems = daemon.log_problems();
    assert!(
        problems.is_empty(),
        "daemon warnings/errors:\n{problems:#?}"
    );
    assert_no_map_over_a_map(daemon);
    daemon.assert_serves_new_client();
}

/// QEMU never maps a range twice without unmapping it in between (a map
/// over a map is EEXIST, exact duplicates included).
fn assert_no_map_over_a_map(daemon: &Daemon) {
    assert_eq!(
        daemon.log_count("overlaps an existing map"),
        0,
        "QEMU mapped over a map; log:\n{}",
        daemon.log()
    );
}

/// Stops the daemon with SIGTERM: it exits 0 and removes its socket.
fn stop_daemon(daemon: &mut Daemon) {
    let st = daemon.terminate();
    assert_eq!(
        st.code(),
        Some(0),
        "daemon exit on SIGTERM; log:\n{}",
        daemon.log()
    );
    assert!(!daemon.socket.exists(), "socket left behind after SIGTERM");
}

/// Boots a guest that reads and writes through a daemon started on a fresh
/// image with `extra` options, on the blk test spec changed by `spec`;
/// checks the bytes from both sides, then runs `check` on the guest's
/// results and the daemon before the usual daemon checks.
fn read_write_run(
    extra: &[&str],
    spec: impl FnOnce(VmSpec) -> VmSpec,
    check: impl FnOnce(&vm::VmRun, &mut Daemon),
) {
    let Some(env) = vm::env() else { return };
    let (dir, img, original) = image(IMAGE_SIZE);
    let mut args = vec!["--disk", path_str(&img)];
    args.extend_from_slice(extra);
    let mut daemon = Daemon::start(dir.as_path(), &args);
    let run = Vm::start(&env, spec(blk_spec(&daemon.socket))).finish();
    check_blk_run(&run, &original, &img);
    check(&run, &mut daemon);
    check_daemon_after(&mut daemon);
    stop_daemon(&mut daemon);
}

#[test]
fn vm_blk_read_write() {
    read_write_run(
        &["--queue-size", "128"],
        |spec| spec,
        |run, daemon| {
            // The guest's blk-mq queue has one tag per descriptor of our queue
            // (indirect descriptors offered); one vCPU, so one hardware queue.
            run.expect("queue_depth", "128");
            run.expect("nr_hw_queues", "1");
            // MSI-X: a vector for the configuration and one for the queue.
            run.expect("msi_vectors", "2");
            run.expect("intx_interrupts", "0");
            assert_eq!(daemon.log_count("client attached"), 1);
        },
    );
}

/// The guest's I/O on a daemon that runs requests on I/O threads.
#[test]
fn vm_blk_read_write_on_io_threads() {
    read_write_run(
        &["--io-threads", "2"],
        |spec| spec,
        |_, daemon| {
            let line = daemon.serving_line();
            assert!(line.contains("aio: threads (2 I/O thread(s))"), "{line}");
        },
    );
}

/// A guest without MSI (`pci=nomsi`): the virtio driver falls back to
/// INTx, which the daemon raises (automasked) and QEMU unmasks on EOI.
#[test]
fn vm_blk_read_write_on_intx() {
    read_write_run(
        &[],
        |spec| spec.kernel_param("pci=nomsi"),
        |run, _| {
            run.expect("msi_vectors", "0");
            let intx: u64 = run.result("intx_interrupts").parse().unwrap_or(0);
            assert!(intx > 0, "no INTx interrupts in the guest");
        },
    );
}

#[test]
fn vm_blk_readonly() {
    let Some(env) = vm::env() else { return };
    let (dir, img, original) = image(IMAGE_SIZE);
    let mut daemon = Daemon::start(dir.as_path(), &["--disk", path_str(&img), "--readonly"]);

    let spec = VmSpec::new("blk")
        .param("pattern", "0xab")
        .param("offset", W_OFF)
        .param("count", W_LEN)
        .param("expect_ro", 1)
        .vfio_user(&daemon.socket, "vfu0");
    let run = Vm::start(&env, spec).finish();
    run.assert_passed();
    run.expect("size_sectors", &(IMAGE_SIZE / 512).to_string());
    run.expect("ro", "1");
    run.expect("read_sha256", &sha256_hex(&original[..4096]));
    run.expect("ro_write_rejected", "1");
    run.expect("ro_data_unchanged", "1");
    eprintln!(
        "vm_blk_readonly: guest write error: {}",
        run.result("ro_write_error")
    );
    let after = std::fs::read(&img).expect("read image");
    assert!(after == original, "read-only image changed");
    check_daemon_after(&mut daemon);
    stop_daemon(&mut daemon);
}

#[test]
fn vm_blk_reboot() {
    let Some(env) = vm::env() else { return };
    let (dir, img, original) = image(IMAGE_SIZE);
    let mut daemon = Daemon::start(dir.as_path(), &["--disk", path_str(&img)]);
    const OFF1: usize = MIB;
    const OFF2: usize = 2 * MIB;
    const MARKER: usize = 4 * MIB;

    let spec = VmSpec::new("blk-reboot")
        .param("offset", OFF1)
        .param("offset2", OFF2)
        .param("count", W_LEN)
        .param("marker", MARKER)
        .allow_reboot()
        .timeout(Duration::from_secs(360))
        .vfio_user(&daemon.socket, "vfu0");
    let run = Vm::start(&env, spec).finish();
    run.assert_passed();
    assert_eq!(
        run.markers.starts,
        ["blk-reboot", "blk-reboot"],
        "expected two boots\n{}",
        run.report()
    );
    // Boot 1 wrote and rebooted; boot 2 found its data and wrote again.
    run.expect("boot1_write_rc", "0");
    run.expect("boot1_readback_match", "1");
    run.expect("boot1_rebooting", "1");
    run.expect("boot2_marker_found", "1");
    run.expect("boot2_size_sectors", &(IMAGE_SIZE / 512).to_string());
    let p1 = run.result("boot1_pattern_sha256").to_string();
    let p2 = run.result("boot2_pattern_sha256").to_string();
    run.expect("boot2_boot1_sha256", &p1);
    run.expect("boot2_boot1_match", "1");
    run.expect("boot2_write_rc", "0");
    run.expect("boot2_readback_match", "1");
    run.expect("boot2_readback_sha256", &p2);

    // Host side: both writes and the marker landed, nothing else changed.
    let after = std::fs::read(&img).expect("read image");
    assert_eq!(
        sha256_hex(&after[OFF1..OFF1 + W_LEN]),
        p1,
        "boot-1 data in the image"
    );
    assert_eq!(
        sha256_hex(&after[OFF2..OFF2 + W_LEN]),
        p2,
        "boot-2 data in the image"
    );
    let marker = format!("VMTEST-REBOOT-MARKER {p1}\n");
    assert_eq!(&after[MARKER..MARKER + marker.len()], marker.as_bytes());
    let mut expected = original.clone();
    expected[OFF1..OFF1 + W_LEN].copy_from_slice(&after[OFF1..OFF1 + W_LEN]);
    expected[OFF2..OFF2 + W_LEN].copy_from_slice(&after[OFF2..OFF2 + W_LEN]);
    expected[MARKER..MARKER + 512].copy_from_slice(&after[MARKER..MARKER + 512]);
    assert!(
        after == expected,
        "image changed outside the guest's writes"
    );

    // The daemon handled QEMU's reset of the device in place: one
    // connection for both boots, no warnings, and it serves on.
    assert_eq!(
        daemon.log_count("client attached"),
        1,
        "QEMU reconnected across the reboot; log:\n{}",
        daemon.log()
    );
    check_daemon_after(&mut daemon);
    stop_daemon(&mut daemon);
}

#[test]
fn vm_blk_hotplug() {
    let Some(env) = vm::env() else { return };
    let (dir, img, original) = image(IMAGE_SIZE);
    let mut daemon = Daemon::start(dir.as_path(), &["--disk", path_str(&img)]);
    vm::hotplug_and_unplug(
        &env,
        dir.as_path(),
        &daemon,
        &vm::Hotplug {
            test: "vm_blk_hotplug",
            ids: (0x1af4, 0x1042),
            disk_prefix: "vd",
            image: &img,
            original: &original,
            write: (W_OFF, W_LEN),
            odirect: false,
        },
    );
    // The daemon survives the unplug (or QEMU's death) and serves again.
    check_daemon_after(&mut daemon);
    stop_daemon(&mut daemon);
}

#[test]
fn vm_daemon_killed() {
    let Some(env) = vm::env() else { return };
    let (dir, img, original) = image(IMAGE_SIZE);
    let mut daemon = Daemon::start(dir.as_path(), &["--disk", path_str(&img)]);
    let t = Duration::from_secs;

    // The guest reads in a loop, each read bounded by io_timeout.
    let spec = VmSpec::new("io-loop")
        .param("seconds", 120)
        .param("io_timeout", 8)
        .vfio_user(&daemon.socket, "vfu0");
    let mut vm = Vm::start(&env, spec);
    if vm.wait_result("io_ready", t(150)).is_none() {
        panic!(
            "guest I/O never started\n{}",
            vm.kill_and_collect().report()
        );
    }
    std::thread::sleep(t(1));
    let killed_at = Instant::now();
    let st = daemon.sigkill();
    eprintln!("vm_daemon_killed: daemon killed ({st})");

    // What QEMU and the guest do: wait for the guest to report its stuck
    // (or failed) read, or for QEMU to exit.
    let mut outcome = None;
    let deadline = Instant::now() + t(45);
    while Instant::now() < deadline {
        if !vm.is_running() {
            outcome = Some("QEMU exited");
            break;
        }
        let m = vm::Markers::parse(&vm.console());
        if m.get("io_hung").is_some() || m.get("io_error").is_some() {
            outcome = Some("guest I/O failed or hung");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Give QEMU a moment to act on the stuck device (reset attempts, exit).
    std::thread::sleep(t(3));
    let qemu_running = vm.is_running();
    let run = vm.kill_and_collect();
    // QEMU's stderr, deduplicated, socket path elided.
    let sock = daemon.socket.display().to_string();
    let mut reported: Vec<(String, usize)> = Vec::new();
    for l in &run.stderr {
        let l = l.replace(&sock, "SOCK");
        if !(l.contains("vfio") || l.contains("failed to read header")) {
            continue;
        }
        match reported.iter_mut().find(|(k, _)| *k == l) {
            Some((_, n)) => *n += 1,
            None => reported.push((l, 1)),
        }
    }
    eprintln!(
        "vm_daemon_killed: after {:.1}s: {}; QEMU {}; guest: io_hung={:?} io_error={:?}; \
         QEMU stderr: {} lines, distinct ones in the first {}: {:#?}",
        killed_at.elapsed().as_secs_f64(),
        outcome.unwrap_or("nothing within 45 s"),
        if qemu_running {
            "still running (killed by the test)".to_string()
        } else {
            run.status_text()
        },
        run.markers.get("io_hung"),
        run.markers.get("io_error"),
        run.stderr_total,
        run.stderr.len(),
        reported
    );
    assert!(
        outcome.is_some(),
        "neither QEMU nor the guest noticed\n{}",
        run.report()
    );
    assert!(
        !reported.is_empty(),
        "QEMU reported nothing about the lost server\n{}",
        run.report()
    );
    assert!(run.markers.get("io_ready") == Some("1"), "{}", run.report());

    // A killed daemon leaves its socket behind; restart on the same path
    // and boot a new guest on it.
    assert!(
        daemon.socket.exists(),
        "socket file vanished with the daemon"
    );
    // The new daemon takes over the socket file the killed one left.
    daemon.restart();
    assert!(
        daemon.log().contains("removing stale socket"),
        "restart did not take over the stale socket; log:\n{}",
        daemon.log()
    );
    let run = Vm::start(&env, blk_spec(&daemon.socket)).finish();
    check_blk_run(&run, &original, &img);
    check_daemon_after(&mut daemon);
    stop_daemon(&mut daemon);
}

/// The guest's disk image for the full-disk tests: sparse, on a tmpfs
/// with little room, and the daemon serving it with `policy`.
struct FullDisk {
    /// Unmounted before `dir` goes.
    fs: SmallFs,
    daemon: Daemon,
    img: PathBuf,
    api: PathBuf,
    /// What the host wrote at the start of the image.
    data: Vec<u8>,
    /// Holds the sockets, the daemon's log and the tmpfs; removed last.
    _dir: TempDir,
}

/// Size of the full-disk tests' image.
const FULL_IMAGE: u64 = 32 * MIB as u64;
/// Its tmpfs.
const FULL_TMPFS: u64 = 4 * MIB as u64;
/// Where and how much the guest writes: a hole, twice the room left.
const FULL_W_OFF: usize = 8 * MIB;
const FULL_W_LEN: usize = 256 * 1024;
const FULL_ROOM: u64 = 128 * 1024;

impl FullDisk {
    /// Call from [`in_private_mount_ns`].
    fn start(policy: &str) -> FullDisk {
        let dir = TempDir::new().expect("tempdir");
        let fs = SmallFs::mount(&dir.as_path().join("fs"), FULL_TMPFS);
        let img = fs.dir.join("disk.img");
        let data = random_bytes(MIB);
        let f = std::fs::File::create(&img).expect("image");
        f.set_len(FULL_IMAGE).expect("image size");
        f.write_all_at(&data, 0).expect("image data");
        let api = dir.as_path().join("api.sock");
        let daemon = Daemon::start(
            dir.as_path(),
            &[
                "--disk",
                path_str(&img),
                "--on-error",
                policy,
                "--api-socket",
                path_str(&api),
            ],
        );
        FullDisk {
            fs,
            daemon,
            img,
            api,
            data,
            _dir: dir,
        }
    }

    /// The guest's test: write at [`FULL_W_OFF`], then read the start.
    fn spec(&self, expect_write: &str) -> VmSpec {
        VmSpec::new("disk-full")
            .param("offset", FULL_W_OFF)
            .param("count", FULL_W_LEN)
            .param("read_offset", 0)
            .param("read_len", 65536)
            .param("expect_write", expect_write)
            .vfio_user(&self.daemon.socket, "vfu0")
    }

    fn status(&self) -> serde_json::Value {
        vm::api(&self.api, &["status"])
    }

    /// The image's bytes at the guest's write.
    fn written(&self) -> Vec<u8> {
        let mut b = vec![0u8; FULL_W_LEN];
        std::fs::File::open(&self.img)
            .expect("image")
            .read_exact_at(&mut b, FULL_W_OFF as u64)
            .expect("read image");
        b
    }
}

/// A guest writes to a disk that is full on the host, with
/// `--on-error report`: its write fails with an I/O error, the kernel
/// logs it, and the device goes on serving reads.
#[test]
fn vm_blk_full_disk_is_reported() {
    let Some(env) = vm::env() else { return };
    in_private_mount_ns("vm_blk_full_disk_is_reported", move || {
        let mut disk = FullDisk::start("report");
        disk.fs.fill(FULL_ROOM);
        let run = Vm::start(&env, disk.spec("error")).finish();
        run.assert_passed();
        run.expect("size_sectors", &(FULL_IMAGE / 512).to_string());
        let error = run.result("write_error");
        assert!(error.contains("Input/output error"), "{error}");
        let io_errors: u32 = run.result("io_errors").parse().unwrap_or(0);
        assert!(
            io_errors >= 1,
            "no I/O error in the guest's log\n{}",
            run.report()
        );
        eprintln!(
            "vm_blk_full_disk_is_reported: guest: {error}; kernel: {}",
            run.result("io_error")
        );
        run.expect("read_rc", "0");
        run.expect("read_sha256", &sha256_hex(&disk.data[..65536]));
        // Part of the write may have fitted; never all of it.
        assert_ne!(sha256_hex(&disk.written()), run.result("pattern_sha256"));
        assert!(
            disk.daemon.log_count("No space left on device") >= 1,
            "{}",
            disk.daemon.log()
        );
        assert_eq!(disk.daemon.log_count("stopped on"), 0);
        assert_eq!(disk.status()["stopped_on_error"], false);
        assert!(disk
            .daemon
            .wait_log_count("client detached", 1, Duration::from_secs(10)));
        disk.daemon.assert_serves_new_client();
        stop_daemon(&mut disk.daemon);
    });
}

/// The same with `--on-error stop`: the guest's write waits while the
/// device is stopped; the host grows the tmpfs and resumes the device
/// through the control socket, and the write completes with the guest's
/// bytes in the image.
#[test]
fn vm_blk_full_disk_stops_until_grown_and_resumed() {
    let Some(env) = vm::env() else { return };
    in_private_mount_ns(
        "vm_blk_full_disk_stops_until_grown_and_resumed",
        move || {
            let mut disk = FullDisk::start("stop");
            disk.fs.fill(FULL_ROOM);
            let t = Duration::from_secs;
            let vm = Vm::start(&env, disk.spec("ok"));
            if vm.wait_result("writing", t(150)).is_none() {
                panic!("guest never wrote\n{}", vm.kill_and_collect().report());
            }
            // The device stops on the write, and says so.
            let deadline = Instant::now() + t(60);
            let status = loop {
                let v = disk.status();
                if v["stopped_on_error"] == true {
                    break v;
                }
                if Instant::now() > deadline {
                    panic!("never stopped: {v}\n{}", vm.kill_and_collect().report());
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let why = status["stop_error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(why.contains("No space left on device"), "{status}");
            assert!(disk
                .daemon
                .wait_log_count("stopped on a storage error", 1, t(5)));
            // The guest waits: its write neither fails nor completes.
            std::thread::sleep(t(3));
            let console = vm::Markers::parse(&vm.console());
            assert!(
                console.get("write_rc").is_none(),
                "the write ended while the device was stopped: {console:?}"
            );
            // Room (`mount -o remount,size=...`), then resume.
            disk.fs.resize(2 * FULL_TMPFS);
            vm::api(&disk.api, &["resume"]);
            let run = vm.finish();
            run.assert_passed();
            run.expect("write_rc", "0");
            run.expect("io_errors", "0");
            run.expect("read_sha256", &sha256_hex(&disk.data[..65536]));
            run.expect("readback_match", "1");
            // The guest's bytes are in the image, from the host's side.
            assert_eq!(
                sha256_hex(&disk.written()),
                run.result("pattern_sha256"),
                "image bytes at the guest's write"
            );
            assert_eq!(disk.status()["stopped_on_error"], false);
            eprintln!("vm_blk_full_disk_stops_until_grown_and_resumed: stopped on: {why}");
            assert_eq!(disk.daemon.log_count("stopped on a storage error"), 1);
            assert_eq!(disk.daemon.log_count("retrying 1 kept request"), 1);
            assert!(disk.daemon.wait_log_count("client detached", 1, t(10)));
            disk.daemon.assert_serves_new_client();
            stop_daemon(&mut disk.daemon);
        },
    );
}

/// fio in the guest (io_uring, O_DIRECT) at queue depth 32 against the
/// daemon's O_DIRECT image on its default engine (io_uring where the host
/// has it): fio's own verification of what it wrote passes, and each job
/// runs. A smoke test of the in-guest benchmark (`bench/vm-fio.sh`), not a
/// measurement.
#[test]
fn vm_blk_fio_direct() {
    let Some(env) = vm::env() else { return };
    let (dir, img, _) = image(IMAGE_SIZE);
    let mut daemon = Daemon::start(dir.as_path(), &["--disk", path_str(&img), "--direct"]);
    let spec = VmSpec::new("fio")
        .with_fio()
        .param("verify", 1)
        .param("jobs", "randread-4k-qd32,randwrite-4k-qd32,read-1m-qd8")
        .param("runtime", 2)
        .param("ramp", 0)
        .vfio_user(&daemon.socket, "vfu0");
    let run = Vm::start(&env, spec).finish();
    run.assert_passed();
    run.expect("verify_rc", "0");
    run.expect_fio_jobs(&["randread-4k-qd32", "randwrite-4k-qd32", "read-1m-qd8"]);
    check_daemon_after(&mut daemon);
    stop_daemon(&mut daemon);
}
