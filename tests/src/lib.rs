//! Helpers shared by the end-to-end tests: the workspace root, the venv's Python, the built
//! `braid` binary, synthetic datasets, job files, `braid` runs with their `--json` summaries,
//! and committed checkpoints read back as tensors.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tch::Tensor;

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

/// The project venv's Python (installed by `scripts/setup.sh --test`).
pub fn venv_python() -> PathBuf {
    workspace_root().join(".venv/bin/python")
}

/// Runs the venv's Python with `args`; panics with its stderr when it fails.
pub fn python(args: &[&str]) -> String {
    let out = Command::new(venv_python()).args(args).output().expect("run the venv's python");
    assert!(out.status.success(), "python {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The `braid` binary of this build (target/<profile>/braid).
pub fn braid_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("braid");
    assert!(bin.exists(), "{} is missing: build it with `cargo build --release --bins` first", bin.display());
    bin
}

/// A synthetic image-caption WebDataset written by `braid data synth`.
#[derive(Debug, Clone)]
pub struct SynthData {
    /// The folder `braid data synth` wrote.
    pub dir: PathBuf,
}

impl SynthData {
    /// `train/manifest.json`.
    pub fn train_manifest(&self) -> PathBuf {
        self.dir.join("train/manifest.json")
    }

    /// `eval/manifest.json`.
    pub fn eval_manifest(&self) -> PathBuf {
        self.dir.join("eval/manifest.json")
    }

    /// `tokenizer.json`.
    pub fn tokenizer(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }
}

/// Writes a synthetic dataset (32x32 PNGs, seed 0) into `dir` with `braid data synth`.
pub fn synth_data(dir: &Path, train_samples: usize, eval_samples: usize, samples_per_shard: usize) -> SynthData {
    let out = braid(
        [
            OsStr::new("data"),
            OsStr::new("synth"),
            dir.as_os_str(),
            OsStr::new("--train-samples"),
            OsStr::new(&train_samples.to_string()),
            OsStr::new("--eval-samples"),
            OsStr::new(&eval_samples.to_string()),
            OsStr::new("--samples-per-shard"),
            OsStr::new(&samples_per_shard.to_string()),
            OsStr::new("--image-size"),
            OsStr::new("32"),
        ],
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "braid data synth failed:\n{}", out.text());
    SynthData { dir: dir.to_path_buf() }
}

/// A job file for a tiny model (CLIP unless `family` says otherwise) on a synthetic dataset,
/// one CPU thread per worker; the fields are the keys the tests vary, the rest keep braid's
/// defaults.
#[derive(Debug, Clone)]
pub struct JobFile {
    /// `job.name`.
    pub name: String,
    /// `job.seed`.
    pub seed: u64,
    /// `model.family` (`preset` is always `tiny`).
    pub family: String,
    /// `data.train`.
    pub train: PathBuf,
    /// `data.eval`.
    pub eval: Option<PathBuf>,
    /// `data.tokenizer`.
    pub tokenizer: PathBuf,
    /// `data.max_corrupt_samples`.
    pub max_corrupt_samples: u64,
    /// `train.global_batch`.
    pub global_batch: usize,
    /// `train.steps`.
    pub steps: u64,
    /// `train.lr`.
    pub lr: f64,
    /// `train.warmup_steps`.
    pub warmup_steps: u64,
    /// `train.weight_decay`.
    pub weight_decay: f64,
    /// `train.precision`.
    pub precision: String,
    /// `train.ema_check_every`, when set.
    pub ema_check_every: Option<u64>,
    /// `cluster.max_workers`, and `cluster.min_workers` unless `min_workers` is set.
    pub workers: usize,
    /// `cluster.min_workers` when it differs from `workers`.
    pub min_workers: Option<usize>,
    /// `cluster.max_restarts` (braid's default is 3; these jobs default to 0).
    pub max_restarts: u32,
    /// `cluster.rendezvous_grace_s`, when set.
    pub rendezvous_grace_s: Option<f64>,
    /// `cluster.heartbeat_timeout_s`, when set.
    pub heartbeat_timeout_s: Option<f64>,
    /// `cluster.collective_timeout_s`, when set.
    pub collective_timeout_s: Option<f64>,
    /// `cluster.coordinator_lease_s`, when set.
    pub coordinator_lease_s: Option<f64>,
    /// `telemetry.sample_ledger`, when set.
    pub sample_ledger: Option<PathBuf>,
    /// `checkpoint.url`.
    pub checkpoint: Option<PathBuf>,
    /// `checkpoint.every_steps`.
    pub every_steps: u64,
    /// `checkpoint.keep`.
    pub keep: usize,
    /// `checkpoint.resume`.
    pub resume: bool,
}

impl JobFile {
    /// A CLIP job named `name` on `data`'s training split: global batch 32, 20 steps, lr 1e-3,
    /// warmup 5, weight decay 0.1, fp32, one worker, no checkpoints, no held-out evaluation,
    /// braid's default `ema_check_every`.
    pub fn new(name: &str, data: &SynthData) -> Self {
        Self {
            name: name.to_string(),
            seed: 0,
            family: "clip".into(),
            train: data.train_manifest(),
            eval: None,
            tokenizer: data.tokenizer(),
            max_corrupt_samples: 100,
            global_batch: 32,
            steps: 20,
            lr: 1e-3,
            warmup_steps: 5,
            weight_decay: 0.1,
            precision: "fp32".into(),
            ema_check_every: None,
            workers: 1,
            min_workers: None,
            max_restarts: 0,
            rendezvous_grace_s: None,
            heartbeat_timeout_s: None,
            collective_timeout_s: None,
            coordinator_lease_s: None,
            sample_ledger: None,
            checkpoint: None,
            every_steps: 0,
            keep: 3,
            resume: false,
        }
    }

    /// The job file's text.
    pub fn to_toml(&self) -> String {
        let path = |p: &Path| format!("{:?}", p.display().to_string());
        let mut t = String::new();
        let _ = writeln!(t, "[job]\nname = {:?}\nseed = {}\n", self.name, self.seed);
        let _ = writeln!(t, "[model]\nfamily = {:?}\npreset = \"tiny\"\n", self.family);
        let _ = writeln!(t, "[data]\ntrain = {}\ntokenizer = {}", path(&self.train), path(&self.tokenizer));
        if let Some(eval) = &self.eval {
            let _ = writeln!(t, "eval = {}", path(eval));
        }
        let _ = writeln!(t, "decode_threads = 1\nmax_corrupt_samples = {}\n", self.max_corrupt_samples);
        let _ = writeln!(
            t,
            "[train]\nglobal_batch = {}\nsteps = {}\nlr = {:?}\nwarmup_steps = {}\nweight_decay = {:?}\nprecision = {:?}\nthreads = 1",
            self.global_batch, self.steps, self.lr, self.warmup_steps, self.weight_decay, self.precision
        );
        if let Some(every) = self.ema_check_every {
            let _ = writeln!(t, "ema_check_every = {every}");
        }
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "[cluster]\nmin_workers = {}\nmax_workers = {}\nmax_restarts = {}",
            self.min_workers.unwrap_or(self.workers),
            self.workers,
            self.max_restarts
        );
        for (key, value) in [
            ("rendezvous_grace_s", self.rendezvous_grace_s),
            ("heartbeat_timeout_s", self.heartbeat_timeout_s),
            ("collective_timeout_s", self.collective_timeout_s),
            ("coordinator_lease_s", self.coordinator_lease_s),
        ] {
            if let Some(v) = value {
                let _ = writeln!(t, "{key} = {v:?}");
            }
        }
        let _ = writeln!(t);
        if let Some(ledger) = &self.sample_ledger {
            let _ = writeln!(t, "[telemetry]\nsample_ledger = {}\n", path(ledger));
        }
        if let Some(url) = &self.checkpoint {
            let _ = writeln!(
                t,
                "[checkpoint]\nurl = {}\nevery_steps = {}\nkeep = {}\nresume = {}",
                path(url),
                self.every_steps,
                self.keep,
                self.resume
            );
        }
        t
    }

    /// Writes the job file to `path` and returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.to_toml()).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.to_path_buf()
    }
}

/// What a finished `braid` process printed and how it exited.
#[derive(Debug)]
pub struct BraidOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
    /// Wall time from start to exit.
    pub elapsed: Duration,
}

impl BraidOutput {
    /// Stdout and stderr together, for assertions on messages and for panic messages.
    pub fn text(&self) -> String {
        format!("--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr)
    }

    /// The `--json` summary of `braid run` (its stdout as JSON).
    pub fn summary(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("braid's stdout is not a JSON summary ({e}):\n{}", self.text()))
    }
}

/// Runs the `braid` binary with `args`; kills it and panics if it runs longer than `timeout`.
pub fn braid<I, S>(args: I, timeout: Duration) -> BraidOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(braid_bin());
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let shown = format!("{command:?}");
    let started = Instant::now();
    let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {shown}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for braid") {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let (out, err) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
            panic!("{shown} still running after {timeout:?}; killed it\n--- stdout\n{out}\n--- stderr\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed();
    BraidOutput {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed,
    }
}

/// `braid run JOB --workers N --json --log-dir LOG_DIR`, bounded by `timeout`.
pub fn braid_run(job: &Path, workers: usize, log_dir: &Path, timeout: Duration) -> BraidOutput {
    braid(
        [
            OsStr::new("run"),
            job.as_os_str(),
            OsStr::new("--workers"),
            OsStr::new(&workers.to_string()),
            OsStr::new("--json"),
            OsStr::new("--log-dir"),
            log_dir.as_os_str(),
        ],
        timeout,
    )
}

/// Every `*.log` file in `dir`, concatenated in name order (the workers' logs of `braid run`).
pub fn read_logs(dir: &Path) -> String {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

/// A child process that is killed when this value is dropped (a coordinator started by a test).
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `braid ARGS`, behind `prefix` when it is not empty (e.g. `ip netns exec NS`), with
/// its output in the file `log`; the process is killed when the value is dropped.
pub fn spawn_logged<S: AsRef<OsStr>>(prefix: &[&str], args: &[S], log: &Path) -> KillOnDrop {
    let file = std::fs::File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
    let mut command = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(braid_bin());
            c
        }
        None => Command::new(braid_bin()),
    };
    command.args(args).stdin(Stdio::null()).stdout(file.try_clone().expect("log file handle")).stderr(file);
    KillOnDrop(command.spawn().unwrap_or_else(|e| panic!("starting {command:?}: {e}")))
}

impl KillOnDrop {
    /// Waits until the process exits; panics with `context()` (e.g. the logs) at `deadline`.
    pub fn wait_until(&mut self, deadline: Instant, context: impl Fn() -> String) -> std::process::ExitStatus {
        loop {
            if let Some(status) = self.0.try_wait().expect("waiting for a child") {
                return status;
            }
            assert!(Instant::now() < deadline, "process {} still running at the deadline:\n{}", self.0.id(), context());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port()
}

/// Copies the folder `from` to `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("creating {}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("reading {}: {e}", from.display())) {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copying {} to {}: {e}", entry.path().display(), target.display()));
        }
    }
}

/// The manifest path (relative to the checkpoint root) that `<root>/latest` points at.
pub fn latest_manifest(root: &Path) -> String {
    let latest = root.join("latest");
    std::fs::read_to_string(&latest).unwrap_or_else(|e| panic!("reading {}: {e}", latest.display())).trim().to_string()
}

/// Every tensor of the checkpoint whose manifest is `manifest` (relative to `root`), by name:
/// `model.<param>`, `optim.<name>` and `train.step` from all parts.
pub fn read_checkpoint(root: &Path, manifest: &str) -> BTreeMap<String, Tensor> {
    let path = root.join(manifest);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let parts = json["parts"].as_array().unwrap_or_else(|| panic!("{} has no parts", path.display()));
    let mut tensors = BTreeMap::new();
    for part in parts {
        let part_path = root.join(part["path"].as_str().expect("a part's path"));
        let read =
            Tensor::read_safetensors(&part_path).unwrap_or_else(|e| panic!("reading {}: {e}", part_path.display()));
        tensors.extend(read);
    }
    assert!(!tensors.is_empty(), "{} holds no tensors", path.display());
    tensors
}

/// The checkpoint `<root>/latest` points at; see [`read_checkpoint`].
pub fn read_latest_checkpoint(root: &Path) -> BTreeMap<String, Tensor> {
    read_checkpoint(root, &latest_manifest(root))
}

/// The tensors whose names start with `prefix` (`"model."`, `"optim."`).
pub fn with_prefix<'a>(tensors: &'a BTreeMap<String, Tensor>, prefix: &str) -> BTreeMap<&'a str, &'a Tensor> {
    tensors.iter().filter(|(name, _)| name.starts_with(prefix)).map(|(name, t)| (name.as_str(), t)).collect()
}

/// `max |a - b| / max(max |a|, 1e-30)`, in double precision.
pub fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "tensors of different shapes");
    let (a, b) = (a.to_kind(tch::Kind::Double), b.to_kind(tch::Kind::Double));
    let diff = (&a - &b).abs().max().double_value(&[]);
    let scale = a.abs().max().double_value(&[]).max(1e-30);
    diff / scale
}

/// An S3-compatible server (moto, from the venv that `scripts/setup.sh --test` fills) on a free
/// port of 127.0.0.1; killed when dropped.
#[derive(Debug)]
pub struct MotoServer {
    process: KillOnDrop,
    port: u16,
    log: PathBuf,
}

impl MotoServer {
    /// Starts the server, logging into `log`, and waits until it accepts connections.
    pub fn start(log: &Path) -> Self {
        let port = free_port();
        let log_file = std::fs::File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let mut command = Command::new(venv_python());
        command
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone the log file"))
            .stderr(log_file);
        let child =
            command.spawn().unwrap_or_else(|e| panic!("starting {command:?}: {e} (run scripts/setup.sh --test)"));
        let mut server = Self { process: KillOnDrop(child), port, log: log.to_path_buf() };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.process.0.try_wait().expect("waiting for moto") {
                panic!(
                    "the moto server exited with {status} (is moto[server] installed? run scripts/setup.sh --test):\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the moto server did not listen on port {port} in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// The server's log so far: one line per request it answered.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates `bucket` with a plain `PUT /<bucket>` (the server does not check signatures).
    pub fn create_bucket(&self, bucket: &str) {
        use std::io::Write as _;
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .expect("send PUT bucket");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("read the PUT bucket reply");
        let status = reply.lines().next().unwrap_or_default();
        assert!(status.contains(" 200 "), "creating bucket {bucket}: {status}\n{reply}");
    }

    /// The `AWS_*` settings of a client of this server, with the given secret key.
    pub fn client_env(&self, secret_access_key: &str) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", secret_access_key.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// A `braid run` started in its own process group (with its workers), so the whole job can be
/// killed at once; the group is killed when this value is dropped.
#[derive(Debug)]
pub struct BraidRunProcess {
    child: Child,
    shown: String,
    started: Instant,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// Starts `braid run JOB --workers N --json --log-dir LOG_DIR` with `env` added to its
/// environment (its workers inherit it), in a new process group.
pub fn spawn_braid_run(job: &Path, workers: usize, log_dir: &Path, env: &[(String, String)]) -> BraidRunProcess {
    let workers = workers.to_string();
    let args: [&OsStr; 7] = [
        "run".as_ref(),
        job.as_os_str(),
        "--workers".as_ref(),
        workers.as_ref(),
        "--json".as_ref(),
        "--log-dir".as_ref(),
        log_dir.as_os_str(),
    ];
    spawn_braid(args, env)
}

/// Starts `braid ARGS` with `env` added to its environment, in a new process group (like
/// [`spawn_braid_run`], for runs with other options, e.g. without `--json`).
pub fn spawn_braid<I, S>(args: I, env: &[(String, String)]) -> BraidRunProcess
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    use std::os::unix::process::CommandExt as _;
    let mut command = Command::new(braid_bin());
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let shown = format!("{command:?}");
    let started = Instant::now();
    let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {shown}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = Some(drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>)));
    let stderr = Some(drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>)));
    BraidRunProcess { child, shown, started, stdout, stderr }
}

/// The ids of the live (not zombie) processes in process group `group`, from `/proc`.
pub fn processes_in_group(group: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
            // Fields after the parenthesised command name: state, ppid, pgrp, ...
            let fields: Vec<&str> =
                stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
            fields.len() > 2 && fields[0] != "Z" && fields[2] == group.to_string()
        })
        .collect()
}

impl BraidRunProcess {
    /// The process id of `braid run`, which is also its process group's id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// True once `braid run` has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().expect("waiting for braid run").is_some()
    }

    /// kill -9 of `braid run` and every process of its group (the workers); waits until none is
    /// left. Returns what `braid run` had printed.
    pub fn kill_group(mut self) -> BraidOutput {
        self.kill_and_reap();
        self.collect()
    }

    fn kill_and_reap(&mut self) {
        let group = self.child.id();
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{group}")]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let started = Instant::now();
        loop {
            let left = processes_in_group(group);
            if left.is_empty() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "processes {left:?} of group {group} outlived kill -9"
            );
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{group}")]).status();
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn collect(&mut self) -> BraidOutput {
        let status = self.child.wait().expect("waiting for braid run");
        BraidOutput {
            status,
            stdout: self.stdout.take().map(|t| t.join().unwrap_or_default()).unwrap_or_default(),
            stderr: self.stderr.take().map(|t| t.join().unwrap_or_default()).unwrap_or_default(),
            elapsed: self.started.elapsed(),
        }
    }

    /// Waits for `braid run` to exit; kills the group and panics after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> BraidOutput {
        while !self.has_exited() {
            if self.started.elapsed() > timeout {
                self.kill_and_reap();
                let out = self.collect();
                panic!("{} still running after {timeout:?}; killed it\n{}", self.shown, out.text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.collect()
    }
}

impl Drop for BraidRunProcess {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).status();
            let _ = self.child.wait();
        }
    }
}

impl BraidRunProcess {
    /// Waits until `braid run` and every other process of its group (its workers) have exited;
    /// kills the group and panics after `timeout`. Returns what `braid run` printed.
    pub fn wait_for_group(mut self, timeout: Duration) -> BraidOutput {
        let group = self.child.id();
        while !self.has_exited() || !processes_in_group(group).is_empty() {
            if self.started.elapsed() > timeout {
                let left = processes_in_group(group);
                self.kill_and_reap();
                let out = self.collect();
                panic!(
                    "{} or its processes {left:?} still running after {timeout:?}; killed them\n{}",
                    self.shown,
                    out.text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.collect()
    }
}

/// Checks that the checkpoint whose manifest is `manifest` (relative to `root`) is complete: the
/// manifest parses as JSON with a `step` and a non-empty `parts` list, and every part exists
/// with the size and sha256 the manifest lists. Returns the manifest, or what is wrong with it.
pub fn verify_checkpoint(root: &Path, manifest: &str) -> Result<serde_json::Value, String> {
    use sha2::{Digest, Sha256};
    let path = root.join(manifest);
    let text = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    json["step"].as_u64().ok_or_else(|| format!("{} has no step", path.display()))?;
    let parts = json["parts"].as_array().filter(|p| !p.is_empty());
    let parts = parts.ok_or_else(|| format!("{} lists no parts", path.display()))?;
    for part in parts {
        let rel = part["path"].as_str().ok_or_else(|| format!("{}: a part without a path", path.display()))?;
        let part_path = root.join(rel);
        let bytes = std::fs::read(&part_path).map_err(|e| format!("part {}: {e}", part_path.display()))?;
        let size = part["size"].as_u64();
        if size != Some(bytes.len() as u64) {
            return Err(format!("part {} has {} bytes, the manifest says {size:?}", part_path.display(), bytes.len()));
        }
        let digest = hex::encode(Sha256::digest(&bytes));
        if part["sha256"].as_str() != Some(digest.as_str()) {
            return Err(format!(
                "part {} has sha256 {digest}, the manifest says {}",
                part_path.display(),
                part["sha256"]
            ));
        }
    }
    Ok(json)
}

/// A tensor's kind, shape and bytes: what a bitwise comparison looks at, and, unlike a
/// `Tensor`, shareable between threads (a reference result kept in a `static`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorBits {
    /// Element type.
    pub kind: tch::Kind,
    /// Shape.
    pub shape: Vec<i64>,
    /// The elements' bytes, in row-major order.
    pub bytes: Vec<u8>,
}

impl TensorBits {
    /// The bits of `tensor`.
    pub fn of(tensor: &Tensor) -> Self {
        let tensor = tensor.contiguous();
        let numel = tensor.numel();
        let mut bytes = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
        tensor.copy_data_u8(&mut bytes, numel);
        Self { kind: tensor.kind(), shape: tensor.size(), bytes }
    }
}

/// The bits of the training state in `tensors`: every `model.*` and `optim.*` tensor, by name.
pub fn state_bits(tensors: &BTreeMap<String, Tensor>) -> BTreeMap<String, TensorBits> {
    tensors
        .iter()
        .filter(|(name, _)| name.starts_with("model.") || name.starts_with("optim."))
        .map(|(name, t)| (name.clone(), TensorBits::of(t)))
        .collect()
}

/// The names whose bits differ between `a` and `b`, including names only one of them holds.
pub fn differing_bits(a: &BTreeMap<String, TensorBits>, b: &BTreeMap<String, TensorBits>) -> Vec<String> {
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    names.into_iter().filter(|name| a.get(*name) != b.get(*name)).cloned().collect()
}

/// A plain HTTP/1.1 response: status code, headers (lowercase names) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body as text.
    pub body: String,
}

/// Sends `method path` with `headers` and `body` to `address` (`host:port`) over plain HTTP/1.1
/// and reads the whole response (the connection is closed after it). `Err` when the connection
/// fails.
pub fn http_request(address: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> std::io::Result<HttpResponse> {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_string() };
    Ok(HttpResponse { status, headers, body })
}

/// `GET path` from `address`; panics when the connection fails.
pub fn http_get(address: &str, path: &str) -> HttpResponse {
    http_request(address, "GET", path, &[], "").unwrap_or_else(|e| panic!("GET http://{address}{path}: {e}"))
}

/// The body of a chunked transfer encoding.
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}

/// `text` percent-encoded for a URL query value.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
