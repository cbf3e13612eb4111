//! The NCCL engine: collectives on CUDA tensors through their device pointers.
//!
//! NCCL is loaded at run time. cudarc's own loader looks for `libnccl.so` and versioned names
//! that NCCL does not install (its soname is `libnccl.so.2`, the only name the pip wheels that
//! libtorch uses ship), so this module resolves the library itself, in this order:
//! `BRAID_NCCL_LIBRARY` (a path) when set; the `libnccl.so.2` already loaded in the process
//! (libtorch_cuda links it, so collectives use the same NCCL as libtorch); cudarc's names; and
//! `libnccl.so.2` on the library path. The types and constants are cudarc's (`cudarc::nccl::sys`);
//! the CUDA driver comes through cudarc too (context binding, stream queries).
//!
//! Operations are enqueued on the legacy default stream (the null stream), which is libtorch's
//! current stream unless a caller switches streams, so they are ordered after the kernels that
//! produced the tensor and before those that read the result, and a host read of the result
//! (`double_value`, a copy to the CPU) waits for them through libtorch's own synchronisation.
//! A call returns once its operation is enqueued: it records a CUDA event after the operation
//! and hands it to the engine's watchdog thread, which polls the oldest event in flight and
//! NCCL's asynchronous error every few milliseconds ([`PendingOps::poll`], deciding with the
//! pure [`watchdog_verdict`]). On a timeout or an error the watchdog records the failure and
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

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
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

/// Environment variable naming the NCCL library file to load instead of searching.
pub const NCCL_LIBRARY_ENV: &str = "BRAID_NCCL_LIBRARY";

/// Whether collectives on CUDA tensors can use NCCL here: the NCCL library and the CUDA driver
/// library both load. Says nothing about GPUs being present.
pub fn nccl_available() -> bool {
    // SAFETY: probing loads the driver library and releases it; no symbol is called.
    library().is_ok() && unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The NCCL library this process uses, as loaded: its file and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclLibraryInfo {
    /// The file the library was loaded from.
    pub path: String,
    /// (major, minor, patch).
    pub version: (u32, u32, u32),
}

/// Loads NCCL (once) and reports which library and version it is.
pub fn nccl_library() -> Result<NcclLibraryInfo, CollectiveError> {
    let lib = library()?;
    let code = lib.version.max(0) as u32;
    Ok(NcclLibraryInfo {
        path: lib.path.clone(),
        version: (code / 10000, code / 100 % 100, code % 100),
    })
}

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

/// State of the stream up to a collective's completion event, at one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventState {
    /// The collective and everything before it on the stream finished.
    Complete,
    /// Still running (or queued behind earlier work).
    Pending,
    /// The stream reported an error.
    Failed(String),
}

/// What the watchdog decides at one poll of a collective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The collective completed.
    Done,
    /// Still running, within the deadline.
    KeepWaiting,
    /// The stream or the communicator failed: abort.
    Failed(String),
    /// Past the deadline: abort.
    TimedOut,
}

/// The watchdog's decision from one poll, with the time passed in: completion wins, then an
/// error of the stream or the communicator, then the deadline.
pub fn watchdog_verdict(
    now: Instant,
    deadline: Instant,
    event: EventState,
    async_error: Option<String>,
) -> Verdict {
    match event {
        EventState::Complete => Verdict::Done,
        EventState::Failed(e) => Verdict::Failed(format!("the CUDA stream failed: {e}")),
        EventState::Pending => match async_error {
            Some(e) => Verdict::Failed(format!("asynchronous NCCL error: {e}")),
            None if now >= deadline => Verdict::TimedOut,
            None => Verdict::KeepWaiting,
        },
    }
}

/// Why the watchdog (or a failed launch) broke a communicator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The collective that failed ("communicator" for an error with none in flight).
    pub op: &'static str,
    /// What happened to it.
    pub cause: Cause,
}

/// What happened to a failed collective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// It did not complete within the timeout.
    TimedOut(Duration),
    /// NCCL or the stream reported an error.
    Error(String),
}

impl Failure {
    /// The error a call reports for this failure.
    pub fn to_error(&self) -> CollectiveError {
        match &self.cause {
            Cause::TimedOut(after) => CollectiveError::Timeout {
                op: self.op,
                peer: None,
                after: *after,
            },
            Cause::Error(reason) => CollectiveError::Nccl(format!("{}: {reason}", self.op)),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.cause {
            Cause::TimedOut(after) => write!(f, "{} timed out after {after:?}", self.op),
            Cause::Error(reason) => write!(f, "{}: {reason}", self.op),
        }
    }
}

/// Collectives enqueued on one stream and not yet seen complete, oldest first, each with its
/// completion event `E`. Work on one stream completes in order, so the watchdog judges the
/// oldest: its clock starts when it was enqueued or when its predecessor was seen complete,
/// whichever is later, so a collective queued behind a slow one is not charged for the wait.
pub struct PendingOps<E> {
    timeout: Duration,
    ops: VecDeque<PendingOp<E>>,
}

struct PendingOp<E> {
    event: E,
    op: &'static str,
    since: Instant,
}

impl<E> PendingOps<E> {
    /// An empty queue whose collectives each get `timeout`.
    pub fn new(timeout: Duration) -> PendingOps<E> {
        PendingOps {
            timeout,
            ops: VecDeque::new(),
        }
    }

    /// Adds collective `op`, enqueued at `now`, whose completion `event` marks.
    pub fn push(&mut self, event: E, op: &'static str, now: Instant) {
        self.ops.push_back(PendingOp {
            event,
            op,
            since: now,
        });
    }

    /// Number of collectives not yet seen complete.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether every collective was seen complete.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// One watchdog poll at `now`: retires the completed collectives at the front (their
    /// events go to `retired`), then judges the oldest one still running with
    /// [`watchdog_verdict`]; `query` tells an event's state. An asynchronous error with nothing
    /// in flight is a failure too. `None` while everything is healthy.
    pub fn poll(
        &mut self,
        now: Instant,
        mut query: impl FnMut(&E) -> EventState,
        async_error: Option<String>,
        retired: &mut Vec<E>,
    ) -> Option<Failure> {
        while let Some(oldest) = self.ops.front() {
            let (op, deadline) = (oldest.op, oldest.since + self.timeout);
            let cause = match watchdog_verdict(now, deadline, query(&oldest.event), async_error.clone()) {
                Verdict::Done => {
                    let done = self.ops.pop_front().expect("the oldest collective exists");
                    retired.push(done.event);
                    if let Some(next) = self.ops.front_mut() {
                        next.since = next.since.max(now);
                    }
                    continue;
                }
                Verdict::KeepWaiting => return None,
                Verdict::Failed(reason) => Cause::Error(reason),
                Verdict::TimedOut => Cause::TimedOut(self.timeout),
            };
            return Some(Failure { op, cause });
        }
        async_error.map(|e| Failure {
            op: "communicator",
            cause: Cause::Error(format!("asynchronous NCCL error: {e}")),
        })
    }

    /// Removes every collective, handing back the events.
    pub fn drain(&mut self) -> impl Iterator<Item = E> + '_ {
        self.ops.drain(..).map(|pending| pending.event)
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

type GetUniqueIdFn = unsafe extern "C" fn(*mut ncclUniqueId) -> c_int;
type CommInitRankFn = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    ncclComm_t,
    *mut c_void,
) -> c_int;
type AllGatherFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    ncclComm_t,
    *mut c_void,
) -> c_int;
type BroadcastFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    ncclComm_t,
    *mut c_void,
) -> c_int;
type CommAbortFn = unsafe extern "C" fn(ncclComm_t) -> c_int;
type CommGetAsyncErrorFn = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;
type GetErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;

/// The NCCL entry points braid calls, resolved from one loaded library.
struct NcclLibrary {
    path: String,
    version: c_int,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    all_reduce: AllReduceFn,
    all_gather: AllGatherFn,
    broadcast: BroadcastFn,
    comm_abort: CommAbortFn,
    comm_get_async_error: CommGetAsyncErrorFn,
    get_error_string: GetErrorStringFn,
}

impl NcclLibrary {
    /// Turns an NCCL result code into an error naming the call.
    fn check(&self, code: c_int, call: &str) -> Result<(), CollectiveError> {
        if code == ncclResult_t::ncclSuccess as c_int {
            return Ok(());
        }
        Err(CollectiveError::Nccl(format!(
            "{call} failed: {}",
            self.error_text(code)
        )))
    }

    /// NCCL's description of a result code, with the code.
    fn error_text(&self, code: c_int) -> String {
        // SAFETY: ncclGetErrorString returns a static C string for any code.
        let text = unsafe {
            let s = (self.get_error_string)(code);
            if s.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(s).to_string_lossy().into_owned()
            }
        };
        format!("{text} (code {code})")
    }
}

fn library() -> Result<&'static NcclLibrary, CollectiveError> {
    static LIBRARY: OnceLock<Result<NcclLibrary, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(load_library)
        .as_ref()
        .map_err(|e| CollectiveError::Nccl(e.clone()))
}

/// Library names to try, in order, with whether to accept only an already-loaded copy.
fn library_candidates() -> Vec<(String, bool)> {
    if let Ok(path) = std::env::var(NCCL_LIBRARY_ENV) {
        return vec![(path, false)];
    }
    let mut candidates = vec![("libnccl.so.2".to_string(), true)];
    candidates.extend(
        cudarc::get_lib_name_candidates("nccl")
            .into_iter()
            .map(|n| (n, false)),
    );
    candidates.push(("libnccl.so.2".to_string(), false));
    candidates
}

#[cfg(target_os = "linux")]
fn load_library() -> Result<NcclLibrary, String> {
    let candidates = library_candidates();
    let mut tried = Vec::new();
    for (name, loaded_only) in &candidates {
        let Ok(c_name) = CString::new(name.as_str()) else {
            continue;
        };
        let flags = dl::RTLD_NOW | if *loaded_only { dl::RTLD_NOLOAD } else { 0 };
        // SAFETY: dlopen with a valid C string; the handle is kept for the process lifetime.
        let handle = unsafe { dl::dlopen(c_name.as_ptr(), flags) };
        if handle.is_null() {
            tried.push(name.as_str());
            continue;
        }
        // SAFETY: a live handle from dlopen, and each name maps to its NCCL signature.
        return unsafe { resolve(handle, name) };
    }
    Err(format!(
        "cannot load the NCCL library (tried {}; set {NCCL_LIBRARY_ENV} to its path)",
        tried.join(", ")
    ))
}

#[cfg(not(target_os = "linux"))]
fn load_library() -> Result<NcclLibrary, String> {
    Err("NCCL is only loaded on Linux".to_string())
}

/// Resolves every entry point from `handle`.
///
/// # Safety
/// `handle` must come from `dlopen` of an NCCL library and stay open.
#[cfg(target_os = "linux")]
unsafe fn resolve(handle: *mut c_void, name: &str) -> Result<NcclLibrary, String> {
    unsafe fn symbol<F: Copy>(
        handle: *mut c_void,
        library: &str,
        symbol: &str,
    ) -> Result<F, String> {
        assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
        let c_symbol = CString::new(symbol).expect("symbol names have no NUL");
        let address = dl::dlsym(handle, c_symbol.as_ptr());
        if address.is_null() {
            return Err(format!("{library} has no symbol {symbol}"));
        }
        Ok(std::mem::transmute_copy::<*mut c_void, F>(&address))
    }
    let get_unique_id: GetUniqueIdFn = symbol(handle, name, "ncclGetUniqueId")?;
    let get_version: GetVersionFn = symbol(handle, name, "ncclGetVersion")?;
    let mut version: c_int = 0;
    get_version(&mut version);
    let mut info = dl::DlInfo::default();
    let path = if dl::dladdr(get_unique_id as *const c_void, &mut info) != 0
        && !info.dli_fname.is_null()
    {
        CStr::from_ptr(info.dli_fname)
            .to_string_lossy()
            .into_owned()
    } else {
        name.to_string()
    };
    Ok(NcclLibrary {
        path,
        version,
        get_unique_id,
        comm_init_rank: symbol(handle, name, "ncclCommInitRank")?,
        all_reduce: symbol(handle, name, "ncclAllReduce")?,
        all_gather: symbol(handle, name, "ncclAllGather")?,
        broadcast: symbol(handle, name, "ncclBroadcast")?,
        comm_abort: symbol(handle, name, "ncclCommAbort")?,
        comm_get_async_error: symbol(handle, name, "ncclCommGetAsyncError")?,
        get_error_string: symbol(handle, name, "ncclGetErrorString")?,
    })
}

/// The dynamic loader (glibc and musl share these values on Linux).
#[cfg(target_os = "linux")]
mod dl {
    use std::ffi::{c_char, c_int, c_void};

    pub const RTLD_NOW: c_int = 2;
    pub const RTLD_NOLOAD: c_int = 4;

    #[repr(C)]
    pub struct DlInfo {
        pub dli_fname: *const c_char,
        pub dli_fbase: *mut c_void,
        pub dli_sname: *const c_char,
        pub dli_saddr: *mut c_void,
    }

    impl Default for DlInfo {
        fn default() -> DlInfo {
            DlInfo {
                dli_fname: std::ptr::null(),
                dli_fbase: std::ptr::null_mut(),
                dli_sname: std::ptr::null(),
                dli_saddr: std::ptr::null_mut(),
            }
        }
    }

    extern "C" {
        pub fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
        pub fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
        pub fn dladdr(address: *const c_void, info: *mut DlInfo) -> c_int;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_waits_then_times_out_on_a_fake_clock() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(30);
        let at = |s: u64| start + Duration::from_secs(s);
        let pending = || EventState::Pending;
        assert_eq!(watchdog_verdict(at(1), deadline, pending(), None), Verdict::KeepWaiting);
        assert_eq!(watchdog_verdict(at(29), deadline, pending(), None), Verdict::KeepWaiting);
        assert_eq!(watchdog_verdict(at(30), deadline, pending(), None), Verdict::TimedOut);
        assert_eq!(watchdog_verdict(at(31), deadline, EventState::Complete, None), Verdict::Done);
    }

    #[test]
    fn watchdog_aborts_on_errors_before_the_deadline() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(30);
        let v = watchdog_verdict(start, deadline, EventState::Pending, Some("remote rank died".into()));
        assert_eq!(v, Verdict::Failed("asynchronous NCCL error: remote rank died".into()));
        let failed = EventState::Failed("CUDA_ERROR_LAUNCH_FAILED".into());
        let v = watchdog_verdict(start, deadline, failed, None);
        assert!(matches!(v, Verdict::Failed(m) if m.contains("LAUNCH_FAILED")));
        // Completion wins over an error seen at the same poll.
        let v = watchdog_verdict(start, deadline, EventState::Complete, Some("late".into()));
        assert_eq!(v, Verdict::Done);
    }

    /// Fake events: ids whose state the test sets.
    struct FakeStream(std::collections::HashMap<u32, EventState>);

    impl FakeStream {
        fn query(&self) -> impl FnMut(&u32) -> EventState + '_ {
            |id| self.0.get(id).cloned().unwrap_or(EventState::Pending)
        }
    }

    #[test]
    fn pending_ops_retire_in_order_and_drain_to_zero() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut ops = PendingOps::new(Duration::from_secs(10));
        let mut stream = FakeStream(Default::default());
        let mut retired = Vec::new();
        assert_eq!(ops.poll(at(0), stream.query(), None, &mut retired), None);
        ops.push(1, "all_reduce_sum", at(0));
        ops.push(2, "all_gather", at(1));
        ops.push(3, "broadcast", at(2));
        assert_eq!(ops.len(), 3);

        // Only the first completed: it retires, the others keep waiting.
        stream.0.insert(1, EventState::Complete);
        assert_eq!(ops.poll(at(5), stream.query(), None, &mut retired), None);
        assert_eq!((ops.len(), retired.as_slice()), (2, [1].as_slice()));

        // The rest completed: the queue drains to zero, events handed back in order.
        stream.0.insert(2, EventState::Complete);
        stream.0.insert(3, EventState::Complete);
        assert_eq!(ops.poll(at(6), stream.query(), None, &mut retired), None);
        assert!(ops.is_empty());
        assert_eq!(retired, vec![1, 2, 3]);
    }

    #[test]
    fn pending_op_times_out_counting_from_when_it_reached_the_head() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut ops = PendingOps::new(Duration::from_secs(10));
        let mut stream = FakeStream(Default::default());
        let mut retired = Vec::new();
        ops.push(1, "all_reduce_sum", at(0));
        ops.push(2, "broadcast", at(0));
        assert_eq!(ops.poll(at(9), stream.query(), None, &mut retired), None);

        // The first completes at 9 s: the second's clock starts then, not at 0 s.
        stream.0.insert(1, EventState::Complete);
        assert_eq!(ops.poll(at(9), stream.query(), None, &mut retired), None);
        assert_eq!(ops.poll(at(18), stream.query(), None, &mut retired), None);
        let failure = ops.poll(at(19), stream.query(), None, &mut retired).unwrap();
        assert_eq!(
            failure,
            Failure { op: "broadcast", cause: Cause::TimedOut(Duration::from_secs(10)) }
        );
        assert_eq!(failure.to_string(), "broadcast timed out after 10s");
        let error = failure.to_error();
        assert!(matches!(error, CollectiveError::Timeout { op: "broadcast", peer: None, .. }));
        assert_eq!(error.to_string(), "broadcast: timed out after 10s waiting for a peer");
        // The failed one stays queued so its event is released with the communicator.
        assert_eq!(ops.len(), 1);
        assert_eq!(ops.drain().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn pending_ops_fail_on_async_errors_and_stream_errors() {
        let start = Instant::now();
        let mut ops = PendingOps::new(Duration::from_secs(10));
        let mut stream = FakeStream(Default::default());
        let mut retired = Vec::new();

        // An asynchronous error names the collective in flight.
        ops.push(1, "all_gather", start);
        let error = Some("remote process exited (code 6)".to_string());
        let failure = ops.poll(start, stream.query(), error.clone(), &mut retired).unwrap();
        assert_eq!(failure.op, "all_gather");
        assert_eq!(
            failure.to_error().to_string(),
            "nccl: all_gather: asynchronous NCCL error: remote process exited (code 6)"
        );

        // With nothing in flight it still fails the communicator.
        stream.0.insert(1, EventState::Complete);
        let failure = ops.poll(start, stream.query(), error, &mut retired).unwrap();
        assert_eq!(failure.op, "communicator");
        assert!(ops.is_empty());

        // A failed stream fails the oldest collective.
        ops.push(2, "all_reduce_sum", start);
        stream.0.insert(2, EventState::Failed("CUDA_ERROR_ILLEGAL_ADDRESS".into()));
        let failure = ops.poll(start, stream.query(), None, &mut retired).unwrap();
        assert_eq!(failure.op, "all_reduce_sum");
        assert!(failure.to_string().contains("ILLEGAL_ADDRESS"), "{failure}");
    }

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
    fn library_search_prefers_the_loaded_copy_then_cudarc_names() {
        if std::env::var_os(NCCL_LIBRARY_ENV).is_some() {
            return;
        }
        let candidates = library_candidates();
        assert_eq!(candidates[0], ("libnccl.so.2".to_string(), true));
        assert!(candidates.iter().any(|(n, _)| n == "libnccl.so"));
        assert_eq!(
            candidates.last().unwrap(),
            &("libnccl.so.2".to_string(), false)
        );
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
