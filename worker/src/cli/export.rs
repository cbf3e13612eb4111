//! `braid export`.

use std::path::PathBuf;
use std::process::ExitCode;

use braid::export::{export_hf, export_open_clip, ExportReport};
use clap::{Args, ValueEnum};

/// Layouts `braid export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One safetensors file with open_clip's parameter names.
    #[value(name = "open_clip")]
    OpenClip,
    /// A transformers `CLIPModel` folder: `model.safetensors` and `config.json`.
    Hf,
    /// ALBEF: one safetensors file in torchmultimodal's `ALBEFModelWithSimilarity` layout.
    Torchmultimodal,
    /// BLIP: a folder with transformers' `BlipForImageTextRetrieval` and
    /// `BlipForConditionalGeneration` state dicts.
    Transformers,
}

/// Options of `braid export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Checkpoint root (its `latest`), a `step-N` folder or a `step-N/manifest.json`.
    #[arg(long)]
    checkpoint: String,
    /// Layout to write.
    #[arg(long, value_enum)]
    format: Format,
    /// Output: the safetensors file (open_clip, torchmultimodal) or the folder (hf, transformers).
    #[arg(long)]
    out: String,
    /// The job file that trained the checkpoint: model shape and tokenizer. Required for hf;
    /// for open_clip it checks the tensors against the job's model.
    #[arg(long)]
    job: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `braid export`.
pub fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(false);
    let job = args.job.as_deref().map(super::load_job).transpose()?;
    let report: ExportReport = match args.format {
        Format::OpenClip => export_open_clip(&args.checkpoint, job.as_ref(), &args.out)?,
        Format::Hf => {
            let job = job.ok_or_else(|| {
                anyhow::anyhow!("--format hf needs --job: the job file gives the heads, activation and tokenizer")
            })?;
            export_hf(&args.checkpoint, &job, &args.out)?
        }
        Format::Torchmultimodal | Format::Transformers => {
            let name = if args.format == Format::Torchmultimodal { "torchmultimodal" } else { "transformers" };
            let job = job.ok_or_else(|| anyhow::anyhow!("--format {name} needs --job: the job file gives the model's shape and tokenizer"))?;
            let family = job.model.family.as_str();
            let fits = matches!((args.format, family), (Format::Torchmultimodal, "albef") | (Format::Transformers, "blip"));
            if !fits {
                anyhow::bail!("--format {name} does not fit the job's family {family}: ALBEF exports as torchmultimodal, BLIP as transformers, CLIP as open_clip or hf");
            }
            braid::reference_export::export_reference(&args.checkpoint, &job, &args.out)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "exported step {} of {} ({} layout, {} tensors):",
            report.step, report.checkpoint, report.format, report.tensors
        );
        for file in &report.files {
            println!("  {} ({} bytes)", file.url, file.bytes);
        }
    }
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(ExitCode::SUCCESS)
}
