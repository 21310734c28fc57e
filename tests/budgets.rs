//! Connection budgets and fairness: a waiter that leaves is seen leaving whatever it sent behind
//! its wait, what a client may send behind a wait is bounded, a half-closed waiter still gets its
//! answer, the total budget for client buffers closes the biggest clients and spares the rest,
//! a crowd of pipelining clients takes turns with a quiet one, and an idle websocket costs
//! about what an idle TCP connection does.

mod common;
mod process;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Raw, Setup, TestServer, Transport, REPLY_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Asks `q` on a new connection until `done` holds, retrying while the server turns new
/// connections away (`0 Too Many Connections`); panics after REPLY_TIMEOUT. The asking
/// connection is closed (and counted gone) when it returns.
async fn until_admitted_and(
    server: &TestServer,
    what: &str,
    done: impl Fn(&BTreeMap<String, u64>) -> bool,
) {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut last = String::from("nothing");
    while Instant::now() < deadline {
        let mut asker = Raw::connect(server.addr).await;
        asker.send("q\n").await;
        let first = asker.line().await;
        if first == "0 Too Many Connections\n" {
            last = first;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let (key, value) = first.trim_end().split_once(": ").expect("a stats line");
        let mut stats = asker.read_stats().await;
        stats.insert(key.to_owned(), value.parse().expect("a number"));
        asker.close().await;
        if done(&stats) {
            return;
        }
        last = format!("{stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}; last: {last}");
}

/// What a waiting client sends behind its `gw` to fill what the server reads ahead: over a
/// websocket 64 small messages (the stash that used to stop the reading), over a byte stream
/// 2 MiB (past the 1 MiB the server used to read).
async fn fill_behind_a_wait(waiter: &mut Raw, transport: Transport) {
    match transport {
        Transport::Ws => {
            for _ in 0..64 {
                waiter.send("i x").await;
            }
        }
        _ => {
            let filler = "i x\n".repeat(512 * 1024);
            // The server may close the connection part way (too much sent behind a wait).
            let _ = tokio::time::timeout(REPLY_TIMEOUT, waiter.stream.write_all(filler.as_bytes()))
                .await;
        }
    }
}

/// A waiter that resets after filling what the server reads ahead leaves the queue and gives
/// back its connection place: with -max-connections 3, the holder, the waiter and a client
/// asking `q` take every place, and the waiter's must come back.
async fn a_reset_waiter_leaves_the_queue_and_its_place(setup: Setup) {
    let server = TestServer::start_with(setup, |c| c.max_connections = 3);
    let mut holder = Raw::connect(server.addr).await;
    holder.check("g L\n", "1 Got Lock\n").await;
    let mut waiter = server.connect().await;
    waiter.send("gw 3600000 L\n").await;
    until_admitted_and(&server, "the waiter to queue", |stats| {
        stats["lock_waiters"] == 1
    })
    .await;
    fill_behind_a_wait(&mut waiter, setup.transport).await;
    // Time for the server to read what was sent (not an assertion: were the server slower,
    // the reset would only come sooner than the test means it to).
    tokio::time::sleep(Duration::from_millis(200)).await;
    waiter.reset();
    until_admitted_and(&server, "the reset waiter to be gone", |stats| {
        stats["lock_waiters"] == 0 && stats["connections"] == 2
    })
    .await;
    // The holder never noticed.
    holder.check("i L\n", "1 Locked\n").await;
}

/// A client that keeps sending behind a wait is answered `0 Too Much Sent While Waiting` in
/// place of the wait's answer (unless the close overtakes it) and closed: what it can make the
/// server buffer is bounded, and it leaves the queue.
async fn sending_too_much_behind_a_wait_closes_the_connection(setup: Setup) {
    let server = TestServer::start_with(setup, |_| {});
    let mut holder = Raw::connect(server.addr).await;
    holder.check("g L\n", "1 Got Lock\n").await;
    let mut waiter = server.connect().await;
    waiter.send("gw 3600000 L\n").await;
    match setup.transport {
        Transport::Ws => {
            for _ in 0..100 {
                if tokio::time::timeout(REPLY_TIMEOUT, waiter.stream.write_all(b"i x"))
                    .await
                    .map_or(true, |sent| sent.is_err())
                {
                    break;
                }
            }
        }
        _ => fill_behind_a_wait(&mut waiter, setup.transport).await,
    }
    let mut rest = Vec::new();
    let read = tokio::time::timeout(REPLY_TIMEOUT, waiter.stream.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection");
    // A reset may overtake the last line; whatever arrived is that line and nothing else.
    if read.is_ok() && !rest.is_empty() {
        assert_eq!(
            String::from_utf8_lossy(&rest),
            "0 Too Much Sent While Waiting\n"
        );
    }
    server
        .wait_for_stats("the waiter to be gone", |stats| {
            stats["lock_waiters"] == 0 && stats["connections"] == 2
        })
        .await;
    holder.check("i L\n", "1 Locked\n").await;
}

/// A waiter that half-closes (sends its last command and shuts its writing side) still gets the
/// wait's answer; then the connection ends, its place is given back, and the lock it was
/// granted is released with it.
async fn a_half_closed_waiter_gets_its_answer_then_leaves(setup: Setup) {
    let server = TestServer::start(setup);
    let mut holder = Raw::connect(server.addr).await;
    holder.check("g L\n", "1 Got Lock\n").await;
    let mut waiter = server.connect().await;
    waiter.send("gw 3600000 L\n").await;
    waiter.stream.shutdown().await.expect("half-close");
    server
        .wait_for_stats("the waiter to queue", |stats| stats["lock_waiters"] == 1)
        .await;
    holder.check("r L\n", "1 Released Lock\n").await;
    waiter.expect("1 Got Lock\n").await;
    waiter.expect_closed().await;
    server
        .wait_for_stats("the waiter to be gone", |stats| {
            stats["connections"] == 2 && stats["locks"] == 0
        })
        .await;
    holder.check("i L\n", "0 Not Locked\n").await;
}

mod too_much {
    use super::*;
    crate::for_each_transport!(sending_too_much_behind_a_wait_closes_the_connection);
}

mod reset {
    use super::*;
    crate::for_each_transport!(@mod tcp_1, Tcp, 1; a_reset_waiter_leaves_the_queue_and_its_place);
    crate::for_each_transport!(@mod tcp_4, Tcp, 4; a_reset_waiter_leaves_the_queue_and_its_place);
    crate::for_each_transport!(@mod ws_1, Ws, 1; a_reset_waiter_leaves_the_queue_and_its_place);
    crate::for_each_transport!(@mod ws_4, Ws, 4; a_reset_waiter_leaves_the_queue_and_its_place);
}

/// Exactly 64 KiB sent behind a wait is within the bound: kept, and run after the wait.
async fn sixty_four_kib_behind_a_wait_is_kept(setup: Setup) {
    let server = TestServer::start_with(setup, |_| {});
    let mut holder = Raw::connect(server.addr).await;
    holder.check("g L\n", "1 Got Lock\n").await;
    let mut waiter = server.connect().await;
    // The wait, then empty lines (no replies) making exactly 64 KiB, then one command.
    let mut behind = vec![b'\n'; 64 * 1024 - 4];
    behind.extend_from_slice(b"i L\n");
    waiter.send("gw 3600000 L\n").await;
    server
        .wait_for_stats("the waiter to queue", |stats| stats["lock_waiters"] == 1)
        .await;
    waiter.send(behind).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    holder.check("r L\n", "1 Released Lock\n").await;
    waiter.expect("1 Got Lock\n1 Locked\n").await;
}

/// At shutdown a waiter is answered `0 Timed Out`, and what it sent behind its wait (read
/// meanwhile) is answered too before its connection closes, on every door.
async fn shutdown_answers_a_waiter_and_what_it_sent_behind(setup: Setup) {
    let server = TestServer::start_with(setup, |_| {});
    let mut holder = Raw::connect(server.addr).await;
    holder.check("g L\n", "1 Got Lock\n").await;
    let mut waiter = server.connect().await;
    waiter.send("gw 3600000 L\n").await;
    server
        .wait_for_stats("the waiter to queue", |stats| stats["lock_waiters"] == 1)
        .await;
    waiter.send("si S\n").await;
    // Read by the server while the wait goes on (it keeps reading to see the client leave).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopper = std::thread::spawn(move || drop(server));
    // Timed out, or granted if the holder's thread closed it first.
    let answer = waiter.line().await;
    assert!(
        answer == "0 Timed Out\n" || answer == "1 Got Lock\n",
        "{answer:?}"
    );
    waiter.expect("0 Not Shared Locked\n").await;
    waiter.expect_closed_or_reset().await;
    stopper.join().expect("stopped");
}

mod shutdown {
    use super::*;
    crate::for_each_transport!(shutdown_answers_a_waiter_and_what_it_sent_behind);
}

mod exact_read_ahead {
    use super::*;
    crate::for_each_byte_stream!(sixty_four_kib_behind_a_wait_is_kept);
}

mod half_close {
    use super::*;
    crate::for_each_byte_stream!(a_half_closed_waiter_gets_its_answer_then_leaves);
}

/// How a client that sent an unfinished line fared once it finishes it: answered (it was
/// spared), or closed (for the budget).
async fn finish_line(client: &mut Raw) -> Option<String> {
    if client.stream.write_all(b"\n").await.is_err() {
        return None;
    }
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(REPLY_TIMEOUT, client.stream.read(&mut byte)).await {
            Ok(Ok(1)) => {
                reply.push(byte[0]);
                if byte[0] == b'\n' {
                    let line = String::from_utf8_lossy(&reply).into_owned();
                    return (line == "0 Not Locked\n").then_some(line);
                }
            }
            Ok(_) => return None,
            Err(_) => panic!("no answer and no close"),
        }
    }
}

/// Past -max-client-buffers the biggest client goes, its lock released; smaller clients with
/// big buffers of their own, and small ones, keep their connections and their locks.
async fn the_client_buffer_budget_closes_the_biggest_and_spares_the_rest(setup: Setup) {
    let server = TestServer::start_with(setup, |c| {
        c.max_client_buffers = 5 << 20;
        c.max_line_bytes = 8 << 20;
        c.max_lock_name_bytes = 8 << 20;
        // The unfinished lines wait as long as the test takes.
        c.line_timeout = 0;
    });
    let mut small = Vec::new();
    for i in 0..10 {
        let mut client = server.connect().await;
        client
            .check(&format!("g small-{i}\n"), "1 Got Lock\n")
            .await;
        small.push(client);
    }
    // Three clients each with 600 KB of a line (their buffers hold about 1 MiB each), then one
    // with 3 MiB: past 5 MiB only when it holds more than any of the others.
    let mut medium = Vec::new();
    for i in 0..3 {
        let mut client = server.connect().await;
        client
            .check(&format!("g medium-{i}\n"), "1 Got Lock\n")
            .await;
        client.send(format!("i {}", "m".repeat(600_000))).await;
        medium.push(client);
    }
    let mut big = server.connect().await;
    big.check("g big\n", "1 Got Lock\n").await;
    let _ = tokio::time::timeout(
        REPLY_TIMEOUT,
        big.stream
            .write_all(format!("i {}", "b".repeat(3 << 20)).as_bytes()),
    )
    .await;
    assert_eq!(finish_line(&mut big).await, None, "the biggest was spared");
    for (i, client) in medium.iter_mut().enumerate() {
        assert_eq!(
            finish_line(client).await.as_deref(),
            Some("0 Not Locked\n"),
            "medium client {i} was closed"
        );
    }
    for (i, client) in small.iter_mut().enumerate() {
        client.check(&format!("i small-{i}\n"), "1 Locked\n").await;
    }
    let mut checker = Raw::connect(server.addr).await;
    for i in 0..3 {
        checker
            .check(&format!("i medium-{i}\n"), "1 Locked\n")
            .await;
    }
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        checker.send("i big\n").await;
        if checker.line().await == "0 Not Locked\n" {
            break;
        }
        assert!(Instant::now() < deadline, "the closed client's lock stayed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

mod budget {
    use super::*;
    crate::for_each_byte_stream!(the_client_buffer_budget_closes_the_biggest_and_spares_the_rest);
}

/// A quiet client's command is answered while a crowd pipelines costly commands, not after the
/// crowd is done: its `q`, sent right after the crowd sent everything, counts fewer `q`s than
/// the crowd sent (an order, not a time: the crowd's work takes the server far longer than
/// sending it takes the test, and without turns the first crowd client's work alone keeps the
/// server busy until every other command has arrived, to be run in order of arrival). Then every
/// crowd client gets every answer.
async fn a_quiet_client_takes_turns_with_a_pipelining_crowd(setup: Setup) {
    const CROWD: usize = 40;
    const EACH: usize = 4000;
    let server = TestServer::start(setup);
    // Everyone connected first, so that what follows is only sending.
    let mut quiet = server.connect().await;
    quiet.check("i x\n", "0 Not Locked\n").await;
    let mut crowd = Vec::new();
    for _ in 0..CROWD {
        let mut client = server.connect().await;
        client.check("i x\n", "0 Not Locked\n").await;
        crowd.push(client);
    }
    let batch = "q\n".repeat(EACH);
    let mut readers = Vec::new();
    for client in crowd {
        let (mut read, mut write) = tokio::io::split(client.stream);
        write.write_all(batch.as_bytes()).await.expect("send");
        readers.push(tokio::spawn(async move {
            let _keep = write;
            let mut seen = 0;
            let mut tail: Vec<u8> = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            while seen < EACH {
                let n = tokio::time::timeout(REPLY_TIMEOUT, read.read(&mut buf))
                    .await
                    .expect("crowd replies in time")
                    .expect("read");
                assert!(n > 0, "a crowd client was closed");
                tail.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&tail);
                seen += text.matches("shared_orphans: ").count();
                // Less than the word, so that no match is counted twice.
                let keep = tail.len().min("shared_orphans: ".len() - 1);
                tail.drain(..tail.len() - keep);
            }
            seen
        }));
    }
    let stats = quiet.stats().await;
    assert!(
        stats["command_q"] < (CROWD * EACH) as u64,
        "the quiet client waited for the whole crowd: {stats:?}"
    );
    quiet.check("i x\n", "0 Not Locked\n").await;
    for reader in readers {
        assert_eq!(reader.await.expect("reader"), EACH);
    }
}

mod turns {
    use super::*;
    crate::for_each_transport!(@mod tcp_1, Tcp, 1; a_quiet_client_takes_turns_with_a_pipelining_crowd);
    crate::for_each_transport!(@mod ws_1, Ws, 1; a_quiet_client_takes_turns_with_a_pipelining_crowd);
}

/// A server process's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .expect("VmRSS in /proc")
}

/// An idle websocket connection costs the server about what an idle TCP one does (it used to
/// cost about 135 KB, forty times more): 400 of them, each served one command, add well under
/// 48 KB each to the server's resident memory (a generous bound: about 8 KB measured).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_costs_about_what_a_tcp_connection_does() {
    const CONNS: u64 = 400;
    let (port, ws) = (process::free_port(), process::free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_glockd"))
        .args([
            "-bind",
            "127.0.0.1",
            "-pin=false",
            "-shards",
            "1",
            "-metrics",
            "off",
        ])
        .args(["-port", &port.to_string(), "-ws", &ws.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn glockd");
    process::wait_until_listening(&mut child);
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(child);
    let pid = child.0.id();
    // Warm up: the first connections allocate the runtime's own structures.
    let mut held = Vec::new();
    for _ in 0..20 {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{ws}/"))
            .await
            .expect("handshake");
        futures_util::SinkExt::send(&mut ws, "i x".into())
            .await
            .expect("send");
        futures_util::StreamExt::next(&mut ws).await;
        held.push(ws);
    }
    let before = rss_kib(pid);
    for _ in 0..CONNS {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{ws}/"))
            .await
            .expect("handshake");
        futures_util::SinkExt::send(&mut ws, "i x".into())
            .await
            .expect("send");
        let reply = futures_util::StreamExt::next(&mut ws).await;
        assert!(matches!(reply, Some(Ok(m)) if m.to_text().ok() == Some("0 Not Locked\n")));
        held.push(ws);
    }
    let after = rss_kib(pid);
    let per_conn = after.saturating_sub(before) * 1024 / CONNS;
    assert!(
        per_conn < 48 * 1024,
        "an idle websocket costs {per_conn} bytes ({before} KiB -> {after} KiB)"
    );
}

/// A plain HTTP GET of `/metrics`; the body.
fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("read timeout");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .expect("an HTTP response")
}

/// One sample's value from a scrape (None when absent).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The budget's closes are counted by reason, and the bytes accounted and the budget are
/// exported.
#[test]
fn client_buffer_closes_and_bytes_are_exported() {
    use std::io::{BufRead, BufReader, Write};
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = glockd::Config {
        shards: Some(2),
        pin: false,
        max_client_buffers: 2 << 20,
        max_line_bytes: 8 << 20,
        line_timeout: 0,
        ..glockd::Config::default()
    };
    let server = glockd::start_with_listeners(
        config,
        glockd::Listeners {
            tcp: Some(bind()),
            metrics: Some(bind()),
            ..glockd::Listeners::default()
        },
    )
    .expect("server starts");
    let (addr, metrics) = (
        server.tcp_addr().expect("tcp"),
        server.metrics_addr().expect("metrics"),
    );
    let body = scrape(metrics);
    assert_eq!(
        sample(&body, "glockd_max_client_buffer_bytes"),
        Some(2097152.0)
    );
    let mut small = BufReader::new(std::net::TcpStream::connect(addr).expect("connect"));
    small.get_mut().write_all(b"g small\n").expect("send");
    let mut line = String::new();
    small.read_line(&mut line).expect("reply");
    assert_eq!(line, "1 Got Lock\n");
    // 3 MiB of a line: past the budget, and the biggest by far.
    let mut big = std::net::TcpStream::connect(addr).expect("connect");
    let _ = big.write_all(format!("i {}", "b".repeat(3 << 20)).as_bytes());
    let _ = big.write_all(b"\n");
    let mut rest = Vec::new();
    big.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
    let _ = std::io::Read::read_to_end(&mut big, &mut rest);
    assert!(
        rest.is_empty() || rest == b"0 Client Buffers Full\n",
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let body = scrape(metrics);
        let closed = sample(
            &body,
            "glockd_connections_closed_total{reason=\"client_buffers\"}",
        );
        let bytes = sample(&body, "glockd_client_buffer_bytes").expect("the gauge");
        if closed == Some(1.0) && bytes > 0.0 && bytes < (2 << 20) as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "not counted: {body}");
        std::thread::sleep(Duration::from_millis(10));
    }
    small.get_mut().write_all(b"i small\n").expect("send");
    line.clear();
    small.read_line(&mut line).expect("reply");
    assert_eq!(line, "1 Locked\n");
    server.shutdown();
}

/// Over a websocket, what the library holds of a message on its way counts against
/// -max-client-buffers too: a client sending a 3 MiB message, 2.5 MiB of it so far, is closed
/// past a 2 MiB budget, while a small client keeps its connection and its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_message_on_its_way_counts_against_the_budget() {
    let setup = Setup {
        shards: 1,
        transport: Transport::Ws,
    };
    let server = TestServer::start_with(setup, |c| {
        c.max_client_buffers = 2 << 20;
        c.max_line_bytes = 8 << 20;
        c.line_timeout = 0;
    });
    let mut small = server.connect().await;
    small.check("g small\n", "1 Got Lock\n").await;
    let addr = server.ws_addr.expect("websocket door");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp)
        .await
        .expect("handshake");
    let raw = ws.get_mut();
    // One binary frame of 3 MiB, masked with a zero key (so the payload goes as it is).
    let mut header = vec![0x82u8, 0x80 | 127];
    header.extend_from_slice(&(3u64 << 20).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    let _ = raw.write_all(&header).await;
    let _ = tokio::time::timeout(REPLY_TIMEOUT, raw.write_all(&vec![b'x'; 5 << 19])).await;
    let mut sink = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(REPLY_TIMEOUT, raw.read(&mut sink))
            .await
            .expect("the server closes the connection")
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    small.check("i small\n", "1 Locked\n").await;
}
