//! A whole job behind a bearer token: `braid run` hands the job's token file to its workers
//! and the job trains; a worker with a wrong token is refused with a message that says why and
//! never shows the token; `braid status` needs the token as well.

use std::time::Duration;

use braid_tests::{braid, braid_run, free_port, read_logs, spawn_logged, synth_data, JobFile};

#[test]
fn a_job_behind_a_token_trains_and_a_worker_with_the_wrong_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 200, 20, 100);
    let token = "tok-e2e-81c3d5f0a9";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let job = JobFile { workers: 2, steps: 10, ..JobFile::new("secured", &data) }.to_toml()
        + &format!("\n[security]\nauth_token_file = {:?}\n", token_file.display().to_string());
    let job_path = dir.path().join("job.toml");
    std::fs::write(&job_path, job).unwrap();

    let logs = dir.path().join("run-logs");
    let run = braid_run(&job_path, 2, &logs, Duration::from_secs(300));
    assert!(run.status.success(), "{}\n{}", run.text(), read_logs(&logs));
    let summary = run.summary();
    assert_eq!(summary["finished"], true, "{summary:#}");
    assert_eq!(summary["steps"], 10, "{summary:#}");

    // A coordinator of the same job, and a worker with a wrong token.
    let worker_logs = dir.path().join("logs");
    std::fs::create_dir_all(&worker_logs).unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let _coordinator = spawn_logged(
        &[],
        &["coordinator", "--job", job_path.to_str().unwrap(), "--listen", &address],
        &worker_logs.join("coordinator.log"),
    );
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "tok-not-this-one\n").unwrap();
    let refused = braid(
        ["worker", "--coordinator", &address, "--auth-token-file", wrong.to_str().unwrap(), "--connect-timeout", "20"],
        Duration::from_secs(60),
    );
    assert!(!refused.status.success(), "a worker with a wrong token joined:\n{}", refused.text());
    let text = refused.text();
    assert!(text.contains("Unauthenticated") && text.contains("the bearer token is wrong"), "{text}");
    assert!(!text.contains(token) && !text.contains("tok-not-this-one"), "the worker printed a token:\n{text}");

    // `braid status` needs the token too; with it, it shows the job waiting for workers.
    let denied = braid(["status", "--coordinator", &address], Duration::from_secs(30));
    assert!(!denied.status.success() && denied.text().contains("Unauthenticated"), "{}", denied.text());
    let shown = braid(["status", "--coordinator", &address, "--auth-token-file", token_file.to_str().unwrap()], Duration::from_secs(30));
    assert!(shown.status.success(), "{}", shown.text());
    assert!(shown.stdout.contains("secured") && shown.stdout.contains("waiting"), "{}", shown.stdout);

    let coordinator_log = std::fs::read_to_string(worker_logs.join("coordinator.log")).unwrap();
    assert!(coordinator_log.contains("refused POST /braid.v1.Coordinator/Join"), "{coordinator_log}");
    assert!(!coordinator_log.contains(token) && !coordinator_log.contains("tok-not-this-one"), "{coordinator_log}");
}
