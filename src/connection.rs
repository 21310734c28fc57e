//! One client connection's I/O: read lines, run them (see [`crate::session`]), write replies,
//! and decide when the connection ends.
//!
//! Reading and writing proceed together: while replies wait for a slow reader, the connection
//! keeps reading and answering. Once its unread replies pass `--max-unsent-bytes`, no more of
//! its lines run until it has read them (a big listing is served at the client's pace), and a
//! client that keeps sending meanwhile is disconnected instead of being buffered without end. A write that makes no progress for
//! `--write-timeout` seconds, input silent for `--idle-timeout`, a line longer than
//! `--max-line-bytes`, or an unfinished line older than `--line-timeout` also end the
//! connection; so do more than [`WAIT_READ_AHEAD`] bytes sent behind a waiting command, and
//! buffers among the biggest when all connections' pass `--max-client-buffers` (see
//! [`crate::client_buffers`]); in every case its locks are orphaned.
//!
//! Lines run in turns of at most [`MAX_BATCH`] commands or [`TURN_REPLY_BYTES`] of replies,
//! between which the other connections of the thread have theirs.

use crate::peer::Peer;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use crate::client_buffers::BufferMeter;
use crate::config::ConnLimits;
use crate::framer::{LineFramer, LineTooLong};
use crate::lifecycle::{Admission, Carried};
use crate::protocol::{self, Request};
use crate::routing::Gone;
use crate::session::{NoWatch, PeerWatch, Session, Step};
use crate::shard::ShardCore;
use crate::stats::CloseReason;
use crate::upgrade::{ConnDoor, ConnImage};

/// Most lines run per turn before their replies are written and the connection lets the other
/// tasks of its thread have theirs: bounds the work between two writes, and lets a client that
/// pipelines a million commands share its thread.
pub(crate) const MAX_BATCH: usize = 1024;

/// Most reply bytes one turn produces before the connection lets the others have theirs (a
/// command is never cut: one big listing is one turn). With [`MAX_BATCH`], a crowd of clients
/// pipelining costly commands (`q`: about a kilobyte of rendered stats each) keeps each turn to
/// tens of microseconds, so a quiet client is answered within milliseconds however many pipeline
/// meanwhile. Plain lock commands (a dozen bytes of reply each) meet [`MAX_BATCH`] first.
pub(crate) const TURN_REPLY_BYTES: usize = 16 * 1024;

/// Input a client may send behind a waiting command (`gw`, `sgw`) while it waits. The
/// connection keeps reading while its command waits, so that a client that resets or closes is
/// seen leaving at once (its place in the queue, its connection place and its descriptor are
/// freed); this bounds what that reading may hold. A client that sends more is answered
/// `0 Too Much Sent While Waiting` in place of its wait's answer and closed. (A client waits for
/// the answer before it sends more; room is left for a few commands sent ahead all the same.)
pub(crate) const WAIT_READ_AHEAD: usize = 64 * 1024;

/// Read room for a connection that sends little: most clients send one short command at a
/// time, and ten thousand idle connections should not each pin a large buffer.
const SMALL_READ: usize = 1024;

/// Read room once a client fills the small buffer in one read (it pipelines).
const LARGE_READ: usize = 64 * 1024;

/// Input a client may send while its replies are piled up past `--max-unsent-bytes` before it
/// counts as not reading them (or `--max-line-bytes`, if larger): room for the commands it
/// pipelined behind a big listing, not for a flood.
const MIN_READ_AHEAD: usize = 64 * 1024;

/// A buffer left with more capacity than this while empty goes back to nothing, so a burst
/// does not leave an idle connection holding its peak memory.
const KEEP_CAPACITY: usize = 16 * 1024;

/// Why a connection ended, as its `disconnect` log line says (`reason=…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disconnect {
    /// The client closed its side (or, over a websocket, sent a close frame).
    Eof,
    /// The connection was reset or broken under us.
    Reset,
    /// The kernel gave up on the peer: keepalive probes or unacknowledged data timed out.
    TimedOut,
    /// Some other I/O error.
    Error(io::ErrorKind),
    /// Nothing was sent for `--idle-timeout`.
    Idle,
    /// A line stayed unfinished (no newline) for `--line-timeout`.
    LineTimeout,
    /// A reply write made no progress for `--write-timeout`.
    WriteTimeout,
    /// The client kept sending with more than `--max-unsent-bytes` of replies unread.
    UnsentLimit,
    /// A line (or websocket message) was longer than `--max-line-bytes`.
    LineTooLong,
    /// A websocket text message was not UTF-8 (the protocol requires it of text messages).
    BadText,
    /// Its buffers were among the biggest when all clients' passed `--max-client-buffers`.
    ClientBuffers,
    /// It sent more than [`WAIT_READ_AHEAD`] while a command of its waited.
    WaitReadAhead,
    /// `--auth-max-failures` failed `auth`s in a row.
    AuthFailures,
    /// The server is shutting down.
    Shutdown,
    /// Carried by a live upgrade: the successor serves it now.
    HandedOver,
    /// Serving it panicked (a bug; logged with the panic).
    Panic,
}

impl Disconnect {
    /// The server's own reasons to close, as the metrics count them (`None`: the client's
    /// doing, or the server stopping).
    pub(crate) fn close_reason(self) -> Option<CloseReason> {
        Some(match self {
            Disconnect::LineTooLong => CloseReason::LineTooLong,
            Disconnect::UnsentLimit => CloseReason::UnreadReplies,
            Disconnect::WriteTimeout => CloseReason::WriteTimeout,
            Disconnect::Idle => CloseReason::IdleTimeout,
            Disconnect::ClientBuffers => CloseReason::ClientBuffers,
            Disconnect::WaitReadAhead => CloseReason::WaitReadAhead,
            Disconnect::LineTimeout => CloseReason::LineTimeout,
            Disconnect::AuthFailures => CloseReason::AuthFailures,
            _ => return None,
        })
    }

    /// Whether the connection ended in good order, so that closing it politely (a FIN, a
    /// websocket close frame) can still reach the client.
    pub(crate) fn is_clean(self) -> bool {
        matches!(
            self,
            Disconnect::Eof
                | Disconnect::Idle
                | Disconnect::LineTooLong
                | Disconnect::LineTimeout
                | Disconnect::BadText
                | Disconnect::AuthFailures
                | Disconnect::Shutdown
        )
    }

    /// The reason as a log field's value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Disconnect::Eof => "eof",
            Disconnect::Reset => "reset",
            Disconnect::TimedOut => "timed_out",
            Disconnect::Error(_) => "error",
            Disconnect::Idle => "idle",
            Disconnect::LineTimeout => "line_timeout",
            Disconnect::WriteTimeout => "write_timeout",
            Disconnect::UnsentLimit => "unsent_limit",
            Disconnect::LineTooLong => "line_too_long",
            Disconnect::BadText => "bad_text",
            Disconnect::ClientBuffers => "client_buffers",
            Disconnect::WaitReadAhead => "wait_read_ahead",
            Disconnect::AuthFailures => "auth_failures",
            Disconnect::Shutdown => "shutdown",
            Disconnect::HandedOver => "handed_over",
            Disconnect::Panic => "panic",
        }
    }

    /// The reason an I/O error on the connection gives.
    pub(crate) fn from_io(error: &io::Error) -> Disconnect {
        match error.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::WriteZero => Disconnect::Reset,
            io::ErrorKind::TimedOut => Disconnect::TimedOut,
            kind => Disconnect::Error(kind),
        }
    }

    /// The reason when a command could not finish because its client or the server went away:
    /// shutdown if the server is closing, else the client left (a reset seen while it waited).
    pub(crate) fn gone(core: &ShardCore) -> Disconnect {
        if core.is_closing() {
            Disconnect::Shutdown
        } else {
            Disconnect::Reset
        }
    }
}

/// Logs a connection's `disconnect` line under `-verbose`: with the reason it is given, or, if
/// the connection's task ended without one, `shutdown` (cancelled at the end of shutdown's
/// grace) or `panic`.
pub(crate) struct Farewell {
    /// The protocol id; None when not verbose (nothing to log).
    label: Option<String>,
    core: Rc<ShardCore>,
    reason: Option<Disconnect>,
}

impl Farewell {
    pub(crate) fn new(core: &Rc<ShardCore>, id: &str) -> Farewell {
        Farewell {
            label: core.server.config.verbose.then(|| id.to_owned()),
            core: core.clone(),
            reason: None,
        }
    }

    /// Logs the line now, with `reason`.
    pub(crate) fn say(mut self, reason: Disconnect) {
        self.reason = Some(reason);
    }
}

impl Drop for Farewell {
    fn drop(&mut self) {
        let Some(label) = &self.label else {
            return;
        };
        let reason = self.reason.unwrap_or(if self.core.is_closing() {
            Disconnect::Shutdown
        } else {
            Disconnect::Panic
        });
        match reason {
            Disconnect::Error(kind) => tracing::info!(
                event = "disconnect",
                conn = %label,
                reason = reason.as_str(),
                error = %kind
            ),
            _ => tracing::info!(event = "disconnect", conn = %label, reason = reason.as_str()),
        }
    }
}

/// Why a connection stops running lines.
enum Stop {
    /// A line (or unfinished input) is longer than `--max-line-bytes`.
    LineTooLong,
    /// The server is gone (shutdown), or the client left while its command waited: close
    /// without a word.
    Gone,
    /// A reply could not be written: timed out, or an I/O error.
    Ended(Disconnect),
    /// A live upgrade stopped the connection in a wait: it is handed over.
    Frozen,
}

impl From<Gone> for Stop {
    fn from(_: Gone) -> Self {
        Stop::Gone
    }
}

impl From<LineTooLong> for Stop {
    fn from(_: LineTooLong) -> Self {
        Stop::LineTooLong
    }
}

/// What happened while waiting for I/O.
#[derive(Default)]
struct Event {
    read: bool,
    eof: bool,
    closing: bool,
    idle: bool,
    stalled: bool,
    /// The unfinished line's timer went off.
    unfinished: bool,
    /// Closed for `--max-client-buffers`.
    doomed: bool,
}

/// The connection's buffers.
struct Buffers {
    /// Bytes read and not yet run, split into lines.
    input: LineFramer,
    /// Input read while a command waited (`gw`), to run after it.
    side: BytesMut,
    /// End of input was read while a command waited.
    side_eof: bool,
    /// Replies not yet written.
    out: Vec<u8>,
    /// How much of `out` is written.
    written: usize,
    /// The client sends more than a small buffer holds at once: read with large buffers.
    pipelining: bool,
    /// Lines taken from `input` so far: tells whether the unfinished line at the end of the
    /// input is the one seen before, or a new one.
    lines_taken: u64,
    /// Reports what these buffers hold against `--max-client-buffers`.
    meter: BufferMeter,
    /// Complete lines wait to run (the client pipelines): its buffers keep their room.
    busy: bool,
}

impl Buffers {
    fn unsent(&self) -> usize {
        self.out.len() - self.written
    }

    /// The memory the buffers hold.
    fn bytes(&self) -> usize {
        self.input.capacity() + self.side.capacity() + self.out.capacity()
    }

    /// Tells the budget what the buffers hold now (nothing happens unless it changed).
    fn report(&mut self) {
        let bytes = self.bytes();
        self.meter.report(bytes);
    }

    /// A carried connection that was in a wait: waits for its answer (reading what the client
    /// sends meanwhile, as any wait does), then what it sent behind it comes next. Err(None):
    /// a live upgrade stopped it again; Err(Some(reason)): the connection ends.
    async fn resume_wait<S: AsyncRead + Unpin>(
        &mut self,
        session: &mut Session,
        stream: &mut S,
        answer: tokio::sync::oneshot::Receiver<crate::protocol::Reply>,
    ) -> Result<(), Option<Disconnect>> {
        let mut watch = StreamWatch {
            stream,
            side: &mut self.side,
            eof: &mut self.side_eof,
            meter: &self.meter,
            ended: None,
        };
        let waited = session.resume_wait(answer, &mut self.out, &mut watch).await;
        let ended = watch.ended;
        if waited.is_err() {
            if session.is_parked() {
                return Err(None);
            }
            return Err(Some(
                ended.unwrap_or_else(|| Disconnect::gone(session.core())),
            ));
        }
        self.merge_side();
        Ok(())
    }

    /// Input read while a command waited comes after everything already buffered.
    fn merge_side(&mut self) {
        if !self.side.is_empty() {
            self.input.extend(&self.side);
            self.side = BytesMut::new();
        }
    }

    /// Gives every buffer's memory back (the connection is closing for the budget).
    fn release(&mut self) {
        self.input.clear();
        self.side = BytesMut::new();
        self.out = Vec::new();
        self.written = 0;
        self.report();
    }

    /// Runs up to MAX_BATCH complete lines. Returns whether complete lines remain.
    async fn run_lines<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        session: &mut Session,
        limits: &ConnLimits,
        stream: &mut S,
    ) -> Result<bool, Stop> {
        let mut ran = 0;
        let mut cut = false;
        let turn_start = self.out.len();
        loop {
            let line = match self.input.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(LineTooLong) => {
                    // The commands before the refused line were run: answer them first.
                    session.flush(&mut self.out).await?;
                    return Err(Stop::LineTooLong);
                }
            };
            if let Step::Later(request) = session.step(line, &mut self.out) {
                if matches!(request, Request::Wait { .. }) {
                    // The replies before a wait go out before it waits, not after.
                    session.flush(&mut self.out).await?;
                    self.write_all(stream, limits).await?;
                }
                let mut watch = StreamWatch {
                    stream: &mut *stream,
                    side: &mut self.side,
                    eof: &mut self.side_eof,
                    meter: &self.meter,
                    ended: None,
                };
                let ran_line = session
                    .run_later_boxed(request, &mut self.out, &mut watch)
                    .await;
                let ended = watch.ended;
                self.merge_side();
                if let (Err(_), Some(reason)) = (&ran_line, ended) {
                    return Err(Stop::Ended(reason));
                }
                if ran_line.is_err() && session.is_parked() {
                    return Err(Stop::Frozen);
                }
                ran_line?;
            }
            ran += 1;
            self.lines_taken += 1;
            // End the turn when it has run its share, or early when replies pile up (big
            // listings): they are written, and the unread-reply limit applies, before any more
            // lines run.
            if ran == MAX_BATCH
                || self.out.len() - turn_start >= TURN_REPLY_BYTES
                || self.unsent() > limits.max_unsent
            {
                cut = true;
                break;
            }
        }
        session.flush(&mut self.out).await?;
        self.input.compact();
        if cut && self.input.pending() > 0 {
            // More lines wait behind the cut (or, with replies piled up past the limit, a
            // client that kept sending: the caller cuts it off).
            return Ok(true);
        }
        if self.input.shrink_if_empty(KEEP_CAPACITY) {
            self.pipelining = false;
        }
        Ok(false)
    }

    /// Writes every pending reply (bounded by the write timeout).
    async fn write_all<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        limits: &ConnLimits,
    ) -> Result<(), Stop> {
        let rest = &self.out[self.written..];
        let write = stream.write_all(rest);
        let written = match limits.write_timeout {
            Some(limit) => match tokio::time::timeout(limit, write).await {
                Ok(written) => written,
                Err(_) => return Err(Stop::Ended(Disconnect::WriteTimeout)),
            },
            None => write.await,
        };
        written.map_err(|e| Stop::Ended(Disconnect::from_io(&e)))?;
        self.out.clear();
        self.written = 0;
        Ok(())
    }

    /// Writes as much of `out` as the stream takes now; true if anything was written.
    fn poll_write_out<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        cx: &mut Context<'_>,
    ) -> io::Result<bool> {
        let mut wrote = false;
        while self.written < self.out.len() {
            match Pin::new(&mut *stream).poll_write(cx, &self.out[self.written..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.written += n;
                    wrote = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
            // A connection with lines still to run keeps its room for their replies: giving it
            // back each turn would cost a pipelining client a reallocation per turn.
            if self.out.capacity() > KEEP_CAPACITY && !self.busy {
                self.out = Vec::new();
            }
            // Transports that buffer (websocket frames) send now; a TCP flush is a no-op.
            if let Poll::Ready(Err(e)) = Pin::new(&mut *stream).poll_flush(cx) {
                return Err(e);
            }
        }
        Ok(wrote)
    }
}

/// Watches a byte stream while a command waits: reads what the client sends meanwhile (kept
/// for later, up to [`WAIT_READ_AHEAD`]: more ends the connection, since to stop reading would
/// be to stop seeing the client leave) and reports a reset or read error as the client being
/// gone. End of input is not: a client may half-close after its last command and still expect
/// every reply, so the wait goes on, and the connection ends once it is answered (a client that
/// really vanished is released right after its grant, when the reply cannot be delivered).
struct StreamWatch<'a, S> {
    stream: &'a mut S,
    side: &'a mut BytesMut,
    /// Set when end of input is read.
    eof: &'a mut bool,
    /// Tells when the connection is closed for `--max-client-buffers`.
    meter: &'a BufferMeter,
    /// Why the connection ends, when the watch ended it for a reason of its own.
    ended: Option<Disconnect>,
}

impl<S: AsyncRead + Unpin> PeerWatch for StreamWatch<'_, S> {
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.meter.poll_doomed(cx) {
            self.ended = Some(Disconnect::ClientBuffers);
            return Poll::Ready(());
        }
        loop {
            if *self.eof {
                return Poll::Pending;
            }
            if self.side.len() > WAIT_READ_AHEAD {
                self.ended = Some(Disconnect::WaitReadAhead);
                return Poll::Ready(());
            }
            self.side.reserve(4096);
            match tokio_util::io::poll_read_buf(Pin::new(&mut *self.stream), cx, &mut *self.side) {
                Poll::Ready(Ok(0)) => {
                    *self.eof = true;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    self.ended = Some(Disconnect::from_io(&e));
                    return Poll::Ready(());
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// `d` from now, saturating: a timeout too long for the clock becomes a deadline that never
/// comes (30 years, as tokio's own `sleep`), so no flag value can make a connection panic.
fn deadline_in(d: std::time::Duration) -> Instant {
    let far = std::time::Duration::from_secs(30 * 365 * 24 * 60 * 60);
    Instant::now()
        .checked_add(d)
        .unwrap_or_else(|| Instant::now() + far)
}

/// Polls an optional timer.
fn poll_timer(timer: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> bool {
    timer
        .as_mut()
        .is_some_and(|t| t.as_mut().poll(cx).is_ready())
}

/// The `--line-timeout` clock: a timer armed only while an unfinished line waits at the end of
/// the input, so a client sending whole lines never pays for it.
struct UnfinishedLine {
    /// `--line-timeout` (None: off).
    limit: Option<std::time::Duration>,
    /// The timer, armed while an unfinished line waits.
    timer: Option<Pin<Box<Sleep>>>,
    /// When the unfinished line being timed began (at the latest: when it was first seen).
    since: Instant,
    /// `Buffers::lines_taken` when it was seen: if more lines were taken since, the unfinished
    /// line now waiting is a newer one.
    taken: u64,
}

impl UnfinishedLine {
    fn new(limit: Option<std::time::Duration>) -> Self {
        UnfinishedLine {
            limit,
            timer: None,
            since: Instant::now(),
            taken: 0,
        }
    }

    /// A carried connection's unfinished line, which has waited `waited` already: its clock
    /// goes on from there.
    fn resume(&mut self, waited: std::time::Duration) {
        let Some(limit) = self.limit else { return };
        let now = Instant::now();
        self.since = now.checked_sub(waited).unwrap_or(now);
        self.taken = 0;
        self.timer = Some(Box::pin(tokio::time::sleep_until(deadline_at(
            self.since, limit,
        ))));
    }

    /// After a batch: arms, moves or disarms the timer for what the input holds now. Cheap when
    /// nothing is pending (a test and a branch).
    fn after_batch(&mut self, buffers: &Buffers) {
        let Some(limit) = self.limit else { return };
        if buffers.input.pending() == 0 {
            self.timer = None;
            return;
        }
        if self.timer.is_some() && self.taken == buffers.lines_taken {
            return; // the same unfinished line as before (perhaps longer): its clock runs on
        }
        // A new unfinished line: its time starts now. The timer only moves when it goes off
        // (see `expired`), so a pipelining client's batches do not reset it each time.
        self.since = Instant::now();
        self.taken = buffers.lines_taken;
        if self.timer.is_none() {
            self.timer = Some(Box::pin(tokio::time::sleep_until(deadline_at(
                self.since, limit,
            ))));
        }
    }

    /// The timer went off: true if the line it times really is that old; otherwise it is
    /// moved to the current line's deadline.
    fn expired(&mut self, buffers: &Buffers) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        if buffers.input.pending() == 0
            || self.taken != buffers.lines_taken
            || buffers.input.has_line()
        {
            // Finished meanwhile (its line waits to run, behind unread replies perhaps): not
            // an unfinished line; the next batch re-arms if needed.
            self.timer = None;
            return false;
        }
        let deadline = deadline_at(self.since, limit);
        if deadline <= Instant::now() {
            return true;
        }
        if let Some(timer) = self.timer.as_mut() {
            timer.as_mut().reset(deadline);
        }
        false
    }
}

/// `start + d`, saturating like [`deadline_in`].
fn deadline_at(start: Instant, d: std::time::Duration) -> Instant {
    let far = std::time::Duration::from_secs(30 * 365 * 24 * 60 * 60);
    start.checked_add(d).unwrap_or_else(|| start + far)
}

/// A connection's stream as a live upgrade sees it: plain TCP and unix sockets can be handed
/// to the successor (their state is the server's own); TLS streams cannot (their session keys
/// live in the library), so they close at an upgrade as at shutdown.
pub(crate) trait Carry: Sized {
    /// Whether this kind of stream is carried.
    const CARRIED: bool = false;

    /// The socket, and its door, to hand over.
    fn carry(self) -> Option<(std::os::fd::OwnedFd, ConnDoor)> {
        None
    }
}

impl Carry for tokio::net::TcpStream {
    const CARRIED: bool = true;

    fn carry(self) -> Option<(std::os::fd::OwnedFd, ConnDoor)> {
        let stream = self.into_std().ok()?;
        Some((stream.into(), ConnDoor::Tcp))
    }
}

impl Carry for tokio::net::UnixStream {
    const CARRIED: bool = true;

    fn carry(self) -> Option<(std::os::fd::OwnedFd, ConnDoor)> {
        let stream = self.into_std().ok()?;
        Some((stream.into(), ConnDoor::Unix))
    }
}

impl<S> Carry for tokio_rustls::server::TlsStream<S> {}

/// Where a carried connection's I/O starts again: what it had when it was stopped.
struct Start {
    input: Vec<u8>,
    output: Vec<u8>,
    eof: bool,
    pipelining: bool,
    timers: Timers,
    answer: Option<tokio::sync::oneshot::Receiver<crate::protocol::Reply>>,
}

/// What a connection stopped for a live upgrade leaves: its unread input and unsent replies.
pub(crate) struct Left {
    pub(crate) input: Vec<u8>,
    pub(crate) output: Vec<u8>,
    pub(crate) eof: bool,
    pub(crate) pipelining: bool,
    pub(crate) timers: Timers,
}

/// Where a connection's `--idle-timeout` and `--line-timeout` clocks stood, carried across a
/// live upgrade so that it does not buy a client more time.
#[derive(Clone, Copy, Default)]
pub(crate) struct Timers {
    pub(crate) idle_left: Option<std::time::Duration>,
    pub(crate) unfinished_for: Option<std::time::Duration>,
}

impl Timers {
    fn of(idle: &Option<Pin<Box<Sleep>>>, unfinished: &UnfinishedLine) -> Timers {
        Timers {
            idle_left: idle
                .as_ref()
                .map(|t| t.deadline().saturating_duration_since(Instant::now())),
            unfinished_for: unfinished
                .timer
                .is_some()
                .then(|| unfinished.since.elapsed()),
        }
    }
}

/// How serving a connection begins.
enum Begin {
    /// A new connection, with its protocol id (`ip:port`, `unix:N`).
    New(String, Admission, Peer),
    /// One carried by a live upgrade, from where it was stopped (boxed: every connection's
    /// future keeps its first arguments for its whole life).
    Carried(Box<Carried>, Peer),
}

/// Serves one connection until it closes. `id_text` is its protocol id (`ip:port`).
pub fn serve<S>(
    core: Rc<ShardCore>,
    stream: S,
    id_text: String,
    admission: Admission,
    peer: Peer,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Carry,
{
    serve_session(core, stream, Begin::New(id_text, admission, peer))
}

/// Serves a connection carried by a live upgrade, from where it was stopped.
pub fn resume<S>(
    core: Rc<ShardCore>,
    stream: S,
    peer: Peer,
    carried: Carried,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Carry,
{
    serve_session(core, stream, Begin::Carried(Box::new(carried), peer))
}

// One future for both (not one wrapping the other), so an idle connection's task is no
// bigger than it must be.
async fn serve_session<S>(core: Rc<ShardCore>, stream: S, begin: Begin)
where
    S: AsyncRead + AsyncWrite + Unpin + Carry,
{
    let (farewell, mut session, start) = match begin {
        Begin::New(id_text, admission, peer) => {
            if core.conns.is_freezing() && !S::CARRIED {
                // Came to a thread a live upgrade is stopping, and cannot be carried: closed.
                return;
            }
            let farewell = Farewell::new(&core, &id_text);
            let session = Session::new(core.clone(), id_text, admission, peer);
            (farewell, session, None)
        }
        Begin::Carried(carried, peer) => {
            let Carried {
                image,
                answer,
                quota,
                admission,
            } = *carried;
            let farewell = Farewell::new(&core, &image.id_text);
            let session = Session::resume(core.clone(), &image, quota, admission, peer);
            let ms = std::time::Duration::from_millis;
            let start = Start {
                input: image.input,
                output: image.output,
                eof: image.eof,
                pipelining: image.pipelining,
                timers: Timers {
                    idle_left: image.idle_left_ms.map(ms),
                    unfinished_for: image.unfinished_ms.map(ms),
                },
                answer,
            };
            (farewell, session, Some(Box::new(start)))
        }
    };
    session.set_carriable(S::CARRIED);
    let mut stream = stream;
    let mut left = None;
    let reason = run(&core, &mut stream, &mut session, start, &mut left).await;
    if let (Disconnect::HandedOver, Some(left)) = (reason, left) {
        farewell.say(reason);
        match stream.carry() {
            Some((fd, door)) => hand_over(&core, fd, door, session, *left),
            // Cannot happen for the streams that are carried; were it to, the connection's
            // locks stay with its id until the upgrade ends, and the client sees it close.
            None => {
                tracing::warn!(event = "carry_failed", "could not carry a connection");
            }
        }
        return;
    }
    if let Some(why) = reason.close_reason() {
        core.cell().closed_because(why);
    }
    // Said before the session goes (and with it the connection's locks), so the disconnect
    // line comes before the orphan lines.
    farewell.say(reason);
    // The connection is counted closed (and its locks are on their way out) before the client
    // can see the close, so a client that reads the close and then asks `q` finds it gone.
    drop(session);
    if reason.is_clean() {
        let limit = core.server.config.conn_limits().write_timeout;
        let shutdown = stream.shutdown();
        match limit {
            Some(limit) => {
                let _ = tokio::time::timeout(limit, shutdown).await;
            }
            None => {
                let _ = shutdown.await;
            }
        }
    }
}

/// Hands a stopped connection (its socket, by the door it came in) to the live upgrade in
/// progress on this thread.
pub(crate) fn hand_over(
    core: &Rc<ShardCore>,
    fd: std::os::fd::OwnedFd,
    door: ConnDoor,
    session: Session,
    left: Left,
) {
    let handed = session.hand_over();
    // The protocol id, as the registry (which the successor gets too) has it.
    let raw = core.server.registry.holder_text(handed.conn, true);
    let id_text = String::from_utf8_lossy(&raw).into_owned();
    let Some(admission) = handed.admission else {
        // Cannot happen: a session keeps its place until it is handed over.
        tracing::warn!(event = "carry_failed", conn = %id_text, "could not carry a connection");
        return;
    };
    core.conns.hand_over(crate::lifecycle::Frozen {
        fd,
        conn: Carried {
            image: ConnImage {
                conn: handed.conn,
                door,
                id_text,
                input: left.input,
                output: left.output,
                eof: left.eof,
                framed: handed.framed,
                pipelining: left.pipelining,
                user: handed.user,
                waiting: handed.answer.is_some(),
                idle_left_ms: left.timers.idle_left.map(millis),
                unfinished_ms: left.timers.unfinished_for.map(millis),
                auth_failures: handed.auth_failures,
            },
            answer: handed.answer,
            quota: handed.quota,
            admission,
        },
    });
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs a connection's I/O until it ends, and says why.
async fn run<S>(
    core: &Rc<ShardCore>,
    stream: &mut S,
    session: &mut Session,
    start: Option<Box<Start>>,
    left: &mut Option<Box<Left>>,
) -> Disconnect
where
    S: AsyncRead + AsyncWrite + Unpin + Carry,
{
    let limits = core.server.config.conn_limits();
    let read_ahead = limits.max_line.max(MIN_READ_AHEAD);
    let mut input = LineFramer::new(limits.max_line);
    let (output, mut eof, pipelining, answer, timers) = match start.map(|start| *start) {
        None => (Vec::new(), false, false, None, None),
        Some(start) => {
            input.extend(&start.input);
            let timers = Some(start.timers);
            (
                start.output,
                start.eof,
                start.pipelining,
                start.answer,
                timers,
            )
        }
    };
    let mut buffers = Buffers {
        input,
        side: BytesMut::new(),
        side_eof: false,
        out: output,
        written: 0,
        pipelining,
        lines_taken: 0,
        meter: core.server.client_buffers.meter(core.id),
        busy: false,
    };
    // Stops the connection for a live upgrade: what it read and has not run, and what it
    // has not written, go with it.
    let mut unfinished = UnfinishedLine::new(limits.line_timeout);
    let mut idle = limits.idle_timeout.map(|d| Box::pin(tokio::time::sleep(d)));
    if let Some(timers) = timers {
        // Carried: its clocks go on where they stood.
        if let (Some(timer), Some(left)) = (idle.as_mut(), timers.idle_left) {
            timer.as_mut().reset(deadline_in(left));
        }
        if let Some(waited) = timers.unfinished_for {
            unfinished.resume(waited);
        }
    }
    let stop_for_upgrade =
        |buffers: &mut Buffers, eof: bool, timers: Timers, left: &mut Option<Box<Left>>| {
            buffers.merge_side();
            *left = Some(Box::new(Left {
                input: buffers.input.take_rest().to_vec(),
                output: buffers.out[buffers.written..].to_vec(),
                eof: eof || buffers.side_eof,
                pipelining: buffers.pipelining,
                timers,
            }));
            buffers.release();
            Disconnect::HandedOver
        };
    if let Some(answer) = answer {
        // Boxed: only carried connections wait here, and every connection's future would
        // otherwise keep room for this wait's state.
        match Box::pin(buffers.resume_wait(session, stream, answer)).await {
            Ok(()) => eof |= buffers.side_eof,
            Err(None) => {
                let timers = Timers::of(&idle, &unfinished);
                return stop_for_upgrade(&mut buffers, eof, timers, left);
            }
            Err(Some(reason)) => return reason,
        }
    }
    // Armed while replies wait for a reader that does not read.
    let mut stall: Option<Pin<Box<Sleep>>> = None;
    // Input may hold complete lines not yet run (a carried connection's may).
    let mut more = buffers.input.has_line();
    loop {
        // Replies piled up past the unread-reply limit are written, at the client's pace,
        // before any more lines run.
        if buffers.unsent() <= limits.max_unsent {
            let started = session.measures_latency().then(std::time::Instant::now);
            let taken = buffers.lines_taken;
            let ran = buffers.run_lines(session, &limits, stream).await;
            if let Some(started) = started {
                session.record_latency(started.elapsed());
            }
            core.check_mail();
            // Time spent running commands (a `gw` may wait minutes) is not idleness; a turn
            // that ran nothing leaves the clock alone (a carried connection's goes on).
            if buffers.lines_taken != taken {
                if let (Some(timer), Some(d)) = (idle.as_mut(), limits.idle_timeout) {
                    timer.as_mut().reset(deadline_in(d));
                }
            }
            eof |= buffers.side_eof;
            buffers.report();
            more = match ran {
                Ok(more) => more,
                Err(Stop::Ended(Disconnect::ClientBuffers)) => {
                    return over_budget(stream, &mut buffers).await;
                }
                Err(Stop::Ended(Disconnect::WaitReadAhead)) => {
                    buffers.out.extend_from_slice(protocol::SENT_WHILE_WAITING);
                    offer(stream, &buffers.out[buffers.written..]).await;
                    return Disconnect::WaitReadAhead;
                }
                Err(Stop::LineTooLong) => {
                    session.core().cell().invalid_commands.add(1);
                    buffers.out.extend_from_slice(protocol::LINE_TOO_LONG);
                    finish(stream, &mut buffers, &limits).await;
                    return Disconnect::LineTooLong;
                }
                Err(Stop::Gone) if session.closed_by_auth() => {
                    finish(stream, &mut buffers, &limits).await;
                    return Disconnect::AuthFailures;
                }
                Err(Stop::Gone) => return Disconnect::gone(core),
                Err(Stop::Frozen) => {
                    let timers = Timers::of(&idle, &unfinished);
                    return stop_for_upgrade(&mut buffers, eof, timers, left);
                }
                Err(Stop::Ended(reason)) => return reason,
            };
            unfinished.after_batch(&buffers);
            buffers.busy = more;
            if more {
                // Its turn is over: the other connections of this thread have theirs.
                tokio::task::yield_now().await;
            }
        }
        // A listing the client asked for is served at its pace, and so are the commands it
        // pipelined behind it; but a client that keeps sending while its replies pile up
        // unread is not reading them: cut it off.
        let backlogged = buffers.unsent() > limits.max_unsent;
        if backlogged && buffers.input.pending() > read_ahead {
            return Disconnect::UnsentLimit;
        }
        let freezing = core.conns.is_freezing();
        if freezing && S::CARRIED && !session.closed_by_auth() {
            let timers = Timers::of(&idle, &unfinished);
            return stop_for_upgrade(&mut buffers, eof, timers, left);
        }
        // A connection a live upgrade does not carry ends as at shutdown, once it has answered
        // what it read.
        if !more && (eof || core.is_closing() || freezing) {
            if eof && buffers.input.pending() > 0 {
                // A last line without a newline still counts (the original answered it too).
                let last = buffers.input.take_rest();
                if session
                    .run_line(&last, &mut buffers.out, &mut NoWatch)
                    .await
                    .is_err()
                    || session.flush(&mut buffers.out).await.is_err()
                {
                    if !session.closed_by_auth() {
                        return Disconnect::gone(core);
                    }
                    finish(stream, &mut buffers, &limits).await;
                    return Disconnect::AuthFailures;
                }
            }
            finish(stream, &mut buffers, &limits).await;
            return if eof {
                Disconnect::Eof
            } else {
                Disconnect::Shutdown
            };
        }

        // While replies pile up, input is still read (up to the read-ahead) to see whether the
        // client keeps sending; otherwise only once the lines read so far have run.
        let want_read = !eof && (backlogged || !more) && buffers.input.pending() <= read_ahead;
        let mut stopping = pin!(core.conns.stopping());
        let event = std::future::poll_fn(|cx| {
            let mut event = Event::default();
            match buffers.poll_write_out(stream, cx) {
                Ok(true) => {
                    if let (Some(timer), Some(d)) = (stall.as_mut(), limits.write_timeout) {
                        timer.as_mut().reset(deadline_in(d));
                    }
                }
                Ok(false) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if buffers.unsent() == 0 {
                stall = None;
            } else if stall.is_none() {
                stall = limits
                    .write_timeout
                    .map(|d| Box::pin(tokio::time::sleep(d)));
            }
            if want_read {
                let room = if buffers.pipelining {
                    LARGE_READ
                } else {
                    SMALL_READ
                };
                let input = buffers.input.buffer_mut();
                if input.capacity() - input.len() < room / 2 {
                    input.reserve(room);
                }
                let spare = input.capacity() - input.len();
                match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, input) {
                    Poll::Ready(Ok(0)) => event.eof = true,
                    Poll::Ready(Ok(n)) => {
                        // A read that fills the room it had means more is coming.
                        buffers.pipelining |= n == spare;
                        event.read = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            event.closing = stopping.as_mut().poll(cx).is_ready();
            event.idle = poll_timer(&mut idle, cx);
            event.stalled = poll_timer(&mut stall, cx);
            event.unfinished = poll_timer(&mut unfinished.timer, cx);
            event.doomed = buffers.meter.poll_doomed(cx);
            let any = event.doomed
                || event.read
                || event.eof
                || event.closing
                || event.idle
                || event.stalled
                || event.unfinished;
            let can_run = more && buffers.unsent() <= limits.max_unsent;
            if any || can_run {
                Poll::Ready(Ok(event))
            } else {
                Poll::Pending
            }
        })
        .await;
        let event = match event {
            Ok(event) => event,
            // Reset, broken pipe…: the client is gone.
            Err(e) => return Disconnect::from_io(&e),
        };
        if event.doomed {
            return over_budget(stream, &mut buffers).await;
        }
        buffers.report();
        if event.stalled {
            return Disconnect::WriteTimeout;
        }
        if event.idle {
            finish(stream, &mut buffers, &limits).await;
            return Disconnect::Idle;
        }
        if event.unfinished && !event.read && unfinished.expired(&buffers) {
            // Not an invalid command (it never arrived): the replies so far go out, then the
            // connection closes.
            finish(stream, &mut buffers, &limits).await;
            return Disconnect::LineTimeout;
        }
        if event.read {
            if let (Some(timer), Some(d)) = (idle.as_mut(), limits.idle_timeout) {
                timer.as_mut().reset(deadline_in(d));
            }
        }
        eof |= event.eof;
        more |= event.read;
    }
}

/// Closes a connection for `--max-client-buffers`: its buffers' memory goes back at once (the
/// point of closing it), and it is offered `0 Client Buffers Full` if its socket takes it now.
async fn over_budget<S: AsyncWrite + Unpin>(stream: &mut S, buffers: &mut Buffers) -> Disconnect {
    buffers.release();
    offer(stream, protocol::CLIENT_BUFFERS_FULL).await;
    Disconnect::ClientBuffers
}

/// Writes what the stream takes of `bytes` at once, without waiting: a last word to a client
/// being closed, which may not be reading.
async fn offer<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
    std::future::poll_fn(|cx| {
        let _ = Pin::new(&mut *stream).poll_write(cx, bytes);
        let _ = Pin::new(&mut *stream).poll_flush(cx);
        Poll::Ready(())
    })
    .await;
}

/// Writes what is left of the replies (bounded by the write timeout); [`serve`] closes the
/// stream once the connection is counted gone.
async fn finish<S: AsyncWrite + Unpin>(stream: &mut S, buffers: &mut Buffers, limits: &ConnLimits) {
    let rest = &buffers.out[buffers.written..];
    let write = stream.write_all(rest);
    match limits.write_timeout {
        Some(limit) => {
            let _ = tokio::time::timeout(limit, write).await;
        }
        None => {
            let _ = write.await;
        }
    }
}
