//! The virtio common configuration structure (`struct
//! virtio_pci_common_cfg`, virtio spec 4.1.4.3): feature negotiation,
//! device status, MSI-X vector assignment and queue set-up registers.
//!
//! Accesses of any size and alignment within the structure are applied
//! field by field over the current image of the registers. Writes to the
//! device status are handed back to the transport, which acts on them
//! (activation, reset).

use log::debug;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use crate::virtio::{status, VIRTIO_MSI_NO_VECTOR};

/// Offsets in `struct virtio_pci_common_cfg`.
pub(super) mod offset {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

use offset::*;

/// Size of the structure we implement (up to `queue_device`).
pub(super) const COMMON_CFG_SIZE: u64 = 0x38;

/// `(offset, size)` of every field, in address order.
const FIELDS: [(u64, u64); 16] = [
    (DEVICE_FEATURE_SELECT, 4),
    (DEVICE_FEATURE, 4),
    (DRIVER_FEATURE_SELECT, 4),
    (DRIVER_FEATURE, 4),
    (MSIX_CONFIG, 2),
    (NUM_QUEUES, 2),
    (DEVICE_STATUS, 1),
    (CONFIG_GENERATION, 1),
    (QUEUE_SELECT, 2),
    (QUEUE_SIZE, 2),
    (QUEUE_MSIX_VECTOR, 2),
    (QUEUE_ENABLE, 2),
    (QUEUE_NOTIFY_OFF, 2),
    (QUEUE_DESC, 8),
    (QUEUE_DRIVER, 8),
    (QUEUE_DEVICE, 8),
];

/// Saved registers (the queues' own fields are saved with the queues).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct CommonConfigState {
    pub(super) device_feature_select: u32,
    pub(super) driver_feature_select: u32,
    pub(super) driver_features: u64,
    pub(super) status: u8,
    pub(super) config_generation: u8,
    pub(super) msix_config: u16,
    pub(super) queue_select: u16,
}

/// The registers, and the vector each queue is assigned.
pub(super) struct CommonConfig {
    /// Features offered.
    pub(super) device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    /// Features the driver acknowledged.
    pub(super) driver_features: u64,
    /// The device status byte.
    pub(super) status: u8,
    /// Bumped on every change of the device configuration space.
    pub(super) config_generation: u8,
    /// MSI-X vector of configuration changes.
    pub(super) msix_config: u16,
    queue_select: u16,
    /// MSI-X vector of each queue.
    pub(super) queue_vectors: Vec<u16>,
    /// Vectors in the MSI-X table; others read as no vector.
    msix_vectors: u16,
}

impl CommonConfig {
    /// Registers at reset for a device offering `device_features`, with
    /// `num_queues` queues and `msix_vectors` MSI-X vectors.
    pub(super) fn new(device_features: u64, num_queues: usize, msix_vectors: u16) -> Self {
        CommonConfig {
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            msix_config: VIRTIO_MSI_NO_VECTOR,
            queue_select: 0,
            queue_vectors: vec![VIRTIO_MSI_NO_VECTOR; num_queues],
            msix_vectors,
        }
    }

    /// Back to the state after power-on (status 0 or a device reset):
    /// nothing negotiated, no vectors. The configuration generation goes
    /// on counting, as the driver may still hold an old value.
    pub(super) fn reset(&mut self) {
        self.queue_vectors.fill(VIRTIO_MSI_NO_VECTOR);
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.msix_config = VIRTIO_MSI_NO_VECTOR;
        self.queue_select = 0;
    }

    fn valid_vector(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn selected_queue(&self, queues: &[Queue]) -> Option<usize> {
        let i = usize::from(self.queue_select);
        (i < queues.len()).then_some(i)
    }

    /// The structure as bytes.
    fn image(&self, queues: &[Queue]) -> [u8; COMMON_CFG_SIZE as usize] {
        let mut img = [0u8; COMMON_CFG_SIZE as usize];
        let mut put = |off: u64, bytes: &[u8]| {
            let off = off as usize;
            img[off..off + bytes.len()].copy_from_slice(bytes);
        };
        let half = |v: u64, select: u32| match select {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        put(
            DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(
            DEVICE_FEATURE,
            &half(self.device_features, self.device_feature_select).to_le_bytes(),
        );
        put(
            DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        put(
            DRIVER_FEATURE,
            &half(self.driver_features, self.driver_feature_select).to_le_bytes(),
        );
        put(MSIX_CONFIG, &self.msix_config.to_le_bytes());
        put(NUM_QUEUES, &(queues.len() as u16).to_le_bytes());
        put(DEVICE_STATUS, &[self.status]);
        put(CONFIG_GENERATION, &[self.config_generation]);
        put(QUEUE_SELECT, &self.queue_select.to_le_bytes());
        if let Some(i) = self.selected_queue(queues) {
            let q = &queues[i];
            put(QUEUE_SIZE, &q.size().to_le_bytes());
            put(QUEUE_MSIX_VECTOR, &self.queue_vectors[i].to_le_bytes());
            put(QUEUE_ENABLE, &u16::from(q.ready()).to_le_bytes());
            put(QUEUE_NOTIFY_OFF, &(i as u16).to_le_bytes());
            put(QUEUE_DESC, &q.desc_table().to_le_bytes());
            put(QUEUE_DRIVER, &q.avail_ring().to_le_bytes());
            put(QUEUE_DEVICE, &q.used_ring().to_le_bytes());
        }
        img
    }

    /// Reads `data.len()` bytes at `offset`; zeros outside the structure.
    pub(super) fn read(&self, offset: u64, data: &mut [u8], queues: &[Queue]) {
        let end = offset.saturating_add(data.len() as u64);
        if end <= COMMON_CFG_SIZE {
            data.copy_from_slice(&self.image(queues)[offset as usize..end as usize]);
        }
    }

    /// Applies a write of any size: the bytes are laid over the current
    /// image and every field they touch is updated from it. Returns the
    /// device status written, if the write touched it: the transport acts
    /// on it.
    pub(super) fn write(&mut self, offset: u64, data: &[u8], queues: &mut [Queue]) -> Option<u8> {
        let end = offset.saturating_add(data.len() as u64);
        if end > COMMON_CFG_SIZE || data.is_empty() {
            return None;
        }
        let mut img = self.image(queues);
        img[offset as usize..end as usize].copy_from_slice(data);
        let mut status = None;
        for (field, size) in FIELDS {
            if field < end && offset < field + size {
                let mut v = [0u8; 8];
                v[..size as usize].copy_from_slice(&img[field as usize..(field + size) as usize]);
                let value = u64::from_le_bytes(v);
                if field == DEVICE_STATUS {
                    status = Some(value as u8);
                } else {
                    self.write_field(field, value, queues);
                }
            }
        }
        status
    }

    fn write_field(&mut self, field: u64, value: u64, queues: &mut [Queue]) {
        match field {
            DEVICE_FEATURE_SELECT => self.device_feature_select = value as u32,
            DRIVER_FEATURE_SELECT => self.driver_feature_select = value as u32,
            DRIVER_FEATURE => {
                if self.status & status::FEATURES_OK != 0 {
                    return;
                }
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                let v = (value << shift) & self.device_features & mask;
                self.driver_features = (self.driver_features & !mask) | v;
            }
            MSIX_CONFIG => self.msix_config = self.valid_vector(value as u16),
            QUEUE_SELECT => self.queue_select = value as u16,
            QUEUE_MSIX_VECTOR => {
                if let Some(i) = self.selected_queue(queues) {
                    self.queue_vectors[i] = self.valid_vector(value as u16);
                }
            }
            QUEUE_SIZE | QUEUE_ENABLE | QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE => {
                if let Some(i) = self.selected_queue(queues) {
                    write_queue_field(i, &mut queues[i], field, value);
                }
            }
            // Read-only fields.
            _ => {}
        }
    }

    /// The registers to save.
    pub(super) fn state(&self) -> CommonConfigState {
        CommonConfigState {
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            msix_config: self.msix_config,
            queue_select: self.queue_select,
        }
    }

    /// Restores saved registers and the queues' vectors (out-of-range
    /// vectors read as no vector); features the device does not offer are
    /// dropped.
    pub(super) fn set_state(&mut self, s: &CommonConfigState, queue_vectors: &[u16]) {
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features & self.device_features;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.msix_config = self.valid_vector(s.msix_config);
        self.queue_select = s.queue_select;
        for (v, &saved) in self.queue_vectors.iter_mut().zip(queue_vectors) {
            *v = if saved < self.msix_vectors {
                saved
            } else {
                VIRTIO_MSI_NO_VECTOR
            };
        }
    }
}

/// Sets up queue `index` while it is not live.
fn write_queue_field(index: usize, q: &mut Queue, field: u64, value: u64) {
    // A live queue is not reconfigured (no VIRTIO_F_RING_RESET).
    if q.ready() {
        return;
    }
    let r = match field {
        QUEUE_SIZE => q.try_set_size(value as u16),
        QUEUE_DESC => q.try_set_desc_table_address(GuestAddress(value)),
        QUEUE_DRIVER => q.try_set_avail_ring_address(GuestAddress(value)),
        QUEUE_DEVICE => q.try_set_used_ring_address(GuestAddress(value)),
        QUEUE_ENABLE => {
            // Writing 0 is reserved for VIRTIO_F_RING_RESET.
            if value == 1 {
                q.set_ready(true);
            }
            Ok(())
        }
        _ => Ok(()),
    };
    if let Err(e) = r {
        debug!("virtio-pci: queue {index}: ignoring write {value:#x} to {field:#x}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queues() -> Vec<Queue> {
        vec![Queue::new(8).unwrap(), Queue::new(4).unwrap()]
    }

    #[test]
    fn features_are_negotiated_in_halves() {
        let mut c = CommonConfig::new((1 << 33) | (1 << 3), 2, 3);
        let mut q = queues();
        let mut d = [0u8; 4];
        c.read(DEVICE_FEATURE, &mut d, &q);
        assert_eq!(u32::from_le_bytes(d), 1 << 3);
        c.write(DEVICE_FEATURE_SELECT, &1u32.to_le_bytes(), &mut q);
        c.read(DEVICE_FEATURE, &mut d, &q);
        assert_eq!(u32::from_le_bytes(d), 1 << 1);
        // Only offered bits stick.
        c.write(DRIVER_FEATURE, &u32::MAX.to_le_bytes(), &mut q);
        c.write(DRIVER_FEATURE_SELECT, &1u32.to_le_bytes(), &mut q);
        c.write(DRIVER_FEATURE, &u32::MAX.to_le_bytes(), &mut q);
        assert_eq!(c.driver_features, (1 << 33) | (1 << 3));
        // Frozen once FEATURES_OK is set.
        c.status = status::FEATURES_OK;
        c.write(DRIVER_FEATURE, &0u32.to_le_bytes(), &mut q);
        assert_eq!(c.driver_features, (1 << 33) | (1 << 3));
    }

    #[test]
    fn status_is_handed_back_and_queue_fields_apply_to_the_selected_queue() {
        let mut c = CommonConfig::new(0, 2, 3);
        let mut q = queues();
        // An 8-byte write over msix_config, num_queues, status and
        // config_generation: the vector is set, the status returned.
        let mut w = [0u8; 8];
        w[0..2].copy_from_slice(&2u16.to_le_bytes());
        w[4] = status::ACKNOWLEDGE;
        assert_eq!(c.write(MSIX_CONFIG, &w, &mut q), Some(status::ACKNOWLEDGE));
        assert_eq!(c.msix_config, 2);
        // Out-of-range vectors read as none.
        c.write(MSIX_CONFIG, &3u16.to_le_bytes(), &mut q);
        assert_eq!(c.msix_config, VIRTIO_MSI_NO_VECTOR);
        c.write(QUEUE_SELECT, &1u16.to_le_bytes(), &mut q);
        c.write(QUEUE_SIZE, &2u16.to_le_bytes(), &mut q);
        c.write(QUEUE_DESC, &0x1000u64.to_le_bytes(), &mut q);
        c.write(QUEUE_MSIX_VECTOR, &1u16.to_le_bytes(), &mut q);
        c.write(QUEUE_ENABLE, &1u16.to_le_bytes(), &mut q);
        assert_eq!(q[1].size(), 2);
        assert_eq!(q[1].desc_table(), 0x1000);
        assert!(q[1].ready());
        assert_eq!(c.queue_vectors, [VIRTIO_MSI_NO_VECTOR, 1]);
        // A live queue is not reconfigured.
        c.write(QUEUE_SIZE, &4u16.to_le_bytes(), &mut q);
        assert_eq!(q[1].size(), 2);
        let mut d = [0u8; 2];
        c.read(QUEUE_NOTIFY_OFF, &mut d, &q);
        assert_eq!(u16::from_le_bytes(d), 1);
        // A selector past the queues reads zeros and writes nothing.
        c.write(QUEUE_SELECT, &7u16.to_le_bytes(), &mut q);
        c.read(QUEUE_SIZE, &mut d, &q);
        assert_eq!(d, [0, 0]);
        // Outside the structure: nothing.
        assert_eq!(c.write(COMMON_CFG_SIZE - 1, &[0, 0], &mut q), None);
        let mut r = [0xffu8; 4];
        c.read(COMMON_CFG_SIZE - 2, &mut r, &q);
        assert_eq!(r, [0xff; 4]);
    }

    #[test]
    fn state_round_trip() {
        let mut c = CommonConfig::new(u64::MAX >> 1, 2, 3);
        let mut q = queues();
        c.write(DRIVER_FEATURE, &0xffu32.to_le_bytes(), &mut q);
        c.write(MSIX_CONFIG, &1u16.to_le_bytes(), &mut q);
        c.write(QUEUE_MSIX_VECTOR, &2u16.to_le_bytes(), &mut q);
        let s = c.state();
        let mut d = CommonConfig::new(0xf, 2, 3);
        d.set_state(&s, &c.queue_vectors);
        assert_eq!(d.driver_features, 0xf, "unoffered features dropped");
        assert_eq!(d.msix_config, 1);
        assert_eq!(d.queue_vectors, [2, VIRTIO_MSI_NO_VECTOR]);
    }
}
