//! Masked-language-model inputs: the BERT WordPiece tokenizer against transformers, and the
//! masking's statistics, invariants and determinism.
//!
//! The WordPiece parity test writes a small uncased vocab.txt, has transformers 5
//! (`BertTokenizerFast(vocab=...)`, the project venv) build and save its tokenizer.json and
//! encode ~200 captions, then loads that file in braid and compares ids, attention masks and
//! word ids. Statistical checks allow 5 binomial standard deviations.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use braid::data::mlm::{Masker, MaskingConfig, MaskingError, MaskingInputs, MaskingVocab, IGNORE_INDEX};
use braid::data::tokenizer::{HfTokenizer, TextTokenizer};
use braid_coordinator::plan::{rank_slice, SplitMix64};


// ---------------------------------------------------------------------------------------------
// WordPiece against transformers
// ---------------------------------------------------------------------------------------------

const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

#[rustfmt::skip]
const VOCAB_WORDS: &[&str] = &[
    "a", "the", "of", "on", "in", "with", "and", "at", "photo", "cat", "dog", "sitting", "table",
    "red", "car", "man", "woman", "riding", "bicycle", "street", "night", "holding", "umbrella",
    "rain", "children", "playing", "park", "flower", "sunset", "over", "mountains", "beach",
    "ocean", "cafe", "naive", "resume", "play", "sit", "walk", "run", "jump", "token", "house",
    "un", "re", "over", "under", "two", "three", "猫", "日", "本", "犬",
];

#[rustfmt::skip]
const VOCAB_PIECES: &[&str] = &[
    "##s", "##ing", "##ed", "##er", "##ly", "##tion", "##ization", "##able", "##ness", "##est",
    "##ful", "##less", "##ment",
];

#[rustfmt::skip]
const TEXT_WORDS: &[&str] = &[
    "a", "the", "of", "on", "in", "with", "and", "at", "photo", "Photo", "PHOTO", "cat", "cats",
    "dog", "dogs", "sitting", "table", "tables", "red", "car", "cars", "man", "woman", "riding",
    "bicycle", "street", "night", "holding", "umbrella", "rain", "children", "playing", "played",
    "park", "flower", "sunset", "over", "mountains", "beach", "ocean", "café", "naïve", "résumé",
    "Café", "RÉSUMÉ", "tokenization", "unplayable", "replayed", "walkers", "jumping", "runner",
    "xylophone", "quizzical", "jazz", "zebra", "2024", "4k", "3d", "e.g.", "i.e.", "isn't",
    "don't", "co-op", "well-known", "hello,", "world!", "(yes)", "\"quoted\"", "a/b", "50%",
    "$10", "#tag", "@user", "straße", "façade", "ñandú", "东京", "猫猫", "日本犬", "こんにちは",
    "Привет", "Ωμέγα", "😀", "🐱🐶", "€5", "°C", "½", "[MASK]", "[CLS]", "[sep]", "[unk]",
    "...", "?!", "--", "a\tb", "x\u{0}y", "line\nbreak", "nb\u{a0}sp", "zero\u{200b}width",
    "soft\u{ad}hyphen", "combining\u{301}", "ﬁsh", "ＬＯＵＤ",
];

/// The test vocabulary: the specials, single characters and their `##` continuations (so most
/// words can be spelled), whole words and suffix pieces.
fn vocab_tokens() -> Vec<String> {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let singles = ('a'..='z').chain('0'..='9').chain("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~°½€".chars());
    let singles: Vec<char> = singles.collect();
    for c in &singles {
        tokens.push(c.to_string());
    }
    for c in ('a'..='z').chain('0'..='9') {
        tokens.push(format!("##{c}"));
    }
    let mut seen: BTreeSet<String> = tokens.iter().cloned().collect();
    for word in VOCAB_WORDS.iter().chain(VOCAB_PIECES) {
        if seen.insert(word.to_string()) {
            tokens.push(word.to_string());
        }
    }
    tokens
}

/// ~200 captions with casing, accents, punctuation, CJK, emoji, control characters, literal
/// special tokens, unknown characters, words too long for WordPiece and captions longer than
/// the context.
fn captions() -> Vec<String> {
    let mut rng = SplitMix64::from_state(2024);
    let mut texts: Vec<String> = vec![
        String::new(),
        " ".into(),
        "a photo of a cat".into(),
        "A Photo Of The CATS sitting on tables.".into(),
        "unplayable replayed tokenization".into(),
        "x".repeat(101),
        format!("a {} b", "y".repeat(100)),
        "a [MASK] cat [SEP] [PAD]".into(),
        "   leading and trailing   ".into(),
        "日本犬 sitting in 東京".into(),
    ];
    while texts.len() < 200 {
        let words = match rng.index(10) {
            0 => rng.between(30, 60),
            _ => rng.between(1, 14),
        };
        let mut text = String::new();
        for w in 0..words {
            if w > 0 {
                text.push_str(match rng.index(12) {
                    0 => "  ",
                    1 => "\t",
                    _ => " ",
                });
            }
            text.push_str(rng.pick(TEXT_WORDS));
        }
        texts.push(text);
    }
    texts
}

const CONTEXT_LENGTHS: [usize; 3] = [8, 16, 40];

const REFERENCE_SCRIPT: &str = r#"
import json, os, sys
from transformers import BertTokenizerFast
folder = sys.argv[1]
with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
    vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
tok.save_pretrained(os.path.join(folder, "hf"))
with open(os.path.join(folder, "captions.json"), encoding="utf-8") as f:
    texts = json.load(f)
rows = []
for context_length in json.loads(sys.argv[2]):
    enc = tok(texts, padding="max_length", truncation=True, max_length=context_length)
    for b in range(len(texts)):
        rows.append({
            "context_length": context_length,
            "input_ids": enc["input_ids"][b],
            "attention_mask": enc["attention_mask"][b],
            "word_ids": [-1 if w is None else w for w in enc.word_ids(b)],
        })
out = {
    "rows": rows,
    "vocab_size": len(tok),
    "special_ids": sorted(tok.all_special_ids),
    "cls": tok.cls_token_id, "sep": tok.sep_token_id, "pad": tok.pad_token_id,
    "mask": tok.mask_token_id, "unk": tok.unk_token_id,
}
with open(os.path.join(folder, "expected.json"), "w", encoding="utf-8") as f:
    json.dump(out, f)
"#;

/// The tokenizer transformers built and what it says about the captions.
struct Reference {
    tokenizer: HfTokenizer,
    vocab: Vec<String>,
    captions: Vec<String>,
    expected: serde_json::Value,
}

/// The project venv's Python (installed by `scripts/setup.sh --test`).
fn venv_python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

/// Builds the reference once per test run.
fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let folder = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mlm_wordpiece_{}", std::process::id()));
        std::fs::create_dir_all(&folder).unwrap();
        let vocab = vocab_tokens();
        std::fs::write(folder.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
        let captions = captions();
        std::fs::write(folder.join("captions.json"), serde_json::to_string(&captions).unwrap()).unwrap();
        let python = venv_python();
        let out = Command::new(&python)
            .args(["-c", REFERENCE_SCRIPT])
            .arg(&folder)
            .arg(serde_json::to_string(&CONTEXT_LENGTHS).unwrap())
            .output()
            .unwrap_or_else(|e| panic!("run {} (scripts/setup.sh --test installs it): {e}", python.display()));
        assert!(out.status.success(), "transformers reference failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let expected = std::fs::read_to_string(folder.join("expected.json")).unwrap();
        let tokenizer = HfTokenizer::from_file(folder.join("hf/tokenizer.json")).unwrap();
        std::fs::remove_dir_all(&folder).unwrap();
        Reference { tokenizer, vocab, captions, expected: serde_json::from_str(&expected).unwrap() }
    })
}

fn ints(value: &serde_json::Value) -> Vec<i64> {
    value.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
}

#[test]
fn wordpiece_matches_transformers() {
    let reference = reference();
    let tokenizer = &reference.tokenizer;
    let expected = &reference.expected;

    assert_eq!(tokenizer.vocab_size() as i64, expected["vocab_size"].as_i64().unwrap());
    assert_eq!(tokenizer.vocab_size(), reference.vocab.len());
    let special: Vec<i64> = tokenizer.special_token_ids().into_iter().map(i64::from).collect();
    assert_eq!(special, ints(&expected["special_ids"]));
    let bert = tokenizer.bert_special_tokens().unwrap();
    for (name, id) in [("cls", bert.cls), ("sep", bert.sep), ("pad", bert.pad), ("mask", bert.mask), ("unk", bert.unk)]
    {
        assert_eq!(i64::from(id), expected[name].as_i64().unwrap(), "{name}");
    }
    assert_eq!(tokenizer.token_to_id("##ing"), reference.vocab.iter().position(|t| t == "##ing").map(|i| i as u32));

    let rows = expected["rows"].as_array().unwrap();
    assert_eq!(rows.len(), reference.captions.len() * CONTEXT_LENGTHS.len());
    let mut cut = 0;
    for (row, text) in rows.iter().zip(reference.captions.iter().cycle()) {
        let context_length = row["context_length"].as_u64().unwrap() as usize;
        let ours = tokenizer.encode_words(text, context_length);
        let ids = ints(&row["input_ids"]);
        assert_eq!(ours.ids, ids, "ids of {text:?} at {context_length}");
        assert_eq!(ours.attention_mask, ints(&row["attention_mask"]), "attention mask of {text:?} at {context_length}");
        assert_eq!(ours.word_ids, ints(&row["word_ids"]), "word ids of {text:?} at {context_length}");
        assert_eq!(tokenizer.encode(text, context_length).ids, ids, "encode() of {text:?} at {context_length}");
        let tokens = ours.attention_mask.iter().filter(|&&m| m == 1).count();
        assert_eq!(ours.eot_index, tokens - 1);
        assert_eq!(ours.ids[ours.eot_index], i64::from(bert.sep));
        cut += usize::from(ids[context_length - 1] == i64::from(bert.sep) && tokens == context_length);
    }
    // The corpus exercises truncation, unknown words and continuation pieces.
    assert!(cut > 50, "only {cut} rows fill their context");
    let unk = i64::from(bert.unk);
    assert!(rows.iter().any(|row| ints(&row["input_ids"]).contains(&unk)));
}

#[test]
fn word_ids_follow_wordpiece_continuations() {
    // transformers' whole-word collator groups a token with the previous one when it starts
    // with "##"; the pre-tokenizer's word ids say the same for every non-special token.
    let reference = reference();
    let tokenizer = &reference.tokenizer;
    let special: Vec<i64> = tokenizer.special_token_ids().into_iter().map(i64::from).collect();
    let mut continuations = 0;
    for text in &reference.captions {
        let encoded = tokenizer.encode_words(text, 64);
        for i in 1..encoded.ids.len() {
            let (id, word) = (encoded.ids[i], encoded.word_ids[i]);
            if special.contains(&id) || encoded.attention_mask[i] == 0 {
                continue;
            }
            assert!(word >= 0, "token {i} of {text:?} has no word");
            let continues = reference.vocab[id as usize].starts_with("##");
            continuations += usize::from(continues);
            let same_word = encoded.word_ids[i - 1] == word;
            assert_eq!(
                continues, same_word,
                "token {i} ({}) of {text:?}: {:?}",
                reference.vocab[id as usize], encoded.word_ids
            );
        }
    }
    assert!(continuations > 200, "only {continuations} continuation pieces");
}

#[test]
fn whole_word_masking_of_real_captions_keeps_pieces_together() {
    let reference = reference();
    let tokenizer = &reference.tokenizer;
    let vocab = MaskingVocab::from_tokenizer(tokenizer).unwrap();
    assert_eq!(vocab.vocab_size(), reference.vocab.len());
    assert_eq!(vocab.special_ids(), [0, 1, 2, 3, 4]);
    let config = MaskingConfig { probability: 0.4, ..MaskingConfig::whole_word() };
    let masker = Masker::new(config, vocab.clone(), 5).unwrap();
    let context_length = 40;
    let (mut ids, mut attention, mut words) = (Vec::new(), Vec::new(), Vec::new());
    for text in &reference.captions {
        let encoded = tokenizer.encode_words(text, context_length);
        ids.extend(encoded.ids);
        attention.extend(encoded.attention_mask);
        words.extend(encoded.word_ids);
    }
    let positions: Vec<u64> = (0..reference.captions.len() as u64).collect();
    let inputs =
        MaskingInputs { token_ids: &ids, attention_mask: &attention, word_ids: Some(&words), positions: &positions };
    let masked = masker.mask_batch(inputs).unwrap();
    let mut multi_piece_words_masked = 0;
    for row in 0..positions.len() {
        let span = row * context_length..(row + 1) * context_length;
        let mut by_word: HashMap<i64, Vec<bool>> = HashMap::new();
        for i in span {
            if attention[i] == 1 && !vocab.is_special(ids[i]) {
                by_word.entry(words[i]).or_default().push(masked.labels[i] != IGNORE_INDEX);
            } else {
                assert_eq!(masked.labels[i], IGNORE_INDEX);
                assert_eq!(masked.input_ids[i], ids[i]);
            }
        }
        for predicted in by_word.values() {
            assert!(predicted.iter().all(|&p| p == predicted[0]), "row {row}: a word is partly masked: {predicted:?}");
            multi_piece_words_masked += usize::from(predicted.len() > 1 && predicted[0]);
        }
    }
    assert!(multi_piece_words_masked > 20, "only {multi_piece_words_masked} multi-piece words masked");
}

// ---------------------------------------------------------------------------------------------
// Masking on synthetic batches
// ---------------------------------------------------------------------------------------------

/// BERT's vocabulary size and special ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103).
const BERT_VOCAB: usize = 30522;
const PAD: i64 = 0;
const UNK: i64 = 100;
const CLS: i64 = 101;
const SEP: i64 = 102;
const MASK: i64 = 103;

fn bert_vocab() -> MaskingVocab {
    MaskingVocab::new(MASK, BERT_VOCAB, [PAD, UNK, CLS, SEP, MASK]).unwrap()
}

/// A synthetic batch: `[CLS]` words `[SEP]` padding, words of 1-4 pieces, an occasional `[UNK]`.
struct Synthetic {
    ids: Vec<i64>,
    attention: Vec<i64>,
    words: Vec<i64>,
    positions: Vec<u64>,
    context_length: usize,
}

impl Synthetic {
    fn new(rows: usize, context_length: usize, max_pieces: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::from_state(seed);
        let mut batch = Synthetic { ids: vec![], attention: vec![], words: vec![], positions: vec![], context_length };
        for row in 0..rows {
            let target = rng.between(3, context_length);
            let (mut ids, mut words) = (vec![CLS], vec![-1]);
            let mut word = 0;
            while ids.len() < target - 1 {
                let pieces = rng.between(1, max_pieces).min(target - 1 - ids.len());
                for _ in 0..pieces {
                    ids.push(if rng.index(50) == 0 { UNK } else { 1000 + rng.index(29000) as i64 });
                    words.push(word);
                }
                word += 1;
            }
            ids.push(SEP);
            words.push(-1);
            let tokens = ids.len();
            ids.resize(context_length, PAD);
            words.resize(context_length, -1);
            batch.ids.extend(ids);
            batch.words.extend(words);
            batch.attention.extend((0..context_length).map(|i| i64::from(i < tokens)));
            batch.positions.push(10_000 + 3 * row as u64);
        }
        batch
    }

    fn inputs(&self) -> MaskingInputs<'_> {
        MaskingInputs {
            token_ids: &self.ids,
            attention_mask: &self.attention,
            word_ids: Some(&self.words),
            positions: &self.positions,
        }
    }

    fn maskable(&self, vocab: &MaskingVocab, i: usize) -> bool {
        self.attention[i] == 1 && !vocab.is_special(self.ids[i])
    }
}

/// `|observed - n p| <= 5 sqrt(n p (1 - p))`.
fn assert_binomial(what: &str, observed: usize, n: usize, p: f64) {
    let (n, observed) = (n as f64, observed as f64);
    let sigma = (n * p * (1.0 - p)).sqrt();
    let deviation = (observed - n * p).abs();
    eprintln!("{what}: {:.5} (expected {p:.5}, {:.2} sigma, n = {n})", observed / n, deviation / sigma);
    assert!(
        deviation <= 5.0 * sigma,
        "{what}: {observed} of {n} ({:.5}), expected {p:.5} +- {:.5} (5 sigma)",
        observed / n,
        5.0 * sigma / n
    );
}

/// Checks the invariants every masking must keep and counts what happened to predicted tokens:
/// (predicted, became [MASK], became another id, kept).
fn check_invariants(batch: &Synthetic, vocab: &MaskingVocab, input_ids: &[i64], labels: &[i64]) -> [usize; 4] {
    let mut counts = [0; 4];
    for i in 0..batch.ids.len() {
        let original = batch.ids[i];
        if labels[i] == IGNORE_INDEX {
            assert_eq!(input_ids[i], original, "token {i} changed without a label");
            continue;
        }
        assert!(batch.maskable(vocab, i), "token {i} (id {original}, attention {}) predicted", batch.attention[i]);
        assert_eq!(labels[i], original, "label of token {i}");
        counts[0] += 1;
        let new = input_ids[i];
        if new == MASK {
            counts[1] += 1;
        } else if new != original {
            assert!(!vocab.is_special(new), "random replacement {new} is special");
            assert!((0..BERT_VOCAB as i64).contains(&new), "random replacement {new} is outside the vocabulary");
            counts[2] += 1;
        } else {
            counts[3] += 1;
        }
    }
    counts
}

/// Of predicted tokens: P([MASK]), P(another id), P(unchanged) when a random draw can hit the
/// original among `candidates` ids.
fn replacement_probabilities(config: &MaskingConfig, candidates: usize) -> [f64; 3] {
    let keep = 1.0 - config.mask_fraction - config.random_fraction;
    let hit = config.random_fraction / candidates as f64;
    [config.mask_fraction, config.random_fraction - hit, keep + hit]
}

#[test]
fn token_masking_statistics_match_bert() {
    let vocab = bert_vocab();
    let config = MaskingConfig::default();
    assert_eq!(
        (config.probability, config.mask_fraction, config.random_fraction, config.whole_word, config.at_least_one),
        (0.15, 0.8, 0.1, false, false)
    );
    let masker = Masker::new(config, vocab.clone(), 17).unwrap();
    let batch = Synthetic::new(6000, 48, 3, 1);
    let masked = masker.mask_batch(batch.inputs()).unwrap();
    let maskable = (0..batch.ids.len()).filter(|&i| batch.maskable(&vocab, i)).count();
    assert!(maskable > 100_000, "{maskable}");
    let [predicted, mask, random, kept] = check_invariants(&batch, &vocab, &masked.input_ids, &masked.labels);
    assert_binomial("predicted tokens", predicted, maskable, 0.15);
    let [p_mask, p_random, p_kept] = replacement_probabilities(&config, vocab.random_candidates());
    assert_binomial("[MASK] of predicted", mask, predicted, p_mask);
    assert_binomial("random of predicted", random, predicted, p_random);
    assert_binomial("unchanged of predicted", kept, predicted, p_kept);
    // Special tokens inside the text ([UNK]) are maskable by nobody.
    assert!((0..batch.ids.len()).any(|i| batch.ids[i] == UNK && batch.attention[i] == 1));
}

#[test]
fn whole_word_masking_statistics_and_grouping() {
    let vocab = bert_vocab();
    let config = MaskingConfig::whole_word();
    let masker = Masker::new(config, vocab.clone(), 23).unwrap();
    let batch = Synthetic::new(6000, 48, 4, 2);
    let masked = masker.mask_batch(batch.inputs()).unwrap();
    let [predicted, mask, random, kept] = check_invariants(&batch, &vocab, &masked.input_ids, &masked.labels);

    // One decision per word over its maskable pieces.
    let mut words: HashMap<(usize, i64), Vec<bool>> = HashMap::new();
    for i in (0..batch.ids.len()).filter(|&i| batch.maskable(&vocab, i)) {
        let row = i / batch.context_length;
        words.entry((row, batch.words[i])).or_default().push(masked.labels[i] != IGNORE_INDEX);
    }
    let mut chosen_words = 0;
    for (word, pieces) in &words {
        assert!(pieces.iter().all(|&p| p == pieces[0]), "word {word:?} partly predicted: {pieces:?}");
        chosen_words += usize::from(pieces[0]);
    }
    assert!(words.values().filter(|p| p.len() > 1).count() > 20_000);
    assert_binomial("predicted words", chosen_words, words.len(), 0.15);
    // Replacements are drawn per piece.
    let [p_mask, p_random, p_kept] = replacement_probabilities(&config, vocab.random_candidates());
    assert_binomial("[MASK] of predicted", mask, predicted, p_mask);
    assert_binomial("random of predicted", random, predicted, p_random);
    assert_binomial("unchanged of predicted", kept, predicted, p_kept);
    let mixed = words.iter().filter(|(_, p)| p.len() > 1 && p[0]).any(|(&(row, word), _)| {
        let pieces: Vec<i64> = (row * batch.context_length..(row + 1) * batch.context_length)
            .filter(|&i| batch.words[i] == word && batch.maskable(&vocab, i))
            .map(|i| masked.input_ids[i])
            .collect();
        pieces.contains(&MASK) && pieces.iter().any(|&id| id != MASK)
    });
    assert!(mixed, "no chosen word mixes [MASK] with other replacements");
}

#[test]
fn whole_word_with_single_piece_words_equals_token_masking() {
    let vocab = bert_vocab();
    let batch = Synthetic::new(300, 32, 1, 3);
    let tokens = Masker::new(MaskingConfig::default(), vocab.clone(), 4).unwrap().mask_batch(batch.inputs()).unwrap();
    let words = Masker::new(MaskingConfig::whole_word(), vocab, 4).unwrap().mask_batch(batch.inputs()).unwrap();
    assert_eq!(tokens, words);
}

#[test]
fn random_replacements_cover_every_non_special_id_uniformly() {
    // A 16-id vocabulary with 6 special ids ([MASK] = 4 counts without being listed): 10
    // candidates.
    let vocab = MaskingVocab::new(4, 16, [0, 1, 2, 3, 15]).unwrap();
    assert_eq!(vocab.special_ids(), [0, 1, 2, 3, 4, 15]);
    assert_eq!(vocab.random_candidates(), 10);
    let config = MaskingConfig { probability: 1.0, mask_fraction: 0.0, random_fraction: 1.0, ..Default::default() };
    let masker = Masker::new(config, vocab.clone(), 9).unwrap();
    let rows = 2000;
    let ids: Vec<i64> = (0..rows * 16).map(|i| [2, 7, 9, 7, 5, 6, 8, 10, 11, 12, 13, 14, 5, 5, 9, 3][i % 16]).collect();
    let attention = vec![1; ids.len()];
    let positions: Vec<u64> = (0..rows as u64).collect();
    let inputs = MaskingInputs { token_ids: &ids, attention_mask: &attention, word_ids: None, positions: &positions };
    let masked = masker.mask_batch(inputs).unwrap();
    let mut counts = [0usize; 16];
    let mut draws = 0;
    for i in 0..ids.len() {
        if masked.labels[i] != IGNORE_INDEX {
            counts[masked.input_ids[i] as usize] += 1;
            draws += 1;
        }
    }
    assert_eq!(draws, rows * 14, "every non-special token is predicted at probability 1");
    for (id, &count) in counts.iter().enumerate() {
        if vocab.is_special(id as i64) {
            assert_eq!(count, 0, "special id {id} drawn");
        } else {
            assert_binomial(&format!("draws of id {id}"), count, draws, 1.0 / 10.0);
        }
    }
}

#[test]
fn masking_is_deterministic_and_independent_of_the_batch() {
    let vocab = bert_vocab();
    for config in [MaskingConfig::default(), MaskingConfig::whole_word()] {
        let masker = Masker::new(config, vocab.clone(), 31).unwrap();
        let batch = Synthetic::new(64, 24, 3, 4);
        let len = batch.context_length;
        let whole = masker.mask_batch(batch.inputs()).unwrap();
        assert_eq!(masker.mask_batch(batch.inputs()).unwrap(), whole, "same call, same masks");
        assert_ne!(whole.labels, vec![IGNORE_INDEX; whole.labels.len()]);

        // Each sample alone, at its position.
        for row in 0..64 {
            let span = row * len..(row + 1) * len;
            let alone = masker
                .mask_sample(
                    batch.positions[row],
                    &batch.ids[span.clone()],
                    &batch.attention[span.clone()],
                    Some(&batch.words[span.clone()]),
                )
                .unwrap();
            assert_eq!(alone.input_ids, whole.input_ids[span.clone()]);
            assert_eq!(alone.labels, whole.labels[span]);
        }

        // Rows reversed: every sample keeps its masks.
        let rev = |v: &[i64]| -> Vec<i64> { v.chunks(len).rev().flatten().copied().collect() };
        let (ids, attention, words) = (rev(&batch.ids), rev(&batch.attention), rev(&batch.words));
        let positions: Vec<u64> = batch.positions.iter().rev().copied().collect();
        let reversed = masker
            .mask_batch(MaskingInputs {
                token_ids: &ids,
                attention_mask: &attention,
                word_ids: Some(&words),
                positions: &positions,
            })
            .unwrap();
        assert_eq!(rev(&reversed.input_ids), whole.input_ids);
        assert_eq!(rev(&reversed.labels), whole.labels);

        // Any world size: each rank masks its slice of the global batch.
        for world_size in [2, 3, 5, 8] {
            let mut input_ids = Vec::new();
            let mut labels = Vec::new();
            for rank in 0..world_size {
                let rows = rank_slice(64, rank, world_size);
                let span = rows.start * len..rows.end * len;
                let part = masker
                    .mask_batch(MaskingInputs {
                        token_ids: &batch.ids[span.clone()],
                        attention_mask: &batch.attention[span.clone()],
                        word_ids: Some(&batch.words[span]),
                        positions: &batch.positions[rows],
                    })
                    .unwrap();
                input_ids.extend(part.input_ids);
                labels.extend(part.labels);
            }
            assert_eq!(input_ids, whole.input_ids, "world size {world_size}");
            assert_eq!(labels, whole.labels, "world size {world_size}");
        }

        // Another seed or another position masks differently.
        let other_seed = Masker::new(config, vocab.clone(), 32).unwrap().mask_batch(batch.inputs()).unwrap();
        assert_ne!(other_seed.labels, whole.labels);
        let shifted: Vec<u64> = batch.positions.iter().map(|p| p + 1).collect();
        let moved = masker.mask_batch(MaskingInputs { positions: &shifted, ..batch.inputs() }).unwrap();
        assert_ne!(moved.labels, whole.labels);
    }
}

#[test]
fn at_least_one_gives_every_sample_a_target() {
    let vocab = bert_vocab();
    // Short captions: 1-3 maskable tokens, plus rows with none.
    let mut batch = Synthetic::new(4000, 5, 1, 6);
    for row in (0..4000).step_by(10) {
        let span = row * 5..row * 5 + 5;
        batch.ids[span.clone()].copy_from_slice(&[CLS, UNK, SEP, PAD, PAD]);
        batch.attention[span].copy_from_slice(&[1, 1, 1, 0, 0]);
    }
    let maskable_in_row = |row: usize| (row * 5..row * 5 + 5).filter(|&i| batch.maskable(&vocab, i)).count();
    let paper = Masker::new(MaskingConfig::default(), vocab.clone(), 8).unwrap().mask_batch(batch.inputs()).unwrap();
    let forced_config = MaskingConfig { at_least_one: true, ..MaskingConfig::default() };
    let forced = Masker::new(forced_config, vocab.clone(), 8).unwrap().mask_batch(batch.inputs()).unwrap();
    check_invariants(&batch, &vocab, &forced.input_ids, &forced.labels);

    let mut empty_rows = 0;
    let mut expected_empty = 0.0;
    let mut rows_with_maskable = 0;
    for row in 0..4000 {
        let span = row * 5..row * 5 + 5;
        let n = maskable_in_row(row);
        let paper_targets = paper.labels[span.clone()].iter().filter(|&&l| l != IGNORE_INDEX).count();
        let forced_targets = forced.labels[span.clone()].iter().filter(|&&l| l != IGNORE_INDEX).count();
        if n == 0 {
            assert_eq!(forced_targets, 0, "row {row} has nothing to mask");
            continue;
        }
        rows_with_maskable += 1;
        expected_empty += 0.85f64.powi(n as i32);
        assert!(forced_targets >= 1, "row {row} has no target with at_least_one");
        if paper_targets > 0 {
            assert_eq!(
                forced.labels[span.clone()],
                paper.labels[span.clone()],
                "row {row}: the flag only fills empty rows"
            );
            assert_eq!(forced.input_ids[span.clone()], paper.input_ids[span]);
        } else {
            assert_eq!(forced_targets, 1, "row {row}: one token is chosen");
            empty_rows += 1;
        }
    }
    // Without the flag, rows are left empty at the rate 0.85^n says (ALBEF's behaviour).
    let mean = expected_empty / rows_with_maskable as f64;
    assert_binomial("rows without a target", empty_rows, rows_with_maskable, mean);
}

#[test]
fn config_parses_with_defaults_and_rejects_unknown_fields() {
    let config: MaskingConfig = serde_json::from_str(r#"{"whole_word": true}"#).unwrap();
    assert_eq!(config, MaskingConfig::whole_word());
    assert!(serde_json::from_str::<MaskingConfig>(r#"{"probabilty": 0.2}"#).is_err());
    let bad = MaskingConfig { probability: -0.1, random_fraction: 0.5, ..Default::default() };
    let err = Masker::new(bad, bert_vocab(), 0).unwrap_err().to_string();
    assert!(err.contains("probability = -0.1") && err.contains("exceeds 1"), "{err}");
}

#[test]
fn bad_inputs_are_reported() {
    let vocab = bert_vocab();
    assert!(matches!(MaskingVocab::new(40_000, BERT_VOCAB, [0]), Err(MaskingError::Vocab { .. })));
    assert!(matches!(MaskingVocab::new(1, 3, [0, 2]), Err(MaskingError::Vocab { .. })));
    let masker = Masker::new(MaskingConfig::whole_word(), vocab, 0).unwrap();
    let ids = [CLS, 2000, SEP, PAD];
    let no_words = masker.mask_sample(0, &ids, &[1, 1, 1, 0], None);
    assert!(matches!(no_words, Err(MaskingError::MissingWordIds)), "{no_words:?}");
    let short_mask = masker.mask_sample(0, &ids, &[1, 1, 1], Some(&[-1, 0, -1, -1]));
    assert!(matches!(short_mask, Err(MaskingError::Shape { what: "attention_mask", expected: 4, got: 3 })));
    let ragged = masker.mask_batch(MaskingInputs {
        token_ids: &[CLS, 2000, SEP],
        attention_mask: &[1, 1, 1],
        word_ids: Some(&[-1, 0, -1]),
        positions: &[0, 1],
    });
    assert!(matches!(ragged, Err(MaskingError::Shape { what: "token_ids", .. })), "{ragged:?}");
}
