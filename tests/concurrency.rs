//! Many connections at once: orphaning on every kind of disconnect, pipelines checked against a
//! sequential model, mutual exclusion under a race, and exact `q` stats. Each test runs with 1
//! shard and with 4.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use common::model::{Model, VERBS};
use common::{Setup, TestServer};

async fn orphans_on_clean_close(setup: Setup) {
    let server = TestServer::start(setup);
    let mut a = server.connect().await;
    for name in ["a", "b", "c"] {
        a.check(&format!("g {name}\n"), "1 Got Lock\n").await;
    }
    a.check("sg s\nsg t\n", "1 Got Shared Lock\n1 Got Shared Lock\n")
        .await;
    let mut b = server.connect().await;
    b.check("sg s\n", "2 Got Shared Lock\n").await;
    drop(a);
    server
        .wait_for_stats("orphans", |s| {
            s["orphans"] == 3 && s["shared_orphans"] == 2 && s["locks"] == 0
        })
        .await;
    b.check(
        "i a\ni b\ni c\nsi s\nsi t\n",
        "0 Not Locked\n0 Not Locked\n0 Not Locked\n1 Shared Locked\n0 Not Shared Locked\n",
    )
    .await;
    let stats = server.client().await.stats().await.unwrap();
    assert_eq!(stats["shared_locks"], 1);
    assert_eq!(stats["connections"], 2); // b and the stats client
}

async fn orphans_on_reset(setup: Setup) {
    let server = TestServer::start(setup);
    let mut a = server.connect().await;
    a.check(
        "g r1\ng r2\nsg rs\n",
        "1 Got Lock\n1 Got Lock\n1 Got Shared Lock\n",
    )
    .await;
    a.reset();
    server
        .wait_for_stats("orphans after RST", |s| {
            s["orphans"] == 2
                && s["shared_orphans"] == 1
                && s["locks"] == 0
                && s["connections"] == 1
        })
        .await;
    let mut b = server.connect().await;
    b.check("g r1\n", "1 Got Lock\n").await;
}

async fn locks_granted_while_disconnecting_are_orphaned(setup: Setup) {
    let server = TestServer::start(setup);
    for round in 0..20 {
        let mut a = server.connect().await;
        let batch: String = (0..500)
            .map(|i| format!("g race-{round}-{i}\nsg srace-{i}\n"))
            .collect();
        a.send(batch).await;
        // Gone before reading a single reply, while the batch is still being applied.
        a.reset();
    }
    server
        .wait_for_stats("every in-flight lock released", |s| {
            s["locks"] == 0 && s["shared_locks"] == 0 && s["connections"] == 1
        })
        .await;
    let stats = server.client().await.stats().await.unwrap();
    // Whatever was granted was orphaned, and nothing more.
    assert!(stats["orphans"] <= stats["command_g"]);
    let mut c = server.connect().await;
    c.check("d\nsd\ni race-0-0\n", "0 Not Locked\n").await;
}

async fn ten_thousand_pipelined_commands_match_a_sequential_model(setup: Setup) {
    let server = TestServer::start(setup);
    // `me` sends the pipeline; `other` holds some of its names first.
    let mut model = Model::default();
    let mut other = server.connect().await;
    let mut setup = String::new();
    let mut setup_replies = String::new();
    for i in (0..40).step_by(3) {
        setup.push_str(&format!("g k{i}\nsg k{i}\n"));
        setup_replies.push_str(&model.apply("other", "g", &format!("k{i}")));
        setup_replies.push_str(&model.apply("other", "sg", &format!("k{i}")));
    }
    other.check(&setup, &setup_replies).await;

    let mut me = server.connect().await;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut batch = String::new();
    let mut expected = String::new();
    for _ in 0..10_000 {
        let verb = VERBS[(next() % VERBS.len() as u64) as usize];
        let name = format!("k{}", next() % 40);
        batch.push_str(&format!("{verb} {name}\n"));
        expected.push_str(&model.apply("me", verb, &name));
    }
    me.send(batch).await;
    me.expect(expected).await;
}

async fn fifty_connections_racing_for_ten_names_never_share_one(setup: Setup) {
    let server = TestServer::start(setup);
    let holders: Arc<Vec<AtomicUsize>> = Arc::new((0..10).map(|_| AtomicUsize::new(0)).collect());
    let grants = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..50u64 {
        let addr = server.addr;
        let holders = holders.clone();
        let grants = grants.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = glockd::client::Client::connect(addr).await.unwrap();
            for round in 0..100u64 {
                let slot = ((worker * 7 + round * 3) % 10) as usize;
                let name = format!("race-{slot}");
                if client.get(&name).await.unwrap() {
                    let before = holders[slot].fetch_add(1, Ordering::SeqCst);
                    assert_eq!(before, 0, "two holders of {name} at once");
                    grants.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                    holders[slot].fetch_sub(1, Ordering::SeqCst);
                    assert!(
                        client.release(&name).await.unwrap(),
                        "holder could not release {name}"
                    );
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(grants.load(Ordering::Relaxed) > 0);
    let stats = server.client().await.stats().await.unwrap();
    assert_eq!(stats["locks"], 0);
}

async fn q_counts_are_exact(setup: Setup) {
    let server = TestServer::start(setup);
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.check("g x\ng y\nr y\ni x\nsg s\nsi s\nsr s\nnope\nd\n", "1 Got Lock\n1 Got Lock\n1 Released Lock\n1 Locked\n1 Got Shared Lock\n1 Shared Locked\n1 Released Shared Lock\n0 Invalid Command\n")
        .await;
    b.check("sg s\nsg t\n", "1 Got Shared Lock\n1 Got Shared Lock\n")
        .await;
    let aid = a.id();
    // Finish a's `d` (it lists x) before reading stats.
    a.check("me\n", &format!("x: {aid}\n1 {aid} {aid}\n")).await;
    let stats = server.client().await.stats().await.unwrap();
    let expect = [
        ("command_auth", 0),
        ("command_d", 1),
        ("command_dump", 0),
        ("command_framed", 0),
        ("command_g", 2),
        ("command_gt", 0),
        ("command_gw", 0),
        ("command_h", 0),
        ("command_i", 1),
        ("command_iam", 0),
        ("command_me", 1),
        ("command_q", 1),
        ("command_r", 1),
        ("command_rl", 0),
        ("command_sd", 0),
        ("command_sg", 3),
        ("command_sgl", 0),
        ("command_sgw", 0),
        ("command_shards", 0),
        ("command_si", 1),
        ("command_sr", 1),
        ("command_t", 0),
        ("command_who", 0),
        ("connections", 3),
        ("invalid_commands", 1),
        ("lock_waiters", 0),
        ("lock_waits_granted", 0),
        ("lock_waits_started", 0),
        ("lock_waits_timed_out", 0),
        ("locks", 1),
        ("orphans", 0),
        ("rate_limit_allowed", 0),
        ("rate_limit_limited", 0),
        ("shared_locks", 2),
        ("shared_orphans", 0),
    ];
    let got: Vec<(&str, u64)> = stats.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(got, expect);
    drop(b);
    drop(a);
    server
        .wait_for_stats("orphans", |s| {
            s["orphans"] == 1
                && s["shared_orphans"] == 2
                && s["locks"] == 0
                && s["shared_locks"] == 0
                && s["connections"] == 1
        })
        .await;
    assert_eq!(server.stats().connections_total, 4);
}

async fn listings_show_a_departing_holder_by_its_id_until_released(setup: Setup) {
    let server = TestServer::start(setup);
    let mut watcher = server.connect().await;
    for round in 0..50 {
        let mut holder = server.connect().await;
        let id = holder.id();
        let name = format!("departing-{round}");
        holder.check(&format!("g {name}\n"), "1 Got Lock\n").await;
        drop(holder);
        // Either still held by its real id, or gone: never an unknown holder.
        watcher.send(format!("d {name}\nme\n")).await;
        let first = watcher.line().await;
        if first != format!("{name}: {id}\n") {
            assert!(first.starts_with("1 "), "unexpected listing row {first:?}");
        } else {
            let me = watcher.line().await;
            assert!(me.starts_with("1 "), "{me:?}");
        }
    }
}

for_each_transport!(
    orphans_on_clean_close,
    orphans_on_reset,
    locks_granted_while_disconnecting_are_orphaned,
    ten_thousand_pipelined_commands_match_a_sequential_model,
    fifty_connections_racing_for_ten_names_never_share_one,
    q_counts_are_exact,
    listings_show_a_departing_holder_by_its_id_until_released,
);
