//! The doors into one lock table: TCP, websocket and unix socket, and TCP and websocket over
//! TLS. Each is bound at start, accepted on shard 0's thread, and every accepted connection is
//! handed to a shard thread in turn (see [`crate::lifecycle`]), where it lives until it closes
//! (a TLS connection's handshake is done there too, see [`crate::tls`]). A connection is the
//! same to the lock table whichever door it came through.

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::Config;
use crate::files::{FileId, Pinned};
use crate::lifecycle::{Admission, ConnMsg, Incoming, Refusal};
use crate::protocol;
use crate::shard::{ShardCore, ShardMsg};
use crate::tls::TlsDoor;

/// The listeners a server serves, bound before any thread starts (so binding errors are
/// reported at once, and tests can bind ephemeral ports themselves).
#[derive(Default)]
pub struct Listeners {
    /// The line protocol over TCP.
    pub tcp: Option<StdTcpListener>,
    /// Websockets: one command per message.
    pub ws: Option<StdTcpListener>,
    /// The line protocol over TLS (`-tls-port`).
    pub tls: Option<StdTcpListener>,
    /// Websockets over TLS (`-tls-ws`).
    pub tls_ws: Option<StdTcpListener>,
    /// The line protocol over a unix socket, and the socket file's path (removed at exit,
    /// unless `unix_inherited`).
    pub unix: Option<(StdUnixListener, PathBuf)>,
    /// The socket file as bound, so that exit removes it only if the path still names it (a
    /// server started on the same path after it was removed keeps its own). None when the
    /// caller bound the socket itself: the server then looks at the path when it starts.
    pub unix_file: Option<Pinned>,
    /// The unix socket came from systemd (socket activation), which owns its file: the file
    /// stays at exit, for the next start to be handed the same socket.
    pub unix_inherited: bool,
    /// The Prometheus metrics endpoint (HTTP).
    pub metrics: Option<StdTcpListener>,
    /// `-shard-port BASE`: the line protocol over TCP on port BASE + k, served by shard k's
    /// own thread, so a client that sends each name to its owner's port crosses no thread.
    pub shard_ports: Vec<StdTcpListener>,
}

impl Listeners {
    /// Binds every door `config` enables.
    pub fn bind(config: &Config) -> io::Result<Listeners> {
        Listeners::bind_with(config, Inherited::default())
    }

    /// Binds every door `config` enables, taking the listening sockets systemd passed
    /// (`inherited`) in place of binding them: a TCP socket serves the door whose flag names
    /// its port (`-port`, `-ws`, `-tls-port`, `-tls-ws`, `-metrics`'s port, a shard port), a
    /// unix socket the unix door. Doors systemd did not pass are bound as the flags say. A
    /// passed socket no door claims is an error, so a unit file and a command line that
    /// disagree are found at start, not by the clients.
    pub fn bind_with(config: &Config, inherited: Inherited) -> io::Result<Listeners> {
        let origin = inherited.origin();
        let Inherited { mut tcp, unix, .. } = inherited;
        let shard_ports = (0..config.shard_count())
            .filter(|_| config.shard_port != 0)
            .filter_map(|k| u16::try_from(usize::from(config.shard_port) + k).ok());
        let claimed: Vec<u16> = [config.port, config.ws, config.tls_port, config.tls_ws]
            .into_iter()
            .chain(config.metrics_addr().map(|addr| addr.port()))
            .chain(shard_ports)
            .filter(|port| *port != 0)
            .collect();
        for listener in &tcp {
            let addr = listener.local_addr()?;
            if !claimed.contains(&addr.port()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{origin} passed a socket on {addr} that no door of this \
                         command line serves (-port, -ws, -tls-port, -tls-ws, -metrics, \
                         -shard-port)"
                    ),
                ));
            }
        }
        let take = |tcp: &mut Vec<StdTcpListener>, port: u16| -> Option<StdTcpListener> {
            let at = tcp
                .iter()
                .position(|l| l.local_addr().is_ok_and(|a| a.port() == port))?;
            Some(tcp.swap_remove(at))
        };
        // `flag` names the door in an error, so a port two doors share, or one in use, says
        // which flag to change.
        let tcp_on = |tcp: &mut Vec<StdTcpListener>,
                      flag: &str,
                      port: u16|
         -> io::Result<Option<StdTcpListener>> {
            match port {
                0 => Ok(None),
                port => match take(tcp, port) {
                    Some(listener) => Ok(Some(listener)),
                    None => StdTcpListener::bind(SocketAddr::new(config.bind, port))
                        .map(Some)
                        .map_err(|e| io::Error::new(e.kind(), format!("{flag} {port}: {e}"))),
                },
            }
        };
        let (unix, unix_inherited, unix_file) = match unix {
            Some((listener, path)) => {
                if let Some(flag) = config.unix_path().filter(|flag| *flag != path) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{origin} passed the unix socket {} but -unix names {}",
                            path.display(),
                            flag.display()
                        ),
                    ));
                }
                (Some((listener, path)), true, None)
            }
            None => match config.unix_path() {
                Some(path) => {
                    let listener = bind_unix(path, config.unix_mode)?;
                    let file = Pinned::open(path).map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?;
                    (Some((listener, path.to_owned())), false, Some(file))
                }
                None => (None, false, None),
            },
        };
        let listeners =
            Listeners {
                tcp: tcp_on(&mut tcp, "-port", config.port)?,
                ws: tcp_on(&mut tcp, "-ws", config.ws)?,
                tls: tcp_on(&mut tcp, "-tls-port", config.tls_port)?,
                tls_ws: tcp_on(&mut tcp, "-tls-ws", config.tls_ws)?,
                unix,
                unix_inherited,
                unix_file,
                metrics: match config.metrics_addr() {
                    None => None,
                    Some(addr) => match take(&mut tcp, addr.port()) {
                        Some(listener) => Some(listener),
                        None => Some(StdTcpListener::bind(addr).map_err(|e| {
                            io::Error::new(e.kind(), format!("metrics {addr}: {e}"))
                        })?),
                    },
                },
                shard_ports: match config.shard_port {
                    0 => Vec::new(),
                    base => (0..config.shard_count())
                        .map(|k| {
                            let port = u16::try_from(usize::from(base) + k).map_err(|_| {
                                io::Error::new(
                                    io::ErrorKind::InvalidInput,
                                    format!("-shard-port {base}: port {base} + {k} is past 65535"),
                                )
                            })?;
                            tcp_on(&mut tcp, "-shard-port", port)?
                                .ok_or_else(|| io::Error::other("port 0"))
                        })
                        .collect::<io::Result<_>>()?,
                },
            };
        if let Some(extra) = tcp.first() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{origin} passed a second socket on port {}; each door takes one",
                    extra.local_addr()?.port()
                ),
            ));
        }
        Ok(listeners)
    }
}

/// Listening sockets systemd passed by socket activation (`LISTEN_FDS`, see `sd_listen_fds`),
/// before they are matched to doors by [`Listeners::bind_with`].
#[derive(Default)]
pub struct Inherited {
    /// TCP listeners, matched to doors by port.
    pub tcp: Vec<StdTcpListener>,
    /// The unix socket listener and its path (systemd owns the file: it is not removed at exit).
    pub unix: Option<(StdUnixListener, PathBuf)>,
    /// Who passed them, as errors name it: socket activation (None), or the running server a
    /// live upgrade takes over from, whose doors keep their ports.
    pub from: Option<&'static str>,
}

impl Inherited {
    fn origin(&self) -> &'static str {
        self.from.unwrap_or("socket activation")
    }
}

impl Inherited {
    /// Takes the sockets `LISTEN_FDS` names, if this process is the one they were passed to
    /// (`LISTEN_PID`), and clears the variables so no child inherits them. Call it first thing
    /// in `main`, before any thread starts: it changes the environment.
    pub fn from_env() -> io::Result<Inherited> {
        let mut fds = listenfd::ListenFd::from_env();
        let mut inherited = Inherited::default();
        for index in 0..fds.len() {
            if let Ok(Some(listener)) = fds.take_tcp_listener(index) {
                inherited.tcp.push(listener);
                continue;
            }
            match fds.take_unix_listener(index) {
                Ok(Some(listener)) => {
                    let path = listener
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_pathname().map(Path::to_owned))
                        .ok_or_else(|| {
                            io::Error::new(
                                io::ErrorKind::InvalidInput,
                                format!(
                                    "socket activation passed an unnamed unix socket \
                                     (descriptor {})",
                                    index + 3
                                ),
                            )
                        })?;
                    if inherited.unix.is_some() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "socket activation passed more than one unix socket; glockd has one \
                             unix door",
                        ));
                    }
                    inherited.unix = Some((listener, path));
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "socket activation passed descriptor {} that is not a listening \
                             stream socket: {e}",
                            index + 3
                        ),
                    ))
                }
            }
        }
        Ok(inherited)
    }
}

/// Binds a unix socket at `path`. A socket file left by a server that is gone is replaced; a
/// socket a live server still answers on, or any other kind of file, is an error (never
/// deleted).
pub fn bind_unix(path: &Path, mode: u32) -> io::Result<StdUnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if StdUnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another server is listening there", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = StdUnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Removes the unix socket file at exit, if the path still names the socket this server bound
/// (`file`): never another file that took its place, nor the socket of a server started on the
/// same path since (after an operator removed ours, or while ours drained after closing its
/// doors, when the new server found nobody answering and replaced it).
pub fn remove_unix(path: &Path, file: FileId) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        file.remove_if_same(path);
    }
}

/// A door being accepted on.
pub enum Door {
    Tcp(TcpListener),
    /// A shard's own port: its connections stay on the thread that accepted them.
    ShardTcp(TcpListener),
    Ws(TcpListener),
    Unix(UnixListener),
    /// A TLS door: the line protocol or websockets.
    Tls(TcpListener, TlsDoor),
}

/// A connection just accepted, still on the accepting thread.
enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Ws(TcpStream, SocketAddr),
    Unix(UnixStream),
    Tls(TcpStream, SocketAddr, TlsDoor),
}

impl Door {
    /// Registers a shard port's listener with this thread's runtime.
    pub fn open_shard_port(listener: StdTcpListener) -> io::Result<Door> {
        listener.set_nonblocking(true)?;
        Ok(Door::ShardTcp(TcpListener::from_std(listener)?))
    }

    /// Registers the std listeners with this thread's runtime (the shard ports are opened by
    /// their own threads).
    pub fn open(listeners: Listeners) -> io::Result<Vec<Door>> {
        let mut doors = Vec::new();
        if let Some(l) = listeners.tcp {
            l.set_nonblocking(true)?;
            doors.push(Door::Tcp(TcpListener::from_std(l)?));
        }
        if let Some(l) = listeners.ws {
            l.set_nonblocking(true)?;
            doors.push(Door::Ws(TcpListener::from_std(l)?));
        }
        for (l, door) in [
            (listeners.tls, TlsDoor::Line),
            (listeners.tls_ws, TlsDoor::Ws),
        ] {
            if let Some(l) = l {
                l.set_nonblocking(true)?;
                doors.push(Door::Tls(TcpListener::from_std(l)?, door));
            }
        }
        if let Some((l, _)) = listeners.unix {
            l.set_nonblocking(true)?;
            doors.push(Door::Unix(UnixListener::from_std(l)?));
        }
        Ok(doors)
    }

    async fn accept(&self) -> io::Result<Accepted> {
        Ok(match self {
            Door::Tcp(l) | Door::ShardTcp(l) => {
                let (stream, peer) = l.accept().await?;
                Accepted::Tcp(stream, peer)
            }
            Door::Ws(l) => {
                let (stream, peer) = l.accept().await?;
                Accepted::Ws(stream, peer)
            }
            Door::Unix(l) => Accepted::Unix(l.accept().await?.0),
            Door::Tls(l, door) => {
                let (stream, peer) = l.accept().await?;
                Accepted::Tls(stream, peer, *door)
            }
        })
    }
}

/// Accepts connections at one door and deals them out to the shards in turn (a shard port's
/// stay on this thread), until shutdown.
pub async fn accept_loop(core: Rc<ShardCore>, door: Door) {
    let shards = match door {
        Door::ShardTcp(_) => 1,
        _ => core.server.router.shards(),
    };
    let mut next = 0usize;
    let mut backoff = Duration::from_millis(1);
    loop {
        if core.is_closing() {
            return;
        }
        if core.conns.accept_paused() {
            // A live upgrade: new clients wait in the listen queue, for whichever process
            // serves next.
            tokio::select! {
                _ = core.conns.accept_changed() => continue,
                // Shutdown (checked above), or a freeze (the pause goes on).
                _ = core.conns.stopping() => continue,
            }
        }
        let accepted = tokio::select! {
            biased;
            _ = core.conns.accept_changed() => continue,
            _ = core.conns.stopping() => continue,
            accepted = door.accept() => accepted,
        };
        let accepted = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(1);
                accepted
            }
            Err(e) => {
                // Out of file descriptors or memory, or a connection reset before we got to it:
                // none is fatal. Back off so a persistent error does not spin the thread.
                tracing::warn!(
                    event = "accept_failed",
                    error = %e,
                    retry_ms = backoff.as_millis() as u64,
                    "accept failed"
                );
                core.cell().accept_errors.add(1);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let peer = match &accepted {
            Accepted::Tcp(_, peer) | Accepted::Ws(_, peer) | Accepted::Tls(_, peer, _) => {
                Some(peer.ip())
            }
            Accepted::Unix(_) => None,
        };
        let admission = match Admission::try_new(&core.server, peer) {
            Ok(admission) => admission,
            Err(refusal) => {
                refuse(&core, accepted, refusal);
                continue;
            }
        };
        let target = if shards == 1 { core.id } else { next };
        next = (next + 1) % shards;
        let incoming = match accepted {
            Accepted::Tcp(stream, peer) => stream
                .into_std()
                .map(|s| Incoming::Tcp(s, peer.to_string(), admission)),
            Accepted::Ws(stream, peer) => stream
                .into_std()
                .map(|s| Incoming::Ws(s, peer.to_string(), admission)),
            Accepted::Unix(stream) => stream
                .into_std()
                .map(|s| Incoming::Unix(s, core.server.next_unix_id(), admission)),
            Accepted::Tls(stream, peer, door) => {
                // Past --max-tls-handshakes in progress: closed at once (counted busy).
                let Some(handshake) = core.server.tls.as_ref().and_then(|tls| tls.begin(door))
                else {
                    continue;
                };
                stream
                    .into_std()
                    .map(|s| Incoming::Tls(s, peer.to_string(), admission, handshake))
            }
        };
        match incoming {
            Ok(incoming) if target == core.id => crate::lifecycle::adopt(&core, incoming),
            Ok(incoming) => {
                // A stopped shard is a server shutting down: dropping the stream closes it.
                let _ = core
                    .server
                    .mailboxes
                    .post(target, ShardMsg::Conns(ConnMsg::Adopt(incoming)));
            }
            Err(e) => tracing::warn!(
                event = "handover_failed",
                error = %e,
                "could not hand over a connection"
            ),
        }
    }
}

/// Turns away a connection over `--max-connections` (or `--max-connections-per-ip`) with one
/// line of explanation, best effort (never waiting on this client).
fn refuse(core: &ShardCore, accepted: Accepted, refusal: Refusal) {
    core.cell().refused(match refusal {
        Refusal::Full => crate::stats::RefuseReason::MaxConnections,
        Refusal::PerIp => crate::stats::RefuseReason::MaxConnectionsPerIp,
    });
    let who = match accepted {
        Accepted::Tcp(stream, peer) => {
            let _ = stream.try_write(protocol::TOO_MANY_CONNECTIONS);
            peer.to_string()
        }
        Accepted::Ws(stream, peer) => {
            // A websocket client is still speaking HTTP: answer in HTTP.
            let body = protocol::TOO_MANY_CONNECTIONS;
            let head = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.try_write(&[head.as_bytes(), body].concat());
            peer.to_string()
        }
        Accepted::Unix(stream) => {
            let _ = stream.try_write(protocol::TOO_MANY_CONNECTIONS);
            "unix".to_owned()
        }
        // A TLS client would read plain text as a broken record: it is just closed.
        Accepted::Tls(_, peer, _) => peer.to_string(),
    };
    if core.server.config.verbose {
        tracing::info!(event = "refuse", conn = %who, reason = refusal.as_str());
    }
}

/// Socket options for a TCP client.
pub fn tune_tcp(config: &Config, stream: &TcpStream, id: &str) {
    // Replies are written once per batch; never hold one back waiting for more.
    let _ = stream.set_nodelay(true);
    // A holder whose machine vanished leaves a half-open connection; keepalive finds it so its
    // locks are released.
    if config.keepalive_idle > 0 {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(config.keepalive_idle))
            .with_interval(Duration::from_secs(config.keepalive_interval))
            .with_retries(config.keepalive_count);
        let socket = socket2::SockRef::from(stream);
        if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
            tracing::warn!(
                event = "keepalive_failed",
                conn = %id,
                error = %e,
                "could not enable TCP keepalive"
            );
        }
        // Keepalive only probes an idle connection; when a reply is in flight to a machine that
        // vanished, the kernel retransmits for many minutes instead. Give up on unacknowledged
        // data after the same time keepalive would take.
        // Saturating, for a `Config` built in code (the command line bounds the sum).
        let give_up = config
            .keepalive_interval
            .saturating_mul(u64::from(config.keepalive_count));
        let give_up = config.keepalive_idle.saturating_add(give_up);
        if let Err(e) = socket.set_tcp_user_timeout(Some(Duration::from_secs(give_up))) {
            tracing::warn!(
                event = "keepalive_failed",
                conn = %id,
                error = %e,
                "could not set the TCP user timeout"
            );
        }
    }
}
