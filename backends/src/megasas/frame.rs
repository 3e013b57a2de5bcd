//! MFI frames: the 64-byte command frames a driver posts, their header,
//! command codes, flags and completion statuses. Every field is decoded
//! little-endian from the frame's bytes.

/// Size of a frame (more frames may follow it for long SGLs).
pub const FRAME_SIZE: usize = 64;

/// Offsets of header fields.
pub mod offset {
    /// Command code.
    pub const CMD: u64 = 0x00;
    /// Size of the sense buffer (in), of the sense data written (out).
    pub const SENSE_LEN: u64 = 0x01;
    /// Completion status, written last.
    pub const CMD_STATUS: u64 = 0x02;
    /// SCSI status.
    pub const SCSI_STATUS: u64 = 0x03;
    /// Sense buffer address (LD I/O and pass-through frames).
    pub const SENSE_ADDR: usize = 0x18;
    /// First LBA (LD I/O frames).
    pub const LBA: usize = 0x20;
    /// SGL of LD I/O and DCMD frames.
    pub const IO_SGL: u64 = 0x28;
    /// CDB (pass-through frames).
    pub const CDB: usize = 0x20;
    /// SGL of pass-through frames.
    pub const PASS_SGL: u64 = 0x30;
    /// DCMD opcode.
    pub const OPCODE: usize = 0x18;
    /// DCMD mailbox.
    pub const MBOX: usize = 0x1c;
    /// INIT: address of the queue information.
    pub const QINFO: usize = 0x18;
    /// ABORT: context of the frame to abort.
    pub const ABORT_CONTEXT: usize = 0x18;
    /// ABORT: address of the frame to abort.
    pub const ABORT_ADDR: usize = 0x20;
}

/// Command codes.
pub mod cmd {
    /// Set up the reply queue.
    pub const INIT: u8 = 0x00;
    /// Read from a logical drive.
    pub const LD_READ: u8 = 0x01;
    /// Write to a logical drive.
    pub const LD_WRITE: u8 = 0x02;
    /// SCSI pass-through to a logical drive.
    pub const LD_SCSI_IO: u8 = 0x03;
    /// SCSI pass-through to a physical drive.
    pub const PD_SCSI_IO: u8 = 0x04;
    /// Direct (firmware) command.
    pub const DCMD: u8 = 0x05;
    /// Abort a frame.
    pub const ABORT: u8 = 0x06;
}

/// Frame flags.
pub mod flags {
    /// Complete in place only: not posted to the reply queue.
    pub const DONT_POST: u16 = 0x0001;
    /// 64-bit SGEs.
    pub const SGL64: u16 = 0x0002;
    /// 64-bit sense buffer address.
    pub const SENSE64: u16 = 0x0004;
    /// IEEE SGEs (with SGL64 set too, by Linux).
    pub const IEEE: u16 = 0x0020;
}

/// Completion statuses (`cmd_status`).
pub mod status {
    /// Success.
    pub const OK: u8 = 0x00;
    /// Unknown command code.
    pub const INVALID_CMD: u8 = 0x01;
    /// Unknown DCMD opcode.
    pub const INVALID_DCMD: u8 = 0x02;
    /// Bad parameter (an INIT's queue outside guest memory).
    pub const INVALID_PARAMETER: u8 = 0x03;
    /// The frame to abort cannot be aborted.
    pub const ABORT_NOT_POSSIBLE: u8 = 0x05;
    /// No such drive.
    pub const DEVICE_NOT_FOUND: u8 = 0x0c;
    /// Cache flush failed.
    pub const FLUSH_FAILED: u8 = 0x15;
    /// The SCSI command failed; its sense data is in the sense buffer.
    pub const SCSI_DONE_WITH_ERROR: u8 = 0x2d;
    /// Not in this firmware state.
    pub const WRONG_STATE: u8 = 0x32;
    /// The SGL is malformed or points outside guest memory.
    pub const INVALID_SGL: u8 = 0x3c;
    /// What a driver writes before posting a frame it polls.
    pub const INVALID_STATUS: u8 = 0xff;
}

/// A frame, as read from guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    bytes: [u8; FRAME_SIZE],
}

impl Frame {
    /// The frame made of `bytes`.
    pub fn new(bytes: [u8; FRAME_SIZE]) -> Self {
        Frame { bytes }
    }

    /// The frame's bytes.
    pub fn bytes(&self) -> &[u8; FRAME_SIZE] {
        &self.bytes
    }

    /// The byte at `at`.
    pub fn u8(&self, at: usize) -> u8 {
        self.bytes[at % FRAME_SIZE]
    }

    /// The little-endian u16 at `at` (within the frame).
    pub fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.u8(at), self.u8(at + 1)])
    }

    /// The little-endian u32 at `at` (within the frame).
    pub fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.u8(at),
            self.u8(at + 1),
            self.u8(at + 2),
            self.u8(at + 3),
        ])
    }

    /// The little-endian u64 at `at` (within the frame).
    pub fn u64(&self, at: usize) -> u64 {
        u64::from(self.u32(at)) | u64::from(self.u32(at + 4)) << 32
    }

    /// Command code.
    pub fn cmd(&self) -> u8 {
        self.u8(0x00)
    }

    /// Size of the sense buffer.
    pub fn sense_len(&self) -> u8 {
        self.u8(0x01)
    }

    /// Target (logical drive) id.
    pub fn target(&self) -> u8 {
        self.u8(0x04)
    }

    /// LUN (pass-through frames).
    pub fn lun(&self) -> u8 {
        self.u8(0x05)
    }

    /// Number of SGEs.
    pub fn sge_count(&self) -> u8 {
        self.u8(0x07)
    }

    /// The context the driver gets back in the reply queue: 64 bits when
    /// the queue was set up for it, else the low 32.
    pub fn context(&self, context64: bool) -> u64 {
        if context64 {
            self.u64(0x08)
        } else {
            u64::from(self.u32(0x08))
        }
    }

    /// Flags ([`flags`]).
    pub fn flags(&self) -> u16 {
        self.u16(0x10)
    }

    /// Whether the frame completes in place only.
    pub fn dont_post(&self) -> bool {
        self.flags() & flags::DONT_POST != 0
    }

    /// Data length: bytes, or blocks for LD_READ and LD_WRITE.
    pub fn data_len(&self) -> u32 {
        self.u32(0x14)
    }

    /// The sense buffer's address: 64 bits with SENSE64, else 32.
    pub fn sense_addr(&self) -> u64 {
        if self.flags() & flags::SENSE64 != 0 {
            self.u64(offset::SENSE_ADDR)
        } else {
            u64::from(self.u32(offset::SENSE_ADDR))
        }
    }

    /// The 16 CDB bytes of a pass-through frame.
    pub fn cdb(&self) -> &[u8] {
        &self.bytes[offset::CDB..offset::CDB + 16]
    }

    /// The 12 mailbox bytes of a DCMD frame.
    pub fn mbox(&self) -> &[u8] {
        &self.bytes[offset::MBOX..offset::MBOX + 12]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_little_endian() {
        let mut b = [0u8; FRAME_SIZE];
        b[0] = cmd::LD_SCSI_IO;
        b[1] = 96;
        b[4] = 2;
        b[5] = 1;
        b[7] = 3;
        b[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        b[0x10..0x12].copy_from_slice(&(flags::DONT_POST | flags::SENSE64).to_le_bytes());
        b[0x14..0x18].copy_from_slice(&4096u32.to_le_bytes());
        b[0x18..0x20].copy_from_slice(&0x1_0000_2000u64.to_le_bytes());
        b[0x20] = 0x28;
        let f = Frame::new(b);
        assert_eq!(f.bytes(), &b);
        assert_eq!(
            (f.cmd(), f.sense_len(), f.target(), f.lun(), f.sge_count()),
            (3, 96, 2, 1, 3)
        );
        assert_eq!(f.context(false), 0x5566_7788);
        assert_eq!(f.context(true), 0x1122_3344_5566_7788);
        assert!(f.dont_post());
        assert_eq!(f.data_len(), 4096);
        assert_eq!(f.sense_addr(), 0x1_0000_2000);
        assert_eq!(f.cdb()[0], 0x28);
        assert_eq!(f.cdb().len(), 16);
        assert_eq!(f.mbox(), &b[0x1c..0x28]);
        // Without SENSE64, the high half of the sense address is ignored.
        b[0x10] = 0;
        assert_eq!(Frame::new(b).sense_addr(), 0x2000);
        // Reads past the frame wrap instead of panicking.
        assert_eq!(f.u64(60), u64::from(f.u32(60)) | u64::from(f.u32(0)) << 32);
    }
}
