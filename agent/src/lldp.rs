//! LLDP: Ethernet frames from the switch port a NIC is cabled to, parsed into the
//! neighbour (switch chassis, port, native VLAN, name) the agent reports at registration.
//!
//! Architecture invariant: a pure parser over bytes; hearing frames is someone else's job
//! (a raw socket in stage 1). Every length is checked before it is used, so any input
//! gives a neighbour or an error saying what was wrong, never a panic. What listening on
//! a NIC gave ([`NicLldp`]) and its console line live here too, so every host reports the
//! same way.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use bearman_proto::LldpNeighbor;

/// The LLDP ethertype.
pub const ETHERTYPE_LLDP: u16 = 0x88cc;
/// 802.1Q and 802.1ad tag ethertypes, skipped in front of the LLDP ethertype.
const ETHERTYPES_VLAN_TAG: [u16; 2] = [0x8100, 0x88a8];
/// Largest frame accepted (jumbo); LLDP frames are a few hundred bytes.
pub const FRAME_BYTES_MAX: usize = 9216;
/// VLAN tags skipped at most (a QinQ frame has two).
const VLAN_TAGS_MAX: usize = 2;
/// The IEEE 802.1 organisationally specific TLV OUI.
const OUI_IEEE_8021: [u8; 3] = [0x00, 0x80, 0xc2];

const TLV_END: u8 = 0;
const TLV_CHASSIS_ID: u8 = 1;
const TLV_PORT_ID: u8 = 2;
const TLV_SYSTEM_NAME: u8 = 5;
const TLV_ORGANISATIONAL: u8 = 127;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LldpError {
    #[error("frame of {len} bytes is larger than {FRAME_BYTES_MAX}")]
    TooLarge { len: usize },
    #[error("frame of {len} bytes is too short for an ethernet header")]
    ShortHeader { len: usize },
    #[error("ethertype {ethertype:#06x} is not LLDP (0x88cc)")]
    NotLldp { ethertype: u16 },
    #[error("tlv header at byte {offset} is truncated")]
    TruncatedHeader { offset: usize },
    #[error("{tlv} tlv at byte {offset} claims {len} bytes, {left} left in the frame")]
    TruncatedTlv {
        tlv: &'static str,
        offset: usize,
        len: usize,
        left: usize,
    },
    #[error("{tlv} tlv at byte {offset}: {detail}")]
    BadTlv {
        tlv: &'static str,
        offset: usize,
        detail: String,
    },
    #[error("duplicate {tlv} tlv at byte {offset}")]
    Duplicate { tlv: &'static str, offset: usize },
    #[error("no {tlv} tlv")]
    MissingTlv { tlv: &'static str },
}

/// Parses one Ethernet frame (destination, source, optional VLAN tags, ethertype 0x88cc,
/// LLDPDU) into the neighbour it describes.
///
/// Text that is not UTF-8: chassis and port ids (identifiers, compared not read) are
/// rendered as colon-separated hex so they stay unique; the system name is decoded
/// lossily. Trailing NULs, which some switches send, are dropped.
pub fn parse_frame(frame: &[u8]) -> Result<LldpNeighbor, LldpError> {
    if frame.len() > FRAME_BYTES_MAX {
        return Err(LldpError::TooLarge { len: frame.len() });
    }
    let short = || LldpError::ShortHeader { len: frame.len() };
    let mut offset = 12;
    let mut ethertype = read_u16(frame, offset).ok_or_else(short)?;
    let mut tags = 0;
    while ETHERTYPES_VLAN_TAG.contains(&ethertype) && tags < VLAN_TAGS_MAX {
        tags += 1;
        offset += 4;
        ethertype = read_u16(frame, offset).ok_or_else(short)?;
    }
    if ethertype != ETHERTYPE_LLDP {
        return Err(LldpError::NotLldp { ethertype });
    }
    parse_lldpdu(frame, offset + 2)
}

/// Parses the TLVs of an LLDPDU starting at `start` in `frame` (offsets in errors are
/// frame offsets). Stops at the End TLV or the end of the frame.
fn parse_lldpdu(frame: &[u8], start: usize) -> Result<LldpNeighbor, LldpError> {
    let mut chassis_id = None;
    let mut port_id = None;
    let mut system_name = None;
    let mut vlan = None;
    let mut offset = start;
    // Each TLV takes at least its 2-byte header, so this loop ends within frame.len()/2 turns.
    while offset < frame.len() {
        let header = read_u16(frame, offset).ok_or(LldpError::TruncatedHeader { offset })?;
        let kind = (header >> 9) as u8;
        let len = usize::from(header & 0x01ff);
        let value_start = offset + 2;
        let left = frame.len() - value_start;
        let tlv = tlv_name(kind);
        if len > left {
            return Err(LldpError::TruncatedTlv {
                tlv,
                offset,
                len,
                left,
            });
        }
        let value = &frame[value_start..value_start + len];
        let bad = |detail: String| LldpError::BadTlv {
            tlv,
            offset,
            detail,
        };
        match kind {
            TLV_END => {
                if len != 0 {
                    return Err(bad(format!("length {len}, expected 0")));
                }
                break;
            }
            TLV_CHASSIS_ID => {
                if chassis_id.is_some() {
                    return Err(LldpError::Duplicate { tlv, offset });
                }
                chassis_id = Some(chassis_id_text(value).map_err(bad)?);
            }
            TLV_PORT_ID => {
                if port_id.is_some() {
                    return Err(LldpError::Duplicate { tlv, offset });
                }
                port_id = Some(port_id_text(value).map_err(bad)?);
            }
            TLV_SYSTEM_NAME => {
                let name = String::from_utf8_lossy(trim_nul(value)).into_owned();
                system_name = (!name.is_empty()).then_some(name);
            }
            TLV_ORGANISATIONAL => {
                if len < 4 {
                    return Err(bad(format!("length {len}, expected at least 4")));
                }
                if value[..3] == OUI_IEEE_8021 && value[3] == 1 {
                    let pvid = read_u16(value, 4)
                        .ok_or_else(|| bad(format!("port vlan id of length {len}, expected 6")))?;
                    // 0: the port does not know or does not say.
                    vlan = (pvid != 0).then_some(pvid);
                }
            }
            _ => {}
        }
        offset = value_start + len;
    }
    Ok(LldpNeighbor {
        chassis_id: chassis_id.ok_or(LldpError::MissingTlv { tlv: "chassis id" })?,
        port_id: port_id.ok_or(LldpError::MissingTlv { tlv: "port id" })?,
        vlan,
        system_name,
    })
}

fn tlv_name(kind: u8) -> &'static str {
    match kind {
        TLV_END => "end",
        TLV_CHASSIS_ID => "chassis id",
        TLV_PORT_ID => "port id",
        3 => "ttl",
        4 => "port description",
        TLV_SYSTEM_NAME => "system name",
        6 => "system description",
        7 => "system capabilities",
        8 => "management address",
        TLV_ORGANISATIONAL => "organisationally specific",
        _ => "unknown",
    }
}

/// Chassis id subtypes: 4 MAC address, 5 network address, others (7 locally assigned,
/// interface names, …) as text.
fn chassis_id_text(value: &[u8]) -> Result<String, String> {
    let (subtype, id) = split_subtype(value)?;
    match subtype {
        4 => mac_text(id),
        5 => network_address_text(id),
        _ => Ok(id_text(id)),
    }
}

/// Port id subtypes: 3 MAC address, 4 network address, others (5 interface name,
/// 7 locally assigned, …) as text.
fn port_id_text(value: &[u8]) -> Result<String, String> {
    let (subtype, id) = split_subtype(value)?;
    match subtype {
        3 => mac_text(id),
        4 => network_address_text(id),
        _ => Ok(id_text(id)),
    }
}

fn split_subtype(value: &[u8]) -> Result<(u8, &[u8]), String> {
    match value {
        [] => Err("empty, expected a subtype and an id".into()),
        [subtype] => Err(format!("subtype {subtype} with an empty id")),
        [subtype, id @ ..] => Ok((*subtype, id)),
    }
}

fn mac_text(id: &[u8]) -> Result<String, String> {
    if id.len() != 6 {
        return Err(format!("mac address of {} bytes, expected 6", id.len()));
    }
    Ok(hex_text(id))
}

/// An IANA address family number and an address: IPv4 (1) and IPv6 (2) as addresses,
/// others as hex.
fn network_address_text(id: &[u8]) -> Result<String, String> {
    let (family, address) = id
        .split_first()
        .ok_or("network address without an address family")?;
    match (family, address.len()) {
        (1, 4) => Ok(Ipv4Addr::new(address[0], address[1], address[2], address[3]).to_string()),
        (2, 16) => {
            let mut octets = [0; 16];
            octets.copy_from_slice(address);
            Ok(Ipv6Addr::from(octets).to_string())
        }
        (1 | 2, len) => Err(format!("address family {family} with a {len}-byte address")),
        _ if address.is_empty() => Err(format!("address family {family} with no address")),
        _ => Ok(hex_text(address)),
    }
}

/// An identifier: its text when UTF-8, else its bytes in hex.
fn id_text(id: &[u8]) -> String {
    let id = trim_nul(id);
    match std::str::from_utf8(id) {
        Ok(text) => text.to_string(),
        Err(_) => hex_text(id),
    }
}

fn hex_text(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn trim_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|byte| *byte != 0)
        .map_or(0, |last| last + 1);
    &bytes[..end]
}

fn read_u16(bytes: &[u8], offset: usize) -> Option<u16> {
    let pair = bytes.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_be_bytes([pair[0], pair[1]]))
}

/// What listening on one NIC gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Heard(LldpNeighbor),
    /// Nothing usable within the wait; `refused` is why the last frame heard (if any) did
    /// not parse.
    Silent {
        wait: Duration,
        refused: Option<String>,
    },
    Failed(String),
}

/// One NIC's outcome, with the console line that reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicLldp {
    pub nic: String,
    pub outcome: Outcome,
}

impl NicLldp {
    pub fn neighbor(&self) -> Option<&LldpNeighbor> {
        match &self.outcome {
            Outcome::Heard(neighbor) => Some(neighbor),
            _ => None,
        }
    }

    /// `lldp: eth0: chassis …, port …, vlan …`, or why there is no neighbour.
    pub fn console_line(&self) -> String {
        let nic = &self.nic;
        match &self.outcome {
            Outcome::Heard(neighbor) => {
                let vlan = neighbor
                    .vlan
                    .map_or_else(|| "none".to_string(), |vlan| vlan.to_string());
                let name = neighbor
                    .system_name
                    .as_deref()
                    .map_or_else(String::new, |name| format!(" ({name})"));
                format!(
                    "lldp: {nic}: chassis {}, port {}, vlan {vlan}{name}",
                    neighbor.chassis_id, neighbor.port_id
                )
            }
            Outcome::Silent { wait, refused } => {
                let mut line = format!("lldp: no LLDP frame on {nic} within {}", seconds(*wait));
                if let Some(refused) = refused {
                    line.push_str(&format!(" (a frame was heard but refused: {refused})"));
                }
                line
            }
            Outcome::Failed(error) => {
                format!("lldp: {error}; registering {nic} without its neighbour")
            }
        }
    }
}

fn seconds(wait: Duration) -> String {
    if wait.subsec_millis() == 0 {
        format!("{} s", wait.as_secs())
    } else {
        format!("{:.1} s", wait.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(outcome: Outcome) -> String {
        NicLldp {
            nic: "eth0".into(),
            outcome,
        }
        .console_line()
    }

    #[test]
    fn console_lines_say_what_was_heard() {
        assert_eq!(
            line(Outcome::Heard(LldpNeighbor {
                chassis_id: "2c:6b:f5:9a:3b:c0".into(),
                port_id: "517".into(),
                vlan: Some(100),
                system_name: Some("tor-a12".into()),
            })),
            "lldp: eth0: chassis 2c:6b:f5:9a:3b:c0, port 517, vlan 100 (tor-a12)"
        );
        assert_eq!(
            line(Outcome::Heard(LldpNeighbor {
                chassis_id: "c".into(),
                port_id: "p".into(),
                vlan: None,
                system_name: None,
            })),
            "lldp: eth0: chassis c, port p, vlan none"
        );
        assert_eq!(
            line(Outcome::Silent {
                wait: Duration::from_secs(31),
                refused: None
            }),
            "lldp: no LLDP frame on eth0 within 31 s"
        );
        assert_eq!(
            line(Outcome::Silent {
                wait: Duration::from_millis(1500),
                refused: Some("no port id tlv".into())
            }),
            "lldp: no LLDP frame on eth0 within 1.5 s (a frame was heard but refused: no port id tlv)"
        );
        assert_eq!(
            line(Outcome::Failed("no such interface eth0".into())),
            "lldp: no such interface eth0; registering eth0 without its neighbour"
        );
    }
}
