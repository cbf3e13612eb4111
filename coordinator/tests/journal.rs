//! The coordinator's journal and its lease, on `memory://` and local-folder stores, with a
//! hand-moved clock.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use braid_coordinator::journal::{entry_path, Holder, Journal, JournalError, JOURNAL_DIR};
use braid_coordinator::store::{self, StoreRoot};
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions,
    PutPayload, PutResult,
};
use serde::{Deserialize, Serialize};

const JOB: &str = "journal-job";
/// A start time, in Unix milliseconds.
const T0: u64 = 1_700_000_000_000;
const TTL: Duration = Duration::from_secs(10);
const TTL_MS: u64 = 10_000;

/// A stand-in for the coordinator's snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Snap {
    generation: u64,
    cursor: u64,
    checkpoints: Vec<String>,
    note: Option<String>,
}

fn snap(generation: u64) -> Snap {
    Snap {
        generation,
        cursor: generation * 64,
        checkpoints: (0..generation).map(|s| format!("step-{s:06}/manifest.json")).collect(),
        note: (generation % 2 == 1).then(|| format!("odd generation {generation} — ünïcode")),
    }
}

fn holder(name: &str) -> Holder {
    Holder::new(format!("host-{name}"), 1000 + name.len() as u32, format!("id-{name}"))
}

/// A checkpoint root on each backend; the temporary folder lives as long as the root is used.
struct Backend {
    root: StoreRoot,
    _dir: Option<tempfile::TempDir>,
}

fn backends(test: &str) -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let file = store::open(dir.path().join("ckpt").to_str().unwrap()).unwrap();
    let memory = store::open(&format!("memory://journal-{test}/job/ckpt")).unwrap();
    vec![Backend { root: memory, _dir: None }, Backend { root: file, _dir: Some(dir) }]
}

/// The journal entries below `root` (`journal-<12 digits>.json`), oldest first.
async fn seqs(root: &StoreRoot) -> Vec<u64> {
    let listing = root.store().list_with_delimiter(Some(&root.path(JOURNAL_DIR))).await.unwrap();
    let mut seqs: Vec<u64> = listing
        .objects
        .iter()
        .filter_map(|m| m.location.filename()?.strip_prefix("journal-")?.strip_suffix(".json").map(str::to_string))
        .filter(|digits| digits.len() == 12)
        .filter_map(|digits| digits.parse().ok())
        .collect();
    seqs.sort_unstable();
    seqs
}

async fn entry(root: &StoreRoot, seq: u64) -> serde_json::Value {
    serde_json::from_slice(&root.get(&entry_path(seq)).await.unwrap().unwrap()).unwrap()
}

async fn open(root: &StoreRoot, who: &str, now: u64) -> Result<(Journal<Snap>, Option<Snap>), JournalError> {
    Journal::open(root.clone(), JOB, holder(who), TTL, now).await
}

#[tokio::test]
async fn first_open_on_an_empty_root_writes_entry_1() {
    for Backend { root, .. } in backends("first-open") {
        let (journal, previous) = open(&root, "a", T0).await.unwrap();
        assert_eq!(previous, None, "{root}");
        assert_eq!(journal.seq(), 1);
        assert_eq!(seqs(&root).await, vec![1], "{root}");
        let first = entry(&root, 1).await;
        assert_eq!(first["seq"], 1);
        assert_eq!(first["job"], JOB);
        assert_eq!(first["holder"]["id"], "id-a");
        assert_eq!(first["holder"]["host"], "host-a");
        assert_eq!(first["written_at_unix_ms"], T0);
        assert_eq!(first["lease_ttl_ms"], TTL_MS);
        assert!(first["snapshot"].is_null(), "{first}");
        assert_eq!(journal.lease_expires_at_unix_ms(), T0 + TTL_MS);
    }
}

#[tokio::test]
async fn appends_renew_the_lease_and_a_later_coordinator_restores_the_last_snapshot() {
    for Backend { root, .. } in backends("append-restore") {
        let (mut a, _) = open(&root, "a", T0).await.unwrap();
        assert!(!a.renew_due(T0 + TTL_MS / 3 - 1));
        assert!(a.renew_due(T0 + TTL_MS / 3));
        let mut now = T0;
        for generation in 1..=4 {
            now += 3_000;
            a.append(&snap(generation), now).await.unwrap();
            assert!(!a.renew_due(now), "an append renews the lease");
        }
        // A renewal is an append of the unchanged snapshot.
        now += 3_000;
        a.append(&snap(4), now).await.unwrap();
        assert_eq!(a.seq(), 6);
        assert_eq!(seqs(&root).await, (1..=6).collect::<Vec<_>>(), "{root}");
        assert_eq!(entry(&root, 6).await["written_at_unix_ms"], now);

        // A still holds the lease just before it expires...
        let err = open(&root, "b", now + TTL_MS - 1).await.unwrap_err();
        assert!(matches!(err, JournalError::LeaseHeld { .. }), "{err}");
        // ...and B takes over once it has.
        let (b, previous) = open(&root, "b", now + TTL_MS).await.unwrap();
        assert_eq!(previous, Some(snap(4)), "{root}");
        assert_eq!(b.seq(), 7);
        let taken = entry(&root, 7).await;
        assert_eq!(taken["holder"]["id"], "id-b");
        assert_eq!(taken["snapshot"], serde_json::to_value(snap(4)).unwrap(), "the takeover carries the snapshot");

        // Even if B dies at once, the next coordinator gets the same state.
        let (_, again) = open(&root, "c", now + 3 * TTL_MS).await.unwrap();
        assert_eq!(again, Some(snap(4)), "{root}");
    }
}

#[tokio::test]
async fn a_live_lease_refuses_a_second_coordinator_and_names_the_holder() {
    for Backend { root, .. } in backends("live-lease") {
        let (mut a, _) = open(&root, "a", T0).await.unwrap();
        a.append(&snap(1), T0 + 2_000).await.unwrap();
        let before = seqs(&root).await;

        let err = open(&root, "b", T0 + 3_200).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "coordinator host-a:1001 (id id-a) holds job \"{JOB}\"'s lease, renewed 1.2 s ago; it expires in \
                 8.8 s — stop it or wait (lease: {}/coordinator/journal-000000000002.json)",
                root.url()
            )),
            "{text}"
        );
        match err {
            JournalError::LeaseHeld { holder: h, renewed_ms_ago, expires_in_ms, .. } => {
                assert_eq!(h, holder("a"));
                assert_eq!((renewed_ms_ago, expires_in_ms), (1_200, 8_800));
            }
            other => panic!("{other}"),
        }
        assert_eq!(seqs(&root).await, before, "the refused coordinator wrote nothing ({root})");

        // A clock behind the holder's counts the lease as live too.
        let err = open(&root, "b", T0).await.unwrap_err();
        assert!(matches!(err, JournalError::LeaseHeld { renewed_ms_ago: 0, expires_in_ms: TTL_MS, .. }), "{err}");
        assert_eq!(seqs(&root).await, before);
        // A keeps serving undisturbed.
        a.append(&snap(2), T0 + 4_000).await.unwrap();
    }
}

#[tokio::test]
async fn a_coordinator_that_missed_its_renewal_loses_the_lease_to_the_one_that_took_over() {
    for Backend { root, .. } in backends("lease-lost") {
        let (mut a, _) = open(&root, "a", T0).await.unwrap();
        a.append(&snap(1), T0 + 1_000).await.unwrap();
        // A stalls; its lease expires and B takes over.
        let (mut b, previous) = open(&root, "b", T0 + 1_000 + TTL_MS).await.unwrap();
        assert_eq!(previous, Some(snap(1)));

        let err = a.append(&snap(2), T0 + 12_000).await.unwrap_err();
        match &err {
            JournalError::LeaseLost { by, object, job } => {
                assert_eq!(by.as_ref(), Some(&holder("b")));
                assert_eq!(object, &root.url_of(&entry_path(3)));
                assert_eq!(job, JOB);
            }
            other => panic!("{other}"),
        }
        let text = err.to_string();
        assert!(text.contains("lost job") && text.contains("host-b:1001 (id id-b)"), "{text}");
        assert!(text.contains("must stop serving"), "{text}");
        // Once lost, always lost: nothing more is written.
        let err = a.append(&snap(3), T0 + 13_000).await.unwrap_err();
        assert!(matches!(err, JournalError::LeaseLost { .. }), "{err}");
        assert_eq!(seqs(&root).await, vec![1, 2, 3], "{root}");

        b.append(&snap(3), T0 + 14_000).await.unwrap();
        let (_, restored) = open(&root, "c", T0 + 14_000 + TTL_MS).await.unwrap();
        assert_eq!(restored, Some(snap(3)), "B's state, never A's late one");
    }
}

#[tokio::test]
async fn a_coordinator_stalled_past_compaction_still_sees_it_lost_the_lease() {
    for Backend { root, .. } in backends("lost-after-compaction") {
        let (a, _) = open(&root, "a", T0).await.unwrap();
        let mut a = a.with_keep(2);
        let (b, _) = open(&root, "b", T0 + TTL_MS).await.unwrap();
        let mut b = b.with_keep(2);
        for i in 1..=4 {
            b.append(&snap(i), T0 + TTL_MS + i * 1_000).await.unwrap();
        }
        assert_eq!(seqs(&root).await, vec![5, 6], "{root}");
        // A's next number (2) was compacted away, so its create succeeds; the listing shows B's.
        let err = a.append(&snap(9), T0 + 20_000).await.unwrap_err();
        match &err {
            JournalError::LeaseLost { by, object, .. } => {
                assert_eq!(by.as_ref(), Some(&holder("b")));
                assert_eq!(object, &root.url_of(&entry_path(6)));
            }
            other => panic!("{other}"),
        }
        let (_, restored) = open(&root, "c", T0 + 30_000).await.unwrap();
        assert_eq!(restored, Some(snap(4)), "{root}");
    }
}

#[tokio::test]
async fn compaction_keeps_the_newest_entries() {
    for Backend { root, .. } in backends("compaction") {
        let (journal, _) = open(&root, "a", T0).await.unwrap();
        let mut journal = journal.with_keep(3);
        for i in 1..=6 {
            journal.append(&snap(i), T0 + i * 1_000).await.unwrap();
            let expected: Vec<u64> = ((i + 1).saturating_sub(2).max(1)..=i + 1).collect();
            assert_eq!(seqs(&root).await, expected, "after append {i} ({root})");
        }
        let (_, restored) = open(&root, "b", T0 + 6_000 + TTL_MS).await.unwrap();
        assert_eq!(restored, Some(snap(6)));

        // The default keeps 8.
        let (mut c, _) = open(&root, "c", T0 + 100_000).await.unwrap();
        for i in 0..10 {
            c.append(&snap(i), T0 + 100_000 + i).await.unwrap();
        }
        assert_eq!(seqs(&root).await, (12..=19).collect::<Vec<_>>(), "{root}");
    }
}

#[tokio::test]
async fn unrelated_files_are_ignored() {
    for Backend { root, .. } in backends("unrelated") {
        for rel in [
            "coordinator/notes.txt",
            "coordinator/journal-7.json",
            "coordinator/journal-000000000099.json.tmp",
            "coordinator/journal-00000000009x.json",
            "coordinator/old/journal-000000000050.json",
            "journal-000000000040.json",
            "step-000010/manifest.json",
        ] {
            root.put(rel, "not an entry").await.unwrap();
        }
        let (journal, previous) = open(&root, "a", T0).await.unwrap();
        assert_eq!((previous, journal.seq()), (None, 1), "{root}");
        let mut journal = journal.with_keep(1);
        journal.append(&snap(1), T0 + 1).await.unwrap();
        journal.append(&snap(2), T0 + 2).await.unwrap();
        assert_eq!(seqs(&root).await, vec![3]);
        assert_eq!(root.get("coordinator/notes.txt").await.unwrap().unwrap(), "not an entry", "compaction leaves it");
        assert!(root.get("coordinator/journal-000000000099.json.tmp").await.unwrap().is_some());
    }
}

/// Collects what `tracing` logs on this thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

#[tokio::test]
async fn a_corrupt_newest_entry_falls_back_to_the_one_before_it_and_says_so() {
    for Backend { root, .. } in backends("corrupt") {
        let (mut a, _) = open(&root, "a", T0).await.unwrap();
        a.append(&snap(1), T0 + 1_000).await.unwrap();
        a.append(&snap(2), T0 + 2_000).await.unwrap();
        root.put(&entry_path(3), "{\"seq\": 3, \"holder\": ").await.unwrap();

        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt().with_writer(logs.clone()).with_ansi(false).finish();
        let restored = {
            let _guard = tracing::subscriber::set_default(subscriber);
            open(&root, "b", T0 + 2_000 + TTL_MS).await
        };
        let (b, restored) = restored.unwrap();
        assert_eq!(restored, Some(snap(1)), "{root}");
        assert_eq!(b.seq(), 4, "the new entry goes after the corrupt one");
        let text = logs.text();
        assert!(text.contains("WARN"), "{text}");
        assert!(text.contains(&root.url_of(&entry_path(3))) && text.contains("falling back"), "{text}");
        assert_eq!(entry(&root, 4).await["snapshot"], serde_json::to_value(snap(1)).unwrap());

        // An entry whose content names another number is not trusted either.
        let moved = root.get(&entry_path(4)).await.unwrap().unwrap();
        root.put(&entry_path(9), moved).await.unwrap();
        let (_, restored) = open(&root, "c", T0 + 100_000).await.unwrap();
        assert_eq!(restored, Some(snap(1)), "entry 4 is read, not 9 ({root})");
    }
}

#[tokio::test]
async fn a_journal_with_no_readable_entry_is_an_error_naming_them() {
    for Backend { root, .. } in backends("all-corrupt") {
        let (mut a, _) = open(&root, "a", T0).await.unwrap();
        a.append(&snap(1), T0 + 1_000).await.unwrap();
        root.put(&entry_path(1), "").await.unwrap();
        root.put(&entry_path(2), "{\"seq\": 2}").await.unwrap();

        let err = open(&root, "b", T0 + 100_000).await.unwrap_err();
        let text = err.to_string();
        match &err {
            JournalError::Corrupt { objects } => assert_eq!(objects.len(), 2, "{text}"),
            other => panic!("{other}"),
        }
        for seq in [1, 2] {
            assert!(text.contains(&root.url_of(&entry_path(seq))), "{text}");
        }
        assert!(text.contains("cannot be restored"), "{text}");
        assert_eq!(seqs(&root).await, vec![1, 2], "nothing written over them ({root})");
    }
}

#[tokio::test]
async fn a_journal_of_another_job_is_refused() {
    for Backend { root, .. } in backends("other-job") {
        let (_a, _) = Journal::<Snap>::open(root.clone(), "other", holder("a"), TTL, T0).await.unwrap();
        let err = open(&root, "b", T0 + 100_000).await.unwrap_err();
        assert!(matches!(err, JournalError::OtherJob { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("\"other\"") && text.contains(JOB) && text.contains(&entry_path(1)), "{text}");
    }
}

#[tokio::test]
async fn the_same_holder_reopens_at_once() {
    let root = store::open("memory://journal-same-holder/ckpt").unwrap();
    let (mut a, _) = open(&root, "a", T0).await.unwrap();
    a.append(&snap(1), T0 + 1).await.unwrap();
    let (a2, restored) = open(&root, "a", T0 + 2).await.unwrap();
    assert_eq!((restored, a2.seq()), (Some(snap(1)), 3));
}

/// Something [`Meddling`] does around the next put to `path`.
enum Meddle {
    /// Another coordinator writes `bytes` there just before.
    WriteFirst(Bytes),
    /// The put takes effect but its caller sees an error (a lost reply).
    FailAfter,
}

/// An in-memory store that meddles with one put, as another process or a flaky network would.
#[derive(Debug, Default)]
struct Meddling {
    inner: InMemory,
    plan: Mutex<Option<(ObjectPath, MeddleDebug)>>,
}

/// [`Meddle`] with a `Debug` impl the store needs.
struct MeddleDebug(Meddle);

impl std::fmt::Debug for MeddleDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("meddle")
    }
}

impl std::fmt::Display for Meddling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Meddling")
    }
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = object_store::Result<T>> + Send + 'a>>;

impl ObjectStore for Meddling {
    fn put_opts<'a, 'b, 'c>(
        &'a self,
        location: &'b ObjectPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Boxed<'c, PutResult>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        Box::pin(async move {
            let meddle = {
                let mut plan = self.plan.lock().unwrap();
                match plan.take() {
                    Some((path, meddle)) if &path == location => Some(meddle.0),
                    other => {
                        *plan = other;
                        None
                    }
                }
            };
            match meddle {
                Some(Meddle::WriteFirst(bytes)) => {
                    self.inner.put(location, bytes.into()).await?;
                    self.inner.put_opts(location, payload, opts).await
                }
                Some(Meddle::FailAfter) => {
                    self.inner.put_opts(location, payload, opts).await?;
                    Err(object_store::Error::Generic { store: "Meddling", source: "connection reset".into() })
                }
                None => self.inner.put_opts(location, payload, opts).await,
            }
        })
    }

    fn put_multipart_opts<'a, 'b, 'c>(
        &'a self,
        location: &'b ObjectPath,
        opts: PutMultipartOptions,
    ) -> Boxed<'c, Box<dyn MultipartUpload>>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        self.inner.put_multipart_opts(location, opts)
    }

    fn get_opts<'a, 'b, 'c>(&'a self, location: &'b ObjectPath, options: GetOptions) -> Boxed<'c, GetResult>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        self.inner.get_opts(location, options)
    }

    fn delete<'a, 'b, 'c>(&'a self, location: &'b ObjectPath) -> Boxed<'c, ()>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        self.inner.delete(location)
    }

    fn list(&self, prefix: Option<&ObjectPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_delimiter<'a, 'b, 'c>(&'a self, prefix: Option<&'b ObjectPath>) -> Boxed<'c, ListResult>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        self.inner.list_with_delimiter(prefix)
    }

    fn copy<'a, 'b, 'd, 'c>(&'a self, from: &'b ObjectPath, to: &'d ObjectPath) -> Boxed<'c, ()>
    where
        'a: 'c,
        'b: 'c,
        'd: 'c,
        Self: 'c,
    {
        self.inner.copy(from, to)
    }

    fn copy_if_not_exists<'a, 'b, 'd, 'c>(&'a self, from: &'b ObjectPath, to: &'d ObjectPath) -> Boxed<'c, ()>
    where
        'a: 'c,
        'b: 'c,
        'd: 'c,
        Self: 'c,
    {
        self.inner.copy_if_not_exists(from, to)
    }
}

fn meddling_root() -> (Arc<Meddling>, StoreRoot) {
    let store = Arc::new(Meddling::default());
    let root = StoreRoot::new(store.clone(), ObjectPath::from("ckpt"), "memory://meddling/ckpt");
    (store, root)
}

fn meddle(store: &Meddling, root: &StoreRoot, seq: u64, meddle: Meddle) {
    *store.plan.lock().unwrap() = Some((root.path(&entry_path(seq)), MeddleDebug(meddle)));
}

#[tokio::test]
async fn two_coordinators_taking_over_at_once_one_loses_the_race() {
    let (store, root) = meddling_root();
    let (mut a, _) = open(&root, "a", T0).await.unwrap();
    a.append(&snap(1), T0 + 1_000).await.unwrap();
    // B and C both see A's lease expired; C's entry 3 lands between B's read and B's write.
    let c_entry = serde_json::json!({
        "seq": 3, "holder": holder("c"), "written_at_unix_ms": T0 + 11_000, "lease_ttl_ms": TTL_MS,
        "job": JOB, "snapshot": snap(1),
    });
    meddle(&store, &root, 3, Meddle::WriteFirst(serde_json::to_vec(&c_entry).unwrap().into()));
    let err = open(&root, "b", T0 + 11_000).await.unwrap_err();
    match &err {
        JournalError::LostRace { by, object, .. } => {
            assert_eq!(by.as_ref(), Some(&holder("c")));
            assert_eq!(object, "memory://meddling/ckpt/coordinator/journal-000000000003.json");
        }
        other => panic!("{other}"),
    }
    let text = err.to_string();
    assert!(text.contains("coordinator host-c:1001 (id id-c) took job") && text.contains("first"), "{text}");
    assert_eq!(entry(&root, 3).await["holder"]["id"], "id-c", "B did not overwrite C's entry");
}

#[tokio::test]
async fn an_append_whose_reply_was_lost_is_not_mistaken_for_a_lost_lease() {
    let (store, root) = meddling_root();
    let (mut a, _) = open(&root, "a", T0).await.unwrap();
    meddle(&store, &root, 2, Meddle::FailAfter);
    let err = a.append(&snap(1), T0 + 1_000).await.unwrap_err();
    assert!(matches!(&err, JournalError::Store(_)), "{err}");
    assert!(err.to_string().contains("journal-000000000002.json"), "the error names the object: {err}");
    // Entry 2 did land; the retry finds it is A's own and writes after it.
    a.append(&snap(2), T0 + 2_000).await.unwrap();
    assert_eq!(a.seq(), 3);
    assert_eq!(seqs(&root).await, vec![1, 2, 3]);
    let (_, restored) = open(&root, "b", T0 + 2_000 + TTL_MS).await.unwrap();
    assert_eq!(restored, Some(snap(2)));
}

#[test]
fn this_process_names_its_host_and_pid() {
    let me = Holder::this_process();
    let other = Holder::this_process();
    assert_eq!(me.pid, std::process::id());
    assert!(!me.host.is_empty());
    assert_ne!(me.id, other.id, "every process start gets a fresh id");
    assert_eq!(me.to_string(), format!("{}:{} (id {})", me.host, me.pid, me.id));
}
