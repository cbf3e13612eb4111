//! The tonic service: a thin adapter that locks the state machine, applies the request with
//! the current time, performs the resulting actions and maps errors to gRPC status codes.
//! A step report carrying a replica digest is answered once the state machine has a verdict on
//! that step's check (every rank's digest is in, or the bounded wait is over).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use braid_proto::coordinator_server::Coordinator as CoordinatorRpc;
use braid_proto::{
    CheckpointRequest, CheckpointRequestReply, CheckpointVote, CheckpointVoteReply, CorruptReply, CorruptReport, DataPlanReply, DataPlanRequest, HeartbeatReply,
    HeartbeatRequest, JoinReply, JoinRequest, LeaveReply, LeaveRequest, PublishBootstrapReply, PublishBootstrapRequest,
    RendezvousReply, RendezvousRequest, StatusReply, StatusRequest, StepReply, StepReport,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::commit;
use crate::config::JobConfig;
use crate::error::{Error, Result};
use crate::state::{Action, CommitPlan, Coordinator, CoordinatorSnapshot, LogLevel, Progress, StateCheck};
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
    /// Signalled after every change of the state, for replies waiting on a state check.
    changed: tokio::sync::Notify,
}

/// How often a reply waiting on a state check looks at the clock when nothing changes.
const STATE_CHECK_POLL: Duration = Duration::from_millis(100);

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
                changed: tokio::sync::Notify::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Coordinator> {
        self.shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies `f` to the state at the current time; logs the resulting log lines and returns
    /// the other actions.
    fn apply<T>(&self, f: impl FnOnce(&mut Coordinator, Instant) -> Result<T>) -> (Result<T>, Vec<Action>) {
        let (result, actions, generations) = {
            let mut state = self.lock();
            let before = state.live_generation();
            let result = f(&mut state, Instant::now());
            let actions = state.take_actions();
            if state.is_over() {
                self.shared.ended.cancel();
            }
            (result, actions, (before, state.live_generation()))
        };
        self.shared.changed.notify_waiters();
        match generations {
            (before, after) if before != after => {
                // A generation formed or ended: its own span, holding the log lines that say why.
                let number = |g: Option<(u64, usize)>| g.map_or(0, |(n, _)| n);
                let _span = tracing::info_span!(
                    "generation_change",
                    from = number(before),
                    to = number(after),
                    world_size = after.map_or(0, |(_, w)| w)
                )
                .entered();
                log(&actions);
            }
            _ => log(&actions),
        }
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

    /// The job's configuration.
    pub fn config(&self) -> JobConfig {
        self.lock().config().clone()
    }

    /// True when the job finished, failed, or stopped after a preemption checkpoint (cheaper
    /// than [`CoordinatorService::progress`], which copies the recent steps).
    pub fn is_over(&self) -> bool {
        self.lock().is_over()
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

    /// Waits for the verdict of the state check of `step` in `generation`. Looks again after
    /// every change of the state and every [`STATE_CHECK_POLL`]; the state machine bounds the
    /// wait ([`Coordinator::state_check_wait`]).
    async fn state_check(&self, generation: u64, step: u64) -> StateCheck {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (check, actions) = {
                let mut state = self.lock();
                let check = state.state_check(Instant::now(), generation, step);
                (check, state.take_actions())
            };
            log(&actions);
            if check != StateCheck::Pending {
                return check;
            }
            let _ = tokio::time::timeout(STATE_CHECK_POLL, changed).await;
        }
    }

    /// Cancelled once the job finished or failed.
    pub fn ended(&self) -> CancellationToken {
        self.shared.ended.clone()
    }

    /// Phase two of a checkpoint: verify, write the manifest create-only, move `latest`,
    /// apply retention. Returns the manifest's URL.
    async fn commit(&self, plan: &CommitPlan) -> Result<String> {
        let bytes: u64 = plan.parts.iter().map(|p| p.size).sum();
        let span = tracing::info_span!("commit", step = plan.step, attempt = %plan.attempt, parts = plan.parts.len(), bytes);
        self.commit_in_span(plan).instrument(span).await
    }

    async fn commit_in_span(&self, plan: &CommitPlan) -> Result<String> {
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
        let _span = tracing::info_span!("join", hostname = %req.hostname, device = %req.device, pid = req.pid).entered();
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
        let mut step_reply = match self.apply(|s, now| s.report_step(now, &req)).0 {
            Ok(r) => r,
            Err(e) => return reply("ReportStep", Err(e)),
        };
        // Also with `stop`: the last step's check ends the job, and every rank must learn its verdict.
        if !req.state_digest.is_empty() && !step_reply.rendezvous_required {
            self.state_check(req.generation, req.step).await.fill(&mut step_reply);
        }
        Ok(Response::new(step_reply))
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

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let progress_json = serde_json::to_string(&self.progress()).map_err(|e| Status::internal(format!("encoding the status: {e}")))?;
        Ok(Response::new(StatusReply { progress_json }))
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let req = request.into_inner();
        reply("Leave", self.apply(|s, now| s.leave(now, &req)).0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::JobConfig;
    use braid_proto::{DataPlanRequest, Header, RendezvousRequest, PROTOCOL_VERSION};

    const JOB: &str = "check-job";

    fn header(worker: &str) -> Option<Header> {
        Some(Header { job_id: JOB.into(), protocol_version: PROTOCOL_VERSION, worker_id: worker.into() })
    }

    /// A service whose 2-rank generation 1 has started: the worker ids in rank order.
    async fn started() -> (CoordinatorService, Vec<String>) {
        let text = format!(
            "[job]\nname = \"{JOB}\"\n[data]\ntrain = \"/d/manifest.json\"\n[train]\nglobal_batch = 4\nsteps = 10\n\
             ema_check_every = 5\n[cluster]\nmin_workers = 2\nmax_workers = 2\n"
        );
        let config = JobConfig::parse(&text, "test").unwrap();
        config.validate("test").unwrap();
        let service = CoordinatorService::new(Coordinator::new(config, Instant::now(), "n"), None);
        let mut ids = Vec::new();
        for host in ["a", "b"] {
            let join = JoinRequest { header: header(""), hostname: host.into(), ..Default::default() };
            ids.push(service.join(Request::new(join)).await.unwrap().into_inner().worker_id);
        }
        for id in &ids {
            let req = RendezvousRequest { header: header(id), endpoint: format!("{id}:1"), held_step: None };
            service.rendezvous(Request::new(req)).await.unwrap();
        }
        for id in &ids {
            service.data_plan(Request::new(DataPlanRequest { header: header(id), generation: 1 })).await.unwrap();
        }
        (service, ids)
    }

    fn report(id: &str, step: u64, digest: &str) -> Request<StepReport> {
        let report =
            StepReport { header: header(id), generation: 1, step, state_digest: digest.into(), ..Default::default() };
        Request::new(report)
    }

    #[tokio::test]
    async fn a_digest_report_is_answered_once_every_rank_has_sent_its_digest() {
        let (service, ids) = started().await;
        let first = tokio::spawn({
            let (service, id) = (service.clone(), ids[0].clone());
            async move { service.report_step(report(&id, 4, "aaaa")).await.unwrap().into_inner() }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!first.is_finished(), "rank 0's reply waits for rank 1's digest");
        let second = service.report_step(report(&ids[1], 4, "bbbb")).await.unwrap().into_inner();
        let first = tokio::time::timeout(Duration::from_secs(5), first).await.expect("answered").unwrap();
        for reply in [&first, &second] {
            assert_eq!((reply.resync_from_rank, reply.drifted_ranks.clone()), (Some(0), vec![1]));
        }
        assert_eq!((service.progress().replica_checks, service.progress().replica_drifts), (1, 1));
        // Reports without a digest are answered at once and carry no order.
        let plain = service.report_step(report(&ids[0], 5, "")).await.unwrap().into_inner();
        assert_eq!(plain.resync_from_rank, None);
    }
}
