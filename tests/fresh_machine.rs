//! A new user's first command on a machine with nothing but the Rust toolchain: a clean copy
//! of the tree (what git tracks, plus new files it does not ignore: no `target/`) is built in a
//! target directory of its own with `protoc` hidden (the `protoc` first on `PATH`, and the one
//! `PROTOC` names, fails loudly), and `scripts/demo --check` runs the example mesh to its end.
//! The default build has no etcd store, and says so, with how to get one, when asked for it.
//!
//! It makes a full debug build of the `sidewall` binary (about two minutes on two cores).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test: panics report failures; blocking waits are fine

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use support::repo_root;

/// Copies what `git` would put in a clean clone of the working tree into `to`.
fn clean_copy(to: &Path) {
    let root = repo_root();
    let listed = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(&root)
        .output()
        .expect("run git ls-files");
    assert!(listed.status.success(), "git ls-files failed: {listed:?}");
    for name in listed.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(name).unwrap();
        let from = root.join(name);
        // A tracked file deleted in the working tree is not in a clone of it either.
        if !from.is_file() {
            continue;
        }
        let target = to.join(name);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        // `copy` keeps the mode, so the scripts stay executable.
        std::fs::copy(&from, &target).unwrap();
    }
}

/// A `protoc` that fails, first on `PATH`: any build step that needs protoc fails with it.
fn hidden_protoc(bin: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(bin).unwrap();
    let protoc = bin.join("protoc");
    std::fs::write(
        &protoc,
        "#!/bin/sh\necho 'protoc is hidden by tests/fresh_machine.rs: the default build must not need it' >&2\nexit 127\n",
    )
    .unwrap();
    std::fs::set_permissions(&protoc, std::fs::Permissions::from_mode(0o755)).unwrap();
    protoc
}

/// Runs `program` in `dir` with cargo's per-test variables removed (a user's shell has none),
/// protoc hidden and the target directory `target`.
fn run_as_new_user(program: &Path, args: &[&str], dir: &Path, bin: &Path, target: &Path) -> Output {
    let protoc = hidden_protoc(bin);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = Command::new(program);
    command.args(args).current_dir(dir);
    for (name, _) in std::env::vars() {
        let kept = [
            "CARGO_HOME",
            "CARGO_NET_",
            "CARGO_HTTP_",
            "CARGO_REGISTRIES_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix));
        if name.starts_with("CARGO_") && !kept {
            command.env_remove(&name);
        }
    }
    command
        .env("PATH", path)
        .env("PROTOC", &protoc)
        .env("CARGO_TARGET_DIR", target)
        .output()
        .expect("run the command")
}

#[test]
fn scripts_demo_check_works_from_a_clean_copy_without_protoc() {
    let temp = tempfile::tempdir().unwrap();
    let tree = temp.path().join("sidewall");
    let bin = temp.path().join("bin");
    let target = temp.path().join("target");
    clean_copy(&tree);
    assert!(
        !tree.join("target").exists(),
        "the copy must not carry a build"
    );

    let demo = run_as_new_user(
        &tree.join("scripts/demo"),
        &["--check", "--timeout-seconds", "180"],
        &tree,
        &bin,
        &target,
    );
    let stdout = String::from_utf8_lossy(&demo.stdout);
    let stderr = String::from_utf8_lossy(&demo.stderr);
    assert!(
        demo.status.success(),
        "scripts/demo --check failed ({}):\n{stdout}\n{stderr}",
        demo.status
    );
    assert!(
        stdout.contains("all 5 expectations observed"),
        "{stdout}\n{stderr}"
    );
    assert!(!stderr.contains("protoc is hidden"), "{stderr}");

    // The default build answers an etcd store with one line saying how to get one, exit 2,
    // before it writes anything.
    let data = temp.path().join("data");
    let refused = run_as_new_user(
        &target.join("debug/sidewall"),
        &[
            "control-plane",
            "--store",
            "etcd://127.0.0.1:2379",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        temp.path(),
        &bin,
        &target,
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("built without the etcd store")
            && stderr.contains("cargo install --path . --features etcd"),
        "{stderr}"
    );
    assert!(!data.exists(), "nothing may be written: {}", data.display());
}
