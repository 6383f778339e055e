//! Test support shared by the end-to-end tests (`tests/`) and `llamapool-bench`: finding the
//! release binaries ([`bins`]), stopping child processes ([`proc`]), launching the router and
//! waiting for its workers ([`router`]), scratch directories ([`scratch_dir`]), and the blocking
//! HTTP/1.1 + SSE client ([`http`]). Nothing here needs the model; the callers bring it.

pub mod bins;
pub mod http;
pub mod proc;
pub mod router;

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub use bins::{bin_dir, binary};
pub use http::{HttpResponse, SseReader};
pub use proc::Proc;
pub use router::Router;
pub use tempfile::TempDir;

/// Why a process could not be started or did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is missing: run `cargo build --release --workspace` first")]
    MissingBinary(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the router printed {0:?} instead of `llamapool listening on http://ADDR (...)`")]
    NoAddress(String),
    #[error("{what} exited during start-up: {status}")]
    Exited {
        what: &'static str,
        status: ExitStatus,
    },
    #[error("the router's workers were not all ready within {timeout:?}; last /workers: {last}")]
    NotReady { timeout: Duration, last: String },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { what, source }
    }
}

/// A fresh private directory `$TMPDIR/llamapool-<tag>-XXXXXX`, removed with everything in it
/// when the returned guard is dropped.
pub fn scratch_dir(tag: &str) -> std::io::Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("llamapool-{tag}-"))
        .tempdir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_dirs_are_distinct_and_removed_on_drop() {
        let a = scratch_dir("kit").unwrap();
        let b = scratch_dir("kit").unwrap();
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("llamapool-kit-"), "{name}");
        std::fs::write(a.path().join("f"), "x").unwrap();
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists());
    }
}
