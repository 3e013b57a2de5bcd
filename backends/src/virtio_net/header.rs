//! `struct virtio_net_hdr_v1`, the 12-byte header in front of every frame
//! (virtio spec 5.1.6). The TAP reads and writes it as is; the device only
//! fills in `num_buffers` on receive.

/// Size of the header when `VIRTIO_F_VERSION_1` is negotiated.
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: u64 = 10;

/// A decoded `virtio_net_hdr_v1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment size for GSO.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Buffers the frame was spread over (receive).
    pub num_buffers: u16,
}

impl NetHeader {
    /// The header from its little-endian bytes.
    pub fn decode(b: &[u8; NET_HDR_LEN]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    /// The header as little-endian bytes.
    pub fn encode(&self) -> [u8; NET_HDR_LEN] {
        let mut b = [0u8; NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (at, v) in [
            (2, self.hdr_len),
            (4, self.gso_size),
            (6, self.csum_start),
            (8, self.csum_offset),
            (10, self.num_buffers),
        ] {
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let h = NetHeader {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x3412,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.encode();
        assert_eq!(NetHeader::decode(&b), h);
        assert_eq!(&b[..4], &[1, 4, 0x12, 0x34]);
        assert_eq!(&b[NUM_BUFFERS_OFFSET as usize..], &3u16.to_le_bytes()[..]);
        assert_eq!(NetHeader::decode(&[0; NET_HDR_LEN]), NetHeader::default());
    }
}
