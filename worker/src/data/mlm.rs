//! Masked-language-model inputs, shared by ALBEF, BLIP, ViLT, VLMo and BEiT-3.
//!
//! BERT's recipe: each maskable token is chosen for prediction with probability 0.15; a chosen
//! token becomes `[MASK]` (80%), a random token (10%) or stays as it is (10%), and only chosen
//! tokens carry a label. With whole-word masking (ViLT, BEiT-3) the choice is made once per word
//! and applies to all of the word's WordPiece pieces; each piece then draws its own
//! `[MASK]`/random/unchanged replacement, as in BERT's `create_pretraining_data.py` and
//! transformers' whole-word collator.
//!
//! Every random number is a hash of (seed, the sample's global position, the token index, what
//! it decides), not a draw from a running generator: a sample is masked the same way whichever
//! rank reads it, at any world size, at any index within its batch and whatever else is in the
//! batch, which is braid's data-order guarantee carried over to the masking.

use serde::{Deserialize, Serialize};
use braid_coordinator::plan::{splitmix64_mix, SPLITMIX64_GAMMA};

use std::collections::HashMap;

use super::tokenizer::{HfTokenizer, TextTokenizer, TokenizerError};

/// The label of a token that is not predicted (PyTorch cross-entropy's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// How tokens are chosen and replaced. The default is BERT's and ALBEF's: 15%, 80/10/10,
/// token by token, no guaranteed prediction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskingConfig {
    /// Probability that a maskable token (or word, with `whole_word`) is predicted. Default 0.15.
    pub probability: f64,
    /// Of predicted tokens, the fraction replaced by `[MASK]`. Default 0.8.
    pub mask_fraction: f64,
    /// Of predicted tokens, the fraction replaced by a random non-special token. Default 0.1.
    /// The rest (default 0.1) keep their id and are still predicted.
    pub random_fraction: f64,
    /// Choose whole words (all pieces of a word together) instead of single tokens. Default
    /// false; ViLT and BEiT-3 turn it on.
    pub whole_word: bool,
    /// When no token of a sample with maskable tokens was chosen, choose one token (or word)
    /// uniformly among them, so that every such sample has a prediction target. Default false:
    /// ALBEF's `torch.bernoulli` masking can leave a short caption with none (probability
    /// `0.85^n` for n maskable tokens), and its loss then just has fewer terms. Turning it on
    /// raises the predicted rate of short samples above `probability`.
    pub at_least_one: bool,
}

impl Default for MaskingConfig {
    fn default() -> Self {
        Self { probability: 0.15, mask_fraction: 0.8, random_fraction: 0.1, whole_word: false, at_least_one: false }
    }
}

impl MaskingConfig {
    /// BERT's whole-word masking (ViLT, BEiT-3): the defaults with `whole_word` on.
    pub fn whole_word() -> Self {
        Self { whole_word: true, ..Self::default() }
    }

    /// Checks every field and reports all problems at once.
    pub fn validate(&self) -> Result<(), MaskingError> {
        let mut problems = Vec::new();
        let fractions = [
            ("probability", self.probability),
            ("mask_fraction", self.mask_fraction),
            ("random_fraction", self.random_fraction),
        ];
        for (name, value) in fractions {
            if !(0.0..=1.0).contains(&value) {
                problems.push(format!("{name} = {value} is not in [0, 1]"));
            }
        }
        let replaced = self.mask_fraction + self.random_fraction;
        if replaced > 1.0 {
            problems.push(format!(
                "mask_fraction + random_fraction = {} + {} = {replaced} exceeds 1",
                self.mask_fraction, self.random_fraction
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(MaskingError::Config { problems })
        }
    }
}

/// Why masking could not be set up or applied.
#[derive(Debug, thiserror::Error)]
pub enum MaskingError {
    /// A [`MaskingConfig`] with out-of-range values.
    #[error("invalid masking config: {}", problems.join("; "))]
    Config {
        /// Every problem found.
        problems: Vec<String>,
    },
    /// A vocabulary that masking cannot use.
    #[error("invalid masking vocabulary: {reason}")]
    Vocab {
        /// What was wrong.
        reason: String,
    },
    /// Inputs whose lengths do not fit together.
    #[error("{what} has {got} values, expected {expected}")]
    Shape {
        /// Which input.
        what: &'static str,
        /// The length it should have.
        expected: usize,
        /// The length it has.
        got: usize,
    },
    /// Whole-word masking was asked for without word ids.
    #[error("whole-word masking needs the word id of every token; none were given")]
    MissingWordIds,
    /// The tokenizer lacks the tokens masking needs.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// What masking needs to know about the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskingVocab {
    mask_id: i64,
    vocab_size: usize,
    /// Special ids inside the vocabulary, ascending, without repeats.
    special_ids: Vec<i64>,
}

impl MaskingVocab {
    /// `vocab_size` ids (the embedding table's size, added tokens included), of which
    /// `special_ids` are never chosen and never drawn as random replacements; `mask_id` counts
    /// as special whether listed or not. Padding is never chosen either (it is recognised by the
    /// attention mask), but listing the pad id keeps it out of the random draws.
    pub fn new(
        mask_id: i64,
        vocab_size: usize,
        special_ids: impl IntoIterator<Item = i64>,
    ) -> Result<Self, MaskingError> {
        if mask_id < 0 || mask_id as u64 >= vocab_size as u64 {
            return Err(MaskingError::Vocab {
                reason: format!("mask id {mask_id} is outside the vocabulary [0, {vocab_size})"),
            });
        }
        let mut special: Vec<i64> = special_ids.into_iter().chain([mask_id]).collect();
        if let Some(&bad) = special.iter().find(|&&id| id < 0 || id as u64 >= vocab_size as u64) {
            return Err(MaskingError::Vocab {
                reason: format!("special id {bad} is outside the vocabulary [0, {vocab_size})"),
            });
        }
        special.sort_unstable();
        special.dedup();
        if special.len() >= vocab_size {
            return Err(MaskingError::Vocab {
                reason: format!("all {vocab_size} ids are special; there is nothing to draw random replacements from"),
            });
        }
        Ok(Self { mask_id, vocab_size, special_ids: special })
    }

    /// A tokenizer's `[MASK]`, its size (added tokens included) and its special tokens
    /// ([`HfTokenizer::special_token_ids`]: for BERT [PAD], [UNK], [CLS], [SEP], [MASK], the set
    /// transformers' MLM collator leaves alone).
    pub fn from_tokenizer(tokenizer: &HfTokenizer) -> Result<Self, MaskingError> {
        let bert = tokenizer.bert_special_tokens()?;
        let vocab_size = tokenizer.vocab_size();
        let special = tokenizer.special_token_ids().into_iter().chain([bert.pad]).map(i64::from);
        Self::new(i64::from(bert.mask), vocab_size, special)
    }

    /// The id that replaces most predicted tokens.
    pub fn mask_id(&self) -> i64 {
        self.mask_id
    }

    /// Number of ids.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The special ids, ascending.
    pub fn special_ids(&self) -> &[i64] {
        &self.special_ids
    }

    /// Whether `id` is special (never chosen, never drawn).
    pub fn is_special(&self, id: i64) -> bool {
        self.special_ids.binary_search(&id).is_ok()
    }

    /// Number of ids a random replacement is drawn from (every non-special id).
    pub fn random_candidates(&self) -> usize {
        self.vocab_size - self.special_ids.len()
    }

    /// The `k`-th non-special id (`k < random_candidates()`).
    fn nth_candidate(&self, k: u64) -> i64 {
        let mut id = k as i64;
        for &special in &self.special_ids {
            if special <= id {
                id += 1;
            } else {
                break;
            }
        }
        id
    }
}

/// Masked ids and labels of a batch, `[B, L]` row-major like the inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedTokens {
    /// The ids with `[MASK]`, random and unchanged replacements applied.
    pub input_ids: Vec<i64>,
    /// The original id where a token is predicted, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i64>,
}

/// A batch to mask: `[B, L]` rows, row-major.
#[derive(Debug, Clone, Copy)]
pub struct MaskingInputs<'a> {
    /// Token ids, `B * L` values.
    pub token_ids: &'a [i64],
    /// 1 (or any non-zero) for tokens, 0 for padding, `B * L` values.
    pub attention_mask: &'a [i64],
    /// The word of each token, -1 for none (special tokens, padding), `B * L` values; needed
    /// for whole-word masking, ignored otherwise. Tokens of one word share an id within their
    /// row ([`super::tokenizer::HfTokenizer::encode_words`] gives them).
    pub word_ids: Option<&'a [i64]>,
    /// The global position of each sample in braid's sample order, `B` values.
    pub positions: &'a [u64],
}

/// Applies a [`MaskingConfig`] to batches, deterministically from a seed.
#[derive(Debug, Clone)]
pub struct Masker {
    config: MaskingConfig,
    vocab: MaskingVocab,
    seed: u64,
}

/// What each hashed random number decides, so the decisions are independent.
#[derive(Clone, Copy)]
enum Draw {
    /// Whether a token (or word) is predicted.
    Choose = 1,
    /// `[MASK]`, random or unchanged.
    Replace = 2,
    /// Which random id.
    RandomId = 3,
    /// Which token (or word) `at_least_one` chooses.
    Fallback = 4,
}

impl Masker {
    /// A masker for `config` and `vocab`; `seed` is the job's data seed.
    pub fn new(config: MaskingConfig, vocab: MaskingVocab, seed: u64) -> Result<Self, MaskingError> {
        config.validate()?;
        Ok(Self { config, vocab, seed })
    }

    /// The configuration.
    pub fn config(&self) -> &MaskingConfig {
        &self.config
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &MaskingVocab {
        &self.vocab
    }

    /// Masks every row of `inputs`; row `b` is masked exactly as [`Self::mask_sample`] masks it
    /// alone at `positions[b]`.
    pub fn mask_batch(&self, inputs: MaskingInputs<'_>) -> Result<MaskedTokens, MaskingError> {
        let rows = inputs.positions.len();
        let total = inputs.token_ids.len();
        if rows == 0 {
            if total != 0 {
                return Err(MaskingError::Shape { what: "token_ids", expected: 0, got: total });
            }
            return Ok(MaskedTokens { input_ids: Vec::new(), labels: Vec::new() });
        }
        if !total.is_multiple_of(rows) {
            return Err(MaskingError::Shape { what: "token_ids", expected: rows * (total / rows), got: total });
        }
        let context_length = total / rows;
        check_len("attention_mask", inputs.attention_mask.len(), total)?;
        let word_ids = self.word_ids(inputs.word_ids, total)?;
        let mut out = MaskedTokens { input_ids: Vec::with_capacity(total), labels: Vec::with_capacity(total) };
        for (row, &position) in inputs.positions.iter().enumerate() {
            let span = row * context_length..(row + 1) * context_length;
            let (ids, labels) = self.mask_row(
                position,
                &inputs.token_ids[span.clone()],
                &inputs.attention_mask[span.clone()],
                word_ids.map(|w| &w[span]),
            );
            out.input_ids.extend(ids);
            out.labels.extend(labels);
        }
        Ok(out)
    }

    /// Masks one sample at global `position`; `attention_mask` and `word_ids` (when given) are
    /// as long as `token_ids`.
    pub fn mask_sample(
        &self,
        position: u64,
        token_ids: &[i64],
        attention_mask: &[i64],
        word_ids: Option<&[i64]>,
    ) -> Result<MaskedTokens, MaskingError> {
        check_len("attention_mask", attention_mask.len(), token_ids.len())?;
        let word_ids = self.word_ids(word_ids, token_ids.len())?;
        let (input_ids, labels) = self.mask_row(position, token_ids, attention_mask, word_ids);
        Ok(MaskedTokens { input_ids, labels })
    }

    /// The word ids whole-word masking uses, checked; `None` for token-level masking.
    fn word_ids<'a>(&self, word_ids: Option<&'a [i64]>, expected: usize) -> Result<Option<&'a [i64]>, MaskingError> {
        if !self.config.whole_word {
            return Ok(None);
        }
        let word_ids = word_ids.ok_or(MaskingError::MissingWordIds)?;
        check_len("word_ids", word_ids.len(), expected)?;
        Ok(Some(word_ids))
    }

    fn mask_row(
        &self,
        position: u64,
        ids: &[i64],
        attention: &[i64],
        word_ids: Option<&[i64]>,
    ) -> (Vec<i64>, Vec<i64>) {
        // Units are what gets chosen: one maskable token, or all maskable tokens of one word.
        // A unit is keyed by its first token's index, so token-level and whole-word masking
        // choose the same way where every word is one token.
        let maskable = |i: usize| attention[i] != 0 && !self.vocab.is_special(ids[i]);
        // A maskable token without a word (-1) is a unit of its own.
        let mut unit_of_token: Vec<Option<usize>> = vec![None; ids.len()];
        let mut unit_keys: Vec<usize> = Vec::new();
        let mut unit_of_word: HashMap<i64, usize> = HashMap::new();
        for i in (0..ids.len()).filter(|&i| maskable(i)) {
            let word = word_ids.map_or(-1, |w| w[i]);
            let next = unit_keys.len();
            let unit = if word >= 0 { *unit_of_word.entry(word).or_insert(next) } else { next };
            if unit == next {
                unit_keys.push(i);
            }
            unit_of_token[i] = Some(unit);
        }

        let mut chosen: Vec<bool> =
            unit_keys.iter().map(|&key| self.uniform(position, key, Draw::Choose) < self.config.probability).collect();
        if self.config.at_least_one && !unit_keys.is_empty() && !chosen.contains(&true) {
            let pick = self.below(position, 0, Draw::Fallback, unit_keys.len() as u64) as usize;
            chosen[pick] = true;
        }

        let mut input_ids = ids.to_vec();
        let mut labels = vec![IGNORE_INDEX; ids.len()];
        for (i, unit) in unit_of_token.iter().enumerate() {
            let Some(unit) = *unit else { continue };
            if !chosen[unit] {
                continue;
            }
            labels[i] = ids[i];
            let replace = self.uniform(position, i, Draw::Replace);
            if replace < self.config.mask_fraction {
                input_ids[i] = self.vocab.mask_id;
            } else if replace < self.config.mask_fraction + self.config.random_fraction {
                let k = self.below(position, i, Draw::RandomId, self.vocab.random_candidates() as u64);
                input_ids[i] = self.vocab.nth_candidate(k);
            }
        }
        (input_ids, labels)
    }

    /// 64 random bits for (seed, position, token index, what they decide).
    fn bits(&self, position: u64, index: usize, draw: Draw) -> u64 {
        // Chained SplitMix64 finalisers over the key; the constant keeps these streams apart
        // from the augmentation's `SplitMix64::new(seed, position)`.
        const DOMAIN: u64 = 0x6D6C_6D5F_6D61_736B; // "mlm_mask"
        let mut h = splitmix_finalize(self.seed ^ DOMAIN);
        h = splitmix_finalize(h ^ position.wrapping_mul(SPLITMIX64_GAMMA));
        h = splitmix_finalize(h ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        splitmix_finalize(h ^ (draw as u64).wrapping_mul(0xF135_7AEA_2E62_A9C5))
    }

    /// Uniform in `[0, 1)` with 53 bits.
    fn uniform(&self, position: u64, index: usize, draw: Draw) -> f64 {
        (self.bits(position, index, draw) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)` by multiply-shift (bias below `n / 2^64`, nil for any vocabulary).
    fn below(&self, position: u64, index: usize, draw: Draw, n: u64) -> u64 {
        ((u128::from(self.bits(position, index, draw)) * u128::from(n)) >> 64) as u64
    }
}

/// SplitMix64's output function: a bijection on u64 that mixes every input bit into every
/// output bit.
/// SplitMix64's step and output function on `x`, as one hash.
fn splitmix_finalize(x: u64) -> u64 {
    splitmix64_mix(x.wrapping_add(SPLITMIX64_GAMMA))
}

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<(), MaskingError> {
    if got == expected {
        Ok(())
    } else {
        Err(MaskingError::Shape { what, expected, got })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nth_candidate_skips_special_ids() {
        let vocab = MaskingVocab::new(4, 10, [0, 2, 3, 9]).unwrap();
        let candidates: Vec<i64> = (0..vocab.random_candidates() as u64).map(|k| vocab.nth_candidate(k)).collect();
        assert_eq!(candidates, [1, 5, 6, 7, 8]);
    }

    #[test]
    fn config_reports_every_problem() {
        let config = MaskingConfig { probability: 1.5, mask_fraction: 0.9, random_fraction: 0.2, ..Default::default() };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("probability = 1.5"), "{err}");
        assert!(err.contains("exceeds 1"), "{err}");
        let nan = MaskingConfig { mask_fraction: f64::NAN, ..Default::default() };
        assert!(nan.validate().is_err());
    }
}
