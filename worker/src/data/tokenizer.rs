//! Text tokenizers for the text tower and the data loader.
//!
//! Two implementations sit behind [`TextTokenizer`]:
//! - [`ClipBpe`], open_clip's CLIP byte-level BPE (`open_clip.get_tokenizer('ViT-B-32')`),
//!   reimplemented so that it gives the same ids as `open_clip.tokenize` without Python;
//! - [`HfTokenizer`], any Hugging Face `tokenizer.json`, through the `tokenizers` crate.
//!
//! [`load_tokenizer`] picks one from a spec string.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex};

use regex::{Captures, Regex};
use unicode_normalization::UnicodeNormalization;

/// Token ids of one text, padded/truncated to the context length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly `context_length` ids: the tokens, then padding.
    pub ids: Vec<i64>,
    /// Index of the end-of-text token (the text tower pools here).
    pub eot_index: usize,
}

/// A tokenizer that turns one caption into a fixed-length row of ids.
pub trait TextTokenizer: Send + Sync {
    /// Encodes `text` with its special tokens, truncated (keeping the end-of-text token last)
    /// or padded to exactly `context_length` ids.
    fn encode(&self, text: &str, context_length: usize) -> Encoded;
    /// Number of distinct ids, special tokens included (the embedding table's size).
    fn vocab_size(&self) -> usize;
    /// What this tokenizer is, for logs and checkpoint metadata.
    fn name(&self) -> String;
    /// The tokenizer as a Hugging Face `tokenizer.json` (BERT-style families read its special
    /// tokens), if it is one.
    fn as_hf(&self) -> Option<&HfTokenizer> {
        None
    }
    /// [`TextTokenizer::encode`] with the word of each of the `context_length` positions (-1
    /// for special tokens and padding), when the tokenizer knows word boundaries (whole-word
    /// masking needs them).
    fn encode_with_words(&self, text: &str, context_length: usize) -> (Encoded, Option<Vec<i64>>) {
        (self.encode(text, context_length), None)
    }
}

/// Why a tokenizer could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer file could not be read.
    #[error("cannot read tokenizer file {path}: {source}")]
    Io {
        /// The file as given.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a tokenizer.json the `tokenizers` crate accepts.
    #[error("{path} is not a valid tokenizer.json: {reason}")]
    Parse {
        /// The file as given.
        path: String,
        /// What the parser reported.
        reason: String,
    },
    /// The tokenizer loaded but cannot encode text (for example a vocabulary without its
    /// unknown token).
    #[error("tokenizer {path} cannot encode text: {reason}")]
    Encode {
        /// The file as given.
        path: String,
        /// What the tokenizer reported.
        reason: String,
    },
    /// The tokenizer lacks special tokens that a BERT-style encoder needs.
    #[error("tokenizer {path} lacks {missing:?}; a BERT WordPiece tokenizer has [CLS], [SEP], [PAD], [MASK], [UNK]")]
    MissingSpecialTokens {
        /// The file as given.
        path: String,
        /// The tokens it does not have.
        missing: Vec<String>,
    },
}

/// The spec that [`load_tokenizer`] maps to [`ClipBpe`].
pub const CLIP_BPE_SPEC: &str = "clip-bpe";

/// "clip-bpe" -> ClipBpe; anything else is a path to a tokenizer.json.
pub fn load_tokenizer(spec: &str) -> Result<Arc<dyn TextTokenizer>, TokenizerError> {
    if spec == CLIP_BPE_SPEC {
        Ok(Arc::new(ClipBpe::new()))
    } else {
        Ok(Arc::new(HfTokenizer::from_file(spec)?))
    }
}

/// Lays out `tokens` in a row of `context_length` ids: longer sequences are cut and end with
/// `last` (when given), shorter ones are padded with `pad`.
fn fit_to_context(tokens: &[u32], context_length: usize, last: Option<u32>, pad: u32) -> Encoded {
    let kept = tokens.len().min(context_length);
    let mut ids: Vec<i64> = tokens[..kept].iter().map(|&id| i64::from(id)).collect();
    if tokens.len() > context_length {
        if let (Some(last), Some(slot)) = (last, ids.last_mut()) {
            *slot = i64::from(last);
        }
    }
    ids.resize(context_length, i64::from(pad));
    Encoded { ids, eot_index: kept.saturating_sub(1) }
}

// ---------------------------------------------------------------------------------------------
// CLIP byte-level BPE
// ---------------------------------------------------------------------------------------------

/// The BPE merges of OpenAI CLIP, as shipped in the open_clip wheel.
const CLIP_VOCAB_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");

/// Number of merges open_clip reads from the vocab file (lines 1 to 48,894).
const CLIP_MERGES: usize = 49152 - 256 - 2;

/// Words kept in the per-word BPE cache before it is emptied.
const CLIP_CACHE_WORDS: usize = 1 << 20;

/// open_clip's word split, with open_clip's `re.IGNORECASE` spelled out: the special tokens and
/// contractions fold case (so `'ſ` counts as `'s`), and U+0345, which that flag takes out of
/// every class, matches no alternative and is dropped.
const CLIP_WORD_PATTERN: &str =
    r"(?i:<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}\x{345}]+";

/// open_clip's CLIP tokenizer (`SimpleTokenizer` with `clean='lower'`): byte-level BPE over
/// 49,408 ids, `<start_of_text>` = 49406, `<end_of_text>` = 49407, padding with 0.
///
/// Text is cleaned as open_clip does (`ftfy.fix_text`, HTML unescaping twice, whitespace
/// collapsing, lower case) and gives the same ids as `open_clip.tokenize(texts, context_length)`.
/// The cleaning follows ftfy 6.3 except for mojibake repair, which is left out: text that was
/// decoded with the wrong codec ("cafÃ©") is tokenized as it stands, where ftfy would first
/// turn it back into "café" (and would read a lone "Â " as a mangled no-break space).
/// Character tables come from the Rust crates (`regex`, `unicode-normalization`, `std`) and
/// Python's from Python 3.11 (Unicode 14) and the `regex` package; they agree on every character
/// assigned up to Unicode 14, and may split, normalize or lower-case later ones differently.
pub struct ClipBpe {
    /// Id of each byte as a word-inner symbol.
    byte_ids: [u32; 256],
    /// Id of each byte as the last symbol of a word (with `</w>`).
    byte_end_ids: [u32; 256],
    /// For each mergeable pair of symbol ids: the merge's rank and the merged symbol's id.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// The word split.
    pattern: Regex,
    /// BPE result per word, shared by the threads that call the tokenizer.
    cache: Mutex<HashMap<String, Arc<[u32]>>>,
}

impl ClipBpe {
    /// Id of `<start_of_text>`.
    pub const SOT: u32 = 49406;
    /// Id of `<end_of_text>`.
    pub const EOT: u32 = 49407;
    /// Id used for padding.
    pub const PAD: u32 = 0;
    /// Number of ids.
    pub const VOCAB_SIZE: usize = 49408;

    /// Builds the tokenizer from the embedded merges file.
    pub fn new() -> Self {
        let mut merges_text = String::new();
        flate2::read::GzDecoder::new(CLIP_VOCAB_GZ)
            .read_to_string(&mut merges_text)
            .expect("the embedded CLIP vocab is valid gzip and UTF-8");
        let merge_lines: Vec<(&str, &str)> = merges_text
            .split('\n')
            .skip(1)
            .take(CLIP_MERGES)
            .map(|line| {
                let mut parts = line.split_whitespace();
                let first = parts.next().expect("a merge line has two symbols");
                let second = parts.next().expect("a merge line has two symbols");
                (first, second)
            })
            .collect();

        let byte_chars = bytes_to_unicode();
        let mut byte_order: Vec<u8> = Vec::with_capacity(256);
        byte_order.extend(printable_bytes());
        byte_order.extend((0..=255u8).filter(|b| !is_printable_byte(*b)));

        // The vocabulary in open_clip's order; a string listed twice keeps its last id.
        let mut vocab: Vec<String> = Vec::with_capacity(Self::VOCAB_SIZE);
        vocab.extend(byte_order.iter().map(|&b| byte_chars[b as usize].to_string()));
        vocab.extend(byte_order.iter().map(|&b| format!("{}</w>", byte_chars[b as usize])));
        vocab.extend(merge_lines.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<start_of_text>".to_string());
        vocab.push("<end_of_text>".to_string());
        assert_eq!(vocab.len(), Self::VOCAB_SIZE, "CLIP vocab size");
        let encoder: HashMap<&str, u32> =
            vocab.iter().enumerate().map(|(id, token)| (token.as_str(), id as u32)).collect();

        let mut byte_ids = [0u32; 256];
        let mut byte_end_ids = [0u32; 256];
        for b in 0..256 {
            let symbol = byte_chars[b].to_string();
            byte_ids[b] = encoder[symbol.as_str()];
            byte_end_ids[b] = encoder[format!("{symbol}</w>").as_str()];
        }

        let mut merges = HashMap::with_capacity(merge_lines.len());
        for (rank, (first, second)) in merge_lines.iter().enumerate() {
            let (Some(&a), Some(&b)) = (encoder.get(first), encoder.get(second)) else {
                continue;
            };
            let merged = encoder[format!("{first}{second}").as_str()];
            merges.insert((a, b), (rank as u32, merged));
        }

        Self {
            byte_ids,
            byte_end_ids,
            merges,
            pattern: Regex::new(CLIP_WORD_PATTERN).expect("the CLIP word pattern compiles"),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The text as open_clip's `clean='lower'` leaves it before splitting into words.
    pub fn clean(text: &str) -> String {
        let fixed = fix_text(text);
        let unescaped = html_unescape(&html_unescape(&fixed));
        let words: Vec<&str> = unescaped.split(is_python_space).filter(|w| !w.is_empty()).collect();
        words.join(" ").to_lowercase()
    }

    /// Ids of `text` without `<start_of_text>`/`<end_of_text>` (open_clip's
    /// `SimpleTokenizer.encode`).
    pub fn encode_words(&self, text: &str) -> Vec<u32> {
        self.encode_words_up_to(text, usize::MAX)
    }

    /// Like [`Self::encode_words`], but stops once at least `limit` ids are known.
    fn encode_words_up_to(&self, text: &str, limit: usize) -> Vec<u32> {
        let cleaned = Self::clean(text);
        let mut ids = Vec::new();
        for word in self.pattern.find_iter(&cleaned) {
            if ids.len() >= limit {
                break;
            }
            match word.as_str() {
                "<start_of_text>" => ids.push(Self::SOT),
                "<end_of_text>" => ids.push(Self::EOT),
                word => ids.extend_from_slice(&self.bpe_cached(word)),
            }
        }
        ids
    }

    fn bpe_cached(&self, word: &str) -> Arc<[u32]> {
        if let Some(ids) = self.cache.lock().expect("BPE cache lock").get(word) {
            return ids.clone();
        }
        let ids: Arc<[u32]> = self.bpe(word.as_bytes()).into();
        let mut cache = self.cache.lock().expect("BPE cache lock");
        if cache.len() >= CLIP_CACHE_WORDS {
            cache.clear();
        }
        cache.insert(word.to_string(), ids.clone());
        ids
    }

    /// Byte-level BPE of one word: start from one symbol per byte (the last one marked as the
    /// end of the word) and apply the lowest-ranked merge everywhere until none applies.
    fn bpe(&self, word: &[u8]) -> Vec<u32> {
        let Some((&last, inner)) = word.split_last() else {
            return Vec::new();
        };
        let mut symbols: Vec<u32> = inner.iter().map(|&b| self.byte_ids[b as usize]).collect();
        symbols.push(self.byte_end_ids[last as usize]);
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .filter_map(|pair| {
                    let &(rank, merged) = self.merges.get(&(pair[0], pair[1]))?;
                    Some((rank, pair[0], pair[1], merged))
                })
                .min();
            let Some((_, first, second, merged)) = best else {
                break;
            };
            let mut next = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = next;
        }
        symbols
    }
}

impl Default for ClipBpe {
    fn default() -> Self {
        Self::new()
    }
}

impl TextTokenizer for ClipBpe {
    fn encode(&self, text: &str, context_length: usize) -> Encoded {
        // Ids past `context_length - 1` are cut anyway, so stop splitting once they are known.
        let words = self.encode_words_up_to(text, context_length.saturating_sub(1));
        let mut tokens = Vec::with_capacity(words.len() + 2);
        tokens.push(Self::SOT);
        tokens.extend(words);
        tokens.push(Self::EOT);
        fit_to_context(&tokens, context_length, Some(Self::EOT), Self::PAD)
    }

    fn vocab_size(&self) -> usize {
        Self::VOCAB_SIZE
    }

    fn name(&self) -> String {
        CLIP_BPE_SPEC.to_string()
    }
}

/// Bytes that stand for themselves in `bytes_to_unicode`: `!`..`~`, `¡`..`¬`, `®`..`ÿ`.
fn is_printable_byte(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

fn printable_bytes() -> impl Iterator<Item = u8> {
    (0..=255u8).filter(|b| is_printable_byte(*b))
}

/// GPT-2/CLIP's reversible map from bytes to printable characters: printable Latin-1 bytes map
/// to themselves, the others to U+0100 onwards in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        chars[b as usize] = if is_printable_byte(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are characters");
            next += 1;
            c
        };
    }
    chars
}

/// Python's `str.isspace`: Unicode White_Space plus the ASCII separators U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1C}'..='\u{1F}').contains(&c)
}

// ---------------------------------------------------------------------------------------------
// Text cleaning: ftfy.fix_text and html.unescape
// ---------------------------------------------------------------------------------------------

/// The HTML5 named character references (Python's `html.entities.html5`), one
/// `name<TAB>code points in hex` per line; names with and without the final `;`.
const HTML5_ENTITIES_TSV: &str = include_str!("../../assets/html5_entities.tsv");

/// ftfy fixes text in segments of at most this many characters.
const FTFY_MAX_DECODE_LENGTH: usize = 1_000_000;

/// Python's `html.entities.html5`.
static HTML5_ENTITIES: LazyLock<Vec<(&'static str, String)>> = LazyLock::new(|| {
    HTML5_ENTITIES_TSV
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, code_points) = line.split_once('\t').expect("entity line has a tab");
            let value = code_points
                .split(' ')
                .map(|hex| {
                    let cp = u32::from_str_radix(hex, 16).expect("entity code point is hex");
                    char::from_u32(cp).expect("entity code point is a character")
                })
                .collect();
            (name, value)
        })
        .collect()
});

static HTML5_BY_NAME: LazyLock<HashMap<&'static str, &'static str>> =
    LazyLock::new(|| HTML5_ENTITIES.iter().map(|(name, value)| (*name, value.as_str())).collect());

/// ftfy's `HTML_ENTITIES`: every HTML5 entity written with its `;`, plus the all-caps spelling
/// of lower-case entities (`&EACUTE;` -> `É`) where that spelling means nothing else.
static FTFY_ENTITIES: LazyLock<HashMap<String, String>> = LazyLock::new(|| {
    let mut entities = HashMap::new();
    for (name, value) in HTML5_ENTITIES.iter() {
        if !name.ends_with(';') {
            continue;
        }
        entities.insert(format!("&{name}"), value.clone());
        if name.to_ascii_lowercase() == *name {
            let upper = format!("&{}", name.to_ascii_uppercase());
            if html_unescape(&upper) == upper {
                entities.insert(upper, value.to_uppercase());
            }
        }
    }
    entities
});

/// Python's `html._charref`.
static HTML_CHARREF: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\x0C <&#;]{1,32};?)").expect("charref pattern")
});

/// ftfy's `HTML_ENTITY_RE`.
static FTFY_ENTITY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"&#?[0-9A-Za-z]{1,24};").expect("entity pattern"));

/// ftfy's `ANSI_RE` (Python's `\d` is any decimal digit, as is the regex crate's).
static ANSI_ESCAPE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\x1b\[[\d;]*[a-zA-Z]").expect("ANSI pattern"));

/// ftfy's `WIDTH_MAP`: the ideographic space and the halfwidth/fullwidth forms U+FF01..U+FFEF,
/// each replaced by its NFKC form.
static WIDTH_MAP: LazyLock<HashMap<char, String>> = LazyLock::new(|| {
    let mut map = HashMap::new();
    map.insert('\u{3000}', " ".to_string());
    for c in '\u{FF01}'..='\u{FFEF}' {
        let alternate: String = std::iter::once(c).nfkc().collect();
        if alternate.chars().ne(std::iter::once(c)) {
            map.insert(c, alternate);
        }
    }
    map
});

/// Windows-1252 for the bytes 0x80..0x9F, with the five undefined bytes kept as Latin-1 (ftfy's
/// "sloppy" codec and the HTML5 numeric reference table agree on this).
fn windows_1252_c1(c: char) -> char {
    match c {
        '\u{80}' => '\u{20AC}',
        '\u{82}' => '\u{201A}',
        '\u{83}' => '\u{0192}',
        '\u{84}' => '\u{201E}',
        '\u{85}' => '\u{2026}',
        '\u{86}' => '\u{2020}',
        '\u{87}' => '\u{2021}',
        '\u{88}' => '\u{02C6}',
        '\u{89}' => '\u{2030}',
        '\u{8A}' => '\u{0160}',
        '\u{8B}' => '\u{2039}',
        '\u{8C}' => '\u{0152}',
        '\u{8E}' => '\u{017D}',
        '\u{91}' => '\u{2018}',
        '\u{92}' => '\u{2019}',
        '\u{93}' => '\u{201C}',
        '\u{94}' => '\u{201D}',
        '\u{95}' => '\u{2022}',
        '\u{96}' => '\u{2013}',
        '\u{97}' => '\u{2014}',
        '\u{98}' => '\u{02DC}',
        '\u{99}' => '\u{2122}',
        '\u{9A}' => '\u{0161}',
        '\u{9B}' => '\u{203A}',
        '\u{9C}' => '\u{0153}',
        '\u{9E}' => '\u{017E}',
        '\u{9F}' => '\u{0178}',
        other => other,
    }
}

/// Python's `html.unescape`: named references (with the HTML5 rule that a known prefix of an
/// unknown name is decoded, `&notit;` -> `¬it;`), decimal and hex references with the HTML5
/// replacements for invalid code points.
pub fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    HTML_CHARREF.replace_all(text, |caps: &Captures| replace_charref(&caps[1])).into_owned()
}

fn replace_charref(reference: &str) -> String {
    if let Some(number) = reference.strip_prefix('#') {
        let (digits, radix) = match number.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16),
            None => (number, 10),
        };
        let digits = digits.trim_end_matches(';');
        // Anything past U+10FFFF is replaced alike, so saturate instead of overflowing.
        let value = digits.chars().fold(0u32, |acc, d| {
            let digit = d.to_digit(radix).expect("the charref pattern only matches digits");
            acc.saturating_mul(radix).saturating_add(digit).min(0x11_0000)
        });
        return numeric_charref(value);
    }
    if let Some(value) = HTML5_BY_NAME.get(reference) {
        return (*value).to_string();
    }
    let boundaries: Vec<usize> = reference.char_indices().map(|(i, _)| i).collect();
    for cut in (2..boundaries.len()).rev().map(|x| boundaries[x]) {
        if let Some(value) = HTML5_BY_NAME.get(&reference[..cut]) {
            return format!("{value}{}", &reference[cut..]);
        }
    }
    format!("&{reference}")
}

fn numeric_charref(value: u32) -> String {
    match value {
        0x00 => "\u{FFFD}".to_string(),
        0x0D => "\r".to_string(),
        0x80..=0x9F => windows_1252_c1(char::from_u32(value).expect("C1 code point")).to_string(),
        0xD800..=0xDFFF | 0x11_0000.. => "\u{FFFD}".to_string(),
        0x01..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0xFDD0..=0xFDEF => String::new(),
        v if v & 0xFFFE == 0xFFFE => String::new(),
        v => char::from_u32(v).expect("a scalar value").to_string(),
    }
}

/// `ftfy.fix_text` with its default configuration, less mojibake repair (`fix_encoding`): HTML
/// entities (unless a line holds `<`, which then stays off for the lines after it too), C1
/// controls as Windows-1252, Latin ligatures, full- and half-width forms, curly quotes, line
/// breaks, ANSI terminal escapes, invisible control characters and NFC, repeated per line until
/// nothing changes.
pub fn fix_text(text: &str) -> String {
    let plain = text.bytes().all(|b| matches!(b, b' '..=b'~' | b'\n' | b'\t') && b != b'&');
    if plain {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.find('\n').map_or(rest.len(), |i| i + 1);
        if end > FTFY_MAX_DECODE_LENGTH {
            if let Some((cut, _)) = rest[..end].char_indices().nth(FTFY_MAX_DECODE_LENGTH) {
                end = cut;
            }
        }
        let segment = &rest[..end];
        if segment.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(segment, unescape));
        rest = &rest[end..];
    }
    out
}

/// ftfy's `fix_and_explain` on one segment.
fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let original = text.clone();
        if unescape {
            text = unescape_html(&text);
        }
        text =
            map_chars(&text, |c| ('\u{80}'..='\u{9F}').contains(&c).then(|| windows_1252_c1(c).to_string()));
        text = map_chars(&text, latin_ligature);
        text = map_chars(&text, |c| WIDTH_MAP.get(&c).cloned());
        text = map_chars(&text, |c| match c {
            '\u{02BC}' | '\u{2018}'..='\u{201B}' => Some("'".to_string()),
            '\u{201C}'..='\u{201F}' => Some("\"".to_string()),
            _ => None,
        });
        text =
            text.replace("\r\n", "\n").replace('\r', "\n").replace(['\u{2028}', '\u{2029}', '\u{85}'], "\n");
        text = ANSI_ESCAPE.replace_all(&text, "").into_owned();
        text.retain(|c| !is_invisible_control(c));
        text = text.nfc().collect();
        if text == original {
            return text;
        }
    }
}

/// Replaces each character for which `replacement` gives a string.
fn map_chars(text: &str, replacement: impl Fn(char) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match replacement(c) {
            Some(s) => out.push_str(&s),
            None => out.push(c),
        }
    }
    out
}

/// ftfy's `unescape_html`: only references that end in `;`, plus all-caps Latin ones.
fn unescape_html(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    FTFY_ENTITY
        .replace_all(text, |caps: &Captures| {
            let reference = &caps[0];
            if let Some(value) = FTFY_ENTITIES.get(reference) {
                value.clone()
            } else if reference.starts_with("&#") {
                let unescaped = html_unescape(reference);
                if unescaped.contains(';') {
                    reference.to_string()
                } else {
                    unescaped
                }
            } else {
                reference.to_string()
            }
        })
        .into_owned()
}

/// ftfy's `LIGATURES`: Latin ligatures and legacy digraphs, taken apart.
fn latin_ligature(c: char) -> Option<String> {
    let letters = match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "\u{02BC}n",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "D\u{017D}",
        'ǅ' => "D\u{017E}",
        'ǆ' => "d\u{017E}",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "\u{017F}t",
        'ﬆ' => "st",
        _ => return None,
    };
    Some(letters.to_string())
}

/// ftfy's `CONTROL_CHARS`: ASCII controls other than tab, line feed, form feed and carriage
/// return; deprecated Arabic format controls; the byte order mark; interlinear annotation
/// characters and the object replacement character.
fn is_invisible_control(c: char) -> bool {
    matches!(
        c,
        '\u{00}'..='\u{08}'
            | '\u{0B}'
            | '\u{0E}'..='\u{1F}'
            | '\u{7F}'
            | '\u{206A}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFC}'
    )
}

// ---------------------------------------------------------------------------------------------
// Hugging Face tokenizer.json
// ---------------------------------------------------------------------------------------------

/// A Hugging Face `tokenizer.json`, encoded with its special tokens (its post-processor), cut
/// to the context length keeping the final special token, and padded with its pad id.
pub struct HfTokenizer {
    tokenizer: tokenizers::Tokenizer,
    pad_id: u32,
    path: String,
}

impl HfTokenizer {
    /// Loads `path`. The pad id comes from the file's padding config, else from a token named
    /// `[PAD]` or `<pad>`, else 0. The file's own truncation and padding are not applied:
    /// [`TextTokenizer::encode`] fits every text to the context length it is given.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref().display().to_string();
        let json = std::fs::read_to_string(&path)
            .map_err(|source| TokenizerError::Io { path: path.clone(), source })?;
        let mut tokenizer: tokenizers::Tokenizer = json.parse().map_err(|e: tokenizers::Error| {
            TokenizerError::Parse { path: path.clone(), reason: e.to_string() }
        })?;
        let pad_id = tokenizer
            .get_padding()
            .map(|padding| padding.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .or_else(|| tokenizer.token_to_id("<pad>"))
            .unwrap_or(0);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| TokenizerError::Parse { path: path.clone(), reason: e.to_string() })?;
        tokenizer
            .encode("a photo of a cat", true)
            .map_err(|e| TokenizerError::Encode { path: path.clone(), reason: e.to_string() })?;
        Ok(Self { tokenizer, pad_id, path })
    }

    /// The id used for padding.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of `token` (vocabulary or added token), if the tokenizer has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Ids of the added tokens marked special (for BERT: [PAD], [UNK], [CLS], [SEP], [MASK]),
    /// ascending. These are transformers' `all_special_ids`, the tokens its MLM collator never
    /// masks.
    pub fn special_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .tokenizer
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, token)| token.special)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The ids of [CLS], [SEP], [PAD], [MASK] and [UNK]; the pad id is [`Self::pad_id`].
    pub fn bert_special_tokens(&self) -> Result<BertSpecialTokens, TokenizerError> {
        let mut missing = Vec::new();
        let mut find = |token: &str| {
            self.tokenizer.token_to_id(token).unwrap_or_else(|| {
                missing.push(token.to_string());
                0
            })
        };
        let tokens = BertSpecialTokens {
            cls: find("[CLS]"),
            sep: find("[SEP]"),
            mask: find("[MASK]"),
            unk: find("[UNK]"),
            pad: self.pad_id,
        };
        if self.tokenizer.token_to_id("[PAD]").is_none() && self.tokenizer.get_padding().is_none() {
            missing.push("[PAD]".to_string());
        }
        if missing.is_empty() {
            Ok(tokens)
        } else {
            Err(TokenizerError::MissingSpecialTokens { path: self.path.clone(), missing })
        }
    }

    /// Encodes `text` as [`TextTokenizer::encode`] does (for a BERT tokenizer.json: `[CLS]`
    /// tokens `[SEP]`, cut to keep `[SEP]` last, padded with [PAD]), with the attention mask and
    /// the word of each token, like transformers' `BertTokenizerFast(text, padding="max_length",
    /// truncation=True, max_length=context_length)` and its `word_ids()`.
    pub fn encode_words(&self, text: &str, context_length: usize) -> EncodedWords {
        let (encoded, mut word_ids) = match self.tokenizer.encode(text, true) {
            Ok(encoding) => {
                let encoded = self.fit(&encoding, context_length);
                let kept = encoding.len().min(context_length);
                let mut word_ids: Vec<i64> =
                    encoding.get_word_ids()[..kept].iter().map(|word| word.map_or(-1, i64::from)).collect();
                let cut = encoding.len() > context_length;
                if cut && encoding.get_special_tokens_mask().last() == Some(&1) {
                    if let Some(last) = word_ids.last_mut() {
                        *last = -1;
                    }
                }
                (encoded, word_ids)
            }
            Err(e) => {
                tracing::warn!(tokenizer = %self.path, error = %e, "cannot encode a caption; using an empty one");
                (fit_to_context(&[], context_length, None, self.pad_id), Vec::new())
            }
        };
        let kept = word_ids.len();
        word_ids.resize(context_length, -1);
        let attention_mask = (0..context_length).map(|i| i64::from(i < kept)).collect();
        EncodedWords { ids: encoded.ids, eot_index: encoded.eot_index, attention_mask, word_ids }
    }

    /// The text of `ids` without special tokens, as transformers' `decode(ids,
    /// skip_special_tokens=True)`: the file's decoder joins the tokens (WordPiece pieces without
    /// their `##`), or spaces do when the file has none. Ids outside the vocabulary are skipped.
    /// Errors name the tokenizer file and the ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, true).map_err(|e| format!("tokenizer {} cannot decode {ids:?}: {e}", self.path))
    }

    /// Fits one encoding to the context length, keeping its final special token when cut.
    fn fit(&self, encoding: &tokenizers::Encoding, context_length: usize) -> Encoded {
        let ids = encoding.get_ids();
        let ends_special = encoding.get_special_tokens_mask().last() == Some(&1);
        let last = ids.last().copied().filter(|_| ends_special);
        fit_to_context(ids, context_length, last, self.pad_id)
    }
}

/// The special tokens of a BERT WordPiece tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BertSpecialTokens {
    /// `[CLS]`, first in every sequence (the bidirectional text encoder pools here).
    pub cls: u32,
    /// `[SEP]`, last in every sequence.
    pub sep: u32,
    /// `[PAD]`, after the sequence up to the context length.
    pub pad: u32,
    /// `[MASK]`, what masked-language modelling puts in place of most predicted tokens.
    pub mask: u32,
    /// `[UNK]`, a word the vocabulary cannot spell.
    pub unk: u32,
}

/// One text with what a BERT-style encoder and its masking need besides the ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedWords {
    /// Exactly `context_length` ids: the tokens, then padding.
    pub ids: Vec<i64>,
    /// Index of the last token before the padding (`[SEP]` for BERT).
    pub eot_index: usize,
    /// 1 for every token, special tokens included; 0 for padding.
    pub attention_mask: Vec<i64>,
    /// The pre-tokenizer word each token belongs to (0, 1, ... in text order); -1 for tokens
    /// the post-processor added (`[CLS]`, `[SEP]`) and for padding. A WordPiece word's pieces
    /// (the first, then the `##` continuations) share one id.
    pub word_ids: Vec<i64>,
}

impl TextTokenizer for HfTokenizer {
    fn encode(&self, text: &str, context_length: usize) -> Encoded {
        match self.tokenizer.encode(text, true) {
            Ok(encoding) => self.fit(&encoding, context_length),
            Err(e) => {
                tracing::warn!(tokenizer = %self.path, error = %e, "cannot encode a caption; using an empty one");
                fit_to_context(&[], context_length, None, self.pad_id)
            }
        }
    }

    fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    fn as_hf(&self) -> Option<&HfTokenizer> {
        Some(self)
    }

    fn encode_with_words(&self, text: &str, context_length: usize) -> (Encoded, Option<Vec<i64>>) {
        let words = self.encode_words(text, context_length);
        (Encoded { ids: words.ids, eot_index: words.eot_index }, Some(words.word_ids))
    }

    fn name(&self) -> String {
        self.path.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip_ids(text: &str, context_length: usize) -> Vec<i64> {
        let encoded = ClipBpe::new().encode(text, context_length);
        let end = encoded.eot_index + 1;
        encoded.ids[..end].to_vec()
    }

    #[test]
    fn clip_matches_open_clip_on_known_captions() {
        // Ids from open_clip.get_tokenizer('ViT-B-32').
        assert_eq!(clip_ids("a photo of a cat", 77), [49406, 320, 1125, 539, 320, 2368, 49407]);
        assert_eq!(clip_ids("", 77), [49406, 49407]);
        assert_eq!(
            clip_ids("Hello, World! It's 2024.", 77),
            [49406, 3306, 267, 1002, 256, 585, 568, 273, 271, 273, 275, 269, 49407]
        );
        assert_eq!(
            clip_ids("ﬁsh &amp; chips “quoted” ＬＯＵＤ", 77),
            [49406, 2759, 261, 8855, 257, 27706, 257, 7464, 49407]
        );
        assert_eq!(clip_ids("<start_of_text>x", 77), [49406, 49406, 343, 49407]);
        assert_eq!(clip_ids("ΟΔΟΣ Σ", 77), [49406, 138, 123, 138, 112, 138, 123, 139, 480, 139, 481, 49407]);
        assert_eq!(clip_ids("x\u{345}y", 77), [49406, 343, 344, 49407]);
        assert_eq!(clip_ids("'ſ ok", 77), [49406, 6, 129, 379, 2481, 49407]);
    }

    #[test]
    fn clip_pads_and_truncates_like_open_clip() {
        let bpe = ClipBpe::new();
        let padded = bpe.encode("a photo of a cat", 10);
        assert_eq!(padded.ids, [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]);
        assert_eq!(padded.eot_index, 6);
        let cut = bpe.encode("a photo of a cat", 4);
        assert_eq!(cut.ids, [49406, 320, 1125, 49407]);
        assert_eq!(cut.eot_index, 3);
        assert_eq!(bpe.encode("a photo of a cat", 1).ids, [49407]);
        let empty = bpe.encode("anything", 0);
        assert!(empty.ids.is_empty());
        assert_eq!(bpe.vocab_size(), 49408);
        assert_eq!(bpe.name(), "clip-bpe");
    }

    #[test]
    fn clip_cache_gives_the_same_ids_from_many_threads() {
        let bpe = Arc::new(ClipBpe::new());
        let expected = bpe.encode("the quick brown fox jumps over the lazy dog", 77);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let bpe = bpe.clone();
                std::thread::spawn(move || bpe.encode("the quick brown fox jumps over the lazy dog", 77))
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap(), expected);
        }
    }

    #[test]
    fn fix_text_matches_ftfy() {
        // Outputs of ftfy.fix_text 6.3.1.
        assert_eq!(
            fix_text("&EACUTE; &SZLIG; &amp;amp; &#x3B; &#128; &notit; &rsquo;"),
            "É SS & &#x3B; € &notit; '"
        );
        assert_eq!(fix_text("<b>&rsquo;</b>"), "<b>&rsquo;</b>");
        assert_eq!(fix_text("caf\u{e9} nai\u{308}ve"), "café naïve");
        assert_eq!(fix_text("\x1b[31mred\x1b[0m"), "red");
        assert_eq!(fix_text("a\r\nb\rc\u{2028}d"), "a\nb\nc\nd");
        assert_eq!(fix_text("\u{149} \u{1C4}"), "'n DŽ");
        assert_eq!(fix_text("ＬＯＵＤ　ＮＯＩＳＥＳ"), "LOUD NOISES");
        assert_eq!(fix_text("Ｕﾀｰﾝ"), "Uターン");
        assert_eq!(fix_text("ﬂuﬃeﬆ"), "fluffiest");
    }

    #[test]
    fn html_unescape_matches_python() {
        // Outputs of Python 3.11's html.unescape.
        assert_eq!(html_unescape("&amp;amp; &lt;b&gt;"), "&amp; <b>");
        assert_eq!(
            html_unescape("&notit; &amp &ampx &#65 &#x41; &#0; &#x110000; &#1; &#150;"),
            "¬it; & &x A A \u{FFFD} \u{FFFD}  –"
        );
        assert_eq!(html_unescape("&#99999999999999999999;"), "\u{FFFD}");
        assert_eq!(html_unescape("&unknown; & &;"), "&unknown; & &;");
    }

    /// A WordLevel tokenizer.json like the synthetic dataset writer's.
    fn word_level_json(padding: serde_json::Value) -> serde_json::Value {
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": padding,
            "added_tokens": [special(0, "[PAD]"), special(1, "[SOT]"), special(2, "[EOT]"), special(3, "[UNK]")],
            "normalizer": {"type": "Lowercase"},
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": "[SOT]", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "[EOT]", "type_id": 0}}
                ],
                "pair": [
                    {"SpecialToken": {"id": "[SOT]", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"Sequence": {"id": "B", "type_id": 1}},
                    {"SpecialToken": {"id": "[EOT]", "type_id": 1}}
                ],
                "special_tokens": {
                    "[SOT]": {"id": "[SOT]", "ids": [1], "tokens": ["[SOT]"]},
                    "[EOT]": {"id": "[EOT]", "ids": [2], "tokens": ["[EOT]"]}
                }
            },
            "decoder": null,
            "model": {
                "type": "WordLevel",
                "vocab": {"[PAD]": 0, "[SOT]": 1, "[EOT]": 2, "[UNK]": 3, "a": 4, "photo": 5, "of": 6,
                    "cat": 7, "red": 8, ".": 9},
                "unk_token": "[UNK]"
            }
        })
    }

    fn write_json(dir: &Path, value: &serde_json::Value) -> String {
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, serde_json::to_string_pretty(value).unwrap()).unwrap();
        path.display().to_string()
    }

    #[test]
    fn word_level_tokenizer_encodes_pads_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_json(dir.path(), &word_level_json(serde_json::Value::Null));
        let tokenizer = load_tokenizer(&path).unwrap();
        assert_eq!(tokenizer.vocab_size(), 10);
        assert_eq!(tokenizer.name(), path);

        let padded = tokenizer.encode("A photo of a RED dog.", 12);
        assert_eq!(padded.ids, [1, 4, 5, 6, 4, 8, 3, 9, 2, 0, 0, 0]);
        assert_eq!(padded.eot_index, 8);

        let exact = tokenizer.encode("a cat", 4);
        assert_eq!(exact.ids, [1, 4, 7, 2]);
        assert_eq!(exact.eot_index, 3);

        let cut = tokenizer.encode("a photo of a cat", 4);
        assert_eq!(cut.ids, [1, 4, 5, 2]);
        assert_eq!(cut.eot_index, 3);

        let empty = tokenizer.encode("", 5);
        assert_eq!(empty.ids, [1, 2, 0, 0, 0]);
        assert_eq!(empty.eot_index, 1);
    }

    #[test]
    fn word_level_tokenizer_pads_with_the_configured_id() {
        let dir = tempfile::tempdir().unwrap();
        let padding = serde_json::json!({"strategy": {"Fixed": 32}, "direction": "Right",
            "pad_to_multiple_of": null, "pad_id": 9, "pad_type_id": 0, "pad_token": "."});
        let path = write_json(dir.path(), &word_level_json(padding));
        let tokenizer = HfTokenizer::from_file(&path).unwrap();
        assert_eq!(tokenizer.pad_id(), 9);
        // The file's fixed padding to 32 is not applied; the context length given is.
        let encoded = tokenizer.encode("a cat", 6);
        assert_eq!(encoded.ids, [1, 4, 7, 2, 9, 9]);
        assert_eq!(encoded.eot_index, 3);
    }

    #[test]
    fn encode_words_gives_attention_and_word_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_json(dir.path(), &word_level_json(serde_json::Value::Null));
        let tokenizer = HfTokenizer::from_file(&path).unwrap();
        let padded = tokenizer.encode_words("a red cat.", 8);
        assert_eq!(padded.ids, [1, 4, 8, 7, 9, 2, 0, 0]);
        assert_eq!(padded.attention_mask, [1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(padded.word_ids, [-1, 0, 1, 2, 3, -1, -1, -1]);
        assert_eq!(padded.eot_index, 5);
        let cut = tokenizer.encode_words("a red cat.", 4);
        assert_eq!(cut.ids, [1, 4, 8, 2]);
        assert_eq!(cut.attention_mask, [1, 1, 1, 1]);
        assert_eq!(cut.word_ids, [-1, 0, 1, -1]);
        assert_eq!(tokenizer.special_token_ids(), [0, 1, 2, 3]);
        let err = tokenizer.bert_special_tokens().unwrap_err();
        match &err {
            TokenizerError::MissingSpecialTokens { missing, .. } => assert_eq!(missing, &["[CLS]", "[SEP]", "[MASK]"]),
            other => panic!("unexpected error {other}"),
        }
        assert!(err.to_string().contains(&path), "{err}");
    }

    #[test]
    fn load_errors_name_the_path_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json").display().to_string();
        let err = load_tokenizer(&missing).err().expect("missing file");
        assert!(matches!(err, TokenizerError::Io { .. }), "{err}");
        assert!(err.to_string().contains(&missing), "{err}");

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{ not json").unwrap();
        let bad = bad.display().to_string();
        let err = load_tokenizer(&bad).err().expect("bad JSON");
        assert!(matches!(err, TokenizerError::Parse { .. }), "{err}");
        assert!(err.to_string().contains(&bad), "{err}");

        assert_eq!(load_tokenizer("clip-bpe").unwrap().name(), "clip-bpe");
    }
}
