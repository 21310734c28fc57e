//! Running one connection's commands: inline on this thread's shard, or batched per shard
//! through the mailboxes, with replies assembled in request order.
//!
//! Commands on lock names whose shard is this thread run inline. The rest are queued per shard
//! and sent as one message per shard when the batch ends, or earlier when a command that must see
//! everything before it (`d`, `q`, `iam`…) comes up. So a pipelining client gets exactly one
//! answer per command, in order, and every command sees the effects of those before it.
//!
//! The connection never keeps its own list of locks: when it ends, for whatever reason, its
//! [`Presence`] guard asks every shard it ever sent a lock command to to orphan its locks, through
//! the same FIFO mailbox as its commands, so a lock granted while it was going away is released
//! too.

use std::rc::Rc;
use std::sync::Arc;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use crate::name::LockName;
use crate::protocol::{self, LockOp, Reply, Request, Verb};
use crate::shard::{
    Admission, BatchDone, Departure, ListKind, Listing, RoutedOp, ShardCore, ShardMsg, WaitRequest,
};
use crate::table::{Quota, WaitKind};
use crate::ConnId;

/// The connection must close: the server is shutting down, or the client left while its
/// command waited.
#[derive(Debug)]
pub struct Gone;

/// What [`Session::step`] did with a line.
pub enum Step {
    /// Answered, or queued for its shard.
    Done,
    /// Must wait: run it with [`Session::run_later`].
    Later(Verb, LockName),
}

/// Tells a waiting command (`gw`) whether its client is still there.
pub trait PeerWatch {
    /// Ready once the client is known to be gone.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()>;
}

/// For callers that cannot watch (the last line at end of input: the client is leaving anyway).
pub struct NoWatch;

impl PeerWatch for NoWatch {
    fn poll_gone(&mut self, _: &mut Context<'_>) -> Poll<()> {
        Poll::Pending
    }
}

/// Where one command's reply comes from.
enum Slot {
    /// Already known.
    Ready(Reply),
    /// The `index`-th reply of the batch sent to `shard`.
    Remote { shard: usize, index: usize },
}

/// A batch being built for one remote shard.
#[derive(Default)]
struct Outgoing {
    ops: Vec<RoutedOp>,
    replies: Vec<Reply>,
    waiting: Option<oneshot::Receiver<BatchDone>>,
}

/// A small set of shard numbers.
struct ShardSet(Vec<u64>);

impl ShardSet {
    fn new(shards: usize) -> Self {
        ShardSet(vec![0; shards.div_ceil(64)])
    }

    #[inline]
    fn insert(&mut self, shard: usize) {
        self.0[shard / 64] |= 1 << (shard % 64);
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(word, bits)| {
            (0..64).filter_map(move |bit| (bits & (1 << bit) != 0).then_some(word * 64 + bit))
        })
    }
}

/// A connection's existence as the server sees it. Dropping it (the connection ended, failed,
/// panicked or was cancelled at shutdown) orphans the connection's locks.
struct Presence {
    conn: ConnId,
    core: Rc<ShardCore>,
    /// Protocol id, kept for `-verbose` logging.
    label: Option<Arc<str>>,
    /// Shards this connection sent a lock command to: only they can hold its locks.
    touched: ShardSet,
    /// Its place under `--max-connections`, given back when it ends.
    _admission: Admission,
}

impl Presence {
    fn open(core: Rc<ShardCore>, id_text: String, admission: Admission) -> Self {
        let shared = &core.shared;
        let conn = shared.next_conn_id();
        let label = shared
            .config
            .verbose
            .then(|| Arc::<str>::from(id_text.as_str()));
        if let Some(label) = &label {
            eprintln!("{label} connected");
        }
        shared.registry.insert(conn, id_text);
        core.cell().connections_opened.add(1);
        core.connection_opened();
        let touched = ShardSet::new(shared.router.shards());
        Presence {
            conn,
            core,
            label,
            touched,
            _admission: admission,
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        let shared = &self.core.shared;
        // The registry record stays until every shard has released this connection's locks
        // (see `Departure`), so listings never show a holder without its id.
        let departure = Arc::new(Departure {
            shared: shared.clone(),
            conn: self.conn,
            label: self.label.clone(),
        });
        for shard in self.touched.iter() {
            // A stopped shard is a server shutting down: nothing left to release.
            let _ = shared.post(
                shard,
                ShardMsg::Orphan {
                    conn: self.conn,
                    departure: departure.clone(),
                },
            );
        }
        self.core.cell().connections_closed.add(1);
        self.core.connection_closed();
        if let Some(label) = &self.label {
            eprintln!("{label} disconnected");
        }
    }
}

/// Runs the commands of one connection.
pub struct Session {
    presence: Presence,
    /// The connection's lock allowance, when `--max-locks-per-conn` is set.
    quota: Option<Arc<Quota>>,
    /// Replies of the current batch that wait on other shards, in request order. Empty when
    /// nothing is pending, which lets local replies go straight to the output.
    slots: Vec<Slot>,
    /// Per shard, the batch being built (unused for this thread's own shard).
    outgoing: Vec<Outgoing>,
    /// Per shard, the replies of the last sent batch.
    results: Vec<Vec<Reply>>,
    /// Commands per verb since the last `record_latency`, when latency is being measured.
    batch_verbs: Option<[u32; Verb::COUNT]>,
}

impl Session {
    pub fn new(core: Rc<ShardCore>, id_text: String, admission: Admission) -> Self {
        let shards = core.shared.router.shards();
        let limit = core.shared.config.max_locks_per_conn;
        let measure = core.shared.measure_latency;
        Session {
            quota: (limit > 0).then(|| Arc::new(Quota::new(limit))),
            presence: Presence::open(core, id_text, admission),
            slots: Vec::new(),
            outgoing: (0..shards).map(|_| Outgoing::default()).collect(),
            results: vec![Vec::new(); shards],
            batch_verbs: measure.then_some([0; Verb::COUNT]),
        }
    }

    pub fn core(&self) -> &ShardCore {
        &self.presence.core
    }

    /// Runs one line, writing its reply to `out` or queueing it behind pending remote replies.
    pub async fn run_line(
        &mut self,
        line: &[u8],
        out: &mut Vec<u8>,
        watch: &mut dyn PeerWatch,
    ) -> Result<(), Gone> {
        match self.step(line, out) {
            Step::Done => Ok(()),
            Step::Later(verb, arg) => self.run_later(verb, arg, out, watch).await,
        }
    }

    /// Runs one line if it needs no waiting: a lock command (the common case, run inline or
    /// queued for its shard), an empty or unknown line, or bad arguments. Anything that must wait
    /// (for earlier commands' replies, or for a lock) comes back as [`Step::Later`] for
    /// [`Self::run_later`]; keeping the common case out of an `async fn` spares it a state
    /// machine per line.
    #[inline]
    pub fn step(&mut self, line: &[u8], out: &mut Vec<u8>) -> Step {
        if let Some(fault) = &self.core().shared.config.panic_on_line {
            if line == fault.as_slice() {
                panic!("fault injected by the panic_on_line setting");
            }
        }
        let (verb, arg) = match protocol::parse(line) {
            Request::Empty => return Step::Done,
            Request::Invalid => {
                self.core().cell().invalid_commands.add(1);
                self.reply(Reply::Invalid, out);
                return Step::Done;
            }
            Request::Command { verb, arg } => (verb, arg),
        };
        self.core().cell().commands[verb.index()].add(1);
        if let Some(counts) = &mut self.batch_verbs {
            counts[verb.index()] += 1;
        }
        // Plain lock commands take the parsed name as it is (no copy); `sgl` and `rl` parse
        // their numbers off it first.
        let (op, name, original) = match verb.lock_op() {
            Some(op) => (op, arg, None),
            None => match self.lock_request(verb, &arg, out) {
                None => return Step::Done, // bad arguments, answered
                Some(None) => return Step::Later(verb, arg),
                Some(Some((op, name))) => (op, name, Some(arg)),
            },
        };
        let (shard, hash) = self.core().shared.router.route(name.as_bytes());
        // A lock allowance is shared by all shards, so with one, commands on different shards
        // are no longer independent (`sr a` must free its unit before `sg b` asks for one): run
        // them in order, batching only within one shard.
        if self.quota.is_some() && self.pending_elsewhere(shard) {
            return Step::Later(verb, original.unwrap_or(name));
        }
        self.run_lock_op(op, name, shard, hash, out);
        Step::Done
    }

    /// The lock operation a verb performs on one name, if it is one: `Some(Some(op))`;
    /// `Some(None)` for every other command; `None` when the arguments were bad (answered).
    #[allow(clippy::option_option)]
    fn lock_request(
        &mut self,
        verb: Verb,
        arg: &LockName,
        out: &mut Vec<u8>,
    ) -> Option<Option<(LockOp, LockName)>> {
        let request = match verb {
            Verb::SharedGetLimit => match protocol::split_number(arg.as_bytes()) {
                Some((limit, name)) if limit <= u64::from(u32::MAX) => {
                    (LockOp::SharedGetLimit(limit as u32), LockName::new(name))
                }
                _ => {
                    self.reply(Reply::Usage(verb), out);
                    return None;
                }
            },
            Verb::RateLimit => match protocol::parse_rate_limit(arg.as_bytes()) {
                Some((name, params)) => (LockOp::RateLimit(params), name),
                None => {
                    self.reply(Reply::Usage(verb), out);
                    return None;
                }
            },
            _ => match verb.lock_op() {
                Some(op) => (op, arg.clone()),
                None => return Some(None),
            },
        };
        Some(Some(request))
    }

    /// The part of a command that waits: what [`Self::step`] handed back.
    pub async fn run_later(
        &mut self,
        verb: Verb,
        arg: LockName,
        out: &mut Vec<u8>,
        watch: &mut dyn PeerWatch,
    ) -> Result<(), Gone> {
        match verb {
            Verb::GetWait | Verb::SharedGetWait => self.run_wait(verb, &arg, out, watch).await,
            _ => {
                // Everything here must see the effects of every command before it.
                self.flush(out).await?;
                match self.lock_request(verb, &arg, out) {
                    Some(Some((op, name))) => {
                        let (shard, hash) = self.core().shared.router.route(name.as_bytes());
                        self.run_lock_op(op, name, shard, hash, out);
                        Ok(())
                    }
                    Some(None) => self.run_global(verb, arg, out).await,
                    None => Ok(()),
                }
            }
        }
    }

    /// Answers bad arguments with the command's usage.
    fn usage(&mut self, verb: Verb, out: &mut Vec<u8>) -> Result<(), Gone> {
        self.reply(Reply::Usage(verb), out);
        Ok(())
    }

    /// `gw MS NAME` / `sgw MS LIMIT NAME`: everything before it is answered first; then the
    /// connection waits (the owning shard decides grant or timeout) while `watch` tells whether
    /// the client is still there. A client that goes away leaves the queue.
    async fn run_wait(
        &mut self,
        verb: Verb,
        arg: &LockName,
        out: &mut Vec<u8>,
        watch: &mut dyn PeerWatch,
    ) -> Result<(), Gone> {
        let max_wait = self.core().shared.config.max_wait_ms;
        let parsed = protocol::split_number(arg.as_bytes()).and_then(|(ms, rest)| {
            let (kind, name) = match verb {
                Verb::SharedGetWait => {
                    let (limit, name) = protocol::split_number(rest)?;
                    (WaitKind::Shared { limit }, name)
                }
                _ => (WaitKind::Exclusive, rest),
            };
            (ms <= max_wait).then(|| (ms, kind, LockName::new(name)))
        });
        let Some((ms, kind, name)) = parsed else {
            return self.usage(verb, out);
        };
        self.flush(out).await?;
        let (shard, hash) = self.core().shared.router.route(name.as_bytes());
        self.presence.touched.insert(shard);
        let conn = self.presence.conn;
        let (reply, answer) = oneshot::channel();
        let request = WaitRequest {
            conn,
            quota: self.quota.clone(),
            kind,
            hash,
            name,
            ms,
            reply,
        };
        if shard == self.core().id {
            self.presence.core.clone().start_wait(request);
        } else if !self.core().shared.post(shard, ShardMsg::Wait(request)) {
            return Err(Gone);
        }
        let mut answer = answer;
        let core = self.presence.core.clone();
        let mut closing = std::pin::pin!(core.closing());
        let decided = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = Pin::new(&mut answer).poll(cx) {
                return Poll::Ready(result.ok());
            }
            // A server shutting down does not keep waiters waiting.
            if core.is_closing() || closing.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            match watch.poll_gone(cx) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match decided {
            Some(reply) => {
                reply.write_to(out);
                Ok(())
            }
            // The client left (dropping `answer` takes it out of the queue), or the server is
            // shutting down.
            None => Err(Gone),
        }
    }

    /// Whether command latency is being measured (the metrics endpoint is on).
    pub fn measures_latency(&self) -> bool {
        self.batch_verbs.is_some()
    }

    /// Records the commands run since the last call as having taken `elapsed` each: the time
    /// from reading their batch to all of its replies being ready, mailbox hops included.
    pub fn record_latency(&mut self, elapsed: std::time::Duration) {
        let Some(counts) = &mut self.batch_verbs else {
            return;
        };
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let cell = self.presence.core.cell();
        for (verb, count) in counts.iter_mut().enumerate() {
            if *count > 0 {
                cell.latency[verb].record(u64::from(*count), ns);
                *count = 0;
            }
        }
    }

    /// Whether replies are pending from a shard other than `shard`. Only used while commands
    /// are kept in order (with a lock allowance), when every pending reply comes from the one
    /// shard of the first.
    fn pending_elsewhere(&self, shard: usize) -> bool {
        match self.slots.first() {
            None => false,
            Some(Slot::Remote { shard: pending, .. }) => *pending != shard,
            Some(Slot::Ready(_)) => true,
        }
    }

    #[inline]
    fn reply(&mut self, reply: Reply, out: &mut Vec<u8>) {
        if self.slots.is_empty() {
            reply.write_to(out);
        } else {
            self.slots.push(Slot::Ready(reply));
        }
    }

    #[inline]
    fn run_lock_op(
        &mut self,
        op: LockOp,
        name: LockName,
        shard: usize,
        hash: u64,
        out: &mut Vec<u8>,
    ) {
        self.presence.touched.insert(shard);
        if shard == self.core().id {
            self.core().cell().local_commands.add(1);
            let reply =
                self.core()
                    .apply(self.presence.conn, self.quota.as_deref(), op, hash, &name);
            self.reply(reply, out);
        } else {
            self.presence.core.cell().remote_commands.add(1);
            let batch = &mut self.outgoing[shard];
            let index = batch.ops.len();
            batch.ops.push(RoutedOp { op, hash, name });
            self.slots.push(Slot::Remote { shard, index });
        }
    }

    /// Sends every queued remote batch, waits for the replies and writes all pending replies to
    /// `out` in request order.
    pub async fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), Gone> {
        if self.slots.is_empty() {
            return Ok(());
        }
        let conn = self.presence.conn;
        let shared = self.presence.core.shared.clone();
        for (shard, batch) in self.outgoing.iter_mut().enumerate() {
            if batch.ops.is_empty() {
                continue;
            }
            let (done, waiting) = oneshot::channel();
            let msg = ShardMsg::Batch {
                conn,
                quota: self.quota.clone(),
                ops: std::mem::take(&mut batch.ops),
                replies: std::mem::take(&mut batch.replies),
                done,
            };
            if !shared.post(shard, msg) {
                return Err(Gone);
            }
            batch.waiting = Some(waiting);
        }
        for (shard, batch) in self.outgoing.iter_mut().enumerate() {
            if let Some(waiting) = batch.waiting.take() {
                let BatchDone { ops, replies } = waiting.await.map_err(|_| Gone)?;
                batch.ops = ops;
                let spent = std::mem::replace(&mut self.results[shard], replies);
                batch.replies = spent;
                batch.replies.clear();
            }
        }
        for slot in self.slots.drain(..) {
            match slot {
                Slot::Ready(reply) => reply.write_to(out),
                Slot::Remote { shard, index } => self.results[shard][index].write_to(out),
            }
        }
        Ok(())
    }

    /// Commands that are not about one lock: listings, stats and the registry.
    async fn run_global(
        &mut self,
        verb: Verb,
        arg: LockName,
        out: &mut Vec<u8>,
    ) -> Result<(), Gone> {
        let shared = self.core().shared.clone();
        let config = &shared.config;
        let conn = self.presence.conn;
        match verb {
            Verb::Stats => shared.stats.snapshot().render(out),
            Verb::Me => shared.registry.write_me(conn, out),
            Verb::Iam if !config.registry => Reply::Disabled.write_to(out),
            Verb::Iam => {
                shared.registry.set_name(conn, arg.as_bytes());
                if let Some(label) = &self.presence.label {
                    eprintln!(
                        "{label} changed their name to '{}'",
                        String::from_utf8_lossy(arg.as_bytes())
                    );
                }
                Reply::RegisteredName.write_to(out);
            }
            Verb::Who if !(config.registry && config.dump) => Reply::Disabled.write_to(out),
            Verb::Who => shared.registry.write_who(arg.as_bytes(), out),
            Verb::Dump | Verb::SharedDump | Verb::FullDump | Verb::Holders if !config.dump => {
                Reply::Disabled.write_to(out)
            }
            Verb::Holders => {
                let name = (!arg.is_empty()).then_some(arg);
                for (name, row) in self.collect(ListKind::Holders, name).await? {
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(&row);
                    out.push(b'\n');
                }
            }
            Verb::Dump | Verb::SharedDump => {
                let shared_locks = verb == Verb::SharedDump;
                let name = (!arg.is_empty()).then_some(arg);
                let kind = if shared_locks {
                    ListKind::Shared { raw: false }
                } else {
                    ListKind::Exclusive { raw: false }
                };
                let rows = self.collect(kind, name).await?;
                for (name, holder) in rows {
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(&holder);
                    out.push(b'\n');
                }
            }
            Verb::FullDump => {
                let shared_locks = arg.as_bytes() == b"shared";
                let kind = if shared_locks {
                    ListKind::Shared { raw: true }
                } else {
                    ListKind::Exclusive { raw: true }
                };
                let rows = self.collect(kind, None).await?;
                write_go_map(&rows, shared_locks, out);
            }
            _ => unreachable!("lock operations are routed, not run here"),
        }
        if matches!(
            verb,
            Verb::Dump | Verb::SharedDump | Verb::FullDump | Verb::Holders | Verb::Who
        ) {
            // A listing can be long: let the other clients of this thread have a turn.
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// Gathers a listing from every shard (or from `name`'s shard), sorted by name, then
    /// holder text, so listings are stable and readable.
    async fn collect(&mut self, kind: ListKind, name: Option<LockName>) -> Result<Listing, Gone> {
        let core = self.presence.core.clone();
        let shared = &core.shared;
        let key = name.map(|n| (shared.router.route(n.as_bytes()), n));
        let targets: Vec<usize> = match &key {
            Some(((shard, _), _)) => vec![*shard],
            None => (0..shared.router.shards()).collect(),
        };
        let key = key.map(|((_, hash), n)| (hash, n));
        let mut rows = Vec::new();
        let mut waiting = Vec::new();
        for shard in targets {
            if shard == core.id {
                rows.extend(core.list(kind, key.as_ref().map(|(h, n)| (*h, n.as_bytes()))));
            } else {
                let (done, rx) = oneshot::channel();
                let name = key.clone();
                if !shared.post(shard, ShardMsg::List { kind, name, done }) {
                    return Err(Gone);
                }
                waiting.push(rx);
            }
        }
        for rx in waiting {
            rows.extend(rx.await.map_err(|_| Gone)?);
        }
        rows.sort_unstable();
        Ok(rows)
    }
}

/// `dump` / `dump shared`: one line in Go's `%v` map syntax, keys sorted, raw connection ids:
/// `map[a:x b:y]`, or for shared locks `map[a:[x y]]`.
fn write_go_map(rows: &[(LockName, Vec<u8>)], shared_locks: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(b"map[");
    let mut previous: Option<&LockName> = None;
    for (name, holder) in rows {
        if previous == Some(name) {
            out.push(b' ');
        } else {
            if previous.is_some() {
                if shared_locks {
                    out.push(b']');
                }
                out.push(b' ');
            }
            out.extend_from_slice(name.as_bytes());
            out.push(b':');
            if shared_locks {
                out.push(b'[');
            }
        }
        out.extend_from_slice(holder);
        previous = Some(name);
    }
    if shared_locks && previous.is_some() {
        out.push(b']');
    }
    out.extend_from_slice(b"]\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_sets_list_their_members() {
        let mut set = ShardSet::new(130);
        for shard in [0, 5, 64, 129] {
            set.insert(shard);
        }
        set.insert(5);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 5, 64, 129]);
    }
}
