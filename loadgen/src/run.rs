//! A whole run: client threads, each a single-threaded runtime with its share of the
//! connections; a common start; the progress line; the merged report.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::LocalSet;

use crate::cli::{Config, Endpoint, Workload};
use crate::conn::{drive, Buffers, Dial, Env, TcpDial, TlsDial, UnixDial};
use crate::report::{Recorder, Report};
use crate::session::{KeyPlan, RunShared, Schedule, Session};
use crate::wait;

/// Connection attempts in progress at once per thread: enough to set up ten thousand
/// connections quickly without overflowing the server's accept backlog.
const CONNECTING: usize = 64;

/// Longest time hold and idle may take to set up (take their locks) before the run fails.
const SETUP: Duration = Duration::from_secs(300);

/// Runs the load described by `config` and reports what it measured. Blocks the calling thread
/// (which must not be inside an async runtime) for the length of the run.
pub fn run(mut config: Config) -> Result<Report, String> {
    if config.shard_aware {
        config.shard_addrs = crate::shards::discover(&config)?;
    }
    let config = Arc::new(config);
    let run = Arc::new(RunShared::new(&config));
    // Every client thread and this one meet here once all connections are up (for hold and
    // idle: once every lock is taken), so the measured part starts at the same moment for all.
    let barrier = Arc::new(Barrier::new(config.threads + 1));
    let mut threads = Vec::with_capacity(config.threads);
    for thread in 0..config.threads {
        let (c, r, b) = (config.clone(), run.clone(), barrier.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("loadgen-{thread}"))
            .spawn(move || client_thread(thread, c, r, b));
        // Threads already started wait at the barrier; the process is about to exit anyway.
        threads.push(spawned.map_err(|e| format!("cannot start a client thread: {e}"))?);
    }
    barrier.wait();
    let started = Instant::now();
    let holding = matches!(config.workload, Workload::Hold | Workload::Idle);
    if holding {
        eprintln!(
            "loadgen: holding after {} replies on {} connections; letting go in {:.1} s",
            run.progress.load(Ordering::Relaxed),
            config.conns,
            config.duration.as_secs_f64()
        );
    }
    show_progress(&config, &run, &threads, started, holding);
    let mut merged: Option<Recorder> = None;
    let mut reached_deadline = false;
    for handle in threads {
        let (rec, deadline) = handle
            .join()
            .map_err(|_| "a client thread panicked".to_string())?;
        reached_deadline |= deadline;
        match &mut merged {
            Some(merged) => merged.merge(rec),
            None => merged = Some(rec),
        }
    }
    let merged = merged.ok_or("no client threads")?;
    Ok(Report::new(&config, &merged, reached_deadline))
}

/// Waits for the run to end, showing a progress line when stderr is a terminal. Hold and idle
/// end it here: after their hold time, they are told to let go.
fn show_progress<T>(
    config: &Config,
    run: &RunShared,
    threads: &[std::thread::JoinHandle<T>],
    started: Instant,
    holding: bool,
) {
    let total = config.warmup + config.duration;
    let bar = (config.progress && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(total.as_millis() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {msg}",
        ) {
            bar.set_style(style);
        }
        bar
    });
    let mut last = (started, run.progress.load(Ordering::Relaxed));
    while !threads.iter().all(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        if holding && now >= started + config.duration {
            run.stop.store(true, Ordering::Relaxed);
        }
        if let Some(bar) = &bar {
            let replies = run.progress.load(Ordering::Relaxed);
            let dt = now.duration_since(last.0).as_secs_f64();
            if dt >= 0.5 {
                let rate = (replies - last.1) as f64 / dt;
                bar.set_message(format!("{replies} replies, {rate:.0}/s"));
                last = (now, replies);
            }
            bar.set_position(now.duration_since(started).as_millis() as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// One client thread: its connections, on one single-threaded runtime. Returns its
/// measurements and whether the run went on to its deadline (rather than ending by count).
fn client_thread(
    thread: usize,
    config: Arc<Config>,
    run: Arc<RunShared>,
    barrier: Arc<Barrier>,
) -> (Recorder, bool) {
    let placeholder = Instant::now();
    let rec = Rc::new(RefCell::new(Recorder::new(placeholder, placeholder)));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            rec.borrow_mut()
                .error(|| format!("cannot start a runtime: {e}"));
            barrier.wait();
            return (take(rec), false);
        }
    };
    let local = LocalSet::new();
    let deadline = local.block_on(&runtime, async {
        let config = Rc::new(Config::clone(&config));
        match &config.endpoint {
            Endpoint::Tcp(addr) => {
                let addrs: std::rc::Rc<[_]> = if config.shard_addrs.is_empty() {
                    [*addr].into()
                } else {
                    config.shard_addrs.as_slice().into()
                };
                let dial = TcpDial(addrs, config.auth_line.clone());
                match &config.tls {
                    Some(tls) => {
                        let dial = TlsDial(dial, tls.clone().into());
                        thread_main(thread, config.clone(), run, barrier, rec.clone(), dial).await
                    }
                    None => {
                        thread_main(thread, config.clone(), run, barrier, rec.clone(), dial).await
                    }
                }
            }
            Endpoint::Unix(path) => {
                let dial = UnixDial(path.clone(), config.auth_line.clone());
                thread_main(thread, config.clone(), run, barrier, rec.clone(), dial).await
            }
        }
    });
    // Dropping the LocalSet drops every task, and with them every other handle on `rec`.
    drop(local);
    (take(rec), deadline)
}

/// The thread's recorder, once nothing else uses it.
fn take(rec: Rc<RefCell<Recorder>>) -> Recorder {
    match Rc::try_unwrap(rec) {
        Ok(rec) => rec.into_inner(),
        Err(shared) => {
            let now = Instant::now();
            shared.replace(Recorder::new(now, now))
        }
    }
}

/// The connections of thread `thread`: numbers `thread`, `thread + threads`, …
async fn thread_main<D: Dial>(
    thread: usize,
    config: Rc<Config>,
    run: Arc<RunShared>,
    barrier: Arc<Barrier>,
    rec: Rc<RefCell<Recorder>>,
    dial: D,
) -> bool {
    let indexes: Vec<u64> = (thread..config.conns)
        .step_by(config.threads)
        .map(|i| i as u64)
        .collect();
    let gate = Rc::new(Semaphore::new(CONNECTING));
    let holding = matches!(config.workload, Workload::Hold | Workload::Idle);

    // Set up: connect (and for hold and idle, take the locks), CONNECTING at a time.
    let mut setups = Vec::with_capacity(indexes.len());
    for &index in &indexes {
        let (config, run, rec, dial, gate) = (
            config.clone(),
            run.clone(),
            rec.clone(),
            dial.clone(),
            gate.clone(),
        );
        setups.push(tokio::task::spawn_local(async move {
            let _permit = gate.acquire().await.ok()?;
            if config.workload == Workload::OrphanStorm {
                return None;
            }
            let mut stream = connect(&dial, index, &rec).await?;
            if holding {
                let ok = hold_setup(&mut stream, index, &config, &run, &rec).await;
                return ok.then_some((index, stream));
            }
            Some((index, stream))
        }));
    }
    let mut streams = Vec::with_capacity(indexes.len());
    for setup in setups {
        if let Ok(Some(stream)) = setup.await {
            streams.push(stream);
        }
    }

    // Blocking here is fine: every task of this thread has finished its setup.
    barrier.wait();
    let start = Instant::now();
    let measure_from = start + config.warmup;
    let end = measure_from + config.duration;
    {
        let mut rec = rec.borrow_mut();
        rec.measure_from = measure_from;
        rec.measure_until = end;
    }
    if holding {
        while !run.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(streams);
        return true;
    }

    if config.workload == Workload::Wait {
        // A thread that lost a connection cannot form its groups as planned; the failed
        // connect is already counted as an error.
        if streams.len() < indexes.len() {
            return false;
        }
        let plan = match wait::plan(&config) {
            Ok(plan) => plan,
            Err(e) => {
                rec.borrow_mut().error(|| e);
                return false;
            }
        };
        let ctx = Rc::new(wait::Ctx {
            config: config.clone(),
            run: run.clone(),
            rec: rec.clone(),
            end,
        });
        let streams = streams.into_iter().map(|(_, stream)| stream).collect();
        return wait::run_thread(plan.thread(thread), streams, ctx).await;
    }

    let mut tasks = Vec::new();
    if config.workload == Workload::OrphanStorm {
        for &index in &indexes {
            let (config, run, rec, dial) = (config.clone(), run.clone(), rec.clone(), dial.clone());
            tasks.push(tokio::task::spawn_local(async move {
                orphan_storm(index, config, run, rec, dial, end).await
            }));
        }
    } else {
        for (index, mut stream) in streams {
            let (config, run, rec) = (config.clone(), run.clone(), rec.clone());
            tasks.push(tokio::task::spawn_local(async move {
                let mut session =
                    Session::new(config.clone(), run.clone(), index, KeyPlan::Random, None);
                let mut schedule = config.rate.map(|rate| {
                    let interval = Duration::from_secs_f64(config.conns as f64 / rate);
                    // Spread the connections' ticks over one interval.
                    let offset = interval.mul_f64(index as f64 / config.conns as f64);
                    Schedule {
                        interval,
                        next: start + offset,
                        ticks: VecDeque::new(),
                    }
                });
                let env = Env {
                    rec: &rec,
                    run: &run,
                    target: config.target,
                    end,
                };
                let mut bufs = Buffers::default();
                let result = drive(
                    &mut stream,
                    &mut session,
                    &mut bufs,
                    &env,
                    schedule.as_mut(),
                )
                .await;
                if let Err(e) = result {
                    rec.borrow_mut().error(|| e);
                }
                // The session lets go of its locks before the socket closes.
                drop(session);
                drop(stream);
                Instant::now() >= end
            }));
        }
    }
    let mut deadline = false;
    for task in tasks {
        deadline |= task.await.unwrap_or(false);
    }
    deadline
}

/// Opens one connection and counts it; a failure is counted as an error instead.
async fn connect<D: Dial>(dial: &D, index: u64, rec: &RefCell<Recorder>) -> Option<D::Stream> {
    match dial.dial(index).await {
        Ok(stream) => {
            rec.borrow_mut().counts.connections += 1;
            Some(stream)
        }
        Err(e) => {
            rec.borrow_mut().error(|| format!("connect failed: {e}"));
            None
        }
    }
}

/// Hold: take this connection's share of the keys, every one of which must be granted. Idle:
/// one inspection, to be sure the server has set the connection up.
async fn hold_setup<S>(
    stream: &mut S,
    index: u64,
    config: &Rc<Config>,
    run: &Arc<RunShared>,
    rec: &Rc<RefCell<Recorder>>,
) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let conns = config.conns as u64;
    let (plan, limit) = match config.workload {
        Workload::Hold => (
            KeyPlan::Sequence {
                next: index,
                step: conns,
                end: config.keys.count(),
            },
            (config.keys.count() - index).div_ceil(conns),
        ),
        _ => (KeyPlan::Random, 1),
    };
    let mut session = Session::new(config.clone(), run.clone(), index, plan, Some(limit));
    let env = Env {
        rec,
        run,
        target: config.target,
        end: Instant::now() + SETUP,
    };
    let mut bufs = Buffers::default();
    match drive(stream, &mut session, &mut bufs, &env, None).await {
        Ok(()) => true,
        Err(e) => {
            rec.borrow_mut().error(|| format!("setup failed: {e}"));
            false
        }
    }
}

/// Orphan-storm: connect, take `--locks-per-conn` locks, hang up without releasing them, and
/// again, until the run's time (or budget) is up.
async fn orphan_storm<D: Dial>(
    index: u64,
    config: Rc<Config>,
    run: Arc<RunShared>,
    rec: Rc<RefCell<Recorder>>,
    dial: D,
    end: Instant,
) -> bool {
    let env = Env {
        rec: &rec,
        run: &run,
        target: config.target,
        end,
    };
    let mut bufs = Buffers::default();
    loop {
        if Instant::now() >= end {
            return true;
        }
        let Some(mut stream) = connect(&dial, index, &rec).await else {
            return false;
        };
        let limit = Some(config.locks_per_conn);
        let mut session = Session::new(config.clone(), run.clone(), index, KeyPlan::Random, limit);
        let result = drive(&mut stream, &mut session, &mut bufs, &env, None).await;
        let exhausted = run.budget_spent();
        drop(session);
        drop(stream);
        if let Err(e) = result {
            rec.borrow_mut().error(|| e);
            return false;
        }
        if exhausted {
            return false;
        }
    }
}
