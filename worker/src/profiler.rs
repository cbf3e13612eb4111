//! libtorch's profiler (Kineto) through the C++ shim (`csrc/profiler.cpp`): records operators,
//! and on a GPU the CUDA kernels and copies, into a Chrome trace that `chrome://tracing`,
//! Perfetto and `bench/trace_summary.py` read.

use std::ffi::{c_char, CString};
use std::path::Path;

use crate::multi_tensor::{check, KernelError};

extern "C" {
    fn braid_profiler_start(cuda: i32) -> *mut c_char;
    fn braid_profiler_stop(path: *const c_char) -> *mut c_char;
}

/// A running profiler; [`Profiler::finish`] writes the trace.
pub struct Profiler {
    running: bool,
}

impl Profiler {
    /// Starts recording (CUDA activity too when `cuda`). One profiler runs at a time per process.
    pub fn start(cuda: bool) -> Result<Self, KernelError> {
        // SAFETY: plain call into the shim; errors come back as a message.
        check("profiler start", unsafe { braid_profiler_start(cuda as i32) })?;
        Ok(Self { running: true })
    }

    /// Stops recording and writes the Chrome trace to `path`.
    pub fn finish(mut self, path: &Path) -> Result<(), KernelError> {
        self.running = false;
        let text = path.to_string_lossy().into_owned();
        let c_path = CString::new(text).map_err(|_| KernelError { op: "profiler stop", message: "the trace path holds a NUL byte".into() })?;
        // SAFETY: `c_path` is a NUL-terminated string alive for the call.
        check("profiler stop", unsafe { braid_profiler_stop(c_path.as_ptr()) })
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if self.running {
            let discard = std::env::temp_dir().join(format!("braid-discarded-trace-{}.json", std::process::id()));
            if let Ok(c_path) = CString::new(discard.to_string_lossy().into_owned()) {
                // SAFETY: as in `finish`; the trace of an abandoned profile is written and removed.
                let _ = check("profiler stop", unsafe { braid_profiler_stop(c_path.as_ptr()) });
                let _ = std::fs::remove_file(discard);
            }
        }
    }
}
