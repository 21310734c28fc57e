//! The three doors into one lock table: TCP, websocket and unix socket. Each is bound at start,
//! accepted on shard 0's thread, and every accepted connection is handed to a shard thread in
//! turn (see [`crate::lifecycle`]), where it lives until it closes. A connection is the same to
//! the lock table whichever door it came through.

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::Config;
use crate::lifecycle::{Admission, ConnMsg, Incoming};
use crate::protocol;
use crate::shard::{ShardCore, ShardMsg};

/// The listeners a server serves, bound before any thread starts (so binding errors are
/// reported at once, and tests can bind ephemeral ports themselves).
#[derive(Default)]
pub struct Listeners {
    /// The line protocol over TCP.
    pub tcp: Option<StdTcpListener>,
    /// Websockets: one command per message.
    pub ws: Option<StdTcpListener>,
    /// The line protocol over a unix socket, and the socket file's path (removed at exit).
    pub unix: Option<(StdUnixListener, PathBuf)>,
    /// The Prometheus metrics endpoint (HTTP).
    pub metrics: Option<StdTcpListener>,
}

impl Listeners {
    /// Binds every door `config` enables.
    pub fn bind(config: &Config) -> io::Result<Listeners> {
        let tcp_on = |port: u16| -> io::Result<Option<StdTcpListener>> {
            match port {
                0 => Ok(None),
                port => StdTcpListener::bind(SocketAddr::new(config.bind, port))
                    .map(Some)
                    .map_err(|e| io::Error::new(e.kind(), format!("port {port}: {e}"))),
            }
        };
        Ok(Listeners {
            tcp: tcp_on(config.port)?,
            ws: tcp_on(config.ws)?,
            unix: config
                .unix_path()
                .map(|path| bind_unix(path, config.unix_mode).map(|l| (l, path.to_owned())))
                .transpose()?,
            metrics: config
                .metrics_addr()
                .map(|addr| {
                    StdTcpListener::bind(addr)
                        .map_err(|e| io::Error::new(e.kind(), format!("metrics {addr}: {e}")))
                })
                .transpose()?,
        })
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

/// Removes the unix socket file at exit, if it is still a socket (never another file that took
/// its place).
pub fn remove_unix(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// A door being accepted on.
pub enum Door {
    Tcp(TcpListener),
    Ws(TcpListener),
    Unix(UnixListener),
}

/// A connection just accepted, still on the accepting thread.
enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Ws(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl Door {
    /// Registers the std listeners with this thread's runtime.
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
        if let Some((l, _)) = listeners.unix {
            l.set_nonblocking(true)?;
            doors.push(Door::Unix(UnixListener::from_std(l)?));
        }
        Ok(doors)
    }

    async fn accept(&self) -> io::Result<Accepted> {
        Ok(match self {
            Door::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                Accepted::Tcp(stream, peer)
            }
            Door::Ws(l) => {
                let (stream, peer) = l.accept().await?;
                Accepted::Ws(stream, peer)
            }
            Door::Unix(l) => Accepted::Unix(l.accept().await?.0),
        })
    }
}

/// Accepts connections at one door and deals them out to the shards in turn, until shutdown.
pub async fn accept_loop(core: Rc<ShardCore>, door: Door) {
    let shards = core.server.router.shards();
    let mut next = 0usize;
    let mut backoff = Duration::from_millis(1);
    loop {
        if core.is_closing() {
            return;
        }
        let accepted = tokio::select! {
            accepted = door.accept() => accepted,
            _ = core.conns.closing() => return,
        };
        let accepted = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(1);
                accepted
            }
            Err(e) => {
                // Out of file descriptors or memory, or a connection reset before we got to it:
                // none is fatal. Back off so a persistent error does not spin the thread.
                eprintln!("glockd: accept failed: {e}");
                core.cell().accept_errors.add(1);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Some(admission) = Admission::try_new(&core.server) else {
            refuse(&core, accepted);
            continue;
        };
        let target = next;
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
            Err(e) => eprintln!("glockd: could not hand over a connection: {e}"),
        }
    }
}

/// Turns away a connection over `--max-connections` with one line of explanation, best
/// effort (never waiting on this client).
fn refuse(core: &ShardCore, accepted: Accepted) {
    core.cell()
        .refused(crate::stats::RefuseReason::MaxConnections);
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
            "a unix socket client".to_owned()
        }
    };
    if core.server.config.verbose {
        eprintln!("glockd: refused {who}: --max-connections reached");
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
            eprintln!("glockd: could not enable keepalive for {id}: {e}");
        }
        // Keepalive only probes an idle connection; when a reply is in flight to a machine that
        // vanished, the kernel retransmits for many minutes instead. Give up on unacknowledged
        // data after the same time keepalive would take.
        let give_up =
            config.keepalive_idle + config.keepalive_interval * u64::from(config.keepalive_count);
        if let Err(e) = socket.set_tcp_user_timeout(Some(Duration::from_secs(give_up))) {
            eprintln!("glockd: could not set the TCP user timeout for {id}: {e}");
        }
    }
}
