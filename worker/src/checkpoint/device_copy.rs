//! The host copy of GPU state for an asynchronous checkpoint, on its own CUDA stream.
//!
//! The copy is ordered after everything already queued on the default stream (the checkpoint
//! step's optimizer update) through an event, and runs on a non-blocking stream, so the copy
//! engine moves the state while the next step's kernels run. The caller keeps the parameters
//! unchanged until this returns.

use cudarc::driver::sys::{
    cuEventCreate, cuEventDestroy_v2, cuEventRecord, cuMemcpyDtoHAsync_v2, cuStreamCreate, cuStreamDestroy_v2,
    cuStreamSynchronize, cuStreamWaitEvent, CUevent, CUevent_flags_enum, CUresult, CUstream, CUstream_flags_enum,
};
use cudarc::driver::CudaContext;
use tch::{Device, Tensor};

fn check(what: &str, result: CUresult) -> Result<(), String> {
    match result {
        CUresult::CUDA_SUCCESS => Ok(()),
        other => Err(format!("{what}: {other:?}")),
    }
}

/// Whether `copy_to_host` can take these pairs: CUDA sources on one device, contiguous, with
/// pinned host destinations of the same size and kind.
pub fn applies(pairs: &[(&Tensor, &Tensor)]) -> Option<usize> {
    let (_, first) = pairs.first()?;
    let Device::Cuda(ordinal) = first.device() else { return None };
    pairs
        .iter()
        .all(|(dst, src)| {
            src.device() == Device::Cuda(ordinal)
                && src.is_contiguous()
                && dst.device() == Device::Cpu
                && dst.is_contiguous()
                && dst.is_pinned(Device::Cuda(ordinal))
                && dst.size() == src.size()
                && dst.kind() == src.kind()
        })
        .then_some(ordinal)
}

/// Copies every `(dst, src)` pair (pinned host <- CUDA device `ordinal`) on a side stream that
/// first waits for the work queued so far on the default stream; returns once the copies are done.
pub fn copy_to_host(ordinal: usize, pairs: &[(&Tensor, &Tensor)]) -> Result<(), String> {
    let context = CudaContext::new(ordinal).map_err(|e| format!("CUDA context {ordinal}: {e:?}"))?;
    context.bind_to_thread().map_err(|e| format!("binding CUDA context {ordinal}: {e:?}"))?;
    let mut event: CUevent = std::ptr::null_mut();
    let mut stream: CUstream = std::ptr::null_mut();
    // SAFETY: out-pointers to handles created and destroyed here; the legacy stream is null;
    // every copy reads `bytes` bytes of a live contiguous device tensor into a live pinned host
    // tensor of the same size, and the stream is synchronised before the tensors can go away.
    unsafe {
        check("cuEventCreate", cuEventCreate(&mut event, CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as u32))?;
        let result = (|| {
            check("cuEventRecord", cuEventRecord(event, std::ptr::null_mut()))?;
            check("cuStreamCreate", cuStreamCreate(&mut stream, CUstream_flags_enum::CU_STREAM_NON_BLOCKING as u32))?;
            check("cuStreamWaitEvent", cuStreamWaitEvent(stream, event, 0))?;
            for (dst, src) in pairs {
                let bytes = src.numel() * src.kind().elt_size_in_bytes();
                check("cuMemcpyDtoHAsync", cuMemcpyDtoHAsync_v2(dst.data_ptr(), src.data_ptr() as u64, bytes, stream))?;
            }
            check("cuStreamSynchronize", cuStreamSynchronize(stream))
        })();
        if !stream.is_null() {
            let _ = cuStreamDestroy_v2(stream);
        }
        let _ = cuEventDestroy_v2(event);
        result
    }
}
