//! The device-side MSI-X table and pending bit array.
//!
//! vfio-user clients emulate the MSI-X table themselves and only forward
//! PBA reads (QEMU) or PBA accesses (Cloud Hypervisor); vector masking
//! reaches the server as SET_IRQS. A device still keeps the table in its
//! BAR and answers accesses to it sanely, which is what [`MsixTable`] does.
//! Accesses must be dword or qword sized and naturally aligned, as the
//! PCI spec requires; anything else is ignored (writes) or reads zeros.

use serde::{Deserialize, Serialize};

use super::PciDeviceError;
use crate::irq::Irqs;
use crate::wire::PCI_MSIX_IRQ_INDEX;

/// Maximum MSI-X table size.
const MAX_VECTORS: u16 = 2048;
/// Bytes per table entry.
const ENTRY_SIZE: u64 = 16;
/// Writable bits of the four dwords of an entry: message address (dword
/// aligned), upper address, data, vector control mask bit.
const ENTRY_WRITABLE: [u32; 4] = [0xffff_fffc, 0xffff_ffff, 0xffff_ffff, 0x1];
const VECTOR_CONTROL_MASKED: u32 = 0x1;

/// Saved [`MsixTable`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixTableState {
    /// Table dwords, four per vector.
    pub table: Vec<u32>,
    /// Device-set pending bits, one per vector.
    pub pba: Vec<u64>,
}

/// An MSI-X table and PBA as a device keeps them in one of its BARs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsixTable {
    vectors: u16,
    table: Vec<u32>,
    pba: Vec<u64>,
}

/// The first dword and the dword count of a valid access, if it is.
fn dwords(offset: u64, len: usize, limit: u64) -> Option<(usize, usize)> {
    let n = match len {
        4 | 8 => len as u64,
        _ => return None,
    };
    if !offset.is_multiple_of(n) || offset.checked_add(n)? > limit {
        return None;
    }
    Some(((offset / 4) as usize, len / 4))
}

impl MsixTable {
    /// A table of `vectors` entries (at most 2048), all masked.
    pub fn new(vectors: u16) -> Self {
        let vectors = vectors.min(MAX_VECTORS);
        let mut t = MsixTable {
            vectors,
            table: vec![0; usize::from(vectors) * 4],
            pba: vec![0; usize::from(vectors).div_ceil(64)],
        };
        t.reset();
        t
    }

    /// Size of the table in bytes (16 per vector).
    pub fn table_size_bytes(&self) -> u64 {
        u64::from(self.vectors) * ENTRY_SIZE
    }

    /// Size of the PBA in bytes (one qword per 64 vectors).
    pub fn pba_size_bytes(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// Reads the table at `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some((first, n)) = dwords(offset, data.len(), self.table_size_bytes()) {
            for (i, chunk) in data.chunks_exact_mut(4).take(n).enumerate() {
                chunk.copy_from_slice(&self.table[first + i].to_le_bytes());
            }
        }
    }

    /// Writes the table at `offset`; reserved bits stay zero.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if let Some((first, n)) = dwords(offset, data.len(), self.table_size_bytes()) {
            for (i, chunk) in data.chunks_exact(4).take(n).enumerate() {
                let d = first + i;
                let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                self.table[d] = v & ENTRY_WRITABLE[d % 4];
            }
        }
    }

    /// Reads the PBA at `offset`: the device's own pending bits OR'ed with
    /// the vectors `irqs` holds pending (masked or without an eventfd).
    pub fn read_pba(&self, offset: u64, data: &mut [u8], irqs: &Irqs) {
        data.fill(0);
        if let Some((first, n)) = dwords(offset, data.len(), self.pba_size_bytes()) {
            for (i, chunk) in data.chunks_exact_mut(4).take(n).enumerate() {
                let base = (first + i) as u32 * 32;
                let mut bits = 0u32;
                for bit in 0..32 {
                    let v = base + bit;
                    if v < u32::from(self.vectors)
                        && (self.pending(v) || irqs.pending(PCI_MSIX_IRQ_INDEX, v))
                    {
                        bits |= 1 << bit;
                    }
                }
                chunk.copy_from_slice(&bits.to_le_bytes());
            }
        }
    }

    fn pending(&self, vector: u32) -> bool {
        self.pba
            .get((vector / 64) as usize)
            .is_some_and(|q| q & (1 << (vector % 64)) != 0)
    }

    /// Sets or clears the device's own pending bit for `vector`; ignored
    /// out of range.
    pub fn set_pending(&mut self, vector: u16, pending: bool) {
        if vector >= self.vectors {
            return;
        }
        let bit = 1u64 << (vector % 64);
        let q = &mut self.pba[usize::from(vector / 64)];
        if pending {
            *q |= bit;
        } else {
            *q &= !bit;
        }
    }

    /// Whether the vector control mask bit of `vector` is set; vectors out
    /// of range count as masked.
    pub fn vector_masked(&self, vector: u16) -> bool {
        self.table
            .get(usize::from(vector) * 4 + 3)
            .is_none_or(|c| c & VECTOR_CONTROL_MASKED != 0)
    }

    /// Power-on state: entries zero and masked, nothing pending.
    pub fn reset(&mut self) {
        for (i, d) in self.table.iter_mut().enumerate() {
            *d = if i % 4 == 3 { VECTOR_CONTROL_MASKED } else { 0 };
        }
        self.pba.fill(0);
    }

    /// The state to save.
    pub fn state(&self) -> MsixTableState {
        MsixTableState {
            table: self.table.clone(),
            pba: self.pba.clone(),
        }
    }

    /// Restores a state saved from a table of the same size; fails with
    /// [`PciDeviceError::InvalidCapability`] otherwise.
    pub fn set_state(&mut self, state: &MsixTableState) -> Result<(), PciDeviceError> {
        if state.table.len() != self.table.len() || state.pba.len() != self.pba.len() {
            return Err(PciDeviceError::InvalidCapability);
        }
        for (i, (d, s)) in self.table.iter_mut().zip(&state.table).enumerate() {
            *d = s & ENTRY_WRITABLE[i % 4];
        }
        self.pba.copy_from_slice(&state.pba);
        // Bits of vectors beyond the table stay clear.
        if let Some(last) = self.pba.last_mut() {
            let used = u32::from(self.vectors) % 64;
            if used != 0 {
                *last &= (1u64 << used) - 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqIndexInfo;

    #[test]
    fn sizes() {
        let t = MsixTable::new(8);
        assert_eq!(t.table_size_bytes(), 128);
        assert_eq!(t.pba_size_bytes(), 8);
        let t = MsixTable::new(65);
        assert_eq!(t.pba_size_bytes(), 16);
        let t = MsixTable::new(u16::MAX);
        assert_eq!(t.table_size_bytes(), 2048 * 16);
        assert_eq!(t.pba_size_bytes(), 256);
        let t = MsixTable::new(0);
        assert_eq!((t.table_size_bytes(), t.pba_size_bytes()), (0, 0));
    }

    #[test]
    fn table_access() {
        let mut t = MsixTable::new(4);
        assert!((0..4).all(|v| t.vector_masked(v)));
        assert!(t.vector_masked(4));
        let mut d = [0u8; 4];
        t.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);

        // Qword write of the address, dword writes of data and control.
        t.write_table(16, &0x0000_0001_fee0_0003u64.to_le_bytes());
        t.write_table(24, &0x4041u32.to_le_bytes());
        t.write_table(28, &0xffff_fffeu32.to_le_bytes());
        assert!(!t.vector_masked(1));
        let mut q = [0u8; 8];
        t.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x0000_0001_fee0_0000);
        t.read_table(24, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x4041);

        // Misaligned, odd-sized and out-of-range accesses.
        let before = t.clone();
        t.write_table(17, &[0xff; 4]);
        t.write_table(20, &[0xff; 8]);
        t.write_table(16, &[0xff; 2]);
        t.write_table(64, &[0xff; 4]);
        t.write_table(u64::MAX - 3, &[0xff; 4]);
        assert_eq!(t, before);
        let mut d = [0xaa; 4];
        t.read_table(64, &mut d);
        assert_eq!(d, [0; 4]);
        let mut d = [0xaa; 2];
        t.read_table(24, &mut d);
        assert_eq!(d, [0; 2]);
        let mut d = [0xaa; 8];
        t.read_table(u64::MAX - 7, &mut d);
        assert_eq!(d, [0; 8]);

        t.reset();
        assert_eq!(t, MsixTable::new(4));
    }

    #[test]
    fn pba() {
        let irqs = Irqs::default();
        irqs.configure(&IrqIndexInfo::pci_layout(true, 0, 40));
        let mut t = MsixTable::new(40);
        // No eventfd installed: the trigger leaves the vector pending.
        irqs.trigger(PCI_MSIX_IRQ_INDEX, 33).unwrap();
        t.set_pending(1, true);
        t.set_pending(39, true);
        t.set_pending(40, true);
        let mut q = [0u8; 8];
        t.read_pba(0, &mut q, &irqs);
        assert_eq!(u64::from_le_bytes(q), (1 << 1) | (1 << 33) | (1 << 39));
        let mut d = [0u8; 4];
        t.read_pba(4, &mut d, &irqs);
        assert_eq!(u32::from_le_bytes(d), (1 << 1) | (1 << 7));
        t.set_pending(1, false);
        t.read_pba(0, &mut d, &irqs);
        assert_eq!(d, [0; 4]);
        let mut d = [0xaa; 4];
        t.read_pba(8, &mut d, &irqs);
        assert_eq!(d, [0; 4]);
        let mut d = [0xaa; 3];
        t.read_pba(0, &mut d, &irqs);
        assert_eq!(d, [0; 3]);
        t.reset();
        t.read_pba(0, &mut q, &Irqs::default());
        assert_eq!(q, [0; 8]);
    }

    #[test]
    fn state_roundtrip() {
        let mut t = MsixTable::new(8);
        t.write_table(0, &0xfee0_0000u32.to_le_bytes());
        t.write_table(12, &0u32.to_le_bytes());
        t.set_pending(5, true);
        let json = serde_json::to_string(&t.state()).unwrap();
        let state: MsixTableState = serde_json::from_str(&json).unwrap();
        let mut u = MsixTable::new(8);
        u.set_state(&state).unwrap();
        assert_eq!(u, t);
        assert!(MsixTable::new(9).set_state(&state).is_err());
        assert!(MsixTable::new(65).set_state(&state).is_err());
        let mut bad = state.clone();
        bad.table.pop();
        assert!(u.set_state(&bad).is_err());
        // Reserved and out-of-table bits are dropped.
        let mut noisy = state;
        noisy.table[3] = 0xffff_ffff;
        noisy.pba[0] = u64::MAX;
        u.set_state(&noisy).unwrap();
        assert_eq!(u.state().table[3], 1);
        assert_eq!(u.state().pba[0], 0xff);
    }
}
