//! What the benchmark binaries share: CPU time of threads and of the
//! machine, the CPU model, a scratch directory and number formatting.
#![deny(missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

/// CPU time thread `tid` of this process has run so far.
pub fn thread_cpu(tid: i32) -> Duration {
    // The first field of schedstat is the time on CPU in nanoseconds.
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// The kernel id of the calling thread.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The CPU model from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The three load averages of /proc/loadavg, as `uptime` prints them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|| "?".into())
}

/// CPU time counters, in clock ticks, to tell how busy the rest of the
/// machine was during the run.
pub struct CpuTimes {
    /// Busy time of all CPUs (everything but idle and iowait).
    busy: u64,
    /// User plus system time of this process.
    ours: u64,
}

impl CpuTimes {
    /// Reads /proc/stat and /proc/self/stat.
    pub fn now() -> Option<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal ...
        let busy = cpu.iter().take(8).sum::<u64>() - cpu.get(3)? - cpu.get(4)?;
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the parenthesised command name; utime and stime
        // are fields 14 and 15 of the whole line.
        let rest: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
        let ours = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
        Some(CpuTimes { busy, ours })
    }

    /// CPUs' worth of time other processes used since `before`.
    pub fn others_since(&self, before: &CpuTimes, elapsed: Duration) -> f64 {
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let busy = self.busy.saturating_sub(before.busy);
        let ours = self.ours.saturating_sub(before.ours);
        busy.saturating_sub(ours) as f64 / hz / elapsed.as_secs_f64()
    }
}

/// A scratch directory or file, removed (recursively) on drop.
pub struct TempPath(pub PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Microseconds with two decimals.
pub fn us(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e6)
}

/// User and system CPU time thread `tid` of this process has run so far
/// (clock-tick resolution).
pub fn thread_user_sys(tid: i32) -> (Duration, Duration) {
    let ticks = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|s| {
            // utime and stime are fields 14 and 15 of the whole line.
            let rest: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            Some((
                rest.get(11)?.parse::<u64>().ok()?,
                rest.get(12)?.parse::<u64>().ok()?,
            ))
        });
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let d = |t: u64| Duration::from_secs_f64(t as f64 / hz);
    ticks.map_or((Duration::ZERO, Duration::ZERO), |(u, s)| (d(u), d(s)))
}

/// The kernel ids of this process's threads.
pub fn task_ids() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// [`thread_cpu`] summed over `tids`.
pub fn threads_cpu(tids: &[i32]) -> Duration {
    tids.iter().map(|&t| thread_cpu(t)).sum()
}

/// [`thread_user_sys`] summed over `tids`.
pub fn threads_user_sys(tids: &[i32]) -> (Duration, Duration) {
    tids.iter()
        .map(|&t| thread_user_sys(t))
        .fold((Duration::ZERO, Duration::ZERO), |(u, s), (tu, ts)| {
            (u + tu, s + ts)
        })
}

/// Restricts thread `tid` (0: the calling thread) to CPU `cpu`; `false`
/// if the kernel refused (no such CPU, or not allowed).
pub fn pin_to_cpu(tid: i32, cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes a bit of `set`; `cpu` is bounded by
    // CPU_SETSIZE, checked first.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        libc::CPU_SET(cpu, &mut set);
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// Number of CPUs online (whatever this thread is pinned to).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}
