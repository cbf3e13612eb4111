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
#[derive(Debug, Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// Writes metric families into a text exposition.
struct Exposition<'a> {
    out: String,
    job: &'a str,
}

impl<'a> Exposition<'a> {
    /// Starts family `name` and writes its samples: `(extra labels, value)`; `None` values are
    /// left out (the family is still described).
    fn family<'l>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        samples: impl IntoIterator<Item = (Vec<(&'l str, String)>, Option<f64>)>,
    ) {
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let Some(value) = value else { continue };
            let mut text = format!("job_name=\"{}\"", escape(self.job));
            for (key, v) in labels {
                let _ = write!(text, ",{key}=\"{}\"", escape(&v));
            }
            let _ = writeln!(self.out, "{name}{{{text}}} {}", number(value));
        }
    }

    /// A family with one sample and no labels beyond `job_name`.
    fn single(&mut self, name: &str, kind: Kind, help: &str, value: Option<f64>) {
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

/// The job's metrics in Prometheus's text format.
pub fn render(progress: &Progress) -> String {
    use Kind::{Counter, Gauge};
    let mut e = Exposition { out: String::new(), job: &progress.job };
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
            .map(move |(rank, m)| (vec![("rank", rank.to_string()), ("worker", m.worker_id.clone())], value(m)))
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
    e.out
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
        let mut e = Exposition { out: String::new(), job: "j\"1" };
        e.single("braid_x", Kind::Gauge, "X.", None);
        e.family("braid_y", Kind::Counter, "Y.", [(vec![("rank", "0".to_string())], Some(1.5))]);
        assert_eq!(
            e.out,
            "# HELP braid_x X.\n# TYPE braid_x gauge\n# HELP braid_y Y.\n# TYPE braid_y counter\nbraid_y{job_name=\"j\\\"1\",rank=\"0\"} 1.5\n"
        );
    }
}
