//! A SCSI disk, independent of the host bus adapter that carries its
//! commands (a MegaRAID controller's pass-through frames, a virtio-scsi
//! request queue).
//!
//! [`ScsiDisk`] is a direct-access block device over a
//! [`crate::storage::BlockBackend`], moving data with the shared block I/O
//! engine ([`crate::block_io`]) on the caller's thread or on I/O threads.
//! It implements TEST UNIT READY, REQUEST SENSE, INQUIRY (standard data and
//! VPD pages 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2), MODE SENSE(6)/(10) (the
//! caching page with the write cache off, the control page, all pages),
//! START STOP UNIT, READ CAPACITY(10)/(16), READ and WRITE (6, 10, 12,
//! 16), SYNCHRONIZE CACHE(10)/(16), REPORT LUNS and REPORT SUPPORTED
//! OPERATION CODES. Anything else fails with ILLEGAL REQUEST, INVALID
//! COMMAND OPERATION CODE; every error carries fixed-format sense data
//! ([`sense`]).
//!
//! Writes are written through: a write is durable on the back end before
//! it completes, so initiators that never synchronise the cache (the write
//! cache is reported off) lose nothing.

pub mod cdb;
mod disk;
pub mod inquiry;
pub mod mode;
mod rsoc;
pub mod sense;

pub use disk::{
    Outcome, Plan, ReadWrite, ScsiDisk, ScsiDiskConfig, ScsiDiskError, Transfer, TransferFailure,
    TransferKind, BLOCK_SIZE, STATUS_CHECK_CONDITION, STATUS_GOOD,
};
pub use sense::Sense;
