//! Snapshot and restore through the daemon's control socket, driven as an
//! operator would (`vfio-user-device api ...`, `--restore FILE`), with the
//! test playing a Cloud Hypervisor-like VMM over `vfio_user::Client`. See
//! docs/migration.md.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::*;
use vmm_sys_util::tempdir::TempDir;

const VERSION_1: u64 = 1 << 32;
const INDIRECT: u64 = 1 << 28;
const BLK_FLUSH: u64 = 1 << 9;
const BLK_DISCARD: u64 = 1 << 13;
const BLK_WRITE_ZEROES: u64 = 1 << 14;
const BLK_WANT: u64 = VERSION_1
    | INDIRECT
    | BLK_FLUSH
    | BLK_DISCARD
    | BLK_WRITE_ZEROES
    | (1 << 1)
    | (1 << 2)
    | (1 << 6);
/// ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK.
const STATUS_LIVE: u8 = 1 | 2 | 8 | 4;

const IMAGE_SIZE: u64 = 8 << 20;

fn image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&pattern(7, IMAGE_SIZE as usize)).unwrap();
    path
}

#[test]
fn snapshot_restore_via_api() {
    snapshot_restore_via_api_with(&[]);
}

/// [`snapshot_restore_via_api`] with requests on I/O threads.
#[test]
fn snapshot_restore_via_api_on_io_threads() {
    snapshot_restore_via_api_with(&["--io-threads", "2"]);
}

/// [`snapshot_restore_via_api`] with requests on the event loop (`--aio sync`; the default
/// is io_uring where the kernel has it).
#[test]
fn snapshot_restore_via_api_on_the_event_loop() {
    snapshot_restore_via_api_with(&["--aio", "sync"]);
}

fn snapshot_restore_via_api_with(extra: &[&str]) {
    let dir = TempDir::new().unwrap();
    let img = image(dir.as_path());
    let api_sock = dir.as_path().join("api.sock");
    let snap = dir.as_path().join("blk.snap");
    let img_s = img.to_str().unwrap().to_string();
    let api_s = api_sock.to_str().unwrap().to_string();
    let snap_s = snap.to_str().unwrap().to_string();
    let mut args = vec!["--disk", img_s.as_str(), "--api-socket", api_s.as_str()];
    args.extend_from_slice(extra);
    let mut daemon = Daemon::start_in(dir, &args);
    wait_for_socket(&api_sock);

    // A Cloud Hypervisor-like VMM brings the device up and does I/O.
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 64);
    let w1 = pattern(1, 8192);
    assert_eq!(
        drv.blk_request(0, VIRTIO_BLK_T_OUT, 64, &w1, 0).0,
        VIRTIO_BLK_S_OK
    );
    let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, 64, &[], 8192);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(data, w1);
    assert_eq!(
        drv.blk_request(0, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0,
        VIRTIO_BLK_S_OK
    );
    let v = api_ok(&api_sock, &["status"]);
    assert_eq!(v["paused"], false);
    assert_eq!(v["connected"], true);
    assert_eq!(v["migration_state"], "Running");

    // Pause; a request made available and kicked while paused is not
    // processed (and so is not in the snapshot's indices).
    api_ok(&api_sock, &["pause"]);
    assert_eq!(api_ok(&api_sock, &["status"])["paused"], true);
    let w2 = pattern(2, 4096);
    let pending = drv.blk_submit(0, VIRTIO_BLK_T_OUT, 128, &w2, 0);
    drv.drain_interrupt(0);
    drv.kick(0);
    drv.settle();
    assert_eq!(drv.used_idx(0), 3, "a paused device completed a request");
    assert_eq!(
        read_image(&img, 128 * 512, 4096),
        pattern(7, 1 << 20)[128 * 512..][..4096]
    );
    let v = api_ok(&api_sock, &["snapshot", &snap_s]);
    let bytes = std::fs::read(&snap).unwrap();
    assert_eq!(v["bytes"], bytes.len());
    // The file is the documented stream; its queue state is the driver's.
    let s = stream::decode(&bytes);
    assert_eq!(s.version, 1);
    assert_eq!(s.kind, "virtio-blk");
    let state = s.state();
    assert_eq!(state["status"], STATUS_LIVE);
    assert_eq!(state["active"], true);
    assert_eq!(state["queues"][0]["next_avail"], 3);
    assert_eq!(state["queues"][0]["next_used"], 3);
    assert_eq!(state["queues"][0]["desc_table"], drv.queues[0].desc);
    assert_eq!(state["queues"][0]["avail_ring"], drv.queues[0].avail);
    assert_eq!(state["queues"][0]["used_ring"], drv.queues[0].used);
    assert_eq!(state["queues"][0]["vector"], 1);
    assert_eq!(state["msix_config"], 0);

    // The daemon dies (SIGKILL: no clean-up at all). The operator starts
    // a new one from the snapshot, which takes both stale sockets over.
    daemon.kill();
    assert!(api_sock.exists(), "the killed daemon's api socket is left");
    let mut args = vec![
        "--disk",
        &img_s,
        "--api-socket",
        &api_s,
        "--restore",
        &snap_s,
    ];
    args.extend_from_slice(extra);
    daemon.restart(&args);
    wait_for_listener(&api_sock);
    let v = api_ok(&api_sock, &["status"]);
    assert_eq!(v["paused"], false);
    assert_eq!(v["connected"], false);

    // The VMM reconnects (VERSION and regions in Client::new, DMA_MAP of
    // the same memfd, SET_IRQS with the same MSI-X eventfds) and carries on
    // without touching the device's set-up: no status write, no queue or
    // MSI-X configuration, no feature negotiation.
    let old = drv.reconnect(vfio_user::Client::new(&daemon.socket).expect("reconnect"));
    drop(old);
    assert_eq!(api_ok(&api_sock, &["status"])["connected"], true);
    assert_eq!(drv.status(), STATUS_LIVE);
    assert_eq!(drv.common_read(0x20, 8), drv.queues[0].desc);
    assert_eq!(drv.common_read(0x28, 8), drv.queues[0].avail);
    assert_eq!(drv.common_read(0x30, 8), drv.queues[0].used);
    assert_eq!(drv.common_read(0x1c, 2), 1, "queue enabled");
    assert_eq!(drv.common_read(0x1a, 2), 1, "queue vector");

    // The request made available before the snapshot is served, once, as
    // soon as the client can take interrupts (its SET_IRQS), with no new
    // doorbell: an interrupt on the same eventfd.
    assert!(drv.expect_interrupt(0) >= 1);
    let used = drv.poll_used(0);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].0, pending);
    assert_eq!(drv.take_result(0, pending).0, VIRTIO_BLK_S_OK);
    assert_eq!(read_image(&img, 128 * 512, 4096), w2);

    // New requests continue at the next avail index.
    assert_eq!(drv.queues[0].next_avail, 4);
    let w3 = pattern(3, 4096);
    let h = drv.blk_submit(0, VIRTIO_BLK_T_OUT, 256, &w3, 0);
    drv.kick(0);
    assert!(drv.expect_interrupt(0) >= 1);
    assert_eq!(drv.poll_used(0), vec![(h, 1)]);
    assert_eq!(drv.take_result(0, h).0, VIRTIO_BLK_S_OK);
    for (sector, want) in [
        (64, &w1[..4096]),
        (72, &w1[4096..]),
        (128, &w2[..]),
        (256, &w3[..]),
    ] {
        let h = drv.blk_submit(0, VIRTIO_BLK_T_IN, sector, &[], 4096);
        drv.kick(0);
        assert!(drv.expect_interrupt(0) >= 1);
        assert_eq!(drv.poll_used(0), vec![(h, 4096 + 1)]);
        let (st, data) = drv.take_result(0, h);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(data == want, "sector {sector} reads back wrong");
    }
    assert_eq!(drv.used_idx(0), 9);
    assert_eq!(read_image(&img, 256 * 512, 4096), w3);
    assert!(daemon.child.try_wait().unwrap().is_none());
}

/// Expects `--restore FILE` to be refused: one line on stderr naming the
/// file, a failure exit, and no socket left behind.
#[track_caller]
fn refused(dir: &Path, img: &str, extra: &[&str], file: &Path, why: &str) {
    let sock = dir.join("refused.sock");
    let mut args = vec![
        "virtio-blk",
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        img,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--restore", file.to_str().unwrap()]);
    let err = daemon_fails(&args);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{why}: not one line: {err:?}");
    let line = lines[0];
    assert!(line.starts_with("vfio-user-device: "), "{why}: {line}");
    assert!(line.contains(file.to_str().unwrap()), "{why}: {line}");
    assert!(
        !line.contains("panicked") && !line.contains("RUST_BACKTRACE"),
        "{why}: {line}"
    );
    assert!(
        sock.symlink_metadata().is_err(),
        "{why}: socket left behind"
    );
    eprintln!("{why}: {line}");
}

#[test]
fn restore_refuses_bad_snapshots() {
    let dir = TempDir::new().unwrap();
    let base = dir.as_path().to_path_buf();
    let img = image(&base);
    let img_s = img.to_str().unwrap().to_string();
    let api_sock = base.join("api.sock");
    let api_s = api_sock.to_str().unwrap().to_string();
    let mut daemon = Daemon::start_in(dir, &["--disk", &img_s, "--api-socket", &api_s]);
    wait_for_socket(&api_sock);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    let f = drv.init(BLK_WANT, 64);
    let both = BLK_DISCARD | BLK_WRITE_ZEROES;
    assert_eq!(f & both, both);
    assert_eq!(
        drv.blk_request(0, VIRTIO_BLK_T_IN, 0, &[], 512).0,
        VIRTIO_BLK_S_OK
    );
    // Snapshot refused while running.
    let good_path = base.join("good.snap");
    let (ok, v) = api(&api_sock, &["snapshot", good_path.to_str().unwrap()]);
    assert!(!ok && v["ok"] == false, "{v}");
    assert!(v["error"].as_str().unwrap().contains("pause"), "{v}");
    assert!(!good_path.exists());
    api_ok(&api_sock, &["pause"]);
    api_ok(&api_sock, &["snapshot", good_path.to_str().unwrap()]);
    api_ok(&api_sock, &["resume"]);
    drop(drv);
    let good = std::fs::read(&good_path).unwrap();
    daemon.kill();

    let write = |name: &str, bytes: &[u8]| {
        let p = base.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let mut flipped = good.clone();
    let mid = good.len() / 2;
    flipped[mid] ^= 0x01;
    let mut other_kind = stream::decode(&good);
    other_kind.kind = "virtio-net".into();
    let mut bad_json = stream::decode(&good);
    bad_json.set_state(&serde_json::json!({"status": "nonsense"}));
    let cases: Vec<(&str, PathBuf, Vec<&str>)> = vec![
        ("one byte flipped", write("flipped.snap", &flipped), vec![]),
        (
            "truncated",
            write("truncated.snap", &good[..good.len() * 2 / 3]),
            vec![],
        ),
        ("empty", write("empty.snap", &[]), vec![]),
        (
            "random bytes",
            write("random.snap", &noise(7, 4096)),
            vec![],
        ),
        (
            "another device kind",
            write("net.snap", &other_kind.encode()),
            vec![],
        ),
        (
            "state that does not parse",
            write("json.snap", &bad_json.encode()),
            vec![],
        ),
        (
            "another format version",
            write("v9.snap", &stream::encode(9, "virtio-blk", b"{}")),
            vec![],
        ),
        // The right kind, but the device is configured differently.
        (
            "other queue count",
            good_path.clone(),
            vec!["--num-queues", "2"],
        ),
        (
            "other queue size",
            good_path.clone(),
            vec!["--queue-size", "128"],
        ),
        // DISCARD and WRITE_ZEROES were negotiated; a read-only device
        // does not offer them.
        ("now read-only", good_path.clone(), vec!["--readonly"]),
        ("missing file", base.join("nonexistent.snap"), vec![]),
    ];
    for (why, file, extra) in &cases {
        refused(&base, &img_s, extra, file, why);
    }

    // The good file still restores.
    let d = Daemon::start(&["--disk", &img_s, "--restore", good_path.to_str().unwrap()]);
    let mut c = vfio_user::Client::new(&d.socket).expect("connect to the restored daemon");
    let mut status = [0u8];
    c.region_read(0, 0x14, &mut status).unwrap();
    assert_eq!(status[0], STATUS_LIVE);
}

/// A daemon on an in-memory disk with a control socket, and a driver of
/// its device, set up.
fn daemon_with_api() -> (Daemon, PathBuf, VirtioDriver) {
    let dir = TempDir::new().unwrap();
    let api_sock = dir.as_path().join("api.sock");
    let api_s = api_sock.to_str().unwrap().to_string();
    let daemon = Daemon::start_in(dir, &["--api-socket", &api_s]);
    wait_for_socket(&api_sock);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 64);
    (daemon, api_sock, drv)
}

#[test]
fn api_pause_survives_device_reset() {
    let (_daemon, api_sock, mut drv) = daemon_with_api();
    api_ok(&api_sock, &["pause"]);
    // A DEVICE_RESET and a new set-up while paused: still no DMA.
    drv.transport.reset().unwrap();
    drv.init(BLK_WANT, 64);
    let h = drv.blk_submit(0, VIRTIO_BLK_T_IN, 0, &[], 512);
    drv.kick(0);
    drv.settle();
    assert_eq!(drv.used_idx(0), 0, "a paused device served a request");
    assert_eq!(api_ok(&api_sock, &["status"])["paused"], true);
    api_ok(&api_sock, &["resume"]);
    drv.wait_used_idx(0, 1);
    assert_eq!(drv.blk_complete(0, h).0, VIRTIO_BLK_S_OK);
}

/// A local peer on the control socket that sends nothing, or a byte at a
/// time, holds up neither the device nor other requests.
#[test]
fn a_silent_api_peer_holds_up_nothing() {
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    let (_daemon, api_sock, mut drv) = daemon_with_api();
    // Silent peers, more than the daemon keeps, and one sending a byte
    // at a time.
    let silent: Vec<UnixStream> = (0..12)
        .map(|_| UnixStream::connect(&api_sock).unwrap())
        .collect();
    let mut trickle = UnixStream::connect(&api_sock).unwrap();
    let request = br#"{"command":"status"}"#;
    trickle.write_all(&request[..3]).unwrap();
    // A request on a connection of its own, answered (before, the silent
    // peers held the loop 2 s each: 26 s in all, past the read timeout).
    let status = |line: &[u8]| {
        let mut s = UnixStream::connect(&api_sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(line).unwrap();
        let mut reply = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut reply)
            .expect("no api reply within 10 s");
        serde_json::from_str::<serde_json::Value>(&reply).unwrap()
    };
    assert_eq!(status(b"{\"command\":\"status\"}\n")["connected"], true);
    // The device answers meanwhile (its wait is bounded too).
    let h = drv.blk_submit(0, VIRTIO_BLK_T_IN, 0, &[], 512);
    drv.kick(0);
    drv.wait_used_idx(0, 1);
    assert_eq!(drv.blk_complete(0, h).0, VIRTIO_BLK_S_OK);
    // The trickling request is answered once its line is whole.
    for b in &request[3..] {
        trickle.write_all(std::slice::from_ref(b)).unwrap();
    }
    trickle.write_all(b"\n").unwrap();
    trickle
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&trickle), &mut reply).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    drop(silent);
}

/// A restored device takes nothing off its rings before its VMM has set
/// everything up again (guest memory, one region per DMA_MAP as Cloud
/// Hypervisor sends them, then interrupts): a request whose buffer lies in
/// the region mapped last completes, instead of failing on memory not yet
/// mapped.
#[test]
fn a_restored_device_waits_for_the_whole_set_up() {
    use integration_tests::guest_ram::{GuestRam, GUEST_BASE};
    use integration_tests::transport::{Transport, MSIX_INDEX};
    use std::os::fd::AsRawFd;

    let dir = TempDir::new().unwrap();
    let img = image(dir.as_path());
    let img_s = img.to_str().unwrap().to_string();
    let api_sock = dir.as_path().join("api.sock");
    let api_s = api_sock.to_str().unwrap().to_string();
    let snap = dir.as_path().join("blk.snap");
    let snap_s = snap.to_str().unwrap().to_string();
    let base = ["--disk", img_s.as_str(), "--api-socket", api_s.as_str()];
    let mut daemon = Daemon::start_in(dir, &base);
    wait_for_socket(&api_sock);
    let size = 16 << 20;
    let ram = GuestRam::with_regions(&[(GUEST_BASE, size), (GUEST_BASE + 2 * size, size)]);
    let client = vfio_user::Client::new(&daemon.socket).expect("connect");
    let mut drv = VirtioDriver::connect_with_ram(client, ram);
    drv.init(BLK_WANT, 64);
    // Made available while paused, with its buffer in the second region:
    // the snapshot holds it on the ring.
    api_ok(&api_sock, &["pause"]);
    let buf = drv.ram.alloc_in(1, 4096, 512);
    let req = drv.blk_submit_descs(0, VIRTIO_BLK_T_IN, 8, &[Desc::writable(buf, 4096)]);
    drv.kick(0);
    api_ok(&api_sock, &["snapshot", &snap_s]);
    daemon.kill();
    let mut args = base.to_vec();
    args.extend(["--restore", snap_s.as_str()]);
    daemon.restart(&args);
    wait_for_listener(&api_sock);

    let mut client = vfio_user::Client::new(&daemon.socket).expect("reconnect");
    let regions = drv.ram.regions().to_vec();
    let fd = drv.ram.file.as_raw_fd();
    client.map_dma(regions[0].file_offset, regions[0].base, regions[0].size, fd);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(drv.used_idx(0), 0, "taken with half the memory mapped");
    client.map_dma(regions[1].file_offset, regions[1].base, regions[1].size, fd);
    client.set_irq_eventfds(MSIX_INDEX, 0, &drv.msix_fds());
    drop(drv.replace_transport(client));
    drv.wait_used_idx(0, 1);
    assert_eq!(drv.blk_complete(0, req.head).0, VIRTIO_BLK_S_OK);
    let data = drv.ram.read(buf, 4096);
    assert!(data == pattern(7, IMAGE_SIZE as usize)[8 * 512..][..4096]);
}
