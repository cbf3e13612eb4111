//! Helpers shared by the end-to-end tests: the workspace root, the venv's Python, the built
//! `braid` binary.

use std::path::PathBuf;
use std::process::Command;

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

/// The project venv's Python (installed by `scripts/setup.sh --test`).
pub fn venv_python() -> PathBuf {
    workspace_root().join(".venv/bin/python")
}

/// Runs the venv's Python with `args`; panics with its stderr when it fails.
pub fn python(args: &[&str]) -> String {
    let out = Command::new(venv_python()).args(args).output().expect("run the venv's python");
    assert!(out.status.success(), "python {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The `braid` binary of this build (target/<profile>/braid).
pub fn braid_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("braid");
    assert!(bin.exists(), "{} is missing: build it with `cargo build --release --bins` first", bin.display());
    bin
}
