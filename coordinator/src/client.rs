//! The worker's side of the protocol: connects with backoff, fills the header of every
//! request (job id, protocol version, worker id once joined) and turns refusals into
//! [`Error::Rpc`] with the coordinator's message.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use braid_proto::coordinator_client::CoordinatorClient as RpcClient;
use braid_proto::{
    CheckpointVote, CheckpointVoteReply, CorruptReply, CorruptReport, DataPlanReply, DataPlanRequest, Header,
    HeartbeatReply, HeartbeatRequest, JoinReply, JoinRequest, CheckpointRequest, LeaveRequest, PublishBootstrapRequest, RendezvousReply,
    RendezvousRequest, RendezvousState, StatusRequest, StepReply, StepReport, PROTOCOL_VERSION,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};
use crate::security::{BearerToken, ClientSecurity};

/// Default bound on each RPC.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to the coordinator on behalf of one worker. Cheap to clone; clones share the
/// connection and the worker id.
#[derive(Debug, Clone)]
pub struct CoordinatorClient {
    rpc: RpcClient<InterceptedService<Channel, BearerToken>>,
    addr: String,
    job_id: Arc<Mutex<String>>,
    worker_id: Arc<Mutex<String>>,
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// `[job] name` of a job file.
fn job_name(job_toml: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(job_toml).ok()?;
    table.get("job")?.get("name")?.as_str().map(str::to_string)
}

fn refused(rpc: &'static str, status: tonic::Status) -> Error {
    // A transport failure (a reset connection, a failed TLS handshake) says what went wrong
    // only in its sources.
    let message = match std::error::Error::source(&status) {
        Some(source) => format!("{}: {}", status.message(), chain(source)),
        None => status.message().to_string(),
    };
    Error::Rpc { rpc, code: status.code(), message }
}

impl CoordinatorClient {
    /// Connects to the coordinator at `addr` (`host:port` or `http://host:port`) for job
    /// `job_id`, retrying with backoff until `timeout` has passed. An empty `job_id` joins
    /// whatever job the coordinator runs and adopts its id from the join reply.
    pub async fn connect(addr: &str, job_id: &str, timeout: Duration) -> Result<Self> {
        Self::connect_with(addr, job_id, timeout, DEFAULT_RPC_TIMEOUT, &ClientSecurity::default()).await
    }

    /// [`CoordinatorClient::connect`] to a coordinator that asks for a token or TLS: every call
    /// carries `security`'s token, over TLS when it has TLS settings (a bare `host:port` then
    /// means `https://host:port`).
    pub async fn connect_secured(addr: &str, job_id: &str, timeout: Duration, security: &ClientSecurity) -> Result<Self> {
        Self::connect_with(addr, job_id, timeout, DEFAULT_RPC_TIMEOUT, security).await
    }

    /// [`CoordinatorClient::connect_secured`] with a bound on each RPC.
    pub async fn connect_with(
        addr: &str,
        job_id: &str,
        timeout: Duration,
        rpc_timeout: Duration,
        security: &ClientSecurity,
    ) -> Result<Self> {
        let scheme = if security.tls.is_some() { "https" } else { "http" };
        let uri = if addr.contains("://") { addr.to_string() } else { format!("{scheme}://{addr}") };
        let unreachable = |reason: String| Error::Unreachable { addr: addr.to_string(), reason };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| unreachable(format!("not a valid address: {}", chain(&e))))?
            .connect_timeout(timeout.clamp(Duration::from_millis(100), Duration::from_secs(10)))
            .timeout(rpc_timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &security.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Error::Security(format!("TLS settings for {addr}: {}", chain(&e))))?;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(50);
        let channel = loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(e) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Err(unreachable(format!(
                            "{} (gave up after {:.1} s)",
                            chain(&e),
                            timeout.as_secs_f64()
                        )));
                    }
                    tracing::debug!("coordinator at {addr} not reachable yet: {}", chain(&e));
                    tokio::time::sleep(backoff.min(deadline - now)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        Ok(Self {
            rpc: RpcClient::with_interceptor(channel, BearerToken::new(security.token.as_ref())),
            addr: addr.to_string(),
            job_id: Arc::new(Mutex::new(job_id.to_string())),
            worker_id: Arc::new(Mutex::new(String::new())),
        })
    }

    /// The coordinator's address as given to `connect`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The worker id the coordinator assigned, once joined.
    pub fn worker_id(&self) -> Option<String> {
        let id = self.worker_id.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (!id.is_empty()).then_some(id)
    }

    /// The job id every request carries (empty before joining when none was given).
    pub fn job_id(&self) -> String {
        self.job_id.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The header every request carries.
    pub fn header(&self) -> Header {
        Header {
            job_id: self.job_id(),
            protocol_version: PROTOCOL_VERSION,
            worker_id: self.worker_id.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// `Join`: registers this worker; later calls carry the assigned worker id.
    pub async fn join(&self, hostname: &str, device: &str, pid: u32) -> Result<JoinReply> {
        let req = JoinRequest { header: Some(self.header()), hostname: hostname.into(), device: device.into(), pid };
        let reply = self.rpc.clone().join(req).await.map_err(|s| refused("Join", s))?.into_inner();
        *self.worker_id.lock().unwrap_or_else(|p| p.into_inner()) = reply.worker_id.clone();
        let mut job_id = self.job_id.lock().unwrap_or_else(|p| p.into_inner());
        if job_id.is_empty() {
            *job_id = job_name(&reply.job_toml).ok_or_else(|| Error::Rpc {
                rpc: "Join",
                code: tonic::Code::Internal,
                message: "the join reply's job file has no [job] name".into(),
            })?;
        }
        drop(job_id);
        Ok(reply)
    }

    /// `Heartbeat` with the latest completed step.
    pub async fn heartbeat(&self, step: u64) -> Result<HeartbeatReply> {
        let req = HeartbeatRequest { header: Some(self.header()), step };
        Ok(self.rpc.clone().heartbeat(req).await.map_err(|s| refused("Heartbeat", s))?.into_inner())
    }

    /// One `Rendezvous` poll; `endpoint` is where this worker's ring engine listens.
    pub async fn rendezvous(&self, endpoint: &str) -> Result<RendezvousReply> {
        self.rendezvous_holding(endpoint, None).await
    }

    /// `Rendezvous` from a worker whose in-memory state holds the update of `held_step`.
    pub async fn rendezvous_holding(&self, endpoint: &str, held_step: Option<u64>) -> Result<RendezvousReply> {
        let req = RendezvousRequest { header: Some(self.header()), endpoint: endpoint.into(), held_step };
        Ok(self.rpc.clone().rendezvous(req).await.map_err(|s| refused("Rendezvous", s))?.into_inner())
    }

    /// Polls `Rendezvous` every `poll` until this worker is a rank of a generation, for at
    /// most `timeout`. Rank 0 gets the reply as soon as the generation forms (it publishes the
    /// bootstrap); other ranks once rank 0 has published it. A finished job returns its
    /// `JOB_FINISHED` reply.
    pub async fn wait_for_generation(
        &self,
        endpoint: &str,
        poll: Duration,
        timeout: Duration,
    ) -> Result<RendezvousReply> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let reply = self.rendezvous(endpoint).await?;
            let state = RendezvousState::try_from(reply.state).unwrap_or(RendezvousState::Unspecified);
            match state {
                RendezvousState::JobFinished => return Ok(reply),
                RendezvousState::Ready if reply.rank == 0 || !reply.bootstrap.is_empty() => return Ok(reply),
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "no generation ready after {:.1} s of rendezvous with {}: {}",
                    timeout.as_secs_f64(),
                    self.addr,
                    reply.reason
                )));
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// `PublishBootstrap` (rank 0 only).
    pub async fn publish_bootstrap(&self, generation: u64, bootstrap: Vec<u8>) -> Result<()> {
        let req = PublishBootstrapRequest { header: Some(self.header()), generation, bootstrap };
        self.rpc.clone().publish_bootstrap(req).await.map_err(|s| refused("PublishBootstrap", s))?;
        Ok(())
    }

    /// `DataPlan` for this worker's rank in `generation`. Call it once the collective is up:
    /// after it, a `Rendezvous` from this worker asks for a new generation.
    pub async fn data_plan(&self, generation: u64) -> Result<DataPlanReply> {
        let req = DataPlanRequest { header: Some(self.header()), generation };
        Ok(self.rpc.clone().data_plan(req).await.map_err(|s| refused("DataPlan", s))?.into_inner())
    }

    /// `ReportStep`; the header is filled in.
    pub async fn report_step(&self, mut report: StepReport) -> Result<StepReply> {
        report.header = Some(self.header());
        Ok(self.rpc.clone().report_step(report).await.map_err(|s| refused("ReportStep", s))?.into_inner())
    }

    /// `CommitCheckpoint`; the header is filled in.
    pub async fn commit_checkpoint(&self, mut vote: CheckpointVote) -> Result<CheckpointVoteReply> {
        vote.header = Some(self.header());
        Ok(self.rpc.clone().commit_checkpoint(vote).await.map_err(|s| refused("CommitCheckpoint", s))?.into_inner())
    }

    /// `ReportCorrupt` for a sample (`sample_key`) or a whole shard (empty key).
    pub async fn report_corrupt(&self, shard: &str, sample_key: &str, reason: &str) -> Result<CorruptReply> {
        let req = CorruptReport {
            header: Some(self.header()),
            shard: shard.into(),
            sample_key: sample_key.into(),
            reason: reason.into(),
        };
        Ok(self.rpc.clone().report_corrupt(req).await.map_err(|s| refused("ReportCorrupt", s))?.into_inner())
    }

    /// `Leave`: this worker is done.
    pub async fn leave(&self, reason: &str) -> Result<()> {
        let req = LeaveRequest { header: Some(self.header()), reason: reason.into() };
        self.rpc.clone().leave(req).await.map_err(|s| refused("Leave", s))?;
        Ok(())
    }

    /// `RequestCheckpoint`: a checkpoint at the next common step, then a stop if `stop_after`.
    /// Returns the step once the coordinator has fixed it.
    pub async fn request_checkpoint(&self, reason: &str, stop_after: bool) -> Result<Option<u64>> {
        let req = CheckpointRequest { header: Some(self.header()), reason: reason.into(), stop_after };
        let reply = self.rpc.clone().request_checkpoint(req).await.map_err(|s| refused("RequestCheckpoint", s))?;
        Ok(reply.into_inner().step)
    }

    /// The job's progress as JSON (what `GET /status` serves).
    pub async fn status_json(&self) -> Result<String> {
        let req = StatusRequest { header: Some(self.header()) };
        let reply = self.rpc.clone().status(req).await.map_err(|s| refused("Status", s))?;
        Ok(reply.into_inner().progress_json)
    }
}
