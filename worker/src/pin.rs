//! CPU pinning of the worker process. Called first thing in `main`, before any thread exists,
//! so that llama.cpp's (OpenMP) threads inherit the mask.

use llamapool_common::cpus::CpuList;
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// Pins the calling thread (and so every thread it later starts) to `cpus`.
pub fn pin_to(cpus: &CpuList) -> nix::Result<()> {
    let mut set = CpuSet::new();
    for &cpu in cpus.cpus() {
        set.set(cpu)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)
}
