//! Pure BMC decisions for stage 1: which `ipmitool lan set` commands give the BMC the LAN
//! settings Bearman allocated, what `ipmitool lan print` says about the BMC, and its
//! firmware revision from `ipmitool mc info`.
//!
//! Architecture invariant: no I/O. The planner turns [`BmcSettings`] into argument vectors
//! (without the `ipmitool` program name); running them is `stage1::bmc`'s job. Every
//! address is validated here, so a bad answer from the daemon never reaches the BMC.

use std::net::Ipv4Addr;

use bearman_proto::{BmcFacts, BmcSettings};

/// Device nodes of the in-band IPMI driver (`ipmi_devintf`), relative to the root: the
/// usual name, and the two older devfs/udev layouts ipmitool also opens.
pub const BMC_DEVICES: [&str; 3] = ["dev/ipmi0", "dev/ipmi/0", "dev/ipmidev/0"];

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BmcPlanError {
    #[error("bmc address {0:?} is not an IPv4 address (ipmitool lan set takes IPv4 only)")]
    Address(String),
    #[error("bmc prefix length {0} is outside 1..=32")]
    PrefixLen(u8),
    #[error("bmc gateway {0:?} is not an IPv4 address")]
    Gateway(String),
    #[error("bmc gateway {gateway} is outside {address}/{prefix_len}")]
    GatewayOutside {
        gateway: Ipv4Addr,
        address: Ipv4Addr,
        prefix_len: u8,
    },
    #[error("bmc vlan {0} is outside 1..=4094")]
    Vlan(u16),
}

/// The dotted netmask of a prefix length (24 → 255.255.255.0); `None` above 32.
pub fn netmask(prefix_len: u8) -> Option<Ipv4Addr> {
    match prefix_len {
        0 => Some(Ipv4Addr::UNSPECIFIED),
        1..=32 => Some(Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix_len)))),
        _ => None,
    }
}

/// The `ipmitool` argument vectors that set the BMC's LAN `channel` to `settings`, in the
/// order they must run: static source, address, netmask, gateway (only when there is one),
/// then the VLAN last (`off` when none), because tagging changes how the BMC is reached.
pub fn plan_lan(settings: &BmcSettings, channel: u8) -> Result<Vec<Vec<String>>, BmcPlanError> {
    let address: Ipv4Addr = settings
        .address
        .parse()
        .map_err(|_| BmcPlanError::Address(settings.address.clone()))?;
    if !(1..=32).contains(&settings.prefix_len) {
        return Err(BmcPlanError::PrefixLen(settings.prefix_len));
    }
    let mask = netmask(settings.prefix_len).ok_or(BmcPlanError::PrefixLen(settings.prefix_len))?;
    let gateway = match &settings.gateway {
        None => None,
        Some(text) => {
            let gateway: Ipv4Addr = text
                .parse()
                .map_err(|_| BmcPlanError::Gateway(text.clone()))?;
            let mask_bits = u32::from(mask);
            if u32::from(gateway) & mask_bits != u32::from(address) & mask_bits {
                return Err(BmcPlanError::GatewayOutside {
                    gateway,
                    address,
                    prefix_len: settings.prefix_len,
                });
            }
            Some(gateway)
        }
    };
    if let Some(vlan) = settings.vlan {
        if !(1..=4094).contains(&vlan) {
            return Err(BmcPlanError::Vlan(vlan));
        }
    }
    let channel = channel.to_string();
    let lan_set = |rest: &[&str]| -> Vec<String> {
        ["lan", "set", channel.as_str()]
            .iter()
            .chain(rest)
            .map(|word| word.to_string())
            .collect()
    };
    let mut commands = vec![
        lan_set(&["ipsrc", "static"]),
        lan_set(&["ipaddr", &address.to_string()]),
        lan_set(&["netmask", &mask.to_string()]),
    ];
    if let Some(gateway) = gateway {
        commands.push(lan_set(&["defgw", "ipaddr", &gateway.to_string()]));
    }
    match settings.vlan {
        Some(vlan) => commands.push(lan_set(&["vlan", "id", &vlan.to_string()])),
        None => commands.push(lan_set(&["vlan", "id", "off"])),
    }
    Ok(commands)
}

/// What ipmitool prints on every run when `/usr/share/misc/enterprise-numbers.txt` is
/// absent. The stage-1 image leaves that 4.7 MB vendor registry out (`lan print`/`lan set`
/// name no vendors), so the line is noise, and quoted first it would read as the cause of
/// whatever failed.
const IANA_REGISTRY_MISSING: &str = "IANA PEN registry open failed";

/// ipmitool's stderr as one console line: its lines joined with "; ", without the
/// missing-registry notice, at most `chars_max` characters.
pub fn ipmitool_error_line(stderr: &str, chars_max: usize) -> String {
    stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with(IANA_REGISTRY_MISSING))
        .collect::<Vec<_>>()
        .join("; ")
        .chars()
        .take(chars_max)
        .collect()
}

/// The `ipmitool lan print <channel>` arguments.
pub fn lan_print_args(channel: u8) -> Vec<String> {
    vec!["lan".into(), "print".into(), channel.to_string()]
}

/// The BMC's MAC and current address from `ipmitool lan print` output; `None` without a
/// well-formed `MAC Address` line (the daemon identifies the BMC by it). An address of
/// 0.0.0.0 (unconfigured) is no address.
pub fn parse_lan_print(text: &str) -> Option<BmcFacts> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_string())
        })
    };
    let mac = field("MAC Address")?.to_ascii_lowercase();
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed = octets.len() == 6
        && octets
            .iter()
            .all(|octet| octet.len() == 2 && octet.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return None;
    }
    let address = field("IP Address")
        .and_then(|text| text.parse::<Ipv4Addr>().ok())
        .filter(|address| !address.is_unspecified())
        .map(|address| address.to_string());
    Some(BmcFacts { mac, address })
}

/// The `ipmitool mc info` arguments.
pub fn mc_info_args() -> Vec<String> {
    vec!["mc".into(), "info".into()]
}

/// Longest firmware revision taken from `mc info`; BMCs print a few characters.
const FIRMWARE_REVISION_CHARS_MAX: usize = 64;

/// The BMC's firmware revision from `ipmitool mc info` output (`Firmware Revision :
/// 1.23`), as ipmitool prints it; `None` without the line or with an empty or overlong
/// value.
pub fn parse_mc_info(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key.trim() != "Firmware Revision" {
            return None;
        }
        let value = value.trim();
        (!value.is_empty()
            && value.chars().count() <= FIRMWARE_REVISION_CHARS_MAX
            && !value.chars().any(char::is_control))
        .then(|| value.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(
        address: &str,
        prefix_len: u8,
        gateway: Option<&str>,
        vlan: Option<u16>,
    ) -> BmcSettings {
        BmcSettings {
            address: address.into(),
            prefix_len,
            gateway: gateway.map(Into::into),
            vlan,
        }
    }

    fn check(settings: &BmcSettings, channel: u8, expect: Result<&[&str], &str>) {
        let got = plan_lan(settings, channel)
            .map(|commands| {
                commands
                    .iter()
                    .map(|args| args.join(" "))
                    .collect::<Vec<_>>()
            })
            .map_err(|error| error.to_string());
        let expect = expect
            .map(|lines| {
                lines
                    .iter()
                    .map(|line| line.to_string())
                    .collect::<Vec<_>>()
            })
            .map_err(str::to_string);
        assert_eq!(got, expect, "{settings:?}");
    }

    #[test]
    fn prefix_lengths_become_netmasks() {
        let masks: Vec<String> = [0, 1, 8, 20, 24, 30, 31, 32]
            .iter()
            .map(|len| netmask(*len).unwrap().to_string())
            .collect();
        assert_eq!(
            masks,
            [
                "0.0.0.0",
                "128.0.0.0",
                "255.0.0.0",
                "255.255.240.0",
                "255.255.255.0",
                "255.255.255.252",
                "255.255.255.254",
                "255.255.255.255"
            ]
        );
        assert_eq!(netmask(33), None);
    }

    #[test]
    fn full_settings_set_gateway_and_vlan_last() {
        check(
            &settings("10.2.0.17", 24, Some("10.2.0.1"), Some(300)),
            1,
            Ok(&[
                "lan set 1 ipsrc static",
                "lan set 1 ipaddr 10.2.0.17",
                "lan set 1 netmask 255.255.255.0",
                "lan set 1 defgw ipaddr 10.2.0.1",
                "lan set 1 vlan id 300",
            ]),
        );
    }

    #[test]
    fn no_gateway_and_no_vlan_turn_tagging_off() {
        check(
            &settings("172.16.4.9", 20, None, None),
            8,
            Ok(&[
                "lan set 8 ipsrc static",
                "lan set 8 ipaddr 172.16.4.9",
                "lan set 8 netmask 255.255.240.0",
                "lan set 8 vlan id off",
            ]),
        );
    }

    #[test]
    fn bad_settings_are_refused_before_touching_the_bmc() {
        check(
            &settings("10.2.0.300", 24, None, None),
            1,
            Err("bmc address \"10.2.0.300\" is not an IPv4 address (ipmitool lan set takes IPv4 only)"),
        );
        check(
            &settings("fd00::5", 64, None, None),
            1,
            Err(
                "bmc address \"fd00::5\" is not an IPv4 address (ipmitool lan set takes IPv4 only)",
            ),
        );
        check(
            &settings("10.2.0.17", 0, None, None),
            1,
            Err("bmc prefix length 0 is outside 1..=32"),
        );
        check(
            &settings("10.2.0.17", 33, None, None),
            1,
            Err("bmc prefix length 33 is outside 1..=32"),
        );
        check(
            &settings("10.2.0.17", 24, Some("gw"), None),
            1,
            Err("bmc gateway \"gw\" is not an IPv4 address"),
        );
        check(
            &settings("10.2.0.17", 24, Some("10.3.0.1"), None),
            1,
            Err("bmc gateway 10.3.0.1 is outside 10.2.0.17/24"),
        );
        check(
            &settings("10.2.0.17", 24, None, Some(4095)),
            1,
            Err("bmc vlan 4095 is outside 1..=4094"),
        );
        check(
            &settings("10.2.0.17", 24, None, Some(0)),
            1,
            Err("bmc vlan 0 is outside 1..=4094"),
        );
    }

    #[test]
    fn ipmitool_errors_become_one_line_without_the_registry_notice() {
        // What QEMU 7.2's ipmi-bmc-sim makes `ipmitool lan print 1` print.
        let stderr = "IANA PEN registry open failed: No such file or directory\n\
                      Get Channel Info command failed: Invalid command\n\
                      Invalid channel: 1\n";
        assert_eq!(
            ipmitool_error_line(stderr, 400),
            "Get Channel Info command failed: Invalid command; Invalid channel: 1"
        );
        assert_eq!(ipmitool_error_line("a\n\n  b  \n", 3), "a; ");
        assert_eq!(ipmitool_error_line("", 400), "");
    }

    #[test]
    fn lan_print_gives_mac_and_address() {
        let text = "Set in Progress         : Set Complete\n\
                    IP Address Source       : DHCP Address\n\
                    IP Address              : 10.2.0.40\n\
                    Subnet Mask             : 255.255.255.0\n\
                    MAC Address             : 0C:C4:7A:12:34:56\n\
                    Default Gateway IP      : 10.2.0.1\n";
        assert_eq!(
            parse_lan_print(text),
            Some(BmcFacts {
                mac: "0c:c4:7a:12:34:56".into(),
                address: Some("10.2.0.40".into()),
            })
        );
        let unconfigured =
            "IP Address              : 0.0.0.0\nMAC Address             : 0c:c4:7a:12:34:56\n";
        assert_eq!(parse_lan_print(unconfigured).unwrap().address, None);
        assert_eq!(parse_lan_print("IP Address : 10.0.0.1\n"), None);
        assert_eq!(parse_lan_print("MAC Address : 0c:c4:7a:12:34\n"), None);
        assert_eq!(parse_lan_print(""), None);
    }

    #[test]
    fn mc_info_gives_the_firmware_revision() {
        // What ipmitool prints for a Supermicro X11 and for QEMU's ipmi-bmc-sim.
        let supermicro = "Device ID                 : 32\n\
                          Device Revision           : 1\n\
                          Firmware Revision         : 1.73\n\
                          IPMI Version              : 2.0\n\
                          Manufacturer ID           : 10876\n\
                          Aux Firmware Rev Info     : \n\
                          \x20   0x00\n";
        let qemu = "Device ID                 : 32\nFirmware Revision         : 0.00\n";
        for (text, expect) in [
            (supermicro, Some("1.73")),
            (qemu, Some("0.00")),
            ("Firmware Revision :   \n", None),
            ("Device ID : 32\n", None),
            ("", None),
            ("Firmware Revision : 1.23:45\n", Some("1.23:45")),
        ] {
            assert_eq!(parse_mc_info(text).as_deref(), expect, "{text:?}");
        }
        let overlong = format!("Firmware Revision : {}\n", "9".repeat(65));
        assert_eq!(parse_mc_info(&overlong), None);
        assert_eq!(mc_info_args(), ["mc", "info"]);
    }
}
