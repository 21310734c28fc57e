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
    assert_eq!(t.shared_get(1, &name("s"), Some(&quota)), Some(1));
    assert_eq!(get_q(&mut t, "b"), GetOutcome::OverLimit);
    assert_eq!(t.shared_get(1, &name("t"), Some(&quota)), None);
    assert_eq!(get_q(&mut t, "a"), GetOutcome::AlreadyHeld);
    assert_eq!(t.shared_get(1, &name("s"), Some(&quota)), Some(1));
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
