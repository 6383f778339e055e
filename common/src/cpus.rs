//! CPU lists as Linux writes them (`"0-3,8"`): parsing, printing, and what this process may use.

use std::fmt;

/// A sorted set of CPU indices without duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CpuList(Vec<usize>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CPU list {input:?}: {reason}")]
pub struct CpuListError {
    pub input: String,
    pub reason: String,
}

impl CpuList {
    /// Parses `"0-3,8"`-style lists. Empty entries, reversed ranges and non-numbers are errors.
    pub fn parse(input: &str) -> Result<Self, CpuListError> {
        let err = |reason: String| CpuListError {
            input: input.to_string(),
            reason,
        };
        let mut cpus = Vec::new();
        for part in input.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(err("empty entry".into()));
            }
            let number = |s: &str| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| err(format!("{s:?} is not a CPU number")))
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (number(a)?, number(b)?);
                    if a > b {
                        return Err(err(format!("range {a}-{b} is reversed")));
                    }
                    if b - a > 4096 {
                        return Err(err(format!("range {a}-{b} is too large")));
                    }
                    cpus.extend(a..=b);
                }
                None => cpus.push(number(part)?),
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(Self(cpus))
    }

    /// The CPUs the calling thread may run on (its affinity mask: under the kubelet's static
    /// CPU manager, the container's exclusive cpuset). A CPU quota is not a CPU set: see
    /// [`cgroup_cpu_quota`].
    pub fn allowed() -> Self {
        use nix::sched::{sched_getaffinity, CpuSet};
        let Ok(set) = sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
            return Self::default();
        };
        Self::from_cpus(
            (0..CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect(),
        )
    }

    pub fn from_cpus(mut cpus: Vec<usize>) -> Self {
        cpus.sort_unstable();
        cpus.dedup();
        Self(cpus)
    }

    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn overlaps(&self, other: &Self) -> Vec<usize> {
        self.0
            .iter()
            .copied()
            .filter(|c| other.0.contains(c))
            .collect()
    }

    /// The CPUs not in `allowed`.
    pub fn outside(&self, allowed: &Self) -> Vec<usize> {
        self.0
            .iter()
            .copied()
            .filter(|c| !allowed.0.contains(c))
            .collect()
    }
}

impl fmt::Display for CpuList {
    /// Prints ranges compactly, as `/proc/PID/status` does (`0-3,8`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

/// Whole CPUs of this process's cgroup CPU quota, rounded down (at least 1), if it has one:
/// cgroup v2's `cpu.max` (`"400000 100000"`: 4; `"max 100000"`: none), else cgroup v1's
/// `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none). Read in this process's own cgroup
/// (`/proc/self/cgroup`), or at the hierarchy's root where that path is not mounted (a
/// container sees its own cgroup as the root).
pub fn cgroup_cpu_quota() -> Option<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let own = read("/proc/self/cgroup").unwrap_or_default();
    let (v2_path, v1_path) = own_cgroup_paths(&own);
    let in_own_or_root = |root: &str, path: Option<&str>, file: &str| {
        path.map(|p| format!("{root}{}/{file}", p.trim_end_matches('/')))
            .and_then(|f| read(&f))
            .or_else(|| read(&format!("{root}/{file}")))
    };
    if let Some(max) = in_own_or_root("/sys/fs/cgroup", v2_path, "cpu.max") {
        return quota_of_cpu_max(&max);
    }
    quota_of_cfs(
        &in_own_or_root("/sys/fs/cgroup/cpu", v1_path, "cpu.cfs_quota_us")?,
        &in_own_or_root("/sys/fs/cgroup/cpu", v1_path, "cpu.cfs_period_us")?,
    )
}

/// The cgroup v2 path (`0::PATH`) and the v1 `cpu` controller's path (`N:cpu,cpuacct:PATH`)
/// of `/proc/self/cgroup`'s text.
fn own_cgroup_paths(text: &str) -> (Option<&str>, Option<&str>) {
    let mut v2 = None;
    let mut v1 = None;
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path);
        } else if controllers.split(',').any(|c| c == "cpu") {
            v1 = Some(path);
        }
    }
    (v2, v1)
}

/// cgroup v2's `cpu.max`: `"QUOTA PERIOD"` or `"max PERIOD"`.
fn quota_of_cpu_max(text: &str) -> Option<usize> {
    let mut parts = text.split_whitespace();
    let (quota, period) = (parts.next()?, parts.next()?);
    quota_of_cfs(quota, period)
}

/// Quota over period in whole CPUs (at least 1); none for `max`, a negative quota or junk.
fn quota_of_cfs(quota: &str, period: &str) -> Option<usize> {
    let quota: u64 = quota.trim().parse().ok()?;
    let period: u64 = period.trim().parse().ok().filter(|&p| p > 0)?;
    Some(usize::try_from(quota / period).unwrap_or(usize::MAX).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_cpu_quota_is_read_in_whole_cpus() {
        assert_eq!(quota_of_cpu_max("400000 100000\n"), Some(4));
        assert_eq!(quota_of_cpu_max("150000 100000"), Some(1));
        assert_eq!(quota_of_cpu_max("50000 100000"), Some(1), "at least one");
        assert_eq!(quota_of_cpu_max("max 100000"), None);
        assert_eq!(quota_of_cpu_max(""), None);
        assert_eq!(quota_of_cfs("-1", "100000"), None);
        assert_eq!(quota_of_cfs("200000\n", "100000\n"), Some(2));
        assert_eq!(quota_of_cfs("100", "0"), None);
        let v1 = "4:memory:/x\n2:cpu,cpuacct:/pods/a\n0::/\n";
        assert_eq!(own_cgroup_paths(v1), (Some("/"), Some("/pods/a")));
        assert_eq!(
            own_cgroup_paths("0::/kubepods/pod1/c1\n"),
            (Some("/kubepods/pod1/c1"), None)
        );
    }

    #[test]
    fn parses_ranges_and_singles() {
        assert_eq!(CpuList::parse("0-3,8").unwrap().cpus(), &[0, 1, 2, 3, 8]);
        assert_eq!(CpuList::parse(" 5 , 1-2,2").unwrap().cpus(), &[1, 2, 5]);
        assert_eq!(CpuList::parse("0-3,8").unwrap().to_string(), "0-3,8");
        assert_eq!(CpuList::parse("1,3,4,5").unwrap().to_string(), "1,3-5");
    }

    #[test]
    fn rejects_bad_lists() {
        for bad in ["", "a", "3-1", "1,,2", "1-", "-1"] {
            assert!(CpuList::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn overlap_and_outside() {
        let a = CpuList::parse("0-2").unwrap();
        let b = CpuList::parse("2-4").unwrap();
        assert_eq!(a.overlaps(&b), vec![2]);
        assert_eq!(b.outside(&a), vec![3, 4]);
    }
}
