//! Durable file-system primitives shared by the [`crate::spool`] and the [`crate::maildrop`]:
//! private (0700) directories, private (0600) files written and fsynced before they are
//! renamed into place, and directory fsyncs that make a rename survive a crash.
//!
//! Every function returns the bare [`io::Error`]; callers attach the path to their own error.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Creates `path` (and missing parents) and forces its mode to 0700.
pub fn create_dir_0700(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
}

/// Fsyncs the directory `path`, making the renames and removals done in it durable.
pub fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path).and_then(|d| d.sync_all())
}

/// Creates the new file `path` (mode 0600; it must not exist), writes `bytes` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Milliseconds since the Unix epoch (0 before it, saturating far after it).
pub fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// How a [`GroupSync`] makes a directory durable: [`fsync_dir`] in production; tests pass one that
/// records what each sync covered, or fails, to simulate a crash before it.
pub type DirSyncer = std::sync::Arc<dyn Fn(&Path) -> io::Result<()> + Send + Sync>;

/// Group commit of a directory's fsync: threads that renamed or removed entries in the
/// directory at about the same time share one fsync instead of paying one each.
///
/// A caller calls [`GroupSync::sync`] *after* its change (rename, removal) and gets `Ok` only
/// once an fsync that *started after* that call began has completed. Whoever finds no fsync
/// running becomes the leader and fsyncs for everyone who asked so far; callers arriving while
/// it runs wait for it and then for the next one (which one of them leads). So an
/// acknowledgement is never earlier than the fsync that covers it, and under load one fsync
/// covers as many changes as arrived during the previous one. An error reaches every caller the
/// failed fsync covered.
pub struct GroupSync {
    dir: std::path::PathBuf,
    syncer: DirSyncer,
    state: std::sync::Mutex<GroupState>,
    done: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    /// Tickets handed out (one per [`GroupSync::sync`] call).
    requested: u64,
    /// Every ticket up to this one is covered by a completed fsync.
    completed: u64,
    /// An fsync is running.
    running: bool,
    /// Fsyncs done.
    syncs: u64,
    /// Recent failed fsyncs: (first ticket, last ticket, error kind, text).
    failures: std::collections::VecDeque<(u64, u64, io::ErrorKind, String)>,
}

impl std::fmt::Debug for GroupSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupSync")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl GroupSync {
    /// Group commit for the directory `dir` with [`fsync_dir`].
    pub fn new(dir: std::path::PathBuf) -> Self {
        Self::with_syncer(dir, std::sync::Arc::new(fsync_dir))
    }

    /// Group commit for `dir` with another way of syncing it (tests).
    pub fn with_syncer(dir: std::path::PathBuf, syncer: DirSyncer) -> Self {
        Self {
            dir,
            syncer,
            state: std::sync::Mutex::new(GroupState::default()),
            done: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Blocks until an fsync of the directory that started after this call has completed (see
    /// the type's documentation). Blocking: call it from blocking code.
    pub fn sync(&self) -> io::Result<()> {
        let mut state = self.lock();
        state.requested += 1;
        let ticket = state.requested;
        loop {
            if state.completed >= ticket {
                return match state
                    .failures
                    .iter()
                    .find(|(from, to, _, _)| (*from..=*to).contains(&ticket))
                {
                    Some((_, _, kind, text)) => Err(io::Error::new(*kind, text.clone())),
                    None => Ok(()),
                };
            }
            if !state.running {
                // Lead: everything requested so far was changed before this point.
                state.running = true;
                let (first, last) = (state.completed + 1, state.requested);
                drop(state);
                let result = (self.syncer)(&self.dir);
                state = self.lock();
                state.running = false;
                state.completed = last;
                state.syncs += 1;
                if let Err(e) = &result {
                    state
                        .failures
                        .push_back((first, last, e.kind(), e.to_string()));
                    while state.failures.len() > 64 {
                        state.failures.pop_front();
                    }
                }
                self.done.notify_all();
                continue;
            }
            state = self
                .done
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// (calls to [`GroupSync::sync`], fsyncs done): how many changes shared each fsync.
    pub fn counts(&self) -> (u64, u64) {
        let state = self.lock();
        (state.requested, state.syncs)
    }
}

/// Bytes of address space a large read reserves (see [`read_unpooled`]): above glibc's
/// `DEFAULT_MMAP_THRESHOLD_MAX` (32 MiB on 64-bit systems).
pub const UNPOOLED_CAPACITY: usize = 33 << 20;

/// Reads the file `path` whole into a buffer that the allocator maps for it alone and unmaps when
/// it is dropped. A 1 MiB message read into an exact-size `Vec` would be served by glibc from a
/// thread's arena once its dynamic mmap threshold has risen (the first freed 1 MiB mapping raises
/// it to 1 MiB), and the arenas keep what the delivery threads freed: resident memory grows with
/// the deliveries that ever ran at once. With a capacity above the largest threshold the buffer
/// is always `mmap`ed, only the pages the message fills become resident, and `munmap` returns
/// them as soon as the delivery ends. Small files are read as usual.
pub fn read_unpooled(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut file = File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
    let mut out = unpooled_buffer(len);
    file.read_to_end(&mut out)?;
    Ok(out)
}

/// An empty buffer for `len` bytes, allocated as [`read_unpooled`] does: exactly `len` for
/// small sizes, a mapping of its own (at least [`UNPOOLED_CAPACITY`]) from 128 KiB on.
pub fn unpooled_buffer(len: usize) -> Vec<u8> {
    if len < 128 << 10 {
        Vec::with_capacity(len)
    } else {
        Vec::with_capacity(len.saturating_add(1).max(UNPOOLED_CAPACITY))
    }
}
