//! The wire side of vfio-user migration v2: DEVICE_FEATURE (migration
//! flags, device state, dirty page logging), MIG_DATA_READ/WRITE streams,
//! and the device state machine that drives [`Device`] pause, resume,
//! snapshot and restore.

use log::{debug, info};

use super::connection::Reply;
use super::saved_state::{load_stream, save_stream};
use crate::device::Lifecycle;
use crate::guest_memory::{
    clear_dirty, mark_dirty, take_dirty_bitmap, DmaRange, GuestMemory, DIRTY_PAGE_SIZE,
};
use crate::irq::Irqs;
use crate::wire::*;

/// Most tracked 4 KiB pages one DMA_LOGGING_REPORT may cover (256 GiB).
pub(crate) const MAX_REPORT_TRACKED_PAGES: u64 = 1 << 26;

/// `vfio_user_device_mig_state` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MigState {
    /// Failed transition; only DEVICE_RESET leaves it.
    Error = 0,
    /// Stopped.
    Stop = 1,
    /// Running.
    Running = 2,
    /// Stopped, saving.
    StopCopy = 3,
    /// Receiving a saved state.
    Resuming = 4,
    /// Running, saving.
    PreCopy = 6,
}

impl MigState {
    fn from_u32(v: u32) -> Option<MigState> {
        Some(match v {
            0 => MigState::Error,
            1 => MigState::Stop,
            2 => MigState::Running,
            3 => MigState::StopCopy,
            4 => MigState::Resuming,
            6 => MigState::PreCopy,
            _ => return None,
        })
    }

    /// Next hop on the shortest path from `self` to `to` (libvfio-user's
    /// table; saving states are never interior steps).
    fn next_hop(self, to: MigState) -> Option<MigState> {
        use MigState::*;
        if self == to {
            return Some(to);
        }
        Some(match (self, to) {
            (_, Error) | (Error, _) => return None,
            (Stop, Running | StopCopy | Resuming) => to,
            (Stop, PreCopy) => Running,
            (Running, Stop | PreCopy) => to,
            (Running, StopCopy | Resuming) => Stop,
            (PreCopy, Running | StopCopy) => to,
            (PreCopy, Stop | Resuming) => Running,
            (StopCopy, Stop | Running | Resuming) => Stop,
            (StopCopy, PreCopy) => return None,
            (Resuming, _) => Stop,
            _ => return None,
        })
    }
}

/// What the state machine acts on: the device, its interrupts, and whether
/// the control socket holds it paused.
pub(crate) struct DeviceSide<'a> {
    /// The device.
    pub device: &'a mut dyn Lifecycle,
    /// Its interrupt state (saved with it).
    pub irqs: &'a Irqs,
    /// Paused through the control socket: never resumed by migration.
    pub held: bool,
}

/// Migration state of one server.
pub(crate) struct MigrationState {
    state: MigState,
    /// Outgoing stream (PRE_COPY/STOP_COPY) and read position.
    out: Vec<u8>,
    out_pos: usize,
    /// Incoming stream (RESUMING).
    incoming: Vec<u8>,
    logging: Option<u64>,
}

impl Default for MigrationState {
    fn default() -> Self {
        MigrationState {
            state: MigState::Running,
            out: Vec::new(),
            out_pos: 0,
            incoming: Vec::new(),
            logging: None,
        }
    }
}

fn head(flags: u32, data: &[u8]) -> Vec<u8> {
    let mut out = DeviceFeature {
        argsz: (DeviceFeature::SIZE + data.len()) as u32,
        flags,
    }
    .encode();
    out.extend_from_slice(data);
    out
}

impl MigrationState {
    /// The current state.
    pub(crate) fn state(&self) -> MigState {
        self.state
    }

    /// Client gone: back to RUNNING, streams dropped, logging off. A device
    /// the migration state stopped is resumed, unless the control socket
    /// holds it paused (`held`).
    pub(crate) fn reset(&mut self, device: &mut dyn Lifecycle, held: bool) {
        if self.logging.is_some() {
            if let Err(e) = device.stop_dirty_log() {
                log::warn!("stopping the device's dirty log: {e}");
            }
        }
        if self.device_stopped() && !held {
            let _ = device.resume();
        }
        *self = MigrationState::default();
    }

    /// Whether dirty page logging is on.
    pub(crate) fn dirty_logging(&self) -> bool {
        self.logging.is_some()
    }

    /// Whether the state holds the device stopped (no DMA, no interrupts).
    pub(crate) fn device_stopped(&self) -> bool {
        matches!(
            self.state,
            MigState::Stop | MigState::StopCopy | MigState::Resuming
        )
    }

    /// DEVICE_RESET: leaves ERROR (the device itself was reset).
    pub(crate) fn device_reset(&mut self) {
        if self.state == MigState::Error {
            self.state = MigState::Running;
            self.out.clear();
            self.incoming.clear();
        }
    }

    /// Whether `cmd` may run in the current state (every command may; the
    /// stricter gating of libvfio-user is not required by the spec).
    pub(crate) fn command_allowed(&self, _cmd: u16) -> bool {
        true
    }

    /// DEVICE_FEATURE.
    pub(crate) fn device_feature(
        &mut self,
        payload: &[u8],
        side: DeviceSide<'_>,
        mem: &GuestMemory,
        ranges: impl Iterator<Item = impl std::ops::Deref<Target = DmaRange>>,
        max_xfer: u32,
    ) -> Reply {
        let Ok(f) = DeviceFeature::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        let data = &payload[DeviceFeature::SIZE..];
        let feature = f.flags & DEVICE_FEATURE_MASK;
        let ops = f.flags & !DEVICE_FEATURE_MASK;
        let get = ops & DEVICE_FEATURE_GET != 0;
        let set = ops & DEVICE_FEATURE_SET != 0;
        let probe = ops & DEVICE_FEATURE_PROBE != 0;
        // PROBE alone asks whether the feature exists at all (the kernel
        // and libvfio-user answer success); otherwise GET or SET is needed.
        if ops & !(DEVICE_FEATURE_GET | DEVICE_FEATURE_SET | DEVICE_FEATURE_PROBE) != 0
            || (get && set && !probe)
            || (!get && !set && !probe)
            || (f.argsz as usize) < DeviceFeature::SIZE
        {
            return Reply::Err(libc::EINVAL);
        }
        if !side.device.migratable() {
            return Reply::Err(libc::ENOTSUP);
        }
        let (can_get, can_set) = match feature {
            DEVICE_FEATURE_MIGRATION => (true, false),
            DEVICE_FEATURE_MIG_DEVICE_STATE => (true, true),
            DEVICE_FEATURE_DMA_LOGGING_START | DEVICE_FEATURE_DMA_LOGGING_STOP => (false, true),
            DEVICE_FEATURE_DMA_LOGGING_REPORT => (true, false),
            _ => return Reply::Err(libc::EINVAL),
        };
        if (get && !can_get) || (set && !can_set) {
            return Reply::Err(libc::EINVAL);
        }
        if probe {
            return Reply::data(payload.to_vec());
        }
        match (feature, get) {
            (DEVICE_FEATURE_MIGRATION, _) => {
                let body = (MIGRATION_STOP_COPY | MIGRATION_PRE_COPY).to_le_bytes();
                if (f.argsz as usize) < DeviceFeature::SIZE + body.len() {
                    return Reply::Err(libc::EINVAL);
                }
                Reply::data(head(f.flags, &body))
            }
            (DEVICE_FEATURE_MIG_DEVICE_STATE, true) => {
                if (f.argsz as usize) < DeviceFeature::SIZE + 8 {
                    return Reply::Err(libc::EINVAL);
                }
                let mut body = (self.state as u32).to_le_bytes().to_vec();
                body.extend_from_slice(&u32::MAX.to_le_bytes());
                Reply::data(head(f.flags, &body))
            }
            (DEVICE_FEATURE_MIG_DEVICE_STATE, false) => {
                let Ok(want) = read_u32(data, 0) else {
                    return Reply::Err(libc::EINVAL);
                };
                if data.len() < 8 {
                    return Reply::Err(libc::EINVAL);
                }
                let Some(target) = MigState::from_u32(want) else {
                    return Reply::Err(libc::EINVAL);
                };
                match self.transition(target, side) {
                    Ok(()) => Reply::data(payload.to_vec()),
                    Err(e) => Reply::Err(e),
                }
            }
            (DEVICE_FEATURE_DMA_LOGGING_START, _) => {
                let (Ok(page), Ok(n)) = (read_u64(data, 0), read_u32(data, 8)) else {
                    return Reply::Err(libc::EINVAL);
                };
                let need = 16usize.saturating_add((n as usize).saturating_mul(16));
                if data.len() < need
                    || !page.is_power_of_two()
                    || page < DIRTY_PAGE_SIZE as u64
                    || self.logging.is_some_and(|p| p != page)
                {
                    return Reply::Err(libc::EINVAL);
                }
                if self.logging.is_none() {
                    clear_dirty(mem);
                    if let Err(e) = side.device.start_dirty_log() {
                        log::warn!("the device cannot log dirty pages: {e}");
                        return Reply::Err(libc::EIO);
                    }
                }
                self.logging = Some(page);
                info!("dirty page logging started ({page} byte pages)");
                Reply::data(payload.to_vec())
            }
            (DEVICE_FEATURE_DMA_LOGGING_STOP, _) => {
                if self.logging.take().is_some() {
                    if let Err(e) = side.device.stop_dirty_log() {
                        log::warn!("stopping the device's dirty log: {e}");
                    }
                }
                Reply::data(payload.to_vec())
            }
            (DEVICE_FEATURE_DMA_LOGGING_REPORT, _) => {
                let (Ok(iova), Ok(length), Ok(page)) =
                    (read_u64(data, 0), read_u64(data, 8), read_u64(data, 16))
                else {
                    return Reply::Err(libc::EINVAL);
                };
                // As the kernel does, the iova must sit on the 4 KiB grid.
                if self.logging.is_none()
                    || !page.is_power_of_two()
                    || page < DIRTY_PAGE_SIZE as u64
                    || !iova.is_multiple_of(DIRTY_PAGE_SIZE as u64)
                    || length == 0
                    || iova.checked_add(length).is_none()
                {
                    return Reply::Err(libc::EINVAL);
                }
                // The range must lie in mapped memory.
                let covered = ranges
                    .into_iter()
                    .any(|r| r.address <= iova && iova + length <= r.address + r.size);
                if !covered {
                    return Reply::Err(libc::EINVAL);
                }
                // The walk visits every tracked 4 KiB page: a huge report
                // page must not buy an unbounded walk (256 GiB per report,
                // about a tenth of a second; larger reports are split).
                if length / DIRTY_PAGE_SIZE as u64 > MAX_REPORT_TRACKED_PAGES {
                    return Reply::Err(libc::EINVAL);
                }
                let bitmap_len = length.div_ceil(page).div_ceil(64) * 8;
                if bitmap_len > max_xfer as u64
                    || (f.argsz as u64) < (DeviceFeature::SIZE + 24) as u64 + bitmap_len
                {
                    return Reply::Err(libc::EINVAL);
                }
                // Pages the device wrote behind vm-memory's back join the
                // bitmaps first, so none is lost to a report elsewhere.
                match side.device.dirty_log() {
                    Ok(table) => {
                        for r in &table.data {
                            mark_dirty(mem, r.gpa, r.length);
                        }
                    }
                    Err(e) => {
                        log::warn!("the device's dirty log: {e}");
                        return Reply::Err(libc::EIO);
                    }
                }
                let Some(bitmap) = take_dirty_bitmap(mem, iova, length, page) else {
                    return Reply::Err(libc::EINVAL);
                };
                let mut body = data[..24].to_vec();
                body.extend_from_slice(&bitmap);
                Reply::data(head(f.flags, &body))
            }
            _ => Reply::Err(libc::EINVAL),
        }
    }

    /// Walks to `target` one direct arc at a time.
    fn transition(&mut self, target: MigState, mut side: DeviceSide<'_>) -> Result<(), i32> {
        // ERROR is where a failed arc lands, never a state to ask for (the
        // kernel refuses it too, even in ERROR).
        if target == MigState::Error {
            return Err(libc::EINVAL);
        }
        while self.state != target {
            let next = self.state.next_hop(target).ok_or(libc::EINVAL)?;
            self.arc(next, &mut side)?;
        }
        Ok(())
    }

    fn arc(&mut self, to: MigState, side: &mut DeviceSide<'_>) -> Result<(), i32> {
        let (device, irqs, held) = (&mut *side.device, side.irqs, side.held);
        use MigState::*;
        let from = self.state;
        debug!("migration state {from:?} -> {to:?}");
        let fail = |s: &mut Self, what: String| {
            crate::warn_limited!("migration {from:?} -> {to:?} failed: {what}");
            s.state = Error;
            libc::EIO
        };
        match (from, to) {
            (Running, Stop) => {
                if let Err(e) = device.pause() {
                    return Err(fail(self, e.to_string()));
                }
            }
            (Stop, Running) => {
                // A device the control socket paused stays paused.
                if !held {
                    if let Err(e) = device.resume() {
                        return Err(fail(self, e.to_string()));
                    }
                }
            }
            (Running, PreCopy) => {
                if let Err(e) = device.start_migration() {
                    return Err(fail(self, e.to_string()));
                }
                // Everything the device has is saved in STOP_COPY; nothing
                // is worth sending while it still runs.
                self.out.clear();
                self.out_pos = 0;
            }
            (PreCopy, Running) => {
                self.out = Vec::new();
                self.out_pos = 0;
            }
            (StopCopy, Stop) => {
                self.out = Vec::new();
                self.out_pos = 0;
                // The client read the state (or gave up on it): the
                // source's part of the migration is over.
                if let Err(e) = device.complete_migration() {
                    return Err(fail(self, e.to_string()));
                }
            }
            (PreCopy, StopCopy) | (Stop, StopCopy) => {
                if from == Stop {
                    if let Err(e) = device.start_migration() {
                        return Err(fail(self, e.to_string()));
                    }
                }
                if from == PreCopy {
                    if let Err(e) = device.pause() {
                        return Err(fail(self, e.to_string()));
                    }
                }
                match save_stream(device, irqs) {
                    Ok(b) => {
                        self.out = b;
                        self.out_pos = 0;
                    }
                    Err(e) => return Err(fail(self, e.to_string())),
                }
            }
            (Stop, Resuming) => self.incoming.clear(),
            (Resuming, Stop) => {
                let bytes = std::mem::take(&mut self.incoming);
                if let Err(e) = load_stream(device, irqs, &bytes) {
                    // The device keeps its previous state; a bad stream is
                    // refused, not half-applied.
                    crate::warn_limited!("refusing migration stream: {e}");
                    self.state = Stop;
                    return Err(libc::EINVAL);
                }
            }
            _ => return Err(libc::EINVAL),
        }
        self.state = to;
        Ok(())
    }

    /// MIG_DATA_READ.
    pub(crate) fn data_read(&mut self, payload: &[u8], client_max_xfer: u32) -> Reply {
        let Ok(req) = MigData::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if !matches!(self.state, MigState::PreCopy | MigState::StopCopy)
            || req.size > client_max_xfer
            || (req.argsz as u64) < MigData::SIZE as u64 + req.size as u64
        {
            return Reply::Err(libc::EINVAL);
        }
        let left = self.out.len() - self.out_pos;
        let n = left.min(req.size as usize);
        let mut out = MigData {
            argsz: (MigData::SIZE + n) as u32,
            size: n as u32,
        }
        .encode();
        out.extend_from_slice(&self.out[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        Reply::data(out)
    }

    /// MIG_DATA_WRITE.
    pub(crate) fn data_write(&mut self, payload: &[u8], max_bytes: usize) -> Reply {
        let Ok(req) = MigData::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        let data = &payload[MigData::SIZE..];
        if self.state != MigState::Resuming
            || data.len() != req.size as usize
            || (req.argsz as usize) < MigData::SIZE + data.len()
        {
            return Reply::Err(libc::EINVAL);
        }
        if self.incoming.len() + data.len() > max_bytes {
            return Reply::Err(libc::EFBIG);
        }
        self.incoming.extend_from_slice(data);
        Reply::empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(r: Reply) -> Option<i32> {
        match r {
            Reply::Err(e) => Some(e),
            Reply::Ok(..) => None,
        }
    }

    #[test]
    fn incoming_stream_is_bounded_and_state_gated() {
        let mut m = MigrationState::default();
        let chunk = |n: usize| {
            let mut p = MigData {
                argsz: (MigData::SIZE + n) as u32,
                size: n as u32,
            }
            .encode();
            p.resize(MigData::SIZE + n, 7);
            p
        };
        // Not RESUMING: refused.
        assert_eq!(errno(m.data_write(&chunk(8), 100)), Some(libc::EINVAL));
        m.state = MigState::Resuming;
        assert_eq!(errno(m.data_write(&chunk(60), 100)), None);
        // Past the limit: EFBIG, and what came before is kept.
        assert_eq!(errno(m.data_write(&chunk(60), 100)), Some(libc::EFBIG));
        assert_eq!(m.incoming.len(), 60);
        // size must match the data.
        let mut bad = chunk(8);
        bad.truncate(MigData::SIZE + 4);
        assert_eq!(errno(m.data_write(&bad, 100)), Some(libc::EINVAL));
    }

    use crate::vm_migration::{MigratableError, Pausable};

    /// A device whose pause fails.
    struct Unpausable;
    impl Pausable for Unpausable {
        fn pause(&mut self) -> Result<(), MigratableError> {
            Err(MigratableError::Pause("no".into()))
        }
    }
    impl crate::vm_migration::Snapshottable for Unpausable {}
    impl crate::vm_migration::Transportable for Unpausable {}
    impl crate::vm_migration::Migratable for Unpausable {}
    impl Lifecycle for Unpausable {
        fn reset(&mut self, _reason: crate::device::ResetReason) {}
    }

    #[test]
    fn error_is_never_a_state_to_ask_for() {
        let (mut device, irqs) = (Unpausable, Irqs::default());
        let mut m = MigrationState::default();
        let mut to = |m: &mut MigrationState, state: MigState| {
            let side = DeviceSide {
                device: &mut device,
                irqs: &irqs,
                held: false,
            };
            m.transition(state, side)
        };
        assert_eq!(to(&mut m, MigState::Error), Err(libc::EINVAL));
        assert_eq!(m.state, MigState::Running);
        // A failed pause lands in ERROR; asking for ERROR there fails too.
        assert_eq!(to(&mut m, MigState::Stop), Err(libc::EIO));
        assert_eq!(m.state, MigState::Error);
        assert_eq!(to(&mut m, MigState::Error), Err(libc::EINVAL));
    }

    #[test]
    fn next_hops_follow_the_spec_table() {
        use MigState::*;
        assert_eq!(Stop.next_hop(PreCopy), Some(Running));
        assert_eq!(Running.next_hop(StopCopy), Some(Stop));
        assert_eq!(Running.next_hop(Resuming), Some(Stop));
        assert_eq!(StopCopy.next_hop(Running), Some(Stop));
        assert_eq!(StopCopy.next_hop(PreCopy), None);
        assert_eq!(Resuming.next_hop(Running), Some(Stop));
        assert_eq!(PreCopy.next_hop(Stop), Some(Running));
        assert_eq!(PreCopy.next_hop(Resuming), Some(Running));
        assert_eq!(Running.next_hop(Error), None);
        assert_eq!(MigState::from_u32(5), None);
    }
}
