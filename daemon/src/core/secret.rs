//! [`Secret`]: a password or token that never prints. The one type every driver (IPMI,
//! Redfish, Nova) holds secrets in.
//!
//! Architecture invariant: a secret is only ever held in a `Secret`, whose `Debug` and
//! `Display` print `***`; the value leaves it only through [`Secret::expose`], at the one
//! place that sends it (a child's environment, an HTTP header or body).

use std::fmt;

use serde::Deserialize;

#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself: only for handing to the system it unlocks, never for a message.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the secret replaced by `***`: a last line of
    /// defence for text that came from outside (a tool's error output, a reply body).
    pub fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            return text.to_string();
        }
        text.replace(&self.0, "***")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_and_is_redacted_from_text() {
        let secret = Secret::new("hunter2");
        assert_eq!(
            format!("{secret} {secret:?} {:?}", Some(&secret)),
            "*** *** Some(***)"
        );
        assert_eq!(secret.redact("login hunter2 refused"), "login *** refused");
        assert_eq!(Secret::default().redact("unchanged"), "unchanged");
        assert_eq!(secret.expose(), "hunter2");
    }
}
