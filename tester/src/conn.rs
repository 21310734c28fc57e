//! Connections to the server under test: a transport-neutral factory ([`Connector`]) and a small
//! protocol client ([`Conn`]) that puts a timeout on every reply and a size cap on every read.
//!
//! The checks only ever see a [`Conn`], so each door into the server is one more [`Connector`].
//! TCP and unix sockets are byte streams: a reply is a line, and a listing is as many lines as it
//! has rows (none at all when empty). The websocket door is message-framed: every reply is one
//! message, a listing's rows are that message's lines, and an empty listing is an empty message.
//! [`Conn`] reads each door its own way, so that the checks see the same replies from both and
//! a websocket server that splits or drops reply messages is caught.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::verdict::{quoted, Verdict};
use crate::ws::{RecvError, WsLink};

/// A bidirectional byte stream to the server.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// How a door carries commands and replies.
pub enum Link {
    /// A byte stream (TCP, unix socket): lines in, lines out.
    Bytes(Box<dyn Stream>),
    /// The websocket door: a message per command (or per batch of lines), a message per reply.
    Messages(WsLink),
}

/// A freshly opened connection, as a transport hands it over.
pub struct Opened {
    /// The stream or the websocket.
    pub link: Link,
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
                link: Link::Bytes(Box::new(stream)),
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
                link: Link::Bytes(Box::new(stream)),
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
    /// `--auth`: every connection authenticates first (a server with a users file).
    pub auth: Option<Credentials>,
    /// `--expect-auth`: the server must refuse a connection that has not authenticated.
    pub expect_auth: bool,
}

/// A user and its token, for `auth USER TOKEN`. The token never shows in `Debug` output or in
/// any message of the report.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, ..)", self.user)
    }
}

impl std::str::FromStr for Credentials {
    type Err = String;

    /// `USER:TOKEN`, each one word (the server splits `auth USER TOKEN` on whitespace).
    fn from_str(text: &str) -> Result<Self, String> {
        let (user, token) = text.split_once(':').ok_or("expected USER:TOKEN")?;
        let word = |w: &str| !w.is_empty() && !w.chars().any(char::is_whitespace);
        if !word(user) || !word(token) {
            return Err("USER and TOKEN must each be one word without whitespace".into());
        }
        Ok(Credentials {
            user: user.to_owned(),
            token: token.to_owned(),
        })
    }
}

/// Longest ordinary reply line accepted: the tester's own names are short, so anything longer
/// is a broken reply, and reading on would only waste memory. Over the websocket door this is
/// also the most a listing's or `q`'s whole message may take.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The largest websocket message a run accepts at all: a `dump` line up to `--max-dump-bytes`
/// or an ordinary reply, and the newline after it. The library refuses a longer message while
/// reading it, so no reply can make the tester buffer more.
pub fn max_message_bytes(settings: &Settings) -> usize {
    settings
        .max_dump_bytes
        .max(MAX_LINE_BYTES)
        .saturating_add(1)
}

/// Why a line could not be read.
enum LineError {
    Io(io::Error),
    Closed,
    TooLong,
    TimedOut,
}

/// The two ways a door carries replies.
enum Io {
    /// Lines in a byte stream, buffered for line reads.
    Bytes(BufReader<Box<dyn Stream>>),
    /// One websocket message per reply.
    Messages(WsLink),
}

/// One connection to the server, speaking the line protocol.
pub struct Conn {
    /// The stream or the websocket.
    io: Io,
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
        let io = match opened.link {
            Link::Bytes(stream) => Io::Bytes(BufReader::new(stream)),
            Link::Messages(link) => Io::Messages(link),
        };
        Ok(Conn {
            io,
            settings: settings.clone(),
            local_id: opened.local_id,
        })
    }

    /// Opens a connection and, with `--auth`, authenticates it (`1 …` expected).
    pub async fn open_authenticated(
        connector: &dyn Connector,
        settings: &Settings,
    ) -> Result<Conn, Verdict> {
        let mut conn = Conn::open(connector, settings).await?;
        if let Some(auth) = &settings.auth {
            // Sent and read by hand: `command` would name the line, token and all, in a
            // failure message.
            conn.send(&format!("auth {} {}", auth.user, auth.token))
                .await?;
            let reply = conn.read_line("`auth`").await?;
            if !reply.starts_with("1 ") {
                return Err(Verdict::fail(format!(
                    "`auth {} …` answered {reply:?}",
                    auth.user
                )));
            }
        }
        Ok(conn)
    }

    /// Whether replies are read the original server's way.
    pub fn compat(&self) -> bool {
        self.settings.compat
    }

    /// Whether each reply comes as one message (the websocket door), rather than as lines in a
    /// byte stream.
    pub fn framed(&self) -> bool {
        matches!(self.io, Io::Messages(_))
    }

    /// The reply timeout.
    pub fn timeout(&self) -> Duration {
        self.settings.timeout
    }

    /// Our id according to the transport, if it knows.
    pub fn local_id(&self) -> Option<&str> {
        self.local_id.as_deref()
    }

    /// Writes raw bytes (one or several command lines) in one write; over the websocket door,
    /// in one message, which the server answers with one message per non-blank line.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), Verdict> {
        let write = async {
            match &mut self.io {
                Io::Bytes(stream) => stream.get_mut().write_all(bytes).await,
                Io::Messages(link) => link.send(bytes).await,
            }
        };
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

    /// Sends one command line: with a `\n` added over a byte stream; over the websocket door as
    /// a message of its own, without one (the usual form of a websocket client; the pipelined
    /// checks send messages that end in `\n`, so both forms are used).
    pub async fn send(&mut self, line: &str) -> Result<(), Verdict> {
        if self.framed() {
            return self.send_raw(line.as_bytes()).await;
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.send_raw(&bytes).await
    }

    /// Reads one reply line (without `\n`; in compat mode also without a trailing `\r`), within
    /// the timeout. `what` names the command it answers, for the failure message. Over the
    /// websocket door the line is a whole message, which must hold exactly one line.
    pub async fn read_line(&mut self, what: &str) -> Result<String, Verdict> {
        match self.read_line_capped(what, MAX_LINE_BYTES).await? {
            Some(line) => Ok(line),
            None if self.framed() => Err(Verdict::fail(format!(
                "{what}: expected a reply line, got a message of more than {MAX_LINE_BYTES} bytes"
            ))),
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
        let stream = match &mut self.io {
            Io::Bytes(stream) => stream,
            Io::Messages(_) => return self.read_line_message(what, cap).await,
        };
        let read = tokio::time::timeout(self.settings.timeout, read_capped(stream, cap));
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
            Err(e) => self.line_error(what, e).map(|()| None),
        }
    }

    /// [`Conn::read_line_capped`] over the websocket door: the next message, which must hold
    /// exactly one line.
    async fn read_line_message(
        &mut self,
        what: &str,
        cap: usize,
    ) -> Result<Option<String>, Verdict> {
        let Some(message) = self.recv_message(what).await? else {
            return Ok(None);
        };
        let body = message.strip_suffix(b"\n").unwrap_or(&message);
        if body.len() > cap {
            return Ok(None);
        }
        let mut lines = self.message_lines(what, &message)?;
        match lines.pop() {
            Some(line) if lines.is_empty() => Ok(Some(line)),
            Some(_) => Err(Verdict::expected(
                what,
                "one reply line in one message",
                format!("{} lines: {}", lines.len() + 1, excerpt(&message)),
            )),
            None => Err(Verdict::expected(
                what,
                "one reply line in one message",
                "an empty message",
            )),
        }
    }

    /// One whole reply message from the websocket door, as its lines: a listing's rows, `q`'s
    /// counters, nothing for an empty message (an empty listing). At most [`MAX_LINE_BYTES`].
    pub async fn read_message(&mut self, what: &str) -> Result<Vec<String>, Verdict> {
        if !self.framed() {
            // The checks ask for messages only after `framed()` said there are some.
            return Err(Verdict::fail(format!(
                "{what}: a byte stream has no messages (a bug in the tester)"
            )));
        }
        match self.recv_message(what).await? {
            Some(message) if message.len() <= MAX_LINE_BYTES => self.message_lines(what, &message),
            _ => Err(Verdict::fail(format!(
                "{what}: expected a reply of at most {MAX_LINE_BYTES} bytes, got a longer message"
            ))),
        }
    }

    /// The next message from the websocket door, within the timeout; `Ok(None)` when it is
    /// longer than [`max_message_bytes`] (refused unread: the connection is unusable after).
    async fn recv_message(&mut self, what: &str) -> Result<Option<Vec<u8>>, Verdict> {
        let Io::Messages(link) = &mut self.io else {
            return Err(Verdict::fail(format!(
                "{what}: a byte stream has no messages (a bug in the tester)"
            )));
        };
        let result = match tokio::time::timeout(self.settings.timeout, link.recv()).await {
            Ok(Ok(message)) => return Ok(Some(message)),
            Ok(Err(RecvError::TooLong)) => return Ok(None),
            Ok(Err(RecvError::Closed)) => LineError::Closed,
            Ok(Err(RecvError::Other(e))) => LineError::Io(e),
            Err(_) => LineError::TimedOut,
        };
        self.line_error(what, result).map(|()| None)
    }

    /// The verdict on a reply that could not be read; `Ok` only for a line that is too long,
    /// which callers treat as they choose.
    fn line_error(&self, what: &str, error: LineError) -> Result<(), Verdict> {
        match error {
            LineError::TooLong => Ok(()),
            LineError::TimedOut => Err(Verdict::fail(format!(
                "{what}: expected a reply within {} ms, got none",
                self.settings.timeout.as_millis()
            ))),
            LineError::Closed => Err(Verdict::fail(format!(
                "{what}: expected a reply, got the connection closed"
            ))),
            LineError::Io(e) => Err(Verdict::fail(format!("{what}: {e}"))),
        }
    }

    /// A reply message's lines. In strict mode a non-empty message must end in `\n`, since it
    /// carries exactly the bytes a TCP client would get; compat mode also takes a message
    /// without it, and drops a `\r` before each `\n` as it does over TCP.
    fn message_lines(&self, what: &str, message: &[u8]) -> Result<Vec<String>, Verdict> {
        if message.is_empty() {
            return Ok(Vec::new());
        }
        let body = match message.strip_suffix(b"\n") {
            Some(body) => body,
            None if self.settings.compat => message,
            None => {
                return Err(Verdict::expected(
                    what,
                    "a reply message ending in \\n, as the reply's bytes over TCP",
                    excerpt(message),
                ))
            }
        };
        Ok(body
            .split(|&b| b == b'\n')
            .map(|line| {
                let line = match line.strip_suffix(b"\r") {
                    Some(stripped) if self.settings.compat => stripped,
                    _ => line,
                };
                String::from_utf8_lossy(line).into_owned()
            })
            .collect())
    }

    /// Sends one command and reads its one-line reply.
    pub async fn command(&mut self, line: &str) -> Result<String, Verdict> {
        self.send(line).await?;
        self.read_line(&label(line)).await
    }

    /// Closes the connection: our write side first (the server sees a clean end of input), then
    /// the whole stream; over the websocket door, a close frame. The server releases whatever
    /// this connection still held.
    pub async fn close(mut self) {
        let timeout = self.settings.timeout;
        match &mut self.io {
            Io::Bytes(stream) => {
                let _ = tokio::time::timeout(timeout, stream.get_mut().shutdown()).await;
            }
            Io::Messages(link) => {
                let _ = tokio::time::timeout(timeout, link.close()).await;
            }
        }
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

/// A message as messages of the report show it: quoted, and only its start when it is long
/// (a broken server's reply can be up to a megabyte).
pub fn excerpt(bytes: &[u8]) -> String {
    const SHOWN: usize = 160;
    if bytes.len() <= SHOWN {
        return quoted(&String::from_utf8_lossy(bytes));
    }
    format!(
        "{}… ({} bytes)",
        quoted(&String::from_utf8_lossy(&bytes[..SHOWN])),
        bytes.len()
    )
}

/// A command as messages show it: in backticks, control characters escaped (`g x\r`).
pub fn label(line: &str) -> String {
    format!("`{}`", line.escape_debug())
}

/// Bytes as they would be typed, for messages: `g x\n` shows as `"g x\n"`.
pub fn shown(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}
