//! `braid infer`: captions, image-text matching (ITM) and contrastive (ITC) scores from a trained
//! model or from reference weights.
//!
//! The model comes from a job's committed checkpoint ([`ModelSource::Job`]) or from reference
//! state dicts ([`ModelSource::Weights`]): transformers' `BlipForConditionalGeneration`
//! (captioning) and `BlipForImageTextRetrieval` (ITM, ITC), told apart by their keys, or
//! torchmultimodal's `ALBEFModelWithSimilarity`. The images are files (PNG, JPEG) and/or the first
//! samples of a held-out manifest in the order `braid eval` reads it; every image gets the
//! held-out transform (shorter side resized, centre crop, CLIP normalisation), so inference sees
//! what evaluation sees.
//!
//! - **caption** (BLIP): greedy decoding or beam search ([`generate_captions`]). Against the true
//!   captions of held-out samples it reports the *token accuracy*: the generated tokens (before
//!   the `[SEP]` that ends them) are compared position by position with the true caption's tokens
//!   between `[CLS]` and `[SEP]`; the matches summed over captions are divided by the true tokens
//!   summed over captions (a generated caption that is shorter misses the rest, one that is
//!   longer gains nothing). The *exact-match rate* counts captions whose tokens equal the true
//!   ones.
//! - **itm** (ALBEF, BLIP): the match probability (softmax of the ITM head, class 1) of every
//!   image with every text. BLIP's image-grounded encoder reads `[ENC]` in place of `[CLS]`.
//! - **itc** (CLIP, ALBEF, BLIP): the cosine similarity of every image's and text's contrastive
//!   features.
//!
//! The texts scored are the held-out captions followed by the `--text` ones. An image of the
//! held-out set is *right* when its best-scoring text is its own caption (as `braid eval`
//! counts, a text equal to its caption counts as its own); chance is the share of texts equal to
//! it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use braid_coordinator::config::JobConfig;
use serde::Serialize;
use tch::{nn, Device, Kind, Tensor};

use crate::data::augment::{self, Transform};
use crate::data::tokenizer::{load_tokenizer, HfTokenizer, TextTokenizer, TokenizerError};
use crate::eval::EvalError;
use crate::models::albef::{import_torchmultimodal, Albef, AlbefConfig};
use crate::models::blip::{generate_captions, import_transformers, Blip, BlipConfig, BlipTokens, CaptionOptions};
use crate::models::clip::Clip;
use crate::models::vit::VitConfig;
use crate::models::ModelError;
use crate::trainer::blip::with_first_token;
use crate::trainer::{TrainError, Trainer};

/// Held-out samples read when `--limit` is not given.
pub const DEFAULT_LIMIT: usize = 16;

/// What `braid infer` computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Generate a caption per image (BLIP's decoder).
    Caption,
    /// Image-text matching probability of every image with every text.
    Itm,
    /// Contrastive (cosine) similarity of every image with every text.
    Itc,
}

impl Task {
    /// The name `--task` takes.
    pub fn name(self) -> &'static str {
        match self {
            Task::Caption => "caption",
            Task::Itm => "itm",
            Task::Itc => "itc",
        }
    }
}

/// The families whose reference weights `braid infer` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFamily {
    /// transformers' BLIP state dicts.
    Blip,
    /// torchmultimodal's ALBEF state dict.
    Albef,
}

impl WeightsFamily {
    /// The family's name as job files write it.
    pub fn name(self) -> &'static str {
        match self {
            WeightsFamily::Blip => "blip",
            WeightsFamily::Albef => "albef",
        }
    }
}

/// Where the model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A job's committed checkpoint: the family, shape and tokenizer come from the job.
    Job {
        /// The job.
        config: Box<JobConfig>,
        /// Checkpoint root (its `latest`) or a `step-N/manifest.json`; default the job's
        /// `[checkpoint] url`.
        checkpoint: Option<String>,
    },
    /// Reference state dicts in safetensors files.
    Weights {
        /// One or two files (BLIP: a retrieval and a captioning state dict).
        files: Vec<PathBuf>,
        /// Which family's layout they hold.
        family: WeightsFamily,
        /// The family's preset (`tiny`, `base`); the image size and vocabulary follow the weights.
        preset: String,
        /// The BERT tokenizer.json the weights were trained with.
        tokenizer: PathBuf,
    },
}

impl ModelSource {
    /// The model family's name.
    pub fn family(&self) -> &str {
        match self {
            ModelSource::Job { config, .. } => &config.model.family,
            ModelSource::Weights { family, .. } => family.name(),
        }
    }
}

/// How captions are decoded; lengths count the `[DEC]` token, as [`CaptionOptions`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptionSettings {
    /// 1 for greedy decoding, more for beam search (BLIP's captioning uses 3).
    pub beams: usize,
    /// Longest caption, `[DEC]` included; default [`default_lengths`].
    pub max_length: Option<usize>,
    /// Shortest caption, `[DEC]` included; default [`default_lengths`].
    pub min_length: Option<usize>,
}

impl Default for CaptionSettings {
    fn default() -> Self {
        Self { beams: 1, max_length: None, min_length: None }
    }
}

/// The default `(max_length, min_length)` of a preset: `base` takes BLIP's COCO captioning
/// settings (20 and 5); `tiny` (synthetic captions) the whole text context and no minimum.
pub fn default_lengths(preset: &str, context_length: i64) -> (usize, usize) {
    match preset {
        "tiny" => (context_length.max(2) as usize, 0),
        _ => (20, 5),
    }
}

/// Everything `braid infer` is asked.
#[derive(Debug, Clone)]
pub struct InferOptions {
    /// What to compute.
    pub task: Task,
    /// The model.
    pub source: ModelSource,
    /// Image files.
    pub images: Vec<PathBuf>,
    /// A held-out manifest whose first `limit` samples (in `braid eval`'s order) are read with
    /// their captions; with [`ModelSource::Job`] and no images, the job's `[data] eval`.
    pub data: Option<String>,
    /// Held-out samples to read.
    pub limit: usize,
    /// Texts to score (itm, itc).
    pub texts: Vec<String>,
    /// Caption decoding.
    pub caption: CaptionSettings,
    /// Images per forward batch (and image-text pairs per ITM forward).
    pub batch: usize,
    /// Device.
    pub device: Device,
}

/// Why `braid infer` failed.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The arguments do not make a request; every problem, joined by "; ".
    #[error("{0}")]
    Arguments(String),
    /// The model cannot do the task.
    #[error("{0}")]
    Unsupported(String),
    /// An image file could not be read or decoded.
    #[error("image {path}: {reason}")]
    Image {
        /// The file as given.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// A weights file could not be read or does not fit.
    #[error("weights {path}: {reason}")]
    Weights {
        /// The file (or files) as given.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// The tokenizer cannot serve the model.
    #[error("tokenizer {path}: {reason}")]
    TokenizerUnfit {
        /// The tokenizer as given.
        path: String,
        /// What is missing.
        reason: String,
    },
    /// The checkpoint could not be loaded.
    #[error(transparent)]
    Checkpoint(#[from] EvalError),
    /// The tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Held-out data could not be read.
    #[error(transparent)]
    Data(#[from] crate::data::Error),
    /// The model could not be built.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The model could not be built from the job.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Every problem of `options` that needs no file: inputs missing or meaningless for the task,
/// decoding bounds, and tasks the family cannot do. Empty when the request makes sense.
pub fn argument_problems(options: &InferOptions) -> Vec<String> {
    let mut problems = Vec::new();
    let task = options.task;
    let family = options.source.family();
    let job_eval = match &options.source {
        ModelSource::Job { config, .. } => config.data.eval.is_some(),
        ModelSource::Weights { .. } => false,
    };
    match (task, family) {
        (Task::Caption, "albef") => problems.push(
            "ALBEF has no decoder: --task caption needs a BLIP model (ALBEF scores image-text pairs: --task itm or itc)"
                .to_string(),
        ),
        (Task::Caption, "clip") => {
            problems.push("CLIP has no decoder: --task caption needs a BLIP model (CLIP scores pairs: --task itc)".into())
        }
        (Task::Itm, "clip") => problems
            .push("CLIP has no image-text matching head: use --task itc, or an ALBEF or BLIP model for itm".into()),
        _ => {}
    }
    if options.images.is_empty() && options.data.is_none() && !job_eval {
        problems.push("no images: give --image PATH (repeatable) or --data MANIFEST".into());
    }
    match task {
        Task::Caption if !options.texts.is_empty() => {
            problems.push("--text is for --task itm and itc; --task caption writes the text".into())
        }
        Task::Itm | Task::Itc if options.texts.is_empty() && options.data.is_none() && !job_eval => problems.push(
            format!("--task {} needs texts to score: give --text \"...\" (repeatable) or --data MANIFEST", task.name()),
        ),
        _ => {}
    }
    if options.limit == 0 {
        problems.push("--limit is 0: read at least one held-out sample".into());
    }
    if options.batch == 0 {
        problems.push("--batch is 0: give at least 1".into());
    }
    let c = options.caption;
    if c.beams == 0 {
        problems.push("--beams is 0: 1 decodes greedily, more search that many beams".into());
    }
    if let Some(max) = c.max_length {
        if max < 2 {
            problems.push(format!("--max-length {max} leaves no token after [DEC]: give at least 2"));
        }
        if let Some(min) = c.min_length.filter(|&min| min > max) {
            problems.push(format!("--min-length {min} exceeds --max-length {max}"));
        }
    }
    if let ModelSource::Weights { files, family, .. } = &options.source {
        let most = match family {
            WeightsFamily::Blip => 2,
            WeightsFamily::Albef => 1,
        };
        if files.is_empty() || files.len() > most {
            problems.push(match family {
                WeightsFamily::Blip => format!(
                    "{} --weights files: BLIP takes one or two (a BlipForImageTextRetrieval and a \
                     BlipForConditionalGeneration state dict)",
                    files.len()
                ),
                WeightsFamily::Albef => {
                    format!("{} --weights files: ALBEF takes one (torchmultimodal's ALBEFModelWithSimilarity)", files.len())
                }
            });
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Accuracy of captions
// ---------------------------------------------------------------------------------------------

/// Token accuracy and exact matches of generated captions against true ones (see the module
/// documentation for the definitions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CaptionAccuracy {
    /// Captions compared.
    pub captions: usize,
    /// True caption tokens, between `[CLS]` and `[SEP]`, over every caption.
    pub true_tokens: usize,
    /// Positions where the generated token equals the true one.
    pub matched_tokens: usize,
    /// Captions whose generated tokens equal the true ones.
    pub exact_matches: usize,
}

impl CaptionAccuracy {
    /// Adds one caption: `generated` and `truth` are the tokens without `[CLS]`, `[DEC]` or
    /// `[SEP]` ([`caption_body`], [`true_caption_body`]). Returns the positions that match.
    pub fn add(&mut self, generated: &[i64], truth: &[i64]) -> usize {
        let matched = generated.iter().zip(truth).filter(|(g, t)| g == t).count();
        self.captions += 1;
        self.true_tokens += truth.len();
        self.matched_tokens += matched;
        self.exact_matches += usize::from(generated == truth);
        matched
    }

    /// Matched over true tokens; `None` before any true token.
    pub fn token_accuracy(&self) -> Option<f64> {
        (self.true_tokens > 0).then(|| self.matched_tokens as f64 / self.true_tokens as f64)
    }

    /// Exact matches over captions; `None` before any caption.
    pub fn exact_match_rate(&self) -> Option<f64> {
        (self.captions > 0).then(|| self.exact_matches as f64 / self.captions as f64)
    }
}

/// The tokens of a generated caption ([`generate_captions`]: the ids after `[DEC]`) before the
/// `[SEP]` that ended it.
pub fn caption_body(generated: &[i64], sep: i64) -> &[i64] {
    generated.split(|&id| id == sep).next().unwrap_or(&[])
}

/// The tokens of an encoded caption (`[CLS] tokens [SEP] padding`, with `eot_index` at `[SEP]`)
/// between `[CLS]` and `[SEP]`.
pub fn true_caption_body(ids: &[i64], eot_index: usize) -> &[i64] {
    ids.get(1..eot_index.min(ids.len())).unwrap_or(&[])
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// The model that answered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// `blip`, `albef` or `clip`.
    pub family: String,
    /// The preset.
    pub preset: String,
    /// Where the weights came from.
    pub source: String,
    /// Side of the square input images.
    pub image_size: i64,
    /// Text tokens per caption.
    pub context_length: i64,
}

/// One image's caption.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaptionRow {
    /// The image: its file, or its held-out sample key.
    pub image: String,
    /// The generated caption.
    pub caption: String,
    /// Its token ids after `[DEC]`, the final `[SEP]` included when the caption ended there.
    pub ids: Vec<i64>,
    /// The held-out sample's caption.
    pub true_caption: Option<String>,
    /// The true caption's tokens between `[CLS]` and `[SEP]`.
    pub true_ids: Option<Vec<i64>>,
    /// Positions where the generated token equals the true one.
    pub matched_tokens: Option<usize>,
    /// Whether the generated tokens equal the true ones.
    pub exact_match: Option<bool>,
}

/// How captions were decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Decoding {
    /// 1: greedy; more: beam search.
    pub beams: usize,
    /// Longest caption, `[DEC]` included.
    pub max_length: usize,
    /// Shortest caption, `[DEC]` included.
    pub min_length: usize,
}

/// Captions with their accuracy against the held-out captions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaptionReport {
    /// How they were decoded.
    pub decoding: Decoding,
    /// One per image, in input order (held-out samples first).
    pub captions: Vec<CaptionRow>,
    /// Counts over the images with a true caption.
    pub accuracy: Option<CaptionAccuracy>,
    /// `accuracy.matched_tokens / accuracy.true_tokens`.
    pub token_accuracy: Option<f64>,
    /// `accuracy.exact_matches / accuracy.captions`.
    pub exact_match_rate: Option<f64>,
    /// The scores `braid eval` reports (word F1, token accuracy, exact match, each with an
    /// image-blind chance level), over the images with a true caption.
    pub scores: Option<crate::eval::CaptionScores>,
}

/// How often the best-scoring text of a held-out image is its own caption.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TopMatch {
    /// Held-out images scored.
    pub images: usize,
    /// Those whose best text is their caption.
    pub right: usize,
    /// `right / images`.
    pub accuracy: f64,
    /// Expected accuracy of a random pick: the mean share of texts equal to the image's caption.
    pub chance: f64,
}

/// Every image scored against every text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreReport {
    /// What the numbers are: `itm_match_probability` or `itc_cosine_similarity`.
    pub score: String,
    /// The images: files or held-out sample keys.
    pub images: Vec<String>,
    /// The texts: held-out captions, then `--text`.
    pub texts: Vec<String>,
    /// `scores[i][j]`: image `i` with text `j`.
    pub scores: Vec<Vec<f64>>,
    /// The best-scoring text of each image.
    pub best: Vec<usize>,
    /// Each image's own caption among the texts (held-out images).
    pub own_text: Vec<Option<usize>>,
    /// Over the held-out images.
    pub top_match: Option<TopMatch>,
}

/// Everything `braid infer` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InferReport {
    /// The task.
    pub task: Task,
    /// The model.
    pub model: ModelInfo,
    /// Captions (`caption`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captioning: Option<CaptionReport>,
    /// Scores (`itm`, `itc`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scoring: Option<ScoreReport>,
}

/// Whether `scoring` prints as a matrix (few texts) rather than one line per image.
const MATRIX_TEXTS: usize = 8;

/// Longest text printed in a table cell before it is cut with "...".
const CELL_CHARS: usize = 60;

impl std::fmt::Display for InferReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.model;
        writeln!(
            f,
            "{} {} from {} ({}x{} images, {} text tokens)",
            m.family, m.preset, m.source, m.image_size, m.image_size, m.context_length
        )?;
        if let Some(c) = &self.captioning {
            fmt_captions(f, c)?;
        }
        if let Some(s) = &self.scoring {
            fmt_scores(f, s)?;
        }
        Ok(())
    }
}

/// `text` cut to `CELL_CHARS` characters.
fn cell(text: &str) -> String {
    if text.chars().count() <= CELL_CHARS {
        text.to_string()
    } else {
        format!("{}...", text.chars().take(CELL_CHARS - 3).collect::<String>())
    }
}

/// Rows of cells as left-aligned columns two spaces apart.
fn fmt_table(f: &mut std::fmt::Formatter<'_>, rows: &[Vec<String>]) -> std::fmt::Result {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    for row in rows {
        let mut line = String::new();
        for (c, text) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(text);
            } else {
                line.push_str(&format!("{text:<width$}  ", width = widths[c]));
            }
        }
        writeln!(f, "{}", line.trim_end())?;
    }
    Ok(())
}

fn fmt_captions(f: &mut std::fmt::Formatter<'_>, c: &CaptionReport) -> std::fmt::Result {
    let with_truth = c.captions.iter().any(|r| r.true_caption.is_some());
    let mut rows = vec![if with_truth {
        vec!["image".into(), "caption".into(), "true caption".into(), "tokens".into()]
    } else {
        vec!["image".into(), "caption".into()]
    }];
    for r in &c.captions {
        let caption = if r.caption.is_empty() { "(empty)".to_string() } else { cell(&r.caption) };
        let mut row = vec![r.image.clone(), caption];
        if with_truth {
            row.push(r.true_caption.as_deref().map(cell).unwrap_or_default());
            row.push(match (&r.true_ids, r.matched_tokens) {
                (Some(truth), Some(matched)) => {
                    format!("{matched}/{}{}", truth.len(), if r.exact_match == Some(true) { " =" } else { "" })
                }
                _ => String::new(),
            });
        }
        rows.push(row);
    }
    fmt_table(f, &rows)?;
    let d = c.decoding;
    let search = if d.beams == 1 { "greedy".to_string() } else { format!("beam search, {} beams", d.beams) };
    let decoding = format!("{search}, max length {}, min length {}", d.max_length, d.min_length);
    match (c.accuracy, c.token_accuracy, c.exact_match_rate) {
        (Some(a), Some(tokens), Some(exact)) => writeln!(
            f,
            "token accuracy {:.1}% ({}/{} true tokens), exact match {:.1}% ({}/{} captions); {decoding}",
            100.0 * tokens,
            a.matched_tokens,
            a.true_tokens,
            100.0 * exact,
            a.exact_matches,
            a.captions
        ),
        _ => writeln!(f, "{} captions; {decoding}", c.captions.len()),
    }?;
    if let Some(s) = &c.scores {
        writeln!(
            f,
            "word F1 {:.1}% (chance {:.1}%), token accuracy chance {:.1}%, exact match chance {:.1}% (image-blind guesses from these true captions, as braid eval reports)",
            100.0 * s.word_f1,
            100.0 * s.chance_word_f1,
            100.0 * s.chance_token_accuracy,
            100.0 * s.chance_exact_match
        )?;
    }
    Ok(())
}

fn fmt_scores(f: &mut std::fmt::Formatter<'_>, s: &ScoreReport) -> std::fmt::Result {
    let what = if s.score == ITM_SCORE { "ITM match probability" } else { "ITC cosine similarity" };
    if s.texts.len() <= MATRIX_TEXTS {
        writeln!(f, "{what}, image x text ([best] per image, * its own caption):")?;
        let mut rows = vec![std::iter::once("image".to_string()).chain((1..=s.texts.len()).map(|j| format!("t{j}"))).collect()];
        for (i, image) in s.images.iter().enumerate() {
            let mut row = vec![image.clone()];
            for (j, score) in s.scores[i].iter().enumerate() {
                let own = if s.own_text[i] == Some(j) { "*" } else { "" };
                row.push(if s.best[i] == j { format!("[{score:.3}]{own}") } else { format!(" {score:.3}{own}") });
            }
            rows.push(row);
        }
        fmt_table(f, &rows)?;
        for (j, text) in s.texts.iter().enumerate() {
            writeln!(f, "t{}: {}", j + 1, cell(text))?;
        }
    } else {
        writeln!(f, "{what}: best of {} texts per image", s.texts.len())?;
        let with_truth = s.own_text.iter().any(Option::is_some);
        let mut rows = vec![if with_truth {
            vec!["image".into(), "best text".into(), "score".into(), "own caption".into(), "right".into()]
        } else {
            vec!["image".into(), "best text".into(), "score".into()]
        }];
        for (i, image) in s.images.iter().enumerate() {
            let best = s.best[i];
            let mut row = vec![image.clone(), cell(&s.texts[best]), format!("{:.3}", s.scores[i][best])];
            if with_truth {
                match s.own_text[i] {
                    Some(own) => {
                        row.push(format!("{:.3}", s.scores[i][own]));
                        row.push(if s.texts[best] == s.texts[own] { "yes".into() } else { "no".into() });
                    }
                    None => row.extend([String::new(), String::new()]),
                }
            }
            rows.push(row);
        }
        fmt_table(f, &rows)?;
    }
    if let Some(t) = s.top_match {
        writeln!(
            f,
            "best text is the image's own caption: {:.1}% ({}/{} images; chance {:.1}%)",
            100.0 * t.accuracy,
            t.right,
            t.images,
            100.0 * t.chance
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Models
// ---------------------------------------------------------------------------------------------

/// The model as loaded: inside a trainer (a checkpoint) or on its own (reference weights).
enum Loaded {
    Trainer(Box<Trainer>),
    Blip { _vs: nn::VarStore, model: Blip },
    Albef { _vs: nn::VarStore, model: Albef },
}

/// The model a task runs.
#[derive(Clone, Copy)]
enum ModelRef<'a> {
    Clip(&'a Clip),
    Albef(&'a Albef),
    Blip(&'a Blip),
}

/// A loaded model with what reading its inputs needs.
struct Session {
    loaded: Loaded,
    tokenizer: Arc<dyn TextTokenizer>,
    info: ModelInfo,
    /// Kind of the model's inputs.
    kind: Kind,
    /// How held-out data is read: seed, shuffle window, decode threads, corrupt samples allowed.
    data: DataSettings,
}

#[derive(Debug, Clone, Copy)]
struct DataSettings {
    seed: u64,
    shuffle_window_shards: usize,
    decode_threads: usize,
    max_corrupt_samples: u64,
}

impl Default for DataSettings {
    /// A job's defaults, for reference weights.
    fn default() -> Self {
        Self { seed: 0, shuffle_window_shards: 4, decode_threads: 2, max_corrupt_samples: 100 }
    }
}

impl Session {
    fn model(&self) -> ModelRef<'_> {
        match &self.loaded {
            Loaded::Blip { model, .. } => ModelRef::Blip(model),
            Loaded::Albef { model, .. } => ModelRef::Albef(model),
            Loaded::Trainer(trainer) => {
                if let Some(clip) = trainer.clip() {
                    ModelRef::Clip(clip)
                } else if let Some(albef) = trainer.albef() {
                    ModelRef::Albef(&albef.model)
                } else if let Some(blip) = trainer.blip() {
                    ModelRef::Blip(&blip.model)
                } else {
                    unreachable!("every trained family has a model")
                }
            }
        }
    }
}

/// Loads a job's checkpoint.
fn load_job(config: &JobConfig, checkpoint: Option<&str>, device: Device) -> Result<Session, InferError> {
    let tokenizer = load_tokenizer(&config.data.tokenizer)?;
    let (trainer, step) = crate::eval::load_checkpoint(config, tokenizer.as_ref(), checkpoint, device)?;
    let url = checkpoint.or(config.checkpoint.url.as_deref()).unwrap_or_default();
    let info = ModelInfo {
        family: config.model.family.clone(),
        preset: config.model.preset.clone(),
        source: format!("step {step} of job {} ({url})", config.job.name),
        image_size: trainer.spec().image_size(),
        context_length: trainer.spec().context_length(),
    };
    let kind = trainer.compute_kind();
    let data = DataSettings {
        seed: config.job.seed,
        shuffle_window_shards: config.data.shuffle_window_shards,
        decode_threads: config.data.decode_threads,
        max_corrupt_samples: config.data.max_corrupt_samples,
    };
    Ok(Session { loaded: Loaded::Trainer(Box::new(trainer)), tokenizer, info, kind, data })
}

/// Reads a safetensors file of named tensors.
fn read_weights(path: &Path) -> Result<Vec<(String, Tensor)>, InferError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| InferError::Weights { path: shown.clone(), reason: e.to_string() })?;
    crate::checkpoint::from_safetensors(&bytes, &shown).map_err(|e| InferError::Weights { path: shown, reason: e.to_string() })
}

/// The image size weights were trained at, from their position embeddings `[1, T, W]` (or
/// `[T, W]`) and patch convolution `[W, 3, P, P]`, when that differs from `vision`'s.
fn image_size_of(tensors: &[(String, Tensor)], positions: &str, patch: &str, vision: &VitConfig) -> Option<i64> {
    let find = |key: &str| tensors.iter().find(|(name, _)| name == key).map(|(_, t)| t.size());
    let tokens = *find(positions)?.iter().rev().nth(1)?;
    let patch_size = *find(patch)?.last()?;
    let grid = ((tokens - 1) as f64).sqrt().round() as i64;
    (patch_size == vision.patch_size && grid * grid == tokens - 1 && grid * patch_size != vision.image_size)
        .then_some(grid * patch_size)
}

/// Rows of the word embeddings at `key`, when the weights have them.
fn vocab_of(tensors: &[(String, Tensor)], key: &str) -> Option<i64> {
    tensors.iter().find(|(name, _)| name == key).map(|(_, t)| t.size()[0])
}

/// Copies `tensors` (braid names) into the variables of `vs`.
fn copy_into(vs: &nn::VarStore, tensors: &[(String, Tensor)], origin: &str) -> Result<(), InferError> {
    let variables = vs.variables();
    for (name, t) in tensors {
        let Some(param) = variables.get(name) else {
            return Err(InferError::Weights { path: origin.into(), reason: format!("braid's model has no parameter {name:?}") });
        };
        tch::no_grad(|| param.shallow_clone().copy_(&t.to_kind(param.kind())));
    }
    Ok(())
}

/// The transformers BLIP layout a state dict holds, judged by its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BlipLayout {
    /// `BlipForImageTextRetrieval`: `text_encoder.*`, `vision_proj`, `text_proj`, `itm_head`.
    Retrieval,
    /// `BlipForConditionalGeneration`: `text_decoder.*`.
    Captioning,
}

impl BlipLayout {
    fn class(self) -> &'static str {
        match self {
            BlipLayout::Retrieval => "BlipForImageTextRetrieval",
            BlipLayout::Captioning => "BlipForConditionalGeneration",
        }
    }
}

/// Which BLIP layout the keys of a state dict are.
pub(crate) fn blip_layout(keys: &[&str]) -> Result<BlipLayout, String> {
    let retrieval = keys.iter().any(|k| k.starts_with("text_encoder.") || k.starts_with("itm_head."));
    let captioning = keys.iter().any(|k| k.starts_with("text_decoder."));
    match (retrieval, captioning) {
        (true, false) => Ok(BlipLayout::Retrieval),
        (false, true) => Ok(BlipLayout::Captioning),
        (true, true) => Err("holds both text_encoder.* and text_decoder.* keys: give the BlipForImageTextRetrieval \
             and BlipForConditionalGeneration state dicts as two --weights files"
            .into()),
        (false, false) => {
            let first: Vec<String> = keys.iter().take(3).map(|k| format!("{k:?}")).collect();
            Err(format!(
                "is not a transformers BLIP state dict: no text_encoder.* (BlipForImageTextRetrieval) or text_decoder.* \
                 (BlipForConditionalGeneration) key; its keys begin {}",
                if first.is_empty() { "nowhere (it is empty)".to_string() } else { first.join(", ") }
            ))
        }
    }
}

/// The special tokens BLIP reads from a BERT tokenizer: `[DEC]`, `[ENC]`, `[SEP]`, `[PAD]`.
fn blip_tokens(hf: &HfTokenizer, path: &str) -> Result<BlipTokens, InferError> {
    let bert = hf.bert_special_tokens()?;
    let mut missing = Vec::new();
    let mut find = |token: &'static str| {
        hf.token_to_id(token).map(i64::from).unwrap_or_else(|| {
            missing.push(token);
            0
        })
    };
    let (bos, enc) = (find("[DEC]"), find("[ENC]"));
    if !missing.is_empty() {
        return Err(InferError::TokenizerUnfit {
            path: path.into(),
            reason: format!("no {} token: BLIP's tokenizer adds [DEC] (its bos_token) and [ENC]", missing.join(" or ")),
        });
    }
    Ok(BlipTokens { bos_token_id: bos, enc_token_id: enc, sep_token_id: i64::from(bert.sep), pad_token_id: i64::from(bert.pad) })
}

/// Loads BLIP from transformers state dicts: the layout the task needs (captioning for
/// `caption`, retrieval for `itm` and `itc`); the other file, if given, is not read into the
/// model (transformers' published pair was fine-tuned apart and disagrees on shared tensors).
fn load_blip_weights(files: &[PathBuf], preset: &str, tokenizer_path: &Path, task: Task, device: Device) -> Result<Session, InferError> {
    let tokenizer_shown = tokenizer_path.display().to_string();
    let hf = HfTokenizer::from_file(tokenizer_path)?;
    let tokens = blip_tokens(&hf, &tokenizer_shown)?;
    let mut by_layout: HashMap<BlipLayout, (PathBuf, Vec<(String, Tensor)>)> = HashMap::new();
    for file in files {
        let tensors = read_weights(file)?;
        let keys: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
        let layout =
            blip_layout(&keys).map_err(|reason| InferError::Weights { path: file.display().to_string(), reason })?;
        if let Some((other, _)) = by_layout.get(&layout) {
            return Err(InferError::Weights {
                path: file.display().to_string(),
                reason: format!("holds {} weights, as {} does: give at most one file of each layout", layout.class(), other.display()),
            });
        }
        by_layout.insert(layout, (file.clone(), tensors));
    }
    let needed = match task {
        Task::Caption => BlipLayout::Captioning,
        Task::Itm | Task::Itc => BlipLayout::Retrieval,
    };
    let Some((file, tensors)) = by_layout.remove(&needed) else {
        let given: Vec<String> = by_layout.iter().map(|(l, (p, _))| format!("{} holds {} weights", p.display(), l.class())).collect();
        let need = match needed {
            BlipLayout::Captioning => "captioning weights (BlipForConditionalGeneration: text_decoder.* keys, the decoder and its LM head)",
            BlipLayout::Retrieval => "retrieval weights (BlipForImageTextRetrieval: text_encoder.*, vision_proj, text_proj, itm_head)",
        };
        return Err(InferError::Weights {
            path: files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            reason: format!("--task {} needs {need}; {}", task.name(), given.join(", ")),
        });
    };
    let shown = file.display().to_string();
    let text_root = match needed {
        BlipLayout::Retrieval => "text_encoder.",
        BlipLayout::Captioning => "text_decoder.bert.",
    };
    let vocab = vocab_of(&tensors, &format!("{text_root}embeddings.word_embeddings.weight")).unwrap_or(hf.vocab_size() as i64);
    if (hf.vocab_size() as i64) > vocab {
        return Err(InferError::TokenizerUnfit {
            path: tokenizer_shown,
            reason: format!("{} ids do not fit the {vocab} word embeddings of {shown}", hf.vocab_size()),
        });
    }
    let mut config = BlipConfig::preset(preset, vocab, tokens, None)?;
    if let Some(size) = image_size_of(
        &tensors,
        "vision_model.embeddings.position_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        &config.vision,
    ) {
        tracing::info!(weights = %shown, "images of {size}x{size} (the weights' position embeddings) instead of the preset's {}", config.vision.image_size);
        config.vision.image_size = size;
    }
    let (retrieval, captioning) = match needed {
        BlipLayout::Retrieval => (Some(tensors.as_slice()), None),
        BlipLayout::Captioning => (None, Some(tensors.as_slice())),
    };
    let imported = import_transformers(retrieval, captioning, &config)
        .map_err(|e| InferError::Weights { path: shown.clone(), reason: e.to_string() })?;
    let vs = nn::VarStore::new(device);
    let model = Blip::new(&vs.root(), config);
    copy_into(&vs, &imported, &shown)?;
    let info = ModelInfo {
        family: "blip".into(),
        preset: preset.into(),
        source: format!("{shown} ({})", needed.class()),
        image_size: config.vision.image_size,
        context_length: config.context_length,
    };
    Ok(Session { loaded: Loaded::Blip { _vs: vs, model }, tokenizer: Arc::new(hf), info, kind: Kind::Float, data: DataSettings::default() })
}

/// Loads ALBEF from torchmultimodal's `ALBEFModelWithSimilarity` state dict. torchmultimodal
/// keeps no ITM head: `itm_head.weight` and `itm_head.bias`, when the file has them, are read as
/// braid's, and `--task itm` needs them.
fn load_albef_weights(file: &Path, preset: &str, tokenizer_path: &Path, task: Task, device: Device) -> Result<Session, InferError> {
    let shown = file.display().to_string();
    let hf = HfTokenizer::from_file(tokenizer_path)?;
    let pad = hf.bert_special_tokens()?.pad;
    let (itm_head, tensors): (Vec<_>, Vec<_>) = read_weights(file)?.into_iter().partition(|(k, _)| k.starts_with("itm_head."));
    if task == Task::Itm && itm_head.len() != 2 {
        return Err(InferError::Weights {
            path: shown,
            reason: "has no ITM head (torchmultimodal's ALBEFModelWithSimilarity keeps none): --task itm needs \
                     itm_head.weight and itm_head.bias in the file, or a braid checkpoint (--job); --task itc reads these weights"
                .into(),
        });
    }
    let vocab = vocab_of(&tensors, "albef_model.text_encoder.embeddings.word_embeddings.weight").unwrap_or(hf.vocab_size() as i64);
    let mut config = AlbefConfig::preset(preset, vocab, i64::from(pad), None)?;
    if let Some(size) = image_size_of(
        &tensors,
        "albef_model.vision_encoder.encoder.encoder.pos_embedding",
        "albef_model.vision_encoder.encoder.conv_proj.weight",
        &config.vision,
    ) {
        tracing::info!(weights = %shown, "images of {size}x{size} (the weights' position embeddings) instead of the preset's {}", config.vision.image_size);
        config.vision.image_size = size;
    }
    let (online, _momentum) =
        import_torchmultimodal(&tensors, &config).map_err(|e| InferError::Weights { path: shown.clone(), reason: e.to_string() })?;
    let vs = nn::VarStore::new(device);
    let model = Albef::new(&vs.root(), config);
    copy_into(&vs, &online, &shown)?;
    copy_into(&vs, &itm_head, &shown)?;
    let info = ModelInfo {
        family: "albef".into(),
        preset: preset.into(),
        source: format!("{shown} (torchmultimodal ALBEFModelWithSimilarity)"),
        image_size: config.vision.image_size,
        context_length: if preset == "tiny" { 32 } else { 30 },
    };
    Ok(Session { loaded: Loaded::Albef { _vs: vs, model }, tokenizer: Arc::new(hf), info, kind: Kind::Float, data: DataSettings::default() })
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// A batch of images with their names and, for held-out samples, their true captions.
struct ImageBatch {
    names: Vec<String>,
    /// `[B, 3, H, W]` in the model's input kind, on its device.
    images: Tensor,
    /// The caption and its tokens between `[CLS]` and `[SEP]`.
    truth: Vec<Option<(String, Vec<i64>)>>,
}

/// The images a run reads: the first `limit` held-out samples, then the files.
struct Inputs<'a> {
    data: Option<(String, usize)>,
    files: &'a [PathBuf],
}

impl Inputs<'_> {
    fn len(&self) -> usize {
        self.data.as_ref().map_or(0, |(_, n)| *n) + self.files.len()
    }
}

/// Calls `f` with every batch of `inputs`, prepared for `session`'s model.
fn for_each_batch(
    session: &Session,
    inputs: &Inputs<'_>,
    batch: usize,
    device: Device,
    mut f: impl FnMut(ImageBatch) -> Result<(), InferError>,
) -> Result<(), InferError> {
    use crate::data::loader::{Loader, LoaderOptions};
    let size = session.info.image_size;
    let context = session.info.context_length as usize;
    let to_tensor = |pixels: &[f32], n: usize| {
        Tensor::from_slice(pixels).view([n as i64, 3, size, size]).to_kind(session.kind).to_device(device)
    };
    if let Some((url, n)) = &inputs.data {
        let manifest = Arc::new(crate::data::store::load_manifest(url)?);
        let plan = braid_coordinator::plan::SamplePlan::new(manifest, session.data.seed, session.data.shuffle_window_shards);
        let steps = n.div_ceil(batch) as u64;
        let mut loader = Loader::new(LoaderOptions {
            plan,
            manifest_url: url.clone(),
            rank: 0,
            world_size: 1,
            global_batch: batch,
            start_step: 0,
            end_step: steps,
            image_size: size as usize,
            context_length: context,
            tokenizer: session.tokenizer.clone(),
            decode_threads: session.data.decode_threads.max(1),
            prefetch_batches: 2,
            train: false,
            min_crop_scale: 1.0,
            seed: session.data.seed,
            max_corrupt_samples: session.data.max_corrupt_samples,
            on_corrupt: Arc::new(|c| tracing::warn!(shard = %c.shard, key = %c.key, "corrupt held-out sample skipped: {}", c.reason)),
            runtime: None,
        })?;
        let pixels_per_image = 3 * (size * size) as usize;
        for _ in 0..steps {
            let b = loader.next_batch()?;
            let keep: Vec<usize> = (0..b.len()).filter(|&i| b.valid[i] && b.positions[i] < *n as u64).collect();
            if keep.is_empty() {
                continue;
            }
            let pixels: Vec<f32> =
                keep.iter().flat_map(|&i| b.images[i * pixels_per_image..(i + 1) * pixels_per_image].iter().copied()).collect();
            let truth = keep
                .iter()
                .map(|&i| {
                    let ids = &b.tokens[i * context..(i + 1) * context];
                    Some((b.captions[i].clone(), true_caption_body(ids, b.eot_index[i] as usize).to_vec()))
                })
                .collect();
            let names = keep.iter().map(|&i| b.keys[i].clone()).collect();
            f(ImageBatch { names, images: to_tensor(&pixels, keep.len()), truth })?;
        }
    }
    for chunk in inputs.files.chunks(batch) {
        let mut pixels = Vec::new();
        for path in chunk {
            pixels.extend(read_image(path, size as usize)?);
        }
        let names = chunk.iter().map(|p| p.display().to_string()).collect();
        f(ImageBatch { names, images: to_tensor(&pixels, chunk.len()), truth: vec![None; chunk.len()] })?;
    }
    Ok(())
}

/// An image file (PNG, JPEG; other formats are sniffed) through the held-out transform.
fn read_image(path: &Path, size: usize) -> Result<Vec<f32>, InferError> {
    let error = |reason: String| InferError::Image { path: path.display().to_string(), reason };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    let image = augment::decode(&bytes, &ext).map_err(error)?;
    Ok(augment::apply(&image, Transform::Eval, size, 0, 0))
}

/// Held-out samples a run reads: `limit`, at most the manifest's.
fn held_out_count(url: &str, limit: usize) -> Result<usize, InferError> {
    let manifest = crate::data::store::load_manifest(url)?;
    Ok(limit.min(manifest.num_samples() as usize))
}

// ---------------------------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------------------------

/// Captions every image.
fn caption(
    session: &Session,
    inputs: &Inputs<'_>,
    options: &InferOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CaptionReport, InferError> {
    let ModelRef::Blip(blip) = session.model() else {
        return Err(InferError::Unsupported(format!("{} has no decoder: --task caption needs a BLIP model", session.info.family)));
    };
    let hf = session.tokenizer.as_hf().ok_or_else(|| InferError::TokenizerUnfit {
        path: session.tokenizer.name(),
        reason: "captions are decoded with a Hugging Face tokenizer.json".into(),
    })?;
    let config = blip.config();
    let (default_max, default_min) = default_lengths(&session.info.preset, config.context_length);
    let decoding = Decoding {
        beams: options.caption.beams,
        max_length: options.caption.max_length.unwrap_or(default_max),
        min_length: options.caption.min_length.unwrap_or(default_min),
    };
    let positions = config.text.max_position_embeddings as usize;
    if decoding.max_length > positions {
        return Err(InferError::Arguments(format!(
            "--max-length {} exceeds the {positions} position embeddings of blip {}",
            decoding.max_length, session.info.preset
        )));
    }
    if 2 * decoding.beams as i64 > config.text.vocab_size {
        return Err(InferError::Arguments(format!("--beams {} needs a vocabulary of {} tokens; it has {}", decoding.beams, 2 * decoding.beams, config.text.vocab_size)));
    }
    let search = CaptionOptions { max_length: decoding.max_length, min_length: decoding.min_length, num_beams: decoding.beams };
    let sep = config.sep_token_id;
    let total = inputs.len();
    let mut rows = Vec::with_capacity(total);
    let mut accuracy = CaptionAccuracy::default();
    for_each_batch(session, inputs, options.batch, options.device, |b| {
        let generated = generate_captions(blip, &b.images, &search);
        for ((name, ids), truth) in b.names.into_iter().zip(generated).zip(b.truth) {
            let body = caption_body(&ids, sep);
            let text = hf.decode(&body.iter().map(|&id| id as u32).collect::<Vec<_>>()).map_err(|reason| {
                InferError::TokenizerUnfit { path: session.tokenizer.name(), reason }
            })?;
            let matched = truth.as_ref().map(|(_, true_ids)| accuracy.add(body, true_ids));
            let exact_match = truth.as_ref().map(|(_, true_ids)| body == true_ids.as_slice());
            let (true_caption, true_ids) = truth.map_or((None, None), |(c, i)| (Some(c), Some(i)));
            rows.push(CaptionRow { image: name, caption: text, ids, true_caption, true_ids, matched_tokens: matched, exact_match });
        }
        progress(rows.len(), total);
        Ok(())
    })?;
    let accuracy = (accuracy.captions > 0).then_some(accuracy);
    let (bodies, truths): (Vec<Vec<i64>>, Vec<Vec<i64>>) = rows
        .iter()
        .filter_map(|r| r.true_ids.as_ref().map(|t| (caption_body(&r.ids, sep).to_vec(), t.clone())))
        .unzip();
    let scores = (!truths.is_empty()).then(|| crate::eval::caption_scores(&bodies, &truths, sep));
    Ok(CaptionReport {
        scores,
        decoding,
        captions: rows,
        token_accuracy: accuracy.and_then(|a| a.token_accuracy()),
        exact_match_rate: accuracy.and_then(|a| a.exact_match_rate()),
        accuracy,
    })
}

/// `score` of ITM reports.
const ITM_SCORE: &str = "itm_match_probability";
/// `score` of ITC reports.
const ITC_SCORE: &str = "itc_cosine_similarity";

/// Texts tokenized for the text encoders.
struct TextBatch {
    /// `[T, L]`, `[CLS]` first.
    ids: Tensor,
    /// `[T, L]`: 1 up to and including `[SEP]`.
    mask: Tensor,
    /// `[T]`: the index of the last token.
    eot: Tensor,
}

fn tokenize(tokenizer: &dyn TextTokenizer, texts: &[String], context: usize, device: Device) -> TextBatch {
    let encoded: Vec<_> = texts.iter().map(|t| tokenizer.encode(t, context)).collect();
    let ids: Vec<i64> = encoded.iter().flat_map(|e| e.ids.iter().copied()).collect();
    let mask: Vec<i64> = encoded.iter().flat_map(|e| (0..context).map(move |i| i64::from(i <= e.eot_index))).collect();
    let eot: Vec<i64> = encoded.iter().map(|e| e.eot_index as i64).collect();
    let shape = [texts.len() as i64, context as i64];
    TextBatch {
        ids: Tensor::from_slice(&ids).view(shape).to_device(device),
        mask: Tensor::from_slice(&mask).view(shape).to_device(device),
        eot: Tensor::from_slice(&eot).to_device(device),
    }
}

/// Rows `start..start + n` of `t`.
fn rows(t: &Tensor, start: usize, n: usize) -> Tensor {
    t.narrow(0, start as i64, n as i64)
}

/// How a task scores a batch of images against every text.
enum Scorer<'a> {
    /// Cosine similarity with the texts' contrastive features `[T, E]`.
    Itc(&'a Tensor),
    /// Match probability of the ITM head; `pairs` image-text pairs per forward.
    Itm { texts: &'a TextBatch, pairs: usize },
}

/// `[B, T]` scores of a batch of images against every text.
fn score_batch(model: ModelRef<'_>, scorer: &Scorer<'_>, images: &Tensor) -> Result<Tensor, InferError> {
    let b = images.size()[0];
    let (texts, pairs) = match scorer {
        Scorer::Itc(text) => {
            let image = match model {
                ModelRef::Clip(m) => m.encode_image(images),
                ModelRef::Albef(m) => m.image_feature(&m.encode_image(images)),
                ModelRef::Blip(m) => m.image_feature(&m.encode_image(images)),
            };
            return Ok(image.to_kind(Kind::Float).matmul(&text.transpose(0, 1)));
        }
        Scorer::Itm { texts, pairs } => (texts, *pairs),
    };
    let image_states = match model {
        ModelRef::Albef(m) => m.encode_image(images),
        ModelRef::Blip(m) => m.encode_image(images),
        ModelRef::Clip(_) => return Err(InferError::Unsupported("CLIP has no image-text matching head: use --task itc".into())),
    };
    // Each forward pairs every image of the batch with `c` texts, about `pairs` pairs in all.
    let t = texts.ids.size()[0] as usize;
    let per_forward = (pairs / b as usize).max(1);
    let mut columns = Vec::new();
    for start in (0..t).step_by(per_forward) {
        let c = per_forward.min(t - start);
        let states = image_states.repeat_interleave_self_int(c as i64, Some(0), None);
        let ids = rows(&texts.ids, start, c).repeat([b, 1]);
        let mask = rows(&texts.mask, start, c).repeat([b, 1]);
        let logits = match model {
            ModelRef::Albef(m) => m.itm_logits(&m.fuse(&m.encode_text(&ids, &mask), &mask, &states)),
            ModelRef::Blip(m) => {
                // BLIP's image-grounded encoder reads [ENC] where the tokenizer put [CLS].
                let ids = with_first_token(&ids, m.config().enc_token_id);
                m.itm_logits(&m.encode_multimodal(&ids, &mask, &states))
            }
            ModelRef::Clip(_) => unreachable!("returned above"),
        };
        let matched = logits.to_kind(Kind::Float).softmax(-1, Kind::Float).select(1, 1);
        columns.push(matched.view([b, c as i64]));
    }
    Ok(Tensor::cat(&columns, 1))
}

/// Contrastive features `[T, E]` of every text, `batch` at a time.
fn text_features(model: ModelRef<'_>, texts: &TextBatch, batch: usize) -> Tensor {
    let t = texts.ids.size()[0] as usize;
    let chunks: Vec<Tensor> = (0..t)
        .step_by(batch)
        .map(|start| {
            let n = batch.min(t - start);
            let (ids, mask, eot) = (rows(&texts.ids, start, n), rows(&texts.mask, start, n), rows(&texts.eot, start, n));
            let features = match model {
                ModelRef::Clip(m) => m.encode_text(&ids, &eot),
                ModelRef::Albef(m) => m.text_feature(&m.encode_text(&ids, &mask)),
                ModelRef::Blip(m) => m.text_feature(&m.encode_text(&ids, &mask)),
            };
            features.to_kind(Kind::Float)
        })
        .collect();
    Tensor::cat(&chunks, 0)
}

/// Scores every image against every text. The images are read once and kept (on the CPU) until
/// the held-out captions among them are known, since those are texts too.
fn score(
    session: &Session,
    inputs: &Inputs<'_>,
    options: &InferOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ScoreReport, InferError> {
    let model = session.model();
    let context = session.info.context_length as usize;
    let mut batches = Vec::new();
    let mut images = Vec::with_capacity(inputs.len());
    let mut held_out = Vec::new();
    let mut own_text = Vec::with_capacity(inputs.len());
    for_each_batch(session, inputs, options.batch, Device::Cpu, |b| {
        for (name, truth) in b.names.into_iter().zip(b.truth) {
            // Held-out image k's caption is text k.
            own_text.push(truth.as_ref().map(|_| held_out.len()));
            held_out.extend(truth.map(|(caption, _)| caption));
            images.push(name);
        }
        batches.push(b.images);
        Ok(())
    })?;
    let texts: Vec<String> = held_out.into_iter().chain(options.texts.iter().cloned()).collect();
    if texts.is_empty() {
        return Err(InferError::Arguments(format!("--task {} has no text to score", options.task.name())));
    }
    let tokens = tokenize(session.tokenizer.as_ref(), &texts, context, options.device);
    let features;
    let scorer = match options.task {
        Task::Itc => {
            features = tch::no_grad(|| text_features(model, &tokens, options.batch));
            Scorer::Itc(&features)
        }
        _ => Scorer::Itm { texts: &tokens, pairs: options.batch },
    };
    let total = images.len();
    let mut scores: Vec<Vec<f64>> = Vec::with_capacity(total);
    for batch in batches {
        let s = tch::no_grad(|| score_batch(model, &scorer, &batch.to_device(options.device)))?;
        let s = s.to_kind(Kind::Double).to_device(Device::Cpu);
        for i in 0..s.size()[0] {
            scores.push(Vec::<f64>::try_from(s.get(i))?);
        }
        progress(scores.len(), total);
    }
    let best: Vec<usize> =
        scores.iter().map(|row| (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0)).collect();
    let top_match = top_match(&texts, &best, &own_text);
    Ok(ScoreReport {
        score: if options.task == Task::Itm { ITM_SCORE } else { ITC_SCORE }.into(),
        images,
        texts,
        scores,
        best,
        own_text,
        top_match,
    })
}

/// How often an image's best text equals its own caption, over the images that have one, with
/// the chance level of a random pick.
pub fn top_match(texts: &[String], best: &[usize], own_text: &[Option<usize>]) -> Option<TopMatch> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in texts {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    let (mut images, mut right, mut chance) = (0, 0, 0.0);
    for (&b, own) in best.iter().zip(own_text) {
        let Some(own) = own else { continue };
        images += 1;
        right += usize::from(texts[b] == texts[*own]);
        chance += counts[texts[*own].as_str()] as f64 / texts.len() as f64;
    }
    (images > 0).then(|| TopMatch { images, right, accuracy: right as f64 / images as f64, chance: chance / images as f64 })
}

/// Runs `braid infer`: checks the arguments, loads the model and the images, and computes the
/// task. `progress(done, total)` is called after every batch of images.
pub fn infer(options: &InferOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<InferReport, InferError> {
    let problems = argument_problems(options);
    if !problems.is_empty() {
        return Err(InferError::Arguments(problems.join("; ")));
    }
    let mut seen = HashSet::new();
    for path in &options.images {
        if seen.insert(path) && !path.is_file() {
            return Err(InferError::Image { path: path.display().to_string(), reason: "no such file".into() });
        }
    }
    let session = match &options.source {
        ModelSource::Job { config, checkpoint } => load_job(config, checkpoint.as_deref(), options.device)?,
        ModelSource::Weights { files, family: WeightsFamily::Blip, preset, tokenizer } => {
            load_blip_weights(files, preset, tokenizer, options.task, options.device)?
        }
        ModelSource::Weights { files, family: WeightsFamily::Albef, preset, tokenizer } => {
            load_albef_weights(&files[0], preset, tokenizer, options.task, options.device)?
        }
    };
    let data = match (&options.data, &options.source) {
        (Some(url), _) => Some(url.clone()),
        (None, ModelSource::Job { config, .. }) if options.images.is_empty() => config.data.eval.clone(),
        _ => None,
    };
    let data = data.map(|url| held_out_count(&url, options.limit).map(|n| (url, n))).transpose()?;
    let inputs = Inputs { data, files: &options.images };
    let mut report = InferReport { task: options.task, model: session.info.clone(), captioning: None, scoring: None };
    match options.task {
        Task::Caption => report.captioning = Some(caption(&session, &inputs, options, progress)?),
        Task::Itm | Task::Itc => report.scoring = Some(score(&session, &inputs, options, progress)?),
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(family: WeightsFamily, task: Task) -> InferOptions {
        InferOptions {
            task,
            source: ModelSource::Weights {
                files: vec!["w.safetensors".into()],
                family,
                preset: "tiny".into(),
                tokenizer: "tokenizer.json".into(),
            },
            images: vec!["a.png".into()],
            data: None,
            limit: DEFAULT_LIMIT,
            texts: Vec::new(),
            caption: CaptionSettings::default(),
            batch: 8,
            device: Device::Cpu,
        }
    }

    #[test]
    fn a_sensible_request_has_no_problems() {
        assert!(argument_problems(&weights(WeightsFamily::Blip, Task::Caption)).is_empty());
        let itm = InferOptions { texts: vec!["a red circle".into()], ..weights(WeightsFamily::Albef, Task::Itm) };
        assert!(argument_problems(&itm).is_empty());
        let data = InferOptions { images: Vec::new(), data: Some("eval/manifest.json".into()), ..weights(WeightsFamily::Blip, Task::Itc) };
        assert!(argument_problems(&data).is_empty());
    }

    #[test]
    fn albef_cannot_caption() {
        let problems = argument_problems(&weights(WeightsFamily::Albef, Task::Caption));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("ALBEF has no decoder"), "{problems:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let options = InferOptions {
            images: Vec::new(),
            texts: vec!["a caption".into()],
            limit: 0,
            batch: 0,
            caption: CaptionSettings { beams: 0, max_length: Some(4), min_length: Some(6) },
            ..weights(WeightsFamily::Blip, Task::Caption)
        };
        let problems = argument_problems(&options).join("\n");
        for expected in ["no images", "--text is for --task itm and itc", "--limit is 0", "--batch is 0", "--beams is 0", "--min-length 6 exceeds --max-length 4"] {
            assert!(problems.contains(expected), "{expected:?} missing from:\n{problems}");
        }
        let short = InferOptions { caption: CaptionSettings { max_length: Some(1), ..Default::default() }, ..weights(WeightsFamily::Blip, Task::Caption) };
        assert!(argument_problems(&short).join(" ").contains("--max-length 1 leaves no token"));
    }

    #[test]
    fn scoring_needs_texts() {
        let problems = argument_problems(&weights(WeightsFamily::Blip, Task::Itm));
        assert_eq!(problems, vec!["--task itm needs texts to score: give --text \"...\" (repeatable) or --data MANIFEST"]);
    }

    #[test]
    fn weights_files_are_counted_per_family() {
        let mut options = weights(WeightsFamily::Albef, Task::Itc);
        options.texts = vec!["x".into()];
        if let ModelSource::Weights { files, .. } = &mut options.source {
            files.push("second.safetensors".into());
        }
        assert!(argument_problems(&options)[0].contains("ALBEF takes one"));
        if let ModelSource::Weights { family, files, .. } = &mut options.source {
            *family = WeightsFamily::Blip;
            files.push("third.safetensors".into());
        }
        assert!(argument_problems(&options)[0].contains("BLIP takes one or two"));
    }

    #[test]
    fn token_accuracy_counts_positions_over_true_tokens() {
        let mut a = CaptionAccuracy::default();
        // Equal: 4 of 4.
        assert_eq!(a.add(&[10, 11, 12, 13], &[10, 11, 12, 13]), 4);
        // Shorter and one wrong: positions 0 and 2 match, 4 true tokens.
        assert_eq!(a.add(&[10, 9, 12], &[10, 11, 12, 13]), 2);
        // Longer: the extra token gains nothing; not exact.
        assert_eq!(a.add(&[7, 8, 9], &[7, 8]), 2);
        // Shifted by one: nothing matches position-wise.
        assert_eq!(a.add(&[1, 7, 8], &[7, 8]), 0);
        assert_eq!(a, CaptionAccuracy { captions: 4, true_tokens: 12, matched_tokens: 8, exact_matches: 1 });
        assert_eq!(a.token_accuracy(), Some(8.0 / 12.0));
        assert_eq!(a.exact_match_rate(), Some(0.25));
        assert_eq!(CaptionAccuracy::default().token_accuracy(), None);
    }

    #[test]
    fn caption_bodies_drop_the_special_tokens() {
        // Generated ids after [DEC]: the body stops at [SEP] (3); a caption cut at max_length has none.
        assert_eq!(caption_body(&[20, 21, 3], 3), &[20, 21]);
        assert_eq!(caption_body(&[20, 21, 22], 3), &[20, 21, 22]);
        assert_eq!(caption_body(&[3], 3), &[] as &[i64]);
        // Encoded true caption: [CLS]=2 ... [SEP]=3 at eot_index, then padding.
        assert_eq!(true_caption_body(&[2, 20, 21, 3, 0, 0], 3), &[20, 21]);
        assert_eq!(true_caption_body(&[2, 3, 0], 1), &[] as &[i64]);
        assert_eq!(true_caption_body(&[2, 3], 0), &[] as &[i64]);
    }

    #[test]
    fn top_match_compares_caption_texts() {
        let texts: Vec<String> = ["red circle", "blue square", "red circle", "extra"].iter().map(|s| s.to_string()).collect();
        // Image 0 picks text 2, equal to its own caption (text 0): right. Image 1 picks text 0: wrong.
        // Image 2 is a file without a caption.
        let t = top_match(&texts, &[2, 0, 3], &[Some(0), Some(1), None]).unwrap();
        assert_eq!((t.images, t.right), (2, 1));
        assert!((t.chance - (2.0 / 4.0 + 1.0 / 4.0) / 2.0).abs() < 1e-12);
        assert!(top_match(&texts, &[0], &[None]).is_none());
    }

    #[test]
    fn blip_layouts_are_told_apart_by_their_keys() {
        assert_eq!(blip_layout(&["vision_model.x", "text_encoder.embeddings.y", "itm_head.weight"]), Ok(BlipLayout::Retrieval));
        assert_eq!(blip_layout(&["vision_model.x", "text_decoder.bert.embeddings.y"]), Ok(BlipLayout::Captioning));
        assert!(blip_layout(&["text_encoder.a", "text_decoder.b"]).unwrap_err().contains("two --weights files"));
        let err = blip_layout(&["albef_model.vision_encoder.encoder.conv_proj.weight"]).unwrap_err();
        assert!(err.contains("not a transformers BLIP state dict") && err.contains("albef_model"), "{err}");
    }

    #[test]
    fn image_size_follows_the_position_embeddings() {
        let vision = BlipConfig::preset("base", 30524, BlipTokens { bos_token_id: 30522, enc_token_id: 30523, sep_token_id: 102, pad_token_id: 0 }, None)
            .unwrap()
            .vision;
        let tensors = |tokens: i64| {
            vec![
                ("pos".to_string(), Tensor::zeros([1, tokens, 4], (Kind::Float, Device::Cpu))),
                ("patch".to_string(), Tensor::zeros([4, 3, 16, 16], (Kind::Float, Device::Cpu))),
            ]
        };
        // transformers' BLIP checkpoints: 384x384, 24x24 patches of 16.
        assert_eq!(image_size_of(&tensors(577), "pos", "patch", &vision), Some(384));
        // The preset's own size: nothing to change.
        assert_eq!(image_size_of(&tensors(197), "pos", "patch", &vision), None);
        assert_eq!(image_size_of(&tensors(100), "pos", "patch", &vision), None);
    }

    #[test]
    fn default_lengths_follow_the_preset() {
        assert_eq!(default_lengths("tiny", 32), (32, 0));
        assert_eq!(default_lengths("base", 30), (20, 5));
    }
}
