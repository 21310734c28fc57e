//! Replies: `%d %s\n` lines whose integer is the contract clients parse (1/0, or a count),
//! and the multi-line listings (`name: holder` rows, or Go's map syntax for `dump`).

use super::Verb;
use crate::name::LockName;

/// A reply to a single-line command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Got,
    NotGot,
    Released,
    NotReleased,
    Locked,
    NotLocked,
    /// `sg`: the number of holders after the call.
    SharedGot(u64),
    SharedReleased,
    SharedNotReleased,
    /// `si`: the number of holders.
    SharedCount(u64),
    Invalid,
    Disabled,
    RegisteredName,
    /// `g`/`sg` refused: the connection holds `--max-locks-per-conn` locks already.
    LimitReached,
    /// `gt`: granted, with the grant's fencing token.
    GotToken(u64),
    /// `t`: the current grant's fencing token.
    Token(u64),
    /// `sgl`/`sgw`: LIMIT connections hold it already.
    SharedFull,
    /// `gw`/`sgw`: not granted within the wait.
    TimedOut,
    /// `rl`: the decision.
    RateLimit(crate::ratelimit::Decision),
    /// Arguments that do not fit the command.
    Usage(Verb),
    /// Arguments of the right form past a limit: a wait longer than `--max-wait-ms` (`gw`,
    /// `sgw`), or a limiter that would take longer than a day to refill (`rl`). The usage line,
    /// then which limit and its value.
    UsageLimit(Verb, u64),
    /// `iam`: a name longer than `--max-name-bytes`.
    NameTooLong,
    /// `iam`: a name in the form of a connection id (`ip:port`, `unix:N`) or of a certificate
    /// identity (`cert:…`), which would let this connection's locks pass for another's in the
    /// listings.
    NameLooksLikeId,
    /// `iam` on a connection named by its client certificate, which no command may change.
    NameFromCertificate,
    /// `iam` with a name that is not UTF-8, or holds a control or invisible formatting
    /// character (a NUL, an escape sequence, a zero-width space…), which could make it read as
    /// another connection's id in a listing.
    NameNotPrintable,
    /// `framed`: multi-line replies are counted from now on.
    Framed,
    /// `g`, `sg`, `gw`, `rl`, `iam`…: what the command would store does not fit in the memory
    /// budget (`--max-memory`); nothing changed.
    OutOfMemory,
    /// A lock name longer than `--max-lock-name-bytes`; nothing changed.
    LockNameTooLong,
    /// With a users file: anything but `auth` before the connection is authenticated.
    AuthRequired,
    /// With a users file: a command outside the user's classes or name prefixes.
    PermissionDenied,
    /// `auth`: the connection is now this user's.
    Authenticated,
    /// `auth`: unknown user or wrong token (the reply does not say which).
    AuthFailed,
    /// `auth` on a server without a users file.
    AuthNotConfigured,
}

impl Reply {
    /// Appends the reply line, `\n` included.
    #[inline]
    pub fn write_to(self, out: &mut Vec<u8>) {
        let text: &[u8] = match self {
            Reply::Got => b"1 Got Lock\n",
            Reply::NotGot => b"0 Cannot Get Lock\n",
            Reply::Released => b"1 Released Lock\n",
            Reply::NotReleased => b"0 Cannot Release Lock\n",
            Reply::Locked => b"1 Locked\n",
            Reply::NotLocked => b"0 Not Locked\n",
            Reply::SharedGot(n) => return write_count(out, n, b" Got Shared Lock\n"),
            Reply::SharedReleased => b"1 Released Shared Lock\n",
            Reply::SharedNotReleased => b"0 Cannot Release Shared Lock\n",
            Reply::SharedCount(0) => b"0 Not Shared Locked\n",
            Reply::SharedCount(n) => return write_count(out, n, b" Shared Locked\n"),
            Reply::Invalid => b"0 Invalid Command\n",
            Reply::Disabled => b"0 disabled\n",
            Reply::RegisteredName => b"1 ok\n",
            Reply::LimitReached => b"0 Lock Limit Reached\n",
            Reply::NameTooLong => b"0 Name Too Long\n",
            Reply::NameLooksLikeId => b"0 Name Looks Like An Id\n",
            Reply::NameFromCertificate => b"0 Name Set By Certificate\n",
            Reply::NameNotPrintable => b"0 Name Not Printable\n",
            Reply::Framed => b"1 Framed\n",
            Reply::OutOfMemory => b"0 Out Of Memory\n",
            Reply::LockNameTooLong => b"0 Name Too Long\n",
            Reply::AuthRequired => b"0 Auth Required\n",
            Reply::PermissionDenied => b"0 Permission Denied\n",
            Reply::Authenticated => b"1 Authenticated\n",
            Reply::AuthFailed => b"0 Auth Failed\n",
            Reply::AuthNotConfigured => b"0 Auth Not Configured (the server has no users file)\n",
            Reply::GotToken(token) => {
                out.extend_from_slice(b"1 ");
                return write_count(out, token, b" Got Lock\n");
            }
            Reply::Token(token) => {
                out.extend_from_slice(b"1 ");
                return write_count(out, token, b" Locked\n");
            }
            Reply::SharedFull => b"0 Shared Lock Full\n",
            Reply::TimedOut => b"0 Timed Out\n",
            Reply::RateLimit(d) => {
                let mut n = itoa::Buffer::new();
                for (at, value) in [u64::from(d.allowed), d.limit, d.remaining]
                    .into_iter()
                    .enumerate()
                {
                    if at > 0 {
                        out.push(b' ');
                    }
                    out.extend_from_slice(n.format(value).as_bytes());
                }
                out.push(b' ');
                out.extend_from_slice(n.format(d.retry_after_ms).as_bytes());
                out.push(b' ');
                out.extend_from_slice(n.format(d.reset_after_ms).as_bytes());
                out.push(b'\n');
                return;
            }
            Reply::Usage(verb) => {
                out.extend_from_slice(b"0 Usage: ");
                out.extend_from_slice(verb.usage().as_bytes());
                out.push(b'\n');
                return;
            }
            Reply::UsageLimit(verb, limit) => {
                out.extend_from_slice(b"0 Usage: ");
                out.extend_from_slice(verb.usage().as_bytes());
                let why = match verb {
                    Verb::RateLimit => {
                        format!(
                            " (a full refill, PERIOD_MS x (BURST + 1) / COUNT, at most {limit} ms)"
                        )
                    }
                    _ => format!(" (MS at most {limit}, -max-wait-ms)"),
                };
                out.extend_from_slice(why.as_bytes());
                out.push(b'\n');
                return;
            }
        };
        out.extend_from_slice(text);
    }

    /// The integer a client parses from this reply.
    pub fn code(self) -> u64 {
        match self {
            Reply::Got | Reply::Released | Reply::Locked => 1,
            Reply::SharedReleased | Reply::RegisteredName | Reply::Framed => 1,
            Reply::Authenticated => 1,
            Reply::GotToken(_) | Reply::Token(_) => 1,
            Reply::SharedGot(n) | Reply::SharedCount(n) => n,
            Reply::RateLimit(d) => u64::from(d.allowed),
            _ => 0,
        }
    }
}

fn write_count(out: &mut Vec<u8>, n: u64, text: &[u8]) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(text);
}

/// The reply line for a line longer than the configured limit (the connection is then closed).
pub const LINE_TOO_LONG: &[u8] = b"0 Line Too Long\n";

/// The one line a websocket client gets for a text message that is not UTF-8 before the
/// connection is closed (the websocket protocol requires text messages to be UTF-8; names that
/// are not go in binary messages).
pub const TEXT_NOT_UTF8: &[u8] = b"0 Text Message Not UTF-8\n";

/// The one line a client gets, in place of its waiting command's answer, when it sent more than
/// a waiting command lets it send behind it; the connection is then closed.
pub const SENT_WHILE_WAITING: &[u8] = b"0 Too Much Sent While Waiting\n";

/// The one line a connection closed for `--max-client-buffers` is offered (if its socket takes
/// it at once) before it is closed.
pub const CLIENT_BUFFERS_FULL: &[u8] = b"0 Client Buffers Full\n";
/// The one line a connection gets before it is closed for `--auth-max-failures` failed
/// `auth`s in a row.
pub const TOO_MANY_AUTH_FAILURES: &[u8] = b"0 Too Many Auth Failures\n";

/// The one line a connection over `--max-connections` gets before it is closed.
pub const TOO_MANY_CONNECTIONS: &[u8] = b"0 Too Many Connections\n";

/// The name of the routing function in the `shards` reply (see [`crate::routing::shard_of`]).
pub const ROUTING: &str = "fnv1a64";

/// `shards`: `1 COUNT fnv1a64 [PORT…]`, the ports being each shard's own, in shard order,
/// when the server has them (`-shard-port`).
pub fn write_shards(count: usize, ports: &[u16], out: &mut Vec<u8>) {
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(b"1 ");
    out.extend_from_slice(n.format(count).as_bytes());
    out.push(b' ');
    out.extend_from_slice(ROUTING.as_bytes());
    for port in ports {
        out.push(b' ');
        out.extend_from_slice(n.format(*port).as_bytes());
    }
    out.push(b'\n');
}

/// The framed form of a multi-line reply (after `framed`): a line `N lines` counting the
/// lines that follow, then the lines. Zero lines is `0 lines`; a command turned off answers
/// `0 disabled`, which reads the same way: nothing follows a line whose integer is 0.
pub fn write_framed(lines: &[u8], out: &mut Vec<u8>) {
    let count = memchr::memchr_iter(b'\n', lines).count();
    out.extend_from_slice(itoa::Buffer::new().format(count).as_bytes());
    out.extend_from_slice(b" lines\n");
    out.extend_from_slice(lines);
}

/// Writes listing rows as `name: holder` lines (`d`, `sd`, `h`). No rows, no bytes: the
/// original's form.
pub fn write_rows<H: AsRef<[u8]>>(rows: &[(LockName, H)], out: &mut Vec<u8>) {
    for (name, holder) in rows {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(holder.as_ref());
        out.push(b'\n');
    }
}

/// `dump` / `dump shared`: one line in Go's `%v` map syntax, keys sorted (`rows` must be sorted
/// by name), raw connection ids: `map[a:x b:y]`, or for shared locks `map[a:[x y]]`.
pub fn write_go_map<H: AsRef<[u8]>>(rows: &[(LockName, H)], shared_locks: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(b"map[");
    let mut previous: Option<&LockName> = None;
    for (name, holder) in rows {
        if previous == Some(name) {
            out.push(b' ');
        } else {
            if previous.is_some() {
                if shared_locks {
                    out.push(b']');
                }
                out.push(b' ');
            }
            out.extend_from_slice(name.as_bytes());
            out.push(b':');
            if shared_locks {
                out.push(b'[');
            }
        }
        out.extend_from_slice(holder.as_ref());
        previous = Some(name);
    }
    if shared_locks && previous.is_some() {
        out.push(b']');
    }
    out.extend_from_slice(b"]\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_one_line_with_the_integer_first() {
        let mut out = Vec::new();
        Reply::Got.write_to(&mut out);
        Reply::SharedGot(12).write_to(&mut out);
        Reply::SharedCount(0).write_to(&mut out);
        Reply::Invalid.write_to(&mut out);
        Reply::GotToken(1234).write_to(&mut out);
        Reply::Usage(Verb::GetWait).write_to(&mut out);
        Reply::UsageLimit(Verb::GetWait, 3_600_000).write_to(&mut out);
        Reply::UsageLimit(Verb::RateLimit, 86_400_000).write_to(&mut out);
        Reply::RateLimit(crate::ratelimit::Decision {
            allowed: false,
            limit: 16,
            remaining: 0,
            retry_after_ms: -1,
            reset_after_ms: 3000,
        })
        .write_to(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1 Got Lock\n12 Got Shared Lock\n0 Not Shared Locked\n0 Invalid Command\n\
             1 1234 Got Lock\n0 Usage: gw MS NAME\n\
             0 Usage: gw MS NAME (MS at most 3600000, -max-wait-ms)\n\
             0 Usage: rl NAME BURST COUNT PERIOD_MS [QUANTITY] (a full refill, PERIOD_MS x \
             (BURST + 1) / COUNT, at most 86400000 ms)\n0 16 0 -1 3000\n"
        );
    }

    #[test]
    fn dumps_use_go_map_syntax() {
        let rows = |pairs: &[(&str, &str)]| -> Vec<(LockName, Vec<u8>)> {
            pairs
                .iter()
                .map(|(n, h)| (LockName::from(*n), h.as_bytes().to_vec()))
                .collect()
        };
        let mut out = Vec::new();
        write_go_map(&rows(&[]), false, &mut out);
        write_go_map(&rows(&[("a", "x"), ("b", "y")]), false, &mut out);
        write_go_map(&rows(&[("a", "x"), ("a", "y"), ("b", "z")]), true, &mut out);
        write_rows(&rows(&[("a", "x")]), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "map[]\nmap[a:x b:y]\nmap[a:[x y] b:[z]]\na: x\n"
        );
    }
}
