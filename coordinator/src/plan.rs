//! The global sample order: a pure function of (seed, epoch, manifest).
//!
//! Shards are permuted, consecutive windows of `window_shards` shards are pooled and their
//! samples shuffled. Global step `s` consumes positions `[s*G, (s+1)*G)` of the endless
//! sequence epoch 0, epoch 1, ...; rank `r` of `W` takes the contiguous slice
//! `[r*G/W, (r+1)*G/W)` (remainders spread over the first ranks). The order never depends on
//! the world size, so every sample is seen once per epoch whatever happens to membership.

use crate::manifest::{DatasetManifest, SampleRef};

/// SplitMix64's increment (the golden ratio in 64 bits).
pub const SPLITMIX64_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective mix of 64 bits (also a good hash of a counter).
pub fn splitmix64_mix(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64: a small, fully specified generator so the order is stable across
/// platforms and dependency versions.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for a seed and a stream number (e.g. the epoch).
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut g = Self(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        g.next_u64();
        g
    }

    /// A generator whose state is `state` as is (the reference algorithm's seeding).
    pub fn from_state(state: u64) -> Self {
        Self(state)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(SPLITMIX64_GAMMA);
        splitmix64_mix(self.0)
    }

    /// Uniform in `[0, n)` (n > 0).
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// Uniform in `[lo, hi]`.
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.index(hi - lo + 1)
    }

    /// One of `items`, uniformly.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.index(items.len())]
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.index(100) < percent
    }

    /// Uniform in `[0, n)` (n > 0), by rejection so there is no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Uniform in `[0, 1)` with 53 bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// The order of one epoch: every sample of the manifest exactly once.
pub fn epoch_order(manifest: &DatasetManifest, seed: u64, epoch: u64, window_shards: usize) -> Vec<SampleRef> {
    let mut rng = SplitMix64::new(seed, epoch);
    let mut shards: Vec<u32> = (0..manifest.shards.len() as u32).collect();
    rng.shuffle(&mut shards);
    let mut order = Vec::with_capacity(manifest.num_samples() as usize);
    for window in shards.chunks(window_shards.max(1)) {
        let start = order.len();
        for &shard in window {
            let n = manifest.shards[shard as usize].samples.len() as u32;
            order.extend((0..n).map(|sample| SampleRef { shard, sample }));
        }
        rng.shuffle(&mut order[start..]);
    }
    order
}

/// The half-open range of a global batch that rank `rank` of `world_size` trains.
pub fn rank_slice(global_batch: usize, rank: usize, world_size: usize) -> std::ops::Range<usize> {
    let base = global_batch / world_size;
    let extra = global_batch % world_size;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start..start + len
}

/// Global sample positions and their samples, with the epoch order cached.
#[derive(Debug, Clone)]
pub struct SamplePlan {
    manifest: std::sync::Arc<DatasetManifest>,
    seed: u64,
    window_shards: usize,
    epoch_len: u64,
    cached: Option<(u64, std::sync::Arc<Vec<SampleRef>>)>,
}

/// A sample chosen for a step, with its global position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedSample {
    /// Position in the endless global sequence.
    pub position: u64,
    /// Epoch the position falls in.
    pub epoch: u64,
    /// The sample.
    pub sample: SampleRef,
}

impl SamplePlan {
    /// A plan over `manifest` with the job's seed and shuffle window.
    pub fn new(manifest: std::sync::Arc<DatasetManifest>, seed: u64, window_shards: usize) -> Self {
        let epoch_len = manifest.num_samples();
        Self { manifest, seed, window_shards, epoch_len, cached: None }
    }

    /// Samples per epoch.
    pub fn epoch_len(&self) -> u64 {
        self.epoch_len
    }

    /// The manifest the plan orders.
    pub fn manifest(&self) -> &std::sync::Arc<DatasetManifest> {
        &self.manifest
    }

    fn order(&mut self, epoch: u64) -> std::sync::Arc<Vec<SampleRef>> {
        match &self.cached {
            Some((e, order)) if *e == epoch => order.clone(),
            _ => {
                let order = std::sync::Arc::new(epoch_order(&self.manifest, self.seed, epoch, self.window_shards));
                self.cached = Some((epoch, order.clone()));
                order
            }
        }
    }

    /// The sample at a global position.
    pub fn at(&mut self, position: u64) -> PlannedSample {
        let epoch = position / self.epoch_len;
        let order = self.order(epoch);
        PlannedSample { position, epoch, sample: order[(position % self.epoch_len) as usize] }
    }

    /// The samples rank `rank` of `world_size` trains at global step `step`.
    pub fn rank_batch(&mut self, step: u64, global_batch: usize, rank: usize, world_size: usize) -> Vec<PlannedSample> {
        let slice = rank_slice(global_batch, rank, world_size);
        let first = step * global_batch as u64;
        slice.map(|i| self.at(first + i as u64)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{SampleEntry, ShardEntry, MANIFEST_VERSION};
    use std::collections::{BTreeMap, HashSet};
    use std::sync::Arc;

    fn manifest(shards: &[usize]) -> DatasetManifest {
        DatasetManifest {
            version: MANIFEST_VERSION,
            shards: shards
                .iter()
                .enumerate()
                .map(|(i, &n)| ShardEntry {
                    url: format!("shard-{i}.tar"),
                    size: 0,
                    samples: (0..n)
                        .map(|j| SampleEntry { key: format!("{i}-{j}"), members: BTreeMap::new() })
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn an_epoch_holds_every_sample_once() {
        let m = manifest(&[5, 7, 3, 9]);
        let order = epoch_order(&m, 7, 0, 2);
        assert_eq!(order.len(), 24);
        let unique: HashSet<_> = order.iter().collect();
        assert_eq!(unique.len(), 24);
        assert_ne!(order, epoch_order(&m, 7, 1, 2), "epochs differ");
        assert_eq!(order, epoch_order(&m, 7, 0, 2), "pure function");
    }

    #[test]
    fn rank_slices_tile_the_global_batch() {
        for w in 1..=5 {
            let mut next = 0;
            for r in 0..w {
                let s = rank_slice(13, r, w);
                assert_eq!(s.start, next);
                next = s.end;
            }
            assert_eq!(next, 13);
        }
    }

    #[test]
    fn order_is_independent_of_world_size() {
        let m = Arc::new(manifest(&[6, 6, 6, 6]));
        let mut plan = SamplePlan::new(m, 3, 2);
        for w in [1usize, 2, 4] {
            let mut got = Vec::new();
            for step in 0..5 {
                for r in 0..w {
                    got.extend(plan.rank_batch(step, 8, r, w).into_iter().map(|s| s.position));
                }
            }
            assert_eq!(got, (0..40).collect::<Vec<u64>>());
        }
    }
}
