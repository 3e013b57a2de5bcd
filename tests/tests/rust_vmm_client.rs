//! The server driven by the published rust-vmm `vfio_user::Client` (what
//! Cloud Hypervisor uses), for every command the client has.
//!
//! That client reads fixed-size replies and has no timeout, so every test
//! body runs on a thread watched with a deadline: a protocol mismatch
//! fails the test instead of hanging it.

use std::os::fd::AsRawFd;
use std::time::Duration;

use integration_tests::proto::*;
use integration_tests::*;
use vfio_user::Client;
use vfio_user_server::ResetReason;

#[test]
fn client_new_reads_device_and_region_info() {
    let s = spawn_server();
    let path = s.path().to_path_buf();
    with_deadline(move || {
        let client = Client::new(&path).expect("Client::new");
        // We advertise RESET; the client's test is inverted.
        assert!(!client.resettable());

        let bar0 = client.region(0).unwrap();
        assert_eq!(bar0.size, BAR0_SIZE);
        assert_eq!(bar0.flags, REGION_READ | REGION_WRITE);
        assert!(bar0.file_offset.is_none());
        assert!(bar0.sparse_areas.is_empty());

        let bar1 = client.region(1).unwrap();
        assert_eq!(bar1.index, 1);
        assert_eq!(bar1.size, BAR1_SIZE);
        assert_eq!(
            bar1.flags,
            REGION_READ | REGION_WRITE | REGION_MMAP | REGION_CAPS
        );
        let areas: Vec<(u64, u64)> = bar1
            .sparse_areas
            .iter()
            .map(|a| (a.offset, a.size))
            .collect();
        assert_eq!(areas, BAR1_AREAS.to_vec());
        let fo = bar1.file_offset.as_ref().expect("BAR1 fd");
        assert_eq!(fo.start(), 0);
        // The fd maps the device's memory.
        let m = Mapping::new(fo.file().as_raw_fd(), BAR1_SIZE as usize, fo.start()).unwrap();
        assert_eq!(m.read(BAR1_MARKER_OFFSET as usize, 1), vec![BAR1_MARKER]);

        for idx in [2u32, 3, 4, 5, 6, 8] {
            let r = client.region(idx).unwrap();
            assert_eq!(r.size, 0, "region {idx}");
            assert!(r.file_offset.is_none());
        }
        let cfg = client.region(CONFIG_REGION).unwrap();
        assert_eq!(cfg.size, CONFIG_SIZE);
        assert!(cfg.file_offset.is_none());
        assert!(cfg.sparse_areas.is_empty());
        assert!(client.region(9).is_none());
        client.shutdown().unwrap();
    });
    assert!(wait_until(Duration::from_secs(5), || s
        .state()
        .resets
        .len()
        == 1));
    assert_eq!(s.state().resets, vec![ResetReason::LostConnection]);
}

#[test]
fn client_region_access_irqs_dma_reset() {
    let s = spawn_server();
    let path = s.path().to_path_buf();
    let state = s.states[0].clone();
    with_deadline(move || {
        let mut client = Client::new(&path).expect("Client::new");

        // Region read/write.
        client.region_write(0, 0x20, &[1, 2, 3, 4, 5]).unwrap();
        let mut buf = [0u8; 5];
        client.region_read(0, 0x20, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4, 5]);
        let mut id = [0u8; 4];
        client.region_read(CONFIG_REGION, 0, &mut id).unwrap();
        assert_eq!(
            u32::from_le_bytes(id),
            (DEVICE_ID as u32) << 16 | VENDOR_ID as u32
        );
        let mut big = vec![0u8; BAR1_SIZE as usize];
        client.region_read(1, 0, &mut big).unwrap();
        assert_eq!(big[BAR1_MARKER_OFFSET as usize], BAR1_MARKER);

        // IRQ info of every index.
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
        for (i, (flags, count)) in want.iter().enumerate() {
            let info = client.get_irq_info(i as u32).unwrap();
            assert_eq!(info.index, i as u32);
            assert_eq!(info.flags, *flags, "index {i}");
            assert_eq!(info.count, *count, "index {i}");
        }

        // DMA map with a memfd, as Cloud Hypervisor does.
        let ram = memfd("guest-ram", GUEST_RAM_SIZE);
        client
            .dma_map(0, GUEST_RAM_BASE, GUEST_RAM_SIZE, ram.as_raw_fd())
            .unwrap();
        let m = Mapping::new(ram.as_raw_fd(), GUEST_RAM_SIZE as usize, 0).unwrap();

        // MSI-X eventfds.
        let efds: Vec<_> = (0..MSIX_VECTORS).map(|_| eventfd()).collect();
        let raw: Vec<_> = efds.iter().map(|e| e.as_raw_fd()).collect();
        client
            .set_irqs(
                IRQ_MSIX,
                IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
                0,
                MSIX_VECTORS,
                &raw,
            )
            .unwrap();

        // The device DMAs into guest RAM and interrupts.
        client
            .region_write(0, DMA_DOORBELL, &0xabcdu32.to_le_bytes())
            .unwrap();
        assert_eq!(eventfd_wait(&efds[0], 5000), Some(1));
        assert_eq!(
            m.read_u64((DMA_TARGET - GUEST_RAM_BASE) as usize),
            dma_pattern(0xabcd)
        );

        // Disable MSI-X as CH's disable_irq does; nothing fires after.
        client
            .set_irqs(IRQ_MSIX, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 0, 0, &[])
            .unwrap();
        client
            .region_write(0, DMA_DOORBELL, &1u32.to_le_bytes())
            .unwrap();
        assert_eq!(eventfd_wait(&efds[0], 100), None);

        // Reset (CH sends it when RESET is *not* advertised; it works
        // either way).
        client.reset().unwrap();
        client.region_read(0, 0x20, &mut buf).unwrap();
        assert_eq!(buf, [0; 5], "reset cleared BAR0");

        // Unmap: the 40-byte echo the client expects.
        client.dma_unmap(GUEST_RAM_BASE, GUEST_RAM_SIZE).unwrap();
        // Still in sync after all of that.
        client.region_write(0, 0x30, &[7]).unwrap();
        let mut one = [0u8; 1];
        client.region_read(0, 0x30, &mut one).unwrap();
        assert_eq!(one, [7]);
        client.shutdown().unwrap();
    });
    assert!(wait_until(Duration::from_secs(5), || lock(&state)
        .resets
        .len()
        == 2));
    let st = lock(&state);
    assert_eq!(
        st.resets,
        vec![ResetReason::Command, ResetReason::LostConnection]
    );
    assert_eq!(st.unmapping, vec![(GUEST_RAM_BASE, GUEST_RAM_SIZE)]);
    assert_eq!(st.dma.len(), 2);
    assert!(st.dma.iter().all(|d| d.2));
}

#[test]
fn client_reconnects_like_a_guest_reboot() {
    let s = spawn_server();
    let path = s.path().to_path_buf();
    let state = s.states[0].clone();
    with_deadline(move || {
        for round in 0..5usize {
            let mut client = Client::new(&path).expect("Client::new");
            let ram = memfd("ram", GUEST_RAM_SIZE);
            client
                .dma_map(0, GUEST_RAM_BASE, GUEST_RAM_SIZE, ram.as_raw_fd())
                .unwrap();
            let mut b = [0xffu8; 1];
            client.region_read(0, 0, &mut b).unwrap();
            assert_eq!(b, [0], "fresh device in round {round}");
            client.region_write(0, 0, &[1]).unwrap();
            // CH drops the device (shutting the socket down), then
            // connects again at once.
            client.shutdown().unwrap();
            drop(client);
        }
    });
    assert!(wait_until(Duration::from_secs(5), || lock(&state)
        .resets
        .len()
        == 5));
    assert!(lock(&state)
        .resets
        .iter()
        .all(|r| *r == ResetReason::LostConnection));
}
