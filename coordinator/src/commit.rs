//! Phase two of a checkpoint: verify the parts every rank reported, write the step's
//! `manifest.json` create-only, move `latest`, and keep only the newest checkpoints.
//!
//! Layout below the checkpoint root:
//! ```text
//! step-000020/attempt-<attempt>/rank-<r>.safetensors   written by the workers
//! step-000020/manifest.json                            written once, by the coordinator
//! latest                                               "step-000020/manifest.json"
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::{CommitPlan, CommittedCheckpoint, PlannedPart};
use crate::store::StoreRoot;

/// Name of the pointer to the newest committed manifest, below the checkpoint root.
pub const LATEST: &str = "latest";

/// The committed record of one checkpoint (`step-<step:06>/manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    /// The global step the checkpoint holds; training resumes at `step + 1`.
    pub step: u64,
    /// The attempt whose parts were committed.
    pub attempt: String,
    /// Job id.
    pub job: String,
    /// Hash of the job config that trained it.
    pub config_hash: String,
    /// braid version of the coordinator that committed it.
    pub braid_version: String,
    /// Ranks that wrote parts.
    pub world_size: u32,
    /// Generation those ranks formed.
    pub generation: u64,
    /// Every part, in rank order; paths are relative to the checkpoint root.
    pub parts: Vec<PlannedPart>,
    /// When it was committed (RFC 3339, UTC).
    pub committed_at: String,
}

/// The folder of a step's checkpoint: `step-<step:06>`.
pub fn step_dir(step: u64) -> String {
    format!("step-{step:06}")
}

/// The manifest of a step, relative to the checkpoint root: `step-<step:06>/manifest.json`.
pub fn manifest_path(step: u64) -> String {
    format!("{}/manifest.json", step_dir(step))
}

fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// Formats a time as RFC 3339 in UTC with second precision.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3_600, rem % 3_600 / 60, rem % 60)
}

/// Checks that every part of `plan` exists with the size its rank reported, then writes the
/// step's manifest create-only. Returns the manifest's URL. Fails if a part is missing or of
/// the wrong size, or if the step already has a manifest.
pub async fn write_manifest(root: &StoreRoot, plan: &CommitPlan, now: SystemTime) -> Result<String> {
    for part in &plan.parts {
        match root.head(&part.path).await? {
            None => {
                return Err(Error::Checkpoint(format!(
                    "part {} of rank {} is missing",
                    root.url_of(&part.path),
                    part.rank
                )))
            }
            Some(meta) if meta.size != part.size => {
                return Err(Error::Checkpoint(format!(
                    "part {} of rank {} has {} bytes in the store, the rank reported {}",
                    root.url_of(&part.path),
                    part.rank,
                    meta.size,
                    part.size
                )))
            }
            Some(_) => {}
        }
    }
    let manifest = CheckpointManifest {
        step: plan.step,
        attempt: plan.attempt.clone(),
        job: plan.job.clone(),
        config_hash: plan.config_hash.clone(),
        braid_version: env!("CARGO_PKG_VERSION").to_string(),
        world_size: plan.world_size,
        generation: plan.generation,
        parts: plan.parts.clone(),
        committed_at: rfc3339(now),
    };
    let rel = manifest_path(plan.step);
    let json = serde_json::to_vec_pretty(&manifest).expect("a checkpoint manifest always serialises");
    if crate::failpoint::armed("manifest-write", plan.step) {
        // A torn manifest write: part of the JSON reaches the store, then the process dies.
        root.put_create(&rel, json[..json.len() / 2].to_vec()).await?;
        crate::failpoint::crash("manifest-write", plan.step);
    }
    if !root.put_create(&rel, json).await? {
        // A coordinator that died after writing this very manifest (and was restored from its
        // journal) commits the same attempt again: it is already done.
        if let Some(existing) = root.get(&rel).await? {
            if parse_manifest(&existing, &root.url_of(&rel)).is_ok_and(|m| m.attempt == plan.attempt) {
                return Ok(root.url_of(&rel));
            }
        }
        return Err(Error::Checkpoint(format!(
            "{} already exists: step {} was committed before",
            root.url_of(&rel),
            plan.step
        )));
    }
    Ok(root.url_of(&rel))
}

/// Points `latest` at the manifest of `step`.
pub async fn write_latest(root: &StoreRoot, step: u64) -> Result<()> {
    root.put(LATEST, manifest_path(step)).await
}

/// Parses a checkpoint manifest; `origin` names it in errors.
pub fn parse_manifest(bytes: &[u8], origin: &str) -> Result<CheckpointManifest> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Checkpoint(format!("cannot read checkpoint manifest {origin}: {e}")))
}

/// The checkpoint `latest` points at, if `latest` exists.
pub async fn read_latest(root: &StoreRoot) -> Result<Option<(CheckpointManifest, CommittedCheckpoint)>> {
    let Some(pointer) = root.get(LATEST).await? else { return Ok(None) };
    let rel = String::from_utf8_lossy(&pointer).trim().to_string();
    let latest_url = root.url_of(LATEST);
    if rel.is_empty() || rel.starts_with('/') || rel.contains("://") || rel.split('/').any(|s| s == "..") {
        return Err(Error::Checkpoint(format!(
            "{latest_url} holds {rel:?}, not a manifest path below the checkpoint root"
        )));
    }
    let url = root.url_of(&rel);
    let bytes = root
        .get(&rel)
        .await?
        .ok_or_else(|| Error::Checkpoint(format!("{latest_url} points at {url}, which does not exist")))?;
    let manifest = parse_manifest(&bytes, &url)?;
    let committed = CommittedCheckpoint {
        step: manifest.step,
        attempt: manifest.attempt.clone(),
        generation: manifest.generation,
        manifest_url: url,
    };
    Ok(Some((manifest, committed)))
}

/// Why a committed checkpoint cannot be resumed from, or `None` when every part is present
/// with the size and sha256 its manifest lists.
pub async fn verify_parts(root: &StoreRoot, manifest: &CheckpointManifest) -> Result<Option<String>> {
    use sha2::{Digest, Sha256};
    for part in &manifest.parts {
        let url = root.url_of(&part.path);
        let Some(bytes) = root.get(&part.path).await? else {
            return Ok(Some(format!("part {url} is missing")));
        };
        if bytes.len() as u64 != part.size {
            return Ok(Some(format!("part {url} has {} bytes, the manifest says {}", bytes.len(), part.size)));
        }
        let digest = hex::encode(Sha256::digest(&bytes));
        if digest != part.sha256 {
            return Ok(Some(format!("part {url} is corrupt: sha256 {digest}, the manifest says {}", part.sha256)));
        }
    }
    Ok(None)
}

/// The newest committed checkpoint whose parts all verify, trying every committed step newest
/// first (a manifest is written only after every part was checked, so one newer than `latest`
/// is complete: the coordinator stopped before moving `latest`). A checkpoint that fails (torn or unreadable
/// manifest, missing or corrupt part) is logged with the bad file and set aside: its manifest
/// is renamed `manifest.bad-<unix time>.json`, so the step can be committed again and nothing
/// is deleted. `latest` is pointed at the checkpoint chosen.
pub async fn find_resumable(root: &StoreRoot) -> Result<Option<(CheckpointManifest, CommittedCheckpoint)>> {
    let mut steps: Vec<u64> = root.folders("").await?.iter().filter_map(|f| parse_step_dir(f)).collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    let pointed = match root.get(LATEST).await? {
        Some(bytes) => parse_step_dir(String::from_utf8_lossy(&bytes).trim().trim_end_matches("/manifest.json")),
        None => None,
    };
    for step in steps {
        let rel = manifest_path(step);
        let url = root.url_of(&rel);
        let Some(bytes) = root.get(&rel).await? else { continue };
        let problem = match parse_manifest(&bytes, &url) {
            Ok(manifest) => match verify_parts(root, &manifest).await? {
                None => {
                    if pointed != Some(step) {
                        tracing::warn!("resuming from {url}; pointing {} at it", root.url_of(LATEST));
                        write_latest(root, step).await?;
                    }
                    let committed = CommittedCheckpoint {
                        step: manifest.step,
                        attempt: manifest.attempt.clone(),
                        generation: manifest.generation,
                        manifest_url: url,
                    };
                    return Ok(Some((manifest, committed)));
                }
                Some(problem) => problem,
            },
            Err(e) => e.to_string(),
        };
        let aside = format!("{}/manifest.bad-{}.json", step_dir(step), unix_seconds());
        tracing::error!("checkpoint step {step} cannot be resumed from: {problem}; falling back to the previous checkpoint (its manifest moves to {})", root.url_of(&aside));
        root.store()
            .rename(&root.path(&rel), &root.path(&aside))
            .await
            .map_err(|source| Error::Store { url: url.clone(), source })?;
    }
    Ok(None)
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Keeps the newest `keep` committed checkpoints (step folders holding a manifest) and deletes
/// every step folder older than the oldest kept one, committed or not, except committed ones
/// marked to keep (`keep_every > 0` and `step + 1` a multiple of it). Newer folders (attempts
/// in progress) are left alone. Returns the deleted steps.
pub async fn apply_retention(root: &StoreRoot, keep: usize, keep_every: u64) -> Result<Vec<u64>> {
    let mut steps: Vec<u64> = root.folders("").await?.iter().filter_map(|f| parse_step_dir(f)).collect();
    steps.sort_unstable();
    let mut committed = Vec::new();
    for &step in steps.iter().rev() {
        if root.head(&manifest_path(step)).await?.is_some() {
            committed.push(step);
            if committed.len() == keep.max(1) {
                break;
            }
        }
    }
    if committed.len() < keep.max(1) {
        return Ok(Vec::new());
    }
    let oldest_kept = *committed.last().expect("keep >= 1");
    let mut deleted = Vec::new();
    for step in steps.into_iter().filter(|&s| s < oldest_kept) {
        let marked = keep_every > 0 && (step + 1) % keep_every == 0;
        if marked && root.head(&manifest_path(step)).await?.is_some() {
            continue;
        }
        root.delete_folder(&step_dir(step)).await?;
        deleted.push(step);
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_709_210_096);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn step_dirs_round_trip() {
        assert_eq!(step_dir(20), "step-000020");
        assert_eq!(parse_step_dir("step-000020"), Some(20));
        assert_eq!(parse_step_dir("step-1234567"), Some(1_234_567));
        assert_eq!(parse_step_dir("step-12"), None);
        assert_eq!(parse_step_dir("latest"), None);
    }

    #[tokio::test]
    async fn retention_keeps_the_newest_committed() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::store::open(dir.path().to_str().unwrap()).unwrap();
        for step in [1u64, 2, 3, 4] {
            root.put(&format!("{}/attempt-a/rank-0.safetensors", step_dir(step)), "x").await.unwrap();
        }
        for step in [1u64, 2, 3] {
            root.put(&manifest_path(step), "{}").await.unwrap();
        }
        let deleted = apply_retention(&root, 2, 0).await.unwrap();
        assert_eq!(deleted, vec![1]);
        let mut left = root.folders("").await.unwrap();
        left.sort();
        assert_eq!(left, vec!["step-000002", "step-000003", "step-000004"]);
    }

    #[tokio::test]
    async fn retention_spares_checkpoints_marked_to_keep() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::store::open(dir.path().to_str().unwrap()).unwrap();
        for step in [9u64, 19, 29, 39, 49] {
            root.put(&format!("{}/attempt-a/rank-0.safetensors", step_dir(step)), "x").await.unwrap();
            root.put(&manifest_path(step), "{}").await.unwrap();
        }
        // keep 1 (step 49) plus every step whose step + 1 is a multiple of 20 (19 and 39).
        let deleted = apply_retention(&root, 1, 20).await.unwrap();
        assert_eq!(deleted, vec![9, 29]);
        let mut left = root.folders("").await.unwrap();
        left.sort();
        assert_eq!(left, vec!["step-000019", "step-000039", "step-000049"]);
    }
}
