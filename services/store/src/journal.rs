//! The embedded store's append journal: a file beside the database (`<path>.journal`, mode 0600)
//! that makes stream appends (the audit log) durable with one write and one `fdatasync` per
//! group commit, where a durable redb transaction wrote about a dozen pages and synced them.
//!
//! A group commit gives its appends their ids, records the group as one journal record, syncs
//! the journal and answers them; the database gets the answered groups later, many in one
//! transaction committed without a sync of its own (`Durability::None`: visible to every later
//! read, durable with the next durable commit), and always before a read or trim of a stream.
//! Every so often (see [`Journal::checkpoint_due`]) a group commits durably instead, together
//! with every group not yet in the database, and the journal starts again from its beginning.
//! Each group carries a sequence number (LSN) that the database also stores with the last group
//! it holds, so after a crash the journal's groups the database does not hold durably (LSN
//! above the stored one) are applied again, and no others: an entry trimmed after it was
//! appended never comes back.
//!
//! The file is written in place and only grows, by zero-filled steps: overwriting blocks the
//! file already has makes `fdatasync` a data flush, where appending to a growing file also
//! commits the file system's journal (its size changed) on every sync. So the journal is read
//! up to its first record that is short, fails its checksum or does not continue the sequence
//! (a record cut short by a crash, never acknowledged; zeros; or an earlier round's records).
//!
//! Hand-written because what it needs is small and specific (checksummed records written in
//! place, a sequence number shared with redb's transactions) and no maintained crate offers a
//! write-ahead log that cooperates with redb's transactions this way.
//!
//! Record: `u32` payload length, `u32` CRC-32 of LSN and payload, `u64` LSN (all little-endian),
//! then the payload: `u32` number of entries, and per entry the scope, stream and id (each `u16`
//! length + bytes), the stream's bound (`u64`) and the data (`u32` length + bytes).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A group commit becomes a durable database commit (and the journal starts again) when the
/// last one is this old...
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// ...or the journal has reached this size.
const CHECKPOINT_BYTES: u64 = 16 << 20;
/// The file grows by zero-filled steps of this size.
const GROW_STEP: u64 = 1 << 20;

const HEADER_LEN: usize = 16;

/// One append as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JournalEntry {
    pub(crate) scope: String,
    pub(crate) stream: String,
    pub(crate) id: String,
    pub(crate) max_len: u64,
    pub(crate) data: Vec<u8>,
}

/// A group read back from the journal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct JournalGroup {
    pub(crate) lsn: u64,
    pub(crate) entries: Vec<JournalEntry>,
}

/// The open journal file; one group committer uses it at a time.
#[derive(Debug)]
pub(crate) struct Journal {
    file: File,
    path: PathBuf,
    /// Where the next group is written.
    len: u64,
    /// The file's length (all of it written, zeros past the records).
    size: u64,
    last_checkpoint: Instant,
}

/// The journal's file for the database at `db_path`.
pub(crate) fn journal_path(db_path: &Path) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

impl Journal {
    /// Opens (creating, mode 0600) the journal of the database at `db_path` and reads its groups.
    pub(crate) fn open(db_path: &Path) -> Result<(Self, Vec<JournalGroup>), String> {
        let path = journal_path(db_path);
        let shown = path.display().to_string();
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options
            .open(&path)
            .map_err(|e| format!("cannot open the append journal {shown}: {e}"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read the append journal {shown}: {e}"))?;
        let (groups, valid) = parse(&bytes);
        let journal = Self {
            file,
            path,
            len: u64::try_from(valid).unwrap_or(u64::MAX),
            size: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            last_checkpoint: Instant::now(),
        };
        Ok((journal, groups))
    }

    /// Whether the next group should commit durably and start the journal again.
    pub(crate) fn checkpoint_due(&self) -> bool {
        self.len >= CHECKPOINT_BYTES || self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
    }

    /// Writes the group where the last one ended and syncs it; on an error the group is not
    /// in the journal.
    pub(crate) fn write_group(&mut self, group: &JournalGroup) -> Result<(), String> {
        let record = encode(group)?;
        let start = self.len;
        let end = start + u64::try_from(record.len()).unwrap_or(u64::MAX);
        let written = if end > self.size {
            // Grow with zeros (then the sync covers the new length too).
            let size = end.div_ceil(GROW_STEP) * GROW_STEP;
            let zeros = vec![0u8; usize::try_from(size - self.size).unwrap_or(usize::MAX)];
            self.file
                .write_all_at(&zeros, self.size)
                .and_then(|()| self.file.write_all_at(&record, start))
                .and_then(|()| self.file.sync_all())
                .map(|()| self.size = size)
        } else {
            self.file
                .write_all_at(&record, start)
                .and_then(|()| self.file.sync_data())
        };
        match written {
            Ok(()) => {
                self.len = end;
                Ok(())
            }
            Err(e) => {
                let problem = format!("cannot write the append journal {}: {e}", self.shown());
                // Best effort: a record not synced whole is cut off when read anyway.
                let _ = self.undo_last(start);
                Err(problem)
            }
        }
    }

    /// Takes the group written at `start` out again (its write or sync failed, so it was never
    /// acknowledged and must not come back after a crash): its header is zeroed and synced.
    fn undo_last(&mut self, start: u64) -> Result<(), String> {
        self.len = start;
        self.file
            .write_all_at(&[0u8; HEADER_LEN], start)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| {
                format!(
                    "cannot undo a group in the append journal {}: {e}",
                    self.shown()
                )
            })
    }

    /// Where the next group starts.
    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Starts the journal again from its beginning after a durable database commit holding
    /// everything it had (the earlier round's records left behind are below the sequence).
    pub(crate) fn checkpointed(&mut self) {
        self.last_checkpoint = Instant::now();
        self.len = 0;
    }

    /// Tests: makes the next group commit a checkpoint (`true`) or keeps checkpoints off for an
    /// hour (`false`), whatever the time since the last.
    #[cfg(test)]
    pub(crate) fn force_checkpoint_due(&mut self, due: bool) {
        let hour = Duration::from_secs(3600);
        self.last_checkpoint = if due {
            Instant::now()
                .checked_sub(hour)
                .unwrap_or_else(Instant::now)
        } else {
            Instant::now() + hour
        };
    }

    fn shown(&self) -> std::path::Display<'_> {
        self.path.display()
    }
}

fn encode(group: &JournalGroup) -> Result<Vec<u8>, String> {
    let mut record = vec![0u8; HEADER_LEN];
    record.extend_from_slice(&0u32.to_le_bytes());
    let mut count: u32 = 0;
    for entry in &group.entries {
        for text in [&entry.scope, &entry.stream, &entry.id] {
            let len = u16::try_from(text.len())
                .map_err(|_| format!("a journaled name is {} bytes, over 65535", text.len()))?;
            record.extend_from_slice(&len.to_le_bytes());
            record.extend_from_slice(text.as_bytes());
        }
        record.extend_from_slice(&entry.max_len.to_le_bytes());
        let len = u32::try_from(entry.data.len()).map_err(|_| {
            format!(
                "a journaled entry is {} bytes, over 4 GiB",
                entry.data.len()
            )
        })?;
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&entry.data);
        count += 1;
    }
    record[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&count.to_le_bytes());
    let payload_len = u32::try_from(record.len() - HEADER_LEN)
        .map_err(|_| "a journaled group is over 4 GiB".to_owned())?;
    record[8..16].copy_from_slice(&group.lsn.to_le_bytes());
    let crc = crc32fast::hash(&record[8..]);
    record[0..4].copy_from_slice(&payload_len.to_le_bytes());
    record[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(record)
}

/// The groups at the start of `bytes` and where they end: the first record that is short,
/// fails its checksum or entries, or whose LSN does not follow the one before ends the journal.
fn parse(bytes: &[u8]) -> (Vec<JournalGroup>, usize) {
    let mut groups: Vec<JournalGroup> = Vec::new();
    let mut at = 0;
    while let Some(rest) = bytes.get(at..).filter(|r| r.len() >= HEADER_LEN) {
        let payload_len = u32::from_le_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
        let Some(body) = rest.get(8..HEADER_LEN + payload_len) else {
            break;
        };
        let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap_or_default());
        if payload_len == 0 || crc32fast::hash(body) != crc {
            break;
        }
        let lsn = u64::from_le_bytes(body[0..8].try_into().unwrap_or_default());
        if groups.last().is_some_and(|g| g.lsn >= lsn) {
            break;
        }
        let Some(entries) = decode_entries(&body[8..]) else {
            break;
        };
        groups.push(JournalGroup { lsn, entries });
        at += HEADER_LEN + payload_len;
    }
    (groups, at)
}

fn decode_entries(mut payload: &[u8]) -> Option<Vec<JournalEntry>> {
    fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if input.len() < n {
            return None;
        }
        let (head, tail) = input.split_at(n);
        *input = tail;
        Some(head)
    }
    fn text(input: &mut &[u8]) -> Option<String> {
        let len = u16::from_le_bytes(take(input, 2)?.try_into().ok()?) as usize;
        String::from_utf8(take(input, len)?.to_vec()).ok()
    }
    let count = u32::from_le_bytes(take(&mut payload, 4)?.try_into().ok()?);
    let mut entries = Vec::with_capacity(count.min(4096) as usize);
    for _ in 0..count {
        let scope = text(&mut payload)?;
        let stream = text(&mut payload)?;
        let id = text(&mut payload)?;
        let max_len = u64::from_le_bytes(take(&mut payload, 8)?.try_into().ok()?);
        let len = u32::from_le_bytes(take(&mut payload, 4)?.try_into().ok()?) as usize;
        let data = take(&mut payload, len)?.to_vec();
        entries.push(JournalEntry {
            scope,
            stream,
            id,
            max_len,
            data,
        });
    }
    payload.is_empty().then_some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u8) -> JournalEntry {
        JournalEntry {
            scope: "t:acme".into(),
            stream: "audit".into(),
            id: format!("000{i}"),
            max_len: 10,
            data: vec![i; usize::from(i) * 3],
        }
    }

    fn group(lsn: u64, entries: &[JournalEntry]) -> JournalGroup {
        JournalGroup {
            lsn,
            entries: entries.to_vec(),
        }
    }

    fn record(lsn: u64, entries: &[JournalEntry]) -> Vec<u8> {
        encode(&group(lsn, entries)).unwrap()
    }

    #[test]
    fn groups_read_back_as_written() {
        let mut bytes = record(7, &[entry(1), entry(2)]);
        bytes.extend(record(8, &[entry(3)]));
        let (groups, valid) = parse(&bytes);
        assert_eq!(valid, bytes.len());
        assert_eq!(
            groups,
            vec![
                JournalGroup {
                    lsn: 7,
                    entries: vec![entry(1), entry(2)]
                },
                JournalGroup {
                    lsn: 8,
                    entries: vec![entry(3)]
                },
            ]
        );
    }

    #[test]
    fn the_journal_ends_at_a_torn_record_zeros_or_an_earlier_round() {
        let first = record(1, &[entry(1)]);
        let second = record(2, &[entry(2)]);
        // Cut anywhere in the second record, or padded with zeros.
        for cut in 1..second.len() {
            let mut bytes = first.clone();
            bytes.extend_from_slice(&second[..cut]);
            bytes.extend_from_slice(&[0; 64]);
            let (groups, valid) = parse(&bytes);
            assert_eq!((groups.len(), valid), (1, first.len()), "cut at {cut}");
        }
        // A flipped byte anywhere in the second record.
        for at in 0..second.len() {
            let mut bytes = first.clone();
            bytes.extend_from_slice(&second);
            bytes[first.len() + at] ^= 0x5a;
            assert_eq!(parse(&bytes).1, first.len(), "flipped at {at}");
        }
        // An earlier round's record after this round's: its sequence number is lower.
        let mut bytes = record(9, &[entry(3)]);
        bytes.extend_from_slice(&second);
        let (groups, valid) = parse(&bytes);
        assert_eq!((groups.len(), groups[0].lsn), (1, 9));
        assert_eq!(valid, bytes.len() - second.len());
    }

    #[test]
    fn the_file_is_written_in_place_and_read_back_after_reopening() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("store.redb");
        let (e1, e2, e3) = (entry(4), entry(5), entry(6));
        {
            let (mut journal, groups) = Journal::open(&db).unwrap();
            assert!(groups.is_empty());
            journal
                .write_group(&group(1, std::slice::from_ref(&e1)))
                .unwrap();
            journal
                .write_group(&group(2, &[e2.clone(), e1.clone()]))
                .unwrap();
        }
        let path = journal_path(&db);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), GROW_STEP);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        {
            let (mut journal, groups) = Journal::open(&db).unwrap();
            let lsns: Vec<u64> = groups.iter().map(|g| g.lsn).collect();
            assert_eq!(lsns, vec![1, 2]);
            assert_eq!(groups[1].entries, vec![entry(5), entry(4)]);
            // A new round from the start, shorter than the last: only it is read back.
            journal.checkpointed();
            journal.write_group(&group(3, &[e3])).unwrap();
            // A group whose write failed is taken out again.
            let start = journal.len();
            journal.write_group(&group(4, &[e1])).unwrap();
            journal.undo_last(start).unwrap();
        }
        let (_, groups) = Journal::open(&db).unwrap();
        assert_eq!(
            groups,
            vec![JournalGroup {
                lsn: 3,
                entries: vec![entry(6)]
            }]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), GROW_STEP);
    }
}
