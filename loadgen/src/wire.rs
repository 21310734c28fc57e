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
}

impl Cmd {
    fn glockd_prefix(self) -> &'static [u8] {
        match self {
            Cmd::Get => b"g ",
            Cmd::Release => b"r ",
            Cmd::Inspect => b"i ",
            Cmd::SharedGet => b"sg ",
            Cmd::SharedRelease => b"sr ",
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
        }
    }
}

/// Appends `cmd` on key `id`, spelt for `target`.
#[inline]
pub fn encode(target: Target, cmd: Cmd, keys: &Keys, id: u64, out: &mut Vec<u8>) {
    match target {
        Target::Glockd | Target::Noop => {
            out.extend_from_slice(cmd.glockd_prefix());
            keys.write_name(id, out);
            out.push(b'\n');
        }
        Target::Redis => {
            out.extend_from_slice(cmd.redis_prefix());
            out.push(b'$');
            out.extend_from_slice(itoa_usize(keys.size()).as_slice());
            out.extend_from_slice(b"\r\n");
            keys.write_name(id, out);
            out.extend_from_slice(b"\r\n");
            if cmd == Cmd::Get {
                out.extend_from_slice(b"$1\r\n1\r\n$2\r\nNX\r\n");
            }
        }
    }
}

/// Decimal digits of a small number, without `fmt`.
fn itoa_usize(mut n: usize) -> Vec<u8> {
    let mut digits = Vec::with_capacity(4);
    loop {
        digits.push(b'0' + (n % 10) as u8);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    digits
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
const MAX_REPLY: usize = 4096;

/// Parses one reply of `target`'s protocol at the front of `buf`.
#[inline]
pub fn parse(target: Target, buf: &[u8]) -> Parsed<'_> {
    match target {
        Target::Glockd | Target::Noop => parse_line(buf),
        Target::Redis => parse_resp(buf),
    }
}

fn line_end(buf: &[u8]) -> Result<usize, Parsed<'_>> {
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

/// RESP2 (and RESP3's null): `+`, `-`, `:`, `$`.
fn parse_resp(buf: &[u8]) -> Parsed<'_> {
    let end = match line_end(buf) {
        Ok(end) => end,
        Err(parsed) => return parsed,
    };
    if end < 2 || buf[end - 1] != b'\r' {
        return Parsed::Malformed(format!("not a RESP line: {}", show(&buf[..end])));
    }
    let head = &buf[1..end - 1];
    let raw = match buf[0] {
        b'+' => Raw::Simple(head),
        b'-' => Raw::Error(head),
        b'_' => Raw::Nil,
        b':' => match parse_i64(head) {
            Some(n) => Raw::Int(n),
            None => return Parsed::Malformed(format!("bad integer: {}", show(&buf[..end]))),
        },
        b'$' => match parse_i64(head) {
            Some(-1) => Raw::Nil,
            Some(len) if len >= 0 && (len as usize) <= MAX_REPLY => {
                let start = end + 1;
                let stop = start + len as usize;
                if buf.len() < stop + 2 {
                    return Parsed::Incomplete;
                }
                if &buf[stop..stop + 2] != b"\r\n" {
                    return Parsed::Malformed(format!("bad bulk: {}", show(&buf[..stop + 2])));
                }
                return Parsed::Reply(Raw::Bulk(&buf[start..stop]), stop + 2);
            }
            _ => return Parsed::Malformed(format!("bad bulk length: {}", show(&buf[..end]))),
        },
        _ => return Parsed::Malformed(format!("unexpected RESP type: {}", show(&buf[..end]))),
    };
    Parsed::Reply(raw, end + 1)
}

fn parse_i64(digits: &[u8]) -> Option<i64> {
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
    /// A shared lock's holder count after `sg` / `INCR`.
    Count(u64),
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
            Cmd::SharedGet => Count(1),
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
        let mut out = Vec::new();
        encode(Target::Glockd, Cmd::SharedGet, &keys, 7, &mut out);
        assert_eq!(out, b"sg k007\n");
        out.clear();
        encode(Target::Redis, Cmd::Get, &keys, 7, &mut out);
        assert_eq!(
            out,
            b"*4\r\n$3\r\nSET\r\n$4\r\nk007\r\n$1\r\n1\r\n$2\r\nNX\r\n"
        );
        out.clear();
        encode(Target::Redis, Cmd::Release, &keys, 12, &mut out);
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
    fn resp_replies_parse_and_classify() {
        let buf = b"+OK\r\n$-1\r\n:1\r\n-ERR no\r\n$3\r\nabc\r\n$3\r\nab";
        let mut at = 0;
        let mut seen = Vec::new();
        while let Parsed::Reply(raw, used) = parse(Target::Redis, &buf[at..]) {
            seen.push(format!("{raw:?}"));
            at += used;
        }
        assert_eq!(seen.len(), 5);
        assert_eq!(parse(Target::Redis, &buf[at..]), Parsed::Incomplete);
        assert_eq!(
            classify(Target::Redis, Cmd::Get, &Raw::Simple(b"OK")),
            Some(Outcome::Granted)
        );
        assert_eq!(
            classify(Target::Redis, Cmd::Get, &Raw::Nil),
            Some(Outcome::Refused)
        );
        assert_eq!(classify(Target::Redis, Cmd::Get, &Raw::Error(b"ERR")), None);
        assert!(matches!(
            parse(Target::Redis, b"*1\r\n"),
            Parsed::Malformed(_)
        ));
    }
}
