//! The Prometheus endpoint, on its own thread, off the shard threads: `GET /metrics` (the
//! scrape, see [`render`]) and `GET /healthz` (a round trip through every shard, see
//! [`health`]).
//!
//! Everything `q` shows comes from the same lock-free per-shard cells, read at scrape time, so
//! the endpoint and `q` always agree and a scrape never waits on a shard. Command latency and
//! lock waits are kept in fixed per-shard buckets (see [`crate::stats`]) and written out as
//! real Prometheus histograms. Process figures (memory, CPU, file descriptors, start time) come
//! from `metrics-process`.

pub mod health;
mod render;

use std::io;
use std::net::TcpListener as StdTcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};

use crate::shard::ServerState;

pub use render::{Exporter, COMMIT, VERSION};

/// Largest HTTP request head accepted (a scrape's is a few hundred bytes).
const MAX_REQUEST: usize = 8 * 1024;

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The running endpoint: a thread serving HTTP until stopped.
pub struct Endpoint {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Serves `/metrics` and `/healthz` on `listener` from a thread of its own.
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

/// Answers one HTTP request: `GET /metrics` (or `/`) gets the scrape, `GET /healthz` the
/// health check, anything else an error.
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
    let mut target = path.splitn(2, |&b| b == b'?');
    let path = target.next().unwrap_or_default();
    let query = target.next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics" | b"/") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            exporter.render(),
        ),
        (b"GET", b"/healthz") => {
            let deadline = health::deadline_from_query(query);
            let health = health::check(&exporter.server, deadline).await;
            let status = match health.healthy {
                true => "200 OK",
                false => "503 Service Unavailable",
            };
            (status, "text/plain", health.text)
        }
        (b"GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics or /healthz\n".into(),
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
