//! VERSION: the protocol version and the capabilities both sides
//! announce.

use std::fs::File;

use super::connection::{Reply, Session};
use super::served_device::ServedDevice;
use crate::guest_memory::DIRTY_PAGE_SIZE;
use crate::message_dma::MessageDmaLayout;
use crate::wire::{Version, DEFAULT_MAX_DATA_XFER_SIZE};

/// The minor protocol version we speak.
pub const OUR_MINOR: u16 = 2;
/// fds we advertise in `max_msg_fds` (and accept per message; Cloud
/// Hypervisor sends up to 16 whatever we say).
pub const ADVERTISED_MAX_MSG_FDS: u32 = 16;

impl ServedDevice {
    /// VERSION: negotiates once per client; what the client proposes is
    /// type-checked, and what we keep of it goes into its `session`.
    pub(super) fn handle_version(
        &mut self,
        session: &mut Session,
        payload: &[u8],
        fds: Vec<File>,
    ) -> Reply {
        if session.negotiated || !fds.is_empty() {
            return Reply::Err(libc::EINVAL);
        }
        let Ok(v) = Version::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if v.major != 0 {
            return Reply::Err(libc::ENOTSUP);
        }
        let Ok(caps) = ClientCaps::parse(&v.json) else {
            return Reply::Err(libc::EINVAL);
        };
        let mut json = serde_json::json!({
            "capabilities": {
                "max_msg_fds": ADVERTISED_MAX_MSG_FDS,
                "max_data_xfer_size": self.config.max_data_xfer_size,
                "pgsizes": DIRTY_PAGE_SIZE,
                "max_dma_maps": self.config.dma_limits.max_maps,
                "write_multiple": self.config.write_multiple,
            }
        });
        if self.lifecycle().migratable() {
            json["capabilities"]["migration"] = serde_json::json!({
                "pgsize": DIRTY_PAGE_SIZE,
                "max_bitmap_size": 256u64 << 20,
            });
        }
        let reply = Version {
            major: 0,
            minor: v.minor.min(OUR_MINOR),
            json: json.to_string().into_bytes(),
        };
        session.negotiated = true;
        session.client_max_xfer = caps.max_data_xfer_size;
        // QEMU proposes 0.0 and uses its own DMA_READ/WRITE layout;
        // libvfio-user-style clients propose a later minor.
        session.dma_layout = if v.minor == 0 {
            MessageDmaLayout::Qemu
        } else {
            MessageDmaLayout::Spec
        };
        Reply::data(reply.encode())
    }
}

/// What we keep of the client's VERSION capabilities.
struct ClientCaps {
    max_data_xfer_size: u32,
}

impl ClientCaps {
    /// Parses and type-checks the client's JSON (absent JSON or absent
    /// keys take the defaults).
    fn parse(json: &[u8]) -> Result<ClientCaps, ()> {
        let mut caps = ClientCaps {
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
        };
        if json.is_empty() {
            return Ok(caps);
        }
        let v: serde_json::Value = serde_json::from_slice(json).map_err(|_| ())?;
        let top = v.as_object().ok_or(())?;
        let Some(c) = top.get("capabilities") else {
            return Ok(caps);
        };
        let c = c.as_object().ok_or(())?;
        let num = |k: &str| -> Result<Option<u64>, ()> {
            match c.get(k) {
                None => Ok(None),
                Some(x) => x.as_u64().map(Some).ok_or(()),
            }
        };
        if let Some(fds) = num("max_msg_fds")? {
            if fds == 0 || fds > 1024 {
                return Err(());
            }
        }
        if let Some(x) = num("max_data_xfer_size")? {
            if x < 4096 {
                return Err(());
            }
            caps.max_data_xfer_size = u32::try_from(x).unwrap_or(u32::MAX);
        }
        if let Some(p) = num("pgsizes")? {
            if p & DIRTY_PAGE_SIZE as u64 == 0 {
                return Err(());
            }
        }
        num("max_dma_maps")?;
        if let Some(m) = c.get("migration") {
            let m = m.as_object().ok_or(())?;
            // The legacy dirty-bitmap page size: nothing here uses it (DMA
            // logging names its own page size), and Cloud Hypervisor's
            // client sends the host's, 64 KiB on some hosts. Any number.
            if let Some(p) = m.get("pgsize") {
                p.as_u64().ok_or(())?;
            }
        }
        if let Some(w) = c.get("write_multiple") {
            w.as_bool().ok_or(())?;
        }
        Ok(caps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_caps_parsing() {
        assert!(ClientCaps::parse(b"").is_ok());
        assert!(ClientCaps::parse(b"{}").is_ok());
        let qemu = br#"{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#;
        assert_eq!(ClientCaps::parse(qemu).unwrap().max_data_xfer_size, 1 << 20);
        let ch = br#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#;
        assert!(ClientCaps::parse(ch).is_ok());
        // Cloud Hypervisor's client on a host with 64 KiB pages.
        let ch64k = br#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"migration":{"pgsize":65536}}}"#;
        assert!(ClientCaps::parse(ch64k).is_ok());
        for bad in [
            &b"{"[..],
            b"[]",
            br#"{"capabilities":3}"#,
            br#"{"capabilities":{"max_msg_fds":"x"}}"#,
            br#"{"capabilities":{"max_msg_fds":0}}"#,
            br#"{"capabilities":{"max_data_xfer_size":-1}}"#,
            br#"{"capabilities":{"migration":{"pgsize":"4096"}}}"#,
            br#"{"capabilities":{"pgsizes":8192}}"#,
            br#"{"capabilities":{"write_multiple":1}}"#,
        ] {
            assert!(
                ClientCaps::parse(bad).is_err(),
                "{:?}",
                std::str::from_utf8(bad)
            );
        }
    }
}
