//! One connection's workload: which command to send next, what each reply must be, and what
//! follows from it.
//!
//! A workload is a sequence of *operations*, each a short chain of commands on one key: churn's
//! operation is `g k`, then `r k` if the lock was granted; ratelimit's is `sg k`, then `sr k`
//! (at once over the limit, else after the think time), or with `--mode sgl` `sgl LIMIT k`, then
//! `sr k` after the think time if a slot was granted, or with `--mode rl` a lone `rl`. In a
//! closed loop a connection keeps `--pipeline` operations going at once; in an open loop it sends
//! one command per tick of its schedule, a pending follow-up first. A connection never runs two operations on one key at
//! once: glockd answers a second `g` of a lock the connection already holds with `1 Got Lock`, so
//! overlapping operations would make correct replies look wrong.

use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasherDefault;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::cli::{Config, Mode, Workload};
use crate::report::Recorder;
pub use crate::shared::RunShared;
use crate::shared::{IdHasher, LocalBudget};
use crate::wire::{self, Cmd, Outcome, Params, Raw};

/// How a connection chooses keys.
#[derive(Clone, Copy, Debug)]
pub enum KeyPlan {
    /// Drawn from the key space (`--dist`).
    Random,
    /// `next`, `next + step`, … below `end`: hold gives every connection its own keys.
    Sequence { next: u64, step: u64, end: u64 },
}

/// A command sent and not yet answered.
struct Pending {
    /// What was sent.
    cmd: Cmd,
    /// On which key.
    key: u64,
    /// When it was sent, or in an open loop when it was scheduled: latency counts from here.
    sent: Instant,
}

/// One connection's workload state.
pub struct Session {
    /// The run's settings.
    config: Rc<Config>,
    /// The numbers commands carry, taken from the settings once.
    params: Params,
    /// What all connections share.
    run: Arc<RunShared>,
    /// This connection's number in the exclusion check.
    me: u64,
    /// Key choices.
    rng: SmallRng,
    /// How keys are chosen.
    plan: KeyPlan,
    /// Sent commands, oldest first: replies come back in this order.
    inflight: VecDeque<Pending>,
    /// Follow-up commands ready to send (a release after a grant).
    ready: VecDeque<(Cmd, u64)>,
    /// Ratelimit: shared locks held until their think time is over, earliest first (one think
    /// time for all, so arrival order is deadline order).
    thinking: VecDeque<(Instant, u64)>,
    /// Operations started and not finished.
    active: usize,
    /// Scratch room for a key's name, to find its shard.
    name: Vec<u8>,
    /// Shard-aware: the shard this connection talks to (connection `index` mod N).
    shard: usize,
    /// Keys of the active operations (needed only when several run at once).
    in_use: Option<HashSet<u64, BuildHasherDefault<IdHasher>>>,
    /// Contention: keys this connection is recorded as holding.
    held: Vec<u64>,
    /// Operations this session may start in all (orphan-storm, hold, idle).
    op_limit: Option<u64>,
    /// Operations started.
    started: u64,
    /// Budget taken from the shared `--requests` counter and not yet spent.
    local_budget: LocalBudget,
    /// No more operations may start (budget or limit reached).
    exhausted: bool,
    /// The run's time is up: send nothing more, only collect replies.
    pub stopping: bool,
}

impl Session {
    /// A session for connection number `index` of the run.
    pub fn new(
        config: Rc<Config>,
        run: Arc<RunShared>,
        index: u64,
        plan: KeyPlan,
        op_limit: Option<u64>,
    ) -> Self {
        let concurrent = match config.workload {
            Workload::OrphanStorm => config.locks_per_conn > 1 && config.pipeline > 1,
            Workload::Hold | Workload::Idle => false,
            _ => config.pipeline > 1 || config.rate.is_some(),
        };
        let me = run.next_conn.fetch_add(1, Ordering::Relaxed);
        let config_shards = config.shard_addrs.len();
        let seed = config.seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ me;
        Session {
            rng: SmallRng::seed_from_u64(seed),
            params: config.params(),
            config,
            run,
            me,
            plan,
            inflight: VecDeque::new(),
            ready: VecDeque::new(),
            thinking: VecDeque::new(),
            active: 0,
            in_use: concurrent.then(HashSet::default),
            name: Vec::new(),
            shard: (index % config_shards.max(1) as u64) as usize,
            held: Vec::new(),
            op_limit,
            started: 0,
            local_budget: LocalBudget::default(),
            exhausted: false,
            stopping: false,
        }
    }

    /// Commands sent and not yet answered.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// True when this session has nothing more to do: every operation it may start has
    /// finished, or the run is over and every reply is in.
    pub fn done(&self) -> bool {
        if self.stopping {
            self.inflight.is_empty()
        } else {
            self.exhausted && self.active == 0
        }
    }

    /// When the next think time ends, if any shared lock is being held.
    pub fn next_think(&self) -> Option<Instant> {
        self.thinking.front().map(|&(at, _)| at)
    }

    /// Takes one command from the `--requests` budget; false when it is spent.
    fn claim(&mut self) -> bool {
        self.local_budget.claim(&self.run)
    }

    /// A random key; shard-aware, one whose name this connection's shard owns (connection i
    /// talks to shard i mod N).
    fn pick_owned(&mut self) -> u64 {
        let config = self.config.clone();
        let shards = config.shard_addrs.len();
        let mut key = config.keys.pick(&mut self.rng);
        if shards <= 1 {
            return key;
        }
        let mine = self.shard;
        // About one try in `shards` succeeds; the bound only guards a key space too small to
        // give this shard any name.
        for _ in 0..64 * shards {
            self.name.clear();
            config.keys.write_name(key, &mut self.name);
            if crate::shards::shard_of(&self.name, shards) == mine {
                break;
            }
            key = config.keys.pick(&mut self.rng);
        }
        key
    }

    /// A key no active operation of this connection uses.
    fn pick_key(&mut self) -> Option<u64> {
        if let KeyPlan::Sequence { next, step, end } = &mut self.plan {
            let key = *next;
            *next += *step;
            return (key < *end).then_some(key);
        }
        if self.in_use.is_none() {
            return Some(self.pick_owned());
        }
        for _ in 0..16 {
            let key = self.pick_owned();
            if self
                .in_use
                .as_mut()
                .is_some_and(|in_use| in_use.insert(key))
            {
                return Some(key);
            }
        }
        let keys = &self.config.keys;
        let Some(in_use) = &mut self.in_use else {
            return None;
        };
        // A hot or small key space: look for a free key from a random start.
        if keys.count() <= 1 << 16 {
            let start = keys.pick(&mut self.rng);
            for step in 0..keys.count() {
                let key = (start + step) % keys.count();
                if in_use.insert(key) {
                    return Some(key);
                }
            }
        }
        None
    }

    /// Starts an operation: its first command and key.
    fn start_op(&mut self) -> Option<(Cmd, u64)> {
        if self.exhausted || self.stopping {
            return None;
        }
        if self.op_limit.is_some_and(|limit| self.started >= limit) || !self.claim() {
            self.exhausted = true;
            return None;
        }
        let Some(key) = self.pick_key() else {
            // Every key is busy on this connection; give the command back and wait.
            self.local_budget.give_back(&self.run);
            return None;
        };
        self.started += 1;
        self.active += 1;
        let cmd = match self.config.workload {
            Workload::Churn | Workload::Contention | Workload::OrphanStorm | Workload::Hold => {
                Cmd::Get
            }
            Workload::Inspect | Workload::Idle => Cmd::Inspect,
            Workload::Ratelimit => match self.config.mode {
                Mode::Sg => Cmd::SharedGet,
                Mode::Sgl => Cmd::SharedGetLimit,
                Mode::Rl => Cmd::RateLimit,
            },
            // Wait runs its own groups (see `wait`), never a session.
            Workload::Wait => Cmd::GetWait,
        };
        Some((cmd, key))
    }

    /// An operation is over.
    fn finish(&mut self, key: u64) {
        if let Some(in_use) = &mut self.in_use {
            in_use.remove(&key);
        }
        self.active -= 1;
    }

    /// Appends a command to `out` and remembers it as in flight since `sent`.
    fn send(&mut self, cmd: Cmd, key: u64, sent: Instant, out: &mut Vec<u8>) {
        if cmd == Cmd::Release && !self.run.holders.is_empty() {
            // From the moment the release leaves, another connection may rightly be granted
            // the lock: this connection no longer counts as its holder.
            self.forget_held(key);
        }
        let (target, keys) = (self.config.target, &self.config.keys);
        wire::encode(target, cmd, keys, key, &self.params, out);
        self.inflight.push_back(Pending { cmd, key, sent });
    }

    fn forget_held(&mut self, key: u64) {
        if let Some(at) = self.held.iter().position(|&k| k == key) {
            self.held.swap_remove(at);
            self.clear_holder(key);
        }
    }

    /// Takes this connection off `key`'s holder record, unless another connection has been
    /// recorded there since (after a violation, the later grant takes the record over).
    fn clear_holder(&self, key: u64) {
        let _ = self.run.holders[key as usize].compare_exchange(
            self.me,
            0,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Moves shared locks whose think time is over to the ready follow-ups.
    fn promote(&mut self, now: Instant) {
        while let Some(&(at, key)) = self.thinking.front() {
            if at > now {
                break;
            }
            self.thinking.pop_front();
            self.ready.push_back((Cmd::SharedRelease, key));
        }
    }

    /// Closed loop: sends ready follow-ups and starts operations up to the pipeline depth.
    pub fn fill_closed(&mut self, now: Instant, out: &mut Vec<u8>) {
        if self.stopping {
            return;
        }
        self.promote(now);
        while let Some((cmd, key)) = self.ready.pop_front() {
            // A follow-up goes out even past the budget: it finishes what was started.
            let _ = self.claim();
            self.send(cmd, key, now, out);
        }
        while self.active < self.config.pipeline {
            match self.start_op() {
                Some((cmd, key)) => self.send(cmd, key, now, out),
                None => break,
            }
        }
    }

    /// Open loop: spends due ticks (scheduled send times), one command each: a ready follow-up
    /// first, else a new operation. Ticks that find nothing to send wait for the next call.
    pub fn fill_open(&mut self, now: Instant, ticks: &mut VecDeque<Instant>, out: &mut Vec<u8>) {
        if self.stopping {
            return;
        }
        self.promote(now);
        while let Some(&tick) = ticks.front() {
            let next = match self.ready.pop_front() {
                Some(follow_up) => {
                    let _ = self.claim();
                    Some(follow_up)
                }
                None => self.start_op(),
            };
            let Some((cmd, key)) = next else { break };
            ticks.pop_front();
            self.send(cmd, key, tick, out);
        }
    }

    /// Handles one reply received at `now`. An error means the reply cannot be matched to a
    /// command at all, so the stream can no longer be trusted.
    pub fn on_reply(
        &mut self,
        raw: &Raw<'_>,
        now: Instant,
        rec: &mut Recorder,
    ) -> Result<(), String> {
        let Some(Pending { cmd, key, sent }) = self.inflight.pop_front() else {
            return Err(format!(
                "a reply with no command outstanding: {}",
                wire::show_raw(raw)
            ));
        };
        rec.reply(sent, now);
        let Some(outcome) = wire::classify(self.config.target, cmd, raw) else {
            rec.error(|| self.describe(cmd, key, "unexpected reply", raw));
            self.finish(key);
            return Ok(());
        };
        match (cmd, outcome) {
            (Cmd::Get, Outcome::Granted) => {
                rec.counts.granted += 1;
                if !self.run.holders.is_empty() {
                    self.check_exclusion(key, rec);
                }
                match self.config.workload {
                    Workload::Churn | Workload::Contention => {
                        self.ready.push_back((Cmd::Release, key))
                    }
                    // Orphan-storm leaves its locks for the server to release; hold keeps them.
                    _ => self.finish(key),
                }
            }
            (Cmd::Get, Outcome::Refused) => {
                rec.counts.refused += 1;
                if self.config.workload == Workload::Hold {
                    rec.error(|| {
                        self.describe(cmd, key, "a lock nobody else takes was refused", raw)
                    });
                }
                self.finish(key);
            }
            (Cmd::SharedGet, Outcome::Count(count)) => {
                if count > self.config.limit {
                    self.ready.push_back((Cmd::SharedRelease, key));
                } else {
                    self.hold_shared(key, now);
                }
            }
            (Cmd::SharedGetLimit, Outcome::Count(count)) => {
                rec.counts.allowed += 1;
                if count > self.config.limit {
                    rec.error(|| {
                        self.describe(cmd, key, "more holders than the limit let in", raw)
                    });
                }
                self.hold_shared(key, now);
            }
            (Cmd::SharedGetLimit, Outcome::Full) => {
                rec.counts.limited += 1;
                self.finish(key);
            }
            (Cmd::RateLimit, Outcome::Rate { allowed, limit, .. }) => {
                if allowed {
                    rec.counts.allowed += 1;
                } else {
                    rec.counts.limited += 1;
                }
                if limit != u64::from(self.config.burst) + 1 {
                    rec.error(|| self.describe(cmd, key, "a limit other than BURST + 1", raw));
                }
                self.finish(key);
            }
            (Cmd::Release | Cmd::SharedRelease, Outcome::NotReleased) => {
                rec.error(|| self.describe(cmd, key, "a lock we held was not released", raw));
                self.finish(key);
            }
            _ => self.finish(key),
        }
        Ok(())
    }

    /// A shared lock was granted at `now`: give it back after the think time.
    fn hold_shared(&mut self, key: u64, now: Instant) {
        if self.config.think.is_zero() {
            self.ready.push_back((Cmd::SharedRelease, key));
        } else {
            self.thinking.push_back((now + self.config.think, key));
        }
    }

    /// Contention: this connection was just told it holds `key`; nobody else may be recorded as
    /// holding it (a holder is recorded from its grant's receipt until its release is sent).
    fn check_exclusion(&mut self, key: u64, rec: &mut Recorder) {
        let slot = &self.run.holders[key as usize];
        if let Err(other) = slot.compare_exchange(0, self.me, Ordering::AcqRel, Ordering::Acquire) {
            rec.counts.violations += 1;
            let mut name = Vec::new();
            self.config.keys.write_name(key, &mut name);
            let me = self.me;
            rec.error(|| {
                format!(
                    "mutual exclusion violated: connections {other} and {me} were both granted {} \
                     with no release between",
                    wire::show(&name)
                )
            });
            slot.store(self.me, Ordering::Release);
        }
        self.held.push(key);
    }

    fn describe(&self, cmd: Cmd, key: u64, what: &str, raw: &Raw<'_>) -> String {
        let mut name = Vec::new();
        self.config.keys.write_name(key, &mut name);
        format!(
            "{cmd:?} {}: {what}: {}",
            String::from_utf8_lossy(&name),
            wire::show_raw(raw)
        )
    }
}

impl Drop for Session {
    /// The connection is going away, and its locks with it: it no longer holds anything.
    fn drop(&mut self) {
        for key in std::mem::take(&mut self.held) {
            self.clear_holder(key);
        }
    }
}

/// An open-loop schedule: one tick every `interval`.
pub struct Schedule {
    /// Time between ticks of this connection.
    pub interval: Duration,
    /// The next tick not yet issued.
    pub next: Instant,
    /// Ticks issued and not yet spent on a command, oldest first.
    pub ticks: VecDeque<Instant>,
}

impl Schedule {
    /// Issues every tick due by `now`.
    pub fn issue(&mut self, now: Instant) {
        while self.next <= now {
            self.ticks.push_back(self.next);
            self.next += self.interval;
        }
    }
}
