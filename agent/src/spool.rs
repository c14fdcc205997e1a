//! The durable spool: every message the agent acknowledges to a device is on disk, fsynced,
//! before the acknowledgement is sent, and stays there until the upstream accepted it or it is
//! dead-lettered.
//!
//! Layout of the spool directory (mode 0700; files 0600):
//!
//! | path | content |
//! |---|---|
//! | `tmp/` | entries being written (an arriving message's streamed part, `<name>.part`); anything here at open was never acknowledged and is removed |
//! | `queue/<id>.msg` | one entry in one file: the message and its [`EntryMeta`] (device, envelope, attempts, next attempt, last error) — see below |
//! | `queue/<id>.json` | the entry's [`EntryMeta`] once it changed after acceptance (a retry); it supersedes the one in `<id>.msg` |
//! | `queue/<id>.eml` + `queue/<id>.json` | an entry written by an agent of the previous, two-file layout (message, metadata): still read, delivered, retried and dead-lettered as they are; never written any more |
//! | `dead/<id>.{eml,json}` | dead-lettered entries, kept for the operator: the message as received and its metadata with the reason |
//!
//! **The entry file** `queue/<id>.msg` is written once and never changed:
//! `[tail][head][metadata JSON][footer]`, where the message is `head` followed by `tail` —
//! `head` is what the ingress kept in memory (the header block, rewritten by the sender policy
//! after `DATA`), `tail` what it streamed to disk while the message arrived. The tail comes
//! first because it is already in the file when the message ends: the ingress streams it into
//! `tmp/`, and accepting appends the head, the metadata and the footer to that same file — no
//! copy of the message, one file created per message instead of four (tail, message and
//! sidecar in `tmp/`, and the worker's sending marker). The footer is 32 bytes: the lengths
//! of head, tail and metadata (little-endian `u64`s) and the magic `tfspool1`; a file whose
//! length does not match its footer is reported as corrupt, never guessed at.
//!
//! An entry exists when its `.msg` (or, from the previous layout, its `.eml` with its `.json`)
//! is in `queue/`. [`Spool::accept`] writes the file in `tmp/`, fsyncs it, renames it into
//! `queue/` and fsyncs the directory; only then does it return. A crash before that fsync leaves
//! an unacknowledged entry that recovery may drop; a crash after it cannot lose the entry. A
//! retry writes `<id>.json` in `tmp/`, fsyncs it and renames it over; completion removes the
//! message file, then the `.json` (a crash in between leaves an orphan `.json` that recovery
//! removes, never a message without its envelope); dead-lettering writes the message and the
//! metadata with the reason into `dead/` (fsynced) before it removes the queued entry, and
//! recovery finishes a dead-lettering that a crash interrupted.
//!
//! Group commit: the fsync of `queue/` is shared ([`GroupSync`]). Entries accepted (and
//! completed, retried) at the same time wait for one fsync that started after their renames,
//! instead of one fsync each; none returns before the fsync that covers it has completed, so the
//! guarantee above is unchanged. The files' own fsyncs run in the accepting threads, at the same
//! time, where the file system's journal merges them.
//!
//! Quota ([`SpoolLimits`]): the queue holds at most `max_bytes` of messages and `max_messages`
//! entries (dead letters are not counted: they are the operator's to clear). A message that
//! does not fit is refused with [`SpoolError::Full`] before anything is written; the ingress
//! answers `452 4.3.1` and the device tries again later.
//!
//! Large messages are not held in memory while they arrive: the ingress keeps the first bytes
//! (the header block and the start of the body) in memory and streams the rest into a
//! [`TailFile`] in `tmp/`; [`Spool::accept_incoming`] turns that file into the entry.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::durable::{self, DirSyncer, GroupSync};
use serde::{Deserialize, Serialize};

const TMP: &str = "tmp";
const QUEUE: &str = "queue";
const DEAD: &str = "dead";
/// One entry in one file (see the module documentation).
const ENTRY_EXT: &str = "msg";
/// The message alone: dead letters, and queued entries of the previous layout.
const MESSAGE_EXT: &str = "eml";
const META_EXT: &str = "json";
/// Length of the entry file's footer.
const FOOTER_LEN: u64 = 32;
/// Last bytes of every entry file.
const FOOTER_MAGIC: &[u8; 8] = b"tfspool1";

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file or directory operation failed.
    #[error("spool {path}: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// A sidecar could not be parsed.
    #[error("spool {path}: bad metadata: {error}")]
    Meta {
        /// The sidecar file.
        path: PathBuf,
        /// What is wrong with it.
        error: serde_json::Error,
    },
    /// No entry with this id is queued.
    #[error("spool entry {0} not found")]
    NotFound(SpoolId),
    /// The text is not a spool id.
    #[error("invalid spool id {0:?}: expected <13 digits>-<16 hex digits>")]
    InvalidId(String),
    /// The message does not fit in the spool's quota.
    #[error(
        "spool full: {queued_bytes} bytes in {queued_messages} messages queued, a message of {size} bytes exceeds the quota ({max_bytes} bytes, {max_messages} messages)"
    )]
    Full {
        /// Size of the refused message.
        size: u64,
        /// Bytes queued (and being written).
        queued_bytes: u64,
        /// Messages queued (and being written).
        queued_messages: usize,
        /// [`SpoolLimits::max_bytes`].
        max_bytes: u64,
        /// [`SpoolLimits::max_messages`].
        max_messages: usize,
    },
}

/// The spool's quota (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Most bytes of queued messages.
    pub max_bytes: u64,
    /// Most queued messages.
    pub max_messages: usize,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            max_messages: 10_000,
        }
    }
}

/// The part of an arriving message that did not stay in memory: a file in the spool's `tmp/`.
/// [`Spool::accept_incoming`] makes it the entry's file; dropped without that (the message was
/// refused, the client left), it is removed.
#[derive(Debug)]
pub struct TailFile {
    /// Empty once handed over to the spool.
    path: PathBuf,
}

impl TailFile {
    /// Creates the new, empty file `path` (mode 0600) for writing.
    pub fn create(path: PathBuf) -> io::Result<(Self, fs::File)> {
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok((Self { path }, file))
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its size now.
    pub fn len(&self) -> u64 {
        fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The path, no longer removed on drop (the spool took the file over).
    fn into_path(mut self) -> PathBuf {
        std::mem::take(&mut self.path)
    }
}

impl Drop for TailFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |error| SpoolError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// The id of a spool entry: `<unix milliseconds, 13 digits>-<16 random hex digits>`, so ids sort
/// by acceptance time and are safe as file names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpoolId(String);

impl SpoolId {
    fn generate(millis: u64) -> Result<Self, SpoolError> {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| SpoolError::Io {
            path: PathBuf::from("getrandom"),
            error: io::Error::other(e.to_string()),
        })?;
        Ok(Self(format!(
            "{millis:013}-{:016x}",
            u64::from_be_bytes(random)
        )))
    }

    /// Parses and validates an id.
    pub fn parse(text: &str) -> Result<Self, SpoolError> {
        let valid = match text.split_once('-') {
            Some((ms, rnd)) => {
                ms.len() >= 13
                    && ms.bytes().all(|b| b.is_ascii_digit())
                    && rnd.len() == 16
                    && rnd
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            }
            None => false,
        };
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(SpoolError::InvalidId(text.to_owned()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SpoolId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SpoolId {
    type Error = SpoolError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<SpoolId> for String {
    fn from(id: SpoolId) -> Self {
        id.0
    }
}

/// The SMTP envelope of a message and the device that sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The device (by name) the message came from.
    pub device: String,
    /// `MAIL FROM` reverse path (may be empty for bounces).
    pub from: String,
    /// `RCPT TO` forward paths, in order.
    pub rcpts: Vec<String>,
    /// The mailbox (by name) the device's sender mode chose to send as; empty when the mailbox
    /// is the signed-in user's (then `user_address` is set) or not yet decided.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mailbox: String,
    /// LOGIN_USER / ALLOW_USER_CHANGE: the address of the user the message is sent as.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user_address: String,
}

/// The sidecar of a spool entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryMeta {
    /// The entry's id.
    pub id: SpoolId,
    /// Device and envelope.
    pub envelope: Envelope,
    /// Size of the message in bytes.
    pub size: u64,
    /// When the message was accepted (Unix milliseconds).
    pub accepted_at_ms: u64,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Earliest time of the next attempt (Unix milliseconds).
    pub next_attempt_ms: u64,
    /// The last delivery error, or the dead-letter reason.
    pub last_error: Option<String>,
}

impl EntryMeta {
    /// When the message was accepted.
    pub fn accepted_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.accepted_at_ms)
    }
}

/// Queue depth and age, for status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolStats {
    /// Entries waiting in `queue/`.
    pub depth: usize,
    /// Age of the oldest queued entry (zero when empty).
    pub oldest_age: Duration,
    /// Entries in `dead/`.
    pub dead: usize,
}

/// Disk use of the spool directory ([`Spool::disk_usage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolUsage {
    /// Bytes allocated on disk to the files below the spool directory.
    pub bytes: u64,
    /// Entries in `dead/`.
    pub dead_messages: usize,
}

/// What recovery found when the spool was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Temporary files removed (never acknowledged).
    pub removed_temp: usize,
    /// Files of no entry removed: a sidecar without a message (an unacknowledged or completed
    /// entry), a message without its sidecar, a queued entry already copied to `dead/`.
    pub removed_orphans: usize,
    /// Entries kept in the queue.
    pub queued: usize,
}

/// The durable spool. Cheap to share behind an `Arc`; all methods take `&self` and are
/// blocking (call them from `spawn_blocking` in async code).
///
/// The queue's metadata is also kept in memory (read at [`Spool::open`], kept current by every
/// method that changes an entry), so finding what is due reads nothing from disk, however long
/// the queue is (a few hundred bytes per queued entry). Hence: one `Spool` per directory per
/// process — entries added or changed by another instance are seen only after opening it again.
#[derive(Debug)]
pub struct Spool {
    root: PathBuf,
    recovery: Recovery,
    index: Mutex<DueIndex>,
    /// Millisecond stamp of the last accepted entry: stamps (and so ids and first due times)
    /// increase strictly within the process, so messages accepted one after another are
    /// delivered in that order even within one millisecond.
    last_ms: Mutex<u64>,
    limits: SpoolLimits,
    /// Group commit of `queue/`'s fsync.
    queue_sync: GroupSync,
}

/// How a queued entry is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// `<id>.msg`; `sidecar`: a `<id>.json` supersedes the metadata in it.
    Packed { sidecar: bool },
    /// The previous layout: `<id>.eml` and `<id>.json`.
    Legacy,
}

impl Form {
    fn has_sidecar(self) -> bool {
        matches!(self, Self::Packed { sidecar: true } | Self::Legacy)
    }
}

/// Queued entries by next attempt time, with their metadata.
#[derive(Debug, Default)]
struct DueIndex {
    by_time: BTreeSet<(u64, SpoolId)>,
    by_id: HashMap<SpoolId, Indexed>,
    /// Sum of the sizes of the queued entries.
    bytes: u64,
    /// Bytes and entries being written by [`Spool::accept_incoming`] (quota reservations).
    reserved_bytes: u64,
    reserved_messages: usize,
}

#[derive(Debug, Clone)]
struct Indexed {
    /// When it is due (in memory: [`Spool::postpone`] moves it without touching the disk).
    next_attempt_ms: u64,
    device: String,
    accepted_at_ms: u64,
    size: u64,
    form: Form,
    /// `None` when the metadata could not be read at open: [`Spool::entry`] reads it again
    /// and reports why.
    meta: Option<EntryMeta>,
}

impl DueIndex {
    fn set(&mut self, id: &SpoolId, entry: Indexed) {
        let at = entry.next_attempt_ms;
        self.bytes += entry.size;
        if let Some(old) = self.by_id.insert(id.clone(), entry) {
            self.by_time.remove(&(old.next_attempt_ms, id.clone()));
            self.bytes = self.bytes.saturating_sub(old.size);
        }
        self.by_time.insert((at, id.clone()));
    }

    fn set_meta(&mut self, meta: &EntryMeta, form: Form) {
        self.set(
            &meta.id,
            Indexed {
                next_attempt_ms: meta.next_attempt_ms,
                device: meta.envelope.device.clone(),
                accepted_at_ms: meta.accepted_at_ms,
                size: meta.size,
                form,
                meta: Some(meta.clone()),
            },
        );
    }

    fn remove(&mut self, id: &SpoolId) -> Option<Indexed> {
        let old = self.by_id.remove(id)?;
        self.by_time.remove(&(old.next_attempt_ms, id.clone()));
        self.bytes = self.bytes.saturating_sub(old.size);
        Some(old)
    }

    /// Up to `limit` ids due at `now_ms`, earliest first.
    fn due(&self, now_ms: u64, limit: usize) -> Vec<SpoolId> {
        self.by_time
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect()
    }
}

fn create_dir_0700(path: &Path) -> Result<(), SpoolError> {
    durable::create_dir_0700(path).map_err(io_err(path))
}

fn fsync_dir(path: &Path) -> Result<(), SpoolError> {
    durable::fsync_dir(path).map_err(io_err(path))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    durable::write_synced(path, bytes).map_err(io_err(path))
}

fn remove_if_exists(path: &Path) -> Result<bool, SpoolError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(SpoolError::Io {
            path: path.to_path_buf(),
            error,
        }),
    }
}

fn corrupt(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt entry file: {why}"),
    )
}

fn meta_json(meta: &EntryMeta, path: &Path) -> Result<Vec<u8>, SpoolError> {
    serde_json::to_vec(meta).map_err(|error| SpoolError::Meta {
        path: path.to_path_buf(),
        error,
    })
}

/// An open entry file with its footer read and checked.
struct EntryFile {
    file: fs::File,
    head: u64,
    tail: u64,
    meta: u64,
}

impl EntryFile {
    fn open(path: &Path) -> io::Result<Self> {
        let file = fs::File::open(path)?;
        let len = file.metadata()?.len();
        if len < FOOTER_LEN {
            return Err(corrupt("shorter than its footer"));
        }
        let mut footer = [0u8; FOOTER_LEN as usize];
        file.read_exact_at(&mut footer, len - FOOTER_LEN)?;
        if &footer[24..] != FOOTER_MAGIC {
            return Err(corrupt("no footer"));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&footer[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let (head, tail, meta) = (word(0), word(1), word(2));
        let total = head
            .checked_add(tail)
            .and_then(|n| n.checked_add(meta))
            .and_then(|n| n.checked_add(FOOTER_LEN));
        if total != Some(len) {
            return Err(corrupt("its length does not match its footer"));
        }
        Ok(Self {
            file,
            head,
            tail,
            meta,
        })
    }

    fn footer(head: u64, tail: u64, meta: u64) -> [u8; FOOTER_LEN as usize] {
        let mut footer = [0u8; FOOTER_LEN as usize];
        footer[..8].copy_from_slice(&head.to_le_bytes());
        footer[8..16].copy_from_slice(&tail.to_le_bytes());
        footer[16..24].copy_from_slice(&meta.to_le_bytes());
        footer[24..].copy_from_slice(FOOTER_MAGIC);
        footer
    }

    fn read_meta(&self, path: &Path) -> Result<EntryMeta, SpoolError> {
        let len = usize::try_from(self.meta).map_err(|_| io_err(path)(corrupt("metadata size")))?;
        let mut json = vec![0u8; len];
        self.file
            .read_exact_at(&mut json, self.head + self.tail)
            .map_err(io_err(path))?;
        serde_json::from_slice(&json).map_err(|error| SpoolError::Meta {
            path: path.to_path_buf(),
            error,
        })
    }

    /// Writes the message (head, then tail) to `out`.
    fn copy_message(&mut self, out: &mut impl io::Write) -> io::Result<()> {
        self.file.seek(io::SeekFrom::Start(self.tail))?;
        io::copy(&mut (&self.file).take(self.head), out)?;
        self.file.seek(io::SeekFrom::Start(0))?;
        io::copy(&mut (&self.file).take(self.tail), out)?;
        Ok(())
    }

    /// The message in a buffer of its own ([`durable::unpooled_buffer`]).
    fn read_message(mut self) -> io::Result<Vec<u8>> {
        let len = usize::try_from(self.head + self.tail).map_err(|_| corrupt("size"))?;
        let mut out = durable::unpooled_buffer(len);
        self.file.seek(io::SeekFrom::Start(self.tail))?;
        (&self.file).take(self.head).read_to_end(&mut out)?;
        self.file.seek(io::SeekFrom::Start(0))?;
        (&self.file).take(self.tail).read_to_end(&mut out)?;
        if out.len() != len {
            return Err(corrupt("shorter than its footer says"));
        }
        Ok(out)
    }
}

fn not_found_or(id: &SpoolId, path: &Path, error: io::Error) -> SpoolError {
    if error.kind() == io::ErrorKind::NotFound {
        SpoolError::NotFound(id.clone())
    } else {
        SpoolError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// What recovery found in `queue/`, by id.
#[derive(Default)]
struct Listing {
    packed: BTreeSet<String>,
    messages: BTreeSet<String>,
    sidecars: BTreeSet<String>,
    other: Vec<PathBuf>,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and recovers from a crash: temporary files
    /// are removed, queued entries are kept (in either layout), an entry whose dead-lettering
    /// was interrupted is finished, and files of no entry are removed.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, SpoolError> {
        Self::open_with(dir, SpoolLimits::default())
    }

    /// [`Spool::open`] with a quota.
    pub fn open_with(dir: impl AsRef<Path>, limits: SpoolLimits) -> Result<Self, SpoolError> {
        Self::open_with_syncer(dir, limits, None)
    }

    /// [`Spool::open_with`] whose shared fsync of `queue/` goes through `syncer` (tests simulate
    /// a crash before it); `None` = [`durable::fsync_dir`].
    pub fn open_with_syncer(
        dir: impl AsRef<Path>,
        limits: SpoolLimits,
        syncer: Option<DirSyncer>,
    ) -> Result<Self, SpoolError> {
        let root = dir.as_ref().to_path_buf();
        create_dir_0700(&root)?;
        for sub in [TMP, QUEUE, DEAD] {
            create_dir_0700(&root.join(sub))?;
        }
        let mut recovery = Recovery::default();
        let tmp = root.join(TMP);
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            remove_if_exists(&entry.path())?;
            recovery.removed_temp += 1;
        }
        fsync_dir(&tmp)?;
        let queue = root.join(QUEUE);
        let dead = root.join(DEAD);
        let mut listing = Listing::default();
        for entry in fs::read_dir(&queue).map_err(io_err(&queue))? {
            let path = entry.map_err(io_err(&queue))?.path();
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            match path.extension().and_then(|e| e.to_str()) {
                Some(ENTRY_EXT) => listing.packed.insert(stem),
                Some(MESSAGE_EXT) => listing.messages.insert(stem),
                Some(META_EXT) => listing.sidecars.insert(stem),
                _ => {
                    listing.other.push(path);
                    true
                }
            };
        }
        let in_dead = |stem: &str, ext: &str| dead.join(format!("{stem}.{ext}")).exists();
        let mut forms: Vec<(String, Form)> = Vec::new();
        let mut orphans: Vec<PathBuf> = std::mem::take(&mut listing.other);
        let mut dead_changed = false;
        for stem in &listing.packed {
            let sidecar = listing.sidecars.contains(stem);
            if in_dead(stem, MESSAGE_EXT) {
                // Dead-lettered (its copy in dead/ is complete: the message is renamed there
                // last) but not yet removed from the queue when the agent stopped.
                orphans.push(queue.join(format!("{stem}.{ENTRY_EXT}")));
                if sidecar {
                    orphans.push(queue.join(format!("{stem}.{META_EXT}")));
                }
                continue;
            }
            forms.push((stem.clone(), Form::Packed { sidecar }));
        }
        for stem in &listing.messages {
            if listing.sidecars.contains(stem) && !listing.packed.contains(stem) {
                forms.push((stem.clone(), Form::Legacy));
            } else {
                // A message without a sidecar: never acknowledged (the previous layout renamed
                // the sidecar first).
                orphans.push(queue.join(format!("{stem}.{MESSAGE_EXT}")));
            }
        }
        for stem in &listing.sidecars {
            if listing.packed.contains(stem) || listing.messages.contains(stem) {
                continue;
            }
            let path = queue.join(format!("{stem}.{META_EXT}"));
            if in_dead(stem, MESSAGE_EXT) && !in_dead(stem, META_EXT) {
                // The previous layout's dead-lettering moved the message first.
                fs::rename(&path, dead.join(format!("{stem}.{META_EXT}")))
                    .map_err(io_err(&path))?;
                dead_changed = true;
            } else {
                // A sidecar without a message: never acknowledged, or completed (the message is
                // removed first).
                orphans.push(path);
            }
        }
        for path in orphans {
            if remove_if_exists(&path)? {
                recovery.removed_orphans += 1;
            }
        }
        fsync_dir(&queue)?;
        if dead_changed {
            fsync_dir(&dead)?;
        }
        recovery.queued = forms.len();
        let spool = Self {
            root,
            recovery,
            index: Mutex::new(DueIndex::default()),
            last_ms: Mutex::new(0),
            limits,
            queue_sync: match syncer {
                Some(syncer) => GroupSync::with_syncer(queue.clone(), syncer),
                None => GroupSync::new(queue.clone()),
            },
        };
        let mut index = DueIndex::default();
        for (stem, form) in forms {
            let Ok(id) = SpoolId::parse(&stem) else {
                continue;
            };
            match spool.read_entry_meta(&id, form) {
                Ok(meta) => index.set_meta(&meta, form),
                // Unreadable metadata is due at once: the worker reports it rather than skip it.
                Err(_) => {
                    let ext = match form {
                        Form::Packed { .. } => ENTRY_EXT,
                        Form::Legacy => MESSAGE_EXT,
                    };
                    index.set(
                        &id,
                        Indexed {
                            next_attempt_ms: 0,
                            device: String::new(),
                            accepted_at_ms: 0,
                            size: fs::metadata(spool.path(QUEUE, &id, ext))
                                .map(|m| m.len())
                                .unwrap_or(0),
                            form,
                            meta: None,
                        },
                    )
                }
            }
        }
        *spool.lock_index() = index;
        Ok(spool)
    }

    fn lock_index(&self) -> MutexGuard<'_, DueIndex> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What recovery did when this spool was opened.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    fn path(&self, sub: &str, id: &SpoolId, ext: &str) -> PathBuf {
        self.root.join(sub).join(format!("{id}.{ext}"))
    }

    /// Stores a message durably and returns its id. When this returns `Ok`, the entry's file is
    /// renamed into `queue/` and the directory is fsynced: the caller may acknowledge.
    pub fn accept(&self, envelope: &Envelope, message: &[u8]) -> Result<SpoolId, SpoolError> {
        self.accept_incoming(envelope, message, None)
    }

    /// Where the ingress streams the tail of an arriving message (a new name in `tmp/`, which
    /// recovery empties): create it with [`TailFile::create`].
    pub fn tail_path(&self) -> Result<PathBuf, SpoolError> {
        let id = SpoolId::generate(durable::unix_ms(SystemTime::now()))?;
        Ok(self.root.join(TMP).join(format!("{id}.part")))
    }

    /// Bytes the quota still has room for (messages being written count as queued).
    pub fn room(&self) -> u64 {
        let index = self.lock_index();
        if index.by_id.len() + index.reserved_messages >= self.limits.max_messages {
            return 0;
        }
        self.limits
            .max_bytes
            .saturating_sub(index.bytes + index.reserved_bytes)
    }

    /// The quota.
    pub fn limits(&self) -> SpoolLimits {
        self.limits
    }

    fn reserve(&self, size: u64) -> Result<(), SpoolError> {
        let mut index = self.lock_index();
        let queued_bytes = index.bytes + index.reserved_bytes;
        let queued_messages = index.by_id.len() + index.reserved_messages;
        if queued_bytes + size > self.limits.max_bytes
            || queued_messages + 1 > self.limits.max_messages
        {
            return Err(SpoolError::Full {
                size,
                queued_bytes,
                queued_messages,
                max_bytes: self.limits.max_bytes,
                max_messages: self.limits.max_messages,
            });
        }
        index.reserved_bytes += size;
        index.reserved_messages += 1;
        Ok(())
    }

    fn unreserve(index: &mut DueIndex, size: u64) {
        index.reserved_bytes = index.reserved_bytes.saturating_sub(size);
        index.reserved_messages = index.reserved_messages.saturating_sub(1);
    }

    /// [`Spool::accept`] for a message received in two parts: `head` (in memory) followed by
    /// the contents of `tail`, if any — which becomes the entry's file (nothing is copied). The
    /// message is refused with [`SpoolError::Full`] when it does not fit in the quota (and the
    /// tail file is removed).
    pub fn accept_incoming(
        &self,
        envelope: &Envelope,
        head: &[u8],
        tail: Option<TailFile>,
    ) -> Result<SpoolId, SpoolError> {
        let size = head.len() as u64 + tail.as_ref().map_or(0, TailFile::len);
        self.reserve(size)?;
        let result = self.write_entry(envelope, head, tail, size);
        let mut index = self.lock_index();
        Self::unreserve(&mut index, size);
        if let Ok((_, meta)) = &result {
            index.set_meta(meta, Form::Packed { sidecar: false });
        }
        result.map(|(id, _)| id)
    }

    fn write_entry(
        &self,
        envelope: &Envelope,
        head: &[u8],
        tail: Option<TailFile>,
        size: u64,
    ) -> Result<(SpoolId, EntryMeta), SpoolError> {
        let stamp = {
            let mut last = self.last_ms.lock().unwrap_or_else(PoisonError::into_inner);
            *last = durable::unix_ms(SystemTime::now()).max(*last + 1);
            *last
        };
        let id = SpoolId::generate(stamp)?;
        let meta = EntryMeta {
            id: id.clone(),
            envelope: envelope.clone(),
            size,
            accepted_at_ms: stamp,
            attempts: 0,
            next_attempt_ms: stamp,
            last_error: None,
        };
        let tail_len = size - head.len() as u64;
        // The file to finish: the streamed tail (appended to), or a new one.
        let (tmp, opened) = match tail {
            Some(tail) => {
                let path = tail.into_path();
                let file = fs::OpenOptions::new().append(true).open(&path);
                (path, file)
            }
            None => {
                let path = self.path(TMP, &id, ENTRY_EXT);
                let file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path);
                (path, file)
            }
        };
        let result = (|| {
            let mut file = opened.map_err(io_err(&tmp))?;
            let json = meta_json(&meta, &tmp)?;
            let footer = EntryFile::footer(head.len() as u64, tail_len, json.len() as u64);
            file.write_all(head).map_err(io_err(&tmp))?;
            let mut trailer = json;
            trailer.extend_from_slice(&footer);
            file.write_all(&trailer).map_err(io_err(&tmp))?;
            file.sync_all().map_err(io_err(&tmp))?;
            drop(file);
            let queued = self.path(QUEUE, &id, ENTRY_EXT);
            fs::rename(&tmp, &queued).map_err(io_err(&tmp))?;
            self.sync_queue()
        })();
        if let Err(e) = result {
            // Best effort: leftovers are also removed by the next open.
            let _ = remove_if_exists(&tmp);
            return Err(e);
        }
        Ok((id, meta))
    }

    /// The metadata of a queued entry.
    pub fn entry(&self, id: &SpoolId) -> Result<EntryMeta, SpoolError> {
        let form = match self.lock_index().by_id.get(id) {
            Some(Indexed {
                meta: Some(meta), ..
            }) => return Ok(meta.clone()),
            Some(indexed) => Some(indexed.form),
            None => None,
        };
        let form = match form {
            Some(form) => form,
            // Not in this instance's index: whatever is on disk.
            None if self.path(QUEUE, id, META_EXT).exists() => Form::Packed { sidecar: true },
            None => Form::Packed { sidecar: false },
        };
        self.read_entry_meta(id, form)
    }

    /// Reads an entry's metadata from disk.
    fn read_entry_meta(&self, id: &SpoolId, form: Form) -> Result<EntryMeta, SpoolError> {
        if form.has_sidecar() {
            return self.read_meta(&self.path(QUEUE, id, META_EXT), id);
        }
        let path = self.path(QUEUE, id, ENTRY_EXT);
        let file = EntryFile::open(&path).map_err(|error| not_found_or(id, &path, error))?;
        file.read_meta(&path)
    }

    fn read_meta(&self, path: &Path, id: &SpoolId) -> Result<EntryMeta, SpoolError> {
        let bytes = fs::read(path).map_err(|error| not_found_or(id, path, error))?;
        serde_json::from_slice(&bytes).map_err(|error| SpoolError::Meta {
            path: path.to_path_buf(),
            error,
        })
    }

    /// The message bytes of a queued entry, in a buffer whose memory goes back to the system
    /// when the delivery drops it ([`durable::read_unpooled`]).
    pub fn message(&self, id: &SpoolId) -> Result<Vec<u8>, SpoolError> {
        let path = self.path(QUEUE, id, ENTRY_EXT);
        let read = match EntryFile::open(&path) {
            Ok(file) => file.read_message().map_err(io_err(&path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The previous layout.
                let legacy = self.path(QUEUE, id, MESSAGE_EXT);
                durable::read_unpooled(&legacy).map_err(|error| not_found_or(id, &legacy, error))
            }
            Err(error) => Err(SpoolError::Io { path, error }),
        };
        if let Err(SpoolError::NotFound(_)) = &read {
            // Completed or dead-lettered by another instance: forget it here too.
            self.lock_index().remove(id);
        }
        read
    }

    fn list(&self, sub: &str, exts: &[&str]) -> Result<Vec<SpoolId>, SpoolError> {
        let dir = self.root.join(sub);
        let mut ids = HashSet::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
                && let Some(id) = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| SpoolId::parse(s).ok())
            {
                ids.insert(id);
            }
        }
        let mut ids: Vec<SpoolId> = ids.into_iter().collect();
        ids.sort();
        Ok(ids)
    }

    /// Ids of all queued entries, oldest first (read from the directory).
    pub fn queued(&self) -> Result<Vec<SpoolId>, SpoolError> {
        self.list(QUEUE, &[ENTRY_EXT, MESSAGE_EXT])
    }

    /// Ids of all dead-lettered entries, oldest first.
    pub fn dead(&self) -> Result<Vec<SpoolId>, SpoolError> {
        self.list(DEAD, &[MESSAGE_EXT])
    }

    /// The metadata of a dead-lettered entry.
    pub fn dead_entry(&self, id: &SpoolId) -> Result<EntryMeta, SpoolError> {
        self.read_meta(&self.path(DEAD, id, META_EXT), id)
    }

    /// Entries whose next attempt is due at `now`, earliest first.
    pub fn due(&self, now: SystemTime) -> Result<Vec<EntryMeta>, SpoolError> {
        self.due_up_to(now, usize::MAX)
    }

    /// Like [`Spool::due`], but at most `limit` entries (the earliest), from memory however
    /// long the queue is.
    pub fn due_up_to(&self, now: SystemTime, limit: usize) -> Result<Vec<EntryMeta>, SpoolError> {
        let ids = self.lock_index().due(durable::unix_ms(now), limit);
        let mut due = Vec::with_capacity(ids.len());
        for id in ids {
            match self.entry(&id) {
                Ok(meta) => due.push(meta),
                // Completed or dead-lettered meanwhile (or by another process).
                Err(SpoolError::NotFound(_)) => {
                    self.lock_index().remove(&id);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(due)
    }

    fn form(&self, id: &SpoolId) -> Result<Form, SpoolError> {
        match self.lock_index().by_id.get(id) {
            Some(indexed) => Ok(indexed.form),
            None => Err(SpoolError::NotFound(id.clone())),
        }
    }

    /// Records a failed attempt: increments `attempts`, stores the error and the next attempt
    /// time (in the entry's `.json`, which supersedes the metadata in its file).
    pub fn retry_later(
        &self,
        id: &SpoolId,
        error: &str,
        next_at: SystemTime,
    ) -> Result<EntryMeta, SpoolError> {
        let form = self.form(id)?;
        let mut meta = self.entry(id)?;
        meta.attempts = meta.attempts.saturating_add(1);
        meta.last_error = Some(error.to_owned());
        meta.next_attempt_ms = durable::unix_ms(next_at);
        let tmp = self.path(TMP, id, META_EXT);
        let _ = remove_if_exists(&tmp);
        write_synced(&tmp, &meta_json(&meta, &tmp)?)?;
        let dest = self.path(QUEUE, id, META_EXT);
        fs::rename(&tmp, &dest).map_err(io_err(&tmp))?;
        self.sync_queue()?;
        let form = match form {
            Form::Packed { .. } => Form::Packed { sidecar: true },
            Form::Legacy => Form::Legacy,
        };
        self.lock_index().set_meta(&meta, form);
        Ok(meta)
    }

    /// Removes a delivered entry (message first, so a crash in between leaves an orphan sidecar
    /// that recovery removes, never a message without its envelope).
    pub fn complete(&self, id: &SpoolId) -> Result<(), SpoolError> {
        let form = self.lock_index().by_id.get(id).map(|r| r.form);
        let gone = match form {
            Some(Form::Packed { .. }) => remove_if_exists(&self.path(QUEUE, id, ENTRY_EXT))?,
            Some(Form::Legacy) => remove_if_exists(&self.path(QUEUE, id, MESSAGE_EXT))?,
            None => {
                remove_if_exists(&self.path(QUEUE, id, ENTRY_EXT))?
                    || remove_if_exists(&self.path(QUEUE, id, MESSAGE_EXT))?
            }
        };
        self.lock_index().remove(id);
        if !gone {
            return Err(SpoolError::NotFound(id.clone()));
        }
        if form.is_none_or(Form::has_sidecar) {
            remove_if_exists(&self.path(QUEUE, id, META_EXT))?;
        }
        self.sync_queue()
    }

    /// Moves an entry to `dead/` (`<id>.eml`, the message as received, and `<id>.json`, its
    /// metadata with the reason).
    pub fn dead_letter(&self, id: &SpoolId, reason: &str) -> Result<(), SpoolError> {
        let form = self.form(id)?;
        let mut meta = self.entry(id)?;
        meta.last_error = Some(reason.to_owned());
        let tmp = self.path(TMP, id, META_EXT);
        let _ = remove_if_exists(&tmp);
        write_synced(&tmp, &meta_json(&meta, &tmp)?)?;
        let dead = self.root.join(DEAD);
        match form {
            Form::Legacy => {
                // Message first: recovery moves a queued sidecar whose message is in dead/
                // after it.
                let from = self.path(QUEUE, id, MESSAGE_EXT);
                fs::rename(&from, self.path(DEAD, id, MESSAGE_EXT)).map_err(io_err(&from))?;
                self.lock_index().remove(id);
                fs::rename(&tmp, self.path(DEAD, id, META_EXT)).map_err(io_err(&tmp))?;
                remove_if_exists(&self.path(QUEUE, id, META_EXT))?;
                fsync_dir(&dead)?;
            }
            Form::Packed { sidecar } => {
                // A copy in dead/, complete and durable (metadata first, the message last:
                // recovery drops a queued entry whose message is in dead/), then the queued
                // entry goes.
                let from = self.path(QUEUE, id, ENTRY_EXT);
                let tmp_message = self.path(TMP, id, MESSAGE_EXT);
                let _ = remove_if_exists(&tmp_message);
                let copied = (|| {
                    let mut source = EntryFile::open(&from)?;
                    let mut out = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp_message)?;
                    source.copy_message(&mut out)?;
                    out.sync_all()
                })();
                if let Err(error) = copied {
                    let _ = remove_if_exists(&tmp_message);
                    let _ = remove_if_exists(&tmp);
                    return Err(not_found_or(id, &from, error));
                }
                fs::rename(&tmp, self.path(DEAD, id, META_EXT)).map_err(io_err(&tmp))?;
                fs::rename(&tmp_message, self.path(DEAD, id, MESSAGE_EXT))
                    .map_err(io_err(&tmp_message))?;
                fsync_dir(&dead)?;
                self.lock_index().remove(id);
                remove_if_exists(&from)?;
                if sidecar {
                    remove_if_exists(&self.path(QUEUE, id, META_EXT))?;
                }
            }
        }
        self.sync_queue()
    }

    /// The shared fsync of `queue/` (group commit; see the module documentation).
    fn sync_queue(&self) -> Result<(), SpoolError> {
        self.queue_sync
            .sync()
            .map_err(io_err(&self.root.join(QUEUE)))
    }

    /// (changes to `queue/` made durable, fsyncs of `queue/` that made them so) since open.
    pub fn queue_sync_counts(&self) -> (u64, u64) {
        self.queue_sync.counts()
    }

    /// Moves a queued entry's next attempt to `until` in memory only, without counting an
    /// attempt or writing its sidecar: a delivery deferred by a rate limit (not a failure). After
    /// a restart the entry is due at its recorded time again, which is never later.
    pub fn postpone(&self, id: &SpoolId, until: SystemTime) {
        let mut index = self.lock_index();
        if let Some(entry) = index.by_id.get(id).cloned() {
            index.set(
                id,
                Indexed {
                    next_attempt_ms: durable::unix_ms(until),
                    ..entry
                },
            );
        }
    }

    /// Queue depth and age of the oldest queued message per device, from memory (no disk
    /// reads; entries with an unreadable sidecar count under the device name `""`).
    pub fn queue_by_device(&self, now: SystemTime) -> BTreeMap<String, (usize, Duration)> {
        let now_ms = durable::unix_ms(now);
        let mut out: BTreeMap<String, (usize, Duration)> = BTreeMap::new();
        for entry in self.lock_index().by_id.values() {
            let age = Duration::from_millis(now_ms.saturating_sub(entry.accepted_at_ms));
            let slot = out.entry(entry.device.clone()).or_default();
            slot.0 += 1;
            slot.1 = slot.1.max(age);
        }
        out
    }

    /// Bytes of the queued messages (from memory; what the quota counts).
    pub fn queued_bytes(&self) -> u64 {
        self.lock_index().bytes
    }

    /// What the spool directory holds on disk: blocks allocated to every file below it (the
    /// queue, dead letters, entries being written, markers; what `du` counts) and the number of
    /// dead-lettered messages. Reads the directories, so call it from blocking code.
    pub fn disk_usage(&self) -> Result<SpoolUsage, SpoolError> {
        use std::os::unix::fs::MetadataExt as _;
        fn walk(dir: &Path, depth: u32, usage: &mut SpoolUsage) -> io::Result<()> {
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                // Files can go away while the worker settles entries: skip them.
                let Ok(meta) = entry.metadata() else { continue };
                usage.bytes += meta.blocks() * 512;
                if meta.is_dir() && depth < 2 {
                    walk(&entry.path(), depth + 1, usage)?;
                }
            }
            Ok(())
        }
        let mut usage = SpoolUsage::default();
        walk(&self.root, 0, &mut usage).map_err(io_err(&self.root))?;
        usage.dead_messages = self.dead()?.len();
        Ok(usage)
    }

    /// Queue depth, oldest age and dead-letter count.
    pub fn stats(&self, now: SystemTime) -> Result<SpoolStats, SpoolError> {
        let queued = self.queued()?;
        let mut oldest_age = Duration::ZERO;
        if let Some(first) = queued.first() {
            match self.entry(first) {
                Ok(meta) => oldest_age = now.duration_since(meta.accepted_at()).unwrap_or_default(),
                Err(SpoolError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(SpoolStats {
            depth: queued.len(),
            oldest_age,
            dead: self.dead()?.len(),
        })
    }
}

/// Delay before retry number `attempt` (0 = the first retry): `base · 2^attempt`, capped at
/// `max`, then jittered into `[delay/2, delay)` by `jitter` (a random value in `[0, 1)`; clamped).
/// Pure, so callers pass their own randomness and tests pass fixed values.
pub fn backoff(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let factor = 2u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
    let delay = base.checked_mul(factor).unwrap_or(max).min(max);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    delay / 2 + (delay / 2).mul_f64(jitter)
}

/// A random jitter value in `[0, 1)` for [`backoff`] (0.5 if the system has no randomness).
pub fn random_jitter() -> f64 {
    let mut b = [0u8; 8];
    match getrandom::fill(&mut b) {
        Ok(()) => (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let s = Duration::from_secs;
        assert_eq!(backoff(0, s(10), s(3600), 0.0), s(5));
        assert_eq!(backoff(0, s(10), s(3600), 1.0), s(10));
        assert_eq!(backoff(3, s(10), s(3600), 0.0), s(40));
        assert_eq!(backoff(30, s(10), s(3600), 0.0), s(1800));
        assert_eq!(backoff(u32::MAX, s(10), s(3600), 0.5), s(2700));
        assert_eq!(backoff(1, s(10), s(3600), f64::NAN), s(10));
        for _ in 0..100 {
            let j = random_jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }

    #[test]
    fn ids_are_validated() {
        let id = SpoolId::generate(durable::unix_ms(SystemTime::now())).unwrap();
        assert_eq!(SpoolId::parse(id.as_str()).unwrap(), id);
        for bad in [
            "",
            "../etc",
            "1234567890123-zz",
            "1234567890123-0123456789abcdeF",
            "123-0123456789abcdef",
        ] {
            assert!(SpoolId::parse(bad).is_err(), "{bad}");
        }
    }
}
