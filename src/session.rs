//! Running one connection's commands: inline on this thread's shard, or batched per shard
//! through the mailboxes, with replies assembled in request order.
//!
//! Commands on lock names whose shard is this thread run inline. The rest are queued per shard
//! and sent as one message per shard when the batch ends, or earlier when a command that must see
//! everything before it (`d`, `q`, `iam`…) comes up. So a pipelining client gets exactly one
//! answer per command, in order, and every command sees the effects of those before it.
//!
//! A request arrives typed (see [`crate::protocol::Request`]); the session only routes it. The
//! connection never keeps its own list of locks: when it ends, for whatever reason, its
//! [`Presence`] guard asks every shard it ever sent a lock command to to orphan its locks, through
//! the same FIFO mailbox as its commands, so a lock granted while it was going away is released
//! too.

use crate::peer::Peer;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use crate::lifecycle::{Admission, Presence};
use crate::name::LockName;
use crate::protocol::{self, ListKind, LockKind, LockOp, Reply, Request, Shape, Verb, WaitKind};
use crate::shard::{
    BatchDone, ConnBatch, Listing, LockMsg, Outgoing, RoutedOp, ShardCore, WaitRequest,
};
use crate::table::Quota;
use crate::users::{AuthResult, Gate, Refusal};

pub use crate::routing::Gone;

/// What [`Session::step`] did with a line.
pub enum Step {
    /// Answered, or queued for its shard.
    Done,
    /// Must wait: run it with [`Session::run_later`].
    Later(Request),
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
struct PendingBatch {
    ops: Vec<RoutedOp>,
    replies: Vec<Reply>,
    waiting: Option<oneshot::Receiver<BatchDone>>,
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
    outgoing: Vec<PendingBatch>,
    /// Per shard, the replies of the last sent batch.
    results: Vec<Vec<Reply>>,
    /// Commands per verb since the last `record_latency`, when latency is being measured.
    batch_verbs: Option<[u32; Verb::COUNT]>,
    /// After `framed`: multi-line replies start with a line counting them.
    framed: bool,
    /// Time since the last `record_latency` spent waiting for locks, left out of it.
    waited: std::time::Duration,
    /// What the connection's door knows of its peer: the door (for the users counters), and
    /// the identity the users file may map to a user.
    peer: Peer,
    /// With a users file: who the connection is and what it may do. None without one, so the
    /// hot path pays one predictable branch for the feature being off (and boxed, so sessions
    /// stay small).
    users: Option<Box<Gate>>,
    /// Closed for `--auth-max-failures` failed `auth`s: its last reply is in the output, and
    /// the connection ends once that is written.
    auth_closed: bool,
    /// Its connection can be carried by a live upgrade (plain TCP and unix sockets).
    carriable: bool,
    /// Stopped for a live upgrade while it waited: where the wait's answer will come.
    parked: Option<oneshot::Receiver<Reply>>,
}

/// What a session hands a live upgrade when its connection is carried.
pub struct HandedOver {
    pub conn: crate::ConnId,
    pub framed: bool,
    pub user: Option<String>,
    pub auth_failures: u32,
    /// The answer of the wait it was in, if it was in one.
    pub answer: Option<oneshot::Receiver<Reply>>,
    pub quota: Option<Arc<Quota>>,
    pub admission: Option<Admission>,
}

impl Session {
    pub fn new(core: Rc<ShardCore>, id_text: String, admission: Admission, peer: Peer) -> Self {
        let shards = core.server.router.shards();
        let limit = core.server.config.max_locks_per_conn;
        let measure = core.server.measure_latency;
        let users = core.server.users.as_ref().map(|directory| {
            let gate = Box::new(Gate::new(directory.clone(), &peer));
            if gate.mapped() {
                core.cell().auth[peer.door.index()][AuthResult::Mapped as usize].add(1);
            }
            gate
        });
        let presence = Presence::open(core, id_text, admission);
        if let Some(subject) = &peer.certificate {
            // The verified certificate's subject is the connection's name from its first
            // command on, in `me` and the listings (`dump` keeps showing raw ids), marked as a
            // certificate's (`cert:…`, a form `iam` refuses) so no other client can pass its
            // locks off as this one's.
            let server = &presence.core.server;
            let max = usize::try_from(server.config.max_name_bytes).unwrap_or(usize::MAX);
            let name = crate::tls::identity::display_name(subject, max);
            server.registry.set_name(presence.conn, name.as_bytes());
        }
        Session {
            quota: (limit > 0).then(|| Arc::new(Quota::new(limit))),
            presence,
            slots: Vec::new(),
            outgoing: (0..shards).map(|_| PendingBatch::default()).collect(),
            results: vec![Vec::new(); shards],
            batch_verbs: measure.then_some([0; Verb::COUNT]),
            framed: false,
            waited: std::time::Duration::ZERO,
            peer,
            users,
            auth_closed: false,
            carriable: false,
            parked: None,
        }
    }

    /// A session carried by a live upgrade: the same connection id, name and user, and the
    /// lock allowance counting what it holds.
    pub fn resume(
        core: Rc<ShardCore>,
        image: &crate::upgrade::ConnImage,
        quota: Option<Arc<Quota>>,
        admission: Admission,
        peer: Peer,
    ) -> Self {
        let shards = core.server.router.shards();
        let measure = core.server.measure_latency;
        let users = core.server.users.as_ref().map(|directory| {
            let mut gate = Box::new(Gate::new(directory.clone(), &peer));
            gate.resume(image.user.as_deref(), image.auth_failures);
            gate
        });
        let limit = core.server.config.max_locks_per_conn;
        let quota = quota.or_else(|| (limit > 0).then(|| Arc::new(Quota::new(limit))));
        let presence = Presence::resume(core, image.conn, &image.id_text, admission);
        Session {
            quota,
            presence,
            slots: Vec::new(),
            outgoing: (0..shards).map(|_| PendingBatch::default()).collect(),
            results: vec![Vec::new(); shards],
            batch_verbs: measure.then_some([0; Verb::COUNT]),
            framed: image.framed,
            waited: std::time::Duration::ZERO,
            peer,
            users,
            auth_closed: false,
            carriable: true,
            parked: None,
        }
    }

    /// Its connection can be carried by a live upgrade: a wait it is in stops for the upgrade
    /// instead of ending the connection.
    pub fn set_carriable(&mut self, carriable: bool) {
        self.carriable = carriable;
    }

    /// Whether a live upgrade stopped it in a wait.
    pub fn is_parked(&self) -> bool {
        self.parked.is_some()
    }

    /// Hands the session to a live upgrade: its locks and registry record stay (nothing is
    /// orphaned), for the successor to take over.
    pub fn hand_over(mut self) -> HandedOver {
        self.presence.handed_over = true;
        let user = self.users.as_mut().and_then(|gate| gate.authenticated());
        let auth_failures = self.users.as_ref().map_or(0, |gate| gate.failures());
        HandedOver {
            conn: self.presence.conn,
            framed: self.framed,
            user,
            auth_failures,
            answer: self.parked.take(),
            quota: self.quota.take(),
            admission: self.presence.take_admission(),
        }
    }

    /// Whether the connection was closed for failed `auth`s: the caller writes what is in its
    /// output (the last reply says so) and ends the connection.
    pub fn closed_by_auth(&self) -> bool {
        self.auth_closed
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
            Step::Later(request) => Box::pin(self.run_later(request, out, watch)).await,
        }
    }

    /// Runs one line if it needs no waiting: a lock command (the common case, run inline or
    /// queued for its shard), an empty or unknown line, bad arguments, or a command its flag
    /// turns off. Anything that must wait (for earlier commands' replies, or for a lock) comes
    /// back as [`Step::Later`] for [`Self::run_later`]; keeping the common case out of an
    /// `async fn` spares it a state machine per line.
    #[inline]
    pub fn step(&mut self, line: &[u8], out: &mut Vec<u8>) -> Step {
        if let Some(fault) = &self.core().server.config.panic_on_line {
            if line == fault.as_slice() {
                panic!("fault injected by the panic_on_line setting");
            }
        }
        let request = protocol::parse(line);
        let Some(verb) = request.verb() else {
            if matches!(request, Request::Invalid) {
                self.core().cell().invalid_commands.add(1);
                self.reply(Reply::Invalid, out);
            }
            return Step::Done;
        };
        self.core().cell().commands[verb.index()].add(1);
        if let Some(counts) = &mut self.batch_verbs {
            counts[verb.index()] += 1;
        }
        if self.users.is_some() {
            if let Some(reply) = self.refuse(&request, verb) {
                self.reply(reply, out);
                return Step::Done;
            }
        }
        let config = &self.core().server.config;
        if !verb.facts().gate.is_open(config.dump, config.registry) {
            self.reply(Reply::Disabled, out);
            return Step::Done;
        }
        match request {
            Request::Usage(verb) => {
                // An `rl` of the right form whose limiter would refill too slowly says so.
                let reply = if verb == Verb::RateLimit && protocol::refill_too_long(line) {
                    Reply::UsageLimit(verb, protocol::MAX_RATE_LIMIT_WINDOW_MS)
                } else {
                    Reply::Usage(verb)
                };
                self.reply(self.core().cell().counted(verb, reply), out)
            }
            Request::Lock { ref name, .. }
            | Request::Wait { ref name, .. }
            | Request::List {
                name: Some(ref name),
                ..
            } if name.len() as u64 > config.max_lock_name_bytes => {
                let reply = self.core().cell().counted(verb, Reply::LockNameTooLong);
                self.reply(reply, out)
            }
            Request::Lock { op, name } => {
                let (shard, hash) = self.core().server.router.route(name.as_bytes());
                // A lock allowance is shared by all shards, so with one, commands on different
                // shards are no longer independent (`sr a` must free its unit before `sg b`
                // asks for one): near the limit, run them in order, batching only within one
                // shard. Far from it no order can make a difference.
                if self
                    .quota
                    .as_ref()
                    .is_some_and(|q| q.may_reach(self.slots.len()))
                    && self.pending_elsewhere(shard)
                {
                    return Step::Later(Request::Lock { op, name });
                }
                self.run_lock_op(op, name, shard, hash, out);
            }
            request => return Step::Later(request),
        }
        Step::Done
    }

    /// With a users file: the reply refusing `request`, counted, if its user may not run it
    /// (or the connection has no user yet).
    #[inline(never)]
    fn refuse(&mut self, request: &Request, verb: Verb) -> Option<Reply> {
        let gate = self.users.as_mut()?;
        let refusal = gate.check(request, verb).err()?;
        let cell = self.presence.core.cell();
        let door = self.peer.door.index();
        Some(match refusal {
            Refusal::AuthRequired => {
                cell.auth_required[door].add(1);
                Reply::AuthRequired
            }
            Refusal::Denied(class) => {
                cell.permission_denied[door][class.index()].add(1);
                Reply::PermissionDenied
            }
        })
    }

    /// `auth USER TOKEN`. A failure is answered only after `--auth-fail-delay-ms` (this
    /// connection waits; the others of its thread run meanwhile), and the
    /// `--auth-max-failures`-th in a row closes the connection.
    async fn authenticate(
        &mut self,
        user: &[u8],
        token: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Gone> {
        let Some(gate) = self.users.as_mut() else {
            Reply::AuthNotConfigured.write_to(out);
            return Ok(());
        };
        let core = self.presence.core.clone();
        let config = &core.server.config;
        let door = self.peer.door.index();
        match gate.authenticate(user, token) {
            Ok(name) => {
                core.cell().auth[door][AuthResult::Success as usize].add(1);
                if let Some(label) = &self.presence.label {
                    tracing::info!(event = "auth", conn = %label, user = %name);
                }
                Reply::Authenticated.write_to(out);
                Ok(())
            }
            Err(failures) => {
                core.cell().auth[door][AuthResult::Failure as usize].add(1);
                if let Some(label) = &self.presence.label {
                    tracing::info!(
                        event = "auth_failed",
                        conn = %label,
                        user = crate::logging::printable(user).as_ref(),
                        failures
                    );
                }
                let delay = std::time::Duration::from_millis(config.auth_fail_delay_ms);
                if !delay.is_zero() && !core.is_closing() {
                    let started = std::time::Instant::now();
                    // Cut short by shutdown only: a live upgrade does not shorten the penalty.
                    let penalty = tokio::time::sleep(delay);
                    tokio::pin!(penalty);
                    loop {
                        tokio::select! {
                            _ = &mut penalty => break,
                            _ = core.conns.stopping() => if core.is_closing() { break },
                        }
                    }
                    // The delay is a penalty, not the command's latency: left out of it, as
                    // lock waits are.
                    self.waited += started.elapsed();
                }
                if failures >= config.auth_max_failures {
                    out.extend_from_slice(protocol::TOO_MANY_AUTH_FAILURES);
                    self.auth_closed = true;
                    return Err(Gone);
                }
                Reply::AuthFailed.write_to(out);
                Ok(())
            }
        }
    }

    /// [`Self::run_later`] with its state on the heap: waits and listings are rare, and their
    /// state would otherwise make every connection's future (idle ones included) bigger.
    pub async fn run_later_boxed(
        &mut self,
        request: Request,
        out: &mut Vec<u8>,
        watch: &mut dyn PeerWatch,
    ) -> Result<(), Gone> {
        Box::pin(self.run_later(request, out, watch)).await
    }

    /// The part of a command that waits: what [`Self::step`] handed back.
    pub async fn run_later(
        &mut self,
        request: Request,
        out: &mut Vec<u8>,
        watch: &mut dyn PeerWatch,
    ) -> Result<(), Gone> {
        if let Request::Wait { ms, kind, name } = request {
            return self.run_wait(ms, kind, name, out, watch).await;
        }
        // Everything here must see the effects of every command before it.
        self.flush(out).await?;
        match request {
            Request::Lock { op, name } => {
                let (shard, hash) = self.core().server.router.route(name.as_bytes());
                self.run_lock_op(op, name, shard, hash, out);
                Ok(())
            }
            request => self.run_global(request, out).await,
        }
    }

    /// `gw MS NAME` / `sgw MS LIMIT NAME`: everything before it is answered first; then the
    /// connection waits (the owning shard decides grant or timeout) while `watch` tells whether
    /// the client is still there. A client that goes away leaves the queue.
    async fn run_wait(
        &mut self,
        ms: u64,
        kind: WaitKind,
        name: LockName,
        out: &mut Vec<u8>,
        watch: &mut dyn PeerWatch,
    ) -> Result<(), Gone> {
        if ms > self.core().server.config.max_wait_ms {
            let verb = match kind {
                WaitKind::Exclusive => Verb::GetWait,
                WaitKind::Shared { .. } => Verb::SharedGetWait,
            };
            let max = self.core().server.config.max_wait_ms;
            let reply = Reply::UsageLimit(verb, max);
            self.reply(self.core().cell().counted(verb, reply), out);
            return Ok(());
        }
        self.flush(out).await?;
        let (shard, hash) = self.core().server.router.route(name.as_bytes());
        self.presence.touched.insert(shard);
        let (reply, answer) = oneshot::channel();
        let request = WaitRequest {
            conn: self.presence.conn,
            quota: self.quota.clone(),
            kind,
            hash,
            name,
            ms,
            reply,
        };
        let core = self.presence.core.clone();
        let asked = std::time::Instant::now();
        if shard == core.id {
            core.start_wait(request);
        } else {
            core.server.post_locks(shard, LockMsg::Wait(request))?;
        }
        // A server shutting down does not keep waiters waiting, nor leave them unanswered: the
        // owning shard answers every waiter `0 Timed Out` when shutdown begins (and any wait
        // that comes later, unless it can be granted at once), so the wait ends with an answer
        // and the commands behind it still run. Should the owning shard's thread stop first
        // (the shutdown grace is over), the answer's channel closes.
        match self.answer_of(answer, watch).await {
            Some(reply) => {
                self.waited += core.cell().waited(kind, reply, asked);
                reply.write_to(out);
                Ok(())
            }
            // The client left (dropping `answer` takes it out of the queue), or the owning
            // shard stopped at the end of shutdown's grace.
            None => Err(Gone),
        }
    }

    /// Waits for a wait's answer while `watch` tells whether the client is still there. None:
    /// the client left, or a live upgrade stopped the wait: a carried connection keeps the
    /// answer's channel for its successor (see [`Self::is_parked`]); another one ends.
    async fn answer_of(
        &mut self,
        mut answer: oneshot::Receiver<Reply>,
        watch: &mut dyn PeerWatch,
    ) -> Option<Reply> {
        let core = self.presence.core.clone();
        let mut stopping = std::pin::pin!(core.conns.stopping());
        let mut frozen = false;
        let decided = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = Pin::new(&mut answer).poll(cx) {
                return Poll::Ready(result.ok());
            }
            // Registers for the wake-up; shutdown itself answers the waiter (timed out).
            let _ = stopping.as_mut().poll(cx);
            if core.conns.is_freezing() {
                frozen = true;
                return Poll::Ready(None);
            }
            match watch.poll_gone(cx) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        if frozen && self.carriable {
            self.parked = Some(answer);
        } else if frozen {
            // Not carried: answered as at shutdown, so the commands behind the wait still
            // run before the connection closes (leaving, it leaves the queue too).
            return Some(Reply::TimedOut);
        }
        decided
    }

    /// A carried connection that was in a wait: waits for its answer (its waiter was queued
    /// again in the same place) and writes it.
    pub async fn resume_wait(
        &mut self,
        answer: oneshot::Receiver<Reply>,
        out: &mut Vec<u8>,
        watch: &mut dyn PeerWatch,
    ) -> Result<(), Gone> {
        match self.answer_of(answer, watch).await {
            Some(reply) => {
                reply.write_to(out);
                Ok(())
            }
            None => Err(Gone),
        }
    }

    /// Whether command latency is being measured (the metrics endpoint is on).
    pub fn measures_latency(&self) -> bool {
        self.batch_verbs.is_some()
    }

    /// Records the commands run since the last call as having taken `elapsed` each: the time
    /// from reading their batch to all of its replies being ready, mailbox hops included, and
    /// time spent waiting for locks left out.
    pub fn record_latency(&mut self, elapsed: std::time::Duration) {
        let Some(counts) = &mut self.batch_verbs else {
            return;
        };
        let elapsed = elapsed.saturating_sub(std::mem::take(&mut self.waited));
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
        let core = &self.presence.core;
        for (shard, batch) in self.outgoing.iter_mut().enumerate() {
            if batch.ops.is_empty() {
                continue;
            }
            let (done, waiting) = oneshot::channel();
            let batch_out = ConnBatch {
                conn,
                quota: self.quota.clone(),
                ops: std::mem::take(&mut batch.ops),
                replies: std::mem::take(&mut batch.replies),
                done,
            };
            core.send_later(shard, Outgoing::Ops(batch_out));
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

    /// Commands that are not about one lock: listings, stats and the registry. Runs after every
    /// earlier command of the connection is answered.
    async fn run_global(&mut self, request: Request, out: &mut Vec<u8>) -> Result<(), Gone> {
        let framed = self.framed
            && request
                .verb()
                .is_some_and(|verb| verb.facts().shape == Shape::Lines);
        if !framed {
            return self.answer_global(request, out).await;
        }
        let mut lines = Vec::new();
        self.answer_global(request, &mut lines).await?;
        protocol::write_framed(&lines, out);
        Ok(())
    }

    /// What [`Self::run_global`] answers, in the original (unframed) form.
    async fn answer_global(&mut self, request: Request, out: &mut Vec<u8>) -> Result<(), Gone> {
        let server = self.core().server.clone();
        let conn = self.presence.conn;
        match request {
            Request::Stats => server.stats.snapshot().render(out),
            Request::Framed => {
                self.framed = true;
                Reply::Framed.write_to(out)
            }
            Request::Shards => {
                protocol::write_shards(server.router.shards(), &server.shard_ports, out)
            }
            Request::Me => server.registry.write_me(conn, out),
            // A client certificate's identity is vouched for by the CA; the client cannot
            // trade it for a name of its choosing.
            Request::Iam(_) if self.peer.certificate.is_some() => {
                Reply::NameFromCertificate.write_to(out)
            }
            Request::Iam(name) if name.len() as u64 > server.config.max_name_bytes => {
                Reply::NameTooLong.write_to(out)
            }
            Request::Iam(name) if !crate::registry::is_printable_name(name.as_bytes()) => {
                Reply::NameNotPrintable.write_to(out)
            }
            Request::Iam(name) if crate::registry::looks_like_conn_id(name.as_bytes()) => {
                Reply::NameLooksLikeId.write_to(out)
            }
            Request::Iam(name) => {
                if !server.registry.set_name(conn, name.as_bytes()) {
                    self.core().cell().iam_out_of_memory.add(1);
                    Reply::OutOfMemory.write_to(out);
                    return Ok(());
                }
                if let Some(label) = &self.presence.label {
                    tracing::info!(
                        event = "iam",
                        conn = %label,
                        name = crate::logging::printable(name.as_bytes()).as_ref()
                    );
                }
                Reply::RegisteredName.write_to(out);
            }
            Request::Auth { user, token } => {
                return self.authenticate(&user, token.expose(), out).await;
            }
            Request::Who(name) => {
                let name = name.as_ref().map_or(&[][..], |n| n.as_bytes());
                match self.users.as_mut() {
                    None => server.registry.write_who(name, &mut |_| true, out),
                    Some(gate) => server
                        .registry
                        .write_who(name, &mut |n| gate.may_see(n), out),
                }
                // A listing can be long: let the other clients of this thread have a turn.
                self.presence.core.pause().await;
            }
            Request::List { kind, name } => {
                let mut rows = self.collect(kind, name).await?;
                if let Some(gate) = self.users.as_mut() {
                    rows.retain(|(name, _)| gate.may_see(name.as_bytes()));
                }
                // Sorting and writing a big listing takes time: do it off the shard threads,
                // so the other clients of this thread are not kept waiting meanwhile.
                let listing = if rows.len() > RENDER_INLINE_ROWS {
                    tokio::task::spawn_blocking(move || render_listing(kind, rows))
                        .await
                        .map_err(|_| Gone)?
                } else {
                    render_listing(kind, rows)
                };
                if out.is_empty() {
                    *out = listing;
                } else {
                    out.extend_from_slice(&listing);
                }
                self.presence.core.pause().await;
            }
            // Answered or routed by `step` and `run_later` before they come here.
            Request::Empty
            | Request::Invalid
            | Request::Usage(_)
            | Request::Lock { .. }
            | Request::Wait { .. } => {}
        }
        Ok(())
    }

    /// Gathers a listing from every shard (or from `name`'s shard), unsorted.
    async fn collect(&mut self, kind: ListKind, name: Option<LockName>) -> Result<Listing, Gone> {
        let core = self.presence.core.clone();
        let server = &core.server;
        let key = name.map(|n| (server.router.route(n.as_bytes()), n));
        let targets: Vec<usize> = match &key {
            Some(((shard, _), _)) => vec![*shard],
            None => (0..server.router.shards()).collect(),
        };
        let key = key.map(|((_, hash), n)| (hash, n));
        let targets_local = targets.contains(&core.id);
        let mut rows = Vec::new();
        let mut waiting = Vec::new();
        for &shard in &targets {
            if shard != core.id {
                let (done, rx) = oneshot::channel();
                let name = key.clone();
                server.post_locks(shard, LockMsg::List { kind, name, done })?;
                waiting.push(rx);
            }
        }
        if targets_local {
            rows.extend(core.clone().list(kind, key).await);
        }
        for rx in waiting {
            rows.extend(rx.await.map_err(|_| Gone)?);
        }
        Ok(rows)
    }
}

/// Listings with more rows than this are sorted and written on a blocking thread.
const RENDER_INLINE_ROWS: usize = 4096;

/// A listing's bytes: rows sorted by name, then holder text, so listings are stable and
/// readable; a name seen twice by a scan of a changing table (released and taken again while
/// it was listed) is shown once.
fn render_listing(kind: ListKind, mut rows: Listing) -> Vec<u8> {
    rows.sort_unstable();
    let mut out = Vec::new();
    match kind {
        ListKind::Locks {
            kind: LockKind::Exclusive,
            raw,
        } => {
            rows.dedup_by(|later, earlier| later.0 == earlier.0);
            if raw {
                protocol::write_go_map(&rows, false, &mut out);
            } else {
                protocol::write_rows(&rows, &mut out);
            }
        }
        ListKind::Locks {
            kind: LockKind::Shared,
            raw: true,
        } => protocol::write_go_map(&rows, true, &mut out),
        _ => protocol::write_rows(&rows, &mut out),
    }
    out
}
