//! The attached client's byte stream: receiving messages with their fds,
//! cutting them out of the stream, and queueing and flushing what we send.
//!
//! Bytes are received into a buffer, complete messages are handed out in
//! arrival order, and replies are queued and flushed; nothing blocks, and
//! a client that does not read its replies stops being read (bounded
//! memory).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use log::debug;

use super::handover::{from_hex, to_hex, ConnectionState, FdTable, HandoverError, RxFdsState};
use crate::device::Interest;
use crate::message_dma::{MessageDmaLayout, MessageDmaOp};
use crate::socket::{recv_with_fds, send_with_fds};
use crate::wire::{flags, Header, DEFAULT_MAX_DATA_XFER_SIZE, HEADER_SIZE};

/// Receive buffer kept between messages; grown only for a larger message.
const RX_BUFFER: usize = 64 * 1024;
/// Reads per wake-up: bounded work keeps other devices on the loop served.
const READS_PER_WAKEUP: usize = 64;
/// Time the messages of one wake-up may take once one is handled: a read
/// can hold a thousand messages, each allowed to be slow (a dirty-page
/// report walks up to 2^26 pages). The rest wait in the buffer for the
/// loop's next turn, after the other fds.
const WORK_PER_WAKEUP: Duration = Duration::from_millis(2);

/// What a handler answers.
pub(crate) enum Reply {
    /// Success with this payload and fds.
    Ok(Vec<u8>, Vec<RawFd>),
    /// Error with this errno.
    Err(i32),
}

impl Reply {
    pub(crate) fn empty() -> Reply {
        Reply::Ok(Vec::new(), Vec::new())
    }
    pub(crate) fn data(v: Vec<u8>) -> Reply {
        Reply::Ok(v, Vec::new())
    }
}

/// What the server knows of the client beyond its byte stream.
pub(super) struct Session {
    /// VERSION was answered.
    pub(super) negotiated: bool,
    /// Client's `max_data_xfer_size` (bounds what we send it).
    pub(super) client_max_xfer: u32,
    /// Layout of our DMA_READ/DMA_WRITE for this client.
    pub(super) dma_layout: MessageDmaLayout,
    /// Id of our next server-to-client command.
    pub(super) next_msg_id: u16,
    /// Our commands awaiting a reply, by message id.
    pub(super) pending: HashMap<u16, (u64, MessageDmaOp)>,
}

/// A queued message: its header and payload go out as two iovecs, so the
/// payload a handler built is never copied again.
struct Outgoing {
    head: [u8; HEADER_SIZE],
    payload: Vec<u8>,
    sent: usize,
    /// Borrowed fds (owned by the device), sent with the first byte.
    fds: Vec<RawFd>,
}

impl Outgoing {
    fn len(&self) -> usize {
        HEADER_SIZE + self.payload.len()
    }
}

/// fds that arrived with the message starting at `offset` of the receive
/// buffer.
struct ReceivedFds {
    offset: usize,
    fds: Vec<File>,
    /// The control data was truncated: some fds were lost.
    truncated: bool,
}

/// Offset of the last message that starts in `rx[from..filled]`, walking
/// the messages from the start of the buffer (always a message start) the
/// way `process_buffer` will consume them.
fn last_message_start(rx: &[u8], filled: usize, from: usize) -> Option<usize> {
    let mut at = 0;
    let mut last = None;
    while at < filled {
        if at >= from {
            last = Some(at);
        }
        let Ok(h) = Header::decode(rx.get(at..filled).unwrap_or(&[])) else {
            break;
        };
        // A size below the header consumes the header only; an oversized
        // one its whole claimed body (skipped).
        at = at.saturating_add((h.msg_size as usize).max(HEADER_SIZE));
    }
    last
}

/// Where the reader is in the byte stream.
enum ReadState {
    /// Collecting a message into `rx`.
    Message,
    /// Skipping the body of an oversized message.
    Discard(usize),
}

/// One complete message as received: header, payload, the fds that came
/// with it, and whether some of its fds were lost (truncated control
/// data).
pub(super) struct Message<'a> {
    /// The header.
    pub(super) header: Header,
    /// Everything after the header.
    pub(super) payload: &'a [u8],
    /// fds received with it.
    pub(super) fds: Vec<File>,
    /// Some fds were lost.
    pub(super) truncated: bool,
}

/// What handles each complete message: the reply to queue, with the header
/// it answers, if one is due.
pub(super) type MessageHandler<'h> =
    dyn FnMut(&mut Session, Message<'_>) -> Option<(Header, Reply)> + 'h;

/// The attached client.
pub(super) struct Connection {
    stream: UnixStream,
    rx: Vec<u8>,
    rx_len: usize,
    /// fds received, by the offset in `rx` of the message they came with.
    rx_fds: Vec<ReceivedFds>,
    read_state: ReadState,
    tx: VecDeque<Outgoing>,
    tx_bytes: usize,
    /// When the connection was accepted (for the VERSION deadline).
    pub(super) accepted: Instant,
    max_msg_size: usize,
    max_queued_reply_bytes: usize,
    /// Messages wait in `rx`: handling stopped at the reply limit or after
    /// [`WORK_PER_WAKEUP`]. Nothing more is read until they are handled.
    backlog: bool,
    /// The client as the protocol sees it.
    pub(super) session: Session,
}

impl Connection {
    /// Takes `stream` as a client connection; messages above
    /// `max_msg_size` are refused, and reading stops while more than
    /// `max_queued_reply_bytes` wait to be sent.
    pub(super) fn new(
        stream: UnixStream,
        max_msg_size: usize,
        max_queued_reply_bytes: usize,
    ) -> io::Result<Connection> {
        stream.set_nonblocking(true)?;
        Ok(Connection {
            stream,
            rx: vec![0; RX_BUFFER],
            rx_len: 0,
            rx_fds: Vec::new(),
            read_state: ReadState::Message,
            tx: VecDeque::new(),
            tx_bytes: 0,
            accepted: Instant::now(),
            max_msg_size,
            max_queued_reply_bytes,
            backlog: false,
            session: Session {
                negotiated: false,
                client_max_xfer: DEFAULT_MAX_DATA_XFER_SIZE,
                dma_layout: MessageDmaLayout::Spec,
                next_msg_id: 1,
                pending: HashMap::new(),
            },
        })
    }

    /// The socket's fd.
    pub(super) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// What to watch the socket for.
    pub(super) fn interest(&self) -> Interest {
        Interest {
            read: self.tx_bytes < self.max_queued_reply_bytes && !self.backlog,
            write: !self.tx.is_empty(),
        }
    }

    /// Whether received messages wait that can be handled now, without
    /// reading (the loop comes back for them before it sleeps).
    pub(super) fn has_backlog(&self) -> bool {
        self.backlog && self.tx_bytes < self.max_queued_reply_bytes
    }

    /// Whether the peer has closed or shut down its end.
    pub(super) fn peer_hung_up(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Handles the messages waiting from before, then reads what is
    /// available and hands every complete message to `handle`, queueing
    /// the reply it returns (none for a message that needs none), as far
    /// as the reply limit and [`WORK_PER_WAKEUP`] allow. Returns false once
    /// the client is gone or broke the framing of fds.
    pub(super) fn read_messages(&mut self, handle: &mut MessageHandler<'_>) -> bool {
        if self.backlog {
            self.process_buffer(handle);
            if self.backlog {
                return true;
            }
        }
        for _ in 0..READS_PER_WAKEUP {
            if self.tx_bytes >= self.max_queued_reply_bytes {
                return true;
            }
            if self.rx_len == self.rx.len() {
                // Only reached when a message is bigger than the buffer.
                let want = (self.rx.len() * 2).min(self.max_msg_size);
                self.rx.resize(want.max(self.rx.len()), 0);
            }
            // Read as much as is there: header and body in one go, several
            // pipelined messages at once. Linux hands the fds of a message
            // to the recvmsg that reaches its first segment, together with
            // the bytes before it, and stops right after that segment: so
            // fds belong to the last message that starts in this read
            // (clients send each message's fds with its first byte).
            let want = match self.read_state {
                ReadState::Discard(left) => left,
                ReadState::Message => self.rx.len() - self.rx_len,
            };
            let start = self.rx_len;
            let end = self.rx.len().min(start.saturating_add(want));
            let r = match recv_with_fds(self.stream.as_raw_fd(), &mut self.rx[start..end]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("recv: {e}");
                    return false;
                }
            };
            if r.bytes == 0 {
                return false;
            }
            let got_fds = !r.fds.is_empty() || r.truncated;
            if got_fds && matches!(self.read_state, ReadState::Discard(_)) {
                // fds riding on a body being skipped are closed with it.
                drop(r.fds);
            } else if got_fds {
                let Some(offset) = last_message_start(&self.rx, start + r.bytes, start) else {
                    // fds not at a message start: protocol violation.
                    crate::warn_limited!("fds received mid-message; dropping the client");
                    return false;
                };
                if self.rx_fds.iter().any(|f| f.offset == offset) {
                    crate::warn_limited!("two sets of fds for one message; dropping the client");
                    return false;
                }
                self.rx_fds.push(ReceivedFds {
                    offset,
                    fds: r.fds,
                    truncated: r.truncated,
                });
            }
            self.rx_len += r.bytes;
            self.process_buffer(handle);
            if self.backlog {
                break;
            }
            let at_boundary = self.rx_len == 0 && matches!(self.read_state, ReadState::Message);
            if r.bytes < end - start || at_boundary {
                // Short read (the socket is most likely drained) or a whole
                // message handled: level-triggered epoll says if more came,
                // which saves a read that would fail with EAGAIN.
                break;
            }
        }
        true
    }

    /// Handles the complete messages in the receive buffer, in order,
    /// until the replies queued reach their limit or the messages have
    /// taken [`WORK_PER_WAKEUP`]; what is left sets `backlog`.
    fn process_buffer(&mut self, handle: &mut MessageHandler<'_>) {
        let started = Instant::now();
        let mut handled = 0usize;
        self.backlog = false;
        let mut consumed = 0;
        loop {
            let avail = self.rx_len - consumed;
            if let ReadState::Discard(left) = self.read_state {
                let n = left.min(avail);
                consumed += n;
                self.read_state = if left == n {
                    ReadState::Message
                } else {
                    ReadState::Discard(left - n)
                };
                if avail == n {
                    break;
                }
                continue;
            }
            if avail < HEADER_SIZE {
                break;
            }
            // A client that does not read its replies is not read either;
            // one whose messages take long shares the loop's turns.
            if self.tx_bytes >= self.max_queued_reply_bytes
                || (handled > 0 && started.elapsed() >= WORK_PER_WAKEUP)
            {
                self.backlog = true;
                break;
            }
            handled += 1;
            let hdr = match Header::decode(&self.rx[consumed..consumed + HEADER_SIZE]) {
                Ok(h) => h,
                Err(_) => break,
            };
            let size = hdr.msg_size as usize;
            if size < HEADER_SIZE || size > self.max_msg_size {
                // Answer, then skip whatever body the size claims.
                crate::warn_limited!("bad msg_size {size} for command {}", hdr.cmd);
                let body = size.saturating_sub(HEADER_SIZE);
                self.rx_fds.retain(|f| f.offset != consumed);
                consumed += HEADER_SIZE;
                self.read_state = ReadState::Discard(body);
                let errno = if size > self.max_msg_size {
                    libc::E2BIG
                } else {
                    libc::EINVAL
                };
                self.queue_reply(&hdr, Reply::Err(errno));
                continue;
            }
            if avail < size {
                break;
            }
            let (fds, truncated) = match self.rx_fds.iter().position(|f| f.offset == consumed) {
                Some(i) => {
                    let r = self.rx_fds.swap_remove(i);
                    (r.fds, r.truncated)
                }
                None => (Vec::new(), false),
            };
            let message = Message {
                header: hdr,
                payload: &self.rx[consumed + HEADER_SIZE..consumed + size],
                fds,
                truncated,
            };
            let reply = handle(&mut self.session, message);
            consumed += size;
            if let Some((hdr, reply)) = reply {
                self.queue_reply(&hdr, reply);
            }
        }
        self.rx.copy_within(consumed..self.rx_len, 0);
        self.rx_len -= consumed;
        // fds of messages still incomplete move with their bytes.
        self.rx_fds.retain(|f| f.offset >= consumed);
        for f in self.rx_fds.iter_mut() {
            f.offset -= consumed;
        }
        // Give back memory a large message made us take.
        if self.rx_len == 0 && self.rx.len() > RX_BUFFER {
            self.rx.truncate(RX_BUFFER);
            self.rx.shrink_to_fit();
        }
    }

    /// Queues the reply to `hdr`: header-only with the errno on error.
    pub(super) fn queue_reply(&mut self, hdr: &Header, reply: Reply) {
        let (h, payload, fds) = match reply {
            Reply::Ok(p, fds) => (hdr.reply(p.len()), p, fds),
            Reply::Err(e) => {
                debug!("command {} failed: errno {e}", hdr.cmd);
                (hdr.error_reply(e), Vec::new(), Vec::new())
            }
        };
        self.queue(h, payload, fds);
    }

    /// Queues a command of ours (`cmd` with `payload`) and returns its
    /// message id.
    pub(super) fn queue_command(&mut self, cmd: u16, payload: Vec<u8>) -> u16 {
        let msg_id = self.session.next_msg_id;
        self.session.next_msg_id = msg_id.wrapping_add(1);
        let hdr = Header {
            msg_id,
            cmd,
            msg_size: (HEADER_SIZE + payload.len()) as u32,
            flags: flags::TYPE_COMMAND,
            error_no: 0,
        };
        self.queue(hdr, payload, Vec::new());
        msg_id
    }

    fn queue(&mut self, h: Header, payload: Vec<u8>, fds: Vec<RawFd>) {
        self.tx_bytes += HEADER_SIZE + payload.len();
        self.tx.push_back(Outgoing {
            head: h.encode(),
            payload,
            sent: 0,
            fds,
        });
    }

    /// Sends queued messages until done or the socket is full.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        let fd = self.stream.as_raw_fd();
        while let Some(out) = self.tx.front_mut() {
            let fds: &[RawFd] = if out.sent == 0 { &out.fds } else { &[] };
            // Header and payload in one write: splitting off the head of a
            // large reply, so the client could wake earlier, cost a second
            // syscall (2 µs of server CPU per 4 KiB read) for no latency
            // gain that alternating runs could show (performance.md).
            let sent = if out.sent < HEADER_SIZE {
                send_with_fds(fd, &[&out.head[out.sent..], &out.payload], fds)
            } else {
                send_with_fds(fd, &[&out.payload[out.sent - HEADER_SIZE..]], fds)
            };
            match sent {
                Ok(n) => {
                    out.sent += n;
                    self.tx_bytes -= n;
                    if out.sent == out.len() {
                        self.tx.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Connection {
    /// Sends what is queued, waiting for the socket up to `timeout`; fails
    /// with `TimedOut` if the client does not take it in time.
    pub(super) fn flush_within(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.flush()?;
            if self.tx.is_empty() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let mut p = libc::pollfd {
                fd: self.fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut p, 1, ms) };
        }
    }

    /// The connection as it stands, for a hand-over: the socket, the
    /// session, and the bytes (with their fds) of the messages not handled
    /// yet: one received only in part, and complete ones left for the
    /// loop's next turn. Duplicates of the fds go to `fds`, which the
    /// state indexes. The reply queue must be empty
    /// ([`Connection::flush_within`]) and no message-DMA request pending.
    pub(super) fn export(&self, fds: &mut Vec<OwnedFd>) -> io::Result<ConnectionState> {
        if !self.tx.is_empty() || !self.session.pending.is_empty() {
            return Err(io::Error::other("messages are in flight"));
        }
        fds.push(self.stream.as_fd().try_clone_to_owned()?);
        let fd = fds.len() - 1;
        let mut rx_fds = Vec::with_capacity(self.rx_fds.len());
        for r in &self.rx_fds {
            let mut slots = Vec::with_capacity(r.fds.len());
            for f in &r.fds {
                fds.push(f.as_fd().try_clone_to_owned()?);
                slots.push(fds.len() - 1);
            }
            rx_fds.push(RxFdsState {
                offset: r.offset,
                fds: slots,
                truncated: r.truncated,
            });
        }
        Ok(ConnectionState {
            fd,
            negotiated: self.session.negotiated,
            client_max_xfer: self.session.client_max_xfer,
            dma_layout: self.session.dma_layout,
            next_msg_id: self.session.next_msg_id,
            rx: to_hex(&self.rx[..self.rx_len]),
            rx_fds,
            discard: match self.read_state {
                ReadState::Message => None,
                ReadState::Discard(n) => Some(n),
            },
        })
    }

    /// The connection [`Connection::export`] described, with its fds
    /// taken from `fds`; checked against the limits this server keeps.
    pub(super) fn import(
        state: &ConnectionState,
        fds: &mut FdTable,
        max_msg_size: usize,
        max_queued_reply_bytes: usize,
    ) -> Result<Connection, HandoverError> {
        let bad = |what: &str| HandoverError::Invalid(format!("connection: {what}"));
        let rx = from_hex(&state.rx).ok_or_else(|| bad("received bytes are not hex"))?;
        // At most a full receive buffer: one large message, or a buffer of
        // small ones.
        if rx.len() > max_msg_size.max(RX_BUFFER) || state.discard.is_some_and(|n| n > max_msg_size)
        {
            return Err(bad("more pending input than a receive buffer"));
        }
        let mut rx_fds = Vec::with_capacity(state.rx_fds.len());
        for r in &state.rx_fds {
            if r.offset >= rx.len() || rx_fds.iter().any(|f: &ReceivedFds| f.offset == r.offset) {
                return Err(bad("fds at no message start"));
            }
            let files = r
                .fds
                .iter()
                .map(|&i| fds.take(i).map(File::from))
                .collect::<Result<Vec<_>, _>>()?;
            rx_fds.push(ReceivedFds {
                offset: r.offset,
                fds: files,
                truncated: r.truncated,
            });
        }
        let stream = UnixStream::from(fds.take(state.fd)?);
        let mut conn = Connection::new(stream, max_msg_size, max_queued_reply_bytes)?;
        if conn.rx.len() < rx.len() {
            conn.rx.resize(rx.len(), 0);
        }
        conn.rx[..rx.len()].copy_from_slice(&rx);
        conn.rx_len = rx.len();
        conn.rx_fds = rx_fds;
        conn.read_state = state.discard.map_or(ReadState::Message, ReadState::Discard);
        conn.session.negotiated = state.negotiated;
        conn.session.client_max_xfer = state.client_max_xfer;
        conn.session.dma_layout = state.dma_layout;
        conn.session.next_msg_id = state.next_msg_id;
        // Complete messages the exporting server had not reached yet.
        conn.backlog = conn.rx_len > 0;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(size: u32) -> Vec<u8> {
        let mut m = Header {
            msg_size: size,
            ..Header::default()
        }
        .encode()
        .to_vec();
        m.resize(size.max(16) as usize, 0);
        m
    }

    #[test]
    fn fds_go_to_the_last_message_starting_in_a_read() {
        let mut rx = msg(32);
        rx.extend(msg(20));
        rx.extend(msg(40));
        // The read covered the 2nd and 3rd messages: the 3rd gets them.
        assert_eq!(last_message_start(&rx, rx.len(), 32), Some(52));
        // A read ending inside the 3rd message's header still starts it.
        assert_eq!(last_message_start(&rx, 60, 32), Some(52));
        // A read of the 1st message's body only: no message starts there.
        assert_eq!(last_message_start(&rx, 30, 10), None);
        assert_eq!(last_message_start(&rx, 32, 0), Some(0));
        // A size below the header consumes 16 bytes.
        let mut bad = msg(3);
        bad.extend(msg(16));
        assert_eq!(last_message_start(&bad, bad.len(), 1), Some(16));
        // An oversized message's claimed body is skipped whole.
        let mut huge = Header {
            msg_size: 1 << 30,
            ..Header::default()
        }
        .encode()
        .to_vec();
        huge.resize(64, 0);
        assert_eq!(last_message_start(&huge, 64, 0), Some(0));
    }
}
