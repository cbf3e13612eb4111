//! The coordinator's state machine driven by a hand-moved clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_coordinator::config::JobConfig;
use braid_coordinator::manifest::{DatasetManifest, SampleEntry, ShardEntry, MANIFEST_VERSION};
use braid_coordinator::state::{Action, CommitPlan, CommittedCheckpoint, Coordinator, MemberState, StateCheck};
use braid_coordinator::Error;
use braid_proto::{
    CheckpointPart, CheckpointVote, CorruptReport, DataPlanRequest, Header, HeartbeatRequest, JoinRequest,
    LeaveRequest, PublishBootstrapRequest, RendezvousReply, RendezvousRequest, RendezvousState, StepReport,
    PROTOCOL_VERSION,
};

const JOB: &str = "test-job";

fn config(min: usize, max: usize, extra: &str) -> JobConfig {
    let text = format!(
        "[job]\nname = \"{JOB}\"\nseed = 7\n[data]\ntrain = \"/data/manifest.json\"\nmax_corrupt_samples = 2\n\
         [train]\nglobal_batch = 8\nsteps = 10\n\
         [cluster]\nmin_workers = {min}\nmax_workers = {max}\nheartbeat_timeout_s = 30\nrendezvous_grace_s = 5\n{extra}"
    );
    let c = JobConfig::parse(&text, "test").unwrap();
    c.validate("test").unwrap();
    c
}

fn with_checkpoints(min: usize, max: usize) -> JobConfig {
    let mut c = config(min, max, "");
    c.checkpoint.url = Some("/ckpt".into());
    c
}

fn header(worker: &str) -> Option<Header> {
    Some(Header { job_id: JOB.into(), protocol_version: PROTOCOL_VERSION, worker_id: worker.into() })
}

struct Sim {
    c: Coordinator,
    t0: Instant,
}

impl Sim {
    fn new(config: JobConfig) -> Self {
        let t0 = Instant::now();
        Self { c: Coordinator::new(config, t0, "n0nce"), t0 }
    }

    fn at(&self, secs: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(secs)
    }

    fn join(&mut self, t: f64, host: &str) -> String {
        let req = JoinRequest { header: header(""), hostname: host.into(), device: "cpu".into(), pid: 1 };
        self.c.join(self.at(t), &req).unwrap().worker_id
    }

    fn rdv(&mut self, t: f64, id: &str) -> RendezvousReply {
        self.rdv_holding(t, id, None)
    }

    /// Rendezvous of a worker whose in-memory state holds the update of `held` (if any).
    fn rdv_holding(&mut self, t: f64, id: &str, held: Option<u64>) -> RendezvousReply {
        let req = RendezvousRequest { header: header(id), endpoint: format!("{id}.local:9000"), held_step: held };
        self.c.rendezvous(self.at(t), &req).unwrap()
    }

    /// A step report with the given step time and time waiting in collectives.
    fn step_timed(
        &mut self,
        t: f64,
        id: &str,
        generation: u64,
        step: u64,
        seconds: f64,
        wait: f64,
    ) -> braid_proto::StepReply {
        let req = StepReport {
            header: header(id),
            generation,
            step,
            loss: 1.5,
            learning_rate: 1e-3,
            samples: 4,
            step_seconds: seconds,
            collective_wait_seconds: wait,
            ..Default::default()
        };
        self.c.report_step(self.at(t), &req).unwrap()
    }

    /// Every rank of `generation` fetches its plan, then reports steps `steps` in turn.
    fn train(&mut self, t: f64, ids: &[String], generation: u64, steps: std::ops::Range<u64>) {
        for id in ids {
            self.plan(t, id, generation);
        }
        for step in steps {
            for id in ids {
                self.step(t, id, generation, step);
            }
        }
    }

    /// Has every rank of `generation` vote for `step` and commits it.
    fn checkpoint(&mut self, t: f64, ids: &[String], generation: u64, step: u64) {
        for (rank, id) in ids.iter().enumerate() {
            let vote = CheckpointVote {
                header: header(id),
                generation,
                step,
                attempt: format!("c{step}"),
                rank: rank as u32,
                ok: true,
                parts: vec![CheckpointPart {
                    path: format!("step-{step:06}/attempt-c{step}/rank-{rank}.safetensors"),
                    sha256: "00".repeat(32),
                    size: 1,
                }],
                ..Default::default()
            };
            self.c.checkpoint_vote(self.at(t), &vote).unwrap();
        }
        let plan = self.commits().remove(0);
        self.c.commit_succeeded(self.at(t), &plan, format!("/ckpt/step-{step:06}/manifest.json"));
    }

    fn logs(&mut self) -> Vec<String> {
        self.c
            .take_actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::Log { message, .. } => Some(message),
                Action::Commit(_) => None,
            })
            .collect()
    }

    fn beat(&mut self, t: f64, id: &str) -> braid_proto::HeartbeatReply {
        self.c.heartbeat(self.at(t), &HeartbeatRequest { header: header(id), step: 0 }).unwrap()
    }

    fn plan(&mut self, t: f64, id: &str, generation: u64) -> braid_proto::DataPlanReply {
        self.c.data_plan(self.at(t), &DataPlanRequest { header: header(id), generation }).unwrap()
    }

    fn step(&mut self, t: f64, id: &str, generation: u64, step: u64) -> braid_proto::StepReply {
        self.step_timed(t, id, generation, step, 0.5, 0.0)
    }

    fn vote(&mut self, t: f64, id: &str, rank: u32, step: u64, attempt: &str, ok: bool) -> Result<bool, Error> {
        let vote = CheckpointVote {
            header: header(id),
            generation: 1,
            step,
            attempt: attempt.into(),
            rank,
            ok,
            error: if ok { String::new() } else { "disk full".into() },
            parts: vec![CheckpointPart {
                path: format!("step-{step:06}/attempt-{attempt}/rank-{rank}.safetensors"),
                sha256: "00".repeat(32),
                size: 100 + u64::from(rank),
            }],
            write_seconds: 0.5 + f64::from(rank),
        };
        self.c.checkpoint_vote(self.at(t), &vote).map(|r| r.committed)
    }

    fn commits(&mut self) -> Vec<CommitPlan> {
        self.c
            .take_actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::Commit(p) => Some(p),
                Action::Log { .. } => None,
            })
            .collect()
    }

    /// Joins `n` workers at `t`, has them rendezvous and ticks past the grace so they form a generation.
    fn formed(&mut self, t: f64, n: usize) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|i| self.join(t, &format!("host{i}"))).collect();
        for id in &ids {
            self.rdv(t, id);
        }
        self.c.tick(self.at(t + 5.0));
        ids
    }
}

fn ready(r: &RendezvousReply) -> bool {
    r.state == RendezvousState::Ready as i32
}

#[test]
fn header_mismatches_are_refused() {
    let mut s = Sim::new(config(1, 1, ""));
    let wrong_job = JoinRequest {
        header: Some(Header { job_id: "other".into(), protocol_version: PROTOCOL_VERSION, worker_id: String::new() }),
        ..Default::default()
    };
    let err = s.c.join(s.at(0.0), &wrong_job).unwrap_err();
    assert!(matches!(err, Error::JobMismatch { .. }), "{err}");
    assert!(err.to_string().contains("\"other\"") && err.to_string().contains(JOB), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::FailedPrecondition);

    let wrong_version = JoinRequest {
        header: Some(Header { job_id: JOB.into(), protocol_version: PROTOCOL_VERSION + 1, worker_id: String::new() }),
        ..Default::default()
    };
    let err = s.c.join(s.at(0.0), &wrong_version).unwrap_err();
    assert!(matches!(err, Error::ProtocolMismatch { .. }), "{err}");
    assert!(err.to_string().contains("protocol version"), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::FailedPrecondition);

    let any_job = JoinRequest {
        header: Some(Header { job_id: String::new(), protocol_version: PROTOCOL_VERSION, worker_id: String::new() }),
        ..Default::default()
    };
    assert_eq!(s.c.join(s.at(0.0), &any_job).unwrap().worker_id, "w-1", "Join may leave the job id empty");
    let no_job =
        HeartbeatRequest { header: any_job.header.clone().map(|h| Header { worker_id: "w-1".into(), ..h }), step: 0 };
    assert!(matches!(s.c.heartbeat(s.at(0.0), &no_job).unwrap_err(), Error::JobMismatch { .. }));

    let err = s.c.join(s.at(0.0), &JoinRequest::default()).unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::InvalidArgument);

    let err = s.c.heartbeat(s.at(0.0), &HeartbeatRequest { header: header("w-99"), step: 0 }).unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::NotFound);
}

#[test]
fn join_assigns_ids_and_returns_the_job() {
    let mut s = Sim::new(config(1, 1, ""));
    let req = JoinRequest { header: header(""), hostname: "h".into(), device: "cpu".into(), pid: 1 };
    let a = s.c.join(s.at(0.0), &req).unwrap();
    let b = s.c.join(s.at(0.0), &req).unwrap();
    assert_eq!((a.worker_id.as_str(), b.worker_id.as_str()), ("w-1", "w-2"));
    let job = JobConfig::parse(&a.job_toml, "join reply").unwrap();
    assert_eq!(&job, s.c.config());
    assert_eq!(a.heartbeat_interval_ms, 5000);
}

#[test]
fn a_generation_forms_at_max_workers_with_ranks_in_join_order() {
    let mut s = Sim::new(config(1, 2, ""));
    let a = s.join(0.0, "a");
    let b = s.join(0.1, "b");
    let rb = s.rdv(0.2, &b);
    assert!(!ready(&rb), "one worker waits for the grace: {}", rb.reason);
    assert!(rb.reason.contains("forming in"), "{}", rb.reason);
    let ra = s.rdv(0.3, &a);
    assert!(ready(&ra), "max_workers reached: {ra:?}");
    assert_eq!((ra.generation, ra.rank, ra.world_size), (1, 0, 2));
    let rb = s.rdv(0.4, &b);
    assert_eq!((rb.generation, rb.rank, rb.world_size), (1, 1, 2));
    assert_eq!(ra.endpoints, vec![format!("{a}.local:9000"), format!("{b}.local:9000")]);
    assert_eq!(rb.endpoints, ra.endpoints);
}

#[test]
fn min_workers_and_grace_decide_when_a_smaller_generation_forms() {
    let mut s = Sim::new(config(2, 4, ""));
    let a = s.join(0.0, "a");
    let r = s.rdv(0.0, &a);
    assert_eq!(r.state, RendezvousState::Waiting as i32);
    assert!(r.reason.contains("1 of min_workers = 2"), "{}", r.reason);
    s.c.tick(s.at(25.0));
    assert!(!ready(&s.rdv(25.0, &a)), "below min_workers nothing forms, however long");

    // Grace counts from the first waiting worker's arrival: long over when the second comes.
    let b = s.join(26.0, "b");
    let r = s.rdv(26.0, &b);
    assert!(ready(&r), "{}", r.reason);
    assert_eq!((r.generation, r.rank, r.world_size), (1, 1, 2));

    let mut s2 = Sim::new(config(2, 4, ""));
    let x = s2.join(0.0, "x");
    let y = s2.join(0.0, "y");
    s2.rdv(0.0, &x);
    s2.rdv(1.0, &y);
    s2.c.tick(s2.at(4.9));
    assert_eq!(s2.c.progress().generation, 0, "grace of 5 s not over");
    s2.c.tick(s2.at(5.0));
    let p = s2.c.progress();
    assert_eq!((p.generation, p.world_size), (1, 2));
    assert_eq!(s2.rdv(5.1, &y).rank, 1);
}

#[test]
fn a_late_worker_scales_the_job_up_after_the_grace() {
    let mut s = Sim::new(config(1, 4, ""));
    let ids = s.formed(0.0, 2);
    assert_eq!(s.c.progress().world_size, 2);
    for id in &ids {
        s.plan(5.0, id, 1);
    }
    let late = s.join(10.0, "late");
    let r = s.rdv(10.0, &late);
    assert!(r.reason.contains("generation 1 is running"), "{}", r.reason);
    for id in &ids {
        s.beat(14.0, id);
    }
    s.c.tick(s.at(14.9));
    assert_eq!(s.c.progress().generation, 1);
    s.c.tick(s.at(15.0));
    assert_eq!(s.c.progress().generation, 0, "generation 1 ended for the scale-up");
    assert!(s.beat(15.0, &ids[0]).rendezvous_required);
    for id in &ids {
        assert!(!ready(&s.rdv(16.0, id)), "survivors get a fresh grace");
    }
    s.c.tick(s.at(20.0));
    let r = s.rdv(20.0, &late);
    assert!(ready(&r), "{}", r.reason);
    assert_eq!((r.generation, r.rank, r.world_size), (2, 2, 3));
}

#[test]
fn reaching_max_workers_scales_up_at_once() {
    let mut s = Sim::new(config(1, 3, ""));
    let ids = s.formed(0.0, 2);
    let late = s.join(10.0, "late");
    assert!(!ready(&s.rdv(10.0, &late)));
    assert!(s.beat(10.0, &ids[1]).rendezvous_required, "the generation ended at once");
    s.rdv(11.0, &ids[1]);
    let r = s.rdv(11.0, &ids[0]);
    assert_eq!((r.generation, r.rank, r.world_size), (2, 0, 3));
}

#[test]
fn bootstrap_is_returned_once_rank_zero_published_it() {
    let mut s = Sim::new(config(2, 2, ""));
    let ids = s.formed(0.0, 2);
    let r1 = s.rdv(1.0, &ids[1]);
    assert!(ready(&r1) && r1.bootstrap.is_empty());
    assert!(r1.reason.contains("rank 0"), "{}", r1.reason);
    let publish = |id: &str, generation| PublishBootstrapRequest {
        header: header(id),
        generation,
        bootstrap: b"nccl-id".to_vec(),
    };
    let err = s.c.publish_bootstrap(s.at(1.0), &publish(&ids[1], 1)).unwrap_err();
    assert!(err.to_string().contains("only rank 0"), "{err}");
    let err = s.c.publish_bootstrap(s.at(1.0), &publish(&ids[0], 7)).unwrap_err();
    assert!(matches!(err, Error::StaleGeneration { .. }), "{err}");
    s.c.publish_bootstrap(s.at(1.0), &publish(&ids[0], 1)).unwrap();
    let r1 = s.rdv(1.5, &ids[1]);
    assert_eq!(r1.bootstrap, b"nccl-id");
    assert_eq!(s.rdv(1.5, &ids[0]).bootstrap, b"nccl-id");
}

#[test]
fn a_silent_worker_ends_the_generation_and_survivors_form_the_next() {
    let mut s = Sim::new(config(2, 3, ""));
    let ids = s.formed(0.0, 3);
    for id in &ids {
        s.plan(5.0, id, 1);
        s.step(6.0, id, 1, 0);
    }
    // ids[1] goes silent after t = 6; the others keep beating.
    for t in [10.0, 20.0, 30.0] {
        s.beat(t, &ids[0]);
        s.beat(t, &ids[2]);
        s.c.tick(s.at(t));
    }
    assert_eq!(s.c.progress().generation, 1, "30 s of silence is not yet dead");
    s.beat(36.5, &ids[0]);
    s.beat(36.5, &ids[2]);
    s.c.tick(s.at(36.5));
    let p = s.c.progress();
    assert_eq!(p.generation, 0);
    assert_eq!(p.members.len(), 2);
    assert!(p.members.iter().all(|m| m.state == MemberState::RendezvousRequired));
    let logs: Vec<String> =
        s.c.take_actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::Log { message, .. } => Some(message),
                Action::Commit(_) => None,
            })
            .collect();
    assert!(logs.iter().any(|l| l.contains(&ids[1]) && l.contains("declared dead")), "{logs:?}");
    assert!(logs.iter().any(|l| l.contains("generation 1 ended")), "{logs:?}");

    let hb = s.beat(37.0, &ids[0]);
    assert!(hb.rendezvous_required && !hb.job_finished);
    assert!(s.step(37.0, &ids[2], 1, 1).rendezvous_required);
    let err = s.c.heartbeat(s.at(37.0), &HeartbeatRequest { header: header(&ids[1]), step: 0 }).unwrap_err();
    assert!(matches!(err, Error::UnknownWorker(_)), "{err}");

    // Survivors re-rendezvous in reverse order; ranks still follow join order.
    assert!(!ready(&s.rdv(38.0, &ids[2])));
    assert!(!ready(&s.rdv(39.0, &ids[0])), "grace restarts when the generation ends");
    s.c.tick(s.at(42.9));
    assert_eq!(s.c.progress().generation, 0);
    s.c.tick(s.at(43.0));
    let r0 = s.rdv(43.1, &ids[0]);
    let r2 = s.rdv(43.1, &ids[2]);
    assert_eq!((r0.generation, r0.rank, r0.world_size), (2, 0, 2));
    assert_eq!((r2.generation, r2.rank), (2, 1));
    assert_eq!(s.plan(43.2, &ids[0], 2).start_step, 0, "no checkpoint: the new generation starts over");
    let err = s.c.data_plan(s.at(43.2), &DataPlanRequest { header: header(&ids[0]), generation: 1 }).unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Aborted);
}

#[test]
fn rendezvous_after_starting_asks_for_a_new_generation() {
    let mut s = Sim::new(config(2, 2, ""));
    let ids = s.formed(0.0, 2);
    assert!(ready(&s.rdv(1.0, &ids[0])), "polling before the data plan keeps the assignment");
    s.plan(1.0, &ids[0], 1);
    let r = s.rdv(2.0, &ids[0]);
    assert!(!ready(&r), "{r:?}");
    assert!(s.beat(2.0, &ids[1]).rendezvous_required);
    let r = s.rdv(2.5, &ids[1]);
    assert!(ready(&r));
    assert_eq!(r.generation, 2);
}

#[test]
fn leave_ends_the_generation() {
    let mut s = Sim::new(config(1, 2, ""));
    let ids = s.formed(0.0, 2);
    s.c.leave(s.at(1.0), &LeaveRequest { header: header(&ids[1]), reason: "preempted".into() }).unwrap();
    let p = s.c.progress();
    assert_eq!((p.generation, p.members.len()), (0, 1));
    s.rdv(2.0, &ids[0]);
    s.c.tick(s.at(7.0));
    let r = s.rdv(7.0, &ids[0]);
    assert_eq!((r.generation, r.rank, r.world_size), (2, 0, 1));
}

#[test]
fn every_yes_vote_commits_and_moves_the_cursor() {
    let mut s = Sim::new(with_checkpoints(2, 2));
    let ids = s.formed(0.0, 2);
    let dp = s.plan(6.0, &ids[0], 1);
    assert_eq!(dp.attempt_prefix, "g1-n0nce");
    assert_eq!((dp.start_step, dp.total_steps, dp.resume_manifest_url.as_str()), (0, 10, ""));
    s.c.take_actions();
    assert!(!s.vote(7.0, &ids[1], 1, 4, "g1-n0nce-4", true).unwrap());
    assert!(s.commits().is_empty());
    assert!(!s.vote(7.0, &ids[0], 0, 4, "g1-n0nce-4", true).unwrap(), "the shell answers the final voter");
    let plans = s.commits();
    assert_eq!(plans.len(), 1);
    let plan = &plans[0];
    assert_eq!((plan.step, plan.generation, plan.world_size), (4, 1, 2));
    assert_eq!(plan.parts.iter().map(|p| p.rank).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(plan.parts[1].size, 101);
    assert_eq!(plan.job, JOB);

    s.c.commit_succeeded(s.at(0.0), plan, "/ckpt/step-000004/manifest.json".into());
    assert_eq!(s.c.cursor(), 5);
    assert!(s.vote(8.0, &ids[0], 0, 4, "g1-n0nce-4", true).unwrap(), "a late vote sees the commit");
    let dp = s.plan(8.0, &ids[1], 1);
    assert_eq!(
        (dp.start_step, dp.resume_manifest_url.as_str()),
        (0, ""),
        "rank 0 started at step 0: every rank of the generation starts there"
    );
    assert_eq!(s.c.progress().checkpoints.len(), 1);
    let err = s.vote(9.0, &ids[0], 0, 2, "old", true).unwrap_err();
    assert!(err.to_string().contains("older than the latest"), "{err}");
}

#[test]
fn one_no_vote_aborts_the_attempt_and_training_goes_on() {
    let mut s = Sim::new(with_checkpoints(2, 2));
    let ids = s.formed(0.0, 2);
    assert!(!s.vote(7.0, &ids[0], 0, 4, "a1", true).unwrap());
    assert!(!s.vote(7.0, &ids[1], 1, 4, "a1", false).unwrap());
    assert!(s.commits().is_empty());
    assert!(!s.vote(7.5, &ids[0], 0, 4, "a1", true).unwrap(), "an aborted attempt stays aborted");
    assert!(s.commits().is_empty());
    assert!(s.c.progress().failure.is_none());
    assert!(!s.step(8.0, &ids[0], 1, 5).stop);
    // A fresh attempt of the same step can still commit.
    s.vote(9.0, &ids[0], 0, 4, "a2", true).unwrap();
    s.vote(9.0, &ids[1], 1, 4, "a2", true).unwrap();
    assert_eq!(s.commits().len(), 1);
}

#[test]
fn votes_are_checked_against_the_generation_and_rank() {
    let mut s = Sim::new(with_checkpoints(1, 2));
    let ids = s.formed(0.0, 2);
    let err = s.vote(6.0, &ids[0], 1, 4, "a", true).unwrap_err();
    assert!(err.to_string().contains("rank 0"), "{err}");
    s.vote(6.0, &ids[0], 0, 4, "a", true).unwrap();
    s.c.leave(s.at(6.5), &LeaveRequest { header: header(&ids[0]), reason: String::new() }).unwrap();
    let err = s.vote(7.0, &ids[1], 1, 4, "a", true).unwrap_err();
    assert!(matches!(err, Error::StaleGeneration { got: 1, current: None, .. }), "{err}");
    assert!(s.commits().is_empty());

    let mut bad = Sim::new(with_checkpoints(1, 1));
    let id = bad.formed(0.0, 1).remove(0);
    let vote = CheckpointVote {
        header: header(&id),
        generation: 1,
        step: 3,
        attempt: "a".into(),
        rank: 0,
        ok: true,
        parts: vec![CheckpointPart { path: "step-000003/../../etc/passwd".into(), sha256: String::new(), size: 1 }],
        ..Default::default()
    };
    let err = bad.c.checkpoint_vote(bad.at(1.0), &vote).unwrap_err();
    assert!(err.to_string().contains("step-000003/"), "{err}");
    let no_ckpt = &mut Sim::new(config(1, 1, ""));
    let id = no_ckpt.formed(0.0, 1).remove(0);
    let err = no_ckpt.vote(1.0, &id, 0, 3, "a", true).unwrap_err();
    assert!(err.to_string().contains("checkpoint.url"), "{err}");
}

#[test]
fn the_job_finishes_when_every_rank_trained_the_last_step() {
    let mut s = Sim::new(config(2, 2, ""));
    let ids = s.formed(0.0, 2);
    for id in &ids {
        s.plan(5.0, id, 1);
    }
    for step in 0..10 {
        for id in &ids {
            s.step(6.0 + step as f64, id, 1, step);
        }
    }
    let p = s.c.progress();
    assert!(p.finished && p.failure.is_none());
    assert_eq!(p.steps_done, 10);
    assert_eq!(p.loss, Some(1.5));
    // Each rank reports the global batch's samples: the job's throughput is one rank's rate.
    assert_eq!(p.samples_per_second, Some(8.0));
    assert!(s.beat(20.0, &ids[0]).job_finished);
    assert!(s.step(20.0, &ids[0], 1, 9).stop);
    assert_eq!(s.rdv(20.0, &ids[1]).state, RendezvousState::JobFinished as i32);
}

#[test]
fn with_checkpoints_the_job_also_waits_for_the_final_commit() {
    let mut s = Sim::new(with_checkpoints(1, 1));
    let id = s.formed(0.0, 1).remove(0);
    s.plan(5.0, &id, 1);
    assert!(!s.step(6.0, &id, 1, 9).stop);
    assert!(!s.c.progress().finished);
    s.vote(7.0, &id, 0, 9, "last", true).unwrap();
    let plan = s.commits().remove(0);
    s.c.commit_succeeded(s.at(0.0), &plan, "/ckpt/step-000009/manifest.json".into());
    assert!(s.c.progress().finished);
    assert!(s.c.is_over());
}

#[test]
fn an_aborted_final_checkpoint_fails_the_job() {
    let mut s = Sim::new(with_checkpoints(1, 1));
    let id = s.formed(0.0, 1).remove(0);
    s.vote(7.0, &id, 0, 9, "last", true).unwrap();
    let plan = s.commits().remove(0);
    s.c.commit_failed(&plan, "part rank-0 is missing");
    let failure = s.c.progress().failure.unwrap();
    assert!(failure.contains("final checkpoint") && failure.contains("missing"), "{failure}");
}

#[test]
fn resuming_from_the_last_step_finishes_at_once() {
    let resumed = |step| {
        Coordinator::new(with_checkpoints(1, 1), Instant::now(), "n").with_resume(CommittedCheckpoint {
            step,
            attempt: "a".into(),
            generation: 3,
            manifest_url: format!("/ckpt/step-{step:06}/manifest.json"),
        })
    };
    let c = resumed(4);
    assert_eq!(c.cursor(), 5);
    assert!(!c.is_over());
    assert!(resumed(9).progress().finished);
}

#[test]
fn corrupt_samples_are_quarantined_up_to_the_limit() {
    let mut s = Sim::new(config(1, 1, ""));
    let id = s.formed(0.0, 1).remove(0);
    let report = |key: &str| CorruptReport {
        header: header(&id),
        shard: "shard-000003.tar".into(),
        sample_key: key.into(),
        reason: "bad jpeg".into(),
    };
    assert!(!s.c.report_corrupt(s.at(1.0), &report("k1")).unwrap().over_limit);
    assert!(!s.c.report_corrupt(s.at(1.0), &report("k1")).unwrap().over_limit, "the same key counts once");
    assert!(!s.c.report_corrupt(s.at(1.0), &report("k2")).unwrap().over_limit);
    assert_eq!(s.plan(1.5, &id, 1).quarantined, vec!["k1".to_string(), "k2".to_string()]);
    assert!(s.c.report_corrupt(s.at(2.0), &report("k3")).unwrap().over_limit);
    let p = s.c.progress();
    assert_eq!(p.corrupt_samples, 3);
    let failure = p.failure.unwrap();
    assert!(failure.contains("shard-000003.tar") && failure.contains("max_corrupt_samples = 2"), "{failure}");
    assert!(s.step(3.0, &id, 1, 0).stop);
}

#[test]
fn the_data_plan_lists_the_shards_of_the_ranks_next_steps() {
    let manifest = DatasetManifest {
        version: MANIFEST_VERSION,
        shards: (0..6)
            .map(|i| ShardEntry {
                url: format!("shard-{i}.tar"),
                size: 0,
                samples: (0..4).map(|j| SampleEntry { key: format!("{i}-{j}"), members: BTreeMap::new() }).collect(),
            })
            .collect(),
    };
    let manifest = Arc::new(manifest);
    let mut s = Sim::new(config(2, 2, ""));
    s.c = Coordinator::new(config(2, 2, ""), s.t0, "n0nce").with_dataset(manifest.clone());
    let ids = s.formed(0.0, 2);
    let mut plan = braid_coordinator::plan::SamplePlan::new(manifest, 7, 4);
    for (rank, id) in ids.iter().enumerate() {
        let dp = s.plan(6.0, id, 1);
        let mut expected = Vec::new();
        for step in 0..4 {
            for sample in plan.rank_batch(step, 8, rank, 2) {
                if !expected.contains(&sample.sample.shard) {
                    expected.push(sample.sample.shard);
                }
            }
        }
        assert_eq!(dp.prefetch_shards, expected);
        assert_eq!((dp.seed, dp.global_batch, dp.epoch), (7, 8, 0));
        assert_eq!(dp.manifest_url, "/data/manifest.json");
    }
}

#[test]
fn ranks_may_vote_yes_without_parts_but_an_attempt_needs_one() {
    let mut s = Sim::new(with_checkpoints(2, 2));
    let ids = s.formed(0.0, 2);
    let empty = |id: &str, rank, attempt: &str| CheckpointVote {
        header: header(id),
        generation: 1,
        step: 4,
        attempt: attempt.into(),
        rank,
        ok: true,
        ..Default::default()
    };
    s.c.checkpoint_vote(s.at(1.0), &empty(&ids[1], 1, "a")).unwrap();
    s.vote(1.0, &ids[0], 0, 4, "a", true).unwrap();
    let plan = s.commits().remove(0);
    assert_eq!(plan.parts.iter().map(|p| p.rank).collect::<Vec<_>>(), vec![0]);

    s.c.checkpoint_vote(s.at(2.0), &empty(&ids[0], 0, "b")).unwrap();
    s.c.checkpoint_vote(s.at(2.0), &empty(&ids[1], 1, "b")).unwrap();
    assert!(s.commits().is_empty(), "no rank wrote anything: aborted");
}

fn ask(s: &mut Sim, t: f64, stop_after: bool) -> Option<u64> {
    let req = braid_proto::CheckpointRequest { header: header(""), reason: "operator".into(), stop_after };
    s.c.request_checkpoint(s.at(t), &req).unwrap().step
}

#[test]
fn a_requested_checkpoint_is_scheduled_one_step_after_the_next_report() {
    let mut s = Sim::new(with_checkpoints(2, 2));
    let ids = s.formed(0.0, 2);
    for id in &ids {
        s.plan(5.0, id, 1);
    }
    s.step(6.0, &ids[0], 1, 0);
    assert_eq!(ask(&mut s, 6.5, false), None, "not fixed until a rank reports");
    // Rank 1 reports step 0 after the request: the checkpoint is fixed at step 1, which no
    // rank can finish before every rank reported step 0.
    let reply = s.step(7.0, &ids[1], 1, 0);
    assert_eq!(reply.checkpoint_step, Some(1));
    assert!(!reply.stop_after_checkpoint);
    for id in &ids {
        assert_eq!(s.step(8.0, id, 1, 1).checkpoint_step, Some(1), "every rank learns it by its report of step 1");
    }
    s.vote(8.5, &ids[1], 1, 1, "a", true).unwrap();
    s.vote(8.6, &ids[0], 0, 1, "a", true).unwrap();
    let plan = s.commits().remove(0);
    s.c.commit_succeeded(s.at(9.0), &plan, "/ckpt/step-000001/manifest.json".into());
    assert_eq!(s.step(10.0, &ids[0], 1, 2).checkpoint_step, None, "done once committed");
    assert!(!s.c.is_over());
}

#[test]
fn a_preemption_stops_the_job_after_its_checkpoint_commits() {
    let mut s = Sim::new(with_checkpoints(1, 1));
    let id = s.formed(0.0, 1).remove(0);
    s.plan(5.0, &id, 1);
    assert_eq!(ask(&mut s, 5.5, true), None);
    let reply = s.step(6.0, &id, 1, 3);
    assert_eq!((reply.checkpoint_step, reply.stop_after_checkpoint), (Some(4), true));
    s.step(7.0, &id, 1, 4);
    s.vote(7.5, &id, 0, 4, "p", true).unwrap();
    assert!(!s.c.is_over(), "not before the commit");
    let plan = s.commits().remove(0);
    s.c.commit_succeeded(s.at(8.0), &plan, "/ckpt/step-000004/manifest.json".into());
    let p = s.c.progress();
    assert_eq!(p.preempted_after, Some(4));
    assert!(p.is_over() && !p.finished && p.failure.is_none());
    assert!(s.beat(9.0, &id).job_finished, "workers are told to exit");
}

#[test]
fn an_aborted_preemption_checkpoint_fails_the_job() {
    let mut s = Sim::new(with_checkpoints(1, 1));
    let id = s.formed(0.0, 1).remove(0);
    s.plan(5.0, &id, 1);
    ask(&mut s, 5.5, true);
    s.step(6.0, &id, 1, 2);
    s.step(7.0, &id, 1, 3);
    s.vote(7.5, &id, 0, 3, "p", false).unwrap();
    let failure = s.c.progress().failure.expect("the job failed");
    assert!(failure.contains("step 3"), "{failure}");
}

#[test]
fn every_minutes_asks_for_a_checkpoint_on_the_fake_clock() {
    let mut c = with_checkpoints(1, 1);
    c.checkpoint.every_minutes = 1.0;
    let mut s = Sim::new(c);
    let id = s.formed(0.0, 1).remove(0);
    s.plan(5.0, &id, 1);
    s.c.tick(s.at(30.0));
    assert_eq!(s.step(31.0, &id, 1, 0).checkpoint_step, None, "not due after 31 s");
    s.c.tick(s.at(61.0));
    assert_eq!(s.step(62.0, &id, 1, 1).checkpoint_step, Some(2), "due after a minute");
}

#[test]
fn a_checkpoint_request_without_a_checkpoint_url_is_refused() {
    let mut s = Sim::new(config(1, 1, ""));
    let req = braid_proto::CheckpointRequest { header: header(""), reason: "operator".into(), stop_after: false };
    let err = s.c.request_checkpoint(s.at(1.0), &req).unwrap_err();
    assert!(err.to_string().contains("checkpoint.url"), "{err}");
}

fn long(mut c: JobConfig, steps: u64) -> JobConfig {
    c.train.steps = steps;
    c
}

/// Ends generation 1 of `ids` (which trained steps 0..4) by a leave of `gone`.
fn leave(s: &mut Sim, t: f64, gone: &str) {
    s.c.leave(s.at(t), &LeaveRequest { header: header(gone), reason: "killed".into() }).unwrap();
}

#[test]
fn the_next_generation_starts_after_the_newest_state_a_member_holds() {
    let mut s = Sim::new(long(with_checkpoints(1, 4), 100));
    let ids = s.formed(0.0, 4);
    s.train(5.0, &ids, 1, 0..5);
    s.checkpoint(6.0, &ids, 1, 2);
    leave(&mut s, 7.0, &ids[1]);
    s.c.take_actions();
    // New ranks: ids[0] -> 0 (holds 3), ids[2] -> 1 (holds 4), ids[3] -> 2 (holds 4).
    s.rdv_holding(8.0, &ids[0], Some(3));
    s.rdv_holding(8.0, &ids[2], Some(4));
    s.rdv_holding(8.0, &ids[3], Some(4));
    s.c.tick(s.at(13.0));
    let logs = s.logs();
    assert!(
        logs.iter()
            .any(|l| l == "generation 2 starts at step 5 from rank 1's in-memory state (held by 2 of 3 members)"),
        "{logs:?}"
    );
    let held: Vec<Option<u64>> = s.c.progress().members.iter().map(|m| m.held_step).collect();
    assert_eq!(held, vec![Some(3), Some(4), Some(4)]);
    for (rank, id) in [&ids[0], &ids[2], &ids[3]].into_iter().enumerate() {
        let r = s.rdv(13.1, id);
        assert_eq!((r.generation, r.rank, r.world_size), (2, rank as u32, 3));
        let dp = s.plan(13.2, id, 2);
        assert_eq!((dp.start_step, dp.state_source_rank, dp.resume_manifest_url.as_str()), (5, Some(1), ""));
    }
    let p = s.c.progress();
    assert_eq!(p.steps_done, 5);
    let record = p.generation_history.last().unwrap();
    assert_eq!(
        (record.number, record.world_size, record.start_step, record.source.as_str()),
        (2, 3, 5, "memory:rank1")
    );
    assert!(p.generation_history[0].ended.as_deref().unwrap().contains("left"), "{:?}", p.generation_history);
    assert_eq!(
        p.members.iter().map(|m| m.held_step).collect::<Vec<_>>(),
        vec![None; 3],
        "the latest rendezvous (without a held step) cleared them"
    );
}

#[test]
fn a_state_holding_the_checkpointed_step_is_used_and_an_older_one_is_not() {
    for (held, start, source_rank, url) in [(2, 3, Some(0), ""), (1, 3, None, "/ckpt/step-000002/manifest.json")] {
        let mut s = Sim::new(long(with_checkpoints(1, 2), 100));
        let ids = s.formed(0.0, 2);
        s.train(5.0, &ids, 1, 0..3);
        s.checkpoint(6.0, &ids, 1, 2);
        leave(&mut s, 7.0, &ids[1]);
        s.c.take_actions();
        s.rdv_holding(8.0, &ids[0], Some(held));
        s.c.tick(s.at(13.0));
        let logs = s.logs();
        let dp = s.plan(13.1, &ids[0], 2);
        assert_eq!((dp.start_step, dp.state_source_rank, dp.resume_manifest_url.as_str()), (start, source_rank, url));
        if source_rank.is_none() {
            let line = "generation 2 starts at step 3 from checkpoint step 2 (/ckpt/step-000002/manifest.json)";
            assert!(logs.iter().any(|l| l.starts_with(line) && l.contains("step 1")), "{logs:?}");
            assert_eq!(s.c.progress().generation_history[1].source, "checkpoint:step 2");
        }
    }
}

#[test]
fn without_held_state_a_generation_restores_the_checkpoint_or_starts_fresh() {
    let mut s = Sim::new(long(with_checkpoints(1, 2), 100));
    let ids = s.formed(0.0, 2);
    s.train(5.0, &ids, 1, 0..3);
    leave(&mut s, 6.0, &ids[1]);
    s.rdv(7.0, &ids[0]);
    s.c.tick(s.at(12.0));
    let logs = s.logs();
    assert!(logs.iter().any(|l| l == "generation 2 starts at step 0 fresh"), "{logs:?}");
    let dp = s.plan(12.1, &ids[0], 2);
    assert_eq!((dp.start_step, dp.state_source_rank, dp.resume_manifest_url.as_str()), (0, None, ""));
    assert_eq!(s.c.progress().generation_history[1].source, "fresh");

    s.step(13.0, &ids[0], 2, 0);
    s.checkpoint(13.5, &ids[..1], 2, 0);
    let late = s.join(14.0, "late");
    // A rendezvous after starting ends the generation; no held state: back to the checkpoint.
    s.rdv(15.0, &ids[0]);
    s.rdv(15.0, &late);
    let r = s.rdv(15.0, &ids[0]);
    assert_eq!((r.generation, r.world_size), (3, 2), "{r:?}");
    let dp = s.plan(15.1, &late, 3);
    assert_eq!(
        (dp.start_step, dp.state_source_rank, dp.resume_manifest_url.as_str()),
        (1, None, "/ckpt/step-000000/manifest.json")
    );
    assert!(s.logs().iter().any(|l| l.starts_with("generation 3 starts at step 1 from checkpoint step 0")));
}

#[test]
fn held_state_of_the_last_step_finishes_or_is_set_aside() {
    // No checkpoint.url: a member holding the last step means training is complete.
    let mut s = Sim::new(config(1, 2, ""));
    let ids = s.formed(0.0, 2);
    s.train(5.0, &ids, 1, 0..9);
    s.step(6.0, &ids[0], 1, 9);
    leave(&mut s, 7.0, &ids[1]);
    let r = s.rdv_holding(8.0, &ids[0], Some(9));
    assert!(!ready(&r));
    s.c.tick(s.at(13.0));
    assert!(s.c.progress().finished, "{:?}", s.logs());
    assert_eq!(s.rdv_holding(13.5, &ids[0], Some(9)).state, RendezvousState::JobFinished as i32);

    // With checkpoints, the final checkpoint needs a generation that trains the last step:
    // the state of step 9 is set aside and the next newest one (step 8) is the start.
    let mut s = Sim::new(with_checkpoints(1, 3));
    let ids = s.formed(0.0, 3);
    s.train(5.0, &ids, 1, 0..9);
    s.step(6.0, &ids[0], 1, 9);
    leave(&mut s, 7.0, &ids[2]);
    s.rdv_holding(8.0, &ids[0], Some(9));
    s.rdv_holding(8.0, &ids[1], Some(8));
    s.c.tick(s.at(13.0));
    let logs = s.logs();
    assert!(logs.iter().any(|l| l.contains("starts at step 9 from rank 1's") && l.contains("set aside")), "{logs:?}");
    let dp = s.plan(13.1, &ids[0], 2);
    assert_eq!((dp.start_step, dp.state_source_rank), (9, Some(1)));

    // A held step past the job is refused.
    let req = RendezvousRequest { header: header(&ids[0]), endpoint: "e".into(), held_step: Some(10) };
    let err = s.c.rendezvous(s.at(14.0), &req).unwrap_err();
    assert!(err.to_string().contains("holds step 10"), "{err}");
}

#[test]
fn a_committed_final_checkpoint_finishes_the_job_instead_of_a_new_generation() {
    let mut s = Sim::new(with_checkpoints(1, 2));
    let ids = s.formed(0.0, 2);
    s.train(5.0, &ids, 1, 0..9);
    s.step(6.0, &ids[0], 1, 9);
    s.checkpoint(6.5, &ids, 1, 9);
    assert!(!s.c.is_over(), "rank 1 has not reported step 9");
    leave(&mut s, 7.0, &ids[1]);
    assert_eq!(s.rdv_holding(8.0, &ids[0], Some(9)).state, RendezvousState::Waiting as i32);
    s.c.tick(s.at(13.0));
    assert!(s.c.progress().finished);
}

#[test]
fn a_scale_up_waits_for_a_step_boundary_every_rank_reaches() {
    let mut s = Sim::new(long(config(1, 3, ""), 100));
    let ids = s.formed(0.0, 2);
    s.train(5.0, &ids, 1, 0..1);
    let late = s.join(10.0, "late");
    let r = s.rdv(10.0, &late);
    assert!(!ready(&r) && r.reason.contains("generation 1 is running"), "{}", r.reason);
    assert_eq!(s.c.progress().generation, 1, "the generation goes on until the boundary");
    assert!(!s.beat(10.5, &ids[0]).rendezvous_required);
    assert_eq!(s.c.progress().waiting_reason, None);

    // The first report after the change is due fixes the boundary: step 1 + 1.
    assert_eq!(s.step(11.0, &ids[0], 1, 1).rendezvous_after_step, Some(2));
    assert_eq!(s.step(11.0, &ids[1], 1, 1).rendezvous_after_step, Some(2));
    assert!(s.rdv(11.5, &late).reason.ends_with("after step 2"));
    for id in &ids {
        let reply = s.step(12.0, id, 1, 2);
        assert_eq!((reply.rendezvous_after_step, reply.rendezvous_required), (Some(2), false));
    }
    let logs = s.logs();
    assert!(logs.iter().any(|l| l.contains("generation 1 changes membership after step 2")), "{logs:?}");

    // The first rank back ends the generation; the other finds out and follows.
    assert!(!ready(&s.rdv_holding(12.5, &ids[1], Some(2))));
    assert!(s.beat(12.6, &ids[0]).rendezvous_required);
    let r = s.rdv_holding(12.7, &ids[0], Some(2));
    assert_eq!((r.generation, r.rank, r.world_size), (2, 0, 3), "max_workers reached: forms at once");
    for (rank, id) in [&ids[0], &ids[1], &late].into_iter().enumerate() {
        let dp = s.plan(13.0, id, 2);
        assert_eq!(
            (dp.start_step, dp.state_source_rank, dp.resume_manifest_url.as_str()),
            (3, Some(0), ""),
            "rank {rank}"
        );
    }
    let p = s.c.progress();
    assert_eq!((p.generation, p.world_size, p.rejoins), (2, 3, 1));
    let ended = p.generation_history[0].ended.clone().unwrap();
    assert!(ended.contains("membership boundary after step 2") && ended.contains("scale-up"), "{ended}");
    assert_eq!(p.generation_history[1].source, "memory:rank0");
}

#[test]
fn a_scale_up_before_any_step_report_ends_the_generation_at_once() {
    let mut s = Sim::new(long(config(1, 3, ""), 100));
    let ids = s.formed(0.0, 2);
    for id in &ids {
        s.plan(5.0, id, 1);
    }
    let late = s.join(10.0, "late");
    s.rdv(10.0, &late);
    assert!(s.beat(10.0, &ids[0]).rendezvous_required);
}

#[test]
fn a_dead_worker_ends_the_generation_and_survivors_continue_from_memory() {
    let mut s = Sim::new(long(config(2, 3, ""), 100));
    let ids = s.formed(0.0, 3);
    s.train(5.0, &ids, 1, 0..4);
    s.step(6.0, &ids[0], 1, 4);
    s.step(6.0, &ids[2], 1, 4);
    // ids[1] dies without reporting step 4; the others time out in the collective of step 5.
    for t in [15.0, 25.0, 36.5] {
        s.beat(t, &ids[0]);
        s.beat(t, &ids[2]);
        s.c.tick(s.at(t));
    }
    assert_eq!(s.c.progress().generation, 0);
    assert!(s.beat(37.0, &ids[2]).rendezvous_required);
    s.rdv_holding(37.0, &ids[2], Some(4));
    s.rdv_holding(37.5, &ids[0], Some(4));
    s.c.tick(s.at(42.5));
    let p = s.c.progress();
    assert_eq!((p.generation, p.world_size, p.steps_done), (2, 2, 5));
    let r = s.rdv(42.6, &ids[2]);
    assert_eq!((r.generation, r.rank, r.world_size), (2, 1, 2));
    let dp = s.plan(42.7, &ids[2], 2);
    assert_eq!((dp.start_step, dp.state_source_rank), (5, Some(0)));
    assert!(s
        .logs()
        .iter()
        .any(|l| l == "generation 2 starts at step 5 from rank 0's in-memory state (held by 2 of 2 members)"));
}

#[test]
fn below_min_workers_the_job_waits_and_says_why() {
    let mut s = Sim::new(long(config(3, 3, ""), 100));
    assert!(s.c.progress().waiting_reason.unwrap().contains("0 of min_workers = 3"));
    let ids = s.formed(0.0, 3);
    assert_eq!(s.c.progress().waiting_reason, None);
    s.train(5.0, &ids, 1, 0..2);
    leave(&mut s, 6.0, &ids[2]);
    s.rdv_holding(7.0, &ids[0], Some(1));
    s.rdv_holding(7.0, &ids[1], Some(1));
    for t in (1..50).map(|i| 7.0 + 10.0 * f64::from(i)) {
        s.beat(t, &ids[0]);
        s.beat(t, &ids[1]);
        s.c.tick(s.at(t));
    }
    let p = s.c.progress();
    assert!(!p.is_over() && p.generation == 0, "{p:?}");
    let why = p.waiting_reason.unwrap();
    assert!(why.contains("2 of min_workers = 3"), "{why}");
    assert_eq!(p.steps_done, 2, "the state held in memory");

    let back = s.join(500.0, "back");
    let r = s.rdv(500.0, &back);
    assert_eq!((r.generation, r.rank, r.world_size), (2, 2, 3));
    let p = s.c.progress();
    assert_eq!((p.waiting_reason, p.rejoins), (None, 1));
    assert_eq!(s.plan(500.5, &back, 2).start_step, 2);
}

#[test]
fn a_rank_with_slow_compute_is_flagged_as_a_straggler_and_recovers() {
    let mut s = Sim::new(long(config(3, 3, ""), 100));
    let ids = s.formed(0.0, 3);
    for id in &ids {
        s.plan(5.0, id, 1);
    }
    // Ranks 0 and 1 compute 0.4 s and wait 0.6 s for rank 2, which computes 1.0 s.
    for step in 0..6 {
        for (rank, id) in ids.iter().enumerate() {
            let wait = if rank == 2 { 0.0 } else { 0.6 };
            s.step_timed(6.0, id, 1, step, 1.0, wait);
        }
    }
    let p = s.c.progress();
    assert_eq!(p.members.iter().map(|m| m.straggler).collect::<Vec<_>>(), vec![false, false, true]);
    assert_eq!((p.members[2].step_seconds, p.members[2].collective_wait_seconds), (Some(1.0), Some(0.0)));
    assert_eq!(p.members[0].collective_wait_seconds, Some(0.6));
    let logs = s.logs();
    let flagged: Vec<&String> = logs.iter().filter(|l| l.contains("is a straggler")).collect();
    assert_eq!(flagged.len(), 1, "named once: {logs:?}");
    assert!(flagged[0].contains(&ids[2]) && flagged[0].contains("rank 2"), "{}", flagged[0]);

    // Rank 2 speeds up: once most of its window is fast, it recovers.
    for step in 6..16 {
        for id in &ids {
            s.step_timed(7.0, id, 1, step, 0.4, 0.0);
        }
    }
    assert!(s.c.progress().members.iter().all(|m| !m.straggler));
    let logs = s.logs();
    assert_eq!(logs.iter().filter(|l| l.contains("no longer a straggler")).count(), 1, "{logs:?}");

    // Jitter below the minimum excess never flags.
    let mut s = Sim::new(long(config(2, 2, ""), 100));
    let ids = s.formed(0.0, 2);
    for step in 0..10 {
        s.step_timed(6.0, &ids[0], 1, step, 0.02, 0.0);
        s.step_timed(6.0, &ids[1], 1, step, 0.05, 0.0);
    }
    assert!(s.c.progress().members.iter().all(|m| !m.straggler));
}

/// Applies the same RPC to both coordinators and checks the replies are equal.
fn same<T: PartialEq + std::fmt::Debug>(a: &mut Sim, b: &mut Sim, rpc: impl Fn(&mut Sim) -> T) -> T {
    let (x, y) = (rpc(a), rpc(b));
    assert_eq!(x, y);
    x
}

#[test]
fn a_restored_coordinator_answers_like_the_original() {
    let config = long(with_checkpoints(1, 4), 100);
    let mut s = Sim::new(config.clone());
    let ids = s.formed(0.0, 3);
    s.train(5.0, &ids, 1, 0..3);
    s.checkpoint(6.0, &ids, 1, 1);
    let corrupt = CorruptReport {
        header: header(&ids[1]),
        shard: "s-1.tar".into(),
        sample_key: "k1".into(),
        reason: "bad".into(),
    };
    s.c.report_corrupt(s.at(6.5), &corrupt).unwrap();
    ask(&mut s, 7.0, false);
    let late = s.join(7.5, "late");
    s.rdv(7.5, &late);
    // Fixes both the checkpoint (step 4) and the membership boundary (step 4).
    assert_eq!(s.step(8.0, &ids[0], 1, 3).rendezvous_after_step, Some(4));
    s.vote(8.5, &ids[0], 0, 4, "g1-n0nce-4", true).unwrap();
    s.c.take_actions();

    let snapshot = s.c.snapshot();
    let json = serde_json::to_string_pretty(&snapshot).unwrap();
    let back: braid_coordinator::state::CoordinatorSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snapshot);
    let restored = Coordinator::restore(config.clone(), back.clone(), s.at(9.0)).unwrap();
    assert_eq!(restored.snapshot(), snapshot);
    let mut r = Sim { c: restored, t0: s.t0 };
    r.c.take_actions();

    let mut other = config.clone();
    other.train.steps = 99;
    let err = Coordinator::restore(other.clone(), back, s.at(9.0)).unwrap_err().to_string();
    assert!(err.contains(&snapshot.config_hash) && err.contains(&other.hash()), "{err}");

    // Workers keep their ids and ranks; the next RPCs get the same answers.
    let (p, q) = (s.c.progress(), r.c.progress());
    assert_eq!(
        p.members.iter().map(|m| (&m.worker_id, m.rank, m.state)).collect::<Vec<_>>(),
        q.members.iter().map(|m| (&m.worker_id, m.rank, m.state)).collect::<Vec<_>>()
    );
    assert_eq!(
        (p.generation, p.world_size, p.steps_done, &p.checkpoints, p.corrupt_samples),
        (q.generation, q.world_size, q.steps_done, &q.checkpoints, q.corrupt_samples)
    );
    for id in &ids {
        same(&mut s, &mut r, |x| x.beat(9.5, id));
        let reply = same(&mut s, &mut r, |x| x.step(10.0, id, 1, 4));
        assert_eq!((reply.checkpoint_step, reply.rendezvous_after_step), (Some(4), Some(4)));
    }
    same(&mut s, &mut r, |x| x.rdv(10.0, &late));
    for (rank, id) in ids.iter().enumerate().skip(1) {
        let voted =
            same(&mut s, &mut r, |x| x.vote(10.5, id, rank as u32, 4, "g1-n0nce-4", true).map_err(|e| e.to_string()));
        assert_eq!(voted, Ok(false));
    }
    let plan = same(&mut s, &mut r, |x| x.commits());
    assert_eq!(plan.len(), 1, "rank 0's vote from before the restore counts");
    same(&mut s, &mut r, |x| {
        x.c.commit_succeeded(x.at(11.0), &plan[0], "/ckpt/step-000004/manifest.json".into());
        x.c.cursor()
    });
    same(&mut s, &mut r, |x| x.rdv_holding(11.5, &ids[2], Some(4)));
    same(&mut s, &mut r, |x| x.rdv_holding(11.5, &ids[0], Some(4)));
    let ready_reply = same(&mut s, &mut r, |x| x.rdv_holding(11.5, &ids[1], Some(4)));
    assert_eq!((ready_reply.generation, ready_reply.world_size), (2, 4));
    let dp = same(&mut s, &mut r, |x| x.plan(12.0, &late, 2));
    assert_eq!((dp.start_step, dp.state_source_rank, dp.attempt_prefix.as_str()), (5, Some(0), "g2-n0nce"));
    assert_eq!(dp.quarantined, vec!["k1".to_string()]);
    same(&mut s, &mut r, |x| x.c.progress().generation_history);

    // A silent worker is dead one heartbeat timeout after the restore, not before.
    let mut r2 = Sim { c: Coordinator::restore(config, snapshot, s.at(100.0)).unwrap(), t0: s.t0 };
    r2.c.tick(r2.at(129.0));
    assert_eq!(r2.c.progress().generation, 1);
    r2.c.tick(r2.at(131.0));
    assert_eq!(r2.c.progress().generation, 0);
}

/// A job of 10 steps whose ranks check their replicas after steps 4 and 9.
fn checked(workers: usize) -> JobConfig {
    let mut c = config(workers, workers, "");
    c.train.ema_check_every = 5;
    c
}

impl Sim {
    /// A step report carrying a replica digest (empty: none).
    fn step_digest(
        &mut self,
        t: f64,
        id: &str,
        generation: u64,
        step: u64,
        digest: &str,
    ) -> Result<braid_proto::StepReply, Error> {
        let req =
            StepReport { header: header(id), generation, step, state_digest: digest.into(), ..Default::default() };
        self.c.report_step(self.at(t), &req)
    }

    /// The reply a digest-carrying report of `step` gets once checked at `t` (as the service
    /// fills it), with the verdict.
    fn verdict(&mut self, t: f64, generation: u64, step: u64) -> (StateCheck, braid_proto::StepReply) {
        let check = self.c.state_check(self.at(t), generation, step);
        let mut reply = braid_proto::StepReply::default();
        check.fill(&mut reply);
        (check, reply)
    }
}

#[test]
fn equal_digests_pass_the_check_without_an_order() {
    let mut s = Sim::new(checked(2));
    let ids = s.formed(0.0, 2);
    s.train(6.0, &ids, 1, 0..4);
    s.step_digest(7.0, &ids[0], 1, 4, "aaaa").unwrap();
    assert_eq!(s.verdict(7.0, 1, 4).0, StateCheck::Pending, "rank 1 has not reported step 4");
    s.step_digest(7.1, &ids[1], 1, 4, "aaaa").unwrap();
    let (check, reply) = s.verdict(7.1, 1, 4);
    assert_eq!(check, StateCheck::Agreed);
    assert_eq!((reply.resync_from_rank, reply.drifted_ranks.len()), (None, 0));
    let logs = s.logs().join("\n");
    assert!(logs.contains("state check of step 4 (generation 1): all 2 ranks hold digest aaaa"), "{logs}");
    let p = s.c.progress();
    assert_eq!((p.replica_checks, p.replica_drifts), (1, 0));
}

#[test]
fn a_differing_digest_orders_a_resync_from_rank_0_and_names_the_drifted_rank() {
    let mut s = Sim::new(checked(2));
    let ids = s.formed(0.0, 2);
    s.train(6.0, &ids, 1, 0..4);
    s.step_digest(7.0, &ids[0], 1, 4, "aaaa").unwrap();
    s.step_digest(7.1, &ids[1], 1, 4, "bbbb").unwrap();
    let (check, reply) = s.verdict(7.1, 1, 4);
    assert_eq!(check, StateCheck::Resync { source: 0, drifted: vec![1] });
    assert_eq!((reply.resync_from_rank, reply.drifted_ranks), (Some(0), vec![1]));
    assert_eq!(s.verdict(7.2, 1, 4).0, check, "every rank gets the same verdict");
    let logs = s.logs().join("\n");
    assert!(logs.contains("state check of step 4 (generation 1): replicas disagree"), "{logs}");
    assert!(logs.contains(&format!("drifted: rank 1 (worker {}, digest bbbb)", ids[1])), "{logs}");
    assert!(logs.contains(&format!("reference: rank 0 (worker {}, digest aaaa)", ids[0])), "{logs}");
    assert!(logs.contains("every rank takes rank 0's state by broadcast before step 5"), "{logs}");
    let p = s.c.progress();
    assert_eq!((p.replica_checks, p.replica_drifts), (1, 1));
    // The next check passes again; the counters survive a coordinator restart.
    s.train(8.0, &ids, 1, 5..9);
    s.step_digest(9.0, &ids[0], 1, 9, "cccc").unwrap();
    s.step_digest(9.0, &ids[1], 1, 9, "cccc").unwrap();
    assert_eq!(s.verdict(9.0, 1, 9).0, StateCheck::Agreed);
    let restored = Coordinator::restore(checked(2), s.c.snapshot(), s.at(10.0)).unwrap();
    assert_eq!((restored.progress().replica_checks, restored.progress().replica_drifts), (2, 1));
}

#[test]
fn the_majority_digest_is_the_reference_when_rank_0_is_alone() {
    let mut s = Sim::new(checked(3));
    let ids = s.formed(0.0, 3);
    s.train(6.0, &ids, 1, 0..4);
    for (id, digest) in ids.iter().zip(["bad0", "good", "good"]) {
        s.step_digest(7.0, id, 1, 4, digest).unwrap();
    }
    assert_eq!(s.verdict(7.0, 1, 4).0, StateCheck::Resync { source: 1, drifted: vec![0] });
}

#[test]
fn a_missing_digest_gives_no_verdict_until_it_arrives_or_the_generation_ends() {
    let mut s = Sim::new(checked(2));
    let ids = s.formed(0.0, 2);
    s.train(6.0, &ids, 1, 0..4);
    s.step_digest(7.0, &ids[0], 1, 4, "aaaa").unwrap();
    let wait = s.c.state_check_wait().as_secs_f64();
    assert_eq!(wait, 20.0, "min(collective_timeout_s = 60, STATE_CHECK_MAX_WAIT)");
    // Rank 1 is slow but within the wait: the reply to rank 0 waits for it.
    assert_eq!(s.verdict(7.0 + wait - 0.1, 1, 4).0, StateCheck::Pending);
    s.beat(7.0 + wait - 0.1, &ids[1]);
    s.step_digest(7.0 + wait - 0.05, &ids[1], 1, 4, "aaaa").unwrap();
    assert_eq!(s.verdict(7.0 + wait, 1, 4).0, StateCheck::Agreed);

    // Rank 1 dies before it reports step 9: no verdict once the generation ends.
    s.train(30.0, &ids, 1, 5..9);
    s.step_digest(31.0, &ids[0], 1, 9, "dddd").unwrap();
    assert_eq!(s.verdict(31.0, 1, 9).0, StateCheck::Pending);
    s.c.leave(s.at(32.0), &LeaveRequest { header: header(&ids[1]), reason: "killed".into() }).unwrap();
    s.logs();
    match s.verdict(32.0, 1, 9) {
        (StateCheck::NoVerdict(why), reply) => {
            assert!(why.contains("generation 1 ended before every rank reported step 9"), "{why}");
            assert_eq!(reply.resync_from_rank, None);
        }
        other => panic!("expected no verdict, got {other:?}"),
    }
    assert!(s.logs().iter().any(|l| l.contains("state check of step 9 (generation 1) has no verdict")));
    assert_eq!(s.c.progress().replica_checks, 1, "only the check of step 4 compared digests");
}

#[test]
fn a_rank_that_never_reports_is_bounded_by_the_wait() {
    let mut c = checked(2);
    c.cluster.collective_timeout_s = 3.0;
    let mut s = Sim::new(c);
    let ids = s.formed(0.0, 2);
    s.train(6.0, &ids, 1, 0..4);
    s.step_digest(7.0, &ids[1], 1, 4, "aaaa").unwrap();
    assert_eq!(s.verdict(9.9, 1, 4).0, StateCheck::Pending);
    match s.verdict(10.0, 1, 4).0 {
        StateCheck::NoVerdict(why) => assert!(why.contains("ranks [0] did not report step 4 within 3.0 s"), "{why}"),
        other => panic!("expected no verdict, got {other:?}"),
    }
    // A late digest changes nothing: the verdict is fixed.
    s.step_digest(10.5, &ids[0], 1, 4, "bbbb").unwrap();
    assert!(matches!(s.verdict(10.5, 1, 4).0, StateCheck::NoVerdict(_)));
}

#[test]
fn digests_outside_check_steps_are_refused_and_reports_without_one_are_not_checked() {
    let mut s = Sim::new(checked(2));
    let ids = s.formed(0.0, 2);
    s.train(6.0, &ids, 1, 0..3);
    let err = s.step_digest(7.0, &ids[0], 1, 3, "aaaa").unwrap_err();
    assert!(err.to_string().contains("step 3, which is not a state check step (train.ema_check_every = 5"), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::InvalidArgument);
    // Ranks that send no digest at a check step (a single rank, a disabled check) are not
    // checked, and nothing is logged about it.
    s.step_digest(7.0, &ids[0], 1, 3, "").unwrap();
    s.step_digest(7.0, &ids[1], 1, 3, "").unwrap();
    s.step_digest(7.0, &ids[0], 1, 4, "").unwrap();
    s.step_digest(7.0, &ids[1], 1, 4, "").unwrap();
    assert!(matches!(s.verdict(7.0, 1, 4).0, StateCheck::NoVerdict(_)));
    assert!(!s.logs().iter().any(|l| l.contains("state check")));
    assert_eq!(s.c.progress().replica_checks, 0);
    // One rank with a digest, the other without: no verdict, said once.
    s.train(8.0, &ids, 1, 5..9);
    s.step_digest(9.0, &ids[0], 1, 9, "aaaa").unwrap();
    s.step_digest(9.0, &ids[1], 1, 9, "").unwrap();
    assert_eq!(s.verdict(9.0, 1, 9).0, StateCheck::NoVerdict("ranks [1] sent no digest".into()));
    let logs = s.logs();
    assert_eq!(logs.iter().filter(|l| l.contains("state check of step 9")).count(), 1, "{logs:?}");
}

#[test]
fn step_reports_and_commits_feed_the_telemetry_series_and_metrics() {
    let mut sim = Sim::new(with_checkpoints(2, 2));
    let ids = sim.formed(0.0, 2);
    for id in &ids {
        sim.plan(6.0, id, 1);
    }
    for step in 0..4u64 {
        for (rank, id) in ids.iter().enumerate() {
            let req = StepReport {
                header: header(id),
                generation: 1,
                step,
                loss: 3.0 - step as f64 * 0.5,
                loss_terms: [("itc".to_string(), 2.0 - step as f64 * 0.5), ("itm".to_string(), 1.0)].into(),
                learning_rate: 1e-4 * (step + 1) as f64,
                grad_norm: 0.25,
                samples: 8,
                step_seconds: 0.5,
                data_wait_seconds: 0.01 * (rank + 1) as f64,
                // Rank 0 trains on a GPU, rank 1 on the CPU (no memory figures).
                device_memory_bytes: (rank == 0).then_some((1 << 30) + step * 1024),
                device_memory_peak_bytes: (rank == 0).then_some(3 << 29),
                ..Default::default()
            };
            sim.c.report_step(sim.at(7.0 + step as f64), &req).unwrap();
        }
    }
    sim.c.take_actions();
    assert!(!sim.vote(12.0, &ids[0], 0, 3, "a", true).unwrap());
    assert!(!sim.vote(12.5, &ids[1], 1, 3, "a", true).unwrap());
    let plan = sim.commits().remove(0);
    sim.c.commit_succeeded(sim.at(13.0), &plan, "/ckpt/step-000003/manifest.json".into());

    let p = sim.c.progress();
    let steps: Vec<(u64, f64)> = p.recent_steps.iter().map(|s| (s.step, s.loss)).collect();
    assert_eq!(steps, vec![(0, 3.0), (1, 2.5), (2, 2.0), (3, 1.5)], "one point per step, from rank 0");
    assert_eq!(p.recent_steps[3].elapsed_seconds, 10.0);
    assert_eq!(p.loss_terms["itc"], 0.5);
    assert_eq!(p.grad_norm, Some(0.25));
    assert_eq!(p.data_wait_seconds, Some(0.01));
    let memory: Vec<_> = p.members.iter().map(|m| (m.rank, m.device_memory_bytes, m.device_memory_peak_bytes)).collect();
    assert_eq!(memory, vec![(Some(0), Some((1 << 30) + 3 * 1024), Some(3 << 29)), (Some(1), None, None)], "the latest report's");
    let cost = p.last_checkpoint.unwrap();
    // 100 + 101 bytes; rank 1 wrote for 1.5 s and the commit came 0.5 s after its vote.
    assert_eq!((cost.step, cost.bytes, cost.seconds), (3, 201, 2.0));
    assert_eq!((p.checkpoints_committed, p.generations), (1, 1));

    let text = braid_coordinator::metrics::render(&p);
    for line in [
        "braid_step{job_name=\"test-job\"} 4",
        "braid_total_steps{job_name=\"test-job\"} 10",
        "braid_samples_per_second{job_name=\"test-job\"} 16",
        "braid_loss{job_name=\"test-job\"} 1.5",
        "braid_loss_term{job_name=\"test-job\",objective=\"itc\"} 0.5",
        "braid_loss_term{job_name=\"test-job\",objective=\"itm\"} 1",
        "braid_learning_rate{job_name=\"test-job\"} 0.0004",
        "braid_world_size{job_name=\"test-job\"} 2",
        "braid_generation{job_name=\"test-job\"} 1",
        "braid_checkpoints_total{job_name=\"test-job\"} 1",
        "braid_checkpoint_bytes{job_name=\"test-job\"} 201",
        "braid_checkpoint_seconds{job_name=\"test-job\"} 2",
        &format!("braid_rank_data_wait_seconds{{job_name=\"test-job\",rank=\"1\",worker=\"{}\"}} 0.02", ids[1]),
        &format!("braid_rank_straggler{{job_name=\"test-job\",rank=\"0\",worker=\"{}\"}} 0", ids[0]),
        &format!("braid_rank_device_memory_bytes{{job_name=\"test-job\",rank=\"0\",worker=\"{}\"}} 1073744896", ids[0]),
        &format!("braid_rank_device_memory_peak_bytes{{job_name=\"test-job\",rank=\"0\",worker=\"{}\"}} 1610612736", ids[0]),
        "# TYPE braid_rank_device_memory_bytes gauge",
        "# TYPE braid_rank_device_memory_peak_bytes gauge",
        "braid_job_finished{job_name=\"test-job\"} 0",
        "# TYPE braid_rejoins_total counter",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    // Rank 1 reported no memory figures: no series for it, and one each for rank 0.
    for family in ["braid_rank_device_memory_bytes{", "braid_rank_device_memory_peak_bytes{"] {
        let samples: Vec<&str> = text.lines().filter(|l| l.starts_with(family)).collect();
        assert_eq!(samples.len(), 1, "{samples:?}");
        assert!(samples[0].contains("rank=\"0\""), "{samples:?}");
    }
}
