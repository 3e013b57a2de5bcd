//! A Linux guest (QEMU TCG, `vfio-user-pci`) moving real traffic through
//! our virtio-net on a TAP in a network namespace the test makes: the
//! interface with our MAC and MTU, ping, 4 MiB each way through `nc` with
//! the checksums compared, with and without offloads, two queue pairs, the
//! TAP flapped, a reset guest, and a restarted daemon. Only addresses
//! inside the test's namespace are used.

mod common;
mod vm;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use vm::{Daemon, Vm, VmRun, VmSpec};
use vmm_sys_util::tempdir::TempDir;

const MAC: &str = "52:54:00:77:00:02";
const HOST_IP: &str = "10.77.0.1";
const GUEST_CIDR: &str = "10.77.0.2/24";
const GUEST_IP: &str = "10.77.0.2";
const BYTES: usize = 4 << 20;
/// Feature bits the offloads switch decides (CSUM, GUEST_CSUM, HOST_TSO4,
/// GUEST_TSO4, CTRL_GUEST_OFFLOADS).
const OFFLOAD_BITS: [usize; 5] = [0, 1, 11, 7, 2];

/// The namespace, its TAP `vtap0` (with the host's address) and the
/// daemon serving it.
struct NetSetup {
    ns: NetNs,
    daemon: Daemon,
    dir: TempDir,
    env: PathBuf,
}

fn setup(multi_queue: bool, args: &[&str]) -> Option<NetSetup> {
    let env = vm::env()?;
    let ns = NetNs::new()?;
    ns.add_tap("vtap0", multi_queue, Some(&format!("{HOST_IP}/24")));
    let dir = TempDir::new().unwrap();
    let mut all = vec!["--tap", "vtap0", "--mac", MAC];
    all.extend_from_slice(args);
    let launcher = ["ip", "netns", "exec", ns.name.as_str()];
    let daemon = Daemon::start_kind(dir.as_path(), &launcher, "virtio-net", &all);
    Some(NetSetup {
        ns,
        daemon,
        dir,
        env,
    })
}

impl NetSetup {
    fn busybox(&self) -> PathBuf {
        self.env.join("rootfs/usr/bin/busybox")
    }

    fn spec(&self) -> VmSpec {
        VmSpec::new("net")
            .param("ip", GUEST_CIDR)
            .param("peer", HOST_IP)
            .param("bytes", BYTES)
            .vfio_user(&self.daemon.socket, "net0")
            .timeout(Duration::from_secs(300))
    }

    /// Listens on port 5002 in the namespace for the guest's data; its
    /// stdin is kept open (busybox nc stops at its first read otherwise).
    fn listen(&self) -> Child {
        self.ns
            .exec(self.busybox())
            .args(["nc", "-l", "-p", "5002"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Sends `data` to the guest's port 5001 once it listens.
    fn send_to_guest(&self, vm: &Vm, data: &Path) {
        vm.wait_result("listening", Duration::from_secs(240))
            .unwrap_or_else(|| panic!("the guest never listened:\n{}", vm.console().join("\n")));
        self.send(data);
    }

    /// Sends `data` to the guest's port 5001 (a few tries: the guest
    /// reports listening from its socket table, a moment after nc starts).
    fn send(&self, data: &Path) {
        for _ in 0..10 {
            let status = self
                .ns
                .exec(self.busybox())
                .args(["nc", GUEST_IP, "5001"])
                .stdin(std::fs::File::open(data).unwrap())
                .stdout(Stdio::null())
                .status()
                .unwrap();
            if status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("cannot send to the guest");
    }
}

/// What the host got from the guest's port 5002 sender.
fn received(mut listener: Child) -> Vec<u8> {
    let mut out = listener.stdout.take().unwrap();
    let mut data = Vec::new();
    let reader = std::thread::spawn(move || {
        out.read_to_end(&mut data).unwrap();
        data
    });
    // nc ends when the guest closes; its stdin is dropped after that.
    let deadline = Instant::now() + Duration::from_secs(120);
    while listener.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the guest's data never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(listener.stdin.take());
    reader.join().unwrap()
}

fn random_file(dir: &Path) -> (PathBuf, String) {
    let data = vm::random_bytes(BYTES);
    let path = dir.join("to-guest.bin");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&data)
        .unwrap();
    (path, vm::sha256_hex(&data))
}

/// Checks one boot's results: our MAC and the TAP's MTU, ping, the bytes
/// both ways.
fn check_traffic(run: &VmRun, to_guest_sha: &str, from_guest: &[u8]) {
    run.expect("mac", MAC);
    run.expect("mtu", "1500");
    run.expect("carrier", "1");
    run.expect("ping_rc", "0");
    run.expect("rx_bytes", &BYTES.to_string());
    run.expect("rx_sha256", to_guest_sha);
    run.expect("tx_rc", "0");
    assert_eq!(from_guest.len(), BYTES, "bytes from the guest");
    run.expect("tx_sha256", &vm::sha256_hex(from_guest));
}

/// Boots a guest on `s` with `spec` changes, moves the data both ways,
/// and returns what it printed.
fn traffic_run(s: &NetSetup, spec: impl FnOnce(VmSpec) -> VmSpec) -> VmRun {
    let (to_guest, to_guest_sha) = random_file(s.dir.as_path());
    let listener = s.listen();
    let vm = Vm::start(&s.env, spec(s.spec()));
    s.send_to_guest(&vm, &to_guest);
    let from_guest = received(listener);
    let run = vm.finish();
    run.assert_passed();
    check_traffic(&run, &to_guest_sha, &from_guest);
    run
}

/// Whether feature bit `bit` is set in the guest's feature string.
fn has_feature(run: &VmRun, bit: usize) -> bool {
    run.result("features").as_bytes().get(bit) == Some(&b'1')
}

#[test]
fn vm_net_traffic_with_offloads() {
    let Some(mut s) = setup(false, &[]) else {
        return;
    };
    let run = traffic_run(&s, |spec| spec);
    for bit in OFFLOAD_BITS {
        assert!(has_feature(&run, bit), "feature {bit} not negotiated");
    }
    run.expect("rx_queues", "1");
    eprintln!(
        "virtio-net: ping {} ms, to guest {} cs, from guest {} cs",
        run.result("ping_avg_ms"),
        run.result("rx_cs"),
        run.result("tx_cs")
    );
    assert_eq!(s.daemon.log_problems(), Vec::<String>::new());
    s.daemon.assert_serves_new_client();
}

#[test]
fn vm_net_traffic_without_offloads() {
    let Some(mut s) = setup(false, &["--no-offloads"]) else {
        return;
    };
    let run = traffic_run(&s, |spec| spec);
    for bit in OFFLOAD_BITS {
        assert!(!has_feature(&run, bit), "feature {bit} offered");
    }
    s.daemon.assert_serves_new_client();
}

#[test]
fn vm_net_two_queue_pairs() {
    let Some(s) = setup(true, &["--num-queue-pairs", "2"]) else {
        return;
    };
    let run = traffic_run(&s, |spec| spec.arg("-smp").arg("2"));
    // The driver asked for both pairs (MQ) and uses them.
    assert!(has_feature(&run, 22), "MQ not negotiated");
    run.expect("rx_queues", "2");
}

#[test]
fn vm_net_link_flap_and_recovery() {
    let Some(s) = setup(false, &[]) else {
        return;
    };
    let (to_guest, to_guest_sha) = random_file(s.dir.as_path());
    let listener = s.listen();
    let vm = Vm::start(&s.env, s.spec().param("flap", 1));
    s.send_to_guest(&vm, &to_guest);
    vm.wait_result("flap_ready", Duration::from_secs(240))
        .expect("the guest never got ready for the flap");
    s.ns.ip(&["link", "set", "vtap0", "down"]);
    vm.wait_result("link_down_seen", Duration::from_secs(30))
        .expect("the guest never saw the link go down");
    s.ns.ip(&["link", "set", "vtap0", "up"]);
    let from_guest = received(listener);
    let run = vm.finish();
    run.assert_passed();
    run.expect("link_up_seen", "1");
    run.expect("ping2_rc", "0");
    check_traffic(&run, &to_guest_sha, &from_guest);
}

/// Waits until `vm` printed `VMTEST-RESULT key=` `n` times.
fn wait_results(vm: &Vm, key: &str, n: usize, timeout: Duration) {
    let prefix = format!("VMTEST-RESULT {key}=");
    let deadline = Instant::now() + timeout;
    while vm
        .console()
        .iter()
        .filter(|l| l.starts_with(&prefix))
        .count()
        < n
    {
        assert!(
            Instant::now() < deadline,
            "{key} printed fewer than {n} times:\n{}",
            vm.console().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn vm_net_guest_reset_then_daemon_restart() {
    let Some(mut s) = setup(false, &[]) else {
        return;
    };
    // A guest reset (QEMU resets the device through vfio-user) and a
    // second boot that moves traffic again on the same connection.
    let qmp_path = s.dir.as_path().join("qmp.sock");
    let (to_guest, _) = random_file(s.dir.as_path());
    let spec = s.spec().param("hold", 1).qmp(&qmp_path).allow_reboot();
    let listener = s.listen();
    let vm = Vm::start(&s.env, spec);
    s.send_to_guest(&vm, &to_guest);
    let first = received(listener);
    assert_eq!(first.len(), BYTES);
    wait_results(&vm, "holding", 1, Duration::from_secs(120));
    let mut qmp = vm::qmp::Qmp::connect(&qmp_path, Duration::from_secs(10)).expect("qmp");
    qmp.execute("system_reset", None).expect("system_reset");
    // The second boot listens again: send once more.
    wait_results(&vm, "listening", 2, Duration::from_secs(240));
    let listener = s.listen();
    let status =
        s.ns.exec(s.busybox())
            .args(["nc", GUEST_IP, "5001"])
            .stdin(std::fs::File::open(&to_guest).unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap();
    assert!(status.success());
    let second = received(listener);
    assert_eq!(second.len(), BYTES, "traffic after the guest reset");
    wait_results(&vm, "holding", 2, Duration::from_secs(120));
    let run = vm.kill_and_collect();
    assert_eq!(run.markers.all("ping_rc"), ["0", "0"], "{}", run.report());
    assert_eq!(
        s.daemon.log_count("client attached"),
        1,
        "one connection for both boots"
    );

    // The daemon killed and started again on the same socket and TAP
    // serves the next guest.
    s.daemon.sigkill();
    s.daemon.restart();
    traffic_run(&s, |spec| spec);
}
