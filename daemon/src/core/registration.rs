//! Registration planning: what a node record becomes when stage 1 posts its inventory,
//! and when a registration must be refused as a likely spoof.

use bearman_proto::uuid::NodeUuid;
use bearman_proto::RegisterRequest;

use super::lifecycle::{transition, IllegalTransition, LifecycleEvent, LifecycleState};
use super::model::{mac_set, BootPhase, Hardware, Node, NodeRole, TimestampMs};

/// Defaults applied to nodes that register for the first time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationDefaults {
    pub role: NodeRole,
    pub flavor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationRefused {
    /// The uuid is known but the hardware answering to it is not the hardware on record:
    /// a cloned uuid, a swapped board, or someone impersonating a node. An operator must
    /// accept the new identity explicitly.
    #[error("identity mismatch for {uuid}: {detail}")]
    IdentityMismatch { uuid: NodeUuid, detail: String },
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
}

/// The hostname given to a node that registers without one on record: stable, derived
/// from the uuid's most distinctive part (DMI uuids often share a vendor prefix).
pub fn default_hostname(uuid: &NodeUuid) -> String {
    let text = uuid.as_str();
    format!("node-{}", &text[text.len() - 12..])
}

/// The rack (failure domain) implied by LLDP: the switch heard on the first NIC that
/// heard one, by system name when it has one.
pub fn rack_from_lldp(request: &RegisterRequest) -> Option<String> {
    request.nics.iter().find_map(|nic| {
        nic.lldp.as_ref().map(|lldp| {
            lldp.system_name
                .clone()
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| lldp.chassis_id.clone())
        })
    })
}

/// VLAN implied by LLDP, used to pick the address pool.
pub fn vlan_from_lldp(request: &RegisterRequest) -> Option<u16> {
    request
        .nics
        .iter()
        .find_map(|nic| nic.lldp.as_ref().and_then(|lldp| lldp.vlan))
}

/// Computes the node record after a registration. `existing` is the record on file, if any.
/// Addresses are not assigned here: the caller allocates them from the store and writes
/// them into `network` before persisting.
pub fn plan_registration(
    existing: Option<&Node>,
    uuid: &NodeUuid,
    request: &RegisterRequest,
    defaults: &RegistrationDefaults,
    now_ms: TimestampMs,
) -> Result<Node, RegistrationRefused> {
    let mut node = match existing {
        Some(node) => {
            check_identity(node, request)?;
            node.clone()
        }
        None => {
            let mut node = Node::new(uuid.clone(), default_hostname(uuid), defaults.role, now_ms);
            node.flavor = defaults.flavor.clone();
            node
        }
    };
    node.state = transition(node.state, LifecycleEvent::Register)?;
    node.serial = request.serial.trim().to_string();
    node.vendor = request.vendor.clone();
    node.model = request.model.clone();
    node.hardware = Hardware {
        cpu: request.cpu.clone(),
        memory_bytes: request.memory_bytes,
        disks: request.disks.clone(),
        nics: request
            .nics
            .iter()
            .map(|nic| {
                let mut nic = nic.clone();
                nic.mac = nic.mac.to_ascii_lowercase();
                nic
            })
            .collect(),
    };
    node.firmware = request.firmware.clone();
    if node.rack.is_none() {
        node.rack = rack_from_lldp(request);
    }
    if let Some(vlan) = vlan_from_lldp(request) {
        node.network.vlan = Some(vlan);
    }
    if let Some(bmc) = &request.bmc {
        node.bmc.mac = Some(bmc.mac.to_ascii_lowercase());
    }
    if node.flavor.is_none() {
        node.flavor = defaults.flavor.clone();
    }
    node.registered_at_ms = Some(now_ms);
    node.reach_boot_phase(BootPhase::Registered, now_ms);
    node.updated_at_ms = now_ms;
    Ok(node)
}

/// Refuses a registration whose serial or MAC set differs from the record. A record with
/// no hardware yet (operator-enrolled, never registered) binds to whoever registers first.
fn check_identity(node: &Node, request: &RegisterRequest) -> Result<(), RegistrationRefused> {
    let mismatch = |detail: String| RegistrationRefused::IdentityMismatch {
        uuid: node.uuid.clone(),
        detail,
    };
    if !node.serial.is_empty() && node.serial != request.serial.trim() {
        return Err(mismatch(format!(
            "serial {:?} differs from the recorded {:?}",
            request.serial, node.serial
        )));
    }
    let recorded = node.mac_set();
    if !recorded.is_empty() {
        let offered = mac_set(&request.nics);
        if offered != recorded {
            return Err(mismatch(format!(
                "NIC MACs [{}] differ from the recorded [{}]",
                offered.join(", "),
                recorded.join(", ")
            )));
        }
    }
    Ok(())
}

/// Whether a node in this state may be asked for its boot script, profile or detail.
pub fn serves_boot(state: LifecycleState) -> bool {
    !matches!(state, LifecycleState::Retired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bearman_proto::{LldpNeighbor, NicFacts};

    fn request(serial: &str, macs: &[&str]) -> RegisterRequest {
        RegisterRequest {
            serial: serial.into(),
            nics: macs
                .iter()
                .enumerate()
                .map(|(i, mac)| NicFacts {
                    name: format!("eth{i}"),
                    mac: mac.to_string(),
                    speed_mbps: Some(25000),
                    lldp: Some(LldpNeighbor {
                        chassis_id: "00:11:22:33:44:55".into(),
                        port_id: format!("Ethernet{i}"),
                        vlan: Some(100),
                        system_name: Some("tor-a01".into()),
                    }),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn defaults() -> RegistrationDefaults {
        RegistrationDefaults {
            role: NodeRole::Compute,
            flavor: Some("hv".into()),
        }
    }

    #[test]
    fn first_registration_creates_registered_node_with_rack_and_vlan() {
        let uuid = NodeUuid::from_index(1, 42);
        let node = plan_registration(
            None,
            &uuid,
            &request("S1", &["AA:00:00:00:00:01"]),
            &defaults(),
            5,
        )
        .unwrap();
        assert_eq!(node.state, LifecycleState::Registered);
        assert_eq!(node.rack.as_deref(), Some("tor-a01"));
        assert_eq!(node.network.vlan, Some(100));
        assert_eq!(node.flavor.as_deref(), Some("hv"));
        assert_eq!(node.hardware.nics[0].mac, "aa:00:00:00:00:01");
        assert_eq!(node.hostname, "node-00000000002a");
    }

    #[test]
    fn changed_serial_or_macs_are_refused() {
        let uuid = NodeUuid::from_index(1, 1);
        let node = plan_registration(
            None,
            &uuid,
            &request("S1", &["aa:00:00:00:00:01"]),
            &defaults(),
            5,
        )
        .unwrap();
        let same = plan_registration(
            Some(&node),
            &uuid,
            &request("S1", &["AA:00:00:00:00:01"]),
            &defaults(),
            6,
        );
        assert!(same.is_ok());
        let serial = plan_registration(
            Some(&node),
            &uuid,
            &request("S2", &["aa:00:00:00:00:01"]),
            &defaults(),
            6,
        );
        assert!(matches!(
            serial,
            Err(RegistrationRefused::IdentityMismatch { .. })
        ));
        let macs = plan_registration(
            Some(&node),
            &uuid,
            &request("S1", &["aa:00:00:00:00:01", "aa:00:00:00:00:02"]),
            &defaults(),
            6,
        );
        assert!(matches!(
            macs,
            Err(RegistrationRefused::IdentityMismatch { .. })
        ));
    }

    #[test]
    fn retired_and_fenced_nodes_cannot_register() {
        let uuid = NodeUuid::from_index(1, 1);
        let mut node = plan_registration(
            None,
            &uuid,
            &request("S1", &["aa:00:00:00:00:01"]),
            &defaults(),
            5,
        )
        .unwrap();
        for state in [
            LifecycleState::Retired,
            LifecycleState::Fenced,
            LifecycleState::Fencing,
        ] {
            node.state = state;
            let result = plan_registration(
                Some(&node),
                &uuid,
                &request("S1", &["aa:00:00:00:00:01"]),
                &defaults(),
                6,
            );
            assert!(
                matches!(result, Err(RegistrationRefused::Illegal(_))),
                "{state}"
            );
        }
    }
}
