//! Live upgrades, end to end: the built binary, copied to a scratch directory and replaced
//! there as a package manager would, is asked for an upgrade (`glockd upgrade`, SIGUSR2) while
//! clients hold locks on TCP and the unix socket, wait in queues, pipeline, and use a rate
//! limiter; after it every connection is still open with the same locks and tokens, and the
//! waiters are served in order. Each step of the hand-over is also made to fail in turn: the
//! running server then carries on with everything.

mod common;
mod process;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use process::{ask, free_port, temp_dir, wait_until_listening};

/// A line-protocol client that keeps its connection.
struct Client<S: Read + Write> {
    reader: BufReader<S>,
}

impl Client<TcpStream> {
    fn tcp(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Client {
            reader: BufReader::new(stream),
        }
    }
}

impl Client<UnixStream> {
    fn unix(path: &Path) -> Self {
        let stream = UnixStream::connect(path).expect("connect unix");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Client {
            reader: BufReader::new(stream),
        }
    }
}

impl<S: Read + Write> Client<S> {
    fn send(&mut self, line: &str) {
        let stream = self.reader.get_mut();
        stream.write_all(line.as_bytes()).expect("write");
        stream.write_all(b"\n").expect("write");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read a reply");
        assert!(line.ends_with('\n'), "connection closed: {line:?}");
        line.trim_end().to_owned()
    }

    fn ask(&mut self, line: &str) -> String {
        self.send(line);
        self.line()
    }
}

/// Held while a copy of the binary is open for writing and while a process is started: a
/// process forked (by another test) while a copy is being written inherits the writing
/// descriptor until it execs, and executing that copy meanwhile fails with "text file busy".
static FORKING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn forking() -> std::sync::MutexGuard<'static, ()> {
    FORKING.lock().unwrap_or_else(|e| e.into_inner())
}

/// A server started from a copy of the binary that the test can replace.
struct Server {
    dir: PathBuf,
    exe: PathBuf,
    port: u16,
    child: Child,
}

impl Server {
    fn start(tag: &str, extra: &[&str]) -> Server {
        Server::start_with_env(tag, extra, &[])
    }

    fn start_with_env(tag: &str, extra: &[&str], env: &[(&str, &Path)]) -> Server {
        let dir = temp_dir("upgrade", tag);
        let exe = dir.join("glockd");
        let forking = forking();
        std::fs::copy(env!("CARGO_BIN_EXE_glockd"), &exe).expect("copy the binary");
        let port = free_port();
        let mut child = Command::new(&exe)
            .args([
                "-bind",
                "127.0.0.1",
                "-ws",
                "0",
                "-metrics",
                "off",
                "-shards",
                "2",
            ])
            .args(["-port", &port.to_string()])
            .arg("-unix")
            .arg(dir.join("glockd.sock"))
            .arg("-pidfile")
            .arg(dir.join("glockd.pid"))
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start glockd");
        drop(forking);
        wait_until_listening(&mut child);
        Server {
            dir,
            exe,
            port,
            child,
        }
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("glockd.pid")
    }

    fn pid(&self) -> u32 {
        std::fs::read_to_string(self.pidfile())
            .expect("pidfile")
            .trim()
            .parse()
            .expect("a pid")
    }

    /// Puts a new copy of the binary in place of the old one (a new file, as a package
    /// manager's rename does).
    fn replace_binary(&self) {
        let next = self.dir.join("glockd.next");
        let _forking = forking();
        std::fs::copy(env!("CARGO_BIN_EXE_glockd"), &next).expect("copy");
        std::fs::rename(&next, &self.exe).expect("replace the binary");
    }

    /// `glockd upgrade -pidfile F FLAGS…`: its exit success and what it printed.
    fn upgrade(&self, flags: &[&str]) -> (bool, String) {
        let forking = forking();
        let child = Command::new(&self.exe)
            .arg("upgrade")
            .arg("-pidfile")
            .arg(self.pidfile())
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run glockd upgrade");
        drop(forking);
        let out = child.wait_with_output().expect("glockd upgrade's outcome");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn unix_path(&self) -> PathBuf {
        self.dir.join("glockd.sock")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The process serving now may be a successor (not our child): stop whichever it is.
        if let Ok(text) = std::fs::read_to_string(self.pidfile()) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What every test holds across an upgrade: a named holder of exclusive and shared locks on
/// TCP with a fencing token, a unix socket holder, a waiter queued behind the first holder, and
/// a rate limiter used up.
struct Holdings {
    alice: Client<TcpStream>,
    unix: Client<UnixStream>,
    waiter: Client<TcpStream>,
    token: String,
    tag: String,
}

impl Holdings {
    fn take(server: &Server, tag: &str) -> Holdings {
        let mut alice = Client::tcp(server.port);
        assert_eq!(alice.ask("iam alice"), "1 ok");
        assert_eq!(alice.ask(&format!("g a{tag}")), "1 Got Lock");
        let token = alice.ask(&format!("gt b{tag}"));
        assert!(token.starts_with("1 "), "{token}");
        assert!(alice.ask(&format!("sg s{tag}")).starts_with("1"));
        // A burst of 3 lets 4 through; the 5th is limited.
        for _ in 0..4 {
            assert!(alice
                .ask(&format!("rl r{tag} 3 1 3600000"))
                .starts_with("1"));
        }
        assert!(alice
            .ask(&format!("rl r{tag} 3 1 3600000"))
            .starts_with("0"));
        let mut unix = Client::unix(&server.unix_path());
        assert_eq!(unix.ask(&format!("g u{tag}")), "1 Got Lock");
        let mut waiter = Client::tcp(server.port);
        waiter.send(&format!("gw 600000 a{tag}"));
        waiter.send(&format!("i u{tag}"));
        // The wait is queued once another client sees it in the listing.
        let until = Instant::now() + Duration::from_secs(10);
        while !ask(server.port, "q\n").contains("lock_waiters: 1") {
            assert!(Instant::now() < until, "the waiter never queued");
            std::thread::sleep(Duration::from_millis(10));
        }
        Holdings {
            alice,
            unix,
            waiter,
            token,
            tag: tag.to_owned(),
        }
    }

    /// Everything is as it was: the same locks with the same token, the same name, the waiter
    /// still waiting (and served when the lock is released), the limiter still used up.
    fn check(mut self, server: &Server) {
        let tag = self.tag.clone();
        // `gt` answered `1 TOKEN Got Lock`; `t` answers `1 TOKEN Locked`.
        let token = self.token.split(' ').nth(1).expect("a token").to_owned();
        assert_eq!(
            self.alice.ask(&format!("t b{tag}")),
            format!("1 {token} Locked")
        );
        let me = self.alice.ask("me");
        assert!(
            me.starts_with("1 127.0.0.1:") && me.ends_with(" alice"),
            "{me}"
        );
        assert!(
            self.alice
                .ask(&format!("rl r{tag} 3 1 3600000"))
                .starts_with("0"),
            "limiter reset"
        );
        assert_eq!(self.unix.ask(&format!("i u{tag}")), "1 Locked");
        assert_eq!(
            ask(server.port, &format!("g u{tag}\n")),
            "0 Cannot Get Lock\n"
        );
        // The waiter is still queued: releasing the lock serves it.
        assert_eq!(self.alice.ask(&format!("r a{tag}")), "1 Released Lock");
        assert_eq!(self.waiter.line(), "1 Got Lock");
        assert_eq!(self.waiter.line(), "1 Locked");
    }
}

/// A client pipelining numbered commands through the upgrade: every reply comes, once, in
/// order.
fn pipeline_through(port: u16, rounds: usize) -> std::thread::JoinHandle<()> {
    let mut client = Client::tcp(port);
    std::thread::spawn(move || {
        for round in 0..rounds {
            let mut batch = String::new();
            for k in 0..50 {
                batch.push_str(&format!("g p{round}-{k}\nr p{round}-{k}\n"));
            }
            client
                .reader
                .get_mut()
                .write_all(batch.as_bytes())
                .expect("write");
            for k in 0..50 {
                assert_eq!(client.line(), "1 Got Lock", "round {round} command {k}");
                assert_eq!(
                    client.line(),
                    "1 Released Lock",
                    "round {round} command {k}"
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

#[test]
fn an_upgrade_keeps_every_connection_lock_and_waiter_and_may_change_the_shard_count() {
    let mut server = Server::start("carry", &[]);
    let old_pid = server.pid();
    let holdings = Holdings::take(&server, "1");
    let before = ask(server.port, "q\n");
    let pipeline = pipeline_through(server.port, 200);
    std::thread::sleep(Duration::from_millis(50));
    server.replace_binary();
    let (ok, said) = server.upgrade(&["-shards", "3"]);
    assert!(ok, "{said}");
    assert!(said.starts_with("upgraded: pid"), "{said}");
    pipeline.join().expect("pipelined replies in order");
    // The old process is gone (cleanly), a new one serves, with three shards now.
    let status = server.child.wait().expect("the old process exits");
    assert!(status.success(), "{status:?}");
    assert_ne!(server.pid(), old_pid);
    let shards = ask(server.port, "shards\n");
    assert!(shards.starts_with("1 3 "), "{shards}");
    holdings.check(&server);
    // `q` went on from where it was.
    let after = ask(server.port, "q\n");
    let total = |q: &str| -> u64 {
        q.lines()
            .find_map(|l| l.strip_prefix("command_g: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("command_g")
    };
    assert!(total(&after) >= total(&before), "{before}\n{after}");
    // And a second upgrade in a row works too, back to two shards.
    let holdings = Holdings::take(&server, "2");
    let (ok, said) = server.upgrade(&["-shards", "2"]);
    assert!(ok, "{said}");
    holdings.check(&server);
}

#[test]
fn a_failed_upgrade_at_any_step_leaves_the_running_server_with_everything() {
    let server = Server::start("fail", &["-upgrade-timeout", "3"]);
    let pid = server.pid();
    for step in ["ready", "listeners", "image", "adopt", "refuse", "hang"] {
        eprintln!("failing at {step}");
        let holdings = Holdings::take(&server, step);
        let (ok, said) = server.upgrade(&["-upgrade-fail-at", step]);
        assert!(!ok, "{step}: {said}");
        assert!(said.contains("called off"), "{step}: {said}");
        assert_eq!(server.pid(), pid, "{step}");
        holdings.check(&server);
        assert_eq!(
            ask(server.port, &format!("g new-{step}\n")),
            "1 Got Lock\n",
            "{step}"
        );
    }
    // A later upgrade succeeds.
    let holdings = Holdings::take(&server, "last");
    let (ok, said) = server.upgrade(&[]);
    assert!(ok, "{said}");
    holdings.check(&server);
}

#[test]
fn an_upgrade_asked_while_one_is_in_progress_is_refused() {
    let server = Server::start("busy", &[]);
    std::fs::write(server.dir.join("glockd.pid.upgrade"), b"").expect("marker");
    let (ok, said) = server.upgrade(&[]);
    assert!(!ok);
    assert!(said.contains("already in progress"), "{said}");
}

#[test]
fn sigusr2_upgrades_as_the_command_does() {
    let mut server = Server::start("signal", &[]);
    let old_pid = server.pid();
    let holdings = Holdings::take(&server, "sig");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid as i32),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .expect("signal");
    let status = server.child.wait().expect("the old process exits");
    assert!(status.success(), "{status:?}");
    assert_ne!(server.pid(), old_pid);
    holdings.check(&server);
}

#[test]
fn an_upgrade_while_a_departed_clients_locks_are_being_released_releases_them_all() {
    const LOCKS: usize = 200_000;
    let server = Server::start("orphans", &[]);
    let mut holder = Client::tcp(server.port);
    let mut batch = String::new();
    for k in 0..LOCKS {
        batch.push_str(&format!("g o{k}\n"));
    }
    holder
        .reader
        .get_mut()
        .write_all(batch.as_bytes())
        .expect("write");
    for _ in 0..LOCKS {
        assert_eq!(holder.line(), "1 Got Lock");
    }
    // The holder leaves; its locks are released a slice at a time, and the upgrade comes
    // meanwhile: what the old process had still to release, the new one releases.
    drop(holder);
    let (ok, said) = server.upgrade(&["-shards", "3"]);
    assert!(ok, "{said}");
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let q = ask(server.port, "q\n");
        if q.contains("\nlocks: 0\n") {
            break;
        }
        assert!(Instant::now() < until, "locks left behind: {q}");
        std::thread::sleep(Duration::from_millis(20));
    }
    for k in [0, LOCKS / 2, LOCKS - 1] {
        assert_eq!(ask(server.port, &format!("g o{k}\n")), "1 Got Lock\n");
    }
}

#[test]
fn under_systemd_the_new_process_is_announced_as_the_main_one() {
    let dir = temp_dir("upgrade", "notify-socket");
    let path = dir.join("notify");
    let systemd = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
    systemd
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut server = Server::start_with_env("notify", &[], &[("NOTIFY_SOCKET", &path)]);
    let mut said = String::new();
    let mut buf = [0u8; 512];
    let mut hear = |said: &mut String| {
        let n = systemd.recv(&mut buf).expect("a notification");
        said.push_str(&String::from_utf8_lossy(&buf[..n]));
    };
    hear(&mut said);
    assert_eq!(said, "READY=1\n");
    let (ok, out) = server.upgrade(&[]);
    assert!(ok, "{out}");
    let new_pid = server.pid();
    // The old process names its successor before it exits; the successor says it serves.
    said.clear();
    while !said.contains("READY=1") {
        hear(&mut said);
    }
    assert!(said.contains(&format!("MAINPID={new_pid}\n")), "{said:?}");
    assert!(server.child.wait().expect("old process").success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_new_process_that_hangs_is_given_up_after_the_pause_limit() {
    let server = Server::start("pause", &["-upgrade-max-pause-ms", "300"]);
    let holdings = Holdings::take(&server, "pause");
    let (ok, said) = server.upgrade(&["-upgrade-fail-at", "hang"]);
    assert!(!ok, "{said}");
    assert!(said.contains("no answer in time"), "{said}");
    holdings.check(&server);
}

#[test]
fn a_stopping_signal_during_an_upgrade_calls_it_off_and_stops_the_server() {
    let mut server = Server::start("term", &[]);
    let pid = nix::unistd::Pid::from_raw(server.pid() as i32);
    let asked = {
        let exe = server.exe.clone();
        let pidfile = server.pidfile();
        std::thread::spawn(move || {
            let _forking = forking();
            Command::new(exe)
                .arg("upgrade")
                .arg("-pidfile")
                .arg(pidfile)
                .args(["-upgrade-fail-at", "hang"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("glockd upgrade")
        })
        .join()
        .expect("spawned")
    };
    // Once the upgrade is under way (the new process, a child of the server, exists), SIGTERM.
    let until = Instant::now() + Duration::from_secs(20);
    while !has_child(pid.as_raw()) {
        assert!(Instant::now() < until, "the upgrade never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let out = asked.wait_with_output().expect("outcome");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("called off: SIGTERM came"), "{said}");
    assert!(server.child.wait().expect("exits").success());
}

#[test]
fn upgrade_signals_no_process_whose_pidfile_no_server_holds() {
    let dir = temp_dir("upgrade", "stale");
    let pidfile = dir.join("stale.pid");
    // A pid that is alive but is no server: this test's own.
    std::fs::write(&pidfile, std::process::id().to_string()).expect("pidfile");
    let out = Command::new(env!("CARGO_BIN_EXE_glockd"))
        .arg("upgrade")
        .arg("-pidfile")
        .arg(&pidfile)
        .output()
        .expect("glockd upgrade");
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no server holds"), "{said}");
    assert!(!dir.join("stale.pid.upgrade").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether process `pid` has a child now.
fn has_child(pid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|stat| {
            // `pid (comm) state ppid …`: the fields after the last ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|ppid| ppid.parse::<i32>().ok())
                == Some(pid)
        })
    })
}

#[test]
fn tls_connections_are_closed_at_an_upgrade_and_their_locks_released() {
    let (pki, certs) = common::pki::shared();
    let tls_port = free_port().to_string();
    let cert = certs.cert.to_string_lossy().into_owned();
    let key = certs.key.to_string_lossy().into_owned();
    let server = Server::start(
        "tls",
        &["-tls-port", &tls_port, "-tls-cert", &cert, "-tls-key", &key],
    );
    let tls = common::pki::client(&pki.ca, None);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let addr = format!("127.0.0.1:{tls_port}");
    let mut client = runtime
        .block_on(glockd::client::Client::connect_tls(addr.as_str(), &tls))
        .expect("TLS connects");
    assert!(runtime.block_on(client.get("over-tls")).expect("g"));
    let (ok, said) = server.upgrade(&[]);
    assert!(ok, "{said}");
    assert!(said.contains(", 1 TLS connections closed"), "{said}");
    // Closed as at shutdown, its lock released; a new TLS connection is served.
    assert!(runtime.block_on(client.command(b"i over-tls")).is_err());
    assert_eq!(ask(server.port, "g over-tls\n"), "1 Got Lock\n");
    let mut again = runtime
        .block_on(glockd::client::Client::connect_tls(addr.as_str(), &tls))
        .expect("TLS connects after the upgrade");
    assert!(runtime.block_on(again.get("after")).expect("g"));
}
