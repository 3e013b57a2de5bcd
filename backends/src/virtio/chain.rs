//! Walking a descriptor chain again, from its head.
//!
//! virtio-queue walks a chain only as it takes it off the available ring.
//! A device that keeps a request it took earlier (a storage device stopped
//! on an error) keeps only its head index, and walks the chain again when
//! it retries the request: the driver may not touch a chain until the
//! device has put it in the used ring.

use std::mem::size_of;

use virtio_bindings::virtio_ring::VRING_DESC_ALIGN_SIZE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemory;

/// The descriptors of a chain, read from guest memory as the iteration
/// goes, with the rules of virtio-queue's `DescriptorChain`: at most as
/// many descriptors as the table holds, one level of indirect table, at
/// most 4 GiB in all. The iteration ends early (the chain is cut short)
/// where guest memory breaks those rules or cannot be read; the device's
/// request parsing then sees a malformed chain.
#[derive(Clone, Debug)]
pub(crate) struct ChainWalk<'m> {
    mem: &'m GuestMemory,
    table: GuestAddress,
    table_len: u16,
    next: u16,
    /// Descriptors left before the walk gives up (a loop in the chain).
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'m> ChainWalk<'m> {
    /// The chain whose head is descriptor `head` of `queue`'s table.
    pub(crate) fn new(queue: &Queue, mem: &'m GuestMemory, head: u16) -> Self {
        ChainWalk {
            mem,
            table: GuestAddress(queue.desc_table()),
            table_len: queue.size(),
            next: head,
            ttl: queue.size(),
            indirect: false,
            bytes: 0,
        }
    }

    /// Goes on in the indirect table `desc` points to; `None` if it is not
    /// a valid one, or an indirect table points to another.
    fn enter_indirect(&mut self, desc: &Descriptor) -> Option<()> {
        if self.indirect || desc.len() & (VRING_DESC_ALIGN_SIZE - 1) != 0 {
            return None;
        }
        let len = u16::try_from(desc.len() / VRING_DESC_ALIGN_SIZE).ok()?;
        self.table = desc.addr();
        self.table_len = len;
        self.next = 0;
        self.ttl = len;
        self.indirect = true;
        Some(())
    }
}

impl Iterator for ChainWalk<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.table_len {
                return None;
            }
            // A u16 index times 16 cannot overflow a u64; the sum can.
            let addr = self
                .table
                .0
                .checked_add(u64::from(self.next) * size_of::<Descriptor>() as u64)?;
            let desc: Descriptor = self.mem.read_obj(GuestAddress(addr)).ok()?;
            if desc.refers_to_indirect_table() {
                self.enter_indirect(&desc)?;
                continue;
            }
            self.bytes = self.bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::QueueOwnedT;
    use vm_memory::bitmap::AtomicBitmap;

    use super::*;

    const TABLE: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const INDIRECT: u64 = 0x4000;

    fn mem() -> GuestMemory {
        vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000)])
            .unwrap()
    }

    fn queue(mem: &GuestMemory) -> Queue {
        let mut q = Queue::new(8).unwrap();
        q.set_desc_table_address(Some(TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    fn put(mem: &GuestMemory, table: u64, index: u16, d: Descriptor) {
        mem.write_obj(d, GuestAddress(table + 16 * u64::from(index)))
            .unwrap();
    }

    /// Publishes `head` in the available ring at position `pos`.
    fn publish(mem: &GuestMemory, pos: u16, head: u16) {
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(pos)))
            .unwrap();
        mem.write_obj(pos + 1, GuestAddress(AVAIL + 2)).unwrap();
    }

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    #[test]
    fn walks_what_virtio_queue_pops() {
        let m = mem();
        let mut q = queue(&m);
        // Head 5 -> 2 -> indirect table of three -> ends; head 7 alone.
        put(&m, TABLE, 5, Descriptor::new(0x8000, 16, NEXT, 2));
        put(
            &m,
            TABLE,
            2,
            Descriptor::new(INDIRECT, 48, VRING_DESC_F_INDIRECT as u16, 0),
        );
        put(&m, INDIRECT, 0, Descriptor::new(0x8100, 512, NEXT, 1));
        put(
            &m,
            INDIRECT,
            1,
            Descriptor::new(0x8300, 512, WRITE | NEXT, 2),
        );
        put(&m, INDIRECT, 2, Descriptor::new(0x8500, 1, WRITE, 0));
        put(&m, TABLE, 7, Descriptor::new(0x9000, 1, WRITE, 0));
        publish(&m, 0, 5);
        publish(&m, 1, 7);
        let fields = |d: Descriptor| (d.addr(), d.len(), d.flags(), d.next());
        for head in [5u16, 7] {
            let popped: Vec<_> = q.pop_descriptor_chain(&m).unwrap().map(fields).collect();
            let walked: Vec<_> = ChainWalk::new(&q, &m, head).map(fields).collect();
            assert_eq!(walked, popped, "head {head}");
        }
        assert_eq!(ChainWalk::new(&q, &m, 5).count(), 4);
        // The ring is empty now; the walk does not need it.
        assert!(q.iter(&m).unwrap().next().is_none());
        assert_eq!(ChainWalk::new(&q, &m, 7).count(), 1);
    }

    #[test]
    fn broken_chains_end_the_walk() {
        let m = mem();
        let q = queue(&m);
        // A head past the table.
        assert_eq!(ChainWalk::new(&q, &m, 8).count(), 0);
        // A loop: cut after a table's worth.
        put(&m, TABLE, 0, Descriptor::new(0x8000, 1, NEXT, 1));
        put(&m, TABLE, 1, Descriptor::new(0x8000, 1, NEXT, 0));
        assert_eq!(ChainWalk::new(&q, &m, 0).count(), 8);
        // A next index past the table.
        put(&m, TABLE, 1, Descriptor::new(0x8000, 1, NEXT, 200));
        assert_eq!(ChainWalk::new(&q, &m, 0).count(), 2);
        // An indirect table of a length that is not a multiple of 16, and
        // one that points to another.
        put(
            &m,
            TABLE,
            3,
            Descriptor::new(INDIRECT, 20, VRING_DESC_F_INDIRECT as u16, 0),
        );
        assert_eq!(ChainWalk::new(&q, &m, 3).count(), 0);
        put(
            &m,
            TABLE,
            3,
            Descriptor::new(INDIRECT, 16, VRING_DESC_F_INDIRECT as u16, 0),
        );
        put(
            &m,
            INDIRECT,
            0,
            Descriptor::new(INDIRECT, 16, VRING_DESC_F_INDIRECT as u16, 0),
        );
        assert_eq!(ChainWalk::new(&q, &m, 3).count(), 0);
        // More than 4 GiB in all.
        put(&m, TABLE, 4, Descriptor::new(0x8000, u32::MAX, NEXT, 5));
        put(&m, TABLE, 5, Descriptor::new(0x8000, 2, 0, 0));
        assert_eq!(ChainWalk::new(&q, &m, 4).count(), 1);
        // A table outside guest memory.
        put(
            &m,
            TABLE,
            6,
            Descriptor::new(0xffff_0000, 32, VRING_DESC_F_INDIRECT as u16, 0),
        );
        assert_eq!(ChainWalk::new(&q, &m, 6).count(), 0);
    }
}
