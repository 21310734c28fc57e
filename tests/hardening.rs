//! Defects an outside reading of the server proved, each pinned by a test: listings bigger than
//! the unread-reply limit, `q` right after a wait, an over-long line behind pipelined commands,
//! replies before a wait, registered names that would make every listing huge.

mod common;

use common::{Setup, TestServer};

/// Locks held by one connection registered under a long name, so that `d` answers about
/// `rows` × (name + holder) bytes.
async fn hold_a_big_listing(server: &TestServer, rows: usize) -> common::Raw {
    let mut holder = server.connect().await;
    let holder_name = "h".repeat(100);
    holder
        .check(&format!("iam {holder_name}\n"), "1 ok\n")
        .await;
    let batch: String = (0..rows).map(|i| format!("g listed-{i:05}\n")).collect();
    holder.check(&batch, &"1 Got Lock\n".repeat(rows)).await;
    holder
}

async fn a_listing_bigger_than_the_unsent_limit_is_served_with_what_follows_it(setup: Setup) {
    let server = TestServer::start_with(setup, |c| c.max_unsent_bytes = 200_000);
    // 2600 rows of about 123 bytes: ~320 KB, well past the limit.
    let _holder = hold_a_big_listing(&server, 2600).await;
    let mut reader = server.connect().await;
    reader.check("g mine\n", "1 Got Lock\n").await;
    // One write: the listing, and a command pipelined behind it.
    reader.send("d\ni mine\n").await;
    let mut rows = 0;
    loop {
        let line = reader.line().await;
        if line == "1 Locked\n" {
            break;
        }
        assert!(line.contains(": "), "not a listing row: {line:?}");
        rows += 1;
    }
    assert_eq!(rows, 2601);
    // Still connected, still holding its lock.
    reader.check("i mine\n", "1 Locked\n").await;
    let mut other = server.connect().await;
    other.check("g mine\n", "0 Cannot Get Lock\n").await;
    assert_eq!(server.stats().orphans, 0);
}

async fn q_right_after_a_wait_counts_it(setup: Setup) {
    let server = TestServer::start(setup);
    let mut client = server.connect().await;
    for i in 1..=1500u64 {
        client.send(format!("gw 0 granted-{i}\nq\n")).await;
        client.expect("1 Got Lock\n").await;
        let stats = client.read_stats().await;
        assert_eq!(stats["locks"], i, "after grant {i}");
        assert_eq!(stats["lock_waits_granted"], i, "after grant {i}");
    }
    let mut holder = server.connect().await;
    holder.check("g busy\n", "1 Got Lock\n").await;
    for i in 1..=100u64 {
        client.send("gw 1 busy\nq\n").await;
        client.expect("0 Timed Out\n").await;
        let stats = client.read_stats().await;
        assert_eq!(stats["lock_waits_timed_out"], i, "after timeout {i}");
    }
}

async fn replies_before_a_wait_are_sent_before_it_waits(setup: Setup) {
    let server = TestServer::start(setup);
    let mut holder = server.connect().await;
    holder.check("g bb\n", "1 Got Lock\n").await;
    let mut waiter = server.connect().await;
    waiter.send("g aa\ngw 60000 bb\n").await;
    // `g aa` is answered while `gw` still waits (the test would hang here otherwise).
    waiter.expect("1 Got Lock\n").await;
    holder.check("r bb\n", "1 Released Lock\n").await;
    waiter.expect("1 Got Lock\n").await;
}

async fn registered_names_are_bounded(setup: Setup) {
    let server = TestServer::start_with(setup, |c| c.max_name_bytes = 4096);
    let mut client = server.connect().await;
    // A 256 KiB name would make every listing row of this client's locks 256 KiB long.
    let huge = "n".repeat(256 * 1024);
    client
        .check(&format!("iam {huge}\n"), "0 Name Too Long\n")
        .await;
    let longest = "n".repeat(4096);
    client.check(&format!("iam {longest}\n"), "1 ok\n").await;
    client
        .check(&format!("iam {longest}x\n"), "0 Name Too Long\n")
        .await;
    // The refused name left the accepted one in place.
    client.check("g named\n", "1 Got Lock\n").await;
    client
        .check("d named\n", &format!("named: {longest}\n"))
        .await;
}

async fn a_name_in_the_form_of_a_connection_id_is_refused(setup: Setup) {
    let server = TestServer::start_with(setup, |c| c.dump = true);
    let mut victim = server.connect().await;
    let victim_id = victim.id();
    let mut client = server.connect().await;
    client.check("iam honest\n", "1 ok\n").await;
    for id in [
        victim_id.as_str(),
        "127.0.0.1:59210",
        "[::1]:5000",
        "::1:5000",
        "unix:1",
    ] {
        client
            .check(&format!("iam {id}\n"), "0 Name Looks Like An Id\n")
            .await;
    }
    // The refusal left the earlier name in place, and listings show it, not the victim's id.
    client.check("g mine\n", "1 Got Lock\n").await;
    client.check("d mine\n", "mine: honest\n").await;
    client
        .check("me\n", &format!("1 {} honest\n", client.id()))
        .await;
    // Names that merely contain a colon or an address are still fine.
    client.check("iam host.example:80\n", "1 ok\n").await;
    client.check("iam 127.0.0.1\n", "1 ok\n").await;
    victim.check("i mine\n", "1 Locked\n").await;
}

async fn framed_replies_count_their_lines(setup: Setup) {
    let server = TestServer::start_with(setup, |c| c.dump = true);
    let mut client = server.connect().await;
    let me = client.id();
    client.check("g a\ng b\n", "1 Got Lock\n1 Got Lock\n").await;
    // The original form first: no count, and nothing at all for an empty listing.
    client.check("d a\n", &format!("a: {me}\n")).await;
    client.check("framed\n", "1 Framed\n").await;
    client
        .check("d\n", &format!("2 lines\na: {me}\nb: {me}\n"))
        .await;
    client.check("sd\n", "0 lines\n").await;
    client.check("d nobody\n", "0 lines\n").await;
    // One-line replies are as they were.
    client.check("i a\n", "1 Locked\n").await;
    client
        .check("dump\n", &format!("map[a:{me} b:{me}]\n"))
        .await;
    client.send("q\n").await;
    let head = client.line().await;
    let count: usize = head
        .strip_suffix(" lines\n")
        .and_then(|n| n.parse().ok())
        .expect("a count line");
    for _ in 0..count {
        assert!(client.line().await.contains(": "));
    }
    // Nothing more: the next reply is the next command's.
    client.check("i b\n", "1 Locked\n").await;
    // A listing turned off answers one line whose integer says nothing follows.
    let off = TestServer::start_with(setup, |c| c.dump = false);
    let mut client = off.connect().await;
    client.check("framed\nd\n", "1 Framed\n0 disabled\n").await;
}

async fn many_short_lines_in_one_write_or_message_are_each_answered(setup: Setup) {
    // Every line is short; together they are far over the line limit (over a websocket: one
    // message of them, which the line limit does not bound).
    let server = TestServer::start_with(setup, |c| c.max_line_bytes = 64);
    let mut client = server.connect().await;
    client.check("g mine\n", "1 Got Lock\n").await;
    client
        .check(&"i x\n".repeat(500), &"0 Not Locked\n".repeat(500))
        .await;
    client.check("i mine\n", "1 Locked\n").await;
}

async fn q_right_after_a_hand_off_counts_the_orphan(setup: Setup) {
    let server = TestServer::start(setup);
    let mut waiter = server.connect().await;
    for i in 1..=100u64 {
        let mut holder = server.connect().await;
        holder.check(&format!("g k{i}\n"), "1 Got Lock\n").await;
        waiter.send(format!("gw 5000 k{i}\nq\n")).await;
        // The holder leaves; its lock goes to the waiter, whose `q` must count the orphan.
        drop(holder);
        waiter.expect("1 Got Lock\n").await;
        let stats = waiter.read_stats().await;
        assert_eq!(stats["orphans"], i, "after hand-off {i}");
        waiter
            .check(&format!("r k{i}\n"), "1 Released Lock\n")
            .await;
    }
}

for_each_transport!(
    many_short_lines_in_one_write_or_message_are_each_answered,
    q_right_after_a_hand_off_counts_the_orphan,
    framed_replies_count_their_lines,
    a_listing_bigger_than_the_unsent_limit_is_served_with_what_follows_it,
    q_right_after_a_wait_counts_it,
    replies_before_a_wait_are_sent_before_it_waits,
    registered_names_are_bounded,
    a_name_in_the_form_of_a_connection_id_is_refused,
);

/// How a byte stream's over-long line is refused (a websocket message is bounded by the
/// library instead).
mod byte_streams {
    use super::common::{self, Setup, TestServer};

    async fn an_over_long_line_is_refused_after_the_commands_before_it(setup: Setup) {
        let server = TestServer::start_with(setup, |c| c.max_line_bytes = 64);
        let mut client = server.connect().await;
        let mut batch: String = (0..10).map(|i| format!("g before-{i}\n")).collect();
        batch.push_str(&"x".repeat(100));
        batch.push('\n');
        client.send(batch).await;
        client
            .expect(format!("{}0 Line Too Long\n", "1 Got Lock\n".repeat(10)))
            .await;
        client.expect_closed().await;
        // They were applied too: the connection's end released all ten.
        server
            .wait_for_stats("the ten locks orphaned", |s| {
                s["orphans"] == 10 && s["locks"] == 0
            })
            .await;
    }

    crate::for_each_byte_stream!(an_over_long_line_is_refused_after_the_commands_before_it);
}

/// How long an unfinished line is kept (a websocket message arrives whole instead).
mod unfinished_lines {
    use std::time::{Duration, Instant};

    use super::common::{self, Setup, TestServer};

    async fn an_unfinished_line_closes_the_connection_after_the_line_timeout(setup: Setup) {
        let server = TestServer::start_with(setup, |c| c.line_timeout = 1);
        let mut slow = server.connect().await;
        slow.check("g held\n", "1 Got Lock\n").await;
        let started = Instant::now();
        // Half a line, and nothing more.
        slow.send("g x").await;
        // Everyone else is served meanwhile, and the slow client keeps its lock until then.
        let mut other = server.connect().await;
        while started.elapsed() < Duration::from_millis(700) {
            other.check("i held\n", "1 Locked\n").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        slow.expect_closed().await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "closed after {took:?}"
        );
        server
            .wait_for_stats("the slow client's lock orphaned", |s| {
                s["orphans"] == 1 && s["locks"] == 0
            })
            .await;
        // The half line was never a command: nothing counted as invalid; the close is counted
        // as the line timeout's.
        assert_eq!(server.stats().invalid_commands, 0);
        let line_timeout = glockd::stats::CloseReason::LineTimeout as usize;
        assert_eq!(server.outcomes().connections_closed_by[line_timeout], 1);
        other.check("g x\n", "1 Got Lock\n").await;
    }

    async fn a_line_that_finishes_in_time_keeps_the_connection(setup: Setup) {
        let server = TestServer::start_with(setup, |c| c.line_timeout = 1);
        let mut client = server.connect().await;
        // Each line is finished well within the timeout, but an unfinished one is always
        // waiting: the clock starts again with each new line.
        client.send("g a").await;
        for i in 0..8 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            client.send(format!("\ni a{i}")).await;
            let expected = if i == 0 {
                "1 Got Lock\n"
            } else {
                "0 Not Locked\n"
            };
            client.expect(expected).await;
        }
        client.check("\ni a\n", "0 Not Locked\n1 Locked\n").await;
    }

    crate::for_each_byte_stream!(
        an_unfinished_line_closes_the_connection_after_the_line_timeout,
        a_line_that_finishes_in_time_keeps_the_connection,
    );
}

/// How long a websocket client may take over its handshake, and over one message.
mod websocket_timeouts {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_websocket_message_left_unfinished_closes_the_connection_after_the_line_timeout() {
        let setup = Setup {
            shards: 1,
            transport: Transport::Ws,
        };
        let server = TestServer::start_with(setup, |c| c.line_timeout = 1);
        let addr = server.ws_addr.expect("websocket door");
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(
            b"GET / HTTP/1.1\r\nHost: glockd\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("handshake request");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            slow.read_exact(&mut byte)
                .await
                .expect("handshake response");
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{:?}",
            String::from_utf8_lossy(&head)
        );
        // A binary frame announcing 1000 bytes, masked (as clients must), with only 10 sent.
        let started = Instant::now();
        slow.write_all(&[0x82, 0x80 | 126, 0x03, 0xE8, 0, 0, 0, 0])
            .await
            .expect("frame head");
        slow.write_all(b"g x g x g ").await.expect("part of it");
        // Others are served meanwhile.
        let mut other = server.connect().await;
        while started.elapsed() < Duration::from_millis(700) {
            other.check("i x\n", "0 Not Locked\n").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest))
            .await
            .expect("closed in time");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "closed after {took:?}"
        );
        other.check("g x\n", "1 Got Lock\n").await;
    }

    use super::common::{Setup, TestServer, Transport};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_websocket_client_that_never_finishes_its_handshake_is_closed() {
        let setup = Setup {
            shards: 1,
            transport: Transport::Ws,
        };
        let server = TestServer::start_with(setup, |c| c.ws_handshake_timeout = 1);
        let addr = server.ws_addr.expect("websocket door");
        let started = Instant::now();
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // Others still get in and are served.
        let mut other = server.connect().await;
        other.check("i x\n", "0 Not Locked\n").await;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut rest))
            .await
            .expect("closed in time");
        assert!(read.is_ok() || rest.is_empty());
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "closed after {took:?}"
        );
    }
}

/// `--max-connections-per-ip`: one address cannot take every place.
mod per_ip {
    use std::time::{Duration, Instant};

    use super::common::{Raw, Setup, TestServer, Transport, REPLY_TIMEOUT};

    fn limited(setup: Setup) -> TestServer {
        TestServer::start_with(setup, |c| {
            c.max_connections_per_ip = 3;
            c.per_ip_exempt_loopback = false;
        })
    }

    /// Connects over TCP until admitted (a place freed by a close is given back right after
    /// the close is seen, not at once).
    async fn connect_when_admitted(server: &TestServer) -> Raw {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let mut client = Raw::connect(server.addr).await;
            client.send("i probe\n").await;
            if client.line().await == "0 Not Locked\n" {
                return client;
            }
            assert!(Instant::now() < deadline, "no place was freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn the_fourth_connection_from_one_address_is_refused(setup: Setup) {
        let server = limited(setup);
        let mut a = Raw::connect(server.addr).await;
        let mut b = Raw::connect(server.addr).await;
        let c = Raw::connect(server.addr).await;
        a.check("g mine\n", "1 Got Lock\n").await;
        let mut refused = Raw::connect(server.addr).await;
        refused.expect("0 Too Many Connections\n").await;
        refused.expect_closed().await;
        // The websocket door counts the same address too, and refuses in HTTP.
        let ws = server.ws_addr.expect("websocket door");
        let error = tokio_tungstenite::connect_async(format!("ws://{ws}/"))
            .await
            .expect_err("refused");
        assert!(error.to_string().contains("503"), "{error}");
        b.check("i mine\n", "1 Locked\n").await;
        // One closing frees a place.
        drop(c);
        let mut d = connect_when_admitted(&server).await;
        d.check("g mine\n", "0 Cannot Get Lock\n").await;
        assert_eq!(server.stats().connections, 3);
    }

    async fn loopback_is_exempt_by_default(setup: Setup) {
        let server = TestServer::start_with(setup, |c| c.max_connections_per_ip = 2);
        let mut clients = Vec::new();
        for _ in 0..5 {
            let mut client = Raw::connect(server.addr).await;
            client.check("i x\n", "0 Not Locked\n").await;
            clients.push(client);
        }
    }

    mod tcp_1 {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_fourth_connection_from_one_address_is_refused() {
            super::the_fourth_connection_from_one_address_is_refused(super::setup(1)).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn loopback_is_exempt_by_default() {
            super::loopback_is_exempt_by_default(super::setup(1)).await
        }
    }

    mod tcp_4 {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_fourth_connection_from_one_address_is_refused() {
            super::the_fourth_connection_from_one_address_is_refused(super::setup(4)).await
        }
    }

    /// TCP for the test connections, with the websocket door open too.
    fn setup(shards: u16) -> Setup {
        Setup {
            shards,
            transport: Transport::Ws,
        }
    }
}
