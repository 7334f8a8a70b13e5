//! Per-source request rate limits for the unauthenticated endpoints (the boot protocol
//! and image downloads), as token buckets: each source address may make `burst`
//! requests at once and `per_s` a second after that. The defaults are generous on
//! purpose: a whole rack may sit behind one address (a NAT, or the simulator's one host
//! per rack), and a boot storm of a hundred machines is roughly a thousand requests in a
//! few seconds. What they stop is one source making the daemon do nothing else.
//!
//! Bounded: at most `sources_max` addresses are remembered; when a new one arrives at the
//! bound, the one seen longest ago is forgotten (it would have refilled to a full bucket
//! anyway unless it was seen within the last `burst / per_s` seconds).

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::model::TimestampMs;

/// The limit, as configured (`[http] rate_per_s`, `rate_burst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Requests per second each source may make, sustained. 0 turns limiting off.
    pub per_s: u32,
    /// Requests a source may make at once (the bucket's size).
    pub burst: u32,
    /// Sources remembered at most.
    pub sources_max: usize,
}

pub const PER_S_DEFAULT: u32 = 200;
pub const BURST_DEFAULT: u32 = 2000;
pub const SOURCES_MAX_DEFAULT: usize = 4096;

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            per_s: PER_S_DEFAULT,
            burst: BURST_DEFAULT,
            sources_max: SOURCES_MAX_DEFAULT,
        }
    }
}

impl RateLimitConfig {
    /// No limit at all.
    pub fn off() -> Self {
        RateLimitConfig {
            per_s: 0,
            ..RateLimitConfig::default()
        }
    }
}

/// One request's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateVerdict {
    Allow,
    /// Refuse it; a token is available again in `retry_after_s` (at least 1).
    /// `first_in_window` is true for the source's first refusal since its bucket last
    /// allowed a request, so the caller logs once per flood, not once per request.
    Refuse {
        retry_after_s: u64,
        first_in_window: bool,
    },
}

/// Milli-tokens, so refill at any rate stays integer arithmetic (deterministic).
const MILLI: u64 = 1000;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    milli_tokens: u64,
    updated_ms: TimestampMs,
    refusing: bool,
}

#[derive(Clone, Debug)]
pub struct SourceRateLimiter {
    config: RateLimitConfig,
    buckets: BTreeMap<IpAddr, Bucket>,
}

impl SourceRateLimiter {
    pub fn new(config: RateLimitConfig) -> Self {
        SourceRateLimiter {
            config: RateLimitConfig {
                burst: config.burst.max(1),
                sources_max: config.sources_max.max(1),
                ..config
            },
            buckets: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> RateLimitConfig {
        self.config
    }

    /// Takes one token from `source`'s bucket at `now_ms`, or says when to come back.
    pub fn check(&mut self, source: IpAddr, now_ms: TimestampMs) -> RateVerdict {
        if self.config.per_s == 0 {
            return RateVerdict::Allow;
        }
        let capacity = u64::from(self.config.burst) * MILLI;
        if !self.buckets.contains_key(&source) && self.buckets.len() >= self.config.sources_max {
            self.forget_stalest();
        }
        let bucket = self.buckets.entry(source).or_insert(Bucket {
            milli_tokens: capacity,
            updated_ms: now_ms,
            refusing: false,
        });
        // A clock that went backwards refills nothing (and takes nothing away).
        let elapsed_ms = now_ms.saturating_sub(bucket.updated_ms).max(0) as u64;
        // per_s tokens a second = per_s milli-tokens a millisecond.
        let refill = elapsed_ms.saturating_mul(u64::from(self.config.per_s));
        bucket.milli_tokens = bucket.milli_tokens.saturating_add(refill).min(capacity);
        bucket.updated_ms = bucket.updated_ms.max(now_ms);
        if bucket.milli_tokens >= MILLI {
            bucket.milli_tokens -= MILLI;
            bucket.refusing = false;
            return RateVerdict::Allow;
        }
        let missing = MILLI - bucket.milli_tokens;
        let per_ms = u64::from(self.config.per_s);
        let wait_ms = missing.div_ceil(per_ms);
        let first_in_window = !bucket.refusing;
        bucket.refusing = true;
        RateVerdict::Refuse {
            retry_after_s: wait_ms.div_ceil(1000).max(1),
            first_in_window,
        }
    }

    /// Sources remembered now.
    pub fn sources(&self) -> usize {
        self.buckets.len()
    }

    fn forget_stalest(&mut self) {
        let stalest = self
            .buckets
            .iter()
            .min_by_key(|(address, bucket)| (bucket.updated_ms, **address))
            .map(|(address, _)| *address);
        if let Some(address) = stalest {
            self.buckets.remove(&address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn limiter(per_s: u32, burst: u32, sources_max: usize) -> SourceRateLimiter {
        SourceRateLimiter::new(RateLimitConfig {
            per_s,
            burst,
            sources_max,
        })
    }

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_retry_after() {
        let mut limits = limiter(2, 5, 10);
        for _ in 0..5 {
            assert_eq!(limits.check(ip(1), 1_000), RateVerdict::Allow);
        }
        assert_eq!(
            limits.check(ip(1), 1_000),
            RateVerdict::Refuse {
                retry_after_s: 1,
                first_in_window: true
            }
        );
        // Repeats of the same flood are not "first" again.
        assert_eq!(
            limits.check(ip(1), 1_001),
            RateVerdict::Refuse {
                retry_after_s: 1,
                first_in_window: false
            }
        );
        // Another source is unaffected.
        assert_eq!(limits.check(ip(2), 1_001), RateVerdict::Allow);
    }

    #[test]
    fn tokens_refill_at_the_sustained_rate() {
        let mut limits = limiter(10, 1, 10);
        assert_eq!(limits.check(ip(1), 0), RateVerdict::Allow);
        assert!(matches!(
            limits.check(ip(1), 50),
            RateVerdict::Refuse { .. }
        ));
        // 10 a second: one token per 100 ms.
        assert_eq!(limits.check(ip(1), 100), RateVerdict::Allow);
        assert!(matches!(
            limits.check(ip(1), 150),
            RateVerdict::Refuse { .. }
        ));
        // A long pause refills no more than the burst.
        assert_eq!(limits.check(ip(1), 100_000), RateVerdict::Allow);
        assert!(matches!(
            limits.check(ip(1), 100_000),
            RateVerdict::Refuse { .. }
        ));
    }

    #[test]
    fn retry_after_covers_a_slow_refill() {
        // One token every 2 s at 0.5/s cannot be expressed; per_s 1 is the slowest.
        let mut limits = limiter(1, 1, 10);
        assert_eq!(limits.check(ip(1), 0), RateVerdict::Allow);
        assert_eq!(
            limits.check(ip(1), 100),
            RateVerdict::Refuse {
                retry_after_s: 1,
                first_in_window: true
            }
        );
    }

    #[test]
    fn sustained_rate_holds_over_time() {
        let mut limits = limiter(100, 10, 10);
        let mut allowed = 0;
        // One request a millisecond for ten seconds: 10 burst + 100/s × 10 s.
        for ms in 0..10_000 {
            if limits.check(ip(1), ms) == RateVerdict::Allow {
                allowed += 1;
            }
        }
        assert!((1_005..=1_011).contains(&allowed), "allowed {allowed}");
    }

    #[test]
    fn sources_are_bounded_and_the_stalest_forgotten() {
        let mut limits = limiter(1, 1, 3);
        for (at, last) in [(0, 1), (10, 2), (20, 3)] {
            assert_eq!(limits.check(ip(last), at), RateVerdict::Allow);
        }
        assert_eq!(limits.sources(), 3);
        // Source 1 (seen at 0) is forgotten for source 4.
        assert_eq!(limits.check(ip(4), 30), RateVerdict::Allow);
        assert_eq!(limits.sources(), 3);
        // Source 2 is still remembered (and still empty).
        assert!(matches!(
            limits.check(ip(2), 40),
            RateVerdict::Refuse { .. }
        ));
    }

    #[test]
    fn off_allows_everything_and_remembers_nothing() {
        let mut limits = SourceRateLimiter::new(RateLimitConfig::off());
        for _ in 0..10_000 {
            assert_eq!(limits.check(ip(1), 0), RateVerdict::Allow);
        }
        assert_eq!(limits.sources(), 0);
    }

    #[test]
    fn a_clock_going_backwards_refills_nothing() {
        let mut limits = limiter(1000, 1, 3);
        assert_eq!(limits.check(ip(1), 10_000), RateVerdict::Allow);
        assert!(matches!(
            limits.check(ip(1), 5_000),
            RateVerdict::Refuse { .. }
        ));
    }
}
