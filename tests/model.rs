//! Model-based property test: random interleavings of commands and disconnects from several
//! connections, run against the real server and compared reply by reply with a simple
//! sequential model of the lock table.

mod common;

use common::model::{Model, VERBS};
use common::{Raw, TestServer};
use proptest::prelude::*;

const CONNS: usize = 4;
const NAMES: [&str; 6] = [
    "a",
    "b",
    "c",
    "x y",
    "\u{e9}t\u{e9}",
    "long-name-beyond-the-inline-size",
];

#[derive(Debug, Clone)]
enum Action {
    /// Connection `0` sends `verb name`.
    Command(usize, &'static str, usize),
    /// Connection `0` goes away (a new one takes its place).
    Disconnect(usize, bool),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        10 => (0..CONNS, prop::sample::select(VERBS.to_vec()), 0..NAMES.len())
            .prop_map(|(c, v, n)| Action::Command(c, v, n)),
        1 => (0..CONNS, any::<bool>()).prop_map(|(c, rst)| Action::Disconnect(c, rst)),
    ]
}

fn run_case(server: &TestServer, runtime: &tokio::runtime::Runtime, actions: &[Action]) {
    runtime.block_on(async {
        // Start from an empty table: release what earlier cases left by reconnecting all.
        let mut conns: Vec<Option<Raw>> = Vec::new();
        for _ in 0..CONNS {
            conns.push(Some(server.connect().await));
        }
        let mut generation: Vec<u64> = (0..CONNS as u64).collect();
        let mut next_generation = CONNS as u64;
        // Connections are numbered by generation, so a replacement is a new holder.
        let mut model = Model::<u64>::default();
        let base = server.stats();
        for action in actions {
            match action {
                Action::Command(c, verb, n) => {
                    let name = NAMES[*n];
                    let expected = model.apply(generation[*c], verb, name);
                    let conn = conns[*c].as_mut().expect("connected");
                    conn.check(&format!("{verb} {name}\n"), &expected).await;
                }
                Action::Disconnect(c, rst) => {
                    let conn = conns[*c].take().expect("connected");
                    if *rst {
                        conn.reset();
                    } else {
                        drop(conn);
                    }
                    model.disconnect(generation[*c]);
                    generation[*c] = next_generation;
                    next_generation += 1;
                    let (orphans, shared_orphans) = (model.orphans, model.shared_orphans);
                    let (locks, shared_locks) = (model.locks(), model.shared_locks());
                    server
                        .wait_for_stats("the model's orphans", |s| {
                            s["orphans"] - base.orphans == orphans
                                && s["shared_orphans"] - base.shared_orphans == shared_orphans
                                && s["locks"] == locks
                                && s["shared_locks"] == shared_locks
                        })
                        .await;
                    conns[*c] = Some(server.connect().await);
                }
            }
        }
        let stats = server.stats();
        assert_eq!(stats.locks, model.locks());
        assert_eq!(stats.shared_locks, model.shared_locks());
        drop(conns);
        server
            .wait_for_stats("the case's connections gone", |s| {
                s["locks"] == 0 && s["shared_locks"] == 0 && s["connections"] == 1
            })
            .await;
    });
}

fn model_test(shards: u16, poll_us: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = TestServer::start_with(shards, |c| c.poll_us = poll_us);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(action(), 1..80), |actions| {
            run_case(&server, &runtime, &actions);
            Ok(())
        })
        .unwrap();
}

#[test]
fn random_interleavings_match_the_model_with_one_shard() {
    model_test(1, 0);
}

#[test]
fn random_interleavings_match_the_model_with_four_shards() {
    model_test(4, 0);
}

#[test]
fn random_interleavings_match_the_model_with_four_busily_polling_shards() {
    model_test(4, 50);
}
