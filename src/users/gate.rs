//! One connection's side of the users file: who it is, how many `auth`s in a row failed, and
//! whether a command may run.

use std::sync::Arc;

use super::{Directory, User};
use crate::peer::Peer;
use crate::protocol::{Class, Request, Verb};

/// How an `auth`, or a door's word for a user, went: `glockd_auth_total{door,result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthResult {
    /// `auth` proved a user.
    Success,
    /// `auth` named an unknown user or a wrong token.
    Failure,
    /// The door vouched for a user (client certificate, unix uid): no `auth` needed.
    Mapped,
}

impl AuthResult {
    pub const ALL: [AuthResult; 3] = [AuthResult::Success, AuthResult::Failure, AuthResult::Mapped];
    pub const COUNT: usize = Self::ALL.len();

    /// The `result` label value.
    pub fn label(self) -> &'static str {
        match self {
            AuthResult::Success => "success",
            AuthResult::Failure => "failure",
            AuthResult::Mapped => "mapped",
        }
    }
}

/// Why a command does not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not authenticated: `0 Auth Required`.
    AuthRequired,
    /// Outside the user's classes or names: `0 Permission Denied`.
    Denied(Class),
}

/// A connection's standing under the users file.
pub struct Gate {
    directory: Arc<Directory>,
    /// What the door vouched for, kept to map the connection again after a reload.
    certificate: Option<Arc<str>>,
    uid: Option<u32>,
    /// The directory generation `user` was resolved under.
    seen: u64,
    /// Who the connection is; None until `auth` (or the door) says.
    user: Option<Arc<User>>,
    /// Whether `user` came from the door rather than from `auth`.
    by_peer: bool,
    /// Failed `auth`s since the last success.
    failures: u32,
}

impl Gate {
    /// A new connection's gate: authenticated already when its door vouches for a user of the
    /// file.
    pub fn new(directory: Arc<Directory>, peer: &Peer) -> Gate {
        let seen = directory.generation();
        let user = directory.current().for_peer(peer);
        Gate {
            by_peer: user.is_some(),
            user,
            seen,
            certificate: peer.certificate.clone(),
            uid: peer.uid,
            directory,
            failures: 0,
        }
    }

    /// Whether the door made this connection a user.
    pub fn mapped(&self) -> bool {
        self.by_peer && self.user.is_some()
    }

    /// The connection's user, as the users file in force says now.
    pub fn user(&mut self) -> Option<&User> {
        let generation = self.directory.generation();
        if generation != self.seen {
            self.seen = generation;
            let users = self.directory.current();
            self.user = if self.by_peer {
                let peer = Peer {
                    certificate: self.certificate.clone(),
                    uid: self.uid,
                    ..Peer::default()
                };
                users.for_peer(&peer)
            } else {
                // The same user, with the same token: a changed token ends the session (the
                // client must `auth` again with the new one).
                self.user.take().and_then(|old| {
                    users
                        .by_name(old.name.as_bytes())
                        .filter(|new| new.same_token(&old))
                })
            };
        }
        self.user.as_deref()
    }

    /// Whether `request` may run. `auth` always may; everything else needs a user whose
    /// classes hold the command's, and whose patterns cover the name it names (if any).
    pub fn check(&mut self, request: &Request, verb: Verb) -> Result<(), Refusal> {
        if verb == Verb::Auth {
            return Ok(());
        }
        let Some(user) = self.user() else {
            return Err(Refusal::AuthRequired);
        };
        let class = verb.facts().class;
        if !user.may(class) {
            return Err(Refusal::Denied(class));
        }
        // `iam` names the connection, not a lock: it is housekeeping, like `me`.
        if class == Class::Connection {
            return Ok(());
        }
        match request.name() {
            Some(name) if !user.may_name(name.as_bytes()) => Err(Refusal::Denied(class)),
            _ => Ok(()),
        }
    }

    /// Whether a listing may show lock (or registered) name `name`.
    pub fn may_see(&mut self, name: &[u8]) -> bool {
        self.user().is_some_and(|u| u.may_name(name))
    }

    /// Runs `auth USER TOKEN`: on success the connection is that user from now on and the
    /// failure count starts again; on failure the connection stays who it was, and the count
    /// of failures in a row (returned in the error) goes up.
    /// The user this connection authenticated as with `auth` (not one its door mapped, which
    /// the successor of a live upgrade maps again), to carry across the upgrade.
    pub fn authenticated(&mut self) -> Option<String> {
        if self.by_peer {
            return None;
        }
        self.user().map(|user| user.name.to_string())
    }

    /// Failed `auth`s in a row, to carry across a live upgrade.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// After a live upgrade: the connection is `name` again, as it was before, if the users
    /// file in force still has that user, with its failed `auth`s in a row so far.
    pub fn resume(&mut self, name: Option<&str>, failures: u32) {
        self.failures = failures;
        let Some(name) = name else { return };
        if let Some(user) = self.directory.current().by_name(name.as_bytes()) {
            self.seen = self.directory.generation();
            self.user = Some(user);
            self.by_peer = false;
        }
    }

    pub fn authenticate(&mut self, user: &[u8], token: &[u8]) -> Result<Arc<str>, u32> {
        // The generation before the users: a reload in between is seen at the next command.
        let generation = self.directory.generation();
        let users = self.directory.current();
        match users.authenticate(user, token) {
            Some(found) => {
                let name = Arc::from(&*found.name);
                self.seen = generation;
                self.user = Some(found);
                self.by_peer = false;
                self.failures = 0;
                Ok(name)
            }
            None => {
                self.failures = self.failures.saturating_add(1);
                Err(self.failures)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory read from a users file written for the test.
    fn directory(text: &str) -> Arc<Directory> {
        static FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("glockd-gate-test-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let directory = Directory::load(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        Arc::new(directory)
    }

    fn lock(name: &str) -> Request {
        crate::protocol::parse(format!("g {name}").as_bytes())
    }

    #[test]
    fn a_certificate_the_door_verified_makes_the_connection_its_user() {
        let users = directory(
            "[[user]]\nname = \"svc\"\ncertificate = \"svc.example.com\"\n\
             prefixes = ['svc:*']\nclasses = [\"lock\"]\n",
        );
        let peer = Peer {
            certificate: Some(Arc::from("svc.example.com")),
            ..Peer::default()
        };
        let mut gate = Gate::new(users.clone(), &peer);
        assert!(gate.mapped());
        assert_eq!(gate.check(&lock("svc:a"), Verb::Get), Ok(()));
        assert_eq!(
            gate.check(&lock("other"), Verb::Get),
            Err(Refusal::Denied(Class::Lock))
        );
        assert_eq!(
            gate.check(&Request::Stats, Verb::Stats),
            Err(Refusal::Denied(Class::Admin))
        );
        assert_eq!(gate.check(&Request::Me, Verb::Me), Ok(()));
        // Another subject, or none, is nobody until `auth`.
        for peer in [
            Peer {
                certificate: Some(Arc::from("intruder.example.com")),
                ..Peer::default()
            },
            Peer::anonymous(),
        ] {
            let mut gate = Gate::new(users.clone(), &peer);
            assert!(!gate.mapped());
            assert_eq!(
                gate.check(&lock("svc:a"), Verb::Get),
                Err(Refusal::AuthRequired)
            );
            assert_eq!(
                gate.check(&Request::Me, Verb::Me),
                Err(Refusal::AuthRequired)
            );
        }
    }

    #[test]
    fn failures_count_in_a_row_and_a_success_starts_again() {
        let users = directory(&format!(
            "[[user]]\nname = \"a\"\n{}\nprefixes = ['*']\n",
            super::super::token::hash_token_line(b"t").unwrap()
        ));
        let mut gate = Gate::new(users, &Peer::anonymous());
        assert_eq!(gate.authenticate(b"a", b"x"), Err(1));
        assert_eq!(gate.authenticate(b"b", b"t"), Err(2));
        assert_eq!(gate.authenticate(b"a", b"t").as_deref(), Ok("a"));
        assert_eq!(gate.authenticate(b"a", b"x"), Err(1));
        // A failure leaves the user in place.
        assert!(gate.user().is_some());
    }
}
