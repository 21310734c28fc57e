//! A connection's life on its shard thread: its place under `--max-connections`
//! ([`Admission`]), its hand-over from the accepting thread ([`ConnMsg::Adopt`]), its existence
//! as the lock tables see it ([`Presence`]: dropping it orphans the connection's locks), and
//! shutdown's drain of every connection on a thread ([`ConnMsg::Close`]).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;

use crate::shard::{Departure, LockMsg, ServerState, ShardCore};
use crate::ConnId;

/// A connection's place under `--max-connections`: taken when the connection is accepted,
/// given back when it ends (whichever thread that happens on).
pub struct Admission {
    server: Arc<ServerState>,
}

impl Admission {
    /// Takes a place, or None when the server is full.
    pub fn try_new(server: &Arc<ServerState>) -> Option<Admission> {
        let max = server.config.max_connections;
        let live = &server.live_connections;
        let mut now = live.load(Ordering::Relaxed);
        loop {
            if now >= max {
                return None;
            }
            match live.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    return Some(Admission {
                        server: server.clone(),
                    })
                }
                Err(seen) => now = seen,
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.server.live_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream handed from the accepting thread to the shard that will serve it, with its
/// protocol id (`ip:port`, `unix:N`) and its place under `--max-connections`.
pub enum Incoming {
    Tcp(std::net::TcpStream, String, Admission),
    Ws(std::net::TcpStream, String, Admission),
    Unix(std::os::unix::net::UnixStream, String, Admission),
}

/// Life-cycle messages for a shard thread's connections.
pub enum ConnMsg {
    /// Serve a new connection on this thread.
    Adopt(Incoming),
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
    /// Wakes connections (and the accept loop) when `closing` is set.
    closing_notify: Notify,
    /// Connections living on this thread.
    live: Cell<usize>,
    /// Wakes the shutdown drain when `live` drops to zero.
    drained_notify: Notify,
}

impl ThreadConns {
    /// Whether shutdown has begun.
    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Completes when shutdown begins (check [`Self::is_closing`] first: this only sees the
    /// start of shutdown if it happens after the call).
    pub fn closing(&self) -> tokio::sync::futures::Notified<'_> {
        self.closing_notify.notified()
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
            ));
        }),
        Incoming::Ws(stream, id, admission) => TcpStream::from_std(stream).map(|stream| {
            crate::doors::tune_tcp(&core.server.config, &stream, &id);
            tokio::task::spawn_local(crate::websocket::serve(core.clone(), stream, id, admission));
        }),
        Incoming::Unix(stream, id, admission) => UnixStream::from_std(stream).map(|stream| {
            tokio::task::spawn_local(crate::connection::serve(
                core.clone(),
                stream,
                id,
                admission,
            ));
        }),
    };
    if let Err(e) = result {
        eprintln!("glockd: could not adopt a connection: {e}");
    }
}

/// Begins shutdown on this thread: wakes every connection (and the accept loop) to finish
/// up, and reports on `drained` once the last connection here has gone.
fn close(core: &Rc<ShardCore>, drained: std::sync::mpsc::Sender<()>) {
    let conns = &core.conns;
    conns.closing.set(true);
    conns.closing_notify.notify_waiters();
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
    /// Its place under `--max-connections`, given back when it ends.
    _admission: Admission,
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
            eprintln!("{label} connected");
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
            _admission: admission,
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
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
            // A stopped shard is a server shutting down: nothing left to release.
            let _ = server.post_locks(
                shard,
                LockMsg::Orphan {
                    conn: self.conn,
                    departure: departure.clone(),
                },
            );
        }
        self.core.conns.closed();
        if let Some(label) = &self.label {
            eprintln!("{label} disconnected");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
