//! Surviving guest memory that its client truncates.
//!
//! Guest RAM arrives as a file the client keeps (a memfd). If the client
//! truncates it after DMA_MAP, the pages past the new end are gone, and the
//! device's next access to them raises SIGBUS, which would kill the whole
//! server with every device it serves. With the handler installed
//! ([`install`]), a SIGBUS inside a mapping registered with [`register`]
//! is answered by mapping private zero memory over the whole mapping (not
//! just the page: huge pages cannot be split, and one replacement keeps a
//! hostile request from splitting the mapping into thousands of pieces):
//! the access goes on (reads see zeros, writes reach nobody), and the
//! mapping is flagged ([`GuestMapping::take_fault`]), so that the server
//! can drop the client. A SIGBUS anywhere else, or one sent by a process
//! rather than raised by a fault, goes to the handler that was there
//! before (Rust's stack-overflow handler), or kills the process as usual.
//!
//! The kernel's own accesses (`pread` into guest memory, say) fail with
//! `EFAULT` instead and need none of this.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Mappings that can be registered at once in the process; once the
/// handler is installed, [`register`] refuses more (the server answers
/// DMA_MAP with ENOSPC), so that no mapping goes unprotected.
pub const MAX_GUEST_MAPPINGS: usize = 4096;

/// `start` of a slot being filled in.
const FILLING: usize = usize::MAX;

struct Slot {
    /// Host address of the mapping; 0: free.
    start: AtomicUsize,
    len: AtomicUsize,
    /// A fault was handled in it.
    faulted: AtomicBool,
    /// Handlers looking at the slot: unregistering waits for them, so that
    /// none can act on a mapping once its registration is dropped.
    users: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
    users: AtomicUsize::new(0),
};

static SLOTS: [Slot; MAX_GUEST_MAPPINGS] = [FREE; MAX_GUEST_MAPPINGS];
/// Faults handled so far, in every mapping.
static FAULTS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();
/// Whether the handler is installed.
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The errno of a failed installation.
static INSTALL_ERROR: AtomicI32 = AtomicI32::new(0);
/// The SIGBUS action before ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A registered guest mapping; unregistered when dropped.
#[derive(Debug)]
pub struct GuestMapping {
    slot: usize,
}

impl GuestMapping {
    /// Whether a SIGBUS was handled in the mapping since the last call.
    pub fn take_fault(&self) -> bool {
        SLOTS[self.slot].faulted.swap(false, Ordering::AcqRel)
    }
}

impl Drop for GuestMapping {
    fn drop(&mut self) {
        let slot = &SLOTS[self.slot];
        // A handler that counted itself in before this store may still be
        // using the old range; one that counts itself in after sees 0.
        slot.start.store(FILLING, Ordering::SeqCst);
        while slot.users.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        slot.faulted.store(false, Ordering::Relaxed);
        slot.start.store(0, Ordering::Release);
    }
}

/// Every slot is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("more than {MAX_GUEST_MAPPINGS} guest mappings")]
pub struct TooManyMappings;

/// Registers the mapping `[start, start + len)` of guest memory. `None`
/// if the handler is not installed (nothing would use the registration);
/// an error if every slot is taken.
pub fn register(start: *const u8, len: usize) -> Result<Option<GuestMapping>, TooManyMappings> {
    let start = start as usize;
    if !INSTALLED.load(Ordering::Acquire) || start == 0 || start == FILLING || len == 0 {
        return Ok(None);
    }
    for (i, slot) in SLOTS.iter().enumerate() {
        if slot
            .start
            .compare_exchange(0, FILLING, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            slot.len.store(len, Ordering::Relaxed);
            slot.faulted.store(false, Ordering::Relaxed);
            slot.start.store(start, Ordering::Release);
            return Ok(Some(GuestMapping { slot: i }));
        }
    }
    Err(TooManyMappings)
}

/// Number of faults handled so far in all mappings: cheap to poll, it
/// changes only when some mapping has a fault to take.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

/// Installs the SIGBUS handler, once per process; later calls return what
/// the first one did. Mappings registered before are not protected.
pub fn install() -> io::Result<()> {
    INSTALL.call_once(|| match install_handler() {
        Ok(()) => INSTALLED.store(true, Ordering::Release),
        Err(e) => INSTALL_ERROR.store(e.raw_os_error().unwrap_or(libc::EINVAL), Ordering::Release),
    });
    match INSTALLED.load(Ordering::Acquire) {
        true => Ok(()),
        false => Err(io::Error::from_raw_os_error(
            INSTALL_ERROR.load(Ordering::Acquire),
        )),
    }
}

fn install_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value to fill in; the handler
    // has the SA_SIGINFO signature, and sigaction only reads `action` and
    // writes `previous`.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        // On the alternate stack, as Rust's stack-overflow handler (which
        // we chain to) expects.
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
            return Err(io::Error::last_os_error());
        }
        let _ = PREVIOUS.set(previous);
    }
    Ok(())
}

/// Maps zero memory over the registered mapping that holds `addr`, if
/// any; whether it did. Async-signal-safe: atomics and one mmap.
fn patch(addr: usize) -> bool {
    for slot in SLOTS.iter() {
        let start = slot.start.load(Ordering::Relaxed);
        if start == 0 || start == FILLING || addr < start {
            continue;
        }
        // Counted in, the slot cannot be unregistered (nor its mapping
        // unmapped) until we are done: look again.
        slot.users.fetch_add(1, Ordering::SeqCst);
        let patched = patch_slot(slot, addr);
        slot.users.fetch_sub(1, Ordering::SeqCst);
        if patched {
            return true;
        }
    }
    false
}

/// [`patch`] for one slot the caller counted itself into.
fn patch_slot(slot: &Slot, addr: usize) -> bool {
    let start = slot.start.load(Ordering::SeqCst);
    if start == 0 || start == FILLING || addr < start {
        return false;
    }
    let len = slot.len.load(Ordering::SeqCst);
    if addr - start >= len {
        return false;
    }
    // SAFETY: the range is a guest mapping the server owns: it stays
    // mapped while we are counted into its slot (a mapping is unregistered
    // before it is unmapped). Replacing it with anonymous memory keeps it
    // mapped and writable for whoever accesses it. Its start and length
    // are those of the original mapping, so they suit huge pages too.
    let p = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return false;
    }
    slot.faulted.store(true, Ordering::Release);
    FAULTS.fetch_add(1, Ordering::AcqRel);
    true
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler;
    // for a SIGBUS raised by a fault (si_code > 0) si_addr is the faulting
    // address. errno is saved around our syscall, as the interrupted code
    // may be using it.
    unsafe {
        let errno = *libc::__errno_location();
        let handled = (*info).si_code > 0 && patch((*info).si_addr() as usize);
        *libc::__errno_location() = errno;
        if handled {
            return;
        }
    }
    match PREVIOUS.get() {
        Some(previous)
            if previous.sa_sigaction != libc::SIG_DFL && previous.sa_sigaction != libc::SIG_IGN =>
        {
            // SAFETY: `sa_sigaction` is the handler that was installed for
            // SIGBUS, with the signature its flags say.
            unsafe {
                if previous.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(previous.sa_sigaction);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(previous.sa_sigaction);
                    f(sig);
                }
            }
        }
        _ => {
            // The default action: put it back and return; the access
            // faults again and the process dies as it would have.
            // SAFETY: a zeroed sigaction with SIG_DFL is valid.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};

    #[test]
    fn a_truncated_mapping_reads_zeros_and_is_flagged() {
        install().unwrap();
        let page = 4096;
        // SAFETY: memfd_create with a valid name; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(2 * page as u64).unwrap();
        // SAFETY: a new shared mapping of the whole file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p.cast::<u8>();
        // SAFETY: inside the mapping, file still full length.
        unsafe { p.write_volatile(7) };
        let mapping = register(p, 2 * page).unwrap().unwrap();
        let before = faults();
        file.set_len(0).unwrap();
        // SAFETY: inside the mapping; the page is gone from the file, so
        // this raises SIGBUS, which the handler answers by replacing the
        // whole mapping.
        let (a, b) = unsafe { (p.read_volatile(), p.add(page).read_volatile()) };
        assert_eq!((a, b), (0, 0));
        // SAFETY: as above, now private zero memory.
        unsafe { p.add(page + 1).write_volatile(9) };
        assert_eq!(faults(), before + 1);
        assert!(mapping.take_fault());
        assert!(!mapping.take_fault());
        drop(mapping);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p.cast(), 2 * page) };
    }

    #[test]
    fn slots_are_reused() {
        install().unwrap();
        let x = [0u8; 16];
        let a = register(x.as_ptr(), 16).unwrap().unwrap();
        let slot = a.slot;
        drop(a);
        let b = register(x.as_ptr(), 16).unwrap().unwrap();
        assert!(b.slot <= slot);
        assert!(register(std::ptr::null(), 16).unwrap().is_none());
        assert!(register(x.as_ptr(), 0).unwrap().is_none());
    }
}
