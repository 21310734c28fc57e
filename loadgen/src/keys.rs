//! Lock names: which key a new operation picks (uniform or Zipf over `--keys`) and how a key id
//! becomes a name of exactly `--key-size` bytes.
//!
//! Names are `k` followed by the zero-padded decimal id (`k000000000000042` at 16 bytes), so every
//! name has the same length, the same for glockd and Redis, and two ids never share a name.

use rand::rngs::SmallRng;
use rand::RngExt;
use rand_distr::{Distribution, Zipf};

/// How keys are drawn from the key space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dist {
    /// Every key equally likely.
    Uniform,
    /// A few hot keys take most of the traffic (`--zipf-s` sets how few).
    Zipf,
}

/// The key space of a run: shared, read-only, by every connection.
#[derive(Clone, Debug)]
pub struct Keys {
    /// Number of distinct keys (ids `0..count`).
    count: u64,
    /// Bytes in every name.
    size: usize,
    /// How keys are drawn (kept for the report).
    dist: Dist,
    /// The Zipf sampler when `--dist zipf`, built once because building it costs a few logs.
    zipf: Option<Zipf<f64>>,
}

impl Keys {
    /// A key space of `count` names of `size` bytes, drawn by `dist`.
    pub fn new(count: u64, size: usize, dist: Dist, zipf_s: f64) -> Result<Self, String> {
        if count == 0 {
            return Err("--keys must be at least 1".into());
        }
        let digits = itoa::Buffer::new().format(count - 1).len();
        if size < digits + 1 {
            return Err(format!(
                "--key-size {size} is too short for {count} keys: names need {} bytes",
                digits + 1
            ));
        }
        let zipf = match dist {
            Dist::Uniform => None,
            Dist::Zipf => Some(
                Zipf::new(count as f64, zipf_s)
                    .map_err(|e| format!("bad Zipf parameters (--zipf-s {zipf_s}): {e}"))?,
            ),
        };
        Ok(Keys {
            count,
            size,
            dist,
            zipf,
        })
    }

    /// Number of keys.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// How keys are drawn.
    pub fn dist(&self) -> Dist {
        self.dist
    }

    /// Length of every name in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Draws a key id.
    #[inline]
    pub fn pick(&self, rng: &mut SmallRng) -> u64 {
        match &self.zipf {
            None => rng.random_range(0..self.count),
            // Zipf samples lie in [1, count]; the clamp guards the float edge.
            Some(zipf) => (zipf.sample(rng) as u64).clamp(1, self.count) - 1,
        }
    }

    /// Appends the name of key `id`: `k`, zero padding, then the decimal id.
    #[inline]
    pub fn write_name(&self, id: u64, out: &mut Vec<u8>) {
        let mut buffer = itoa::Buffer::new();
        let digits = buffer.format(id).as_bytes();
        out.push(b'k');
        out.resize(out.len() + self.size - 1 - digits.len(), b'0');
        out.extend_from_slice(digits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn names_have_the_exact_size_and_are_distinct() {
        let keys = Keys::new(1000, 16, Dist::Uniform, 0.99).unwrap();
        let mut a = Vec::new();
        keys.write_name(42, &mut a);
        assert_eq!(a, b"k000000000000042");
        let mut b = Vec::new();
        keys.write_name(0, &mut b);
        assert_eq!(b, b"k000000000000000");
        assert!(Keys::new(1000, 3, Dist::Uniform, 0.99).is_err());
        assert!(Keys::new(1000, 4, Dist::Uniform, 0.99).is_ok());
    }

    #[test]
    fn picks_stay_in_the_key_space() {
        let mut rng = SmallRng::seed_from_u64(7);
        for dist in [Dist::Uniform, Dist::Zipf] {
            let keys = Keys::new(10, 16, dist, 0.99).unwrap();
            let mut seen = [0u32; 10];
            for _ in 0..10_000 {
                seen[keys.pick(&mut rng) as usize] += 1;
            }
            assert!(seen.iter().all(|&n| n > 0), "{dist:?}: {seen:?}");
            if dist == Dist::Zipf {
                assert!(seen[0] > seen[9] * 3, "zipf is skewed: {seen:?}");
            }
        }
    }
}
