//! Batches made ready for the device on a thread beside training: each loader batch is
//! converted into a [`HostBatch`] (the model's kinds, padded to the slot, pinned for a GPU)
//! while the previous step trains, so the training thread only issues the copies.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tch::{Device, Kind};

use crate::data::error::{Error, Result};
use crate::data::loader::{Batch, Loader};
use crate::trainer::HostBatch;

/// A loader batch with its host tensors.
pub struct Staged {
    /// The loader's batch; its pixels are dropped once converted.
    pub batch: Batch,
    /// What the step copies to the device.
    pub host: HostBatch,
}

/// What the staging thread needs to convert a batch.
#[derive(Debug, Clone, Copy)]
pub struct StagingShape {
    /// Samples per rank (batches are padded to it).
    pub slot: usize,
    /// Input resolution.
    pub image_size: i64,
    /// The training device (pinned host memory for CUDA).
    pub device: Device,
    /// Kind of the model's inputs.
    pub kind: Kind,
}

/// Owns a [`Loader`] on a thread of its own and hands out staged batches in step order, one
/// ahead of training.
pub struct Stager {
    receiver: Option<Receiver<Result<Staged>>>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    corrupt: Arc<AtomicU64>,
}

impl Stager {
    /// Starts staging `loader`'s batches.
    pub fn new(mut loader: Loader, shape: StagingShape) -> Result<Self> {
        let corrupt = loader.corrupt_counter();
        let (sender, receiver): (SyncSender<Result<Staged>>, _) = std::sync::mpsc::sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("braid-staging".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    let staged = loader.next_batch().map(|mut batch| {
                        let host = HostBatch::from_batch(&batch, shape.slot, shape.image_size, shape.device, shape.kind);
                        batch.images = Vec::new();
                        Staged { batch, host }
                    });
                    let finished = matches!(staged, Err(Error::Finished { .. }));
                    if sender.send(staged).is_err() || finished {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Stopped(format!("cannot start the staging thread: {e}")))?;
        Ok(Self { receiver: Some(receiver), thread: Some(thread), stop, corrupt })
    }

    /// The next step's staged batch; its `data_wait` is how long training waited for it here.
    pub fn next_batch(&mut self) -> Result<Staged> {
        let started = Instant::now();
        let receiver = self.receiver.as_ref().expect("the receiver lives as long as the stager");
        let mut staged = receiver.recv().map_err(|_| Error::Stopped("the staging thread ended early".into()))??;
        staged.batch.data_wait = started.elapsed();
        Ok(staged)
    }

    /// Corrupt samples the loader found so far.
    pub fn corrupt_samples(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }
}

impl Drop for Stager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.receiver.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
