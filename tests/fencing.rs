//! Fencing tokens against the real binary: restarts with the clock set back (under Debian's
//! libfaketime), another shard count, broken state files, SIGKILL right after a ceiling write,
//! and a burst of grants that must wait at a ceiling whose write is slow.
//!
//! The clock test needs libfaketime (Debian package `faketime`, which `.ci/run` installs). It is
//! skipped with a note when missing, unless GLOCKD_REQUIRE_FAKETIME=1 (as in CI), which makes a
//! missing libfaketime a failure.

mod process;

use process::{free_port, temp_dir};

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_glockd");

/// Debug builds of the server read this (see `main.rs`); release builds ignore it.
const SLOW_WRITE_ENV: &str = "GLOCKD_TEST_SLOW_CEILING_WRITE_MS";
/// The ceiling saved in a state file.
fn saved_ceiling(path: &Path) -> u64 {
    let text = std::fs::read(path).expect("the state file");
    glockd::fencing::parse_state(&text).expect("a valid state file")
}

/// How to start one server.
#[derive(Default)]
struct Launch<'a> {
    state_file: Option<&'a Path>,
    /// 0: two shards.
    shards: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
    metrics: bool,
}

/// A running `glockd` process, killed if the test fails.
struct Glockd {
    child: Option<Child>,
    port: u16,
    metrics_port: Option<u16>,
    /// What it printed on stderr before it was listening.
    before_listening: Vec<String>,
}

impl Glockd {
    fn start(launch: Launch) -> Glockd {
        let port = free_port();
        let metrics_port = launch.metrics.then(free_port);
        let mut command = Command::new(BIN);
        command.args(["-bind", "127.0.0.1", "-pin=false", "-ws=0"]);
        command.args(["-port", &port.to_string()]);
        let shards = if launch.shards == 0 { 2 } else { launch.shards };
        command.args(["-shards", &shards.to_string()]);
        match metrics_port {
            Some(metrics) => command.args(["-metrics", &format!("127.0.0.1:{metrics}")]),
            None => command.arg("-metrics=off"),
        };
        if let Some(path) = launch.state_file {
            command.arg("-state-file").arg(path);
        }
        command.args(&launch.args);
        command.env_remove(SLOW_WRITE_ENV);
        command.envs(launch.env);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn glockd");
        let before_listening = process::wait_until_listening(&mut child);
        Glockd {
            child: Some(child),
            port,
            metrics_port,
            before_listening,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// Sends `signal` and waits (bounded) for the process to end.
    fn stop_with(mut self, signal: Signal) -> std::process::ExitStatus {
        kill(self.pid(), signal).expect("signal");
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "glockd did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        stream
    }

    /// Sends `commands` on a new connection and returns every reply (the connection is then
    /// closed, releasing its locks).
    fn ask(&self, commands: &str) -> String {
        let mut stream = self.connect();
        stream.write_all(commands.as_bytes()).expect("write");
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("read");
        reply
    }

    /// `gt NAME` on a fresh connection: the token.
    fn token(&self, name: &str) -> u64 {
        parse_tokens(&self.ask(&format!("gt {name}\n")))[0]
    }

    /// The value of a sample on the metrics endpoint.
    fn metric(&self, name: &str) -> f64 {
        let port = self.metrics_port.expect("metrics on");
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        write!(stream, "GET /metrics HTTP/1.0\r\n\r\n").expect("request");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("response");
        text.lines()
            .find_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                (series == name).then(|| value.parse().expect("a number"))
            })
            .unwrap_or_else(|| panic!("no {name} in the scrape"))
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

/// The tokens of `1 TOKEN Got Lock` replies, in order; panics on any other reply.
fn parse_tokens(replies: &str) -> Vec<u64> {
    replies
        .lines()
        .map(|line| {
            let words: Vec<&str> = line.split(' ').collect();
            assert!(
                words.len() == 4 && words[0] == "1" && line.ends_with(" Got Lock"),
                "not a grant: {line:?}"
            );
            words[1].parse().expect("a token")
        })
        .collect()
}

/// Runs the binary with `args`, expecting it to refuse to start: its exit code and stderr.
fn refused(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["-bind", "127.0.0.1", "-ws=0", "-metrics=off", "-pin=false"])
        .args(["-port", &free_port().to_string()])
        .args(args)
        .env_remove(SLOW_WRITE_ENV)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// libfaketime's multi-threaded preload library, or None (skipping) where it is missing and
/// not required. The library is preloaded directly rather than through the `faketime` wrapper,
/// which runs the program as its child, so the test could not signal the server itself.
fn libfaketime() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("faketime"))
        .collect();
    dirs.extend(["/usr/lib/faketime", "/usr/local/lib/faketime"].map(PathBuf::from));
    let found = dirs
        .into_iter()
        .map(|dir| dir.join("libfaketimeMT.so.1"))
        .find(|path| path.is_file());
    if found.is_none() {
        if std::env::var_os("GLOCKD_REQUIRE_FAKETIME").is_some() {
            panic!("libfaketime is required (GLOCKD_REQUIRE_FAKETIME is set) but not installed");
        }
        eprintln!("skipping: libfaketime is not installed (Debian package `faketime`)");
    }
    found
}

/// The environment that runs a program with its clock an hour behind.
fn an_hour_behind(library: &Path) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), library.to_string_lossy().into_owned()),
        ("FAKETIME".into(), "-1h".into()),
    ]
}

#[test]
fn a_restart_with_the_clock_an_hour_behind_still_hands_out_larger_tokens() {
    let Some(library) = libfaketime() else {
        return;
    };
    let dir = temp_dir("fencing", "clock-back");
    let state = dir.join("state");
    let first = Glockd::start(Launch {
        state_file: Some(&state),
        ..Launch::default()
    });
    assert!(
        first.before_listening.iter().all(|l| !l.contains("note")),
        "{:?}",
        first.before_listening
    );
    let before: Vec<u64> = (0..3).map(|_| first.token("invoice-42")).collect();
    assert!(before.windows(2).all(|w| w[1] > w[0]), "{before:?}");
    assert!(first.stop_with(Signal::SIGTERM).success());
    let last = before[2];

    // The control: without the state file, the faked clock really is behind (so libfaketime
    // reaches the server's clock reads), tokens go back, and the server warns about it.
    let unsaved = Glockd::start(Launch {
        env: an_hour_behind(&library),
        ..Launch::default()
    });
    assert!(
        unsaved
            .before_listening
            .iter()
            .any(|l| l.contains("without -state-file")),
        "{:?}",
        unsaved.before_listening
    );
    let behind = unsaved.token("invoice-42");
    assert!(
        behind < last,
        "the faked clock is not behind: {behind} after {last}"
    );
    assert!(unsaved.stop_with(Signal::SIGTERM).success());

    let second = Glockd::start(Launch {
        state_file: Some(&state),
        env: an_hour_behind(&library),
        ..Launch::default()
    });
    let after: Vec<u64> = (0..3).map(|_| second.token("invoice-42")).collect();
    assert!(after[0] > last, "{after:?} after {last}");
    assert!(after.windows(2).all(|w| w[1] > w[0]), "{after:?}");
    assert!(saved_ceiling(&state) > after[2]);
    assert!(second.stop_with(Signal::SIGTERM).success());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn another_shard_count_after_a_restart_keeps_every_names_tokens_growing() {
    let dir = temp_dir("fencing", "shards");
    let state = dir.join("state");
    // A ceiling an hour ahead of the clock, as a server whose clock ran fast would have left:
    // only the saved ceiling, not the clock, can then keep the tokens growing.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let ahead = now + 3_600_000_000;
    std::fs::write(&state, glockd::fencing::render_state(ahead)).unwrap();
    let names: Vec<String> = (0..64).map(|i| format!("name-{i}")).collect();
    let all: String = names.iter().map(|n| format!("gt {n}\n")).collect();
    let mut last: Option<Vec<u64>> = None;
    for shards in [4, 1, 3] {
        let server = Glockd::start(Launch {
            state_file: Some(&state),
            shards,
            ..Launch::default()
        });
        let tokens = parse_tokens(&server.ask(&all));
        assert_eq!(tokens.len(), names.len());
        assert!(tokens.iter().all(|&t| t > ahead));
        if let Some(before) = &last {
            for ((name, old), new) in names.iter().zip(before).zip(&tokens) {
                assert!(new > old, "{name}: {new} with {shards} shards after {old}");
            }
        }
        assert!(tokens.iter().all(|&t| t < saved_ceiling(&state)));
        last = Some(tokens);
        assert!(server.stop_with(Signal::SIGTERM).success());
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unusable_state_files_are_start_up_errors() {
    let dir = temp_dir("fencing", "bad-files");
    let corrupt = dir.join("corrupt");
    std::fs::write(&corrupt, "glockd-state 1\nceiling twelve\n").unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, "").unwrap();
    let unreadable = dir.join("a-directory");
    std::fs::create_dir(&unreadable).unwrap();
    let unwritable = dir.join("no-such-directory").join("state");
    let not_a_directory = corrupt.join("state");
    for (path, reason) in [
        (&corrupt, "needs a whole number"),
        (&empty, "empty"),
        (&unreadable, "cannot read"),
        (&unwritable, "cannot write"),
        // Its lock file, beside it, is taken first.
        (&not_a_directory, "cannot write"),
    ] {
        let (code, stderr) = refused(&["-state-file".as_ref(), path.as_os_str()]);
        assert_eq!(code, Some(1), "{}: {stderr}", path.display());
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with("glockd: cannot start: state file ")
                && stderr.contains(&*path.to_string_lossy())
                && stderr.contains(reason),
            "{}: {stderr}",
            path.display()
        );
    }
    // Nothing was touched.
    assert_eq!(
        std::fs::read_to_string(&corrupt).unwrap(),
        "glockd-state 1\nceiling twelve\n"
    );
    assert!(std::fs::read(&empty).unwrap().is_empty());
    // A missing file in a writable place is a first start.
    let fresh = dir.join("fresh");
    let server = Glockd::start(Launch {
        state_file: Some(&fresh),
        ..Launch::default()
    });
    assert!(server.token("x") < saved_ceiling(&fresh));
    assert!(server.stop_with(Signal::SIGTERM).success());
    // The reserve is checked too.
    let (code, stderr) = refused(&["-token-reserve-ms".as_ref(), "0".as_ref()]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("token-reserve-ms"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Two servers on one state file would each keep tokens above their own ceiling only: the
/// second one refuses to start, with one line naming the file, and the first serves on. Once
/// the first has gone, a server on the file starts above every token it handed out.
#[test]
fn a_second_server_on_the_same_state_file_refuses_to_start() {
    let dir = temp_dir("fencing", "shared");
    let state = dir.join("state");
    let first = Glockd::start(Launch {
        state_file: Some(&state),
        ..Launch::default()
    });
    let before = first.token("invoice-42");
    let (code, stderr) = refused(&["-state-file".as_ref(), state.as_os_str()]);
    assert_eq!(code, Some(4), "exit status as for a held pidfile: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("glockd: state file ")
            && stderr.contains(&*state.to_string_lossy())
            && stderr.contains("another running glockd"),
        "{stderr}"
    );
    let during = first.token("invoice-42");
    assert!(during > before, "{during} after {before}");
    assert!(first.stop_with(Signal::SIGTERM).success());

    let second = Glockd::start(Launch {
        state_file: Some(&state),
        ..Launch::default()
    });
    let after = second.token("invoice-42");
    assert!(after > during, "{after} after {during}");
    assert!(second.stop_with(Signal::SIGTERM).success());
    let _ = std::fs::remove_dir_all(dir);
}

/// Takes tokens on a few names over one connection until the server goes away; returns the
/// largest token it was granted.
fn take_tokens_until_killed(server: &Glockd) -> std::thread::JoinHandle<u64> {
    let mut stream = server.connect();
    std::thread::spawn(move || {
        let mut largest = 0;
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        for round in 0u64.. {
            let name = format!("k{}", round % 8);
            if write!(stream, "gt {name}\nr {name}\n").is_err() {
                break;
            }
            let mut grant = String::new();
            let mut release = String::new();
            if reader.read_line(&mut grant).unwrap_or(0) == 0
                || reader.read_line(&mut release).unwrap_or(0) == 0
            {
                break;
            }
            largest = largest.max(parse_tokens(&grant)[0]);
        }
        largest
    })
}

#[test]
fn sigkill_right_after_a_ceiling_write_then_a_restart_still_hands_out_larger_tokens() {
    let dir = temp_dir("fencing", "sigkill");
    let state = dir.join("state");
    // A short reserve: the ceiling is rewritten every 50 ms while tokens are taken.
    let launch = || Launch {
        state_file: Some(&state),
        args: vec!["-token-reserve-ms".into(), "100".into()],
        ..Launch::default()
    };
    for _ in 0..3 {
        let server = Glockd::start(launch());
        let client = take_tokens_until_killed(&server);
        let written = std::fs::read(&state).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read(&state).unwrap() == written {
            assert!(Instant::now() < deadline, "the ceiling was never rewritten");
            std::thread::sleep(Duration::from_micros(200));
        }
        let status = server.stop_with(Signal::SIGKILL);
        assert_eq!(status.code(), None, "killed by a signal");
        let largest = client.join().unwrap();
        assert!(largest > 0, "no token was taken");

        let restarted = Glockd::start(launch());
        let after = restarted.token("k0");
        assert!(after > largest, "{after} after {largest}");
        assert!(restarted.stop_with(Signal::SIGTERM).success());
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigkill_in_the_middle_of_a_ceiling_write_leaves_the_old_file_whole() {
    if !cfg!(debug_assertions) {
        eprintln!("skipping: slow ceiling writes exist only in debug builds");
        return;
    }
    let dir = temp_dir("fencing", "sigkill-mid-write");
    let state = dir.join("state");
    let temp = dir.join("state.tmp");
    let server = Glockd::start(Launch {
        state_file: Some(&state),
        args: vec!["-token-reserve-ms".into(), "100".into()],
        env: vec![(SLOW_WRITE_ENV.into(), "400".into())],
        ..Launch::default()
    });
    let client = take_tokens_until_killed(&server);
    // The first write happened at start; the next one's temporary file is there for 400 ms.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !temp.exists() {
        assert!(Instant::now() < deadline, "no write began");
        std::thread::sleep(Duration::from_micros(200));
    }
    server.stop_with(Signal::SIGKILL);
    let largest = client.join().unwrap();
    assert!(largest < saved_ceiling(&state));
    let restarted = Glockd::start(Launch {
        state_file: Some(&state),
        ..Launch::default()
    });
    let after = restarted.token("k0");
    assert!(after > largest, "{after} after {largest}");
    assert!(restarted.stop_with(Signal::SIGTERM).success());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_burst_of_grants_waits_at_a_ceiling_that_is_not_yet_saved() {
    if !cfg!(debug_assertions) {
        eprintln!("skipping: slow ceiling writes exist only in debug builds");
        return;
    }
    let dir = temp_dir("fencing", "burst");
    let state = dir.join("state");
    // Every write takes 150 ms to become durable but is asked for only 100 ms before the
    // ceiling is reached: grants must wait for it, over and over.
    let server = Glockd::start(Launch {
        state_file: Some(&state),
        shards: 2,
        args: vec!["-token-reserve-ms".into(), "200".into()],
        env: vec![(SLOW_WRITE_ENV.into(), "150".into())],
        metrics: true,
    });
    let mut stream = server.connect();
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut grants = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Until grants have been seen waiting, and for at least a few thousand grants.
    while grants < 3000 || server.metric("glockd_fencing_ceiling_wait_seconds_total") == 0.0 {
        assert!(Instant::now() < deadline, "no grant ever waited");
        let names: Vec<String> = (0..100).map(|i| format!("burst-{}", i % 16)).collect();
        let batch: String = names.iter().map(|n| format!("gt {n}\nr {n}\n")).collect();
        stream.write_all(batch.as_bytes()).expect("write");
        let mut tokens = Vec::new();
        for _ in &names {
            let (mut grant, mut release) = (String::new(), String::new());
            reader.read_line(&mut grant).expect("grant");
            reader.read_line(&mut release).expect("release");
            assert_eq!(release, "1 Released Lock\n");
            tokens.push(parse_tokens(&grant)[0]);
        }
        // Read after the replies: the durable ceiling then is at least what it was when each
        // token was issued, and every token must be below that.
        let ceiling = saved_ceiling(&state);
        for (name, token) in names.iter().zip(tokens) {
            assert!(
                token < ceiling,
                "{token} issued at or past the saved {ceiling}"
            );
            let previous = last.insert(name.clone(), token).unwrap_or(0);
            assert!(token > previous, "{name}: {token} after {previous}");
        }
        grants += names.len();
    }
    let gauge = server.metric("glockd_fencing_ceiling");
    assert!(gauge > 0.0 && gauge <= saved_ceiling(&state) as f64);
    assert!(server.metric("glockd_fencing_ceiling_writes_total") >= 2.0);
    assert_eq!(
        server.metric("glockd_fencing_ceiling_write_errors_total"),
        0.0
    );
    drop(stream);
    assert!(server.stop_with(Signal::SIGTERM).success());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn grants_stop_at_the_saved_ceiling_while_it_cannot_be_rewritten_and_resume_after() {
    let dir = temp_dir("fencing", "unwritable-later");
    let home = dir.join("home");
    std::fs::create_dir(&home).unwrap();
    let state = home.join("state");
    let server = Glockd::start(Launch {
        state_file: Some(&state),
        args: vec!["-token-reserve-ms".into(), "100".into()],
        metrics: true,
        ..Launch::default()
    });
    // A client taking tokens one after another, reporting each.
    let (tokens_tx, tokens) = std::sync::mpsc::channel::<u64>();
    let mut stream = server.connect();
    let client = std::thread::spawn(move || {
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        loop {
            let (mut grant, mut release) = (String::new(), String::new());
            if stream.write_all(b"gt x\nr x\n").is_err()
                || reader.read_line(&mut grant).unwrap_or(0) == 0
                || reader.read_line(&mut release).unwrap_or(0) == 0
                || tokens_tx.send(parse_tokens(&grant)[0]).is_err()
            {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    // Take the state file's directory away: every ceiling write now fails.
    let moved = dir.join("moved");
    std::fs::rename(&home, &moved).unwrap();
    while server.metric("glockd_fencing_ceiling_write_errors_total") == 0.0 {
        assert!(Instant::now() < deadline, "no write failed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The last ceiling that reached the disk; wait until the clock is well past it, so that
    // any token issued now would be above it.
    let saved = saved_ceiling(&moved.join("state"));
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    };
    while now() < saved + 50_000 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let before: Vec<u64> = tokens.try_iter().collect();
    assert!(!before.is_empty());
    assert!(
        before.iter().all(|&t| t < saved),
        "a token at or past the saved ceiling {saved}"
    );
    // Give the directory back: the next write succeeds and the waiting grant goes through.
    std::fs::rename(&moved, &home).unwrap();
    let after = loop {
        let token = tokens
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("grants resume once the ceiling is saved");
        assert!(token < saved_ceiling(&state));
        if token >= saved {
            break token;
        }
    };
    assert!(after < saved_ceiling(&state));
    assert!(server.metric("glockd_fencing_ceiling_wait_seconds_total") > 0.0);
    assert!(server.stop_with(Signal::SIGKILL).code().is_none());
    client.join().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
