//! What this machine offers a session: memory available now (to refuse a
//! context whose KV cache could not fit) and how many threads to use: the CPUs it may run on
//! (affinity and cgroup limits, as `available_parallelism` reports them)
//! and, among those, the physical cores. Two hardware threads of one core
//! share its execution units, and the per-token products are bound by
//! memory bandwidth and integer throughput, so a second thread per core
//! adds contention rather than speed; the default is one thread per core.

use std::collections::BTreeSet;

/// Logical CPUs this process may use.
pub fn logical_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Physical cores among the CPUs this process may use (Linux: distinct
/// (package, core) pairs of the online CPUs in `/sys`, capped at
/// [`logical_cpus`]); elsewhere, or when `/sys` says nothing, the logical
/// CPUs.
pub fn physical_cores() -> usize {
    let logical = logical_cpus();
    match sys_physical_cores() {
        Some(n) if n > 0 => n.min(logical),
        _ => logical,
    }
}

/// Memory available to new allocations without swapping, in bytes
/// (Linux: `MemAvailable` of `/proc/meminfo`); `None` where unknown.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

fn sys_physical_cores() -> Option<usize> {
    let root = std::path::Path::new("/sys/devices/system/cpu");
    let online = std::fs::read_to_string(root.join("online")).ok()?;
    let mut cores = BTreeSet::new();
    for cpu in parse_cpu_list(online.trim())? {
        let topo = root.join(format!("cpu{cpu}/topology"));
        let read = |f: &str| std::fs::read_to_string(topo.join(f)).ok();
        let (Some(pkg), Some(core)) = (read("physical_package_id"), read("core_id")) else {
            continue;
        };
        cores.insert((pkg.trim().to_string(), core.trim().to_string()));
    }
    Some(cores.len())
}

/// `0-3,6,8-9` → the listed CPU numbers (`None` if malformed or huge).
fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (a, b): (usize, usize) = match part.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let a = part.parse().ok()?;
                (a, a)
            }
        };
        if b < a || b - a > 1 << 16 {
            return None;
        }
        out.extend(a..=b);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,6,8-9"), Some(vec![0, 1, 2, 3, 6, 8, 9]));
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn available_memory_is_plausible_where_known() {
        if let Some(m) = available_memory() {
            assert!(m > 1 << 20, "{m} bytes");
        }
    }

    #[test]
    fn physical_cores_are_at_least_one_and_at_most_the_logical_cpus() {
        let (p, l) = (physical_cores(), logical_cpus());
        assert!(p >= 1 && p <= l, "{p} physical, {l} logical");
    }
}
