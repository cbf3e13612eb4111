//! A rank's part in a checkpoint: snapshot, upload in the background, vote.
//!
//! Rank 0 holds the replicated model and optimizer state and writes the parts; every rank
//! votes, so the coordinator commits only once all of them reached the step. The host copy
//! runs beside the next step's forward and backward; training waits for it only before its
//! next optimizer update ([`Checkpointer::before_update`]). The upload and rank 0's vote
//! happen on the upload thread.

use std::time::{Duration, Instant};

use braid_coordinator::client::CoordinatorClient;
use braid_proto::{CheckpointPart, CheckpointVote};
use tch::Tensor;

use super::upload::{Latch, Uploader};
use super::{CheckpointStore, PartInfo};

/// How long a vote is retried while the coordinator is unreachable.
const VOTE_RETRY_LIMIT: Duration = Duration::from_secs(300);

/// Takes part in checkpoints for one worker, across generations (an upload started in one
/// generation finishes in the background while the next one forms).
pub struct Checkpointer {
    uploader: Uploader,
    /// The host copy in flight, which the next optimizer update must wait for.
    copying: std::sync::Mutex<Option<std::sync::Arc<Latch>>>,
    client: CoordinatorClient,
    runtime: tokio::runtime::Handle,
}

/// Which rank of which generation takes part in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    /// The generation.
    pub generation: u64,
    /// This worker's rank in it.
    pub rank: usize,
}

/// How a checkpoint request was handled on this rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Taken {
    /// The state was snapshotted (rank 0) or the vote sent; `blocked` is how long training waited.
    Started {
        /// Time training was blocked.
        blocked: Duration,
    },
    /// Rank 0's previous upload was still in flight: this attempt was voted down and the
    /// checkpoint happens at a later step.
    Deferred,
}

fn vote(
    client: &CoordinatorClient,
    runtime: &tokio::runtime::Handle,
    generation: u64,
    step: u64,
    attempt: &str,
    rank: usize,
    outcome: Result<(Vec<PartInfo>, Duration), String>,
) {
    let (ok, error, parts, took) = match outcome {
        Ok((parts, took)) => (true, String::new(), parts, took),
        Err(e) => (false, e, Vec::new(), Duration::ZERO),
    };
    let request = CheckpointVote {
        header: None,
        generation,
        step,
        attempt: attempt.to_string(),
        rank: rank as u32,
        ok,
        error: error.clone(),
        parts: parts.iter().map(|p| CheckpointPart { path: p.path.clone(), sha256: p.sha256.clone(), size: p.size }).collect(),
        write_seconds: took.as_secs_f64(),
    };
    // A coordinator outage (a restart from its journal) delays the vote, it does not lose it.
    let started = Instant::now();
    let outcome = loop {
        match runtime.block_on(client.commit_checkpoint(request.clone())) {
            Err(e) if e.is_outage() && started.elapsed() < VOTE_RETRY_LIMIT => std::thread::sleep(Duration::from_millis(500)),
            other => break other,
        }
    };
    match outcome {
        Ok(reply) if reply.committed => tracing::info!(step, manifest = %reply.manifest_url, "checkpoint committed"),
        Ok(_) if !ok => tracing::warn!(step, "checkpoint attempt {attempt} voted down: {error}"),
        Ok(_) => {}
        Err(e) => tracing::warn!(step, "checkpoint vote for attempt {attempt} failed: {e}"),
    }
}

impl Checkpointer {
    /// A participant writing to `store`, voting through `client`.
    pub fn new(store: CheckpointStore, client: CoordinatorClient, runtime: tokio::runtime::Handle) -> Self {
        Self { uploader: Uploader::new(store), copying: std::sync::Mutex::new(None), client, runtime }
    }

    /// Takes part in the checkpoint of `step`. `state` gives rank 0's live tensors (sharing
    /// storage with the model and optimizer; they are copied on the upload thread); with
    /// `must_complete` (last step, preemption) a running upload is waited for instead of
    /// deferring this checkpoint. `blocked` in the result is the time spent here.
    pub fn take(
        &self,
        member: Membership,
        step: u64,
        attempt: &str,
        state: impl FnOnce() -> Vec<(String, Tensor)>,
        must_complete: bool,
    ) -> Taken {
        let started = Instant::now();
        let Membership { generation, rank } = member;
        if rank != 0 {
            vote(&self.client, &self.runtime, generation, step, attempt, rank, Ok((Vec::new(), Duration::ZERO)));
            return Taken::Started { blocked: started.elapsed() };
        }
        if must_complete {
            self.uploader.wait_idle();
        } else if self.uploader.is_busy() {
            let reason = "the previous checkpoint upload is still in flight".to_string();
            vote(&self.client, &self.runtime, generation, step, attempt, rank, Err(reason));
            return Taken::Deferred;
        }
        let live = state();
        let (client, runtime) = (self.client.clone(), self.runtime.clone());
        let attempt_name = attempt.to_string();
        // The upload thread logs inside this step's span (job, generation, rank, step).
        let span = tracing::Span::current();
        let then = Box::new(move |result: super::Result<Vec<PartInfo>>, took: Duration| {
            let _span = span.enter();
            if let Ok(parts) = &result {
                let bytes: u64 = parts.iter().map(|p| p.size).sum();
                tracing::info!(step, bytes, parts = parts.len(), seconds = took.as_secs_f64(), "checkpoint uploaded");
            }
            braid_coordinator::failpoint::hit("before-vote", step);
            vote(&client, &runtime, generation, step, &attempt_name, rank, result.map(|parts| (parts, took)).map_err(|e| e.to_string()));
        });
        let copying = self.uploader.submit(step, attempt, rank, live, then).expect("the uploader was idle");
        *self.copying.lock().unwrap_or_else(|e| e.into_inner()) = Some(copying);
        Taken::Started { blocked: started.elapsed() }
    }

    /// Waits until the host copy of the last checkpoint is done (call before an optimizer
    /// update changes the parameters); returns how long it waited.
    pub fn before_update(&self) -> Duration {
        let started = Instant::now();
        if let Some(copying) = self.copying.lock().unwrap_or_else(|e| e.into_inner()).take() {
            copying.wait();
        }
        started.elapsed()
    }

    /// Waits for the copy and upload in flight, if any (before the worker exits).
    pub fn finish(&self) {
        self.before_update();
        self.uploader.wait_idle();
    }
}
