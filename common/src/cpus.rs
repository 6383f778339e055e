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

    /// The CPUs the calling thread may run on (its affinity mask).
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

#[cfg(test)]
mod tests {
    use super::*;

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
