//! Cloud-Hypervisor-shaped migration traits (`vm-migration` is not
//! published; these keep its names and shapes so a Cloud Hypervisor device
//! ports with little change).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors of pause, snapshot, restore and migration.
#[derive(Debug, Error)]
pub enum MigratableError {
    /// Pausing failed.
    #[error("failed to pause: {0}")]
    Pause(String),
    /// Resuming failed.
    #[error("failed to resume: {0}")]
    Resume(String),
    /// Taking a snapshot failed.
    #[error("failed to snapshot: {0}")]
    Snapshot(String),
    /// Restoring failed.
    #[error("failed to restore: {0}")]
    Restore(String),
    /// Sending a snapshot failed.
    #[error("failed to send: {0}")]
    MigrateSend(String),
    /// Receiving a snapshot failed.
    #[error("failed to receive: {0}")]
    MigrateReceive(String),
    /// Dirty logging failed.
    #[error("dirty log: {0}")]
    DirtyLog(String),
    /// The device does not support this.
    #[error("not supported by this device")]
    Unsupported,
}

/// Serialized state of one component.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotData {
    /// JSON text of the state.
    pub state: String,
}

impl SnapshotData {
    /// Serializes `state`.
    pub fn new_from_state<T: Serialize>(state: &T) -> Result<Self, MigratableError> {
        let state =
            serde_json::to_string(state).map_err(|e| MigratableError::Snapshot(e.to_string()))?;
        Ok(SnapshotData { state })
    }

    /// Deserializes the state.
    pub fn to_state<'a, T: Deserialize<'a>>(&'a self) -> Result<T, MigratableError> {
        serde_json::from_str(&self.state).map_err(|e| MigratableError::Restore(e.to_string()))
    }
}

/// A tree of component snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Child snapshots by id.
    pub snapshots: BTreeMap<String, Snapshot>,
    /// This component's own state.
    pub snapshot_data: Option<SnapshotData>,
}

impl Snapshot {
    /// A snapshot holding `state`.
    pub fn new_from_state<T: Serialize>(state: &T) -> Result<Self, MigratableError> {
        Ok(Snapshot {
            snapshots: BTreeMap::new(),
            snapshot_data: Some(SnapshotData::new_from_state(state)?),
        })
    }

    /// Adds a child snapshot.
    pub fn add_snapshot(&mut self, id: String, snapshot: Snapshot) {
        self.snapshots.insert(id, snapshot);
    }

    /// Deserializes this snapshot's own state.
    pub fn to_state<'a, T: Deserialize<'a>>(&'a self) -> Result<T, MigratableError> {
        self.snapshot_data
            .as_ref()
            .ok_or_else(|| MigratableError::Restore("missing snapshot data".into()))?
            .to_state()
    }
}

/// Pause and resume.
pub trait Pausable {
    /// Pauses the component.
    fn pause(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    /// Resumes the component.
    fn resume(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}

/// Components whose state can be captured.
pub trait Snapshottable: Pausable {
    /// The component id.
    fn id(&self) -> String {
        String::new()
    }
    /// Captures the state.
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        Ok(Snapshot::default())
    }
}

/// Components whose snapshots can be sent and received.
pub trait Transportable: Pausable + Snapshottable {
    /// Sends `snapshot` to `destination_url`.
    fn send(&self, _snapshot: &Snapshot, _destination_url: &str) -> Result<(), MigratableError> {
        Ok(())
    }
    /// Receives the snapshot `id` from `source_url`.
    fn recv(&self, _source_url: &str, _id: &str) -> Result<Snapshot, MigratableError> {
        Ok(Snapshot::default())
    }
}

/// A range of guest memory with its dirty bitmap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryRange {
    /// Guest address.
    pub gpa: u64,
    /// Length in bytes.
    pub length: u64,
}

/// A table of memory ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryRangeTable {
    /// The ranges.
    pub data: Vec<MemoryRange>,
}

/// Live migration.
pub trait Migratable: Send + Pausable + Snapshottable + Transportable {
    /// Starts dirty page logging.
    fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    /// Stops dirty page logging.
    fn stop_dirty_log(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    /// Returns the dirty ranges since the last call.
    fn dirty_log(&mut self) -> Result<MemoryRangeTable, MigratableError> {
        Ok(MemoryRangeTable::default())
    }
    /// Called when migration starts.
    fn start_migration(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    /// Called when migration completes.
    fn complete_migration(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}
