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
//! produced the tensor and before those that read the result. Each call then waits, under the
//! configured timeout, for the stream to drain while polling NCCL's asynchronous error; on a
//! timeout or an error the communicator is aborted and the collective is broken.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::sys::{cuStreamQuery, CUresult};
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

/// A communicator handle that may move to the thread that owns it.
struct CommHandle(ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; the owner's
// `&mut self` serializes calls.
unsafe impl Send for CommHandle {}

/// An NCCL communicator for one rank on one CUDA device (see the module documentation).
pub struct NcclCollective {
    lib: &'static NcclLibrary,
    comm: CommHandle,
    context: Arc<CudaContext>,
    device: Device,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    broken: Option<String>,
}

impl NcclCollective {
    /// Joins the communicator identified by `id` as `rank` of `world_size` on `device` (a CUDA
    /// device). Fails with a timeout when the other ranks do not all join within `timeout`; the
    /// blocked initialization then stays on a background thread, since NCCL cannot cancel it.
    /// `timeout` also bounds every later call.
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
        Ok(NcclCollective {
            lib,
            comm,
            context,
            device,
            rank,
            world_size,
            timeout,
            broken: None,
        })
    }

    fn check_tensor(&self, op: &'static str, tensor: &Tensor) -> Result<(), CollectiveError> {
        if let Some(reason) = &self.broken {
            return Err(CollectiveError::Broken {
                op,
                reason: reason.clone(),
            });
        }
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

    /// Runs `launch` (which enqueues one NCCL operation on the null stream) and waits for it.
    fn enqueue_and_wait(
        &mut self,
        op: &'static str,
        launch: impl FnOnce(&NcclLibrary, ncclComm_t) -> c_int,
    ) -> Result<(), CollectiveError> {
        let result = self.bind(op).and_then(|()| {
            let code = launch(self.lib, self.comm.0);
            self.lib.check(code, op)
        });
        let result = result.and_then(|()| self.wait(op));
        if let Err(e) = &result {
            self.abort(e.to_string());
        }
        result
    }

    fn bind(&self, op: &'static str) -> Result<(), CollectiveError> {
        self.context
            .bind_to_thread()
            .map_err(|e| CollectiveError::Nccl(format!("{op}: binding the CUDA context: {e}")))
    }

    /// Waits until the null stream has drained, failing on an NCCL error or at the deadline.
    fn wait(&self, op: &'static str) -> Result<(), CollectiveError> {
        let deadline = Instant::now() + self.timeout;
        let mut polls = 0u32;
        loop {
            // SAFETY: the context is bound to this thread; a null handle is the legacy stream.
            let stream = match unsafe { cuStreamQuery(std::ptr::null_mut()) } {
                CUresult::CUDA_SUCCESS => StreamState::Drained,
                CUresult::CUDA_ERROR_NOT_READY => StreamState::Running,
                other => StreamState::Failed(format!("{other:?}")),
            };
            let async_error = if stream == StreamState::Running { self.async_error(op)? } else { None };
            match watchdog_verdict(Instant::now(), deadline, stream, async_error) {
                Verdict::Done => return Ok(()),
                Verdict::KeepWaiting => {}
                Verdict::Failed(reason) => return Err(CollectiveError::Nccl(format!("{op}: {reason}"))),
                Verdict::TimedOut => return Err(CollectiveError::Timeout { op, peer: None, after: self.timeout }),
            }
            polls += 1;
            if polls < 200 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// The communicator's asynchronous error, if it has one.
    fn async_error(&self, op: &'static str) -> Result<Option<String>, CollectiveError> {
        let mut async_error = ncclResult_t::ncclSuccess as c_int;
        // SAFETY: a live communicator and an out-pointer.
        let code = unsafe { (self.lib.comm_get_async_error)(self.comm.0, &mut async_error) };
        self.lib.check(code, op)?;
        if async_error == ncclResult_t::ncclInProgress as c_int {
            return Ok(None);
        }
        Ok(self.lib.check(async_error, op).err().map(|e| e.to_string()))
    }

    /// Aborts the communicator (ending any kernel still waiting on peers) and marks it broken.
    fn abort(&mut self, reason: String) {
        if !self.comm.0.is_null() {
            let _ = self.bind("abort");
            // SAFETY: the communicator is live and dropped from here on.
            unsafe { (self.lib.comm_abort)(self.comm.0) };
            self.comm.0 = std::ptr::null_mut();
        }
        self.broken = Some(reason);
    }
}

/// State of the stream a collective was enqueued on, at one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamState {
    /// Every enqueued kernel finished.
    Drained,
    /// Kernels are still running.
    Running,
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
pub fn watchdog_verdict(now: Instant, deadline: Instant, stream: StreamState, async_error: Option<String>) -> Verdict {
    match stream {
        StreamState::Drained => Verdict::Done,
        StreamState::Failed(e) => Verdict::Failed(format!("the CUDA stream failed: {e}")),
        StreamState::Running => match async_error {
            Some(e) => Verdict::Failed(format!("asynchronous NCCL error: {e}")),
            None if now >= deadline => Verdict::TimedOut,
            None => Verdict::KeepWaiting,
        },
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
        let op = "all_reduce_sum";
        self.check_tensor(op, tensor)?;
        let kind = tensor.f_kind()?;
        let (reduce_kind, data_type) = match kind {
            Kind::Float | Kind::BFloat16 | Kind::Half => (Kind::Float, ncclDataType_t::ncclFloat32),
            Kind::Double => (Kind::Double, ncclDataType_t::ncclFloat64),
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
        // bf16/f16 are summed in f32 and rounded once; strided tensors go through a copy.
        let staged = if kind == reduce_kind && tensor.is_contiguous() {
            None
        } else {
            Some(tensor.f_to_kind(reduce_kind)?.f_contiguous()?)
        };
        let buffer = staged.as_ref().unwrap_or(tensor).data_ptr();
        self.enqueue_and_wait(op, |lib, comm| unsafe {
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
        self.enqueue_and_wait(op, |lib, comm| unsafe {
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
        self.enqueue_and_wait(op, |lib, comm| unsafe {
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

    fn engine(&self) -> &'static str {
        "nccl"
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // Abort rather than destroy: destroying may wait on peers that are gone, and no
        // operation is in flight once a call has returned.
        self.abort("dropped".to_string());
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
        // SAFETY: ncclGetErrorString returns a static C string for any code.
        let text = unsafe {
            let s = (self.get_error_string)(code);
            if s.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(s).to_string_lossy().into_owned()
            }
        };
        Err(CollectiveError::Nccl(format!(
            "{call} failed: {text} (code {code})"
        )))
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
        assert_eq!(watchdog_verdict(at(1), deadline, StreamState::Running, None), Verdict::KeepWaiting);
        assert_eq!(watchdog_verdict(at(29), deadline, StreamState::Running, None), Verdict::KeepWaiting);
        assert_eq!(watchdog_verdict(at(30), deadline, StreamState::Running, None), Verdict::TimedOut);
        assert_eq!(watchdog_verdict(at(31), deadline, StreamState::Drained, None), Verdict::Done);
    }

    #[test]
    fn watchdog_aborts_on_errors_before_the_deadline() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(30);
        let v = watchdog_verdict(start, deadline, StreamState::Running, Some("remote rank died".into()));
        assert_eq!(v, Verdict::Failed("asynchronous NCCL error: remote rank died".into()));
        let v = watchdog_verdict(start, deadline, StreamState::Failed("CUDA_ERROR_LAUNCH_FAILED".into()), None);
        assert!(matches!(v, Verdict::Failed(m) if m.contains("LAUNCH_FAILED")));
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

        // A large reduction exercises the stream wait.
        let mut big = Tensor::ones([1 << 24], (Kind::Float, device));
        nccl.all_reduce_sum(&mut big).unwrap();
        assert_eq!(big.sum(Kind::Double).double_value(&[]), (1u64 << 24) as f64);
    }
}
