//! What became of requests and connections, for alerting: every reply to a lock command by its
//! result, connections turned away or closed by the server, and why.
//!
//! Counted in the same single-writer per-shard cells as everything else, indexed by small enums
//! (no label built per request); the endpoint turns the indexes into label values when scraped.

use crate::protocol::{Reply, Verb};

/// What the reply to a lock command said: `glockd_lock_requests_total{command, result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockResult {
    /// `g gt gw sg sgl sgw`: the caller holds the lock now (or already did).
    Granted,
    /// `g gt`: another connection holds it.
    Refused,
    /// `sgl sgw`: LIMIT connections hold it already.
    Full,
    /// `g gt gw sg sgl sgw`: the connection holds `--max-locks-per-conn` locks already.
    Limit,
    /// `gw sgw`: not granted within the wait.
    TimedOut,
    /// `r sr`: released.
    Released,
    /// `r sr`: the caller did not hold it.
    NotHeld,
    /// `i t si`: somebody holds it.
    Held,
    /// `i t si`: nobody holds it.
    Free,
    /// `rl`: let through.
    Allowed,
    /// `rl`: turned away.
    Limited,
    /// `g gt gw sg sgl sgw rl`: what it would store does not fit in `--max-memory`.
    OutOfMemory,
    /// Arguments that do not fit the command (`0 Usage: …`).
    Usage,
    /// Any other reply (none is expected for a lock command; counted rather than lost).
    Other,
}

impl LockResult {
    pub const ALL: [LockResult; 14] = [
        LockResult::Granted,
        LockResult::Refused,
        LockResult::Full,
        LockResult::Limit,
        LockResult::TimedOut,
        LockResult::Released,
        LockResult::NotHeld,
        LockResult::Held,
        LockResult::Free,
        LockResult::Allowed,
        LockResult::Limited,
        LockResult::OutOfMemory,
        LockResult::Usage,
        LockResult::Other,
    ];

    /// The number of results (the size of per-result counter arrays).
    pub const COUNT: usize = Self::ALL.len();

    /// The `result` label value.
    pub fn label(self) -> &'static str {
        match self {
            LockResult::Granted => "granted",
            LockResult::Refused => "refused",
            LockResult::Full => "full",
            LockResult::Limit => "limit",
            LockResult::TimedOut => "timed_out",
            LockResult::Released => "released",
            LockResult::NotHeld => "not_held",
            LockResult::Held => "held",
            LockResult::Free => "free",
            LockResult::Allowed => "allowed",
            LockResult::Limited => "limited",
            LockResult::OutOfMemory => "out_of_memory",
            LockResult::Usage => "usage",
            LockResult::Other => "other",
        }
    }

    /// The result a reply stands for. A match the compiler turns into a table lookup: this
    /// runs for every lock command.
    #[inline]
    pub fn of(reply: Reply) -> LockResult {
        match reply {
            Reply::Got | Reply::GotToken(_) | Reply::SharedGot(_) => LockResult::Granted,
            Reply::NotGot => LockResult::Refused,
            Reply::SharedFull => LockResult::Full,
            Reply::LimitReached => LockResult::Limit,
            Reply::TimedOut => LockResult::TimedOut,
            Reply::Released | Reply::SharedReleased => LockResult::Released,
            Reply::NotReleased | Reply::SharedNotReleased => LockResult::NotHeld,
            Reply::Locked | Reply::Token(_) => LockResult::Held,
            Reply::SharedCount(0) | Reply::NotLocked => LockResult::Free,
            Reply::SharedCount(_) => LockResult::Held,
            Reply::RateLimit(d) if d.allowed => LockResult::Allowed,
            Reply::RateLimit(_) => LockResult::Limited,
            Reply::OutOfMemory => LockResult::OutOfMemory,
            Reply::Usage(_) | Reply::UsageLimit(..) | Reply::LockNameTooLong => LockResult::Usage,
            Reply::Invalid
            | Reply::Disabled
            | Reply::RegisteredName
            | Reply::NameTooLong
            | Reply::NameLooksLikeId
            | Reply::NameFromCertificate
            | Reply::NameNotPrintable
            | Reply::Framed
            | Reply::AuthRequired
            | Reply::PermissionDenied
            | Reply::Authenticated
            | Reply::AuthFailed
            | Reply::AuthNotConfigured => LockResult::Other,
        }
    }

    /// The results a command can have. These series are exported from the start, at zero, so
    /// that a rate or an alert sees the first refusal as an increase rather than as a new
    /// series. Empty for commands that are not about one lock.
    pub fn expected(verb: Verb) -> &'static [LockResult] {
        use LockResult::*;
        match verb {
            Verb::Get | Verb::GetToken => &[Granted, Refused, Limit],
            Verb::GetWait => &[Granted, TimedOut, Limit, Usage],
            Verb::SharedGet => &[Granted, Limit],
            Verb::SharedGetLimit => &[Granted, Full, Limit, Usage],
            Verb::SharedGetWait => &[Granted, TimedOut, Limit, Usage],
            Verb::Release | Verb::SharedRelease => &[Released, NotHeld],
            Verb::Inspect | Verb::Token | Verb::SharedInspect => &[Held, Free],
            Verb::RateLimit => &[Allowed, Limited, Usage],
            Verb::Auth
            | Verb::Dump
            | Verb::FullDump
            | Verb::Holders
            | Verb::Iam
            | Verb::Me
            | Verb::Stats
            | Verb::SharedDump
            | Verb::Shards
            | Verb::Framed
            | Verb::Who => &[],
        }
    }
}

/// Why the server closed a connection: `glockd_connections_closed_total{reason}`. Only the
/// server's own decisions are told apart here; every other end (the client closed or reset
/// it, the server shut down) is the endpoint's `other`, the rest of all closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// A line over `--max-line-bytes`.
    LineTooLong,
    /// The client kept sending while more than `--max-unsent-bytes` of replies went unread.
    UnreadReplies,
    /// A reply write made no progress for `--write-timeout`.
    WriteTimeout,
    /// Nothing came for `--idle-timeout`.
    IdleTimeout,
    /// Its buffers were among the biggest when all clients' passed `--max-client-buffers`.
    ClientBuffers,
    /// It sent more than a waiting command lets it send (see `connection::WAIT_READ_AHEAD`).
    WaitReadAhead,
    /// A line stayed unfinished for `--line-timeout` (a slow or stalled sender).
    LineTimeout,
    /// `--auth-max-failures` failed `auth`s in a row.
    AuthFailures,
}

impl CloseReason {
    pub const ALL: [CloseReason; 8] = [
        CloseReason::LineTooLong,
        CloseReason::UnreadReplies,
        CloseReason::WriteTimeout,
        CloseReason::IdleTimeout,
        CloseReason::ClientBuffers,
        CloseReason::WaitReadAhead,
        CloseReason::LineTimeout,
        CloseReason::AuthFailures,
    ];

    pub const COUNT: usize = Self::ALL.len();

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::LineTooLong => "line_too_long",
            CloseReason::UnreadReplies => "unread_replies",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::ClientBuffers => "client_buffers",
            CloseReason::WaitReadAhead => "wait_read_ahead",
            CloseReason::LineTimeout => "line_timeout",
            CloseReason::AuthFailures => "auth_failures",
        }
    }
}

/// Why a connection was turned away as it arrived: `glockd_connections_refused_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseReason {
    /// `--max-connections` were open already.
    MaxConnections,
    /// The client's address had `--max-connections-per-ip` open already.
    MaxConnectionsPerIp,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 2] = [
        RefuseReason::MaxConnections,
        RefuseReason::MaxConnectionsPerIp,
    ];

    pub const COUNT: usize = Self::ALL.len();

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            RefuseReason::MaxConnections => "max_connections",
            RefuseReason::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reply_a_lock_command_gets_has_a_result() {
        assert_eq!(LockResult::of(Reply::Got), LockResult::Granted);
        assert_eq!(LockResult::of(Reply::SharedGot(3)), LockResult::Granted);
        assert_eq!(LockResult::of(Reply::NotGot), LockResult::Refused);
        assert_eq!(LockResult::of(Reply::SharedFull), LockResult::Full);
        assert_eq!(LockResult::of(Reply::LimitReached), LockResult::Limit);
        assert_eq!(LockResult::of(Reply::OutOfMemory), LockResult::OutOfMemory);
        assert_eq!(LockResult::of(Reply::LockNameTooLong), LockResult::Usage);
        assert_eq!(LockResult::of(Reply::SharedCount(0)), LockResult::Free);
        assert_eq!(LockResult::of(Reply::SharedCount(2)), LockResult::Held);
        assert_eq!(
            LockResult::of(Reply::Usage(Verb::GetWait)),
            LockResult::Usage
        );
        for (at, result) in LockResult::ALL.iter().enumerate() {
            assert_eq!(*result as usize, at);
        }
        for (at, reason) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, at);
        }
        // Exactly the commands about one lock expect results.
        for verb in Verb::ALL {
            let about_one_lock = matches!(
                verb.facts().class,
                crate::protocol::Class::Lock
                    | crate::protocol::Class::Shared
                    | crate::protocol::Class::RateLimit
            );
            assert_eq!(
                !LockResult::expected(verb).is_empty(),
                about_one_lock,
                "{verb:?}"
            );
        }
    }
}
