//! virtio-net over the virtio PCI transport, driven by the test-side
//! virtio driver of `integration_tests` through the in-process transport,
//! each queue pair on a `SOCK_SEQPACKET` socket pair
//! (`backends::net::seqpacket`): the test holds the other end, so it
//! decides when frames arrive, reads exactly what the device wrote, and can
//! make the device's writes block, which a TAP never does.

use std::time::Duration;

use backends::net::seqpacket::{seqpacket_pair, SeqPacketPeer, FILL_FRAME_LEN};
use backends::net::NetBackend;
use backends::virtio::VirtioDevice;
use backends::virtio_net::{NetHeader, VirtioNetConfig, VirtioNetPci, NET_HDR_LEN};
use integration_tests::virtio_driver::common_cfg as cc;
use integration_tests::virtio_driver::*;
use vfio_user_server::device::{AsLifecycle, DeviceContext, Interest};
use vfio_user_server::pci::PciAdapter;

/// The device as these tests serve it.
type Net = InProcess<PciAdapter<VirtioNetPci>>;
/// The driver of it.
type Driver = VirtioDriver<Net>;

// Feature bits (`VIRTIO_NET_F_*`, `VIRTIO_RING_F_*`).
const CSUM: u64 = 1 << 0;
const GUEST_CSUM: u64 = 1 << 1;
const CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
const MTU: u64 = 1 << 3;
const MAC: u64 = 1 << 5;
const GUEST_TSO4: u64 = 1 << 7;
const GUEST_TSO6: u64 = 1 << 8;
const GUEST_ECN: u64 = 1 << 9;
const GUEST_UFO: u64 = 1 << 10;
const HOST_TSO4: u64 = 1 << 11;
const HOST_TSO6: u64 = 1 << 12;
const HOST_ECN: u64 = 1 << 13;
const HOST_UFO: u64 = 1 << 14;
const MRG_RXBUF: u64 = 1 << 15;
const STATUS: u64 = 1 << 16;
const CTRL_VQ: u64 = 1 << 17;
const GUEST_ANNOUNCE: u64 = 1 << 21;
const MQ: u64 = 1 << 22;
const GUEST_USO4: u64 = 1 << 54;
const GUEST_USO6: u64 = 1 << 55;
const HOST_USO: u64 = 1 << 56;
const HASH_REPORT: u64 = 1 << 57;
const RSS: u64 = 1 << 60;

/// Offered whatever the options.
const BASE: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_RING_F_INDIRECT_DESC
    | MAC
    | STATUS
    | MTU
    | MRG_RXBUF
    | CTRL_VQ
    | GUEST_ANNOUNCE;
/// Offered with offloads.
const OFFLOADS: u64 = CSUM
    | GUEST_CSUM
    | HOST_TSO4
    | HOST_TSO6
    | HOST_ECN
    | GUEST_TSO4
    | GUEST_TSO6
    | GUEST_ECN
    | CTRL_GUEST_OFFLOADS;
const ALL: u64 = u64::MAX;

// Control classes and acks (`VIRTIO_NET_CTRL_*`).
const CTRL_RX: u8 = 0;
const CTRL_MAC: u8 = 1;
const CTRL_VLAN: u8 = 2;
const CTRL_ANNOUNCE: u8 = 3;
const CTRL_MQ: u8 = 4;
const CTRL_OFFLOADS: u8 = 5;
const OK: u8 = 0;
const ERR: u8 = 1;

/// `VIRTIO_NET_S_*`.
const S_LINK_UP: u64 = 1;
const S_ANNOUNCE: u64 = 2;

const DEVICE_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const QUEUE_SIZE: u16 = 64;

/// A virtio-net device with one queue pair per peer, served in-process.
fn device(pairs: usize, offloads: bool) -> (Net, Vec<SeqPacketPeer>) {
    let mut backends: Vec<Box<dyn NetBackend>> = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..pairs {
        let (b, p) = seqpacket_pair().unwrap();
        backends.push(Box::new(b));
        peers.push(p);
    }
    (device_over(backends, offloads), peers)
}

/// A virtio-net device over `backends` (one per queue pair), served
/// in-process.
fn device_over(backends: Vec<Box<dyn NetBackend>>, offloads: bool) -> Net {
    let config = VirtioNetConfig {
        mac: DEVICE_MAC,
        offloads,
        queue_size: QUEUE_SIZE,
        ..Default::default()
    };
    let ctx = DeviceContext::default();
    let net = VirtioNetPci::new(ctx.clone(), backends, config).unwrap();
    InProcess::new(PciAdapter::new(net).unwrap(), ctx)
}

/// A driver of a new device, in 4 MiB of guest RAM, with an eventfd on
/// every interrupt; nothing negotiated yet.
fn connect(pairs: usize, offloads: bool) -> (Driver, Vec<SeqPacketPeer>) {
    connect_with_ram(pairs, offloads, GuestRam::with_regions(&[(0, 4 << 20)]))
}

fn connect_with_ram(pairs: usize, offloads: bool, ram: GuestRam) -> (Driver, Vec<SeqPacketPeer>) {
    let (net, peers) = device(pairs, offloads);
    (driver_of(net, ram), peers)
}

/// A driver of `net`, in `ram`, with an eventfd on every interrupt;
/// nothing negotiated yet.
fn driver_of(net: Net, ram: GuestRam) -> Driver {
    let mut d = VirtioDriver::connect_with_ram(net, ram);
    d.install_msix();
    d.install_intx();
    d
}

/// A device brought up with `want` & offered, every queue of 64
/// descriptors.
fn ready(pairs: usize, want: u64) -> (Driver, Vec<SeqPacketPeer>) {
    let (mut d, peers) = connect(pairs, true);
    d.init(want, QUEUE_SIZE);
    (d, peers)
}

/// The virtio-net device behind the adapter.
fn net(d: &mut Driver) -> &mut VirtioNetPci {
    d.transport.device().device()
}

fn rx(pair: usize) -> usize {
    2 * pair
}

fn tx(pair: usize) -> usize {
    2 * pair + 1
}

/// The control queue: after every pair with multiqueue, after the first
/// without (virtio 1.x 5.1.2).
fn ctrl(d: &Driver) -> usize {
    if d.features & MQ != 0 {
        d.queues.len() - 1
    } else {
        2
    }
}

/// A frame with a vnet header (flags only) and `len - 12` bytes of a
/// pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect();
    let hdr = NetHeader {
        flags: 1,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    f[..NET_HDR_LEN].copy_from_slice(&hdr.encode());
    f
}

/// Posts a receive chain of `lens` bytes (one buffer each) on queue `q`
/// and kicks; returns the head and the buffers.
fn post_rx(d: &mut Driver, q: usize, lens: &[u32]) -> (u16, Vec<(u64, u32)>) {
    let bufs: Vec<(u64, u32)> = lens
        .iter()
        .map(|&l| (d.ram.alloc(u64::from(l), 16), l))
        .collect();
    let descs: Vec<Desc> = bufs.iter().map(|&(a, l)| Desc::writable(a, l)).collect();
    let head = d.push(q, &descs);
    d.kick(q);
    (head, bufs)
}

/// The first `len` bytes of the buffers `bufs`.
fn read_bufs(d: &Driver, bufs: &[(u64, u32)], len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for &(a, l) in bufs {
        let n = l.min(len - out.len() as u32);
        out.extend(d.ram.read(a, n as usize));
    }
    out
}

/// `f` as the guest must see it: `num_buffers` set to `n`.
fn with_num_buffers(f: &[u8], n: u16) -> Vec<u8> {
    let mut f = f.to_vec();
    f[10..12].copy_from_slice(&n.to_le_bytes());
    f
}

/// Lets the device handle what is ready (frames from the peer, room to
/// write), as the event loop would.
fn settle(d: &mut Driver) {
    d.transport.wait(&[], Duration::ZERO);
}

/// Sends the control command `class`/`cmd` with `data`; returns the ack.
fn command(d: &mut Driver, class: u8, cmd: u8, data: &[u8]) -> u8 {
    let mut bytes = vec![class, cmd];
    bytes.extend_from_slice(data);
    let buf = d.ram.alloc(bytes.len() as u64, 8);
    d.ram.write(buf, &bytes);
    let ack = d.ram.alloc(1, 1);
    d.ram.write_u8(ack, 0xee);
    let q = ctrl(d);
    // The header and the data in separate buffers, as Linux sends them.
    let head = d.push(
        q,
        &[
            Desc::readable(buf, 2),
            Desc::readable(buf + 2, data.len() as u32),
            Desc::writable(ack, 1),
        ],
    );
    d.kick(q);
    assert_eq!(d.wait_used(q, 1), [(head, 1)]);
    d.ram.read_u8(ack)
}

#[test]
fn features_offered() {
    for (pairs, offloads) in [(1, true), (1, false), (2, true), (2, false)] {
        let (mut d, _peers) = connect(pairs, offloads);
        let f = d.device_features();
        let mut want = BASE;
        if offloads {
            want |= OFFLOADS;
        }
        if pairs > 1 {
            want |= MQ;
        }
        assert_eq!(f, want, "{pairs} pairs, offloads {offloads}: {f:#x}");
        for never in [
            GUEST_UFO,
            HOST_UFO,
            GUEST_USO4,
            GUEST_USO6,
            HOST_USO,
            HASH_REPORT,
            RSS,
        ] {
            assert_eq!(f & never, 0);
        }
        // Nothing at or above bit 64.
        for select in 2..4 {
            d.common_write(cc::DEVICE_FEATURE_SELECT, 4, select);
            assert_eq!(d.common_read(cc::DEVICE_FEATURE, 4), 0);
        }
        assert_eq!(
            d.common_read(cc::NUM_QUEUES, 2),
            2 * pairs as u64 + 1,
            "receive and transmit per pair, and the control queue"
        );
        let mac: Vec<u8> = (0..6).map(|i| d.device_config(i, 1) as u8).collect();
        assert_eq!(mac, DEVICE_MAC);
        assert_eq!(d.device_config(6, 2), S_LINK_UP);
        assert_eq!(d.device_config(8, 2), pairs as u64);
        assert_eq!(d.device_config(10, 2), 1500);
    }
}

#[test]
fn a_transmit_chain_over_many_descriptors_is_one_frame() {
    let (mut d, peers) = ready(1, ALL);
    let f = frame(1514 + NET_HDR_LEN, 1);
    // The header alone, then the frame cut unevenly, one byte included.
    let cuts = [0, NET_HDR_LEN, 13, 100, 101, 900, f.len()];
    let mut descs = Vec::new();
    for w in cuts.windows(2) {
        let piece = &f[w[0]..w[1]];
        let a = d.ram.alloc(piece.len() as u64, 1);
        d.ram.write(a, piece);
        descs.push(Desc::readable(a, piece.len() as u32));
    }
    let head = d.push(tx(0), &descs);
    d.kick(tx(0));
    assert_eq!(d.wait_used(tx(0), 1), [(head, 0)]);
    assert_eq!(peers[0].recv().unwrap(), Some(f.clone()));
    assert_eq!(peers[0].recv().unwrap(), None);

    // The same through an indirect table.
    let table = d.ram.alloc(16 * descs.len() as u64, 16);
    let ind = d.write_indirect_table(table, &descs);
    let head = d.push(tx(0), &[ind]);
    d.kick(tx(0));
    assert_eq!(d.wait_used(tx(0), 1), [(head, 0)]);
    assert_eq!(peers[0].recv().unwrap(), Some(f));
    assert_eq!(peers[0].recv().unwrap(), None);
    let stats = net(&mut d).device().stats();
    assert_eq!(
        stats.tx_frames.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn a_frame_too_big_for_its_chain_is_dropped_and_the_chain_kept() {
    let (mut d, peers) = ready(1, ALL & !MRG_RXBUF);
    let (head, bufs) = post_rx(&mut d, rx(0), &[60, 40]);
    let big = frame(101, 2);
    peers[0].send(&big).unwrap();
    settle(&mut d);
    assert!(d.poll_used(rx(0)).is_empty(), "the chain is not used");
    assert!(!peers[0].device_has_input(), "the frame was read");
    let stats = net(&mut d).device().stats();
    assert_eq!(
        stats.rx_dropped.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A frame that fills the chain exactly lands in that same chain.
    let fits = frame(100, 3);
    peers[0].send(&fits).unwrap();
    settle(&mut d);
    assert_eq!(d.wait_used(rx(0), 1), [(head, 100)]);
    assert_eq!(read_bufs(&d, &bufs, 100), with_num_buffers(&fits, 1));
    assert_eq!(
        stats.rx_frames.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn a_refused_write_waits_for_the_back_end_to_drain() {
    let (mut d, peers) = ready(1, ALL);
    let fillers = peers[0].fill();
    assert!(fillers > 0 && !peers[0].device_can_write());
    let f = frame(1000, 4);
    let buf = d.ram.alloc(f.len() as u64, 16);
    d.ram.write(buf, &f);
    let head = d.push(tx(0), &[Desc::readable(buf, f.len() as u32)]);
    d.kick(tx(0));
    // WouldBlock: the chain is back in the ring, the device waits for room.
    assert!(d.poll_used(tx(0)).is_empty());
    assert!(net(&mut d).device().watched_fds()[0].interest.write);
    let q = &net(&mut d).queues()[tx(0)];
    assert_eq!(
        virtio_queue::QueueT::next_avail(q),
        0,
        "the chain went back"
    );
    // The peer reads what filled the socket; the device becomes writable
    // and sends the frame.
    for _ in 0..fillers {
        assert_eq!(peers[0].recv().unwrap().unwrap().len(), FILL_FRAME_LEN);
    }
    settle(&mut d);
    assert_eq!(d.wait_used(tx(0), 1), [(head, 0)]);
    assert_eq!(peers[0].recv().unwrap(), Some(f));
    assert!(!net(&mut d).device().watched_fds()[0].interest.write);
}

#[test]
fn mergeable_buffers_take_a_9000_byte_frame() {
    let (mut d, peers) = ready(1, ALL);
    assert_ne!(d.features & MRG_RXBUF, 0);
    let chains: Vec<(u16, Vec<(u64, u32)>)> = (0..8)
        .map(|i| {
            // Some chains of two buffers, as a guest may post them.
            if i % 2 == 0 {
                post_rx(&mut d, rx(0), &[1526])
            } else {
                post_rx(&mut d, rx(0), &[1000, 526])
            }
        })
        .collect();
    let f = frame(9000, 5);
    peers[0].send(&f).unwrap();
    settle(&mut d);
    let used = d.wait_used(rx(0), 6);
    let lens: Vec<u32> = used.iter().map(|u| u.1).collect();
    assert_eq!(lens, [1526, 1526, 1526, 1526, 1526, 1370]);
    let heads: Vec<u16> = chains[..6].iter().map(|c| c.0).collect();
    assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), heads);
    let mut got = Vec::new();
    for ((_, bufs), (_, len)) in chains.iter().zip(&used) {
        got.extend(read_bufs(&d, bufs, *len));
    }
    assert_eq!(
        NetHeader::decode(got[..NET_HDR_LEN].try_into().unwrap()).num_buffers,
        6
    );
    assert_eq!(got, with_num_buffers(&f, 6));
    // The next frame takes the next chain alone.
    let small = frame(64, 6);
    peers[0].send(&small).unwrap();
    settle(&mut d);
    assert_eq!(d.wait_used(rx(0), 1), [(chains[6].0, 64)]);
    assert_eq!(read_bufs(&d, &chains[6].1, 64), with_num_buffers(&small, 1));
}

#[test]
fn every_control_command_is_answered() {
    let (mut d, peers) = ready(2, ALL);
    assert_eq!(d.features & (MQ | CTRL_VQ), MQ | CTRL_VQ);
    for cmd in 0..6 {
        assert_eq!(command(&mut d, CTRL_RX, cmd, &[1]), OK, "RX {cmd}");
    }
    assert_eq!(command(&mut d, CTRL_RX, 6, &[1]), ERR);
    assert_eq!(command(&mut d, CTRL_MAC, 0, &[0; 8]), OK, "MAC_TABLE_SET");
    let new_mac = [0x02, 0, 0, 0, 0, 7];
    assert_eq!(command(&mut d, CTRL_MAC, 1, &new_mac), OK, "MAC_ADDR_SET");
    let mac: Vec<u8> = (0..6).map(|i| d.device_config(i, 1) as u8).collect();
    assert_eq!(mac, new_mac);
    assert_eq!(command(&mut d, CTRL_MAC, 1, &[0x03, 0, 0, 0, 0, 7]), ERR);
    assert_eq!(command(&mut d, CTRL_MAC, 1, &[0; 6]), ERR, "all zeros");
    assert_eq!(command(&mut d, CTRL_MAC, 1, &[0x02, 0, 0]), ERR, "short");
    assert_eq!(command(&mut d, CTRL_VLAN, 0, &[5, 0]), OK);
    assert_eq!(command(&mut d, CTRL_VLAN, 1, &[5, 0]), OK);
    assert_eq!(command(&mut d, CTRL_VLAN, 2, &[5, 0]), ERR);
    assert_eq!(command(&mut d, CTRL_ANNOUNCE, 0, &[]), OK);
    assert_eq!(command(&mut d, CTRL_ANNOUNCE, 1, &[]), ERR);
    // Queue pairs: 1 to 2.
    assert_eq!(net(&mut d).device().active_pairs(), 1);
    assert_eq!(command(&mut d, CTRL_MQ, 0, &2u16.to_le_bytes()), OK);
    assert_eq!(net(&mut d).device().active_pairs(), 2);
    for bad in [0u16, 3] {
        assert_eq!(command(&mut d, CTRL_MQ, 0, &bad.to_le_bytes()), ERR);
    }
    assert_eq!(command(&mut d, CTRL_MQ, 0, &[1]), ERR, "short");
    assert_eq!(command(&mut d, CTRL_MQ, 1, &1u16.to_le_bytes()), ERR);
    assert_eq!(net(&mut d).device().active_pairs(), 2);
    assert_eq!(command(&mut d, CTRL_MQ, 0, &1u16.to_le_bytes()), OK);
    assert_eq!(net(&mut d).device().active_pairs(), 1);
    // Offloads: only among those acked.
    let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
    assert_eq!(peers[0].offloads(), all);
    let csum = GUEST_CSUM.to_le_bytes();
    assert_eq!(command(&mut d, CTRL_OFFLOADS, 0, &csum), OK);
    assert_eq!(net(&mut d).device().offloads(), libc::TUN_F_CSUM);
    for p in &peers {
        assert_eq!(p.offloads(), libc::TUN_F_CSUM);
    }
    let ufo = (GUEST_CSUM | GUEST_UFO).to_le_bytes();
    assert_eq!(command(&mut d, CTRL_OFFLOADS, 0, &ufo), ERR);
    assert_eq!(command(&mut d, CTRL_OFFLOADS, 0, &[0; 4]), ERR);
    assert_eq!(command(&mut d, CTRL_OFFLOADS, 0, &[0; 8]), OK);
    assert_eq!(peers[0].offloads(), 0);
    assert_eq!(command(&mut d, 7, 0, &[]), ERR, "unknown class");
    assert_eq!(command(&mut d, 0xff, 0xff, &[1; 20]), ERR);

    // A command that is not one (no room for a class and a command).
    let buf = d.ram.alloc(1, 1);
    let ack = d.ram.alloc(1, 1);
    d.ram.write_u8(ack, 0xee);
    let q = ctrl(&d);
    let head = d.push(q, &[Desc::readable(buf, 1), Desc::writable(ack, 1)]);
    d.kick(q);
    assert_eq!(d.wait_used(q, 1), [(head, 1)]);
    assert_eq!(d.ram.read_u8(ack), ERR);

    // Without MQ and CTRL_GUEST_OFFLOADS acked, their commands fail.
    let (mut d, _peers) = ready(2, ALL & !MQ & !CTRL_GUEST_OFFLOADS);
    assert_eq!(command(&mut d, CTRL_MQ, 0, &1u16.to_le_bytes()), ERR);
    assert_eq!(command(&mut d, CTRL_OFFLOADS, 0, &csum), ERR);
}

#[test]
fn a_device_reset_clears_the_offloads() {
    let (mut d, peers) = ready(1, ALL);
    let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
    assert_eq!(net(&mut d).device().offloads(), all);
    assert_eq!(peers[0].offloads(), all);
    d.set_status(0);
    assert_eq!(peers[0].offloads(), 0);
    assert_eq!(net(&mut d).device().offloads(), 0);
    // Brought up again without guest offloads: none.
    d.init(ALL & !GUEST_CSUM, QUEUE_SIZE);
    assert_eq!(peers[0].offloads(), 0);
}

#[test]
fn a_restored_device_keeps_its_mac_and_pairs_and_announces_itself() {
    let (mut d, peers) = ready(2, ALL);
    assert_ne!(d.features & GUEST_ANNOUNCE, 0);
    let new_mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    assert_eq!(command(&mut d, CTRL_MAC, 1, &new_mac), OK);
    assert_eq!(command(&mut d, CTRL_MQ, 0, &2u16.to_le_bytes()), OK);
    assert_eq!(d.device_config(6, 2), S_LINK_UP, "no announce before");
    d.transport.device().lifecycle().pause().unwrap();
    let snap = d.transport.device().lifecycle().snapshot().unwrap();
    drop(peers);

    // A new device, as on a migration target: the guest's memory and
    // interrupts first, then the state, then it runs.
    let (mut target, peers) = device(2, true);
    d.attach_to(&mut target);
    for irq in &mut d.msix {
        irq.take();
    }
    target.device().lifecycle().pause().unwrap();
    target.device().lifecycle().restore(&snap).unwrap();
    target.device().lifecycle().resume().unwrap();
    let _source = d.replace_transport(target);
    // The guest hears at once that it must announce itself.
    assert!(d.msix[0].fired(), "configuration interrupt");
    assert_eq!(d.device_config(6, 2), S_LINK_UP | S_ANNOUNCE);
    let mac: Vec<u8> = (0..6).map(|i| d.device_config(i, 1) as u8).collect();
    assert_eq!(mac, new_mac);
    assert_eq!(net(&mut d).device().active_pairs(), 2);
    // The second pair works.
    let (head, bufs) = post_rx(&mut d, rx(1), &[200]);
    let f = frame(150, 7);
    peers[1].send(&f).unwrap();
    settle(&mut d);
    assert_eq!(d.wait_used(rx(1), 1), [(head, 150)]);
    assert_eq!(read_bufs(&d, &bufs, 150), with_num_buffers(&f, 1));
    // The guest announced: the bit goes.
    assert_eq!(command(&mut d, CTRL_ANNOUNCE, 0, &[]), OK);
    assert_eq!(d.device_config(6, 2), S_LINK_UP);
}

#[test]
fn a_chain_of_more_segments_than_one_readv_takes_is_refused() {
    // Two adjacent regions: a buffer across their boundary is two segments
    // of guest memory.
    let ram = GuestRam::with_regions(&[(0, 0x10_0000), (0x10_0000, 0x10_0000)]);
    let (mut d, peers) = connect_with_ram(1, true, ram);
    d.init(ALL, QUEUE_SIZE);
    let across = Desc::readable(0x10_0000 - 8, 16);
    // 600 descriptors (fewer than a readv takes), 1200 segments.
    let table = d.ram.alloc(16 * 600, 16);
    let ind = d.write_indirect_table(table, &[across; 600]);
    let head = d.push(tx(0), &[ind]);
    d.kick(tx(0));
    assert_eq!(d.wait_used(tx(0), 1), [(head, 0)]);
    let sent = peers[0].recv().unwrap().map(|f| f.len());
    assert_eq!(sent, None, "no frame cut short");
    // Receive: the chain goes back to the guest empty, the frame waits.
    let writable = Desc::writable(0x10_0000 - 8, 16);
    let table = d.ram.alloc(16 * 600, 16);
    let ind = d.write_indirect_table(table, &[writable; 600]);
    let head = d.push(rx(0), &[ind]);
    d.kick(rx(0));
    peers[0].send(&frame(9000, 8)).unwrap();
    settle(&mut d);
    assert_eq!(d.wait_used(rx(0), 1), [(head, 0)]);
    assert!(peers[0].device_has_input());
}

#[test]
fn a_frame_that_fills_the_bounce_buffer_is_dropped() {
    let (mut d, peers) = ready(1, ALL);
    // Room for far more than a TAP hands over: the first chain and 47 more.
    let chains: Vec<_> = (0..48).map(|_| post_rx(&mut d, rx(0), &[1526])).collect();
    // A frame longer than the first chain and the bounce buffer: the
    // device cannot tell where it was cut, so drops it.
    let f = frame(1526 + 65565 + 100, 9);
    peers[0].send(&f).unwrap();
    settle(&mut d);
    assert!(d.poll_used(rx(0)).is_empty());
    assert!(!peers[0].device_has_input());
    // The chains are all there for the next frame.
    let small = frame(60, 10);
    peers[0].send(&small).unwrap();
    settle(&mut d);
    assert_eq!(d.wait_used(rx(0), 1), [(chains[0].0, 60)]);
}

#[test]
fn a_paused_device_does_not_watch_its_back_ends() {
    let (mut d, peers) = ready(1, ALL);
    let (head, _) = post_rx(&mut d, rx(0), &[1526]);
    d.transport.device().lifecycle().pause().unwrap();
    assert!(d.transport.device().lifecycle().watched_fds().is_empty());
    // A frame arrives: nothing wakes for it (nor spins on it) until resume.
    peers[0].send(&frame(500, 11)).unwrap();
    settle(&mut d);
    assert!(d.poll_used(rx(0)).is_empty());
    d.transport.device().lifecycle().resume().unwrap();
    assert!(!d.transport.device().lifecycle().watched_fds().is_empty());
    settle(&mut d);
    assert_eq!(d.wait_used(rx(0), 1), [(head, 500)]);
}

#[test]
fn receive_buffers_posted_while_a_pair_is_off_serve_it_once_on() {
    let (mut d, peers) = ready(2, ALL);
    assert_eq!(command(&mut d, CTRL_MQ, 0, &2u16.to_le_bytes()), OK);
    // A frame for pair 1 finds no buffer: the device stops watching for
    // its frames until the guest posts some.
    let f = frame(300, 12);
    peers[1].send(&f).unwrap();
    settle(&mut d);
    assert!(!net(&mut d).device().watched_fds()[1].interest.read);
    assert_eq!(command(&mut d, CTRL_MQ, 0, &1u16.to_le_bytes()), OK);
    // Buffers posted (and kicked) while the pair is off...
    let (head, bufs) = post_rx(&mut d, rx(1), &[1526]);
    assert!(d.poll_used(rx(1)).is_empty());
    // ...take the frame once it is on again, without another doorbell.
    assert_eq!(command(&mut d, CTRL_MQ, 0, &2u16.to_le_bytes()), OK);
    settle(&mut d);
    assert_eq!(d.wait_used(rx(1), 1), [(head, 300)]);
    assert_eq!(read_bufs(&d, &bufs, 300), with_num_buffers(&f, 1));
}

/// Linux may still send on a pair it is turning on (after a resume, before
/// its VQ_PAIRS_SET) or off: the frames go out, and the chains come back.
#[test]
fn frames_sent_on_a_pair_that_is_off_go_out() {
    let (mut d, peers) = ready(2, ALL);
    // One pair on (as after a device reset); the guest sends on pair 1.
    let f = frame(400, 3);
    let a = d.ram.alloc(f.len() as u64, 1);
    d.ram.write(a, &f);
    let head = d.push(tx(1), &[Desc::readable(a, f.len() as u32)]);
    d.kick(tx(1));
    assert_eq!(d.wait_used(tx(1), 1), [(head, 0)]);
    assert_eq!(peers[1].recv().unwrap(), Some(f));
    // Turned on, the pair goes on sending from where it was.
    assert_eq!(command(&mut d, CTRL_MQ, 0, &2u16.to_le_bytes()), OK);
    let g = frame(200, 4);
    let b = d.ram.alloc(g.len() as u64, 1);
    d.ram.write(b, &g);
    let head = d.push(tx(1), &[Desc::readable(b, g.len() as u32)]);
    d.kick(tx(1));
    assert_eq!(d.wait_used(tx(1), 1), [(head, 0)]);
    assert_eq!(peers[1].recv().unwrap(), Some(g));
}

/// A driver without multiqueue has its control queue after the first pair,
/// whatever the device offers (virtio 1.x 5.1.2).
#[test]
fn without_multiqueue_the_control_queue_follows_the_first_pair() {
    let (mut d, _peers) = ready(2, ALL & !MQ);
    assert_eq!(ctrl(&d), 2);
    let mac = [0x02, 0, 0, 0, 0, 9];
    let configured = d.device_config(0, 6);
    assert_eq!(command(&mut d, CTRL_MAC, 1, &mac), OK);
    assert_eq!(d.device_config(0, 6).to_le_bytes()[..6], mac);
    // A reset takes back the MAC the driver set: the next driver (after a
    // reboot, a kexec) reads the configured one.
    d.set_status(0);
    assert_eq!(d.device_config(0, 6), configured);
}

/// A virtio-net state as a snapshot carries it, with any values.
#[derive(serde::Serialize)]
struct NetStateFields {
    mac: [u8; 6],
    active_pairs: u16,
    guest_offloads: Option<u64>,
}

#[test]
fn a_refused_state_leaves_the_device_as_it_was() {
    use vfio_user_server::vm_migration::Snapshot;
    let (mut d, peers) = ready(1, ALL);
    d.transport.device().lifecycle().pause().unwrap();
    let good = d.transport.device().lifecycle().snapshot().unwrap();
    // The transport's state is fine each time; the device's own is not a
    // virtio-net state at all, has more queue pairs than the device, a
    // multicast MAC, or guest offloads the driver did not
    // negotiate (refused when the restored state is activated, before the
    // transport takes its part).
    let with_offloads = |mac: [u8; 6], active_pairs: u16, guest_offloads: Option<u64>| {
        Snapshot::new_from_state(&NetStateFields {
            mac,
            active_pairs,
            guest_offloads,
        })
        .unwrap()
    };
    let fields = |mac: [u8; 6], active_pairs: u16| with_offloads(mac, active_pairs, None);
    let mut unicast = [0u8; 6];
    for (i, b) in unicast.iter_mut().enumerate() {
        *b = d.device_config(i as u64, 1) as u8;
    }
    for device in [
        Snapshot::new_from_state(&7u32).unwrap(),
        fields(unicast, 2),
        fields([0x03, 0, 0, 0, 0, 1], 1),
        with_offloads(unicast, 1, Some(1 << 40)),
    ] {
        let mut snap = good.clone();
        snap.add_snapshot("device".into(), device);
        assert!(d.transport.device().lifecycle().restore(&snap).is_err());
    }
    // The same fields with valid values are taken: the test's state is the
    // device's.
    let mut snap = good.clone();
    snap.add_snapshot("device".into(), fields(unicast, 1));
    d.transport.device().lifecycle().restore(&snap).unwrap();
    d.transport.device().lifecycle().resume().unwrap();
    // Still the device it was: frames from the TAP side reach the guest.
    let (head, bufs) = post_rx(&mut d, rx(0), &[200]);
    let f = frame(150, 7);
    peers[0].send(&f).unwrap();
    settle(&mut d);
    assert_eq!(d.wait_used(rx(0), 1), [(head, 150)]);
    assert_eq!(read_bufs(&d, &bufs, 150), with_num_buffers(&f, 1));
}

#[test]
fn a_state_restored_before_the_driver_came_is_not_its_negotiation() {
    use vfio_user_server::vm_migration::Snapshot;
    // A device snapshotted before any driver set it up, its own state
    // saying two pairs and every offload (as a stream may).
    let (mut d, _peers) = connect(2, true);
    d.transport.device().lifecycle().pause().unwrap();
    let mut snap = d.transport.device().lifecycle().snapshot().unwrap();
    let mac = [0x02, 0, 0, 0, 0, 9];
    let device = Snapshot::new_from_state(&NetStateFields {
        mac,
        active_pairs: 2,
        guest_offloads: Some(0),
    })
    .unwrap();
    snap.add_snapshot("device".into(), device);
    d.transport.device().lifecycle().restore(&snap).unwrap();
    d.transport.device().lifecycle().resume().unwrap();
    // The driver's set-up starts with a reset: its negotiation is its
    // own (one pair, the offloads it acked); the MAC is the device's.
    d.init(ALL, QUEUE_SIZE);
    assert_eq!(net(&mut d).device().active_pairs(), 1);
    let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
    assert_eq!(net(&mut d).device().offloads(), all);
    let got: Vec<u8> = (0..6).map(|i| d.device_config(i, 1) as u8).collect();
    assert_eq!(got, mac);
}

/// A back end whose next read fails with EIO, once.
struct FailingRead {
    inner: Box<dyn NetBackend>,
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl NetBackend for FailingRead {
    fn fd(&self) -> std::os::fd::RawFd {
        self.inner.fd()
    }
    fn read_frame(&self, bufs: &[backends::storage::IoBuf<'_>]) -> std::io::Result<usize> {
        if self.fail.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_frame(bufs)
    }
    fn write_frame(&self, bufs: &[backends::storage::IoBuf<'_>]) -> std::io::Result<usize> {
        self.inner.write_frame(bufs)
    }
    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        self.inner.set_offload(flags)
    }
    fn link_up(&self) -> bool {
        self.inner.link_up()
    }
}

#[test]
fn a_failed_read_of_the_back_end_is_tried_again_at_the_next_link_poll() {
    let (b, peer) = seqpacket_pair().unwrap();
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let backends: Vec<Box<dyn NetBackend>> = vec![Box::new(FailingRead {
        inner: Box::new(b),
        fail: fail.clone(),
    })];
    let net = device_over(backends, true);
    let mut d = driver_of(net, GuestRam::with_regions(&[(0, 4 << 20)]));
    d.init(ALL, QUEUE_SIZE);
    // Every fd the loop watches is non-blocking: a readiness handled late
    // (the link timer re-armed meanwhile) must not hold up the loop.
    let watched = d.transport.device().lifecycle().watched_fds().to_vec();
    for w in &watched {
        // SAFETY: F_GETFL on a descriptor the device holds open.
        let fl = unsafe { libc::fcntl(w.fd, libc::F_GETFL) };
        assert!(fl >= 0 && fl & libc::O_NONBLOCK != 0, "fd {} blocks", w.fd);
    }
    // The guest's only receive buffers are posted (it will not kick
    // again); the read of the first frame fails.
    let (head, bufs) = post_rx(&mut d, rx(0), &[1526]);
    fail.store(true, std::sync::atomic::Ordering::Relaxed);
    let f = frame(300, 3);
    peer.send(&f).unwrap();
    settle(&mut d);
    assert!(d.poll_used(rx(0)).is_empty());
    assert!(
        !fail.load(std::sync::atomic::Ordering::Relaxed),
        "the read failed"
    );
    // The link poll (the timer fired: handled now, without waiting a
    // period) watches the back end again, and the frame comes in.
    let timer = watched.last().unwrap().fd;
    (d.transport.device().lifecycle()).handle_event(timer, Interest::READ);
    settle(&mut d);
    assert_eq!(d.wait_used(rx(0), 1), [(head, 300)]);
    assert_eq!(read_bufs(&d, &bufs, 300), with_num_buffers(&f, 1));
}

#[test]
fn frames_wait_while_the_device_is_off_the_bus() {
    let (mut d, peers) = ready(1, ALL);
    let (head, bufs) = post_rx(&mut d, rx(0), &[1526]);
    // The guest's kernel hands over to another (kexec): bus mastering off.
    // The receive buffers it posted are not written.
    d.set_bus_master(false);
    let f = frame(400, 5);
    peers[0].send(&f).unwrap();
    settle(&mut d);
    assert!(d.poll_used(rx(0)).is_empty());
    assert_eq!(d.ram.read(bufs[0].0, 16), vec![0u8; 16]);
    assert!(
        peers[0].device_has_input(),
        "the frame waits in the back end"
    );
    // On again (a new kernel does that before it resets the device): the
    // frame still waits, until the driver rings a doorbell.
    d.set_bus_master(true);
    settle(&mut d);
    assert!(d.poll_used(rx(0)).is_empty());
    d.kick(rx(0));
    settle(&mut d);
    assert_eq!(d.wait_used(rx(0), 1), [(head, 400)]);
    assert_eq!(read_bufs(&d, &bufs, 400), with_num_buffers(&f, 1));
}
