//! Bounds the audit events unauthenticated requests can cause. A refused registration or
//! an unexpected heartbeat is worth one event; the same refusal a thousand times a minute
//! (a machine retrying, someone flooding the provisioning network) is worth one event and
//! a count. Per key (a node and what it did), the first event of each window is written;
//! the repeats within it are counted and written as one summary with the next event
//! after the window.

use std::collections::BTreeMap;

use super::model::TimestampMs;

/// One event per key per this long, by default.
pub const WINDOW_MS_DEFAULT: TimestampMs = 60_000;
/// Keys remembered at most; the oldest are forgotten first (their pending count is lost,
/// which is what a bound costs: the flood's first event was written).
pub const KEYS_MAX_DEFAULT: usize = 10_000;

#[derive(Clone, Debug)]
pub struct EventThrottle {
    window_ms: TimestampMs,
    keys_max: usize,
    entries: BTreeMap<String, Window>,
}

#[derive(Clone, Copy, Debug)]
struct Window {
    started_ms: TimestampMs,
    suppressed: u64,
}

/// What to do with one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write it; `suppressed` repeats of it were not written since `since_ms` (write a
    /// summary with it when non-zero).
    Write {
        suppressed: u64,
        since_ms: TimestampMs,
    },
    /// Count it; do not write it.
    Suppress,
}

impl Default for EventThrottle {
    fn default() -> Self {
        EventThrottle::new(WINDOW_MS_DEFAULT, KEYS_MAX_DEFAULT)
    }
}

impl EventThrottle {
    pub fn new(window_ms: TimestampMs, keys_max: usize) -> Self {
        EventThrottle {
            window_ms: window_ms.max(1),
            keys_max: keys_max.max(1),
            entries: BTreeMap::new(),
        }
    }

    pub fn admit(&mut self, key: &str, now_ms: TimestampMs) -> Verdict {
        if let Some(window) = self.entries.get_mut(key) {
            if now_ms < window.started_ms + self.window_ms {
                window.suppressed += 1;
                return Verdict::Suppress;
            }
            let verdict = Verdict::Write {
                suppressed: window.suppressed,
                since_ms: window.started_ms,
            };
            *window = Window {
                started_ms: now_ms,
                suppressed: 0,
            };
            return verdict;
        }
        if self.entries.len() >= self.keys_max {
            self.forget_oldest();
        }
        self.entries.insert(
            key.to_string(),
            Window {
                started_ms: now_ms,
                suppressed: 0,
            },
        );
        Verdict::Write {
            suppressed: 0,
            since_ms: now_ms,
        }
    }

    fn forget_oldest(&mut self) {
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(key, window)| (window.started_ms, (*key).clone()))
            .map(|(key, _)| key.clone());
        if let Some(key) = oldest {
            self.entries.remove(&key);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_of_each_window_is_written_with_the_count_of_the_rest() {
        let mut throttle = EventThrottle::new(1000, 10);
        assert_eq!(
            throttle.admit("a", 0),
            Verdict::Write {
                suppressed: 0,
                since_ms: 0
            }
        );
        for at in 1..200 {
            assert_eq!(throttle.admit("a", at), Verdict::Suppress);
        }
        // Another key is not held back by the first.
        assert!(matches!(throttle.admit("b", 5), Verdict::Write { .. }));
        assert_eq!(
            throttle.admit("a", 1000),
            Verdict::Write {
                suppressed: 199,
                since_ms: 0
            }
        );
        assert_eq!(throttle.admit("a", 1001), Verdict::Suppress);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_oldest() {
        let mut throttle = EventThrottle::new(1000, 3);
        for (at, key) in ["a", "b", "c", "d"].iter().enumerate() {
            throttle.admit(key, at as TimestampMs);
        }
        assert_eq!(throttle.len(), 3);
        // `a` was forgotten: it is written again at once.
        assert!(matches!(throttle.admit("a", 10), Verdict::Write { .. }));
        assert_eq!(throttle.admit("c", 10), Verdict::Suppress);
    }
}
