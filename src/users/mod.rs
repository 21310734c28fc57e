//! Users, tokens and permissions (`-users FILE`).
//!
//! Without a users file none of this runs: a session holds no gate, and its hot path pays one
//! predictable branch. With one, every connection starts unauthenticated (unless its door
//! vouches for a user: a client certificate's subject, or a unix-socket peer's uid, mapped in
//! the file) and may only `auth USER TOKEN`; an authenticated connection may use the command
//! classes and lock names its user is given, and its listings show only those names.
//!
//! - [`file`](mod@file): the TOML file and its name patterns.
//! - [`token`]: SHA-256 digests, the constant-time compare, `glockd hash-token`.
//! - [`gate`]: one connection's state: who it is, failed attempts, what it may do.

pub mod file;
pub mod gate;
pub mod token;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::Config;
use crate::peer::Peer;
use crate::protocol::Class;

pub use gate::{AuthResult, Gate, Refusal};

/// One user of the users file.
#[derive(Debug)]
pub struct User {
    /// What `auth` names, and what logs show.
    pub name: Box<str>,
    /// The SHA-256 digest of the user's token; None: the user cannot `auth`, only be mapped
    /// from a certificate or uid.
    token: Option<token::Digest>,
    classes: ClassSet,
    patterns: Box<[Pattern]>,
    /// A client certificate subject that makes a connection this user without `auth`.
    certificate: Option<Arc<str>>,
    /// A unix-socket peer uid that makes a connection this user without `auth`.
    uid: Option<u32>,
}

impl User {
    /// Whether `other` (the same user in a file read again) has the same token: a connection
    /// that proved the old token keeps its standing only then, so changing a leaked token
    /// ends the sessions opened with it.
    pub fn same_token(&self, other: &User) -> bool {
        self.token == other.token
    }

    /// Whether the user may run commands of `class` (the connection's own housekeeping,
    /// [`Class::Connection`], is every user's).
    #[inline]
    pub fn may(&self, class: Class) -> bool {
        self.classes.contains(class)
    }

    /// Whether the user may use, and see, lock name `name`.
    #[inline]
    pub fn may_name(&self, name: &[u8]) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }
}

/// A set of command classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassSet(u8);

impl Default for ClassSet {
    /// No class but the connection's own housekeeping.
    fn default() -> Self {
        ClassSet(0).with(Class::Connection)
    }
}

impl ClassSet {
    /// Every class.
    pub const ALL: ClassSet = ClassSet((1 << Class::COUNT) - 1);

    pub fn with(self, class: Class) -> ClassSet {
        ClassSet(self.0 | 1 << class.index())
    }

    pub fn contains(self, class: Class) -> bool {
        self.0 & (1 << class.index()) != 0
    }
}

/// Which lock names a pattern of the users file covers, compared as raw bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `*`: every name.
    Any,
    /// `billing:*`: names starting with these bytes.
    Prefix(Box<[u8]>),
    /// `pool`: this one name.
    Exact(Box<[u8]>),
}

impl Pattern {
    #[inline]
    pub fn matches(&self, name: &[u8]) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(prefix) => name.starts_with(prefix),
            Pattern::Exact(exact) => name == &exact[..],
        }
    }
}

/// Every user of one reading of the users file.
pub struct Users {
    users: Vec<Arc<User>>,
    by_name: HashMap<Box<[u8]>, usize>,
    by_certificate: HashMap<Arc<str>, usize>,
    by_uid: HashMap<u32, usize>,
    /// Compared with an unknown user's token (see [`token`]).
    decoy: token::Digest,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.users.iter().map(|u| &u.name))
            .finish()
    }
}

impl Users {
    /// Reads and checks a users file; the error is one line.
    pub fn load(path: &Path) -> Result<Users, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("users file {}: {e}", path.display()))?;
        file::parse(&text).map_err(|e| format!("users file {}: {e}", path.display()))
    }

    /// The number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The user called `name`.
    pub fn by_name(&self, name: &[u8]) -> Option<Arc<User>> {
        self.by_name.get(name).map(|&at| self.users[at].clone())
    }

    /// The user `auth USER TOKEN` proves, if it does. The token is hashed and its digest
    /// compared in constant time with the user's, or, for an unknown user (or one without a
    /// token), with a decoy, so every failure costs the same.
    pub fn authenticate(&self, name: &[u8], presented: &[u8]) -> Option<Arc<User>> {
        let user = self.by_name(name);
        let expected = user
            .as_ref()
            .and_then(|u| u.token.as_ref())
            .unwrap_or(&self.decoy);
        let matched = token::token_matches(presented, expected);
        user.filter(|u| matched && u.token.is_some())
    }

    /// The user a connection's door vouches for: its client certificate's subject, else its
    /// unix-socket uid, when the file maps it.
    pub fn for_peer(&self, peer: &Peer) -> Option<Arc<User>> {
        let by_certificate = peer
            .certificate
            .as_ref()
            .and_then(|subject| self.by_certificate.get(subject));
        let at = by_certificate.or_else(|| peer.uid.and_then(|uid| self.by_uid.get(&uid)))?;
        Some(self.users[*at].clone())
    }
}

/// The users file in force, reloadable (SIGHUP) while connections run.
///
/// Each session keeps the user it authenticated as, and checks [`Directory::generation`] (one
/// atomic load) before each command: after a reload it looks its user up again by name (or
/// maps its peer again), so a user removed or narrowed in the file loses its rights at its
/// next command.
pub struct Directory {
    path: PathBuf,
    current: RwLock<Arc<Users>>,
    generation: AtomicU64,
}

impl Directory {
    /// Reads the users file at `path`.
    pub fn load(path: &Path) -> Result<Directory, String> {
        Ok(Directory {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(Users::load(path)?)),
            generation: AtomicU64::new(0),
        })
    }

    /// The users in force.
    pub fn current(&self) -> Arc<Users> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Goes up by one with every reload.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the file again. A file that does not load is refused (the error says why) and
    /// the users in force stay; otherwise returns the number of users now.
    pub fn reload(&self) -> Result<usize, String> {
        let users = Users::load(&self.path)?;
        let count = users.len();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(users);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(count)
    }
}

/// The start-up warning for a server anyone on the network may use: a plain (unencrypted)
/// door listening on an address other than loopback, without a users file. `plain` lists the
/// plain doors with the addresses they actually listen on (a socket systemd passed may differ
/// from `-bind`). `None` when it is not so: a users file is given, or every plain door is on
/// loopback, or there is none (`-port 0 -ws 0`, no `-shard-port`).
pub fn exposure_warning(config: &Config, plain: &[(&str, SocketAddr)]) -> Option<String> {
    if config.users_path().is_some() {
        return None;
    }
    // (An IPv4 address in IPv6 form, `::ffff:127.0.0.1`, is loopback too.)
    let exposed: Vec<&(&str, SocketAddr)> = plain
        .iter()
        .filter(|(_, addr)| !addr.ip().to_canonical().is_loopback())
        .collect();
    if exposed.is_empty() {
        return None;
    }
    let doors: Vec<String> = exposed
        .iter()
        .map(|(door, addr)| format!("{door} {addr}"))
        .collect();
    let mut closing: Vec<&str> = exposed
        .iter()
        .map(|(door, _)| match *door {
            "tcp" => "-port 0",
            "ws" => "-ws 0",
            _ => "no -shard-port",
        })
        .collect();
    closing.dedup();
    Some(format!(
        "listening in plain text without -users on {}: anyone who can reach it may take, \
         release and list every lock; give -users FILE, or -bind 127.0.0.1, or close the plain \
         doors ({})",
        doors.join(", "),
        closing.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Users {
        file::parse(&format!(
            "[[user]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nprefixes = ['*']\n\
             [[user]]\nname = \"mapped\"\nuid = 4242\ncertificate = \"client.example\"\n\
             [[user]]\nname = \"other\"\nuid = 7\n",
            hex::encode(token::digest(b"t0ken"))
        ))
        .unwrap()
    }

    #[test]
    fn auth_needs_the_user_and_its_token() {
        let users = users();
        assert_eq!(&*users.authenticate(b"a", b"t0ken").unwrap().name, "a");
        assert!(users.authenticate(b"a", b"t0ke").is_none());
        assert!(users.authenticate(b"a", b"t0kenx").is_none());
        assert!(users.authenticate(b"nobody", b"t0ken").is_none());
        // A user without a token cannot auth, whatever is sent.
        assert!(users.authenticate(b"mapped", b"").is_none());
        assert!(users.authenticate(b"mapped", b"t0ken").is_none());
    }

    #[test]
    fn a_certificate_or_a_uid_maps_a_connection_to_a_user() {
        let users = users();
        let peer = |certificate: Option<&str>, uid: Option<u32>| Peer {
            certificate: certificate.map(Arc::from),
            uid,
            ..Peer::default()
        };
        let name = |p: Peer| users.for_peer(&p).map(|u| u.name.to_string());
        assert_eq!(
            name(peer(Some("client.example"), None)).as_deref(),
            Some("mapped")
        );
        assert_eq!(name(peer(None, Some(4242))).as_deref(), Some("mapped"));
        assert_eq!(name(peer(None, Some(7))).as_deref(), Some("other"));
        // The certificate wins over the uid.
        assert_eq!(
            name(peer(Some("client.example"), Some(7))).as_deref(),
            Some("mapped")
        );
        assert_eq!(name(peer(Some("stranger"), None)), None);
        assert_eq!(name(peer(None, Some(1))), None);
        assert_eq!(name(Peer::anonymous()), None);
    }

    #[test]
    fn the_warning_is_for_plain_doors_on_the_network_without_users() {
        let config = |args: &[&str]| {
            let mut all = vec!["glockd"];
            all.extend_from_slice(args);
            Config::try_from_args(all).unwrap()
        };
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        let any = [
            ("tcp", addr("0.0.0.0:9999")),
            ("ws", addr("127.0.0.1:9998")),
        ];
        let warning = exposure_warning(&config(&[]), &any).unwrap();
        assert!(warning.contains("tcp 0.0.0.0:9999") && !warning.contains("9998"));
        assert!(!warning.contains('\n'));
        let mut users = config(&[]);
        users.users = Some(std::path::PathBuf::from("users.toml").into());
        assert!(exposure_warning(&users, &any).is_none());
        let loopback = [("tcp", addr("127.0.0.1:9999")), ("ws", addr("[::1]:9998"))];
        assert!(exposure_warning(&config(&[]), &loopback).is_none());
        assert!(exposure_warning(&config(&[]), &[]).is_none());
        let shard = [("shard port", addr("10.0.0.1:7000"))];
        let warning = exposure_warning(&config(&[]), &shard).unwrap();
        assert!(warning.ends_with("(no -shard-port)"), "{warning}");
        let mapped = [("tcp", addr("[::ffff:127.0.0.1]:9999"))];
        assert!(exposure_warning(&config(&[]), &mapped).is_none());
    }
}
