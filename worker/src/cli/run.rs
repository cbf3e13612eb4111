//! `braid run` (embedded coordinator + local workers), `braid worker` and `braid coordinator`.

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use braid::eval::{evaluate, EvalOptions, EvalReport};
use braid::worker::{parse_device, WorkerOptions};
use braid_coordinator::config::JobConfig;
use braid_coordinator::state::Progress;
use clap::Args;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Options of `braid run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file.
    job: PathBuf,
    /// Worker processes to start (sets `cluster.min_workers` and `max_workers`).
    #[arg(long)]
    workers: Option<usize>,
    /// Device of every worker (overrides `cluster.device`): cpu, cuda (one GPU per worker) or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Folder for the workers' logs (default `runs/<job name>` under the current folder).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Skip the held-out evaluation at the end.
    #[arg(long)]
    no_eval: bool,
    /// Print one JSON summary instead of the progress bar and text.
    #[arg(long)]
    json: bool,
}

/// Options of `braid worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Coordinator address, host:port.
    #[arg(long, env = "BRAID_COORDINATOR")]
    coordinator: String,
    /// Device: cpu, cuda or cuda:N (default: the job's `cluster.device`).
    #[arg(long)]
    device: Option<String>,
    /// Seconds to keep trying to reach the coordinator.
    #[arg(long, default_value_t = 30.0)]
    connect_timeout: f64,
    /// Host name or address other workers use to reach this one.
    #[arg(long, env = "BRAID_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// JSON log lines.
    #[arg(long)]
    json_logs: bool,
    #[command(flatten)]
    security: super::security::ClientSecurityArgs,
}

/// Options of `braid coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// The job file.
    #[arg(long)]
    job: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7070")]
    listen: String,
    /// When another coordinator's lease on the job is live, wait for it to expire (a restart
    /// after a crash) instead of refusing to start.
    #[arg(long)]
    wait_for_lease: bool,
}

/// Runs `braid worker`.
pub fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(args.json_logs);
    if let Some(d) = &args.device {
        parse_device(d).ok_or_else(|| anyhow::anyhow!("--device {d:?}: use cpu, cuda or cuda:N"))?;
    }
    braid::worker::run(WorkerOptions {
        coordinator: args.coordinator,
        device: args.device,
        connect_timeout: Duration::from_secs_f64(args.connect_timeout),
        advertise_host: args.advertise_host,
        security: args.security.load()?,
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `braid coordinator`.
pub fn coordinator(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(false);
    let config = super::load_job(&args.job)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
        let shutdown = CancellationToken::new();
        let takeover = braid_coordinator::server::Takeover::Resume { wait_for_lease: args.wait_for_lease };
        let handle = braid_coordinator::server::start_with(config, takeover, listener, shutdown.clone()).await?;
        tokio::select! {
            _ = handle.ended() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let progress = handle.progress();
        handle.drained(Duration::from_secs(10)).await;
        handle.shutdown();
        handle.join().await?;
        match progress.failure {
            Some(f) => anyhow::bail!("job failed: {f}"),
            None => Ok(ExitCode::SUCCESS),
        }
    })
}

/// The end-of-run summary (`--json` prints it as is).
#[derive(Debug, Serialize)]
struct RunSummary {
    job: String,
    finished: bool,
    failure: Option<String>,
    preempted_after: Option<u64>,
    workers: usize,
    /// Worker processes restarted after they died.
    restarts: u32,
    steps: u64,
    final_loss: Option<f64>,
    samples_per_second: Option<f64>,
    wall_seconds: f64,
    corrupt_samples: u64,
    checkpoints: Vec<String>,
    eval: Option<EvalReport>,
    log_dir: PathBuf,
}

/// Runs `braid run`.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut config = super::load_job(&args.job)?;
    if let Some(n) = args.workers {
        anyhow::ensure!(n >= 1, "--workers must be at least 1");
        config.cluster.min_workers = n;
        config.cluster.max_workers = n;
    }
    if let Some(device) = &args.device {
        config.cluster.device = device.clone();
    }
    config.validate(&args.job.display().to_string())?;
    // The progress bar (or the JSON summary on stdout) shows the job; warnings and errors
    // are logged to stderr.
    super::init_logging_with(false, "warn");
    let workers = config.cluster.max_workers;
    let log_dir = args.log_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&config.job.name));
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating log folder {}", log_dir.display()))?;

    let runtime = tokio::runtime::Runtime::new()?;
    let shutdown = CancellationToken::new();
    let handle = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let launch = braid_coordinator::server::Takeover::Launch;
        anyhow::Ok(braid_coordinator::server::start_with(config.clone(), launch, listener, shutdown.clone()).await?)
    })?;
    let address = handle.local_addr().to_string();
    if !args.json {
        eprintln!(
            "coordinator on {address} (e.g. `braid checkpoint now --coordinator {address} --job {}`); worker logs in {}",
            config.job.name,
            log_dir.display()
        );
    }
    let started = Instant::now();
    let launcher = WorkerLauncher::new(&address, &config, &log_dir)?;
    let mut children = (0..workers).map(|i| launcher.spawn(i, None)).collect::<anyhow::Result<Vec<Child>>>()?;
    let mut restarts = 0u32;

    let bar = (!args.json).then(|| progress_bar(config.train.steps));
    let mut failed_worker: Option<String> = None;
    let signalled = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
    runtime.spawn(checkpoint_on_signal(handle.service().clone(), signalled.clone()));
    let grace = Duration::from_secs_f64(config.checkpoint.grace_period_s);
    let mut exited = vec![false; workers];
    loop {
        let since_signal = *signalled.lock().unwrap_or_else(|e| e.into_inner());
        if since_signal.is_some_and(|t| t.elapsed() > grace) && failed_worker.is_none() {
            failed_worker = Some(format!(
                "the grace period of {:.0} s after the stop signal ended before the checkpoint was committed",
                grace.as_secs_f64()
            ));
        }
        let progress = handle.progress();
        if let Some(bar) = &bar {
            update_bar(bar, &progress);
        }
        for i in 0..children.len() {
            if exited[i] {
                continue;
            }
            let Some(status) = children[i].try_wait()? else { continue };
            let over = handle.progress().is_over();
            if status.success() || over || since_signal.is_some() {
                exited[i] = true;
            } else if restarts < config.cluster.max_restarts {
                restarts += 1;
                let message = format!(
                    "worker {i} exited with {status}; restarting it (restart {restarts} of cluster.max_restarts = {}); its log: {}",
                    config.cluster.max_restarts,
                    launcher.log_path(i).display()
                );
                tracing::warn!("{message}");
                if let Some(bar) = &bar {
                    bar.println(message);
                }
                children[i] = launcher.spawn(i, Some(restarts))?;
            } else {
                // No restarts left: the job goes on with the others (down to min_workers; below
                // it waits for workers started by hand against the coordinator's address).
                exited[i] = true;
                let message = format!(
                    "worker {i} exited with {status}; not restarted (cluster.max_restarts = {} used); its log: {}",
                    config.cluster.max_restarts,
                    launcher.log_path(i).display()
                );
                tracing::warn!("{message}");
                if let Some(bar) = &bar {
                    bar.println(message);
                }
                let alive = exited.iter().filter(|e| !**e).count();
                if alive < config.cluster.min_workers && failed_worker.is_none() {
                    failed_worker = Some(format!(
                        "worker {i} exited with {status} and no restarts are left (cluster.max_restarts = {}): {alive} \
                         local worker(s) remain, fewer than cluster.min_workers = {}; its log: {}",
                        config.cluster.max_restarts,
                        config.cluster.min_workers,
                        launcher.log_path(i).display()
                    ));
                }
            }
        }
        let all_exited = exited.iter().all(|e| *e);
        if progress.is_over() && all_exited || failed_worker.is_some() || (all_exited && !progress.is_over()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if failed_worker.is_some() {
        for child in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let progress = handle.progress();
    if let Some(bar) = &bar {
        update_bar(bar, &progress);
        bar.finish_and_clear();
    }
    handle.shutdown();
    let _ = runtime.block_on(handle.join());

    let failure = progress.failure.clone().or(failed_worker).or_else(|| {
        (!progress.finished && progress.preempted_after.is_none())
            .then(|| format!("workers exited before the job finished; logs in {}", log_dir.display()))
    });
    let eval = match (&failure, config.data.eval.is_some(), args.no_eval || !progress.finished, config.checkpoint.url.is_some()) {
        (None, true, false, true) => {
            let report = evaluate(&config, &EvalOptions { checkpoint: None, data: None, batch: 256, device: tch::Device::Cpu })
                .context("held-out evaluation")?;
            Some(report)
        }
        _ => None,
    };
    let summary = RunSummary {
        job: config.job.name.clone(),
        finished: progress.finished,
        failure: failure.clone(),
        preempted_after: progress.preempted_after,
        workers,
        restarts,
        steps: progress.steps_done,
        final_loss: progress.loss,
        samples_per_second: progress.samples_per_second,
        wall_seconds: started.elapsed().as_secs_f64(),
        corrupt_samples: progress.corrupt_samples,
        checkpoints: progress.checkpoints.iter().map(|c| c.manifest_url.clone()).collect(),
        eval,
        log_dir,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(if failure.is_some() { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// On SIGTERM or SIGINT: asks the embedded coordinator for a checkpoint and a stop, and
/// records when, so the grace period can be enforced.
async fn checkpoint_on_signal(service: braid_coordinator::service::CoordinatorService, signalled: std::sync::Arc<std::sync::Mutex<Option<Instant>>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else { return };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    *signalled.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    match service.checkpoint_now(&format!("{name} on braid run"), true) {
        Ok(_) => tracing::warn!("{name}: checkpointing, then stopping"),
        Err(e) => tracing::warn!("{name}: {e}"),
    }
}

/// How `braid run` starts its local workers.
struct WorkerLauncher {
    exe: PathBuf,
    address: String,
    device: String,
    gpus: usize,
    log_dir: PathBuf,
    /// The job's `[security] auth_token_file`, handed to the workers (the token itself, from
    /// BRAID_AUTH_TOKEN, reaches them through the inherited environment).
    auth_token_file: Option<String>,
}

impl WorkerLauncher {
    fn new(address: &str, config: &JobConfig, log_dir: &std::path::Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the braid binary")?;
        let device = config.cluster.device.clone();
        let gpus = if device == "cuda" { tch::Cuda::device_count().max(1) as usize } else { 1 };
        let auth_token_file = config.security.auth_token_file.clone();
        Ok(Self { exe, address: address.to_string(), device, gpus, log_dir: log_dir.to_path_buf(), auth_token_file })
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.log_dir.join(format!("worker-{i}.log"))
    }

    /// Starts worker `i`; a restart appends to the same log after a marker line.
    fn spawn(&self, i: usize, restart: Option<u32>) -> anyhow::Result<Child> {
        use std::io::Write;
        let log_path = self.log_path(i);
        let mut log = match restart {
            None => std::fs::File::create(&log_path),
            Some(_) => std::fs::OpenOptions::new().create(true).append(true).open(&log_path),
        }
        .with_context(|| format!("opening {}", log_path.display()))?;
        if let Some(n) = restart {
            writeln!(log, "===== braid run: restart {n} of worker {i} =====")?;
        }
        let mut cmd = Command::new(&self.exe);
        cmd.args(["worker", "--coordinator", &self.address, "--advertise-host", "127.0.0.1"]);
        if self.device == "cuda" {
            cmd.args(["--device", &format!("cuda:{}", i % self.gpus)]);
        }
        if let Some(file) = &self.auth_token_file {
            cmd.env("BRAID_AUTH_TOKEN_FILE", file);
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt as _;
            // The workers die with `braid run`: without its embedded coordinator they cannot
            // finish the job, and nothing else would stop them.
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.spawn().with_context(|| format!("starting worker {i}"))
    }
}

fn progress_bar(steps: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn update_bar(bar: &indicatif::ProgressBar, p: &Progress) {
    bar.set_position(p.steps_done);
    let mut msg = format!("gen {} W={}", p.generation, p.world_size);
    if let Some(loss) = p.loss {
        msg += &format!("  loss {loss:.4}");
    }
    if let Some(sps) = p.samples_per_second {
        msg += &format!("  {sps:.0} samples/s");
    }
    if p.generation == 0 {
        msg = format!("waiting for workers ({} joined)", p.members.len());
    }
    bar.set_message(msg);
}

fn print_summary(s: &RunSummary) {
    match (&s.failure, s.preempted_after) {
        (Some(f), _) => println!("job {} FAILED after {} steps: {f}", s.job, s.steps),
        (None, Some(step)) => println!(
            "job {} stopped after the checkpoint of step {step} ({:.1} s); run it again to resume",
            s.job, s.wall_seconds
        ),
        (None, None) => println!("job {} finished: {} steps with {} workers in {:.1} s", s.job, s.steps, s.workers, s.wall_seconds),
    }
    if s.restarts > 0 {
        println!("worker restarts: {}", s.restarts);
    }
    if let Some(loss) = s.final_loss {
        println!("final loss: {loss:.4}");
    }
    if let Some(sps) = s.samples_per_second {
        println!("throughput: {sps:.0} samples/s");
    }
    if s.corrupt_samples > 0 {
        println!("corrupt samples skipped: {}", s.corrupt_samples);
    }
    if let Some(last) = s.checkpoints.last() {
        println!("checkpoint: {last}");
    }
    if let Some(eval) = &s.eval {
        print!("{eval}");
    }
    println!("worker logs: {}", s.log_dir.display());
}
