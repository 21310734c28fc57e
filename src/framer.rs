//! Bytes in, lines out: the one framer every door uses. TCP and unix sockets read into it;
//! a websocket message is put into it whole and ends like end of input does.
//!
//! Lines are handed out in place, and the consumed bytes are dropped once per batch
//! ([`LineFramer::compact`]), so a pipelined batch costs one move of the leftover bytes, not
//! one per line. A line longer than the limit, finished or not, is refused ([`LineTooLong`])
//! as soon as it is seen, never buffered without end.

use bytes::{Buf, BytesMut};

/// A line (or the unfinished input) is longer than `--max-line-bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong;

/// Splits a byte stream into `\n`-terminated lines.
pub struct LineFramer {
    /// Bytes read and not yet dropped.
    buf: BytesMut,
    /// Where the first line not yet handed out starts.
    start: usize,
    /// Bytes from `start` already searched for a newline without finding one, so a long line
    /// arriving in small pieces is scanned once, not once per piece.
    searched: usize,
    /// The longest line, `\n` included, that is accepted.
    max_line: usize,
}

impl LineFramer {
    pub fn new(max_line: usize) -> Self {
        LineFramer {
            buf: BytesMut::new(),
            start: 0,
            searched: 0,
            max_line,
        }
    }

    /// The buffer to read into: only append to it.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Appends bytes that arrived some other way (a websocket message, input read while a
    /// command waited).
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line, without its `\n`; None when only an unfinished line (or
    /// nothing) is left. A line over the limit, or unfinished input that already is, is an
    /// error: the caller refuses it and closes the connection.
    #[inline]
    pub fn next_line(&mut self) -> Result<Option<&[u8]>, LineTooLong> {
        let from = self.start + self.searched;
        match memchr::memchr(b'\n', &self.buf[from..]) {
            Some(at) => {
                let end = from + at;
                let start = self.start;
                self.start = end + 1;
                self.searched = 0;
                if end + 1 - start > self.max_line {
                    return Err(LineTooLong);
                }
                Ok(Some(&self.buf[start..end]))
            }
            None => {
                self.searched = self.buf.len() - self.start;
                if self.searched >= self.max_line {
                    return Err(LineTooLong);
                }
                Ok(None)
            }
        }
    }

    /// Drops the lines already handed out (once per batch).
    pub fn compact(&mut self) {
        self.buf.advance(self.start);
        self.start = 0;
    }

    /// Bytes not yet handed out as lines: complete lines still to come, or an unfinished one.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether a complete line waits to be handed out (a scan of the pending bytes: for rare
    /// checks, not per line).
    pub fn has_line(&self) -> bool {
        memchr::memchr(b'\n', &self.buf[self.start..]).is_some()
    }

    /// Takes everything not yet handed out: the last line of input that ended without a
    /// newline, or of a websocket message.
    pub fn take_rest(&mut self) -> BytesMut {
        let rest = self.buf.split_off(self.start);
        self.buf.clear();
        self.start = 0;
        self.searched = 0;
        rest
    }

    /// The memory the buffer holds, for `--max-client-buffers`.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Drops everything, and the memory with it.
    pub fn clear(&mut self) {
        self.buf = BytesMut::new();
        self.start = 0;
        self.searched = 0;
    }

    /// Gives the buffer's memory back when it is empty and has grown past `keep` bytes, so a
    /// burst does not leave an idle connection holding its peak memory. True if it did.
    pub fn shrink_if_empty(&mut self, keep: usize) -> bool {
        if self.pending() == 0 && self.buf.capacity() > keep {
            self.buf = BytesMut::new();
            self.start = 0;
            self.searched = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(framer: &mut LineFramer) -> Result<Vec<Vec<u8>>, LineTooLong> {
        let mut out = Vec::new();
        while let Some(line) = framer.next_line()? {
            out.push(line.to_vec());
        }
        Ok(out)
    }

    #[test]
    fn complete_lines_come_out_and_the_unfinished_one_waits() {
        let mut framer = LineFramer::new(100);
        framer.extend(b"g a\ni a\r\nsg");
        assert_eq!(
            lines(&mut framer),
            Ok(vec![b"g a".to_vec(), b"i a\r".to_vec()])
        );
        assert_eq!(framer.pending(), 2);
        framer.compact();
        framer.extend(b" b\n");
        assert_eq!(lines(&mut framer), Ok(vec![b"sg b".to_vec()]));
        assert_eq!(framer.pending(), 0);
    }

    #[test]
    fn a_line_in_many_pieces_is_one_line() {
        let mut framer = LineFramer::new(100);
        for piece in [&b"g "[..], b"lo", b"ng", b" name", b"\n"] {
            framer.extend(piece);
            if piece != b"\n" {
                assert_eq!(framer.next_line(), Ok(None));
            }
        }
        assert_eq!(lines(&mut framer), Ok(vec![b"g long name".to_vec()]));
    }

    #[test]
    fn over_long_lines_are_refused_finished_or_not() {
        let mut framer = LineFramer::new(8);
        framer.extend(b"g 12345\ng 123456\n");
        assert_eq!(framer.next_line(), Ok(Some(&b"g 12345"[..])));
        assert_eq!(framer.next_line(), Err(LineTooLong));

        let mut unfinished = LineFramer::new(8);
        unfinished.extend(b"g 1234");
        assert_eq!(unfinished.next_line(), Ok(None));
        unfinished.extend(b"56");
        assert_eq!(unfinished.next_line(), Err(LineTooLong));
    }

    #[test]
    fn the_rest_is_taken_whole_and_empty_buffers_shrink() {
        let mut framer = LineFramer::new(1 << 20);
        framer.extend(b"a\nlast");
        assert_eq!(lines(&mut framer), Ok(vec![b"a".to_vec()]));
        assert_eq!(&framer.take_rest()[..], b"last");
        assert_eq!(framer.pending(), 0);
        framer.extend(&vec![b'x'; 100_000]);
        framer.extend(b"\n");
        assert_eq!(lines(&mut framer).map(|l| l.len()), Ok(1));
        framer.compact();
        assert!(framer.shrink_if_empty(16 * 1024));
        assert!(!framer.shrink_if_empty(16 * 1024));
    }
}
