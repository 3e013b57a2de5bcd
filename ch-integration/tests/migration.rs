//! vfio-user migration v2 against the daemon, with the test acting as the
//! VMM over the raw client: a live move of a busy virtio-blk device from
//! one daemon to another, dirty page logging, and every refusal of bad
//! migration input. See docs/migration.md.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::mig::*;
use common::*;
use integration_tests::proto::cmd;
use integration_tests::{le32, le64};
use vmm_sys_util::tempdir::TempDir;

const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;
const INDIRECT: u64 = 1 << 28;
const BLK_FLUSH: u64 = 1 << 9;
const BLK_MQ: u64 = 1 << 12;
const BLK_WANT: u64 = VERSION_1 | INDIRECT | BLK_FLUSH | BLK_MQ | (1 << 1) | (1 << 2) | (1 << 6);

const IMAGE_SIZE: u64 = 8 << 20;
const PAGE: u64 = 4096;
const BLOCK: usize = 4096;

/// A raw image with a known pattern in `dir`.
fn image(dir: &TempDir) -> PathBuf {
    let path = dir.as_path().join("disk.img");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&pattern(7, IMAGE_SIZE as usize)).unwrap();
    path
}

/// The 4 KiB block request `n` writes: unique per request.
fn block_data(n: usize) -> Vec<u8> {
    let mut d = pattern((n as u8).wrapping_mul(13).wrapping_add(1), BLOCK);
    d[..8].copy_from_slice(&(n as u64 | 0xb10c_0000_0000_0000).to_le_bytes());
    d
}

/// Guest pages the device writes when it completes used-ring slots
/// `slots` of queue `q`: the elements, `used.idx`, and `avail_event`
/// (EVENT_IDX) or `used.flags` (no EVENT_IDX, written when the device
/// toggles notifications).
fn used_ring_pages<T: Transport>(
    drv: &VirtioDriver<T>,
    q: usize,
    slots: std::ops::Range<u16>,
) -> BTreeSet<u64> {
    let vq = &drv.queues[q];
    let mut out = pages_of(GUEST_BASE, PAGE, vq.used + 2, 2);
    for s in slots {
        out.extend(pages_of(
            GUEST_BASE,
            PAGE,
            vq.used + 4 + 8 * (s % vq.size) as u64,
            8,
        ));
    }
    if drv.features & EVENT_IDX != 0 {
        out.extend(pages_of(
            GUEST_BASE,
            PAGE,
            vq.used + 4 + 8 * vq.size as u64,
            2,
        ));
    } else {
        out.extend(pages_of(GUEST_BASE, PAGE, vq.used, 2));
    }
    out
}

/// Every page of the driver's own structures of queue `q` (descriptor
/// table and available ring): the device only reads them.
fn driver_ring_pages<T: Transport>(drv: &VirtioDriver<T>, q: usize) -> BTreeSet<u64> {
    let vq = &drv.queues[q];
    let n = vq.size as u64;
    let mut out = pages_of(GUEST_BASE, PAGE, vq.desc, 16 * n);
    out.extend(pages_of(GUEST_BASE, PAGE, vq.avail, 6 + 2 * n));
    out
}

/// One write request on the ledger.
struct WriteReq {
    queue: usize,
    sector: u64,
    data: Vec<u8>,
    status: u64,
    completions: u32,
}

/// What the VMM knows about the requests it put on the rings, to check
/// that each completes exactly once wherever it completes.
#[derive(Default)]
struct Ledger {
    reqs: Vec<WriteReq>,
    in_flight: HashMap<(usize, u16), usize>,
}

impl Ledger {
    /// Queues (without kicking) a 4 KiB write of [`block_data`] to block n.
    fn submit<T: Transport>(&mut self, drv: &mut VirtioDriver<T>, q: usize) -> usize {
        let n = self.reqs.len();
        let sector = (n * BLOCK / 512) as u64;
        let data = block_data(n);
        let r = drv.blk_submit_req(q, VIRTIO_BLK_T_OUT, sector, &data, 0);
        assert!(
            self.in_flight.insert((q, r.head), n).is_none(),
            "head {} of queue {q} reused while in flight",
            r.head
        );
        self.reqs.push(WriteReq {
            queue: q,
            sector,
            data,
            status: r.status,
            completions: 0,
        });
        n
    }

    /// Collects what the device completed on queue `q` so far.
    fn reap<T: Transport>(&mut self, drv: &mut VirtioDriver<T>, q: usize) -> usize {
        let used = drv.poll_used(q);
        self.account(drv, q, &used);
        used.len()
    }

    fn account<T: Transport>(&mut self, drv: &mut VirtioDriver<T>, q: usize, used: &[(u16, u32)]) {
        for &(head, _len) in used {
            let n = self.in_flight.remove(&(q, head)).unwrap_or_else(|| {
                panic!(
                    "completion of head {head} on queue {q}, which is not in flight (a duplicate?)"
                )
            });
            let (status, _) = drv.take_result(q, head);
            assert_eq!(status, VIRTIO_BLK_S_OK, "request {n}");
            self.reqs[n].completions += 1;
        }
    }

    /// Waits until nothing is in flight.
    fn reap_all<T: Transport>(&mut self, drv: &mut VirtioDriver<T>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.in_flight.is_empty() {
            assert!(Instant::now() < deadline, "requests never completed");
            let q = self.in_flight.keys().next().unwrap().0;
            let used = drv.wait_used(q, 1);
            self.account(drv, q, &used);
        }
    }

    fn in_flight_on(&self, q: usize) -> usize {
        self.in_flight.keys().filter(|k| k.0 == q).count()
    }
}

#[test]
fn migrate_busy_blk_between_daemons() {
    migrate_busy_blk_between_daemons_with(&[]);
}

/// [`migrate_busy_blk_between_daemons`] with requests on I/O threads (pausing must complete them).
#[test]
fn migrate_busy_blk_between_daemons_on_io_threads() {
    migrate_busy_blk_between_daemons_with(&["--io-threads", "2"]);
}

/// [`migrate_busy_blk_between_daemons`] with requests on the event loop (`--aio sync`; the default
/// is io_uring where the kernel has it).
#[test]
fn migrate_busy_blk_between_daemons_on_the_event_loop() {
    migrate_busy_blk_between_daemons_with(&["--aio", "sync"]);
}

fn migrate_busy_blk_between_daemons_with(extra: &[&str]) {
    let dir = TempDir::new().unwrap();
    let img = image(&dir);
    let img_s = img.to_str().unwrap();
    let mut opts = vec!["--disk", img_s, "--num-queues", "2", "--queue-size", "128"];
    opts.extend_from_slice(extra);
    let mut src = Daemon::start_in(dir, &opts);
    // The destination serves the SAME image (shared storage).
    let mut dst = Daemon::start(&opts);

    let mut drv = VirtioDriver::connect_raw(&src.socket);
    let f = drv.init(BLK_WANT | EVENT_IDX, 128);
    assert!(f & BLK_MQ != 0 && f & EVENT_IDX != 0);
    assert_eq!(drv.queues.len(), 2);
    let mut io = Ledger::default();

    // A: plain I/O on the source, completed and collected.
    for i in 0..12 {
        io.submit(&mut drv, i % 2);
    }
    drv.kick(0);
    drv.kick(1);
    io.reap_all(&mut drv);

    // Dirty logging on, then PRE_COPY: the device keeps running.
    logging_start(drv.raw(), PAGE, &[(GUEST_BASE, GUEST_SIZE)]).ok();
    assert_eq!(get_state(drv.raw()), RUNNING);
    set_state_ok(drv.raw(), PRE_COPY);
    let precopy = read_stream(drv.raw(), 4096);
    // Nothing is worth sending while the device runs: its whole state is
    // in the STOP_COPY stream.
    assert!(precopy.is_empty(), "{} PRE_COPY bytes", precopy.len());

    // B: I/O during PRE_COPY, kicked and completed but not collected at
    // the switch.
    let used_before = [drv.used_idx(0), drv.used_idx(1)];
    let b: Vec<usize> = (0..6).map(|i| io.submit(&mut drv, (i / 4) % 2)).collect();
    drv.kick(0);
    drv.kick(1);
    drv.wait_used_idx(0, drv.queues[0].next_avail);
    drv.wait_used_idx(1, drv.queues[1].next_avail);

    // The dirty log shows exactly what the device wrote: used-ring pages
    // and the status bytes of B, nothing of what the driver wrote. (The
    // device re-enables doorbells, writing the available event, in the
    // deferred round after the one that emptied the ring: `settle` lets
    // it run.)
    drv.settle();
    let dirty = report(drv.raw(), GUEST_BASE, GUEST_SIZE, PAGE);
    let mut expected = used_ring_pages(&drv, 0, used_before[0]..drv.used_idx(0));
    expected.extend(used_ring_pages(&drv, 1, used_before[1]..drv.used_idx(1)));
    for &n in &b {
        expected.extend(pages_of(GUEST_BASE, PAGE, io.reqs[n].status, 1));
    }
    for q in 0..2 {
        let used_page = pages_of(GUEST_BASE, PAGE, drv.queues[q].used + 2, 2);
        assert!(
            dirty.is_superset(&used_page),
            "used ring of queue {q} not dirty"
        );
        assert!(
            dirty.is_disjoint(&driver_ring_pages(&drv, q)),
            "driver-written ring pages reported dirty"
        );
    }
    assert_eq!(dirty, expected);

    // C: submitted but not kicked.
    for i in 0..5 {
        io.submit(&mut drv, usize::from(i >= 3));
    }

    // STOP_COPY: the device stops; the stream is read in small pieces.
    set_state_ok(drv.raw(), STOP_COPY);
    let stop_copy = read_stream(drv.raw(), 512);
    assert!(stop_copy.len() > 512, "stream of {} bytes", stop_copy.len());
    let s = stream::decode(&stop_copy);
    assert_eq!(s.kind, "virtio-blk");
    let state = s.state();
    assert_eq!(state["queues"][0]["next_avail"], 10);
    assert_eq!(state["queues"][0]["next_used"], 10);
    assert_eq!(state["queues"][1]["next_avail"], 8);
    assert_eq!(state["queues"][0]["desc_table"], drv.queues[0].desc);
    assert_eq!(state["queues"][1]["used_ring"], drv.queues[1].used);
    // Nothing more once the stream is drained.
    assert!(read_chunk(drv.raw(), 64).is_empty());

    // D: submitted and kicked while the source is stopped: the doorbell is
    // accepted but the stopped device does not touch the rings.
    for _ in 0..2 {
        io.submit(&mut drv, 0);
    }
    let used_at_stop = [drv.used_idx(0), drv.used_idx(1)];
    drv.kick(0);
    drv.settle();
    assert_eq!(
        [drv.used_idx(0), drv.used_idx(1)],
        used_at_stop,
        "a stopped device completed requests"
    );
    assert!(
        report(drv.raw(), GUEST_BASE, GUEST_SIZE, PAGE).is_empty(),
        "a stopped device dirtied memory"
    );
    set_state_ok(drv.raw(), STOP);
    logging_stop(drv.raw()).ok();

    // The destination: VERSION, DMA_MAP of the same memfd, SET_IRQS with
    // the same eventfds, RESUMING, the stream, STOP, RUNNING.
    let mut dst_client = RawClient::connect_negotiated(&dst.socket);
    drv.attach_to(&mut dst_client);
    assert_eq!(get_state(&mut dst_client), RUNNING);
    set_state_ok(&mut dst_client, RESUMING);
    let whole: Vec<u8> = [precopy, stop_copy].concat();
    write_stream(&mut dst_client, &whole, 1000);
    set_state_ok(&mut dst_client, STOP);
    set_state_ok(&mut dst_client, RUNNING);
    // Resuming picked up C and D without a doorbell.
    drv.wait_used_idx(0, drv.queues[0].next_avail);
    drv.wait_used_idx(1, drv.queues[1].next_avail);

    // The source goes away; the same driver continues on the destination.
    let old = drv.replace_transport(dst_client);
    drop(old);
    assert_eq!(io.in_flight_on(0), 4 + 3 + 2);
    assert_eq!(io.in_flight_on(1), 2 + 2);
    io.reap(&mut drv, 0);
    io.reap(&mut drv, 1);
    assert!(io.in_flight.is_empty(), "{:?}", io.in_flight);

    // E: more I/O on the destination, then every block read back.
    let e: Vec<usize> = (0..8).map(|i| io.submit(&mut drv, i % 2)).collect();
    drv.kick(0);
    drv.kick(1);
    io.reap_all(&mut drv);
    assert_eq!(e.len(), 8);
    for (n, r) in io.reqs.iter().enumerate() {
        assert_eq!(
            r.completions, 1,
            "request {n} completed {} times",
            r.completions
        );
        assert_eq!(drv.ram.read(r.status, 1)[0], VIRTIO_BLK_S_OK);
        let (st, data) = drv.blk_request(r.queue, VIRTIO_BLK_T_IN, r.sector, &[], BLOCK as u32);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(data == r.data, "block of request {n} reads back wrong");
        assert!(
            read_image(&img, r.sector * 512, BLOCK) == r.data,
            "image lacks the write of request {n}"
        );
    }
    // Untouched blocks still hold the original pattern.
    let n = io.reqs.len();
    let original = pattern(7, IMAGE_SIZE as usize);
    let (st, data) = drv.blk_request(1, VIRTIO_BLK_T_IN, (n * BLOCK / 512) as u64, &[], 8192);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(data[..] == original[n * BLOCK..n * BLOCK + 8192]);

    // Nobody completes anything more: not the source, not the destination.
    std::thread::sleep(Duration::from_millis(200));
    for q in 0..2 {
        assert_eq!(drv.used_idx(q), drv.queues[q].next_avail);
        assert_eq!(drv.used_idx(q), drv.queues[q].last_used);
    }
    assert!(src.child.try_wait().unwrap().is_none(), "source died");
    assert!(dst.child.try_wait().unwrap().is_none(), "destination died");
    src.kill();
    dst.kill();
}

#[test]
fn dirty_bitmap_reports_exactly_device_writes() {
    dirty_bitmap_reports_exactly_device_writes_with(&[]);
}

/// [`dirty_bitmap_reports_exactly_device_writes`] with reads and writes on I/O threads.
#[test]
fn dirty_bitmap_reports_exactly_device_writes_on_io_threads() {
    dirty_bitmap_reports_exactly_device_writes_with(&["--io-threads", "2"]);
}

/// [`dirty_bitmap_reports_exactly_device_writes`] with requests on the event loop (`--aio sync`; the default
/// is io_uring where the kernel has it).
#[test]
fn dirty_bitmap_reports_exactly_device_writes_on_the_event_loop() {
    dirty_bitmap_reports_exactly_device_writes_with(&["--aio", "sync"]);
}

fn dirty_bitmap_reports_exactly_device_writes_with(extra: &[&str]) {
    let dir = TempDir::new().unwrap();
    let img = image(&dir);
    // 512 entries: the used ring spans two pages (avail_event on the 2nd).
    let daemon = Daemon::start_in(
        dir,
        &[
            &["--disk", img.to_str().unwrap(), "--queue-size", "512"],
            extra,
        ]
        .concat(),
    );
    let mut drv = VirtioDriver::connect_raw(&daemon.socket);
    let f = drv.init(BLK_WANT | EVENT_IDX, 512);
    assert!(f & EVENT_IDX != 0);
    let vq_used = drv.queues[0].used;
    assert_ne!(
        (vq_used + 2) / PAGE,
        (vq_used + 4 + 8 * 512) / PAGE,
        "test bug: used ring should span two pages"
    );
    // Device writes before logging starts are not reported.
    assert_eq!(
        drv.blk_request(0, VIRTIO_BLK_T_IN, 0, &[], 4096).0,
        VIRTIO_BLK_S_OK
    );
    // Let the device finish with the ring (see `settle`) before logging.
    drv.settle();
    logging_start(drv.raw(), PAGE, &[(GUEST_BASE, GUEST_SIZE)]).ok();
    assert!(report(drv.raw(), GUEST_BASE, GUEST_SIZE, PAGE).is_empty());

    // (a) A read: the device writes 8 KiB of data starting mid-page (three
    // pages), the status byte and the used ring.
    let slot0 = drv.used_idx(0);
    let p = drv.ram.alloc(0, PAGE);
    drv.ram.alloc(0x100, 1);
    let a = drv.blk_submit_req(0, VIRTIO_BLK_T_IN, 64, &[], 8192);
    let (a_addr, a_len) = a.data_in.unwrap();
    assert_eq!(a_addr, p + 0x200, "test bug: layout");
    drv.kick(0);
    drv.wait_used(0, 1);
    let (st, data) = drv.take_result(0, a.head);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(data, read_image(&img, 64 * 512, 8192));

    // (b) A write from its own pages: the device reads the header and the
    // data and writes only the status byte and the used ring.
    drv.ram.alloc(0, PAGE);
    let b = drv.blk_submit_req(0, VIRTIO_BLK_T_OUT, 256, &pattern(1, 8192), 0);
    let (b_addr, b_len) = b.data_out.unwrap();
    drv.kick(0);
    drv.wait_used(0, 1);
    assert_eq!(drv.take_result(0, b.head).0, VIRTIO_BLK_S_OK);
    assert_eq!(read_image(&img, 256 * 512, 8192), pattern(1, 8192));

    let mut expected = pages_of(GUEST_BASE, PAGE, a_addr, a_len as u64);
    assert_eq!(expected.len(), 3);
    expected.extend(pages_of(GUEST_BASE, PAGE, a.status, 1));
    expected.extend(pages_of(GUEST_BASE, PAGE, b.status, 1));
    expected.extend(used_ring_pages(&drv, 0, slot0..slot0 + 2));
    assert_eq!(
        used_ring_pages(&drv, 0, slot0..slot0 + 2).len(),
        2,
        "used.idx/elements and avail_event pages"
    );
    drv.settle();
    let dirty = report(drv.raw(), GUEST_BASE, GUEST_SIZE, PAGE);
    // What the device only read, and everything the driver wrote itself
    // through its own mapping, is not in the server's log.
    let b_data_pages: BTreeSet<u64> = pages_of(GUEST_BASE, PAGE, b_addr, b_len as u64)
        .difference(&pages_of(GUEST_BASE, PAGE, b.status, 1))
        .copied()
        .collect();
    assert_eq!(b_data_pages.len(), 2);
    assert!(
        dirty.is_disjoint(&b_data_pages),
        "write data reported dirty"
    );
    assert!(
        dirty.is_disjoint(&driver_ring_pages(&drv, 0)),
        "descriptor table / avail ring reported dirty"
    );
    assert_eq!(dirty, expected);
    // Reading cleared the bits.
    assert!(report(drv.raw(), GUEST_BASE, GUEST_SIZE, PAGE).is_empty());

    // Another read, reported first for a sub-range holding only its data
    // (the rest of the log is kept), then with 2 MiB pages (bits OR-ed).
    let slot = drv.used_idx(0);
    let r = drv.ram.alloc(0, PAGE);
    let c = drv.blk_submit_req(0, VIRTIO_BLK_T_IN, 8, &[], 4096);
    let (c_addr, c_len) = c.data_in.unwrap();
    drv.kick(0);
    drv.wait_used(0, 1);
    assert_eq!(drv.take_result(0, c.head).0, VIRTIO_BLK_S_OK);
    let data_pages = pages_of(GUEST_BASE, PAGE, c_addr, c_len as u64);
    assert_eq!(data_pages, BTreeSet::from([r, r + PAGE]));
    drv.settle();
    assert_eq!(report(drv.raw(), r, 2 * PAGE, PAGE), data_pages);
    let rest = used_ring_pages(&drv, 0, slot..slot + 1);
    let huge = 2 << 20;
    let coarse = report(drv.raw(), GUEST_BASE, GUEST_SIZE, huge);
    let want: BTreeSet<u64> = rest
        .iter()
        .map(|p| GUEST_BASE + (p - GUEST_BASE) / huge * huge)
        .collect();
    assert_eq!(coarse, want);
    assert!(report(drv.raw(), GUEST_BASE, GUEST_SIZE, PAGE).is_empty());

    // Logging off: no more reports.
    logging_stop(drv.raw()).ok();
    assert_eq!(
        report_raw(drv.raw(), GUEST_BASE, GUEST_SIZE, PAGE).err(),
        libc::EINVAL
    );
    assert_eq!(
        drv.blk_request(0, VIRTIO_BLK_T_IN, 0, &[], 512).0,
        VIRTIO_BLK_S_OK
    );
}

/// The device still serves the same driver state: a write and a read
/// round trip, and nothing completes twice.
#[track_caller]
fn blk_works(drv: &mut VirtioDriver<RawClient>, seed: u8) {
    let sector = 2048 + 8 * seed as u64;
    let w = pattern(seed, 4096);
    assert_eq!(
        drv.blk_request(0, VIRTIO_BLK_T_OUT, sector, &w, 0).0,
        VIRTIO_BLK_S_OK
    );
    let (st, data) = drv.blk_request(0, VIRTIO_BLK_T_IN, sector, &[], 4096);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(data, w);
    assert_eq!(drv.used_idx(0), drv.queues[0].next_avail);
    assert_eq!(drv.queues[0].last_used, drv.queues[0].next_avail);
}

#[test]
fn bad_migration_input() {
    let dir = TempDir::new().unwrap();
    let img = image(&dir);
    let daemon = Daemon::start_in(dir, &["--disk", img.to_str().unwrap()]);
    let mut drv = VirtioDriver::connect_raw(&daemon.socket);
    drv.init(BLK_WANT, 64);
    blk_works(&mut drv, 1);
    let c = drv.raw();

    // ---- DEVICE_FEATURE
    // GET and SET together without PROBE.
    let data = [RUNNING.to_le_bytes(), u32::MAX.to_le_bytes()].concat();
    let r = feature(c, 16, FEATURE_GET | FEATURE_SET | MIG_DEVICE_STATE, &data);
    assert_eq!(r.err(), libc::EINVAL);
    // No operation at all.
    assert_eq!(feature(c, 16, MIGRATION, &[0; 8]).err(), libc::EINVAL);
    // Unknown feature indices (3-5 are kernel-only, 9+ unknown).
    for idx in [0, 3, 4, 5, 9, 99, 0xffff] {
        assert_eq!(
            feature(c, 16, FEATURE_GET | idx, &[0; 8]).err(),
            libc::EINVAL,
            "feature {idx}"
        );
        assert_eq!(
            feature(c, 16, FEATURE_PROBE | FEATURE_GET | idx, &[0; 8]).err(),
            libc::EINVAL,
            "probe of feature {idx}"
        );
    }
    // Unsupported operation on a known feature.
    assert_eq!(
        feature(c, 16, FEATURE_SET | MIGRATION, &[0; 8]).err(),
        libc::EINVAL
    );
    assert_eq!(
        feature(c, 16, FEATURE_PROBE | FEATURE_SET | MIGRATION, &[0; 8]).err(),
        libc::EINVAL
    );
    assert_eq!(
        feature(c, 40, FEATURE_GET | DMA_LOGGING_START, &[0; 16]).err(),
        libc::EINVAL
    );
    // argsz too small: below the head, or for the GET data.
    assert_eq!(
        feature(c, 4, FEATURE_GET | MIGRATION, &[0; 8]).err(),
        libc::EINVAL
    );
    assert_eq!(
        feature(c, 8, FEATURE_GET | MIGRATION, &[0; 8]).err(),
        libc::EINVAL
    );
    assert_eq!(
        feature(c, 12, FEATURE_GET | MIG_DEVICE_STATE, &[0; 8]).err(),
        libc::EINVAL
    );
    // Payload shorter than the head.
    assert_eq!(c.call(cmd::DEVICE_FEATURE, &[16, 0, 0]).err(), libc::EINVAL);
    // PROBE succeeds (echoing the request) for what is supported.
    for flags in [
        FEATURE_PROBE | FEATURE_GET | MIGRATION,
        FEATURE_PROBE | MIGRATION,
        FEATURE_PROBE | FEATURE_GET | FEATURE_SET | MIG_DEVICE_STATE,
        FEATURE_PROBE | FEATURE_SET | DMA_LOGGING_START,
        FEATURE_PROBE | FEATURE_SET | DMA_LOGGING_STOP,
        FEATURE_PROBE | FEATURE_GET | DMA_LOGGING_REPORT,
    ] {
        let req = payload::device_feature(16, flags, &[0; 8]);
        let r = c.call(cmd::DEVICE_FEATURE, &req).ok();
        assert_eq!(r.payload, req, "probe {flags:#x}");
    }
    // GET MIGRATION: STOP_COPY | PRE_COPY (no P2P).
    let r = feature(c, 16, FEATURE_GET | MIGRATION, &[0; 8]).ok();
    assert_eq!(r.payload.len(), 16);
    assert_eq!(le32(&r.payload, 0), 16);
    assert_eq!(le32(&r.payload, 4), FEATURE_GET | MIGRATION);
    assert_eq!(
        le64(&r.payload, 8),
        MIGRATION_STOP_COPY | MIGRATION_PRE_COPY
    );
    assert_eq!(get_state(c), RUNNING);
    blk_works(&mut drv, 2);
    let c = drv.raw();

    // ---- illegal device states and arcs
    for state in [ERROR, RUNNING_P2P, PRE_COPY_P2P, 8, 99, u32::MAX] {
        assert_eq!(set_state(c, state).err(), libc::EINVAL, "state {state}");
        assert_eq!(get_state(c), RUNNING);
    }
    // The state without data_fd.
    let r = feature(c, 12, FEATURE_SET | MIG_DEVICE_STATE, &STOP.to_le_bytes());
    assert_eq!(r.err(), libc::EINVAL);
    assert_eq!(get_state(c), RUNNING);
    set_state_ok(c, STOP_COPY);
    assert_eq!(set_state(c, PRE_COPY).err(), libc::EINVAL);
    assert_eq!(get_state(c), STOP_COPY, "a refused arc moved the state");
    assert_eq!(set_state(c, ERROR).err(), libc::EINVAL);
    assert_eq!(set_state(c, RUNNING_P2P).err(), libc::EINVAL);
    assert_eq!(get_state(c), STOP_COPY);
    // Multi-hop back to RUNNING (through STOP).
    set_state_ok(c, RUNNING);
    blk_works(&mut drv, 3);
    let c = drv.raw();

    // ---- MIG_DATA in the wrong state or malformed
    assert_eq!(read_raw(c, 64).err(), libc::EINVAL, "read in RUNNING");
    assert_eq!(
        write_raw(c, &[1, 2, 3]).err(),
        libc::EINVAL,
        "write in RUNNING"
    );
    set_state_ok(c, STOP);
    assert_eq!(read_raw(c, 64).err(), libc::EINVAL, "read in STOP");
    assert_eq!(
        write_raw(c, &[1, 2, 3]).err(),
        libc::EINVAL,
        "write in STOP"
    );
    set_state_ok(c, RESUMING);
    assert_eq!(read_raw(c, 64).err(), libc::EINVAL, "read in RESUMING");
    // size != payload, argsz too small, no head at all.
    let r = c.call(
        cmd::MIG_DATA_WRITE,
        &payload::mig_data(8 + 4, 4, &[1, 2, 3]),
    );
    assert_eq!(r.err(), libc::EINVAL);
    let r = c.call(
        cmd::MIG_DATA_WRITE,
        &payload::mig_data(8 + 3, 2, &[1, 2, 3]),
    );
    assert_eq!(r.err(), libc::EINVAL);
    let r = c.call(cmd::MIG_DATA_WRITE, &payload::mig_data(4, 3, &[1, 2, 3]));
    assert_eq!(r.err(), libc::EINVAL);
    assert_eq!(c.call(cmd::MIG_DATA_WRITE, &[3, 0]).err(), libc::EINVAL);
    // Nothing written: leaving RESUMING with an empty stream fails.
    assert_eq!(set_state(c, STOP).err(), libc::EINVAL);
    assert_eq!(get_state(c), STOP);
    set_state_ok(c, RUNNING);
    blk_works(&mut drv, 4);
    let c = drv.raw();
    set_state_ok(c, PRE_COPY);
    assert_eq!(write_raw(c, &[1]).err(), libc::EINVAL, "write in PRE_COPY");
    // Bigger than the client's max_data_xfer_size, or argsz too small.
    assert_eq!(read_raw(c, 2 << 20).err(), libc::EINVAL);
    let r = c.call(cmd::MIG_DATA_READ, &payload::mig_data(8, 64, &[]));
    assert_eq!(r.err(), libc::EINVAL);
    assert!(read_chunk(c, 64).is_empty());
    set_state_ok(c, STOP_COPY);
    assert_eq!(write_raw(c, &[1]).err(), libc::EINVAL, "write in STOP_COPY");
    let good = read_stream(c, 1 << 20);
    set_state_ok(c, RUNNING);
    blk_works(&mut drv, 5);

    // ---- bad streams: refused as a whole, the device keeps its state.
    // The driver moved on since `good` was taken: applying any old state
    // would make the device redo requests (caught by blk_works).
    let mut foreign = stream::decode(&good);
    foreign.kind = "virtio-net".into();
    let mut two_queues = stream::decode(&good);
    let mut st = two_queues.state();
    let q0 = st["queues"][0].clone();
    st["queues"].as_array_mut().unwrap().push(q0);
    two_queues.set_state(&st);
    let mut future = stream::decode(&good);
    future.version = 2;
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x20;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() / 2].to_vec()),
        ("last byte missing", good[..good.len() - 1].to_vec()),
        ("one byte flipped", flipped),
        ("garbage", noise(42, good.len())),
        ("other device kind", foreign.encode()),
        ("other queue count", two_queues.encode()),
        ("newer format", future.encode()),
        ("not JSON", stream::encode(1, "virtio-blk", b"{not json")),
        ("good then extra", [good.clone(), vec![0]].concat()),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let c = drv.raw();
        set_state_ok(c, RESUMING);
        write_stream(c, bytes, 700);
        assert_eq!(set_state(c, STOP).err(), libc::EINVAL, "{what}");
        assert_eq!(get_state(c), STOP, "{what}");
        set_state_ok(c, RUNNING);
        blk_works(&mut drv, 10 + i as u8);
    }
    // Refused stream, then DEVICE_RESET: a power-on device the driver
    // initialises again.
    let c = drv.raw();
    set_state_ok(c, RESUMING);
    write_stream(c, &good[..10], 700);
    assert_eq!(set_state(c, RUNNING).err(), libc::EINVAL);
    assert_eq!(get_state(c), STOP);
    set_state_ok(c, RUNNING);
    c.reset().ok();
    assert_eq!(get_state(c), RUNNING);
    assert_eq!(drv.status(), 0);
    drv.init(BLK_WANT, 64);
    blk_works(&mut drv, 30);

    // A good stream of the current state, restored in place: the driver
    // continues as if nothing happened.
    let c = drv.raw();
    set_state_ok(c, STOP_COPY);
    let now = read_stream(c, 1 << 20);
    set_state_ok(c, RESUMING);
    write_stream(c, &now, 1 << 20);
    set_state_ok(c, RUNNING);
    blk_works(&mut drv, 31);

    // ---- dirty logging
    let c = drv.raw();
    assert_eq!(
        report_raw(c, GUEST_BASE, GUEST_SIZE, PAGE).err(),
        libc::EINVAL,
        "REPORT without START"
    );
    for page in [0, 512, 3 * PAGE, PAGE + 1] {
        assert_eq!(
            logging_start(c, page, &[]).err(),
            libc::EINVAL,
            "START page {page}"
        );
    }
    // ranges promised but missing.
    let r = feature(
        c,
        24,
        FEATURE_SET | DMA_LOGGING_START,
        &[PAGE.to_le_bytes(), 1u64.to_le_bytes()].concat(),
    );
    assert_eq!(r.err(), libc::EINVAL);
    logging_start(c, PAGE, &[]).ok();
    assert_eq!(
        logging_start(c, 2 * PAGE, &[]).err(),
        libc::EINVAL,
        "START with another page size"
    );
    logging_start(c, PAGE, &[]).ok();
    let report_req = |c: &mut RawClient, iova: u64, len: u64, page: u64, argsz: u32| {
        let data = [iova.to_le_bytes(), len.to_le_bytes(), page.to_le_bytes()].concat();
        feature(c, argsz, FEATURE_GET | DMA_LOGGING_REPORT, &data)
    };
    let full = 8 + 24 + 2048;
    for (iova, len, page, what) in [
        (GUEST_BASE, GUEST_SIZE, 3 * PAGE, "page not a power of two"),
        (GUEST_BASE, GUEST_SIZE, 0, "page 0"),
        (GUEST_BASE, GUEST_SIZE, 512, "page below 4 KiB"),
        (GUEST_BASE + 512, PAGE, PAGE, "iova not 4 KiB aligned"),
        (GUEST_BASE - PAGE, 2 * PAGE, PAGE, "starts below RAM"),
        (
            GUEST_BASE + GUEST_SIZE - PAGE,
            2 * PAGE,
            PAGE,
            "ends past RAM",
        ),
        (0, PAGE, PAGE, "unmapped"),
        (GUEST_BASE, 0, PAGE, "empty range"),
        (u64::MAX - PAGE, 2 * PAGE, PAGE, "wraps"),
    ] {
        let r = report_req(c, iova, len, page, full);
        assert_eq!(r.err(), libc::EINVAL, "REPORT {what}");
    }
    // argsz without room for the bitmap.
    let r = report_req(c, GUEST_BASE, GUEST_SIZE, PAGE, full - 8);
    assert_eq!(r.err(), libc::EINVAL, "REPORT argsz too small");
    // A bitmap bigger than max_data_xfer_size (1 MiB = 32 GiB of 4 KiB
    // pages), over a mapped (sparse) 33 GiB memfd.
    let big = GuestRam::sparse_file(33 << 30);
    let big_base = 1u64 << 40;
    c.dma_map(0, big_base, 33 << 30, Some(big.as_raw_fd())).ok();
    let r = report_req(c, big_base, (32 << 30) + PAGE, PAGE, u32::MAX);
    assert_eq!(r.err(), libc::EINVAL, "REPORT bitmap too big");
    let r = report_req(c, big_base, 33 << 30, PAGE, u32::MAX);
    assert_eq!(r.err(), libc::EINVAL, "REPORT bitmap too big");
    // With 8 KiB pages the whole map fits (528 KiB of bitmap), all clear.
    let r = report_req(c, big_base, 33 << 30, 2 * PAGE, u32::MAX).ok();
    assert_eq!(
        r.payload.len(),
        8 + 24 + (33 << 30) / (2 * PAGE as usize) / 8
    );
    assert!(r.payload[32..].iter().all(|b| *b == 0));
    c.dma_unmap(0, big_base, 33 << 30).ok();
    // Still logging and reporting.
    report(c, GUEST_BASE, GUEST_SIZE, PAGE);
    logging_stop(c).ok();
    assert_eq!(
        report_raw(c, GUEST_BASE, GUEST_SIZE, PAGE).err(),
        libc::EINVAL,
        "REPORT after STOP"
    );

    // ---- ERROR: never reachable by request; DEVICE_RESET keeps RUNNING.
    assert_eq!(set_state(c, ERROR).err(), libc::EINVAL);
    c.reset().ok();
    assert_eq!(get_state(c), RUNNING);
    drv.init(BLK_WANT, 64);
    blk_works(&mut drv, 40);

    // ---- DEVICE_RESET while STOP: the device is reset but stays stopped
    // (the driver may set it up again; it does no DMA until RUNNING).
    let c = drv.raw();
    set_state_ok(c, STOP);
    c.reset().ok();
    assert_eq!(get_state(c), STOP);
    drv.init(BLK_WANT, 64);
    let h = drv.blk_submit(0, VIRTIO_BLK_T_IN, 0, &[], 512);
    drv.kick(0);
    drv.settle();
    assert_eq!(drv.used_idx(0), 0, "a stopped device served a request");
    set_state_ok(drv.raw(), RUNNING);
    drv.wait_used_idx(0, 1);
    assert_eq!(drv.poll_used(0), vec![(h, 513)]);
    assert_eq!(drv.take_result(0, h).0, VIRTIO_BLK_S_OK);
    blk_works(&mut drv, 41);

    // One connection did all of that.
    drv.raw().ping();
}
