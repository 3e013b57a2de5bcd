//! Connection lifecycle: disconnect cleanup, one client at a time, stalled
//! clients, fd leaks, the socket file.
//!
//! Every test here holds `SERIAL` so the fd-leak test counts only its own
//! descriptors when the tests of this binary run as threads of one process.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use integration_tests::client::header;
use integration_tests::proto::*;
use integration_tests::*;
use vfio_user_server::{DeviceContext, Server, ServerConfig, ServerError};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const WAIT: Duration = Duration::from_secs(5);

fn wait_resets(s: &TestServer, idx: usize, n: usize) {
    assert!(
        wait_until(WAIT, || lock(&s.states[idx]).resets.len() >= n),
        "device {idx} did not see {n} resets: {:?}",
        lock(&s.states[idx]).resets
    );
}

/// A connection that never finished VERSION could change nothing: its
/// going leaves the device as it was (a restored device waiting for its
/// VMM survives another daemon's stale-socket check).
#[test]
fn a_client_that_never_negotiated_leaves_the_device_untouched() {
    let _g = serial();
    let s = spawn_server();
    let mut a = RawClient::connect_negotiated(s.path());
    a.write_ok(0, 0x10, &[1, 2, 3, 4]);
    // A negotiated client leaving resets the device.
    drop(a);
    wait_resets(&s, 0, 1);
    let mut b = RawClient::connect_negotiated(s.path());
    b.write_ok(0, 0x10, &[5, 6, 7, 8]);
    // `b` stays; a second, silent connection is turned away.
    drop(RawClient::connect(s.path()).unwrap());
    b.ping();
    drop(b);
    wait_resets(&s, 0, 2);
    // Only connects and leaves, as a stale-socket check does.
    for _ in 0..3 {
        drop(std::os::unix::net::UnixStream::connect(s.path()).unwrap());
    }
    let mut c = RawClient::connect(s.path()).unwrap();
    assert_eq!(c.get_info().err(), libc::EINVAL);
    drop(c);
    let mut d = RawClient::connect_negotiated(s.path());
    d.ping();
    assert_eq!(s.state().resets.len(), 2, "{:?}", s.state().resets);
}

#[test]
fn disconnect_drops_maps_and_irqs_and_resets_the_device() {
    let _g = serial();
    let s = spawn_server();
    let ram = memfd("ram", GUEST_RAM_SIZE);
    let m = Mapping::new(ram.as_raw_fd(), GUEST_RAM_SIZE as usize, 0).unwrap();
    let mut a = RawClient::connect_negotiated(s.path());
    a.dma_map(0, GUEST_RAM_BASE, GUEST_RAM_SIZE, Some(ram.as_raw_fd()))
        .ok();
    let efds = msix_eventfds(&mut a);
    a.write_ok(0, 0x10, &[1, 2, 3, 4]);
    a.region_write(0, DMA_DOORBELL, &1u32.to_le_bytes()).ok();
    assert_eq!(eventfd_wait(&efds[0], 5000), Some(1));
    assert_eq!(
        m.read_u64((DMA_TARGET - GUEST_RAM_BASE) as usize),
        dma_pattern(1)
    );
    drop(a);

    wait_resets(&s, 0, 1);
    {
        let st = s.state();
        assert_eq!(
            st.resets,
            vec![vfio_user_server::ResetReason::LostConnection]
        );
        assert_eq!(st.unmapping, vec![(GUEST_RAM_BASE, GUEST_RAM_SIZE)]);
    }

    // A new client on the same socket sees a fresh device.
    let mut b = RawClient::connect(s.path()).unwrap();
    assert_eq!(b.get_info().err(), libc::EINVAL, "VERSION needed again");
    b.negotiate();
    b.ping();
    assert_eq!(b.read_ok(0, 0x10, 4), vec![0; 4]);
    // The old map is gone: device DMA to it fails.
    let r = b.region_write(0, DMA_DOORBELL, &2u32.to_le_bytes());
    assert_eq!(r.err(), libc::EFAULT);
    assert_eq!(
        m.read_u64((DMA_TARGET - GUEST_RAM_BASE) as usize),
        dma_pattern(1)
    );
    // The old eventfds are gone: a loopback trigger reaches none of them.
    b.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 4, &[], &[])
        .ok();
    for e in &efds {
        assert_eq!(eventfd_wait(e, 50), None);
    }
    // The old range can be mapped again.
    b.dma_map(0, GUEST_RAM_BASE, GUEST_RAM_SIZE, Some(ram.as_raw_fd()))
        .ok();
    b.region_write(0, DMA_DOORBELL, &3u32.to_le_bytes()).ok();
    assert_eq!(
        m.read_u64((DMA_TARGET - GUEST_RAM_BASE) as usize),
        dma_pattern(3)
    );
}

#[test]
fn disconnect_mid_message_resets_and_next_client_works() {
    let _g = serial();
    let s = spawn_server();
    let mut a = RawClient::connect_negotiated(s.path());
    let mut m = header(1, cmd::REGION_WRITE, 16 + 16 + 64, 0, 0);
    m.extend_from_slice(&payload::region_access(0, 0, 64, &[7; 20]));
    a.send_bytes(&m, &[]).unwrap();
    drop(a);
    wait_resets(&s, 0, 1);
    assert!(s.state().writes.is_empty(), "a partial write was applied");
    let mut b = RawClient::connect_negotiated(s.path());
    b.ping();
    assert_eq!(b.read_ok(0, 0, 4), vec![0; 4]);
}

#[test]
fn second_client_is_refused_while_one_is_attached() {
    let _g = serial();
    let s = spawn_server();
    let mut a = RawClient::connect_negotiated(s.path());
    a.write_ok(0, 0, &[9]);
    for _ in 0..3 {
        let mut b = RawClient::connect(s.path()).unwrap();
        b.expect_eof();
        a.ping();
    }
    assert_eq!(a.read_ok(0, 0, 1), vec![9]);
    assert!(
        s.state().resets.is_empty(),
        "a refused client reset the device"
    );
    drop(a);
    wait_resets(&s, 0, 1);
    let mut c = RawClient::connect_negotiated(s.path());
    c.ping();
}

#[test]
fn immediate_reconnect_is_served() {
    // A client that reconnects right after closing (Cloud Hypervisor on
    // guest reboot) must be served, even when the server sees the hang-up
    // and the new connection in the same wake-up.
    let _g = serial();
    let s = spawn_server();
    for i in 0..50 {
        let mut c = RawClient::connect_negotiated(s.path());
        c.ping();
        c.write_ok(0, 0, &[i as u8 + 1]);
        drop(c);
        // No wait here on purpose.
        let mut c = match RawClient::connect(s.path()) {
            Ok(c) => c,
            Err(e) => panic!("connect {i}: {e}"),
        };
        let r = c.version_raw(&payload::version(0, 2, Some("{}"), true));
        r.ok();
        assert_eq!(c.read_ok(0, 0, 1), vec![0], "fresh device on reconnect {i}");
        drop(c);
        wait_resets(&s, 0, 2 * (i + 1));
    }
}

#[test]
fn stalled_client_does_not_delay_another_device() {
    let _g = serial();
    let s = spawn_test_servers(2, ServerConfig::default());
    let mut a = RawClient::connect_negotiated(&s.paths[0]);
    let mut b = RawClient::connect_negotiated(&s.paths[1]);

    // A sends 10 bytes of a header, then half of a 4 KiB write.
    let data = vec![0x33u8; 4096];
    let id = a.next_id();
    let mut m = header(id, cmd::REGION_WRITE, (16 + 16 + data.len()) as u32, 0, 0);
    m.extend_from_slice(&payload::region_access(0, 0, data.len() as u32, &data));
    a.send_bytes(&m[..10], &[]).unwrap();
    let t = Instant::now();
    for _ in 0..50 {
        b.ping();
    }
    a.send_bytes(&m[10..2048], &[]).unwrap();
    for _ in 0..50 {
        b.ping();
        b.write_ok(0, 8, &[1]);
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "device 1 was slowed down: {:?}",
        t.elapsed()
    );
    a.expect_no_reply_within(50);
    // A finishes its message and gets its reply.
    a.send_bytes(&m[2048..], &[]).unwrap();
    a.recv_reply(id, cmd::REGION_WRITE).ok();
    assert_eq!(a.read_ok(0, 4000, 4), vec![0x33; 4]);
    assert_eq!(b.read_ok(0, 0, 4), vec![0; 4], "devices are separate");
}

#[test]
fn client_not_reading_replies_does_not_block_the_loop() {
    let _g = serial();
    let s = spawn_test_servers(2, ServerConfig::default());
    let mut a = RawClient::connect_negotiated(&s.paths[0]);
    let mut b = RawClient::connect_negotiated(&s.paths[1]);
    a.write_ok(1, 0, &[0x77]);
    // 24 MiB of replies requested, none read yet.
    let ids: Vec<u16> = (0..24)
        .map(|_| {
            a.send(
                cmd::REGION_READ,
                0,
                &payload::region_access(1, 0, BAR1_SIZE as u32, &[]),
                &[],
            )
        })
        .collect();
    let big: Vec<u16> = (0..20)
        .map(|_| {
            a.send(
                cmd::REGION_READ,
                0,
                &payload::region_access(CONFIG_REGION, 0, CONFIG_SIZE as u32, &[]),
                &[],
            )
        })
        .collect();
    for _ in 0..20 {
        b.ping();
    }
    for id in ids {
        let r = a.recv_reply(id, cmd::REGION_READ).ok();
        assert_eq!(r.payload.len(), 16 + BAR1_SIZE as usize);
        assert_eq!(r.payload[16], 0x77);
    }
    for id in big {
        a.recv_reply(id, cmd::REGION_READ).ok();
    }
    a.ping();
}

#[test]
fn no_fd_leaks_over_many_connections() {
    let _g = serial();
    let s = spawn_server();
    // Warm up once (lazy allocations in the loop and the test).
    let mut c = RawClient::connect_negotiated(s.path());
    c.ping();
    drop(c);
    wait_resets(&s, 0, 1);

    let before = count_fds();
    const N: usize = 50;
    for i in 0..N {
        let mut c = RawClient::connect_negotiated(s.path());
        let ram = memfd("ram", GUEST_RAM_SIZE);
        c.dma_map(0, GUEST_RAM_BASE, GUEST_RAM_SIZE, Some(ram.as_raw_fd()))
            .ok();
        // An fd-less map and an unmapped fd-backed one.
        c.dma_map(0, 0x4000_0000, 0x1000, None).ok();
        c.dma_map(0, 0x5000_0000, 0x1000, Some(ram.as_raw_fd()))
            .ok();
        c.dma_unmap(0, 0x5000_0000, 0x1000).ok();
        // A refused map.
        assert_eq!(
            c.dma_map(0, 0x6000_0000, 0x100000, Some(ram.as_raw_fd()))
                .err(),
            libc::EINVAL
        );
        let efds = msix_eventfds(&mut c);
        // Replace one vector's eventfd, de-assign another.
        let e = eventfd();
        c.set_irqs(
            IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
            IRQ_MSIX,
            1,
            1,
            &[],
            &[e.as_raw_fd()],
        )
        .ok();
        c.set_irqs(
            IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
            IRQ_MSIX,
            2,
            1,
            &[],
            &[],
        )
        .ok();
        // INTx with an unmask eventfd (watched by the loop through a
        // duplicate), replaced once; the second stays until disconnect.
        for _ in 0..2 {
            let unmask = eventfd();
            c.set_irqs(
                IRQ_DATA_EVENTFD | IRQ_ACTION_UNMASK,
                IRQ_INTX,
                0,
                1,
                &[],
                &[unmask.as_raw_fd()],
            )
            .ok();
        }
        // Refused fds: on a command that takes none, too many, wrong count.
        let r = c.call_fds(cmd::GET_INFO, &payload::get_info(16), &[e.as_raw_fd()]);
        assert_eq!(r.err(), libc::EINVAL);
        let many = vec![e.as_raw_fd(); 70];
        let r = c.set_irqs(
            IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
            IRQ_MSIX,
            0,
            4,
            &[],
            &many,
        );
        assert_eq!(r.err(), libc::EINVAL);
        let two = [e.as_raw_fd(), e.as_raw_fd()];
        let r = c.set_irqs(
            IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
            IRQ_MSIX,
            0,
            1,
            &[],
            &two,
        );
        assert_eq!(r.err(), libc::EINVAL);
        let r = c.call_fds(
            cmd::DMA_MAP,
            &payload::dma_map(32, DMA_READ | DMA_WRITE, 0, 0x7000_0000, 0x1000),
            &two,
        );
        assert_eq!(r.err(), libc::EINVAL);
        // An fd sent on an oversized message whose body is skipped.
        let id = c.next_id();
        let size = 16 + 16 + (1 << 20) + 1;
        let mut big = header(id, cmd::DMA_MAP, size as u32, 0, 0);
        big.resize(size, 0);
        c.send_bytes(&big, &[ram.as_raw_fd()]).unwrap();
        assert_eq!(c.recv_reply(id, cmd::DMA_MAP).err(), libc::E2BIG);
        // Received region fds (the test closes them).
        let r = c.region_info(1, 4096).ok();
        assert_eq!(r.fds.len(), 1);
        drop(r);
        // A refused second client.
        let mut refused = RawClient::connect(s.path()).unwrap();
        refused.expect_eof();
        // Half a message left behind on disconnect, with an fd attached.
        let mut m = header(9, cmd::DMA_MAP, 48, 0, 0);
        m.extend_from_slice(&[0; 8]);
        c.send_bytes(&m, &[ram.as_raw_fd()]).unwrap();
        drop(c);
        drop(efds);
        wait_resets(&s, 0, i + 2);
    }
    // The server is idle again (its last reset ran after it closed
    // everything of the client); give stragglers a moment.
    let ok = wait_until(WAIT, || count_fds() == before);
    assert!(ok, "fds before {before}, after {}", count_fds());
}

#[test]
fn oversized_message_body_is_skipped_even_when_huge() {
    let _g = serial();
    let s = spawn_server();
    let mut c = RawClient::connect_negotiated(s.path());
    let id = c.next_id();
    c.send_bytes(&header(id, cmd::REGION_WRITE, 64 << 20, 0, 0), &[])
        .unwrap();
    assert_eq!(c.recv_reply(id, cmd::REGION_WRITE).err(), libc::E2BIG);
    // The server now skips 64 MiB; feed it in chunks (it must not buffer
    // them), then a normal command.
    let chunk = vec![0u8; 1 << 20];
    let mut left = (64 << 20) - 16;
    while left > 0 {
        let n = left.min(chunk.len());
        c.send_bytes(&chunk[..n], &[]).unwrap();
        left -= n;
    }
    c.ping();
}

#[test]
fn socket_file_mode_and_removal() {
    let _g = serial();
    let dir = socket_dir();
    let path = dir.as_path().join("s.sock");
    let ctx = DeviceContext::default();
    let (dev, _state) = TestDevice::new(ctx.clone());
    let server = Server::new(&path, Box::new(dev), ctx, ServerConfig::default()).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(server.path(), Some(path.as_path()));
    // A second server on the same path fails and leaves the socket alone.
    let ctx2 = DeviceContext::default();
    let (dev2, _s2) = TestDevice::new(ctx2.clone());
    match Server::new(&path, Box::new(dev2), ctx2, ServerConfig::default()) {
        Err(ServerError::PathExists(p)) => assert_eq!(p, path),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("second server on an existing path"),
    }
    assert!(path.exists());
    drop(server);
    assert!(!path.exists(), "socket not removed on drop");

    // Through an event loop: stopping the loop drops the servers.
    let mut s = spawn_server();
    let p = s.path().to_path_buf();
    let mut c = RawClient::connect_negotiated(&p);
    c.ping();
    s.shutdown().unwrap();
    assert!(!p.exists(), "socket not removed after the loop stopped");
    c.expect_eof();

    // A custom mode is honoured.
    let path = dir.as_path().join("m.sock");
    let ctx = DeviceContext::default();
    let (dev, _state) = TestDevice::new(ctx.clone());
    let config = ServerConfig {
        socket_mode: 0o660,
        ..ServerConfig::default()
    };
    let server = Server::new(&path, Box::new(dev), ctx, config).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    drop(server);
}

#[test]
fn server_new_on_an_existing_path_fails() {
    let _g = serial();
    let dir = socket_dir();
    let path = dir.as_path().join("taken");
    std::fs::write(&path, b"not a socket").unwrap();
    let ctx = DeviceContext::default();
    let (dev, _state) = TestDevice::new(ctx.clone());
    let r = Server::new(&path, Box::new(dev), ctx, ServerConfig::default());
    assert!(matches!(r, Err(ServerError::PathExists(_))));
    // The existing file is untouched.
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    // A dangling symlink counts as existing too.
    let link = dir.as_path().join("link");
    std::os::unix::fs::symlink(dir.as_path().join("nowhere"), &link).unwrap();
    let ctx = DeviceContext::default();
    let (dev, _state) = TestDevice::new(ctx.clone());
    let r = Server::new(&link, Box::new(dev), ctx, ServerConfig::default());
    assert!(matches!(r, Err(ServerError::PathExists(_))));
    assert!(!dir.as_path().join("nowhere").exists());
    // A directory that does not exist: a bind error.
    let ctx = DeviceContext::default();
    let (dev, _state) = TestDevice::new(ctx.clone());
    let r = Server::new(
        &dir.as_path().join("no/such/dir.sock"),
        Box::new(dev),
        ctx,
        ServerConfig::default(),
    );
    assert!(matches!(r, Err(ServerError::Bind(..))));
}

#[test]
fn reconnect_right_after_a_burst_of_posted_writes_is_served() {
    // The old client leaves more input behind than the server handles in
    // one wake-up; the new connection must wait for it, not be refused.
    let _g = serial();
    let s = spawn_server();
    for i in 0..10 {
        let mut c = RawClient::connect_negotiated(s.path());
        let mut burst = Vec::new();
        for k in 0..300u32 {
            burst.extend_from_slice(&header(
                k as u16,
                cmd::REGION_WRITE,
                36,
                hflags::NO_REPLY,
                0,
            ));
            burst.extend_from_slice(&payload::region_access(0, 0x100, 4, &k.to_le_bytes()));
        }
        c.send_bytes(&burst, &[]).unwrap();
        drop(c);
        let mut c = RawClient::connect(s.path()).unwrap();
        let r = c.version_raw(&payload::version(0, 2, Some("{}"), true));
        r.ok();
        assert_eq!(
            c.read_ok(0, 0x100, 4),
            vec![0; 4],
            "fresh device on reconnect {i}"
        );
        drop(c);
        wait_resets(&s, 0, 2 * (i + 1));
    }
}

#[test]
fn stale_socket_is_replaced_but_a_live_one_is_not() {
    let _g = serial();
    let dir = socket_dir();
    // What a killed server leaves: a socket file nobody listens on.
    let stale = dir.as_path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let ctx = DeviceContext::default();
    let (dev, _state) = TestDevice::new(ctx.clone());
    let server = Server::new(&stale, Box::new(dev), ctx, ServerConfig::default())
        .expect("a stale socket is taken over");
    drop(server);
    // A socket somebody still listens on is refused.
    let live = dir.as_path().join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let ctx = DeviceContext::default();
    let (dev, _state) = TestDevice::new(ctx.clone());
    let r = Server::new(&live, Box::new(dev), ctx, ServerConfig::default());
    assert!(matches!(r, Err(ServerError::PathExists(_))));
}
