//! A client that truncates the file behind its guest memory after mapping
//! it: the device's next access would raise SIGBUS and kill the server. With
//! `vfio_user_server::sigbus` installed, the server drops that client and
//! serves the next one. (A test binary of its own: it installs a process-wide
//! signal handler.)

use std::os::fd::AsRawFd;
use std::time::Duration;

use integration_tests::*;
use vfio_user_server::ResetReason;

#[test]
fn a_client_that_truncates_guest_memory_is_dropped_and_the_server_lives() {
    vfio_user_server::sigbus::install().unwrap();
    let s = spawn_server();
    let mut c = RawClient::connect_negotiated(s.path());
    let ram = memfd("guest-ram", GUEST_RAM_SIZE);
    c.dma_map(0, GUEST_RAM_BASE, GUEST_RAM_SIZE, Some(ram.as_raw_fd()))
        .ok();
    ram.set_len(0).unwrap();
    // The device's DMA write lands in pages that are gone. The write is
    // answered; then the server drops the client.
    c.region_write(0, DMA_DOORBELL, &7u32.to_le_bytes()).ok();
    c.expect_eof();
    assert!(
        wait_until(Duration::from_secs(5), || {
            s.state().resets.contains(&ResetReason::LostConnection)
        }),
        "the device was not reset"
    );

    // The next client is served, and its DMA works.
    let mut c = RawClient::connect_negotiated(s.path());
    let ram = memfd("guest-ram", GUEST_RAM_SIZE);
    c.dma_map(0, GUEST_RAM_BASE, GUEST_RAM_SIZE, Some(ram.as_raw_fd()))
        .ok();
    let m = Mapping::new(ram.as_raw_fd(), GUEST_RAM_SIZE as usize, 0).unwrap();
    c.region_write(0, DMA_DOORBELL, &8u32.to_le_bytes()).ok();
    assert_eq!(
        m.read_u64((DMA_TARGET - GUEST_RAM_BASE) as usize),
        dma_pattern(8)
    );
    c.ping();

    // Every fd-backed map is protected: once the process-wide table of
    // protected ranges is full, DMA_MAP is refused (ENOSPC) rather than
    // served unprotected. Unmapping frees the ranges again.
    let page = memfd("small", 4096);
    let mut mapped = Vec::new();
    let refused = loop {
        let address = 0x1_0000_0000 + mapped.len() as u64 * 0x1000;
        let r = c.dma_map(0, address, 0x1000, Some(page.as_raw_fd()));
        if r.is_error() {
            break r.err();
        }
        mapped.push(address);
        assert!(mapped.len() <= vfio_user_server::sigbus::MAX_GUEST_MAPPINGS);
    };
    assert_eq!(refused, libc::ENOSPC);
    assert!(mapped.len() >= vfio_user_server::sigbus::MAX_GUEST_MAPPINGS - 16);
    let last = mapped.pop().unwrap();
    c.dma_unmap(0, last, 0x1000).ok();
    c.dma_map(0, last, 0x1000, Some(page.as_raw_fd())).ok();
    c.ping();
}
