//! The durable spool against a real file system: recovery, permissions, concurrency,
//! dead-lettering and a SIGKILL crash simulation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest as _, Sha256};
use tokenfleet_agent::spool::{Envelope, Spool, SpoolError, SpoolId};

fn envelope(device: &str) -> Envelope {
    Envelope {
        device: device.into(),
        from: "scanner@example.com".into(),
        rcpts: vec!["a@example.com".into(), "b@example.com".into()],
        mailbox: String::new(),
        user_address: String::new(),
    }
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn accepted_entry_survives_reopen_with_metadata_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let spool = Spool::open(&root).unwrap();
    let id = spool
        .accept(&envelope("mfd-1"), b"Subject: hi\r\n\r\nbody\r\n")
        .unwrap();
    drop(spool);

    let spool = Spool::open(&root).unwrap();
    assert_eq!(spool.recovery().queued, 1);
    assert_eq!(spool.queued().unwrap(), vec![id.clone()]);
    assert_eq!(spool.message(&id).unwrap(), b"Subject: hi\r\n\r\nbody\r\n");
    let meta = spool.entry(&id).unwrap();
    assert_eq!(meta.envelope, envelope("mfd-1"));
    assert_eq!(
        (meta.attempts, meta.size, meta.last_error.clone()),
        (0, 21, None)
    );

    for sub in ["", "tmp", "queue", "dead"] {
        assert_eq!(mode(&root.join(sub)), 0o700, "{sub}");
    }
    for f in std::fs::read_dir(root.join("queue")).unwrap() {
        assert_eq!(mode(&f.unwrap().path()), 0o600);
    }
}

#[test]
fn torn_temp_file_is_discarded_and_never_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let kept = spool.accept(&envelope("mfd-1"), b"kept").unwrap();
    drop(spool);
    // A crash after writing to tmp/ but before the rename: half a message, no ack was sent.
    std::fs::write(
        dir.path().join("tmp/0001700000000000-00000000deadbeef.eml"),
        b"Subject: torn\r\n\r\nhal",
    )
    .unwrap();
    std::fs::write(
        dir.path()
            .join("tmp/0001700000000000-00000000deadbeef.json"),
        b"{\"id\":",
    )
    .unwrap();
    // A sidecar renamed into queue/ whose message never followed (crash between the renames).
    std::fs::write(
        dir.path()
            .join("queue/0001700000000001-00000000deadbeef.json"),
        b"{}",
    )
    .unwrap();

    let spool = Spool::open(dir.path()).unwrap();
    let rec = spool.recovery();
    assert_eq!(
        (rec.removed_temp, rec.removed_orphans, rec.queued),
        (2, 1, 1)
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    let due: Vec<SpoolId> = spool
        .due(SystemTime::now() + Duration::from_secs(1))
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(due, vec![kept]);
}

#[test]
fn retry_complete_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let a = spool.accept(&envelope("mfd-1"), b"a").unwrap();
    let b = spool.accept(&envelope("mfd-2"), b"b").unwrap();
    let now = SystemTime::now() + Duration::from_millis(5);
    assert_eq!(spool.due(now).unwrap().len(), 2);

    let later = now + Duration::from_secs(60);
    let meta = spool.retry_later(&a, "421 4.7.0 try again", later).unwrap();
    assert_eq!(
        (meta.attempts, meta.last_error.as_deref()),
        (1, Some("421 4.7.0 try again"))
    );
    let due: Vec<SpoolId> = spool.due(now).unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(due, vec![b.clone()]);
    assert_eq!(spool.due(later).unwrap().len(), 2);
    // The retry state is durable too.
    let reopened = Spool::open(dir.path()).unwrap();
    assert_eq!(reopened.entry(&a).unwrap().attempts, 1);

    let stats = spool.stats(now + Duration::from_secs(10)).unwrap();
    assert_eq!(stats.depth, 2);
    assert!(stats.oldest_age >= Duration::from_secs(10), "{stats:?}");

    spool.complete(&b).unwrap();
    assert!(matches!(spool.complete(&b), Err(SpoolError::NotFound(_))));
    assert!(matches!(spool.message(&b), Err(SpoolError::NotFound(_))));
    assert_eq!(spool.stats(now).unwrap().depth, 1);
    assert_eq!(
        std::fs::read_dir(dir.path().join("queue")).unwrap().count(),
        2
    );
}

#[test]
fn dead_letter_moves_the_entry_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let id = spool.accept(&envelope("mfd-1"), b"doomed").unwrap();
    spool
        .dead_letter(&id, "550 5.7.30 Basic authentication is not supported")
        .unwrap();
    assert!(spool.queued().unwrap().is_empty());
    assert!(
        spool
            .due(SystemTime::now() + Duration::from_secs(1))
            .unwrap()
            .is_empty()
    );
    assert_eq!(spool.dead().unwrap(), vec![id.clone()]);
    let meta = spool.dead_entry(&id).unwrap();
    assert_eq!(
        meta.last_error.as_deref(),
        Some("550 5.7.30 Basic authentication is not supported")
    );
    assert_eq!(
        std::fs::read(dir.path().join(format!("dead/{id}.eml"))).unwrap(),
        b"doomed"
    );
    assert_eq!(spool.stats(SystemTime::now()).unwrap().dead, 1);
    assert!(matches!(
        spool.dead_letter(&id, "again"),
        Err(SpoolError::NotFound(_))
    ));
}

#[test]
fn concurrent_accepts_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path()).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let spool = Arc::clone(&spool);
            std::thread::spawn(move || {
                (0..25)
                    .map(|i| {
                        let body = format!("thread {t} message {i}");
                        (
                            spool
                                .accept(&envelope(&format!("mfd-{t}")), body.as_bytes())
                                .unwrap(),
                            body,
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = HashMap::new();
    for t in threads {
        for (id, body) in t.join().unwrap() {
            assert!(all.insert(id, body).is_none(), "duplicate id");
        }
    }
    assert_eq!(all.len(), 200);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.queued().unwrap().len(), 200);
    for (id, body) in all {
        assert_eq!(spool.message(&id).unwrap(), body.as_bytes());
    }
}

const CHILD_ENV: &str = "TOKENFLEET_SPOOL_CRASH_CHILD";

#[test]
fn due_entries_come_from_the_index_earliest_first_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let accepted: Vec<SpoolId> = (0..5)
        .map(|i| {
            spool
                .accept(&envelope("mfp"), format!("m{i}\r\n").as_bytes())
                .unwrap()
        })
        .collect();
    let now = SystemTime::now() + Duration::from_secs(1);
    // One entry waits an hour; the rest are due, earliest next attempt first (ids accepted in
    // the same millisecond are ordered by id).
    let waiting = accepted[0].clone();
    spool
        .retry_later(&waiting, "451 later", now + Duration::from_secs(3600))
        .unwrap();
    let mut order: Vec<(u64, SpoolId)> = accepted[1..]
        .iter()
        .map(|id| (spool.entry(id).unwrap().next_attempt_ms, id.clone()))
        .collect();
    order.sort();
    let expected: Vec<SpoolId> = order.into_iter().map(|(_, id)| id).collect();
    let ids = |metas: Vec<tokenfleet_agent::spool::EntryMeta>| -> Vec<SpoolId> {
        metas.into_iter().map(|m| m.id).collect()
    };
    assert_eq!(ids(spool.due_up_to(now, 2).unwrap()), expected[..2]);
    spool.complete(&expected[0]).unwrap();
    spool.dead_letter(&expected[1], "550 no").unwrap();
    assert_eq!(ids(spool.due(now).unwrap()), expected[2..]);
    // The waiting entry is due once its time has come, after the others.
    let later = now + Duration::from_secs(3601);
    let mut all_due = expected[2..].to_vec();
    all_due.push(waiting.clone());
    assert_eq!(ids(spool.due(later).unwrap()), all_due);

    let other = spool.accept(&envelope("fax"), b"f\r\n").unwrap();
    let by_device = spool.queue_by_device(now + Duration::from_secs(60));
    assert_eq!(by_device.len(), 2, "{by_device:?}");
    assert_eq!(by_device["mfp"].0, 3);
    assert_eq!(by_device["fax"].0, 1);
    assert!(
        by_device["mfp"].1 >= Duration::from_secs(60),
        "{by_device:?}"
    );
    drop(spool);

    // A new instance rebuilds the index from the sidecars.
    let spool = Spool::open(dir.path()).unwrap();
    let mut after_reopen = expected[2..].to_vec();
    after_reopen.push(other.clone());
    assert_eq!(ids(spool.due(now).unwrap()), after_reopen);
    assert_eq!(spool.queue_by_device(now)["mfp"].0, 3);
    spool.complete(&other).unwrap();
    assert!(!spool.queue_by_device(now).contains_key("fax"));
}

#[test]
fn messages_accepted_in_a_burst_are_due_in_acceptance_order() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    // Many land in the same millisecond; their order must still be the order they came in.
    let accepted: Vec<SpoolId> = (0..200)
        .map(|i| {
            spool
                .accept(&envelope("mfp"), format!("page {i}\r\n").as_bytes())
                .unwrap()
        })
        .collect();
    let later = SystemTime::now() + Duration::from_secs(5);
    let due: Vec<SpoolId> = spool
        .due(later)
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(due, accepted);
    let mut sorted = accepted.clone();
    sorted.sort();
    assert_eq!(sorted, accepted, "ids sort in acceptance order");
}

fn crash_message(seq: u64) -> Vec<u8> {
    // Varying sizes (up to ~200 KiB) so a kill can land mid-write.
    let len = 100 + (seq * 7919) % 200_000;
    let mut m = format!("Subject: crash test {seq}\r\n\r\n").into_bytes();
    m.extend((0..len).map(|i| b'a' + ((i + seq) % 26) as u8));
    m.extend_from_slice(b"\r\n");
    m
}

/// Not a test on its own: the child of `sigkill_never_loses_an_acknowledged_message`. Without
/// the environment variable it returns at once.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let spool = Spool::open(&dir).unwrap();
    let mut out = std::io::stdout().lock();
    for seq in 0.. {
        let msg = crash_message(seq);
        let id = spool.accept(&envelope("mfd-crash"), &msg).unwrap();
        writeln!(out, "ACK {id} {}", hex(&Sha256::digest(&msg))).unwrap();
        out.flush().unwrap();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_be_bytes(b) % n
}

#[test]
fn sigkill_never_loses_an_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &crate::libtest_name(module_path!(), "crash_child"),
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let stdout = child.stdout.take().unwrap();
        let mut child = Kill(child);
        let mut lines = BufReader::new(stdout).lines();
        let target = 5 + random_below(60);
        let mut acked = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while (acked.len() as u64) < target {
            assert!(Instant::now() < deadline, "child too slow");
            let line = lines.next().expect("child exited early").unwrap();
            if let Some(rest) = line.strip_prefix("ACK ") {
                let (id, sum) = rest.split_once(' ').unwrap();
                acked.push((SpoolId::parse(id).unwrap(), sum.to_owned()));
            }
        }
        // A random moment: somewhere in the middle of the next accepts.
        std::thread::sleep(Duration::from_micros(random_below(20_000)));
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        // Acks printed before the kill are still in the pipe.
        for line in lines.map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("ACK ") {
                let (id, sum) = rest.split_once(' ').unwrap();
                acked.push((SpoolId::parse(id).unwrap(), sum.to_owned()));
            }
        }

        let spool = Spool::open(dir.path()).unwrap();
        eprintln!(
            "round {round}: {} acknowledged before the kill; recovery {:?}",
            acked.len(),
            spool.recovery()
        );
        for (id, sum) in &acked {
            let msg = spool
                .message(id)
                .unwrap_or_else(|e| panic!("round {round}: acknowledged {id} lost: {e}"));
            assert_eq!(
                &hex(&Sha256::digest(&msg)),
                sum,
                "round {round}: {id} corrupted"
            );
            assert_eq!(spool.entry(id).unwrap().envelope.device, "mfd-crash");
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        // Nothing half-written is ever delivered: every queued entry is complete.
        for meta in spool
            .due(SystemTime::now() + Duration::from_secs(1))
            .unwrap()
        {
            assert_eq!(spool.message(&meta.id).unwrap().len() as u64, meta.size);
        }
        for (id, _) in acked {
            spool.complete(&id).unwrap();
        }
    }
}

#[test]
fn the_quota_refuses_what_does_not_fit_and_delivery_frees_it() {
    use tokenfleet_agent::spool::{SpoolError, SpoolLimits, TailFile};
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_with(
        dir.path().join("spool"),
        SpoolLimits {
            max_bytes: 1000,
            max_messages: 2,
        },
    )
    .unwrap();
    let env = envelope("mfd");
    let a = spool.accept(&env, &[b'a'; 600]).unwrap();
    assert_eq!(spool.room(), 400);
    let err = spool.accept(&env, &[b'b'; 500]).unwrap_err();
    assert!(matches!(err, SpoolError::Full { size: 500, .. }), "{err}");
    assert!(err.to_string().contains("spool full"), "{err}");
    // A message in two parts: head in memory, tail in a file under tmp/.
    let (tail, mut file) = TailFile::create(spool.tail_path().unwrap()).unwrap();
    std::io::Write::write_all(&mut file, b" and the tail").unwrap();
    drop(file);
    let b = spool.accept_incoming(&env, b"head", Some(&tail)).unwrap();
    drop(tail);
    assert_eq!(spool.message(&b).unwrap(), b"head and the tail");
    // Two messages: the count is reached.
    assert_eq!(spool.room(), 0);
    assert!(matches!(
        spool.accept(&env, b"x").unwrap_err(),
        SpoolError::Full { .. }
    ));
    spool.complete(&a).unwrap();
    assert_eq!(spool.room(), 1000 - 17);
    // Reopening counts what is queued.
    drop(spool);
    let spool = Spool::open_with(
        dir.path().join("spool"),
        SpoolLimits {
            max_bytes: 1000,
            max_messages: 2,
        },
    )
    .unwrap();
    assert_eq!(spool.room(), 1000 - 17);
    assert_eq!(
        std::fs::read_dir(dir.path().join("spool/tmp"))
            .unwrap()
            .count(),
        0
    );
}

/// Group commit: concurrent accepts share fsyncs of `queue/`, and none is acknowledged before an
/// fsync that covers it. The shared fsync is replaced by one that records what it makes durable
/// (the names in `queue/` when it starts) and then — the crash — blocks forever: what survives a
/// power loss is what the completed fsyncs covered. Every acknowledged message must be in it;
/// the accepts caught behind the crashed fsync never return.
#[test]
fn group_commit_never_acknowledges_before_the_shared_fsync() {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let durable: Arc<Mutex<HashSet<String>>> = Arc::default();
    let crashed = Arc::new(AtomicBool::new(false));
    let syncs = Arc::new(AtomicUsize::new(0));
    let syncer = {
        let (durable, crashed, syncs) = (
            Arc::clone(&durable),
            Arc::clone(&crashed),
            Arc::clone(&syncs),
        );
        Arc::new(move |queue: &std::path::Path| -> std::io::Result<()> {
            let listed: HashSet<String> = std::fs::read_dir(queue)?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect();
            if crashed.load(Ordering::SeqCst) {
                // The machine lost power during this fsync: it never completes.
                loop {
                    std::thread::park();
                }
            }
            // Let more accepts pile up behind this fsync, as a real disk would.
            std::thread::sleep(Duration::from_millis(20));
            tokenfleet_agent::durable::fsync_dir(queue)?;
            durable.lock().unwrap().extend(listed);
            syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    };
    let spool = Arc::new(Spool::open_with_syncer(&root, Default::default(), Some(syncer)).unwrap());
    let acked: Arc<Mutex<Vec<SpoolId>>> = Arc::default();
    let mut threads = Vec::new();
    for t in 0..16 {
        let (spool, acked, crashed) =
            (Arc::clone(&spool), Arc::clone(&acked), Arc::clone(&crashed));
        threads.push(std::thread::spawn(move || {
            for i in 0.. {
                if crashed.load(Ordering::SeqCst) {
                    return;
                }
                let body = format!("Subject: {t}/{i}\r\n\r\nscan\r\n");
                let id = spool.accept(&envelope("mfd"), body.as_bytes()).unwrap();
                acked.lock().unwrap().push(id);
            }
        }));
    }
    // Accept for a while, then crash in the middle of the traffic.
    while acked.lock().unwrap().len() < 200 {
        std::thread::sleep(Duration::from_millis(5));
    }
    crashed.store(true, Ordering::SeqCst);
    let before_crash = acked.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(300));
    let acked = acked.lock().unwrap().clone();
    // Threads stuck behind the crashed fsync never got their acknowledgement.
    assert!(
        acked.len() <= before_crash + 16,
        "{} > {before_crash} + 16",
        acked.len()
    );
    let durable = durable.lock().unwrap().clone();
    for id in &acked {
        assert!(
            durable.contains(&format!("{id}.eml")) && durable.contains(&format!("{id}.json")),
            "acknowledged {id} was not covered by a completed fsync"
        );
    }
    let (requests, fsyncs) = spool.queue_sync_counts();
    let completed = syncs.load(Ordering::SeqCst);
    assert!(
        completed * 4 <= acked.len(),
        "{} accepts should share fsyncs, but took {completed} of them ({requests} requests, {fsyncs} started)",
        acked.len()
    );
    // The threads blocked in the crashed fsync stay blocked: leak them (the process ends).
    drop(threads);
}

/// Group commit against the real file system: many threads accept at once, all messages are
/// there after reopening, and far fewer directory fsyncs ran than messages were accepted.
#[test]
fn concurrent_accepts_share_directory_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let spool = Arc::new(Spool::open(&root).unwrap());
    let mut threads = Vec::new();
    for t in 0..16 {
        let spool = Arc::clone(&spool);
        threads.push(std::thread::spawn(move || {
            (0..25)
                .map(|i| {
                    spool
                        .accept(
                            &envelope("mfd"),
                            format!("Subject: {t}/{i}\r\n\r\nx\r\n").as_bytes(),
                        )
                        .unwrap()
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut ids: Vec<SpoolId> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let (requests, fsyncs) = spool.queue_sync_counts();
    assert_eq!(requests, 400);
    assert!(fsyncs < requests, "{fsyncs} fsyncs for {requests} accepts");
    drop(spool);
    let spool = Spool::open(&root).unwrap();
    let mut queued = spool.queued().unwrap();
    ids.sort();
    queued.sort();
    assert_eq!(queued, ids);
}
