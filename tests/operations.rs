//! The binary as an operator runs it: log lines and their shape, a stderr nobody reads, signals,
//! and a low open-file limit.

mod process;

use process::{free_port, temp_dir};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_glockd");
/// The flags every test server gets: loopback only, two unpinned shards, no websockets.
fn base_args(port: u16, metrics: Option<u16>) -> Vec<String> {
    let metrics = metrics.map_or("off".to_owned(), |m| format!("127.0.0.1:{m}"));
    [
        "-bind",
        "127.0.0.1",
        "-port",
        &port.to_string(),
        "-ws=0",
        "-metrics",
        &metrics,
        "-shards",
        "2",
        "-pin=false",
    ]
    .map(String::from)
    .to_vec()
}

/// A running `glockd`, killed if the test fails.
struct Glockd {
    child: Option<Child>,
    /// Its stderr, line by line, when a test reads it.
    lines: Option<mpsc::Receiver<String>>,
}

impl Glockd {
    /// Runs `command` (the binary, or a shell that execs it) and waits until `port` answers.
    /// With `read_stderr`, a thread collects stderr's lines; without, stderr is a pipe that
    /// nobody ever reads.
    fn spawn(mut command: Command, port: u16, read_stderr: bool) -> Glockd {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn glockd");
        let lines = read_stderr.then(|| {
            let stderr = child.stderr.take().expect("stderr");
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        let server = Glockd {
            child: Some(child),
            lines,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "glockd never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn start(args: &[String], read_stderr: bool) -> Glockd {
        let port = port_of(args);
        let mut command = Command::new(BIN);
        command.args(args);
        Glockd::spawn(command, port, read_stderr)
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal");
    }

    /// The next stderr line that `wanted` accepts (the lines before it are skipped).
    fn line_where(&self, wanted: impl Fn(&str) -> bool) -> String {
        self.lines_until(wanted).pop().expect("a line")
    }

    /// The stderr lines up to and including the next one that `wanted` accepts.
    fn lines_until(&self, wanted: impl Fn(&str) -> bool) -> Vec<String> {
        let lines = self.lines.as_ref().expect("stderr is read");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the line waited for is not in {seen:#?}"));
            let done = wanted(&line);
            seen.push(line);
            if done {
                return seen;
            }
        }
    }

    /// Sends `signal` and waits (bounded) for the exit status; then the rest of stderr.
    fn stop_with(mut self, signal: Signal) -> (Option<i32>, Vec<String>) {
        kill(self.pid(), signal).expect("signal");
        let status = self.wait_for_exit();
        let rest = match &self.lines {
            Some(lines) => lines.iter().collect(),
            None => Vec::new(),
        };
        (status, rest)
    }

    /// Waits (bounded) for the server to exit on its own (a signal already sent), and returns
    /// its exit status.
    fn exit_status(mut self) -> Option<i32> {
        self.wait_for_exit()
    }

    fn wait_for_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "glockd did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        status.code()
    }
}

impl Drop for Glockd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn port_of(args: &[String]) -> u16 {
    let at = args.iter().position(|a| a == "-port").expect("-port");
    args[at + 1].parse().expect("a port")
}

/// One client connection with a read timeout, so no test can hang on it.
struct Client(TcpStream);

impl Client {
    fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Client(stream)
    }

    fn line(&mut self) -> String {
        let mut line = Vec::new();
        let mut byte = [0u8];
        loop {
            match self.0.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) => line.push(byte[0]),
                Ok(_) => break,
                Err(e) => panic!("no reply: {e}"),
            }
        }
        String::from_utf8_lossy(&line).into_owned()
    }

    fn ask(&mut self, command: &[u8]) -> String {
        self.0.write_all(command).expect("write");
        self.line()
    }

    /// Closes with RST instead of FIN.
    fn reset(self) {
        let socket = socket2::SockRef::from(&self.0);
        socket.set_linger(Some(Duration::ZERO)).expect("linger 0");
    }
}

fn scrape(metrics: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", metrics)).expect("connect to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: glockd\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("a scrape answers");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the scrape"))
}

/// A text log line taken apart: timestamp, level, message, fields (values unescaped).
#[derive(Debug)]
struct TextLine {
    timestamp: String,
    level: String,
    message: String,
    fields: Vec<(String, String)>,
}

impl TextLine {
    fn field(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `TIMESTAMP LEVEL [message] key=value…` as the README documents it; panics on any
/// other shape.
fn parse_text(line: &str) -> TextLine {
    assert!(
        !line.chars().any(|c| c.is_control()),
        "a control character in {line:?}"
    );
    let (timestamp, rest) = line.split_once(' ').expect("a timestamp");
    assert_rfc3339_utc(timestamp);
    let rest = rest.trim_start();
    let (level, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    assert!(["INFO", "WARN", "ERROR"].contains(&level), "{line}");
    // The fields are the longest tail of `key=value` items; what is before them is the message.
    let items = split_items(rest);
    let mut split = items.len();
    while split > 0 && parse_field(items[split - 1].1).is_some() {
        split -= 1;
    }
    let message_end = items.get(split).map_or(rest.len(), |&(start, _)| start);
    let fields = items[split..]
        .iter()
        .filter_map(|&(_, item)| parse_field(item))
        .collect();
    TextLine {
        timestamp: timestamp.to_owned(),
        level: level.to_owned(),
        message: rest[..message_end].trim_end().to_owned(),
        fields,
    }
}

/// Splits on spaces outside quotes: (offset, item).
fn split_items(text: &str) -> Vec<(usize, &str)> {
    let mut items = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                items.push((start, &text[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push((start, &text[start..]));
    items
}

/// `key=bare` or `key="escaped"`, unescaped.
fn parse_field(item: &str) -> Option<(String, String)> {
    let (key, value) = item.split_once('=')?;
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let value = match value.strip_prefix('"') {
        Some(quoted) => unescape(quoted.strip_suffix('"')?)?,
        None if !value.is_empty() && !value.contains('"') => value.to_owned(),
        None => return None,
    };
    Some((key.to_owned(), value))
}

fn unescape(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            '"' => out.push('"'),
            '\\' => out.push('\\'),
            'u' => {
                let rest: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let hex = rest.strip_prefix('{')?;
                out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// `2025-01-02T03:04:05.678901Z`
fn assert_rfc3339_utc(timestamp: &str) {
    let b = timestamp.as_bytes();
    let digits = |range: std::ops::Range<usize>| range.clone().all(|i| b[i].is_ascii_digit());
    let ok = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[b.len() - 1] == b'Z';
    assert!(ok, "not an RFC 3339 UTC timestamp: {timestamp}");
}

/// The lines a short verbose session logs: a registered name with an escape byte, a lock name
/// with a space and one that is not UTF-8, one client that closes and one that resets.
fn verbose_session(port: u16) {
    let mut closes = Client::connect(port);
    assert_eq!(closes.ask(b"iam bad name\n"), "1 ok");
    assert_eq!(closes.ask(b"g bad\x1bname\n"), "1 Got Lock");
    assert_eq!(closes.ask(b"g build  42\n"), "1 Got Lock");
    assert_eq!(closes.ask(b"g bin\xff\n"), "1 Got Lock");
    closes.0.shutdown(std::net::Shutdown::Write).expect("FIN");
    assert_eq!(closes.line(), "");
    let mut resets = Client::connect(port);
    assert_eq!(resets.ask(b"g reset-held\n"), "1 Got Lock");
    resets.reset();
}

#[test]
fn text_log_lines_have_the_documented_shape() {
    let port = free_port();
    let mut args = base_args(port, None);
    args.push("-verbose".into());
    let server = Glockd::start(&args, true);
    let start = parse_text(&server.line_where(|l| l.contains("listening on")));
    assert_eq!(start.level, "INFO");
    assert_eq!(start.message, format!("listening on tcp 127.0.0.1:{port}"));
    assert_eq!(start.field("event"), Some("start"));
    assert_eq!(start.field("version"), Some(env!("CARGO_PKG_VERSION")));
    assert!(start.field("commit").is_some_and(|c| !c.is_empty()));
    for limit in [
        "fd_limit",
        "max_connections",
        "max_line_bytes",
        "write_timeout",
    ] {
        let value = start.field(limit).unwrap_or_else(|| panic!("no {limit}"));
        assert!(value.parse::<u64>().is_ok(), "{limit}={value}");
    }

    verbose_session(port);
    let mut rest = server.lines_until(|l| l.contains("reset-held"));
    let (status, last) = server.stop_with(Signal::SIGTERM);
    assert_eq!(status, Some(0));
    rest.extend(last);
    let lines: Vec<TextLine> = rest.iter().map(|l| parse_text(l)).collect();
    let find = |event: &str, key: &str, value: &str| {
        lines
            .iter()
            .find(|l| l.field("event") == Some(event) && l.field(key) == Some(value))
            .unwrap_or_else(|| panic!("no {event} with {key}={value} in {rest:#?}"))
    };
    let iam = find("iam", "name", "bad name");
    assert_eq!(iam.level, "INFO");
    let conn = iam.field("conn").expect("conn").to_owned();
    assert!(conn.starts_with("127.0.0.1:"), "{conn}");
    assert_eq!(
        find("disconnect", "conn", &conn).field("reason"),
        Some("eof")
    );
    assert_eq!(
        find("orphan", "name", "build 42").field("conn"),
        Some(&*conn)
    );
    assert_eq!(
        find("orphan", "name", "bad\u{1b}name").field("conn"),
        Some(&*conn)
    );
    assert_eq!(
        find("orphan", "name", "bin\\xff").field("conn"),
        Some(&*conn)
    );
    find("disconnect", "reason", "reset");
    find("shutdown", "signal", "SIGTERM");
    assert!(lines.iter().all(|l| !l.timestamp.is_empty()));
    // The raw lines: the escape byte, quotes and the backslash are escaped, the space quoted.
    assert!(rest.iter().any(|l| l.ends_with(r#"name="bad\u{1b}name""#)));
    assert!(rest.iter().any(|l| l.ends_with(r#"name="build 42""#)));
    assert!(rest.iter().any(|l| l.ends_with(r#"name="bin\\xff""#)));
    assert!(rest.iter().any(|l| l.contains(" reason=eof")));
}

#[test]
fn disconnect_lines_say_why() {
    let port = free_port();
    let mut args = base_args(port, None);
    args.extend(["-verbose", "-idle-timeout", "1", "-max-line-bytes", "64"].map(String::from));
    let server = Glockd::start(&args, true);
    let conn_of = |client: &Client| client.0.local_addr().expect("address").to_string();
    let reason = |conn: &str| {
        let line = server.line_where(|l| l.contains("event=disconnect") && l.contains(conn));
        parse_text(&line).field("reason").map(str::to_owned)
    };

    let mut long = Client::connect(port);
    let line = format!("g {}\n", "x".repeat(100));
    assert_eq!(long.ask(line.as_bytes()), "0 Line Too Long");
    assert_eq!(reason(&conn_of(&long)).as_deref(), Some("line_too_long"));

    let mut idle = Client::connect(port);
    assert_eq!(idle.line(), "", "closed when idle");
    assert_eq!(reason(&conn_of(&idle)).as_deref(), Some("idle"));

    let mut staying = Client::connect(port);
    assert_eq!(staying.ask(b"g held\n"), "1 Got Lock");
    let conn = conn_of(&staying);
    let (status, rest) = server.stop_with(Signal::SIGTERM);
    assert_eq!(status, Some(0));
    let line = rest
        .iter()
        .find(|l| l.contains("event=disconnect") && l.contains(&conn))
        .unwrap_or_else(|| panic!("no disconnect in {rest:#?}"));
    assert_eq!(parse_text(line).field("reason"), Some("shutdown"));
}

#[test]
fn json_log_lines_are_one_object_each() {
    let port = free_port();
    let mut args = base_args(port, None);
    args.extend(["-verbose", "-log-format", "json"].map(String::from));
    let server = Glockd::start(&args, true);
    let start: serde_json::Value =
        serde_json::from_str(&server.line_where(|l| l.contains("listening on"))).expect("JSON");
    assert_eq!(start["event"], "start");
    assert_eq!(start["level"], "INFO");
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"));
    assert!(start["max_connections"].as_u64().is_some(), "{start}");
    assert!(start["fd_limit"].as_u64().is_some(), "{start}");
    assert_rfc3339_utc(start["timestamp"].as_str().expect("timestamp"));

    verbose_session(port);
    let mut rest = server.lines_until(|l| l.contains("reset-held"));
    let (status, last) = server.stop_with(Signal::SIGTERM);
    assert_eq!(status, Some(0));
    rest.extend(last);
    let objects: Vec<serde_json::Value> = rest
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for object in &objects {
        assert_rfc3339_utc(object["timestamp"].as_str().expect("timestamp"));
        assert!(
            object["level"].is_string() && object["event"].is_string(),
            "{object}"
        );
    }
    let has = |event: &str, key: &str, value: &str| {
        objects
            .iter()
            .any(|o| o["event"] == event && o[key] == value)
    };
    assert!(has("iam", "name", "bad name"), "{objects:#?}");
    assert!(has("orphan", "name", "bad\u{1b}name"), "{objects:#?}");
    assert!(has("orphan", "name", "build 42"), "{objects:#?}");
    assert!(has("orphan", "name", "bin\\xff"), "{objects:#?}");
    assert!(has("disconnect", "reason", "eof"), "{objects:#?}");
    assert!(has("disconnect", "reason", "reset"), "{objects:#?}");
}

#[test]
fn a_stderr_nobody_reads_costs_log_lines_not_service() {
    let port = free_port();
    let metrics = free_port();
    let mut args = base_args(port, Some(metrics));
    args.push("-verbose".into());
    // stderr is a pipe that is never read: once its buffer is full, every write to it blocks.
    let server = Glockd::start(&args, false);

    // 4 threads × 1500 connections, each taking a lock and closing: three log lines each
    // (connect, disconnect, orphan), far more than the pipe and the log queue hold.
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            std::thread::spawn(move || {
                let mut slowest = Duration::ZERO;
                for i in 0..1500 {
                    let asked = Instant::now();
                    let mut client = Client::connect(port);
                    let name = format!("g churn-{worker}-{i}\n");
                    assert_eq!(client.ask(name.as_bytes()), "1 Got Lock");
                    slowest = slowest.max(asked.elapsed());
                }
                slowest
            })
        })
        .collect();
    let slowest = workers
        .into_iter()
        .map(|w| w.join().expect("client thread"))
        .max()
        .expect("workers");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a client waited {slowest:?}"
    );

    // Still answering at once, and the endpoint says what was lost.
    let asked = Instant::now();
    let mut client = Client::connect(port);
    assert_eq!(client.ask(b"g after-the-flood\n"), "1 Got Lock");
    assert!(asked.elapsed() < Duration::from_secs(1));
    let dropped = metric(&scrape(metrics), "glockd_log_dropped_total");
    assert!(dropped > 0.0, "no log line was dropped");
    drop(client);
    // Shutdown does not hang on the stuck stderr either.
    let asked = Instant::now();
    let (status, _) = server.stop_with(Signal::SIGTERM);
    assert_eq!(status, Some(0));
    assert!(asked.elapsed() < Duration::from_secs(10));
}

#[test]
fn sighup_reopens_the_log_file_and_sigterm_still_cleans_up() {
    let dir = temp_dir("ops", "hup");
    let (log, pidfile, socket) = (dir.join("glockd.log"), dir.join("pid"), dir.join("sock"));
    let port = free_port();
    let mut args = base_args(port, None);
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    args.extend([
        "-log-file".into(),
        path(&log),
        "-pidfile".into(),
        path(&pidfile),
        "-unix".into(),
        path(&socket),
    ]);
    let server = Glockd::start(&args, true);
    let mut holder = Client::connect(port);
    assert_eq!(holder.ask(b"g held\n"), "1 Got Lock");
    // The start-up line is written by the log's own thread: wait for it before rotating.
    wait_for_file_line(&log, "listening on");
    let rotated = dir.join("glockd.log.1");
    std::fs::rename(&log, &rotated).expect("rotate");

    server.signal(Signal::SIGHUP);
    let reopened = wait_for_file_line(&log, "reloaded");
    let line = parse_text(&reopened);
    assert_eq!(line.field("event"), Some("reload"));
    assert_eq!(line.field("signal"), Some("SIGHUP"));
    assert!(std::fs::read_to_string(&rotated)
        .expect("old log")
        .contains("listening on"));

    // Still serving, with the lock held across the signal.
    assert_eq!(Client::connect(port).ask(b"i held\n"), "1 Locked");
    server.signal(Signal::SIGUSR1);
    let status = parse_text(&wait_for_file_line(&log, "event=status"));
    assert_eq!(status.field("locks"), Some("1"));
    assert!(status.field("connections").is_some_and(|c| c != "0"));
    // (SIGUSR2 is a live upgrade, which replaces this process: see tests/upgrade.rs.)
    assert_eq!(holder.ask(b"i held\n"), "1 Locked");

    let (status, stderr) = server.stop_with(Signal::SIGTERM);
    assert_eq!(status, Some(0));
    assert!(stderr.is_empty(), "logged to stderr: {stderr:?}");
    assert!(!pidfile.exists(), "pidfile left behind");
    assert!(!socket.exists(), "socket left behind");
    wait_for_file_line(&log, "event=shutdown");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_answers_waiters_as_timed_out_and_runs_what_they_sent_behind() {
    let port = free_port();
    let mut args = base_args(port, None);
    // One shard: the holder's lock stays held until the waiters have been answered.
    args[8] = "1".into();
    args.extend(["-shutdown-timeout".into(), "3".into()]);
    let server = Glockd::start(&args, true);
    let mut holder = Client::connect(port);
    assert_eq!(
        holder.ask(
            b"g held
"
        ),
        "1 Got Lock"
    );
    assert_eq!(
        holder.ask(
            b"sg pool
"
        ),
        "1 Got Shared Lock"
    );
    let mut waiter = Client::connect(port);
    waiter
        .0
        .write_all(b"gw 60000 held\ng mine\ni mine\n")
        .expect("write");
    let mut shared_waiter = Client::connect(port);
    shared_waiter
        .0
        .write_all(b"sgw 60000 1 pool\nsg other\n")
        .expect("write");
    // Both wait before the signal comes.
    let mut asking = Client::connect(port);
    let mut queued = false;
    for _ in 0..2000 {
        asking.0.write_all(b"q\n").expect("write");
        let mut waiters = None;
        loop {
            let line = asking.line();
            if let Some(n) = line.strip_prefix("lock_waiters: ") {
                waiters = n.parse::<u64>().ok();
            }
            if line.starts_with("shared_orphans: ") {
                break;
            }
        }
        if waiters == Some(2) {
            queued = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(queued, "the waiters never queued");

    server.signal(Signal::SIGTERM);
    // Each waiter is answered as timed out, then what it sent behind the wait runs, then its
    // connection closes.
    assert_eq!(waiter.line(), "0 Timed Out");
    assert_eq!(waiter.line(), "1 Got Lock");
    assert_eq!(waiter.line(), "1 Locked");
    assert_eq!(waiter.line(), "", "closed after its replies");
    assert_eq!(shared_waiter.line(), "0 Timed Out");
    assert_eq!(shared_waiter.line(), "1 Got Shared Lock");
    assert_eq!(shared_waiter.line(), "", "closed after its replies");
    assert_eq!(server.exit_status(), Some(0));
}

#[test]
fn sigquit_exits_at_once_and_leaves_nothing_behind() {
    let dir = temp_dir("ops", "quit");
    let (pidfile, socket) = (dir.join("pid"), dir.join("sock"));
    let port = free_port();
    let mut args = base_args(port, None);
    args.extend([
        "-pidfile".into(),
        pidfile.to_str().expect("path").to_owned(),
        "-unix".into(),
        socket.to_str().expect("path").to_owned(),
        // A graceful shutdown would wait this long for the client below.
        "-shutdown-timeout".into(),
        "60".into(),
    ]);
    let server = Glockd::start(&args, true);
    let mut holder = Client::connect(port);
    assert_eq!(holder.ask(b"g held\n"), "1 Got Lock");
    let asked = Instant::now();
    let (status, rest) = server.stop_with(Signal::SIGQUIT);
    assert_eq!(status, Some(130));
    assert!(asked.elapsed() < Duration::from_secs(10));
    assert!(rest.iter().any(|l| l.contains("event=quit")), "{rest:?}");
    assert!(!pidfile.exists(), "pidfile left behind");
    assert!(!socket.exists(), "socket left behind");
    // The lock went with the process.
    assert_eq!(holder.line(), "");
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits (bounded) for a line containing `text` in the file at `path`.
fn wait_for_file_line(path: &Path, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(content) = std::fs::read_to_string(path) {
            if let Some(line) = content.lines().find(|l| l.contains(text)) {
                return line.to_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn at_the_descriptor_limit_extra_clients_are_told_and_metrics_still_answer() {
    let port = free_port();
    let metrics = free_port();
    let args = base_args(port, Some(metrics));
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"ulimit -n 64 && exec "$0" "$@""#)
        .arg(BIN)
        .args(&args);
    let server = Glockd::spawn(command, port, true);
    let warning = parse_text(&server.line_where(|l| l.contains("event=fd_limit")));
    assert_eq!(warning.level, "WARN");
    let start = parse_text(&server.line_where(|l| l.contains("listening on")));
    assert_eq!(start.field("fd_limit"), Some("64"));
    let fit: usize = start
        .field("max_connections")
        .and_then(|m| m.parse().ok())
        .expect("max_connections");
    assert!(
        (8..48).contains(&fit),
        "{fit} connections under 64 descriptors"
    );
    assert_eq!(warning.field("max_connections"), Some(&*fit.to_string()));

    // The readiness probe's connection may still be counted for a moment.
    std::thread::sleep(Duration::from_millis(200));
    let mut holders: Vec<Client> = (0..fit)
        .map(|i| {
            let mut client = Client::connect(port);
            assert_eq!(client.ask(format!("g held-{i}\n").as_bytes()), "1 Got Lock");
            client
        })
        .collect();

    // Twice as many more than fit: each one is told at once and closed, none hangs.
    for _ in 0..2 * fit {
        let asked = Instant::now();
        let mut extra = Client::connect(port);
        assert_eq!(extra.line(), "0 Too Many Connections");
        assert_eq!(extra.line(), "", "closed after the refusal");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
    }
    let text = scrape(metrics);
    assert_eq!(metric(&text, "glockd_connections"), fit as f64);

    // Everyone admitted still holds their lock and is served.
    for (i, holder) in holders.iter_mut().enumerate() {
        assert_eq!(holder.ask(format!("i held-{i}\n").as_bytes()), "1 Locked");
    }
    // A place freed is a place taken.
    holders.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut next = Client::connect(port);
        match next.ask(b"g newcomer\n").as_str() {
            "1 Got Lock" => break,
            "0 Too Many Connections" => {}
            other => panic!("{other}"),
        }
        assert!(Instant::now() < deadline, "the freed place was never given");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, _) = server.stop_with(Signal::SIGTERM);
    assert_eq!(status, Some(0));
}
