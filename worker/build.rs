//! Links libtorch so that binaries find it without LD_LIBRARY_PATH and CUDA is visible, and
//! compiles the small C++ shim over libtorch's multi-tensor optimizer kernels and its profiler.
include!("../scripts/torch_link.rs");

fn main() {
    let root = link_libtorch();
    println!("cargo:rerun-if-changed=csrc/multi_tensor.cpp");
    println!("cargo:rerun-if-changed=csrc/profiler.cpp");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("csrc/multi_tensor.cpp")
        .file("csrc/profiler.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag("-w")
        .opt_level(2)
        .compile("braid_multi_tensor");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
