//! A small YAML writer for the manifests `braid deploy` renders: block style, keys in the
//! order of the JSON map (sorted, as `kubectl get -o yaml` prints them), multi-line text as
//! literal blocks (`|`), and every string that YAML 1.1 or 1.2 could read as anything but
//! that string (`yes`, `0.0.0.0:7070`, `null`, `- x`, ...) double-quoted.

use serde_json::Value;

/// The YAML text of `value`, ending with a newline. A scalar or an empty collection at the top
/// level is written on one line.
pub fn to_string(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => write_map(&mut out, map, 0),
        Value::Array(items) if !items.is_empty() => write_seq(&mut out, items, 0),
        scalar => {
            out.push_str(&inline(scalar, 0));
            out.push('\n');
        }
    }
    out
}

fn write_map(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize) {
    for (key, value) in map {
        out.push_str(&" ".repeat(indent));
        out.push_str(&scalar_string(key));
        out.push(':');
        write_value_after_key(out, value, indent);
    }
}

/// Writes what follows `key:` (or `-`) at `indent`: a scalar on the same line, or a nested
/// collection on the next lines.
fn write_value_after_key(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            write_map(out, map, indent + 2);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            write_seq(out, items, indent + 2);
        }
        scalar => {
            out.push(' ');
            out.push_str(&inline(scalar, indent + 2));
            out.push('\n');
        }
    }
}

fn write_seq(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        out.push_str(&" ".repeat(indent));
        match item {
            // `- key: value` with the map's other keys aligned under the first.
            Value::Object(map) if !map.is_empty() => {
                out.push_str("- ");
                let mut first = true;
                for (key, value) in map {
                    if !first {
                        out.push_str(&" ".repeat(indent + 2));
                    }
                    first = false;
                    out.push_str(&scalar_string(key));
                    out.push(':');
                    write_value_after_key(out, value, indent + 2);
                }
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push_str("-\n");
                write_seq(out, inner, indent + 2);
            }
            scalar => {
                out.push_str("- ");
                out.push_str(&inline(scalar, indent + 2));
                out.push('\n');
            }
        }
    }
}

/// A scalar or empty collection as it appears after `key: `; multi-line strings become a
/// literal block whose lines are indented by `block_indent`.
fn inline(value: &Value, block_indent: usize) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => match literal_block(s, block_indent) {
            Some(block) => block,
            None => scalar_string(s),
        },
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// `s` as a literal block (`|` or `|-`), when it has several lines of printable ASCII, the first
/// line starts with a visible character, no line ends with blanks, and at most one newline ends it.
fn literal_block(s: &str, indent: usize) -> Option<String> {
    let body = s.strip_suffix('\n').unwrap_or(s);
    let printable = |c: char| c == '\t' || c == '\n' || (' '..='~').contains(&c);
    let fits = body.contains('\n')
        && !body.ends_with('\n')
        && body.starts_with(|c: char| c.is_ascii_graphic())
        && s.chars().all(printable)
        && body.split('\n').all(|line| !line.ends_with([' ', '\t']));
    if !fits {
        return None;
    }
    let mut block = String::from(if s.ends_with('\n') { "|" } else { "|-" });
    for line in body.split('\n') {
        block.push('\n');
        if !line.is_empty() {
            block.push_str(&" ".repeat(indent));
            block.push_str(line);
        }
    }
    Some(block)
}

/// Words YAML 1.1 reads as booleans or null when unquoted.
const RESERVED_WORDS: &[&str] = &["y", "n", "yes", "no", "true", "false", "on", "off", "null"];

/// `s` as a one-line scalar: plain when it can only be read as that string, else double-quoted.
fn scalar_string(s: &str) -> String {
    // Command-line flags (`-x`, `--flag`) stay plain; `-1`, `- x` and `---` do not.
    let head = s.strip_prefix("--").or_else(|| s.strip_prefix('-')).unwrap_or(s);
    let plain = head.starts_with(|c: char| c.is_ascii_alphabetic() || (c == '/' && head.len() == s.len()))
        && !s.ends_with(':')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "._/-:".contains(c))
        && !RESERVED_WORDS.contains(&s.to_ascii_lowercase().as_str());
    if plain {
        return s.to_string();
    }
    let mut quoted = String::with_capacity(s.len() + 2);
    quoted.push('"');
    for c in s.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            '\r' => quoted.push_str("\\r"),
            ' '..='~' => quoted.push(c),
            c if (c as u32) <= 0xFFFF => quoted.push_str(&format!("\\u{:04X}", c as u32)),
            c => quoted.push_str(&format!("\\U{:08X}", c as u32)),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_maps_and_sequences_are_block_style() {
        let value = json!({
            "kind": "Pod",
            "spec": {"containers": [{"name": "a", "args": ["--x", "1"], "ports": [{"containerPort": 7070}]}]},
            "empty": {}, "none": [], "list": [[1, 2], "b"]
        });
        let expected = "\
empty: {}
kind: Pod
list:
  -
    - 1
    - 2
  - b
none: []
spec:
  containers:
    - args:
        - --x
        - \"1\"
      name: a
      ports:
        - containerPort: 7070
";
        assert_eq!(to_string(&value), expected);
    }

    #[test]
    fn ambiguous_strings_are_quoted() {
        let cases = [
            ("braid", "braid"),
            ("app.kubernetes.io/name", "app.kubernetes.io/name"),
            ("braid-worker:0.1.0", "braid-worker:0.1.0"),
            ("/metrics", "/metrics"),
            ("yes", "\"yes\""),
            ("On", "\"On\""),
            ("null", "\"null\""),
            ("7070", "\"7070\""),
            ("0.0.0.0:7070", "\"0.0.0.0:7070\""),
            ("1e3", "\"1e3\""),
            ("", "\"\""),
            ("a b", "\"a b\""),
            ("key:", "\"key:\""),
            ("- x", "\"- x\""),
            ("--job", "--job"),
            ("-v", "-v"),
            ("-1", "\"-1\""),
            ("---", "\"---\""),
            ("---x", "\"---x\""),
            ("-/x", "\"-/x\""),
            ("say \"hi\"\\", "\"say \\\"hi\\\"\\\\\""),
            ("caf\u{e9}", "\"caf\\u00E9\""),
        ];
        for (s, expected) in cases {
            assert_eq!(scalar_string(s), expected, "{s:?}");
        }
    }

    #[test]
    fn multi_line_text_is_a_literal_block() {
        let value = json!({"data": {"job.toml": "[job]\nname = \"x\"\n\n[train]\nsteps = 1\n", "script": "a\nb"}});
        let expected = "data:\n  job.toml: |\n    [job]\n    name = \"x\"\n\n    [train]\n    steps = 1\n  script: |-\n    a\n    b\n";
        assert_eq!(to_string(&value), expected);
    }

    #[test]
    fn text_a_block_cannot_hold_is_quoted() {
        assert_eq!(to_string(&json!({"t": " lead\nx\n"})), "t: \" lead\\nx\\n\"\n");
        assert_eq!(to_string(&json!({"t": "two\nnewlines\n\n"})), "t: \"two\\nnewlines\\n\\n\"\n");
        assert_eq!(to_string(&json!({"t": "cr\r\nlf"})), "t: \"cr\\r\\nlf\"\n");
        assert_eq!(to_string(&json!({"t": "trailing \nblank"})), "t: \"trailing \\nblank\"\n");
    }

    #[test]
    fn scalars_keep_their_types() {
        let value = json!({"b": true, "f": 0.5, "i": -3, "n": null, "z": null});
        assert_eq!(to_string(&value), "b: true\nf: 0.5\ni: -3\n\"n\": null\nz: null\n", "a key `n` is a YAML 1.1 boolean");
    }
}
