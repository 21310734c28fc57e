//! Exclusive and shared locks, their separate namespaces, orphaning, and how lines are read.

use crate::conn::Conn;
use crate::ctx::{Ctx, Poll};
use crate::verdict::{quoted, Verdict};

/// `g`/`i`/`r` on one connection: take, see it held, release, see it free, and a second release
/// is refused.
pub async fn get_inspect_release(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("exclusive");
    let mut a = ctx.connect().await?;
    a.expect(&format!("i {name}"), 0).await?;
    a.expect(&format!("g {name}"), 1).await?;
    a.expect(&format!("i {name}"), 1).await?;
    a.expect(&format!("r {name}"), 1).await?;
    a.expect(&format!("i {name}"), 0).await?;
    a.expect(&format!("r {name}"), 0).await?;
    a.close().await;
    Ok(())
}

/// Taking a lock you already hold answers 1, and does not nest: one release frees it.
pub async fn reget(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("reget");
    let mut a = ctx.connect().await?;
    a.expect(&format!("g {name}"), 1).await?;
    a.expect(&format!("g {name}"), 1).await?;
    a.expect(&format!("r {name}"), 1).await?;
    a.expect(&format!("i {name}"), 0).await?;
    a.close().await;
    Ok(())
}

/// Another connection cannot take a held lock, sees it held, and can take it once released.
pub async fn refused_to_others(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("refused");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    a.expect(&format!("g {name}"), 1).await?;
    b.expect(&format!("g {name}"), 0).await?;
    b.expect(&format!("i {name}"), 1).await?;
    a.expect(&format!("r {name}"), 1).await?;
    b.expect(&format!("g {name}"), 1).await?;
    a.expect(&format!("g {name}"), 0).await?;
    b.expect(&format!("r {name}"), 1).await?;
    close_all([a, b]).await;
    Ok(())
}

/// Only the holder can release: another connection's `r` is refused and changes nothing.
pub async fn only_holder_releases(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("holder");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    a.expect(&format!("g {name}"), 1).await?;
    b.expect(&format!("r {name}"), 0).await?;
    b.expect(&format!("i {name}"), 1).await?;
    b.expect(&format!("g {name}"), 0).await?;
    a.expect(&format!("r {name}"), 1).await?;
    close_all([a, b]).await;
    Ok(())
}

/// `sg` answers the number of holders after the call, `si` the count, `sr` 1 for a holder and
/// 0 otherwise, and the count follows every change.
pub async fn shared_counts_holders(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("shared");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    a.expect(&format!("si {name}"), 0).await?;
    a.expect(&format!("sg {name}"), 1).await?;
    b.expect(&format!("sg {name}"), 2).await?;
    a.expect(&format!("si {name}"), 2).await?;
    a.expect(&format!("sr {name}"), 1).await?;
    b.expect(&format!("si {name}"), 1).await?;
    a.expect(&format!("sr {name}"), 0).await?;
    b.expect(&format!("sr {name}"), 1).await?;
    b.expect(&format!("si {name}"), 0).await?;
    close_all([a, b]).await;
    Ok(())
}

/// Taking a shared lock again does not count the holder twice.
pub async fn shared_reget_counts_once(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("shared-reget");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    a.expect(&format!("sg {name}"), 1).await?;
    a.expect(&format!("sg {name}"), 1).await?;
    a.expect(&format!("si {name}"), 1).await?;
    b.expect(&format!("sg {name}"), 2).await?;
    b.expect(&format!("sg {name}"), 2).await?;
    a.expect(&format!("sr {name}"), 1).await?;
    b.expect(&format!("si {name}"), 1).await?;
    b.expect(&format!("sr {name}"), 1).await?;
    b.expect(&format!("si {name}"), 0).await?;
    close_all([a, b]).await;
    Ok(())
}

/// `g x` and `sg x` are different locks: neither blocks, counts or releases the other.
pub async fn namespaces_separate(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("namespaces");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    a.expect(&format!("g {name}"), 1).await?;
    a.expect(&format!("si {name}"), 0).await?;
    b.expect(&format!("sg {name}"), 1).await?;
    b.expect(&format!("i {name}"), 1).await?;
    b.expect(&format!("r {name}"), 0).await?;
    a.expect(&format!("sr {name}"), 0).await?;
    a.expect(&format!("r {name}"), 1).await?;
    b.expect(&format!("si {name}"), 1).await?;
    b.expect(&format!("i {name}"), 0).await?;
    b.expect(&format!("sr {name}"), 1).await?;
    close_all([a, b]).await;
    Ok(())
}

/// Closing the connection that holds an exclusive lock releases it (polled, within the
/// timeout: the server notices the close in its own time).
pub async fn orphan_exclusive(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("orphan");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    a.expect(&format!("g {name}"), 1).await?;
    b.expect(&format!("i {name}"), 1).await?;
    a.close().await;
    wait_for_code(
        ctx,
        &mut b,
        &format!("i {name}"),
        0,
        "after its holder disconnected",
    )
    .await?;
    b.expect(&format!("g {name}"), 1).await?;
    b.expect(&format!("r {name}"), 1).await?;
    b.close().await;
    Ok(())
}

/// Closing a connection releases its shared locks and the count drops by one.
pub async fn orphan_shared(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("shared-orphan");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    a.expect(&format!("sg {name}"), 1).await?;
    b.expect(&format!("sg {name}"), 2).await?;
    a.close().await;
    let line = format!("si {name}");
    wait_for_code(ctx, &mut b, &line, 1, "after one holder disconnected").await?;
    b.expect(&format!("sr {name}"), 1).await?;
    b.close().await;
    Ok(())
}

/// Surrounding whitespace is trimmed and runs of spaces in a name collapse to one:
/// ` g  NAME   x ` takes `NAME x`, as the original Go client's ` g  name` relies on.
pub async fn whitespace_collapsed(ctx: &Ctx) -> Result<(), Verdict> {
    let base = ctx.fresh("spaces");
    let name = format!("{base} x");
    ctx.remember(&name);
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    a.expect(&format!(" g  {base}   x "), 1).await?;
    b.expect(&format!("i {name}"), 1).await?;
    b.expect(&format!("g {name}"), 0).await?;
    a.expect(&format!("  r {base}  x"), 1).await?;
    b.expect(&format!("i {name}"), 0).await?;
    close_all([a, b]).await;
    Ok(())
}

/// Lines may end in `\r\n`: the `\r` is not part of the name. The lines are sent with their
/// `\r\n` as they are, so that over the websocket door too each message is a CRLF line.
pub async fn crlf_accepted(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("crlf");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    a.expect_bytes(&format!("g {name}\r\n"), 1).await?;
    b.expect(&format!("i {name}"), 1).await?;
    a.expect_bytes(&format!("i {name}\r\n"), 1).await?;
    a.expect_bytes(&format!("r {name}\r\n"), 1).await?;
    b.expect(&format!("i {name}"), 0).await?;
    close_all([a, b]).await;
    Ok(())
}

/// Sends `line` until its reply's integer is `want`, for at most the timeout.
pub async fn wait_for_code(
    ctx: &Ctx,
    conn: &mut Conn,
    line: &str,
    want: u64,
    when: &str,
) -> Result<(), Verdict> {
    let mut poll = Poll::new(ctx.timeout());
    loop {
        let reply = conn.command(line).await?;
        if conn.parse_reply(line, &reply)? == want {
            return Ok(());
        }
        if !poll.again().await {
            return Err(Verdict::expected(
                format!("`{line}` {when}"),
                format!("{want} within {} ms", ctx.timeout().as_millis()),
                quoted(&reply),
            ));
        }
    }
}

/// Closes every connection (each releases whatever it still holds).
pub async fn close_all<const N: usize>(conns: [Conn; N]) {
    for conn in conns {
        conn.close().await;
    }
}
