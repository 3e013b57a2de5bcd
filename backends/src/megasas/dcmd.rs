//! Direct commands (DCMDs): the firmware's own commands, and the data they
//! return, laid out as the MFI structures (little-endian, packed).

use super::regs::{MAX_CMDS, MAX_SGE};

/// DCMD opcodes.
pub mod opcode {
    /// Controller information (`mfi_ctrl_info`).
    pub const CTRL_GET_INFO: u32 = 0x0101_0000;
    /// Controller properties.
    pub const CTRL_GET_PROPERTIES: u32 = 0x0102_0100;
    /// Set controller properties.
    pub const CTRL_SET_PROPERTIES: u32 = 0x0102_0200;
    /// Event log sequence numbers.
    pub const EVENT_GET_INFO: u32 = 0x0104_0100;
    /// Wait for an event (held until one happens).
    pub const EVENT_WAIT: u32 = 0x0104_0500;
    /// Prepare for power off.
    pub const CTRL_SHUTDOWN: u32 = 0x0105_0000;
    /// Prepare for hibernation.
    pub const HIBERNATE_SHUTDOWN: u32 = 0x0106_0000;
    /// Set the controller's clock.
    pub const CTRL_SET_TIME: u32 = 0x0108_0102;
    /// Flush the controller's and the drives' caches.
    pub const CACHE_FLUSH: u32 = 0x0110_1000;
    /// Physical drives.
    pub const PD_GET_LIST: u32 = 0x0201_0000;
    /// Physical drives, by query.
    pub const PD_LIST_QUERY: u32 = 0x0201_0100;
    /// Logical drives with their states and sizes.
    pub const LD_GET_LIST: u32 = 0x0301_0000;
    /// Target ids of the logical drives.
    pub const LD_LIST_QUERY: u32 = 0x0301_0100;
}

/// A name for the log.
pub fn name(op: u32) -> &'static str {
    match op {
        opcode::CTRL_GET_INFO => "CTRL_GET_INFO",
        opcode::CTRL_GET_PROPERTIES => "CTRL_GET_PROPERTIES",
        opcode::CTRL_SET_PROPERTIES => "CTRL_SET_PROPERTIES",
        opcode::EVENT_GET_INFO => "EVENT_GET_INFO",
        opcode::EVENT_WAIT => "EVENT_WAIT",
        opcode::CTRL_SHUTDOWN => "SHUTDOWN",
        opcode::HIBERNATE_SHUTDOWN => "HIBERNATE_SHUTDOWN",
        opcode::CTRL_SET_TIME => "CTRL_SET_TIME",
        opcode::CACHE_FLUSH => "CACHE_FLUSH",
        opcode::PD_GET_LIST => "PD_GET_LIST",
        opcode::PD_LIST_QUERY => "PD_LIST_QUERY",
        opcode::LD_GET_LIST => "LD_GET_LIST",
        opcode::LD_LIST_QUERY => "LD_LIST_QUERY",
        _ => "unknown",
    }
}

/// Largest transfer of one frame, in 512-byte sectors (256 KiB): both
/// limits the driver reads from the controller information say so, and it
/// fits the SGEs of a frame with 4 KiB pages.
pub const MAX_REQUEST_SECTORS: u32 = 512;
/// Strip size exponent (in sectors): 4 KiB strips.
const STRIPE_MIN: u8 = 3;
/// Strips per I/O: MAX_REQUEST_SECTORS of 4 KiB strips.
const MAX_STRIPS_PER_IO: u16 = (MAX_REQUEST_SECTORS >> STRIPE_MIN) as u16;
/// Bytes of `mfi_ctrl_info` returned (Linux's structure is a little
/// longer than the 2 KiB firmwares fill; the rest reads 0).
pub const CTRL_INFO_LEN: usize = 0x1000;
/// Size of a logical drive list entry (`MR_LD_LIST`).
const LD_ENTRY_LEN: usize = 16;
/// Most logical drives in the lists.
pub const MAX_LDS: usize = 64;
/// State of a logical drive: optimal.
const LD_STATE_OPTIMAL: u8 = 3;
/// Size of the controller properties structure.
pub const PROPERTIES_LEN: usize = 64;

/// A logical drive, as the lists show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogicalDrive {
    /// Target id.
    pub target: u8,
    /// Size in 512-byte blocks.
    pub blocks: u64,
}

/// PCI identity reported in the controller information.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Subsystem vendor id.
    pub subvendor: u16,
    /// Subsystem id.
    pub subdevice: u16,
}

fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    b[at..at + bytes.len()].copy_from_slice(bytes);
}

/// `mfi_ctrl_info`: identity, limits consistent with the scratch pad and
/// with [`MAX_REQUEST_SECTORS`], the logical drive count, 512 MB of cache
/// memory (an "MR", not an "iMR", to the driver), online controller reset
/// allowed, and no SR-IOV, crash dump or firmware device list.
pub fn ctrl_info(ids: PciIds, lds: usize, product: &str) -> Vec<u8> {
    let mut b = vec![0u8; CTRL_INFO_LEN];
    put(&mut b, 0x00, &ids.vendor.to_le_bytes());
    put(&mut b, 0x02, &ids.device.to_le_bytes());
    put(&mut b, 0x04, &ids.subvendor.to_le_bytes());
    put(&mut b, 0x06, &ids.subdevice.to_le_bytes());
    // Host interface PCI-X, device interface SAS 3G.
    b[0x20] = 0x01;
    b[0x68] = 0x02;
    // One firmware component.
    put(&mut b, 0xb4, &1u32.to_le_bytes());
    put(&mut b, 0xb8, b"APP");
    put(&mut b, 0xc0, env!("CARGO_PKG_VERSION").as_bytes());
    // max_lds.
    b[0x53f] = MAX_LDS as u8;
    let name = product.as_bytes();
    put(&mut b, 0x540, &name[..name.len().min(79)]);
    // NVRAM, memory, flash.
    put(&mut b, 0x5b0, &0x34u32.to_le_bytes());
    put(&mut b, 0x5b8, &(MAX_CMDS as u16).to_le_bytes());
    put(&mut b, 0x5ba, &(MAX_SGE as u16).to_le_bytes());
    put(&mut b, 0x5bc, &MAX_REQUEST_SECTORS.to_le_bytes());
    put(&mut b, 0x5c0, &(lds.min(MAX_LDS) as u16).to_le_bytes());
    put(&mut b, 0x5d0, &512u16.to_le_bytes());
    put(&mut b, 0x5da, &MAX_STRIPS_PER_IO.to_le_bytes());
    // RAID 0; read, write, I/O, access and disk cache policies.
    put(&mut b, 0x5dc, &1u32.to_le_bytes());
    put(&mut b, 0x5e4, &0x1fu32.to_le_bytes());
    b[0x5e8] = STRIPE_MIN;
    b[0x5e9] = STRIPE_MIN;
    b
}

/// An empty physical drive list (`MR_PD_LIST`): every drive is a logical
/// drive.
pub fn pd_list() -> Vec<u8> {
    let mut b = vec![0u8; 8];
    put(&mut b, 0, &8u32.to_le_bytes());
    b
}

/// The logical drives with their states and sizes (`MR_LD_LIST`).
pub fn ld_list(lds: &[LogicalDrive]) -> Vec<u8> {
    let lds = &lds[..lds.len().min(MAX_LDS)];
    let mut b = vec![0u8; 8 + MAX_LDS * LD_ENTRY_LEN];
    put(&mut b, 0, &(lds.len() as u32).to_le_bytes());
    for (i, ld) in lds.iter().enumerate() {
        let e = 8 + i * LD_ENTRY_LEN;
        b[e] = ld.target;
        b[e + 4] = LD_STATE_OPTIMAL;
        put(&mut b, e + 8, &ld.blocks.to_le_bytes());
    }
    b
}

/// The target ids of the logical drives (`MR_LD_TARGETID_LIST`), whatever
/// the query.
pub fn ld_targetid_list(lds: &[LogicalDrive]) -> Vec<u8> {
    let lds = &lds[..lds.len().min(MAX_LDS)];
    let len = 11 + lds.len();
    let mut b = vec![0u8; len.next_multiple_of(4)];
    put(&mut b, 0, &(len as u32).to_le_bytes());
    put(&mut b, 4, &(lds.len() as u32).to_le_bytes());
    for (i, ld) in lds.iter().enumerate() {
        b[11 + i] = ld.target;
    }
    b
}

/// The event log's sequence numbers (`megasas_evt_log_info`): events up
/// to `newest` happened; the driver waits for the next one.
pub fn event_log_info(newest: u32) -> Vec<u8> {
    let mut b = vec![0u8; 20];
    put(&mut b, 0, &newest.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: PciIds = PciIds {
        vendor: 0x1000,
        device: 0x0060,
        subvendor: 0x1000,
        subdevice: 0x1013,
    };

    fn le16(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn controller_information() {
        let b = ctrl_info(IDS, 2, "MegaRAID");
        assert_eq!(b.len(), CTRL_INFO_LEN);
        assert_eq!(
            [le16(&b, 0), le16(&b, 2), le16(&b, 4), le16(&b, 6)],
            [0x1000, 0x60, 0x1000, 0x1013]
        );
        assert_eq!(&b[0x540..0x548], b"MegaRAID");
        assert_eq!(b[0x548], 0);
        assert_eq!(le16(&b, 0x5b8), 1000);
        assert_eq!(le16(&b, 0x5ba), 80);
        assert_eq!(le32(&b, 0x5bc), MAX_REQUEST_SECTORS);
        assert_eq!(le16(&b, 0x5c0), 2);
        assert_eq!(le16(&b, 0x5d0), 512, "memory_size: not an iMR");
        // The driver's limit: min((1 << stripe min) * strips, max request).
        assert_eq!(
            (1u32 << b[0x5e8]) * u32::from(le16(&b, 0x5da)),
            MAX_REQUEST_SECTORS
        );
        // OCR allowed; no SR-IOV or firmware device list.
        assert_eq!(le32(&b, 0x620), 0);
        assert!(b[0x800..].iter().all(|&x| x == 0));
        // A long product name is cut, keeping its terminating NUL.
        let b = ctrl_info(IDS, 99, &"x".repeat(100));
        assert_eq!(b[0x540 + 78..0x540 + 80], [b'x', 0]);
        assert_eq!(le16(&b, 0x5c0), MAX_LDS as u16);
    }

    #[test]
    fn drive_lists() {
        assert_eq!(pd_list(), [8, 0, 0, 0, 0, 0, 0, 0]);
        let lds = [
            LogicalDrive {
                target: 0,
                blocks: 0x1_0000,
            },
            LogicalDrive {
                target: 1,
                blocks: 0x20,
            },
        ];
        let b = ld_list(&lds);
        assert_eq!(b.len(), 8 + 64 * 16);
        assert_eq!(le32(&b, 0), 2);
        assert_eq!(b[8..16], [0, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(le32(&b, 16), 0x1_0000);
        assert_eq!((b[24], b[28], le32(&b, 32)), (1, 3, 0x20));
        let b = ld_targetid_list(&lds);
        assert_eq!(b.len(), 16);
        assert_eq!((le32(&b, 0), le32(&b, 4)), (13, 2));
        assert_eq!(b[11..13], [0, 1]);
        assert_eq!(
            event_log_info(7),
            [7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(name(opcode::CACHE_FLUSH), "CACHE_FLUSH");
        assert_eq!(name(opcode::CTRL_SHUTDOWN), "SHUTDOWN");
        assert_eq!(name(0x1234), "unknown");
    }
}
