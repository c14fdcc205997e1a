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
