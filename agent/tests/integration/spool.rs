//! The durable spool against a real file system: recovery, permissions, concurrency,
//! dead-lettering, the previous (two-file) layout still read, and a SIGKILL crash simulation
//! over accepts (in memory and streamed), retries and completions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest as _, Sha256};
use tokenfleet_agent::spool::{EntryMeta, Envelope, Spool, SpoolError, SpoolId, TailFile};

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
        let id = if seq % 2 == 0 {
            spool.accept(&envelope("mfd-crash"), &msg).unwrap()
        } else {
            // As the ingress does: the start in memory, the rest streamed to a tail file in
            // tmp/, which becomes the entry.
            let split = msg.len().min(64 + (seq as usize * 31) % 4096);
            let (tail, mut file) = TailFile::create(spool.tail_path().unwrap()).unwrap();
            file.write_all(&msg[split..]).unwrap();
            drop(file);
            spool
                .accept_incoming(&envelope("mfd-crash"), &msg[..split], Some(tail))
                .unwrap()
        };
        writeln!(out, "ACK {id} {}", hex(&Sha256::digest(&msg))).unwrap();
        out.flush().unwrap();
        if seq % 3 == 0 {
            // A failed attempt: the metadata is rewritten beside the entry.
            spool
                .retry_later(&id, "451 4.3.0 later", SystemTime::now())
                .unwrap();
        }
        if seq % 4 == 1 {
            // A delivery: once `complete` returned, the entry must never come back.
            writeln!(out, "COMPLETING {id}").unwrap();
            out.flush().unwrap();
            spool.complete(&id).unwrap();
            writeln!(out, "COMPLETED {id}").unwrap();
            out.flush().unwrap();
        }
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
        // Being completed when the kill came (may be queued or not), and completed.
        let mut completing = std::collections::HashSet::new();
        let mut completed = std::collections::HashSet::new();
        let read = |line: String,
                    acked: &mut Vec<(SpoolId, String)>,
                    completing: &mut std::collections::HashSet<SpoolId>,
                    completed: &mut std::collections::HashSet<SpoolId>| {
            if let Some(rest) = line.strip_prefix("ACK ") {
                let (id, sum) = rest.split_once(' ').unwrap();
                acked.push((SpoolId::parse(id).unwrap(), sum.to_owned()));
            } else if let Some(id) = line.strip_prefix("COMPLETING ") {
                completing.insert(SpoolId::parse(id).unwrap());
            } else if let Some(id) = line.strip_prefix("COMPLETED ") {
                completed.insert(SpoolId::parse(id).unwrap());
            }
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while (acked.len() as u64) < target {
            assert!(Instant::now() < deadline, "child too slow");
            let line = lines.next().expect("child exited early").unwrap();
            read(line, &mut acked, &mut completing, &mut completed);
        }
        // A random moment: somewhere in the middle of the next accepts, retries, completions.
        std::thread::sleep(Duration::from_micros(random_below(20_000)));
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        // Lines printed before the kill are still in the pipe.
        for line in lines.map_while(Result::ok) {
            read(line, &mut acked, &mut completing, &mut completed);
        }

        let spool = Spool::open(dir.path()).unwrap();
        eprintln!(
            "round {round}: {} acknowledged before the kill; recovery {:?}",
            acked.len(),
            spool.recovery()
        );
        for (id, sum) in &acked {
            if completed.contains(id) {
                // Delivered and removed: never delivered again.
                assert!(
                    matches!(spool.message(id), Err(SpoolError::NotFound(_))),
                    "round {round}: completed {id} came back"
                );
                continue;
            }
            if completing.contains(id) && matches!(spool.message(id), Err(SpoolError::NotFound(_)))
            {
                continue;
            }
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
        for id in spool.queued().unwrap() {
            spool.complete(&id).unwrap();
        }
    }
}

#[test]
fn the_quota_refuses_what_does_not_fit_and_delivery_frees_it() {
    use tokenfleet_agent::spool::SpoolLimits;
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
    let tail_path = tail.path().to_path_buf();
    let b = spool.accept_incoming(&env, b"head", Some(tail)).unwrap();
    assert_eq!(spool.message(&b).unwrap(), b"head and the tail");
    // The tail file became the entry: nothing copied, nothing left in tmp/.
    assert!(!tail_path.exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("spool/tmp"))
            .unwrap()
            .count(),
        0
    );
    // A refused message's tail file is removed.
    let (big, mut file) = TailFile::create(spool.tail_path().unwrap()).unwrap();
    std::io::Write::write_all(&mut file, &[b'z'; 900]).unwrap();
    drop(file);
    let big_path = big.path().to_path_buf();
    assert!(matches!(
        spool.accept_incoming(&env, b"head", Some(big)).unwrap_err(),
        SpoolError::Full { .. }
    ));
    assert!(!big_path.exists());
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
            durable.contains(&format!("{id}.msg")),
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

/// Writes an entry as an agent of the previous layout did: `queue/<id>.eml` (the message) and
/// `queue/<id>.json` (its metadata).
fn legacy_entry(root: &std::path::Path, millis: u64, message: &[u8], attempts: u32) -> SpoolId {
    let id = SpoolId::parse(&format!("{millis:013}-{:016x}", millis * 7 + 1)).unwrap();
    let meta = EntryMeta {
        id: id.clone(),
        envelope: envelope("old-mfp"),
        size: message.len() as u64,
        accepted_at_ms: millis,
        attempts,
        next_attempt_ms: millis,
        last_error: (attempts > 0).then(|| "421 4.7.0 earlier".to_owned()),
    };
    std::fs::create_dir_all(root.join("queue")).unwrap();
    std::fs::write(root.join(format!("queue/{id}.eml")), message).unwrap();
    std::fs::write(
        root.join(format!("queue/{id}.json")),
        serde_json::to_vec(&meta).unwrap(),
    )
    .unwrap();
    id
}

/// An agent upgraded with a non-empty spool: entries of the previous layout are queued, due,
/// read, retried, completed and dead-lettered as they are, next to new ones.
#[test]
fn entries_of_the_previous_layout_are_still_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let now_ms = tokenfleet_agent::durable::unix_ms(SystemTime::now());
    let first = legacy_entry(&root, now_ms - 3000, b"Subject: old 1\r\n\r\none\r\n", 0);
    let second = legacy_entry(&root, now_ms - 2000, b"Subject: old 2\r\n\r\ntwo\r\n", 2);
    let third = legacy_entry(&root, now_ms - 1000, b"Subject: old 3\r\n\r\nthree\r\n", 0);
    // A legacy message whose sidecar never followed (never acknowledged): dropped.
    std::fs::write(
        root.join("queue/0001700000000000-00000000deadbeef.eml"),
        b"half",
    )
    .unwrap();

    let spool = Spool::open(&root).unwrap();
    let rec = spool.recovery();
    assert_eq!((rec.queued, rec.removed_orphans), (3, 1), "{rec:?}");
    let new = spool.accept(&envelope("mfd-1"), b"new\r\n").unwrap();
    assert_eq!(
        spool.queued().unwrap(),
        vec![first.clone(), second.clone(), third.clone(), new.clone()]
    );
    let due: Vec<EntryMeta> = spool
        .due(SystemTime::now() + Duration::from_secs(1))
        .unwrap();
    let ids: Vec<&SpoolId> = due.iter().map(|m| &m.id).collect();
    assert_eq!(ids, vec![&first, &second, &third, &new]);
    assert_eq!(due[1].attempts, 2);
    assert_eq!(due[1].envelope, envelope("old-mfp"));
    assert_eq!(
        spool.message(&first).unwrap(),
        b"Subject: old 1\r\n\r\none\r\n"
    );
    assert_eq!(spool.queued_bytes(), 23 + 23 + 25 + 5);

    // Retried: the sidecar is rewritten; the entry stays in the previous layout.
    let later = SystemTime::now() + Duration::from_secs(600);
    assert_eq!(
        spool
            .retry_later(&second, "451 again", later)
            .unwrap()
            .attempts,
        3
    );
    assert!(root.join(format!("queue/{second}.eml")).exists());
    // Delivered: both files go.
    spool.complete(&first).unwrap();
    assert!(!root.join(format!("queue/{first}.eml")).exists());
    assert!(!root.join(format!("queue/{first}.json")).exists());
    // Dead-lettered: moved to dead/ with the reason.
    spool.dead_letter(&third, "550 5.1.1 no such user").unwrap();
    assert_eq!(spool.dead().unwrap(), vec![third.clone()]);
    assert_eq!(
        std::fs::read(root.join(format!("dead/{third}.eml"))).unwrap(),
        b"Subject: old 3\r\n\r\nthree\r\n"
    );
    assert_eq!(
        spool.dead_entry(&third).unwrap().last_error.as_deref(),
        Some("550 5.1.1 no such user")
    );
    drop(spool);

    // After a restart: the retried legacy entry with its new state, and the new entry.
    let spool = Spool::open(&root).unwrap();
    assert_eq!(spool.recovery().queued, 2);
    assert_eq!(spool.entry(&second).unwrap().attempts, 3);
    assert_eq!(
        spool.message(&second).unwrap(),
        b"Subject: old 2\r\n\r\ntwo\r\n"
    );
    assert_eq!(spool.message(&new).unwrap(), b"new\r\n");
    spool.complete(&second).unwrap();
    spool.complete(&new).unwrap();
    assert_eq!(std::fs::read_dir(root.join("queue")).unwrap().count(), 0);
}

/// One file per entry: the message and its metadata together in `queue/<id>.msg`; a retry adds
/// `<id>.json`, which wins over the metadata in the file, also after a restart; a file that
/// does not match its footer is reported as corrupt, never read as a message.
#[test]
fn one_file_per_entry_and_a_retry_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let spool = Spool::open(&root).unwrap();
    let id = spool
        .accept(&envelope("mfd-1"), b"Subject: one\r\n\r\nfile\r\n")
        .unwrap();
    let names = |root: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(root.join("queue"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&root), vec![format!("{id}.msg")]);
    let later = SystemTime::now() + Duration::from_secs(600);
    spool.retry_later(&id, "451 4.3.0 later", later).unwrap();
    assert_eq!(
        names(&root),
        vec![format!("{id}.json"), format!("{id}.msg")]
    );
    drop(spool);
    let spool = Spool::open(&root).unwrap();
    let meta = spool.entry(&id).unwrap();
    assert_eq!(
        (meta.attempts, meta.last_error.as_deref()),
        (1, Some("451 4.3.0 later"))
    );
    assert_eq!(spool.message(&id).unwrap(), b"Subject: one\r\n\r\nfile\r\n");
    spool.complete(&id).unwrap();
    assert!(names(&root).is_empty());

    // A corrupt entry file (cut short): kept, due at once, and reported, never delivered cut.
    let bad = spool.accept(&envelope("mfd-1"), b"soon to be cut").unwrap();
    let path = root.join(format!("queue/{bad}.msg"));
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    drop(spool);
    let spool = Spool::open(&root).unwrap();
    assert_eq!(spool.recovery().queued, 1);
    assert!(matches!(spool.entry(&bad), Err(SpoolError::Io { .. })));
    assert!(matches!(spool.message(&bad), Err(SpoolError::Io { .. })));
    assert!(spool.due(SystemTime::now()).is_err());
}

/// Dead-lettering copies the entry to `dead/` (metadata, then the message) before it removes
/// the queued one; a crash in between leaves both, and the next open drops the queued copy:
/// the message is in `dead/` once and not delivered.
#[test]
fn a_dead_lettering_cut_by_a_crash_is_finished_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let spool = Spool::open(&root).unwrap();
    let id = spool.accept(&envelope("mfd-1"), b"doomed\r\n").unwrap();
    spool.dead_letter(&id, "550 5.7.1 refused").unwrap();
    // Put the queued entry back as it was before the removal (the crash came just before it).
    let kept = spool.accept(&envelope("mfd-1"), b"doomed\r\n").unwrap();
    drop(spool);
    std::fs::rename(
        root.join(format!("queue/{kept}.msg")),
        root.join(format!("queue/{id}.msg")),
    )
    .unwrap();
    let spool = Spool::open(&root).unwrap();
    let rec = spool.recovery();
    assert_eq!((rec.queued, rec.removed_orphans), (0, 1), "{rec:?}");
    assert!(spool.queued().unwrap().is_empty());
    assert_eq!(spool.dead().unwrap(), vec![id.clone()]);
    assert_eq!(
        spool.dead_entry(&id).unwrap().last_error.as_deref(),
        Some("550 5.7.1 refused")
    );
    assert_eq!(
        std::fs::read(root.join(format!("dead/{id}.eml"))).unwrap(),
        b"doomed\r\n"
    );
}
