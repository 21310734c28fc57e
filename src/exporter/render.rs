//! The scrape: every per-shard cell summed and written in the Prometheus text format.
//!
//! Counters and gauges go through a `metrics-exporter-prometheus` recorder of our own, set to
//! absolute values read from the cells at scrape time, so the command path never touches the
//! recorder. Histograms (command latency, lock waits) and fractional counters are written by
//! hand from the cells' fixed buckets, because the recorder's own histograms buffer every
//! sample between scrapes.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::peer::DoorKind;
use crate::protocol::{Class, Verb};
use crate::shard::ServerState;
use crate::stats::{
    latency_bucket_ns, wait_buckets_for, CloseReason, LockResult, RefuseReason, LATENCY_BUCKETS,
    WAIT_BUCKETS, WAIT_BUCKETS_NS,
};
use crate::tls::{HandshakeResult, TlsDoor};
use crate::users::AuthResult;

/// The server's version, for `glockd_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit the server was built from, when the build says (`GLOCKD_COMMIT` in the build's
/// environment), for `glockd_build_info`.
pub const COMMIT: &str = match option_env!("GLOCKD_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// Whether a command can store new state, and so be answered `0 Out Of Memory`.
fn may_store(verb: Verb) -> bool {
    matches!(
        verb,
        Verb::Get
            | Verb::GetToken
            | Verb::GetWait
            | Verb::SharedGet
            | Verb::SharedGetLimit
            | Verb::SharedGetWait
            | Verb::RateLimit
            | Verb::Iam
    )
}

/// Renders the metrics text.
pub struct Exporter {
    pub(super) server: Arc<ServerState>,
    /// A recorder of our own (not the process-global one), so several servers in one process
    /// each export their own numbers.
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    /// Connections turned away over `--metrics-max-connections`.
    pub(super) refused: AtomicU64,
}

impl Exporter {
    pub fn new(server: Arc<ServerState>) -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let process = metrics_process::Collector::default();
        metrics::with_local_recorder(&recorder, || {
            describe_counter!(
                "glockd_commands_total",
                "Commands received, by command word."
            );
            describe_counter!(
                "glockd_invalid_commands_total",
                "Lines whose command word is unknown, or too long."
            );
            describe_counter!(
                "glockd_lock_requests_total",
                "Replies to lock commands by command word and result (granted, refused, full, \
                 limit, timed_out, released, not_held, held, free, allowed, limited, usage)."
            );
            describe_gauge!("glockd_connections", "Connections open now, all doors.");
            describe_gauge!(
                "glockd_max_connections",
                "Connections served at once before new ones are turned away (-max-connections)."
            );
            describe_gauge!(
                "glockd_client_buffer_bytes",
                "Bytes all connections' buffers hold now: input not yet run, replies not yet \
                 written (see -max-client-buffers)."
            );
            describe_gauge!(
                "glockd_max_client_buffer_bytes",
                "The budget for all connections' buffers (-max-client-buffers; 0: none)."
            );
            describe_counter!(
                "glockd_connections_accepted_total",
                "Connections accepted since start."
            );
            describe_counter!(
                "glockd_connections_refused_total",
                "Connections turned away as they arrived, by reason."
            );
            describe_counter!(
                "glockd_connections_closed_total",
                "Connections that ended, by reason: the server's own decisions, and other (the \
                 client closed or reset it, or the server shut down)."
            );
            describe_counter!(
                "glockd_accept_errors_total",
                "Accepts that failed (out of file descriptors, mostly)."
            );
            describe_gauge!(
                "glockd_build_info",
                "Always 1; the labels say which build is running."
            );
            describe_gauge!(
                "glockd_locks",
                "Lock names held now, by kind (exclusive, shared)."
            );
            describe_counter!(
                "glockd_orphaned_locks_total",
                "Locks released because their holder disconnected, by kind."
            );
            describe_gauge!(
                "glockd_shard_locks",
                "Lock names held now in each shard, by kind."
            );
            describe_counter!(
                "glockd_shard_operations_total",
                "Lock operations each shard's table applied (lock commands routed to it and \
                 waits started on it): a hot shard shows here."
            );
            describe_counter!(
                "glockd_shard_commands_total",
                "Lock commands by the connection's shard thread and path: run locally, or sent \
                 to another shard's mailbox."
            );
            describe_counter!(
                "glockd_shard_mailbox_messages_total",
                "Batches received by each shard's mailbox."
            );
            describe_counter!(
                "glockd_shard_mailbox_commands_total",
                "Lock commands in those batches (per message: the batching factor)."
            );
            describe_counter!(
                "glockd_shard_mailbox_wakeups_total",
                "Wake-ups other threads sent this shard's parked thread (a running one looks at \
                 its mailbox itself)."
            );
            describe_counter!(
                "glockd_log_dropped_total",
                "Log lines dropped because the log writer was behind (its queue was full)."
            );
            describe_counter!(
                "glockd_metrics_connections_refused_total",
                "Connections to this endpoint closed at once because -metrics-max-connections \
                 were open already."
            );
            describe_counter!(
                "glockd_tls_handshakes_total",
                "TLS handshakes by door (tls, wss) and result: ok, failed (not TLS, a client \
                 certificate missing or refused...), timeout (-tls-handshake-timeout), busy \
                 (closed at once: -max-tls-handshakes were in progress)."
            );
            describe_gauge!(
                "glockd_tls_handshakes_in_progress",
                "TLS handshakes in progress now (at most -max-tls-handshakes)."
            );
            describe_counter!(
                "glockd_tls_reloads_total",
                "SIGHUP reloads of the TLS files by result: ok, failed (the old ones kept)."
            );
            describe_gauge!("glockd_shards", "Shard threads.");
            describe_gauge!(
                "glockd_lock_waiters",
                "Connections waiting for a lock now (gw, sgw)."
            );
            describe_counter!(
                "glockd_lock_waits_total",
                "Lock waits (gw, sgw) by outcome: started, granted, timed_out."
            );
            describe_counter!(
                "glockd_rate_limit_decisions_total",
                "rl decisions by result: allowed, limited."
            );
            describe_gauge!(
                "glockd_memory_used_bytes",
                "Bytes of lock state each shard's table holds (locks, names, shared holders, \
                 waiters, rate limiters), as the memory budget counts them."
            );
            describe_gauge!(
                "glockd_memory_registry_bytes",
                "Bytes of names registered with iam, as the memory budget counts them."
            );
            describe_gauge!(
                "glockd_memory_budget_bytes",
                "The memory budget for lock state (-max-memory); 0 means none."
            );
            describe_counter!(
                "glockd_out_of_memory_total",
                "Commands answered 0 Out Of Memory (what they would store did not fit in \
                 -max-memory), by command word."
            );
            describe_counter!(
                "glockd_ratelimit_evictions_total",
                "rl limiters dropped before they were back to full capacity, to make room under \
                 -max-memory (each resets that limiter)."
            );
            describe_gauge!(
                "glockd_fencing_ceiling",
                "The durable fencing token ceiling: every token issued is below it (0 without \
                 -state-file)."
            );
            describe_counter!(
                "glockd_upgrades_total",
                "Live upgrades by result: started, completed (counted by the new process, which \
                 goes on from the old one's figures) and rolled_back (called off: the running \
                 server carried on)."
            );
            describe_gauge!(
                "glockd_upgrade_last_pause_seconds",
                "The last completed live upgrade's pause: from stopping the connections to the \
                 new process's commit."
            );
            describe_gauge!(
                "glockd_upgrade_last_seconds",
                "The last completed live upgrade's whole hand-over, from starting the new binary."
            );
            describe_gauge!(
                "glockd_upgrade_carried",
                "What the last completed live upgrade carried: connections and exclusive locks."
            );
            describe_counter!(
                "glockd_upgrade_closed_connections_total",
                "TLS connections closed by live upgrades (not carried; their locks released)."
            );
            describe_counter!(
                "glockd_fencing_ceiling_writes_total",
                "Fencing token ceilings written and synced to the state file."
            );
            describe_counter!(
                "glockd_fencing_ceiling_write_errors_total",
                "Ceiling writes that failed (each is retried; grants wait at the old ceiling)."
            );
            describe_counter!(
                "glockd_auth_total",
                "With -users: auth results by door (success, failure), and connections their \
                 door mapped to a user by client certificate or unix uid (mapped)."
            );
            describe_counter!(
                "glockd_permission_denied_total",
                "With -users: commands answered `0 Permission Denied`, by door and command class."
            );
            describe_counter!(
                "glockd_auth_required_total",
                "With -users: commands answered `0 Auth Required` (not authenticated), by door."
            );
            process.describe();
        });
        Exporter {
            server,
            recorder,
            handle,
            process,
            refused: AtomicU64::new(0),
        }
    }

    /// The whole scrape, in the Prometheus text format.
    pub fn render(&self) -> String {
        let stats = &self.server.stats;
        let snapshot = stats.snapshot();
        let outcomes = stats.outcomes();
        metrics::with_local_recorder(&self.recorder, || {
            gauge!("glockd_build_info", "version" => VERSION, "commit" => COMMIT).set(1.0);
            for verb in Verb::ALL {
                counter!("glockd_commands_total", "command" => verb.word())
                    .absolute(snapshot.commands[verb.index()]);
            }
            counter!("glockd_invalid_commands_total").absolute(snapshot.invalid_commands);
            for verb in Verb::ALL {
                let counts = &outcomes.lock_results[verb.index()];
                let expected = LockResult::expected(verb);
                for result in LockResult::ALL {
                    let value = counts[result as usize];
                    // The results a command can have from the start, at zero; anything else
                    // only once it happened.
                    if value > 0 || expected.contains(&result) {
                        counter!(
                            "glockd_lock_requests_total",
                            "command" => verb.word(),
                            "result" => result.label()
                        )
                        .absolute(value);
                    }
                }
            }
            gauge!("glockd_connections").set(snapshot.connections as f64);
            gauge!("glockd_max_connections").set(self.server.config.max_connections as f64);
            let buffers = &self.server.client_buffers;
            gauge!("glockd_client_buffer_bytes").set(buffers.total() as f64);
            gauge!("glockd_max_client_buffer_bytes").set(buffers.limit() as f64);
            counter!("glockd_connections_accepted_total").absolute(snapshot.connections_total);
            for reason in RefuseReason::ALL {
                counter!("glockd_connections_refused_total", "reason" => reason.label())
                    .absolute(outcomes.connections_refused[reason as usize]);
            }
            let mut by_server = 0;
            for reason in CloseReason::ALL {
                let value = outcomes.connections_closed_by[reason as usize];
                by_server += value;
                counter!("glockd_connections_closed_total", "reason" => reason.label())
                    .absolute(value);
            }
            // A reason is counted a moment before its connection is counted closed, so this
            // difference can dip while one is on its way out; the recorder's `absolute` keeps
            // the highest value set, so the counter never goes back.
            counter!("glockd_connections_closed_total", "reason" => "other")
                .absolute(outcomes.connections_closed.saturating_sub(by_server));
            counter!("glockd_accept_errors_total").absolute(outcomes.accept_errors);
            gauge!("glockd_locks", "kind" => "exclusive").set(snapshot.locks as f64);
            gauge!("glockd_locks", "kind" => "shared").set(snapshot.shared_locks as f64);
            counter!("glockd_orphaned_locks_total", "kind" => "exclusive")
                .absolute(snapshot.orphans);
            counter!("glockd_orphaned_locks_total", "kind" => "shared")
                .absolute(snapshot.shared_orphans);
            if let Some(tls) = &self.server.tls {
                for door in TlsDoor::ALL {
                    for result in HandshakeResult::ALL {
                        counter!(
                            "glockd_tls_handshakes_total",
                            "door" => door.label(),
                            "result" => result.label()
                        )
                        .absolute(tls.handshakes(door, result));
                    }
                }
                gauge!("glockd_tls_handshakes_in_progress").set(tls.in_progress() as f64);
                counter!("glockd_tls_reloads_total", "result" => "ok").absolute(tls.reloads(true));
                counter!("glockd_tls_reloads_total", "result" => "failed")
                    .absolute(tls.reloads(false));
            }
            gauge!("glockd_shards").set(stats.shards() as f64);
            gauge!("glockd_lock_waiters").set(snapshot.lock_waiters as f64);
            for (outcome, value) in [
                ("started", snapshot.lock_waits_started),
                ("granted", snapshot.lock_waits_granted),
                ("timed_out", snapshot.lock_waits_timed_out),
            ] {
                counter!("glockd_lock_waits_total", "outcome" => outcome).absolute(value);
            }
            counter!("glockd_rate_limit_decisions_total", "result" => "allowed")
                .absolute(snapshot.rate_limit_allowed);
            counter!("glockd_rate_limit_decisions_total", "result" => "limited")
                .absolute(snapshot.rate_limit_limited);
            let memory = &self.server.memory;
            gauge!("glockd_memory_budget_bytes").set(memory.limit() as f64);
            gauge!("glockd_memory_registry_bytes").set(memory.registry_used() as f64);
            let iam_refused: u64 = stats.cells().map(|c| c.iam_out_of_memory.get()).sum();
            for verb in Verb::ALL {
                let refused = match verb {
                    Verb::Iam => iam_refused,
                    verb => outcomes.lock_results[verb.index()][LockResult::OutOfMemory as usize],
                };
                // Exported from the start for every command that can be refused.
                if refused > 0 || may_store(verb) {
                    counter!("glockd_out_of_memory_total", "command" => verb.word())
                        .absolute(refused);
                }
            }
            let evictions: u64 = stats.cells().map(|c| c.rate_limit_evictions.get()).sum();
            counter!("glockd_ratelimit_evictions_total").absolute(evictions);
            let fencing = &self.server.fencing;
            gauge!("glockd_fencing_ceiling").set(fencing.ceiling().unwrap_or(0) as f64);
            counter!("glockd_fencing_ceiling_writes_total").absolute(fencing.writes());
            counter!("glockd_fencing_ceiling_write_errors_total").absolute(fencing.write_errors());
            let upgrades = &self.server.upgrades;
            let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            for (result, count) in [
                ("started", load(&upgrades.started)),
                ("completed", load(&upgrades.completed)),
                ("rolled_back", load(&upgrades.rolled_back)),
            ] {
                counter!("glockd_upgrades_total", "result" => result).absolute(count);
            }
            gauge!("glockd_upgrade_last_pause_seconds")
                .set(load(&upgrades.last_pause_us) as f64 / 1e6);
            gauge!("glockd_upgrade_last_seconds").set(load(&upgrades.last_total_us) as f64 / 1e6);
            gauge!("glockd_upgrade_carried", "what" => "connections")
                .set(load(&upgrades.carried_connections) as f64);
            gauge!("glockd_upgrade_carried", "what" => "locks")
                .set(load(&upgrades.carried_locks) as f64);
            counter!("glockd_upgrade_closed_connections_total")
                .absolute(load(&upgrades.closed_connections));
            counter!("glockd_log_dropped_total").absolute(crate::logging::dropped_lines());
            counter!("glockd_metrics_connections_refused_total")
                .absolute(self.refused.load(Ordering::Relaxed));
            if self.server.users.is_some() {
                let users = stats.users();
                for door in DoorKind::ALL {
                    let at = door.index();
                    for result in AuthResult::ALL {
                        counter!(
                            "glockd_auth_total",
                            "door" => door.label(),
                            "result" => result.label()
                        )
                        .absolute(users.auth[at][result as usize]);
                    }
                    for class in Class::ALL.into_iter().filter(|c| *c != Class::Connection) {
                        counter!(
                            "glockd_permission_denied_total",
                            "door" => door.label(),
                            "class" => class.label()
                        )
                        .absolute(users.permission_denied[at][class.index()]);
                    }
                    counter!("glockd_auth_required_total", "door" => door.label())
                        .absolute(users.auth_required[at]);
                }
            }
            for (shard_index, cell) in stats.cells().enumerate() {
                let shard = shard_index.to_string();
                gauge!("glockd_shard_locks", "shard" => shard.clone(), "kind" => "exclusive")
                    .set(cell.locks.get() as f64);
                gauge!("glockd_shard_locks", "shard" => shard.clone(), "kind" => "shared")
                    .set(cell.shared_locks.get() as f64);
                counter!("glockd_shard_operations_total", "shard" => shard.clone())
                    .absolute(cell.operations());
                counter!("glockd_shard_commands_total", "shard" => shard.clone(), "path" => "local")
                    .absolute(cell.local_commands.get());
                counter!("glockd_shard_commands_total", "shard" => shard.clone(), "path" => "remote")
                    .absolute(cell.remote_commands.get());
                counter!("glockd_shard_mailbox_messages_total", "shard" => shard.clone())
                    .absolute(cell.mailbox_messages.get());
                counter!("glockd_shard_mailbox_commands_total", "shard" => shard.clone())
                    .absolute(cell.mailbox_commands.get());
                gauge!("glockd_memory_used_bytes", "shard" => shard.clone())
                    .set(cell.memory_used.get() as f64);
                let wakes = self.server.mailboxes.get(shard_index).wakes();
                counter!("glockd_shard_mailbox_wakeups_total", "shard" => shard.clone())
                    .absolute(wakes);
            }
            self.process.collect();
        });
        let mut text = self.handle.render();
        self.render_latency(&mut text);
        self.render_lock_waits(&mut text);
        self.render_fencing_wait(&mut text);
        text
    }

    /// The time grants waited at the fencing ceiling, written by hand: the recorder's counters
    /// are whole numbers, and these waits are fractions of a second.
    fn render_fencing_wait(&self, text: &mut String) {
        let name = "glockd_fencing_ceiling_wait_seconds_total";
        let _ = writeln!(
            text,
            "# HELP {name} Time exclusive grants waited for a ceiling write, summed over shards \
             (0 in normal operation)."
        );
        let _ = writeln!(text, "# TYPE {name} counter");
        let seconds = self.server.fencing.waited().as_secs_f64();
        let _ = writeln!(text, "{name} {seconds}");
    }

    /// The latency histogram: cumulative `le` buckets in seconds, `_sum`, `_count`, per
    /// command word.
    fn render_latency(&self, text: &mut String) {
        let name = "glockd_command_duration_seconds";
        let _ = writeln!(
            text,
            "# HELP {name} Time from reading a command to its reply being ready, by command word \
             (time spent waiting for a lock left out: see glockd_lock_wait_seconds)."
        );
        let _ = writeln!(text, "# TYPE {name} histogram");
        let latency = self.server.stats.latency();
        for verb in Verb::ALL {
            let histogram = &latency[verb.index()];
            let bounds = (0..LATENCY_BUCKETS).map(latency_bucket_ns);
            let label = format!("command=\"{}\"", verb.word());
            write_histogram(
                text,
                name,
                &label,
                bounds,
                &histogram.buckets,
                histogram.sum_ns,
            );
        }
    }

    /// How long `gw` and `sgw` waited, with buckets up to the longest wait the server allows
    /// (`-max-wait-ms`).
    fn render_lock_waits(&self, text: &mut String) {
        let name = "glockd_lock_wait_seconds";
        let _ = writeln!(
            text,
            "# HELP {name} How long answered gw and sgw waits took, from the request reaching \
             the server to the grant, the timeout or the refusal."
        );
        let _ = writeln!(text, "# TYPE {name} histogram");
        let exported = wait_buckets_for(self.server.config.max_wait_ms);
        let waits = self.server.stats.lock_waits();
        for (wait, verb) in waits.iter().zip([Verb::GetWait, Verb::SharedGetWait]) {
            // Waits past the last exported bound (a timeout a hair over -max-wait-ms) are
            // counted in +Inf only.
            let mut buckets = [0; WAIT_BUCKETS + 1];
            buckets[..exported].copy_from_slice(&wait.buckets[..exported]);
            buckets[exported] = wait.buckets[exported..].iter().sum();
            let label = format!("command=\"{}\"", verb.word());
            let bounds = WAIT_BUCKETS_NS[..exported].iter().copied();
            write_histogram(
                text,
                name,
                &label,
                bounds,
                &buckets[..=exported],
                wait.sum_ns,
            );
        }
    }
}

/// Writes one labelled histogram: cumulative `le` buckets in seconds (one per bound in
/// nanoseconds, then `+Inf`), `_sum` and `_count`. `buckets` holds one count per bound, not
/// cumulative, then the overflow.
fn write_histogram(
    text: &mut String,
    name: &str,
    label: &str,
    bounds: impl Iterator<Item = u64>,
    buckets: &[u64],
    sum_ns: u64,
) {
    let mut cumulative = 0;
    for (bound, count) in bounds.zip(buckets) {
        cumulative += count;
        let le = bound as f64 / 1e9;
        let _ = writeln!(text, "{name}_bucket{{{label},le=\"{le}\"}} {cumulative}");
    }
    let count: u64 = buckets.iter().sum();
    let _ = writeln!(text, "{name}_bucket{{{label},le=\"+Inf\"}} {count}");
    let sum = sum_ns as f64 / 1e9;
    let _ = writeln!(text, "{name}_sum{{{label}}} {sum}");
    let _ = writeln!(text, "{name}_count{{{label}}} {count}");
}
