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
use crate::protocol;
use crate::shard::{Admission, Incoming, ShardCore, ShardMsg, Shared};
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
        if self.threads.is_empty() {
            return;
        }
        // First every shard stops accepting and lets its connections answer what they already
        // read; mailboxes keep running meanwhile, since a closing connection may still wait on
        // another shard. Then, all drained (or out of time), the shard threads end.
        let grace = Duration::from_secs(self.shared.config.shutdown_timeout);
        let deadline = std::time::Instant::now() + grace;
        let (drained_tx, drained_rx) = std::sync::mpsc::channel();
        let mut closing = 0;
        for shard in 0..self.shared.mailboxes.len() {
            let drained = drained_tx.clone();
            if self.shared.post(shard, ShardMsg::Close { drained }) {
                closing += 1;
            }
        }
        for _ in 0..closing {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if drained_rx.recv_timeout(left).is_err() {
                break;
            }
        }
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

/// Accepts TCP connections and deals them out to the shards in turn, until shutdown.
async fn accept_loop(core: Rc<ShardCore>, listener: TcpListener) {
    let shards = core.shared.router.shards();
    let mut next = 0usize;
    let mut backoff = Duration::from_millis(1);
    loop {
        if core.is_closing() {
            return;
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = core.closing() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(1);
                accepted
            }
            Err(e) => {
                // Out of file descriptors or memory, or a connection reset before we got to it:
                // none is fatal. Back off so a persistent error does not spin the thread.
                eprintln!("glockd: accept failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Some(admission) = Admission::try_new(&core.shared) else {
            // Full: one line of explanation, best effort (never wait on this client), then
            // close.
            let _ = stream.try_write(protocol::TOO_MANY_CONNECTIONS);
            if core.shared.config.verbose {
                eprintln!("glockd: refused {peer}: --max-connections reached");
            }
            continue;
        };
        let target = next;
        next = (next + 1) % shards;
        if target == core.id {
            serve_tcp(&core, stream, peer, admission);
            continue;
        }
        match stream.into_std() {
            Ok(stream) => {
                core.shared.post(
                    target,
                    ShardMsg::Adopt(Incoming::Tcp(stream, peer, admission)),
                );
            }
            Err(e) => eprintln!("glockd: could not hand over a connection: {e}"),
        }
    }
}

/// Starts serving a connection handed to this shard.
pub(crate) fn adopt(core: &Rc<ShardCore>, incoming: Incoming) {
    if core.is_closing() {
        return; // shutting down: dropping the stream closes it
    }
    match incoming {
        Incoming::Tcp(stream, peer, admission) => match TcpStream::from_std(stream) {
            Ok(stream) => serve_tcp(core, stream, peer, admission),
            Err(e) => eprintln!("glockd: could not adopt a connection: {e}"),
        },
    }
}

fn serve_tcp(core: &Rc<ShardCore>, stream: TcpStream, peer: SocketAddr, admission: Admission) {
    // Replies are written once per batch; never hold one back waiting for more.
    let _ = stream.set_nodelay(true);
    // A holder whose machine vanished leaves a half-open connection; keepalive finds it so its
    // locks are released.
    let config = &core.shared.config;
    if config.keepalive_idle > 0 {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(config.keepalive_idle))
            .with_interval(Duration::from_secs(config.keepalive_interval))
            .with_retries(config.keepalive_count);
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            eprintln!("glockd: could not enable keepalive for {peer}: {e}");
        }
    }
    tokio::task::spawn_local(crate::connection::serve(
        core.clone(),
        stream,
        peer.to_string(),
        admission,
    ));
}
