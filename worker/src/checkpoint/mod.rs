//! Worker side of checkpoints: each rank writes its part as plain safetensors under a fresh
//! attempt path and reports its sha256 and size; the coordinator commits the manifest.
//! Loading verifies every part's checksum before any tensor is used.
//!
//! Layout under the checkpoint URL:
//! `step-000200/attempt-<id>/rank-0.safetensors`, `step-000200/manifest.json`, `latest`.

mod device_copy;
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

/// Parts smaller than this are not split further.
const SHARD_MIN_BYTES: usize = 64 << 20;

/// Where a rank's part of an attempt goes, relative to the root (`rank-0.safetensors`, or
/// `rank-0-01.safetensors` for the second of several).
pub fn part_path(step: u64, attempt: &str, rank: usize, shard: Option<usize>) -> String {
    match shard {
        None => format!("step-{step:06}/attempt-{attempt}/rank-{rank}.safetensors"),
        Some(i) => format!("step-{step:06}/attempt-{attempt}/rank-{rank}-{i:02}.safetensors"),
    }
}

/// Splits named tensors, in name order, into at most `groups` runs of roughly equal bytes.
fn split_by_bytes(tensors: &[(String, Tensor)], groups: usize) -> Vec<Vec<(String, Tensor)>> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let total: usize = sorted.iter().map(|(_, t)| bytes(t)).sum();
    let target = total.div_ceil(groups.max(1));
    let mut out: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut filled = 0;
    for (name, t) in sorted {
        if filled >= target && out.len() < groups {
            out.push(Vec::new());
            filled = 0;
        }
        filled += bytes(t);
        out.last_mut().expect("one group").push((name.clone(), t.shallow_clone()));
    }
    out
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A contiguous CPU tensor seen as safetensors data.
struct TensorView {
    tensor: Tensor,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
}

impl safetensors::View for &TensorView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        // SAFETY: the tensor is a contiguous CPU tensor owned by `self` for this borrow; its
        // storage holds exactly `data_len` bytes from `data_ptr`.
        let bytes = unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, self.data_len()) };
        std::borrow::Cow::Borrowed(bytes)
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

fn dtype_of(kind: tch::Kind) -> Option<safetensors::Dtype> {
    use safetensors::Dtype as D;
    use tch::Kind as K;
    Some(match kind {
        K::Float => D::F32,
        K::Double => D::F64,
        K::BFloat16 => D::BF16,
        K::Half => D::F16,
        K::Int64 => D::I64,
        K::Int => D::I32,
        K::Int16 => D::I16,
        K::Int8 => D::I8,
        K::Uint8 => D::U8,
        K::Bool => D::BOOL,
        _ => return None,
    })
}

fn kind_of(dtype: safetensors::Dtype) -> Option<tch::Kind> {
    use safetensors::Dtype as D;
    use tch::Kind as K;
    Some(match dtype {
        D::F32 => K::Float,
        D::F64 => K::Double,
        D::BF16 => K::BFloat16,
        D::F16 => K::Half,
        D::I64 => K::Int64,
        D::I32 => K::Int,
        D::I16 => K::Int16,
        D::I8 => K::Int8,
        D::U8 => K::Uint8,
        D::BOOL => K::Bool,
        _ => return None,
    })
}

/// A contiguous CPU tensor's memory as `Bytes`, without a copy (the tensor is kept alive by
/// the `Bytes`).
struct TensorBytes(Tensor);

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        let len = self.0.numel() * self.0.kind().elt_size_in_bytes();
        // SAFETY: a contiguous CPU tensor owned by `self`; its storage holds `len` bytes.
        unsafe { std::slice::from_raw_parts(self.0.data_ptr() as *const u8, len) }
    }
}

/// A safetensors file as chunks: the header, then every tensor's bytes in header order.
/// CPU tensors that are already contiguous are not copied.
pub fn safetensors_chunks(tensors: &[(String, Tensor)]) -> Result<Vec<Bytes>> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    let mut chunks = vec![Bytes::new()];
    let mut offset = 0usize;
    for (name, t) in sorted {
        let dtype = dtype_of(t.kind()).ok_or_else(|| CheckpointError::Manifest {
            path: name.clone(),
            reason: format!("tensor kind {:?} has no safetensors dtype", t.kind()),
        })?;
        let host = t.detach().to_device(tch::Device::Cpu).contiguous();
        let len = host.numel() * host.kind().elt_size_in_bytes();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": format!("{dtype:?}"), "shape": host.size(), "data_offsets": [offset, offset + len]}),
        );
        offset += len;
        chunks.push(Bytes::from_owner(TensorBytes(host)));
    }
    let mut json = serde_json::to_vec(&header).expect("a header always serialises");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut head = (json.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&json);
    chunks[0] = Bytes::from(head);
    Ok(chunks)
}

/// Serialises named tensors to safetensors bytes in memory (contiguous CPU copies where needed).
pub fn to_safetensors(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, t)| {
            let dtype = dtype_of(t.kind()).ok_or_else(|| CheckpointError::Manifest {
                path: name.clone(),
                reason: format!("tensor kind {:?} has no safetensors dtype", t.kind()),
            })?;
            let tensor = t.detach().to_device(tch::Device::Cpu).contiguous();
            let shape = tensor.size().iter().map(|&d| d as usize).collect();
            Ok((name.clone(), TensorView { tensor, dtype, shape }))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), &None)
        .map_err(|e| CheckpointError::Manifest { path: "safetensors".into(), reason: format!("{e:?}") })
}

/// Parses safetensors bytes; `origin` names them in errors.
pub fn from_safetensors(bytes: &[u8], origin: &str) -> Result<Vec<(String, Tensor)>> {
    let bad = |reason: String| CheckpointError::Corrupt { path: origin.to_string(), reason };
    let parsed = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not safetensors: {e:?}")))?;
    let mut out = Vec::with_capacity(parsed.len());
    for (name, view) in parsed.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| bad(format!("tensor {name:?} has unsupported dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|source| CheckpointError::Tensors { path: origin.to_string(), source })?;
        out.push((name, tensor));
    }
    Ok(out)
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

    /// Writes this rank's state for an attempt and returns the parts to report in the vote.
    /// Above 64 MiB the state is split into one part per core, each streamed from the
    /// tensors' memory (no serialised copy) and hashed beside its upload, all in parallel.
    pub fn write_parts(&self, step: u64, attempt: &str, rank: usize, tensors: &[(String, Tensor)]) -> Result<Vec<PartInfo>> {
        let total: usize = tensors.iter().map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes()).sum();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = if braid_coordinator::failpoint::armed("part-upload", step) {
            1
        } else {
            cores.min(total.div_ceil(SHARD_MIN_BYTES)).max(1)
        };
        if shards == 1 {
            return Ok(vec![self.write_part(step, attempt, rank, None, tensors)?]);
        }
        let groups = split_by_bytes(tensors, shards);
        std::thread::scope(|scope| {
            let handles: Vec<_> = groups
                .into_iter()
                .enumerate()
                .map(|(i, group)| scope.spawn(move || self.write_part(step, attempt, rank, Some(i), &group)))
                .collect();
            handles.into_iter().map(|h| h.join().expect("a part writer does not panic")).collect()
        })
    }

    /// Writes one part: the given tensors as one safetensors object.
    fn write_part(&self, step: u64, attempt: &str, rank: usize, shard: Option<usize>, tensors: &[(String, Tensor)]) -> Result<PartInfo> {
        let path = part_path(step, attempt, rank, shard);
        let location = self.at(&path)?;
        let chunks = safetensors_chunks(tensors)?;
        let size: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        if !braid_coordinator::failpoint::armed("part-upload", step) {
            let (digest, uploaded) = std::thread::scope(|scope| {
                let hashing = scope.spawn(|| {
                    let mut hasher = Sha256::new();
                    for chunk in &chunks {
                        hasher.update(chunk);
                    }
                    hex::encode(hasher.finalize())
                });
                let uploaded = store::block_on(location.put_chunks(chunks.clone()));
                (hashing.join().expect("the hashing thread does not panic"), uploaded)
            });
            uploaded??;
            return Ok(PartInfo { sha256: digest, size, path, rank: rank as u32 });
        }
        // A torn upload: half the bytes reach the store, then the process dies.
        let bytes: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        store::block_on(location.put(Bytes::from(bytes[..bytes.len() / 2].to_vec())))??;
        braid_coordinator::failpoint::crash("part-upload", step);
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
