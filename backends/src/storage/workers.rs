//! A pool of I/O threads that run [`BlockBackend`] calls off the event loop.
//!
//! A device model submits jobs, each with a token, and goes on serving its
//! queues; a worker runs each job and files its result. The first result
//! filed after the device last collected makes [`IoWorkers::completion_fd`]
//! readable, so one wake-up of the event loop collects a whole batch. Two
//! workers on a tmpfs image overlap the copies of different requests; on
//! a real disk they also keep the event loop answering while a request
//! waits for the device.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use log::error;
use vmm_sys_util::eventfd::EventFd;

use super::{BlockBackend, IoBuf};

/// Most worker threads of one pool.
pub const MAX_IO_THREADS: usize = 64;

/// What a job does.
#[derive(Debug)]
pub enum IoOp {
    /// [`BlockBackend::read_vectored_at`] into `bufs`.
    Read {
        /// Disk offset.
        offset: u64,
        /// Destination buffers.
        bufs: Vec<IoBuf<'static>>,
    },
    /// [`BlockBackend::write_vectored_at`] of `bufs`, then a
    /// [`BlockBackend::flush`] if `flush` (write-through).
    Write {
        /// Disk offset.
        offset: u64,
        /// Source buffers.
        bufs: Vec<IoBuf<'static>>,
        /// Flush after writing.
        flush: bool,
    },
    /// [`BlockBackend::flush`].
    Flush,
    /// [`BlockBackend::discard`] of each range `(offset, len)`.
    Discard {
        /// The ranges.
        ranges: Vec<(u64, u64)>,
    },
    /// [`BlockBackend::write_zeroes`] of each range `(offset, len)`, then
    /// a [`BlockBackend::flush`] if `flush` (write-through).
    WriteZeroes {
        /// The ranges.
        ranges: Vec<(u64, u64)>,
        /// Flush after zeroing.
        flush: bool,
    },
}

impl IoOp {
    /// Runs the operation on `backend`, on this thread.
    pub fn run(&self, backend: &dyn BlockBackend) -> io::Result<()> {
        match self {
            IoOp::Read { offset, bufs } => backend.read_vectored_at(bufs, *offset),
            IoOp::Write {
                offset,
                bufs,
                flush,
            } => {
                backend.write_vectored_at(bufs, *offset)?;
                if *flush {
                    backend.flush()?;
                }
                Ok(())
            }
            IoOp::Flush => backend.flush(),
            IoOp::Discard { ranges } => ranges
                .iter()
                .try_for_each(|&(offset, len)| backend.discard(offset, len)),
            IoOp::WriteZeroes { ranges, flush } => {
                for &(offset, len) in ranges {
                    backend.write_zeroes(offset, len)?;
                }
                if *flush {
                    backend.flush()?;
                }
                Ok(())
            }
        }
    }

    /// Takes the buffer list out of the operation (empty if it has none).
    pub fn take_bufs(&mut self) -> Vec<IoBuf<'static>> {
        match self {
            IoOp::Read { bufs, .. } | IoOp::Write { bufs, .. } => std::mem::take(bufs),
            _ => Vec::new(),
        }
    }
}

/// A job: an operation and the token its result is filed under.
#[derive(Debug)]
pub struct IoJob {
    /// Chosen by the submitter, returned with the result.
    pub token: u64,
    /// The operation.
    pub op: IoOp,
}

/// The result of a job. Its buffers are handed back so their storage can
/// be reused.
#[derive(Debug)]
pub struct IoDone {
    /// The job's token.
    pub token: u64,
    /// What the back end returned.
    pub result: io::Result<()>,
    /// The job's buffer list, emptied.
    pub bufs: Vec<IoBuf<'static>>,
}

/// Jobs waiting, results filed, and how many jobs are running.
#[derive(Default)]
struct State {
    queue: VecDeque<IoJob>,
    done: Vec<IoDone>,
    running: usize,
    stop: bool,
}

struct Shared {
    backend: Arc<dyn BlockBackend>,
    state: Mutex<State>,
    /// Signalled when jobs are queued (or on stop).
    work: Condvar,
    /// Signalled when the last running job finished and none is queued.
    idle: Condvar,
    /// Readable while results are filed and not yet collected.
    completion: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker never panics while holding the lock (back-end calls run
        // outside it), so a poisoned lock still holds consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// SAFETY: the buffers of a queued job point to memory that its submitter
// keeps valid, and accesses only as raw bytes, until the job's result is
// collected (the contract of `IoWorkers::submit`, the only way a job
// reaches another thread); the pool only hands them to the back end.
unsafe impl Send for IoJob {}
// SAFETY: a filed result's buffer list is empty (cleared by the worker).
unsafe impl Send for IoDone {}

/// A pool of I/O threads serving one back end.
pub struct IoWorkers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl IoWorkers {
    /// Starts `threads` workers (1 to [`MAX_IO_THREADS`]) running calls on
    /// `backend`; `name` names the threads.
    pub fn new(backend: Arc<dyn BlockBackend>, threads: usize, name: &str) -> io::Result<Self> {
        if threads == 0 || threads > MAX_IO_THREADS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("I/O threads must be 1 to {MAX_IO_THREADS}, not {threads}"),
            ));
        }
        let shared = Arc::new(Shared {
            backend,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            completion: vfio_user_server::event_loop::new_eventfd()?,
        });
        let mut pool = IoWorkers {
            shared,
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            let shared = pool.shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("{name}-io{i}"))
                .spawn(move || work(&shared))?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    /// Queues `jobs`.
    ///
    /// # Safety
    ///
    /// The memory of every buffer in `jobs` must stay mapped, and be
    /// accessed by others only as raw bytes, until the job's result has
    /// been collected with [`IoWorkers::collect`] (or [`IoWorkers::drain`]
    /// returned).
    pub unsafe fn submit(&self, jobs: &mut Vec<IoJob>) {
        let n = jobs.len();
        if n == 0 {
            return;
        }
        self.shared.lock().queue.extend(jobs.drain(..));
        if n == 1 {
            self.shared.work.notify_one();
        } else {
            self.shared.work.notify_all();
        }
    }

    /// Moves the filed results into `out`.
    pub fn collect(&self, out: &mut Vec<IoDone>) {
        // Reset the fd first: a result filed after the swap below makes it
        // readable again.
        let _ = self.shared.completion.read();
        let mut state = self.shared.lock();
        if out.is_empty() {
            std::mem::swap(out, &mut state.done);
        } else {
            out.append(&mut state.done);
        }
    }

    /// Waits until every submitted job has run; their results are then
    /// ready for [`IoWorkers::collect`].
    pub fn drain(&self) {
        let mut state = self.shared.lock();
        while !state.queue.is_empty() || state.running > 0 {
            state = self
                .shared
                .idle
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Submitted jobs whose results have not been filed yet.
    pub fn outstanding(&self) -> usize {
        let state = self.shared.lock();
        state.queue.len() + state.running
    }

    /// Readable when results can be collected; for the event loop.
    pub fn completion_fd(&self) -> RawFd {
        self.shared.completion.as_raw_fd()
    }
}

impl Drop for IoWorkers {
    fn drop(&mut self) {
        self.drain();
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                error!("an I/O thread panicked");
            }
        }
    }
}

/// A worker: runs queued jobs until stopped.
fn work(shared: &Shared) {
    loop {
        let mut job = {
            let mut state = shared.lock();
            loop {
                if let Some(job) = state.queue.pop_front() {
                    state.running += 1;
                    break job;
                }
                if state.stop {
                    return;
                }
                state = shared.work.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        };
        let (result, mut bufs) = run_op(&*shared.backend, &mut job.op);
        bufs.clear();
        let mut state = shared.lock();
        state.done.push(IoDone {
            token: job.token,
            result,
            bufs,
        });
        // Make the fd readable before the job stops counting as running:
        // once `drain` returns, `collect` then clears it for good (a write
        // after that would leave it readable with nothing to collect).
        if state.done.len() == 1 {
            if let Err(e) = shared.completion.write(1) {
                error!("I/O completion eventfd: {e}");
            }
        }
        state.running -= 1;
        if state.queue.is_empty() && state.running == 0 {
            shared.idle.notify_all();
        }
    }
}

/// Runs one operation on `backend`; returns its result and its buffer
/// list. A panicking back end fails the operation instead of the pool.
fn run_op(backend: &dyn BlockBackend, op: &mut IoOp) -> (io::Result<()>, Vec<IoBuf<'static>>) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op.run(backend)))
        .unwrap_or_else(|_| Err(io::Error::other("the storage back end panicked")));
    (result, op.take_bufs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryDisk;

    fn buf(v: &mut [u8]) -> IoBuf<'static> {
        // SAFETY: the tests keep `v` alive and untouched until the job's
        // result is collected.
        unsafe { IoBuf::from_raw_parts(v.as_mut_ptr(), v.len()) }
    }

    #[test]
    fn runs_jobs_and_files_results() {
        let disk = Arc::new(MemoryDisk::new(1 << 16).unwrap());
        let pool = IoWorkers::new(disk.clone(), 2, "test").unwrap();
        let mut src: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i + 1; 512]).collect();
        let mut jobs: Vec<IoJob> = src
            .iter_mut()
            .enumerate()
            .map(|(i, s)| IoJob {
                token: i as u64,
                op: IoOp::Write {
                    offset: i as u64 * 512,
                    bufs: vec![buf(s)],
                    flush: i == 7,
                },
            })
            .collect();
        // SAFETY: `src` outlives the drain below.
        unsafe { pool.submit(&mut jobs) };
        pool.drain();
        assert_eq!(pool.outstanding(), 0);
        let mut done = Vec::new();
        pool.collect(&mut done);
        done.sort_by_key(|d| d.token);
        assert_eq!(done.len(), 8);
        assert!(done.iter().all(|d| d.result.is_ok() && d.bufs.is_empty()));
        for i in 0..8 {
            assert_eq!(disk.contents()[i * 512..][..512], [i as u8 + 1; 512]);
        }
        assert_eq!(disk.flush_count(), 1);

        // A read past the end fails; its result says so.
        let mut dst = vec![0u8; 512];
        let mut jobs = vec![
            IoJob {
                token: 1,
                op: IoOp::Read {
                    offset: 512,
                    bufs: vec![buf(&mut dst)],
                },
            },
            IoJob {
                token: 2,
                op: IoOp::Read {
                    offset: 1 << 16,
                    bufs: vec![buf(&mut dst)],
                },
            },
        ];
        // SAFETY: `dst` outlives the drain below.
        unsafe { pool.submit(&mut jobs) };
        pool.drain();
        let mut done = Vec::new();
        pool.collect(&mut done);
        done.sort_by_key(|d| d.token);
        assert!(done[0].result.is_ok());
        assert!(done[1].result.is_err());
        assert_eq!(dst, vec![2u8; 512]);
        assert!(IoWorkers::new(disk.clone(), 0, "x").is_err());
        drop(pool);

        // Once `drain` returned and `collect` took the results, the
        // completion fd is quiet: an event loop would otherwise spin on it.
        let pool = IoWorkers::new(disk.clone(), 2, "test").unwrap();
        let mut done = Vec::new();
        for i in 0..10_000u64 {
            let mut jobs = vec![IoJob {
                token: i,
                op: IoOp::Flush,
            }];
            // SAFETY: no buffers.
            unsafe { pool.submit(&mut jobs) };
            pool.drain();
            pool.collect(&mut done);
            assert_eq!(done.len(), 1);
            done.clear();
            let mut pfd = libc::pollfd {
                fd: pool.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one valid fd, without waiting.
            assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0, "round {i}");
        }
        assert!(IoWorkers::new(disk, MAX_IO_THREADS + 1, "x").is_err());
    }
}
