//! Compiles `cpp/chat_shim.cpp`, the C interface to llama.cpp's chat code (templates, tool-call
//! grammars, output parsing), against the llama.cpp sources that `llama-cpp-sys-2` builds and
//! links (its `common` library), so the shim and the library are always the same generation.

use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let sys = llama_cpp_sys_source(&manifest);
    let llama = sys.join("llama.cpp");
    println!("cargo:rerun-if-changed=cpp/chat_shim.cpp");
    println!("cargo:rerun-if-env-changed=LLAMA_CPP_SYS_2_SOURCE");
    cc::Build::new()
        .cpp(true)
        .file("cpp/chat_shim.cpp")
        .include(&sys)
        .include(&llama)
        .include(llama.join("common"))
        .include(llama.join("include"))
        .include(llama.join("ggml/include"))
        .include(llama.join("vendor"))
        .flag_if_supported("-std=c++17")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unused-function")
        .pic(true)
        .compile("llamapool_chat_shim");
}

/// The unpacked `llama-cpp-sys-2` crate: `LLAMA_CPP_SYS_2_SOURCE` when set, else the version
/// `Cargo.lock` names, looked up in cargo's registry sources.
fn llama_cpp_sys_source(manifest: &Path) -> PathBuf {
    if let Ok(dir) = std::env::var("LLAMA_CPP_SYS_2_SOURCE") {
        return PathBuf::from(dir);
    }
    let lock = manifest.join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(&lock).expect("the workspace's Cargo.lock");
    let version = locked_version(&text, "llama-cpp-sys-2").expect("llama-cpp-sys-2 in Cargo.lock");
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME or CARGO_HOME")).join(".cargo")
        });
    let registries = std::fs::read_dir(cargo_home.join("registry/src"))
        .expect("cargo's registry sources (CARGO_HOME/registry/src)");
    registries
        .filter_map(Result::ok)
        .map(|r| r.path().join(format!("llama-cpp-sys-2-{version}")))
        .find(|dir| dir.join("llama.cpp/common/chat.h").is_file())
        .unwrap_or_else(|| {
            panic!(
                "llama-cpp-sys-2-{version} not found under {}; set LLAMA_CPP_SYS_2_SOURCE",
                cargo_home.display()
            )
        })
}

fn locked_version(lock: &str, package: &str) -> Option<String> {
    let name_line = format!("name = \"{package}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == name_line {
            let version = lines.next()?.trim();
            return Some(
                version
                    .strip_prefix("version = \"")?
                    .trim_end_matches('"')
                    .to_string(),
            );
        }
    }
    None
}
