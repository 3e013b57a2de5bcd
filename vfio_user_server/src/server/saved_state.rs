//! A device's saved state: its own snapshot with the server's interrupt
//! state (mask and pending bits) as a child, and the self-describing
//! stream that carries it in snapshot files and MIG_DATA.

use crate::device::Lifecycle;
use crate::irq::{Irqs, IrqsState};
use crate::state_stream::{decode_stream, encode_stream};
use crate::vm_migration::{MigratableError, Snapshot};

/// Id of the interrupt state in a device snapshot.
pub const IRQS_SNAPSHOT_ID: &str = "vfio-user-irqs";

/// The device's snapshot (it must be paused) with the interrupt state.
pub(super) fn snapshot(
    device: &mut dyn Lifecycle,
    irqs: &Irqs,
) -> Result<Snapshot, MigratableError> {
    let mut snap = device.snapshot()?;
    snap.add_snapshot(
        IRQS_SNAPSHOT_ID.into(),
        Snapshot::new_from_state(&irqs.state())?,
    );
    Ok(snap)
}

/// Applies a snapshot made by [`snapshot`] to a paused device: the
/// interrupt layout must match, and the interrupt state is put back as it
/// was if the device refuses its part.
pub(super) fn restore(
    device: &mut dyn Lifecycle,
    irqs: &Irqs,
    snapshot: &Snapshot,
) -> Result<(), MigratableError> {
    let mut snap = snapshot.clone();
    let irq_state = match snap.snapshots.remove(IRQS_SNAPSHOT_ID) {
        Some(s) => Some(s.to_state::<IrqsState>()?),
        None => None,
    };
    let before = irqs.state();
    if let Some(st) = &irq_state {
        irqs.set_state(st)
            .map_err(|e| MigratableError::Restore(format!("interrupt layout: {e}")))?;
    }
    if let Err(e) = device.restore(&snap) {
        let _ = irqs.set_state(&before);
        return Err(e);
    }
    Ok(())
}

/// [`snapshot`] as a stream for the device's kind (its id).
pub(super) fn save_stream(
    device: &mut dyn Lifecycle,
    irqs: &Irqs,
) -> Result<Vec<u8>, MigratableError> {
    let snap = snapshot(device, irqs)?;
    encode_stream(&device.id(), &snap)
}

/// Checks a stream made by [`save_stream`] and applies it to a paused
/// device: nothing is applied unless the stream is whole and of this kind.
pub(super) fn load_stream(
    device: &mut dyn Lifecycle,
    irqs: &Irqs,
    stream: &[u8],
) -> Result<(), MigratableError> {
    let snap = decode_stream(stream, &device.id())?;
    restore(device, irqs, &snap)
}
