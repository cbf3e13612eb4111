//! The coordinator's status page (`GET /`) during a real job, as a browser renders it: Debian's
//! Chromium (installed by the test command) loads the page headless, and the test reads the DOM
//! it rendered (members, ranks, state, charts, checkpoints) and keeps a screenshot at
//! `target/test-artifacts/status-page.png`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use braid_tests::{braid, braid_bin, free_port, http_request, read_logs, spawn_logged, synth_data, JobFile};
use serde_json::Value;

/// How long one Chromium run may take before it is killed.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);

/// Steps the job has trained, and a checkpoint committed, before the page is rendered.
const STEPS_BEFORE_RENDER: u64 = 20;

/// The `chromium` binary; the test command installs Debian's package.
fn chromium_bin() -> &'static str {
    let found = Command::new("chromium").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "chromium is not installed: ./scripts/setup.sh --test installs Debian's `chromium` package"
    );
    "chromium"
}

/// Runs headless Chromium on `url` with `args` (a fresh profile under `dir`) and returns what it
/// printed on stdout; kills its process group after [`CHROMIUM_TIMEOUT`].
fn chromium(dir: &Path, name: &str, args: &[String], url: &str) -> String {
    use std::os::unix::process::CommandExt as _;
    let stdout = dir.join(format!("{name}.out"));
    let stderr = dir.join(format!("{name}.err"));
    let mut command = Command::new(chromium_bin());
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run"])
        .arg("--window-size=1280,2000")
        .arg(format!("--user-data-dir={}", dir.join(format!("{name}-profile")).display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .process_group(0);
    let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    let kill_group = |pid: u32| {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
    };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for chromium") {
            break status;
        }
        if started.elapsed() > CHROMIUM_TIMEOUT {
            kill_group(child.id());
            let _ = child.wait();
            panic!(
                "{command:?} still running after {CHROMIUM_TIMEOUT:?}; killed it\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Helpers it started (zygote, renderer) normally exit with it; make sure none is left.
    kill_group(child.id());
    let err = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(status.success(), "{command:?} failed ({status}):\n{err}");
    std::fs::read_to_string(&stdout).unwrap_or_default()
}

/// The job's `/status`; `None` while the coordinator is not listening yet.
fn status(address: &str) -> Option<Value> {
    let response = http_request(address, "GET", "/status", &[], "").ok()?;
    assert_eq!(response.status, 200, "/status: {}", response.body);
    Some(serde_json::from_str(&response.body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {}", response.body)))
}

/// The part of `html` from the element that starts with `start` to the next `end`.
fn element<'a>(html: &'a str, start: &str, end: &str) -> &'a str {
    let at = html.find(start).unwrap_or_else(|| panic!("no {start:?} in the rendered page:\n{html}"));
    let len = html[at..].find(end).unwrap_or_else(|| panic!("{start:?} has no {end:?} after it"));
    &html[at..at + len]
}

/// `target/test-artifacts` of this build (next to `target/release`).
fn artifacts_dir() -> PathBuf {
    let target = braid_bin().parent().and_then(Path::parent).expect("target/<profile>/braid").to_path_buf();
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

#[test]
fn chromium_renders_the_status_page_of_a_training_job() {
    chromium_bin();
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 640, 20, 100);
    let job = JobFile {
        family: "albef".into(),
        tokenizer: data.dir.join("tokenizer-bert.json"),
        workers: 2,
        steps: 100_000,
        checkpoint: Some(dir.path().join("ckpt")),
        every_steps: 5,
        keep: 1000,
        ..JobFile::new("status-page", &data)
    }
    .write(&dir.path().join("job.toml"));
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let spawn = |args: &[&str], log: &str| spawn_logged(&[], args, &logs.join(log));
    let _coordinator = spawn(&["coordinator", "--job", job.to_str().unwrap(), "--listen", &address], "coordinator.log");
    let worker_args = ["worker", "--coordinator", &address, "--advertise-host", "127.0.0.1"];
    let _workers = [spawn(&worker_args, "worker-0.log"), spawn(&worker_args, "worker-1.log")];

    let deadline = Instant::now() + Duration::from_secs(300);
    let training = loop {
        if let Some(s) = status(&address) {
            let trained = s["steps_done"].as_u64().is_some_and(|d| d >= STEPS_BEFORE_RENDER);
            if trained && s["world_size"] == 2 && !s["last_checkpoint"].is_null() {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "no {STEPS_BEFORE_RENDER} steps and a checkpoint in time:\n{}", read_logs(&logs));
        std::thread::sleep(Duration::from_millis(200));
    };
    let members: Vec<(String, u64)> = training["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["worker_id"].as_str().unwrap().to_string(), m["rank"].as_u64().expect("a rank")))
        .collect();
    assert_eq!(members.len(), 2, "{training:#}");
    let checkpoint_step = training["checkpoints"][0]["step"].as_u64().expect("a committed checkpoint");

    let page = http_request(&address, "GET", "/", &[], "").expect("GET /");
    assert_eq!(page.status, 200, "{}", page.body);
    let content_type = page.headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v.as_str());
    assert_eq!(content_type, Some("text/html; charset=utf-8"));
    assert!(page.body.starts_with("<!DOCTYPE html>") && page.body.contains("<svg"), "{}", page.body);

    let url = format!("http://{address}/");
    let browser = dir.path().join("chromium");
    std::fs::create_dir_all(&browser).unwrap();
    let dom = chromium(&browser, "dump-dom", &["--dump-dom".into()], &url);
    assert!(dom.contains("<h1>status-page</h1>"), "{dom}");
    assert!(element(&dom, "<span class=\"state", "</span>").ends_with(">training"), "{dom}");
    for (worker, rank) in &members {
        let row = element(&dom, &format!("<tr><td>{worker}</td>"), "</tr>");
        assert!(row.contains(&format!("<td class=\"num rank\">{rank}</td>")) && row.contains("<td>training</td>"), "{row}");
        // CPU workers: the GPU memory cell (before the straggler cell) says there is none.
        assert!(row.contains("<td class=\"num\">-</td><td>"), "{row}");
    }
    assert!(dom.contains("<th>GPU memory</th>"), "{dom}");
    for (chart, lines) in [("loss-chart", 4), ("throughput-chart", 1), ("lr-chart", 1)] {
        let figure = element(&dom, &format!("<figure id=\"{chart}\""), "</figure>");
        assert!(figure.contains("<svg"), "{figure}");
        // ALBEF's loss has three terms (itc, itm, mlm), each a line beside the total.
        assert_eq!(figure.matches("<path class=\"series\"").count(), lines, "{figure}");
        assert!(figure.contains(" d=\"M") && figure.contains(" L"), "a line through several steps: {figure}");
        assert!(!figure.contains("no data yet"), "{figure}");
    }
    let checkpoints = element(&dom, "<table id=\"checkpoints\"", "</table>");
    assert!(checkpoints.contains(&format!("<td class=\"num\">{checkpoint_step}</td>")), "{checkpoints}");
    assert!(dom.contains("id=\"checkpoint-cost\""), "{dom}");

    let screenshot = artifacts_dir().join("status-page.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium(&browser, "screenshot", &[format!("--screenshot={}", screenshot.display())], &url);
    let png = std::fs::read(&screenshot).unwrap_or_else(|e| panic!("chromium wrote no screenshot at {}: {e}", screenshot.display()));
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", screenshot.display());
    let (width, height) = (u32::from_be_bytes(png[16..20].try_into().unwrap()), u32::from_be_bytes(png[20..24].try_into().unwrap()));
    assert_eq!((width, height), (1280, 2000), "the screenshot's size");
    assert!(png.len() > 20_000, "a {}-byte screenshot is too small to show the page", png.len());
    println!("status page screenshot: {} ({} bytes, {width}x{height})", screenshot.display(), png.len());

    let text = braid(["status", "--coordinator", &address], Duration::from_secs(30));
    assert!(text.status.success(), "{}", text.text());
    println!("{}", text.stdout);
    for expected in ["loss terms: ", "itc ", "last checkpoint cost: step ", " GPU memory "] {
        assert!(text.stdout.contains(expected), "no {expected:?} in braid status:\n{}", text.stdout);
    }
}
