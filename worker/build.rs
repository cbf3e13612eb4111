//! Links libtorch so that binaries find it without LD_LIBRARY_PATH and CUDA is visible, and
//! compiles the small C++ shim over libtorch's multi-tensor optimizer kernels, its profiler, its
//! CUDA graphs and its CUDA memory statistics (the last two only where libtorch has CUDA and the
//! CUDA runtime headers are found).
include!("../scripts/torch_link.rs");

fn main() {
    let root = link_libtorch();
    println!("cargo:rerun-if-changed=csrc/multi_tensor.cpp");
    println!("cargo:rerun-if-changed=csrc/profiler.cpp");
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    println!("cargo:rerun-if-changed=csrc/cuda_memory.cpp");
    println!("cargo:rerun-if-changed=csrc/error_message.h");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/multi_tensor.cpp")
        .file("csrc/profiler.cpp")
        .file("csrc/cuda_graph.cpp")
        .file("csrc/cuda_memory.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag("-w")
        .opt_level(2);
    let cuda_include = cuda_runtime_include(&root);
    let graphs = root.join("include/ATen/cuda/CUDAGraph.h").exists() && root.join("lib/libtorch_cuda.so").exists();
    if let (true, Some(include)) = (graphs, &cuda_include) {
        build.include(include).define("BRAID_CUDA", None);
    } else {
        println!("cargo:warning=building without CUDA graphs and memory statistics: libtorch has no CUDA headers or the CUDA runtime headers were not found");
    }
    build.compile("braid_multi_tensor");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if graphs && cuda_include.is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}

/// The folder holding `cuda_runtime_api.h` and its `crt/` headers: from the NVIDIA wheels beside torch's (`nvidia/*/include`,
/// as pip installs CUDA builds of torch), then `$CUDA_HOME/include`, then `/usr/local/cuda/include`.
fn cuda_runtime_include(torch_root: &std::path::Path) -> Option<std::path::PathBuf> {
    let mut candidates = Vec::new();
    let torch_root = torch_root.canonicalize().unwrap_or_else(|_| torch_root.to_path_buf());
    if let Some(site) = torch_root.parent() {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut wheels: Vec<_> = entries.flatten().map(|e| e.path().join("include")).collect();
            wheels.sort();
            candidates.extend(wheels);
        }
    }
    if let Ok(home) = std::env::var("CUDA_HOME") {
        candidates.push(std::path::PathBuf::from(home).join("include"));
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates.into_iter().find(|dir| dir.join("cuda_runtime_api.h").exists() && dir.join("crt/host_config.h").exists())
}
