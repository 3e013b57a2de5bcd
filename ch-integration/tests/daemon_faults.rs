//! A disk image that misbehaves under the daemon, driven as Cloud
//! Hypervisor drives it (`vfio_user::Client` and a test-side virtio
//! driver): a file system that fills up for real (a sparse image on a
//! small tmpfs, ENOSPC) and an image truncated under the daemon, under
//! `--on-error report` (the request fails with IOERR, the device goes on)
//! and `--on-error stop` (the request waits, the control socket's `status`
//! says why, `resume` retries it once the storage is fixed).
//!
//! The tmpfs tests need root (a mount namespace of their own); without it
//! they print `SKIP ...` and pass.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::small_fs::{in_private_mount_ns, SmallFs};
use common::*;
use serde_json::Value;
use vmm_sys_util::tempdir::TempDir;

const VERSION_1: u64 = 1 << 32;
const INDIRECT: u64 = 1 << 28;
const BLK_FLUSH: u64 = 1 << 9;
const BLK_WANT: u64 = VERSION_1 | INDIRECT | BLK_FLUSH | (1 << 1) | (1 << 2) | (1 << 6);

const MIB: u64 = 1 << 20;
/// The image: sparse, but for its first [`WRITTEN`] bytes.
const IMAGE_SIZE: u64 = 16 * MIB;
/// Bytes the host writes at the start of the image before the test.
const WRITTEN: usize = 256 << 10;
/// The tmpfs holding it.
const TMPFS_SIZE: u64 = 4 * MIB;
/// Where the guest writes: a hole of the image, which needs new space.
const HOLE_SECTOR: u64 = 8 * MIB / 512;
/// How much it writes: more than the room left.
const W_LEN: usize = 64 << 10;
/// The room left when the tmpfs is filled: part of the write fits.
const ROOM: u64 = 16 << 10;

/// A daemon serving a sparse image on a small tmpfs, with a control
/// socket. The tmpfs is unmounted before the daemon's directory goes.
struct OnSmallFs {
    fs: SmallFs,
    daemon: Daemon,
    img: PathBuf,
    api: PathBuf,
    args: Vec<String>,
}

impl OnSmallFs {
    /// Starts the daemon with `extra` options; call it from
    /// [`in_private_mount_ns`].
    fn start(extra: &[&str]) -> OnSmallFs {
        let dir = TempDir::new().unwrap();
        let fs = SmallFs::mount(&dir.as_path().join("fs"), TMPFS_SIZE);
        let img = fs.dir.join("disk.img");
        let f = File::create(&img).unwrap();
        f.set_len(IMAGE_SIZE).unwrap();
        f.write_all_at(&pattern(7, WRITTEN), 0).unwrap();
        let api = dir.as_path().join("api.sock");
        let mut args: Vec<String> = vec![
            "--disk".into(),
            img.display().to_string(),
            "--api-socket".into(),
            api.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let daemon = Daemon::start_in(dir, &strs(&args));
        wait_for_socket(&api);
        OnSmallFs {
            fs,
            daemon,
            img,
            api,
            args,
        }
    }

    fn status(&self) -> Value {
        api_ok(&self.api, &["status"])
    }

    /// A driver with the queue set up.
    fn driver(&self) -> VirtioDriver<vfio_user::Client> {
        let mut drv = VirtioDriver::connect(&self.daemon.socket);
        drv.init(BLK_WANT, 64);
        drv
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Polls the control socket's `status` (10 s at most) until the device is
/// stopped on an error; returns the reply.
#[track_caller]
fn wait_stopped(api: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = api_ok(api, &["status"]);
        if v["stopped_on_error"] == true {
            return v;
        }
        assert!(Instant::now() < deadline, "never stopped: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_full_disk_is_reported() {
    a_full_disk_is_reported_with(&[]);
}

/// [`a_full_disk_is_reported`] with requests on I/O threads.
#[test]
fn a_full_disk_is_reported_on_io_threads() {
    a_full_disk_is_reported_with(&["--io-threads", "2"]);
}

/// [`a_full_disk_is_reported`] with requests on the event loop (`--aio sync`; the default
/// is io_uring where the kernel has it).
#[test]
fn a_full_disk_is_reported_on_the_event_loop() {
    a_full_disk_is_reported_with(&["--aio", "sync"]);
}

fn a_full_disk_is_reported_with(extra: &'static [&'static str]) {
    in_private_mount_ns("a_full_disk_is_reported", move || {
        let s = OnSmallFs::start(&[extra, &["--on-error", "report"]].concat());
        let mut drv = s.driver();
        let filler = s.fs.fill(ROOM);
        // The write needs more room than there is: IOERR.
        let w = pattern(1, W_LEN);
        let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_OUT, HOLE_SECTOR, &w, 0);
        assert_eq!(st, VIRTIO_BLK_S_IOERR);
        let v = s.status();
        assert_eq!(v["stopped_on_error"], false, "{v}");
        assert_eq!(v["stop_error"], Value::Null, "{v}");
        // The device keeps serving: reads, and writes that need no room.
        let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, 0, &[], 4096);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert_eq!(data, pattern(7, 4096));
        let w0 = pattern(2, 4096);
        let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_OUT, 8, &w0, 0);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert_eq!(read_image(&s.img, 8 * 512, 4096), w0);
        // Given room, the same write succeeds.
        std::fs::remove_file(filler).unwrap();
        let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_OUT, HOLE_SECTOR, &w, 0);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert_eq!(read_image(&s.img, HOLE_SECTOR * 512, W_LEN), w);
    });
}

#[test]
fn a_full_disk_stops_until_freed_and_resumed() {
    a_full_disk_stops_until_resumed_with(&[], false);
}

/// [`a_full_disk_stops_until_freed_and_resumed`] with requests on I/O
/// threads, the tmpfs grown instead of freed.
#[test]
fn a_full_disk_stops_until_grown_and_resumed_on_io_threads() {
    a_full_disk_stops_until_resumed_with(&["--io-threads", "2"], true);
}

/// [`a_full_disk_stops_until_grown_and_resumed`] with requests on the event loop (`--aio sync`; the default
/// is io_uring where the kernel has it).
#[test]
fn a_full_disk_stops_until_grown_and_resumed_on_the_event_loop() {
    a_full_disk_stops_until_resumed_with(&["--aio", "sync"], true);
}

fn a_full_disk_stops_until_resumed_with(extra: &'static [&'static str], grow: bool) {
    in_private_mount_ns("a_full_disk_stops_until_resumed", move || {
        let s = OnSmallFs::start(&[extra, &["--on-error", "stop"]].concat());
        let mut drv = s.driver();
        let filler = s.fs.fill(ROOM);
        let w = pattern(3, W_LEN);
        let write = drv.blk_submit_req(0, VIRTIO_BLK_T_OUT, HOLE_SECTOR, &w, 0);
        drv.kick(0);
        let v = wait_stopped(&s.api);
        eprintln!("status while stopped: {v}");
        let why = v["stop_error"].as_str().unwrap_or_default();
        assert!(
            why.starts_with("write of 65536 bytes at 0x800000: ")
                && why.contains("No space left on device"),
            "{v}"
        );
        assert_eq!(v["paused"], false, "{v}");
        // The write is not completed, and nothing else is taken.
        let read = drv.blk_submit(0, VIRTIO_BLK_T_IN, 0, &[], 4096);
        drv.kick(0);
        std::thread::sleep(Duration::from_millis(200));
        drv.settle();
        assert!(drv.poll_used(0).is_empty());
        assert_eq!(drv.ram.read_u8(write.status), 0xff);

        // Room, then resume: the write completes, whole, then the read.
        if grow {
            s.fs.resize(2 * TMPFS_SIZE);
        } else {
            std::fs::remove_file(filler).unwrap();
        }
        api_ok(&s.api, &["resume"]);
        assert_eq!(drv.blk_complete(0, write.head).0, VIRTIO_BLK_S_OK);
        assert_eq!(
            drv.blk_complete(0, read),
            (VIRTIO_BLK_S_OK, pattern(7, 4096))
        );
        assert_eq!(read_image(&s.img, HOLE_SECTOR * 512, W_LEN), w);
        let v = s.status();
        assert_eq!(v["stopped_on_error"], false, "{v}");
        // And it goes on.
        let w2 = pattern(4, 4096);
        let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_OUT, HOLE_SECTOR + 1024, &w2, 0);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert_eq!(read_image(&s.img, (HOLE_SECTOR + 1024) * 512, 4096), w2);
    });
}

#[test]
fn a_device_stopped_on_a_full_disk_is_restored_from_a_snapshot() {
    a_device_stopped_on_a_full_disk_is_restored_with(&[]);
}

/// [`a_device_stopped_on_a_full_disk_is_restored_from_a_snapshot`] with
/// requests on I/O threads.
#[test]
fn a_device_stopped_on_a_full_disk_is_restored_from_a_snapshot_on_io_threads() {
    a_device_stopped_on_a_full_disk_is_restored_with(&["--io-threads", "2"]);
}

/// [`a_device_stopped_on_a_full_disk_is_restored_from_a_snapshot`] with requests on the event loop (`--aio sync`; the default
/// is io_uring where the kernel has it).
#[test]
fn a_device_stopped_on_a_full_disk_is_restored_from_a_snapshot_on_the_event_loop() {
    a_device_stopped_on_a_full_disk_is_restored_with(&["--aio", "sync"]);
}

fn a_device_stopped_on_a_full_disk_is_restored_with(extra: &'static [&'static str]) {
    in_private_mount_ns("a_device_stopped_on_a_full_disk_is_restored", move || {
        let mut s = OnSmallFs::start(&[extra, &["--on-error", "stop"]].concat());
        let mut drv = s.driver();
        let filler = s.fs.fill(0);
        let w = pattern(5, W_LEN);
        let write = drv.blk_submit(0, VIRTIO_BLK_T_OUT, HOLE_SECTOR, &w, 0);
        drv.kick(0);
        wait_stopped(&s.api);

        // Paused and saved while stopped: the snapshot holds the kept write.
        let snap = s.daemon.dir.as_path().join("blk.snap");
        let snap_s = snap.display().to_string();
        api_ok(&s.api, &["pause"]);
        api_ok(&s.api, &["snapshot", &snap_s]);
        let bytes = std::fs::read(&snap).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains("stopped_on_error") && text.contains("kept"),
            "{text}"
        );

        // The daemon goes; the disk gets room; a new daemon starts from the
        // snapshot, stopped on the same error until the VMM is back.
        s.daemon.kill();
        std::fs::remove_file(&s.api).unwrap();
        std::fs::remove_file(filler).unwrap();
        let mut args = strs(&s.args);
        args.extend_from_slice(&["--restore", &snap_s]);
        s.daemon.restart(&args);
        wait_for_socket(&s.api);
        let v = s.status();
        assert_eq!(v["stopped_on_error"], true, "{v}");
        assert_eq!(v["connected"], false, "{v}");

        // The VMM reconnects: the kept write is retried and completes.
        let old = drv.reconnect(vfio_user::Client::new(&s.daemon.socket).expect("reconnect"));
        drop(old);
        assert_eq!(drv.blk_complete(0, write).0, VIRTIO_BLK_S_OK);
        assert_eq!(read_image(&s.img, HOLE_SECTOR * 512, W_LEN), w);
        let v = s.status();
        assert_eq!(v["stopped_on_error"], false, "{v}");
        let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, HOLE_SECTOR, &[], 4096);
        assert_eq!((st, data), (VIRTIO_BLK_S_OK, w[..4096].to_vec()));
    });
}

/// A VMM migrates a device stopped on a full disk (shared storage): the
/// kept write travels in the migration stream, and the destination retries
/// it when it runs, once the storage has room.
#[test]
fn a_device_stopped_on_a_full_disk_migrates_and_retries_on_the_destination() {
    in_private_mount_ns("a_device_stopped_on_a_full_disk_migrates", || {
        let src = OnSmallFs::start(&["--on-error", "stop", "--io-threads", "2"]);
        let dst_api = src.daemon.dir.as_path().join("dst-api.sock");
        let img_s = src.img.display().to_string();
        let dst_api_s = dst_api.display().to_string();
        let dst = Daemon::start(&[
            "--disk",
            &img_s,
            "--on-error",
            "stop",
            "--api-socket",
            &dst_api_s,
        ]);
        wait_for_socket(&dst_api);
        let mut drv = VirtioDriver::connect_raw(&src.daemon.socket);
        drv.init(BLK_WANT, 64);
        let filler = src.fs.fill(0);
        let w = pattern(6, W_LEN);
        let write = drv.blk_submit(0, VIRTIO_BLK_T_OUT, HOLE_SECTOR, &w, 0);
        drv.kick(0);
        wait_stopped(&src.api);

        // STOP_COPY while stopped on the error: the stream holds the write.
        mig::set_state_ok(drv.raw(), mig::STOP_COPY);
        let stream = mig::read_stream(drv.raw(), 4096);
        let body = stream::decode(&stream).body.to_string();
        assert!(body.contains("kept"), "{body}");
        mig::set_state_ok(drv.raw(), mig::STOP);
        assert!(drv.poll_used(0).is_empty());

        // The storage gets room; the destination takes over and runs.
        std::fs::remove_file(filler).unwrap();
        let mut dst_client = RawClient::connect_negotiated(&dst.socket);
        drv.attach_to(&mut dst_client);
        mig::set_state_ok(&mut dst_client, mig::RESUMING);
        mig::write_stream(&mut dst_client, &stream, 1000);
        mig::set_state_ok(&mut dst_client, mig::STOP);
        assert_eq!(api_ok(&dst_api, &["status"])["stopped_on_error"], true);
        mig::set_state_ok(&mut dst_client, mig::RUNNING);
        let old = drv.replace_transport(dst_client);
        drop(old);
        assert_eq!(drv.blk_complete(0, write).0, VIRTIO_BLK_S_OK);
        assert_eq!(read_image(&src.img, HOLE_SECTOR * 512, W_LEN), w);
        assert_eq!(api_ok(&dst_api, &["status"])["stopped_on_error"], false);
        let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, HOLE_SECTOR, &[], 4096);
        assert_eq!((st, data), (VIRTIO_BLK_S_OK, w[..4096].to_vec()));
    });
}

/// Without the control socket, a VMM resumes a stopped device by taking
/// it through the migration states STOP and RUNNING.
#[test]
fn a_vmm_resumes_a_stopped_device_through_the_migration_states() {
    in_private_mount_ns("a_vmm_resumes_a_stopped_device", || {
        let s = OnSmallFs::start(&["--on-error", "stop"]);
        let mut drv = VirtioDriver::connect_raw(&s.daemon.socket);
        drv.init(BLK_WANT, 64);
        let filler = s.fs.fill(0);
        let w = pattern(8, W_LEN);
        let write = drv.blk_submit(0, VIRTIO_BLK_T_OUT, HOLE_SECTOR, &w, 0);
        drv.kick(0);
        wait_stopped(&s.api);
        mig::set_state_ok(drv.raw(), mig::STOP);
        std::fs::remove_file(filler).unwrap();
        mig::set_state_ok(drv.raw(), mig::RUNNING);
        assert_eq!(drv.blk_complete(0, write).0, VIRTIO_BLK_S_OK);
        assert_eq!(read_image(&s.img, HOLE_SECTOR * 512, W_LEN), w);
        assert_eq!(s.status()["stopped_on_error"], false);
    });
}

/// Where a truncated image now ends: mid-block, half-way through the disk.
const CUT: u64 = 4 * MIB + 1000;

/// A daemon on an 8 MiB image holding a pattern, with a control socket.
fn on_image(extra: &[&str]) -> (Daemon, PathBuf, PathBuf) {
    let dir = TempDir::new().unwrap();
    let img = dir.as_path().join("disk.img");
    std::fs::write(&img, pattern(7, (8 * MIB) as usize)).unwrap();
    let api = dir.as_path().join("api.sock");
    let (img_s, api_s) = (img.display().to_string(), api.display().to_string());
    let mut args = vec!["--disk", &img_s, "--api-socket", &api_s];
    args.extend_from_slice(extra);
    let daemon = Daemon::start_in(dir, &args);
    wait_for_socket(&api);
    (daemon, img, api)
}

fn truncate(img: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn a_truncated_image_fails_reads_past_its_end() {
    a_truncated_image_fails_reads_past_its_end_with(&[]);
}

/// [`a_truncated_image_fails_reads_past_its_end`] with requests on I/O threads.
#[test]
fn a_truncated_image_fails_reads_past_its_end_on_io_threads() {
    a_truncated_image_fails_reads_past_its_end_with(&["--io-threads", "2"]);
}

/// [`a_truncated_image_fails_reads_past_its_end`] with requests on the event loop (`--aio sync`; the default
/// is io_uring where the kernel has it).
#[test]
fn a_truncated_image_fails_reads_past_its_end_on_the_event_loop() {
    a_truncated_image_fails_reads_past_its_end_with(&["--aio", "sync"]);
}

fn a_truncated_image_fails_reads_past_its_end_with(extra: &[&str]) {
    let (daemon, img, api) = on_image(extra);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 64);
    // Someone cuts the image under the daemon; the guest's disk keeps its
    // size.
    truncate(&img, CUT);
    assert_eq!(drv.device_config(0, 8), 8 * MIB / 512);
    // Before the cut: the data. Past it, or across it: an I/O error, never
    // zeros passed off as data.
    let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, 8, &[], 4096);
    assert_eq!(
        (st, data),
        (VIRTIO_BLK_S_OK, pattern(7, 8192)[4096..].to_vec())
    );
    for sector in [6 * MIB / 512, 4 * MIB / 512] {
        let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_IN, sector, &[], 4096);
        assert_eq!(st, VIRTIO_BLK_S_IOERR, "read at sector {sector}");
    }
    assert_eq!(api_ok(&api, &["status"])["stopped_on_error"], false);
    // A write past the cut grows the file again and reads back; what lies
    // between the cut and it is a hole now, and reads as zeros.
    let w = pattern(9, 4096);
    let (st, _) = drv.blk_request(0, VIRTIO_BLK_T_OUT, 6 * MIB / 512, &w, 0);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 6 * MIB + 4096);
    let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, 6 * MIB / 512, &[], 4096);
    assert_eq!((st, data), (VIRTIO_BLK_S_OK, w));
    let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, 5 * MIB / 512, &[], 4096);
    assert_eq!((st, data), (VIRTIO_BLK_S_OK, vec![0u8; 4096]));
}

#[test]
fn a_truncated_image_stops_the_device_until_restored_and_resumed() {
    let (daemon, img, api) = on_image(&["--on-error", "stop", "--io-threads", "2"]);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 64);
    truncate(&img, CUT);
    let read = drv.blk_submit(0, VIRTIO_BLK_T_IN, 6 * MIB / 512, &[], 4096);
    drv.kick(0);
    let v = wait_stopped(&api);
    let why = v["stop_error"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("read of 4096 bytes at 0x600000: ") && why.contains("truncated"),
        "{v}"
    );
    drv.settle();
    assert!(drv.poll_used(0).is_empty());
    // The operator gives the image its size back (the cut-off data is
    // gone: a hole), and resumes.
    truncate(&img, 8 * MIB);
    api_ok(&api, &["resume"]);
    assert_eq!(
        drv.blk_complete(0, read),
        (VIRTIO_BLK_S_OK, vec![0u8; 4096])
    );
    assert_eq!(api_ok(&api, &["status"])["stopped_on_error"], false);
    let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, 0, &[], 4096);
    assert_eq!((st, data), (VIRTIO_BLK_S_OK, pattern(7, 4096)));
}
