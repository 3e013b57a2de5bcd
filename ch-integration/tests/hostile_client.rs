//! The daemon against clients that come and go while it is descheduled,
//! or connect and say nothing: the next real client (Cloud Hypervisor's
//! `vfio_user::Client`) is served every time.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmm_sys_util::tempdir::TempDir;

fn signal(d: &Daemon, sig: libc::c_int) {
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, sig) }, 0);
}

/// Connects as Cloud Hypervisor does (VERSION and region infos in
/// `Client::new`) and reads the vendor id from config space.
fn cloud_hypervisor_connects(socket: &std::path::Path) -> u16 {
    let mut c = vfio_user::Client::new(socket).expect("Cloud Hypervisor's client refused");
    let mut id = [0u8; 2];
    c.region_read(7, 0, &mut id).expect("config read");
    u16::from_le_bytes(id)
}

#[test]
fn a_client_that_leaves_before_version_while_the_daemon_is_stopped_does_not_block_the_next() {
    let d = Daemon::start(&[]);
    let version = payload::version(0, 2, None, true);
    let mut whole = integration_tests::client::header(1, 1, (16 + version.len()) as u32, 0, 0);
    whole.extend_from_slice(&version);
    // A sends nothing, half a VERSION, or all of it, and leaves; B comes
    // while the daemon is stopped, and must be served once it runs.
    for sent in [&[][..], &whole[..7], &whole[..]] {
        signal(&d, libc::SIGSTOP);
        {
            let mut a = UnixStream::connect(&d.socket).unwrap();
            a.write_all(sent).unwrap();
        }
        let socket = d.socket.clone();
        let b = std::thread::spawn(move || cloud_hypervisor_connects(&socket));
        std::thread::sleep(Duration::from_millis(200));
        signal(&d, libc::SIGCONT);
        assert_eq!(b.join().expect("B failed"), 0x1af4);
    }
}

#[test]
fn a_silent_connection_is_dropped_and_logged_and_the_vmm_then_attaches() {
    let dir = TempDir::new().unwrap();
    let socket = dir.as_path().join("blk.sock");
    let log = dir.as_path().join("daemon.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfio-user-device"))
        .args(["virtio-blk", "--handshake-timeout", "0.5", "--socket"])
        .arg(&socket)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_socket(&socket);
    let started = Instant::now();
    let mut silent = UnixStream::connect(&socket).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        silent.read(&mut buf).unwrap(),
        0,
        "silent client not dropped"
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(cloud_hypervisor_connects(&socket), 0x1af4);
    // A negotiated client is never timed out.
    let mut c = vfio_user::Client::new(&socket).expect("reconnect");
    std::thread::sleep(Duration::from_millis(1500));
    let mut id = [0u8; 2];
    c.region_read(7, 0, &mut id)
        .expect("timed out after VERSION");
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("did not negotiate"), "{text}");
}

#[test]
fn a_client_whose_messages_take_long_does_not_hold_up_the_control_socket() {
    let dir = TempDir::new().unwrap();
    let api_socket = dir.as_path().join("api.sock");
    let d = Daemon::start_in(dir, &["--api-socket", api_socket.to_str().unwrap()]);
    let mut a = RawClient::connect_negotiated(&d.socket);
    // 4 GiB of sparse guest memory, dirty-logged: each report below walks
    // its million tracked pages for one bit of reply.
    const SIZE: u64 = 4 << 30;
    const BASE: u64 = 1 << 40;
    let ram = integration_tests::memfd("ram", SIZE);
    a.dma_map(0, BASE, SIZE, Some(ram.as_raw_fd())).ok();
    mig::logging_start(&mut a, 4096, &[]).ok();
    let report = [
        BASE.to_le_bytes(),
        SIZE.to_le_bytes(),
        (1u64 << 40).to_le_bytes(),
    ]
    .concat();
    let send_report = |a: &mut RawClient| {
        a.send(
            proto::cmd::DEVICE_FEATURE,
            0,
            &payload::device_feature(
                8 + 24 + 8,
                proto::FEATURE_GET | mig::DMA_LOGGING_REPORT,
                &report,
            ),
            &[],
        )
    };
    let t = Instant::now();
    let first = send_report(&mut a);
    a.recv_reply(first, proto::cmd::DEVICE_FEATURE).ok();
    let per_report = t.elapsed();
    // 150 in one write, none read yet: the daemon's loop must not
    // spend them all before it answers its control socket.
    let ids: Vec<u16> = (0..150).map(|_| send_report(&mut a)).collect();
    std::thread::sleep(per_report);
    let t = Instant::now();
    api_ok(&api_socket, &["status"]);
    let waited = t.elapsed();
    assert!(
        waited < per_report * 10 + Duration::from_millis(300),
        "the control socket waited {waited:?} behind reports of {per_report:?} each"
    );
    // A's replies all come, in order.
    for id in ids {
        let r = a.recv_reply(id, proto::cmd::DEVICE_FEATURE).ok();
        assert_eq!(r.payload.len(), 8 + 24 + 8);
    }
}

/// Resident memory of process `pid`, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS");
    kib << 10
}

#[test]
fn a_client_that_reads_no_replies_holds_the_daemon_to_its_reply_limit() {
    let d = Daemon::start(&[]);
    let mut a = RawClient::connect_negotiated(&d.socket);
    let info = a.region_info(0, 32).ok();
    let bar0 = u32::try_from(integration_tests::le64(&info.payload, 16)).unwrap();
    assert!(bar0 >= 16 << 10, "BAR0 of {bar0} bytes");
    let before = resident_bytes(d.pid());
    // 1024 reads of the whole BAR in one write (32 KiB of requests, one
    // read of the daemon) asking for 16 MiB or more of replies, none read
    // yet.
    let access = payload::region_access(0, 0, bar0, &[]);
    let mut requests = Vec::new();
    let ids: Vec<u16> = (0..1024)
        .map(|_| {
            let (id, m) = a.message(proto::cmd::REGION_READ, 0, &access);
            requests.extend(m);
            id
        })
        .collect();
    a.send_bytes(&requests, &[]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // The daemon holds at most its 4 MiB of queued replies plus one.
    let grown = resident_bytes(d.pid()).saturating_sub(before);
    assert!(
        grown < 10 << 20,
        "the daemon grew by {} KiB holding replies",
        grown >> 10
    );
    // Every reply comes once the client reads, in order.
    for id in ids {
        let r = a.recv_reply(id, proto::cmd::REGION_READ).ok();
        assert_eq!(r.payload.len(), 16 + bar0 as usize);
    }
    a.ping();
}
