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
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::connection::{Disconnect, Farewell};
use crate::framer::{LineFramer, LineTooLong};
use crate::lifecycle::Admission;
use crate::protocol;
use crate::session::{PeerWatch, Session, Step};
use crate::shard::ShardCore;

/// The websocket over a TCP stream that notes when bytes of a message not yet complete began
/// to arrive, for `--line-timeout`.
type Ws = WebSocketStream<Marked>;

/// A TCP stream that remembers when it was first read from since the last complete message
/// (the caller clears [`Marked::since`] after each one), so that a message left unfinished
/// can be timed without a timer per message.
struct Marked {
    /// The client's connection.
    stream: TcpStream,
    /// When the first bytes after the last complete message were read.
    since: Cell<Option<Instant>>,
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
        if buf.filled().len() > before && this.since.get().is_none() {
            this.since.set(Some(Instant::now()));
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

/// A message left unfinished for `--line-timeout`.
struct Unfinished;

/// The next message from the client. A timer is armed only once bytes of an unfinished
/// message have arrived; if the message is still unfinished `limit` after its first bytes,
/// the answer is [`Unfinished`].
async fn next_message(
    ws: &mut Ws,
    limit: Option<Duration>,
) -> Result<Option<Result<Message, WsError>>, Unfinished> {
    // Bytes read before this call (while a command waited, into the stash) start no clock:
    // timing restarts with the next read, which errs on the client's side.
    ws.get_ref().since.set(None);
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    let next = std::future::poll_fn(|cx| {
        if let Poll::Ready(message) = ws.poll_next_unpin(cx) {
            return Poll::Ready(Ok(message));
        }
        let (Some(limit), Some(since)) = (limit, ws.get_ref().since.get()) else {
            return Poll::Pending;
        };
        let timer = timer.get_or_insert_with(|| {
            let deadline = since.checked_add(limit).unwrap_or(since);
            Box::pin(tokio::time::sleep_until(deadline))
        });
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Unfinished)),
            Poll::Pending => Poll::Pending,
        }
    });
    let message = next.await;
    // Complete: the next message's time starts with its first bytes. (Bytes of it already
    // read along with this one are at most one read, and are timed from the next read.)
    ws.get_ref().since.set(None);
    message
}

/// Messages kept while a command waits (`gw`); past this, the connection is not read until
/// the wait ends.
const STASH: usize = 64;

/// Watches a websocket while a command waits: messages that arrive are kept for later, and a
/// close frame, a dropped connection or an error means the client is gone.
struct WsWatch<'a> {
    ws: &'a mut Ws,
    stash: &'a mut VecDeque<Message>,
}

impl PeerWatch for WsWatch<'_> {
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.stash.len() >= STASH {
                return Poll::Pending;
            }
            match self.ws.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(Message::Close(_)))) | Poll::Ready(None) => {
                    return Poll::Ready(())
                }
                Poll::Ready(Some(Err(_))) => return Poll::Ready(()),
                Poll::Ready(Some(Ok(message))) => self.stash.push_back(message),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Serves one websocket connection until it closes.
pub async fn serve(
    core: Rc<ShardCore>,
    stream: TcpStream,
    id: String,
    admission: Admission,
    peer: Peer,
) {
    let config = &core.server.config;
    let limits = config.conn_limits();
    // Replies are flushed, at the client's pace, whenever more than --max-unsent-bytes of them
    // are buffered (and after every message), so the library's own cap on its write buffer
    // would only refuse a listing bigger than that: leave it unbounded. (It must also exceed
    // the library's write buffer size, or every connection panics.) A message may carry many
    // commands, each line bounded by --max-line-bytes as over TCP; the message as a whole by
    // the larger of that and --max-unsent-bytes.
    let max_message = limits.max_line.max(limits.max_unsent);
    let ws_config = WebSocketConfig::default()
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
        stream,
        since: Cell::new(None),
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
    ws.get_ref().since.set(None);
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
    let mut stash = VecDeque::new();
    loop {
        if core.is_closing() {
            return Disconnect::Shutdown;
        }
        let stashed = stash.pop_front();
        let next = async {
            if let Some(message) = stashed {
                return Ok(Some(Ok(message)));
            }
            let next = next_message(ws, limits.line_timeout);
            match idle_timeout {
                Some(limit) => tokio::time::timeout(limit, next)
                    .await
                    .map_err(|_| Disconnect::Idle)?
                    .map_err(|Unfinished| Disconnect::LineTimeout),
                None => next.await.map_err(|Unfinished| Disconnect::LineTimeout),
            }
        };
        let message = tokio::select! {
            message = next => message,
            _ = core.conns.closing() => return Disconnect::Shutdown,
        };
        let data = match message {
            Err(reason) => return reason,
            Ok(Some(Ok(Message::Text(text)))) => bytes::Bytes::from(text),
            Ok(Some(Ok(Message::Binary(data)))) => data,
            // Pings are answered by the library with the next write or read.
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => continue,
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => return Disconnect::Eof,
            Ok(Some(Err(WsError::Capacity(_)))) => {
                session.core().cell().invalid_commands.add(1);
                let reply = Message::binary(protocol::LINE_TOO_LONG);
                let _ = send(ws, reply, write_timeout).await;
                return Disconnect::LineTooLong;
            }
            Ok(Some(Err(WsError::Utf8(_)))) => {
                session.core().cell().invalid_commands.add(1);
                let reply = Message::binary(protocol::TEXT_NOT_UTF8);
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
                    let reply = Message::binary(protocol::LINE_TOO_LONG);
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
                let mut watch = WsWatch {
                    ws: &mut *ws,
                    stash: &mut stash,
                };
                if session
                    .run_later_boxed(request, &mut out, &mut watch)
                    .await
                    .is_err()
                {
                    if session.closed_by_auth() {
                        let text = String::from_utf8_lossy(&out).into_owned();
                        let _ = send(ws, Message::text(text), write_timeout).await;
                        return Disconnect::AuthFailures;
                    }
                    return Disconnect::gone(core);
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

async fn send(ws: &mut Ws, message: Message, limit: Option<Duration>) -> Result<(), Disconnect> {
    ws.feed(message).await.map_err(|e| ended_by(&e))?;
    flush(ws, limit).await
}
