//! The per-rank batch pipeline: plan -> range reads -> decode + augment + tokenize -> batches.
//!
//! A background producer thread walks the rank's steps in order. For each step it asks the
//! [`SamplePlan`] for the rank's slice of the global batch, reads each sample's members with one
//! byte-range request through object_store, decodes, augments and tokenizes the samples on a
//! pool of `decode_threads` threads, and puts the finished [`Batch`] into a channel that holds at
//! most `prefetch_batches`. Dropping the [`Loader`] stops the thread.
//!
//! A sample that cannot be read or decoded is marked invalid (zero pixels and tokens), reported
//! through the `on_corrupt` callback and counted; past `max_corrupt_samples` the loader fails.
//! A shard that does not exist at all is an error at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use braid_coordinator::manifest::SampleEntry;
use braid_coordinator::plan::{PlannedSample, SamplePlan};
use bytes::Bytes;
use futures::StreamExt;
use rayon::prelude::*;

use super::augment::{self, Transform, IMAGE_EXTENSIONS};
use super::error::{Error, Result};
use super::store::{self, Location};
use super::tokenizer::TextTokenizer;

/// Range requests in flight at once while reading one batch.
const READ_CONCURRENCY: usize = 64;

/// A sample that could not be read or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptSample {
    /// URL of the shard holding it.
    pub shard: String,
    /// Its WebDataset key.
    pub key: String,
    /// Its global position in the sample order.
    pub position: u64,
    /// What was wrong.
    pub reason: String,
}

/// Receives every corrupt sample as it is found (to log it and tell the coordinator).
pub type CorruptCallback = Arc<dyn Fn(CorruptSample) + Send + Sync>;

/// Everything a [`Loader`] needs.
#[derive(Clone)]
pub struct LoaderOptions {
    /// The global sample order.
    pub plan: SamplePlan,
    /// Path or URL of the manifest the plan was built from; shard URLs resolve against it.
    pub manifest_url: String,
    /// This worker's rank.
    pub rank: usize,
    /// Workers in the current generation.
    pub world_size: usize,
    /// Samples per optimizer step over all workers.
    pub global_batch: usize,
    /// First step to produce.
    pub start_step: u64,
    /// First step not to produce.
    pub end_step: u64,
    /// Side of the square output images.
    pub image_size: usize,
    /// Tokens per caption.
    pub context_length: usize,
    /// Caption tokenizer.
    pub tokenizer: Arc<dyn TextTokenizer>,
    /// Threads decoding and augmenting images.
    pub decode_threads: usize,
    /// Finished batches kept ahead of the consumer.
    pub prefetch_batches: usize,
    /// Training augmentation (random resized crop) when true; centre crop when false.
    pub train: bool,
    /// Lower bound of the random crop's area share (training only).
    pub min_crop_scale: f64,
    /// Seed of the augmentation; a sample's randomness is `SplitMix64::new(seed, position)`.
    pub seed: u64,
    /// Corrupt samples tolerated before the loader fails.
    pub max_corrupt_samples: u64,
    /// Called for every corrupt sample.
    pub on_corrupt: CorruptCallback,
    /// Runtime for the object-store reads; `None` starts a private one.
    pub runtime: Option<tokio::runtime::Handle>,
}

/// One rank's share of one global step.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The global step.
    pub step: u64,
    /// Global positions of the samples in the sample order.
    pub positions: Vec<u64>,
    /// WebDataset keys.
    pub keys: Vec<String>,
    /// Images `[B, 3, H, W]`, CLIP-normalised.
    pub images: Vec<f32>,
    /// Caption tokens `[B, context_length]`.
    pub tokens: Vec<i64>,
    /// Index of the end-of-text token of each caption.
    pub eot_index: Vec<i64>,
    /// The word of each caption token `[B, context_length]` (-1 for special tokens, padding,
    /// and every token when the tokenizer knows no word boundaries).
    pub word_ids: Vec<i64>,
    /// Class index from the `.cls` member, -1 where there is none.
    pub classes: Vec<i64>,
    /// Caption texts.
    pub captions: Vec<String>,
    /// False for a corrupt sample (its image and tokens are zeros).
    pub valid: Vec<bool>,
    /// How long [`Loader::next_batch`] waited for this batch.
    pub data_wait: Duration,
}

impl Batch {
    /// Samples in the batch.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the batch holds no samples.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// The rank's batch stream, produced in the background.
pub struct Loader {
    receiver: Option<Receiver<Result<Batch>>>,
    producer: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    corrupt: Arc<AtomicU64>,
    next_step: u64,
    end_step: u64,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader").field("next_step", &self.next_step).field("end_step", &self.end_step).finish()
    }
}

/// Where the reads run.
enum IoRuntime {
    Owned(tokio::runtime::Runtime),
    Shared(tokio::runtime::Handle),
}

impl IoRuntime {
    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        match self {
            IoRuntime::Owned(runtime) => runtime.block_on(future),
            IoRuntime::Shared(handle) => handle.block_on(future),
        }
    }
}

/// The bytes of one sample's members, or why they could not be read.
struct RawSample {
    planned: PlannedSample,
    key: String,
    members: std::result::Result<Vec<(String, Bytes)>, String>,
}

/// One sample ready to be copied into a batch.
struct Prepared {
    image: Vec<f32>,
    tokens: Vec<i64>,
    eot_index: i64,
    word_ids: Vec<i64>,
    class: i64,
    caption: String,
}

/// The producer thread's state.
struct Producer {
    opts: LoaderOptions,
    shards: Vec<Location>,
    runtime: IoRuntime,
    pool: rayon::ThreadPool,
    corrupt: Arc<AtomicU64>,
}

fn check(opts: &LoaderOptions) -> Result<()> {
    let mut problems = Vec::new();
    if opts.world_size == 0 || opts.rank >= opts.world_size {
        problems.push(format!("rank {} of world_size {}", opts.rank, opts.world_size));
    }
    if opts.global_batch < opts.world_size {
        problems.push(format!("global_batch {} is smaller than world_size {}", opts.global_batch, opts.world_size));
    }
    if opts.start_step > opts.end_step {
        problems.push(format!("start_step {} is after end_step {}", opts.start_step, opts.end_step));
    }
    for (name, value) in [
        ("image_size", opts.image_size),
        ("context_length", opts.context_length),
        ("decode_threads", opts.decode_threads),
        ("prefetch_batches", opts.prefetch_batches),
    ] {
        if value == 0 {
            problems.push(format!("{name} = 0: need at least 1"));
        }
    }
    if opts.train && !(opts.min_crop_scale > 0.0 && opts.min_crop_scale <= 1.0) {
        problems.push(format!("min_crop_scale = {}: must be in (0, 1]", opts.min_crop_scale));
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(Error::Options(problems.join("; "))),
    }
}

impl Loader {
    /// Checks the options, resolves every shard's location and starts the producer thread.
    pub fn new(opts: LoaderOptions) -> Result<Loader> {
        check(&opts)?;
        let manifest_location = store::open(&opts.manifest_url)?;
        let shards = store::shard_locations(&manifest_location, opts.plan.manifest())?;
        let runtime = match &opts.runtime {
            Some(handle) => IoRuntime::Shared(handle.clone()),
            None => IoRuntime::Owned(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::Stopped(format!("cannot start the I/O runtime: {e}")))?,
            ),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.decode_threads)
            .thread_name(|i| format!("braid-decode-{i}"))
            .build()
            .map_err(|e| Error::Stopped(format!("cannot start {} decode threads: {e}", opts.decode_threads)))?;
        let (sender, receiver) = std::sync::mpsc::sync_channel(opts.prefetch_batches);
        let stop = Arc::new(AtomicBool::new(false));
        let corrupt = Arc::new(AtomicU64::new(0));
        let (next_step, end_step) = (opts.start_step, opts.end_step);
        let producer = Producer { opts, shards, runtime, pool, corrupt: corrupt.clone() };
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name("braid-loader".into())
            .spawn(move || producer.run(sender, thread_stop))
            .map_err(|e| Error::Stopped(format!("cannot start the loader thread: {e}")))?;
        Ok(Loader { receiver: Some(receiver), producer: Some(handle), stop, corrupt, next_step, end_step })
    }

    /// The next batch, in step order; waits for the producer if it is behind.
    pub fn next_batch(&mut self) -> Result<Batch> {
        if self.next_step >= self.end_step {
            return Err(Error::Finished { end_step: self.end_step });
        }
        let receiver = self.receiver.as_ref().expect("the receiver lives as long as the loader");
        let started = Instant::now();
        let mut batch = receiver
            .recv()
            .map_err(|_| Error::Stopped(format!("no batch for step {}: the producer ended early", self.next_step)))??;
        batch.data_wait = started.elapsed();
        self.next_step += 1;
        Ok(batch)
    }

    /// The step the next call to [`Loader::next_batch`] returns.
    pub fn next_step(&self) -> u64 {
        self.next_step
    }

    /// Corrupt samples found so far.
    pub fn corrupt_samples(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }

    /// The counter behind [`Loader::corrupt_samples`], for an owner on another thread.
    pub fn corrupt_counter(&self) -> Arc<AtomicU64> {
        self.corrupt.clone()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.receiver.take());
        if let Some(handle) = self.producer.take() {
            let _ = handle.join();
        }
    }
}

impl Producer {
    fn run(mut self, sender: SyncSender<Result<Batch>>, stop: Arc<AtomicBool>) {
        for step in self.opts.start_step..self.opts.end_step {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let batch = self.produce(step);
            let failed = batch.is_err();
            if sender.send(batch).is_err() || failed {
                return;
            }
        }
    }

    /// Reads, decodes and assembles the rank's batch of `step`.
    fn produce(&mut self, step: u64) -> Result<Batch> {
        let (global_batch, rank, world_size) = (self.opts.global_batch, self.opts.rank, self.opts.world_size);
        let planned = self.opts.plan.rank_batch(step, global_batch, rank, world_size);
        let raw = self.read(planned)?;
        let prepared: Vec<std::result::Result<Prepared, String>> =
            self.pool.install(|| raw.par_iter().map(|sample| self.prepare(sample)).collect());
        self.assemble(step, raw, prepared)
    }

    /// Reads every sample's members, `READ_CONCURRENCY` requests at a time, in plan order.
    fn read(&self, planned: Vec<PlannedSample>) -> Result<Vec<RawSample>> {
        let manifest = self.opts.plan.manifest().clone();
        let reads = planned.into_iter().map(|p| {
            let entry = manifest.sample(p.sample).clone();
            let location = &self.shards[p.sample.shard as usize];
            async move {
                let members = read_sample(location, &entry).await;
                (p, entry.key, members)
            }
        });
        let results: Vec<_> = self.runtime.block_on(futures::stream::iter(reads).buffered(READ_CONCURRENCY).collect());
        results
            .into_iter()
            .map(|(planned, key, members)| match members {
                Err(Error::NotFound { url }) => Err(Error::NotFound { url }),
                Err(other) => Ok(RawSample { planned, key, members: Err(other.to_string()) }),
                Ok(members) => Ok(RawSample { planned, key, members: Ok(members) }),
            })
            .collect()
    }

    /// Decodes, augments and tokenizes one sample.
    fn prepare(&self, raw: &RawSample) -> std::result::Result<Prepared, String> {
        let members = raw.members.as_ref().map_err(Clone::clone)?;
        let member = |ext: &str| members.iter().find(|(e, _)| e == ext).map(|(_, bytes)| bytes);
        let (ext, bytes) = IMAGE_EXTENSIONS
            .iter()
            .find_map(|ext| member(ext).map(|b| (*ext, b)))
            .ok_or_else(|| format!("no image member ({})", IMAGE_EXTENSIONS.join(", ")))?;
        let image = augment::decode(bytes, ext)?;
        let transform = match self.opts.train {
            true => Transform::Train { min_crop_scale: self.opts.min_crop_scale },
            false => Transform::Eval,
        };
        let pixels = augment::apply(&image, transform, self.opts.image_size, self.opts.seed, raw.planned.position);
        let caption = member("txt").map(|b| String::from_utf8_lossy(b).trim().to_string()).unwrap_or_default();
        let class = match member("cls") {
            None => -1,
            Some(b) => {
                let text = String::from_utf8_lossy(b);
                text.trim().parse::<i64>().map_err(|_| format!("class member {:?} is not an integer", text.trim()))?
            }
        };
        let (encoded, word_ids) = self.opts.tokenizer.encode_with_words(&caption, self.opts.context_length);
        let mut tokens = encoded.ids;
        tokens.resize(self.opts.context_length, 0);
        let mut word_ids = word_ids.unwrap_or_default();
        word_ids.resize(self.opts.context_length, -1);
        let eot_index = encoded.eot_index.min(self.opts.context_length - 1) as i64;
        Ok(Prepared { image: pixels, tokens, eot_index, word_ids, class, caption })
    }

    /// Copies prepared samples into a batch, reporting and counting the corrupt ones.
    fn assemble(
        &self,
        step: u64,
        raw: Vec<RawSample>,
        prepared: Vec<std::result::Result<Prepared, String>>,
    ) -> Result<Batch> {
        let (size, context) = (self.opts.image_size, self.opts.context_length);
        let pixels = 3 * size * size;
        let n = raw.len();
        let mut batch = Batch {
            step,
            positions: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            images: vec![0.0; n * pixels],
            tokens: vec![0; n * context],
            eot_index: vec![0; n],
            word_ids: vec![-1; n * context],
            classes: vec![-1; n],
            captions: vec![String::new(); n],
            valid: vec![false; n],
            data_wait: Duration::ZERO,
        };
        for (i, (raw, prepared)) in raw.into_iter().zip(prepared).enumerate() {
            batch.positions.push(raw.planned.position);
            match prepared {
                Ok(p) => {
                    batch.images[i * pixels..(i + 1) * pixels].copy_from_slice(&p.image);
                    batch.tokens[i * context..(i + 1) * context].copy_from_slice(&p.tokens);
                    batch.word_ids[i * context..(i + 1) * context].copy_from_slice(&p.word_ids);
                    (batch.eot_index[i], batch.classes[i], batch.captions[i]) = (p.eot_index, p.class, p.caption);
                    batch.valid[i] = true;
                }
                Err(reason) => self.report(&raw, reason)?,
            }
            batch.keys.push(raw.key);
        }
        Ok(batch)
    }

    /// Reports a corrupt sample; an error once there are more than the options allow.
    fn report(&self, raw: &RawSample, reason: String) -> Result<()> {
        let shard = self.shards[raw.planned.sample.shard as usize].url().to_string();
        let count = self.corrupt.fetch_add(1, Ordering::Relaxed) + 1;
        let sample =
            CorruptSample { shard: shard.clone(), key: raw.key.clone(), position: raw.planned.position, reason };
        (self.opts.on_corrupt)(sample.clone());
        if count > self.opts.max_corrupt_samples {
            return Err(Error::TooManyCorrupt {
                count,
                limit: self.opts.max_corrupt_samples,
                shard,
                key: sample.key,
                reason: sample.reason,
            });
        }
        Ok(())
    }
}

/// Reads all members of one sample with a single range request over their span.
async fn read_sample(location: &Location, entry: &SampleEntry) -> Result<Vec<(String, Bytes)>> {
    let start = entry.members.values().map(|&(offset, _)| offset).min();
    let end = entry.members.values().map(|&(offset, len)| offset + len).max();
    let (Some(start), Some(end)) = (start, end) else {
        return Err(Error::Tar {
            path: location.url().to_string(),
            reason: format!("sample {:?} has no members", entry.key),
        });
    };
    let span = location.read_range(start..end).await?;
    Ok(entry
        .members
        .iter()
        .map(|(ext, &(offset, len))| {
            (ext.clone(), span.slice((offset - start) as usize..(offset - start + len) as usize))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synth::{synth, SynthOptions};
    use crate::data::tokenizer::Encoded;
    use braid_coordinator::manifest::DatasetManifest;
    use std::collections::{BTreeMap, HashSet};
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// Splits on spaces and maps each word to a small id; enough to check the plumbing.
    struct WordHash;

    impl TextTokenizer for WordHash {
        fn encode(&self, text: &str, context_length: usize) -> Encoded {
            let mut ids = vec![1];
            ids.extend(text.split_whitespace().map(|w| 4 + w.bytes().map(i64::from).sum::<i64>() % 100));
            ids.truncate(context_length - 1);
            let eot_index = ids.len();
            ids.push(2);
            ids.resize(context_length, 0);
            Encoded { ids, eot_index }
        }

        fn vocab_size(&self) -> usize {
            104
        }

        fn name(&self) -> String {
            "word-hash".into()
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        manifest_path: PathBuf,
        manifest: Arc<DatasetManifest>,
    }

    fn dataset(train_samples: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let opts = SynthOptions {
            train_samples,
            eval_samples: 0,
            samples_per_shard: 10,
            image_size: 24,
            ..Default::default()
        };
        let report = synth(dir.path(), &opts).unwrap();
        let manifest = Arc::new(store::load_manifest(report.train_manifest.to_str().unwrap()).unwrap());
        Fixture { manifest_path: report.train_manifest, manifest, dir }
    }

    fn options(f: &Fixture, rank: usize, world_size: usize, steps: std::ops::Range<u64>, train: bool) -> LoaderOptions {
        LoaderOptions {
            plan: SamplePlan::new(f.manifest.clone(), 3, 2),
            manifest_url: f.manifest_path.to_str().unwrap().to_string(),
            rank,
            world_size,
            global_batch: 8,
            start_step: steps.start,
            end_step: steps.end,
            image_size: 16,
            context_length: 12,
            tokenizer: Arc::new(WordHash),
            decode_threads: 2,
            prefetch_batches: 2,
            train,
            min_crop_scale: 0.4,
            seed: 17,
            max_corrupt_samples: 0,
            on_corrupt: Arc::new(|_| {}),
            runtime: None,
        }
    }

    fn all_batches(opts: LoaderOptions) -> Result<Vec<Batch>> {
        let steps = opts.end_step - opts.start_step;
        let mut loader = Loader::new(opts)?;
        let batches = (0..steps).map(|_| loader.next_batch()).collect::<Result<Vec<_>>>()?;
        assert!(matches!(loader.next_batch(), Err(Error::Finished { .. })));
        Ok(batches)
    }

    /// Position -> (key, image, tokens) over all ranks of a world size.
    fn by_position(
        f: &Fixture,
        world_size: usize,
        steps: std::ops::Range<u64>,
    ) -> BTreeMap<u64, (String, Vec<f32>, Vec<i64>)> {
        let mut seen = BTreeMap::new();
        for rank in 0..world_size {
            for batch in all_batches(options(f, rank, world_size, steps.clone(), true)).unwrap() {
                assert_eq!(batch.len(), 8 / world_size);
                assert!(batch.valid.iter().all(|&v| v));
                for i in 0..batch.len() {
                    let image = batch.images[i * 768..(i + 1) * 768].to_vec();
                    let tokens = batch.tokens[i * 12..(i + 1) * 12].to_vec();
                    let old = seen.insert(batch.positions[i], (batch.keys[i].clone(), image, tokens));
                    assert!(old.is_none(), "position {} produced twice", batch.positions[i]);
                }
            }
        }
        seen
    }

    #[test]
    fn every_sample_once_per_epoch_and_the_same_pixels_for_any_world_size() {
        let f = dataset(48);
        let one = by_position(&f, 1, 0..6);
        assert_eq!(one.keys().copied().collect::<Vec<_>>(), (0..48).collect::<Vec<u64>>());
        let keys: HashSet<&String> = one.values().map(|(k, _, _)| k).collect();
        assert_eq!(keys.len(), 48, "an epoch holds every sample exactly once");
        for world_size in [2, 4] {
            assert!(by_position(&f, world_size, 0..6) == one, "world size {world_size} differs from 1");
        }
        let later = by_position(&f, 2, 3..6);
        assert!(later.iter().all(|(p, v)| one[p] == *v), "a resumed range matches");
    }

    #[test]
    fn batches_carry_captions_classes_and_normalised_pixels() {
        let f = dataset(20);
        let mut opts = options(&f, 0, 1, 0..1, false);
        let tokenizer_path = f.dir.path().join("tokenizer.json");
        opts.tokenizer = crate::data::tokenizer::load_tokenizer(tokenizer_path.to_str().unwrap()).unwrap();
        let batch = all_batches(opts).unwrap().remove(0);
        for i in 0..batch.len() {
            assert!(!batch.captions[i].is_empty());
            assert!((0..48).contains(&batch.classes[i]));
            let row = &batch.tokens[i * 12..(i + 1) * 12];
            let eot = batch.eot_index[i] as usize;
            assert_eq!((row[0], row[eot]), (1, 2), "[SOT] ... [EOT] in {row:?}");
            assert!(row[..eot].iter().all(|&t| t != 0 && t != 3), "no padding or unknown words: {row:?}");
            assert!(row[eot + 1..].iter().all(|&t| t == 0), "padded with [PAD]: {row:?}");
            // The synthetic vocabulary has one token per word: words 0, 1, ... between the
            // special tokens, -1 on them and on the padding.
            let words = &batch.word_ids[i * 12..(i + 1) * 12];
            let expected: Vec<i64> = (0..12).map(|j| if j == 0 || j >= eot { -1 } else { j as i64 - 1 }).collect();
            assert_eq!(words, expected.as_slice(), "word ids of {row:?}");
        }
        let lo = (0.0 - augment::CLIP_MEAN[2]) / augment::CLIP_STD[2] - 1e-4;
        let hi = (1.0 - augment::CLIP_MEAN[0]) / augment::CLIP_STD[0] + 1e-4;
        assert!(batch.images.iter().all(|v| (lo..=hi).contains(v)));
    }

    #[test]
    fn the_eval_transform_is_deterministic_and_independent_of_the_seed() {
        let f = dataset(20);
        let a = all_batches(options(&f, 0, 1, 0..2, false)).unwrap();
        let mut other = options(&f, 0, 1, 0..2, false);
        other.seed = 99;
        other.decode_threads = 1;
        let b = all_batches(other).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((&x.images, &x.tokens, &x.keys), (&y.images, &y.tokens, &y.keys));
        }
    }

    /// Flips every byte of the PNG members of the first `count` samples of `shard` after the signature.
    fn corrupt_pngs(f: &Fixture, shard: usize, count: usize) -> Vec<String> {
        let entry = &f.manifest.shards[shard];
        let path = f.manifest_path.parent().unwrap().join(&entry.url);
        let mut bytes = std::fs::read(&path).unwrap();
        for sample in &entry.samples[..count] {
            let (offset, len) = sample.members["png"];
            bytes[(offset + 8) as usize..(offset + len) as usize].iter_mut().for_each(|b| *b ^= 0xff);
        }
        std::fs::write(&path, bytes).unwrap();
        entry.samples[..count].iter().map(|s| s.key.clone()).collect()
    }

    fn corrupt_run(f: &Fixture, limit: u64) -> (Result<Vec<Batch>>, Vec<CorruptSample>) {
        let reports = Arc::new(Mutex::new(Vec::new()));
        let sink = reports.clone();
        let mut opts = options(f, 0, 1, 0..5, true);
        opts.max_corrupt_samples = limit;
        opts.on_corrupt = Arc::new(move |c| sink.lock().unwrap().push(c));
        let result = all_batches(opts);
        let reports = reports.lock().unwrap().clone();
        (result, reports)
    }

    #[test]
    fn corrupt_samples_are_marked_reported_and_fatal_past_the_limit() {
        let f = dataset(40);
        let bad: HashSet<String> = corrupt_pngs(&f, 1, 3).into_iter().collect();
        let (batches, reports) = corrupt_run(&f, 3);
        let batches = batches.unwrap();
        let invalid: HashSet<String> = batches
            .iter()
            .flat_map(|b| b.keys.iter().zip(&b.valid).filter(|(_, v)| !**v).map(|(k, _)| k.clone()))
            .collect();
        assert_eq!(invalid, bad);
        assert_eq!(reports.len(), 3);
        assert!(
            reports.iter().all(|r| r.shard.ends_with("train/shard-000001.tar") && bad.contains(&r.key)),
            "{reports:?}"
        );
        assert!(reports[0].reason.contains("png"), "{}", reports[0].reason);
        for b in &batches {
            for (i, _) in b.valid.iter().enumerate().filter(|(_, v)| !**v) {
                assert!(b.images[i * 768..(i + 1) * 768].iter().all(|&v| v == 0.0));
                assert!(b.tokens[i * 12..(i + 1) * 12].iter().all(|&t| t == 0));
            }
        }

        let (result, _) = corrupt_run(&f, 2);
        let err = result.unwrap_err();
        assert!(matches!(err, Error::TooManyCorrupt { count: 3, limit: 2, .. }), "{err}");
        assert!(err.to_string().contains("shard-000001.tar"), "{err}");
    }

    #[test]
    fn a_truncated_shard_gives_corrupt_samples() {
        let f = dataset(20);
        let path = f.manifest_path.parent().unwrap().join(&f.manifest.shards[0].url);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let reports = Arc::new(AtomicU64::new(0));
        let counter = reports.clone();
        let mut opts = options(&f, 0, 1, 0..3, true);
        opts.global_batch = 20;
        opts.end_step = 1;
        opts.max_corrupt_samples = 100;
        opts.on_corrupt = Arc::new(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        let batch = all_batches(opts).unwrap().remove(0);
        let invalid = batch.valid.iter().filter(|v| !**v).count() as u64;
        assert!((4..=10).contains(&invalid), "{invalid} invalid");
        assert_eq!(reports.load(Ordering::Relaxed), invalid);
    }

    #[test]
    fn missing_manifest_or_shard_is_an_error_naming_it() {
        let f = dataset(20);
        std::fs::remove_file(f.manifest_path.parent().unwrap().join("shard-000001.tar")).unwrap();
        let err = all_batches(options(&f, 0, 1, 0..3, true)).unwrap_err();
        assert!(matches!(&err, Error::NotFound { url } if url.ends_with("shard-000001.tar")), "{err}");

        let missing: &Path = Path::new("/nonexistent/braid/manifest.json");
        let err = store::load_manifest(missing.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/braid/manifest.json"), "{err}");
    }

    #[test]
    fn dropping_a_loader_stops_its_thread() {
        let f = dataset(20);
        let mut loader = Loader::new(options(&f, 0, 1, 0..1000, true)).unwrap();
        loader.next_batch().unwrap();
        drop(loader);
        let err = Loader::new(options(&f, 2, 2, 0..1, true)).unwrap_err();
        assert!(err.to_string().contains("rank 2 of world_size 2"), "{err}");
    }
}
