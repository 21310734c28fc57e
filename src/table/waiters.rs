//! Queues of connections waiting for a lock (`gw`, `sgw`), first come, first served.
//!
//! A waiter is owned by the shard that owns the lock: the shard grants it when the holder
//! releases or is orphaned, and times it out, so a grant and a timeout can never both happen.
//! The waiting connection only holds the receiving end of `reply`; if it goes away, the sender
//! sees it closed and the waiter is skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::holders::Quota;
use crate::memory::{name_heap, name_heap_of, INDEX_CONTROL};
use crate::name::LockName;
use crate::protocol::{LockKind, Reply, WaitKind};
use crate::{ConnId, NameHasher};

/// One waiting connection.
pub struct Waiter {
    /// Identifies the waiter for its timeout.
    pub id: u64,
    pub conn: ConnId,
    pub kind: WaitKind,
    /// The connection's lock allowance, if limited.
    pub quota: Option<Arc<Quota>>,
    /// When it started waiting (Unix microseconds), for listings.
    pub since: u64,
    /// Where the grant (or the timeout) is answered.
    pub reply: oneshot::Sender<Reply>,
    /// When it times out (set with its timer), so the time it has left can be carried over
    /// a live upgrade.
    pub deadline: Option<Instant>,
    /// The task that times this waiter out; cancelled when the waiter leaves the queue any
    /// other way, so a granted wait does not leave a sleeping task behind for its whole MS.
    pub timer: Option<TimerGuard>,
}

/// `ms` milliseconds from now, or as far ahead as the monotonic clock can count if that is
/// past its end.
pub fn deadline_in(ms: u64) -> Instant {
    let now = Instant::now();
    let mut ahead = Duration::from_millis(ms);
    loop {
        if let Some(deadline) = now.checked_add(ahead) {
            return deadline;
        }
        ahead /= 2;
    }
}

/// Cancels a waiter's timeout task when the waiter is dropped.
pub struct TimerGuard(tokio::task::AbortHandle);

impl Drop for TimerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a waiter costs besides its queue: the waiter itself, its timeout task (tokio's task
/// cell around a `Sleep` and what the task captured, some 300 bytes) and its answer channel.
pub const WAITER_BYTES: u64 = std::mem::size_of::<Waiter>() as u64 + 384;

/// A name's queue, made for its first waiter: its map entry, the queue's first block (four
/// waiters' room, as `VecDeque` grows), and a copy of the name.
pub const QUEUE_BYTES: u64 = (std::mem::size_of::<(LockName, VecDeque<Waiter>)>()
    + 4 * std::mem::size_of::<Waiter>()) as u64
    + INDEX_CONTROL;

/// Every wait queue of one shard.
pub struct WaitQueues {
    exclusive: HashMap<LockName, VecDeque<Waiter>, NameHasher>,
    shared: HashMap<LockName, VecDeque<Waiter>, NameHasher>,
    /// Source of waiter ids.
    next_id: u64,
    /// Waiters queued now.
    depth: usize,
    /// Bytes of the queues and their waiters (see [`WAITER_BYTES`], [`QUEUE_BYTES`]).
    bytes: u64,
}

impl WaitQueues {
    pub fn new(hasher: NameHasher) -> Self {
        WaitQueues {
            exclusive: HashMap::with_hasher(hasher.clone()),
            shared: HashMap::with_hasher(hasher),
            next_id: 1,
            depth: 0,
            bytes: 0,
        }
    }

    fn queues(&self, kind: LockKind) -> &HashMap<LockName, VecDeque<Waiter>, NameHasher> {
        match kind {
            LockKind::Exclusive => &self.exclusive,
            LockKind::Shared => &self.shared,
        }
    }

    fn queues_mut(
        &mut self,
        kind: LockKind,
    ) -> &mut HashMap<LockName, VecDeque<Waiter>, NameHasher> {
        match kind {
            LockKind::Exclusive => &mut self.exclusive,
            LockKind::Shared => &mut self.shared,
        }
    }

    /// A fresh waiter id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Queues `waiter` behind everyone already waiting for `name`.
    pub fn push(&mut self, name: &LockName, waiter: Waiter) {
        self.enqueue(name, waiter, VecDeque::push_back);
    }

    /// Puts `waiter` back at the head of `name`'s queue.
    pub fn push_front(&mut self, name: &LockName, waiter: Waiter) {
        self.enqueue(name, waiter, VecDeque::push_front);
    }

    /// Adds `waiter` to `name`'s queue at the end `put` chooses, making the queue if needed.
    fn enqueue(&mut self, name: &LockName, waiter: Waiter, put: fn(&mut VecDeque<Waiter>, Waiter)) {
        let queue = self.queues_mut(waiter.kind.lock_kind());
        let mut added = WAITER_BYTES;
        match queue.get_mut(name.as_bytes()) {
            Some(waiting) => put(waiting, waiter),
            None => {
                queue.insert(name.clone(), VecDeque::from([waiter]));
                added += QUEUE_BYTES + name_heap(name);
            }
        }
        self.depth += 1;
        self.bytes += added;
    }

    /// What queueing a waiter for `name` would add.
    pub fn cost_of(&self, kind: LockKind, name: &LockName) -> u64 {
        if self.has(kind, name.as_bytes()) {
            WAITER_BYTES
        } else {
            WAITER_BYTES + QUEUE_BYTES + name_heap(name)
        }
    }

    /// Bytes of the queues and their waiters.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What [`Self::bytes`] should be, counted afresh.
    pub fn recount(&self) -> u64 {
        [&self.exclusive, &self.shared]
            .iter()
            .flat_map(|queues| queues.iter())
            .map(|(name, q)| QUEUE_BYTES + name_heap(name) + q.len() as u64 * WAITER_BYTES)
            .sum()
    }

    /// Whether anyone waits for `name`.
    #[inline]
    pub fn has(&self, kind: LockKind, name: &[u8]) -> bool {
        let queue = self.queues(kind);
        !queue.is_empty() && queue.contains_key(name)
    }

    /// The first waiter for `name`.
    pub fn front(&self, kind: LockKind, name: &[u8]) -> Option<&Waiter> {
        self.queues(kind).get(name).and_then(|q| q.front())
    }

    /// Takes the first waiter for `name`.
    pub fn pop_front(&mut self, kind: LockKind, name: &[u8]) -> Option<Waiter> {
        let queue = self.queues_mut(kind);
        let waiting = queue.get_mut(name)?;
        let waiter = waiting.pop_front();
        let mut freed = 0;
        if waiting.is_empty() {
            queue.remove(name);
            freed += QUEUE_BYTES + name_heap_of(name);
        }
        if waiter.is_some() {
            self.depth -= 1;
            freed += WAITER_BYTES;
        }
        self.bytes -= freed;
        waiter
    }

    /// Takes the waiter `id` out of `name`'s queue, wherever it stands.
    pub fn remove(&mut self, kind: LockKind, name: &[u8], id: u64) -> Option<Waiter> {
        let queue = self.queues_mut(kind);
        let waiting = queue.get_mut(name)?;
        let at = waiting.iter().position(|w| w.id == id)?;
        let waiter = waiting.remove(at);
        let mut freed = 0;
        if waiting.is_empty() {
            queue.remove(name);
            freed += QUEUE_BYTES + name_heap_of(name);
        }
        if waiter.is_some() {
            self.depth -= 1;
            freed += WAITER_BYTES;
        }
        self.bytes -= freed;
        waiter
    }

    /// Gives waiter `id` the task that will time it out at `deadline` (if it is still
    /// queued).
    pub fn set_timer(
        &mut self,
        kind: LockKind,
        name: &[u8],
        id: u64,
        timer: tokio::task::AbortHandle,
        deadline: Instant,
    ) {
        match self
            .queues_mut(kind)
            .get_mut(name)
            .and_then(|q| q.iter_mut().find(|w| w.id == id))
        {
            Some(waiter) => {
                waiter.timer = Some(TimerGuard(timer));
                waiter.deadline = Some(deadline);
            }
            None => timer.abort(),
        }
    }

    /// Takes every waiter out, each queue's in order (first to be served first), leaving no
    /// queue. Waiter ids go on counting, so a timeout still in flight for a waiter taken
    /// can never match a later one.
    pub fn take_all(&mut self) -> Vec<(LockName, Waiter)> {
        let fresh = WaitQueues {
            next_id: self.next_id,
            ..WaitQueues::new(self.exclusive.hasher().clone())
        };
        let old = std::mem::replace(self, fresh);
        old.exclusive
            .into_iter()
            .chain(old.shared)
            .flat_map(|(name, queue)| queue.into_iter().map(move |w| (name.clone(), w)))
            .collect()
    }

    /// Waiters queued now.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Every waiter for `name` (or for every name), in queue order.
    pub fn iter(
        &self,
        kind: LockKind,
        name: Option<&[u8]>,
    ) -> Box<dyn Iterator<Item = (&LockName, &Waiter)> + '_> {
        let queue = self.queues(kind);
        match name {
            Some(name) => Box::new(
                queue
                    .get_key_value(name)
                    .into_iter()
                    .flat_map(|(n, q)| q.iter().map(move |w| (n, w))),
            ),
            None => Box::new(
                queue
                    .iter()
                    .flat_map(|(n, q)| q.iter().map(move |w| (n, w))),
            ),
        }
    }
}
