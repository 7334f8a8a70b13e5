//! Node identity: the DMI system-uuid, normalised to lowercase hyphenated form.
//!
//! iPXE expands `${uuid}` in lowercase, `dmidecode -s system-uuid` prints uppercase, so both
//! sides normalise before comparing or storing.

use std::fmt;

/// Characters in the hyphenated form.
const UUID_LEN: usize = 36;

/// Where the layout puts its hyphens (`8-4-4-4-12`).
const HYPHEN_AT: [usize; 4] = [8, 13, 18, 23];

/// Whether the layout puts a hyphen at each position.
const HYPHEN_HERE: [bool; UUID_LEN] = {
    let mut here = [false; UUID_LEN];
    let mut h = 0;
    while h < HYPHEN_AT.len() {
        here[HYPHEN_AT[h]] = true;
        h += 1;
    }
    here
};

/// A DMI system-uuid in canonical lowercase `8-4-4-4-12` form.
///
/// Kept inline as its 36 ASCII bytes rather than a `String`: parsing one (every boot
/// request does) allocates nothing, clones are a copy and comparisons are one `memcmp`.
/// Byte order is string order, so sorting is unchanged.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeUuid([u8; UUID_LEN]);

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
        let Ok(bytes) = <[u8; UUID_LEN]>::try_from(input.as_bytes()) else {
            return Err(invalid());
        };
        // Every boot request parses one, so it is arithmetic the compiler turns into
        // vector instructions (about a quarter of a table lookup per byte): a hex digit
        // where the layout wants one, a hyphen where it wants one. ASCII digits and `-`
        // already have bit 0x20 set; setting it lowercases `A`–`F`.
        let mut normalised = [0u8; UUID_LEN];
        let mut misplaced = false;
        for (position, &byte) in bytes.iter().enumerate() {
            let lower = byte | 0x20;
            let hex = (byte.wrapping_sub(b'0') < 10) | (lower.wrapping_sub(b'a') < 6);
            misplaced |= if HYPHEN_HERE[position] {
                byte != b'-'
            } else {
                !hex
            };
            normalised[position] = lower;
        }
        if misplaced {
            return Err(invalid());
        }
        Ok(NodeUuid(normalised))
    }

    /// The 128 bits the 32 hex digits spell: a key that compares in one step (a boot
    /// request looks one up in a tree of thousands), one-to-one with the uuid.
    pub fn to_u128(&self) -> u128 {
        // The digits gathered group by group (fixed-size copies), then each pair packed
        // into a byte: straight-line code the compiler vectorises, not 32 wide shifts.
        let mut digits = [0u8; 32];
        digits[0..8].copy_from_slice(&self.0[0..8]);
        digits[8..12].copy_from_slice(&self.0[9..13]);
        digits[12..16].copy_from_slice(&self.0[14..18]);
        digits[16..20].copy_from_slice(&self.0[19..23]);
        digits[20..32].copy_from_slice(&self.0[24..36]);
        // A lowercase hex digit: `0`–`9` are 0x30–0x39 and `a`–`f` 0x61–0x66, so the low
        // four bits plus 9 for a letter (bit 6) give its value.
        let value = |digit: u8| (digit & 0x0f) + 9 * (digit >> 6);
        let mut bytes = [0u8; 16];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = value(pair[0]) << 4 | value(pair[1]);
        }
        u128::from_be_bytes(bytes)
    }

    pub fn as_str(&self) -> &str {
        // Checking 36 bytes on every call was measurable: the daemon reads a uuid as text
        // several times per request and per node per controller tick.
        debug_assert!(self.0.is_ascii());
        // SAFETY: the field is private and `parse` is the only constructor (`from_index`
        // goes through it); it accepts hex digits and hyphens only, which are ASCII and
        // so valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// A deterministic uuid derived from a number; used by fixtures and the simulator,
    /// which must not draw identities from the OS.
    pub fn from_index(namespace: u32, index: u64) -> Self {
        let hex = format!("{namespace:08x}{index:024x}");
        let text = format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        );
        NodeUuid::parse(&text).expect("hex digits in the 8-4-4-4-12 layout")
    }
}

impl fmt::Display for NodeUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::hash::Hash for NodeUuid {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As a `str` hashes, like the former `String`: recorded hashes stay valid.
        self.as_str().hash(state);
    }
}

impl fmt::Debug for NodeUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // As the former `NodeUuid(String)` printed: NodeUuid("…").
        f.debug_tuple("NodeUuid").field(&self.as_str()).finish()
    }
}

impl serde::Serialize for NodeUuid {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
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
            // Right length, hyphens moved, doubled or replaced.
            "4c4c454-40042-3510-8052-b4c04f4e4a32",
            "4c4c4544--042-3510-8052-b4c04f4e4a32",
            "4c4c4544-0042-3510-8052-b4c04f4e4a-2",
            "4c4c4544x0042-3510-8052-b4c04f4e4a32",
            "4c4c4544-0042-3510-8052-b4c04f4e4a3\u{0}",
            "4c4c4544-0042-3510-8052-b4c04f4e4aé",
        ] {
            assert!(NodeUuid::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Every byte value at every position of a valid uuid: accepted exactly when the
    /// layout allows it there, and then normalised to lowercase.
    #[test]
    fn uuid_parse_judges_every_byte_at_every_position() {
        let valid = *b"4c4c4544-0042-3510-8052-b4c04f4e4a32";
        for position in 0..UUID_LEN {
            for byte in 0..=255u8 {
                let mut text = valid;
                text[position] = byte;
                let Ok(text) = std::str::from_utf8(&text) else {
                    continue;
                };
                let allowed = if HYPHEN_AT.contains(&position) {
                    byte == b'-'
                } else {
                    byte.is_ascii_hexdigit()
                };
                match NodeUuid::parse(text) {
                    Ok(parsed) => {
                        assert!(allowed, "{text:?} accepted");
                        assert_eq!(parsed.as_str(), text.to_ascii_lowercase());
                    }
                    Err(_) => assert!(!allowed, "{text:?} refused"),
                }
            }
        }
    }

    #[test]
    fn uuid_to_u128_is_the_hex_digits_value() {
        let parsed = NodeUuid::parse("4C4C4544-0042-3510-8052-B4C04F4E4A32").unwrap();
        assert_eq!(parsed.to_u128(), 0x4c4c4544_0042_3510_8052_b4c04f4e4a32);
        let all = NodeUuid::parse("ffffffff-ffff-ffff-ffff-ffffffffffff").unwrap();
        assert_eq!(all.to_u128(), u128::MAX);
        let zero = NodeUuid::parse("00000000-0000-0000-0000-000000000000").unwrap();
        assert_eq!(zero.to_u128(), 0);
    }

    #[test]
    fn uuid_from_index_is_valid_and_distinct() {
        let a = NodeUuid::from_index(7, 1);
        let b = NodeUuid::from_index(7, 2);
        assert_ne!(a, b);
        assert_eq!(NodeUuid::parse(a.as_str()).unwrap(), a);
    }
}
