//! The protocol over real TCP sockets: every command, its exact reply bytes, and the rules
//! between connections. Each test runs with 1 shard and with 4.

mod common;

use common::{Setup, TestServer};

/// Every example of the original README, with its documented integers.
async fn seed_readme_examples(setup: Setup) {
    let server = TestServer::start(setup);
    let mut other = server.connect().await;
    other.check("g bar\n", "1 Got Lock\n").await;
    let mut c = server.connect().await;
    c.check("g foo\n", "1 Got Lock\n").await;
    c.check("g bar\n", "0 Cannot Get Lock\n").await;
    c.check("r foo\n", "1 Released Lock\n").await;
    c.check("r bar\n", "0 Cannot Release Lock\n").await;
    c.check("g foo\n", "1 Got Lock\n").await;
    c.check("i foo\n", "1 Locked\n").await;
    c.check("i baz\n", "0 Not Locked\n").await;
    let (me, them) = (c.id(), other.id());
    c.check("d foo\n", &format!("foo: {me}\n")).await;
    // Sorted by name.
    c.check("d\n", &format!("bar: {them}\nfoo: {me}\n")).await;
    c.check("dump\n", &format!("map[bar:{them} foo:{me}]\n"))
        .await;
}

async fn exclusive_locks(setup: Setup) {
    let server = TestServer::start(setup);
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.check("g x\n", "1 Got Lock\n").await;
    a.check("g x\n", "1 Got Lock\n").await; // re-getting your own lock answers 1
    b.check("g x\n", "0 Cannot Get Lock\n").await;
    b.check("r x\n", "0 Cannot Release Lock\n").await; // only the holder releases
    b.check("i x\n", "1 Locked\n").await;
    a.check("r x\n", "1 Released Lock\n").await;
    a.check("r x\n", "0 Cannot Release Lock\n").await;
    b.check("i x\n", "0 Not Locked\n").await;
    b.check("g x\n", "1 Got Lock\n").await;
    a.check("g x\n", "0 Cannot Get Lock\n").await;
}

async fn shared_locks_count_holders(setup: Setup) {
    let server = TestServer::start(setup);
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let mut c = server.connect().await;
    c.check("si s\n", "0 Not Shared Locked\n").await;
    a.check("sg s\n", "1 Got Shared Lock\n").await;
    a.check("sg s\n", "1 Got Shared Lock\n").await; // a holder counts once
    b.check("sg s\n", "2 Got Shared Lock\n").await;
    c.check("si s\n", "2 Shared Locked\n").await;
    c.check("sr s\n", "0 Cannot Release Shared Lock\n").await;
    a.check("sr s\n", "1 Released Shared Lock\n").await;
    a.check("sr s\n", "0 Cannot Release Shared Lock\n").await;
    c.check("si s\n", "1 Shared Locked\n").await;
    // Exclusive and shared names are separate namespaces.
    c.check("g s\n", "1 Got Lock\n").await;
    c.check("i s\n", "1 Locked\n").await;
    b.check("sg s\n", "1 Got Shared Lock\n").await;
    let (bid, cid) = (b.id(), c.id());
    a.check("sd s\n", &format!("s: {bid}\n")).await;
    c.check("sg t\n", "1 Got Shared Lock\n").await;
    b.check("sg t\n", "2 Got Shared Lock\n").await;
    let mut ids = [bid.clone(), cid.clone()];
    ids.sort();
    a.check("sd\n", &format!("s: {bid}\nt: {}\nt: {}\n", ids[0], ids[1]))
        .await;
    a.check(
        "dump shared\n",
        &format!("map[s:[{bid}] t:[{} {}]]\n", ids[0], ids[1]),
    )
    .await;
    a.check("dump\n", &format!("map[s:{cid}]\n")).await;
}

async fn whitespace_is_normalised(setup: Setup) {
    let server = TestServer::start(setup);
    let mut a = server.connect().await;
    // What the original Go client really sends.
    a.check(" g  foo   bar \n", "1 Got Lock\n").await;
    a.check("i foo bar\r\n", "1 Locked\n").await;
    a.check("i\tfoo\t\tbar\n", "1 Locked\n").await;
    let id = a.id();
    a.check("d  foo  bar\n", &format!("foo bar: {id}\n")).await;
    a.check("r foo bar\n", "1 Released Lock\n").await;
}

async fn empty_lines_get_nothing_and_unknown_commands_an_error(setup: Setup) {
    let server = TestServer::start(setup);
    let mut a = server.connect().await;
    a.check(
        "\n\r\n   \nbogus thing\nG x\ng x\n",
        "0 Invalid Command\n0 Invalid Command\n1 Got Lock\n",
    )
    .await;
    let stats = server.client().await.stats().await.unwrap();
    assert_eq!(stats["invalid_commands"], 2);
    assert_eq!(stats["command_g"], 1);
}

async fn empty_listings_are_empty(setup: Setup) {
    let server = TestServer::start(setup);
    let mut a = server.connect().await;
    // Nothing is held: d, sd and who print nothing, so the next reply comes first.
    a.check("d\nsd\nd nope\nwho\ni x\n", "0 Not Locked\n").await;
    a.check("dump\ndump shared\n", "map[]\nmap[]\n").await;
}

async fn registry_names_show_in_listings(setup: Setup) {
    let server = TestServer::start(setup);
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let (aid, bid) = (a.id(), b.id());
    a.check("me\n", &format!("1 {aid} {aid}\n")).await;
    a.check("iam  worker   one \n", "1 ok\n").await;
    a.check("me\n", &format!("1 {aid} worker one\n")).await;
    a.check("g job\n", "1 Got Lock\n").await;
    a.check("sg pool\n", "1 Got Shared Lock\n").await;
    b.check("d job\n", "job: worker one\n").await;
    b.check("sd pool\n", "pool: worker one\n").await;
    // dump shows raw connection ids, never registered names.
    b.check("dump\n", &format!("map[job:{aid}]\n")).await;
    b.check("iam worker two\n", "1 ok\n").await;
    let mut rows = [
        format!("{aid}: worker one\n"),
        format!("{bid}: worker two\n"),
    ];
    rows.sort();
    b.check("who\n", &rows.concat()).await;
    b.check("who worker two\n", &format!("{bid}: worker two\n"))
        .await;
    // An empty name clears the registration.
    a.check("iam\n", "1 ok\n").await;
    b.check("who\n", &format!("{bid}: worker two\n")).await;
    b.check("d job\n", &format!("job: {aid}\n")).await;
}

async fn pipelined_commands_see_earlier_effects(setup: Setup) {
    let server = TestServer::start(setup);
    let mut a = server.connect().await;
    let id = a.id();
    // Names spread over every shard; d must list them all, sorted.
    let names: Vec<String> = (0..20).map(|i| format!("n{i:02}")).collect();
    let mut batch = String::new();
    let mut expected = String::new();
    for name in &names {
        batch.push_str(&format!("g {name}\n"));
        expected.push_str("1 Got Lock\n");
    }
    batch.push_str("d\n");
    for name in &names {
        expected.push_str(&format!("{name}: {id}\n"));
    }
    batch.push_str("q\n");
    a.send(batch).await;
    a.expect(expected).await;
    let mut q = String::new();
    while !q.ends_with("\n")
        || !q
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("shared_orphans"))
    {
        q.push_str(&a.line().await);
    }
    assert!(q.contains("command_g: 20\n"), "{q}");
    assert!(q.contains("locks: 20\n"), "{q}");
    assert!(q.contains("command_q: 1\n"), "{q}");
}

async fn long_and_binary_names_round_trip(setup: Setup) {
    let server = TestServer::start(setup);
    let mut a = server.connect().await;
    let long = "L".repeat(100_000);
    a.check(&format!("g {long}\n"), "1 Got Lock\n").await;
    a.check(&format!("i {long}\n"), "1 Locked\n").await;
    let id = a.id();
    a.check(&format!("d {long}\n"), &format!("{long}: {id}\n"))
        .await;
    let mut b = server.connect().await;
    b.send(b"g \xff\x00\xfe\n").await;
    b.expect(b"1 Got Lock\n").await;
    b.send(b"d \xff\x00\xfe\n").await;
    let mut expected = b"\xff\x00\xfe: ".to_vec();
    expected.extend_from_slice(b.id().as_bytes());
    expected.push(b'\n');
    b.expect(expected).await;
}

async fn disabled_commands_answer_disabled(setup: Setup) {
    let server = TestServer::start_with(setup, |c| {
        c.dump = false;
        c.registry = false;
    });
    let mut a = server.connect().await;
    a.check(
        "d\nsd\ndump\ndump shared\nwho\niam x\ng ok\n",
        "0 disabled\n0 disabled\n0 disabled\n0 disabled\n0 disabled\n0 disabled\n1 Got Lock\n",
    )
    .await;
    let id = a.id();
    a.check("me\n", &format!("1 {id} {id}\n")).await;

    let registry_only_off = TestServer::start_with(setup, |c| c.registry = false);
    let mut b = registry_only_off.connect().await;
    b.check("iam x\nwho\ng a\n", "0 disabled\n0 disabled\n1 Got Lock\n")
        .await;
    let id = b.id();
    b.check("d\n", &format!("a: {id}\n")).await;
}

for_each_transport!(
    seed_readme_examples,
    exclusive_locks,
    shared_locks_count_holders,
    whitespace_is_normalised,
    empty_lines_get_nothing_and_unknown_commands_an_error,
    empty_listings_are_empty,
    registry_names_show_in_listings,
    pipelined_commands_see_earlier_effects,
    long_and_binary_names_round_trip,
    disabled_commands_answer_disabled,
);

/// Byte-stream behaviour (TCP and unix sockets): over a websocket every message is a whole
/// command, and its size limit is the protocol's own.
mod byte_streams {
    use super::common::{self, Setup, TestServer};
    use tokio::io::AsyncWriteExt;

    async fn a_line_split_across_writes_is_one_command(setup: Setup) {
        let server = TestServer::start(setup);
        let mut a = server.connect().await;
        for piece in ["g", " spl", "it-na", "me\r", "\ni split-name", "\n"] {
            a.send(piece).await;
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        a.expect("1 Got Lock\n1 Locked\n").await;
    }

    async fn last_line_without_newline_is_answered_at_end_of_input(setup: Setup) {
        let server = TestServer::start(setup);
        let mut a = server.connect().await;
        a.send("g tail").await;
        a.stream.shutdown().await.unwrap();
        a.expect("1 Got Lock\n").await;
        a.expect_closed().await;
    }

    async fn overlong_line_is_refused_and_its_locks_orphaned(setup: Setup) {
        let server = TestServer::start_with(setup, |c| c.max_line_bytes = 1024);
        let mut a = server.connect().await;
        a.check("g held\n", "1 Got Lock\n").await;
        a.send(format!("g {}\n", "x".repeat(2000))).await;
        a.expect("0 Line Too Long\n").await;
        a.expect_closed().await;
        server
            .wait_for_stats("the orphan", |s| s["orphans"] == 1 && s["locks"] == 0)
            .await;
        // A line at the limit is fine; so is endless input without a newline, up to the limit.
        let mut b = server.connect().await;
        b.check(&format!("g {}\n", "y".repeat(1021)), "1 Got Lock\n")
            .await;
        b.send("z".repeat(5000)).await;
        b.expect("0 Line Too Long\n").await;
        b.expect_closed().await;
    }

    crate::for_each_byte_stream!(
        a_line_split_across_writes_is_one_command,
        last_line_without_newline_is_answered_at_end_of_input,
        overlong_line_is_refused_and_its_locks_orphaned,
    );
}
