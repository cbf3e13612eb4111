//! Links libtorch so that binaries find it without LD_LIBRARY_PATH and CUDA is visible.
include!("../scripts/torch_link.rs");
