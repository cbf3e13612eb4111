//! GPU memory of this process as libtorch's CUDA caching allocator counts it
//! (`csrc/cuda_memory.cpp`): for `braid bench`, step reports and metrics.

use std::ffi::c_char;

use tch::Device;

use crate::multi_tensor::{check, KernelError};

mod ffi {
    use super::*;

    extern "C" {
        pub fn braid_cuda_memory(device: i64, stats: *mut i64) -> *mut c_char;
        pub fn braid_cuda_reset_peak_memory(device: i64) -> *mut c_char;
    }
}

/// Bytes held by the caching allocator on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Held by tensors now.
    pub allocated: u64,
    /// Held by tensors at most since the process started or the last [`reset_peak`].
    pub peak_allocated: u64,
    /// Reserved from the device now (tensors plus the allocator's cache): what the process
    /// holds beside the CUDA context.
    pub reserved: u64,
    /// Reserved at most over the same span.
    pub peak_reserved: u64,
}

/// The allocator's figures for `device`; none for a CPU device.
pub fn memory_stats(device: Device) -> Result<Option<MemoryStats>, KernelError> {
    let Device::Cuda(index) = device else {
        return Ok(None);
    };
    let mut s = [0i64; 4];
    // SAFETY: `s` has the four slots the shim fills.
    check("CUDA memory statistics", unsafe { ffi::braid_cuda_memory(index as i64, s.as_mut_ptr()) })?;
    let [allocated, peak_allocated, reserved, peak_reserved] = s.map(|v| v.max(0) as u64);
    Ok(Some(MemoryStats { allocated, peak_allocated, reserved, peak_reserved }))
}

/// Starts the peaks of `device` again from what is held now (nothing for a CPU device).
pub fn reset_peak(device: Device) -> Result<(), KernelError> {
    let Device::Cuda(index) = device else {
        return Ok(());
    };
    // SAFETY: a plain call on a device index.
    check("CUDA memory statistics", unsafe { ffi::braid_cuda_reset_peak_memory(index as i64) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_device_has_no_gpu_memory() {
        assert_eq!(memory_stats(Device::Cpu).unwrap(), None);
        reset_peak(Device::Cpu).unwrap();
    }

    /// Without a GPU the CUDA call fails with a message instead of crashing.
    #[test]
    fn a_missing_gpu_is_an_error() {
        if tch::Cuda::is_available() {
            return;
        }
        assert!(memory_stats(Device::Cuda(0)).is_err());
    }
}
