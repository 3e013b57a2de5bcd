//! The daemon against clients that come and go while it is descheduled,
//! or connect and say nothing: the next real client (Cloud Hypervisor's
//! `vfio_user::Client`) is served every time.

mod common;

use std::io::{Read, Write};
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
