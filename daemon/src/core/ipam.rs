//! IP address management decisions: pool validation, pool selection, next free address.
//!
//! The store runs these inside a transaction and a unique constraint backs them up, so an
//! address is never handed out twice even if two registrations race.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::model::{IpPool, PoolPurpose};

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

/// Picks the pool for a node: same purpose and the node's VLAN if one matches, else the
/// purpose's pool without a VLAN. Pools are scanned in name order, so the choice is stable.
pub fn select_pool(pools: &[IpPool], purpose: PoolPurpose, vlan: Option<u16>) -> Option<&IpPool> {
    let mut candidates: Vec<&IpPool> = pools.iter().filter(|p| p.purpose == purpose).collect();
    candidates.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(vlan) = vlan {
        if let Some(pool) = candidates.iter().find(|p| p.vlan == Some(vlan)) {
            return Some(pool);
        }
    }
    candidates.into_iter().find(|p| p.vlan.is_none())
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
}
