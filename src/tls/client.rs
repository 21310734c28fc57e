//! The client side of TLS: which CA to trust, which certificate to present, which name to
//! check the server's certificate against.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

/// What a client needs to speak TLS to a glockd TLS door.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// CA certificates (PEM) the server's certificate must chain to.
    pub ca: PathBuf,
    /// A client certificate chain (PEM) and its key, for a server with `-tls-client-ca`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the server's certificate must carry (a DNS name or IP address).
    pub server_name: String,
}

/// A ready TLS client configuration: build it once, connect many times.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl TlsClient {
    /// Reads the files `options` name. An error names the file.
    pub fn new(options: &TlsOptions) -> io::Result<TlsClient> {
        let roots = super::read_roots(&options.ca).map_err(invalid)?;
        let builder = ClientConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&options.cert, &options.key) {
            (Some(cert), Some(key)) => {
                let certs = super::read_certs(cert).map_err(invalid)?;
                let key = super::read_key(key).map_err(invalid)?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| invalid(format!("client certificate: {e}")))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(invalid(
                    "a client certificate needs both its file and its key".to_owned(),
                ))
            }
        };
        let server_name = ServerName::try_from(options.server_name.clone())
            .map_err(|e| invalid(format!("server name {:?}: {e}", options.server_name)))?;
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Does the TLS handshake over a connected stream.
    pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> io::Result<TlsStream<S>> {
        self.connector
            .connect(self.server_name.clone(), stream)
            .await
    }
}
