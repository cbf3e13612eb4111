//! CUDA graphs (`csrc/cuda_graph.cpp`): a training step's kernels recorded once and replayed
//! with one launch per step, so the host's per-kernel dispatch cost leaves the step time.
//!
//! What is captured reads and writes fixed tensors: a replay runs the same kernels on the same
//! addresses, so each step copies its batch into the captured inputs and sets the values the
//! kernels read (learning rate, step number) before replaying. Nothing inside a capture may
//! wait for the device or move data from the host.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::multi_tensor::{check, KernelError};

mod ffi {
    use super::*;

    extern "C" {
        pub fn braid_cuda_graphs_built() -> i32;
        pub fn braid_graph_capture_begin(device: i64, out: *mut *mut c_void) -> *mut c_char;
        pub fn braid_graph_capture_end(graph: *mut c_void) -> *mut c_char;
        pub fn braid_graph_replay(graph: *mut c_void) -> *mut c_char;
        pub fn braid_graph_free(graph: *mut c_void);
    }
}

/// A captured CUDA graph with its private memory pool.
#[derive(Debug)]
pub struct CudaGraph {
    raw: *mut c_void,
}

// SAFETY: the graph is only touched through `&self`/`&mut self` calls that libtorch makes safe
// from any thread; it is moved between threads, never shared.
unsafe impl Send for CudaGraph {}

/// Why a capture did not produce a graph.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError<E> {
    /// libtorch refused or broke off the capture (no CUDA graphs in this build, an operation
    /// a graph cannot hold).
    #[error(transparent)]
    Graph(#[from] KernelError),
    /// The captured work itself failed.
    #[error("{0}")]
    Body(E),
    /// The captured work panicked (tch panics on libtorch errors).
    #[error("captured work panicked: {0}")]
    Panic(String),
}

impl CudaGraph {
    /// Whether this build can capture CUDA graphs (libtorch with CUDA, found at build time).
    pub fn built() -> bool {
        // SAFETY: a pure query.
        unsafe { ffi::braid_cuda_graphs_built() == 1 }
    }

    /// Records what `body` enqueues on CUDA device `device` (run on a side stream after the
    /// device finished earlier work), without running it. Returns the graph and what `body`
    /// returned: tensors it allocated live in the graph's pool and are what replays write.
    pub fn capture<T, E>(device: usize, body: impl FnOnce() -> Result<T, E>) -> Result<(CudaGraph, T), CaptureError<E>> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` receives a graph the shim allocated, or stays null on error.
        check("CUDA graph capture", unsafe { ffi::braid_graph_capture_begin(device as i64, &mut raw) })?;
        let graph = CudaGraph { raw };
        let outcome = catch_unwind(AssertUnwindSafe(body));
        // SAFETY: the capture begun above; ending it restores the previous stream either way.
        let ended = check("CUDA graph capture", unsafe { ffi::braid_graph_capture_end(graph.raw) });
        match outcome {
            Ok(Ok(value)) => {
                ended?;
                Ok((graph, value))
            }
            Ok(Err(e)) => Err(CaptureError::Body(e)),
            Err(panic) => Err(CaptureError::Panic(panic_message(panic.as_ref()))),
        }
    }

    /// Runs the captured work on the current stream.
    pub fn replay(&self) -> Result<(), KernelError> {
        // SAFETY: `raw` is a graph whose capture ended successfully (only `capture` builds one).
        check("CUDA graph replay", unsafe { ffi::braid_graph_replay(self.raw) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim and is freed once.
        unsafe { ffi::braid_graph_free(self.raw) };
    }
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU a capture fails with libtorch's or the build's reason, without running
    /// the body's effects and without leaving the process unable to compute.
    #[test]
    fn capture_without_a_gpu_fails_cleanly() {
        if tch::Cuda::is_available() {
            return;
        }
        let result = CudaGraph::capture(0, || Ok::<_, String>(()));
        let err = result.expect_err("no GPU, no graph");
        assert!(matches!(err, CaptureError::Graph(_)), "{err}");
        let t = tch::Tensor::from_slice(&[1.0f32, 2.0]);
        assert_eq!(f64::try_from((&t * 2.0).sum(tch::Kind::Float)).unwrap(), 6.0);
    }
}
