//! Every check fails against a server that breaks its rule: a fake glockd on a loopback port
//! breaks one rule at a time. The fake with no faults passes everything, so each failure below
//! is caused by its fault alone. Timeouts are short (the fake answers at once, or never).

mod support;

use std::time::{Duration, Instant};

use glockd_tester::report::Status;
use support::fake::{Fake, Faults};
use support::{assert_no_failures, assert_status, run, shown, CALM_TIMEOUT_MS, FAKE_TIMEOUT_MS};

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
async fn compat_mode_passes_a_server_that_behaves_like_the_original() {
    let fake = Fake::start(Faults::original()).await;
    // Compat mode waits a tenth of the timeout (at most 200 ms) before it ends a listing it
    // expects to be empty, so that the original reads the listing and the end marker apart.
    let report = run(fake.addr, CALM_TIMEOUT_MS, &["--compat"]).await;
    assert_no_failures(&report);
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
    let fake = Fake::start(Faults {
        silent_on_unknown: true,
        ..Faults::default()
    })
    .await;
    let started = Instant::now();
    let report = run(fake.addr, FAKE_TIMEOUT_MS, &["--only", "unknown_command"]).await;
    assert_status(&report, "unknown_command_answered_0", Status::Fail);
    let detail = &report.get("unknown_command_answered_0").unwrap().detail;
    assert!(detail.contains("within 300 ms"), "{detail}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// `fault => checks`: with only that fault, each listed check fails.
macro_rules! broken {
    ($($test:ident: $fault:ident => [$($check:literal),+ $(,)?];)*) => {$(
        #[tokio::test]
        async fn $test() {
            let fake = Fake::start(Faults { $fault: true, ..Faults::default() }).await;
            let report = run(fake.addr, FAKE_TIMEOUT_MS, &[]).await;
            $(assert_status(&report, $check, Status::Fail);)+
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
