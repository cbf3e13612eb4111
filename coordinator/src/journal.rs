//! The coordinator's journal: snapshots of its own state (generation, committed cursor,
//! checkpoints) written to the job's object store, with a lease, so that a restarted coordinator
//! resumes the job and a second one cannot split it.
//!
//! Layout below the checkpoint root:
//! ```text
//! coordinator/journal-000000000007.json   { seq, holder, written_at_unix_ms, lease_ttl_ms, job, snapshot }
//! coordinator/journal-000000000008.json   the newest entry: the lease
//! ```
//!
//! Every entry is written with a create-only put, so entry `n` is written by exactly one
//! coordinator; a second one gets "already exists" and knows it lost. The newest entry is the
//! lease: its holder owns the job until `written_at_unix_ms + lease_ttl_ms` and keeps it by
//! appending (at least every third of the ttl, see [`Journal::renew_due`]). [`Journal::open`]
//! refuses to start while another holder's lease is live; once it has expired it takes over by
//! writing the next entry, which carries the newest snapshot forward. Only the newest
//! [`DEFAULT_KEEP`] entries are kept.
//!
//! Time is an argument (`now_unix_ms`, see [`unix_ms`]) so tests move the clock by hand.

use std::marker::PhantomData;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::path::Path as ObjectPath;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::store::StoreRoot;

/// The folder below the checkpoint root that holds the journal.
pub const JOURNAL_DIR: &str = "coordinator";

/// How many of the newest entries compaction keeps.
pub const DEFAULT_KEEP: usize = 8;

/// The journal entry `seq`, relative to the checkpoint root: `coordinator/journal-<seq:012>.json`.
pub fn entry_path(seq: u64) -> String {
    format!("{JOURNAL_DIR}/journal-{seq:012}.json")
}

/// The sequence number of a journal entry's file name; `None` for any other name.
fn parse_entry_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("journal-")?.strip_suffix(".json")?;
    if digits.len() != 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Milliseconds since the Unix epoch (0 before it), the journal's clock.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX))
}

/// One coordinator process, as named in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The machine's host name.
    pub host: String,
    /// The process id.
    pub pid: u32,
    /// A random id, fresh for every process (pids and host names repeat).
    pub id: String,
}

impl Holder {
    /// True when this holder is a process of this machine that no longer runs (Linux: judged
    /// from `/proc`; elsewhere never), so its lease can be taken over before it expires.
    pub fn has_exited_locally(&self) -> bool {
        let this = Holder::this_process();
        std::path::Path::new("/proc/self").exists()
            && self.host == this.host
            && self.pid != this.pid
            && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    /// A holder with the given parts.
    pub fn new(host: impl Into<String>, pid: u32, id: impl Into<String>) -> Self {
        Self { host: host.into(), pid, id: id.into() }
    }

    /// This process: its host name (from the kernel, else `$HOSTNAME`), pid and a random id.
    pub fn this_process() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| std::env::var("COMPUTERNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".to_string());
        Self::new(host, std::process::id(), uuid::Uuid::new_v4().simple().to_string())
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} (id {})", self.host, self.pid, self.id)
    }
}

/// One journal entry, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry<T> {
    /// Its number; it matches the object's name.
    pub seq: u64,
    /// The coordinator that wrote it, which holds the lease while this is the newest entry.
    pub holder: Holder,
    /// When it was written, by the holder's clock.
    pub written_at_unix_ms: u64,
    /// How long after `written_at_unix_ms` the lease lasts unless renewed.
    pub lease_ttl_ms: u64,
    /// Job id.
    pub job: String,
    /// The coordinator's state; `null` when the job has no state yet (the first coordinator's
    /// first entry).
    pub snapshot: Option<T>,
}

/// The part of an entry that names who wrote it, readable whatever the snapshot's type.
#[derive(Deserialize)]
struct EntryHolder {
    holder: Holder,
}

/// `by` for messages: the coordinator, or that it is not known.
fn named(by: &Option<Holder>) -> String {
    match by {
        Some(holder) => format!("coordinator {holder}"),
        None => "a coordinator whose entry cannot be read".to_string(),
    }
}

/// Milliseconds as seconds, for messages.
fn seconds(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// Everything that can go wrong with the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Another coordinator's lease is live: this one must not serve the job.
    #[error(
        "coordinator {holder} holds job {job:?}'s lease, renewed {} ago; it expires in {} — stop it or wait \
         (lease: {object})",
        seconds(*renewed_ms_ago),
        seconds(*expires_in_ms)
    )]
    LeaseHeld {
        /// Job id.
        job: String,
        /// The coordinator holding the lease.
        holder: Holder,
        /// The entry that is the lease.
        object: String,
        /// How long ago, by this coordinator's clock, the holder last renewed it.
        renewed_ms_ago: u64,
        /// How long until it expires unless renewed.
        expires_in_ms: u64,
    },
    /// Another coordinator took over the expired lease at the same time and wrote its entry first.
    #[error(
        "{} took job {job:?}'s lease first: it wrote {object} while this coordinator was taking over; \
         only one coordinator may serve the job",
        named(by)
    )]
    LostRace {
        /// Job id.
        job: String,
        /// The entry the other coordinator wrote.
        object: String,
        /// The other coordinator.
        by: Option<Holder>,
    },
    /// A newer entry than this coordinator's last one exists: another coordinator took the lease
    /// over (this one failed to renew it in time). This coordinator must stop serving.
    #[error(
        "this coordinator lost job {job:?}'s lease to {}, which wrote {object}; it must stop serving the job",
        named(by)
    )]
    LeaseLost {
        /// Job id.
        job: String,
        /// The newer entry.
        object: String,
        /// The coordinator that wrote it.
        by: Option<Holder>,
    },
    /// The journal belongs to another job.
    #[error("{object} journals job {found:?}, not {expected:?}: two jobs share one checkpoint root")]
    OtherJob {
        /// The newest entry.
        object: String,
        /// This coordinator's job.
        expected: String,
        /// The job it names.
        found: String,
    },
    /// Journal entries exist but none can be read.
    #[error(
        "no coordinator journal entry can be read, so the job's coordinator state cannot be restored \
         (move them aside to start it afresh):\n  - {}",
        objects.join("\n  - ")
    )]
    Corrupt {
        /// Every entry, with why it cannot be read.
        objects: Vec<String>,
    },
    /// A snapshot that cannot be written as JSON.
    #[error("cannot encode journal entry {object}: {reason}")]
    Encode {
        /// The entry being written.
        object: String,
        /// The encoder's message.
        reason: String,
    },
    /// An object-store operation failed (the error names the object).
    #[error(transparent)]
    Store(#[from] Error),
}

/// The entries in the journal folder, oldest first; other files are ignored.
async fn list_entries(root: &StoreRoot) -> Result<Vec<(u64, ObjectPath)>, JournalError> {
    let listing = root
        .store()
        .list_with_delimiter(Some(&root.path(JOURNAL_DIR)))
        .await
        .map_err(|source| Error::Store { url: root.url_of(JOURNAL_DIR), source })?;
    let mut entries: Vec<(u64, ObjectPath)> = listing
        .objects
        .into_iter()
        .filter_map(|meta| Some((parse_entry_name(meta.location.filename()?)?, meta.location)))
        .collect();
    entries.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(entries)
}

/// Parses entry `seq`; the reason it cannot be used otherwise.
fn parse_entry<T: DeserializeOwned>(bytes: &[u8], seq: u64) -> Result<Entry<T>, String> {
    let entry: Entry<T> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if entry.seq != seq {
        return Err(format!("it holds seq {}, its name says {seq}", entry.seq));
    }
    Ok(entry)
}

/// The newest readable entry of `entries` (oldest first). An unreadable entry is logged and
/// skipped for the one before it; if there are entries and none can be read, that is an error.
async fn read_newest<T: DeserializeOwned>(
    root: &StoreRoot,
    entries: &[(u64, ObjectPath)],
) -> Result<Option<Entry<T>>, JournalError> {
    let mut bad = Vec::new();
    for &(seq, _) in entries.iter().rev() {
        let rel = entry_path(seq);
        let url = root.url_of(&rel);
        // An entry listed but gone was compacted away meanwhile; older ones are gone too.
        let Some(bytes) = root.get(&rel).await? else { continue };
        match parse_entry(&bytes, seq) {
            Ok(entry) => return Ok(Some(entry)),
            Err(reason) => {
                tracing::warn!(
                    "coordinator journal entry {url} cannot be read ({reason}); falling back to the entry before it"
                );
                bad.push(format!("{url}: {reason}"));
            }
        }
    }
    if bad.is_empty() {
        Ok(None)
    } else {
        Err(JournalError::Corrupt { objects: bad })
    }
}

/// Who wrote entry `seq`, if it can be read.
async fn read_holder(root: &StoreRoot, seq: u64) -> Option<Holder> {
    let bytes = root.get(&entry_path(seq)).await.ok()??;
    serde_json::from_slice::<EntryHolder>(&bytes).ok().map(|e| e.holder)
}

/// A coordinator's handle on its job's journal, holding the lease. Created by [`Journal::open`].
#[derive(Debug)]
pub struct Journal<T> {
    root: StoreRoot,
    job: String,
    holder: Holder,
    lease_ttl_ms: u64,
    keep: usize,
    /// The newest entry this coordinator wrote.
    seq: u64,
    /// When it wrote it.
    written_at_unix_ms: u64,
    /// The entry that took the lease from this coordinator, once one was seen.
    lost_to: Option<(String, Option<Holder>)>,
    snapshot: PhantomData<fn(T) -> T>,
}

impl<T: Serialize + DeserializeOwned> Journal<T> {
    /// Opens the journal of `job` below `root` (the checkpoint root) and takes its lease for
    /// `holder`, lasting `lease_ttl` past each write. Returns the journal and the newest snapshot
    /// (`None` on a fresh root); the entry written to take the lease carries that snapshot, so it
    /// survives even if this coordinator stops before its first append. Whether another holder's
    /// lease is live is judged by the ttl that holder wrote and this coordinator's clock. Fails with [`JournalError::LeaseHeld`] while another holder's
    /// lease is live (nothing is written then), with [`JournalError::LostRace`] when another
    /// coordinator took the lease over at the same time, and with [`JournalError::Corrupt`] when
    /// entries exist and none can be read.
    pub async fn open(
        root: StoreRoot,
        job: &str,
        holder: Holder,
        lease_ttl: Duration,
        now_unix_ms: u64,
    ) -> Result<(Self, Option<T>), JournalError> {
        Self::open_unless_gone(root, job, holder, lease_ttl, now_unix_ms, |_| false).await
    }

    /// [`Journal::open`], treating the lease of a holder for which `gone` is true (a process
    /// known to have exited) as expired.
    pub async fn open_unless_gone(
        root: StoreRoot,
        job: &str,
        holder: Holder,
        lease_ttl: Duration,
        now_unix_ms: u64,
        gone: impl Fn(&Holder) -> bool,
    ) -> Result<(Self, Option<T>), JournalError> {
        let entries = list_entries(&root).await?;
        let newest_seq = entries.last().map_or(0, |(seq, _)| *seq);
        let newest: Option<Entry<T>> = read_newest(&root, &entries).await?;
        if let Some(entry) = &newest {
            let object = root.url_of(&entry_path(entry.seq));
            if entry.job != job {
                return Err(JournalError::OtherJob { object, expected: job.to_string(), found: entry.job.clone() });
            }
            if entry.holder != holder {
                let age = now_unix_ms.saturating_sub(entry.written_at_unix_ms);
                if age < entry.lease_ttl_ms && gone(&entry.holder) {
                    tracing::info!("taking over job {job:?} from coordinator {}, which has exited ({object})", entry.holder);
                } else if age < entry.lease_ttl_ms {
                    return Err(JournalError::LeaseHeld {
                        job: job.to_string(),
                        holder: entry.holder.clone(),
                        object,
                        renewed_ms_ago: age,
                        expires_in_ms: entry.lease_ttl_ms - age,
                    });
                } else {
                    tracing::info!(
                        "taking over job {job:?} from coordinator {}, whose lease expired {} ago ({object})",
                        entry.holder,
                        seconds(age - entry.lease_ttl_ms)
                    );
                }
            }
        }
        let previous = newest.and_then(|entry| entry.snapshot);
        let mut journal = Self {
            root,
            job: job.to_string(),
            holder,
            lease_ttl_ms: lease_ttl.as_millis().try_into().unwrap_or(u64::MAX),
            keep: DEFAULT_KEEP,
            seq: newest_seq,
            written_at_unix_ms: now_unix_ms,
            lost_to: None,
            snapshot: PhantomData,
        };
        let seq = newest_seq + 1;
        if !journal.put_entry(seq, previous.as_ref(), now_unix_ms).await? {
            return Err(JournalError::LostRace {
                job: journal.job.clone(),
                object: journal.root.url_of(&entry_path(seq)),
                by: read_holder(&journal.root, seq).await,
            });
        }
        journal.seq = seq;
        Ok((journal, previous))
    }

    /// Keeps the newest `keep` entries (at least 1) from the next append on; the default is
    /// [`DEFAULT_KEEP`].
    pub fn with_keep(mut self, keep: usize) -> Self {
        self.keep = keep.max(1);
        self
    }

    /// Writes `snapshot` as the next entry, which renews the lease, then deletes entries older
    /// than the newest `keep` (best effort). Fails with [`JournalError::LeaseLost`] when another
    /// coordinator has written a newer entry: the caller must stop serving the job, and every
    /// later append fails the same way. After a store error it is safe to append again.
    pub async fn append(&mut self, snapshot: &T, now_unix_ms: u64) -> Result<(), JournalError> {
        if let Some((object, by)) = &self.lost_to {
            return Err(self.lease_lost(object.clone(), by.clone()));
        }
        loop {
            let seq = self.seq + 1;
            if self.put_entry(seq, Some(snapshot), now_unix_ms).await? {
                self.seq = seq;
                self.written_at_unix_ms = now_unix_ms;
                break;
            }
            let by = read_holder(&self.root, seq).await;
            if by.as_ref() == Some(&self.holder) {
                // An earlier put of ours that reported an error but took effect.
                self.seq = seq;
                continue;
            }
            return Err(self.lose(seq, by));
        }
        // A coordinator stalled past its lease may find its next number free because the new
        // holder compacted it away: the newer entries are still listed.
        let entries = list_entries(&self.root).await?;
        if let Some(&(newest, _)) = entries.last().filter(|(newest, _)| *newest > self.seq) {
            let by = read_holder(&self.root, newest).await;
            return Err(self.lose(newest, by));
        }
        self.compact(&entries).await;
        Ok(())
    }

    /// Writes `snapshot` as a final entry whose lease has already expired, so the job's next
    /// coordinator can start at once (after the job ended, or on a clean shutdown). Later
    /// appends renew with a zero ttl too.
    pub async fn release(&mut self, snapshot: &T, now_unix_ms: u64) -> Result<(), JournalError> {
        self.lease_ttl_ms = 0;
        self.append(snapshot, now_unix_ms).await
    }

    /// Whether a third of the lease's ttl has passed since this coordinator's last write, so it
    /// should append (an unchanged snapshot will do) to keep the lease.
    pub fn renew_due(&self, now_unix_ms: u64) -> bool {
        now_unix_ms.saturating_sub(self.written_at_unix_ms) >= self.lease_ttl_ms / 3
    }

    /// The newest entry this coordinator wrote.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// When this coordinator's lease expires unless renewed.
    pub fn lease_expires_at_unix_ms(&self) -> u64 {
        self.written_at_unix_ms.saturating_add(self.lease_ttl_ms)
    }

    /// This coordinator.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// The job journaled.
    pub fn job(&self) -> &str {
        &self.job
    }

    /// The checkpoint root the journal lives under.
    pub fn root(&self) -> &StoreRoot {
        &self.root
    }

    /// Writes entry `seq` create-only; `Ok(false)` when it already exists.
    async fn put_entry(&self, seq: u64, snapshot: Option<&T>, now_unix_ms: u64) -> Result<bool, JournalError> {
        let rel = entry_path(seq);
        let entry = Entry {
            seq,
            holder: self.holder.clone(),
            written_at_unix_ms: now_unix_ms,
            lease_ttl_ms: self.lease_ttl_ms,
            job: self.job.clone(),
            snapshot,
        };
        let json = serde_json::to_vec_pretty(&entry)
            .map_err(|e| JournalError::Encode { object: self.root.url_of(&rel), reason: e.to_string() })?;
        Ok(self.root.put_create(&rel, json).await?)
    }

    /// Records that entry `seq`, written by `by`, took the lease, and returns the error saying so.
    fn lose(&mut self, seq: u64, by: Option<Holder>) -> JournalError {
        let object = self.root.url_of(&entry_path(seq));
        self.lost_to = Some((object.clone(), by.clone()));
        self.lease_lost(object, by)
    }

    fn lease_lost(&self, object: String, by: Option<Holder>) -> JournalError {
        JournalError::LeaseLost { job: self.job.clone(), object, by }
    }

    /// Deletes every entry of `entries` (oldest first) but the newest `keep`; failures are logged.
    async fn compact(&self, entries: &[(u64, ObjectPath)]) {
        let old = entries.len().saturating_sub(self.keep);
        for (seq, path) in &entries[..old] {
            match self.root.store().delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(
                    "cannot delete old coordinator journal entry {}: {e}",
                    self.root.url_of(&entry_path(*seq))
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_entry_names_are_entries() {
        assert_eq!(entry_path(7), "coordinator/journal-000000000007.json");
        assert_eq!(parse_entry_name("journal-000000000007.json"), Some(7));
        for other in [
            "journal-7.json",
            "journal-0000000000007.json",
            "journal-000000000007.json.tmp",
            "journal-000000000007.json#1",
            "journal-00000000000x.json",
            "journal-+00000000007.json",
            "notes.txt",
        ] {
            assert_eq!(parse_entry_name(other), None, "{other}");
        }
    }

    #[test]
    fn lease_messages_name_the_holder_and_the_times() {
        let err = JournalError::LeaseHeld {
            job: "j".into(),
            holder: Holder::new("host", 1234, "abc"),
            object: "memory://x/coordinator/journal-000000000003.json".into(),
            renewed_ms_ago: 1_200,
            expires_in_ms: 8_800,
        };
        assert_eq!(
            err.to_string(),
            "coordinator host:1234 (id abc) holds job \"j\"'s lease, renewed 1.2 s ago; it expires in 8.8 s — stop \
             it or wait (lease: memory://x/coordinator/journal-000000000003.json)"
        );
    }
}
