//! Registration planning: what a node record becomes when stage 1 posts its inventory,
//! and when a registration must be refused as a likely spoof.

use bearman_proto::uuid::NodeUuid;
use bearman_proto::RegisterRequest;

use super::enrollment::{AcceptedBy, EnrollmentPolicy};
use super::lifecycle::{transition, IllegalTransition, LifecycleEvent, LifecycleState};
use super::model::{mac_set, BootPhase, Hardware, Node, NodeRole, PendingAcceptance, TimestampMs};

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

/// What every default hostname starts with.
const DEFAULT_HOSTNAME_PREFIX: &str = "node-";

/// The hostname given to a node that registers without one on record: `node-` and the
/// whole uuid (41 characters, one RFC 1123 label). The whole uuid, not a distinctive
/// part of it: a machine that may claim any uuid could otherwise take another machine's
/// hostname before it first boots. Unique because uuids are, and because
/// [`hostname_reserved_for_other`] keeps operators from renaming a node to another's.
pub fn default_hostname(uuid: &NodeUuid) -> String {
    format!("{DEFAULT_HOSTNAME_PREFIX}{}", uuid.as_str())
}

/// Whether `hostname` is the default hostname of some node other than `uuid`: an
/// operator may not give a node that name, so default hostnames never collide.
pub fn hostname_reserved_for_other(hostname: &str, uuid: &NodeUuid) -> bool {
    hostname
        .strip_prefix(DEFAULT_HOSTNAME_PREFIX)
        .and_then(|rest| NodeUuid::parse(rest).ok())
        .is_some_and(|owner| owner != *uuid)
}

/// The rack (failure domain) implied by LLDP: the switch heard on the first NIC that
/// heard one, by system name when it has one. A name that is not a valid rack name
/// (`validate::check_rack`: spaces, odd characters, too long) is not used as one — the
/// switch's chassis id is, if that is valid — so whatever a switch (or a machine
/// claiming to have heard one) says never becomes a rack an operator cannot name.
pub fn rack_from_lldp(request: &RegisterRequest) -> Option<String> {
    let valid = |name: &String| super::validate::check_rack(name).is_ok();
    request.nics.iter().find_map(|nic| {
        nic.lldp.as_ref().and_then(|lldp| {
            lldp.system_name
                .clone()
                .filter(valid)
                .or_else(|| Some(lldp.chassis_id.clone()).filter(valid))
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

/// What a registration makes of the node record.
#[derive(Clone, Debug, PartialEq)]
pub enum RegistrationPlan {
    /// The machine is accepted: it registers (its addresses follow). `newly_accepted`
    /// names the rule when this registration is what let it in.
    Register {
        node: Node,
        newly_accepted: Option<AcceptedBy>,
    },
    /// The machine waits for acceptance: its hardware is recorded, it stays Discovered
    /// and gets nothing. `changed` is false when the record already says all of it
    /// (a machine retrying while it waits): nothing to write.
    Wait {
        node: Node,
        first: bool,
        changed: bool,
    },
}

/// Computes the node record after a registration. `existing` is the record on file, if
/// any. A machine that is neither on record as accepted nor admitted by `policy` waits
/// (see [`RegistrationPlan::Wait`]). Addresses are not assigned here: the caller
/// allocates them from the store and writes them into `network` before persisting.
pub fn plan_registration(
    existing: Option<&Node>,
    uuid: &NodeUuid,
    request: &RegisterRequest,
    defaults: &RegistrationDefaults,
    policy: &EnrollmentPolicy,
    now_ms: TimestampMs,
) -> Result<RegistrationPlan, RegistrationRefused> {
    let waiting = existing.is_none_or(|node| node.pending_acceptance.is_some());
    let newly_accepted = if waiting {
        match policy.admits(request) {
            Some(by) => Some(by),
            None => return Ok(plan_wait(existing, uuid, request, defaults, now_ms)),
        }
    } else {
        None
    };
    let mut node = match existing {
        // A waiting record bound no identity: whoever is accepted now is who it is.
        Some(node) if waiting => node.clone(),
        Some(node) => {
            check_identity(node, request)?;
            node.clone()
        }
        None => new_record(uuid, defaults, now_ms),
    };
    node.state = transition(node.state, LifecycleEvent::Register)?;
    node.pending_acceptance = None;
    record_facts(&mut node, request, defaults);
    node.registered_at_ms = Some(now_ms);
    node.reach_boot_phase(BootPhase::Registered, now_ms);
    node.updated_at_ms = now_ms;
    Ok(RegistrationPlan::Register {
        node,
        newly_accepted,
    })
}

fn plan_wait(
    existing: Option<&Node>,
    uuid: &NodeUuid,
    request: &RegisterRequest,
    defaults: &RegistrationDefaults,
    now_ms: TimestampMs,
) -> RegistrationPlan {
    let mut node = existing
        .cloned()
        .unwrap_or_else(|| new_record(uuid, defaults, now_ms));
    node.pending_acceptance
        .get_or_insert(PendingAcceptance { since_ms: now_ms });
    record_facts(&mut node, request, defaults);
    let changed = existing != Some(&node);
    if changed {
        node.updated_at_ms = now_ms;
    }
    RegistrationPlan::Wait {
        node,
        first: existing.is_none(),
        changed,
    }
}

fn new_record(uuid: &NodeUuid, defaults: &RegistrationDefaults, now_ms: TimestampMs) -> Node {
    let mut node = Node::new(uuid.clone(), default_hostname(uuid), defaults.role, now_ms);
    node.flavor = defaults.flavor.clone();
    node
}

/// Writes what the machine reported about itself into its record.
fn record_facts(node: &mut Node, request: &RegisterRequest, defaults: &RegistrationDefaults) {
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

    /// A registration under a policy that accepts everyone: the node it makes.
    fn plan(
        existing: Option<&Node>,
        uuid: &NodeUuid,
        request: &RegisterRequest,
        now_ms: TimestampMs,
    ) -> Result<Node, RegistrationRefused> {
        let policy = EnrollmentPolicy::accept_all();
        match plan_registration(existing, uuid, request, &defaults(), &policy, now_ms)? {
            RegistrationPlan::Register { node, .. } => Ok(node),
            RegistrationPlan::Wait { .. } => panic!("accept_all made a machine wait"),
        }
    }

    #[test]
    fn unaccepted_machines_wait_with_their_hardware_and_no_identity_bound() {
        let uuid = NodeUuid::from_index(1, 7);
        let closed = EnrollmentPolicy::default();
        let first = request("S1", &["aa:00:00:00:00:01"]);
        let RegistrationPlan::Wait {
            node,
            first: true,
            changed: true,
        } = plan_registration(None, &uuid, &first, &defaults(), &closed, 5).unwrap()
        else {
            panic!("an unknown machine must wait");
        };
        assert_eq!(node.state, LifecycleState::Discovered);
        assert_eq!(
            node.pending_acceptance,
            Some(PendingAcceptance { since_ms: 5 })
        );
        assert_eq!(node.serial, "S1");
        assert_eq!(node.boot, None);
        // Retrying with the same hardware changes nothing.
        let again = plan_registration(Some(&node), &uuid, &first, &defaults(), &closed, 9).unwrap();
        assert!(matches!(
            again,
            RegistrationPlan::Wait {
                first: false,
                changed: false,
                ..
            }
        ));
        // Other hardware under the same uuid is recorded, not refused: nothing is bound yet.
        let other = request("S2", &["aa:00:00:00:00:02"]);
        let RegistrationPlan::Wait {
            node: changed,
            changed: true,
            ..
        } = plan_registration(Some(&node), &uuid, &other, &defaults(), &closed, 9).unwrap()
        else {
            panic!("still waiting");
        };
        assert_eq!(changed.serial, "S2");
        assert_eq!(
            changed.pending_acceptance,
            Some(PendingAcceptance { since_ms: 5 })
        );
        // Once an allow-list names it, the next registration lets it in.
        let open = EnrollmentPolicy::from_settings(false, &["S2".into()], &[], &[], 10).unwrap();
        let RegistrationPlan::Register {
            node: accepted,
            newly_accepted,
        } = plan_registration(Some(&changed), &uuid, &other, &defaults(), &open, 11).unwrap()
        else {
            panic!("allow-listed");
        };
        assert_eq!(newly_accepted, Some(AcceptedBy::Serial("S2".into())));
        assert_eq!(accepted.state, LifecycleState::Registered);
        assert_eq!(accepted.pending_acceptance, None);
        // An accepted node is never sent back to waiting by a stricter policy.
        let later = plan_registration(Some(&accepted), &uuid, &other, &defaults(), &closed, 12);
        assert!(matches!(
            later,
            Ok(RegistrationPlan::Register {
                newly_accepted: None,
                ..
            })
        ));
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
        let node = plan(None, &uuid, &request("S1", &["AA:00:00:00:00:01"]), 5).unwrap();
        assert_eq!(node.state, LifecycleState::Registered);
        assert_eq!(node.rack.as_deref(), Some("tor-a01"));
        assert_eq!(node.network.vlan, Some(100));
        assert_eq!(node.flavor.as_deref(), Some("hv"));
        assert_eq!(node.hardware.nics[0].mac, "aa:00:00:00:00:01");
        assert_eq!(node.hostname, format!("node-{uuid}"));
    }

    #[test]
    fn default_hostnames_are_whole_uuids_and_reserved_for_their_node() {
        let a = NodeUuid::parse("4c4c4544-0000-1000-8000-00000000002a").unwrap();
        // Same last 12 hex digits: the old scheme gave both `node-00000000002a`.
        let b = NodeUuid::parse("ffffffff-0000-1000-8000-00000000002a").unwrap();
        assert_ne!(default_hostname(&a), default_hostname(&b));
        assert!(crate::core::validate::check_hostname(&default_hostname(&a)).is_ok());
        assert!(hostname_reserved_for_other(&default_hostname(&a), &b));
        assert!(!hostname_reserved_for_other(&default_hostname(&a), &a));
        assert!(!hostname_reserved_for_other("node-00000000002a", &b));
        assert!(!hostname_reserved_for_other("hv-a01-07", &b));
    }

    #[test]
    fn rack_names_from_lldp_must_be_valid_rack_names() {
        let mut req = request("S1", &["aa:00:00:00:00:01"]);
        req.nics[0].lldp.as_mut().unwrap().system_name = Some("tor a01 \u{1b}[31m".into());
        assert_eq!(rack_from_lldp(&req).as_deref(), Some("00:11:22:33:44:55"));
        req.nics[0].lldp.as_mut().unwrap().chassis_id = "x".repeat(70);
        assert_eq!(rack_from_lldp(&req), None);
    }

    #[test]
    fn changed_serial_or_macs_are_refused() {
        let uuid = NodeUuid::from_index(1, 1);
        let node = plan(None, &uuid, &request("S1", &["aa:00:00:00:00:01"]), 5).unwrap();
        let same = plan(
            Some(&node),
            &uuid,
            &request("S1", &["AA:00:00:00:00:01"]),
            6,
        );
        assert!(same.is_ok());
        let serial = plan(
            Some(&node),
            &uuid,
            &request("S2", &["aa:00:00:00:00:01"]),
            6,
        );
        assert!(matches!(
            serial,
            Err(RegistrationRefused::IdentityMismatch { .. })
        ));
        let macs = plan(
            Some(&node),
            &uuid,
            &request("S1", &["aa:00:00:00:00:01", "aa:00:00:00:00:02"]),
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
        let mut node = plan(None, &uuid, &request("S1", &["aa:00:00:00:00:01"]), 5).unwrap();
        for state in [
            LifecycleState::Retired,
            LifecycleState::Fenced,
            LifecycleState::Fencing,
        ] {
            node.state = state;
            let result = plan(
                Some(&node),
                &uuid,
                &request("S1", &["aa:00:00:00:00:01"]),
                6,
            );
            assert!(
                matches!(result, Err(RegistrationRefused::Illegal(_))),
                "{state}"
            );
        }
    }
}
