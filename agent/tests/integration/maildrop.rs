//! The maildrop on a real file system: round trip, permissions, upstream-id memory, and crash
//! safety proven with a real process death — a child process (this test binary, re-executed)
//! stores a message with a hook that SIGKILLs the process between the fsynced temporary write
//! and the rename, or right after the commit; the parent then opens the maildrop and checks
//! what survived.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tokenfleet_agent::maildrop::{Maildrop, MaildropId, StoreHook, StoreOutcome, StoreStage};

const CHILD_DIR: &str = "TF_MAILDROP_CHILD_DIR";
const CHILD_STAGE: &str = "TF_MAILDROP_CHILD_STAGE";
const DEVICE: &str = "mfd-1";
const UPSTREAM: &str = "pop3 printer@contoso.example UID-0001";

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn store_list_read_delete_round_trip_with_private_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("maildrop");
    let m = Maildrop::open(&root).unwrap();
    assert_eq!(m.stat(DEVICE).unwrap(), (0, 0));
    let a = b"Subject: a\r\n\r\nfirst\r\n".to_vec();
    let b = b"Subject: b\r\n\r\n.second\r\n".to_vec();
    let StoreOutcome::Stored(id_a) = m.store(DEVICE, Some("u1"), &a).unwrap() else {
        panic!("first store must store");
    };
    let StoreOutcome::Stored(id_b) = m.store(DEVICE, None, &b).unwrap() else {
        panic!("a store without upstream id always stores");
    };
    assert_ne!(id_a, id_b);
    let list = m.list(DEVICE).unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].id, id_a, "oldest first");
    assert_eq!(list[0].size, a.len() as u64);
    assert_eq!(m.stat(DEVICE).unwrap(), (2, (a.len() + b.len()) as u64));
    assert_eq!(m.read(DEVICE, &id_a).unwrap(), a);
    assert_eq!(m.read(DEVICE, &id_b).unwrap(), b);
    assert!(id_a.as_str().len() <= 70, "usable as a POP3 UIDL");
    assert_eq!(MaildropId::parse(id_a.as_str()).unwrap(), id_a);

    // Private: directories 0700, files 0600.
    assert_eq!(mode(&root), 0o700);
    let dev = root.join("devices").join(DEVICE);
    assert_eq!(mode(&dev), 0o700);
    assert_eq!(mode(&dev.join("cur")), 0o700);
    assert_eq!(mode(&dev.join("cur").join(format!("{id_a}.eml"))), 0o600);

    // Another device sees nothing of it.
    assert!(m.list("mfd-2").unwrap().is_empty());
    // Bad device names are refused by name, not turned into paths.
    let err = m.store("../etc", None, b"x").unwrap_err().to_string();
    assert!(err.contains("invalid device name"), "{err}");

    assert_eq!(m.delete(DEVICE, std::slice::from_ref(&id_a)).unwrap(), 1);
    assert_eq!(
        m.delete(DEVICE, std::slice::from_ref(&id_a)).unwrap(),
        0,
        "idempotent"
    );
    assert_eq!(m.list(DEVICE).unwrap().len(), 1);
    assert!(
        m.read(DEVICE, &id_a)
            .unwrap_err()
            .to_string()
            .contains("not found")
    );
}

#[test]
fn upstream_ids_are_remembered_after_the_device_collected_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let m = Maildrop::open(dir.path()).unwrap();
    assert!(!m.contains_upstream(DEVICE, UPSTREAM).unwrap());
    let StoreOutcome::Stored(id) = m.store(DEVICE, Some(UPSTREAM), b"one\r\n").unwrap() else {
        panic!()
    };
    assert!(m.contains_upstream(DEVICE, UPSTREAM).unwrap());
    assert_eq!(
        m.store(DEVICE, Some(UPSTREAM), b"one\r\n").unwrap(),
        StoreOutcome::Duplicate
    );
    assert_eq!(m.list(DEVICE).unwrap().len(), 1);
    // The device collects it (DELE + QUIT): the memory stays.
    m.delete(DEVICE, &[id]).unwrap();
    assert!(m.list(DEVICE).unwrap().is_empty());
    assert!(m.contains_upstream(DEVICE, UPSTREAM).unwrap());
    assert_eq!(
        m.store(DEVICE, Some(UPSTREAM), b"one\r\n").unwrap(),
        StoreOutcome::Duplicate
    );
    // Survives reopening; per device.
    drop(m);
    let m = Maildrop::open(dir.path()).unwrap();
    assert!(m.contains_upstream(DEVICE, UPSTREAM).unwrap());
    assert!(!m.contains_upstream("mfd-2", UPSTREAM).unwrap());
    // Pruning forgets only tombstones written before the cutoff.
    let long_ago = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    assert_eq!(m.prune_seen(DEVICE, long_ago).unwrap(), 0);
    assert!(m.contains_upstream(DEVICE, UPSTREAM).unwrap());
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    assert_eq!(m.prune_seen(DEVICE, later).unwrap(), 1);
    assert!(!m.contains_upstream(DEVICE, UPSTREAM).unwrap());
}

#[test]
fn leftover_temporary_files_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    drop(Maildrop::open(dir.path()).unwrap());
    std::fs::write(dir.path().join("tmp").join("mfd-1.junk.eml"), b"partial").unwrap();
    let m = Maildrop::open(dir.path()).unwrap();
    assert_eq!(m.recovery().removed_temp, 1);
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

/// Runs [`child_store_then_die`] in a child process and returns after it died.
fn crash_child_at(stage: &str, dir: &Path) {
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            &crate::libtest_name(module_path!(), "child_store_then_die"),
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_STAGE, stage)
        .status()
        .unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the child must die by SIGKILL at the hook: {status}"
    );
}

#[test]
fn sigkill_between_temporary_write_and_rename_leaves_no_message_and_no_memory() {
    let dir = tempfile::tempdir().unwrap();
    crash_child_at("written", dir.path());
    // The child's data reached tmp/ (fsynced) but was never committed.
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        1
    );
    let m = Maildrop::open(dir.path()).unwrap();
    assert_eq!(m.recovery().removed_temp, 1);
    assert!(m.list(DEVICE).unwrap().is_empty());
    // store() never returned, so the fetcher never deleted upstream: the next run fetches it.
    assert!(!m.contains_upstream(DEVICE, UPSTREAM).unwrap());
    assert!(matches!(
        m.store(DEVICE, Some(UPSTREAM), b"the message\r\n").unwrap(),
        StoreOutcome::Stored(_)
    ));
}

#[test]
fn sigkill_right_after_commit_keeps_the_message_and_dedupes_the_refetch() {
    let dir = tempfile::tempdir().unwrap();
    crash_child_at("committed", dir.path());
    let m = Maildrop::open(dir.path()).unwrap();
    assert_eq!(m.recovery().removed_temp, 0);
    let list = m.list(DEVICE).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(m.read(DEVICE, &list[0].id).unwrap(), b"the message\r\n");
    // The upstream copy was not deleted (the process died first): the next run finds it stored.
    assert!(m.contains_upstream(DEVICE, UPSTREAM).unwrap());
    assert_eq!(
        m.store(DEVICE, Some(UPSTREAM), b"the message\r\n").unwrap(),
        StoreOutcome::Duplicate
    );
    assert_eq!(m.list(DEVICE).unwrap().len(), 1);
}

/// Not a test by itself: the child process of the crash tests (does nothing without its
/// environment).
#[test]
#[ignore = "run as a child process by the crash tests"]
fn child_store_then_die() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let stage = match std::env::var(CHILD_STAGE).unwrap().as_str() {
        "written" => StoreStage::Written,
        _ => StoreStage::Committed,
    };
    let hook: StoreHook = Arc::new(move |at| {
        if at == stage {
            let _ = Command::new("kill")
                .args(["-KILL", &std::process::id().to_string()])
                .status();
            loop {
                std::thread::park();
            }
        }
    });
    let m = Maildrop::open_with_hook(&dir, Some(hook)).unwrap();
    let _ = m.store(DEVICE, Some(UPSTREAM), b"the message\r\n");
    unreachable!("the hook kills the process");
}

#[test]
fn device_lock_is_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let m = Maildrop::open(dir.path()).unwrap();
    let lock = m.try_lock(DEVICE).unwrap();
    assert_eq!(lock.device(), DEVICE);
    assert!(m.try_lock(DEVICE).is_none());
    drop(lock);
    assert!(m.try_lock(DEVICE).is_some());
}
