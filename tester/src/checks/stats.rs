//! `q`: its form, and that its numbers move with what the tester does. A production server has
//! other clients, so a counter is only required to go up by at least what the tester sent.
//! Compat mode polls, because the original's stats went through a channel and lagged.

use crate::checks::locks::close_all;
use crate::commands::Stats;
use crate::conn::Conn;
use crate::ctx::{Ctx, Poll};
use crate::verdict::{ensure, Verdict};

/// A command word no server knows.
pub const UNKNOWN_COMMAND: &str = "glockd-tester-unknown-command";

/// The keys the original server always printed.
const ORIGINAL_KEYS: [&str; 16] = [
    "command_d",
    "command_dump",
    "command_g",
    "command_i",
    "command_q",
    "command_r",
    "command_sd",
    "command_sg",
    "command_si",
    "command_sr",
    "connections",
    "invalid_commands",
    "locks",
    "orphans",
    "shared_locks",
    "shared_orphans",
];

/// The registry's counters, which the README documents for every command word.
const REGISTRY_KEYS: [&str; 3] = ["command_iam", "command_me", "command_who"];

/// `q` prints sorted `key: value` lines with every documented key.
pub async fn format(ctx: &Ctx) -> Result<(), Verdict> {
    let mut a = ctx.connect().await?;
    let stats = a.stats().await?;
    let extra: &[&str] = if ctx.compat() { &[] } else { &REGISTRY_KEYS };
    let missing: Vec<&str> = ORIGINAL_KEYS
        .iter()
        .chain(extra)
        .copied()
        .filter(|key| !stats.values.contains_key(*key))
        .collect();
    ensure(
        missing.is_empty(),
        "`q`",
        "every documented key",
        format!("{missing:?} missing"),
    )?;
    if !ctx.compat() {
        let mut sorted = stats.order.clone();
        sorted.sort();
        sorted.dedup();
        ensure(
            stats.order == sorted,
            "`q`",
            "keys sorted, each once",
            format!("{:?}", stats.order),
        )?;
    }
    ensure(
        stats.get("connections") >= 1,
        "`q` connections",
        "at least 1 (this one)",
        stats.get("connections"),
    )?;
    a.close().await;
    Ok(())
}

/// Every `command_<word>` counter goes up by at least the number of those commands sent.
pub async fn command_deltas(ctx: &Ctx) -> Result<(), Verdict> {
    let (name, shared) = (ctx.lock_name("stats"), ctx.lock_name("stats-shared"));
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    let before = b.stats().await?;
    a.expect(&format!("g {name}"), 1).await?;
    a.expect(&format!("i {name}"), 1).await?;
    a.expect(&format!("i {name}"), 1).await?;
    a.expect(&format!("r {name}"), 1).await?;
    a.expect(&format!("sg {shared}"), 1).await?;
    a.expect(&format!("si {shared}"), 1).await?;
    a.expect(&format!("sr {shared}"), 1).await?;
    a.me().await?;
    a.stats().await?;
    let sent = [
        ("command_me", 1),
        ("command_g", 1),
        ("command_i", 2),
        ("command_r", 1),
        ("command_sg", 1),
        ("command_si", 1),
        ("command_sr", 1),
        ("command_q", 1),
    ];
    // The README promises exact stats: a `q` sent after a reply reflects that command, so
    // strict mode looks once. The original's lagged, so compat mode polls.
    let timeout = if ctx.compat() {
        ctx.timeout()
    } else {
        std::time::Duration::ZERO
    };
    wait_for_stats(&mut b, timeout, |after| {
        sent.iter().find_map(|&(key, n)| {
            let delta = after.get(key).saturating_sub(before.get(key));
            (delta < n).then(|| {
                Verdict::expected(
                    format!("`q` {key}"),
                    format!("to go up by at least {n}"),
                    format!("+{delta} ({} -> {})", before.get(key), after.get(key)),
                )
            })
        })
    })
    .await?;
    close_all([a, b]).await;
    Ok(())
}

/// `locks`, `shared_locks` and `connections` count at least what the tester holds and has open.
pub async fn gauges(ctx: &Ctx) -> Result<(), Verdict> {
    let (name, shared) = (ctx.lock_name("gauge"), ctx.lock_name("gauge-shared"));
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    a.expect(&format!("g {name}"), 1).await?;
    a.expect(&format!("sg {shared}"), 1).await?;
    let timeout = if ctx.compat() {
        ctx.timeout()
    } else {
        std::time::Duration::ZERO
    };
    wait_for_stats(&mut b, timeout, |stats| {
        [("locks", 1), ("shared_locks", 1), ("connections", 2)]
            .iter()
            .find_map(|&(key, n)| {
                (stats.get(key) < n).then(|| {
                    Verdict::expected(
                        format!("`q` {key}"),
                        format!("at least {n}"),
                        stats.get(key),
                    )
                })
            })
    })
    .await?;
    a.expect(&format!("r {name}"), 1).await?;
    a.expect(&format!("sr {shared}"), 1).await?;
    close_all([a, b]).await;
    Ok(())
}

/// A disconnect that releases one exclusive and one shared lock adds at least 1 to `orphans`
/// and to `shared_orphans`.
pub async fn orphan_counts(ctx: &Ctx) -> Result<(), Verdict> {
    let (name, shared) = (
        ctx.lock_name("orphan-count"),
        ctx.lock_name("orphan-count-shared"),
    );
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    let before = b.stats().await?;
    a.expect(&format!("g {name}"), 1).await?;
    a.expect(&format!("sg {shared}"), 1).await?;
    a.close().await;
    wait_for_stats(&mut b, ctx.timeout(), |after| {
        ["orphans", "shared_orphans"].iter().find_map(|&key| {
            (after.get(key) <= before.get(key)).then(|| {
                Verdict::expected(
                    format!("`q` {key} after a holder disconnected"),
                    format!("to go up within {} ms", ctx.timeout().as_millis()),
                    format!("{} -> {}", before.get(key), after.get(key)),
                )
            })
        })
    })
    .await?;
    b.close().await;
    Ok(())
}

/// An unknown command adds at least 1 to `invalid_commands`. Its reply is not read here (the
/// original sends none; `unknown_command_answered_0` checks the reply): another connection
/// polls `q`.
pub async fn invalid_commands(ctx: &Ctx) -> Result<(), Verdict> {
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    let before = b.stats().await?;
    a.send(&format!("{UNKNOWN_COMMAND} x")).await?;
    wait_for_stats(&mut b, ctx.timeout(), |after| {
        let key = "invalid_commands";
        (after.get(key) <= before.get(key)).then(|| {
            Verdict::expected(
                format!("`q` {key} after `{UNKNOWN_COMMAND} x`"),
                "to go up by at least 1",
                format!("{} -> {}", before.get(key), after.get(key)),
            )
        })
    })
    .await?;
    close_all([a, b]).await;
    Ok(())
}

/// Reads `q` until `problem` finds nothing wrong, for at most `timeout` (zero: look once).
async fn wait_for_stats(
    conn: &mut Conn,
    timeout: std::time::Duration,
    problem: impl Fn(&Stats) -> Option<Verdict>,
) -> Result<(), Verdict> {
    let mut poll = Poll::new(timeout);
    loop {
        let stats = conn.stats().await?;
        match problem(&stats) {
            None => return Ok(()),
            Some(verdict) if !poll.again().await => return Err(verdict),
            Some(_) => {}
        }
    }
}
