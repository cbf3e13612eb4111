//! Finding and loading NCCL at run time. cudarc's own loader looks for `libnccl.so` and
//! versioned names that NCCL does not install (its soname is `libnccl.so.2`, the only name the
//! pip wheels that libtorch uses ship), so braid resolves the library itself, in this order:
//! `BRAID_NCCL_LIBRARY` (a path) when set; the `libnccl.so.2` already loaded in the process
//! (libtorch_cuda links it, so collectives use the same NCCL as libtorch); cudarc's names; and
//! `libnccl.so.2` on the library path.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

use cudarc::nccl::sys::{ncclComm_t, ncclResult_t, ncclUniqueId};

use super::super::CollectiveError;

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
pub(super) struct NcclLibrary {
    pub(super) path: String,
    pub(super) version: c_int,
    pub(super) get_unique_id: GetUniqueIdFn,
    pub(super) comm_init_rank: CommInitRankFn,
    pub(super) all_reduce: AllReduceFn,
    pub(super) all_gather: AllGatherFn,
    pub(super) broadcast: BroadcastFn,
    pub(super) comm_abort: CommAbortFn,
    pub(super) comm_get_async_error: CommGetAsyncErrorFn,
    pub(super) get_error_string: GetErrorStringFn,
}

impl NcclLibrary {
    /// Turns an NCCL result code into an error naming the call.
    pub(super) fn check(&self, code: c_int, call: &str) -> Result<(), CollectiveError> {
        if code == ncclResult_t::ncclSuccess as c_int {
            return Ok(());
        }
        Err(CollectiveError::Nccl(format!(
            "{call} failed: {}",
            self.error_text(code)
        )))
    }

    /// NCCL's description of a result code, with the code.
    pub(super) fn error_text(&self, code: c_int) -> String {
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

pub(super) fn library() -> Result<&'static NcclLibrary, CollectiveError> {
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
}
