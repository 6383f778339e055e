//! [`Proc`]: a child process that is stopped when dropped — SIGTERM, up to 20 seconds for it to
//! exit, then SIGKILL — so a failing test or bench stage leaves no router or worker behind.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long [`Drop`] waits after SIGTERM before SIGKILL.
pub const DROP_GRACE: Duration = Duration::from_secs(20);

/// Owns a child process; see the module doc.
#[derive(Debug)]
pub struct Proc(Child);

impl Proc {
    pub fn new(child: Child) -> Self {
        Self(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// The exit status if it has exited, without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.0.try_wait()
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.0.wait()
    }

    /// SIGTERM, then waits; returns whether it exited within `timeout` (it is not killed).
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        self.signal_and_wait(Signal::SIGTERM, timeout)
    }

    /// Sends `signal` unless it has exited, then waits; returns whether it exited within
    /// `timeout` (it is not killed).
    pub fn signal_and_wait(&mut self, signal: Signal, timeout: Duration) -> bool {
        if let Ok(Some(_)) = self.0.try_wait() {
            return true;
        }
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = self.0.try_wait() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.terminate(DROP_GRACE) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn terminate_stops_a_child_that_honours_sigterm() {
        let mut p = Proc::new(Command::new("sleep").arg("60").spawn().unwrap());
        assert_eq!(p.try_wait().unwrap(), None);
        assert!(p.terminate(Duration::from_secs(10)));
        assert!(p.try_wait().unwrap().is_some());
        assert!(
            p.terminate(Duration::ZERO),
            "an exited child stays terminated"
        );
    }
}
