//! The MFI register file of a 1078 ("ppc" in Linux): firmware state in the
//! outbound scratch pad, the inbound doorbell, the inbound queue ports,
//! and the outbound interrupt status, mask and doorbell-clear registers.
//!
//! Register accesses only change this state and tell the controller what
//! to do ([`Action`]); frames are fetched later, off the access path.

use serde::{Deserialize, Serialize};

/// Register offsets (the same in the memory BAR and the I/O BAR).
pub mod reg {
    /// Outbound message 0 (the firmware state, as the scratch pad).
    pub const OMSG0: u64 = 0x18;
    /// Inbound doorbell.
    pub const IDB: u64 = 0x20;
    /// Outbound interrupt status.
    pub const OSTS: u64 = 0x30;
    /// Outbound interrupt mask.
    pub const OMSK: u64 = 0x34;
    /// Inbound queue port: a frame address.
    pub const IQP: u64 = 0x40;
    /// Outbound doorbell register 0.
    pub const ODR0: u64 = 0x9c;
    /// Outbound doorbell clear register 0.
    pub const ODCR0: u64 = 0xa0;
    /// Outbound scratch pad 0: firmware state and limits.
    pub const OSP0: u64 = 0xb0;
    /// Inbound queue port, low half of a 64-bit frame address.
    pub const IQPL: u64 = 0xc0;
    /// Inbound queue port, high half.
    pub const IQPH: u64 = 0xc4;
}

/// Inbound doorbell bits.
pub mod doorbell {
    /// Abort every pending command.
    pub const ABORT: u32 = 0x01;
    /// Go back to READY, forgetting the reply queue.
    pub const READY: u32 = 0x02;
    /// Stop the adapter: the driver gave up on it.
    pub const STOP_ADP: u32 = 0x20;
    /// Reset the adapter (online controller reset).
    pub const ADP_RESET: u32 = 0x40;
}

/// Most commands outstanding at once (the driver uses one less).
pub const MAX_CMDS: u32 = 1000;
/// Most SGEs per frame.
pub const MAX_SGE: u32 = 80;
/// Scratch pad bit: MSI-X and IEEE SGLs are supported.
const SCRATCH_MSIX_IEEE: u32 = 0x0400_0000;
/// Outbound interrupt status bit of a reply (1078).
pub const OSTS_REPLY: u32 = 0x8000_0000;
/// The outbound interrupt mask bit of replies: set, they do not interrupt.
const OMSK_REPLY: u32 = 0x8000_0000;
/// Low bits of an inbound queue port value: frame count and a valid bit.
const IQP_FRAME_MASK: u32 = !0x1f;

/// Firmware state, in the top nibble of the scratch pad.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FwState {
    /// Waiting for INIT (power-on, after a reset).
    #[default]
    Ready,
    /// INIT done: the reply queue is set up.
    Operational,
    /// Stopped by the driver.
    Fault,
}

impl FwState {
    fn bits(self) -> u32 {
        match self {
            FwState::Ready => 0xb000_0000,
            FwState::Operational => 0xc000_0000,
            FwState::Fault => 0xf000_0000,
        }
    }
}

/// What a register write asks the controller to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing more.
    None,
    /// Fetch and run the frame at this guest address.
    Frame(u64),
    /// The inbound doorbell was written with these bits ([`doorbell`]).
    Doorbell(u32),
    /// Reply interrupts were unmasked while a reply was pending: raise one.
    Unmasked,
}

/// The register state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registers {
    /// Firmware state.
    pub state: FwState,
    /// Outbound interrupt mask.
    pub intr_mask: u32,
    /// A reply was posted and not yet acknowledged (OSTS bit 31).
    pub reply_pending: bool,
    /// High half of a 64-bit frame address, from IQPH.
    pub frame_hi: u32,
}

impl Default for Registers {
    fn default() -> Self {
        Registers {
            state: FwState::Ready,
            intr_mask: u32::MAX,
            reply_pending: false,
            frame_hi: 0,
        }
    }
}

impl Registers {
    /// Back to power-on: READY, interrupts masked, nothing pending.
    pub fn reset(&mut self) {
        *self = Registers::default();
    }

    /// The scratch pad: state, IEEE SGLs and MSI-X, SGEs and commands.
    pub fn scratch_pad(&self) -> u32 {
        self.state.bits() | SCRATCH_MSIX_IEEE | MAX_SGE << 16 | MAX_CMDS
    }

    /// Whether reply interrupts are unmasked.
    pub fn interrupts_enabled(&self) -> bool {
        self.intr_mask & OMSK_REPLY == 0
    }

    fn status(&self) -> u32 {
        if self.reply_pending {
            OSTS_REPLY
        } else {
            0
        }
    }

    /// The 32-bit register at `offset` (a multiple of 4).
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            reg::OMSG0 | reg::OSP0 => self.scratch_pad(),
            reg::OSTS | reg::ODR0 | reg::ODCR0 => self.status(),
            reg::OMSK => self.intr_mask,
            _ => 0,
        }
    }

    /// Writes `value` to the 32-bit register at `offset` (a multiple of
    /// 4); returns what the controller must do about it.
    pub fn write(&mut self, offset: u64, value: u32) -> Action {
        match offset {
            reg::IDB => return Action::Doorbell(value),
            reg::IQP => return Action::Frame(u64::from(value & IQP_FRAME_MASK)),
            reg::IQPL => {
                let hi = std::mem::take(&mut self.frame_hi);
                return Action::Frame(u64::from(hi) << 32 | u64::from(value & IQP_FRAME_MASK));
            }
            reg::IQPH => self.frame_hi = value,
            reg::OMSK => {
                let was = self.interrupts_enabled();
                self.intr_mask = value;
                if !was && self.interrupts_enabled() && self.reply_pending {
                    return Action::Unmasked;
                }
            }
            reg::OSTS | reg::ODCR0 if value & OSTS_REPLY != 0 => self.reply_pending = false,
            _ => {}
        }
        Action::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_pad_follows_the_state() {
        let mut r = Registers::default();
        assert_eq!(r.read(reg::OSP0), 0xb450_03e8);
        assert_eq!(r.read(reg::OMSG0), 0xb450_03e8);
        r.state = FwState::Operational;
        assert_eq!(r.read(reg::OSP0) >> 28, 0xc);
        r.state = FwState::Fault;
        assert_eq!(r.read(reg::OSP0) >> 28, 0xf);
        r.reset();
        assert_eq!(r, Registers::default());
    }

    #[test]
    fn queue_ports_and_doorbell() {
        let mut r = Registers::default();
        // Linux's ppc encoding: address | extra frames << 1 | 1.
        assert_eq!(
            r.write(reg::IQP, 0x1234_5600 | 3 << 1 | 1),
            Action::Frame(0x1234_5600)
        );
        assert_eq!(r.write(reg::IQPH, 0x1), Action::None);
        assert_eq!(
            r.write(reg::IQPL, 0x8000_0041),
            Action::Frame(0x1_8000_0040)
        );
        // The high half is used once.
        assert_eq!(r.write(reg::IQPL, 0x40), Action::Frame(0x40));
        assert_eq!(r.write(reg::IDB, 7), Action::Doorbell(7));
        assert_eq!(r.read(reg::IDB), 0);
        assert_eq!(r.write(0x100, 1), Action::None);
    }

    #[test]
    fn interrupt_status_mask_and_clear() {
        let mut r = Registers::default();
        assert!(!r.interrupts_enabled());
        r.reply_pending = true;
        assert_eq!(r.read(reg::OSTS), OSTS_REPLY);
        assert_eq!(r.read(reg::ODCR0), OSTS_REPLY);
        // Linux enables replies with ~0x80000000: pending, so interrupt.
        assert_eq!(r.write(reg::OMSK, !OMSK_REPLY), Action::Unmasked);
        assert!(r.interrupts_enabled());
        assert_eq!(r.read(reg::OMSK), !OMSK_REPLY);
        // Unmasking again does not.
        assert_eq!(r.write(reg::OMSK, 0), Action::None);
        // Clearing another bit keeps the reply pending.
        r.write(reg::ODCR0, 0x4);
        assert!(r.reply_pending);
        r.write(reg::ODCR0, OSTS_REPLY);
        assert_eq!(r.read(reg::OSTS), 0);
        r.reply_pending = true;
        r.write(reg::OSTS, u32::MAX);
        assert!(!r.reply_pending);
        // Unmasking with nothing pending.
        r.write(reg::OMSK, u32::MAX);
        assert_eq!(r.write(reg::OMSK, 0), Action::None);
    }
}
