//! Moving frames between a queue pair and its back end, and answering the
//! control queue.
//!
//! Receive reads a frame straight into the first chain's buffers, one
//! `readv`; with mergeable buffers the part that does not fit lands in a
//! bounce buffer behind them and is spread over the next chains. Transmit
//! gathers a chain into one `writev`. A chain the back end cannot take
//! now goes back to the ring untouched (`WouldBlock`); a frame that does
//! not fit, or a chain that is not what the queue needs, is dropped and
//! counted, and every chain taken is given back.

use std::io;

use log::debug;
use smallvec::SmallVec;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;

use super::header::{NET_HDR_LEN, NUM_BUFFERS_OFFSET};
use crate::guest_sg::SgList;
use crate::net::NetBackend;
use crate::storage::IoBuf;
use crate::virtio::GuestMemory;

/// Largest frame a back end hands us: the vnet header, a 64 KiB GSO frame
/// and its Ethernet and VLAN headers.
pub(super) const MAX_FRAME: usize = NET_HDR_LEN + 65535 + 14 + 4;
/// Most descriptors of a chain (the kernel's `UIO_MAXIOV`).
const MAX_CHAIN: usize = 1024;
/// Buffers handed to the back end without allocating: Linux's receive and
/// transmit chains have at most `MAX_SKB_FRAGS` + 2 buffers.
type IoVec<'a> = SmallVec<[IoBuf<'a>; 24]>;

/// What receiving one frame came to.
#[derive(Debug)]
pub(super) enum Rx {
    /// A frame is in the guest's buffers.
    Frame,
    /// No frame waits.
    Empty,
    /// No receive buffer is posted.
    NoBuffers,
    /// A frame or a chain was dropped; the chains are back.
    Dropped,
    /// The back end failed.
    Failed(io::Error),
}

/// What transmitting one chain came to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Tx {
    /// The frame went out.
    Sent,
    /// The ring is empty.
    Empty,
    /// The back end cannot take it now; the chain is back in the ring.
    Blocked,
    /// The frame was dropped (a bad chain, or the back end refused it).
    Dropped,
}

/// The buffers of `chain` going one way (device-writable for receive),
/// or `None` if it is not such a chain: a buffer the other way, outside
/// guest memory, or too many. A buffer across guest memory regions takes
/// a segment in each, and the segments must fit one `readv` or `writev`
/// with one to spare (a back end would drop those past `UIO_MAXIOV`, and
/// with them the end of the frame, or the byte that tells a frame that
/// did not fit).
fn buffers<'m>(
    chain: DescriptorChain<&'m GuestMemory>,
    mem: &'m GuestMemory,
    writable: bool,
) -> Option<SgList<'m>> {
    let mut sg = SgList::new(mem);
    for (i, d) in chain.enumerate() {
        if i >= MAX_CHAIN || d.is_write_only() != writable || !sg.push_buffer(d.addr(), d.len()) {
            return None;
        }
    }
    (sg.segments().len() < MAX_CHAIN).then_some(sg)
}

fn iovec<'a>(sg: &SgList<'a>) -> IoVec<'a> {
    sg.segments().iter().map(|s| IoBuf::from(s.slice)).collect()
}

/// Puts `head` in the used ring with `len` bytes written.
fn complete(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32) {
    if let Err(e) = queue.add_used(mem, head, len) {
        debug!("virtio-net: cannot complete chain {head}: {e}");
    }
}

/// Gives the last `n` chains taken back to the ring.
fn give_back(queue: &mut Queue, n: usize) {
    for _ in 0..n {
        queue.go_to_previous_position();
    }
}

/// Marks the first `len` bytes of `sg` dirty: the back end wrote them
/// behind vm-memory's back.
fn mark_dirty(sg: &SgList<'_>, len: u64) {
    let _ = sg.for_each(0, len, |piece| {
        piece.slice.bitmap().mark_dirty(0, piece.slice.len());
        Ok(())
    });
}

/// Whether a read error lost the frame (it did not fit the buffers) rather
/// than failing the back end. (A TAP copies what fits and reports the
/// whole length instead; see `receive`.)
fn frame_lost(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EFAULT) | Some(libc::EMSGSIZE)
    )
}

/// Receives one frame from `backend` into `queue`. The back end reads
/// into the first chain and then into `overflow`: with mergeable buffers
/// (`merge`) a bounce buffer for the rest of the frame, larger than any
/// frame a TAP hands over, otherwise at least a byte; only a frame too big
/// for the chain reaches that byte, or fills the bounce buffer (a back end
/// truncates a frame to the buffers it is given, and may say so no other
/// way).
pub(super) fn receive(
    backend: &dyn NetBackend,
    queue: &mut Queue,
    mem: &GuestMemory,
    overflow: &mut [u8],
    merge: bool,
) -> Rx {
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return Rx::NoBuffers;
    };
    let head = chain.head_index();
    let Some(first) = buffers(chain, mem, true).filter(|sg| sg.len() >= NET_HDR_LEN as u64) else {
        // Not a receive buffer: back to the guest empty, not lost.
        complete(queue, mem, head, 0);
        return Rx::Dropped;
    };
    let read = {
        // Built here rather than by `iovec`: the bounce buffer's borrow
        // must end with the read.
        let mut iov: IoVec<'_> = first
            .segments()
            .iter()
            .map(|s| IoBuf::from(s.slice))
            .collect();
        iov.push(IoBuf::from(&mut *overflow));
        backend.read_frame(&iov)
    };
    let n = match read {
        Ok(n) => n,
        Err(e) => {
            give_back(queue, 1);
            return match e.kind() {
                io::ErrorKind::WouldBlock => Rx::Empty,
                _ if frame_lost(&e) => Rx::Dropped,
                _ => Rx::Failed(e),
            };
        }
    };
    let first_len = first.len().min(n as u64);
    mark_dirty(&first, first_len);
    if n < NET_HDR_LEN {
        give_back(queue, 1);
        return Rx::Dropped;
    }
    if n as u64 <= first.len() {
        set_num_buffers(&first, 1);
        complete(queue, mem, head, n as u32);
        return Rx::Frame;
    }
    // Past the chain: without mergeable buffers the frame did not fit;
    // with them, one that filled the bounce buffer may have been cut short
    // there (a back end that truncates says so no other way).
    let Some(mut rest) = overflow
        .get(..n - first_len as usize)
        .filter(|rest| merge && rest.len() < overflow.len())
    else {
        give_back(queue, 1);
        return Rx::Dropped;
    };
    let mut used: SmallVec<[(u16, u32); 8]> = SmallVec::new();
    used.push((head, first_len as u32));
    while !rest.is_empty() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Not enough room: the frame is dropped, the chains are back.
            give_back(queue, used.len());
            return Rx::Dropped;
        };
        let h = chain.head_index();
        let Some(sg) = buffers(chain, mem, true).filter(|sg| !sg.is_empty()) else {
            // A bad chain amid the frame: every chain of it goes back to
            // the guest empty, none is lost.
            for (head, _) in used {
                complete(queue, mem, head, 0);
            }
            complete(queue, mem, h, 0);
            return Rx::Dropped;
        };
        let k = rest.len().min(sg.len() as usize);
        if sg.write_at(0, &rest[..k]).is_err() {
            give_back(queue, used.len() + 1);
            return Rx::Dropped;
        }
        used.push((h, k as u32));
        rest = &rest[k..];
    }
    set_num_buffers(&first, used.len() as u16);
    for (head, len) in used {
        complete(queue, mem, head, len);
    }
    Rx::Frame
}

/// Writes `num_buffers` into the header at the start of `sg` (the back
/// end leaves it alone).
fn set_num_buffers(sg: &SgList<'_>, n: u16) {
    // `sg` holds at least a header.
    let _ = sg.write_at(NUM_BUFFERS_OFFSET, &n.to_le_bytes());
}

/// Transmits one chain of `queue` through `backend`.
pub(super) fn transmit(backend: &dyn NetBackend, queue: &mut Queue, mem: &GuestMemory) -> Tx {
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return Tx::Empty;
    };
    let head = chain.head_index();
    let Some(frame) = buffers(chain, mem, false).filter(|sg| sg.len() >= NET_HDR_LEN as u64) else {
        complete(queue, mem, head, 0);
        return Tx::Dropped;
    };
    let written = backend.write_frame(&iovec(&frame));
    match written {
        Ok(_) => {
            complete(queue, mem, head, 0);
            Tx::Sent
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            give_back(queue, 1);
            Tx::Blocked
        }
        Err(e) => {
            // A link that is down (EIO) or a frame the back end refuses:
            // dropped, as on a wire.
            debug!("virtio-net: frame of {} bytes dropped: {e}", frame.len());
            complete(queue, mem, head, 0);
            Tx::Dropped
        }
    }
}

/// A control-queue command: class, command and the start of its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CtrlCommand {
    /// `VIRTIO_NET_CTRL_*` class.
    pub(super) class: u8,
    /// Command within the class.
    pub(super) cmd: u8,
    /// Data bytes present (up to 8 kept).
    pub(super) len: usize,
    /// The first 8 data bytes.
    pub(super) data: [u8; 8],
}

/// Answers up to `budget` control commands, each with the ack `answer`
/// gives (`VIRTIO_NET_OK` or `VIRTIO_NET_ERR`); a malformed command gets
/// `VIRTIO_NET_ERR` if it has room for an ack. Returns how many chains it
/// took.
pub(super) fn control(
    queue: &mut Queue,
    mem: &GuestMemory,
    budget: usize,
    mut answer: impl FnMut(&CtrlCommand) -> u8,
) -> usize {
    let err = virtio_bindings::virtio_net::VIRTIO_NET_ERR as u8;
    let mut taken = 0;
    while taken < budget {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        taken += 1;
        let head = chain.head_index();
        let mut input = SgList::new(mem);
        let mut output = SgList::new(mem);
        let mut ok = true;
        for (i, d) in chain.enumerate() {
            let list = if d.is_write_only() {
                &mut output
            } else {
                ok &= output.is_empty();
                &mut input
            };
            ok &= i < MAX_CHAIN && list.push_buffer(d.addr(), d.len());
        }
        let mut head_bytes = [0u8; 2];
        let command = (ok && input.read_at(0, &mut head_bytes).is_ok()).then(|| {
            let len = (input.len() - 2) as usize;
            let mut data = [0u8; 8];
            let n = len.min(data.len());
            let _ = input.read_at(2, &mut data[..n]);
            CtrlCommand {
                class: head_bytes[0],
                cmd: head_bytes[1],
                len,
                data,
            }
        });
        let ack = command.as_ref().map_or(err, &mut answer);
        // The ack is the last device-writable byte.
        let written = match output.len() {
            0 => 0,
            n if output.write_at(n - 1, &[ack]).is_ok() => 1,
            _ => 0,
        };
        complete(queue, mem, head, written);
    }
    taken
}
