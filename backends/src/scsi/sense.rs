//! Fixed-format sense data (SPC-4 4.5.3) for the errors a disk reports.

/// Length of the fixed-format sense data we return.
pub const FIXED_SENSE_LEN: usize = 18;

/// Response code of fixed-format sense for the current command.
const RESPONSE_CURRENT_FIXED: u8 = 0x70;
/// The VALID bit of byte 0: the INFORMATION field holds a value.
const VALID: u8 = 0x80;
/// Additional sense length of 18-byte fixed-format sense.
const ADDITIONAL_LEN: u8 = (FIXED_SENSE_LEN - 8) as u8;
/// SKSV: the sense-key specific bytes are valid.
const SKSV: u8 = 0x80;
/// C/D: the field pointer points into the CDB (not parameter data).
const FIELD_IN_CDB: u8 = 0x40;
/// BPV: the bit pointer is valid.
const BPV: u8 = 0x08;

/// Sense keys.
pub mod key {
    /// No error to report.
    pub const NO_SENSE: u8 = 0x0;
    /// The medium could not be read or written.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// The command, or a field in it, is not valid.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// The medium is write-protected.
    pub const DATA_PROTECT: u8 = 0x7;
}

/// Additional sense codes and qualifiers, as `(ASC, ASCQ)`.
pub mod asc {
    /// No additional information.
    pub const NO_ADDITIONAL_INFORMATION: (u8, u8) = (0x00, 0x00);
    /// Write error.
    pub const WRITE_ERROR: (u8, u8) = (0x0c, 0x00);
    /// Unrecovered read error.
    pub const UNRECOVERED_READ_ERROR: (u8, u8) = (0x11, 0x00);
    /// Invalid command operation code.
    pub const INVALID_COMMAND_OPERATION_CODE: (u8, u8) = (0x20, 0x00);
    /// Logical block address out of range.
    pub const LBA_OUT_OF_RANGE: (u8, u8) = (0x21, 0x00);
    /// Invalid field in CDB.
    pub const INVALID_FIELD_IN_CDB: (u8, u8) = (0x24, 0x00);
    /// Write protected.
    pub const WRITE_PROTECTED: (u8, u8) = (0x27, 0x00);
    /// Space allocation failed write protect (the back end is full).
    pub const SPACE_ALLOCATION_FAILED: (u8, u8) = (0x27, 0x07);
    /// Saving parameters not supported.
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: (u8, u8) = (0x39, 0x00);
}

/// Where in the CDB the invalid field is (sense-key specific bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// Byte of the CDB.
    pub byte: u16,
    /// Bit of that byte, if one bit is at fault.
    pub bit: Option<u8>,
}

/// Sense data of one error, encoded in fixed format by [`Sense::encode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    /// Sense key ([`key`]).
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// The INFORMATION field (the failing LBA of a medium error), if any.
    pub information: Option<u32>,
    /// The invalid CDB field, for ILLEGAL REQUEST.
    pub field: Option<FieldPointer>,
}

impl Sense {
    /// Sense with `key` and `(asc, ascq)`, nothing else.
    pub const fn new(key: u8, (asc, ascq): (u8, u8)) -> Self {
        Sense {
            key,
            asc,
            ascq,
            information: None,
            field: None,
        }
    }

    /// NO SENSE: what REQUEST SENSE returns when nothing is pending.
    pub const fn no_sense() -> Self {
        Sense::new(key::NO_SENSE, asc::NO_ADDITIONAL_INFORMATION)
    }

    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
    pub const fn invalid_opcode() -> Self {
        let mut s = Sense::new(key::ILLEGAL_REQUEST, asc::INVALID_COMMAND_OPERATION_CODE);
        s.field = Some(FieldPointer { byte: 0, bit: None });
        s
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN CDB at `byte` (and `bit`).
    pub const fn invalid_field(byte: u16, bit: Option<u8>) -> Self {
        let mut s = Sense::new(key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB);
        s.field = Some(FieldPointer { byte, bit });
        s
    }

    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const fn lba_out_of_range() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, asc::LBA_OUT_OF_RANGE)
    }

    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED.
    pub const fn saving_not_supported() -> Self {
        let mut s = Sense::new(key::ILLEGAL_REQUEST, asc::SAVING_PARAMETERS_NOT_SUPPORTED);
        s.field = Some(FieldPointer {
            byte: 2,
            bit: Some(7),
        });
        s
    }

    /// DATA PROTECT, WRITE PROTECTED.
    pub const fn write_protected() -> Self {
        Sense::new(key::DATA_PROTECT, asc::WRITE_PROTECTED)
    }

    /// DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT.
    pub const fn space_allocation_failed() -> Self {
        Sense::new(key::DATA_PROTECT, asc::SPACE_ALLOCATION_FAILED)
    }

    /// MEDIUM ERROR, UNRECOVERED READ ERROR, at `lba`.
    pub fn read_error(lba: u64) -> Self {
        Sense::new(key::MEDIUM_ERROR, asc::UNRECOVERED_READ_ERROR).at(lba)
    }

    /// MEDIUM ERROR, WRITE ERROR, at `lba`.
    pub fn write_error(lba: u64) -> Self {
        Sense::new(key::MEDIUM_ERROR, asc::WRITE_ERROR).at(lba)
    }

    /// With the INFORMATION field set to `lba`, if it fits the 4 bytes
    /// fixed format has for it.
    fn at(mut self, lba: u64) -> Self {
        self.information = u32::try_from(lba).ok();
        self
    }

    /// The 18 bytes of fixed-format sense data.
    pub fn encode(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = RESPONSE_CURRENT_FIXED;
        b[2] = self.key & 0x0f;
        if let Some(info) = self.information {
            b[0] |= VALID;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[7] = ADDITIONAL_LEN;
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(f) = self.field {
            b[15] = SKSV | FIELD_IN_CDB;
            if let Some(bit) = f.bit {
                b[15] |= BPV | (bit & 0x7);
            }
            b[16..18].copy_from_slice(&f.byte.to_be_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let b = Sense::lba_out_of_range().encode();
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], key::ILLEGAL_REQUEST);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x21, 0x00));
        assert_eq!(b[15..], [0, 0, 0]);

        let b = Sense::invalid_field(0x1234, Some(5)).encode();
        assert_eq!((b[12], b[13]), (0x24, 0x00));
        assert_eq!(b[15], 0x80 | 0x40 | 0x08 | 5);
        assert_eq!(b[16..18], [0x12, 0x34]);
        let b = Sense::invalid_opcode().encode();
        assert_eq!((b[2], b[12], b[15], b[16], b[17]), (5, 0x20, 0xc0, 0, 0));
        let b = Sense::saving_not_supported().encode();
        assert_eq!((b[12], b[15], b[17]), (0x39, 0xc0 | 0x08 | 7, 2));
    }

    #[test]
    fn medium_errors_carry_the_lba() {
        let b = Sense::read_error(0x0102_0304).encode();
        assert_eq!(b[0], 0xf0);
        assert_eq!(b[2], key::MEDIUM_ERROR);
        assert_eq!(b[3..7], [1, 2, 3, 4]);
        assert_eq!((b[12], b[13]), (0x11, 0));
        let b = Sense::write_error(1 << 40).encode();
        assert_eq!(b[0], 0x70, "an LBA beyond 32 bits leaves VALID clear");
        assert_eq!((b[12], b[13]), (0x0c, 0));
        let b = Sense::write_protected().encode();
        assert_eq!((b[2], b[12], b[13]), (7, 0x27, 0));
        let b = Sense::space_allocation_failed().encode();
        assert_eq!((b[2], b[12], b[13]), (7, 0x27, 7));
        assert_eq!(Sense::no_sense().encode()[2], 0);
    }
}
