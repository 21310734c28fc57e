//! Starting and stopping a server: bind the listener, start one pinned thread per shard, accept
//! connections and hand each to a shard thread in turn.
//!
//! Every shard thread runs a `current_thread` tokio runtime with a `LocalSet`: its mailbox loop
//! and its connections are tasks on that one thread, so they share the shard's table without any
//! lock. Shard 0 also runs the accept loop.

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::LocalSet;

use crate::config::Config;
use crate::shard::{Incoming, ShardCore, ShardMsg, Shared};
use crate::stats::Snapshot;

/// A running server. Dropping it shuts the server down.
pub struct ServerHandle {
    shared: Arc<Shared>,
    tcp_addr: Option<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// The TCP address actually bound (useful with port 0), if TCP is enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The stats as `q` would show them now.
    pub fn stats(&self) -> Snapshot {
        self.shared.stats.snapshot()
    }

    /// Stops accepting, closes every connection (their locks are released), and waits for the
    /// shard threads to finish.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for shard in 0..self.shared.mailboxes.len() {
            self.shared.post(shard, ShardMsg::Stop);
        }
        for thread in self.threads.drain(..) {
            // A shard thread that panicked has already reported it on stderr.
            let _ = thread.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds the listeners the config asks for and starts the shard threads. Errors (address in
/// use, no threads) are returned before anything is served.
pub fn start(config: Config) -> io::Result<ServerHandle> {
    let tcp = match config.port {
        0 => None,
        port => Some(StdTcpListener::bind(SocketAddr::new(config.bind, port))?),
    };
    start_with(config, tcp)
}

/// Starts a server on an already bound TCP listener (or none), ignoring `port` and `bind`:
/// how tests and embedders serve on an ephemeral port, since port 0 means "no TCP" here.
pub fn start_with(config: Config, tcp: Option<StdTcpListener>) -> io::Result<ServerHandle> {
    let shards = config.shard_count();
    if let Some(listener) = &tcp {
        listener.set_nonblocking(true)?;
    }
    let tcp_addr = tcp.as_ref().map(|l| l.local_addr()).transpose()?;

    let (mailboxes, inboxes): (Vec<_>, Vec<_>) =
        (0..shards).map(|_| mpsc::unbounded_channel()).unzip();
    let shared = Arc::new(Shared::new(config, mailboxes));
    let cores = if shared.config.pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let mut threads = Vec::with_capacity(shards);
    let mut tcp = tcp;
    for (id, inbox) in inboxes.into_iter().enumerate() {
        let shared = shared.clone();
        let core_id = (!cores.is_empty()).then(|| cores[id % cores.len()]);
        let listener = if id == 0 { tcp.take() } else { None };
        let ready = ready_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("glockd-shard-{id}"))
            .spawn(move || run_shard(id, shared, inbox, listener, core_id, ready))?;
        threads.push(thread);
    }
    drop(ready_tx);
    let mut handle = ServerHandle {
        shared,
        tcp_addr,
        threads,
    };
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                handle.stop();
                return Err(e);
            }
            Err(_) => {
                handle.stop();
                return Err(io::Error::other("a shard thread died while starting"));
            }
        }
    }
    Ok(handle)
}

/// A shard thread's whole life.
fn run_shard(
    id: usize,
    shared: Arc<Shared>,
    inbox: mpsc::UnboundedReceiver<ShardMsg>,
    listener: Option<StdTcpListener>,
    core_id: Option<core_affinity::CoreId>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    if let Some(core_id) = core_id {
        if !core_affinity::set_for_current(core_id) {
            eprintln!(
                "glockd: warning: could not pin shard {id} to core {}; running unpinned",
                core_id.id
            );
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let local = LocalSet::new();
    let core = Rc::new(ShardCore::new(id, shared));
    local.block_on(&runtime, async move {
        if let Some(listener) = listener {
            match TcpListener::from_std(listener) {
                Ok(listener) => {
                    tokio::task::spawn_local(accept_loop(core.clone(), listener));
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
        }
        let _ = ready.send(Ok(()));
        core.run_mailbox(inbox).await;
    });
    // Dropping the LocalSet here (before the runtime) drops every connection task on this
    // thread; their guards post orphan messages, which matter no more at shutdown.
    drop(local);
}

/// Accepts TCP connections and deals them out to the shards in turn.
async fn accept_loop(core: Rc<ShardCore>, listener: TcpListener) {
    let shards = core.shared.router.shards();
    let mut next = 0usize;
    let mut backoff = Duration::from_millis(1);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = Duration::from_millis(1);
                accepted
            }
            Err(e) => {
                // Out of file descriptors or memory, or a connection reset before we got to it:
                // none is fatal. Back off so a persistent error does not spin the thread.
                if core.shared.config.verbose {
                    eprintln!("glockd: accept failed: {e}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let target = next;
        next = (next + 1) % shards;
        if target == core.id {
            serve_tcp(&core, stream, peer);
            continue;
        }
        match stream.into_std() {
            Ok(stream) => {
                core.shared
                    .post(target, ShardMsg::Adopt(Incoming::Tcp(stream, peer)));
            }
            Err(e) => eprintln!("glockd: could not hand over a connection: {e}"),
        }
    }
}

/// Starts serving a connection handed to this shard.
pub(crate) fn adopt(core: &Rc<ShardCore>, incoming: Incoming) {
    match incoming {
        Incoming::Tcp(stream, peer) => match TcpStream::from_std(stream) {
            Ok(stream) => serve_tcp(core, stream, peer),
            Err(e) => eprintln!("glockd: could not adopt a connection: {e}"),
        },
    }
}

fn serve_tcp(core: &Rc<ShardCore>, stream: TcpStream, peer: SocketAddr) {
    // Replies are written once per batch; never hold one back waiting for more.
    let _ = stream.set_nodelay(true);
    // Half-open connections (a holder whose machine vanished) are found by keepalive, as in the
    // original server.
    let _ = socket2::SockRef::from(&stream).set_keepalive(true);
    tokio::task::spawn_local(crate::connection::serve(
        core.clone(),
        stream,
        peer.to_string(),
    ));
}
