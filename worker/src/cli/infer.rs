//! `braid infer`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use braid::infer::{infer, CaptionSettings, InferOptions, ModelSource, Task, WeightsFamily, DEFAULT_LIMIT};
use braid::worker::parse_device;
use clap::{Args, ValueEnum};

/// Tasks of `braid infer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskArg {
    /// A caption per image (BLIP).
    Caption,
    /// Image-text matching probability of every image with every text (ALBEF, BLIP).
    Itm,
    /// Contrastive cosine similarity of every image with every text (CLIP, ALBEF, BLIP).
    Itc,
}

/// Families whose reference weights `--weights` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FamilyArg {
    /// transformers' BlipForConditionalGeneration / BlipForImageTextRetrieval.
    Blip,
    /// torchmultimodal's ALBEFModelWithSimilarity.
    Albef,
}

/// Options of `braid infer`.
#[derive(Debug, Args)]
pub struct InferArgs {
    /// What to compute.
    #[arg(long, value_enum)]
    task: TaskArg,
    /// A job file: its model, tokenizer and latest committed checkpoint.
    #[arg(long, required_unless_present = "weights", conflicts_with_all = ["weights", "family", "preset", "tokenizer"])]
    job: Option<PathBuf>,
    /// With --job: a checkpoint root (its `latest`) or a `step-N/manifest.json`.
    #[arg(long, requires = "job")]
    checkpoint: Option<String>,
    /// Reference weights (safetensors): transformers BLIP state dicts (a retrieval and/or a
    /// captioning one, told apart by their keys) or torchmultimodal's ALBEF. Repeatable.
    #[arg(long = "weights", requires_all = ["family", "preset", "tokenizer"])]
    weights: Vec<PathBuf>,
    /// With --weights: the family whose layout they hold.
    #[arg(long, value_enum, requires = "weights")]
    family: Option<FamilyArg>,
    /// With --weights: the preset (tiny, base); image size and vocabulary follow the weights.
    #[arg(long, requires = "weights")]
    preset: Option<String>,
    /// With --weights: the BERT tokenizer.json of the weights (with [DEC] and [ENC] for BLIP).
    #[arg(long, requires = "weights")]
    tokenizer: Option<PathBuf>,
    /// An image file (PNG, JPEG). Repeatable.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// A held-out manifest: its first --limit samples with their captions (default with --job
    /// and no --image: the job's `[data] eval`).
    #[arg(long)]
    data: Option<String>,
    /// Held-out samples to read.
    #[arg(long, default_value_t = DEFAULT_LIMIT)]
    limit: usize,
    /// A text to score (itm, itc). Repeatable.
    #[arg(long = "text")]
    texts: Vec<String>,
    /// Beams of the caption search: 1 decodes greedily (BLIP's paper captions with 3).
    #[arg(long, default_value_t = 1)]
    beams: usize,
    /// Longest caption in tokens, [DEC] included (default: the text context for tiny, 20 for base).
    #[arg(long)]
    max_length: Option<usize>,
    /// Shortest caption in tokens, [DEC] included (default: 0 for tiny, 5 for base).
    #[arg(long)]
    min_length: Option<usize>,
    /// Images per forward batch (image-text pairs per ITM forward).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Device: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `braid infer`.
pub fn infer_command(args: InferArgs) -> anyhow::Result<ExitCode> {
    super::init_logging_with(false, "warn");
    let device = parse_device(&args.device).ok_or_else(|| anyhow::anyhow!("--device {:?}: use cpu, cuda or cuda:N", args.device))?;
    let source = match (args.job, args.family, args.preset, args.tokenizer) {
        (Some(job), ..) => ModelSource::Job { config: Box::new(super::load_job(&job)?), checkpoint: args.checkpoint },
        (None, Some(family), Some(preset), Some(tokenizer)) => ModelSource::Weights {
            files: args.weights,
            family: match family {
                FamilyArg::Blip => WeightsFamily::Blip,
                FamilyArg::Albef => WeightsFamily::Albef,
            },
            preset,
            tokenizer,
        },
        _ => anyhow::bail!("give --job JOB, or --weights FILE with --family, --preset and --tokenizer"),
    };
    let options = InferOptions {
        task: match args.task {
            TaskArg::Caption => Task::Caption,
            TaskArg::Itm => Task::Itm,
            TaskArg::Itc => Task::Itc,
        },
        source,
        images: args.images,
        data: args.data,
        limit: args.limit,
        texts: args.texts,
        caption: CaptionSettings { beams: args.beams, max_length: args.max_length, min_length: args.min_length },
        batch: args.batch,
        device,
    };
    let bar = progress_bar();
    let report = infer(&options, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Images done out of all, on stderr when it is a terminal.
fn progress_bar() -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} images").expect("valid template"));
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
