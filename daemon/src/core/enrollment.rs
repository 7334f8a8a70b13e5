//! Enrollment policy: which machines that register by themselves are accepted into the
//! fleet (and so get addresses, BMC settings and boot files) and which wait, Discovered
//! with their hardware recorded, until an operator accepts them.
//!
//! Why: the provisioning network is unauthenticated. Without a policy anyone on it can
//! drain the address pools by registering made-up uuids, or take the identity of a real
//! machine that has not booted yet. With it, a made-up uuid costs one pending record
//! (bounded by `pending_max`) and nothing else.

use std::collections::BTreeSet;

use bearman_proto::RegisterRequest;

use super::validate::{is_mac, InvalidSetting};

/// Pending machines kept at most, by default: beyond it new unknown uuids are refused
/// until an operator accepts or retires some.
pub const PENDING_MAX_DEFAULT: usize = 1000;
/// Entries an allow-list may hold.
pub const ALLOW_LIST_MAX: usize = 100_000;

/// The `[enrollment]` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollmentPolicy {
    /// Accept every machine that registers (labs, the simulator's fleets). Off by
    /// default: a production fleet names its machines or accepts them by hand.
    pub auto_accept: bool,
    /// Serial numbers (as DMI reports them, trimmed) accepted on sight.
    pub allow_serials: BTreeSet<String>,
    /// NIC MACs (lowercase) accepted on sight: any NIC of the machine may match.
    pub allow_macs: BTreeSet<String>,
    /// Switch ports accepted on sight: a machine whose NIC heard LLDP from `switch`
    /// (its chassis id or system name) on `port` is cabled where the operator said.
    pub allow_switch_ports: BTreeSet<SwitchPort>,
    /// Machines waiting for acceptance at most; new unknown uuids beyond it are refused.
    pub pending_max: usize,
}

impl Default for EnrollmentPolicy {
    fn default() -> Self {
        EnrollmentPolicy {
            auto_accept: false,
            allow_serials: BTreeSet::new(),
            allow_macs: BTreeSet::new(),
            allow_switch_ports: BTreeSet::new(),
            pending_max: PENDING_MAX_DEFAULT,
        }
    }
}

/// A switch and one of its ports, as LLDP names them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SwitchPort {
    pub switch: String,
    pub port: String,
}

impl SwitchPort {
    /// `switch/port`, split at the first `/`: port ids such as `Ethernet1/1` contain
    /// slashes, switch names (chassis MACs, host names) do not.
    pub fn parse(text: &str) -> Option<SwitchPort> {
        let (switch, port) = text.split_once('/')?;
        (!switch.trim().is_empty() && !port.trim().is_empty()).then(|| SwitchPort {
            switch: switch.trim().to_string(),
            port: port.trim().to_string(),
        })
    }
}

/// Why a machine was let in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcceptedBy {
    /// It was known before it registered: enrolled or accepted by an operator, or
    /// registered before enrollment policies existed.
    Known,
    AutoAccept,
    Serial(String),
    Mac(String),
    SwitchPort(SwitchPort),
}

impl std::fmt::Display for AcceptedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AcceptedBy::Known => write!(f, "already accepted"),
            AcceptedBy::AutoAccept => write!(f, "enrollment.auto_accept"),
            AcceptedBy::Serial(serial) => write!(f, "allow-listed serial {serial}"),
            AcceptedBy::Mac(mac) => write!(f, "allow-listed MAC {mac}"),
            AcceptedBy::SwitchPort(at) => {
                write!(f, "allow-listed switch port {}/{}", at.switch, at.port)
            }
        }
    }
}

impl EnrollmentPolicy {
    /// The policy for a lab or a simulated fleet: everyone is accepted.
    pub fn accept_all() -> Self {
        EnrollmentPolicy {
            auto_accept: true,
            ..EnrollmentPolicy::default()
        }
    }

    /// Whether a machine that is not accepted yet may be, by this policy alone.
    pub fn admits(&self, request: &RegisterRequest) -> Option<AcceptedBy> {
        if self.auto_accept {
            return Some(AcceptedBy::AutoAccept);
        }
        let serial = request.serial.trim();
        if self.allow_serials.contains(serial) {
            return Some(AcceptedBy::Serial(serial.to_string()));
        }
        for nic in &request.nics {
            let mac = nic.mac.to_ascii_lowercase();
            if self.allow_macs.contains(&mac) {
                return Some(AcceptedBy::Mac(mac));
            }
        }
        for lldp in request.nics.iter().filter_map(|nic| nic.lldp.as_ref()) {
            let switches = std::iter::once(&lldp.chassis_id).chain(lldp.system_name.as_ref());
            for switch in switches {
                let at = SwitchPort {
                    switch: switch.clone(),
                    port: lldp.port_id.clone(),
                };
                if self.allow_switch_ports.contains(&at) {
                    return Some(AcceptedBy::SwitchPort(at));
                }
            }
        }
        None
    }

    /// Builds a policy from its settings as written, refusing (with the key) what
    /// cannot be right: a MAC that is not one, a switch port without its `/`.
    pub fn from_settings(
        auto_accept: bool,
        serials: &[String],
        macs: &[String],
        switch_ports: &[String],
        pending_max: usize,
    ) -> Result<Self, InvalidSetting> {
        let total = serials.len() + macs.len() + switch_ports.len();
        if total > ALLOW_LIST_MAX {
            return Err(InvalidSetting::new(
                "enrollment",
                format!("allow-lists hold {total} entries, more than {ALLOW_LIST_MAX}"),
            ));
        }
        InvalidSetting::check_range("enrollment.pending_max", pending_max, 1..=1_000_000, "")?;
        let mut policy = EnrollmentPolicy {
            auto_accept,
            pending_max,
            ..EnrollmentPolicy::default()
        };
        for serial in serials {
            let serial = serial.trim();
            if serial.is_empty() || serial.len() > 256 || serial.chars().any(char::is_control) {
                return Err(InvalidSetting::new(
                    "enrollment.allow_serials",
                    format!("{serial:?} is not a serial number"),
                ));
            }
            policy.allow_serials.insert(serial.to_string());
        }
        for mac in macs {
            if !is_mac(mac) {
                return Err(InvalidSetting::new(
                    "enrollment.allow_macs",
                    format!("{mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"),
                ));
            }
            policy.allow_macs.insert(mac.to_ascii_lowercase());
        }
        for text in switch_ports {
            let at = SwitchPort::parse(text).ok_or_else(|| {
                InvalidSetting::new(
                    "enrollment.allow_switch_ports",
                    format!("{text:?} is not SWITCH/PORT (the switch's LLDP chassis id or system name, its port id)"),
                )
            })?;
            policy.allow_switch_ports.insert(at);
        }
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bearman_proto::{LldpNeighbor, NicFacts};

    fn request() -> RegisterRequest {
        RegisterRequest {
            serial: " SN-1 ".into(),
            nics: vec![NicFacts {
                name: "eth0".into(),
                mac: "AA:00:00:00:00:01".into(),
                lldp: Some(LldpNeighbor {
                    chassis_id: "00:11:22:33:44:55".into(),
                    port_id: "Ethernet1/7".into(),
                    vlan: None,
                    system_name: Some("tor-a01".into()),
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn policy(serials: &[&str], macs: &[&str], ports: &[&str]) -> EnrollmentPolicy {
        let owned = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        EnrollmentPolicy::from_settings(false, &owned(serials), &owned(macs), &owned(ports), 10)
            .unwrap()
    }

    #[test]
    fn closed_by_default_and_open_when_told() {
        assert_eq!(EnrollmentPolicy::default().admits(&request()), None);
        assert_eq!(
            EnrollmentPolicy::accept_all().admits(&request()),
            Some(AcceptedBy::AutoAccept)
        );
    }

    #[test]
    fn each_allow_list_admits_on_its_own() {
        assert_eq!(
            policy(&["SN-1"], &[], &[]).admits(&request()),
            Some(AcceptedBy::Serial("SN-1".into()))
        );
        assert_eq!(
            policy(&[], &["aa:00:00:00:00:01"], &[]).admits(&request()),
            Some(AcceptedBy::Mac("aa:00:00:00:00:01".into()))
        );
        let by_name = policy(&[], &[], &["tor-a01/Ethernet1/7"]).admits(&request());
        assert!(
            matches!(by_name, Some(AcceptedBy::SwitchPort(_))),
            "{by_name:?}"
        );
        let by_chassis = policy(&[], &[], &["00:11:22:33:44:55/Ethernet1/7"]).admits(&request());
        assert!(matches!(by_chassis, Some(AcceptedBy::SwitchPort(_))));
        // Another port of the same switch, another serial, another MAC: still waits.
        assert_eq!(
            policy(&["SN-2"], &["aa:00:00:00:00:02"], &["tor-a01/Ethernet1/8"]).admits(&request()),
            None
        );
    }

    #[test]
    fn bad_settings_name_their_key() {
        let bad_mac = EnrollmentPolicy::from_settings(false, &[], &["nope".into()], &[], 10);
        assert_eq!(bad_mac.unwrap_err().key, "enrollment.allow_macs");
        let bad_port = EnrollmentPolicy::from_settings(false, &[], &[], &["tor-a01".into()], 10);
        assert_eq!(bad_port.unwrap_err().key, "enrollment.allow_switch_ports");
        let bad_max = EnrollmentPolicy::from_settings(false, &[], &[], &[], 0);
        assert_eq!(bad_max.unwrap_err().key, "enrollment.pending_max");
    }
}
