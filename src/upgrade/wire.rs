//! The hand-over channel between the running server and its successor: a unix stream socket
//! pair, on which each message is a kind byte, a length and a body, and may carry descriptors
//! (`SCM_RIGHTS`) with its first bytes.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Descriptors sent with one message at most: the kernel takes up to 253 per `sendmsg`.
pub const FDS_PER_MESSAGE: usize = 240;

/// The largest body a message may have (the state image of millions of locks fits well).
const MAX_BODY: u64 = 16 << 30;

/// What a message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Successor to server: started, speaks this hand-over version (body: the version).
    Ready = 1,
    /// Server to successor: the listening sockets and held files (body: their description).
    Listeners = 2,
    /// Server to successor: the state image (body: the encoded image).
    Image = 3,
    /// Server to successor: a slice of the client connections' descriptors (body: empty).
    Fds = 4,
    /// Successor to server: everything adopted, ready to serve.
    Adopted = 5,
    /// Server to successor: go on (the server is leaving), or stop (it resumes).
    Commit = 6,
    Abort = 7,
    /// Successor to server: it refuses the hand-over (body: why, one line).
    Refused = 8,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Ready,
            2 => Kind::Listeners,
            3 => Kind::Image,
            4 => Kind::Fds,
            5 => Kind::Adopted,
            6 => Kind::Commit,
            7 => Kind::Abort,
            8 => Kind::Refused,
            _ => return None,
        })
    }
}

/// One message as received.
pub struct Message {
    pub kind: Kind,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// One end of the hand-over channel.
pub struct Channel {
    stream: UnixStream,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Channel {
    pub fn new(stream: UnixStream) -> Channel {
        Channel { stream }
    }

    /// The end of the pair inherited as descriptor `fd`.
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel {
            stream: UnixStream::from(fd),
        }
    }

    /// Every later receive gives up after `limit` (None: waits for ever).
    pub fn set_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(limit)?;
        self.stream.set_write_timeout(limit)
    }

    /// Gives up on a receive at `deadline` (now or past: at once).
    pub fn set_deadline(&self, deadline: Instant) -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.set_timeout(Some(left.max(Duration::from_millis(1))))
    }

    /// Sends a message with its descriptors (at most [`FDS_PER_MESSAGE`]).
    pub fn send(&mut self, kind: Kind, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
        if fds.len() > FDS_PER_MESSAGE {
            return Err(io::Error::other("too many descriptors for one message"));
        }
        let mut header = [0u8; 9];
        header[0] = kind as u8;
        header[1..].copy_from_slice(&(body.len() as u64).to_le_bytes());
        // The descriptors travel with the header's bytes, sent whole by one `sendmsg` (a
        // stream socket never splits nine bytes with room in its buffer, and a short send is
        // finished below without them).
        let iov = [IoSlice::new(&header)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        let sent = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .map_err(io::Error::from)?;
        self.stream.write_all(&header[sent..])?;
        self.stream.write_all(body)?;
        self.stream.flush()
    }

    /// Receives the next message. An end of stream is `UnexpectedEof`.
    pub fn recv(&mut self) -> io::Result<Message> {
        let mut header = [0u8; 9];
        let mut fds = Vec::new();
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE + 13]);
        let got = {
            let mut iov = [IoSliceMut::new(&mut header)];
            let msg = loop {
                match recvmsg::<()>(
                    self.stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other.map_err(io::Error::from)?,
                }
            };
            for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    for fd in received {
                        // SAFETY: the kernel just installed `fd` in this process for this
                        // message (SCM_RIGHTS); nothing else owns it, so it is owned here
                        // exactly once and closed when dropped.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                return Err(invalid("descriptors were cut off in transit".into()));
            }
            msg.bytes
        };
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other process closed the channel",
            ));
        }
        self.stream.read_exact(&mut header[got..])?;
        let kind = Kind::from_byte(header[0])
            .ok_or_else(|| invalid(format!("unknown message kind {}", header[0])))?;
        let mut len = [0u8; 8];
        len.copy_from_slice(&header[1..]);
        let len = u64::from_le_bytes(len);
        if len > MAX_BODY {
            return Err(invalid(format!("a message of {len} bytes")));
        }
        let mut body = vec![0u8; usize::try_from(len).map_err(|_| invalid("too long".into()))?];
        self.stream.read_exact(&mut body)?;
        Ok(Message { kind, body, fds })
    }

    /// Receives the next message, which must be of `kind`; a `Refused` or `Abort` instead is
    /// an error saying so.
    pub fn expect(&mut self, kind: Kind) -> io::Result<Message> {
        let msg = self.recv()?;
        if msg.kind == kind {
            return Ok(msg);
        }
        let why = String::from_utf8_lossy(&msg.body).into_owned();
        Err(io::Error::other(match msg.kind {
            Kind::Refused => format!("the new process refused: {why}"),
            Kind::Abort => "the running server called the upgrade off".to_owned(),
            other => format!("expected {kind:?}, got {other:?}"),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_bodies_and_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Channel::new(a), Channel::new(b));
        let (x, _y) = UnixStream::pair().unwrap();
        let sent: Vec<RawFd> = (0..FDS_PER_MESSAGE).map(|_| x.as_raw_fd()).collect();
        let big = vec![7u8; 1 << 20];
        let writer = std::thread::spawn(move || {
            a.send(Kind::Fds, &big, &sent).unwrap();
            a.send(Kind::Ready, b"1", &[]).unwrap();
            a
        });
        let msg = b.recv().unwrap();
        assert_eq!(msg.kind, Kind::Fds);
        assert_eq!(msg.body.len(), 1 << 20);
        assert_eq!(msg.fds.len(), FDS_PER_MESSAGE);
        let msg = b.expect(Kind::Ready).unwrap();
        assert_eq!(msg.body, b"1");
        drop(writer.join().unwrap());
        assert_eq!(
            b.recv().err().map(|e| e.kind()),
            Some(io::ErrorKind::UnexpectedEof)
        );
    }
}
