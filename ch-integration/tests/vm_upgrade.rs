//! The daemon upgraded under a real Linux guest on a real QEMU (11.1, TCG),
//! whose `vfio-user-pci` never reconnects: the guest writes and verifies
//! checksummed blocks in a loop (`vmtest=blk-stream`) while the daemon is
//! replaced three times in a row (`api ... upgrade`). The guest must see
//! no I/O error, every block must verify, and its kernel must log no
//! timeout or reset.
//!
//! Needs root and the vmm-env (see vm_blk.rs); skips without them.

mod common;
mod vm;

use std::time::{Duration, Instant};

use vm::{random_bytes, sha256_hex, Daemon, Vm, VmSpec};
use vmm_sys_util::tempdir::TempDir;

const MIB: usize = 1 << 20;
const IMAGE_SIZE: usize = 32 * MIB;
/// The guest's region: `BLOCKS` blocks of 64 KiB from block `FIRST`.
const FIRST: usize = 16;
const BLOCKS: usize = 64;
const BLOCK: usize = 64 * 1024;

/// The daemons an upgrade started, SIGKILLed if the test ends early.
struct Successors(Vec<u32>);

impl Drop for Successors {
    fn drop(&mut self) {
        for pid in &self.0 {
            common::upgrade::kill(*pid);
        }
    }
}

/// How many `VMTEST-RESULT io_ok=` lines the guest printed so far.
fn io_oks(vm: &Vm) -> usize {
    vm.console()
        .iter()
        .filter(|l| l.starts_with("VMTEST-RESULT io_ok="))
        .count()
}

/// Waits until the guest verified 20 more blocks than it had at `seen`.
fn wait_more_io(vm: &Vm, seen: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while io_oks(vm) <= seen {
        assert!(
            Instant::now() < deadline,
            "the guest's I/O did not go on {what}; console:\n{}",
            vm.console().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn vm_blk_upgraded_three_times_under_guest_io() {
    let Some(env) = vm::env() else { return };
    common::upgrade::become_subreaper();
    let dir = TempDir::new().expect("tempdir");
    let img = dir.as_path().join("disk.img");
    std::fs::write(&img, random_bytes(IMAGE_SIZE)).expect("write image");
    let api = dir.as_path().join("api.sock");
    let img_s = img.to_str().unwrap();
    let api_s = api.to_str().unwrap();
    let mut daemon = Daemon::start(
        dir.as_path(),
        &["--disk", img_s, "--api-socket", api_s, "--io-threads", "2"],
    );
    let mut successors = Successors(Vec::new());
    let spec = VmSpec::new("blk-stream")
        .param("seconds", 100)
        .param("blocks", BLOCKS)
        .param("first", FIRST)
        .param("io_timeout", 8)
        .vfio_user(&daemon.socket, "vfu0")
        .timeout(Duration::from_secs(330));
    let vm = Vm::start(&env, spec);
    if vm
        .wait_result("io_ready", Duration::from_secs(150))
        .is_none()
    {
        panic!(
            "guest I/O never started\n{}",
            vm.kill_and_collect().report()
        );
    }
    let mut pauses = Vec::new();
    for round in 0..3 {
        wait_more_io(&vm, io_oks(&vm), &format!("before upgrade {round}"));
        let seen = io_oks(&vm);
        let v = vm::api(&api, &["upgrade"]);
        let pid = v["pid"].as_u64().expect("pid") as u32;
        successors.0.push(pid);
        pauses.push(v["pause_ms"].as_f64().unwrap_or_default());
        eprintln!("vm_blk_upgraded_three_times_under_guest_io: upgrade {round}: {v}");
        wait_more_io(&vm, seen, &format!("after upgrade {round}"));
    }
    let run = vm.finish();
    eprintln!(
        "vm_blk_upgraded_three_times_under_guest_io: {} blocks written and verified; \
         pauses {pauses:?} ms",
        run.markers.get("writes").unwrap_or("?")
    );
    run.assert_passed();
    run.expect("kernel_problems", "0");
    run.expect("final_bad", "0");
    for key in ["io_error", "io_mismatch", "io_hung"] {
        assert!(run.markers.get(key).is_none(), "{key}\n{}", run.report());
    }
    assert!(
        run.result("writes").parse::<u64>().unwrap_or(0) >= 60,
        "{}",
        run.report()
    );
    // The image holds what the guest last wrote to every block.
    let data = std::fs::read(&img).expect("read image");
    let region = &data[FIRST * BLOCK..(FIRST + BLOCKS) * BLOCK];
    run.expect("final_sha256", &sha256_hex(region));
    // QEMU noticed nothing.
    let vfio: Vec<&String> = run.stderr.iter().filter(|l| l.contains("vfio")).collect();
    assert!(vfio.is_empty(), "QEMU complained: {vfio:#?}");

    // Each daemon handed over and exited 0; the log has no warning.
    assert_eq!(daemon.log_count("took over; the device was paused for"), 3);
    let problems = daemon.log_problems();
    assert!(
        problems.is_empty(),
        "daemon warnings/errors:\n{problems:#?}"
    );
    assert!(!daemon.is_running());
    assert_eq!(daemon.status().and_then(|s| s.code()), Some(0));
    for pid in &successors.0[..2] {
        assert_eq!(
            common::upgrade::wait_exit(*pid, Duration::from_secs(10)),
            Some(0)
        );
    }
    // The last one saw QEMU go, and stops cleanly.
    assert!(daemon.wait_log_count("client detached", 1, Duration::from_secs(10)));
    let last = successors.0.pop().unwrap_or_default();
    common::upgrade::signal(last, libc::SIGTERM);
    assert_eq!(
        common::upgrade::wait_exit(last, Duration::from_secs(10)),
        Some(0)
    );
    assert!(!daemon.socket.exists() && !api.exists());
}
