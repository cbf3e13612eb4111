//! `braid deploy k8s`: Kubernetes manifests for a job, into a folder or onto stdout.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use braid::deploy::k8s::{default_image, render, JobFile, K8sOptions, VolumeClaim, KUSTOMIZATION};
use braid::deploy::write_files;
use clap::{Args, Subcommand};

/// `braid deploy` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Render Kubernetes manifests for a job: the job file as a ConfigMap, the coordinator
    /// (Deployment, Service, PodDisruptionBudget, ServiceMonitor), the workers as an indexed
    /// Job, and a kustomization.yaml.
    K8s(K8sArgs),
}

/// Options of `braid deploy k8s`.
#[derive(Debug, Args)]
pub struct K8sArgs {
    /// The job file.
    job: PathBuf,
    /// Write one file per object and a kustomization.yaml into this folder (for `kubectl apply
    /// -k`) instead of printing the objects to stdout as one multi-document stream.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Replace files in --out that differ from this rendering (otherwise nothing is written).
    #[arg(long)]
    force: bool,
    /// The coordinator's image.
    #[arg(long, value_name = "IMG", default_value_t = default_image("braid-coordinator"))]
    image_coordinator: String,
    /// The workers' image.
    #[arg(long, value_name = "IMG", default_value_t = default_image("braid-worker"))]
    image_worker: String,
    /// Namespace of every object (default: none written, kubectl's current namespace).
    #[arg(long, value_name = "NS")]
    namespace: Option<String>,
    /// Worker processes; sets cluster.min_workers and max_workers in the deployed job file
    /// (default: the job's cluster.max_workers).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// GPUs per worker pod, one worker process each (cuda jobs); must divide the workers.
    #[arg(long, value_name = "G", default_value_t = 1)]
    gpus_per_worker: usize,
    /// Mount PersistentVolumeClaim CLAIM at PATH in every pod, where local data and checkpoint
    /// paths of the job file must live (repeatable).
    #[arg(long = "pvc", value_name = "CLAIM:PATH")]
    volume_claims: Vec<VolumeClaim>,
    /// Leave out the ServiceMonitor (clusters without the Prometheus Operator's CRDs).
    #[arg(long)]
    no_service_monitor: bool,
}

/// Runs a `braid deploy` subcommand.
pub fn dispatch(command: DeployCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeployCommand::K8s(args) => k8s(args),
    }
}

fn k8s(args: K8sArgs) -> anyhow::Result<ExitCode> {
    // Loading validates the job like every other command does; the manifests then carry the
    // job file as written, since relative paths resolve against another folder in the pods.
    super::load_job(&args.job)?;
    let origin = args.job.display().to_string();
    let text = std::fs::read_to_string(&args.job).with_context(|| format!("reading job {origin}"))?;
    let job = JobFile::parse(&text, &origin)?;
    let options = K8sOptions {
        image_coordinator: args.image_coordinator,
        image_worker: args.image_worker,
        namespace: args.namespace,
        workers: args.workers,
        gpus_per_worker: args.gpus_per_worker,
        volume_claims: args.volume_claims,
        service_monitor: !args.no_service_monitor,
    };
    let rendering = render(&job, &options).with_context(|| format!("rendering Kubernetes manifests for {origin}"))?;
    for warning in &rendering.warnings {
        eprintln!("warning: {warning}");
    }
    match &args.out {
        Some(dir) => {
            let report = write_files(dir, &rendering.files(), args.force)?;
            eprintln!(
                "{}: wrote {} files, {} unchanged; deploy with `kubectl apply -k {}` ({} lists them)",
                dir.display(),
                report.written.len(),
                report.unchanged.len(),
                dir.display(),
                KUSTOMIZATION
            );
        }
        None => print!("{}", rendering.stream()),
    }
    Ok(ExitCode::SUCCESS)
}
