//! Throwaway certificates for the TLS tests, made with rcgen when a test runs and written to a
//! scratch directory: a CA, server certificates for `localhost` and 127.0.0.1, and client
//! certificates (valid, expired, or from another CA). No key is ever committed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate (PEM) and its key (PEM), as files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test certificate authority and the directory its files go to.
pub struct Pki {
    pub dir: PathBuf,
    /// The CA's certificate (PEM): what clients and `-tls-client-ca` trust.
    pub ca: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
    next: AtomicU64,
}

static DIRS: AtomicU64 = AtomicU64::new(0);

/// How a client certificate is made.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientCert<'a> {
    /// The subject's common name, if any.
    pub common_name: Option<&'a str>,
    /// A DNS subject alternative name, if any.
    pub dns_name: Option<&'a str>,
    /// Valid only in the past.
    pub expired: bool,
}

impl Pki {
    /// A new CA named `name`, its files in a fresh directory.
    pub fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "glockd-tls-{}-{}-{name}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pki dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key"))
            .expect("ca cert");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, issuer.pem()).expect("write ca");
        Pki {
            dir,
            ca,
            issuer,
            next: AtomicU64::new(0),
        }
    }

    fn write(&self, tag: &str, cert: &rcgen::Certificate, key: &KeyPair) -> CertFiles {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let files = CertFiles {
            cert: self.dir.join(format!("{tag}-{n}.pem")),
            key: self.dir.join(format!("{tag}-{n}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }

    /// A server certificate for `localhost` and 127.0.0.1, its common name `common_name`.
    pub fn server(&self, common_name: &str) -> CertFiles {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        self.write("server", &cert, &key)
    }

    /// A client certificate.
    pub fn client(&self, how: ClientCert<'_>) -> CertFiles {
        let mut params = CertificateParams::new(
            how.dns_name
                .map(|name| vec![name.to_owned()])
                .unwrap_or_default(),
        )
        .expect("client params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = how.common_name {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if how.expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("client key");
        let cert = params.signed_by(&key, &self.issuer).expect("client cert");
        self.write("client", &cert, &key)
    }

    /// A client certificate whose common name is `name`.
    pub fn client_named(&self, name: &str) -> CertFiles {
        self.client(ClientCert {
            common_name: Some(name),
            ..ClientCert::default()
        })
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One CA and server certificate for every test of this process that just needs a TLS door.
pub fn shared() -> &'static (Pki, CertFiles) {
    static SHARED: OnceLock<(Pki, CertFiles)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let pki = Pki::new("shared");
        let server = pki.server("glockd test server");
        (pki, server)
    })
}

/// A client configuration trusting `ca`, presenting `cert` if given, checking the name
/// `localhost`.
pub fn client(ca: &Path, cert: Option<&CertFiles>) -> glockd::client::TlsClient {
    glockd::client::TlsClient::new(&glockd::client::TlsOptions {
        ca: ca.to_owned(),
        cert: cert.map(|c| c.cert.clone()),
        key: cert.map(|c| c.key.clone()),
        server_name: "localhost".to_owned(),
    })
    .expect("tls client config")
}
