//! Pure: the bounds every service applies — a per-client token bucket and a log limiter —
//! with time passed in (`now` since any fixed origin), so tests drive them without a clock.

use std::collections::BTreeMap;
use std::time::Duration;

/// A token bucket per client key, the number of keys bounded: when full, the client heard
/// from longest ago is forgotten (it starts again with a full bucket, which at worst lets
/// a forgotten client send one extra burst).
#[derive(Debug)]
pub struct RateLimiter<K: Ord + Clone> {
    per_s: f64,
    burst: f64,
    clients_max: usize,
    buckets: BTreeMap<K, Bucket>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Duration,
}

impl<K: Ord + Clone> RateLimiter<K> {
    /// `per_s` requests a second on average, `burst` at once, for at most `clients_max`
    /// remembered clients. `per_s == 0` means no limit.
    pub fn new(per_s: u32, burst: u32, clients_max: usize) -> RateLimiter<K> {
        assert!(
            clients_max > 0,
            "a rate limiter must remember at least one client"
        );
        RateLimiter {
            per_s: f64::from(per_s),
            burst: f64::from(burst.max(1)),
            clients_max,
            buckets: BTreeMap::new(),
        }
    }

    /// Takes one token for `key`; false when the client is over its rate.
    pub fn allow(&mut self, key: &K, now: Duration) -> bool {
        if self.per_s == 0.0 {
            return true;
        }
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.clients_max {
            self.forget_oldest();
        }
        let burst = self.burst;
        let per_s = self.per_s;
        let bucket = self.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_sub(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_s).min(burst);
        bucket.at = now.max(bucket.at);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn forget_oldest(&mut self) {
        // Linear in the number of clients, which is bounded; only runs when it is full.
        if let Some(oldest) = self
            .buckets
            .iter()
            .min_by_key(|(_, bucket)| bucket.at)
            .map(|(key, _)| key.clone())
        {
            self.buckets.remove(&oldest);
        }
    }

    pub fn clients(&self) -> usize {
        self.buckets.len()
    }
}

/// Lets at most `per_window` log lines through per window; counts the rest, so a flood of
/// bad packets costs a bounded amount of log and the operator still learns how many.
#[derive(Debug)]
pub struct LogLimiter {
    window: Duration,
    per_window: u32,
    window_start: Duration,
    logged: u32,
    suppressed: u64,
}

/// What the caller should log now.
#[derive(Debug, PartialEq, Eq)]
pub enum LogDecision {
    /// Log this line; `suppressed_before` lines were dropped in the previous window.
    Log { suppressed_before: u64 },
    /// Drop this line (counted).
    Suppress,
}

impl LogLimiter {
    pub fn new(window: Duration, per_window: u32) -> LogLimiter {
        LogLimiter {
            window,
            per_window,
            window_start: Duration::ZERO,
            logged: 0,
            suppressed: 0,
        }
    }

    pub fn check(&mut self, now: Duration) -> LogDecision {
        if now.saturating_sub(self.window_start) >= self.window {
            self.window_start = now;
            self.logged = 0;
        }
        if self.logged < self.per_window {
            self.logged += 1;
            let suppressed_before = std::mem::take(&mut self.suppressed);
            LogDecision::Log { suppressed_before }
        } else {
            self.suppressed += 1;
            LogDecision::Suppress
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_client_gets_its_burst_then_its_rate() {
        let mut limiter = RateLimiter::new(2, 3, 10);
        let t0 = Duration::from_secs(100);
        let allowed = (0..10).filter(|_| limiter.allow(&"a", t0)).count();
        assert_eq!(allowed, 3, "the burst");
        assert!(!limiter.allow(&"a", t0 + 100 * MS), "0.2 tokens is not one");
        assert!(
            limiter.allow(&"a", t0 + 500 * MS),
            "2/s refills one in 500 ms"
        );
        assert!(limiter.allow(&"b", t0), "clients are limited apart");
    }

    #[test]
    fn zero_rate_means_unlimited() {
        let mut limiter = RateLimiter::new(0, 0, 1);
        assert!((0..1000).all(|_| limiter.allow(&1u8, Duration::ZERO)));
        assert_eq!(limiter.clients(), 0);
    }

    #[test]
    fn remembered_clients_are_bounded_and_the_oldest_goes() {
        let mut limiter = RateLimiter::new(1, 1, 3);
        for (i, key) in [1, 2, 3, 4].iter().enumerate() {
            assert!(limiter.allow(key, Duration::from_secs(i as u64)));
        }
        assert_eq!(limiter.clients(), 3);
        // 1 was forgotten (oldest), so it has a full bucket again; 4 is still empty.
        assert!(limiter.allow(&1, Duration::from_secs(4)));
        assert!(!limiter.allow(&4, Duration::from_secs(3)));
    }

    #[test]
    fn logs_are_bounded_per_window_and_the_rest_counted() {
        let mut logs = LogLimiter::new(Duration::from_secs(10), 2);
        let t = Duration::from_secs(1);
        assert_eq!(
            logs.check(t),
            LogDecision::Log {
                suppressed_before: 0
            }
        );
        assert_eq!(
            logs.check(t),
            LogDecision::Log {
                suppressed_before: 0
            }
        );
        for _ in 0..5 {
            assert_eq!(logs.check(t), LogDecision::Suppress);
        }
        assert_eq!(
            logs.check(t + Duration::from_secs(10)),
            LogDecision::Log {
                suppressed_before: 5
            }
        );
    }
}
