//! `ClipBpe` against open_clip itself: a deterministic corpus of varied captions is tokenized by
//! `tests/python/clip_tokenize.py` (open_clip's `ViT-B-32` tokenizer in the project venv) and by
//! braid, and every row of ids must be equal.

use braid::data::tokenizer::{ClipBpe, TextTokenizer};
use braid_coordinator::plan::SplitMix64;
use braid_tests::{python, workspace_root};

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "a", "photo", "of", "the", "cat", "dog", "sitting", "on", "table", "red", "car", "beautiful",
    "sunset", "over", "mountains", "man", "riding", "bicycle", "city", "street", "at", "night",
    "woman", "holding", "umbrella", "in", "rain", "children", "playing", "park", "close-up",
    "flower", "macro", "vintage", "poster", "illustration", "3d", "render", "black", "and", "white",
    "high", "resolution", "stock", "image", "isolated", "background", "logo", "design", "vector",
    "watercolor", "painting", "portrait", "kitchen", "interior", "modern", "house", "beach",
    "ocean", "waves", "surfing", "snow", "forest", "autumn", "leaves", "coffee", "cup", "breakfast",
    "pizza", "tokenization", "antidisestablishmentarianism", "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis", "xylophone", "quizzical", "jazz", "rhythm",
    "with", "two", "from", "above", "ViT", "iPhone", "McDonald", "eBay", "HDR", "4K", "UNESCO",
    "NASA", "e.g.", "i.e.", "etc",
];

#[rustfmt::skip]
const ACCENTED: &[&str] = &[
    "café", "naïve", "résumé", "Zürich", "São", "Paulo", "crème", "brûlée", "façade", "Ångström",
    "Łódź", "Dvořák", "smörgåsbord", "piñata", "jalapeño", "Kraków", "Ærøskøbing", "Straße",
    "Fußball", "Øresund", "fiancée", "déjà", "vu", "coöperate", "Škoda", "İstanbul", "ığdır",
    "Māori", "Việt", "Nam", "Hà", "Nội", "Þingvellir", "Ålesund", "Čeština", "Żółć", "ÉCOLE",
    "ÜBER", "ÀÉÎÕÜ", "œuvre", "Œdipe", "Ça", "va", "señor", "niño",
];

#[rustfmt::skip]
const GREEK_CYRILLIC: &[&str] = &[
    "Καλημέρα", "κόσμε", "ΟΔΟΣ", "ΣΟΦΙΑΣ", "Σίσυφος", "ΑΣΣΟΣ", "Ελλάδα", "σοφία", "Ωμέγα", "ΣΑΣ",
    "Москва", "Привет", "мир", "ЁЛКА", "ёлка", "Україна", "Ђорђе", "Беларусь", "Санкт-Петербург",
    "ЩЕДРЫЙ", "їжак", "ґанок",
];

#[rustfmt::skip]
const CJK: &[&str] = &[
    "東京タワー", "北京欢迎你", "こんにちは世界", "한국어 텍스트", "ｶﾀｶﾅ", "ﾊﾟﾝ", "ｶﾞｷﾞｸﾞ", "日本語の文章です。", "中文，标点！",
    "漢字かな交じり文", "ＡＢＣ１２３", "（括弧）", "『引用』", "ｈｔｔｐ：／／ｅｘａｍｐｌｅ", "〜", "・", "ー", "〇", "가나다라", "ㄱㄴㄷ", "ﾟ",
    "ｧ",
];

#[rustfmt::skip]
const EMOJI: &[&str] = &[
    "😀", "🐱", "👍🏽", "👨\u{200d}👩\u{200d}👧\u{200d}👦", "🇫🇷", "🏳\u{fe0f}\u{200d}🌈", "❤\u{fe0f}", "✔",
    "🚀🚀🚀", "☕", "🤖", "🧑🏿\u{200d}💻", "©", "®", "™", "½", "²", "€", "£", "¥", "°", "µ", "♥", "★", "→",
    "∞", "≠", "√", "π",
];

const QUOTES: &[&str] =
    &["“", "”", "‘", "’", "‚", "„", "‛", "‟", "«", "»", "ʼ", "′", "″", "\"", "'", "`", "´"];

#[rustfmt::skip]
const CONTRACTIONS: &[&str] = &[
    "it's", "don't", "we're", "they've", "I'm", "we'll", "he'd", "IT'S", "DON'T", "WE'RE",
    "THEY'VE", "I'M", "WE'LL", "HE'D", "rock'n'roll", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
    "o'clock", "y'all", "'tis", "Jones'", "it’s", "can’t", "we‘re", "'''s", "''t", "l'été", "'ſ",
    "n't", "'S'", "isn'T",
];

#[rustfmt::skip]
const PUNCTUATION: &[&str] = &[
    "...", "!!!", "?!", "--", "—", "–", "()", "[]", "{}", "<>", "@#$%^&*", ":-)", ";)",
    "¯\\_(ツ)_/¯", "•", "§", "¶", "#hashtag", "@user", "http://example.com/a?b=c&d=e", "foo@bar.com",
    "C++", "C#", "$9.99", "50%", "1/2", "3:45pm", "#1", "~~~", "___", "***", "|", "\\", "^_^", "<3",
    ">>>", "=>", "!=", "&&", "||", "¿Qué?", "¡Hola!", "…", "‽",
];

#[rustfmt::skip]
const NUMBERS: &[&str] = &[
    "0", "7", "42", "2024", "3.14159", "1,000,000", "2024-01-15", "+1 (555) 123-4567", "1e10",
    "٣٤٥", "Ⅻ", "①②③", "¹²³", "¼", "0x1F", "v2.0.1", "100km/h", "-273.15°C", "१२३", "፩", "𝟙𝟚𝟛", "٫",
    "12th", "1st", "2nd",
];

#[rustfmt::skip]
const ENTITIES: &[&str] = &[
    "&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&eacute;", "&EACUTE;",
    "&amp;amp;", "&amp;lt;", "&amp;quot;", "&rsquo;", "&ldquo;", "&rdquo;", "&hellip;", "&mdash;",
    "&copy;", "&#8217;", "&#x2019;", "&#128;", "&#150;", "&#0;", "&#1;", "&#x110000;", "&#xD800;",
    "&#65", "&amp", "&notit;", "&ampx", "&unknown;", "&;", "& ", "&#;", "&#x3B;", "&#59;",
    "&SZLIG;", "&NTILDE;", "&nTILDE;", "&Jscr;", "&checkmark;", "&fflig;", "&#12288;", "&#x2028;",
    "&#9;", "&#10;", "&#13;", "&#xFEFF;", "&#xFF21;", "&#769;", "&lt;b&gt;", "&AMP;", "&LT;",
    "&Amp;", "&#X41;", "&#00065;", "&#99999999999;", "&#x1F600;", "&eacute", "&Eacute;", "&AElig",
    "&frac12;", "&frac12", "&sup2;", "&times;", "&divide;", "&euro;", "&pound;", "&deg;", "&micro;",
    "&alpha;", "&ALPHA;", "&Sigma;", "&lsquo;&rsquo;", "&amp;#39;", "&amp;amp;amp;", "&#x26;amp;",
    "&#38;#38;", "&#xa0;", "&#x85;", "&#28;",
];

#[rustfmt::skip]
const SEPARATORS: &[&str] = &[
    " ", "  ", "\t", "\n", "\r\n", "\r", "\u{a0}", "\u{3000}", "\u{2028}", "\u{2029}", "\u{2003}",
    "\u{200b}", " \t\n ", "\u{c}", "\u{b}", "\u{1c}", "\u{2009}", "\u{202f}", "\u{205f}",
];

#[rustfmt::skip]
const SPECIALS: &[&str] = &[
    "<start_of_text>", "<end_of_text>", "<|endoftext|>", "<START_OF_TEXT>", "<ſtart_of_text>",
    "a<end_of_text>b", "</w>", "hello</w>", "<start_of_text><end_of_text>",
];

#[rustfmt::skip]
const ODD_CHARACTERS: &[&str] = &[
    "\u{0}", "\u{7}", "\u{1b}[31m", "\u{1b}[0m", "\u{1b}[1;32m", "\u{1b}[", "\u{feff}", "\u{200d}",
    "\u{206a}", "\u{fffc}", "\u{fffd}", "\u{7f}", "e\u{301}", "x\u{345}", "a\u{308}", "ﬁ", "ﬂ", "ﬃ",
    "ﬄ", "ﬀ", "ﬆ", "ﬅ", "ŉ", "Ǆ", "ǅ", "ǆ", "Ĳ", "ĳ", "ǈ", "Ǌ", "\u{1d173}", "\u{e0067}",
    "\u{202e}", "\u{200f}", "Å", "Å", "Ω", "ᾳ", "ᾼ", "ﬁ\u{301}", "\u{3099}", "か\u{3099}",
];

/// The most common separator between words: mostly a space.
fn separator(rng: &mut SplitMix64) -> &'static str {
    if rng.chance(85) {
        " "
    } else {
        rng.pick(SEPARATORS)
    }
}

fn words_from(rng: &mut SplitMix64, pools: &[&[&'static str]], count: usize) -> String {
    let mut text = String::new();
    for i in 0..count {
        if i > 0 {
            text.push_str(separator(rng));
        }
        let pool = pools[rng.index(pools.len())];
        text.push_str(rng.pick(pool));
    }
    text
}

fn ascii_caption(rng: &mut SplitMix64) -> String {
    let count = rng.between(1, 15);
    let mut text = String::new();
    for i in 0..count {
        if i > 0 {
            text.push(' ');
        }
        let word = rng.pick(WORDS);
        match rng.index(6) {
            0 => text.push_str(&word.to_uppercase()),
            1 => {
                let mut chars = word.chars();
                if let Some(first) = chars.next() {
                    text.extend(first.to_uppercase());
                    text.push_str(chars.as_str());
                }
            }
            _ => text.push_str(word),
        }
        if rng.chance(15) {
            text.push_str(rng.pick(&[",", ".", "!", "?", ";", ":", "'s", "-", "/"]));
        }
    }
    if rng.chance(50) {
        text.push_str(rng.pick(&[".", "!", "?", "...", " .", "!!"]));
    }
    text
}

fn punctuation_run(rng: &mut SplitMix64) -> String {
    const ASCII_PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
    let chars: Vec<char> = ASCII_PUNCTUATION.chars().collect();
    let mut text = String::new();
    for _ in 0..rng.between(1, 4) {
        for _ in 0..rng.between(1, 20) {
            text.push(chars[rng.index(chars.len())]);
        }
        if rng.chance(50) {
            text.push(' ');
            text.push_str(rng.pick(WORDS));
        }
        text.push_str(separator(rng));
    }
    text
}

fn long_text(rng: &mut SplitMix64, words: usize) -> String {
    words_from(rng, &[WORDS, WORDS, WORDS, PUNCTUATION, NUMBERS, ACCENTED], words)
}

/// The whole corpus: every kind of well-formed text (no mojibake) that open_clip's cleaning and
/// split must agree on.
fn corpus() -> Vec<String> {
    let mut rng = SplitMix64::from_state(0x5EED_CAFE_F00D_0001);
    let mut texts: Vec<String> = vec![
        String::new(),
        " ".into(),
        "\n".into(),
        "\t\t".into(),
        "&".into(),
        "<".into(),
        "a".into(),
        "A".into(),
        "'".into(),
        "x".repeat(500),
        "ab".repeat(300),
        "ha".repeat(40),
        "1234567890".repeat(20),
        "!".repeat(200),
        "a photo of a cat".into(),
        "A Photo Of A Cat.".into(),
        "<b>bold</b> &amp; &rsquo;".into(),
        "first line &amp;\n<second> line &amp;\nthird &rsquo;".into(),
        "plain &rsquo;\nthen < here\nthen &rsquo; again".into(),
    ];
    for group in [SPECIALS, ODD_CHARACTERS, ENTITIES, CONTRACTIONS, QUOTES, PUNCTUATION, NUMBERS, EMOJI, CJK]
    {
        texts.extend(group.iter().map(|s| s.to_string()));
    }
    for _ in 0..300 {
        texts.push(ascii_caption(&mut rng));
    }
    for _ in 0..80 {
        texts.push(punctuation_run(&mut rng));
    }
    for _ in 0..80 {
        let count = rng.between(1, 8);
        texts.push(words_from(&mut rng, &[NUMBERS, WORDS], count));
    }
    for _ in 0..120 {
        let count = rng.between(1, 12);
        texts.push(words_from(&mut rng, &[ACCENTED, GREEK_CYRILLIC, WORDS], count));
    }
    for _ in 0..80 {
        let count = rng.between(1, 8);
        texts.push(words_from(&mut rng, &[CJK, EMOJI, WORDS], count));
    }
    for _ in 0..80 {
        let count = rng.between(1, 10);
        texts.push(words_from(&mut rng, &[QUOTES, CONTRACTIONS, WORDS], count));
    }
    for _ in 0..120 {
        let count = rng.between(1, 10);
        texts.push(words_from(&mut rng, &[ENTITIES, WORDS, ACCENTED], count));
    }
    for _ in 0..80 {
        let mut text = String::new();
        for _ in 0..rng.between(1, 8) {
            text.push_str(rng.pick(SEPARATORS));
            text.push_str(rng.pick(WORDS));
        }
        text.push_str(rng.pick(SEPARATORS));
        texts.push(text);
    }
    for _ in 0..60 {
        texts.push(ascii_caption(&mut rng).to_uppercase());
        let count = rng.between(1, 8);
        texts.push(words_from(&mut rng, &[ACCENTED, GREEK_CYRILLIC], count).to_uppercase());
    }
    for _ in 0..40 {
        let count = rng.between(60, 250);
        texts.push(long_text(&mut rng, count));
    }
    texts.push(long_text(&mut rng, 5000));
    texts.push(ENTITIES.concat().repeat(3));
    // Everything mixed: the cleaning steps must agree on each other's output too.
    let all: &[&[&str]] = &[
        WORDS,
        ACCENTED,
        GREEK_CYRILLIC,
        CJK,
        EMOJI,
        QUOTES,
        CONTRACTIONS,
        PUNCTUATION,
        NUMBERS,
        ENTITIES,
        SPECIALS,
        ODD_CHARACTERS,
    ];
    for _ in 0..250 {
        let count = rng.between(1, 20);
        let mut text = String::new();
        for _ in 0..count {
            let pool = all[rng.index(all.len())];
            text.push_str(rng.pick(pool));
            if rng.chance(60) {
                text.push_str(separator(&mut rng));
            }
        }
        texts.push(text);
    }
    texts.extend(entity_texts());
    texts
}

/// Every HTML5 entity name, as written and in capitals, a few per text. Each sits between
/// letters: a lone "Â " (from `&ACIRC; `) reads to ftfy as mojibake of a no-break space, and
/// mojibake repair is the part of ftfy that `ClipBpe` leaves out.
fn entity_texts() -> Vec<String> {
    let table = workspace_root().join("worker/assets/html5_entities.tsv");
    let table = std::fs::read_to_string(&table).unwrap_or_else(|e| panic!("{}: {e}", table.display()));
    let names: Vec<&str> = table.lines().filter_map(|line| line.split('\t').next()).collect();
    let mut texts = Vec::new();
    for chunk in names.chunks(6) {
        let written: Vec<String> = chunk.iter().map(|name| format!("x&{name}y")).collect();
        texts.push(written.join(" "));
        let capitals: Vec<String> = chunk.iter().map(|name| format!("x&{}y", name.to_uppercase())).collect();
        texts.push(capitals.join(" "));
    }
    texts
}

/// open_clip's ids for each job `(context_length, texts)`.
fn open_clip_ids(jobs: &[(usize, &[String])]) -> Vec<Vec<Vec<i64>>> {
    let dir = tempfile::tempdir().expect("temp dir");
    let jobs_path = dir.path().join("jobs.json");
    let jobs_json: Vec<serde_json::Value> = jobs
        .iter()
        .map(|(context_length, texts)| serde_json::json!({"context_length": context_length, "texts": texts}))
        .collect();
    std::fs::write(&jobs_path, serde_json::to_vec(&jobs_json).unwrap()).expect("write jobs");

    let script = workspace_root().join("tests/python/clip_tokenize.py");
    let stdout = python(&[script.to_str().expect("UTF-8 path"), jobs_path.to_str().expect("UTF-8 path")]);
    let ids: Vec<Vec<Vec<i64>>> = serde_json::from_str(&stdout).expect("open_clip ids as JSON");
    assert_eq!(ids.len(), jobs.len());
    for (rows, (_, texts)) in ids.iter().zip(jobs) {
        assert_eq!(rows.len(), texts.len());
    }
    ids
}

/// Compares braid's ids with open_clip's; returns a description of every mismatch.
fn compare(bpe: &ClipBpe, context_length: usize, texts: &[String], expected: &[Vec<i64>]) -> Vec<String> {
    let mut mismatches = Vec::new();
    for (text, expected) in texts.iter().zip(expected) {
        let encoded = bpe.encode(text, context_length);
        let eot_ok = expected.get(encoded.eot_index) == Some(&i64::from(ClipBpe::EOT))
            && expected[encoded.eot_index + 1..].iter().all(|&id| id == 0);
        if encoded.ids != *expected || !eot_ok {
            let trim = |ids: &[i64]| -> Vec<i64> {
                let end = ids.iter().rposition(|&id| id != 0).map_or(0, |i| i + 1);
                ids[..end].to_vec()
            };
            mismatches.push(format!(
                "context {context_length}, text {text:?}\n  open_clip: {:?}\n  braid:     {:?} (eot_index {})",
                trim(expected),
                trim(&encoded.ids),
                encoded.eot_index
            ));
        }
    }
    mismatches
}

fn assert_no_mismatches(mismatches: &[String], compared: usize) {
    if !mismatches.is_empty() {
        for mismatch in mismatches.iter().take(30) {
            eprintln!("{mismatch}");
        }
        panic!("{} of {compared} texts differ from open_clip", mismatches.len());
    }
}

#[test]
fn clip_bpe_matches_open_clip_at_context_77() {
    let texts = corpus();
    assert!(texts.len() >= 1000, "corpus has {} texts", texts.len());
    let expected = open_clip_ids(&[(77, &texts)]);
    let bpe = ClipBpe::new();
    let mismatches = compare(&bpe, 77, &texts, &expected[0]);
    eprintln!("compared {} texts at context 77", texts.len());
    assert_no_mismatches(&mismatches, texts.len());
}

#[test]
fn clip_bpe_matches_open_clip_at_other_context_lengths() {
    let texts: Vec<String> = corpus().into_iter().step_by(7).collect();
    let context_lengths = [1, 2, 3, 8, 16, 32, 64, 100, 248];
    let jobs: Vec<(usize, &[String])> = context_lengths.iter().map(|&n| (n, texts.as_slice())).collect();
    let expected = open_clip_ids(&jobs);
    let bpe = ClipBpe::new();
    let mut mismatches = Vec::new();
    for (&context_length, expected) in context_lengths.iter().zip(&expected) {
        mismatches.extend(compare(&bpe, context_length, &texts, expected));
    }
    eprintln!("compared {} texts at context lengths {context_lengths:?}", texts.len());
    assert_no_mismatches(&mismatches, texts.len() * context_lengths.len());
}
