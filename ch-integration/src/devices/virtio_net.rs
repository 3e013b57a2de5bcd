//! `virtio-net`: a NIC whose frames go to a host TAP interface.

use backends::net::{NetBackend, Tap};
use backends::virtio_net::{format_mac, VirtioNetConfig, VirtioNetPci, MAX_QUEUE_PAIRS};
use clap::{value_parser, Args};
use vfio_user_server::pci::PciAdapter;
use vfio_user_server::DeviceContext;

use serde::{Deserialize, Serialize};

use super::{parse_queue_size, Built, DeviceFds};
use crate::cli::CommonOptions;

/// Name template of the TAP created when no `--tap` is given.
const CREATED_TAP: &str = "vfu-tap%d";

/// Options of `virtio-net`.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct VirtioNetArgs {
    /// Existing TAP interface to serve (`ip tuntap add dev NAME mode
    /// tap`, with `multi_queue` for more than one queue pair); without
    /// it, a TAP is created for this daemon (needs root) and goes away
    /// with it
    #[arg(long, value_name = "NAME", verbatim_doc_comment)]
    pub tap: Option<String>,
    /// The guest's MAC address (default: 52:54:00 and three random bytes)
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub mac: Option<[u8; 6]>,
    /// Queue pairs (one TAP queue each)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = value_parser!(u16).range(1..=MAX_QUEUE_PAIRS as i64)
    )]
    pub num_queue_pairs: u16,
    /// Descriptors per queue: a power of two, at most 1024
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Offer no checksum or segmentation offloads
    #[arg(long)]
    pub no_offloads: bool,
    /// The options every kind takes.
    #[command(flatten)]
    pub common: CommonOptions,
}

fn parse_mac(v: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = v
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| "six hex bytes, e.g. 52:54:00:12:34:56".to_string())?;
    let mac: [u8; 6] = bytes
        .try_into()
        .map_err(|_| "six hex bytes, e.g. 52:54:00:12:34:56".to_string())?;
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err("a unicast address (the first byte even)".into());
    }
    Ok(mac)
}

/// 52:54:00 (QEMU's prefix) and three random bytes.
fn random_mac() -> [u8; 6] {
    let mut r = [0u8; 3];
    // SAFETY: `r` is a valid buffer of its length.
    let n = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    if n != r.len() as isize {
        // Not fatal: a fixed address is still a valid one.
        r = [0x12, 0x34, 0x56];
    }
    [0x52, 0x54, 0x00, r[0], r[1], r[2]]
}

/// The fds a virtio-net daemon hands over: one TAP queue per pair.
#[derive(Serialize, Deserialize)]
struct Layout {
    /// TAP queue fds, one per queue pair.
    taps: usize,
    /// The TAP was created by the first daemon (it goes away with the
    /// last one).
    created: bool,
    /// The guest's MAC address, which the device state also carries: a
    /// daemon started without `--mac` made one up, and its successors
    /// describe that one. Absent from earlier daemons' hand-overs.
    #[serde(default)]
    mac: Option<[u8; 6]>,
}

/// Builds the virtio-net device described by `args`, on its TAP, or on
/// the TAP queues a running daemon handed over (`inherited`).
pub fn build(args: &VirtioNetArgs, inherited: Option<DeviceFds>) -> Result<Built, String> {
    let pairs = usize::from(args.num_queue_pairs);
    let (taps, created, handed_mac) = match (inherited, &args.tap) {
        (Some(fds), _) => {
            let layout: Layout =
                serde_json::from_value(fds.layout).map_err(|e| format!("handed-over fds: {e}"))?;
            if layout.taps != pairs || fds.files.len() != pairs {
                return Err(format!(
                    "{} TAP queue(s) handed over for {pairs} queue pair(s)",
                    fds.files.len()
                ));
            }
            let taps = fds
                .files
                .into_iter()
                .map(Tap::from_file)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("handed-over TAP: {e}"))?;
            (taps, layout.created, layout.mac)
        }
        (None, Some(name)) => (
            Tap::open(name, pairs).map_err(|e| e.to_string())?,
            false,
            None,
        ),
        (None, None) => {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Err("--tap NAME is needed (creating a TAP takes root)".into());
            }
            let taps =
                Tap::create(CREATED_TAP, pairs).map_err(|e| format!("cannot create a TAP: {e}"))?;
            (taps, true, None)
        }
    };
    let mac = args.mac.or(handed_mac).unwrap_or_else(random_mac);
    let files = taps
        .iter()
        .map(|t| t.try_clone().map(Tap::into_file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot keep the TAP's fds for an upgrade: {e}"))?;
    let fds = DeviceFds {
        layout: serde_json::to_value(Layout {
            taps: files.len(),
            created,
            mac: Some(mac),
        })
        .map_err(|e| e.to_string())?,
        files,
    };
    let name = taps[0].name().to_string();
    let mtu = taps[0].mtu().map_err(|e| e.to_string())?;
    let backends: Vec<Box<dyn NetBackend>> = taps
        .into_iter()
        .map(|t| Box::new(t) as Box<dyn NetBackend>)
        .collect();
    let ctx = DeviceContext::default();
    let net = VirtioNetPci::new(
        ctx.clone(),
        backends,
        VirtioNetConfig {
            mac,
            mtu,
            queue_size: args.queue_size,
            offloads: !args.no_offloads,
            ..Default::default()
        },
    )
    .map_err(|e| format!("cannot create virtio-net: {e}"))?;
    let adapter = PciAdapter::new(net).map_err(|e| format!("cannot create PCI device: {e}"))?;
    let mut notes = Vec::new();
    if created {
        notes.push(format!(
            "Created TAP {name} for this daemon (it goes away with it). Give the host side \
             an address: ip addr add 10.0.2.1/24 dev {name}"
        ));
    }
    Ok(Built {
        device: Box::new(adapter),
        ctx,
        description: format!(
            "virtio-net on TAP {name} (guest MAC {}, MTU {mtu}), {pairs} queue pair(s) of {}, {}",
            format_mac(&mac),
            args.queue_size,
            if args.no_offloads {
                "no offloads"
            } else {
                "checksum and TSO offloads"
            }
        ),
        notes,
        fds,
    })
}

/// What an upgrade from `old` to `new` may not change: the TAP and the
/// queue layout (the device state assumes them).
pub fn upgrade_refusals(old: &VirtioNetArgs, new: &VirtioNetArgs) -> Vec<String> {
    let mut out = Vec::new();
    for (name, same) in [
        ("--tap (a different interface)", old.tap == new.tap),
        ("--mac", old.mac == new.mac),
        (
            "--num-queue-pairs",
            old.num_queue_pairs == new.num_queue_pairs,
        ),
        ("--queue-size", old.queue_size == new.queue_size),
        ("--no-offloads", old.no_offloads == new.no_offloads),
    ] {
        if !same {
            out.push(name.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "zz:54:00:ab:cd:ef",
        ] {
            assert!(parse_mac(bad).unwrap_err().contains("hex"), "{bad}");
        }
        assert!(parse_mac("01:00:5e:00:00:01")
            .unwrap_err()
            .contains("unicast"));
        assert!(parse_mac("00:00:00:00:00:00").is_err());
        let m = random_mac();
        assert_eq!(&m[..3], &[0x52, 0x54, 0]);
    }
}
