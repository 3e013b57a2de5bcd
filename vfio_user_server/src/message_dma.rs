//! DMA by message: server-to-client `DMA_READ`/`DMA_WRITE` for guest
//! memory the client mapped without an fd.
//!
//! A device queues a request on its [`MessageDma`] handle (from its
//! `DeviceContext`); the server sends it from the event loop once the
//! current command is handled (never from inside a handler, where the
//! client may be blocked waiting for our reply), matches the client's reply
//! by message id and hands the result to [`crate::Lifecycle::message_dma_done`].
//! Cloud Hypervisor's client cannot receive server commands; it always maps
//! memory with fds, so it never sees one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::wire::{read_u32, read_u64, DmaAccess, Encoder};

/// Most server-to-client requests outstanding at once; more wait in the
/// queue.
pub const MAX_PENDING_REQUESTS: usize = 16;
/// Most requests a device may queue before new ones are refused.
pub const MAX_QUEUED_REQUESTS: usize = 1024;

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageDmaOp {
    /// Read `len` bytes at `address`.
    Read {
        /// Guest address.
        address: u64,
        /// Byte count.
        len: u32,
    },
    /// Write `data` at `address`.
    Write {
        /// Guest address.
        address: u64,
        /// The bytes.
        data: Vec<u8>,
    },
}

/// A queued request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageDmaRequest {
    /// Id handed back in the completion.
    pub id: u64,
    /// The operation.
    pub op: MessageDmaOp,
}

/// Wire layout of DMA_READ/DMA_WRITE used with a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MessageDmaLayout {
    /// The spec and libvfio-user: `address u64, count u64`, data at 16.
    Spec,
    /// QEMU's client: `address u64, count u32`, data at 12, 4 pad bytes,
    /// header-only DMA_WRITE replies.
    Qemu,
}

/// A device's handle for queueing message DMA; cheap to clone.
#[derive(Clone, Default)]
pub struct MessageDma {
    queue: Arc<Mutex<VecDeque<MessageDmaRequest>>>,
    next_id: Arc<AtomicU64>,
}

impl MessageDma {
    fn push(&self, op: MessageDmaOp) -> Option<u64> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_QUEUED_REQUESTS {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        q.push_back(MessageDmaRequest { id, op });
        Some(id)
    }

    /// Queues a read; returns its id, or None when the queue is full.
    pub fn read(&self, address: u64, len: u32) -> Option<u64> {
        self.push(MessageDmaOp::Read { address, len })
    }

    /// Queues a write; returns its id, or None when the queue is full.
    pub fn write(&self, address: u64, data: Vec<u8>) -> Option<u64> {
        self.push(MessageDmaOp::Write { address, data })
    }

    /// Takes the next request.
    pub(crate) fn pop(&self) -> Option<MessageDmaRequest> {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// Drops every queued request, returning their ids.
    pub(crate) fn drain(&self) -> Vec<u64> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.drain(..).map(|r| r.id).collect()
    }
}

/// Encodes the payload of a request.
pub(crate) fn encode_request(op: &MessageDmaOp, layout: MessageDmaLayout) -> Vec<u8> {
    let mut e = Encoder::default();
    match (op, layout) {
        (MessageDmaOp::Read { address, len }, MessageDmaLayout::Spec) => {
            e.bytes(
                &DmaAccess {
                    address: *address,
                    count: *len as u64,
                }
                .encode(),
            );
        }
        (MessageDmaOp::Write { address, data }, MessageDmaLayout::Spec) => {
            e.bytes(
                &DmaAccess {
                    address: *address,
                    count: data.len() as u64,
                }
                .encode(),
            )
            .bytes(data);
        }
        (MessageDmaOp::Read { address, len }, MessageDmaLayout::Qemu) => {
            e.u64(*address).u32(*len).u32(0);
        }
        (MessageDmaOp::Write { address, data }, MessageDmaLayout::Qemu) => {
            e.u64(*address).u32(data.len() as u32).bytes(data).u32(0);
        }
    }
    e.0
}

/// Decodes a success reply: the data of a read, nothing for a write.
pub(crate) fn decode_reply(
    op: &MessageDmaOp,
    layout: MessageDmaLayout,
    payload: &[u8],
) -> Result<Vec<u8>, i32> {
    match (op, layout) {
        (MessageDmaOp::Read { address, len }, MessageDmaLayout::Spec) => {
            let head = DmaAccess::decode(payload).map_err(|_| libc::EPROTO)?;
            let data = &payload[DmaAccess::SIZE..];
            if head.address != *address || head.count != *len as u64 || data.len() != *len as usize
            {
                return Err(libc::EPROTO);
            }
            Ok(data.to_vec())
        }
        (MessageDmaOp::Read { address, len }, MessageDmaLayout::Qemu) => {
            let (Ok(a), Ok(n)) = (read_u64(payload, 0), read_u32(payload, 8)) else {
                return Err(libc::EPROTO);
            };
            let data = payload.get(12..12 + *len as usize).ok_or(libc::EPROTO)?;
            if a != *address || n != *len {
                return Err(libc::EPROTO);
            }
            Ok(data.to_vec())
        }
        (MessageDmaOp::Write { address, data }, MessageDmaLayout::Spec) => {
            // libvfio-user echoes the head; accept a header-only reply too.
            if !payload.is_empty() {
                let head = DmaAccess::decode(payload).map_err(|_| libc::EPROTO)?;
                if head.address != *address || head.count != data.len() as u64 {
                    return Err(libc::EPROTO);
                }
            }
            Ok(Vec::new())
        }
        (MessageDmaOp::Write { .. }, MessageDmaLayout::Qemu) => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip() {
        let r = MessageDmaOp::Read {
            address: 0x1000,
            len: 4,
        };
        assert_eq!(encode_request(&r, MessageDmaLayout::Spec).len(), 16);
        assert_eq!(encode_request(&r, MessageDmaLayout::Qemu).len(), 16);
        let mut spec = encode_request(&r, MessageDmaLayout::Spec);
        spec.extend_from_slice(b"abcd");
        assert_eq!(
            decode_reply(&r, MessageDmaLayout::Spec, &spec).unwrap(),
            b"abcd"
        );
        assert_eq!(
            decode_reply(&r, MessageDmaLayout::Spec, &spec[..18]),
            Err(libc::EPROTO)
        );
        let mut q = Vec::new();
        q.extend_from_slice(&0x1000u64.to_le_bytes());
        q.extend_from_slice(&4u32.to_le_bytes());
        q.extend_from_slice(b"wxyz");
        q.extend_from_slice(&[0; 4]);
        assert_eq!(
            decode_reply(&r, MessageDmaLayout::Qemu, &q).unwrap(),
            b"wxyz"
        );
        let w = MessageDmaOp::Write {
            address: 8,
            data: vec![1, 2, 3],
        };
        assert_eq!(encode_request(&w, MessageDmaLayout::Qemu).len(), 12 + 3 + 4);
        assert!(decode_reply(&w, MessageDmaLayout::Qemu, &[]).is_ok());
        assert!(decode_reply(&w, MessageDmaLayout::Spec, &[0; 3]).is_err());
    }

    #[test]
    fn queue_is_bounded() {
        let m = MessageDma::default();
        for _ in 0..MAX_QUEUED_REQUESTS {
            assert!(m.read(0, 1).is_some());
        }
        assert!(m.read(0, 1).is_none());
        assert_eq!(m.drain().len(), MAX_QUEUED_REQUESTS);
    }
}
