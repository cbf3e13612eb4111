//! The NCCL engine: collectives on CUDA tensors through their device pointers.
//!
//! NCCL is loaded at run time ([`library`] says from where). The types and constants are
//! cudarc's (`cudarc::nccl::sys`); the CUDA driver comes through cudarc too (context binding,
//! stream queries).
//!
//! Operations are enqueued on the legacy default stream (the null stream), which is libtorch's
//! current stream unless a caller switches streams, so they are ordered after the kernels that
//! produced the tensor and before those that read the result, and a host read of the result
//! (`double_value`, a copy to the CPU) waits for them through libtorch's own synchronisation.
//! A call returns once its operation is enqueued: it records a CUDA event after the operation
//! and hands it to the engine's watchdog thread, which polls the oldest event in flight and
//! NCCL's asynchronous error every few milliseconds ([`PendingOps::poll`], deciding with the
//! pure [`watchdog::watchdog_verdict`]). On a timeout or an error the watchdog records the failure and
//! aborts the communicator, which ends any kernel still waiting on peers and so releases a
//! host thread blocked on the stream; the next call (or [`Collective::check`]) returns the
//! failure, naming the collective, and every call after that fails with `Broken`.
//!
//! Buffers may be dropped as soon as a call returns: libtorch's caching allocator hands their
//! memory only to later work on the same stream, which runs after the collective.
//!
//! Every use of the communicator (launch, asynchronous error query, abort) holds one mutex, so
//! an abort never races a launch and the handle is aborted exactly once. The one case this
//! cannot cover: a launch that blocks inside CUDA because the stream's launch queue is full
//! behind a hung collective holds the mutex, and the watchdog then cannot abort.

mod library;
mod watchdog;

use std::ffi::{c_char, c_int};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::sys::{
    cuEventCreate, cuEventDestroy_v2, cuEventQuery, cuEventRecord, CUevent, CUevent_flags_enum,
    CUresult,
};
use cudarc::driver::CudaContext;
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId};
use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError};

pub use library::{nccl_available, nccl_library, NcclLibraryInfo, NCCL_LIBRARY_ENV};
pub use watchdog::{Cause, EventState, Failure, PendingOps};

use library::{library, NcclLibrary};

/// NCCL's element type for a tensor dtype, where NCCL has one.
pub fn nccl_data_type(kind: Kind) -> Option<ncclDataType_t> {
    Some(match kind {
        Kind::Uint8 | Kind::Bool => ncclDataType_t::ncclUint8,
        Kind::Int8 => ncclDataType_t::ncclInt8,
        Kind::Int => ncclDataType_t::ncclInt32,
        Kind::Int64 => ncclDataType_t::ncclInt64,
        Kind::Half => ncclDataType_t::ncclFloat16,
        Kind::Float => ncclDataType_t::ncclFloat32,
        Kind::Double => ncclDataType_t::ncclFloat64,
        Kind::BFloat16 => ncclDataType_t::ncclBfloat16,
        Kind::Float8e4m3fn => ncclDataType_t::ncclFloat8e4m3,
        Kind::Float8e5m2 => ncclDataType_t::ncclFloat8e5m2,
        _ => return None,
    })
}

/// The id that ties the ranks of one NCCL communicator together. Rank 0 creates it, publishes
/// its bytes through the coordinator, and every rank connects with it; each generation gets a
/// fresh one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclUniqueId([u8; NcclUniqueId::LEN]);

impl NcclUniqueId {
    /// Length of the id in bytes.
    pub const LEN: usize = 128;

    /// A fresh id (calls `ncclGetUniqueId`, which needs the library; on rank 0 only).
    pub fn new() -> Result<NcclUniqueId, CollectiveError> {
        let lib = library()?;
        let mut id = ncclUniqueId {
            internal: [0; NcclUniqueId::LEN],
        };
        // SAFETY: `id` is a valid ncclUniqueId for NCCL to fill.
        lib.check(unsafe { (lib.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
        Ok(NcclUniqueId(id.internal.map(|c| c as u8)))
    }

    /// The id's bytes, to publish.
    pub fn as_bytes(&self) -> &[u8; NcclUniqueId::LEN] {
        &self.0
    }

    /// The id from published bytes; fails unless there are exactly [`NcclUniqueId::LEN`].
    pub fn from_bytes(bytes: &[u8]) -> Result<NcclUniqueId, CollectiveError> {
        let bytes: [u8; NcclUniqueId::LEN] =
            bytes
                .try_into()
                .map_err(|_| CollectiveError::InvalidArgument {
                    op: "nccl id",
                    detail: format!(
                        "an NCCL id has {} bytes, got {}",
                        NcclUniqueId::LEN,
                        bytes.len()
                    ),
                })?;
        Ok(NcclUniqueId(bytes))
    }

    fn to_sys(self) -> ncclUniqueId {
        ncclUniqueId {
            internal: self.0.map(|b| b as c_char),
        }
    }
}

impl std::fmt::Debug for NcclUniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclUniqueId({}…)", hex::encode(&self.0[..8]))
    }
}

/// A communicator handle that may move between threads; null once aborted.
struct CommHandle(ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; every use goes
// through the engine's state mutex (see [`WatchState`]).
unsafe impl Send for CommHandle {}

/// A CUDA event recorded on the stream right after one collective.
struct Event(CUevent);

// SAFETY: a CUDA event may be recorded, queried and destroyed from any thread bound to its
// context; every thread that touches one binds the communicator's context first, and the state
// mutex serializes them.
unsafe impl Send for Event {}

/// How often the watchdog polls while collectives are in flight.
const POLL_IN_FLIGHT: Duration = Duration::from_millis(2);
/// How often the watchdog checks an idle communicator for an asynchronous error.
const POLL_IDLE: Duration = Duration::from_millis(100);

/// What the engine and its watchdog share. Every use of the communicator (launch, error query,
/// abort) happens under this one mutex, so an abort never races a launch, the handle is aborted
/// exactly once and never used afterwards.
struct WatchState {
    comm: CommHandle,
    pending: PendingOps<Event>,
    /// Events of retired collectives, recorded again by later ones.
    spare_events: Vec<Event>,
    /// The first failure; the communicator is aborted once it is set.
    failure: Option<Failure>,
    /// Whether a call already returned `failure` as its own error (later calls say `Broken`).
    failure_reported: bool,
    stop: bool,
}

struct Shared {
    lib: &'static NcclLibrary,
    context: Arc<CudaContext>,
    rank: usize,
    state: Mutex<WatchState>,
    /// Wakes the watchdog: a collective was enqueued, or it should stop.
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bind(&self) -> Result<(), String> {
        self.context
            .bind_to_thread()
            .map_err(|e| format!("binding the CUDA context: {e}"))
    }

    /// Records `failure` (unless an earlier one is recorded) and aborts the communicator.
    fn fail(&self, state: &mut WatchState, failure: Failure) {
        if state.failure.is_none() {
            tracing::error!(rank = self.rank, "{failure}; aborting the NCCL communicator");
            state.failure = Some(failure);
        }
        self.abort(state);
    }

    /// Aborts the communicator (ending any kernel still waiting on peers), once.
    fn abort(&self, state: &mut WatchState) {
        if !state.comm.0.is_null() {
            // SAFETY: the communicator is live; it is nulled here, under the mutex, so nothing
            // uses or aborts it again.
            unsafe { (self.lib.comm_abort)(state.comm.0) };
            state.comm.0 = std::ptr::null_mut();
        }
    }

    /// The communicator's asynchronous error, if it has one.
    fn async_error(&self, state: &WatchState) -> Option<String> {
        if state.comm.0.is_null() {
            return None;
        }
        let mut code = ncclResult_t::ncclSuccess as c_int;
        // SAFETY: a live communicator (the mutex is held) and an out-pointer.
        let result = unsafe { (self.lib.comm_get_async_error)(state.comm.0, &mut code) };
        if result != ncclResult_t::ncclSuccess as c_int {
            return Some(format!(
                "ncclCommGetAsyncError failed: {}",
                self.lib.error_text(result)
            ));
        }
        if code == ncclResult_t::ncclSuccess as c_int || code == ncclResult_t::ncclInProgress as c_int
        {
            return None;
        }
        Some(self.lib.error_text(code))
    }
}

/// The watchdog thread: polls the oldest collective in flight and the communicator's
/// asynchronous error every [`POLL_IN_FLIGHT`]; on a timeout or an error it records the failure
/// and aborts the communicator, so a host thread blocked on the stream is released and the next
/// call reports the failure.
fn watchdog(shared: Arc<Shared>) {
    let bound = shared.bind();
    let mut retired = Vec::new();
    let mut state = shared.lock();
    while !state.stop {
        if state.failure.is_none() {
            let failure = match &bound {
                Err(e) => Some(Failure {
                    op: "watchdog",
                    cause: Cause::Error(e.clone()),
                }),
                Ok(()) => {
                    let async_error = shared.async_error(&state);
                    state
                        .pending
                        .poll(Instant::now(), query_event, async_error, &mut retired)
                }
            };
            state.spare_events.append(&mut retired);
            if let Some(failure) = failure {
                shared.fail(&mut state, failure);
            }
        }
        let wait = if state.failure.is_none() && !state.pending.is_empty() {
            POLL_IN_FLIGHT
        } else {
            POLL_IDLE
        };
        state = shared
            .wake
            .wait_timeout(state, wait)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

/// Whether the work before `event` on its stream finished (the caller bound its context).
fn query_event(event: &Event) -> EventState {
    // SAFETY: a live event of the context bound to this thread.
    match unsafe { cuEventQuery(event.0) } {
        CUresult::CUDA_SUCCESS => EventState::Complete,
        CUresult::CUDA_ERROR_NOT_READY => EventState::Pending,
        other => EventState::Failed(format!("{other:?}")),
    }
}

/// A new event (the caller bound its context).
fn create_event() -> Result<Event, String> {
    let mut event: CUevent = std::ptr::null_mut();
    // SAFETY: an out-pointer to a live local.
    match unsafe {
        cuEventCreate(
            &mut event,
            CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as u32,
        )
    } {
        CUresult::CUDA_SUCCESS => Ok(Event(event)),
        other => Err(format!("cuEventCreate failed: {other:?}")),
    }
}

/// An NCCL communicator for one rank on one CUDA device, with its watchdog thread (see the
/// module documentation).
pub struct NcclCollective {
    shared: Arc<Shared>,
    watchdog: Option<JoinHandle<()>>,
    device: Device,
    rank: usize,
    world_size: usize,
    timeout: Duration,
}

impl NcclCollective {
    /// Joins the communicator identified by `id` as `rank` of `world_size` on `device` (a CUDA
    /// device) and starts its watchdog. Fails with a timeout when the other ranks do not all
    /// join within `timeout`; the blocked initialization then stays on a background thread,
    /// since NCCL cannot cancel it. `timeout` also bounds every later collective, from the
    /// moment it reaches the head of the stream's queue of collectives.
    pub fn connect(
        device: Device,
        rank: usize,
        world_size: usize,
        id: &NcclUniqueId,
        timeout: Duration,
    ) -> Result<NcclCollective, CollectiveError> {
        let op = "nccl connect";
        let Device::Cuda(ordinal) = device else {
            return Err(CollectiveError::InvalidArgument {
                op,
                detail: format!("NCCL needs a CUDA device, got {device:?}"),
            });
        };
        if world_size == 0 || rank >= world_size {
            return Err(CollectiveError::InvalidArgument {
                op,
                detail: format!("rank {rank} is not in a world of size {world_size}"),
            });
        }
        let lib = library()?;
        // SAFETY: probing loads the driver library and releases it; no symbol is called.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CollectiveError::Nccl(
                "the CUDA driver library (libcuda.so) cannot be loaded".to_string(),
            ));
        }
        let context = CudaContext::new(ordinal)
            .map_err(|e| CollectiveError::Nccl(format!("CUDA device {ordinal}: {e}")))?;
        let (done, finished) = mpsc::channel();
        let init_context = context.clone();
        let id = id.to_sys();
        std::thread::Builder::new()
            .name(format!("nccl-init-rank-{rank}"))
            .spawn(move || {
                let result = init_context
                    .bind_to_thread()
                    .map_err(|e| CollectiveError::Nccl(format!("CUDA device {ordinal}: {e}")))
                    .and_then(|()| {
                        let mut comm: ncclComm_t = std::ptr::null_mut();
                        // SAFETY: `comm` is an out-pointer; the id is passed by value.
                        let code = unsafe {
                            (lib.comm_init_rank)(&mut comm, world_size as c_int, id, rank as c_int)
                        };
                        lib.check(code, "ncclCommInitRank")
                            .map(|()| CommHandle(comm))
                    });
                if let Err(mpsc::SendError(Ok(late))) = done.send(result) {
                    // The caller gave up waiting; release what arrived too late.
                    // SAFETY: `late` is a communicator nobody else holds.
                    unsafe { (lib.comm_abort)(late.0) };
                }
            })
            .map_err(|e| CollectiveError::Nccl(format!("starting the init thread: {e}")))?;
        let comm = match finished.recv_timeout(timeout) {
            Ok(result) => result?,
            Err(_) => {
                return Err(CollectiveError::Timeout {
                    op,
                    peer: None,
                    after: timeout,
                })
            }
        };
        let shared = Arc::new(Shared {
            lib,
            context,
            rank,
            state: Mutex::new(WatchState {
                comm,
                pending: PendingOps::new(timeout),
                spare_events: Vec::new(),
                failure: None,
                failure_reported: false,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let watched = shared.clone();
        let watchdog = std::thread::Builder::new()
            .name(format!("nccl-watchdog-rank-{rank}"))
            .spawn(move || watchdog(watched));
        let watchdog = match watchdog {
            Ok(handle) => handle,
            Err(e) => {
                shared.abort(&mut shared.lock());
                return Err(CollectiveError::Nccl(format!(
                    "starting the watchdog thread: {e}"
                )));
            }
        };
        Ok(NcclCollective {
            shared,
            watchdog: Some(watchdog),
            device,
            rank,
            world_size,
            timeout,
        })
    }

    /// Collectives enqueued on the stream that the watchdog has not yet seen complete.
    pub fn pending_ops(&self) -> usize {
        self.shared.lock().pending.len()
    }

    fn check_tensor(&self, op: &'static str, tensor: &Tensor) -> Result<(), CollectiveError> {
        take_failure(&mut self.shared.lock(), op)?;
        if tensor.device() != self.device {
            return Err(CollectiveError::InvalidArgument {
                op,
                detail: format!(
                    "tensor is on {:?}, this communicator on {:?}",
                    tensor.device(),
                    self.device
                ),
            });
        }
        Ok(())
    }

    /// Runs `launch` (which enqueues one NCCL operation on the null stream), records an event
    /// after it and hands the event to the watchdog; returns without waiting. A launch that
    /// fails breaks the communicator at once.
    fn enqueue(
        &mut self,
        op: &'static str,
        launch: impl FnOnce(&NcclLibrary, ncclComm_t) -> c_int,
    ) -> Result<(), CollectiveError> {
        let shared = &*self.shared;
        let mut state = shared.lock();
        take_failure(&mut state, op)?;
        let launched = shared.bind().and_then(|()| {
            let event = match state.spare_events.pop() {
                Some(event) => event,
                None => create_event()?,
            };
            let code = launch(shared.lib, state.comm.0);
            let recorded = if code != ncclResult_t::ncclSuccess as c_int {
                Err(format!("launch failed: {}", shared.lib.error_text(code)))
            } else {
                // SAFETY: a live event of the bound context; the null handle is the legacy
                // default stream the operation was enqueued on.
                match unsafe { cuEventRecord(event.0, std::ptr::null_mut()) } {
                    CUresult::CUDA_SUCCESS => Ok(()),
                    other => Err(format!("recording the completion event: {other:?}")),
                }
            };
            match recorded {
                Ok(()) => Ok(event),
                Err(e) => {
                    state.spare_events.push(event);
                    Err(e)
                }
            }
        });
        match launched {
            Ok(event) => {
                state.pending.push(event, op, Instant::now());
                drop(state);
                shared.wake.notify_one();
                Ok(())
            }
            Err(reason) => {
                let failure = Failure {
                    op,
                    cause: Cause::Error(reason),
                };
                let error = failure.to_error();
                shared.fail(&mut state, failure);
                state.failure_reported = true;
                Err(error)
            }
        }
    }

    /// Sums `tensor` across ranks; `widen` reduces bf16 and f16 in f32 (rounded once), otherwise
    /// they are reduced in their own dtype.
    fn reduce(
        &mut self,
        op: &'static str,
        tensor: &mut Tensor,
        widen: bool,
    ) -> Result<(), CollectiveError> {
        self.check_tensor(op, tensor)?;
        let kind = tensor.f_kind()?;
        let (reduce_kind, data_type) = match (kind, widen) {
            (Kind::Float, _) | (Kind::BFloat16 | Kind::Half, true) => {
                (Kind::Float, ncclDataType_t::ncclFloat32)
            }
            (Kind::BFloat16, false) => (Kind::BFloat16, ncclDataType_t::ncclBfloat16),
            (Kind::Half, false) => (Kind::Half, ncclDataType_t::ncclFloat16),
            (Kind::Double, _) => (Kind::Double, ncclDataType_t::ncclFloat64),
            _ => {
                return Err(CollectiveError::UnsupportedDtype {
                    op,
                    kind,
                    expected: "f32, f64, bf16, f16",
                })
            }
        };
        let count = tensor.numel();
        if count == 0 {
            return Ok(());
        }
        // Widened and strided tensors go through a copy. Dropping it once the copy back is
        // enqueued is safe: the caching allocator hands its memory only to later work on the
        // same stream.
        let staged = if kind == reduce_kind && tensor.is_contiguous() {
            None
        } else {
            Some(tensor.f_to_kind(reduce_kind)?.f_contiguous()?)
        };
        let buffer = staged.as_ref().unwrap_or(tensor).data_ptr();
        self.enqueue(op, |lib, comm| unsafe {
            // SAFETY: `buffer` holds `count` contiguous elements of `data_type` on this device.
            (lib.all_reduce)(
                buffer,
                buffer,
                count,
                data_type as c_int,
                ncclRedOp_t::ncclSum as c_int,
                comm,
                std::ptr::null_mut(),
            )
        })?;
        if let Some(staged) = staged {
            tch::no_grad(|| tensor.f_copy_(&staged))?;
        }
        Ok(())
    }
}

/// The recorded failure as this call's error: the first report names the collective that
/// failed and why; later calls say the communicator is broken.
fn take_failure(state: &mut WatchState, op: &'static str) -> Result<(), CollectiveError> {
    match &state.failure {
        None if state.comm.0.is_null() => Err(CollectiveError::Broken {
            op,
            reason: "the communicator was aborted".to_string(),
        }),
        None => Ok(()),
        Some(failure) if !state.failure_reported => {
            state.failure_reported = true;
            Err(failure.to_error())
        }
        Some(failure) => Err(CollectiveError::Broken {
            op,
            reason: failure.to_string(),
        }),
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        self.reduce("all_reduce_sum", tensor, true)
    }

    fn all_reduce_sum_in_dtype(&mut self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        self.reduce("all_reduce_sum_in_dtype", tensor, false)
    }

    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor, CollectiveError> {
        let op = "all_gather";
        self.check_tensor(op, tensor)?;
        let kind = tensor.f_kind()?;
        let mut shape = tensor.size();
        if shape.is_empty() {
            shape.push(1);
        }
        let input = tensor.f_contiguous()?;
        shape[0] *= self.world_size as i64;
        let gathered = Tensor::f_empty(&shape, (kind, self.device))?;
        let bytes = tensor.numel() * kind.elt_size_in_bytes();
        if bytes == 0 {
            return Ok(gathered);
        }
        let (send, recv) = (input.data_ptr(), gathered.data_ptr());
        self.enqueue(op, |lib, comm| unsafe {
            // SAFETY: `send` holds `bytes` bytes and `recv` world_size times as many.
            (lib.all_gather)(
                send,
                recv,
                bytes,
                ncclDataType_t::ncclUint8 as c_int,
                comm,
                std::ptr::null_mut(),
            )
        })?;
        Ok(gathered)
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        let op = "broadcast";
        self.check_tensor(op, tensor)?;
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument {
                op,
                detail: format!(
                    "root {root} is not a rank of a world of size {}",
                    self.world_size
                ),
            });
        }
        let bytes = tensor.numel() * tensor.f_kind()?.elt_size_in_bytes();
        if bytes == 0 {
            return Ok(());
        }
        let staged = if tensor.is_contiguous() {
            None
        } else {
            Some(tensor.f_contiguous()?)
        };
        let buffer = staged.as_ref().unwrap_or(tensor).data_ptr();
        self.enqueue(op, |lib, comm| unsafe {
            // SAFETY: `buffer` holds `bytes` contiguous bytes on this device.
            (lib.broadcast)(
                buffer,
                buffer,
                bytes,
                ncclDataType_t::ncclUint8 as c_int,
                root as c_int,
                comm,
                std::ptr::null_mut(),
            )
        })?;
        if let Some(staged) = staged {
            tch::no_grad(|| tensor.f_copy_(&staged))?;
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), CollectiveError> {
        take_failure(&mut self.shared.lock(), "check")
    }

    fn engine(&self) -> &'static str {
        "nccl"
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // Let collectives in flight finish first (the watchdog ends a hung one within the
        // timeout): aborting would cut them off under the peers.
        let deadline = Instant::now() + self.timeout + Duration::from_secs(1);
        loop {
            let state = self.shared.lock();
            if state.pending.is_empty() || state.failure.is_some() || Instant::now() >= deadline {
                break;
            }
            drop(state);
            std::thread::sleep(POLL_IN_FLIGHT);
        }
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.join();
        }
        let mut state = self.shared.lock();
        if self.shared.bind().is_ok() {
            let WatchState {
                pending,
                spare_events,
                ..
            } = &mut *state;
            for event in pending.drain().chain(spare_events.drain(..)) {
                // SAFETY: each event was created by this engine and is destroyed once; one
                // still queued on the stream is released when it completes.
                unsafe {
                    let _ = cuEventDestroy_v2(event.0);
                }
            }
        }
        // Abort rather than destroy: destroying may wait on peers that are gone.
        self.shared.abort(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_map_to_nccl_types() {
        assert_eq!(
            nccl_data_type(Kind::Float),
            Some(ncclDataType_t::ncclFloat32)
        );
        assert_eq!(
            nccl_data_type(Kind::Double),
            Some(ncclDataType_t::ncclFloat64)
        );
        assert_eq!(
            nccl_data_type(Kind::BFloat16),
            Some(ncclDataType_t::ncclBfloat16)
        );
        assert_eq!(
            nccl_data_type(Kind::Half),
            Some(ncclDataType_t::ncclFloat16)
        );
        assert_eq!(nccl_data_type(Kind::Int64), Some(ncclDataType_t::ncclInt64));
        assert_eq!(nccl_data_type(Kind::ComplexFloat), None);
        // The numeric values are NCCL's ABI.
        assert_eq!(ncclDataType_t::ncclFloat32 as c_int, 7);
        assert_eq!(ncclDataType_t::ncclBfloat16 as c_int, 9);
        assert_eq!(ncclRedOp_t::ncclSum as c_int, 0);
    }

    #[test]
    fn unique_id_round_trips_through_bytes() {
        let bytes: Vec<u8> = (0..NcclUniqueId::LEN)
            .map(|i| (i * 7 % 256) as u8)
            .collect();
        let id = NcclUniqueId::from_bytes(&bytes).unwrap();
        assert_eq!(id.as_bytes().as_slice(), bytes.as_slice());
        let sys = id.to_sys();
        assert_eq!(sys.internal.map(|c| c as u8).as_slice(), bytes.as_slice());
        let err = NcclUniqueId::from_bytes(&bytes[..100]).unwrap_err();
        assert!(err.to_string().contains("got 100"), "{err}");
    }

    #[test]
    fn connect_refuses_a_cpu_device() {
        let id = NcclUniqueId::from_bytes(&[0; NcclUniqueId::LEN]).unwrap();
        let err = NcclCollective::connect(Device::Cpu, 0, 1, &id, Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(err.to_string().contains("needs a CUDA device"), "{err}");
    }

    /// One rank on the first GPU; skipped where there is none or NCCL does not load.
    #[test]
    fn single_rank_operations_on_gpu() {
        if !tch::Cuda::is_available() || !nccl_available() {
            eprintln!("skipped: no CUDA device or no NCCL library");
            return;
        }
        let info = nccl_library().unwrap();
        eprintln!("NCCL {:?} from {}", info.version, info.path);
        let device = Device::Cuda(0);
        let id = NcclUniqueId::new().unwrap();
        let mut nccl = NcclCollective::connect(device, 0, 1, &id, Duration::from_secs(30)).unwrap();
        assert_eq!(nccl.engine(), "nccl");

        for kind in [Kind::Float, Kind::Double, Kind::BFloat16] {
            let values = Tensor::arange(1000, (Kind::Float, Device::Cpu)) * 0.5;
            let expected = values.to_kind(kind);
            let mut t = expected.to_device(device);
            nccl.all_reduce_sum(&mut t).unwrap();
            assert!(
                t.to_device(Device::Cpu).equal(&expected),
                "all_reduce {kind:?}"
            );
            let strided = Tensor::arange(12, (kind, device)).view([3, 4]);
            let mut strided_t = strided.transpose(0, 1);
            nccl.all_reduce_sum(&mut strided_t).unwrap();
            assert!(strided_t.equal(&strided.transpose(0, 1)));
        }

        let t = Tensor::arange(6, (Kind::Int64, device)).view([2, 3]);
        let gathered = nccl.all_gather(&t).unwrap();
        assert_eq!(gathered.size(), vec![2, 3]);
        assert!(gathered.equal(&t));

        let mut b = Tensor::ones([5], (Kind::BFloat16, device));
        nccl.broadcast(&mut b, 0).unwrap();
        assert!(b.equal(&Tensor::ones([5], (Kind::BFloat16, device))));
        assert!(nccl.broadcast(&mut b, 1).is_err());

        let cpu = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let err = nccl.all_gather(&cpu).unwrap_err();
        assert!(err.to_string().contains("this communicator"), "{err}");

        // bf16 reduced in bf16 on the wire.
        let values = (Tensor::arange(1000, (Kind::Float, Device::Cpu)) * 0.37).to_kind(Kind::BFloat16);
        let mut t = values.to_device(device);
        nccl.all_reduce_sum_in_dtype(&mut t).unwrap();
        assert!(t.to_device(Device::Cpu).equal(&values));

        // A large reduction returns before it completes; reading the result waits for it, and
        // the watchdog then retires it.
        let mut big = Tensor::ones([1 << 24], (Kind::Float, device));
        nccl.all_reduce_sum(&mut big).unwrap();
        assert_eq!(big.sum(Kind::Double).double_value(&[]), (1u64 << 24) as f64);
        let deadline = Instant::now() + Duration::from_secs(1);
        while nccl.pending_ops() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(nccl.pending_ops(), 0);
        nccl.check().unwrap();
    }
}
