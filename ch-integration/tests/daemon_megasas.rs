//! The megasas daemon driven as Cloud Hypervisor drives a device, through
//! the published `vfio_user::Client`, by a small MFI driver of the test's
//! own: frames, the reply queue and its indices in guest RAM below 4 GiB,
//! data buffers above it, frames posted to the inbound queue port, replies
//! taken off the reply queue after an MSI-X interrupt.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

const MIB: u64 = 1 << 20;
/// Guest RAM: 8 MiB below 4 GiB (frames, queue, DCMD buffers) and 8 MiB
/// above it (data).
const LOW: u64 = 0x10_0000;
const HIGH: u64 = GUEST_BASE;
const IMAGE_SIZE: u64 = 8 * MIB;

// Registers.
const IQP: u64 = 0x40;
const OMSK: u64 = 0x34;
const OSTS: u64 = 0x30;
const ODCR0: u64 = 0xa0;
const OSP0: u64 = 0xb0;
const IDB: u64 = 0x20;

// Frame commands, flags and statuses.
const INIT: u8 = 0;
const LD_READ: u8 = 1;
const LD_WRITE: u8 = 2;
const LD_SCSI_IO: u8 = 3;
const DCMD: u8 = 5;
const DONT_POST: u16 = 0x1;
const SGL64: u16 = 0x2;
const IEEE: u16 = 0x20;
const DIR_READ: u16 = 0x10;
const STAT_OK: u8 = 0;
const STAT_SCSI_DONE_WITH_ERROR: u8 = 0x2d;

// DCMD opcodes.
const CTRL_GET_INFO: u32 = 0x0101_0000;
const PD_LIST_QUERY: u32 = 0x0201_0100;
const LD_LIST_QUERY: u32 = 0x0301_0100;
const EVENT_GET_INFO: u32 = 0x0104_0100;
const EVENT_WAIT: u32 = 0x0104_0500;
const CACHE_FLUSH: u32 = 0x0110_1000;

const REPLY_ENTRIES: u32 = 16;

fn image(dir: &TempDir, name: &str, seed: u8) -> PathBuf {
    let path = dir.as_path().join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&pattern(seed, IMAGE_SIZE as usize)).unwrap();
    path
}

/// How a frame completed.
#[derive(Debug, PartialEq, Eq)]
struct Done {
    cmd_status: u8,
    scsi_status: u8,
    sense: Vec<u8>,
}

/// The test's MFI driver, over the published client or the raw one (for
/// the migration commands).
struct Mfi<T: Transport = vfio_user::Client> {
    client: T,
    ram: GuestRam,
    msix: EventFd,
    /// Frames, one per context (1 KiB apart, as Linux lays them out).
    frames: u64,
    sense: u64,
    qinfo: u64,
    ring: u64,
    producer: u64,
    consumer: u64,
    /// Where the driver is in the reply queue.
    tail: u32,
    next_context: u32,
}

impl Mfi {
    fn connect(socket: &Path) -> Mfi {
        Mfi::connect_with(vfio_user::Client::new(socket).expect("vfio_user::Client::new"))
    }

    /// Moves to the daemon on `socket`, as a VMM does with a restored
    /// device: the same guest RAM and MSI-X eventfd, nothing written to
    /// the device.
    fn reconnect(&mut self, socket: &Path) {
        let client = vfio_user::Client::new(socket).expect("reconnect");
        self.attach(client);
    }
}

impl Mfi<RawClient> {
    fn connect_raw(socket: &Path) -> Mfi<RawClient> {
        Mfi::connect_with(RawClient::connect_negotiated(socket))
    }
}

impl<T: Transport> Mfi<T> {
    fn connect_with(mut client: T) -> Mfi<T> {
        let mut ram = GuestRam::with_regions(&[(LOW, 8 * MIB), (HIGH, 8 * MIB)]);
        ram.map_into(&mut client);
        let msix = EventFd::new(EFD_NONBLOCK).unwrap();
        client.set_irq_eventfds(MSIX_INDEX, 0, &[msix.as_raw_fd()]);
        let frames = ram.alloc_in(0, 64 * 1024, 256);
        let sense = ram.alloc_in(0, 128 * 64, 64);
        let qinfo = ram.alloc_in(0, 64, 64);
        let ring = ram.alloc_in(0, 4 * u64::from(REPLY_ENTRIES), 64);
        let producer = ram.alloc_in(0, 8, 8);
        let mut m = Mfi {
            client,
            ram,
            msix,
            frames,
            sense,
            qinfo,
            ring,
            producer,
            consumer: producer + 4,
            tail: 0,
            next_context: 0,
        };
        // I/O, memory and bus mastering; MSI-X on.
        m.client.write_region(CONFIG_REGION, 4, &[0x07, 0]);
        let cap = m.config(0x34, 1) as u64;
        assert_eq!(m.config(cap, 1), 0x11, "the MSI-X capability comes first");
        m.client.write_region(CONFIG_REGION, cap + 3, &[0x80]);
        m
    }

    /// Continues on `client`, given the same guest RAM and MSI-X eventfd;
    /// returns the old connection.
    fn attach(&mut self, mut client: T) -> T {
        self.ram.map_into(&mut client);
        client.set_irq_eventfds(MSIX_INDEX, 0, &[self.msix.as_raw_fd()]);
        std::mem::replace(&mut self.client, client)
    }

    fn config(&mut self, offset: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.client
            .read_region(CONFIG_REGION, offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.client.read_region(0, offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn set_reg(&mut self, offset: u64, v: u32) {
        self.client.write_region(0, offset, &v.to_le_bytes());
    }

    /// A fresh frame: its context, its address, and its header.
    fn frame(&mut self, cmd: u8, flags: u16, sges: u8, data_len: u32) -> (u32, u64, Vec<u8>) {
        let context = self.next_context;
        self.next_context = (self.next_context + 1) % 64;
        let addr = self.frames + u64::from(context) * 1024;
        let mut f = vec![0u8; 64];
        f[0] = cmd;
        f[2] = 0xff;
        f[7] = sges;
        f[8..12].copy_from_slice(&context.to_le_bytes());
        f[0x10..0x12].copy_from_slice(&flags.to_le_bytes());
        f[0x14..0x18].copy_from_slice(&data_len.to_le_bytes());
        (context, addr, f)
    }

    /// Posts the frame and waits for it: polling its status if it is
    /// not posted, else for its context in the reply queue.
    fn run(&mut self, context: u32, addr: u64, frame: &[u8]) -> Done {
        self.ram.write(addr, frame);
        // ppc encoding: address, extra frames << 1, valid bit.
        self.set_reg(IQP, addr as u32 | 1);
        let polled = u16::from_le_bytes([frame[0x10], frame[0x11]]) & DONT_POST != 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        if polled {
            while self.ram.read(addr + 2, 1)[0] == 0xff {
                assert!(Instant::now() < deadline, "polled frame never completed");
                std::thread::sleep(Duration::from_millis(1));
            }
        } else {
            self.wait_replies(&mut HashSet::from([context]), deadline);
        }
        let hdr = self.ram.read(addr, 4);
        let sense_addr = u64::from(u32::from_le_bytes(frame[0x18..0x1c].try_into().unwrap()));
        Done {
            cmd_status: hdr[2],
            scsi_status: hdr[3],
            sense: if hdr[2] == STAT_SCSI_DONE_WITH_ERROR {
                self.ram.read(sense_addr, usize::from(hdr[1]))
            } else {
                Vec::new()
            },
        }
    }

    /// Waits for interrupts and takes replies until every context of
    /// `contexts` came.
    fn wait_replies(&mut self, contexts: &mut HashSet<u32>, deadline: Instant) {
        loop {
            let producer = u32::from_le_bytes(self.ram.read(self.producer, 4).try_into().unwrap());
            while self.tail != producer {
                let slot = self.ring + 4 * u64::from(self.tail);
                let got = u32::from_le_bytes(self.ram.read(slot, 4).try_into().unwrap());
                self.tail = (self.tail + 1) % REPLY_ENTRIES;
                self.ram.write(self.consumer, &self.tail.to_le_bytes());
                contexts.remove(&got);
            }
            if contexts.is_empty() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no reply for contexts {contexts:?}");
            let mut p = libc::pollfd {
                fd: self.msix.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
            if self.msix.read().is_ok() {
                // Acknowledge, as Linux does.
                let status = self.reg(OSTS);
                self.set_reg(ODCR0, status);
            }
        }
    }

    /// INIT, polled, then replies unmasked.
    fn init(&mut self) {
        let mut q = Vec::new();
        q.extend_from_slice(&0u32.to_le_bytes());
        q.extend_from_slice(&REPLY_ENTRIES.to_le_bytes());
        for a in [self.ring, self.producer, self.consumer] {
            q.extend_from_slice(&a.to_le_bytes());
        }
        self.ram.write(self.qinfo, &q);
        self.ram.write(self.producer, &[0; 8]);
        let (c, addr, mut f) = self.frame(INIT, DONT_POST, 0, 32);
        f[0x18..0x20].copy_from_slice(&self.qinfo.to_le_bytes());
        assert_eq!(self.run(c, addr, &f).cmd_status, STAT_OK);
        assert_eq!(self.reg(OSP0) >> 28, 0xc, "OPERATIONAL");
        self.set_reg(OMSK, !0x8000_0000);
    }

    /// A DCMD reading `len` bytes into a fresh low buffer (32-bit SGE, as
    /// Linux sends them); returns the status and the data.
    fn dcmd(&mut self, opcode: u32, len: u32, flags: u16) -> (u8, Vec<u8>) {
        let buf = self.ram.alloc_in(0, u64::from(len).max(1), 64);
        self.ram.write(buf, &vec![0xee; len as usize]);
        let (c, addr, mut f) = self.frame(DCMD, flags | DIR_READ, 1, len);
        f[0x18..0x1c].copy_from_slice(&opcode.to_le_bytes());
        f[0x28..0x2c].copy_from_slice(&(buf as u32).to_le_bytes());
        f[0x2c..0x30].copy_from_slice(&len.to_le_bytes());
        let done = self.run(c, addr, &f);
        (done.cmd_status, self.ram.read(buf, len as usize))
    }

    /// LD_READ/LD_WRITE of `blocks` at `lba` of drive `target`, on IEEE
    /// SGEs of one page each in high memory at `buf`.
    fn ld_io(&mut self, write: bool, target: u8, lba: u64, blocks: u32, buf: u64) -> Done {
        let (c, addr, f) = self.ld_frame(write, target, lba, blocks, buf);
        self.run(c, addr, &f)
    }

    /// The frame of [`Mfi::ld_io`]: its context, address and bytes.
    fn ld_frame(
        &mut self,
        write: bool,
        target: u8,
        lba: u64,
        blocks: u32,
        buf: u64,
    ) -> (u32, u64, Vec<u8>) {
        let len = u64::from(blocks) * 512;
        let pages: Vec<(u64, u32)> = (0..len.div_ceil(4096))
            .map(|i| (buf + i * 4096, (len - i * 4096).min(4096) as u32))
            .collect();
        let cmd = if write { LD_WRITE } else { LD_READ };
        let (c, addr, mut f) = self.frame(cmd, IEEE | SGL64, pages.len() as u8, blocks);
        f[1] = 96;
        f[4] = target;
        let sense = self.sense + u64::from(c) * 128;
        f[0x18..0x1c].copy_from_slice(&(sense as u32).to_le_bytes());
        f[0x20..0x28].copy_from_slice(&lba.to_le_bytes());
        f.truncate(0x28);
        for (a, l) in pages {
            f.extend_from_slice(&a.to_le_bytes());
            f.extend_from_slice(&l.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
        }
        (c, addr, f)
    }

    /// LD_SCSI_IO of `cdb` to drive `target` with `len` bytes at `buf`
    /// (one 64-bit SGE; none if `len` is 0).
    fn scsi(&mut self, target: u8, cdb: &[u8], len: u32, buf: u64) -> Done {
        let sges = u8::from(len > 0);
        let (c, addr, mut f) = self.frame(LD_SCSI_IO, SGL64, sges, len);
        f[1] = 96;
        f[4] = target;
        f[6] = cdb.len() as u8;
        let sense = self.sense + u64::from(c) * 128;
        f[0x18..0x20].copy_from_slice(&sense.to_le_bytes());
        f[0x20..0x20 + cdb.len()].copy_from_slice(cdb);
        f.truncate(0x30);
        if len > 0 {
            f.extend_from_slice(&buf.to_le_bytes());
            f.extend_from_slice(&len.to_le_bytes());
        }
        self.run(c, addr, &f)
    }
}

#[test]
fn probe_sequence_as_linux_sends_it() {
    let dir = TempDir::new().unwrap();
    let img = image(&dir, "disk.img", 7);
    let daemon = Daemon::start_kind_in("megasas", dir, &["--disk", img.to_str().unwrap()]);
    let mut m = Mfi::connect(&daemon.socket);
    assert_eq!(m.config(0, 4), 0x0060_1000);
    assert_eq!(m.config(0x2c, 4), 0x1013_1000);
    assert_eq!(m.config(0x08, 4) >> 8, 0x01_0400);
    assert_eq!(m.reg(OSP0), 0xb450_03e8, "READY, 1000 commands, 80 SGEs");
    m.init();

    // The DCMDs of the probe, polled.
    let (s, info) = m.dcmd(CTRL_GET_INFO, 2384, DONT_POST);
    assert_eq!(s, STAT_OK);
    assert_eq!(info[0..8], [0x00, 0x10, 0x60, 0x00, 0x00, 0x10, 0x13, 0x10]);
    assert_eq!(u16::from_le_bytes([info[0x5c0], info[0x5c1]]), 1, "one LD");
    let (s, pds) = m.dcmd(PD_LIST_QUERY, 8192, DONT_POST);
    assert_eq!((s, &pds[4..8]), (STAT_OK, &[0u8; 4][..]));
    let (s, lds) = m.dcmd(LD_LIST_QUERY, 268, DONT_POST);
    assert_eq!((s, lds[4], lds[11]), (STAT_OK, 1, 0));
    let (s, events) = m.dcmd(EVENT_GET_INFO, 20, DONT_POST);
    assert_eq!((s, events), (STAT_OK, vec![0; 20]));

    // The scan, posted: INQUIRY, READ CAPACITY(16), TEST UNIT READY with
    // no SGE, a missing drive.
    let buf = HIGH + MIB;
    let d = m.scsi(0, &[0x12, 0, 0, 0, 36, 0], 36, buf);
    assert_eq!((d.cmd_status, d.scsi_status), (STAT_OK, 0));
    assert_eq!(&m.ram.read(buf + 8, 8), b"RUST-VMM");
    let mut rc16 = [0u8; 16];
    rc16[0] = 0x9e;
    rc16[1] = 0x10;
    rc16[13] = 32;
    assert_eq!(m.scsi(0, &rc16, 32, buf).cmd_status, STAT_OK);
    let last = u64::from_be_bytes(m.ram.read(buf, 8).try_into().unwrap());
    assert_eq!(last, IMAGE_SIZE / 512 - 1);
    assert_eq!(m.scsi(0, &[0, 0, 0, 0, 0, 0], 0, 0).cmd_status, STAT_OK);
    assert_eq!(m.scsi(1, &[0x12, 0, 0, 0, 36, 0], 36, buf).cmd_status, 0x0c);
    // An unknown opcode: CHECK CONDITION with sense.
    let d = m.scsi(0, &[0xc5, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, 0);
    assert_eq!(
        (d.cmd_status, d.scsi_status),
        (STAT_SCSI_DONE_WITH_ERROR, 2)
    );
    assert_eq!((d.sense[2], d.sense[12]), (5, 0x20));

    // EVENT_WAIT is held (no reply); a device reset drops it and goes
    // back to READY.
    let (_, addr, mut f) = m.frame(DCMD, 0, 0, 0);
    f[0x18..0x1c].copy_from_slice(&EVENT_WAIT.to_le_bytes());
    m.ram.write(addr, &f);
    m.set_reg(IQP, addr as u32 | 1);
    let (s, _) = m.dcmd(CACHE_FLUSH, 0, DONT_POST);
    assert_eq!(s, STAT_OK);
    assert_eq!(m.ram.read(addr + 2, 1)[0], 0xff, "EVENT_WAIT held");
    m.client.reset_device();
    assert_eq!(m.reg(OSP0) >> 28, 0xb);
    // The doorbell's reset works as well.
    m.client.write_region(CONFIG_REGION, 4, &[0x07, 0]);
    m.init();
    m.set_reg(IDB, 7);
    assert_eq!(m.reg(OSP0) >> 28, 0xb);
}

fn io_reaches_the_image(extra: &[&str]) {
    let dir = TempDir::new().unwrap();
    let img = image(&dir, "disk.img", 3);
    let mut args = vec!["--disk", img.to_str().unwrap()];
    args.extend_from_slice(extra);
    let daemon = Daemon::start_kind_in("megasas", dir, &args);
    let mut m = Mfi::connect(&daemon.socket);
    m.init();
    let buf = HIGH + MIB;

    // LD_READ: 64 KiB at block 100, from the image.
    let d = m.ld_io(false, 0, 100, 128, buf);
    assert_eq!(d.cmd_status, STAT_OK);
    assert_eq!(m.ram.read(buf, 65536), read_image(&img, 100 * 512, 65536));
    // LD_WRITE: 12 KiB at block 2000.
    let w = pattern(99, 12288);
    m.ram.write(buf, &w);
    assert_eq!(m.ld_io(true, 0, 2000, 24, buf).cmd_status, STAT_OK);
    assert_eq!(read_image(&img, 2000 * 512, 12288), w);

    // LD_SCSI_IO: READ(10) and WRITE(16).
    let d = m.scsi(0, &[0x28, 0, 0, 0, 0x01, 0x00, 0, 0, 8, 0], 4096, buf);
    assert_eq!(d.cmd_status, STAT_OK);
    assert_eq!(m.ram.read(buf, 4096), read_image(&img, 256 * 512, 4096));
    let w = pattern(42, 8192);
    m.ram.write(buf, &w);
    let mut w16 = [0u8; 16];
    w16[0] = 0x8a;
    w16[8..10].copy_from_slice(&3000u16.to_be_bytes());
    w16[13] = 16;
    assert_eq!(m.scsi(0, &w16, 8192, buf).cmd_status, STAT_OK);
    assert_eq!(read_image(&img, 3000 * 512, 8192), w);
    // Past the end: LBA OUT OF RANGE in the sense buffer.
    let last = (IMAGE_SIZE / 512) as u32;
    let d = m.ld_io(false, 0, u64::from(last), 1, buf);
    assert_eq!(
        (d.cmd_status, d.scsi_status),
        (STAT_SCSI_DONE_WITH_ERROR, 2)
    );
    assert_eq!((d.sense.len(), d.sense[2], d.sense[12]), (18, 5, 0x21));
    // Eight frames posted at once, completed in any order.
    let w = pattern(5, 64 * 512);
    m.ram.write(buf, &w);
    let mut contexts = HashSet::new();
    let mut frames = Vec::new();
    for i in 0..8u64 {
        let (c, addr, f) = m.ld_frame(true, 0, 4000 + 8 * i, 8, buf + i * 4096);
        m.ram.write(addr, &f);
        contexts.insert(c);
        frames.push(addr);
    }
    for addr in &frames {
        m.set_reg(IQP, *addr as u32 | 1);
    }
    m.wait_replies(&mut contexts, Instant::now() + Duration::from_secs(10));
    for addr in frames {
        assert_eq!(m.ram.read(addr + 2, 1)[0], STAT_OK);
    }
    assert_eq!(read_image(&img, 4000 * 512, 64 * 512), w);
}

#[test]
fn io_through_ld_io_and_scsi_io_reaches_the_image() {
    io_reaches_the_image(&[]);
}

#[test]
fn io_on_io_threads_reaches_the_image() {
    io_reaches_the_image(&["--io-threads", "2"]);
}

#[test]
fn io_on_the_event_loop_reaches_the_image() {
    io_reaches_the_image(&["--aio", "sync"]);
}

/// With O_DIRECT, in every mode: the megaraid driver's buffers go
/// straight to the image, or through a bounce buffer, with the right
/// bytes either way.
#[test]
fn direct_io_reaches_the_image_in_every_mode() {
    for aio in ["io_uring", "threads", "sync"] {
        io_reaches_the_image(&["--direct", "--aio", aio]);
    }
}

#[test]
fn two_read_only_disks() {
    let dir = TempDir::new().unwrap();
    let a = image(&dir, "a.img", 1);
    let b = image(&dir, "b.img", 2);
    let daemon = Daemon::start_kind_in(
        "megasas",
        dir,
        &[
            "--disk",
            a.to_str().unwrap(),
            "--disk",
            b.to_str().unwrap(),
            "--readonly",
        ],
    );
    let mut m = Mfi::connect(&daemon.socket);
    m.init();
    let (_, lds) = m.dcmd(LD_LIST_QUERY, 268, DONT_POST);
    assert_eq!((lds[4], lds[11], lds[12]), (2, 0, 1));
    let buf = HIGH + MIB;
    // Each drive reads its own image.
    for (t, img) in [(0u8, &a), (1, &b)] {
        assert_eq!(m.ld_io(false, t, 8, 8, buf).cmd_status, STAT_OK);
        assert_eq!(m.ram.read(buf, 4096), read_image(img, 8 * 512, 4096));
    }
    // Writes fail with DATA PROTECT; the image is unchanged.
    let before = read_image(&b, 0, 4096);
    let d = m.ld_io(true, 1, 0, 8, buf);
    assert_eq!(d.cmd_status, STAT_SCSI_DONE_WITH_ERROR);
    assert_eq!((d.sense[2], d.sense[12]), (7, 0x27));
    assert_eq!(read_image(&b, 0, 4096), before);
    // MODE SENSE reports the write protection.
    let d = m.scsi(1, &[0x1a, 0, 0x3f, 0, 0xff, 0], 255, buf);
    assert_eq!(d.cmd_status, STAT_OK);
    assert_eq!(m.ram.read(buf + 2, 1)[0] & 0x80, 0x80);
}

/// The adapter moves to a new daemon through the control socket's snapshot
/// and `--restore`, as an operator moves a device: the reply queue goes on
/// where it was, the held EVENT_WAIT and a frame posted while paused come
/// along, and I/O continues on the same image.
#[test]
fn snapshot_moves_the_adapter_to_a_new_daemon() {
    let dir = TempDir::new().unwrap();
    let img = image(&dir, "disk.img", 9);
    let api = dir.as_path().join("api.sock");
    let snap = dir.as_path().join("megasas.snap");
    let (img_s, api_s, snap_s) = (
        img.to_str().unwrap().to_string(),
        api.to_str().unwrap().to_string(),
        snap.to_str().unwrap().to_string(),
    );
    let mut daemon =
        Daemon::start_kind_in("megasas", dir, &["--disk", &img_s, "--api-socket", &api_s]);
    wait_for_socket(&api);
    let mut m = Mfi::connect(&daemon.socket);
    m.init();
    let buf = HIGH + MIB;
    let w1 = pattern(1, 4096);
    m.ram.write(buf, &w1);
    assert_eq!(m.ld_io(true, 0, 64, 8, buf).cmd_status, STAT_OK);
    // An EVENT_WAIT, held.
    let (_, wait, mut f) = m.frame(DCMD, 0, 0, 0);
    f[0x18..0x1c].copy_from_slice(&EVENT_WAIT.to_le_bytes());
    m.ram.write(wait, &f);
    m.set_reg(IQP, wait as u32 | 1);

    // Paused, a posted write is queued, not run.
    api_ok(&api, &["pause"]);
    let w2 = pattern(2, 4096);
    m.ram.write(buf + 0x10000, &w2);
    let (c, addr, f) = m.ld_frame(true, 0, 128, 8, buf + 0x10000);
    m.ram.write(addr, &f);
    m.set_reg(IQP, addr as u32 | 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        m.ram.read(addr + 2, 1)[0],
        0xff,
        "a paused adapter ran a frame"
    );
    api_ok(&api, &["snapshot", &snap_s]);
    let state = stream::decode(&std::fs::read(&snap).unwrap());
    assert_eq!(state.kind, "megasas");
    let s = state.state();
    assert_eq!(s["regs"]["state"], "Operational");
    assert_eq!(s["event_wait"]["addr"], wait);
    assert_eq!(s["queued"][0], addr);
    assert_eq!(s["reply_queue"]["head"], 1);

    // The old daemon dies; a new one starts from the snapshot.
    daemon.kill();
    std::fs::remove_file(&api).unwrap();
    daemon.restart(&[
        "--disk",
        &img_s,
        "--api-socket",
        &api_s,
        "--restore",
        &snap_s,
    ]);
    wait_for_socket(&api);
    m.reconnect(&daemon.socket);
    // The queued write runs once guest memory is there, and is posted
    // after the first reply.
    m.wait_replies(
        &mut HashSet::from([c]),
        Instant::now() + Duration::from_secs(10),
    );
    assert_eq!(m.ram.read(addr + 2, 1)[0], STAT_OK);
    assert_eq!(read_image(&img, 128 * 512, 4096), w2);
    assert_eq!(m.reg(OSP0) >> 28, 0xc, "still OPERATIONAL");
    // Reads and writes go on; the EVENT_WAIT is still held (never
    // completed), and a reset drops it.
    assert_eq!(m.ld_io(false, 0, 64, 8, buf).cmd_status, STAT_OK);
    assert_eq!(m.ram.read(buf, 4096), w1);
    assert_eq!(m.ram.read(wait + 2, 1)[0], 0xff);
    m.client.reset_device();
    assert_eq!(m.reg(OSP0) >> 28, 0xb);
}

/// A live migration (v2, as a VMM drives it over the raw client) from one
/// daemon to another on the same image: the adapter keeps running through
/// PRE_COPY with its writes in the dirty log, its whole state moves in
/// STOP_COPY, and the driver carries on at the destination: same reply
/// queue position, the EVENT_WAIT still held, I/O on the same image.
#[test]
fn live_migration_between_two_daemons() {
    use common::mig::*;
    const PAGE: u64 = 4096;
    let dir = TempDir::new().unwrap();
    let img = image(&dir, "disk.img", 4);
    let img_s = img.to_str().unwrap().to_string();
    let src = Daemon::start_kind_in("megasas", dir, &["--disk", &img_s]);
    let dst = Daemon::start_kind_in("megasas", TempDir::new().unwrap(), &["--disk", &img_s]);
    let mut m = Mfi::connect_raw(&src.socket);
    m.init();
    let buf = HIGH + MIB;
    let w1 = pattern(1, 4096);
    m.ram.write(buf, &w1);
    assert_eq!(m.ld_io(true, 0, 16, 8, buf).cmd_status, STAT_OK);
    let (_, wait, mut f) = m.frame(DCMD, 0, 0, 0);
    f[0x18..0x1c].copy_from_slice(&EVENT_WAIT.to_le_bytes());
    m.ram.write(wait, &f);
    m.set_reg(IQP, wait as u32 | 1);

    // PRE_COPY: the adapter runs on; what it writes is in the dirty log.
    let ranges = [(LOW, 8 * MIB), (HIGH, 8 * MIB)];
    logging_start(&mut m.client, PAGE, &ranges).ok();
    set_state_ok(&mut m.client, PRE_COPY);
    assert!(read_stream(&mut m.client, 4096).is_empty());
    let into = HIGH + 3 * MIB;
    assert_eq!(m.ld_io(false, 0, 16, 8, into).cmd_status, STAT_OK);
    assert_eq!(m.ram.read(into, 4096), w1);
    let dirty = report(&mut m.client, HIGH, 8 * MIB, PAGE);
    assert_eq!(dirty, pages_of(HIGH, PAGE, into, 4096), "the read's pages");
    let dirty = report(&mut m.client, LOW, 8 * MIB, PAGE);
    assert!(dirty.contains(&(m.ring & !(PAGE - 1))), "reply ring");
    assert!(
        dirty.contains(&(m.producer & !(PAGE - 1))),
        "producer index"
    );

    // STOP_COPY: the whole state, in one stream.
    set_state_ok(&mut m.client, STOP_COPY);
    let bytes = read_stream(&mut m.client, 512);
    let s = stream::decode(&bytes);
    assert_eq!(s.kind, "megasas");
    let state = s.state();
    assert_eq!(state["regs"]["state"], "Operational");
    assert_eq!(state["event_wait"]["addr"], wait);
    assert_eq!(state["reply_queue"]["head"], 2);
    set_state_ok(&mut m.client, STOP);
    logging_stop(&mut m.client).ok();

    // The destination resumes from the stream; the driver moves there.
    let mut c = RawClient::connect_negotiated(&dst.socket);
    m.ram.map_into(&mut c);
    c.set_irq_eventfds(MSIX_INDEX, 0, &[m.msix.as_raw_fd()]);
    set_state_ok(&mut c, RESUMING);
    write_stream(&mut c, &bytes, 1000);
    set_state_ok(&mut c, STOP);
    set_state_ok(&mut c, RUNNING);
    drop(std::mem::replace(&mut m.client, c));
    assert_eq!(m.reg(OSP0) >> 28, 0xc, "OPERATIONAL at the destination");
    let w2 = pattern(2, 8192);
    m.ram.write(buf, &w2);
    assert_eq!(m.ld_io(true, 0, 32, 16, buf).cmd_status, STAT_OK);
    assert_eq!(read_image(&img, 32 * 512, 8192), w2);
    assert_eq!(m.ld_io(false, 0, 16, 8, into).cmd_status, STAT_OK);
    assert_eq!(m.ram.read(into, 4096), w1);
    assert_eq!(m.ram.read(wait + 2, 1)[0], 0xff, "EVENT_WAIT still held");
    drop(src);
    drop(dst);
}

/// `api ... upgrade` under the published client: eight write frames
/// posted just before the upgrade and four posted while it runs all
/// complete once, after it; the EVENT_WAIT the driver left is still held
/// by the new daemon; the reply queue goes on where it was; the image has
/// every write; the replaced daemons exit 0.
#[test]
fn frames_in_flight_survive_upgrades() {
    upgrade::become_subreaper();
    let dir = TempDir::new().unwrap();
    let img = image(&dir, "disk.img", 11);
    let api = dir.as_path().join("api.sock");
    let (img_s, api_s) = (
        img.to_str().unwrap().to_string(),
        api.to_str().unwrap().to_string(),
    );
    let mut daemon = Daemon::start_kind_in(
        "megasas",
        dir,
        &[
            "--disk",
            &img_s,
            "--api-socket",
            &api_s,
            "--io-threads",
            "2",
        ],
    );
    wait_for_socket(&api);
    let socket_s = daemon.socket.to_str().unwrap().to_string();
    let mut m = Mfi::connect(&daemon.socket);
    m.init();
    let buf = HIGH + MIB;
    // An EVENT_WAIT, held.
    let (_, wait, mut f) = m.frame(DCMD, 0, 0, 0);
    f[0x18..0x1c].copy_from_slice(&EVENT_WAIT.to_le_bytes());
    m.ram.write(wait, &f);
    m.set_reg(IQP, wait as u32 | 1);

    for (round, threads) in [(0u64, "0"), (1, "2")] {
        let w = pattern(20 + round as u8, 12 * 4096);
        m.ram.write(buf, &w);
        let base = 1000 + round * 200;
        let mut contexts = HashSet::new();
        let mut frames = Vec::new();
        for i in 0..12u64 {
            let (c, addr, f) = m.ld_frame(true, 0, base + 8 * i, 8, buf + i * 4096);
            m.ram.write(addr, &f);
            contexts.insert(c);
            frames.push(addr);
        }
        for addr in &frames[..8] {
            m.set_reg(IQP, *addr as u32 | 1);
        }
        // Four more go to the inbound queue port while the upgrade runs.
        let api_path = api.clone();
        let args = vec![
            "upgrade".to_string(),
            "--".into(),
            "megasas".into(),
            "--socket".into(),
            socket_s.clone(),
            "--disk".into(),
            img_s.clone(),
            "--api-socket".into(),
            api_s.clone(),
            "--io-threads".into(),
            threads.into(),
        ];
        let upgrade = std::thread::spawn(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            common::api(&api_path, &a)
        });
        for addr in &frames[8..] {
            m.set_reg(IQP, *addr as u32 | 1);
        }
        let (ok, v) = upgrade.join().unwrap();
        assert!(ok, "{v}");
        daemon.successors.push(v["pid"].as_u64().unwrap() as u32);
        m.wait_replies(&mut contexts, Instant::now() + Duration::from_secs(10));
        for addr in frames {
            assert_eq!(m.ram.read(addr + 2, 1)[0], STAT_OK);
        }
        assert_eq!(read_image(&img, base * 512, 12 * 4096), w);
        assert_eq!(m.reg(OSP0) >> 28, 0xc, "still OPERATIONAL");
        // Reads go on through the new daemon.
        assert_eq!(m.ld_io(false, 0, base, 8, buf + MIB).cmd_status, STAT_OK);
        assert_eq!(m.ram.read(buf + MIB, 4096), w[..4096]);
        assert_eq!(
            m.ram.read(wait + 2, 1)[0],
            0xff,
            "the EVENT_WAIT was completed"
        );
    }
    assert_eq!(daemon.child.wait().unwrap().code(), Some(0));
    assert_eq!(
        upgrade::wait_exit(daemon.successors[0], Duration::from_secs(10)),
        Some(0)
    );
}

/// A full file system under `--on-error report`: the write fails with
/// DATA PROTECT, SPACE ALLOCATION FAILED, and the adapter goes on; under
/// `--on-error stop` it waits (the control socket says why), frames
/// posted after it wait too, and `resume` runs them once there is room.
/// Needs root (a tmpfs of its own); prints SKIP without.
#[test]
fn a_full_disk_is_reported_or_stops_until_resumed() {
    for aio in ["io_uring", "threads", "sync"] {
        common::small_fs::in_private_mount_ns("megasas on a full disk", move || {
            full_disk_with(aio)
        });
    }
}

fn full_disk_with(aio: &str) {
    use common::small_fs::SmallFs;
    use std::os::unix::fs::FileExt;
    // A sparse 16 MiB image on a 4 MiB tmpfs; the write goes to a hole.
    const HOLE_LBA: u64 = 8 * MIB / 512;
    let w = pattern(11, 64 << 10);
    for policy in ["report", "stop"] {
        let dir = TempDir::new().unwrap();
        let fs = SmallFs::mount(&dir.as_path().join("fs"), 4 * MIB);
        let img = fs.dir.join("disk.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(16 * MIB).unwrap();
        f.write_all_at(&pattern(7, 4096), 0).unwrap();
        let api = dir.as_path().join("api.sock");
        let api_s = api.display().to_string();
        let args = [
            "--disk",
            img.to_str().unwrap(),
            "--aio",
            aio,
            "--on-error",
            policy,
            "--api-socket",
            &api_s,
        ];
        let daemon = Daemon::start_kind_in("megasas", dir, &args);
        wait_for_socket(&api);
        let mut m = Mfi::connect(&daemon.socket);
        m.init();
        let buf = HIGH + MIB;
        m.ram.write(buf, &w);
        let filler = fs.fill(16 << 10);
        if policy == "report" {
            let d = m.ld_io(true, 0, HOLE_LBA, 128, buf);
            assert_eq!(
                (d.cmd_status, d.sense.get(2), d.sense.get(12)),
                (STAT_SCSI_DONE_WITH_ERROR, Some(&7), Some(&0x27)),
                "{aio}: {d:?}"
            );
            assert_eq!(api_ok(&api, &["status"])["stopped_on_error"], false);
            // Reads go on.
            assert_eq!(m.ld_io(false, 0, 0, 8, buf).cmd_status, STAT_OK);
            assert_eq!(m.ram.read(buf, 4096), pattern(7, 4096));
            // The tmpfs goes before the daemon's directory.
            drop((m, fs, daemon));
            continue;
        }
        let (wc, waddr, wf) = m.ld_frame(true, 0, HOLE_LBA, 128, buf);
        m.ram.write(waddr, &wf);
        m.set_reg(IQP, waddr as u32 | 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            let v = api_ok(&api, &["status"]);
            if v["stopped_on_error"] == true {
                break v;
            }
            assert!(Instant::now() < deadline, "{aio}: never stopped: {v}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let why = status["stop_error"].as_str().unwrap_or_default();
        assert!(
            why.contains(&format!("write of 65536 bytes at block {HOLE_LBA}"))
                && why.contains("No space left on device"),
            "{aio}: {status}"
        );
        // A read posted now waits as well.
        let rbuf = HIGH + 4 * MIB;
        let (rc, raddr, rf) = m.ld_frame(false, 0, 0, 8, rbuf);
        m.ram.write(raddr, &rf);
        m.set_reg(IQP, raddr as u32 | 1);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(m.ram.read(waddr + 2, 1)[0], 0xff, "{aio}: write completed");
        assert_eq!(m.ram.read(raddr + 2, 1)[0], 0xff, "{aio}: read completed");
        // Room, then resume: both complete, the write whole in the image.
        std::fs::remove_file(filler).unwrap();
        api_ok(&api, &["resume"]);
        m.wait_replies(
            &mut HashSet::from([wc, rc]),
            Instant::now() + Duration::from_secs(10),
        );
        assert_eq!(m.ram.read(waddr + 2, 1)[0], STAT_OK, "{aio}");
        assert_eq!(m.ram.read(raddr + 2, 1)[0], STAT_OK, "{aio}");
        assert_eq!(m.ram.read(rbuf, 4096), pattern(7, 4096));
        assert_eq!(read_image(&img, HOLE_LBA * 512, w.len()), w, "{aio}");
        assert_eq!(api_ok(&api, &["status"])["stopped_on_error"], false);
        drop((m, fs, daemon));
    }
}
