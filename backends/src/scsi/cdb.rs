//! Command descriptor blocks: operation codes and big-endian field access
//! with the CDB's length checked.

use super::sense::Sense;

/// Operation codes the disk implements.
pub mod opcode {
    /// TEST UNIT READY.
    pub const TEST_UNIT_READY: u8 = 0x00;
    /// REQUEST SENSE.
    pub const REQUEST_SENSE: u8 = 0x03;
    /// READ(6).
    pub const READ_6: u8 = 0x08;
    /// WRITE(6).
    pub const WRITE_6: u8 = 0x0a;
    /// INQUIRY.
    pub const INQUIRY: u8 = 0x12;
    /// MODE SENSE(6).
    pub const MODE_SENSE_6: u8 = 0x1a;
    /// START STOP UNIT.
    pub const START_STOP_UNIT: u8 = 0x1b;
    /// READ CAPACITY(10).
    pub const READ_CAPACITY_10: u8 = 0x25;
    /// READ(10).
    pub const READ_10: u8 = 0x28;
    /// WRITE(10).
    pub const WRITE_10: u8 = 0x2a;
    /// SYNCHRONIZE CACHE(10).
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    /// MODE SENSE(10).
    pub const MODE_SENSE_10: u8 = 0x5a;
    /// READ(16).
    pub const READ_16: u8 = 0x88;
    /// WRITE(16).
    pub const WRITE_16: u8 = 0x8a;
    /// SYNCHRONIZE CACHE(16).
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    /// SERVICE ACTION IN(16) (READ CAPACITY(16) is its service action 0x10).
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    /// REPORT LUNS.
    pub const REPORT_LUNS: u8 = 0xa0;
    /// MAINTENANCE IN (REPORT SUPPORTED OPERATION CODES is its service
    /// action 0x0c).
    pub const MAINTENANCE_IN: u8 = 0xa3;
    /// READ(12).
    pub const READ_12: u8 = 0xa8;
    /// WRITE(12).
    pub const WRITE_12: u8 = 0xaa;
}

/// Service action of SERVICE ACTION IN(16): READ CAPACITY(16).
pub const SA_READ_CAPACITY_16: u8 = 0x10;
/// Service action of MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES.
pub const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;

/// The length of a CDB with `opcode`, from its group code (SPC-4 4.2.5.1);
/// `None` for the reserved and vendor-specific groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// A CDB whose length covers its operation code's group: every field read
/// through it is in range.
#[derive(Clone, Copy, Debug)]
pub struct Cdb<'a>(&'a [u8]);

impl<'a> Cdb<'a> {
    /// `bytes` as a CDB. Fails with INVALID OPERATION CODE for an empty
    /// CDB or an operation code of a reserved or vendor group, and with
    /// INVALID FIELD IN CDB when `bytes` is shorter than the group's CDBs.
    pub fn new(bytes: &'a [u8]) -> Result<Self, Sense> {
        let opcode = *bytes.first().ok_or(Sense::invalid_opcode())?;
        let len = cdb_len(opcode).ok_or(Sense::invalid_opcode())?;
        if bytes.len() < len {
            return Err(Sense::invalid_field(0, None));
        }
        Ok(Cdb(&bytes[..len]))
    }

    /// The operation code.
    pub fn opcode(&self) -> u8 {
        self.0[0]
    }

    /// The CDB's length.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the CDB is empty (never: it holds an operation code).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Byte `at` (0 past the end, which [`Cdb::new`] rules out for the
    /// fields of the group).
    pub fn byte(&self, at: usize) -> u8 {
        self.0.get(at).copied().unwrap_or(0)
    }

    /// The big-endian field of `len` bytes at `at` (at most 8).
    pub fn be(&self, at: usize, len: usize) -> u64 {
        (at..at + len).fold(0, |v, i| v << 8 | u64::from(self.byte(i)))
    }

    /// The service action (bits 4-0 of byte 1).
    pub fn service_action(&self) -> u8 {
        self.byte(1) & 0x1f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_lengths() {
        assert_eq!(cdb_len(opcode::INQUIRY), Some(6));
        assert_eq!(cdb_len(opcode::READ_10), Some(10));
        assert_eq!(cdb_len(opcode::MODE_SENSE_10), Some(10));
        assert_eq!(cdb_len(opcode::READ_16), Some(16));
        assert_eq!(cdb_len(opcode::REPORT_LUNS), Some(12));
        assert_eq!(cdb_len(0x7f), None);
        assert_eq!(cdb_len(0xc0), None);
    }

    #[test]
    fn fields_are_big_endian_and_checked() {
        let bytes = [0x28, 0, 1, 2, 3, 4, 0, 0, 8, 0, 0xee];
        let c = Cdb::new(&bytes).unwrap();
        assert_eq!((c.len(), c.opcode()), (10, 0x28));
        assert!(!c.is_empty());
        assert_eq!(c.be(2, 4), 0x0102_0304);
        assert_eq!(c.be(7, 2), 8);
        // Bytes past the group's length are not part of the CDB.
        assert_eq!(c.byte(10), 0);
        assert_eq!(Cdb::new(&[0x9e, 0x10]).unwrap_err().asc, 0x24);
        assert_eq!(Cdb::new(&[]).unwrap_err(), Sense::invalid_opcode());
        assert_eq!(Cdb::new(&[0x60; 16]).unwrap_err(), Sense::invalid_opcode());
        assert_eq!(Cdb::new(&[0xa3, 0x2c]).map(|_| ()).unwrap_err().asc, 0x24);
        let c = Cdb::new(&[0xa3, 0xec, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(c.service_action(), 0x0c);
    }
}
