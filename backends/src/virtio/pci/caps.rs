//! The vendor-specific capabilities of the virtio PCI transport
//! (`struct virtio_pci_cap` and its notify and PCI-config variants).

use vfio_user_server::pci::{PciCapability, PciCapabilityId};

/// `VIRTIO_PCI_CAP_COMMON_CFG`.
pub(super) const CAP_COMMON_CFG: u8 = 1;
/// `VIRTIO_PCI_CAP_NOTIFY_CFG`.
pub(super) const CAP_NOTIFY_CFG: u8 = 2;
/// `VIRTIO_PCI_CAP_ISR_CFG`.
pub(super) const CAP_ISR_CFG: u8 = 3;
/// `VIRTIO_PCI_CAP_DEVICE_CFG`.
pub(super) const CAP_DEVICE_CFG: u8 = 4;
/// `VIRTIO_PCI_CAP_PCI_CFG`.
pub(super) const CAP_PCI_CFG: u8 = 5;

/// Offsets within a `virtio_pci_cfg_cap`, from the capability start.
pub(super) const PCI_CFG_BAR: usize = 4;
/// Offset of `cap.offset`.
pub(super) const PCI_CFG_OFFSET: usize = 8;
/// Offset of `cap.length`.
pub(super) const PCI_CFG_LENGTH: usize = 12;
/// Offset of `pci_cfg_data`.
pub(super) const PCI_CFG_DATA: usize = 16;

/// Length of `struct virtio_pci_cap` including the id/next header.
const CAP_LEN: usize = 16;
/// Length of the notify and PCI-config variants.
const CAP_LEN_EXTENDED: usize = 20;

/// One virtio vendor-specific capability.
pub(super) struct VirtioPciCap {
    body: Vec<u8>,
    writable: Vec<u8>,
}

impl VirtioPciCap {
    fn with_len(len: usize, cfg_type: u8, bar: u8, offset: u32, length: u32) -> Self {
        // The body is everything after the 2-byte id/next header.
        let mut body = vec![0u8; len - 2];
        body[0] = len as u8;
        body[1] = cfg_type;
        body[2] = bar;
        body[6..10].copy_from_slice(&offset.to_le_bytes());
        body[10..14].copy_from_slice(&length.to_le_bytes());
        let writable = vec![0u8; body.len()];
        VirtioPciCap { body, writable }
    }

    /// A common, ISR or device configuration capability.
    pub(super) fn new(cfg_type: u8, bar: u8, offset: u32, length: u32) -> Self {
        Self::with_len(CAP_LEN, cfg_type, bar, offset, length)
    }

    /// The notification capability.
    pub(super) fn notify(bar: u8, offset: u32, length: u32, multiplier: u32) -> Self {
        let mut cap = Self::with_len(CAP_LEN_EXTENDED, CAP_NOTIFY_CFG, bar, offset, length);
        cap.body[14..18].copy_from_slice(&multiplier.to_le_bytes());
        cap
    }

    /// The PCI configuration access capability: `bar`, `offset`, `length`
    /// and `pci_cfg_data` are writable.
    pub(super) fn pci_cfg() -> Self {
        let mut cap = Self::with_len(CAP_LEN_EXTENDED, CAP_PCI_CFG, 0, 0, 0);
        cap.writable[PCI_CFG_BAR - 2] = 0xff;
        cap.writable[PCI_CFG_OFFSET - 2..PCI_CFG_DATA + 4 - 2].fill(0xff);
        cap
    }
}

impl PciCapability for VirtioPciCap {
    fn bytes(&self) -> &[u8] {
        &self.body
    }

    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::VendorSpecific
    }

    fn writable_bits(&self) -> Vec<u8> {
        self.writable.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let c = VirtioPciCap::new(CAP_COMMON_CFG, 0, 0x1000, 0x38);
        assert_eq!(
            c.bytes(),
            &[16, 1, 0, 0, 0, 0, 0x00, 0x10, 0, 0, 0x38, 0, 0, 0]
        );
        assert!(c.writable_bits().iter().all(|b| *b == 0));
        let n = VirtioPciCap::notify(4, 0x3000, 0x100, 4);
        assert_eq!(n.bytes().len(), 18);
        assert_eq!(&n.bytes()[..3], &[20, 2, 4]);
        assert_eq!(&n.bytes()[14..], &[4, 0, 0, 0]);
        let p = VirtioPciCap::pci_cfg();
        assert_eq!(p.bytes()[1], CAP_PCI_CFG);
        let w = p.writable_bits();
        assert_eq!(w[PCI_CFG_BAR - 2], 0xff);
        assert_eq!(w[PCI_CFG_BAR - 1], 0);
        assert!(w[PCI_CFG_OFFSET - 2..].iter().all(|b| *b == 0xff));
    }
}
