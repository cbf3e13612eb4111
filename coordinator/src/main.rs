//! `braid-coordinator`: runs one job's coordinator.
//!
//! ```text
//! braid-coordinator --job job.toml --listen 0.0.0.0:7070
//! ```
//! Exits 0 when the job finished, 1 when it failed, after the workers have left (or been
//! declared dead); SIGINT/SIGTERM stop it at once.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use braid_coordinator::config::JobConfig;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// braid's coordinator: membership, rendezvous, data plan and checkpoint commit for one job.
#[derive(Debug, Parser)]
#[command(name = "braid-coordinator", version)]
struct Args {
    /// The job file.
    #[arg(long, env = "BRAID_JOB")]
    job: PathBuf,
    /// Address the gRPC server listens on.
    #[arg(long, env = "BRAID_LISTEN", default_value = "0.0.0.0:7070")]
    listen: String,
    /// When another coordinator's lease on the job is live, wait for it to expire (a restart
    /// after a crash) instead of refusing to start.
    #[arg(long, env = "BRAID_WAIT_FOR_LEASE")]
    wait_for_lease: bool,
}

async fn terminated() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = JobConfig::load(&args.job)?;
    braid_coordinator::telemetry::Telemetry::init(config.telemetry.log_format == "json", "info");
    let linger = Duration::from_secs_f64(config.cluster.heartbeat_timeout_s + 1.0);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let shutdown = CancellationToken::new();
    let takeover = braid_coordinator::server::Takeover::Resume { wait_for_lease: args.wait_for_lease };
    let handle = braid_coordinator::server::start_with(config, takeover, listener, shutdown.clone()).await?;
    let done = async {
        handle.ended().await;
        if !handle.drained(linger).await {
            tracing::warn!("workers still attached {:.0} s after the job ended; stopping anyway", linger.as_secs_f64());
        }
    };
    tokio::select! {
        _ = terminated() => tracing::warn!("signal received: stopping the coordinator"),
        _ = done => {}
    }
    let progress = handle.progress();
    handle.shutdown();
    handle.join().await?;
    tracing::info!(
        "job {}: {} of {} steps, {} checkpoints, {} corrupt samples",
        progress.job,
        progress.steps_done,
        progress.total_steps,
        progress.checkpoints.len(),
        progress.corrupt_samples
    );
    if let Some(failure) = progress.failure {
        anyhow::bail!("job {} failed: {failure}", progress.job);
    }
    Ok(())
}
