//! The protocol's commands on a [`Conn`]: reading a reply's integer, listings (which have no end
//! marker over a byte stream, and are one message over the websocket door), `q` and `me`.
//!
//! Strict mode holds replies to the documented form `<integer> <text>\n`. Compat mode reads them
//! the way clients of the original server did: only the leading integer counts, and a trailing
//! `\r` (the original mixed `\r\n` into its replies) is dropped before anything looks at a line.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::conn::{label, Conn};
use crate::verdict::{ensure, quoted, Verdict};

/// Most rows accepted from one listing: the tester only lists its own names, held by at most a
/// few of its own connections, so more rows mean the server ignored the name.
const MAX_ROWS: usize = 64;

/// Most lines accepted from one `q`.
const MAX_STATS_LINES: usize = 256;

/// The key `q` prints last (its keys are sorted), which marks the end of the reply.
const LAST_STATS_KEY: &str = "shared_orphans";

/// The leading integer of a reply line: digits followed by a space or the end of the line.
pub fn reply_code(line: &str) -> Option<u64> {
    let digits = line.len() - line.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let rest = &line[digits..];
    if digits == 0 || !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    line[..digits].parse().ok()
}

/// Whether a reply says the command is turned off on this server (`0 disabled`).
pub fn is_disabled(line: &str) -> bool {
    reply_code(line) == Some(0) && line.to_ascii_lowercase().contains("disabled")
}

/// This connection as `me` describes it.
#[derive(Debug, Clone)]
pub struct Me {
    /// The raw connection id (`ip:port` for TCP).
    pub id: String,
    /// The registered name, or the id when none is registered.
    pub name: String,
}

/// A `q` reply.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Every counter by key.
    pub values: BTreeMap<String, u64>,
    /// The keys in the order they came, to check they are sorted.
    pub order: Vec<String>,
}

impl Stats {
    /// A counter's value; a key the server does not print counts as 0 (the original only
    /// printed some `command_` keys once they had been used).
    pub fn get(&self, key: &str) -> u64 {
        self.values.get(key).copied().unwrap_or(0)
    }
}

impl Conn {
    /// Sends `line` and returns its reply's integer. In strict mode the reply must be exactly
    /// `<integer> <text>` with no `\r`.
    pub async fn code(&mut self, line: &str) -> Result<u64, Verdict> {
        let reply = self.command(line).await?;
        self.parse_reply(line, &reply)
    }

    /// The integer of `reply`, the answer to `line`, checked for form.
    pub fn parse_reply(&self, line: &str, reply: &str) -> Result<u64, Verdict> {
        let what = label(line);
        let code = reply_code(reply)
            .ok_or_else(|| Verdict::expected(&what, "a reply `<integer> <text>`", quoted(reply)))?;
        if !self.compat() {
            let text = reply.split_once(' ').map_or("", |(_, text)| text);
            ensure(
                !text.is_empty() && !reply.ends_with('\r'),
                &what,
                "a reply `<integer> <text>` ending in a bare \\n",
                quoted(reply),
            )?;
        }
        Ok(code)
    }

    /// Sends `line` and fails unless its reply's integer is `want`.
    pub async fn expect(&mut self, line: &str, want: u64) -> Result<(), Verdict> {
        let reply = self.command(line).await?;
        let code = self.parse_reply(line, &reply)?;
        ensure(code == want, label(line), want, quoted(&reply))
    }

    /// Like [`Conn::expect`] for a line sent exactly as given, its line ending included (over
    /// the websocket door, as one message).
    pub async fn expect_bytes(&mut self, line: &str, want: u64) -> Result<(), Verdict> {
        self.send_raw(line.as_bytes()).await?;
        let what = label(line);
        let reply = self.read_line(&what).await?;
        let code = self.parse_reply(line, &reply)?;
        ensure(code == want, what, want, quoted(&reply))
    }

    /// Like [`Conn::expect`] for a command the server may have turned off: `0 disabled` skips
    /// the check.
    pub async fn expect_enabled(&mut self, line: &str, want: u64) -> Result<(), Verdict> {
        let reply = self.command(line).await?;
        // `iam` on a connection its client certificate names (`--cert`): the registry checks
        // do not apply to it.
        if is_disabled(&reply) || reply == "0 Name Set By Certificate" {
            return Err(Verdict::skip(format!(
                "{} answered {}",
                label(line),
                quoted(&reply)
            )));
        }
        let code = self.parse_reply(line, &reply)?;
        ensure(code == want, label(line), want, quoted(&reply))
    }

    /// `me`: this connection's id and name. `None` if the server answers `0 disabled`.
    pub async fn me(&mut self) -> Result<Option<Me>, Verdict> {
        let reply = self.command("me").await?;
        if is_disabled(&reply) {
            return Ok(None);
        }
        let parsed = reply
            .strip_prefix("1 ")
            .and_then(|rest| rest.split_once(' '))
            .filter(|(id, name)| !id.is_empty() && !name.is_empty());
        match parsed {
            Some((id, name)) => Ok(Some(Me {
                id: id.to_owned(),
                name: name.to_owned(),
            })),
            None => Err(Verdict::expected("`me`", "`1 <id> <name>`", quoted(&reply))),
        }
    }

    /// This connection's raw id: from `me`, or from the transport when `me` is turned off.
    pub async fn id(&mut self) -> Result<String, Verdict> {
        match self.me().await? {
            Some(me) => Ok(me.id),
            None => self
                .local_id()
                .map(str::to_owned)
                .ok_or_else(|| Verdict::skip("`me` is disabled and the transport has no id")),
        }
    }

    /// The name listings (`d`, `sd`, `h`) show for this connection's locks: its id, or the
    /// name a server that verified its client certificate gives it.
    pub async fn holder(&mut self) -> Result<String, Verdict> {
        match self.me().await? {
            Some(me) => Ok(me.name),
            None => self.id().await,
        }
    }

    /// A listing command (`d NAME`, `sd NAME`, `who NAME`): its rows. A `0 disabled` answer
    /// skips the check.
    ///
    /// Over a byte stream listings have no end marker and may be empty, so an `i` on a name
    /// nobody holds follows as a marker: its reply (`0 …`) cannot be a row, since rows never
    /// start with an integer and a space. Strict mode sends the command and the marker in one
    /// write (pipelining is documented). Compat mode sends the marker only once `expect_rows`
    /// rows have come, because the original loses every line after the first in one read; for
    /// an expected empty listing it waits a moment first.
    ///
    /// Over the websocket door the listing is one message (an empty one when there are no
    /// rows). Strict mode still sends the marker, in the same message: its reply must be the
    /// next message, which catches a server that splits a listing over several messages or
    /// sends nothing for an empty one. Compat mode sends the command alone, one per message.
    pub async fn listing(
        &mut self,
        command: &str,
        expect_rows: usize,
        marker_name: &str,
    ) -> Result<Vec<String>, Verdict> {
        let what = label(command);
        let marker = format!("i {marker_name}");
        if !self.compat() {
            self.send_raw(format!("{command}\n{marker}\n").as_bytes())
                .await?;
            return self.listing_rows(&what, expect_rows).await;
        }
        self.send(command).await?;
        if self.framed() {
            return self.message_rows(&what, expect_rows, false).await;
        }
        let mut rows = Vec::new();
        for row in 1..=expect_rows {
            let line = self
                .read_line(&format!("{what} (row {row} of {expect_rows})"))
                .await?;
            if reply_code(&line).is_some() {
                return Err(listing_reply(&what, &line, expect_rows));
            }
            rows.push(line);
        }
        if expect_rows == 0 {
            tokio::time::sleep(settle(self.timeout())).await;
        }
        self.send(&marker).await?;
        self.rows_until_marker(&what, expect_rows, rows).await
    }

    /// The rows of a listing that was sent with the marker `i` right after it (see
    /// [`Conn::listing`]), read from either kind of door.
    pub async fn listing_rows(
        &mut self,
        what: &str,
        expect_rows: usize,
    ) -> Result<Vec<String>, Verdict> {
        if self.framed() {
            self.message_rows(what, expect_rows, true).await
        } else {
            self.rows_until_marker(what, expect_rows, Vec::new()).await
        }
    }

    /// Byte stream: lines up to the marker's reply, after the `rows` already read.
    async fn rows_until_marker(
        &mut self,
        what: &str,
        expect_rows: usize,
        mut rows: Vec<String>,
    ) -> Result<Vec<String>, Verdict> {
        loop {
            let line = self.read_line(what).await?;
            if reply_code(&line).is_some() {
                if rows.is_empty() && is_disabled(&line) {
                    return Err(listing_reply(what, &line, expect_rows));
                }
                // The marker's own reply: the listing is over.
                return Ok(rows);
            }
            rows.push(line);
            if rows.len() > MAX_ROWS {
                return Err(too_many_rows(what, expect_rows));
            }
        }
    }

    /// Websocket door: the listing's one message, then (when `marker_follows`) the marker's
    /// reply as the next message.
    async fn message_rows(
        &mut self,
        what: &str,
        expect_rows: usize,
        marker_follows: bool,
    ) -> Result<Vec<String>, Verdict> {
        let rows = self.read_message(what).await?;
        if let [only] = rows.as_slice() {
            if is_disabled(only) {
                return Err(listing_reply(what, only, expect_rows));
            }
        }
        // A reply line here is the marker's: the listing's own message never came (an empty
        // listing must still be answered, with an empty message).
        if let Some(reply) = rows.iter().find(|row| reply_code(row).is_some()) {
            return Err(Verdict::expected(
                what,
                format!("{expect_rows} rows in one message (an empty message for none)"),
                format!("a message with the reply line {}", quoted(reply)),
            ));
        }
        if rows.len() > MAX_ROWS {
            return Err(too_many_rows(what, expect_rows));
        }
        if marker_follows {
            let next = self.read_line(&format!("the message after {what}")).await?;
            if reply_code(&next).is_none() {
                return Err(Verdict::expected(
                    format!("the message after {what}"),
                    "the next command's reply (the listing whole in one message)",
                    format!("another row {}", quoted(&next)),
                ));
            }
        }
        Ok(rows)
    }

    /// `q`: every counter. Over a byte stream the reply ends with the `shared_orphans` line
    /// (keys are sorted); over the websocket door it is one message.
    pub async fn stats(&mut self) -> Result<Stats, Verdict> {
        self.send("q").await?;
        let mut stats = Stats::default();
        if self.framed() {
            let lines = self.read_message("`q`").await?;
            if lines.len() > MAX_STATS_LINES {
                return Err(Verdict::expected(
                    "`q`",
                    format!("at most {MAX_STATS_LINES} lines"),
                    lines.len(),
                ));
            }
            for line in &lines {
                stats.add(line)?;
            }
            return Ok(stats);
        }
        for _ in 0..MAX_STATS_LINES {
            let line = self.read_line("`q`").await?;
            if stats.add(&line)? == LAST_STATS_KEY {
                return Ok(stats);
            }
        }
        Err(Verdict::expected(
            "`q`",
            format!("a `{LAST_STATS_KEY}` line"),
            format!("{MAX_STATS_LINES} lines without one"),
        ))
    }
}

impl Stats {
    /// Adds one `key: value` line of `q`; returns the key.
    fn add<'a>(&mut self, line: &'a str) -> Result<&'a str, Verdict> {
        let parsed = line
            .split_once(": ")
            .and_then(|(key, value)| Some((key, value.parse::<u64>().ok()?)));
        let Some((key, value)) = parsed else {
            return Err(Verdict::expected("`q`", "lines `key: value`", quoted(line)));
        };
        self.values.insert(key.to_owned(), value);
        self.order.push(key.to_owned());
        Ok(key)
    }
}

/// The verdict on a listing with more rows than the tester's own names can have.
fn too_many_rows(what: &str, expect_rows: usize) -> Verdict {
    Verdict::expected(
        what,
        format!("{expect_rows} rows"),
        format!("more than {MAX_ROWS}"),
    )
}

/// The verdict on a listing that answered with a reply line instead of rows.
fn listing_reply(what: &str, line: &str, expect_rows: usize) -> Verdict {
    if is_disabled(line) {
        Verdict::skip(format!("{what} answered {}", quoted(line)))
    } else {
        Verdict::expected(what, format!("{expect_rows} rows"), quoted(line))
    }
}

/// How long compat mode waits before assuming an empty listing is complete: long enough for a
/// server to have read the command on its own, short enough not to slow the run.
pub fn settle(timeout: Duration) -> Duration {
    (timeout / 10).min(Duration::from_millis(200))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_codes_are_the_leading_integer() {
        assert_eq!(reply_code("1 Got Lock"), Some(1));
        assert_eq!(reply_code("12 Got Shared Lock"), Some(12));
        assert_eq!(reply_code("1 Lock Get Success: a b"), Some(1));
        assert_eq!(reply_code("0"), Some(0));
        assert_eq!(reply_code("127.0.0.1:5000: name"), None);
        assert_eq!(reply_code("name: 127.0.0.1:5000"), None);
        assert_eq!(reply_code(""), None);
    }

    #[test]
    fn disabled_is_zero_and_the_word() {
        assert!(is_disabled("0 disabled"));
        assert!(!is_disabled("0 Not Locked"));
        assert!(!is_disabled("1 disabled"));
    }
}
