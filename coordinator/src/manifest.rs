//! The dataset manifest written by `braid data index`: every shard of a WebDataset with the
//! byte range of every member of every sample, so workers read samples with range requests.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Current manifest format version.
pub const MANIFEST_VERSION: u32 = 1;

/// A WebDataset described shard by shard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetManifest {
    /// Format version ([`MANIFEST_VERSION`]).
    pub version: u32,
    /// Shards in the order they were indexed.
    pub shards: Vec<ShardEntry>,
}

/// One tar shard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// Location relative to the manifest's folder, or an absolute URL.
    pub url: String,
    /// Size of the tar file in bytes.
    pub size: u64,
    /// Samples in tar order.
    pub samples: Vec<SampleEntry>,
}

/// One sample: its key and the byte range of each member, by extension (`jpg`, `png`, `txt`, `cls`...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SampleEntry {
    /// The WebDataset key (file name up to the first dot).
    pub key: String,
    /// Member extension -> (offset, length) of its data inside the tar file.
    pub members: BTreeMap<String, (u64, u64)>,
}

/// Where one sample lives: shard index and sample index within the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleRef {
    /// Index into [`DatasetManifest::shards`].
    pub shard: u32,
    /// Index into [`ShardEntry::samples`].
    pub sample: u32,
}

impl DatasetManifest {
    /// Parses a manifest; `origin` names it in errors.
    pub fn from_json(bytes: &[u8], origin: &str) -> Result<Self> {
        let m: Self = serde_json::from_slice(bytes).map_err(|e| Error::Manifest {
            origin: origin.to_string(),
            reason: e.to_string(),
        })?;
        if m.version != MANIFEST_VERSION {
            return Err(Error::Manifest {
                origin: origin.to_string(),
                reason: format!("format version {} (this braid reads {MANIFEST_VERSION})", m.version),
            });
        }
        if m.num_samples() == 0 {
            return Err(Error::Manifest { origin: origin.to_string(), reason: "no samples".into() });
        }
        Ok(m)
    }

    /// Serialises to pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest always serialises")
    }

    /// Total samples over all shards.
    pub fn num_samples(&self) -> u64 {
        self.shards.iter().map(|s| s.samples.len() as u64).sum()
    }

    /// The sample a reference points at.
    pub fn sample(&self, r: SampleRef) -> &SampleEntry {
        &self.shards[r.shard as usize].samples[r.sample as usize]
    }
}
