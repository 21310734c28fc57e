//! Names to shards, and messages to shard threads: the layer that carries work between threads.
//! It knows nothing of what a shard does with a message (the message type is a parameter), so
//! the lock table's messages and the connections' life-cycle messages travel the same way.
//!
//! The cost that matters in cross-thread messaging is the wake-up, not the copy: a shard's loop
//! drains every queued message per wake-up ([`drain`]), and senders batch what they can into one
//! message.

use tokio::sync::mpsc;

use crate::NameHasher;

/// Messages handled per wake-up of a shard's mailbox loop, at most.
const DRAIN: usize = 256;

/// The other side is gone: a stopped shard thread (the server is shutting down), or a client
/// that left while its command was on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// Where a lock name lives.
#[derive(Clone)]
pub struct Router {
    /// The server's one name hasher, keyed at random when the server starts and fixed for its
    /// life, so a name always lands on the same shard and the shard's table can reuse the hash.
    hasher: NameHasher,
    /// Number of shards.
    shards: u64,
}

impl Router {
    pub fn new(shards: usize, hasher: NameHasher) -> Self {
        Router {
            hasher,
            shards: shards as u64,
        }
    }

    /// The hasher, for tables that must index names with the routing hash.
    pub fn hasher(&self) -> &NameHasher {
        &self.hasher
    }

    /// The owning shard of `name`, and its hash (reused by the table's index).
    ///
    /// The shard comes from the hash's low 32 bits by multiply-shift; the table's index uses the
    /// low bits of the same hash and its tags the top 7 bits, so within a shard the index still
    /// sees well-spread hashes for any table smaller than 2^31 buckets.
    #[inline]
    pub fn route(&self, name: &[u8]) -> (usize, u64) {
        let hash = self.hasher.hash_one(name);
        let shard = ((hash & 0xffff_ffff) * self.shards) >> 32;
        (shard as usize, hash)
    }

    pub fn shards(&self) -> usize {
        self.shards as usize
    }
}

/// The receiving end of one shard's mailbox.
pub type Inbox<M> = mpsc::UnboundedReceiver<M>;

/// The sending ends of every shard's mailbox.
pub struct Mailboxes<M> {
    senders: Box<[mpsc::UnboundedSender<M>]>,
}

impl<M> Mailboxes<M> {
    /// A mailbox per shard, and their inboxes in shard order.
    pub fn new(shards: usize) -> (Self, Vec<Inbox<M>>) {
        let (senders, inboxes): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| mpsc::unbounded_channel()).unzip();
        (
            Mailboxes {
                senders: senders.into(),
            },
            inboxes,
        )
    }

    /// Posts `msg` to `shard`; `Gone` if that shard has stopped.
    pub fn post(&self, shard: usize, msg: M) -> Result<(), Gone> {
        self.senders[shard].send(msg).map_err(|_| Gone)
    }

    /// How many shards there are.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// Never true for a running server; here for completeness beside `len`.
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }
}

/// What a mailbox loop does after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// A shard's mailbox loop: hands every message to `handle`, draining all that are queued per
/// wake-up, until `handle` says stop or every sender is gone.
pub async fn drain<M>(mut inbox: Inbox<M>, mut handle: impl FnMut(M) -> Flow) {
    let mut msgs = Vec::with_capacity(DRAIN);
    loop {
        if inbox.recv_many(&mut msgs, DRAIN).await == 0 {
            return;
        }
        for msg in msgs.drain(..) {
            if handle(msg) == Flow::Stop {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_stable_and_spreads_names() {
        let router = Router::new(4, crate::name_hasher());
        let mut per_shard = [0usize; 4];
        for i in 0..10_000 {
            let name = format!("lock-{i}");
            let (shard, hash) = router.route(name.as_bytes());
            assert_eq!(router.route(name.as_bytes()), (shard, hash));
            per_shard[shard] += 1;
        }
        for count in per_shard {
            assert!((2_000..3_000).contains(&count), "{per_shard:?}");
        }
        assert_eq!(Router::new(1, crate::name_hasher()).route(b"x").0, 0);
    }

    #[test]
    fn a_stopped_shard_is_gone() {
        let (mailboxes, mut inboxes) = Mailboxes::<u32>::new(2);
        assert_eq!(mailboxes.post(1, 7), Ok(()));
        inboxes.truncate(1);
        assert_eq!(mailboxes.post(1, 8), Err(Gone));
        assert_eq!(mailboxes.post(0, 9), Ok(()));
    }
}
