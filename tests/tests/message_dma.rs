//! Server-to-client DMA_READ/DMA_WRITE for memory mapped without an fd:
//! sent from the loop after the reply of the command that queued them, in
//! the spec layout or QEMU's, matched to the client's reply by id.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::client::{payload, poll_readable};
use integration_tests::device::bar0_and_config_region;
use integration_tests::proto::*;
use integration_tests::*;
use vfio_user_server::irq::IrqIndexInfo;
use vfio_user_server::message_dma::MessageDma;
use vfio_user_server::vm_migration::{Migratable, Pausable, Snapshottable, Transportable};
use vfio_user_server::{
    Device, DeviceContext, DeviceError, Lifecycle, RegionDescription, ResetReason, ServerConfig,
};

/// Guest address of the fd-less map the device DMAs into.
const TARGET: u64 = 0x20_0000;

type Completions = Arc<Mutex<Vec<(u64, Result<Vec<u8>, i32>)>>>;

/// BAR0 write at 0: read 8 bytes at TARGET + value; at 8: write the 8 data
/// bytes at TARGET; at 16: read `value` bytes at TARGET; at 24: write 8
/// bytes at TARGET + value.
struct MsgDmaDevice {
    dma: MessageDma,
    done: Completions,
}

impl Device for MsgDmaDevice {
    fn region(&self, index: u32) -> RegionDescription {
        bar0_and_config_region(index)
    }

    fn irq_layout(&self) -> Vec<IrqIndexInfo> {
        IrqIndexInfo::pci_layout(true, 0, 1)
    }

    fn region_read(&mut self, _i: u32, _o: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        data.fill(0);
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if index != 0 || data.len() != 8 {
            return Ok(());
        }
        let v = u64::from_le_bytes(data.try_into().unwrap());
        match offset {
            0 => self.dma.read(TARGET + v, 8),
            8 => self.dma.write(TARGET, data.to_vec()),
            16 => self.dma.read(TARGET, v as u32),
            24 => self.dma.write(TARGET + v, vec![0xaa; 8]),
            _ => return Ok(()),
        };
        Ok(())
    }
}

impl Pausable for MsgDmaDevice {}
impl Snapshottable for MsgDmaDevice {}
impl Transportable for MsgDmaDevice {}
impl Migratable for MsgDmaDevice {}

impl Lifecycle for MsgDmaDevice {
    fn reset(&mut self, _reason: ResetReason) {}

    fn message_dma_done(&mut self, id: u64, result: Result<Vec<u8>, i32>) {
        self.done.lock().unwrap().push((id, result));
    }
}

fn setup(minor: u16) -> (TestServer, RawClient, Completions) {
    setup_with(minor, ServerConfig::default())
}

fn setup_with(minor: u16, config: ServerConfig) -> (TestServer, RawClient, Completions) {
    let ctx = DeviceContext::default();
    let done = Completions::default();
    let dev = MsgDmaDevice {
        dma: ctx.message_dma.clone(),
        done: done.clone(),
    };
    let s = spawn_devices(vec![(Box::new(dev) as Box<dyn Device>, ctx)], config);
    let mut c = RawClient::connect(s.path()).unwrap();
    c.version_raw(&payload::version(
        0,
        minor,
        Some(r#"{"capabilities":{}}"#),
        true,
    ))
    .ok();
    // fd-less map: only reachable by message.
    c.dma_map(0, TARGET, 0x1000, None).ok();
    (s, c, done)
}

fn wait_done(done: &Completions, n: usize) -> Vec<(u64, Result<Vec<u8>, i32>)> {
    assert!(
        wait_until(Duration::from_secs(5), || done.lock().unwrap().len() >= n),
        "device saw no completion"
    );
    done.lock().unwrap().clone()
}

fn reply_to(c: &mut RawClient, req: &Reply, flags: u32, errno: u32, payload: &[u8]) {
    let mut m = integration_tests::client::header(
        req.msg_id,
        req.cmd,
        (HDR + payload.len()) as u32,
        flags,
        errno,
    );
    m.extend_from_slice(payload);
    c.send_bytes(&m, &[]).unwrap();
}

#[test]
fn spec_layout_read_and_write() {
    let (_s, mut c, done) = setup(2);
    // The command's own reply comes first, then our DMA_READ.
    c.region_write(0, 0, &16u64.to_le_bytes()).ok();
    let req = c.recv().unwrap();
    assert_eq!(req.cmd, cmd::DMA_READ);
    assert_eq!(req.flags, hflags::COMMAND);
    assert_eq!(req.payload.len(), 16);
    assert_eq!(
        integration_tests::client::le64(&req.payload, 0),
        TARGET + 16
    );
    assert_eq!(integration_tests::client::le64(&req.payload, 8), 8);
    let mut p = req.payload.clone();
    p.extend_from_slice(b"12345678");
    reply_to(&mut c, &req, hflags::REPLY, 0, &p);
    assert_eq!(wait_done(&done, 1)[0].1, Ok(b"12345678".to_vec()));

    c.region_write(0, 8, b"abcdefgh").ok();
    let req = c.recv().unwrap();
    assert_eq!(req.cmd, cmd::DMA_WRITE);
    assert_eq!(&req.payload[16..], b"abcdefgh");
    assert_eq!(integration_tests::client::le64(&req.payload, 8), 8);
    let head = req.payload[..16].to_vec();
    reply_to(&mut c, &req, hflags::REPLY, 0, &head);
    assert_eq!(wait_done(&done, 2)[1].1, Ok(Vec::new()));
    c.ping();
}

#[test]
fn qemu_layout_read_and_write() {
    // QEMU proposes version 0.0: count is a u32 and data starts at 12.
    let (_s, mut c, done) = setup(0);
    c.region_write(0, 0, &0u64.to_le_bytes()).ok();
    let req = c.recv().unwrap();
    assert_eq!(req.cmd, cmd::DMA_READ);
    assert_eq!(req.payload.len(), 16);
    assert_eq!(integration_tests::client::le32(&req.payload, 8), 8);
    let mut p = req.payload[..12].to_vec();
    p.extend_from_slice(b"qemudata");
    p.extend_from_slice(&[0; 4]);
    reply_to(&mut c, &req, hflags::REPLY, 0, &p);
    assert_eq!(wait_done(&done, 1)[0].1, Ok(b"qemudata".to_vec()));

    c.region_write(0, 8, b"ABCDEFGH").ok();
    let req = c.recv().unwrap();
    assert_eq!(req.cmd, cmd::DMA_WRITE);
    assert_eq!(req.payload.len(), 12 + 8 + 4);
    assert_eq!(&req.payload[12..20], b"ABCDEFGH");
    // QEMU answers a DMA_WRITE with a bare header.
    reply_to(&mut c, &req, hflags::REPLY, 0, &[]);
    assert_eq!(wait_done(&done, 2)[1].1, Ok(Vec::new()));
    c.ping();
}

/// A device write into memory the client mapped read-only (a ROM) is
/// refused, unsent; reads of it go out.
#[test]
fn writes_to_read_only_memory_fail_unsent() {
    let (_s, mut c, done) = setup(2);
    let rom = TARGET + 0x1000;
    c.call(
        cmd::DMA_MAP,
        &payload::dma_map(32, DMA_READ, 0, rom, 0x1000),
    )
    .ok();
    // Into the ROM: refused at once, nothing sent.
    c.region_write(0, 24, &0x1000u64.to_le_bytes()).ok();
    assert_eq!(wait_done(&done, 1)[0].1, Err(libc::EACCES));
    c.expect_no_reply_within(100);
    // Into memory mapped read-write: sent.
    c.region_write(0, 24, &0u64.to_le_bytes()).ok();
    let req = c.recv().unwrap();
    assert_eq!(req.cmd, cmd::DMA_WRITE);
    reply_to(&mut c, &req, hflags::REPLY, 0, &[]);
    wait_done(&done, 2);
    // The ROM can be read.
    c.region_write(0, 0, &0x1000u64.to_le_bytes()).ok();
    let req = c.recv().unwrap();
    assert_eq!(req.cmd, cmd::DMA_READ);
    c.ping();
}

/// QEMU takes a DMA request no larger than the `max_data_xfer_size` we
/// advertised, whatever it advertised itself.
#[test]
fn requests_larger_than_either_side_takes_fail_unsent() {
    let config = ServerConfig {
        max_data_xfer_size: 2048,
        ..Default::default()
    };
    // The client (empty capabilities) takes 1 MiB.
    let (_s, mut c, done) = setup_with(2, config);
    c.region_write(0, 16, &4096u64.to_le_bytes()).ok();
    assert_eq!(wait_done(&done, 1)[0].1, Err(libc::E2BIG));
    c.expect_no_reply_within(100);
    // Within both: sent.
    c.region_write(0, 16, &2048u64.to_le_bytes()).ok();
    let req = c.recv().unwrap();
    assert_eq!(req.cmd, cmd::DMA_READ);
    c.ping();
}

#[test]
fn client_errors_and_unmapped_addresses_reach_the_device() {
    let (_s, mut c, done) = setup(2);
    c.region_write(0, 0, &0u64.to_le_bytes()).ok();
    let req = c.recv().unwrap();
    reply_to(&mut c, &req, hflags::REPLY | hflags::ERROR, 14, &[]);
    assert_eq!(wait_done(&done, 1)[0].1, Err(libc::EFAULT));
    // Outside every DMA map: fails at once, nothing is sent.
    c.region_write(0, 0, &0x10_0000u64.to_le_bytes()).ok();
    assert_eq!(wait_done(&done, 2)[1].1, Err(libc::EFAULT));
    c.expect_no_reply_within(100);
    // A reply nobody asked for is refused.
    let bogus = Reply {
        msg_id: 0x7777,
        cmd: cmd::DMA_READ,
        msg_size: 16,
        flags: 0,
        error_no: 0,
        payload: Vec::new(),
        fds: Vec::new(),
    };
    reply_to(&mut c, &bogus, hflags::REPLY, 0, &[]);
    let r = c.recv().unwrap();
    assert_eq!(r.msg_id, 0x7777);
    assert_eq!(r.err(), libc::EINVAL);
    c.ping();
}

#[test]
fn disconnect_fails_outstanding_requests() {
    let (_s, mut c, done) = setup(2);
    c.region_write(0, 0, &0u64.to_le_bytes()).ok();
    let req = c.recv().unwrap();
    assert_eq!(req.cmd, cmd::DMA_READ);
    drop(c);
    assert_eq!(wait_done(&done, 1)[0].1, Err(libc::ECONNRESET));
}

#[test]
fn at_most_sixteen_requests_are_outstanding() {
    let (_s, mut c, done) = setup(2);
    // Twenty reads queued by posted writes: sixteen go out, four wait.
    for i in 0..20u64 {
        let v = (i * 8).to_le_bytes();
        c.send(
            cmd::REGION_WRITE,
            hflags::NO_REPLY,
            &payload::region_access(0, 0, 8, &v),
            &[],
        );
    }
    let mut reqs = Vec::new();
    for _ in 0..16 {
        let r = c.recv().unwrap();
        assert_eq!(r.cmd, cmd::DMA_READ);
        reqs.push(r);
    }
    // No seventeenth until one is answered.
    assert!(!poll_readable(c.fd(), 200), "more than sixteen outstanding");
    // Each reply lets one more out, until all twenty completed.
    let mut answered = 0;
    while answered < 20 {
        let req = if answered < reqs.len() {
            &reqs[answered]
        } else {
            let r = c.recv().unwrap();
            reqs.push(r);
            &reqs[answered]
        };
        let mut p = req.payload.clone();
        p.extend_from_slice(&[answered as u8; 8]);
        let req_hdr = Reply {
            msg_id: req.msg_id,
            cmd: req.cmd,
            msg_size: 0,
            flags: 0,
            error_no: 0,
            payload: Vec::new(),
            fds: Vec::new(),
        };
        reply_to(&mut c, &req_hdr, hflags::REPLY, 0, &p);
        answered += 1;
    }
    assert_eq!(wait_done(&done, 20).len(), 20);
    c.ping();
}
