//! Introspection: `d NAME`, `sd NAME`, `dump`, `dump shared`. Only the `NAME` forms of the
//! listings are used (a production table can be huge), and `dump`, which has no such form, is
//! read as one line with a size cap.

use crate::checks::locks::close_all;
use crate::conn::Conn;
use crate::ctx::Ctx;
use crate::verdict::{ensure, quoted, Verdict};

/// The fewest bytes one entry of a dump line can take: a one-byte name, `:`, the shortest
/// `ip:port` id (`1.2.3.4:5`) and the space before the next entry.
const MIN_DUMP_ENTRY_BYTES: u64 = 12;

/// `d NAME` lists exactly `NAME: <holder id>` while it is held, and nothing once released.
pub async fn d_name(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("d");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    let id = a.holder().await?;
    a.expect(&format!("g {name}"), 1).await?;
    let rows = b.listing(&format!("d {name}"), 1, ctx.marker()).await?;
    let want = vec![format!("{name}: {id}")];
    ensure(
        rows == want,
        format!("`d {name}`"),
        rows_text(&want),
        rows_text(&rows),
    )?;
    a.expect(&format!("r {name}"), 1).await?;
    let rows = b.listing(&format!("d {name}"), 0, ctx.marker()).await?;
    ensure(
        rows.is_empty(),
        format!("`d {name}` after `r`"),
        "no rows",
        rows_text(&rows),
    )?;
    close_all([a, b]).await;
    Ok(())
}

/// `sd NAME` lists one `NAME: <holder id>` row per holder (sorted, in strict mode).
pub async fn sd_name(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("sd");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    let (id_a, id_b) = (a.holder().await?, b.holder().await?);
    a.expect(&format!("sg {name}"), 1).await?;
    b.expect(&format!("sg {name}"), 2).await?;
    let mut rows = a.listing(&format!("sd {name}"), 2, ctx.marker()).await?;
    let mut want = vec![format!("{name}: {id_a}"), format!("{name}: {id_b}")];
    want.sort();
    if ctx.compat() {
        // The original listed holders in the order they came.
        rows.sort();
    }
    ensure(
        rows == want,
        format!("`sd {name}`"),
        rows_text(&want),
        rows_text(&rows),
    )?;
    a.expect(&format!("sr {name}"), 1).await?;
    b.expect(&format!("sr {name}"), 1).await?;
    let rows = a.listing(&format!("sd {name}"), 0, ctx.marker()).await?;
    ensure(
        rows.is_empty(),
        format!("`sd {name}` after `sr`"),
        "no rows",
        rows_text(&rows),
    )?;
    close_all([a, b]).await;
    Ok(())
}

/// `dump` is one line in Go's map syntax holding `NAME:<raw holder id>`.
pub async fn dump(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("dump");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    let id = a.id().await?;
    a.expect(&format!("g {name}"), 1).await?;
    let line = read_dump(ctx, &mut b, "dump").await?;
    let entry = format!("{name}:{id}");
    ensure(
        has_entry(&line, &entry),
        "`dump`",
        format!("a `map[…]` line with the entry {}", quoted(&entry)),
        excerpt(&line, &name),
    )?;
    a.expect(&format!("r {name}"), 1).await?;
    close_all([a, b]).await;
    Ok(())
}

/// `dump shared` is one line in Go's map syntax holding `NAME:[<id> <id>]`.
pub async fn dump_shared(ctx: &Ctx) -> Result<(), Verdict> {
    let name = ctx.lock_name("dump-shared");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    let (id_a, id_b) = (a.id().await?, b.id().await?);
    a.expect(&format!("sg {name}"), 1).await?;
    b.expect(&format!("sg {name}"), 2).await?;
    let line = read_dump(ctx, &mut b, "dump shared").await?;
    // The holders' order is the server's business (the original kept arrival order).
    let entries = [
        format!("{name}:[{id_a} {id_b}]"),
        format!("{name}:[{id_b} {id_a}]"),
    ];
    ensure(
        entries.iter().any(|entry| has_entry(&line, entry)),
        "`dump shared`",
        format!("a `map[…]` line with the entry {}", quoted(&entries[0])),
        excerpt(&line, &name),
    )?;
    a.expect(&format!("sr {name}"), 1).await?;
    b.expect(&format!("sr {name}"), 1).await?;
    close_all([a, b]).await;
    Ok(())
}

/// Sends `command` (`dump` or `dump shared`) and reads its one line, capped at
/// `--max-dump-bytes`: a bigger table skips the check instead of reading it all.
pub async fn read_dump(ctx: &Ctx, conn: &mut Conn, command: &str) -> Result<String, Verdict> {
    let what = format!("`{command}`");
    // The server builds the whole line whatever the tester reads, so a table that cannot fit
    // under the cap is not dumped at all: `q` says how many entries there are at least.
    let key = if command == "dump" {
        "locks"
    } else {
        "shared_locks"
    };
    let entries = conn.stats().await?.get(key);
    let smallest = entries.saturating_mul(MIN_DUMP_ENTRY_BYTES);
    if smallest > ctx.max_dump_bytes() as u64 {
        return Err(Verdict::skip(format!(
            "{what} not sent: `q` {key} is {entries}, more than --max-dump-bytes {} can hold",
            ctx.max_dump_bytes()
        )));
    }
    conn.send(command).await?;
    let Some(line) = conn.read_line_capped(&what, ctx.max_dump_bytes()).await? else {
        return Err(Verdict::skip(format!(
            "{what} is longer than --max-dump-bytes {}: the table is too big to check safely",
            ctx.max_dump_bytes()
        )));
    };
    if crate::commands::is_disabled(&line) {
        return Err(Verdict::skip(format!("{what} answered {}", quoted(&line))));
    }
    ensure(
        line.starts_with("map[") && line.ends_with(']'),
        &what,
        "one line `map[…]`",
        excerpt(&line, ""),
    )?;
    Ok(line)
}

/// Whether `entry` (`key:value`) is a whole entry of the Go map line: it starts right after
/// `map[` or a space and ends right before a space or the closing `]`.
pub fn has_entry(line: &str, entry: &str) -> bool {
    line.match_indices(entry).any(|(at, _)| {
        let before = &line[..at];
        let after = &line[at + entry.len()..];
        (before == "map[" || before.ends_with(' ')) && (after.starts_with(' ') || after == "]")
    })
}

/// Rows as one readable value for messages.
pub fn rows_text(rows: &[String]) -> String {
    if rows.is_empty() {
        "no rows".to_owned()
    } else {
        format!("{rows:?}")
    }
}

/// A short part of a possibly huge line: around `name` if it occurs, else its start.
fn excerpt(line: &str, name: &str) -> String {
    const AROUND: usize = 120;
    let at = if name.is_empty() {
        None
    } else {
        line.find(name)
    };
    let start = at.map_or(0, |at| floor_boundary(line, at.saturating_sub(AROUND / 2)));
    let end = floor_boundary(line, (start + AROUND).min(line.len()));
    let mut text = line[start..end].to_owned();
    if start > 0 {
        text.insert(0, '…');
    }
    if end < line.len() {
        text.push('…');
    }
    if at.is_none() && !name.is_empty() {
        format!("no entry for {} in {}", quoted(name), quoted(&text))
    } else {
        quoted(&text)
    }
}

/// The largest char boundary of `s` at or below `at`.
fn floor_boundary(s: &str, mut at: usize) -> usize {
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// After `framed`, `d NAME` starts with a line counting the rows that follow (`1 lines`, then
/// the row), and an empty listing is `0 lines`: a client can read a listing without a marker.
/// Over the websocket door the count line leads the listing's one message.
pub async fn framed_counts_rows(ctx: &Ctx) -> Result<(), Verdict> {
    if ctx.compat() {
        return Err(Verdict::skip(
            "compat mode: the original had no framed form of listings",
        ));
    }
    let name = ctx.lock_name("framed");
    let (mut a, mut b) = (ctx.connect().await?, ctx.connect().await?);
    let id = a.holder().await?;
    a.expect(&format!("g {name}"), 1).await?;
    b.expect("framed", 1).await?;
    for (step, want) in [
        ("", vec!["1 lines".to_owned(), format!("{name}: {id}")]),
        (" and `r`", vec!["0 lines".to_owned()]),
    ] {
        if !step.is_empty() {
            a.expect(&format!("r {name}"), 1).await?;
        }
        let what = format!("`d {name}` after `framed`{step}");
        b.send(&format!("d {name}")).await?;
        let got = framed_reply(&mut b, &what).await?;
        if got.first().is_some_and(|head| head == "0 disabled") {
            close_all([a, b]).await;
            return Err(Verdict::skip(format!("{what} answered \"0 disabled\"")));
        }
        ensure(got == want, &what, rows_text(&want), rows_text(&got))?;
    }
    close_all([a, b]).await;
    Ok(())
}

/// A framed reply's lines, its count line first: one message over the websocket door; over a
/// byte stream the count line and as many lines as it says.
async fn framed_reply(conn: &mut Conn, what: &str) -> Result<Vec<String>, Verdict> {
    if conn.framed() {
        return conn.read_message(what).await;
    }
    let head = conn.read_line(what).await?;
    let count = head
        .split_once(' ')
        .and_then(|(n, _)| n.parse::<usize>().ok())
        .filter(|&n| n <= 2)
        .ok_or_else(|| Verdict::expected(what, "a count line `N lines`", quoted(&head)))?;
    let mut lines = vec![head];
    for _ in 0..count {
        lines.push(conn.read_line(what).await?);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_entries_match_whole() {
        let line = "map[a:1.2.3.4:5 ab:1.2.3.4:6]";
        assert!(has_entry(line, "a:1.2.3.4:5"));
        assert!(has_entry(line, "ab:1.2.3.4:6"));
        assert!(!has_entry(line, "b:1.2.3.4:6"));
        assert!(!has_entry(line, "a:1.2.3.4:"));
        let shared = "map[a:[x y] b:[z]]";
        assert!(has_entry(shared, "a:[x y]"));
        assert!(has_entry(shared, "b:[z]"));
        assert!(!has_entry(shared, "a:[x]"));
    }
}
