//! A small, deliberately breakable glockd: the whole protocol in one mutex-guarded state, on a
//! loopback port, where each [`Faults`] flag breaks exactly one rule. With no faults it is a
//! correct server (a test proves the tester passes it), so a check that fails against a faulty
//! one fails because of that fault.
//!
//! It serves either the line protocol over TCP ([`Fake::start`]) or the websocket door
//! ([`Fake::start_ws`]: each message's lines are run in order and each reply goes back as one
//! message, an empty listing as an empty message), with the same state and the same faults.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// Rules the fake can break, one flag each.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// `i` always answers 0.
    pub inspect_always_0: bool,
    /// Taking a lock you already hold answers 0.
    pub reget_answers_0: bool,
    /// `g` always succeeds, taking the lock from its holder.
    pub no_exclusion: bool,
    /// Any connection can release any held lock.
    pub anyone_can_release: bool,
    /// `sr` answers 1 but the holder stays counted.
    pub sr_keeps_holder: bool,
    /// `sg` by a holder counts it again.
    pub shared_double_counts: bool,
    /// `i` and `si` count both kinds of lock on a name.
    pub one_namespace: bool,
    /// A closed connection's locks stay held.
    pub no_orphaning: bool,
    /// Runs of spaces inside a name are kept.
    pub no_whitespace_collapse: bool,
    /// A trailing `\r` stays part of the name.
    pub crlf_kept: bool,
    /// Only the first line of each read is run (the original's defect).
    pub first_line_per_read: bool,
    /// Unknown commands get no reply (the original's defect).
    pub silent_on_unknown: bool,
    /// Empty lines get an error reply.
    pub empty_line_answered: bool,
    /// `d NAME` and `sd NAME` list nothing.
    pub listings_empty: bool,
    /// `d`/`sd` show raw ids even for registered holders.
    pub listings_ignore_registry: bool,
    /// `dump` and `dump shared` always print `map[]`.
    pub dump_empty: bool,
    /// `dump` shows registered names instead of raw ids.
    pub dump_shows_names: bool,
    /// `me` answers `1 <id>` without the name.
    pub me_without_name: bool,
    /// `iam NAME` answers `1 ok` but registers nothing.
    pub iam_ignored: bool,
    /// An empty `iam` does not clear the name.
    pub empty_iam_kept: bool,
    /// `who NAME` lists nothing.
    pub who_lists_nothing: bool,
    /// `q` leaves out the `locks` line.
    pub stats_without_locks: bool,
    /// Command, invalid and orphan counters never move.
    pub frozen_stats: bool,
    /// `locks`, `shared_locks` and `connections` always read 0.
    pub gauges_zero: bool,
    /// `i` on a held lock answers a 2 MiB line: longer than any cap the tester reads with.
    pub huge_held_inspect: bool,
    /// Websocket door: each line of a reply goes in a message of its own (a listing split
    /// over several messages, as a naive line-to-message adapter would send it).
    pub ws_rows_per_message: bool,
    /// Websocket door: an empty reply (an empty listing) sends no message at all, as if the
    /// reply were a byte stream.
    pub ws_no_empty_message: bool,
    /// Replies as the original wrote them: `1 Lock Get Success: NAME`, `\r\n` after shared
    /// replies; with `first_line_per_read` and `silent_on_unknown` this is the original.
    pub original_texts: bool,
}

impl Faults {
    /// The original server's behaviour, which `--compat` must accept.
    pub fn original() -> Self {
        Faults {
            first_line_per_read: true,
            silent_on_unknown: true,
            original_texts: true,
            ..Faults::default()
        }
    }
}

/// One connection as the fake knows it.
struct Client {
    /// `ip:port` of the peer.
    id: String,
    /// The `iam` name.
    name: Option<String>,
    /// After `framed`: listings start with a line counting their rows.
    framed: bool,
}

/// Everything the fake knows.
#[derive(Default)]
struct State {
    /// The last connection number handed out.
    next: u64,
    /// Open connections, by number.
    clients: HashMap<u64, Client>,
    /// Exclusive locks: name to holder.
    locks: BTreeMap<String, u64>,
    /// Shared locks: name to holders, in arrival order.
    shared: BTreeMap<String, Vec<u64>>,
    /// `command_<word>` counters.
    commands: BTreeMap<&'static str, u64>,
    /// `invalid_commands`.
    invalid: u64,
    /// `orphans`.
    orphans: u64,
    /// `shared_orphans`.
    shared_orphans: u64,
}

/// Every command word, sorted (the order of the `q` lines).
const WORDS: [&str; 14] = [
    "d", "dump", "framed", "g", "i", "iam", "me", "q", "r", "sd", "sg", "si", "sr", "who",
];

/// A running fake, stopped when dropped.
pub struct Fake {
    /// Where it listens (loopback, ephemeral port).
    pub addr: SocketAddr,
    /// The accept loop, aborted on drop (open connections end with the test's runtime).
    accept: JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Which protocol the fake speaks on its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    /// Lines over TCP.
    Tcp,
    /// The websocket door.
    Ws,
}

impl Fake {
    /// The fake on TCP.
    pub async fn start(faults: Faults) -> Fake {
        Fake::start_on(Door::Tcp, faults).await
    }

    /// The fake as a websocket door.
    pub async fn start_ws(faults: Faults) -> Fake {
        Fake::start_on(Door::Ws, faults).await
    }

    pub async fn start_on(door: Door, faults: Faults) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::default()));
        let accept = tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                match door {
                    Door::Tcp => tokio::spawn(serve(stream, peer, state.clone(), faults)),
                    Door::Ws => tokio::spawn(serve_ws(stream, peer, state.clone(), faults)),
                };
            }
        });
        Fake { addr, accept }
    }

    /// The URL of a fake started with [`Fake::start_ws`].
    pub fn ws_url(&self) -> String {
        format!("ws://{}/", self.addr)
    }
}

/// Registers a new connection; returns its number.
fn register(state: &Mutex<State>, peer: SocketAddr) -> u64 {
    let mut s = state.lock().unwrap();
    s.next += 1;
    let conn = s.next;
    s.clients.insert(
        conn,
        Client {
            id: peer.to_string(),
            name: None,
            framed: false,
        },
    );
    conn
}

async fn serve(mut stream: TcpStream, peer: SocketAddr, state: Arc<Mutex<State>>, f: Faults) {
    let conn = register(&state, peer);
    let mut input = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        input.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        while let Some(at) = input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = input.drain(..=at).collect();
            let line = String::from_utf8_lossy(&line[..at]).into_owned();
            let reply = handle(&mut state.lock().unwrap(), conn, &line, &f);
            out.extend_from_slice(reply.unwrap_or_default().as_bytes());
            if f.first_line_per_read {
                input.clear();
            }
        }
        if stream.write_all(&out).await.is_err() {
            break;
        }
    }
    disconnect(&state, conn, &f);
}

async fn serve_ws(stream: TcpStream, peer: SocketAddr, state: Arc<Mutex<State>>, f: Faults) {
    // Until the handshake is done there is no connection to register.
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let conn = register(&state, peer);
    'messages: while let Some(Ok(message)) = ws.next().await {
        let data = match message {
            Message::Text(text) => text.as_bytes().to_vec(),
            Message::Binary(data) => data.to_vec(),
            Message::Close(_) => break,
            _ => continue,
        };
        // A message with or without a trailing newline is the same command.
        let body = data.strip_suffix(b"\n").unwrap_or(&data);
        let mut replies = Vec::new();
        for line in body.split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            match handle(&mut state.lock().unwrap(), conn, &line, &f) {
                None => {}
                Some(reply) if reply.is_empty() && f.ws_no_empty_message => {}
                Some(reply) if f.ws_rows_per_message => {
                    replies.extend(reply.split_inclusive('\n').map(str::to_owned));
                }
                Some(reply) => replies.push(reply),
            }
            if f.first_line_per_read {
                break;
            }
        }
        for reply in replies {
            if ws.send(Message::text(reply)).await.is_err() {
                break 'messages;
            }
        }
    }
    disconnect(&state, conn, &f);
}

/// A connection ended: release its locks (unless the fault says not to) and forget it.
fn disconnect(state: &Mutex<State>, conn: u64, f: &Faults) {
    let mut s = state.lock().unwrap();
    if !f.no_orphaning {
        let held: Vec<String> = s
            .locks
            .iter()
            .filter(|(_, &h)| h == conn)
            .map(|(n, _)| n.clone())
            .collect();
        for name in held {
            s.locks.remove(&name);
            if !f.frozen_stats {
                s.orphans += 1;
            }
        }
        let mut released = 0;
        s.shared.retain(|_, holders| {
            let before = holders.len();
            holders.retain(|&h| h != conn);
            released += before - holders.len();
            !holders.is_empty()
        });
        if !f.frozen_stats {
            s.shared_orphans += released as u64;
        }
    }
    s.clients.remove(&conn);
}

fn is_space(c: char, f: &Faults) -> bool {
    matches!(c, ' ' | '\t') || (c == '\r' && !f.crlf_kept)
}

/// Runs one line; returns its reply bytes, or `None` when the line gets no reply at all (a
/// blank line; an unknown command with `silent_on_unknown`). `Some("")` is an empty listing,
/// which the websocket door still answers, with an empty message.
fn handle(s: &mut State, conn: u64, line: &str, f: &Faults) -> Option<String> {
    let line = line.trim_matches(|c| is_space(c, f));
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let Some(&word) = WORDS.iter().find(|w| **w == word) else {
        if line.is_empty() && !f.empty_line_answered {
            return None;
        }
        if !f.frozen_stats {
            s.invalid += 1;
        }
        return (!f.silent_on_unknown).then(|| "0 Invalid Command\n".into());
    };
    if !f.frozen_stats {
        *s.commands.entry(word).or_default() += 1;
    }
    Some(known(s, conn, word, rest, f))
}

/// Runs a known command `word` with the rest of its line.
fn known(s: &mut State, conn: u64, word: &str, rest: &str, f: &Faults) -> String {
    let name = if f.no_whitespace_collapse {
        rest.trim_matches(|c| is_space(c, f)).to_owned()
    } else {
        rest.split(|c| is_space(c, f))
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let reply = |code: u64, text: &str, original: &str, shared: bool| {
        if f.original_texts {
            format!(
                "{code} {original}: {name}{}\n",
                if shared { "\r" } else { "" }
            )
        } else {
            format!("{code} {text}\n")
        }
    };
    let holder = s.locks.get(&name).copied();
    let holders = s.shared.get(&name).map_or(0, Vec::len) as u64;
    match word {
        "g" => match holder {
            Some(h) if h == conn && f.reget_answers_0 => {
                reply(0, "Cannot Get Lock", "Lock Get Failure", false)
            }
            Some(h) if h != conn && !f.no_exclusion => {
                reply(0, "Cannot Get Lock", "Lock Get Failure", false)
            }
            _ => {
                s.locks.insert(name.clone(), conn);
                reply(1, "Got Lock", "Lock Get Success", false)
            }
        },
        "r" => match holder {
            Some(h) if h == conn || f.anyone_can_release => {
                s.locks.remove(&name);
                reply(1, "Released Lock", "Lock Release Success", false)
            }
            _ => reply(0, "Cannot Release Lock", "Lock Release Failure", false),
        },
        "i" if f.huge_held_inspect && holder.is_some() => {
            format!("1 {}\n", "x".repeat(2 << 20))
        }
        "i" => {
            let held = holder.is_some() || (f.one_namespace && holders > 0);
            match held && !f.inspect_always_0 {
                true => reply(1, "Locked", "Lock Is Locked", false),
                false => reply(0, "Not Locked", "Lock Not Locked", false),
            }
        }
        "sg" => {
            let list = s.shared.entry(name.clone()).or_default();
            if f.shared_double_counts || !list.contains(&conn) {
                list.push(conn);
            }
            reply(
                list.len() as u64,
                "Got Shared Lock",
                "Shared Lock Get Success",
                true,
            )
        }
        "sr" => match s.shared.get_mut(&name) {
            Some(list) if list.contains(&conn) => {
                if !f.sr_keeps_holder {
                    list.retain(|&h| h != conn);
                    if list.is_empty() {
                        s.shared.remove(&name);
                    }
                }
                reply(
                    1,
                    "Released Shared Lock",
                    "Shared Lock Release Success",
                    true,
                )
            }
            _ => reply(
                0,
                "Cannot Release Shared Lock",
                "Shared Lock Release Failure",
                true,
            ),
        },
        "si" => {
            let count = holders + u64::from(f.one_namespace && holder.is_some());
            reply(count, "Shared Locked", "Shared Lock Is Locked", true)
        }
        "d" | "sd" => {
            if f.listings_empty {
                return String::new();
            }
            let text = |h: u64| holder_text(s, h, !f.listings_ignore_registry);
            let mut rows: Vec<String> = if word == "d" {
                s.locks
                    .iter()
                    .filter(|(n, _)| name.is_empty() || **n == name)
                    .map(|(n, &h)| format!("{n}: {}\n", text(h)))
                    .collect()
            } else {
                s.shared
                    .iter()
                    .filter(|(n, _)| name.is_empty() || **n == name)
                    .flat_map(|(n, hs)| hs.iter().map(move |&h| (n, h)))
                    .map(|(n, h)| format!("{n}: {}\n", text(h)))
                    .collect()
            };
            rows.sort();
            let framed = s.clients.get(&conn).is_some_and(|c| c.framed);
            let count = if framed {
                format!("{} lines\n", rows.len())
            } else {
                String::new()
            };
            count + &rows.concat()
        }
        "framed" => {
            if let Some(client) = s.clients.get_mut(&conn) {
                client.framed = true;
            }
            "1 Framed\n".into()
        }
        "dump" => {
            if f.dump_empty {
                return "map[]\n".into();
            }
            let text = |h: u64| holder_text(s, h, f.dump_shows_names);
            let entries: Vec<String> = if name == "shared" {
                s.shared
                    .iter()
                    .map(|(n, hs)| {
                        format!(
                            "{n}:[{}]",
                            hs.iter().map(|&h| text(h)).collect::<Vec<_>>().join(" ")
                        )
                    })
                    .collect()
            } else {
                s.locks
                    .iter()
                    .map(|(n, &h)| format!("{n}:{}", text(h)))
                    .collect()
            };
            format!("map[{}]\n", entries.join(" "))
        }
        "me" => {
            let client = &s.clients[&conn];
            match (&client.name, f.me_without_name) {
                (_, true) => format!("1 {}\n", client.id),
                (Some(name), _) => format!("1 {} {name}\n", client.id),
                (None, _) => format!("1 {} {}\n", client.id, client.id),
            }
        }
        "iam" => {
            let client = s.clients.get_mut(&conn).unwrap();
            if name.is_empty() {
                if !f.empty_iam_kept {
                    client.name = None;
                }
            } else if !f.iam_ignored {
                client.name = Some(name);
            }
            "1 ok\n".into()
        }
        "who" => {
            if f.who_lists_nothing {
                return String::new();
            }
            let mut rows: Vec<String> = s
                .clients
                .values()
                .filter_map(|c| Some((c, c.name.as_ref()?)))
                .filter(|(_, n)| name.is_empty() || **n == name)
                .map(|(c, n)| format!("{}: {n}\n", c.id))
                .collect();
            rows.sort();
            let framed = s.clients.get(&conn).is_some_and(|c| c.framed);
            let count = if framed {
                format!("{} lines\n", rows.len())
            } else {
                String::new()
            };
            count + &rows.concat()
        }
        "q" => stats(s, f),
        _ => unreachable!(),
    }
}

/// A holder's listing text: its registered name if `by_name` and it has one, else its id.
fn holder_text(s: &State, conn: u64, by_name: bool) -> String {
    match s.clients.get(&conn) {
        Some(Client {
            name: Some(name), ..
        }) if by_name => name.clone(),
        Some(client) => client.id.clone(),
        None => format!("gone:{conn}"),
    }
}

fn stats(s: &State, f: &Faults) -> String {
    let gauge = |n: usize| if f.gauges_zero { 0 } else { n as u64 };
    let mut lines: Vec<(String, u64)> = WORDS
        .iter()
        .map(|w| {
            (
                format!("command_{w}"),
                s.commands.get(w).copied().unwrap_or(0),
            )
        })
        .collect();
    lines.push(("connections".into(), gauge(s.clients.len())));
    lines.push(("invalid_commands".into(), s.invalid));
    if !f.stats_without_locks {
        lines.push(("locks".into(), gauge(s.locks.len())));
    }
    lines.push(("orphans".into(), s.orphans));
    lines.push(("shared_locks".into(), gauge(s.shared.len())));
    lines.push(("shared_orphans".into(), s.shared_orphans));
    lines.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
}
