//! Dashboard sessions, pure: the cookie a login sets, how any replica checks it, and the
//! CSRF token derived from it. `now_ms` is passed in; nothing here reads a clock or a store.
//!
//! A session cookie is `v1.<token name>.<expires_at_ms>.<hex mac>`, the mac being
//! HMAC-SHA256 of `v1.<token name>.<expires_at_ms>` keyed by the token's stored sha256.
//! So the cookie carries no secret, every replica on the database can check it without
//! shared session state, and deleting the token (its key is gone) ends its sessions.
//! The CSRF token is HMAC-SHA256 of `csrf.` + the cookie value under the same key.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::model::TimestampMs;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "bearman_session";
/// The header a cookie-authenticated mutation must carry (lowercase, as HTTP/1 headers
/// are compared).
pub const CSRF_HEADER: &str = "x-bearman-csrf";
/// The longest a session may last, whatever the configuration says.
pub const SESSION_MAX_S_LIMIT: u64 = 8 * 3600;
/// The shortest `[dashboard] session_max_s` accepted.
pub const SESSION_MAX_S_MIN: u64 = 60;
/// A cookie longer than this is refused unread (token names are at most 63 bytes).
pub const COOKIE_VALUE_BYTES_MAX: usize = 256;

const VERSION: &str = "v1";

type HmacSha256 = Hmac<Sha256>;

/// `[dashboard]` as written in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    /// How long a login lasts (it never outlives the token either).
    #[serde(default = "session_max_s_default")]
    pub session_max_s: u64,
}

fn session_max_s_default() -> u64 {
    SESSION_MAX_S_LIMIT
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            session_max_s: session_max_s_default(),
        }
    }
}

impl DashboardConfig {
    /// A problem naming the key, or nothing.
    pub fn validate(&self) -> Result<(), String> {
        if !(SESSION_MAX_S_MIN..=SESSION_MAX_S_LIMIT).contains(&self.session_max_s) {
            return Err(format!(
                "dashboard.session_max_s {} is outside {SESSION_MAX_S_MIN}-{SESSION_MAX_S_LIMIT}",
                self.session_max_s
            ));
        }
        Ok(())
    }
}

/// What the HTTP side needs of the dashboard, fixed at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DashboardSettings {
    /// How long a login lasts (validated by [`DashboardConfig::validate`]).
    pub session_max_s: u64,
    /// The admin listener speaks TLS: the cookie gets `Secure`.
    pub secure_cookie: bool,
}

impl Default for DashboardSettings {
    fn default() -> Self {
        DashboardSettings {
            session_max_s: SESSION_MAX_S_LIMIT,
            secure_cookie: false,
        }
    }
}

fn mac_hex(key: &str, message: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn mac_verifies(key: &str, message: &str, given_hex: &str) -> bool {
    let Ok(given) = hex::decode(given_hex) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    mac.update(message.as_bytes());
    // Constant time: the comparison does not tell how many leading bytes were right.
    mac.verify_slice(&given).is_ok()
}

/// A new session's cookie value for token `token_name` (keyed by its stored sha256),
/// expiring at `expires_at_ms`.
pub fn issue(token_name: &str, token_sha256: &str, expires_at_ms: TimestampMs) -> String {
    let signed = format!("{VERSION}.{token_name}.{expires_at_ms}");
    let mac = mac_hex(token_sha256, &signed);
    format!("{signed}.{mac}")
}

/// When a session opened at `now_ms` ends: `session_max_s` later, or when the token
/// expires if that is sooner.
pub fn expiry(
    now_ms: TimestampMs,
    session_max_s: u64,
    token_expires_at_ms: Option<TimestampMs>,
) -> TimestampMs {
    let by_config = now_ms.saturating_add((session_max_s.min(SESSION_MAX_S_LIMIT) * 1000) as i64);
    token_expires_at_ms.map_or(by_config, |at| at.min(by_config))
}

/// A cookie value taken apart, not yet checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim<'a> {
    pub token_name: &'a str,
    pub expires_at_ms: TimestampMs,
    signed: &'a str,
    mac: &'a str,
}

/// Why a session cookie is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a session cookie of this version, or its mac does not match (forged, or its
    /// token was replaced).
    Invalid,
    /// It was genuine but its time is up.
    Expired,
}

/// Takes a cookie value apart; `None` for anything not shaped like one. Token names may
/// contain dots, so the value is split from the right.
pub fn parse(value: &str) -> Option<Claim<'_>> {
    if value.len() > COOKIE_VALUE_BYTES_MAX {
        return None;
    }
    let (signed, mac) = value.rsplit_once('.')?;
    let (head, expires) = signed.rsplit_once('.')?;
    let token_name = head.strip_prefix("v1.")?;
    if token_name.is_empty() || mac.len() != 64 {
        return None;
    }
    let expires_at_ms = expires.parse::<TimestampMs>().ok()?;
    Some(Claim {
        token_name,
        expires_at_ms,
        signed,
        mac,
    })
}

impl Claim<'_> {
    /// Whether the cookie was made with this key and is still in time at `now_ms`. The
    /// mac is checked first, so a forged cookie is `Invalid` whatever time it names.
    pub fn check(&self, token_sha256: &str, now_ms: TimestampMs) -> Result<(), Refusal> {
        if !mac_verifies(token_sha256, self.signed, self.mac) {
            return Err(Refusal::Invalid);
        }
        if now_ms >= self.expires_at_ms {
            return Err(Refusal::Expired);
        }
        Ok(())
    }
}

fn csrf_message(cookie_value: &str) -> String {
    format!("csrf.{cookie_value}")
}

/// The CSRF token of a session: what the page must echo in [`CSRF_HEADER`].
pub fn csrf_token(cookie_value: &str, token_sha256: &str) -> String {
    mac_hex(token_sha256, &csrf_message(cookie_value))
}

/// Whether `given` is the session's CSRF token (constant-time).
pub fn csrf_matches(cookie_value: &str, token_sha256: &str, given: &str) -> bool {
    given.len() == 64 && mac_verifies(token_sha256, &csrf_message(cookie_value), given)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
    const OTHER_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_session_checks_until_it_expires_and_only_under_its_key() {
        let value = issue("ops.alice", KEY, 1_000);
        let claim = parse(&value).expect("parses");
        assert_eq!(claim.token_name, "ops.alice");
        assert_eq!(claim.expires_at_ms, 1_000);
        assert_eq!(claim.check(KEY, 999), Ok(()));
        assert_eq!(claim.check(KEY, 1_000), Err(Refusal::Expired));
        assert_eq!(claim.check(OTHER_KEY, 999), Err(Refusal::Invalid));
    }

    #[test]
    fn a_changed_name_or_time_breaks_the_mac() {
        let value = issue("viewer", KEY, 5_000);
        let mac = value.rsplit_once('.').unwrap().1;
        for forged in [
            format!("v1.admin.5000.{mac}"),
            format!("v1.viewer.9999999.{mac}"),
        ] {
            let claim = parse(&forged).expect("shaped like a cookie");
            assert_eq!(claim.check(KEY, 0), Err(Refusal::Invalid), "{forged}");
        }
    }

    #[test]
    fn malformed_values_do_not_parse() {
        let mac = "a".repeat(64);
        for value in [
            String::new(),
            "v1".into(),
            format!("v2.name.5.{mac}"),
            format!("v1..5.{mac}"),
            format!("v1.name.soon.{mac}"),
            "v1.name.5.abc".into(),
            format!("v1.{}.5.{mac}", "n".repeat(300)),
        ] {
            assert_eq!(parse(&value), None, "{value:?}");
        }
    }

    #[test]
    fn csrf_token_is_bound_to_the_session_and_key() {
        let value = issue("op", KEY, 10);
        let csrf = csrf_token(&value, KEY);
        assert!(csrf_matches(&value, KEY, &csrf));
        assert!(!csrf_matches(&value, OTHER_KEY, &csrf));
        assert!(!csrf_matches(&issue("op", KEY, 11), KEY, &csrf));
        assert!(!csrf_matches(&value, KEY, ""));
        assert!(!csrf_matches(&value, KEY, &"0".repeat(64)));
    }

    #[test]
    fn expiry_is_the_sooner_of_the_setting_and_the_token() {
        assert_eq!(expiry(1_000, 60, None), 61_000);
        assert_eq!(expiry(1_000, 60, Some(2_000)), 2_000);
        assert_eq!(
            expiry(0, 999_999, None),
            (SESSION_MAX_S_LIMIT * 1000) as i64
        );
    }

    #[test]
    fn the_setting_is_bounded_and_names_its_key() {
        assert_eq!(DashboardConfig::default().validate(), Ok(()));
        for bad in [0, 59, SESSION_MAX_S_LIMIT + 1] {
            let problem = DashboardConfig { session_max_s: bad }
                .validate()
                .unwrap_err();
            assert!(problem.contains("dashboard.session_max_s"), "{problem}");
        }
    }
}
