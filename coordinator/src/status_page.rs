//! The coordinator's status page: `GET /` renders the job's [`Progress`] as one self-contained
//! HTML page (inline CSS, charts as inline SVG, no script and nothing fetched from elsewhere)
//! that reloads itself every [`REFRESH_SECONDS`].
//!
//! Every string that comes from the job (its name, worker ids, hostnames, reasons, URLs) goes
//! through [`escape`].

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::state::{MemberProgress, MemberState, Progress, StepPoint};

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/html; charset=utf-8";

/// Seconds between the page's reloads.
pub const REFRESH_SECONDS: u32 = 5;

/// Colours of a chart's lines, in order (the first is the total loss's).
const PALETTE: [&str; 8] = ["#1f6feb", "#d1495b", "#2a9d8f", "#e9a03b", "#7b5ea7", "#5c946e", "#c06c84", "#6c757d"];

/// Width and height of a chart's SVG, in SVG units.
const CHART_SIZE: (f64, f64) = (640.0, 240.0);

/// Where a chart's lines are drawn inside its SVG: the rest holds the tick labels.
const PLOT: Plot = Plot { left: 64.0, top: 12.0, width: 560.0, height: 196.0 };

const STYLE: &str = "
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0; background: #f5f6f8; color: #1d2433; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; }
.state { display: inline-block; padding: 2px 10px; border-radius: 12px; font-weight: 600; color: #fff; }
.state.training { background: #2a9d8f; } .state.waiting { background: #e9a03b; } .state.finished { background: #1f6feb; }
.state.failed { background: #d1495b; } .state.preempted { background: #7b5ea7; }
.bar { height: 14px; background: #e1e4ea; border-radius: 7px; overflow: hidden; margin: 10px 0 4px; }
.bar > div { height: 100%; background: #1f6feb; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 8px; margin: 14px 0 0; }
.facts div { background: #fff; border: 1px solid #e1e4ea; border-radius: 6px; padding: 8px 10px; }
.facts dt { font-size: 12px; color: #5b6475; } .facts dd { margin: 0; font-size: 17px; font-weight: 600; font-variant-numeric: tabular-nums; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 12px; }
figure { margin: 0; background: #fff; border: 1px solid #e1e4ea; border-radius: 6px; padding: 8px 10px; }
figcaption { font-weight: 600; }
svg { width: 100%; height: auto; display: block; }
svg text { font: 12px system-ui, sans-serif; fill: #5b6475; }
svg .axis { stroke: #9aa3b2; stroke-width: 1; } svg .grid { stroke: #eceef2; stroke-width: 1; }
svg .series { fill: none; stroke-width: 1.8; stroke-linejoin: round; stroke-linecap: round; }
svg .empty { font-size: 15px; }
.legend { list-style: none; padding: 0; margin: 4px 0 0; display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; }
.legend span { display: inline-block; width: 14px; height: 3px; margin-right: 5px; vertical-align: middle; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid #e1e4ea; }
th, td { text-align: left; padding: 5px 9px; border-bottom: 1px solid #eceef2; vertical-align: top; }
th { font-size: 12px; color: #5b6475; font-weight: 600; background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.straggler td { background: #fdecea; } .flag { color: #b3261e; font-weight: 600; }
code { font-size: 12px; word-break: break-all; }
.muted { color: #5b6475; }
";

/// `text` with `&`, `<`, `>`, `"` and `'` replaced by character references, safe in element
/// content and in quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The job's status page: a complete HTML document.
pub fn render(progress: &Progress) -> String {
    let p = progress;
    let job = escape(&p.job);
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>braid: {job}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
    );
    let (class, state) = job_state(p);
    let _ = writeln!(out, "<h1>{job}</h1>\n<p><span class=\"state {class}\" id=\"state\">{class}</span> {}</p>", escape(&state));
    let percent = if p.total_steps == 0 { 0.0 } else { 100.0 * p.steps_done as f64 / p.total_steps as f64 };
    let _ = writeln!(
        out,
        "<div class=\"bar\"><div style=\"width: {percent:.1}%\"></div></div>\n<p class=\"muted\">step {} of {} ({percent:.1}%)</p>",
        p.steps_done, p.total_steps
    );
    out.push_str(&facts(p));
    out.push_str("<h2>Training</h2>\n<div class=\"charts\">\n");
    out.push_str(&chart("loss-chart", "Loss", &loss_lines(&p.recent_steps)));
    let throughput = Line::of("samples/s", PALETTE[0], &p.recent_steps, |s| s.samples_per_second);
    out.push_str(&chart("throughput-chart", "Throughput (samples/s)", &[throughput]));
    let lr = Line::of("learning rate", PALETTE[0], &p.recent_steps, |s| Some(s.learning_rate));
    out.push_str(&chart("lr-chart", "Learning rate", &[lr]));
    out.push_str("</div>\n");
    out.push_str(&members(&p.members));
    out.push_str(&generations(p));
    out.push_str(&checkpoints(p));
    let _ = writeln!(out, "<p class=\"muted\">This page reloads every {REFRESH_SECONDS} s. JSON: <a href=\"/status\">/status</a>, Prometheus: <a href=\"/metrics\">/metrics</a>.</p>");
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

/// The job's state as a word (also the badge's CSS class) and a sentence about it.
fn job_state(p: &Progress) -> (&'static str, String) {
    if p.finished {
        ("finished", format!("trained all {} steps; the final checkpoint is committed", p.total_steps))
    } else if let Some(failure) = &p.failure {
        ("failed", failure.clone())
    } else if let Some(step) = p.preempted_after {
        ("preempted", format!("stopped after the checkpoint of step {step}"))
    } else if p.world_size == 0 {
        ("waiting", p.waiting_reason.clone().unwrap_or_else(|| "no generation is formed yet".into()))
    } else {
        ("training", format!("generation {} with {} worker(s)", p.generation, p.world_size))
    }
}

/// The latest numbers and the job's counters, as a grid of labelled values.
fn facts(p: &Progress) -> String {
    let optional = |v: Option<f64>| v.map_or_else(|| "-".to_string(), number);
    let mut facts = vec![
        ("loss", optional(p.loss)),
        ("learning rate", optional(p.learning_rate)),
        ("grad norm", optional(p.grad_norm)),
        ("samples/s", optional(p.samples_per_second)),
        ("data wait", p.data_wait_seconds.map_or_else(|| "-".to_string(), seconds)),
    ];
    facts.extend(p.loss_terms.iter().map(|(term, value)| (term.as_str(), number(*value))));
    facts.extend([
        ("generation", format!("{} ({} formed)", p.generation, p.generations)),
        ("world size", p.world_size.to_string()),
        ("rejoins", p.rejoins.to_string()),
        ("replica checks", format!("{} ({} drifted)", p.replica_checks, p.replica_drifts)),
        ("corrupt samples", p.corrupt_samples.to_string()),
        ("checkpoints committed", p.checkpoints_committed.to_string()),
    ]);
    let mut out = String::from("<dl class=\"facts\">\n");
    for (label, value) in facts {
        let _ = writeln!(out, "<div><dt>{}</dt><dd>{}</dd></div>", escape(label), escape(&value));
    }
    out.push_str("</dl>\n");
    out
}

/// The members table; stragglers' rows are highlighted.
fn members(members: &[MemberProgress]) -> String {
    let mut out = String::from(
        "<h2>Members</h2>\n<table id=\"members\">\n<tr><th>worker</th><th>host</th><th>device</th><th>rank</th><th>state</th>\
         <th>last step</th><th>held step</th><th>step time</th><th>collective wait</th><th>data wait</th><th>GPU memory</th>\
         <th>straggler</th></tr>\n",
    );
    if members.is_empty() {
        out.push_str("<tr><td colspan=\"12\" class=\"muted\">no worker has joined yet</td></tr>\n");
    }
    for m in members {
        let state = match m.state {
            MemberState::Joined => "joined",
            MemberState::Waiting => "waiting",
            MemberState::Training => "training",
            MemberState::RendezvousRequired => "rendezvous required",
        };
        let step = |s: Option<u64>| s.map_or_else(|| "-".to_string(), |s| s.to_string());
        let time = |s: Option<f64>| s.map_or_else(|| "-".to_string(), seconds);
        let _ = writeln!(
            out,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td class=\"num rank\">{}</td><td>{state}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            if m.straggler { " class=\"straggler\"" } else { "" },
            escape(&m.worker_id),
            escape(&m.hostname),
            if m.device.is_empty() { "-".to_string() } else { escape(&m.device) },
            m.rank.map_or_else(|| "-".to_string(), |r| r.to_string()),
            step(m.last_step),
            step(m.held_step),
            time(m.step_seconds),
            time(m.collective_wait_seconds),
            time(m.data_wait_seconds),
            escape(&device_memory(m.device_memory_bytes, m.device_memory_peak_bytes)),
            if m.straggler { "<span class=\"flag\">straggler</span>" } else { "" },
        );
    }
    out.push_str("</table>\n");
    out
}

/// The generation history, newest first.
fn generations(p: &Progress) -> String {
    let mut out = String::from(
        "<h2>Generations</h2>\n<table id=\"generations\">\n<tr><th>generation</th><th>world size</th><th>start step</th>\
         <th>state from</th><th>formed because</th><th>ended because</th></tr>\n",
    );
    if p.generation_history.is_empty() {
        out.push_str("<tr><td colspan=\"6\" class=\"muted\">none formed yet</td></tr>\n");
    }
    for g in p.generation_history.iter().rev() {
        let ended = match &g.ended {
            Some(why) => escape(why),
            None if g.number == p.generation => "<span class=\"muted\">live</span>".to_string(),
            None => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{ended}</td></tr>",
            g.number,
            g.world_size,
            g.start_step,
            escape(&g.source),
            escape(&g.formed),
        );
    }
    out.push_str("</table>\n");
    out
}

/// The committed checkpoints, newest first, and what the last one cost.
fn checkpoints(p: &Progress) -> String {
    let mut out = String::from("<h2>Checkpoints</h2>\n");
    if let Some(cost) = p.last_checkpoint {
        let _ = writeln!(
            out,
            "<p id=\"checkpoint-cost\">The last checkpoint committed here (step {}) wrote {} in {}.</p>",
            cost.step,
            bytes(cost.bytes),
            seconds(cost.seconds)
        );
    }
    out.push_str("<table id=\"checkpoints\">\n<tr><th>step</th><th>generation</th><th>attempt</th><th>manifest</th></tr>\n");
    if p.checkpoints.is_empty() {
        out.push_str("<tr><td colspan=\"4\" class=\"muted\">none committed yet</td></tr>\n");
    }
    for c in p.checkpoints.iter().rev() {
        let _ = writeln!(
            out,
            "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
            c.step,
            c.generation,
            escape(&c.attempt),
            escape(&c.manifest_url)
        );
    }
    out.push_str("</table>\n");
    out
}

/// One line of a chart: its name in the legend, its colour, its `(step, value)` points.
#[derive(Debug, Clone)]
struct Line {
    name: String,
    colour: &'static str,
    points: Vec<(f64, f64)>,
}

impl Line {
    /// The line of `value` over `steps`; steps without a value are left out.
    fn of(name: &str, colour: &'static str, steps: &[StepPoint], value: impl Fn(&StepPoint) -> Option<f64>) -> Self {
        let points = steps.iter().filter_map(|s| value(s).map(|v| (s.step as f64, v))).collect();
        Self { name: name.to_string(), colour, points }
    }
}

/// The loss and one line per loss term any of `steps` reported.
fn loss_lines(steps: &[StepPoint]) -> Vec<Line> {
    let terms: BTreeSet<&String> = steps.iter().flat_map(|s| s.loss_terms.keys()).collect();
    let mut lines = vec![Line::of("loss", PALETTE[0], steps, |s| Some(s.loss))];
    for (i, term) in terms.into_iter().enumerate() {
        lines.push(Line::of(term, PALETTE[(i + 1) % PALETTE.len()], steps, |s| s.loss_terms.get(term).copied()));
    }
    lines
}

/// The area a chart's lines are drawn in, in SVG units.
#[derive(Debug, Clone, Copy)]
struct Plot {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
}

/// The values an axis spans, `min` at one end and `max` at the other.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Span {
    min: f64,
    max: f64,
}

impl Span {
    /// The range of the finite `values`, widened around the value when they are all equal;
    /// `None` when there is none.
    fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let (min, max) = values
            .into_iter()
            .filter(|v| v.is_finite())
            .fold(None, |range: Option<(f64, f64)>, v| Some(range.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v)))))?;
        if min < max {
            return Some(Self { min, max });
        }
        let half = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
        Some(Self { min: min - half, max: max + half })
    }

    /// Where `v` falls: 0 at `min`, 1 at `max`.
    fn fraction(self, v: f64) -> f64 {
        (v - self.min) / (self.max - self.min)
    }
}

/// SVG path data through `points` scaled into `plot`: x from `xs.min` at its left edge to
/// `xs.max` at its right, y from `ys.min` at its bottom to `ys.max` at its top. Points with a
/// non-finite coordinate are skipped; a lone point is a zero-length segment, which the round line
/// cap draws as a dot. `None` when no point is left.
fn path_data(points: &[(f64, f64)], xs: Span, ys: Span, plot: Plot) -> Option<String> {
    let mut d = String::new();
    let mut drawn = 0;
    for &(x, y) in points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()) {
        let sx = plot.left + xs.fraction(x) * plot.width;
        let sy = plot.top + (1.0 - ys.fraction(y)) * plot.height;
        let _ = write!(d, "{}{sx:.1} {sy:.1}", if drawn == 0 { "M" } else { " L" });
        drawn += 1;
    }
    match drawn {
        0 => None,
        1 => Some(d + " h0"),
        _ => Some(d),
    }
}

/// A chart of `lines` over steps as a `<figure>` with an inline SVG: axes, min and max labels on
/// both, a legend when there are several lines; "no data yet" while no line has a finite point.
fn chart(id: &str, title: &str, lines: &[Line]) -> String {
    let (width, height) = CHART_SIZE;
    let mut out = format!(
        "<figure id=\"{id}\"><figcaption>{}</figcaption>\n<svg viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"{}\">\n",
        escape(title),
        escape(title)
    );
    let all = || lines.iter().flat_map(|l| l.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let Some(ys) = Span::of(all().map(|p| p.1)) else {
        let _ = write!(
            out,
            "<text class=\"empty\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data yet</text>\n</svg></figure>\n",
            width / 2.0,
            height / 2.0
        );
        return out;
    };
    // Steps are whole numbers: a single step starts an axis one step long rather than sitting
    // between fractional labels.
    let first = all().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let last = all().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let xs = Span { min: first, max: last.max(first + 1.0) };
    let (left, top, right, bottom) = (PLOT.left, PLOT.top, PLOT.left + PLOT.width, PLOT.top + PLOT.height);
    let middle = top + PLOT.height / 2.0;
    let _ = writeln!(out, "<line class=\"grid\" x1=\"{left}\" y1=\"{middle}\" x2=\"{right}\" y2=\"{middle}\"/>");
    let _ = writeln!(out, "<line class=\"axis\" x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{bottom}\"/>");
    let _ = writeln!(out, "<line class=\"axis\" x1=\"{left}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\"/>");
    let label = |x: f64, y: f64, anchor: &str, text: &str| {
        format!("<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\">{}</text>\n", escape(text))
    };
    out.push_str(&label(left - 6.0, top + 4.0, "end", &number(ys.max)));
    out.push_str(&label(left - 6.0, bottom, "end", &number(ys.min)));
    out.push_str(&label(left, bottom + 18.0, "start", &format!("{:.0}", xs.min)));
    out.push_str(&label(right, bottom + 18.0, "end", &format!("{:.0}", xs.max)));
    out.push_str(&label(left + PLOT.width / 2.0, bottom + 18.0, "middle", "step"));
    for line in lines {
        if let Some(d) = path_data(&line.points, xs, ys, PLOT) {
            let _ = writeln!(out, "<path class=\"series\" stroke=\"{}\" d=\"{d}\"><title>{}</title></path>", line.colour, escape(&line.name));
        }
    }
    out.push_str("</svg>\n");
    if lines.len() > 1 {
        out.push_str("<ul class=\"legend\">");
        for line in lines {
            let _ = write!(out, "<li><span style=\"background: {}\"></span>{}</li>", line.colour, escape(&line.name));
        }
        out.push_str("</ul>\n");
    }
    out.push_str("</figure>\n");
    out
}

/// A number with about four significant digits; very large and very small ones in exponent form.
fn number(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() || a == 0.0 {
        format!("{v}")
    } else if !(1e-2..1e5).contains(&a) {
        format!("{v:.3e}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

/// Seconds, in milliseconds below one.
fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

/// A rank's GPU memory as `current / peak` in binary units, as the page and `braid status`
/// write it; `-` without either figure (a CPU device).
pub fn device_memory(current: Option<u64>, peak: Option<u64>) -> String {
    if current.is_none() && peak.is_none() {
        return "-".into();
    }
    let figure = |b: Option<u64>| b.map_or_else(|| "-".to_string(), bytes);
    format!("{} / {}", figure(current), figure(peak))
}

/// A byte count in binary units (`1.5 MiB`), as the page and `braid status` write it.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{CheckpointCost, CommittedCheckpoint, GenerationRecord};

    const BOX: Plot = Plot { left: 10.0, top: 20.0, width: 100.0, height: 50.0 };

    fn step(step: u64, loss: f64, terms: &[(&str, f64)]) -> StepPoint {
        StepPoint {
            step,
            generation: 1,
            elapsed_seconds: step as f64,
            loss,
            loss_terms: terms.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            learning_rate: 1e-3,
            grad_norm: 1.0,
            samples_per_second: Some(100.0 + step as f64),
            data_wait_seconds: 0.0,
        }
    }

    fn progress() -> Progress {
        Progress {
            job: "clip <b>".into(),
            generation: 2,
            world_size: 2,
            total_steps: 200,
            steps_done: 50,
            members: vec![
                MemberProgress {
                    worker_id: "w-0".into(),
                    hostname: "<script>alert(1)</script>".into(),
                    device: "cpu".into(),
                    rank: Some(0),
                    last_step: Some(49),
                    state: MemberState::Training,
                    held_step: Some(20),
                    straggler: false,
                    step_seconds: Some(0.25),
                    collective_wait_seconds: Some(0.01),
                    data_wait_seconds: Some(0.002),
                    device_memory_bytes: None,
                    device_memory_peak_bytes: None,
                },
                MemberProgress {
                    worker_id: "w-3".into(),
                    hostname: "node-b".into(),
                    device: "cuda:0".into(),
                    rank: Some(1),
                    last_step: Some(49),
                    state: MemberState::Training,
                    held_step: None,
                    straggler: true,
                    step_seconds: Some(1.5),
                    collective_wait_seconds: None,
                    data_wait_seconds: None,
                    device_memory_bytes: Some(3 << 29),
                    device_memory_peak_bytes: Some(2 << 30),
                },
            ],
            loss: Some(2.5),
            loss_terms: BTreeMap::from([("itc".to_string(), 1.5), ("itm".to_string(), 1.0)]),
            learning_rate: Some(1e-3),
            grad_norm: Some(0.7),
            data_wait_seconds: Some(0.002),
            samples_per_second: Some(150.0),
            checkpoints: vec![CommittedCheckpoint {
                step: 39,
                attempt: "a1".into(),
                generation: 2,
                manifest_url: "file:///ckpt/step-000039/attempt-a1/manifest.json?x=1&y=\"2\"".into(),
            }],
            checkpoints_committed: 1,
            last_checkpoint: Some(CheckpointCost { step: 39, bytes: 3 * 1024 * 1024 / 2, seconds: 0.35 }),
            corrupt_samples: 3,
            finished: false,
            failure: None,
            preempted_after: None,
            waiting_reason: None,
            rejoins: 1,
            generations: 2,
            generation_history: vec![
                GenerationRecord {
                    number: 1,
                    world_size: 1,
                    start_step: 0,
                    source: "fresh".into(),
                    formed: "min_workers reached".into(),
                    ended: Some("w-2 <lost>".into()),
                },
                GenerationRecord { number: 2, world_size: 2, start_step: 20, source: "memory:rank0".into(), formed: "w-3 joined".into(), ended: None },
            ],
            replica_checks: 4,
            replica_drifts: 1,
            recent_steps: (0..50).map(|s| step(s, 3.0 - s as f64 / 50.0, &[("itc", 2.0), ("itm", 1.0)])).collect(),
        }
    }

    #[test]
    fn escape_makes_markup_text() {
        assert_eq!(escape("<script>alert('x' & \"y\")</script>"), "&lt;script&gt;alert(&#39;x&#39; &amp; &quot;y&quot;)&lt;/script&gt;");
        assert_eq!(escape("w-1 on node-a"), "w-1 on node-a");
    }

    #[test]
    fn paths_scale_points_into_the_box() {
        let d = path_data(&[(0.0, 1.0), (5.0, 2.0), (10.0, 3.0)], Span { min: 0.0, max: 10.0 }, Span { min: 1.0, max: 3.0 }, BOX);
        assert_eq!(d.as_deref(), Some("M10.0 70.0 L60.0 45.0 L110.0 20.0"));
    }

    #[test]
    fn paths_skip_non_finite_values_and_are_none_without_points() {
        let (xs, ys) = (Span { min: 0.0, max: 2.0 }, Span { min: 0.0, max: 1.0 });
        let d = path_data(&[(0.0, 0.0), (1.0, f64::NAN), (1.5, f64::INFINITY), (2.0, 1.0)], xs, ys, BOX);
        assert_eq!(d.as_deref(), Some("M10.0 70.0 L110.0 20.0"));
        assert_eq!(path_data(&[], xs, ys, BOX), None);
        assert_eq!(path_data(&[(1.0, f64::NAN), (2.0, f64::NEG_INFINITY)], xs, ys, BOX), None);
    }

    #[test]
    fn a_single_point_is_a_dot() {
        let d = path_data(&[(1.0, 0.5)], Span { min: 0.0, max: 2.0 }, Span { min: 0.0, max: 1.0 }, BOX);
        assert_eq!(d.as_deref(), Some("M60.0 45.0 h0"));
    }

    #[test]
    fn spans_ignore_non_finite_values_and_widen_a_single_value() {
        assert_eq!(Span::of([2.0, f64::NAN, -1.0, f64::INFINITY]), Some(Span { min: -1.0, max: 2.0 }));
        assert_eq!(Span::of([4.0, 4.0]), Some(Span { min: 3.6, max: 4.4 }));
        assert_eq!(Span::of([0.0]), Some(Span { min: -1.0, max: 1.0 }));
        assert_eq!(Span::of([f64::NAN]), None);
        assert_eq!(Span::of([]), None);
    }

    #[test]
    fn an_empty_chart_says_no_data_yet() {
        for lines in [vec![], vec![Line { name: "loss".into(), colour: PALETTE[0], points: vec![(3.0, f64::NAN)] }]] {
            let svg = chart("loss-chart", "Loss", &lines);
            assert!(svg.contains("no data yet") && svg.contains("<svg") && !svg.contains("<path"), "{svg}");
        }
    }

    #[test]
    fn a_chart_of_one_step_has_a_dot_and_whole_step_labels() {
        let line = Line::of("loss", PALETTE[0], &[step(7, 2.0, &[])], |s| Some(s.loss));
        let svg = chart("loss-chart", "Loss", &[line]);
        assert!(svg.contains(" h0\""), "{svg}");
        assert!(svg.contains(">7</text>") && svg.contains(">8</text>") && svg.contains(">2.200</text>"), "{svg}");
    }

    #[test]
    fn the_loss_chart_has_a_line_and_a_legend_entry_per_term() {
        let svg = chart("loss-chart", "Loss", &loss_lines(&progress().recent_steps));
        assert_eq!(svg.matches("<path class=\"series\"").count(), 3, "{svg}");
        for name in ["loss", "itc", "itm"] {
            assert!(svg.contains(&format!("</span>{name}</li>")), "{name}: {svg}");
        }
        assert!(svg.contains(">0</text>") && svg.contains(">49</text>") && svg.contains(">3.000</text>"), "{svg}");
    }

    #[test]
    fn the_page_shows_the_job_and_escapes_its_strings() {
        let page = render(&progress());
        assert!(page.starts_with("<!DOCTYPE html>") && page.ends_with("</html>\n"));
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        assert!(!page.contains("<script") && !page.contains("http://") && !page.contains("https://"), "nothing is fetched or run");
        assert!(page.contains("<h1>clip &lt;b&gt;</h1>"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("w-2 &lt;lost&gt;"));
        assert!(page.contains("manifest.json?x=1&amp;y=&quot;2&quot;"));
        assert!(page.contains(">training</span> generation 2 with 2 worker(s)"));
        assert!(page.contains("step 50 of 200 (25.0%)"));
        assert!(page.contains("<tr class=\"straggler\"><td>w-3</td>"));
        assert!(page.contains("<th>data wait</th><th>GPU memory</th><th>straggler</th>"), "{page}");
        // GPU memory sits between data wait and straggler: current / peak on CUDA, `-` on the CPU.
        assert!(page.contains("<td class=\"num\">-</td><td class=\"num\">1.5 GiB / 2.0 GiB</td><td><span class=\"flag\">"), "{page}");
        assert!(page.contains("<td class=\"num\">2.0 ms</td><td class=\"num\">-</td><td></td></tr>"), "{page}");
        assert!(page.contains("wrote 1.5 MiB in 350.0 ms"));
        for chart in ["loss-chart", "throughput-chart", "lr-chart"] {
            let at = page.find(&format!("<figure id=\"{chart}\"")).unwrap_or_else(|| panic!("no {chart}"));
            let figure = &page[at..at + page[at..].find("</figure>").unwrap()];
            assert!(figure.contains("<path class=\"series\""), "{figure}");
        }
    }

    #[test]
    fn the_state_line_follows_the_job() {
        let mut p = progress();
        p.world_size = 0;
        p.waiting_reason = Some("1 of min_workers = 2 <waiting>".into());
        assert!(render(&p).contains(">waiting</span> 1 of min_workers = 2 &lt;waiting&gt;"));
        p.failure = Some("rank 1 died".into());
        assert!(render(&p).contains(">failed</span> rank 1 died"));
        p.failure = None;
        p.preempted_after = Some(39);
        assert!(render(&p).contains(">preempted</span> stopped after the checkpoint of step 39"));
        p.finished = true;
        assert!(render(&p).contains(">finished</span>"));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(device_memory(Some(512 << 20), Some(3 << 29)), "512.0 MiB / 1.5 GiB");
        assert_eq!(device_memory(Some(2048), None), "2.0 KiB / -");
        assert_eq!(device_memory(None, None), "-");
        assert_eq!(seconds(0.0123), "12.3 ms");
        assert_eq!(seconds(2.5), "2.50 s");
        assert_eq!(number(2.34567), "2.346");
        assert_eq!(number(1e-4), "1.000e-4");
        assert_eq!(number(0.0123), "0.0123");
        assert_eq!(number(1234.56), "1234.6");
        assert_eq!(number(0.0), "0");
    }
}
