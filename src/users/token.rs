//! Tokens: stored as SHA-256 digests, compared in constant time, and hashed for the users file
//! by `glockd hash-token`.
//!
//! The server never keeps a token, only its digest. A presented token is hashed first and the
//! two digests are compared with `subtle`'s constant-time equality, so how long `auth` takes
//! does not depend on how many leading bytes of the token (or of its digest) were right; and
//! an unknown user is compared against a decoy digest, so it costs what a wrong token costs.

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// The SHA-256 digest of `token`.
pub fn digest(token: &[u8]) -> Digest {
    let mut out = [0; 32];
    out.copy_from_slice(&Sha256::digest(token));
    out
}

/// Whether two digests are equal, in time that does not depend on where they differ.
pub fn same_digest(a: &Digest, b: &Digest) -> bool {
    a.ct_eq(b).into()
}

/// Whether `token` is the token whose digest is `expected`: the presented token is hashed, and
/// the digests compared in constant time.
pub fn token_matches(token: &[u8], expected: &Digest) -> bool {
    same_digest(&digest(token), expected)
}

/// A digest from the users file's `token_sha256` (64 hex digits, either case).
pub fn parse_digest(hex_text: &str) -> Result<Digest, String> {
    let mut out = [0; 32];
    hex::decode_to_slice(hex_text.trim(), &mut out)
        .map_err(|_| "token_sha256 must be 64 hex digits (see `glockd hash-token`)".to_owned())?;
    Ok(out)
}

/// What `glockd hash-token` prints for the token it read on standard input: the users file
/// line holding its digest. The input is one line (its `\n` or `\r\n` ending dropped); a token
/// that is empty, spans lines or holds whitespace is refused, since `auth USER TOKEN` could
/// never send it.
pub fn hash_token_line(input: &[u8]) -> Result<String, String> {
    let token = input.strip_suffix(b"\n").unwrap_or(input);
    let token = token.strip_suffix(b"\r").unwrap_or(token);
    if token.is_empty() {
        return Err(
            "no token on standard input (e.g. `openssl rand -hex 32 | glockd hash-token`)".into(),
        );
    }
    if token.iter().any(|&b| crate::protocol::is_space(b)) {
        return Err(
            "a token must be one line without whitespace (auth USER TOKEN sends one word)".into(),
        );
    }
    Ok(format!("token_sha256 = \"{}\"", hex::encode(digest(token))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_sha256() {
        // SHA-256("abc"), from FIPS 180-2.
        assert_eq!(
            hex::encode(digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_token_matches_its_digest_and_nothing_else() {
        let stored = digest(b"correct-horse");
        assert!(token_matches(b"correct-horse", &stored));
        // What is compared is a digest, not the token: a token that shares a long prefix with
        // the right one has a digest unrelated to the stored one, so nothing in the compare
        // can depend on how much of the token was right.
        for wrong in [&b"correct-hors"[..], b"correct-horsf", b"c", b""] {
            assert!(!token_matches(wrong, &stored));
            let presented = digest(wrong);
            assert_ne!(presented[..4], stored[..4]);
        }
        // Sending the stored digest itself (as hex, or raw) is no way in.
        assert!(!token_matches(hex::encode(stored).as_bytes(), &stored));
        assert!(!token_matches(&stored, &stored));
    }

    #[test]
    fn the_constant_time_compare_sees_every_byte() {
        let a = digest(b"x");
        for at in 0..32 {
            let mut b = a;
            b[at] ^= 1;
            assert!(!same_digest(&a, &b), "a difference at byte {at}");
        }
        assert!(same_digest(&a, &a));
    }

    #[test]
    fn hash_token_prints_the_line_for_the_users_file() {
        let line = hash_token_line(b"abc\n").unwrap();
        assert_eq!(
            line,
            "token_sha256 = \"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\""
        );
        assert_eq!(hash_token_line(b"abc\r\n").unwrap(), line);
        assert_eq!(hash_token_line(b"abc").unwrap(), line);
        let hex_part = line.split('"').nth(1).unwrap();
        assert_eq!(parse_digest(hex_part).unwrap(), digest(b"abc"));
        assert_eq!(
            parse_digest(&hex_part.to_uppercase()).unwrap(),
            digest(b"abc")
        );
        assert!(hash_token_line(b"").is_err());
        assert!(hash_token_line(b"\n").is_err());
        assert!(hash_token_line(b"two words\n").is_err());
        assert!(hash_token_line(b"two\nlines\n").is_err());
        assert!(parse_digest("abc").is_err());
        assert!(parse_digest(&"g".repeat(64)).is_err());
    }
}
