//! The test-side virtio-pci driver, as a VMM's guest would run it: split
//! virtqueues in guest RAM ([`GuestRam`], a memfd shared with the device
//! by DMA_MAP), driven through a [`Transport`]: a vfio-user connection,
//! exactly as Cloud Hypervisor drives a `--user-device` (the published
//! `vfio_user::Client`, or the raw-socket [`RawClient`], which can also
//! send the migration commands the published client cannot), or a device
//! called in-process ([`InProcess`]).
//!
//! Everything goes through the transport, so every test runs the same
//! driver whatever it talks to. Besides the usual bring-up
//! ([`VirtioDriver::init`]), its steps are there one at a time (status,
//! features, queues, interrupts), descriptors can be placed as a test
//! wants them ([`Desc`], [`VirtioDriver::place_chain`],
//! [`VirtioDriver::write_desc`]: any flags, indirect tables, chains into
//! holes of guest RAM laid out with [`GuestRam::with_regions`]), and every
//! signal of an interrupt is counted ([`Interrupt`]).
//!
//! The same driver (same guest memory, queues and indices) can move from
//! one connection to another ([`VirtioDriver::attach_to`],
//! [`VirtioDriver::replace_transport`]), as a VMM does across a migration
//! or a restore.
//!
//! virtio-blk requests are built by [`VirtioDriver::blk_request`] and
//! friends (fresh buffers per request, for tests) or by
//! [`VirtioDriver::blk_push`] on buffers allocated once with
//! [`VirtioDriver::blk_buffers`] (for benchmarks that run millions of
//! requests). Failures panic: this is test and benchmark code.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vfio_user::Client;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use crate::guest_ram::{GuestRam, RamRegion, GUEST_BASE, GUEST_SIZE};
pub use crate::in_process::InProcess;
pub use crate::transport::{
    Transport, CONFIG_REGION, INTX_INDEX, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE, MSIX_INDEX,
};
use crate::RawClient;

/// The PCI command register, and its memory space and bus master bits.
const PCI_COMMAND: u64 = 0x04;
const COMMAND_MEMORY: u64 = 1 << 1;
const COMMAND_BUS_MASTER: u64 = 1 << 2;

/// virtio-blk request type: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// virtio-blk request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// virtio-blk request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// virtio-blk request type: get the serial.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// virtio-blk request type: discard.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// virtio-blk request type: write zeroes.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// virtio-blk status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// virtio-blk status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// virtio-blk status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Feature `VIRTIO_BLK_F_RO` (as a mask).
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature `VIRTIO_BLK_F_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Feature `VIRTIO_BLK_F_MQ`.
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// Feature `VIRTIO_BLK_F_DISCARD`.
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
/// Feature `VIRTIO_BLK_F_WRITE_ZEROES`.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
/// Feature `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Feature `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Feature `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Descriptor flag: the chain continues in `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes the buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Used ring flag: the device does not want doorbells.
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// PCI capability id: power management.
pub const PCI_CAP_ID_PM: u8 = 0x01;
/// PCI capability id: vendor specific (the virtio structures).
pub const PCI_CAP_ID_VNDR: u8 = 0x09;
/// PCI capability id: PCI Express.
pub const PCI_CAP_ID_EXP: u8 = 0x10;
/// PCI capability id: MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;

/// virtio PCI capability type: common configuration.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// virtio PCI capability type: notifications.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// virtio PCI capability type: ISR status.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// virtio PCI capability type: device configuration.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// virtio PCI capability type: PCI configuration access.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// Device status bits.
pub mod device_status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device needs a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// Offsets of the common configuration structure's fields.
pub mod common_cfg {
    /// `device_feature_select`.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// `device_feature`.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// `driver_feature_select`.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// `driver_feature`.
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// `config_msix_vector`.
    pub const MSIX_CONFIG: u64 = 0x10;
    /// `num_queues`.
    pub const NUM_QUEUES: u64 = 0x12;
    /// `device_status`.
    pub const DEVICE_STATUS: u64 = 0x14;
    /// `config_generation`.
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// `queue_select`.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// `queue_size`.
    pub const QUEUE_SIZE: u64 = 0x18;
    /// `queue_msix_vector`.
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// `queue_enable`.
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// `queue_notify_off`.
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// `queue_desc`, low half.
    pub const QUEUE_DESC_LO: u64 = 0x20;
    /// `queue_desc`, high half.
    pub const QUEUE_DESC_HI: u64 = 0x24;
    /// `queue_driver` (the available ring), low half.
    pub const QUEUE_AVAIL_LO: u64 = 0x28;
    /// `queue_driver`, high half.
    pub const QUEUE_AVAIL_HI: u64 = 0x2c;
    /// `queue_device` (the used ring), low half.
    pub const QUEUE_USED_LO: u64 = 0x30;
    /// `queue_device`, high half.
    pub const QUEUE_USED_HI: u64 = 0x34;
    /// Size of the structure.
    pub const SIZE: u32 = 0x38;
}

use common_cfg::*;
use device_status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};

/// How long a wait for the device lasts before the test fails.
const WAIT_LIMIT: Duration = Duration::from_secs(10);
/// How long one sleep of a wait lasts (a wait checks its deadline and the
/// rings between sleeps).
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Where a virtio structure lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapLoc {
    /// BAR index.
    pub bar: u32,
    /// Offset in the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

/// A capability of the device's PCI capability list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciCap {
    /// Capability id.
    pub id: u8,
    /// Where it is in config space.
    pub offset: u64,
}

/// A virtio PCI capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCap {
    /// `cfg_type`.
    pub cfg_type: u8,
    /// Where the capability is in config space.
    pub offset: u64,
    /// Where the structure it describes is.
    pub loc: CapLoc,
}

/// An interrupt the driver takes from the device: the eventfd it gives the
/// device with SET_IRQS, and the signals that the driver's own waits
/// consumed and nobody has taken yet, so that a wait never hides an
/// interrupt from a test.
pub struct Interrupt {
    eventfd: EventFd,
    consumed: u64,
}

impl Interrupt {
    fn new() -> Interrupt {
        Interrupt {
            eventfd: EventFd::new(EFD_NONBLOCK).unwrap(),
            consumed: 0,
        }
    }

    /// The eventfd (to poll it; reading it bypasses [`Interrupt::take`]).
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// How many times the device signalled it since the last take.
    pub fn take(&mut self) -> u64 {
        std::mem::take(&mut self.consumed) + self.eventfd.read().unwrap_or(0)
    }

    /// Whether the device signalled it since the last take (takes it).
    pub fn fired(&mut self) -> bool {
        self.take() > 0
    }

    /// Clears the eventfd, keeping the count for [`Interrupt::take`].
    fn consume(&mut self) {
        self.consumed += self.eventfd.read().unwrap_or(0);
    }
}

/// One descriptor as the driver writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u32,
    /// `VIRTQ_DESC_F_*` (chains get `NEXT` from the driver).
    pub flags: u16,
}

impl Desc {
    /// A buffer the device reads.
    pub const fn readable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
        }
    }

    /// A buffer the device writes.
    pub const fn writable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: VIRTQ_DESC_F_WRITE,
        }
    }

    /// A table of descriptors, `len` bytes at `table`.
    pub const fn indirect(table: u64, len: u32) -> Desc {
        Desc {
            addr: table,
            len,
            flags: VIRTQ_DESC_F_INDIRECT,
        }
    }
}

/// Writes `desc` as descriptor `index` of the table at `table`.
#[inline]
fn write_desc(ram: &GuestRam, table: u64, index: u16, desc: Desc, next: u16) {
    // len, flags and next in one store.
    let tail = u64::from(desc.len) | u64::from(desc.flags) << 32 | u64::from(next) << 48;
    ram.write_u64s(table + 16 * u64::from(index), &[desc.addr, tail]);
}

/// One split virtqueue in guest RAM.
#[derive(Clone, Debug)]
pub struct Vq {
    /// Number of descriptors.
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
    /// The driver's next `avail.idx`.
    pub next_avail: u16,
    /// The used entries collected so far.
    pub last_used: u16,
    /// `queue_notify_off` read from the device.
    pub notify_off: u16,
    /// The MSI-X vector of the queue.
    pub vector: u16,
    /// The driver's `next` of every descriptor: the free list and the
    /// chains made available. Kept here, as Linux keeps them beside the
    /// ring, so that whatever the device or a test writes into the table
    /// cannot corrupt them.
    links: Vec<u16>,
    /// Per descriptor, the length of the chain made available that it
    /// heads (0: it heads none).
    chain_len: Vec<u16>,
    /// Head of the free list.
    free_head: u16,
    /// Descriptors on the free list.
    num_free: u16,
}

impl Vq {
    fn new(size: u16, desc: u64, avail: u64, used: u64, notify_off: u16, vector: u16) -> Vq {
        Vq {
            size,
            desc,
            avail,
            used,
            next_avail: 0,
            last_used: 0,
            notify_off,
            vector,
            links: (1..=u32::from(size))
                .map(|i| (i % u32::from(size)) as u16)
                .collect(),
            chain_len: vec![0; usize::from(size)],
            free_head: 0,
            num_free: size,
        }
    }

    /// Guest address of `used_event` (at the end of the available ring).
    pub fn used_event_addr(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }

    /// Guest address of `avail_event` (at the end of the used ring).
    pub fn avail_event_addr(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }

    /// Descriptors not in a chain made available.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Returns the chain headed by `head` to the free list, if the driver
    /// made one available there (a test may publish heads of its own).
    fn free_chain(&mut self, head: u16) {
        let Some(&n) = self.chain_len.get(usize::from(head)) else {
            return;
        };
        if n == 0 {
            return;
        }
        let mut tail = head;
        for _ in 1..n {
            tail = self.links[usize::from(tail)];
        }
        self.links[usize::from(tail)] = self.free_head;
        self.free_head = head;
        self.num_free += n;
        self.chain_len[usize::from(head)] = 0;
    }
}

/// A submitted virtio-blk request and the guest addresses it uses.
#[derive(Clone, Debug)]
pub struct BlkReq {
    /// Queue index.
    pub queue: usize,
    /// Head descriptor (the request's id).
    pub head: u16,
    /// The 16-byte request header (device-readable).
    pub header: u64,
    /// The status byte (device-writable).
    pub status: u64,
    /// Data the device reads (`OUT` and friends), when the driver built
    /// the data buffers.
    pub data_out: Option<(u64, u32)>,
    /// Data the device writes (`IN`, `GET_ID`), when the driver built the
    /// data buffers.
    pub data_in: Option<(u64, u32)>,
}

/// Writes a virtio-blk request header at `at`.
#[inline]
fn write_blk_header(ram: &GuestRam, at: u64, req_type: u32, sector: u64) {
    // The type and the reserved word in one store.
    ram.write_u64s(at, &[u64::from(req_type), sector]);
}

/// A virtio-pci driver over a [`Transport`] (by default the published
/// `vfio_user::Client`, as Cloud Hypervisor).
pub struct VirtioDriver<T: Transport = Client> {
    /// The way to the device.
    pub transport: T,
    /// Guest RAM, DMA-mapped into the device.
    pub ram: GuestRam,
    /// Every capability of the PCI capability list, in list order.
    pub pci_caps: Vec<PciCap>,
    /// Every virtio PCI capability, in list order.
    pub virtio_caps: Vec<VirtioCap>,
    /// The common configuration structure.
    pub common: CapLoc,
    /// The notification area.
    pub notify: CapLoc,
    /// `notify_off_multiplier`.
    pub notify_mult: u32,
    /// The ISR status byte.
    pub isr: CapLoc,
    /// The device configuration space.
    pub device: CapLoc,
    /// The queues set up by [`VirtioDriver::setup_queues`].
    pub queues: Vec<Vq>,
    /// The MSI-X interrupts by vector (as many as the MSI-X capability
    /// has); [`VirtioDriver::init`] uses 0 for configuration changes and
    /// `i + 1` for queue `i`.
    pub msix: Vec<Interrupt>,
    /// The INTx interrupt.
    pub intx: Interrupt,
    /// The negotiated features.
    pub features: u64,
    /// BAR sizes found by sizing (0: no BAR).
    pub bar_sizes: [u64; 6],
    /// Submitted requests not yet collected.
    pending: Vec<BlkReq>,
    /// Completed heads not yet collected.
    done: HashSet<(usize, u16)>,
}

impl VirtioDriver<Client> {
    /// Connects like Cloud Hypervisor: VERSION + regions (in Client::new),
    /// DMA_MAP of guest RAM, BAR sizing, capability walk.
    pub fn connect(socket: &Path) -> VirtioDriver<Client> {
        let client = Client::new(socket).expect("vfio_user::Client::new");
        VirtioDriver::connect_with(client)
    }
}

impl VirtioDriver<RawClient> {
    /// The same over the raw client (VERSION with QEMU-like capabilities,
    /// no region queries).
    pub fn connect_raw(socket: &Path) -> VirtioDriver<RawClient> {
        VirtioDriver::connect_with(RawClient::connect_negotiated(socket))
    }

    /// The raw client (migration commands).
    pub fn raw(&mut self) -> &mut RawClient {
        &mut self.transport
    }
}

impl<T: Transport> VirtioDriver<T> {
    /// Fresh guest RAM ([`GuestRam::new`]) mapped into the device, BARs
    /// sized, memory space and bus mastering on (as firmware and the
    /// guest's PCI core leave them), capabilities found; the device is not
    /// initialised.
    pub fn connect_with(transport: T) -> VirtioDriver<T> {
        VirtioDriver::connect_with_ram(transport, GuestRam::new())
    }

    /// The same with `ram`, every region of it DMA-mapped.
    pub fn connect_with_ram(mut transport: T, ram: GuestRam) -> VirtioDriver<T> {
        ram.map_into(&mut transport);
        let mut d = VirtioDriver {
            transport,
            ram,
            pci_caps: Vec::new(),
            virtio_caps: Vec::new(),
            common: CapLoc::default(),
            notify: CapLoc::default(),
            notify_mult: 0,
            isr: CapLoc::default(),
            device: CapLoc::default(),
            queues: Vec::new(),
            msix: Vec::new(),
            intx: Interrupt::new(),
            features: 0,
            bar_sizes: [0; 6],
            pending: Vec::new(),
            done: HashSet::new(),
        };
        d.bar_sizes = d.size_bars();
        d.set_bus_master(true);
        d.find_caps();
        d
    }

    /// Turns bus mastering on or off (the rest of the command register
    /// as [`VirtioDriver::connect_with_ram`] left it).
    pub fn set_bus_master(&mut self, on: bool) {
        let bits = if on {
            COMMAND_MEMORY | COMMAND_BUS_MASTER
        } else {
            COMMAND_MEMORY
        };
        self.cfg_write(PCI_COMMAND, 2, bits);
    }

    /// The MSI-X eventfds by vector.
    pub fn msix_fds(&self) -> Vec<RawFd> {
        self.msix.iter().map(|i| i.eventfd.as_raw_fd()).collect()
    }

    /// Gives another connection what the VMM gives every device: DMA_MAP
    /// of the SAME guest memory and SET_IRQS with the SAME MSI-X eventfds
    /// (the VMM's irqfds). Nothing is written to the device itself.
    pub fn attach_to(&self, other: &mut impl Transport) {
        self.ram.map_into(other);
        let fds = self.msix_fds();
        if !fds.is_empty() {
            other.set_irq_eventfds(MSIX_INDEX, 0, &fds);
        }
    }

    /// Continues on `transport` (already attached with
    /// [`VirtioDriver::attach_to`]); returns the old one.
    pub fn replace_transport(&mut self, transport: T) -> T {
        std::mem::replace(&mut self.transport, transport)
    }

    /// [`VirtioDriver::attach_to`] then [`VirtioDriver::replace_transport`]:
    /// the driver carries on with a device restored from a snapshot.
    pub fn reconnect(&mut self, mut transport: T) -> T {
        self.attach_to(&mut transport);
        self.replace_transport(transport)
    }

    /// Reads `len` bytes (at most 8) at `offset` of region `index`, as a
    /// little-endian number.
    pub fn region_read(&mut self, index: u32, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.transport.read_region(index, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Writes the `len` (at most 8) low bytes of `value` at `offset` of
    /// region `index`, little-endian.
    pub fn region_write(&mut self, index: u32, offset: u64, len: usize, value: u64) {
        self.transport
            .write_region(index, offset, &value.to_le_bytes()[..len]);
    }

    /// Reads `len` bytes (at most 8) of PCI config space at `offset`.
    pub fn cfg_read(&mut self, offset: u64, len: usize) -> u64 {
        self.region_read(CONFIG_REGION, offset, len)
    }

    /// Writes `len` bytes (at most 8) of PCI config space at `offset`.
    pub fn cfg_write(&mut self, offset: u64, len: usize, value: u64) {
        self.region_write(CONFIG_REGION, offset, len, value)
    }

    /// Sizes the BARs through config space, as Cloud Hypervisor does.
    fn size_bars(&mut self) -> [u64; 6] {
        let mut sizes = [0u64; 6];
        let mut i = 0;
        while i < 6 {
            let reg = 0x10 + 4 * i as u64;
            let low = self.probe_bar_register(reg);
            if low == 0 {
                i += 1;
                continue;
            }
            let is_io = low & 1 == 1;
            let is_64 = !is_io && (low >> 1) & 3 == 2;
            let mut mask = if is_io { low & !3 } else { low & !0xf };
            if is_64 {
                mask |= self.probe_bar_register(reg + 4) << 32;
            } else {
                mask |= 0xffff_ffff_0000_0000;
            }
            sizes[i] = (!mask).wrapping_add(1);
            i += if is_64 { 2 } else { 1 };
        }
        sizes
    }

    /// Writes all ones to the BAR register at `reg`, reads what stuck and
    /// puts the original value back.
    fn probe_bar_register(&mut self, reg: u64) -> u64 {
        let original = self.cfg_read(reg, 4);
        self.cfg_write(reg, 4, 0xffff_ffff);
        let mask = self.cfg_read(reg, 4);
        self.cfg_write(reg, 4, original);
        mask
    }

    /// Walks the capability list: records every capability, where the
    /// virtio structures are, and makes one [`Interrupt`] per MSI-X vector.
    fn find_caps(&mut self) {
        assert!(self.cfg_read(6, 2) & 0x10 != 0, "no capability list");
        let mut at = self.cfg_read(0x34, 1) & 0xfc;
        // A well-formed list has at most 48 entries; a loop stops there.
        while at != 0 && self.pci_caps.len() < 48 {
            let id = self.cfg_read(at, 1) as u8;
            self.pci_caps.push(PciCap { id, offset: at });
            match id {
                PCI_CAP_ID_VNDR => self.read_virtio_cap(at),
                PCI_CAP_ID_MSIX => {
                    let vectors = (self.cfg_read(at + 2, 2) & 0x7ff) + 1;
                    self.msix = (0..vectors).map(|_| Interrupt::new()).collect();
                }
                _ => {}
            }
            at = self.cfg_read(at + 1, 1) & 0xfc;
        }
        assert!(self.common.length >= SIZE, "no common cfg capability");
        assert!(self.notify.length > 0, "no notify capability");
    }

    /// Records the virtio capability at `at`.
    fn read_virtio_cap(&mut self, at: u64) {
        let cap = VirtioCap {
            cfg_type: self.cfg_read(at + 3, 1) as u8,
            offset: at,
            loc: CapLoc {
                bar: self.cfg_read(at + 4, 1) as u32,
                offset: self.cfg_read(at + 8, 4),
                length: self.cfg_read(at + 12, 4) as u32,
            },
        };
        match cap.cfg_type {
            VIRTIO_PCI_CAP_COMMON_CFG => self.common = cap.loc,
            VIRTIO_PCI_CAP_NOTIFY_CFG => {
                self.notify = cap.loc;
                self.notify_mult = self.cfg_read(at + 16, 4) as u32;
            }
            VIRTIO_PCI_CAP_ISR_CFG => self.isr = cap.loc,
            VIRTIO_PCI_CAP_DEVICE_CFG => self.device = cap.loc,
            _ => {}
        }
        self.virtio_caps.push(cap);
    }

    /// Where the first capability with `id` is in config space.
    pub fn find_cap(&self, id: u8) -> Option<u64> {
        self.pci_caps.iter().find(|c| c.id == id).map(|c| c.offset)
    }

    /// The first virtio capability of type `cfg_type`.
    pub fn virtio_cap(&self, cfg_type: u8) -> Option<VirtioCap> {
        self.virtio_caps
            .iter()
            .find(|c| c.cfg_type == cfg_type)
            .copied()
    }

    /// Writes `len` bytes (at most 8) of `value` at `offset` of the common
    /// configuration structure.
    pub fn common_write(&mut self, offset: u64, len: usize, value: u64) {
        let (bar, base) = (self.common.bar, self.common.offset);
        self.region_write(bar, base + offset, len, value);
    }

    /// Reads `len` bytes (at most 8) at `offset` of the common
    /// configuration structure.
    pub fn common_read(&mut self, offset: u64, len: usize) -> u64 {
        let (bar, base) = (self.common.bar, self.common.offset);
        self.region_read(bar, base + offset, len)
    }

    /// The device status.
    pub fn status(&mut self) -> u8 {
        self.common_read(DEVICE_STATUS, 1) as u8
    }

    /// Writes the device status.
    pub fn set_status(&mut self, s: u8) {
        self.common_write(DEVICE_STATUS, 1, u64::from(s));
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&mut self) -> u64 {
        self.common_write(DEVICE_FEATURE_SELECT, 4, 0);
        let lo = self.common_read(DEVICE_FEATURE, 4);
        self.common_write(DEVICE_FEATURE_SELECT, 4, 1);
        let hi = self.common_read(DEVICE_FEATURE, 4);
        lo | (hi << 32)
    }

    /// Writes the 64 feature bits the driver accepts.
    pub fn write_driver_features(&mut self, features: u64) {
        self.common_write(DRIVER_FEATURE_SELECT, 4, 0);
        self.common_write(DRIVER_FEATURE, 4, features & 0xffff_ffff);
        self.common_write(DRIVER_FEATURE_SELECT, 4, 1);
        self.common_write(DRIVER_FEATURE, 4, features >> 32);
    }

    /// Reads back the 64 feature bits the driver accepted.
    pub fn driver_features(&mut self) -> u64 {
        self.common_write(DRIVER_FEATURE_SELECT, 4, 0);
        let lo = self.common_read(DRIVER_FEATURE, 4);
        self.common_write(DRIVER_FEATURE_SELECT, 4, 1);
        let hi = self.common_read(DRIVER_FEATURE, 4);
        lo | (hi << 32)
    }

    /// Reads `len` bytes (at most 8) at `offset` of the device
    /// configuration space.
    pub fn device_config(&mut self, offset: u64, len: usize) -> u64 {
        let (bar, base) = (self.device.bar, self.device.offset);
        self.region_read(bar, base + offset, len)
    }

    /// Reads (and so clears) the ISR status byte.
    pub fn isr_status(&mut self) -> u8 {
        let (bar, base) = (self.isr.bar, self.isr.offset);
        self.region_read(bar, base, 1) as u8
    }

    /// Gives the device the MSI-X eventfds, one per vector (SET_IRQS).
    pub fn install_msix(&mut self) {
        let fds = self.msix_fds();
        assert!(!fds.is_empty(), "no MSI-X capability");
        self.transport.set_irq_eventfds(MSIX_INDEX, 0, &fds);
    }

    /// Gives the device the INTx eventfd (SET_IRQS).
    pub fn install_intx(&mut self) {
        let fd = self.intx.eventfd.as_raw_fd();
        self.transport.set_irq_eventfds(INTX_INDEX, 0, &[fd]);
    }

    /// Sets or clears the MSI-X Enable bit of the MSI-X capability.
    pub fn set_msix_enable(&mut self, on: bool) {
        let cap = self.find_cap(PCI_CAP_ID_MSIX).expect("no MSI-X capability");
        let control = self.cfg_read(cap + 2, 2);
        let control = if on {
            control | 0x8000
        } else {
            control & !0x8000
        };
        self.cfg_write(cap + 2, 2, control);
    }

    /// Enables MSI-X the way Cloud Hypervisor does: SET_IRQS first, then
    /// the enable bit.
    pub fn enable_msix(&mut self) {
        self.install_msix();
        self.set_msix_enable(true);
    }

    /// Writes the MSI-X vector of configuration changes.
    pub fn set_config_vector(&mut self, vector: u16) {
        self.common_write(MSIX_CONFIG, 2, u64::from(vector));
    }

    /// Turns bus mastering on, resets the device and negotiates `want` &
    /// offered, as a guest does (ACKNOWLEDGE, DRIVER, features,
    /// FEATURES_OK, which must stick).
    /// Returns the negotiated features.
    pub fn negotiate(&mut self, want: u64) -> u64 {
        // As a guest driver's probe does first (`pci_set_master`): after a
        // device reset the command register is back to power-on.
        self.set_bus_master(true);
        self.set_status(0);
        assert_eq!(self.status(), 0);
        self.set_status(ACKNOWLEDGE);
        self.set_status(ACKNOWLEDGE | DRIVER);
        let features = self.device_features() & want;
        self.write_driver_features(features);
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert!(self.status() & FEATURES_OK != 0, "FEATURES_OK refused");
        self.features = features;
        features
    }

    /// Sets up every queue with `size` descriptors (or the device's
    /// maximum, if smaller) and MSI-X vector `i + 1` for queue `i`, rings
    /// in fresh guest RAM, then sets DRIVER_OK.
    pub fn setup_queues(&mut self, size: u16) {
        let nq = self.common_read(NUM_QUEUES, 2) as u16;
        self.queues.clear();
        self.pending.clear();
        self.done.clear();
        for q in 0..nq {
            self.common_write(QUEUE_SELECT, 2, u64::from(q));
            let size = size.min(self.common_read(QUEUE_SIZE, 2) as u16);
            self.common_write(QUEUE_SIZE, 2, u64::from(size));
            let vector = q + 1;
            self.common_write(QUEUE_MSIX_VECTOR, 2, u64::from(vector));
            let n = u64::from(size);
            let desc = self.ram.alloc(16 * n, 4096);
            let avail = self.ram.alloc(6 + 2 * n, 2);
            let used = self.ram.alloc(6 + 8 * n, 4096);
            for (reg, addr) in [
                (QUEUE_DESC_LO, desc),
                (QUEUE_AVAIL_LO, avail),
                (QUEUE_USED_LO, used),
            ] {
                // Two 32-bit halves, as Linux writes them.
                self.common_write(reg, 4, addr & 0xffff_ffff);
                self.common_write(reg + 4, 4, addr >> 32);
            }
            let notify_off = self.common_read(QUEUE_NOTIFY_OFF, 2) as u16;
            self.common_write(QUEUE_ENABLE, 2, 1);
            self.queues
                .push(Vq::new(size, desc, avail, used, notify_off, vector));
        }
        let s = self.status();
        self.set_status(s | DRIVER_OK);
    }

    /// Full initialisation: reset, features (`want` & offered), vector 0
    /// for configuration changes, MSI-X, every queue with `size`
    /// descriptors and vector i+1, DRIVER_OK. Returns the negotiated
    /// features.
    pub fn init(&mut self, want: u64, size: u16) -> u64 {
        let features = self.negotiate(want);
        self.set_config_vector(0);
        self.enable_msix();
        self.setup_queues(size);
        features
    }

    /// Writes `desc` as descriptor `index` of the descriptor table at
    /// `table` (a queue's or an indirect one), with `next` as given.
    pub fn write_desc(&self, table: u64, index: u16, desc: Desc, next: u16) {
        write_desc(&self.ram, table, index, desc, next);
    }

    /// Writes `descs` as one chain at the start of the descriptor table at
    /// `table` (descriptor i+1 follows i) and returns the indirect
    /// descriptor for it.
    pub fn write_indirect_table(&self, table: u64, descs: &[Desc]) -> Desc {
        for (i, d) in descs.iter().enumerate() {
            let mut d = *d;
            if i + 1 < descs.len() {
                d.flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(table, i as u16, d, i as u16 + 1);
        }
        Desc::indirect(table, 16 * descs.len() as u32)
    }

    /// Writes `descs` as a chain into free descriptors of queue `q`
    /// (`NEXT` added to all but the last, other flags as given) and returns
    /// its head, without making it available.
    pub fn place_chain(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let vq = &mut self.queues[q];
        let n = descs.len() as u16;
        assert!(
            n > 0 && n <= vq.num_free,
            "test bug: descriptor table of queue {q} would overflow"
        );
        let head = vq.free_head;
        let mut idx = head;
        for (i, d) in descs.iter().enumerate() {
            let next = vq.links[usize::from(idx)];
            let mut d = *d;
            if i + 1 < descs.len() {
                d.flags |= VIRTQ_DESC_F_NEXT;
                write_desc(&self.ram, vq.desc, idx, d, next);
                idx = next;
            } else {
                write_desc(&self.ram, vq.desc, idx, d, next);
                vq.free_head = next;
            }
        }
        vq.num_free -= n;
        vq.chain_len[usize::from(head)] = n;
        head
    }

    /// Makes `head` available on queue `q` (its slot, then `avail.idx`);
    /// does not notify.
    pub fn publish(&mut self, q: usize, head: u16) {
        let vq = &mut self.queues[q];
        let slot = vq.avail + 4 + 2 * u64::from(vq.next_avail % vq.size);
        self.ram.write_u16(slot, head);
        vq.next_avail = vq.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.ram.write_u16(vq.avail + 2, vq.next_avail);
    }

    /// Places `descs` as a chain on queue `q` and makes it available;
    /// returns its head; does not notify.
    pub fn push(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let head = self.place_chain(q, descs);
        self.publish(q, head);
        head
    }

    /// Notifies queue `q` (a BAR write, as the guest's doorbell).
    pub fn kick(&mut self, q: usize) {
        let (bar, off) = self.notify_register(q);
        self.transport
            .write_region(bar, off, &(q as u16).to_le_bytes());
    }

    /// Region index and offset of queue `q`'s notify register (what
    /// [`VirtioDriver::kick`] writes `q` to).
    pub fn notify_register(&self, q: usize) -> (u32, u64) {
        let off = self.notify.offset + self.queues[q].notify_off as u64 * self.notify_mult as u64;
        (self.notify.bar, off)
    }

    /// Whether queue `q` needs a doorbell for the buffers added since
    /// its `avail.idx` was `old` (Linux's `virtqueue_kick_prepare`): with
    /// `VIRTIO_F_EVENT_IDX` when the device's available event lies in
    /// `[old, next_avail)`, otherwise unless the device set
    /// `VRING_USED_F_NO_NOTIFY`.
    pub fn kick_needed(&self, q: usize, old: u16) -> bool {
        fence(Ordering::SeqCst);
        let vq = &self.queues[q];
        if self.features & VIRTIO_RING_F_EVENT_IDX != 0 {
            let avail_event = self.ram.read_u16(vq.avail_event_addr());
            vq.next_avail.wrapping_sub(avail_event).wrapping_sub(1)
                < vq.next_avail.wrapping_sub(old)
        } else {
            self.ram.read_u16(vq.used) & VIRTQ_USED_F_NO_NOTIFY == 0
        }
    }

    /// Asks for an interrupt at the next used entry of queue `q` (Linux's
    /// `virtqueue_enable_cb`: `used_event` under EVENT_IDX); returns false
    /// if entries arrived meanwhile, so the caller collects them instead of
    /// sleeping.
    pub fn enable_interrupt(&mut self, q: usize) -> bool {
        let vq = &self.queues[q];
        if self.features & VIRTIO_RING_F_EVENT_IDX != 0 {
            self.ram.write_u16(vq.used_event_addr(), vq.last_used);
        }
        fence(Ordering::SeqCst);
        self.ram.read_u16(vq.used + 2) == vq.last_used
    }

    /// One round trip (a read of the device status): the device does the
    /// work a transport access leaves after it (a server after its reply,
    /// [`InProcess`] before returning), so once this returns the device
    /// has worked on the queues the earlier doorbells marked (at least one
    /// batch of each). A device that did nothing by then is not going to.
    pub fn settle(&mut self) {
        self.status();
    }

    /// The interrupt of queue `q`'s vector.
    pub fn queue_interrupt(&mut self, q: usize) -> &mut Interrupt {
        let vector = usize::from(self.queues[q].vector);
        &mut self.msix[vector]
    }

    /// Lets the device work for up to `timeout`, waking early when queue
    /// `q`'s interrupt fires; the signal stays counted for
    /// [`Interrupt::take`].
    fn wait_interrupt(&mut self, q: usize, timeout: Duration) {
        let vector = usize::from(self.queues[q].vector);
        match self.msix.get_mut(vector) {
            Some(irq) => {
                self.transport.wait(&[irq.eventfd.as_raw_fd()], timeout);
                irq.consume();
            }
            None => self.transport.wait(&[], timeout),
        }
    }

    /// Waits (up to 10 s) until the device's `used.idx` of queue `q` is
    /// `idx`, without collecting the entries.
    #[track_caller]
    pub fn wait_used_idx(&mut self, q: usize, idx: u16) {
        let deadline = Instant::now() + WAIT_LIMIT;
        while self.used_idx(q) != idx {
            assert!(
                Instant::now() < deadline,
                "used.idx of queue {q} stuck at {}, want {idx}",
                self.used_idx(q)
            );
            self.transport.wait(&[], Duration::from_millis(1));
        }
    }

    /// The device's `used.idx` of queue `q`, read from guest RAM.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.ram.read_u16(self.queues[q].used + 2)
    }

    /// Collects the used entries `(head, len)` of queue `q` that are there
    /// now (no waiting), returning their chains to the free list.
    pub fn poll_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        self.poll_used_into(q, &mut out);
        out
    }

    /// [`VirtioDriver::poll_used`] appending to `out` (no allocation once
    /// `out` has grown); returns the number of entries appended.
    pub fn poll_used_into(&mut self, q: usize, out: &mut Vec<(u16, u32)>) -> usize {
        fence(Ordering::SeqCst);
        let used_idx = self.used_idx(q);
        let before = out.len();
        let vq = &mut self.queues[q];
        while vq.last_used != used_idx {
            let e = vq.used + 4 + 8 * u64::from(vq.last_used % vq.size);
            vq.last_used = vq.last_used.wrapping_add(1);
            let id = self.ram.read_u32(e);
            let len = self.ram.read_u32(e + 4);
            let Ok(head) = u16::try_from(id) else {
                panic!("used entry of queue {q} with id {id}, not a descriptor index");
            };
            out.push((head, len));
            vq.free_chain(head);
        }
        out.len() - before
    }

    /// Collects used entries `(head, len)` of queue `q` until `n` arrived,
    /// asking for an interrupt ([`VirtioDriver::enable_interrupt`]) and
    /// waiting for it when there are none.
    #[track_caller]
    pub fn wait_used(&mut self, q: usize, n: usize) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut out = Vec::new();
        loop {
            self.poll_used_into(q, &mut out);
            if out.len() >= n {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for used entries"
            );
            if self.enable_interrupt(q) {
                self.wait_interrupt(q, WAIT_SLICE);
            }
        }
    }

    /// Waits up to 5 s for queue `q`'s interrupt; returns how many times
    /// it fired since it was last taken (panics on timeout).
    #[track_caller]
    pub fn expect_interrupt(&mut self, q: usize) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.queue_interrupt(q).take();
            if n > 0 {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "no interrupt on queue {q}'s vector"
            );
            self.wait_interrupt(q, WAIT_SLICE);
        }
    }

    /// Forgets any interrupt already signalled on queue `q`'s vector.
    pub fn drain_interrupt(&mut self, q: usize) {
        self.queue_interrupt(q).take();
    }

    /// Allocates and writes a virtio-blk request header.
    pub fn blk_header(&mut self, req_type: u32, sector: u64) -> u64 {
        let header = self.ram.alloc(16, 16);
        write_blk_header(&self.ram, header, req_type, sector);
        header
    }

    /// Allocates a virtio-blk status byte, preset to 0xff (the device
    /// never writes that value).
    pub fn blk_status_buffer(&mut self) -> u64 {
        let status = self.ram.alloc(1, 1);
        self.ram.write_u8(status, 0xff);
        status
    }

    /// One virtio-blk request: returns (status, data read back).
    pub fn blk_request(
        &mut self,
        q: usize,
        req_type: u32,
        sector: u64,
        data: &[u8],
        data_in_len: u32,
    ) -> (u8, Vec<u8>) {
        let head = self.blk_submit(q, req_type, sector, data, data_in_len);
        self.kick(q);
        self.blk_complete(q, head)
    }

    /// Queues a request without kicking; returns its id (head).
    pub fn blk_submit(
        &mut self,
        q: usize,
        req_type: u32,
        sector: u64,
        data: &[u8],
        data_in_len: u32,
    ) -> u16 {
        self.blk_submit_req(q, req_type, sector, data, data_in_len)
            .head
    }

    /// Queues a request without kicking: `data` in a device-readable
    /// buffer, `data_in_len` bytes of device-writable buffer; returns where
    /// everything is.
    pub fn blk_submit_req(
        &mut self,
        q: usize,
        req_type: u32,
        sector: u64,
        data: &[u8],
        data_in_len: u32,
    ) -> BlkReq {
        let header = self.blk_header(req_type, sector);
        let status = self.blk_status_buffer();
        let mut bufs = Vec::with_capacity(2);
        let mut data_out = None;
        let mut data_in = None;
        if !data.is_empty() {
            let b = self.ram.alloc(data.len() as u64, 512);
            self.ram.write(b, data);
            bufs.push(Desc::readable(b, data.len() as u32));
            data_out = Some((b, data.len() as u32));
        }
        if data_in_len > 0 {
            let b = self.ram.alloc(u64::from(data_in_len), 512);
            bufs.push(Desc::writable(b, data_in_len));
            data_in = Some((b, data_in_len));
        }
        let mut req = self.submit_blk(q, header, &bufs, status);
        req.data_out = data_out;
        req.data_in = data_in;
        self.pending.push(req.clone());
        req
    }

    /// Queues a request without kicking whose data buffers are `data`,
    /// placed as given between the header and the status byte (any
    /// flags, addresses, lengths); returns where the header and the status
    /// are.
    pub fn blk_submit_descs(
        &mut self,
        q: usize,
        req_type: u32,
        sector: u64,
        data: &[Desc],
    ) -> BlkReq {
        let header = self.blk_header(req_type, sector);
        let status = self.blk_status_buffer();
        let req = self.submit_blk(q, header, data, status);
        self.pending.push(req.clone());
        req
    }

    /// Puts the chain header, `data`, status on queue `q`.
    fn submit_blk(&mut self, q: usize, header: u64, data: &[Desc], status: u64) -> BlkReq {
        let mut chain = Vec::with_capacity(data.len() + 2);
        chain.push(Desc::readable(header, 16));
        chain.extend_from_slice(data);
        chain.push(Desc::writable(status, 1));
        BlkReq {
            queue: q,
            head: self.push(q, &chain),
            header,
            status,
            data_out: None,
            data_in: None,
        }
    }

    /// Status and data-in of a submitted request whose used entry was
    /// collected (by [`VirtioDriver::poll_used`] or
    /// [`VirtioDriver::wait_used`]); forgets the request.
    pub fn take_result(&mut self, q: usize, head: u16) -> (u8, Vec<u8>) {
        self.done.remove(&(q, head));
        let i = self
            .pending
            .iter()
            .position(|m| m.queue == q && m.head == head)
            .expect("unknown request");
        let req = self.pending.remove(i);
        let status = self.ram.read_u8(req.status);
        let data = req
            .data_in
            .map(|(a, l)| self.ram.read(a, l as usize))
            .unwrap_or_default();
        (status, data)
    }

    /// Waits for request `head` on queue `q`; returns (status, data in).
    pub fn blk_complete(&mut self, q: usize, head: u16) -> (u8, Vec<u8>) {
        while !self.done.contains(&(q, head)) {
            for (id, _len) in self.wait_used(q, 1) {
                self.done.insert((q, id));
            }
        }
        self.take_result(q, head)
    }

    /// Allocates, once, the guest buffers of a virtio-blk request with
    /// `data_len` bytes of data, for [`VirtioDriver::blk_push`].
    pub fn blk_buffers(&mut self, data_len: u32) -> BlkBuffers {
        BlkBuffers {
            header: self.ram.alloc(16, 16),
            data: self.ram.alloc(u64::from(data_len), 4096),
            data_len,
            status: self.ram.alloc(1, 1),
        }
    }

    /// Queues a virtio-blk request of `req_type` at `sector` on `bufs`
    /// without kicking; returns its head. The data buffer is
    /// device-writable for [`VIRTIO_BLK_T_IN`] and device-readable for
    /// every other type; its contents are left as they are. Unlike
    /// [`VirtioDriver::blk_submit`] nothing is allocated and the request is
    /// not remembered: collect it with [`VirtioDriver::poll_used_into`] and
    /// read its status with [`BlkBuffers::status`]. `bufs` must not be in
    /// use by another request in flight.
    pub fn blk_push(&mut self, q: usize, req_type: u32, sector: u64, bufs: &BlkBuffers) -> u16 {
        write_blk_header(&self.ram, bufs.header, req_type, sector);
        self.ram.write_u8(bufs.status, 0xff);
        let data = if req_type == VIRTIO_BLK_T_IN {
            Desc::writable(bufs.data, bufs.data_len)
        } else {
            Desc::readable(bufs.data, bufs.data_len)
        };
        self.push(
            q,
            &[
                Desc::readable(bufs.header, 16),
                data,
                Desc::writable(bufs.status, 1),
            ],
        )
    }
}

/// The guest buffers of one reusable virtio-blk request (from
/// [`VirtioDriver::blk_buffers`]).
#[derive(Clone, Copy, Debug)]
pub struct BlkBuffers {
    /// The 16-byte request header.
    pub header: u64,
    /// The data buffer.
    pub data: u64,
    /// Its length in bytes.
    pub data_len: u32,
    /// The status byte.
    pub status: u64,
}

impl BlkBuffers {
    /// The status byte the device wrote (0xff until it completes).
    pub fn status(&self, ram: &GuestRam) -> u8 {
        ram.read_u8(self.status)
    }
}
