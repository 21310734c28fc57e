//! The architecture check's baseline: the obvious alternative to glockd's design. One lock table
//! split into `SHARDS` `std::sync::Mutex<HashMap>` pieces, shared by every connection, served by a
//! tokio multi-thread runtime (work stealing, one worker per core). It speaks the protocol subset
//! the churn bench uses (`g`, `r`, `i`), parses with glockd's own parser, batches its replies per
//! read like glockd, and releases a connection's locks when it goes away.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::{Arc, Mutex};

use glockd::protocol::{parse, LockOp, Reply, Request};
use glockd::{LockName, NameHasher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Table pieces: many more than cores, so two workers rarely want the same one.
const SHARDS: usize = 64;

/// The shared table.
struct Table {
    /// Routes a name to its piece.
    hasher: NameHasher,
    /// Each piece: name → holder connection.
    shards: Vec<Mutex<HashMap<LockName, u64, NameHasher>>>,
}

impl Table {
    fn shard(&self, name: &[u8]) -> &Mutex<HashMap<LockName, u64, NameHasher>> {
        let hash = self.hasher.hash_one(name);
        &self.shards[(hash % SHARDS as u64) as usize]
    }
}

/// A running baseline server; dropping it stops the runtime.
pub struct MutexServer {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for MutexServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Starts the baseline on an ephemeral loopback port with `workers` runtime threads.
pub fn start(workers: usize) -> MutexServer {
    let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("local addr");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");
    let hasher = glockd::name_hasher();
    let table = Arc::new(Table {
        shards: (0..SHARDS)
            .map(|_| Mutex::new(HashMap::with_hasher(hasher.clone())))
            .collect(),
        hasher,
    });
    runtime.spawn(async move {
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let mut next_conn = 1u64;
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve(stream, table.clone(), next_conn));
            next_conn += 1;
        }
    });
    MutexServer {
        addr,
        runtime: Some(runtime),
    }
}

async fn serve(mut stream: TcpStream, table: Arc<Table>, conn: u64) {
    let mut input = Vec::with_capacity(16 * 1024);
    let mut out = Vec::with_capacity(16 * 1024);
    let mut held: HashSet<LockName, NameHasher> = HashSet::with_hasher(table.hasher.clone());
    loop {
        if input.capacity() - input.len() < 4096 {
            input.reserve(16 * 1024);
        }
        match stream.read_buf(&mut input).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let mut start = 0;
        while let Some(at) = memchr::memchr(b'\n', &input[start..]) {
            let line = &input[start..start + at];
            start += at + 1;
            let reply = match parse(line) {
                Request::Empty => continue,
                Request::Lock { op, name } => apply(&table, conn, op, name, &mut held),
                _ => Reply::Invalid,
            };
            reply.write_to(&mut out);
        }
        input.drain(..start);
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
    }
    // Orphaning: release everything this connection held.
    for name in held {
        let mut shard = table
            .shard(name.as_bytes())
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if shard.get(name.as_bytes()) == Some(&conn) {
            shard.remove(name.as_bytes());
        }
    }
}

fn apply(
    table: &Table,
    conn: u64,
    op: LockOp,
    name: LockName,
    held: &mut HashSet<LockName, NameHasher>,
) -> Reply {
    let mut shard = table
        .shard(name.as_bytes())
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    match op {
        LockOp::Get => match shard.get(name.as_bytes()) {
            Some(&holder) if holder == conn => Reply::Got,
            Some(_) => Reply::NotGot,
            None => {
                shard.insert(name.clone(), conn);
                drop(shard);
                held.insert(name);
                Reply::Got
            }
        },
        LockOp::Release => {
            if shard.get(name.as_bytes()) == Some(&conn) {
                shard.remove(name.as_bytes());
                drop(shard);
                held.remove(name.as_bytes());
                Reply::Released
            } else {
                Reply::NotReleased
            }
        }
        LockOp::Inspect => {
            if shard.contains_key(name.as_bytes()) {
                Reply::Locked
            } else {
                Reply::NotLocked
            }
        }
        _ => Reply::Invalid,
    }
}
