//! `virtio_net_queue`: the virtio-net model of `backends` behind the virtio
//! PCI transport (`PciAdapter<VirtioNetPci>`, driven through its BAR as a
//! guest driver drives it), each queue pair on a `SOCK_SEQPACKET` socket
//! pair (`backends::net::seqpacket`) whose other end the target holds.
//!
//! The input is a list of operations: receive, transmit and control chains
//! of any shape made available (split or indirect, too small, with
//! descriptors the wrong way, into a region boundary, outside guest
//! memory), frames of any size injected from the peer, the frames the
//! device transmitted read back, the device's end filled so that
//! transmission blocks, doorbells, configuration reads and device resets.
//! After every operation the device runs as the server's event loop runs
//! it (deferred work, then its ready fds, until it is idle), and the
//! target checks it against a model of the driver and of the device:
//!
//! - every used entry names the next chain made available on its queue
//!   (chains complete in order, each once), and no more entries appear
//!   than chains were made available; the device's position in each
//!   available ring is where the chains not yet used start (a chain it
//!   gave back is there again, none is lost);
//! - a used length never exceeds the chain's device-writable length;
//! - receive: with frames waiting and buffers posted on an active pair,
//!   the device takes them as far as it can; each injected frame that fits
//!   the chains lands byte-exact, its header's `num_buffers` the number of
//!   chains it took; a frame that does not fit is dropped without losing
//!   a chain; a chain that is not a receive buffer is returned empty;
//! - transmit: the frames read from the peer are, in order, the guest
//!   bytes of the well-formed transmit chains completed; the device stops
//!   with chains left only when its end refuses frames, and then watches
//!   it for writability;
//! - control: each command is answered (OK or ERR as the device model
//!   decides) in the last device-writable byte; its effects (active queue
//!   pairs, offloads, MAC) show in the device and in the back end;
//! - the device's counters match the frames moved and dropped, and a reset
//!   clears the offloads.
//!
//! Input format (little-endian, missing bytes read as 0):
//!
//! ```text
//! flags:u8        bit 0 two queue pairs, bit 1 offloads offered,
//!                 bit 2 no MSI-X (INTx)
//! features:u64    the driver's (VERSION_1 added, masked by what is offered)
//! sizes:u8        receive/transmit queue size 2 << (low nibble % 6),
//!                 control queue size 2 << (high nibble % 6)
//! op*             tag:u8 (% 10), at most 64 operations
//!   0 rx chain    pair:u8 chain
//!   1 tx chain    pair:u8 seed:u8 chain
//!   2 control     class:u8 cmd:u8 shape:u8 data:blob8
//!   3 inject      pair:u8 scale:u8 v:u16 seed:u8 header:[u8; 10]
//!                 (scale % 8 picks the length from v: runts to 73 KiB)
//!   4 drain       pair:u8
//!   5 fill        pair:u8
//!   6 kick        queue:u8
//!   7 config      offset:u8 len:u8
//!   8 reset       (and the driver brings the device up again)
//!   9 link        pair:u8 (the link is flipped; only read by the device's
//!                 once-a-second poll)
//! chain           shape:u8 desc* [table:u8 n:u16 desc*]
//!                 shape: bits 0-2 descriptors - 1, bit 3 the last one is
//!                 an indirect table (table: bits 0-1 variant 0 plain,
//!                 1 length not a multiple of 16, 2 an indirect entry in
//!                 it, 3 outside guest memory; bits 2-7 distinct entries
//!                 - 1; n: entries, 1 to 1200, the distinct ones repeated)
//! desc            kind:u8 len:u16
//!                 kind: bit 0 the other direction, bits 1-3 place (3
//!                 across a boundary of two regions, 4 scratch memory,
//!                 5 outside guest memory, others a fresh buffer), bits
//!                 4-6 len scale (5: len as is), bit 7 zero length
//! blob8           len:u8 (% 64) bytes
//! ```
//!
//! Guest memory is 16 adjacent regions of 16 KiB, [0, 0x40000), then a
//! hole, then [0x41000, 0x61000). The rings are at the start, then scratch
//! memory, then fresh buffers, allocated once each. Buffers in scratch
//! memory may overlap, and so do the entries an indirect table repeats:
//! their bytes are not checked.
//!
//! The driver kicks a queue whenever the device asks for it (`EVENT_IDX`
//! or `VRING_USED_F_NO_NOTIFY`) and, when the control queue turns queue
//! pairs on, their queues. With `NET_QUEUE_TRACE` set in the environment
//! each operation is described on stderr.

use std::collections::VecDeque;

use backends::net::seqpacket::{seqpacket_pair, SeqPacketPeer, FILL_FRAME_LEN};
use backends::net::{offload_flags, NetBackend};
use backends::virtio::{GuestMemory, DEVICE_CFG_OFFSET, NOTIFY_CFG_OFFSET, NOTIFY_OFF_MULTIPLIER};
use backends::virtio_net::{VirtioNetConfig, VirtioNetPci, NET_HDR_LEN};
use vfio_user_server::device::{AsLifecycle, Device, DeviceContext, Interest};
use vfio_user_server::pci::PciAdapter;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::{Reader, Writer};

/// Size of each of the adjacent regions of the first [`LOW_END`] bytes of
/// guest memory.
pub const REGION_SIZE: u64 = 0x4000;
/// End of the adjacent regions; a hole follows, then [`HIGH`].
pub const LOW_END: u64 = 0x40000;
/// The last region.
pub const HIGH: (u64, u64) = (0x41000, 0x61000);
/// Where the rings of queue `i` start (`i * RING_STRIDE`).
const RING_STRIDE: u64 = 0x1000;
/// Scratch memory: buffers there may overlap each other.
const SCRATCH: (u64, u64) = (0x6000, 0x8000);
/// Fresh buffers are allocated from these ranges.
const DATA: [(u64, u64); 2] = [(0x8000, LOW_END), HIGH];
/// Maximum queue size of the device.
pub const QUEUE_MAX: u16 = 64;
/// Operations per input.
const MAX_OPS: usize = 64;
/// The device's bounce buffer with mergeable buffers (`queues::MAX_FRAME`).
const MAX_FRAME: u64 = NET_HDR_LEN as u64 + 65535 + 14 + 4;
/// Most descriptors or segments the device puts in one `readv`/`writev`.
const MAX_IOV: usize = 1024;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];

// virtio-pci common configuration offsets (the transport's BAR 0).
const CC_DFSELECT: u64 = 0x00;
const CC_DF: u64 = 0x04;
const CC_GFSELECT: u64 = 0x08;
const CC_GF: u64 = 0x0c;
const CC_STATUS: u64 = 0x14;
const CC_Q_SELECT: u64 = 0x16;
const CC_Q_SIZE: u64 = 0x18;
const CC_Q_ENABLE: u64 = 0x1c;
const CC_Q_NOTIFY_OFF: u64 = 0x1e;
const CC_Q_DESC: u64 = 0x20;
const CC_Q_AVAIL: u64 = 0x28;
const CC_Q_USED: u64 = 0x30;

const S_ACK: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;

const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;
const D_INDIRECT: u16 = 4;

/// Feature bits.
pub mod feature {
    /// `VIRTIO_NET_F_CSUM`.
    pub const CSUM: u64 = 1 << 0;
    /// `VIRTIO_NET_F_GUEST_CSUM`.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// `VIRTIO_NET_F_CTRL_GUEST_OFFLOADS`.
    pub const CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
    /// `VIRTIO_NET_F_GUEST_TSO4`.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// `VIRTIO_NET_F_GUEST_TSO6`.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// `VIRTIO_NET_F_GUEST_ECN`.
    pub const GUEST_ECN: u64 = 1 << 9;
    /// `VIRTIO_NET_F_MRG_RXBUF`.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// `VIRTIO_NET_F_CTRL_VQ`.
    pub const CTRL_VQ: u64 = 1 << 17;
    /// `VIRTIO_NET_F_GUEST_ANNOUNCE`.
    pub const GUEST_ANNOUNCE: u64 = 1 << 21;
    /// `VIRTIO_NET_F_MQ`.
    pub const MQ: u64 = 1 << 22;
    /// `VIRTIO_RING_F_INDIRECT_DESC`.
    pub const INDIRECT_DESC: u64 = 1 << 28;
    /// `VIRTIO_RING_F_EVENT_IDX`.
    pub const EVENT_IDX: u64 = 1 << 29;
    /// `VIRTIO_F_VERSION_1`.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Operation tags.
pub mod op {
    /// A receive chain.
    pub const RX: u8 = 0;
    /// A transmit chain.
    pub const TX: u8 = 1;
    /// A control command.
    pub const CTRL: u8 = 2;
    /// A frame from the peer.
    pub const INJECT: u8 = 3;
    /// The peer reads what the device sent.
    pub const DRAIN: u8 = 4;
    /// The device's end is filled.
    pub const FILL: u8 = 5;
    /// A doorbell.
    pub const KICK: u8 = 6;
    /// A device configuration read.
    pub const CONFIG: u8 = 7;
    /// A device reset.
    pub const RESET: u8 = 8;
    /// The link flips.
    pub const LINK: u8 = 9;
    /// Number of tags.
    pub const COUNT: u8 = 10;
}

/// Control classes and commands (`VIRTIO_NET_CTRL_*`).
pub mod ctrl {
    /// RX mode class.
    pub const RX: u8 = 0;
    /// MAC class.
    pub const MAC: u8 = 1;
    /// VLAN class.
    pub const VLAN: u8 = 2;
    /// Announce class.
    pub const ANNOUNCE: u8 = 3;
    /// Multiqueue class.
    pub const MQ: u8 = 4;
    /// Guest offloads class.
    pub const GUEST_OFFLOADS: u8 = 5;
    /// `VIRTIO_NET_CTRL_MAC_TABLE_SET`.
    pub const MAC_TABLE_SET: u8 = 0;
    /// `VIRTIO_NET_CTRL_MAC_ADDR_SET`.
    pub const MAC_ADDR_SET: u8 = 1;
    /// OK.
    pub const OK: u8 = 0;
    /// ERR.
    pub const ERR: u8 = 1;
}

// ---------------------------------------------------------------------
// Input description (used by the seed generator too).

/// One descriptor as the input describes it.
#[derive(Clone, Copy, Debug, Default)]
pub struct DescSpec {
    /// See the module docs (`kind`).
    pub kind: u8,
    /// Length (scaled by `kind`).
    pub len: u16,
}

impl DescSpec {
    /// A fresh buffer of exactly `len` bytes (up to 65535) going the
    /// chain's way.
    pub fn fresh(len: u16) -> Self {
        DescSpec { kind: 5 << 4, len }
    }

    /// Encodes it.
    pub fn encode(&self, w: &mut Writer) {
        w.u8(self.kind).u16(self.len);
    }
}

/// A chain as the input describes it.
#[derive(Clone, Debug, Default)]
pub struct ChainSpec {
    /// Direct descriptors (1 to 8).
    pub descs: Vec<DescSpec>,
    /// The last direct descriptor is an indirect table: (variant byte,
    /// entries, distinct entries).
    pub table: Option<(u8, u16, Vec<DescSpec>)>,
}

impl ChainSpec {
    /// A chain of fresh buffers of these lengths.
    pub fn fresh(lens: &[u16]) -> Self {
        ChainSpec {
            descs: lens.iter().map(|&l| DescSpec::fresh(l)).collect(),
            table: None,
        }
    }

    /// An indirect chain of fresh buffers of these lengths.
    pub fn indirect(lens: &[u16]) -> Self {
        ChainSpec {
            descs: vec![DescSpec::default()],
            table: Some((
                0,
                lens.len() as u16,
                lens.iter().map(|&l| DescSpec::fresh(l)).collect(),
            )),
        }
    }

    /// Encodes it.
    pub fn encode(&self, w: &mut Writer) {
        let n = self.descs.len().clamp(1, 8);
        let shape = (n - 1) as u8 | if self.table.is_some() { 8 } else { 0 };
        w.u8(shape);
        for d in &self.descs[..n.min(self.descs.len())] {
            d.encode(w);
        }
        for _ in self.descs.len()..n {
            DescSpec::default().encode(w);
        }
        if let Some((variant, entries, distinct)) = &self.table {
            let k = distinct.len().clamp(1, 64);
            w.u8(variant & 3 | ((k - 1) as u8) << 2);
            w.u16(*entries);
            for d in distinct.iter().take(k) {
                d.encode(w);
            }
        }
    }

    fn decode(r: &mut Reader) -> Self {
        let shape = r.u8();
        let n = 1 + usize::from(shape & 7);
        let descs = (0..n)
            .map(|_| DescSpec {
                kind: r.u8(),
                len: r.u16(),
            })
            .collect();
        let table = (shape & 8 != 0).then(|| {
            let t = r.u8();
            let entries = r.u16();
            let distinct = 1 + usize::from(t >> 2);
            let specs = (0..distinct)
                .map(|_| DescSpec {
                    kind: r.u8(),
                    len: r.u16(),
                })
                .collect();
            (t & 3, entries, specs)
        });
        ChainSpec { descs, table }
    }
}

/// Builds inputs.
pub struct InputWriter(pub Writer);

impl InputWriter {
    /// The header: flags, features, queue sizes.
    pub fn new(flags: u8, features: u64, sizes: u8) -> Self {
        let mut w = Writer::default();
        w.u8(flags).u64(features).u8(sizes);
        InputWriter(w)
    }

    /// A receive chain on `pair`.
    pub fn rx(&mut self, pair: u8, chain: &ChainSpec) -> &mut Self {
        self.0.u8(op::RX).u8(pair);
        chain.encode(&mut self.0);
        self
    }

    /// A transmit chain on `pair`.
    pub fn tx(&mut self, pair: u8, seed: u8, chain: &ChainSpec) -> &mut Self {
        self.0.u8(op::TX).u8(pair).u8(seed);
        chain.encode(&mut self.0);
        self
    }

    /// A control command.
    pub fn ctrl(&mut self, class: u8, cmd: u8, shape: u8, data: &[u8]) -> &mut Self {
        let data = &data[..data.len().min(63)];
        self.0
            .u8(op::CTRL)
            .u8(class)
            .u8(cmd)
            .u8(shape)
            .u8(data.len() as u8)
            .bytes(data);
        self
    }

    /// A frame of `len` bytes (up to 65535, scale 7) from the peer.
    pub fn inject(&mut self, pair: u8, len: u16, seed: u8, header: [u8; 10]) -> &mut Self {
        self.0
            .u8(op::INJECT)
            .u8(pair)
            .u8(7)
            .u16(len)
            .u8(seed)
            .bytes(&header);
        self
    }

    /// An operation without arguments but one byte.
    pub fn op(&mut self, tag: u8, arg: u8) -> &mut Self {
        self.0.u8(tag).u8(arg);
        self
    }

    /// A configuration read.
    pub fn config(&mut self, offset: u8, len: u8) -> &mut Self {
        self.0.u8(op::CONFIG).u8(offset).u8(len);
        self
    }

    /// A reset.
    pub fn reset(&mut self) -> &mut Self {
        self.0.u8(op::RESET);
        self
    }
}

// ---------------------------------------------------------------------
// The model.

/// A descriptor as the device sees it (after following indirect tables).
#[derive(Clone, Copy, Debug)]
struct PDesc {
    addr: u64,
    len: u32,
    write: bool,
    /// In scratch memory: its bytes are not checked.
    scratch: bool,
}

/// A chain made available.
#[derive(Clone, Debug)]
struct Chain {
    head: u16,
    /// Descriptors of the queue's table it uses.
    slots: Vec<u16>,
    /// What the device parses.
    descs: Vec<PDesc>,
    /// Transmit: the frame's bytes (`None` when in scratch memory).
    tx_bytes: Option<Vec<u8>>,
}

/// Whether `[addr, addr + len)` is guest memory.
fn in_memory(addr: u64, len: u32) -> bool {
    if len == 0 {
        return true;
    }
    let Some(end) = addr.checked_add(u64::from(len)) else {
        return false;
    };
    (end <= LOW_END) || (addr >= HIGH.0 && end <= HIGH.1)
}

/// Segments of a buffer in guest memory (it splits at region
/// boundaries).
fn segments(d: &PDesc) -> usize {
    if d.len == 0 {
        0
    } else if d.addr < LOW_END {
        let last = d.addr + u64::from(d.len) - 1;
        (last / REGION_SIZE - d.addr / REGION_SIZE + 1) as usize
    } else {
        1
    }
}

impl Chain {
    /// `buffers()` of the device: the total length if every descriptor goes
    /// the `writable` way, lies in guest memory and the list fits one
    /// `readv`/`writev` (with a byte to spare on receive).
    fn buffers(&self, writable: bool) -> Option<u64> {
        if self.descs.len() > MAX_IOV {
            return None;
        }
        let mut segs = 0;
        let mut len = 0u64;
        for d in &self.descs {
            if d.write != writable || !in_memory(d.addr, d.len) {
                return None;
            }
            segs += segments(d);
            len += u64::from(d.len);
        }
        (segs < MAX_IOV).then_some(len)
    }

    fn writable_len(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| d.write)
            .map(|d| u64::from(d.len))
            .sum()
    }

    fn scratch(&self) -> bool {
        self.descs.iter().any(|d| d.scratch)
    }

    /// Reads the first `len` bytes of the chain from guest memory.
    fn read(&self, mem: &GuestMemory, len: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize);
        for d in &self.descs {
            let left = len - out.len() as u64;
            if left == 0 {
                break;
            }
            let n = left.min(u64::from(d.len)) as usize;
            let at = out.len();
            out.resize(at + n, 0);
            mem.read_slice(&mut out[at..], GuestAddress(d.addr))
                .expect("chain outside guest memory");
        }
        out
    }
}

/// One split virtqueue, driver side.
struct Vq {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// The driver's `avail.idx`.
    next_avail: u16,
    last_used: u16,
    free: Vec<u16>,
    /// Chains made available and not used yet, in order.
    pending: VecDeque<Chain>,
}

impl Vq {
    fn new(index: usize, size: u16) -> Vq {
        let base = index as u64 * RING_STRIDE;
        Vq {
            size,
            desc: base,
            avail: base + 0x400,
            used: base + 0x800,
            next_avail: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            pending: VecDeque::new(),
        }
    }

    fn avail_event(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }
}

/// What the peer should read next from a pair.
#[derive(Debug)]
enum Sent {
    /// A frame the device transmitted: its bytes, or only its length.
    Frame(Result<Vec<u8>, usize>),
    /// A frame of [`FILL_FRAME_LEN`] bytes queued by `fill`.
    Filler,
}

/// A used entry the model expects on a receive queue.
struct RxUsed {
    head: u16,
    len: u32,
    /// The bytes the chain's first `len` bytes must be (`None`: unchecked).
    bytes: Option<Vec<u8>>,
}

/// Counters the device keeps.
#[derive(Default, Debug, PartialEq, Eq, Clone, Copy)]
struct Stats {
    rx_frames: u64,
    rx_dropped: u64,
    tx_frames: u64,
    tx_dropped: u64,
}

struct Harness {
    dev: PciAdapter<VirtioNetPci>,
    mem: GuestMemory,
    peers: Vec<SeqPacketPeer>,
    max_write: Vec<usize>,
    pairs: usize,
    offered: u64,
    wanted: u64,
    features: u64,
    sizes: (u16, u16),
    queues: Vec<Vq>,
    /// Fresh-buffer allocation cursors, one per [`DATA`] range.
    cursor: [u64; 2],
    // Device model.
    active_pairs: usize,
    /// Pairs active when the driver last kicked receive queues for that.
    kicked_pairs: usize,
    guest_offloads: Option<u64>,
    mac: [u8; 6],
    link: Vec<bool>,
    /// Frames injected and not yet read by the device, per pair.
    frames: Vec<VecDeque<Vec<u8>>>,
    /// What each peer reads next.
    sent: Vec<VecDeque<Sent>>,
    stats: Stats,
}

/// Guest memory, made once per thread: mapping and faulting it in every
/// run would cost more than the run. Nothing carries over that a check
/// reads: the rings are zeroed at every bring-up, and only bytes the
/// harness or the device wrote in this run are compared.
fn guest_memory() -> GuestMemory {
    thread_local! {
        static MEMORY: GuestMemory = {
            let ranges: Vec<(GuestAddress, usize)> = (0..LOW_END / REGION_SIZE)
                .map(|i| (GuestAddress(i * REGION_SIZE), REGION_SIZE as usize))
                .chain([(GuestAddress(HIGH.0), (HIGH.1 - HIGH.0) as usize)])
                .collect();
            GuestMemory::from_ranges(&ranges).expect("guest memory")
        };
    }
    MEMORY.with(|m| m.clone())
}

/// Length of the pattern's period: a prime, so that no power-of-two
/// offset maps a byte onto the same value.
const PATTERN_LEN: usize = 4093;

/// `len` bytes of the test pattern from `seed`.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    thread_local! {
        static PATTERN: Vec<u8> = (0..2 * PATTERN_LEN)
            .map(|i| ((i % PATTERN_LEN) as u32).wrapping_mul(0x9e37_79b9).to_le_bytes()[3])
            .collect();
    }
    PATTERN.with(|p| {
        let mut out = Vec::with_capacity(len);
        let mut at = seed as usize % PATTERN_LEN;
        while out.len() < len {
            let n = (len - out.len()).min(PATTERN_LEN);
            out.extend_from_slice(&p[at..at + n]);
            at = (at + n) % PATTERN_LEN;
        }
        out
    })
}

impl Harness {
    fn new(flags: u8, wanted: u64, sizes: u8) -> Harness {
        let pairs = if flags & 1 != 0 { 2 } else { 1 };
        let mut backends: Vec<Box<dyn NetBackend>> = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..pairs {
            let (b, p) = seqpacket_pair().expect("socketpair");
            backends.push(Box::new(b));
            peers.push(p);
        }
        let ctx = DeviceContext::default();
        let mem = guest_memory();
        ctx.memory.lock().unwrap().replace(mem.clone());
        let config = VirtioNetConfig {
            mac: MAC,
            mtu: 1500,
            queue_size: QUEUE_MAX,
            offloads: flags & 2 != 0,
            pcie: false,
        };
        let net = VirtioNetPci::new(ctx.clone(), backends, config).expect("virtio-net");
        let dev = PciAdapter::new(net).expect("adapter");
        ctx.irqs.configure(&dev.irq_layout());
        let q = |n: u8| 2u16 << (n % 6);
        let max_write = peers.iter().map(|p| p.max_device_write()).collect();
        let mut h = Harness {
            dev,
            mem,
            max_write,
            pairs,
            offered: 0,
            wanted,
            features: 0,
            sizes: (q(sizes & 0xf), q(sizes >> 4)),
            queues: Vec::new(),
            cursor: [DATA[0].0, DATA[1].0],
            active_pairs: 1,
            kicked_pairs: 1,
            guest_offloads: None,
            mac: MAC,
            link: vec![true; pairs],
            frames: vec![VecDeque::new(); pairs],
            sent: (0..pairs).map(|_| VecDeque::new()).collect(),
            peers,
            stats: Stats::default(),
        };
        // Memory space and bus mastering on, as the guest's PCI core
        // leaves them.
        h.dev.region_write(7, 4, &[0x06, 0]).expect("command register");
        if flags & 4 == 0 {
            h.enable_msix();
        }
        h.offered = h.device_features();
        h
    }

    // --- transport access -------------------------------------------

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        self.dev.region_write(0, offset, data).expect("BAR write");
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        self.dev.region_read(0, offset, data).expect("BAR read");
    }

    fn cc_write(&mut self, offset: u64, v: u64, len: usize) {
        self.bar_write(offset, &v.to_le_bytes()[..len]);
    }

    fn cc_read(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.bar_read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn enable_msix(&mut self) {
        // MSI-X enable bit of the capability (found by walking the list).
        let mut at = {
            let mut b = [0u8];
            self.dev.region_read(7, 0x34, &mut b).unwrap();
            u64::from(b[0])
        };
        while at != 0 {
            let mut h = [0u8; 2];
            self.dev.region_read(7, at, &mut h).unwrap();
            if h[0] == 0x11 {
                self.dev.region_write(7, at + 3, &[0x80]).unwrap();
                return;
            }
            at = u64::from(h[1] & 0xfc);
        }
    }

    fn device_features(&mut self) -> u64 {
        self.cc_write(CC_DFSELECT, 0, 4);
        let lo = self.cc_read(CC_DF, 4);
        self.cc_write(CC_DFSELECT, 1, 4);
        let hi = self.cc_read(CC_DF, 4);
        lo | hi << 32
    }

    fn status(&mut self) -> u8 {
        self.cc_read(CC_STATUS, 1) as u8
    }

    fn device(&mut self) -> &mut VirtioNetPci {
        self.dev.device()
    }

    /// Resets the device and brings it up: features, the queues of the
    /// pairs it can use (every pair with multiqueue, one without) and the
    /// control queue after them, DRIVER_OK.
    fn bring_up(&mut self) {
        self.cc_write(CC_STATUS, 0, 1);
        assert_eq!(self.status(), 0);
        // A reset takes back a MAC the driver set.
        self.mac = MAC;
        // A reset clears the offloads.
        for p in &self.peers {
            assert_eq!(p.offloads(), 0, "offloads after reset");
        }
        self.cc_write(CC_STATUS, u64::from(S_ACK | S_DRIVER), 1);
        let features = (self.wanted | feature::VERSION_1) & self.offered;
        self.cc_write(CC_GFSELECT, 0, 4);
        self.cc_write(CC_GF, features & 0xffff_ffff, 4);
        self.cc_write(CC_GFSELECT, 1, 4);
        self.cc_write(CC_GF, features >> 32, 4);
        self.cc_write(CC_STATUS, u64::from(S_ACK | S_DRIVER | S_FEATURES_OK), 1);
        assert_ne!(self.status() & S_FEATURES_OK, 0, "FEATURES_OK refused");
        self.features = features;
        let nq = self.ctrl_q() + 1;
        // The rings start zeroed.
        let zeros = vec![0u8; nq * RING_STRIDE as usize];
        self.mem.write_slice(&zeros, GuestAddress(0)).unwrap();
        self.queues.clear();
        for i in 0..nq {
            let size = if i == self.ctrl_q() {
                self.sizes.1
            } else {
                self.sizes.0
            };
            let vq = Vq::new(i, size);
            self.cc_write(CC_Q_SELECT, i as u64, 2);
            self.cc_write(CC_Q_SIZE, u64::from(size), 2);
            for (reg, addr) in [
                (CC_Q_DESC, vq.desc),
                (CC_Q_AVAIL, vq.avail),
                (CC_Q_USED, vq.used),
            ] {
                self.cc_write(reg, addr, 8);
            }
            assert_eq!(self.cc_read(CC_Q_NOTIFY_OFF, 2), i as u64);
            self.cc_write(CC_Q_ENABLE, 1, 2);
            self.queues.push(vq);
        }
        let s = self.status();
        self.cc_write(CC_STATUS, u64::from(s | S_DRIVER_OK), 1);
        assert!(self.device().is_active(), "device not active");
        self.active_pairs = 1;
        self.kicked_pairs = 1;
        self.guest_offloads = None;
        self.run();
        self.check_offloads();
    }

    fn acked(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// The pairs whose queues the driver has: all with multiqueue, one
    /// without.
    fn queue_pairs(&self) -> usize {
        if self.acked(feature::MQ) {
            self.pairs
        } else {
            1
        }
    }

    /// The control queue, after the pairs' queues (virtio 1.x 5.1.2).
    fn ctrl_q(&self) -> usize {
        2 * self.queue_pairs()
    }

    /// Runs the device as the event loop does until it is idle.
    fn run(&mut self) {
        for _ in 0..1000 {
            let mut rounds = 0;
            while self.dev.lifecycle().run_deferred() {
                rounds += 1;
                assert!(rounds < 10_000, "run_deferred never idle");
            }
            let watched: Vec<_> = self
                .dev
                .lifecycle()
                .watched_fds()
                .iter()
                .filter(|w| !w.interest.is_none())
                .copied()
                .collect();
            let mut pfds: Vec<libc::pollfd> = watched
                .iter()
                .map(|w| libc::pollfd {
                    fd: w.fd,
                    events: if w.interest.read { libc::POLLIN } else { 0 }
                        | if w.interest.write { libc::POLLOUT } else { 0 },
                    revents: 0,
                })
                .collect();
            // SAFETY: `pfds` is a valid array of pollfds; no waiting.
            unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) };
            let mut any = false;
            for (w, p) in watched.iter().zip(&pfds) {
                let hup = p.revents & (libc::POLLHUP | libc::POLLERR) != 0;
                let ready = Interest {
                    read: p.revents & libc::POLLIN != 0 || hup,
                    write: p.revents & libc::POLLOUT != 0 || hup,
                };
                if !ready.is_none() {
                    self.dev.lifecycle().handle_event(w.fd, ready);
                    any = true;
                }
            }
            if !any {
                return;
            }
        }
        panic!("the device never became idle");
    }

    // --- buffers ----------------------------------------------------

    /// A fresh buffer of `len` bytes.
    fn alloc(&mut self, len: u64) -> Option<u64> {
        for (i, &(_, end)) in DATA.iter().enumerate() {
            let at = self.cursor[i];
            if at + len <= end {
                self.cursor[i] = (at + len).next_multiple_of(8);
                return Some(at);
            }
        }
        None
    }

    /// A fresh buffer of `len` bytes across a region boundary, if there is
    /// room.
    fn across(&mut self, len: u64) -> Option<u64> {
        if len < 2 {
            return None;
        }
        let boundary = (self.cursor[0] + len / 2 + 1).next_multiple_of(REGION_SIZE);
        let at = boundary - len / 2;
        if at + len > LOW_END {
            return None;
        }
        self.cursor[0] = (at + len).next_multiple_of(8);
        Some(at)
    }

    /// The descriptor `spec` describes, for a chain going `write`'s way;
    /// its buffer filled from `seed` if it is readable.
    fn make_desc(&mut self, spec: DescSpec, write: bool, seed: u32) -> PDesc {
        let v = u32::from(spec.len);
        let len: u32 = if spec.kind & 0x80 != 0 {
            0
        } else {
            match (spec.kind >> 4) & 7 {
                0 => v % 32,
                1 => 10 + v % 6,
                2 => v % 256,
                3 => v % 2048,
                4 => v % 9100,
                5 => v,
                6 => 0x10000 + v,
                _ => 0xffff_0000 | v,
            }
        };
        let write = write ^ (spec.kind & 1 != 0);
        let flags_len = |addr, scratch| PDesc {
            addr,
            len,
            write,
            scratch,
        };
        match (spec.kind >> 1) & 7 {
            5 => {
                let addr = match v % 6 {
                    0 => 0x40000 - u64::from((len / 2).clamp(1, 0x1000)),
                    1 => 0x40000 + u64::from(v % 0x1000),
                    2 => 0x61000 - u64::from((len / 2).clamp(1, 0x1000)),
                    3 => 0x7000_0000,
                    4 => u64::MAX - 8,
                    _ => 0x61000,
                };
                flags_len(addr, false)
            }
            kind => match match kind {
                3 => self
                    .across(u64::from(len))
                    .or_else(|| self.alloc(u64::from(len))),
                4 => None,
                _ => self.alloc(u64::from(len)),
            } {
                Some(addr) => {
                    if !write {
                        self.fill_pattern(addr, len, seed);
                    }
                    flags_len(addr, false)
                }
                None => {
                    // Scratch memory, clipped to it.
                    let span = SCRATCH.1 - SCRATCH.0;
                    let addr = SCRATCH.0 + u64::from(v) % span;
                    PDesc {
                        addr,
                        len: len.min((SCRATCH.1 - addr) as u32),
                        write,
                        scratch: true,
                    }
                }
            },
        }
    }

    fn fill_pattern(&self, addr: u64, len: u32, seed: u32) {
        let bytes = pattern(seed ^ addr as u32, len as usize);
        self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    }

    /// Places the chain `spec` on queue `q` (device-writable if `write`)
    /// and makes it available; `None` if the descriptor table is full.
    fn post(&mut self, q: usize, spec: &ChainSpec, write: bool, seed: u32) -> bool {
        let n = spec.descs.len();
        if self.queues[q].free.len() < n {
            return false;
        }
        let mut descs = Vec::new();
        let mut truncated = false;
        let mut raw: Vec<(u64, u32, u16)> = Vec::new();
        for (i, &d) in spec.descs.iter().enumerate() {
            let last = i + 1 == n;
            if let (true, Some((variant, entries, distinct))) = (last, spec.table.as_ref()) {
                let entries = usize::from(*entries).clamp(1, 1200);
                let mut table = Vec::with_capacity(entries * 16);
                let mut tdescs = Vec::new();
                let mut nested_at = None;
                if *variant == 2 {
                    nested_at = Some(usize::from(distinct[0].len) % entries);
                }
                // The distinct entries get buffers; the others repeat them
                // (so the chain overlaps itself: its bytes are not checked).
                let repeated = entries > distinct.len();
                let mut made: Vec<PDesc> = Vec::new();
                for (e, &spec) in distinct.iter().take(entries).enumerate() {
                    let mut pd = self.make_desc(spec, write, seed.wrapping_add(e as u32));
                    pd.scratch |= repeated;
                    made.push(pd);
                }
                for e in 0..entries {
                    let pd = made[e % made.len()];
                    let mut flags = if pd.write { D_WRITE } else { 0 };
                    if e + 1 < entries {
                        flags |= D_NEXT;
                    }
                    if nested_at == Some(e) {
                        flags |= D_INDIRECT;
                    }
                    let mut w = Writer::default();
                    w.u64(pd.addr).u32(pd.len).u16(flags).u16((e + 1) as u16);
                    table.extend_from_slice(&w.0);
                    tdescs.push(pd);
                }
                let mut table_len = table.len() as u32;
                let mut table_addr = self.alloc(u64::from(table_len));
                match variant {
                    1 => table_len += 8,
                    3 => table_addr = Some(0x40000 + 0x10),
                    _ => {}
                }
                let ok_table = match table_addr {
                    Some(a) if in_memory(a, table_len) => {
                        self.mem.write_slice(&table, GuestAddress(a)).unwrap();
                        true
                    }
                    _ => false,
                };
                let addr = table_addr.unwrap_or(0x40000 + 0x10);
                raw.push((addr, table_len, D_INDIRECT));
                // (A walk that ended before the table never reads it.)
                if !truncated && (!ok_table || !table_len.is_multiple_of(16)) {
                    truncated = true;
                } else if !truncated {
                    // Walk it as the device does: a nested table stops it,
                    // and so does a chain past 4 GiB.
                    let mut total = descs.iter().map(|d: &PDesc| u64::from(d.len)).sum::<u64>();
                    for (e, pd) in tdescs.into_iter().enumerate() {
                        total += u64::from(pd.len);
                        if nested_at == Some(e) || total > u64::from(u32::MAX) {
                            truncated = true;
                            break;
                        }
                        descs.push(pd);
                    }
                }
            } else {
                let pd = self.make_desc(d, write, seed.wrapping_add(i as u32));
                let total =
                    descs.iter().map(|d: &PDesc| u64::from(d.len)).sum::<u64>() + u64::from(pd.len);
                raw.push((pd.addr, pd.len, if pd.write { D_WRITE } else { 0 }));
                if !truncated {
                    if total > u64::from(u32::MAX) {
                        truncated = true;
                    } else {
                        descs.push(pd);
                    }
                }
            }
        }
        // The queue's descriptors, linked.
        let vq = &mut self.queues[q];
        let slots: Vec<u16> = (0..n).map(|_| vq.free.pop().unwrap()).collect();
        for (i, &(addr, len, mut flags)) in raw.iter().enumerate() {
            let next = if i + 1 < n {
                flags |= D_NEXT;
                slots[i + 1]
            } else {
                0
            };
            let mut w = Writer::default();
            w.u64(addr).u32(len).u16(flags).u16(next);
            let at = vq.desc + 16 * u64::from(slots[i]);
            self.mem.write_slice(&w.0, GuestAddress(at)).unwrap();
        }
        let mut chain = Chain {
            head: slots[0],
            slots,
            descs,
            tx_bytes: None,
        };
        if !write && !chain.scratch() {
            if let Some(len) = chain.buffers(false) {
                chain.tx_bytes = Some(chain.read(&self.mem, len));
            }
        }
        self.publish(q, chain);
        true
    }

    /// Makes `chain` available on queue `q` and rings the doorbell if the
    /// device asked for it.
    fn publish(&mut self, q: usize, chain: Chain) {
        let vq = &mut self.queues[q];
        let old = vq.next_avail;
        let slot = vq.avail + 4 + 2 * u64::from(vq.next_avail % vq.size);
        self.mem.write_obj(chain.head, GuestAddress(slot)).unwrap();
        vq.next_avail = vq.next_avail.wrapping_add(1);
        self.mem
            .write_obj(vq.next_avail, GuestAddress(vq.avail + 2))
            .unwrap();
        vq.pending.push_back(chain);
        if self.kick_needed(q, old) {
            self.kick(q);
        }
    }

    fn kick_needed(&self, q: usize, old: u16) -> bool {
        let vq = &self.queues[q];
        if self.acked(feature::EVENT_IDX) {
            let event: u16 = self.mem.read_obj(GuestAddress(vq.avail_event())).unwrap();
            vq.next_avail.wrapping_sub(event).wrapping_sub(1) < vq.next_avail.wrapping_sub(old)
        } else {
            let flags: u16 = self.mem.read_obj(GuestAddress(vq.used)).unwrap();
            flags & 1 == 0
        }
    }

    fn kick(&mut self, q: usize) {
        let off = NOTIFY_CFG_OFFSET + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        self.bar_write(off, &(q as u16).to_le_bytes());
    }

    // --- checks -------------------------------------------------------

    /// The used entries of queue `q` since the last look; each must be the
    /// next chain made available, with a length the chain allows.
    fn take_used(&mut self, q: usize) -> Vec<(Chain, u32)> {
        let vq = &mut self.queues[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(vq.used + 2)).unwrap();
        let n = idx.wrapping_sub(vq.last_used);
        assert!(
            usize::from(n) <= vq.pending.len(),
            "queue {q}: {n} used entries, {} chains available",
            vq.pending.len()
        );
        let mut out = Vec::new();
        for _ in 0..n {
            let e = vq.used + 4 + 8 * u64::from(vq.last_used % vq.size);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            vq.last_used = vq.last_used.wrapping_add(1);
            let chain = vq.pending.pop_front().unwrap();
            assert_eq!(
                id,
                u32::from(chain.head),
                "queue {q}: used entry out of order"
            );
            assert!(
                u64::from(len) <= chain.writable_len(),
                "queue {q}: used length {len} beyond the chain's {} writable bytes",
                chain.writable_len()
            );
            vq.free.extend_from_slice(&chain.slots);
            out.push((chain, len));
        }
        out
    }

    /// What the device must have done on receive queue of `pair` by now:
    /// the used entries it must have written.
    fn model_rx(&mut self, pair: usize) -> Vec<RxUsed> {
        let merge = self.acked(feature::MRG_RXBUF);
        let overflow = if merge { MAX_FRAME } else { 1 };
        let pending = &self.queues[2 * pair].pending;
        let frames = &mut self.frames[pair];
        let stats = &mut self.stats;
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(c) = pending.get(at) {
            let w = match c.buffers(true) {
                Some(w) if w >= NET_HDR_LEN as u64 => w,
                _ => {
                    // Not a receive buffer: back empty.
                    out.push(RxUsed {
                        head: c.head,
                        len: 0,
                        bytes: None,
                    });
                    stats.rx_dropped += 1;
                    at += 1;
                    continue;
                }
            };
            let Some(f) = frames.pop_front() else { break };
            let n = (f.len() as u64).min(w + overflow);
            if n < NET_HDR_LEN as u64 {
                stats.rx_dropped += 1;
                continue;
            }
            let mut frame = f;
            frame.truncate(n as usize);
            if n <= w {
                frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                out.push(RxUsed {
                    head: c.head,
                    len: n as u32,
                    bytes: (!c.scratch()).then_some(frame),
                });
                stats.rx_frames += 1;
                at += 1;
                continue;
            }
            // Did not fit the chain: mergeable buffers take the rest,
            // unless the frame may have been cut at the end of the bounce
            // buffer.
            if !merge || n - w >= overflow {
                stats.rx_dropped += 1;
                continue;
            }
            let mut parts = vec![(at, w)];
            let mut rest = n - w;
            let mut bad = None;
            let mut i = at + 1;
            while rest > 0 {
                let Some(c2) = pending.get(i) else { break };
                match c2.buffers(true) {
                    Some(w2) if w2 > 0 => {
                        let k = rest.min(w2);
                        parts.push((i, k));
                        rest -= k;
                        i += 1;
                    }
                    _ => {
                        bad = Some(i);
                        break;
                    }
                }
            }
            stats.rx_dropped += u64::from(rest > 0);
            if let Some(b) = bad {
                // Every chain of the frame back to the guest empty.
                for c in pending.range(at..=b) {
                    out.push(RxUsed {
                        head: c.head,
                        len: 0,
                        bytes: None,
                    });
                }
                at = b + 1;
                continue;
            }
            if rest > 0 {
                // Not enough buffers: the chains go back.
                continue;
            }
            frame[10..12].copy_from_slice(&(parts.len() as u16).to_le_bytes());
            let mut off = 0usize;
            for &(j, k) in &parts {
                let c = &pending[j];
                let bytes = frame[off..off + k as usize].to_vec();
                off += k as usize;
                out.push(RxUsed {
                    head: c.head,
                    len: k as u32,
                    bytes: (!c.scratch()).then_some(bytes),
                });
            }
            stats.rx_frames += 1;
            at = i;
        }
        out
    }

    /// Checks everything the device did since the last check.
    fn check(&mut self) {
        // Control first: it changes what the pairs may do.
        let q = self.ctrl_q();
        for (chain, len) in self.take_used(q) {
            self.check_command(&chain, len);
        }
        assert!(
            self.queues[q].pending.is_empty(),
            "control commands left unanswered"
        );
        if self.active_pairs > self.kicked_pairs {
            // A driver turning pairs on has posted their receive buffers
            // (taken at a doorbell). Frames to send need none: the device
            // sends them from any pair's queue.
            for pair in self.kicked_pairs..self.active_pairs {
                self.kick(2 * pair);
            }
            self.run();
            for (chain, len) in self.take_used(q) {
                self.check_command(&chain, len);
            }
        }
        self.kicked_pairs = self.active_pairs;
        let active = self.device().device().active_pairs() as usize;
        assert_eq!(active, self.active_pairs, "active queue pairs");
        for pair in 0..self.pairs {
            if pair >= self.queue_pairs() {
                // No queues: the device reads none of its frames.
                assert_eq!(
                    self.peers[pair].device_has_input(),
                    !self.frames[pair].is_empty(),
                    "pair {pair}: frames read without queues"
                );
                continue;
            }
            // Receive.
            let expected = if pair < self.active_pairs {
                self.model_rx(pair)
            } else {
                Vec::new()
            };
            let used = self.take_used(2 * pair);
            assert_eq!(
                used.iter().map(|(c, l)| (c.head, *l)).collect::<Vec<_>>(),
                expected.iter().map(|e| (e.head, e.len)).collect::<Vec<_>>(),
                "pair {pair}: receive used entries (head, len)"
            );
            for ((chain, len), e) in used.iter().zip(&expected) {
                if let Some(bytes) = &e.bytes {
                    let got = chain.read(&self.mem, u64::from(*len));
                    if got != *bytes {
                        let at = got.iter().zip(bytes).position(|(a, b)| a != b);
                        panic!(
                            "pair {pair}: frame bytes in chain {} ({len} bytes) differ from {at:?}: {:?} {:?}",
                            chain.head,
                            &got[..got.len().min(16)],
                            &bytes[..bytes.len().min(16)]
                        );
                    }
                }
            }
            // The device read exactly the frames the model did.
            assert_eq!(
                self.peers[pair].device_has_input(),
                !self.frames[pair].is_empty(),
                "pair {pair}: frames left unread (device, model)"
            );
            // Transmit.
            let max = self.max_write[pair];
            for (chain, _) in self.take_used(2 * pair + 1) {
                match chain.buffers(false) {
                    Some(len) if len >= NET_HDR_LEN as u64 && len as usize <= max => {
                        self.stats.tx_frames += 1;
                        let s = chain.tx_bytes.clone().ok_or(len as usize);
                        self.sent[pair].push_back(Sent::Frame(s));
                    }
                    _ => self.stats.tx_dropped += 1,
                }
            }
            if pair < self.active_pairs && !self.queues[2 * pair + 1].pending.is_empty() {
                assert!(
                    !self.peers[pair].device_can_write(),
                    "pair {pair}: transmit stopped with the back end writable"
                );
                let w = self.dev.lifecycle().watched_fds()[pair];
                assert!(
                    w.interest.write,
                    "pair {pair}: blocked, not watching for output"
                );
            }
        }
        // The device's position in each ring: where the chains not yet
        // used start.
        for (i, vq) in self.queues.iter().enumerate() {
            let dev_next = self.dev.device().queues()[i].next_avail();
            let expect = vq.next_avail.wrapping_sub(vq.pending.len() as u16);
            assert_eq!(dev_next, expect, "queue {i}: the device's next_avail");
        }
        let s = self.device().device().stats();
        use std::sync::atomic::Ordering::Relaxed;
        let got = Stats {
            rx_frames: s.rx_frames.load(Relaxed),
            rx_dropped: s.rx_dropped.load(Relaxed),
            tx_frames: s.tx_frames.load(Relaxed),
            tx_dropped: s.tx_dropped.load(Relaxed),
        };
        assert_eq!(got, self.stats, "counters");
        self.check_offloads();
    }

    fn check_offloads(&mut self) {
        let want = offload_flags(self.guest_offloads.unwrap_or(self.features));
        assert_eq!(self.device().device().offloads(), want, "offloads");
        for p in &self.peers {
            assert_eq!(p.offloads(), want, "back end offloads");
        }
    }

    /// The ack the device must have written for the control chain, and
    /// what the command changes.
    fn check_command(&mut self, chain: &Chain, len: u32) {
        let mut input = Vec::new();
        let mut output_len = 0u64;
        let mut ok = chain.descs.len() <= MAX_IOV;
        let mut out_scratch = false;
        let mut out_in_memory = true;
        for d in &chain.descs {
            if d.write {
                out_in_memory &= in_memory(d.addr, d.len);
                ok &= in_memory(d.addr, d.len);
                output_len += u64::from(d.len);
                out_scratch |= d.scratch;
            } else {
                ok &= output_len == 0 && in_memory(d.addr, d.len);
                if in_memory(d.addr, d.len) && !d.scratch {
                    let mut b = vec![0u8; d.len as usize];
                    self.mem.read_slice(&mut b, GuestAddress(d.addr)).unwrap();
                    input.extend_from_slice(&b);
                } else {
                    // Unknown bytes: the answer is not checked.
                    ok = false;
                    out_scratch = true;
                }
            }
        }
        let expect_len = u32::from(output_len > 0);
        if !out_in_memory {
            // Part of the output outside memory: the ack goes somewhere.
            assert!(u64::from(len) <= output_len);
            return;
        }
        assert_eq!(len, expect_len, "control used length");
        let ack = if ok && input.len() >= 2 {
            self.command(input[0], input[1], &input[2..])
        } else if out_scratch {
            return;
        } else {
            ctrl::ERR
        };
        if output_len > 0 && !out_scratch {
            let last = chain
                .descs
                .iter()
                .rev()
                .find(|d| d.write && d.len > 0)
                .unwrap();
            let got: u8 = self
                .mem
                .read_obj(GuestAddress(last.addr + u64::from(last.len) - 1))
                .unwrap();
            assert_eq!(
                got,
                ack,
                "control ack of {:?}",
                &input[..input.len().min(10)]
            );
        }
    }

    /// The device model's answer to a command, applied to the model.
    fn command(&mut self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        match (class, cmd) {
            (ctrl::RX, 0..=5) | (ctrl::MAC, ctrl::MAC_TABLE_SET) | (ctrl::VLAN, 0 | 1) => ctrl::OK,
            (ctrl::MAC, ctrl::MAC_ADDR_SET) if data.len() >= 6 => {
                if data[0] & 1 != 0 || data[..6] == [0; 6] {
                    return ctrl::ERR;
                }
                self.mac.copy_from_slice(&data[..6]);
                ctrl::OK
            }
            (ctrl::ANNOUNCE, 0) => ctrl::OK,
            (ctrl::MQ, 0) if data.len() >= 2 => {
                let n = usize::from(u16::from_le_bytes([data[0], data[1]]));
                if !self.acked(feature::MQ) || n == 0 || n > self.pairs {
                    return ctrl::ERR;
                }
                self.active_pairs = n;
                ctrl::OK
            }
            (ctrl::GUEST_OFFLOADS, 0) if data.len() >= 8 => {
                let wanted = u64::from_le_bytes(data[..8].try_into().unwrap());
                let allowed = self.features
                    & (feature::GUEST_CSUM
                        | feature::GUEST_TSO4
                        | feature::GUEST_TSO6
                        | feature::GUEST_ECN);
                if !self.acked(feature::CTRL_GUEST_OFFLOADS) || wanted & !allowed != 0 {
                    return ctrl::ERR;
                }
                self.guest_offloads = Some(wanted);
                ctrl::OK
            }
            _ => ctrl::ERR,
        }
    }

    /// Reads what pair `pair`'s peer got; each frame must be the next one
    /// expected.
    fn drain(&mut self, pair: usize) {
        while let Some(frame) = self.peers[pair].recv().expect("peer recv") {
            match self.sent[pair].pop_front() {
                Some(Sent::Filler) => assert_eq!(frame.len(), FILL_FRAME_LEN, "filler"),
                Some(Sent::Frame(Ok(bytes))) => {
                    assert!(frame == bytes, "pair {pair}: transmitted frame bytes")
                }
                Some(Sent::Frame(Err(len))) => {
                    assert_eq!(frame.len(), len, "pair {pair}: transmitted frame length")
                }
                None => panic!("pair {pair}: a frame nobody sent ({} bytes)", frame.len()),
            }
        }
    }

    fn pair(&self, b: u8) -> usize {
        usize::from(b) % self.pairs
    }

    /// A pair with queues.
    fn queue_pair(&self, b: u8) -> usize {
        usize::from(b) % self.queue_pairs()
    }

    // --- operations -------------------------------------------------

    fn step(&mut self, r: &mut Reader, seq: u32) {
        let tag = r.u8() % op::COUNT;
        let at = r.remaining();
        match tag {
            op::RX => {
                let pair = self.queue_pair(r.u8());
                let spec = ChainSpec::decode(r);
                self.post(2 * pair, &spec, true, seq);
            }
            op::TX => {
                let pair = self.queue_pair(r.u8());
                let seed = u32::from(r.u8()) << 8 | seq;
                let spec = ChainSpec::decode(r);
                self.post(2 * pair + 1, &spec, false, seed);
            }
            op::CTRL => {
                let (class, cmd, shape) = (r.u8(), r.u8(), r.u8());
                let n = usize::from(r.u8() % 64);
                let data = r.bytes(n).to_vec();
                self.post_command(class, cmd, shape, &data);
            }
            op::INJECT => {
                let pair = self.pair(r.u8());
                let scale = r.u8();
                let v = usize::from(r.u16());
                let len = match scale % 8 {
                    0 => v % 16,
                    1 => 12 + v % 64,
                    2 => v % 1600,
                    3 => v % 9100,
                    4 => MAX_FRAME as usize - 8 + v % 16,
                    5 => v % 0x12000 + 0x8000,
                    6 => 60 + v % 200,
                    _ => v,
                };
                let seed = u32::from(r.u8());
                let header = r.bytes(10).to_vec();
                let mut frame = pattern(seed, len);
                let h = header.len().min(len);
                frame[..h].copy_from_slice(&header[..h]);
                if self.peers[pair].send(&frame).is_ok() {
                    self.frames[pair].push_back(frame);
                }
            }
            op::DRAIN => {
                let pair = self.pair(r.u8());
                self.drain(pair);
            }
            op::FILL => {
                let pair = self.pair(r.u8());
                for _ in 0..self.peers[pair].fill() {
                    self.sent[pair].push_back(Sent::Filler);
                }
            }
            op::KICK => {
                let q = usize::from(r.u8()) % (2 * self.pairs + 2);
                self.kick(q);
            }
            op::CONFIG => {
                let offset = u64::from(r.u8() % 16);
                let len = usize::from(r.u8() % 9);
                let mut b = vec![0u8; len];
                self.bar_read(DEVICE_CFG_OFFSET + offset, &mut b);
                let start = offset as usize;
                let mut c = [0u8; 16];
                c[..6].copy_from_slice(&self.mac);
                // The link bit follows a once-a-second poll: not checked.
                if (start..start + len).contains(&6) {
                    b[6 - start] &= !1;
                }
                c[8] = self.pairs as u8;
                c[10..12].copy_from_slice(&1500u16.to_le_bytes());
                let expect: Vec<u8> = (0..len).map(|i| *c.get(start + i).unwrap_or(&0)).collect();
                assert_eq!(b, expect, "config space at {offset}");
            }
            op::RESET => {
                self.check();
                self.bring_up();
            }
            _ => {
                let pair = self.pair(r.u8());
                self.link[pair] = !self.link[pair];
                self.peers[pair].set_link(self.link[pair]);
            }
        }
        if trace() {
            eprintln!(
                "op {seq}: tag {tag}, {} input bytes; stats {:?}; frames {:?}, pending {:?}",
                at - r.remaining(),
                self.stats,
                self.frames
                    .iter()
                    .map(|f| f.iter().map(|f| f.len()).collect::<Vec<_>>())
                    .collect::<Vec<_>>(),
                self.queues
                    .iter()
                    .map(|q| q
                        .pending
                        .iter()
                        .map(|c| (c.head, c.buffers(true), c.buffers(false)))
                        .collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            );
        }
        self.run();
        self.check();
    }

    /// A control command of `class`/`cmd` with `data`, in a chain shaped
    /// by `shape`: bits 0-1 how the command is split (one buffer, header
    /// and data, a descriptor per byte up to 4), bits 2-3 the ack (1 byte,
    /// none, 4 bytes, 2 buffers), bit 4 a readable buffer after the ack,
    /// bit 5 an indirect table, bit 6 the ack outside guest memory.
    fn post_command(&mut self, class: u8, cmd: u8, shape: u8, data: &[u8]) {
        let mut bytes = vec![class, cmd];
        bytes.extend_from_slice(data);
        let mut pieces: Vec<(Vec<u8>, bool)> = Vec::new();
        match shape & 3 {
            0 => pieces.push((bytes, false)),
            1 => {
                pieces.push((bytes[..2].to_vec(), false));
                pieces.push((bytes[2..].to_vec(), false));
            }
            _ => {
                let k = bytes.len().min(4);
                for b in &bytes[..k] {
                    pieces.push((vec![*b], false));
                }
                pieces.push((bytes[k..].to_vec(), false));
            }
        }
        match (shape >> 2) & 3 {
            0 => pieces.push((vec![0xee], true)),
            1 => {}
            2 => pieces.push((vec![0xee; 4], true)),
            _ => {
                pieces.push((vec![0xee], true));
                pieces.push((vec![0xee], true));
            }
        }
        if shape & 0x10 != 0 {
            pieces.push((vec![0xaa], false));
        }
        let mut descs = Vec::new();
        for (i, (b, write)) in pieces.iter().enumerate() {
            let oom = shape & 0x40 != 0 && *write && i + 1 == pieces.len();
            let addr = if oom {
                Some(0x40000 + 0x20)
            } else {
                self.alloc(b.len() as u64)
            };
            let Some(addr) = addr else { return };
            if !oom {
                self.mem.write_slice(b, GuestAddress(addr)).unwrap();
            }
            descs.push(PDesc {
                addr,
                len: b.len() as u32,
                write: *write,
                scratch: false,
            });
        }
        let q = self.ctrl_q();
        let indirect = shape & 0x20 != 0 && self.acked(feature::INDIRECT_DESC);
        let raw: Vec<(u64, u32, u16)> = if indirect {
            let mut table = Writer::default();
            for (i, d) in descs.iter().enumerate() {
                let mut flags = if d.write { D_WRITE } else { 0 };
                if i + 1 < descs.len() {
                    flags |= D_NEXT;
                }
                table.u64(d.addr).u32(d.len).u16(flags).u16(i as u16 + 1);
            }
            let Some(t) = self.alloc(table.0.len() as u64) else {
                return;
            };
            self.mem.write_slice(&table.0, GuestAddress(t)).unwrap();
            vec![(t, table.0.len() as u32, D_INDIRECT)]
        } else {
            descs
                .iter()
                .map(|d| (d.addr, d.len, if d.write { D_WRITE } else { 0 }))
                .collect()
        };
        let vq = &mut self.queues[q];
        if vq.free.len() < raw.len() {
            return;
        }
        let slots: Vec<u16> = (0..raw.len()).map(|_| vq.free.pop().unwrap()).collect();
        for (i, &(addr, len, mut flags)) in raw.iter().enumerate() {
            let next = if i + 1 < raw.len() {
                flags |= D_NEXT;
                slots[i + 1]
            } else {
                0
            };
            let mut w = Writer::default();
            w.u64(addr).u32(len).u16(flags).u16(next);
            self.mem
                .write_slice(&w.0, GuestAddress(vq.desc + 16 * u64::from(slots[i])))
                .unwrap();
        }
        let chain = Chain {
            head: slots[0],
            slots,
            descs,
            tx_bytes: None,
        };
        self.publish(q, chain);
    }

    /// Lets everything settle: the peers read all, the device sends the
    /// rest; then nothing may be left but receive buffers without frames,
    /// frames without buffers, and chains of pairs not in use.
    fn finish(&mut self) {
        for _ in 0..64 {
            for pair in 0..self.pairs {
                self.drain(pair);
            }
            self.run();
            self.check();
            let busy = (0..self.active_pairs).any(|p| !self.queues[2 * p + 1].pending.is_empty());
            if !busy {
                break;
            }
        }
        for pair in 0..self.pairs {
            self.drain(pair);
            assert!(self.sent[pair].is_empty(), "pair {pair}: frames never sent");
            if pair < self.active_pairs {
                assert!(
                    self.queues[2 * pair + 1].pending.is_empty(),
                    "pair {pair}: transmit chains left"
                );
            }
        }
    }
}

/// Whether to describe each operation on stderr (`NET_QUEUE_TRACE` set),
/// to follow an input that fails.
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("NET_QUEUE_TRACE").is_some())
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let features = r.u64();
    let sizes = r.u8();
    let mut h = Harness::new(flags, features, sizes);
    h.bring_up();
    if trace() {
        eprintln!(
            "pairs {}, features {:#x}, sizes {:?}",
            h.pairs, h.features, h.sizes
        );
    }
    let mut seq = 0;
    while !r.is_empty() && seq < MAX_OPS as u32 {
        h.step(&mut r, seq);
        seq += 1;
    }
    h.finish();
}
