//! Shard-aware runs (`--shard-aware`): ask a glockd server how names map to its shards and
//! where each shard's own port is, then send every name to its owner.
//!
//! The routing function is the server's documented one, `fnv1a64(name) % shards`, written out
//! here rather than taken from the server's code: the load generator is a client like any
//! other.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::cli::{Config, Endpoint};
use crate::wire::Target;

/// How long the server may take to answer `shards`.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The shard of `name` among `shards`, as glockd routes it.
pub fn shard_of(name: &[u8], shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % shards as u64) as usize
}

/// Each shard's own address, in shard order; empty (with a word on stderr) when the server has
/// no shard ports, so the run is an ordinary one.
pub fn discover(config: &Config) -> Result<Vec<SocketAddr>, String> {
    let Endpoint::Tcp(addr) = &config.endpoint else {
        return Err("--shard-aware needs a TCP address".into());
    };
    if config.target != Target::Glockd {
        return Err("--shard-aware needs --target glockd".into());
    }
    let ask = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(addr, ASK_TIMEOUT)?;
        stream.set_read_timeout(Some(ASK_TIMEOUT))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        if let Some(crate::cli::AuthLine(auth)) = &config.auth_line {
            stream.write_all(auth)?;
            reader.read_line(&mut line)?;
            if !line.starts_with("1 ") {
                return Err(std::io::Error::other(format!(
                    "auth refused: {}",
                    line.trim_end()
                )));
            }
            line.clear();
        }
        stream.write_all(b"shards\n")?;
        reader.read_line(&mut line)?;
        Ok(line)
    };
    let line = ask().map_err(|e| format!("--shard-aware: asking {addr} for `shards`: {e}"))?;
    let ports = parse(line.trim_end());
    if ports.is_empty() {
        eprintln!(
            "loadgen: {addr} has no shard ports (answered {:?}); running as an ordinary client",
            line.trim_end()
        );
    }
    Ok(ports
        .into_iter()
        .map(|port| SocketAddr::new(addr.ip(), port))
        .collect())
}

/// The ports of a `1 COUNT fnv1a64 PORT…` reply; none for any other reply.
fn parse(reply: &str) -> Vec<u16> {
    let words: Vec<&str> = reply.split(' ').collect();
    match words.as_slice() {
        ["1", count, "fnv1a64", ports @ ..] if count.parse() == Ok(ports.len()) => ports
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, _>>()
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_routing_match_the_servers_documentation() {
        assert_eq!(parse("1 2 fnv1a64 7000 7001"), vec![7000, 7001]);
        assert!(parse("1 2 fnv1a64").is_empty());
        assert!(parse("0 Invalid Command").is_empty());
        // FNV-1a 64 of "foobar" is 0x85944171f73967e8.
        assert_eq!(
            shard_of(b"foobar", 1000),
            (0x8594_4171_f739_67e8_u64 % 1000) as usize
        );
        assert_eq!(shard_of(b"x", 1), 0);
    }
}
