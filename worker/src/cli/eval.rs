//! `braid eval`.

use std::path::PathBuf;
use std::process::ExitCode;

use braid::eval::{evaluate, EvalOptions};
use braid::worker::parse_device;
use clap::Args;

/// Options of `braid eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The job file (model, tokenizer and default data/checkpoint locations).
    job: PathBuf,
    /// Checkpoint root (its `latest`) or a `step-N/manifest.json`.
    #[arg(long)]
    checkpoint: Option<String>,
    /// Held-out manifest.
    #[arg(long)]
    data: Option<String>,
    /// Samples per forward batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Device: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `braid eval`.
pub fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(false);
    let config = super::load_job(&args.job)?;
    let device = parse_device(&args.device).ok_or_else(|| anyhow::anyhow!("--device {:?}: use cpu, cuda or cuda:N", args.device))?;
    let report = evaluate(&config, &EvalOptions { checkpoint: args.checkpoint, data: args.data, batch: args.batch, device })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}
