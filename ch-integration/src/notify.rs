//! The service manager's readiness protocol (`sd_notify`): one datagram of
//! `KEY=VALUE` lines to the UNIX socket named by `$NOTIFY_SOCKET` (a path,
//! or an abstract name written with a leading `@`). Nothing happens when
//! the variable is not set.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`, or `MAINPID=N` and `READY=1` on two
/// lines) to the service manager, if there is one. Returns whether it was
/// sent.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_encoded_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), &socket)?;
        }
    }
    Ok(true)
}

/// [`notify`], logging a failure instead of returning it: readiness is
/// worth a warning, not the daemon.
pub fn notify_or_warn(state: &str) {
    match notify(state) {
        Ok(true) => log::debug!("told the service manager: {}", state.replace('\n', " ")),
        Ok(false) => {}
        Err(e) => log::warn!("cannot notify the service manager ({state:?}): {e}"),
    }
}
