//! The websocket door (`--ws ws://HOST:PORT/`): the client side of glockd's websocket framing,
//! written against the protocol, not against the server's code.
//!
//! Each message sent carries one command (or several, newline-separated); each reply is one
//! message carrying exactly the bytes a TCP client would get for that command: one line, a whole
//! listing (`d`, `q`, `who`…), or nothing at all, an empty message, for an empty listing. So the
//! message is the unit of a reply here, and [`crate::conn::Conn`] reads messages, not lines,
//! from this door.

use std::io;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::conn::{Connecting, Connector, Link, Opened};

/// The websocket door: a `ws://` URL.
pub struct WsConnector {
    /// Where to connect, as given on the command line (any path: glockd serves every path).
    pub url: String,
    /// Largest message accepted, in bytes: the library refuses a longer one while reading it,
    /// so a huge or endless reply costs at most this much memory.
    pub max_message: usize,
}

impl Connector for WsConnector {
    fn connect(&self) -> Connecting<'_> {
        Box::pin(async move {
            let config = WebSocketConfig::default()
                .max_message_size(Some(self.max_message))
                .max_frame_size(Some(self.max_message));
            // Nagle off (the `true`): commands are tiny and each one waits for its reply.
            let (ws, _response) =
                tokio_tungstenite::connect_async_with_config(self.url.as_str(), Some(config), true)
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?;
            // The server names a websocket connection by its peer address, as it does a TCP one.
            let local_id = match ws.get_ref() {
                MaybeTlsStream::Plain(tcp) => tcp.local_addr().ok().map(|a| a.to_string()),
                // No TLS feature is compiled in; were one ever added, `me` still gives the id.
                #[allow(unreachable_patterns)]
                _ => None,
            };
            Ok(Opened {
                link: Link::Messages(WsLink { ws: Box::new(ws) }),
                local_id,
            })
        })
    }

    fn describe(&self) -> String {
        format!("ws {}", self.url)
    }
}

/// Why no message could be read.
#[derive(Debug)]
pub enum RecvError {
    /// The server closed the websocket (a close frame, or the connection just ended).
    Closed,
    /// The message is longer than [`WsConnector::max_message`]; the connection is unusable now.
    TooLong,
    /// Anything else: a broken frame, a socket error.
    Other(io::Error),
}

/// One open websocket.
pub struct WsLink {
    /// The library's stream, over plain TCP; boxed because it is large (a few hundred bytes)
    /// and a connection holds either this or a byte stream.
    ws: Box<WebSocketStream<MaybeTlsStream<TcpStream>>>,
}

impl WsLink {
    /// Sends `bytes` as one message: text when they are UTF-8 (what a browser sends), binary
    /// otherwise (lock names are bytes; the server takes either).
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let message = match std::str::from_utf8(bytes) {
            Ok(text) => Message::text(text),
            Err(_) => Message::binary(bytes.to_vec()),
        };
        self.ws
            .send(message)
            .await
            .map_err(|e| io::Error::other(e.to_string()))
    }

    /// The next data message's bytes. Pings are answered by the library as it reads (and are
    /// no reply to anything), so they and pongs are passed over. Not bounded in time: the
    /// caller puts its reply timeout around this.
    pub async fn recv(&mut self) -> Result<Vec<u8>, RecvError> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text.as_bytes().to_vec()),
                Some(Ok(Message::Binary(data))) => return Ok(data.to_vec()),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(_))) | None => return Err(RecvError::Closed),
                Some(Err(WsError::Capacity(_))) => return Err(RecvError::TooLong),
                Some(Err(
                    WsError::ConnectionClosed
                    | WsError::AlreadyClosed
                    | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
                )) => return Err(RecvError::Closed),
                Some(Err(e)) => return Err(RecvError::Other(io::Error::other(e.to_string()))),
            }
        }
    }

    /// Starts the closing handshake: a close frame, flushed. The server then ends the
    /// connection and releases its locks; waiting for its answering close frame would only
    /// slow the run, so the socket is dropped after this.
    pub async fn close(&mut self) {
        let _ = WebSocketStream::close(&mut self.ws, None).await;
    }
}
