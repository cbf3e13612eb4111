//! Held-out evaluation of a dual-encoder model (CLIP, and the contrastive features of ALBEF):
//! image-text retrieval recall@K, zero-shot classification with prompt templates and, for
//! models with an image-text matching head, ITM accuracy, each printed next to its chance level.
//!
//! Retrieval counts a hit when a retrieved item carries the same caption as the query's pair
//! (synthetic and web data repeat captions, so the paired index alone would undercount).
//!
//! ITM accuracy scores each held-out pair and two negative captions from its evaluation batch
//! that cannot describe the image (another caption text, and another class when the samples have
//! classes: a caption of the same class may describe the same scene in other words): a random
//! one, and the one the contrastive features rank closest to the image (hard). Each accuracy is
//! balanced over the positives and one kind of negative: a decision is right when the ITM head's
//! match probability is above 0.5 for the true caption and below it for the negative; chance is
//! 50% for both.
//!
//! Captions (BLIP): the decoder's greedy caption of each held-out image (`[DEC]` first, up to the
//! job's context length) against the image's true caption, both as the token ids between the
//! first token (`[DEC]`, `[CLS]`) and `[SEP]`, as `braid infer` scores them. Token accuracy is
//! position-wise: the true caption's token `j` counts as right when the generated caption has the
//! same token at `j`; right tokens over all true tokens of the held-out set. Exact match counts
//! captions equal to the true one. Their chance levels are image-blind guesses from the held-out captions
//! themselves: for token accuracy, each position's most frequent token; for exact match, always
//! the most frequent caption. Word F1 ignores order: per caption, the F1 of the multiset of
//! generated tokens against the true ones (`[SEP]` left out), averaged over captions, with the
//! most frequent caption as its chance level. It credits a caption that says the right things in
//! other words (synthetic captions pick one of six templates at random, so no model can know the
//! word order a held-out caption uses, and position-wise accuracy stays near its chance level).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::tokenizer::TextTokenizer;
use crate::trainer::attention_mask;
use crate::models::albef::Albef;
use crate::models::blip::{generate_captions, Blip, CaptionOptions};
use crate::models::clip::Clip;

/// What held-out evaluation needs from a model: L2-normalised image and caption features in one
/// space, and the match logits of its ITM head where it has one.
pub trait EvalModel {
    /// Features `[B, E]` of images `[B, 3, H, W]`.
    fn image_features(&self, images: &Tensor) -> Tensor;
    /// Features `[B, E]` of captions `[B, L]` whose last token is at `eot_index`.
    fn text_features(&self, tokens: &Tensor, eot_index: &Tensor) -> Tensor;
    /// ITM logits `[B, 2]` (column 1: match) of the pairs `(images[i], tokens[i])`, or `None`
    /// for a model without an ITM head.
    fn match_logits(&self, _images: &Tensor, _tokens: &Tensor, _eot_index: &Tensor) -> Option<Tensor> {
        None
    }
    /// Device of the parameters.
    fn device(&self) -> Device;
}

impl EvalModel for Clip {
    fn image_features(&self, images: &Tensor) -> Tensor {
        self.encode_image(images)
    }

    fn text_features(&self, tokens: &Tensor, eot_index: &Tensor) -> Tensor {
        self.encode_text(tokens, eot_index)
    }

    fn device(&self) -> Device {
        self.logit_scale.device()
    }
}

impl EvalModel for Albef {
    fn image_features(&self, images: &Tensor) -> Tensor {
        self.image_feature(&self.encode_image(images))
    }

    fn text_features(&self, tokens: &Tensor, eot_index: &Tensor) -> Tensor {
        let mask = attention_mask(tokens, eot_index);
        self.text_feature(&self.encode_text(tokens, &mask))
    }

    fn match_logits(&self, images: &Tensor, tokens: &Tensor, eot_index: &Tensor) -> Option<Tensor> {
        let mask = attention_mask(tokens, eot_index);
        let fused = self.fuse(&self.encode_text(tokens, &mask), &mask, &self.encode_image(images));
        Some(self.itm_logits(&fused))
    }

    fn device(&self) -> Device {
        self.heads.temp.device()
    }
}

impl EvalModel for Blip {
    fn image_features(&self, images: &Tensor) -> Tensor {
        self.image_feature(&self.encode_image(images))
    }

    fn text_features(&self, tokens: &Tensor, eot_index: &Tensor) -> Tensor {
        let mask = attention_mask(tokens, eot_index);
        self.text_feature(&self.encode_text(tokens, &mask))
    }

    /// Through the image-grounded encoder, `[ENC]` in place of the caption's `[CLS]`.
    fn match_logits(&self, images: &Tensor, tokens: &Tensor, eot_index: &Tensor) -> Option<Tensor> {
        let mask = attention_mask(tokens, eot_index);
        let ids = crate::trainer::blip::with_first_token(tokens, self.config().enc_token_id);
        Some(self.itm_logits(&self.encode_multimodal(&ids, &mask, &self.encode_image(images))))
    }

    fn device(&self) -> Device {
        self.heads.temp.device()
    }
}

/// Recall at 1, 5 and 10 of one retrieval direction, with the chance level of recall@1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Recall {
    /// Recall@1.
    pub r1: f64,
    /// Recall@5.
    pub r5: f64,
    /// Recall@10.
    pub r10: f64,
    /// Expected recall@1 of a random ranking.
    pub chance_r1: f64,
}

/// Everything `braid eval` reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Held-out pairs evaluated.
    pub samples: usize,
    /// Image-to-text retrieval.
    pub image_to_text: Recall,
    /// Text-to-image retrieval.
    pub text_to_image: Recall,
    /// Zero-shot top-1 accuracy, when class names are known.
    pub zero_shot_top1: Option<f64>,
    /// Chance level of zero-shot accuracy (1 / classes).
    pub zero_shot_chance: Option<f64>,
    /// ITM accuracy on held-out pairs and random negatives (chance 0.5), for models with an ITM
    /// head.
    pub itm_accuracy: Option<f64>,
    /// ITM accuracy on held-out pairs and their hardest in-batch negatives (chance 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub itm_accuracy_hard: Option<f64>,
    /// Greedy captions of the held-out images against their true captions, for models with a
    /// caption decoder (BLIP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captions: Option<CaptionScores>,
}

/// Greedy captions scored against the true captions (module docs: token accuracy, exact match,
/// word F1 and their chance levels).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CaptionScores {
    /// Captions scored.
    pub samples: usize,
    /// Position-wise token accuracy over the true captions' tokens between the first token and
    /// `[SEP]`.
    pub token_accuracy: f64,
    /// Fraction of generated captions equal to the true caption.
    pub exact_match: f64,
    /// Token accuracy of an image-blind caption holding at each position the most frequent
    /// token of the held-out captions there.
    pub chance_token_accuracy: f64,
    /// Exact-match rate of always emitting the most frequent held-out caption.
    pub chance_exact_match: f64,
    /// Mean over captions of the order-free F1 of generated against true tokens (`[SEP]` left out).
    pub word_f1: f64,
    /// Word F1 of always emitting the most frequent held-out caption.
    pub chance_word_f1: f64,
    /// A few generated captions with their true captions (text), when the tokenizer can decode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<CaptionExample>,
}

/// One generated caption next to the true one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CaptionExample {
    /// The decoder's greedy caption.
    pub generated: String,
    /// The held-out caption.
    pub truth: String,
}

/// Generated captions kept as text examples in [`CaptionScores::examples`].
const CAPTION_EXAMPLES: usize = 3;

/// Scores `generated` captions against `truth` (the token ids between the first token and
/// `[SEP]` = `sep`, which word F1 also leaves out if present), pairwise; see the module docs.
/// `examples` is left empty.
pub fn caption_scores(generated: &[Vec<i64>], truth: &[Vec<i64>], sep: i64) -> CaptionScores {
    assert_eq!(generated.len(), truth.len(), "one generated caption per true caption");
    let tokens: usize = truth.iter().map(Vec::len).sum();
    let right: usize = generated.iter().zip(truth).map(|(g, t)| t.iter().enumerate().filter(|&(j, id)| g.get(j) == Some(id)).count()).sum();
    let exact = generated.iter().zip(truth).filter(|(g, t)| g == t).count();
    // Image-blind guesses: each position's most frequent true token; the most frequent caption.
    let longest = truth.iter().map(Vec::len).max().unwrap_or(0);
    let majority_right: usize = (0..longest)
        .map(|j| {
            let mut counts: HashMap<i64, usize> = HashMap::new();
            for t in truth.iter().filter_map(|t| t.get(j)) {
                *counts.entry(*t).or_default() += 1;
            }
            counts.values().copied().max().unwrap_or(0)
        })
        .sum();
    let mut caption_counts: HashMap<&[i64], usize> = HashMap::new();
    for t in truth {
        *caption_counts.entry(t.as_slice()).or_default() += 1;
    }
    let (most_frequent_caption, most_frequent) =
        caption_counts.iter().max_by_key(|(caption, count)| (**count, std::cmp::Reverse(**caption))).map_or((&[][..], 0), |(c, n)| (*c, *n));
    let per = |count: usize, of: usize| if of == 0 { 0.0 } else { count as f64 / of as f64 };
    let mean = |sum: f64| if truth.is_empty() { 0.0 } else { sum / truth.len() as f64 };
    CaptionScores {
        samples: truth.len(),
        token_accuracy: per(right, tokens),
        exact_match: per(exact, truth.len()),
        chance_token_accuracy: per(majority_right, tokens),
        chance_exact_match: per(most_frequent, truth.len()),
        word_f1: mean(generated.iter().zip(truth).map(|(g, t)| word_f1(g, t, sep)).sum()),
        chance_word_f1: mean(truth.iter().map(|t| word_f1(most_frequent_caption, t, sep)).sum()),
        examples: Vec::new(),
    }
}

/// The F1 of the multiset of tokens of `generated` against those of `truth`, `sep` left out of
/// both (1 when both are empty).
fn word_f1(generated: &[i64], truth: &[i64], sep: i64) -> f64 {
    let bag = |ids: &[i64]| {
        let mut counts: HashMap<i64, usize> = HashMap::new();
        for &id in ids.iter().filter(|&&id| id != sep) {
            *counts.entry(id).or_default() += 1;
        }
        counts
    };
    let (g, t) = (bag(generated), bag(truth));
    let (g_len, t_len) = (g.values().sum::<usize>(), t.values().sum::<usize>());
    if g_len == 0 && t_len == 0 {
        return 1.0;
    }
    let overlap: usize = g.iter().map(|(id, n)| (*n).min(t.get(id).copied().unwrap_or(0))).sum();
    if overlap == 0 {
        return 0.0;
    }
    let (precision, recall) = (overlap as f64 / g_len as f64, overlap as f64 / t_len as f64);
    2.0 * precision * recall / (precision + recall)
}

/// Class names and prompt templates (`classes.json`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ClassPrompts {
    /// Class names, indexed by the samples' `cls`.
    pub classes: Vec<String>,
    /// Templates with `{}` where the class name goes.
    pub templates: Vec<String>,
}

/// Recall@K of queries against candidates. `similarity` is [queries, candidates];
/// `query_group[i]` and `candidate_group[j]` name what each item shows, and a candidate is
/// relevant to a query when the groups are equal.
pub fn recall_at_k(similarity: &Tensor, query_group: &[usize], candidate_group: &[usize]) -> Recall {
    let (q, c) = similarity.size2().expect("similarity is 2-D");
    assert_eq!(q as usize, query_group.len());
    assert_eq!(c as usize, candidate_group.len());
    let k = 10.min(c);
    let top = similarity.topk(k, 1, true, true).1;
    let top: Vec<i64> = Vec::try_from(top.flatten(0, -1)).expect("int64 indices");
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for g in candidate_group {
        *counts.entry(*g).or_default() += 1;
    }
    let (mut r1, mut r5, mut r10, mut chance) = (0.0, 0.0, 0.0, 0.0);
    for (i, group) in query_group.iter().enumerate() {
        let ranked = &top[i * k as usize..(i + 1) * k as usize];
        let first_hit = ranked.iter().position(|&j| candidate_group[j as usize] == *group);
        if let Some(rank) = first_hit {
            r1 += f64::from(rank < 1);
            r5 += f64::from(rank < 5);
            r10 += f64::from(rank < 10);
        }
        chance += *counts.get(group).unwrap_or(&0) as f64 / c as f64;
    }
    let n = q as f64;
    Recall { r1: r1 / n, r5: r5 / n, r10: r10 / n, chance_r1: chance / n }
}

/// Groups items by caption text: equal captions get equal group ids.
pub fn caption_groups(captions: &[String]) -> Vec<usize> {
    let mut ids: HashMap<&str, usize> = HashMap::new();
    captions
        .iter()
        .map(|c| {
            let next = ids.len();
            *ids.entry(c.as_str()).or_insert(next)
        })
        .collect()
}

/// One evaluation batch as [`EmbeddedSet::push_itm`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct MatchBatch<'a> {
    /// Images `[B, 3, H, W]`.
    pub images: &'a Tensor,
    /// Caption tokens `[B, L]`.
    pub tokens: &'a Tensor,
    /// Last token of each caption `[B]`.
    pub eot_index: &'a Tensor,
    /// Image features `[B, E]`.
    pub image: &'a Tensor,
    /// Caption features `[B, E]`.
    pub text: &'a Tensor,
    /// Caption texts.
    pub captions: &'a [String],
    /// Class of each sample, -1 where unknown.
    pub classes: &'a [i64],
    /// Which samples count.
    pub valid: &'a [bool],
}

/// ITM decisions on held-out pairs and their negatives.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct ItmCounts {
    /// Pairs scored (each with one random and one hard negative).
    pairs: usize,
    /// Pairs the head called matched.
    positives_right: usize,
    /// Random negatives the head called not matched.
    random_right: usize,
    /// Hardest negatives the head called not matched.
    hard_right: usize,
}

impl ItmCounts {
    /// Balanced accuracy on the pairs and their random negatives.
    fn accuracy(&self) -> Option<f64> {
        (self.pairs > 0).then(|| (self.positives_right + self.random_right) as f64 / (2 * self.pairs) as f64)
    }

    /// Balanced accuracy on the pairs and their hardest negatives.
    fn accuracy_hard(&self) -> Option<f64> {
        (self.pairs > 0).then(|| (self.positives_right + self.hard_right) as f64 / (2 * self.pairs) as f64)
    }
}

/// Embeddings of the held-out set, accumulated batch by batch.
#[derive(Debug, Default)]
pub struct EmbeddedSet {
    image: Vec<Tensor>,
    text: Vec<Tensor>,
    captions: Vec<String>,
    classes: Vec<i64>,
    /// ITM decisions, for models with an ITM head.
    itm: Option<ItmCounts>,
    /// Generated and true captions (token ids after the first token), for caption models.
    generated: Vec<Vec<i64>>,
    truth: Vec<Vec<i64>>,
    /// The first few captions as text: generated (ids) and true.
    examples: Vec<(Vec<i64>, String)>,
    /// `[SEP]`, which ends the captions.
    sep: i64,
}

impl EmbeddedSet {
    /// Adds a batch's valid samples.
    pub fn push(&mut self, image: Tensor, text: Tensor, captions: &[String], classes: &[i64], valid: &[bool]) {
        let keep: Vec<i64> = valid.iter().enumerate().filter(|(_, v)| **v).map(|(i, _)| i as i64).collect();
        let index = Tensor::from_slice(&keep).to_device(image.device());
        self.image.push(image.index_select(0, &index).to_kind(Kind::Float).to_device(Device::Cpu));
        self.text.push(text.index_select(0, &index).to_kind(Kind::Float).to_device(Device::Cpu));
        for &i in &keep {
            self.captions.push(captions[i as usize].clone());
            self.classes.push(classes[i as usize]);
        }
    }

    /// Samples gathered so far.
    pub fn len(&self) -> usize {
        self.captions.len()
    }

    /// True when nothing was gathered.
    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// Adds the ITM decisions of one batch: each valid pair, a random negative and the hardest
    /// negative caption of the batch (module docs).
    pub fn push_itm(&mut self, model: &dyn EvalModel, batch: MatchBatch<'_>) {
        let MatchBatch { images, tokens, eot_index, image, text, captions, classes, valid } = batch;
        let keep: Vec<usize> = (0..valid.len()).filter(|&i| valid[i]).collect();
        let groups = caption_groups(captions);
        // A negative must not describe the image: another caption, and another class when both
        // samples have one (a caption of the same class may describe the same scene in other words).
        let unrelated = |i: usize, j: usize| groups[j] != groups[i] && (classes[i] < 0 || classes[j] < 0 || classes[i] != classes[j]);
        let similarity = image.matmul(&text.transpose(0, 1)).to_kind(Kind::Double).to_device(Device::Cpu);
        let (mut rows, mut random, mut hardest) = (Vec::new(), Vec::new(), Vec::new());
        for &i in &keep {
            let candidates: Vec<usize> = keep.iter().copied().filter(|&j| unrelated(i, j)).collect();
            if candidates.is_empty() {
                continue;
            }
            let row = Vec::<f64>::try_from(similarity.get(i as i64)).expect("fp64 similarities");
            let hard = candidates.iter().copied().max_by(|&a, &b| row[a].total_cmp(&row[b])).expect("a candidate");
            let pick = braid_coordinator::plan::splitmix64_mix(i as u64 ^ 0x17E5_u64.wrapping_mul(self.len() as u64 + 1)) as usize % candidates.len();
            rows.push(i as i64);
            random.push(candidates[pick] as i64);
            hardest.push(hard as i64);
        }
        if rows.is_empty() {
            return;
        }
        let device = images.device();
        let index = |ids: &[i64]| Tensor::from_slice(ids).to_device(device);
        let (rows_t, random_t, hardest_t) = (index(&rows), index(&random), index(&hardest));
        let pair_images = images.index_select(0, &rows_t).repeat([3, 1, 1, 1]);
        let pick = |t: &Tensor| Tensor::cat(&[t.index_select(0, &rows_t), t.index_select(0, &random_t), t.index_select(0, &hardest_t)], 0);
        let Some(logits) = tch::no_grad(|| model.match_logits(&pair_images, &pick(tokens), &pick(eot_index))) else {
            return;
        };
        let matched = Vec::<bool>::try_from(logits.argmax(1, false).eq(1).to_device(Device::Cpu)).expect("bool decisions");
        let n = rows.len();
        let positives = matched[..n].iter().filter(|&&m| m).count();
        let random_right = matched[n..2 * n].iter().filter(|&&m| !m).count();
        let hard_right = matched[2 * n..].iter().filter(|&&m| !m).count();
        let itm = self.itm.get_or_insert_with(ItmCounts::default);
        itm.pairs += n;
        itm.positives_right += positives;
        itm.random_right += random_right;
        itm.hard_right += hard_right;
    }

    /// Adds a batch's greedy captions (`generated`, ids after `[DEC]`, one per sample) and the
    /// true captions of its valid samples (`tokens` `[B, L]`, `[CLS]` first and `[SEP]` = `sep` at
    /// `eot_index`); both are scored without their special tokens, as `braid infer` scores them.
    pub fn push_captions(&mut self, generated: Vec<Vec<i64>>, tokens: &[i64], eot_index: &[i64], captions: &[String], valid: &[bool], sep: i64) {
        self.sep = sep;
        let context = tokens.len() / valid.len().max(1);
        for (i, g) in generated.into_iter().enumerate().filter(|(i, _)| valid[*i]) {
            let row = &tokens[i * context..(i + 1) * context];
            let truth = crate::infer::true_caption_body(row, eot_index[i] as usize).to_vec();
            let body = crate::infer::caption_body(&g, sep).to_vec();
            if self.examples.len() < CAPTION_EXAMPLES {
                self.examples.push((body.clone(), captions[i].clone()));
            }
            self.generated.push(body);
            self.truth.push(truth);
        }
    }

    /// The first few generated captions, decoded by `decode`, next to their true captions.
    pub fn caption_examples(&self, decode: impl Fn(&[i64]) -> Option<String>) -> Vec<CaptionExample> {
        self.examples.iter().filter_map(|(ids, truth)| Some(CaptionExample { generated: decode(ids)?, truth: truth.clone() })).collect()
    }

    /// Retrieval both ways, zero-shot accuracy when `prompts` are given, ITM accuracy when ITM
    /// decisions were added, and caption scores when captions were added.
    /// `context` is the caption length the prompts are tokenized to.
    pub fn report(&self, model: &dyn EvalModel, tokenizer: &Arc<dyn TextTokenizer>, prompts: Option<&ClassPrompts>, context: usize) -> EvalReport {
        let image = Tensor::cat(&self.image, 0);
        let text = Tensor::cat(&self.text, 0);
        let groups = caption_groups(&self.captions);
        let similarity = image.matmul(&text.transpose(0, 1));
        let mut report = EvalReport {
            samples: self.len(),
            image_to_text: recall_at_k(&similarity, &groups, &groups),
            text_to_image: recall_at_k(&similarity.transpose(0, 1), &groups, &groups),
            itm_accuracy: self.itm.and_then(|c| c.accuracy()),
            itm_accuracy_hard: self.itm.and_then(|c| c.accuracy_hard()),
            ..Default::default()
        };
        if !self.truth.is_empty() {
            report.captions = Some(caption_scores(&self.generated, &self.truth, self.sep));
        }
        if let Some(prompts) = prompts {
            let labelled: Vec<usize> = (0..self.len()).filter(|&i| self.classes[i] >= 0).collect();
            if !labelled.is_empty() && !prompts.classes.is_empty() {
                let weights = class_embeddings(model, tokenizer, prompts, context);
                let index = Tensor::from_slice(&labelled.iter().map(|&i| i as i64).collect::<Vec<_>>());
                let predicted = image.index_select(0, &index).matmul(&weights.transpose(0, 1)).argmax(1, false);
                let truth = Tensor::from_slice(&labelled.iter().map(|&i| self.classes[i]).collect::<Vec<_>>());
                let correct = predicted.eq_tensor(&truth).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
                report.zero_shot_top1 = Some(correct);
                report.zero_shot_chance = Some(1.0 / prompts.classes.len() as f64);
            }
        }
        report
    }
}

/// One normalised text embedding per class: the mean over templates, renormalised.
pub fn class_embeddings(model: &dyn EvalModel, tokenizer: &Arc<dyn TextTokenizer>, prompts: &ClassPrompts, context: usize) -> Tensor {
    let device = model.device();
    let rows: Vec<Tensor> = prompts
        .classes
        .iter()
        .map(|name| {
            let encoded: Vec<_> = prompts.templates.iter().map(|t| tokenizer.encode(&t.replace("{}", name), context)).collect();
            let ids: Vec<i64> = encoded.iter().flat_map(|e| e.ids.iter().copied()).collect();
            let eot: Vec<i64> = encoded.iter().map(|e| e.eot_index as i64).collect();
            let tokens = Tensor::from_slice(&ids).view([encoded.len() as i64, context as i64]).to_device(device);
            let eot = Tensor::from_slice(&eot).to_device(device);
            let features = tch::no_grad(|| model.text_features(&tokens, &eot));
            let mean = features.mean_dim([0i64].as_slice(), false, features.kind());
            crate::models::clip::normalize(&mean.unsqueeze(0)).squeeze_dim(0)
        })
        .collect();
    Tensor::stack(&rows, 0).to_kind(Kind::Float).to_device(Device::Cpu)
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "held-out pairs: {}", self.samples)?;
        for (name, r) in [("image->text", &self.image_to_text), ("text->image", &self.text_to_image)] {
            writeln!(
                f,
                "{name}: R@1 {:.1}%  R@5 {:.1}%  R@10 {:.1}%  (chance R@1 {:.2}%, {:.1}x chance)",
                100.0 * r.r1,
                100.0 * r.r5,
                100.0 * r.r10,
                100.0 * r.chance_r1,
                r.r1 / r.chance_r1.max(1e-12)
            )?;
        }
        if let (Some(acc), Some(chance)) = (self.zero_shot_top1, self.zero_shot_chance) {
            writeln!(f, "zero-shot top-1: {:.1}% (chance {:.1}%)", 100.0 * acc, 100.0 * chance)?;
        }
        if let (Some(acc), Some(hard)) = (self.itm_accuracy, self.itm_accuracy_hard) {
            writeln!(
                f,
                "ITM accuracy: {:.1}% against random negatives, {:.1}% against the hardest in-batch negatives (chance 50.0%)",
                100.0 * acc,
                100.0 * hard
            )?;
        }
        if let Some(c) = &self.captions {
            writeln!(
                f,
                "captions (greedy, {} images): word F1 {:.1}% (chance {:.1}%), token accuracy {:.1}% (chance {:.1}%), exact match {:.1}% (chance {:.1}%)",
                c.samples,
                100.0 * c.word_f1,
                100.0 * c.chance_word_f1,
                100.0 * c.token_accuracy,
                100.0 * c.chance_token_accuracy,
                100.0 * c.exact_match,
                100.0 * c.chance_exact_match
            )?;
            writeln!(f, "  chance: the most frequent held-out caption; for token accuracy each position's most frequent held-out token")?;
            for e in &c.examples {
                writeln!(f, "  {:?} for {:?}", e.generated, e.truth)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_counts_the_first_relevant_candidate() {
        // Query 0 (group 0) ranks candidate 2 (group 0) first; query 1 (group 2) ranks its only
        // relevant candidate, 1, second.
        let sim = Tensor::from_slice(&[0.1f32, 0.2, 0.9, 0.0, 0.9, 0.8, 0.7, 0.1]).view([2, 4]);
        let r = recall_at_k(&sim, &[0, 2], &[1, 2, 0, 1]);
        assert_eq!(r.r1, 0.5);
        assert_eq!(r.r5, 1.0);
        assert!((r.chance_r1 - 0.25).abs() < 1e-12);
    }

    #[test]
    fn caption_scores_match_position_by_position() {
        // Truth: [5 6 3], [5 7 3], [5 6 3]; generated: exact, one token wrong and too long, too short.
        let truth = vec![vec![5, 6, 3], vec![5, 7, 3], vec![5, 6, 3]];
        let generated = vec![vec![5, 6, 3], vec![5, 8, 9, 3], vec![5, 6]];
        let s = caption_scores(&generated, &truth, 3);
        assert_eq!(s.samples, 3);
        assert!((s.token_accuracy - 6.0 / 9.0).abs() < 1e-12, "{s:?}");
        assert!((s.exact_match - 1.0 / 3.0).abs() < 1e-12);
        // Majority per position: 5 (3 of 3), 6 (2 of 3), 3 (3 of 3); most frequent caption: 2 of 3.
        assert!((s.chance_token_accuracy - 8.0 / 9.0).abs() < 1e-12);
        assert!((s.chance_exact_match - 2.0 / 3.0).abs() < 1e-12);
        // Word F1 without [SEP]: 1; {5, 8, 9} vs {5, 7}: p 1/3, r 1/2, F1 0.4; {5, 6}: 1.
        assert!((s.word_f1 - (1.0 + 0.4 + 1.0) / 3.0).abs() < 1e-12, "{s:?}");
        // Always [5 6 3]: 1, {5, 6} vs {5, 7}: F1 0.5, 1.
        assert!((s.chance_word_f1 - (1.0 + 0.5 + 1.0) / 3.0).abs() < 1e-12, "{s:?}");
        // Order does not matter to word F1.
        assert_eq!(caption_scores(&[vec![6, 5, 3]], &[vec![5, 6, 3]], 3).word_f1, 1.0);
    }

    #[test]
    fn equal_captions_share_a_group() {
        let caps: Vec<String> = ["a", "b", "a", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(caption_groups(&caps), vec![0, 1, 0, 2]);
    }
}

/// Errors of an evaluation run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The job has no held-out data.
    #[error("no held-out data: set [data] eval in the job or pass --data")]
    NoData,
    /// The job has no checkpoint location and none was given.
    #[error("no checkpoint: set [checkpoint] url in the job or pass --checkpoint")]
    NoCheckpoint,
    /// Nothing was committed at the checkpoint location.
    #[error("no committed checkpoint under {0}")]
    NothingCommitted(String),
    /// Data could not be read.
    #[error(transparent)]
    Data(#[from] crate::data::Error),
    /// The tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] crate::data::tokenizer::TokenizerError),
    /// The checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The model could not be built or loaded.
    #[error(transparent)]
    Train(#[from] crate::trainer::TrainError),
    /// `classes.json` could not be read.
    #[error("class prompts {path}: {reason}")]
    Classes {
        /// Where they were looked for.
        path: String,
        /// Why they could not be used.
        reason: String,
    },
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Checkpoint root or manifest (default: the job's `[checkpoint] url`, its `latest`).
    pub checkpoint: Option<String>,
    /// Held-out manifest (default: the job's `[data] eval`).
    pub data: Option<String>,
    /// Samples per forward batch.
    pub batch: usize,
    /// Device.
    pub device: Device,
}

/// Loads a committed checkpoint into a fresh model; returns the trainer and the step.
pub fn load_checkpoint(
    config: &braid_coordinator::config::JobConfig,
    tokenizer: &dyn TextTokenizer,
    checkpoint: Option<&str>,
    device: Device,
) -> Result<(crate::trainer::Trainer, u64), EvalError> {
    let url = checkpoint.or(config.checkpoint.url.as_deref()).ok_or(EvalError::NoCheckpoint)?;
    let (root, manifest_ref) = match url.strip_suffix("/manifest.json") {
        Some(step_dir) => {
            let (root, step) = step_dir.rsplit_once('/').unwrap_or((".", step_dir));
            (root.to_string(), format!("{step}/manifest.json"))
        }
        None => {
            let store = crate::checkpoint::CheckpointStore::open(url)?;
            let latest = store.latest()?.ok_or_else(|| EvalError::NothingCommitted(url.to_string()))?;
            (url.to_string(), latest)
        }
    };
    let store = crate::checkpoint::CheckpointStore::open(&root)?;
    let (manifest, tensors) = store.read_checkpoint(&manifest_ref)?;
    let spec = crate::trainer::model_spec(config, tokenizer)?;
    let mut trainer = crate::trainer::Trainer::new(config, spec, device)?;
    trainer.load_state(tensors, &format!("{root}/{manifest_ref}"))?;
    Ok((trainer, manifest.step))
}

/// Runs the held-out evaluation of a job's checkpoint.
pub fn evaluate(config: &braid_coordinator::config::JobConfig, options: &EvalOptions) -> Result<EvalReport, EvalError> {
    use crate::data::loader::{Loader, LoaderOptions};
    let data_url = options.data.clone().or_else(|| config.data.eval.clone()).ok_or(EvalError::NoData)?;
    let tokenizer = crate::data::tokenizer::load_tokenizer(&config.data.tokenizer)?;
    let (trainer, _) = load_checkpoint(config, tokenizer.as_ref(), options.checkpoint.as_deref(), options.device)?;
    let blip = trainer.blip().map(|family| &family.model);
    let model: &dyn EvalModel = match (trainer.clip(), trainer.albef(), blip) {
        (Some(clip), _, _) => clip,
        (_, Some(albef), _) => &albef.model,
        (_, _, Some(blip)) => blip,
        _ => unreachable!("every family is evaluated"),
    };
    let (image_size, context) = (trainer.spec().image_size(), trainer.spec().context_length());
    let manifest = Arc::new(crate::data::store::load_manifest(&data_url)?);
    let total = manifest.num_samples();
    let batch = options.batch.max(1);
    let steps = total.div_ceil(batch as u64);
    let plan = braid_coordinator::plan::SamplePlan::new(manifest, config.job.seed, config.data.shuffle_window_shards);
    let mut loader = Loader::new(LoaderOptions {
        plan,
        manifest_url: data_url.clone(),
        rank: 0,
        world_size: 1,
        global_batch: batch,
        start_step: 0,
        end_step: steps,
        image_size: image_size as usize,
        context_length: context as usize,
        tokenizer: tokenizer.clone(),
        decode_threads: config.data.decode_threads,
        prefetch_batches: config.data.prefetch_batches,
        train: false,
        min_crop_scale: 1.0,
        seed: config.job.seed,
        max_corrupt_samples: config.data.max_corrupt_samples,
        on_corrupt: Arc::new(|c| tracing::warn!(shard = %c.shard, key = %c.key, "corrupt held-out sample: {}", c.reason)),
        runtime: None,
    })?;
    let mut set = EmbeddedSet::default();
    let kind = trainer.compute_kind();
    for _ in 0..steps {
        let b = loader.next_batch()?;
        // The last batch runs into the next epoch: keep each sample once.
        let valid: Vec<bool> = b.valid.iter().zip(&b.positions).map(|(v, p)| *v && *p < total).collect();
        let n = b.valid.len() as i64;
        let images = Tensor::from_slice(&b.images).view([n, 3, image_size, image_size]).to_kind(kind).to_device(options.device);
        let tokens = Tensor::from_slice(&b.tokens).view([n, context]).to_device(options.device);
        let eot = Tensor::from_slice(&b.eot_index).to_device(options.device);
        let (image, text) = tch::no_grad(|| (model.image_features(&images), model.text_features(&tokens, &eot)));
        set.push_itm(model, MatchBatch { images: &images, tokens: &tokens, eot_index: &eot, image: &image, text: &text, captions: &b.captions, classes: &b.classes, valid: &valid });
        set.push(image, text, &b.captions, &b.classes, &valid);
        if let Some(blip) = blip {
            let options = CaptionOptions { max_length: context as usize, min_length: 0, num_beams: 1 };
            let sep = blip.config().sep_token_id;
            set.push_captions(generate_captions(blip, &images, &options), &b.tokens, &b.eot_index, &b.captions, &valid, sep);
        }
    }
    let prompts = class_prompts(config, &data_url)?;
    let mut report = set.report(model, &tokenizer, prompts.as_ref(), context as usize);
    if let Some(captions) = &mut report.captions {
        // The text of a few captions, for people reading the report (`TextTokenizer` only encodes).
        if let Ok(decoder) = tokenizers::Tokenizer::from_file(&config.data.tokenizer) {
            captions.examples = set.caption_examples(|ids| {
                let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
                decoder.decode(&ids, true).ok()
            });
        }
    }
    Ok(report)
}

/// Reads `[data] classes`, or `classes.json` in the folder above the held-out manifest.
fn class_prompts(config: &braid_coordinator::config::JobConfig, data_url: &str) -> Result<Option<ClassPrompts>, EvalError> {
    let (path, required) = match &config.data.classes {
        Some(p) => (p.clone(), true),
        None => {
            let manifest = std::path::Path::new(data_url.strip_prefix("file://").unwrap_or(data_url));
            match manifest.parent().and_then(|d| d.parent()) {
                Some(root) => (root.join("classes.json").display().to_string(), false),
                None => return Ok(None),
            }
        }
    };
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| EvalError::Classes { path, reason: e.to_string() }),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EvalError::Classes { path, reason: e.to_string() }),
    }
}
