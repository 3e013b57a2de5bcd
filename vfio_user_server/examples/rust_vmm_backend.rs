//! A device written for the published rust-vmm `vfio_user` crate, served
//! unchanged on this crate's server and event loop.
//!
//! `Scratchpad` implements `vfio_user::ServerBackend` and comes with the
//! region and IRQ tables that `vfio_user::Server::new` takes, exactly as
//! its author wrote them for that server. [`RustVmmBackend`] takes the same
//! four arguments and makes a [`vfio_user_server::Device`] of them.
//!
//! The device: BAR 0 is 4 KiB of scratch memory that reads back what was
//! written; a write to its last dword (the doorbell) raises INTx. Run it
//! with `cargo run -p vfio_user_server --example rust_vmm_backend -- /tmp/pad.sock`.

use std::error::Error;
use std::fs::File;
use std::io::{self, Write};
use std::mem::size_of;
use std::ops::Range;
use std::path::Path;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion};
use vfio_user_server::compat::RustVmmBackend;
use vfio_user_server::pci::{
    PciBarConfiguration, PciBarPrefetchable, PciBarRegionType, PciConfiguration,
    PciConfigurationParams, PciDeviceError,
};
use vfio_user_server::{DeviceContext, EventLoop, Server, ServerConfig, StopHandle};

/// PCI identity: QEMU's vendor for emulated devices, a device id of ours.
pub const VENDOR_ID: u16 = 0x1234;
/// Device id.
pub const DEVICE_ID: u16 = 0xdc02;
/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x1000;
/// Offset of the doorbell in BAR 0.
pub const DOORBELL: usize = BAR_SIZE as usize - 4;

/// Size of the configuration space.
const CONFIG_SIZE: usize = 256;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// The bytes an access of `len` bytes at `offset` covers in a region of
/// `size` bytes. `vfio_user::Server` does not check accesses against the
/// region sizes, so a backend written for it does.
fn range(offset: u64, len: usize, size: usize) -> io::Result<Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| einval())?;
    match start.checked_add(len) {
        Some(end) if end <= size => Ok(start..end),
        _ => Err(einval()),
    }
}

/// The device, as a `vfio_user::ServerBackend`. Its configuration space is
/// kept by [`PciConfiguration`] (this crate's version of the Cloud
/// Hypervisor type that the `vfio_user` crate's own example copies).
pub struct Scratchpad {
    config: PciConfiguration,
    bar: Vec<u8>,
    intx: Option<File>,
}

impl Scratchpad {
    /// A device with zeroed scratch memory.
    pub fn new() -> Result<Self, PciDeviceError> {
        let mut config = PciConfiguration::new(PciConfigurationParams {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            class_code: 0xff,
            interrupt_pin: 1,
            ..Default::default()
        });
        config.add_pci_bar(&PciBarConfiguration::new(
            VFIO_PCI_BAR0_REGION_INDEX as usize,
            BAR_SIZE,
            PciBarRegionType::Memory32BitRegion,
            PciBarPrefetchable::NotPrefetchable,
        ))?;
        Ok(Scratchpad {
            config,
            bar: vec![0; BAR_SIZE as usize],
            intx: None,
        })
    }
}

impl ServerBackend for Scratchpad {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        match region {
            // Any offset and length: the config space is read byte by byte.
            VFIO_PCI_CONFIG_REGION_INDEX => {
                for (at, byte) in range(offset, data.len(), CONFIG_SIZE)?.zip(data) {
                    *byte = self.config.read_reg(at / 4).to_le_bytes()[at % 4];
                }
            }
            VFIO_PCI_BAR0_REGION_INDEX => {
                data.copy_from_slice(&self.bar[range(offset, data.len(), self.bar.len())?]);
            }
            _ => return Err(einval()),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => {
                for (at, byte) in range(offset, data.len(), CONFIG_SIZE)?.zip(data) {
                    let (reg, byte_offset) = (at / 4, (at % 4) as u64);
                    self.config
                        .write_config_register(reg, byte_offset, &[*byte]);
                }
            }
            VFIO_PCI_BAR0_REGION_INDEX => {
                let bytes = range(offset, data.len(), self.bar.len())?;
                let rings = bytes.end > DOORBELL;
                self.bar[bytes].copy_from_slice(data);
                if rings {
                    if let Some(intx) = &mut self.intx {
                        intx.write_all(&1u64.to_le_bytes())?;
                    }
                }
            }
            _ => return Err(einval()),
        }
        Ok(())
    }

    // The device does no DMA.
    fn dma_map(
        &mut self,
        _: DmaMapFlags,
        _: u64,
        _: u64,
        _: u64,
        _: Option<File>,
    ) -> io::Result<()> {
        Ok(())
    }

    fn dma_unmap(&mut self, _: DmaUnmapFlags, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }

    fn reset(&mut self) -> io::Result<()> {
        self.config.reset();
        self.bar.fill(0);
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        _start: u32,
        _count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        if index == VFIO_PCI_INTX_IRQ_INDEX && flags & trigger == trigger {
            // No fd (count 0) turns INTx off.
            self.intx = fds.into_iter().next();
        }
        Ok(())
    }
}

/// The region table: BAR 0 and the config space, the other regions absent.
pub fn regions() -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = match index {
                VFIO_PCI_BAR0_REGION_INDEX => BAR_SIZE,
                VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE as u64,
                _ => 0,
            };
            let region_info = vfio_region_info {
                argsz: size_of::<vfio_region_info>() as u32,
                index,
                size,
                flags: if size > 0 {
                    VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
                } else {
                    0
                },
                ..Default::default()
            };
            ServerRegion {
                region_info,
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

/// The IRQ table: INTx only.
pub fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| {
            let intx = index == VFIO_PCI_INTX_IRQ_INDEX;
            IrqInfo {
                index,
                flags: if intx { VFIO_IRQ_INFO_EVENTFD } else { 0 },
                count: u32::from(intx),
            }
        })
        .collect()
}

/// Serves a [`Scratchpad`] on `socket` until the stop handle passed to
/// `ready` (once the socket listens) is used.
pub fn serve(
    socket: &Path,
    ready: impl FnOnce(StopHandle),
) -> Result<(), Box<dyn Error + Send + Sync>> {
    // What `vfio_user::Server::new(socket, true, irqs(), regions())` and
    // `run(&mut Scratchpad::new()?)` did. The backend keeps its own eventfds
    // and DMA table; the context only serves the server.
    let device = RustVmmBackend::new(Scratchpad::new()?, true, irqs(), regions());
    let server = Server::new(
        socket,
        Box::new(device),
        DeviceContext::default(),
        ServerConfig::default(),
    )?;
    // The server maps the client's guest memory: one it truncates drops the
    // client instead of killing the process with SIGBUS.
    vfio_user_server::sigbus::install()?;
    let mut event_loop = EventLoop::new()?;
    event_loop.add_server(server)?;
    ready(event_loop.stop_handle());
    // Dropping the loop drops the server, which removes the socket.
    Ok(event_loop.run()?)
}

fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let socket = std::env::args_os()
        .nth(1)
        .ok_or("usage: rust_vmm_backend SOCKET")?;
    let socket = std::path::PathBuf::from(socket);
    serve(&socket, |stop| {
        if let Err(e) = stop.stop_on_termination_signals() {
            log::warn!("signals will not stop the server: {e}");
        }
        let s = std::path::absolute(&socket).unwrap_or_else(|_| socket.clone());
        let s = s.display();
        println!("rust_vmm_backend: serving {s}; Ctrl-C or SIGTERM stops. Attach with:");
        println!("  qemu-system-x86_64 ... -numa node,memdev=mem \\");
        println!("    -object memory-backend-memfd,id=mem,size=1G,share=on \\");
        println!("    -device '{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"type\":\"unix\",\"path\":\"{s}\"}}}}'");
        println!("  cloud-hypervisor ... --memory size=1G,shared=on --user-device socket={s}");
    })
}
