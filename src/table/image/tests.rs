//! Unit tests of table images: a table taken out and restored, whole or split over two tables,
//! holds and serves exactly what the original did.

use std::collections::HashMap;

use tokio::runtime::Runtime;
use tokio::sync::oneshot::{self, error::TryRecvError, Receiver};
use tokio::task::JoinHandle;

use super::*;
use crate::protocol::{LockOp, RateParams};
use crate::table::deadline_in;
use crate::NameHasher;

const LONG: &str = "a name long enough to be stored on the heap";

/// Names of the locks and limiters [`populate`] makes.
const EXCLUSIVE: [(ConnId, &str); 4] = [(1, "a"), (1, "b"), (1, LONG), (2, "c")];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
}

/// A stand-in for a waiter's timeout task: never polled, only ever aborted.
fn timer(rt: &Runtime) -> JoinHandle<()> {
    rt.spawn(std::future::pending::<()>())
}

/// The running count agrees with a count made afresh.
fn accounted(t: &ShardTable) -> u64 {
    assert_eq!(t.memory_used(), t.recount_memory());
    t.memory_used()
}

fn apply(t: &mut ShardTable, conn: ConnId, op: LockOp, name: &str) -> Reply {
    let name = LockName::from(name);
    let hash = t.hash(name.as_bytes());
    t.apply(conn, op, hash, &name, None)
}

/// `rl` with a day's period: `burst + 1` requests, then one a day.
fn rl(t: &mut ShardTable, name: &str, burst: u32) -> crate::ratelimit::Decision {
    let day = RateParams {
        burst,
        count: 1,
        period_ms: 86_400_000,
        quantity: 1,
    };
    match apply(t, 1, LockOp::RateLimit(day), name) {
        Reply::RateLimit(decision) => decision,
        other => panic!("{other:?}"),
    }
}

/// Sends the answers the table decided.
fn announce(t: &mut ShardTable) {
    for (to, reply) in t.take_announcements() {
        let _ = to.send(reply);
    }
}

/// The waiters of a populated table: their answer channels and timeout tasks.
#[derive(Default)]
struct Waiting {
    answers: HashMap<ConnId, Receiver<Reply>>,
    timers: Vec<JoinHandle<()>>,
}

impl Waiting {
    /// `conn` waits for `name` (for a minute), which must not be free.
    fn wait(&mut self, t: &mut ShardTable, rt: &Runtime, conn: ConnId, kind: WaitKind, name: &str) {
        let (tx, rx) = oneshot::channel();
        let name = LockName::from(name);
        let hash = t.hash(name.as_bytes());
        let id = t.wait(conn, None, kind, hash, &name, tx).expect("queued");
        let task = timer(rt);
        t.set_wait_timer(kind, &name, id, task.abort_handle(), deadline_in(60_000));
        self.answers.insert(conn, rx);
        self.timers.push(task);
    }

    /// Every answer received since the last call, by connection.
    fn answered(&mut self) -> Vec<(ConnId, Reply)> {
        let mut got: Vec<(ConnId, Reply)> = self
            .answers
            .iter_mut()
            .filter_map(|(&conn, rx)| rx.try_recv().ok().map(|reply| (conn, reply)))
            .collect();
        got.sort_by_key(|&(conn, _)| conn);
        for (conn, _) in &got {
            self.answers.remove(conn);
        }
        got
    }
}

/// Exclusive locks of two connections (one with a long name), shared locks with a few and with
/// many holders, queues of exclusive and shared waiters, and rate limiters mid-window.
fn populate(t: &mut ShardTable, rt: &Runtime) -> Waiting {
    for (conn, name) in EXCLUSIVE {
        assert_eq!(apply(t, conn, LockOp::Get, name), Reply::Got);
    }
    for conn in 1..=3 {
        assert_eq!(
            apply(t, conn, LockOp::SharedGet, "s"),
            Reply::SharedGot(conn)
        );
    }
    assert_eq!(apply(t, 4, LockOp::SharedGet, "t"), Reply::SharedGot(1));
    for conn in 100..140 {
        apply(t, conn, LockOp::SharedGet, "many");
    }
    let mut waiting = Waiting::default();
    for conn in [5, 6, 7] {
        waiting.wait(t, rt, conn, WaitKind::Exclusive, "a");
    }
    waiting.wait(t, rt, 11, WaitKind::Exclusive, LONG);
    for (conn, limit) in [(8, 3), (9, 1), (10, 3)] {
        waiting.wait(t, rt, conn, WaitKind::Shared { limit }, "s");
    }
    assert!(rl(t, "busy", 0).allowed);
    assert!(!rl(t, "busy", 0).allowed);
    assert!(rl(t, "half", 2).allowed);
    waiting
}

/// Releases that serve every queue of a populated table; who was answered what after each.
fn serve(t: &mut ShardTable, waiting: &mut Waiting) -> Vec<Vec<(ConnId, Reply)>> {
    let mut steps = Vec::new();
    let exclusive = [(1, "a"), (5, "a"), (6, "a"), (1, LONG)];
    for (conn, name) in exclusive {
        assert_eq!(apply(t, conn, LockOp::Release, name), Reply::Released);
        announce(t);
        steps.push(waiting.answered());
    }
    for conn in [1, 2, 3, 8, 10] {
        assert_eq!(
            apply(t, conn, LockOp::SharedRelease, "s"),
            Reply::SharedReleased
        );
        announce(t);
        steps.push(waiting.answered());
    }
    steps
}

/// Sorts what an image lists in no particular order (keeping each queue's order), so images
/// of the same state compare equal.
fn sorted(mut image: TableImage) -> TableImage {
    image.exclusive.sort_by(|a, b| a.name.cmp(&b.name));
    image.shared.sort_by(|a, b| a.name.cmp(&b.name));
    for shared in &mut image.shared {
        shared.holders.sort();
    }
    image.waiters.sort_by(|a, b| {
        (a.shared_limit.is_some(), &a.name).cmp(&(b.shared_limit.is_some(), &b.name))
    });
    image.limiters.sort_by(|a, b| a.name.cmp(&b.name));
    image
}

/// Asserts two images hold the same state, up to the time that passed between them (a
/// second at most) in what is measured from the moment each was taken.
fn assert_same(a: TableImage, b: TableImage) {
    let (a, mut b) = (sorted(a), sorted(b));
    assert_eq!(a.waiters.len(), b.waiters.len());
    for (a, b) in a.waiters.iter().zip(&mut b.waiters) {
        assert!(
            a.remaining_ms.abs_diff(b.remaining_ms) <= 1000,
            "{a:?} {b:?}"
        );
        b.remaining_ms = a.remaining_ms;
    }
    assert_eq!(a.limiters.len(), b.limiters.len());
    for (a, b) in a.limiters.iter().zip(&mut b.limiters) {
        assert!(
            a.tat_ahead_ns.abs_diff(b.tat_ahead_ns) <= 1_000_000_000,
            "{a:?} {b:?}"
        );
        b.tat_ahead_ns = a.tat_ahead_ns;
    }
    assert_eq!(a, b);
}

fn assert_empty(t: &ShardTable) {
    assert_eq!(t.exclusive_len(), 0);
    assert_eq!(t.shared_len(), 0);
    assert_eq!(t.waiters(), 0);
    assert_eq!(t.rate_limit_len(), 0);
    assert_eq!(accounted(t), 0);
}

fn counts_of(t: &ShardTable) -> CountsImage {
    CountsImage {
        waits_started: t.counts.waits_started,
        waits_granted: t.counts.waits_granted,
        waits_timed_out: t.counts.waits_timed_out,
        rate_limit_allowed: t.counts.rate_limit_allowed,
        rate_limit_limited: t.counts.rate_limit_limited,
        rate_limit_evictions: t.rate_limit_evictions(),
    }
}

/// A fresh answer channel for each waiter restored, its receiver kept in `waiting`.
fn channels(
    waiting: &mut Waiting,
) -> impl FnMut(&WaiterImage) -> Option<oneshot::Sender<Reply>> + '_ {
    |w| {
        let (tx, rx) = oneshot::channel();
        waiting.answers.insert(w.conn, rx);
        Some(tx)
    }
}

#[test]
fn a_restored_table_holds_and_serves_exactly_what_the_original_did() {
    let rt = runtime();
    let hasher: NameHasher = crate::name_hasher();
    let mut original = ShardTable::new(hasher.clone());
    // A twin that is never taken out: what the original would have done.
    let mut twin = ShardTable::new(hasher.clone());
    let mut old_waiting = populate(&mut original, &rt);
    let mut twin_waiting = populate(&mut twin, &rt);
    let used = accounted(&original);
    let tokens: Vec<Option<u64>> = EXCLUSIVE
        .iter()
        .map(|(_, name)| original.token(original.hash(name.as_bytes()), name.as_bytes()))
        .collect();
    let counts = counts_of(&original);
    assert_eq!(
        (
            counts.waits_started,
            counts.rate_limit_allowed,
            counts.rate_limit_limited
        ),
        (7, 2, 1)
    );

    let image = original.take_image();
    assert_empty(&original);
    assert_eq!(counts_of(&original), CountsImage::default());
    // The waiters' answer channels are dropped and their timeout tasks aborted.
    for rx in old_waiting.answers.values_mut() {
        assert_eq!(rx.try_recv(), Err(TryRecvError::Closed));
    }
    for task in old_waiting.timers.drain(..) {
        let ended = rt.block_on(task);
        assert!(ended.is_err_and(|e| e.is_cancelled()));
    }
    // The image has everything.
    assert_eq!(image.exclusive.len(), 4);
    assert_eq!(image.shared.len(), 3);
    assert_eq!(image.limiters.len(), 2);
    assert_eq!(image.counts, counts);
    assert!(image.exclusive.iter().all(|h| h.token <= image.last_token));
    let queue_of_a: Vec<ConnId> = image
        .waiters
        .iter()
        .filter(|w| w.name == b"a")
        .map(|w| w.conn)
        .collect();
    assert_eq!(queue_of_a, [5, 6, 7]);
    let queue_of_s: Vec<(ConnId, Option<u64>)> = image
        .waiters
        .iter()
        .filter(|w| w.name == b"s")
        .map(|w| (w.conn, w.shared_limit))
        .collect();
    assert_eq!(queue_of_s, [(8, Some(3)), (9, Some(1)), (10, Some(3))]);
    assert!(image
        .waiters
        .iter()
        .all(|w| (59_000..=60_000).contains(&w.remaining_ms)));
    // The table still works, from empty.
    assert_eq!(apply(&mut original, 1, LockOp::Get, "a"), Reply::Got);
    assert!(accounted(&original) > 0);

    let encoded = postcard::to_stdvec(&image).expect("encodes");
    let decoded: TableImage = postcard::from_bytes(&encoded).expect("decodes");
    assert_eq!(decoded, image);

    let mut restored = ShardTable::new(hasher);
    let mut waiting = Waiting::default();
    let armed = restored.restore_image(decoded, |_| None, channels(&mut waiting));
    assert_eq!(armed.len(), 7);
    for (kind, name, id, remaining_ms) in armed {
        let task = timer(&rt);
        restored.set_wait_timer(
            kind,
            &name,
            id,
            task.abort_handle(),
            deadline_in(remaining_ms),
        );
        waiting.timers.push(task);
    }
    assert_eq!(accounted(&restored), used, "counted as the original was");
    assert_eq!(counts_of(&restored), counts);
    for ((conn, name), token) in EXCLUSIVE.iter().zip(&tokens) {
        let hash = restored.hash(name.as_bytes());
        assert_eq!(restored.holder(hash, name.as_bytes()), Some(*conn));
        assert_eq!(restored.token(hash, name.as_bytes()), *token);
    }
    for (name, count) in [("s", 3), ("t", 1), ("many", 40)] {
        assert_eq!(restored.shared_count(name.as_bytes()), count);
    }
    assert_eq!(restored.waiters(), 7);
    // New tokens are above every token the original issued.
    assert_eq!(apply(&mut restored, 20, LockOp::Get, "new"), Reply::Got);
    let hash = restored.hash(b"new");
    assert!(restored.token(hash, b"new") > Some(image.last_token));
    assert_eq!(apply(&mut twin, 20, LockOp::Get, "new"), Reply::Got);

    // The limiters decide as the twin's.
    for _ in 0..3 {
        for (name, burst) in [("busy", 0), ("half", 2), ("fresh", 0)] {
            let (got, expected) = (rl(&mut restored, name, burst), rl(&mut twin, name, burst));
            assert_eq!(
                (got.allowed, got.remaining, got.limit),
                (expected.allowed, expected.remaining, expected.limit),
                "{name}"
            );
            assert!(got.reset_after_ms.abs_diff(expected.reset_after_ms) <= 1000);
        }
    }
    // The queues are served in their original order, as the twin's are.
    let served = serve(&mut restored, &mut waiting);
    assert_eq!(served, serve(&mut twin, &mut twin_waiting));
    let got = Reply::Got;
    let shared = Reply::SharedGot;
    assert_eq!(
        served,
        [
            vec![(5, got)],
            vec![(6, got)],
            vec![(7, got)],
            vec![(11, got)],
            vec![(8, shared(3))],
            vec![(10, shared(3))],
            vec![],
            vec![],
            vec![(9, shared(1))],
        ]
    );
    accounted(&restored);
}

/// A fixed route of names to two tables, as a router's hash would (but sure to use both).
fn side(name: &[u8]) -> usize {
    name.iter().map(|&b| usize::from(b)).sum::<usize>() % 2
}

#[test]
fn an_image_split_over_two_tables_holds_the_same_state() {
    let rt = runtime();
    let hasher = crate::name_hasher();
    let mut original = ShardTable::new(hasher.clone());
    let _waiting = populate(&mut original, &rt);
    let image = original.take_image();
    let mut halves = [
        ShardTable::new(hasher.clone()),
        ShardTable::new(hasher.clone()),
    ];
    // Each entry on its own, routed by name.
    for held in &image.exclusive {
        let name = LockName::new(&held.name);
        assert!(halves[side(&held.name)].restore_exclusive(held.holder, &name, held.token));
    }
    for shared in &image.shared {
        let name = LockName::new(&shared.name);
        for &(conn, since) in &shared.holders {
            assert!(halves[side(&shared.name)].restore_shared(conn, &name, since));
        }
    }
    let mut waiting = Waiting::default();
    for w in &image.waiters {
        let t = &mut halves[side(&w.name)];
        let name = LockName::new(&w.name);
        let (tx, rx) = oneshot::channel();
        let id = t.restore_waiter(w.conn, w.kind(), &name, w.since, None, tx);
        let task = timer(&rt);
        t.set_wait_timer(
            w.kind(),
            &name,
            id,
            task.abort_handle(),
            deadline_in(w.remaining_ms),
        );
        waiting.answers.insert(w.conn, rx);
        waiting.timers.push(task);
    }
    for limiter in &image.limiters {
        halves[side(&limiter.name)].restore_limiter(limiter);
    }
    for half in &mut halves {
        half.restore_tokens(image.last_token);
        accounted(half);
        assert!(half.exclusive_len() + half.shared_len() > 0, "both used");
    }
    halves[0].add_counts(&image.counts);
    // Restoring what is there already changes nothing.
    let total = |halves: &[ShardTable; 2]| halves[0].memory_used() + halves[1].memory_used();
    let before = total(&halves);
    let held = &image.exclusive[0];
    let name = LockName::new(&held.name);
    assert!(!halves[side(&held.name)].restore_exclusive(held.holder + 1, &name, 1));
    let shared = &image.shared[0];
    let (conn, since) = shared.holders[0];
    let name = LockName::new(&shared.name);
    assert!(!halves[side(&shared.name)].restore_shared(conn, &name, since));
    assert_eq!(total(&halves), before);

    let [mut one, mut two] = halves;
    let (first, second) = (one.take_image(), two.take_image());
    assert_empty(&one);
    assert_empty(&two);
    let merged = TableImage {
        exclusive: [first.exclusive, second.exclusive].concat(),
        shared: [first.shared, second.shared].concat(),
        waiters: [first.waiters, second.waiters].concat(),
        limiters: [first.limiters, second.limiters].concat(),
        last_token: first.last_token.max(second.last_token),
        counts: first.counts,
    };
    assert_eq!(second.counts, CountsImage::default());
    assert_same(image, merged);
}

#[test]
fn any_state_is_taken_whole_and_restored_whole() {
    // A fixed xorshift sequence of everything a table does.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let hasher = crate::name_hasher();
    let mut t = ShardTable::new(hasher.clone());
    let mut receivers = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..5000 {
        let conn = 1 + next(6);
        let name = format!("{}{}", next(12), if next(3) == 0 { LONG } else { "" });
        let kind = if next(2) == 0 {
            WaitKind::Exclusive
        } else {
            WaitKind::Shared { limit: 1 + next(2) }
        };
        match next(10) {
            0 | 1 => {
                apply(&mut t, conn, LockOp::Get, &name);
            }
            2 => {
                apply(&mut t, conn, LockOp::Release, &name);
            }
            3 => {
                apply(&mut t, conn, LockOp::SharedGet, &name);
            }
            4 => {
                apply(&mut t, conn, LockOp::SharedRelease, &name);
            }
            5 => {
                let (tx, rx) = oneshot::channel();
                let lock = LockName::from(name.as_str());
                let hash = t.hash(name.as_bytes());
                if let Some(id) = t.wait(conn, None, kind, hash, &lock, tx) {
                    receivers.push((kind, lock, id));
                }
                answers.push(rx);
            }
            6 => {
                if let Some((kind, lock, id)) = receivers.pop() {
                    t.expire(kind.lock_kind(), &lock, id);
                }
            }
            7 => {
                rl(&mut t, &name, next(3) as u32);
            }
            8 => {
                t.orphan_some(conn, 1 + next(3) as usize, |_| {});
            }
            _ => {
                t.orphan_all(conn);
            }
        }
        announce(&mut t);
    }
    let used = accounted(&t);
    let image = t.take_image();
    assert_empty(&t);
    assert!(!image.exclusive.is_empty() && !image.shared.is_empty());
    assert!(!image.waiters.is_empty() && !image.limiters.is_empty());
    // Waiters with no answer channel are left out, and nothing else.
    let mut without_waiters = ShardTable::new(hasher.clone());
    assert!(without_waiters
        .restore_image(image.clone(), |_| None, |_| None)
        .is_empty());
    assert_eq!(without_waiters.waiters(), 0);
    accounted(&without_waiters);
    let mut expected = image.clone();
    expected.waiters.clear();
    assert_same(expected, without_waiters.take_image());
    let mut restored = ShardTable::new(hasher);
    let mut waiting = Waiting::default();
    restored.restore_image(image.clone(), |_| None, channels(&mut waiting));
    // The connections' entries of those that hold nothing are not carried over.
    assert!(accounted(&restored) <= used);
    assert_same(image, restored.take_image());
}
