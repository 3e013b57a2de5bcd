//! virtio-blk over the virtio PCI transport, driven by the test-side
//! virtio driver of `integration_tests` (the one the daemon tests and the
//! benchmark use) through the in-process transport: the device behind
//! `PciAdapter`, called directly with the server's DMA table and
//! interrupts, in guest RAM of two regions with a hole between them.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::block_io::{Aio, ErrorPolicy};
use backends::storage::faulty::{Call, FaultyDisk};
use backends::storage::{BlockBackend, MemoryDisk, RawFile, RawFileOptions};
use backends::virtio_blk::{VirtioBlkConfig, VirtioBlkPci};
use integration_tests::virtio_driver::common_cfg as cc;
use integration_tests::virtio_driver::device_status::{
    ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK,
};
use integration_tests::virtio_driver::*;
use vfio_user_server::device::{AsLifecycle, Device, DeviceContext, ResetReason};
use vfio_user_server::pci::{PciAdapter, PciDevice};
use vfio_user_server::wire::PCI_CONFIG_REGION_INDEX;
use vmm_sys_util::tempfile::TempFile;

const DISK_SIZE: u64 = 1 << 20;
const ALL: u64 = u64::MAX;

/// Guest RAM: two 1 MiB regions with a hole in between.
const RAM_A: u64 = 0;
const RAM_B: u64 = 0x20_0000;
const RAM_SIZE: u64 = 0x10_0000;
/// An address in the hole.
const HOLE: u64 = 0x15_0000;

/// The device as these tests serve it.
type Blk = InProcess<PciAdapter<VirtioBlkPci>>;
/// The driver of it.
type Driver = VirtioDriver<Blk>;

fn memdisk() -> Arc<MemoryDisk> {
    Arc::new(mem_disk(vec![0; DISK_SIZE as usize], false).with_id("test-serial-0123"))
}

/// A disk holding `data`; in a memfd on the io_uring re-runs, so that the
/// ring reads and writes it.
fn mem_disk(data: Vec<u8>, read_only: bool) -> MemoryDisk {
    if aio() == Aio::IoUring {
        MemoryDisk::in_memfd(&data, read_only).unwrap()
    } else {
        MemoryDisk::from_vec(data, read_only)
    }
}

/// A virtio-blk device over `backend`, served in-process.
fn device(backend: Arc<dyn BlockBackend>, config: VirtioBlkConfig) -> Blk {
    let ctx = DeviceContext::default();
    let blk = VirtioBlkPci::new(ctx.clone(), backend, config).unwrap();
    InProcess::new(PciAdapter::new(blk).unwrap(), ctx)
}

/// A driver of a new device over `backend`, in guest RAM of two regions,
/// with an eventfd on every interrupt (MSI-X and INTx), so that a stray
/// interrupt shows; nothing negotiated yet.
fn connect(backend: Arc<dyn BlockBackend>, config: VirtioBlkConfig) -> Driver {
    let ram = GuestRam::with_regions(&[(RAM_A, RAM_SIZE), (RAM_B, RAM_SIZE)]);
    let mut d = VirtioDriver::connect_with_ram(device(backend, config), ram);
    d.install_msix();
    d.install_intx();
    d
}

thread_local! {
    /// How the devices this test thread builds with `driver` run their
    /// I/O (set by the `on_io_threads` and `on_io_uring` re-runs).
    static AIO: std::cell::Cell<Aio> = const { std::cell::Cell::new(Aio::Sync) };
}

/// How this test's devices run their I/O.
fn aio() -> Aio {
    AIO.with(|a| a.get())
}

fn driver(disk: Arc<MemoryDisk>, mut config: VirtioBlkConfig) -> Driver {
    if config.aio == Aio::Sync {
        config.aio = aio();
    }
    connect(disk, config)
}

/// Runs tests again with reads, writes and flushes in flight: on two I/O
/// threads (`on_io_threads`) and on an io_uring (`on_io_uring`, where the
/// kernel lets us).
macro_rules! in_flight {
    ($($test:ident),* $(,)?) => {
        mod on_io_threads {
            $(
                #[test]
                fn $test() {
                    super::AIO.with(|t| t.set(super::Aio::Threads(2)));
                    super::$test();
                }
            )*
        }
        mod on_io_uring {
            $(
                #[test]
                fn $test() {
                    if let Err(why) = backends::block_io::io_uring_support() {
                        eprintln!("SKIP io_uring: {why}");
                        return;
                    }
                    super::AIO.with(|t| t.set(super::Aio::IoUring));
                    super::$test();
                }
            )*
        }
    };
}

in_flight!(
    read_write_flush_get_id_msix,
    write_through_without_flush_feature,
    discard_and_write_zeroes,
    read_only_disk,
    bad_requests_fail_cleanly,
    garbage_chains_do_not_panic_or_hang,
    indirect_descriptors,
    multiqueue,
    device_reset_through_status_zero,
    full_reset_through_adapter,
    pause_defers_and_resume_processes,
    off_the_bus_takes_nothing,
    snapshot_restore,
    storage_errors_are_reported_by_default,
    storage_errors_stop_the_device_until_resumed,
    a_stopped_device_is_snapshotted_with_its_kept_requests,
    a_reset_forgets_the_kept_requests,
);

fn ready(disk: Arc<MemoryDisk>) -> Driver {
    let mut d = driver(disk, VirtioBlkConfig::default());
    d.init(ALL & !VIRTIO_RING_F_EVENT_IDX, 16);
    d
}

/// The virtio-blk device behind the adapter.
fn blk(d: &mut Driver) -> &mut VirtioBlkPci {
    d.transport.device().device()
}

/// Places `descs` as a chain on queue `q`, makes it available and kicks;
/// returns the head.
fn submit(d: &mut Driver, q: usize, descs: &[Desc]) -> u16 {
    let head = d.push(q, descs);
    d.kick(q);
    head
}

/// One block request on queue `q` with `data` between header and status;
/// returns `(status, used len)`. Its used entry must be the only one.
fn request(d: &mut Driver, q: usize, t: u32, sector: u64, data: &[Desc]) -> (u8, u32) {
    let req = d.blk_submit_descs(q, t, sector, data);
    d.kick(q);
    let used = d.wait_used(q, 1);
    assert_eq!(used.len(), 1, "more used entries than requests: {used:?}");
    assert_eq!(used[0].0, req.head);
    assert!(d.poll_used(q).is_empty());
    (d.take_result(q, req.head).0, used[0].1)
}

/// Writes `data` to `sector` through queue `q`; returns the status.
fn write_sectors(d: &mut Driver, q: usize, sector: u64, data: &[u8]) -> u8 {
    let buf = d.ram.alloc(data.len() as u64, 16);
    d.ram.write(buf, data);
    let data = [Desc::readable(buf, data.len() as u32)];
    let (status, len) = request(d, q, VIRTIO_BLK_T_OUT, sector, &data);
    assert_eq!(len, 1);
    status
}

/// Reads `len` bytes from `sector` through queue `q`.
fn read_sectors(d: &mut Driver, q: usize, sector: u64, len: usize) -> (u8, Vec<u8>) {
    let buf = d.ram.alloc(len as u64, 16);
    d.ram.write(buf, &vec![0x5a; len]);
    let data = [Desc::writable(buf, len as u32)];
    let (status, used) = request(d, q, VIRTIO_BLK_T_IN, sector, &data);
    if status == VIRTIO_BLK_S_OK {
        assert_eq!(used as usize, len + 1);
    }
    (status, d.ram.read(buf, len))
}

/// A test pattern.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(13)
                .wrapping_add(seed)
                .wrapping_add((i >> 8) as u8)
        })
        .collect()
}

#[test]
fn identity_and_layout() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    assert_eq!(d.cfg_read(0, 4), 0x1042_1af4);
    assert_eq!(d.cfg_read(8, 1), 1, "revision");
    assert_eq!(d.cfg_read(0x0b, 1), 0x01, "mass storage class");
    assert_eq!(d.cfg_read(0x2c, 4), 0x1100_1af4, "subsystem");
    assert_eq!(d.cfg_read(0x3d, 1), 1, "INTA");
    // BAR 0: 64-bit memory, 0x8000 bytes.
    assert_eq!(d.cfg_read(0x10, 4) & 0xf, 0x4);
    d.cfg_write(0x10, 4, 0xffff_ffff);
    assert_eq!(d.cfg_read(0x10, 4), 0xffff_8004);
    assert_eq!(d.transport.device().region(0).size, 0x8000);
    let config = d.transport.device().region(PCI_CONFIG_REGION_INDEX);
    assert_eq!(config.size, 4096);

    assert!(d.find_cap(PCI_CAP_ID_EXP).is_some());
    assert!(d.find_cap(PCI_CAP_ID_PM).is_some());
    assert!(d.virtio_cap(VIRTIO_PCI_CAP_PCI_CFG).is_some());
    // MSI-X: 2 vectors (1 queue + config), table and PBA in BAR 0.
    let msix = d.find_cap(PCI_CAP_ID_MSIX).unwrap();
    assert_eq!(d.cfg_read(msix + 2, 2) & 0x7ff, 1);
    assert_eq!(d.cfg_read(msix + 4, 4), 0x4000);
    assert_eq!(d.cfg_read(msix + 8, 4), 0x6000);
    let mut types: Vec<u8> = d.virtio_caps.iter().map(|c| c.cfg_type).collect();
    types.sort();
    assert_eq!(types, vec![1, 2, 3, 4, 5]);
    assert!(d.virtio_caps.iter().all(|c| c.loc.bar == 0));
    assert_eq!(
        (
            d.common.offset,
            d.isr.offset,
            d.device.offset,
            d.notify.offset
        ),
        (0, 0x1000, 0x2000, 0x3000)
    );
    assert_eq!(d.notify_mult, 4);

    // Conventional PCI: 256-byte config space, no PCIe capability.
    let mut d = driver(
        memdisk(),
        VirtioBlkConfig {
            pcie: false,
            num_queues: 3,
            ..Default::default()
        },
    );
    let config = d.transport.device().region(PCI_CONFIG_REGION_INDEX);
    assert_eq!(config.size, 256);
    assert!(d.find_cap(PCI_CAP_ID_EXP).is_none());
    assert_eq!(d.transport.device().irq_layout()[2].count, 4);
}

#[test]
fn device_config_space() {
    let mut d = driver(
        memdisk(),
        VirtioBlkConfig {
            num_queues: 2,
            queue_size: 128,
            ..Default::default()
        },
    );
    assert_eq!(d.device_config(0, 8), DISK_SIZE / 512, "capacity");
    assert_eq!(d.device_config(0x0c, 4), 126, "seg_max");
    assert_eq!(d.device_config(0x14, 4), 512, "blk_size");
    assert_eq!(d.device_config(0x22, 2), 2, "num_queues");
    assert_ne!(d.device_config(0x24, 4), 0, "max_discard_sectors");
    assert_eq!(d.common_read(cc::NUM_QUEUES, 2), 2);
    d.common_write(cc::QUEUE_SELECT, 2, 1);
    assert_eq!(d.common_read(cc::QUEUE_SIZE, 2), 128);
    assert_eq!(d.common_read(cc::QUEUE_NOTIFY_OFF, 2), 1);
    d.common_write(cc::QUEUE_SELECT, 2, 7);
    assert_eq!(d.common_read(cc::QUEUE_SIZE, 2), 0, "no such queue");
    let f = d.device_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_BLK_F_MQ, 0);
    assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
    assert_ne!(f & VIRTIO_RING_F_INDIRECT_DESC, 0);
    assert_eq!(f & VIRTIO_BLK_F_RO, 0);
}

#[test]
fn read_write_flush_get_id_msix() {
    let disk = memdisk();
    let mut d = ready(disk.clone());
    let data = pattern(2048, 7);
    assert_eq!(write_sectors(&mut d, 0, 3, &data), VIRTIO_BLK_S_OK);
    assert!(d.msix[1].fired(), "queue vector");
    assert!(!d.msix[0].fired(), "config vector");
    assert!(!d.intx.fired());
    assert_eq!(&disk.contents()[3 * 512..3 * 512 + 2048], &data[..]);

    let (status, back) = read_sectors(&mut d, 0, 3, 2048);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(back, data);
    assert!(d.msix[1].fired());

    // Scattered over both RAM regions, odd segment sizes.
    let a = d.ram.alloc(700, 16);
    let b = d.ram.alloc_in(1, 324, 16);
    d.ram.write(a, &data[..700]);
    d.ram.write(b, &data[700..1024]);
    let segments = [Desc::readable(a, 700), Desc::readable(b, 324)];
    let (status, len) = request(&mut d, 0, VIRTIO_BLK_T_OUT, 100, &segments);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
    let (status, back) = read_sectors(&mut d, 0, 100, 1024);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(back, &data[..1024]);

    let flushes = disk.flush_count();
    let (status, _) = request(&mut d, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(disk.flush_count(), flushes + 1);

    let id = d.ram.alloc(20, 16);
    let (status, len) = request(&mut d, 0, VIRTIO_BLK_T_GET_ID, 0, &[Desc::writable(id, 20)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
    let mut want = b"test-serial-0123".to_vec();
    want.resize(20, 0);
    assert_eq!(d.ram.read(id, 20), want);
    // GET_ID with a short buffer gets truncated.
    let (status, len) = request(&mut d, 0, VIRTIO_BLK_T_GET_ID, 0, &[Desc::writable(id, 4)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 5));
}

#[test]
fn write_through_without_flush_feature() {
    let disk = memdisk();
    let mut d = driver(disk.clone(), VirtioBlkConfig::default());
    d.init(ALL & !VIRTIO_BLK_F_FLUSH, 16);
    assert_eq!(write_sectors(&mut d, 0, 0, &[1u8; 512]), VIRTIO_BLK_S_OK);
    assert_eq!(disk.flush_count(), 1);
}

#[test]
fn raw_file_backend() {
    let tmp = TempFile::new().unwrap();
    tmp.as_file().set_len(DISK_SIZE).unwrap();
    for direct in [false, true] {
        let file = match RawFile::open(
            tmp.as_path(),
            RawFileOptions {
                read_only: false,
                direct,
            },
        ) {
            Ok(f) => f,
            Err(_) if direct => continue,
            Err(e) => panic!("{e}"),
        };
        let mut d = connect(Arc::new(file), VirtioBlkConfig::default());
        d.init(ALL, 64);
        let data = pattern(8192, direct as u8);
        assert_eq!(write_sectors(&mut d, 0, 9, &data), VIRTIO_BLK_S_OK);
        let mut on_disk = vec![0u8; 8192];
        tmp.as_file().read_exact_at(&mut on_disk, 9 * 512).unwrap();
        assert_eq!(on_disk, data);
        assert_eq!(read_sectors(&mut d, 0, 9, 8192), (VIRTIO_BLK_S_OK, data));
        let (status, _) = request(&mut d, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        // Write zeroes then read back.
        let seg = dwz(&mut d, &[(10, 4, 0)]);
        let status = segments_request(&mut d, VIRTIO_BLK_T_WRITE_ZEROES, seg, 16);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let (_, back) = read_sectors(&mut d, 0, 9, 8192);
        assert_eq!(&back[..512], &pattern(8192, direct as u8)[..512]);
        assert!(back[512..512 * 5].iter().all(|b| *b == 0));
        let status = segments_request(&mut d, VIRTIO_BLK_T_DISCARD, seg, 16);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        // Out of range on the file.
        let (status, _) = read_sectors(&mut d, 0, DISK_SIZE / 512, 512);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }
}

/// Discard / write-zeroes segments `(sector, sectors, flags)` in guest
/// RAM; returns their address.
fn dwz(d: &mut Driver, segs: &[(u64, u32, u32)]) -> u64 {
    let a = d.ram.alloc(16 * segs.len() as u64, 16);
    for (i, &(sector, n, flags)) in segs.iter().enumerate() {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        d.ram.write(a + 16 * i as u64, &s);
    }
    a
}

/// The status of a discard or write-zeroes request (`t`) whose data is
/// the `len` bytes of segments at `segs`.
fn segments_request(d: &mut Driver, t: u32, segs: u64, len: u32) -> u8 {
    request(d, 0, t, 0, &[Desc::readable(segs, len)]).0
}

#[test]
fn discard_and_write_zeroes() {
    const DISCARD: u32 = VIRTIO_BLK_T_DISCARD;
    const WRITE_ZEROES: u32 = VIRTIO_BLK_T_WRITE_ZEROES;
    let disk = Arc::new(mem_disk(vec![0xaa; DISK_SIZE as usize], false));
    let mut d = ready(disk.clone());
    let a = dwz(&mut d, &[(1, 2, 0), (10, 1, 1)]);
    assert_eq!(
        segments_request(&mut d, WRITE_ZEROES, a, 32),
        VIRTIO_BLK_S_OK
    );
    let c = disk.contents();
    assert!(c[..512].iter().all(|b| *b == 0xaa));
    assert!(c[512..1536].iter().all(|b| *b == 0));
    assert!(c[1536..5120].iter().all(|b| *b == 0xaa));
    assert!(c[5120..5632].iter().all(|b| *b == 0));

    let a = dwz(&mut d, &[(20, 1, 0)]);
    assert_eq!(segments_request(&mut d, DISCARD, a, 16), VIRTIO_BLK_S_OK);
    assert!(disk.contents()[20 * 512..21 * 512].iter().all(|b| *b == 0));

    // Unmap flag on discard, unknown flag on write zeroes: unsupported.
    let a = dwz(&mut d, &[(30, 1, 1)]);
    assert_eq!(
        segments_request(&mut d, DISCARD, a, 16),
        VIRTIO_BLK_S_UNSUPP
    );
    let a = dwz(&mut d, &[(30, 1, 2)]);
    assert_eq!(
        segments_request(&mut d, WRITE_ZEROES, a, 16),
        VIRTIO_BLK_S_UNSUPP
    );
    // Out of range, overflowing, too long, too many segments, bad size.
    let cap = DISK_SIZE / 512;
    for segs in [
        vec![(cap, 1, 0)],
        vec![(cap - 1, 2, 0)],
        vec![(u64::MAX, 1, 0)],
        vec![(0, u32::MAX, 0)],
        vec![(0, 1, 0); 33],
    ] {
        let a = dwz(&mut d, &segs);
        let len = 16 * segs.len() as u32;
        assert_eq!(
            segments_request(&mut d, DISCARD, a, len),
            VIRTIO_BLK_S_IOERR
        );
    }
    let a = dwz(&mut d, &[(0, 1, 0)]);
    assert_eq!(segments_request(&mut d, DISCARD, a, 15), VIRTIO_BLK_S_IOERR);
    let (status, _) = request(&mut d, 0, DISCARD, 0, &[]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    assert!(disk.contents()[30 * 512..].iter().all(|b| *b == 0xaa));

    // Not negotiated: unsupported.
    let mut d = driver(disk.clone(), VirtioBlkConfig::default());
    d.init(ALL & !VIRTIO_BLK_F_DISCARD & !VIRTIO_BLK_F_WRITE_ZEROES, 16);
    let a = dwz(&mut d, &[(40, 1, 0)]);
    assert_eq!(
        segments_request(&mut d, DISCARD, a, 16),
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        segments_request(&mut d, WRITE_ZEROES, a, 16),
        VIRTIO_BLK_S_UNSUPP
    );
}

#[test]
fn read_only_disk() {
    let disk = Arc::new(mem_disk(vec![3; DISK_SIZE as usize], true));
    let mut d = driver(disk.clone(), VirtioBlkConfig::default());
    let f = d.init(ALL, 16);
    assert_ne!(f & VIRTIO_BLK_F_RO, 0);
    assert_eq!(f & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_eq!(write_sectors(&mut d, 0, 0, &[1u8; 512]), VIRTIO_BLK_S_IOERR);
    assert_eq!(
        read_sectors(&mut d, 0, 0, 512),
        (VIRTIO_BLK_S_OK, vec![3; 512])
    );
    let (status, _) = request(&mut d, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    // Forced read-only over a writable back end.
    let disk = memdisk();
    let mut d = driver(
        disk.clone(),
        VirtioBlkConfig {
            read_only: true,
            ..Default::default()
        },
    );
    d.init(ALL, 16);
    assert_eq!(write_sectors(&mut d, 0, 0, &[1u8; 512]), VIRTIO_BLK_S_IOERR);
    assert!(disk.contents().iter().all(|b| *b == 0));
}

#[test]
fn bad_requests_fail_cleanly() {
    let disk = memdisk();
    let mut d = ready(disk.clone());
    let cap = DISK_SIZE / 512;
    let buf = d.ram.alloc(4096, 16);
    let (r, w) = (Desc::readable, Desc::writable);
    let status = |d: &mut Driver, t, sector, data: &[Desc]| request(d, 0, t, sector, data).0;

    // Unknown type.
    assert_eq!(status(&mut d, 0x1234, 0, &[]), VIRTIO_BLK_S_UNSUPP);
    // Out of range, straddling the end, overflowing sector numbers.
    let (t_in, t_out) = (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT);
    assert_eq!(
        status(&mut d, t_in, cap, &[w(buf, 512)]),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        status(&mut d, t_in, cap - 1, &[w(buf, 1024)]),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        status(&mut d, t_out, u64::MAX, &[r(buf, 512)]),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        status(&mut d, t_out, u64::MAX / 512, &[r(buf, 512)]),
        VIRTIO_BLK_S_IOERR
    );
    // Not a multiple of the sector size.
    assert_eq!(status(&mut d, t_in, 0, &[w(buf, 100)]), VIRTIO_BLK_S_IOERR);
    assert_eq!(status(&mut d, t_out, 0, &[r(buf, 513)]), VIRTIO_BLK_S_IOERR);
    // Data buffer in the hole or running off the end of a region.
    assert_eq!(status(&mut d, t_in, 0, &[w(HOLE, 512)]), VIRTIO_BLK_S_IOERR);
    assert_eq!(
        status(&mut d, t_out, 0, &[r(HOLE, 512)]),
        VIRTIO_BLK_S_IOERR
    );
    let edge = RAM_A + RAM_SIZE - 256;
    assert_eq!(status(&mut d, t_in, 0, &[w(edge, 512)]), VIRTIO_BLK_S_IOERR);
    // Huge lengths: beyond guest memory is an I/O error; a chain whose
    // total length overflows u32 is cut short by virtio-queue, losing its
    // status descriptor, so it completes with length 0.
    assert_eq!(
        status(&mut d, t_in, 0, &[w(buf, 0x8000_0000)]),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(request(&mut d, 0, t_in, 0, &[w(buf, u32::MAX)]), (0xff, 0));
    assert_eq!(
        request(&mut d, 0, t_out, 0, &[r(buf, u32::MAX), r(buf, u32::MAX)]),
        (0xff, 0)
    );
    // Readable data after writable: misordered.
    let s = d.blk_status_buffer();
    let h = d.blk_header(t_out, 0);
    let head = submit(&mut d, 0, &[r(h, 16), w(s, 1), r(buf, 512), w(s, 1)]);
    assert_eq!(d.wait_used(0, 1), [(head, 1)]);
    assert_eq!(d.ram.read_u8(s), VIRTIO_BLK_S_IOERR);

    // Short header.
    let h = d.blk_header(t_in, 0);
    let s = d.blk_status_buffer();
    let head = submit(&mut d, 0, &[r(h, 8), w(buf, 512), w(s, 1)]);
    assert_eq!(d.wait_used(0, 1), [(head, 1)]);
    assert_eq!(d.ram.read_u8(s), VIRTIO_BLK_S_IOERR);
    // Header outside memory.
    let s = d.blk_status_buffer();
    let head = submit(&mut d, 0, &[r(HOLE, 16), w(s, 1)]);
    assert_eq!(d.wait_used(0, 1), [(head, 1)]);
    assert_eq!(d.ram.read_u8(s), VIRTIO_BLK_S_IOERR);
    // No writable descriptor at all: completed with length 0.
    let h = d.blk_header(VIRTIO_BLK_T_FLUSH, 0);
    let head = submit(&mut d, 0, &[r(h, 16)]);
    assert_eq!(d.wait_used(0, 1), [(head, 0)]);
    // Status byte in the hole: completed with length 0.
    let h = d.blk_header(VIRTIO_BLK_T_FLUSH, 0);
    let head = submit(&mut d, 0, &[r(h, 16), w(HOLE, 1)]);
    assert_eq!(d.wait_used(0, 1), [(head, 0)]);
    // Zero-length status descriptor after a valid one: the status goes
    // into the last byte of the writable area.
    let h = d.blk_header(VIRTIO_BLK_T_FLUSH, 0);
    let s = d.blk_status_buffer();
    let head = submit(&mut d, 0, &[r(h, 16), w(s, 1), w(buf, 0)]);
    assert_eq!(d.wait_used(0, 1), [(head, 1)]);
    assert_eq!(d.ram.read_u8(s), VIRTIO_BLK_S_OK);

    // Nothing was written and the next request works.
    assert!(disk.contents().iter().all(|b| *b == 0));
    assert_eq!(write_sectors(&mut d, 0, 5, &[9u8; 512]), VIRTIO_BLK_S_OK);
    assert_eq!(
        read_sectors(&mut d, 0, 5, 512),
        (VIRTIO_BLK_S_OK, vec![9; 512])
    );
}

/// `desc` with `VIRTQ_DESC_F_NEXT` added.
fn chained(desc: Desc) -> Desc {
    Desc {
        flags: desc.flags | VIRTQ_DESC_F_NEXT,
        ..desc
    }
}

#[test]
fn garbage_chains_do_not_panic_or_hang() {
    let mut d = ready(memdisk());
    let size = d.queues[0].size;
    let table = d.queues[0].desc;
    let h = d.blk_header(VIRTIO_BLK_T_IN, 0);
    let buf = d.ram.alloc(512, 16);

    // Descriptors written and heads published by hand, in descriptors the
    // driver holds free: a loop, 0 -> 1 -> 0.
    d.write_desc(table, 0, chained(Desc::readable(h, 16)), 1);
    d.write_desc(table, 1, chained(Desc::writable(buf, 512)), 0);
    d.publish(0, 0);
    d.kick(0);
    assert_eq!(d.wait_used(0, 1).len(), 1);

    // `next` out of range.
    d.write_desc(table, 0, chained(Desc::readable(h, 16)), 999);
    d.publish(0, 0);
    d.kick(0);
    assert_eq!(d.wait_used(0, 1), [(0, 0)]);

    // Head index out of range: cannot be returned, must be skipped.
    d.publish(0, 4000);
    d.kick(0);
    assert!(d.poll_used(0).is_empty());

    // Indirect table outside memory, with a huge length, misaligned
    // length, nested indirect.
    let inner = d.ram.alloc(64, 16);
    for (addr, len) in [(HOLE, 64), (inner, 0xffff_fff0), (inner, 17), (inner, 0)] {
        d.write_desc(table, 0, Desc::indirect(addr, len), 0);
        d.publish(0, 0);
        d.kick(0);
        assert_eq!(d.wait_used(0, 1), [(0, 0)]);
    }
    d.write_desc(inner, 0, Desc::indirect(inner, 32), 0);
    d.write_desc(table, 0, Desc::indirect(inner, 32), 0);
    d.publish(0, 0);
    d.kick(0);
    assert_eq!(d.wait_used(0, 1), [(0, 0)]);

    // A looping indirect table.
    for i in 0..4u16 {
        d.write_desc(inner, i, chained(Desc::writable(buf, 512)), (i + 1) % 4);
    }
    d.write_desc(table, 0, Desc::indirect(inner, 64), 0);
    d.publish(0, 0);
    d.kick(0);
    assert_eq!(d.wait_used(0, 1).len(), 1);

    // An indirect chain longer than any real request (3000 descriptors).
    let long = d.ram.alloc(3000 * 16, 16);
    for i in 0..3000u16 {
        d.write_desc(long, i, chained(Desc::writable(buf, 1)), i + 1);
    }
    d.write_desc(table, 0, Desc::indirect(long, 3000 * 16), 0);
    d.publish(0, 0);
    d.kick(0);
    assert_eq!(d.wait_used(0, 1), [(0, 0)]);

    // Rings moved to garbage: the avail index jumps by more than the
    // queue size. Nothing is processed, nothing hangs.
    let (avail_idx, avail) = (d.queues[0].next_avail, d.queues[0].avail);
    d.ram.write_u16(avail + 2, avail_idx.wrapping_add(size * 3));
    d.kick(0);
    assert!(d.poll_used(0).is_empty());
    d.ram.write_u16(avail + 2, avail_idx);

    // Kicks for queues that do not exist.
    let (bar, notify) = (d.notify.bar, d.notify.offset);
    d.region_write(bar, notify + 4 * 100, 2, 100);
    d.region_write(bar, notify + 0xffc, 4, 0);

    // The queue still works (the driver's descriptors were not touched by
    // hand: it keeps its free list to itself).
    assert_eq!(write_sectors(&mut d, 0, 1, &[4u8; 512]), VIRTIO_BLK_S_OK);
    assert_eq!(
        read_sectors(&mut d, 0, 1, 512),
        (VIRTIO_BLK_S_OK, vec![4; 512])
    );
}

#[test]
fn indirect_descriptors() {
    let disk = memdisk();
    let mut d = ready(disk.clone());
    let data = pattern(1536, 3);
    let h = d.blk_header(VIRTIO_BLK_T_OUT, 8);
    let b1 = d.ram.alloc(1024, 16);
    // The second buffer in the other RAM region.
    let b2 = d.ram.alloc_in(1, 512, 16);
    d.ram.write(b1, &data[..1024]);
    d.ram.write(b2, &data[1024..]);
    let s = d.blk_status_buffer();
    let table = d.ram.alloc(4 * 16, 16);
    let indirect = d.write_indirect_table(
        table,
        &[
            Desc::readable(h, 16),
            Desc::readable(b1, 1024),
            Desc::readable(b2, 512),
            Desc::writable(s, 1),
        ],
    );
    assert_eq!(indirect, Desc::indirect(table, 64));
    let head = submit(&mut d, 0, &[indirect]);
    assert_eq!(d.wait_used(0, 1), [(head, 1)]);
    assert_eq!(d.ram.read_u8(s), VIRTIO_BLK_S_OK);
    assert_eq!(&disk.contents()[8 * 512..8 * 512 + 1536], &data[..]);

    // Read back through an indirect table as well.
    let h = d.blk_header(VIRTIO_BLK_T_IN, 8);
    let out = d.ram.alloc(1536, 16);
    let s = d.blk_status_buffer();
    let indirect = d.write_indirect_table(
        table,
        &[
            Desc::readable(h, 16),
            Desc::writable(out, 1536),
            Desc::writable(s, 1),
        ],
    );
    assert_eq!(indirect, Desc::indirect(table, 48));
    let head = submit(&mut d, 0, &[indirect]);
    assert_eq!(d.wait_used(0, 1), [(head, 1537)]);
    assert_eq!(d.ram.read(out, 1536), data);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    let f = d.init(ALL, 16);
    assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
    let vq = d.queues[0].clone();

    // used_event = 0: the first completion (used idx 0 -> 1) interrupts.
    assert_eq!(write_sectors(&mut d, 0, 0, &[1u8; 512]), VIRTIO_BLK_S_OK);
    assert!(d.msix[1].fired());
    // The device asked to be kicked at the next avail index.
    assert_eq!(d.ram.read_u16(vq.avail_event_addr()), 1);

    // used_event = 5: completions 1 -> 2, 2 -> 3 are silent.
    d.ram.write_u16(vq.used_event_addr(), 5);
    assert_eq!(write_sectors(&mut d, 0, 0, &[2u8; 512]), VIRTIO_BLK_S_OK);
    assert!(!d.msix[1].fired());
    assert_eq!(write_sectors(&mut d, 0, 0, &[3u8; 512]), VIRTIO_BLK_S_OK);
    assert!(!d.msix[1].fired());
    assert_eq!(d.ram.read_u16(vq.avail_event_addr()), 3);
    // used_event = 3: completion 3 -> 4 crosses it.
    d.ram.write_u16(vq.used_event_addr(), 3);
    assert_eq!(write_sectors(&mut d, 0, 0, &[4u8; 512]), VIRTIO_BLK_S_OK);
    assert!(d.msix[1].fired());

    // Several chains in one kick: one interrupt.
    d.ram.write_u16(vq.used_event_addr(), 4);
    let h = d.blk_header(VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..3 {
        let s = d.blk_status_buffer();
        d.push(0, &[Desc::readable(h, 16), Desc::writable(s, 1)]);
    }
    d.kick(0);
    assert_eq!(d.used_idx(0), 7);
    assert_eq!(d.msix[1].take(), 1);

    // Without EVENT_IDX every completion interrupts, and the device does
    // not write avail_event.
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    d.init(ALL & !VIRTIO_RING_F_EVENT_IDX, 16);
    let vq = d.queues[0].clone();
    d.ram.write_u16(vq.used_event_addr(), 100);
    for i in 0..3 {
        assert_eq!(write_sectors(&mut d, 0, i, &[1u8; 512]), VIRTIO_BLK_S_OK);
        assert!(d.msix[1].fired());
    }
    assert_eq!(d.ram.read_u16(vq.avail_event_addr()), 0);
}

#[test]
fn intx_and_isr() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    // MSI-X left disabled.
    d.negotiate(ALL & !VIRTIO_RING_F_EVENT_IDX);
    d.setup_queues(16);
    assert_eq!(write_sectors(&mut d, 0, 0, &[1u8; 512]), VIRTIO_BLK_S_OK);
    assert!(d.intx.fired());
    assert!(d.msix.iter_mut().all(|e| !e.fired()));
    assert_eq!(d.isr_status(), 1);
    assert_eq!(d.isr_status(), 0, "reading ISR clears it");

    // INTx is automasked until the client unmasks it; the next one is
    // pending, not lost.
    assert_eq!(write_sectors(&mut d, 0, 0, &[1u8; 512]), VIRTIO_BLK_S_OK);
    assert!(!d.intx.fired());
    assert_eq!(d.isr_status(), 1);

    // INTx disabled in the command register: ISR still set, no trigger.
    let cmd = d.cfg_read(4, 2);
    d.cfg_write(4, 2, cmd | 0x400);
    d.transport.irqs().clear();
    assert_eq!(write_sectors(&mut d, 0, 0, &[1u8; 512]), VIRTIO_BLK_S_OK);
    assert_eq!(d.isr_status(), 1);
    assert!(!d.transport.irqs().pending(0, 0));
}

#[test]
fn msix_no_vector_and_bad_vectors() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    d.set_msix_enable(true);
    d.negotiate(ALL & !VIRTIO_RING_F_EVENT_IDX);
    d.common_write(cc::MSIX_CONFIG, 2, 77);
    assert_eq!(d.common_read(cc::MSIX_CONFIG, 2), 0xffff);
    d.common_write(cc::MSIX_CONFIG, 2, 1);
    assert_eq!(d.common_read(cc::MSIX_CONFIG, 2), 1);
    d.setup_queues(16);
    d.common_write(cc::QUEUE_SELECT, 2, 0);
    assert_eq!(d.common_read(cc::QUEUE_MSIX_VECTOR, 2), 1);
    d.common_write(cc::QUEUE_MSIX_VECTOR, 2, 2);
    assert_eq!(d.common_read(cc::QUEUE_MSIX_VECTOR, 2), 0xffff);
    // No vector: no interrupt at all.
    assert_eq!(write_sectors(&mut d, 0, 0, &[1u8; 512]), VIRTIO_BLK_S_OK);
    assert!(d.msix.iter_mut().all(|e| !e.fired()));
    assert!(!d.intx.fired());
    // The MSI-X table and PBA are readable in BAR 0.
    let ctl = d.region_read(0, 0x4000 + 12, 4);
    assert_eq!(ctl & 1, 1, "vectors start masked");
    d.region_write(0, 0x4000 + 12, 4, 0);
    assert_eq!(d.region_read(0, 0x4000 + 12, 4), 0);
    assert_eq!(d.region_read(0, 0x6000, 8), 0);
}

#[test]
fn multiqueue() {
    let disk = memdisk();
    let mut d = driver(
        disk.clone(),
        VirtioBlkConfig {
            num_queues: 3,
            queue_size: 32,
            ..Default::default()
        },
    );
    let f = d.init(ALL & !VIRTIO_RING_F_EVENT_IDX, 32);
    assert_ne!(f & VIRTIO_BLK_F_MQ, 0);
    assert_eq!(d.queues.len(), 3);
    for q in 0..3 {
        let data = vec![q as u8 + 1; 512];
        assert_eq!(write_sectors(&mut d, q, q as u64, &data), VIRTIO_BLK_S_OK);
        for (v, e) in d.msix.iter_mut().enumerate() {
            assert_eq!(e.fired(), v == q + 1, "queue {q} vector {v}");
        }
    }
    for q in 0..3u8 {
        assert_eq!(
            read_sectors(&mut d, 2 - q as usize, u64::from(q), 512).1,
            vec![q + 1; 512]
        );
    }
}

#[test]
fn feature_negotiation() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    d.set_status(ACKNOWLEDGE | DRIVER);
    // Unoffered bits are dropped.
    d.write_driver_features(VIRTIO_F_VERSION_1 | (1 << 63) | (1 << 20));
    assert_eq!(d.driver_features(), VIRTIO_F_VERSION_1);
    // Without VERSION_1 FEATURES_OK does not stick.
    d.write_driver_features(VIRTIO_BLK_F_FLUSH);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(d.status() & FEATURES_OK, 0);
    d.write_driver_features(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(d.status() & FEATURES_OK, 0);
    // Frozen after FEATURES_OK.
    d.write_driver_features(VIRTIO_F_VERSION_1);
    assert_eq!(d.driver_features(), VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH);
    // Feature select beyond 1 reads zero.
    d.common_write(cc::DEVICE_FEATURE_SELECT, 4, 2);
    assert_eq!(d.common_read(cc::DEVICE_FEATURE, 4), 0);
    // Read-only fields ignore writes.
    d.common_write(cc::NUM_QUEUES, 2, 9);
    assert_eq!(d.common_read(cc::NUM_QUEUES, 2), 1);
    // DRIVER_OK without queues set up is harmless; a notify then is too.
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    let (bar, notify) = (d.notify.bar, d.notify.offset);
    d.region_write(bar, notify, 2, 0);
    assert_ne!(d.status() & DRIVER_OK, 0);
}

#[test]
fn queue_config_rules() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    d.negotiate(ALL);
    d.common_write(cc::QUEUE_SELECT, 2, 0);
    assert_eq!(d.common_read(cc::QUEUE_SIZE, 2), 256);
    d.common_write(cc::QUEUE_SIZE, 2, 100);
    assert_eq!(d.common_read(cc::QUEUE_SIZE, 2), 256, "not a power of two");
    d.common_write(cc::QUEUE_SIZE, 2, 512);
    assert_eq!(d.common_read(cc::QUEUE_SIZE, 2), 256, "above the maximum");
    d.common_write(cc::QUEUE_SIZE, 2, 64);
    assert_eq!(d.common_read(cc::QUEUE_SIZE, 2), 64);
    // Misaligned descriptor table ignored; 64-bit address in two halves.
    d.common_write(cc::QUEUE_DESC_LO, 4, 0x1008);
    assert_eq!(d.common_read(cc::QUEUE_DESC_LO, 4), 0);
    d.common_write(cc::QUEUE_DESC_LO, 4, 0x1000);
    d.common_write(cc::QUEUE_DESC_HI, 4, 0x1);
    assert_eq!(d.common_read(cc::QUEUE_DESC_LO, 8), 0x1_0000_1000);
    // One 8-byte access works too.
    d.common_write(cc::QUEUE_USED_LO, 8, 0x2_0000_2000);
    assert_eq!(d.common_read(cc::QUEUE_USED_LO, 8), 0x2_0000_2000);
    d.common_write(cc::QUEUE_ENABLE, 2, 1);
    assert_eq!(d.common_read(cc::QUEUE_ENABLE, 2), 1);
    // Enabled queues are frozen.
    d.common_write(cc::QUEUE_SIZE, 2, 32);
    assert_eq!(d.common_read(cc::QUEUE_SIZE, 2), 64);
    d.common_write(cc::QUEUE_ENABLE, 2, 0);
    assert_eq!(d.common_read(cc::QUEUE_ENABLE, 2), 1);
    // Accesses straddling the end of the structure are ignored.
    assert_eq!(d.common_read(0x36, 4), 0);
    d.common_write(0x36, 4, u64::MAX);
}

#[test]
fn device_reset_through_status_zero() {
    let disk = memdisk();
    let mut d = ready(disk.clone());
    assert_eq!(write_sectors(&mut d, 0, 0, &[1u8; 512]), VIRTIO_BLK_S_OK);
    assert_eq!(write_sectors(&mut d, 0, 1, &[2u8; 512]), VIRTIO_BLK_S_OK);
    d.set_status(0);
    assert_eq!(d.status(), 0);
    assert_eq!(d.driver_features(), 0);
    d.common_write(cc::QUEUE_SELECT, 2, 0);
    assert_eq!(d.common_read(cc::QUEUE_ENABLE, 2), 0);
    assert_eq!(d.common_read(cc::QUEUE_SIZE, 2), 256);
    assert_eq!(d.common_read(cc::QUEUE_MSIX_VECTOR, 2), 0xffff);
    assert_eq!(d.common_read(cc::QUEUE_DESC_LO, 8), 0);
    assert_eq!(d.common_read(cc::MSIX_CONFIG, 2), 0xffff);
    // Kicks on a reset device do nothing.
    let used = d.used_idx(0);
    let h = d.blk_header(VIRTIO_BLK_T_FLUSH, 0);
    let s = d.blk_status_buffer();
    submit(&mut d, 0, &[Desc::readable(h, 16), Desc::writable(s, 1)]);
    assert_eq!(d.used_idx(0), used);
    // Bring it up again from scratch (new rings): indices restart at 0.
    d.negotiate(ALL & !VIRTIO_RING_F_EVENT_IDX);
    d.set_config_vector(0);
    d.setup_queues(16);
    assert_eq!(d.used_idx(0), 0);
    assert_eq!(
        read_sectors(&mut d, 0, 1, 512),
        (VIRTIO_BLK_S_OK, vec![2; 512])
    );
    assert!(d.msix[1].fired());
}

#[test]
fn full_reset_through_adapter() {
    let mut d = ready(memdisk());
    assert_eq!(write_sectors(&mut d, 0, 0, &[1u8; 512]), VIRTIO_BLK_S_OK);
    d.transport.reset_device();
    assert_eq!(d.status(), 0);
    // Config space back to power-on: MSI-X disabled.
    let msix = d.find_cap(PCI_CAP_ID_MSIX).unwrap();
    assert_eq!(d.cfg_read(msix + 2, 2) & 0x8000, 0);
    d.transport
        .device()
        .lifecycle()
        .reset(ResetReason::LostConnection);
    // The command register too: bus mastering is off until the driver
    // turns it on again (`init`).
    assert_eq!(d.cfg_read(4, 2) & 0x4, 0);
    d.init(ALL & !VIRTIO_RING_F_EVENT_IDX, 16);
    assert_eq!(
        read_sectors(&mut d, 0, 0, 512),
        (VIRTIO_BLK_S_OK, vec![1; 512])
    );
    assert!(d.msix[1].fired());
}

#[test]
fn pci_cfg_access_capability() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    let cap = d.virtio_cap(VIRTIO_PCI_CAP_PCI_CFG).unwrap().offset;
    // Read num_queues (2 bytes at common + 0x12) through the window.
    d.cfg_write(cap + 4, 1, 0);
    d.cfg_write(cap + 8, 4, 0x12);
    d.cfg_write(cap + 12, 4, 2);
    assert_eq!(d.cfg_read(cap + 16, 4), 1);
    // Write the status through the window.
    d.cfg_write(cap + 8, 4, 0x14);
    d.cfg_write(cap + 12, 4, 1);
    d.cfg_write(cap + 16, 4, u64::from(ACKNOWLEDGE));
    assert_eq!(d.status(), ACKNOWLEDGE);
    // Capacity through the window.
    d.cfg_write(cap + 8, 4, 0x2000);
    d.cfg_write(cap + 12, 4, 4);
    assert_eq!(d.cfg_read(cap + 16, 4), DISK_SIZE / 512);
    // Bad window (other BAR, bad length, misaligned): plain register.
    d.cfg_write(cap + 4, 1, 2);
    d.cfg_write(cap + 16, 4, 0x1234);
    assert_eq!(d.cfg_read(cap + 16, 4), 0x1234);
    d.cfg_write(cap + 4, 1, 0);
    d.cfg_write(cap + 12, 4, 3);
    d.cfg_write(cap + 16, 4, 0);
    d.cfg_write(cap + 8, 4, 0x13);
    d.cfg_write(cap + 12, 4, 2);
    d.cfg_write(cap + 16, 4, 0xff);
    assert_eq!(d.status(), ACKNOWLEDGE);
}

#[test]
fn pause_defers_and_resume_processes() {
    let disk = memdisk();
    let mut d = ready(disk.clone());
    assert!(d.transport.device().lifecycle().migratable());
    d.transport.device().lifecycle().pause().unwrap();
    let buf = d.ram.alloc(512, 16);
    d.ram.write(buf, &[6u8; 512]);
    let req = d.blk_submit_descs(0, VIRTIO_BLK_T_OUT, 2, &[Desc::readable(buf, 512)]);
    d.kick(0);
    assert!(d.poll_used(0).is_empty());
    assert!(disk.contents()[1024..1536].iter().all(|b| *b == 0));
    d.transport.device().lifecycle().resume().unwrap();
    // Resuming only marks the queues; the work runs as deferred work,
    // which the next access lets run.
    assert!(d.poll_used(0).is_empty());
    d.settle();
    assert_eq!(d.wait_used(0, 1), [(req.head, 1)]);
    assert_eq!(d.take_result(0, req.head).0, VIRTIO_BLK_S_OK);
    assert!(d.msix[1].fired());
    assert_eq!(&disk.contents()[1024..1536], &[6u8; 512]);
}

/// With bus mastering taken away (a kernel handing over to another with
/// kexec clears it) the device takes nothing off its rings: they may be
/// memory the guest uses for something else by then. Once it is on again
/// the device serves the next doorbell.
#[test]
fn off_the_bus_takes_nothing() {
    let disk = memdisk();
    let mut d = ready(disk.clone());
    d.set_bus_master(false);
    let buf = d.ram.alloc(512, 16);
    d.ram.write(buf, &[8u8; 512]);
    let req = d.blk_submit_descs(0, VIRTIO_BLK_T_OUT, 3, &[Desc::readable(buf, 512)]);
    d.kick(0);
    d.settle();
    assert!(d.poll_used(0).is_empty());
    assert!(disk.contents()[1536..2048].iter().all(|b| *b == 0));
    assert!(!d.msix[1].fired());
    // On again (a new kernel does that before it resets the device):
    // still nothing, until the driver rings.
    d.set_bus_master(true);
    d.settle();
    assert!(d.poll_used(0).is_empty());
    d.kick(0);
    d.settle();
    assert_eq!(d.wait_used(0, 1), [(req.head, 1)]);
    assert_eq!(d.take_result(0, req.head).0, VIRTIO_BLK_S_OK);
    assert_eq!(&disk.contents()[1536..2048], &[8u8; 512]);
}

#[test]
fn snapshot_restore() {
    let disk = memdisk();
    let mut d = driver(disk.clone(), VirtioBlkConfig::default());
    let f = d.init(ALL, 16);
    for i in 0..5 {
        assert_eq!(
            write_sectors(&mut d, 0, i, &[i as u8; 512]),
            VIRTIO_BLK_S_OK
        );
    }
    d.transport.device().lifecycle().pause().unwrap();
    let snap = d.transport.device().lifecycle().snapshot().unwrap();

    // A new device, as on a migration target, restored from the snapshot;
    // the driver gives it the same guest memory and MSI-X eventfds and
    // carries on with it. Only what the new device signals counts below.
    let mut target = device(disk.clone(), VirtioBlkConfig::default());
    target.device().lifecycle().pause().unwrap();
    target.device().lifecycle().restore(&snap).unwrap();
    target.device().lifecycle().resume().unwrap();
    for irq in &mut d.msix {
        irq.take();
    }
    let _source = d.reconnect(target);
    assert_eq!(d.status() & DRIVER_OK, DRIVER_OK);
    assert_eq!(d.driver_features(), f);
    let msix = d.find_cap(PCI_CAP_ID_MSIX).unwrap();
    assert_eq!(d.cfg_read(msix + 2, 2) & 0x8000, 0x8000);
    d.common_write(cc::QUEUE_SELECT, 2, 0);
    assert_eq!(d.common_read(cc::QUEUE_SIZE, 2), 16);
    assert_eq!(d.common_read(cc::QUEUE_MSIX_VECTOR, 2), 1);
    // The ring continues where it left off, event index included.
    let used_event = d.queues[0].used_event_addr();
    d.ram.write_u16(used_event, 5);
    assert_eq!(
        read_sectors(&mut d, 0, 3, 512),
        (VIRTIO_BLK_S_OK, vec![3; 512])
    );
    assert_eq!(d.used_idx(0), 6);
    assert!(d.msix[1].fired());

    // Mismatched snapshots are refused.
    let mut other = device(
        memdisk(),
        VirtioBlkConfig {
            num_queues: 2,
            ..Default::default()
        },
    );
    assert!(other.device().lifecycle().restore(&snap).is_err());
    let mut bad = snap.clone();
    bad.snapshot_data = None;
    assert!(d.transport.device().lifecycle().restore(&bad).is_err());
}

#[test]
fn garbage_transport_accesses() {
    let mut d = ready(memdisk());
    // Reads and writes all over the BAR, of every size, never panic; made
    // on the device directly, as no server would let them through.
    let dev = d.transport.device();
    for off in (0..0x8000u64).step_by(0x3f) {
        for len in [1usize, 2, 3, 4, 8] {
            let mut b = vec![0u8; len];
            let _ = dev.region_read(0, off, &mut b);
            // Avoid resetting the device and kicking with garbage status.
            if !(0x14..0x16).contains(&off) {
                let _ = dev.region_write(0, off, &b);
            }
        }
    }
    for off in (0..4096u64).step_by(7) {
        let mut b = [0u8; 4];
        let _ = dev.region_read(PCI_CONFIG_REGION_INDEX, off, &mut b);
    }
    // Direct PciDevice calls with a foreign BAR base are ignored.
    let dev = blk(&mut d);
    let mut b = [0xffu8; 4];
    dev.read_bar(0, 0x14, &mut b);
    assert_eq!(b, [0; 4]);
    dev.write_bar(0, 0x14, &[0]);
    assert_ne!(dev.status(), 0);
}

#[test]
fn doorbell_defers_the_work_and_run_deferred_is_bounded() {
    let disk = memdisk();
    let mut d = driver(disk.clone(), VirtioBlkConfig::default());
    d.init(ALL & !VIRTIO_RING_F_EVENT_IDX, 128);
    let mut heads = Vec::new();
    for i in 0..40u64 {
        let buf = d.ram.alloc(512, 16);
        d.ram.write(buf, &[i as u8 + 1; 512]);
        let h = d.blk_header(VIRTIO_BLK_T_OUT, i);
        let s = d.blk_status_buffer();
        let chain = [
            Desc::readable(h, 16),
            Desc::readable(buf, 512),
            Desc::writable(s, 1),
        ];
        heads.push(d.push(0, &chain));
    }
    // The doorbell itself does nothing but mark the queue. It is written
    // to the device directly, so that nothing runs after it.
    let (bar, notify) = d.notify_register(0);
    d.transport
        .device()
        .region_write(bar, notify, &0u16.to_le_bytes())
        .unwrap();
    assert_eq!(d.used_idx(0), 0);
    assert!(disk.contents()[..40 * 512].iter().all(|b| *b == 0));
    // Each call does a bounded batch, interrupting after each, and says
    // whether work is left.
    let mut calls = 0;
    while d.transport.device().lifecycle().run_deferred() {
        calls += 1;
        assert!(d.msix[1].fired(), "no interrupt after a batch");
        assert!(calls < 10, "run_deferred never finishes");
    }
    assert!(calls >= 2, "40 requests in {calls} bounded calls");
    assert_eq!(d.used_idx(0), 40);
    let want: Vec<(u16, u32)> = heads.iter().map(|&head| (head, 1)).collect();
    assert_eq!(d.poll_used(0), want);
    for i in 0..40 {
        assert_eq!(
            &disk.contents()[i * 512..(i + 1) * 512],
            &[i as u8 + 1; 512]
        );
    }
    // Idle again: no work, and the driver may ring again.
    assert!(!d.transport.device().lifecycle().run_deferred());
    assert_eq!(
        d.ram.read_u16(d.queues[0].used) & VIRTQ_USED_F_NO_NOTIFY,
        0,
        "VRING_USED_F_NO_NOTIFY left set"
    );
}

/// A disk whose reads wait while `held` is set.
struct HeldDisk {
    inner: MemoryDisk,
    held: AtomicBool,
}

impl BlockBackend for HeldDisk {
    integration_tests::forward_to_inner_disk!();
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        while self.held.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.inner.read_at(buf, offset)
    }
    fn id(&self) -> String {
        "held".into()
    }
}

/// Lets a [`HeldDisk`]'s reads go when dropped.
struct Release(Arc<HeldDisk>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.held.store(false, Ordering::SeqCst);
    }
}

#[test]
fn reposted_heads_do_not_grow_the_requests_in_flight() {
    let disk = Arc::new(HeldDisk {
        inner: MemoryDisk::new(DISK_SIZE).unwrap(),
        held: AtomicBool::new(true),
    });
    let config = VirtioBlkConfig {
        aio: Aio::Threads(1),
        ..Default::default()
    };
    let mut d = connect(disk.clone(), config);
    // Declared after `d`, so dropped before it: a failing assertion lets
    // the reads go instead of hanging in the I/O threads' drain.
    let _release = Release(disk.clone());
    d.init(ALL & !VIRTIO_RING_F_EVENT_IDX, 16);
    // One read chain, made available 32 times over, twice the queue size (a
    // driver may not do that; a hostile one can, up to a ring's worth
    // beyond what the device took). The doorbells go to the device
    // directly, and its deferred work is run by hand, so that nothing
    // waits for the held reads.
    let buf = d.ram.alloc(512, 16);
    let h = d.blk_header(VIRTIO_BLK_T_IN, 0);
    let s = d.blk_status_buffer();
    let chain = [
        Desc::readable(h, 16),
        Desc::writable(buf, 512),
        Desc::writable(s, 1),
    ];
    let head = d.place_chain(0, &chain);
    let (bar, notify) = d.notify_register(0);
    for _ in 0..32 {
        d.publish(0, head);
        let dev = d.transport.device();
        dev.region_write(bar, notify, &0u16.to_le_bytes()).unwrap();
        while dev.lifecycle().run_deferred() {}
        assert!(blk(&mut d).device().in_flight() <= 16);
    }
    assert_eq!(blk(&mut d).device().in_flight(), 16);
    // Let them complete: the device takes the rest as room frees up.
    disk.held.store(false, Ordering::SeqCst);
    d.wait_used_idx(0, 32);
    assert_eq!(d.used_idx(0), 32);
    assert_eq!(blk(&mut d).device().in_flight(), 0);
}

/// What the image holds before the tests write to it.
fn image_pattern() -> Vec<u8> {
    pattern(DISK_SIZE as usize, 11)
}

/// A raw image holding [`image_pattern`], behind a [`FaultyDisk`].
/// A device whose image failed a flush is saved with it: the device that
/// goes on from the snapshot (on the same image, as after an upgrade or a
/// migration) fails every flush too, where a new `fdatasync` of the file
/// would succeed with the lost writes gone.
#[test]
fn a_failed_flush_travels_with_the_device() {
    let tmp = TempFile::new().unwrap();
    tmp.as_file().write_all_at(&image_pattern(), 0).unwrap();
    let open = || Arc::new(RawFile::open(tmp.as_path(), RawFileOptions::default()).unwrap());
    let image = open();
    let mut d = connect(image.clone(), VirtioBlkConfig::default());
    d.init(ALL, 16);
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_FLUSH, 0, &[]).0,
        VIRTIO_BLK_S_OK
    );
    // As the ring reports an `fdatasync` that failed.
    image.flush_failed(&std::io::Error::from_raw_os_error(libc::EIO));
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_FLUSH, 0, &[]).0,
        VIRTIO_BLK_S_IOERR
    );
    d.transport.device().lifecycle().pause().unwrap();
    let snap = d.transport.device().lifecycle().snapshot().unwrap();

    let fresh = open();
    let mut target = device(fresh.clone(), VirtioBlkConfig::default());
    target.device().lifecycle().pause().unwrap();
    target.device().lifecycle().restore(&snap).unwrap();
    target.device().lifecycle().resume().unwrap();
    let _source = d.reconnect(target);
    assert!(fresh.writeback_lost());
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_FLUSH, 0, &[]).0,
        VIRTIO_BLK_S_IOERR
    );
    // Reads and writes go on.
    assert_eq!(write_sectors(&mut d, 0, 8, &[7; 512]), VIRTIO_BLK_S_OK);
    assert_eq!(
        read_sectors(&mut d, 0, 8, 512),
        (VIRTIO_BLK_S_OK, vec![7; 512])
    );
}

fn faulty_disk() -> (Arc<FaultyDisk<RawFile>>, TempFile) {
    let tmp = TempFile::new().unwrap();
    tmp.as_file().write_all_at(&image_pattern(), 0).unwrap();
    let file = RawFile::open(tmp.as_path(), RawFileOptions::default()).unwrap();
    (Arc::new(FaultyDisk::new(file)), tmp)
}

/// A driver of a device over `disk` with `on_error` (on the I/O threads
/// of the `on_io_threads` re-runs), its queue of 16 set up.
fn faulty_driver(disk: &Arc<FaultyDisk<RawFile>>, on_error: ErrorPolicy) -> Driver {
    let config = VirtioBlkConfig {
        on_error,
        aio: aio(),
        ..Default::default()
    };
    let mut d = connect(disk.clone(), config);
    d.init(ALL & !VIRTIO_RING_F_EVENT_IDX, 16);
    d
}

fn image_at(tmp: &TempFile, sector: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    tmp.as_file().read_exact_at(&mut b, sector * 512).unwrap();
    b
}

/// Why the device stopped, as the server would learn it.
fn stopped_on_error(d: &mut Driver) -> Option<String> {
    d.transport.device().lifecycle().stopped_on_error()
}

/// Lets the device work until it is stopped on an error with `kept`
/// requests kept and nothing on its I/O threads; returns why it stopped.
#[track_caller]
fn wait_stopped(d: &mut Driver, kept: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        d.settle();
        let dev = blk(d).device();
        let (now_kept, in_flight) = (dev.kept(), dev.in_flight());
        if let Some(why) = stopped_on_error(d) {
            if now_kept == kept && in_flight == 0 {
                return why;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not stopped with {kept} kept: {:?}, {now_kept} kept, {in_flight} in flight",
            stopped_on_error(d)
        );
        d.transport.wait(&[], Duration::from_millis(1));
    }
}

/// Resumes the device (as the control socket does: the server's resume
/// reaches the device's lifecycle) and lets it retry.
fn resume(d: &mut Driver) {
    d.transport.device().lifecycle().resume().unwrap();
    d.settle();
}

/// Queues a write of `data` at `sector` on queue 0 without kicking.
fn queue_write(d: &mut Driver, sector: u64, data: &[u8]) -> BlkReq {
    d.blk_submit_req(0, VIRTIO_BLK_T_OUT, sector, data, 0)
}

#[test]
fn storage_errors_are_reported_by_default() {
    let (disk, tmp) = faulty_disk();
    let mut d = faulty_driver(&disk, ErrorPolicy::Report);
    let original = image_pattern();
    // EIO on writes to sectors 8-15, until the storage is fixed.
    disk.fail(Call::Write, 8, 8, libc::EIO, None);
    let data = pattern(4096, 1);
    assert_eq!(write_sectors(&mut d, 0, 8, &data), VIRTIO_BLK_S_IOERR);
    assert_eq!(image_at(&tmp, 8, 4096), original[8 * 512..][..4096]);
    // The device goes on: the next request, elsewhere, succeeds.
    assert_eq!(write_sectors(&mut d, 0, 40, &data), VIRTIO_BLK_S_OK);
    assert_eq!(image_at(&tmp, 40, 4096), data);
    // Every failing request fails, each on its own.
    assert_eq!(write_sectors(&mut d, 0, 12, &data), VIRTIO_BLK_S_IOERR);
    assert_eq!(disk.failed(), 2);

    // EIO on a read, once: IOERR, then the same read succeeds.
    disk.fail(Call::Read, 100, 1, libc::EIO, Some(1));
    let (status, _) = read_sectors(&mut d, 0, 96, 4096);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        read_sectors(&mut d, 0, 96, 4096),
        (VIRTIO_BLK_S_OK, original[96 * 512..][..4096].to_vec())
    );

    // A failed flush, and a failed write-zeroes.
    disk.fail(Call::Flush, 0, 0, libc::EIO, Some(1));
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_FLUSH, 0, &[]).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_FLUSH, 0, &[]).0,
        VIRTIO_BLK_S_OK
    );
    disk.fail(Call::WriteZeroes, 200, 8, libc::ENOSPC, Some(1));
    let seg = dwz(&mut d, &[(200, 8, 0)]);
    assert_eq!(
        segments_request(&mut d, VIRTIO_BLK_T_WRITE_ZEROES, seg, 16),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(image_at(&tmp, 200, 4096), original[200 * 512..][..4096]);

    disk.clear();
    assert_eq!(write_sectors(&mut d, 0, 8, &data), VIRTIO_BLK_S_OK);
    assert_eq!(image_at(&tmp, 8, 4096), data);
    assert_eq!(stopped_on_error(&mut d), None);
    assert_eq!(blk(&mut d).device().kept(), 0);
}

#[test]
fn storage_errors_stop_the_device_until_resumed() {
    let (disk, tmp) = faulty_disk();
    let mut d = faulty_driver(&disk, ErrorPolicy::Stop);
    let original = image_pattern();
    // A request the guest got wrong still fails at once: no stop.
    let (status, _) = read_sectors(&mut d, 0, DISK_SIZE / 512, 512);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    assert_eq!(stopped_on_error(&mut d), None);

    // Three writes in one batch; the storage is full where the second goes.
    disk.fail(Call::Write, 8, 8, libc::ENOSPC, None);
    let (a, b, c) = (pattern(4096, 1), pattern(4096, 2), pattern(4096, 3));
    let wa = queue_write(&mut d, 100, &a);
    let wb = queue_write(&mut d, 8, &b);
    let wc = queue_write(&mut d, 120, &c);
    d.kick(0);
    let why = wait_stopped(&mut d, 1);
    assert!(
        why.starts_with("write of 4096 bytes at 0x1000: ") && why.contains("No space left"),
        "{why}"
    );
    // The failed write is neither completed nor written: its status byte
    // is untouched. The one before it completed; the one after it either
    // completed (on I/O threads, started with the batch) or waits on the
    // ring (taken one at a time, or, on the io_uring, where a request the
    // ring cannot run fails as it starts: the device stopped before it).
    let done: Vec<u16> = d.poll_used(0).iter().map(|u| u.0).collect();
    assert!(
        done.contains(&wa.head) && !done.contains(&wb.head),
        "{done:?}"
    );
    assert_eq!(d.ram.read_u8(wb.status), 0xff);
    assert_eq!(image_at(&tmp, 8, 4096), original[8 * 512..][..4096]);
    assert_eq!(image_at(&tmp, 100, 4096), a);
    let on_threads = matches!(aio(), Aio::Threads(_));
    assert_eq!(done.contains(&wc.head), on_threads, "{done:?}");

    // Nothing more is taken off the ring while stopped.
    let wd = queue_write(&mut d, 140, &pattern(4096, 4));
    d.kick(0);
    d.settle();
    assert!(d.poll_used(0).is_empty());
    assert_eq!(image_at(&tmp, 140, 4096), original[140 * 512..][..4096]);

    // Resumed before the storage is fixed: the retry fails, and stops it
    // again. (On I/O threads the ring goes on while the retry runs, so the
    // write behind it may be done by then.)
    resume(&mut d);
    wait_stopped(&mut d, 1);
    let more: Vec<u16> = d.poll_used(0).iter().map(|u| u.0).collect();
    assert!(
        more.is_empty() || (on_threads && more == [wd.head]),
        "{more:?}"
    );
    assert_eq!(d.ram.read_u8(wb.status), 0xff);
    assert_eq!(disk.failed(), 2);

    // Fixed, then resumed: the kept write goes first, then the ring.
    disk.clear();
    resume(&mut d);
    let deadline = Instant::now() + Duration::from_secs(10);
    while [&wb, &wc, &wd]
        .iter()
        .any(|r| d.ram.read_u8(r.status) == 0xff)
    {
        assert!(Instant::now() < deadline, "the kept write never completed");
        d.transport.wait(&[], Duration::from_millis(1));
    }
    d.poll_used(0);
    for req in [&wa, &wb, &wc, &wd] {
        assert_eq!(d.take_result(0, req.head).0, VIRTIO_BLK_S_OK);
    }
    assert_eq!(image_at(&tmp, 8, 4096), b);
    assert_eq!(image_at(&tmp, 120, 4096), c);
    assert_eq!(image_at(&tmp, 140, 4096), pattern(4096, 4));
    assert_eq!(stopped_on_error(&mut d), None);
    assert!(d.poll_used(0).is_empty());

    // EIO on a read, once: kept, then read again with the right bytes.
    disk.fail(Call::Read, 300, 8, libc::EIO, Some(1));
    let r = d.blk_submit_req(0, VIRTIO_BLK_T_IN, 300, &[], 4096);
    d.kick(0);
    let why = wait_stopped(&mut d, 1);
    assert!(why.starts_with("read of 4096 bytes at 0x25800: "), "{why}");
    assert!(why.contains("Input/output error"), "{why}");
    assert!(d.poll_used(0).is_empty());
    resume(&mut d);
    assert_eq!(
        d.blk_complete(0, r.head),
        (VIRTIO_BLK_S_OK, original[300 * 512..][..4096].to_vec())
    );

    // A flush, and a write-zeroes (done on the event loop in both modes).
    disk.fail(Call::Flush, 0, 0, libc::EIO, Some(1));
    let f = d.blk_submit_req(0, VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    d.kick(0);
    assert!(wait_stopped(&mut d, 1).starts_with("flush: "));
    resume(&mut d);
    assert_eq!(d.blk_complete(0, f.head).0, VIRTIO_BLK_S_OK);
    disk.fail(Call::WriteZeroes, 200, 8, libc::ENOSPC, Some(1));
    let seg = dwz(&mut d, &[(200, 8, 0)]);
    let z = d.blk_submit_descs(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[Desc::readable(seg, 16)]);
    d.kick(0);
    assert!(wait_stopped(&mut d, 1).starts_with("write-zeroes of 4096 bytes at 0x19000: "));
    assert_eq!(image_at(&tmp, 200, 4096), original[200 * 512..][..4096]);
    resume(&mut d);
    assert_eq!(d.blk_complete(0, z.head).0, VIRTIO_BLK_S_OK);
    assert_eq!(image_at(&tmp, 200, 4096), vec![0u8; 4096]);
    assert_eq!(stopped_on_error(&mut d), None);
    assert_eq!(disk.failed(), 5);
}

#[test]
fn a_stopped_device_is_snapshotted_with_its_kept_requests() {
    let (disk, tmp) = faulty_disk();
    let mut d = faulty_driver(&disk, ErrorPolicy::Stop);
    // A snapshot of a device that runs has no state of the device's own.
    d.transport.device().lifecycle().pause().unwrap();
    let snap = d.transport.device().lifecycle().snapshot().unwrap();
    assert!(snap.snapshots.is_empty(), "{snap:?}");
    d.transport.device().lifecycle().resume().unwrap();

    disk.fail(Call::Write, 8, 8, libc::ENOSPC, None);
    let data = pattern(4096, 9);
    let w = queue_write(&mut d, 8, &data);
    d.kick(0);
    wait_stopped(&mut d, 1);
    d.transport.device().lifecycle().pause().unwrap();
    let snap = d.transport.device().lifecycle().snapshot().unwrap();
    assert_eq!(snap.snapshots.len(), 1, "{snap:?}");

    // The target finds room on the same image (the storage was fixed
    // meanwhile): restored, it is stopped on the same error until it runs,
    // then retries the kept write.
    disk.clear();
    let config = VirtioBlkConfig {
        on_error: ErrorPolicy::Stop,
        aio: aio(),
        ..Default::default()
    };
    let mut target = device(disk.clone(), config);
    target.device().lifecycle().pause().unwrap();
    target.device().lifecycle().restore(&snap).unwrap();
    let why = target.device().lifecycle().stopped_on_error();
    assert!(why.is_some_and(|w| w.contains("No space left")));
    target.device().lifecycle().resume().unwrap();
    for irq in &mut d.msix {
        irq.take();
    }
    let _source = d.reconnect(target);
    assert_eq!(d.blk_complete(0, w.head).0, VIRTIO_BLK_S_OK);
    assert_eq!(image_at(&tmp, 8, 4096), data);
    assert_eq!(stopped_on_error(&mut d), None);
    assert!(d.msix[1].fired());
    // And it goes on with the ring.
    assert_eq!(write_sectors(&mut d, 0, 16, &data), VIRTIO_BLK_S_OK);

    // A device with fewer queues than the kept requests name refuses it.
    let mut bad = snap.clone();
    let state = bad.snapshots.values_mut().next().unwrap();
    let data = state.snapshot_data.as_mut().unwrap();
    data.state = data.state.replace("\"queue\":0", "\"queue\":5");
    let mut other = device(disk.clone(), VirtioBlkConfig::default());
    other.device().lifecycle().pause().unwrap();
    let e = other.device().lifecycle().restore(&bad).unwrap_err();
    assert!(e.to_string().contains("queue 5"), "{e}");
}

#[test]
fn a_reset_forgets_the_kept_requests() {
    let (disk, tmp) = faulty_disk();
    let mut d = faulty_driver(&disk, ErrorPolicy::Stop);
    disk.fail(Call::Write, 8, 8, libc::EIO, None);
    queue_write(&mut d, 8, &pattern(4096, 5));
    d.kick(0);
    wait_stopped(&mut d, 1);
    // The driver resets the device: nobody waits for the kept write.
    d.set_status(0);
    assert_eq!(stopped_on_error(&mut d), None);
    assert_eq!(blk(&mut d).device().kept(), 0);
    disk.clear();
    d.init(ALL & !VIRTIO_RING_F_EVENT_IDX, 16);
    let data = pattern(4096, 6);
    assert_eq!(write_sectors(&mut d, 0, 8, &data), VIRTIO_BLK_S_OK);
    assert_eq!(image_at(&tmp, 8, 4096), data);
    // Nor does a resume bring it back.
    resume(&mut d);
    assert!(d.poll_used(0).is_empty());
}

/// The modes `--aio` offers that work here.
fn every_aio() -> Vec<Aio> {
    let mut modes = vec![Aio::Sync, Aio::Threads(2)];
    match backends::block_io::io_uring_support() {
        Ok(()) => modes.push(Aio::IoUring),
        Err(why) => eprintln!("SKIP io_uring: {why}"),
    }
    modes
}

#[test]
fn direct_io_with_aligned_and_misaligned_guest_buffers() {
    for aio in every_aio() {
        let tmp = TempFile::new().unwrap();
        tmp.as_file().write_all_at(&image_pattern(), 0).unwrap();
        let options = RawFileOptions {
            direct: true,
            ..Default::default()
        };
        let file = match RawFile::open(tmp.as_path(), options) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                eprintln!("SKIP O_DIRECT: {e}");
                return;
            }
        };
        let (align, mem_align) = file.direct_alignment().unwrap();
        let config = VirtioBlkConfig {
            aio,
            ..Default::default()
        };
        let mut d = connect(file.clone(), config);
        d.init(ALL & !VIRTIO_RING_F_EVENT_IDX, 16);
        assert_eq!(blk(&mut d).device().aio(), aio);

        // Page-aligned guest buffers (what an O_DIRECT guest sends): straight
        // between guest memory and the image, nothing bounced.
        let data = pattern(3 * 4096, 21);
        let (p0, p1) = (d.ram.alloc(8192, 4096), d.ram.alloc(4096, 4096));
        d.ram.write(p0, &data[..8192]);
        d.ram.write(p1, &data[8192..]);
        let two = [Desc::readable(p0, 8192), Desc::readable(p1, 4096)];
        assert_eq!(
            request(&mut d, 0, VIRTIO_BLK_T_OUT, 64, &two).0,
            VIRTIO_BLK_S_OK,
            "{aio}"
        );
        assert_eq!(image_at(&tmp, 64, data.len()), data, "{aio}");
        let (q0, q1) = (d.ram.alloc(4096, 4096), d.ram.alloc(8192, 4096));
        let back = [Desc::writable(q0, 4096), Desc::writable(q1, 8192)];
        assert_eq!(
            request(&mut d, 0, VIRTIO_BLK_T_IN, 64, &back).0,
            VIRTIO_BLK_S_OK,
            "{aio}"
        );
        assert_eq!([d.ram.read(q0, 4096), d.ram.read(q1, 8192)].concat(), data);
        assert_eq!(file.bounced_bytes(), 0, "{aio}");

        // Guest buffers off their alignment (a byte off a page): only
        // those are bounced, and the bytes are right both ways.
        let data = pattern(2 * 4096, 33);
        let (m0, m1) = (d.ram.alloc(4096 + 1, 4096) + 1, d.ram.alloc(4096, 4096));
        d.ram.write(m0, &data[..4096]);
        d.ram.write(m1, &data[4096..]);
        let mixed = [Desc::readable(m0, 4096), Desc::readable(m1, 4096)];
        assert_eq!(
            request(&mut d, 0, VIRTIO_BLK_T_OUT, 96, &mixed).0,
            VIRTIO_BLK_S_OK,
            "{aio}"
        );
        assert_eq!(image_at(&tmp, 96, data.len()), data, "{aio}");
        let (n0, n1) = (d.ram.alloc(4096 + 3, 4096) + 3, d.ram.alloc(4096, 4096));
        let back = [Desc::writable(n0, 4096), Desc::writable(n1, 4096)];
        assert_eq!(
            request(&mut d, 0, VIRTIO_BLK_T_IN, 96, &back).0,
            VIRTIO_BLK_S_OK,
            "{aio}"
        );
        assert_eq!([d.ram.read(n0, 4096), d.ram.read(n1, 4096)].concat(), data);
        if mem_align > 1 {
            assert_eq!(file.bounced_bytes(), 2 * 4096, "{aio}");
        }

        // A range off the image's alignment (one sector in): read, modified
        // and written back, the bytes around it kept.
        let before = image_at(&tmp, 128, 3 * 4096);
        let one = pattern(4096, 45);
        assert_eq!(
            write_sectors(&mut d, 0, 129, &one),
            VIRTIO_BLK_S_OK,
            "{aio}"
        );
        let after = image_at(&tmp, 128, 3 * 4096);
        assert_eq!(after[..512], before[..512], "{aio}");
        assert_eq!(after[512..512 + 4096], one[..], "{aio}");
        assert_eq!(after[512 + 4096..], before[512 + 4096..], "{aio}");
        let (status, got) = read_sectors(&mut d, 0, 129, 4096);
        assert_eq!((status, got), (VIRTIO_BLK_S_OK, one), "{aio}");
        if align > 512 {
            assert!(file.bounced_bytes() >= 2 * 4096 + 2 * 4096, "{aio}");
        }
    }
}
