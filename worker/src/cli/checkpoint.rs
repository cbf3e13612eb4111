//! `braid checkpoint list`, `braid checkpoint show` and `braid checkpoint now`.

use std::process::ExitCode;

use braid::export::{list_checkpoints, show_checkpoint};
use clap::Subcommand;

/// Checkpoint commands.
#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// List the committed checkpoints under a root: step, attempt, commit time, size, and which
    /// one `latest` points at.
    List {
        /// Checkpoint root (a path or a file://, s3://, gs:// or az:// URL).
        url: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one committed checkpoint's manifest: parts with sizes and sha256, config hash, braid
    /// version, world size, generation.
    Show {
        /// Checkpoint root (its `latest`), a `step-N` folder or a `step-N/manifest.json`.
        url: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running job's coordinator for a checkpoint at the next step every rank can reach.
    Now {
        /// Coordinator address, host:port.
        #[arg(long, env = "BRAID_COORDINATOR")]
        coordinator: String,
        /// The job's name (`[job] name`).
        #[arg(long)]
        job: String,
        /// Stop the job once the checkpoint is committed (as on SIGTERM).
        #[arg(long)]
        stop: bool,
        #[command(flatten)]
        security: super::security::ClientSecurityArgs,
    },
}

/// Runs a checkpoint command.
pub fn dispatch(cmd: CheckpointCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CheckpointCommand::Now { coordinator, job, stop, security } => {
            let security = security.load()?;
            let runtime = tokio::runtime::Runtime::new()?;
            let step = runtime.block_on(async {
                // The operator is no worker: the request carries the job id and no worker id.
                let timeout = std::time::Duration::from_secs(10);
                let client = braid_coordinator::CoordinatorClient::connect_secured(&coordinator, &job, timeout, &security).await?;
                client.request_checkpoint("braid checkpoint now", stop).await
            })?;
            match step {
                Some(step) => println!("checkpoint scheduled after step {step}{}", if stop { ", then the job stops" } else { "" }),
                None => println!("checkpoint requested; it is taken after the step following the next report{}", if stop { ", then the job stops" } else { "" }),
            }
            return Ok(ExitCode::SUCCESS);
        }
        CheckpointCommand::List { url, json } => {
            let listing = list_checkpoints(&url)?;
            if listing.checkpoints.is_empty() {
                anyhow::bail!("no committed checkpoint under {}", listing.root);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{}", listing.root);
            println!(
                "{:>10}  {:<36}  {:<20}  {:>12}  {:>5}  {:>10}",
                "step", "attempt", "committed_at", "bytes", "world", "generation"
            );
            for c in &listing.checkpoints {
                println!(
                    "{:>10}  {:<36}  {:<20}  {:>12}  {:>5}  {:>10}{}",
                    c.step,
                    c.attempt,
                    c.committed_at,
                    c.bytes,
                    c.world_size,
                    c.generation,
                    if c.latest { "  <- latest" } else { "" }
                );
            }
            match &listing.latest {
                Some(latest) if !listing.checkpoints.iter().any(|c| c.latest) => {
                    println!("latest points at {latest}, which is not among the committed step folders")
                }
                None => println!("no `latest` pointer"),
                Some(_) => {}
            }
            if !listing.uncommitted_steps.is_empty() {
                let steps: Vec<String> = listing.uncommitted_steps.iter().map(u64::to_string).collect();
                println!("step folders without a manifest (never committed): {}", steps.join(", "));
            }
        }
        CheckpointCommand::Show { url, json } => {
            let (reference, manifest) = show_checkpoint(&url)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&manifest)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{}", reference.manifest_url());
            println!("job:           {}", manifest.job);
            println!("step:          {}", manifest.step);
            println!("attempt:       {}", manifest.attempt);
            println!("committed_at:  {}", manifest.committed_at);
            println!("generation:    {}", manifest.generation);
            println!("world_size:    {}", manifest.world_size);
            println!("braid_version: {}", manifest.braid_version);
            println!("config_hash:   {}", manifest.config_hash);
            let total: u64 = manifest.parts.iter().map(|p| p.size).sum();
            println!("parts:         {} ({total} bytes)", manifest.parts.len());
            for p in &manifest.parts {
                println!("  rank {:<4} {:>12} bytes  sha256 {}  {}", p.rank, p.size, p.sha256, p.path);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
