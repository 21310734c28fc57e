//! The command words and one table of facts about each: its class, the flag that gates it, how
//! it is written, and the shape of its reply. Everything else that needs to know "what kind of
//! command is this" reads it here, as Redis keeps one description per command.

/// Every command word the server knows, in the order of the `q` counters (see [`Verb::ALL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    /// `auth USER TOKEN`: authenticate the connection as a user of the users file.
    Auth,
    /// `d [NAME]`: list exclusive locks and their holders.
    Dump,
    /// `dump [shared]`: the lock table in Go's map syntax.
    FullDump,
    /// `framed`: from now on, every reply of several lines starts with a line counting them.
    Framed,
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
    /// `shards`: how names map to shards, and each shard's own port.
    Shards,
    /// `si NAME`: the holder count of a shared lock.
    SharedInspect,
    /// `sr NAME`: release a shared lock this connection holds.
    SharedRelease,
    /// `t NAME`: the fencing token of the exclusive lock's current grant.
    Token,
    /// `who [NAME]`: the registry.
    Who,
}

/// What a command is about, for routing decisions and permissions: a users file grants a user
/// classes by their [`Class::label`], and the connection's own housekeeping
/// ([`Class::Connection`]) is open to every authenticated user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// One exclusive lock: `g r i gt t gw`.
    Lock,
    /// One shared lock: `sg sr si sgl sgw`.
    Shared,
    /// One rate limiter: `rl`.
    RateLimit,
    /// Reading the tables or the registry: `d sd dump h who`.
    Inspect,
    /// The connection's own identity, placement and reply form: `auth me iam shards framed`.
    Connection,
    /// The server's counters: `q`.
    Admin,
}

impl Class {
    /// Every class, in index order.
    pub const ALL: [Class; 6] = [
        Class::Lock,
        Class::Shared,
        Class::RateLimit,
        Class::Inspect,
        Class::Connection,
        Class::Admin,
    ];

    /// The number of classes (the size of per-class counter arrays).
    pub const COUNT: usize = Self::ALL.len();

    /// Index into per-class arrays.
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    /// The class's name in a users file and in metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Class::Lock => "lock",
            Class::Shared => "shared",
            Class::RateLimit => "ratelimit",
            Class::Inspect => "inspect",
            Class::Connection => "connection",
            Class::Admin => "admin",
        }
    }
}

/// The flag that must be on for a command to run; otherwise it answers `0 disabled`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Always available.
    Open,
    /// `-dump=false` turns it off.
    Dump,
    /// `-registry=false` turns it off.
    Registry,
    /// Needs both (`who` lists registered names).
    RegistryAndDump,
}

impl Gate {
    /// Whether a command behind this gate runs with these flags.
    pub fn is_open(self, dump: bool, registry: bool) -> bool {
        match self {
            Gate::Open => true,
            Gate::Dump => dump,
            Gate::Registry => registry,
            Gate::RegistryAndDump => dump && registry,
        }
    }
}

/// The shape of a command's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Exactly one line.
    Line,
    /// Any number of lines, none when there is nothing to list (the original's form); after
    /// `framed`, preceded by a line counting them.
    Lines,
}

/// The facts about one command word.
#[derive(Debug)]
pub struct Facts {
    /// The command word as clients send it.
    pub word: &'static str,
    /// How the command is written, for the `0 Usage: …` answer to bad arguments.
    pub usage: &'static str,
    pub class: Class,
    pub gate: Gate,
    pub shape: Shape,
}

const fn facts(
    word: &'static str,
    usage: &'static str,
    class: Class,
    gate: Gate,
    shape: Shape,
) -> Facts {
    Facts {
        word,
        usage,
        class,
        gate,
        shape,
    }
}

use Class::*;
use Shape::*;

/// One row per verb, in [`Verb::ALL`] order.
const FACTS: [Facts; Verb::COUNT] = [
    facts("auth", "auth USER TOKEN", Connection, Gate::Open, Line),
    facts("d", "d [NAME]", Inspect, Gate::Dump, Lines),
    facts("dump", "dump [shared]", Inspect, Gate::Dump, Line),
    facts("framed", "framed", Connection, Gate::Open, Line),
    facts("g", "g NAME", Lock, Gate::Open, Line),
    facts("gt", "gt NAME", Lock, Gate::Open, Line),
    facts("gw", "gw MS NAME", Lock, Gate::Open, Line),
    facts("h", "h [NAME]", Inspect, Gate::Dump, Lines),
    facts("i", "i NAME", Lock, Gate::Open, Line),
    facts("iam", "iam NAME", Connection, Gate::Registry, Line),
    facts("me", "me", Connection, Gate::Open, Line),
    facts("q", "q", Admin, Gate::Open, Lines),
    facts("r", "r NAME", Lock, Gate::Open, Line),
    facts(
        "rl",
        "rl NAME BURST COUNT PERIOD_MS [QUANTITY]",
        RateLimit,
        Gate::Open,
        Line,
    ),
    facts("sd", "sd [NAME]", Inspect, Gate::Dump, Lines),
    facts("sg", "sg NAME", Shared, Gate::Open, Line),
    facts("sgl", "sgl LIMIT NAME", Shared, Gate::Open, Line),
    facts("sgw", "sgw MS LIMIT NAME", Shared, Gate::Open, Line),
    facts("shards", "shards", Connection, Gate::Open, Line),
    facts("si", "si NAME", Shared, Gate::Open, Line),
    facts("sr", "sr NAME", Shared, Gate::Open, Line),
    facts("t", "t NAME", Lock, Gate::Open, Line),
    facts("who", "who [NAME]", Inspect, Gate::RegistryAndDump, Lines),
];

impl Verb {
    /// All verbs, sorted by their command word, so `q` can print its counters in order.
    pub const ALL: [Verb; 23] = [
        Verb::Auth,
        Verb::Dump,
        Verb::FullDump,
        Verb::Framed,
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
        Verb::Shards,
        Verb::SharedInspect,
        Verb::SharedRelease,
        Verb::Token,
        Verb::Who,
    ];

    /// The number of verbs (the size of per-verb counter arrays).
    pub const COUNT: usize = Self::ALL.len();

    /// Everything known about this verb.
    #[inline]
    pub fn facts(self) -> &'static Facts {
        &FACTS[self.index()]
    }

    /// The command word as clients send it.
    #[inline]
    pub fn word(self) -> &'static str {
        self.facts().word
    }

    /// How the command is written, for the `0 Usage: …` answer to bad arguments.
    pub fn usage(self) -> &'static str {
        self.facts().usage
    }

    /// Index into per-verb arrays.
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    /// Looks up a command word; `None` for anything the server does not know.
    #[inline]
    pub fn from_word(word: &[u8]) -> Option<Verb> {
        // A match on the bytes compiles to a length switch and a few compares: cheaper than
        // a search of the facts table on the hottest path there is.
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
            b"framed" => Verb::Framed,
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
            b"shards" => Verb::Shards,
            b"t" => Verb::Token,
            b"auth" => Verb::Auth,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_sorted_by_word_for_q_and_the_facts_line_up() {
        let words: Vec<_> = Verb::ALL.iter().map(|v| v.word()).collect();
        let mut sorted = words.clone();
        sorted.sort();
        assert_eq!(words, sorted);
        assert_eq!(Verb::COUNT, Verb::ALL.len());
        for (at, verb) in Verb::ALL.iter().enumerate() {
            assert_eq!(verb.index(), at);
            assert_eq!(Verb::from_word(verb.word().as_bytes()), Some(*verb));
            assert!(verb.usage().starts_with(verb.word()));
        }
    }

    #[test]
    fn gates_follow_the_flags() {
        assert!(Verb::Get.facts().gate.is_open(false, false));
        assert!(!Verb::Dump.facts().gate.is_open(false, true));
        assert!(!Verb::Iam.facts().gate.is_open(true, false));
        assert!(!Verb::Who.facts().gate.is_open(true, false));
        assert!(!Verb::Who.facts().gate.is_open(false, true));
        assert!(Verb::Who.facts().gate.is_open(true, true));
        assert!(Verb::Me.facts().gate.is_open(false, false));
    }

    #[test]
    fn classes_are_those_the_users_file_names() {
        let words = |class: Class| -> Vec<&str> {
            Verb::ALL
                .iter()
                .filter(|v| v.facts().class == class)
                .map(|v| v.word())
                .collect()
        };
        assert_eq!(words(Class::Lock), ["g", "gt", "gw", "i", "r", "t"]);
        assert_eq!(words(Class::Shared), ["sg", "sgl", "sgw", "si", "sr"]);
        assert_eq!(words(Class::RateLimit), ["rl"]);
        assert_eq!(words(Class::Inspect), ["d", "dump", "h", "sd", "who"]);
        assert_eq!(words(Class::Admin), ["q"]);
        assert_eq!(
            words(Class::Connection),
            ["auth", "framed", "iam", "me", "shards"]
        );
        for (at, class) in Class::ALL.iter().enumerate() {
            assert_eq!(class.index(), at);
        }
    }
}
