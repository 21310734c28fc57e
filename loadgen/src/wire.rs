//! The bytes on the wire: commands for glockd (one line each) and Redis (RESP arrays), and a
//! hand-rolled parser for their replies.
//!
//! The parser works on the connection's read buffer in place and never allocates: it finds one
//! reply at the front of the buffer and says how many bytes it took. A reply is then checked
//! against the command it answers ([`classify`]); anything else is an error.

use crate::keys::Keys;

/// The server a run talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// glockd's line protocol.
    Glockd,
    /// Redis over RESP: `SET k 1 NX`/`DEL k` for locks, `EXISTS`, `INCR`/`DECR` for counts.
    Redis,
    /// The no-op line server: glockd's requests, and every reply is `1 Got Lock`.
    Noop,
}

/// One command, independent of the target's spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// Take an exclusive lock (`g` / `SET k 1 NX`).
    Get,
    /// Release it (`r` / `DEL`).
    Release,
    /// Is it held? (`i` / `EXISTS`).
    Inspect,
    /// Take a counted shared lock (`sg` / `INCR`).
    SharedGet,
    /// Release it (`sr` / `DECR`).
    SharedRelease,
    /// Take an exclusive lock, waiting for it (`gw MS NAME`; glockd only).
    GetWait,
    /// Take a shared lock if fewer than the limit hold it (`sgl LIMIT NAME`; glockd only).
    SharedGetLimit,
    /// A rate limit decision (`rl NAME BURST COUNT PERIOD_MS 1`; glockd only).
    RateLimit,
}

/// The numbers that some commands carry besides the name: the same for every command of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// `gw`'s MS.
    pub wait_ms: u64,
    /// `sgl`'s LIMIT.
    pub limit: u64,
    /// `rl`'s BURST.
    pub burst: u32,
    /// `rl`'s COUNT.
    pub count: u32,
    /// `rl`'s PERIOD_MS.
    pub period_ms: u32,
}

impl Cmd {
    fn glockd_prefix(self) -> &'static [u8] {
        match self {
            Cmd::Get => b"g ",
            Cmd::Release => b"r ",
            Cmd::Inspect => b"i ",
            Cmd::SharedGet => b"sg ",
            Cmd::SharedRelease => b"sr ",
            Cmd::GetWait => b"gw ",
            Cmd::SharedGetLimit => b"sgl ",
            Cmd::RateLimit => b"rl ",
        }
    }

    /// The RESP array header and command word; the key follows.
    fn redis_prefix(self) -> &'static [u8] {
        match self {
            Cmd::Get => b"*4\r\n$3\r\nSET\r\n",
            Cmd::Release => b"*2\r\n$3\r\nDEL\r\n",
            Cmd::Inspect => b"*2\r\n$6\r\nEXISTS\r\n",
            Cmd::SharedGet => b"*2\r\n$4\r\nINCR\r\n",
            Cmd::SharedRelease => b"*2\r\n$4\r\nDECR\r\n",
            // The command line refuses these for Redis (which has no such commands), so they
            // are never sent; were one sent, Redis would answer an error, counted as one.
            Cmd::GetWait | Cmd::SharedGetLimit | Cmd::RateLimit => b"*2\r\n$4\r\nNONE\r\n",
        }
    }
}

/// Appends `cmd` on key `id`, spelt for `target`, with `params` where the command takes numbers.
#[inline]
pub fn encode(target: Target, cmd: Cmd, keys: &Keys, id: u64, params: &Params, out: &mut Vec<u8>) {
    match target {
        Target::Glockd | Target::Noop => {
            out.extend_from_slice(cmd.glockd_prefix());
            match cmd {
                Cmd::GetWait => push_number(params.wait_ms, b' ', out),
                Cmd::SharedGetLimit => push_number(params.limit, b' ', out),
                _ => {}
            }
            keys.write_name(id, out);
            if cmd == Cmd::RateLimit {
                out.push(b' ');
                push_number(u64::from(params.burst), b' ', out);
                push_number(u64::from(params.count), b' ', out);
                push_number(u64::from(params.period_ms), b' ', out);
                // QUANTITY: one request each.
                out.push(b'1');
            }
            out.push(b'\n');
        }
        Target::Redis => {
            out.extend_from_slice(cmd.redis_prefix());
            out.push(b'$');
            out.extend_from_slice(itoa::Buffer::new().format(keys.size()).as_bytes());
            out.extend_from_slice(b"\r\n");
            keys.write_name(id, out);
            out.extend_from_slice(b"\r\n");
            if cmd == Cmd::Get {
                out.extend_from_slice(b"$1\r\n1\r\n$2\r\nNX\r\n");
            }
        }
    }
}

/// Appends the decimal digits of `n`, then `sep`, without `fmt` or allocation.
fn push_number(n: u64, sep: u8, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.push(sep);
}

/// One reply, as the wire spelt it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Raw<'a> {
    /// glockd: `<code> <text>\n`.
    Line { code: u64, text: &'a [u8] },
    /// RESP `+text`.
    Simple(&'a [u8]),
    /// RESP `-text`.
    Error(&'a [u8]),
    /// RESP `:n`.
    Int(i64),
    /// RESP `$-1` (or RESP3 `_`).
    Nil,
    /// RESP `$n` and its bytes.
    Bulk(&'a [u8]),
}

/// What the parser found at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// Not a whole reply yet: read more.
    Incomplete,
    /// Not a reply of this protocol: the stream cannot be trusted any more.
    Malformed(String),
    /// A reply, and the bytes it took.
    Reply(Raw<'a>, usize),
}

/// Longest reply line accepted: the replies we ask for are a few dozen bytes, so a longer one
/// means the stream is garbage.
pub(crate) const MAX_REPLY: usize = 4096;

/// Parses one reply of `target`'s protocol at the front of `buf`.
#[inline]
pub fn parse(target: Target, buf: &[u8]) -> Parsed<'_> {
    match target {
        Target::Glockd | Target::Noop => parse_line(buf),
        Target::Redis => crate::resp::parse_resp(buf),
    }
}

pub(crate) fn line_end(buf: &[u8]) -> Result<usize, Parsed<'_>> {
    match memchr::memchr(b'\n', buf) {
        Some(end) => Ok(end),
        None if buf.len() > MAX_REPLY => Err(Parsed::Malformed(format!(
            "no end of line in {} bytes: {}",
            buf.len(),
            show(&buf[..64])
        ))),
        None => Err(Parsed::Incomplete),
    }
}

/// glockd: `<digits> <text>\n`.
fn parse_line(buf: &[u8]) -> Parsed<'_> {
    let end = match line_end(buf) {
        Ok(end) => end,
        Err(parsed) => return parsed,
    };
    let line = &buf[..end];
    let mut code: u64 = 0;
    let mut at = 0;
    while at < line.len() && line[at].is_ascii_digit() {
        code = match code
            .checked_mul(10)
            .and_then(|c| c.checked_add(u64::from(line[at] - b'0')))
        {
            Some(code) => code,
            None => return Parsed::Malformed(format!("integer overflow: {}", show(line))),
        };
        at += 1;
    }
    if at == 0 || line.get(at) != Some(&b' ') {
        return Parsed::Malformed(format!("not `<integer> <text>`: {}", show(line)));
    }
    Parsed::Reply(
        Raw::Line {
            code,
            text: &line[at + 1..],
        },
        end + 1,
    )
}

pub(crate) fn parse_i64(digits: &[u8]) -> Option<i64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// What a reply means for the command it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The exclusive lock is ours.
    Granted,
    /// Someone else holds it.
    Refused,
    /// The release (exclusive or shared) took effect.
    Released,
    /// The release found nothing of ours to release.
    NotReleased,
    /// An answer to an inspection (either answer is fine).
    Answered,
    /// A shared lock's holder count after `sg` / `INCR` / `sgl`.
    Count(u64),
    /// `sgl`: the limit's worth of connections hold it already.
    Full,
    /// `gw`: not granted within its wait.
    TimedOut,
    /// `rl`: the decision, with the two numbers the caller checks against what it sent.
    Rate {
        /// Whether the request passed.
        allowed: bool,
        /// `BURST + 1`, as the server understood the request.
        limit: u64,
        /// Requests still allowed right now.
        remaining: u64,
    },
}

/// Checks `raw` against the replies `cmd` may get from `target`; `None` if it is not one of them.
#[inline]
pub fn classify(target: Target, cmd: Cmd, raw: &Raw<'_>) -> Option<Outcome> {
    use Outcome::*;
    match (target, raw) {
        (Target::Noop, Raw::Line { code: 1, text }) if *text == b"Got Lock" => Some(match cmd {
            Cmd::Get => Granted,
            Cmd::Release | Cmd::SharedRelease => Released,
            Cmd::Inspect => Answered,
            Cmd::SharedGet | Cmd::SharedGetLimit => Count(1),
            Cmd::GetWait => Granted,
            // An `rl` reply is five numbers, never `1 Got Lock`.
            Cmd::RateLimit => return None,
        }),
        (Target::Glockd, Raw::Line { code, text }) => match (cmd, *code, *text) {
            (Cmd::Get, 1, b"Got Lock") => Some(Granted),
            (Cmd::Get, 0, b"Cannot Get Lock") => Some(Refused),
            (Cmd::Release, 1, b"Released Lock") => Some(Released),
            (Cmd::Release, 0, b"Cannot Release Lock") => Some(NotReleased),
            (Cmd::Inspect, 1, b"Locked") | (Cmd::Inspect, 0, b"Not Locked") => Some(Answered),
            (Cmd::SharedGet, n, b"Got Shared Lock") if n >= 1 => Some(Count(n)),
            (Cmd::SharedRelease, 1, b"Released Shared Lock") => Some(Released),
            (Cmd::SharedRelease, 0, b"Cannot Release Shared Lock") => Some(NotReleased),
            (Cmd::GetWait, 1, b"Got Lock") => Some(Granted),
            (Cmd::GetWait, 0, b"Timed Out") => Some(TimedOut),
            (Cmd::SharedGetLimit, n, b"Got Shared Lock") if n >= 1 => Some(Count(n)),
            (Cmd::SharedGetLimit, 0, b"Shared Lock Full") => Some(Full),
            (Cmd::RateLimit, allowed @ (0 | 1), text) => rate_decision(allowed == 1, text),
            _ => None,
        },
        (Target::Redis, raw) => match (cmd, raw) {
            (Cmd::Get, Raw::Simple(b"OK")) => Some(Granted),
            (Cmd::Get, Raw::Nil) => Some(Refused),
            (Cmd::Release, Raw::Int(1)) => Some(Released),
            (Cmd::Release, Raw::Int(0)) => Some(NotReleased),
            (Cmd::Inspect, Raw::Int(0 | 1)) => Some(Answered),
            (Cmd::SharedGet, Raw::Int(n)) if *n >= 1 => Some(Count(*n as u64)),
            (Cmd::SharedRelease, Raw::Int(n)) if *n >= 0 => Some(Released),
            _ => None,
        },
        _ => None,
    }
}

/// The rest of an `rl` reply after its first number: `<limit> <remaining> <retry_after_ms>
/// <reset_after_ms>`, checked for consistency with the decision: an allowed request has nothing
/// to wait for and leaves fewer than `limit` requests; a refused one leaves none and must wait
/// (at least 1 ms, or -1: never).
fn rate_decision(allowed: bool, text: &[u8]) -> Option<Outcome> {
    let mut fields = text.split(|&b| b == b' ');
    let mut next = || parse_i64(fields.next()?);
    let (limit, remaining, retry, reset) = (next()?, next()?, next()?, next()?);
    if next().is_some() || limit < 1 || remaining < 0 || reset < 0 {
        return None;
    }
    let consistent = if allowed {
        retry == 0 && remaining < limit
    } else {
        remaining == 0 && (retry >= 1 || retry == -1)
    };
    consistent.then_some(Outcome::Rate {
        allowed,
        limit: limit as u64,
        remaining: remaining as u64,
    })
}

/// A reply shown in an error message: printable, and short.
pub fn show(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(80)];
    let mut text = format!("{:?}", String::from_utf8_lossy(cut));
    if bytes.len() > cut.len() {
        text.push('…');
    }
    text
}

/// A reply for an error example.
pub fn show_raw(raw: &Raw<'_>) -> String {
    match raw {
        Raw::Line { code, text } => show(&[code.to_string().as_bytes(), b" ", text].concat()),
        Raw::Simple(s) => format!("+{}", show(s)),
        Raw::Error(s) => format!("-{}", show(s)),
        Raw::Int(n) => format!(":{n}"),
        Raw::Nil => "nil".into(),
        Raw::Bulk(s) => format!("${}", show(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Dist;

    #[test]
    fn commands_are_spelt_for_each_target() {
        let keys = Keys::new(100, 4, Dist::Uniform, 1.0).unwrap();
        let params = Params {
            wait_ms: 250,
            limit: 3,
            burst: 5,
            count: 100,
            period_ms: 1000,
        };
        let mut out = Vec::new();
        for cmd in [Cmd::GetWait, Cmd::SharedGetLimit, Cmd::RateLimit] {
            encode(Target::Glockd, cmd, &keys, 7, &params, &mut out);
        }
        assert_eq!(out, b"gw 250 k007\nsgl 3 k007\nrl k007 5 100 1000 1\n");
        out.clear();
        encode(Target::Glockd, Cmd::SharedGet, &keys, 7, &params, &mut out);
        assert_eq!(out, b"sg k007\n");
        out.clear();
        encode(Target::Redis, Cmd::Get, &keys, 7, &params, &mut out);
        assert_eq!(
            out,
            b"*4\r\n$3\r\nSET\r\n$4\r\nk007\r\n$1\r\n1\r\n$2\r\nNX\r\n"
        );
        out.clear();
        encode(Target::Redis, Cmd::Release, &keys, 12, &params, &mut out);
        assert_eq!(out, b"*2\r\n$3\r\nDEL\r\n$4\r\nk012\r\n");
    }

    #[test]
    fn glockd_lines_parse_and_classify() {
        let buf = b"1 Got Lock\n0 Cannot Get Lock\n3 Got Shared Lock\n1 Loc";
        let Parsed::Reply(raw, used) = parse(Target::Glockd, buf) else {
            panic!()
        };
        assert_eq!(used, 11);
        assert_eq!(
            classify(Target::Glockd, Cmd::Get, &raw),
            Some(Outcome::Granted)
        );
        assert_eq!(classify(Target::Glockd, Cmd::Release, &raw), None);
        let Parsed::Reply(raw, used2) = parse(Target::Glockd, &buf[used..]) else {
            panic!()
        };
        assert_eq!(
            classify(Target::Glockd, Cmd::Get, &raw),
            Some(Outcome::Refused)
        );
        let Parsed::Reply(raw, used3) = parse(Target::Glockd, &buf[used + used2..]) else {
            panic!()
        };
        assert_eq!(
            classify(Target::Glockd, Cmd::SharedGet, &raw),
            Some(Outcome::Count(3))
        );
        let rest = &buf[used + used2 + used3..];
        assert_eq!(parse(Target::Glockd, rest), Parsed::Incomplete);
        assert!(matches!(
            parse(Target::Glockd, b"Got Lock\n"),
            Parsed::Malformed(_)
        ));
        let locked = Raw::Line {
            code: 1,
            text: b"Not Locked",
        };
        assert_eq!(classify(Target::Glockd, Cmd::Inspect, &locked), None);
    }

    #[test]
    fn replies_to_the_new_commands_are_checked() {
        let line = |text: &'static str| match parse(Target::Glockd, text.as_bytes()) {
            Parsed::Reply(raw, _) => raw,
            other => panic!("{text:?}: {other:?}"),
        };
        let glockd = |cmd, text| classify(Target::Glockd, cmd, &line(text));
        assert_eq!(glockd(Cmd::GetWait, "1 Got Lock\n"), Some(Outcome::Granted));
        assert_eq!(
            glockd(Cmd::GetWait, "0 Timed Out\n"),
            Some(Outcome::TimedOut)
        );
        assert_eq!(glockd(Cmd::GetWait, "0 Usage: gw MS NAME\n"), None);
        assert_eq!(
            glockd(Cmd::SharedGetLimit, "2 Got Shared Lock\n"),
            Some(Outcome::Count(2))
        );
        assert_eq!(
            glockd(Cmd::SharedGetLimit, "0 Shared Lock Full\n"),
            Some(Outcome::Full)
        );
        let rate = |allowed, limit, remaining| {
            Some(Outcome::Rate {
                allowed,
                limit,
                remaining,
            })
        };
        assert_eq!(glockd(Cmd::RateLimit, "1 11 10 0 10\n"), rate(true, 11, 10));
        assert_eq!(glockd(Cmd::RateLimit, "0 11 0 9 100\n"), rate(false, 11, 0));
        assert_eq!(glockd(Cmd::RateLimit, "0 1 0 -1 0\n"), rate(false, 1, 0));
        for wrong in [
            "1 11 10 5 10\n",   // allowed, yet a wait
            "1 11 11 0 10\n",   // more remaining than the limit
            "0 11 3 9 100\n",   // refused with room left
            "0 11 0 0 100\n",   // refused with nothing to wait for
            "1 11 10 0\n",      // a field missing
            "1 11 10 0 10 4\n", // a field too many
            "2 11 10 0 10\n",   // not a decision
            "0 Usage: rl NAME BURST COUNT PERIOD_MS [QUANTITY]\n",
        ] {
            assert_eq!(glockd(Cmd::RateLimit, wrong), None, "{wrong:?}");
        }
    }
}
