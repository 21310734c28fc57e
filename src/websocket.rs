//! A websocket client (`ws://HOST:PORT/`, any path): each text or binary message carries one
//! command (or several, newline-separated, answered one by one in order), and each reply is one
//! message with exactly the bytes a TCP client would get, a multi-line reply (`d`, `q`, `who`…)
//! in one message. An empty listing is an empty message, so every command gets a message back.
//!
//! The commands run through the same [`Session`] as TCP ones, on a shard thread like any other
//! connection, so the locks, replies and stats are the same whichever door a client used.

use crate::peer::Peer;
use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::client_buffers::BufferMeter;
use crate::connection::{
    Carry, Disconnect, Farewell, MAX_BATCH, TURN_REPLY_BYTES, WAIT_READ_AHEAD,
};
use crate::framer::{LineFramer, LineTooLong};
use crate::lifecycle::{Admission, Carried};
use crate::protocol;
use crate::session::{PeerWatch, Session, Step};
use crate::shard::ShardCore;
use crate::upgrade::ConnDoor;

mod frames;

use frames::Unread;

/// The websocket over a client's stream that notes when bytes of a message not yet complete
/// began to arrive, for `--line-timeout`, and keeps what the library has not handed out, for
/// a live upgrade.
type Ws = WebSocketStream<Marked>;

/// A client's byte stream, plain TCP or TLS.
trait ByteStream: AsyncRead + AsyncWrite + Unpin {
    /// The socket, for a live upgrade to carry (None for a TLS stream, which is not carried).
    fn into_fd(self: Box<Self>) -> Option<std::os::fd::OwnedFd>;
}

impl<S: AsyncRead + AsyncWrite + Unpin + Carry> ByteStream for S {
    fn into_fd(self: Box<Self>) -> Option<std::os::fd::OwnedFd> {
        (*self).carry().map(|(fd, _)| fd)
    }
}

/// A client's stream that remembers when it was first read from since the last complete
/// message (the caller clears [`Marked::since`] after each one), so that a message left
/// unfinished can be timed without a timer per message; how much was read, so that what is
/// read behind a waiting command is bounded; and, for a connection a live upgrade carries,
/// the bytes the library holds of messages not yet handed out (also what is counted against
/// `--max-client-buffers`), and the replies written while the upgrade stops the connection.
struct Marked {
    /// The client's connection. Boxed rather than generic, so the websocket code exists once
    /// whatever the stream: one call through a pointer per read or write is nothing beside the
    /// framing of a websocket message.
    stream: Box<dyn ByteStream>,
    /// When the first bytes after the last complete message were read.
    since: Cell<Option<Instant>>,
    /// Bytes read so far.
    read: Cell<u64>,
    /// `read` when the last complete message was taken.
    taken: Cell<u64>,
    /// What the client sent that the library has not handed out as messages yet.
    unread: Unread,
    /// Set for a connection a live upgrade carries: while the upgrade stops this thread's
    /// connections, what the library writes is kept in `held` instead of waiting for a client
    /// that may not read, so that it is carried with the connection.
    carried: Option<Rc<ShardCore>>,
    /// Reply bytes kept for a live upgrade, or carried by one: written before anything else.
    held: Vec<u8>,
    /// How much of `held` is written.
    held_written: usize,
}

impl Marked {
    fn new(stream: Box<dyn ByteStream>, carried: Option<Rc<ShardCore>>, unread: Unread) -> Self {
        Marked {
            stream,
            since: Cell::new(None),
            read: Cell::new(0),
            taken: Cell::new(0),
            unread,
            carried,
            held: Vec::new(),
            held_written: 0,
        }
    }

    /// Bytes read and not yet handed out as a complete message: what the library buffers,
    /// and, for a connection a live upgrade would carry, the copy kept of them.
    fn unfinished(&self) -> usize {
        if self.carried.is_some() {
            return self.unread.len() * 2;
        }
        usize::try_from(self.read.get() - self.taken.get()).unwrap_or(usize::MAX)
    }

    /// A complete message was handed out: its bytes are no longer the library's.
    fn took_message(&mut self) {
        self.since.set(None);
        self.taken.set(self.read.get());
        self.unread.handed_out();
    }

    /// Whether writes are kept for a live upgrade now.
    fn keeps_writes(&self) -> bool {
        // Never during the handshake: its response must reach the client now (a handshake is
        // not carried; it waits for the upgrade's outcome).
        !self.unread.in_handshake()
            && self
                .carried
                .as_ref()
                .is_some_and(|core| core.conns.is_freezing())
    }

    /// Writes what was kept back, before anything newer.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.held_written < self.held.len() {
            let rest = &self.held[self.held_written..];
            match Pin::new(&mut self.stream).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.held_written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !self.held.is_empty() {
            self.held = Vec::new();
            self.held_written = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Marked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        let got = &buf.filled()[before..];
        if !got.is_empty() {
            this.read.set(this.read.get() + got.len() as u64);
            if this.since.get().is_none() {
                this.since.set(Some(Instant::now()));
            }
            if this.carried.is_some() {
                this.unread.record(got);
            }
        }
        read
    }
}

impl AsyncWrite for Marked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.keeps_writes() {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        if let Err(e) = ready!(this.poll_write_held(cx)) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.keeps_writes() {
            return Poll::Ready(Ok(()));
        }
        if let Err(e) = ready!(this.poll_write_held(cx)) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = ready!(this.poll_write_held(cx)) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

/// Why no message came.
enum NoMessage {
    /// A message was left unfinished for `--line-timeout`.
    Unfinished,
    /// The connection is closed for `--max-client-buffers`.
    OverBudget,
}

/// The next message from the client. A timer is armed only once bytes of an unfinished
/// message have arrived; if the message is still unfinished `limit` after its first bytes,
/// the answer is [`NoMessage::Unfinished`]. While it arrives, what the library buffers of it
/// is reported to `meter` (on top of `held`, what the connection's own buffers hold).
async fn next_message(
    ws: &mut Ws,
    limit: Option<Duration>,
    since: Option<Instant>,
    meter: &mut BufferMeter,
    held: usize,
) -> Result<Option<Result<Message, WsError>>, NoMessage> {
    // Bytes read before this call (while a command waited, into the stash) start no clock:
    // timing restarts with the next read, which errs on the client's side. (A connection
    // carried by a live upgrade goes on with the clock of the message it was receiving.)
    ws.get_ref().since.set(since);
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    let next = std::future::poll_fn(|cx| {
        if let Poll::Ready(message) = ws.poll_next_unpin(cx) {
            return Poll::Ready(Ok(message));
        }
        meter.report(held + ws.get_ref().unfinished());
        if meter.poll_doomed(cx) {
            return Poll::Ready(Err(NoMessage::OverBudget));
        }
        let (Some(limit), Some(since)) = (limit, ws.get_ref().since.get()) else {
            return Poll::Pending;
        };
        let timer = timer.get_or_insert_with(|| {
            let deadline = since.checked_add(limit).unwrap_or(since);
            Box::pin(tokio::time::sleep_until(deadline))
        });
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(NoMessage::Unfinished)),
            Poll::Pending => Poll::Pending,
        }
    });
    let message = next.await;
    // Complete: the next message's time starts with its first bytes. (Bytes of it already
    // read along with this one are at most one read, and are timed from the next read.)
    if let Ok(Some(Ok(_))) = &message {
        ws.get_mut().took_message();
    } else {
        ws.get_ref().since.set(None);
    }
    message
}

/// What the library's read buffer starts at, and reads at most at a time (it grows for a bigger
/// message): about what an idle TCP connection's buffers cost.
const WS_READ_BUFFER: usize = 4096;

/// A buffer left with more room than this after a message goes back to nothing.
const KEEP_CAPACITY: usize = 16 * 1024;

/// Reply bytes the library queues before it writes them (every flush writes too).
const WS_WRITE_BUFFER: usize = 16 * 1024;

/// Messages kept while a command waits (`gw`); one more ends the connection, as more than
/// [`WAIT_READ_AHEAD`] bytes read meanwhile do (see there: the connection is read while it
/// waits, so that a client that leaves is seen leaving).
const STASH: usize = 64;

/// Watches a websocket while a command waits: messages that arrive are kept for later (up to
/// [`STASH`] of them and [`WAIT_READ_AHEAD`] bytes), and a close frame, a dropped connection
/// or an error means the client is gone.
struct WsWatch<'a> {
    ws: &'a mut Ws,
    stash: &'a mut VecDeque<Message>,
    /// Bytes read from the connection when the wait began.
    read_before: u64,
    /// Tells when the connection is closed for `--max-client-buffers`.
    meter: &'a BufferMeter,
    /// Why the connection ends, when the watch ended it for a reason of its own.
    ended: Option<Disconnect>,
}

impl PeerWatch for WsWatch<'_> {
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.meter.poll_doomed(cx) {
            self.ended = Some(Disconnect::ClientBuffers);
            return Poll::Ready(());
        }
        loop {
            let read = self.ws.get_ref().read.get() - self.read_before;
            if self.stash.len() > STASH || read > WAIT_READ_AHEAD as u64 {
                self.ended = Some(Disconnect::WaitReadAhead);
                return Poll::Ready(());
            }
            match self.ws.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(Message::Close(_)))) | Poll::Ready(None) => {
                    return Poll::Ready(())
                }
                Poll::Ready(Some(Err(e))) => {
                    self.ended = Some(ended_by(&e));
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(message))) => {
                    self.ws.get_mut().took_message();
                    self.stash.push_back(message);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The library's settings for a connection.
fn ws_config(limits: &crate::config::ConnLimits) -> WebSocketConfig {
    // Replies are flushed, at the client's pace, whenever more than --max-unsent-bytes of them
    // are buffered (and after every message), so the library's own cap on its write buffer
    // would only refuse a listing bigger than that: leave it unbounded. (It must also exceed
    // the library's write buffer size, or every connection panics.) A message may carry many
    // commands, each line bounded by --max-line-bytes as over TCP; the message as a whole by
    // the larger of that and --max-unsent-bytes.
    let max_message = max_message(limits);
    // The library's read buffer starts (and reads) at WS_READ_BUFFER bytes and grows only for a
    // bigger message; replies are written once WS_WRITE_BUFFER bytes of them are queued, or at
    // every flush. Its defaults (128 KiB each) made an idle websocket cost forty times an idle
    // TCP connection.
    WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
        .max_write_buffer_size(usize::MAX)
}

/// The largest message (and frame) a client may send.
fn max_message(limits: &crate::config::ConnLimits) -> usize {
    limits.max_line.max(limits.max_unsent)
}

/// Serves one websocket connection, over plain TCP or TLS, until it closes.
pub async fn serve<S>(core: Rc<ShardCore>, stream: S, id: String, admission: Admission, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin + Carry + 'static,
{
    let config = &core.server.config;
    let limits = config.conn_limits();
    let allowed: Vec<String> = config.allowed_origins().map(str::to_owned).collect();
    // The error type is the handshake library's own HTTP response; its size is not ours to
    // choose, and it is built at most once per connection.
    #[allow(clippy::result_large_err)]
    let check_origin = move |request: &Request, response: Response| {
        origin_allowed(&allowed, request)
            .then_some(response)
            .ok_or_else(forbidden)
    };
    // Only a plain TCP websocket is carried by a live upgrade (a TLS one is closed, as TLS
    // connections are): only its bytes are followed.
    let carried = S::CARRIED.then(|| core.clone());
    let unread = Unread::new(max_message(&limits));
    let stream = Marked::new(Box::new(stream), carried, unread);
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        check_origin,
        Some(ws_config(&limits)),
    );
    // Until the handshake is done the client holds a connection place without being one:
    // --ws-handshake-timeout bounds how long. (Boxed: its state, gone once it is done, would
    // otherwise size the connection's future for its whole life.)
    let handshake = Box::pin(tokio::time::timeout(limits.ws_handshake_timeout, handshake));
    let mut ws = match handshake.await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            if config.verbose {
                tracing::info!(
                    event = "handshake_failed",
                    conn = %id,
                    error = %e
                );
            }
            return;
        }
        Err(_) => {
            if config.verbose {
                tracing::info!(event = "handshake_failed", conn = %id, error = "timed out");
            }
            return;
        }
    };
    // The handshake's bytes were no message; frames sent right behind them are.
    let marked = ws.get_mut();
    marked.since.set(None);
    marked.taken.set(marked.read.get());
    marked.unread.handshake_done();
    while core.conns.is_freezing() {
        // A live upgrade is stopping this thread, and counted the connections to stop before
        // this one was one: it waits for the outcome. Called off, it is served here; done, it
        // closes with this process.
        core.conns.accept_changed().await;
    }
    let farewell = Farewell::new(&core, &id);
    let mut session = Some(new_session(&core, id, admission, peer, S::CARRIED));
    let mut left = Left::default();
    if serve_session(&core, &mut ws, &mut session, farewell, None, &mut left).await {
        if let Some(session) = session {
            hand_over(&core, ws, session, left);
        }
    }
}

/// A new connection's session (made apart, so that a connection's future does not keep room
/// for it besides the one in [`serve_session`]).
fn new_session(
    core: &Rc<ShardCore>,
    id: String,
    admission: Admission,
    peer: Peer,
    carriable: bool,
) -> Session {
    let mut session = Session::new(core.clone(), id, admission, peer);
    session.set_carriable(carriable);
    session
}

/// Serves a websocket connection carried by a live upgrade, from where it was stopped.
pub fn resume(
    core: Rc<ShardCore>,
    stream: tokio::net::TcpStream,
    carried: Carried,
) -> impl Future<Output = ()> {
    let limits = core.server.config.conn_limits();
    let Carried {
        image,
        answer,
        quota,
        admission,
    } = carried;
    let farewell = Farewell::new(&core, &image.id_text);
    let session = Session::resume(core.clone(), &image, quota, admission, Peer::websocket());
    // What the library had not handed out goes to the new one as if just read; the replies
    // that were not written go out first.
    let unread = Unread::carried(max_message(&limits), &image.input);
    let mut marked = Marked::new(Box::new(stream), Some(core.clone()), unread);
    marked.held = image.output;
    // Ready at once: there is no handshake to do.
    let ws = futures_util::FutureExt::now_or_never(WebSocketStream::from_partially_read(
        marked,
        image.input,
        Role::Server,
        Some(ws_config(&limits)),
    ));
    let ms = |ms: u64| Duration::from_millis(ms);
    let start = Start {
        answer,
        idle_left: image.idle_left_ms.map(ms),
        unfinished_for: image.unfinished_ms.map(ms),
    };
    let start = Some(Box::new(start));
    let mut session = Some(session);
    let mut left = Left::default();
    // A block, not a function: it keeps what it captures once, where a function's arguments
    // would be kept twice.
    let mut ws = ws;
    async move {
        let Some(stream) = ws.as_mut() else {
            tracing::warn!(
                event = "resume_failed",
                "could not serve a carried websocket"
            );
            return;
        };
        if serve_session(&core, stream, &mut session, farewell, start, &mut left).await {
            if let (Some(ws), Some(session)) = (ws, session) {
                hand_over(&core, ws, session, left);
            }
        }
    }
}

/// Where a carried connection starts again.
struct Start {
    /// The answer of the wait it was in.
    answer: Option<tokio::sync::oneshot::Receiver<protocol::Reply>>,
    /// Time left of its `--idle-timeout` when it was waiting for a message.
    idle_left: Option<Duration>,
    /// How long the message it was receiving had been on its way (`--line-timeout`).
    unfinished_for: Option<Duration>,
}

/// What a connection stopped for a live upgrade leaves besides its stream: the lines of a
/// message not run yet, the messages read while a command waited, and its clocks.
#[derive(Default)]
struct Left {
    lines: Vec<u8>,
    stash: VecDeque<Message>,
    idle_left: Option<Duration>,
    unfinished_for: Option<Duration>,
}

/// Serves a connection until it ends. True if it ended stopped for a live upgrade: its
/// session is left in `slot` and what it leaves in `left`, for [`hand_over`]. (Everything is
/// borrowed from the caller, so that a connection's future holds each thing once.)
async fn serve_session(
    core: &Rc<ShardCore>,
    ws: &mut Ws,
    slot: &mut Option<Session>,
    farewell: Farewell,
    start: Option<Box<Start>>,
    left: &mut Left,
) -> bool {
    let Some(session) = slot.as_mut() else {
        return false;
    };
    let reason = run(core, ws, session, start, left).await;
    if reason == Disconnect::HandedOver {
        farewell.say(reason);
        return true;
    }
    // Not carried after all: what was kept back for a live upgrade is the client's last words.
    let marked = ws.get_mut();
    marked.carried = None;
    let kept = marked.held.len() > marked.held_written;
    if let Some(why) = reason.close_reason() {
        core.cell().closed_because(why);
    }
    // Said before the session goes (and with it the connection's locks), so the disconnect
    // line comes before the orphan lines.
    farewell.say(reason);
    // Counted closed before the client can see the close (see `connection::serve`).
    *slot = None;
    if kept && !reason.is_clean() {
        // Offered if the socket takes it now (a clean ending writes it before its close frame).
        let _ = futures_util::FutureExt::now_or_never(ws.flush());
    }
    // A clean ending gets a close frame; a broken or stalled connection would not take it.
    if reason.is_clean() {
        let limits = core.server.config.conn_limits();
        // The sink's close: it answers a close frame the client sent (and sends ours otherwise).
        let close = SinkExt::close(ws);
        let _ = tokio::time::timeout(
            limits.write_timeout.unwrap_or(limits.ws_handshake_timeout),
            close,
        )
        .await;
    }
    false
}

/// Hands a connection stopped for a live upgrade to it: its socket; as its input, the lines
/// and messages it had read but not run (as frames) followed by the bytes the library had
/// not handed out; as its output, the frames not written.
fn hand_over(core: &Rc<ShardCore>, mut ws: Ws, session: Session, left: Left) {
    // Whatever the library still has to write goes into the kept bytes at once (the writes
    // are kept while the upgrade stops the thread).
    let flushed = futures_util::FutureExt::now_or_never(ws.flush());
    let mut marked = ws.into_inner();
    if !matches!(flushed, Some(Ok(()))) {
        // Cannot happen while writes are kept; were it to, the connection closes.
        tracing::warn!(
            event = "carry_failed",
            "could not carry a websocket connection"
        );
        return;
    }
    let mut input = Vec::new();
    if !left.lines.is_empty() {
        frames::push_message(&mut input, &left.lines);
    }
    for message in &left.stash {
        if let Message::Text(_) | Message::Binary(_) = message {
            frames::push_message(&mut input, &message.clone().into_data());
        }
    }
    input.extend_from_slice(&marked.unread.take());
    let output = marked.held.split_off(marked.held_written);
    let Some(fd) = marked.stream.into_fd() else {
        tracing::warn!(
            event = "carry_failed",
            "could not carry a websocket connection"
        );
        return;
    };
    let left = crate::connection::Left {
        input,
        output,
        eof: false,
        pipelining: false,
        timers: crate::connection::Timers {
            idle_left: left.idle_left,
            unfinished_for: left.unfinished_for,
        },
    };
    crate::connection::hand_over(core, fd, ConnDoor::Ws, session, left);
}

/// Runs a websocket connection's messages until it ends, and says why.
async fn run(
    core: &Rc<ShardCore>,
    ws: &mut Ws,
    session: &mut Session,
    start: Option<Box<Start>>,
    left: &mut Left,
) -> Disconnect {
    let limits = core.server.config.conn_limits();
    let write_timeout = limits.write_timeout;
    let idle_timeout = limits.idle_timeout;
    let carried = ws.get_ref().carried.is_some();
    // Each line of a message is bounded as over TCP; a message ends its last line as end of
    // input would (one more byte for the newline added then).
    let mut lines = LineFramer::new(limits.max_line.saturating_add(1));
    let mut out = Vec::new();
    // Reply bytes handed to the library since it last flushed them to the client.
    let mut unflushed = 0usize;
    let mut stash: VecDeque<Message> = VecDeque::new();
    let mut meter = core.server.client_buffers.meter(core.id);
    // Lines run, and reply bytes made, since the connection last let the others have a turn.
    let mut turn_lines = 0usize;
    let mut turn_bytes = 0usize;
    // A carried connection's clocks go on where they stood.
    // A carried connection's clocks go on where they stood. (Boxed: only carried
    // connections start so, and every connection's future would otherwise keep room for it.)
    let (mut idle_left, mut unfinished_since) = (None, None);
    if let Some(start) = start {
        let started = Box::pin(resume_start(core, ws, session, *start, &mut stash, &meter));
        match started.await {
            Ok((idle, since)) => (idle_left, unfinished_since) = (idle, since),
            Err(reason) => {
                left.stash = std::mem::take(&mut stash);
                return reason;
            }
        }
    }
    loop {
        if carried && core.conns.is_freezing() {
            // Stopped for a live upgrade, between two messages.
            left.stash = std::mem::take(&mut stash);
            return Disconnect::HandedOver;
        }
        // Shutting down (or a live upgrade, which does not carry a TLS websocket): what the
        // client sent already, messages read while a command waited included, is answered
        // first.
        if (core.is_closing() || core.conns.is_freezing()) && stash.is_empty() {
            return Disconnect::Shutdown;
        }
        // What the connection's own buffers hold; `next_message` adds what the library holds
        // of a message on its way.
        let held = stash.iter().map(Message::len).sum::<usize>()
            + lines.capacity()
            + out.capacity()
            + unflushed;
        meter.report(held);
        let stashed = stash.pop_front();
        let meter = &mut meter;
        let idle_limit = idle_left.take().or(idle_timeout);
        let waiting_since = Instant::now();
        let since = unfinished_since.take();
        let next = async {
            if let Some(message) = stashed {
                return Ok(Some(Ok(message)));
            }
            let next = next_message(ws, limits.line_timeout, since, meter, held);
            let why = |no: NoMessage| match no {
                NoMessage::Unfinished => Disconnect::LineTimeout,
                NoMessage::OverBudget => Disconnect::ClientBuffers,
            };
            match idle_limit {
                Some(limit) => tokio::time::timeout(limit, next)
                    .await
                    .map_err(|_| Disconnect::Idle)?
                    .map_err(why),
                None => next.await.map_err(why),
            }
        };
        let message = tokio::select! {
            biased;
            message = next => message,
            _ = core.conns.stopping() => {
                if carried && core.conns.is_freezing() {
                    // Stopped for a live upgrade while it waited for a message: the clocks
                    // of that wait go with it.
                    left.idle_left =
                        idle_limit.map(|limit| limit.saturating_sub(waiting_since.elapsed()));
                    left.unfinished_for = ws.get_ref().since.get().map(|since| since.elapsed());
                    return Disconnect::HandedOver;
                }
                return Disconnect::Shutdown;
            }
        };
        let data = match message {
            Err(Disconnect::ClientBuffers) => {
                offer(ws, protocol::CLIENT_BUFFERS_FULL).await;
                return Disconnect::ClientBuffers;
            }
            Err(reason) => return reason,
            Ok(Some(Ok(Message::Text(text)))) => bytes::Bytes::from(text),
            Ok(Some(Ok(Message::Binary(data)))) => data,
            // Pings are answered by the library with the next write or read.
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => continue,
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => return Disconnect::Eof,
            Ok(Some(Err(WsError::Capacity(_)))) => {
                session.core().cell().invalid_commands.add(1);
                let reply = text_reply(protocol::LINE_TOO_LONG);
                let _ = send(ws, reply, write_timeout).await;
                return Disconnect::LineTooLong;
            }
            Ok(Some(Err(WsError::Utf8(_)))) => {
                session.core().cell().invalid_commands.add(1);
                let reply = text_reply(protocol::TEXT_NOT_UTF8);
                let _ = send(ws, reply, write_timeout).await;
                return Disconnect::BadText;
            }
            Ok(Some(Err(e))) => return ended_by(&e),
        };
        let started = session.measures_latency().then(std::time::Instant::now);
        lines.extend(&data);
        if !data.ends_with(b"\n") {
            lines.extend(b"\n");
        }
        loop {
            if carried && lines.pending() > 0 && core.conns.is_freezing() {
                // Stopped for a live upgrade between two lines of a message: the rest of
                // them go with it.
                left.lines = lines.take_rest().to_vec();
                left.stash = std::mem::take(&mut stash);
                return Disconnect::HandedOver;
            }
            let line = match lines.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(LineTooLong) => {
                    // The lines before it were answered; refuse this one and close, as over TCP.
                    session.core().cell().invalid_commands.add(1);
                    let reply = text_reply(protocol::LINE_TOO_LONG);
                    let _ = send(ws, reply, write_timeout).await;
                    return Disconnect::LineTooLong;
                }
            };
            if protocol::trim(line).is_empty() {
                continue; // a blank line gets nothing, as over TCP
            }
            out.clear();
            if let Step::Later(request) = session.step(line, &mut out) {
                if matches!(request, protocol::Request::Wait { .. }) {
                    // The replies before a wait go out before it waits, not after.
                    if let Err(reason) = flush(core, ws, write_timeout).await {
                        return reason;
                    }
                    unflushed = 0;
                }
                let read_before = ws.get_ref().read.get();
                let mut watch = WsWatch {
                    ws: &mut *ws,
                    stash: &mut stash,
                    read_before,
                    meter: &*meter,
                    ended: None,
                };
                let ran = session.run_later_boxed(request, &mut out, &mut watch).await;
                let ended = watch.ended;
                if ran.is_err() {
                    if session.is_parked() {
                        // Stopped for a live upgrade in its wait: the wait, the lines behind
                        // it and what the client sent meanwhile go with it.
                        left.lines = lines.take_rest().to_vec();
                        left.stash = std::mem::take(&mut stash);
                        return Disconnect::HandedOver;
                    }
                    return waited_out(core, ws, session, &out, ended, write_timeout).await;
                }
            }
            if session.flush(&mut out).await.is_err() {
                return Disconnect::gone(core);
            }
            unflushed += out.len();
            let fed = or_freeze(core, ws.feed(reply_message(&out)));
            let fed = match write_timeout {
                Some(limit) => match tokio::time::timeout(limit, fed).await {
                    Ok(fed) => fed,
                    // A reader stalled for --write-timeout.
                    Err(_) => return Disconnect::WriteTimeout,
                },
                None => fed.await,
            };
            if let Err(e) = fed {
                return ended_by(&e);
            }
            if unflushed > limits.max_unsent {
                // Replies piled up: the client gets them at its pace before any more run.
                if let Err(reason) = flush(core, ws, write_timeout).await {
                    return reason;
                }
                unflushed = 0;
            }
            turn_lines += 1;
            turn_bytes += out.len();
            if turn_lines >= MAX_BATCH || turn_bytes >= TURN_REPLY_BYTES {
                // Its turn is over (as over TCP): the other connections of this thread have
                // theirs, with any mail that came in meanwhile.
                turn_lines = 0;
                turn_bytes = 0;
                core.pause().await;
            }
        }
        lines.compact();
        core.check_mail();
        if let Some(started) = started {
            session.record_latency(started.elapsed());
        }
        if let Err(reason) = flush(core, ws, write_timeout).await {
            return reason;
        }
        unflushed = 0;
        // A big message or listing does not leave the connection holding its peak memory (nor
        // counted against --max-client-buffers for it).
        lines.shrink_if_empty(KEEP_CAPACITY);
        if out.capacity() > KEEP_CAPACITY {
            out = Vec::new();
        }
    }
}

/// Starts a carried connection again: writes the replies it had not read, then finishes the
/// wait it was in. Its clocks (the idle time left, when its unfinished message began) if it
/// goes on; why it ends (or `HandedOver`, stopped again) if not.
async fn resume_start(
    core: &Rc<ShardCore>,
    ws: &mut Ws,
    session: &mut Session,
    start: Start,
    stash: &mut VecDeque<Message>,
    meter: &BufferMeter,
) -> Result<(Option<Duration>, Option<Instant>), Disconnect> {
    let write_timeout = core.server.config.conn_limits().write_timeout;
    let since = start
        .unfinished_for
        .and_then(|d| Instant::now().checked_sub(d));
    let marked = ws.get_ref();
    if marked.held.len() > marked.held_written {
        // The replies it had not read go out first: it may be waiting for them.
        flush(core, ws, write_timeout).await?;
    }
    if let Some(answer) = start.answer {
        let mut out = Vec::new();
        let mut watch = WsWatch {
            read_before: ws.get_ref().read.get(),
            ws: &mut *ws,
            stash,
            meter,
            ended: None,
        };
        let waited = session.resume_wait(answer, &mut out, &mut watch).await;
        let ended = watch.ended;
        if waited.is_err() {
            if session.is_parked() {
                return Err(Disconnect::HandedOver);
            }
            return Err(waited_out(core, ws, session, &out, ended, write_timeout).await);
        }
        send(ws, reply_message(&out), write_timeout).await?;
    }
    Ok((start.idle_left, since))
}

/// Why a connection ends whose wait ended without an answer (the client left, or was cut off
/// for its buffers, or for its failed `auth`s, or shutdown came), after its last word.
async fn waited_out(
    core: &ShardCore,
    ws: &mut Ws,
    session: &Session,
    out: &[u8],
    ended: Option<Disconnect>,
    write_timeout: Option<Duration>,
) -> Disconnect {
    if session.closed_by_auth() {
        let text = String::from_utf8_lossy(out).into_owned();
        let _ = send(ws, Message::text(text), write_timeout).await;
        return Disconnect::AuthFailures;
    }
    match ended {
        Some(Disconnect::ClientBuffers) => {
            offer(ws, protocol::CLIENT_BUFFERS_FULL).await;
            Disconnect::ClientBuffers
        }
        Some(Disconnect::WaitReadAhead) => {
            offer(ws, protocol::SENT_WHILE_WAITING).await;
            Disconnect::WaitReadAhead
        }
        Some(reason) if !core.is_closing() => reason,
        _ => Disconnect::gone(core),
    }
}

/// A reply as one message: text, or binary when it is not UTF-8 (lock names are bytes).
fn reply_message(out: &[u8]) -> Message {
    match std::str::from_utf8(out) {
        Ok(text) => Message::text(text),
        Err(_) => Message::binary(out.to_vec()),
    }
}

/// Runs a write to the client; if a live upgrade starts stopping this thread meanwhile, the
/// write goes on into the bytes kept for it (see [`Marked`]) instead of waiting for a client
/// that may not read. (A connection that is not carried keeps waiting, as at shutdown.)
async fn or_freeze<F: Future>(core: &ShardCore, write: F) -> F::Output {
    let mut write = std::pin::pin!(write);
    tokio::select! {
        biased;
        done = &mut write => return done,
        _ = core.conns.stopping() => {}
    }
    write.await
}

/// Whether the request's `Origin` is allowed. Browsers always send one; a request without it
/// comes from a program, which the allow-list (a defence against cross-site pages) does not
/// concern.
fn origin_allowed(allowed: &[String], request: &Request) -> bool {
    if allowed.is_empty() {
        return true;
    }
    match request.headers().get("origin") {
        None => true,
        Some(origin) => origin
            .to_str()
            .is_ok_and(|origin| allowed.iter().any(|a| a == origin)),
    }
}

fn forbidden() -> ErrorResponse {
    let mut response = ErrorResponse::new(Some("origin not allowed\n".to_owned()));
    *response.status_mut() = StatusCode::FORBIDDEN;
    response
}

/// Why the connection ends after a websocket error.
fn ended_by(error: &WsError) -> Disconnect {
    match error {
        WsError::Io(e) => Disconnect::from_io(e),
        WsError::ConnectionClosed | WsError::AlreadyClosed => Disconnect::Eof,
        // The client closed its TCP connection without a close frame: an end like any other
        // (a script that exits), not a broken rule.
        WsError::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => Disconnect::Eof,
        // A protocol violation, bad UTF-8 in a text message…: the client broke the rules.
        _ => Disconnect::Error(std::io::ErrorKind::InvalidData),
    }
}

/// Sends what is buffered, within the write timeout; why the connection ends if the peer does
/// not take it.
async fn flush(core: &ShardCore, ws: &mut Ws, limit: Option<Duration>) -> Result<(), Disconnect> {
    within(limit, or_freeze(core, ws.flush())).await
}

/// Sends what is buffered, within the write timeout, even while a live upgrade stops the
/// thread (a last word before the connection closes).
async fn flush_out(ws: &mut Ws, limit: Option<Duration>) -> Result<(), Disconnect> {
    within(limit, ws.flush()).await
}

async fn within<F>(limit: Option<Duration>, flush: F) -> Result<(), Disconnect>
where
    F: Future<Output = Result<(), WsError>>,
{
    let flushed = match limit {
        Some(limit) => match tokio::time::timeout(limit, flush).await {
            Ok(flushed) => flushed,
            Err(_) => return Err(Disconnect::WriteTimeout),
        },
        None => flush.await,
    };
    flushed.map_err(|e| ended_by(&e))
}

/// Sends `bytes` as one message if the connection takes it at once, without waiting: a last
/// word to a client being closed, which may not be reading.
/// One of the server's own one-line replies (ASCII) as a text message, as every reply that is
/// text goes (a browser then hands it over as a string, not a blob).
fn text_reply(line: &'static [u8]) -> Message {
    match std::str::from_utf8(line) {
        Ok(text) => Message::text(text),
        Err(_) => Message::binary(line),
    }
}

async fn offer(ws: &mut Ws, bytes: &'static [u8]) {
    let mut send = std::pin::pin!(async {
        let _ = ws.send(text_reply(bytes)).await;
    });
    std::future::poll_fn(|cx| {
        let _ = send.as_mut().poll(cx);
        Poll::Ready(())
    })
    .await;
}

async fn send(ws: &mut Ws, message: Message, limit: Option<Duration>) -> Result<(), Disconnect> {
    ws.feed(message).await.map_err(|e| ended_by(&e))?;
    flush_out(ws, limit).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::error::ProtocolError;

    #[test]
    fn a_tcp_close_without_a_close_frame_is_an_end_not_an_error() {
        let closed = WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake);
        assert_eq!(ended_by(&closed).as_str(), "eof");
        let broken = WsError::Protocol(ProtocolError::NonZeroReservedBits);
        assert_eq!(ended_by(&broken).as_str(), "error");
    }
}
