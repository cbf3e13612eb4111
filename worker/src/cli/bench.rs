//! `braid bench`.

use std::process::ExitCode;

use braid::bench::{self, BenchOptions};
use braid::worker::parse_device;
use clap::Args;

/// Options of `braid bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model family: clip, albef, blip.
    #[arg(long, default_value = "clip")]
    family: String,
    /// Preset: tiny, vit-b-32, vit-b-16 (clip); tiny, base (albef, blip).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Samples per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Intra-op CPU threads (0 = libtorch's default).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Device: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fp32, fp64 or bf16.
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Text vocabulary size (default: 49,408 for clip, CLIP's BPE; 30,522 for albef, BERT's;
    /// 30,524 for blip, BERT's with [DEC] and [ENC]).
    #[arg(long)]
    vocab_size: Option<i64>,
    /// albef, blip: caption length in tokens (default: the preset's, tiny 32, base 30).
    #[arg(long)]
    context_length: Option<i64>,
    /// albef, blip: length of each feature queue, a multiple of --batch (default: 1,024 for
    /// tiny, 65,536 for albef base, 57,600 for blip base, rounded up to a multiple of --batch).
    #[arg(long)]
    queue_size: Option<usize>,
    /// Peak dense TFLOP/s of the device, for MFU (default on CUDA: 989, an H100/H200 SXM in bf16).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Instead of training steps, benchmark checkpoint saving of the preset's full state to
    /// this location (async vs synchronous blocking, upload vs plain put).
    #[arg(long)]
    checkpoint_to: Option<String>,
    /// Rounds of the checkpoint benchmark.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Record every timed step's loss in the JSON output.
    #[arg(long)]
    losses: bool,
    /// Recompute each transformer block's activations in the backward pass (less memory).
    #[arg(long)]
    activation_checkpointing: bool,
    /// Capture the step as a CUDA graph after two eager steps and time its replays (CLIP on a
    /// CUDA device; as `[train] cuda_graph`).
    #[arg(long)]
    cuda_graph: bool,
    /// After the timed steps, profile 3 more with libtorch's profiler and write a Chrome trace
    /// here (summarise it with bench/trace_summary.py, or open it in Perfetto).
    #[arg(long)]
    trace: Option<std::path::PathBuf>,
    /// Start from reference weights instead of braid's initialisation, in the layouts
    /// `[model] init_from` takes (open_clip for CLIP, torchmultimodal for ALBEF, transformers for
    /// BLIP); heads the layout lacks keep braid's initialisation.
    #[arg(long)]
    init_from: Option<String>,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `braid bench`.
pub fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    // Warnings (a CUDA-graph capture that failed, ...) on stderr; results on stdout.
    super::init_logging_with(false, "warn");
    if let Some(url) = &args.checkpoint_to {
        if args.family != "clip" {
            anyhow::bail!("--checkpoint-to benchmarks a CLIP preset's state; --family {} is not supported there", args.family);
        }
        let device = parse_device(&args.device).ok_or_else(|| anyhow::anyhow!("--device {:?}: use cpu, cuda or cuda:N", args.device))?;
        let report = bench::run_checkpoint_bench(&args.preset, url, args.rounds, device, args.batch).map_err(|e| anyhow::anyhow!("{e}"))?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("{report}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let device = parse_device(&args.device).ok_or_else(|| anyhow::anyhow!("--device {:?}: use cpu, cuda or cuda:N", args.device))?;
    if matches!(device, tch::Device::Cuda(_)) && !tch::Cuda::is_available() {
        anyhow::bail!("--device {}: CUDA is not available to libtorch on this machine", args.device);
    }
    let peak_tflops = args.peak_tflops.or(matches!(device, tch::Device::Cuda(_)).then_some(989.0));
    let clip = args.family == "clip";
    if clip && (args.context_length.is_some() || args.queue_size.is_some()) {
        anyhow::bail!("--context-length and --queue-size apply to --family albef and blip, not clip");
    }
    if args.cuda_graph && (!clip || !matches!(device, tch::Device::Cuda(_))) {
        anyhow::bail!("--cuda-graph captures CLIP steps on a CUDA device (--family clip --device cuda)");
    }
    let vocab_size = args.vocab_size.unwrap_or(match args.family.as_str() {
        "clip" => 49408,
        "blip" => 30524,
        _ => 30522,
    });
    let report = bench::run(&BenchOptions {
        family: args.family,
        preset: args.preset,
        batch: args.batch,
        threads: args.threads,
        steps: args.steps.max(1),
        warmup: args.warmup,
        device,
        precision: args.precision,
        vocab_size,
        context_length: args.context_length,
        queue_size: args.queue_size,
        peak_tflops,
        record_losses: args.losses,
        activation_checkpointing: args.activation_checkpointing,
        cuda_graph: args.cuda_graph,
        trace: args.trace,
        init_from: args.init_from,
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}
