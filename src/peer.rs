//! What the transport knows of the other end of a connection before it sends a command: the
//! identity a door vouches for, which the users layer may map to a user.

use std::sync::Arc;

/// Facts about a connection's peer that come from its door, not from its commands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The subject of the client certificate a TLS door verified (its common name, or else its
    /// first subject alternative name).
    pub certificate: Option<Arc<str>>,
    /// The user id of the process at the other end of a unix-socket connection.
    pub uid: Option<u32>,
}

impl Peer {
    /// A peer its door knows nothing about (plain TCP and websocket connections).
    pub fn anonymous() -> Peer {
        Peer::default()
    }

    /// A unix-socket peer, with the user id the kernel reports for it, when it does.
    pub fn unix(stream: &tokio::net::UnixStream) -> Peer {
        Peer {
            certificate: None,
            uid: stream.peer_cred().ok().map(|cred| cred.uid()),
        }
    }
}
