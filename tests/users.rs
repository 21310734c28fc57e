//! Users, tokens and permissions (`-users FILE`), over real sockets: `auth`, every command class
//! allowed and denied, name prefixes (spaces and bytes that are not UTF-8 included), filtered
//! listings, failed `auth`s delayed, counted and cut off, the unix uid mapping, reloads, the
//! binary's `hash-token` and its refusal of bad files, and a property test that no command
//! outside a user's permissions ever changes the table.

mod common;
mod process;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Raw, Setup, TestServer, Transport};
use glockd::{Config, Listeners, ServerHandle};

const BIN: &str = env!("CARGO_BIN_EXE_glockd");

const TRANSPORTS: [Transport; 3] = [Transport::Tcp, Transport::Unix, Transport::Ws];

/// The users file line for `token` (what `glockd hash-token` prints).
fn token_line(token: &str) -> String {
    glockd::users::token::hash_token_line(token.as_bytes()).expect("a token")
}

static FILES: AtomicU64 = AtomicU64::new(0);

/// Writes a users file into a fresh scratch directory.
fn users_file(text: &str) -> PathBuf {
    let n = FILES.fetch_add(1, Ordering::Relaxed);
    let dir = process::temp_dir("users", &n.to_string());
    let path = dir.join("users.toml");
    std::fs::write(&path, text).expect("write users file");
    path
}

/// The users most tests use: `admin` may do everything; `billing` locks, shares and lists
/// under three prefixes (one with a space, one of bytes that are not UTF-8); `only-CLASS` may
/// use one class, on every name.
fn standard_users() -> String {
    let mut text = format!(
        "[[user]]\nname = \"admin\"\n{}\nprefixes = ['*']\nclasses = [\"all\"]\n\n\
         [[user]]\nname = \"billing\"\n{}\n\
         prefixes = ['billing:*', 'my lock*', '\\xff\\xfe*']\n\
         classes = [\"lock\", \"shared\", \"inspect\"]\n",
        token_line("admin-token"),
        token_line("billing-token"),
    );
    for class in ["lock", "shared", "ratelimit", "inspect", "admin"] {
        text.push_str(&format!(
            "\n[[user]]\nname = \"only-{class}\"\n{}\nprefixes = ['*']\nclasses = [\"{class}\"]\n",
            token_line(&format!("{class}-token"))
        ));
    }
    text
}

fn server(path: &Path, transport: Transport) -> TestServer {
    let path = path.as_os_str().to_owned();
    TestServer::start_all_doors(
        Setup {
            shards: 2,
            transport,
        },
        move |c| {
            c.users = Some(path);
            c.auth_fail_delay_ms = 1;
        },
    )
}

/// A connection authenticated as `user` (whose token is `USER-token`, or `CLASS-token` for
/// `only-CLASS`).
async fn login(server: &TestServer, transport: Transport, user: &str) -> Raw {
    let mut conn = server.connect_via(transport).await;
    let token = match user.strip_prefix("only-") {
        Some(class) => format!("{class}-token"),
        None => format!("{user}-token"),
    };
    conn.check(&format!("auth {user} {token}\n"), "1 Authenticated\n")
        .await;
    conn
}

/// One command of every word, with the arguments it needs.
const EVERY_COMMAND: [&str; 22] = [
    "g k",
    "r k",
    "i k",
    "gt k",
    "t k",
    "gw 0 k",
    "sg k",
    "sr k",
    "si k",
    "sgl 1 k",
    "sgw 0 1 k",
    "rl k 1 1 1000",
    "d",
    "sd",
    "dump",
    "h",
    "who",
    "q",
    "me",
    "iam x",
    "shards",
    "framed",
];

#[tokio::test]
async fn without_auth_a_connection_may_only_auth() {
    let path = users_file(&standard_users());
    for transport in TRANSPORTS {
        let server = server(&path, transport);
        let mut conn = server.connect().await;
        for command in EVERY_COMMAND {
            conn.check(&format!("{command}\n"), "0 Auth Required\n")
                .await;
        }
        // Bad input is still answered as such, and an empty line gets nothing.
        conn.check("\nbogus\n", "0 Invalid Command\n").await;
        conn.check("auth admin\n", "0 Usage: auth USER TOKEN\n")
            .await;
        conn.check("auth admin admin-token\n", "1 Authenticated\n")
            .await;
        conn.check("g k\ni k\n", "1 Got Lock\n1 Locked\n").await;
    }
}

#[tokio::test]
async fn every_command_class_is_allowed_or_denied_as_the_file_says() {
    let path = users_file(&standard_users());
    let server = server(&path, Transport::Tcp);
    // (class, command, the start of its reply when allowed). Listings and `q` are framed, so
    // their first line says how many follow.
    let cases = [
        ("lock", "g c:lock", "1 Got Lock"),
        ("lock", "i c:never", "0 Not Locked"),
        ("lock", "gw 0 c:lock2", "1 Got Lock"),
        ("lock", "gt c:lock3", "1 "),
        ("shared", "sg c:shared", "1 Got Shared Lock"),
        ("shared", "sgl 2 c:shared2", "1 Got Shared Lock"),
        ("shared", "si c:never", "0 Not Shared Locked"),
        ("ratelimit", "rl c:rl 1 1 1000", "1 "),
        ("inspect", "d c:never", "0 lines"),
        ("inspect", "sd c:never", "0 lines"),
        ("inspect", "dump", "map["),
        ("inspect", "who c:nobody", "0 lines"),
        ("inspect", "h c:never", "0 lines"),
        ("admin", "q", ""),
    ];
    let classes = ["lock", "shared", "ratelimit", "inspect", "admin"];
    for user_class in classes {
        for (class, command, allowed) in cases {
            let mut conn = login(&server, Transport::Tcp, &format!("only-{user_class}")).await;
            // Connection housekeeping is every user's.
            conn.check("framed\n", "1 Framed\n").await;
            conn.send(format!("{command}\n")).await;
            let line = framed_reply(&mut conn).await;
            if class == user_class {
                assert!(
                    line.starts_with(allowed) && line != "0 Permission Denied\n",
                    "only-{user_class}: {command}: {line:?}"
                );
            } else {
                assert_eq!(
                    line, "0 Permission Denied\n",
                    "only-{user_class}: {command}"
                );
            }
            conn.close().await;
        }
    }
    // Housekeeping for everyone, whatever their classes.
    let mut conn = login(&server, Transport::Tcp, "only-ratelimit").await;
    conn.send("me\n").await;
    assert!(conn.line().await.starts_with("1 "));
    conn.check("iam worker\n", "1 ok\n").await;
    conn.send("shards\n").await;
    assert!(conn.line().await.starts_with("1 2 fnv1a64"));
    // A refused command changed nothing: nobody took the lock an `only-shared` user asked for.
    let mut shared = login(&server, Transport::Tcp, "only-shared").await;
    shared.check("g c:taken\n", "0 Permission Denied\n").await;
    let mut admin = login(&server, Transport::Tcp, "admin").await;
    admin.check("i c:taken\n", "0 Not Locked\n").await;
}

#[tokio::test]
async fn name_prefixes_match_raw_bytes_spaces_and_all() {
    let path = users_file(&standard_users());
    for transport in TRANSPORTS {
        let server = server(&path, transport);
        let mut conn = login(&server, transport, "billing").await;
        conn.check("g billing:a\n", "1 Got Lock\n").await;
        conn.check("g billing:\n", "1 Got Lock\n").await;
        conn.check("g billing\n", "0 Permission Denied\n").await;
        conn.check("g ops:a\n", "0 Permission Denied\n").await;
        // Whitespace is collapsed before the name is matched: `my  lock` is `my lock`.
        conn.check("g  my   lock  one \n", "1 Got Lock\n").await;
        conn.check("i my lock one\n", "1 Locked\n").await;
        conn.check("g my\n", "0 Permission Denied\n").await;
        conn.check("g mylock\n", "0 Permission Denied\n").await;
        // Bytes that are not UTF-8.
        for (line, reply) in [
            (&b"g \xff\xfe\x00z\n"[..], "1 Got Lock\n"),
            (b"g \xff\x00\n", "0 Permission Denied\n"),
            (b"g \xfe\xff\n", "0 Permission Denied\n"),
        ] {
            conn.send(line).await;
            conn.expect(reply).await;
        }
        // Every form that names a lock is checked: waits, limits, listings of one name.
        conn.check("gw 0 ops:a\n", "0 Permission Denied\n").await;
        conn.check("sgw 0 1 ops:a\n", "0 Permission Denied\n").await;
        conn.check("sgl 1 ops:a\n", "0 Permission Denied\n").await;
        conn.check("sgl 1 billing:s\n", "1 Got Shared Lock\n").await;
        conn.check("d ops:a\n", "0 Permission Denied\n").await;
        conn.check("sd ops:a\n", "0 Permission Denied\n").await;
        conn.check("h ops:a\n", "0 Permission Denied\n").await;
        conn.check("who ops:a\n", "0 Permission Denied\n").await;
        conn.check("framed\nd billing:a\n", "1 Framed\n1 lines\n")
            .await;
        conn.line().await;
        // Outside its classes, even on its own names.
        conn.check("rl billing:r 1 1 1000\n", "0 Permission Denied\n")
            .await;
        conn.check("q\n", "0 Permission Denied\n").await;
    }
}

#[tokio::test]
async fn listings_show_only_the_names_a_user_may_see() {
    let path = users_file(&standard_users());
    let server = server(&path, Transport::Tcp);
    let mut holder = login(&server, Transport::Tcp, "admin").await;
    holder
        .check(
            "iam billing:holder\ng billing:x\ng ops:y\nsg billing:s\nsg ops:t\n",
            "1 ok\n1 Got Lock\n1 Got Lock\n1 Got Shared Lock\n1 Got Shared Lock\n",
        )
        .await;
    let mut other = login(&server, Transport::Tcp, "admin").await;
    other.check("iam ops:other\n", "1 ok\n").await;
    let id = holder.id();
    let mut billing = login(&server, Transport::Tcp, "billing").await;
    billing.check("framed\n", "1 Framed\n").await;
    billing
        .check("d\n", "1 lines\nbilling:x: billing:holder\n")
        .await;
    billing
        .check("sd\n", "1 lines\nbilling:s: billing:holder\n")
        .await;
    billing
        .check("dump\n", &format!("map[billing:x:{id}]\n"))
        .await;
    billing
        .check("dump shared\n", &format!("map[billing:s:[{id}]]\n"))
        .await;
    billing
        .check("who\n", &format!("1 lines\n{id}: billing:holder\n"))
        .await;
    billing.check("h\n", "2 lines\n").await;
    for _ in 0..2 {
        let row = billing.line().await;
        assert!(row.starts_with("billing:"), "{row:?}");
    }
    // The same listings in full for a user who may see everything.
    let mut admin = login(&server, Transport::Tcp, "admin").await;
    admin.check("framed\nd\n", "1 Framed\n2 lines\n").await;
    admin.line().await;
    admin.line().await;
    admin.check("who\n", "2 lines\n").await;
}

#[tokio::test]
async fn failed_auths_are_answered_in_order_and_too_many_close_the_connection() {
    let path = users_file(&standard_users());
    for transport in TRANSPORTS {
        let path = path.as_os_str().to_owned();
        let server = TestServer::start_all_doors(
            Setup {
                shards: 2,
                transport,
            },
            move |c| {
                c.users = Some(path);
                c.auth_fail_delay_ms = 1;
                c.auth_max_failures = 3;
            },
        );
        let mut conn = server.connect().await;
        // Pipelined behind a failed auth, commands are answered in order, as unauthenticated.
        conn.check(
            "auth billing wrong\nauth nobody billing-token\ng billing:a\n",
            "0 Auth Failed\n0 Auth Failed\n0 Auth Required\n",
        )
        .await;
        // A success starts the count again; a failure then leaves the user in place.
        conn.check("auth billing billing-token\n", "1 Authenticated\n")
            .await;
        conn.check(
            "g billing:a\nauth billing billing-toke\nauth admin billing-token\ni billing:a\n",
            "1 Got Lock\n0 Auth Failed\n0 Auth Failed\n1 Locked\n",
        )
        .await;
        // The third failure in a row: one line, then the close (nothing after it runs).
        conn.check(
            "auth billing billing-tokenx\ng billing:b\n",
            "0 Too Many Auth Failures\n",
        )
        .await;
        conn.expect_closed_or_reset().await;
        // Its locks went with it; nothing it pipelined behind the close ran.
        let mut admin = login(&server, transport, "admin").await;
        let deadline = std::time::Instant::now() + common::REPLY_TIMEOUT;
        loop {
            admin.send("i billing:a\n").await;
            if admin.line().await == "0 Not Locked\n" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "lock never released");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        admin.check("i billing:b\n", "0 Not Locked\n").await;
    }
}

#[tokio::test]
async fn auth_on_a_server_without_users_says_so_and_nothing_else_changes() {
    let server = TestServer::start(2);
    let mut conn = server.connect().await;
    conn.check(
        "auth admin admin-token\ng k\ni k\n",
        "0 Auth Not Configured (the server has no users file)\n1 Got Lock\n1 Locked\n",
    )
    .await;
    let mut client = server.client().await;
    let refused = client.auth("admin", "admin-token").await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(client.get("k2").await.unwrap());
}

#[tokio::test]
async fn the_client_authenticates() {
    let path = users_file(&standard_users());
    let server = server(&path, Transport::Tcp);
    let mut client = server.client().await;
    let refused = client.auth("billing", "wrong").await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
    // A token with whitespace would be another command on the wire: refused before sending.
    let bad = client.auth("billing", "a\ng x").await.unwrap_err();
    assert_eq!(bad.kind(), std::io::ErrorKind::InvalidInput);
    client.auth("billing", "billing-token").await.unwrap();
    assert!(client.get("billing:c").await.unwrap());
}

#[tokio::test]
async fn a_unix_peer_is_mapped_to_its_user_by_uid() {
    let dir = process::temp_dir("users", "uid");
    // A file this process creates belongs to the uid its sockets' peers report.
    let uid = std::fs::metadata(&dir).expect("metadata").uid();
    let path = users_file(&format!(
        "[[user]]\nname = \"local\"\nuid = {uid}\nprefixes = ['local:*']\nclasses = [\"lock\"]\n\n\
         [[user]]\nname = \"admin\"\n{}\nprefixes = ['*']\nclasses = [\"all\"]\n",
        token_line("admin-token")
    ));
    let server = server(&path, Transport::Unix);
    let mut local = server.connect_via(Transport::Unix).await;
    local
        .check(
            "g local:a\ng other\nd\n",
            "1 Got Lock\n0 Permission Denied\n0 Permission Denied\n",
        )
        .await;
    // The uid says nothing over TCP.
    let mut tcp = server.connect_via(Transport::Tcp).await;
    tcp.check("g local:b\n", "0 Auth Required\n").await;
    // `auth` moves a mapped connection to another user.
    local
        .check(
            "auth admin admin-token\ng other\n",
            "1 Authenticated\n1 Got Lock\n",
        )
        .await;
}

/// A server of this process with every door and the metrics endpoint; its handle reloads.
fn start_in_process(path: &Path, tweak: impl FnOnce(&mut Config)) -> ServerHandle {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut config = Config {
        shards: Some(2),
        pin: false,
        users: Some(path.as_os_str().to_owned()),
        auth_fail_delay_ms: 1,
        ..Config::default()
    };
    tweak(&mut config);
    glockd::start_with_listeners(
        config,
        Listeners {
            tcp: Some(bind()),
            metrics: Some(bind()),
            ..Listeners::default()
        },
    )
    .expect("server starts")
}

fn scrape(server: &ServerHandle) -> String {
    let addr = server.metrics_addr().expect("metrics on");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(common::REPLY_TIMEOUT))
        .expect("timeout");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the scrape"))
}

#[tokio::test]
async fn auth_results_denials_and_refusals_are_counted_by_door() {
    let path = users_file(&standard_users());
    let server = start_in_process(&path, |_| {});
    let addr = server.tcp_addr().expect("tcp");
    let mut conn = Raw::connect(addr).await;
    conn.check(
        "g a\nauth billing nope\nauth nobody nope\nauth billing billing-token\n",
        "0 Auth Required\n0 Auth Failed\n0 Auth Failed\n1 Authenticated\n",
    )
    .await;
    conn.check(
        "g ops:a\nrl billing:r 1 1 1000\nq\n",
        "0 Permission Denied\n0 Permission Denied\n0 Permission Denied\n",
    )
    .await;
    let text = scrape(&server);
    let door = "door=\"tcp\"";
    assert_eq!(
        metric(
            &text,
            &format!("glockd_auth_total{{{door},result=\"failure\"}}")
        ),
        2
    );
    assert_eq!(
        metric(
            &text,
            &format!("glockd_auth_total{{{door},result=\"success\"}}")
        ),
        1
    );
    for (class, count) in [("lock", 1), ("ratelimit", 1), ("admin", 1), ("shared", 0)] {
        assert_eq!(
            metric(
                &text,
                &format!("glockd_permission_denied_total{{{door},class=\"{class}\"}}")
            ),
            count,
            "{class}"
        );
    }
    assert_eq!(
        metric(&text, &format!("glockd_auth_required_total{{{door}}}")),
        1
    );
    assert_eq!(
        metric(&text, "glockd_auth_total{door=\"ws\",result=\"failure\"}"),
        0
    );
}

#[tokio::test]
async fn a_reload_applies_to_connections_already_authenticated_and_a_bad_file_is_refused() {
    let path = users_file(&standard_users());
    let server = start_in_process(&path, |_| {});
    let addr = server.tcp_addr().expect("tcp");
    let mut conn = Raw::connect(addr).await;
    conn.check(
        "auth billing billing-token\ng billing:a\n",
        "1 Authenticated\n1 Got Lock\n",
    )
    .await;
    // billing loses the lock class.
    let narrowed = standard_users().replace(
        "classes = [\"lock\", \"shared\", \"inspect\"]",
        "classes = [\"shared\"]",
    );
    std::fs::write(&path, narrowed).expect("rewrite");
    assert_eq!(server.reload_users(), Some(Ok(7)));
    conn.check(
        "g billing:b\nsg billing:s\n",
        "0 Permission Denied\n1 Got Shared Lock\n",
    )
    .await;
    // A bad file is refused, and the users in force stay.
    std::fs::write(&path, "[[user]]\nname = \"x\"\n").expect("rewrite");
    let refused = server.reload_users().expect("a users file");
    assert!(refused.unwrap_err().contains("needs token_sha256"));
    conn.check("sg billing:t\n", "1 Got Shared Lock\n").await;
    // billing's token changed (a leaked one revoked): sessions opened with the old one end,
    // and the new one works.
    let mut renewed = Raw::connect(addr).await;
    renewed
        .check("auth billing billing-token\n", "1 Authenticated\n")
        .await;
    std::fs::write(
        &path,
        standard_users().replace(&token_line("billing-token"), &token_line("billing-new")),
    )
    .expect("rewrite");
    assert_eq!(server.reload_users(), Some(Ok(7)));
    renewed.check("sg billing:v\n", "0 Auth Required\n").await;
    renewed
        .check(
            "auth billing billing-new\nsg billing:v\n",
            "1 Authenticated\n1 Got Shared Lock\n",
        )
        .await;
    // billing removed: its connection is no one now.
    std::fs::write(
        &path,
        format!("[[user]]\nname = \"admin\"\n{}\n", token_line("t")),
    )
    .expect("rewrite");
    assert_eq!(server.reload_users(), Some(Ok(1)));
    conn.check("sg billing:u\n", "0 Auth Required\n").await;
    server.shutdown();
}

/// Runs the binary with `args` and `stdin`; its exit code, stdout and stderr (bounded: a
/// server that starts is killed).
fn run(args: &[&str], stdin: &[u8]) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn glockd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("glockd {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    (status.code(), out, err)
}

#[test]
fn bad_users_files_stop_the_server_at_start_in_one_line() {
    let missing = process::temp_dir("users", "missing").join("none.toml");
    let cases: Vec<(PathBuf, &str)> = vec![
        (missing, "No such file"),
        (users_file("[[user]\nname = 1\n"), "line 1"),
        (
            users_file("[[user]]\nname = \"a\"\nuid = 1\nclasses = [\"root\"]\n"),
            "unknown class \"root\"",
        ),
        (
            users_file("[[user]]\nname = \"a\"\nuid = 1\nprefixes = ['a*b']\n"),
            "prefix \"a*b\"",
        ),
        (users_file("[[user]]\nname = \"a\"\n"), "needs token_sha256"),
    ];
    for (path, reason) in cases {
        let path = path.to_str().expect("utf-8 path");
        let (code, _, stderr) = run(
            &[
                "-users",
                path,
                "-bind",
                "127.0.0.1",
                "-port",
                "0",
                "-ws",
                "0",
            ],
            b"",
        );
        assert_eq!(code, Some(2), "{path}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("glockd: ") && stderr.contains(reason),
            "{stderr}"
        );
    }
    for (flag, value) in [("auth-fail-delay-ms", "10001"), ("auth-max-failures", "0")] {
        let (code, _, stderr) = run(&[&format!("-{flag}={value}")], b"");
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(&format!("--{flag}")), "{stderr}");
    }
}

#[test]
fn hash_token_reads_stdin_and_its_line_opens_the_door() {
    let (code, line, stderr) = run(&["hash-token"], b"pass-phrase-1\n");
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(line.lines().count(), 1);
    assert!(line.starts_with("token_sha256 = \""), "{line}");
    // A short token still works, with a warning that it can be guessed; a long one gets none.
    assert!(stderr.contains("can be guessed"), "{stderr}");
    let (code, _, stderr) = run(&["hash-token"], b"0123456789abcdef0123456789abcdef\n");
    assert_eq!((code, stderr.as_str()), (Some(0), ""));
    // Refused: nothing to hash, a token `auth` could not send, an argument (tokens never go
    // on the command line).
    for (args, input) in [
        (&["hash-token"][..], &b""[..]),
        (&["hash-token"][..], &b"two words\n"[..]),
        (&["hash-token", "pass-phrase-1"][..], &b""[..]),
    ] {
        let (code, out, stderr) = run(args, input);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(out.is_empty() && stderr.starts_with("glockd: "), "{stderr}");
    }
    // Round trip: the printed line in a users file, then `auth` with the token.
    let path = users_file(&format!(
        "[[user]]\nname = \"ops\"\n{line}prefixes = ['*']\nclasses = [\"lock\"]\n"
    ));
    let server = start_in_process(&path, |_| {});
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut conn = Raw::connect(server.tcp_addr().expect("tcp")).await;
        conn.check(
            "auth ops pass-phrase-1\ng x\n",
            "1 Authenticated\n1 Got Lock\n",
        )
        .await;
    });
}

#[test]
fn sighup_reloads_the_users_file_and_keeps_the_old_one_when_the_new_is_bad() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::io::BufRead;
    let path = users_file(&standard_users());
    let port = process::free_port();
    let mut child = Command::new(BIN)
        .args([
            "-users",
            path.to_str().expect("utf-8 path"),
            "-bind",
            "127.0.0.1",
            "-port",
            &port.to_string(),
            "-ws",
            "0",
            "-metrics",
            "off",
            "-pin=false",
            "-shards",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn glockd");
    // Every log line, as it comes.
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str| loop {
        let line = lines
            .recv_timeout(common::REPLY_TIMEOUT)
            .unwrap_or_else(|_| panic!("no log line with {what}"));
        if line.contains(what) {
            return line;
        }
    };
    wait_for("listening on tcp");
    let pid = Pid::from_raw(child.id() as i32);
    let ask = |command: &str| process::ask(port, command);
    let newcomer = "auth newcomer new-token\n";
    let admin = "auth admin admin-token\n";
    assert_eq!(ask(newcomer), "0 Auth Failed\n");
    // A bad file: refused with a log line, and the users in force stay.
    std::fs::write(&path, "not toml [").expect("rewrite");
    kill(pid, Signal::SIGHUP).expect("signal");
    let refused = wait_for("users_reload_failed");
    assert!(refused.contains("users file"), "{refused}");
    assert_eq!(ask(admin), "1 Authenticated\n");
    // A good one: its users from now on.
    std::fs::write(
        &path,
        format!(
            "[[user]]\nname = \"newcomer\"\n{}\nprefixes = ['*']\nclasses = [\"lock\"]\n",
            token_line("new-token")
        ),
    )
    .expect("rewrite");
    kill(pid, Signal::SIGHUP).expect("signal");
    wait_for("users_reloaded");
    assert_eq!(ask(newcomer), "1 Authenticated\n");
    assert_eq!(ask(admin), "0 Auth Failed\n");
    kill(pid, Signal::SIGTERM).expect("signal");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}

/// The command templates of the property test, with the class each belongs to; `N` is a name.
const TEMPLATES: [(&str, &str); 21] = [
    ("g N", "lock"),
    ("r N", "lock"),
    ("i N", "lock"),
    ("gt N", "lock"),
    ("t N", "lock"),
    ("gw 0 N", "lock"),
    ("sg N", "shared"),
    ("sr N", "shared"),
    ("si N", "shared"),
    ("sgl 2 N", "shared"),
    ("sgw 0 2 N", "shared"),
    ("rl N 1 1 60000", "ratelimit"),
    ("d N", "inspect"),
    ("sd N", "inspect"),
    ("h N", "inspect"),
    ("d", "inspect"),
    ("sd", "inspect"),
    ("dump", "inspect"),
    ("dump shared", "inspect"),
    ("who", "inspect"),
    ("q", "admin"),
];

/// Name endings of the property test (each case puts its own `cN:` before them).
const ENDINGS: [&[u8]; 6] = [b"a", b"ab", b"a b", b"b", b"\xff", b"\xff\x01"];

/// Patterns of the property test: (as written in the file after the case's `cN:`, or alone
/// for `*`; the bytes it stands for; whether it is a prefix).
const PATTERNS: [(&str, &[u8], bool); 7] = [
    ("*", b"", true),
    ("a*", b"a", true),
    ("ab", b"ab", false),
    ("a b", b"a b", false),
    ("b*", b"b", true),
    (r"\xff*", b"\xff", true),
    (r"\xff\x01", b"\xff\x01", false),
];

/// Reads one reply of a framed connection: one line, or a count line and that many more.
async fn framed_reply(conn: &mut Raw) -> String {
    let mut reply = conn.line().await;
    if let Some(count) = reply.strip_suffix(" lines\n") {
        let count: usize = count.parse().expect("a count");
        for _ in 0..count {
            reply.push_str(&conn.line().await);
        }
    }
    reply
}

/// What the privileged connection sees of the case's names: `i` and `si` of each.
async fn table_of(admin: &mut Raw, case: u64) -> String {
    let mut ask = Vec::new();
    for ending in ENDINGS {
        for word in ["i", "si", "t"] {
            ask.extend_from_slice(format!("{word} c{case}:").as_bytes());
            ask.extend_from_slice(ending);
            ask.push(b'\n');
        }
    }
    admin.send(&ask).await;
    let mut seen = String::new();
    for _ in 0..ENDINGS.len() * 3 {
        seen.push_str(&admin.line().await);
    }
    seen
}

#[test]
fn no_command_outside_a_users_permissions_changes_the_table() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config as Cases, TestCaseError, TestRunner};
    let path = users_file(&standard_users());
    let server = start_in_process(&path, |_| {});
    let addr = server.tcp_addr().expect("tcp");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cases = AtomicU64::new(0);
    let strategy = (
        0u8..32,
        1u8..128,
        proptest::collection::vec((0..TEMPLATES.len(), 0..ENDINGS.len()), 1..24),
    );
    let mut runner = TestRunner::new(Cases::with_cases(32));
    runner
        .run(&strategy, |(class_bits, pattern_bits, commands)| {
            let case = cases.fetch_add(1, Ordering::Relaxed);
            let classes: Vec<&str> = ["lock", "shared", "ratelimit", "inspect", "admin"]
                .into_iter()
                .enumerate()
                .filter(|(at, _)| class_bits & (1 << at) != 0)
                .map(|(_, c)| c)
                .collect();
            let patterns: Vec<_> = PATTERNS
                .iter()
                .enumerate()
                .filter(|(at, _)| pattern_bits & (1 << at) != 0)
                .map(|(_, p)| *p)
                .collect();
            let written: Vec<String> = patterns
                .iter()
                .map(|(text, _, _)| match *text {
                    "*" => "'*'".to_owned(),
                    text => format!("'c{case}:{text}'"),
                })
                .collect();
            let file = format!(
                "{}\n[[user]]\nname = \"u\"\n{}\nprefixes = [{}]\nclasses = [{}]\n",
                standard_users(),
                token_line("u-token"),
                written.join(", "),
                classes
                    .iter()
                    .map(|c| format!("\"{c}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            std::fs::write(&path, file).expect("rewrite");
            server
                .reload_users()
                .expect("a users file")
                .map_err(TestCaseError::fail)?;
            let may_name = |name: &[u8]| {
                patterns.iter().any(|(text, bytes, prefix)| {
                    if *text == "*" {
                        return true;
                    }
                    let mut full = format!("c{case}:").into_bytes();
                    full.extend_from_slice(bytes);
                    if *prefix {
                        name.starts_with(&full)
                    } else {
                        name == &full[..]
                    }
                })
            };
            rt.block_on(async {
                let mut admin = Raw::connect(addr).await;
                let mut user = Raw::connect(addr).await;
                admin
                    .check(
                        &format!("auth admin admin-token\ng c{case}:a\nsg c{case}:ab\n"),
                        "1 Authenticated\n1 Got Lock\n1 Got Shared Lock\n",
                    )
                    .await;
                user.check("auth u u-token\nframed\n", "1 Authenticated\n1 Framed\n")
                    .await;
                let mut before = table_of(&mut admin, case).await;
                for (template, ending) in commands {
                    let (template, class) = TEMPLATES[template];
                    let mut name = format!("c{case}:").into_bytes();
                    name.extend_from_slice(ENDINGS[ending]);
                    let mut line = Vec::new();
                    let mut named = false;
                    for (at, part) in template.split('N').enumerate() {
                        if at > 0 {
                            line.extend_from_slice(&name);
                            named = true;
                        }
                        line.extend_from_slice(part.as_bytes());
                    }
                    line.push(b'\n');
                    let allowed = classes.contains(&class) && (!named || may_name(&name));
                    user.send(&line).await;
                    let reply = framed_reply(&mut user).await;
                    let after = table_of(&mut admin, case).await;
                    let shown = String::from_utf8_lossy(&line).into_owned();
                    if allowed {
                        prop_assert_ne!(&reply, "0 Permission Denied\n", "{}", shown);
                    } else {
                        prop_assert_eq!(&reply, "0 Permission Denied\n", "{}", shown);
                        prop_assert_eq!(&after, &before, "{} changed the table", shown);
                    }
                    before = after;
                }
                user.close().await;
                admin.close().await;
                Ok(())
            })
        })
        .expect("no refused command changes anything");
    server.shutdown();
}
