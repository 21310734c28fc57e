//! What a websocket client sent that the library has not handed out yet, kept as the client's
//! own bytes, so that a live upgrade can give the connection to the new process exactly where
//! it stands: a frame half received, a fragmented message with only some of its fragments in,
//! messages read ahead of the one being run.
//!
//! The library (tungstenite) keeps such bytes in buffers of its own that it does not expose.
//! So the bytes are followed here too, frame by frame, as they are read: a frame is dropped
//! from the copy once the message it belongs to (or the control frame it is) has been handed
//! out. The new process feeds what is left to a fresh websocket as if it had just read it, and
//! the library there rebuilds the same state from it.

use std::collections::VecDeque;
use std::io::Cursor;

use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

/// What a complete frame is to the messages handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A data frame that is not the last of its message: handed out with the message's last.
    Fragment,
    /// The last (or only) frame of a text or binary message.
    Last,
    /// A ping, pong or close: handed out on its own, possibly between two fragments.
    Control,
}

/// The client's bytes not yet handed out as messages (see the module's text).
#[derive(Debug)]
pub(super) struct Unread {
    /// The complete frames listed in `frames`, in order, then the start of the next frame.
    bytes: Vec<u8>,
    /// The complete frames at the front of `bytes`: their lengths and kinds.
    frames: VecDeque<(usize, Kind)>,
    /// `bytes[..parsed]` are the frames in `frames`.
    parsed: usize,
    /// Still in the HTTP handshake: `bytes` starts with the client's request.
    handshake: bool,
    /// A frame the library refuses (too big, malformed) was seen: nothing after it is kept
    /// (the library ends the connection when it gets there, here or in a new process).
    stopped: bool,
    /// The largest frame the library takes.
    max_frame: usize,
}

impl Unread {
    /// Bytes of a connection whose handshake is still to come.
    pub(super) fn new(max_frame: usize) -> Unread {
        Unread {
            bytes: Vec::new(),
            frames: VecDeque::new(),
            parsed: 0,
            handshake: true,
            stopped: false,
            max_frame,
        }
    }

    /// Bytes of a connection carried by a live upgrade: `input` is what the library had not
    /// handed out in the old process.
    pub(super) fn carried(max_frame: usize, input: &[u8]) -> Unread {
        let mut unread = Unread::new(max_frame);
        unread.handshake = false;
        unread.record(input);
        unread
    }

    /// Bytes just read from the client.
    pub(super) fn record(&mut self, data: &[u8]) {
        if self.stopped {
            return;
        }
        self.bytes.extend_from_slice(data);
        if !self.handshake {
            self.parse();
        }
    }

    /// The handshake is done: the request's bytes go, and any frames the client sent right
    /// behind it (which the library kept) are followed from here on.
    pub(super) fn handshake_done(&mut self) {
        self.handshake = false;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&self.bytes) {
            Ok(httparse::Status::Complete(size)) => {
                self.bytes.drain(..size);
                self.parse();
            }
            // The library took this request: it cannot happen. Nothing is kept then.
            _ => {
                self.bytes = Vec::new();
                self.stopped = true;
            }
        }
    }

    /// Lists the frames completed by what was read.
    fn parse(&mut self) {
        while !self.stopped {
            let rest = &self.bytes[self.parsed..];
            let mut cursor = Cursor::new(rest);
            let (header, payload) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return,
                Err(_) => {
                    self.stopped = true;
                    return;
                }
            };
            let length = usize::try_from(payload)
                .ok()
                .filter(|&n| n <= self.max_frame)
                .and_then(|n| n.checked_add(cursor.position() as usize));
            let Some(length) = length else {
                self.stopped = true;
                return;
            };
            if rest.len() < length {
                return;
            }
            let kind = match header.opcode {
                OpCode::Control(_) => Kind::Control,
                OpCode::Data(Data::Continue | Data::Text | Data::Binary) if !header.is_final => {
                    Kind::Fragment
                }
                OpCode::Data(_) => Kind::Last,
            };
            self.frames.push_back((length, kind));
            self.parsed += length;
        }
    }

    /// The library handed out a message: the frames it was made of go.
    pub(super) fn handed_out(&mut self) {
        let Some(index) = self.frames.iter().position(|&(_, k)| k != Kind::Fragment) else {
            return; // cannot happen: every message comes from a frame listed here
        };
        let before: usize = self.frames.iter().take(index).map(|&(n, _)| n).sum();
        let (length, kind) = self.frames[index];
        if kind == Kind::Control {
            // A control frame between fragments: those stay, for the message they belong to.
            self.bytes.drain(before..before + length);
            self.frames.remove(index);
            self.parsed -= length;
        } else {
            self.bytes.drain(..before + length);
            self.frames.drain(..=index);
            self.parsed -= before + length;
        }
        if self.bytes.is_empty() {
            // An idle connection holds nothing here (what a message costs to allocate is
            // nothing beside its framing).
            self.bytes = Vec::new();
        }
    }

    /// Whether the handshake is still to be done.
    pub(super) fn in_handshake(&self) -> bool {
        self.handshake
    }

    /// Bytes held.
    pub(super) fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The bytes, for a live upgrade to carry.
    pub(super) fn take(&mut self) -> Vec<u8> {
        self.frames.clear();
        self.parsed = 0;
        std::mem::take(&mut self.bytes)
    }
}

/// The most headers a handshake request may have: the library's own bound, so that the same
/// request parses the same way here.
const MAX_HEADERS: usize = 124;

/// Appends `payload` as one binary message, in a frame as a client sends it (masked, with a
/// mask that leaves the bytes as they are): how messages the server had already read are
/// carried by a live upgrade, ahead of the bytes it had not.
pub(super) fn push_message(out: &mut Vec<u8>, payload: &[u8]) {
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode: OpCode::Data(Data::Binary),
        mask: Some([0; 4]),
    };
    // Writing to a vector cannot fail.
    let _ = header.format(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client sends it, masked with `mask`.
    fn frame(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    const MASK: [u8; 4] = [7, 1, 9, 3];

    #[test]
    fn a_frame_half_read_is_kept_whole_and_goes_when_handed_out() {
        let whole = frame(1, true, b"g a", MASK);
        let mut unread = Unread::carried(1 << 20, &whole[..4]);
        assert_eq!(unread.len(), 4);
        unread.record(&whole[4..]);
        assert_eq!(unread.len(), whole.len());
        unread.handed_out();
        assert_eq!(unread.len(), 0);
    }

    #[test]
    fn messages_read_ahead_stay_until_handed_out_in_order() {
        let one = frame(1, true, b"g a", MASK);
        let two = frame(2, true, &[0xff; 300], MASK);
        let three = frame(1, true, b"r a", MASK);
        let mut all = [one.clone(), two.clone(), three.clone()].concat();
        all.extend_from_slice(&three[..2]);
        let mut unread = Unread::carried(1 << 20, &all);
        unread.handed_out();
        let mut left = [two, three.clone()].concat();
        left.extend_from_slice(&three[..2]);
        assert_eq!(unread.take(), left);
    }

    #[test]
    fn a_ping_between_fragments_goes_and_the_fragments_stay() {
        let first = frame(1, false, b"g lo", MASK);
        let ping = frame(9, true, b"hi", MASK);
        let middle = frame(0, false, b"ck", MASK);
        let last = frame(0, true, b"-a", MASK);
        let mut unread = Unread::carried(1 << 20, &[first.clone(), ping].concat());
        unread.handed_out(); // the ping
        assert_eq!(unread.len(), first.len());
        unread.record(&middle);
        unread.record(&last[..3]);
        assert_eq!(unread.take(), [first, middle, last[..3].to_vec()].concat());
    }

    #[test]
    fn a_fragmented_message_goes_whole_when_handed_out() {
        let first = frame(2, false, b"g ", MASK);
        let pong = frame(10, true, b"", MASK);
        let last = frame(0, true, b"a", MASK);
        let next = frame(1, true, b"q", MASK);
        let mut unread = Unread::carried(1 << 20, &[first, pong, last, next.clone()].concat());
        unread.handed_out(); // the pong
        unread.handed_out(); // the message
        assert_eq!(unread.take(), next);
    }

    #[test]
    fn frames_sent_behind_the_handshake_are_followed() {
        let request = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n";
        let one = frame(1, true, b"g a", MASK);
        let mut unread = Unread::new(1 << 20);
        unread.record(request);
        unread.record(&one[..3]);
        unread.handshake_done();
        assert_eq!(unread.len(), 3);
        unread.record(&one[3..]);
        unread.handed_out();
        assert_eq!(unread.len(), 0);
    }

    #[test]
    fn a_frame_the_library_refuses_stops_the_following() {
        let big = frame(2, true, &[0; 200], MASK);
        let mut unread = Unread::carried(100, &big);
        let kept = unread.len();
        unread.record(b"more");
        assert_eq!(unread.len(), kept, "nothing is kept after a refused frame");
    }

    #[test]
    fn carried_messages_are_frames_the_server_reads_back() {
        let mut out = Vec::new();
        push_message(&mut out, b"g a\nr a\n");
        push_message(&mut out, &[]);
        let mut unread = Unread::carried(1 << 20, &out);
        unread.handed_out();
        unread.handed_out();
        assert_eq!(unread.len(), 0);
        assert_eq!(out[0], 0x82, "a final binary frame");
        assert_eq!(out[1], 0x80 | 8, "masked, eight bytes");
    }

    /// One message as a client may send it: a data message in `fragments` frames, with a
    /// ping after each fragment but the last where `pings` says so.
    #[derive(Debug, Clone)]
    struct Sent {
        payload: Vec<u8>,
        fragments: usize,
        pings: Vec<bool>,
        control_only: bool,
    }

    fn sent() -> impl proptest::strategy::Strategy<Value = Sent> {
        use proptest::prelude::*;
        (
            proptest::collection::vec(any::<u8>(), 0..300),
            1usize..5,
            proptest::collection::vec(any::<bool>(), 4),
            any::<bool>(),
        )
            .prop_map(|(payload, fragments, pings, control)| Sent {
                fragments: fragments.min(payload.len().max(1)),
                payload,
                pings,
                control_only: control,
            })
    }

    /// The frames of `sent` and what the library hands out for them, in order.
    fn wire(sent: &[Sent]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut bytes = Vec::new();
        let mut handed = Vec::new();
        for (i, message) in sent.iter().enumerate() {
            let mask = [i as u8, 3, 5, 7];
            if message.control_only {
                let ping: Vec<u8> = message.payload.iter().copied().take(100).collect();
                bytes.extend(frame(9, true, &ping, mask));
                handed.push(ping);
                continue;
            }
            let size = message.payload.len().div_ceil(message.fragments).max(1);
            let parts: Vec<&[u8]> = if message.payload.is_empty() {
                vec![&[][..]]
            } else {
                message.payload.chunks(size).collect()
            };
            for (j, part) in parts.iter().enumerate() {
                let last = j + 1 == parts.len();
                let opcode = if j == 0 { 2 } else { 0 };
                bytes.extend(frame(opcode, last, part, mask));
                if !last && message.pings[j % 4] {
                    bytes.extend(frame(9, true, b"p", mask));
                    handed.push(b"p".to_vec());
                }
            }
            handed.push(message.payload.clone());
        }
        (bytes, handed)
    }

    /// What the library hands out from `bytes`, as a server reads them.
    fn read_back(bytes: Vec<u8>) -> Vec<Vec<u8>> {
        use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};
        let mut ws = WebSocket::from_raw_socket(Cursor::new(bytes), Role::Server, None);
        let mut got = Vec::new();
        while let Ok(message) = ws.read() {
            got.push(message.into_data().to_vec());
        }
        got
    }

    proptest::proptest! {
        /// Whatever the reads and however many messages were handed out, the bytes kept and
        /// the bytes still to come read back as exactly the messages not handed out yet.
        #[test]
        fn what_is_kept_reads_back_as_the_messages_not_handed_out(
            sent in proptest::collection::vec(sent(), 1..8),
            reads in proptest::collection::vec(1usize..200, 1..40),
            cut in 0usize..4000,
            handed in 0usize..100,
        ) {
            let (bytes, messages) = wire(&sent);
            let cut = cut.min(bytes.len());
            let mut unread = Unread::carried(1 << 20, &[]);
            let mut at = 0;
            for size in reads.iter().cycle() {
                if at >= cut {
                    break;
                }
                let end = (at + size).min(cut);
                unread.record(&bytes[at..end]);
                at = end;
            }
            // What the library could hand out of what arrived, and how much of it it did.
            let complete = read_back(bytes[..cut].to_vec()).len();
            let handed = handed.min(complete);
            for _ in 0..handed {
                unread.handed_out();
            }
            let mut carried = unread.take();
            carried.extend_from_slice(&bytes[cut..]);
            proptest::prop_assert_eq!(read_back(carried), messages[handed..].to_vec());
        }
    }
}
