//! MODE SENSE(6) and (10): the caching and control mode pages, with a
//! block descriptor (SPC-4 6.11-6.12, 7.5; SBC-3 6.5).
//!
//! The caching page reports the disk's write cache as it is, and it cannot
//! be changed: off (WCE=0) when every write is durable before it completes,
//! so an initiator that never sends SYNCHRONIZE CACHE loses nothing; on
//! (WCE=1) when completed writes may still sit in the back end's cache
//! until a flush.

use super::cdb::{opcode, Cdb};
use super::sense::Sense;

/// Caching mode page code.
pub const PAGE_CACHING: u8 = 0x08;
/// Control mode page code.
pub const PAGE_CONTROL: u8 = 0x0a;
/// "Return all pages".
pub const PAGE_ALL: u8 = 0x3f;
/// Subpage code "all subpages".
const SUBPAGE_ALL: u8 = 0xff;

/// Page control values (byte 2, bits 7-6).
const PC_CHANGEABLE: u8 = 1;
const PC_SAVED: u8 = 3;

/// WP bit of the device-specific parameter.
const WRITE_PROTECT: u8 = 0x80;
/// LONGLBA bit of the MODE SENSE(10) header.
const LONGLBA: u8 = 0x01;
/// Caching page byte 2: WCE (the write cache is on). RCD stays 0: the
/// read cache is on.
const WCE: u8 = 0x04;
/// Control page byte 2: GLTSD (no implicit log saving).
const CONTROL_GLTSD: u8 = 0x02;
/// Control page busy timeout: unlimited.
const BUSY_TIMEOUT_UNLIMITED: u16 = 0xffff;

/// What the block descriptor and header report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeParams {
    /// Capacity in blocks.
    pub blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Whether the medium is write-protected.
    pub read_only: bool,
    /// Whether completed writes may wait in a cache for a flush (WCE).
    pub write_cache: bool,
}

/// The response to MODE SENSE(6) or MODE SENSE(10) `cdb`, before
/// truncation to its allocation length.
pub fn mode_sense(cdb: &Cdb<'_>, p: &ModeParams) -> Result<Vec<u8>, Sense> {
    let ten = cdb.opcode() == opcode::MODE_SENSE_10;
    let dbd = cdb.byte(1) & 0x08 != 0;
    let llbaa = ten && cdb.byte(1) & 0x10 != 0;
    let pc = cdb.byte(2) >> 6;
    let page = cdb.byte(2) & 0x3f;
    let subpage = cdb.byte(3);
    if pc == PC_SAVED {
        return Err(Sense::saving_not_supported());
    }
    if subpage != 0 && subpage != SUBPAGE_ALL {
        return Err(Sense::invalid_field(3, None));
    }
    let changeable = pc == PC_CHANGEABLE;
    let mut pages = Vec::new();
    match page {
        PAGE_CACHING => pages.extend(caching_page(changeable, p.write_cache)),
        PAGE_CONTROL => pages.extend(control_page(changeable)),
        PAGE_ALL => {
            pages.extend(caching_page(changeable, p.write_cache));
            pages.extend(control_page(changeable));
        }
        _ => return Err(Sense::invalid_field(2, None)),
    }
    let descriptor = match (dbd, llbaa) {
        (true, _) => Vec::new(),
        (false, false) => {
            let mut d = vec![0u8; 8];
            let blocks = u32::try_from(p.blocks).unwrap_or(u32::MAX);
            d[0..4].copy_from_slice(&blocks.to_be_bytes());
            d[5..8].copy_from_slice(&p.block_size.to_be_bytes()[1..]);
            d
        }
        (false, true) => {
            let mut d = vec![0u8; 16];
            d[0..8].copy_from_slice(&p.blocks.to_be_bytes());
            d[12..16].copy_from_slice(&p.block_size.to_be_bytes());
            d
        }
    };
    let device_specific = if p.read_only { WRITE_PROTECT } else { 0 };
    let mut r = Vec::new();
    if ten {
        let len = 8 + descriptor.len() + pages.len();
        // Short: a handful of pages.
        r.extend_from_slice(&((len - 2) as u16).to_be_bytes());
        r.extend_from_slice(&[0, device_specific, if llbaa { LONGLBA } else { 0 }, 0]);
        r.extend_from_slice(&(descriptor.len() as u16).to_be_bytes());
    } else {
        let len = 4 + descriptor.len() + pages.len();
        r.extend_from_slice(&[(len - 1) as u8, 0, device_specific, descriptor.len() as u8]);
    }
    r.extend_from_slice(&descriptor);
    r.extend_from_slice(&pages);
    Ok(r)
}

/// The caching page (20 bytes); every field reads 0 when `changeable`
/// (nothing can be changed).
fn caching_page(changeable: bool, write_cache: bool) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0] = PAGE_CACHING;
    b[1] = 18;
    if !changeable && write_cache {
        b[2] = WCE;
    }
    b
}

/// The control page (12 bytes).
fn control_page(changeable: bool) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0] = PAGE_CONTROL;
    b[1] = 10;
    if !changeable {
        b[2] = CONTROL_GLTSD;
        b[8..10].copy_from_slice(&BUSY_TIMEOUT_UNLIMITED.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ModeParams = ModeParams {
        blocks: 0x1_0000_0001,
        block_size: 512,
        read_only: false,
        write_cache: false,
    };

    fn run(cdb: &[u8], p: &ModeParams) -> Result<Vec<u8>, Sense> {
        mode_sense(&Cdb::new(cdb).unwrap(), p)
    }

    #[test]
    fn mode_sense_6_caching_with_descriptor() {
        let r = run(&[0x1a, 0, 0x08, 0, 0xff, 0], &P).unwrap();
        assert_eq!(r.len(), 4 + 8 + 20);
        assert_eq!(r[..4], [31, 0, 0, 8]);
        assert_eq!(r[4..8], [0xff; 4], "capacity capped in a short descriptor");
        assert_eq!(r[9..12], [0, 2, 0]);
        assert_eq!(r[12..14], [0x08, 18]);
        assert_eq!(r[14] & 0x04, 0, "WCE=0");
        assert_eq!(r[14] & 0x01, 0, "RCD=0");
        // A write cache: WCE=1, still not changeable.
        let cached = ModeParams {
            write_cache: true,
            ..P
        };
        assert_eq!(run(&[0x1a, 8, 0x08, 0, 0xff, 0], &cached).unwrap()[6], 0x04);
        assert_eq!(run(&[0x1a, 8, 0x48, 0, 0xff, 0], &cached).unwrap()[6], 0);
        // Read-only: WP.
        let ro = ModeParams {
            read_only: true,
            ..P
        };
        assert_eq!(
            run(&[0x1a, 8, 0x08, 0, 0xff, 0], &ro).unwrap()[..4],
            [23, 0, 0x80, 0]
        );
    }

    #[test]
    fn mode_sense_10_all_pages_long_descriptor() {
        let r = run(&[0x5a, 0x10, 0x3f, 0, 0, 0, 0, 2, 0, 0], &P).unwrap();
        assert_eq!(r.len(), 8 + 16 + 20 + 12);
        assert_eq!(u16::from_be_bytes([r[0], r[1]]) as usize, r.len() - 2);
        assert_eq!(r[4] & 1, 1, "LONGLBA");
        assert_eq!(r[6..8], [0, 16]);
        assert_eq!(r[8..16], 0x1_0000_0001u64.to_be_bytes());
        assert_eq!(r[20..24], 512u32.to_be_bytes());
        assert_eq!((r[24], r[44]), (0x08, 0x0a));
        assert_eq!(r[44 + 8..44 + 10], [0xff, 0xff]);
        // All subpages, no descriptor.
        let r = run(&[0x5a, 0x08, 0x3f, 0xff, 0, 0, 0, 2, 0, 0], &P).unwrap();
        assert_eq!(r.len(), 8 + 32);
        // Control page alone, short descriptor.
        let r = run(&[0x5a, 0, 0x0a, 0, 0, 0, 0, 2, 0, 0], &P).unwrap();
        assert_eq!((r.len(), r[7], r[16]), (8 + 8 + 12, 8, 0x0a));
    }

    #[test]
    fn page_control_and_bad_fields() {
        // Changeable values: nothing can change.
        let r = run(&[0x1a, 8, 0x48, 0, 0xff, 0], &P).unwrap();
        assert_eq!(r[4..6], [0x08, 18]);
        assert!(r[6..].iter().all(|&b| b == 0));
        // Default values are the current ones.
        assert_eq!(
            run(&[0x1a, 8, 0x88, 0, 0xff, 0], &P),
            run(&[0x1a, 8, 0x08, 0, 0xff, 0], &P)
        );
        assert_eq!(
            run(&[0x1a, 0, 0xc8, 0, 0xff, 0], &P),
            Err(Sense::saving_not_supported())
        );
        assert_eq!(
            run(&[0x1a, 0, 0x01, 0, 0xff, 0], &P),
            Err(Sense::invalid_field(2, None))
        );
        assert_eq!(
            run(&[0x1a, 0, 0x08, 1, 0xff, 0], &P),
            Err(Sense::invalid_field(3, None))
        );
    }
}
