//! Starting and stopping a server: bind the doors, start one pinned thread per shard, and shut
//! down in order.
//!
//! Every shard thread runs a `current_thread` tokio runtime with a `LocalSet`: its mailbox loop
//! and its connections are tasks on that one thread, so they share the shard's table without any
//! lock. Shard 0 also runs the accept loops (see [`crate::doors`]). This is where the layers
//! meet: a thread's mailbox loop hands lock-table work to [`crate::shard::locks`] and
//! connection life-cycle work to [`crate::lifecycle`].

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::task::LocalSet;

use crate::config::Config;
use crate::doors::{Door, Listeners};
use crate::files::{FileId, Pinned};
use crate::lifecycle::ConnMsg;
use crate::routing::{Flow, Inbox, Mailboxes};
use crate::shard::{ServerState, ShardCore, ShardMsg};
use crate::stats::Snapshot;

/// A running server. Dropping it shuts the server down.
pub struct ServerHandle {
    server: Arc<ServerState>,
    /// Where each door listens, as bound.
    tcp_addr: Option<SocketAddr>,
    ws_addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    tls_ws_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    /// The unix socket file the server removes at exit, if the path still names it, pinned so
    /// its inode number cannot pass to another file meanwhile: None when systemd passed the
    /// socket (its file is systemd's).
    unix_file: Option<Pinned>,
    metrics_addr: Option<SocketAddr>,
    /// Each shard's own port, in shard order (`-shard-port`).
    shard_addrs: Vec<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
    /// The Prometheus endpoint's thread, if on.
    metrics: Option<crate::exporter::Endpoint>,
    /// The thread keeping the fencing ceiling ahead of the tokens, with `-state-file`.
    renewer: Option<crate::fencing::Renewer>,
    /// Duplicates of the listening sockets, to hand a live upgrade's successor.
    listener_copies: Vec<crate::upgrade::ListenerCopy>,
}

impl ServerHandle {
    /// The TCP address actually bound (useful with port 0), if TCP is enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The websocket address actually bound, if websockets are enabled.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// The TLS (line protocol) address actually bound, if `-tls-port` is on.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The secure websocket address actually bound, if `-tls-ws` is on.
    pub fn tls_ws_addr(&self) -> Option<SocketAddr> {
        self.tls_ws_addr
    }

    /// The TLS doors' state (handshake counts, reloads), when a TLS door is on.
    pub fn tls(&self) -> Option<&crate::tls::Tls> {
        self.server.tls.as_deref()
    }

    /// SIGHUP: re-reads the TLS certificate, key and client CA. None without TLS doors;
    /// otherwise whether the new files took effect, or why not (the old ones are kept).
    pub fn reload_tls(&self) -> Option<Result<(), String>> {
        self.server.tls.as_ref().map(|tls| tls.reload())
    }

    /// The unix socket path, if enabled.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    /// The unix socket file the server removes when it stops, and which file that is: its own,
    /// not one systemd passed, and only while the path still names it.
    pub fn owned_unix_file(&self) -> Option<(&Path, FileId)> {
        self.unix_path
            .as_deref()
            .zip(self.unix_file.as_ref().map(Pinned::id))
    }

    /// Each shard's own port (`-shard-port`), in shard order; empty when off.
    pub fn shard_addrs(&self) -> &[SocketAddr] {
        &self.shard_addrs
    }

    /// The metrics endpoint's address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The shard that owns lock `name` (lets benches and tests pick names by shard). Routing
    /// keys are random per server, so this is only meaningful for this server. Connections are
    /// dealt to the shards in turn from shard 0, per door: the first TCP connection lives on
    /// shard 0, the next on shard 1, and so on.
    pub fn shard_of(&self, name: &[u8]) -> usize {
        self.server.router.route(name).0
    }

    /// Lock commands run on their connection's own thread, and commands that crossed to
    /// another shard's thread, since start (summed over every shard).
    pub fn local_and_remote_commands(&self) -> (u64, u64) {
        self.server
            .stats
            .cells()
            .fold((0, 0), |(local, remote), cell| {
                (
                    local + cell.local_commands.get(),
                    remote + cell.remote_commands.get(),
                )
            })
    }

    /// Bytes of lock state the memory budget counts now: every shard's table, exactly as last
    /// changed, and the registered names.
    pub fn memory_used(&self) -> u64 {
        let tables: u64 = self.server.stats.cells().map(|c| c.memory_used.get()).sum();
        tables + self.server.memory.registry_used()
    }

    /// Reads the users file again (SIGHUP): `None` without one; else the number of users now,
    /// or why the file was refused (the users in force then stay).
    pub fn reload_users(&self) -> Option<Result<usize, String>> {
        self.server.users.as_ref().map(|users| users.reload())
    }

    /// The stats as `q` would show them now.
    pub fn stats(&self) -> Snapshot {
        self.server.stats.snapshot()
    }

    /// What became of requests and connections so far (what `/metrics` shows by result and
    /// reason), summed over the shards.
    pub fn outcomes(&self) -> crate::stats::Outcomes {
        self.server.stats.outcomes()
    }

    /// Live upgrade, the running server's side: starts the successor, stops everything, hands
    /// it over, and returns once the successor has taken it (the caller then exits without
    /// releasing anything). On failure everything runs again here, and the error says why.
    pub fn upgrade(
        &mut self,
        request: &crate::upgrade::Request,
    ) -> Result<crate::upgrade::Summary, String> {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = &self.server.upgrades;
        stats.started.fetch_add(1, Relaxed);
        let outcome = self.hand_over(request);
        let stats = &self.server.upgrades;
        match &outcome {
            Ok(_) => stats.completed.fetch_add(1, Relaxed),
            Err(_) => stats.rolled_back.fetch_add(1, Relaxed),
        };
        outcome
    }

    fn hand_over(
        &mut self,
        request: &crate::upgrade::Request,
    ) -> Result<crate::upgrade::Summary, String> {
        use crate::upgrade::{self, broke_off, wire::Kind};
        use std::sync::atomic::Ordering::Relaxed;
        let server = self.server.clone();
        let started = std::time::Instant::now();
        let deadline = started + request.timeout;
        let mut successor = upgrade::spawn(request, deadline)?;
        let pid = successor.child.id();
        let closed_before = server.upgrades.closed_connections.load(Relaxed);
        // From here no command is answered until the successor (or this server, if it is called
        // off) serves again: -upgrade-max-pause-ms bounds how long.
        let paused = std::time::Instant::now();
        let pause_deadline = deadline.min(paused + request.max_pause);
        let frozen = upgrade::freeze(&server, pause_deadline)?;
        let taken = match upgrade::take(&server, frozen, pause_deadline) {
            Ok(taken) => taken,
            Err((why, frozen)) => {
                upgrade::serve_frozen(&server, frozen);
                return Err(why);
            }
        };
        // The successor renews the fencing ceiling from now on: two renewers would each write
        // their own.
        if let Some(mut renewer) = self.renewer.take() {
            renewer.stop();
        }
        if taken.late {
            drop(successor);
            self.take_back(taken);
            return Err("the shards did not give up their tables in time".into());
        }
        let connections = taken.image.conns.len() as u64;
        let (locks, shared) = taken.image.tables.iter().fold((0, 0), |(x, s), t| {
            let holders: usize = t.shared.iter().map(|l| l.holders.len()).sum();
            (x + t.exclusive.len() as u64, s + holders as u64)
        });
        let sent = self.send_state(&mut successor, request, &taken, pause_deadline);
        let outcome = sent.and_then(|()| {
            successor
                .channel
                .expect(Kind::Adopted)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::Other => e.to_string(),
                    _ => broke_off("the new process did not take over", &e),
                })?;
            if !request.abort.commit() {
                return Err("called off by a signal".to_owned());
            }
            // The commit carries the pause and the whole time, for the successor's metrics.
            let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
            let times = [micros(paused.elapsed()), micros(started.elapsed())];
            let body = postcard::to_stdvec(&times).unwrap_or_default();
            successor
                .channel
                .send(Kind::Commit, &body, &[])
                .map_err(|e| format!("cannot commit: {e}"))
        });
        match outcome {
            Ok(()) => {
                successor.committed = true;
                Ok(crate::upgrade::Summary {
                    pid,
                    pause: paused.elapsed(),
                    total: started.elapsed(),
                    connections,
                    locks,
                    shared,
                    closed: server
                        .upgrades
                        .closed_connections
                        .load(Relaxed)
                        .saturating_sub(closed_before),
                })
            }
            Err(why) => {
                // Called off: the successor dies (its copies of the sockets with it) before
                // anything runs here again.
                drop(successor);
                self.take_back(taken);
                Err(why)
            }
        }
    }

    /// Sends the listeners, the held files, the image and the connections' sockets.
    fn send_state(
        &self,
        successor: &mut crate::upgrade::Successor,
        request: &crate::upgrade::Request,
        taken: &crate::upgrade::Taken,
        deadline: std::time::Instant,
    ) -> Result<(), String> {
        use crate::upgrade::{wire::Kind, ListenerCopy, ListenersImage};
        use std::os::fd::AsRawFd;
        let channel = &mut successor.channel;
        channel.set_deadline(deadline).map_err(|e| e.to_string())?;
        let mut description = ListenersImage::default();
        let mut fds = Vec::new();
        for copy in &self.listener_copies {
            if let ListenerCopy::Tcp(fd) = copy {
                description.tcp += 1;
                fds.push(fd.as_raw_fd());
            }
        }
        for copy in &self.listener_copies {
            if let ListenerCopy::Unix(fd, path, owned) = copy {
                description.unix = Some((path.clone(), *owned));
                fds.push(fd.as_raw_fd());
            }
        }
        let held = request
            .held
            .iter()
            .cloned()
            .chain(self.server.fencing.lock_file());
        for (path, fd) in held {
            description.held.push(path);
            fds.push(fd);
        }
        let stats = &self.server.upgrades;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        // As they will be once this upgrade completes (counted here only after the commit).
        description.stats = [
            load(&stats.started),
            load(&stats.completed) + 1,
            load(&stats.rolled_back),
            load(&stats.closed_connections),
        ];
        let body = postcard::to_stdvec(&description).map_err(|e| e.to_string())?;
        let fail = |e: io::Error| format!("the hand-over broke off: {e}");
        channel.send(Kind::Listeners, &body, &fds).map_err(fail)?;
        let image = crate::upgrade::image::encode(&taken.image).map_err(fail)?;
        channel.send(Kind::Image, &image, &[]).map_err(fail)?;
        for chunk in taken.fds.chunks(crate::upgrade::wire::FDS_PER_MESSAGE) {
            let raw: Vec<_> = chunk.iter().map(AsRawFd::as_raw_fd).collect();
            channel.send(Kind::Fds, b"", &raw).map_err(fail)?;
        }
        Ok(())
    }

    /// An upgrade called off after the tables were taken: this server takes its own image back
    /// and serves on.
    fn take_back(&mut self, taken: crate::upgrade::Taken) {
        let server = self.server.clone();
        match crate::upgrade::restore(&server, taken.image, taken.fds, Some(taken.departures)) {
            Ok(prepared) => crate::upgrade::serve(&server, prepared),
            Err(e) => {
                tracing::error!(event = "upgrade_restore_failed", error = %e, "could not take the state back");
                crate::upgrade::thaw(&server);
            }
        }
        match server.fencing.start_renewer() {
            Ok(renewer) => self.renewer = renewer,
            Err(e) => {
                tracing::error!(event = "fencing", error = %e, "could not restart the fencing renewer")
            }
        }
    }

    /// Live upgrade, the successor's side: takes the predecessor's image into the tables, and
    /// prepares its connections (served by [`Self::serve_carried`] once the upgrade commits).
    pub fn adopt(
        &self,
        image: crate::upgrade::ServerImage,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<crate::upgrade::Prepared, String> {
        crate::upgrade::restore(&self.server, image, fds, None)
    }

    /// The upgrade committed: serve the carried connections, and accept.
    pub fn serve_carried(
        &mut self,
        prepared: crate::upgrade::Prepared,
        stats: [u64; 4],
        times_us: [u64; 2],
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let upgrades = &self.server.upgrades;
        upgrades.last_pause_us.store(times_us[0], Relaxed);
        upgrades.last_total_us.store(times_us[1], Relaxed);
        upgrades.started.store(stats[0], Relaxed);
        upgrades.completed.store(stats[1], Relaxed);
        upgrades.rolled_back.store(stats[2], Relaxed);
        upgrades.closed_connections.store(stats[3], Relaxed);
        upgrades.carried_locks.store(prepared.locks, Relaxed);
        upgrades
            .carried_connections
            .store(prepared.connections() as u64, Relaxed);
        crate::upgrade::serve(&self.server, prepared);
    }

    /// Stops accepting, closes every connection (their locks are released), and waits for the
    /// shard threads to finish.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // The duplicates kept for a live upgrade would keep the doors open once the accept
        // loops let theirs go: shutdown closes the doors at once.
        self.listener_copies.clear();
        if let Some(metrics) = &mut self.metrics {
            metrics.stop();
        }
        if self.threads.is_empty() {
            return;
        }
        // First every shard stops accepting and lets its connections answer what they already
        // read; mailboxes keep running meanwhile, since a closing connection may still wait on
        // another shard. Then, all drained (or out of time), the shard threads end.
        let grace = Duration::from_secs(self.server.config.shutdown_timeout);
        // A `Config` built in code is not bounded like the command line's: never overflow.
        let now = std::time::Instant::now();
        let deadline = now
            .checked_add(grace)
            .unwrap_or(now + Duration::from_secs(86_400));
        let (drained_tx, drained_rx) = std::sync::mpsc::channel();
        let mut closing = 0;
        for shard in 0..self.server.mailboxes.len() {
            let drained = drained_tx.clone();
            let close = ShardMsg::Conns(ConnMsg::Close { drained });
            if self.server.mailboxes.post(shard, close).is_ok() {
                closing += 1;
            }
        }
        for _ in 0..closing {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if drained_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        for shard in 0..self.server.mailboxes.len() {
            // A shard that already stopped needs no telling.
            let _ = self.server.mailboxes.post(shard, ShardMsg::Stop);
        }
        for thread in self.threads.drain(..) {
            // A shard thread that panicked has already reported it on stderr.
            let _ = thread.join();
        }
        // Only now: a shard waiting at the ceiling needs the renewer to go on.
        if let Some(mut renewer) = self.renewer.take() {
            renewer.stop();
        }
        if let Some((path, file)) = self.owned_unix_file() {
            crate::doors::remove_unix(path, file);
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds the doors the config asks for and starts the shard threads. Errors (address in use,
/// a file where the unix socket should go) are returned before anything is served.
pub fn start(config: Config) -> io::Result<ServerHandle> {
    let listeners = Listeners::bind(&config)?;
    start_with_listeners(config, listeners)
}

/// Starts a server on an already bound TCP listener (or none) and no other door, ignoring
/// `port`, `bind`, `ws` and `unix`: how tests and embedders serve on an ephemeral port, since
/// port 0 means "no TCP" here.
pub fn start_with(config: Config, tcp: Option<StdTcpListener>) -> io::Result<ServerHandle> {
    start_with_listeners(
        config,
        Listeners {
            tcp,
            ..Listeners::default()
        },
    )
}

/// Starts a server on listeners bound by the caller, ignoring the config's door settings.
pub fn start_with_listeners(config: Config, mut listeners: Listeners) -> io::Result<ServerHandle> {
    let shards = config.shard_count();
    // Certificates first: a TLS door whose files do not load stops the start before anything
    // else is done.
    let tls = crate::tls::Tls::from_config(
        &config,
        listeners.tls.is_some() || listeners.tls_ws.is_some(),
    )?;
    let users = config
        .users_path()
        .map(crate::users::Directory::load)
        .transpose()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        .map(Arc::new);
    // The first ceiling is durable before any shard exists, so before any grant.
    let fencing = crate::fencing::Fencing::from_config(&config)?;
    let renewer = fencing.start_renewer()?;
    let metrics_listener = listeners.metrics.take();
    let metrics_addr = metrics_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;
    let tcp_addr = listeners.tcp.as_ref().map(|l| l.local_addr()).transpose()?;
    let ws_addr = listeners.ws.as_ref().map(|l| l.local_addr()).transpose()?;
    let tls_addr = listeners.tls.as_ref().map(|l| l.local_addr()).transpose()?;
    let tls_ws_addr = listeners
        .tls_ws
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;
    let unix_path = listeners.unix.as_ref().map(|(_, path)| path.clone());
    let unix_file = match (
        &unix_path,
        listeners.unix_inherited,
        listeners.unix_file.take(),
    ) {
        (None, _, _) | (Some(_), true, _) => None,
        (Some(_), false, Some(file)) => Some(file),
        // Bound by the caller: the file the path names now is the one just bound.
        (Some(path), false, None) => Some(Pinned::open(path)?),
    };
    let shard_addrs = listeners
        .shard_ports
        .iter()
        .map(|l| l.local_addr())
        .collect::<io::Result<Vec<_>>>()?;

    let listener_copies = copy_listeners(&listeners, metrics_listener.as_ref())?;

    let (mailboxes, inboxes) = Mailboxes::new(shards);
    let mut state = ServerState::new(
        config,
        mailboxes,
        metrics_listener.is_some(),
        fencing,
        shard_addrs.iter().map(SocketAddr::port).collect(),
    )
    .with_tls(tls);
    state.users = users;
    let server = Arc::new(state);
    let cores = if server.config.pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let mut threads = Vec::with_capacity(shards);
    let mut shard_ports: Vec<Option<StdTcpListener>> = std::mem::take(&mut listeners.shard_ports)
        .into_iter()
        .map(Some)
        .collect();
    let mut listeners = Some(listeners);
    for (id, inbox) in inboxes.into_iter().enumerate() {
        let server = server.clone();
        let core_id = (!cores.is_empty()).then(|| cores[id % cores.len()]);
        let listener = if id == 0 { listeners.take() } else { None };
        let shard_port = shard_ports.get_mut(id).and_then(Option::take);
        let ready = ready_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("glockd-shard-{id}"))
            .spawn(move || run_shard(id, server, inbox, listener, shard_port, core_id, ready))?;
        threads.push(thread);
    }
    drop(ready_tx);
    let mut handle = ServerHandle {
        server: server.clone(),
        tcp_addr,
        ws_addr,
        tls_addr,
        tls_ws_addr,
        unix_path,
        unix_file,
        metrics_addr,
        shard_addrs,
        threads,
        metrics: None,
        renewer,
        listener_copies,
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
    if let Some(listener) = metrics_listener {
        handle.metrics = Some(crate::exporter::Endpoint::start(server, listener)?);
    }
    Ok(handle)
}

/// Duplicates every listening socket (they share the socket: the successor of a live upgrade
/// accepts on the very queue the server did, so no client is refused meanwhile).
fn copy_listeners(
    listeners: &Listeners,
    metrics: Option<&StdTcpListener>,
) -> io::Result<Vec<crate::upgrade::ListenerCopy>> {
    use crate::upgrade::ListenerCopy;
    let mut copies = Vec::new();
    let tcp = [
        &listeners.tcp,
        &listeners.ws,
        &listeners.tls,
        &listeners.tls_ws,
    ]
    .into_iter()
    .flatten()
    .chain(metrics)
    .chain(listeners.shard_ports.iter());
    for listener in tcp {
        copies.push(ListenerCopy::Tcp(listener.try_clone()?.into()));
    }
    if let Some((listener, path)) = &listeners.unix {
        copies.push(ListenerCopy::Unix(
            listener.try_clone()?.into(),
            path.clone(),
            !listeners.unix_inherited,
        ));
    }
    Ok(copies)
}

/// A shard thread's whole life.
fn run_shard(
    id: usize,
    server: Arc<ServerState>,
    inbox: Inbox<ShardMsg>,
    listeners: Option<Listeners>,
    shard_port: Option<StdTcpListener>,
    core_id: Option<core_affinity::CoreId>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    if let Some(core_id) = core_id {
        if !core_affinity::set_for_current(core_id) {
            tracing::warn!(
                event = "pin_failed",
                shard = id,
                core = core_id.id,
                "could not pin a shard thread to its core; running unpinned"
            );
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Senders wake this thread only while it is parked (see `routing::Mailbox`).
        .on_thread_park(crate::routing::about_to_park)
        .on_thread_unpark(crate::routing::unparked)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let local = LocalSet::new();
    let core = Rc::new(ShardCore::new(id, server));
    local.block_on(&runtime, async move {
        if let Some(listeners) = listeners {
            match Door::open(listeners) {
                Ok(doors) => {
                    for door in doors {
                        tokio::task::spawn_local(crate::doors::accept_loop(core.clone(), door));
                    }
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
        }
        if let Some(listener) = shard_port {
            match Door::open_shard_port(listener) {
                Ok(door) => {
                    tokio::task::spawn_local(crate::doors::accept_loop(core.clone(), door));
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
        }
        let _ = ready.send(Ok(()));
        tokio::task::spawn_local(core.clone().evict_rate_limits());
        tokio::task::spawn_local(core.clone().flush_outbox());
        tokio::task::spawn_local(core.clone().release_departed());
        tokio::task::spawn_local(core.clone().busy_poll());
        crate::routing::drain(inbox, |msg| {
            core.note_work();
            match msg {
                ShardMsg::Locks(msg) => {
                    core.handle_locks(msg);
                    Flow::Continue
                }
                ShardMsg::Replies(replies) => {
                    core.deliver(replies);
                    Flow::Continue
                }
                ShardMsg::Conns(msg) => {
                    crate::lifecycle::handle(&core, msg);
                    Flow::Continue
                }
                ShardMsg::Export(done) => {
                    let _ = done.send(core.export());
                    Flow::Continue
                }
                ShardMsg::Restore(part, done) => {
                    core.restore(*part);
                    let _ = done.send(());
                    Flow::Continue
                }
                ShardMsg::Stop => Flow::Stop,
            }
        })
        .await;
    });
    // Dropping the LocalSet here (before the runtime) drops every connection task on this
    // thread; their guards post orphan messages, which matter no more at shutdown.
    drop(local);
}
