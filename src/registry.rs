//! The registry of live connections: each one's protocol id (`ip:port`, `unix:N`) and the name
//! it registered with `iam`.
//!
//! Lock tables store holders as compact [`ConnId`]s; listings (`d`, `sd`, `dump`, `who`, `me`)
//! turn them into text here. The registry is only touched when a connection opens or closes and
//! by those introspection commands, never by `g`/`r`/`sg`/`sr`, so a read-write lock split into
//! parts (so opens and closes on different threads rarely meet) costs the hot path nothing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crossbeam_utils::CachePadded;

use crate::memory::MemoryBudget;
use crate::ConnId;

/// Parts the registry is split into (a power of two).
const PARTS: usize = 64;

/// A text shared between the registry and the listings that show it.
pub type Text = Arc<[u8]>;

/// What the registry knows of one connection. Both texts are shared, not copied, by the
/// listings that show them: a listing of a thousand locks held by one connection holds one
/// copy of its name, however long.
struct Record {
    /// The protocol id: `ip:port` for TCP, `unix:N` for unix sockets.
    id: Arc<[u8]>,
    /// The name set with `iam`, if any.
    name: Option<Arc<[u8]>>,
}

type Part = HashMap<ConnId, Record>;

/// Live connections, by [`ConnId`].
pub struct Registry {
    parts: Box<[CachePadded<RwLock<Part>>]>,
    /// Registered names count against the memory budget.
    budget: Arc<MemoryBudget>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(Arc::new(MemoryBudget::unlimited()))
    }
}

impl Registry {
    /// A registry whose registered names count against `budget`.
    pub fn new(budget: Arc<MemoryBudget>) -> Self {
        Registry {
            parts: (0..PARTS).map(|_| CachePadded::default()).collect(),
            budget,
        }
    }

    fn part(&self, conn: ConnId) -> &RwLock<Part> {
        &self.parts[(conn as usize) & (PARTS - 1)]
    }

    // A panic while a part is locked cannot leave a record half-written (every write is a
    // single map operation), so a poisoned lock is still safe to use.
    fn read(&self, conn: ConnId) -> RwLockReadGuard<'_, Part> {
        self.part(conn).read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, conn: ConnId) -> RwLockWriteGuard<'_, Part> {
        self.part(conn).write().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection opened with protocol id `id`.
    pub fn insert(&self, conn: ConnId, id: String) {
        self.write(conn).insert(
            conn,
            Record {
                id: id.into_bytes().into(),
                name: None,
            },
        );
    }

    /// Every record, for a live upgrade's successor.
    pub fn export(&self) -> Vec<crate::upgrade::image::RecordImage> {
        let mut records = Vec::new();
        for part in self.parts.iter() {
            let part = part.read().unwrap_or_else(|e| e.into_inner());
            records.extend(
                part.iter()
                    .map(|(&conn, record)| crate::upgrade::image::RecordImage {
                        conn,
                        id: record.id.to_vec(),
                        name: record.name.as_ref().map(|n| n.to_vec()),
                    }),
            );
        }
        records
    }

    /// Takes the records a live upgrade's predecessor had (names counted in the budget as
    /// far as it has room: a name that does not fit is dropped, the connection kept).
    pub fn import(&self, records: &[crate::upgrade::image::RecordImage]) {
        for record in records {
            self.write(record.conn).insert(
                record.conn,
                Record {
                    id: record.id.as_slice().into(),
                    name: None,
                },
            );
            if let Some(name) = &record.name {
                self.set_name(record.conn, name);
            }
        }
    }

    /// A connection closed.
    pub fn remove(&self, conn: ConnId) {
        let removed = self.write(conn).remove(&conn);
        if let Some(name) = removed.and_then(|record| record.name) {
            self.budget
                .unregister(MemoryBudget::registered_name_cost(name.len()));
        }
    }

    /// `iam`: sets (or, with an empty name, clears) the registered name. False (and nothing
    /// changed) when the name does not fit in the memory budget.
    pub fn set_name(&self, conn: ConnId, name: &[u8]) -> bool {
        let cost = MemoryBudget::registered_name_cost(name.len());
        if !self.budget.try_register(cost) {
            return false;
        }
        let old = match self.write(conn).get_mut(&conn) {
            Some(record) => {
                std::mem::replace(&mut record.name, (!name.is_empty()).then(|| name.into()))
            }
            // Not a live connection: nothing was stored.
            None => {
                self.budget.unregister(cost);
                None
            }
        };
        if let Some(old) = old {
            self.budget
                .unregister(MemoryBudget::registered_name_cost(old.len()));
        }
        true
    }

    /// The connection's protocol id (`raw`) or, if it has one and `raw` is false, its
    /// registered name: shared with the registry, not copied. A connection's record outlives
    /// the release of its locks, so a holder is always found; `gone:N` would only show an
    /// internal inconsistency.
    pub fn holder_text(&self, conn: ConnId, raw: bool) -> Arc<[u8]> {
        let part = self.read(conn);
        match part.get(&conn) {
            Some(Record {
                name: Some(name), ..
            }) if !raw => name.clone(),
            Some(record) => record.id.clone(),
            None => format!("gone:{conn}").into_bytes().into(),
        }
    }

    /// Appends [`Self::holder_text`].
    pub fn write_holder(&self, conn: ConnId, raw: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.holder_text(conn, raw));
    }

    /// `me`: `1 <id> <name>`, the name being the id when none is registered.
    pub fn write_me(&self, conn: ConnId, out: &mut Vec<u8>) {
        out.extend_from_slice(b"1 ");
        let part = self.read(conn);
        if let Some(record) = part.get(&conn) {
            out.extend_from_slice(&record.id);
            out.push(b' ');
            match &record.name {
                Some(name) => out.extend_from_slice(name),
                None => out.extend_from_slice(&record.id),
            }
        }
        out.push(b'\n');
    }

    /// `who [NAME]`: `<id>: <name>` for every registered connection (or those named `name`)
    /// whose name `visible` lets through, sorted by id.
    pub fn write_who(
        &self,
        name: &[u8],
        visible: &mut dyn FnMut(&[u8]) -> bool,
        out: &mut Vec<u8>,
    ) {
        // (id, registered name), both shared with the records.
        let mut rows: Vec<(Text, Text)> = Vec::new();
        for part in self.parts.iter() {
            let part = part.read().unwrap_or_else(|e| e.into_inner());
            for record in part.values() {
                if let Some(registered) = &record.name {
                    if (name.is_empty() || **registered == *name) && visible(registered) {
                        rows.push((record.id.clone(), registered.clone()));
                    }
                }
            }
        }
        rows.sort();
        for (id, registered) in rows {
            out.extend_from_slice(&id);
            out.extend_from_slice(b": ");
            out.extend_from_slice(&registered);
            out.push(b'\n');
        }
    }
}

/// Whether `name` has the form of a connection id: `ip:port` (IPv4, or IPv6 with or without
/// brackets, a scope allowed) or `unix:N`. `iam` refuses such a name: listings show a
/// registered name where they would show the id, so a client registered under another
/// connection's id would make its own locks look like that connection's.
pub fn looks_like_conn_id(name: &[u8]) -> bool {
    use std::net::{IpAddr, Ipv6Addr};
    let Ok(name) = std::str::from_utf8(name) else {
        return false; // every id is ASCII
    };
    // A verified client certificate's name (see `tls::identity::display_name`), in any case.
    let prefix = crate::tls::identity::CERT_PREFIX;
    if name
        .get(..prefix.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
    {
        return true;
    }
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(n) = name.strip_prefix("unix:") {
        return all_digits(n);
    }
    let Some((host, port)) = name.rsplit_once(':') else {
        return false;
    };
    if !all_digits(port) {
        return false;
    }
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(bracketed) => {
            let address = bracketed.split_once('%').map_or(bracketed, |(a, _)| a);
            return address.parse::<Ipv6Addr>().is_ok();
        }
        None => host,
    };
    host.parse::<IpAddr>().is_ok()
}

/// Whether `name` is fit to show in a listing: UTF-8 with no control character (C0, DEL, C1)
/// and no invisible formatting character (zero-width spaces and joiners, bidirectional
/// overrides and isolates, the byte-order mark, soft hyphens…). `iam` refuses other names: a
/// listing shows names raw, and such characters (a NUL a C reader stops at, a terminal's escape
/// sequence, an invisible character before `cert:`, a right-to-left override) could make a
/// name read as another connection's id or a certificate's identity. Lookalike letters from
/// other scripts are not caught: `dump` shows the raw connection ids that cannot be forged.
pub fn is_printable_name(name: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(name) else {
        return false;
    };
    !text
        .chars()
        .any(|c| c.is_control() || is_invisible_format(c))
}

/// Unicode's invisible formatting characters (general category Cf) that could hide in a name.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFFB}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_are_recognised_and_ordinary_names_are_not() {
        for id in [
            "127.0.0.1:59210",
            "10.1.2.3:0",
            "[::1]:5000",
            "[fe80::1%2]:5000",
            "[2001:db8::7]:65535",
            "::1:5000",
            "2001:db8::1:80",
            "::ffff:127.0.0.1:9",
            "unix:1",
            "unix:123456",
        ] {
            assert!(looks_like_conn_id(id.as_bytes()), "{id}");
        }
        for name in [
            "",
            "worker 1",
            "unix:",
            "unix:x",
            "unix: 1",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:port",
            "host.example:80",
            "[::1]",
            "[::1]:",
            "[nope]:80",
            "::1",
            "127.0.0.1:80 extra",
        ] {
            assert!(!looks_like_conn_id(name.as_bytes()), "{name}");
        }
        assert!(!looks_like_conn_id(b"\xff127.0.0.1:1"));
        assert!(looks_like_conn_id(b"cert:alice") && looks_like_conn_id(b"CeRt:alice"));
    }

    #[test]
    fn names_replace_ids_in_listings_but_not_in_raw_dumps() {
        let registry = Registry::default();
        registry.insert(1, "127.0.0.1:5000".into());
        let mut out = Vec::new();
        registry.write_holder(1, false, &mut out);
        assert_eq!(out, b"127.0.0.1:5000");
        assert!(registry.set_name(1, b"worker 1"));
        out.clear();
        registry.write_holder(1, false, &mut out);
        assert_eq!(out, b"worker 1");
        out.clear();
        registry.write_holder(1, true, &mut out);
        assert_eq!(out, b"127.0.0.1:5000");
        out.clear();
        registry.write_me(1, &mut out);
        assert_eq!(out, b"1 127.0.0.1:5000 worker 1\n");
        out.clear();
        registry.write_who(b"", &mut |_| true, &mut out);
        assert_eq!(out, b"127.0.0.1:5000: worker 1\n");
        assert!(registry.set_name(1, b""));
        out.clear();
        registry.write_who(b"", &mut |_| true, &mut out);
        assert!(out.is_empty());
        registry.remove(1);
        out.clear();
        registry.write_holder(1, false, &mut out);
        assert_eq!(out, b"gone:1");
    }

    #[test]
    fn registered_names_count_against_the_budget_until_replaced_or_gone() {
        let budget = Arc::new(MemoryBudget::new(1000, 1));
        let registry = Registry::new(budget.clone());
        registry.insert(1, "127.0.0.1:5000".into());
        registry.insert(2, "127.0.0.1:5001".into());
        assert!(registry.set_name(1, &[b'a'; 500]));
        let one = MemoryBudget::registered_name_cost(500);
        assert_eq!(budget.used(), one);
        // A second one does not fit; nothing changes.
        assert!(!registry.set_name(2, &[b'b'; 500]));
        assert_eq!(budget.used(), one);
        // Replacing counts the new name and gives back the old one.
        assert!(registry.set_name(1, b"short"));
        assert_eq!(budget.used(), MemoryBudget::registered_name_cost(5));
        assert!(registry.set_name(2, &[b'b'; 500]));
        registry.remove(2);
        assert!(registry.set_name(1, b""));
        assert_eq!(budget.used(), 0);
        // A connection the registry does not know stores nothing.
        assert!(registry.set_name(9, b"nobody"));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn names_that_could_pass_for_another_are_not_printable() {
        for name in ["alice", "billing worker", "Zoë 工作", "", "a:b"] {
            assert!(is_printable_name(name.as_bytes()), "{name:?}");
        }
        for name in [
            &b"127.0.0.1:1\0"[..],
            b"\x1b[0m127.0.0.1:1",
            b"a\x7f",
            b"\xff",
            b"a\x9b",
            "127.0.0.1:1\u{85}".as_bytes(),
            "\u{200b}cert:alice".as_bytes(),
            "\u{202e}1:1.0.0.721".as_bytes(),
            "a\u{2066}b".as_bytes(),
            "\u{feff}a".as_bytes(),
        ] {
            assert!(!is_printable_name(name), "{name:?}");
        }
    }
}
