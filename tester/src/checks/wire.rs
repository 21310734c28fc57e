//! The wire: reaching the server at all, pipelining, unknown commands, empty lines, and the
//! closing proof that the run left nothing held.

use crate::checks::listings::rows_text;
use crate::checks::locks::close_all;
use crate::checks::stats::UNKNOWN_COMMAND;
use crate::commands::{reply_code, settle};
use crate::conn::label;
use crate::ctx::{Ctx, Poll};
use crate::verdict::{ensure, quoted, Verdict};

/// Commands in the pipelining check: enough to span several of the server's reads and
/// batches, few enough to be harmless.
const PIPELINE_ROUNDS: usize = 16;

/// The server accepts a connection and answers a command.
pub async fn connect(ctx: &Ctx) -> Result<(), Verdict> {
    let mut a = ctx.connect().await?;
    let line = format!("i {}", ctx.marker());
    let reply = a.command(&line).await?;
    // Its integer is 0 like the answer sought, but nothing else would run.
    if reply.starts_with("0 Auth Required") {
        return Err(Verdict::fail(format!(
            "{} answered {reply:?}: the server requires auth (give --auth USER:TOKEN)",
            label(&line)
        )));
    }
    let code = a.parse_reply(&line, &reply)?;
    ensure(code == 0, label(&line), 0, quoted(&reply))?;
    a.close().await;
    Ok(())
}

/// With `--expect-auth`: a connection that has not authenticated is refused, and refused
/// again after a wrong token.
pub async fn auth_required(ctx: &Ctx) -> Result<(), Verdict> {
    let mut a = ctx.connect_unauthenticated().await?;
    let line = format!("i {}", ctx.marker());
    let reply = a.command(&line).await?;
    ensure(
        reply == "0 Auth Required",
        format!("{} before `auth`", label(&line)),
        quoted("0 Auth Required"),
        quoted(&reply),
    )?;
    a.send("auth glockd-tester-nobody wrong-token").await?;
    let reply = a.read_line("`auth` with a wrong token").await?;
    ensure(
        reply.starts_with("0 "),
        "`auth` with a wrong token",
        "a reply starting with 0",
        quoted(&reply),
    )?;
    let reply = a.command(&line).await?;
    ensure(
        reply == "0 Auth Required",
        format!("{} after a failed `auth`", label(&line)),
        quoted("0 Auth Required"),
        quoted(&reply),
    )?;
    a.close().await;
    Ok(())
}

/// Many commands in one write get one reply each, in order, each seeing the ones before it.
/// Over the websocket door the write is one message of newline-separated commands, and each
/// reply must be a message of its own.
pub async fn pipelining_in_order(ctx: &Ctx) -> Result<(), Verdict> {
    ctx.strict_only("the original lost every line after the first in one read")?;
    let (name, shared) = (ctx.lock_name("pipeline"), ctx.lock_name("pipeline-shared"));
    let mut script: Vec<(String, u64)> = Vec::new();
    for _ in 0..PIPELINE_ROUNDS {
        script.push((format!("g {name}"), 1));
        script.push((format!("i {name}"), 1));
        script.push((format!("r {name}"), 1));
        script.push((format!("i {name}"), 0));
    }
    script.push((format!("sg {shared}"), 1));
    script.push((format!("si {shared}"), 1));
    script.push((format!("sr {shared}"), 1));
    script.push((format!("si {shared}"), 0));
    let bytes: String = script.iter().map(|(line, _)| format!("{line}\n")).collect();
    let mut a = ctx.connect().await?;
    a.send_raw(bytes.as_bytes()).await?;
    let total = script.len();
    for (at, (line, want)) in script.iter().enumerate() {
        let what = format!("reply {} of {total} (to {})", at + 1, label(line));
        let reply = a.read_line(&what).await?;
        let code = a.parse_reply(line, &reply)?;
        ensure(code == *want, what, want, quoted(&reply))?;
    }
    a.close().await;
    Ok(())
}

/// `g NAME` and `d NAME` in one write: the listing already shows the lock. Over the websocket
/// door the write is one message, answered by one message per command.
pub async fn pipelining_get_then_list(ctx: &Ctx) -> Result<(), Verdict> {
    ctx.strict_only("the original lost every line after the first in one read")?;
    let name = ctx.lock_name("pipeline-d");
    let mut a = ctx.connect().await?;
    let id = a.holder().await?;
    a.send_raw(format!("g {name}\nd {name}\ni {}\n", ctx.marker()).as_bytes())
        .await?;
    let reply = a.read_line(&format!("`g {name}`")).await?;
    let code = a.parse_reply(&format!("g {name}"), &reply)?;
    ensure(code == 1, format!("`g {name}`"), 1, quoted(&reply))?;
    let rows = a.listing_rows(&format!("`d {name}`"), 1).await?;
    let want = vec![format!("{name}: {id}")];
    ensure(
        rows == want,
        format!("`d {name}` in the same write as `g {name}`"),
        rows_text(&want),
        rows_text(&rows),
    )?;
    a.expect(&format!("r {name}"), 1).await?;
    a.close().await;
    Ok(())
}

/// An unknown command gets a one-line reply starting with `0`, and the connection goes on.
pub async fn unknown_command(ctx: &Ctx) -> Result<(), Verdict> {
    ctx.strict_only("the original answers nothing to an unknown command")?;
    let mut a = ctx.connect().await?;
    let line = format!("{UNKNOWN_COMMAND} x");
    let reply = a.command(&line).await?;
    ensure(
        reply_code(&reply) == Some(0),
        label(&line),
        "a reply starting with `0`",
        quoted(&reply),
    )?;
    a.expect(&format!("i {}", ctx.marker()), 0).await?;
    a.close().await;
    Ok(())
}

/// A line of nothing but whitespace gets no reply at all (over the websocket door: a message of
/// nothing but whitespace gets no message back).
pub async fn empty_line(ctx: &Ctx) -> Result<(), Verdict> {
    ctx.strict_only("the original counted an empty line as an invalid command")?;
    let name = ctx.lock_name("empty-line");
    let mut a = ctx.connect().await?;
    a.expect(&format!("g {name}"), 1).await?;
    a.send_raw(b" \t\r\n").await?;
    // Give the line a moment to be read on its own, so that a server that merely mishandles
    // pipelined lines fails the pipelining checks, not this one.
    tokio::time::sleep(settle(ctx.timeout())).await;
    // Had the empty line been answered, that reply would come before this one's `1`.
    a.expect(&format!("i {name}"), 1).await?;
    a.expect(&format!("r {name}"), 1).await?;
    a.close().await;
    Ok(())
}

/// Every lock name the run used is free again, exclusive and shared: the tester leaves nothing
/// behind (polled, since the server releases closed connections' locks in its own time).
pub async fn cleanup(ctx: &Ctx) -> Result<(), Verdict> {
    let mut a = ctx.connect().await?;
    let mut pending = ctx.lock_names();
    let mut poll = Poll::new(ctx.timeout());
    loop {
        let mut held = Vec::new();
        for name in pending {
            let exclusive = a.code(&format!("i {name}")).await?;
            let shared = a.code(&format!("si {name}")).await?;
            if exclusive != 0 || shared != 0 {
                held.push(name);
            }
        }
        if held.is_empty() {
            break;
        }
        if !poll.again().await {
            return Err(Verdict::expected(
                "locks of this run",
                "none held",
                format!("still held: {held:?}"),
            ));
        }
        pending = held;
    }
    close_all([a]).await;
    Ok(())
}
