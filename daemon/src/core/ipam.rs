//! IP address management decisions: pool validation, pool selection, next free address,
//! which addresses a registering node asks for, how an allocation is written into a node
//! record, and which allocations no record accounts for.
//!
//! The store runs these inside a transaction and a unique constraint backs them up, so an
//! address is never handed out twice even if two registrations race.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use bearman_proto::BmcSettings;

use super::model::{BmcDriver, IpAllocation, IpPool, Node, PoolPurpose};

/// The largest range a pool may span: keeps gap scans and listings bounded.
pub const POOL_ADDRESSES_MAX: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("field {field}: {value:?} is not a valid IPv4 address")]
    BadAddress { field: &'static str, value: String },
    #[error("field cidr: {0:?} is not an IPv4 CIDR such as 10.1.0.0/24")]
    BadCidr(String),
    #[error("field {field}: {address} is outside {cidr}")]
    OutsideSubnet {
        field: &'static str,
        address: String,
        cidr: String,
    },
    #[error("field range_end: range ends before it starts")]
    EmptyRange,
    #[error("field range_end: range spans more than {POOL_ADDRESSES_MAX} addresses")]
    RangeTooLarge,
    #[error("field name: {0:?} must be 1-63 characters of [a-z0-9-_.]")]
    BadName(String),
    #[error("field vlan: {0} is not a VLAN id (1-4094)")]
    BadVlan(u16),
    #[error("field mtu: {0} is outside 576-9216")]
    BadMtu(u32),
}

/// A pool's parsed form, for arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolRange {
    pub network: u32,
    pub prefix_len: u8,
    pub start: u32,
    pub end: u32,
    pub gateway: Option<u32>,
}

fn parse_address(field: &'static str, value: &str) -> Result<u32, PoolError> {
    value
        .parse::<Ipv4Addr>()
        .map(u32::from)
        .map_err(|_| PoolError::BadAddress {
            field,
            value: value.to_string(),
        })
}

pub fn parse_cidr(cidr: &str) -> Result<(u32, u8), PoolError> {
    let bad = || PoolError::BadCidr(cidr.to_string());
    let (address, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    let address: u32 = address.parse::<Ipv4Addr>().map_err(|_| bad())?.into();
    let mask = prefix_mask(prefix);
    if address & !mask != 0 {
        // 10.1.0.5/24 is a host address, not a network; refuse rather than guess.
        return Err(bad());
    }
    Ok((address, prefix))
}

fn prefix_mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// Checks a pool definition and returns its parsed range.
pub fn validate_pool(pool: &IpPool) -> Result<PoolRange, PoolError> {
    if !is_valid_name(&pool.name) {
        return Err(PoolError::BadName(pool.name.clone()));
    }
    if let Some(vlan) = pool.vlan {
        if !(1..=4094).contains(&vlan) {
            return Err(PoolError::BadVlan(vlan));
        }
    }
    if !(576..=9216).contains(&pool.mtu) {
        return Err(PoolError::BadMtu(pool.mtu));
    }
    let (network, prefix_len) = parse_cidr(&pool.cidr)?;
    let mask = prefix_mask(prefix_len);
    let inside = |field: &'static str, address: u32| {
        if address & mask == network {
            Ok(address)
        } else {
            Err(PoolError::OutsideSubnet {
                field,
                address: Ipv4Addr::from(address).to_string(),
                cidr: pool.cidr.clone(),
            })
        }
    };
    let start = inside(
        "range_start",
        parse_address("range_start", &pool.range_start)?,
    )?;
    let end = inside("range_end", parse_address("range_end", &pool.range_end)?)?;
    if end < start {
        return Err(PoolError::EmptyRange);
    }
    if end - start >= POOL_ADDRESSES_MAX {
        return Err(PoolError::RangeTooLarge);
    }
    let gateway = match &pool.gateway {
        Some(text) => Some(inside("gateway", parse_address("gateway", text)?)?),
        None => None,
    };
    for server in &pool.dns {
        parse_address("dns", server)?;
    }
    Ok(PoolRange {
        network,
        prefix_len,
        start,
        end,
        gateway,
    })
}

impl PoolRange {
    /// How many addresses the pool hands out: its range, less the gateway if inside it.
    pub fn size(&self) -> u32 {
        self.end - self.start + 1
            - u32::from(
                self.gateway
                    .is_some_and(|g| g >= self.start && g <= self.end),
            )
    }

    fn assignable(&self, address: u32) -> bool {
        address >= self.start && address <= self.end && Some(address) != self.gateway
    }

    /// The address after the highest one in use: the common case for a growing fleet,
    /// answerable from one indexed `MAX()` query.
    pub fn next_after_highest(&self, highest_used: Option<u32>) -> Option<u32> {
        let mut candidate = match highest_used {
            Some(highest) => highest.checked_add(1)?,
            None => self.start,
        };
        while candidate <= self.end {
            if self.assignable(candidate) {
                return Some(candidate);
            }
            candidate = candidate.checked_add(1)?;
        }
        None
    }

    /// The lowest free address, for when the top of the range is used up and released
    /// addresses (retired nodes) must be reused.
    pub fn first_gap(&self, used: &BTreeSet<u32>) -> Option<u32> {
        (self.start..=self.end).find(|address| self.assignable(*address) && !used.contains(address))
    }

    pub fn with_prefix(&self, address: u32) -> String {
        format!("{}/{}", Ipv4Addr::from(address), self.prefix_len)
    }
}

/// The pools a node's `purpose` address may come from, in the order to try them: the
/// purpose's pools on the node's VLAN when any exists, else its pools without a VLAN;
/// name order within each, so the choice is stable. Every pool that fits is listed, so
/// a full one is not the end of it. A node on a VLAN with pools of its own never falls
/// back to a VLAN-less pool: that address would be on another network.
pub fn candidate_pools(pools: &[IpPool], purpose: PoolPurpose, vlan: Option<u16>) -> Vec<&IpPool> {
    let mut candidates: Vec<&IpPool> = pools.iter().filter(|p| p.purpose == purpose).collect();
    candidates.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(vlan) = vlan {
        let on_vlan: Vec<&IpPool> = candidates
            .iter()
            .copied()
            .filter(|p| p.vlan == Some(vlan))
            .collect();
        if !on_vlan.is_empty() {
            return on_vlan;
        }
    }
    candidates.retain(|p| p.vlan.is_none());
    candidates
}

/// The first pool [`candidate_pools`] lists: where a node's address comes from while
/// that pool has room.
pub fn select_pool(pools: &[IpPool], purpose: PoolPurpose, vlan: Option<u16>) -> Option<&IpPool> {
    candidate_pools(pools, purpose, vlan).into_iter().next()
}

/// One address taken from one pool (an operator's `ip_allocate`), unless the node
/// already holds an address for that purpose (it keeps that one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressRequest {
    pub pool: String,
    pub purpose: PoolPurpose,
}

/// One address a registration asks the store for: the node's slot for `purpose`, from
/// the first of `pools` with room, unless the node already holds an address for that
/// purpose (it keeps that one, whichever pool it came from).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressWant {
    pub purpose: PoolPurpose,
    /// Never empty; in the order to try.
    pub pools: Vec<String>,
    /// When every pool is full: `true` registers the node without this address (a BMC
    /// keeps the address it has), `false` refuses the registration (`PoolExhausted`).
    pub optional: bool,
}

/// The addresses a registering `node` needs, in the order the store should take them:
/// a bond0 address from the pools [`candidate_pools`] lists for its VLAN, and a BMC
/// address when the machine reported a BMC that Bearman reaches over its LAN. No pool
/// of a purpose means no request for it (the node keeps DHCP, the BMC its own address).
/// The BMC address is optional: full BMC pools must not keep a node from booting.
pub fn address_requests(pools: &[IpPool], node: &Node, has_bmc: bool) -> Vec<AddressWant> {
    let names = |purpose, vlan| -> Vec<String> {
        candidate_pools(pools, purpose, vlan)
            .into_iter()
            .map(|pool| pool.name.clone())
            .collect()
    };
    let mut requests = Vec::new();
    let node_pools = names(PoolPurpose::Node, node.network.vlan);
    if !node_pools.is_empty() {
        requests.push(AddressWant {
            purpose: PoolPurpose::Node,
            pools: node_pools,
            optional: false,
        });
    }
    // A BMC Bearman reaches some other way than its LAN (a VM's QMP socket, the
    // simulator's fabric) keeps its address: an OOB address would replace the only way
    // to fence it.
    let reached_over_lan = !matches!(node.bmc.driver, Some(BmcDriver::Qmp | BmcDriver::Sim));
    if has_bmc && reached_over_lan {
        let bmc_pools = names(PoolPurpose::Bmc, None);
        if !bmc_pools.is_empty() {
            requests.push(AddressWant {
                purpose: PoolPurpose::Bmc,
                pools: bmc_pools,
                optional: true,
            });
        }
    }
    requests
}

/// Why an allocation cannot be written into a node record. Each is a store or caller
/// bug, never a client's mistake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyAllocationError {
    #[error("allocation of {address} comes from pool {allocation_pool}, not {pool}")]
    WrongPool {
        address: String,
        allocation_pool: String,
        pool: String,
    },
    #[error("allocation of {address} is for {allocation_purpose} addresses, pool {pool} for {pool_purpose}")]
    WrongPurpose {
        address: String,
        allocation_purpose: &'static str,
        pool: String,
        pool_purpose: &'static str,
    },
    #[error("allocated address {0:?} is not an IPv4 address")]
    BadAddress(String),
    #[error("pool {pool}: {source}")]
    InvalidPool {
        pool: String,
        #[source]
        source: PoolError,
    },
}

/// Checks that `allocation` came from `pool` and returns the pool's range and the
/// allocated address as a number.
fn checked_allocation(
    pool: &IpPool,
    allocation: &IpAllocation,
) -> Result<(PoolRange, u32), ApplyAllocationError> {
    if allocation.pool != pool.name {
        return Err(ApplyAllocationError::WrongPool {
            address: allocation.address.clone(),
            allocation_pool: allocation.pool.clone(),
            pool: pool.name.clone(),
        });
    }
    if allocation.purpose != pool.purpose {
        return Err(ApplyAllocationError::WrongPurpose {
            address: allocation.address.clone(),
            allocation_purpose: allocation.purpose.as_str(),
            pool: pool.name.clone(),
            pool_purpose: pool.purpose.as_str(),
        });
    }
    let range = validate_pool(pool).map_err(|source| ApplyAllocationError::InvalidPool {
        pool: pool.name.clone(),
        source,
    })?;
    let address = address_from_string(&allocation.address)
        .ok_or_else(|| ApplyAllocationError::BadAddress(allocation.address.clone()))?;
    Ok((range, address))
}

/// Writes `allocation` (from `pool`) into `node`: a node address becomes its bond0
/// address with the pool's prefix, gateway, DNS and MTU (and the pool's VLAN when the
/// node has none); a BMC address becomes `bmc.address`.
pub fn apply_allocation(
    node: &mut Node,
    pool: &IpPool,
    allocation: &IpAllocation,
) -> Result<(), ApplyAllocationError> {
    let (range, address) = checked_allocation(pool, allocation)?;
    match allocation.purpose {
        PoolPurpose::Node => {
            node.network.bond0_addresses = vec![range.with_prefix(address)];
            node.network.gateway = pool.gateway.clone();
            node.network.dns = pool.dns.clone();
            node.network.mtu = pool.mtu;
            if node.network.vlan.is_none() {
                node.network.vlan = pool.vlan;
            }
        }
        PoolPurpose::Bmc => node.bmc.address = Some(allocation.address.clone()),
    }
    Ok(())
}

/// Undoes [`apply_allocation`] for every purpose: the record of a retired node, whose
/// allocations the store releases. The VLAN stays (LLDP's, not a pool's) and so does the
/// MTU, which names no address.
pub fn forget_addresses(node: &mut Node) {
    node.network.bond0_addresses.clear();
    node.network.gateway = None;
    node.network.dns.clear();
    node.bmc.address = None;
}

/// What the stage-1 agent configures on the BMC for its `allocation` from `pool`.
pub fn bmc_settings(
    pool: &IpPool,
    allocation: &IpAllocation,
) -> Result<BmcSettings, ApplyAllocationError> {
    let (range, _) = checked_allocation(pool, allocation)?;
    Ok(BmcSettings {
        address: allocation.address.clone(),
        prefix_len: range.prefix_len,
        gateway: pool.gateway.clone(),
        vlan: pool.vlan,
    })
}

/// Whether `node`'s record names the address of `allocation` where an allocation of its
/// purpose goes (bond0 for node addresses, the BMC for BMC ones). An allocation whose
/// node does not record it is an orphan: nothing uses it and nothing will release it.
pub fn node_records_allocation(node: &Node, allocation: &IpAllocation) -> bool {
    if node.uuid != allocation.node_uuid {
        return false;
    }
    match allocation.purpose {
        PoolPurpose::Node => node
            .network
            .bond0_addresses
            .iter()
            .any(|recorded| recorded.split('/').next() == Some(allocation.address.as_str())),
        PoolPurpose::Bmc => node.bmc.address.as_deref() == Some(allocation.address.as_str()),
    }
}

pub fn address_to_string(address: u32) -> String {
    Ipv4Addr::from(address).to_string()
}

pub fn address_from_string(text: &str) -> Option<u32> {
    text.parse::<Ipv4Addr>().ok().map(u32::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, purpose: PoolPurpose, vlan: Option<u16>) -> IpPool {
        IpPool {
            name: name.into(),
            purpose,
            vlan,
            cidr: "10.1.0.0/24".into(),
            range_start: "10.1.0.1".into(),
            range_end: "10.1.0.4".into(),
            gateway: Some("10.1.0.2".into()),
            dns: vec!["10.0.0.53".into()],
            mtu: 9000,
        }
    }

    #[test]
    fn allocation_skips_gateway_and_stops_at_range_end() {
        let range = validate_pool(&pool("a", PoolPurpose::Node, None)).unwrap();
        assert_eq!(
            range.next_after_highest(None),
            address_from_string("10.1.0.1")
        );
        let first = range.next_after_highest(None).unwrap();
        assert_eq!(
            range.next_after_highest(Some(first)),
            address_from_string("10.1.0.3")
        );
        let last = address_from_string("10.1.0.4").unwrap();
        assert_eq!(range.next_after_highest(Some(last)), None);
        let used: BTreeSet<u32> = [first, last].into_iter().collect();
        assert_eq!(range.first_gap(&used), address_from_string("10.1.0.3"));
        let used: BTreeSet<u32> = ["10.1.0.1", "10.1.0.3", "10.1.0.4"]
            .iter()
            .map(|a| address_from_string(a).unwrap())
            .collect();
        assert_eq!(range.first_gap(&used), None);
    }

    #[test]
    fn invalid_pools_are_refused_naming_the_field() {
        let check = |edit: fn(&mut IpPool), expected: &str| {
            let mut p = pool("a", PoolPurpose::Node, None);
            edit(&mut p);
            let message = validate_pool(&p).unwrap_err().to_string();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        };
        check(|p| p.cidr = "10.1.0.5/24".into(), "field cidr");
        check(|p| p.cidr = "10.1.0.0/33".into(), "field cidr");
        check(|p| p.range_start = "10.2.0.1".into(), "field range_start");
        check(|p| p.range_end = "nope".into(), "field range_end");
        check(
            |p| p.range_end = "10.1.0.0".into(),
            "range ends before it starts",
        );
        check(|p| p.gateway = Some("192.168.0.1".into()), "field gateway");
        check(|p| p.name = "Bad Name".into(), "field name");
        check(|p| p.vlan = Some(5000), "field vlan");
        check(|p| p.mtu = 100, "field mtu");
        check(
            |p| {
                p.cidr = "10.0.0.0/8".into();
                p.range_start = "10.0.0.1".into();
                p.range_end = "10.255.255.254".into();
                p.gateway = None;
            },
            "more than",
        );
    }

    fn allocation(pool: &str, purpose: PoolPurpose, address: &str) -> IpAllocation {
        IpAllocation {
            pool: pool.into(),
            address: address.into(),
            node_uuid: bearman_proto::uuid::NodeUuid::from_index(1, 1),
            purpose,
            allocated_at_ms: 1,
        }
    }

    fn test_node() -> Node {
        Node::new(
            bearman_proto::uuid::NodeUuid::from_index(1, 1),
            "n1".into(),
            crate::core::model::NodeRole::Compute,
            1,
        )
    }

    #[test]
    fn allocations_are_written_into_the_record_and_recognised_there() {
        let mut node = test_node();
        let mut node_pool = pool("rack", PoolPurpose::Node, Some(300));
        node_pool.mtu = 9000;
        let bond = allocation("rack", PoolPurpose::Node, "10.1.0.3");
        apply_allocation(&mut node, &node_pool, &bond).unwrap();
        assert_eq!(node.network.bond0_addresses, vec!["10.1.0.3/24"]);
        assert_eq!(node.network.gateway.as_deref(), Some("10.1.0.2"));
        assert_eq!(node.network.dns, vec!["10.0.0.53"]);
        assert_eq!(node.network.mtu, 9000);
        assert_eq!(node.network.vlan, Some(300), "the pool's VLAN when none");
        assert!(node_records_allocation(&node, &bond));

        // A VLAN the node already has (from LLDP) is kept.
        let mut tagged = test_node();
        tagged.network.vlan = Some(100);
        apply_allocation(&mut tagged, &node_pool, &bond).unwrap();
        assert_eq!(tagged.network.vlan, Some(100));

        let bmc_pool = pool("oob", PoolPurpose::Bmc, Some(7));
        let bmc = allocation("oob", PoolPurpose::Bmc, "10.1.0.4");
        assert!(!node_records_allocation(&node, &bmc));
        apply_allocation(&mut node, &bmc_pool, &bmc).unwrap();
        assert_eq!(node.bmc.address.as_deref(), Some("10.1.0.4"));
        assert!(node_records_allocation(&node, &bmc));
        assert_eq!(
            bmc_settings(&bmc_pool, &bmc).unwrap(),
            BmcSettings {
                address: "10.1.0.4".into(),
                prefix_len: 24,
                gateway: Some("10.1.0.2".into()),
                vlan: Some(7),
            }
        );

        // Another node's allocation is never this node's.
        let mut other = bmc.clone();
        other.node_uuid = bearman_proto::uuid::NodeUuid::from_index(1, 2);
        assert!(!node_records_allocation(&node, &other));
    }

    #[test]
    fn mismatched_allocations_are_refused_and_change_nothing() {
        let node_pool = pool("rack", PoolPurpose::Node, None);
        let check = |allocation: IpAllocation, expected: &str| {
            let mut node = test_node();
            let error = apply_allocation(&mut node, &node_pool, &allocation).unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
            assert_eq!(node, test_node(), "a refused allocation changed the record");
        };
        check(
            allocation("other", PoolPurpose::Node, "10.1.0.3"),
            "not rack",
        );
        check(allocation("rack", PoolPurpose::Bmc, "10.1.0.3"), "for bmc");
        check(allocation("rack", PoolPurpose::Node, "nope"), "not an IPv4");
    }

    #[test]
    fn registrations_ask_for_a_bmc_address_only_for_a_bmc_on_the_lan() {
        let pools = vec![
            pool("bmc", PoolPurpose::Bmc, None),
            pool("default", PoolPurpose::Node, None),
        ];
        let wanted = |driver: Option<BmcDriver>, has_bmc: bool| {
            let mut node = test_node();
            node.bmc.driver = driver;
            address_requests(&pools, &node, has_bmc)
                .into_iter()
                .map(|r| (r.pools.join(","), r.purpose, r.optional))
                .collect::<Vec<_>>()
        };
        let both = vec![
            ("default".to_string(), PoolPurpose::Node, false),
            ("bmc".to_string(), PoolPurpose::Bmc, true),
        ];
        assert_eq!(wanted(None, true), both);
        assert_eq!(wanted(Some(BmcDriver::Ipmi), true), both);
        assert_eq!(wanted(None, false), both[..1]);
        assert_eq!(wanted(Some(BmcDriver::Qmp), true), both[..1]);
        assert_eq!(wanted(Some(BmcDriver::Sim), true), both[..1]);
        assert!(address_requests(&[], &test_node(), true).is_empty());
    }

    #[test]
    fn pool_selection_prefers_vlan_match_then_untagged() {
        let pools = vec![
            pool("bmc", PoolPurpose::Bmc, None),
            pool("v200", PoolPurpose::Node, Some(200)),
            pool("default", PoolPurpose::Node, None),
        ];
        assert_eq!(
            select_pool(&pools, PoolPurpose::Node, Some(200))
                .unwrap()
                .name,
            "v200"
        );
        assert_eq!(
            select_pool(&pools, PoolPurpose::Node, Some(300))
                .unwrap()
                .name,
            "default"
        );
        assert_eq!(
            select_pool(&pools, PoolPurpose::Node, None).unwrap().name,
            "default"
        );
        assert_eq!(
            select_pool(&pools, PoolPurpose::Bmc, Some(200))
                .unwrap()
                .name,
            "bmc"
        );
        assert!(select_pool(&pools[1..2], PoolPurpose::Node, None).is_none());
    }

    #[test]
    fn every_pool_that_fits_is_a_candidate_in_name_order() {
        let pools = vec![
            pool("v200-b", PoolPurpose::Node, Some(200)),
            pool("v200-a", PoolPurpose::Node, Some(200)),
            pool("default-2", PoolPurpose::Node, None),
            pool("default-1", PoolPurpose::Node, None),
            pool("bmc-b", PoolPurpose::Bmc, None),
            pool("bmc-a", PoolPurpose::Bmc, None),
        ];
        let names = |purpose, vlan| {
            candidate_pools(&pools, purpose, vlan)
                .into_iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
        };
        // A VLAN with pools of its own never falls back to the untagged ones.
        assert_eq!(names(PoolPurpose::Node, Some(200)), ["v200-a", "v200-b"]);
        assert_eq!(
            names(PoolPurpose::Node, Some(300)),
            ["default-1", "default-2"]
        );
        assert_eq!(names(PoolPurpose::Node, None), ["default-1", "default-2"]);
        assert_eq!(names(PoolPurpose::Bmc, None), ["bmc-a", "bmc-b"]);
    }
}
