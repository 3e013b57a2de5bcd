//! INQUIRY: the standard data and the vital product data pages a disk
//! without logical block provisioning reports (SPC-4 6.6, 7.8; SBC-3 6.6).

use super::cdb::Cdb;
use super::sense::Sense;

/// Supported VPD pages, in ascending order (page 0x00 lists them).
pub const VPD_PAGES: [u8; 6] = [
    VPD_SUPPORTED,
    VPD_SERIAL,
    VPD_DEVICE_ID,
    VPD_BLOCK_LIMITS,
    VPD_BLOCK_CHARACTERISTICS,
    VPD_PROVISIONING,
];
const VPD_SUPPORTED: u8 = 0x00;
const VPD_SERIAL: u8 = 0x80;
const VPD_DEVICE_ID: u8 = 0x83;
const VPD_BLOCK_LIMITS: u8 = 0xb0;
const VPD_BLOCK_CHARACTERISTICS: u8 = 0xb1;
const VPD_PROVISIONING: u8 = 0xb2;

/// Peripheral device type of a direct-access block device.
const TYPE_DISK: u8 = 0x00;
/// VERSION: SPC-4.
const VERSION_SPC4: u8 = 0x06;
/// Response data format 2, with HISUP (hierarchical LUN addressing).
const RESPONSE_FORMAT: u8 = 0x12;
/// CMDQUE: the device queues commands.
const CMDQUE: u8 = 0x02;
/// Length of the standard data returned.
const STANDARD_LEN: usize = 36;
/// Page length of the block limits and block device characteristics pages.
const LONG_PAGE_LEN: usize = 0x3c;
/// Medium rotation rate meaning "not rotating" (solid state).
const NON_ROTATING: u16 = 0x0001;

/// Designator code sets and types of the device identification page.
const CODE_SET_BINARY: u8 = 0x1;
const CODE_SET_ASCII: u8 = 0x2;
const DESIGNATOR_T10_VENDOR: u8 = 0x1;
const DESIGNATOR_NAA: u8 = 0x3;

/// What INQUIRY says about a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// T10 vendor identification, space-padded ASCII.
    pub vendor: [u8; 8],
    /// Product identification, space-padded ASCII.
    pub product: [u8; 16],
    /// Product revision level, space-padded ASCII.
    pub revision: [u8; 4],
    /// Unit serial number (printable ASCII).
    pub serial: String,
    /// The NAA designator (locally assigned, NAA 3), unique per disk.
    pub naa: [u8; 8],
    /// MAXIMUM TRANSFER LENGTH of the block limits page, in blocks (0: no
    /// limit reported).
    pub max_transfer_blocks: u32,
}

/// `text` as a space-padded ASCII field of `N` bytes (other characters
/// become `_`, longer text is cut).
pub fn ascii_field<const N: usize>(text: &str) -> [u8; N] {
    let mut f = [b' '; N];
    for (d, c) in f.iter_mut().zip(text.bytes()) {
        *d = if c.is_ascii_graphic() || c == b' ' {
            c
        } else {
            b'_'
        };
    }
    f
}

/// A locally assigned NAA designator (NAA 3) derived from `serial` and
/// `index` with FNV-1a: stable across runs, distinct between disks.
pub fn naa_from(serial: &str, index: u32) -> [u8; 8] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in serial.bytes().chain(index.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ((h & !(0xf << 60)) | (0x3 << 60)).to_be_bytes()
}

/// The response to the INQUIRY `cdb`, before truncation to its allocation
/// length.
pub fn inquiry(cdb: &Cdb<'_>, id: &Identity) -> Result<Vec<u8>, Sense> {
    let evpd = cdb.byte(1) & 0x01 != 0;
    if cdb.byte(1) & 0x02 != 0 {
        // CMDDT (obsolete).
        return Err(Sense::invalid_field(1, Some(1)));
    }
    let page = cdb.byte(2);
    if !evpd {
        if page != 0 {
            return Err(Sense::invalid_field(2, None));
        }
        return Ok(standard(id));
    }
    let body = match page {
        VPD_SUPPORTED => VPD_PAGES.to_vec(),
        VPD_SERIAL => id.serial.as_bytes().to_vec(),
        VPD_DEVICE_ID => device_identification(id),
        VPD_BLOCK_LIMITS => {
            let mut b = vec![0u8; LONG_PAGE_LEN];
            // MAXIMUM TRANSFER LENGTH, at byte 8 of the page.
            b[4..8].copy_from_slice(&id.max_transfer_blocks.to_be_bytes());
            b
        }
        VPD_BLOCK_CHARACTERISTICS => {
            let mut b = vec![0u8; LONG_PAGE_LEN];
            b[0..2].copy_from_slice(&NON_ROTATING.to_be_bytes());
            b
        }
        // No threshold, no unmap, no write same unmap; fully provisioned.
        VPD_PROVISIONING => vec![0u8; 4],
        _ => return Err(Sense::invalid_field(2, None)),
    };
    let mut r = Vec::with_capacity(4 + body.len());
    r.extend_from_slice(&[TYPE_DISK, page]);
    // Every body here is short: the length fits the page's 2 bytes.
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(&body);
    Ok(r)
}

fn standard(id: &Identity) -> Vec<u8> {
    let mut r = vec![0u8; STANDARD_LEN];
    r[0] = TYPE_DISK;
    r[2] = VERSION_SPC4;
    r[3] = RESPONSE_FORMAT;
    r[4] = (STANDARD_LEN - 5) as u8;
    r[7] = CMDQUE;
    r[8..16].copy_from_slice(&id.vendor);
    r[16..32].copy_from_slice(&id.product);
    r[32..36].copy_from_slice(&id.revision);
    r
}

/// The designators of page 0x83: a T10 vendor ID (vendor and serial) and
/// the NAA name, both of the logical unit.
fn device_identification(id: &Identity) -> Vec<u8> {
    let mut t10 = id.vendor.to_vec();
    t10.extend_from_slice(id.serial.as_bytes());
    t10.truncate(usize::from(u8::MAX));
    let mut b = Vec::new();
    b.extend_from_slice(&[CODE_SET_ASCII, DESIGNATOR_T10_VENDOR, 0, t10.len() as u8]);
    b.extend_from_slice(&t10);
    b.extend_from_slice(&[CODE_SET_BINARY, DESIGNATOR_NAA, 0, id.naa.len() as u8]);
    b.extend_from_slice(&id.naa);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            vendor: ascii_field("VENDOR"),
            product: ascii_field("Prod\u{e9}uct"),
            revision: ascii_field("1.2"),
            serial: "SER1".into(),
            naa: naa_from("SER1", 0),
            max_transfer_blocks: 512,
        }
    }

    fn run(cdb: &[u8]) -> Result<Vec<u8>, Sense> {
        inquiry(&Cdb::new(cdb).unwrap(), &id())
    }

    #[test]
    fn standard_data() {
        let r = run(&[0x12, 0, 0, 0, 36, 0]).unwrap();
        assert_eq!(r.len(), 36);
        assert_eq!(r[..8], [0, 0, 6, 0x12, 31, 0, 0, 2]);
        assert_eq!(&r[8..16], b"VENDOR  ");
        assert_eq!(&r[16..32], b"Prod__uct       ", "non-ASCII replaced");
        assert_eq!(&r[32..36], b"1.2 ");
        // A page code without EVPD, and CMDDT.
        assert_eq!(
            run(&[0x12, 0, 0x80, 0, 36, 0]),
            Err(Sense::invalid_field(2, None))
        );
        assert_eq!(
            run(&[0x12, 2, 0, 0, 36, 0]),
            Err(Sense::invalid_field(1, Some(1)))
        );
    }

    #[test]
    fn vpd_pages() {
        let r = run(&[0x12, 1, 0x00, 0, 0xff, 0]).unwrap();
        assert_eq!(r, [0, 0, 0, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
        let r = run(&[0x12, 1, 0x80, 0, 0xff, 0]).unwrap();
        assert_eq!(r, [0, 0x80, 0, 4, b'S', b'E', b'R', b'1']);
        let r = run(&[0x12, 1, 0x83, 0, 0xff, 0]).unwrap();
        assert_eq!(r[..4], [0, 0x83, 0, 28]);
        assert_eq!(r[4..8], [2, 1, 0, 12]);
        assert_eq!(&r[8..20], b"VENDOR  SER1");
        assert_eq!(r[20..24], [1, 3, 0, 8]);
        assert_eq!(r[24] >> 4, 3, "NAA locally assigned");
        assert_eq!(r[24..32], naa_from("SER1", 0));
        let r = run(&[0x12, 1, 0xb0, 0, 0xff, 0]).unwrap();
        assert_eq!((r.len(), r[3]), (64, 0x3c));
        assert_eq!(r[8..12], 512u32.to_be_bytes());
        let r = run(&[0x12, 1, 0xb1, 0, 0xff, 0]).unwrap();
        assert_eq!((r.len(), r[4], r[5]), (64, 0, 1));
        let r = run(&[0x12, 1, 0xb2, 0, 0xff, 0]).unwrap();
        assert_eq!(r, [0, 0xb2, 0, 4, 0, 0, 0, 0]);
        assert_eq!(
            run(&[0x12, 1, 0x81, 0, 0xff, 0]),
            Err(Sense::invalid_field(2, None))
        );
    }

    #[test]
    fn naa_is_stable_and_distinct() {
        assert_eq!(naa_from("a", 0), naa_from("a", 0));
        assert_ne!(naa_from("a", 0), naa_from("a", 1));
        assert_ne!(naa_from("a", 0), naa_from("b", 0));
    }
}
