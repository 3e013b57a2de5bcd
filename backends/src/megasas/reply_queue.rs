//! The reply queue an INIT frame sets up: a ring of contexts in guest
//! memory, with the producer index the controller publishes and the
//! consumer index the driver keeps.
//!
//! A completion writes the frame's context at the producer index, moves
//! the index on (wrapping at the ring's size) and then, after a release
//! fence, publishes the new index: a driver that sees the index sees the
//! context.

use std::sync::atomic::{fence, Ordering};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vfio_user_server::guest_memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Size of the queue information an INIT frame points at.
pub const QINFO_SIZE: usize = 32;
/// Queue flag: contexts are 64 bits.
const QUEUE_FLAG_CONTEXT64: u32 = 0x2;
/// Most ring entries accepted (Linux asks for the command count plus one).
pub const MAX_ENTRIES: u32 = 1 << 16;

/// Why an INIT's queue cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum QueueError {
    /// The queue information is outside guest memory.
    #[error("queue information outside guest memory")]
    Info,
    /// No entries, or more than [`MAX_ENTRIES`].
    #[error("{0} reply queue entries")]
    Entries(u32),
    /// The ring or an index is outside guest memory.
    #[error("reply queue or index outside guest memory")]
    Outside,
}

/// A reply queue, as set up and as far as it got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyQueue {
    /// Entries in the ring.
    pub entries: u32,
    /// Guest address of the ring.
    pub ring: u64,
    /// Guest address of the producer index.
    pub producer: u64,
    /// Guest address of the consumer index.
    pub consumer: u64,
    /// Contexts are 64 bits.
    pub context64: bool,
    /// Where the next context goes.
    pub head: u32,
}

impl ReplyQueue {
    /// The queue described by the queue information at `qinfo`, starting
    /// at the producer index the driver left there.
    pub fn from_qinfo(mem: &GuestMemory, qinfo: u64) -> Result<Self, QueueError> {
        let mut b = [0u8; QINFO_SIZE];
        mem.read_slice(&mut b, GuestAddress(qinfo))
            .map_err(|_| QueueError::Info)?;
        let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let le64 = |at: usize| u64::from(le32(at)) | u64::from(le32(at + 4)) << 32;
        let entries = le32(4);
        if entries == 0 || entries > MAX_ENTRIES {
            return Err(QueueError::Entries(entries));
        }
        let mut q = ReplyQueue {
            entries,
            ring: le64(8),
            producer: le64(16),
            consumer: le64(24),
            context64: le32(0) & QUEUE_FLAG_CONTEXT64 != 0,
            head: 0,
        };
        let ring_len = u64::from(entries) * q.slot_size();
        let fits = |addr: u64, len: u64| {
            usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len))
        };
        if !fits(q.ring, ring_len) || !fits(q.producer, 4) || !fits(q.consumer, 4) {
            return Err(QueueError::Outside);
        }
        let start: u32 = mem
            .read_obj(GuestAddress(q.producer))
            .map_err(|_| QueueError::Outside)?;
        q.head = u32::from_le(start) % entries;
        Ok(q)
    }

    /// Bytes of the ring.
    pub fn ring_len(&self) -> u64 {
        u64::from(self.entries) * self.slot_size()
    }

    fn slot_size(&self) -> u64 {
        if self.context64 {
            8
        } else {
            4
        }
    }

    /// Whether a restored state is usable: entries in range, the head
    /// inside the ring, and the ring and indices inside the address space
    /// (guest memory can change before the next post, which checks it).
    pub fn is_valid(&self) -> bool {
        (1..=MAX_ENTRIES).contains(&self.entries)
            && self.head < self.entries
            && self.ring.checked_add(self.ring_len()).is_some()
            && self.producer.checked_add(4).is_some()
            && self.consumer.checked_add(4).is_some()
    }

    /// Posts `context`: writes it at the head, moves the head on and
    /// publishes it. Fails if the ring or the index is no longer in guest
    /// memory (the queue is then left as it was).
    pub fn post(&mut self, mem: &GuestMemory, context: u64) -> Result<(), QueueError> {
        let slot = self
            .ring
            .checked_add(u64::from(self.head) * self.slot_size())
            .map(GuestAddress)
            .ok_or(QueueError::Outside)?;
        let written = if self.context64 {
            mem.write_obj(context.to_le(), slot)
        } else {
            // 32-bit contexts: the driver put 32 bits in the frame.
            mem.write_obj((context as u32).to_le(), slot)
        };
        written.map_err(|_| QueueError::Outside)?;
        let next = (self.head + 1) % self.entries;
        // The context is visible before the index that covers it.
        fence(Ordering::Release);
        mem.write_obj(next.to_le(), GuestAddress(self.producer))
            .map_err(|_| QueueError::Outside)?;
        self.head = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::AtomicBitmap;

    fn mem() -> GuestMemory {
        vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000)])
            .unwrap()
    }

    fn qinfo(m: &GuestMemory, flags: u32, entries: u32, ring: u64, pi: u64, ci: u64) {
        let mut b = Vec::new();
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&entries.to_le_bytes());
        for a in [ring, pi, ci] {
            b.extend_from_slice(&a.to_le_bytes());
        }
        m.write_slice(&b, GuestAddress(0x100)).unwrap();
    }

    fn rd32(m: &GuestMemory, a: u64) -> u32 {
        m.read_obj(GuestAddress(a)).unwrap()
    }

    #[test]
    fn posts_wrap_at_the_ring_size() {
        let m = mem();
        qinfo(&m, 0, 3, 0x1000, 0x2000, 0x2004);
        m.write_obj(1u32, GuestAddress(0x2000)).unwrap();
        let mut q = ReplyQueue::from_qinfo(&m, 0x100).unwrap();
        assert!(q.is_valid());
        assert_eq!((q.entries, q.head, q.context64), (3, 1, false));
        for ctx in [10u64, 11, 12, 0x1_0000_000d] {
            q.post(&m, ctx).unwrap();
        }
        // Slots 1, 2, 0, then 1 again (32-bit contexts).
        assert_eq!(rd32(&m, 0x1000), 12);
        assert_eq!(rd32(&m, 0x1004), 13);
        assert_eq!(rd32(&m, 0x1008), 11);
        assert_eq!(rd32(&m, 0x2000), 2);
        assert_eq!(q.head, 2);
    }

    #[test]
    fn contexts_of_64_bits() {
        let m = mem();
        qinfo(&m, 2, 4, 0x1000, 0x2000, 0x2004);
        let mut q = ReplyQueue::from_qinfo(&m, 0x100).unwrap();
        assert!(q.context64);
        q.post(&m, 0x1122_3344_5566_7788).unwrap();
        let got: u64 = m.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(got, 0x1122_3344_5566_7788);
        assert_eq!(rd32(&m, 0x2000), 1);
    }

    #[test]
    fn bad_queues_are_refused() {
        let m = mem();
        assert_eq!(ReplyQueue::from_qinfo(&m, 0xfff0), Err(QueueError::Info));
        qinfo(&m, 0, 0, 0x1000, 0x2000, 0x2004);
        assert_eq!(
            ReplyQueue::from_qinfo(&m, 0x100),
            Err(QueueError::Entries(0))
        );
        qinfo(&m, 0, MAX_ENTRIES + 1, 0x1000, 0x2000, 0x2004);
        assert!(ReplyQueue::from_qinfo(&m, 0x100).is_err());
        // The ring runs off the end of guest memory.
        qinfo(&m, 2, 0x1001, 0x8000, 0x2000, 0x2004);
        assert_eq!(ReplyQueue::from_qinfo(&m, 0x100), Err(QueueError::Outside));
        qinfo(&m, 0, 4, 0x1000, 0xfffe, 0x2004);
        assert_eq!(ReplyQueue::from_qinfo(&m, 0x100), Err(QueueError::Outside));
        qinfo(&m, 0, 4, 0x1000, 0x2000, u64::MAX);
        assert_eq!(ReplyQueue::from_qinfo(&m, 0x100), Err(QueueError::Outside));
        // Guest memory gone under a queue: the post fails, nothing moves.
        let mut q = ReplyQueue {
            entries: 4,
            ring: 0x2_0000,
            producer: 0x2000,
            consumer: 0x2004,
            context64: false,
            head: 0,
        };
        assert_eq!(q.post(&m, 1), Err(QueueError::Outside));
        assert_eq!(q.head, 0);
        assert!(!ReplyQueue { head: 4, ..q }.is_valid());
        assert!(!ReplyQueue::default().is_valid());
        // A restored ring at the top of the address space is refused, and
        // posting to one fails instead of wrapping around to address 0.
        let top = ReplyQueue {
            ring: u64::MAX - 0xf,
            head: 3,
            ..q
        };
        assert!(!top.is_valid());
        assert!(!ReplyQueue {
            producer: u64::MAX - 1,
            ..q
        }
        .is_valid());
        let mut top = top;
        assert_eq!(top.post(&m, 1), Err(QueueError::Outside));
        assert_eq!(top.head, 3);
    }
}
