//! The daemon serving virtio-net on a TAP in a network namespace the test
//! makes, driven as Cloud Hypervisor drives it (the published
//! `vfio_user::Client`): frames cross the TAP both ways, byte for byte.
//! Frames only ever go to the test's own namespace.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::netns::{NetNs, PacketSocket};
use common::*;
use vmm_sys_util::tempdir::TempDir;

/// The guest's MAC.
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
const MAC_TEXT: &str = "52:54:00:aa:bb:cc";
/// An EtherType for local experiments: nothing in the namespace answers.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// virtio-net feature bits the driver asks for.
const F_MAC: u64 = 1 << 5;
const F_MTU: u64 = 1 << 3;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_MRG_RXBUF: u64 = 1 << 15;
/// Queues: receive 0, transmit 1 (one pair).
const RX: usize = 0;
const TX: usize = 1;
const HDR: usize = 12;

struct NetDaemon {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

impl Drop for NetDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the daemon inside `ns` on its TAP `vtap0`, with guest MAC `MAC`.
fn start(ns: &NetNs, args: &[&str]) -> NetDaemon {
    let mut all = vec!["--mac", MAC_TEXT];
    all.extend_from_slice(args);
    start_with(ns, &all)
}

/// Starts the daemon inside `ns` on its TAP `vtap0`, with `args`.
fn start_with(ns: &NetNs, args: &[&str]) -> NetDaemon {
    let dir = TempDir::new().unwrap();
    let socket = dir.as_path().join("net.sock");
    let child = ns
        .exec(env!("CARGO_BIN_EXE_vfio-user-device"))
        .args(["virtio-net", "--tap", "vtap0", "--socket"])
        .arg(&socket)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_for_socket(&socket);
    NetDaemon {
        child,
        socket,
        _dir: dir,
    }
}

/// An Ethernet frame to `dst` from `src` carrying `payload`.
fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(payload);
    f
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// A namespace with TAP `vtap0` (its own MAC from the kernel), the daemon
/// on it, and the driver attached with `features` and MSI-X.
fn setup(args: &[&str], features: u64) -> Option<(NetNs, NetDaemon, VirtioDriver, PacketSocket)> {
    let ns = NetNs::new()?;
    ns.add_tap("vtap0", false, None);
    let daemon = start(&ns, args);
    let packets = ns.packet_socket("vtap0");
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(VIRTIO_F_VERSION_1 | features, 64);
    Some((ns, daemon, drv, packets))
}

fn device_mac(drv: &mut VirtioDriver) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = drv.device_config(i as u64, 1) as u8;
    }
    mac
}

/// Posts `n` receive chains of `len` bytes each (in `pieces` buffers).
fn post_rx(drv: &mut VirtioDriver, n: usize, len: u32, pieces: u32) -> Vec<(u16, Vec<u64>)> {
    let mut posted = Vec::new();
    for _ in 0..n {
        let bufs: Vec<u64> = (0..pieces)
            .map(|_| drv.ram.alloc(u64::from(len / pieces), 8))
            .collect();
        let descs: Vec<Desc> = bufs
            .iter()
            .map(|&a| Desc::writable(a, len / pieces))
            .collect();
        let head = drv.push(RX, &descs);
        posted.push((head, bufs));
    }
    drv.kick(RX);
    posted
}

/// The bytes of a receive chain `(head, buffers)` that the device wrote.
fn rx_bytes(drv: &VirtioDriver, bufs: &[u64], piece: u32, len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in bufs {
        out.extend(drv.ram.read(b, piece as usize));
    }
    out.truncate(len as usize);
    out
}

#[test]
fn config_space_has_our_mac_the_tap_mtu_and_link_up() {
    let Some((_ns, _d, mut drv, _p)) = setup(&[], F_MAC | F_MTU | F_STATUS) else {
        return;
    };
    assert_eq!(device_mac(&mut drv), MAC);
    assert_eq!(drv.device_config(6, 2) & 1, 1, "link up");
    assert_eq!(drv.device_config(10, 2), 1500, "the TAP's MTU");
}

#[test]
fn a_frame_split_over_descriptors_leaves_the_tap_whole() {
    let Some((_ns, _d, mut drv, packets)) = setup(&[], F_MAC) else {
        return;
    };
    let dst = [0x02, 0, 0, 0, 0, 0x01];
    let expected = frame(dst, MAC, &pattern(1000, 7));
    // Header, Ethernet header and payload in three buffers.
    let hdr = drv.ram.alloc(HDR as u64, 8);
    drv.ram.write(hdr, &[0; HDR]);
    let eth = drv.ram.alloc(14, 8);
    drv.ram.write(eth, &expected[..14]);
    let body = drv.ram.alloc(1000, 8);
    drv.ram.write(body, &expected[14..]);
    drv.push(
        TX,
        &[
            Desc::readable(hdr, HDR as u32),
            Desc::readable(eth, 14),
            Desc::readable(body, 1000),
        ],
    );
    drv.kick(TX);
    assert_eq!(drv.wait_used(TX, 1).len(), 1);
    let got = packets
        .recv_matching(Duration::from_secs(5), |f| {
            f.get(12..14) == Some(&ETHERTYPE[..])
        })
        .expect("the frame never came out of the TAP");
    assert_eq!(got, expected);
}

#[test]
fn a_frame_sent_into_the_tap_reaches_the_guest_buffers() {
    for (features, pieces) in [(F_MAC, 1), (F_MAC, 3), (F_MAC | F_MRG_RXBUF, 1)] {
        let Some((_ns, _d, mut drv, packets)) = setup(&[], features) else {
            return;
        };
        // Nothing waits yet: posting buffers uses none of them.
        let posted = post_rx(&mut drv, 4, 3 * 1024, pieces);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            drv.poll_used(RX).is_empty(),
            "a buffer used without a frame"
        );
        let sent = frame(MAC, [0x02, 0, 0, 0, 0, 0x02], &pattern(1400, 3));
        packets.send(&sent);
        let used = drv.wait_used(RX, 1);
        let (head, len) = used[0];
        assert_eq!(head, posted[0].0, "the first buffer posted is used first");
        assert_eq!(len as usize, HDR + sent.len());
        let bytes = rx_bytes(&drv, &posted[0].1, 3 * 1024 / pieces, len);
        // num_buffers is 1, the rest of the header as the TAP wrote it.
        assert_eq!(&bytes[10..12], &1u16.to_le_bytes(), "num_buffers");
        assert_eq!(
            &bytes[HDR..],
            &sent[..],
            "features {features:#x}, {pieces} piece(s)"
        );
    }
}

#[test]
fn a_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_reused() {
    let Some((_ns, _d, mut drv, packets)) = setup(&[], F_MAC) else {
        return;
    };
    // One small buffer: a 1000-byte frame does not fit and is dropped, as
    // is one a byte too long...
    let posted = post_rx(&mut drv, 1, 256, 1);
    packets.send(&frame(MAC, [0x02, 0, 0, 0, 0, 0x02], &pattern(1000, 1)));
    packets.send(&frame(
        MAC,
        [0x02, 0, 0, 0, 0, 0x02],
        &pattern(256 - HDR - 14 + 1, 1),
    ));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        drv.poll_used(RX).is_empty(),
        "a truncated frame was delivered"
    );
    // ...and the buffer is not lost: the next frame, which fills it
    // exactly, lands in it.
    let small = frame(MAC, [0x02, 0, 0, 0, 0, 0x02], &pattern(256 - HDR - 14, 2));
    packets.send(&small);
    let used = drv.wait_used(RX, 1);
    assert_eq!(used[0], (posted[0].0, (HDR + small.len()) as u32));
    assert_eq!(
        &rx_bytes(&drv, &posted[0].1, 256, used[0].1)[HDR..],
        &small[..]
    );
}

#[test]
fn every_control_command_gets_an_answer() {
    let Some((_ns, _d, mut drv, _p)) = setup(&[], F_MAC | F_CTRL_VQ) else {
        return;
    };
    let ctrl = 2;
    // (class, command, data, expected ack): RX and VLAN tolerated, an
    // offload change without CTRL_GUEST_OFFLOADS acked refused, MQ without
    // MQ refused, an unknown class refused.
    for (class, cmd, data, ack) in [
        (0u8, 0u8, vec![1u8], 0u8),
        (0, 1, vec![0], 0),
        (2, 0, vec![0, 1], 0),
        (1, 0, vec![0; 8], 0),
        (3, 0, vec![], 0),
        (5, 0, vec![0; 8], 1),
        (4, 0, vec![1, 0], 1),
        (9, 9, vec![], 1),
    ] {
        let head_buf = drv.ram.alloc(2 + data.len() as u64, 8);
        let mut bytes = vec![class, cmd];
        bytes.extend(&data);
        drv.ram.write(head_buf, &bytes);
        let ack_buf = drv.ram.alloc(1, 8);
        drv.ram.write(ack_buf, &[0xee]);
        drv.push(
            ctrl,
            &[
                Desc::readable(head_buf, bytes.len() as u32),
                Desc::writable(ack_buf, 1),
            ],
        );
        drv.kick(ctrl);
        let used = drv.wait_used(ctrl, 1);
        assert_eq!(used[0].1, 1);
        assert_eq!(
            drv.ram.read(ack_buf, 1)[0],
            ack,
            "class {class} command {cmd}"
        );
    }
}

#[test]
fn a_missing_tap_or_a_queue_count_it_cannot_serve_is_a_clear_error() {
    let Some(ns) = NetNs::new() else {
        return;
    };
    ns.add_tap("vtap0", false, None);
    let run = |args: &[&str]| {
        let out = ns
            .exec(env!("CARGO_BIN_EXE_vfio-user-device"))
            .args(["virtio-net", "--socket", "/nonexistent/s.sock"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let missing = run(&["--tap", "nope0"]);
    assert!(
        missing.contains("nope0") && missing.contains("does not exist"),
        "{missing}"
    );
    assert!(!Path::new(&format!("/run/netns/{}", ns.name))
        .join("nope0")
        .exists());
    let out = ns
        .exec("ip")
        .args(["link", "show", "nope0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a TAP was created by trying");
    let mq = run(&["--tap", "vtap0", "--num-queue-pairs", "2"]);
    assert!(mq.contains("multi_queue"), "{mq}");
}

#[test]
fn snapshot_restore_keeps_the_nic_and_asks_the_guest_to_announce_itself() {
    const F_GUEST_ANNOUNCE: u64 = 1 << 21;
    let Some(ns) = NetNs::new() else {
        return;
    };
    ns.add_tap("vtap0", false, None);
    let dir = TempDir::new().unwrap();
    let api = dir.as_path().join("api.sock");
    let snap = dir.as_path().join("net.snap");
    let api_s = api.to_str().unwrap().to_string();
    let mut daemon = start(&ns, &["--api-socket", &api_s]);
    let packets = ns.packet_socket("vtap0");
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(
        VIRTIO_F_VERSION_1 | F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE,
        64,
    );
    let posted = post_rx(&mut drv, 2, 2048, 1);
    assert_eq!(drv.device_config(6, 2), 1, "link up, nothing to announce");

    api_ok(&api, &["pause"]);
    api_ok(&api, &["snapshot", snap.to_str().unwrap()]);
    let s = stream::decode(&std::fs::read(&snap).unwrap());
    assert_eq!(s.kind, "virtio-net");

    // A new daemon from the snapshot, on the same TAP; the VMM reconnects
    // with the same guest memory and interrupts.
    let _ = daemon.child.kill();
    let _ = daemon.child.wait();
    std::fs::remove_file(&api).unwrap();
    let snap_s = snap.to_str().unwrap().to_string();
    let restored = start(&ns, &["--restore", &snap_s]);
    drop(drv.reconnect(vfio_user::Client::new(&restored.socket).expect("reconnect")));
    assert_eq!(device_mac(&mut drv), MAC);
    // The guest is told to announce itself (configuration interrupt, status
    // bit) and acknowledges it through the control queue.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !drv.msix[0].fired() {
        assert!(
            std::time::Instant::now() < deadline,
            "no configuration interrupt"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(drv.device_config(6, 2), 3, "link up and announce");
    let cmd = drv.ram.alloc(2, 8);
    drv.ram.write(cmd, &[3, 0]);
    let ack = drv.ram.alloc(1, 8);
    drv.push(2, &[Desc::readable(cmd, 2), Desc::writable(ack, 1)]);
    drv.kick(2);
    drv.wait_used(2, 1);
    assert_eq!(drv.ram.read(ack, 1), [0]);
    assert_eq!(drv.device_config(6, 2), 1, "announce acknowledged");
    // The receive buffers posted before the snapshot take the next frame.
    let sent = frame(MAC, [0x02, 0, 0, 0, 0, 0x03], &pattern(300, 9));
    packets.send(&sent);
    let used = drv.wait_used(RX, 1);
    assert_eq!(used[0].0, posted[0].0);
    assert_eq!(
        &rx_bytes(&drv, &posted[0].1, 2048, used[0].1)[HDR..],
        &sent[..]
    );
    drop(restored);
}

/// `api ... upgrade` under the published client: frames cross the TAP
/// both ways before, during and after two upgrades (the new daemons take
/// the TAP queue over, not reopen it); receive buffers posted before an
/// upgrade take the frames that come after it; interrupts keep arriving;
/// the replaced daemons exit 0.
#[test]
fn frames_cross_the_tap_both_ways_across_upgrades() {
    let Some(ns) = NetNs::new() else {
        return;
    };
    upgrade::become_subreaper();
    ns.add_tap("vtap0", false, None);
    let dir = TempDir::new().unwrap();
    let api = dir.as_path().join("api.sock");
    let api_s = api.to_str().unwrap().to_string();
    let mut daemon = start(&ns, &["--api-socket", &api_s]);
    let mut successors = Vec::new();
    let packets = ns.packet_socket("vtap0");
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(VIRTIO_F_VERSION_1 | F_MAC | F_STATUS | F_CTRL_VQ, 64);
    let peer = [0x02, 0, 0, 0, 0, 0x07];
    // The guest sends a frame out of the TAP.
    let send = |drv: &mut VirtioDriver, seed: u8| {
        let f = frame(peer, MAC, &pattern(700, seed));
        let b = drv.ram.alloc((HDR + f.len()) as u64, 8);
        let mut bytes = vec![0u8; HDR];
        bytes.extend(&f);
        drv.ram.write(b, &bytes);
        drv.push(TX, &[Desc::readable(b, bytes.len() as u32)]);
        drv.kick(TX);
        assert_eq!(drv.wait_used(TX, 1).len(), 1);
        let got = packets
            .recv_matching(Duration::from_secs(5), |g| g == f.as_slice())
            .expect("the guest's frame never came out of the TAP");
        assert_eq!(got, f);
    };
    // A frame into the TAP lands in the oldest posted buffer.
    let receive = |drv: &mut VirtioDriver, posted: &(u16, Vec<u64>), seed: u8| {
        let f = frame(MAC, peer, &pattern(900, seed));
        packets.send(&f);
        let used = drv.wait_used(RX, 1);
        assert_eq!(used[0].0, posted.0, "a frame in the wrong buffer");
        assert_eq!(&rx_bytes(drv, &posted.1, 2048, used[0].1)[HDR..], &f[..]);
    };
    let posted = post_rx(&mut drv, 4, 2048, 1);
    send(&mut drv, 1);
    receive(&mut drv, &posted[0], 2);
    for round in 0..2u8 {
        let v = api_ok(&api, &["upgrade"]);
        let pid = v["pid"].as_u64().unwrap() as u32;
        successors.push(pid);
        eprintln!("upgrade {round}: {v}");
        // Buffers posted before the upgrade take the frames after it.
        receive(&mut drv, &posted[1 + usize::from(round)], 10 + round);
        send(&mut drv, 20 + round);
        let status = api_ok(&api, &["status"]);
        assert_eq!(status["pid"], pid);
        assert_eq!(status["connected"], true);
    }
    let more = post_rx(&mut drv, 2, 2048, 1);
    receive(&mut drv, &posted[3], 30);
    receive(&mut drv, &more[0], 31);
    assert_eq!(daemon.child.wait().unwrap().code(), Some(0));
    assert_eq!(
        upgrade::wait_exit(successors[0], Duration::from_secs(10)),
        Some(0)
    );
    for pid in successors {
        upgrade::kill(pid);
    }
}

/// A daemon started without `--mac` made one up; the daemon that takes
/// over describes the MAC the guest has, not one of its own.
#[test]
fn an_upgrade_describes_the_mac_the_guest_has() {
    let Some(ns) = NetNs::new() else {
        return;
    };
    upgrade::become_subreaper();
    ns.add_tap("vtap0", false, None);
    let dir = TempDir::new().unwrap();
    let api = dir.as_path().join("api.sock");
    let api_s = api.to_str().unwrap().to_string();
    let mut daemon = start_with(&ns, &["--api-socket", &api_s]);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(VIRTIO_F_VERSION_1 | F_MAC | F_STATUS, 64);
    let mac: Vec<String> = (0..6)
        .map(|i| format!("{:02x}", drv.device_config(i, 1)))
        .collect();
    let mac = mac.join(":");
    let described = |api: &std::path::Path| {
        api_ok(api, &["status"])["device"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(described(&api).contains(&mac), "{mac}: {}", described(&api));
    let v = api_ok(&api, &["upgrade"]);
    let pid = v["pid"].as_u64().unwrap() as u32;
    let after = described(&api);
    let now: Vec<String> = (0..6)
        .map(|i| format!("{:02x}", drv.device_config(i, 1)))
        .collect();
    // The new daemon goes before anything is checked, failed or not.
    upgrade::kill(pid);
    assert!(after.contains(&mac), "{mac}: {after}");
    assert_eq!(now.join(":"), mac);
    assert_eq!(daemon.child.wait().unwrap().code(), Some(0));
}
