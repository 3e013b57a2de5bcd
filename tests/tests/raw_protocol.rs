//! Every command and every bad-input case, spoken byte by byte with the
//! raw client. Each test also proves that the server still answers
//! afterwards.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use integration_tests::client::header;
use integration_tests::proto::*;
use integration_tests::*;
use vfio_user_server::ResetReason;

fn setup() -> (TestServer, RawClient) {
    let s = spawn_server();
    let c = RawClient::connect_negotiated(s.path());
    (s, c)
}

/// Maps GUEST_RAM_SIZE bytes of a fresh memfd at GUEST_RAM_BASE.
fn map_guest_ram(c: &mut RawClient) -> (std::fs::File, Mapping) {
    let ram = memfd("guest-ram", GUEST_RAM_SIZE);
    c.dma_map(0, GUEST_RAM_BASE, GUEST_RAM_SIZE, Some(ram.as_raw_fd()))
        .ok();
    let m = Mapping::new(ram.as_raw_fd(), GUEST_RAM_SIZE as usize, 0).unwrap();
    (ram, m)
}

fn ring_doorbell(c: &mut RawClient, n: u32) -> Reply {
    c.region_write(0, DMA_DOORBELL, &n.to_le_bytes())
}

// ---------------------------------------------------------------- VERSION

fn caps_of(r: &Reply) -> serde_json::Value {
    assert!(r.payload.len() > 5);
    let json = &r.payload[4..];
    assert_eq!(*json.last().unwrap(), 0, "JSON must be NUL-terminated");
    assert!(!json[..json.len() - 1].contains(&0));
    serde_json::from_slice(&json[..json.len() - 1]).expect("reply JSON parses")
}

#[test]
fn version_reply_minor_and_capabilities() {
    let s = spawn_server();
    for (i, (client_minor, want)) in [(0u16, 0u16), (1, 1), (2, 2), (7, 2)]
        .into_iter()
        .enumerate()
    {
        let mut c = RawClient::connect(s.path()).unwrap();
        let ch = r#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#;
        let r = c
            .version_raw(&payload::version(0, client_minor, Some(ch), true))
            .ok();
        assert_eq!(le16(&r.payload, 0), 0, "major");
        assert_eq!(
            le16(&r.payload, 2),
            want,
            "minor for client minor {client_minor}"
        );
        assert!(r.fds.is_empty());
        let v = caps_of(&r);
        let caps = &v["capabilities"];
        assert_eq!(caps["max_msg_fds"], 16);
        assert_eq!(caps["max_data_xfer_size"], 1048576);
        assert_eq!(caps["pgsizes"], 4096);
        assert_eq!(caps["max_dma_maps"], 65535);
        assert_eq!(caps["write_multiple"], true);
        assert!(caps.get("twin_socket").is_none());
        assert!(caps.get("migration").is_none(), "device is not migratable");
        c.ping();
        drop(c);
        // Wait for the detach before the next client attaches.
        assert!(wait_until(Duration::from_secs(5), || s
            .state()
            .resets
            .len()
            == i + 1));
    }
}

#[test]
fn version_without_json_is_accepted() {
    let s = spawn_server();
    let mut c = RawClient::connect(s.path()).unwrap();
    let r = c.version_raw(&payload::version(0, 0, None, false)).ok();
    assert_eq!(le16(&r.payload, 2), 0);
    caps_of(&r);
    c.ping();
}

#[test]
fn version_qemu_capabilities_accepted() {
    let s = spawn_server();
    let mut c = RawClient::connect(s.path()).unwrap();
    let qemu = r#"{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#;
    let r = c
        .version_raw(&payload::version(0, 0, Some(qemu), true))
        .ok();
    assert_eq!(le16(&r.payload, 2), 0);
    c.ping();
}

#[test]
fn second_version_is_einval() {
    let (_s, mut c) = setup();
    let e = c
        .version_raw(&payload::version(0, 2, Some("{}"), true))
        .err();
    assert_eq!(e, libc::EINVAL);
    c.ping();
}

#[test]
fn command_before_version_is_einval() {
    let s = spawn_server();
    let mut c = RawClient::connect(s.path()).unwrap();
    assert_eq!(c.get_info().err(), libc::EINVAL);
    assert_eq!(c.region_read(0, 0, 4).err(), libc::EINVAL);
    c.negotiate();
    c.ping();
}

#[test]
fn bad_versions_get_errors_then_a_proper_one_works() {
    let s = spawn_server();
    let mut c = RawClient::connect(s.path()).unwrap();
    let bad: Vec<Vec<u8>> = vec![
        payload::version(0, 2, Some("{garbage"), true),
        payload::version(0, 2, Some(r#"{"capabilities":{}}"#), false),
        payload::version(1, 0, Some(r#"{"capabilities":{}}"#), true),
        payload::version(
            0,
            2,
            Some(r#"{"capabilities":{"max_msg_fds":"many"}}"#),
            true,
        ),
        payload::version(0, 2, Some("{\"a\":1}\0{}"), true),
        vec![0, 0],
    ];
    for p in bad {
        let e = c.version_raw(&p).err();
        assert!(
            e == libc::EINVAL || e == libc::ENOTSUP,
            "errno {e} for {p:?}"
        );
    }
    c.negotiate();
    c.ping();
}

#[test]
fn version_with_fds_is_einval() {
    let s = spawn_server();
    let mut c = RawClient::connect(s.path()).unwrap();
    let e = eventfd();
    let r = c.call_fds(
        cmd::VERSION,
        &payload::version(0, 2, Some("{}"), true),
        &[e.as_raw_fd()],
    );
    assert_eq!(r.err(), libc::EINVAL);
    c.negotiate();
    c.ping();
}

// ---------------------------------------------------------------- framing

#[test]
fn header_split_across_writes() {
    let (_s, mut c) = setup();
    let id = c.next_id();
    let mut m = header(id, cmd::REGION_READ, 32, 0, 0);
    m.extend_from_slice(&payload::region_access(CONFIG_REGION, 0, 4, &[]));
    c.send_bytes(&m[..10], &[]).unwrap();
    c.expect_no_reply_within(50);
    c.send_bytes(&m[10..16], &[]).unwrap();
    c.expect_no_reply_within(50);
    c.send_bytes(&m[16..], &[]).unwrap();
    let r = c.recv_reply(id, cmd::REGION_READ).ok();
    assert_eq!(le16(&r.payload, 16), VENDOR_ID);
    assert_eq!(le16(&r.payload, 18), DEVICE_ID);
    c.ping();
}

#[test]
fn several_messages_in_one_write() {
    let (_s, mut c) = setup();
    let mut bytes = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..5 {
        let id = c.next_id();
        bytes.extend_from_slice(&header(id, cmd::GET_INFO, 32, 0, 0));
        bytes.extend_from_slice(&payload::get_info(16));
        ids.push(id);
    }
    c.send_bytes(&bytes, &[]).unwrap();
    for id in ids {
        c.recv_reply(id, cmd::GET_INFO).ok();
    }
    c.ping();
}

#[test]
fn msg_size_below_header_is_einval() {
    let (_s, mut c) = setup();
    for size in [0u32, 8, 15] {
        let id = c.next_id();
        c.send_bytes(&header(id, cmd::GET_INFO, size, 0, 0), &[])
            .unwrap();
        assert_eq!(c.recv_reply(id, cmd::GET_INFO).err(), libc::EINVAL);
        c.ping();
    }
}

#[test]
fn msg_size_above_limit_is_e2big_and_body_drained() {
    let (_s, mut c) = setup();
    let size = 2 << 20;
    let id = c.next_id();
    let mut m = header(id, cmd::REGION_WRITE, size as u32, 0, 0);
    m.extend_from_slice(&payload::region_access(0, 0, (size - 32) as u32, &[]));
    m.resize(size, 0xee);
    c.send_bytes(&m, &[]).unwrap();
    assert_eq!(c.recv_reply(id, cmd::REGION_WRITE).err(), libc::E2BIG);
    c.ping();
    // Nothing of the body was written.
    assert_eq!(c.read_ok(0, 0, 16), vec![0; 16]);
}

#[test]
fn unknown_commands_are_enosys_and_drained() {
    let (_s, mut c) = setup();
    for command in [99u16, cmd::DIRTY_PAGES, 0, 0xffff] {
        // A body that would look like a GET_INFO if it were not drained.
        let mut body = header(0x7777, cmd::GET_INFO, 32, 0, 0);
        body.extend_from_slice(&payload::get_info(16));
        body.extend_from_slice(&[0xab; 100]);
        assert_eq!(c.call(command, &body).err(), libc::ENOSYS, "cmd {command}");
        c.ping();
    }
}

#[test]
fn server_to_client_commands_from_the_client_are_errors() {
    let (_s, mut c) = setup();
    for command in [cmd::DMA_READ, cmd::DMA_WRITE] {
        let p = integration_tests::client::Enc::new()
            .u64(GUEST_RAM_BASE)
            .u64(8)
            .bytes(&[1; 8])
            .done();
        let e = c.call(command, &p).err();
        assert!(e == libc::EINVAL || e == libc::ENOSYS);
        c.ping();
    }
}

#[test]
fn reply_type_on_a_command_is_einval() {
    let (_s, mut c) = setup();
    for flags in [hflags::REPLY, hflags::REPLY | hflags::ERROR, 2, 0xf] {
        let id = c.send(cmd::GET_INFO, flags, &payload::get_info(16), &[]);
        let r = c.recv_reply(id, cmd::GET_INFO);
        assert_eq!(r.err(), libc::EINVAL, "flags {flags:#x}");
    }
    c.ping();
}

// ---------------------------------------------------------------- argsz and indices

#[test]
fn wrong_argsz_is_einval() {
    let (_s, mut c) = setup();
    assert_eq!(
        c.call(cmd::GET_INFO, &payload::get_info(8)).err(),
        libc::EINVAL
    );
    c.ping();
    assert_eq!(c.region_info(0, 16).err(), libc::EINVAL);
    c.ping();
    let ram = memfd("ram", 0x1000);
    let r = c.call_fds(
        cmd::DMA_MAP,
        &payload::dma_map(8, DMA_READ | DMA_WRITE, 0, GUEST_RAM_BASE, 0x1000),
        &[ram.as_raw_fd()],
    );
    assert_eq!(r.err(), libc::EINVAL);
    c.ping();
    assert_eq!(
        c.call(cmd::IRQ_INFO, &payload::irq_info(8, 0)).err(),
        libc::EINVAL
    );
    assert_eq!(
        c.call(cmd::DMA_UNMAP, &payload::dma_unmap(8, 0, 0, 0))
            .err(),
        libc::EINVAL
    );
    // Payload shorter than the fixed structures.
    assert_eq!(c.call(cmd::GET_INFO, &[16, 0, 0, 0]).err(), libc::EINVAL);
    assert_eq!(c.call(cmd::REGION_INFO, &[32, 0, 0, 0]).err(), libc::EINVAL);
    assert_eq!(c.call(cmd::SET_IRQS, &[20, 0, 0, 0]).err(), libc::EINVAL);
    assert_eq!(c.call(cmd::REGION_READ, &[0; 8]).err(), libc::EINVAL);
    assert_eq!(c.call(cmd::DMA_MAP, &[0; 8]).err(), libc::EINVAL);
    c.ping();
    // Larger argsz than needed is fine (the rust-vmm client sends 32).
    let r = c.call(cmd::GET_INFO, &payload::get_info(32)).ok();
    assert_eq!(le32(&r.payload, 0), 16);
}

#[test]
fn get_info_reply() {
    let (_s, mut c) = setup();
    let r = c.get_info().ok();
    assert_eq!(r.msg_size, 32);
    assert_eq!(le32(&r.payload, 0), 16, "argsz");
    assert_eq!(le32(&r.payload, 4), DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET);
    assert_eq!(le32(&r.payload, 8), 9);
    assert_eq!(le32(&r.payload, 12), 5);
}

#[test]
fn region_index_out_of_range() {
    let (_s, mut c) = setup();
    for idx in [9, 100, u32::MAX] {
        assert_eq!(c.region_info(idx, 32).err(), libc::EINVAL);
        assert_eq!(c.region_read(idx, 0, 4).err(), libc::EINVAL);
        assert_eq!(c.region_write(idx, 0, &[1, 2, 3, 4]).err(), libc::EINVAL);
        c.ping();
    }
}

#[test]
fn irq_index_out_of_range() {
    let (_s, mut c) = setup();
    for idx in [5, 6, u32::MAX] {
        assert_eq!(c.irq_info(idx).err(), libc::EINVAL);
        assert_eq!(
            c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, idx, 0, 1, &[], &[])
                .err(),
            libc::EINVAL
        );
        c.ping();
    }
}

// ---------------------------------------------------------------- region access

#[test]
fn region_read_write_round_trip() {
    let (s, mut c) = setup();
    let data: Vec<u8> = (0..64u8).collect();
    c.write_ok(0, 0x100, &data);
    assert_eq!(c.read_ok(0, 0x100, 64), data);
    assert_eq!(c.read_ok(0, 0x120, 4), vec![0x20, 0x21, 0x22, 0x23]);
    // Last bytes of the region.
    c.write_ok(0, BAR0_SIZE - 4, &[9, 8, 7, 6]);
    assert_eq!(c.read_ok(0, BAR0_SIZE - 4, 4), vec![9, 8, 7, 6]);
    // Config: id dword and a writable byte.
    let id = c.read_ok(CONFIG_REGION, 0, 4);
    assert_eq!(le32(&id, 0), (DEVICE_ID as u32) << 16 | VENDOR_ID as u32);
    c.write_ok(CONFIG_REGION, 0x40, &[0xaa]);
    assert_eq!(c.read_ok(CONFIG_REGION, 0x40, 1), vec![0xaa]);
    // Whole config space in one read.
    assert_eq!(c.read_ok(CONFIG_REGION, 0, 256).len(), 256);
    // BAR1 through messages.
    assert_eq!(c.read_ok(1, BAR1_MARKER_OFFSET, 1), vec![BAR1_MARKER]);
    c.write_ok(1, 0x1000, &[1, 2]);
    assert_eq!(c.read_ok(1, 0x1000, 2), vec![1, 2]);
    let w = &s.state().writes;
    assert_eq!(w[0], (0, 0x100, data.clone()));
}

#[test]
fn access_past_the_end_is_einval() {
    let (s, mut c) = setup();
    let cases: [(u32, u64, u32); 6] = [
        (0, BAR0_SIZE - 4, 8),
        (0, BAR0_SIZE, 1),
        (0, u64::MAX, 2),
        (0, u64::MAX - 1, 4),
        (CONFIG_REGION, 255, 2),
        (2, 0, 4), // BAR2 is absent.
    ];
    for (idx, off, count) in cases {
        assert_eq!(c.region_read(idx, off, count).err(), libc::EINVAL);
        let data = vec![0x11; count as usize];
        assert_eq!(c.region_write(idx, off, &data).err(), libc::EINVAL);
        c.ping();
    }
    assert!(s.state().writes.is_empty());
}

#[test]
fn region_write_count_must_match_data() {
    let (s, mut c) = setup();
    for (count, data) in [(8u32, vec![1u8; 4]), (2, vec![1u8; 4])] {
        let r = c.call(
            cmd::REGION_WRITE,
            &payload::region_access(0, 0, count, &data),
        );
        assert_eq!(r.err(), libc::EINVAL);
        c.ping();
    }
    assert!(s.state().writes.is_empty());
    // A read request carries no data.
    let r = c.call(
        cmd::REGION_READ,
        &payload::region_access(0, 0, 4, &[1, 2, 3, 4]),
    );
    assert_eq!(r.err(), libc::EINVAL);
    c.ping();
}

#[test]
fn zero_length_access_succeeds() {
    let (s, mut c) = setup();
    let r = c.region_read(0, 0x10, 0).ok();
    assert_eq!(r.payload, payload::region_access(0, 0x10, 0, &[]));
    let r = c.region_write(0, 0x10, &[]).ok();
    assert_eq!(r.payload, payload::region_access(0, 0x10, 0, &[]));
    // At the very end of a region too.
    c.region_read(0, BAR0_SIZE, 0).ok();
    assert!(
        s.state().writes.is_empty(),
        "zero-length write reached the device"
    );
    c.ping();
}

#[test]
fn oversized_access_is_einval() {
    let (_s, mut c) = setup();
    assert_eq!(c.region_read(0, 0, (1 << 20) + 1).err(), libc::EINVAL);
    assert_eq!(c.region_read(0, 0, u32::MAX).err(), libc::EINVAL);
    c.ping();
}

#[test]
fn no_reply_write_takes_effect_silently() {
    let (_s, mut c) = setup();
    c.send(
        cmd::REGION_WRITE,
        hflags::NO_REPLY,
        &payload::region_access(0, 0x200, 4, &[0xde, 0xad, 0xbe, 0xef]),
        &[],
    );
    c.expect_no_reply_within(200);
    assert_eq!(c.read_ok(0, 0x200, 4), vec![0xde, 0xad, 0xbe, 0xef]);
    // Posted writes followed at once by a read: ordering holds.
    for i in 0..20u8 {
        c.send(
            cmd::REGION_WRITE,
            hflags::NO_REPLY,
            &payload::region_access(0, 0x300 + i as u64, 1, &[i]),
            &[],
        );
    }
    let want: Vec<u8> = (0..20).collect();
    assert_eq!(c.read_ok(0, 0x300, 20), want);
}

#[test]
fn failing_command_with_no_reply_gets_no_reply() {
    let (_s, mut c) = setup();
    c.send(
        cmd::REGION_WRITE,
        hflags::NO_REPLY,
        &payload::region_access(0, BAR0_SIZE, 4, &[1, 2, 3, 4]),
        &[],
    );
    c.send(
        cmd::REGION_INFO,
        hflags::NO_REPLY,
        &payload::region_info(32, 50),
        &[],
    );
    c.send(77, hflags::NO_REPLY, &[1, 2, 3], &[]);
    c.expect_no_reply_within(200);
    // The next reply is the one to the next command.
    c.ping();
}

// ---------------------------------------------------------------- WRITE_MULTI

#[test]
fn write_multi_applies_in_order() {
    let (s, mut c) = setup();
    let recs: [(u32, u64, &[u8]); 4] = [
        (0, 0x40, &[1, 2, 3, 4, 5, 6, 7, 8]),
        (0, 0x44, &[0xaa, 0xbb]),
        (CONFIG_REGION, 0x44, &[0x77]),
        (0, 0x45, &[0xcc]),
    ];
    let r = c.call(cmd::WRITE_MULTI, &payload::write_multi(&recs)).ok();
    assert_eq!(r.payload.len(), 8);
    assert_eq!(le64(&r.payload, 0), 4);
    assert_eq!(c.read_ok(0, 0x40, 8), vec![1, 2, 3, 4, 0xaa, 0xcc, 7, 8]);
    assert_eq!(c.read_ok(CONFIG_REGION, 0x44, 1), vec![0x77]);
    let w: Vec<(u32, u64)> = s.state().writes.iter().map(|w| (w.0, w.1)).collect();
    assert_eq!(w, vec![(0, 0x40), (0, 0x44), (7, 0x44), (0, 0x45)]);
    // With NO_REPLY, as QEMU sends it.
    c.send(
        cmd::WRITE_MULTI,
        hflags::NO_REPLY,
        &payload::write_multi(&[(0, 0x50, &[5])]),
        &[],
    );
    c.expect_no_reply_within(100);
    assert_eq!(c.read_ok(0, 0x50, 1), vec![5]);
}

#[test]
fn malformed_write_multi_is_einval() {
    let (s, mut c) = setup();
    let good = payload::write_multi_record(0, 0, &[1]);
    // Records with count 9 and 0.
    let mut r9 = payload::write_multi_record(0, 0, &[1; 8]);
    r9[12] = 9;
    let mut r0 = payload::write_multi_record(0, 0, &[1]);
    r0[12] = 0;
    let bad: Vec<Vec<u8>> = vec![
        // Count 2 with one record.
        client::Enc::new().u64(2).bytes(&good).done(),
        // Count 0.
        client::Enc::new().u64(0).done(),
        // Trailing garbage.
        client::Enc::new().u64(1).bytes(&good).bytes(&[0; 5]).done(),
        // Too short for the count.
        vec![1, 0, 0],
        client::Enc::new().u64(1).bytes(&r9).done(),
        client::Enc::new().u64(1).bytes(&r0).done(),
        // A record past the end of its region: none of the writes applies.
        payload::write_multi(&[(0, 0, &[1]), (0, BAR0_SIZE - 1, &[1, 2])]),
        // Absent region.
        payload::write_multi(&[(2, 0, &[1])]),
        // Huge count.
        client::Enc::new().u64(u64::MAX).bytes(&good).done(),
    ];
    for p in bad {
        assert_eq!(c.call(cmd::WRITE_MULTI, &p).err(), libc::EINVAL, "{p:?}");
        c.ping();
    }
    assert!(s.state().writes.is_empty());
}

// ---------------------------------------------------------------- REGION_INFO

#[test]
fn region_info_bar1_two_step_with_sparse_mmap_and_fd() {
    let (_s, mut c) = setup();
    // Step 1: argsz 32 -> the fixed part only, argsz = needed, no fd.
    let r = c.region_info(1, 32).ok();
    assert_eq!(r.msg_size, 48);
    assert_eq!(r.payload.len(), 32);
    let need = 32 + 16 + 16 * 2;
    assert_eq!(le32(&r.payload, 0), need, "argsz");
    let flags = le32(&r.payload, 4);
    assert_eq!(flags & (REGION_MMAP | REGION_CAPS), 0, "flags {flags:#x}");
    assert_eq!(
        flags & (REGION_READ | REGION_WRITE),
        REGION_READ | REGION_WRITE
    );
    assert_eq!(le32(&r.payload, 8), 1, "index");
    assert_eq!(le32(&r.payload, 12), 0, "cap_offset");
    assert_eq!(le64(&r.payload, 16), BAR1_SIZE);
    assert!(r.fds.is_empty(), "no fd with an incomplete reply");

    // Step 2 (and a generous argsz): caps, MMAP, one fd.
    for argsz in [need, 4096] {
        let r = c.region_info(1, argsz).ok();
        assert_eq!(r.payload.len(), need as usize);
        assert_eq!(le32(&r.payload, 0), need);
        assert_eq!(
            le32(&r.payload, 4),
            REGION_READ | REGION_WRITE | REGION_MMAP | REGION_CAPS
        );
        assert_eq!(le32(&r.payload, 8), 1);
        assert_eq!(le32(&r.payload, 12), 32, "cap_offset");
        assert_eq!(le64(&r.payload, 16), BAR1_SIZE);
        let file_offset = le64(&r.payload, 24);
        let cap = &r.payload[32..];
        assert_eq!(le16(cap, 0), CAP_SPARSE_MMAP);
        assert_eq!(le16(cap, 2), 1, "cap version");
        assert_eq!(le32(cap, 4), 0, "next");
        assert_eq!(le32(cap, 8), 2, "nr_areas");
        for (i, (off, size)) in BAR1_AREAS.iter().enumerate() {
            assert_eq!(le64(cap, 16 + 16 * i), *off);
            assert_eq!(le64(cap, 24 + 16 * i), *size);
        }
        assert_eq!(r.fds.len(), 1, "exactly one fd");
        // The fd really maps the device's memory.
        let m = Mapping::new(r.fds[0].as_raw_fd(), BAR1_SIZE as usize, file_offset).unwrap();
        assert_eq!(m.read(BAR1_MARKER_OFFSET as usize, 1), vec![BAR1_MARKER]);
        m.write(0x2010, &[0x42]);
        assert_eq!(c.read_ok(1, 0x2010, 1), vec![0x42]);
        c.write_ok(1, 0x2020, &[0x43]);
        assert_eq!(m.read(0x2020, 1), vec![0x43]);
    }
    c.ping();
}

#[test]
fn region_info_plain_regions() {
    let (_s, mut c) = setup();
    for (idx, size, flags) in [
        (0u32, BAR0_SIZE, REGION_READ | REGION_WRITE),
        (2, 0, 0),
        (3, 0, 0),
        (6, 0, 0),
        (CONFIG_REGION, CONFIG_SIZE, REGION_READ | REGION_WRITE),
        (8, 0, 0),
    ] {
        for argsz in [32, 1024] {
            let r = c.region_info(idx, argsz).ok();
            assert_eq!(r.payload.len(), 32, "region {idx}");
            assert_eq!(le32(&r.payload, 0), 32);
            assert_eq!(le32(&r.payload, 4), flags, "region {idx}");
            assert_eq!(le32(&r.payload, 8), idx);
            assert_eq!(le32(&r.payload, 12), 0);
            assert_eq!(le64(&r.payload, 16), size);
            assert!(r.fds.is_empty(), "region {idx} sent an fd");
        }
    }
    c.ping();
}

#[test]
fn region_io_fds_empty_and_bad_inputs() {
    let (_s, mut c) = setup();
    for idx in [0, 1, CONFIG_REGION] {
        let r = c
            .call(cmd::REGION_IO_FDS, &payload::region_io_fds(16, 0, idx, 0))
            .ok();
        assert_eq!(r.payload, payload::region_io_fds(16, 0, idx, 0));
        assert!(r.fds.is_empty());
    }
    for p in [
        payload::region_io_fds(8, 0, 0, 0),
        payload::region_io_fds(16, 1, 0, 0),
        payload::region_io_fds(16, 0, 0, 1),
        payload::region_io_fds(16, 0, 9, 0),
        vec![16, 0, 0, 0, 0, 0, 0, 0],
    ] {
        assert_eq!(c.call(cmd::REGION_IO_FDS, &p).err(), libc::EINVAL, "{p:?}");
        c.ping();
    }
}

// ---------------------------------------------------------------- IRQs

#[test]
fn irq_info_for_every_index() {
    let (_s, mut c) = setup();
    let want = [
        (
            IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
            1,
        ),
        (IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE, 0),
        (
            IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
            MSIX_VECTORS,
        ),
        (IRQ_INFO_EVENTFD, 1),
        (IRQ_INFO_EVENTFD, 1),
    ];
    for (idx, (flags, count)) in want.iter().enumerate() {
        let r = c.irq_info(idx as u32).ok();
        assert_eq!(r.payload.len(), 16);
        assert_eq!(le32(&r.payload, 0), 16);
        assert_eq!(le32(&r.payload, 4), *flags, "index {idx}");
        assert_eq!(le32(&r.payload, 8), idx as u32);
        assert_eq!(le32(&r.payload, 12), *count, "index {idx}");
    }
    assert_eq!(c.irq_info(5).err(), libc::EINVAL);
    c.ping();
}

#[test]
fn msix_device_dma_and_interrupt() {
    let (s, mut c) = setup();
    let (_ram, ram) = map_guest_ram(&mut c);
    let efds = msix_eventfds(&mut c);
    ring_doorbell(&mut c, 0x1234_5678).ok();
    assert_eq!(eventfd_wait(&efds[0], 5000), Some(1));
    assert_eq!(
        ram.read_u64((DMA_TARGET - GUEST_RAM_BASE) as usize),
        dma_pattern(0x1234_5678)
    );
    for e in &efds[1..] {
        assert_eq!(eventfd_wait(e, 0), None);
    }
    assert_eq!(
        s.state().dma,
        vec![(DMA_TARGET, dma_pattern(0x1234_5678), true)]
    );
    // Loopback triggers: NONE fires the range, BOOL the selected vectors.
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 1, 2, &[], &[])
        .ok();
    assert_eq!(eventfd_wait(&efds[1], 5000), Some(1));
    assert_eq!(eventfd_wait(&efds[2], 5000), Some(1));
    c.set_irqs(
        IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER,
        IRQ_MSIX,
        0,
        4,
        &[0, 0, 0, 1],
        &[],
    )
    .ok();
    assert_eq!(eventfd_wait(&efds[3], 5000), Some(1));
    for e in &efds[..3] {
        assert_eq!(eventfd_wait(e, 0), None);
    }
    c.ping();
}

#[test]
fn msix_mask_unmask_delivers_pending() {
    let (s, mut c) = setup();
    let (_ram, _m) = map_guest_ram(&mut c);
    let efds = msix_eventfds(&mut c);
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_MASK, IRQ_MSIX, 0, 1, &[], &[])
        .ok();
    ring_doorbell(&mut c, 1).ok();
    assert_eq!(eventfd_wait(&efds[0], 100), None, "masked vector fired");
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_UNMASK, IRQ_MSIX, 0, 1, &[], &[])
        .ok();
    assert_eq!(
        eventfd_wait(&efds[0], 5000),
        Some(1),
        "pending not delivered"
    );
    // Unmasking again delivers nothing more.
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_UNMASK, IRQ_MSIX, 0, 1, &[], &[])
        .ok();
    assert_eq!(eventfd_wait(&efds[0], 50), None);
    // BOOL mask of vector 0 only.
    c.set_irqs(
        IRQ_DATA_BOOL | IRQ_ACTION_MASK,
        IRQ_MSIX,
        0,
        2,
        &[1, 0],
        &[],
    )
    .ok();
    ring_doorbell(&mut c, 2).ok();
    assert_eq!(eventfd_wait(&efds[0], 100), None);
    c.set_irqs(IRQ_DATA_BOOL | IRQ_ACTION_UNMASK, IRQ_MSIX, 0, 1, &[1], &[])
        .ok();
    assert_eq!(eventfd_wait(&efds[0], 5000), Some(1));
    // The device hears of the vectors whose bool was 1, and only those.
    c.set_irqs(
        IRQ_DATA_BOOL | IRQ_ACTION_MASK,
        IRQ_MSIX,
        0,
        4,
        &[1, 0, 1, 1],
        &[],
    )
    .ok();
    let changes = s.state().mask_changes.clone();
    assert_eq!(
        changes,
        [
            (IRQ_MSIX, 0, 1, true),
            (IRQ_MSIX, 0, 1, false),
            (IRQ_MSIX, 0, 1, false),
            (IRQ_MSIX, 0, 1, true),
            (IRQ_MSIX, 0, 1, false),
            (IRQ_MSIX, 0, 1, true),
            (IRQ_MSIX, 2, 2, true),
        ]
    );
    c.ping();
}

#[test]
fn intx_automask_and_unmask() {
    let (_s, mut c) = setup();
    let e = eventfd();
    c.set_irqs(
        IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
        IRQ_INTX,
        0,
        1,
        &[],
        &[e.as_raw_fd()],
    )
    .ok();
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_INTX, 0, 1, &[], &[])
        .ok();
    assert_eq!(eventfd_wait(&e, 5000), Some(1));
    // Automasked: the second trigger stays pending until UNMASK.
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_INTX, 0, 1, &[], &[])
        .ok();
    assert_eq!(eventfd_wait(&e, 100), None);
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_UNMASK, IRQ_INTX, 0, 1, &[], &[])
        .ok();
    assert_eq!(eventfd_wait(&e, 5000), Some(1));
    c.ping();
}

/// QEMU under KVM hands INTx EOIs over as an unmask ("resample") eventfd:
/// signalling it unmasks INTx and delivers what became pending meanwhile.
#[test]
fn intx_unmask_eventfd_unmasks_and_delivers_pending() {
    let (_s, mut c) = setup();
    let trigger = eventfd();
    let unmask = eventfd();
    let intx = |c: &mut RawClient, flags: u32, fds: &[RawFd]| {
        c.set_irqs(flags, IRQ_INTX, 0, 1, &[], fds).ok();
    };
    intx(
        &mut c,
        IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
        &[trigger.as_raw_fd()],
    );
    intx(
        &mut c,
        IRQ_DATA_EVENTFD | IRQ_ACTION_UNMASK,
        &[unmask.as_raw_fd()],
    );
    intx(&mut c, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, &[]);
    assert_eq!(eventfd_wait(&trigger, 5000), Some(1));
    // Automasked: the next one waits for the EOI.
    intx(&mut c, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, &[]);
    assert_eq!(eventfd_wait(&trigger, 100), None);
    unmask.write(1).unwrap();
    assert_eq!(eventfd_wait(&trigger, 5000), Some(1));
    // The server consumed the EOI; masked again (automask), a new
    // interrupt waits for the next one.
    intx(&mut c, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, &[]);
    assert_eq!(eventfd_wait(&trigger, 100), None);
    unmask.write(1).unwrap();
    assert_eq!(eventfd_wait(&trigger, 5000), Some(1));
    // Replaced by a new unmask eventfd: the old one no longer counts.
    let unmask2 = eventfd();
    intx(
        &mut c,
        IRQ_DATA_EVENTFD | IRQ_ACTION_UNMASK,
        &[unmask2.as_raw_fd()],
    );
    intx(&mut c, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, &[]);
    unmask.write(1).unwrap();
    assert_eq!(eventfd_wait(&trigger, 200), None);
    unmask2.write(1).unwrap();
    assert_eq!(eventfd_wait(&trigger, 5000), Some(1));
    // Removed (no fd): EOIs go through UNMASK|NONE again.
    intx(&mut c, IRQ_DATA_EVENTFD | IRQ_ACTION_UNMASK, &[]);
    intx(&mut c, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, &[]);
    unmask2.write(1).unwrap();
    assert_eq!(eventfd_wait(&trigger, 200), None);
    intx(&mut c, IRQ_DATA_NONE | IRQ_ACTION_UNMASK, &[]);
    assert_eq!(eventfd_wait(&trigger, 5000), Some(1));
    c.ping();
}

#[test]
fn msix_disable_with_count_zero() {
    let (_s, mut c) = setup();
    let (_ram, _m) = map_guest_ram(&mut c);
    let efds = msix_eventfds(&mut c);
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 0, &[], &[])
        .ok();
    ring_doorbell(&mut c, 3).ok();
    assert_eq!(eventfd_wait(&efds[0], 100), None);
    // Disabling an index with no vectors (MSI) is fine too.
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSI, 0, 0, &[], &[])
        .ok();
    c.ping();
}

#[test]
fn msix_deassign_with_zero_fds() {
    let (_s, mut c) = setup();
    let (_ram, _m) = map_guest_ram(&mut c);
    let efds = msix_eventfds(&mut c);
    c.set_irqs(
        IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
        IRQ_MSIX,
        0,
        1,
        &[],
        &[],
    )
    .ok();
    ring_doorbell(&mut c, 4).ok();
    assert_eq!(eventfd_wait(&efds[0], 100), None);
    // Vector 1 kept its fd.
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 1, 1, &[], &[])
        .ok();
    assert_eq!(eventfd_wait(&efds[1], 5000), Some(1));
    // Re-assigning a fresh eventfd to vector 0 works again.
    let e = eventfd();
    c.set_irqs(
        IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
        IRQ_MSIX,
        0,
        1,
        &[],
        &[e.as_raw_fd()],
    )
    .ok();
    let _ = eventfd_wait(&e, 50); // a pending signal may be replayed
    ring_doorbell(&mut c, 5).ok();
    assert_eq!(eventfd_wait(&e, 5000).map(|v| v >= 1), Some(true));
    assert_eq!(eventfd_wait(&efds[0], 0), None);
    c.ping();
}

#[test]
fn set_irqs_bad_combinations_are_einval() {
    let (_s, mut c) = setup();
    let e1 = eventfd();
    let e2 = eventfd();
    let two = [e1.as_raw_fd(), e2.as_raw_fd()];
    let t = IRQ_ACTION_TRIGGER;
    #[allow(clippy::type_complexity)]
    let cases: Vec<(u32, u32, u32, u32, Vec<u8>, Vec<RawFd>)> = vec![
        // Two data types, two actions, no data type, no action, unknown bits.
        (
            IRQ_DATA_NONE | IRQ_DATA_BOOL | t,
            IRQ_MSIX,
            0,
            1,
            vec![1],
            vec![],
        ),
        (
            IRQ_DATA_NONE | t | IRQ_ACTION_MASK,
            IRQ_MSIX,
            0,
            1,
            vec![],
            vec![],
        ),
        (t, IRQ_MSIX, 0, 1, vec![], vec![]),
        (IRQ_DATA_NONE, IRQ_MSIX, 0, 1, vec![], vec![]),
        (IRQ_DATA_NONE | t | 0x100, IRQ_MSIX, 0, 1, vec![], vec![]),
        // Range beyond the vectors, overflow, count 0 with start/other ops.
        (IRQ_DATA_NONE | t, IRQ_MSIX, 3, 2, vec![], vec![]),
        (IRQ_DATA_NONE | t, IRQ_MSIX, u32::MAX, 2, vec![], vec![]),
        (IRQ_DATA_NONE | t, IRQ_MSIX, 1, 0, vec![], vec![]),
        (
            IRQ_DATA_NONE | IRQ_ACTION_MASK,
            IRQ_MSIX,
            0,
            0,
            vec![],
            vec![],
        ),
        (IRQ_DATA_NONE | t, IRQ_MSI, 0, 1, vec![], vec![]),
        // Wrong number of fds, fds without EVENTFD.
        (IRQ_DATA_EVENTFD | t, IRQ_MSIX, 0, 1, vec![], two.to_vec()),
        (IRQ_DATA_EVENTFD | t, IRQ_MSIX, 0, 3, vec![], two.to_vec()),
        (IRQ_DATA_NONE | t, IRQ_MSIX, 0, 1, vec![], vec![two[0]]),
        (IRQ_DATA_BOOL | t, IRQ_MSIX, 0, 1, vec![1], vec![two[0]]),
        // BOOL data shorter than count.
        (IRQ_DATA_BOOL | t, IRQ_MSIX, 0, 2, vec![1], vec![]),
        // Unmask eventfds only for INTx (automasked), one at most; no
        // mask eventfds; ERR is not maskable.
        (
            IRQ_DATA_EVENTFD | IRQ_ACTION_UNMASK,
            IRQ_MSIX,
            0,
            1,
            vec![],
            vec![two[0]],
        ),
        (
            IRQ_DATA_EVENTFD | IRQ_ACTION_UNMASK,
            IRQ_INTX,
            0,
            1,
            vec![],
            two.to_vec(),
        ),
        (
            IRQ_DATA_EVENTFD | IRQ_ACTION_MASK,
            IRQ_INTX,
            0,
            1,
            vec![],
            vec![two[0]],
        ),
        (
            IRQ_DATA_NONE | IRQ_ACTION_MASK,
            IRQ_ERR,
            0,
            1,
            vec![],
            vec![],
        ),
    ];
    for (flags, idx, start, count, data, fds) in cases {
        let r = c.set_irqs(flags, idx, start, count, &data, &fds);
        assert_eq!(
            r.err(),
            libc::EINVAL,
            "flags {flags:#x} index {idx} start {start} count {count}"
        );
        c.ping();
    }
    // argsz below the fixed struct.
    let mut p = payload::set_irqs(IRQ_DATA_NONE | t, IRQ_MSIX, 0, 1, &[]);
    p[0] = 8;
    assert_eq!(c.call(cmd::SET_IRQS, &p).err(), libc::EINVAL);
    c.ping();
}

/// An interrupt fd that is not an eventfd (a regular file, say on a FUSE
/// mount whose daemon never answers) could block the loop on every
/// interrupt: refused, and nothing of the message is taken.
#[test]
fn interrupt_fds_that_are_not_eventfds_are_einval() {
    let (_s, mut c) = setup();
    let e = eventfd();
    let file = memfd("not-an-eventfd", 4096);
    let r = c.set_irqs(
        IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
        IRQ_MSIX,
        0,
        2,
        &[],
        &[e.as_raw_fd(), file.as_raw_fd()],
    );
    assert_eq!(r.err(), libc::EINVAL);
    // Vector 0 did not get the eventfd either.
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[], &[])
        .ok();
    assert_eq!(eventfd_wait(&e, 100), None);
    let r = c.set_irqs(
        IRQ_DATA_EVENTFD | IRQ_ACTION_UNMASK,
        IRQ_INTX,
        0,
        1,
        &[],
        &[file.as_raw_fd()],
    );
    assert_eq!(r.err(), libc::EINVAL);
    // Eventfds are taken (and get the interrupt left pending above).
    c.set_irqs(
        IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
        IRQ_MSIX,
        0,
        1,
        &[],
        &[e.as_raw_fd()],
    )
    .ok();
    assert_eq!(eventfd_wait(&e, 5000), Some(1));
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[], &[])
        .ok();
    assert_eq!(eventfd_wait(&e, 5000), Some(1));
}

#[test]
fn sixteen_eventfds_in_one_message_are_accepted() {
    // Cloud Hypervisor sends up to 16 fds per SET_IRQS; we only have 4
    // MSI-X vectors, so 16 fds for count 16 is a range error, not a
    // transport error: the connection survives either way.
    let (_s, mut c) = setup();
    let efds: Vec<_> = (0..16).map(|_| eventfd()).collect();
    let raw: Vec<RawFd> = efds.iter().map(|e| e.as_raw_fd()).collect();
    let r = c.set_irqs(
        IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
        IRQ_MSIX,
        0,
        16,
        &[],
        &raw,
    );
    assert_eq!(r.err(), libc::EINVAL);
    c.ping();
}

// ---------------------------------------------------------------- fds

#[test]
fn fds_on_a_command_without_fds_are_einval() {
    let (_s, mut c) = setup();
    let e = eventfd();
    let r = c.call_fds(cmd::GET_INFO, &payload::get_info(16), &[e.as_raw_fd()]);
    assert_eq!(r.err(), libc::EINVAL);
    c.ping();
    let r = c.call_fds(
        cmd::REGION_WRITE,
        &payload::region_access(0, 0, 1, &[9]),
        &[e.as_raw_fd()],
    );
    assert_eq!(r.err(), libc::EINVAL);
    assert_eq!(c.read_ok(0, 0, 1), vec![0], "write with fds must not apply");
    c.ping();
}

#[test]
fn too_many_fds_are_einval() {
    let (_s, mut c) = setup();
    let e = eventfd();
    let fds = vec![e.as_raw_fd(); 70];
    let r = c.set_irqs(
        IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
        IRQ_MSIX,
        0,
        70,
        &[],
        &fds,
    );
    assert_eq!(r.err(), libc::EINVAL);
    c.ping();
    // The eventfd was not installed for any vector.
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 4, &[], &[])
        .ok();
    assert_eq!(eventfd_wait(&e, 50), None);
}

#[test]
fn dma_map_with_two_fds_is_einval() {
    let (_s, mut c) = setup();
    let a = memfd("a", 0x1000);
    let b = memfd("b", 0x1000);
    let r = c.call_fds(
        cmd::DMA_MAP,
        &payload::dma_map(32, DMA_READ | DMA_WRITE, 0, GUEST_RAM_BASE, 0x1000),
        &[a.as_raw_fd(), b.as_raw_fd()],
    );
    assert_eq!(r.err(), libc::EINVAL);
    c.ping();
    // Nothing was mapped.
    assert_eq!(c.dma_unmap(0, GUEST_RAM_BASE, 0x1000).err(), libc::ENOENT);
}

// ---------------------------------------------------------------- DMA

#[test]
fn dma_map_overlap_is_eexist() {
    let (_s, mut c) = setup();
    let ram = memfd("ram", 0x4000);
    c.dma_map(0, 0x10000, 0x2000, Some(ram.as_raw_fd())).ok();
    for (addr, size) in [
        (0x11000u64, 0x2000u64),
        (0xf000, 0x2000),
        (0x10000, 0x1000),
        (0xf000, 0x4000),
    ] {
        let e = c.dma_map(0, addr, size, Some(ram.as_raw_fd())).err();
        assert_eq!(e, libc::EEXIST, "{addr:#x}+{size:#x}");
        c.ping();
    }
    // Adjacent maps are fine.
    c.dma_map(0x2000, 0x12000, 0x1000, Some(ram.as_raw_fd()))
        .ok();
    c.dma_map(0x3000, 0xf000, 0x1000, Some(ram.as_raw_fd()))
        .ok();
    // fd-less maps are recorded too.
    c.dma_map(0, 0x100000, 0x1000, None).ok();
    assert_eq!(c.dma_map(0, 0x100000, 0x2000, None).err(), libc::EEXIST);
    c.ping();
}

#[test]
fn dma_map_invalid_requests() {
    let (_s, mut c) = setup();
    let ram = memfd("ram", 0x2000);
    let fd = ram.as_raw_fd();
    // Beyond the end of the memfd.
    assert_eq!(c.dma_map(0, 0x10000, 0x4000, Some(fd)).err(), libc::EINVAL);
    assert_eq!(
        c.dma_map(0x1000, 0x10000, 0x2000, Some(fd)).err(),
        libc::EINVAL
    );
    // Zero size, address overflow.
    assert_eq!(c.dma_map(0, 0x10000, 0, Some(fd)).err(), libc::EINVAL);
    assert_eq!(
        c.dma_map(0, u64::MAX - 0xfff, 0x2000, Some(fd)).err(),
        libc::EINVAL
    );
    // Unknown flag bits.
    let r = c.call_fds(
        cmd::DMA_MAP,
        &payload::dma_map(32, 0x100 | DMA_READ, 0, 0x10000, 0x1000),
        &[fd],
    );
    assert_eq!(r.err(), libc::EINVAL);
    // An fd that is not a regular file (an eventfd).
    let e = eventfd();
    assert_eq!(
        c.dma_map(0, 0x10000, 0x1000, Some(e.as_raw_fd())).err(),
        libc::EINVAL
    );
    c.ping();
    // The range is still free.
    c.dma_map(0, 0x10000, 0x2000, Some(fd)).ok();
}

#[test]
fn dma_unmap_exact_match_echo_and_unknown_range() {
    let (s, mut c) = setup();
    let ram = memfd("ram", 0x4000);
    c.dma_map(0, 0x10000, 0x4000, Some(ram.as_raw_fd())).ok();
    // Partial or unknown ranges.
    for (addr, size) in [
        (0x10000u64, 0x1000u64),
        (0x11000, 0x3000),
        (0x20000, 0x1000),
        (0x10000, 0x8000),
    ] {
        assert_eq!(c.dma_unmap(0, addr, size).err(), libc::ENOENT);
        c.ping();
    }
    assert!(s.state().unmapping.is_empty());
    let r = c.dma_unmap(0, 0x10000, 0x4000).ok();
    assert_eq!(r.payload, payload::dma_unmap(24, 0, 0x10000, 0x4000));
    assert_eq!(s.state().unmapping, vec![(0x10000, 0x4000)]);
    // Gone now.
    assert_eq!(c.dma_unmap(0, 0x10000, 0x4000).err(), libc::ENOENT);
    // Unknown flags, dirty bitmap flag.
    c.dma_map(0, 0x10000, 0x4000, Some(ram.as_raw_fd())).ok();
    assert_eq!(c.dma_unmap(0x4, 0x10000, 0x4000).err(), libc::EINVAL);
    assert_eq!(c.dma_unmap(0x1, 0x10000, 0x4000).err(), libc::EINVAL);
    c.ping();
}

#[test]
fn dma_unmap_all() {
    let (s, mut c) = setup();
    let (_ram, _m) = map_guest_ram(&mut c);
    let other = memfd("other", 0x1000);
    c.dma_map(0, 0x40000, 0x1000, Some(other.as_raw_fd())).ok();
    c.dma_map(0, 0x80000, 0x1000, None).ok();
    // ALL with an address or size is invalid.
    assert_eq!(c.dma_unmap(UNMAP_ALL, 0x40000, 0).err(), libc::EINVAL);
    assert_eq!(c.dma_unmap(UNMAP_ALL, 0, 0x1000).err(), libc::EINVAL);
    let r = c.dma_unmap(UNMAP_ALL, 0, 0).ok();
    assert_eq!(r.payload, payload::dma_unmap(24, UNMAP_ALL, 0, 0));
    let mut seen = s.state().unmapping.clone();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (0x40000, 0x1000),
            (0x80000, 0x1000),
            (GUEST_RAM_BASE, GUEST_RAM_SIZE)
        ]
    );
    // Device DMA now fails; every range can be mapped again.
    assert_eq!(ring_doorbell(&mut c, 1).err(), libc::EFAULT);
    c.dma_map(0, 0x40000, 0x1000, Some(other.as_raw_fd())).ok();
    c.dma_map(0, 0x80000, 0x1000, None).ok();
    // UNMAP_ALL with nothing mapped succeeds.
    c.dma_unmap(UNMAP_ALL, 0, 0).ok();
    c.dma_unmap(UNMAP_ALL, 0, 0).ok();
    c.ping();
}

#[test]
fn device_dma_outside_guest_memory_then_after_mapping() {
    let (s, mut c) = setup();
    // Nothing mapped: the device's own errno comes back.
    assert_eq!(ring_doorbell(&mut c, 7).err(), libc::EFAULT);
    c.ping();
    // Mapped, but not at DMA_TARGET.
    let other = memfd("other", 0x1000);
    c.dma_map(0, 0x40000, 0x1000, Some(other.as_raw_fd())).ok();
    assert_eq!(ring_doorbell(&mut c, 8).err(), libc::EFAULT);
    // fd-less maps are not reachable by the device.
    c.dma_map(0, GUEST_RAM_BASE, GUEST_RAM_SIZE, None).ok();
    assert_eq!(ring_doorbell(&mut c, 9).err(), libc::EFAULT);
    c.dma_unmap(0, GUEST_RAM_BASE, GUEST_RAM_SIZE).ok();
    // Straddling the end of a map.
    let small = memfd("small", 0x1000);
    c.dma_map(
        0,
        GUEST_RAM_BASE,
        DMA_TARGET - GUEST_RAM_BASE + 4,
        Some(small.as_raw_fd()),
    )
    .ok();
    assert_eq!(ring_doorbell(&mut c, 10).err(), libc::EFAULT);
    c.dma_unmap(0, GUEST_RAM_BASE, DMA_TARGET - GUEST_RAM_BASE + 4)
        .ok();
    c.ping();
    let (_ram, m) = map_guest_ram(&mut c);
    ring_doorbell(&mut c, 11).ok();
    assert_eq!(
        m.read_u64((DMA_TARGET - GUEST_RAM_BASE) as usize),
        dma_pattern(11)
    );
    let dma = s.state().dma.clone();
    assert_eq!(dma.iter().filter(|d| !d.2).count(), 4);
    assert!(dma.last().unwrap().2);
}

// ---------------------------------------------------------------- reset, migration

#[test]
fn device_reset() {
    let (s, mut c) = setup();
    let (_ram, _m) = map_guest_ram(&mut c);
    let efds = msix_eventfds(&mut c);
    c.write_ok(0, 0, &[1, 2, 3, 4]);
    let r = c.reset().ok();
    assert_eq!(r.msg_size, 16);
    assert_eq!(s.state().resets, vec![ResetReason::Command]);
    assert_eq!(c.read_ok(0, 0, 4), vec![0; 4], "device back to power-on");
    // DMA maps and IRQ fds survive a reset.
    ring_doorbell(&mut c, 11).ok();
    assert_eq!(eventfd_wait(&efds[0], 5000), Some(1));
    // With a payload.
    assert_eq!(c.call(cmd::RESET, &[0; 4]).err(), libc::EINVAL);
    assert_eq!(s.state().resets.len(), 1);
    c.ping();
}

#[test]
fn device_feature_on_non_migratable_device_is_enotsup() {
    let (_s, mut c) = setup();
    for flags in [
        FEATURE_GET | FEATURE_MIGRATION,
        FEATURE_PROBE | FEATURE_GET | FEATURE_MIGRATION,
        FEATURE_GET | FEATURE_MIG_DEVICE_STATE,
    ] {
        let r = c.call(
            cmd::DEVICE_FEATURE,
            &payload::device_feature(16, flags, &[0; 8]),
        );
        assert_eq!(r.err(), libc::ENOTSUP, "flags {flags:#x}");
        c.ping();
    }
    let r = c.call(
        cmd::DEVICE_FEATURE,
        &payload::device_feature(
            16,
            FEATURE_SET | FEATURE_MIG_DEVICE_STATE,
            &client::Enc::new().u32(1).u32(0).done(),
        ),
    );
    assert_eq!(r.err(), libc::ENOTSUP);
    // Malformed requests are EINVAL.
    assert_eq!(c.call(cmd::DEVICE_FEATURE, &[8, 0, 0]).err(), libc::EINVAL);
    c.ping();
}

#[test]
fn mig_data_in_running_is_einval() {
    let (_s, mut c) = setup();
    let r = c.call(cmd::MIG_DATA_READ, &payload::mig_data(8 + 64, 64, &[]));
    assert_eq!(r.err(), libc::EINVAL);
    c.ping();
    let r = c.call(
        cmd::MIG_DATA_WRITE,
        &payload::mig_data(8 + 4, 4, &[1, 2, 3, 4]),
    );
    assert_eq!(r.err(), libc::EINVAL);
    c.ping();
}

#[test]
fn message_ids_are_echoed_even_when_repeated() {
    let (_s, mut c) = setup();
    for id in [0u16, 0, 0xffff, 0xffff, 7] {
        let mut m = header(id, cmd::GET_INFO, 32, 0, 0);
        m.extend_from_slice(&payload::get_info(16));
        c.send_bytes(&m, &[]).unwrap();
        c.recv_reply(id, cmd::GET_INFO).ok();
    }
}

/// Stalls the server's loop for `ms` with a posted write, so that what is
/// sent next is queued in the socket and read in one go.
fn stall_server(c: &mut RawClient, ms: u32) {
    c.send(
        cmd::REGION_WRITE,
        hflags::NO_REPLY,
        &payload::region_access(0, STALL_REGISTER, 4, &ms.to_le_bytes()),
        &[],
    );
}

#[test]
fn pipelined_messages_keep_their_fds() {
    // A plain command followed by one carrying an fd, both queued before
    // the server reads: Linux hands both to one recvmsg together with the
    // second message's fd. The fd must go to the second message.
    let (s, mut c) = setup();
    let ram = memfd("ram", GUEST_RAM_SIZE);
    stall_server(&mut c, 150);
    let a = c.send(cmd::GET_INFO, 0, &payload::get_info(16), &[]);
    let b = c.send(
        cmd::DMA_MAP,
        0,
        &payload::dma_map(32, DMA_READ | DMA_WRITE, 0, GUEST_RAM_BASE, GUEST_RAM_SIZE),
        &[ram.as_raw_fd()],
    );
    let e = eventfd();
    let d = c.send(
        cmd::REGION_READ,
        0,
        &payload::region_access(0, 0, 4, &[]),
        &[],
    );
    let f = c.send(
        cmd::SET_IRQS,
        0,
        &payload::set_irqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[]),
        &[e.as_raw_fd()],
    );
    c.recv_reply(a, cmd::GET_INFO).ok();
    c.recv_reply(b, cmd::DMA_MAP).ok();
    c.recv_reply(d, cmd::REGION_READ).ok();
    c.recv_reply(f, cmd::SET_IRQS).ok();
    // The map is fd-backed (the device can reach it) and the eventfd is
    // installed.
    let m = Mapping::new(ram.as_raw_fd(), GUEST_RAM_SIZE as usize, 0).unwrap();
    ring_doorbell(&mut c, 0x55).ok();
    assert_eq!(
        m.read_u64((DMA_TARGET - GUEST_RAM_BASE) as usize),
        dma_pattern(0x55)
    );
    assert_eq!(eventfd_wait(&e, 5000), Some(1));
    assert!(s.state().dma.iter().all(|d| d.2));
}

#[test]
fn region_info_argsz_between_fixed_and_needed() {
    let (_s, mut c) = setup();
    for argsz in [33, 48, 79] {
        let r = c.region_info(1, argsz).ok();
        assert_eq!(r.payload.len(), 32, "argsz {argsz}");
        assert_eq!(le32(&r.payload, 0), 80);
        assert_eq!(le32(&r.payload, 4) & (REGION_MMAP | REGION_CAPS), 0);
        assert!(r.fds.is_empty());
    }
    c.ping();
}

#[test]
fn dma_map_unaligned_file_offset_is_einval() {
    let (_s, mut c) = setup();
    let ram = memfd("ram", 0x3000);
    assert_eq!(
        c.dma_map(0x10, 0x10000, 0x1000, Some(ram.as_raw_fd()))
            .err(),
        libc::EINVAL
    );
    c.ping();
    // A page-aligned offset works and really maps that part of the file.
    c.dma_map(0x1000, GUEST_RAM_BASE, 0x1000, Some(ram.as_raw_fd()))
        .ok();
    c.region_write(0, DMA_DOORBELL, &6u32.to_le_bytes()).ok();
    let m = Mapping::new(ram.as_raw_fd(), 0x3000, 0).unwrap();
    assert_eq!(
        m.read_u64(0x1000 + (DMA_TARGET - GUEST_RAM_BASE) as usize),
        dma_pattern(6)
    );
}

#[test]
fn err_and_req_indices_take_one_eventfd() {
    let (_s, mut c) = setup();
    for idx in [IRQ_ERR, IRQ_REQ] {
        let e = eventfd();
        c.set_irqs(
            IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
            idx,
            0,
            1,
            &[],
            &[e.as_raw_fd()],
        )
        .ok();
        c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, idx, 0, 1, &[], &[])
            .ok();
        assert_eq!(eventfd_wait(&e, 5000), Some(1));
        assert_eq!(
            c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, idx, 0, 2, &[], &[])
                .err(),
            libc::EINVAL
        );
        c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, idx, 0, 0, &[], &[])
            .ok();
    }
    c.ping();
}

#[test]
fn configured_limits_are_advertised_and_enforced() {
    let mut config = vfio_user_server::ServerConfig {
        max_data_xfer_size: 8192,
        write_multiple: false,
        ..Default::default()
    };
    config.dma_limits.max_maps = 2;
    let s = spawn_test_servers(1, config);
    let mut c = RawClient::connect(s.path()).unwrap();
    let r = c
        .version_raw(&payload::version(0, 2, Some("{}"), true))
        .ok();
    let v = caps_of(&r);
    assert_eq!(v["capabilities"]["max_data_xfer_size"], 8192);
    assert_eq!(v["capabilities"]["max_dma_maps"], 2);
    assert_ne!(v["capabilities"]["write_multiple"], true);
    // Transfers above the limit.
    assert_eq!(c.region_read(1, 0, 8193).err(), libc::EINVAL);
    assert_eq!(c.read_ok(1, 0, 8192).len(), 8192);
    let id = c.send(
        cmd::REGION_WRITE,
        0,
        &payload::region_access(1, 0, 8193, &[0; 8193]),
        &[],
    );
    assert_eq!(c.recv_reply(id, cmd::REGION_WRITE).err(), libc::E2BIG);
    c.ping();
    // WRITE_MULTI is off.
    let r = c.call(cmd::WRITE_MULTI, &payload::write_multi(&[(0, 0, &[1])]));
    assert_eq!(r.err(), libc::ENOSYS);
    assert_eq!(c.read_ok(0, 0, 1), vec![0]);
    // The third map is over the limit.
    c.dma_map(0, 0x10000, 0x1000, None).ok();
    c.dma_map(0, 0x20000, 0x1000, None).ok();
    assert_eq!(c.dma_map(0, 0x30000, 0x1000, None).err(), libc::ENOSPC);
    c.dma_unmap(0, 0x10000, 0x1000).ok();
    c.dma_map(0, 0x30000, 0x1000, None).ok();
    c.ping();
}

#[test]
fn twin_socket_request_is_not_granted() {
    let s = spawn_server();
    let mut c = RawClient::connect(s.path()).unwrap();
    let json = r#"{"capabilities":{"twin_socket":{"supported":true},"max_msg_fds":16}}"#;
    let r = c
        .version_raw(&payload::version(0, 2, Some(json), true))
        .ok();
    assert!(r.fds.is_empty());
    let v = caps_of(&r);
    let twin = &v["capabilities"]["twin_socket"];
    assert!(twin.is_null() || twin["supported"] == false, "{v}");
    c.ping();
}

#[test]
fn fd_message_split_across_writes() {
    // The fd rides on the first 10 header bytes; the rest comes later.
    let (_s, mut c) = setup();
    let ram = memfd("ram", GUEST_RAM_SIZE);
    let id = c.next_id();
    let mut m = header(id, cmd::DMA_MAP, 48, 0, 0);
    m.extend_from_slice(&payload::dma_map(
        32,
        DMA_READ | DMA_WRITE,
        0,
        GUEST_RAM_BASE,
        GUEST_RAM_SIZE,
    ));
    c.send_bytes(&m[..10], &[ram.as_raw_fd()]).unwrap();
    c.expect_no_reply_within(30);
    c.send_bytes(&m[10..20], &[]).unwrap();
    c.expect_no_reply_within(30);
    c.send_bytes(&m[20..], &[]).unwrap();
    c.recv_reply(id, cmd::DMA_MAP).ok();
    c.region_write(0, DMA_DOORBELL, &12u32.to_le_bytes()).ok();
    let mm = Mapping::new(ram.as_raw_fd(), GUEST_RAM_SIZE as usize, 0).unwrap();
    assert_eq!(
        mm.read_u64((DMA_TARGET - GUEST_RAM_BASE) as usize),
        dma_pattern(12)
    );
}
