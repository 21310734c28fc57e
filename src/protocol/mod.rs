//! The line protocol: one request per line in, one (or, for listings, several) lines out.
//!
//! - [`verb`]: the command words, with one table of facts per word (class, gate, reply shape).
//! - [`request`]: a line parsed into a typed [`Request`], numbers and names included, and
//!   written back out for clients.
//! - [`reply`]: reply lines and listings.
//!
//! Parsing follows the original server exactly: surrounding whitespace is trimmed, the command
//! word is the text before the first whitespace, and the argument (a lock name, or a name for
//! `iam`/`who`) is the rest with every run of whitespace collapsed to one space. The original Go
//! client really sends ` g  name\n`, so the collapsing is load-bearing, not cosmetic.
//!
//! Replies are `%d %s\n`: the integer is the contract clients parse, the text is for people.

mod reply;
mod request;
mod verb;

pub use reply::{
    write_framed, write_go_map, write_rows, write_shards, Reply, CLIENT_BUFFERS_FULL,
    LINE_TOO_LONG, ROUTING, SENT_WHILE_WAITING, TEXT_NOT_UTF8, TOO_MANY_AUTH_FAILURES,
    TOO_MANY_CONNECTIONS,
};
pub use request::{
    parse, parse_rate_limit, refill_too_long, split_number, ListKind, LockKind, LockOp, RateParams,
    Request, Secret, WaitKind, MAX_RATE_LIMIT_WINDOW_MS,
};
pub use verb::{Class, Facts, Gate, Shape, Verb};

use crate::name::LockName;

/// Bytes that separate words: ASCII whitespace as Go's `strings.Fields` sees it (vertical tab
/// included, which Rust's `is_ascii_whitespace` leaves out).
#[inline]
pub fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
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
