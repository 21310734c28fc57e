//! The registry: `me`, `iam`, `who NAME`, and registered names in listings. A server started
//! with `-registry=false` (or `-dump=false` for `who` and the listings) answers `0 disabled`,
//! which skips these checks.

use crate::checks::listings::{has_entry, read_dump, rows_text};
use crate::checks::locks::close_all;
use crate::ctx::Ctx;
use crate::verdict::{ensure, quoted, Verdict};

/// `me` on a fresh connection: `1 <id> <id>` (the name is the id until one is registered).
pub async fn me(ctx: &Ctx) -> Result<(), Verdict> {
    let mut a = ctx.connect().await?;
    let Some(me) = a.me().await? else {
        return Err(Verdict::skip("`me` answered `0 disabled`"));
    };
    // A TCP id is `ip:port`; a unix socket's is `unix:N`: either way there is a colon.
    ensure(
        me.id.contains(':'),
        "`me`",
        "an id like `ip:port`",
        quoted(&me.id),
    )?;
    if me.name.starts_with("cert:") {
        return Err(Verdict::skip(
            "the server names this connection by its client certificate",
        ));
    }
    ensure(
        me.name == me.id,
        "`me` before any `iam`",
        format!("the id as the name, {}", quoted(&me.id)),
        quoted(&me.name),
    )?;
    a.close().await;
    Ok(())
}

/// `iam NAME` answers `1 ok` and `me` then shows the name next to the unchanged id.
pub async fn iam(ctx: &Ctx) -> Result<(), Verdict> {
    let registered = ctx.fresh("iam");
    let mut a = ctx.connect().await?;
    let id = a.id().await?;
    a.expect_enabled(&format!("iam {registered}"), 1).await?;
    let Some(me) = a.me().await? else {
        return Err(Verdict::skip("`me` answered `0 disabled`"));
    };
    ensure(me.id == id, "`me` after `iam`", quoted(&id), quoted(&me.id))?;
    ensure(
        me.name == registered,
        "`me` after `iam`",
        quoted(&registered),
        quoted(&me.name),
    )?;
    a.close().await;
    Ok(())
}

/// `who NAME` lists exactly `<id>: NAME` for the one connection registered as NAME.
pub async fn who(ctx: &Ctx) -> Result<(), Verdict> {
    let registered = ctx.fresh("who");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    let id = a.id().await?;
    a.expect_enabled(&format!("iam {registered}"), 1).await?;
    let rows = b
        .listing(&format!("who {registered}"), 1, ctx.marker())
        .await?;
    let want = vec![format!("{id}: {registered}")];
    ensure(
        rows == want,
        format!("`who {registered}`"),
        rows_text(&want),
        rows_text(&rows),
    )?;
    close_all([a, b]).await;
    Ok(())
}

/// `d NAME` and `sd NAME` show a holder by its registered name.
pub async fn name_in_listings(ctx: &Ctx) -> Result<(), Verdict> {
    let registered = ctx.fresh("holder-name");
    let (exclusive, shared) = (ctx.lock_name("named-d"), ctx.lock_name("named-sd"));
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    a.expect_enabled(&format!("iam {registered}"), 1).await?;
    a.expect(&format!("g {exclusive}"), 1).await?;
    a.expect(&format!("sg {shared}"), 1).await?;
    for (command, lock) in [("d", &exclusive), ("sd", &shared)] {
        let line = format!("{command} {lock}");
        let rows = b.listing(&line, 1, ctx.marker()).await?;
        let want = vec![format!("{lock}: {registered}")];
        ensure(
            rows == want,
            format!("`{line}`"),
            rows_text(&want),
            rows_text(&rows),
        )?;
    }
    a.expect(&format!("r {exclusive}"), 1).await?;
    a.expect(&format!("sr {shared}"), 1).await?;
    close_all([a, b]).await;
    Ok(())
}

/// `dump` shows raw connection ids, never registered names.
pub async fn dump_raw_id(ctx: &Ctx) -> Result<(), Verdict> {
    let registered = ctx.fresh("dump-name");
    let name = ctx.lock_name("dump-raw");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    let id = a.id().await?;
    a.expect_enabled(&format!("iam {registered}"), 1).await?;
    a.expect(&format!("g {name}"), 1).await?;
    let line = read_dump(ctx, &mut b, "dump").await?;
    let raw = format!("{name}:{id}");
    let by_name = format!("{name}:{registered}");
    let got = if has_entry(&line, &by_name) {
        quoted(&by_name)
    } else if has_entry(&line, &raw) {
        String::new()
    } else {
        format!("no entry for {}", quoted(&name))
    };
    ensure(
        got.is_empty(),
        "`dump` of a registered holder",
        quoted(&raw),
        got,
    )?;
    a.expect(&format!("r {name}"), 1).await?;
    close_all([a, b]).await;
    Ok(())
}

/// `iam` with no name clears the registration: `me` shows the id as the name again and `who`
/// no longer lists the old name.
pub async fn empty_iam_clears(ctx: &Ctx) -> Result<(), Verdict> {
    let registered = ctx.fresh("cleared");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    a.expect_enabled(&format!("iam {registered}"), 1).await?;
    a.expect_enabled("iam", 1).await?;
    let Some(me) = a.me().await? else {
        return Err(Verdict::skip("`me` answered `0 disabled`"));
    };
    ensure(
        me.name == me.id,
        "`me` after an empty `iam`",
        quoted(&me.id),
        quoted(&me.name),
    )?;
    match b
        .listing(&format!("who {registered}"), 0, ctx.marker())
        .await
    {
        Ok(rows) => ensure(
            rows.is_empty(),
            format!("`who {registered}` after an empty `iam`"),
            "no rows",
            rows_text(&rows),
        )?,
        // `who` is off with `-dump=false`; `me` has already shown the name is gone.
        Err(Verdict::Skip(_)) => {}
        Err(fail) => return Err(fail),
    }
    close_all([a, b]).await;
    Ok(())
}
