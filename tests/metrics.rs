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
    start_with(shards, |_| {})
}

/// A server with a TCP door, a TLS door (so the TLS series exist) and the metrics endpoint.
fn start_with(shards: u16, tweak: impl FnOnce(&mut Config)) -> ServerHandle {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (_, cert) = common::pki::shared();
    let mut config = Config {
        shards: Some(shards),
        pin: false,
        tls_cert: Some(cert.cert.clone()),
        tls_key: Some(cert.key.clone()),
        ..Config::default()
    };
    tweak(&mut config);
    glockd::start_with_listeners(
        config,
        Listeners {
            tcp: Some(bind()),
            tls: Some(bind()),
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
    assert_eq!(names, ["datasource", "job", "instance"]);
    assert_eq!(variables[0]["type"], "datasource");
    assert_eq!(variables[0]["query"], "prometheus");
    // Only jobs that export glockd's own series, and only that job's instances: "All" must not
    // pull in Prometheus' own process_* series.
    assert_eq!(
        variables[1]["definition"],
        "label_values(glockd_build_info, job)"
    );
    assert_eq!(
        variables[2]["definition"],
        "label_values(glockd_build_info{job=\"$job\"}, instance)"
    );
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "${datasource}");
            let expr = target["expr"].as_str().unwrap();
            assert!(
                expr.matches(r#"job="$job", instance=~"$instance""#).count()
                    == expr.matches('{').count(),
                "every selector of {expr} is scoped to the job and instance"
            );
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
        for word in metric_names(&expr) {
            assert!(
                names.contains(word),
                "the dashboard queries {word}, which is not exported"
            );
            checked += 1;
        }
    }
    assert!(checked >= 12);
}

/// The names of glockd's and the process' series in a text (recording rules' names, which hold
/// colons, are not series of the endpoint).
fn metric_names(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("glockd_") || word.starts_with("process_"))
        .filter(|word| !word.contains(':'))
}

#[test]
fn every_metric_the_alert_rules_use_is_exported() {
    let server = start(2);
    exercise(&server);
    let names: BTreeSet<String> = samples(&scrape(&server)).into_keys().collect();
    let rules = std::fs::read_to_string(repo("prometheus/glockd.rules.yml")).unwrap();
    let mut checked = BTreeSet::new();
    for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
        for word in metric_names(line) {
            // A histogram is named by its family in the descriptions.
            assert!(
                names.contains(word) || names.contains(&format!("{word}_bucket")),
                "the alert rules use {word}, which is not exported"
            );
            checked.insert(word.to_owned());
        }
    }
    assert!(checked.len() >= 10, "{checked:?}");
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
        let rules = repo("prometheus/glockd.rules.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: glockd\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules.display()
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

    /// Waits (bounded) until every loaded rule has been evaluated, and asserts none failed.
    fn wait_until_every_rule_evaluated_cleanly(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = http_get(self.addr, "/api/v1/rules");
            assert_eq!(status, 200, "{body}");
            let value: serde_json::Value = serde_json::from_str(&body).unwrap();
            let rules: Vec<serde_json::Value> = value["data"]["groups"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|group| group["rules"].as_array().unwrap().clone())
                .collect();
            assert!(rules.len() >= 10, "{body}");
            for rule in &rules {
                assert_ne!(rule["health"], "err", "{rule}");
            }
            if rules.iter().all(|rule| rule["health"] == "ok") {
                return;
            }
            assert!(Instant::now() < deadline, "rules never evaluated: {body}");
            std::thread::sleep(Duration::from_millis(250));
        }
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
            .replace("$job", "glockd")
            .replace("$instance", &regex_escape(&instance));
        prometheus.wait_for(&expr);
    }
    // The shipped rules run against the real series: every recording rule yields data, and
    // every rule evaluates without error.
    for record in [
        "instance:glockd_lock_acquisitions:rate5m",
        "instance:glockd_lock_refusal_ratio:rate5m",
        "instance_shard:glockd_shard_operations:rate5m",
    ] {
        prometheus.wait_for(record);
    }
    prometheus.wait_until_every_rule_evaluated_cleanly();
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

#[test]
fn the_alert_rules_pass_promtool_and_their_own_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let run = |args: &[&str]| {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(repo("prometheus"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["check", "rules", "glockd.rules.yml"]);
    run(&["test", "rules", "glockd.rules.test.yml"]);
}

/// A line-protocol connection for the tests below.
struct Line {
    stream: TcpStream,
    reader: std::io::BufReader<TcpStream>,
}

impl Line {
    fn connect(addr: SocketAddr) -> Line {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let reader = std::io::BufReader::new(stream.try_clone().unwrap());
        Line { stream, reader }
    }

    fn send(&mut self, lines: &str) {
        self.stream.write_all(lines.as_bytes()).unwrap();
    }

    fn reply(&mut self) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.reader, &mut line).unwrap();
        line
    }

    fn ask(&mut self, line: &str) -> String {
        self.send(&format!("{line}\n"));
        self.reply()
    }
}

/// One sample of a scrape, by its exact labels (0 when absent).
fn sample(scraped: &BTreeMap<String, BTreeMap<String, f64>>, name: &str, labels: &str) -> f64 {
    scraped
        .get(name)
        .and_then(|series| series.get(labels))
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn refusals_are_counted_by_command_and_result() {
    let server = start_with(2, |config| {
        config.max_connections = 2;
        config.max_locks_per_conn = 2;
    });
    let addr = server.tcp_addr().unwrap();
    let mut a = Line::connect(addr);
    assert_eq!(a.ask("g a"), "1 Got Lock\n");
    assert_eq!(a.ask("sg t"), "1 Got Shared Lock\n");
    assert_eq!(a.ask("g b"), "0 Lock Limit Reached\n");
    let mut b = Line::connect(addr);
    assert_eq!(b.ask("g a"), "0 Cannot Get Lock\n");
    assert_eq!(b.ask("sgl 1 t"), "0 Shared Lock Full\n");
    assert_eq!(b.ask("sgl x t"), "0 Usage: sgl LIMIT NAME\n");
    assert_eq!(b.ask("r a"), "0 Cannot Release Lock\n");
    // A third connection is one too many.
    let mut c = Line::connect(addr);
    assert_eq!(c.reply(), "0 Too Many Connections\n");

    let scraped = samples(&scrape(&server));
    let requests = |command: &str, result: &str| {
        sample(
            &scraped,
            "glockd_lock_requests_total",
            &format!("command=\"{command}\",result=\"{result}\""),
        )
    };
    assert_eq!(requests("g", "granted"), 1.0);
    assert_eq!(requests("g", "limit"), 1.0);
    assert_eq!(requests("g", "refused"), 1.0);
    assert_eq!(requests("sg", "granted"), 1.0);
    assert_eq!(requests("sgl", "full"), 1.0);
    assert_eq!(requests("sgl", "usage"), 1.0);
    assert_eq!(requests("r", "not_held"), 1.0);
    // The results a command can have are there from the start, at zero.
    assert!(
        scraped["glockd_lock_requests_total"].contains_key("command=\"gw\",result=\"timed_out\"")
    );
    assert_eq!(requests("gw", "timed_out"), 0.0);
    // Commands about no lock have no results.
    assert!(!scraped["glockd_lock_requests_total"]
        .keys()
        .any(|labels| labels.starts_with("command=\"q\"")));
    assert_eq!(
        sample(
            &scraped,
            "glockd_connections_refused_total",
            "reason=\"max_connections\""
        ),
        1.0
    );
    assert_eq!(sample(&scraped, "glockd_max_connections", ""), 2.0);
    // Every lock operation is counted on the shard that applied it; the usage error never
    // reached a shard.
    let operations: f64 = scraped["glockd_shard_operations_total"].values().sum();
    assert_eq!(operations, 6.0);
    assert_eq!(scraped["glockd_shard_operations_total"].len(), 2);
    let build = &scraped["glockd_build_info"];
    assert_eq!(build.len(), 1);
    let (labels, value) = build.iter().next().unwrap();
    assert_eq!(*value, 1.0);
    assert!(
        labels.starts_with(&format!(
            "version=\"{}\",commit=\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{labels}"
    );
    assert_eq!(sample(&scraped, "glockd_accept_errors_total", ""), 0.0);
}

/// The finite `le` bounds of one labelled histogram in a scrape, in order.
fn bucket_bounds(text: &str, name: &str, label: &str) -> Vec<f64> {
    let prefix = format!("{name}_bucket{{{label},le=\"");
    text.lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| rest.split('"').next())
        .filter(|le| *le != "+Inf")
        .map(|le| le.parse().unwrap())
        .collect()
}

#[test]
fn a_command_pipelined_behind_a_wait_is_not_timed_at_the_waits_length() {
    for shards in [1, 2] {
        let server = start_with(shards, |config| config.max_wait_ms = 60_000);
        let addr = server.tcp_addr().unwrap();
        let mut holder = Line::connect(addr);
        assert_eq!(holder.ask("g busy"), "1 Got Lock\n");
        let mut waiter = Line::connect(addr);
        // One write: the `i` is read in the same batch as the `gw`, and runs after it.
        waiter.send("gw 10000 busy\ni other\n");
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(holder.ask("r busy"), "1 Released Lock\n");
        assert_eq!(waiter.reply(), "1 Got Lock\n");
        assert_eq!(waiter.reply(), "0 Not Locked\n");
        // And a wait that runs out of time.
        assert_eq!(holder.ask("g busy2"), "1 Got Lock\n");
        assert_eq!(waiter.ask("gw 100 busy2"), "0 Timed Out\n");

        let text = scrape(&server);
        let scraped = samples(&text);
        // The wait is in the wait histogram: two waits, one of at least 400 ms.
        let waits = |suffix: &str, labels: &str| {
            sample(
                &scraped,
                &format!("glockd_lock_wait_seconds{suffix}"),
                labels,
            )
        };
        assert_eq!(waits("_count", "command=\"gw\""), 2.0);
        assert!(waits("_sum", "command=\"gw\"") >= 0.5);
        assert_eq!(waits("_bucket", "command=\"gw\",le=\"0.05\""), 0.0);
        assert_eq!(waits("_bucket", "command=\"gw\",le=\"+Inf\""), 2.0);
        assert_eq!(waits("_count", "command=\"sgw\""), 0.0);
        // ... and not in any command's latency: the `i`, and the `gw` itself, took far less
        // than the 400 ms the batch spent waiting.
        for command in ["i", "gw"] {
            let label = format!("command=\"{command}\"");
            let count = sample(&scraped, "glockd_command_duration_seconds_count", &label);
            let fast = sample(
                &scraped,
                "glockd_command_duration_seconds_bucket",
                &format!("{label},le=\"0.067108864\""),
            );
            assert!(count >= 1.0, "{command}");
            assert_eq!(fast, count, "{command} timed with the wait in it");
        }
        let requests = |result: &str| {
            sample(
                &scraped,
                "glockd_lock_requests_total",
                &format!("command=\"gw\",result=\"{result}\""),
            )
        };
        assert_eq!(requests("granted"), 1.0);
        assert_eq!(requests("timed_out"), 1.0);
        // Buckets reach -max-wait-ms (60 s) and stop there: the last finite bound is 100 s.
        let bounds = bucket_bounds(&text, "glockd_lock_wait_seconds", "command=\"gw\"");
        assert_eq!(bounds.first(), Some(&0.0001));
        assert_eq!(bounds.last(), Some(&100.0));
    }
    // With the default -max-wait-ms (an hour), up to 5000 s.
    let text = scrape(&start(1));
    let bounds = bucket_bounds(&text, "glockd_lock_wait_seconds", "command=\"sgw\"");
    assert_eq!(bounds.last(), Some(&5000.0));
    // Command latency reaches past the old 1.07 s ceiling.
    let bounds = bucket_bounds(&text, "glockd_command_duration_seconds", "command=\"g\"");
    assert!(*bounds.last().unwrap() > 10.0, "{bounds:?}");
}

#[test]
fn connections_the_server_closes_are_counted_by_reason() {
    let server = start_with(2, |config| {
        config.max_line_bytes = 64;
        config.idle_timeout = 1;
    });
    let addr = server.tcp_addr().unwrap();
    let mut long = Line::connect(addr);
    long.send(&"x".repeat(100));
    assert_eq!(long.reply(), "0 Line Too Long\n");
    let mut idle = Line::connect(addr);
    let mut polite = Line::connect(addr);
    assert_eq!(polite.ask("g a"), "1 Got Lock\n");
    drop(polite);
    // The idle one is closed after a second of silence.
    assert_eq!(idle.reply(), "");
    let deadline = Instant::now() + Duration::from_secs(20);
    let scraped = loop {
        let scraped = samples(&scrape(&server));
        if sample(&scraped, "glockd_connections", "") == 0.0 {
            break scraped;
        }
        assert!(Instant::now() < deadline, "connections never closed");
        std::thread::sleep(Duration::from_millis(10));
    };
    let closed = |reason: &str| {
        sample(
            &scraped,
            "glockd_connections_closed_total",
            &format!("reason=\"{reason}\""),
        )
    };
    assert_eq!(closed("line_too_long"), 1.0);
    assert_eq!(closed("idle_timeout"), 1.0);
    assert_eq!(closed("write_timeout"), 0.0);
    assert_eq!(closed("unread_replies"), 0.0);
    assert_eq!(closed("other"), 1.0);
    let all: f64 = scraped["glockd_connections_closed_total"].values().sum();
    assert_eq!(
        all,
        sample(&scraped, "glockd_connections_accepted_total", "")
    );
}

#[test]
fn healthz_answers_once_every_shard_has() {
    let server = start(4);
    let addr = server.metrics_addr().unwrap();
    let (status, body) = http_get(addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ok: 4 shards answered in "), "{body}");
    let (status, body) = http_get(addr, "/healthz?timeout_ms=5000");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn the_memory_budget_its_use_and_its_refusals_are_exported() {
    let server = start_with(1, |config| {
        config.max_memory = Some(1 << 20);
        config.max_name_bytes = 1 << 20;
    });
    let addr = server.tcp_addr().unwrap();
    let scraped = samples(&scrape(&server));
    assert_eq!(
        sample(&scraped, "glockd_memory_budget_bytes", ""),
        1_048_576.0
    );
    assert_eq!(scraped["glockd_memory_used_bytes"]["shard=\"0\""], 0.0);
    assert_eq!(sample(&scraped, "glockd_memory_registry_bytes", ""), 0.0);
    // Every command that can be refused has its series from the start.
    for command in ["g", "gt", "gw", "sg", "sgl", "sgw", "rl", "iam"] {
        let labels = format!("command=\"{command}\"");
        assert_eq!(
            scraped["glockd_out_of_memory_total"].get(&labels),
            Some(&0.0),
            "{command}"
        );
    }
    assert_eq!(
        sample(&scraped, "glockd_ratelimit_evictions_total", ""),
        0.0
    );

    // One lock of a 100 000-byte name: its slot, its name's heap block, its holder's entry.
    let mut a = Line::connect(addr);
    let big = |i: usize| format!("{i:06}{}", "x".repeat(100_000 - 6));
    assert_eq!(a.ask(&format!("g {}", big(0))), "1 Got Lock\n");
    let one_lock = glockd::table::EXCLUSIVE_BYTES
        + glockd::table::HOLDINGS_BYTES
        + glockd::memory::heap_block(100_000);
    let scraped = samples(&scrape(&server));
    assert_eq!(
        scraped["glockd_memory_used_bytes"]["shard=\"0\""],
        one_lock as f64
    );
    // Fill the budget: ten of them fit, the rest are refused and counted.
    let mut refused = 0;
    for i in 1..15 {
        match a.ask(&format!("g {}", big(i))).as_str() {
            "1 Got Lock\n" => {}
            "0 Out Of Memory\n" => refused += 1,
            other => panic!("{other}"),
        }
    }
    assert_eq!(refused, 15 - 10);
    assert_eq!(
        a.ask(&format!("iam {}", "n".repeat(200_000))),
        "0 Out Of Memory\n"
    );
    assert_eq!(a.ask("iam small"), "1 ok\n");
    // Room for a few thousand limiters, then every new one evicts another.
    assert_eq!(a.ask(&format!("r {}", big(0))), "1 Released Lock\n");
    let limiters = 5000;
    let batch: String = (0..limiters)
        .map(|i| format!("rl r{i} 0 1 86400000\n"))
        .collect();
    a.send(&batch);
    for _ in 0..limiters {
        assert_eq!(a.reply(), "1 1 0 0 86400000\n");
    }
    let scraped = samples(&scrape(&server));
    let out_of_memory = |command: &str| {
        sample(
            &scraped,
            "glockd_out_of_memory_total",
            &format!("command=\"{command}\""),
        )
    };
    assert_eq!(out_of_memory("g"), refused as f64);
    assert_eq!(out_of_memory("iam"), 1.0);
    assert_eq!(out_of_memory("rl"), 0.0);
    assert_eq!(
        sample(
            &scraped,
            "glockd_lock_requests_total",
            "command=\"g\",result=\"out_of_memory\""
        ),
        refused as f64
    );
    // One shard: the budget is checked exactly, so the evictions can be counted in advance.
    let locks = 9 * (one_lock - glockd::table::HOLDINGS_BYTES) + glockd::table::HOLDINGS_BYTES;
    let room = (1 << 20) - locks - glockd::memory::MemoryBudget::registered_name_cost(5);
    let kept = room / glockd::ratelimit::LIMITER_BYTES;
    assert_eq!(
        sample(&scraped, "glockd_ratelimit_evictions_total", ""),
        (limiters - kept) as f64
    );
    assert_eq!(
        sample(&scraped, "glockd_memory_registry_bytes", ""),
        glockd::memory::MemoryBudget::registered_name_cost(5) as f64
    );
    let used = scraped["glockd_memory_used_bytes"]["shard=\"0\""];
    assert!(used <= 1_048_576.0, "{used}");
}
