//! The embedded backend: one redb file, for a single broker node with zero setup.
//!
//! Layout (redb tables):
//! - `records`: `(scope, collection, id)` → 8-byte big-endian version followed by the data.
//! - `streams`: `(scope, stream, id)` → data; ids are zero-padded sequence numbers, so string order
//!   is append order.
//! - `stream_meta`: `(scope, stream)` → `(last sequence number, entry count)`.
//! - `leases`: name → `(owner, fence, expiry in Unix milliseconds)`; a released or expired lease
//!   keeps its row so the next owner gets a higher fence.
//! - `schedule`: `(schedule, member)` → due time (Unix milliseconds), and `schedule_due`:
//!   `(schedule, due, member)` → `()`, its index in due order. Both change in one write
//!   transaction, so [`Store::due`] is a range scan of the index.
//! - `journal`: `"applied"` → the sequence number of the last append group the database holds
//!   (see the `journal` module: stream appends are made durable by a journal file beside the
//!   database, `<path>.journal`; the database gets them in batches, before any read of a
//!   stream, and catches up with the journal when opened).
//!
//! redb is synchronous: every operation runs in one redb transaction on tokio's blocking pool, and
//! every precondition is checked inside the write transaction that performs the write. redb locks
//! the file, so a second process opening it gets [`StoreError::Unavailable`] naming the path.

use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::journal::{Journal, JournalEntry, JournalGroup};
use crate::{
    Lease, Notice, Precondition, Record, RecordKey, Scope, ScopeRead, Store, StoreError,
    StoreResult, StreamEntry,
};

type Key3<'a> = (&'a str, &'a str, &'a str);

const RECORDS: TableDefinition<Key3, &[u8]> = TableDefinition::new("records");
const STREAMS: TableDefinition<Key3, &[u8]> = TableDefinition::new("streams");
const STREAM_META: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("stream_meta");
const LEASES: TableDefinition<&str, (&str, u64, u64)> = TableDefinition::new("leases");
const SCHEDULE: TableDefinition<(&str, &str), i64> = TableDefinition::new("schedule");
const SCHEDULE_DUE: TableDefinition<(&str, i64, &str), ()> = TableDefinition::new("schedule_due");
const JOURNAL: TableDefinition<&str, u64> = TableDefinition::new("journal");
const JOURNAL_APPLIED: &str = "applied";

const VERSION_LEN: usize = 8;

/// The embedded single-file store. Cheap to clone; the file closes when the last clone drops.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
    /// Notifications (one process: delivered in memory), as `(channel, message)`.
    notices: tokio::sync::broadcast::Sender<(&'static str, String)>,
    /// Stream appends waiting for the next group commit (see [`EmbeddedStore::commit_appends`]).
    appends: Arc<Mutex<AppendQueue>>,
    /// Each scope's generation ([`Store::get_many_since`]); one process holds the file, so
    /// memory is where they live.
    generations: Arc<Generations>,
    /// The append journal, the next group's sequence number and each stream's last sequence
    /// number; only the group committer uses it.
    journal: Arc<Mutex<JournalState>>,
    /// Groups durable in the journal and answered, not yet written to the database (see
    /// [`apply_unapplied`]).
    unapplied: Arc<Mutex<Unapplied>>,
}

#[derive(Debug)]
struct JournalState {
    journal: Journal,
    next_lsn: u64,
    /// Each scope's last sequence number over all its streams, by scope key: read from the
    /// database the first time the scope is appended to, then kept here (the group committer
    /// is the only writer of sequence numbers, and the database may lag behind by the
    /// unapplied groups). One sequence per scope orders the entries of its streams among each
    /// other too (the audit log lists its kinds merged by id). Bounded by [`LAST_SEQ_MAX`]
    /// scopes.
    last_seq: std::collections::HashMap<String, u64>,
}

/// Scopes whose last sequence numbers the group committer keeps; past this it applies
/// every pending group and starts afresh (reading them from the database again).
const LAST_SEQ_MAX: usize = 65_536;

/// Groups the journal holds and the database does not yet: written to the database in one
/// transaction when [`Unapplied::due`], before any read or trim of a stream, and by every
/// checkpoint. The mutex is held while they are written, so a reader that finds it empty
/// sees every answered append in the database.
#[derive(Debug, Default)]
struct Unapplied {
    groups: Vec<JournalGroup>,
    entries: usize,
    /// When the oldest of them was answered.
    since: Option<std::time::Instant>,
}

/// The group committer writes the unapplied groups to the database once the oldest is this
/// old...
const APPLY_AFTER: Duration = Duration::from_millis(25);
/// ...or they hold this many appends.
const APPLY_ENTRIES: usize = 2048;

impl Unapplied {
    fn due(&self) -> bool {
        self.entries >= APPLY_ENTRIES || self.since.is_some_and(|t| t.elapsed() >= APPLY_AFTER)
    }

    fn push(&mut self, group: JournalGroup) {
        self.entries += group.entries.len();
        self.since.get_or_insert_with(std::time::Instant::now);
        self.groups.push(group);
    }

    /// Takes the last group out again (one that was not answered).
    fn pop(&mut self) {
        if let Some(group) = self.groups.pop() {
            self.entries -= group.entries.len();
        }
        if self.groups.is_empty() {
            self.clear();
        }
    }

    fn clear(&mut self) {
        self.groups.clear();
        self.entries = 0;
        self.since = None;
    }
}

/// The generations of the scopes written since the store was opened; every other scope is at
/// the generation of the opening.
#[derive(Debug)]
struct Generations {
    opened: u64,
    by_scope: Mutex<std::collections::HashMap<String, u64>>,
}

impl Generations {
    fn new() -> Self {
        Self {
            opened: now_micros(),
            by_scope: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u64>> {
        self.by_scope
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, scope: &str) -> u64 {
        self.lock().get(scope).copied().unwrap_or(self.opened)
    }

    fn bump(&self, scope: String) {
        let mut by_scope = self.lock();
        let last = by_scope.get(&scope).copied().unwrap_or(self.opened);
        by_scope.insert(scope, crate::next_generation(last, now_micros()));
    }
}

/// Gives a scope its next generation when dropped: a write transaction declared after it has
/// ended (committed, failed or aborted) by then, so the write is visible before the generation
/// changes, whatever way the closure left.
struct BumpOnDrop<'a>(&'a Generations, String);

impl Drop for BumpOnDrop<'_> {
    fn drop(&mut self) {
        self.0.bump(std::mem::take(&mut self.1));
    }
}

/// Most appends one group commit writes in its transaction.
const MAX_GROUP_COMMIT: usize = 1024;

/// Appends waiting to be committed, and whether a committer is running.
#[derive(Default)]
struct AppendQueue {
    pending: Vec<PendingAppend>,
    /// A committer is running and takes `pending` before it stops.
    committing: bool,
}

/// One `append` waiting for its group commit; `done` gets its id once the transaction holding
/// it is durable (or the commit's error).
struct PendingAppend {
    scope: String,
    stream: &'static str,
    data: Vec<u8>,
    max_len: u64,
    done: tokio::sync::oneshot::Sender<StoreResult<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Lets the next append start a committer again if this one ends, even by a panic (then the
/// appends it had not taken fail instead of waiting for ever).
struct CommitterGuard<'a>(&'a Mutex<AppendQueue>);

impl Drop for CommitterGuard<'_> {
    fn drop(&mut self) {
        let mut queue = lock(self.0);
        queue.committing = false;
        if std::thread::panicking() {
            queue.pending.clear();
        }
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

impl EmbeddedStore {
    /// Release (`ttl` = `None`: no owner, expired) or renewal (`Some`: the owner, `now + ttl`) of a
    /// lease `owner` still holds; the fence is kept either way. Returns whether `owner` held it.
    async fn rewrite_held_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Option<Duration>,
    ) -> StoreResult<bool> {
        let name = name.to_owned();
        let owner = owner.to_owned();
        let ttl = ttl.map(ttl_millis);
        self.run(move |db, path| {
            let txn = db.begin_write().map_err(|e| storage_err(path, e))?;
            let now = now_millis();
            let held = {
                let mut table = txn.open_table(LEASES).map_err(|e| storage_err(path, e))?;
                let current = table
                    .get(name.as_str())
                    .map_err(|e| storage_err(path, e))?
                    .map(|v| {
                        let (o, f, exp) = v.value();
                        (o.to_owned(), f, exp)
                    });
                match current {
                    Some((o, fence, exp)) if exp > now && o == owner => {
                        let value = match ttl {
                            Some(ttl) => (owner.as_str(), fence, now.saturating_add(ttl)),
                            None => ("", fence, 0),
                        };
                        table
                            .insert(name.as_str(), value)
                            .map_err(|e| storage_err(path, e))?;
                        true
                    }
                    _ => false,
                }
            };
            if held {
                txn.commit().map_err(|e| storage_err(path, e))?;
            } else {
                txn.abort().map_err(|e| storage_err(path, e))?;
            }
            Ok(held)
        })
        .await
    }

    /// Opens the store at `path`, creating the file (mode 0600) and its parent directories (mode
    /// 0700) if missing.
    ///
    /// Fails with [`StoreError::Unavailable`] naming the path when another process (or another
    /// `EmbeddedStore` in this process) has the file open, and with [`StoreError::Corrupt`] when
    /// the file is not a redb database.
    pub async fn open(path: impl AsRef<Path>) -> StoreResult<Self> {
        let path = path.as_ref().to_path_buf();
        let opened = tokio::task::spawn_blocking(move || open_blocking(&path).map(|db| (db, path)))
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("embedded store open task failed: {e}"))
            })?;
        let ((db, journal), path) = opened?;
        Ok(Self {
            db: Arc::new(db),
            path: Arc::new(path),
            notices: tokio::sync::broadcast::channel(crate::NOTICE_BUFFER).0,
            appends: Arc::default(),
            generations: Arc::new(Generations::new()),
            journal: Arc::new(Mutex::new(journal)),
            unapplied: Arc::default(),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Group commit of stream appends (the audit log): concurrent appends share one journal
    /// write and one sync. The first append that finds no committer running starts one on the
    /// blocking pool; it takes everything pending (up to [`MAX_GROUP_COMMIT`]), gives each
    /// append its id, makes the group durable (one journal write and sync, or now and then a
    /// durable database commit: see [`journal_batch`]), answers each append with its id, and
    /// repeats until nothing is pending. Appends arriving while a group syncs wait for the next
    /// one, so under load each group carries the appends of one sync's duration. No append is
    /// answered before it is durable; when a group fails, every append in it gets the error.
    ///
    /// The database gets the answered groups later, many in one transaction (see
    /// [`apply_unapplied`]): between groups once they are [`Unapplied::due`], and before any
    /// read or trim of a stream, so every read sees every answered append.
    ///
    /// The committer lets go of the database before it answers its last batch, so a caller that
    /// drops the store right after its append can open the file again at once.
    fn commit_appends(self) {
        let appends = Arc::clone(&self.appends);
        let guard = CommitterGuard(&appends);
        let mut store = Some(self);
        loop {
            let batch: Vec<PendingAppend> = {
                let mut queue = lock(&appends);
                if queue.pending.is_empty() {
                    return;
                }
                let n = queue.pending.len().min(MAX_GROUP_COMMIT);
                queue.pending.drain(..n).collect()
            };
            let Some(this) = store.as_ref() else { return };
            let (answers, result) = {
                let mut journal = lock(&this.journal);
                journal_batch(&this.db, &this.path, &mut journal, &this.unapplied, batch)
            };
            let last = {
                let mut queue = lock(&appends);
                let last = queue.pending.is_empty();
                if last {
                    // The next append starts a committer of its own.
                    queue.committing = false;
                }
                last
            };
            if last {
                drop(store.take());
            }
            match result {
                Ok(ids) => {
                    for (done, id) in answers.into_iter().zip(ids) {
                        let _ = done.send(Ok(id));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for done in answers {
                        let _ = done.send(Err(match &e {
                            StoreError::Corrupt { key, problem } => StoreError::Corrupt {
                                key: key.clone(),
                                problem: problem.clone(),
                            },
                            _ => StoreError::Unavailable(message.clone()),
                        }));
                    }
                }
            }
            if last {
                // `committing` is already false, and a newer committer may have set it again.
                std::mem::forget(guard);
                return;
            }
            if let Some(this) = store.as_ref() {
                let mut unapplied = lock(&this.unapplied);
                if unapplied.due()
                    && let Err(error) = apply_unapplied(&this.db, &this.path, &mut unapplied)
                {
                    // They stay pending (durable in the journal) for the next attempt.
                    tracing::error!(%error, "embedded store: writing journaled appends to the database failed");
                }
            }
        }
    }

    async fn run<T, F>(&self, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &Path) -> StoreResult<T> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        let path = Arc::clone(&self.path);
        tokio::task::spawn_blocking(move || op(&db, &path))
            .await
            .map_err(|e| StoreError::Unavailable(format!("embedded store task failed: {e}")))?
    }

    /// Runs a point read (one read transaction, a few key lookups) on the calling task instead
    /// of the blocking pool. Such a read is answered from redb's page cache (and otherwise from
    /// the OS page cache: one `pread` of a page) in microseconds, while the hand-off to a
    /// blocking thread and back cost two context switches per read: under issuance load
    /// `spawn_blocking` and its wake-ups were ~15% of the broker's CPU, more than the reads.
    /// Scans and every write stay on the blocking pool.
    fn read_now<T>(&self, op: impl FnOnce(&Database, &Path) -> StoreResult<T>) -> StoreResult<T> {
        op(&self.db, &self.path)
    }
}

fn open_blocking(path: &Path) -> StoreResult<(Database, JournalState)> {
    let shown = path.display();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent).map_err(|e| {
            StoreError::Config(format!(
                "cannot create directory {} for the embedded store: {e}",
                parent.display()
            ))
        })?;
    }
    create_private_file(path).map_err(|e| {
        StoreError::Config(format!("cannot create embedded store file {shown}: {e}"))
    })?;
    let db = Database::create(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
            "embedded store {shown} is already open in another process (or another store in this \
             one); only one broker may use an embedded store file"
        )),
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(problem)) => {
            StoreError::Corrupt {
                key: shown.to_string(),
                problem,
            }
        }
        other => StoreError::Unavailable(format!("cannot open embedded store {shown}: {other}")),
    })?;
    // Create every table up front so read transactions never meet a missing table.
    let txn = db.begin_write().map_err(|e| storage_err(path, e))?;
    {
        txn.open_table(RECORDS).map_err(|e| storage_err(path, e))?;
        txn.open_table(STREAMS).map_err(|e| storage_err(path, e))?;
        txn.open_table(STREAM_META)
            .map_err(|e| storage_err(path, e))?;
        txn.open_table(LEASES).map_err(|e| storage_err(path, e))?;
        txn.open_table(SCHEDULE).map_err(|e| storage_err(path, e))?;
        txn.open_table(SCHEDULE_DUE)
            .map_err(|e| storage_err(path, e))?;
        txn.open_table(JOURNAL).map_err(|e| storage_err(path, e))?;
    }
    txn.commit().map_err(|e| storage_err(path, e))?;
    let (mut journal, groups) = Journal::open(path).map_err(StoreError::Unavailable)?;
    let last_lsn = replay(&db, path, groups)?;
    journal.checkpointed();
    Ok((
        db,
        JournalState {
            journal,
            next_lsn: last_lsn + 1,
            last_seq: std::collections::HashMap::new(),
        },
    ))
}

/// Applies the journal's groups the database does not hold durably (sequence number above the
/// stored one: appends acknowledged before a crash) in one durable transaction, and answers the
/// last sequence number used. Each entry goes where its group commit put it, under the id it
/// was answered with, and its stream's bound applies as at the append.
fn replay(db: &Database, path: &Path, groups: Vec<JournalGroup>) -> StoreResult<u64> {
    let txn = db.begin_write().map_err(|e| storage_err(path, e))?;
    let applied = txn
        .open_table(JOURNAL)
        .map_err(|e| storage_err(path, e))?
        .get(JOURNAL_APPLIED)
        .map_err(|e| storage_err(path, e))?
        .map_or(0, |v| v.value());
    let pending: Vec<JournalGroup> = groups.into_iter().filter(|g| g.lsn > applied).collect();
    let Some(last_lsn) = pending.last().map(|g| g.lsn) else {
        // The database holds every journaled group: nothing to write.
        txn.abort().map_err(|e| storage_err(path, e))?;
        return Ok(applied);
    };
    let replayed = apply_groups(&txn, path, &pending)?;
    txn.commit().map_err(|e| storage_err(path, e))?;
    if replayed > 0 {
        tracing::info!(
            store = %path.display(),
            appends = replayed,
            "embedded store: applied journaled appends the database had not made durable"
        );
    }
    Ok(last_lsn)
}

/// Writes `groups` (in sequence order) into `txn`: each entry under its id, each stream's
/// length and last sequence number updated once and its excess over the bound (that of its
/// last entry) removed in one pass, leaving what appending one at a time would; and the last
/// group's sequence number as the one the database holds. Answers how many entries were new.
fn apply_groups(
    txn: &redb::WriteTransaction,
    path: &Path,
    groups: &[JournalGroup],
) -> StoreResult<usize> {
    let Some(last_group) = groups.last() else {
        return Ok(0);
    };
    // The entries by stream, each stream's in sequence order (a stable sort keeps it).
    let mut all: Vec<&JournalEntry> = groups.iter().flat_map(|g| &g.entries).collect();
    all.sort_by(|a, b| (&a.scope, &a.stream).cmp(&(&b.scope, &b.stream)));
    let mut fresh = 0usize;
    {
        let mut meta = txn
            .open_table(STREAM_META)
            .map_err(|e| storage_err(path, e))?;
        let mut entries = txn.open_table(STREAMS).map_err(|e| storage_err(path, e))?;
        for members in all.chunk_by(|a, b| a.scope == b.scope && a.stream == b.stream) {
            let (scope, stream) = (members[0].scope.as_str(), members[0].stream.as_str());
            let (mut last, mut len) = meta
                .get((scope, stream))
                .map_err(|e| storage_err(path, e))?
                .map(|v| v.value())
                .unwrap_or((0, 0));
            for entry in members {
                let seq = entry.id.parse::<u64>().map_err(|_| StoreError::Corrupt {
                    key: crate::journal::journal_path(path).display().to_string(),
                    problem: format!("journaled stream id {:?} is not a number", entry.id),
                })?;
                let new = entries
                    .insert((scope, stream, entry.id.as_str()), entry.data.as_slice())
                    .map_err(|e| storage_err(path, e))?
                    .is_none();
                if new {
                    len += 1;
                    fresh += 1;
                }
                last = last.max(seq);
            }
            let max_len = members.last().map_or(u64::MAX, |e| e.max_len);
            len -= remove_excess(&mut entries, path, scope, stream, len, max_len)?;
            meta.insert((scope, stream), (last, len))
                .map_err(|e| storage_err(path, e))?;
        }
        let mut journal = txn.open_table(JOURNAL).map_err(|e| storage_err(path, e))?;
        let applied = journal
            .get(JOURNAL_APPLIED)
            .map_err(|e| storage_err(path, e))?
            .map_or(0, |v| v.value());
        journal
            .insert(JOURNAL_APPLIED, applied.max(last_group.lsn))
            .map_err(|e| storage_err(path, e))?;
    }
    Ok(fresh)
}

/// Writes the unapplied groups to the database in one transaction committed without a sync
/// (they are durable in the journal already; a crash before the next durable commit replays
/// them). On an error they stay pending.
fn apply_unapplied(db: &Database, path: &Path, unapplied: &mut Unapplied) -> StoreResult<()> {
    write_unapplied(db, path, unapplied, redb::Durability::None)
}

/// Writes the unapplied groups to the database in one transaction committed with `durability`
/// (`Immediate` for a checkpoint); on an error they stay pending.
fn write_unapplied(
    db: &Database,
    path: &Path,
    unapplied: &mut Unapplied,
    durability: redb::Durability,
) -> StoreResult<()> {
    if unapplied.groups.is_empty() {
        return Ok(());
    }
    let mut txn = db.begin_write().map_err(|e| storage_err(path, e))?;
    apply_groups(&txn, path, &unapplied.groups)?;
    txn.set_durability(durability)
        .map_err(|e| storage_err(path, e))?;
    txn.commit().map_err(|e| storage_err(path, e))?;
    unapplied.clear();
    Ok(())
}

/// Removes the oldest entries of a stream of `len` entries over `max_len`; answers how many.
fn remove_excess(
    entries: &mut redb::Table<Key3, &[u8]>,
    path: &Path,
    scope: &str,
    stream: &str,
    len: u64,
    max_len: u64,
) -> StoreResult<u64> {
    if len <= max_len {
        return Ok(0);
    }
    let excess = usize::try_from(len - max_len).unwrap_or(usize::MAX);
    let mut oldest = Vec::with_capacity(excess.min(1024));
    for item in entries
        .range::<Key3>((scope, stream, "")..)
        .map_err(|e| storage_err(path, e))?
        .take(excess)
    {
        let (k, _) = item.map_err(|e| storage_err(path, e))?;
        let (s, st, old) = k.value();
        if s != scope || st != stream {
            break;
        }
        oldest.push(old.to_owned());
    }
    for old in &oldest {
        entries
            .remove((scope, stream, old.as_str()))
            .map_err(|e| storage_err(path, e))?;
    }
    Ok(u64::try_from(oldest.len()).unwrap_or(0))
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// Creates the file with mode 0600 if it does not exist (redb then initialises the empty file).
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Gives each append of `batch` its id and makes the group durable; answers each append's
/// answer channel and (on success) its id, in the order of `batch`. Ids continue each append's
/// scope's last sequence number ([`JournalState::last_seq`]).
///
/// Usually the group (with its ids) is written to the journal and synced, then joins the
/// unapplied groups. When [`Journal::checkpoint_due`], the unapplied groups and this one are
/// written to the database in one durable transaction instead (which makes every journaled
/// group durable in the database) and the journal starts again.
#[allow(clippy::type_complexity)]
fn journal_batch(
    db: &Database,
    path: &Path,
    state: &mut JournalState,
    unapplied: &Mutex<Unapplied>,
    batch: Vec<PendingAppend>,
) -> (
    Vec<tokio::sync::oneshot::Sender<StoreResult<String>>>,
    StoreResult<Vec<String>>,
) {
    let mut answers = Vec::with_capacity(batch.len());
    let mut entries = Vec::with_capacity(batch.len());
    let now = time_seq(now_millis());
    for pending in batch {
        answers.push(pending.done);
        let last = match next_seq(db, path, state, &pending.scope, now) {
            Ok(last) => last,
            Err(e) => return (answers, Err(e)),
        };
        entries.push(JournalEntry {
            scope: pending.scope,
            stream: pending.stream.to_owned(),
            id: stream_id(last),
            max_len: pending.max_len,
            data: pending.data,
        });
    }
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let group = JournalGroup {
        lsn: state.next_lsn,
        entries,
    };
    state.next_lsn += 1;
    if state.journal.checkpoint_due() {
        let mut unapplied = lock(unapplied);
        unapplied.push(group);
        return match write_unapplied(db, path, &mut unapplied, redb::Durability::Immediate) {
            Ok(()) => {
                state.journal.checkpointed();
                (answers, Ok(ids))
            }
            Err(e) => {
                // This group was not answered: it must not be written later.
                unapplied.pop();
                (answers, Err(e))
            }
        };
    }
    if let Err(problem) = state.journal.write_group(&group) {
        return (answers, Err(StoreError::Unavailable(problem)));
    }
    let mut unapplied = lock(unapplied);
    unapplied.push(group);
    if state.last_seq.len() > LAST_SEQ_MAX {
        // The database must hold every sequence number before the kept ones are forgotten.
        match apply_unapplied(db, path, &mut unapplied) {
            Ok(()) => state.last_seq.clear(),
            Err(error) => {
                tracing::error!(%error, "embedded store: writing journaled appends to the database failed");
            }
        }
    }
    (answers, Ok(ids))
}

/// The next sequence number of an append to `scope` (stored as its stream's last): one above
/// the last of any stream of the scope, and at least `now` (ids grow with the append time).
fn next_seq(
    db: &Database,
    path: &Path,
    state: &mut JournalState,
    scope: &str,
    now: u64,
) -> StoreResult<u64> {
    let last = match state.last_seq.get(scope) {
        Some(last) => *last,
        None => {
            let txn = db.begin_read().map_err(|e| storage_err(path, e))?;
            let meta = txn
                .open_table(STREAM_META)
                .map_err(|e| storage_err(path, e))?;
            let mut last = 0;
            for row in meta
                .range::<(&str, &str)>((scope, "")..)
                .map_err(|e| storage_err(path, e))?
            {
                let (key, value) = row.map_err(|e| storage_err(path, e))?;
                if key.value().0 != scope {
                    break;
                }
                last = last.max(value.value().0);
            }
            last
        }
    };
    let next = (last + 1).max(now);
    state.last_seq.insert(scope.to_owned(), next);
    Ok(next)
}

fn storage_err(path: &Path, e: impl fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded store {}: {e}", path.display()))
}

fn scope_key(scope: &Scope) -> String {
    match scope {
        Scope::Global => "g".to_owned(),
        Scope::Tenant(t) => format!("t:{t}"),
    }
}

fn encode_record(version: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(VERSION_LEN + data.len());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(data);
    out
}

fn decode_record(key: &dyn fmt::Display, raw: &[u8]) -> StoreResult<Record> {
    let (head, data) = raw
        .split_at_checked(VERSION_LEN)
        .ok_or_else(|| StoreError::Corrupt {
            key: key.to_string(),
            problem: format!("record is {} bytes, shorter than its version", raw.len()),
        })?;
    let mut version = [0u8; VERSION_LEN];
    version.copy_from_slice(head);
    Ok(Record {
        version: u64::from_be_bytes(version),
        data: data.to_vec(),
    })
}

/// Stream ids are zero-padded so that string order is append order.
fn stream_id(seq: u64) -> String {
    format!("{seq:020}")
}

/// Bits of a stream sequence number below the append time: a sequence number is
/// `max(previous + 1, now_ms << TIME_SHIFT)`, so ids grow with the append time (and stay
/// strictly increasing when the clock steps back), and "appended before T" is "id below
/// `stream_id(T << TIME_SHIFT)`". (Entries of stores written before this scheme have small
/// sequence numbers and count as appended at the epoch.)
const TIME_SHIFT: u32 = 20;

fn time_seq(now_ms: u64) -> u64 {
    now_ms.checked_shl(TIME_SHIFT).unwrap_or(u64::MAX >> 1)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Checks `pre` against the current version (`None`: missing) of the record shown as `key`.
fn check_precondition(
    key: &dyn fmt::Display,
    current: Option<u64>,
    pre: Precondition,
) -> StoreResult<()> {
    match (pre, current) {
        (Precondition::Any, _) => Ok(()),
        (Precondition::Absent, None) => Ok(()),
        (Precondition::Absent, Some(_)) => Err(StoreError::AlreadyExists(key.to_string())),
        (Precondition::Exists | Precondition::Version(_), None) => {
            Err(StoreError::NotFound(key.to_string()))
        }
        (Precondition::Exists, Some(_)) => Ok(()),
        (Precondition::Version(expected), Some(found)) if expected == found => Ok(()),
        (Precondition::Version(expected), Some(found)) => Err(StoreError::Conflict {
            key: key.to_string(),
            expected,
            found,
        }),
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &RecordKey) -> StoreResult<Option<Record>> {
        self.read_now(|db, path| {
            let txn = db.begin_read().map_err(|e| storage_err(path, e))?;
            let table = txn.open_table(RECORDS).map_err(|e| storage_err(path, e))?;
            let scope = scope_key(&key.scope);
            let raw = table
                .get((scope.as_str(), key.collection, key.id.as_str()))
                .map_err(|e| storage_err(path, e))?;
            raw.map(|v| decode_record(key, v.value())).transpose()
        })
    }

    async fn get_many(&self, keys: &[RecordKey]) -> StoreResult<Vec<Option<Record>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.read_now(|db, path| {
            let txn = db.begin_read().map_err(|e| storage_err(path, e))?;
            let table = txn.open_table(RECORDS).map_err(|e| storage_err(path, e))?;
            keys.iter()
                .map(|key| {
                    let scope = scope_key(&key.scope);
                    let raw = table
                        .get((scope.as_str(), key.collection, key.id.as_str()))
                        .map_err(|e| storage_err(path, e))?;
                    raw.map(|v| decode_record(key, v.value())).transpose()
                })
                .collect()
        })
    }

    async fn get_many_since(
        &self,
        scope: &Scope,
        keys: &[RecordKey],
        known: Option<u64>,
    ) -> StoreResult<ScopeRead> {
        crate::check_one_scope(scope, keys)?;
        let generation = self.generations.get(&scope_key(scope));
        if known == Some(generation) {
            return Ok(ScopeRead::Unchanged);
        }
        Ok(ScopeRead::Read {
            generation: Some(generation),
            records: self.get_many(keys).await?,
        })
    }

    async fn put(&self, key: &RecordKey, data: Vec<u8>, pre: Precondition) -> StoreResult<u64> {
        let key = key.clone();
        let generations = Arc::clone(&self.generations);
        self.run(move |db, path| {
            let _bump = BumpOnDrop(&generations, scope_key(&key.scope));
            let txn = db.begin_write().map_err(|e| storage_err(path, e))?;
            let version = {
                let mut table = txn.open_table(RECORDS).map_err(|e| storage_err(path, e))?;
                let scope = scope_key(&key.scope);
                let k = (scope.as_str(), key.collection, key.id.as_str());
                let current = table
                    .get(k)
                    .map_err(|e| storage_err(path, e))?
                    .map(|v| decode_record(&key, v.value()).map(|r| r.version))
                    .transpose()?;
                check_precondition(&key, current, pre)?;
                let version = current.unwrap_or(0) + 1;
                table
                    .insert(k, encode_record(version, &data).as_slice())
                    .map_err(|e| storage_err(path, e))?;
                version
            };
            txn.commit().map_err(|e| storage_err(path, e))?;
            Ok(version)
        })
        .await
    }

    async fn delete(&self, key: &RecordKey, pre: Precondition) -> StoreResult<bool> {
        let key = key.clone();
        let generations = Arc::clone(&self.generations);
        self.run(move |db, path| {
            let _bump = BumpOnDrop(&generations, scope_key(&key.scope));
            let txn = db.begin_write().map_err(|e| storage_err(path, e))?;
            let removed = {
                let mut table = txn.open_table(RECORDS).map_err(|e| storage_err(path, e))?;
                let scope = scope_key(&key.scope);
                let k = (scope.as_str(), key.collection, key.id.as_str());
                let current = table
                    .get(k)
                    .map_err(|e| storage_err(path, e))?
                    .map(|v| decode_record(&key, v.value()).map(|r| r.version))
                    .transpose()?;
                check_precondition(&key, current, pre)?;
                current.is_some() && table.remove(k).map_err(|e| storage_err(path, e))?.is_some()
            };
            if removed {
                txn.commit().map_err(|e| storage_err(path, e))?;
            } else {
                txn.abort().map_err(|e| storage_err(path, e))?;
            }
            Ok(removed)
        })
        .await
    }

    async fn list(
        &self,
        scope: &Scope,
        collection: &'static str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<(String, Record)>> {
        let scope = scope_key(scope);
        let start_after = start_after.map(str::to_owned);
        self.run(move |db, path| {
            let txn = db.begin_read().map_err(|e| storage_err(path, e))?;
            let table = txn.open_table(RECORDS).map_err(|e| storage_err(path, e))?;
            let lower = match &start_after {
                Some(after) => Bound::Excluded((scope.as_str(), collection, after.as_str())),
                None => Bound::Included((scope.as_str(), collection, "")),
            };
            let mut out = Vec::new();
            for item in table
                .range::<Key3>((lower, Bound::Unbounded))
                .map_err(|e| storage_err(path, e))?
            {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = item.map_err(|e| storage_err(path, e))?;
                let (s, c, id) = k.value();
                if s != scope || c != collection {
                    break;
                }
                let shown = format!("{s}/{c}/{id}");
                out.push((id.to_owned(), decode_record(&shown, v.value())?));
            }
            Ok(out)
        })
        .await
    }

    async fn count(&self, scope: &Scope, collection: &'static str) -> StoreResult<u64> {
        let scope = scope_key(scope);
        self.run(move |db, path| {
            let txn = db.begin_read().map_err(|e| storage_err(path, e))?;
            let table = txn.open_table(RECORDS).map_err(|e| storage_err(path, e))?;
            let mut n = 0u64;
            for item in table
                .range::<Key3>((scope.as_str(), collection, "")..)
                .map_err(|e| storage_err(path, e))?
            {
                let (k, _) = item.map_err(|e| storage_err(path, e))?;
                let (s, c, _) = k.value();
                if s != scope || c != collection {
                    break;
                }
                n += 1;
            }
            Ok(n)
        })
        .await
    }

    async fn append(
        &self,
        scope: &Scope,
        stream: &'static str,
        data: Vec<u8>,
        max_len: usize,
    ) -> StoreResult<String> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let pending = PendingAppend {
            scope: scope_key(scope),
            stream,
            data,
            max_len: u64::try_from(max_len.max(1)).unwrap_or(u64::MAX),
            done,
        };
        let start_committer = {
            let mut queue = lock(&self.appends);
            queue.pending.push(pending);
            !std::mem::replace(&mut queue.committing, true)
        };
        if start_committer {
            let this = self.clone();
            tokio::task::spawn_blocking(move || this.commit_appends());
        }
        answer.await.map_err(|_| {
            StoreError::Unavailable(format!(
                "embedded store {}: the append was not committed (commit task failed)",
                self.path.display()
            ))
        })?
    }

    async fn trim_stream(
        &self,
        scope: &Scope,
        stream: &'static str,
        before_ms: u64,
    ) -> StoreResult<u64> {
        let scope = scope_key(scope);
        let cutoff = stream_id(time_seq(before_ms));
        let unapplied = Arc::clone(&self.unapplied);
        self.run(move |db, path| {
            apply_unapplied(db, path, &mut lock(&unapplied))?;
            let txn = db.begin_write().map_err(|e| storage_err(path, e))?;
            let removed = {
                let mut meta = txn
                    .open_table(STREAM_META)
                    .map_err(|e| storage_err(path, e))?;
                let mut entries = txn.open_table(STREAMS).map_err(|e| storage_err(path, e))?;
                let Some((last, len)) = meta
                    .get((scope.as_str(), stream))
                    .map_err(|e| storage_err(path, e))?
                    .map(|v| v.value())
                else {
                    return Ok(0);
                };
                let mut old = Vec::new();
                for item in entries
                    .range::<Key3>(
                        (scope.as_str(), stream, "")..(scope.as_str(), stream, cutoff.as_str()),
                    )
                    .map_err(|e| storage_err(path, e))?
                {
                    let (k, _) = item.map_err(|e| storage_err(path, e))?;
                    old.push(k.value().2.to_owned());
                }
                for id in &old {
                    entries
                        .remove((scope.as_str(), stream, id.as_str()))
                        .map_err(|e| storage_err(path, e))?;
                }
                let removed = u64::try_from(old.len()).unwrap_or(u64::MAX);
                if removed > 0 {
                    meta.insert(
                        (scope.as_str(), stream),
                        (last, len.saturating_sub(removed)),
                    )
                    .map_err(|e| storage_err(path, e))?;
                }
                removed
            };
            txn.commit().map_err(|e| storage_err(path, e))?;
            Ok(removed)
        })
        .await
    }

    async fn read_back(
        &self,
        scope: &Scope,
        stream: &'static str,
        before: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StreamEntry>> {
        let scope = scope_key(scope);
        let before = before.map(str::to_owned);
        let unapplied = Arc::clone(&self.unapplied);
        self.run(move |db, path| {
            apply_unapplied(db, path, &mut lock(&unapplied))?;
            let txn = db.begin_read().map_err(|e| storage_err(path, e))?;
            let table = txn.open_table(STREAMS).map_err(|e| storage_err(path, e))?;
            let lower = Bound::Included((scope.as_str(), stream, ""));
            let upper = match &before {
                Some(b) => Bound::Excluded((scope.as_str(), stream, b.as_str())),
                // Every id is digits only, so "~" (after all digits) bounds the stream.
                None => Bound::Included((scope.as_str(), stream, "~")),
            };
            let mut out = Vec::new();
            for item in table
                .range::<Key3>((lower, upper))
                .map_err(|e| storage_err(path, e))?
                .rev()
            {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = item.map_err(|e| storage_err(path, e))?;
                let (s, st, id) = k.value();
                if s != scope || st != stream {
                    break;
                }
                out.push(StreamEntry {
                    id: id.to_owned(),
                    data: v.value().to_vec(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn try_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Option<Lease>> {
        let name = name.to_owned();
        let owner = owner.to_owned();
        let ttl = ttl_millis(ttl);
        self.run(move |db, path| {
            let txn = db.begin_write().map_err(|e| storage_err(path, e))?;
            let now = now_millis();
            let lease = {
                let mut table = txn.open_table(LEASES).map_err(|e| storage_err(path, e))?;
                let current = table
                    .get(name.as_str())
                    .map_err(|e| storage_err(path, e))?
                    .map(|v| {
                        let (o, f, exp) = v.value();
                        (o.to_owned(), f, exp)
                    });
                let fence = match current {
                    Some((o, f, exp)) if exp > now && o == owner => Some(f),
                    Some((_, _, exp)) if exp > now => None,
                    Some((_, f, _)) => Some(f + 1),
                    None => Some(1),
                };
                if let Some(fence) = fence {
                    table
                        .insert(
                            name.as_str(),
                            (owner.as_str(), fence, now.saturating_add(ttl)),
                        )
                        .map_err(|e| storage_err(path, e))?;
                }
                fence.map(|fence| Lease {
                    name: name.clone(),
                    owner: owner.clone(),
                    fence,
                })
            };
            if lease.is_some() {
                txn.commit().map_err(|e| storage_err(path, e))?;
            } else {
                txn.abort().map_err(|e| storage_err(path, e))?;
            }
            Ok(lease)
        })
        .await
    }

    async fn release_lease(&self, name: &str, owner: &str) -> StoreResult<bool> {
        // Keep the fence so the next owner's is higher.
        self.rewrite_held_lease(name, owner, None).await
    }

    async fn renew_lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        self.rewrite_held_lease(name, owner, Some(ttl)).await
    }

    async fn schedule(&self, name: &'static str, member: &str, due_ms: i64) -> StoreResult<()> {
        crate::check_schedule(name, Some(due_ms))?;
        let member = member.to_owned();
        self.run(move |db, path| {
            let txn = db.begin_write().map_err(|e| storage_err(path, e))?;
            {
                let mut by_member = txn.open_table(SCHEDULE).map_err(|e| storage_err(path, e))?;
                let mut by_due = txn
                    .open_table(SCHEDULE_DUE)
                    .map_err(|e| storage_err(path, e))?;
                let old = by_member
                    .insert((name, member.as_str()), due_ms)
                    .map_err(|e| storage_err(path, e))?
                    .map(|v| v.value());
                if let Some(old) = old {
                    by_due
                        .remove((name, old, member.as_str()))
                        .map_err(|e| storage_err(path, e))?;
                }
                by_due
                    .insert((name, due_ms, member.as_str()), ())
                    .map_err(|e| storage_err(path, e))?;
            }
            txn.commit().map_err(|e| storage_err(path, e))
        })
        .await
    }

    async fn unschedule(&self, name: &'static str, member: &str) -> StoreResult<()> {
        crate::check_schedule(name, None)?;
        let member = member.to_owned();
        self.run(move |db, path| {
            let txn = db.begin_write().map_err(|e| storage_err(path, e))?;
            let removed = {
                let mut by_member = txn.open_table(SCHEDULE).map_err(|e| storage_err(path, e))?;
                let mut by_due = txn
                    .open_table(SCHEDULE_DUE)
                    .map_err(|e| storage_err(path, e))?;
                let old = by_member
                    .remove((name, member.as_str()))
                    .map_err(|e| storage_err(path, e))?
                    .map(|v| v.value());
                if let Some(old) = old {
                    by_due
                        .remove((name, old, member.as_str()))
                        .map_err(|e| storage_err(path, e))?;
                }
                old.is_some()
            };
            if removed {
                txn.commit().map_err(|e| storage_err(path, e))
            } else {
                txn.abort().map_err(|e| storage_err(path, e))
            }
        })
        .await
    }

    async fn due(
        &self,
        name: &'static str,
        now_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<(String, i64)>> {
        crate::check_schedule(name, None)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.run(move |db, path| {
            let txn = db.begin_read().map_err(|e| storage_err(path, e))?;
            let table = txn
                .open_table(SCHEDULE_DUE)
                .map_err(|e| storage_err(path, e))?;
            let mut out = Vec::new();
            for item in table
                .range::<(&str, i64, &str)>((name, i64::MIN, "")..)
                .map_err(|e| storage_err(path, e))?
            {
                let (k, _) = item.map_err(|e| storage_err(path, e))?;
                let (n, due, member) = k.value();
                if n != name || due > now_ms {
                    break;
                }
                out.push((member.to_owned(), due));
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn publish(&self, channel: &'static str, message: &str) -> StoreResult<()> {
        crate::check_channel(channel)?;
        // No subscriber is not an error: a notification is only a hint.
        let _ = self.notices.send((channel, message.to_owned()));
        Ok(())
    }

    fn subscribe(&self, channel: &'static str) -> tokio::sync::mpsc::Receiver<Notice> {
        use tokio::sync::broadcast::error::RecvError;
        let (tx, rx) = tokio::sync::mpsc::channel(crate::NOTICE_BUFFER);
        if let Err(error) = crate::check_channel(channel) {
            tracing::error!(%error, "subscription refused");
            return rx;
        }
        let mut notices = self.notices.subscribe();
        tokio::spawn(async move {
            if tx.send(Notice::Subscribed).await.is_err() {
                return;
            }
            loop {
                let notice = tokio::select! {
                    () = tx.closed() => return,
                    notice = notices.recv() => notice,
                };
                let forward = match notice {
                    Ok((c, message)) if c == channel => Notice::Message(message),
                    Ok(_) => continue,
                    // Fell behind: what was dropped must be caught up from the records.
                    Err(RecvError::Lagged(_)) => Notice::Subscribed,
                    Err(RecvError::Closed) => return,
                };
                if tx.send(forward).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    async fn ping(&self) -> StoreResult<()> {
        self.run(|db, path| {
            let txn = db.begin_read().map_err(|e| storage_err(path, e))?;
            let table = txn.open_table(RECORDS).map_err(|e| storage_err(path, e))?;
            table.len().map_err(|e| storage_err(path, e))?;
            Ok(())
        })
        .await
    }

    async fn ready(&self) -> StoreResult<()> {
        // An empty write transaction, committed: redb writes and syncs its header, so a file that
        // cannot be written (read-only mount, full disk) fails here rather than on the next write.
        self.run(|db, path| {
            let txn = db.begin_write().map_err(|e| storage_err(path, e))?;
            txn.open_table(RECORDS).map_err(|e| storage_err(path, e))?;
            txn.commit().map_err(|e| storage_err(path, e))?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path().join("sub/store.redb"))
            .await
            .unwrap();
        crate::conformance::run_all(Arc::new(store)).await;
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn creates_private_file_and_dir() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/store.redb");
        let _store = EmbeddedStore::open(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "file mode {mode:o}");
        let mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "dir mode {mode:o}");
    }

    #[tokio::test]
    async fn second_open_is_refused_with_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let _first = EmbeddedStore::open(&path).await.unwrap();
        let err = EmbeddedStore::open(&path).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "error should name the file: {err}"
        );
    }

    const OPEN_FROM_ENV: &str = "TOKENFLEET_STORE_TEST_OPEN";

    /// Run by `second_process_is_refused` in a child process: opens the file the parent holds.
    #[tokio::test]
    async fn open_from_env() {
        let Some(path) = std::env::var_os(OPEN_FROM_ENV) else {
            return;
        };
        let err = EmbeddedStore::open(&path).await.unwrap_err();
        println!("CHILD-ERROR: {err}");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }

    #[tokio::test]
    async fn second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let _held = EmbeddedStore::open(&path).await.unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "embedded::tests::open_from_env", "--nocapture"])
            .env(OPEN_FROM_ENV, &path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        let line = stdout
            .lines()
            .find(|l| l.contains("CHILD-ERROR"))
            .unwrap_or_else(|| panic!("child did not try to open: {stdout}"));
        assert!(line.contains(&path.display().to_string()), "{line}");
    }

    #[tokio::test]
    async fn not_a_database_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        std::fs::write(
            &path,
            b"this is not a redb file, just some text padding it out",
        )
        .unwrap();
        let err = EmbeddedStore::open(&path).await.unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "error should name the file: {err}"
        );
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let key = RecordKey::tenant("acme", "mailbox", "m1");
        {
            let store = EmbeddedStore::open(&path).await.unwrap();
            store
                .put(&key, b"one".to_vec(), Precondition::Absent)
                .await
                .unwrap();
            store
                .append(&Scope::Global, "audit", b"e1".to_vec(), 10)
                .await
                .unwrap();
        }
        let store = EmbeddedStore::open(&path).await.unwrap();
        let rec = store.get(&key).await.unwrap().unwrap();
        assert_eq!((rec.version, rec.data.as_slice()), (1, b"one".as_slice()));
        let id = store
            .append(&Scope::Global, "audit", b"e2".to_vec(), 10)
            .await
            .unwrap();
        let back = store
            .read_back(&Scope::Global, "audit", None, 10)
            .await
            .unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].id, id);
        assert!(back[1].id < back[0].id);
    }

    /// One sequence per scope: appends to different streams of a scope get increasing ids in
    /// the order they were answered, also within one millisecond and after reopening (the
    /// audit log merges its kinds by id).
    #[tokio::test]
    async fn the_streams_of_a_scope_share_one_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let acme = Scope::Tenant("acme".into());
        let mut ids = Vec::new();
        {
            let store = EmbeddedStore::open(&path).await.unwrap();
            for i in 0..50 {
                let stream = ["changes", "refused", "issuance"][i % 3];
                ids.push(store.append(&acme, stream, vec![1], 100).await.unwrap());
            }
        }
        // After reopening, the scope's last is read from all of its streams.
        let store = EmbeddedStore::open(&path).await.unwrap();
        for stream in ["refused", "changes"] {
            ids.push(store.append(&acme, stream, vec![3], 100).await.unwrap());
        }
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "not in the order of the appends: {ids:?}"
        );
    }

    const CRASH_AT: &str = "TOKENFLEET_STORE_TEST_CRASH";

    /// Runs the test `child` of this binary with `env` set to `path`, checks that it aborted
    /// (a crash: no destructor ran), and answers the rest of its stdout line starting `prefix`.
    fn crashed_child_says(child: &str, env: &str, path: &Path, prefix: &str) -> String {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("embedded::tests::{child}"),
                "--nocapture",
            ])
            .env(env, path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success(),
            "{child} should have aborted: {stdout}"
        );
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("{child} printed no {prefix:?} line: {stdout}"))
            .to_owned()
    }

    /// The store at `path` with checkpoints off, so appends stay in the journal.
    async fn without_checkpoints(path: impl AsRef<Path>) -> EmbeddedStore {
        let store = EmbeddedStore::open(path).await.unwrap();
        set_checkpoint_due(&store, false);
        store
    }

    fn set_checkpoint_due(store: &EmbeddedStore, due: bool) {
        store
            .journal
            .lock()
            .unwrap()
            .journal
            .force_checkpoint_due(due);
    }

    fn journal_len(store: &EmbeddedStore) -> u64 {
        store.journal.lock().unwrap().journal.len()
    }

    /// Run by `acknowledged_appends_survive_a_crash` in a child process: appends three entries,
    /// trims them (a durable commit), appends 40 more concurrently and 2 one at a time (durable
    /// in the journal alone), prints their ids and aborts (no destructor runs, so nothing the
    /// database kept in memory reaches the file).
    #[tokio::test(flavor = "multi_thread")]
    async fn append_then_crash() {
        let Some(path) = std::env::var_os(CRASH_AT) else {
            return;
        };
        let store = without_checkpoints(&path).await;
        let acme = Scope::Tenant("acme".into());
        for i in 0..3 {
            store
                .append(&acme, "audit", format!("old-{i}").into_bytes(), 100)
                .await
                .unwrap();
        }
        assert_eq!(
            store
                .trim_stream(&acme, "audit", now_millis() + 1)
                .await
                .unwrap(),
            3
        );
        let appends = (0..40).map(|i| {
            let store = store.clone();
            let acme = acme.clone();
            async move {
                let data = format!("new-{i}").into_bytes();
                let id = store.append(&acme, "audit", data, 100).await.unwrap();
                format!("{id}=new-{i}")
            }
        });
        let mut ids = futures::future::join_all(appends).await;
        // Two more one at a time: each is its committer's last group, so neither is written to
        // the database before the crash (only the journal has them).
        for i in 40..42 {
            let data = format!("new-{i}").into_bytes();
            let id = store.append(&acme, "audit", data, 100).await.unwrap();
            ids.push(format!("{id}=new-{i}"));
        }
        assert!(lock(&store.unapplied).entries >= 2, "unapplied groups");
        assert!(journal_len(&store) > 0, "the appends are in the journal");
        println!("CHILD-IDS: {}", ids.join(","));
        std::process::abort();
    }

    #[tokio::test]
    async fn acknowledged_appends_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let line = crashed_child_says("append_then_crash", CRASH_AT, &path, "CHILD-IDS: ");
        let mut acknowledged: Vec<(String, String)> = line
            .split(',')
            .map(|pair| {
                let (id, data) = pair.split_once('=').unwrap();
                (id.to_owned(), data.to_owned())
            })
            .collect();
        acknowledged.sort();
        assert_eq!(acknowledged.len(), 42);

        let store = EmbeddedStore::open(&path).await.unwrap();
        let acme = Scope::Tenant("acme".into());
        let mut back: Vec<(String, String)> = store
            .read_back(&acme, "audit", None, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.id, String::from_utf8(e.data).unwrap()))
            .collect();
        back.sort();
        // Every acknowledged append under its id, and none of the trimmed ones back.
        assert_eq!(back, acknowledged);
        assert_eq!(journal_len(&store), 0, "opening starts the journal again");
        // The stream goes on after them, and its length counts them.
        let next = store
            .append(&acme, "audit", b"after".to_vec(), 10)
            .await
            .unwrap();
        assert!(next > acknowledged.last().unwrap().0);
        let back = store.read_back(&acme, "audit", None, 1000).await.unwrap();
        assert_eq!(back.len(), 10, "bound 10 keeps 10 of the 43 entries");
        assert_eq!(back[0].id, next);
    }

    const CHECKPOINT_CRASH_AT: &str = "TOKENFLEET_STORE_TEST_CHECKPOINT_CRASH";

    /// Run by `a_checkpoint_group_survives_a_crash_without_the_journal` in a child process: one
    /// append only the journal holds, then one carried by a checkpoint (which starts the journal
    /// again, so only the database holds either), then an abort.
    #[tokio::test(flavor = "multi_thread")]
    async fn checkpoint_then_crash() {
        let Some(path) = std::env::var_os(CHECKPOINT_CRASH_AT) else {
            return;
        };
        let store = without_checkpoints(&path).await;
        let first = store
            .append(&Scope::Global, "audit", b"journaled".to_vec(), 10)
            .await
            .unwrap();
        assert_eq!(lock(&store.unapplied).entries, 1, "only the journal has it");
        set_checkpoint_due(&store, true);
        let second = store
            .append(&Scope::Global, "audit", b"ckpt".to_vec(), 10)
            .await
            .unwrap();
        assert_eq!(
            journal_len(&store),
            0,
            "the checkpoint started the journal again"
        );
        println!("CHILD-IDS: {first},{second}");
        std::process::abort();
    }

    #[tokio::test]
    async fn a_checkpoint_group_survives_a_crash_without_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let ids = crashed_child_says(
            "checkpoint_then_crash",
            CHECKPOINT_CRASH_AT,
            &path,
            "CHILD-IDS: ",
        );
        let store = EmbeddedStore::open(&path).await.unwrap();
        let back: Vec<(String, Vec<u8>)> = store
            .read_back(&Scope::Global, "audit", None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.data))
            .collect();
        let (first, second) = ids.split_once(',').unwrap();
        // The checkpoint made its own append and the one only the journal held durable.
        assert_eq!(
            back,
            [
                (second.to_owned(), b"ckpt".to_vec()),
                (first.to_owned(), b"journaled".to_vec())
            ]
        );
    }

    /// How many entries of `stream` in `scope` the database itself holds (its stream length).
    fn in_database(store: &EmbeddedStore, scope: &str, stream: &str) -> u64 {
        let txn = store.db.begin_read().unwrap();
        txn.open_table(STREAM_META)
            .unwrap()
            .get((scope, stream))
            .unwrap()
            .map_or(0, |v| v.value().1)
    }

    #[tokio::test]
    async fn answered_appends_wait_for_the_database_and_every_read_sees_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = without_checkpoints(dir.path().join("store.redb")).await;
        let acme = Scope::Tenant("acme".into());
        let mut ids = Vec::new();
        for i in 0..3 {
            let data = format!("e{i}").into_bytes();
            ids.push(store.append(&acme, "audit", data, 2).await.unwrap());
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        // Durable in the journal and answered; the database has not got them yet.
        assert_eq!(lock(&store.unapplied).entries, 3);
        assert_eq!(in_database(&store, "t:acme", "audit"), 0);
        let back = store.read_back(&acme, "audit", None, 10).await.unwrap();
        let back: Vec<&str> = back.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(back, [ids[2].as_str(), ids[1].as_str()], "bound 2 applies");
        assert_eq!(lock(&store.unapplied).entries, 0);
        assert_eq!(in_database(&store, "t:acme", "audit"), 2);
        // A trim sees answered appends too, and ids go on from the kept sequence.
        let next = store
            .append(&acme, "audit", b"e3".to_vec(), 10)
            .await
            .unwrap();
        assert!(next > ids[2]);
        assert_eq!(
            store
                .trim_stream(&acme, "audit", now_millis() + 1)
                .await
                .unwrap(),
            3
        );
        assert!(
            store
                .read_back(&acme, "audit", None, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_group_taken_out_again_leaves_the_count_and_age_of_the_rest() {
        let group = |lsn: u64, n: usize| JournalGroup {
            lsn,
            entries: (0..n)
                .map(|i| crate::journal::JournalEntry {
                    scope: "g".into(),
                    stream: "audit".into(),
                    id: stream_id(lsn * 100 + i as u64),
                    max_len: 10,
                    data: vec![1],
                })
                .collect(),
        };
        let mut unapplied = Unapplied::default();
        unapplied.push(group(1, 2));
        unapplied.push(group(2, 3));
        unapplied.pop();
        assert_eq!((unapplied.groups.len(), unapplied.entries), (1, 2));
        assert!(unapplied.since.is_some(), "the first group still waits");
        unapplied.pop();
        assert_eq!((unapplied.groups.len(), unapplied.entries), (0, 0));
        assert!(
            unapplied.since.is_none() && !unapplied.due(),
            "nothing waits"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_committer_writes_answered_groups_to_the_database_without_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = without_checkpoints(dir.path().join("store.redb")).await;
        let n = 3 * APPLY_ENTRIES;
        let appends = (0..n).map(|i| {
            let store = store.clone();
            async move {
                let data = format!("e{i}").into_bytes();
                store
                    .append(&Scope::Global, "audit", data, 100_000)
                    .await
                    .unwrap()
            }
        });
        let ids = futures::future::join_all(appends).await;
        let waiting = lock(&store.unapplied).entries;
        let held = in_database(&store, "g", "audit");
        assert!(
            held > 0,
            "nothing written to the database ({waiting} waiting)"
        );
        assert_eq!(held + waiting as u64, n as u64);
        let back = store
            .read_back(&Scope::Global, "audit", None, n)
            .await
            .unwrap();
        let mut expected = ids;
        expected.sort();
        expected.reverse();
        assert_eq!(back.into_iter().map(|e| e.id).collect::<Vec<_>>(), expected);
    }

    #[tokio::test]
    async fn a_checkpoint_commits_durably_and_starts_the_journal_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = without_checkpoints(&path).await;
        store
            .append(&Scope::Global, "audit", b"e1".to_vec(), 10)
            .await
            .unwrap();
        let journaled = journal_len(&store);
        assert!(journaled > 0);
        set_checkpoint_due(&store, true);
        store
            .append(&Scope::Global, "audit", b"e2".to_vec(), 10)
            .await
            .unwrap();
        assert_eq!(journal_len(&store), 0);
        let back = store
            .read_back(&Scope::Global, "audit", None, 10)
            .await
            .unwrap();
        assert_eq!(back.len(), 2);
    }
}
