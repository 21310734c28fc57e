//! Log lines, written by a thread of their own so that no serving thread ever waits on stderr or
//! a log file.
//!
//! Every line is formatted where it happens (by `tracing-subscriber`, into a buffer) and handed
//! to a bounded queue (`tracing-appender`'s non-blocking writer in lossy mode); the writer thread
//! drains the queue into stderr or `-log-file`. When the queue is full, because whatever reads
//! stderr stopped reading or the disk is slow, the line is dropped and counted
//! ([`dropped_lines`], exported as `glockd_log_dropped_total`): a stuck log shipper costs log
//! lines, never service.
//!
//! A line is a timestamp (RFC 3339, UTC), a level, an optional message, and `key=value` fields
//! (`event=disconnect conn=127.0.0.1:50312 reason=eof`), or one JSON object with the same keys
//! (`-log-format json`). Text that came from a client or the system (lock names, registered
//! names, error messages) is always a string field, which both formats escape: no newline or
//! other control byte from outside ever reaches a log line raw. Bytes that are not UTF-8 are
//! written `\xNN` (see [`printable`]).
//!
//! The library only emits `tracing` events; nothing is written until the binary calls
//! [`start`]. Tests that run servers in-process therefore log nothing.

use std::borrow::Cow;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatFields, Writer};

use crate::config::LogFormat;

/// Lines the queue holds while the writer thread is behind: room for a burst (a mass disconnect
/// under `-verbose` logs a few lines per connection) in a few megabytes at most. Past it, lines
/// are dropped and counted.
pub const QUEUE_LINES: usize = 8192;

/// How long [`finish`] waits for the queue to be written out at exit.
pub const FINISH_WITHIN: Duration = Duration::from_secs(2);

/// The queue's count of dropped lines, once the logger runs.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The writer thread's guard: dropping it writes out the queue and stops the thread.
static WORKER: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Set by [`reopen`]; the writer thread reopens the log file before its next line.
static REOPEN: AtomicBool = AtomicBool::new(false);

/// Starts the writer thread and makes it the destination of every `tracing` event at INFO and
/// above, and of panic messages. Fails if the log file cannot be opened (or a logger already
/// runs in this process).
pub fn start(format: LogFormat, file: Option<&Path>) -> io::Result<()> {
    let destination = match file {
        Some(path) => Destination::File {
            file: open_log_file(path)?,
            path: path.to_owned(),
        },
        None => Destination::Stderr(io::stderr()),
    };
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("glockd-log")
        .finish(destination);
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_max_level(tracing::Level::INFO)
        .with_target(false);
    let installed = match format {
        LogFormat::Text => builder.fmt_fields(KeyValueFields).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    installed.map_err(|e| io::Error::other(format!("cannot start logging: {e}")))?;
    let _ = DROPPED.set(dropped);
    LOG_FILE.store(file.is_some(), Ordering::Release);
    if let Ok(mut worker) = WORKER.lock() {
        *worker = Some(guard);
    }
    log_panics();
    Ok(())
}

/// Log lines dropped so far because the queue was full (0 before [`start`]).
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

/// Asks the writer thread to reopen the log file before its next line (after a rotation moved
/// it away). Returns whether there is a log file (with stderr there is nothing to reopen).
pub fn reopen() -> bool {
    REOPEN.store(true, Ordering::Release);
    LOG_FILE.load(Ordering::Acquire)
}

/// Whether the destination is a file (set by [`start`]).
static LOG_FILE: AtomicBool = AtomicBool::new(false);

/// Writes out what the queue holds and stops the writer thread, waiting at most `within`: a
/// stderr nobody reads must not keep the process from exiting. Lines logged afterwards are
/// dropped (and counted).
pub fn finish(within: Duration) {
    let Some(guard) = WORKER.lock().ok().and_then(|mut worker| worker.take()) else {
        return;
    };
    let (done, finished) = std::sync::mpsc::channel();
    // Dropping the guard waits for the writer (bounded by the library at about a second, after
    // which it reports on stdout, which may be as stuck as stderr): do it on a thread of its
    // own and stop waiting at `within`.
    let dropper = std::thread::Builder::new()
        .name("glockd-log-finish".into())
        .spawn(move || {
            drop(guard);
            let _ = done.send(());
        });
    if dropper.is_ok() {
        let _ = finished.recv_timeout(within);
    }
}

/// For a process about to abort: logs `message` as an error and writes out the queue (bounded
/// by [`FINISH_WITHIN`]). Without a running logger (a server inside tests), it goes straight to
/// stderr.
pub fn fatal(message: &'static str) {
    let running = WORKER.lock().map(|w| w.is_some()).unwrap_or(false);
    if !running {
        eprintln!("glockd: {message}");
        return;
    }
    tracing::error!(event = "fatal", "{message}");
    finish(FINISH_WITHIN);
}

/// Text for a log field from bytes a client sent: valid UTF-8 as it is (the line format escapes
/// control characters, quotes and backslashes), each byte that is not UTF-8 as `\xNN`.
pub fn printable(bytes: &[u8]) -> Cow<'_, str> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Cow::Borrowed(text);
    }
    let mut text = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    Cow::Owned(text)
}

/// The fields of a text line: the message first, then `key=value` for each field. A value made
/// only of letters, digits and `_ . : / @ + - [ ]` is written bare (`reason=eof`,
/// `conn=127.0.0.1:50312`); any other is quoted, with `"` and `\\` escaped and control characters
/// written as `\n`, `\t`, `\u{1b}`… The message is not quoted, and only its control characters
/// are escaped. Whatever a field holds, the line stays one line.
struct KeyValueFields;

impl<'writer> FormatFields<'writer> for KeyValueFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = KeyValueVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct KeyValueVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl KeyValueVisitor<'_> {
    fn write(&mut self, field: &Field, value: &str) -> fmt::Result {
        if !self.first {
            self.writer.write_char(' ')?;
        }
        self.first = false;
        if field.name() == "message" {
            return write_controls_escaped(&mut self.writer, value);
        }
        write!(self.writer, "{}=", field.name())?;
        if !value.is_empty() && value.chars().all(is_bare) {
            return self.writer.write_str(value);
        }
        self.writer.write_char('"')?;
        write_escaped(&mut self.writer, value)?;
        self.writer.write_char('"')
    }
}

impl Visit for KeyValueVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            self.result = self.write(field, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            // `%display` values come here too, formatted by their Display.
            let text = format!("{value:?}");
            self.result = self.write(field, &text);
        }
    }
}

/// Characters a value may hold and still be written without quotes.
fn is_bare(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.:/@+-[]".contains(c)
}

/// Writes `text` for a quoted value: `"` and `\\` escaped, and control characters as in
/// [`write_controls_escaped`].
fn write_escaped(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    for c in text.chars() {
        match c {
            '"' => out.write_str("\\\"")?,
            '\\' => out.write_str("\\\\")?,
            c => write_controls_escaped(out, c.encode_utf8(&mut [0; 4]))?,
        }
    }
    Ok(())
}

/// Writes `text` with every control character (and the Unicode line and paragraph separators)
/// written as an escape (`\n`, `\u{1b}`…), so nothing in it can end or fake a line.
fn write_controls_escaped(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    for c in text.chars() {
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                write!(out, "\\u{{{:x}}}", u32::from(c))?
            }
            c => out.write_char(c)?,
        }
    }
    Ok(())
}

/// Panic messages go through the queue too: the default hook writes to stderr from the
/// panicking thread, which a stuck stderr would stall (a shard thread survives a connection's
/// panic, and must keep serving).
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        // With RUST_BACKTRACE set, as the default hook does (one field, its lines escaped).
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
            .then(|| backtrace.to_string());
        tracing::error!(
            event = "panic",
            thread = thread.name().unwrap_or("unnamed"),
            location = location.as_str(),
            panic = panic_message(info.payload()),
            backtrace = backtrace.as_deref(),
            "a thread panicked"
        );
    }));
}

/// A panic's message: `panic!` makes it a `&str` or a `String`.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

fn open_log_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("log file {}: {e}", path.display())))
}

/// Where the writer thread puts lines. Each line is one `write` (no buffering), so lines stay
/// whole when other processes write to the same pipe or file.
enum Destination {
    Stderr(io::Stderr),
    File {
        file: File,
        /// Reopened on SIGHUP, so a rotated-away file is let go.
        path: PathBuf,
    },
}

impl Destination {
    /// Reopens the log file if asked to. On failure the old file stays in use, and the failure
    /// is logged (from this thread the queue is only ever offered lines, never waited on).
    fn reopen_if_asked(&mut self) {
        let Destination::File { file, path } = self else {
            return;
        };
        if !REOPEN.swap(false, Ordering::AcqRel) {
            return;
        }
        match open_log_file(path) {
            Ok(new) => *file = new,
            Err(e) => tracing::error!(
                event = "log_reopen_failed",
                error = %e,
                "could not reopen the log file; still writing to the old one"
            ),
        }
    }
}

impl Write for Destination {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.reopen_if_asked();
        match self {
            Destination::Stderr(stderr) => stderr.write(line),
            Destination::File { file, .. } => file.write(line),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Destination::Stderr(stderr) => stderr.flush(),
            Destination::File { file, .. } => file.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(text: &str) -> String {
        let mut out = String::new();
        write_escaped(&mut out, text).expect("writes to a string");
        out
    }

    #[test]
    fn nothing_escaped_can_end_or_fake_a_line() {
        assert_eq!(escaped("build 42"), "build 42");
        assert_eq!(escaped("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(escaped("say \"hi\" \\o/"), "say \\\"hi\\\" \\\\o/");
        assert_eq!(
            escaped("\u{1b}[31mred\u{7f}\u{85}"),
            "\\u{1b}[31mred\\u{7f}\\u{85}"
        );
        assert_eq!(escaped("a\u{2028}b"), "a\\u{2028}b");
        assert_eq!(escaped("café"), "café");
    }

    #[test]
    fn plain_values_go_bare_and_others_quoted() {
        assert!("127.0.0.1:50312".chars().all(is_bare));
        assert!("[::1]:9999".chars().all(is_bare));
        assert!("unix:3".chars().all(is_bare));
        assert!(!"build 42".chars().all(is_bare));
        assert!(!"a=b".chars().all(is_bare));
        assert!(!"x\"".chars().all(is_bare));
    }

    #[test]
    fn utf8_passes_and_other_bytes_are_written_as_hex() {
        assert_eq!(printable(b"build 42"), "build 42");
        assert!(matches!(printable(b"build 42"), Cow::Borrowed(_)));
        assert_eq!(printable("café".as_bytes()), "café");
        assert_eq!(printable(b"a\xffb\xc3"), "a\\xffb\\xc3");
        // Control bytes are valid UTF-8: the line format escapes them (see tests/logging.rs).
        assert_eq!(printable(b"a\nb"), "a\nb");
    }
}
