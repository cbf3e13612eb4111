//! `braid data synth`: a small, learnable image-caption WebDataset.
//!
//! Every image shows one shape of one colour at one of five positions, small or large, on a
//! plain or lightly noisy grey background. The caption says what and where ("a small blue
//! square at the top"), so a model can learn to match images and text, and the class
//! (`shape * num_colours + colour`) allows zero-shot classification. Everything is a pure
//! function of the seed: sample `i` of a split depends only on (split seed, `i`).
//!
//! Output layout:
//! ```text
//! <out>/train/shard-000000.tar ...  <out>/train/manifest.json
//! <out>/eval/shard-000000.tar ...   <out>/eval/manifest.json   (held out: another seed)
//! <out>/tokenizer.json              Hugging Face WordLevel tokenizer over the caption words
//! <out>/tokenizer-bert.json         the same words with BERT's special tokens (ALBEF, BLIP)
//! <out>/classes.json                class names and prompt templates for zero-shot evaluation
//! ```

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use braid_coordinator::manifest::{DatasetManifest, SampleEntry, ShardEntry, MANIFEST_VERSION};
use braid_coordinator::plan::SplitMix64;
use image::{ImageEncoder, RgbImage};
use rayon::prelude::*;

use super::error::{Error, Result};
use super::index::write_manifest;

/// Shape names; a shape's index is its position here.
pub const SHAPES: [&str; 6] = ["circle", "square", "triangle", "cross", "diamond", "ring"];

/// Colour names and their RGB values; a colour's index is its position here.
pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 215, 40]),
    ("cyan", [40, 200, 210]),
    ("purple", [140, 60, 190]),
    ("orange", [240, 140, 30]),
    ("white", [245, 245, 245]),
];

/// Zero-shot prompt templates written to `classes.json`.
pub const CLASS_TEMPLATES: [&str; 4] = ["a photo of a {}.", "a {}.", "a picture of a {}.", "there is a {}."];

/// Special tokens of the written tokenizer, in id order: `[PAD]`=0, `[SOT]`=1, `[EOT]`=2, `[UNK]`=3.
pub const SPECIAL_TOKENS: [&str; 4] = ["[PAD]", "[SOT]", "[EOT]", "[UNK]"];

/// Special tokens of the BERT-style tokenizer, in id order: `[PAD]`=0, `[UNK]`=1, `[CLS]`=2,
/// `[SEP]`=3, `[MASK]`=4, and BLIP's `[DEC]`=5 (the decoder's first token) and `[ENC]`=6 (the
/// image-grounded encoder's first token).
pub const BERT_SPECIAL_TOKENS: [&str; 7] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"];

/// Which special tokens and template a written tokenizer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerStyle {
    /// `[SOT] caption [EOT]` (CLIP: the text tower pools at `[EOT]`).
    Clip,
    /// `[CLS] caption [SEP]` with `[MASK]`, `[DEC]` and `[ENC]` (ALBEF, BLIP).
    Bert,
}

/// Number of caption templates.
const NUM_TEMPLATES: u64 = 6;

/// Number of zero-shot classes: every (shape, colour) pair.
pub fn num_classes() -> usize {
    SHAPES.len() * COLOURS.len()
}

/// The class of a (shape, colour) pair.
pub fn class_index(shape: usize, colour: usize) -> usize {
    shape * COLOURS.len() + colour
}

/// The name of a class, e.g. "red circle".
pub fn class_name(class: usize) -> String {
    format!("{} {}", COLOURS[class % COLOURS.len()].0, SHAPES[class / COLOURS.len()])
}

/// Image file format of the written samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SynthFormat {
    /// Lossless PNG (`.png`).
    #[default]
    Png,
    /// JPEG at quality 95 (`.jpg`).
    Jpeg,
}

impl SynthFormat {
    /// The member extension.
    pub fn extension(self) -> &'static str {
        match self {
            SynthFormat::Png => "png",
            SynthFormat::Jpeg => "jpg",
        }
    }
}

impl FromStr for SynthFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Ok(SynthFormat::Png),
            "jpg" | "jpeg" => Ok(SynthFormat::Jpeg),
            other => Err(format!("image format {other:?}: expected png or jpg")),
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    /// Training samples. Default 10,000.
    pub train_samples: usize,
    /// Held-out samples (0 = no eval split). Default 1,000.
    pub eval_samples: usize,
    /// Samples per tar shard. Default 1,000.
    pub samples_per_shard: usize,
    /// Side of the square images in pixels. Default 32.
    pub image_size: u32,
    /// Image format. Default PNG.
    pub format: SynthFormat,
    /// Seed; the eval split uses a seed derived from it. Default 0.
    pub seed: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            train_samples: 10_000,
            eval_samples: 1_000,
            samples_per_shard: 1_000,
            image_size: 32,
            format: SynthFormat::Png,
            seed: 0,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthReport {
    /// `<out>/train/manifest.json`.
    pub train_manifest: PathBuf,
    /// `<out>/eval/manifest.json`, when an eval split was written.
    pub eval_manifest: Option<PathBuf>,
    /// `<out>/tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `<out>/classes.json`.
    pub classes: PathBuf,
    /// Tar shards written over both splits.
    pub shards: usize,
    /// Number of zero-shot classes.
    pub num_classes: usize,
    /// Tokens in the tokenizer's vocabulary, special tokens included.
    pub vocab_size: usize,
}

/// Where a shape sits in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Left half, vertically centred.
    Left,
    /// Right half, vertically centred.
    Right,
    /// Top half, horizontally centred.
    Top,
    /// Bottom half, horizontally centred.
    Bottom,
    /// The middle.
    Center,
}

impl Placement {
    const ALL: [Placement; 5] =
        [Placement::Left, Placement::Right, Placement::Top, Placement::Bottom, Placement::Center];

    /// The single word for the place ("left").
    pub fn word(self) -> &'static str {
        match self {
            Placement::Left => "left",
            Placement::Right => "right",
            Placement::Top => "top",
            Placement::Bottom => "bottom",
            Placement::Center => "center",
        }
    }

    /// The phrase used in captions ("on the left", "at the top").
    pub fn phrase(self) -> &'static str {
        match self {
            Placement::Left => "on the left",
            Placement::Right => "on the right",
            Placement::Top => "at the top",
            Placement::Bottom => "at the bottom",
            Placement::Center => "in the center",
        }
    }

    /// Centre of the shape in unit image coordinates (x right, y down).
    fn centre(self) -> (f64, f64) {
        match self {
            Placement::Left => (0.27, 0.5),
            Placement::Right => (0.73, 0.5),
            Placement::Top => (0.5, 0.27),
            Placement::Bottom => (0.5, 0.73),
            Placement::Center => (0.5, 0.5),
        }
    }
}

/// Everything that defines one synthetic sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Where the shape is.
    pub placement: Placement,
    /// Large (true) or small.
    pub large: bool,
    /// Caption template.
    pub template: usize,
    centre: (f64, f64),
    radius: f64,
    background: [u8; 3],
    noise: u8,
    noise_seed: u64,
}

impl Scene {
    /// The scene of sample `index` for a split seed.
    pub fn sample(split_seed: u64, index: u64) -> Scene {
        let mut rng = SplitMix64::new(split_seed, index);
        let shape = rng.below(SHAPES.len() as u64) as usize;
        let colour = rng.below(COLOURS.len() as u64) as usize;
        let placement = Placement::ALL[rng.below(Placement::ALL.len() as u64) as usize];
        let large = rng.below(2) == 1;
        let template = rng.below(NUM_TEMPLATES) as usize;
        let (cx, cy) = placement.centre();
        let mut jitter = || (rng.unit_f64() - 0.5) * 0.08;
        let centre = (cx + jitter(), cy + jitter());
        let radius = if large { 0.21 } else { 0.12 } * (0.9 + 0.2 * rng.unit_f64());
        let grey = 90 + rng.below(80) as i32;
        let mut tint = || (grey + rng.below(25) as i32 - 12).clamp(0, 255) as u8;
        let background = [tint(), tint(), tint()];
        let noise = if rng.below(2) == 0 { 0 } else { 10 };
        Scene {
            shape,
            colour,
            placement,
            large,
            template,
            centre,
            radius,
            background,
            noise,
            noise_seed: rng.next_u64(),
        }
    }

    /// The class index (`shape * num_colours + colour`).
    pub fn class(&self) -> usize {
        class_index(self.shape, self.colour)
    }

    /// The caption from the scene's template.
    pub fn caption(&self) -> String {
        caption(self.template, self.shape, self.colour, self.placement, self.large)
    }

    /// Draws the scene as a `size` x `size` RGB image, anti-aliased with 4x4 supersampling.
    pub fn render(&self, size: u32) -> RgbImage {
        const SS: u32 = 4;
        let mut noise = SplitMix64::new(self.noise_seed, 0);
        let colour = COLOURS[self.colour].1;
        RgbImage::from_fn(size, size, |px, py| {
            let mut covered = 0u32;
            for sy in 0..SS {
                for sx in 0..SS {
                    let x = (px as f64 + (sx as f64 + 0.5) / SS as f64) / size as f64;
                    let y = (py as f64 + (sy as f64 + 0.5) / SS as f64) / size as f64;
                    let (u, v) = ((x - self.centre.0) / self.radius, (y - self.centre.1) / self.radius);
                    covered += u32::from(inside(self.shape, u, v));
                }
            }
            let alpha = covered as f64 / (SS * SS) as f64;
            image::Rgb(std::array::from_fn(|c| {
                let jitter =
                    if self.noise == 0 { 0 } else { noise.below(2 * self.noise as u64 + 1) as i32 - self.noise as i32 };
                let bg = (self.background[c] as i32 + jitter).clamp(0, 255) as f64;
                (bg * (1.0 - alpha) + colour[c] as f64 * alpha).round() as u8
            }))
        })
    }
}

/// Whether the point (u, v), in units of the shape's radius around its centre, is inside it.
fn inside(shape: usize, u: f64, v: f64) -> bool {
    let r2 = u * u + v * v;
    match SHAPES[shape] {
        "circle" => r2 <= 1.0,
        "square" => u.abs() <= 0.85 && v.abs() <= 0.85,
        "triangle" => (-1.0..=0.8).contains(&v) && u.abs() <= (v + 1.0) / 1.8,
        "cross" => (u.abs() <= 0.3 && v.abs() <= 1.0) || (v.abs() <= 0.3 && u.abs() <= 1.0),
        "diamond" => u.abs() + v.abs() <= 1.0,
        "ring" => (0.55 * 0.55..=1.0).contains(&r2),
        other => unreachable!("shape {other} has no outline"),
    }
}

/// "a" or "an" before `word`.
fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// The caption of a scene under template `template` (0..6).
pub fn caption(template: usize, shape: usize, colour: usize, placement: Placement, large: bool) -> String {
    let (shape, colour) = (SHAPES[shape], COLOURS[colour].0);
    let size = if large { "large" } else { "small" };
    let (phrase, word) = (placement.phrase(), placement.word());
    match template {
        0 => format!("{} {colour} {shape} {phrase}", article(colour)),
        1 => format!("{} {size} {colour} {shape} {phrase}", article(size)),
        2 => format!("{word}: {} {colour} {shape}", article(colour)),
        3 => format!("a picture of {} {size} {colour} {shape} {phrase}", article(size)),
        4 => format!("there is {} {colour} {shape} {phrase}", article(colour)),
        _ => format!("{size} {colour} {shape}, {word}"),
    }
}

/// Splits text as the tokenizer's `Whitespace` pre-tokenizer does (`\w+|[^\w\s]+`), lowercased.
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    static PATTERN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let pattern = PATTERN.get_or_init(|| regex::Regex::new(r"\w+|[^\w\s]+").expect("valid pattern"));
    pattern.find_iter(text).map(|m| m.as_str().to_lowercase())
}

/// Every word any caption or zero-shot prompt can contain, sorted, without special tokens.
pub fn vocabulary() -> Vec<String> {
    let mut vocab = BTreeSet::new();
    for shape in 0..SHAPES.len() {
        for colour in 0..COLOURS.len() {
            for placement in Placement::ALL {
                for large in [false, true] {
                    for template in 0..NUM_TEMPLATES as usize {
                        vocab.extend(words(&caption(template, shape, colour, placement, large)));
                    }
                }
            }
            for prompt in CLASS_TEMPLATES {
                vocab.extend(words(&prompt.replace("{}", &class_name(class_index(shape, colour)))));
            }
        }
    }
    vocab.into_iter().collect()
}

/// Writes a Hugging Face `tokenizer.json`: WordLevel over [`vocabulary`] after the special
/// tokens, Lowercase normaliser, Whitespace pre-tokenizer, "[SOT] $A [EOT]" template and padding
/// with `[PAD]` = 0. Returns the vocabulary size.
pub fn write_tokenizer(path: &Path) -> Result<usize> {
    write_tokenizer_style(path, TokenizerStyle::Clip)
}

/// [`write_tokenizer`] in either style: the BERT style has [`BERT_SPECIAL_TOKENS`] and the
/// template "[CLS] $A [SEP]".
pub fn write_tokenizer_style(path: &Path, style: TokenizerStyle) -> Result<usize> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::normalizers::utils::Lowercase;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, PaddingParams, Tokenizer};

    let failed = |reason: String| Error::Tokenizer { path: path.display().to_string(), reason };
    let (special_tokens, first, last): (&[&str], &str, &str) = match style {
        TokenizerStyle::Clip => (&SPECIAL_TOKENS, "[SOT]", "[EOT]"),
        TokenizerStyle::Bert => (&BERT_SPECIAL_TOKENS, "[CLS]", "[SEP]"),
    };
    let id = |token: &str| special_tokens.iter().position(|t| *t == token).expect("a special token") as u32;
    let tokens: Vec<String> = special_tokens.iter().map(|s| s.to_string()).chain(vocabulary()).collect();
    let model = WordLevel::builder()
        .vocab(tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect())
        .unk_token("[UNK]".to_string())
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let template = TemplateProcessing::builder()
        .try_single(format!("{first} $A {last}"))
        .and_then(|b| b.try_pair(format!("{first} $A {last} $B:1 {last}:1")))
        .map_err(failed)?
        .special_tokens(vec![(first, id(first)), (last, id(last))])
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(Lowercase))
        .with_pre_tokenizer(Some(Whitespace))
        .with_post_processor(Some(template))
        .with_padding(Some(PaddingParams { pad_id: 0, pad_token: "[PAD]".into(), ..PaddingParams::default() }));
    let special: Vec<AddedToken> = special_tokens.iter().map(|t| AddedToken::from(*t, true)).collect();
    tokenizer.add_special_tokens(&special);
    tokenizer.save(path, true).map_err(|e| failed(e.to_string()))?;
    Ok(tokens.len())
}

/// Writes `classes.json`: `{"classes": [...], "templates": [...]}` with classes in index order.
pub fn write_classes(path: &Path) -> Result<()> {
    let classes: Vec<String> = (0..num_classes()).map(class_name).collect();
    let json = serde_json::json!({ "classes": classes, "templates": CLASS_TEMPLATES });
    let text = serde_json::to_vec_pretty(&json).expect("plain JSON serialises");
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// The seed of a split ("train" or "eval"), so the held-out set shares no samples' randomness.
fn split_seed(seed: u64, split: &str) -> u64 {
    let stream = match split {
        "train" => 0x7472_6169_6e00,
        _ => 0x6576_616c_0000,
    };
    SplitMix64::new(seed, stream).next_u64()
}

/// Encodes an image in `format`.
fn encode(image: &RgbImage, format: SynthFormat, key: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let (w, h) = image.dimensions();
    let written = match format {
        SynthFormat::Png => {
            use image::codecs::png::{CompressionType, FilterType, PngEncoder};
            PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive).write_image(
                image.as_raw(),
                w,
                h,
                image::ExtendedColorType::Rgb8,
            )
        }
        SynthFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95).write_image(
            image.as_raw(),
            w,
            h,
            image::ExtendedColorType::Rgb8,
        ),
    };
    written.map_err(|e| Error::Encode { key: key.to_string(), reason: e.to_string() })?;
    Ok(out)
}

/// Appends one member to a tar being built in memory and returns its data's (offset, length).
fn append_member(tar: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], shard: &str) -> Result<(u64, u64)> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name).map_err(|e| Error::Tar { path: shard.to_string(), reason: e.to_string() })?;
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let offset = tar.get_ref().len() as u64 + 512;
    tar.append(&header, data).map_err(|e| Error::Tar { path: shard.to_string(), reason: e.to_string() })?;
    Ok((offset, data.len() as u64))
}

/// Renders samples `range` of a split into one tar shard; returns its bytes and its entry.
fn build_shard(
    split_seed: u64,
    range: std::ops::Range<u64>,
    opts: &SynthOptions,
    url: String,
) -> Result<(Vec<u8>, ShardEntry)> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    let ext = opts.format.extension();
    let mut samples = Vec::with_capacity(range.clone().count());
    for index in range {
        let scene = Scene::sample(split_seed, index);
        let key = format!("{index:08}");
        let image = encode(&scene.render(opts.image_size), opts.format, &key)?;
        let members =
            [(ext, image), ("txt", scene.caption().into_bytes()), ("cls", scene.class().to_string().into_bytes())];
        let mut entry = SampleEntry { key: key.clone(), members: Default::default() };
        for (ext, data) in members {
            let range = append_member(&mut tar, &format!("{key}.{ext}"), &data, &url)?;
            entry.members.insert(ext.to_string(), range);
        }
        samples.push(entry);
    }
    let bytes = tar.into_inner().map_err(|e| Error::Tar { path: url.clone(), reason: e.to_string() })?;
    let entry = ShardEntry { url, size: bytes.len() as u64, samples };
    Ok((bytes, entry))
}

/// Removes `shard-NNNNNN.tar` files a previous run left in `dir`, so a rerun with fewer
/// samples leaves no stale shards behind.
fn remove_stale_shards(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let ours = name.len() == 16
            && name.starts_with("shard-")
            && name.ends_with(".tar")
            && name[6..12].bytes().all(|b| b.is_ascii_digit());
        if ours {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Writes one split's shards and manifest into `dir`; returns the manifest path and shard count.
fn write_split(dir: &Path, split: &str, samples: usize, opts: &SynthOptions) -> Result<(PathBuf, usize)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    remove_stale_shards(dir)?;
    let seed = split_seed(opts.seed, split);
    let per_shard = opts.samples_per_shard as u64;
    let num_shards = (samples as u64).div_ceil(per_shard);
    let shards = (0..num_shards)
        .into_par_iter()
        .map(|s| {
            let range = s * per_shard..((s + 1) * per_shard).min(samples as u64);
            let url = format!("shard-{s:06}.tar");
            let (bytes, entry) = build_shard(seed, range, opts, url)?;
            let path = dir.join(&entry.url);
            let mut file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            file.write_all(&bytes).map_err(|e| Error::io(&path, e))?;
            Ok(entry)
        })
        .collect::<Result<Vec<_>>>()?;
    let manifest = DatasetManifest { version: MANIFEST_VERSION, shards };
    Ok((write_manifest(dir, &manifest)?, num_shards as usize))
}

fn check(opts: &SynthOptions) -> Result<()> {
    let mut problems = Vec::new();
    if opts.train_samples == 0 {
        problems.push("train_samples = 0: need at least 1");
    }
    if opts.samples_per_shard == 0 {
        problems.push("samples_per_shard = 0: need at least 1");
    }
    if opts.image_size < 8 {
        problems.push("image_size below 8 pixels cannot show a shape");
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(Error::Options(problems.join("; "))),
    }
}

/// Writes the whole synthetic dataset under `out` (see the module documentation for the layout).
pub fn synth(out: &Path, opts: &SynthOptions) -> Result<SynthReport> {
    check(opts)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let (train_manifest, mut shards) = write_split(&out.join("train"), "train", opts.train_samples, opts)?;
    let eval_manifest = match opts.eval_samples {
        0 => None,
        n => {
            let (path, count) = write_split(&out.join("eval"), "eval", n, opts)?;
            shards += count;
            Some(path)
        }
    };
    let tokenizer = out.join("tokenizer.json");
    let vocab_size = write_tokenizer(&tokenizer)?;
    write_tokenizer_style(&out.join("tokenizer-bert.json"), TokenizerStyle::Bert)?;
    let classes = out.join("classes.json");
    write_classes(&classes)?;
    Ok(SynthReport {
        train_manifest,
        eval_manifest,
        tokenizer,
        classes,
        shards,
        num_classes: num_classes(),
        vocab_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::index::index_dir;

    fn small(format: SynthFormat) -> SynthOptions {
        SynthOptions { train_samples: 50, eval_samples: 20, samples_per_shard: 16, image_size: 32, format, seed: 5 }
    }

    fn read_manifest(path: &Path) -> DatasetManifest {
        DatasetManifest::from_json(&std::fs::read(path).unwrap(), "test").unwrap()
    }

    #[test]
    fn index_reproduces_the_written_manifest_and_ranges_hold_the_members() {
        let dir = tempfile::tempdir().unwrap();
        let report = synth(dir.path(), &small(SynthFormat::Png)).unwrap();
        assert_eq!(report.shards, 4 + 2);
        let written = read_manifest(&report.train_manifest);
        assert_eq!(index_dir(&dir.path().join("train")).unwrap(), written);
        assert_eq!(index_dir(&dir.path().join("eval")).unwrap(), read_manifest(report.eval_manifest.as_ref().unwrap()));
        assert_eq!(written.num_samples(), 50);

        let seed = split_seed(5, "train");
        for shard in &written.shards {
            let bytes = std::fs::read(dir.path().join("train").join(&shard.url)).unwrap();
            assert_eq!(shard.size, bytes.len() as u64);
            for sample in &shard.samples {
                let member = |ext: &str| {
                    let (o, l) = sample.members[ext];
                    &bytes[o as usize..(o + l) as usize]
                };
                let scene = Scene::sample(seed, sample.key.parse().unwrap());
                assert_eq!(member("txt"), scene.caption().as_bytes());
                assert_eq!(member("cls"), scene.class().to_string().as_bytes());
                let image = image::load_from_memory(member("png")).unwrap().to_rgb8();
                assert_eq!(image, scene.render(32));
            }
        }
    }

    #[test]
    fn output_is_a_pure_function_of_the_seed() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        synth(a.path(), &small(SynthFormat::Jpeg)).unwrap();
        synth(b.path(), &small(SynthFormat::Jpeg)).unwrap();
        for file in
            ["train/shard-000000.tar", "eval/shard-000001.tar", "train/manifest.json", "tokenizer.json", "classes.json"]
        {
            assert_eq!(
                std::fs::read(a.path().join(file)).unwrap(),
                std::fs::read(b.path().join(file)).unwrap(),
                "{file}"
            );
        }
        let (train, eval) = (split_seed(5, "train"), split_seed(5, "eval"));
        let differ = (0..20).filter(|&i| Scene::sample(train, i) != Scene::sample(eval, i)).count();
        assert!(differ >= 18, "eval must not repeat the training scenes");
    }

    #[test]
    fn the_bert_tokenizer_has_bert_special_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer-bert.json");
        write_tokenizer_style(&path, TokenizerStyle::Bert).unwrap();
        let hf = crate::data::tokenizer::HfTokenizer::from_file(&path).unwrap();
        let special = hf.bert_special_tokens().unwrap();
        assert_eq!((special.pad, special.unk, special.cls, special.sep, special.mask), (0, 1, 2, 3, 4));
        assert_eq!((hf.token_to_id("[DEC]"), hf.token_to_id("[ENC]")), (Some(5), Some(6)));
        let encoded = hf.encode_words("a red circle", 8);
        assert_eq!(encoded.ids[0], 2);
        assert_eq!(encoded.ids[encoded.eot_index], 3);
        assert_eq!(encoded.attention_mask, [1, 1, 1, 1, 1, 0, 0, 0]);
    }

    #[test]
    fn the_tokenizer_loads_in_hugging_face_tokenizers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let vocab_size = write_tokenizer(&path).unwrap();
        let tokenizer = tokenizers::Tokenizer::from_file(&path).unwrap();
        assert_eq!(tokenizer.get_vocab_size(true), vocab_size);
        for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tokenizer.token_to_id(token), Some(id as u32));
        }
        let encoding = tokenizer.encode("Left: a RED circle", true).unwrap();
        let ids = encoding.get_ids();
        assert_eq!(encoding.get_tokens(), ["[SOT]", "left", ":", "a", "red", "circle", "[EOT]"]);
        assert!(!ids.contains(&3), "no unknown words: {ids:?}");
        let unknown = tokenizer.encode("a zebra", true).unwrap();
        assert_eq!(unknown.get_ids()[2], 3);
        for class in 0..num_classes() {
            for prompt in CLASS_TEMPLATES {
                let text = prompt.replace("{}", &class_name(class));
                assert!(!tokenizer.encode(text.as_str(), true).unwrap().get_ids().contains(&3), "{text}");
            }
        }
    }

    #[test]
    fn captions_and_classes_describe_the_scene() {
        assert_eq!(caption(0, 0, 0, Placement::Left, false), "a red circle on the left");
        assert_eq!(caption(1, 1, 2, Placement::Top, false), "a small blue square at the top");
        assert_eq!(caption(2, 0, 0, Placement::Left, true), "left: a red circle");
        assert_eq!(caption(0, 5, 6, Placement::Center, true), "an orange ring in the center");
        assert_eq!(class_name(class_index(2, 3)), "yellow triangle");
        let classes: serde_json::Value = {
            let dir = tempfile::tempdir().unwrap();
            write_classes(&dir.path().join("c.json")).unwrap();
            serde_json::from_slice(&std::fs::read(dir.path().join("c.json")).unwrap()).unwrap()
        };
        assert_eq!(classes["classes"][0], "red circle");
        assert_eq!(classes["classes"].as_array().unwrap().len(), 48);
    }

    #[test]
    fn shapes_are_drawn_where_the_caption_says() {
        for index in 0..40 {
            let scene = Scene::sample(9, index);
            let image = scene.render(32);
            let colour = COLOURS[scene.colour].1;
            let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
            for (x, y, p) in image.enumerate_pixels() {
                let d: i32 = (0..3).map(|c| (p[c] as i32 - colour[c] as i32).abs()).sum();
                if d < 20 {
                    (sx, sy, n) = (sx + x as f64, sy + y as f64, n + 1.0);
                }
            }
            assert!(n > 4.0, "sample {index}: shape not visible");
            let (cx, cy) = (sx / n / 32.0, sy / n / 32.0);
            let ok = match scene.placement {
                Placement::Left => cx < 0.4,
                Placement::Right => cx > 0.6,
                Placement::Top => cy < 0.4,
                Placement::Bottom => cy > 0.6,
                Placement::Center => (0.4..0.6).contains(&cx) && (0.4..0.6).contains(&cy),
            };
            assert!(ok, "sample {index}: {:?} drawn at ({cx:.2}, {cy:.2})", scene.placement);
        }
    }
}
