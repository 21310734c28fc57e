//! Queues of connections waiting for a lock (`gw`, `sgw`), first come, first served.
//!
//! A waiter is owned by the shard that owns the lock: the shard grants it when the holder
//! releases or is orphaned, and times it out, so a grant and a timeout can never both happen.
//! The waiting connection only holds the receiving end of `reply`; if it goes away, the sender
//! sees it closed and the waiter is skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::holders::Quota;
use crate::name::LockName;
use crate::protocol::Reply;
use crate::{ConnId, NameHasher};

/// Which kind of lock a waiter waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitKind {
    /// `gw`: the exclusive lock.
    Exclusive,
    /// `sgw`: a shared lock, once fewer than `limit` connections hold it.
    Shared { limit: u64 },
}

impl WaitKind {
    pub fn is_shared(self) -> bool {
        matches!(self, WaitKind::Shared { .. })
    }
}

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
    /// The task that times this waiter out; cancelled when the waiter leaves the queue any
    /// other way, so a granted wait does not leave a sleeping task behind for its whole MS.
    pub timer: Option<TimerGuard>,
}

/// Cancels a waiter's timeout task when the waiter is dropped.
pub struct TimerGuard(tokio::task::AbortHandle);

impl Drop for TimerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every wait queue of one shard.
pub struct WaitQueues {
    exclusive: HashMap<LockName, VecDeque<Waiter>, NameHasher>,
    shared: HashMap<LockName, VecDeque<Waiter>, NameHasher>,
    /// Source of waiter ids.
    next_id: u64,
    /// Waiters queued now.
    depth: usize,
}

impl WaitQueues {
    pub fn new(hasher: NameHasher) -> Self {
        WaitQueues {
            exclusive: HashMap::with_hasher(hasher.clone()),
            shared: HashMap::with_hasher(hasher),
            next_id: 1,
            depth: 0,
        }
    }

    fn queues(&mut self, shared: bool) -> &mut HashMap<LockName, VecDeque<Waiter>, NameHasher> {
        if shared {
            &mut self.shared
        } else {
            &mut self.exclusive
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

    /// Adds `waiter` to `name`'s queue at the end `put` says, creating the queue if need be.
    fn enqueue(&mut self, name: &LockName, waiter: Waiter, put: fn(&mut VecDeque<Waiter>, Waiter)) {
        let queue = self.queues(waiter.kind.is_shared());
        match queue.get_mut(name.as_bytes()) {
            Some(waiting) => put(waiting, waiter),
            None => {
                queue.insert(name.clone(), VecDeque::from([waiter]));
            }
        }
        self.depth += 1;
    }

    /// Whether anyone waits for `name`.
    #[inline]
    pub fn has(&self, shared: bool, name: &[u8]) -> bool {
        let queue = if shared {
            &self.shared
        } else {
            &self.exclusive
        };
        !queue.is_empty() && queue.contains_key(name)
    }

    /// The first waiter for `name`.
    pub fn front(&self, shared: bool, name: &[u8]) -> Option<&Waiter> {
        let queue = if shared {
            &self.shared
        } else {
            &self.exclusive
        };
        queue.get(name).and_then(|q| q.front())
    }

    /// Takes the first waiter for `name`.
    pub fn pop_front(&mut self, shared: bool, name: &[u8]) -> Option<Waiter> {
        let queue = self.queues(shared);
        let waiting = queue.get_mut(name)?;
        let waiter = waiting.pop_front();
        if waiting.is_empty() {
            queue.remove(name);
        }
        if waiter.is_some() {
            self.depth -= 1;
        }
        waiter
    }

    /// Takes the waiter `id` out of `name`'s queue, wherever it stands.
    pub fn remove(&mut self, shared: bool, name: &[u8], id: u64) -> Option<Waiter> {
        let queue = self.queues(shared);
        let waiting = queue.get_mut(name)?;
        let at = waiting.iter().position(|w| w.id == id)?;
        let waiter = waiting.remove(at);
        if waiting.is_empty() {
            queue.remove(name);
        }
        if waiter.is_some() {
            self.depth -= 1;
        }
        waiter
    }

    /// Gives waiter `id` the task that will time it out (if it is still queued).
    pub fn set_timer(
        &mut self,
        shared: bool,
        name: &[u8],
        id: u64,
        timer: tokio::task::AbortHandle,
    ) {
        let queue = if shared {
            &mut self.shared
        } else {
            &mut self.exclusive
        };
        match queue
            .get_mut(name)
            .and_then(|q| q.iter_mut().find(|w| w.id == id))
        {
            Some(waiter) => waiter.timer = Some(TimerGuard(timer)),
            None => timer.abort(),
        }
    }

    /// Waiters queued now.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Every waiter for `name` (or for every name), in queue order.
    pub fn iter(
        &self,
        shared: bool,
        name: Option<&[u8]>,
    ) -> Box<dyn Iterator<Item = (&LockName, &Waiter)> + '_> {
        let queue = if shared {
            &self.shared
        } else {
            &self.exclusive
        };
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
