//! Unit tests of the lock table: exclusion, shared counting, quotas, orphaning, listings.

use super::*;

fn table() -> ShardTable {
    ShardTable::new(crate::name_hasher())
}

fn get(t: &mut ShardTable, conn: ConnId, name: &str) -> bool {
    let hash = t.hash(name.as_bytes());
    matches!(
        t.get(conn, hash, &LockName::from(name), None),
        GetOutcome::Granted | GetOutcome::AlreadyHeld
    )
}

fn sg(t: &mut ShardTable, conn: ConnId, name: &str) -> u64 {
    t.shared_get(conn, &LockName::from(name), None)
        .expect("no quota")
}

fn release(t: &mut ShardTable, conn: ConnId, name: &str) -> bool {
    let hash = t.hash(name.as_bytes());
    t.release(conn, hash, name.as_bytes())
}

fn holder(t: &ShardTable, name: &str) -> Option<ConnId> {
    t.holder(t.hash(name.as_bytes()), name.as_bytes())
}

#[test]
fn exclusive_lock_has_one_holder_and_regets_succeed() {
    let mut t = table();
    assert!(get(&mut t, 1, "a"));
    assert!(get(&mut t, 1, "a"), "re-getting a held lock answers 1");
    assert!(!get(&mut t, 2, "a"));
    assert_eq!(holder(&t, "a"), Some(1));
    assert_eq!(t.exclusive_len(), 1);
}

#[test]
fn only_the_holder_releases() {
    let mut t = table();
    assert!(get(&mut t, 1, "a"));
    assert!(!release(&mut t, 2, "a"));
    assert!(!release(&mut t, 1, "b"));
    assert!(release(&mut t, 1, "a"));
    assert!(!release(&mut t, 1, "a"));
    assert_eq!(holder(&t, "a"), None);
    assert!(get(&mut t, 2, "a"));
}

#[test]
fn orphaning_releases_exactly_the_connections_locks() {
    let mut t = table();
    for i in 0..100 {
        assert!(get(&mut t, 1, &format!("one-{i}")));
        assert!(get(&mut t, 2, &format!("two-{i}")));
    }
    // Release some from the middle, head and tail of conn 1's list.
    for i in [0, 50, 99] {
        assert!(release(&mut t, 1, &format!("one-{i}")));
    }
    sg(&mut t, 1, "s");
    sg(&mut t, 2, "s");
    let orphaned = t.orphan_all(1);
    assert_eq!(
        orphaned,
        Orphaned {
            exclusive: 97,
            shared: 1
        }
    );
    assert_eq!(t.exclusive_len(), 100);
    assert_eq!(t.shared_count(b"s"), 1);
    for i in 0..100 {
        assert_eq!(holder(&t, &format!("one-{i}")), None);
        assert_eq!(holder(&t, &format!("two-{i}")), Some(2));
    }
    assert_eq!(t.orphan_all(1), Orphaned::default());
    // Freed slots are reused.
    let slots = t.slots.len();
    for i in 0..97 {
        assert!(get(&mut t, 3, &format!("three-{i}")));
    }
    assert_eq!(t.slots.len(), slots);
    assert_eq!(t.orphan_all(2).exclusive, 100);
    assert_eq!(t.orphan_all(3).exclusive, 97);
    assert_eq!(t.exclusive_len(), 0);
}

#[test]
fn orphaning_in_slices_releases_everything_once() {
    let mut t = table();
    for i in 0..1000 {
        assert!(get(&mut t, 1, &format!("x{i}")));
        sg(&mut t, 1, &format!("s{i}"));
    }
    assert!(get(&mut t, 2, "other"));
    let mut total = Orphaned::default();
    let mut names = 0;
    let mut slices = 0;
    loop {
        let (orphaned, done) = t.orphan_some(1, 300, |_| names += 1);
        total.exclusive += orphaned.exclusive;
        total.shared += orphaned.shared;
        slices += 1;
        // Between slices the table stays consistent and serves others.
        assert_eq!(holder(&t, "other"), Some(2));
        if done {
            break;
        }
    }
    assert_eq!(
        total,
        Orphaned {
            exclusive: 1000,
            shared: 1000
        }
    );
    assert_eq!(names, 1000);
    assert_eq!(slices, 7);
    assert_eq!(t.exclusive_len(), 1);
    assert_eq!(t.shared_len(), 0);
}

#[test]
fn shared_locks_count_each_holder_once() {
    let mut t = table();
    assert_eq!(sg(&mut t, 1, "s"), 1);
    assert_eq!(sg(&mut t, 1, "s"), 1);
    assert_eq!(sg(&mut t, 2, "s"), 2);
    assert_eq!(t.shared_count(b"s"), 2);
    assert!(!t.shared_release(3, b"s"));
    assert!(t.shared_release(1, b"s"));
    assert!(!t.shared_release(1, b"s"));
    assert_eq!(t.shared_count(b"s"), 1);
    assert!(t.shared_release(2, b"s"));
    assert_eq!(t.shared_len(), 0);
}

#[test]
fn shared_holder_sets_grow_past_the_inline_size() {
    let mut t = table();
    for conn in 0..1000 {
        assert_eq!(sg(&mut t, conn, "popular"), conn + 1);
    }
    assert_eq!(sg(&mut t, 5, "popular"), 1000);
    for conn in (0..1000).step_by(2) {
        assert!(t.shared_release(conn, b"popular"));
    }
    assert_eq!(t.shared_count(b"popular"), 500);
    assert_eq!(t.list_shared(Some(b"popular")).len(), 500);
    for conn in (1..1000).step_by(2) {
        assert_eq!(t.orphan_all(conn).shared, 1);
    }
    assert_eq!(t.shared_len(), 0);
}

#[test]
fn a_quota_limits_new_locks_but_not_regets() {
    let mut t = table();
    let quota = Quota::new(2);
    let name = |n: &str| LockName::from(n);
    let get_q = |t: &mut ShardTable, n: &str| {
        let hash = t.hash(n.as_bytes());
        t.get(1, hash, &name(n), Some(&quota))
    };
    assert_eq!(get_q(&mut t, "a"), GetOutcome::Granted);
    assert_eq!(t.shared_get(1, &name("s"), Some(&quota)), Ok(1));
    assert_eq!(get_q(&mut t, "b"), GetOutcome::OverLimit);
    assert_eq!(
        t.shared_get(1, &name("t"), Some(&quota)),
        Err(Reply::LimitReached)
    );
    assert_eq!(get_q(&mut t, "a"), GetOutcome::AlreadyHeld);
    assert_eq!(t.shared_get(1, &name("s"), Some(&quota)), Ok(1));
    assert!(!t.shared.contains_key(b"t".as_slice()));
    let hash = t.hash(b"a");
    assert_eq!(
        t.apply(1, LockOp::Release, hash, &name("a"), Some(&quota)),
        Reply::Released
    );
    assert_eq!(quota.held(), 1);
    assert_eq!(get_q(&mut t, "b"), GetOutcome::Granted);
}

#[test]
fn exclusive_and_shared_are_separate_namespaces() {
    let mut t = table();
    assert!(get(&mut t, 1, "x"));
    assert_eq!(sg(&mut t, 2, "x"), 1);
    assert_eq!(holder(&t, "x"), Some(1));
}

#[test]
fn listings_show_names_and_holders() {
    let mut t = table();
    get(&mut t, 1, "a");
    get(&mut t, 2, "b");
    let mut all = t.list_exclusive(None);
    all.sort();
    assert_eq!(
        all,
        vec![(LockName::from("a"), 1), (LockName::from("b"), 2)]
    );
    let one = t.list_exclusive(Some((t.hash(b"b"), b"b")));
    assert_eq!(one, vec![(LockName::from("b"), 2)]);
    assert!(t.list_exclusive(Some((t.hash(b"c"), b"c"))).is_empty());
}

// The memory accounting: every path that stores adds, every path that frees takes off exactly
// what was added, so a table back to empty counts zero bytes.

use crate::memory::MemoryBudget;
use crate::protocol::RateParams;
use crate::protocol::WaitKind;
use tokio::sync::oneshot;

/// The running count agrees with a count made afresh from every structure.
fn accounted(t: &ShardTable) -> u64 {
    assert_eq!(t.memory_used(), t.recount_memory());
    t.memory_used()
}

/// A name of `len` bytes, told apart by `i`: short ones inline, long ones on the heap.
fn sized_name(i: u64, len: usize) -> LockName {
    let mut bytes = format!("{i}:").into_bytes();
    bytes.resize(len.max(bytes.len()), b'x');
    LockName::new(&bytes)
}

fn wait(
    t: &mut ShardTable,
    conn: ConnId,
    kind: WaitKind,
    name: &LockName,
) -> (u64, oneshot::Receiver<Reply>) {
    let (tx, rx) = oneshot::channel();
    let hash = t.hash(name.as_bytes());
    let id = t.wait(conn, None, kind, hash, name, tx).unwrap_or(0);
    for (to, reply) in t.take_announcements() {
        let _ = to.send(reply);
    }
    (id, rx)
}

#[test]
fn every_path_that_frees_gives_back_exactly_what_was_counted() {
    for len in [4, 100] {
        let mut t = table();
        let a = sized_name(1, len);
        let b = sized_name(2, len);
        let hash_a = t.hash(a.as_bytes());
        // Exclusive: get, release.
        assert_eq!(t.get(1, hash_a, &a, None), GetOutcome::Granted);
        let one_lock = accounted(&t);
        assert_eq!(
            one_lock,
            EXCLUSIVE_BYTES + HOLDINGS_BYTES + crate::memory::name_heap(&a)
        );
        assert!(t.release(1, hash_a, a.as_bytes()));
        assert_eq!(
            accounted(&t),
            HOLDINGS_BYTES,
            "the connection's entry stays"
        );
        // Shared: get by two, release by one, orphan the other.
        assert_eq!(t.shared_get(1, &b, None), Ok(1));
        assert_eq!(t.shared_get(2, &b, None), Ok(2));
        accounted(&t);
        assert!(t.shared_release(1, b.as_bytes()));
        accounted(&t);
        t.orphan_all(2);
        assert_eq!(accounted(&t), HOLDINGS_BYTES);
        // Waits: one expires, one is granted, one whose client left is skipped, one is
        // orphaned while it waits.
        assert_eq!(t.get(1, hash_a, &a, None), GetOutcome::Granted);
        let (expiring, _rx) = wait(&mut t, 2, WaitKind::Exclusive, &a);
        accounted(&t);
        t.expire(LockKind::Exclusive, &a, expiring);
        accounted(&t);
        let (_, gone) = wait(&mut t, 3, WaitKind::Exclusive, &a);
        let (_, mut granted) = wait(&mut t, 4, WaitKind::Exclusive, &a);
        let (_, _orphaned) = wait(&mut t, 5, WaitKind::Exclusive, &a);
        drop(gone);
        accounted(&t);
        assert!(t.release(1, hash_a, a.as_bytes()));
        for (to, reply) in t.take_announcements() {
            let _ = to.send(reply);
        }
        assert_eq!(granted.try_recv(), Ok(Reply::Got));
        accounted(&t);
        t.orphan_all(5);
        accounted(&t);
        // Shared waiters, let in and orphaned.
        assert_eq!(t.shared_get(6, &b, None), Ok(1));
        let (_, mut let_in) = wait(&mut t, 7, WaitKind::Shared { limit: 1 }, &b);
        accounted(&t);
        t.orphan_all(6);
        for (to, reply) in t.take_announcements() {
            let _ = to.send(reply);
        }
        assert_eq!(let_in.try_recv(), Ok(Reply::SharedGot(1)));
        for conn in 1..=7 {
            t.orphan_all(conn);
            accounted(&t);
        }
        assert_eq!(accounted(&t), 0, "names of {len} bytes");
        assert_eq!(t.exclusive_len() + t.shared_len() + t.waiters(), 0);
    }
}

#[test]
fn random_work_keeps_the_count_exact() {
    // A fixed xorshift sequence: reproducible, and it reaches every path many times over.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut t = table();
    let mut receivers = Vec::new();
    for step in 0..20_000 {
        let conn = 1 + next(6);
        let name = sized_name(next(12), if next(3) == 0 { 40 } else { 8 });
        let hash = t.hash(name.as_bytes());
        match next(9) {
            0 | 1 => {
                t.get(conn, hash, &name, None);
            }
            2 => {
                t.release(conn, hash, name.as_bytes());
            }
            3 => {
                let _ = t.shared_get(conn, &name, None);
            }
            4 => {
                t.shared_release(conn, name.as_bytes());
            }
            5 => {
                let kind = if next(2) == 0 {
                    WaitKind::Exclusive
                } else {
                    WaitKind::Shared { limit: 1 + next(2) }
                };
                let (id, rx) = wait(&mut t, conn, kind, &name);
                receivers.push((kind, name, id, rx));
            }
            6 => {
                if let Some((kind, name, id, _)) = receivers.pop() {
                    t.expire(kind.lock_kind(), &name, id);
                }
            }
            7 => {
                // A waiting client hangs up.
                if !receivers.is_empty() {
                    let at = next(receivers.len() as u64) as usize;
                    receivers.swap_remove(at);
                }
            }
            8 if next(2) == 0 => {
                // Orphaning a slice at a time, as a shard does for a big departure.
                t.orphan_some(conn, 1 + next(3) as usize, |_| {});
            }
            _ => {
                t.orphan_all(conn);
            }
        }
        for (to, reply) in t.take_announcements() {
            let _ = to.send(reply);
        }
        assert_eq!(t.memory_used(), t.recount_memory(), "step {step}");
    }
    for conn in 1..=6 {
        t.orphan_all(conn);
    }
    assert_eq!(accounted(&t), 0);
}

/// A table whose state may take `limit` bytes.
fn budgeted(limit: u64) -> ShardTable {
    ShardTable::with_budget(
        crate::name_hasher(),
        crate::fencing::TokenClock::default(),
        Arc::new(MemoryBudget::new(limit, 1)),
        0,
    )
}

#[test]
fn a_full_budget_refuses_new_state_and_keeps_everything_else_working() {
    let mut t = budgeted(20 * EXCLUSIVE_BYTES + HOLDINGS_BYTES);
    let mut granted = 0;
    for i in 0..100 {
        let name = sized_name(i, 8);
        let hash = t.hash(name.as_bytes());
        match t.apply(1, LockOp::Get, hash, &name, None) {
            Reply::Got => granted += 1,
            Reply::OutOfMemory => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(granted, 20);
    let full = accounted(&t);
    let next = sized_name(99, 8);
    let hash = t.hash(next.as_bytes());
    // Refused, and nothing changed.
    assert_eq!(
        t.apply(2, LockOp::Get, hash, &next, None),
        Reply::OutOfMemory
    );
    assert_eq!(
        t.apply(2, LockOp::SharedGet, hash, &next, None),
        Reply::OutOfMemory
    );
    let (_, mut refused) = wait(&mut t, 2, WaitKind::Exclusive, &sized_name(0, 8));
    assert_eq!(refused.try_recv(), Ok(Reply::OutOfMemory));
    assert_eq!(accounted(&t), full);
    // What holds no new state still works: a re-get, inspections, a release.
    let held = sized_name(0, 8);
    let hash_held = t.hash(held.as_bytes());
    assert_eq!(t.apply(1, LockOp::Get, hash_held, &held, None), Reply::Got);
    assert_eq!(
        t.apply(2, LockOp::Get, hash_held, &held, None),
        Reply::NotGot
    );
    assert_eq!(
        t.apply(2, LockOp::Inspect, hash_held, &held, None),
        Reply::Locked
    );
    assert_eq!(
        t.apply(1, LockOp::Release, hash_held, &held, None),
        Reply::Released
    );
    // Room again.
    assert_eq!(t.apply(1, LockOp::Get, hash, &next, None), Reply::Got);
    t.orphan_all(1);
    t.orphan_all(2);
    assert_eq!(accounted(&t), 0);
}

#[test]
fn a_waiter_handed_a_lock_is_never_refused_for_memory() {
    let a = LockName::from("a");
    let mut t = budgeted(EXCLUSIVE_BYTES + 2 * HOLDINGS_BYTES + 4096);
    let hash = t.hash(a.as_bytes());
    assert_eq!(t.get(1, hash, &a, None), GetOutcome::Granted);
    let (_, mut waiting) = wait(&mut t, 2, WaitKind::Exclusive, &a);
    assert!(waiting.try_recv().is_err(), "queued");
    assert!(t.release(1, hash, a.as_bytes()));
    for (to, reply) in t.take_announcements() {
        let _ = to.send(reply);
    }
    assert_eq!(waiting.try_recv(), Ok(Reply::Got));
    accounted(&t);
}

#[test]
fn rate_limiters_make_room_by_evicting_and_count_it() {
    let day = RateParams {
        burst: 1,
        count: 1,
        period_ms: 86_400_000,
        quantity: 1,
    };
    // Limiters may take half the budget: room for 10 of them.
    let room = 10 * crate::ratelimit::LIMITER_BYTES;
    let mut t = budgeted(2 * room);
    for i in 0..25 {
        let name = sized_name(i, 8);
        let hash = t.hash(name.as_bytes());
        let reply = t.apply(1, LockOp::RateLimit(day), hash, &name, None);
        assert!(
            matches!(reply, Reply::RateLimit(d) if d.allowed),
            "{reply:?}"
        );
    }
    assert_eq!(t.rate_limit_len(), 10);
    assert_eq!(t.rate_limit_evictions(), 15);
    assert_eq!(accounted(&t), room);
    // However many names are rate-limited, the other half stays for locks.
    let mut granted = 0;
    for i in 100..200 {
        let lock = sized_name(i, 8);
        let hash = t.hash(lock.as_bytes());
        match t.apply(1, LockOp::Get, hash, &lock, None) {
            Reply::Got => granted += 1,
            Reply::OutOfMemory => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        granted >= 5,
        "{granted} locks in the half limiters cannot take"
    );
    // With the budget full of locks, a new limiter evicts limiters, never a lock.
    let name = sized_name(1000, 8);
    let hash = t.hash(name.as_bytes());
    assert!(matches!(
        t.apply(1, LockOp::RateLimit(day), hash, &name, None),
        Reply::RateLimit(d) if d.allowed
    ));
    assert_eq!(t.exclusive_len(), granted);
    accounted(&t);
}
