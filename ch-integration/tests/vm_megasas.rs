//! The megasas daemon under a real QEMU (11.1, TCG) and Linux guest:
//! `-device vfio-user-pci` on the daemon's socket, the guest's stock
//! `megaraid_sas` driver on top (SeaBIOS probes it first), checked from
//! both sides: the guest's `vmtest=scsi` results (the disks as SCSI
//! `H:2:T:0`, 8 MiB of direct I/O in 1 MiB and in 4 KiB blocks, read back
//! and compared) and the host's images after the guest powered off
//! (every write there, and the CACHE_FLUSH and SHUTDOWN the driver sends
//! on its way down in the daemon's debug log).
//!
//! Needs root and the vmm-env (see `vm_blk.rs`); skips otherwise.

mod vm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use vm::{random_bytes, sha256_hex, Daemon, Vm, VmRun, VmSpec};
use vmm_sys_util::tempdir::TempDir;

const MIB: usize = 1 << 20;
const IMAGE_SIZE: usize = 32 * MIB;
/// What `scsi.sh` writes by default: 8 MiB at 1 MiB in 1 MiB blocks, and
/// 8 MiB at 12 MiB + 4 KiB in 4 KiB blocks.
const COUNT: usize = 8 * MIB;
const OFF_1M: usize = MIB;
const OFF_4K: usize = 12 * MIB + 4096;

/// Images filled with random bytes in a fresh directory.
fn images(n: usize) -> (TempDir, Vec<(PathBuf, Vec<u8>)>) {
    let dir = TempDir::new().expect("tempdir");
    let imgs = (0..n)
        .map(|i| {
            let path = dir.as_path().join(format!("disk{i}.img"));
            let data = random_bytes(IMAGE_SIZE);
            std::fs::write(&path, &data).expect("write image");
            (path, data)
        })
        .collect();
    (dir, imgs)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The guest's disks from its `scsi=H:C:T:L DEV ...` results, as
/// `(C:T:L, DEV)`, in target order.
fn scsi_disks(run: &VmRun) -> Vec<(String, String)> {
    let mut disks: Vec<(String, String)> = run
        .markers
        .all("scsi")
        .iter()
        .map(|l| {
            let mut w = l.split_whitespace();
            let hctl = w.next().unwrap_or_default();
            let ctl = hctl.split_once(':').map_or("", |(_, rest)| rest);
            (ctl.to_string(), w.next().unwrap_or_default().to_string())
        })
        .collect();
    disks.sort();
    disks
}

/// Asserts that `after` is `before` with the guest's two passes written
/// on `dev` (their hashes as the guest printed them) and nothing else.
fn check_image(run: &VmRun, dev: &str, before: &[u8], after: &[u8]) {
    assert_eq!(before.len(), after.len(), "image size changed");
    let mut expected = before.to_vec();
    for (pass, off) in [("1m", OFF_1M), ("4k", OFF_4K)] {
        let want = run.result(&format!("pattern_{dev}_{pass}"));
        assert_eq!(
            sha256_hex(&after[off..off + COUNT]),
            want,
            "{dev}: the {pass} pass is not in the image"
        );
        expected[off..off + COUNT].copy_from_slice(&after[off..off + COUNT]);
    }
    assert!(
        after == expected,
        "{dev}: image changed outside the guest's writes"
    );
}

/// The guest-side checks every run shares: one adapter, probed without
/// errors, the disks where megaraid_sas puts logical drives, with the
/// write cache the daemon reports (none if it writes through or the
/// disks are read-only).
fn check_guest(run: &VmRun, disks: usize, write_through: bool) {
    run.assert_passed();
    run.expect("proc_name", "megaraid_sas");
    run.expect("init_done", "1");
    run.expect("dmesg_problems", "0");
    let found = scsi_disks(run);
    let want: Vec<String> = (0..disks).map(|t| format!("2:{t}:0")).collect();
    let got: Vec<&str> = found.iter().map(|(ctl, _)| ctl.as_str()).collect();
    assert_eq!(got, want, "SCSI addresses\n{}", run.report());
    for (_, dev) in &found {
        run.expect(&format!("size_{dev}"), &(IMAGE_SIZE / 512).to_string());
        let cache = if write_through {
            "write_through"
        } else {
            "write_back"
        };
        run.expect(&format!("cache_{dev}"), cache);
    }
}

/// The daemon after QEMU powered the guest off: the driver flushed and
/// shut the adapter down, nothing was logged as a problem, QEMU's
/// connection is gone and a new client is served; then SIGTERM.
fn check_daemon_after(daemon: &mut Daemon) {
    assert!(
        daemon.wait_log_count("client detached", 1, Duration::from_secs(10)),
        "daemon never saw QEMU go; log:\n{}",
        daemon.log()
    );
    for dcmd in ["DCMD CACHE_FLUSH", "DCMD SHUTDOWN"] {
        assert!(
            daemon.log_count(dcmd) >= 1,
            "no {dcmd} at poweroff; log:\n{}",
            daemon.log()
        );
    }
    let problems = daemon.log_problems();
    assert!(
        problems.is_empty(),
        "daemon warnings/errors:\n{problems:#?}"
    );
    daemon.assert_serves_new_client();
    let st = daemon.terminate();
    assert_eq!(st.code(), Some(0), "daemon exit on SIGTERM");
}

/// Boots a guest on a daemon serving `disks` fresh images with `extra`
/// options, on the `scsi` spec changed by `spec`; checks both sides and
/// returns the guest's run.
fn scsi_run(
    name: &str,
    disks: usize,
    extra: &[&str],
    spec: impl FnOnce(VmSpec) -> VmSpec,
) -> Option<VmRun> {
    let env = vm::env()?;
    let (dir, imgs) = images(disks);
    let mut args = Vec::new();
    for (path, _) in &imgs {
        args.extend(["--disk", path_str(path)]);
    }
    args.extend_from_slice(extra);
    let mut daemon = Daemon::start_kind(dir.as_path(), &[], "megasas", &args);
    // The daemon runs as asked.
    let line = daemon.serving_line();
    for (flag, said) in [
        ("--io-threads", "aio: threads ("),
        ("--direct", "O_DIRECT"),
        ("--write-through", "write-through"),
    ] {
        if extra.contains(&flag) {
            assert!(line.contains(said), "{flag}: {line}");
        }
    }
    let base = VmSpec::new("scsi")
        .param("disks", disks)
        .vfio_user(&daemon.socket, "vfu0");
    let run = Vm::start(&env, spec(base)).finish();
    eprintln!("{name}: guest run {:.1}s", run.elapsed.as_secs_f64());
    let no_cache = extra.contains(&"--write-through") || extra.contains(&"--readonly");
    check_guest(&run, disks, no_cache);
    let read_only = extra.contains(&"--readonly");
    for ((_, dev), (path, before)) in scsi_disks(&run).iter().zip(&imgs) {
        let after = std::fs::read(path).expect("read image");
        run.expect(&format!("read_{dev}"), &sha256_hex(&before[..4096]));
        if read_only {
            run.expect(&format!("ro_{dev}"), "1");
            run.expect(&format!("ro_rejected_{dev}"), "1");
            run.expect(&format!("ro_unchanged_{dev}"), "1");
            assert!(after == *before, "{dev}: read-only image changed");
        } else {
            run.expect(&format!("ro_{dev}"), "0");
            for pass in ["1m", "4k"] {
                run.expect(&format!("match_{dev}_{pass}"), "1");
            }
            check_image(&run, dev, before, &after);
        }
    }
    check_daemon_after(&mut daemon);
    Some(run)
}

#[test]
fn vm_megasas_read_write() {
    let Some(run) = scsi_run("vm_megasas_read_write", 1, &[], |s| s) else {
        return;
    };
    // One MSI-X vector, no INTx.
    run.expect("msix_vectors", "1");
    run.expect("intx_interrupts", "0");
}

/// The same I/O on I/O threads with O_DIRECT images, written through.
#[test]
fn vm_megasas_io_threads_direct() {
    scsi_run(
        "vm_megasas_io_threads_direct",
        1,
        &["--io-threads", "2", "--direct", "--write-through"],
        |s| s,
    );
}

/// fio in the guest (O_DIRECT, queue depth 32) on an O_DIRECT image served
/// on the daemon's default engine (io_uring where the host has it): fio's
/// verification of what it wrote passes and every job runs. A smoke test
/// of `bench/vm-fio.sh --kind megasas`, not a measurement.
#[test]
fn vm_megasas_fio_direct() {
    let Some(env) = vm::env() else { return };
    let (dir, imgs) = images(1);
    let img = path_str(&imgs[0].0);
    let mut daemon =
        Daemon::start_kind(dir.as_path(), &[], "megasas", &["--disk", img, "--direct"]);
    let spec = VmSpec::new("fio")
        .with_fio()
        .param("verify", 1)
        .param("jobs", "randwrite-4k-qd32,read-1m-qd8")
        .param("runtime", 2)
        .param("ramp", 0)
        .vfio_user(&daemon.socket, "vfu0");
    let run = Vm::start(&env, spec).finish();
    run.assert_passed();
    run.expect("verify_rc", "0");
    run.expect_fio_jobs(&["randwrite-4k-qd32", "read-1m-qd8"]);
    assert!(daemon.is_running(), "daemon died; log:\n{}", daemon.log());
}

/// `megaraid_sas.msix_disable=1`: the driver takes INTx, which the
/// daemon raises (automasked) and QEMU unmasks at the driver's
/// register reads.
#[test]
fn vm_megasas_intx() {
    let Some(run) = scsi_run("vm_megasas_intx", 1, &[], |s| {
        s.kernel_param("megaraid_sas.msix_disable=1")
    }) else {
        return;
    };
    run.expect("msix_vectors", "0");
    let intx: u64 = run.result("intx_interrupts").parse().unwrap_or(0);
    assert!(
        intx > 0,
        "no INTx interrupts in the guest\n{}",
        run.report()
    );
}

#[test]
fn vm_megasas_readonly() {
    scsi_run("vm_megasas_readonly", 1, &["--readonly"], |s| {
        s.param("expect_ro", 1)
    });
}

/// Two images, two logical drives: `H:2:0:0` and `H:2:1:0`, each with
/// its own data.
#[test]
fn vm_megasas_two_disks() {
    scsi_run("vm_megasas_two_disks", 2, &[], |s| s);
}

/// The adapter plugged into a running guest with QMP `device_add` behind
/// a PCIe root port: the driver probes it, the disk appears and takes
/// I/O; then `device_del` (which QEMU 11.1.3 may abort on).
#[test]
fn vm_megasas_hotplug() {
    let Some(env) = vm::env() else { return };
    let (dir, imgs) = images(1);
    let (img, original) = &imgs[0];
    let mut daemon = Daemon::start_kind(dir.as_path(), &[], "megasas", &["--disk", path_str(img)]);
    let t = Duration::from_secs;
    vm::hotplug_and_unplug(
        &env,
        dir.as_path(),
        &daemon,
        &vm::Hotplug {
            test: "vm_megasas_hotplug",
            ids: (0x1000, 0x0060),
            disk_prefix: "sd",
            image: img,
            original,
            write: (MIB, MIB),
            odirect: true,
        },
    );
    // The daemon lives on and serves the next client.
    assert!(
        daemon.wait_log_count("client detached", 1, t(10)),
        "daemon never saw QEMU go; log:\n{}",
        daemon.log()
    );
    let problems = daemon.log_problems();
    assert!(
        problems.is_empty(),
        "daemon warnings/errors:\n{problems:#?}"
    );
    daemon.assert_serves_new_client();
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// The daemon is killed under a guest reading in a loop: the guest's I/O
/// fails or hangs, or QEMU stops; a daemon restarted on the same socket
/// (the killed one left its socket file) serves a new guest, whose probe
/// and I/O are as clean as on a fresh daemon.
#[test]
fn vm_megasas_daemon_restarted() {
    let Some(env) = vm::env() else { return };
    let (dir, imgs) = images(1);
    let (img, original) = &imgs[0];
    let mut daemon = Daemon::start_kind(dir.as_path(), &[], "megasas", &["--disk", path_str(img)]);
    let t = Duration::from_secs;
    let spec = VmSpec::new("io-loop")
        .param("dev", "sda")
        .param("wait", 60)
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
    daemon.sigkill();
    let deadline = std::time::Instant::now() + t(60);
    let mut noticed = false;
    while std::time::Instant::now() < deadline && !noticed {
        let m = vm::Markers::parse(&vm.console());
        noticed = !vm.is_running() || m.get("io_hung").is_some() || m.get("io_error").is_some();
        std::thread::sleep(Duration::from_millis(200));
    }
    let run = vm.kill_and_collect();
    assert!(
        noticed,
        "neither QEMU nor the guest noticed\n{}",
        run.report()
    );

    daemon.restart();
    let base = VmSpec::new("scsi")
        .param("disks", 1)
        .vfio_user(&daemon.socket, "vfu0");
    let run = Vm::start(&env, base).finish();
    eprintln!(
        "vm_megasas_daemon_restarted: guest run {:.1}s",
        run.elapsed.as_secs_f64()
    );
    check_guest(&run, 1, false);
    run.expect("read_sda", &sha256_hex(&original[..4096]));
    run.expect("match_sda_1m", "1");
    run.expect("match_sda_4k", "1");
    check_image(
        &run,
        "sda",
        original,
        &std::fs::read(img).expect("read image"),
    );
    check_daemon_after(&mut daemon);
}
