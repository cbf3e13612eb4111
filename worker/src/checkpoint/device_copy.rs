//! The host copy of GPU state for an asynchronous checkpoint, on its own CUDA stream.
//!
//! The training thread marks the point on the default stream after which the state may be
//! copied ([`StreamPoint::record`], right after the checkpoint step's optimizer update was
//! queued). The upload thread then copies on a non-blocking stream that waits for that point
//! only, so the copy engine moves the state while the next step's kernels run. The caller keeps
//! the parameters unchanged until the copy returns.

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

fn bind(ordinal: usize) -> Result<(), String> {
    let context = CudaContext::new(ordinal).map_err(|e| format!("CUDA context {ordinal}: {e:?}"))?;
    context.bind_to_thread().map_err(|e| format!("binding CUDA context {ordinal}: {e:?}"))
}

/// A point in the default stream's work on one device: everything queued before it was recorded.
pub struct StreamPoint {
    ordinal: usize,
    event: CUevent,
}

// SAFETY: a CUDA event handle may be used from any thread bound to its context; `StreamPoint`
// binds the device's primary context before every use.
unsafe impl Send for StreamPoint {}

impl StreamPoint {
    /// Records the point on device `ordinal`'s default stream, after the work queued so far.
    pub fn record(ordinal: usize) -> Result<Self, String> {
        bind(ordinal)?;
        let mut event: CUevent = std::ptr::null_mut();
        // SAFETY: the out-pointer is a live local; the legacy default stream is null.
        unsafe {
            check("cuEventCreate", cuEventCreate(&mut event, CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as u32))?;
            let point = Self { ordinal, event };
            check("cuEventRecord", cuEventRecord(point.event, std::ptr::null_mut()))?;
            Ok(point)
        }
    }
}

impl Drop for StreamPoint {
    fn drop(&mut self) {
        if bind(self.ordinal).is_ok() {
            // SAFETY: the event was created by `record` and is destroyed once.
            unsafe {
                let _ = cuEventDestroy_v2(self.event);
            }
        }
    }
}

/// The CUDA device of the tensors, when the first one is on a GPU.
pub fn device_of(tensors: &[(String, Tensor)]) -> Option<usize> {
    match tensors.first()?.1.device() {
        Device::Cuda(ordinal) => Some(ordinal),
        _ => None,
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
/// first waits for `after` (or, without it, for the work queued so far on the default stream);
/// returns once the copies are done.
pub fn copy_to_host(ordinal: usize, pairs: &[(&Tensor, &Tensor)], after: Option<&StreamPoint>) -> Result<(), String> {
    let recorded_here;
    let after = match after {
        Some(point) if point.ordinal == ordinal => point,
        _ => {
            recorded_here = StreamPoint::record(ordinal)?;
            &recorded_here
        }
    };
    bind(ordinal)?;
    let mut stream: CUstream = std::ptr::null_mut();
    // SAFETY: the out-pointer is a live local and the stream is destroyed here; every copy reads
    // `bytes` bytes of a live contiguous device tensor into a live pinned host tensor of the same
    // size, and the stream is synchronised before the tensors can go away.
    unsafe {
        let result = (|| {
            check("cuStreamCreate", cuStreamCreate(&mut stream, CUstream_flags_enum::CU_STREAM_NON_BLOCKING as u32))?;
            check("cuStreamWaitEvent", cuStreamWaitEvent(stream, after.event, 0))?;
            for (dst, src) in pairs {
                let bytes = src.numel() * src.kind().elt_size_in_bytes();
                check("cuMemcpyDtoHAsync", cuMemcpyDtoHAsync_v2(dst.data_ptr(), src.data_ptr() as u64, bytes, stream))?;
            }
            check("cuStreamSynchronize", cuStreamSynchronize(stream))
        })();
        if !stream.is_null() {
            let _ = cuStreamDestroy_v2(stream);
        }
        result
    }
}
