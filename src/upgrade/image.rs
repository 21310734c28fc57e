//! The state a running server hands its successor, as one versioned image: every carried
//! connection, every shard's table, the registry and the counters `q` shows.

use serde::{Deserialize, Serialize};

use crate::table::TableImage;

/// The hand-over format's version. A successor that reads another version refuses the
/// hand-over, and the running server carries on.
pub const VERSION: u32 = 1;

/// The door a carried connection came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnDoor {
    Tcp,
    Unix,
    /// A websocket over plain TCP: its input and output are websocket frames (what the client
    /// sent and the server had not handed out as messages; what the server had not written).
    /// Added after the first release of the format, at the end, so that images without one
    /// read as before; a binary that predates it cannot read an image with one, and refuses
    /// the hand-over (the running server carries on).
    Ws,
}

/// One client connection, stopped between two commands (or in a wait).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnImage {
    pub conn: u64,
    pub door: ConnDoor,
    /// Its protocol id (`ip:port`, `unix:N`).
    pub id_text: String,
    /// Bytes read and not yet run (a partial line included).
    pub input: Vec<u8>,
    /// Replies not yet written.
    pub output: Vec<u8>,
    /// The client closed its side; what it sent is still to be answered.
    pub eof: bool,
    /// It sent `framed`.
    pub framed: bool,
    /// It pipelines (reads with large buffers).
    pub pipelining: bool,
    /// The user it authenticated as (`auth`), with a users file.
    pub user: Option<String>,
    /// It waits in a queue (`gw`, `sgw`); the queue is in the tables' image.
    pub waiting: bool,
    /// Time left before `--idle-timeout` closes it, if that is on.
    pub idle_left_ms: Option<u64>,
    /// How long the unfinished line at the end of `input` has waited (`--line-timeout`).
    pub unfinished_ms: Option<u64>,
    /// Failed `auth`s in a row (`--auth-max-failures`).
    pub auth_failures: u32,
}

/// What the registry knows of one connection (live, or gone with locks still to release).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordImage {
    pub conn: u64,
    pub id: Vec<u8>,
    pub name: Option<Vec<u8>>,
}

/// The counters `q` and `/metrics` add up since start, summed over the shards (the gauges are
/// recomputed from the tables; lock waits and rate limits travel in the tables' counts).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CountersImage {
    pub commands: Vec<u64>,
    pub invalid_commands: u64,
    pub connections_opened: u64,
    pub connections_closed: u64,
    pub orphans: u64,
    pub shared_orphans: u64,
}

/// The whole hand-over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerImage {
    /// The carried connections, in the order of their descriptors.
    pub conns: Vec<ConnImage>,
    /// One per shard of the running server (the successor may have another number).
    pub tables: Vec<TableImage>,
    /// Connections gone whose locks are still being released.
    pub departed: Vec<u64>,
    pub registry: Vec<RecordImage>,
    pub counters: CountersImage,
    /// The next connection id, and unix connections so far.
    pub next_conn: u64,
    pub unix_connections: u64,
}

/// Encodes an image: its version first, so a successor of another version says so instead of
/// misreading it.
pub fn encode(image: &ServerImage) -> std::io::Result<Vec<u8>> {
    let mut out = VERSION.to_le_bytes().to_vec();
    postcard::to_io(image, &mut out)
        .map_err(|e| std::io::Error::other(format!("cannot encode the state: {e}")))?;
    Ok(out)
}

/// Decodes an image encoded by [`encode`] of this version.
pub fn decode(bytes: &[u8]) -> Result<ServerImage, String> {
    let (version, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or("an empty state image")?;
    let version = u32::from_le_bytes(*version);
    if version != VERSION {
        return Err(format!(
            "state image version {version}, this glockd reads version {VERSION}"
        ));
    }
    postcard::from_bytes(rest).map_err(|e| format!("cannot decode the state image: {e}"))
}
