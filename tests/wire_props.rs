//! Properties of what comes off the wire: the parser never panics and normalises names the
//! same way whatever bytes arrive, and the real server answers arbitrary input without
//! crashing, hanging, or losing another client's lock.

mod common;

use glockd::protocol::{self, Request};
use proptest::prelude::*;

fn is_space(b: u8) -> bool {
    glockd::protocol::is_space(b)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parsing_any_bytes_never_panics_and_names_are_normal(line in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Some(name) = protocol::parse(&line).name() {
            let name = name.as_bytes();
            // Trimmed, no whitespace but single spaces.
            prop_assert!(name.first().is_none_or(|&b| !is_space(b)));
            prop_assert!(name.last().is_none_or(|&b| !is_space(b)));
            prop_assert!(name.windows(2).all(|w| !(is_space(w[0]) && is_space(w[1]))));
            prop_assert!(name.iter().all(|&b| !is_space(b) || b == b' '));
            // Normalising twice changes nothing.
            let again = protocol::normalise(name);
            prop_assert_eq!(again.as_bytes(), name);
        }
    }

    #[test]
    fn whitespace_runs_do_not_change_the_name(words in proptest::collection::vec("[a-z0-9:]{1,8}", 1..6), seps in proptest::collection::vec("[ \t\r\x0b\x0c]{1,4}", 6)) {
        let mut line = String::from(" g");
        for (word, sep) in words.iter().zip(seps.iter()) {
            line.push_str(sep);
            line.push_str(word);
        }
        line.push_str("  \r");
        let expected = words.join(" ");
        match protocol::parse(line.as_bytes()) {
            Request::Lock { name, .. } => prop_assert_eq!(name.as_bytes(), expected.as_bytes()),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}

/// Arbitrary bytes from one client: the server answers every complete line with exactly one
/// reply line or none (empty lines), never closes on it, and another client's lock survives.
#[test]
fn arbitrary_input_never_hurts_the_server_or_other_clients() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = common::TestServer::start(2);
    // Held for the whole test: no input from anyone else may take it away.
    let _keeper = runtime.block_on(async {
        let mut keeper = server.connect().await;
        keeper.check("g keep\n", "1 Got Lock\n").await;
        keeper
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    runner
        .run(
            &proptest::collection::vec(
                prop_oneof![
                    any::<u8>(),
                    Just(b'\n'),
                    Just(b' '),
                    Just(b'g'),
                    Just(b's'),
                    Just(b'r'),
                ],
                0..400,
            ),
            |bytes| {
                runtime.block_on(async {
                    let mut client = server.connect().await;
                    let id = client.id();
                    client.send(&bytes).await;
                    // `me` behind the input proves every earlier line was taken and the
                    // connection is still served.
                    client.send("\nme\n").await;
                    let marker = format!("1 {id} {id}\n");
                    while client.line().await != marker {}
                });
                Ok(())
            },
        )
        .unwrap();
    runtime.block_on(async {
        let mut other = server.connect().await;
        other
            .check("i keep\ng keep\n", "1 Locked\n0 Cannot Get Lock\n")
            .await;
    });
}
