//! Connections to the server under test: a transport-neutral factory ([`Connector`]) and a small
//! line client ([`Conn`]) that puts a timeout on every reply and a size cap on every line.
//!
//! The checks only ever see a [`Conn`], so each door into the server is one more [`Connector`]:
//! TCP and unix sockets are byte streams and plug in directly; a message-framed door (websocket:
//! one message per command and per reply) can be adapted into a byte stream that turns each
//! written line into a message and each received message into a line.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::verdict::Verdict;

/// A bidirectional byte stream to the server.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A freshly opened connection, as a transport hands it over.
pub struct Opened {
    /// The byte stream.
    pub stream: Box<dyn Stream>,
    /// The id the server would give this connection if the transport can tell (`ip:port` of our
    /// end for TCP). Used only when the server will not say itself (`me` disabled).
    pub local_id: Option<String>,
}

/// The boxed future a [`Connector`] returns.
pub type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<Opened>> + Send + 'a>>;

/// Opens connections to the server under test: every check is written against this, not
/// against TCP.
pub trait Connector: Send + Sync {
    /// Opens one new connection.
    fn connect(&self) -> Connecting<'_>;
    /// The target as people write it, for messages and the report.
    fn describe(&self) -> String;
}

/// The TCP door: `HOST:PORT`.
pub struct TcpConnector {
    /// Where to connect, as given on the command line (a name is resolved on every connect).
    pub host: String,
}

impl Connector for TcpConnector {
    fn connect(&self) -> Connecting<'_> {
        Box::pin(async move {
            let stream = TcpStream::connect(self.host.as_str()).await?;
            // Commands are tiny and each one waits for its reply: Nagle would only add delay.
            stream.set_nodelay(true)?;
            let local_id = stream.local_addr().ok().map(|a| a.to_string());
            Ok(Opened {
                stream: Box::new(stream),
                local_id,
            })
        })
    }

    fn describe(&self) -> String {
        format!("tcp {}", self.host)
    }
}

/// The unix socket door: a path. The server names these connections `unix:N`, and the
/// transport cannot know N, so `me` is the only source of a unix connection's id.
#[cfg(unix)]
pub struct UnixConnector {
    /// The socket file.
    pub path: std::path::PathBuf,
}

#[cfg(unix)]
impl Connector for UnixConnector {
    fn connect(&self) -> Connecting<'_> {
        Box::pin(async move {
            let stream = tokio::net::UnixStream::connect(&self.path).await?;
            Ok(Opened {
                stream: Box::new(stream),
                local_id: None,
            })
        })
    }

    fn describe(&self) -> String {
        format!("unix {}", self.path.display())
    }
}

/// How replies are read, the same for every connection of a run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Longest wait for any one reply (and for any one write).
    pub timeout: Duration,
    /// Only check what the original server did: tolerate `\r\n` replies and free-form texts.
    pub compat: bool,
    /// Longest line accepted from `dump`, which has the whole table on one line.
    pub max_dump_bytes: usize,
}

/// Longest ordinary reply line accepted: the tester's own names are short, so anything longer
/// is a broken reply, and reading on would only waste memory.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Why a line could not be read.
enum LineError {
    Io(io::Error),
    Closed,
    TooLong,
    TimedOut,
}

/// One connection to the server, speaking the line protocol.
pub struct Conn {
    /// The stream, buffered for line reads.
    stream: BufReader<Box<dyn Stream>>,
    /// Timeouts and compat mode.
    settings: Settings,
    /// Our id as the transport sees it, a fallback for `me`.
    local_id: Option<String>,
}

impl Conn {
    /// Opens a connection through `connector`, within the reply timeout.
    pub async fn open(connector: &dyn Connector, settings: &Settings) -> Result<Conn, Verdict> {
        let what = format!("connect to {}", connector.describe());
        let opened = match tokio::time::timeout(settings.timeout, connector.connect()).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => return Err(Verdict::fail(format!("{what}: {e}"))),
            Err(_) => {
                return Err(Verdict::fail(format!(
                    "{what}: no connection within {} ms",
                    settings.timeout.as_millis()
                )))
            }
        };
        Ok(Conn {
            stream: BufReader::new(opened.stream),
            settings: settings.clone(),
            local_id: opened.local_id,
        })
    }

    /// Whether replies are read the original server's way.
    pub fn compat(&self) -> bool {
        self.settings.compat
    }

    /// The reply timeout.
    pub fn timeout(&self) -> Duration {
        self.settings.timeout
    }

    /// Our id according to the transport, if it knows.
    pub fn local_id(&self) -> Option<&str> {
        self.local_id.as_deref()
    }

    /// Writes raw bytes (one or several command lines) in one write.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), Verdict> {
        let write = self.stream.get_mut().write_all(bytes);
        match tokio::time::timeout(self.settings.timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Verdict::fail(format!("send {}: {e}", shown(bytes)))),
            Err(_) => Err(Verdict::fail(format!(
                "send {}: not accepted within {} ms",
                shown(bytes),
                self.settings.timeout.as_millis()
            ))),
        }
    }

    /// Sends one command line (a `\n` is added).
    pub async fn send(&mut self, line: &str) -> Result<(), Verdict> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.send_raw(&bytes).await
    }

    /// Reads one reply line (without `\n`; in compat mode also without a trailing `\r`), within
    /// the timeout. `what` names the command it answers, for the failure message.
    pub async fn read_line(&mut self, what: &str) -> Result<String, Verdict> {
        match self.read_line_capped(what, MAX_LINE_BYTES).await? {
            Some(line) => Ok(line),
            None => Err(Verdict::fail(format!(
                "{what}: expected a reply line, got more than {MAX_LINE_BYTES} bytes without a newline"
            ))),
        }
    }

    /// Like [`Conn::read_line`], with a size cap of `cap` bytes: `Ok(None)` when the line is
    /// longer (the rest is left unread: close the connection after that).
    pub async fn read_line_capped(
        &mut self,
        what: &str,
        cap: usize,
    ) -> Result<Option<String>, Verdict> {
        let read = tokio::time::timeout(self.settings.timeout, read_capped(&mut self.stream, cap));
        let result = match read.await {
            Ok(result) => result,
            Err(_) => Err(LineError::TimedOut),
        };
        match result {
            Ok(mut line) => {
                if self.settings.compat && line.last() == Some(&b'\r') {
                    line.pop();
                }
                Ok(Some(String::from_utf8_lossy(&line).into_owned()))
            }
            Err(LineError::TooLong) => Ok(None),
            Err(LineError::TimedOut) => Err(Verdict::fail(format!(
                "{what}: expected a reply within {} ms, got none",
                self.settings.timeout.as_millis()
            ))),
            Err(LineError::Closed) => Err(Verdict::fail(format!(
                "{what}: expected a reply, got the connection closed"
            ))),
            Err(LineError::Io(e)) => Err(Verdict::fail(format!("{what}: {e}"))),
        }
    }

    /// Sends one command and reads its one-line reply.
    pub async fn command(&mut self, line: &str) -> Result<String, Verdict> {
        self.send(line).await?;
        self.read_line(&label(line)).await
    }

    /// Closes the connection: our write side first (the server sees a clean end of input), then
    /// the whole stream. The server releases whatever this connection still held.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(self.settings.timeout, self.stream.get_mut().shutdown()).await;
    }
}

/// Reads up to and including a `\n`; returns the line without it.
async fn read_capped(
    stream: &mut BufReader<Box<dyn Stream>>,
    cap: usize,
) -> Result<Vec<u8>, LineError> {
    let mut line = Vec::new();
    loop {
        let buf = stream.fill_buf().await.map_err(LineError::Io)?;
        if buf.is_empty() {
            return Err(LineError::Closed);
        }
        if let Some(at) = buf.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..at]);
            stream.consume(at + 1);
            return if line.len() > cap {
                Err(LineError::TooLong)
            } else {
                Ok(line)
            };
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        stream.consume(n);
        if line.len() > cap {
            return Err(LineError::TooLong);
        }
    }
}

/// A command as messages show it: in backticks, control characters escaped (`g x\r`).
pub fn label(line: &str) -> String {
    format!("`{}`", line.escape_debug())
}

/// Bytes as they would be typed, for messages: `g x\n` shows as `"g x\n"`.
pub fn shown(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}
