//! Unit tests of the token clock, the ceiling and the state file, with an injected clock.

use std::path::PathBuf;

use super::*;

/// 2025-11-26 10:00:34 UTC, in microseconds.
const T0: u64 = 1_764_151_234_000_000;
const HOUR: u64 = 3_600_000_000;
const RESERVE: Duration = Duration::from_millis(3000);

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "glockd-fencing-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn saved(path: &Path) -> u64 {
    parse_state(&std::fs::read(path).expect("state file")).expect("valid")
}

fn open(path: &Path, clock: &ManualClock) -> Arc<Fencing> {
    Fencing::open(path, RESERVE, clock.source(), None).expect("opens")
}

#[test]
fn tokens_keep_increasing_when_the_clock_steps_back() {
    for bounded in [false, true] {
        let dir = temp_dir("back");
        let clock = ManualClock::new(T0);
        let fencing = if bounded {
            open(&dir.join("state"), &clock)
        } else {
            Fencing::unbounded(clock.source())
        };
        let mut tokens = fencing.clock();
        let first = tokens.issue();
        assert_eq!(first, T0);
        clock.set(T0 - HOUR);
        let after: Vec<u64> = (0..1000).map(|_| tokens.issue()).collect();
        assert_eq!(after[0], first + 1);
        assert!(after.windows(2).all(|w| w[1] == w[0] + 1));
        // Once the clock is past the last token again, tokens follow it.
        clock.set(T0 + 5000);
        assert_eq!(tokens.issue(), T0 + 5000);
        assert_eq!(fencing.waiting(), 0);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn tokens_follow_the_clock_forward() {
    let dir = temp_dir("forward");
    let clock = ManualClock::new(T0);
    let fencing = open(&dir.join("state"), &clock);
    let mut tokens = fencing.clock();
    assert_eq!(tokens.issue(), T0);
    clock.set(T0 + 1_000_000);
    assert_eq!(
        tokens.issue(),
        T0 + 1_000_000,
        "within the reserve: no wait"
    );
    assert_eq!(fencing.waited(), Duration::ZERO);
    // A step far forward, past the ceiling, is served once a new ceiling is durable.
    clock.set(T0 + HOUR);
    let renewer = fencing.start_renewer().expect("thread").expect("a renewer");
    let token = tokens.issue();
    assert_eq!(token, T0 + HOUR);
    assert!(saved(fencing.path().unwrap()) > token);
    drop(renewer);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn renewal_is_due_when_half_the_reserve_is_used() {
    let dir = temp_dir("due");
    let path = dir.join("state");
    let clock = ManualClock::new(T0);
    let fencing = open(&path, &clock);
    let reserve = 3_000_000;
    assert_eq!(fencing.ceiling(), Some(T0 + reserve));
    assert_eq!(saved(&path), T0 + reserve);
    assert_eq!(fencing.writes(), 1);
    clock.set(T0 + reserve / 2 - 1);
    assert!(!fencing.renew_if_due().unwrap());
    clock.set(T0 + reserve / 2);
    assert!(fencing.renew_if_due().unwrap());
    assert_eq!(fencing.ceiling(), Some(T0 + reserve / 2 + reserve));
    assert_eq!(saved(&path), T0 + reserve / 2 + reserve);
    assert_eq!(fencing.writes(), 2);
    assert!(!fencing.renew_if_due().unwrap());
    assert!(
        !dir.join("state.tmp").exists(),
        "the temporary file is renamed"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_burst_past_the_ceiling_waits_for_the_renewal() {
    let dir = temp_dir("burst");
    let path = dir.join("state");
    // The clock stands still, so only the burst moves the tokens (one each).
    let clock = ManualClock::new(T0);
    let fencing =
        Fencing::open(&path, Duration::from_millis(1), clock.source(), None).expect("opens");
    let ceiling = fencing.ceiling().unwrap();
    assert_eq!(ceiling, T0 + 1000);
    let issued = Arc::new(AtomicU64::new(0));
    let shard = {
        let (fencing, issued) = (fencing.clone(), issued.clone());
        std::thread::spawn(move || {
            let mut tokens = fencing.clock();
            let burst: Vec<u64> = (0..3000)
                .map(|_| {
                    let token = tokens.issue();
                    issued.store(token, Ordering::Release);
                    token
                })
                .collect();
            burst
        })
    };
    // No renewer runs: the shard must stop at the ceiling and wait there.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fencing.waiting() == 0 {
        assert!(
            Instant::now() < deadline,
            "the shard never reached the ceiling"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(issued.load(Ordering::Acquire), ceiling - 1);
    assert_eq!(saved(&path), ceiling, "nothing was written behind its back");
    // Each renewal lets it run on to the next ceiling and no further.
    let mut renewals = 0;
    while !shard.is_finished() {
        if fencing.renew_if_due().unwrap() {
            renewals += 1;
            assert!(issued.load(Ordering::Acquire) < saved(&path));
        }
        std::thread::yield_now();
    }
    let burst = shard.join().unwrap();
    assert!(burst.windows(2).all(|w| w[1] == w[0] + 1));
    assert_eq!(burst[0], T0);
    assert!(*burst.last().unwrap() < saved(&path));
    assert!(
        renewals >= 2,
        "{renewals} renewals for 3000 tokens of 1000 each"
    );
    assert!(fencing.waited() > Duration::ZERO);
    assert_eq!(fencing.waiting(), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_restart_starts_above_the_saved_ceiling() {
    let dir = temp_dir("restart");
    let path = dir.join("state");
    let clock = ManualClock::new(T0);
    let before = {
        let fencing = open(&path, &clock);
        let mut shards: Vec<TokenClock> = (0..4).map(|_| fencing.clock()).collect();
        let tokens: Vec<u64> = shards.iter_mut().map(|s| s.issue()).collect();
        *tokens.iter().max().unwrap()
    };
    let saved_ceiling = saved(&path);
    assert!(saved_ceiling > before);
    // Back an hour, and with another shard count: every shard starts above the ceiling.
    clock.set(T0 - HOUR);
    let fencing = open(&path, &clock);
    for mut shard in (0..3).map(|_| fencing.clock()) {
        assert_eq!(shard.issue(), saved_ceiling + 1);
    }
    assert!(fencing.ceiling().unwrap() > saved_ceiling + 1);
    assert_eq!(saved(&path), fencing.ceiling().unwrap());
    // With the clock behind, the shards' demand drives the renewals.
    let mut shard = fencing.clock();
    let ceiling = fencing.ceiling().unwrap();
    let mut last = 0;
    while last < fencing.mark_for(ceiling) {
        last = shard.issue();
    }
    assert!(fencing.renew_if_due().unwrap());
    assert!(fencing.ceiling().unwrap() >= last + 3_000_000);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_ceiling_in_the_future_is_honoured() {
    let dir = temp_dir("future");
    let path = dir.join("state");
    std::fs::write(&path, render_state(T0 + HOUR)).unwrap();
    let clock = ManualClock::new(T0);
    let fencing = open(&path, &clock);
    assert_eq!(fencing.clock().issue(), T0 + HOUR + 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_state_file_round_trips_and_bad_ones_are_refused() {
    assert_eq!(parse_state(render_state(T0).as_bytes()), Ok(T0));
    assert_eq!(
        parse_state(b"glockd-state 1\r\n\r\n  ceiling   42  \n# note\n"),
        Ok(42)
    );
    let bad = |text: &str| parse_state(text.as_bytes()).expect_err(text);
    assert!(bad("").contains("empty"));
    assert!(bad("\n \n").contains("empty"));
    assert!(bad("# only a comment\n").contains("no `glockd-state`"));
    assert!(bad("ceiling 5\n").contains("expected `glockd-state 1`"));
    assert!(bad("glockd-state 2\nceiling 5\n").contains("version 2"));
    assert!(bad("glockd-state 1\n").contains("no `ceiling`"));
    assert!(bad("glockd-state 1\nceiling\n").contains("whole number"));
    assert!(bad("glockd-state 1\nceiling -5\n").contains("whole number"));
    assert!(bad("glockd-state 1\nceiling 5x\n").contains("whole number"));
    assert!(bad("glockd-state 1\nceiling 99999999999999999999\n").contains("too large"));
    assert!(bad("glockd-state 1\nceiling 18446744073709551615\n").contains("no room"));
    assert!(bad("glockd-state 1\nceiling 5\nceiling 6\n").contains("second"));
    assert!(bad("glockd-state 1\nceiling 5\nmore 6\n").contains("unknown"));
    assert!(parse_state(b"glockd-state 1\nceiling \xff\n")
        .unwrap_err()
        .contains("not text"));
    assert!(bad("glockd-state 1\nceiling 5\n\0\0\0").contains("unknown"));
    for text in ["", "garbage", "glockd-state 1\nceiling\n"] {
        assert!(!bad(text).contains('\n'), "one line");
    }
}

#[test]
fn unusable_state_files_are_start_up_errors() {
    let dir = temp_dir("errors");
    let clock = ManualClock::new(T0);
    let fails = |path: &Path| -> String {
        match Fencing::open(path, RESERVE, clock.source(), None) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(e) => e.to_string(),
        }
    };
    let empty = dir.join("empty");
    std::fs::write(&empty, "").unwrap();
    let reason = fails(&empty);
    assert!(reason.contains("empty") && reason.contains(&*empty.to_string_lossy()));
    assert_eq!(
        std::fs::read(&empty).unwrap(),
        b"",
        "a bad file is left alone"
    );
    let corrupt = dir.join("corrupt");
    std::fs::write(&corrupt, "glockd-state 1\nceiling 12ab\n").unwrap();
    assert!(fails(&corrupt).contains("whole number"));
    let big = dir.join("big");
    std::fs::write(&big, "#".repeat(10_000)).unwrap();
    assert!(fails(&big).contains("longer than"));
    let directory = dir.join("a-directory");
    std::fs::create_dir(&directory).unwrap();
    assert!(fails(&directory).contains("cannot read"));
    let nowhere = dir.join("missing-dir").join("state");
    assert!(fails(&nowhere).contains("cannot write"));
    let under_a_file = empty.join("state");
    assert!(fails(&under_a_file).contains("state file"));
    // A missing file in a writable place is a first start.
    let fresh = dir.join("fresh");
    let fencing = Fencing::open(&fresh, RESERVE, clock.source(), None).unwrap();
    assert_eq!(saved(&fresh), fencing.ceiling().unwrap());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_slow_write_is_not_visible_until_it_is_durable() {
    let dir = temp_dir("slow");
    let path = dir.join("state");
    let clock = ManualClock::new(T0);
    let fencing = Fencing::open(
        &path,
        RESERVE,
        clock.source(),
        Some(Duration::from_millis(500)),
    )
    .unwrap();
    let first = fencing.ceiling().unwrap();
    clock.set(T0 + 2_000_000);
    let writer = {
        let fencing = fencing.clone();
        std::thread::spawn(move || fencing.renew_if_due())
    };
    // While the write is in progress (its temporary file not yet renamed) the old ceiling
    // stands, in memory and on disk.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !writer.is_finished() {
        assert!(Instant::now() < deadline);
        let (on_disk, in_memory) = (saved(&path), fencing.ceiling());
        if dir.join("state.tmp").exists() {
            assert_eq!((on_disk, in_memory), (first, Some(first)));
        }
        std::thread::yield_now();
    }
    assert!(writer.join().unwrap().unwrap());
    assert_eq!(saved(&path), T0 + 5_000_000);
    assert_eq!(fencing.ceiling(), Some(T0 + 5_000_000));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_clock_advanced_past_another_clocks_tokens_issues_above_them() {
    let clock = ManualClock::new(T0);
    let mut old = TokenClock::unbounded(clock.source());
    clock.set(T0 + HOUR);
    let last = old.issue();
    assert_eq!(old.last(), last);
    // The new process's clock reads an hour earlier.
    clock.set(T0);
    let mut new = TokenClock::unbounded(clock.source());
    new.advance_past(last);
    assert_eq!(new.last(), last);
    assert_eq!(new.issue(), last + 1);
    // Advancing to an older token changes nothing.
    new.advance_past(T0);
    assert_eq!(new.issue(), last + 2);
}
