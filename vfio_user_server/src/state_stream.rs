//! The self-describing format of saved device state, shared by snapshot
//! files and MIG_DATA streams: magic, format version, device kind, JSON
//! body, CRC-32. A corrupt, truncated or foreign stream is refused before
//! anything is applied.

use crate::vm_migration::{MigratableError, Snapshot};

/// Magic at the start of a device state stream (snapshot file or
/// MIG_DATA stream).
pub const STREAM_MAGIC: &[u8; 8] = b"VFUSNAP\0";
/// Version of the stream format.
pub const STREAM_VERSION: u32 = 1;

/// Encodes a device snapshot as a self-describing stream: magic, format
/// version, device kind, JSON body length, JSON body, CRC-32 of all before.
pub fn encode_stream(kind: &str, snapshot: &Snapshot) -> Result<Vec<u8>, MigratableError> {
    let body =
        serde_json::to_vec(snapshot).map_err(|e| MigratableError::Snapshot(e.to_string()))?;
    let mut out = Vec::with_capacity(body.len() + 64);
    out.extend_from_slice(STREAM_MAGIC);
    out.extend_from_slice(&STREAM_VERSION.to_le_bytes());
    out.extend_from_slice(&(kind.len() as u32).to_le_bytes());
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a stream made by [`encode_stream`], refusing a corrupt,
/// truncated or foreign one, or one for another kind of device.
pub fn decode_stream(bytes: &[u8], expected_kind: &str) -> Result<Snapshot, MigratableError> {
    let bad = |what: &str| MigratableError::Restore(what.to_string());
    if bytes.len() < STREAM_MAGIC.len() + 4 + 4 + 8 + 4 {
        return Err(bad("state stream is truncated"));
    }
    let (content, crc) = bytes.split_at(bytes.len() - 4);
    if !content.starts_with(STREAM_MAGIC) {
        return Err(bad("not a device state stream"));
    }
    let mut crc_le = [0u8; 4];
    crc_le.copy_from_slice(crc);
    if crc32(content) != u32::from_le_bytes(crc_le) {
        return Err(bad("state stream checksum mismatch (corrupt or truncated)"));
    }
    let rest = &content[STREAM_MAGIC.len()..];
    let u32_at = |b: &[u8], o: usize| -> Option<u32> {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let version = u32_at(rest, 0).ok_or_else(|| bad("truncated header"))?;
    if version != STREAM_VERSION {
        return Err(bad(&format!(
            "state stream format {version} is not supported (expected {STREAM_VERSION})"
        )));
    }
    let kind_len = u32_at(rest, 4).ok_or_else(|| bad("truncated header"))? as usize;
    let kind = rest
        .get(8..8usize.saturating_add(kind_len))
        .ok_or_else(|| bad("truncated device kind"))?;
    if kind != expected_kind.as_bytes() {
        return Err(bad(&format!(
            "state is for a {} device, not {expected_kind}",
            String::from_utf8_lossy(kind)
        )));
    }
    let off = 8 + kind_len;
    let len_bytes = rest
        .get(off..off + 8)
        .ok_or_else(|| bad("truncated body length"))?;
    let mut l = [0u8; 8];
    l.copy_from_slice(len_bytes);
    let body_len = u64::from_le_bytes(l);
    let body = &rest[off + 8..];
    if body.len() as u64 != body_len {
        return Err(bad("state body length mismatch"));
    }
    serde_json::from_slice(body).map_err(|e| bad(&format!("bad state body: {e}")))
}

/// CRC-32 (IEEE) of `data`.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_round_trip_and_refusals() {
        let mut s = Snapshot::new_from_state(&vec![1u32, 2, 3]).unwrap();
        s.add_snapshot("child".into(), Snapshot::new_from_state(&"x").unwrap());
        let b = encode_stream("virtio-blk", &s).unwrap();
        assert_eq!(decode_stream(&b, "virtio-blk").unwrap(), s);
        assert!(decode_stream(&b, "virtio-net").is_err());
        assert!(decode_stream(&b[..b.len() - 1], "virtio-blk").is_err());
        let mut c = b.clone();
        c[20] ^= 1;
        assert!(decode_stream(&c, "virtio-blk").is_err());
        assert!(decode_stream(b"garbage", "virtio-blk").is_err());
        assert!(decode_stream(&[], "virtio-blk").is_err());
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }
}
