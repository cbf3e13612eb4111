//! Asynchronous checkpoint saving: the state is copied to host memory at the checkpoint step
//! (the only time training waits), then serialised and uploaded on a background thread while
//! training goes on. At most one upload is in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

use super::{CheckpointStore, PartInfo, Result};

/// What to do with the outcome of an upload (vote, log), run on the upload thread.
pub type OnUploaded = Box<dyn FnOnce(Result<Vec<PartInfo>>, Duration) + Send>;

struct Job {
    step: u64,
    attempt: String,
    rank: usize,
    tensors: Vec<(String, Tensor)>,
    then: OnUploaded,
}

/// Host copies of the state, reused from one checkpoint to the next.
type HostBuffers = Arc<Mutex<Option<Vec<(String, Tensor)>>>>;

/// A background uploader of checkpoint parts.
pub struct Uploader {
    jobs: Option<SyncSender<Job>>,
    busy: Arc<(Mutex<bool>, Condvar)>,
    busy_flag: Arc<AtomicBool>,
    buffers: HostBuffers,
    thread: Option<JoinHandle<()>>,
}

/// Copies named tensors to host memory, so training can keep changing the originals.
pub fn snapshot(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    snapshot_into(None, tensors)
}

/// Like [`snapshot`], copying into `reuse` when its names, shapes and kinds match (no fresh
/// allocation, so no page faults); GPU tensors land in pinned host memory.
fn snapshot_into(reuse: Option<Vec<(String, Tensor)>>, tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    let fits = |buffers: &Vec<(String, Tensor)>| {
        buffers.len() == tensors.len()
            && buffers.iter().zip(tensors).all(|((bn, b), (n, t))| bn == n && b.size() == t.size() && b.kind() == t.kind())
    };
    tch::no_grad(|| match reuse {
        Some(mut buffers) if fits(&buffers) => {
            for ((_, dst), (_, src)) in buffers.iter_mut().zip(tensors) {
                dst.copy_(src);
            }
            buffers
        }
        _ => tensors
            .iter()
            .map(|(n, t)| {
                let host = match t.device() {
                    Device::Cpu => t.detach().copy(),
                    gpu => {
                        let pinned = Tensor::empty(t.size(), (t.kind(), Device::Cpu)).pin_memory(gpu);
                        let mut pinned = pinned;
                        pinned.copy_(t);
                        pinned
                    }
                };
                (n.clone(), host)
            })
            .collect(),
    })
}

impl Uploader {
    /// Starts the upload thread for `store`.
    pub fn new(store: CheckpointStore) -> Self {
        let (tx, rx) = sync_channel::<Job>(1);
        let busy = Arc::new((Mutex::new(false), Condvar::new()));
        let busy_flag = Arc::new(AtomicBool::new(false));
        let buffers: HostBuffers = Arc::new(Mutex::new(None));
        let (thread_busy, thread_flag, thread_buffers) = (busy.clone(), busy_flag.clone(), buffers.clone());
        let thread = std::thread::Builder::new()
            .name("checkpoint-upload".into())
            .spawn(move || {
                for job in rx {
                    let started = Instant::now();
                    let result = store.write_parts(job.step, &job.attempt, job.rank, &job.tensors);
                    *thread_buffers.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.tensors);
                    (job.then)(result, started.elapsed());
                    let (lock, cv) = &*thread_busy;
                    *lock.lock().unwrap_or_else(|e| e.into_inner()) = false;
                    thread_flag.store(false, Ordering::SeqCst);
                    cv.notify_all();
                }
            })
            .expect("spawn the checkpoint upload thread");
        Self { jobs: Some(tx), busy, busy_flag, buffers, thread: Some(thread) }
    }

    /// Copies `tensors` to host memory for an upload, reusing the previous checkpoint's host
    /// buffers once its upload is done.
    pub fn snapshot(&self, tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        let reuse = if self.is_busy() { None } else { self.buffers.lock().unwrap_or_else(|e| e.into_inner()).take() };
        snapshot_into(reuse, tensors)
    }

    /// True while an upload is in flight.
    pub fn is_busy(&self) -> bool {
        self.busy_flag.load(Ordering::SeqCst)
    }

    /// Blocks until no upload is in flight.
    pub fn wait_idle(&self) {
        let (lock, cv) = &*self.busy;
        let mut busy = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *busy {
            busy = cv.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Queues the upload of an already snapshotted state; returns false (and drops nothing
    /// else) when an upload is still in flight.
    pub fn submit(&self, step: u64, attempt: &str, rank: usize, tensors: Vec<(String, Tensor)>, then: OnUploaded) -> bool {
        {
            let (lock, _) = &*self.busy;
            let mut busy = lock.lock().unwrap_or_else(|e| e.into_inner());
            if *busy {
                return false;
            }
            *busy = true;
            self.busy_flag.store(true, Ordering::SeqCst);
        }
        let job = Job { step, attempt: attempt.to_string(), rank, tensors, then };
        self.jobs.as_ref().expect("uploader is running").send(job).expect("the upload thread is alive");
        true
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
