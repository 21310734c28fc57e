//! What the transport knows of the other end of a connection before it sends a command: the
//! door it came through, and the identity a door vouches for, which the users layer may map
//! to a user.

use std::sync::Arc;

/// Facts about a connection's peer that come from its door, not from its commands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The door the connection came through (a label of the users metrics).
    pub door: DoorKind,
    /// The subject of the client certificate a TLS door verified (its common name, or else its
    /// first subject alternative name).
    pub certificate: Option<Arc<str>>,
    /// The user id of the process at the other end of a unix-socket connection.
    pub uid: Option<u32>,
}

/// The kinds of door, as metric labels name them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DoorKind {
    /// Plain TCP (`-port`, and the shard ports).
    #[default]
    Tcp,
    /// Plain websockets (`-ws`).
    Ws,
    /// The unix socket (`-unix`).
    Unix,
    /// TCP under TLS.
    Tls,
    /// Websockets under TLS.
    Wss,
}

impl DoorKind {
    /// Every kind, in index order.
    pub const ALL: [DoorKind; 5] = [
        DoorKind::Tcp,
        DoorKind::Ws,
        DoorKind::Unix,
        DoorKind::Tls,
        DoorKind::Wss,
    ];

    /// The number of kinds (the size of per-door counter arrays).
    pub const COUNT: usize = Self::ALL.len();

    /// Index into per-door arrays.
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    /// The `door` label value.
    pub fn label(self) -> &'static str {
        match self {
            DoorKind::Tcp => "tcp",
            DoorKind::Ws => "ws",
            DoorKind::Unix => "unix",
            DoorKind::Tls => "tls",
            DoorKind::Wss => "wss",
        }
    }
}

impl Peer {
    /// A plain TCP peer its door knows nothing about.
    pub fn anonymous() -> Peer {
        Peer::default()
    }

    /// A plain websocket peer its door knows nothing about.
    pub fn websocket() -> Peer {
        Peer {
            door: DoorKind::Ws,
            ..Peer::default()
        }
    }

    /// A unix-socket peer, with the user id the kernel reports for it, when it does.
    pub fn unix(stream: &tokio::net::UnixStream) -> Peer {
        Peer {
            door: DoorKind::Unix,
            certificate: None,
            uid: stream.peer_cred().ok().map(|cred| cred.uid()),
        }
    }
}
