//! The run's trace: every externally visible thing that happened, in virtual-time order,
//! and its hash. Two runs of one scenario and seed must produce byte-identical traces.

use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest, Sha256};

#[derive(Clone, Debug, Default)]
pub struct Trace {
    lines: Vec<String>,
    /// The hash, once asked for (the report and the sweep's outcome both ask; hashing a 10,000-
    /// node run's trace is half a billion instructions). Cleared by any
    /// change to the lines.
    hash: OnceLock<String>,
}

impl Trace {
    pub fn record(&mut self, at: Duration, what: impl AsRef<str>) {
        self.hash.take();
        self.lines
            .push(format!("{} {}", crate::fleet::seconds(at), what.as_ref()));
    }

    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Hex sha256 over the lines joined by newlines.
    pub fn hash(&self) -> String {
        self.hash
            .get_or_init(|| {
                let mut hasher = Sha256::new();
                for line in &self.lines {
                    hasher.update(line.as_bytes());
                    hasher.update(b"\n");
                }
                hex::encode(hasher.finalize())
            })
            .clone()
    }

    pub fn extend(&mut self, lines: impl IntoIterator<Item = String>) {
        self.hash.take();
        self.lines.extend(lines);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_follows_every_change_to_the_lines() {
        let mut trace = Trace::default();
        let empty = trace.hash();
        trace.record(Duration::from_millis(1500), "one");
        let one = trace.hash();
        assert_ne!(one, empty);
        assert_eq!(trace.hash(), one, "asked twice, the same");
        trace.extend(["2.000 two".to_string()]);
        let two = trace.hash();
        assert_ne!(two, one);
        let mut again = Trace::default();
        again.record(Duration::from_millis(1500), "one");
        again.record(Duration::from_secs(2), "two");
        assert_eq!(again.lines(), trace.lines());
        assert_eq!(again.hash(), two, "the hash is of the lines alone");
    }
}
