//! What the proxies cost, read from `/proc`: CPU time (`/proc/<pid>/stat`, user + system) and
//! resident memory (`VmRSS` in `/proc/<pid>/status`) of the mesh-node processes, and the whole
//! machine's busy CPU time (`/proc/stat`), which also holds what the kernel does for the mesh
//! outside the proxies' own time (softirqs, kernel workers).

use std::time::Duration;

use anyhow::Context as _;

/// One reading of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// User + system CPU time so far, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident memory in KiB.
    pub rss_kib: u64,
}

/// Returns utime + stime (clock ticks) from the text of `/proc/<pid>/stat`. The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Returns `VmRSS` in KiB from the text of `/proc/<pid>/status`.
pub fn parse_rss_kib(status: &str) -> Option<u64> {
    parse_status_kib(status, "VmRSS")
}

/// Returns a field given in kB (`VmRSS`, `VmHWM`, …) from the text of `/proc/<pid>/status`.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let mut parts = line[field.len() + 1..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => Some(value),
        _ => None,
    }
}

/// Reads a process's CPU time and memory.
pub fn sample(pid: u32) -> anyhow::Result<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(Sample {
        cpu_ticks: parse_cpu_ticks(&stat).with_context(|| format!("no CPU times in /proc/{pid}/stat"))?,
        rss_kib: parse_rss_kib(&status).with_context(|| format!("no VmRSS in /proc/{pid}/status"))?,
    })
}

/// Returns the kernel's clock ticks per second (the unit of `/proc/<pid>/stat` times).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Returns the machine's busy time so far (all CPUs: user, nice, system, irq, softirq, steal;
/// not idle or iowait), in clock ticks, from the text of `/proc/stat`.
pub fn parse_machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq, steal, ..] = fields[..] else { return None };
    Some(user + nice + system + irq + softirq + steal)
}

/// Reads [`parse_machine_busy_ticks`] now.
pub fn machine_busy_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_machine_busy_ticks(&stat).context("no cpu line in /proc/stat")
}

/// Returns the CPU time spent between two readings of the same processes.
pub fn cpu_between(before: &[Sample], after: &[Sample], ticks_per_second: u64) -> Duration {
    let ticks: u64 = before.iter().zip(after).map(|(b, a)| a.cpu_ticks.saturating_sub(b.cpu_ticks)).sum();
    Duration::from_secs_f64(ticks as f64 / ticks_per_second.max(1) as f64)
}

/// Returns the soft and hard open-files limits of this process.
pub fn fd_limits() -> (u64, u64) {
    // SAFETY: getrlimit with a valid struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            (limit.rlim_cur, limit.rlim_max)
        } else {
            (0, 0)
        }
    }
}

/// Raises this process's open-files limit (soft and hard) to `wanted`, bounded by the kernel's
/// `fs.nr_open`, so the processes it starts (proxies, apps) can hold 10,000 connections: each
/// proxied connection takes two sockets in each proxy. Returns the limit now in force.
pub fn raise_fd_limit(wanted: u64) -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(wanted);
    let target = wanted.min(nr_open);
    let (soft, hard) = fd_limits();
    if soft >= target && hard >= target {
        return soft;
    }
    let limit = libc::rlimit { rlim_cur: target.max(soft), rlim_max: target.max(hard) };
    // SAFETY: setrlimit with a valid struct. Raising the hard limit needs CAP_SYS_RESOURCE,
    // which a container may lack even as root; then the old limit simply stays.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    fd_limits().0
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Sample, cpu_between, parse_cpu_ticks, parse_rss_kib, parse_status_kib};

    #[test]
    fn cpu_times_are_read_after_the_command_name() {
        let stat = "4242 (mesh-node) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 100 \
                    123456789 2048 18446744073709551615 1 1 0 0 0 0 0 4096 17664 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        // A name with spaces and parentheses does not shift the fields.
        let odd = "7 (a) b (c)) R 1 7 7 0 -1 0 0 0 0 0 11 22 0 0 20 0 1 0 5 1 1";
        assert_eq!(parse_cpu_ticks(odd), Some(33));
        assert_eq!(parse_cpu_ticks("7 (short) R 1"), None);
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn resident_memory_is_read_in_kib() {
        let status = "Name:\tmesh-node\nVmPeak:\t  99999 kB\nVmRSS:\t    7340 kB\nRssAnon:\t 3000 kB\n";
        assert_eq!(parse_rss_kib(status), Some(7340));
        assert_eq!(parse_rss_kib("Name:\tkthreadd\n"), None, "kernel threads have no VmRSS");
        assert_eq!(parse_rss_kib("VmRSS:\t12 MB\n"), None, "an unknown unit is not guessed");
        assert_eq!(parse_status_kib(status, "VmPeak"), Some(99_999));
        assert_eq!(parse_status_kib("VmHWMx:\t1 kB\nVmHWM:\t2 kB\n", "VmHWM"), Some(2), "the exact field");
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 2 30 9000 50 4 6 8 0 0\ncpu0 50 1 15 4500 25 2 3 4 0 0\n";
        assert_eq!(super::parse_machine_busy_ticks(stat), Some(100 + 2 + 30 + 4 + 6 + 8));
        assert_eq!(super::parse_machine_busy_ticks("cpu  1 2 3\n"), None, "too few fields");
        assert_eq!(super::parse_machine_busy_ticks("intr 5\n"), None);
    }

    #[test]
    fn cpu_is_summed_over_the_processes() {
        let before = [Sample { cpu_ticks: 100, rss_kib: 0 }, Sample { cpu_ticks: 50, rss_kib: 0 }];
        let after = [Sample { cpu_ticks: 130, rss_kib: 0 }, Sample { cpu_ticks: 70, rss_kib: 0 }];
        assert_eq!(cpu_between(&before, &after, 100), Duration::from_millis(500));
    }
}
