//! The client side of the doors, as one byte stream type for the tests: TCP, TLS and unix
//! sockets as they are, and a websocket (plain or over TLS) as an adapter where each write is
//! one message and reads return the messages' bytes in order.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{stream::Stream as _, Sink};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Which door a test talks through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Unix,
    Ws,
    /// The line protocol over TLS (`-tls-port`).
    Tls,
    /// Websockets over TLS (`-tls-ws`).
    Wss,
}

/// A client's TLS stream.
pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A connected client stream of any transport.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Ws(Box<WsBytes>),
    Tls(Box<TlsStream>),
}

impl Stream {
    /// The TCP connection under it (None for a unix socket).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(tcp) => Some(tcp),
            Stream::Ws(ws) => Some(ws.tcp()),
            Stream::Tls(tls) => Some(tls.get_ref().0),
            Stream::Unix(_) => None,
        }
    }
}

/// What a test websocket runs over: plain TCP (`Left`) or TLS (`Right`).
pub type WsUnder = tokio_util::either::Either<TcpStream, Box<TlsStream>>;

/// A websocket client seen as a byte stream.
pub struct WsBytes {
    pub ws: WebSocketStream<WsUnder>,
    /// What is left of the last message received.
    pending: Bytes,
}

impl WsBytes {
    pub fn new(ws: WebSocketStream<WsUnder>) -> Self {
        WsBytes {
            ws,
            pending: Bytes::new(),
        }
    }

    /// The TCP connection under the websocket.
    pub fn tcp(&self) -> &TcpStream {
        match self.ws.get_ref() {
            tokio_util::either::Either::Left(tcp) => tcp,
            tokio_util::either::Either::Right(tls) => tls.get_ref().0,
        }
    }
}

fn ws_error(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(e)
}

impl AsyncRead for WsBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Ready(Some(Ok(Message::Text(text)))) => self.pending = Bytes::from(text),
                Poll::Ready(Some(Ok(Message::Binary(data)))) => self.pending = data,
                Poll::Ready(Some(Ok(Message::Close(_)))) | Poll::Ready(None) => {
                    return Poll::Ready(Ok(()))
                }
                Poll::Ready(Some(Ok(_))) => {}
                // A connection the server dropped reads as the end, as a TCP one would.
                Poll::Ready(Some(Err(_))) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for WsBytes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.ws).poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            Poll::Pending => return Poll::Pending,
        }
        let message = match std::str::from_utf8(buf) {
            Ok(text) => Message::text(text),
            Err(_) => Message::binary(buf.to_vec()),
        };
        Pin::new(&mut self.ws)
            .start_send(message)
            .map_err(ws_error)?;
        // Best effort to get it on the wire now; a pending flush completes on the next call.
        let _ = Pin::new(&mut self.ws).poll_flush(cx);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(ws_error)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Ws(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Ws(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Ws(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Ws(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
