//! Node identity: the DMI system-uuid, normalised to lowercase hyphenated form.
//!
//! iPXE expands `${uuid}` in lowercase, `dmidecode -s system-uuid` prints uppercase, so both
//! sides normalise before comparing or storing.

use std::fmt;

/// A DMI system-uuid in canonical lowercase `8-4-4-4-12` form.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct NodeUuid(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid uuid {input:?}: expected 32 hex digits as 8-4-4-4-12")]
pub struct InvalidUuid {
    pub input: String,
}

impl NodeUuid {
    /// Parses and normalises a uuid; accepts either case, requires the hyphenated layout.
    pub fn parse(input: &str) -> Result<Self, InvalidUuid> {
        let invalid = || InvalidUuid {
            input: input.chars().take(64).collect(),
        };
        let bytes = input.as_bytes();
        if bytes.len() != 36 {
            return Err(invalid());
        }
        for (index, byte) in bytes.iter().enumerate() {
            let hyphen_expected = matches!(index, 8 | 13 | 18 | 23);
            let ok = if hyphen_expected {
                *byte == b'-'
            } else {
                byte.is_ascii_hexdigit()
            };
            if !ok {
                return Err(invalid());
            }
        }
        Ok(NodeUuid(input.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A deterministic uuid derived from a number; used by fixtures and the simulator,
    /// which must not draw identities from the OS.
    pub fn from_index(namespace: u32, index: u64) -> Self {
        let hex = format!("{namespace:08x}{index:024x}");
        NodeUuid(format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        ))
    }
}

impl fmt::Display for NodeUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for NodeUuid {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        NodeUuid::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_parse_normalises_case_and_rejects_garbage() {
        let parsed = NodeUuid::parse("4C4C4544-0042-3510-8052-B4C04F4E4A32").unwrap();
        assert_eq!(parsed.as_str(), "4c4c4544-0042-3510-8052-b4c04f4e4a32");
        for bad in [
            "",
            "not-a-uuid",
            "4c4c4544004235108052b4c04f4e4a32",
            "4c4c4544-0042-3510-8052-b4c04f4e4a3z",
            "4c4c4544-0042-3510-8052-b4c04f4e4a32-",
            "../../etc/passwd-aaaa-bbbb-cccccccccccc",
        ] {
            assert!(NodeUuid::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn uuid_from_index_is_valid_and_distinct() {
        let a = NodeUuid::from_index(7, 1);
        let b = NodeUuid::from_index(7, 2);
        assert_ne!(a, b);
        assert_eq!(NodeUuid::parse(a.as_str()).unwrap(), a);
    }
}
