//! Writes the seed corpora of every fuzz target from real protocol
//! traffic, in each target's input format:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus [OUT_DIR]
//! ```
//!
//! OUT_DIR defaults to `fuzz/corpus`; the named seeds of each target are
//! written to `OUT_DIR/<target>/` (inputs merged there from fuzzing runs
//! are left alone). The server seeds are replayed against the server
//! before they are written, and the generator fails if a seed does not do
//! what it is meant to (e.g. the virtio-blk requests must complete with
//! status OK), so the corpus keeps reaching the deep paths as the library
//! changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vfio_user_fuzz::blk_queue::Setup;
use vfio_user_fuzz::megasas_frames::{self, write_op};
use vfio_user_fuzz::net_queue::{self, ctrl, feature, op, ChainSpec, DescSpec, InputWriter};
use vfio_user_fuzz::pci_config;
use vfio_user_fuzz::scsi_cdb;
use vfio_user_fuzz::server_stream::{self, Input, Msg, Size, DEV_BLK, DEV_PCIE, DEV_TEST, FD_NONE};
use vfio_user_fuzz::test_device as td;
use vfio_user_fuzz::Writer;
use vfio_user_server::device::{Device, DeviceContext};
use vfio_user_server::state_stream::encode_stream;
use vfio_user_server::wire::*;

const QEMU_JSON: &str = r#"{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#;
const CH_JSON: &str = r#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#;

/// IOVA of the client's guest RAM memfd (GUEST_RAM_SIZE bytes).
const G: u64 = 0x10_0000;

// virtio feature bits.
const F_VERSION_1_HI: u32 = 1; // bit 32
const F_EVENT_IDX: u32 = 1 << 29;
const F_INDIRECT: u32 = 1 << 28;
const BLK_F_FLUSH: u32 = 1 << 9;
const BLK_F_MQ: u32 = 1 << 12;
const BLK_F_DISCARD: u32 = 1 << 13;
const BLK_F_WRITE_ZEROES: u32 = 1 << 14;
const BLK_F_SEG_MAX: u32 = 1 << 2;
const BLK_F_BLK_SIZE: u32 = 1 << 6;

// virtio-pci common config offsets in BAR0.
const CC_DFSELECT: u64 = 0x00;
const CC_GFSELECT: u64 = 0x08;
const CC_GF: u64 = 0x0c;
const CC_MSIX: u64 = 0x10;
const CC_STATUS: u64 = 0x14;
const CC_Q_SELECT: u64 = 0x16;
const CC_Q_SIZE: u64 = 0x18;
const CC_Q_MSIX: u64 = 0x1a;
const CC_Q_ENABLE: u64 = 0x1c;
const CC_Q_DESC: u64 = 0x20;
const CC_Q_AVAIL: u64 = 0x28;
const CC_Q_USED: u64 = 0x30;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;

const S_ACK: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;

const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;
const D_INDIRECT: u16 = 4;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Builds one message.
type MsgFn = Box<dyn Fn(&mut Client) -> Msg>;

/// Builds messages with increasing ids.
struct Client {
    id: u16,
}

impl Client {
    fn new() -> Self {
        Client { id: 0 }
    }

    fn next(&mut self) -> u16 {
        self.id = self.id.wrapping_add(1);
        self.id
    }

    fn cmd(&mut self, cmd: u16, payload: Vec<u8>) -> Msg {
        Msg::command(self.next(), cmd, payload)
    }

    fn version(&mut self, minor: u16, json: &str) -> Msg {
        let v = Version {
            major: 0,
            minor,
            json: json.as_bytes().to_vec(),
        };
        self.cmd(cmd::VERSION, v.encode())
    }

    fn dma_map(&mut self, flags: u32, offset: u64, address: u64, size: u64) -> Msg {
        let m = DmaMap {
            argsz: DmaMap::SIZE as u32,
            flags,
            offset,
            address,
            size,
        };
        self.cmd(cmd::DMA_MAP, m.encode())
    }

    fn dma_unmap(&mut self, flags: u32, address: u64, size: u64) -> Msg {
        let u = DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            flags,
            address,
            size,
        };
        self.cmd(cmd::DMA_UNMAP, u.encode())
    }

    fn get_info(&mut self, argsz: u32) -> Msg {
        let i = DeviceInfo {
            argsz,
            ..Default::default()
        };
        self.cmd(cmd::DEVICE_GET_INFO, i.encode())
    }

    fn region_info(&mut self, index: u32, argsz: u32) -> Msg {
        let i = RegionInfo {
            argsz,
            index,
            ..Default::default()
        };
        self.cmd(cmd::DEVICE_GET_REGION_INFO, i.encode())
    }

    fn io_fds(&mut self, index: u32) -> Msg {
        let i = RegionIoFds {
            argsz: 16,
            index,
            ..Default::default()
        };
        self.cmd(cmd::DEVICE_GET_REGION_IO_FDS, i.encode())
    }

    fn irq_info(&mut self, index: u32) -> Msg {
        let i = IrqInfo {
            argsz: 16,
            index,
            ..Default::default()
        };
        self.cmd(cmd::DEVICE_GET_IRQ_INFO, i.encode())
    }

    fn set_irqs(&mut self, flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Msg {
        let s = IrqSet {
            argsz: (IrqSet::SIZE + data.len()) as u32,
            flags,
            index,
            start,
            count,
        };
        let mut p = s.encode();
        p.extend_from_slice(data);
        self.cmd(cmd::DEVICE_SET_IRQS, p)
    }

    fn read(&mut self, region: u32, offset: u64, count: u32) -> Msg {
        let a = RegionAccess {
            offset,
            region,
            count,
        };
        self.cmd(cmd::REGION_READ, a.encode())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Msg {
        let a = RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        let mut p = a.encode();
        p.extend_from_slice(data);
        self.cmd(cmd::REGION_WRITE, p)
    }

    fn write_multi(&mut self, records: &[(u32, u64, &[u8])]) -> Msg {
        let mut p = (records.len() as u64).to_le_bytes().to_vec();
        for (region, offset, data) in records {
            let mut d = [0u8; 8];
            d[..data.len()].copy_from_slice(data);
            let r = WriteMultiRecord {
                offset: *offset,
                region: *region,
                count: data.len() as u32,
                data: d,
            };
            p.extend_from_slice(&r.encode());
        }
        self.cmd(cmd::REGION_WRITE_MULTI, p).no_reply()
    }

    fn reset(&mut self) -> Msg {
        self.cmd(cmd::DEVICE_RESET, Vec::new())
    }

    fn feature(&mut self, argsz: u32, flags: u32, data: &[u8]) -> Msg {
        let mut p = DeviceFeature { argsz, flags }.encode();
        p.extend_from_slice(data);
        self.cmd(cmd::DEVICE_FEATURE, p)
    }

    fn set_state(&mut self, state: u32) -> Msg {
        let mut d = state.to_le_bytes().to_vec();
        d.extend_from_slice(&u32::MAX.to_le_bytes());
        self.feature(16, DEVICE_FEATURE_MIG_DEVICE_STATE | DEVICE_FEATURE_SET, &d)
    }

    fn mig_read(&mut self, size: u32) -> Msg {
        let m = MigData {
            argsz: MigData::SIZE as u32 + size,
            size,
        };
        self.cmd(cmd::MIG_DATA_READ, m.encode())
    }

    fn mig_write(&mut self, data: &[u8]) -> Msg {
        let m = MigData {
            argsz: (MigData::SIZE + data.len()) as u32,
            size: data.len() as u32,
        };
        let mut p = m.encode();
        p.extend_from_slice(data);
        self.cmd(cmd::MIG_DATA_WRITE, p)
    }
}

/// A seed for `server_stream` under construction.
struct Seed {
    input: Input,
    c: Client,
}

impl Seed {
    fn new(device: u8) -> Seed {
        Seed {
            input: Input::new(device),
            c: Client::new(),
        }
    }

    fn send(&mut self, m: Msg) -> &mut Self {
        self.input.msg(&m);
        self
    }

    fn with<F: FnOnce(&mut Client) -> Msg>(&mut self, f: F) -> &mut Self {
        let m = f(&mut self.c);
        self.send(m)
    }

    /// VERSION with QEMU's JSON and a DMA map of the guest RAM memfd.
    fn qemu_start(&mut self) -> &mut Self {
        self.with(|c| c.version(0, QEMU_JSON))
            .with(|c| c.dma_map(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, 0, G, 0x8000))
    }

    fn cfg_write(&mut self, offset: u64, data: &[u8]) -> &mut Self {
        self.with(|c| c.write(PCI_CONFIG_REGION_INDEX, offset, data))
    }

    fn bar0(&mut self, offset: u64, data: &[u8]) -> &mut Self {
        self.with(|c| c.write(0, offset, data))
    }

    fn guest(&mut self, iova: u64, bytes: &[u8]) -> &mut Self {
        self.input.guest((iova - G) as u16, bytes);
        self
    }
}

/// Finds capability `id` of `device` by walking its config space.
fn find_cap(device: &mut dyn Device, id: u8, nth: usize) -> Option<u64> {
    let mut b = [0u8; 1];
    device
        .region_read(PCI_CONFIG_REGION_INDEX, 0x34, &mut b)
        .ok()?;
    let mut p = u64::from(b[0] & 0xfc);
    let mut seen = 0;
    while p != 0 {
        let mut h = [0u8; 2];
        device
            .region_read(PCI_CONFIG_REGION_INDEX, p, &mut h)
            .ok()?;
        if h[0] == id {
            if seen == nth {
                return Some(p);
            }
            seen += 1;
        }
        p = u64::from(h[1] & 0xfc);
    }
    None
}

fn device(kind: u8) -> Box<dyn Device> {
    server_stream::build_device(kind, &DeviceContext::default())
}

/// A real migration stream of a freshly built device `kind`.
fn stream_of(kind: u8) -> Vec<u8> {
    let mut d = device(kind);
    let d = d.lifecycle();
    d.pause().unwrap();
    let snap = d.snapshot().unwrap();
    encode_stream(&d.id(), &snap).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(addr).u32(len).u16(flags).u16(next);
    w.0
}

fn outhdr(t: u32, sector: u64) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(t).u32(0).u64(sector);
    w.0
}

fn dwz(sector: u64, num: u32, flags: u32) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(sector).u32(num).u32(flags);
    w.0
}

/// A driver-side image of a split virtqueue: descriptors, available ring
/// and the buffers, laid out from `base` (an address in the image's
/// space: guest RAM IOVA for the server, guest physical for the queue
/// target).
struct Ring {
    base: u64,
    size: u16,
    descs: Vec<Vec<u8>>,
    heads: Vec<u16>,
    /// (address, bytes) of every buffer.
    buffers: Vec<(u64, Vec<u8>)>,
    next_buf: u64,
    /// Status byte addresses, one per request.
    statuses: Vec<u64>,
}

impl Ring {
    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x100;
    const USED: u64 = 0x180;
    const BUFS: u64 = 0x300;

    fn new(base: u64, size: u16) -> Ring {
        Ring {
            base,
            size,
            descs: Vec::new(),
            heads: Vec::new(),
            buffers: Vec::new(),
            next_buf: base + Self::BUFS,
            statuses: Vec::new(),
        }
    }

    fn desc_addr(&self) -> u64 {
        self.base + Self::DESC
    }
    fn avail_addr(&self) -> u64 {
        self.base + Self::AVAIL
    }
    fn used_addr(&self) -> u64 {
        self.base + Self::USED
    }

    fn buf(&mut self, bytes: Vec<u8>) -> u64 {
        let a = self.next_buf;
        self.next_buf += (bytes.len() as u64).next_multiple_of(16);
        self.buffers.push((a, bytes));
        a
    }

    /// Adds a request: readable buffers, then writable ones of the given
    /// sizes; a status byte is appended.
    fn request(&mut self, readable: Vec<Vec<u8>>, writable: Vec<u32>) {
        let mut parts: Vec<(u64, u32, u16)> = Vec::new();
        for r in readable {
            let len = r.len() as u32;
            parts.push((self.buf(r), len, 0));
        }
        for w in writable {
            parts.push((self.buf(vec![0xee; w as usize]), w, D_WRITE));
        }
        let status = self.buf(vec![0xff]);
        self.statuses.push(status);
        parts.push((status, 1, D_WRITE));
        let first = self.descs.len() as u16;
        self.heads.push(first);
        let n = parts.len();
        for (i, (a, l, f)) in parts.into_iter().enumerate() {
            let idx = self.descs.len() as u16;
            let (flags, next) = if i + 1 < n {
                (f | D_NEXT, idx + 1)
            } else {
                (f, 0)
            };
            self.descs.push(desc(a, l, flags, next));
        }
    }

    /// Adds a request whose descriptors live in an indirect table.
    fn indirect_request(&mut self, readable: Vec<u8>, writable: u32) {
        let hdr_len = readable.len() as u32;
        let hdr = self.buf(readable);
        let data = self.buf(vec![0xee; writable as usize]);
        let status = self.buf(vec![0xff]);
        self.statuses.push(status);
        let mut table = desc(hdr, hdr_len, D_NEXT, 1);
        table.extend(desc(data, writable, D_WRITE | D_NEXT, 2));
        table.extend(desc(status, 1, D_WRITE, 0));
        let len = table.len() as u32;
        let t = self.buf(table);
        self.heads.push(self.descs.len() as u16);
        self.descs.push(desc(t, len, D_INDIRECT, 0));
    }

    fn avail_bytes(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u16(0).u16(self.heads.len() as u16);
        for i in 0..self.size {
            w.u16(self.heads.get(i as usize).copied().unwrap_or(0));
        }
        w.u16(0);
        w.0
    }

    /// `(address, bytes)` pieces to write.
    fn pieces(&self) -> Vec<(u64, Vec<u8>)> {
        let mut v = vec![
            (self.desc_addr(), self.descs.concat()),
            (self.avail_addr(), self.avail_bytes()),
        ];
        v.extend(self.buffers.iter().cloned());
        v
    }

    /// The whole image from `base` (for the queue target).
    fn image(&self) -> Vec<u8> {
        let mut img = vec![0u8; (self.next_buf - self.base) as usize];
        for (a, b) in self.pieces() {
            let o = (a - self.base) as usize;
            img[o..o + b.len()].copy_from_slice(&b);
        }
        img
    }
}

/// The requests every virtio-blk seed sends.
fn blk_requests(ring: &mut Ring, discard: bool) {
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    let mut out = outhdr(T_OUT, 1);
    out.extend(&pattern);
    ring.request(vec![out], vec![]);
    ring.request(vec![outhdr(T_IN, 1)], vec![512]);
    ring.request(vec![outhdr(T_GET_ID, 0)], vec![20]);
    ring.request(vec![outhdr(T_FLUSH, 0)], vec![]);
    if discard {
        let mut d = outhdr(T_DISCARD, 0);
        d.extend(dwz(8, 8, 0));
        ring.request(vec![d], vec![]);
        let mut z = outhdr(T_WRITE_ZEROES, 0);
        z.extend(dwz(16, 8, 1));
        ring.request(vec![z], vec![]);
    }
    ring.indirect_request(outhdr(T_IN, 0), 512);
}

/// IOVA of a read-only map of the guest RAM memfd (like a ROM).
const RO_IOVA: u64 = 0x20_0000;

/// A read request whose data buffer is in the read-only map: the device's
/// write must neither fault (fix 4 of docs/security.md) nor reach the
/// client's memory.
fn read_into_rom(ring: &mut Ring) {
    let hdr = outhdr(T_IN, 0);
    let hlen = hdr.len() as u32;
    let h = ring.buf(hdr);
    let status = ring.buf(vec![0xff]);
    ring.statuses.push(status);
    ring.heads.push(ring.descs.len() as u16);
    let i = ring.descs.len() as u16;
    ring.descs.push(desc(h, hlen, D_NEXT, i + 1));
    ring.descs
        .push(desc(RO_IOVA + 0x4000, 512, D_WRITE | D_NEXT, i + 2));
    ring.descs.push(desc(status, 1, D_WRITE, 0));
}

/// A virtio-blk driver: handshake, MSI-X, feature negotiation, queue 0 set
/// up in guest RAM, requests made available and notified.
fn blk_driver(event_idx: bool, use_msix: bool, requests: fn(&mut Ring)) -> (Seed, Ring) {
    let kind = DEV_BLK | DEV_PCIE;
    let mut s = Seed::new(kind);
    s.qemu_start();
    // The same RAM mapped read-only elsewhere, as QEMU maps ROM.
    s.with(|c| c.dma_map(DMA_MAP_FLAG_READ, 0, RO_IOVA, 0x8000));
    s.with(|c| c.get_info(16));
    for i in 0..PCI_NUM_REGIONS {
        s.with(|c| c.region_info(i, 32));
    }
    for i in 0..PCI_NUM_IRQS {
        s.with(|c| c.irq_info(i));
    }
    // Memory space + bus master.
    s.cfg_write(4, &[0x06, 0x00]);
    let mut dev = device(kind);
    if use_msix {
        let msix = find_cap(dev.as_mut(), 0x11, 0).expect("MSI-X cap");
        s.with(|c| {
            c.set_irqs(
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                PCI_MSIX_IRQ_INDEX,
                0,
                3,
                &[],
            )
        });
        s.cfg_write(msix + 3, &[0x80]);
    } else {
        s.with(|c| {
            c.set_irqs(
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                PCI_INTX_IRQ_INDEX,
                0,
                1,
                &[],
            )
        });
    }
    s.bar0(CC_STATUS, &[0]);
    s.bar0(CC_STATUS, &[S_ACK]);
    s.bar0(CC_STATUS, &[S_ACK | S_DRIVER]);
    s.bar0(CC_DFSELECT, &1u32.to_le_bytes());
    s.with(|c| c.read(0, 0x04, 4));
    let mut lo = BLK_F_FLUSH
        | BLK_F_MQ
        | BLK_F_DISCARD
        | BLK_F_WRITE_ZEROES
        | F_INDIRECT
        | BLK_F_SEG_MAX
        | BLK_F_BLK_SIZE;
    if event_idx {
        lo |= F_EVENT_IDX;
    }
    s.bar0(CC_GFSELECT, &0u32.to_le_bytes());
    s.bar0(CC_GF, &lo.to_le_bytes());
    s.bar0(CC_GFSELECT, &1u32.to_le_bytes());
    s.bar0(CC_GF, &F_VERSION_1_HI.to_le_bytes());
    s.bar0(CC_STATUS, &[S_ACK | S_DRIVER | S_FEATURES_OK]);
    s.with(|c| c.read(0, CC_STATUS, 1));
    s.with(|c| c.read(0, DEVICE_CFG, 0x3c));
    s.bar0(CC_MSIX, &0u16.to_le_bytes());
    let mut ring = Ring::new(G, 16);
    s.bar0(CC_Q_SELECT, &0u16.to_le_bytes());
    s.bar0(CC_Q_SIZE, &ring.size.to_le_bytes());
    s.bar0(CC_Q_MSIX, &1u16.to_le_bytes());
    s.bar0(CC_Q_DESC, &ring.desc_addr().to_le_bytes());
    s.bar0(CC_Q_AVAIL, &ring.avail_addr().to_le_bytes());
    s.bar0(CC_Q_USED, &ring.used_addr().to_le_bytes());
    s.bar0(CC_Q_ENABLE, &1u16.to_le_bytes());
    requests(&mut ring);
    for (a, b) in ring.pieces() {
        s.guest(a, &b);
    }
    s.bar0(CC_STATUS, &[S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK]);
    s.bar0(NOTIFY, &0u16.to_le_bytes());
    s.with(|c| c.read(0, ISR, 1));
    (s, ring)
}

/// Checks that every request of `ring` completed with status OK.
fn check_statuses(name: &str, ram: &[u8], ring: &Ring) {
    for a in &ring.statuses {
        let st = ram[(a - G) as usize];
        assert_eq!(st, 0, "{name}: request status at {a:#x} is {st}");
    }
    // Used index: every chain completed.
    let used = (ring.used_addr() - G) as usize;
    let idx = u16::from_le_bytes([ram[used + 2], ram[used + 3]]);
    assert_eq!(idx as usize, ring.heads.len(), "{name}: used idx");
}

fn server_seeds() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut add = |name: &str, s: &Seed| {
        out.insert(name.to_string(), s.input.bytes().to_vec());
    };

    // Handshakes as QEMU and Cloud Hypervisor do them, on both devices.
    // PCIe functions, except for migration (conventional PCI keeps the
    // saved config space, hence the seed, 16 times smaller).
    for (dev, dname) in [(DEV_TEST | DEV_PCIE, "test"), (DEV_BLK | DEV_PCIE, "blk")] {
        let conventional = dev & !DEV_PCIE;
        let mut s = Seed::new(dev);
        s.with(|c| c.version(0, QEMU_JSON)).with(|c| c.get_info(16));
        for i in 0..PCI_NUM_REGIONS {
            s.with(|c| c.region_info(i, 32));
            s.with(|c| c.region_info(i, 96));
        }
        for i in 0..PCI_NUM_IRQS {
            s.with(|c| c.irq_info(i));
        }
        s.with(|c| c.read(PCI_CONFIG_REGION_INDEX, 0, 256));
        s.with(|c| c.reset());
        add(&format!("{dname}_qemu_handshake"), &s);

        let mut s = Seed::new(dev);
        s.with(|c| c.version(1, CH_JSON));
        s.with(|c| c.dma_map(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, 0, G, 0x8000));
        // CH counts the header in argsz.
        s.with(|c| c.get_info(32));
        for i in 0..PCI_NUM_REGIONS {
            s.with(|c| c.region_info(i, 32));
            s.with(|c| c.region_info(i, 80));
        }
        for i in 0..3 {
            s.with(|c| c.irq_info(i));
        }
        s.with(|c| c.read(PCI_CONFIG_REGION_INDEX, 0, 64));
        // BAR sizing, as CH's VfioCommon does it.
        s.cfg_write(0x10, &u32::MAX.to_le_bytes());
        s.with(|c| c.read(PCI_CONFIG_REGION_INDEX, 0x10, 4));
        s.cfg_write(0x10, &0u32.to_le_bytes());
        // MSI-X enable in 16-fd chunks, INTx unmask after BAR accesses.
        s.with(|c| {
            c.set_irqs(
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                PCI_MSIX_IRQ_INDEX,
                0,
                2,
                &[],
            )
        });
        s.with(|c| {
            c.set_irqs(
                IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK,
                PCI_INTX_IRQ_INDEX,
                0,
                1,
                &[],
            )
        });
        s.with(|c| c.dma_unmap(0, G, 0x8000));
        add(&format!("{dname}_ch_handshake"), &s);

        // One seed per command after VERSION.
        let per_cmd: Vec<(&str, MsgFn)> = vec![
            (
                "dma_map",
                Box::new(|c| c.dma_map(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, 0x1000, G, 0x4000)),
            ),
            (
                "dma_map_nofd",
                Box::new(|c| {
                    let mut m = c.dma_map(DMA_MAP_FLAG_READ, 0, 0x4000_0000, 1 << 30);
                    m.fd_mode = FD_NONE;
                    m
                }),
            ),
            (
                "dma_unmap_all",
                Box::new(|c| c.dma_unmap(DMA_UNMAP_FLAG_ALL, 0, 0)),
            ),
            ("get_info", Box::new(|c| c.get_info(16))),
            ("region_info", Box::new(|c| c.region_info(1, 96))),
            ("region_io_fds", Box::new(|c| c.io_fds(0))),
            ("irq_info", Box::new(|c| c.irq_info(2))),
            (
                "set_irqs_bool",
                Box::new(|c| {
                    c.set_irqs(
                        IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_MASK,
                        PCI_MSIX_IRQ_INDEX,
                        0,
                        2,
                        &[1, 0],
                    )
                }),
            ),
            (
                "set_irqs_disable",
                Box::new(|c| {
                    c.set_irqs(
                        IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
                        PCI_MSI_IRQ_INDEX,
                        0,
                        0,
                        &[],
                    )
                }),
            ),
            (
                "region_read",
                Box::new(|c| c.read(PCI_CONFIG_REGION_INDEX, 0x40, 16)),
            ),
            (
                "region_write",
                Box::new(|c| {
                    c.write(PCI_CONFIG_REGION_INDEX, 0x04, &[0x06, 0x04])
                        .no_reply()
                }),
            ),
            (
                "write_multi",
                Box::new(|c| {
                    c.write_multi(&[
                        (0, 0x200, &[1, 2, 3, 4]),
                        (PCI_CONFIG_REGION_INDEX, 0x0c, &[0x10]),
                        (0, 0x208, &[9; 8]),
                    ])
                }),
            ),
            ("reset", Box::new(|c| c.reset())),
            (
                "feature_probe",
                Box::new(|c| {
                    c.feature(
                        8,
                        DEVICE_FEATURE_MIG_DEVICE_STATE
                            | DEVICE_FEATURE_GET
                            | DEVICE_FEATURE_SET
                            | DEVICE_FEATURE_PROBE,
                        &[],
                    )
                }),
            ),
            (
                "feature_migration",
                Box::new(|c| c.feature(16, DEVICE_FEATURE_MIGRATION | DEVICE_FEATURE_GET, &[])),
            ),
            ("mig_data_read", Box::new(|c| c.mig_read(64))),
            ("mig_data_write", Box::new(|c| c.mig_write(b"VFUSNAP\0"))),
            (
                "dirty_pages_legacy",
                Box::new(|c| c.cmd(cmd::DIRTY_PAGES, vec![8, 0, 0, 0, 1, 0, 0, 0])),
            ),
            (
                "dma_read_to_server",
                Box::new(|c| c.cmd(cmd::DMA_READ, vec![0; 16])),
            ),
        ];
        for (name, f) in per_cmd {
            let mut s = Seed::new(dev);
            s.with(|c| c.version(0, QEMU_JSON));
            if name != "dma_map" {
                s.with(|c| c.dma_map(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, 0, G, 0x8000));
            }
            let m = f(&mut s.c);
            s.send(m);
            add(&format!("{dname}_cmd_{name}"), &s);
        }

        // Migration source: state machine, dirty logging, stream read.
        let mut s = Seed::new(conventional);
        s.qemu_start();
        s.with(|c| {
            c.feature(
                16,
                DEVICE_FEATURE_MIG_DEVICE_STATE | DEVICE_FEATURE_GET,
                &[],
            )
        });
        let mut start = Writer::default();
        start.u64(4096).u32(1).u32(0).u64(G).u64(0x8000);
        s.with(|c| {
            c.feature(
                8 + start.0.len() as u32,
                DEVICE_FEATURE_DMA_LOGGING_START | DEVICE_FEATURE_SET,
                &start.0,
            )
        });
        s.with(|c| c.set_state(6)); // PRE_COPY
        s.with(|c| c.mig_read(4096));
        s.with(|c| c.set_state(3)); // STOP_COPY
        for _ in 0..4 {
            s.with(|c| c.mig_read(0x4000));
        }
        let mut rep = Writer::default();
        rep.u64(G).u64(0x8000).u64(4096);
        s.with(|c| {
            c.feature(
                8 + 24 + 8,
                DEVICE_FEATURE_DMA_LOGGING_REPORT | DEVICE_FEATURE_GET,
                &rep.0,
            )
        });
        s.with(|c| c.feature(8, DEVICE_FEATURE_DMA_LOGGING_STOP | DEVICE_FEATURE_SET, &[]));
        s.with(|c| c.set_state(1)); // STOP
        s.with(|c| c.set_state(2)); // RUNNING
        s.with(|c| c.set_state(0)); // ERROR: refused
        add(&format!("{dname}_migration_source"), &s);

        // Migration destination: a real stream written in chunks.
        let stream = stream_of(conventional);
        let mut s = Seed::new(conventional);
        s.qemu_start();
        s.with(|c| c.set_state(4)); // RESUMING via STOP
        for chunk in stream.chunks(0x4000) {
            s.with(|c| c.mig_write(chunk));
        }
        s.with(|c| c.set_state(2)); // RESUMING -> STOP -> RUNNING: restore
        s.with(|c| {
            c.feature(
                16,
                DEVICE_FEATURE_MIG_DEVICE_STATE | DEVICE_FEATURE_GET,
                &[],
            )
        });
        add(&format!("{dname}_migration_destination"), &s);

        // Framing and protocol errors.
        let mut s = Seed::new(dev);
        s.with(|c| c.get_info(16)); // before VERSION
        s.with(|c| c.version(0, "{"));
        s.with(|c| c.version(0, QEMU_JSON));
        s.with(|c| c.version(0, QEMU_JSON)); // twice
        let mut m = s.c.get_info(16);
        m.flags = flags::TYPE_REPLY;
        s.send(m);
        let mut m = s.c.read(0, 0, 4);
        m.fd_mode = server_stream::FD_EVENTFDS + 2; // fds on a command taking none
        s.send(m);
        let mut m = s.c.set_irqs(
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            PCI_MSIX_IRQ_INDEX,
            0,
            4,
            &[],
        );
        m.fd_mode = server_stream::FD_EVENTFDS + 70; // more than the server takes
        s.send(m);
        s.with(|c| c.cmd(0x7fff, vec![1, 2, 3]));
        let mut m = s.c.get_info(16);
        m.size = Size::Delta(8); // the body runs into what follows
        s.send(m);
        s.input.raw(FD_NONE, &[0xaa; 64]);
        s.input.reconnect();
        s.with(|c| c.version(0, ""));
        let mut m = s.c.get_info(16);
        m.size = Size::Raw(8); // shorter than a header
        s.send(m);
        s.input.reconnect();
        s.with(|c| c.version(0, ""));
        let mut m = s.c.get_info(16);
        m.size = Size::Raw(0x20_0000); // above max_msg_size: skipped
        s.send(m);
        s.input.hangup();
        s.with(|c| c.version(0, CH_JSON));
        add(&format!("{dname}_errors"), &s);
    }

    // The test device: DMA through the doorbell, every operation.
    let mut s = Seed::new(DEV_TEST);
    s.qemu_start();
    let mut dev = device(DEV_TEST);
    let msix = find_cap(dev.as_mut(), 0x11, 0).expect("MSI-X cap");
    s.with(|c| {
        c.set_irqs(
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            PCI_MSIX_IRQ_INDEX,
            0,
            4,
            &[],
        )
    });
    s.cfg_write(msix + 3, &[0x80]);
    s.guest(G + 0x100, &[0x5a; 64]);
    s.bar0(td::SCRATCH, &[0x11; 32]);
    s.bar0(td::REG_DMA_ADDR, &(G + 0x200).to_le_bytes());
    s.bar0(td::REG_DMA_LEN, &64u32.to_le_bytes());
    s.bar0(td::REG_IRQ, &[PCI_MSIX_IRQ_INDEX as u8, 1, 0, 0]);
    for op in [td::OP_WRITE, td::OP_READ, td::OP_INCREMENT, td::OP_OBJ] {
        s.bar0(td::REG_DOORBELL, &[op, 0, 0, 0]);
        s.with(|c| c.read(0, td::REG_STATUS, 4));
    }
    // A DMA that leaves the map, and one with INTx.
    s.bar0(td::REG_DMA_ADDR, &(G + 0x7ff0).to_le_bytes());
    s.bar0(td::REG_DOORBELL, &[td::OP_WRITE, 0, 0, 0]);
    s.bar0(td::REG_IRQ, &[PCI_INTX_IRQ_INDEX as u8, 0, 0, 0]);
    s.bar0(td::REG_DOORBELL, &[td::OP_READ, 0, 0, 0]);
    // INTx as QEMU sets it up under KVM: trigger and unmask (resample)
    // eventfds; the harness passes the same eventfd for both, so each
    // interrupt is also an EOI.
    for action in [IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK] {
        s.with(|c| c.set_irqs(IRQ_SET_DATA_EVENTFD | action, PCI_INTX_IRQ_INDEX, 0, 1, &[]));
    }
    s.bar0(td::REG_DOORBELL, &[td::OP_READ, 0, 0, 0]);
    s.bar0(td::REG_DOORBELL, &[td::OP_READ, 0, 0, 0]);
    // MSI-X table and PBA, the memfd BAR, the big BAR, the I/O BAR.
    s.bar0(td::MSIX_TABLE + 0x1c, &0u32.to_le_bytes());
    s.with(|c| c.read(0, td::MSIX_PBA, 8));
    s.with(|c| c.write(1, 0x1000, b"trapped"));
    s.with(|c| c.read(1, 0x2000, 16));
    s.with(|c| c.read(2, td::BAR2_SIZE - 8, 8));
    s.with(|c| c.write(4, 0x10, &[1, 2]));
    s.with(|c| c.region_info(1, 96));
    s.with(|c| c.dma_unmap(0, G, 0x8000));
    s.bar0(td::REG_DOORBELL, &[td::OP_WRITE, 0, 0, 0]);
    s.input.reconnect();
    add("test_dma_doorbell", &s);

    // A client that truncates its guest RAM under the device: the DMA hits
    // the hole, the server drops the client (SIGBUS guard); the next
    // client, with the RAM back, is served.
    let mut s = Seed::new(DEV_TEST);
    s.qemu_start();
    s.bar0(td::REG_DMA_ADDR, &(G + 0x200).to_le_bytes());
    s.bar0(td::REG_DMA_LEN, &64u32.to_le_bytes());
    s.input.truncate_guest(0);
    s.bar0(td::REG_DOORBELL, &[td::OP_WRITE, 0, 0, 0]);
    s.input.truncate_guest(0);
    s.qemu_start();
    s.bar0(td::REG_DMA_ADDR, &(G + 0x200).to_le_bytes());
    s.bar0(td::REG_DOORBELL, &[td::OP_WRITE, 0, 0, 0]);
    add("test_truncated_guest_ram", &s);

    // Message DMA: fd-less maps reached through server DMA_READ/DMA_WRITE
    // requests, in QEMU's layout (minor 0) and the spec's (minor 1).
    for (minor, json, name) in [(0, QEMU_JSON, "qemu"), (1, CH_JSON, "spec")] {
        let mut s = Seed::new(DEV_TEST);
        s.with(|c| c.version(minor, json));
        let mut m = s.c.dma_map(
            DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            0,
            0x4000_0000,
            0x1_0000,
        );
        m.fd_mode = FD_NONE;
        s.send(m);
        s.bar0(td::REG_DMA_ADDR, &0x4000_0100u64.to_le_bytes());
        s.bar0(td::REG_DMA_LEN, &64u32.to_le_bytes());
        s.bar0(td::REG_IRQ, &[PCI_MSIX_IRQ_INDEX as u8, 0, 0, 0]);
        s.bar0(td::REG_DOORBELL, &[td::OP_MSG_READ, 0, 0, 0]);
        s.bar0(td::REG_DOORBELL, &[td::OP_MSG_WRITE, 0, 0, 0]);
        s.input.answer();
        s.bar0(td::REG_DOORBELL, &[td::OP_MSG_READ, 0, 0, 0]);
        s.input.answer_error(5);
        s.bar0(td::REG_DOORBELL, &[td::OP_MSG_WRITE, 0, 0, 0]);
        s.with(|c| c.read(0, td::REG_STATUS, 4));
        s.input.reconnect();
        add(&format!("test_message_dma_{name}"), &s);
    }

    // A blocking eventfd with a full counter as an MSI-X vector, then
    // triggered: the server must not block on it.
    let mut s = Seed::new(DEV_TEST);
    s.with(|c| c.version(0, QEMU_JSON));
    let mut m = s.c.set_irqs(
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        PCI_MSIX_IRQ_INDEX,
        0,
        1,
        &[],
    );
    m.fd_mode = server_stream::FD_BLOCKING_FULL;
    s.send(m);
    s.with(|c| {
        c.set_irqs(
            IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
            PCI_MSIX_IRQ_INDEX,
            0,
            1,
            &[],
        )
    });
    s.with(|c| c.get_info(16));
    add("test_blocking_eventfd", &s);

    // The virtio-blk driver, with and without EVENT_IDX / MSI-X.
    let all: fn(&mut Ring) = |r| blk_requests(r, true);
    for (event_idx, msix, requests, name) in [
        (false, true, all, "blk_driver_msix"),
        (true, true, all, "blk_driver_event_idx"),
        (false, false, all, "blk_driver_intx"),
        (
            false,
            true,
            read_into_rom as fn(&mut Ring),
            "blk_read_into_read_only_map",
        ),
    ] {
        let (mut s, ring) = blk_driver(event_idx, msix, requests);
        let ram_check = s.input.bytes().to_vec();
        let (_, ram, _) = server_stream::run_collect(&ram_check);
        check_statuses(name, &ram, &ring);
        if name == "blk_read_into_read_only_map" {
            assert!(ram[0x4000..0x4200].iter().all(|b| *b == 0), "ROM written");
        }
        s.with(|c| c.set_state(3));
        s.with(|c| c.mig_read(0x10000));
        s.with(|c| c.set_state(2));
        s.with(|c| c.reset());
        add(name, &s);
    }

    // virtio-pci config access capability: BAR writes through config space.
    let mut s = Seed::new(DEV_BLK | DEV_PCIE);
    s.qemu_start();
    let mut dev = device(DEV_BLK | DEV_PCIE);
    let mut cfg = None;
    for n in 0..8 {
        let Some(p) = find_cap(dev.as_mut(), 0x09, n) else {
            break;
        };
        let mut t = [0u8; 1];
        dev.region_read(PCI_CONFIG_REGION_INDEX, p + 3, &mut t)
            .unwrap();
        if t[0] == 5 {
            cfg = Some(p);
        }
    }
    let cfg = cfg.expect("VIRTIO_PCI_CAP_PCI_CFG");
    s.cfg_write(cfg + 4, &[0]);
    s.cfg_write(cfg + 8, &(CC_STATUS as u32).to_le_bytes());
    s.cfg_write(cfg + 12, &1u32.to_le_bytes());
    s.cfg_write(cfg + 16, &[S_ACK as u32 as u8, 0, 0, 0]);
    s.with(|c| c.read(PCI_CONFIG_REGION_INDEX, cfg + 16, 4));
    add("blk_pci_cfg_access", &s);

    out
}

fn queue_seeds() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (name, flags, features) in [
        ("queue_requests", 0u8, 0u64),
        (
            "queue_requests_event_idx_discard",
            2,
            (1 << 29) | (1 << 13) | (1 << 14) | (1 << 9),
        ),
        ("queue_requests_read_only", 1, (1 << 13) | (1 << 14)),
    ] {
        let mut ring = Ring::new(0, 16);
        blk_requests(&mut ring, features != 0);
        let setup = Setup {
            flags,
            features,
            size: ring.size,
            desc: ring.desc_addr() as u32,
            avail: ring.avail_addr() as u32,
            used: ring.used_addr() as u32,
            rounds: 1,
            config_offset: 0,
            config_len: 0x3c,
            ..Default::default()
        };
        out.insert(name.to_string(), setup.encode(&ring.image()));
    }
    // A data buffer running into the hole between the two regions, and a
    // chain that loops back on itself.
    let mut ring = Ring::new(0, 4);
    ring.request(vec![outhdr(T_IN, 0)], vec![512]);
    let mut img = ring.image();
    // Point the data descriptor (index 1) at the end of the first region.
    img[16..24].copy_from_slice(&(0x8000u64 - 0x100).to_le_bytes());
    let mut looped = img.clone();
    // Descriptor 2 (status) chains back to 0.
    looped[32 + 12..32 + 14].copy_from_slice(&(D_WRITE | D_NEXT).to_le_bytes());
    let setup = Setup {
        size: 4,
        desc: ring.desc_addr() as u32,
        avail: ring.avail_addr() as u32,
        used: ring.used_addr() as u32,
        ..Default::default()
    };
    out.insert("queue_hole".into(), setup.encode(&img));
    out.insert("queue_loop".into(), setup.encode(&looped));
    out
}

/// virtio-net driver sessions: what Linux does, then what it never does.
fn net_seeds() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let base = feature::MRG_RXBUF | feature::CTRL_VQ | feature::INDIRECT_DESC;
    let hdr = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    // Receive and transmit, one pair, without and with mergeable buffers
    // and EVENT_IDX.
    for (name, features) in [
        ("net_rx_tx", feature::CTRL_VQ),
        ("net_rx_tx_mergeable_event_idx", base | feature::EVENT_IDX),
    ] {
        let mut w = InputWriter::new(0, features, 0x55);
        for _ in 0..4 {
            w.rx(0, &ChainSpec::fresh(&[1526]));
        }
        w.inject(0, 60, 1, hdr)
            .inject(0, 1514 + 12, 2, hdr)
            .inject(0, 1000, 3, hdr);
        w.tx(0, 1, &ChainSpec::fresh(&[12, 54]))
            .tx(0, 2, &ChainSpec::fresh(&[12, 700, 1, 813]))
            .tx(0, 3, &ChainSpec::indirect(&[12, 100, 100]))
            .op(op::DRAIN, 0);
        out.insert(name.to_string(), w.0 .0);
    }
    // A 9000-byte frame over six 1526-byte chains, and one too big for
    // its buffers without mergeable buffers.
    let mut w = InputWriter::new(2, base, 0x55);
    for _ in 0..8 {
        w.rx(0, &ChainSpec::fresh(&[1526]));
    }
    w.inject(0, 9000, 4, hdr).inject(0, 100, 5, hdr);
    out.insert("net_mergeable_9000".into(), w.0 .0);
    let mut w = InputWriter::new(0, feature::CTRL_VQ, 0x55);
    w.rx(0, &ChainSpec::fresh(&[100]))
        .inject(0, 200, 6, hdr)
        .inject(0, 80, 7, hdr)
        .inject(0, 5, 8, hdr);
    out.insert("net_rx_too_small".into(), w.0 .0);
    // Transmit refused (WouldBlock), then the peer reads and it goes.
    let mut w = InputWriter::new(0, feature::EVENT_IDX, 0x55);
    w.op(op::FILL, 0);
    for i in 0..4 {
        w.tx(0, i, &ChainSpec::fresh(&[12, 1500]));
    }
    w.op(op::KICK, 1).op(op::DRAIN, 0).op(op::FILL, 0);
    w.tx(0, 9, &ChainSpec::fresh(&[12, 60000])).op(op::DRAIN, 0);
    out.insert("net_tx_would_block".into(), w.0 .0);
    // Every control class, two pairs, offloads.
    let all = base
        | feature::MQ
        | feature::CTRL_GUEST_OFFLOADS
        | feature::GUEST_CSUM
        | feature::GUEST_TSO4
        | feature::CSUM;
    let mut w = InputWriter::new(1 | 2, all, 0x55);
    for cmd in 0..6 {
        w.ctrl(ctrl::RX, cmd, 0, &[1]);
    }
    w.ctrl(ctrl::MAC, ctrl::MAC_TABLE_SET, 1, &[0; 8])
        .ctrl(ctrl::MAC, ctrl::MAC_ADDR_SET, 0, &[2, 0, 0, 0, 0, 1])
        .ctrl(ctrl::MAC, ctrl::MAC_ADDR_SET, 0, &[3, 0, 0, 0, 0, 1])
        .ctrl(ctrl::VLAN, 0, 2, &[5, 0])
        .ctrl(ctrl::VLAN, 1, 0, &[5, 0])
        .ctrl(ctrl::ANNOUNCE, 0, 0, &[])
        .ctrl(ctrl::MQ, 0, 1, &2u16.to_le_bytes())
        .ctrl(ctrl::MQ, 0, 0, &3u16.to_le_bytes())
        .ctrl(
            ctrl::GUEST_OFFLOADS,
            0,
            0,
            &feature::GUEST_CSUM.to_le_bytes(),
        )
        .ctrl(ctrl::GUEST_OFFLOADS, 0, 0x20, &(1u64 << 10).to_le_bytes())
        .ctrl(9, 9, 0x10, &[])
        .ctrl(ctrl::MQ, 0, 4, &[1])
        .config(0, 8)
        .config(8, 4);
    w.rx(1, &ChainSpec::fresh(&[2000]))
        .inject(1, 1500, 9, hdr)
        .tx(1, 4, &ChainSpec::fresh(&[1000]))
        .op(op::DRAIN, 1)
        .ctrl(ctrl::MQ, 0, 0, &1u16.to_le_bytes())
        .reset();
    out.insert("net_control_every_class".into(), w.0 .0);
    // Chains a driver should not make: readable buffers on receive,
    // writable on transmit, outside memory, across a region boundary,
    // broken indirect tables, long tables.
    let mut w = InputWriter::new(0, base, 0x33);
    let wrong = DescSpec {
        kind: 1 | 5 << 4,
        len: 100,
    };
    let oom = DescSpec {
        kind: 5 << 1 | 5 << 4,
        len: 64,
    };
    let across = DescSpec {
        kind: 3 << 1 | 5 << 4,
        len: 3000,
    };
    let scratch = DescSpec {
        kind: 4 << 1 | 5 << 4,
        len: 512,
    };
    for spec in [
        ChainSpec {
            descs: vec![DescSpec::fresh(1000), wrong],
            table: None,
        },
        ChainSpec {
            descs: vec![oom],
            table: None,
        },
        ChainSpec {
            descs: vec![across, scratch],
            table: None,
        },
        ChainSpec {
            descs: vec![DescSpec::fresh(12)],
            table: Some((1, 2, vec![DescSpec::fresh(100)])),
        },
        ChainSpec {
            descs: vec![DescSpec::default()],
            table: Some((2, 4, vec![DescSpec::fresh(100)])),
        },
        ChainSpec {
            descs: vec![DescSpec::default()],
            table: Some((0, 1100, vec![DescSpec::fresh(1), across])),
        },
        // Fewer descriptors than a `readv` takes, more segments.
        ChainSpec {
            descs: vec![DescSpec::default()],
            table: Some((0, 600, vec![across])),
        },
    ] {
        w.rx(0, &spec).inject(0, 1200, 10, hdr);
        w.tx(0, 5, &spec);
    }
    w.op(op::DRAIN, 0).op(op::LINK, 0).config(6, 2);
    out.insert("net_bad_chains".into(), w.0 .0);
    out
}

fn pci_seeds() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    // virtio-like: PCIe, one 64-bit BAR, PCIe/PM/MSI-X/vendor caps.
    let mut w = Writer::default();
    w.u8(1 | 2);
    w.u8(1).u8(0).u8(15).u8(1).u8(0);
    w.u8(4);
    w.u8(2);
    w.u8(3);
    w.u8(0).u16(3).u8(0).u32(0x4000).u8(0).u32(0x6000);
    w.u8(4)
        .blob(&[3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .blob(&[0; 14]);
    w.u16(0).u8(0);
    ops(&mut w);
    out.insert("pci_virtio_like".into(), w.0);

    // Conventional: 32-bit, I/O and 64-bit prefetchable BARs, MSI, MSI-X.
    let mut w = Writer::default();
    w.u8(2);
    w.u8(3);
    w.u8(0).u8(12).u8(0).u8(0);
    w.u8(1).u8(8).u8(2).u8(0);
    w.u8(2).u8(20).u8(1).u8(1);
    w.u8(3);
    w.u8(1).u8(4).u8(1);
    w.u8(0).u16(8).u8(0).u32(0x800).u8(0).u32(0x900);
    w.u8(3);
    w.u16(0).u8(0);
    ops(&mut w);
    out.insert("pci_conventional".into(), w.0);

    // BARs the adapter refuses (overlapping), kept bare.
    let mut w = Writer::default();
    w.u8(0);
    w.u8(2);
    w.u8(0).u8(12).u8(1).u8(0);
    w.u8(1).u8(12).u8(0).u8(0).u8(1);
    w.u8(0);
    w.u16(4).u8(0);
    ops(&mut w);
    out.insert("pci_bad_bars".into(), w.0);
    out
}

/// Config accesses as drivers and clients make them.
fn ops(w: &mut Writer) {
    use pci_config::*;
    // BAR sizing of every BAR and the ROM.
    for reg in (4..10).chain([12]) {
        write_op(w, reg, 0, &u32::MAX.to_le_bytes());
        w.u8(OP_READ).u8(0).u8(reg);
        write_op(w, reg, 0, &0u32.to_le_bytes());
    }
    write_op(w, 1, 0, &[0x07, 0x04]);
    write_op(w, 1, 2, &[0xff, 0xff]);
    write_op(w, 15, 0, &[0x0b]);
    // Capability list walk and bodies.
    for reg in 13..40 {
        w.u8(OP_READ).u8(0).u8(reg);
    }
    // Control words of the first capabilities (MSI-X enable bit).
    write_op(w, 16, 2, &[0x00, 0xc0]);
    write_op(w, 19, 2, &[0x01, 0x80]);
    w.u8(OP_QUERY);
    w.u8(OP_STATE).u8(0).u16(0x40).u8(0x11);
    w.u8(OP_ADAPTER_READ).u8(0).u16(0).u16(256);
    w.u8(OP_ADAPTER_WRITE)
        .u8(0)
        .u16(0x3a)
        .u16(6)
        .bytes(&[0xaa; 6]);
    w.u8(OP_ADAPTER_WRITE)
        .u8(MODE_RAW_OFFSET)
        .u64(0xffc)
        .u16(4)
        .bytes(&[1; 4]);
    w.u8(OP_MSIX)
        .u8(1)
        .u64(16)
        .u8(4)
        .u16(1)
        .bytes(&[0, 0, 0xe0, 0xfe]);
    w.u8(OP_MSIX).u8(5).u64(0).u8(0).u16(2);
    w.u8(OP_MSIX).u8(2).u64(0).u8(8).u16(0);
    w.u8(OP_MSIX).u8(7).u64(0).u8(0).u16(0);
    w.u8(OP_RESET);
    w.u8(OP_QUERY);
}

fn wire_seeds() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut c = Client::new();
    let msgs: Vec<(&str, Msg)> = vec![
        ("version_qemu", c.version(0, QEMU_JSON)),
        ("version_ch", c.version(1, CH_JSON)),
        ("dma_map", c.dma_map(3, 0, G, 0x8000)),
        ("dma_unmap", c.dma_unmap(DMA_UNMAP_FLAG_ALL, 0, 0)),
        ("get_info", c.get_info(32)),
        ("region_info", c.region_info(7, 32)),
        ("region_io_fds", c.io_fds(0)),
        ("irq_info", c.irq_info(2)),
        (
            "set_irqs",
            c.set_irqs(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 2, 0, 2, &[1, 0]),
        ),
        ("region_read", c.read(7, 0, 4)),
        ("region_write", c.write(0, 0x10, &[1, 2, 3, 4])),
        (
            "write_multi",
            c.write_multi(&[(0, 0, &[1; 8]), (7, 4, &[6])]),
        ),
        ("reset", c.reset()),
        (
            "device_feature",
            c.feature(16, DEVICE_FEATURE_MIGRATION | DEVICE_FEATURE_GET, &[]),
        ),
        ("mig_data_read", c.mig_read(4096)),
        ("mig_data_write", c.mig_write(&[0; 32])),
    ];
    for (name, m) in msgs {
        let h = Header {
            msg_id: m.msg_id,
            cmd: m.cmd,
            msg_size: (HEADER_SIZE + m.payload.len()) as u32,
            flags: m.flags,
            error_no: 0,
        };
        let mut full = h.encode().to_vec();
        full.extend_from_slice(&m.payload);
        out.insert(format!("msg_{name}"), full);
        out.insert(format!("payload_{name}"), m.payload);
    }
    out.insert("stream_test_device".into(), stream_of(DEV_TEST));
    out
}

fn write_dir(root: &Path, target: &str, seeds: &BTreeMap<String, Vec<u8>>) {
    // Named seeds are (over)written; inputs merged in from fuzzing runs
    // (hash-named) are kept.
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    let mut total = 0;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
        total += bytes.len();
    }
    println!(
        "{target}: {} seeds, {total} bytes -> {}",
        seeds.len(),
        dir.display()
    );
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));

    let server = server_seeds();
    // Every seed must run cleanly and get replies; most must succeed.
    for (name, bytes) in &server {
        let (replies, _, requests) = server_stream::run_collect(bytes);
        let errors = replies
            .iter()
            .filter(|h| h.flags & flags::ERROR != 0)
            .count();
        println!(
            "  {name}: {} replies, {errors} errors, {requests} server requests",
            replies.len()
        );
        if name.contains("message_dma") {
            assert_eq!(requests, 4, "{name}: message DMA requests");
        }
        assert!(!replies.is_empty(), "{name}: no replies");
        if !name.ends_with("_errors") {
            // Refusals the seeds make on purpose.
            let expected = match name.rsplit('_').next() {
                _ if name.ends_with("cmd_dirty_pages_legacy")
                    || name.ends_with("cmd_dma_read_to_server")
                    || name.ends_with("cmd_mig_data_read")
                    || name.ends_with("cmd_mig_data_write") =>
                {
                    1
                }
                _ if name.ends_with("migration_source") => 1,
                _ => 0,
            };
            assert_eq!(errors, expected, "{name}: error replies {replies:?}");
        }
    }
    write_dir(&root, "server_stream", &server);
    let queue = queue_seeds();
    for bytes in queue.values() {
        vfio_user_fuzz::blk_queue::run(bytes);
    }
    write_dir(&root, "virtio_blk_queue", &queue);
    let net = net_seeds();
    for bytes in net.values() {
        net_queue::run(bytes);
    }
    write_dir(&root, "virtio_net_queue", &net);
    let pci = pci_seeds();
    for bytes in pci.values() {
        pci_config::run(bytes);
    }
    write_dir(&root, "pci_config", &pci);
    let wire = wire_seeds();
    for bytes in wire.values() {
        vfio_user_fuzz::wire_decode::run(bytes);
    }
    write_dir(&root, "wire_decode", &wire);
    write_dir(&root, "megasas_frames", &megasas_seeds());
    let cdbs = scsi_seeds();
    for bytes in cdbs.values() {
        scsi_cdb::run(bytes);
    }
    write_dir(&root, "scsi_cdb", &cdbs);
}

// megasas: frames in guest memory (region 0), the way Linux and SeaBIOS
// lay them out, posted through the queue ports.
mod mfi {
    pub const QINFO: u64 = 0x100;
    pub const RING: u64 = 0x200;
    pub const PI: u64 = 0x300;
    pub const SENSE: u64 = 0xf00;
    pub const BUF: u64 = 0x4000;
    /// In the second region, beyond the hole.
    pub const HIGH_BUF: u64 = 0x11000;
    pub const DONT_POST: u16 = 1;
    pub const SGL64: u16 = 2;
    pub const IEEE: u16 = 0x22;
}

/// A frame image of `len` bytes with the common header.
fn mfi_frame(cmd: u8, flags: u16, sges: u8, data_len: u32, context: u32) -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0] = cmd;
    f[1] = 96;
    f[2] = 0xff;
    f[7] = sges;
    f[8..12].copy_from_slice(&context.to_le_bytes());
    f[0x10..0x12].copy_from_slice(&flags.to_le_bytes());
    f[0x14..0x18].copy_from_slice(&data_len.to_le_bytes());
    f
}

fn mfi_dcmd(opcode: u32, flags: u16, len: u32, context: u32) -> Vec<u8> {
    let mut f = mfi_frame(5, flags | 0x10, 1, len, context);
    f[0x18..0x1c].copy_from_slice(&opcode.to_le_bytes());
    f[0x28..0x2c].copy_from_slice(&(mfi::BUF as u32).to_le_bytes());
    f[0x2c..0x30].copy_from_slice(&len.to_le_bytes());
    f
}

fn mfi_scsi(cdb: &[u8], len: u32, flags: u16, context: u32) -> Vec<u8> {
    let mut f = mfi_frame(3, flags | mfi::IEEE, u8::from(len > 0), len, context);
    f[6] = cdb.len() as u8;
    f[0x18..0x1c].copy_from_slice(&(mfi::SENSE as u32).to_le_bytes());
    f[0x20..0x20 + cdb.len()].copy_from_slice(cdb);
    if len > 0 {
        f.truncate(0x30);
        f.extend_from_slice(&mfi::BUF.to_le_bytes());
        f.extend_from_slice(&len.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
    }
    f
}

fn mfi_ld(write: bool, target: u8, lba: u64, blocks: u32, buf: u64, context: u32) -> Vec<u8> {
    let mut f = mfi_frame(if write { 2 } else { 1 }, mfi::IEEE, 1, blocks, context);
    f[4] = target;
    f[0x18..0x1c].copy_from_slice(&(mfi::SENSE as u32).to_le_bytes());
    f[0x20..0x28].copy_from_slice(&lba.to_le_bytes());
    f.truncate(0x28);
    f.extend_from_slice(&buf.to_le_bytes());
    f.extend_from_slice(&(blocks * 512).to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f
}

fn mfi_init() -> Vec<u8> {
    let mut f = mfi_frame(0, mfi::DONT_POST, 0, 32, 0);
    f[0x18..0x20].copy_from_slice(&mfi::QINFO.to_le_bytes());
    f
}

/// Guest memory with `frames` at their addresses and the queue
/// information INIT points at (`entries` entries, 64-bit contexts if
/// `ctx64`).
fn mfi_memory(frames: &[(u64, Vec<u8>)], entries: u32, ctx64: bool) -> Vec<u8> {
    let mut m = vec![0u8; 0x10000 + 0x1000];
    let mut put = |at: u64, b: &[u8]| m[at as usize..at as usize + b.len()].copy_from_slice(b);
    let mut q = Vec::new();
    q.extend_from_slice(&(if ctx64 { 2u32 } else { 0 }).to_le_bytes());
    q.extend_from_slice(&entries.to_le_bytes());
    for a in [mfi::RING, mfi::PI, mfi::PI + 4] {
        q.extend_from_slice(&a.to_le_bytes());
    }
    put(mfi::QINFO, &q);
    for (at, f) in frames {
        put(*at, f);
    }
    // Trailing zeroes carry nothing: the fuzzer fills them.
    while m.last() == Some(&0) {
        m.pop();
    }
    m
}

fn megasas_seeds() -> BTreeMap<String, Vec<u8>> {
    use megasas_frames::{Setup, F_SNAPSHOT};
    let iqp = |at: u64| write_op(backends::megasas::regs::reg::IQP, at as u32 | 1);
    let omsk = write_op(backends::megasas::regs::reg::OMSK, !0x8000_0000);
    let idb = |v| write_op(backends::megasas::regs::reg::IDB, v);
    let mut seeds = BTreeMap::new();
    let mut add = |name: &str, setup: Setup, frames: &[(u64, Vec<u8>)], ok: &[u64], ctx64: bool| {
        let bytes = setup.encode(&mfi_memory(frames, 8, ctx64));
        // The frames meant to succeed did.
        let mem = megasas_frames::run_memory(&bytes);
        for &at in ok {
            assert_eq!(mem[at as usize + 2], 0, "{name}: frame {at:#x} status");
        }
        seeds.insert(format!("seed_{name}"), bytes);
    };
    // Linux's probe: INIT, the DCMDs, EVENT_WAIT held, then aborted.
    let probe = [
        (0x400, mfi_init()),
        (0x800, mfi_dcmd(0x0101_0000, mfi::DONT_POST, 2384, 1)),
        (0xc00, mfi_dcmd(0x0201_0100, mfi::DONT_POST, 8192, 2)),
        (0x1000, mfi_dcmd(0x0301_0100, mfi::DONT_POST, 268, 3)),
        (0x1400, mfi_dcmd(0x0104_0100, mfi::DONT_POST, 20, 4)),
        (0x1800, mfi_dcmd(0x0104_0500, 0, 256, 5)),
        (0x1c00, {
            let mut f = mfi_frame(6, 0, 0, 0, 6);
            f[0x20..0x28].copy_from_slice(&0x1800u64.to_le_bytes());
            f
        }),
    ];
    let ops: Vec<(u8, u32)> = [0x400u64, 0x800, 0xc00, 0x1000, 0x1400]
        .iter()
        .map(|&a| iqp(a))
        .chain([omsk, iqp(0x1800), iqp(0x1c00)])
        .collect();
    add(
        "linux_probe",
        Setup { flags: 2, ops },
        &probe,
        &[0x400, 0x800, 0xc00, 0x1000, 0x1400, 0x1c00],
        false,
    );
    // I/O: LD_WRITE then LD_READ (into the second region), a TEST UNIT
    // READY without SGE, an INQUIRY, a READ(10) through pass-through.
    let io = [
        (0x400, mfi_init()),
        (0x800, mfi_ld(true, 0, 4, 2, mfi::BUF, 1)),
        (0xc00, mfi_ld(false, 1, 4, 2, mfi::HIGH_BUF, 2)),
        (0x1000, mfi_scsi(&[0, 0, 0, 0, 0, 0], 0, 0, 3)),
        (0x1400, mfi_scsi(&[0x12, 0, 0, 0, 36, 0], 36, 0, 4)),
        (
            0x1800,
            mfi_scsi(&[0x28, 0, 0, 0, 0, 8, 0, 0, 4, 0], 2048, 0, 5),
        ),
    ];
    let ops: Vec<(u8, u32)> = std::iter::once(omsk)
        .chain([0x400u64, 0x800, 0xc00, 0x1000, 0x1400, 0x1800].map(iqp))
        .collect();
    let ok = [0x400, 0x800, 0xc00, 0x1000, 0x1400, 0x1800];
    add(
        "ld_and_scsi_io",
        Setup {
            flags: 2,
            ops: ops.clone(),
        },
        &io,
        &ok,
        false,
    );
    add(
        "ld_and_scsi_io_ctx64_snapshot",
        Setup {
            flags: 2 | F_SNAPSHOT,
            ops,
        },
        &io,
        &ok,
        true,
    );
    // SeaBIOS: LD_GET_LIST and an INQUIRY, polled, through the I/O BAR,
    // before any INIT.
    let bios = [
        (0x800, mfi_dcmd(0x0301_0000, mfi::DONT_POST, 1032, 0)),
        (0xc00, {
            let mut f = mfi_scsi(&[0x12, 0, 0, 0, 36, 0], 36, mfi::DONT_POST, 0);
            f[6] = 16;
            f
        }),
    ];
    let ops = vec![(iqp(0x800).0 | 1, 0x801), (iqp(0xc00).0 | 1, 0xc01)];
    add(
        "seabios",
        Setup { flags: 0, ops },
        &bios,
        &[0x800, 0xc00],
        false,
    );
    // The driver resets the adapter and starts over.
    let ops = vec![
        iqp(0x400),
        iqp(0x1800),
        idb(7),
        iqp(0x400),
        idb(0x20),
        idb(0x40),
    ];
    add(
        "doorbell_resets",
        Setup { flags: 0, ops },
        &probe,
        &[0x400],
        false,
    );
    // 64-bit SGEs, a read-only disk, a 64-bit frame address.
    let mut f = mfi_scsi(&[0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0], 512, 0, 7);
    f[0x10] = mfi::SGL64 as u8;
    f.truncate(0x30);
    f.extend_from_slice(&mfi::BUF.to_le_bytes());
    f.extend_from_slice(&512u32.to_le_bytes());
    let ro = [(0x400, mfi_init()), (0x800, f)];
    let ops = vec![
        iqp(0x400),
        write_op(backends::megasas::regs::reg::IQPH, 0),
        write_op(backends::megasas::regs::reg::IQPL, 0x801),
        (18, 0),
    ];
    add(
        "read_only_sgl64",
        Setup { flags: 1, ops },
        &ro,
        &[0x400],
        false,
    );
    seeds
}

fn scsi_seeds() -> BTreeMap<String, Vec<u8>> {
    let mut r16 = [0u8; 16];
    r16[0] = 0x88;
    r16[13] = 4;
    let mut w16 = r16;
    w16[0] = 0x8a;
    let mut rc16 = [0u8; 16];
    rc16[0] = 0x9e;
    rc16[1] = 0x10;
    rc16[13] = 32;
    let mut s16 = [0u8; 16];
    s16[0] = 0x91;
    let cdbs: &[(&str, u16, &[u8])] = &[
        ("test_unit_ready", 0, &[0, 0, 0, 0, 0, 0]),
        ("request_sense", 252, &[0x03, 0, 0, 0, 252, 0]),
        ("inquiry", 96, &[0x12, 0, 0, 0, 96, 0]),
        ("inquiry_vpd_00", 255, &[0x12, 1, 0x00, 0, 255, 0]),
        ("inquiry_vpd_80", 255, &[0x12, 1, 0x80, 0, 255, 0]),
        ("inquiry_vpd_83", 255, &[0x12, 1, 0x83, 0, 255, 0]),
        ("inquiry_vpd_b0", 255, &[0x12, 1, 0xb0, 0, 255, 0]),
        ("inquiry_vpd_b1", 255, &[0x12, 1, 0xb1, 0, 255, 0]),
        ("inquiry_vpd_b2", 255, &[0x12, 1, 0xb2, 0, 255, 0]),
        ("mode_sense_6", 255, &[0x1a, 0, 0x3f, 0, 255, 0]),
        (
            "mode_sense_10",
            512,
            &[0x5a, 0x10, 0x3f, 0xff, 0, 0, 0, 2, 0, 0],
        ),
        ("read_capacity_10", 8, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ("read_capacity_16", 32, &rc16),
        ("read_6", 1024, &[0x08, 0, 0, 1, 2, 0]),
        ("write_6", 1024, &[0x0a, 0, 0, 1, 2, 0]),
        ("read_10", 2048, &[0x28, 0, 0, 0, 0, 8, 0, 0, 4, 0]),
        ("write_10", 2048, &[0x2a, 0x08, 0, 0, 0, 8, 0, 0, 4, 0]),
        ("read_12", 512, &[0xa8, 0, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0]),
        ("write_12", 512, &[0xaa, 0, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0]),
        ("read_16", 2048, &r16),
        ("write_16", 2048, &w16),
        (
            "synchronize_cache_10",
            0,
            &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        ("synchronize_cache_16", 0, &s16),
        ("report_luns", 64, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0]),
        (
            "rsoc_all",
            1024,
            &[0xa3, 0x0c, 0x80, 0, 0, 0, 0, 0, 4, 0, 0, 0],
        ),
        (
            "rsoc_one",
            64,
            &[0xa3, 0x0c, 0x02, 0x9e, 0, 0x10, 0, 0, 0, 64, 0, 0],
        ),
        ("start_stop", 0, &[0x1b, 0, 0, 0, 1, 0]),
        ("unknown", 0, &[0x41, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let mut seeds = BTreeMap::new();
    for &(name, len, cdb) in cdbs {
        seeds.insert(format!("seed_{name}"), scsi_cdb::encode(0, len, cdb));
    }
    seeds.insert(
        "seed_write_10_read_only".into(),
        scsi_cdb::encode(1, 2048, &[0x2a, 0, 0, 0, 0, 8, 0, 0, 4, 0]),
    );
    seeds.insert(
        "seed_read_10_split".into(),
        scsi_cdb::encode(2, 4096, &[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0]),
    );
    seeds
}
