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
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::client_buffers::BufferMeter;
use crate::connection::{Disconnect, Farewell, MAX_BATCH, TURN_REPLY_BYTES, WAIT_READ_AHEAD};
use crate::framer::{LineFramer, LineTooLong};
use crate::lifecycle::Admission;
use crate::protocol;
use crate::session::{PeerWatch, Session, Step};
use crate::shard::ShardCore;

/// The websocket over a client's stream that notes when bytes of a message not yet complete
/// began to arrive, for `--line-timeout`.
type Ws = WebSocketStream<Marked>;

/// A client's byte stream, plain TCP or TLS.
trait ByteStream: AsyncRead + AsyncWrite + Unpin {}

impl<S: AsyncRead + AsyncWrite + Unpin> ByteStream for S {}

/// A client's stream that remembers when it was first read from since the last complete
/// message (the caller clears [`Marked::since`] after each one), so that a message left
/// unfinished can be timed without a timer per message; and how much was read, so that what
/// the library holds of messages not yet complete is counted against `--max-client-buffers`,
/// and what is read behind a waiting command is bounded.
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
}

impl Marked {
    /// Bytes read and not yet handed out as a complete message: what the library buffers.
    fn unfinished(&self) -> usize {
        usize::try_from(self.read.get() - self.taken.get()).unwrap_or(usize::MAX)
    }

    /// A complete message was handed out: its bytes are no longer the library's.
    fn took_message(&self) {
        self.since.set(None);
        self.taken.set(self.read.get());
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
        let got = buf.filled().len() - before;
        if got > 0 {
            this.read.set(this.read.get() + got as u64);
            if this.since.get().is_none() {
                this.since.set(Some(Instant::now()));
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
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
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
    meter: &mut BufferMeter,
    held: usize,
) -> Result<Option<Result<Message, WsError>>, NoMessage> {
    // Bytes read before this call (while a command waited, into the stash) start no clock:
    // timing restarts with the next read, which errs on the client's side.
    ws.get_ref().since.set(None);
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
    ws.get_ref().took_message();
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
                    self.ws.get_ref().took_message();
                    self.stash.push_back(message);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Serves one websocket connection, over plain TCP or TLS, until it closes.
pub async fn serve<S>(core: Rc<ShardCore>, stream: S, id: String, admission: Admission, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let config = &core.server.config;
    let limits = config.conn_limits();
    // Replies are flushed, at the client's pace, whenever more than --max-unsent-bytes of them
    // are buffered (and after every message), so the library's own cap on its write buffer
    // would only refuse a listing bigger than that: leave it unbounded. (It must also exceed
    // the library's write buffer size, or every connection panics.) A message may carry many
    // commands, each line bounded by --max-line-bytes as over TCP; the message as a whole by
    // the larger of that and --max-unsent-bytes.
    let max_message = limits.max_line.max(limits.max_unsent);
    // The library's read buffer starts (and reads) at WS_READ_BUFFER bytes and grows only for a
    // bigger message; replies are written once WS_WRITE_BUFFER bytes of them are queued, or at
    // every flush. Its defaults (128 KiB each) made an idle websocket cost forty times an idle
    // TCP connection.
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
        .max_write_buffer_size(usize::MAX);
    let allowed: Vec<String> = config.allowed_origins().map(str::to_owned).collect();
    // The error type is the handshake library's own HTTP response; its size is not ours to
    // choose, and it is built at most once per connection.
    #[allow(clippy::result_large_err)]
    let check_origin = move |request: &Request, response: Response| {
        origin_allowed(&allowed, request)
            .then_some(response)
            .ok_or_else(forbidden)
    };
    let stream = Marked {
        stream: Box::new(stream),
        since: Cell::new(None),
        read: Cell::new(0),
        taken: Cell::new(0),
    };
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_origin, Some(ws_config));
    // Until the handshake is done the client holds a connection place without being one:
    // --ws-handshake-timeout bounds how long.
    let mut ws = match tokio::time::timeout(limits.ws_handshake_timeout, handshake).await {
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
    // The handshake's bytes were no message.
    ws.get_ref().took_message();
    if core.conns.is_freezing() {
        return; // a live upgrade is stopping this thread: not carried, closed
    }
    let farewell = Farewell::new(&core, &id);
    let mut session = Session::new(core.clone(), id, admission, peer);
    let reason = run(&core, &mut ws, &mut session).await;
    if let Some(why) = reason.close_reason() {
        core.cell().closed_because(why);
    }
    // Said before the session goes (and with it the connection's locks), so the disconnect
    // line comes before the orphan lines.
    farewell.say(reason);
    // Counted closed before the client can see the close (see `connection::serve`).
    drop(session);
    // A clean ending gets a close frame; a broken or stalled connection would not take it.
    if reason.is_clean() {
        // The sink's close: it answers a close frame the client sent (and sends ours otherwise).
        let close = SinkExt::close(&mut ws);
        let _ = tokio::time::timeout(
            limits.write_timeout.unwrap_or(limits.ws_handshake_timeout),
            close,
        )
        .await;
    }
}

/// Runs a websocket connection's messages until it ends, and says why.
async fn run(core: &Rc<ShardCore>, ws: &mut Ws, session: &mut Session) -> Disconnect {
    let limits = core.server.config.conn_limits();
    let write_timeout = limits.write_timeout;
    let idle_timeout = limits.idle_timeout;
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
    loop {
        // Shutting down (or a live upgrade, which does not carry websockets): what the client
        // sent already, messages read while a command waited included, is answered first.
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
        let next = async {
            if let Some(message) = stashed {
                return Ok(Some(Ok(message)));
            }
            let next = next_message(ws, limits.line_timeout, meter, held);
            let why = |no: NoMessage| match no {
                NoMessage::Unfinished => Disconnect::LineTimeout,
                NoMessage::OverBudget => Disconnect::ClientBuffers,
            };
            match idle_timeout {
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
            // Websockets are not carried by a live upgrade: they close as at shutdown.
            _ = core.conns.stopping() => return Disconnect::Shutdown,
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
                    if let Err(reason) = flush(ws, write_timeout).await {
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
                    if session.closed_by_auth() {
                        let text = String::from_utf8_lossy(&out).into_owned();
                        let _ = send(ws, Message::text(text), write_timeout).await;
                        return Disconnect::AuthFailures;
                    }
                    return match ended {
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
                    };
                }
            }
            if session.flush(&mut out).await.is_err() {
                return Disconnect::gone(core);
            }
            unflushed += out.len();
            let reply = match std::str::from_utf8(&out) {
                Ok(text) => Message::text(text),
                // Lock names are bytes: a listing of non-UTF-8 names goes as binary.
                Err(_) => Message::binary(out.clone()),
            };
            let fed = match write_timeout {
                Some(limit) => match tokio::time::timeout(limit, ws.feed(reply)).await {
                    Ok(fed) => fed,
                    // A reader stalled for --write-timeout.
                    Err(_) => return Disconnect::WriteTimeout,
                },
                None => ws.feed(reply).await,
            };
            if let Err(e) = fed {
                return ended_by(&e);
            }
            if unflushed > limits.max_unsent {
                // Replies piled up: the client gets them at its pace before any more run.
                if let Err(reason) = flush(ws, write_timeout).await {
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
        if let Err(reason) = flush(ws, write_timeout).await {
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
async fn flush(ws: &mut Ws, limit: Option<Duration>) -> Result<(), Disconnect> {
    let flushed = match limit {
        Some(limit) => match tokio::time::timeout(limit, ws.flush()).await {
            Ok(flushed) => flushed,
            Err(_) => return Err(Disconnect::WriteTimeout),
        },
        None => ws.flush().await,
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
    flush(ws, limit).await
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
