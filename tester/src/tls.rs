//! `--tls`: the TLS line door (`-tls-port`), over the tester's own rustls client (the tester
//! shares no code with the server).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use crate::conn::{Connecting, Connector, Link, Opened};

/// The TLS door: TCP to `HOST:PORT`, then a handshake checking the server's certificate.
pub struct TlsConnector {
    pub host: String,
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
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

impl TlsConnector {
    /// Trusts the CA certificates in `ca`, presents `client` (certificate, key) if given, and
    /// checks the server's certificate against `server_name`. An error names the file.
    pub fn new(
        host: String,
        ca: &Path,
        client: Option<(PathBuf, PathBuf)>,
        server_name: &str,
    ) -> Result<TlsConnector, String> {
        let mut roots = RootCertStore::empty();
        for cert in certs(ca)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => {
                let key = PrivateKeyDer::from_pem_file(&key)
                    .map_err(|e| format!("{}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(certs(&cert)?, key)
                    .map_err(|e| format!("{}: {e}", cert.display()))?
            }
            None => builder.with_no_client_auth(),
        };
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| format!("--server-name {server_name:?}: {e}"))?;
        Ok(TlsConnector {
            host,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

impl Connector for TlsConnector {
    fn connect(&self) -> Connecting<'_> {
        Box::pin(async move {
            let stream = TcpStream::connect(self.host.as_str()).await?;
            stream.set_nodelay(true)?;
            let local_id = stream.local_addr().ok().map(|a| a.to_string());
            let stream = self
                .connector
                .connect(self.server_name.clone(), stream)
                .await?;
            Ok(Opened {
                link: Link::Bytes(Box::new(stream)),
                local_id,
            })
        })
    }

    fn describe(&self) -> String {
        format!("tls {}", self.host)
    }
}

/// The host part of `HOST:PORT` (brackets of an IPv6 address removed): the default name to
/// check the server's certificate against.
pub fn host_name(host: &str) -> &str {
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    name.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_comes_from_the_host() {
        assert_eq!(host_name("localhost:9996"), "localhost");
        assert_eq!(host_name("127.0.0.1:9996"), "127.0.0.1");
        assert_eq!(host_name("[::1]:9996"), "::1");
        assert_eq!(host_name("db.example"), "db.example");
    }
}
