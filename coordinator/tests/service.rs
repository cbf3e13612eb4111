//! The tonic service called directly, and a real server on 127.0.0.1:0 driven by the client.

use std::path::Path;
use std::time::{Duration, Instant};

use braid_coordinator::commit::{self, CheckpointManifest};
use braid_coordinator::config::JobConfig;
use braid_coordinator::service::CoordinatorService;
use braid_coordinator::state::Coordinator;
use braid_coordinator::{store, CoordinatorClient, Error};
use braid_proto::coordinator_server::Coordinator as _;
use braid_proto::{
    CheckpointPart, CheckpointVote, DataPlanRequest, Header, JoinRequest, PublishBootstrapRequest, RendezvousRequest,
    RendezvousState, StepReport, PROTOCOL_VERSION,
};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic::Request;

const JOB: &str = "svc-job";

fn job(data: &Path, ckpt: &Path, keep: usize) -> JobConfig {
    let text = format!(
        "[job]\nname = \"{JOB}\"\nseed = 3\n[data]\ntrain = \"{}\"\n[train]\nglobal_batch = 4\nsteps = 6\n\
         [cluster]\nmin_workers = 2\nmax_workers = 2\nheartbeat_timeout_s = 30\nrendezvous_grace_s = 1\n\
         [checkpoint]\nurl = \"{}\"\nevery_steps = 3\nkeep = {keep}\n",
        data.display(),
        ckpt.display()
    );
    let c = JobConfig::parse(&text, "test").unwrap();
    c.validate("test").unwrap();
    c
}

/// A dataset manifest of 3 shards x 4 samples, written by hand.
fn write_dataset(dir: &Path) -> std::path::PathBuf {
    let shards: Vec<String> = (0..3)
        .map(|i| {
            let samples: Vec<String> = (0..4)
                .map(|j| {
                    format!(
                        r#"{{"key": "s{i}-{j}", "members": {{"jpg": [{}, 100], "txt": [{}, 10]}}}}"#,
                        j * 512,
                        j * 512 + 100
                    )
                })
                .collect();
            format!(r#"{{"url": "shard-{i:06}.tar", "size": 2048, "samples": [{}]}}"#, samples.join(", "))
        })
        .collect();
    let path = dir.join("manifest.json");
    std::fs::write(&path, format!(r#"{{"version": 1, "shards": [{}]}}"#, shards.join(", "))).unwrap();
    path
}

fn header(worker: &str) -> Option<Header> {
    Some(Header { job_id: JOB.into(), protocol_version: PROTOCOL_VERSION, worker_id: worker.into() })
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Writes rank `rank`'s part of a checkpoint attempt and returns its vote.
fn write_part(ckpt: &Path, generation: u64, step: u64, attempt: &str, rank: u32) -> CheckpointVote {
    let rel = format!("step-{step:06}/attempt-{attempt}/rank-{rank}.safetensors");
    let path = ckpt.join(&rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let data = vec![rank as u8; 64 + rank as usize];
    std::fs::write(&path, &data).unwrap();
    CheckpointVote {
        header: None,
        generation,
        step,
        attempt: attempt.into(),
        rank,
        ok: true,
        error: String::new(),
        parts: vec![CheckpointPart { path: rel, sha256: sha256_hex(&data), size: data.len() as u64 }],
        write_seconds: 0.25,
    }
}

#[tokio::test]
async fn service_commits_manifests_moves_latest_and_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let config = job(&dir.path().join("unused.json"), &ckpt, 1);
    let root = store::open(ckpt.to_str().unwrap()).unwrap();
    let svc = CoordinatorService::new(Coordinator::new(config, Instant::now(), "abcd"), Some(root));

    let mut ids = Vec::new();
    for host in ["a", "b"] {
        let req = JoinRequest { header: header(""), hostname: host.into(), device: "cpu".into(), pid: 7 };
        ids.push(svc.join(Request::new(req)).await.unwrap().into_inner().worker_id);
    }
    for id in &ids {
        let req = RendezvousRequest { header: header(id), endpoint: format!("{id}:1"), held_step: None };
        svc.rendezvous(Request::new(req)).await.unwrap();
    }
    let req = RendezvousRequest { header: header(&ids[0]), endpoint: "x".into(), held_step: None };
    let r = svc.rendezvous(Request::new(req)).await.unwrap().into_inner();
    assert_eq!((r.state, r.generation, r.rank), (RendezvousState::Ready as i32, 1, 0));

    let wrong = JoinRequest {
        header: Some(Header { job_id: JOB.into(), protocol_version: 99, worker_id: String::new() }),
        ..Default::default()
    };
    let status = svc.join(Request::new(wrong)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("protocol version"), "{}", status.message());

    // Step 2: both ranks vote yes; the final voter's reply carries the manifest.
    let mut vote = write_part(&ckpt, 1, 2, "g1-abcd-2", 1);
    vote.header = header(&ids[1]);
    let early = svc.commit_checkpoint(Request::new(vote)).await.unwrap().into_inner();
    assert!(!early.committed);
    let mut vote = write_part(&ckpt, 1, 2, "g1-abcd-2", 0);
    vote.header = header(&ids[0]);
    let last = svc.commit_checkpoint(Request::new(vote)).await.unwrap().into_inner();
    assert!(last.committed);
    assert_eq!(last.manifest_url, format!("{}/step-000002/manifest.json", ckpt.display()));
    let manifest: CheckpointManifest =
        commit::parse_manifest(&std::fs::read(ckpt.join("step-000002/manifest.json")).unwrap(), "test").unwrap();
    assert_eq!((manifest.step, manifest.world_size, manifest.generation, manifest.job.as_str()), (2, 2, 1, JOB));
    assert_eq!(manifest.parts.len(), 2);
    assert_eq!((manifest.parts[1].rank, manifest.parts[1].size), (1, 65));
    assert!(manifest.committed_at.ends_with('Z'));
    assert_eq!(std::fs::read_to_string(ckpt.join("latest")).unwrap(), "step-000002/manifest.json");

    // A part whose size disagrees with the vote aborts the commit.
    let mut vote = write_part(&ckpt, 1, 4, "bad", 0);
    vote.header = header(&ids[0]);
    vote.parts[0].size += 1;
    svc.commit_checkpoint(Request::new(vote)).await.unwrap();
    let mut vote = write_part(&ckpt, 1, 4, "bad", 1);
    vote.header = header(&ids[1]);
    let status = svc.commit_checkpoint(Request::new(vote)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(status.message().contains("bytes in the store"), "{}", status.message());
    assert!(!ckpt.join("step-000004/manifest.json").exists());

    // Step 5 commits; keep = 1 deletes step 2.
    for rank in [0u32, 1] {
        let mut vote = write_part(&ckpt, 1, 5, "good", rank);
        vote.header = header(&ids[rank as usize]);
        svc.commit_checkpoint(Request::new(vote)).await.unwrap();
    }
    assert_eq!(std::fs::read_to_string(ckpt.join("latest")).unwrap(), "step-000005/manifest.json");
    assert!(!ckpt.join("step-000002").exists(), "retention deleted the older checkpoint");
    assert!(!ckpt.join("step-000004").exists(), "and the aborted attempt before the kept one");
    let p = svc.progress();
    assert_eq!(p.checkpoints.iter().map(|c| c.step).collect::<Vec<_>>(), vec![2, 5]);

    let dp = svc
        .data_plan(Request::new(DataPlanRequest { header: header(&ids[1]), generation: 1 }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dp.start_step, 6);
    assert!(dp.resume_manifest_url.ends_with("step-000005/manifest.json"));
    assert!(!svc.ended().is_cancelled(), "the last checkpoint alone does not finish the job: no rank reported step 5");
}

#[tokio::test]
async fn a_real_server_runs_a_job_with_two_clients() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_dataset(dir.path());
    let ckpt = dir.path().join("ckpt");
    let config = job(&data, &ckpt, 3);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let handle = braid_coordinator::start(config.clone(), listener, shutdown.clone()).await.unwrap();
    let addr = handle.local_addr().to_string();
    let health = health_of(&addr);
    assert_eq!(health.await, [ServingStatus::Serving, ServingStatus::Serving], "a running job is ready");

    // Protocol mismatch, refused with a message that says so.
    let mut raw = braid_proto::coordinator_client::CoordinatorClient::connect(format!("http://{addr}")).await.unwrap();
    let wrong = JoinRequest {
        header: Some(Header { job_id: JOB.into(), protocol_version: PROTOCOL_VERSION + 1, worker_id: String::new() }),
        ..Default::default()
    };
    let status = raw.join(wrong).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let err = Error::Rpc { rpc: "Join", code: status.code(), message: status.message().to_string() };
    assert!(err.to_string().contains("protocol version"), "{err}");

    // An oversized message is refused before it is decoded, and changes nothing.
    let huge = JoinRequest {
        header: Some(Header { job_id: JOB.into(), protocol_version: PROTOCOL_VERSION, worker_id: String::new() }),
        hostname: "h".repeat(braid_coordinator::server::MAX_MESSAGE_BYTES + 1),
        ..Default::default()
    };
    let status = raw.join(huge).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("message length too large"), "{}", status.message());
    assert!(handle.progress().members.is_empty(), "the oversized join registered a worker");

    let wrong_job = CoordinatorClient::connect(&addr, "another-job", Duration::from_secs(5)).await.unwrap();
    let err = wrong_job.join("h", "cpu", 1).await.unwrap_err().to_string();
    assert!(err.contains("job id mismatch") && err.contains("another-job"), "{err}");

    let a = CoordinatorClient::connect(&addr, "", Duration::from_secs(5)).await.unwrap();
    let b = CoordinatorClient::connect(&format!("http://{addr}"), JOB, Duration::from_secs(5)).await.unwrap();
    let joined = a.join("host-a", "cpu", 1).await.unwrap();
    assert_eq!(JobConfig::parse(&joined.job_toml, "join").unwrap(), config);
    b.join("host-b", "cpu", 2).await.unwrap();
    assert_eq!(a.worker_id().as_deref(), Some("w-1"));
    assert_eq!(a.job_id(), JOB, "an empty job id is adopted from the join reply");

    let poll = Duration::from_millis(20);
    let wait = Duration::from_secs(10);
    let b2 = b.clone();
    let rank1 = tokio::spawn(async move { b2.wait_for_generation("127.0.0.1:5001", poll, wait).await });
    let r0 = a.wait_for_generation("127.0.0.1:5000", poll, wait).await.unwrap();
    assert_eq!((r0.generation, r0.rank, r0.world_size), (1, 0, 2));
    assert_eq!(r0.endpoints, vec!["127.0.0.1:5000", "127.0.0.1:5001"]);
    a.publish_bootstrap(r0.generation, b"ring:127.0.0.1:5000".to_vec()).await.unwrap();
    let r1 = rank1.await.unwrap().unwrap();
    assert_eq!((r1.rank, r1.bootstrap.as_slice()), (1, &b"ring:127.0.0.1:5000"[..]));

    let plans = [a.data_plan(1).await.unwrap(), b.data_plan(1).await.unwrap()];
    for dp in &plans {
        assert_eq!((dp.seed, dp.global_batch, dp.start_step, dp.total_steps, dp.epoch), (3, 4, 0, 6, 0));
        assert_eq!(dp.manifest_url, data.display().to_string());
        assert!(!dp.prefetch_shards.is_empty() && dp.prefetch_shards.iter().all(|&s| s < 3));
        assert!(dp.attempt_prefix.starts_with("g1-"));
        assert!(dp.resume_manifest_url.is_empty());
    }
    let prefix = plans[0].attempt_prefix.clone();

    let report = |step| StepReport {
        generation: 1,
        step,
        loss: 2.0,
        learning_rate: 1e-3,
        samples: 2,
        step_seconds: 0.1,
        ..Default::default()
    };
    for step in 0..3 {
        assert!(!a.report_step(report(step)).await.unwrap().stop);
        b.report_step(report(step)).await.unwrap();
    }
    let attempt = format!("{prefix}-2");
    let mut replicated = write_part(&ckpt, 1, 2, &attempt, 1);
    replicated.parts.clear();
    assert!(!b.commit_checkpoint(replicated).await.unwrap().committed, "rank 1's state lives in rank 0's part");
    let reply = a.commit_checkpoint(write_part(&ckpt, 1, 2, &attempt, 0)).await.unwrap();
    assert!(reply.committed);
    assert!(reply.manifest_url.ends_with("/step-000002/manifest.json"));
    assert!(ckpt.join("step-000002/manifest.json").is_file());
    assert_eq!(std::fs::read_to_string(ckpt.join("latest")).unwrap(), "step-000002/manifest.json");

    // A second coordinator on the same checkpoint root is refused while this one holds the
    // job's lease, naming the holder.
    let refused = braid_coordinator::start(
        config.clone(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(refused.contains("holds job \"svc-job\"'s lease") && refused.contains(&std::process::id().to_string()), "{refused}");

    assert!(!a.report_corrupt("shard-000001.tar", "s1-2", "truncated jpeg").await.unwrap().over_limit);
    for step in 3..6 {
        a.report_step(report(step)).await.unwrap();
        b.report_step(report(step)).await.unwrap();
    }
    let p = handle.progress();
    assert!(!p.finished, "the final checkpoint is not committed yet");
    assert_eq!((p.steps_done, p.generation, p.world_size, p.corrupt_samples), (6, 1, 2, 1));
    let attempt = format!("{prefix}-5");
    b.commit_checkpoint(write_part(&ckpt, 1, 5, &attempt, 1)).await.unwrap();
    assert!(a.commit_checkpoint(write_part(&ckpt, 1, 5, &attempt, 0)).await.unwrap().committed);
    tokio::time::timeout(Duration::from_secs(5), handle.ended()).await.expect("the job ends");
    let p = handle.progress();
    assert!(p.finished && p.failure.is_none(), "{p:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while health_of(&addr).await != [ServingStatus::NotServing, ServingStatus::NotServing] {
        assert!(Instant::now() < deadline, "a finished job still reports SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(a.heartbeat(5).await.unwrap().job_finished);
    assert_eq!(b.rendezvous("x").await.unwrap().state, RendezvousState::JobFinished as i32);
    a.leave("done").await.unwrap();
    b.leave("done").await.unwrap();
    assert!(handle.drained(Duration::from_secs(1)).await);

    // Publishing for a generation that is not the worker's is refused with ABORTED.
    let status = raw
        .publish_bootstrap(PublishBootstrapRequest { header: header("w-1"), generation: 1, bootstrap: vec![1] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "w-1 left");

    shutdown.cancel();
    handle.join().await.unwrap();

    // Stopping released the lease: a new launch on the same root starts at once and resumes
    // from the newest committed checkpoint.
    let next = braid_coordinator::server::start_with(
        config.clone(),
        braid_coordinator::server::Takeover::Launch,
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let resumed = next.progress();
    assert_eq!(resumed.checkpoints.last().map(|c| c.step), Some(5), "{resumed:?}");
    next.shutdown();
    next.join().await.unwrap();
}

/// gRPC health of the whole server and of the coordinator service, as a probe asks for them.
async fn health_of(addr: &str) -> [ServingStatus; 2] {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("a channel");
    let mut client = HealthClient::new(channel);
    let mut out = [ServingStatus::Unknown; 2];
    for (slot, service) in out.iter_mut().zip(["", braid_coordinator::server::COORDINATOR_SERVICE]) {
        let reply = client.check(HealthCheckRequest { service: service.into() }).await.expect("health check");
        *slot = ServingStatus::try_from(reply.into_inner().status).expect("a serving status");
    }
    out
}

#[tokio::test]
async fn an_unreachable_coordinator_is_named_in_the_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = CoordinatorClient::connect(&addr, JOB, Duration::from_millis(300)).await.unwrap_err().to_string();
    assert!(err.starts_with(&format!("cannot reach coordinator at {addr}: ")), "{err}");
}

#[tokio::test]
async fn a_missing_dataset_manifest_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = job(&dir.path().join("nope.json"), &dir.path().join("ckpt"), 1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = braid_coordinator::start(config, listener, CancellationToken::new()).await.unwrap_err().to_string();
    assert!(err.contains("nope.json"), "{err}");
}
