//! The conformance suite every [`Store`] backend must pass.
//!
//! [`run_all`] runs every check; each check is also public so a failing one can be run alone.
//! Every check works in its own freshly named tenants, streams and leases, so several suites (and
//! other tests) can share one server. Checks panic with a message naming what went wrong.

// This module is test support: panicking on a failed expectation is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{Precondition, RecordKey, Scope, ScopeRead, Store, StoreError};

const COLL: &str = "cf_item";
const COLL_LONGER: &str = "cf_items";
const STREAM: &str = "cf_events";

/// A name no other check (in this or a concurrent process) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}-{:x}-{:x}-{n}",
        nanos & 0xffff_ffff_ffff,
        std::process::id()
    )
}

/// Runs every check against `store`.
pub async fn run_all(store: Arc<dyn Store>) {
    let s = store.as_ref();
    ping(s).await;
    create_get_update(s).await;
    get_many(s).await;
    get_many_since(s).await;
    put_preconditions(s).await;
    delete_preconditions(s).await;
    versions_after_delete(s).await;
    list_order_and_paging(s).await;
    scope_isolation(s).await;
    count(s).await;
    binary_round_trip(s).await;
    concurrent_cas(Arc::clone(&store)).await;
    stream_order_and_paging(s).await;
    stream_bounded(s).await;
    stream_concurrent_appends(Arc::clone(&store)).await;
    stream_trim_by_age(s).await;
    stream_isolation(s).await;
    lease_exclusive_and_fenced(s).await;
    lease_expiry(s).await;
    lease_renewal(s).await;
    schedule_replaces_and_orders(s).await;
    schedule_due_limit_and_future(s).await;
    schedule_unschedule(s).await;
    schedule_isolation(s).await;
    schedule_rejects_bad_input(s).await;
    schedule_concurrent(Arc::clone(&store)).await;
    notifications(s).await;
}

/// A schedule name no other check uses. Schedule names are `&'static str` (callers use
/// constants), so each check leaks one short name; the suite runs a handful of times per process.
fn unique_schedule(prefix: &str) -> &'static str {
    unique(prefix).leak()
}

/// Everything in schedule `name`, earliest first.
async fn all_due(s: &dyn Store, name: &'static str) -> Vec<(String, i64)> {
    s.due(name, i64::MAX, 100_000).await.unwrap()
}

/// `schedule` sets and re-`schedule` replaces (never duplicates); `due` orders by due time, ties
/// by member, and keeps entries (it is an index, not a queue).
pub async fn schedule_replaces_and_orders(s: &dyn Store) {
    let name = unique_schedule("cf-sched");
    let base = 1_700_000_000_000i64;
    s.schedule(name, "acme/m3", base + 30).await.unwrap();
    s.schedule(name, "acme/m1", base + 10).await.unwrap();
    s.schedule(name, "beta/m2", base + 20).await.unwrap();
    s.schedule(name, "odd:{x}/ü m", base + 5).await.unwrap();
    let want = |v: &[(&str, i64)]| -> Vec<(String, i64)> {
        v.iter().map(|(m, d)| ((*m).to_owned(), *d)).collect()
    };
    assert_eq!(
        all_due(s, name).await,
        want(&[
            ("odd:{x}/ü m", base + 5),
            ("acme/m1", base + 10),
            ("beta/m2", base + 20),
            ("acme/m3", base + 30),
        ]),
        "due order"
    );
    // `due` does not consume.
    assert_eq!(all_due(s, name).await.len(), 4, "due removed entries");
    // Rescheduling moves the member, later or earlier, and never duplicates it.
    s.schedule(name, "acme/m1", base + 40).await.unwrap();
    s.schedule(name, "acme/m3", base + 1).await.unwrap();
    s.schedule(name, "beta/m2", base + 20).await.unwrap();
    assert_eq!(
        all_due(s, name).await,
        want(&[
            ("acme/m3", base + 1),
            ("odd:{x}/ü m", base + 5),
            ("beta/m2", base + 20),
            ("acme/m1", base + 40),
        ]),
        "after rescheduling"
    );
    // Equal due times come in member order; negative and zero times are times like others.
    s.schedule(name, "b", base + 20).await.unwrap();
    s.schedule(name, "a", base + 20).await.unwrap();
    s.schedule(name, "neg", -5).await.unwrap();
    s.schedule(name, "zero", 0).await.unwrap();
    assert_eq!(
        s.due(name, base + 20, 100).await.unwrap(),
        want(&[
            ("neg", -5),
            ("zero", 0),
            ("acme/m3", base + 1),
            ("odd:{x}/ü m", base + 5),
            ("a", base + 20),
            ("b", base + 20),
            ("beta/m2", base + 20),
        ]),
        "ties and signs"
    );
}

/// `due` includes entries due exactly at `now`, excludes later ones, and honours `limit`.
pub async fn schedule_due_limit_and_future(s: &dyn Store) {
    let name = unique_schedule("cf-due");
    let now = 1_800_000_000_000i64;
    for i in 0..20i64 {
        s.schedule(name, &format!("t/m{i:02}"), now - 100 + i * 10)
            .await
            .unwrap();
    }
    // m00..m10 are due at or before `now` (m10 exactly at it); m11..m19 are in the future.
    let due = s.due(name, now, 100).await.unwrap();
    let members: Vec<&str> = due.iter().map(|(m, _)| m.as_str()).collect();
    let expected: Vec<String> = (0..=10).map(|i| format!("t/m{i:02}")).collect();
    assert_eq!(members, expected, "due at or before now");
    assert_eq!(due.last().map(|(_, d)| *d), Some(now), "due exactly now");
    assert!(
        s.due(name, now - 101, 100).await.unwrap().is_empty(),
        "nothing due before the first"
    );
    // Limit: the earliest first.
    let three = s.due(name, now, 3).await.unwrap();
    assert_eq!(
        three,
        vec![
            ("t/m00".to_owned(), now - 100),
            ("t/m01".to_owned(), now - 90),
            ("t/m02".to_owned(), now - 80),
        ],
        "limit 3"
    );
    assert!(s.due(name, now, 0).await.unwrap().is_empty(), "limit 0");
    assert_eq!(s.due(name, i64::MAX, 100).await.unwrap().len(), 20);
    // Moving a future entry into the past makes it due; doing the work means rescheduling.
    s.schedule(name, "t/m19", now - 1000).await.unwrap();
    assert_eq!(
        s.due(name, now, 1).await.unwrap(),
        vec![("t/m19".to_owned(), now - 1000)]
    );
    s.schedule(name, "t/m19", now + 1).await.unwrap();
    assert_eq!(s.due(name, now, 100).await.unwrap().len(), 11);
    assert_eq!(s.due(name, now + 1, 100).await.unwrap().len(), 12);
    // An empty or never-used schedule has nothing due.
    let fresh = unique_schedule("cf-due-empty");
    assert!(s.due(fresh, i64::MAX, 10).await.unwrap().is_empty());
}

/// `unschedule` removes one member; removing an absent one is not an error.
pub async fn schedule_unschedule(s: &dyn Store) {
    let name = unique_schedule("cf-unsched");
    s.schedule(name, "t/a", 10).await.unwrap();
    s.schedule(name, "t/b", 20).await.unwrap();
    s.unschedule(name, "t/a").await.unwrap();
    assert_eq!(all_due(s, name).await, vec![("t/b".to_owned(), 20)]);
    s.unschedule(name, "t/a").await.unwrap();
    s.unschedule(name, "never").await.unwrap();
    s.unschedule(unique_schedule("cf-unsched-none"), "x")
        .await
        .unwrap();
    // A removed member can come back, once.
    s.schedule(name, "t/a", 30).await.unwrap();
    s.schedule(name, "t/a", 5).await.unwrap();
    assert_eq!(
        all_due(s, name).await,
        vec![("t/a".to_owned(), 5), ("t/b".to_owned(), 20)]
    );
    s.unschedule(name, "t/a").await.unwrap();
    s.unschedule(name, "t/b").await.unwrap();
    assert!(all_due(s, name).await.is_empty());
}

/// Schedules of different names are separate, also for equal members; schedules do not touch
/// records of the same name.
pub async fn schedule_isolation(s: &dyn Store) {
    let a = unique_schedule("cf-siso");
    let b = unique_schedule("cf-siso");
    s.schedule(a, "same/member", 1).await.unwrap();
    s.schedule(b, "same/member", 2).await.unwrap();
    s.schedule(b, "only/b", 3).await.unwrap();
    assert_eq!(all_due(s, a).await, vec![("same/member".to_owned(), 1)]);
    assert_eq!(
        all_due(s, b).await,
        vec![("same/member".to_owned(), 2), ("only/b".to_owned(), 3)]
    );
    s.unschedule(a, "same/member").await.unwrap();
    assert!(all_due(s, a).await.is_empty());
    assert_eq!(all_due(s, b).await.len(), 2, "unschedule in a touched b");
    // A name that is a prefix of another is still its own schedule.
    let long: &'static str = format!("{a}x").leak();
    s.schedule(long, "m", 1).await.unwrap();
    assert!(all_due(s, a).await.is_empty(), "prefix schedule leaked");
}

/// Bad schedule names and out-of-range due times are refused, naming the fault.
pub async fn schedule_rejects_bad_input(s: &dyn Store) {
    for name in ["", "has:colon"] {
        match s.schedule(name, "m", 1).await {
            Err(StoreError::Config(msg)) => assert!(msg.contains("schedule name"), "{msg}"),
            other => panic!("schedule name {name:?}: expected Config, got {other:?}"),
        }
        assert!(
            matches!(s.due(name, 1, 1).await, Err(StoreError::Config(_))),
            "due with name {name:?}"
        );
        assert!(
            matches!(s.unschedule(name, "m").await, Err(StoreError::Config(_))),
            "unschedule with name {name:?}"
        );
    }
    let name = unique_schedule("cf-sbad");
    for due in [i64::MAX, i64::MIN, crate::MAX_DUE_MS + 1] {
        match s.schedule(name, "m", due).await {
            Err(StoreError::Config(msg)) => assert!(msg.contains(&due.to_string()), "{msg}"),
            other => panic!("due {due}: expected Config, got {other:?}"),
        }
    }
    s.schedule(name, "max", crate::MAX_DUE_MS).await.unwrap();
    s.schedule(name, "min", -crate::MAX_DUE_MS).await.unwrap();
    assert_eq!(
        all_due(s, name).await,
        vec![
            ("min".to_owned(), -crate::MAX_DUE_MS),
            ("max".to_owned(), crate::MAX_DUE_MS)
        ],
        "extreme due times round-trip exactly"
    );
}

/// 100 concurrent `schedule` calls of distinct members all land; concurrent calls for one member
/// leave exactly one entry, at one of the times written.
pub async fn schedule_concurrent(store: Arc<dyn Store>) {
    let name = unique_schedule("cf-sconc");
    let mut tasks = Vec::new();
    for i in 0..100i64 {
        let s = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            s.schedule(name, &format!("tenant/m{i:03}"), 1000 + (i * 37) % 100)
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let all = all_due(store.as_ref(), name).await;
    let members: BTreeSet<&str> = all.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(all.len(), 100, "entries after 100 concurrent schedules");
    assert_eq!(members.len(), 100, "distinct members");
    assert!(
        all.windows(2).all(|w| w[0].1 <= w[1].1),
        "due order after concurrent schedules"
    );
    for (m, d) in &all {
        let i: i64 = m.trim_start_matches("tenant/m").parse().unwrap();
        assert_eq!(*d, 1000 + (i * 37) % 100, "due of {m}");
    }

    // One member, scheduled concurrently: a few rounds, since one may not overlap.
    for round in 0..5i64 {
        let name = unique_schedule("cf-sone");
        let times = [100 + round, 200 + round];
        let mut tasks = Vec::new();
        for due in times {
            let s = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                s.schedule(name, "t/same", due).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let all = all_due(store.as_ref(), name).await;
        assert_eq!(all.len(), 1, "one member scheduled twice: {all:?}");
        assert_eq!(all[0].0, "t/same");
        assert!(times.contains(&all[0].1), "due {} not written", all[0].1);
        // The index agrees with the member: a time between the two sees it only if it is the
        // earlier one.
        let between = due_count(store.as_ref(), name, 150 + round).await;
        assert_eq!(
            between,
            usize::from(all[0].1 == times[0]),
            "stale index entry"
        );
    }
}

async fn due_count(s: &dyn Store, name: &'static str, now: i64) -> usize {
    s.due(name, now, 10).await.unwrap().len()
}

/// `ping` answers.
pub async fn ping(s: &dyn Store) {
    s.ping().await.expect("ping");
}

/// Create, read, update and versions.
pub async fn create_get_update(s: &dyn Store) {
    let t = unique("cf-crud");
    let key = RecordKey::tenant(&t, COLL, "a");
    assert!(
        s.get(&key).await.unwrap().is_none(),
        "fresh key must be missing"
    );
    assert_eq!(
        s.put(&key, b"one".to_vec(), Precondition::Absent)
            .await
            .unwrap(),
        1
    );
    let rec = s.get(&key).await.unwrap().expect("record after create");
    assert_eq!((rec.version, rec.data.as_slice()), (1, b"one".as_slice()));
    assert_eq!(
        s.put(&key, b"two".to_vec(), Precondition::Version(1))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        s.put(&key, b"three".to_vec(), Precondition::Exists)
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        s.put(&key, b"four".to_vec(), Precondition::Any)
            .await
            .unwrap(),
        4
    );
    let rec = s.get(&key).await.unwrap().unwrap();
    assert_eq!((rec.version, rec.data.as_slice()), (4, b"four".as_slice()));
    // `Any` on a missing record creates it at version 1.
    let other = RecordKey::tenant(&t, COLL, "b");
    assert_eq!(
        s.put(&other, b"x".to_vec(), Precondition::Any)
            .await
            .unwrap(),
        1
    );
    // Ids with separators and non-ASCII characters are just ids.
    let odd = RecordKey::tenant(&t, COLL, "x:y/z{w}ü");
    assert_eq!(
        s.put(&odd, b"odd".to_vec(), Precondition::Absent)
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.get(&odd).await.unwrap().unwrap().data, b"odd");
}

/// `get_many` answers one entry per key in the order asked, across scopes and collections,
/// with missing records as `None`, repeated keys answered each time, versions as `get` sees
/// them.
pub async fn get_many(s: &dyn Store) {
    let t = unique("cf-many");
    let u = unique("cf-many-other");
    assert!(
        s.get_many(&[]).await.unwrap().is_empty(),
        "no keys, no answers"
    );
    let a = RecordKey::tenant(&t, COLL, "a");
    let b = RecordKey::tenant(&t, COLL_LONGER, "b");
    let c = RecordKey::tenant(&u, COLL, "a");
    let g = RecordKey::global(COLL, &unique("cf-many-global"));
    let missing = RecordKey::tenant(&t, COLL, "missing");
    s.put(&a, b"a1".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    s.put(&a, b"a2".to_vec(), Precondition::Version(1))
        .await
        .unwrap();
    s.put(&b, vec![0, 255, 1], Precondition::Absent)
        .await
        .unwrap();
    s.put(&c, b"other tenant".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    s.put(&g, b"global".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    let keys = [
        missing.clone(),
        c.clone(),
        a.clone(),
        g.clone(),
        b.clone(),
        a.clone(),
    ];
    let got = s.get_many(&keys).await.unwrap();
    assert_eq!(got.len(), keys.len(), "one answer per key");
    let shown: Vec<Option<(u64, Vec<u8>)>> = got
        .into_iter()
        .map(|r| r.map(|r| (r.version, r.data)))
        .collect();
    assert_eq!(
        shown,
        vec![
            None,
            Some((1, b"other tenant".to_vec())),
            Some((2, b"a2".to_vec())),
            Some((1, b"global".to_vec())),
            Some((1, vec![0, 255, 1])),
            Some((2, b"a2".to_vec())),
        ],
        "get_many must answer like get, in the order of the keys"
    );
    for key in &keys {
        let one = s.get(key).await.unwrap().map(|r| (r.version, r.data));
        let many = s
            .get_many(std::slice::from_ref(key))
            .await
            .unwrap()
            .pop()
            .unwrap()
            .map(|r| (r.version, r.data));
        assert_eq!(one, many, "get and get_many disagree on {key}");
    }
    // A deleted record reads as missing.
    assert!(s.delete(&a, Precondition::Any).await.unwrap());
    assert!(s.get_many(std::slice::from_ref(&a)).await.unwrap()[0].is_none());
}

/// The generation of a scope, as a read by generation answers it.
async fn read_since(
    s: &dyn Store,
    scope: &Scope,
    keys: &[RecordKey],
    known: Option<u64>,
) -> Option<(u64, Vec<Option<(u64, Vec<u8>)>>)> {
    match s.get_many_since(scope, keys, known).await.unwrap() {
        ScopeRead::Unchanged => None,
        ScopeRead::Read {
            generation,
            records,
        } => Some((
            generation.expect("a scope written by this store has a generation"),
            records
                .into_iter()
                .map(|r| r.map(|r| (r.version, r.data)))
                .collect(),
        )),
    }
}

/// `get_many_since`: the records as `get_many` reads them with the scope's generation; the
/// same generation answers `Unchanged`; every write or delete that takes effect in the scope
/// (and only in that scope) gives another generation, never one answered before; keys of
/// another scope are refused.
pub async fn get_many_since(s: &dyn Store) {
    let t = unique("cf-since");
    let scope = Scope::Tenant(t.clone());
    let other = unique("cf-since-other");
    let a = RecordKey::tenant(&t, COLL, "a");
    let b = RecordKey::tenant(&t, COLL_LONGER, "b");
    let elsewhere = RecordKey::tenant(&unique("cf-since-x"), COLL, "a");
    s.put(&a, b"a1".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    let keys = [a.clone(), b.clone()];
    let (g1, read) = read_since(s, &scope, &keys, None)
        .await
        .expect("no generation known: the records are read");
    assert_eq!(
        read,
        vec![Some((1, b"a1".to_vec())), None],
        "as get_many reads"
    );
    assert!(
        read_since(s, &scope, &keys, Some(g1)).await.is_none(),
        "nothing written since generation {g1}: unchanged"
    );
    let (g, read) = read_since(s, &scope, &keys, Some(g1.wrapping_add(7)))
        .await
        .expect("another generation known: the records are read");
    assert_eq!(g, g1, "the generation stays while nothing is written");
    assert_eq!(read, vec![Some((1, b"a1".to_vec())), None]);

    // Writes elsewhere leave the scope's generation alone.
    s.put(&elsewhere, b"x".to_vec(), Precondition::Any)
        .await
        .unwrap();
    s.put(
        &RecordKey::tenant(&other, COLL, "a"),
        b"y".to_vec(),
        Precondition::Any,
    )
    .await
    .unwrap();
    assert!(
        read_since(s, &scope, &keys, Some(g1)).await.is_none(),
        "a write in another scope changed the generation of {scope}"
    );

    // Each write that takes effect gives a new generation, never an earlier one.
    let mut seen = vec![g1];
    s.put(&b, b"b1".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    let (g2, read) = read_since(s, &scope, &keys, Some(g1))
        .await
        .expect("a put in the scope is a change");
    assert!(!seen.contains(&g2), "generation {g2} was answered before");
    assert_eq!(
        read,
        vec![Some((1, b"a1".to_vec())), Some((1, b"b1".to_vec()))]
    );
    seen.push(g2);
    s.put(&a, b"a2".to_vec(), Precondition::Version(1))
        .await
        .unwrap();
    let (g3, read) = read_since(s, &scope, &keys, Some(g2))
        .await
        .expect("an update in the scope is a change");
    assert!(!seen.contains(&g3), "generation {g3} was answered before");
    assert_eq!(read[0], Some((2, b"a2".to_vec())));
    seen.push(g3);
    assert!(s.delete(&b, Precondition::Any).await.unwrap());
    let (g4, read) = read_since(s, &scope, &keys, Some(g3))
        .await
        .expect("a delete in the scope is a change");
    assert!(!seen.contains(&g4), "generation {g4} was answered before");
    assert_eq!(read[1], None, "the deleted record reads as missing");

    // Keys of another scope are refused, naming the key.
    let err = s
        .get_many_since(&scope, &[a.clone(), elsewhere.clone()], None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Config(m) if m.contains(&elsewhere.to_string())),
        "{err:?}"
    );
}

/// Every precondition of `put`, including the versions a conflict reports.
pub async fn put_preconditions(s: &dyn Store) {
    let t = unique("cf-pre");
    let key = RecordKey::tenant(&t, COLL, "p");
    // Missing record.
    match s.put(&key, b"x".to_vec(), Precondition::Exists).await {
        Err(StoreError::NotFound(k)) => assert!(k.contains('p'), "NotFound names the key: {k}"),
        other => panic!("Exists on a missing record: expected NotFound, got {other:?}"),
    }
    match s.put(&key, b"x".to_vec(), Precondition::Version(1)).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("Version on a missing record: expected NotFound, got {other:?}"),
    }
    assert!(
        s.get(&key).await.unwrap().is_none(),
        "failed puts must not create"
    );
    // Existing record.
    s.put(&key, b"v1".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    match s.put(&key, b"x".to_vec(), Precondition::Absent).await {
        Err(StoreError::AlreadyExists(k)) => assert!(k.contains(&t), "names the key: {k}"),
        other => panic!("Absent on an existing record: expected AlreadyExists, got {other:?}"),
    }
    s.put(&key, b"v2".to_vec(), Precondition::Version(1))
        .await
        .unwrap();
    s.put(&key, b"v3".to_vec(), Precondition::Version(2))
        .await
        .unwrap();
    match s.put(&key, b"x".to_vec(), Precondition::Version(1)).await {
        Err(StoreError::Conflict {
            key: k,
            expected,
            found,
        }) => {
            assert_eq!((expected, found), (1, 3), "conflict versions");
            assert!(k.contains(&t), "conflict names the key: {k}");
        }
        other => panic!("stale Version: expected Conflict, got {other:?}"),
    }
    match s.put(&key, b"x".to_vec(), Precondition::Version(7)).await {
        Err(StoreError::Conflict {
            expected: 7,
            found: 3,
            ..
        }) => {}
        other => panic!("future Version: expected Conflict 7/3, got {other:?}"),
    }
    let rec = s.get(&key).await.unwrap().unwrap();
    assert_eq!(
        (rec.version, rec.data.as_slice()),
        (3, b"v3".as_slice()),
        "failed puts wrote"
    );
}

/// Every precondition of `delete`.
pub async fn delete_preconditions(s: &dyn Store) {
    let t = unique("cf-del");
    let key = RecordKey::tenant(&t, COLL, "d");
    // Missing record.
    assert!(
        !s.delete(&key, Precondition::Any).await.unwrap(),
        "Any on missing: false"
    );
    assert!(
        !s.delete(&key, Precondition::Absent).await.unwrap(),
        "Absent on missing: false"
    );
    match s.delete(&key, Precondition::Exists).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("delete Exists on missing: expected NotFound, got {other:?}"),
    }
    match s.delete(&key, Precondition::Version(1)).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("delete Version on missing: expected NotFound, got {other:?}"),
    }
    // Existing record.
    s.put(&key, b"1".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    s.put(&key, b"2".to_vec(), Precondition::Any).await.unwrap();
    match s.delete(&key, Precondition::Absent).await {
        Err(StoreError::AlreadyExists(_)) => {}
        other => panic!("delete Absent on existing: expected AlreadyExists, got {other:?}"),
    }
    match s.delete(&key, Precondition::Version(1)).await {
        Err(StoreError::Conflict {
            expected: 1,
            found: 2,
            ..
        }) => {}
        other => panic!("delete stale Version: expected Conflict 1/2, got {other:?}"),
    }
    assert!(
        s.get(&key).await.unwrap().is_some(),
        "failed deletes removed the record"
    );
    assert!(s.delete(&key, Precondition::Version(2)).await.unwrap());
    assert!(s.get(&key).await.unwrap().is_none());
    assert_eq!(s.count(&Scope::Tenant(t.clone()), COLL).await.unwrap(), 0);
    assert_eq!(
        s.list(&Scope::Tenant(t.clone()), COLL, None, 10)
            .await
            .unwrap()
            .len(),
        0
    );
    s.put(&key, b"3".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    assert!(s.delete(&key, Precondition::Exists).await.unwrap());
    s.put(&key, b"4".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    assert!(s.delete(&key, Precondition::Any).await.unwrap());
    assert!(
        !s.delete(&key, Precondition::Any).await.unwrap(),
        "second delete: false"
    );
}

/// A record created again after a delete starts at version 1.
pub async fn versions_after_delete(s: &dyn Store) {
    let t = unique("cf-ver");
    let key = RecordKey::tenant(&t, COLL, "r");
    s.put(&key, b"a".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    s.put(&key, b"b".to_vec(), Precondition::Any).await.unwrap();
    s.delete(&key, Precondition::Any).await.unwrap();
    assert_eq!(
        s.put(&key, b"c".to_vec(), Precondition::Absent)
            .await
            .unwrap(),
        1
    );
}

/// Lists come in id (byte) order and page with `start_after`.
pub async fn list_order_and_paging(s: &dyn Store) {
    let t = unique("cf-list");
    let scope = Scope::Tenant(t.clone());
    let mut ids: Vec<String> = (0..23).map(|i| format!("id-{i:02}")).collect();
    ids.extend(["A", "a", "id-1", "id-100", "z", "ü", "~"].map(String::from));
    // Insert in an order unrelated to the sort order.
    for (n, id) in ids.iter().rev().enumerate() {
        let data = format!("data-{id}").into_bytes();
        s.put(&RecordKey::tenant(&t, COLL, id), data, Precondition::Absent)
            .await
            .unwrap();
        if n % 5 == 0 {
            // Some records at a higher version, which must not affect order.
            s.put(
                &RecordKey::tenant(&t, COLL, id),
                format!("data-{id}").into_bytes(),
                Precondition::Any,
            )
            .await
            .unwrap();
        }
    }
    // A neighbouring collection whose name extends this one must not leak in.
    s.put(
        &RecordKey::tenant(&t, COLL_LONGER, "id-00"),
        b"other".to_vec(),
        Precondition::Absent,
    )
    .await
    .unwrap();
    let mut expected = ids.clone();
    expected.sort();

    let all = s.list(&scope, COLL, None, 1000).await.unwrap();
    let got: Vec<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(got, expected, "full list in byte order");
    for (id, rec) in &all {
        assert_eq!(rec.data, format!("data-{id}").into_bytes(), "data of {id}");
        assert!(rec.version >= 1);
    }

    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = s.list(&scope, COLL, cursor.as_deref(), 7).await.unwrap();
        assert!(page.len() <= 7, "page longer than limit: {}", page.len());
        pages += 1;
        assert!(pages < 20, "paging does not end");
        if page.is_empty() {
            break;
        }
        cursor = page.last().map(|(id, _)| id.clone());
        paged.extend(page.into_iter().map(|(id, _)| id));
    }
    assert_eq!(paged, expected, "paged list");
    assert!(
        pages >= 5,
        "expected more than 4 pages of 7 for {} ids",
        expected.len()
    );

    // start_after need not be an existing id.
    let after = s.list(&scope, COLL, Some("id-05x"), 3).await.unwrap();
    let got: Vec<&str> = after.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(got, ["id-06", "id-07", "id-08"]);
    let last = expected.last().unwrap();
    assert!(
        s.list(&scope, COLL, Some(last), 10)
            .await
            .unwrap()
            .is_empty(),
        "after the last"
    );
    assert!(
        s.list(&scope, COLL, None, 0).await.unwrap().is_empty(),
        "limit 0"
    );
    let longer = s.list(&scope, COLL_LONGER, None, 10).await.unwrap();
    assert_eq!(longer.len(), 1, "neighbouring collection");
}

/// The same id in two tenants and the global scope are three records.
pub async fn scope_isolation(s: &dyn Store) {
    let a = unique("cf-iso");
    // A tenant whose name extends the other's must not see its records.
    let b = format!("{a}-2");
    let ka = RecordKey::tenant(&a, COLL, "same");
    let kb = RecordKey::tenant(&b, COLL, "same");
    let gid = unique("same");
    let kg = RecordKey::global(COLL, &gid);
    let ka2 = RecordKey::tenant(&a, COLL, &gid);
    s.put(&ka, b"a".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    s.put(&kb, b"b".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    s.put(&kg, b"g".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    s.put(&ka2, b"a2".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    assert_eq!(s.get(&ka).await.unwrap().unwrap().data, b"a");
    assert_eq!(s.get(&kb).await.unwrap().unwrap().data, b"b");
    assert_eq!(s.get(&kg).await.unwrap().unwrap().data, b"g");
    assert_eq!(s.get(&ka2).await.unwrap().unwrap().data, b"a2");
    // Versions are per record.
    s.put(&ka, b"a'".to_vec(), Precondition::Version(1))
        .await
        .unwrap();
    assert_eq!(s.get(&kb).await.unwrap().unwrap().version, 1);

    let la = s
        .list(&Scope::Tenant(a.clone()), COLL, None, 100)
        .await
        .unwrap();
    let ids: BTreeSet<&str> = la.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        BTreeSet::from(["same", gid.as_str()]),
        "tenant a lists its own"
    );
    let lb = s
        .list(&Scope::Tenant(b.clone()), COLL, None, 100)
        .await
        .unwrap();
    assert_eq!(lb.len(), 1, "tenant b lists its own");
    assert_eq!(lb[0].1.data, b"b");
    assert_eq!(s.count(&Scope::Tenant(b.clone()), COLL).await.unwrap(), 1);

    assert!(s.delete(&ka, Precondition::Any).await.unwrap());
    assert!(
        s.get(&kb).await.unwrap().is_some(),
        "delete in a must not touch b"
    );
    assert!(
        s.get(&kg).await.unwrap().is_some(),
        "delete in a must not touch global"
    );
    assert!(s.delete(&kg, Precondition::Exists).await.unwrap());
    assert!(
        s.get(&ka2).await.unwrap().is_some(),
        "delete in global must not touch a"
    );
}

/// `count` follows creates and deletes.
pub async fn count(s: &dyn Store) {
    let t = unique("cf-count");
    let scope = Scope::Tenant(t.clone());
    assert_eq!(s.count(&scope, COLL).await.unwrap(), 0);
    for i in 0..12 {
        s.put(
            &RecordKey::tenant(&t, COLL, &format!("c{i}")),
            vec![i],
            Precondition::Absent,
        )
        .await
        .unwrap();
    }
    // Updates do not count twice.
    s.put(
        &RecordKey::tenant(&t, COLL, "c0"),
        vec![9],
        Precondition::Any,
    )
    .await
    .unwrap();
    assert_eq!(s.count(&scope, COLL).await.unwrap(), 12);
    assert_eq!(s.count(&scope, COLL_LONGER).await.unwrap(), 0);
    s.delete(&RecordKey::tenant(&t, COLL, "c3"), Precondition::Exists)
        .await
        .unwrap();
    assert_eq!(s.count(&scope, COLL).await.unwrap(), 11);
}

/// Data is bytes: every byte value, non-UTF-8, empty and large values survive.
pub async fn binary_round_trip(s: &dyn Store) {
    let t = unique("cf-bin");
    let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("all-bytes", all),
        ("not-utf8", vec![0xff, 0xfe, 0x00, 0xc3, 0x28, 0x80]),
        ("empty", Vec::new()),
        ("nul", vec![0; 17]),
        (
            "large",
            (0..300_000u32)
                .map(|i| (i.wrapping_mul(7919) >> 3) as u8)
                .collect(),
        ),
    ];
    for (id, data) in &cases {
        let key = RecordKey::tenant(&t, COLL, id);
        s.put(&key, data.clone(), Precondition::Absent)
            .await
            .unwrap();
        let rec = s
            .get(&key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} missing"));
        assert!(rec.data == *data, "{id}: data differs after round trip");
    }
    let listed = s
        .list(&Scope::Tenant(t.clone()), COLL, None, 10)
        .await
        .unwrap();
    for (id, rec) in listed {
        let (_, data) = cases.iter().find(|(c, _)| *c == id).unwrap();
        assert!(rec.data == *data, "{id}: listed data differs");
    }
    let scope = Scope::Tenant(t);
    let payload = vec![0x00, 0xff, 0x80, b'\n', b'"'];
    s.append(&scope, STREAM, payload.clone(), 10).await.unwrap();
    let back = s.read_back(&scope, STREAM, None, 1).await.unwrap();
    assert_eq!(back[0].data, payload, "stream data round trip");
}

/// 20 tasks increment one counter with compare-and-set: every version is won exactly once and
/// no increment is lost.
pub async fn concurrent_cas(store: Arc<dyn Store>) {
    const TASKS: u64 = 20;
    const PER_TASK: u64 = 5;
    let t = unique("cf-cas");
    let key = RecordKey::tenant(&t, COLL, "counter");
    store
        .put(&key, b"0".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let store = Arc::clone(&store);
        let key = key.clone();
        handles.push(tokio::spawn(async move {
            let mut won = Vec::new();
            let mut conflicts = 0u64;
            for _ in 0..PER_TASK {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    assert!(Instant::now() < deadline, "increment starved");
                    let rec = store.get(&key).await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&rec.data).unwrap().parse().unwrap();
                    let next = (n + 1).to_string().into_bytes();
                    match store
                        .put(&key, next, Precondition::Version(rec.version))
                        .await
                    {
                        Ok(v) => {
                            assert_eq!(v, rec.version + 1, "new version");
                            won.push(v);
                            break;
                        }
                        Err(StoreError::Conflict {
                            expected, found, ..
                        }) => {
                            assert_eq!(expected, rec.version);
                            assert!(found > expected, "conflict found {found} <= {expected}");
                            conflicts += 1;
                        }
                        Err(e) => panic!("unexpected error in CAS loop: {e}"),
                    }
                }
            }
            (won, conflicts)
        }));
    }
    let mut versions = Vec::new();
    for h in handles {
        let (won, _conflicts) = h.await.unwrap();
        versions.extend(won);
    }
    versions.sort_unstable();
    let expected: Vec<u64> = (2..=TASKS * PER_TASK + 1).collect();
    assert_eq!(versions, expected, "each version must be won exactly once");
    let rec = store.get(&key).await.unwrap().unwrap();
    assert_eq!(rec.version, TASKS * PER_TASK + 1);
    assert_eq!(
        rec.data,
        (TASKS * PER_TASK).to_string().into_bytes(),
        "lost updates"
    );
}

/// Streams read back newest first, in id order, and page with `before`.
pub async fn stream_order_and_paging(s: &dyn Store) {
    let scope = Scope::Tenant(unique("cf-stream"));
    assert!(
        s.read_back(&scope, STREAM, None, 10)
            .await
            .unwrap()
            .is_empty(),
        "empty stream"
    );
    let mut ids = Vec::new();
    // More than 10 appends, quickly: ids within one millisecond must still sort as strings.
    for i in 0..25u32 {
        let id = s
            .append(&scope, STREAM, format!("e{i}").into_bytes(), 1000)
            .await
            .unwrap();
        ids.push(id);
    }
    for pair in ids.windows(2) {
        assert!(
            pair[0] < pair[1],
            "ids must increase as strings: {} !< {}",
            pair[0],
            pair[1]
        );
    }
    let all = s.read_back(&scope, STREAM, None, 100).await.unwrap();
    assert_eq!(all.len(), 25);
    for (n, e) in all.iter().enumerate() {
        let i = 24 - n;
        assert_eq!(e.id, ids[i], "newest first");
        assert_eq!(e.data, format!("e{i}").into_bytes());
    }
    let mut paged = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = s
            .read_back(&scope, STREAM, before.as_deref(), 10)
            .await
            .unwrap();
        assert!(page.len() <= 10);
        if page.is_empty() {
            break;
        }
        assert!(paged.len() < 100, "paging does not end");
        before = page.last().map(|e| e.id.clone());
        paged.extend(page.into_iter().map(|e| e.id));
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(paged, newest_first, "paging with before");
    let two = s.read_back(&scope, STREAM, Some(&ids[5]), 2).await.unwrap();
    assert_eq!(
        two.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        [&ids[4], &ids[3]]
    );
    assert!(
        s.read_back(&scope, STREAM, Some(&ids[0]), 5)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.read_back(&scope, STREAM, None, 0)
            .await
            .unwrap()
            .is_empty(),
        "limit 0"
    );
}

/// Appends from many tasks at once (the audit log under load; the embedded store commits them
/// in groups): every append is answered with its own id, and once answered it is stored: all of
/// them read back, each once, newest first in id order, including those of another stream
/// appended in the same moment and with a length bound in force.
pub async fn stream_concurrent_appends(store: Arc<dyn Store>) {
    const TASKS: usize = 64;
    const PER_TASK: usize = 8;
    let scope = Scope::Tenant(unique("cf-group"));
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let (store, scope) = (Arc::clone(&store), scope.clone());
        handles.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..PER_TASK {
                let data = format!("{task}/{i}").into_bytes();
                ids.push((
                    store
                        .append(&scope, STREAM, data.clone(), 100_000)
                        .await
                        .unwrap(),
                    data,
                ));
                // Another stream, bounded to 10 entries, in the same groups.
                let last = ids.last().map(|(_, d): &(String, Vec<u8>)| d.clone());
                store
                    .append(&scope, "cf_bounded", last.unwrap_or_default(), 10)
                    .await
                    .unwrap();
            }
            ids
        }));
    }
    let mut answered = Vec::new();
    for handle in handles {
        answered.extend(handle.await.unwrap());
    }
    let ids: BTreeSet<&String> = answered.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), TASKS * PER_TASK, "every append gets its own id");
    let back = store
        .read_back(&scope, STREAM, None, TASKS * PER_TASK + 10)
        .await
        .unwrap();
    assert_eq!(
        back.len(),
        TASKS * PER_TASK,
        "every answered append is stored"
    );
    assert!(
        back.windows(2).all(|w| w[0].id > w[1].id),
        "read_back is newest first"
    );
    let mut stored: Vec<(String, Vec<u8>)> = back.into_iter().map(|e| (e.id, e.data)).collect();
    stored.sort();
    answered.sort();
    assert_eq!(stored, answered, "each id holds the data appended with it");
    assert_eq!(
        store
            .read_back(&scope, "cf_bounded", None, 100)
            .await
            .unwrap()
            .len(),
        10,
        "the length bound holds under concurrent appends"
    );
}

/// Streams keep only the newest `max_len` entries.
pub async fn stream_bounded(s: &dyn Store) {
    let scope = Scope::Tenant(unique("cf-bound"));
    for i in 0..15u32 {
        s.append(&scope, STREAM, i.to_string().into_bytes(), 4)
            .await
            .unwrap();
    }
    let back = s.read_back(&scope, STREAM, None, 100).await.unwrap();
    let data: Vec<Vec<u8>> = back.into_iter().map(|e| e.data).collect();
    assert_eq!(
        data,
        [
            b"14".to_vec(),
            b"13".to_vec(),
            b"12".to_vec(),
            b"11".to_vec()
        ]
    );
    // A larger bound later keeps growing from there.
    for i in 15..18u32 {
        s.append(&scope, STREAM, i.to_string().into_bytes(), 6)
            .await
            .unwrap();
    }
    assert_eq!(
        s.read_back(&scope, STREAM, None, 100).await.unwrap().len(),
        6
    );
}

/// `trim_stream` removes exactly the entries appended before the cut, keeps the newer ones (and
/// paging over them), touches no other stream, and a later length bound still counts right.
pub async fn stream_trim_by_age(s: &dyn Store) {
    let scope = Scope::Tenant(unique("cf-age"));
    let now_ms = || {
        u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap()
    };
    for i in 0..3u32 {
        s.append(&scope, STREAM, format!("old{i}").into_bytes(), 100)
            .await
            .unwrap();
    }
    s.append(&scope, "cf_other", b"other".to_vec(), 100)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let cut = now_ms();
    tokio::time::sleep(Duration::from_millis(30)).await;
    for i in 0..2u32 {
        s.append(&scope, STREAM, format!("new{i}").into_bytes(), 100)
            .await
            .unwrap();
    }
    assert_eq!(
        s.trim_stream(&scope, STREAM, 0).await.unwrap(),
        0,
        "nothing is older than the epoch"
    );
    assert_eq!(s.trim_stream(&scope, STREAM, cut).await.unwrap(), 3);
    let left: Vec<Vec<u8>> = s
        .read_back(&scope, STREAM, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(left, [b"new1".to_vec(), b"new0".to_vec()]);
    assert_eq!(s.trim_stream(&scope, STREAM, cut).await.unwrap(), 0);
    assert_eq!(
        s.read_back(&scope, "cf_other", None, 10)
            .await
            .unwrap()
            .len(),
        1,
        "other streams are untouched"
    );
    // The length bound counts only what is left: 2 + 2 appended, bound 3 keeps the newest 3.
    for i in 2..4u32 {
        s.append(&scope, STREAM, format!("new{i}").into_bytes(), 3)
            .await
            .unwrap();
    }
    let left = s.read_back(&scope, STREAM, None, 100).await.unwrap();
    assert_eq!(left.len(), 3);
    assert_eq!(left[0].data, b"new3");
    // A missing stream trims to nothing without error.
    let empty = Scope::Tenant(unique("cf-age-empty"));
    assert_eq!(
        s.trim_stream(&empty, STREAM, now_ms() + 1000)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        s.trim_stream(&scope, STREAM, now_ms() + 1000)
            .await
            .unwrap(),
        3
    );
    assert!(
        s.read_back(&scope, STREAM, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Streams of different scopes and names are separate.
pub async fn stream_isolation(s: &dyn Store) {
    let a = Scope::Tenant(unique("cf-siso"));
    let b = Scope::Tenant(unique("cf-siso"));
    s.append(&a, STREAM, b"a".to_vec(), 10).await.unwrap();
    s.append(&b, STREAM, b"b".to_vec(), 10).await.unwrap();
    s.append(&a, "cf_other", b"other".to_vec(), 10)
        .await
        .unwrap();
    let ra = s.read_back(&a, STREAM, None, 10).await.unwrap();
    assert_eq!(ra.len(), 1);
    assert_eq!(ra[0].data, b"a");
    let rb = s.read_back(&b, STREAM, None, 10).await.unwrap();
    assert_eq!(rb.len(), 1);
    assert_eq!(rb[0].data, b"b");
}

/// A lease is exclusive, re-acquiring keeps its fence, only the owner releases, and every new
/// acquisition gets a higher fence.
pub async fn lease_exclusive_and_fenced(s: &dyn Store) {
    let name = unique("cf-lease");
    let ttl = Duration::from_secs(30);
    let first = s
        .try_lease(&name, "alice", ttl)
        .await
        .unwrap()
        .expect("free lease");
    assert_eq!(
        (first.name.as_str(), first.owner.as_str()),
        (name.as_str(), "alice")
    );
    assert!(
        s.try_lease(&name, "bob", ttl).await.unwrap().is_none(),
        "held by alice"
    );
    let again = s
        .try_lease(&name, "alice", ttl)
        .await
        .unwrap()
        .expect("own lease");
    assert_eq!(again.fence, first.fence, "re-acquiring keeps the fence");
    assert!(
        !s.release_lease(&name, "bob").await.unwrap(),
        "bob cannot release"
    );
    assert!(
        s.try_lease(&name, "bob", ttl).await.unwrap().is_none(),
        "still alice's"
    );
    assert!(s.release_lease(&name, "alice").await.unwrap());
    assert!(
        !s.release_lease(&name, "alice").await.unwrap(),
        "second release"
    );
    let bob = s
        .try_lease(&name, "bob", ttl)
        .await
        .unwrap()
        .expect("released lease");
    assert!(
        bob.fence > first.fence,
        "fence {} !> {}",
        bob.fence,
        first.fence
    );
    assert!(s.release_lease(&name, "bob").await.unwrap());
    let alice = s
        .try_lease(&name, "alice", ttl)
        .await
        .unwrap()
        .expect("released lease");
    assert!(
        alice.fence > bob.fence,
        "fence {} !> {}",
        alice.fence,
        bob.fence
    );
    // Leases of other names are independent.
    let other = unique("cf-lease");
    assert!(s.try_lease(&other, "bob", ttl).await.unwrap().is_some());
    s.release_lease(&other, "bob").await.unwrap();
    s.release_lease(&name, "alice").await.unwrap();
}

/// An expired lease goes to the next owner with a higher fence, and the old owner can no longer
/// release it.
pub async fn lease_expiry(s: &dyn Store) {
    let name = unique("cf-expiry");
    let short = Duration::from_millis(300);
    // Alice's lease lasts 2 s so that bob's first try lands inside it even when a loaded machine
    // takes hundreds of milliseconds for a store write.
    let held = Duration::from_secs(2);
    let first = s
        .try_lease(&name, "alice", held)
        .await
        .unwrap()
        .expect("free lease");
    assert!(
        s.try_lease(&name, "bob", short).await.unwrap().is_none(),
        "not yet expired"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let bob = loop {
        if let Some(l) = s
            .try_lease(&name, "bob", Duration::from_secs(30))
            .await
            .unwrap()
        {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "lease did not expire within 10 s of a 2 s TTL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        bob.fence > first.fence,
        "fence {} !> {}",
        bob.fence,
        first.fence
    );
    assert!(
        !s.release_lease(&name, "alice").await.unwrap(),
        "expired owner released"
    );
    assert!(
        s.try_lease(&name, "alice", short).await.unwrap().is_none(),
        "bob holds it"
    );
    // Extending keeps the lease alive past the first TTL.
    let name2 = unique("cf-extend");
    let c1 = s
        .try_lease(&name2, "carol", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    let c2 = s
        .try_lease(&name2, "carol", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c1.fence, c2.fence);
    // Waiting out the first TTL is the point here, so this sleep is the test, not a guess.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        s.try_lease(&name2, "dave", short).await.unwrap().is_none(),
        "extended lease expired with its first TTL"
    );
    // After expiry even the same owner starts a new tenure with a higher fence.
    let name3 = unique("cf-retake");
    let e1 = s.try_lease(&name3, "erin", short).await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if s.try_lease(&name3, "frank", short).await.unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "lease did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let e2 = loop {
        if let Some(l) = s.try_lease(&name3, "erin", short).await.unwrap() {
            break l;
        }
        assert!(Instant::now() < deadline, "lease did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        e2.fence > e1.fence + 1,
        "fence {} after frank's, first {}",
        e2.fence,
        e1.fence
    );
    s.release_lease(&name, "bob").await.unwrap();
    s.release_lease(&name2, "carol").await.unwrap();
    s.release_lease(&name3, "erin").await.unwrap();
}

/// Renewing extends only a lease its owner still holds, keeps the fence, never acquires, and a
/// lease that is no longer renewed expires with its TTL (a dead holder frees it within seconds).
///
/// The TTL is 2 s and the holder renews every 300 ms: a renewal must land within the TTL of the
/// last one, and on a loaded 2-core CI machine each iteration's three store writes (an fsync each
/// on the embedded store) have taken several hundred milliseconds, which a 600 ms TTL did not
/// leave room for. Each failure names the gap since the last renewal.
pub async fn lease_renewal(s: &dyn Store) {
    let name = unique("cf-renew");
    let short = Duration::from_secs(2);
    assert!(
        !s.renew_lease(&name, "alice", short).await.unwrap(),
        "renewing a lease nobody holds must not acquire it"
    );
    assert!(
        s.try_lease(&name, "bob", short).await.unwrap().is_some(),
        "a refused renewal left nothing behind"
    );
    s.release_lease(&name, "bob").await.unwrap();
    let first = s
        .try_lease(&name, "alice", short)
        .await
        .unwrap()
        .expect("free lease");
    // Renewed every 300 ms for 2.4 s (past the first TTL): still alice's throughout.
    let mut renewed = Instant::now();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let asked = Instant::now();
        let gap = asked - renewed;
        assert!(
            s.renew_lease(&name, "alice", short).await.unwrap(),
            "the holder renews ({gap:?} after its last renewal, TTL {short:?})"
        );
        renewed = asked;
        assert!(
            !s.renew_lease(&name, "bob", short).await.unwrap(),
            "another owner cannot renew"
        );
        assert!(
            s.try_lease(&name, "bob", short).await.unwrap().is_none(),
            "a renewed lease stays held past its first TTL"
        );
    }
    // The holder stops renewing (it died): the lease goes to the next owner within about a TTL,
    // with a higher fence, and the old holder can no longer renew it.
    let stopped = renewed;
    let bob = loop {
        if let Some(l) = s.try_lease(&name, "bob", short).await.unwrap() {
            break l;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(12),
            "an unrenewed 2 s lease did not expire within 12 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(
        // The stores keep expiry in whole milliseconds of their own clock: 100 ms of slack.
        stopped.elapsed() >= short - Duration::from_millis(100),
        "the lease freed {:?} after the last renewal, before its TTL",
        stopped.elapsed()
    );
    assert!(
        bob.fence > first.fence,
        "fence {} !> {}",
        bob.fence,
        first.fence
    );
    assert!(
        !s.renew_lease(&name, "alice", short).await.unwrap(),
        "the expired holder's renewal must fail"
    );
    assert!(s.renew_lease(&name, "bob", short).await.unwrap());
    let again = s
        .try_lease(&name, "bob", short)
        .await
        .unwrap()
        .expect("own lease");
    assert_eq!(again.fence, bob.fence, "renewing keeps the fence");
    assert!(s.release_lease(&name, "bob").await.unwrap());
    assert!(
        !s.renew_lease(&name, "bob", short).await.unwrap(),
        "a released lease cannot be renewed"
    );
}

/// A subscriber hears [`Notice::Subscribed`] once its subscription holds, then what is published
/// on its channel (by this handle; another process's handle reaches it the same way), in order,
/// and nothing published on another channel. Bad channel names are refused.
pub async fn notifications(s: &dyn Store) {
    use crate::Notice;
    let wait = Duration::from_secs(10);
    let channel = unique_schedule("notify");
    let other = unique_schedule("notify-other");
    let mut rx = s.subscribe(channel);
    let first = tokio::time::timeout(wait, rx.recv()).await;
    assert_eq!(first.ok().flatten(), Some(Notice::Subscribed));
    s.publish(other, "not for this channel").await.unwrap();
    s.publish(channel, "one").await.unwrap();
    s.publish(channel, "two").await.unwrap();
    for expected in ["one", "two"] {
        let got = tokio::time::timeout(wait, rx.recv()).await.ok().flatten();
        assert_eq!(got, Some(Notice::Message(expected.to_owned())));
    }
    let err = s.publish("a:b", "x").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Config(m) if m.contains("a:b")),
        "{err:?}"
    );
}
