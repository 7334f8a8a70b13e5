//! Input checks for everything a client can send: registration bodies, flavors, node
//! updates. Each error names the offending field so the 4xx body can say what to fix.

use bearman_proto::RegisterRequest;

use super::boot::check_template;
use super::model::{BmcConfig, Flavor};

pub const NICS_MAX: usize = 64;
pub const DISKS_MAX: usize = 256;
pub const TEXT_LEN_MAX: usize = 256;
pub const INITRDS_MAX: usize = 16;
/// NIC firmware entries a registration may report (one per NIC, and a few spare).
pub const FIRMWARE_NICS_MAX: usize = NICS_MAX;
/// What a machine may call its BMC's address: a host name or an IP literal.
pub const ADDRESS_LEN_MAX: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {problem}")]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        field_error(field, problem)
    }
}

/// A configuration value refused at start-up; `key` is the setting as written in the
/// config file (`health.heartbeat_grace_ms`, `tick_ms`), so the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} {problem}")]
pub struct InvalidSetting {
    pub key: String,
    pub problem: String,
}

impl InvalidSetting {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        InvalidSetting {
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// `key`'s `value` must lie in `range`; `hint` (may be empty) says what to do instead.
    pub fn check_range<T>(
        key: &str,
        value: T,
        range: std::ops::RangeInclusive<T>,
        hint: &str,
    ) -> Result<(), InvalidSetting>
    where
        T: PartialOrd + std::fmt::Display,
    {
        if range.contains(&value) {
            return Ok(());
        }
        let hint = if hint.is_empty() {
            String::new()
        } else {
            format!(" ({hint})")
        };
        Err(InvalidSetting::new(
            key,
            format!("{value} is outside {}-{}{hint}", range.start(), range.end()),
        ))
    }
}

fn field_error(field: impl Into<String>, problem: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Text from outside (a machine, an operator): at most [`TEXT_LEN_MAX`] bytes and no
/// control character of any kind (C0, DEL, C1 — which covers ANSI escape sequences), so
/// it can be printed to a terminal or a log line as it is.
fn check_text(field: &str, value: &str) -> Result<(), FieldError> {
    if value.len() > TEXT_LEN_MAX {
        return Err(field_error(
            field,
            format!("longer than {TEXT_LEN_MAX} bytes"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() || is_display_override(c))
    {
        return Err(field_error(field, "contains control characters"));
    }
    Ok(())
}

/// Invisible characters that reorder or hide what a terminal shows (bidirectional
/// overrides and isolates, zero-width marks): text with them can display as something
/// other than what it is.
fn is_display_override(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// `aa:bb:cc:dd:ee:ff`, either case.
pub fn is_mac(text: &str) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A rack name: 1-63 characters of `[A-Za-z0-9-_.:]`.
pub fn check_rack(rack: &str) -> Result<(), FieldError> {
    if rack.is_empty()
        || rack.len() > 63
        || !rack
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(field_error(
            "rack",
            "must be 1-63 characters of [A-Za-z0-9-_.:]",
        ));
    }
    Ok(())
}

/// An operator's BMC settings for a node.
pub fn check_bmc(bmc: &BmcConfig) -> Result<(), FieldError> {
    if let Some(address) = &bmc.address {
        if address.is_empty() || address.len() > 253 || address.contains(char::is_whitespace) {
            return Err(field_error("bmc.address", "must be a host name or address"));
        }
    }
    if let Some(mac) = &bmc.mac {
        if !is_mac(mac) {
            return Err(field_error(
                "bmc.mac",
                format!("{mac:?} is not a MAC address"),
            ));
        }
    }
    if let Some(reference) = &bmc.credentials_ref {
        // A reference names where the secret lives (`env:VAR`, `file:KEY`); refusing
        // anything else keeps operators from pasting a password here.
        let valid = reference.len() <= 128
            && (reference.starts_with("env:") || reference.starts_with("file:"))
            && reference.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/')
            });
        if !valid {
            return Err(field_error(
                "bmc.credentials_ref",
                "must be env:VARIABLE or file:KEY naming where the secret is kept, never the secret itself",
            ));
        }
    }
    Ok(())
}

/// An operator's free-text reason: at most 1024 bytes; blank means `default`.
pub fn reason_or(reason: Option<&str>, default: &str) -> Result<String, FieldError> {
    match reason {
        Some(reason) if !reason.trim().is_empty() => required_reason(reason, ""),
        _ => Ok(default.to_string()),
    }
}

/// Longest operator reason kept in an event.
pub const REASON_BYTES_MAX: usize = 1024;

/// An operator's reason that must be given (`missing` says why, for the error): trimmed,
/// at most [`REASON_BYTES_MAX`] bytes, no control characters (it is shown in terminals).
pub fn required_reason(reason: &str, missing: &str) -> Result<String, FieldError> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(field_error("reason", format!("required: {missing}")));
    }
    if reason.len() > REASON_BYTES_MAX {
        return Err(field_error(
            "reason",
            format!("longer than {REASON_BYTES_MAX} bytes"),
        ));
    }
    if reason.chars().any(char::is_control) {
        return Err(field_error("reason", "contains control characters"));
    }
    Ok(reason.to_string())
}

/// RFC 1123 hostname: dot-separated labels of [a-z0-9-], 1-63 each, 253 in all.
pub fn check_hostname(hostname: &str) -> Result<(), FieldError> {
    let ok = !hostname.is_empty()
        && hostname.len() <= 253
        && hostname.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(field_error(
            "hostname",
            format!("{hostname:?} is not a lowercase RFC 1123 hostname"),
        ))
    }
}

pub fn check_register(request: &RegisterRequest) -> Result<(), FieldError> {
    if request.serial.trim().is_empty() {
        return Err(field_error("serial", "must not be empty"));
    }
    check_text("serial", &request.serial)?;
    check_text("vendor", &request.vendor)?;
    check_text("model", &request.model)?;
    check_text("cpu.model", &request.cpu.model)?;
    if request.nics.is_empty() {
        return Err(field_error("nics", "at least one NIC is required"));
    }
    if request.nics.len() > NICS_MAX {
        return Err(field_error("nics", format!("more than {NICS_MAX} entries")));
    }
    if request.disks.len() > DISKS_MAX {
        return Err(field_error(
            "disks",
            format!("more than {DISKS_MAX} entries"),
        ));
    }
    for (index, nic) in request.nics.iter().enumerate() {
        if nic.name.is_empty() {
            return Err(field_error(
                format!("nics[{index}].name"),
                "must not be empty",
            ));
        }
        check_text(&format!("nics[{index}].name"), &nic.name)?;
        if !is_mac(&nic.mac) {
            return Err(field_error(
                format!("nics[{index}].mac"),
                format!("{:?} is not a MAC address", truncate(&nic.mac)),
            ));
        }
        if let Some(lldp) = &nic.lldp {
            check_text(&format!("nics[{index}].lldp.chassis_id"), &lldp.chassis_id)?;
            check_text(&format!("nics[{index}].lldp.port_id"), &lldp.port_id)?;
            if let Some(name) = &lldp.system_name {
                check_text(&format!("nics[{index}].lldp.system_name"), name)?;
            }
            if let Some(vlan) = lldp.vlan {
                if !(1..=4094).contains(&vlan) {
                    return Err(field_error(
                        format!("nics[{index}].lldp.vlan"),
                        format!("{vlan} is not a VLAN id"),
                    ));
                }
            }
        }
    }
    for (index, disk) in request.disks.iter().enumerate() {
        check_text(&format!("disks[{index}].name"), &disk.name)?;
        check_text(&format!("disks[{index}].model"), &disk.model)?;
    }
    if let Some(bmc) = &request.bmc {
        if !is_mac(&bmc.mac) {
            return Err(field_error(
                "bmc.mac",
                format!("{:?} is not a MAC address", truncate(&bmc.mac)),
            ));
        }
        if let Some(address) = &bmc.address {
            check_text("bmc.address", address)?;
            if address.len() > ADDRESS_LEN_MAX || address.contains(char::is_whitespace) {
                return Err(field_error("bmc.address", "must be a host name or address"));
            }
        }
    }
    if let Some(bios) = &request.firmware.bios {
        check_text("firmware.bios", bios)?;
    }
    if let Some(bmc) = &request.firmware.bmc {
        check_text("firmware.bmc", bmc)?;
    }
    if request.firmware.nics.len() > FIRMWARE_NICS_MAX {
        return Err(field_error(
            "firmware.nics",
            format!("more than {FIRMWARE_NICS_MAX} entries"),
        ));
    }
    for (name, version) in &request.firmware.nics {
        check_text("firmware.nics", name)?;
        check_text(&format!("firmware.nics[{}]", truncate(name)), version)?;
    }
    Ok(())
}

/// Free text a booting machine reports about itself (`os-release`'s pretty name, a
/// boot phase): bounded, printable, so it can reach an operator's terminal as it is.
pub fn check_reported_text(field: &str, value: &str) -> Result<(), FieldError> {
    check_text(field, value)
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_artifact(field: &str, artifact: &bearman_proto::Artifact) -> Result<(), FieldError> {
    let url = &artifact.url;
    let absolute = url.starts_with("http://") || url.starts_with("https://");
    if url.is_empty() || !(absolute || url.starts_with('/')) || url.contains(char::is_whitespace) {
        return Err(field_error(
            format!("{field}.url"),
            "must be an http(s) URL or a path starting with / (served under the public URL)",
        ));
    }
    check_text(&format!("{field}.url"), url)?;
    if !is_sha256_hex(&artifact.sha256) {
        return Err(field_error(
            format!("{field}.sha256"),
            "must be 64 lowercase hex digits",
        ));
    }
    Ok(())
}

pub fn check_flavor(flavor: &Flavor) -> Result<(), FieldError> {
    if !super::ipam::is_valid_name(&flavor.name) {
        return Err(field_error(
            "name",
            "must be 1-63 characters of [a-z0-9-_.]",
        ));
    }
    check_artifact("kernel", &flavor.kernel)?;
    if flavor.initrds.len() > INITRDS_MAX {
        return Err(field_error(
            "initrds",
            format!("more than {INITRDS_MAX} entries"),
        ));
    }
    for (index, initrd) in flavor.initrds.iter().enumerate() {
        check_artifact(&format!("initrds[{index}]"), initrd)?;
    }
    if flavor.cmdline_template.len() > 4096 {
        return Err(field_error("cmdline_template", "longer than 4096 bytes"));
    }
    if flavor.cmdline_template.contains(['\n', '\r']) {
        return Err(field_error("cmdline_template", "must be one line"));
    }
    check_template(&flavor.cmdline_template)
        .map_err(|error| field_error("cmdline_template", error.to_string()))?;
    Ok(())
}

fn truncate(text: &str) -> String {
    text.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_trimmed_bounded_and_free_of_control_characters() {
        assert_eq!(reason_or(None, "default").unwrap(), "default");
        assert_eq!(reason_or(Some("  "), "default").unwrap(), "default");
        assert_eq!(reason_or(Some(" dimm swap "), "d").unwrap(), "dimm swap");
        assert!(reason_or(Some("a\u{1b}[2Jb"), "d").is_err());
        assert!(reason_or(Some(&"x".repeat(REASON_BYTES_MAX + 1)), "d").is_err());
        let missing = required_reason(" ", "say why").unwrap_err();
        assert_eq!(missing.field, "reason");
        assert_eq!(missing.problem, "required: say why");
    }
}
