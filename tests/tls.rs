//! The TLS doors from the outside: what a client that does not speak TLS gets, client
//! certificates (accepted ones name their connection; missing, expired and foreign ones are
//! refused), certificate reloads with live connections, slow and capped handshakes, and real
//! outside clients (`openssl s_client`, Python's `ssl`). The protocol itself over TLS and
//! secure websockets runs in the suites that use `for_each_transport!`.

mod common;
mod process;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pki::{self, CertFiles, ClientCert, Pki};
use glockd::client::Client;
use glockd::tls::{HandshakeResult, TlsDoor};
use glockd::{Config, Listeners, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A server with a TLS line door (and a plain TCP door for asking `q`), its certificate from
/// `pki`, client certificates required when `client_ca`.
fn start(
    pki: &Pki,
    server: &CertFiles,
    client_ca: bool,
    tweak: impl FnOnce(&mut Config),
) -> ServerHandle {
    let mut config = Config {
        shards: Some(2),
        pin: false,
        tls_cert: Some(server.cert.clone()),
        tls_key: Some(server.key.clone()),
        tls_client_ca: client_ca.then(|| pki.ca.clone()),
        ..Config::default()
    };
    tweak(&mut config);
    let bind = || Some(TcpListener::bind("127.0.0.1:0").expect("bind"));
    let listeners = Listeners {
        tcp: bind(),
        tls: bind(),
        tls_ws: bind(),
        ..Listeners::default()
    };
    glockd::start_with_listeners(config, listeners).expect("server starts")
}

fn tls_addr(server: &ServerHandle) -> SocketAddr {
    server.tls_addr().expect("tls door")
}

fn count(server: &ServerHandle, door: TlsDoor, result: HandshakeResult) -> u64 {
    server.tls().expect("tls").handshakes(door, result)
}

/// Waits (bounded) until `done` holds.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + common::REPLY_TIMEOUT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads until the server closes the connection (FIN or reset); fails if it stays open.
async fn expect_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(common::REPLY_TIMEOUT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open"),
        }
    }
}

/// The name the server's certificate (as this client saw it) carries.
fn server_cert_name(client: &Client<glockd::client::TlsStream>) -> String {
    let chain = client
        .get_ref()
        .get_ref()
        .1
        .peer_certificates()
        .expect("server chain");
    glockd::tls::identity::subject(&chain[0]).expect("a subject")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_text_client_on_the_tls_port_is_closed_not_hung() {
    let (pki, cert) = pki::shared();
    let server = start(pki, cert, false, |_| {});
    let mut plain = TcpStream::connect(tls_addr(&server))
        .await
        .expect("connect");
    plain.write_all(b"g a\n").await.expect("send");
    let got = expect_closed(&mut plain).await;
    // At most a TLS alert record (content type 21), never a protocol reply.
    assert!(got.is_empty() || got[0] == 21, "{got:?}");
    wait_until("the failure counted", || {
        count(&server, TlsDoor::Line, HandshakeResult::Failed) == 1
    })
    .await;
    // Nothing was run, and the door still serves TLS clients.
    let mut client = Client::connect_tls(tls_addr(&server), &pki::client(&pki.ca, None))
        .await
        .expect("tls client");
    assert!(client.get("a").await.expect("g"));
    assert_eq!(server.stats().commands.iter().sum::<u64>(), 1);
    assert_eq!(count(&server, TlsDoor::Line, HandshakeResult::Ok), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_server_gets_nothing() {
    let (pki, cert) = pki::shared();
    let server = start(pki, cert, false, |_| {});
    let other = Pki::new("stranger");
    let refused = Client::connect_tls(tls_addr(&server), &pki::client(&other.ca, None)).await;
    assert!(refused.is_err());
    wait_until("the failure counted", || {
        count(&server, TlsDoor::Line, HandshakeResult::Failed) == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_its_connection_and_iam_cannot_change_it() {
    let pki = Pki::new("names");
    let server = start(&pki, &pki.server("server"), true, |_| {});
    let alice = pki.client_named("alice");
    let mut a = Client::connect_tls(tls_addr(&server), &pki::client(&pki.ca, Some(&alice)))
        .await
        .expect("alice connects");
    let (id, name) = a.me().await.expect("me");
    assert!(id.starts_with("127.0.0.1:"), "{id}");
    assert_eq!(name, b"cert:alice");
    assert!(a.get("report").await.expect("g"));
    assert_eq!(
        a.command(b"iam mallory").await.expect("iam"),
        b"0 Name Set By Certificate"
    );
    assert_eq!(a.me().await.expect("me").1, b"cert:alice");
    // Every listing shows the certificate's name; `dump` keeps the raw id.
    let mut plain = Client::connect(server.tcp_addr().expect("tcp"))
        .await
        .expect("plain");
    assert_eq!(
        plain.listing(b"d").await.expect("d"),
        [b"report: cert:alice".to_vec()]
    );
    assert_eq!(
        plain.listing(b"who").await.expect("who"),
        [format!("{id}: cert:alice").into_bytes()]
    );
    assert_eq!(
        plain.command(b"dump").await.expect("dump"),
        format!("map[report:{id}]").into_bytes()
    );
    // A plain connection may still name itself, but not as a certificate's name, nor with
    // bytes that could make its name read as another's.
    assert!(plain.iam("bob").await.expect("iam"));
    assert_eq!(
        plain.command(b"iam cert:alice").await.expect("iam"),
        b"0 Name Looks Like An Id"
    );
    assert_eq!(
        plain.command(b"iam alice\x1b[0m").await.expect("iam"),
        b"0 Name Not Printable"
    );
    for forged in [
        &b"iam CERT:alice"[..],
        "iam \u{200b}cert:alice".as_bytes(),
        "iam \u{202e}ecila:trec".as_bytes(),
        "iam 127.0.0.1:1\u{85}".as_bytes(),
        b"iam alice\x9b",
    ] {
        let reply = plain.command(forged).await.expect("iam");
        assert!(
            reply == b"0 Name Not Printable" || reply == b"0 Name Looks Like An Id",
            "{forged:?}: {reply:?}"
        );
    }
    // Names in other scripts are names.
    assert!(plain.iam("Zoë 工作").await.expect("iam"));

    // Without a common name, the first subject alternative name is the identity.
    let svc = pki.client(ClientCert {
        dns_name: Some("svc.example"),
        ..ClientCert::default()
    });
    let mut s = Client::connect_tls(tls_addr(&server), &pki::client(&pki.ca, Some(&svc)))
        .await
        .expect("svc connects");
    assert_eq!(s.me().await.expect("me").1, b"cert:svc.example");
    // A name with a newline cannot break a listing row.
    let odd = pki.client_named("line\nbreak");
    let mut o = Client::connect_tls(tls_addr(&server), &pki::client(&pki.ca, Some(&odd)))
        .await
        .expect("odd connects");
    assert_eq!(o.me().await.expect("me").1, b"cert:line?break");
    // A subject in the form of a connection id is marked as a certificate's like any other,
    // so it cannot pass for another connection's id, and the connection cannot rename itself.
    let fake = pki.client_named("127.0.0.1:1");
    let mut f = Client::connect_tls(tls_addr(&server), &pki::client(&pki.ca, Some(&fake)))
        .await
        .expect("fake connects");
    assert_eq!(f.me().await.expect("me").1, b"cert:127.0.0.1:1");
    assert_eq!(
        f.command(b"iam x").await.expect("iam"),
        b"0 Name Set By Certificate"
    );
}

/// Connects with `cert` to a server that requires client certificates, and says whether the
/// server served it: with TLS 1.3 the client's handshake ends before the server has checked
/// its certificate, so the refusal shows on the first command.
async fn served(server: &ServerHandle, ca: &Path, cert: Option<&CertFiles>) -> bool {
    let Ok(mut client) = Client::connect_tls(tls_addr(server), &pki::client(ca, cert)).await else {
        return false;
    };
    client.command(b"i x").await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_expired_and_foreign_client_certificates_are_refused() {
    let pki = Pki::new("refusals");
    let server = start(&pki, &pki.server("server"), true, |_| {});
    assert!(served(&server, &pki.ca, Some(&pki.client_named("ok"))).await);
    assert!(!served(&server, &pki.ca, None).await, "no certificate");
    let expired = pki.client(ClientCert {
        common_name: Some("old"),
        expired: true,
        ..ClientCert::default()
    });
    assert!(!served(&server, &pki.ca, Some(&expired)).await, "expired");
    let other = Pki::new("foreign");
    let foreign = other.client_named("alice");
    assert!(
        !served(&server, &pki.ca, Some(&foreign)).await,
        "another CA"
    );
    wait_until("three failures", || {
        count(&server, TlsDoor::Line, HandshakeResult::Failed) == 3
    })
    .await;
    assert_eq!(count(&server, TlsDoor::Line, HandshakeResult::Ok), 1);
    // None of them ever ran a command.
    assert_eq!(server.stats().commands.iter().sum::<u64>(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_new_handshakes_the_new_certificate_and_keeps_live_connections() {
    let pki = Pki::new("reload");
    let first = pki.server("first");
    // The server reads the files at the paths it was given: a reload is new files there.
    let cert = CertFiles {
        cert: pki.dir.join("live.pem"),
        key: pki.dir.join("live.key"),
    };
    std::fs::copy(&first.cert, &cert.cert).expect("copy");
    std::fs::copy(&first.key, &cert.key).expect("copy");
    let server = start(&pki, &cert, false, |_| {});
    let tls = pki::client(&pki.ca, None);
    let mut live = Client::connect_tls(tls_addr(&server), &tls)
        .await
        .expect("connect");
    assert_eq!(server_cert_name(&live), "first");
    assert!(live.get("held").await.expect("g"));

    let second = pki.server("second");
    std::fs::copy(&second.cert, &cert.cert).expect("copy");
    std::fs::copy(&second.key, &cert.key).expect("copy");
    assert_eq!(server.reload_tls(), Some(Ok(())));
    let fresh = Client::connect_tls(tls_addr(&server), &tls)
        .await
        .expect("connect");
    assert_eq!(server_cert_name(&fresh), "second");
    // The live connection kept its session and its lock.
    assert!(live.inspect("held").await.expect("i"));
    let (id, _) = live.me().await.expect("me");
    assert!(id.starts_with("127.0.0.1:"), "{id}");

    // A certificate whose key does not match, and a file that is not PEM, are refused; the
    // second certificate stays in use.
    let third = pki.server("third");
    std::fs::copy(&third.cert, &cert.cert).expect("copy");
    let refused = server
        .reload_tls()
        .expect("tls on")
        .expect_err("mismatched key");
    assert!(refused.contains("-tls-cert"), "{refused}");
    std::fs::write(&cert.key, "not a key").expect("write");
    assert!(server.reload_tls().expect("tls on").is_err());
    let after = Client::connect_tls(tls_addr(&server), &tls)
        .await
        .expect("connect");
    assert_eq!(server_cert_name(&after), "second");
    let tls_state = server.tls().expect("tls");
    assert_eq!((tls_state.reloads(true), tls_state.reloads(false)), (1, 2));
    assert!(live.inspect("held").await.expect("i"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handshakes_are_cut_off_while_other_clients_are_served() {
    let (pki, cert) = pki::shared();
    let server = start(pki, cert, false, |c| c.tls_handshake_timeout = 1);
    // Clients that connect and never say hello, or stop half-way through a record.
    let mut silent = Vec::new();
    for at in 0..20 {
        let mut stream = TcpStream::connect(tls_addr(&server))
            .await
            .expect("connect");
        if at % 2 == 1 {
            // The first bytes of a handshake record, then nothing.
            stream
                .write_all(&[22, 3, 1, 0, 200, 1])
                .await
                .expect("send");
        }
        silent.push(stream);
    }
    wait_until("every slow handshake started", || {
        server.tls().expect("tls").in_progress() == 20
    })
    .await;
    // Meanwhile a real client is served, over TLS and plain TCP.
    let mut client = Client::connect_tls(tls_addr(&server), &pki::client(&pki.ca, None))
        .await
        .expect("served during the flood");
    assert!(client.get("busy").await.expect("g"));
    let mut plain = Client::connect(server.tcp_addr().expect("tcp"))
        .await
        .expect("plain");
    assert!(plain.inspect("busy").await.expect("i"));
    for stream in &mut silent {
        expect_closed(stream).await;
    }
    wait_until("every one counted", || {
        count(&server, TlsDoor::Line, HandshakeResult::Timeout) == 20
    })
    .await;
    assert_eq!(server.tls().expect("tls").in_progress(), 0);
    assert_eq!(server.stats().connections, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_handshake_cap_a_tls_connection_is_closed_at_once() {
    let (pki, cert) = pki::shared();
    let server = start(pki, cert, false, |c| {
        c.max_tls_handshakes = 3;
        c.tls_handshake_timeout = 300;
    });
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(
            TcpStream::connect(tls_addr(&server))
                .await
                .expect("connect"),
        );
    }
    wait_until("three in progress", || {
        server.tls().expect("tls").in_progress() == 3
    })
    .await;
    // The fourth, on either TLS door, is closed without a handshake.
    let mut over = TcpStream::connect(tls_addr(&server))
        .await
        .expect("connect");
    assert!(expect_closed(&mut over).await.is_empty());
    let mut over_wss = TcpStream::connect(server.tls_ws_addr().expect("wss"))
        .await
        .expect("connect");
    assert!(expect_closed(&mut over_wss).await.is_empty());
    assert_eq!(count(&server, TlsDoor::Line, HandshakeResult::Busy), 1);
    assert_eq!(count(&server, TlsDoor::Ws, HandshakeResult::Busy), 1);
    // Plain clients are not held up by the cap.
    let mut plain = Client::connect(server.tcp_addr().expect("tcp"))
        .await
        .expect("plain");
    assert!(plain.get("x").await.expect("g"));
    // Once the stalled ones go, TLS clients are served again.
    drop(stalled);
    wait_until("the places given back", || {
        server.tls().expect("tls").in_progress() == 0
    })
    .await;
    let mut client = Client::connect_tls(tls_addr(&server), &pki::client(&pki.ca, None))
        .await
        .expect("served");
    assert!(client.inspect("x").await.expect("i"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_websockets_carry_the_certificate_name_too() {
    let pki = Pki::new("wss");
    let server = start(&pki, &pki.server("server"), true, |_| {});
    let carol = pki.client_named("carol");
    let addr = server.tls_ws_addr().expect("wss");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let tls = pki::client(&pki.ca, Some(&carol))
        .connect(tcp)
        .await
        .expect("tls");
    let (ws, _) = tokio_tungstenite::client_async(
        format!("wss://localhost:{}/", addr.port()),
        tokio_util::either::Either::Right(Box::new(tls)),
    )
    .await
    .expect("websocket handshake");
    let mut ws = Client::new(common::transport::WsBytes::new(ws));
    assert_eq!(ws.me().await.expect("me").1, b"cert:carol");
    assert_eq!(
        ws.command(b"iam x").await.expect("iam"),
        b"0 Name Set By Certificate"
    );
    wait_until("counted", || {
        count(&server, TlsDoor::Ws, HandshakeResult::Ok) == 1
    })
    .await;
}

/// Whether an outside program is here; a missing one skips the test, unless
/// `GLOCKD_REQUIRE_<WHAT>` is set (as in CI), which makes it a failure.
fn have(program: &str, require: &str) -> bool {
    if Command::new(program).arg("version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os(require).is_none(),
        "{program} is required ({require} is set) but missing"
    );
    eprintln!("skipped: {program} is not installed");
    false
}

#[test]
fn openssl_s_client_talks_to_the_tls_port_with_a_client_certificate() {
    if !have("openssl", "GLOCKD_REQUIRE_OPENSSL") {
        return;
    }
    let pki = Pki::new("openssl");
    let server = start(&pki, &pki.server("server"), true, |_| {});
    let dave = pki.client_named("dave");
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-no_ign_eof", "-connect"])
        .arg(tls_addr(&server).to_string())
        .arg("-CAfile")
        .arg(&pki.ca)
        .arg("-cert")
        .arg(&dave.cert)
        .arg("-key")
        .arg(&dave.key)
        .arg("-verify_return_error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl");
    let mut stdin = child.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, b"g door\nme\ni door\n").expect("send");
    // The replies, read on a thread of their own so that a silent server fails the test
    // instead of hanging it; stdin stays open until they are in (s_client ends at its EOF).
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let lines: Vec<String> = (0..3)
        .map(|_| rx.recv_timeout(common::REPLY_TIMEOUT).unwrap_or_default())
        .collect();
    drop(stdin);
    let _ = child.kill();
    let output = child.wait_with_output().expect("openssl ends");
    let text = lines.join("\n");
    assert_eq!(
        lines[0],
        "1 Got Lock",
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        lines[1].starts_with("1 127.0.0.1:") && lines[1].ends_with(" cert:dave"),
        "{text}"
    );
    assert_eq!(lines[2], "1 Locked");
}

#[test]
fn pythons_ssl_module_talks_to_the_tls_port() {
    if !have("python3", "GLOCKD_REQUIRE_PYTHON") {
        return;
    }
    let pki = Pki::new("python");
    let server = start(&pki, &pki.server("server"), true, |_| {});
    let erin = pki.client_named("erin");
    let script = r#"
import socket, ssl, sys
port, ca, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
context = ssl.create_default_context(cafile=ca)
context.load_cert_chain(cert, key)
with socket.create_connection(("127.0.0.1", port)) as raw:
    with context.wrap_socket(raw, server_hostname="localhost") as s:
        f = s.makefile("rwb")
        for command in (b"g py\n", b"me\n", b"r py\n"):
            f.write(command)
            f.flush()
            print(f.readline().decode().rstrip("\n"))
        print(s.version())
"#;
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(tls_addr(&server).port().to_string())
        .arg(&pki.ca)
        .arg(&erin.cert)
        .arg(&erin.key)
        .output()
        .expect("run python3");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "1 Got Lock", "{text}");
    assert!(lines[1].ends_with(" cert:erin"), "{text}");
    assert_eq!(lines[2], "1 Released Lock");
    assert!(lines[3] == "TLSv1.3" || lines[3] == "TLSv1.2", "{text}");
}

/// The binary: a TLS door without a certificate is one line and status 2; a certificate that
/// does not load stops the start with one line; SIGHUP reloads the files, a bad one is
/// refused with a log line and the old one kept.
mod binary {
    use super::*;
    use std::io::{BufRead, BufReader};

    const GLOCKD: &str = env!("CARGO_BIN_EXE_glockd");

    #[test]
    fn a_tls_door_without_a_certificate_is_refused_at_start() {
        let output = Command::new(GLOCKD)
            .args([
                "-port",
                "0",
                "-ws",
                "0",
                "-metrics",
                "off",
                "-tls-port",
                "1",
            ])
            .output()
            .expect("run");
        assert_eq!(output.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("--tls-cert and --tls-key"), "{stderr}");

        let pki = Pki::new("binary-start");
        let output = Command::new(GLOCKD)
            .args(["-port", "0", "-ws", "0", "-metrics", "off", "-tls-port"])
            .arg(process::free_port().to_string())
            .arg("-tls-cert")
            .arg(&pki.ca)
            .arg("-tls-key")
            .arg(pki.dir.join("missing.key"))
            .output()
            .expect("run");
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("glockd: cannot start: -tls-key "),
            "{stderr}"
        );
    }

    #[test]
    fn sighup_reloads_the_certificate_and_refuses_a_bad_one() {
        let pki = Pki::new("binary-hup");
        let first = pki.server("first");
        let port = process::free_port();
        let tls_port = process::free_port();
        // The TLS flags at their highest: the server starts and serves.
        let mut child = Command::new(GLOCKD)
            .args(["-ws", "0", "-metrics", "off", "-pin=false"])
            .args([
                "-tls-handshake-timeout",
                "300",
                "-max-tls-handshakes",
                "1073741824",
            ])
            .arg("-port")
            .arg(port.to_string())
            .arg("-tls-port")
            .arg(tls_port.to_string())
            .arg("-tls-cert")
            .arg(&first.cert)
            .arg("-tls-key")
            .arg(&first.key)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let mut next_line = |want: &str| loop {
            let line = lines.next().expect("a line").expect("read");
            if line.contains(want) {
                return line;
            }
        };
        next_line("listening on tcp");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let tls = pki::client(&pki.ca, None);
        let addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().expect("addr");
        let mut live = runtime
            .block_on(Client::connect_tls(addr, &tls))
            .expect("connect");
        assert_eq!(server_cert_name(&live), "first");
        assert!(runtime.block_on(live.get("kept")).expect("g"));

        // A key that does not match: refused, one warning, the old certificate kept.
        std::fs::copy(pki.server("other").cert, &first.cert).expect("copy");
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("hup");
        let warning = next_line("tls_reload_failed");
        assert!(warning.contains("WARN"), "{warning}");
        next_line("reloaded");
        let again = runtime
            .block_on(Client::connect_tls(addr, &tls))
            .expect("connect");
        assert_eq!(server_cert_name(&again), "first");

        // A good pair: new handshakes get it, the live connection keeps its lock.
        let second = pki.server("second");
        std::fs::copy(&second.cert, &first.cert).expect("copy");
        std::fs::copy(&second.key, &first.key).expect("copy");
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("hup");
        let reloaded = next_line("reloaded");
        assert!(reloaded.contains("tls=true"), "{reloaded}");
        let fresh = runtime
            .block_on(Client::connect_tls(addr, &tls))
            .expect("connect");
        assert_eq!(server_cert_name(&fresh), "second");
        assert!(runtime.block_on(live.inspect("kept")).expect("i"));

        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("term");
        std::thread::spawn(move || lines.for_each(drop));
        let status = child.wait().expect("wait");
        assert!(status.success());
    }
}

/// A users file maps a certificate by its exact subject: not by the listed `cert:` name, which
/// is cut to `-max-name-bytes` and has control characters replaced, so a certificate whose
/// subject merely starts with a user's, or differs from it only in a control character, is
/// not that user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_file_maps_the_exact_certificate_subject() {
    let pki = Pki::new("mapping");
    let dir = std::env::temp_dir().join(format!("glockd-tls-users-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let users = dir.join("users.toml");
    let exact = "s".repeat(40);
    std::fs::write(
        &users,
        format!(
            "[[user]]\nname = \"svc\"\ncertificate = \"{exact}\"\nprefixes = ['svc:*']\n\
             classes = [\"lock\"]\n\
             [[user]]\nname = \"odd\"\ncertificate = \"odd?name\"\nprefixes = ['*']\n\
             classes = [\"lock\"]\n"
        ),
    )
    .expect("users file");
    let server = start(&pki, &pki.server("server"), true, |c| {
        c.users = Some(users.clone().into());
        c.max_name_bytes = 16;
    });
    let connect = |name: &str| {
        let cert = pki.client_named(name);
        let tls = pki::client(&pki.ca, Some(&cert));
        let addr = tls_addr(&server);
        async move { Client::connect_tls(addr, &tls).await.expect("connects") }
    };
    let mut svc = connect(&exact).await;
    assert_eq!(svc.command(b"g svc:a").await.expect("g"), b"1 Got Lock");
    assert_eq!(
        svc.command(b"g other").await.expect("g"),
        b"0 Permission Denied"
    );
    // Listed cut to 16 bytes, but mapped by all 40.
    assert_eq!(svc.me().await.expect("me").1, b"cert:sssssssssss");
    let mut longer = connect(&format!("{exact}-impostor")).await;
    assert_eq!(
        longer.command(b"g svc:b").await.expect("g"),
        b"0 Auth Required"
    );
    // A subject whose listed form is `odd?name` is not the user whose subject is that text.
    let mut control = connect("odd\nname").await;
    assert_eq!(
        control.command(b"g x").await.expect("g"),
        b"0 Auth Required"
    );
    let mut odd = connect("odd?name").await;
    assert_eq!(odd.command(b"g x").await.expect("g"), b"1 Got Lock");
    let _ = std::fs::remove_dir_all(&dir);
}
