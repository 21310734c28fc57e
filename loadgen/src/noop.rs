//! The no-op line server: answers every line with one fixed reply at once and does no lock
//! work. It is built like glockd (one single-threaded runtime per thread, connections dealt out
//! round-robin by the accepting thread, one reply write per read), so the throughput it reaches
//! is the I/O ceiling of the machine for this protocol: what glockd would do if its locks were
//! free.

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::rc::Rc;
use std::thread::JoinHandle;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::LocalSet;

/// The reply to every line: glockd's reply to a granted `g`.
pub const REPLY: &[u8] = b"1 Got Lock\n";

/// Bytes read at a time, as glockd does.
const READ_CHUNK: usize = 16 * 1024;

/// A connection on its way from the accepting thread to the thread that serves it.
enum Incoming {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

/// A running no-op server; dropping it stops it.
pub struct NoopServer {
    /// The TCP address bound, if any.
    tcp_addr: Option<SocketAddr>,
    /// Tells every thread to stop.
    stop: watch::Sender<bool>,
    /// The server threads, joined on drop.
    threads: Vec<JoinHandle<()>>,
}

impl NoopServer {
    /// The TCP address actually bound.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }
}

impl Drop for NoopServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Serves on the given listeners with `threads` threads (at least one).
pub fn start(
    tcp: Option<StdTcpListener>,
    unix: Option<StdUnixListener>,
    threads: usize,
) -> io::Result<NoopServer> {
    let threads = threads.max(1);
    let tcp_addr = tcp.as_ref().map(|l| l.local_addr()).transpose()?;
    if let Some(l) = &tcp {
        l.set_nonblocking(true)?;
    }
    if let Some(l) = &unix {
        l.set_nonblocking(true)?;
    }
    let (stop, stopped) = watch::channel(false);
    let (mailboxes, inboxes): (Vec<_>, Vec<_>) =
        (0..threads).map(|_| mpsc::unbounded_channel()).unzip();
    let mut listeners = Some((tcp, unix, mailboxes));
    let mut handles = Vec::with_capacity(threads);
    for (id, inbox) in inboxes.into_iter().enumerate() {
        let listeners = if id == 0 { listeners.take() } else { None };
        let stopped = stopped.clone();
        let handle = std::thread::Builder::new()
            .name(format!("noop-{id}"))
            .spawn(move || serve_thread(inbox, listeners, stopped));
        match handle {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                let _ = stop.send(true);
                return Err(e);
            }
        }
    }
    Ok(NoopServer {
        tcp_addr,
        stop,
        threads: handles,
    })
}

type Listeners = (
    Option<StdTcpListener>,
    Option<StdUnixListener>,
    Vec<mpsc::UnboundedSender<Incoming>>,
);

/// One server thread: its connections, and on thread 0 the accept loops.
fn serve_thread(
    mut inbox: mpsc::UnboundedReceiver<Incoming>,
    listeners: Option<Listeners>,
    mut stopped: watch::Receiver<bool>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("noop-server: cannot start a runtime: {e}");
            return;
        }
    };
    let local = LocalSet::new();
    local.block_on(&runtime, async move {
        if let Some((tcp, unix, mailboxes)) = listeners {
            let mailboxes = Rc::new(mailboxes);
            if let Some(listener) = tcp.and_then(|l| TcpListener::from_std(l).ok()) {
                tokio::task::spawn_local(accept_loop(listener, mailboxes.clone()));
            }
            if let Some(listener) = unix.and_then(|l| UnixListener::from_std(l).ok()) {
                tokio::task::spawn_local(accept_loop(listener, mailboxes));
            }
        }
        loop {
            tokio::select! {
                incoming = inbox.recv() => match incoming {
                    Some(Incoming::Tcp(stream)) => {
                        if let Ok(stream) = TcpStream::from_std(stream) {
                            let _ = stream.set_nodelay(true);
                            tokio::task::spawn_local(serve(stream));
                        }
                    }
                    Some(Incoming::Unix(stream)) => {
                        if let Ok(stream) = UnixStream::from_std(stream) {
                            tokio::task::spawn_local(serve(stream));
                        }
                    }
                    None => return,
                },
                _ = stopped.changed() => return,
            }
        }
    });
}

/// A listener the accepting thread deals connections out from.
trait Door {
    /// Waits for the next connection and readies it to move to the thread that will serve it
    /// (`None`: it could not be).
    async fn accept_incoming(&self) -> io::Result<Option<Incoming>>;
}

impl Door for TcpListener {
    async fn accept_incoming(&self) -> io::Result<Option<Incoming>> {
        let (stream, _) = self.accept().await?;
        Ok(stream.into_std().ok().map(Incoming::Tcp))
    }
}

impl Door for UnixListener {
    async fn accept_incoming(&self) -> io::Result<Option<Incoming>> {
        let (stream, _) = self.accept().await?;
        Ok(stream.into_std().ok().map(Incoming::Unix))
    }
}

/// Deals the connections of one listener out to the server threads, round-robin.
async fn accept_loop(listener: impl Door, mailboxes: Rc<Vec<mpsc::UnboundedSender<Incoming>>>) {
    let mut next = 0;
    loop {
        match listener.accept_incoming().await {
            Ok(Some(incoming)) => {
                let _ = mailboxes[next].send(incoming);
                next = (next + 1) % mailboxes.len();
            }
            Ok(None) => {}
            // Out of descriptors, or a connection reset before it was accepted: not fatal.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
        }
    }
}

/// Answers every line of one connection, one write per read.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let mut input = vec![0u8; READ_CHUNK];
    let mut out = Vec::with_capacity(READ_CHUNK);
    loop {
        let read = match stream.read(&mut input).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        // Only complete lines are answered, so counting newlines is all the parsing needed.
        for _ in memchr::memchr_iter(b'\n', &input[..read]) {
            out.extend_from_slice(REPLY);
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}
