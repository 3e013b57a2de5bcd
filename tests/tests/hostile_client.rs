//! A hasty or hostile client: maps over its own maps, leaves before it
//! finished VERSION while the server looks away, or connects and never
//! speaks. Each gets the spec's answer, and the next real client is
//! served.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use integration_tests::*;
use vfio_user_server::{DeviceContext, Server, ServerConfig};

/// Rings the test device's DMA doorbell with `n`: it writes
/// `dma_pattern(n)` at `DMA_TARGET` through the guest memory it has.
fn doorbell(c: &mut RawClient, n: u32) {
    c.region_write(0, DMA_DOORBELL, &n.to_le_bytes()).ok();
}

fn read_u64(f: &std::fs::File, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, gpa - GUEST_RAM_BASE).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn a_map_over_an_existing_map_is_eexist_and_the_device_keeps_the_first() {
    let s = spawn_server();
    let mut c = RawClient::connect_negotiated(s.path());
    let first = memfd("first", GUEST_RAM_SIZE * 2);
    let other = memfd("other", GUEST_RAM_SIZE * 2);
    c.dma_map(0, GUEST_RAM_BASE, GUEST_RAM_SIZE, Some(first.as_raw_fd()))
        .ok();
    // Another fd, the same fd at another offset, and the exact duplicate.
    for (offset, fd) in [
        (0, other.as_raw_fd()),
        (GUEST_RAM_SIZE, first.as_raw_fd()),
        (0, first.as_raw_fd()),
    ] {
        let e = c
            .dma_map(offset, GUEST_RAM_BASE, GUEST_RAM_SIZE, Some(fd))
            .err();
        assert_eq!(e, libc::EEXIST, "fd {fd} at offset {offset:#x}");
    }
    // The device writes where the client believes its memory is: the
    // first memfd, and nothing reached the other.
    doorbell(&mut c, 7);
    assert!(wait_until(Duration::from_secs(5), || read_u64(
        &first, DMA_TARGET
    ) == dma_pattern(7)));
    assert_eq!(read_u64(&other, DMA_TARGET), 0);
    let mut moved = [0u8; 8];
    first
        .read_exact_at(&mut moved, DMA_TARGET - GUEST_RAM_BASE + GUEST_RAM_SIZE)
        .unwrap();
    assert_eq!(moved, [0; 8]);
    // One map, so one unmap removes it and a second finds nothing.
    c.dma_unmap(0, GUEST_RAM_BASE, GUEST_RAM_SIZE).ok();
    assert_eq!(
        c.dma_unmap(0, GUEST_RAM_BASE, GUEST_RAM_SIZE).err(),
        libc::ENOENT
    );
    // Mapping again after the unmap is fine.
    c.dma_map(0, GUEST_RAM_BASE, GUEST_RAM_SIZE, Some(other.as_raw_fd()))
        .ok();
    doorbell(&mut c, 8);
    assert!(wait_until(Duration::from_secs(5), || read_u64(
        &other, DMA_TARGET
    ) == dma_pattern(8)));
    c.ping();
}

/// One server, driven by hand: `accept` runs only when the test says, as
/// when the daemon is descheduled while clients come and go.
fn server_by_hand(config: ServerConfig) -> (Server, vmm_sys_util::tempdir::TempDir) {
    let dir = socket_dir();
    let path = dir.as_path().join("s.sock");
    let ctx = DeviceContext::default();
    let (dev, _state) = TestDevice::new(ctx.clone());
    let server = Server::new(&path, Box::new(dev), ctx, config).unwrap();
    (server, dir)
}

#[test]
fn a_client_that_left_before_version_gives_way_to_the_next() {
    let (mut server, _dir) = server_by_hand(ServerConfig::default());
    let path = server.path().unwrap().to_path_buf();
    // A leaves without a word, with half a VERSION, or with a whole one:
    // B, which connected after A left, is the client every time.
    let version = payload::version(0, 2, None, true);
    let whole = {
        let mut m = integration_tests::client::header(
            1,
            proto::cmd::VERSION,
            (16 + version.len()) as u32,
            0,
            0,
        );
        m.extend_from_slice(&version);
        m
    };
    for sent in [&[][..], &whole[..10], &whole[..]] {
        {
            let mut a = UnixStream::connect(&path).unwrap();
            std::io::Write::write_all(&mut a, sent).unwrap();
        }
        let mut b = RawClient::from_stream(UnixStream::connect(&path).unwrap()).unwrap();
        // Both wait in the backlog; the server wakes up now.
        assert!(
            server.accept().unwrap(),
            "B refused after A sent {} bytes",
            sent.len()
        );
        // B is served: its VERSION is answered.
        let id = b.send(proto::cmd::VERSION, 0, &version, &[]);
        assert!(server.handle_connection_event(true, false));
        assert!(!b.recv_reply(id, proto::cmd::VERSION).is_error());
        server.disconnect();
    }
    // A client that is still there is not displaced.
    let mut a = RawClient::from_stream(UnixStream::connect(&path).unwrap()).unwrap();
    assert!(server.accept().unwrap());
    let id = a.send(proto::cmd::VERSION, 0, &version, &[]);
    assert!(server.handle_connection_event(true, false));
    assert!(!a.recv_reply(id, proto::cmd::VERSION).is_error());
    let b = UnixStream::connect(&path).unwrap();
    assert!(!server.accept().unwrap());
    assert!(refused(b));
    let id = a.send(proto::cmd::GET_INFO, 0, &payload::get_info(16), &[]);
    assert!(server.handle_connection_event(true, false));
    assert!(!a.recv_reply(id, proto::cmd::GET_INFO).is_error());
}

/// Whether the server closed `s` without a word.
fn refused(mut s: UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    matches!(std::io::Read::read(&mut s, &mut buf), Ok(0))
}

fn test_device() -> (Box<dyn vfio_user_server::Device>, DeviceContext) {
    let ctx = DeviceContext::default();
    let (dev, _state) = TestDevice::new(ctx.clone());
    (Box::new(dev), ctx)
}

#[test]
fn a_silent_client_is_dropped_at_the_deadline_and_a_real_one_then_works() {
    let deadline = Duration::from_millis(300);
    let s = spawn_devices(
        vec![test_device()],
        ServerConfig {
            handshake_timeout: Some(deadline),
            ..ServerConfig::default()
        },
    );
    let started = Instant::now();
    let mut silent = UnixStream::connect(s.path()).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Until the deadline a second client is refused...
    assert!(refused(UnixStream::connect(s.path()).unwrap()));
    // ...at the deadline the silent one is dropped (EOF)...
    let mut buf = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut silent, &mut buf).unwrap(), 0);
    let waited = started.elapsed();
    assert!(waited >= deadline, "dropped after {waited:?}");
    // ...and a real client is served, and never timed out once it
    // negotiated, however long it stays quiet.
    let mut c = RawClient::connect_negotiated(s.path());
    std::thread::sleep(deadline * 3);
    c.ping();
}

#[test]
fn no_deadline_when_none_is_configured() {
    let s = spawn_devices(
        vec![test_device()],
        ServerConfig {
            handshake_timeout: None,
            ..ServerConfig::default()
        },
    );
    let mut slow = RawClient::connect(s.path()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    slow.negotiate();
    slow.ping();

    // No deadline at all, where the default would set one (5 s: too long
    // to wait for here): the server, driven by hand, says so.
    for (timeout, deadline) in [
        (None, false),
        (ServerConfig::default().handshake_timeout, true),
    ] {
        let (mut server, _dir) = server_by_hand(ServerConfig {
            handshake_timeout: timeout,
            ..ServerConfig::default()
        });
        let _quiet = RawClient::connect(server.path().unwrap()).unwrap();
        server.accept().unwrap();
        assert!(server.connected());
        assert_eq!(
            server.handshake_deadline().is_some(),
            deadline,
            "{timeout:?}"
        );
        let far = std::time::Instant::now() + Duration::from_secs(3600);
        assert_eq!(server.expire_handshake(far), deadline, "{timeout:?}");
    }
}
