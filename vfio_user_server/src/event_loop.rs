//! An epoll loop serving several devices, each on its own socket, plus
//! any extra fds (device kicks, timers, a control socket).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};

use log::{error, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::device::{Interest, WatchedFd};
use crate::server::Server;

/// Something else the loop watches: a readable fd and what to do then.
pub trait EventHandler: Send {
    /// The fd to watch for readability.
    fn fd(&self) -> RawFd;
    /// `fd` is readable; the handler may act on the loop's servers.
    fn handle(&mut self, servers: &mut [Server]);
}

/// Stops a running [`EventLoop`] from another thread or a signal handler.
#[derive(Clone)]
pub struct StopHandle(Arc<EventFd>);

impl StopHandle {
    /// Asks the loop to return from [`EventLoop::run`].
    pub fn stop(&self) {
        let _ = self.0.write(1);
    }

    /// The raw eventfd (async-signal-safe to `write` to).
    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Makes SIGINT and SIGTERM stop the loop, and ignores SIGPIPE (a
    /// client vanishing mid-write is an error, not a death). Once per
    /// process: a second call fails with `AlreadyExists`.
    pub fn stop_on_termination_signals(&self) -> io::Result<()> {
        SIGNAL_STOP
            .set(self.clone())
            .map_err(|_| io::Error::from(io::ErrorKind::AlreadyExists))?;
        let handler = stop_on_signal as *const () as libc::sighandler_t;
        for (signal, action) in [
            (libc::SIGINT, handler),
            (libc::SIGTERM, handler),
            (libc::SIGPIPE, libc::SIG_IGN),
        ] {
            // SAFETY: the handler does async-signal-safe work only.
            if unsafe { libc::signal(signal, action) } == libc::SIG_ERR {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// The stop handle the termination signals use: set once and never
/// dropped, so its eventfd stays open for as long as a signal may come.
static SIGNAL_STOP: OnceLock<StopHandle> = OnceLock::new();

extern "C" fn stop_on_signal(_signal: libc::c_int) {
    // An atomic load and a write(2) to the eventfd: async-signal-safe.
    if let Some(stop) = SIGNAL_STOP.get() {
        stop.stop();
    }
}

#[derive(Clone, Copy)]
enum Token {
    Stop,
    Listener(usize),
    Connection(usize),
    DeviceFd(usize, RawFd),
    Handler(usize),
    IrqUnmask(usize),
}

impl Token {
    fn encode(self) -> u64 {
        let (kind, idx, fd) = match self {
            Token::Stop => (0u64, 0usize, 0),
            Token::Listener(i) => (1, i, 0),
            Token::Connection(i) => (2, i, 0),
            Token::DeviceFd(i, fd) => (3, i, fd),
            Token::Handler(i) => (4, i, 0),
            Token::IrqUnmask(i) => (5, i, 0),
        };
        (kind << 56) | ((idx as u64 & 0xff_ffff) << 32) | (fd as u32 as u64)
    }

    fn decode(v: u64) -> Token {
        let idx = ((v >> 32) & 0xff_ffff) as usize;
        match v >> 56 {
            1 => Token::Listener(idx),
            2 => Token::Connection(idx),
            3 => Token::DeviceFd(idx, v as u32 as RawFd),
            4 => Token::Handler(idx),
            5 => Token::IrqUnmask(idx),
            _ => Token::Stop,
        }
    }
}

/// A client connection as the epoll set watches it.
struct WatchedConnection {
    /// Which connection ([`Server::connection`]).
    serial: u64,
    /// Our duplicate of its fd, which is what epoll watches: it can be
    /// removed after the server has closed its own, even if a child forked
    /// meanwhile still holds the socket (a closed fd leaves an epoll set
    /// only with the last reference to its file) or the fd number was
    /// reused.
    dup: OwnedFd,
    interest: Interest,
}

struct Registered {
    conn: Option<WatchedConnection>,
    /// The device's fds as the epoll set has them (an fd with
    /// [`Interest::NONE`] is not in the set).
    device_fds: Vec<WatchedFd>,
    /// The server's interrupt unmask eventfd as watched: its generation
    /// and our duplicate of it. The duplicate is what epoll watches, so
    /// that it can be removed after the server has closed its own.
    irq_unmask: (u64, Option<EventFd>),
}

/// Makes reads and writes of `fd` return `EAGAIN` instead of blocking:
/// the event loop must never wait on a descriptor it watches (an epoll
/// readiness can be stale by the time it is handled).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl takes any descriptor number (EBADF if it is none);
    // no memory is passed.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 {
            return Err(io::Error::last_os_error());
        }
        if fl & libc::O_NONBLOCK == 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A new eventfd for the loop to watch: non-blocking (see
/// [`set_nonblocking`]) and closed on exec, so that the new process of an
/// upgrade inherits none of the old one's.
pub fn new_eventfd() -> io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
}

/// The event loop.
pub struct EventLoop {
    epoll: RawFd,
    servers: Vec<Server>,
    registered: Vec<Registered>,
    handlers: Vec<Box<dyn EventHandler>>,
    stop: StopHandle,
    busy_poll: std::time::Duration,
}

fn ctl(
    epoll: RawFd,
    op: epoll::ControlOptions,
    fd: RawFd,
    events: u32,
    token: Token,
) -> io::Result<()> {
    epoll::ctl(
        epoll,
        op,
        fd,
        epoll::Event::new(epoll::Events::from_bits_truncate(events), token.encode()),
    )
}

/// Replaces the watched interrupt unmask eventfd of server `i` by its
/// current one.
fn watch_irq_unmask(epoll: RawFd, i: usize, server: &Server, reg: &mut Registered) {
    let token = Token::IrqUnmask(i);
    if let Some(old) = reg.irq_unmask.1.take() {
        let del = epoll::ControlOptions::EPOLL_CTL_DEL;
        if let Err(e) = ctl(epoll, del, old.as_raw_fd(), 0, token) {
            error!("epoll_ctl for the unmask eventfd of server {i}: {e}");
        }
    }
    let (generation, fd) = server.irq_unmask_fd();
    reg.irq_unmask = (generation, None);
    let fd = match fd {
        None => return,
        Some(Ok(fd)) => fd,
        Some(Err(e)) => {
            error!("cannot watch the unmask eventfd of server {i}: {e}");
            return;
        }
    };
    // Edge-triggered: every signal (a write, even to a full counter) is an
    // event, so the eventfd never needs reading (see
    // `Irqs::unmask_signalled`); one already signalled is an event at once.
    let add = epoll::ControlOptions::EPOLL_CTL_ADD;
    let events = (epoll::Events::EPOLLIN | epoll::Events::EPOLLET).bits();
    match ctl(epoll, add, fd.as_raw_fd(), events, token) {
        Ok(()) => reg.irq_unmask.1 = Some(fd),
        Err(e) => error!("epoll_ctl for the unmask eventfd of server {i}: {e}"),
    }
}

/// Makes the epoll set watch server `i`'s current connection (if any) as
/// it wants, given that it watches `watched` (updated).
fn watch_connection(
    epoll: RawFd,
    i: usize,
    server: &Server,
    watched: &mut Option<WatchedConnection>,
) -> io::Result<()> {
    use epoll::ControlOptions::{EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD};
    let token = Token::Connection(i);
    let current = server.connection();
    let interest = server.interest();
    // A half-close is news only while the server reads: otherwise it
    // would be reported, level-triggered, on every wait.
    let bits = |interest: Interest| {
        let rdhup = if interest.read {
            epoll::Events::EPOLLRDHUP.bits()
        } else {
            0
        };
        rdhup | epoll_bits(interest)
    };
    match (watched.as_mut(), current) {
        (Some(w), Some((serial, _))) if w.serial == serial => {
            if w.interest != interest {
                ctl(
                    epoll,
                    EPOLL_CTL_MOD,
                    w.dup.as_raw_fd(),
                    bits(interest),
                    token,
                )?;
                w.interest = interest;
            }
            return Ok(());
        }
        _ => {}
    }
    if let Some(old) = watched.take() {
        // Closing the duplicate right after also drops the socket, if the
        // server was the last other holder.
        let _ = ctl(epoll, EPOLL_CTL_DEL, old.dup.as_raw_fd(), 0, token);
    }
    let Some((serial, fd)) = current else {
        return Ok(());
    };
    // SAFETY: `fd` is the attached connection's, open while `server` is
    // borrowed here; it is only duplicated.
    let dup = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    ctl(
        epoll,
        EPOLL_CTL_ADD,
        dup.as_fd().as_raw_fd(),
        bits(interest),
        token,
    )?;
    *watched = Some(WatchedConnection {
        serial,
        dup,
        interest,
    });
    Ok(())
}

fn epoll_bits(interest: Interest) -> u32 {
    let mut bits = 0;
    if interest.read {
        bits |= epoll::Events::EPOLLIN.bits();
    }
    if interest.write {
        bits |= epoll::Events::EPOLLOUT.bits();
    }
    bits
}

/// Makes the epoll set watch the device fds of server `i` as `wanted`
/// says, given that it watches them as `current` says (updated). An fd
/// whose interest is [`Interest::NONE`] leaves the set, so that nothing,
/// not even a hang-up, wakes the loop for it.
fn watch_device_fds(
    epoll: RawFd,
    i: usize,
    wanted: &[WatchedFd],
    current: &mut Vec<WatchedFd>,
) -> io::Result<()> {
    use epoll::ControlOptions::{EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD};
    let was = |fd: RawFd| {
        current
            .iter()
            .find(|w| w.fd == fd)
            .map_or(Interest::NONE, |w| w.interest)
    };
    let mut result = Ok(());
    // fds no longer listed leave the set (if they are still open).
    for old in current.iter() {
        if !old.interest.is_none() && !wanted.iter().any(|w| w.fd == old.fd) {
            let _ = ctl(epoll, EPOLL_CTL_DEL, old.fd, 0, Token::DeviceFd(i, old.fd));
        }
    }
    for w in wanted {
        let before = was(w.fd);
        let token = Token::DeviceFd(i, w.fd);
        let r = if before == w.interest {
            Ok(())
        } else if before.is_none() {
            ctl(epoll, EPOLL_CTL_ADD, w.fd, epoll_bits(w.interest), token)
        } else if w.interest.is_none() {
            ctl(epoll, EPOLL_CTL_DEL, w.fd, 0, token)
        } else {
            ctl(epoll, EPOLL_CTL_MOD, w.fd, epoll_bits(w.interest), token)
        };
        if r.is_err() && result.is_ok() {
            result = r;
        }
    }
    current.clear();
    current.extend_from_slice(wanted);
    result
}

impl EventLoop {
    /// Creates an empty loop.
    pub fn new() -> io::Result<EventLoop> {
        let epoll = epoll::create(true)?;
        let stop = StopHandle(Arc::new(new_eventfd()?));
        ctl(
            epoll,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            stop.raw_fd(),
            epoll::Events::EPOLLIN.bits(),
            Token::Stop,
        )?;
        Ok(EventLoop {
            epoll,
            servers: Vec::new(),
            registered: Vec::new(),
            handlers: Vec::new(),
            stop,
            busy_poll: std::time::Duration::ZERO,
        })
    }

    /// After each burst of events, keep polling (without sleeping) for up to
    /// `window` before blocking: a client's next message is then picked up
    /// without a wake-up, at the price of that much CPU per burst. Off
    /// (zero) by default.
    pub fn set_busy_poll(&mut self, window: std::time::Duration) {
        self.busy_poll = window;
    }

    /// A handle that stops [`EventLoop::run`].
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Adds a server; returns its index.
    pub fn add_server(&mut self, mut server: Server) -> io::Result<usize> {
        let idx = self.servers.len();
        let add = || epoll::ControlOptions::EPOLL_CTL_ADD;
        ctl(
            self.epoll,
            add(),
            server.listener_fd(),
            epoll::Events::EPOLLIN.bits(),
            Token::Listener(idx),
        )?;
        let irq_unmask = (server.irq_unmask_generation(), None);
        let mut reg = Registered {
            conn: None,
            device_fds: Vec::new(),
            irq_unmask,
        };
        watch_device_fds(
            self.epoll,
            idx,
            server.device_watched_fds(),
            &mut reg.device_fds,
        )?;
        self.servers.push(server);
        self.registered.push(reg);
        // A server handed over by another process comes with its client.
        self.update_registrations();
        Ok(idx)
    }

    /// Adds another fd to watch.
    pub fn add_handler(&mut self, handler: Box<dyn EventHandler>) -> io::Result<()> {
        let idx = self.handlers.len();
        ctl(
            self.epoll,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            handler.fd(),
            epoll::Events::EPOLLIN.bits(),
            Token::Handler(idx),
        )?;
        self.handlers.push(handler);
        Ok(())
    }

    /// The servers.
    pub fn servers(&mut self) -> &mut [Server] {
        &mut self.servers
    }

    /// Runs until [`StopHandle::stop`].
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 64];
        let mut idle_since: Option<std::time::Instant> = None;
        // A device resumed before the loop ran (handed over by another
        // process) may have work already: look once before sleeping.
        let mut deferred_left = true;
        loop {
            let spinning = deferred_left
                || (!self.busy_poll.is_zero()
                    && idle_since.is_none_or(|t| t.elapsed() < self.busy_poll));
            let timeout = if spinning { 0 } else { self.sleep_limit_ms() };
            let n = match epoll::wait(self.epoll, timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 && !deferred_left {
                if self.expire_handshakes() {
                    self.update_registrations();
                }
                idle_since.get_or_insert_with(std::time::Instant::now);
                continue;
            }
            idle_since = None;
            for ev in &events[..n] {
                let bits = epoll::Events::from_bits_truncate(ev.events);
                match Token::decode(ev.data) {
                    Token::Stop => {
                        let _ = self.stop.0.read();
                        return Ok(());
                    }
                    Token::Listener(i) => {
                        if let Some(s) = self.servers.get_mut(i) {
                            if let Err(e) = s.accept() {
                                warn!("accept failed: {e}");
                            }
                        }
                    }
                    Token::Connection(i) => {
                        let Some(s) = self.servers.get_mut(i) else {
                            continue;
                        };
                        let hup =
                            bits.intersects(epoll::Events::EPOLLHUP | epoll::Events::EPOLLERR);
                        let readable = bits.contains(epoll::Events::EPOLLIN) || hup;
                        let writable = bits.contains(epoll::Events::EPOLLOUT);
                        // A gone client leaves the epoll set below, with
                        // the rest of the burst's changes.
                        s.handle_connection_event(readable, writable);
                    }
                    Token::DeviceFd(i, fd) => {
                        if let Some(s) = self.servers.get_mut(i) {
                            let hup =
                                bits.intersects(epoll::Events::EPOLLHUP | epoll::Events::EPOLLERR);
                            let ready = Interest {
                                read: bits.contains(epoll::Events::EPOLLIN) || hup,
                                write: bits.contains(epoll::Events::EPOLLOUT) || hup,
                            };
                            s.handle_device_event(fd, ready);
                        }
                    }
                    Token::Handler(i) => {
                        if let Some(h) = self.handlers.get_mut(i) {
                            h.handle(&mut self.servers);
                        }
                    }
                    Token::IrqUnmask(i) => {
                        if let Some(s) = self.servers.get_mut(i) {
                            s.handle_irq_unmask();
                        }
                    }
                }
            }
            // Work the handlers deferred runs now that their replies are
            // out; a disconnect it causes is picked up just below.
            deferred_left = false;
            for s in self.servers.iter_mut() {
                // Messages left by a client's last turn get the next one.
                if s.has_message_backlog() {
                    s.handle_connection_event(false, false);
                }
                deferred_left |= s.run_deferred();
                deferred_left |= s.has_message_backlog();
                s.check_guest_memory();
            }
            self.expire_handshakes();
            self.update_registrations();
        }
    }

    /// How long the loop may sleep: until the next VERSION deadline of a
    /// client (rounded up to whole milliseconds), or forever (-1).
    fn sleep_limit_ms(&self) -> i32 {
        let Some(deadline) = self
            .servers
            .iter()
            .filter_map(Server::handshake_deadline)
            .min()
        else {
            return -1;
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
    }

    /// Drops the clients whose VERSION deadline passed; whether any was.
    fn expire_handshakes(&mut self) -> bool {
        let now = std::time::Instant::now();
        let mut expired = false;
        for s in self.servers.iter_mut() {
            expired |= s.expire_handshake(now);
        }
        expired
    }

    /// Brings the epoll set in line with each server's connection state
    /// and its device's fd interest.
    fn update_registrations(&mut self) {
        for (i, (s, reg)) in self
            .servers
            .iter_mut()
            .zip(self.registered.iter_mut())
            .enumerate()
        {
            if s.irq_unmask_generation() != reg.irq_unmask.0 {
                watch_irq_unmask(self.epoll, i, s, reg);
            }
            let wanted = s.device_watched_fds();
            if wanted != reg.device_fds.as_slice() {
                if let Err(e) = watch_device_fds(self.epoll, i, wanted, &mut reg.device_fds) {
                    error!("epoll_ctl for the fds of device {i}: {e}");
                }
            }
            if let Err(e) = watch_connection(self.epoll, i, s, &mut reg.conn) {
                error!("epoll_ctl for connection {i}: {e}");
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        // SAFETY: `epoll` is an fd this loop created and owns.
        unsafe { libc::close(self.epoll) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    struct Counter(EventFd, Arc<AtomicU64>);

    impl EventHandler for Counter {
        fn fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
        fn handle(&mut self, _servers: &mut [Server]) {
            if let Ok(n) = self.0.read() {
                self.1.fetch_add(n, Ordering::SeqCst);
            }
        }
    }

    fn wait_for(count: &AtomicU64, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while count.load(Ordering::SeqCst) != want {
            assert!(Instant::now() < deadline, "handler not called");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn busy_polling_loop_serves_events_and_stops() {
        for window in [Duration::ZERO, Duration::from_millis(2)] {
            let mut ev = EventLoop::new().unwrap();
            ev.set_busy_poll(window);
            let efd = EventFd::new(EFD_NONBLOCK).unwrap();
            let kick = efd.try_clone().unwrap();
            let count = Arc::new(AtomicU64::new(0));
            ev.add_handler(Box::new(Counter(efd, count.clone())))
                .unwrap();
            let stop = ev.stop_handle();
            let t = std::thread::spawn(move || ev.run());
            kick.write(2).unwrap();
            wait_for(&count, 2);
            // Past the polling window the loop sleeps, and still wakes.
            std::thread::sleep(window * 2);
            kick.write(3).unwrap();
            wait_for(&count, 5);
            stop.stop();
            t.join().unwrap().unwrap();
        }
    }
}
