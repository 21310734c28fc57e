//! TLS on the `-tls-port` (line protocol) and `-tls-ws` (secure websocket) doors, with rustls
//! (ring for the cryptography: no OpenSSL in the server).
//!
//! A TLS connection is accepted like any other (its place under `--max-connections` first) and
//! then takes a place under `--max-tls-handshakes` ([`Handshake`]); past that it is closed at
//! once. Its shard thread does the handshake ([`serve`]), bounded by `--tls-handshake-timeout`,
//! and then serves it exactly as a plain connection of the same door.
//!
//! The certificate, key and client CA are read at start and again on SIGHUP ([`Tls::reload`]):
//! new handshakes use the new ones, live connections keep theirs, and files that do not load
//! leave the old ones in place.
//!
//! - [`identity`]: the name a verified client certificate gives its connection.
//! - [`client`]: the client side, for [`crate::client`] and the project's tools.

pub mod client;
pub mod identity;

use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::lifecycle::Admission;
use crate::peer::Peer;
use crate::shard::ShardCore;

/// The two TLS doors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsDoor {
    /// `-tls-port`: the line protocol.
    Line,
    /// `-tls-ws`: websockets.
    Ws,
}

impl TlsDoor {
    pub const ALL: [TlsDoor; 2] = [TlsDoor::Line, TlsDoor::Ws];

    /// The `door` label value.
    pub fn label(self) -> &'static str {
        match self {
            TlsDoor::Line => "tls",
            TlsDoor::Ws => "wss",
        }
    }
}

/// How a TLS handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    /// Done: the connection is served.
    Ok,
    /// Refused by either side: not TLS, no shared version or cipher, a client certificate
    /// missing, expired or from another CA, a client that hung up.
    Failed,
    /// Not finished within `--tls-handshake-timeout`.
    Timeout,
    /// Not started: `--max-tls-handshakes` were in progress.
    Busy,
}

impl HandshakeResult {
    pub const ALL: [HandshakeResult; 4] = [
        HandshakeResult::Ok,
        HandshakeResult::Failed,
        HandshakeResult::Timeout,
        HandshakeResult::Busy,
    ];

    /// The `result` label value.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeResult::Ok => "ok",
            HandshakeResult::Failed => "failed",
            HandshakeResult::Timeout => "timeout",
            HandshakeResult::Busy => "busy",
        }
    }
}

/// Where the TLS files are, to read them at start and on every reload.
#[derive(Debug, Clone)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// The server's TLS state, shared by every thread: the configuration new handshakes use, the
/// handshakes in progress, and the counts behind the metrics. Touched once per TLS connection
/// (and per reload), never per command.
pub struct Tls {
    files: TlsFiles,
    /// What new handshakes use; replaced whole by a reload, so a handshake in progress keeps
    /// the configuration it started with.
    current: RwLock<Arc<ServerConfig>>,
    /// `--tls-handshake-timeout`.
    timeout: Duration,
    /// `--max-tls-handshakes`.
    max_handshakes: u64,
    /// Handshakes in progress now.
    in_progress: AtomicU64,
    /// Handshakes by door and result (any thread counts them, so these are true atomics:
    /// handshakes are far too rare for the cost to matter).
    handshakes: [[AtomicU64; HandshakeResult::ALL.len()]; TlsDoor::ALL.len()],
    /// Reloads that took effect, and reloads refused (the old files kept).
    reloads: [AtomicU64; 2],
}

impl Tls {
    /// The TLS state for a server with TLS doors (`doors`), None without. An error (no
    /// certificate or key given, a file missing or unreadable, a key that does not match its
    /// certificate) names the file and the flag.
    pub fn from_config(config: &Config, doors: bool) -> io::Result<Option<Tls>> {
        if !doors {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "-tls-port and -tls-ws need -tls-cert and -tls-key",
            ));
        };
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: config.tls_client_ca.clone(),
        };
        let current = load(&files).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Some(Tls {
            files,
            current: RwLock::new(current),
            timeout: Duration::from_secs(config.tls_handshake_timeout),
            max_handshakes: config.max_tls_handshakes,
            in_progress: AtomicU64::new(0),
            handshakes: Default::default(),
            reloads: Default::default(),
        }))
    }

    /// Re-reads the certificate, key and client CA. On success new handshakes use them; on
    /// failure nothing changes and the error says why (one line).
    pub fn reload(&self) -> Result<(), String> {
        match load(&self.files) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                self.reloads[0].fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.reloads[1].fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Whether client certificates are required.
    pub fn verifies_clients(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// A place for one more handshake, or None when `--max-tls-handshakes` are in progress
    /// (counted `busy` for `door`).
    pub fn begin(self: &Arc<Self>, door: TlsDoor) -> Option<Handshake> {
        let mut now = self.in_progress.load(Ordering::Relaxed);
        loop {
            if now >= self.max_handshakes {
                self.count(door, HandshakeResult::Busy);
                return None;
            }
            match self.in_progress.compare_exchange_weak(
                now,
                now + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Handshake {
                        tls: self.clone(),
                        door,
                    })
                }
                Err(seen) => now = seen,
            }
        }
    }

    fn count(&self, door: TlsDoor, result: HandshakeResult) {
        self.handshakes[door as usize][result as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Handshakes at `door` that ended with `result`, since start.
    pub fn handshakes(&self, door: TlsDoor, result: HandshakeResult) -> u64 {
        self.handshakes[door as usize][result as usize].load(Ordering::Relaxed)
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> u64 {
        self.in_progress.load(Ordering::Relaxed)
    }

    /// Reloads that took effect (`true`) or were refused (`false`), since start.
    pub fn reloads(&self, took_effect: bool) -> u64 {
        self.reloads[usize::from(!took_effect)].load(Ordering::Relaxed)
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// A TLS connection's place under `--max-tls-handshakes`, given back when its handshake ends
/// (or the connection is dropped before).
pub struct Handshake {
    tls: Arc<Tls>,
    door: TlsDoor,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.tls.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The crypto provider: ring, named here so that no process-wide default is needed.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file; an error names the file.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file; an error names the file.
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!(
            "{}: no unencrypted private key in the file (PKCS#8, PKCS#1 or SEC1 PEM; decrypt an \
             encrypted one with `openssl pkey -in KEY -out PLAIN`)",
            path.display()
        ),
        e => format!("{}: {e}", path.display()),
    })
}

/// A root store of every certificate in a PEM file.
pub(crate) fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Builds the server configuration from the files: TLS 1.2 and 1.3 with rustls' default (safe)
/// cipher suites, the certificate chain and key, and client certificate verification when a
/// client CA is given.
fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs(&files.cert).map_err(|e| format!("-tls-cert {e}"))?;
    let key = read_key(&files.key).map_err(|e| format!("-tls-key {e}"))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &files.client_ca {
        Some(path) => {
            let roots = read_roots(path).map_err(|e| format!("-tls-client-ca {e}"))?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| format!("-tls-client-ca {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "-tls-cert {} with -tls-key {}: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    Ok(Arc::new(config))
}

/// Does a TLS connection's handshake on its shard thread, within `--tls-handshake-timeout`,
/// then serves it as its door's plain connections are served. A failed or slow handshake
/// closes the connection (counted, and logged with `-verbose`).
pub async fn serve(
    core: Rc<ShardCore>,
    stream: TcpStream,
    id: String,
    admission: Admission,
    handshake: Handshake,
) {
    let tls = handshake.tls.clone();
    let door = handshake.door;
    let accept = tls.acceptor().accept(stream);
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(tls.timeout, accept) => outcome,
        // Shutting down, or a live upgrade (TLS is not carried): the half-made connection
        // just closes.
        _ = core.conns.stopping() => return,
    };
    let stream = match outcome {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tls.count(door, HandshakeResult::Failed);
            if core.server.config.verbose {
                tracing::info!(event = "tls_handshake_failed", conn = %id, door = door.label(), error = %e);
            }
            return;
        }
        Err(_) => {
            tls.count(door, HandshakeResult::Timeout);
            if core.server.config.verbose {
                tracing::info!(
                    event = "tls_handshake_failed",
                    conn = %id,
                    door = door.label(),
                    error = "timed out"
                );
            }
            return;
        }
    };
    tls.count(door, HandshakeResult::Ok);
    drop(handshake);
    let peer = Peer {
        certificate: stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(identity::subject)
            .map(Arc::from),
        uid: None,
        door: match door {
            TlsDoor::Line => crate::peer::DoorKind::Tls,
            TlsDoor::Ws => crate::peer::DoorKind::Wss,
        },
    };
    match door {
        TlsDoor::Line => crate::connection::serve(core, stream, id, admission, peer).await,
        TlsDoor::Ws => crate::websocket::serve(core, stream, id, admission, peer).await,
    }
}
