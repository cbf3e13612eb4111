//! Crash points for fault-injection tests. With `BRAID_FAILPOINT=<name>@<step>` in its
//! environment, a process aborts at once (no cleanup, as after `kill -9`) when it reaches the
//! point `name` while handling checkpoint step `step`. Unset, a point costs one lookup.

/// The environment variable that arms a crash point.
pub const FAILPOINT_ENV: &str = "BRAID_FAILPOINT";

/// Whether the point `name` is armed for `step`.
pub fn armed(name: &str, step: u64) -> bool {
    let Ok(spec) = std::env::var(FAILPOINT_ENV) else { return false };
    let (point, at) = spec.split_once('@').unwrap_or((spec.as_str(), ""));
    point == name && (at.is_empty() || at.parse::<u64>() == Ok(step))
}

/// Aborts the process if the point `name` is armed for `step`.
pub fn hit(name: &str, step: u64) {
    if armed(name, step) {
        crash(name, step);
    }
}

/// Aborts the process, saying which point fired.
pub fn crash(name: &str, step: u64) -> ! {
    eprintln!("{FAILPOINT_ENV}: crashing at {name}@{step}");
    std::process::abort()
}
