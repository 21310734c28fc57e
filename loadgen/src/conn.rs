//! Driving one connection: write a whole window of commands in one write, read whatever replies
//! have arrived, parse them in place, repeat.
//!
//! Generic over the byte stream, so TCP and unix sockets share every line of it. Buffers are
//! reused for the life of the connection; one clock reading serves a whole write (its send time)
//! and a whole read (its receipt time), so the client's cost per command stays a few dozen
//! nanoseconds.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::cli::AuthLine;
use crate::report::Recorder;
use crate::session::{RunShared, Schedule, Session};
use crate::wire::{self, Parsed, Target};

/// How long replies may keep coming after the run's end before the connection is given up.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Open loop: the runtime's timers tick in milliseconds, so a timer armed for a tick fires up
/// to a millisecond after it, and every command of a slow schedule would leave (and be timed
/// from its scheduled time) that much late. So a connection sleeps only until this long before
/// its next tick, then polls (yielding to the other tasks of its thread) until the tick is due:
/// a spin-then-sleep timer that keeps the schedule to microseconds at any rate. Two ticks of
/// the timer wheel: a late timer still leaves time to spin.
const SPIN: Duration = Duration::from_millis(2);

/// Free space kept in the read buffer before each read.
const READ_SPACE: usize = 16 * 1024;

/// Opens connections to the server.
pub trait Dial: Clone + 'static {
    /// The byte stream of one connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + 'static;
    /// Connects connection number `index` once.
    fn dial(&self, index: u64) -> impl std::future::Future<Output = io::Result<Self::Stream>>;
}

/// TCP, with Nagle off: a pipelined window is one write and must leave at once. Connection
/// `index` goes to `addrs[index % addrs.len()]`: the server's one address, or, shard-aware,
/// each shard's own. With `--auth`, each connection authenticates before it is used.
#[derive(Clone)]
pub struct TcpDial(pub std::rc::Rc<[SocketAddr]>, pub Option<AuthLine>);

impl TcpDial {
    /// Connects connection number `index` without authenticating.
    async fn connect(&self, index: u64) -> io::Result<TcpStream> {
        let addr = self.0[(index % self.0.len() as u64) as usize];
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Dial for TcpDial {
    type Stream = TcpStream;
    async fn dial(&self, index: u64) -> io::Result<TcpStream> {
        let mut stream = self.connect(index).await?;
        authenticate(&mut stream, self.1.as_ref()).await?;
        Ok(stream)
    }
}

/// TCP, then a TLS handshake (`--tls`): the handshake is part of connecting, and `--auth`
/// goes over TLS once it is done, never in clear text.
#[derive(Clone)]
pub struct TlsDial(pub TcpDial, pub std::rc::Rc<crate::tls::Tls>);

impl Dial for TlsDial {
    type Stream = tokio_rustls::client::TlsStream<TcpStream>;
    async fn dial(&self, index: u64) -> io::Result<Self::Stream> {
        let stream = self.0.connect(index).await?;
        let mut stream = self.1.connect(stream).await?;
        authenticate(&mut stream, self.0 .1.as_ref()).await?;
        Ok(stream)
    }
}

/// A unix socket (with `--auth`, authenticated before it is used).
#[derive(Clone)]
pub struct UnixDial(pub PathBuf, pub Option<AuthLine>);

impl Dial for UnixDial {
    type Stream = UnixStream;
    async fn dial(&self, _index: u64) -> io::Result<UnixStream> {
        let mut stream = UnixStream::connect(&self.0).await?;
        authenticate(&mut stream, self.1.as_ref()).await?;
        Ok(stream)
    }
}

/// Sends `auth USER TOKEN` and reads its one-line reply, which must start with `1 `. Done once
/// per connection, before its first command, so reading a byte at a time costs nothing that
/// matters and never reads past the reply.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    auth: Option<&AuthLine>,
) -> io::Result<()> {
    let Some(AuthLine(line)) = auth else {
        return Ok(());
    };
    stream.write_all(line).await?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.last() != Some(&b'\n') {
        if stream.read(&mut byte).await? == 0 || reply.len() > 4096 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "auth: the server closed the connection without a reply",
            ));
        }
        reply.push(byte[0]);
    }
    if reply.starts_with(b"1 ") {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "auth refused: {}",
            String::from_utf8_lossy(&reply).trim_end()
        ),
    ))
}

/// A connection's reusable buffers.
#[derive(Default)]
pub struct Buffers {
    /// Bytes read and not yet parsed.
    read: Vec<u8>,
    /// Commands built and not yet written.
    write: Vec<u8>,
}

/// What every connection of one client thread works with.
pub struct Env<'a> {
    /// The thread's measurements.
    pub rec: &'a RefCell<Recorder>,
    /// What all connections of the run share.
    pub run: &'a RunShared,
    /// The server's protocol.
    pub target: Target,
    /// When the run's time is up.
    pub end: Instant,
}

/// Runs `session` on `stream` until the session is done, the run's time is up and its replies
/// are in, or the connection fails. Errors are described for the report.
pub async fn drive<S>(
    stream: &mut S,
    session: &mut Session,
    bufs: &mut Buffers,
    env: &Env<'_>,
    mut schedule: Option<&mut Schedule>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Env {
        rec,
        run,
        target,
        end,
    } = *env;
    loop {
        let now = Instant::now();
        if now >= end {
            session.stopping = true;
        }
        match schedule.as_deref_mut() {
            Some(schedule) => {
                schedule.issue(now);
                session.fill_open(now, &mut schedule.ticks, &mut bufs.write);
            }
            None => session.fill_closed(now, &mut bufs.write),
        }
        if !bufs.write.is_empty() {
            stream
                .write_all(&bufs.write)
                .await
                .map_err(|e| format!("write failed: {e}"))?;
            bufs.write.clear();
        }
        if session.done() {
            return Ok(());
        }

        // Wait for replies, or until the next thing this connection must do on its own.
        let mut wake = if session.stopping { end + DRAIN } else { end };
        if let Some(at) = session.next_think() {
            wake = wake.min(at);
        }
        if let (Some(schedule), false) = (schedule.as_deref(), session.stopping) {
            wake = wake.min(schedule.next);
        }
        let now = Instant::now();
        if session.stopping && now >= end + DRAIN {
            return Err(format!(
                "{} replies still missing {DRAIN:?} after the end of the run",
                session.inflight()
            ));
        }
        if bufs.read.capacity() - bufs.read.len() < READ_SPACE {
            bufs.read.reserve(READ_SPACE);
        }
        let read = if schedule.is_some() && wake.saturating_duration_since(now) < SPIN {
            tokio::select! {
                biased;
                read = stream.read_buf(&mut bufs.read) => read,
                _ = tokio::task::yield_now() => continue,
            }
        } else {
            // Open loop: wake early enough to spin up to the tick (see SPIN).
            let alarm = match schedule {
                Some(_) => wake.checked_sub(SPIN).unwrap_or(wake),
                None => wake,
            };
            tokio::select! {
                biased;
                read = stream.read_buf(&mut bufs.read) => read,
                _ = tokio::time::sleep_until(alarm.into()) => continue,
            }
        };
        match read {
            Ok(0) if session.inflight() > 0 => {
                return Err(format!(
                    "the server closed the connection with {} replies outstanding",
                    session.inflight()
                ))
            }
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
        let now = Instant::now();
        let mut at = 0;
        let mut replies = 0;
        {
            let mut rec = rec.borrow_mut();
            loop {
                match wire::parse(target, &bufs.read[at..]) {
                    Parsed::Incomplete => break,
                    Parsed::Malformed(what) => return Err(format!("malformed reply: {what}")),
                    Parsed::Reply(raw, used) => {
                        session.on_reply(&raw, now, &mut rec)?;
                        at += used;
                        replies += 1;
                    }
                }
            }
        }
        bufs.read.drain(..at);
        run.progress.fetch_add(replies, Ordering::Relaxed);
    }
}
