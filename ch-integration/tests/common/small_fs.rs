//! A small tmpfs that fills up for real (ENOSPC), mounted in a mount
//! namespace of the test's own: what it mounts is seen only by the test's
//! thread and the processes it starts (the daemon), never by the host, and
//! goes away with them.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Runs `f` on a thread of its own in a new, private mount namespace (the
/// processes it starts inherit it) and returns its result; a panic in `f`
/// is the caller's. `None`, after printing `SKIP <what>: ...`, without
/// root.
pub fn in_private_mount_ns<T, F>(what: &str, f: F) -> Option<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {what}: a tmpfs of the test's own needs root");
        return None;
    }
    // A thread of its own: a mount namespace is per thread until the
    // thread ends, and the test harness may reuse its threads.
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; with CLONE_NEWNS it gives this
        // thread (and the processes it starts) a copy of the mount table.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        assert_eq!(r, 0, "unshare(CLONE_NEWNS): {}", io::Error::last_os_error());
        // Mounts made here must not propagate to the host's namespace.
        sys_mount(
            None,
            Path::new("/"),
            None,
            libc::MS_REC | libc::MS_PRIVATE,
            None,
        )
        .expect("make / private");
        f()
    });
    match thread.join() {
        Ok(v) => Some(v),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn cstring(s: &[u8]) -> CString {
    CString::new(s).expect("no NUL in mount arguments")
}

/// mount(2).
fn sys_mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(|s| cstring(s.as_bytes()));
    let target = cstring(target.as_os_str().as_bytes());
    let fstype = fstype.map(|s| cstring(s.as_bytes()));
    let data = data.map(|s| cstring(s.as_bytes()));
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that
    // outlives the call.
    let r = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A tmpfs of a few MiB, mounted until dropped. Mount it from the thread
/// [`in_private_mount_ns`] runs.
pub struct SmallFs {
    pub dir: PathBuf,
}

impl SmallFs {
    /// Mounts a tmpfs of `size` bytes on `dir`, created if missing.
    pub fn mount(dir: &Path, size: u64) -> SmallFs {
        std::fs::create_dir_all(dir).expect("tmpfs mount point");
        sys_mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            0,
            Some(&format!("size={size},mode=0700")),
        )
        .expect("mount tmpfs");
        SmallFs {
            dir: dir.to_path_buf(),
        }
    }

    /// Gives it `size` bytes (`mount -o remount,size=...`).
    pub fn resize(&self, size: u64) {
        sys_mount(
            None,
            &self.dir,
            None,
            libc::MS_REMOUNT,
            Some(&format!("size={size}")),
        )
        .expect("remount tmpfs");
    }

    /// Bytes free.
    pub fn free(&self) -> u64 {
        let path = cstring(self.dir.as_os_str().as_bytes());
        // SAFETY: statvfs is plain data, valid when zeroed.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated, `st` a valid out-parameter.
        let r = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(r, 0, "statvfs: {}", io::Error::last_os_error());
        st.f_bavail * st.f_frsize
    }

    /// Fills it with a file until ENOSPC, then frees `leave` bytes of it
    /// again; returns the file, whose removal frees the rest.
    pub fn fill(&self, leave: u64) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = File::create(&path).expect("filler");
        let chunk = vec![0xeeu8; 64 << 10];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        let len = f.metadata().expect("filler size").len();
        f.set_len(len.saturating_sub(leave)).expect("shrink filler");
        let free = self.free();
        assert!(
            (leave..leave + (64 << 10)).contains(&free),
            "{free} bytes free after filling, wanted {leave}"
        );
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let dir = cstring(self.dir.as_os_str().as_bytes());
        // SAFETY: `dir` is NUL-terminated. Lazily: the daemon may still
        // hold the image open.
        unsafe { libc::umount2(dir.as_ptr(), libc::MNT_DETACH) };
    }
}
