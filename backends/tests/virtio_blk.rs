//! virtio-blk over the virtio PCI transport, driven like a guest driver
//! through `PciAdapter` (config space and BAR accesses), with hand-written
//! rings in memfd-backed guest memory.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use backends::storage::{MemoryDisk, RawFile, RawFileOptions};
use backends::virtio_blk::{VirtioBlkConfig, VirtioBlkPci};
use common::*;
use vfio_user_server::device::{AsLifecycle, Device, DeviceContext, ResetReason};
use vfio_user_server::pci::PciDevice;
use vfio_user_server::wire::PCI_CONFIG_REGION_INDEX;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::tempfile::TempFile;

const DISK_SIZE: u64 = 1 << 20;
const ALL: u64 = u64::MAX;

fn memdisk() -> Arc<MemoryDisk> {
    Arc::new(
        MemoryDisk::new(DISK_SIZE)
            .unwrap()
            .with_id("test-serial-0123"),
    )
}

thread_local! {
    /// I/O threads of the devices this test thread builds with `driver`
    /// (set by the `on_io_threads` re-runs).
    static IO_THREADS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn driver(disk: Arc<MemoryDisk>, mut config: VirtioBlkConfig) -> Driver {
    config.io_threads = config.io_threads.max(IO_THREADS.with(|t| t.get()));
    Driver::new(disk, config)
}

/// Runs tests again with reads, writes and flushes on two I/O threads.
macro_rules! on_io_threads {
    ($($test:ident),* $(,)?) => {
        mod on_io_threads {
            $(
                #[test]
                fn $test() {
                    super::IO_THREADS.with(|t| t.set(2));
                    super::$test();
                }
            )*
        }
    };
}

on_io_threads!(
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
    snapshot_restore,
);

fn ready(disk: Arc<MemoryDisk>) -> Driver {
    let mut d = driver(disk, VirtioBlkConfig::default());
    d.init(ALL & !F_EVENT_IDX, 16);
    d
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
    assert_eq!(d.adapter.region(0).size, 0x8000);
    assert_eq!(d.adapter.region(PCI_CONFIG_REGION_INDEX).size, 4096);

    let caps = d.caps.clone();
    assert!(caps.pcie.is_some() && caps.pm.is_some() && caps.pci_cfg.is_some());
    // MSI-X: 2 vectors (1 queue + config), table and PBA in BAR 0.
    let msix = caps.msix as u64;
    assert_eq!(d.cfg_read(msix + 2, 2) & 0x7ff, 1);
    assert_eq!(d.cfg_read(msix + 4, 4), 0x4000);
    assert_eq!(d.cfg_read(msix + 8, 4), 0x6000);
    let mut types: Vec<u8> = caps.virtio.iter().map(|c| c.0).collect();
    types.sort();
    assert_eq!(types, vec![1, 2, 3, 4, 5]);
    assert!(caps.virtio.iter().all(|c| c.1 == 0));
    assert_eq!(
        (caps.common, caps.isr, caps.device, caps.notify),
        (0, 0x1000, 0x2000, 0x3000)
    );
    assert_eq!(caps.notify_mult, 4);

    // Conventional PCI: 256-byte config space, no PCIe capability.
    let d = driver(
        memdisk(),
        VirtioBlkConfig {
            pcie: false,
            num_queues: 3,
            ..Default::default()
        },
    );
    assert_eq!(d.adapter.region(PCI_CONFIG_REGION_INDEX).size, 256);
    assert!(d.caps.pcie.is_none());
    assert_eq!(d.adapter.irq_layout()[2].count, 4);
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
    assert_eq!(d.device_cfg(0, 8), DISK_SIZE / 512, "capacity");
    assert_eq!(d.device_cfg(0x0c, 4), 126, "seg_max");
    assert_eq!(d.device_cfg(0x14, 4), 512, "blk_size");
    assert_eq!(d.device_cfg(0x22, 2), 2, "num_queues");
    assert_ne!(d.device_cfg(0x24, 4), 0, "max_discard_sectors");
    assert_eq!(d.common_read(cc::NUMQ, 2), 2);
    d.common_write(cc::Q_SELECT, 2, 1);
    assert_eq!(d.common_read(cc::Q_SIZE, 2), 128);
    assert_eq!(d.common_read(cc::Q_NOFF, 2), 1);
    d.common_write(cc::Q_SELECT, 2, 7);
    assert_eq!(d.common_read(cc::Q_SIZE, 2), 0, "no such queue");
    let f = d.device_features();
    assert_ne!(f & F_VERSION_1, 0);
    assert_ne!(f & BLK_F_MQ, 0);
    assert_ne!(f & F_EVENT_IDX, 0);
    assert_ne!(f & F_INDIRECT, 0);
    assert_eq!(f & BLK_F_RO, 0);
}

#[test]
fn read_write_flush_get_id_msix() {
    let disk = memdisk();
    let mut d = ready(disk.clone());
    let data = pattern(2048, 7);
    assert_eq!(d.write_sectors(0, 3, &data), S_OK);
    assert!(fired(&d.msix[1]), "queue vector");
    assert!(!fired(&d.msix[0]), "config vector");
    assert!(!fired(&d.intx));
    assert_eq!(&disk.contents()[3 * 512..3 * 512 + 2048], &data[..]);

    let (status, back) = d.read_sectors(0, 3, 2048);
    assert_eq!(status, S_OK);
    assert_eq!(back, data);
    assert!(fired(&d.msix[1]));

    // Scattered over both RAM regions, odd segment sizes.
    let a = d.alloc(700);
    let b = RAM_B + 0x100;
    d.write(a, &data[..700]);
    d.write(b, &data[700..1024]);
    let (status, len) = d.request(0, T_OUT, 100, &[r(a, 700), r(b, 324)]);
    assert_eq!((status, len), (S_OK, 1));
    let (status, back) = d.read_sectors(0, 100, 1024);
    assert_eq!(status, S_OK);
    assert_eq!(back, &data[..1024]);

    let flushes = disk.flush_count();
    assert_eq!(d.request(0, T_FLUSH, 0, &[]).0, S_OK);
    assert_eq!(disk.flush_count(), flushes + 1);

    let id = d.alloc(20);
    let (status, len) = d.request(0, T_GET_ID, 0, &[w(id, 20)]);
    assert_eq!((status, len), (S_OK, 21));
    let mut want = b"test-serial-0123".to_vec();
    want.resize(20, 0);
    assert_eq!(d.read(id, 20), want);
    // GET_ID with a short buffer gets truncated.
    let (status, len) = d.request(0, T_GET_ID, 0, &[w(id, 4)]);
    assert_eq!((status, len), (S_OK, 5));
}

#[test]
fn write_through_without_flush_feature() {
    let disk = memdisk();
    let mut d = driver(disk.clone(), VirtioBlkConfig::default());
    d.init(ALL & !BLK_F_FLUSH, 16);
    assert_eq!(d.write_sectors(0, 0, &[1u8; 512]), S_OK);
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
        let mut d = Driver::new(Arc::new(file), VirtioBlkConfig::default());
        d.init(ALL, 64);
        let data = pattern(8192, direct as u8);
        assert_eq!(d.write_sectors(0, 9, &data), S_OK);
        let mut on_disk = vec![0u8; 8192];
        tmp.as_file().read_exact_at(&mut on_disk, 9 * 512).unwrap();
        assert_eq!(on_disk, data);
        assert_eq!(d.read_sectors(0, 9, 8192), (S_OK, data));
        assert_eq!(d.request(0, T_FLUSH, 0, &[]).0, S_OK);
        // Write zeroes then read back.
        let seg = d.alloc(16);
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&10u64.to_le_bytes());
        s[8..12].copy_from_slice(&4u32.to_le_bytes());
        d.write(seg, &s);
        assert_eq!(d.request(0, T_WRITE_ZEROES, 0, &[r(seg, 16)]).0, S_OK);
        let (_, back) = d.read_sectors(0, 9, 8192);
        assert_eq!(&back[..512], &pattern(8192, direct as u8)[..512]);
        assert!(back[512..512 * 5].iter().all(|b| *b == 0));
        assert_eq!(d.request(0, T_DISCARD, 0, &[r(seg, 16)]).0, S_OK);
        // Out of range on the file.
        assert_eq!(d.read_sectors(0, DISK_SIZE / 512, 512).0, S_IOERR);
    }
}

fn dwz(d: &mut Driver, segs: &[(u64, u32, u32)]) -> u64 {
    let a = d.alloc(16 * segs.len() as u64);
    for (i, &(sector, n, flags)) in segs.iter().enumerate() {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        d.write(a + 16 * i as u64, &s);
    }
    a
}

#[test]
fn discard_and_write_zeroes() {
    let disk = Arc::new(MemoryDisk::from_vec(vec![0xaa; DISK_SIZE as usize], false));
    let mut d = ready(disk.clone());
    let a = dwz(&mut d, &[(1, 2, 0), (10, 1, 1)]);
    assert_eq!(d.request(0, T_WRITE_ZEROES, 0, &[r(a, 32)]).0, S_OK);
    let c = disk.contents();
    assert!(c[..512].iter().all(|b| *b == 0xaa));
    assert!(c[512..1536].iter().all(|b| *b == 0));
    assert!(c[1536..5120].iter().all(|b| *b == 0xaa));
    assert!(c[5120..5632].iter().all(|b| *b == 0));

    let a = dwz(&mut d, &[(20, 1, 0)]);
    assert_eq!(d.request(0, T_DISCARD, 0, &[r(a, 16)]).0, S_OK);
    assert!(disk.contents()[20 * 512..21 * 512].iter().all(|b| *b == 0));

    // Unmap flag on discard, unknown flag on write zeroes: unsupported.
    let a = dwz(&mut d, &[(30, 1, 1)]);
    assert_eq!(d.request(0, T_DISCARD, 0, &[r(a, 16)]).0, S_UNSUPP);
    let a = dwz(&mut d, &[(30, 1, 2)]);
    assert_eq!(d.request(0, T_WRITE_ZEROES, 0, &[r(a, 16)]).0, S_UNSUPP);
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
        assert_eq!(d.request(0, T_DISCARD, 0, &[r(a, len)]).0, S_IOERR);
    }
    let a = dwz(&mut d, &[(0, 1, 0)]);
    assert_eq!(d.request(0, T_DISCARD, 0, &[r(a, 15)]).0, S_IOERR);
    assert_eq!(d.request(0, T_DISCARD, 0, &[]).0, S_IOERR);
    assert!(disk.contents()[30 * 512..].iter().all(|b| *b == 0xaa));

    // Not negotiated: unsupported.
    let mut d = driver(disk.clone(), VirtioBlkConfig::default());
    d.init(ALL & !BLK_F_DISCARD & !BLK_F_WRITE_ZEROES, 16);
    let a = dwz(&mut d, &[(40, 1, 0)]);
    assert_eq!(d.request(0, T_DISCARD, 0, &[r(a, 16)]).0, S_UNSUPP);
    assert_eq!(d.request(0, T_WRITE_ZEROES, 0, &[r(a, 16)]).0, S_UNSUPP);
}

#[test]
fn read_only_disk() {
    let disk = Arc::new(MemoryDisk::from_vec(vec![3; DISK_SIZE as usize], true));
    let mut d = driver(disk.clone(), VirtioBlkConfig::default());
    let f = d.init(ALL, 16);
    assert_ne!(f & BLK_F_RO, 0);
    assert_eq!(f & (BLK_F_DISCARD | BLK_F_WRITE_ZEROES), 0);
    assert_eq!(d.write_sectors(0, 0, &[1u8; 512]), S_IOERR);
    assert_eq!(d.read_sectors(0, 0, 512), (S_OK, vec![3; 512]));
    assert_eq!(d.request(0, T_FLUSH, 0, &[]).0, S_OK);
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
    assert_eq!(d.write_sectors(0, 0, &[1u8; 512]), S_IOERR);
    assert!(disk.contents().iter().all(|b| *b == 0));
}

#[test]
fn bad_requests_fail_cleanly() {
    let disk = memdisk();
    let mut d = ready(disk.clone());
    let cap = DISK_SIZE / 512;
    let buf = d.alloc(4096);

    // Unknown type.
    assert_eq!(d.request(0, 0x1234, 0, &[]).0, S_UNSUPP);
    // Out of range, straddling the end, overflowing sector numbers.
    assert_eq!(d.request(0, T_IN, cap, &[w(buf, 512)]).0, S_IOERR);
    assert_eq!(d.request(0, T_IN, cap - 1, &[w(buf, 1024)]).0, S_IOERR);
    assert_eq!(d.request(0, T_OUT, u64::MAX, &[r(buf, 512)]).0, S_IOERR);
    assert_eq!(
        d.request(0, T_OUT, u64::MAX / 512, &[r(buf, 512)]).0,
        S_IOERR
    );
    // Not a multiple of the sector size.
    assert_eq!(d.request(0, T_IN, 0, &[w(buf, 100)]).0, S_IOERR);
    assert_eq!(d.request(0, T_OUT, 0, &[r(buf, 513)]).0, S_IOERR);
    // Data buffer in the hole or running off the end of a region.
    assert_eq!(d.request(0, T_IN, 0, &[w(HOLE, 512)]).0, S_IOERR);
    assert_eq!(d.request(0, T_OUT, 0, &[r(HOLE, 512)]).0, S_IOERR);
    let edge = RAM_A + RAM_SIZE - 256;
    assert_eq!(d.request(0, T_IN, 0, &[w(edge, 512)]).0, S_IOERR);
    // Huge lengths: beyond guest memory is an I/O error; a chain whose
    // total length overflows u32 is cut short by virtio-queue, losing its
    // status descriptor, so it completes with length 0.
    assert_eq!(d.request(0, T_IN, 0, &[w(buf, 0x8000_0000)]).0, S_IOERR);
    assert_eq!(d.request(0, T_IN, 0, &[w(buf, u32::MAX)]), (0xff, 0));
    assert_eq!(
        d.request(0, T_OUT, 0, &[r(buf, u32::MAX), r(buf, u32::MAX)]),
        (0xff, 0)
    );
    // Readable data after writable: misordered.
    let s = d.status_buf();
    let h = d.header(T_OUT, 0);
    let head = d.submit(0, &[r(h, 16), w(s, 1), r(buf, 512), w(s, 1)]);
    assert_eq!(d.pop_used(0), Some((u32::from(head), 1)));
    assert_eq!(d.read(s, 1)[0], S_IOERR);

    // Short header.
    let h = d.header(T_IN, 0);
    let s = d.status_buf();
    let head = d.submit(0, &[r(h, 8), w(buf, 512), w(s, 1)]);
    assert_eq!(d.pop_used(0), Some((u32::from(head), 1)));
    assert_eq!(d.read(s, 1)[0], S_IOERR);
    // Header outside memory.
    let s = d.status_buf();
    let head = d.submit(0, &[r(HOLE, 16), w(s, 1)]);
    assert_eq!(d.pop_used(0), Some((u32::from(head), 1)));
    assert_eq!(d.read(s, 1)[0], S_IOERR);
    // No writable descriptor at all: completed with length 0.
    let h = d.header(T_FLUSH, 0);
    let head = d.submit(0, &[r(h, 16)]);
    assert_eq!(d.pop_used(0), Some((u32::from(head), 0)));
    // Status byte in the hole: completed with length 0.
    let h = d.header(T_FLUSH, 0);
    let head = d.submit(0, &[r(h, 16), w(HOLE, 1)]);
    assert_eq!(d.pop_used(0), Some((u32::from(head), 0)));
    // Zero-length status descriptor after a valid one: the status goes
    // into the last byte of the writable area.
    let h = d.header(T_FLUSH, 0);
    let s = d.status_buf();
    let head = d.submit(0, &[r(h, 16), w(s, 1), w(buf, 0)]);
    assert_eq!(d.pop_used(0), Some((u32::from(head), 1)));
    assert_eq!(d.read(s, 1)[0], S_OK);

    // Nothing was written and the next request works.
    assert!(disk.contents().iter().all(|b| *b == 0));
    assert_eq!(d.write_sectors(0, 5, &[9u8; 512]), S_OK);
    assert_eq!(d.read_sectors(0, 5, 512), (S_OK, vec![9; 512]));
}

#[test]
fn garbage_chains_do_not_panic_or_hang() {
    let mut d = ready(memdisk());
    let size = d.vqs[0].size;
    let table = d.vqs[0].desc;
    let h = d.header(T_IN, 0);
    let buf = d.alloc(512);

    // A loop: 0 -> 1 -> 0.
    d.write_desc(table, 0, r(h, 16), 1);
    d.write_desc(table, 1, w(buf, 512), 0);
    for i in 0..2 {
        let mut desc = if i == 0 { r(h, 16) } else { w(buf, 512) };
        desc.flags |= VRING_DESC_F_NEXT;
        d.write_desc(table, i, desc, 1 - i);
    }
    d.publish(0, 0);
    d.kick(0);
    assert!(d.pop_used(0).is_some());

    // `next` out of range.
    let mut desc = r(h, 16);
    desc.flags |= VRING_DESC_F_NEXT;
    d.write_desc(table, 0, desc, 999);
    d.publish(0, 0);
    d.kick(0);
    assert_eq!(d.pop_used(0), Some((0, 0)));

    // Head index out of range: cannot be returned, must be skipped.
    d.publish(0, 4000);
    d.kick(0);
    assert!(d.pop_used(0).is_none());

    // Indirect table outside memory, with a huge length, misaligned
    // length, nested indirect.
    let inner = d.alloc(64);
    for (addr, len) in [(HOLE, 64), (inner, 0xffff_fff0), (inner, 17), (inner, 0)] {
        d.write_desc(
            table,
            0,
            Desc {
                addr,
                len,
                flags: VRING_DESC_F_INDIRECT,
            },
            0,
        );
        d.publish(0, 0);
        d.kick(0);
        assert_eq!(d.pop_used(0), Some((0, 0)));
    }
    d.write_desc(
        inner,
        0,
        Desc {
            addr: inner,
            len: 32,
            flags: VRING_DESC_F_INDIRECT,
        },
        0,
    );
    d.write_desc(
        table,
        0,
        Desc {
            addr: inner,
            len: 32,
            flags: VRING_DESC_F_INDIRECT,
        },
        0,
    );
    d.publish(0, 0);
    d.kick(0);
    assert_eq!(d.pop_used(0), Some((0, 0)));

    // A looping indirect table.
    for i in 0..4u16 {
        let mut desc = w(buf, 512);
        desc.flags |= VRING_DESC_F_NEXT;
        d.write_desc(inner, i, desc, (i + 1) % 4);
    }
    d.write_desc(
        table,
        0,
        Desc {
            addr: inner,
            len: 64,
            flags: VRING_DESC_F_INDIRECT,
        },
        0,
    );
    d.publish(0, 0);
    d.kick(0);
    assert!(d.pop_used(0).is_some());

    // An indirect chain longer than any real request (3000 descriptors).
    let long = d.alloc(3000 * 16);
    for i in 0..3000u16 {
        let mut desc = w(buf, 1);
        desc.flags |= VRING_DESC_F_NEXT;
        d.write_desc(long, i, desc, i + 1);
    }
    d.write_desc(
        table,
        0,
        Desc {
            addr: long,
            len: 3000 * 16,
            flags: VRING_DESC_F_INDIRECT,
        },
        0,
    );
    d.publish(0, 0);
    d.kick(0);
    assert_eq!(d.pop_used(0), Some((0, 0)));

    // Rings moved to garbage: the avail index jumps by more than the
    // queue size. Nothing is processed, nothing hangs.
    let avail_idx = d.vqs[0].avail_idx;
    d.write_u16(d.vqs[0].avail + 2, avail_idx.wrapping_add(size * 3));
    d.kick(0);
    assert!(d.pop_used(0).is_none());
    d.write_u16(d.vqs[0].avail + 2, avail_idx);

    // Kicks for queues that do not exist.
    d.bar_write(d.caps.notify + 4 * 100, 2, 100);
    d.bar_write(d.caps.notify + 0xffc, 4, 0);

    // The queue still works.
    d.vqs[0].next_desc = 0;
    d.reset_alloc();
    assert_eq!(d.write_sectors(0, 1, &[4u8; 512]), S_OK);
    assert_eq!(d.read_sectors(0, 1, 512), (S_OK, vec![4; 512]));
}

#[test]
fn indirect_descriptors() {
    let disk = memdisk();
    let mut d = ready(disk.clone());
    let data = pattern(1536, 3);
    let h = d.header(T_OUT, 8);
    let b1 = d.alloc(1024);
    let b2 = RAM_B + 0x8000;
    d.write(b1, &data[..1024]);
    d.write(b2, &data[1024..]);
    let s = d.status_buf();
    let table = d.alloc(4 * 16);
    let descs = [r(h, 16), r(b1, 1024), r(b2, 512), w(s, 1)];
    for (i, desc) in descs.iter().enumerate() {
        let mut desc = *desc;
        if i + 1 < descs.len() {
            desc.flags |= VRING_DESC_F_NEXT;
        }
        d.write_desc(table, i as u16, desc, i as u16 + 1);
    }
    let head = d.submit(
        0,
        &[Desc {
            addr: table,
            len: 64,
            flags: VRING_DESC_F_INDIRECT,
        }],
    );
    assert_eq!(d.pop_used(0), Some((u32::from(head), 1)));
    assert_eq!(d.read(s, 1)[0], S_OK);
    assert_eq!(&disk.contents()[8 * 512..8 * 512 + 1536], &data[..]);

    // Read back through an indirect table as well.
    let h = d.header(T_IN, 8);
    let out = d.alloc(1536);
    let s = d.status_buf();
    let descs = [r(h, 16), w(out, 1536), w(s, 1)];
    for (i, desc) in descs.iter().enumerate() {
        let mut desc = *desc;
        if i + 1 < descs.len() {
            desc.flags |= VRING_DESC_F_NEXT;
        }
        d.write_desc(table, i as u16, desc, i as u16 + 1);
    }
    let head = d.submit(
        0,
        &[Desc {
            addr: table,
            len: 48,
            flags: VRING_DESC_F_INDIRECT,
        }],
    );
    assert_eq!(d.pop_used(0), Some((u32::from(head), 1537)));
    assert_eq!(d.read(out, 1536), data);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    let f = d.init(ALL, 16);
    assert_ne!(f & F_EVENT_IDX, 0);
    let vq = d.vqs[0].clone();

    // used_event = 0: the first completion (used idx 0 -> 1) interrupts.
    assert_eq!(d.write_sectors(0, 0, &[1u8; 512]), S_OK);
    assert!(fired(&d.msix[1]));
    // The device asked to be kicked at the next avail index.
    assert_eq!(d.read_u16(vq.avail_event_addr()), 1);

    // used_event = 5: completions 1 -> 2, 2 -> 3 are silent.
    d.write_u16(vq.used_event_addr(), 5);
    assert_eq!(d.write_sectors(0, 0, &[2u8; 512]), S_OK);
    assert!(!fired(&d.msix[1]));
    assert_eq!(d.write_sectors(0, 0, &[3u8; 512]), S_OK);
    assert!(!fired(&d.msix[1]));
    assert_eq!(d.read_u16(vq.avail_event_addr()), 3);
    // used_event = 3: completion 3 -> 4 crosses it.
    d.write_u16(vq.used_event_addr(), 3);
    assert_eq!(d.write_sectors(0, 0, &[4u8; 512]), S_OK);
    assert!(fired(&d.msix[1]));

    // Several chains in one kick: one interrupt.
    d.write_u16(vq.used_event_addr(), 4);
    let h = d.header(T_FLUSH, 0);
    for _ in 0..3 {
        let s = d.status_buf();
        let head = d.place_chain(0, &[r(h, 16), w(s, 1)]);
        d.publish(0, head);
    }
    d.kick(0);
    assert_eq!(d.used_idx(0), 7);
    assert_eq!(d.msix[1].read().unwrap(), 1);

    // Without EVENT_IDX every completion interrupts, and the device does
    // not write avail_event.
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    d.init(ALL & !F_EVENT_IDX, 16);
    let vq = d.vqs[0].clone();
    d.write_u16(vq.used_event_addr(), 100);
    for i in 0..3 {
        assert_eq!(d.write_sectors(0, i, &[1u8; 512]), S_OK);
        assert!(fired(&d.msix[1]));
    }
    assert_eq!(d.read_u16(vq.avail_event_addr()), 0);
}

#[test]
fn intx_and_isr() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    // MSI-X left disabled.
    d.negotiate(ALL & !F_EVENT_IDX);
    d.setup_queues(16);
    assert_eq!(d.write_sectors(0, 0, &[1u8; 512]), S_OK);
    assert!(fired(&d.intx));
    assert!(d.msix.iter().all(|e| !fired(e)));
    assert_eq!(d.isr(), 1);
    assert_eq!(d.isr(), 0, "reading ISR clears it");

    // INTx is automasked until the client unmasks it; the next one is
    // pending, not lost.
    assert_eq!(d.write_sectors(0, 0, &[1u8; 512]), S_OK);
    assert!(!fired(&d.intx));
    assert_eq!(d.isr(), 1);

    // INTx disabled in the command register: ISR still set, no trigger.
    let cmd = d.cfg_read(4, 2);
    d.cfg_write(4, 2, cmd | 0x400);
    d.irqs.clear();
    assert_eq!(d.write_sectors(0, 0, &[1u8; 512]), S_OK);
    assert_eq!(d.isr(), 1);
    assert!(!d.irqs.pending(0, 0));
}

#[test]
fn msix_no_vector_and_bad_vectors() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    d.enable_msix(true);
    d.negotiate(ALL & !F_EVENT_IDX);
    d.common_write(cc::MSIX, 2, 77);
    assert_eq!(d.common_read(cc::MSIX, 2), 0xffff);
    d.common_write(cc::MSIX, 2, 1);
    assert_eq!(d.common_read(cc::MSIX, 2), 1);
    d.setup_queues(16);
    d.common_write(cc::Q_SELECT, 2, 0);
    assert_eq!(d.common_read(cc::Q_MSIX, 2), 1);
    d.common_write(cc::Q_MSIX, 2, 2);
    assert_eq!(d.common_read(cc::Q_MSIX, 2), 0xffff);
    // No vector: no interrupt at all.
    assert_eq!(d.write_sectors(0, 0, &[1u8; 512]), S_OK);
    assert!(d.msix.iter().all(|e| !fired(e)));
    assert!(!fired(&d.intx));
    // The MSI-X table and PBA are readable in BAR 0.
    let ctl = d.bar_read(0x4000 + 12, 4);
    assert_eq!(ctl & 1, 1, "vectors start masked");
    d.bar_write(0x4000 + 12, 4, 0);
    assert_eq!(d.bar_read(0x4000 + 12, 4), 0);
    assert_eq!(d.bar_read(0x6000, 8), 0);
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
    let f = d.init(ALL & !F_EVENT_IDX, 32);
    assert_ne!(f & BLK_F_MQ, 0);
    assert_eq!(d.vqs.len(), 3);
    for q in 0..3 {
        let data = vec![q as u8 + 1; 512];
        assert_eq!(d.write_sectors(q, q as u64, &data), S_OK);
        for (v, e) in d.msix.iter().enumerate() {
            assert_eq!(fired(e), v == q + 1, "queue {q} vector {v}");
        }
    }
    for q in 0..3u8 {
        assert_eq!(
            d.read_sectors(2 - q as usize, u64::from(q), 512).1,
            vec![q + 1; 512]
        );
    }
}

#[test]
fn feature_negotiation() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    d.set_status(S_ACKNOWLEDGE | S_DRIVER);
    // Unoffered bits are dropped.
    d.write_driver_features(F_VERSION_1 | (1 << 63) | (1 << 20));
    assert_eq!(d.driver_features(), F_VERSION_1);
    // Without VERSION_1 FEATURES_OK does not stick.
    d.write_driver_features(BLK_F_FLUSH);
    d.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    assert_eq!(d.status() & S_FEATURES_OK, 0);
    d.write_driver_features(F_VERSION_1 | BLK_F_FLUSH);
    d.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    assert_ne!(d.status() & S_FEATURES_OK, 0);
    // Frozen after FEATURES_OK.
    d.write_driver_features(F_VERSION_1);
    assert_eq!(d.driver_features(), F_VERSION_1 | BLK_F_FLUSH);
    // Feature select beyond 1 reads zero.
    d.common_write(cc::DFSELECT, 4, 2);
    assert_eq!(d.common_read(cc::DF, 4), 0);
    // Read-only fields ignore writes.
    d.common_write(cc::NUMQ, 2, 9);
    assert_eq!(d.common_read(cc::NUMQ, 2), 1);
    // DRIVER_OK without queues set up is harmless; a notify then is too.
    d.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    d.bar_write(d.caps.notify, 2, 0);
    assert_ne!(d.status() & S_DRIVER_OK, 0);
}

#[test]
fn queue_config_rules() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    d.negotiate(ALL);
    d.common_write(cc::Q_SELECT, 2, 0);
    assert_eq!(d.common_read(cc::Q_SIZE, 2), 256);
    d.common_write(cc::Q_SIZE, 2, 100);
    assert_eq!(d.common_read(cc::Q_SIZE, 2), 256, "not a power of two");
    d.common_write(cc::Q_SIZE, 2, 512);
    assert_eq!(d.common_read(cc::Q_SIZE, 2), 256, "above the maximum");
    d.common_write(cc::Q_SIZE, 2, 64);
    assert_eq!(d.common_read(cc::Q_SIZE, 2), 64);
    // Misaligned descriptor table ignored; 64-bit address in two halves.
    d.common_write(cc::Q_DESCLO, 4, 0x1008);
    assert_eq!(d.common_read(cc::Q_DESCLO, 4), 0);
    d.common_write(cc::Q_DESCLO, 4, 0x1000);
    d.common_write(cc::Q_DESCHI, 4, 0x1);
    assert_eq!(d.common_read(cc::Q_DESCLO, 8), 0x1_0000_1000);
    // One 8-byte access works too.
    d.common_write(cc::Q_USEDLO, 8, 0x2_0000_2000);
    assert_eq!(d.common_read(cc::Q_USEDLO, 8), 0x2_0000_2000);
    d.common_write(cc::Q_ENABLE, 2, 1);
    assert_eq!(d.common_read(cc::Q_ENABLE, 2), 1);
    // Enabled queues are frozen.
    d.common_write(cc::Q_SIZE, 2, 32);
    assert_eq!(d.common_read(cc::Q_SIZE, 2), 64);
    d.common_write(cc::Q_ENABLE, 2, 0);
    assert_eq!(d.common_read(cc::Q_ENABLE, 2), 1);
    // Accesses straddling the end of the structure are ignored.
    assert_eq!(d.common_read(0x36, 4), 0);
    d.common_write(0x36, 4, u64::MAX);
}

#[test]
fn device_reset_through_status_zero() {
    let disk = memdisk();
    let mut d = ready(disk.clone());
    assert_eq!(d.write_sectors(0, 0, &[1u8; 512]), S_OK);
    assert_eq!(d.write_sectors(0, 1, &[2u8; 512]), S_OK);
    d.set_status(0);
    assert_eq!(d.status(), 0);
    assert_eq!(d.driver_features(), 0);
    d.common_write(cc::Q_SELECT, 2, 0);
    assert_eq!(d.common_read(cc::Q_ENABLE, 2), 0);
    assert_eq!(d.common_read(cc::Q_SIZE, 2), 256);
    assert_eq!(d.common_read(cc::Q_MSIX, 2), 0xffff);
    assert_eq!(d.common_read(cc::Q_DESCLO, 8), 0);
    assert_eq!(d.common_read(cc::MSIX, 2), 0xffff);
    // Kicks on a reset device do nothing.
    let used = d.used_idx(0);
    let h = d.header(T_FLUSH, 0);
    let s = d.status_buf();
    let head = d.place_chain(0, &[r(h, 16), w(s, 1)]);
    d.publish(0, head);
    d.kick(0);
    assert_eq!(d.used_idx(0), used);
    // Bring it up again from scratch: indices restart at 0.
    d.negotiate(ALL & !F_EVENT_IDX);
    d.config_msix_vector(0);
    d.setup_queues(16);
    assert_eq!(d.used_idx(0), 0);
    assert_eq!(d.read_sectors(0, 1, 512), (S_OK, vec![2; 512]));
    assert!(fired(&d.msix[1]));
}

#[test]
fn full_reset_through_adapter() {
    let mut d = ready(memdisk());
    assert_eq!(d.write_sectors(0, 0, &[1u8; 512]), S_OK);
    d.adapter.lifecycle().reset(ResetReason::Command);
    assert_eq!(d.status(), 0);
    // Config space back to power-on: MSI-X disabled.
    let ctl = d.cfg_read(d.caps.msix as u64 + 2, 2);
    assert_eq!(ctl & 0x8000, 0);
    d.adapter.lifecycle().reset(ResetReason::LostConnection);
    d.reset_alloc();
    d.init(ALL & !F_EVENT_IDX, 16);
    assert_eq!(d.read_sectors(0, 0, 512), (S_OK, vec![1; 512]));
    assert!(fired(&d.msix[1]));
}

#[test]
fn pci_cfg_access_capability() {
    let mut d = driver(memdisk(), VirtioBlkConfig::default());
    let cap = d.caps.pci_cfg.unwrap() as u64;
    // Read num_queues (2 bytes at common + 0x12) through the window.
    d.cfg_write(cap + 4, 1, 0);
    d.cfg_write(cap + 8, 4, 0x12);
    d.cfg_write(cap + 12, 4, 2);
    assert_eq!(d.cfg_read(cap + 16, 4), 1);
    // Write the status through the window.
    d.cfg_write(cap + 8, 4, 0x14);
    d.cfg_write(cap + 12, 4, 1);
    d.cfg_write(cap + 16, 4, u64::from(S_ACKNOWLEDGE));
    assert_eq!(d.status(), S_ACKNOWLEDGE);
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
    assert_eq!(d.status(), S_ACKNOWLEDGE);
}

#[test]
fn pause_defers_and_resume_processes() {
    let disk = memdisk();
    let mut d = ready(disk.clone());
    assert!(d.adapter.lifecycle().migratable());
    d.adapter.lifecycle().pause().unwrap();
    let buf = d.alloc(512);
    d.write(buf, &[6u8; 512]);
    let h = d.header(T_OUT, 2);
    let s = d.status_buf();
    let head = d.place_chain(0, &[r(h, 16), r(buf, 512), w(s, 1)]);
    d.publish(0, head);
    d.kick(0);
    assert!(d.pop_used(0).is_none());
    assert!(disk.contents()[1024..1536].iter().all(|b| *b == 0));
    d.adapter.lifecycle().resume().unwrap();
    // Resuming only marks the queues; the work runs as deferred work.
    assert!(d.pop_used(0).is_none());
    d.run_deferred();
    assert_eq!(d.pop_used(0), Some((u32::from(head), 1)));
    assert_eq!(d.read(s, 1)[0], S_OK);
    assert!(fired(&d.msix[1]));
    assert_eq!(&disk.contents()[1024..1536], &[6u8; 512]);
}

#[test]
fn snapshot_restore() {
    let disk = memdisk();
    let mut d = driver(disk.clone(), VirtioBlkConfig::default());
    let f = d.init(ALL, 16);
    for i in 0..5 {
        assert_eq!(d.write_sectors(0, i, &[i as u8; 512]), S_OK);
    }
    d.adapter.lifecycle().pause().unwrap();
    let snap = d.adapter.lifecycle().snapshot().unwrap();

    // A new device on the same guest memory, as on a migration target.
    let ctx = DeviceContext {
        memory: GuestMemoryAtomic::new(d.mem.clone()),
        irqs: Default::default(),
        ..Default::default()
    };
    let dev = VirtioBlkPci::new(ctx.clone(), disk.clone(), VirtioBlkConfig::default()).unwrap();
    let mut t = Driver::with_device(ctx, d.mem.clone(), dev);
    t.adapter.lifecycle().pause().unwrap();
    t.adapter.lifecycle().restore(&snap).unwrap();
    t.adapter.lifecycle().resume().unwrap();
    t.vqs = d.vqs.clone();
    assert_eq!(t.status() & S_DRIVER_OK, S_DRIVER_OK);
    assert_eq!(t.driver_features(), f);
    assert_eq!(t.cfg_read(t.caps.msix as u64 + 2, 2) & 0x8000, 0x8000);
    t.common_write(cc::Q_SELECT, 2, 0);
    assert_eq!(t.common_read(cc::Q_SIZE, 2), 16);
    assert_eq!(t.common_read(cc::Q_MSIX, 2), 1);
    // The ring continues where it left off, event index included.
    let used_event = t.vqs[0].used_event_addr();
    t.write_u16(used_event, 5);
    assert_eq!(t.read_sectors(0, 3, 512), (S_OK, vec![3; 512]));
    assert_eq!(t.used_idx(0), 6);
    assert!(fired(&t.msix[1]));

    // Mismatched snapshots are refused.
    let other = Driver::new(
        memdisk(),
        VirtioBlkConfig {
            num_queues: 2,
            ..Default::default()
        },
    );
    let mut other = other;
    assert!(other.adapter.lifecycle().restore(&snap).is_err());
    let mut bad = snap.clone();
    bad.snapshot_data = None;
    assert!(t.adapter.lifecycle().restore(&bad).is_err());
}

#[test]
fn garbage_transport_accesses() {
    let mut d = ready(memdisk());
    // Reads and writes all over the BAR, of every size, never panic.
    for off in (0..0x8000u64).step_by(0x3f) {
        for len in [1usize, 2, 3, 4, 8] {
            let mut b = vec![0u8; len];
            let _ = d.adapter.region_read(0, off, &mut b);
            // Avoid resetting the device and kicking with garbage status.
            if !(0x14..0x16).contains(&off) {
                let _ = d.adapter.region_write(0, off, &b);
            }
        }
    }
    for off in (0..4096u64).step_by(7) {
        let mut b = [0u8; 4];
        let _ = d.adapter.region_read(PCI_CONFIG_REGION_INDEX, off, &mut b);
    }
    // Direct PciDevice calls with a foreign BAR base are ignored.
    let dev = d.adapter.device();
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
    d.init(ALL & !F_EVENT_IDX, 128);
    let mut heads = Vec::new();
    for i in 0..40u64 {
        let buf = d.alloc(512);
        d.write(buf, &[i as u8 + 1; 512]);
        let h = d.header(T_OUT, i);
        let s = d.status_buf();
        let head = d.place_chain(0, &[r(h, 16), r(buf, 512), w(s, 1)]);
        d.publish(0, head);
        heads.push(head);
    }
    // The doorbell itself does nothing but mark the queue.
    let notify = d.caps.notify + u64::from(d.vqs[0].notify_off) * u64::from(d.caps.notify_mult);
    d.adapter
        .region_write(0, notify, &0u16.to_le_bytes())
        .unwrap();
    assert_eq!(d.used_idx(0), 0);
    assert!(disk.contents()[..40 * 512].iter().all(|b| *b == 0));
    // Each call does a bounded batch, interrupting after each, and says
    // whether work is left.
    let mut calls = 0;
    while d.adapter.lifecycle().run_deferred() {
        calls += 1;
        assert!(fired(&d.msix[1]), "no interrupt after a batch");
        assert!(calls < 10, "run_deferred never finishes");
    }
    assert!(calls >= 2, "40 requests in {calls} bounded calls");
    assert_eq!(d.used_idx(0), 40);
    for (i, head) in heads.iter().enumerate() {
        assert_eq!(d.pop_used(0), Some((u32::from(*head), 1)));
        assert_eq!(
            &disk.contents()[i * 512..(i + 1) * 512],
            &[i as u8 + 1; 512]
        );
    }
    // Idle again: no work, and the driver may ring again.
    assert!(!d.adapter.lifecycle().run_deferred());
    assert_eq!(
        d.read_u16(d.vqs[0].used) & 1,
        0,
        "VRING_USED_F_NO_NOTIFY left set"
    );
}

/// A disk whose reads wait while `held` is set.
struct HeldDisk {
    inner: MemoryDisk,
    held: std::sync::atomic::AtomicBool,
}

impl backends::storage::BlockBackend for HeldDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        while self.held.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn read_only(&self) -> bool {
        false
    }
    fn id(&self) -> String {
        "held".into()
    }
}

/// Lets a [`HeldDisk`]'s reads go when dropped.
struct Release(Arc<HeldDisk>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0
            .held
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn reposted_heads_do_not_grow_the_requests_in_flight() {
    let disk = Arc::new(HeldDisk {
        inner: MemoryDisk::new(DISK_SIZE).unwrap(),
        held: std::sync::atomic::AtomicBool::new(true),
    });
    let config = VirtioBlkConfig {
        io_threads: 1,
        ..Default::default()
    };
    let mut d = Driver::new(disk.clone(), config);
    // Declared after `d`, so dropped before it: a failing assertion lets
    // the reads go instead of hanging in the I/O threads' drain.
    let _release = Release(disk.clone());
    d.init(ALL & !F_EVENT_IDX, 16);
    // One read chain, made available 32 times over, twice the queue size (a
    // driver may not do that; a hostile one can, up to a ring's worth
    // beyond what the device took).
    let buf = d.alloc(512);
    let h = d.header(T_IN, 0);
    let s = d.status_buf();
    let head = d.place_chain(0, &[r(h, 16), w(buf, 512), w(s, 1)]);
    let notify = d.caps.notify + u64::from(d.vqs[0].notify_off) * u64::from(d.caps.notify_mult);
    for _ in 0..32 {
        d.publish(0, head);
        d.adapter
            .region_write(0, notify, &0u16.to_le_bytes())
            .unwrap();
        while d.adapter.lifecycle().run_deferred() {}
        assert!(d.adapter.device().device().in_flight() <= 16);
    }
    assert_eq!(d.adapter.device().device().in_flight(), 16);
    // Let them complete: the device takes the rest as room frees up.
    disk.held.store(false, std::sync::atomic::Ordering::SeqCst);
    d.run_deferred();
    assert_eq!(d.used_idx(0), 32);
    assert_eq!(d.adapter.device().device().in_flight(), 0);
}
