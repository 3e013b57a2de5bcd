//! `vfio-user-device api ... upgrade`: the daemon replaced by a new process
//! under a client that never reconnects (the published
//! `vfio_user::Client`, as Cloud Hypervisor uses it), with requests in
//! flight; rollback when the new process does not take over; the hand-over
//! socket's privacy; readiness for the service manager; the pause the
//! guest sees. See docs/user-guide.md ("Upgrading or restarting under a
//! running guest") and docs/migration.md.

mod common;

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use vmm_sys_util::tempdir::TempDir;

const BLK_WANT: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_BLK_F_FLUSH;
const IMAGE_SIZE: usize = 8 << 20;

fn image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::write(&path, pattern(7, IMAGE_SIZE)).unwrap();
    path
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Writes and reads back one 4 KiB block through the driver.
#[track_caller]
fn io_works(drv: &mut VirtioDriver, sector: u64, seed: u8) {
    let w = pattern(seed, 4096);
    assert_eq!(
        drv.blk_request(0, VIRTIO_BLK_T_OUT, sector, &w, 0).0,
        VIRTIO_BLK_S_OK
    );
    let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, sector, &[], 4096);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(data == w, "sector {sector} reads back wrong");
}

/// Three upgrades in a row, each with writes kicked just before it (in
/// flight, or completed while the device pauses) and writes made
/// available without a doorbell (served by the new process); the second
/// and third change `--io-threads`. Every request completes once, every
/// acknowledged write is in the image, interrupts arrive on the same
/// eventfds, each old daemon exits 0, and the last one stops cleanly.
#[test]
fn blk_requests_in_flight_survive_three_upgrades() {
    upgrade::become_subreaper();
    let dir = TempDir::new().unwrap();
    let img = image(dir.as_path());
    let api = dir.as_path().join("api.sock");
    let (img_s, api_s) = (s(&img), s(&api));
    let base = ["--disk", img_s.as_str(), "--api-socket", api_s.as_str()];
    let mut args = base.to_vec();
    args.extend(["--io-threads", "2"]);
    let mut daemon = Daemon::start_in(dir, &args);
    wait_for_socket(&api);
    let socket_s = s(&daemon.socket);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 64);
    io_works(&mut drv, 4096, 1);
    let first_eventfds = eventfds(daemon.pid());
    let mut submitted: u16 = 2;
    let mut written: HashMap<u64, Vec<u8>> = HashMap::new();

    for (round, threads) in [(0u8, "2"), (1, "4"), (2, "0")] {
        let mut heads = HashSet::new();
        for i in 0..12u64 {
            let sector = u64::from(round) * 512 + i * 8;
            let data = pattern(round * 16 + i as u8, 4096);
            heads.insert(drv.blk_submit(0, VIRTIO_BLK_T_OUT, sector, &data, 0));
            written.insert(sector, data);
            if i == 7 {
                drv.kick(0);
            }
        }
        submitted += 12;
        let mut new_args = vec!["--", "virtio-blk", "--socket", socket_s.as_str()];
        new_args.extend(base);
        new_args.extend(["--io-threads", threads]);
        let before = daemon.pid();
        let v = daemon.upgrade(&api, &new_args);
        eprintln!("round {round}: {before} -> {v}");
        assert!(v["pause_ms"].as_f64().is_some());
        drv.kick(0);
        let used = drv.wait_used(0, 12);
        assert_eq!(used.len(), 12, "requests completed: {used:?}");
        let got: HashSet<u16> = used.iter().map(|u| u.0).collect();
        assert_eq!(got, heads, "each request completes once");
        for (h, _) in used {
            assert_eq!(drv.take_result(0, h).0, VIRTIO_BLK_S_OK);
        }
        // Interrupts still arrive, on the client's eventfd.
        drv.drain_interrupt(0);
        let sector = u64::from(round) * 512;
        let h = drv.blk_submit(0, VIRTIO_BLK_T_IN, sector, &[], 4096);
        drv.kick(0);
        assert!(drv.expect_interrupt(0) >= 1);
        assert_eq!(drv.poll_used(0), vec![(h, 4096 + 1)]);
        let (st, data) = drv.take_result(0, h);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(data == written[&sector]);
        submitted += 1;
        let status = api_ok(&api, &["status"]);
        assert_eq!(status["pid"], daemon.pid());
        assert_eq!(status["connected"], true);
        let described = status["device"].as_str().unwrap_or_default();
        let want = match threads {
            "0" => "aio: sync".to_string(),
            n => format!("aio: threads ({n} I/O thread(s))"),
        };
        assert!(described.contains(&want), "{described}");
    }
    assert_eq!(drv.used_idx(0), submitted, "a request completed twice");
    // The last daemon runs without I/O threads, so it has one eventfd
    // fewer than the first: none of its predecessors' is inherited.
    let last_eventfds = eventfds(daemon.pid());
    assert!(
        last_eventfds < first_eventfds,
        "eventfds: {first_eventfds} in the first daemon, {last_eventfds} after three upgrades"
    );
    for (sector, data) in &written {
        assert!(
            read_image(&img, sector * 512, 4096) == *data,
            "sector {sector} not in the image"
        );
    }
    io_works(&mut drv, 6000, 9);

    // The replaced daemons exited 0; the last one stops on SIGTERM and
    // removes its sockets.
    assert_eq!(daemon.child.wait().unwrap().code(), Some(0));
    for pid in &daemon.successors[..2] {
        assert_eq!(upgrade::wait_exit(*pid, Duration::from_secs(10)), Some(0));
    }
    let last = daemon.pid();
    upgrade::signal(last, libc::SIGTERM);
    assert_eq!(upgrade::wait_exit(last, Duration::from_secs(10)), Some(0));
    assert!(
        !daemon.socket.exists() && !api.exists(),
        "sockets left behind"
    );
}

/// How many eventfds process `pid` has open.
fn eventfds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.as_os_str() == "anon_inode:[eventfd]")
        .count()
}

/// Writes that the test keeps in flight (`depth` of them, 4 KiB each over
/// `blocks` blocks) until `until` says stop; returns the last sequence
/// number written to each block and the (wall-clock) time of every
/// completion.
fn stream_writes(
    drv: &mut VirtioDriver,
    depth: usize,
    blocks: u64,
    mut until: impl FnMut(usize) -> bool,
) -> (HashMap<u64, u64>, Vec<SystemTime>) {
    let bufs: Vec<BlkBuffers> = (0..depth).map(|_| drv.blk_buffers(4096)).collect();
    let mut in_flight: Vec<Option<(u16, u64)>> = vec![None; depth];
    let mut seq = 0u64;
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut times = Vec::new();
    let mut stopping = false;
    loop {
        let mut pushed = false;
        for (slot, b) in in_flight.iter_mut().zip(&bufs) {
            if slot.is_none() && !stopping {
                seq += 1;
                let data: Vec<u8> = seq.to_le_bytes().repeat(512);
                drv.ram.write(b.data, &data);
                let head = drv.blk_push(0, VIRTIO_BLK_T_OUT, (seq % blocks) * 8, b);
                *slot = Some((head, seq));
                pushed = true;
            }
        }
        if pushed {
            drv.kick(0);
        }
        if in_flight.iter().all(Option::is_none) {
            return (last, times);
        }
        for (head, _) in drv.wait_used(0, 1) {
            let i = in_flight
                .iter()
                .position(|s| s.is_some_and(|(h, _)| h == head))
                .expect("a completion of no request in flight");
            let (_, n) = in_flight[i].take().unwrap_or_default();
            assert_eq!(bufs[i].status(&drv.ram), VIRTIO_BLK_S_OK, "write {n}");
            times.push(SystemTime::now());
            last.insert(n % blocks, n);
        }
        stopping |= !until(times.len());
    }
}

/// The longest time between two consecutive completions.
fn longest_gap(times: &[SystemTime]) -> Duration {
    times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default())
        .max()
        .unwrap_or_default()
}

/// The time between the two consecutive completions around `at`: the last
/// one before it and the first one after it.
fn gap_around(times: &[SystemTime], at: SystemTime) -> Option<Duration> {
    times
        .windows(2)
        .find(|w| w[0] <= at && at < w[1])
        .and_then(|w| w[1].duration_since(w[0]).ok())
}

/// The time of a log line (`[2026-12-07T04:07:10.102741Z ...`, UTC).
fn log_time(line: &str) -> Option<SystemTime> {
    let t = line.strip_prefix('[')?.get(..27)?;
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, us) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..26)?);
    // Days since 1970-01-01 of a proleptic Gregorian date.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_micros(us as u64))
}

/// Reads back every block of `last` and checks it holds its last write.
#[track_caller]
fn check_blocks(drv: &mut VirtioDriver, last: &HashMap<u64, u64>) {
    for (block, n) in last {
        let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, block * 8, &[], 4096);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(
            data == n.to_le_bytes().repeat(512),
            "block {block} lost write {n}"
        );
    }
}

/// The pause the guest sees: a stream of writes (four in flight) on the
/// default in-memory disk (a memfd, handed over with its contents) with
/// 1 GiB of guest memory mapped, through three upgrades; every write
/// acknowledged before, during or after reads back. Prints, for each
/// upgrade, the time between the old process's last completion and the new
/// process's first (the two completions around the moment the old one let
/// go, from its log), the longest gap between completions while it ran
/// (the new process starts meanwhile, on the same CPUs), and the same
/// without an upgrade: the figures docs/performance.md reports.
#[test]
fn pause_with_1_gib_of_guest_memory() {
    upgrade::become_subreaper();
    let dir = TempDir::new().unwrap();
    let api = dir.as_path().join("api.sock");
    let log = dir.as_path().join("daemon.log");
    let socket = dir.as_path().join("blk.sock");
    let child = daemon_bin()
        .args(["virtio-blk", "--socket"])
        .arg(&socket)
        .arg("--api-socket")
        .arg(&api)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Daemon {
        child,
        socket,
        dir,
        kind: "virtio-blk",
        successors: Vec::new(),
    };
    wait_for_socket(&daemon.socket);
    wait_for_socket(&api);
    let client = vfio_user::Client::new(&daemon.socket).expect("connect");
    let ram = GuestRam::with_regions(&[(GUEST_BASE, 1 << 30)]);
    let mut drv = VirtioDriver::connect_with_ram(client, ram);
    drv.init(BLK_WANT, 64);
    let mut all: HashMap<u64, u64> = HashMap::new();
    let (mut pauses, mut longest, mut steady, mut reported) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        // Steady I/O first (the noise floor), then the upgrade from another
        // thread.
        let (last, times) = stream_writes(&mut drv, 4, 2048, |n| n < 300);
        all.extend(last);
        steady.push(longest_gap(&times));
        let api_path = api.clone();
        let upgrade = std::thread::spawn(move || common::api(&api_path, &["upgrade"]));
        let mut after = 0;
        let (last, times) = stream_writes(&mut drv, 4, 2048, |_| {
            if upgrade.is_finished() {
                after += 1;
            }
            after < 300
        });
        let (ok, v) = upgrade.join().unwrap();
        assert!(ok && v["ok"] == true, "{v}");
        daemon.successors.push(v["pid"].as_u64().unwrap() as u32);
        all.extend(last);
        let text = std::fs::read_to_string(&log).unwrap();
        let go = text
            .lines()
            .filter(|l| l.contains("took over; the device was paused for"))
            .nth(round)
            .and_then(log_time)
            .expect("the old daemon's log says when it let go");
        let pause = gap_around(&times, go).expect("completions on both sides of the pause");
        pauses.push(pause);
        longest.push(longest_gap(&times));
        reported.push(v["pause_ms"].as_f64().unwrap_or_default());
    }
    check_blocks(&mut drv, &all);
    eprintln!(
        "pause_with_1_gib_of_guest_memory: old daemon's last completion -> new daemon's \
         first: {pauses:?}; longest gap between completions during each upgrade: \
         {longest:?}; without an upgrade: {steady:?}; the pause the old daemon measured \
         (pause -> go): {reported:?} ms"
    );
    for g in &pauses {
        assert!(*g < Duration::from_secs(2), "the guest waited {g:?}");
    }
}

/// An upgrade that cannot happen leaves the old daemon serving as before,
/// and says why: the new binary fails to start, hangs, or the new command
/// line serves another image. A request made available before the
/// attempt and kicked after it completes once.
#[test]
fn a_failed_upgrade_leaves_the_old_daemon_serving() {
    upgrade::become_subreaper();
    let dir = TempDir::new().unwrap();
    let img = image(dir.as_path());
    let api = dir.as_path().join("api.sock");
    let hang = dir.as_path().join("hang.sh");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&hang, std::fs::Permissions::from_mode(0o755)).unwrap();
    let other = dir.as_path().join("other.img");
    std::fs::write(&other, [0u8; 4096]).unwrap();
    let (img_s, api_s) = (s(&img), s(&api));
    let mut daemon = Daemon::start_in(dir, &["--disk", &img_s, "--api-socket", &api_s]);
    wait_for_socket(&api);
    let pid = daemon.pid();
    let socket_s = s(&daemon.socket);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 64);
    io_works(&mut drv, 0, 1);

    let hang_s = s(&hang);
    let other_s = s(&other);
    let attempts: [(&[&str], &str); 3] = [
        (
            &["--exec", "/bin/false"],
            "exited (exit status: 1) before taking over",
        ),
        (
            &["--exec", &hang_s, "--timeout", "1"],
            "did not connect within",
        ),
        (
            &[
                "--",
                "virtio-blk",
                "--socket",
                &socket_s,
                "--disk",
                &other_s,
                "--api-socket",
                &api_s,
            ],
            "cannot change --disk (a different image)",
        ),
    ];
    for (i, (args, why)) in attempts.into_iter().enumerate() {
        let data = pattern(40 + i as u8, 4096);
        let sector = 100 + 8 * i as u64;
        let h = drv.blk_submit(0, VIRTIO_BLK_T_OUT, sector, &data, 0);
        let mut all = vec!["upgrade"];
        all.extend_from_slice(args);
        let t = Instant::now();
        let (ok, v) = common::api(&api, &all);
        eprintln!("{args:?}: {v} after {:?}", t.elapsed());
        assert!(!ok && v["ok"] == false, "{v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(why), "{e}");
        let status = api_ok(&api, &["status"]);
        assert_eq!(status["pid"], pid);
        assert_eq!(status["paused"], false);
        assert_eq!(status["connected"], true);
        drv.kick(0);
        assert_eq!(drv.wait_used(0, 1), vec![(h, 1)]);
        assert_eq!(drv.take_result(0, h).0, VIRTIO_BLK_S_OK);
        assert!(read_image(&img, sector * 512, 4096) == data);
        io_works(&mut drv, 200, i as u8);
    }
    assert!(daemon.child.try_wait().unwrap().is_none());
}

/// The new process refuses a state of a format it does not read (the old
/// daemon writes format 0 here, through its test-only environment
/// variable): the old daemon resumes the device it had paused and goes on;
/// the write it completed while pausing, and the one made available
/// meanwhile, each complete once.
#[test]
fn a_state_of_an_older_format_is_refused_and_the_old_daemon_resumes() {
    upgrade::become_subreaper();
    let dir = TempDir::new().unwrap();
    let img = image(dir.as_path());
    let api = dir.as_path().join("api.sock");
    let (img_s, api_s) = (s(&img), s(&api));
    let mut daemon = Daemon::start_with_env(
        "virtio-blk",
        dir,
        &[
            "--disk",
            &img_s,
            "--api-socket",
            &api_s,
            "--io-threads",
            "2",
        ],
        &[("VFIO_USER_DEVICE_TEST_HANDOVER_FORMAT", "0")],
    );
    wait_for_socket(&api);
    let pid = daemon.pid();
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 64);
    io_works(&mut drv, 0, 1);
    let w1 = pattern(50, 4096);
    let w2 = pattern(51, 4096);
    let h1 = drv.blk_submit(0, VIRTIO_BLK_T_OUT, 64, &w1, 0);
    drv.kick(0);
    let h2 = drv.blk_submit(0, VIRTIO_BLK_T_OUT, 72, &w2, 0);
    let (ok, v) = common::api(&api, &["upgrade"]);
    assert!(!ok, "{v}");
    let e = v["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("refused the state") && e.contains("format 0"),
        "{e}"
    );
    let status = api_ok(&api, &["status"]);
    assert_eq!(status["pid"], pid);
    assert_eq!(status["paused"], false);
    drv.kick(0);
    let used: HashSet<u16> = drv.wait_used(0, 2).into_iter().map(|u| u.0).collect();
    assert_eq!(used, HashSet::from([h1, h2]));
    assert_eq!(drv.used_idx(0), 4);
    for h in [h1, h2] {
        assert_eq!(drv.take_result(0, h).0, VIRTIO_BLK_S_OK);
    }
    assert!(read_image(&img, 64 * 512, 4096) == w1);
    assert!(read_image(&img, 72 * 512, 4096) == w2);
    io_works(&mut drv, 300, 3);
    assert!(daemon.child.try_wait().unwrap().is_none());
}

/// The hand-over socket is in a directory only the daemon's user can
/// enter (0700), is itself 0600, and a process that is not the new daemon
/// gets nothing from it: another user cannot even connect, and a process
/// of the same user is hung up on. The upgrade goes through all the same.
#[test]
fn the_hand_over_socket_is_private() {
    upgrade::become_subreaper();
    let dir = TempDir::new().unwrap();
    let api = dir.as_path().join("api.sock");
    let seen = dir.as_path().join("args");
    // The new daemon, started slowly enough to be looked at.
    let wrapper = dir.as_path().join("slow.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\nsleep 2\nexec {} \"$@\"\n",
            seen.display(),
            env!("CARGO_BIN_EXE_vfio-user-device")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let api_s = s(&api);
    let wrapper_s = s(&wrapper);
    let mut daemon = Daemon::start_in(dir, &["--api-socket", &api_s]);
    wait_for_socket(&api);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 64);
    io_works(&mut drv, 0, 1);

    let api_path = api.clone();
    let upgrade =
        std::thread::spawn(move || common::api(&api_path, &["upgrade", "--exec", &wrapper_s]));
    let deadline = Instant::now() + Duration::from_secs(10);
    let args = loop {
        if let Ok(a) = std::fs::read_to_string(&seen) {
            if a.contains("--handover-socket\n") {
                break a;
            }
        }
        assert!(Instant::now() < deadline, "the new daemon never started");
        std::thread::sleep(Duration::from_millis(10));
    };
    let lines: Vec<&str> = args.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == "--handover-socket")
        .unwrap();
    let sock = PathBuf::from(lines[at + 1]);
    let parent = sock.parent().unwrap();
    let dm = std::fs::metadata(parent).unwrap();
    assert_eq!(
        dm.permissions().mode() & 0o7777,
        0o700,
        "{}",
        parent.display()
    );
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(dm.uid(), uid);
    let sm = std::fs::symlink_metadata(&sock).unwrap();
    assert!(sm.file_type().is_socket());
    assert_eq!(sm.permissions().mode() & 0o7777, 0o600);

    // Another user (nobody) cannot reach it; only root can run a client
    // as another user.
    if uid == 0 {
        let out = daemon_bin()
            .args(["api", "--api-socket"])
            .arg(&sock)
            .arg("status")
            .uid(65534)
            .gid(65534)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("Permission denied"), "{err}");
    } else {
        eprintln!("SKIP the other-user check: not root");
    }
    // The same user connects, and gets nothing: no byte, no fd.
    let stranger = UnixStream::connect(&sock).unwrap();
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(5);
    let got = loop {
        match vfio_user_server::socket::recv_with_fds(stranger.as_raw_fd(), &mut buf) {
            Ok(r) => break r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the stranger was not hung up on");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!((got.bytes, got.fds.len()), (0, 0));

    let (ok, v) = upgrade.join().unwrap();
    assert!(ok, "{v}");
    daemon.successors.push(v["pid"].as_u64().unwrap() as u32);
    assert!(!parent.exists(), "the hand-over directory stays");
    io_works(&mut drv, 8, 2);
}

/// Receives datagrams on `sock` until `want` of them came (10 s at most).
fn datagrams(sock: &UnixDatagram, want: usize) -> Vec<String> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while out.len() < want {
        let n = sock.recv(&mut buf).expect("no notification");
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

/// With `NOTIFY_SOCKET` set (as systemd sets it for `Type=notify`), the
/// daemon says `READY=1` once it serves; after an upgrade the new main pid
/// is announced (by the old daemon, then by the new one with `READY=1`),
/// so the service manager follows the new process. Both a path and an
/// abstract socket name (`@...`) work.
#[test]
fn readiness_and_the_new_main_pid_go_to_the_service_manager() {
    upgrade::become_subreaper();
    let dir = TempDir::new().unwrap();
    let api = dir.as_path().join("api.sock");
    let notify_path = dir.as_path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let api_s = s(&api);
    let mut daemon = Daemon::start_with_env(
        "virtio-blk",
        dir,
        &["--api-socket", &api_s],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    assert_eq!(datagrams(&notify, 1), ["READY=1"]);
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 64);
    let v = daemon.upgrade(&api, &[]);
    let pid = v["pid"].as_u64().unwrap();
    let mut got = datagrams(&notify, 2);
    got.sort();
    assert_eq!(
        got,
        [format!("MAINPID={pid}"), format!("MAINPID={pid}\nREADY=1")]
    );
    io_works(&mut drv, 0, 1);

    // An abstract socket name.
    let dir = TempDir::new().unwrap();
    let name = format!("vfio-user-test-notify-{}", std::process::id());
    let addr = {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
    };
    let notify = UnixDatagram::bind_addr(&addr).unwrap();
    let _daemon = Daemon::start_with_env(
        "virtio-blk",
        dir,
        &[],
        &[("NOTIFY_SOCKET", &format!("@{name}"))],
    );
    assert_eq!(datagrams(&notify, 1), ["READY=1"]);
}

/// Without `--api-socket` there is nothing to upgrade through; with one,
/// a second upgrade while one is under way is refused.
#[test]
fn one_upgrade_at_a_time() {
    upgrade::become_subreaper();
    let dir = TempDir::new().unwrap();
    let api = dir.as_path().join("api.sock");
    let slow = dir.as_path().join("slow.sh");
    // The new binary says it started, then waits (10 s at most) until the
    // test lets it go on: the first upgrade is under way meanwhile.
    let started = dir.as_path().join("started");
    let go_on = dir.as_path().join("go-on");
    std::fs::write(
        &slow,
        format!(
            "#!/bin/sh\ntouch {}\nfor i in $(seq 100); do [ -e {} ] && break; sleep 0.1; done\nexec {} \"$@\"\n",
            started.display(),
            go_on.display(),
            env!("CARGO_BIN_EXE_vfio-user-device")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (api_s, slow_s) = (s(&api), s(&slow));
    let mut daemon = Daemon::start_in(dir, &["--api-socket", &api_s]);
    wait_for_socket(&api);
    let api_path = api.clone();
    let first = std::thread::spawn(move || common::api(&api_path, &["upgrade", "--exec", &slow_s]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first upgrade did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (ok, v) = common::api(&api, &["upgrade"]);
    std::fs::write(&go_on, b"").unwrap();
    assert!(
        !ok && v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("already under way"),
        "{v}"
    );
    let (ok, v) = first.join().unwrap();
    assert!(ok, "{v}");
    daemon.successors.push(v["pid"].as_u64().unwrap() as u32);
    // The daemon that took over serves a new client too.
    let mut drv = VirtioDriver::connect(&daemon.socket);
    drv.init(BLK_WANT, 64);
    io_works(&mut drv, 0, 1);
}
