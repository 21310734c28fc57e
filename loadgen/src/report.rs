//! What a run measured: per-thread recorders while it runs, one merged report at the end, shown
//! as a table or as JSON.

use std::ops::AddAssign;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::{Config, Mode, Workload};
use crate::keys::Dist;
use crate::wire::Target;

/// Error examples kept per run: enough to see what went wrong, not a flood.
const EXAMPLES: usize = 5;

/// Longest latency the histograms hold (longer ones are clamped): one minute, in nanoseconds.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// One client thread's measurements. Connections on a thread share it (they run on one thread,
/// one at a time), so recording needs no synchronisation.
pub struct Recorder {
    /// Latency of every measured command, in nanoseconds.
    pub latency: Histogram<u64>,
    /// Replies received within the measured window.
    pub commands: u64,
    /// Unexpected or malformed replies, failed connections and exclusion violations.
    pub errors: u64,
    /// The first few error descriptions.
    pub examples: Vec<String>,
    /// What the replies said and how many connections were opened.
    pub counts: Counts,
    /// Wait: time from a holder's `r` leaving to the next waiter's grant arriving, in
    /// nanoseconds; created on the first hand-off, so other workloads pay nothing for it.
    pub handoff: Option<Histogram<u64>>,
    /// Start of the measured window: replies before it are checked but not counted.
    pub measure_from: Instant,
    /// End of the measured window.
    pub measure_until: Instant,
    /// Receipt time of the last counted reply.
    pub last_reply: Option<Instant>,
}

impl Recorder {
    pub fn new(measure_from: Instant, measure_until: Instant) -> Self {
        Recorder {
            latency: new_histogram(),
            commands: 0,
            errors: 0,
            examples: Vec::new(),
            counts: Counts::default(),
            handoff: None,
            measure_from,
            measure_until,
            last_reply: None,
        }
    }

    /// Whether a reply received at `now` is inside the measured window.
    #[inline]
    pub fn measuring(&self, now: Instant) -> bool {
        now >= self.measure_from && now <= self.measure_until
    }

    /// Records one reply to a command sent (or scheduled) at `sent`, received at `now`.
    #[inline]
    pub fn reply(&mut self, sent: Instant, now: Instant) {
        if self.measuring(now) {
            let ns = now.saturating_duration_since(sent).as_nanos() as u64;
            self.latency.saturating_record(ns.clamp(1, MAX_LATENCY_NS));
            self.commands += 1;
            self.last_reply = Some(now);
        }
    }

    /// Counts a reply received at `now` without recording its latency: wait's `gw` replies,
    /// whose latency is the time spent in the queue (the hand-off is what is measured).
    #[inline]
    pub fn count(&mut self, now: Instant) {
        if self.measuring(now) {
            self.commands += 1;
            self.last_reply = Some(now);
        }
    }

    /// Records one hand-off: a release sent at `released`, the next grant received at `now`.
    pub fn handoff(&mut self, released: Instant, now: Instant) {
        if self.measuring(now) {
            let ns = now.saturating_duration_since(released).as_nanos() as u64;
            self.handoff
                .get_or_insert_with(new_histogram)
                .saturating_record(ns.clamp(1, MAX_LATENCY_NS));
        }
    }

    /// Counts an error and keeps its description if it is one of the first.
    pub fn error(&mut self, what: impl FnOnce() -> String) {
        self.errors += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(what());
        }
    }

    /// Folds another thread's measurements into this one.
    pub fn merge(&mut self, other: Recorder) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.commands += other.commands;
        self.errors += other.errors;
        for example in other.examples {
            if self.examples.len() < EXAMPLES {
                self.examples.push(example);
            }
        }
        self.counts += other.counts;
        match (&mut self.handoff, other.handoff) {
            // Same bounds, so adding cannot fail.
            (Some(mine), Some(theirs)) => {
                let _ = mine.add(&theirs);
            }
            (mine @ None, theirs) => *mine = theirs,
            (Some(_), None) => {}
        }
        self.last_reply = self.last_reply.max(other.last_reply);
    }
}

/// What a run counts over its whole length, set-up and warm-up included (unlike `commands`,
/// which counts only the measured window): the same fields in a thread's recorder and in the
/// report.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    /// Exclusive locks granted (contention, churn, orphan-storm, hold, wait).
    pub granted: u64,
    /// Exclusive locks refused because someone else held them.
    pub refused: u64,
    /// Times two connections were both told they hold the same lock.
    pub violations: u64,
    /// Connections opened (orphan-storm opens many).
    pub connections: u64,
    /// Ratelimit sgl and rl: requests the server let through (a slot, or an allowed `rl`).
    pub allowed: u64,
    /// Ratelimit sgl and rl: requests the server turned away (`Shared Lock Full`, or limited).
    pub limited: u64,
}

impl AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.granted += other.granted;
        self.refused += other.refused;
        self.violations += other.violations;
        self.connections += other.connections;
        self.allowed += other.allowed;
        self.limited += other.limited;
    }
}

/// A latency histogram in nanoseconds: three significant digits over 1 ns..60 s, about 400 KB.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("3 significant figures is valid"))
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    /// The percentiles of a histogram in nanoseconds.
    fn of(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1e3;
        Latency {
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1e3,
        }
    }

    /// One table row's worth of percentiles.
    fn row(&self) -> String {
        format!(
            "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
            self.p50, self.p90, self.p99, self.p999, self.max, self.mean
        )
    }
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: Target,
    pub endpoint: String,
    pub workload: Workload,
    /// Ratelimit's mode (absent for other workloads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    pub conns: usize,
    pub pipeline: usize,
    pub threads: usize,
    /// Open-loop rate asked for (commands/s), if open loop.
    pub rate: Option<f64>,
    pub keys: u64,
    pub dist: Dist,
    pub key_size: usize,
    /// Length of the measured window in seconds.
    pub seconds: f64,
    /// Replies counted in the measured window.
    pub commands: u64,
    /// Commands per second over the measured window.
    pub ops_per_sec: f64,
    pub latency_us: Latency,
    pub errors: u64,
    pub error_examples: Vec<String>,
    /// Flattened: in the JSON, its fields stand here, between `error_examples` and
    /// `handoffs`, as they always have.
    #[serde(flatten)]
    pub counts: Counts,
    /// Wait: hand-offs measured (a release, then the next waiter's grant).
    pub handoffs: u64,
    /// Wait: hand-off latency percentiles (absent for other workloads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff_us: Option<Latency>,
}

impl Report {
    /// Builds the report from the merged recorder. `window` is the measured time when the run
    /// went to its deadline; a run that ended early (by `--requests`) is measured up to its last
    /// reply.
    pub fn new(config: &Config, rec: &Recorder, reached_deadline: bool) -> Self {
        let window = if reached_deadline {
            rec.measure_until
                .saturating_duration_since(rec.measure_from)
        } else {
            rec.last_reply.map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(rec.measure_from)
            })
        };
        let seconds = window.as_secs_f64();
        let wait = config.workload == Workload::Wait;
        Report {
            target: config.target,
            endpoint: config.endpoint.to_string(),
            workload: config.workload,
            mode: (config.workload == Workload::Ratelimit).then_some(config.mode),
            conns: config.conns,
            pipeline: config.pipeline,
            threads: config.threads,
            rate: config.rate,
            // Wait uses one name per group, not the whole key space.
            keys: if wait {
                crate::wait::plan(config).map_or(0, |plan| plan.names())
            } else {
                config.keys.count()
            },
            dist: config.keys.dist(),
            key_size: config.keys.size(),
            seconds,
            commands: rec.commands,
            ops_per_sec: if seconds > 0.0 {
                rec.commands as f64 / seconds
            } else {
                0.0
            },
            latency_us: Latency::of(&rec.latency),
            errors: rec.errors,
            error_examples: rec.examples.clone(),
            counts: rec.counts,
            handoffs: rec.handoff.as_ref().map_or(0, |h| h.len()),
            handoff_us: wait
                .then(|| rec.handoff.as_ref().map(Latency::of))
                .flatten(),
        }
    }

    /// The report as a small aligned table for people.
    pub fn table(&self) -> String {
        let mode = match self.rate {
            Some(rate) => format!("open loop at {rate:.0}/s"),
            // Wait has no pipeline: each group's members take turns, one command each at a time.
            None if self.workload == Workload::Wait => {
                format!("{} groups taking turns", self.keys)
            }
            None => format!("closed loop, pipeline {}", self.pipeline),
        };
        let workload = match self.mode {
            Some(mode) => format!("{:?} {mode:?}", self.workload),
            None => format!("{:?}", self.workload),
        };
        let mut rows = vec![
            (
                "target",
                format!("{:?} ({})", self.target, self.endpoint).to_lowercase(),
            ),
            (
                "workload",
                format!(
                    "{workload}, {} conns, {} threads, {mode}, {} keys {:?} of {} bytes",
                    self.conns, self.threads, self.keys, self.dist, self.key_size
                )
                .to_lowercase(),
            ),
            (
                "throughput",
                format!(
                    "{:.0} ops/s ({} commands in {:.2} s)",
                    self.ops_per_sec, self.commands, self.seconds
                ),
            ),
            (
                // Wait's `gw` replies come after a stay in the queue: only `r` is timed here.
                if self.workload == Workload::Wait {
                    "release µs"
                } else {
                    "latency µs"
                },
                self.latency_us.row(),
            ),
        ];
        if let Some(handoff) = &self.handoff_us {
            rows.push(("hand-off µs", handoff.row()));
            rows.push((
                "hand-offs",
                format!(
                    "{} ({:.0}/s)",
                    self.handoffs,
                    if self.seconds > 0.0 {
                        self.handoffs as f64 / self.seconds
                    } else {
                        0.0
                    }
                ),
            ));
        }
        let counts = &self.counts;
        if counts.allowed + counts.limited > 0 {
            let total = (counts.allowed + counts.limited) as f64;
            rows.push((
                if self.mode == Some(Mode::Sgl) {
                    "slots"
                } else {
                    "rate limit"
                },
                format!(
                    "{} allowed, {} limited ({:.1}% limited)",
                    counts.allowed,
                    counts.limited,
                    100.0 * counts.limited as f64 / total
                ),
            ));
        }
        if counts.granted + counts.refused > 0 {
            rows.push((
                "locks",
                format!(
                    "{} granted, {} refused, {} exclusion violations",
                    counts.granted, counts.refused, counts.violations
                ),
            ));
        }
        if counts.connections > self.conns as u64 {
            rows.push(("connections", format!("{} opened", counts.connections)));
        }
        rows.push(("errors", self.errors.to_string()));
        for example in &self.error_examples {
            rows.push(("  e.g.", example.clone()));
        }
        let mut out = String::new();
        for (key, value) in rows {
            out.push_str(&format!("{key:<12} {value}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Args;
    use clap::Parser;

    /// A report built from two threads' recorders with every counter set, for `flags`.
    fn report(flags: &str) -> Report {
        let line = format!("loadgen --addr 127.0.0.1:9 --conns 4 --threads 2 {flags}");
        let args = Args::try_parse_from(line.split_whitespace()).unwrap();
        let config = Config::from_args(args).unwrap();
        let from = Instant::now();
        let mut rec = Recorder::new(from, from + Duration::from_secs(2));
        let mut other = Recorder::new(from, from + Duration::from_secs(2));
        for ns in [1_500, 2_500] {
            rec.latency.record(ns).unwrap();
        }
        other.latency.record(40_000).unwrap();
        (rec.commands, other.commands) = (600, 400);
        other.error(|| "unexpected reply".into());
        (rec.counts.granted, other.counts.granted) = (4, 3);
        (rec.counts.refused, other.counts.refused) = (6, 0);
        (rec.counts.violations, other.counts.violations) = (2, 3);
        (rec.counts.connections, other.counts.connections) = (5, 4);
        (rec.counts.allowed, other.counts.allowed) = (1, 2);
        (rec.counts.limited, other.counts.limited) = (0, 1);
        other.handoff(from, from + Duration::from_micros(12));
        rec.merge(other);
        Report::new(&config, &rec, true)
    }

    /// Scripts parse both forms: the field names, their order and the table's rows are fixed.
    #[test]
    fn the_table_and_the_json_keep_their_form() {
        let sgl = report("--workload ratelimit --mode sgl");
        assert_eq!(
            serde_json::to_string(&sgl).unwrap(),
            r#"{"target":"glockd","endpoint":"tcp 127.0.0.1:9","workload":"ratelimit","mode":"sgl","conns":4,"pipeline":1,"threads":2,"rate":null,"keys":100000,"dist":"uniform","key_size":16,"seconds":2.0,"commands":1000,"ops_per_sec":500.0,"latency_us":{"p50":2.501,"p90":40.031,"p99":40.031,"p999":40.031,"max":40.031,"mean":14.672333333333333},"errors":1,"error_examples":["unexpected reply"],"granted":7,"refused":6,"violations":5,"connections":9,"allowed":3,"limited":1,"handoffs":1}"#
        );
        assert_eq!(
            sgl.table(),
            "\
target       glockd (tcp 127.0.0.1:9)
workload     ratelimit sgl, 4 conns, 2 threads, closed loop, pipeline 1, 100000 keys uniform of 16 bytes
throughput   500 ops/s (1000 commands in 2.00 s)
latency µs   p50 2.5  p90 40.0  p99 40.0  p99.9 40.0  max 40.0  mean 14.7
slots        3 allowed, 1 limited (25.0% limited)
locks        7 granted, 6 refused, 5 exclusion violations
connections  9 opened
errors       1
  e.g.       unexpected reply
"
        );
        let wait = report("--workload wait");
        assert_eq!(
            serde_json::to_string(&wait).unwrap(),
            r#"{"target":"glockd","endpoint":"tcp 127.0.0.1:9","workload":"wait","conns":4,"pipeline":1,"threads":2,"rate":null,"keys":2,"dist":"uniform","key_size":16,"seconds":2.0,"commands":1000,"ops_per_sec":500.0,"latency_us":{"p50":2.501,"p90":40.031,"p99":40.031,"p999":40.031,"max":40.031,"mean":14.672333333333333},"errors":1,"error_examples":["unexpected reply"],"granted":7,"refused":6,"violations":5,"connections":9,"allowed":3,"limited":1,"handoffs":1,"handoff_us":{"p50":12.007,"p90":12.007,"p99":12.007,"p999":12.007,"max":12.007,"mean":12.004}}"#
        );
        assert_eq!(
            wait.table(),
            "\
target       glockd (tcp 127.0.0.1:9)
workload     wait, 4 conns, 2 threads, 2 groups taking turns, 2 keys uniform of 16 bytes
throughput   500 ops/s (1000 commands in 2.00 s)
release µs   p50 2.5  p90 40.0  p99 40.0  p99.9 40.0  max 40.0  mean 14.7
hand-off µs  p50 12.0  p90 12.0  p99 12.0  p99.9 12.0  max 12.0  mean 12.0
hand-offs    1 (0/s)
rate limit   3 allowed, 1 limited (25.0% limited)
locks        7 granted, 6 refused, 5 exclusion violations
connections  9 opened
errors       1
  e.g.       unexpected reply
"
        );
    }
}
