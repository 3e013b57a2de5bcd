//! The daemon driven exactly as Cloud Hypervisor drives it, through the
//! published `vfio_user::Client`, with a test-side virtio driver.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use common::*;
use vmm_sys_util::tempdir::TempDir;

const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;
const INDIRECT: u64 = 1 << 28;
const BLK_RO: u64 = 1 << 5;
const BLK_FLUSH: u64 = 1 << 9;
const BLK_MQ: u64 = 1 << 12;
const BLK_DISCARD: u64 = 1 << 13;
const BLK_WRITE_ZEROES: u64 = 1 << 14;
const BLK_WANT: u64 = VERSION_1
    | INDIRECT
    | BLK_RO
    | BLK_FLUSH
    | BLK_MQ
    | BLK_DISCARD
    | BLK_WRITE_ZEROES
    | (1 << 1)
    | (1 << 2)
    | (1 << 6);

const IMAGE_SIZE: u64 = 8 << 20;

/// A raw image with a known pattern, in the daemon's temp dir.
fn image(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.as_path().join("disk.img");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&pattern(7, IMAGE_SIZE as usize)).unwrap();
    path
}

fn daemon_with_image(extra: &[&str]) -> (Daemon, std::path::PathBuf) {
    let dir = TempDir::new().unwrap();
    let img = image(&dir);
    let mut args = vec!["--disk", img.to_str().unwrap()];
    args.extend_from_slice(extra);
    let d = Daemon::start_in(dir, &args);
    (d, img)
}

#[test]
fn io_requests_reach_the_image() {
    io_requests_reach_the_image_with(&[]);
}

/// [`io_requests_reach_the_image`] with reads, writes and flushes on I/O threads.
#[test]
fn io_requests_reach_the_image_on_io_threads() {
    io_requests_reach_the_image_with(&["--io-threads", "2"]);
}

/// [`io_requests_reach_the_image`] with requests on the event loop (`--aio sync`; the default
/// is io_uring where the kernel has it).
#[test]
fn io_requests_reach_the_image_on_the_event_loop() {
    io_requests_reach_the_image_with(&["--aio", "sync"]);
}

fn io_requests_reach_the_image_with(extra: &[&str]) {
    let (daemon, img) = daemon_with_image(extra);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    assert!(
        drv.bar_sizes.iter().any(|s| *s >= 0x1000),
        "no BAR sized: {:?}",
        drv.bar_sizes
    );
    let f = drv.init(BLK_WANT, 128);
    assert!(f & VERSION_1 != 0);
    assert!(f & BLK_RO == 0);
    let capacity = drv.device_config(0, 8);
    assert_eq!(capacity, IMAGE_SIZE / 512);

    // Read what the host wrote.
    let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, 16, &[], 4096);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(data, read_image(&img, 16 * 512, 4096));

    // Write, and find the bytes in the image file.
    let w = pattern(99, 8192);
    let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_OUT, 64, &w, 0);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(read_image(&img, 64 * 512, 8192), w);
    let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    assert_eq!(st, VIRTIO_BLK_S_OK);

    // GET_ID answers 20 bytes.
    let (st, id) = drv.blk_request(0, VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(id.len(), 20);

    // Discard and write-zeroes: the range reads back as zeroes.
    if f & BLK_WRITE_ZEROES != 0 {
        let mut seg = Vec::new();
        seg.extend_from_slice(&128u64.to_le_bytes());
        seg.extend_from_slice(&8u32.to_le_bytes());
        seg.extend_from_slice(&0u32.to_le_bytes());
        let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg, 0);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert_eq!(read_image(&img, 128 * 512, 4096), vec![0u8; 4096]);
    }
    if f & BLK_DISCARD != 0 {
        let mut seg = Vec::new();
        seg.extend_from_slice(&256u64.to_le_bytes());
        seg.extend_from_slice(&8u32.to_le_bytes());
        seg.extend_from_slice(&0u32.to_le_bytes());
        let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_DISCARD, 0, &seg, 0);
        assert_eq!(st, VIRTIO_BLK_S_OK);
    }

    // Bad requests: unknown type, out of range, buffer outside guest RAM.
    let (st, _) = drv.blk_request(0, 0x77, 0, &[], 0);
    assert_eq!(st, VIRTIO_BLK_S_UNSUPP);
    let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_IN, IMAGE_SIZE / 512, &[], 512);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_IN, u64::MAX / 512, &[], 512);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    let hdr = drv.blk_header(VIRTIO_BLK_T_IN, 0);
    let status = drv.blk_status_buffer();
    drv.push(
        0,
        &[
            Desc::readable(hdr, 16),
            Desc::writable(0x10, 512),
            Desc::writable(status, 1),
        ],
    );
    drv.kick(0);
    drv.wait_used(0, 1);
    assert_eq!(drv.ram.read(status, 1)[0], VIRTIO_BLK_S_IOERR);

    // The device still works.
    let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, 64, &[], 8192);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(data, w);
}

#[test]
fn several_queues_and_event_idx() {
    let (daemon, img) = daemon_with_image(&["--num-queues", "2", "--queue-size", "64"]);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    let f = drv.init(BLK_WANT | EVENT_IDX, 64);
    assert!(f & BLK_MQ != 0 && f & EVENT_IDX != 0);
    assert_eq!(drv.queues.len(), 2);
    for round in 0..20u64 {
        for q in 0..2 {
            let w = pattern((round * 2 + q as u64) as u8, 4096);
            let sector = 8 * (round * 2 + q as u64);
            let (st, _) = drv.blk_request(q, VIRTIO_BLK_T_OUT, sector, &w, 0);
            assert_eq!(st, VIRTIO_BLK_S_OK);
            assert_eq!(read_image(&img, sector * 512, 4096), w);
        }
    }
    // A batch of 16 requests in flight on one queue, one kick.
    let heads: Vec<u16> = (0..16)
        .map(|i| drv.blk_submit(1, VIRTIO_BLK_T_IN, 8 * i, &[], 4096))
        .collect();
    drv.kick(1);
    for h in heads {
        assert_eq!(drv.blk_complete(1, h).0, VIRTIO_BLK_S_OK);
    }
}

#[test]
fn readonly_disk_refuses_writes() {
    let (daemon, img) = daemon_with_image(&["--readonly"]);
    let before = read_image(&img, 0, IMAGE_SIZE as usize);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    let f = drv.init(BLK_WANT, 64);
    assert!(f & BLK_RO != 0);
    let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_OUT, 0, &[0u8; 512], 0);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, 0, &[], 512);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(data, before[..512]);
    assert_eq!(read_image(&img, 0, IMAGE_SIZE as usize), before);
}

#[test]
fn reset_and_reinitialise() {
    let (daemon, _img) = daemon_with_image(&[]);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 32);
    assert_eq!(
        drv.blk_request(0, VIRTIO_BLK_T_IN, 0, &[], 512).0,
        VIRTIO_BLK_S_OK
    );
    // Through the status register...
    drv.init(BLK_WANT, 32);
    assert_eq!(
        drv.blk_request(0, VIRTIO_BLK_T_IN, 8, &[], 512).0,
        VIRTIO_BLK_S_OK
    );
    // ...and through DEVICE_RESET.
    drv.transport.reset().unwrap();
    assert_eq!(drv.status(), 0);
    drv.init(BLK_WANT, 32);
    assert_eq!(
        drv.blk_request(0, VIRTIO_BLK_T_IN, 16, &[], 512).0,
        VIRTIO_BLK_S_OK
    );
}

#[test]
fn disconnect_in_flight_then_reconnect_is_consistent() {
    disconnect_in_flight_then_reconnect_is_consistent_with(&[]);
}

/// [`disconnect_in_flight_then_reconnect_is_consistent`] with requests in flight on I/O threads at the disconnect.
#[test]
fn disconnect_in_flight_then_reconnect_is_consistent_on_io_threads() {
    disconnect_in_flight_then_reconnect_is_consistent_with(&["--io-threads", "2"]);
}

/// [`disconnect_in_flight_then_reconnect_is_consistent`] with requests on the event loop (`--aio sync`; the default
/// is io_uring where the kernel has it).
#[test]
fn disconnect_in_flight_then_reconnect_is_consistent_on_the_event_loop() {
    disconnect_in_flight_then_reconnect_is_consistent_with(&["--aio", "sync"]);
}

fn disconnect_in_flight_then_reconnect_is_consistent_with(extra: &[&str]) {
    let (daemon, img) = daemon_with_image(extra);
    {
        let mut drv = VirtioDriver::connect(&daemon.socket);
        drv.init(BLK_WANT, 128);
        // 3 descriptors each: 40 requests fit in the 128-entry table.
        for i in 0..40u64 {
            drv.blk_submit(0, VIRTIO_BLK_T_OUT, 8 * i, &[0xab; 4096], 0);
        }
        drv.kick(0);
        drv.transport.shutdown().unwrap();
    }
    // A new client (a rebooted guest) finds a fresh device and a
    // consistent disk: every 4 KiB block is either all old or all new.
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 128);
    let original = pattern(7, IMAGE_SIZE as usize);
    for i in 0..40u64 {
        let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, 8 * i, &[], 4096);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        let off = (i * 4096) as usize;
        assert!(
            data == vec![0xab; 4096] || data == original[off..off + 4096],
            "block {i} is torn: {:?}",
            &data[..16]
        );
        assert_eq!(data, read_image(&img, i * 4096, 4096));
    }
}

/// A client that truncates its guest memory (the memfd) under the device:
/// the daemon drops it, instead of dying of SIGBUS, and serves the next.
#[test]
fn a_client_that_truncates_guest_memory_is_dropped() {
    a_client_that_truncates_guest_memory_is_dropped_with(&[], false);
}

/// [`a_client_that_truncates_guest_memory_is_dropped`] with I/O threads, the
/// rings left in place and the request buffers cut off.
#[test]
fn a_client_that_truncates_request_buffers_is_dropped_on_io_threads() {
    a_client_that_truncates_guest_memory_is_dropped_with(&["--io-threads", "2"], true);
}

/// [`a_client_that_truncates_request_buffers_is_dropped`] with requests on the event loop (`--aio sync`; the default
/// is io_uring where the kernel has it).
#[test]
fn a_client_that_truncates_request_buffers_is_dropped_on_the_event_loop() {
    a_client_that_truncates_guest_memory_is_dropped_with(&["--aio", "sync"], true);
}

fn a_client_that_truncates_guest_memory_is_dropped_with(extra: &[&str], keep_rings: bool) {
    let (mut daemon, img) = daemon_with_image(extra);
    {
        let mut drv = VirtioDriver::connect_raw(&daemon.socket);
        drv.init(BLK_WANT, 128);
        // Everything allocated from here on (the requests) lies above `cut`.
        let cut = if keep_rings {
            drv.ram.alloc(4096, 4096) - GUEST_BASE
        } else {
            0
        };
        for i in 0..8u64 {
            if i % 2 == 0 {
                drv.blk_submit(0, VIRTIO_BLK_T_IN, 8 * i, &[], 4096);
            } else {
                drv.blk_submit(0, VIRTIO_BLK_T_OUT, 8 * i, &[0xcd; 4096], 0);
            }
        }
        // Gone before the device looks at them; from here on this driver
        // must not touch guest memory either. The device may find the
        // requests before the doorbell (it polls the ring until it sees it
        // idle), so the doorbell's reply may or may not come first.
        drv.ram.file.set_len(cut).unwrap();
        let (bar, off) = drv.notify_register(0);
        let doorbell = payload::region_access(bar, off, 2, &0u16.to_le_bytes());
        drv.raw().send(proto::cmd::REGION_WRITE, 0, &doorbell, &[]);
        drv.raw().expect_closed();
    }
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon died"
    );
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 128);
    let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, 64, &[], 4096);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(data, read_image(&img, 64 * 512, 4096));
}

#[test]
fn in_memory_default_disk() {
    let daemon = Daemon::start(&[]);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 64);
    let capacity = drv.device_config(0, 8);
    assert_eq!(capacity, (64 << 20) / 512);
    let w = pattern(3, 4096);
    assert_eq!(
        drv.blk_request(0, VIRTIO_BLK_T_OUT, 1000, &w, 0).0,
        VIRTIO_BLK_S_OK
    );
    let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, 1000, &[], 4096);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(data, w);
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// With O_DIRECT, in every mode: the test driver's buffers (not aligned
/// for O_DIRECT) are bounced, and the bytes reach the image and come back.
#[test]
fn direct_io_requests_reach_the_image_in_every_mode() {
    for aio in ["io_uring", "threads", "sync"] {
        io_requests_reach_the_image_with(&["--direct", "--aio", aio]);
    }
}

/// Starts the daemon on a fresh image with `extra`, `setup` run in the
/// child before it starts; returns it and its start-up lines (those
/// before the attach help).
fn daemon_start_up(
    extra: &[&str],
    setup: Option<fn() -> std::io::Result<()>>,
) -> (std::process::Child, Vec<String>, TempDir) {
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new().unwrap();
    let img = image(&dir);
    let socket = dir.as_path().join("blk.sock");
    // A file, not a pipe: the daemon goes on printing after the lines we
    // want, and must not find the reader gone.
    let out_path = dir.as_path().join("stdout");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut cmd = daemon_bin();
    cmd.arg("virtio-blk")
        .arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(&img)
        .args(extra)
        .stdout(out)
        .stderr(std::process::Stdio::null());
    if let Some(f) = setup {
        // SAFETY: `f` only makes system calls (prctl); it allocates nothing
        // and takes no lock, as a pre-exec hook must.
        unsafe { cmd.pre_exec(f) };
    }
    let child = cmd.spawn().unwrap();
    wait_for_socket(&socket);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&out_path).unwrap();
        if text.contains("Attach") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no start-up lines: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let lines = text
        .lines()
        .take_while(|l| !l.starts_with("Attach"))
        .map(String::from)
        .collect();
    (child, lines, dir)
}

#[test]
fn the_start_up_line_says_how_io_runs() {
    let uring = backends::block_io::io_uring_support().is_ok();
    let (mut child, lines, _dir) = daemon_start_up(&[], None);
    let _ = child.kill();
    let _ = child.wait();
    let want = if uring {
        "aio: io_uring"
    } else {
        "aio: threads (4 I/O thread(s))"
    };
    assert!(lines[0].contains(want), "{lines:?}");
    let (mut child, lines, _dir) = daemon_start_up(&["--aio", "sync", "--direct"], None);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines[0].contains("O_DIRECT") && lines[0].contains("aio: sync (on the event loop)"),
        "{lines:?}"
    );
}

/// Where io_uring is taken away (a seccomp filter, as on a locked-down
/// host), the daemon says so in one line, runs on I/O threads and works.
#[test]
fn without_io_uring_the_daemon_runs_on_io_threads() {
    let (child, lines, dir) = daemon_start_up(
        &["--aio", "io_uring", "--direct"],
        Some(integration_tests::seccomp::deny_io_uring),
    );
    let mut daemon = Daemon {
        child,
        socket: dir.as_path().join("blk.sock"),
        dir,
        kind: "virtio-blk",
        successors: Vec::new(),
    };
    assert!(
        lines[0].contains("aio: threads (4 I/O thread(s))"),
        "{lines:?}"
    );
    let notes: Vec<&String> = lines.iter().filter(|l| l.contains("io_uring")).collect();
    assert_eq!(notes.len(), 1, "{lines:?}");
    assert!(notes[0].contains("not permitted"), "{lines:?}");
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 128);
    let w = pattern(5, 8192);
    let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_OUT, 64, &w, 0);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    let img = daemon.dir.as_path().join("disk.img");
    assert_eq!(read_image(&img, 64 * 512, 8192), w);
    let (st, r) = drv.blk_request(0, VIRTIO_BLK_T_IN, 64, &[], 8192);
    assert_eq!((st, r), (VIRTIO_BLK_S_OK, w));
    daemon.kill();
}
