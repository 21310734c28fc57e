//! The Prometheus endpoint: `GET /metrics` on its own thread, off the shard threads.
//!
//! Everything `q` shows comes from the same lock-free per-shard cells, read at scrape time and
//! handed to the `metrics-exporter-prometheus` recorder as absolute values, so the endpoint and
//! `q` always agree and the command path never touches the recorder. Command latency is kept in
//! fixed per-shard buckets (see [`crate::stats::Latency`]), merged and written out here as a
//! real Prometheus histogram, because the exporter's own histograms buffer every sample between
//! scrapes. Process figures (memory, CPU, file descriptors, start time) come from
//! `metrics-process`.

use std::fmt::Write as _;
use std::io;
use std::net::TcpListener as StdTcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};

use crate::protocol::Verb;
use crate::shard::ServerState;
use crate::stats::{latency_bucket_ns, LATENCY_BUCKETS};

/// Largest HTTP request head accepted (a scrape's is a few hundred bytes).
const MAX_REQUEST: usize = 8 * 1024;

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Renders the metrics text.
pub struct Exporter {
    server: Arc<ServerState>,
    /// A recorder of our own (not the process-global one), so several servers in one process
    /// each export their own numbers.
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    /// Connections turned away over `--metrics-max-connections`.
    refused: AtomicU64,
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
            describe_gauge!("glockd_connections", "Connections open now, all doors.");
            describe_counter!(
                "glockd_connections_accepted_total",
                "Connections accepted since start."
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
                "glockd_fencing_ceiling",
                "The durable fencing token ceiling: every token issued is below it (0 without \
                 -state-file)."
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
                "glockd_log_dropped_total",
                "Log lines dropped because the log writer was behind (its queue was full)."
            );
            describe_counter!(
                "glockd_metrics_connections_refused_total",
                "Connections to this endpoint closed at once because -metrics-max-connections \
                 were open already."
            );
            describe_histogram!(
                "glockd_command_duration_seconds",
                Unit::Seconds,
                "Time from reading a command to its reply being ready, by command word."
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
        metrics::with_local_recorder(&self.recorder, || {
            for verb in Verb::ALL {
                counter!("glockd_commands_total", "command" => verb.word())
                    .absolute(snapshot.commands[verb.index()]);
            }
            counter!("glockd_invalid_commands_total").absolute(snapshot.invalid_commands);
            gauge!("glockd_connections").set(snapshot.connections as f64);
            counter!("glockd_connections_accepted_total").absolute(snapshot.connections_total);
            gauge!("glockd_locks", "kind" => "exclusive").set(snapshot.locks as f64);
            gauge!("glockd_locks", "kind" => "shared").set(snapshot.shared_locks as f64);
            counter!("glockd_orphaned_locks_total", "kind" => "exclusive")
                .absolute(snapshot.orphans);
            counter!("glockd_orphaned_locks_total", "kind" => "shared")
                .absolute(snapshot.shared_orphans);
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
            let fencing = &self.server.fencing;
            gauge!("glockd_fencing_ceiling").set(fencing.ceiling().unwrap_or(0) as f64);
            counter!("glockd_fencing_ceiling_writes_total").absolute(fencing.writes());
            counter!("glockd_fencing_ceiling_write_errors_total").absolute(fencing.write_errors());
            counter!("glockd_log_dropped_total").absolute(crate::logging::dropped_lines());
            counter!("glockd_metrics_connections_refused_total")
                .absolute(self.refused.load(Ordering::Relaxed));
            for (shard_index, cell) in stats.cells().enumerate() {
                let shard = shard_index.to_string();
                gauge!("glockd_shard_locks", "shard" => shard.clone(), "kind" => "exclusive")
                    .set(cell.locks.get() as f64);
                gauge!("glockd_shard_locks", "shard" => shard.clone(), "kind" => "shared")
                    .set(cell.shared_locks.get() as f64);
                counter!("glockd_shard_commands_total", "shard" => shard.clone(), "path" => "local")
                    .absolute(cell.local_commands.get());
                counter!("glockd_shard_commands_total", "shard" => shard.clone(), "path" => "remote")
                    .absolute(cell.remote_commands.get());
                counter!("glockd_shard_mailbox_messages_total", "shard" => shard.clone())
                    .absolute(cell.mailbox_messages.get());
                counter!("glockd_shard_mailbox_commands_total", "shard" => shard.clone())
                    .absolute(cell.mailbox_commands.get());
                let wakes = self.server.mailboxes.get(shard_index).wakes();
                counter!("glockd_shard_mailbox_wakeups_total", "shard" => shard).absolute(wakes);
            }
            self.process.collect();
        });
        let mut text = self.handle.render();
        self.render_latency(&mut text);
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

    /// The latency histogram, written by hand: cumulative `le` buckets in seconds, `_sum`,
    /// `_count`, per command word.
    fn render_latency(&self, text: &mut String) {
        let name = "glockd_command_duration_seconds";
        let _ = writeln!(
            text,
            "# HELP {name} Time from reading a command to its reply being ready, by command word."
        );
        let _ = writeln!(text, "# TYPE {name} histogram");
        let latency = self.server.stats.latency();
        for verb in Verb::ALL {
            let histogram = &latency[verb.index()];
            let word = verb.word();
            let mut cumulative = 0;
            for i in 0..LATENCY_BUCKETS {
                cumulative += histogram.buckets[i];
                let le = latency_bucket_ns(i) as f64 / 1e9;
                let _ = writeln!(
                    text,
                    "{name}_bucket{{command=\"{word}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let count = histogram.count();
            let _ = writeln!(
                text,
                "{name}_bucket{{command=\"{word}\",le=\"+Inf\"}} {count}"
            );
            let sum = histogram.sum_ns as f64 / 1e9;
            let _ = writeln!(text, "{name}_sum{{command=\"{word}\"}} {sum}");
            let _ = writeln!(text, "{name}_count{{command=\"{word}\"}} {count}");
        }
    }
}

/// The running endpoint: a thread serving HTTP until stopped.
pub struct Endpoint {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Serves `/metrics` on `listener` from a thread of its own.
    pub fn start(server: Arc<ServerState>, listener: StdTcpListener) -> io::Result<Endpoint> {
        listener.set_nonblocking(true)?;
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("glockd-metrics".into())
            .spawn(move || {
                let exporter = Arc::new(Exporter::new(server));
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(e) => {
                            tracing::error!(
                                event = "metrics_failed",
                                error = %e,
                                "metrics endpoint failed"
                            );
                            return;
                        }
                    };
                    tokio::select! {
                        _ = accept_loop(listener, exporter) => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(Endpoint {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops serving and waits for the thread.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a connection over `--metrics-max-connections` is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 29\r\nConnection: close\r\n\r\ntoo many metrics connections\n";

async fn accept_loop(listener: TcpListener, exporter: Arc<Exporter>) {
    let max = usize::try_from(exporter.server.config.metrics_max_connections).unwrap_or(usize::MAX);
    let places = Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match places.clone().try_acquire_owned() {
                Ok(place) => {
                    let exporter = exporter.clone();
                    tokio::spawn(async move {
                        answer(stream, exporter).await;
                        drop(place);
                    });
                }
                Err(_) => {
                    // Best effort, never waiting on this client: its descriptor goes at once.
                    let _ = stream.try_write(BUSY);
                    exporter.refused.fetch_add(1, Ordering::Relaxed);
                }
            },
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Answers one HTTP request: `GET /metrics` (or `/`) gets the scrape, anything else an error.
async fn answer(mut stream: TcpStream, exporter: Arc<Exporter>) {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        true
    });
    if !matches!(read.await, Ok(true)) {
        return;
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics" | b"/") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            exporter.render(),
        ),
        (b"GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(response.as_bytes())).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_busy_answer_counts_its_body() {
        let text = std::str::from_utf8(super::BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
    }
}
