//! `megasas`: an LSI MegaRAID SAS 1078 controller whose disks (raw images,
//! or an in-memory disk) are its logical drives.

use std::path::PathBuf;
use std::sync::Arc;

use backends::block_io::Aio;
use backends::megasas::{Megasas, MegasasConfig};
use backends::storage::BlockBackend;
use clap::{ArgAction, Args};
use serde::{Deserialize, Serialize};
use vfio_user_server::pci::PciAdapter;
use vfio_user_server::DeviceContext;

use super::storage::{disk_fds, disk_from_fds, open_disk, DiskFds, StorageOptions};
use super::{same_path, Built, DeviceFds};
use crate::cli::CommonOptions;

/// Size of the in-memory disk served without `--disk`.
pub const DEFAULT_DISK_BYTES: u64 = 64 << 20;

/// Options of `megasas`.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct MegasasArgs {
    /// Raw image to serve as the next logical drive (repeat for more,
    /// at most 64; default: a 64 MiB in-memory disk)
    #[arg(long, value_name = "FILE", action = ArgAction::Append, verbatim_doc_comment)]
    pub disk: Vec<PathBuf>,
    /// Report the drives' write cache off and make every write durable
    /// before it completes (a flush per write). Default: a write completes
    /// once it is in the image (the host's page cache, or the disk with
    /// --direct), and the drives are flushed at the driver's cache flush
    /// and shutdown, at device resets (guest reboot, client leaving) and
    /// when the device pauses
    #[arg(long, verbatim_doc_comment)]
    pub write_through: bool,
    /// The options of every storage kind.
    #[command(flatten)]
    pub storage: StorageOptions,
    /// The options every kind takes.
    #[command(flatten)]
    pub common: CommonOptions,
}

/// The fds a megasas daemon hands over: its images, in drive order.
#[derive(Serialize, Deserialize)]
struct Layout {
    disks: Vec<DiskFds>,
}

/// Builds the controller described by `args`, on its images, or on the
/// image fds a running daemon handed over (`inherited`).
pub fn build(args: &MegasasArgs, inherited: Option<DeviceFds>) -> Result<Built, String> {
    let mut raw = Vec::new();
    match inherited {
        None if args.disk.is_empty() => {
            raw.push(open_disk(
                None,
                args.storage.readonly,
                args.storage.direct,
                DEFAULT_DISK_BYTES,
            )?);
        }
        None => {
            for path in &args.disk {
                raw.push(open_disk(
                    Some(path),
                    args.storage.readonly,
                    args.storage.direct,
                    0,
                )?);
            }
        }
        Some(fds) => {
            let layout: Layout =
                serde_json::from_value(fds.layout).map_err(|e| format!("handed-over fds: {e}"))?;
            if layout.disks.len() != args.disk.len().max(1) {
                return Err(format!(
                    "{} image(s) handed over for {} drive(s)",
                    layout.disks.len(),
                    args.disk.len().max(1)
                ));
            }
            let mut files = fds.files.into_iter();
            for d in &layout.disks {
                raw.push(disk_from_fds(d, &mut files, args.storage.readonly)?);
            }
        }
    }
    let mut files = Vec::new();
    let mut layout = Layout { disks: Vec::new() };
    for d in &raw {
        layout.disks.push(disk_fds(d, &mut files)?);
    }
    let (aio, aio_note) = args.storage.aio(!args.disk.is_empty())?;
    let fds = DeviceFds {
        layout: serde_json::to_value(&layout).map_err(|e| e.to_string())?,
        files,
    };
    let what: Vec<String> = if args.disk.is_empty() {
        vec![format!("a {} MiB in-memory disk", DEFAULT_DISK_BYTES >> 20)]
    } else {
        args.disk
            .iter()
            .zip(&raw)
            .map(|(path, d)| format!("{} ({} bytes)", path.display(), d.size()))
            .collect()
    };
    let disks: Vec<Arc<dyn BlockBackend>> = raw
        .into_iter()
        .map(|d| Arc::new(d) as Arc<dyn BlockBackend>)
        .collect();
    let ctx = DeviceContext::default();
    let config = MegasasConfig {
        read_only: args.storage.readonly,
        aio,
        on_error: args.storage.on_error,
        write_through: args.write_through,
    };
    let hba =
        Megasas::new(&ctx, disks, &config).map_err(|e| format!("cannot create megasas: {e}"))?;
    let aio = hba.aio();
    let adapter = PciAdapter::new(hba).map_err(|e| format!("cannot create PCI device: {e}"))?;
    let mut notes = args.storage.notes(&args.common, aio_note);
    notes.push(
        "The guest's megaraid_sas driver shows each disk as SCSI H:2:T:0 (T = 0, 1, ...).".into(),
    );
    Ok(Built {
        device: Box::new(adapter),
        ctx,
        description: format!(
            "megasas (MegaRAID SAS 1078) with {} logical drive(s): {}{}, {} (aio: {aio}{}, on error: {})",
            what.len(),
            what.join(", "),
            args.storage.describe(),
            if args.write_through {
                "write-through"
            } else {
                "write-back cache"
            },
            if matches!(aio, Aio::Threads(_)) {
                " per disk"
            } else {
                ""
            },
            args.storage.on_error
        ),
        notes,
        fds,
    })
}

/// What an upgrade from `old` to `new` may not change: the images and how
/// they are served (the controller's state assumes them).
pub fn upgrade_refusals(old: &MegasasArgs, new: &MegasasArgs) -> Vec<String> {
    let mut out = Vec::new();
    let same_disks = old.disk.len() == new.disk.len()
        && old.disk.iter().zip(&new.disk).all(|(a, b)| same_path(a, b));
    if !same_disks {
        out.push("--disk (different images)".to_string());
    }
    out.extend(old.storage.upgrade_refusals(&new.storage));
    // The guest read the write cache setting at probe time, and relies on
    // it (WCE=0: every completed write is durable).
    if old.write_through != new.write_through {
        out.push("--write-through".to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use crate::cli::{self, Cli, Command};
    use crate::devices::DeviceKind;

    fn parse(s: &str) -> super::MegasasArgs {
        match cli::parse(s.split_whitespace()) {
            Ok(Cli {
                command: Command::Device(DeviceKind::Megasas(a)),
            }) => a,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn disks_accumulate() {
        let a = parse("megasas --socket s --disk a --disk b --readonly --io-threads 2");
        assert_eq!(a.disk, [std::path::PathBuf::from("a"), "b".into()]);
        assert!(a.storage.readonly && !a.storage.direct && !a.write_through);
        assert!(parse("megasas --socket s --write-through").write_through);
        assert_eq!(a.storage.io_threads, Some(2));
        assert!(parse("megasas --socket s").disk.is_empty());
        assert!(cli::parse(["megasas", "--socket", "s", "--io-threads", "65"]).is_err());
    }

    #[test]
    fn help_states_the_bounds_the_parser_enforces() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("megasas")
            .map(|c| c.render_help().to_string())
            .unwrap_or_default();
        let bound = format!("at most {}", backends::storage::MAX_IO_THREADS);
        assert!(help.contains(&bound), "{help}");
        assert!(help.contains(&format!("{} MiB", super::DEFAULT_DISK_BYTES >> 20)));
        assert!(help.contains(&format!("at most {}", backends::megasas::dcmd::MAX_LDS)));
    }

    #[test]
    fn an_upgrade_keeps_the_disks_and_how_they_are_served() {
        let old = parse("megasas --socket s --disk a --write-through --io-threads 2");
        let same = parse("megasas --socket s --disk a --write-through --aio sync");
        assert!(super::upgrade_refusals(&old, &same).is_empty());
        let back = parse("megasas --socket s --disk a");
        assert_eq!(super::upgrade_refusals(&old, &back), ["--write-through"]);
        let other = parse("megasas --socket s --disk b --write-through --direct");
        assert_eq!(
            super::upgrade_refusals(&old, &other),
            ["--disk (different images)", "--direct"]
        );
    }

    #[test]
    fn builds_on_an_in_memory_disk() {
        let built = super::build(&parse("megasas --socket s"), None).unwrap();
        assert!(
            built.description.contains("64 MiB in-memory"),
            "{}",
            built.description
        );
        let e = super::build(&parse("megasas --socket s --disk /nonexistent/x"), None).err();
        assert!(e.is_some_and(|e| e.contains("/nonexistent/x")));
    }
}
