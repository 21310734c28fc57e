//! The users file: TOML, one `[[user]]` table per user, read at start and on SIGHUP.
//!
//! ```toml
//! [[user]]
//! name = "billing"
//! token_sha256 = "…"                    # from `glockd hash-token`
//! prefixes = ['billing:*', 'pool']      # names this user may use and see
//! classes = ["lock", "shared"]          # lock shared ratelimit inspect admin, or "all"
//! certificate = "billing.example.com"   # optional: a client certificate's subject
//! uid = 1001                            # optional: a unix-socket peer's uid
//! ```
//!
//! A pattern is a name, or a prefix when it ends in `*` (`*` alone: every name). Names are
//! bytes, so a pattern may hold any byte: `\xHH` is the byte HH, `\\` a backslash and `\*` a
//! star that is part of the name. Write patterns in TOML's single-quoted strings, where the
//! backslash reaches this decoding untouched.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use super::token::{self, Digest};
use super::{ClassSet, Pattern, User, Users};
use crate::protocol::Class;

/// The file as TOML sees it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileText {
    #[serde(default)]
    user: Vec<UserText>,
}

/// One `[[user]]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserText {
    name: String,
    token_sha256: Option<String>,
    #[serde(default)]
    prefixes: Vec<String>,
    #[serde(default)]
    classes: Vec<String>,
    certificate: Option<String>,
    uid: Option<u32>,
}

/// Parses a users file's text. The error is one line, naming the line of the file where TOML
/// found it, or the user it is about.
pub fn parse(text: &str) -> Result<Users, String> {
    let file: FileText = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        let message = e.message().replace('\n', " ");
        match line {
            Some(line) => format!("line {line}: {message}"),
            None => message,
        }
    })?;
    if file.user.is_empty() {
        return Err("no [[user]] in the file: nobody could connect".into());
    }
    let mut users = Vec::with_capacity(file.user.len());
    let mut by_name = HashMap::new();
    let mut by_certificate = HashMap::new();
    let mut by_uid = HashMap::new();
    for (at, text) in file.user.into_iter().enumerate() {
        let user = user(text).map_err(|(name, e)| format!("user {name:?}: {e}"))?;
        let name = user.name.clone();
        if by_name.insert(name.as_bytes().into(), at).is_some() {
            return Err(format!("user {name:?} is in the file twice"));
        }
        if let Some(subject) = &user.certificate {
            if let Some(other) = by_certificate.insert(subject.clone(), at) {
                return Err(format!(
                    "users {:?} and {name:?} have the same certificate {subject:?}",
                    users_name(&users, other)
                ));
            }
        }
        if let Some(uid) = user.uid {
            if let Some(other) = by_uid.insert(uid, at) {
                return Err(format!(
                    "users {:?} and {name:?} have the same uid {uid}",
                    users_name(&users, other)
                ));
            }
        }
        users.push(Arc::new(user));
    }
    Ok(Users {
        users,
        by_name,
        by_certificate,
        by_uid,
        decoy: decoy(),
    })
}

fn users_name(users: &[Arc<User>], at: usize) -> &str {
    users.get(at).map_or("", |u| &u.name)
}

/// One user, checked.
fn user(text: UserText) -> Result<User, (String, String)> {
    let name = text.name;
    let fail = |e: String| (name.clone(), e);
    if name.is_empty() || name.bytes().any(crate::protocol::is_space) {
        return Err(fail(
            "a user name must be one word without whitespace (auth USER TOKEN)".into(),
        ));
    }
    let token: Option<Digest> = text
        .token_sha256
        .as_deref()
        .map(token::parse_digest)
        .transpose()
        .map_err(fail)?;
    let certificate = text.certificate.map(|c| Arc::<str>::from(c.as_str()));
    if certificate.as_deref() == Some("") {
        return Err(fail("certificate must not be empty".into()));
    }
    if token.is_none() && certificate.is_none() && text.uid.is_none() {
        return Err(fail(
            "needs token_sha256, certificate or uid: otherwise nobody can be this user".into(),
        ));
    }
    let mut classes = ClassSet::default();
    for class in &text.classes {
        classes = classes.with_label(class).ok_or_else(|| {
            fail(format!(
                "unknown class {class:?} (use lock, shared, ratelimit, inspect, admin, or all)"
            ))
        })?;
    }
    let patterns = text
        .prefixes
        .iter()
        .map(|p| pattern(p).map_err(|e| fail(format!("prefix {p:?}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(User {
        name: name.as_str().into(),
        token,
        classes,
        patterns: patterns.into(),
        certificate,
        uid: text.uid,
    })
}

impl ClassSet {
    /// This set with the class a users file names `label` added (`all`: every class).
    fn with_label(self, label: &str) -> Option<ClassSet> {
        if label == "all" {
            return Some(ClassSet::ALL);
        }
        let class = Class::ALL
            .into_iter()
            .filter(|c| *c != Class::Connection)
            .find(|c| c.label() == label)?;
        Some(self.with(class))
    }
}

/// Decodes one pattern: `*` alone is every name; a trailing unescaped `*` makes a prefix; `\xHH`,
/// `\\` and `\*` are a byte, a backslash and a star of the name.
pub fn pattern(text: &str) -> Result<Pattern, String> {
    if text == "*" {
        return Ok(Pattern::Any);
    }
    let mut bytes = Vec::with_capacity(text.len());
    let mut prefix = false;
    let mut rest = text.as_bytes();
    while let [first, tail @ ..] = rest {
        rest = tail;
        match first {
            b'\\' => match rest {
                [b'\\', tail @ ..] | [b'*', tail @ ..] => {
                    bytes.push(rest[0]);
                    rest = tail;
                }
                [b'x', high, low, tail @ ..] => {
                    let hex = [*high, *low];
                    let byte = std::str::from_utf8(&hex)
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or("\\x must be followed by two hex digits")?;
                    bytes.push(byte);
                    rest = tail;
                }
                _ => return Err("a backslash must start \\xHH, \\\\ or \\*".into()),
            },
            b'*' if rest.is_empty() => prefix = true,
            b'*' => {
                return Err(
                    "a star is only special at the end (write \\* for a star in a name)".into(),
                )
            }
            byte => bytes.push(*byte),
        }
    }
    // Lock names are trimmed and their whitespace runs collapsed to one space: a pattern that
    // breaks those rules could never match, which is a mistake worth hearing about at start.
    let unreachable = bytes
        .iter()
        .any(|&b| crate::protocol::is_space(b) && b != b' ')
        || bytes.windows(2).any(|w| w == b"  ")
        || bytes.first() == Some(&b' ')
        || (!prefix && bytes.last() == Some(&b' '));
    if unreachable {
        return Err(
            "no lock name can match it (names are trimmed, and their whitespace is single spaces)"
                .into(),
        );
    }
    Ok(if prefix {
        Pattern::Prefix(bytes.into())
    } else {
        Pattern::Exact(bytes.into())
    })
}

/// The digest an unknown user's token is compared with, so that an unknown user costs what a
/// wrong token costs. Random per load: no token is known to hash to it.
fn decoy() -> Digest {
    use std::hash::BuildHasher;
    let seed = std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64);
    token::digest(&seed.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Pattern {
        pattern(text).unwrap()
    }

    #[test]
    fn patterns_are_names_prefixes_or_everything() {
        assert_eq!(p("*"), Pattern::Any);
        assert_eq!(p("billing:*"), Pattern::Prefix(b"billing:"[..].into()));
        assert_eq!(p("pool"), Pattern::Exact(b"pool"[..].into()));
        assert_eq!(p("my lock*"), Pattern::Prefix(b"my lock"[..].into()));
        assert_eq!(p("a *"), Pattern::Prefix(b"a "[..].into()));
        assert_eq!(p(r"\xff\x00k*"), Pattern::Prefix(b"\xff\x00k"[..].into()));
        assert_eq!(p(r"a\*"), Pattern::Exact(b"a*"[..].into()));
        assert_eq!(p(r"a\\*"), Pattern::Prefix(b"a\\"[..].into()));
        assert_eq!(p(""), Pattern::Exact(b""[..].into()));
        for bad in [
            r"a\q", r"\x", r"\xg0", "a*b", "**", "  a", " a", "a  b*", "a\tb", "a ",
        ] {
            assert!(pattern(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_file_of_users() {
        let users = parse(
            r#"
            [[user]]
            name = "billing"
            token_sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            prefixes = ['billing:*', '\xff*']
            classes = ["lock", "shared"]

            [[user]]
            name = "ops"
            classes = ["all"]
            prefixes = ["*"]
            uid = 0
            certificate = "ops.example.com"
            "#,
        )
        .unwrap();
        assert_eq!(users.len(), 2);
        let billing = users.by_name(b"billing").unwrap();
        assert!(billing.may(Class::Lock) && billing.may(Class::Shared));
        assert!(!billing.may(Class::Inspect) && !billing.may(Class::Admin));
        assert!(billing.may(Class::Connection));
        assert!(billing.may_name(b"billing:x") && billing.may_name(b"\xff\xfe"));
        assert!(!billing.may_name(b"bill") && !billing.may_name(b"ops:x"));
        let ops = users.by_name(b"ops").unwrap();
        assert!(Class::ALL.iter().all(|c| ops.may(*c)));
        assert!(ops.may_name(b"anything at all"));
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        let token = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let cases = [
            ("", "no [[user]]"),
            ("[[user]]\nname = \"a\"\ntoken_sha256 = \"zz\"\n", "64 hex digits"),
            ("[[user]]\nname = \"a\"\n", "needs token_sha256"),
            ("[[user]]\nname = \"a b\"\nuid = 1\n", "one word"),
            ("[[user]]\nname = \"a\"\nuid = 1\nclasses = [\"root\"]\n", "unknown class"),
            ("[[user]]\nname = \"a\"\nuid = 1\nclasses = [\"connection\"]\n", "unknown class"),
            ("[[user]]\nname = \"a\"\nuid = 1\nprefixes = ['a*b']\n", "prefix"),
            ("[[user]]\nname = \"a\"\nuid = 1\ncolour = 3\n", "line "),
            ("[[user]]\nname = \"a\"\nuid = 1\n[[user]]\nname = \"a\"\nuid = 2\n", "twice"),
            ("[[user]]\nname = \"a\"\nuid = 1\n[[user]]\nname = \"b\"\nuid = 1\n", "same uid"),
            ("[[user]]\nname = \"a\"\ncertificate = \"c\"\n[[user]]\nname = \"b\"\ncertificate = \"c\"\n", "same certificate"),
            ("[[user]\nname = 1", "line 1"),
        ];
        for (text, expected) in cases {
            let text = text.replace("TOKEN", token);
            let e = parse(&text)
                .err()
                .unwrap_or_else(|| panic!("accepted {text:?}"));
            assert!(e.contains(expected), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
