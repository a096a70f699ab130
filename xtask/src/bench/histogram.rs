//! A small log-linear latency histogram: exact below 256 ns, then 128 buckets per power of two,
//! so any recorded value is reported at most 0.8 % high (never low). Enough for p99.9 of a
//! latency run, in 36 KiB, with no allocation while recording.

use std::time::Duration;

/// Sub-buckets per power of two are `HALF`; values below `SUB` are exact.
const SUB_BITS: u32 = 8;
const SUB: u64 = 1 << SUB_BITS;
const HALF: u64 = SUB / 2;
/// Values are clamped to 2^40 ns (~18 minutes): far beyond any run's timeout.
const MAX_VALUE: u64 = (1 << 40) - 1;
const BUCKETS: usize = (SUB + (40 - SUB_BITS as u64 + 1) * HALF) as usize;

/// Counts of latencies in nanoseconds.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; BUCKETS], total: 0, min: u64::MAX, max: 0 }
    }
}

/// Returns the bucket of a value (in nanoseconds).
fn index(value: u64) -> usize {
    if value < SUB {
        return value as usize;
    }
    let msb = 63 - value.leading_zeros();
    let shift = msb + 1 - SUB_BITS;
    let mantissa = value >> shift;
    (SUB + u64::from(shift - 1) * HALF + (mantissa - HALF)) as usize
}

/// Returns the highest value that falls in bucket `index`.
fn highest(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB {
        return index;
    }
    let k = index - SUB;
    let shift = k / HALF + 1;
    let low = (k % HALF + HALF) << shift;
    low + (1 << shift) - 1
}

impl Histogram {
    /// Records one value.
    pub fn record(&mut self, value: Duration) {
        let ns = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX).min(MAX_VALUE);
        self.counts[index(ns)] += 1;
        self.total += 1;
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    /// Adds another histogram's counts (one per connection, merged at the end).
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Returns how many values were recorded.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Returns whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Returns the largest value recorded (exact).
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max)
    }

    /// Returns the value at `percentile` (0–100]: the smallest bucket bound at or below which
    /// that share of the values lie, never above the exact maximum. Zero when empty.
    pub fn percentile(&self, percentile: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((percentile / 100.0) * self.total as f64).ceil().clamp(1.0, self.total as f64) as u64;
        let mut seen = 0;
        for (i, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_nanos(highest(i).clamp(self.min, self.max));
            }
        }
        Duration::from_nanos(self.max)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{BUCKETS, Histogram, MAX_VALUE, highest, index};

    #[test]
    fn buckets_are_contiguous_and_within_0_8_percent() {
        let mut previous = 0;
        for value in (0..5_000u64).chain((1..2_000).map(|i| i * 7_919)).chain([MAX_VALUE]) {
            let i = index(value);
            assert!(i < BUCKETS, "{value}");
            assert!(i >= previous, "monotonic at {value}");
            previous = i;
            let high = highest(i);
            assert!(high >= value, "{value} in bucket {i} up to {high}");
            assert!((high - value) as f64 <= value as f64 / 128.0, "{value} reported as {high}");
        }
        assert_eq!(index(highest(300) + 1), 301, "the next value starts the next bucket");
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = Histogram::default();
        // 1..=1000 µs, one each.
        for us in 1..=1000 {
            h.record(Duration::from_micros(us));
        }
        let near = |got: Duration, want_us: f64| {
            let got = got.as_secs_f64() * 1e6;
            assert!(got >= want_us && got <= want_us * 1.008, "got {got} µs, want {want_us} µs");
        };
        near(h.percentile(50.0), 500.0);
        near(h.percentile(90.0), 900.0);
        near(h.percentile(99.0), 990.0);
        near(h.percentile(99.9), 999.0);
        assert_eq!(h.percentile(100.0), Duration::from_micros(1000), "capped at the exact maximum");
        assert_eq!(h.len(), 1000);
    }

    #[test]
    fn a_tail_shows_in_the_high_percentiles_only() {
        let mut h = Histogram::default();
        for _ in 0..990 {
            h.record(Duration::from_micros(100));
        }
        let mut tail = Histogram::default();
        for _ in 0..10 {
            tail.record(Duration::from_millis(50));
        }
        h.merge(&tail);
        assert!(h.percentile(99.0) < Duration::from_micros(101));
        assert!(h.percentile(99.9) >= Duration::from_millis(50));
        assert_eq!(h.max(), Duration::from_millis(50));
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(Histogram::default().percentile(99.0), Duration::ZERO);
        assert!(Histogram::default().is_empty());
    }
}
