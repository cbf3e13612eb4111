//! The sample ledger (`[telemetry] sample_ledger`): one JSON line per event, appended to
//! `<folder>/<job>-<worker id>.jsonl`, so an audit can check that every sample of an epoch went
//! into exactly one applied update, across failures and world-size changes.
//!
//! Two events per step: `contributed` (the keys of this rank's slice, written before its
//! gradients go into the reduction) and `applied` (the step's update is in this rank's state).
//! A step's samples were consumed in the generation whose ranks applied it; slices contributed
//! in a generation that never applied the step were not.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// One ledger line.
#[derive(Debug, Serialize)]
struct Entry<'a> {
    event: &'static str,
    /// Wall-clock time of the event, milliseconds since the Unix epoch.
    unix_ms: u64,
    generation: u64,
    step: u64,
    rank: usize,
    world_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    samples: Option<&'a [String]>,
    /// The global-batch loss of an applied step.
    #[serde(skip_serializing_if = "Option::is_none")]
    loss: Option<f64>,
}

/// An open ledger file.
pub struct Ledger {
    path: PathBuf,
    out: BufWriter<File>,
}

impl Ledger {
    /// Opens (appending) this worker's ledger in `folder`, creating the folder.
    pub fn open(folder: &Path, job: &str, worker_id: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(folder)?;
        let path = folder.join(format!("{job}-{worker_id}.jsonl"));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Self { path, out: BufWriter::new(file) })
    }

    /// Records the keys of the slice this rank is about to reduce for `step`.
    pub fn contributed(&mut self, generation: u64, step: u64, rank: usize, world_size: usize, keys: &[String]) {
        self.write(Entry { event: "contributed", unix_ms: unix_ms_now(), generation, step, rank, world_size, samples: Some(keys), loss: None });
    }

    /// Records that this rank applied `step`'s update, whose global-batch loss was `loss`.
    pub fn applied(&mut self, generation: u64, step: u64, rank: usize, world_size: usize, loss: f64) {
        self.write(Entry { event: "applied", unix_ms: unix_ms_now(), generation, step, rank, world_size, samples: None, loss: Some(loss) });
    }

    fn write(&mut self, entry: Entry<'_>) {
        let line = serde_json::to_string(&entry).expect("ledger entries serialise");
        // Flushed per line: a worker killed right after contributing leaves its line behind. A
        // worker killed inside the write can leave a torn last line (no newline): readers skip it.
        let result = writeln!(self.out, "{line}").and_then(|()| self.out.flush());
        if let Err(e) = result {
            tracing::warn!("sample ledger {}: {e}", self.path.display());
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch.
fn unix_ms_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
