//! The wait workload: groups of connections take turns on one name each, and the run measures
//! the hand-off latency: from the moment a holder's `r NAME` leaves to the moment the next
//! waiter's `1 Got Lock` arrives.
//!
//! Each group is a ring of K connections on one client thread (so its bookkeeping needs no
//! locks and both ends of a hand-off are timed on one clock). Every member starts with
//! `gw MS NAME`; the server grants one and queues the others. The holder releases; the server
//! hands the lock to the first waiter; the former holder, told `1 Released Lock`, queues again
//! with `gw`; and so on, until the run's time or `--requests` budget is up, when the holders
//! release without queueing again and the group drains.
//!
//! A hand-off is only a hand-off if the next waiter was already queued when the release
//! arrived, and the client cannot see the server's queue. So a holder releases only once some
//! other member's `gw` is *settled*: sent before the holder's own grant arrived (a whole round
//! trip through the server earlier: true at once in groups of three or more), or outstanding
//! for at least [`SETTLE`] (groups of two, where the only other member queues again just as the
//! holder is granted). A grant whose `gw` left after the release is counted as a grant but not
//! timed as a hand-off.
//!
//! Mutual exclusion is checked per group: a member is recorded as the holder from its grant's
//! receipt until its release is sent; a grant while another member is recorded is a violation.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::cli::Config;
use crate::conn::DRAIN;
use crate::report::Recorder;
use crate::shared::RunShared;
use crate::wire::{self, Cmd, Outcome, Params, Parsed, Target};

/// How long another member's `gw` must have been outstanding before a holder counts on it
/// being queued, when it was not already sent before the holder's grant (groups of two).
/// A loopback round trip is tens of microseconds; this is long enough to be sure and short
/// enough to keep a pair busy. The runtime's timers have millisecond resolution anyway.
pub const SETTLE: Duration = Duration::from_millis(1);

/// One group of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupPlan {
    /// The key whose name the group takes turns on.
    pub key: u64,
    /// Connections in the group (at least 2).
    pub members: usize,
}

/// Which connections form which group, per client thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// For each client thread, its groups, taking its connections in order.
    threads: Vec<Vec<GroupPlan>>,
}

impl Plan {
    /// The groups of client thread `thread`.
    pub fn thread(&self, thread: usize) -> &[GroupPlan] {
        self.threads.get(thread).map_or(&[], Vec::as_slice)
    }

    /// The number of names in use: one per group.
    pub fn names(&self) -> u64 {
        self.threads.iter().map(|t| t.len() as u64).sum()
    }
}

/// Splits the connections into groups: K = `--conns` / `--keys` (rounded up, at least 2) per
/// group, each group on one client thread, one name per group.
pub fn plan(config: &Config) -> Result<Plan, String> {
    let (conns, threads) = (config.conns, config.threads);
    if conns < 2 * threads {
        return Err(format!(
            "wait needs at least 2 connections per client thread (--conns {conns}, --threads \
             {threads})"
        ));
    }
    let keys = config.keys.count();
    let k = (conns as u64).div_ceil(keys).max(2) as usize;
    let mut next_key = 0;
    let mut plan = Vec::with_capacity(threads);
    for thread in 0..threads {
        // Connections thread, thread + threads, …: as many as run.rs gives this thread.
        let here = conns / threads + usize::from(thread < conns % threads);
        let groups = (here / k).max(1);
        let groups: Vec<GroupPlan> = (0..groups)
            .map(|g| {
                let key = next_key;
                next_key += 1;
                GroupPlan {
                    key,
                    members: here / groups + usize::from(g < here % groups),
                }
            })
            .collect();
        plan.push(groups);
    }
    if next_key > keys {
        return Err(format!(
            "wait needs one name per group: {next_key} groups, but --keys {keys}"
        ));
    }
    Ok(Plan { threads: plan })
}

/// A group's bookkeeping, shared by its members (all on one thread).
struct Group {
    /// The member recorded as holding the lock: from its grant's receipt to its release's send.
    holder: Option<usize>,
    /// When the last release was sent, until a grant consumes it: the start of a hand-off.
    released_at: Option<Instant>,
    /// For each member, since when its `gw` has been outstanding (None: not waiting).
    waiting: Vec<Option<Instant>>,
    /// For each member, whether it has finished (or failed) and will queue no more.
    gone: Vec<bool>,
}

impl Group {
    /// Whether `me`, granted at `granted`, may release at `now` for a true hand-off: some other
    /// member is settled in the queue. Otherwise, when it could be: the earliest settle time.
    fn next_in_line(
        &self,
        me: usize,
        granted: Instant,
        now: Instant,
    ) -> Result<(), Option<Instant>> {
        let mut soonest: Option<Instant> = None;
        for (member, since) in self.waiting.iter().enumerate() {
            let Some(since) = *since else { continue };
            if member == me {
                continue;
            }
            if since < granted || now >= since + SETTLE {
                return Ok(());
            }
            soonest = Some(soonest.map_or(since + SETTLE, |s| s.min(since + SETTLE)));
        }
        Err(soonest)
    }

    /// Whether every member but `me` has finished: nobody will ever queue behind `me`.
    fn alone(&self, me: usize) -> bool {
        self.gone
            .iter()
            .enumerate()
            .all(|(m, &gone)| m == me || gone)
    }
}

/// Where a member is in its turn.
#[derive(Clone, Copy, Debug)]
enum State {
    /// `gw` sent at this time, not yet answered.
    Waiting(Instant),
    /// Holding the lock since this grant arrived.
    Holding(Instant),
    /// `r` sent at this time, not yet answered.
    Releasing(Instant),
    /// Nothing outstanding and nothing more to send.
    Done,
}

/// What every member of this thread's groups works with.
pub struct Ctx {
    /// The run's settings.
    pub config: Rc<Config>,
    /// What all connections of the run share (budget, progress).
    pub run: Arc<RunShared>,
    /// The thread's measurements.
    pub rec: Rc<RefCell<Recorder>>,
    /// When the run's time is up.
    pub end: Instant,
}

/// Runs this thread's groups over `streams` (its connections, in order) until they have all
/// drained. Returns whether the run went on to its deadline.
pub async fn run_thread<S>(groups: &[GroupPlan], streams: Vec<S>, ctx: Rc<Ctx>) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let mut streams = streams.into_iter();
    let mut tasks = Vec::new();
    for plan in groups {
        let group = Rc::new(RefCell::new(Group {
            holder: None,
            released_at: None,
            waiting: vec![None; plan.members],
            gone: vec![false; plan.members],
        }));
        let notify = Rc::new(Notify::new());
        for me in 0..plan.members {
            let Some(stream) = streams.next() else { break };
            let member = Member {
                me,
                key: plan.key,
                group: group.clone(),
                notify: notify.clone(),
                ctx: ctx.clone(),
                params: ctx.config.params(),
            };
            tasks.push(tokio::task::spawn_local(async move {
                let mut stream = stream;
                let result = member.turns(&mut stream).await;
                if let Err(e) = result {
                    member.ctx.rec.borrow_mut().error(|| e);
                }
                // The member lets go of its record before the socket closes (and the server
                // hands its lock on).
                drop(member);
                drop(stream);
            }));
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    Instant::now() >= ctx.end
}

/// One connection of a group.
struct Member {
    /// Its place in the group.
    me: usize,
    /// The group's key, kept here so that messages need not borrow the group.
    key: u64,
    /// The group's bookkeeping.
    group: Rc<RefCell<Group>>,
    /// Woken whenever a member of the group queues or leaves, so a holder waiting for a
    /// settled waiter looks again.
    notify: Rc<Notify>,
    /// The thread's shared context.
    ctx: Rc<Ctx>,
    /// The numbers `gw` carries.
    params: Params,
}

impl Drop for Member {
    /// The member is going away, and its lock with it: it holds nothing and waits for nothing.
    fn drop(&mut self) {
        let mut group = self.group.borrow_mut();
        if group.holder == Some(self.me) {
            group.holder = None;
        }
        group.waiting[self.me] = None;
        group.gone[self.me] = true;
        drop(group);
        self.notify.notify_waiters();
    }
}

impl Member {
    /// Appends `cmd` on the group's name.
    fn encode(&self, cmd: Cmd, out: &mut Vec<u8>) {
        let config = &self.ctx.config;
        wire::encode(
            config.target,
            cmd,
            &config.keys,
            self.key,
            &self.params,
            out,
        );
    }

    /// The run's time or budget is up: release without queueing again.
    fn stopping(&self, now: Instant) -> bool {
        now >= self.ctx.end || self.ctx.run.budget_spent()
    }

    /// Queues for the lock (budget allowing), sending at `now`.
    fn queue(&self, now: Instant, out: &mut Vec<u8>) -> State {
        if self.stopping(now) || !self.ctx.run.claim_one() {
            return State::Done;
        }
        self.encode(Cmd::GetWait, out);
        self.group.borrow_mut().waiting[self.me] = Some(now);
        self.notify.notify_waiters();
        State::Waiting(now)
    }

    /// Takes turns until the run is over and this member has drained.
    async fn turns<S>(&self, stream: &mut S) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut read, mut write) = (Vec::with_capacity(256), Vec::with_capacity(64));
        let mut state = self.queue(Instant::now(), &mut write);
        loop {
            let now = Instant::now();
            let stopping = self.stopping(now);
            let mut wake = if stopping {
                self.ctx.end + DRAIN
            } else {
                self.ctx.end
            };
            if let State::Holding(granted) = state {
                match self.may_release(granted, now, stopping) {
                    Ok(()) => {
                        // From the moment the release leaves, the next waiter may rightly be
                        // granted: this member no longer counts as the holder.
                        let _ = self.ctx.run.claim_one();
                        self.encode(Cmd::Release, &mut write);
                        let mut group = self.group.borrow_mut();
                        if group.holder == Some(self.me) {
                            group.holder = None;
                        }
                        group.released_at = Some(now);
                        state = State::Releasing(now);
                    }
                    Err(Some(at)) => wake = wake.min(at),
                    Err(None) => {}
                }
            }
            if !write.is_empty() {
                stream
                    .write_all(&write)
                    .await
                    .map_err(|e| format!("write failed: {e}"))?;
                write.clear();
            }
            if matches!(state, State::Done) {
                return Ok(());
            }
            if stopping && now >= self.ctx.end + DRAIN {
                return Err(format!(
                    "a reply still missing {DRAIN:?} after the end of the run ({state:?})"
                ));
            }
            // Registered before waiting, so no change by another member is missed (they only
            // run while this task is suspended, and a `Notified` sees every later notification).
            let notified = self.notify.notified();
            read.reserve(256);
            let n = tokio::select! {
                biased;
                n = stream.read_buf(&mut read) => n,
                _ = notified => continue,
                _ = tokio::time::sleep_until(wake.into()) => continue,
            };
            match n {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read failed: {e}")),
            }
            let now = Instant::now();
            let mut at = 0;
            loop {
                match wire::parse(self.ctx.config.target, &read[at..]) {
                    Parsed::Incomplete => break,
                    Parsed::Malformed(what) => return Err(format!("malformed reply: {what}")),
                    Parsed::Reply(raw, used) => {
                        at += used;
                        self.ctx.run.progress.fetch_add(1, Ordering::Relaxed);
                        state = self.on_reply(state, &raw, now, &mut write)?;
                    }
                }
            }
            read.drain(..at);
        }
    }

    /// Whether the holder, granted at `granted`, releases now (`Ok`), or else when it should
    /// look again (`Err(Some(at))`; `Err(None)`: when another member queues).
    fn may_release(
        &self,
        granted: Instant,
        now: Instant,
        stopping: bool,
    ) -> Result<(), Option<Instant>> {
        let held_until = granted + self.ctx.config.think;
        if now < held_until {
            return Err(Some(held_until));
        }
        let group = self.group.borrow();
        if stopping || group.alone(self.me) {
            return Ok(());
        }
        group.next_in_line(self.me, granted, now)
    }

    /// Handles the reply to the one outstanding command; returns the new state.
    fn on_reply(
        &self,
        state: State,
        raw: &wire::Raw<'_>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<State, String> {
        let target: Target = self.ctx.config.target;
        let (cmd, sent) = match state {
            State::Waiting(sent) => (Cmd::GetWait, sent),
            State::Releasing(sent) => (Cmd::Release, sent),
            State::Holding(_) | State::Done => {
                return Err(format!(
                    "a reply with no command outstanding: {}",
                    wire::show_raw(raw)
                ))
            }
        };
        let mut rec = self.ctx.rec.borrow_mut();
        if cmd == Cmd::Release {
            rec.reply(sent, now);
        } else {
            rec.count(now);
        }
        let outcome = wire::classify(target, cmd, raw);
        match (cmd, outcome) {
            (Cmd::GetWait, Some(Outcome::Granted)) => {
                rec.counts.granted += 1;
                let mut group = self.group.borrow_mut();
                group.waiting[self.me] = None;
                if let Some(other) = group.holder.filter(|&h| h != self.me) {
                    rec.counts.violations += 1;
                    let name = self.name();
                    rec.error(|| {
                        format!(
                            "mutual exclusion violated: members {other} and {} of the group on \
                             {name} were both granted it with no release between",
                            self.me
                        )
                    });
                }
                group.holder = Some(self.me);
                if let Some(released) = group.released_at.take() {
                    // Queued before the release left: a hand-off.
                    if sent < released {
                        rec.handoff(released, now);
                    }
                }
                Ok(State::Holding(now))
            }
            (Cmd::GetWait, Some(Outcome::TimedOut)) => {
                let wait_ms = self.params.wait_ms;
                let name = self.name();
                rec.error(|| {
                    format!("gw {wait_ms} {name}: timed out, though its group hands the lock on")
                });
                self.group.borrow_mut().waiting[self.me] = None;
                drop(rec);
                Ok(self.queue(now, out))
            }
            (Cmd::Release, Some(Outcome::Released)) => {
                drop(rec);
                Ok(self.queue(now, out))
            }
            _ => {
                let name = self.name();
                Err(format!(
                    "{cmd:?} {name}: unexpected reply: {}",
                    wire::show_raw(raw)
                ))
            }
        }
    }

    /// The group's lock name, for messages.
    fn name(&self) -> String {
        let mut name = Vec::new();
        self.ctx.config.keys.write_name(self.key, &mut name);
        String::from_utf8_lossy(&name).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn plan_of(line: &str) -> Result<Plan, String> {
        let args =
            crate::Args::try_parse_from(line.split_whitespace()).map_err(|e| e.to_string())?;
        plan(&Config::from_args(args)?)
    }

    #[test]
    fn groups_are_formed_per_thread() {
        // 50 connections, 2 threads, 100 000 keys: pairs.
        let p = plan_of("loadgen --workload wait --conns 50 --threads 2").unwrap();
        assert_eq!(p.names(), 24);
        assert_eq!(p.thread(0).len(), 12);
        assert_eq!(p.thread(0).iter().map(|g| g.members).sum::<usize>(), 25);
        assert!(p.thread(0).iter().all(|g| (2..=3).contains(&g.members)));
        // 48 connections over 16 names: groups of 3, keys 0..16.
        let p = plan_of("loadgen --workload wait --conns 48 --threads 1 --keys 16").unwrap();
        assert_eq!(p.names(), 16);
        assert!(p.thread(0).iter().all(|g| g.members == 3));
        let keys: Vec<u64> = p.thread(0).iter().map(|g| g.key).collect();
        assert_eq!(keys, (0..16).collect::<Vec<_>>());
        // One name: everyone in one group.
        let p = plan_of("loadgen --workload wait --conns 7 --threads 1 --keys 1").unwrap();
        assert_eq!(p.thread(0), &[GroupPlan { key: 0, members: 7 }]);
        assert!(plan_of("loadgen --workload wait --conns 7 --threads 2 --keys 1").is_err());
        assert!(plan_of("loadgen --workload wait --conns 1").is_err());
    }
}
