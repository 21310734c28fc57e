//! Every check fails against a server that breaks its rule: a fake glockd on a loopback port
//! breaks one rule at a time, over TCP and over the websocket door. The fake with no faults
//! passes everything, so each failure below is caused by its fault alone. Timeouts are short
//! (the fake answers at once, or never).

mod support;

use std::time::{Duration, Instant};

use glockd_tester::report::Report;
use glockd_tester::report::Status;
use support::fake::{Door, Fake, Faults};
use support::{
    assert_no_failures, assert_status, run, run_ws, shown, CALM_TIMEOUT_MS, FAKE_TIMEOUT_MS,
};

/// Both doors the fake speaks.
const DOORS: [Door; 2] = [Door::Tcp, Door::Ws];

/// Runs every check against `fake` through `door` (the door it was started with).
async fn run_on(door: Door, fake: &Fake, timeout_ms: &str, extra: &[&str]) -> Report {
    match door {
        Door::Tcp => run(fake.addr, timeout_ms, extra).await,
        Door::Ws => run_ws(&fake.ws_url(), timeout_ms, extra).await,
    }
}

#[tokio::test]
async fn the_fake_without_faults_passes_every_check() {
    let fake = Fake::start(Faults::default()).await;
    let report = run(fake.addr, CALM_TIMEOUT_MS, &[]).await;
    assert_no_failures(&report);
    assert_eq!(report.skipped, 0, "{}", shown(&report));
    let report = run(fake.addr, CALM_TIMEOUT_MS, &["--compat"]).await;
    assert_no_failures(&report);
}

#[tokio::test]
async fn the_websocket_fake_without_faults_passes_every_check() {
    let fake = Fake::start_ws(Faults::default()).await;
    let report = run_ws(&fake.ws_url(), CALM_TIMEOUT_MS, &[]).await;
    assert_no_failures(&report);
    assert_eq!(report.skipped, 0, "{}", shown(&report));
    assert!(report.target.starts_with("ws ws://"), "{}", report.target);
    let report = run_ws(&fake.ws_url(), CALM_TIMEOUT_MS, &["--compat"]).await;
    assert_no_failures(&report);
}

#[tokio::test]
async fn compat_mode_passes_a_server_that_behaves_like_the_original() {
    for door in DOORS {
        let fake = Fake::start_on(door, Faults::original()).await;
        // Compat mode waits a tenth of the timeout (at most 200 ms) before it ends a listing it
        // expects to be empty, so that the original reads the listing and the end marker apart.
        let report = run_on(door, &fake, CALM_TIMEOUT_MS, &["--compat"]).await;
        assert_no_failures(&report);
    }
}

#[tokio::test]
async fn strict_mode_fails_the_original_on_what_it_got_wrong() {
    let fake = Fake::start(Faults::original()).await;
    let report = run(fake.addr, FAKE_TIMEOUT_MS, &[]).await;
    for name in [
        "pipelining_replies_in_order",
        "pipelining_get_then_list",
        "unknown_command_answered_0",
        // Its shared replies end in `\r\n`.
        "shared_counts_holders",
    ] {
        assert_status(&report, name, Status::Fail);
    }
}

#[tokio::test]
async fn free_form_reply_texts_fail_strict_mode_only() {
    let fake = Fake::start(Faults {
        original_texts: true,
        ..Faults::default()
    })
    .await;
    let report = run(fake.addr, FAKE_TIMEOUT_MS, &[]).await;
    assert_status(&report, "shared_counts_holders", Status::Fail);
    let report = run(fake.addr, CALM_TIMEOUT_MS, &["--compat"]).await;
    assert_no_failures(&report);
}

#[tokio::test]
async fn an_unreachable_server_fails_connect_and_skips_the_rest() {
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let report = run(addr, FAKE_TIMEOUT_MS, &[]).await;
    assert_status(&report, "connect", Status::Fail);
    assert_eq!(report.failed, 1, "{}", shown(&report));
    assert_eq!(
        report.skipped,
        report.checks.len() - 1,
        "{}",
        shown(&report)
    );
}

#[tokio::test]
async fn a_missing_reply_to_an_unknown_command_times_out_and_fails() {
    for door in DOORS {
        let fake = Fake::start_on(
            door,
            Faults {
                silent_on_unknown: true,
                ..Faults::default()
            },
        )
        .await;
        let started = Instant::now();
        let report = run_on(door, &fake, FAKE_TIMEOUT_MS, &["--only", "unknown_command"]).await;
        assert_status(&report, "unknown_command_answered_0", Status::Fail);
        let detail = &report.get("unknown_command_answered_0").unwrap().detail;
        assert!(detail.contains("within 300 ms"), "{detail}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn a_reply_longer_than_the_cap_fails_without_being_read_whole() {
    let faults = Faults {
        huge_held_inspect: true,
        ..Faults::default()
    };
    let only = ["--only", "exclusive_get_inspect_release"];
    let tcp = Fake::start(faults).await;
    let report = run(tcp.addr, FAKE_TIMEOUT_MS, &only).await;
    assert_status(&report, "exclusive_get_inspect_release", Status::Fail);
    let detail = &report.get("exclusive_get_inspect_release").unwrap().detail;
    assert!(detail.contains("more than 65536 bytes"), "{detail}");
    // Over the websocket door the 2 MiB message is refused by the library while it reads
    // (the largest message accepted is --max-dump-bytes, 1 MiB by default), or, when
    // --max-dump-bytes lets it through, by the cap on a one-line reply once read.
    let ws = Fake::start_ws(faults).await;
    for extra in [&[][..], &["--max-dump-bytes", "8388608"][..]] {
        let args: Vec<&str> = only.iter().chain(extra).copied().collect();
        let report = run_ws(&ws.ws_url(), FAKE_TIMEOUT_MS, &args).await;
        assert_status(&report, "exclusive_get_inspect_release", Status::Fail);
        let detail = &report.get("exclusive_get_inspect_release").unwrap().detail;
        assert!(
            detail.contains("got a message of more than 65536 bytes"),
            "{detail}"
        );
    }
}

#[tokio::test]
async fn a_listing_split_over_several_messages_fails_over_websockets() {
    let faults = Faults {
        ws_rows_per_message: true,
        ..Faults::default()
    };
    let fake = Fake::start_ws(faults).await;
    let report = run_ws(&fake.ws_url(), FAKE_TIMEOUT_MS, &[]).await;
    // Two rows in two messages: the second comes where the next reply belongs.
    assert_status(&report, "sd_name_lists_holders", Status::Fail);
    let detail = &report.get("sd_name_lists_holders").unwrap().detail;
    assert!(detail.contains("another row"), "{detail}");
    // `q` in one message per counter: the first message is taken for the whole reply.
    assert_status(&report, "stats_format", Status::Fail);
    // Over TCP the same fake is correct: lines are lines, however they are written.
    let tcp = Fake::start(faults).await;
    assert_no_failures(&run(tcp.addr, CALM_TIMEOUT_MS, &[]).await);
}

#[tokio::test]
async fn an_empty_listing_without_its_empty_message_fails_over_websockets() {
    let faults = Faults {
        ws_no_empty_message: true,
        ..Faults::default()
    };
    let fake = Fake::start_ws(faults).await;
    let report = run_ws(&fake.ws_url(), FAKE_TIMEOUT_MS, &[]).await;
    for name in [
        "d_name_lists_holder",
        "sd_name_lists_holders",
        "registry_empty_iam_clears",
    ] {
        assert_status(&report, name, Status::Fail);
        let detail = &report.get(name).unwrap().detail;
        assert!(detail.contains("an empty message for none"), "{detail}");
    }
    // Over TCP an empty listing is no bytes at all, which is what this fake sends.
    let tcp = Fake::start(faults).await;
    assert_no_failures(&run(tcp.addr, CALM_TIMEOUT_MS, &[]).await);
}

#[tokio::test]
async fn a_websocket_door_that_never_finishes_the_handshake_fails_connect() {
    // Accepts connections and holds them without a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let started = Instant::now();
    let report = run_ws(&format!("ws://{addr}/"), FAKE_TIMEOUT_MS, &[]).await;
    silent.abort();
    assert_status(&report, "connect", Status::Fail);
    let detail = &report.get("connect").unwrap().detail;
    assert!(detail.contains("no connection within 300 ms"), "{detail}");
    assert_eq!(report.failed, 1, "{}", shown(&report));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_line_server_behind_a_websocket_url_fails_connect() {
    let fake = Fake::start(Faults::default()).await;
    let report = run_ws(&fake.ws_url(), FAKE_TIMEOUT_MS, &[]).await;
    assert_status(&report, "connect", Status::Fail);
    assert_eq!(report.failed, 1, "{}", shown(&report));
}

/// `fault => checks`: with only that fault, each listed check fails, over TCP and over the
/// websocket door.
macro_rules! broken {
    ($($test:ident: $fault:ident => [$($check:literal),+ $(,)?];)*) => {$(
        #[tokio::test]
        async fn $test() {
            for door in DOORS {
                let fake = Fake::start_on(door, Faults { $fault: true, ..Faults::default() }).await;
                let report = run_on(door, &fake, FAKE_TIMEOUT_MS, &[]).await;
                $(assert_status(&report, $check, Status::Fail);)+
            }
        }
    )*};
}

broken! {
    inspect_that_never_sees_a_lock_fails: inspect_always_0 => ["exclusive_get_inspect_release"];
    reget_answering_0_fails: reget_answers_0 => ["exclusive_reget_answers_1"];
    taking_a_held_lock_fails: no_exclusion => ["exclusive_held_lock_refused_to_others"];
    anyone_releasing_fails: anyone_can_release => ["exclusive_only_holder_releases"];
    shared_release_that_keeps_the_holder_fails: sr_keeps_holder => ["shared_counts_holders"];
    shared_double_counting_fails: shared_double_counts => ["shared_reget_counts_once"];
    one_namespace_for_both_kinds_fails: one_namespace => ["namespaces_separate"];
    no_orphaning_fails: no_orphaning => [
        "orphan_exclusive_on_disconnect",
        "orphan_shared_on_disconnect",
        "stats_orphan_counts",
        "cleanup_nothing_left_held",
    ];
    uncollapsed_whitespace_fails: no_whitespace_collapse => ["whitespace_collapsed"];
    carriage_return_in_names_fails: crlf_kept => ["crlf_accepted"];
    dropping_pipelined_lines_fails: first_line_per_read => [
        "pipelining_replies_in_order",
        "pipelining_get_then_list",
    ];
    silence_on_unknown_commands_fails: silent_on_unknown => ["unknown_command_answered_0"];
    answering_empty_lines_fails: empty_line_answered => ["empty_line_no_reply"];
    empty_listings_fail: listings_empty => ["d_name_lists_holder", "sd_name_lists_holders"];
    listings_without_registered_names_fail: listings_ignore_registry => ["registry_name_in_listings"];
    empty_dumps_fail: dump_empty => ["dump_contains_lock", "dump_shared_contains_lock"];
    dumps_with_registered_names_fail: dump_shows_names => ["registry_dump_shows_raw_id"];
    me_without_a_name_fails: me_without_name => ["registry_me"];
    iam_that_registers_nothing_fails: iam_ignored => ["registry_iam", "registry_who_lists_name"];
    empty_iam_that_keeps_the_name_fails: empty_iam_kept => ["registry_empty_iam_clears"];
    who_that_lists_nothing_fails: who_lists_nothing => ["registry_who_lists_name"];
    stats_without_a_documented_key_fail: stats_without_locks => ["stats_format"];
    stats_that_never_move_fail: frozen_stats => [
        "stats_command_deltas",
        "stats_orphan_counts",
        "stats_invalid_commands",
    ];
    gauges_stuck_at_0_fail: gauges_zero => ["stats_gauges"];
}
