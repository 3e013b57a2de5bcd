//! Interrupts: the eventfds the client installs with SET_IRQS, per index
//! and vector, with mask and pending state, behind a cloneable [`Irqs`]
//! handle that devices use to raise vector N.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::wire::*;

/// Errors of SET_IRQS and triggers.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum IrqError {
    /// Index out of range.
    #[error("IRQ index {0} out of range")]
    BadIndex(u32),
    /// Vector range out of range.
    #[error("vectors {start}+{count} out of range for index {index}")]
    BadRange {
        /// IRQ index.
        index: u32,
        /// First vector.
        start: u32,
        /// Vector count.
        count: u32,
    },
    /// Flag combination not allowed.
    #[error("invalid SET_IRQS flags {0:#x}")]
    BadFlags(u32),
    /// Wrong number of fds or data bytes.
    #[error("SET_IRQS carries {got} fds/bytes, expected {want}")]
    BadData {
        /// What came.
        got: usize,
        /// What was expected.
        want: usize,
    },
    /// An interrupt fd that is not an eventfd (what it is instead).
    #[error("interrupt fd is not an eventfd but {0}")]
    NotEventfd(String),
}

impl IrqError {
    /// The errno to reply with.
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// The vectors a SET_IRQS MASK or UNMASK set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskChange {
    /// Runs of `(start, count)` vectors: with DATA_BOOL, only those whose
    /// bool was 1.
    pub runs: Vec<(u32, u32)>,
    /// Whether they are now masked.
    pub masked: bool,
}

/// What a device declares for one IRQ index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqIndexInfo {
    /// `IRQ_INFO_*` flags.
    pub flags: u32,
    /// Number of vectors (0: unsupported).
    pub count: u32,
}

impl IrqIndexInfo {
    /// The usual PCI layout: INTx (1, automasked), MSI (`msi` vectors),
    /// MSI-X (`msix` vectors), ERR and REQ (1 each).
    pub fn pci_layout(intx: bool, msi: u32, msix: u32) -> Vec<IrqIndexInfo> {
        let ev = IRQ_INFO_EVENTFD;
        vec![
            IrqIndexInfo {
                flags: ev | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
                count: intx as u32,
            },
            IrqIndexInfo {
                flags: ev | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
                count: msi,
            },
            IrqIndexInfo {
                flags: ev | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
                count: msix,
            },
            IrqIndexInfo {
                flags: ev,
                count: 1,
            },
            IrqIndexInfo {
                flags: ev,
                count: 1,
            },
        ]
    }
}

#[derive(Default)]
struct Vector {
    fd: Option<EventFd>,
    masked: bool,
    pending: bool,
}

#[derive(Default)]
struct Index {
    info: IrqIndexInfo,
    vectors: Vec<Vector>,
    /// The eventfd installed with `UNMASK|EVENTFD` (automasked indexes
    /// only): the client signals it to unmask the vector, as KVM signals
    /// the kernel's INTx "resample" eventfd on the guest's EOI.
    unmask_fd: Option<EventFd>,
}

#[derive(Default)]
struct State {
    indexes: Vec<Index>,
}

impl State {
    /// Drops the unmask eventfd of every index; whether there was one.
    fn drop_unmask_fds(&mut self) -> bool {
        let mut dropped = false;
        for idx in self.indexes.iter_mut() {
            dropped |= idx.unmask_fd.take().is_some();
        }
        dropped
    }
}

/// Shared interrupt state; cheap to clone.
#[derive(Clone, Default)]
pub struct Irqs {
    state: Arc<Mutex<State>>,
    /// Changes (under the lock) whenever an unmask eventfd is installed or
    /// dropped, so that the event loop knows to watch the new one; read
    /// after every burst of events, hence outside the lock.
    unmask_generation: Arc<AtomicU64>,
}

/// Mask and pending bits of every vector, for snapshots (eventfds are the
/// client's and are installed again by the next client).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IrqsState {
    /// Per index, per vector: `(masked, pending)`.
    pub vectors: Vec<Vec<(bool, bool)>>,
}

/// The eventfds of an [`Irqs`] table, for a hand-over to another process
/// ([`Irqs::export_fds`], [`Irqs::import_fds`]).
#[derive(Debug, Default)]
pub struct IrqFds {
    /// `(index, vector, eventfd)` of every vector that has one.
    pub vectors: Vec<(u32, u32, EventFd)>,
    /// The unmask eventfd and its index, if the client installed one.
    pub unmask: Option<(u32, EventFd)>,
}

/// Outcome of a trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerOutcome {
    /// The eventfd was signalled.
    Delivered,
    /// The vector is masked or has no eventfd; it is now pending.
    Pending,
}

impl Irqs {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the data is plain.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the layout; drops every installed fd.
    pub fn configure(&self, layout: &[IrqIndexInfo]) {
        let mut s = self.lock();
        if s.drop_unmask_fds() {
            self.unmask_changed();
        }
        s.indexes = layout
            .iter()
            .map(|info| Index {
                info: *info,
                vectors: (0..info.count).map(|_| Vector::default()).collect(),
                unmask_fd: None,
            })
            .collect();
    }

    /// A number that changes whenever the unmask eventfd
    /// ([`Irqs::unmask_fd`]) is installed, replaced or dropped.
    pub fn unmask_generation(&self) -> u64 {
        self.unmask_generation.load(Ordering::Acquire)
    }

    /// Records a change of the unmask eventfd (called with the lock held).
    fn unmask_changed(&self) {
        self.unmask_generation.fetch_add(1, Ordering::Release);
    }

    /// A duplicate of the unmask eventfd the client installed with
    /// `UNMASK|EVENTFD`, if any, with its [`Irqs::unmask_generation`].
    /// The event loop watches it and calls [`Irqs::unmask_signalled`].
    pub fn unmask_fd(&self) -> (u64, Option<std::io::Result<EventFd>>) {
        let s = self.lock();
        let fd = s
            .indexes
            .iter()
            .find_map(|i| i.unmask_fd.as_ref())
            .map(EventFd::try_clone);
        (self.unmask_generation(), fd)
    }

    /// The client signalled the unmask eventfd: unmasks vector 0 of its
    /// index, firing it if it is pending. Returns the index if the vector
    /// was masked. The eventfd is not read: the client can make it
    /// blocking (the flag is shared), and a read that blocks would stall
    /// the event loop; the loop watches it edge-triggered instead.
    pub fn unmask_signalled(&self) -> Option<u32> {
        let mut s = self.lock();
        let (index, idx) = s
            .indexes
            .iter_mut()
            .enumerate()
            .find(|(_, i)| i.unmask_fd.is_some())?;
        let automask = idx.info.flags & IRQ_INFO_AUTOMASKED != 0;
        let v = idx.vectors.get_mut(0)?;
        let was_masked = v.masked;
        v.masked = false;
        if v.pending {
            v.pending = false;
            fire(v, automask);
        }
        was_masked.then_some(index as u32)
    }

    /// Mask and pending bits of every vector.
    pub fn state(&self) -> IrqsState {
        IrqsState {
            vectors: self
                .lock()
                .indexes
                .iter()
                .map(|i| i.vectors.iter().map(|v| (v.masked, v.pending)).collect())
                .collect(),
        }
    }

    /// Restores mask and pending bits; the layout must match. Pending
    /// vectors fire when their eventfd is installed.
    pub fn set_state(&self, state: &IrqsState) -> Result<(), IrqError> {
        let mut s = self.lock();
        let same_layout = s.indexes.len() == state.vectors.len()
            && s.indexes
                .iter()
                .zip(&state.vectors)
                .all(|(i, v)| i.vectors.len() == v.len());
        if !same_layout {
            return Err(IrqError::BadData {
                got: state.vectors.len(),
                want: s.indexes.len(),
            });
        }
        for (idx, vs) in s.indexes.iter_mut().zip(&state.vectors) {
            for (v, (masked, pending)) in idx.vectors.iter_mut().zip(vs) {
                v.masked = *masked;
                v.pending = *pending;
            }
        }
        Ok(())
    }

    /// Duplicates of every installed eventfd, for a hand-over to another
    /// process: `(index, vector, fd)` in index and vector order, and the
    /// unmask eventfd with its index. Mask and pending bits are in
    /// [`Irqs::state`].
    pub fn export_fds(&self) -> std::io::Result<IrqFds> {
        let s = self.lock();
        let mut out = IrqFds::default();
        for (i, idx) in s.indexes.iter().enumerate() {
            for (v, vector) in idx.vectors.iter().enumerate() {
                if let Some(fd) = &vector.fd {
                    out.vectors.push((i as u32, v as u32, fd.try_clone()?));
                }
            }
            if let Some(fd) = &idx.unmask_fd {
                out.unmask = Some((i as u32, fd.try_clone()?));
            }
        }
        Ok(out)
    }

    /// Installs eventfds exported by [`Irqs::export_fds`] (of a server of
    /// the same layout) without firing anything: what was pending stays
    /// pending, as it was. Nothing is installed if one is out of range.
    pub fn import_fds(&self, fds: IrqFds) -> Result<(), IrqError> {
        let mut s = self.lock();
        for (index, vector, _) in &fds.vectors {
            let ok = s
                .indexes
                .get(*index as usize)
                .is_some_and(|i| (*vector as usize) < i.vectors.len());
            if !ok {
                return Err(IrqError::BadRange {
                    index: *index,
                    start: *vector,
                    count: 1,
                });
            }
        }
        if let Some((index, _)) = &fds.unmask {
            let automask = s
                .indexes
                .get(*index as usize)
                .is_some_and(|i| i.info.flags & IRQ_INFO_AUTOMASKED != 0);
            if !automask {
                return Err(IrqError::BadIndex(*index));
            }
        }
        for (index, vector, fd) in fds.vectors {
            if let Some(v) = s
                .indexes
                .get_mut(index as usize)
                .and_then(|i| i.vectors.get_mut(vector as usize))
            {
                v.fd = Some(fd);
            }
        }
        if let Some((index, fd)) = fds.unmask {
            s.drop_unmask_fds();
            if let Some(i) = s.indexes.get_mut(index as usize) {
                i.unmask_fd = Some(fd);
            }
            self.unmask_changed();
        }
        Ok(())
    }

    /// Number of IRQ indices.
    pub fn num_irqs(&self) -> u32 {
        self.lock().indexes.len() as u32
    }

    /// What index `index` declares.
    pub fn info(&self, index: u32) -> Option<IrqIndexInfo> {
        self.lock().indexes.get(index as usize).map(|i| i.info)
    }

    /// Whether any vector of `index` has an eventfd installed.
    pub fn enabled(&self, index: u32) -> bool {
        self.lock()
            .indexes
            .get(index as usize)
            .is_some_and(|i| i.vectors.iter().any(|v| v.fd.is_some()))
    }

    /// Whether `vector` of `index` is pending (for the MSI-X PBA).
    pub fn pending(&self, index: u32, vector: u32) -> bool {
        self.lock()
            .indexes
            .get(index as usize)
            .and_then(|i| i.vectors.get(vector as usize))
            .is_some_and(|v| v.pending)
    }

    /// Raises `vector` of `index`.
    pub fn trigger(&self, index: u32, vector: u32) -> Result<TriggerOutcome, IrqError> {
        let mut s = self.lock();
        let idx = s
            .indexes
            .get_mut(index as usize)
            .ok_or(IrqError::BadIndex(index))?;
        let automask = idx.info.flags & IRQ_INFO_AUTOMASKED != 0;
        let v = idx
            .vectors
            .get_mut(vector as usize)
            .ok_or(IrqError::BadRange {
                index,
                start: vector,
                count: 1,
            })?;
        Ok(fire(v, automask))
    }

    /// Forgets every pending interrupt (a function reset), keeping the
    /// client's eventfds and masks.
    pub fn clear_pending(&self) {
        let mut s = self.lock();
        for v in s.indexes.iter_mut().flat_map(|i| i.vectors.iter_mut()) {
            v.pending = false;
        }
    }

    /// Drops every installed eventfd and clears mask/pending state
    /// (disconnect).
    pub fn clear(&self) {
        let mut s = self.lock();
        if s.drop_unmask_fds() {
            self.unmask_changed();
        }
        for idx in s.indexes.iter_mut() {
            for v in idx.vectors.iter_mut() {
                *v = Vector::default();
            }
        }
    }

    /// Handles DEVICE_SET_IRQS. `data` is the payload after the 20-byte
    /// head; `fds` are the received descriptors (all consumed or dropped).
    /// Returns what a MASK or UNMASK changed.
    pub fn set_irqs(
        &self,
        set: &IrqSet,
        data: &[u8],
        fds: Vec<File>,
    ) -> Result<Option<MaskChange>, IrqError> {
        let data_type = set.flags & IRQ_SET_DATA_TYPE_MASK;
        let action = set.flags & IRQ_SET_ACTION_TYPE_MASK;
        if set.flags & !(IRQ_SET_DATA_TYPE_MASK | IRQ_SET_ACTION_TYPE_MASK) != 0
            || data_type.count_ones() != 1
            || action.count_ones() != 1
        {
            return Err(IrqError::BadFlags(set.flags));
        }
        if data_type != IRQ_SET_DATA_EVENTFD && !fds.is_empty() {
            return Err(IrqError::BadData {
                got: fds.len(),
                want: 0,
            });
        }
        let mut s = self.lock();
        let idx = s
            .indexes
            .get_mut(set.index as usize)
            .ok_or(IrqError::BadIndex(set.index))?;
        let automask = idx.info.flags & IRQ_INFO_AUTOMASKED != 0;
        if action == IRQ_SET_ACTION_UNMASK && data_type == IRQ_SET_DATA_EVENTFD {
            // Kernel semantics (the INTx resample fd): only for an
            // automasked index, its one vector, one fd or none (remove).
            if !automask || set.start != 0 || set.count != 1 {
                return Err(IrqError::BadFlags(set.flags));
            }
            // A device without an interrupt pin has no INTx vector.
            if idx.info.count == 0 {
                return Err(IrqError::BadRange {
                    index: set.index,
                    start: set.start,
                    count: set.count,
                });
            }
            if fds.len() > 1 {
                return Err(IrqError::BadData {
                    got: fds.len(),
                    want: 1,
                });
            }
            idx.unmask_fd = fds.into_iter().next().map(client_eventfd).transpose()?;
            self.unmask_changed();
            return Ok(None);
        }
        let bad_range = IrqError::BadRange {
            index: set.index,
            start: set.start,
            count: set.count,
        };
        if set.count == 0 {
            // Only TRIGGER|NONE with count 0 (disable the index) is allowed.
            if action != IRQ_SET_ACTION_TRIGGER || data_type != IRQ_SET_DATA_NONE || set.start != 0
            {
                return Err(bad_range);
            }
            for v in idx.vectors.iter_mut() {
                v.fd = None;
                v.pending = false;
                v.masked = false;
            }
            if idx.unmask_fd.take().is_some() {
                self.unmask_changed();
            }
            return Ok(None);
        }
        let end = set.start.checked_add(set.count).ok_or(bad_range.clone())?;
        if end as usize > idx.vectors.len() {
            return Err(bad_range);
        }
        let range = set.start as usize..end as usize;
        let n = set.count as usize;
        let bools: Option<&[u8]> = match data_type {
            IRQ_SET_DATA_BOOL => {
                if data.len() < n {
                    return Err(IrqError::BadData {
                        got: data.len(),
                        want: n,
                    });
                }
                Some(&data[..n])
            }
            _ => None,
        };
        let selected = |i: usize| bools.is_none_or(|b| b[i - range.start] != 0);
        match action {
            IRQ_SET_ACTION_TRIGGER => match data_type {
                IRQ_SET_DATA_EVENTFD => {
                    if !fds.is_empty() && fds.len() != n {
                        return Err(IrqError::BadData {
                            got: fds.len(),
                            want: n,
                        });
                    }
                    if fds.is_empty() {
                        // Eventfd with no fds de-assigns the vectors.
                        for v in &mut idx.vectors[range] {
                            v.fd = None;
                        }
                    } else {
                        let efds = fds
                            .into_iter()
                            .map(client_eventfd)
                            .collect::<Result<Vec<_>, _>>()?;
                        for (v, efd) in idx.vectors[range].iter_mut().zip(efds) {
                            v.fd = Some(efd);
                            if v.pending && !v.masked {
                                v.pending = false;
                                fire(v, automask);
                            }
                        }
                    }
                    Ok(None)
                }
                _ => {
                    for i in range.clone() {
                        if selected(i) {
                            fire(&mut idx.vectors[i], automask);
                        }
                    }
                    Ok(None)
                }
            },
            IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK => {
                if data_type == IRQ_SET_DATA_EVENTFD {
                    // MASK|EVENTFD: the kernel has no such thing either.
                    return Err(IrqError::BadFlags(set.flags));
                }
                if idx.info.flags & IRQ_INFO_MASKABLE == 0 {
                    return Err(IrqError::BadFlags(set.flags));
                }
                let masked = action == IRQ_SET_ACTION_MASK;
                let mut runs: Vec<(u32, u32)> = Vec::new();
                for i in range.clone() {
                    if !selected(i) {
                        continue;
                    }
                    let v = &mut idx.vectors[i];
                    v.masked = masked;
                    if !masked && v.pending {
                        v.pending = false;
                        fire(v, automask);
                    }
                    // `i` is below the index's vector count, a u32.
                    let vector = i as u32;
                    match runs.last_mut() {
                        Some((start, count)) if *start + *count == vector => *count += 1,
                        _ => runs.push((vector, 1)),
                    }
                }
                Ok(Some(MaskChange { runs, masked }))
            }
            _ => Err(IrqError::BadFlags(set.flags)),
        }
    }
}

/// A client's interrupt fd, which must be an eventfd (a regular file on a
/// FUSE or NFS mount, say, could make every write to it wait), made
/// non-blocking: `fire` writes to it on the event loop thread, and a
/// blocking eventfd whose counter the client filled would otherwise block
/// the loop forever. The flag lives in the file description shared with
/// the client, so a client that clears it again can still stall the loop
/// (docs/security.md).
fn client_eventfd(f: File) -> Result<EventFd, IrqError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()));
    match link {
        Ok(target) if target.as_os_str() != "anon_inode:[eventfd]" => {
            return Err(IrqError::NotEventfd(target.display().to_string()));
        }
        Ok(_) => {}
        // No /proc to tell: taken as it is.
        Err(e) => log::debug!("cannot tell what an interrupt fd is: {e}"),
    }
    if let Err(e) = crate::event_loop::set_nonblocking(f.as_raw_fd()) {
        log::debug!("an interrupt fd stays blocking: {e}");
    }
    // SAFETY: `f` is an owned fd received from the client; ownership moves
    // into the EventFd.
    Ok(unsafe { EventFd::from_raw_fd(f.into_raw_fd()) })
}

fn fire(v: &mut Vector, automask: bool) -> TriggerOutcome {
    match (&v.fd, v.masked) {
        (Some(fd), false) => {
            // A full eventfd counter (EAGAIN) still means "signalled".
            let _ = fd.write(1);
            if automask {
                v.masked = true;
            }
            TriggerOutcome::Delivered
        }
        _ => {
            v.pending = true;
            TriggerOutcome::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn irqs() -> Irqs {
        let i = Irqs::default();
        i.configure(&IrqIndexInfo::pci_layout(true, 0, 4));
        i
    }

    #[test]
    fn no_unmask_eventfd_without_an_intx_vector() {
        let i = Irqs::default();
        i.configure(&IrqIndexInfo::pci_layout(false, 0, 4));
        let (_e, f) = efd();
        let unmask = set(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK, 0, 0, 1);
        let err = i.set_irqs(&unmask, &[], vec![f]).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
        assert!(matches!(err, IrqError::BadRange { .. }), "{err}");
    }

    fn set(flags: u32, index: u32, start: u32, count: u32) -> IrqSet {
        IrqSet {
            argsz: 20,
            flags,
            index,
            start,
            count,
        }
    }

    fn efd() -> (EventFd, File) {
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: dup returns a new owned fd.
        let f = unsafe { File::from_raw_fd(libc::dup(e.as_raw_fd())) };
        (e, f)
    }

    #[test]
    fn msix_trigger_mask_unmask() {
        let i = irqs();
        let (e, f) = efd();
        i.set_irqs(
            &set(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 2, 1, 1),
            &[],
            vec![f],
        )
        .unwrap();
        assert_eq!(i.trigger(2, 1).unwrap(), TriggerOutcome::Delivered);
        assert_eq!(e.read().unwrap(), 1);
        i.set_irqs(
            &set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 2, 1, 1),
            &[],
            vec![],
        )
        .unwrap();
        assert_eq!(i.trigger(2, 1).unwrap(), TriggerOutcome::Pending);
        assert!(i.pending(2, 1));
        assert!(e.read().is_err());
        i.set_irqs(
            &set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 2, 1, 1),
            &[],
            vec![],
        )
        .unwrap();
        assert_eq!(e.read().unwrap(), 1);
        assert!(!i.pending(2, 1));
        // Vector 0 has no fd: pending.
        assert_eq!(i.trigger(2, 0).unwrap(), TriggerOutcome::Pending);
        assert!(i.trigger(2, 4).is_err());
        assert!(i.trigger(7, 0).is_err());
    }

    #[test]
    fn blocking_full_eventfd_does_not_block_triggers() {
        let i = irqs();
        // A blocking eventfd whose counter is full: a write would block.
        let e = EventFd::new(0).unwrap();
        e.write(u64::MAX - 1).unwrap();
        // SAFETY: dup returns a new owned fd.
        let f = unsafe { File::from_raw_fd(libc::dup(e.as_raw_fd())) };
        i.set_irqs(
            &set(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 2, 0, 1),
            &[],
            vec![f],
        )
        .unwrap();
        assert_eq!(i.trigger(2, 0).unwrap(), TriggerOutcome::Delivered);
        i.set_irqs(
            &set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 2, 0, 1),
            &[],
            vec![],
        )
        .unwrap();
    }

    #[test]
    fn intx_automasks_until_unmask() {
        let i = irqs();
        let (e, f) = efd();
        i.set_irqs(
            &set(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 0, 1),
            &[],
            vec![f],
        )
        .unwrap();
        assert_eq!(i.trigger(0, 0).unwrap(), TriggerOutcome::Delivered);
        assert_eq!(i.trigger(0, 0).unwrap(), TriggerOutcome::Pending);
        assert_eq!(e.read().unwrap(), 1);
        i.set_irqs(
            &set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 0, 1),
            &[],
            vec![],
        )
        .unwrap();
        assert_eq!(e.read().unwrap(), 1);
    }

    #[test]
    fn state_round_trip() {
        let i = irqs();
        i.set_irqs(
            &set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 2, 3, 1),
            &[],
            vec![],
        )
        .unwrap();
        i.trigger(2, 1).unwrap();
        let st = i.state();
        assert_eq!(st.vectors[2][3], (true, false));
        assert_eq!(st.vectors[2][1], (false, true));
        let j = irqs();
        j.set_state(&st).unwrap();
        assert_eq!(j.state(), st);
        // A pending vector fires once its eventfd arrives.
        let (e, f) = efd();
        j.set_irqs(
            &set(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 2, 1, 1),
            &[],
            vec![f],
        )
        .unwrap();
        assert_eq!(e.read().unwrap(), 1);
        let other = Irqs::default();
        other.configure(&IrqIndexInfo::pci_layout(true, 0, 2));
        assert!(other.set_state(&st).is_err());
    }

    #[test]
    fn validation_matrix() {
        let i = irqs();
        let t = IRQ_SET_ACTION_TRIGGER;
        // Two data types, two actions, unknown bits.
        for flags in [
            IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | t,
            IRQ_SET_DATA_NONE | t | IRQ_SET_ACTION_MASK,
            IRQ_SET_DATA_NONE | t | 0x100,
            t,
            IRQ_SET_DATA_NONE,
        ] {
            assert!(i.set_irqs(&set(flags, 2, 0, 1), &[], vec![]).is_err());
        }
        // Disable with count 0 works, even on an index with no vectors.
        i.set_irqs(&set(IRQ_SET_DATA_NONE | t, 1, 0, 0), &[], vec![])
            .unwrap();
        assert!(i
            .set_irqs(&set(IRQ_SET_DATA_NONE | t, 1, 1, 0), &[], vec![])
            .is_err());
        assert!(i
            .set_irqs(&set(IRQ_SET_DATA_NONE | t, 2, 3, 2), &[], vec![])
            .is_err());
        assert!(i
            .set_irqs(&set(IRQ_SET_DATA_NONE | t, 2, u32::MAX, 2), &[], vec![])
            .is_err());
        assert!(i
            .set_irqs(&set(IRQ_SET_DATA_NONE | t, 9, 0, 1), &[], vec![])
            .is_err());
        // Wrong fd count, fds without EVENTFD.
        let (_e, f) = efd();
        let (_e2, f2) = efd();
        assert!(i
            .set_irqs(&set(IRQ_SET_DATA_EVENTFD | t, 2, 0, 1), &[], vec![f, f2])
            .is_err());
        let (_e3, f3) = efd();
        assert!(i
            .set_irqs(&set(IRQ_SET_DATA_NONE | t, 2, 0, 1), &[], vec![f3])
            .is_err());
        // BOOL needs count bytes.
        assert!(i
            .set_irqs(&set(IRQ_SET_DATA_BOOL | t, 2, 0, 2), &[1], vec![])
            .is_err());
        i.set_irqs(&set(IRQ_SET_DATA_BOOL | t, 2, 0, 2), &[0, 1], vec![])
            .unwrap();
        assert!(!i.pending(2, 0));
        assert!(i.pending(2, 1));
    }
}
