//! The name a verified client certificate gives its connection: the subject's common name, or
//! else its first subject alternative name (DNS name, e-mail address, URI or IP address), as
//! etcd and Redis take a client certificate's CN for its user.

use std::fmt::Write as _;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// The identity `cert` names, exactly as the certificate has it, or None when it names none
/// (no common name and no alternative name of a kind above). This exact text is what a users
/// file maps to a user; [`display_name`] is what listings show.
pub fn subject(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok().map(str::to_owned))
        .filter(|cn| !cn.trim().is_empty());
    let name = common_name.or_else(|| {
        let san = cert.subject_alternative_name().ok().flatten()?;
        san.value.general_names.iter().find_map(|name| match name {
            GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                Some((*s).to_owned())
            }
            GeneralName::IPAddress(bytes) => ip_text(bytes),
            _ => None,
        })
    })?;
    Some(name).filter(|name| !name.trim().is_empty())
}

/// What a verified certificate identity is listed as: `cert:` and the subject, made safe for
/// listings (control characters, such as a newline that would split a listing row, become `?`)
/// and cut to at most `max_bytes` bytes in all (at a character boundary), the longest name
/// `iam` accepts. The prefix is one `iam` refuses, so no client can take a name that reads as
/// a certificate's.
pub fn display_name(subject: &str, max_bytes: usize) -> String {
    let mut name = String::from(CERT_PREFIX);
    name.push_str(&printable(
        subject,
        max_bytes.saturating_sub(CERT_PREFIX.len()),
    ));
    name
}

/// The prefix of every certificate identity in listings.
pub const CERT_PREFIX: &str = "cert:";

/// An IP address SAN (4 or 16 bytes) as text.
fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv4Addr::from(b).to_string()),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv6Addr::from(b).to_string()),
        _ => None,
    }
}

/// `name` with control characters replaced by `?` and cut to `max_bytes` bytes.
fn printable(name: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(name.len().min(max_bytes));
    for c in name.trim().chars() {
        let c = if c.is_control() { '?' } else { c };
        if out.len() + c.len_utf8() > max_bytes {
            break;
        }
        let _ = out.write_char(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_are_marked_and_bounded() {
        assert_eq!(display_name("alice", 4096), "cert:alice");
        assert_eq!(display_name("a\nb", 4096), "cert:a?b");
        assert_eq!(display_name("alice", 7), "cert:al");
        assert_eq!(display_name("alice", 3), "cert:");
    }

    #[test]
    fn names_are_made_safe_for_listings() {
        assert_eq!(printable("alice", 4096), "alice");
        assert_eq!(printable("a\nb\r\tc", 4096), "a?b??c");
        assert_eq!(printable("  svc ", 4096), "svc");
        assert_eq!(printable("héhé", 3), "hé");
        assert_eq!(printable("abc", 0), "");
    }

    #[test]
    fn ip_addresses_read_as_text() {
        assert_eq!(ip_text(&[10, 0, 0, 1]).as_deref(), Some("10.0.0.1"));
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert_eq!(ip_text(&v6).as_deref(), Some("::1"));
        assert_eq!(ip_text(&[1, 2, 3]), None);
    }
}
