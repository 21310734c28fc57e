//! The three doors share one lock table: locks, replies and stats are the same whichever door a
//! client used. Plus what is particular to each door: websocket messages, close frames and
//! origins; the unix socket file's life.

mod common;

use std::time::Duration;

use common::{Setup, TestServer, Transport};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

async fn a_lock_taken_through_one_door_is_held_at_every_door(setup: Setup) {
    let server = TestServer::start_all_doors(setup, |_| {});
    let doors = [Transport::Tcp, Transport::Unix, Transport::Ws];
    let mut everyone = Vec::new();
    for holder_door in doors {
        let mut holder = server.connect_via(holder_door).await;
        let name = format!("shared-table-{holder_door:?}");
        holder.check(&format!("g {name}\n"), "1 Got Lock\n").await;
        holder
            .check(&format!("sg s-{name}\n"), "1 Got Shared Lock\n")
            .await;
        for (n, other_door) in doors.into_iter().enumerate() {
            let mut other = server.connect_via(other_door).await;
            other
                .check(
                    &format!("g {name}\ni {name}\nsg s-{name}\n"),
                    &format!("0 Cannot Get Lock\n1 Locked\n{} Got Shared Lock\n", n + 2),
                )
                .await;
            let id = holder.id();
            other
                .check(&format!("d {name}\n"), &format!("{name}: {id}\n"))
                .await;
            everyone.push(other);
        }
        everyone.push(holder);
    }
    let stats = server.client().await.stats().await.unwrap();
    // Everyone is still connected, through all three doors, and so is the stats client.
    assert_eq!(stats["connections"], everyone.len() as u64 + 1);
}

async fn websocket_clients_are_orphaned_on_close_and_on_drop(setup: Setup) {
    let server = TestServer::start_all_doors(setup, |_| {});
    let mut observer = server.connect_via(Transport::Tcp).await;
    // A clean close, with a close frame.
    let mut polite = server.connect_via(Transport::Ws).await;
    polite
        .check(
            "g ws-polite\nsg ws-shared\n",
            "1 Got Lock\n1 Got Shared Lock\n",
        )
        .await;
    if let common::Stream::Ws(ws) = &mut polite.stream {
        ws.ws.close(None).await.unwrap();
    }
    server
        .wait_for_stats("the polite client's locks", |s| {
            s["orphans"] == 1 && s["shared_orphans"] == 1
        })
        .await;
    // Gone without a close frame: the TCP connection under it is reset.
    let mut rude = server.connect_via(Transport::Ws).await;
    rude.check("g ws-rude\n", "1 Got Lock\n").await;
    rude.reset();
    server
        .wait_for_stats("the rude client's lock", |s| {
            s["orphans"] == 2 && s["locks"] == 0
        })
        .await;
    observer
        .check(
            "i ws-polite\ni ws-rude\nsi ws-shared\n",
            "0 Not Locked\n0 Not Locked\n0 Not Shared Locked\n",
        )
        .await;
}

for_each_shard_count_setup!(
    a_lock_taken_through_one_door_is_held_at_every_door,
    websocket_clients_are_orphaned_on_close_and_on_drop,
);

/// A raw websocket client, to see message boundaries.
async fn raw_ws(
    server: &TestServer,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let addr = server.ws_addr.expect("websocket door");
    tokio_tungstenite::connect_async(format!("ws://{addr}/some/path"))
        .await
        .expect("handshake")
        .0
}

async fn next_text(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Vec<u8> {
    loop {
        let message = tokio::time::timeout(common::REPLY_TIMEOUT, ws.next())
            .await
            .expect("a message in time")
            .expect("open")
            .expect("valid");
        match message {
            Message::Text(t) => return t.as_bytes().to_vec(),
            Message::Binary(b) => return b.to_vec(),
            Message::Close(_) => return b"<close>".to_vec(),
            _ => {}
        }
    }
}

#[tokio::test]
async fn websocket_replies_are_one_message_per_command() {
    let server = TestServer::start_all_doors(2, |_| {});
    let mut ws = raw_ws(&server).await;
    // One message, three commands (and a blank line, which gets nothing).
    ws.send(Message::text("g m1\n\ni m1\nd nothing-here\n"))
        .await
        .unwrap();
    assert_eq!(next_text(&mut ws).await, b"1 Got Lock\n");
    assert_eq!(next_text(&mut ws).await, b"1 Locked\n");
    // An empty listing is an empty message: every command gets an answer.
    assert_eq!(next_text(&mut ws).await, b"");
    // Without a trailing newline; binary works like text.
    ws.send(Message::binary(b"sg m2".to_vec())).await.unwrap();
    assert_eq!(next_text(&mut ws).await, b"1 Got Shared Lock\n");
    // A multi-line reply is one message.
    ws.send(Message::text("q")).await.unwrap();
    let q = next_text(&mut ws).await;
    assert_eq!(
        q.iter().filter(|&&b| b == b'\n').count(),
        glockd::protocol::Verb::COUNT + 12
    );
    assert!(q.starts_with(b"command_auth: 0\ncommand_d: 1\n"));
    // Pings are answered.
    ws.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    loop {
        let message = ws.next().await.unwrap().unwrap();
        if let Message::Pong(data) = message {
            assert_eq!(&data[..], b"hi");
            break;
        }
    }
}

#[tokio::test]
async fn a_websocket_close_is_answered_with_a_close() {
    let server = TestServer::start_all_doors(2, |_| {});
    let mut ws = raw_ws(&server).await;
    ws.send(Message::text("g closing")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, b"1 Got Lock\n");
    ws.send(Message::Close(None)).await.unwrap();
    // The server's close frame comes back (the client library reads it as the end of the
    // stream once the handshake is complete), not just the TCP close.
    let answer = tokio::time::timeout(common::REPLY_TIMEOUT, ws.next())
        .await
        .expect("an answer in time");
    assert!(
        matches!(answer, Some(Ok(Message::Close(_))) | None),
        "{answer:?}"
    );
    server
        .wait_for_stats("the lock released", |s| s["locks"] == 0)
        .await;
}

#[tokio::test]
async fn an_oversized_websocket_message_gets_a_line_too_long_reply() {
    let server = TestServer::start_all_doors(1, |c| c.max_line_bytes = 1024);
    let mut ws = raw_ws(&server).await;
    ws.send(Message::text("g held-by-big")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, b"1 Got Lock\n");
    ws.send(Message::text(format!("g {}", "x".repeat(4096))))
        .await
        .unwrap();
    // A text message, as every reply that is text (a browser hands it over as a string).
    let reply = tokio::time::timeout(common::REPLY_TIMEOUT, ws.next())
        .await
        .expect("a message in time")
        .expect("open")
        .expect("valid");
    assert_eq!(reply, Message::text("0 Line Too Long\n"));
    server
        .wait_for_stats("the closed client's lock", |s| s["orphans"] == 1)
        .await;
}

#[tokio::test]
async fn the_origin_allow_list_turns_away_other_sites() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server =
        TestServer::start_all_doors(1, |c| c.ws_origins = vec!["https://ops.example".into()]);
    let url = format!("ws://{}/", server.ws_addr.unwrap());
    let with_origin = |origin: &str| {
        let mut request = url.clone().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        request
    };
    let refused = tokio_tungstenite::connect_async(with_origin("https://evil.example")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("a foreign origin was let in: {:?}", other.map(|_| ())),
    }
    let (mut ok, _) = tokio_tungstenite::connect_async(with_origin("https://ops.example"))
        .await
        .unwrap();
    ok.send(Message::text("g from-ops")).await.unwrap();
    assert_eq!(next_text(&mut ok).await, b"1 Got Lock\n");
    // Programs send no Origin header; the allow-list is about browsers.
    let mut program = raw_ws(&server).await;
    program.send(Message::text("i from-ops")).await.unwrap();
    assert_eq!(next_text(&mut program).await, b"1 Locked\n");
}

#[tokio::test]
async fn unix_connections_are_numbered_like_the_original() {
    let server = TestServer::start_all_doors(
        Setup {
            shards: 2,
            transport: Transport::Unix,
        },
        |_| {},
    );
    let mut first = server.connect().await;
    let mut second = server.connect().await;
    first.check("me\n", "1 unix:1 unix:1\n").await;
    second.check("me\n", "1 unix:2 unix:2\n").await;
    second.check("g u\n", "1 Got Lock\n").await;
    first.check("dump\n", "map[u:unix:2]\n").await;
}

#[tokio::test]
async fn a_full_server_refuses_websockets_in_http() {
    let server = TestServer::start_all_doors(1, |c| c.max_connections = 1);
    let _only = server.connect_via(Transport::Tcp).await;
    let _ = tokio::time::sleep(Duration::from_millis(50)).await;
    match tokio_tungstenite::connect_async(format!("ws://{}/", server.ws_addr.unwrap())).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("expected a 503, got {:?}", other.map(|_| ())),
    }
}

mod unix_socket_file {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use super::common::socket_path;

    const BIN: &str = env!("CARGO_BIN_EXE_glockd");

    fn start(path: &std::path::Path, extra: &[&str]) -> std::process::Child {
        Command::new(BIN)
            .args([
                "-port=0",
                "-ws=0",
                "-metrics=off",
                "-pin=false",
                "-shards",
                "1",
                "-unix",
            ])
            .arg(path)
            .args(extra)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    }

    fn wait_for_socket(path: &std::path::Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
            || std::os::unix::net::UnixStream::connect(path).is_err()
        {
            assert!(Instant::now() < deadline, "no socket at {}", path.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ask(path: &std::path::Path, command: &str) -> String {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        stream.write_all(command.as_bytes()).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    }

    fn terminate(mut child: std::process::Child) -> Option<i32> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap().code()
    }

    #[test]
    fn a_stale_socket_is_replaced_and_removed_at_exit() {
        let path = socket_path();
        // A socket file nobody listens on, as a crashed server leaves it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_socket());
        let server = start(&path, &["-unix-mode", "0660"]);
        wait_for_socket(&path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert_eq!(
            ask(&path, "g a\ni a\nme\n"),
            "1 Got Lock\n1 Locked\n1 unix:2 unix:2\n"
        );
        assert_eq!(terminate(server), Some(0));
        assert!(!path.exists(), "socket file removed on clean exit");
    }

    #[test]
    fn a_regular_file_at_the_socket_path_is_an_error_and_left_alone() {
        let path = socket_path();
        std::fs::write(&path, "precious").unwrap();
        let out = Command::new(BIN)
            .args(["-port=0", "-ws=0", "-metrics=off", "-unix"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let reason = String::from_utf8_lossy(&out.stderr);
        assert!(reason.contains("not a socket"), "{reason}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_socket_a_live_server_answers_on_is_not_stolen() {
        let path = socket_path();
        let first = start(&path, &[]);
        wait_for_socket(&path);
        let out = Command::new(BIN)
            .args(["-port=0", "-ws=0", "-metrics=off", "-unix"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("another server"));
        assert_eq!(ask(&path, "i x\n"), "0 Not Locked\n");
        assert_eq!(terminate(first), Some(0));
    }
}
