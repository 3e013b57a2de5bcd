//! The controller's saved state: everything but the PCI function, which is
//! a child snapshot, and the transfers in flight, which are completed
//! before a snapshot is taken.

use serde::{Deserialize, Serialize};

use super::regs::{FwState, Registers};
use super::reply_queue::ReplyQueue;
use super::{HeldFrame, MAX_QUEUED_FRAMES};

/// Saved state of a [`super::Megasas`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct MegasasState {
    /// Firmware state and interrupt registers.
    pub(super) regs: Registers,
    /// The reply queue INIT set up.
    pub(super) reply_queue: Option<ReplyQueue>,
    /// The EVENT_WAIT held.
    pub(super) event_wait: Option<HeldFrame>,
    /// Newest event sequence number.
    pub(super) event_seq: u32,
    /// Frames queued and not run yet.
    pub(super) queued: Vec<u64>,
    /// Capacity of each disk, which the restoring controller must match.
    pub(super) disk_blocks: Vec<u64>,
    /// Why the controller stopped on a back-end error, if it did.
    #[serde(default)]
    pub(super) stopped_on_error: Option<String>,
    /// Frames kept on that error, to run again on resume.
    #[serde(default)]
    pub(super) kept: Vec<u64>,
    /// The disks whose image failed a flush: accepted writes may be lost,
    /// and every later flush of them fails.
    #[serde(default)]
    pub(super) writeback_lost: Vec<usize>,
}

impl MegasasState {
    /// Whether the state fits a controller with disks of `blocks` and is
    /// consistent in itself.
    pub(super) fn check(&self, blocks: &[u64]) -> Result<(), String> {
        if self.disk_blocks != blocks {
            return Err(format!(
                "disks of {:?} blocks in the snapshot, {blocks:?} here",
                self.disk_blocks
            ));
        }
        if self.queued.len() > MAX_QUEUED_FRAMES {
            return Err(format!("{} queued frames", self.queued.len()));
        }
        if self.kept.len() > MAX_QUEUED_FRAMES {
            return Err(format!("{} kept frames", self.kept.len()));
        }
        if let Some(d) = self.writeback_lost.iter().find(|&&d| d >= blocks.len()) {
            return Err(format!("disk {d} of {} lost writes", blocks.len()));
        }
        if self.stopped_on_error.is_none() != self.kept.is_empty() {
            return Err("kept frames without a stop, or a stop without frames".into());
        }
        match (&self.reply_queue, self.regs.state) {
            (Some(q), _) if !q.is_valid() => Err("invalid reply queue".into()),
            (None, FwState::Operational) => Err("operational without a reply queue".into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> MegasasState {
        MegasasState {
            regs: Registers::default(),
            reply_queue: None,
            event_wait: None,
            event_seq: 0,
            queued: vec![0x1000],
            disk_blocks: vec![2048],
            stopped_on_error: None,
            kept: Vec::new(),
            writeback_lost: Vec::new(),
        }
    }

    #[test]
    fn checks() {
        assert!(state().check(&[2048]).is_ok());
        assert!(state().check(&[2048, 1]).is_err());
        assert!(state().check(&[4096]).is_err());
        let mut s = state();
        s.queued = vec![0; MAX_QUEUED_FRAMES + 1];
        assert!(s.check(&[2048]).is_err());
        let mut s = state();
        s.kept = vec![0x2000];
        assert!(s.check(&[2048]).is_err());
        s.stopped_on_error = Some("write: EIO".into());
        assert!(s.check(&[2048]).is_ok());
        s.kept.clear();
        assert!(s.check(&[2048]).is_err());
        // Lost writes of a disk the controller has, not of another.
        let mut s = state();
        s.writeback_lost = vec![0];
        assert!(s.check(&[2048]).is_ok());
        s.writeback_lost = vec![1];
        assert!(s.check(&[2048]).is_err());
        let mut s = state();
        s.regs.state = FwState::Operational;
        assert!(s.check(&[2048]).is_err());
        s.reply_queue = Some(ReplyQueue {
            entries: 4,
            head: 4,
            ..Default::default()
        });
        assert!(s.check(&[2048]).is_err());
        s.reply_queue = Some(ReplyQueue {
            entries: 4,
            head: 3,
            ..Default::default()
        });
        assert!(s.check(&[2048]).is_ok());
    }
}
