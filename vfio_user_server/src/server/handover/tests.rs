//! A server with guest memory, interrupt eventfds, a negotiated client and
//! a message half sent, handed over and going on with the same client;
//! and a server's state restored, or refused, in place.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EFD_NONBLOCK;
use vmm_sys_util::tempdir::TempDir;
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::device::{Lifecycle, RegionDescription, ResetReason};
use crate::irq::IrqIndexInfo;
use crate::socket::send_with_fds;
use crate::vm_migration::{Migratable, Pausable, Snapshottable, Transportable};
use crate::wire::{
    cmd, flags, DmaMap, Encoder, Header, RegionAccess, Version, DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE, HEADER_SIZE, IRQ_SET_DATA_EVENTFD,
};

/// Where the test device writes its register value in guest memory.
const MAILBOX: u64 = 0x1_0010;
const MSIX: u32 = 2;

/// A device with one register: a write stores the value, copies it into
/// guest memory at [`MAILBOX`] and raises MSI-X vector 1. Its state is
/// the value; whether it is paused is shared with the test.
struct TestDev {
    ctx: DeviceContext,
    value: u32,
    paused: Arc<AtomicBool>,
}

impl Device for TestDev {
    fn region(&self, index: u32) -> RegionDescription {
        RegionDescription {
            size: if index == 0 { 4096 } else { 0 },
            read: index == 0,
            write: index == 0,
            mmap: None,
        }
    }

    fn irq_layout(&self) -> Vec<IrqIndexInfo> {
        IrqIndexInfo::pci_layout(true, 0, 2)
    }

    fn region_read(
        &mut self,
        _index: u32,
        _offset: u64,
        data: &mut [u8],
    ) -> Result<(), crate::DeviceError> {
        for (d, s) in data.iter_mut().zip(self.value.to_le_bytes()) {
            *d = s;
        }
        Ok(())
    }

    fn region_write(
        &mut self,
        _index: u32,
        _offset: u64,
        data: &[u8],
    ) -> Result<(), crate::DeviceError> {
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(data) {
            *d = *s;
        }
        self.value = u32::from_le_bytes(b);
        let mem = self.ctx.memory.memory();
        mem.write_obj(self.value, GuestAddress(MAILBOX))
            .map_err(|_| crate::DeviceError::Errno(libc::EFAULT))?;
        let _ = self.ctx.irqs.trigger(MSIX, 1);
        Ok(())
    }
}

impl Pausable for TestDev {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.paused.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.paused.store(false, Ordering::Relaxed);
        Ok(())
    }
}

impl Snapshottable for TestDev {
    fn id(&self) -> String {
        "test-dev".into()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        Snapshot::new_from_state(&self.value)
    }
}

impl Transportable for TestDev {}
impl Migratable for TestDev {}

impl Lifecycle for TestDev {
    fn reset(&mut self, _reason: ResetReason) {
        self.value = 0;
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        self.value = snapshot.to_state()?;
        Ok(())
    }

    fn migratable(&self) -> bool {
        true
    }
}

fn test_device() -> (Box<dyn Device>, DeviceContext) {
    let (device, ctx, _) = watched_test_device();
    (device, ctx)
}

/// [`test_device`], and whether it is paused.
fn watched_test_device() -> (Box<dyn Device>, DeviceContext, Arc<AtomicBool>) {
    let ctx = DeviceContext::default();
    let paused = Arc::new(AtomicBool::new(false));
    let dev = TestDev {
        ctx: ctx.clone(),
        value: 0,
        paused: paused.clone(),
    };
    (Box::new(dev), ctx, paused)
}

/// A server listening in `dir`, with `client` attached.
fn server(dir: &TempDir) -> (Server, UnixStream) {
    server_with(dir, ServerConfig::default())
}

/// [`server`] with `config`.
fn server_with(dir: &TempDir, config: ServerConfig) -> (Server, UnixStream) {
    let listener = UnixListener::bind(dir.as_path().join("s.sock")).unwrap();
    let (device, ctx) = test_device();
    let mut s = Server::from_listener(listener, device, ctx, config).unwrap();
    let (ours, client) = UnixStream::pair().unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    s.attach(ours).unwrap();
    (s, client)
}

/// A command message.
fn message(id: u16, command: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Header {
        msg_id: id,
        cmd: command,
        msg_size: (HEADER_SIZE + payload.len()) as u32,
        flags: flags::TYPE_COMMAND,
        error_no: 0,
    }
    .encode()
    .to_vec();
    m.extend_from_slice(payload);
    m
}

fn region_write(id: u16, value: u32) -> Vec<u8> {
    let mut p = RegionAccess {
        offset: 0,
        region: 0,
        count: 4,
    }
    .encode();
    p.extend_from_slice(&value.to_le_bytes());
    message(id, cmd::REGION_WRITE, &p)
}

/// Reads one reply and checks it answers `id` without error.
fn reply(client: &mut UnixStream, id: u16) -> Vec<u8> {
    let mut h = [0u8; HEADER_SIZE];
    client.read_exact(&mut h).unwrap();
    let h = Header::decode(&h).unwrap();
    assert_eq!(h.msg_id, id);
    assert_eq!(h.flags & flags::TYPE_REPLY, flags::TYPE_REPLY);
    assert_eq!(h.error_no, 0, "command {} failed", h.cmd);
    let mut payload = vec![0u8; h.msg_size as usize - HEADER_SIZE];
    client.read_exact(&mut payload).unwrap();
    payload
}

/// Lets `server` handle what the client sent, as a level-triggered event
/// loop does: again while its socket has input or messages wait for their
/// turn.
fn serve(server: &mut Server) {
    for _ in 0..16 {
        assert!(server.handle_connection_event(true, true));
        let mut p = libc::pollfd {
            fd: server.connection_fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting.
        if unsafe { libc::poll(&mut p, 1, 0) } == 0 && !server.has_message_backlog() {
            return;
        }
    }
}

/// VERSION, one DMA map of `ram`, MSI-X vector 1 on `irq`, and INTx's
/// unmask eventfd.
fn set_up(server: &mut Server, client: &mut UnixStream, ram: &File, irq: &EventFd) -> EventFd {
    let v = Version {
        major: 0,
        minor: 2,
        json: b"{}".to_vec(),
    };
    client
        .write_all(&message(1, cmd::VERSION, &v.encode()))
        .unwrap();
    serve(server);
    reply(client, 1);

    let map = DmaMap {
        argsz: DmaMap::SIZE as u32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset: 0x1000,
        address: 0x1_0000,
        size: 0x4000,
    };
    let m = message(2, cmd::DMA_MAP, &map.encode());
    send_with_fds(client.as_raw_fd(), &[&m], &[ram.as_raw_fd()]).unwrap();
    // A map without an fd, which the device cannot reach.
    let fdless = DmaMap {
        address: 0x10_0000,
        size: 0x1000,
        offset: 0,
        ..map
    };
    client
        .write_all(&message(3, cmd::DMA_MAP, &fdless.encode()))
        .unwrap();
    serve(server);
    reply(client, 2);
    reply(client, 3);

    let set = |index: u32, action: u32, start: u32| {
        let mut e = Encoder::default();
        e.u32(20)
            .u32(IRQ_SET_DATA_EVENTFD | action)
            .u32(index)
            .u32(start)
            .u32(1);
        e.0
    };
    let m = message(
        4,
        cmd::DEVICE_SET_IRQS,
        &set(MSIX, IRQ_SET_ACTION_TRIGGER, 1),
    );
    send_with_fds(client.as_raw_fd(), &[&m], &[irq.as_raw_fd()]).unwrap();
    serve(server);
    reply(client, 4);
    let unmask = EventFd::new(EFD_NONBLOCK).unwrap();
    let m = message(
        5,
        cmd::DEVICE_SET_IRQS,
        &set(0, crate::wire::IRQ_SET_ACTION_UNMASK, 0),
    );
    send_with_fds(client.as_raw_fd(), &[&m], &[unmask.as_raw_fd()]).unwrap();
    serve(server);
    reply(client, 5);
    unmask
}

#[test]
fn a_server_goes_on_in_another_process() {
    let dir = TempDir::new().unwrap();
    let (mut old, mut client) = server(&dir);
    let ram = TempFile::new().unwrap().into_file();
    ram.set_len(0x8000).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let _unmask = set_up(&mut old, &mut client, &ram, &irq);

    // The device works: the value lands in guest memory, the interrupt
    // fires.
    client.write_all(&region_write(6, 0xaaaa)).unwrap();
    serve(&mut old);
    reply(&mut client, 6);
    assert_eq!(irq.read().unwrap(), 1);
    let mut b = [0u8; 4];
    use std::os::unix::fs::FileExt;
    ram.read_exact_at(&mut b, 0x1000 + 0x10).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xaaaa);

    // A message half sent, with its fd: the first 10 bytes of a DMA map.
    let map = DmaMap {
        argsz: DmaMap::SIZE as u32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset: 0,
        address: 0x2_0000,
        size: 0x1000,
    };
    let half = message(7, cmd::DMA_MAP, &map.encode());
    let ram2 = TempFile::new().unwrap().into_file();
    ram2.set_len(0x1000).unwrap();
    send_with_fds(client.as_raw_fd(), &[&half[..10]], &[ram2.as_raw_fd()]).unwrap();
    serve(&mut old);

    let handover = old.export_handover(Duration::from_secs(1)).unwrap();
    let st = &handover.state;
    assert_eq!(st.format, HANDOVER_FORMAT);
    assert_eq!(st.kind, "test-dev");
    assert!(!st.held);
    assert_eq!(st.dma.len(), 2);
    assert_eq!(st.dma[0].offset, 0x1000);
    assert!(st.dma[0].fd.is_some() && st.dma[1].fd.is_none());
    assert_eq!(st.irqs.len(), 1);
    assert_eq!((st.irqs[0].index, st.irqs[0].vector), (MSIX, 1));
    assert_eq!(st.unmask.as_ref().map(|u| u.index), Some(0));
    let c = st.connection.as_ref().unwrap();
    assert!(c.negotiated);
    assert_eq!(c.rx, to_hex(&half[..10]));
    assert_eq!(c.rx_fds.len(), 1);
    assert_eq!(c.rx_fds[0].offset, 0);
    // listener, connection, the half message's fd, one map, two eventfds.
    assert_eq!(handover.fds.len(), 6);

    // The state crosses as JSON and the fds over a socket, as between
    // two processes.
    let (a, b2) = UnixStream::pair().unwrap();
    let json = serde_json::to_vec(&handover.state).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    send_frame(&a, &json, &handover.fds, deadline).unwrap();
    let (body, fds) = recv_frame(&b2, 1 << 20, deadline).unwrap();
    drop(handover);
    let state: HandoverState = serde_json::from_slice(&body).unwrap();

    let (device, ctx, paused) = watched_test_device();
    let mut new = Server::import_handover(
        Handover { state, fds },
        device,
        ctx,
        ServerConfig::default(),
    )
    .unwrap();
    // Paused until the old process lets go.
    assert!(paused.load(Ordering::Relaxed));
    old.finish_handover();
    new.start_handed_over().unwrap();
    assert!(!paused.load(Ordering::Relaxed));
    assert!(old.handed_over());
    assert!(!old.connected());
    assert!(new.connected());

    // The rest of the message arrives at the new server and completes the
    // map with the fd sent with its first bytes.
    client.write_all(&half[10..]).unwrap();
    serve(&mut new);
    reply(&mut client, 7);
    // The restored device has its value and goes on with the same memory
    // and eventfd.
    client
        .write_all(&message(
            8,
            cmd::REGION_READ,
            &RegionAccess {
                offset: 0,
                region: 0,
                count: 4,
            }
            .encode(),
        ))
        .unwrap();
    serve(&mut new);
    assert_eq!(&reply(&mut client, 8)[16..], &0xaaaau32.to_le_bytes());
    client.write_all(&region_write(9, 0xbbbb)).unwrap();
    serve(&mut new);
    reply(&mut client, 9);
    assert_eq!(irq.read().unwrap(), 1);
    ram.read_exact_at(&mut b, 0x1000 + 0x10).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xbbbb);
    assert!(new.irq_unmask_fd().1.is_some());
}

#[test]
fn messages_waiting_for_their_turn_cross_a_hand_over() {
    let dir = TempDir::new().unwrap();
    // One reply queued stops the handling of a client's messages.
    let config = ServerConfig {
        max_queued_reply_bytes: 1,
        ..ServerConfig::default()
    };
    let (mut old, mut client) = server_with(&dir, config.clone());
    let ram = TempFile::new().unwrap().into_file();
    ram.set_len(0x8000).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let _unmask = set_up(&mut old, &mut client, &ram, &irq);

    // Three writes in one go: the first is handled, the others wait.
    let waiting = [region_write(11, 0xb), region_write(12, 0xc)].concat();
    client
        .write_all(&[region_write(10, 0xa), waiting.clone()].concat())
        .unwrap();
    assert!(old.handle_connection_event(true, true));
    assert!(old.has_message_backlog());
    reply(&mut client, 10);

    let handover = old.export_handover(Duration::from_secs(1)).unwrap();
    let c = handover.state.connection.as_ref().unwrap();
    assert_eq!(c.rx, to_hex(&waiting));
    let (device, ctx) = test_device();
    let mut new = Server::import_handover(handover, device, ctx, config).unwrap();
    old.finish_handover();
    new.start_handed_over().unwrap();
    // The new server knows they wait, and handles them in order without
    // the client sending anything more.
    assert!(new.has_message_backlog());
    serve(&mut new);
    assert!(!new.has_message_backlog());
    reply(&mut client, 11);
    reply(&mut client, 12);
    let mut b = [0u8; 4];
    use std::os::unix::fs::FileExt;
    ram.read_exact_at(&mut b, 0x1000 + 0x10).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xc);
}

#[test]
fn an_aborted_hand_over_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let (mut s, mut client) = server(&dir);
    let ram = TempFile::new().unwrap().into_file();
    ram.set_len(0x8000).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    set_up(&mut s, &mut client, &ram, &irq);
    let h = s.export_handover(Duration::from_secs(1)).unwrap();
    assert!(s.paused());
    assert!(s.export_handover(Duration::from_secs(1)).is_err());
    drop(h);
    s.abort_handover();
    assert!(!s.paused());
    client.write_all(&region_write(6, 7)).unwrap();
    serve(&mut s);
    reply(&mut client, 6);
    assert_eq!(irq.read().unwrap(), 1);

    // A device the control socket paused stays paused, and is handed over
    // as held.
    s.pause().unwrap();
    let h = s.export_handover(Duration::from_secs(1)).unwrap();
    assert!(h.state.held);
    s.abort_handover();
    assert!(s.paused());
}

#[test]
fn a_state_of_another_format_or_kind_is_refused() {
    let dir = TempDir::new().unwrap();
    let (mut s, _client) = server(&dir);
    let h = s.export_handover(Duration::from_secs(1)).unwrap();
    // The state changed by `change`, with copies of the fds, to a new
    // device: the error it is refused with.
    let refused = |change: &dyn Fn(&mut HandoverState)| {
        let mut state = h.state.clone();
        change(&mut state);
        let fds = h.fds.iter().map(|f| f.try_clone().unwrap()).collect();
        let (device, ctx) = test_device();
        Server::import_handover(
            Handover { state, fds },
            device,
            ctx,
            ServerConfig::default(),
        )
        .err()
        .unwrap()
    };
    let e = refused(&|s| s.format = HANDOVER_FORMAT - 1);
    assert!(matches!(e, HandoverError::Format { .. }), "{e}");
    assert!(e.to_string().contains("format 0"), "{e}");
    let e = refused(&|s| s.kind = "virtio-blk".into());
    assert!(matches!(e, HandoverError::Kind { .. }), "{e}");
    // An fd index out of range.
    let e = refused(&|s| s.listener = 99);
    assert!(matches!(e, HandoverError::Invalid(_)), "{e}");
}

#[test]
fn frames_carry_many_fds_and_refuse_garbage() {
    let (a, b) = UnixStream::pair().unwrap();
    let files: Vec<OwnedFd> = (0..150)
        .map(|_| OwnedFd::from(TempFile::new().unwrap().into_file()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let body = vec![7u8; 300_000];
    let sender = std::thread::spawn(move || send_frame(&a, &body, &files, deadline).map(|_| a));
    let (got, fds) = recv_frame(&b, 1 << 20, deadline).unwrap();
    assert_eq!(got.len(), 300_000);
    assert_eq!(fds.len(), 150);
    let a = sender.join().unwrap().unwrap();

    // Too large a body, a bad magic, a peer that goes away, silence.
    send_frame(&a, &[0; 64], &[], deadline).unwrap();
    assert!(recv_frame(&b, 63, deadline).is_err());
    let (c, d) = UnixStream::pair().unwrap();
    (&c).write_all(b"not a frame at all").unwrap();
    assert_eq!(
        recv_frame(&d, 100, deadline).unwrap_err().kind(),
        io::ErrorKind::InvalidData
    );
    drop(c);
    assert_eq!(
        recv_frame(&d, 100, deadline).unwrap_err().kind(),
        io::ErrorKind::UnexpectedEof
    );
    let (_e, f) = UnixStream::pair().unwrap();
    let soon = Instant::now() + Duration::from_millis(50);
    assert_eq!(
        recv_frame(&f, 100, soon).unwrap_err().kind(),
        io::ErrorKind::TimedOut
    );
    assert_eq!(peer_pid(&f).unwrap(), std::process::id() as i32);
}

#[test]
fn hex_round_trip() {
    let b: Vec<u8> = (0..=255).collect();
    assert_eq!(from_hex(&to_hex(&b)).unwrap(), b);
    assert!(from_hex("abc").is_none());
    assert!(from_hex("zz").is_none());
}

#[test]
fn a_refused_restore_leaves_the_device_running() {
    let dir = TempDir::new().unwrap();
    let listener = UnixListener::bind(dir.as_path().join("s.sock")).unwrap();
    let (device, ctx, paused) = watched_test_device();
    let mut s = Server::from_listener(listener, device, ctx, ServerConfig::default()).unwrap();
    // Not the device's state (a string, not its register value).
    let bad = Snapshot::new_from_state(&"not a value").unwrap();
    assert!(s.restore(&bad).is_err());
    assert!(!paused.load(Ordering::Relaxed), "left paused");
    // A good one is taken, and the device runs.
    s.restore(&Snapshot::new_from_state(&7u32).unwrap())
        .unwrap();
    assert!(!paused.load(Ordering::Relaxed));
}
