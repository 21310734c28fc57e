//! The line protocol: one request per line in, one (or, for listings, several) lines out.
//!
//! Parsing follows the original server exactly: surrounding whitespace is trimmed, the command
//! word is the text before the first whitespace, and the argument (a lock name, or a name for
//! `iam`/`who`) is the rest with every run of whitespace collapsed to one space. The original Go
//! client really sends ` g  name\n`, so the collapsing is load-bearing, not cosmetic.
//!
//! Replies are `%d %s\n`: the integer is the contract clients parse, the text is for people.

use crate::name::LockName;

/// Bytes that separate words: ASCII whitespace as Go's `strings.Fields` sees it (vertical tab
/// included, which Rust's `is_ascii_whitespace` leaves out).
#[inline]
pub fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// Every command word the server knows, in the order of the `q` counters (see [`Verb::ALL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    /// `d [NAME]`: list exclusive locks and their holders.
    Dump,
    /// `dump [shared]`: the lock table in Go's map syntax.
    FullDump,
    /// `g NAME`: take an exclusive lock.
    Get,
    /// `gt NAME`: take an exclusive lock and answer its fencing token.
    GetToken,
    /// `gw MS NAME`: take an exclusive lock, waiting up to MS milliseconds for it.
    GetWait,
    /// `h [NAME]`: holders and waiters, with how long each has held or waited.
    Holders,
    /// `i NAME`: is the exclusive lock held?
    Inspect,
    /// `iam NAME`: register a name for this connection.
    Iam,
    /// `me`: this connection's id and registered name.
    Me,
    /// `q`: the stats.
    Stats,
    /// `r NAME`: release an exclusive lock this connection holds.
    Release,
    /// `rl NAME BURST COUNT PERIOD_MS [QUANTITY]`: a GCRA rate limit decision.
    RateLimit,
    /// `sd [NAME]`: list shared locks and their holders.
    SharedDump,
    /// `sg NAME`: take a shared lock; answers the holder count.
    SharedGet,
    /// `sgl LIMIT NAME`: take a shared lock only if fewer than LIMIT hold it.
    SharedGetLimit,
    /// `sgw MS LIMIT NAME`: like `sgl`, waiting up to MS milliseconds for a free slot.
    SharedGetWait,
    /// `si NAME`: the holder count of a shared lock.
    SharedInspect,
    /// `sr NAME`: release a shared lock this connection holds.
    SharedRelease,
    /// `t NAME`: the fencing token of the exclusive lock's current grant.
    Token,
    /// `who [NAME]`: the registry.
    Who,
}

impl Verb {
    /// All verbs, sorted by their command word, so `q` can print its counters in order.
    pub const ALL: [Verb; 20] = [
        Verb::Dump,
        Verb::FullDump,
        Verb::Get,
        Verb::GetToken,
        Verb::GetWait,
        Verb::Holders,
        Verb::Inspect,
        Verb::Iam,
        Verb::Me,
        Verb::Stats,
        Verb::Release,
        Verb::RateLimit,
        Verb::SharedDump,
        Verb::SharedGet,
        Verb::SharedGetLimit,
        Verb::SharedGetWait,
        Verb::SharedInspect,
        Verb::SharedRelease,
        Verb::Token,
        Verb::Who,
    ];

    /// The number of verbs (the size of per-verb counter arrays).
    pub const COUNT: usize = Self::ALL.len();

    /// The command word as clients send it.
    pub fn word(self) -> &'static str {
        match self {
            Verb::Dump => "d",
            Verb::FullDump => "dump",
            Verb::Get => "g",
            Verb::GetToken => "gt",
            Verb::GetWait => "gw",
            Verb::Holders => "h",
            Verb::Inspect => "i",
            Verb::Iam => "iam",
            Verb::Me => "me",
            Verb::Stats => "q",
            Verb::Release => "r",
            Verb::RateLimit => "rl",
            Verb::SharedDump => "sd",
            Verb::SharedGet => "sg",
            Verb::SharedGetLimit => "sgl",
            Verb::SharedGetWait => "sgw",
            Verb::SharedInspect => "si",
            Verb::SharedRelease => "sr",
            Verb::Token => "t",
            Verb::Who => "who",
        }
    }

    /// How the command is written, for the `0 Usage: …` answer to bad arguments.
    pub fn usage(self) -> &'static str {
        match self {
            Verb::GetWait => "gw MS NAME",
            Verb::SharedGetLimit => "sgl LIMIT NAME",
            Verb::SharedGetWait => "sgw MS LIMIT NAME",
            Verb::RateLimit => "rl NAME BURST COUNT PERIOD_MS [QUANTITY]",
            _ => self.word(),
        }
    }

    /// Index into per-verb arrays.
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    /// Looks up a command word; `None` for anything the server does not know.
    #[inline]
    pub fn from_word(word: &[u8]) -> Option<Verb> {
        Some(match word {
            b"g" => Verb::Get,
            b"r" => Verb::Release,
            b"i" => Verb::Inspect,
            b"sg" => Verb::SharedGet,
            b"sr" => Verb::SharedRelease,
            b"si" => Verb::SharedInspect,
            b"d" => Verb::Dump,
            b"sd" => Verb::SharedDump,
            b"dump" => Verb::FullDump,
            b"q" => Verb::Stats,
            b"me" => Verb::Me,
            b"iam" => Verb::Iam,
            b"who" => Verb::Who,
            b"gt" => Verb::GetToken,
            b"gw" => Verb::GetWait,
            b"h" => Verb::Holders,
            b"rl" => Verb::RateLimit,
            b"sgl" => Verb::SharedGetLimit,
            b"sgw" => Verb::SharedGetWait,
            b"t" => Verb::Token,
            _ => return None,
        })
    }

    /// The operation on one lock that this verb performs with no arguments beyond the name.
    #[inline]
    pub fn lock_op(self) -> Option<LockOp> {
        Some(match self {
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

/// An operation on one named lock: these are routed to the shard that owns the name.
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
    // A limiter's state lives until it is back to full capacity: bound that time (a day), so
    // no request can pin memory for longer.
    let refill_ms = u64::from(params.period_ms) * (u64::from(params.burst) + 1)
        / u64::from(params.count.max(1));
    if params.count == 0 || params.period_ms == 0 || refill_ms > MAX_RATE_LIMIT_WINDOW_MS {
        return None;
    }
    let name_len = words[..name_words].iter().map(|w| w.len()).sum::<usize>() + name_words - 1;
    Some((LockName::new(&arg[..name_len]), params))
}

/// One parsed line.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// A line with nothing but whitespace: it gets no reply at all.
    Empty,
    /// A command word the server does not know; answered with [`Reply::Invalid`].
    Invalid,
    /// A known command and its (normalised, possibly empty) argument.
    Command { verb: Verb, arg: LockName },
}

/// Parses one line (without its `\n`; a trailing `\r` is trimmed like any whitespace).
pub fn parse(line: &[u8]) -> Request {
    let line = trim(line);
    if line.is_empty() {
        return Request::Empty;
    }
    let (word, rest) = match line.iter().position(|&b| is_space(b)) {
        Some(at) => (&line[..at], &line[at + 1..]),
        None => (line, &[][..]),
    };
    match Verb::from_word(word) {
        Some(verb) => Request::Command {
            verb,
            arg: normalise(rest),
        },
        None => Request::Invalid,
    }
}

/// Trims whitespace from both ends.
pub fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_space(*first) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !is_space(*last) {
            break;
        }
        s = rest;
    }
    s
}

/// Trims `arg` and collapses every run of whitespace inside it to one space: `" a \t b "` names
/// the lock `a b`. Copies the bytes straight through when there is nothing to collapse.
pub fn normalise(arg: &[u8]) -> LockName {
    let arg = trim(arg);
    let already_normal = arg
        .iter()
        .enumerate()
        .all(|(at, &b)| !is_space(b) || (b == b' ' && !is_space(arg[at + 1])));
    if already_normal {
        // `at + 1` above is in bounds: a trimmed slice never ends in whitespace.
        return LockName::new(arg);
    }
    let mut out = Vec::with_capacity(arg.len());
    let mut in_space = false;
    for &b in arg {
        if is_space(b) {
            in_space = true;
        } else {
            if in_space {
                out.push(b' ');
                in_space = false;
            }
            out.push(b);
        }
    }
    LockName::new(&out)
}

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
        };
        out.extend_from_slice(text);
    }

    /// The integer a client parses from this reply.
    pub fn code(self) -> u64 {
        match self {
            Reply::Got | Reply::Released | Reply::Locked => 1,
            Reply::SharedReleased | Reply::RegisteredName => 1,
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

/// The one line a connection over `--max-connections` gets before it is closed.
pub const TOO_MANY_CONNECTIONS: &[u8] = b"0 Too Many Connections\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(verb: Verb, arg: &[u8]) -> Request {
        Request::Command {
            verb,
            arg: LockName::new(arg),
        }
    }

    #[test]
    fn command_word_and_name() {
        assert_eq!(parse(b"g foo"), cmd(Verb::Get, b"foo"));
        assert_eq!(parse(b"sg foo"), cmd(Verb::SharedGet, b"foo"));
        assert_eq!(parse(b"dump shared"), cmd(Verb::FullDump, b"shared"));
        assert_eq!(parse(b"q"), cmd(Verb::Stats, b""));
    }

    #[test]
    fn whitespace_is_trimmed_and_collapsed_like_the_go_client_sends_it() {
        assert_eq!(parse(b" g  foo\n"), cmd(Verb::Get, b"foo"));
        assert_eq!(parse(b"g  foo   bar \r"), cmd(Verb::Get, b"foo bar"));
        assert_eq!(parse(b"g\tfoo\t\tbar"), cmd(Verb::Get, b"foo bar"));
        assert_eq!(parse(b"g a\x0b\x0cb"), cmd(Verb::Get, b"a b"));
    }

    #[test]
    fn crlf_and_lone_cr_are_whitespace() {
        assert_eq!(parse(b"i foo\r"), cmd(Verb::Inspect, b"foo"));
        assert_eq!(parse(b"i fo\ro"), cmd(Verb::Inspect, b"fo o"));
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
        assert_eq!(parse(b"g"), cmd(Verb::Get, b""));
        assert_eq!(parse(b"g    "), cmd(Verb::Get, b""));
    }

    #[test]
    fn long_and_non_ascii_names_are_kept_byte_for_byte() {
        let long = vec![b'n'; 10_000];
        let mut line = b"g ".to_vec();
        line.extend_from_slice(&long);
        assert_eq!(parse(&line), cmd(Verb::Get, &long));
        assert_eq!(parse(b"g \xff\xfe\x00x"), cmd(Verb::Get, b"\xff\xfe\x00x"));
        assert_eq!(
            parse("g naïve  verrou".as_bytes()),
            cmd(Verb::Get, "naïve verrou".as_bytes())
        );
    }

    #[test]
    fn verbs_are_sorted_by_word_for_q() {
        let words: Vec<_> = Verb::ALL.iter().map(|v| v.word()).collect();
        let mut sorted = words.clone();
        sorted.sort();
        assert_eq!(words, sorted);
        assert_eq!(Verb::COUNT, Verb::ALL.len());
        for (at, verb) in Verb::ALL.iter().enumerate() {
            assert_eq!(verb.index(), at);
            assert_eq!(Verb::from_word(verb.word().as_bytes()), Some(*verb));
        }
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

    #[test]
    fn replies_are_one_line_with_the_integer_first() {
        let mut out = Vec::new();
        Reply::Got.write_to(&mut out);
        Reply::SharedGot(12).write_to(&mut out);
        Reply::SharedCount(0).write_to(&mut out);
        Reply::Invalid.write_to(&mut out);
        Reply::GotToken(1234).write_to(&mut out);
        Reply::Usage(Verb::GetWait).write_to(&mut out);
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
             1 1234 Got Lock\n0 Usage: gw MS NAME\n0 16 0 -1 3000\n"
        );
    }
}
