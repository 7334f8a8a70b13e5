//! The run's trace: every externally visible thing that happened, in virtual-time order,
//! and its hash. Two runs of one scenario and seed must produce byte-identical traces.

use std::time::Duration;

use sha2::{Digest, Sha256};

#[derive(Clone, Debug, Default)]
pub struct Trace {
    lines: Vec<String>,
}

impl Trace {
    pub fn record(&mut self, at: Duration, what: impl AsRef<str>) {
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
        let mut hasher = Sha256::new();
        for line in &self.lines {
            hasher.update(line.as_bytes());
            hasher.update(b"\n");
        }
        hex::encode(hasher.finalize())
    }

    pub fn extend(&mut self, lines: impl IntoIterator<Item = String>) {
        self.lines.extend(lines);
    }
}
