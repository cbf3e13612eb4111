//! Prometheus metrics: the coordinator's `GET /metrics` in the text exposition format (0.0.4).
//!
//! Every number comes from the job's [`Progress`]: workers push theirs to the coordinator with
//! each step report, so one scrape of the coordinator covers the whole job and no per-worker
//! scrape configuration is needed. Every series carries a `job_name` label (Prometheus keeps
//! `job` for the scrape job); per-rank series add `rank` and `worker`.

use std::fmt::Write;

use crate::state::Progress;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Kind of a metric family, as `# TYPE` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A count that only grows (while this coordinator runs).
    Counter,
}

/// Labels of one sample beyond `job_name`.
pub type Labels = Vec<(&'static str, String)>;

/// One metric family: its name, kind, help text and samples (none while it has no value yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// Series name (`braid_...`).
    pub name: &'static str,
    /// Gauge or counter.
    pub kind: Kind,
    /// What it measures.
    pub help: &'static str,
    /// Label sets and values.
    pub samples: Vec<(Labels, f64)>,
}

/// Collects the families of one [`Progress`].
struct Families(Vec<Family>);

impl Families {
    /// Adds family `name` with its samples; `None` values are left out.
    fn family(&mut self, name: &'static str, kind: Kind, help: &'static str, samples: impl IntoIterator<Item = (Labels, Option<f64>)>) {
        let samples = samples.into_iter().filter_map(|(labels, value)| value.map(|v| (labels, v))).collect();
        self.0.push(Family { name, kind, help, samples });
    }

    /// A family with one sample and no labels beyond `job_name`.
    fn single(&mut self, name: &'static str, kind: Kind, help: &'static str, value: Option<f64>) {
        self.family(name, kind, help, [(Vec::new(), value)]);
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A sample value as the exposition format writes it.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

fn flag(on: bool) -> Option<f64> {
    Some(if on { 1.0 } else { 0.0 })
}

/// Every metric family of the job, described the same whether or not it has a value yet.
pub fn families(progress: &Progress) -> Vec<Family> {
    use Kind::{Counter, Gauge};
    let mut e = Families(Vec::new());
    let p = progress;
    e.single("braid_step", Gauge, "Global steps completed by every rank of the live generation.", Some(p.steps_done as f64));
    e.single("braid_total_steps", Gauge, "Optimizer steps the job trains (train.steps).", Some(p.total_steps as f64));
    e.single(
        "braid_samples_per_second",
        Gauge,
        "Global-batch samples per second of the latest step.",
        p.samples_per_second,
    );
    e.single("braid_loss", Gauge, "Loss of the latest step (rank 0's report).", p.loss);
    e.family(
        "braid_loss_term",
        Gauge,
        "The latest loss's terms by objective.",
        p.loss_terms.iter().map(|(objective, value)| (vec![("objective", objective.clone())], Some(*value))),
    );
    e.single("braid_learning_rate", Gauge, "Learning rate of the latest step.", p.learning_rate);
    e.single("braid_grad_norm", Gauge, "Gradient norm (before clipping) of the latest step.", p.grad_norm);
    e.single("braid_data_wait_seconds", Gauge, "Seconds the latest step waited for its batch.", p.data_wait_seconds);
    e.single("braid_world_size", Gauge, "Ranks in the live generation (0 while none is live).", Some(f64::from(p.world_size)));
    e.single("braid_generation", Gauge, "The live generation's number (0 while none is live).", Some(p.generation as f64));
    e.single("braid_generations_total", Counter, "Generations formed since the job started.", Some(p.generations as f64));
    e.single(
        "braid_rejoins_total",
        Counter,
        "Workers that joined after the first generation formed (restarts and additions).",
        Some(p.rejoins as f64),
    );
    e.single(
        "braid_members",
        Gauge,
        "Workers the coordinator knows, training or waiting.",
        Some(p.members.len() as f64),
    );
    e.single(
        "braid_checkpoints_total",
        Counter,
        "Checkpoints committed by this coordinator.",
        Some(p.checkpoints_committed as f64),
    );
    e.single(
        "braid_checkpoint_seconds",
        Gauge,
        "Seconds the last committed checkpoint took: the slowest rank's write plus the commit.",
        p.last_checkpoint.map(|c| c.seconds),
    );
    e.single("braid_checkpoint_bytes", Gauge, "Bytes of the last committed checkpoint.", p.last_checkpoint.map(|c| c.bytes as f64));
    e.single(
        "braid_checkpoint_step",
        Gauge,
        "Step of the newest committed checkpoint.",
        p.checkpoints.last().map(|c| c.step as f64),
    );
    let ranked: Vec<_> = p.members.iter().filter_map(|m| m.rank.map(|r| (r, m))).collect();
    let per_rank = |value: fn(&crate::state::MemberProgress) -> Option<f64>| {
        ranked
            .iter()
            .map(move |(rank, m)| (vec![("rank", rank.to_string()), ("worker", m.worker_id.clone())] as Labels, value(m)))
            .collect::<Vec<_>>()
    };
    e.family(
        "braid_rank_step_seconds",
        Gauge,
        "Median step time of each rank over its recent steps.",
        per_rank(|m| m.step_seconds),
    );
    e.family(
        "braid_rank_collective_wait_seconds",
        Gauge,
        "Median seconds per step each rank waited in collectives.",
        per_rank(|m| m.collective_wait_seconds),
    );
    e.family(
        "braid_rank_data_wait_seconds",
        Gauge,
        "Seconds each rank's latest step waited for data.",
        per_rank(|m| m.data_wait_seconds),
    );
    e.family(
        "braid_rank_device_memory_bytes",
        Gauge,
        "Bytes each rank's CUDA caching allocator reserved from the device after its latest step (CUDA ranks only).",
        per_rank(|m| m.device_memory_bytes.map(|b| b as f64)),
    );
    e.family(
        "braid_rank_device_memory_peak_bytes",
        Gauge,
        "The most bytes each rank's CUDA caching allocator reserved since its worker started (CUDA ranks only).",
        per_rank(|m| m.device_memory_peak_bytes.map(|b| b as f64)),
    );
    e.family("braid_rank_straggler", Gauge, "1 when the rank is flagged as a straggler.", per_rank(|m| flag(m.straggler)));
    e.family(
        "braid_rank_last_step",
        Gauge,
        "The last global step each rank reported.",
        per_rank(|m| m.last_step.map(|s| s as f64)),
    );
    e.single(
        "braid_corrupt_samples_total",
        Counter,
        "Distinct samples reported corrupt and quarantined.",
        Some(p.corrupt_samples as f64),
    );
    e.single("braid_replica_checks_total", Counter, "Replica state checks that compared every rank.", Some(p.replica_checks as f64));
    e.single(
        "braid_replica_drifts_total",
        Counter,
        "Replica state checks that found a drifted rank (each repaired by broadcast).",
        Some(p.replica_drifts as f64),
    );
    e.single("braid_job_finished", Gauge, "1 once the job trained its last step and committed it.", flag(p.finished));
    e.single("braid_job_failed", Gauge, "1 once the job failed.", flag(p.failure.is_some()));
    e.single("braid_job_waiting", Gauge, "1 while no generation is live and the job waits for workers.", flag(p.waiting_reason.is_some()));
    e.0
}

/// The job's metrics in Prometheus's text format.
pub fn render(progress: &Progress) -> String {
    let mut out = String::new();
    let job = format!("job_name=\"{}\"", escape(&progress.job));
    for family in families(progress) {
        let kind = match family.kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(out, "# TYPE {} {kind}", family.name);
        for (labels, value) in &family.samples {
            let mut text = job.clone();
            for (key, v) in labels {
                let _ = write!(text, ",{key}=\"{}\"", escape(v));
            }
            let _ = writeln!(out, "{}{{{text}}} {}", family.name, number(*value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values_and_writes_special_numbers() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(2.5e-7), "0.00000025");
        assert_eq!(number(3.0), "3");
    }

    #[test]
    fn a_family_without_values_is_described_but_has_no_samples() {
        let progress = crate::state::Coordinator::new(
            crate::config::JobConfig::parse("[job]\nname = \"j\\\"1\"\n[data]\ntrain = \"m.json\"\n", "test").unwrap(),
            std::time::Instant::now(),
            "n",
        )
        .progress();
        let text = render(&progress);
        assert!(text.contains("# HELP braid_loss Loss of the latest step (rank 0's report).\n# TYPE braid_loss gauge\n# HELP"), "{text}");
        assert!(text.contains("\nbraid_step{job_name=\"j\\\"1\"} 0\n"), "{text}");
        assert!(families(&progress).iter().all(|f| f.name.starts_with("braid_") && !f.help.is_empty()));
    }
}
