// Shared by the build scripts of crates whose binaries link libtorch (worker, tests).
// `--no-as-needed -ltorch` keeps libtorch (and with it libtorch_cuda) in the binary's needed
// list, otherwise `Cuda::is_available()` is false on GPU machines; the rpath lets the binary
// find the venv's torch libraries without LD_LIBRARY_PATH.

/// Emits the link arguments and returns libtorch's root folder (holding include/ and lib/).
fn link_libtorch() -> std::path::PathBuf {
    println!("cargo:rerun-if-env-changed=BRAID_VENV_PYTHON");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let lib_dir = match std::env::var("LIBTORCH") {
        Ok(root) => std::path::PathBuf::from(root).join("lib"),
        Err(_) => {
            let python = std::env::var("BRAID_VENV_PYTHON").unwrap_or_else(|_| "python3".into());
            let out = std::process::Command::new(&python)
                .args(["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
                .output()
                .unwrap_or_else(|e| panic!("running {python} to find torch: {e}; run scripts/setup.sh first"));
            assert!(out.status.success(), "{python} cannot import torch; run scripts/setup.sh first");
            std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        }
    };
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    lib_dir.parent().expect("libtorch's lib/ has a parent").to_path_buf()
}
