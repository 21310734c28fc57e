//! Hostile and careless clients: every limit, every odd byte sequence, dead and slow peers,
//! panics and shutdown. None may crash the server, stall it, or cost another client its locks.

mod common;

use std::time::Duration;

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Asserts that a fresh client is served and that `name` is still held by someone.
async fn still_serving_and_held(server: &TestServer, name: &str) {
    let mut probe = server.connect().await;
    probe
        .check(
            &format!("i {name}\ng {name}\n"),
            "1 Locked\n0 Cannot Get Lock\n",
        )
        .await;
}

async fn max_connections_refuses_the_next_one_and_serves_the_rest(shards: u16) {
    let server = TestServer::start_with(shards, |c| c.max_connections = 3);
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let mut c = server.connect().await;
    a.check("g mine\n", "1 Got Lock\n").await;
    let mut refused = server.connect().await;
    refused.expect("0 Too Many Connections\n").await;
    refused.expect_closed().await;
    b.check("i mine\n", "1 Locked\n").await;
    c.check("g mine\n", "0 Cannot Get Lock\n").await;
    drop(c);
    let deadline = std::time::Instant::now() + common::REPLY_TIMEOUT;
    while b.stats().await["connections"] != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "c's place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut d = server.connect().await;
    d.check("i mine\n", "1 Locked\n").await;
}

async fn max_locks_per_connection_is_exact_across_shards(shards: u16) {
    let server = TestServer::start_with(shards, |c| c.max_locks_per_conn = 5);
    let mut a = server.connect().await;
    let mut batch = String::new();
    let mut expected = String::new();
    for i in 0..4 {
        batch.push_str(&format!("g limit-{i}\n"));
        expected.push_str("1 Got Lock\n");
    }
    batch.push_str("sg pool\ng limit-4\nsg pool2\ng limit-0\nsg pool\n");
    expected.push_str("1 Got Shared Lock\n0 Lock Limit Reached\n0 Lock Limit Reached\n1 Got Lock\n1 Got Shared Lock\n");
    a.check(&batch, &expected).await;
    a.check("r limit-0\ng limit-4\n", "1 Released Lock\n1 Got Lock\n")
        .await;
    a.check(
        "sr pool\nsg pool2\n",
        "1 Released Shared Lock\n1 Got Shared Lock\n",
    )
    .await;
    // The limit is per connection: another one has its own.
    let mut b = server.connect().await;
    b.check("g other\n", "1 Got Lock\n").await;
}

async fn a_client_that_never_reads_is_cut_off_at_the_unsent_limit(shards: u16) {
    let server = TestServer::start_with(shards, |c| {
        c.max_unsent_bytes = 64 * 1024;
        c.write_timeout = 0;
    });
    let mut hog = server.connect().await;
    hog.check("g hog-lock\n", "1 Got Lock\n").await;
    let mut keeper = server.connect().await;
    keeper.check("g keeper-lock\n", "1 Got Lock\n").await;
    // `q` answers ~400 bytes for 2 bytes sent: keep sending, never read.
    let flood = "q\n".repeat(10_000);
    let mut cut_off = false;
    for _ in 0..500 {
        if tokio::time::timeout(
            Duration::from_secs(5),
            hog.stream.write_all(flood.as_bytes()),
        )
        .await
        .map_or(true, |r| r.is_err())
        {
            cut_off = true;
            break;
        }
    }
    assert!(
        cut_off,
        "the server kept buffering for a client that never reads"
    );
    server
        .wait_for_stats("the hog's lock orphaned", |s| s["orphans"] == 1)
        .await;
    still_serving_and_held(&server, "keeper-lock").await;
    keeper.check("i hog-lock\n", "0 Not Locked\n").await;
}

async fn a_stalled_reader_is_closed_after_the_write_timeout(shards: u16) {
    let server = TestServer::start_with(shards, |c| c.write_timeout = 1);
    let mut slow = server.connect().await;
    slow.check("g slow-lock\n", "1 Got Lock\n").await;
    // Enough replies to fill both socket buffers, then never read.
    let flood = "q\n".repeat(20_000);
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        slow.stream.write_all(flood.as_bytes()),
    )
    .await;
    server
        .wait_for_stats("the stalled reader's lock orphaned", |s| {
            s["orphans"] == 1 && s["locks"] == 0
        })
        .await;
}

async fn idle_connections_close_only_when_asked_to(shards: u16) {
    let server = TestServer::start_with(shards, |c| c.idle_timeout = 1);
    let mut idle = server.connect().await;
    idle.check("g idle-lock\n", "1 Got Lock\n").await;
    idle.expect_closed().await;
    server
        .wait_for_stats("the idle lock orphaned", |s| {
            s["orphans"] == 1 && s["locks"] == 0
        })
        .await;
}

async fn nul_bytes_and_invalid_utf8_are_names_like_any_other(shards: u16) {
    let server = TestServer::start(shards);
    let mut a = server.connect().await;
    a.send(b"g \0\0\ng \xc3\x28\ng a\0b\n\0\n").await;
    a.expect("1 Got Lock\n1 Got Lock\n1 Got Lock\n0 Invalid Command\n")
        .await;
    a.send(b"dump\n").await;
    let id = a.id();
    let mut expected = b"map[\0\0:".to_vec();
    expected.extend_from_slice(id.as_bytes());
    expected.extend_from_slice(b" a\0b:");
    expected.extend_from_slice(id.as_bytes());
    expected.extend_from_slice(b" \xc3\x28:");
    expected.extend_from_slice(id.as_bytes());
    expected.extend_from_slice(b"]\n");
    a.expect(expected).await;
}

async fn a_lone_carriage_return_is_whitespace(shards: u16) {
    let server = TestServer::start(shards);
    let mut a = server.connect().await;
    a.check("g cr\rname\ni cr name\n\r\n", "1 Got Lock\n1 Locked\n")
        .await;
}

async fn endless_input_without_a_newline_is_refused_early(shards: u16) {
    let server = TestServer::start(shards);
    let mut keeper = server.connect().await;
    keeper.check("g keep\n", "1 Got Lock\n").await;
    let mut flood = server.connect().await;
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    // Up to 100 MB; the server gives up after its line limit (1 MiB by default).
    while sent < 100 << 20 {
        match tokio::time::timeout(Duration::from_secs(5), flood.stream.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            _ => break,
        }
    }
    assert!(
        sent < 100 << 20,
        "the server swallowed 100 MB without a newline"
    );
    flood.expect("0 Line Too Long\n").await;
    still_serving_and_held(&server, "keep").await;
}

async fn a_million_pipelined_commands_are_all_answered(shards: u16) {
    let server = TestServer::start(shards);
    let a = server.connect().await;
    let (mut read, mut write) = tokio::io::split(a.stream);
    const N: usize = 1_000_000;
    let writer = tokio::spawn(async move {
        let batch = "i pipelined\n".repeat(10_000);
        for _ in 0..N / 10_000 {
            write.write_all(batch.as_bytes()).await.unwrap();
        }
        write
    });
    let expected = b"0 Not Locked\n";
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let mut carry = 0usize;
    while total < N * expected.len() {
        let n = tokio::time::timeout(Duration::from_secs(60), read.read(&mut buf[carry..]))
            .await
            .expect("replies keep coming")
            .unwrap();
        assert!(n > 0, "closed after {} replies", total / expected.len());
        let have = carry + n;
        let whole = have - have % expected.len();
        for reply in buf[..whole].chunks(expected.len()) {
            assert_eq!(reply, expected);
        }
        buf.copy_within(whole..have, 0);
        carry = have - whole;
        total += whole;
    }
    let _write = writer.await.unwrap();
}

async fn a_half_closed_client_still_gets_every_reply(shards: u16) {
    let server = TestServer::start(shards);
    let mut a = server.connect().await;
    let batch: String = (0..1000).map(|i| format!("g half-{i}\n")).collect();
    a.send(batch).await;
    a.stream.shutdown().await.unwrap();
    a.expect("1 Got Lock\n".repeat(1000)).await;
    a.expect_closed().await;
    server
        .wait_for_stats("half-closed client's locks orphaned", |s| {
            s["orphans"] == 1000
        })
        .await;
}

async fn a_panicking_connection_is_closed_and_its_locks_orphaned(shards: u16) {
    let server = TestServer::start_with(shards, |c| c.panic_on_line = Some(b"boom".to_vec()));
    let mut keeper = server.connect().await;
    keeper.check("g keep\n", "1 Got Lock\n").await;
    let mut victim = server.connect().await;
    victim
        .check(
            "g victim-1\ng victim-2\nsg victim-s\n",
            "1 Got Lock\n1 Got Lock\n1 Got Shared Lock\n",
        )
        .await;
    victim.send("boom\n").await;
    victim.expect_closed().await;
    server
        .wait_for_stats("the panicked connection's locks orphaned", |s| {
            s["orphans"] == 2 && s["shared_orphans"] == 1 && s["locks"] == 1
        })
        .await;
    // The shard thread lives on: every shard still serves.
    let mut after = server.connect().await;
    let batch: String = (0..64).map(|i| format!("g after-{i}\n")).collect();
    after.check(&batch, &"1 Got Lock\n".repeat(64)).await;
    still_serving_and_held(&server, "keep").await;
}

async fn a_million_lock_disconnect_does_not_stall_other_clients(shards: u16) {
    let server = TestServer::start(shards);
    let mut big = server.connect().await;
    const LOCKS: usize = 200_000;
    for chunk in 0..LOCKS / 10_000 {
        let batch: String = (0..10_000)
            .map(|i| format!("g mass-{chunk}-{i}\n"))
            .collect();
        big.check(&batch, &"1 Got Lock\n".repeat(10_000)).await;
    }
    let mut other = server.connect().await;
    other.check("g unrelated\n", "1 Got Lock\n").await;
    drop(big);
    // Served while the release runs (no timing is asserted; only that it is answered and
    // correct throughout).
    let mut answered = 0;
    loop {
        other.check("i unrelated\n", "1 Locked\n").await;
        answered += 1;
        let stats = server.stats();
        if stats.orphans == LOCKS as u64 {
            assert_eq!(stats.locks, 1);
            break;
        }
    }
    assert!(answered >= 1);
}

async fn many_holders_resetting_at_once_release_everything_exactly_once(shards: u16) {
    // A hundred holders vanish at once while another client keeps working. Every lock they
    // held is released once, the waiters behind their locks are served in order, and the
    // counters add up; no timing is asserted.
    const HOLDERS: usize = 100;
    const OWN: usize = 300;
    const SHARED: usize = 50;
    const CONTESTED: usize = 20;
    let server = TestServer::start(shards);
    let mut holders = Vec::new();
    for c in 0..HOLDERS {
        let mut holder = server.connect().await;
        let mut batch: String = (0..OWN).map(|i| format!("g h{c}-{i}\n")).collect();
        let mut replies = "1 Got Lock\n".repeat(OWN);
        for j in 0..SHARED {
            batch.push_str(&format!("sg common-{j}\n"));
            replies.push_str(&format!("{} Got Shared Lock\n", c + 1));
        }
        if c < CONTESTED {
            batch.push_str(&format!("g contested-{c}\n"));
            replies.push_str("1 Got Lock\n");
        }
        holder.check(&batch, &replies).await;
        holders.push(holder);
    }
    // Queued first for each contested lock: a holder that is about to vanish too.
    for (k, holder) in holders[CONTESTED..2 * CONTESTED].iter_mut().enumerate() {
        holder.send(format!("gw 60000 contested-{k}\n")).await;
    }
    let queued = |n: u64| move |s: &std::collections::BTreeMap<String, u64>| s["lock_waiters"] == n;
    server
        .wait_for_stats("the vanishing waiters queued", queued(CONTESTED as u64))
        .await;
    // Waits for a slot of a shared lock every holder holds.
    let mut shared_waiter = server.connect().await;
    shared_waiter
        .send(format!("sgw 60000 {HOLDERS} common-0\n"))
        .await;
    server
        .wait_for_stats("the shared waiter queued", queued(CONTESTED as u64 + 1))
        .await;
    // Then two live waiters per contested lock, the first queued before the second.
    let mut firsts = Vec::new();
    let mut seconds = Vec::new();
    for (round, waiters) in [&mut firsts, &mut seconds].into_iter().enumerate() {
        for k in 0..CONTESTED {
            let mut waiter = server.connect().await;
            waiter.send(format!("gw 60000 contested-{k}\n")).await;
            waiters.push(waiter);
        }
        let n = ((round + 2) * CONTESTED + 1) as u64;
        server
            .wait_for_stats("live waiters queued", queued(n))
            .await;
    }
    let mut other = server.connect().await;
    other.check("g mine\n", "1 Got Lock\n").await;

    for holder in holders {
        holder.reset();
    }
    // Meanwhile the other client is served, and a lock of a departed holder stays held until
    // its release has happened; then it can be taken again.
    let mut retaken = false;
    for _ in 0..100_000 {
        other.send("i mine\ng h5-7\n").await;
        other.expect("1 Locked\n").await;
        match other.line().await.as_str() {
            "1 Got Lock\n" => {
                retaken = true;
                break;
            }
            "0 Cannot Get Lock\n" => tokio::task::yield_now().await,
            reply => panic!("unexpected reply {reply:?}"),
        }
    }
    assert!(retaken, "h5-7 was never released");
    let id = other.id();
    other.check("d h5-7\n", &format!("h5-7: {id}\n")).await;

    for waiter in &mut firsts {
        waiter.expect("1 Got Lock\n").await;
    }
    let granted = shared_waiter.line().await;
    assert!(granted.ends_with(" Got Shared Lock\n"), "{granted:?}");
    server
        .wait_for_stats("every departed lock released", |s| {
            s["shared_orphans"] == (HOLDERS * SHARED) as u64
                && s["locks"] == CONTESTED as u64 + 2
                && s["shared_locks"] == 1
                && s["connections"] == 2 * CONTESTED as u64 + 3
        })
        .await;
    let stats = other.stats().await;
    // A contested lock granted to a waiter that was vanishing too is orphaned once more: each
    // such grant adds exactly one orphan.
    let to_departed = stats["lock_waits_granted"] - (CONTESTED as u64 + 1);
    assert_eq!(
        stats["orphans"],
        (HOLDERS * OWN + CONTESTED) as u64 + to_departed,
        "{stats:?}"
    );
    assert_eq!(stats["lock_waits_started"], 3 * CONTESTED as u64 + 1);
    assert_eq!(stats["lock_waits_timed_out"], 0);
    assert_eq!(stats["lock_waiters"], CONTESTED as u64);
    // The second waiter of each contested lock is next in line.
    for (k, (first, second)) in firsts.iter_mut().zip(&mut seconds).enumerate() {
        first
            .check(&format!("r contested-{k}\n"), "1 Released Lock\n")
            .await;
        second.expect("1 Got Lock\n").await;
    }
    let stats = other.stats().await;
    assert_eq!(stats["lock_waiters"], 0);
    assert_eq!(stats["locks"], CONTESTED as u64 + 2);
    assert_eq!(
        stats["lock_waits_granted"],
        2 * CONTESTED as u64 + 1 + to_departed
    );
}

async fn shutdown_answers_what_was_read_and_closes_cleanly(shards: u16) {
    let server = TestServer::start(shards);
    let mut a = server.connect().await;
    a.check("g before\n", "1 Got Lock\n").await;
    let batch: String = (0..2000).map(|i| format!("g down-{i}\n")).collect();
    a.send(batch).await;
    let stopper = std::thread::spawn(move || drop(server));
    // Whatever was answered is whole lines of the right reply; then the connection ends.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), a.stream.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .ok();
    assert_eq!(
        rest.len() % 11,
        0,
        "a torn reply: {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(rest.chunks(11).all(|r| r == b"1 Got Lock\n"));
    stopper.join().unwrap();
}

async fn a_flood_of_listings_is_cut_off_at_the_unsent_limit(shards: u16) {
    // Listings a client asked for are served at its pace, so one that asks for a thousand and
    // never reads them is closed by the write timeout, with no more than the unread-reply
    // limit (and the listing in hand) buffered meanwhile.
    let server = TestServer::start_with(shards, |c| {
        c.max_unsent_bytes = 64 * 1024;
        c.write_timeout = 1;
    });
    let mut holder = server.connect().await;
    let batch: String = (0..2000).map(|i| format!("g listed-{i:05}\n")).collect();
    holder.check(&batch, &"1 Got Lock\n".repeat(2000)).await;
    // Each `d` answers ~50 KB; a thousand of them, never read, must not pile up.
    let mut flood = server.connect().await;
    flood.send("d\n".repeat(1024)).await;
    // The holder, the flood and the connection asking: the flood's is closed.
    server
        .wait_for_stats("the flood closed at the write timeout", |s| {
            s["connections"] == 2
        })
        .await;
    still_serving_and_held(&server, "listed-00000").await;
}

for_each_shard_count!(
    a_flood_of_listings_is_cut_off_at_the_unsent_limit,
    max_connections_refuses_the_next_one_and_serves_the_rest,
    max_locks_per_connection_is_exact_across_shards,
    a_client_that_never_reads_is_cut_off_at_the_unsent_limit,
    a_stalled_reader_is_closed_after_the_write_timeout,
    idle_connections_close_only_when_asked_to,
    nul_bytes_and_invalid_utf8_are_names_like_any_other,
    a_lone_carriage_return_is_whitespace,
    endless_input_without_a_newline_is_refused_early,
    a_million_pipelined_commands_are_all_answered,
    a_half_closed_client_still_gets_every_reply,
    a_panicking_connection_is_closed_and_its_locks_orphaned,
    a_million_lock_disconnect_does_not_stall_other_clients,
    many_holders_resetting_at_once_release_everything_exactly_once,
    shutdown_answers_what_was_read_and_closes_cleanly,
);
