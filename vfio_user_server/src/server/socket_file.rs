//! The listening socket and the file it is bound to: a stale socket left
//! by a killed server is taken over, anything else at the path is refused,
//! the socket appears at its path only once it listens (with its mode
//! already set), and the file goes away with the server.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::info;
use thiserror::Error;

/// Errors setting up a server.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The socket path is taken.
    #[error("socket path {0} already exists")]
    PathExists(PathBuf),
    /// bind/listen failed.
    #[error("cannot listen on {0}: {1}")]
    Bind(PathBuf, #[source] io::Error),
    /// Setting permissions failed.
    #[error("cannot set permissions of {0}: {1}")]
    Permissions(PathBuf, #[source] io::Error),
    /// Socket I/O failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// A non-blocking listening socket, and the path it is bound to if we
/// bound it (removed on drop, unless another process took the socket
/// over).
pub(super) struct SocketFile {
    listener: UnixListener,
    path: Option<PathBuf>,
    /// The file is ours to remove.
    owned: bool,
}

impl SocketFile {
    /// Binds `path`, which must not exist unless it is a socket nobody
    /// listens on, with permissions `mode`.
    pub(super) fn bind(path: &Path, mode: u32) -> Result<SocketFile, ServerError> {
        let mut s = Self::from_listener(listen_in_place_of_stale(path, mode)?)?;
        s.claim(path);
        Ok(s)
    }

    /// Uses a socket that already listens (its file, if any, is the
    /// caller's).
    pub(super) fn from_listener(listener: UnixListener) -> Result<SocketFile, ServerError> {
        listener.set_nonblocking(true)?;
        Ok(SocketFile {
            listener,
            path: None,
            owned: false,
        })
    }

    /// Records that the socket is bound at `path`, which now goes away
    /// with it.
    pub(super) fn claim(&mut self, path: &Path) {
        self.path = Some(path.to_path_buf());
        self.owned = true;
    }

    /// Another process serves the socket now: its file stays.
    pub(super) fn disown(&mut self) {
        self.owned = false;
    }

    /// The listening socket.
    pub(super) fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The listening socket's fd.
    pub(super) fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The path, if we bound it.
    pub(super) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.as_ref().filter(|_| self.owned) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// [`listen_at`] `path`, which must not exist unless it is a socket nobody
/// listens on: what a killed server leaves behind, taken over. Anything
/// else at the path is somebody's file, and refused.
pub fn listen_in_place_of_stale(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    if let Ok(meta) = path.symlink_metadata() {
        use std::os::unix::fs::FileTypeExt;
        let stale = meta.file_type().is_socket()
            && UnixStream::connect(path)
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused);
        if !stale {
            return Err(ServerError::PathExists(path.to_path_buf()));
        }
        info!("removing stale socket {}", path.display());
        std::fs::remove_file(path).map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
    }
    listen_at(path, mode)
}

/// The longest path a UNIX socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A socket listening at `path`, which must not exist, with permissions
/// `mode`. It appears at its path only once it listens with its mode set:
/// a client that sees the path can connect at once, and nobody can
/// connect meanwhile. The file is the caller's to remove.
pub fn listen_at(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    use std::os::unix::ffi::OsStrExt;
    let len = path.as_os_str().as_bytes().len();
    if len > MAX_SOCKET_PATH {
        return Err(ServerError::Bind(
            path.to_path_buf(),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes long, and a socket path has at most {MAX_SOCKET_PATH}"),
            ),
        ));
    }
    // Bind and listen under a temporary name, then move the socket into
    // place. Where the name beside it would be too long for a socket
    // address, the directory is reached through a descriptor of it.
    let name = format!(".{}.tmp", std::process::id());
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(&name);
    let mut _dir = None;
    if tmp.as_bytes().len() > MAX_SOCKET_PATH {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir =
            std::fs::File::open(parent).map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
        tmp = format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()).into();
        _dir = Some(dir);
    }
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ServerError::Permissions(path.to_path_buf(), e))
        .and_then(|()| rename_noreplace(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Renames `from` to `to`, failing if `to` exists.
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), ServerError> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (Ok(f), Ok(t)) = (c(from), c(to)) else {
        return Err(ServerError::Bind(
            to.to_path_buf(),
            io::ErrorKind::InvalidInput.into(),
        ));
    };
    // SAFETY: two valid NUL-terminated paths; no memory is retained.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        Err(ServerError::PathExists(to.to_path_buf()))
    } else {
        Err(ServerError::Bind(to.to_path_buf(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    use vmm_sys_util::tempdir::TempDir;

    /// A path of `len` bytes in a new directory of `dir`.
    fn path_of(dir: &TempDir, len: usize) -> PathBuf {
        let base = dir.as_path().as_os_str().as_bytes().len() + 1;
        dir.as_path().join("s".repeat(len - base))
    }

    #[test]
    fn socket_paths_as_long_as_an_address_holds() {
        let dir = TempDir::new_with_prefix("/tmp/vfu-sock-").unwrap();
        for len in [60, 100, MAX_SOCKET_PATH] {
            let path = path_of(&dir, len);
            let listener = listen_at(&path, 0o600).unwrap();
            let meta = path.symlink_metadata().unwrap();
            assert!(meta.file_type().is_socket());
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            UnixStream::connect(&path).unwrap();
            drop(listener);
            std::fs::remove_file(&path).unwrap();
        }
        // Nothing else was left in the directory.
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 0);
        let too_long = path_of(&dir, MAX_SOCKET_PATH + 1);
        let e = listen_at(&too_long, 0o600).unwrap_err().to_string();
        assert!(e.contains("108 bytes long"), "{e}");
    }
}
