//! The commands beyond the original: waiting for a lock (`gw`, `sgw`), the atomic semaphore
//! (`sgl`), fencing tokens (`gt`, `t`), the GCRA rate limit (`rl`) and the holders listing
//! (`h`). Each runs with 1 shard and with 4.

mod common;

use std::time::Duration;

use common::{Setup, TestServer};

async fn waiters_are_served_first_come_first_served(setup: Setup) {
    let server = TestServer::start(setup);
    let mut holder = server.connect().await;
    holder.check("g queue\n", "1 Got Lock\n").await;
    // Three waiters, queued in a known order.
    let mut waiters = Vec::new();
    for n in 0..3 {
        let mut waiter = server.connect().await;
        waiter.send("gw 20000 queue\n").await;
        server
            .wait_for_stats("the waiter queued", |s| s["lock_waiters"] == n + 1)
            .await;
        waiters.push(waiter);
    }
    holder.check("r queue\n", "1 Released Lock\n").await;
    for (n, waiter) in waiters.iter_mut().enumerate() {
        waiter.expect("1 Got Lock\n").await;
        // Nobody else got it meanwhile.
        holder.check("g queue\n", "0 Cannot Get Lock\n").await;
        if n < 2 {
            waiter.check("r queue\n", "1 Released Lock\n").await;
        }
    }
    let stats = server.client().await.stats().await.unwrap();
    assert_eq!(stats["lock_waits_started"], 3);
    assert_eq!(stats["lock_waits_granted"], 3);
    assert_eq!(stats["lock_waiters"], 0);
}

async fn a_wait_times_out_and_later_commands_wait_behind_it(setup: Setup) {
    let server = TestServer::start(setup);
    let mut holder = server.connect().await;
    holder.check("g busy\n", "1 Got Lock\n").await;
    let mut waiter = server.connect().await;
    // The reply to `i other` comes only after the wait is decided.
    waiter
        .check(
            "gw 150 busy\ni other\ng free\n",
            "0 Timed Out\n0 Not Locked\n1 Got Lock\n",
        )
        .await;
    // A free lock is granted at once.
    waiter.check("gw 1 free2\n", "1 Got Lock\n").await;
    let stats = server.client().await.stats().await.unwrap();
    assert_eq!(stats["lock_waits_timed_out"], 1);
    assert_eq!(stats["lock_waiters"], 0);
}

async fn a_waiter_that_disconnects_leaves_the_queue(setup: Setup) {
    let server = TestServer::start(setup);
    let mut holder = server.connect().await;
    holder.check("g leave\n", "1 Got Lock\n").await;
    let mut leaver = server.connect().await;
    leaver.send("gw 60000 leave\n").await;
    server
        .wait_for_stats("queued", |s| s["lock_waiters"] == 1)
        .await;
    let mut stayer = server.connect().await;
    stayer.send("gw 60000 leave\n").await;
    server
        .wait_for_stats("queued", |s| s["lock_waiters"] == 2)
        .await;
    leaver.reset();
    server
        .wait_for_stats("the leaver gone", |s| s["lock_waiters"] == 1)
        .await;
    holder.check("r leave\n", "1 Released Lock\n").await;
    stayer.expect("1 Got Lock\n").await;
    let mut probe = server.connect().await;
    let id = stayer.id();
    probe.check("d leave\n", &format!("leave: {id}\n")).await;
}

async fn an_orphaned_holder_hands_the_lock_to_the_first_waiter(setup: Setup) {
    let server = TestServer::start(setup);
    let mut holder = server.connect().await;
    holder
        .check("g handover\nsg pool\n", "1 Got Lock\n1 Got Shared Lock\n")
        .await;
    let mut waiter = server.connect().await;
    waiter.send("gw 60000 handover\n").await;
    server
        .wait_for_stats("queued", |s| s["lock_waiters"] == 1)
        .await;
    holder.reset();
    waiter.expect("1 Got Lock\n").await;
    // A waiter for a shared slot is let in when a holder goes, too.
    let mut a = server.connect().await;
    a.check("sgl 1 slot\n", "1 Got Shared Lock\n").await;
    let mut b = server.connect().await;
    b.check("sgl 1 slot\n", "0 Shared Lock Full\n").await;
    b.send("sgw 60000 1 slot\n").await;
    server
        .wait_for_stats("queued", |s| s["lock_waiters"] == 1)
        .await;
    drop(a);
    b.expect("1 Got Shared Lock\n").await;
}

async fn the_semaphore_takes_a_slot_only_below_its_limit(setup: Setup) {
    let server = TestServer::start(setup);
    let mut conns = Vec::new();
    for expected in [
        "1 Got Shared Lock\n",
        "2 Got Shared Lock\n",
        "0 Shared Lock Full\n",
    ] {
        let mut c = server.connect().await;
        c.check("sgl 2 sem\n", expected).await;
        conns.push(c);
    }
    // A holder asking again keeps its one slot.
    conns[0]
        .check(
            "sgl 2 sem\nsi sem\n",
            "2 Got Shared Lock\n2 Shared Locked\n",
        )
        .await;
    conns[0].check("sr sem\n", "1 Released Shared Lock\n").await;
    conns[2].check("sgl 2 sem\n", "2 Got Shared Lock\n").await;
    // Bad arguments get a usage line.
    conns[2].check("sgl x sem\nsgl\ngw\ngw soon x\nsgw 5 x y\n", "0 Usage: sgl LIMIT NAME\n0 Usage: sgl LIMIT NAME\n0 Usage: gw MS NAME\n0 Usage: gw MS NAME\n0 Usage: sgw MS LIMIT NAME\n").await;
}

async fn fencing_tokens_only_grow(setup: Setup) {
    let server = TestServer::start(setup);
    let mut a = server.client().await;
    let mut b = server.client().await;
    let mut last = 0;
    for round in 0..20 {
        let first = a.get_token("fenced").await.unwrap().expect("granted");
        assert!(first > last, "round {round}: {first} after {last}");
        assert_eq!(a.token("fenced").await.unwrap(), Some(first));
        // Re-getting a held lock is the same grant: the same token.
        assert_eq!(a.get_token("fenced").await.unwrap(), Some(first));
        assert_eq!(b.get_token("fenced").await.unwrap(), None);
        assert!(a.release("fenced").await.unwrap());
        assert_eq!(b.token("fenced").await.unwrap(), None);
        let second = b.get_token("fenced").await.unwrap().expect("granted");
        assert!(second > first);
        // Orphaning, then a new grant through `g`: still larger.
        drop(b);
        b = server.client().await;
        let deadline = std::time::Instant::now() + common::REPLY_TIMEOUT;
        while !a.get("fenced").await.unwrap() {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let third = a.token("fenced").await.unwrap().expect("held");
        assert!(third > second);
        assert!(a.release("fenced").await.unwrap());
        last = third;
    }
}

async fn rate_limits_allow_bursts_then_refuse(setup: Setup) {
    let server = TestServer::start(setup);
    let mut c = server.client().await;
    // 4 requests a minute, bursts of 2 more: 3 at once, then refused for ~15 s.
    for remaining in [2, 1, 0] {
        let d = c.rate_limit("api key", 2, 4, 60_000, 1).await.unwrap();
        assert!(d.allowed);
        assert_eq!((d.limit, d.remaining), (3, remaining));
    }
    let d = c.rate_limit("api key", 2, 4, 60_000, 1).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.remaining, 0);
    assert!((14_000..=15_000).contains(&d.retry_after_ms), "{d:?}");
    assert!((44_000..=45_000).contains(&d.reset_after_ms), "{d:?}");
    // More than the limit at once can never pass.
    let d = c.rate_limit("other", 2, 4, 60_000, 4).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.retry_after_ms, -1);
    let mut raw = server.connect().await;
    raw.check("rl nope\nrl n 1 0 1000\n", "0 Usage: rl NAME BURST COUNT PERIOD_MS [QUANTITY]\n0 Usage: rl NAME BURST COUNT PERIOD_MS [QUANTITY]\n").await;
    // Well formed, but past a limit: the usage line says which.
    raw.check(
        "rl day 0 1 86400001\ngw 3600001 x\nsgw 3600001 2 y\n",
        "0 Usage: rl NAME BURST COUNT PERIOD_MS [QUANTITY] (a full refill, PERIOD_MS x \
         (BURST + 1) / COUNT, at most 86400000 ms)\n\
         0 Usage: gw MS NAME (MS at most 3600000, -max-wait-ms)\n\
         0 Usage: sgw MS LIMIT NAME (MS at most 3600000, -max-wait-ms)\n",
    )
    .await;
    let stats = c.stats().await.unwrap();
    assert_eq!(stats["rate_limit_allowed"], 3);
    assert_eq!(stats["rate_limit_limited"], 2);
}

async fn holders_are_listed_with_their_age_and_waiters(setup: Setup) {
    let server = TestServer::start(setup);
    let mut holder = server.connect().await;
    holder
        .check(
            "iam builder\ng job\nsg pool\n",
            "1 ok\n1 Got Lock\n1 Got Shared Lock\n",
        )
        .await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut waiter = server.connect().await;
    waiter.send("gw 60000 job\n").await;
    server
        .wait_for_stats("queued", |s| s["lock_waiters"] == 1)
        .await;
    let mut probe = server.connect().await;
    probe.send("h job\nme\n").await;
    let holder_line = probe.line().await;
    let waiter_line = probe.line().await;
    let (hid, wid) = (holder.id(), waiter.id());
    let age = |line: &str, prefix: &str| -> u64 {
        let rest = line
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{line:?} lacks {prefix:?}"));
        rest.split("ms").next().unwrap().parse().unwrap()
    };
    assert!(holder_line.ends_with(" builder\n"), "{holder_line:?}");
    assert!(age(&holder_line, &format!("job: holder {hid} ")) >= 30);
    assert!(
        waiter_line.ends_with(&format!(" {wid}\n")),
        "{waiter_line:?}"
    );
    age(&waiter_line, &format!("job: waiter {wid} "));
    assert!(probe.line().await.starts_with("1 "));
    probe.send("h pool\nme\n").await;
    assert!(probe
        .line()
        .await
        .starts_with(&format!("pool: shared-holder {hid} ")));
    assert!(probe.line().await.starts_with("1 "));
}

async fn a_shared_waiter_is_not_held_back_by_the_one_ahead(setup: Setup) {
    let server = TestServer::start(setup);
    let mut holder = server.connect().await;
    holder.check("sg sem1\n", "1 Got Shared Lock\n").await;
    let mut strict = server.connect().await;
    strict.send("sgw 20000 1 sem1\n").await;
    server
        .wait_for_stats("queued", |s| s["lock_waiters"] == 1)
        .await;
    // The head of the line (limit 1) cannot be served; the next one (limit 5) fits at once.
    let mut lenient = server.connect().await;
    lenient
        .check("sgw 20000 5 sem1\n", "2 Got Shared Lock\n")
        .await;
    // The head leaves the queue when it goes.
    strict.reset();
    server
        .wait_for_stats("the strict waiter gone", |s| s["lock_waiters"] == 0)
        .await;
}

async fn a_long_wait_is_not_idleness(setup: Setup) {
    let server = TestServer::start_with(setup, |c| c.idle_timeout = 1);
    let mut holder = server.connect().await;
    holder.check("g slow\n", "1 Got Lock\n").await;
    let mut waiter = server.connect().await;
    waiter.send("gw 10000 slow\n").await;
    // The waiter waits longer than the idle timeout; the holder stays busy meanwhile.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        holder.check("i slow\n", "1 Locked\n").await;
    }
    holder.check("r slow\n", "1 Released Lock\n").await;
    waiter.expect("1 Got Lock\n").await;
    // Still connected and holding it right after the grant.
    let mut probe = server.connect().await;
    probe.check("i slow\n", "1 Locked\n").await;
    waiter.check("i slow\n", "1 Locked\n").await;
}

for_each_shard_count_setup!(
    a_shared_waiter_is_not_held_back_by_the_one_ahead,
    a_long_wait_is_not_idleness,
    waiters_are_served_first_come_first_served,
    a_wait_times_out_and_later_commands_wait_behind_it,
    a_waiter_that_disconnects_leaves_the_queue,
    an_orphaned_holder_hands_the_lock_to_the_first_waiter,
    the_semaphore_takes_a_slot_only_below_its_limit,
    fencing_tokens_only_grow,
    rate_limits_allow_bursts_then_refuse,
    holders_are_listed_with_their_age_and_waiters,
);

mod over_websockets_and_unix {
    use super::common::{self, Setup, Transport};

    async fn waiting_works_through_every_door(setup: Setup) {
        let server = common::TestServer::start(setup);
        let mut holder = server.connect().await;
        holder.check("g door\n", "1 Got Lock\n").await;
        let mut waiter = server.connect().await;
        waiter.send("gw 60000 door\n").await;
        server
            .wait_for_stats("queued", |s| s["lock_waiters"] == 1)
            .await;
        holder.check("r door\n", "1 Released Lock\n").await;
        waiter.expect("1 Got Lock\n").await;
        // A waiter that vanishes never keeps the lock: it leaves the queue at once (reset,
        // close frame) or, when its socket merely closed (which reads like a half-close), is
        // released the moment its grant cannot be delivered.
        let mut leaver = server.connect().await;
        leaver.send("gw 60000 door\n").await;
        server
            .wait_for_stats("queued", |s| s["lock_waiters"] == 1)
            .await;
        leaver.reset();
        waiter.check("r door\n", "1 Released Lock\n").await;
        server
            .wait_for_stats("the lock free again", |s| {
                s["locks"] == 0 && s["lock_waiters"] == 0
            })
            .await;
        let _ = Transport::Tcp;
    }

    crate::for_each_transport!(waiting_works_through_every_door);
}

/// `sgw` waiters with different limits on one name: a waiter that cannot be served yet never
/// holds back one that can, over every door.
mod semaphore_waits {
    use std::time::Duration;

    use super::common::{self, Raw, Setup, Stream, Transport};

    /// Ends the client's sending side (a FIN) and keeps reading: a client that sent its last
    /// command and waits for the answers. Under a websocket, the TCP connection is half-closed
    /// without a close frame.
    fn half_close(raw: &Raw) {
        let socket = match &raw.stream {
            Stream::Tcp(tcp) => socket2::SockRef::from(tcp),
            Stream::Unix(unix) => socket2::SockRef::from(unix),
            Stream::Ws(ws) => socket2::SockRef::from(ws.tcp()),
            Stream::Tls(tls) => socket2::SockRef::from(tls.get_ref().0),
        };
        socket
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    }

    async fn sgw_refuses_a_limit_of_0(setup: Setup) {
        let server = common::TestServer::start(setup);
        let mut c = server.connect().await;
        // A limit of 0 can never be met: refused, never queued.
        c.check("sgw 100 0 pool\n", "0 Usage: sgw MS LIMIT NAME\n")
            .await;
        // `sgl 0` answers (it queues nothing), as it always did.
        c.check("sgl 0 pool\n", "0 Shared Lock Full\n").await;
        // The empty semaphore serves at once.
        c.check("sgw 1000 5 pool\n", "1 Got Shared Lock\n").await;
        let stats = c.stats().await;
        assert_eq!(stats["lock_waiters"], 0);
        assert_eq!(stats["lock_waits_timed_out"], 0);
    }

    async fn a_waiter_that_cannot_be_served_does_not_block_one_that_can(setup: Setup) {
        let server = common::TestServer::start(setup);
        let mut holders = Vec::new();
        for n in 1..=3 {
            let mut h = server.connect().await;
            h.check("sg pool\n", &format!("{n} Got Shared Lock\n"))
                .await;
            holders.push(h);
        }
        // Three holders: a limit of 3 has to wait…
        let mut a = server.connect().await;
        a.send("sgw 60000 3 pool\n").await;
        server
            .wait_for_stats("A queued", |s| s["lock_waiters"] == 1)
            .await;
        // …and a limit of 5 behind it is served at once (queued, it would time out).
        let mut b = server.connect().await;
        b.check("sgw 5000 5 pool\n", "4 Got Shared Lock\n").await;
        // A release lets in a queued waiter that fits, past the one that does not.
        let mut c = server.connect().await;
        c.check("sgw 5000 5 pool\n", "5 Got Shared Lock\n").await;
        let mut d = server.connect().await;
        d.send("sgw 60000 5 pool\n").await;
        server
            .wait_for_stats("D queued", |s| s["lock_waiters"] == 2)
            .await;
        holders[0]
            .check("sr pool\n", "1 Released Shared Lock\n")
            .await;
        d.expect("5 Got Shared Lock\n").await;
        // A keeps its place, and gets its slot once there is room under its limit.
        server
            .wait_for_stats("A still queued", |s| s["lock_waiters"] == 1)
            .await;
        for holder in holders.iter_mut().skip(1).chain([&mut b]) {
            holder.check("sr pool\n", "1 Released Shared Lock\n").await;
        }
        a.expect("3 Got Shared Lock\n").await;
    }

    async fn a_half_closed_waiter_ahead_does_not_block_one_that_can_be_served(setup: Setup) {
        let server = common::TestServer::start(setup);
        let mut holder = server.connect().await;
        holder.check("sg fin\n", "1 Got Shared Lock\n").await;
        // A waits for a slot it cannot have yet (limit 1, one holder), then half-closes: its
        // last command is sent, and it still reads.
        let mut a = server.connect().await;
        a.send("sgw 20000 1 fin\n").await;
        server
            .wait_for_stats("A queued", |s| s["lock_waiters"] == 1)
            .await;
        half_close(&a);
        // Over a byte stream the half-closed waiter stays queued until its turn; a websocket
        // without a close frame, or TLS cut without its close_notify, is a client gone, and
        // leaves the queue at once.
        let websocket = matches!(
            setup.transport,
            Transport::Ws | Transport::Tls | Transport::Wss
        );
        let ahead = if websocket {
            server
                .wait_for_stats("A gone", |s| s["lock_waiters"] == 0)
                .await;
            0
        } else {
            // Give the server time to read the FIN (it shows in no counter).
            tokio::time::sleep(Duration::from_millis(50)).await;
            1
        };
        // A new waiter that fits is served at once…
        let mut b = server.connect().await;
        b.check("sgw 20000 3 fin\n", "2 Got Shared Lock\n").await;
        // …and a queued one that fits is let in by a release, past A.
        let mut c = server.connect().await;
        c.send("sgw 20000 2 fin\n").await;
        server
            .wait_for_stats("C queued", |s| s["lock_waiters"] == ahead + 1)
            .await;
        holder.check("sr fin\n", "1 Released Shared Lock\n").await;
        c.expect("2 Got Shared Lock\n").await;
        server
            .wait_for_stats("only A left", |s| s["lock_waiters"] == ahead)
            .await;
        b.check("sr fin\n", "1 Released Shared Lock\n").await;
        c.check("sr fin\n", "1 Released Shared Lock\n").await;
        if !websocket {
            // A's turn: it reads its grant, then the server closes the connection it
            // half-closed, and the slot is orphaned.
            a.expect("1 Got Shared Lock\n").await;
            a.expect_closed().await;
        }
        server
            .wait_for_stats("nothing held or queued", |s| {
                s["shared_locks"] == 0 && s["lock_waiters"] == 0
            })
            .await;
    }

    async fn waiters_that_fit_keep_their_order(setup: Setup) {
        let server = common::TestServer::start(setup);
        let mut holders = Vec::new();
        for n in 1..=3 {
            let mut h = server.connect().await;
            h.check("sg order\n", &format!("{n} Got Shared Lock\n"))
                .await;
            holders.push(h);
        }
        // Queued in a known order: two with limit 3, one with limit 1 between them.
        let mut waiters = Vec::new();
        for (n, limit) in [(1, 3), (2, 1), (3, 3)] {
            let mut w = server.connect().await;
            w.send(format!("sgw 20000 {limit} order\n")).await;
            server
                .wait_for_stats("queued", |s| s["lock_waiters"] == n)
                .await;
            waiters.push(w);
        }
        let mut probe = server.connect().await;
        // Room for one: the first that fits gets it, and the second does not.
        holders[0]
            .check("sr order\n", "1 Released Shared Lock\n")
            .await;
        waiters[0].expect("3 Got Shared Lock\n").await;
        probe.check("si order\n", "3 Shared Locked\n").await;
        holders[1]
            .check("sr order\n", "1 Released Shared Lock\n")
            .await;
        waiters[2].expect("3 Got Shared Lock\n").await;
        probe.check("si order\n", "3 Shared Locked\n").await;
        server
            .wait_for_stats("limit 1 still waits", |s| s["lock_waiters"] == 1)
            .await;
    }

    crate::for_each_transport!(
        sgw_refuses_a_limit_of_0,
        a_waiter_that_cannot_be_served_does_not_block_one_that_can,
        a_half_closed_waiter_ahead_does_not_block_one_that_can_be_served,
        waiters_that_fit_keep_their_order,
    );
}
