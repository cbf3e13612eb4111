//! Crash points for fault-injection tests. With `BRAID_FAILPOINT=<point>[,<point>...]` in its
//! environment, a process aborts at once (no cleanup, as after `kill -9`) when it reaches an
//! armed point. A point is `name@step` (while handling checkpoint or training step `step`),
//! `name` (any step), or `name@step#rank` (only on that rank; the worker sets its rank and step
//! with [`set_context`]). With `BRAID_FAILPOINT_ONCE=<folder>`, each point fires at most once
//! across processes (a restarted worker does not crash again): the crash first creates
//! `<folder>/<point>`. The environment is read once per process; unset, a point costs nothing.
//!
//! Some points inject a fault instead of crashing ([`trigger`]): `corrupt-momentum` perturbs a
//! worker's momentum encoders (its parameters, for families without one) after the update of
//! the step, for the replica consistency check to find.

use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms crash points.
pub const FAILPOINT_ENV: &str = "BRAID_FAILPOINT";
/// The environment variable naming the folder that makes crash points fire once.
pub const FAILPOINT_ONCE_ENV: &str = "BRAID_FAILPOINT_ONCE";

const UNSET: u64 = u64::MAX;
static STEP: AtomicU64 = AtomicU64::new(UNSET);
static RANK: AtomicU64 = AtomicU64::new(UNSET);

/// Records the step this process is on and its rank, for points without an explicit step.
pub fn set_context(step: u64, rank: usize) {
    STEP.store(step, Ordering::Relaxed);
    RANK.store(rank as u64, Ordering::Relaxed);
}

/// The armed point (as written in the environment) matching `name` at `step` on this rank.
fn matching(name: &str, step: u64) -> Option<String> {
    // Read once: points are checked inside collectives, on every step.
    static SPEC: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let spec = SPEC.get_or_init(|| std::env::var(FAILPOINT_ENV).ok()).as_deref()?;
    let rank = RANK.load(Ordering::Relaxed);
    spec.split(',').map(str::trim).find_map(|point| {
        let (target, ranks) = point.split_once('#').unwrap_or((point, ""));
        let (point_name, at) = target.split_once('@').unwrap_or((target, ""));
        let step_ok = at.is_empty() || at.parse::<u64>() == Ok(step);
        let rank_ok = ranks.is_empty() || ranks.parse::<u64>() == Ok(rank);
        (point_name == name && step_ok && rank_ok && !already_fired(point)).then(|| point.to_string())
    })
}

fn once_marker(point: &str) -> Option<std::path::PathBuf> {
    let folder = std::env::var_os(FAILPOINT_ONCE_ENV)?;
    Some(std::path::Path::new(&folder).join(point.replace(['/', '#'], "_")))
}

fn already_fired(point: &str) -> bool {
    once_marker(point).is_some_and(|m| m.exists())
}

/// Whether the point `name` is armed for `step`.
pub fn armed(name: &str, step: u64) -> bool {
    matching(name, step).is_some()
}

/// Whether the injection point `name` is armed for `step`; marks it fired (with
/// `BRAID_FAILPOINT_ONCE`), so the caller injects its fault and the process goes on.
pub fn trigger(name: &str, step: u64) -> bool {
    let Some(point) = matching(name, step) else { return false };
    mark_fired(&point);
    eprintln!("{FAILPOINT_ENV}: injecting {name}@{step}");
    true
}

fn mark_fired(point: &str) {
    if let Some(marker) = once_marker(point) {
        let _ = std::fs::create_dir_all(marker.parent().unwrap_or(std::path::Path::new(".")));
        let _ = std::fs::write(&marker, b"fired\n");
    }
}

/// Aborts the process if the point `name` is armed for `step`.
pub fn hit(name: &str, step: u64) {
    if armed(name, step) {
        crash(name, step);
    }
}

/// Aborts the process if the point `name` is armed for the step set by [`set_context`].
pub fn hit_here(name: &str) {
    let step = STEP.load(Ordering::Relaxed);
    if step != UNSET {
        hit(name, step);
    }
}

/// Aborts the process, saying which point fired (and marking it fired, with
/// `BRAID_FAILPOINT_ONCE`).
pub fn crash(name: &str, step: u64) -> ! {
    if let Some(point) = matching(name, step) {
        mark_fired(&point);
    }
    eprintln!("{FAILPOINT_ENV}: crashing at {name}@{step}");
    std::process::abort()
}
