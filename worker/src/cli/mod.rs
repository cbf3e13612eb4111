//! The `braid` command line: one module per command group.

mod bench;
mod checkpoint;
mod data;
mod deploy;
mod eval;
mod export;
mod infer;
mod run;
mod security;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use braid_coordinator::config::JobConfig;
use clap::{Parser, Subcommand};

/// braid: distributed pretraining for multimodal models.
#[derive(Debug, Parser)]
#[command(name = "braid", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a job on this machine: an embedded coordinator and N worker processes.
    Run(run::RunArgs),
    /// Start one worker that joins a coordinator.
    Worker(run::WorkerArgs),
    /// Start a coordinator for a job (the same as the `braid-coordinator` binary).
    Coordinator(run::CoordinatorArgs),
    /// Show a running job: generation, members, stragglers, why it waits, checkpoints.
    Status(status::StatusArgs),
    /// Make or index WebDataset shards.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Evaluate a checkpoint on held-out data: retrieval R@1/5/10 and zero-shot accuracy.
    Eval(eval::EvalArgs),
    /// Export a committed checkpoint's model in open_clip's or transformers' layout.
    Export(export::ExportArgs),
    /// Captions, image-text matching and contrastive scores from a checkpoint or reference weights.
    Infer(infer::InferArgs),
    /// List committed checkpoints or show one's manifest.
    #[command(subcommand)]
    Checkpoint(checkpoint::CheckpointCommand),
    /// Measure training-step throughput of a model preset on synthetic tensors.
    Bench(bench::BenchArgs),
    /// Render deployment manifests for a job (`braid deploy k8s JOB`).
    #[command(subcommand)]
    Deploy(deploy::DeployCommand),
    /// Check what GPU workers rely on: CUDA in libtorch, NCCL, one-rank collectives.
    CheckDevice {
        /// CUDA device to check.
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a job file and print every problem found.
    Validate {
        /// The job file.
        job: PathBuf,
        /// Print the resolved configuration as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the parsed command.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Worker(args) => run::worker(args),
        Command::Coordinator(args) => run::coordinator(args),
        Command::Status(args) => status::status(args),
        Command::Data(cmd) => data::dispatch(cmd),
        Command::Eval(args) => eval::eval(args),
        Command::Export(args) => export::export(args),
        Command::Infer(args) => infer::infer_command(args),
        Command::Checkpoint(cmd) => checkpoint::dispatch(cmd),
        Command::Bench(args) => bench::bench(args),
        Command::Deploy(cmd) => deploy::dispatch(cmd),
        Command::CheckDevice { device, json } => {
            let device = braid::worker::parse_device(&device).ok_or_else(|| anyhow::anyhow!("--device {device:?}: use cuda or cuda:N"))?;
            let checks = braid::devicecheck::run(device);
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                for c in &checks {
                    println!("{} {}: {}", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail);
                }
            }
            Ok(if checks.iter().all(|c| c.ok) { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Validate { job, json } => {
            let config = load_job(&job)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&config)?);
            } else {
                println!("{}: valid ({} {} on {}, {} steps of {} samples)", job.display(), config.model.family,
                    config.model.preset, config.cluster.device, config.train.steps, config.train.global_batch);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads and validates a job file.
pub fn load_job(path: &std::path::Path) -> anyhow::Result<JobConfig> {
    JobConfig::load(path).with_context(|| format!("loading job {}", path.display()))
}

/// Sets up logging to stderr: `RUST_LOG` filters, default `info`; `json` for JSON lines.
pub fn init_logging(json: bool) {
    init_logging_with(json, "info");
}

/// Like [`init_logging`] with another default filter when `RUST_LOG` is unset.
pub fn init_logging_with(json: bool, default_filter: &str) {
    braid_coordinator::telemetry::Telemetry::init(json, default_filter);
}
