//! The local maildrop: mail fetched from a device's upstream mailbox (POP3/IMAP), kept on disk per
//! device until the device collects it over the agent's local POP3 server
//! ([`crate::pop3_server`]).
//!
//! Layout of the maildrop directory (directories 0700, files 0600):
//!
//! | path | content |
//! |---|---|
//! | `tmp/` | messages being written; anything here at open was never committed and is removed |
//! | `devices/<device>/cur/<id>.eml` | a stored message, exactly as fetched |
//! | `devices/<device>/seen/<key>` | an (empty) tombstone: the upstream message with this key was stored and has since been collected by the device |
//!
//! A message id is `<13-digit unix ms>-<32 hex digits>`; the hex part is the *key*: the first 16
//! bytes of SHA-256 of the upstream id (the caller's stable name for the upstream message, e.g.
//! `pop3 <user> <UIDL>`), or random when there is none. So the maildrop remembers which upstream
//! messages it holds by file name alone: [`Maildrop::store`] commits a message with one rename,
//! and a crash after that rename but before the upstream delete cannot produce a duplicate —
//! the next fetch finds the key ([`Maildrop::contains_upstream`]), skips the download and deletes
//! the upstream copy. When the device deletes a message, a tombstone with its key is written
//! (and fsynced) before the message file goes, so the memory survives the local copy.
//!
//! [`Maildrop::store`] writes to `tmp/`, fsyncs the file, renames it into `cur/` and fsyncs the
//! directory before it returns: only then may the caller delete the upstream copy.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::durable;
use sha2::{Digest as _, Sha256};

const TMP: &str = "tmp";
const DEVICES: &str = "devices";
const CUR: &str = "cur";
const SEEN: &str = "seen";
const MESSAGE_EXT: &str = "eml";
const KEY_HEX_LEN: usize = 32;

/// Errors of the maildrop.
#[derive(Debug, thiserror::Error)]
pub enum MaildropError {
    /// A file or directory operation failed.
    #[error("maildrop {path}: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// The device name cannot be used as a directory name.
    #[error(
        "invalid device name {0:?} for the maildrop: expected 1-128 of A-Z a-z 0-9 . _ @ -, not starting with '.'"
    )]
    InvalidDevice(String),
    /// The text is not a maildrop id.
    #[error("invalid maildrop id {0:?}: expected <13 digits>-<32 hex digits>")]
    InvalidId(String),
    /// No such message in the device's maildrop.
    #[error("maildrop message {id} of device {device} not found")]
    NotFound {
        /// The device.
        device: String,
        /// The id asked for.
        id: MaildropId,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MaildropError + '_ {
    move |error| MaildropError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// The id of a stored message: `<unix ms, 13 digits>-<32 hex key>`. Ids sort by store time,
/// are safe as file names and serve as the local POP3 server's UIDL (46 characters, within
/// RFC 1939's 70).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MaildropId(String);

impl MaildropId {
    /// Parses and validates an id.
    pub fn parse(text: &str) -> Result<Self, MaildropError> {
        let valid = match text.split_once('-') {
            Some((ms, key)) => {
                ms.len() == 13 && ms.bytes().all(|b| b.is_ascii_digit()) && is_key(key)
            }
            None => false,
        };
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(MaildropError::InvalidId(text.to_owned()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn key(&self) -> &str {
        self.0.split_once('-').map(|(_, k)| k).unwrap_or_default()
    }
}

impl std::fmt::Display for MaildropId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_key(text: &str) -> bool {
    text.len() == KEY_HEX_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key remembered for an upstream message id.
fn upstream_key(upstream_id: &str) -> String {
    let digest = Sha256::digest(upstream_id.as_bytes());
    hex(&digest[..KEY_HEX_LEN / 2])
}

fn random_key() -> Result<String, MaildropError> {
    let mut random = [0u8; KEY_HEX_LEN / 2];
    getrandom::fill(&mut random).map_err(|e| MaildropError::Io {
        path: PathBuf::from("getrandom"),
        error: io::Error::other(e.to_string()),
    })?;
    Ok(hex(&random))
}

/// One stored message of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaildropEntry {
    /// Its id (and local POP3 UIDL).
    pub id: MaildropId,
    /// Its size in bytes.
    pub size: u64,
}

/// What [`Maildrop::store`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The message is on disk, fsynced, under this id.
    Stored(MaildropId),
    /// A message with the same upstream id was stored before (still here, or already collected
    /// by the device): nothing was written, and the upstream copy may be deleted.
    Duplicate,
}

/// Where [`Maildrop::store`] is, for a test hook that simulates a crash at that point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreStage {
    /// The message is in `tmp/`, fsynced, not yet renamed into `cur/`.
    Written,
    /// The message is committed: renamed and the directory fsynced; `store` returns next.
    Committed,
}

/// A callback run at each [`StoreStage`] (tests use it to kill the process there).
pub type StoreHook = Arc<dyn Fn(StoreStage) + Send + Sync>;

/// What the maildrop's recovery did at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MaildropRecovery {
    /// Uncommitted files removed from `tmp/`.
    pub removed_temp: usize,
}

struct Inner {
    root: PathBuf,
    recovery: MaildropRecovery,
    locks: Mutex<HashSet<String>>,
    hook: Option<StoreHook>,
    /// Millisecond stamp of the last id made: ids are strictly increasing within the process, so
    /// two messages stored in the same millisecond still list (and reach the device) in order.
    last_ms: Mutex<u64>,
}

/// The maildrop of every device of this agent. Cheap to clone (shared state); methods are
/// blocking file operations (call them from `spawn_blocking` in async code).
#[derive(Clone)]
pub struct Maildrop {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Maildrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maildrop")
            .field("root", &self.inner.root)
            .field("recovery", &self.inner.recovery)
            .finish()
    }
}

/// Exclusive access to one device's maildrop (the local POP3 session holds it); released on
/// drop.
#[derive(Debug)]
pub struct MaildropLock {
    maildrop: Maildrop,
    device: String,
}

impl MaildropLock {
    /// The locked device.
    pub fn device(&self) -> &str {
        &self.device
    }
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        let mut locks = self
            .maildrop
            .inner
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.remove(&self.device);
    }
}

fn create_dir_0700(path: &Path) -> Result<(), MaildropError> {
    durable::create_dir_0700(path).map_err(io_err(path))
}

fn fsync_dir(path: &Path) -> Result<(), MaildropError> {
    durable::fsync_dir(path).map_err(io_err(path))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), MaildropError> {
    durable::write_synced(path, bytes).map_err(io_err(path))
}

/// Checks that `device` is usable as a directory name.
fn check_device(device: &str) -> Result<(), MaildropError> {
    let ok = !device.is_empty()
        && device.len() <= 128
        && !device.starts_with('.')
        && device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(MaildropError::InvalidDevice(device.to_owned()))
    }
}

impl Maildrop {
    /// Opens (creating if needed) the maildrop at `root` and removes uncommitted files.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, MaildropError> {
        Self::open_with_hook(root, None)
    }

    /// Like [`Maildrop::open`], with a hook run at each stage of [`Maildrop::store`] (for crash
    /// tests).
    pub fn open_with_hook(
        root: impl Into<PathBuf>,
        hook: Option<StoreHook>,
    ) -> Result<Self, MaildropError> {
        let root = root.into();
        create_dir_0700(&root)?;
        let tmp = root.join(TMP);
        create_dir_0700(&tmp)?;
        create_dir_0700(&root.join(DEVICES))?;
        let mut recovery = MaildropRecovery::default();
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => recovery.removed_temp += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(MaildropError::Io { path, error }),
            }
        }
        if recovery.removed_temp > 0 {
            fsync_dir(&tmp)?;
            tracing::info!(
                removed = recovery.removed_temp,
                "maildrop: removed uncommitted messages"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                recovery,
                locks: Mutex::new(HashSet::new()),
                hook,
                last_ms: Mutex::new(0),
            }),
        })
    }

    /// What recovery did at open.
    pub fn recovery(&self) -> MaildropRecovery {
        self.inner.recovery
    }

    fn device_dir(&self, device: &str) -> Result<PathBuf, MaildropError> {
        check_device(device)?;
        Ok(self.inner.root.join(DEVICES).join(device))
    }

    /// Creates the device's directories if needed; returns (`cur`, `seen`).
    fn device_dirs(&self, device: &str) -> Result<(PathBuf, PathBuf), MaildropError> {
        let dir = self.device_dir(device)?;
        let cur = dir.join(CUR);
        let seen = dir.join(SEEN);
        if !cur.is_dir() || !seen.is_dir() {
            create_dir_0700(&dir)?;
            create_dir_0700(&cur)?;
            create_dir_0700(&seen)?;
            fsync_dir(&dir)?;
            fsync_dir(&self.inner.root.join(DEVICES))?;
        }
        Ok((cur, seen))
    }

    fn run_hook(&self, stage: StoreStage) {
        if let Some(hook) = &self.inner.hook {
            hook(stage);
        }
    }

    fn holds_key(&self, device: &str, key: &str) -> Result<bool, MaildropError> {
        let dir = self.device_dir(device)?;
        if dir.join(SEEN).join(key).exists() {
            return Ok(true);
        }
        let suffix = format!("-{key}.{MESSAGE_EXT}");
        Ok(self
            .list_names(&dir.join(CUR))?
            .iter()
            .any(|name| name.ends_with(&suffix)))
    }

    /// Whether the upstream message `upstream_id` was stored for `device` before (and is still
    /// here, or was collected by the device).
    pub fn contains_upstream(
        &self,
        device: &str,
        upstream_id: &str,
    ) -> Result<bool, MaildropError> {
        self.holds_key(device, &upstream_key(upstream_id))
    }

    /// Stores `bytes` for `device`. Returns once the message is fsynced and its directory entry
    /// is too; only then may the upstream copy be deleted. `upstream_id` is the caller's stable
    /// name of the upstream message; a second store with the same one is a
    /// [`StoreOutcome::Duplicate`] and writes nothing.
    pub fn store(
        &self,
        device: &str,
        upstream_id: Option<&str>,
        bytes: &[u8],
    ) -> Result<StoreOutcome, MaildropError> {
        let (cur, _seen) = self.device_dirs(device)?;
        let key = match upstream_id {
            Some(upstream) => {
                let key = upstream_key(upstream);
                if self.holds_key(device, &key)? {
                    return Ok(StoreOutcome::Duplicate);
                }
                key
            }
            None => random_key()?,
        };
        let ms = {
            let mut last = self
                .inner
                .last_ms
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *last = durable::unix_ms(SystemTime::now()).max(*last + 1);
            *last
        };
        let id = MaildropId(format!("{ms:013}-{key}"));
        let name = format!("{id}.{MESSAGE_EXT}");
        let tmp_dir = self.inner.root.join(TMP);
        let tmp = tmp_dir.join(format!("{device}.{name}"));
        write_synced(&tmp, bytes)?;
        self.run_hook(StoreStage::Written);
        let dest = cur.join(&name);
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        fsync_dir(&cur)?;
        fsync_dir(&tmp_dir)?;
        self.run_hook(StoreStage::Committed);
        Ok(StoreOutcome::Stored(id))
    }

    fn list_names(&self, cur: &Path) -> Result<Vec<String>, MaildropError> {
        let read = match fs::read_dir(cur) {
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => {
                return Err(MaildropError::Io {
                    path: cur.to_path_buf(),
                    error,
                });
            }
        };
        let mut names = Vec::new();
        for entry in read {
            let entry = entry.map_err(io_err(cur))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    /// The device's stored messages, oldest first, with their sizes.
    pub fn list(&self, device: &str) -> Result<Vec<MaildropEntry>, MaildropError> {
        let cur = self.device_dir(device)?.join(CUR);
        let mut entries = Vec::new();
        for name in self.list_names(&cur)? {
            let Some(stem) = name.strip_suffix(&format!(".{MESSAGE_EXT}")) else {
                continue;
            };
            let Ok(id) = MaildropId::parse(stem) else {
                continue;
            };
            let path = cur.join(&name);
            let size = match fs::metadata(&path) {
                Ok(m) => m.len(),
                // Deleted while listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(MaildropError::Io { path, error }),
            };
            entries.push(MaildropEntry { id, size });
        }
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(entries)
    }

    /// Number of messages and total size of the device's maildrop.
    pub fn stat(&self, device: &str) -> Result<(usize, u64), MaildropError> {
        let list = self.list(device)?;
        Ok((list.len(), list.iter().map(|e| e.size).sum()))
    }

    /// The bytes of one message.
    pub fn read(&self, device: &str, id: &MaildropId) -> Result<Vec<u8>, MaildropError> {
        let path = self
            .device_dir(device)?
            .join(CUR)
            .join(format!("{id}.{MESSAGE_EXT}"));
        match fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(MaildropError::NotFound {
                device: device.to_owned(),
                id: id.clone(),
            }),
            Err(error) => Err(MaildropError::Io { path, error }),
        }
    }

    /// Deletes messages the device collected (after its `DELE` + `QUIT`). A tombstone with each
    /// message's key is written and fsynced first, so its upstream copy, should it still exist,
    /// is never fetched again. Missing ids are ignored; returns how many were removed.
    pub fn delete(&self, device: &str, ids: &[MaildropId]) -> Result<usize, MaildropError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let (cur, seen) = self.device_dirs(device)?;
        for id in ids {
            let tombstone = seen.join(id.key());
            if !tombstone.exists() {
                write_synced(&tombstone, b"")?;
            }
        }
        fsync_dir(&seen)?;
        let mut removed = 0;
        for id in ids {
            let path = cur.join(format!("{id}.{MESSAGE_EXT}"));
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(MaildropError::Io { path, error }),
            }
        }
        fsync_dir(&cur)?;
        Ok(removed)
    }

    /// Forgets collected messages whose tombstone was written before `cutoff`: their upstream
    /// ids are no longer recognised. Only for profiles that delete upstream (there a tombstone
    /// matters only while a crashed run's upstream copy still exists); with `keep_upstream` the
    /// memory must stay as long as the upstream copies do. Returns how many were forgotten.
    pub fn prune_seen(&self, device: &str, cutoff: SystemTime) -> Result<usize, MaildropError> {
        let seen = self.device_dir(device)?.join(SEEN);
        let mut removed = 0;
        for name in self.list_names(&seen)? {
            if !is_key(&name) {
                continue;
            }
            let path = seen.join(&name);
            let written = match fs::metadata(&path).and_then(|m| m.modified()) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(MaildropError::Io { path, error }),
            };
            if written < cutoff {
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => return Err(MaildropError::Io { path, error }),
                }
            }
        }
        if removed > 0 {
            fsync_dir(&seen)?;
        }
        Ok(removed)
    }

    /// Takes the device's exclusive lock, or `None` when someone holds it.
    pub fn try_lock(&self, device: &str) -> Option<MaildropLock> {
        let mut locks = self
            .inner
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.insert(device.to_owned()).then(|| MaildropLock {
            maildrop: self.clone(),
            device: device.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_devices_are_validated() {
        assert!(MaildropId::parse("1700000000000-0123456789abcdef0123456789abcdef").is_ok());
        for bad in [
            "",
            "1700000000000",
            "170000000000-0123456789abcdef0123456789abcdef",
            "1700000000000-0123456789ABCDEF0123456789abcdef",
            "1700000000000-../../etc/passwd",
        ] {
            assert!(MaildropId::parse(bad).is_err(), "{bad}");
        }
        for bad in ["", ".", "..", "a/b", ".hidden", "a b"] {
            assert!(check_device(bad).is_err(), "{bad:?}");
        }
        assert!(check_device("mfd-1.lan@x_y").is_ok());
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let m = Maildrop::open(dir.path()).unwrap();
        let l = m.try_lock("d1").unwrap();
        assert!(m.try_lock("d1").is_none());
        assert!(m.try_lock("d2").is_some());
        drop(l);
        assert!(m.try_lock("d1").is_some());
    }
}
