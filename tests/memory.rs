//! The memory budget (`-max-memory`) and the default bounds on what one client may store: a
//! full budget refuses new state with `0 Out Of Memory` and nothing else, `rl` makes room by
//! evicting the limiters soonest back to full, and long names and lock hoards meet their
//! limits. Over every door and with one shard and several.

mod common;

use common::{Raw, Setup, TestServer};

/// The smallest budget the flag accepts: about a thousand locks with 1000-byte names.
const BUDGET: u64 = 1 << 20;

/// A name of `len` bytes, told apart by `tag`.
fn name(tag: &str, len: usize) -> String {
    let mut name = format!("{tag}-");
    while name.len() < len {
        name.push('x');
    }
    name
}

/// Sends `lines` in slices (a websocket message holds at most `-max-line-bytes`) and returns
/// the reply to each.
async fn run_all(client: &mut Raw, lines: &[String]) -> Vec<String> {
    let mut replies = Vec::with_capacity(lines.len());
    for slice in lines.chunks(100) {
        let batch: String = slice.iter().map(|l| format!("{l}\n")).collect();
        client.send(batch).await;
        for _ in slice {
            replies.push(client.line().await);
        }
    }
    replies
}

async fn a_full_budget_refuses_new_state_and_serves_everything_else(setup: Setup) {
    let server = TestServer::start_with(setup, |c| {
        c.max_memory = Some(BUDGET);
        c.max_name_bytes = 1 << 20;
    });
    let mut keeper = server.connect().await;
    keeper.check("g keep\n", "1 Got Lock\n").await;
    let mut hoarder = server.connect().await;
    // 1500 locks of 1000-byte names cost about 1.5 MiB: more than the budget holds.
    let gets: Vec<String> = (0..1500)
        .map(|i| format!("g {}", name(&i.to_string(), 1000)))
        .collect();
    let replies = run_all(&mut hoarder, &gets).await;
    let granted = replies.iter().filter(|r| *r == "1 Got Lock\n").count();
    let refused = replies.iter().filter(|r| *r == "0 Out Of Memory\n").count();
    assert_eq!(granted + refused, 1500, "{replies:?}");
    assert!(
        (600..1100).contains(&granted),
        "{granted} locks of about 1 KiB in a 1 MiB budget"
    );
    // Whatever would store something big is refused, and changes nothing.
    let big = name("big", 100_000);
    // (A waiting command is sent last in its batch: what is sent behind one while it runs is
    // bounded at 64 KiB, which two of these names would pass.)
    for batch in [
        format!("g {big}\ngt {big}\nsg {big}\nsgl 5 {big}\nrl {big} 1 1 1000\ngw 0 {big}\n"),
        format!("sgw 0 5 {big}\n"),
    ] {
        let count = batch.lines().count();
        hoarder
            .check(&batch, &"0 Out Of Memory\n".repeat(count))
            .await;
    }
    hoarder
        .check(
            &format!("i {big}\nsi {big}\n"),
            "0 Not Locked\n0 Not Shared Locked\n",
        )
        .await;
    hoarder
        .check(
            &format!("iam {}\n", name("me", 200_000)),
            "0 Out Of Memory\n",
        )
        .await;
    // Releases, inspections, listings and stats keep working; so do locks already held, and
    // the other client's lock stays its own.
    let first = &gets[0][2..];
    hoarder
        .check(
            &format!("i keep\ng keep\ng {first}\nr {first}\n"),
            "1 Locked\n0 Cannot Get Lock\n1 Got Lock\n1 Released Lock\n",
        )
        .await;
    hoarder
        .check("d keep\n", &format!("keep: {}\n", keeper.id()))
        .await;
    let stats = hoarder.stats().await;
    assert_eq!(stats["locks"], granted as u64, "{stats:?}");
    keeper
        .check("g keep\ni keep\n", "1 Got Lock\n1 Locked\n")
        .await;
    // After releasing, there is room again.
    let releases: Vec<String> = replies
        .iter()
        .zip(&gets)
        .skip(1)
        .filter(|(reply, _)| *reply == "1 Got Lock\n")
        .map(|(_, get)| format!("r {}", &get[2..]))
        .collect();
    let released = run_all(&mut hoarder, &releases).await;
    assert!(released.iter().all(|r| r == "1 Released Lock\n"));
    hoarder
        .check(
            &format!("g {big}\nsg {big}\n"),
            "1 Got Lock\n1 Got Shared Lock\n",
        )
        .await;
    keeper.check("r keep\n", "1 Released Lock\n").await;
}

async fn rate_limiters_make_room_by_evicting_those_soonest_back_to_full(setup: Setup) {
    let server = TestServer::start_with(setup, |c| c.max_memory = Some(BUDGET));
    let mut client = server.connect().await;
    // A day's limiter first: it is the last to be back to full capacity.
    client
        .check("rl daily 0 1 86400000\n", "1 1 0 0 86400000\n")
        .await;
    // Then far more hour-long limiters than the budget holds (each about 160 bytes): every
    // one is allowed, older ones making room.
    let hourly: Vec<String> = (0..12_000)
        .map(|i| format!("rl {} 0 1 3600000", name(&format!("h{i}"), 100)))
        .collect();
    let replies = run_all(&mut client, &hourly).await;
    assert!(
        replies.iter().all(|r| r == "1 1 0 0 3600000\n"),
        "{:?}",
        replies.iter().find(|r| *r != "1 1 0 0 3600000\n")
    );
    // The day's limiter kept its state; the first hourly ones were reset by eviction.
    client.send("rl daily 0 1 86400000\n").await;
    let daily = client.line().await;
    assert!(daily.starts_with("0 1 0 "), "{daily}");
    client
        .check(&format!("{}\n", hourly[0]), "1 1 0 0 3600000\n")
        .await;
    // However many names are rate-limited, limiters keep to half the budget: another client
    // still gets new locks, shared locks and waits.
    let mut other = server.connect().await;
    other
        .check(
            "g job\nsg pool\ngw 10 job2\n",
            "1 Got Lock\n1 Got Shared Lock\n1 Got Lock\n",
        )
        .await;
}

async fn long_names_work_up_to_the_limit_and_are_refused_past_it(setup: Setup) {
    let server = TestServer::start_with(setup, |c| c.max_lock_name_bytes = 20_000);
    let mut client = server.connect().await;
    // 16 KiB names, as real clients use, work.
    let long = name("long", 16 << 10);
    client
        .check(
            &format!("g {long}\ni {long}\nsg {long}\nr {long}\n"),
            "1 Got Lock\n1 Locked\n1 Got Shared Lock\n1 Released Lock\n",
        )
        .await;
    let over = name("over", 20_001);
    client
        .check(
            &format!("g {over}\ngw 0 {over}\nsg {over}\nrl {over} 1 1 1000\ni {over}\n"),
            &"0 Name Too Long\n".repeat(5),
        )
        .await;
    for listing in ["d", "sd", "h"] {
        client
            .check(&format!("{listing} {over}\n"), "0 Name Too Long\n")
            .await;
    }
    client.check("g short\n", "1 Got Lock\n").await;
    assert_eq!(server.stats().locks, 1);
}

for_each_transport!(
    a_full_budget_refuses_new_state_and_serves_everything_else,
    rate_limiters_make_room_by_evicting_those_soonest_back_to_full,
    long_names_work_up_to_the_limit_and_are_refused_past_it,
);

/// The defaults a server starts with, met over a real socket: names of 256 KiB work and one
/// byte more does not; a connection holds a million locks, and not one more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_limits_hold_a_million_locks_and_quarter_megabyte_names() {
    let server = TestServer::start(1);
    let mut client = server.connect().await;
    let longest = name("n", 256 << 10);
    let over = name("n", (256 << 10) + 1);
    client
        .check(
            &format!("g {longest}\nr {longest}\ng {over}\n"),
            "1 Got Lock\n1 Released Lock\n0 Name Too Long\n",
        )
        .await;
    // A million locks in pipelined slices, then one more.
    let mut batch = String::new();
    for slice in 0..100 {
        batch.clear();
        for i in 0..10_000 {
            batch.push_str(&format!("sg {}\n", slice * 10_000 + i));
        }
        client.send(&batch).await;
        client.expect("1 Got Shared Lock\n".repeat(10_000)).await;
    }
    client
        .check(
            "g one-more\nsg one-more\n",
            "0 Lock Limit Reached\n0 Lock Limit Reached\n",
        )
        .await;
    client
        .check("sr 0\ng one-more\n", "1 Released Shared Lock\n1 Got Lock\n")
        .await;
}
