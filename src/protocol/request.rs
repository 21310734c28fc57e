//! Requests: one line in, one typed [`Request`] out ([`parse`]), and back again
//! ([`Request::write_to`], which the client uses), so the server and its client speak through
//! one definition of every command.
//!
//! Parsing follows the original server exactly: surrounding whitespace is trimmed, the command
//! word is the text before the first whitespace, and the argument is the rest with every run of
//! whitespace collapsed to one space. Numbers are parsed here too, so a request that leaves
//! [`parse`] is complete: the session only routes it.

use super::{is_space, normalise, trim, Verb};
use crate::name::LockName;

/// Which of the two lock namespaces: exclusive (`g`…) or counted shared (`sg`…).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockKind {
    Exclusive,
    Shared,
}

/// The parameters of `rl`, compact so that lock operations stay small in mailbox batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateParams {
    pub burst: u32,
    pub count: u32,
    pub period_ms: u32,
    pub quantity: u32,
}

impl From<RateParams> for crate::ratelimit::Limit {
    fn from(p: RateParams) -> Self {
        crate::ratelimit::Limit {
            burst: u64::from(p.burst),
            count: u64::from(p.count),
            period_ms: u64::from(p.period_ms),
            quantity: u64::from(p.quantity),
        }
    }
}

/// An operation on one named lock, answered at once: these are routed to the shard that owns
/// the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockOp {
    Get,
    Release,
    Inspect,
    SharedGet,
    SharedRelease,
    SharedInspect,
    GetToken,
    Token,
    /// `sgl`: take a shared lock if fewer than this many hold it.
    SharedGetLimit(u32),
    RateLimit(RateParams),
}

impl LockOp {
    /// The command word that asks for this operation.
    pub fn verb(self) -> Verb {
        match self {
            LockOp::Get => Verb::Get,
            LockOp::Release => Verb::Release,
            LockOp::Inspect => Verb::Inspect,
            LockOp::SharedGet => Verb::SharedGet,
            LockOp::SharedRelease => Verb::SharedRelease,
            LockOp::SharedInspect => Verb::SharedInspect,
            LockOp::GetToken => Verb::GetToken,
            LockOp::Token => Verb::Token,
            LockOp::SharedGetLimit(_) => Verb::SharedGetLimit,
            LockOp::RateLimit(_) => Verb::RateLimit,
        }
    }
}

/// Which kind of lock a waiter (`gw`, `sgw`) waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitKind {
    /// `gw`: the exclusive lock.
    Exclusive,
    /// `sgw`: a shared lock, once fewer than `limit` connections hold it.
    Shared { limit: u64 },
}

impl WaitKind {
    /// The namespace of the lock waited for.
    pub fn lock_kind(self) -> LockKind {
        match self {
            WaitKind::Exclusive => LockKind::Exclusive,
            WaitKind::Shared { .. } => LockKind::Shared,
        }
    }
}

/// Which listing a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// `d`/`sd` (holders by registered name, one `name: holder` line each), or, `raw`,
    /// `dump`/`dump shared` (raw connection ids, one line in Go's map syntax).
    Locks { kind: LockKind, raw: bool },
    /// `h`: holders and waiters with their ages.
    Holders,
}

/// A secret from the wire (`auth`'s token): its bytes never show in `Debug` output, so a
/// request logged or printed by a failing test does not leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<[u8]>);

impl Secret {
    pub fn new(bytes: &[u8]) -> Secret {
        Secret(bytes.into())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One parsed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A line with nothing but whitespace: it gets no reply at all.
    Empty,
    /// A command word the server does not know; answered `0 Invalid Command`.
    Invalid,
    /// A known command whose arguments do not fit it; answered `0 Usage: …`.
    Usage(Verb),
    /// `g r i sg sr si gt t sgl rl`: one operation on one lock, answered at once.
    Lock { op: LockOp, name: LockName },
    /// `gw MS NAME` / `sgw MS LIMIT NAME`: take a lock, waiting up to `ms` for it.
    Wait {
        ms: u64,
        kind: WaitKind,
        name: LockName,
    },
    /// `d`, `sd`, `dump`, `h`: a listing of every lock, or of one name's.
    List {
        kind: ListKind,
        name: Option<LockName>,
    },
    /// `iam NAME`: register a name for this connection (empty clears it).
    Iam(LockName),
    /// `who [NAME]`: the registry, all of it or the connections registered as NAME.
    Who(Option<LockName>),
    /// `me`: this connection's id and name.
    Me,
    /// `q`: the stats.
    Stats,
    /// `shards`: the shard count, the routing function and the shard ports.
    Shards,
    /// `framed`: count the lines of every multi-line reply from now on.
    Framed,
    /// `auth USER TOKEN`: authenticate the connection as USER (a user of the users file).
    Auth { user: Box<[u8]>, token: Secret },
}

impl Request {
    /// The command word this request came from (None for empty and unknown lines).
    pub fn verb(&self) -> Option<Verb> {
        Some(match self {
            Request::Empty | Request::Invalid => return None,
            Request::Usage(verb) => *verb,
            Request::Lock { op, .. } => op.verb(),
            Request::Wait {
                kind: WaitKind::Exclusive,
                ..
            } => Verb::GetWait,
            Request::Wait { .. } => Verb::SharedGetWait,
            Request::List { kind, .. } => match kind {
                ListKind::Locks {
                    kind: LockKind::Exclusive,
                    raw: false,
                } => Verb::Dump,
                ListKind::Locks {
                    kind: LockKind::Shared,
                    raw: false,
                } => Verb::SharedDump,
                ListKind::Locks { raw: true, .. } => Verb::FullDump,
                ListKind::Holders => Verb::Holders,
            },
            Request::Iam(_) => Verb::Iam,
            Request::Who(_) => Verb::Who,
            Request::Me => Verb::Me,
            Request::Stats => Verb::Stats,
            Request::Shards => Verb::Shards,
            Request::Framed => Verb::Framed,
            Request::Auth { .. } => Verb::Auth,
        })
    }

    /// The lock or registered name the request is about, if any.
    pub fn name(&self) -> Option<&LockName> {
        match self {
            Request::Lock { name, .. } | Request::Wait { name, .. } | Request::Iam(name) => {
                Some(name)
            }
            Request::List { name, .. } | Request::Who(name) => name.as_ref(),
            _ => None,
        }
    }

    /// Appends the request as a line, `\n` included: what a client sends. Lines that are not
    /// commands (`Empty`, `Invalid`) are written as an empty line; `Usage(verb)` as the bare
    /// word. For every request that came from [`parse`], parsing the written line gives the
    /// request back.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let number = |out: &mut Vec<u8>, n: u64| {
            out.push(b' ');
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        };
        let name_part = |out: &mut Vec<u8>, name: &LockName| {
            out.push(b' ');
            out.extend_from_slice(name.as_bytes());
        };
        if let Some(verb) = self.verb() {
            out.extend_from_slice(verb.word().as_bytes());
        }
        match self {
            Request::Lock { op, name } => {
                if let LockOp::SharedGetLimit(limit) = op {
                    number(out, u64::from(*limit));
                }
                name_part(out, name);
                if let LockOp::RateLimit(p) = op {
                    for n in [p.burst, p.count, p.period_ms, p.quantity] {
                        number(out, u64::from(n));
                    }
                }
            }
            Request::Wait { ms, kind, name } => {
                number(out, *ms);
                if let WaitKind::Shared { limit } = kind {
                    number(out, *limit);
                }
                name_part(out, name);
            }
            Request::List {
                kind:
                    ListKind::Locks {
                        kind: LockKind::Shared,
                        raw: true,
                    },
                ..
            } => out.extend_from_slice(b" shared"),
            Request::List {
                name: Some(name), ..
            }
            | Request::Who(Some(name))
            | Request::Iam(name) => name_part(out, name),
            Request::Auth { user, token } => {
                out.push(b' ');
                out.extend_from_slice(user);
                out.push(b' ');
                out.extend_from_slice(token.expose());
            }
            _ => {}
        }
        out.push(b'\n');
    }
}

/// Parses one line (without its `\n`; a trailing `\r` is trimmed like any whitespace).
#[inline]
pub fn parse(line: &[u8]) -> Request {
    let line = trim(line);
    if line.is_empty() {
        return Request::Empty;
    }
    let (word, rest) = match line.iter().position(|&b| is_space(b)) {
        Some(at) => (&line[..at], &line[at + 1..]),
        None => (line, &[][..]),
    };
    let Some(verb) = Verb::from_word(word) else {
        return Request::Invalid;
    };
    // The hot path, kept small enough to inline: a plain lock command is its operation and a
    // name. Everything else is parsed out of line.
    match plain_lock_op(verb) {
        Some(op) => Request::Lock {
            op,
            name: normalise(rest),
        },
        None => parse_other(verb, rest),
    }
}

/// The operation of a lock command that takes nothing but a name.
#[inline]
fn plain_lock_op(verb: Verb) -> Option<LockOp> {
    Some(match verb {
        Verb::Get => LockOp::Get,
        Verb::Release => LockOp::Release,
        Verb::Inspect => LockOp::Inspect,
        Verb::SharedGet => LockOp::SharedGet,
        Verb::SharedRelease => LockOp::SharedRelease,
        Verb::SharedInspect => LockOp::SharedInspect,
        Verb::GetToken => LockOp::GetToken,
        Verb::Token => LockOp::Token,
        _ => return None,
    })
}

/// The commands that are not a plain operation on one name: numbers, listings, the registry.
#[inline(never)]
fn parse_other(verb: Verb, rest: &[u8]) -> Request {
    let optional = || Some(normalise(rest)).filter(|name| !name.is_empty());
    let locks = |kind, raw| ListKind::Locks { kind, raw };
    match verb {
        // `parse` took these.
        Verb::Get
        | Verb::Release
        | Verb::Inspect
        | Verb::SharedGet
        | Verb::SharedRelease
        | Verb::SharedInspect
        | Verb::GetToken
        | Verb::Token => Request::Lock {
            op: plain_lock_op(verb).unwrap_or(LockOp::Inspect),
            name: normalise(rest),
        },
        Verb::SharedGetLimit => parse_numbers_then_name(rest, 1)
            .and_then(|([limit, ..], name)| {
                let limit = u32::try_from(limit).ok()?;
                Some(Request::Lock {
                    op: LockOp::SharedGetLimit(limit),
                    name,
                })
            })
            .unwrap_or(Request::Usage(verb)),
        Verb::RateLimit => match parse_rate_limit(normalise(rest).as_bytes()) {
            Some((name, params)) => Request::Lock {
                op: LockOp::RateLimit(params),
                name,
            },
            None => Request::Usage(verb),
        },
        Verb::GetWait => match parse_numbers_then_name(rest, 1) {
            Some(([ms, _], name)) => Request::Wait {
                ms,
                kind: WaitKind::Exclusive,
                name,
            },
            None => Request::Usage(verb),
        },
        Verb::SharedGetWait => match parse_numbers_then_name(rest, 2) {
            // A limit of 0 can never be met: such a waiter could only sit in the queue until
            // its time is up, so it is refused like any other malformed argument. (`sgl 0`
            // stays an answer, `0 Shared Lock Full`: it queues nothing.)
            Some(([ms, limit], name)) if limit >= 1 => Request::Wait {
                ms,
                kind: WaitKind::Shared { limit },
                name,
            },
            _ => Request::Usage(verb),
        },
        Verb::Dump => Request::List {
            kind: locks(LockKind::Exclusive, false),
            name: optional(),
        },
        Verb::SharedDump => Request::List {
            kind: locks(LockKind::Shared, false),
            name: optional(),
        },
        Verb::FullDump => {
            // As the original: `dump shared` is the shared table, anything else the exclusive.
            let kind = if normalise(rest).as_bytes() == b"shared" {
                LockKind::Shared
            } else {
                LockKind::Exclusive
            };
            Request::List {
                kind: locks(kind, true),
                name: None,
            }
        }
        Verb::Holders => Request::List {
            kind: ListKind::Holders,
            name: optional(),
        },
        Verb::Iam => Request::Iam(normalise(rest)),
        Verb::Who => Request::Who(optional()),
        Verb::Me => Request::Me,
        Verb::Stats => Request::Stats,
        Verb::Shards => Request::Shards,
        Verb::Framed => Request::Framed,
        Verb::Auth => {
            // USER and TOKEN are one word each: a token with whitespace inside could not
            // survive the collapsing of whitespace every line goes through.
            let arg = normalise(rest);
            let mut words = arg.as_bytes().split(|&b| b == b' ');
            match (words.next(), words.next(), words.next()) {
                (Some(user), Some(token), None) if !user.is_empty() && !token.is_empty() => {
                    Request::Auth {
                        user: user.into(),
                        token: Secret::new(token),
                    }
                }
                _ => Request::Usage(verb),
            }
        }
    }
}

/// `COUNT` leading decimal numbers, then the name: `"500 3 my lock"` with `COUNT` 2 gives
/// `([500, 3], "my lock")`. Unused places of the array are 0.
fn parse_numbers_then_name(arg: &[u8], count: usize) -> Option<([u64; 2], LockName)> {
    let mut numbers = [0; 2];
    let mut rest = normalise(arg);
    for number in numbers.iter_mut().take(count) {
        let (n, name) = split_number(rest.as_bytes())?;
        *number = n;
        rest = LockName::new(name);
    }
    Some((numbers, rest))
}

/// Splits a leading decimal number off a normalised argument: `"500 my lock"` gives
/// `(500, "my lock")`.
pub fn split_number(arg: &[u8]) -> Option<(u64, &[u8])> {
    let (word, rest) = match arg.iter().position(|&b| b == b' ') {
        Some(at) => (&arg[..at], &arg[at + 1..]),
        None => (arg, &[][..]),
    };
    Some((parse_u64(word)?, rest))
}

fn parse_u64(word: &[u8]) -> Option<u64> {
    if word.is_empty() || word.len() > 19 || !word.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(word).ok()?.parse().ok()
}

/// The longest a rate limiter may take to refill completely, `PERIOD_MS x (BURST + 1) / COUNT`:
/// one day.
pub const MAX_RATE_LIMIT_WINDOW_MS: u64 = 86_400_000;

/// Parses `rl`'s argument, `NAME BURST COUNT PERIOD_MS [QUANTITY]`, from the right (names may
/// contain spaces): the last four words are BURST COUNT PERIOD_MS QUANTITY when all four are
/// numbers and a name remains before them, else the last three are BURST COUNT PERIOD_MS.
pub fn parse_rate_limit(arg: &[u8]) -> Option<(LockName, RateParams)> {
    let (name_len, params) = rate_limit_parts(arg)?;
    if refill_ms(&params) > MAX_RATE_LIMIT_WINDOW_MS {
        return None;
    }
    Some((LockName::new(&arg[..name_len]), params))
}

/// Whether `line` is an `rl` command of the right form whose limiter would take longer than
/// [`MAX_RATE_LIMIT_WINDOW_MS`] to refill: the one reason a well-formed `rl` is refused.
pub fn refill_too_long(line: &[u8]) -> bool {
    let line = normalise(line);
    let Some(arg) = line.as_bytes().strip_prefix(b"rl ") else {
        return false;
    };
    rate_limit_parts(arg).is_some_and(|(_, params)| refill_ms(&params) > MAX_RATE_LIMIT_WINDOW_MS)
}

/// The time a limiter takes to refill completely: `PERIOD_MS x (BURST + 1) / COUNT`.
fn refill_ms(params: &RateParams) -> u64 {
    u64::from(params.period_ms) * (u64::from(params.burst) + 1) / u64::from(params.count.max(1))
}

/// `rl`'s argument split into the name's length and the numbers, checked for form (COUNT and
/// PERIOD_MS above zero) but not for the refill bound.
fn rate_limit_parts(arg: &[u8]) -> Option<(usize, RateParams)> {
    let words: Vec<&[u8]> = arg.split(|&b| b == b' ').collect();
    let numbers = |from: usize| -> Option<Vec<u32>> {
        words[from..]
            .iter()
            .map(|w| parse_u64(w).and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    let (name_words, numbers) = match words.len() {
        n if n >= 5 && numbers(n - 4).is_some() => (n - 4, numbers(n - 4)?),
        n if n >= 4 => (n - 3, numbers(n - 3)?),
        _ => return None,
    };
    let params = RateParams {
        burst: numbers[0],
        count: numbers[1],
        period_ms: numbers[2],
        quantity: numbers.get(3).copied().unwrap_or(1),
    };
    if params.count == 0 || params.period_ms == 0 {
        return None;
    }
    let name_len = words[..name_words].iter().map(|w| w.len()).sum::<usize>() + name_words - 1;
    Some((name_len, params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lock(op: LockOp, name: &[u8]) -> Request {
        Request::Lock {
            op,
            name: LockName::new(name),
        }
    }

    #[test]
    fn command_word_and_name() {
        assert_eq!(parse(b"g foo"), lock(LockOp::Get, b"foo"));
        assert_eq!(parse(b"sg foo"), lock(LockOp::SharedGet, b"foo"));
        assert_eq!(
            parse(b"dump shared"),
            Request::List {
                kind: ListKind::Locks {
                    kind: LockKind::Shared,
                    raw: true
                },
                name: None
            }
        );
        assert_eq!(parse(b"q"), Request::Stats);
    }

    #[test]
    fn whitespace_is_trimmed_and_collapsed_like_the_go_client_sends_it() {
        assert_eq!(parse(b" g  foo\n"), lock(LockOp::Get, b"foo"));
        assert_eq!(parse(b"g  foo   bar \r"), lock(LockOp::Get, b"foo bar"));
        assert_eq!(parse(b"g\tfoo\t\tbar"), lock(LockOp::Get, b"foo bar"));
        assert_eq!(parse(b"g a\x0b\x0cb"), lock(LockOp::Get, b"a b"));
    }

    #[test]
    fn crlf_and_lone_cr_are_whitespace() {
        assert_eq!(parse(b"i foo\r"), lock(LockOp::Inspect, b"foo"));
        assert_eq!(parse(b"i fo\ro"), lock(LockOp::Inspect, b"fo o"));
    }

    #[test]
    fn empty_lines_get_no_reply_and_unknown_words_are_invalid() {
        assert_eq!(parse(b""), Request::Empty);
        assert_eq!(parse(b" \r"), Request::Empty);
        assert_eq!(parse(b"get foo"), Request::Invalid);
        assert_eq!(parse(b"G foo"), Request::Invalid);
        assert_eq!(parse(b"\0"), Request::Invalid);
    }

    #[test]
    fn empty_name_is_allowed_like_the_original() {
        assert_eq!(parse(b"g"), lock(LockOp::Get, b""));
        assert_eq!(parse(b"g    "), lock(LockOp::Get, b""));
    }

    #[test]
    fn long_and_non_ascii_names_are_kept_byte_for_byte() {
        let long = vec![b'n'; 10_000];
        let mut line = b"g ".to_vec();
        line.extend_from_slice(&long);
        assert_eq!(parse(&line), lock(LockOp::Get, &long));
        assert_eq!(
            parse(b"g \xff\xfe\x00x"),
            lock(LockOp::Get, b"\xff\xfe\x00x")
        );
        assert_eq!(
            parse("g naïve  verrou".as_bytes()),
            lock(LockOp::Get, "naïve verrou".as_bytes())
        );
    }

    #[test]
    fn numbers_come_before_the_name_and_bad_ones_are_usage() {
        assert_eq!(
            parse(b"gw 500  my lock"),
            Request::Wait {
                ms: 500,
                kind: WaitKind::Exclusive,
                name: LockName::from("my lock")
            }
        );
        assert_eq!(
            parse(b"sgw 10 3 pool"),
            Request::Wait {
                ms: 10,
                kind: WaitKind::Shared { limit: 3 },
                name: LockName::from("pool")
            }
        );
        assert_eq!(
            parse(b"sgl 4 pool"),
            lock(LockOp::SharedGetLimit(4), b"pool")
        );
        assert_eq!(parse(b"gw x5 name"), Request::Usage(Verb::GetWait));
        assert_eq!(parse(b"gw -1 name"), Request::Usage(Verb::GetWait));
        assert_eq!(parse(b"gw"), Request::Usage(Verb::GetWait));
        assert_eq!(parse(b"sgw 10 pool"), Request::Usage(Verb::SharedGetWait));
        assert_eq!(parse(b"sgw 10 0 pool"), Request::Usage(Verb::SharedGetWait));
        assert_eq!(
            parse(b"sgw 10 00 pool"),
            Request::Usage(Verb::SharedGetWait)
        );
        assert_eq!(
            parse(b"sgw 10 1 pool"),
            Request::Wait {
                ms: 10,
                kind: WaitKind::Shared { limit: 1 },
                name: LockName::from("pool")
            }
        );
        // `sgl 0` is an answer, not a usage error: it never has room, and it queues nothing.
        assert_eq!(
            parse(b"sgl 0 pool"),
            lock(LockOp::SharedGetLimit(0), b"pool")
        );
        assert_eq!(
            parse(b"sgl 4294967296 pool"),
            Request::Usage(Verb::SharedGetLimit)
        );
        assert_eq!(parse(b"rl n 15 0 60000"), Request::Usage(Verb::RateLimit));
        assert_eq!(parse(b"d"), parse(b"d   "));
        assert_eq!(
            parse(b"who  a   b"),
            Request::Who(Some(LockName::from("a b")))
        );
    }

    #[test]
    fn auth_takes_a_user_and_a_token_and_hides_the_token() {
        let request = parse(b"auth  alice   s3cret ");
        assert_eq!(
            request,
            Request::Auth {
                user: b"alice"[..].into(),
                token: Secret::new(b"s3cret"),
            }
        );
        assert!(!format!("{request:?}").contains("s3cret"));
        let mut written = Vec::new();
        request.write_to(&mut written);
        assert_eq!(written, b"auth alice s3cret\n");
        assert_eq!(parse(b"auth"), Request::Usage(Verb::Auth));
        assert_eq!(parse(b"auth alice"), Request::Usage(Verb::Auth));
        assert_eq!(parse(b"auth alice a b"), Request::Usage(Verb::Auth));
    }

    #[test]
    fn numbers_before_the_name_and_rate_limits_from_the_right() {
        assert_eq!(split_number(b"500 my lock"), Some((500, &b"my lock"[..])));
        assert_eq!(split_number(b"500"), Some((500, &b""[..])));
        assert_eq!(split_number(b"x5 name"), None);
        assert_eq!(split_number(b"-1 name"), None);
        assert_eq!(split_number(b""), None);
        assert_eq!(split_number(b"99999999999999999999 n"), None);
        let p = |burst, count, period_ms, quantity| RateParams {
            burst,
            count,
            period_ms,
            quantity,
        };
        assert_eq!(
            parse_rate_limit(b"api:user 15 30 60000"),
            Some((LockName::from("api:user"), p(15, 30, 60000, 1)))
        );
        assert_eq!(
            parse_rate_limit(b"api user 15 30 60000 3"),
            Some((LockName::from("api user"), p(15, 30, 60000, 3)))
        );
        assert_eq!(
            parse_rate_limit(b"my api 15 30 60000"),
            Some((LockName::from("my api"), p(15, 30, 60000, 1)))
        );
        assert_eq!(parse_rate_limit(b"15 30 60000"), None);
        assert_eq!(parse_rate_limit(b"n 15 0 60000"), None);
        assert_eq!(parse_rate_limit(b"n 15 30 0"), None);
        assert_eq!(parse_rate_limit(b"n x 30 1000"), None);
        // A state that would live 50 days is refused; a day is the most.
        assert_eq!(parse_rate_limit(b"n 1 1 4294967295"), None);
        assert!(parse_rate_limit(b"n 0 1 86400000").is_some());
        assert_eq!(parse_rate_limit(b"n 1 1 86400000"), None);
    }

    proptest! {
        /// What the client writes is what the server reads: any line that parses to a
        /// command, written back out, parses to the same command.
        #[test]
        fn written_requests_parse_back_to_themselves(
            word in proptest::sample::select(Verb::ALL.iter().map(|v| v.word()).collect::<Vec<_>>()),
            numbers in proptest::collection::vec(0u64..5_000, 0..5),
            name in "[a-z :]{0,12}",
        ) {
            let mut line = word.to_owned();
            for n in &numbers {
                line.push_str(&format!(" {n}"));
            }
            line.push(' ');
            line.push_str(&name);
            let request = parse(line.as_bytes());
            let mut written = Vec::new();
            request.write_to(&mut written);
            prop_assert_eq!(written.last(), Some(&b'\n'));
            if !matches!(request, Request::Usage(_)) {
                prop_assert_eq!(parse(&written[..written.len() - 1]), request);
            }
        }
    }
}
