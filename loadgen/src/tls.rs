//! `--tls`: the client side of TLS, for glockd's `-tls-port` and Redis' `--tls-port` alike.
//! The handshake is part of connecting: a connection's latency figures start after it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// The TLS settings of a run, from `--tls`, `--ca`, `--cert`, `--key` and `--server-name`.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// CA certificates (PEM) the server's certificate must chain to.
    pub ca: PathBuf,
    /// A client certificate chain and its key (PEM), for a server that asks for one.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// The name the server's certificate must carry.
    pub server_name: String,
}

/// A connector built once per run from [`TlsSettings`].
#[derive(Clone)]
pub struct Tls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls({:?})", self.server_name)
    }
}

impl Tls {
    /// Reads the files; an error names the file.
    pub fn new(settings: &TlsSettings) -> Result<Tls, String> {
        let mut roots = RootCertStore::empty();
        for cert in certs(&settings.ca)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", settings.ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match &settings.cert {
            Some((cert, key)) => {
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("{}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(certs(cert)?, key)
                    .map_err(|e| format!("{}: {e}", cert.display()))?
            }
            None => builder.with_no_client_auth(),
        };
        let server_name = ServerName::try_from(settings.server_name.clone())
            .map_err(|e| format!("--server-name {:?}: {e}", settings.server_name))?;
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The handshake over a connected stream.
    pub async fn connect<S>(&self, stream: S) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.connector
            .connect(self.server_name.clone(), stream)
            .await
    }
}
