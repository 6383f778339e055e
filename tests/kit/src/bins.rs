//! Where the workspace's release binaries are: `llamapool-router`, `llamapool-worker` and
//! `llamapool-bench` sit in `target/release`, next to the bench binary, and one directory above
//! a test executable (`target/release/deps`).

use std::path::{Path, PathBuf};

use crate::Error;

/// The profile directory (`target/release`) of the running executable.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the current executable's path");
    profile_dir(&exe).to_path_buf()
}

/// The binary `name` in [`bin_dir`], if it has been built.
pub fn binary(name: &str) -> Result<PathBuf, Error> {
    let path = bin_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingBinary(path))
    }
}

/// `target/<profile>` for an executable in it or in its `deps/`.
fn profile_dir(exe: &Path) -> &Path {
    let dir = exe.parent().expect("an executable has a directory");
    match dir.file_name() {
        Some(name) if name == "deps" => dir.parent().expect("deps/ has a parent"),
        _ => dir,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_executables_and_binaries_share_the_profile_dir() {
        assert_eq!(
            profile_dir(Path::new("/w/target/release/deps/e2e-0123abcd")),
            Path::new("/w/target/release")
        );
        assert_eq!(
            profile_dir(Path::new("/w/target/release/llamapool-bench")),
            Path::new("/w/target/release")
        );
    }

    #[test]
    fn a_missing_binary_is_named() {
        let err = binary("llamapool-no-such-binary").unwrap_err();
        assert!(
            err.to_string().contains("llamapool-no-such-binary"),
            "{err}"
        );
    }
}
