//! Live upgrades: the running server hands its listening sockets, its client connections and
//! every lock, waiter and rate limiter to a new process (the binary now on disk), which serves
//! them from where they were; if anything goes wrong on the way, the running server takes
//! everything back and carries on.
//!
//! The steps, over a unix socket pair (see [`wire`]): the successor starts and says it is
//! ready; the server stops accepting (new clients wait in the listen queues), stops every
//! connection between two commands (or in its wait), takes every shard's table, and sends the
//! listening sockets with its locked files (pidfile, state file lock), the state image
//! ([`image`]) and the connections' sockets; the successor takes the tables in, says it has
//! adopted everything, and on the server's commit serves the connections and accepts. Until
//! the commit the server can call it all off: it kills the successor and takes its own image
//! back. TLS connections are not carried: they close at the upgrade as at shutdown (their
//! locks released), counted in the metrics.

pub mod image;
pub mod wire;

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

pub use image::{ConnDoor, ConnImage, ServerImage};

use crate::lifecycle::{Admission, Carried, ConnMsg, Frozen, Resumed};
use crate::protocol::Reply;
use crate::shard::handover::TablePart;
use crate::shard::{Departure, ServerState, ShardMsg};
use crate::table::Quota;
use crate::ConnId;

/// The environment variable that tells a successor which descriptor is its end of the
/// hand-over channel.
pub const CHANNEL_ENV: &str = "GLOCKD_UPGRADE_FD";

/// The steps at which `-upgrade-fail-at` (a test switch) makes the successor fail.
pub const FAIL_STEPS: &[&str] = &["ready", "listeners", "image", "adopt", "refuse", "hang"];

/// Live upgrade counters, kept across upgrades (the successor continues them).
#[derive(Default)]
pub struct UpgradeStats {
    pub started: AtomicU64,
    pub completed: AtomicU64,
    pub rolled_back: AtomicU64,
    /// The last completed upgrade's pause (no command answered meanwhile), in microseconds.
    pub last_pause_us: AtomicU64,
    /// The last completed upgrade's whole hand-over, in microseconds.
    pub last_total_us: AtomicU64,
    /// What the last completed upgrade carried.
    pub carried_connections: AtomicU64,
    pub carried_locks: AtomicU64,
    /// Connections closed by upgrades because they cannot be carried (TLS).
    pub closed_connections: AtomicU64,
}

/// What the running server asks for: the binary to start and its whole command line.
pub struct Request {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    /// Locked files to hand over besides the server's own (the pidfile), with their paths.
    pub held: Vec<(PathBuf, RawFd)>,
    /// The whole hand-over's time limit.
    pub timeout: Duration,
    /// The longest the clients may be kept waiting (from stopping the connections to the
    /// successor's taking them over).
    pub max_pause: Duration,
    /// Lets the signal loop call the upgrade off.
    pub abort: Arc<Abort>,
}

/// Calls a live upgrade off from outside it (a stopping signal meanwhile): the successor is
/// killed, so every step waiting on it fails at once and the server takes everything back;
/// once the upgrade has committed, nothing is called off any more.
#[derive(Default)]
pub struct Abort {
    state: std::sync::Mutex<AbortState>,
}

#[derive(Default)]
struct AbortState {
    called_off: bool,
    /// Why, as the outcome should say.
    why: Option<String>,
    committed: bool,
    successor: Option<u32>,
}

impl Abort {
    pub fn new() -> Arc<Abort> {
        Arc::new(Abort::default())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AbortState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls the upgrade off, unless it has committed; `why` is what the outcome says.
    pub fn call_off(&self, why: &str) {
        let mut state = self.state();
        state.called_off = true;
        state.why.get_or_insert_with(|| why.to_owned());
        if let (false, Some(pid)) = (state.committed, state.successor) {
            kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// The successor started; false (and it is killed) if the upgrade was called off already.
    fn started(&self, pid: u32) -> bool {
        let mut state = self.state();
        state.successor = Some(pid);
        if state.called_off {
            kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        !state.called_off
    }

    /// The point of no return: false if the upgrade was called off before it.
    pub(crate) fn commit(&self) -> bool {
        let mut state = self.state();
        state.committed = !state.called_off;
        state.committed
    }

    /// Why the upgrade was called off from outside, if it was.
    pub fn why(&self) -> Option<String> {
        self.state().why.clone()
    }

    /// Sends the committed successor a signal meant for this server (it serves now).
    pub fn pass_on(&self, signal: nix::sys::signal::Signal) {
        let state = self.state();
        if let (true, Some(pid)) = (state.committed, state.successor) {
            kill(pid, signal);
        }
    }
}

fn kill(pid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// What a failed receive from the other process means, for the operator.
pub fn broke_off(step: &str, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("{step}: no answer in time (-upgrade-timeout, -upgrade-max-pause-ms)")
        }
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            format!("{step}: the new process exited (its log says why)")
        }
        _ => format!("{step}: {e}"),
    }
}

/// What an upgrade did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub pid: u32,
    pub pause: Duration,
    pub total: Duration,
    pub connections: u64,
    /// Exclusive locks, and holders of shared locks.
    pub locks: u64,
    pub shared: u64,
    pub closed: u64,
}

/// The listening sockets and locked files, as described next to their descriptors.
#[derive(Serialize, Deserialize, Default)]
pub struct ListenersImage {
    /// TCP listeners (the first descriptors), matched to doors by port as systemd's are.
    pub tcp: usize,
    /// The unix door's socket path, and whether the server owns its file (it removes it at
    /// exit; not when systemd passed it).
    pub unix: Option<(PathBuf, bool)>,
    /// Locked files' paths, their descriptors last.
    pub held: Vec<PathBuf>,
    /// Upgrade counters so far.
    pub stats: [u64; 4],
}

/// A listening socket the server keeps a duplicate of, to hand over.
pub enum ListenerCopy {
    Tcp(OwnedFd),
    Unix(OwnedFd, PathBuf, bool),
}

/// The running server's side, while the hand-over goes: the successor process, killed (and
/// reaped) unless the upgrade completes.
pub struct Successor {
    pub child: std::process::Child,
    pub channel: wire::Channel,
    pub committed: bool,
}

impl Drop for Successor {
    fn drop(&mut self) {
        if !self.committed {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts the successor with its end of the channel, and waits for it to say it is ready.
pub fn spawn(request: &Request, deadline: Instant) -> Result<Successor, String> {
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
    // The successor's end must survive exec: the one descriptor it inherits on purpose.
    nix::fcntl::fcntl(
        theirs.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(|e| format!("socket pair: {e}"))?;
    let child = std::process::Command::new(&request.exe)
        .args(&request.args)
        .env(CHANNEL_ENV, theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", request.exe.display()))?;
    drop(theirs);
    let started = request.abort.started(child.id());
    let mut successor = Successor {
        child,
        channel: wire::Channel::new(ours),
        committed: false,
    };
    if !started {
        return Err("called off".into());
    }
    successor
        .channel
        .set_deadline(deadline)
        .map_err(|e| e.to_string())?;
    let ready = successor.channel.expect(wire::Kind::Ready).map_err(|e| {
        if e.kind() == std::io::ErrorKind::Other {
            e.to_string()
        } else {
            broke_off("the new process did not start", &e)
        }
    })?;
    let version = String::from_utf8_lossy(&ready.body).into_owned();
    if version != image::VERSION.to_string() {
        return Err(format!(
            "the new process speaks hand-over version {version}, this one {}",
            image::VERSION
        ));
    }
    Ok(successor)
}

/// The answers some shards gave before the deadline, and the channel the others' will come on.
type Late<T> = (Vec<T>, std::sync::mpsc::Receiver<T>);

/// Posts `msg(k)` to every shard and waits (until `deadline`) for each one's answer on the
/// channel the messages share.
fn ask_every_shard<T>(
    server: &ServerState,
    deadline: Instant,
    msg: impl Fn(std::sync::mpsc::Sender<T>) -> ShardMsg,
) -> Result<Vec<T>, Late<T>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let shards = server.mailboxes.len();
    for shard in 0..shards {
        if server.mailboxes.post(shard, msg(tx.clone())).is_err() {
            return Err((Vec::new(), rx));
        }
    }
    drop(tx);
    let mut answers = Vec::with_capacity(shards);
    for _ in 0..shards {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(answer) => answers.push(answer),
            Err(_) => return Err((answers, rx)),
        }
    }
    Ok(answers)
}

/// Stops accepting and stops every connection; on success the server is quiet: no connection
/// runs, no client is accepted. On failure everything stopped so far runs again.
pub fn freeze(server: &Arc<ServerState>, deadline: Instant) -> Result<Vec<Frozen>, String> {
    let paused = ask_every_shard(server, deadline, |done| {
        ShardMsg::Conns(ConnMsg::PauseAccepting { done })
    });
    if paused.is_err() {
        thaw(server);
        return Err("the shards did not stop accepting in time".into());
    }
    let freeze = |done| ShardMsg::Conns(ConnMsg::Freeze { done });
    match ask_every_shard(server, deadline, freeze) {
        Ok(reports) => Ok(reports.into_iter().flatten().collect()),
        Err((reports, late)) => {
            // Some connection did not come to a stop in time (a write to a client that does
            // not read, a long listing): everything runs again. A shard that had not reported
            // yet resumes its own stopped connections and reports none; each shard reports
            // exactly once, so the reports still to come are awaited.
            let missing = server.mailboxes.len() - reports.len();
            let mut frozen: Vec<Frozen> = reports.into_iter().flatten().collect();
            thaw(server);
            for _ in 0..missing {
                match late.recv_timeout(Duration::from_secs(10)) {
                    Ok(conns) => frozen.extend(conns),
                    Err(_) => break,
                }
            }
            deal(server, frozen);
            Err("the connections did not stop in time".into())
        }
    }
}

/// Serves carried connections, dealt to the shards in turn.
fn deal(server: &ServerState, conns: Vec<Resumed>) {
    let shards = server.mailboxes.len();
    for (k, resumed) in conns.into_iter().enumerate() {
        let resume = ShardMsg::Conns(ConnMsg::Resume(Box::new(resumed)));
        let _ = server.mailboxes.post(k % shards, resume);
    }
}

/// Accepting again (after an upgrade was called off, or in the successor once it commits).
pub fn thaw(server: &ServerState) {
    for shard in 0..server.mailboxes.len() {
        let _ = server.mailboxes.post(shard, ShardMsg::Conns(ConnMsg::Thaw));
    }
}

/// Per shard, the connections gone whose locks it had still to release.
pub type Departures = Vec<Vec<(ConnId, Arc<Departure>)>>;

/// What the running server holds once everything is stopped and taken: the image to send, the
/// connections' sockets in the image's order, and the departures kept alive meanwhile.
pub struct Taken {
    pub image: ServerImage,
    pub fds: Vec<OwnedFd>,
    pub departures: Departures,
    /// Some shard gave its table up after the deadline: the upgrade is to be called off
    /// (every table is taken all the same, to be taken back whole).
    pub late: bool,
}

/// Takes every shard's table and builds the image, once every connection is stopped.
pub fn take(
    server: &Arc<ServerState>,
    frozen: Vec<Frozen>,
    deadline: Instant,
) -> Result<Taken, (String, Vec<Frozen>)> {
    let shards = server.mailboxes.len();
    let (mut exported, late) = match ask_every_shard(server, deadline, ShardMsg::Export) {
        Ok(exported) => (exported, false),
        // A shard gives its table up in one step: one that is late is busy, not stuck, and
        // every table is needed whole, to send or to take back.
        Err((mut exported, rest)) => {
            let missing = shards - exported.len();
            exported.extend(rest.iter().take(missing));
            (exported, true)
        }
    };
    if exported.len() < shards {
        // A shard thread is gone (the server is stopping): nothing to hand over.
        return Err(("a shard stopped while giving up its table".into(), frozen));
    }
    // In shard order: a departed connection's release goes back to the shard it came from.
    exported.sort_unstable_by_key(|e| e.shard);
    let mut tables = Vec::with_capacity(exported.len());
    let mut departed_ids = Vec::new();
    let mut departures = Vec::with_capacity(exported.len());
    for shard in exported {
        departed_ids.extend(shard.departed.iter().map(|(conn, _)| *conn));
        departures.push(shard.departed);
        tables.push(shard.table);
    }
    departed_ids.sort_unstable();
    departed_ids.dedup();
    let mut conns = Vec::with_capacity(frozen.len());
    let mut fds = Vec::with_capacity(frozen.len());
    for Resumed { fd, conn: mut f } in frozen {
        if let Some(mut answer) = f.answer.take() {
            match answer.try_recv() {
                // Decided before the tables were taken: the answer is the next reply.
                Ok(reply) => {
                    reply.write_to(&mut f.image.output);
                    f.image.waiting = false;
                }
                // The waiter went with its table into the image.
                Err(_) => f.image.waiting = true,
            }
        }
        // Its place under --max-connections goes (the successor, or this server taking the
        // image back, gives it a new one).
        drop(f.admission);
        conns.push(f.image);
        fds.push(fd);
    }
    let counters = counters_of(server);
    let image = ServerImage {
        conns,
        tables,
        departed: departed_ids,
        registry: server.registry.export(),
        counters,
        next_conn: server.peek_next_conn(),
        unix_connections: server.unix_connections(),
    };
    Ok(Taken {
        image,
        fds,
        departures,
        late,
    })
}

fn counters_of(server: &ServerState) -> image::CountersImage {
    let mut c = image::CountersImage {
        commands: vec![0; crate::protocol::Verb::COUNT],
        ..Default::default()
    };
    for cell in server.stats.cells() {
        for (sum, counter) in c.commands.iter_mut().zip(cell.commands.iter()) {
            *sum += counter.get();
        }
        c.invalid_commands += cell.invalid_commands.get();
        c.connections_opened += cell.connections_opened.get();
        c.connections_closed += cell.connections_closed.get();
        c.orphans += cell.orphans.get();
        c.shared_orphans += cell.shared_orphans.get();
    }
    c
}

/// What [`restore`] prepared: the connections to serve once the upgrade commits.
pub struct Prepared {
    conns: Vec<Resumed>,
    pub locks: u64,
}

/// Takes an image into this server's tables (routed by this server's keys, whatever the
/// number of shards), and prepares its connections. `own` is true when the server takes its
/// own image back (an upgrade called off): its registry, counters and departures are still
/// its own. The connections are served by [`serve`].
pub fn restore(
    server: &Arc<ServerState>,
    image: ServerImage,
    fds: Vec<OwnedFd>,
    own: Option<Departures>,
) -> Result<Prepared, String> {
    if fds.len() != image.conns.len() {
        return Err(format!(
            "{} connections described, {} sockets received",
            image.conns.len(),
            fds.len()
        ));
    }
    let shards = server.mailboxes.len();
    if own.is_none() {
        server.registry.import(&image.registry);
        server.continue_counters(&image.counters, image.next_conn, image.unix_connections);
    }
    // Lock allowances, counting what each carried connection holds.
    let limit = server.config.max_locks_per_conn;
    let carried: std::collections::HashSet<ConnId> = image.conns.iter().map(|c| c.conn).collect();
    let mut held: HashMap<ConnId, u64> = HashMap::new();
    let mut locks = 0u64;
    for table in &image.tables {
        locks += table.exclusive.len() as u64;
        for lock in &table.exclusive {
            *held.entry(lock.holder).or_default() += 1;
        }
        for lock in &table.shared {
            for (conn, _) in &lock.holders {
                *held.entry(*conn).or_default() += 1;
            }
        }
    }
    let quotas: Arc<HashMap<ConnId, Arc<Quota>>> = Arc::new(if limit > 0 {
        carried
            .iter()
            .map(|&conn| {
                let quota = Quota::new(limit);
                quota.restore_held(held.get(&conn).copied().unwrap_or(0));
                (conn, Arc::new(quota))
            })
            .collect()
    } else {
        HashMap::new()
    });
    // Every waiter of a carried connection gets a new channel: the sender goes into the table,
    // the receiver to its connection.
    let mut answers: HashMap<ConnId, oneshot::Receiver<Reply>> = HashMap::new();
    let mut parts: Vec<TablePart> = (0..shards)
        .map(|_| TablePart {
            quotas: quotas.clone(),
            ..TablePart::default()
        })
        .collect();
    let route = |name: &[u8]| server.router.route(name).0;
    let mut last_token = 0;
    for table in image.tables {
        last_token = last_token.max(table.last_token);
        for held in table.exclusive {
            parts[route(&held.name)].exclusive.push(held);
        }
        for shared in table.shared {
            parts[route(&shared.name)].shared.push(shared);
        }
        for waiter in table.waiters {
            if !carried.contains(&waiter.conn) || answers.contains_key(&waiter.conn) {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            answers.insert(waiter.conn, rx);
            parts[route(&waiter.name)].waiters.push((waiter, tx));
        }
        for limiter in table.limiters {
            parts[route(&limiter.name)].limiters.push(limiter);
        }
        // The counts are sums: all of them go to the first shard.
        let counts = parts[0].counts.get_or_insert_with(Default::default);
        add_counts(counts, &table.counts);
    }
    for part in &mut parts {
        part.last_token = last_token;
    }
    match own {
        // Its own departures, each back on the shard it came from.
        Some(departures) => {
            for (part, departed) in parts.iter_mut().zip(departures) {
                part.departed = departed;
            }
        }
        // New departures, one per connection, asked of every shard.
        None => {
            for &conn in &image.departed {
                let departure = Arc::new(Departure {
                    server: server.clone(),
                    conn,
                    label: None,
                });
                for part in &mut parts {
                    part.departed.push((conn, departure.clone()));
                }
            }
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    for (shard, part) in parts.into_iter().enumerate() {
        server
            .mailboxes
            .post(shard, ShardMsg::Restore(Box::new(part), tx.clone()))
            .map_err(|_| "a shard stopped".to_owned())?;
    }
    drop(tx);
    for _ in 0..shards {
        rx.recv()
            .map_err(|_| "a shard stopped while taking its table".to_owned())?;
    }
    let mut conns = Vec::with_capacity(image.conns.len());
    for (conn, fd) in image.conns.into_iter().zip(fds) {
        // Counted under its address for --max-connections-per-ip (read off the socket as it
        // is, without a second descriptor).
        let peer = match conn.door {
            ConnDoor::Tcp | ConnDoor::Ws => socket2::SockRef::from(&fd)
                .peer_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .map(|a| a.ip()),
            ConnDoor::Unix => None,
        };
        let mut conn = conn;
        let answer = answers.remove(&conn.conn);
        if conn.waiting && answer.is_none() {
            // Its waiter was not found (it cannot happen with a consistent image): it is
            // answered as a wait that ran out, so the command still gets its one reply.
            Reply::TimedOut.write_to(&mut conn.output);
            conn.waiting = false;
        }
        conns.push(Resumed {
            fd,
            conn: Carried {
                quota: quotas.get(&conn.conn).cloned(),
                admission: Admission::carried(server, peer),
                image: conn,
                answer,
            },
        });
    }
    Ok(Prepared { conns, locks })
}

impl Prepared {
    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}

/// Connections stopped by an upgrade called off before the tables were taken: they run again
/// where they stopped, and the server accepts again.
pub fn serve_frozen(server: &Arc<ServerState>, frozen: Vec<Frozen>) {
    // Thawed first: a connection served on a thread still freezing would stop at once.
    thaw(server);
    deal(server, frozen);
}

/// Serves the prepared connections (dealt to the shards in turn) and accepts again.
pub fn serve(server: &Arc<ServerState>, prepared: Prepared) {
    // Thawed first: a connection served on a thread still freezing would stop at once. (The
    // tables are in place, so a new client cannot take a carried connection's lock.)
    thaw(server);
    deal(server, prepared.conns);
}

fn add_counts(into: &mut crate::table::CountsImage, from: &crate::table::CountsImage) {
    into.waits_started += from.waits_started;
    into.waits_granted += from.waits_granted;
    into.waits_timed_out += from.waits_timed_out;
    into.rate_limit_allowed += from.rate_limit_allowed;
    into.rate_limit_limited += from.rate_limit_limited;
}
