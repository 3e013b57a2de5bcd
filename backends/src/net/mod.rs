//! Network back ends: where the frames of a virtio-net queue pair go.
//!
//! A [`NetBackend`] is one packet channel carrying frames with the 12-byte
//! virtio-net header in front, non-blocking: a [`Tap`] queue on the host,
//! or anything else that keeps frame boundaries (with the `test-support`
//! feature, `seqpacket`: a socket pair whose other end a test holds).

#[cfg(feature = "test-support")]
pub mod seqpacket;
mod tap;

use std::io;
use std::os::fd::{AsRawFd, RawFd};

pub use tap::{offload_flags, Tap, TapError, MAX_TAP_QUEUES, VNET_HDR_LEN};

use crate::storage::IoBuf;

/// One packet channel of a queue pair.
pub trait NetBackend: Send {
    /// The fd the event loop watches (readable: a frame waits; writable:
    /// a frame may be written).
    fn fd(&self) -> RawFd;

    /// Reads one frame into `bufs` and returns its length; `WouldBlock`
    /// when none waits. A frame larger than `bufs` is truncated to them
    /// (the length returned is then the length copied, or the whole
    /// frame's, as a TAP returns it) or lost with an error other than
    /// `WouldBlock`.
    fn read_frame(&self, bufs: &[IoBuf<'_>]) -> io::Result<usize>;

    /// Writes one frame gathered from `bufs`; `WouldBlock` when it cannot
    /// be taken now (nothing was written).
    fn write_frame(&self, bufs: &[IoBuf<'_>]) -> io::Result<usize>;

    /// Sets the offloads (`TUN_F_*`) frames handed to the guest may use.
    fn set_offload(&self, flags: u32) -> io::Result<()>;

    /// Whether the link is up.
    fn link_up(&self) -> bool;
}

impl NetBackend for Tap {
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn read_frame(&self, bufs: &[IoBuf<'_>]) -> io::Result<usize> {
        self.read_vectored(bufs)
    }

    fn write_frame(&self, bufs: &[IoBuf<'_>]) -> io::Result<usize> {
        self.write_vectored(bufs)
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags).map_err(io::Error::other)
    }

    fn link_up(&self) -> bool {
        self.is_up().unwrap_or(false)
    }
}
