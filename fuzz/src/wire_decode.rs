//! `wire_decode`: every decoder of `vfio_user_server::wire` (and the
//! migration stream decoder, which also parses client bytes) on arbitrary
//! input. Decoders must never panic; what decodes must re-encode to the
//! bytes it came from.

use vfio_user_server::state_stream::decode_stream;
use vfio_user_server::wire::*;

macro_rules! round_trip {
    ($ty:ty, $b:expr) => {{
        let b: &[u8] = $b;
        match <$ty>::decode(b) {
            Ok(v) => {
                assert!(b.len() >= <$ty>::SIZE);
                assert_eq!(v.encode(), &b[..<$ty>::SIZE], stringify!($ty));
            }
            Err(WireError::Short { need, have }) => {
                assert!(b.len() < <$ty>::SIZE);
                assert_eq!((need, have), (<$ty>::SIZE, b.len()));
            }
        }
    }};
}

/// Runs every decoder on `data` and on every suffix a message could start
/// a payload at.
pub fn run(data: &[u8]) {
    // The first byte picks an offset so payloads are also decoded at an
    // unaligned position inside a bigger buffer.
    let skip = data.first().map_or(0, |b| (*b as usize) % 17);
    for b in [data, data.get(skip..).unwrap_or(&[])] {
        decode_all(b);
    }
    // The migration stream (MIG_DATA_WRITE bytes) is client data too.
    // Once per input: its CRC walks every byte.
    let _ = decode_stream(data, "fuzz-test-device");
    // The payload after a header, as the server slices it.
    if let Ok(h) = Header::decode(data) {
        let end = (h.msg_size as usize).clamp(HEADER_SIZE, data.len().max(HEADER_SIZE));
        if let Some(payload) = data.get(HEADER_SIZE..end) {
            decode_all(payload);
        }
    }
}

fn decode_all(b: &[u8]) {
    match Header::decode(b) {
        Ok(h) => {
            assert_eq!(h.encode(), b[..HEADER_SIZE]);
            let _ = (h.msg_type(), h.no_reply());
            let r = h.reply(b.len());
            assert_eq!(r.flags, flags::TYPE_REPLY);
            assert_eq!(r.msg_id, h.msg_id);
            // An error reply is header-only and never carries errno 0.
            let errno = h.error_no as i32;
            let e = h.error_reply(errno);
            assert_eq!(e.msg_size as usize, HEADER_SIZE);
            assert_ne!(e.error_no, 0);
            assert_eq!(e.flags, flags::TYPE_REPLY | flags::ERROR);
            if errno > 0 {
                assert_eq!(e.error_no, h.error_no);
            }
        }
        Err(_) => assert!(b.len() < HEADER_SIZE),
    }
    match Version::decode(b) {
        Ok(v) => {
            assert!(!v.json.contains(&0));
            let enc = v.encode();
            if b.len() > 4 {
                assert_eq!(enc, b);
            } else {
                // No JSON at all: encode() adds an empty, terminated one.
                assert_eq!(&enc[..4], &b[..4]);
            }
        }
        Err(VersionError::Short(_)) => assert!(b.len() < 4),
        Err(VersionError::Unterminated) => assert_ne!(b.last(), Some(&0)),
        Err(VersionError::EmbeddedNul) => assert!(b[4..b.len() - 1].contains(&0)),
    }
    round_trip!(DmaMap, b);
    round_trip!(DmaUnmap, b);
    round_trip!(DeviceInfo, b);
    round_trip!(RegionInfo, b);
    round_trip!(RegionIoFds, b);
    round_trip!(IrqInfo, b);
    round_trip!(IrqSet, b);
    round_trip!(RegionAccess, b);
    round_trip!(WriteMultiRecord, b);
    round_trip!(DmaAccess, b);
    round_trip!(DeviceFeature, b);
    round_trip!(MigData, b);
    // REGION_WRITE_MULTI records as the server walks them.
    if let Ok(n) = read_u64(b, 0) {
        let records = &b[8..];
        let _ = (n as usize).checked_mul(WriteMultiRecord::SIZE);
        for chunk in records.chunks_exact(WriteMultiRecord::SIZE) {
            WriteMultiRecord::decode(chunk).expect("a full record decodes");
        }
    }
    // Field reads at every offset a handler uses, and at hostile ones.
    for off in [0, 4, 8, 12, 16, 20, 24, b.len(), usize::MAX - 3, usize::MAX] {
        let a = read_u32(b, off);
        assert_eq!(a.is_ok(), off.checked_add(4).is_some_and(|e| e <= b.len()));
        let c = read_u64(b, off);
        assert_eq!(c.is_ok(), off.checked_add(8).is_some_and(|e| e <= b.len()));
    }
    // Sparse mmap capability built from client-influenced areas.
    let areas: Vec<(u64, u64)> = b
        .chunks_exact(16)
        .take(8)
        .map(|c| {
            let (o, s) = c.split_at(8);
            (
                u64::from_le_bytes(o.try_into().unwrap()),
                u64::from_le_bytes(s.try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(encode_sparse_mmap_cap(&areas).len(), 16 + 16 * areas.len());
}
