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
    /// `sd [NAME]`: list shared locks and their holders.
    SharedDump,
    /// `sg NAME`: take a shared lock; answers the holder count.
    SharedGet,
    /// `si NAME`: the holder count of a shared lock.
    SharedInspect,
    /// `sr NAME`: release a shared lock this connection holds.
    SharedRelease,
    /// `who [NAME]`: the registry.
    Who,
}

impl Verb {
    /// All verbs, sorted by their command word, so `q` can print its counters in order.
    pub const ALL: [Verb; 13] = [
        Verb::Dump,
        Verb::FullDump,
        Verb::Get,
        Verb::Inspect,
        Verb::Iam,
        Verb::Me,
        Verb::Stats,
        Verb::Release,
        Verb::SharedDump,
        Verb::SharedGet,
        Verb::SharedInspect,
        Verb::SharedRelease,
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
            Verb::Inspect => "i",
            Verb::Iam => "iam",
            Verb::Me => "me",
            Verb::Stats => "q",
            Verb::Release => "r",
            Verb::SharedDump => "sd",
            Verb::SharedGet => "sg",
            Verb::SharedInspect => "si",
            Verb::SharedRelease => "sr",
            Verb::Who => "who",
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
            _ => return None,
        })
    }

    /// The operation on one lock that this verb performs, if it is one.
    #[inline]
    pub fn lock_op(self) -> Option<LockOp> {
        Some(match self {
            Verb::Get => LockOp::Get,
            Verb::Release => LockOp::Release,
            Verb::Inspect => LockOp::Inspect,
            Verb::SharedGet => LockOp::SharedGet,
            Verb::SharedRelease => LockOp::SharedRelease,
            Verb::SharedInspect => LockOp::SharedInspect,
            _ => return None,
        })
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
        };
        out.extend_from_slice(text);
    }

    /// The integer a client parses from this reply.
    pub fn code(self) -> u64 {
        match self {
            Reply::Got | Reply::Released | Reply::Locked => 1,
            Reply::SharedReleased | Reply::RegisteredName => 1,
            Reply::SharedGot(n) | Reply::SharedCount(n) => n,
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
        for (at, verb) in Verb::ALL.iter().enumerate() {
            assert_eq!(verb.index(), at);
            assert_eq!(Verb::from_word(verb.word().as_bytes()), Some(*verb));
        }
    }

    #[test]
    fn replies_are_one_line_with_the_integer_first() {
        let mut out = Vec::new();
        Reply::Got.write_to(&mut out);
        Reply::SharedGot(12).write_to(&mut out);
        Reply::SharedCount(0).write_to(&mut out);
        Reply::Invalid.write_to(&mut out);
        assert_eq!(
            out,
            b"1 Got Lock\n12 Got Shared Lock\n0 Not Shared Locked\n0 Invalid Command\n"
        );
    }
}
