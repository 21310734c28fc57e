//! A websocket client (`ws://HOST:PORT/`, any path): each text or binary message carries one
//! command (or several, newline-separated, answered one by one in order), and each reply is one
//! message with exactly the bytes a TCP client would get, a multi-line reply (`d`, `q`, `who`…)
//! in one message. An empty listing is an empty message, so every command gets a message back.
//!
//! The commands run through the same [`Session`] as TCP ones, on a shard thread like any other
//! connection, so the locks, replies and stats are the same whichever door a client used.

use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::framer::LineFramer;
use crate::lifecycle::Admission;
use crate::protocol;
use crate::routing::Gone;
use crate::session::{PeerWatch, Session, Step};
use crate::shard::ShardCore;

/// How long a client may take to finish the websocket handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages kept while a command waits (`gw`); past this, the connection is not read until
/// the wait ends.
const STASH: usize = 64;

/// Watches a websocket while a command waits: messages that arrive are kept for later, and a
/// close frame, a dropped connection or an error means the client is gone.
struct WsWatch<'a> {
    ws: &'a mut WebSocketStream<TcpStream>,
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
pub async fn serve(core: Rc<ShardCore>, stream: TcpStream, id: String, admission: Admission) {
    let config = &core.server.config;
    let limits = config.conn_limits();
    // Replies are flushed, at the client's pace, whenever more than --max-unsent-bytes of them
    // are buffered (and after every message), so the library's own cap on its write buffer
    // would only refuse a listing bigger than that: leave it unbounded. (It must also exceed
    // the library's write buffer size, or every connection panics.)
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(limits.max_line))
        .max_frame_size(Some(limits.max_line))
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
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_origin, Some(ws_config));
    let mut ws = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            if config.verbose {
                eprintln!("glockd: websocket handshake with {id} failed: {e}");
            }
            return;
        }
        Err(_) => return,
    };
    let write_timeout = limits.write_timeout;
    let idle_timeout = limits.idle_timeout;
    let mut session = Session::new(core.clone(), id, admission);
    // A message is bounded by the library at --max-line-bytes, and ends its last line as end
    // of input would (one more byte for the newline added then).
    let mut lines = LineFramer::new(limits.max_line.saturating_add(1));
    let mut out = Vec::new();
    // Reply bytes handed to the library since it last flushed them to the client.
    let mut unflushed = 0usize;
    let mut stash = VecDeque::new();
    loop {
        if core.is_closing() {
            break;
        }
        let stashed = stash.pop_front();
        let next = async {
            if let Some(message) = stashed {
                return Some(Ok(message));
            }
            match idle_timeout {
                Some(limit) => tokio::time::timeout(limit, ws.next()).await.ok().flatten(),
                None => ws.next().await,
            }
        };
        let message = tokio::select! {
            message = next => message,
            _ = core.conns.closing() => break,
        };
        let data = match message {
            Some(Ok(Message::Text(text))) => bytes::Bytes::from(text),
            Some(Ok(Message::Binary(data))) => data,
            // Pings are answered by the library with the next write or read.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(_))) | None => break,
            Some(Err(WsError::Capacity(_))) => {
                session.core().cell().invalid_commands.add(1);
                core.cell()
                    .closed_because(crate::stats::CloseReason::LineTooLong);
                let reply = Message::binary(protocol::LINE_TOO_LONG);
                let _ = send(&mut ws, reply, write_timeout).await;
                break;
            }
            Some(Err(_)) => return,
        };
        let started = session.measures_latency().then(std::time::Instant::now);
        lines.extend(&data);
        if !data.ends_with(b"\n") {
            lines.extend(b"\n");
        }
        // Bounded above (the message limit), so this cannot fail; if it did, it would be the
        // refusal a too-long message gets.
        while let Ok(Some(line)) = lines.next_line() {
            if protocol::trim(line).is_empty() {
                continue; // a blank line gets nothing, as over TCP
            }
            out.clear();
            if let Step::Later(request) = session.step(line, &mut out) {
                if matches!(request, protocol::Request::Wait { .. }) {
                    // The replies before a wait go out before it waits, not after.
                    if flush(&mut ws, write_timeout).await.is_err() {
                        return;
                    }
                    unflushed = 0;
                }
                let mut watch = WsWatch {
                    ws: &mut ws,
                    stash: &mut stash,
                };
                if session
                    .run_later(request, &mut out, &mut watch)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if session.flush(&mut out).await.is_err() {
                return;
            }
            unflushed += out.len();
            let reply = match std::str::from_utf8(&out) {
                Ok(text) => Message::text(text),
                // Lock names are bytes: a listing of non-UTF-8 names goes as binary.
                Err(_) => Message::binary(out.clone()),
            };
            let fed = match write_timeout {
                Some(limit) => tokio::time::timeout(limit, ws.feed(reply))
                    .await
                    .unwrap_or(Err(WsError::ConnectionClosed)),
                None => ws.feed(reply).await,
            };
            if fed.is_err() {
                // A reader stalled for --write-timeout, or the peer is gone.
                return;
            }
            if unflushed > limits.max_unsent {
                // Replies piled up: the client gets them at its pace before any more run.
                if flush(&mut ws, write_timeout).await.is_err() {
                    return;
                }
                unflushed = 0;
            }
        }
        lines.compact();
        if let Some(started) = started {
            session.record_latency(started.elapsed());
        }
        if flush(&mut ws, write_timeout).await.is_err() {
            return;
        }
        unflushed = 0;
    }
    drop(session); // counted closed before the client can see the close
    let close = ws.close(None);
    let _ = tokio::time::timeout(write_timeout.unwrap_or(HANDSHAKE_TIMEOUT), close).await;
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

/// Sends what is buffered, within the write timeout; `Gone` if the peer does not take it.
async fn flush(ws: &mut WebSocketStream<TcpStream>, limit: Option<Duration>) -> Result<(), Gone> {
    match limit {
        Some(limit) => match tokio::time::timeout(limit, ws.flush()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Gone),
        },
        None => ws.flush().await.map_err(|_| Gone),
    }
}

async fn send(
    ws: &mut WebSocketStream<TcpStream>,
    message: Message,
    limit: Option<Duration>,
) -> Result<(), Gone> {
    ws.feed(message).await.map_err(|_| Gone)?;
    flush(ws, limit).await
}
