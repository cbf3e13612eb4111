//! The tonic service: a thin adapter that locks the state machine, applies the request with
//! the current time, performs the resulting actions and maps errors to gRPC status codes.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use braid_proto::coordinator_server::Coordinator as CoordinatorRpc;
use braid_proto::{
    CheckpointRequest, CheckpointRequestReply, CheckpointVote, CheckpointVoteReply, CorruptReply, CorruptReport, DataPlanReply, DataPlanRequest, HeartbeatReply,
    HeartbeatRequest, JoinReply, JoinRequest, LeaveReply, LeaveRequest, PublishBootstrapReply, PublishBootstrapRequest,
    RendezvousReply, RendezvousRequest, StepReply, StepReport,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::commit;
use crate::error::{Error, Result};
use crate::state::{Action, CommitPlan, Coordinator, CoordinatorSnapshot, LogLevel, Progress};
use crate::store::StoreRoot;

struct Shared {
    state: Mutex<Coordinator>,
    /// Actions a restored state machine queued before the server started (commits to finish).
    pending: Mutex<Vec<Action>>,
    checkpoints: Option<StoreRoot>,
    keep: usize,
    keep_every: u64,
    /// Commits run one at a time, so `latest` only moves forward.
    commit_lock: tokio::sync::Mutex<()>,
    ended: CancellationToken,
}

/// The coordinator's gRPC service. Cheap to clone; clones share one state machine.
#[derive(Clone)]
pub struct CoordinatorService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CoordinatorService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorService").field("checkpoints", &self.shared.checkpoints).finish_non_exhaustive()
    }
}

fn log(actions: &[Action]) {
    for action in actions {
        if let Action::Log { level, message } = action {
            match level {
                LogLevel::Info => tracing::info!("{message}"),
                LogLevel::Warn => tracing::warn!("{message}"),
                LogLevel::Error => tracing::error!("{message}"),
            }
        }
    }
}

impl CoordinatorService {
    /// A service over `state`; `checkpoints` is the opened checkpoint root when the job has one.
    pub fn new(mut state: Coordinator, checkpoints: Option<StoreRoot>) -> Self {
        let actions = state.take_actions();
        log(&actions);
        let pending = actions.into_iter().filter(|a| !matches!(a, Action::Log { .. })).collect();
        let keep = state.config().checkpoint.keep;
        let keep_every = state.config().checkpoint.keep_every_steps;
        let ended = CancellationToken::new();
        if state.is_over() {
            ended.cancel();
        }
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                pending: Mutex::new(pending),
                checkpoints,
                keep,
                keep_every,
                commit_lock: tokio::sync::Mutex::new(()),
                ended,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Coordinator> {
        self.shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies `f` to the state at the current time; logs the resulting log lines and returns
    /// the other actions.
    fn apply<T>(&self, f: impl FnOnce(&mut Coordinator, Instant) -> Result<T>) -> (Result<T>, Vec<Action>) {
        let (result, actions) = {
            let mut state = self.lock();
            let result = f(&mut state, Instant::now());
            let actions = state.take_actions();
            if state.is_over() {
                self.shared.ended.cancel();
            }
            (result, actions)
        };
        log(&actions);
        let rest = actions.into_iter().filter(|a| !matches!(a, Action::Log { .. })).collect();
        (result, rest)
    }

    /// Applies an infallible change to the state.
    fn update(&self, f: impl FnOnce(&mut Coordinator, Instant)) {
        let _ = self.apply(|s, now| {
            f(s, now);
            Ok(())
        });
    }

    /// A snapshot of the job.
    pub fn progress(&self) -> Progress {
        self.lock().progress()
    }

    /// The state machine's state, for the journal.
    pub fn snapshot(&self) -> CoordinatorSnapshot {
        self.lock().snapshot()
    }

    /// Performs the actions a restored state machine queued (a checkpoint whose votes were
    /// all in when the previous coordinator stopped is committed now).
    pub async fn run_pending(&self) {
        let pending = std::mem::take(&mut *self.shared.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for action in pending {
            if let Action::Commit(plan) = action {
                if let Err(e) = self.commit(&plan).await {
                    tracing::error!("checkpoint step {} could not be committed after the restart: {e}", plan.step);
                }
            }
        }
    }

    /// Periodic work (dead workers, generations whose grace passed) at `now`.
    pub fn tick(&self, now: Instant) {
        self.update(|s, _| s.tick(now));
    }

    /// Asks for a checkpoint at the next common step, then a stop with `stop_after` (the
    /// embedding `braid run` on SIGTERM). Returns the step once it is fixed.
    pub fn checkpoint_now(&self, reason: &str, stop_after: bool) -> Result<Option<u64>> {
        self.apply(|s, _| s.checkpoint_now(reason.to_string(), stop_after)).0
    }

    /// Cancelled once the job finished or failed.
    pub fn ended(&self) -> CancellationToken {
        self.shared.ended.clone()
    }

    /// Phase two of a checkpoint: verify, write the manifest create-only, move `latest`,
    /// apply retention. Returns the manifest's URL.
    async fn commit(&self, plan: &CommitPlan) -> Result<String> {
        let Some(root) = &self.shared.checkpoints else {
            let reason = "the coordinator has no checkpoint store open";
            self.update(|s, _| s.commit_failed(plan, reason));
            return Err(Error::Checkpoint(reason.into()));
        };
        let _serial = self.shared.commit_lock.lock().await;
        let url = match commit::write_manifest(root, plan, SystemTime::now()).await {
            Ok(url) => url,
            Err(e) => {
                let reason = e.to_string();
                self.update(|s, _| s.commit_failed(plan, &reason));
                return Err(e);
            }
        };
        if self.lock().should_move_latest(plan.step) {
            if let Err(e) = commit::write_latest(root, plan.step).await {
                tracing::error!(
                    "checkpoint step {} is committed but {} was not updated: {e}",
                    plan.step,
                    root.url_of(commit::LATEST)
                );
            }
        }
        self.update(|s, now| s.commit_succeeded(now, plan, url.clone()));
        match commit::apply_retention(root, self.shared.keep, self.shared.keep_every).await {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!("checkpoint.keep = {}: deleted checkpoint steps {deleted:?}", self.shared.keep)
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("checkpoint retention failed: {e}"),
        }
        Ok(url)
    }
}

fn reply<T>(rpc: &str, result: Result<T>) -> Result<Response<T>, Status> {
    match result {
        Ok(r) => Ok(Response::new(r)),
        Err(e) => {
            tracing::warn!("refused {rpc}: {e}");
            Err(e.into())
        }
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let req = request.into_inner();
        reply("Join", self.apply(|s, now| s.join(now, &req)).0)
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let req = request.into_inner();
        reply("Heartbeat", self.apply(|s, now| s.heartbeat(now, &req)).0)
    }

    async fn rendezvous(&self, request: Request<RendezvousRequest>) -> Result<Response<RendezvousReply>, Status> {
        let req = request.into_inner();
        reply("Rendezvous", self.apply(|s, now| s.rendezvous(now, &req)).0)
    }

    async fn publish_bootstrap(
        &self,
        request: Request<PublishBootstrapRequest>,
    ) -> Result<Response<PublishBootstrapReply>, Status> {
        let req = request.into_inner();
        reply("PublishBootstrap", self.apply(|s, now| s.publish_bootstrap(now, &req)).0)
    }

    async fn data_plan(&self, request: Request<DataPlanRequest>) -> Result<Response<DataPlanReply>, Status> {
        let req = request.into_inner();
        reply("DataPlan", self.apply(|s, now| s.data_plan(now, &req)).0)
    }

    async fn report_step(&self, request: Request<StepReport>) -> Result<Response<StepReply>, Status> {
        let req = request.into_inner();
        reply("ReportStep", self.apply(|s, now| s.report_step(now, &req)).0)
    }

    async fn commit_checkpoint(
        &self,
        request: Request<CheckpointVote>,
    ) -> Result<Response<CheckpointVoteReply>, Status> {
        let req = request.into_inner();
        let (result, actions) = self.apply(|s, now| s.checkpoint_vote(now, &req));
        let mut vote = match result {
            Ok(v) => v,
            Err(e) => return reply("CommitCheckpoint", Err(e)),
        };
        for action in actions {
            if let Action::Commit(plan) = action {
                match self.commit(&plan).await {
                    Ok(url) => vote = CheckpointVoteReply { committed: true, manifest_url: url },
                    Err(e) => return reply("CommitCheckpoint", Err(e)),
                }
            }
        }
        Ok(Response::new(vote))
    }

    async fn report_corrupt(&self, request: Request<CorruptReport>) -> Result<Response<CorruptReply>, Status> {
        let req = request.into_inner();
        reply("ReportCorrupt", self.apply(|s, now| s.report_corrupt(now, &req)).0)
    }

    async fn request_checkpoint(
        &self,
        request: Request<CheckpointRequest>,
    ) -> Result<Response<CheckpointRequestReply>, Status> {
        let req = request.into_inner();
        reply("RequestCheckpoint", self.apply(|s, now| s.request_checkpoint(now, &req)).0)
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let req = request.into_inner();
        reply("Leave", self.apply(|s, now| s.leave(now, &req)).0)
    }
}
