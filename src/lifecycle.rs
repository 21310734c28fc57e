//! A connection's life on its shard thread: its place under `--max-connections`
//! ([`Admission`]), its hand-over from the accepting thread ([`ConnMsg::Adopt`]), its existence
//! as the lock tables see it ([`Presence`]: dropping it orphans the connection's locks), and
//! shutdown's drain of every connection on a thread ([`ConnMsg::Close`]).

use crate::peer::Peer;
use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;

use crate::shard::{Departure, Outgoing, ServerState, ShardCore};
use crate::ConnId;

/// A connection's place under `--max-connections`, and under `--max-connections-per-ip` for
/// its address: taken when the connection is accepted, given back when it ends (whichever
/// thread that happens on).
pub struct Admission {
    server: Arc<ServerState>,
    /// The address counted under `--max-connections-per-ip`, if it is.
    counted: Option<IpAddr>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `--max-connections` (or the open-file limit) is reached.
    Full,
    /// Its address has `--max-connections-per-ip` connections already.
    PerIp,
}

impl Refusal {
    /// The reason as a log field's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Full => "max_connections",
            Refusal::PerIp => "max_connections_per_ip",
        }
    }
}

impl Admission {
    /// Takes a place for a client at `peer` (None: a unix socket, which has no address), or
    /// says why not.
    pub fn try_new(server: &Arc<ServerState>, peer: Option<IpAddr>) -> Result<Admission, Refusal> {
        let max = server.config.max_connections;
        let live = &server.live_connections;
        let mut now = live.load(Ordering::Relaxed);
        loop {
            if now >= max {
                return Err(Refusal::Full);
            }
            match live.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(seen) => now = seen,
            }
        }
        // From here the place is held: dropping `admission` gives it back.
        let mut admission = Admission {
            server: server.clone(),
            counted: None,
        };
        if let Some(key) = Admission::per_ip_key(server, peer) {
            if !server
                .per_ip
                .try_add(key, server.config.max_connections_per_ip)
            {
                return Err(Refusal::PerIp);
            }
            admission.counted = Some(key);
        }
        Ok(admission)
    }

    /// The address a client at `peer` counts under for `--max-connections-per-ip`, if that
    /// limit is on and the address is counted.
    fn per_ip_key(server: &ServerState, peer: Option<IpAddr>) -> Option<IpAddr> {
        let config = &server.config;
        peer.and_then(|ip| PerIp::key(ip, config.per_ip_exempt_loopback))
            .filter(|_| config.max_connections_per_ip > 0)
    }

    /// A place for a connection carried by a live upgrade: counted, never refused (the
    /// connection exists already).
    pub fn carried(server: &Arc<ServerState>, peer: Option<IpAddr>) -> Admission {
        server.live_connections.fetch_add(1, Ordering::AcqRel);
        let counted = Admission::per_ip_key(server, peer);
        if let Some(key) = counted {
            server.per_ip.try_add(key, u64::MAX);
        }
        Admission {
            server: server.clone(),
            counted,
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(key) = self.counted {
            self.server.per_ip.remove(key);
        }
        self.server.live_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Parts [`PerIp`] is split into (a power of two), so that accepts on different threads (the
/// shard ports) and connections ending on every thread rarely wait on one another.
const PER_IP_PARTS: usize = 16;

/// Connections open now per client address. An entry exists only while its address has a
/// connection, so the map is never bigger than the connections served.
pub struct PerIp {
    /// Address -> connections open now, split by a hash of the address.
    parts: Box<[crossbeam_utils::CachePadded<Mutex<IpCounts>>]>,
}

/// Connections per counted address, in one part of [`PerIp`].
type IpCounts = HashMap<IpAddr, u64>;

impl Default for PerIp {
    fn default() -> Self {
        PerIp {
            parts: (0..PER_IP_PARTS).map(|_| Default::default()).collect(),
        }
    }
}

impl PerIp {
    /// The address `ip` is counted under, or None if it is not counted: an IPv4-mapped IPv6
    /// address counts as its IPv4 address; loopback is not counted when `exempt_loopback`.
    /// An IPv6 address counts on its own, not as its /64: cloud subnets put many machines in
    /// one /64, and together they would meet a limit meant for one.
    pub fn key(ip: IpAddr, exempt_loopback: bool) -> Option<IpAddr> {
        let ip = ip.to_canonical();
        if exempt_loopback && ip.is_loopback() {
            return None;
        }
        Some(ip)
    }

    fn part(&self, key: IpAddr) -> &Mutex<IpCounts> {
        let hash = match key {
            IpAddr::V4(v4) => u64::from(u32::from(v4)),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                (bits >> 64) as u64 ^ bits as u64
            }
        };
        // Mix the bits so that neighbouring addresses spread over the parts.
        let mixed = hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60;
        &self.parts[(mixed as usize) & (PER_IP_PARTS - 1)]
    }

    // Every update is a single map operation, so a poisoned lock is still consistent.
    fn lock(&self, key: IpAddr) -> std::sync::MutexGuard<'_, IpCounts> {
        self.part(key).lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more connection from `key`, unless it has `max` already.
    fn try_add(&self, key: IpAddr, max: u64) -> bool {
        let mut part = self.lock(key);
        let count = part.entry(key).or_insert(0);
        if *count >= max {
            if *count == 0 {
                part.remove(&key);
            }
            return false;
        }
        *count += 1;
        true
    }

    fn remove(&self, key: IpAddr) {
        let mut part = self.lock(key);
        if let Some(count) = part.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                part.remove(&key);
            }
        }
    }

    /// Connections counted for `ip` now (0 if it is not counted).
    pub fn count(&self, ip: IpAddr) -> u64 {
        PerIp::key(ip, false).map_or(0, |key| self.lock(key).get(&key).copied().unwrap_or(0))
    }
}

/// A stream handed from the accepting thread to the shard that will serve it, with its
/// protocol id (`ip:port`, `unix:N`) and its place under `--max-connections`.
pub enum Incoming {
    Tcp(std::net::TcpStream, String, Admission),
    Ws(std::net::TcpStream, String, Admission),
    Unix(std::os::unix::net::UnixStream, String, Admission),
    /// A TLS connection, with its place under `--max-tls-handshakes`: its handshake is done
    /// by the shard that adopts it.
    Tls(
        std::net::TcpStream,
        String,
        Admission,
        crate::tls::Handshake,
    ),
}

/// A connection stopped for a live upgrade: what it is handed over as, and what it is served
/// again from.
pub type Frozen = Resumed;

/// A carried connection to serve again (after a live upgrade, or when one is called off):
/// its socket, and the rest of it.
pub struct Resumed {
    pub fd: std::os::fd::OwnedFd,
    pub conn: Carried,
}

/// A carried connection's state besides its socket.
pub struct Carried {
    pub image: crate::upgrade::ConnImage,
    /// The answer of the wait it is in (its waiter queued again in the tables).
    pub answer: Option<tokio::sync::oneshot::Receiver<crate::protocol::Reply>>,
    /// Its lock allowance, counting the locks it holds.
    pub quota: Option<Arc<crate::table::Quota>>,
    pub admission: Admission,
}

/// Life-cycle messages for a shard thread's connections.
pub enum ConnMsg {
    /// Serve a new connection on this thread.
    Adopt(Incoming),
    /// Live upgrade, first step: stop accepting (the accept loops of this thread pause); say
    /// so on `done`.
    PauseAccepting { done: std::sync::mpsc::Sender<()> },
    /// Live upgrade, second step: every connection on this thread stops at its next command
    /// boundary (or in its wait) and is handed over; connections that cannot be carried (TLS)
    /// close as at shutdown. Reports the stopped connections on `done` once none
    /// is left.
    Freeze {
        done: std::sync::mpsc::Sender<Vec<Frozen>>,
    },
    /// The upgrade is over (called off, or never begun): accept again.
    Thaw,
    /// Serve a carried connection on this thread.
    Resume(Box<Resumed>),
    /// Shutdown, first step: stop accepting, let every connection on this thread answer what
    /// it already read and close; report on `drained` when none is left. Mailboxes keep
    /// running meanwhile, since a closing connection may still wait on another shard.
    Close {
        drained: std::sync::mpsc::Sender<()>,
    },
}

/// The connections living on one thread.
#[derive(Default)]
pub struct ThreadConns {
    /// Set once shutdown begins: connections answer what they read, then close.
    closing: Cell<bool>,
    /// Wakes connections (and the accept loops) when `closing` or `freezing` is set: one
    /// wake-up for both, so a connection waiting for I/O registers one waiter, not two.
    stopping_notify: Notify,
    /// Connections living on this thread.
    live: Cell<usize>,
    /// Wakes the shutdown drain when `live` drops to zero.
    drained_notify: Notify,
    /// A live upgrade stops this thread's connections (see [`ConnMsg::Freeze`]).
    freezing: Cell<bool>,
    /// The accept loops wait while this is set (see [`ConnMsg::PauseAccepting`]).
    accept_paused: Cell<bool>,
    /// Wakes the accept loops when `accept_paused` changes.
    accept_notify: Notify,
    /// Connections stopped so far by the freeze in progress.
    frozen: std::cell::RefCell<Vec<Frozen>>,
}

impl ThreadConns {
    /// Whether shutdown has begun.
    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Completes when shutdown or a live upgrade's freeze begins (check [`Self::is_closing`]
    /// and [`Self::is_freezing`] first: this only sees a start that happens after the call,
    /// and says neither which one it was).
    pub fn stopping(&self) -> tokio::sync::futures::Notified<'_> {
        self.stopping_notify.notified()
    }

    /// Whether a live upgrade is stopping this thread's connections.
    pub fn is_freezing(&self) -> bool {
        self.freezing.get()
    }

    /// Whether the accept loops are paused for a live upgrade.
    pub fn accept_paused(&self) -> bool {
        self.accept_paused.get()
    }

    /// Completes when accepting is paused or resumed (check [`Self::accept_paused`] first).
    pub fn accept_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.accept_notify.notified()
    }

    /// Pauses (or resumes) the accept loops.
    pub fn set_accept_paused(&self, paused: bool) {
        self.accept_paused.set(paused);
        self.accept_notify.notify_waiters();
    }

    /// A connection stopped for the upgrade hands itself over.
    pub fn hand_over(&self, frozen: Frozen) {
        self.frozen.borrow_mut().push(frozen);
    }

    fn opened(&self) {
        self.live.set(self.live.get() + 1);
    }

    fn closed(&self) {
        self.live.set(self.live.get() - 1);
        if self.live.get() == 0 {
            self.drained_notify.notify_waiters();
        }
    }
}

/// Handles one life-cycle message on this thread.
pub fn handle(core: &Rc<ShardCore>, msg: ConnMsg) {
    match msg {
        ConnMsg::Adopt(incoming) => adopt(core, incoming),
        ConnMsg::Close { drained } => close(core, drained),
        ConnMsg::PauseAccepting { done } => {
            core.conns.accept_paused.set(true);
            core.conns.accept_notify.notify_waiters();
            let _ = done.send(());
        }
        ConnMsg::Freeze { done } => freeze(core, done),
        ConnMsg::Thaw => {
            core.conns.freezing.set(false);
            core.conns.accept_paused.set(false);
            core.conns.accept_notify.notify_waiters();
        }
        ConnMsg::Resume(resumed) => resume(core, *resumed),
    }
}

/// Stops every connection on this thread for a live upgrade, and reports them once the last
/// is stopped (or closed). Their replies to other shards' commands have all come back by then
/// (a connection stops only between batches), and what the departed ones left to release is
/// posted before the report, so the tables the upgrade takes next are complete.
fn freeze(core: &Rc<ShardCore>, done: std::sync::mpsc::Sender<Vec<Frozen>>) {
    let conns = &core.conns;
    conns.freezing.set(true);
    conns.stopping_notify.notify_waiters();
    let live = conns.live.get();
    let core = core.clone();
    tokio::task::spawn_local(async move {
        let conns = &core.conns;
        while conns.live.get() > 0 && conns.freezing.get() {
            let drained = conns.drained_notify.notified();
            let thawed = conns.accept_notify.notified();
            if conns.live.get() == 0 || !conns.freezing.get() {
                break;
            }
            tokio::select! {
                _ = drained => {}
                _ = thawed => {}
            }
        }
        let frozen = std::mem::take(&mut *conns.frozen.borrow_mut());
        if !conns.freezing.get() {
            // Called off before every connection stopped: those that did run again here.
            for resumed in frozen {
                resume(&core, resumed);
            }
            let _ = done.send(Vec::new());
            return;
        }
        core.flush_outbox_now();
        let closed = live.saturating_sub(frozen.len()) as u64;
        core.server
            .upgrades
            .closed_connections
            .fetch_add(closed, Ordering::Relaxed);
        let _ = done.send(frozen);
    });
}

/// Serves a carried connection on this thread.
fn resume(core: &Rc<ShardCore>, resumed: Resumed) {
    let Resumed { fd, conn } = resumed;
    let result = match conn.image.door {
        crate::upgrade::ConnDoor::Ws => {
            let stream = std::net::TcpStream::from(fd);
            stream
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(stream))
                .map(|stream| {
                    let serve = crate::websocket::resume(core.clone(), stream, conn);
                    tokio::task::spawn_local(serve);
                })
        }
        crate::upgrade::ConnDoor::Tcp => {
            let stream = std::net::TcpStream::from(fd);
            stream
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(stream))
                .map(|stream| {
                    let serve =
                        crate::connection::resume(core.clone(), stream, Peer::anonymous(), conn);
                    tokio::task::spawn_local(serve);
                })
        }
        crate::upgrade::ConnDoor::Unix => {
            let stream = std::os::unix::net::UnixStream::from(fd);
            stream
                .set_nonblocking(true)
                .and_then(|()| UnixStream::from_std(stream))
                .map(|stream| {
                    let peer = Peer::unix(&stream);
                    tokio::task::spawn_local(crate::connection::resume(
                        core.clone(),
                        stream,
                        peer,
                        conn,
                    ));
                })
        }
    };
    if let Err(e) = result {
        tracing::warn!(event = "resume_failed", error = %e, "could not serve a carried connection");
    }
}

/// Starts serving a connection on this shard's thread.
pub fn adopt(core: &Rc<ShardCore>, incoming: Incoming) {
    if core.is_closing() {
        return; // shutting down: dropping the stream closes it
    }
    let result = match incoming {
        Incoming::Tcp(stream, id, admission) => TcpStream::from_std(stream).map(|stream| {
            crate::doors::tune_tcp(&core.server.config, &stream, &id);
            tokio::task::spawn_local(crate::connection::serve(
                core.clone(),
                stream,
                id,
                admission,
                Peer::anonymous(),
            ));
        }),
        Incoming::Ws(stream, id, admission) => TcpStream::from_std(stream).map(|stream| {
            crate::doors::tune_tcp(&core.server.config, &stream, &id);
            tokio::task::spawn_local(crate::websocket::serve(
                core.clone(),
                stream,
                id,
                admission,
                Peer::websocket(),
            ));
        }),
        Incoming::Tls(stream, id, admission, handshake) => {
            TcpStream::from_std(stream).map(|stream| {
                crate::doors::tune_tcp(&core.server.config, &stream, &id);
                tokio::task::spawn_local(crate::tls::serve(
                    core.clone(),
                    stream,
                    id,
                    admission,
                    handshake,
                ));
            })
        }
        Incoming::Unix(stream, id, admission) => UnixStream::from_std(stream).map(|stream| {
            let peer = Peer::unix(&stream);
            tokio::task::spawn_local(crate::connection::serve(
                core.clone(),
                stream,
                id,
                admission,
                peer,
            ));
        }),
    };
    if let Err(e) = result {
        tracing::warn!(
            event = "adopt_failed",
            error = %e,
            "could not adopt a connection"
        );
    }
}

/// Begins shutdown on this thread: wakes every connection (and the accept loop) to finish
/// up, and reports on `drained` once the last connection here has gone.
fn close(core: &Rc<ShardCore>, drained: std::sync::mpsc::Sender<()>) {
    let conns = &core.conns;
    conns.closing.set(true);
    // Waiters are answered (timed out) before their connections are told to finish up, so a
    // connection on this thread finds its answer as soon as it looks.
    core.expire_waits();
    conns.stopping_notify.notify_waiters();
    let core = core.clone();
    tokio::task::spawn_local(async move {
        let conns = &core.conns;
        while conns.live.get() > 0 {
            let notified = conns.drained_notify.notified();
            if conns.live.get() == 0 {
                break;
            }
            notified.await;
        }
        let _ = drained.send(());
    });
}

/// A small set of shard numbers.
pub struct ShardSet(Vec<u64>);

impl ShardSet {
    pub fn new(shards: usize) -> Self {
        ShardSet(vec![0; shards.div_ceil(64)])
    }

    #[inline]
    pub fn insert(&mut self, shard: usize) {
        self.0[shard / 64] |= 1 << (shard % 64);
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(word, bits)| {
            (0..64).filter_map(move |bit| (bits & (1 << bit) != 0).then_some(word * 64 + bit))
        })
    }
}

/// A connection's existence as the server sees it. Dropping it (the connection ended, failed,
/// panicked or was cancelled at shutdown) orphans the connection's locks, through the same
/// FIFO mailboxes as its commands, so a lock granted while it was going away is released too.
pub struct Presence {
    pub conn: ConnId,
    pub core: Rc<ShardCore>,
    /// Protocol id, kept for `-verbose` logging.
    pub label: Option<Arc<str>>,
    /// Shards this connection sent a lock command to: only they can hold its locks.
    pub touched: ShardSet,
    /// Its place under `--max-connections`, given back when it ends (or handed over).
    admission: Option<Admission>,
    /// Handed over to a live upgrade's successor: its locks and registry record stay.
    pub handed_over: bool,
}

impl Presence {
    pub fn open(core: Rc<ShardCore>, id_text: String, admission: Admission) -> Self {
        let server = &core.server;
        let conn = server.next_conn_id();
        let label = server
            .config
            .verbose
            .then(|| Arc::<str>::from(id_text.as_str()));
        if let Some(label) = &label {
            tracing::info!(event = "connect", conn = %label);
        }
        server.registry.insert(conn, id_text);
        core.cell().connections_opened.add(1);
        core.conns.opened();
        let touched = ShardSet::new(server.router.shards());
        Presence {
            conn,
            core,
            label,
            touched,
            admission: Some(admission),
            handed_over: false,
        }
    }

    /// A connection carried by a live upgrade, under its old id (its registry record came with
    /// the tables). It may hold locks on any shard.
    pub fn resume(core: Rc<ShardCore>, conn: ConnId, id_text: &str, admission: Admission) -> Self {
        let server = &core.server;
        let label = server.config.verbose.then(|| Arc::<str>::from(id_text));
        core.conns.opened();
        let mut touched = ShardSet::new(server.router.shards());
        for shard in 0..server.router.shards() {
            touched.insert(shard);
        }
        Presence {
            conn,
            core,
            label,
            touched,
            admission: Some(admission),
            handed_over: false,
        }
    }

    /// Its place under `--max-connections`, for a live upgrade to hand on.
    pub fn take_admission(&mut self) -> Option<Admission> {
        self.admission.take()
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        if self.handed_over {
            self.core.conns.closed();
            return;
        }
        let server = &self.core.server;
        // Counted closed before its orphans are posted: a `q` that shows them shows it gone.
        self.core.cell().connections_closed.add(1);
        // The registry record stays until every shard has released this connection's locks
        // (see `Departure`), so listings never show a holder without its id.
        let departure = Arc::new(Departure {
            server: server.clone(),
            conn: self.conn,
            label: self.label.clone(),
        });
        for shard in self.touched.iter() {
            // Behind the connection's own operations, the same way they went.
            self.core.send_later(
                shard,
                Outgoing::Orphan {
                    conn: self.conn,
                    departure: departure.clone(),
                },
            );
        }
        self.core.conns.closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_counted_by_machine() {
        let key = |s: &str, exempt| PerIp::key(s.parse().unwrap(), exempt);
        assert_eq!(key("127.0.0.1", true), None);
        assert_eq!(key("::1", true), None);
        assert_eq!(key("::ffff:127.0.0.1", true), None);
        assert_eq!(key("127.0.0.1", false), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(
            key("::ffff:10.0.0.1", true),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            key("2001:db8:1:2:aaaa::7", true),
            Some("2001:db8:1:2:aaaa::7".parse().unwrap())
        );
        let per_ip = PerIp::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(per_ip.try_add(a, 2) && per_ip.try_add(a, 2));
        assert!(!per_ip.try_add(a, 2));
        assert_eq!(per_ip.count(a), 2);
        per_ip.remove(a);
        assert!(per_ip.try_add(a, 2));
        per_ip.remove(a);
        per_ip.remove(a);
        assert_eq!(per_ip.count(a), 0);
        assert!(per_ip.parts.iter().all(|p| p.lock().unwrap().is_empty()));
    }

    #[test]
    fn shard_sets_list_their_members() {
        let mut set = ShardSet::new(130);
        for shard in [0, 5, 64, 129] {
            set.insert(shard);
        }
        set.insert(5);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 5, 64, 129]);
    }
}
