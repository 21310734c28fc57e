//! Names to shards, and messages to shard threads: the layer that carries work between threads.
//! It knows nothing of what a shard does with a message (the message type is a parameter), so
//! the lock table's messages and the connections' life-cycle messages travel the same way.
//!
//! The cost that matters in cross-thread messaging is the wake-up, not the copy: a shard's loop
//! drains every queued message per wake-up ([`drain`]), and senders batch what they can into one
//! message.

use std::cell::RefCell;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_utils::CachePadded;
use tokio::sync::Notify;

use crate::NameHasher;

/// The other side is gone: a stopped shard thread (the server is shutting down), or a client
/// that left while its command was on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// Where a lock name lives.
///
/// Two hashes, for two jobs. The shard comes from a documented, unkeyed function,
/// [`shard_of`] (FNV-1a, 64 bits, of the name's bytes, modulo the shard count), so a
/// shard-aware client can send each name to the thread that owns it; a client that picks names
/// to crowd one shard only makes that shard busy. The tables index names by a keyed hash
/// (random keys per process), so nobody can precompute names that collide in an index.
#[derive(Clone)]
pub struct Router {
    /// The server's one table hasher, keyed at random when the server starts and fixed for its
    /// life.
    hasher: NameHasher,
    /// Number of shards.
    shards: u64,
}

/// The routing function shard-aware clients use: `fnv1a64(name) % shards`. FNV-1a 64:
/// start from 0xcbf29ce484222325; for each byte, xor it in, then multiply by 0x100000001b3
/// (wrapping).
#[inline]
pub fn shard_of(name: &[u8], shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % shards as u64) as usize
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

    /// The owning shard of `name` ([`shard_of`]), and its table hash (computed once here and
    /// reused by the owning shard's index).
    #[inline]
    pub fn route(&self, name: &[u8]) -> (usize, u64) {
        let hash = self.hasher.hash_one(name);
        (shard_of(name, self.shards as usize), hash)
    }

    pub fn shards(&self) -> usize {
        self.shards as usize
    }
}

/// One shard's mailbox: a queue any thread may post to, and what its owner thread needs to
/// know when to look at it.
///
/// A wake-up from another thread costs a system call on both sides (an `eventfd` write, an
/// `epoll` return, often a context switch), and it is only needed when the owner is asleep. So
/// the owner says when it is about to park ([`about_to_park`], run by the runtime right before
/// it blocks) and senders wake it only then; while it runs, it looks at its queue itself: before
/// parking, after every batch of a connection ([`Mailbox::check`]), and while it polls busily.
pub struct Mailbox<M> {
    queue: Mutex<Vec<M>>,
    /// The owner is parked, or about to park: a sender must wake it.
    parked: CachePadded<AtomicBool>,
    /// Wakes the owner's mailbox loop.
    ready: Notify,
    /// The owner has stopped: posts fail.
    closed: AtomicBool,
    /// Wake-ups senders had to send, for the metrics.
    wakes: AtomicU64,
}

impl<M> Mailbox<M> {
    fn new() -> Self {
        Mailbox {
            queue: Mutex::new(Vec::new()),
            parked: CachePadded::new(AtomicBool::new(false)),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            wakes: AtomicU64::new(0),
        }
    }

    // A panic while the queue is locked cannot leave it half-changed (a push or a swap), so a
    // poisoned lock is still safe to use.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<M>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn post(&self, msg: M) -> Result<(), Gone> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Gone);
        }
        self.lock().push(msg);
        // Pairs with the fence in `about_to_park`: either this sees the owner parked, or the
        // owner sees the message before it parks.
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) {
            self.wakes.fetch_add(1, Ordering::Relaxed);
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Wakes the owner's mailbox loop if anything is queued. Called by the owner thread itself,
    /// so the wake-up is a local one (no system call).
    pub fn check(&self) {
        if !self.lock().is_empty() {
            self.ready.notify_one();
        }
    }

    /// Wake-ups senders have had to send so far.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }
}

/// The owner's side of a mailbox: see [`drain`].
pub type Inbox<M> = Arc<Mailbox<M>>;

/// The sending ends of every shard's mailbox.
pub struct Mailboxes<M> {
    boxes: Box<[Arc<Mailbox<M>>]>,
}

impl<M> Mailboxes<M> {
    /// A mailbox per shard, and their inboxes in shard order.
    pub fn new(shards: usize) -> (Self, Vec<Inbox<M>>) {
        let boxes: Box<[Arc<Mailbox<M>>]> = (0..shards).map(|_| Arc::new(Mailbox::new())).collect();
        let inboxes = boxes.to_vec();
        (Mailboxes { boxes }, inboxes)
    }

    /// Posts `msg` to `shard`; `Gone` if that shard has stopped.
    pub fn post(&self, shard: usize, msg: M) -> Result<(), Gone> {
        self.boxes[shard].post(msg)
    }

    /// `shard`'s mailbox.
    pub fn get(&self, shard: usize) -> &Mailbox<M> {
        &self.boxes[shard]
    }

    /// How many shards there are.
    pub fn len(&self) -> usize {
        self.boxes.len()
    }

    /// Never true for a running server; here for completeness beside `len`.
    pub fn is_empty(&self) -> bool {
        self.boxes.is_empty()
    }
}

/// What the runtime's park hooks act on: the mailbox of the shard whose thread this is.
trait Parking {
    fn about_to_park(&self);
    fn unparked(&self);
}

impl<M> Parking for Mailbox<M> {
    fn about_to_park(&self) {
        self.parked.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !self.lock().is_empty() {
            // Mail came in while this thread ran: take it now instead of parking (the local
            // wake-up makes the runtime poll again without blocking).
            self.parked.store(false, Ordering::Relaxed);
            self.ready.notify_one();
        }
    }

    fn unparked(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }
}

thread_local! {
    /// This thread's own mailbox, for the park hooks.
    static OWN: RefCell<Option<Arc<dyn Parking>>> = const { RefCell::new(None) };
}

/// For the runtime's `on_thread_park`: mark this thread's mailbox as needing a wake-up, unless
/// mail is already waiting.
pub fn about_to_park() {
    OWN.with(|own| {
        if let Some(own) = own.borrow().as_ref() {
            own.about_to_park();
        }
    });
}

/// For the runtime's `on_thread_unpark`: this thread runs again and looks at its mailbox itself.
pub fn unparked() {
    OWN.with(|own| {
        if let Some(own) = own.borrow().as_ref() {
            own.unparked();
        }
    });
}

/// What a mailbox loop does after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Closes a mailbox when its loop ends, however it ends.
struct CloseOnDrop<'a, M>(&'a Mailbox<M>);

impl<M> Drop for CloseOnDrop<'_, M> {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
    }
}

/// A shard's mailbox loop, on the thread that owns it: hands every message to `handle`,
/// taking all that are queued per wake-up, until `handle` says stop.
pub async fn drain<M: 'static>(inbox: Inbox<M>, mut handle: impl FnMut(M) -> Flow) {
    OWN.with(|own| *own.borrow_mut() = Some(inbox.clone() as Arc<dyn Parking>));
    let _close = CloseOnDrop(&inbox);
    let mut msgs = Vec::new();
    loop {
        std::mem::swap(&mut *inbox.lock(), &mut msgs);
        if msgs.is_empty() {
            inbox.ready.notified().await;
            continue;
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
    fn the_routing_function_is_plain_fnv1a() {
        // Published FNV-1a 64 values, so clients in any language can check theirs.
        let huge = usize::MAX;
        assert_eq!(
            shard_of(b"a", huge) as u64,
            0xaf63_dc4c_8601_ec8c_u64 % huge as u64
        );
        assert_eq!(shard_of(b"", 7), (0xcbf2_9ce4_8422_2325_u64 % 7) as usize);
        assert_eq!(
            shard_of(b"foobar", 1000),
            (0x85944171f73967e8_u64 % 1000) as usize
        );
        assert_eq!(shard_of(b"anything", 1), 0);
    }

    #[test]
    fn a_stopped_shard_is_gone() {
        let (mailboxes, inboxes) = Mailboxes::<u32>::new(2);
        assert_eq!(mailboxes.post(1, 7), Ok(()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let inbox = inboxes[1].clone();
        let mut seen = Vec::new();
        runtime.block_on(drain(inbox, |msg| {
            seen.push(msg);
            Flow::Stop
        }));
        assert_eq!(seen, vec![7]);
        assert_eq!(mailboxes.post(1, 8), Err(Gone));
        assert_eq!(mailboxes.post(0, 9), Ok(()));
    }

    #[test]
    fn senders_wake_only_a_parked_owner() {
        let (mailboxes, inboxes) = Mailboxes::<u32>::new(1);
        let mailbox = mailboxes.get(0);
        mailboxes.post(0, 1).expect("open");
        assert_eq!(mailbox.wakes(), 0, "a running owner looks itself");
        // The owner finds the mail before parking, and so does not park.
        mailbox.about_to_park();
        assert!(!mailbox.parked.load(Ordering::Relaxed));
        std::mem::take(&mut *inboxes[0].lock());
        mailbox.about_to_park();
        mailboxes.post(0, 2).expect("open");
        assert_eq!(mailbox.wakes(), 1, "a parked owner is woken");
        mailbox.unparked();
        mailboxes.post(0, 3).expect("open");
        assert_eq!(mailbox.wakes(), 1);
    }
}
