//! An async client for the glockd protocol, over any byte stream (TCP, TLS, unix socket…).
//!
//! Commands are written by the protocol module ([`Request::write_to`]), the same definition the
//! server parses with. One-line replies are parsed to their integer. Listings (`d`, `sd`, `who`) have no end marker
//! in the protocol and may be empty, so the client sends `me` right behind a listing and reads
//! until that reply comes back: its line (`1 <id> <name>`) cannot be mistaken for a listing row,
//! which always ends in `: <holder>`.

use std::collections::BTreeMap;
use std::io;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, ToSocketAddrs};

use crate::name::LockName;
use crate::protocol::{LockOp, RateParams, Request, WaitKind};

/// A connection to a glockd server. Every lock it takes is held until it is released or the
/// client is dropped.
pub struct Client<S = TcpStream> {
    stream: BufReader<S>,
    /// This connection's `me` line, learnt on first use (reset by `iam`).
    me_line: Option<Vec<u8>>,
    /// Whether the server counts the lines of listings for this connection (`framed`);
    /// asked on the first listing.
    framed: Option<bool>,
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// The integer at the start of a reply line.
pub fn reply_code(line: &[u8]) -> io::Result<u64> {
    let digits = line.split(|&b| b == b' ').next().unwrap_or_default();
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| invalid(format!("not a reply: {:?}", String::from_utf8_lossy(line))))
}

impl Client<TcpStream> {
    /// Connects over TCP.
    pub async fn connect(addr: impl ToSocketAddrs) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Client::new(stream))
    }
}

pub use crate::tls::client::{TlsClient, TlsOptions};

/// A client's TLS stream to a `-tls-port` door.
pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

impl Client<TlsStream> {
    /// Connects to a TLS door (`-tls-port`): TCP, then the TLS handshake `tls` describes (the
    /// CA to trust, the server's name, a client certificate if the server asks for one).
    pub async fn connect_tls(addr: impl ToSocketAddrs, tls: &TlsClient) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Client::new(tls.connect(stream).await?))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> Self {
        Client {
            stream: BufReader::new(stream),
            me_line: None,
            framed: None,
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        self.stream.get_ref()
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.get_mut().write_all(bytes).await
    }

    /// Reads one reply line, without its `\n`.
    pub async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        self.stream.read_until(b'\n', &mut line).await?;
        if line.pop() != Some(b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a full reply",
            ));
        }
        Ok(line)
    }

    /// Sends one command line (without `\n`) and returns its one-line reply.
    pub async fn command(&mut self, line: &[u8]) -> io::Result<Vec<u8>> {
        check_line(line)?;
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
        self.send(&bytes).await?;
        self.read_line().await
    }

    /// Sends one request and returns its one-line reply.
    pub async fn request(&mut self, request: &Request) -> io::Result<Vec<u8>> {
        if request
            .name()
            .is_some_and(|n| n.as_bytes().contains(&b'\n'))
        {
            return Err(newline_in_command());
        }
        let mut bytes = Vec::new();
        request.write_to(&mut bytes);
        self.send(&bytes).await?;
        self.read_line().await
    }

    /// Sends `op` on `name` and returns the reply's integer.
    async fn lock_command(&mut self, op: LockOp, name: &[u8]) -> io::Result<u64> {
        let name = LockName::new(name);
        reply_code(&self.request(&Request::Lock { op, name }).await?)
    }

    /// `g`: takes an exclusive lock; true if this connection holds it now.
    pub async fn get(&mut self, name: impl AsRef<[u8]>) -> io::Result<bool> {
        Ok(self.lock_command(LockOp::Get, name.as_ref()).await? == 1)
    }

    /// `r`: releases an exclusive lock; true if this connection held it.
    pub async fn release(&mut self, name: impl AsRef<[u8]>) -> io::Result<bool> {
        Ok(self.lock_command(LockOp::Release, name.as_ref()).await? == 1)
    }

    /// `i`: whether anyone holds the exclusive lock.
    pub async fn inspect(&mut self, name: impl AsRef<[u8]>) -> io::Result<bool> {
        Ok(self.lock_command(LockOp::Inspect, name.as_ref()).await? == 1)
    }

    /// `sg`: takes a shared lock; returns the number of holders now.
    pub async fn shared_get(&mut self, name: impl AsRef<[u8]>) -> io::Result<u64> {
        self.lock_command(LockOp::SharedGet, name.as_ref()).await
    }

    /// `sr`: releases a shared lock; true if this connection held it.
    pub async fn shared_release(&mut self, name: impl AsRef<[u8]>) -> io::Result<bool> {
        Ok(self
            .lock_command(LockOp::SharedRelease, name.as_ref())
            .await?
            == 1)
    }

    /// `si`: the number of holders of a shared lock.
    pub async fn shared_inspect(&mut self, name: impl AsRef<[u8]>) -> io::Result<u64> {
        self.lock_command(LockOp::SharedInspect, name.as_ref())
            .await
    }

    /// `gw MS NAME`: takes an exclusive lock, waiting up to `ms` milliseconds for it; false on
    /// timeout.
    pub async fn get_wait(&mut self, ms: u64, name: impl AsRef<[u8]>) -> io::Result<bool> {
        let request = Request::Wait {
            ms,
            kind: WaitKind::Exclusive,
            name: LockName::new(name.as_ref()),
        };
        Ok(reply_code(&self.request(&request).await?)? == 1)
    }

    /// `sgl LIMIT NAME`: takes a shared lock if fewer than `limit` hold it; the holder count,
    /// or None when full.
    pub async fn shared_get_limit(
        &mut self,
        limit: u32,
        name: impl AsRef<[u8]>,
    ) -> io::Result<Option<u64>> {
        let count = self
            .lock_command(LockOp::SharedGetLimit(limit), name.as_ref())
            .await?;
        Ok((count > 0).then_some(count))
    }

    /// `sgw MS LIMIT NAME`: like `shared_get_limit`, waiting up to `ms` for a free slot.
    pub async fn shared_get_wait(
        &mut self,
        ms: u64,
        limit: u64,
        name: impl AsRef<[u8]>,
    ) -> io::Result<Option<u64>> {
        let request = Request::Wait {
            ms,
            kind: WaitKind::Shared { limit },
            name: LockName::new(name.as_ref()),
        };
        let count = reply_code(&self.request(&request).await?)?;
        Ok((count > 0).then_some(count))
    }

    /// `gt NAME`: takes an exclusive lock and returns its fencing token (None if refused).
    pub async fn get_token(&mut self, name: impl AsRef<[u8]>) -> io::Result<Option<u64>> {
        let name = LockName::new(name.as_ref());
        let op = LockOp::GetToken;
        second_number(&self.request(&Request::Lock { op, name }).await?)
    }

    /// `t NAME`: the fencing token of the lock's current grant (None if not locked).
    pub async fn token(&mut self, name: impl AsRef<[u8]>) -> io::Result<Option<u64>> {
        let name = LockName::new(name.as_ref());
        let op = LockOp::Token;
        second_number(&self.request(&Request::Lock { op, name }).await?)
    }

    /// `rl NAME BURST COUNT PERIOD_MS QUANTITY`: one rate limit decision.
    pub async fn rate_limit(
        &mut self,
        name: impl AsRef<[u8]>,
        burst: u32,
        count: u32,
        period_ms: u32,
        quantity: u32,
    ) -> io::Result<RateLimited> {
        let op = LockOp::RateLimit(RateParams {
            burst,
            count,
            period_ms,
            quantity,
        });
        let name = LockName::new(name.as_ref());
        let reply = self.request(&Request::Lock { op, name }).await?;
        let text = String::from_utf8_lossy(&reply);
        let fields: Vec<i64> = text
            .split(' ')
            .map(|f| f.parse::<i64>())
            .collect::<Result<_, _>>()
            .map_err(|_| invalid(format!("bad rl reply {text:?}")))?;
        match fields[..] {
            [allowed, limit, remaining, retry_after_ms, reset_after_ms] => Ok(RateLimited {
                allowed: allowed == 1,
                limit: limit as u64,
                remaining: remaining as u64,
                retry_after_ms,
                reset_after_ms: reset_after_ms as u64,
            }),
            _ => Err(invalid(format!("bad rl reply {text:?}"))),
        }
    }

    /// `auth USER TOKEN`: authenticates this connection with a server that has a users file.
    /// A refusal (unknown user, wrong token, a server without users, the connection closed
    /// after too many failures) is a `PermissionDenied` error carrying the server's reply.
    pub async fn auth(&mut self, user: &str, token: &str) -> io::Result<()> {
        // One word each: whitespace would split them differently on the server, and a newline
        // would end the command early.
        let word = |w: &str| !w.is_empty() && !w.bytes().any(crate::protocol::is_space);
        if !word(user) || !word(token) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "auth: the user and the token must each be one word without whitespace",
            ));
        }
        let request = Request::Auth {
            user: user.as_bytes().into(),
            token: crate::protocol::Secret::new(token.as_bytes()),
        };
        let reply = self.request(&request).await?;
        if reply_code(&reply)? == 1 {
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

    /// `iam`: registers a name for this connection (empty clears it). False if the server has
    /// the registry disabled.
    pub async fn iam(&mut self, name: impl AsRef<[u8]>) -> io::Result<bool> {
        self.me_line = None;
        let request = Request::Iam(LockName::new(name.as_ref()));
        Ok(reply_code(&self.request(&request).await?)? == 1)
    }

    /// `me`: this connection's (id, registered name or id).
    pub async fn me(&mut self) -> io::Result<(String, Vec<u8>)> {
        let line = self.request(&Request::Me).await?;
        self.me_line = Some(line.clone());
        let rest = line
            .strip_prefix(b"1 ")
            .ok_or_else(|| invalid("bad me reply"))?;
        let at = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| invalid("bad me reply"))?;
        let id = String::from_utf8_lossy(&rest[..at]).into_owned();
        Ok((id, rest[at + 1..].to_vec()))
    }

    /// `q`: every stat by name.
    pub async fn stats(&mut self) -> io::Result<BTreeMap<String, u64>> {
        let mut bytes = Vec::new();
        Request::Stats.write_to(&mut bytes);
        self.send(&bytes).await?;
        let mut stats = BTreeMap::new();
        loop {
            let line = self.read_line().await?;
            let text = String::from_utf8(line).map_err(|_| invalid("stats are not text"))?;
            let (key, value) = text
                .split_once(": ")
                .ok_or_else(|| invalid(format!("bad stats line {text:?}")))?;
            let value = value
                .parse()
                .map_err(|_| invalid(format!("bad stats value {text:?}")))?;
            let last = key == "shared_orphans";
            stats.insert(key.to_owned(), value);
            if last {
                return Ok(stats);
            }
        }
    }

    /// A listing command (`d`, `d NAME`, `sd`, `who`, `h`, `q`…): its lines, each without `\n`.
    /// A server that has listings disabled answers one `0 disabled` line.
    ///
    /// The client asks for framed replies (`framed`) on its first listing, and then reads the
    /// count line and that many lines. A server that does not know `framed` (the original, which
    /// answers nothing to an unknown command, or answers `0 …`) gets `me` sent behind each
    /// listing instead, whose reply (`1 <id> <name>`) ends it: a listing row always ends in
    /// `: <holder>`.
    pub async fn listing(&mut self, command: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        check_line(command)?;
        if self.framed.is_none() {
            self.framed = Some(self.ask_framed().await?);
        }
        let mut bytes = command.to_vec();
        bytes.push(b'\n');
        if self.framed == Some(true) {
            self.send(&bytes).await?;
            let head = self.read_line().await?;
            let count = reply_code(&head)?;
            if count == 0 {
                // `0 lines`, or a one-line refusal such as `0 disabled`.
                return Ok(if head.starts_with(b"0 lines") {
                    Vec::new()
                } else {
                    vec![head]
                });
            }
            let mut lines = Vec::new();
            for _ in 0..count {
                lines.push(self.read_line().await?);
            }
            return Ok(lines);
        }
        if self.me_line.is_none() {
            self.me().await?;
        }
        Request::Me.write_to(&mut bytes);
        self.send(&bytes).await?;
        let mut lines = Vec::new();
        loop {
            let line = self.read_line().await?;
            if Some(&line) == self.me_line.as_ref() {
                return Ok(lines);
            }
            lines.push(line);
        }
    }

    /// Asks for framed listings; false when the server does not know `framed`.
    async fn ask_framed(&mut self) -> io::Result<bool> {
        let mut bytes = Vec::new();
        Request::Framed.write_to(&mut bytes);
        self.send(&bytes).await?;
        match tokio::time::timeout(FRAMED_TIMEOUT, self.read_line()).await {
            Ok(reply) => Ok(reply?.starts_with(b"1 ")),
            // The original server answers nothing to a command it does not know.
            Err(_) => Ok(false),
        }
    }

    /// Sends every line in one write and reads one reply line for each: the pipelined form of
    /// one-line commands.
    pub async fn pipeline<L: AsRef<[u8]>>(&mut self, lines: &[L]) -> io::Result<Vec<Vec<u8>>> {
        let mut bytes = Vec::new();
        for line in lines {
            check_line(line.as_ref())?;
            bytes.extend_from_slice(line.as_ref());
            bytes.push(b'\n');
        }
        self.send(&bytes).await?;
        let mut replies = Vec::with_capacity(lines.len());
        for _ in lines {
            replies.push(self.read_line().await?);
        }
        Ok(replies)
    }
}

/// How long a client waits for the answer to `framed` before it takes the server for one that
/// does not know the command (the original answers nothing to those).
const FRAMED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long [`ShardedClient::connect`] waits for the answer to `shards`: a server that does
/// not know the command (the original Go server answers nothing to an unknown command) is
/// then used through one connection.
const SHARDS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// A shard-aware client: one connection per shard, on each shard's own port, and each name
/// sent to the connection of the shard that owns it, so no command crosses the server's
/// threads. It learns the shard count, the routing function and the ports from `shards`; a
/// server without shard ports, or one that does not know `shards`, is used through a single
/// connection, with the same answers.
///
/// The locks belong to the connection that took them, as always: dropping the client releases
/// them all.
pub struct ShardedClient {
    /// One connection per shard, in shard order (or a single one).
    conns: Vec<Client>,
}

impl ShardedClient {
    /// Connects to a server's main TCP port and, if it has them, to its shard ports.
    pub async fn connect(host: &str, port: u16) -> io::Result<Self> {
        let mut first = Client::connect((host, port)).await?;
        let asked = tokio::time::timeout(SHARDS_TIMEOUT, first.request(&Request::Shards)).await;
        let ports = match asked {
            Ok(reply) => parse_shards(&reply?),
            // No answer: the connection may still get one later, so it is not used.
            Err(_) => {
                return Ok(ShardedClient {
                    conns: vec![Client::connect((host, port)).await?],
                })
            }
        };
        let Some(ports) = ports.filter(|ports| ports.len() > 1) else {
            return Ok(ShardedClient { conns: vec![first] });
        };
        let mut conns = Vec::with_capacity(ports.len());
        for port in ports {
            conns.push(Client::connect((host, port)).await?);
        }
        Ok(ShardedClient { conns })
    }

    /// How many connections it keeps: the server's shard count, or 1.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The connection that owns `name`'s shard: send it anything about that name.
    pub fn for_name(&mut self, name: &[u8]) -> &mut Client {
        let shard = crate::routing::shard_of(name, self.conns.len());
        &mut self.conns[shard]
    }

    /// `g` on the owning shard's connection.
    pub async fn get(&mut self, name: impl AsRef<[u8]>) -> io::Result<bool> {
        self.for_name(name.as_ref()).get(name.as_ref()).await
    }

    /// `r` on the owning shard's connection.
    pub async fn release(&mut self, name: impl AsRef<[u8]>) -> io::Result<bool> {
        self.for_name(name.as_ref()).release(name.as_ref()).await
    }

    /// `i` on the owning shard's connection.
    pub async fn inspect(&mut self, name: impl AsRef<[u8]>) -> io::Result<bool> {
        self.for_name(name.as_ref()).inspect(name.as_ref()).await
    }
}

/// The shard ports from a `shards` reply (`1 COUNT fnv1a64 [PORT…]`); None when the reply is
/// not one, uses another routing function, or lists no ports.
fn parse_shards(reply: &[u8]) -> Option<Vec<u16>> {
    let text = std::str::from_utf8(reply).ok()?;
    let mut words = text.split(' ');
    if words.next()? != "1" {
        return None;
    }
    let count: usize = words.next()?.parse().ok()?;
    if words.next()? != crate::protocol::ROUTING {
        return None;
    }
    let ports: Vec<u16> = words.map(str::parse).collect::<Result<_, _>>().ok()?;
    (ports.len() == count).then_some(ports)
}

/// An `rl` decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// -1 when the request can never be allowed.
    pub retry_after_ms: i64,
    pub reset_after_ms: u64,
}

/// The number after the leading `1` of `gt`/`t` replies (`1 <token> …`); None for a `0` reply.
fn second_number(line: &[u8]) -> io::Result<Option<u64>> {
    if reply_code(line)? == 0 {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(line);
    text.split(' ')
        .nth(1)
        .and_then(|t| t.parse().ok())
        .map(Some)
        .ok_or_else(|| invalid(format!("no token in {text:?}")))
}

fn newline_in_command() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "a command cannot contain a newline",
    )
}

fn check_line(line: &[u8]) -> io::Result<()> {
    if line.contains(&b'\n') {
        return Err(newline_in_command());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_replies_parse_to_their_ports() {
        assert_eq!(
            parse_shards(b"1 2 fnv1a64 7000 7001"),
            Some(vec![7000, 7001])
        );
        assert_eq!(parse_shards(b"1 2 fnv1a64"), None);
        assert_eq!(parse_shards(b"1 2 crc32 7000 7001"), None);
        assert_eq!(parse_shards(b"0 Invalid Command"), None);
    }

    #[test]
    fn reply_codes_parse() {
        assert_eq!(reply_code(b"1 Got Lock").unwrap(), 1);
        assert_eq!(reply_code(b"42 Got Shared Lock").unwrap(), 42);
        assert!(reply_code(b"Got").is_err());
        assert!(reply_code(b"").is_err());
    }
}
