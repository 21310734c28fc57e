//! The memory budget (`-max-memory`): what the lock state of the whole server may take.
//!
//! Every shard thread keeps an exact count of the bytes its table holds (lock slots, names,
//! shared holders, waiters, rate limiter state): a plain integer in the table, which only that
//! thread touches. It publishes the count to its own cache-padded atomic here when it has moved
//! by more than [`PUBLISH_GRAIN`] since the last time, so the atomics other threads read change
//! rarely and stay in their caches. Names registered with `iam` are counted in one more atomic
//! (registering is rare, and happens on any thread).
//!
//! A command that would store something new asks [`MemoryBudget::fits`]: this shard's exact
//! count, plus everything the others published, plus what the command would add, must stay
//! within the limit. The others' counts may lag by up to a grain each, so the budget can be
//! passed by at most `shards x PUBLISH_GRAIN`; it is a budget for a lock server's state, not an
//! allocator limit. Connection buffers are not counted here (`-max-client-buffers` bounds
//! them), nor is the allocator's own overhead beyond what each estimate includes.
//!
//! The estimates come from the structures' real layouts (`size_of` of what is stored, plus the
//! hash index's bytes per entry) and, for names too long to be stored inline, the heap block the
//! allocator hands out for them. `examples/memory_budget.rs` fills a table and prints the
//! accounted bytes next to the resident memory they cost.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::name::LockName;

/// A shard publishes its count when it has moved by more than this since it last did.
pub const PUBLISH_GRAIN: u64 = 16 * 1024;

/// Bytes of a hash index entry beyond what it stores: hashbrown's one control byte.
pub const INDEX_CONTROL: u64 = 1;

/// The heap block glibc's allocator gives a request of `len` bytes: the request plus an
/// 8-byte header, rounded up to 16, at least 32.
pub const fn heap_block(len: usize) -> u64 {
    let block = (len as u64 + 8).div_ceil(16) * 16;
    if block < 32 {
        32
    } else {
        block
    }
}

/// The heap bytes a name owns: none for a name stored inline, its block for a long one.
#[inline]
pub fn name_heap(name: &LockName) -> u64 {
    if name.is_heap() {
        heap_block(name.len())
    } else {
        0
    }
}

/// The heap bytes `bytes` would own once stored as a name.
#[inline]
pub fn name_heap_of(bytes: &[u8]) -> u64 {
    if bytes.len() > LockName::INLINE {
        heap_block(bytes.len())
    } else {
        0
    }
}

/// The server's memory budget and every shard's published use of it.
pub struct MemoryBudget {
    /// The most bytes the lock state may take; 0: no budget.
    limit: u64,
    /// Per shard, its count as last published (written by that shard's thread only).
    shards: Box<[CachePadded<AtomicU64>]>,
    /// Bytes of names registered with `iam`.
    registry: CachePadded<AtomicU64>,
}

impl MemoryBudget {
    /// A budget of `limit` bytes (0: none) shared by `shards` shards.
    pub fn new(limit: u64, shards: usize) -> Self {
        MemoryBudget {
            limit,
            shards: (0..shards.max(1)).map(|_| CachePadded::default()).collect(),
            registry: CachePadded::default(),
        }
    }

    /// No budget: everything fits (tables made on their own, in tests and benches).
    pub fn unlimited() -> Self {
        MemoryBudget::new(0, 1)
    }

    /// The limit in bytes; 0 means none.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The most bytes of `rl` limiter state one shard may hold: half the budget, split evenly
    /// over the shards (names spread evenly over them). `rl` evicts limiters to stay within
    /// it, so however many names a client rate-limits, the other half stays for locks,
    /// shared holders and waiters, which nothing evicts. No cap without a budget.
    pub fn limiter_share(&self) -> u64 {
        if self.limit == 0 {
            u64::MAX
        } else {
            self.limit / 2 / self.shards.len() as u64
        }
    }

    /// Shard `shard`'s use, as last published.
    pub fn shard_used(&self, shard: usize) -> u64 {
        self.shards[shard].load(Ordering::Relaxed)
    }

    /// Bytes of registered names.
    pub fn registry_used(&self) -> u64 {
        self.registry.load(Ordering::Relaxed)
    }

    /// Everything in use, as last published.
    pub fn used(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .sum::<u64>()
            + self.registry_used()
    }

    /// Shard `shard` now holds `used` bytes: publishes it if it moved by more than a grain
    /// since `published` (the caller's record of what it last published, updated here).
    #[inline]
    pub fn publish(&self, shard: usize, used: u64, published: &mut u64) {
        if used.abs_diff(*published) > PUBLISH_GRAIN || (used == 0 && *published != 0) {
            self.shards[shard].store(used, Ordering::Relaxed);
            *published = used;
        }
    }

    /// Whether shard `shard`, holding `used` bytes exactly, may add `extra` more.
    #[inline]
    pub fn fits(&self, shard: usize, used: u64, extra: u64) -> bool {
        if self.limit == 0 {
            return true;
        }
        let others = self.used().saturating_sub(self.shard_used(shard));
        others.saturating_add(used).saturating_add(extra) <= self.limit
    }

    /// A name of `bytes` is being registered: counts it, or refuses (false, nothing counted)
    /// when it does not fit. Clearing a name (0 bytes) always fits.
    pub fn try_register(&self, bytes: u64) -> bool {
        if bytes > 0 && self.limit != 0 && self.used().saturating_add(bytes) > self.limit {
            return false;
        }
        self.registry.fetch_add(bytes, Ordering::Relaxed);
        true
    }

    /// A registered name of `bytes` was dropped.
    pub fn unregister(&self, bytes: u64) {
        self.registry.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The bytes a registered name of `len` bytes costs: its shared block (two reference
    /// counts before the bytes).
    pub fn registered_name_cost(len: usize) -> u64 {
        if len == 0 {
            0
        } else {
            heap_block(16 + len)
        }
    }
}

/// The budget a server gets without `-max-memory`: half of the memory it may use, the lower of
/// the machine's physical memory (`MemTotal` in `/proc/meminfo`) and its cgroup's limit, so a
/// flood of lock state leaves room for connection buffers, the allocator's slack and the rest
/// of the host. None when neither can be read (then there is no budget).
pub fn default_budget() -> Option<u64> {
    let physical = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| meminfo_total(&text));
    let cgroup = cgroup_limit();
    let available = match (physical, cgroup) {
        (Some(p), Some(c)) => p.min(c),
        (p, c) => p.or(c)?,
    };
    Some(available / 2)
}

/// `MemTotal` from the text of `/proc/meminfo`, in bytes.
pub fn meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kib: u64 = words.next()?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// The memory limit of this process's cgroup (v2 `memory.max`, else v1
/// `memory.limit_in_bytes`), if one is set.
fn cgroup_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut candidates = Vec::new();
    for line in own.lines() {
        // v2: `0::/path`; v1: `N:memory:/path`.
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let path = path.unwrap_or("/").trim_start_matches('/');
        match controllers {
            Some("") => {
                candidates.push(format!("/sys/fs/cgroup/{path}/memory.max"));
            }
            Some(c) if c.split(',').any(|c| c == "memory") => {
                candidates.push(format!(
                    "/sys/fs/cgroup/memory/{path}/memory.limit_in_bytes"
                ));
            }
            _ => {}
        }
    }
    candidates.push("/sys/fs/cgroup/memory.max".into());
    candidates.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".into());
    candidates
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .filter_map(|text| cgroup_value(&text))
        .min()
}

/// A cgroup limit file's value: bytes, or None for `max` (no limit) and v1's "no limit" (a
/// number near 2^63).
pub fn cgroup_value(text: &str) -> Option<u64> {
    let value: u64 = text.trim().parse().ok()?;
    (value < 1 << 60).then_some(value)
}

/// Parses a size: bytes, or a number with `KiB`, `MiB`, `GiB` or `TiB` after it.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size (bytes, or a number with KiB, MiB, GiB)"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{text}' (use bytes, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert!(parse_size("12MB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("9999999999TiB").is_err());
    }

    #[test]
    fn heap_blocks_are_glibc_chunks() {
        assert_eq!(heap_block(1), 32);
        assert_eq!(heap_block(24), 32);
        assert_eq!(heap_block(25), 48);
        assert_eq!(heap_block(1000), 1008);
        assert_eq!(name_heap(&LockName::from("short")), 0);
        assert_eq!(name_heap(&LockName::new(&[b'x'; 100])), 112);
        assert_eq!(name_heap_of(&[b'x'; 100]), 112);
    }

    #[test]
    fn machine_limits_are_read() {
        assert_eq!(
            meminfo_total("MemTotal:       16318032 kB\nMemFree: 1 kB\n"),
            Some(16318032 * 1024)
        );
        assert_eq!(meminfo_total("nothing"), None);
        assert_eq!(cgroup_value("max\n"), None);
        assert_eq!(cgroup_value("9223372036854771712\n"), None);
        assert_eq!(cgroup_value("536870912\n"), Some(512 << 20));
        // This machine has memory.
        assert!(default_budget().is_some_and(|b| b > 0));
    }

    #[test]
    fn the_budget_counts_every_shard_and_the_registry() {
        let budget = MemoryBudget::new(100_000, 2);
        let mut published = 0;
        budget.publish(0, 50_000, &mut published);
        assert_eq!(budget.shard_used(0), 50_000);
        // Small moves are not published; shard 0 still knows its exact count.
        budget.publish(0, 50_100, &mut published);
        assert_eq!(published, 50_000);
        assert!(budget.fits(1, 40_000, 10_000));
        assert!(!budget.fits(1, 40_000, 10_001));
        assert!(budget.try_register(5_000));
        assert!(!budget.fits(1, 40_000, 10_000));
        assert!(!budget.try_register(50_001));
        budget.unregister(5_000);
        assert_eq!(budget.used(), 50_000);
        budget.publish(0, 0, &mut published);
        assert_eq!(budget.used(), 0);
        assert!(MemoryBudget::unlimited().fits(0, u64::MAX, 1));
    }
}
