//! `braid data synth` and `braid data index`.

use std::path::PathBuf;
use std::process::ExitCode;

use braid::data::{index, synth};
use clap::Subcommand;

/// Data commands.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write a learnable synthetic image-caption WebDataset (train and held-out splits,
    /// tokenizer.json, classes.json) with its manifests.
    Synth {
        /// Output folder.
        out: PathBuf,
        /// Training samples.
        #[arg(long, default_value_t = 10_000)]
        train_samples: usize,
        /// Held-out samples.
        #[arg(long, default_value_t = 1_000)]
        eval_samples: usize,
        /// Samples per tar shard.
        #[arg(long, default_value_t = 1_000)]
        samples_per_shard: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 32)]
        image_size: u32,
        /// Image format: png or jpeg.
        #[arg(long, default_value = "png")]
        format: String,
        /// Seed of the generator.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Index the tar shards of a folder into `manifest.json` (per-sample byte offsets).
    Index {
        /// Folder holding `*.tar` shards.
        dir: PathBuf,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a data command.
pub fn dispatch(cmd: DataCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DataCommand::Synth { out, train_samples, eval_samples, samples_per_shard, image_size, format, seed, json } => {
            let format = match format.as_str() {
                "png" => synth::SynthFormat::Png,
                "jpeg" | "jpg" => synth::SynthFormat::Jpeg,
                other => anyhow::bail!("--format {other:?}: use png or jpeg"),
            };
            let opts = synth::SynthOptions { train_samples, eval_samples, samples_per_shard, image_size, format, seed };
            let report = synth::synth(&out, &opts)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "train_manifest": report.train_manifest,
                        "eval_manifest": report.eval_manifest,
                        "tokenizer": report.tokenizer,
                        "classes": report.classes,
                        "shards": report.shards,
                        "num_classes": report.num_classes,
                        "vocab_size": report.vocab_size,
                    })
                );
            } else {
                println!(
                    "wrote {} train + {} held-out samples in {} shards to {} ({} classes, vocabulary {})",
                    train_samples,
                    eval_samples,
                    report.shards,
                    out.display(),
                    report.num_classes,
                    report.vocab_size
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DataCommand::Index { dir, json } => {
            let manifest = index::index_dir(&dir)?;
            let path = index::write_manifest(&dir, &manifest)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"manifest": path, "shards": manifest.shards.len(), "samples": manifest.num_samples()})
                );
            } else {
                println!("indexed {} samples in {} shards into {}", manifest.num_samples(), manifest.shards.len(), path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
