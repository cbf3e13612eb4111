//! Worker side of checkpoints: each rank writes its part as plain safetensors under a fresh
//! attempt path and reports its sha256 and size; the coordinator commits the manifest.
//! Loading verifies every part's checksum before any tensor is used.
//!
//! Layout under the checkpoint URL:
//! `step-000200/attempt-<id>/rank-0.safetensors`, `step-000200/manifest.json`, `latest`.

pub mod participant;
pub mod upload;

use bytes::Bytes;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::data::store::{self, Location};

/// Errors reading or writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The object store failed.
    #[error(transparent)]
    Store(#[from] crate::data::Error),
    /// A part whose bytes do not match the manifest.
    #[error("checkpoint part {path} is corrupt: {reason}")]
    Corrupt {
        /// The part's URL.
        path: String,
        /// What did not match.
        reason: String,
    },
    /// A manifest that cannot be parsed.
    #[error("checkpoint manifest {path}: {reason}")]
    Manifest {
        /// The manifest's URL.
        path: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// libtorch could not (de)serialise the tensors.
    #[error("checkpoint part {path}: {source}")]
    Tensors {
        /// The part's URL or temporary file.
        path: String,
        /// The libtorch error.
        #[source]
        source: tch::TchError,
    },
    /// Local temporary storage failed.
    #[error("temporary file for checkpoint part: {0}")]
    Io(#[from] std::io::Error),
}

/// Result with [`CheckpointError`].
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// A part as reported in a vote and listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PartInfo {
    /// Path relative to the checkpoint root.
    pub path: String,
    /// Hex sha256 of the bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Rank that wrote it.
    #[serde(default)]
    pub rank: u32,
}

/// The fields of a committed `manifest.json` that workers need.
#[derive(Debug, Clone, Deserialize)]
pub struct CheckpointManifest {
    /// Last completed step (0-based); training resumes at `step + 1`.
    pub step: u64,
    /// The attempt that was committed.
    pub attempt: String,
    /// Every part with its checksum.
    pub parts: Vec<PartInfo>,
    /// Hash of the job config that wrote it.
    #[serde(default)]
    pub config_hash: String,
}

/// A checkpoint root (`[checkpoint] url`).
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    /// `<root>/latest`, against which relative paths resolve.
    anchor: Location,
    root_url: String,
}

/// Where a rank's part of an attempt goes, relative to the root.
pub fn part_path(step: u64, attempt: &str, rank: usize) -> String {
    format!("step-{step:06}/attempt-{attempt}/rank-{rank}.safetensors")
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Serialises named tensors to safetensors bytes (contiguous CPU copies).
pub fn to_safetensors(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let file = tempfile::NamedTempFile::new()?;
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&cpu, file.path())
        .map_err(|source| CheckpointError::Tensors { path: file.path().display().to_string(), source })?;
    Ok(std::fs::read(file.path())?)
}

/// Parses safetensors bytes; `origin` names them in errors.
pub fn from_safetensors(bytes: &[u8], origin: &str) -> Result<Vec<(String, Tensor)>> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), bytes)?;
    Tensor::read_safetensors(file.path()).map_err(|source| CheckpointError::Tensors { path: origin.to_string(), source })
}

impl CheckpointStore {
    /// Opens the checkpoint root at a path or URL.
    pub fn open(url: &str) -> Result<Self> {
        let root = url.trim_end_matches('/');
        let anchor = store::open(&format!("{root}/latest"))?;
        let root_url = anchor.url().trim_end_matches("latest").trim_end_matches('/').to_string();
        Ok(Self { anchor, root_url })
    }

    /// The root's URL.
    pub fn url(&self) -> &str {
        &self.root_url
    }

    fn at(&self, relative: &str) -> Result<Location> {
        Ok(self.anchor.join(relative)?)
    }

    /// Writes this rank's part of an attempt and returns what to report in the vote.
    pub fn write_part(&self, step: u64, attempt: &str, rank: usize, tensors: &[(String, Tensor)]) -> Result<PartInfo> {
        let path = part_path(step, attempt, rank);
        let bytes = to_safetensors(tensors)?;
        let info = PartInfo { sha256: sha256_hex(&bytes), size: bytes.len() as u64, path: path.clone(), rank: rank as u32 };
        let location = self.at(&path)?;
        if braid_coordinator::failpoint::armed("part-upload", step) {
            // A torn upload: half the bytes reach the store, then the process dies.
            let half = Bytes::from(bytes[..bytes.len() / 2].to_vec());
            store::block_on(location.put(half))??;
            braid_coordinator::failpoint::crash("part-upload", step);
        }
        store::block_on(location.put(Bytes::from(bytes)))??;
        Ok(info)
    }

    /// The manifest `latest` points at, if any checkpoint was committed.
    pub fn latest(&self) -> Result<Option<String>> {
        match store::block_on(self.anchor.read_all())? {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).trim().to_string())),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads a manifest given relative to the root or as a URL.
    pub fn read_manifest(&self, reference: &str) -> Result<CheckpointManifest> {
        let location = self.at(reference)?;
        let bytes = store::block_on(location.read_all())??;
        serde_json::from_slice(&bytes)
            .map_err(|e| CheckpointError::Manifest { path: location.url().to_string(), reason: e.to_string() })
    }

    /// Reads a part and checks its size and sha256 against the manifest.
    pub fn read_part(&self, part: &PartInfo) -> Result<Vec<(String, Tensor)>> {
        let location = self.at(&part.path)?;
        let bytes = store::block_on(location.read_all())??;
        if bytes.len() as u64 != part.size {
            return Err(CheckpointError::Corrupt {
                path: location.url().to_string(),
                reason: format!("{} bytes, the manifest says {}", bytes.len(), part.size),
            });
        }
        let digest = sha256_hex(&bytes);
        if digest != part.sha256 {
            return Err(CheckpointError::Corrupt {
                path: location.url().to_string(),
                reason: format!("sha256 {digest}, the manifest says {}", part.sha256),
            });
        }
        from_safetensors(&bytes, location.url())
    }

    /// All tensors of a committed checkpoint (every part, checksums verified).
    pub fn read_checkpoint(&self, manifest_reference: &str) -> Result<(CheckpointManifest, Vec<(String, Tensor)>)> {
        let manifest = self.read_manifest(manifest_reference)?;
        let mut tensors = Vec::new();
        for part in &manifest.parts {
            tensors.extend(self.read_part(part)?);
        }
        Ok((manifest, tensors))
    }
}
