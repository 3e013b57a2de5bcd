//! The server side of DMA by message: requests the device queued on its
//! [`crate::message_dma::MessageDma`] go out as DMA_READ/DMA_WRITE
//! commands after the current replies, and the client's replies are
//! matched to them by message id.

use super::connection::{Connection, Session};
use super::served_device::ServedDevice;
use crate::message_dma::{decode_reply, encode_request, MessageDmaOp, MAX_PENDING_REQUESTS};
use crate::wire::{cmd, flags, Header, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};

fn command_of(op: &MessageDmaOp) -> u16 {
    match op {
        MessageDmaOp::Read { .. } => cmd::DMA_READ,
        MessageDmaOp::Write { .. } => cmd::DMA_WRITE,
    }
}

/// Sends queued message-DMA requests, up to [`MAX_PENDING_REQUESTS`]
/// outstanding. Requests that cannot be sent fail at once.
pub(super) fn pump(conn: &mut Connection, dev: &mut ServedDevice) {
    while conn.session.negotiated && conn.session.pending.len() < MAX_PENDING_REQUESTS {
        let Some(req) = dev.message_dma.pop() else {
            return;
        };
        let (address, len, access) = match &req.op {
            MessageDmaOp::Read { address, len } => (*address, *len as u64, DMA_MAP_FLAG_READ),
            MessageDmaOp::Write { address, data } => {
                (*address, data.len() as u64, DMA_MAP_FLAG_WRITE)
            }
        };
        // The client takes what it said it can receive, and QEMU's no more
        // than what we said we can (it checks our DMA requests against it).
        let max_xfer = conn
            .session
            .client_max_xfer
            .min(dev.config.max_data_xfer_size);
        let errno = if len == 0 || len > u64::from(max_xfer) {
            Some(libc::E2BIG)
        } else {
            match dev.dma.find(address, len) {
                None => Some(libc::EFAULT),
                // Not what the client mapped it for (a write to its ROM).
                Some(r) if r.flags & access == 0 => Some(libc::EACCES),
                Some(_) => None,
            }
        };
        if let Some(e) = errno {
            dev.lifecycle().message_dma_done(req.id, Err(e));
            continue;
        }
        let payload = encode_request(&req.op, conn.session.dma_layout);
        let msg_id = conn.queue_command(command_of(&req.op), payload);
        conn.session.pending.insert(msg_id, (req.id, req.op));
    }
}

/// Matches a reply to one of our commands and hands the result to the
/// device; false if it is unsolicited.
pub(super) fn complete(
    session: &mut Session,
    dev: &mut ServedDevice,
    hdr: &Header,
    payload: &[u8],
) -> bool {
    let matches = session
        .pending
        .get(&hdr.msg_id)
        .is_some_and(|(_, op)| hdr.cmd == command_of(op));
    if !matches {
        return false;
    }
    let Some((id, op)) = session.pending.remove(&hdr.msg_id) else {
        return false;
    };
    let result = if hdr.flags & flags::ERROR != 0 {
        Err(if hdr.error_no == 0 || hdr.error_no > 4096 {
            libc::EIO
        } else {
            hdr.error_no as i32
        })
    } else {
        decode_reply(&op, session.dma_layout, payload)
    };
    dev.lifecycle().message_dma_done(id, result);
    true
}

/// The client is gone: every request outstanding or queued fails.
pub(super) fn fail_all(session: &mut Session, dev: &mut ServedDevice) {
    for (id, _) in std::mem::take(&mut session.pending).into_values() {
        dev.lifecycle().message_dma_done(id, Err(libc::ECONNRESET));
    }
    for id in dev.message_dma.drain() {
        dev.lifecycle().message_dma_done(id, Err(libc::ECONNRESET));
    }
}
