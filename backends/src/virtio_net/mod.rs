//! virtio-net (virtio spec 5.1) over [`NetBackend`]s, one per queue pair.
//!
//! Queues: receive and transmit for each pair (`2n`, `2n + 1`), then the
//! control queue. Frames carry the 12-byte `virtio_net_hdr_v1`, which the
//! back end (a TAP with `IFF_VNET_HDR`) reads and writes as is: checksum
//! and segmentation offloads pass through, and what the kernel may hand
//! the guest follows the features the guest acked (`TUNSETOFFLOAD`, at
//! activation and on `GUEST_OFFLOADS_SET`; cleared on reset).
//!
//! A back end's fd is watched for input only while its receive queue may
//! hold buffers (a readable TAP with nowhere to put the frame would spin
//! the event loop), and for output only after a write was refused
//! (`WouldBlock`), until it can take frames again. The link follows the
//! back end's (polled every second); a change raises a configuration
//! interrupt. After a restore the guest is asked to announce itself
//! (`GUEST_ANNOUNCE`).

mod header;
mod queues;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vfio_user_server::device::{DeviceContext, Interest, WatchedFd};
use vfio_user_server::event_loop::set_nonblocking;
use vfio_user_server::vm_migration::{MigratableError, Snapshot};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::Queue;
use vmm_sys_util::timerfd::TimerFd;

pub use self::header::{NetHeader, NET_HDR_LEN};
use self::queues::{control, receive, transmit, CtrlCommand, Rx, Tx, MAX_FRAME};
use crate::net::{offload_flags, NetBackend};
use crate::virtio::{
    GuestMemory, VirtioDevice, VirtioError, VirtioPciDevice, VirtioPciError, MAX_QUEUES,
};

/// Size of the control queue.
const CTRL_QUEUE_SIZE: u16 = 64;
/// Frames one wake-up of a back end's fd moves each way before the event
/// loop serves its other fds (the fd stays ready and comes back).
const FRAME_BUDGET: usize = 64;
/// How often the back end's link is looked at.
const LINK_POLL: Duration = Duration::from_secs(1);
/// Size of the configuration space we expose (`mac`, `status`,
/// `max_virtqueue_pairs`, `mtu`).
const CONFIG_SIZE: usize = 12;
/// Most queue pairs: two queues each, and the control queue.
pub const MAX_QUEUE_PAIRS: usize = (MAX_QUEUES - 1) / 2;

/// Acked features that control offloads the guest takes
/// (`GUEST_OFFLOADS_SET` may only name these).
const GUEST_OFFLOADS: u64 = (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN);

/// Errors creating a virtio-net device.
#[derive(Debug, Error)]
pub enum VirtioNetError {
    /// No back end, or more than [`MAX_QUEUE_PAIRS`].
    #[error("invalid number of queue pairs {0}")]
    InvalidQueuePairs(usize),
    /// `queue_size` is not a power of two in 2..=32768.
    #[error("invalid queue size {0}")]
    InvalidQueueSize(u16),
    /// The MAC is multicast (or all zeros).
    #[error("invalid MAC address {0}")]
    InvalidMac(String),
    /// The link poll timer could not be made.
    #[error("timer: {0}")]
    Timer(vmm_sys_util::errno::Error),
    /// The link poll timer could not be made non-blocking.
    #[error("timer: {0}")]
    TimerFlags(std::io::Error),
    /// The PCI transport could not be built.
    #[error("virtio-pci transport: {0}")]
    Transport(#[from] VirtioPciError),
}

/// Options of a virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioNetConfig {
    /// The guest's MAC address (unicast).
    pub mac: [u8; 6],
    /// The MTU advertised (`VIRTIO_NET_F_MTU`): the back end's.
    pub mtu: u16,
    /// Size of each receive and transmit queue.
    pub queue_size: u16,
    /// Offer checksum and segmentation offloads.
    pub offloads: bool,
    /// Present a PCI Express endpoint with a 4 KiB configuration space.
    pub pcie: bool,
}

impl Default for VirtioNetConfig {
    fn default() -> Self {
        VirtioNetConfig {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            mtu: 1500,
            queue_size: 256,
            offloads: true,
            pcie: true,
        }
    }
}

/// Counters of a virtio-net device, readable while it runs.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames handed to the guest.
    pub rx_frames: AtomicU64,
    /// Frames (or chains) dropped on receive: no fit, bad chain.
    pub rx_dropped: AtomicU64,
    /// Frames sent to the back end.
    pub tx_frames: AtomicU64,
    /// Frames dropped on transmit: bad chain, refused by the back end.
    pub tx_dropped: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Saved device state (the transport saves features and queues).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct NetState {
    mac: [u8; 6],
    /// The MAC a reset goes back to (the VM's own, whatever a driver
    /// set); `mac` in states of earlier daemons.
    #[serde(default)]
    configured_mac: Option<[u8; 6]>,
    active_pairs: u16,
    /// Offloads the guest set with `GUEST_OFFLOADS_SET` (acked features
    /// bits); `None` for what the acked features give.
    guest_offloads: Option<u64>,
}

/// A virtio-net device model.
pub struct VirtioNet {
    backends: Vec<Box<dyn NetBackend>>,
    /// The back ends' fds, then the link timer's.
    watched: Vec<WatchedFd>,
    link_timer: TimerFd,
    config: VirtioNetConfig,
    /// The MAC the device was configured with: a reset takes back the one
    /// a driver set.
    configured_mac: [u8; 6],
    avail_features: u64,
    acked_features: u64,
    active: bool,
    active_pairs: u16,
    /// Set by `GUEST_OFFLOADS_SET`.
    guest_offloads: Option<u64>,
    link_up: bool,
    announce: bool,
    config_changed: bool,
    /// A pair's receive ring was found empty, or its back end failed a
    /// read: its fd is not watched for input until the guest posts
    /// buffers, or (a failure) the next link poll tries it again.
    rx_waiting: Vec<bool>,
    /// A pair's back end failed a read (see `rx_waiting`).
    rx_failed: Vec<bool>,
    /// A pair's back end refused a frame: transmit waits for it to become
    /// writable.
    tx_blocked: Vec<bool>,
    /// Where the part of a frame beyond its first receive chain lands
    /// (see `queues::receive`).
    overflow: Vec<u8>,
    /// State of a restore, applied at activation.
    restored: Option<NetState>,
    stats: Arc<NetStats>,
}

impl VirtioNet {
    /// A device with one queue pair per back end.
    pub fn new(
        backends: Vec<Box<dyn NetBackend>>,
        config: VirtioNetConfig,
    ) -> Result<Self, VirtioNetError> {
        let pairs = backends.len();
        if pairs == 0 || pairs > MAX_QUEUE_PAIRS {
            return Err(VirtioNetError::InvalidQueuePairs(pairs));
        }
        let qs = config.queue_size;
        if qs < 2 || !qs.is_power_of_two() || qs > 32768 {
            return Err(VirtioNetError::InvalidQueueSize(qs));
        }
        if config.mac[0] & 1 != 0 || config.mac == [0; 6] {
            return Err(VirtioNetError::InvalidMac(format_mac(&config.mac)));
        }
        let bit = |b: u32| 1u64 << b;
        let mut features = bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MTU)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_GUEST_ANNOUNCE);
        if config.offloads {
            features |= bit(VIRTIO_NET_F_CSUM)
                | bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_HOST_TSO4)
                | bit(VIRTIO_NET_F_HOST_TSO6)
                | bit(VIRTIO_NET_F_HOST_ECN)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_ECN)
                | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);
        }
        if pairs > 1 {
            features |= bit(VIRTIO_NET_F_MQ);
        }
        let link_timer = TimerFd::new().map_err(VirtioNetError::Timer)?;
        // A readiness handled after the timer was re-armed (a reset and an
        // activation in between) must not block the loop for a period.
        set_nonblocking(link_timer.as_raw_fd()).map_err(VirtioNetError::TimerFlags)?;
        let mut watched: Vec<WatchedFd> = backends
            .iter()
            .map(|b| WatchedFd {
                fd: b.fd(),
                interest: Interest::NONE,
            })
            .collect();
        watched.push(WatchedFd {
            fd: link_timer.as_raw_fd(),
            interest: Interest::NONE,
        });
        let link_up = backends[0].link_up();
        Ok(VirtioNet {
            backends,
            watched,
            link_timer,
            configured_mac: config.mac,
            config,
            avail_features: features,
            acked_features: 0,
            active: false,
            active_pairs: 1,
            guest_offloads: None,
            link_up,
            announce: false,
            config_changed: false,
            rx_waiting: vec![false; pairs],
            rx_failed: vec![false; pairs],
            tx_blocked: vec![false; pairs],
            overflow: vec![0; 1],
            restored: None,
            stats: Arc::new(NetStats::default()),
        })
    }

    /// The counters.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    /// Queue pairs the guest uses now.
    pub fn active_pairs(&self) -> u16 {
        self.active_pairs
    }

    /// The `TUN_F_*` offloads in force.
    pub fn offloads(&self) -> u32 {
        offload_flags(self.guest_offloads.unwrap_or(self.acked_features))
    }

    fn pairs(&self) -> usize {
        self.backends.len()
    }

    /// The control queue follows the queue pairs the driver can use: all
    /// of them with multiqueue, one without (virtio 1.x 5.1.2).
    fn ctrl_queue(&self) -> usize {
        if self.acked(VIRTIO_NET_F_MQ) {
            2 * self.pairs()
        } else {
            2
        }
    }

    fn acked(&self, feature: u32) -> bool {
        self.acked_features & (1 << feature) != 0
    }

    /// Watches each back end for what its pair can do now.
    fn update_interest(&mut self) {
        for pair in 0..self.pairs() {
            let running = self.active && pair < usize::from(self.active_pairs);
            self.watched[pair].interest = Interest {
                read: running && !self.rx_waiting[pair],
                // Any pair's queue may send (see `process_queue`).
                write: self.active && self.tx_blocked[pair],
            };
        }
    }

    /// Applies the offloads in force to every back end.
    fn apply_offloads(&self) -> Result<(), std::io::Error> {
        let flags = if self.active { self.offloads() } else { 0 };
        for b in &self.backends {
            b.set_offload(flags)?;
        }
        Ok(())
    }

    /// Moves frames from pair `pair`'s back end into its receive queue, up
    /// to `budget`; returns how many chains were used.
    fn receive_frames(
        &mut self,
        pair: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        budget: usize,
    ) -> usize {
        let mut used = 0;
        for _ in 0..budget {
            let merge = self.acked(VIRTIO_NET_F_MRG_RXBUF);
            match receive(&*self.backends[pair], queue, mem, &mut self.overflow, merge) {
                Rx::Frame => {
                    used += 1;
                    count(&self.stats.rx_frames);
                    self.rx_failed[pair] = false;
                }
                Rx::Dropped => {
                    used += 1;
                    count(&self.stats.rx_dropped);
                    self.rx_failed[pair] = false;
                }
                Rx::Empty => break,
                Rx::NoBuffers => {
                    // Watched again when the guest posts buffers.
                    self.rx_waiting[pair] = true;
                    self.rx_failed[pair] = false;
                    break;
                }
                Rx::Failed(e) => {
                    // Once per failure, not per poll: the pair is tried
                    // again at the next link poll.
                    if !std::mem::replace(&mut self.rx_failed[pair], true) {
                        warn!("virtio-net: receive on pair {pair}: {e}");
                    }
                    self.rx_waiting[pair] = true;
                    break;
                }
            }
        }
        self.update_interest();
        used
    }

    /// Sends the frames of pair `pair`'s transmit queue, up to `budget`;
    /// returns how many chains were used.
    fn transmit_frames(
        &mut self,
        pair: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        budget: usize,
    ) -> usize {
        let mut used = 0;
        while used < budget && !self.tx_blocked[pair] {
            match transmit(&*self.backends[pair], queue, mem) {
                Tx::Sent => count(&self.stats.tx_frames),
                Tx::Dropped => count(&self.stats.tx_dropped),
                Tx::Empty => break,
                Tx::Blocked => {
                    self.tx_blocked[pair] = true;
                    break;
                }
            }
            used += 1;
        }
        self.update_interest();
        used
    }

    /// Answers one control command.
    fn command(&mut self, c: &CtrlCommand) -> u8 {
        let (ok, err) = (VIRTIO_NET_OK as u8, VIRTIO_NET_ERR as u8);
        let class = u32::from(c.class);
        let cmd = u32::from(c.cmd);
        match (class, cmd) {
            // Filtering is the host's business (the TAP takes every frame):
            // tolerated, as Linux waits for an answer.
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC..=VIRTIO_NET_CTRL_RX_NOBCAST)
            | (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET)
            | (VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD | VIRTIO_NET_CTRL_VLAN_DEL) => ok,
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) if c.len >= 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&c.data[..6]);
                // Unicast, as the constructor and restore take it.
                if mac[0] & 1 != 0 || mac == [0; 6] {
                    return err;
                }
                self.config.mac = mac;
                ok
            }
            (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => {
                self.announce = false;
                ok
            }
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if c.len >= 2 => {
                let n = u16::from_le_bytes([c.data[0], c.data[1]]);
                if !self.acked(VIRTIO_NET_F_MQ) || n == 0 || usize::from(n) > self.pairs() {
                    return err;
                }
                self.active_pairs = n;
                self.update_interest();
                ok
            }
            (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET) if c.len >= 8 => {
                let wanted = u64::from_le_bytes(c.data);
                if !self.guest_offloads_allowed(wanted) {
                    return err;
                }
                self.guest_offloads = Some(wanted);
                match self.apply_offloads() {
                    Ok(()) => ok,
                    Err(e) => {
                        warn!("virtio-net: setting offloads: {e}");
                        err
                    }
                }
            }
            _ => {
                debug!("virtio-net: control command {class}.{cmd} refused");
                err
            }
        }
    }

    /// Whether the driver may set the guest offloads `offloads`
    /// (`GUEST_OFFLOADS_SET`): only with that command negotiated, and only
    /// offloads it acked.
    fn guest_offloads_allowed(&self, offloads: u64) -> bool {
        self.acked(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
            && offloads & !(self.acked_features & GUEST_OFFLOADS) == 0
    }

    /// Looks at the back end's link after the timer fired.
    fn poll_link(&mut self) {
        // Non-blocking: EAGAIN if the expiry was taken already.
        let _ = self.link_timer.wait();
        // A back end that failed a read is watched again: without that, a
        // guest with a full receive ring (which never kicks it) would
        // receive nothing more after one error.
        let mut retry = false;
        for (failed, waiting) in self.rx_failed.iter().zip(self.rx_waiting.iter_mut()) {
            if *failed && *waiting {
                *waiting = false;
                retry = true;
            }
        }
        if retry {
            self.update_interest();
        }
        let up = self.backends[0].link_up();
        if up != self.link_up {
            debug!("virtio-net: link {}", if up { "up" } else { "down" });
            self.link_up = up;
            self.config_changed = true;
        }
    }

    fn state(&self) -> NetState {
        NetState {
            mac: self.config.mac,
            configured_mac: Some(self.configured_mac),
            active_pairs: self.active_pairs,
            guest_offloads: self.guest_offloads,
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let mut sizes = vec![self.config.queue_size; 2 * self.pairs()];
        sizes.push(CTRL_QUEUE_SIZE);
        sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; CONFIG_SIZE];
        c[..6].copy_from_slice(&self.config.mac);
        let mut status = 0;
        if self.link_up {
            status |= VIRTIO_NET_S_LINK_UP as u16;
        }
        if self.announce {
            status |= VIRTIO_NET_S_ANNOUNCE as u16;
        }
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&(self.pairs() as u16).to_le_bytes());
        c[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start < CONFIG_SIZE {
            let n = data.len().min(CONFIG_SIZE - start);
            data[..n].copy_from_slice(&c[start..start + n]);
        }
    }

    fn activate(&mut self, features: u64) -> Result<(), VirtioError> {
        self.acked_features = features & self.avail_features;
        let restored = self.restored.take();
        if let Some(s) = &restored {
            // What the control queue would have refused this driver.
            if s.active_pairs > 1 && !self.acked(VIRTIO_NET_F_MQ) {
                return Err(VirtioError::Activate(format!(
                    "{} active queue pairs restored without multiqueue negotiated",
                    s.active_pairs
                )));
            }
            if let Some(o) = s
                .guest_offloads
                .filter(|&o| !self.guest_offloads_allowed(o))
            {
                return Err(VirtioError::Activate(format!(
                    "restored guest offloads {o:#x}, negotiated {:#x}",
                    self.acked_features & GUEST_OFFLOADS
                )));
            }
        }
        self.active = true;
        self.active_pairs = restored.as_ref().map_or(1, |s| s.active_pairs.max(1));
        self.guest_offloads = restored.as_ref().and_then(|s| s.guest_offloads);
        // Without mergeable buffers, one byte tells a frame that did not
        // fit from one that filled its chain exactly.
        let overflow = if self.acked(VIRTIO_NET_F_MRG_RXBUF) {
            MAX_FRAME
        } else {
            1
        };
        self.overflow = vec![0; overflow];
        self.rx_waiting.fill(false);
        self.rx_failed.fill(false);
        self.tx_blocked.fill(false);
        self.apply_offloads()
            .map_err(|e| VirtioError::Activate(format!("TAP offloads: {e}")))?;
        self.link_up = self.backends[0].link_up();
        if restored.is_some() && self.acked(VIRTIO_NET_F_GUEST_ANNOUNCE) {
            // The guest moved: let its neighbours know where it is now.
            self.announce = true;
            self.config_changed = true;
        }
        if let Err(e) = self.link_timer.reset(LINK_POLL, Some(LINK_POLL)) {
            warn!("virtio-net: link polling off: {e}");
        }
        let timer = self.watched.len() - 1;
        self.watched[timer].interest = Interest::READ;
        self.update_interest();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = false;
        // A restored state not activated yet is the driver's no more: the
        // next activation is a new negotiation.
        self.restored = None;
        self.config.mac = self.configured_mac;
        self.acked_features = 0;
        self.active_pairs = 1;
        self.guest_offloads = None;
        self.announce = false;
        self.config_changed = false;
        self.overflow = vec![0; 1];
        if let Err(e) = self.apply_offloads() {
            warn!("virtio-net: clearing offloads: {e}");
        }
        let _ = self.link_timer.clear();
        for w in self.watched.iter_mut() {
            w.interest = Interest::NONE;
        }
        self.rx_waiting.fill(false);
        self.rx_failed.fill(false);
        self.tx_blocked.fill(false);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        budget: usize,
    ) -> Result<usize, VirtioError> {
        if index == self.ctrl_queue() {
            return Ok(control(queue, mem, budget, |c| self.command(c)));
        }
        let pair = index / 2;
        if pair >= self.pairs() {
            // Where the control queue is with multiqueue, without it.
            return Ok(0);
        }
        if !index.is_multiple_of(2) {
            // Frames are sent from any pair's queue: Linux may still send
            // on a pair it is turning on or off (and would wait forever
            // for chains left on the ring).
            return Ok(self.transmit_frames(pair, queue, mem, budget));
        }
        // The guest posted receive buffers: watch for frames again (at
        // once, or when the pair is turned on), and take those already
        // waiting.
        self.rx_waiting[pair] = false;
        if pair >= usize::from(self.active_pairs) {
            return Ok(0);
        }
        Ok(self.receive_frames(pair, queue, mem, budget))
    }

    fn watched_fds(&self) -> &[WatchedFd] {
        &self.watched
    }

    fn handle_event(
        &mut self,
        fd: RawFd,
        ready: Interest,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Vec<usize> {
        if fd == self.link_timer.as_raw_fd() {
            self.poll_link();
            return Vec::new();
        }
        let Some(pair) = self.backends.iter().position(|b| b.fd() == fd) else {
            return Vec::new();
        };
        let mut used = Vec::new();
        if ready.write && self.tx_blocked[pair] {
            self.tx_blocked[pair] = false;
            if let Some(q) = queues.get_mut(2 * pair + 1) {
                if self.transmit_frames(pair, q, mem, FRAME_BUDGET) > 0 {
                    used.push(2 * pair + 1);
                }
            }
        }
        if ready.read {
            if let Some(q) = queues.get_mut(2 * pair) {
                if self.receive_frames(pair, q, mem, FRAME_BUDGET) > 0 {
                    used.push(2 * pair);
                }
            }
        }
        self.update_interest();
        used
    }

    fn take_config_change(&mut self) -> bool {
        std::mem::take(&mut self.config_changed)
    }

    fn snapshot(&mut self) -> Result<Option<Snapshot>, MigratableError> {
        Snapshot::new_from_state(&self.state()).map(Some)
    }

    fn restore(&mut self, snapshot: Option<&Snapshot>) -> Result<(), MigratableError> {
        let Some(snapshot) = snapshot else {
            return Err(MigratableError::Restore("no virtio-net state".into()));
        };
        let state: NetState = snapshot.to_state()?;
        if usize::from(state.active_pairs) > self.pairs() {
            return Err(MigratableError::Restore(format!(
                "{} active queue pairs in the snapshot, {} here",
                state.active_pairs,
                self.pairs()
            )));
        }
        // What the constructor and the guest's MAC_ADDR_SET refuse. (An
        // all-zero MAC, which both refuse too, is taken: earlier daemons
        // let a guest set one, and their states must still move.)
        let configured = state.configured_mac.unwrap_or(state.mac);
        if let Some(bad) = [state.mac, configured].iter().find(|m| m[0] & 1 != 0) {
            return Err(MigratableError::Restore(format!(
                "MAC {} in the snapshot",
                format_mac(bad)
            )));
        }
        self.config.mac = state.mac;
        self.configured_mac = configured;
        self.restored = Some(state);
        Ok(())
    }
}

/// virtio-net behind the virtio PCI transport, ready for
/// [`vfio_user_server::pci::PciAdapter::new`].
pub type VirtioNetPci = VirtioPciDevice<VirtioNet>;

impl VirtioPciDevice<VirtioNet> {
    /// A virtio-net PCI function over `backends` (one per queue pair),
    /// with the guest memory and interrupts of `ctx`.
    pub fn new(
        ctx: DeviceContext,
        backends: Vec<Box<dyn NetBackend>>,
        config: VirtioNetConfig,
    ) -> Result<Self, VirtioNetError> {
        let pcie = config.pcie;
        let net = VirtioNet::new(backends, config)?;
        Ok(VirtioPciDevice::with_device(ctx, net, pcie)?)
    }
}
