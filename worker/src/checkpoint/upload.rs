//! Asynchronous checkpoint saving. At the checkpoint step the upload thread copies the live
//! state to host memory while the next step's forward and backward run (they only read the
//! parameters); training waits for that copy only before its next optimizer update, if at all.
//! Then the copy is serialised and uploaded in the background. At most one upload is in flight.
//!
//! On a GPU the submitting thread marks its place in the default stream, so the copy waits for
//! the checkpoint step's update only, not for the kernels queued after the submission.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

use super::device_copy::{self, StreamPoint};
use super::{CheckpointStore, PartInfo, Result};

/// What to do with the outcome of an upload (vote, log) and its duration after the host copy,
/// run on the upload thread.
pub type OnUploaded = Box<dyn FnOnce(Result<Vec<PartInfo>>, Duration) + Send>;

struct Job {
    step: u64,
    attempt: String,
    rank: usize,
    /// The live tensors (sharing storage with the model and optimizer) to copy first.
    live: Vec<(String, Tensor)>,
    /// Where, on the GPU, the live tensors hold the checkpoint step's values.
    after: Option<StreamPoint>,
    copied: Arc<Latch>,
    then: OnUploaded,
}

/// A one-way gate: closed until [`Latch::open`], then open for good.
#[derive(Default)]
pub struct Latch {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Latch {
    /// Opens the gate, waking every waiter.
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Blocks until the gate is open.
    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = self.cv.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Host copies of the state, reused from one checkpoint to the next.
type HostBuffers = Arc<Mutex<Option<Vec<(String, Tensor)>>>>;

/// A background uploader of checkpoint parts.
pub struct Uploader {
    jobs: Option<SyncSender<Job>>,
    busy: Arc<(Mutex<bool>, Condvar)>,
    busy_flag: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Copies named tensors to host memory, so training can keep changing the originals.
pub fn snapshot(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    snapshot_into(None, tensors, None)
}

/// Like [`snapshot`], copying into `reuse` when its names, shapes and kinds match (no fresh
/// allocation, so no page faults); GPU tensors land in pinned host memory, copied on a side
/// stream after `after` when given.
fn snapshot_into(
    reuse: Option<Vec<(String, Tensor)>>,
    tensors: &[(String, Tensor)],
    after: Option<&StreamPoint>,
) -> Vec<(String, Tensor)> {
    let fits = |buffers: &Vec<(String, Tensor)>| {
        buffers.len() == tensors.len()
            && buffers.iter().zip(tensors).all(|((bn, b), (n, t))| bn == n && b.size() == t.size() && b.kind() == t.kind())
    };
    tch::no_grad(|| {
        let mut buffers = match reuse {
            Some(buffers) if fits(&buffers) => buffers,
            _ => tensors.iter().map(|(n, t)| (n.clone(), host_buffer(t))).collect(),
        };
        // GPU tensors go through the side stream together; host tensors (the step counter) and
        // anything the side stream cannot take are copied here.
        let (gpu, host): (Vec<usize>, Vec<usize>) = (0..tensors.len()).partition(|&i| tensors[i].1.device().is_cuda());
        let pairs: Vec<(&Tensor, &Tensor)> = gpu.iter().map(|&i| (&buffers[i].1, &tensors[i].1)).collect();
        let on_side_stream = device_copy::applies(&pairs).map(|ordinal| device_copy::copy_to_host(ordinal, &pairs, after));
        let rest = match on_side_stream {
            Some(Ok(())) => host,
            other => {
                if let Some(Err(e)) = other {
                    tracing::warn!("checkpoint copy on a side stream failed ({e}); copying on the default stream");
                }
                (0..tensors.len()).collect()
            }
        };
        for i in rest {
            buffers[i].1.copy_(&tensors[i].1);
        }
        buffers
    })
}

/// An uninitialised host tensor shaped like `t`: pinned when `t` lives on a GPU.
fn host_buffer(t: &Tensor) -> Tensor {
    let host = Tensor::empty(t.size(), (t.kind(), Device::Cpu));
    match t.device() {
        Device::Cpu => host,
        gpu => host.pin_memory(gpu),
    }
}

impl Uploader {
    /// Starts the upload thread for `store`.
    pub fn new(store: CheckpointStore) -> Self {
        let (tx, rx) = sync_channel::<Job>(1);
        let busy = Arc::new((Mutex::new(false), Condvar::new()));
        let busy_flag = Arc::new(AtomicBool::new(false));
        let buffers: HostBuffers = Arc::new(Mutex::new(None));
        let (thread_busy, thread_flag, thread_buffers) = (busy.clone(), busy_flag.clone(), buffers);
        let thread = std::thread::Builder::new()
            .name("checkpoint-upload".into())
            .spawn(move || {
                for job in rx {
                    let reuse = thread_buffers.lock().unwrap_or_else(|e| e.into_inner()).take();
                    let host = snapshot_into(reuse, &job.live, job.after.as_ref());
                    drop(job.live);
                    drop(job.after);
                    job.copied.open();
                    let started = Instant::now();
                    let result = store.write_parts(job.step, &job.attempt, job.rank, &host);
                    *thread_buffers.lock().unwrap_or_else(|e| e.into_inner()) = Some(host);
                    (job.then)(result, started.elapsed());
                    let (lock, cv) = &*thread_busy;
                    *lock.lock().unwrap_or_else(|e| e.into_inner()) = false;
                    thread_flag.store(false, Ordering::SeqCst);
                    cv.notify_all();
                }
            })
            .expect("spawn the checkpoint upload thread");
        Self { jobs: Some(tx), busy, busy_flag, thread: Some(thread) }
    }

    /// True while a copy or upload is in flight.
    pub fn is_busy(&self) -> bool {
        self.busy_flag.load(Ordering::SeqCst)
    }

    /// Blocks until no copy or upload is in flight.
    pub fn wait_idle(&self) {
        let (lock, cv) = &*self.busy;
        let mut busy = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *busy {
            busy = cv.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Queues the checkpoint of the live `tensors` (shallow clones sharing the model's and the
    /// optimizer's storage): the upload thread copies them to host memory (reusing the previous
    /// checkpoint's buffers), opens the returned latch, then uploads. The caller must not change
    /// those tensors until the latch is open. `None` when an upload is still in flight.
    pub fn submit(
        &self,
        step: u64,
        attempt: &str,
        rank: usize,
        live: Vec<(String, Tensor)>,
        then: OnUploaded,
    ) -> Option<Arc<Latch>> {
        {
            let (lock, _) = &*self.busy;
            let mut busy = lock.lock().unwrap_or_else(|e| e.into_inner());
            if *busy {
                return None;
            }
            *busy = true;
            self.busy_flag.store(true, Ordering::SeqCst);
        }
        let after = device_copy::device_of(&live).and_then(|ordinal| {
            StreamPoint::record(ordinal)
                .map_err(|e| tracing::warn!("marking the checkpoint step on the GPU stream failed ({e}); the copy waits for later work"))
                .ok()
        });
        let copied = Arc::new(Latch::default());
        let job = Job { step, attempt: attempt.to_string(), rank, live, after, copied: copied.clone(), then };
        self.jobs.as_ref().expect("uploader is running").send(job).expect("the upload thread is alive");
        Some(copied)
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
