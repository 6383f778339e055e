//! The deployment files against this build: `scripts/check-deploy` renders the Kubernetes
//! kustomizations (`deploy/kubernetes/`), checks that their probes, ports, flags and drain
//! timing name what the router has (the probes asked of a real router started from the
//! manifest's own TOML), and that the image recipe's runtime stage (`deploy/container/`)
//! installs every library the binaries link. A broken copy must fail it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use llamapool_tests::*;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

fn check_deploy(deploy_dir: &Path) -> Output {
    Command::new("python3")
        .arg(repo_root().join("scripts/check-deploy"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--deploy-dir")
        .arg(deploy_dir)
        .env(
            "LLAMAPOOL_TEST_MODEL",
            models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        )
        .output()
        .expect("python3 runs scripts/check-deploy")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_manifests_and_the_image_recipe_match_this_build() {
    let out = check_deploy(&repo_root().join("deploy"));
    let report = text(&out);
    assert!(out.status.success(), "check-deploy failed:\n{report}");
    assert!(report.contains("all checks passed"), "{report}");
    for seen in [
        "SIGTERM: /health -> 503",
        "preStop starts the drain",
        "libgomp.so.1 <- libgomp1",
    ] {
        assert!(report.contains(seen), "{seen} not checked:\n{report}");
    }
}

#[test]
fn a_probe_on_a_path_the_router_does_not_serve_fails_the_check() {
    let dir = scratch_dir("deploy-copy").expect("a scratch directory");
    let copy = dir.path().join("deploy");
    let status = Command::new("cp")
        .arg("-r")
        .arg(repo_root().join("deploy"))
        .arg(&copy)
        .status()
        .expect("cp runs");
    assert!(status.success());
    let manifest = copy.join("kubernetes/base/deployment.yaml");
    let yaml = std::fs::read_to_string(&manifest).unwrap();
    assert!(yaml.contains("path: /health"));
    std::fs::write(&manifest, yaml.replace("path: /health", "path: /healthz")).unwrap();
    let out = check_deploy(&copy);
    let report = text(&out);
    assert!(!out.status.success(), "a broken probe passed:\n{report}");
    assert!(report.contains("/healthz"), "{report}");
}
