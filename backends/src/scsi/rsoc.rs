//! REPORT SUPPORTED OPERATION CODES (SPC-4 6.35): the commands the disk
//! implements, each with the CDB bits it looks at.

use super::cdb::{opcode as op, Cdb, SA_READ_CAPACITY_16, SA_REPORT_SUPPORTED_OPCODES};
use super::sense::Sense;

/// One supported command.
struct Command {
    opcode: u8,
    /// Service action, for commands that have one.
    service_action: Option<u8>,
    /// CDB usage data: the bits the disk interprets, CDB-long.
    usage: &'static [u8],
}

const fn cmd(opcode: u8, usage: &'static [u8]) -> Command {
    Command {
        opcode,
        service_action: None,
        usage,
    }
}

const fn sa(opcode: u8, service_action: u8, usage: &'static [u8]) -> Command {
    Command {
        opcode,
        service_action: Some(service_action),
        usage,
    }
}

const RW10: &[u8] = &[0xff, 0xe8, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0];
const RW12: &[u8] = &[
    0xff, 0xe8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0,
];
const RW16: &[u8] = &[
    0xff, 0xe8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0,
];

/// Every command, in opcode order.
const COMMANDS: &[Command] = &[
    cmd(op::TEST_UNIT_READY, &[0xff, 0, 0, 0, 0, 0]),
    cmd(op::REQUEST_SENSE, &[0xff, 0x01, 0, 0, 0xff, 0]),
    cmd(op::READ_6, &[0xff, 0x1f, 0xff, 0xff, 0xff, 0]),
    cmd(op::WRITE_6, &[0xff, 0x1f, 0xff, 0xff, 0xff, 0]),
    cmd(op::INQUIRY, &[0xff, 0x03, 0xff, 0xff, 0xff, 0]),
    cmd(op::MODE_SENSE_6, &[0xff, 0x08, 0xff, 0xff, 0xff, 0]),
    cmd(op::START_STOP_UNIT, &[0xff, 0, 0, 0, 0, 0]),
    cmd(
        op::READ_CAPACITY_10,
        &[0xff, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0],
    ),
    cmd(op::READ_10, RW10),
    cmd(op::WRITE_10, RW10),
    cmd(
        op::SYNCHRONIZE_CACHE_10,
        &[0xff, 0, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0],
    ),
    cmd(
        op::MODE_SENSE_10,
        &[0xff, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0],
    ),
    cmd(op::READ_16, RW16),
    cmd(op::WRITE_16, RW16),
    cmd(
        op::SYNCHRONIZE_CACHE_16,
        &[
            0xff, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0,
        ],
    ),
    sa(
        op::SERVICE_ACTION_IN_16,
        SA_READ_CAPACITY_16,
        &[
            0xff, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0,
        ],
    ),
    cmd(
        op::REPORT_LUNS,
        &[0xff, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0],
    ),
    sa(
        op::MAINTENANCE_IN,
        SA_REPORT_SUPPORTED_OPCODES,
        &[
            0xff, 0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0,
        ],
    ),
    cmd(op::READ_12, RW12),
    cmd(op::WRITE_12, RW12),
];

/// SERVACTV: the command descriptor's service action is valid.
const SERVACTV: u8 = 0x01;
/// CTDP: a command timeouts descriptor follows.
const CTDP: u8 = 0x02;
/// SUPPORT values of the one-command format.
const SUPPORT_NONE: u8 = 0x1;
const SUPPORT_STANDARD: u8 = 0x3;
/// A command timeouts descriptor: length 0x0a, no timeouts reported.
const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// The response to REPORT SUPPORTED OPERATION CODES `cdb`, before
/// truncation to its allocation length.
pub fn report_supported_opcodes(cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let rctd = cdb.byte(2) & 0x80 != 0;
    let options = cdb.byte(2) & 0x07;
    let requested = cdb.byte(3);
    // A 16-bit field.
    let requested_sa = cdb.be(4, 2) as u16;
    match options {
        0 => Ok(all_commands(rctd)),
        1..=3 => {
            let found = COMMANDS.iter().find(|c| c.opcode == requested);
            let command = match (options, found) {
                // Option 1 names a command without service actions.
                (1, Some(c)) if c.service_action.is_some() => {
                    return Err(Sense::invalid_field(3, None));
                }
                (1, c) => c,
                // Option 2 names a command with service actions.
                (2, Some(c)) if c.service_action.is_none() => {
                    return Err(Sense::invalid_field(3, None));
                }
                (_, c) => c.filter(|c| {
                    c.service_action
                        .is_none_or(|sa| u16::from(sa) == requested_sa)
                }),
            };
            Ok(one_command(command, rctd))
        }
        _ => Err(Sense::invalid_field(2, Some(0))),
    }
}

fn all_commands(rctd: bool) -> Vec<u8> {
    let mut list = Vec::new();
    for c in COMMANDS {
        let mut flags = if c.service_action.is_some() {
            SERVACTV
        } else {
            0
        };
        if rctd {
            flags |= CTDP;
        }
        let sa = u16::from(c.service_action.unwrap_or(0));
        list.push(c.opcode);
        list.push(0);
        list.extend_from_slice(&sa.to_be_bytes());
        list.extend_from_slice(&[0, flags]);
        list.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
        if rctd {
            list.extend_from_slice(&TIMEOUTS);
        }
    }
    let mut r = (list.len() as u32).to_be_bytes().to_vec();
    r.extend_from_slice(&list);
    r
}

fn one_command(command: Option<&Command>, rctd: bool) -> Vec<u8> {
    let ctdp = if rctd { 0x80 } else { 0 };
    let Some(c) = command else {
        return vec![0, ctdp | SUPPORT_NONE, 0, 0];
    };
    let mut r = vec![0, ctdp | SUPPORT_STANDARD];
    r.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
    r.extend_from_slice(c.usage);
    if rctd {
        r.extend_from_slice(&TIMEOUTS);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdb::cdb_len;

    fn rsoc(options: u8, opcode: u8, sa: u16) -> Result<Vec<u8>, Sense> {
        let mut c = [0u8; 12];
        c[0] = op::MAINTENANCE_IN;
        c[1] = SA_REPORT_SUPPORTED_OPCODES;
        c[2] = options;
        c[3] = opcode;
        c[4..6].copy_from_slice(&sa.to_be_bytes());
        c[6..10].copy_from_slice(&4096u32.to_be_bytes());
        report_supported_opcodes(&Cdb::new(&c).unwrap())
    }

    #[test]
    fn the_table_is_consistent() {
        for c in COMMANDS {
            assert_eq!(Some(c.usage.len()), cdb_len(c.opcode), "{:#x}", c.opcode);
            assert_eq!(c.usage[0], 0xff);
        }
        assert!(COMMANDS.windows(2).all(|w| w[0].opcode < w[1].opcode));
    }

    #[test]
    fn all_commands_format() {
        let r = rsoc(0, 0, 0).unwrap();
        assert_eq!(
            u32::from_be_bytes([r[0], r[1], r[2], r[3]]) as usize,
            r.len() - 4
        );
        assert_eq!(r.len() - 4, 8 * COMMANDS.len());
        let d = r[4..]
            .chunks(8)
            .find(|d| d[0] == op::SERVICE_ACTION_IN_16)
            .unwrap();
        assert_eq!(d, [0x9e, 0, 0, 0x10, 0, SERVACTV, 0, 16]);
        let r = rsoc(0x80, 0, 0).unwrap();
        assert_eq!(r.len() - 4, 20 * COMMANDS.len());
        assert_eq!(r[4 + 5], CTDP);
    }

    #[test]
    fn one_command_format() {
        let r = rsoc(1, op::READ_10, 0).unwrap();
        assert_eq!(r[..4], [0, 3, 0, 10]);
        assert_eq!(&r[4..], RW10);
        // Not supported.
        assert_eq!(rsoc(1, 0x41, 0).unwrap(), [0, 1, 0, 0]);
        assert_eq!(rsoc(2, 0x9e, 0x11).unwrap(), [0, 1, 0, 0]);
        let r = rsoc(2, 0x9e, 0x10).unwrap();
        assert_eq!((r[1], r.len()), (3, 4 + 16));
        let r = rsoc(3, 0x9e, 0x10).unwrap();
        assert_eq!(r[1], 3);
        let r = rsoc(0x83, op::INQUIRY, 0).unwrap();
        assert_eq!((r[1], r.len()), (0x83, 4 + 6 + 12));
        // Option 1 with a service-action command, option 2 without, and a
        // reserved option.
        assert_eq!(rsoc(1, 0x9e, 0), Err(Sense::invalid_field(3, None)));
        assert_eq!(rsoc(2, op::READ_10, 0), Err(Sense::invalid_field(3, None)));
        assert_eq!(rsoc(4, 0, 0), Err(Sense::invalid_field(2, Some(0))));
    }
}
