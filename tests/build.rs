//! Links libtorch like the worker so test binaries run without LD_LIBRARY_PATH.
include!("../scripts/torch_link.rs");

fn main() {
    link_libtorch();
}
