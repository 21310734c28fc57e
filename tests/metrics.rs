//! The Prometheus endpoint: it agrees with `q`, passes `promtool`, feeds a real Prometheus, and
//! every panel of the shipped Grafana dashboard finds data in it.
//!
//! The tests that need Prometheus' own tools (Debian's `prometheus` package, which `.ci/run`
//! installs) are skipped with a note when the tools are missing, unless
//! GLOCKD_REQUIRE_PROMETHEUS=1 (as in CI), which makes a missing tool a failure.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use glockd::{Config, Listeners, ServerHandle};

fn start(shards: u16) -> ServerHandle {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = Config {
        shards: Some(shards),
        pin: false,
        ..Config::default()
    };
    glockd::start_with_listeners(
        config,
        Listeners {
            tcp: Some(bind()),
            metrics: Some(bind()),
            ..Listeners::default()
        },
    )
    .unwrap()
}

/// A plain HTTP GET; returns (status, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, body.to_owned())
}

fn scrape(server: &ServerHandle) -> String {
    let (status, body) = http_get(server.metrics_addr().unwrap(), "/metrics");
    assert_eq!(status, 200);
    body
}

/// Sample name -> (labels -> value) for every sample of a scrape.
fn samples(text: &str) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let value = if value == "+Inf" {
            f64::INFINITY
        } else {
            value.parse().expect("a number")
        };
        out.entry(name.to_owned())
            .or_default()
            .insert(labels.to_owned(), value);
    }
    out
}

/// Drives a little of everything: locks on every shard, shared locks, an invalid command, a
/// listing, and a disconnect that orphans locks.
fn exercise(server: &ServerHandle) {
    let addr = server.tcp_addr().unwrap();
    let talk = |commands: &str| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(commands.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let batch: String = (0..50)
        .map(|i| format!("g m{i}\nsg s{i}\ni m{i}\n"))
        .collect();
    talk(&format!("{batch}nope\nd\nq\n"));
    talk("g kept\nr kept\nsr s1\nsi s1\nme\niam x\nwho\nsd\ndump\n");
    talk("gw 1 kept\nsgl 5 sem\nrl api 1 1 60000\nrl api 1 1 60000\nrl api 1 1 60000\ngt fenced\nt fenced\nh\n");
}

#[test]
fn the_endpoint_and_q_agree_on_every_counter() {
    let server = start(2);
    exercise(&server);
    let addr = server.tcp_addr().unwrap();
    // Wait until the disconnects are fully orphaned, then compare.
    let deadline = Instant::now() + Duration::from_secs(20);
    let q = loop {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"q\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let q: BTreeMap<String, f64> = text
            .lines()
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap();
                (k.to_owned(), v.parse().unwrap())
            })
            .collect();
        if q["orphans"] == 52.0 && q["connections"] == 1.0 {
            break q;
        }
        assert!(Instant::now() < deadline, "orphans never settled: {q:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let scraped = samples(&scrape(&server));
    let one = |name: &str, labels: &str| scraped[name][labels];
    for verb in glockd::protocol::Verb::ALL {
        let word = verb.word();
        let expected = q[&format!("command_{word}")];
        assert_eq!(
            one("glockd_commands_total", &format!("command=\"{word}\"")),
            expected,
            "{word}"
        );
    }
    assert_eq!(
        one("glockd_invalid_commands_total", ""),
        q["invalid_commands"]
    );
    // The q connection itself is gone by the time of the scrape.
    assert_eq!(one("glockd_connections", ""), 0.0);
    assert_eq!(one("glockd_connections_accepted_total", ""), 4.0);
    assert_eq!(one("glockd_locks", "kind=\"exclusive\""), q["locks"]);
    assert_eq!(one("glockd_locks", "kind=\"shared\""), q["shared_locks"]);
    assert_eq!(
        one("glockd_orphaned_locks_total", "kind=\"exclusive\""),
        q["orphans"]
    );
    assert_eq!(
        one("glockd_orphaned_locks_total", "kind=\"shared\""),
        q["shared_orphans"]
    );
    // Latency: every command counted once in its histogram.
    for verb in glockd::protocol::Verb::ALL {
        let word = verb.word();
        let count = one(
            "glockd_command_duration_seconds_count",
            &format!("command=\"{word}\""),
        );
        let inf = one(
            "glockd_command_duration_seconds_bucket",
            &format!("command=\"{word}\",le=\"+Inf\""),
        );
        assert_eq!(count, inf);
        assert_eq!(count, q[&format!("command_{word}")], "{word} latency count");
    }
    // Per shard: locks add up, and the mailbox saw the cross-shard commands.
    let shard_locks: f64 = scraped["glockd_shard_locks"].values().sum();
    assert_eq!(shard_locks, q["locks"] + q["shared_locks"]);
    let remote: f64 = scraped["glockd_shard_commands_total"]
        .iter()
        .filter(|(labels, _)| labels.contains("remote"))
        .map(|(_, v)| v)
        .sum();
    let mailbox: f64 = scraped["glockd_shard_mailbox_commands_total"]
        .values()
        .sum();
    assert_eq!(remote, mailbox);
    assert!(remote > 0.0);
    // Process basics.
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
    ] {
        assert!(scraped.contains_key(name), "missing {name}");
    }
    assert!(one("process_resident_memory_bytes", "") > 0.0);
}

#[test]
fn other_paths_and_methods_get_http_errors() {
    let server = start(1);
    let addr = server.metrics_addr().unwrap();
    assert_eq!(http_get(addr, "/nope").0, 404);
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"POST /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(repo("grafana/dashboards/glockd.json")).unwrap();
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every panel expression of the dashboard.
fn dashboard_expressions() -> Vec<String> {
    let dashboard = dashboard();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            out.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    out
}

#[test]
fn the_dashboard_is_provisionable() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "glockd-overview");
    assert!(
        dashboard.get("__inputs").is_none(),
        "export form breaks file provisioning"
    );
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let names: Vec<_> = variables
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["datasource", "instance"]);
    assert_eq!(variables[0]["type"], "datasource");
    assert_eq!(variables[0]["query"], "prometheus");
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "${datasource}");
            assert!(target["expr"].as_str().unwrap().contains("$instance"));
        }
    }
    let text = std::fs::read_to_string(repo("grafana/dashboards/glockd.json")).unwrap();
    assert!(!text.contains("DS_PROMETHEUS"));
    let provider =
        std::fs::read_to_string(repo("grafana/provisioning/dashboards/glockd.yml")).unwrap();
    assert!(provider.contains("type: file"));
    let source =
        std::fs::read_to_string(repo("grafana/provisioning/datasources/prometheus.yml")).unwrap();
    assert!(source.contains("type: prometheus"));
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let server = start(2);
    exercise(&server);
    let names: BTreeSet<String> = samples(&scrape(&server)).into_keys().collect();
    let mut checked = 0;
    for expr in dashboard_expressions() {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("glockd_") || word.starts_with("process_") {
                assert!(
                    names.contains(word),
                    "the dashboard queries {word}, which is not exported"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 12);
}

/// A Prometheus tool, or None (skipping) where it is missing and not required.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        if std::env::var("GLOCKD_REQUIRE_PROMETHEUS").is_ok_and(|v| v == "1") {
            panic!("{name} is required (GLOCKD_REQUIRE_PROMETHEUS=1) but not installed");
        }
        eprintln!("skipping: {name} is not installed (Debian package `prometheus`)");
    }
    found
}

#[test]
fn a_busy_servers_scrape_passes_promtool() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let server = start(2);
    exercise(&server);
    let text = scrape(&server);
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_shipped_prometheus_config_is_valid() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let out = Command::new(promtool)
        .args(["check", "config"])
        .arg(repo("grafana/prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server of our own, on loopback, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    fn start(binary: &Path, target: SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("glockd-prometheus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: glockd\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect(addr).is_ok() && http_get(addr, "/-/ready").0 == 200 {
                return prometheus;
            }
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs an instant query; returns the result vector.
    fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(expr)),
        );
        assert_eq!(status, 200, "query {expr}: {body}");
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        value["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits (bounded) until `expr` returns data.
    fn wait_for(&self, expr: &str) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = self.query(expr);
            if !result.is_empty() {
                return result;
            }
            assert!(Instant::now() < deadline, "no data for {expr}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn a_real_prometheus_scrapes_it_and_every_dashboard_panel_has_data() {
    let Some(binary) = tool("prometheus") else {
        return;
    };
    let server = std::sync::Arc::new(start(2));
    let prometheus = Prometheus::start(&binary, server.metrics_addr().unwrap());
    // Traffic for as long as the queries run, so every rate has recent points.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (server, stop) = (server.clone(), stop.clone());
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(240);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                exercise(&server);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let g = prometheus.wait_for("glockd_commands_total{command=\"g\"} > 0");
    assert_eq!(g[0]["metric"]["job"], "glockd");
    prometheus.wait_for(
        "histogram_quantile(0.99, sum by (le) (rate(glockd_command_duration_seconds_bucket{command=\"g\"}[10s]))) > 0",
    );
    let instance = g[0]["metric"]["instance"].as_str().unwrap().to_owned();
    for expr in dashboard_expressions() {
        let expr = expr
            .replace("$__rate_interval", "10s")
            .replace("$instance", &regex_escape(&instance));
        prometheus.wait_for(&expr);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.join().unwrap();
}

/// Escapes a label value for a `=~` regex, as Grafana does for a single selected value.
fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escape = ".+*?()|[]{}^$\\".contains(c);
            escape.then_some('\\').into_iter().chain(std::iter::once(c))
        })
        .collect::<String>()
        .replace('\\', "\\\\")
}

#[test]
fn metrics_connections_over_the_cap_are_closed_at_once_and_counted() {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = Config {
        shards: Some(1),
        pin: false,
        metrics_max_connections: 2,
        ..Config::default()
    };
    let server = glockd::start_with_listeners(
        config,
        Listeners {
            tcp: Some(bind()),
            metrics: Some(bind()),
            ..Listeners::default()
        },
    )
    .unwrap();
    let addr = server.metrics_addr().unwrap();
    // Two idle connections take both places (the endpoint would wait 10 s for their requests).
    let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    // Closed at once: a 503, or a reset if the close beat the read.
    let _ = extra.read_to_end(&mut answer);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "held for {:?}",
        started.elapsed()
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 503"),
        "{answer}"
    );
    // A place comes back when an idle one goes; the scrape counts the refusal.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let _ = write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        if let Some((head, body)) = response.split_once("\r\n\r\n") {
            if head.starts_with("HTTP/1.1 200") {
                break body.to_owned();
            }
        }
        assert!(Instant::now() < deadline, "no place came back");
        std::thread::sleep(Duration::from_millis(20));
    };
    let refused = samples(&body)["glockd_metrics_connections_refused_total"][""];
    assert!(refused >= 1.0, "{refused}");
}
