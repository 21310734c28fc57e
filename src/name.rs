//! `LockName`: the bytes that name a lock, stored inline when short.
//!
//! Lock names are arbitrary bytes (any encoding, NUL included). Most real names are short
//! ("job:1234", a user id, a URL path), so names up to [`LockName::INLINE`] bytes live inside the
//! value itself and taking a lock with such a name allocates nothing. Longer names (10 000-byte
//! names are in real use) go to the heap.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};

/// Inline capacity: chosen so that a `LockName` is exactly three words (24 bytes).
const INLINE: usize = 22;

/// An owned lock name.
#[derive(Clone)]
pub struct LockName(Repr);

#[derive(Clone)]
enum Repr {
    /// A short name, stored in place: `bytes[..len]`.
    Inline { len: u8, bytes: [u8; INLINE] },
    /// A long name, on the heap.
    Heap(Box<[u8]>),
}

// The whole point of the inline form is its size; keep it honest.
const _: () = assert!(std::mem::size_of::<LockName>() == 24);

impl LockName {
    /// How many bytes a name may have and still be stored without a heap allocation.
    pub const INLINE: usize = INLINE;

    /// The empty name (the original server accepts `g` with no name, so we do too).
    pub const fn empty() -> Self {
        LockName(Repr::Inline {
            len: 0,
            bytes: [0; INLINE],
        })
    }

    /// Copies `bytes` into a new name.
    pub fn new(bytes: &[u8]) -> Self {
        if bytes.len() <= INLINE {
            let mut inline = [0u8; INLINE];
            inline[..bytes.len()].copy_from_slice(bytes);
            LockName(Repr::Inline {
                // Cannot truncate: bytes.len() <= INLINE < 256.
                len: bytes.len() as u8,
                bytes: inline,
            })
        } else {
            LockName(Repr::Heap(bytes.into()))
        }
    }

    /// The name's bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..*len as usize],
            Repr::Heap(bytes) => bytes,
        }
    }

    /// Whether the name is stored on the heap (for memory accounting and tests).
    pub fn is_heap(&self) -> bool {
        matches!(self.0, Repr::Heap(_))
    }

    /// The number of bytes in the name.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether the name has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for LockName {
    fn default() -> Self {
        LockName::empty()
    }
}

impl From<&[u8]> for LockName {
    fn from(bytes: &[u8]) -> Self {
        LockName::new(bytes)
    }
}

impl From<&str> for LockName {
    fn from(s: &str) -> Self {
        LockName::new(s.as_bytes())
    }
}

impl PartialEq for LockName {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for LockName {}

impl PartialOrd for LockName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for LockName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

// Hash exactly as `[u8]` does, so that a `&[u8]` can look up a `LockName` key (`Borrow`).
impl Hash for LockName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl Borrow<[u8]> for LockName {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_inline_and_long_ones_on_the_heap() {
        let short = LockName::new(&[b'x'; INLINE]);
        assert!(!short.is_heap());
        assert_eq!(short.as_bytes(), &[b'x'; INLINE]);
        let long = LockName::new(&[b'y'; INLINE + 1]);
        assert!(long.is_heap());
        assert_eq!(long.len(), INLINE + 1);
    }

    #[test]
    fn names_are_bytes_not_text() {
        let raw = [0u8, 0xff, 0xfe, b' ', 0x80];
        let name = LockName::new(&raw);
        assert_eq!(name.as_bytes(), &raw);
        assert_eq!(name, LockName::new(&raw));
        assert_ne!(name, LockName::new(&raw[..4]));
    }

    #[test]
    fn empty_name_is_a_name() {
        assert!(LockName::empty().is_empty());
        assert_eq!(LockName::empty(), LockName::new(b""));
    }
}
