//! One client connection's I/O: read lines, run them (see [`crate::session`]), write replies,
//! and decide when the connection ends.
//!
//! Reading and writing proceed together: while replies wait for a slow reader, the connection
//! keeps reading and answering. Once its unread replies pass `--max-unsent-bytes`, no more of
//! its lines run until it has read them (a big listing is served at the client's pace), and a
//! client that keeps sending meanwhile is disconnected instead of being buffered without end. A write that makes no progress for
//! `--write-timeout` seconds, input silent for `--idle-timeout`, or a line longer than
//! `--max-line-bytes` also end the connection; in every case its locks are orphaned.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use crate::config::ConnLimits;
use crate::framer::{LineFramer, LineTooLong};
use crate::lifecycle::Admission;
use crate::protocol::{self, Request};
use crate::routing::Gone;
use crate::session::{NoWatch, PeerWatch, Session, Step};
use crate::shard::ShardCore;
use crate::stats::CloseReason;

/// Most lines run per batch before their replies are written: bounds the work between two
/// writes, and lets a client that pipelines a million commands share its thread.
const MAX_BATCH: usize = 1024;

/// Read room for a connection that sends little: most clients send one short command at a
/// time, and ten thousand idle connections should not each pin a large buffer.
const SMALL_READ: usize = 1024;

/// Read room once a client fills the small buffer in one read (it pipelines).
const LARGE_READ: usize = 64 * 1024;

/// Input a client may send while its replies are piled up past `--max-unsent-bytes` before it
/// counts as not reading them (or `--max-line-bytes`, if larger): room for the commands it
/// pipelined behind a big listing, not for a flood.
const MIN_READ_AHEAD: usize = 64 * 1024;

/// A buffer left with more capacity than this while empty goes back to nothing, so a burst
/// does not leave an idle connection holding its peak memory.
const KEEP_CAPACITY: usize = 16 * 1024;

/// Why a connection stops running lines.
enum Stop {
    /// A line (or unfinished input) is longer than `--max-line-bytes`.
    LineTooLong,
    /// The server is gone (shutdown), or the client left while its command waited: close
    /// without a word.
    Gone,
}

impl From<Gone> for Stop {
    fn from(_: Gone) -> Self {
        Stop::Gone
    }
}

impl From<LineTooLong> for Stop {
    fn from(_: LineTooLong) -> Self {
        Stop::LineTooLong
    }
}

/// What happened while waiting for I/O.
#[derive(Default)]
struct Event {
    read: bool,
    eof: bool,
    closing: bool,
    idle: bool,
    stalled: bool,
}

/// The connection's buffers.
struct Buffers {
    /// Bytes read and not yet run, split into lines.
    input: LineFramer,
    /// Input read while a command waited (`gw`), to run after it.
    side: BytesMut,
    /// End of input was read while a command waited.
    side_eof: bool,
    /// Replies not yet written.
    out: Vec<u8>,
    /// How much of `out` is written.
    written: usize,
    /// The client sends more than a small buffer holds at once: read with large buffers.
    pipelining: bool,
}

impl Buffers {
    fn unsent(&self) -> usize {
        self.out.len() - self.written
    }

    /// Runs up to MAX_BATCH complete lines. Returns whether complete lines remain.
    async fn run_lines<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        session: &mut Session,
        limits: &ConnLimits,
        stream: &mut S,
    ) -> Result<bool, Stop> {
        let mut ran = 0;
        let mut cut = false;
        loop {
            let line = match self.input.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(LineTooLong) => {
                    // The commands before the refused line were run: answer them first.
                    session.flush(&mut self.out).await?;
                    return Err(Stop::LineTooLong);
                }
            };
            if let Step::Later(request) = session.step(line, &mut self.out) {
                if matches!(request, Request::Wait { .. }) {
                    // The replies before a wait go out before it waits, not after.
                    session.flush(&mut self.out).await?;
                    self.write_all(stream, limits).await?;
                }
                let mut watch = StreamWatch {
                    stream: &mut *stream,
                    side: &mut self.side,
                    eof: &mut self.side_eof,
                    cap: limits.max_line,
                };
                let ran_line = session.run_later(request, &mut self.out, &mut watch).await;
                if !self.side.is_empty() {
                    // Read while the line waited: it comes after everything already buffered.
                    self.input.extend(&self.side);
                    self.side.clear();
                }
                ran_line?;
            }
            ran += 1;
            // End the batch early when replies pile up (big listings): they are written, and
            // the unread-reply limit applies, before any more lines run.
            if ran == MAX_BATCH || self.unsent() > limits.max_unsent {
                cut = true;
                break;
            }
        }
        session.flush(&mut self.out).await?;
        self.input.compact();
        if cut && self.input.pending() > 0 {
            // More lines wait behind the cut (or, with replies piled up past the limit, a
            // client that kept sending: the caller cuts it off).
            return Ok(true);
        }
        if self.input.shrink_if_empty(KEEP_CAPACITY) {
            self.pipelining = false;
        }
        Ok(false)
    }

    /// Writes every pending reply (bounded by the write timeout).
    async fn write_all<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        limits: &ConnLimits,
    ) -> Result<(), Stop> {
        let rest = &self.out[self.written..];
        let write = stream.write_all(rest);
        let written = match limits.write_timeout {
            Some(limit) => tokio::time::timeout(limit, write)
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
            None => write.await,
        };
        written.map_err(|_| Stop::Gone)?;
        self.out.clear();
        self.written = 0;
        Ok(())
    }

    /// Writes as much of `out` as the stream takes now; true if anything was written.
    fn poll_write_out<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        cx: &mut Context<'_>,
    ) -> io::Result<bool> {
        let mut wrote = false;
        while self.written < self.out.len() {
            match Pin::new(&mut *stream).poll_write(cx, &self.out[self.written..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.written += n;
                    wrote = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
            if self.out.capacity() > KEEP_CAPACITY {
                self.out = Vec::new();
            }
            // Transports that buffer (websocket frames) send now; a TCP flush is a no-op.
            if let Poll::Ready(Err(e)) = Pin::new(&mut *stream).poll_flush(cx) {
                return Err(e);
            }
        }
        Ok(wrote)
    }
}

/// Watches a byte stream while a command waits: reads what the client sends meanwhile (kept
/// for later, up to a bound) and reports a reset or read error as the client being gone. End of
/// input is not: a client may half-close after its last command and still expect every reply,
/// so the wait goes on (a client that really vanished is released right after its grant, when
/// the reply cannot be delivered).
struct StreamWatch<'a, S> {
    stream: &'a mut S,
    side: &'a mut BytesMut,
    /// Set when end of input is read.
    eof: &'a mut bool,
    /// Stop reading (and so watching) past this much unrun input.
    cap: usize,
}

impl<S: AsyncRead + Unpin> PeerWatch for StreamWatch<'_, S> {
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.side.len() >= self.cap || *self.eof {
                return Poll::Pending;
            }
            self.side.reserve(4096);
            match tokio_util::io::poll_read_buf(Pin::new(&mut *self.stream), cx, &mut *self.side) {
                Poll::Ready(Ok(0)) => {
                    *self.eof = true;
                    return Poll::Pending;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Polls an optional timer.
fn poll_timer(timer: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> bool {
    timer
        .as_mut()
        .is_some_and(|t| t.as_mut().poll(cx).is_ready())
}

/// Serves one connection until it closes. `id_text` is its protocol id (`ip:port`).
pub async fn serve<S>(core: Rc<ShardCore>, mut stream: S, id_text: String, admission: Admission)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = core.server.config.conn_limits();
    let read_ahead = limits.max_line.max(MIN_READ_AHEAD);
    let mut session = Session::new(core.clone(), id_text, admission);
    let mut buffers = Buffers {
        input: LineFramer::new(limits.max_line),
        side: BytesMut::new(),
        side_eof: false,
        out: Vec::new(),
        written: 0,
        pipelining: false,
    };
    let mut idle = limits.idle_timeout.map(|d| Box::pin(tokio::time::sleep(d)));
    // Armed while replies wait for a reader that does not read.
    let mut stall: Option<Pin<Box<Sleep>>> = None;
    let mut eof = false;
    // Input may hold complete lines not yet run.
    let mut more = false;
    loop {
        // Replies piled up past the unread-reply limit are written, at the client's pace,
        // before any more lines run.
        if buffers.unsent() <= limits.max_unsent {
            let started = session.measures_latency().then(std::time::Instant::now);
            let ran = buffers.run_lines(&mut session, &limits, &mut stream).await;
            if let Some(started) = started {
                session.record_latency(started.elapsed());
            }
            // Time spent running commands (a `gw` may wait minutes) is not idleness.
            if let (Some(timer), Some(d)) = (idle.as_mut(), limits.idle_timeout) {
                timer.as_mut().reset(Instant::now() + d);
            }
            eof |= buffers.side_eof;
            more = match ran {
                Ok(more) => more,
                Err(Stop::LineTooLong) => {
                    session.core().cell().invalid_commands.add(1);
                    core.cell().closed_because(CloseReason::LineTooLong);
                    buffers.out.extend_from_slice(protocol::LINE_TOO_LONG);
                    return finish(&mut stream, &mut buffers, &limits, session).await;
                }
                Err(Stop::Gone) => return,
            };
        }
        // A listing the client asked for is served at its pace, and so are the commands it
        // pipelined behind it; but a client that keeps sending while its replies pile up
        // unread is not reading them: cut it off.
        let backlogged = buffers.unsent() > limits.max_unsent;
        if backlogged && buffers.input.pending() > read_ahead {
            core.cell().closed_because(CloseReason::UnreadReplies);
            if core.server.config.verbose {
                eprintln!(
                    "glockd: a client kept sending with more than --max-unsent-bytes unread; \
                     closing it"
                );
            }
            return;
        }
        if !more && (eof || core.is_closing()) {
            if eof && buffers.input.pending() > 0 {
                // A last line without a newline still counts (the original answered it too).
                let last = buffers.input.take_rest();
                if session
                    .run_line(&last, &mut buffers.out, &mut NoWatch)
                    .await
                    .is_err()
                    || session.flush(&mut buffers.out).await.is_err()
                {
                    return;
                }
            }
            return finish(&mut stream, &mut buffers, &limits, session).await;
        }

        // While replies pile up, input is still read (up to the read-ahead) to see whether the
        // client keeps sending; otherwise only once the lines read so far have run.
        let want_read = !eof && (backlogged || !more) && buffers.input.pending() <= read_ahead;
        let mut closing = pin!(core.conns.closing());
        let event = std::future::poll_fn(|cx| {
            let mut event = Event::default();
            match buffers.poll_write_out(&mut stream, cx) {
                Ok(true) => {
                    if let (Some(timer), Some(d)) = (stall.as_mut(), limits.write_timeout) {
                        timer.as_mut().reset(Instant::now() + d);
                    }
                }
                Ok(false) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if buffers.unsent() == 0 {
                stall = None;
            } else if stall.is_none() {
                stall = limits
                    .write_timeout
                    .map(|d| Box::pin(tokio::time::sleep(d)));
            }
            if want_read {
                let room = if buffers.pipelining {
                    LARGE_READ
                } else {
                    SMALL_READ
                };
                let input = buffers.input.buffer_mut();
                if input.capacity() - input.len() < room / 2 {
                    input.reserve(room);
                }
                let spare = input.capacity() - input.len();
                match tokio_util::io::poll_read_buf(Pin::new(&mut stream), cx, input) {
                    Poll::Ready(Ok(0)) => event.eof = true,
                    Poll::Ready(Ok(n)) => {
                        // A read that fills the room it had means more is coming.
                        buffers.pipelining |= n == spare;
                        event.read = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            event.closing = closing.as_mut().poll(cx).is_ready();
            event.idle = poll_timer(&mut idle, cx);
            event.stalled = poll_timer(&mut stall, cx);
            let any = event.read || event.eof || event.closing || event.idle || event.stalled;
            let can_run = more && buffers.unsent() <= limits.max_unsent;
            if any || can_run {
                Poll::Ready(Ok(event))
            } else {
                Poll::Pending
            }
        })
        .await;
        let event = match event {
            Ok(event) => event,
            Err(_) => return, // reset, broken pipe…: the client is gone.
        };
        if event.stalled {
            core.cell().closed_because(CloseReason::WriteTimeout);
            if core.server.config.verbose {
                eprintln!(
                    "glockd: a client did not read its replies for --write-timeout; closing it"
                );
            }
            return;
        }
        if event.idle {
            core.cell().closed_because(CloseReason::IdleTimeout);
            return finish(&mut stream, &mut buffers, &limits, session).await;
        }
        if event.read {
            if let (Some(timer), Some(d)) = (idle.as_mut(), limits.idle_timeout) {
                timer.as_mut().reset(Instant::now() + d);
            }
        }
        eof |= event.eof;
        more |= event.read;
    }
}

/// Writes what is left of the replies (bounded by the write timeout), ends the session, then
/// closes the stream.
async fn finish<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buffers: &mut Buffers,
    limits: &ConnLimits,
    session: Session,
) {
    let rest = &buffers.out[buffers.written..];
    let done = async {
        stream.write_all(rest).await?;
        // Counted closed (and its locks on their way out) before the client can see the
        // close, so a client that reads the close and then asks `q` finds it gone.
        drop(session);
        stream.shutdown().await
    };
    match limits.write_timeout {
        Some(limit) => {
            let _ = tokio::time::timeout(limit, done).await;
        }
        None => {
            let _ = done.await;
        }
    }
}
