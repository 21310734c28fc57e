//! `GET /healthz`: whether every shard thread is serving, by a round trip through each
//! shard's mailbox.
//!
//! A process that accepts connections is not necessarily healthy: a shard thread stuck in a
//! long operation (or dead) leaves every lock it owns unanswered while its listener looks fine.
//! So the check posts a ping to every shard's mailbox, behind whatever that shard has queued,
//! and succeeds only when all of them answer within the deadline.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::shard::{LockMsg, ServerState};

/// How long every shard has to answer, unless the request says (`?timeout_ms=N`). Below the
/// one second most probes give up after, so that a slow shard gets a 503 with a reason rather
/// than a probe timeout without one.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(500);

/// The longest deadline a request may ask for.
const MAX_DEADLINE: Duration = Duration::from_secs(60);

/// The outcome of one check: whether every shard answered, and a line saying so.
pub struct Health {
    pub healthy: bool,
    pub text: String,
}

/// The deadline a `/healthz` query string asks for (`timeout_ms=N`), else the default.
pub fn deadline_from_query(query: &[u8]) -> Duration {
    query
        .split(|&b| b == b'&')
        .filter_map(|pair| pair.strip_prefix(b"timeout_ms="))
        .filter_map(|ms| std::str::from_utf8(ms).ok()?.parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms).min(MAX_DEADLINE))
        .next_back()
        .unwrap_or(DEFAULT_DEADLINE)
}

/// Pings every shard at once and waits up to `deadline` for all of them.
pub async fn check(server: &ServerState, deadline: Duration) -> Health {
    let started = Instant::now();
    let until = tokio::time::Instant::now() + deadline;
    let shards = server.mailboxes.len();
    let mut pending = Vec::with_capacity(shards);
    for shard in 0..shards {
        let (done, answered) = oneshot::channel();
        // A shard that cannot be posted to has stopped: it never answers.
        let answered = server
            .post_locks(shard, LockMsg::Ping(done))
            .ok()
            .map(|()| answered);
        pending.push(answered);
    }
    let mut silent = Vec::new();
    for (shard, answered) in pending.into_iter().enumerate() {
        let answered = match answered {
            Some(answered) => matches!(tokio::time::timeout_at(until, answered).await, Ok(Ok(()))),
            None => false,
        };
        if !answered {
            silent.push(shard);
        }
    }
    let took = started.elapsed().as_secs_f64() * 1e3;
    let mut text = String::new();
    if silent.is_empty() {
        let _ = writeln!(text, "ok: {shards} shards answered in {took:.3} ms");
    } else {
        let list: Vec<String> = silent.iter().map(usize::to_string).collect();
        let _ = writeln!(
            text,
            "unhealthy: shard {} of {shards} did not answer within {} ms",
            list.join(", "),
            deadline.as_millis()
        );
    }
    Health {
        healthy: silent.is_empty(),
        text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fencing::{Fencing, TimeSource};
    use crate::routing::Mailboxes;
    use crate::shard::ShardMsg;

    fn state(shards: usize) -> (ServerState, Vec<crate::routing::Inbox<ShardMsg>>) {
        let (mailboxes, inboxes) = Mailboxes::new(shards);
        let fencing = Fencing::unbounded(TimeSource::System);
        let config = crate::Config::default();
        (
            ServerState::new(config, mailboxes, false, fencing, Vec::new()),
            inboxes,
        )
    }

    /// Answers every ping that reaches `inbox`, as a shard's loop does.
    async fn answer_pings(inbox: crate::routing::Inbox<ShardMsg>) {
        crate::routing::drain(inbox, |msg| {
            if let ShardMsg::Locks(LockMsg::Ping(done)) = msg {
                let _ = done.send(());
            }
            crate::routing::Flow::Continue
        })
        .await;
    }

    #[tokio::test]
    async fn healthy_when_every_shard_answers() {
        let (server, inboxes) = state(3);
        for inbox in inboxes {
            tokio::spawn(answer_pings(inbox));
        }
        let health = check(&server, Duration::from_secs(5)).await;
        assert!(health.healthy, "{}", health.text);
        assert!(
            health.text.starts_with("ok: 3 shards answered in "),
            "{}",
            health.text
        );
    }

    #[tokio::test]
    async fn unhealthy_when_a_shard_is_stuck_or_stopped() {
        let (server, mut inboxes) = state(3);
        // Shard 2's loop is gone and shard 1 never reads its mailbox; shard 0 answers.
        inboxes.truncate(2);
        let stuck = inboxes.pop();
        tokio::spawn(answer_pings(inboxes.remove(0)));
        let health = check(&server, Duration::from_millis(50)).await;
        assert!(!health.healthy);
        assert_eq!(
            health.text,
            "unhealthy: shard 1, 2 of 3 did not answer within 50 ms\n"
        );
        drop(stuck);
    }

    #[test]
    fn the_deadline_comes_from_the_query_within_bounds() {
        assert_eq!(deadline_from_query(b""), DEFAULT_DEADLINE);
        assert_eq!(
            deadline_from_query(b"timeout_ms=20"),
            Duration::from_millis(20)
        );
        assert_eq!(
            deadline_from_query(b"x=1&timeout_ms=7"),
            Duration::from_millis(7)
        );
        assert_eq!(deadline_from_query(b"timeout_ms=x"), DEFAULT_DEADLINE);
        assert_eq!(deadline_from_query(b"timeout_ms=99999999"), MAX_DEADLINE);
    }
}
