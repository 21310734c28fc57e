//! The checks, in the order they run. Each one opens its own connections and closes them when
//! it ends, so a check that fails half-way (a lost reply, a wrong answer) cannot confuse the
//! next one, and whatever it still held is released by the server when its connections close.

use std::future::Future;
use std::pin::Pin;

use crate::ctx::Ctx;
use crate::verdict::Verdict;

mod listings;
mod locks;
mod registry;
mod stats;
mod wire;

/// A running check.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Verdict>> + 'a>>;

/// One named check.
pub struct Check {
    /// The name printed in the report; stable, so scripts and `--only` can rely on it.
    pub name: &'static str,
    /// Runs the check.
    pub run: for<'a> fn(&'a Ctx) -> CheckFuture<'a>,
}

/// The name of the first check: when it fails the server is unreachable and the rest are
/// skipped rather than failed one by one with the same error.
pub const CONNECT: &str = "connect";

/// The name of the check that an unauthenticated connection is refused; it runs only with
/// `--expect-auth`.
pub const AUTH_REQUIRED: &str = "auth_required_without_auth";

/// The name of the last check, which must run after every other.
pub const CLEANUP: &str = "cleanup_nothing_left_held";

macro_rules! check {
    ($name:expr, $run:path) => {
        Check {
            name: $name,
            run: |ctx| Box::pin($run(ctx)),
        }
    };
}

/// Every check, in order.
pub fn all() -> Vec<Check> {
    vec![
        check!(CONNECT, wire::connect),
        check!(AUTH_REQUIRED, wire::auth_required),
        check!("exclusive_get_inspect_release", locks::get_inspect_release),
        check!("exclusive_reget_answers_1", locks::reget),
        check!(
            "exclusive_held_lock_refused_to_others",
            locks::refused_to_others
        ),
        check!(
            "exclusive_only_holder_releases",
            locks::only_holder_releases
        ),
        check!("shared_counts_holders", locks::shared_counts_holders),
        check!("shared_reget_counts_once", locks::shared_reget_counts_once),
        check!("namespaces_separate", locks::namespaces_separate),
        check!("orphan_exclusive_on_disconnect", locks::orphan_exclusive),
        check!("orphan_shared_on_disconnect", locks::orphan_shared),
        check!("whitespace_collapsed", locks::whitespace_collapsed),
        check!("crlf_accepted", locks::crlf_accepted),
        check!("d_name_lists_holder", listings::d_name),
        check!("sd_name_lists_holders", listings::sd_name),
        check!("dump_contains_lock", listings::dump),
        check!("dump_shared_contains_lock", listings::dump_shared),
        check!("framed_listing_counts_rows", listings::framed_counts_rows),
        check!("registry_me", registry::me),
        check!("registry_iam", registry::iam),
        check!("registry_who_lists_name", registry::who),
        check!("registry_name_in_listings", registry::name_in_listings),
        check!("registry_dump_shows_raw_id", registry::dump_raw_id),
        check!("registry_empty_iam_clears", registry::empty_iam_clears),
        check!("stats_format", stats::format),
        check!("stats_command_deltas", stats::command_deltas),
        check!("stats_gauges", stats::gauges),
        check!("stats_orphan_counts", stats::orphan_counts),
        check!("stats_invalid_commands", stats::invalid_commands),
        check!("pipelining_replies_in_order", wire::pipelining_in_order),
        check!("pipelining_get_then_list", wire::pipelining_get_then_list),
        check!("unknown_command_answered_0", wire::unknown_command),
        check!("empty_line_no_reply", wire::empty_line),
        check!(CLEANUP, wire::cleanup),
    ]
}
