//! Pure stage-2 network decisions: the node's [`NetworkDetail`] from Bearman and the host's
//! current state in, the list of changes to make out.
//!
//! Architecture invariant: no I/O. And the plan only ever adds: it never removes or
//! replaces an address or a route, because the address that reaches Bearman right now
//! (a DHCP lease, possibly on a network where the allocated address is not routable) must
//! keep working. Where a pool address joins an address the interface already had on the
//! same subnet (the lease), the kernel makes the pool address secondary and keeps sending
//! from the lease; so the plan adds, ahead of the kernel's route for that subnet, the same
//! on-link route with the pool address as its source ([`NetAction::PreferSource`]): the
//! node's traffic to that subnet — Bearman's heartbeats when Bearman is on the boot
//! network — leaves from the address Bearman gave it, and the lease's address and route
//! stay and keep answering. A pool address on any other subnet changes no route (the
//! kernel prefers it on its own subnet already, and elsewhere whether it is routable is
//! not known). The default route is added only when there is none, and never given a
//! source (see [`plan_network`]); the MTU is changed only when it differs and is within
//! [`MTU_MIN`]..=[`MTU_MAX`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use bearman_proto::NetworkDetail;

/// The smallest MTU every IPv4 host must accept (RFC 791).
pub const MTU_MIN: u32 = 576;
/// Jumbo frames; larger is a mistake, not a network.
pub const MTU_MAX: u32 = 9216;
/// `sethostname(2)` refuses longer names (`HOST_NAME_MAX`).
pub const HOSTNAME_BYTES_MAX: usize = 64;
/// The resolver reads at most this many `nameserver` lines (glibc and musl `MAXNS`).
pub const NAMESERVERS_MAX: usize = 3;
/// The bond stage 2 prefers when the OS built one.
pub const BOND: &str = "bond0";

/// What the host looks like before stage 2 changes anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostState {
    pub hostname: String,
    /// Interfaces sorted by name.
    pub interfaces: Vec<Interface>,
    /// True when the main table already has a default route.
    pub has_default_route: bool,
    /// The main table's IPv4 routes without a gateway (the subnets the host is on).
    pub subnet_routes: Vec<SubnetRoute>,
    pub resolv_conf: ResolvConf,
}

/// An on-link IPv4 route: `10.77.0.0/24 dev eth0 scope link src 10.77.0.150`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubnetRoute {
    /// Normalised network/prefix (`10.77.0.0/24`).
    pub subnet: String,
    pub dev: String,
    /// The preferred source; the kernel's own route for a subnet names the subnet's
    /// first (primary) address.
    pub src: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mtu: u32,
    /// Backed by hardware (`/sys/class/net/<name>/device` exists).
    pub physical: bool,
    /// Addresses in CIDR notation (`10.0.2.15/24`).
    pub addresses: Vec<String>,
}

/// `/etc/resolv.conf` as found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ResolvConf {
    #[default]
    Missing,
    File(String),
    /// A link (systemd-resolved, resolvconf): someone else manages it; left alone.
    Symlink(String),
}

/// One change to the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetAction {
    SetHostname(String),
    WriteResolvConf {
        contents: String,
    },
    SetMtu {
        dev: String,
        mtu: u32,
    },
    AddAddress {
        dev: String,
        cidr: String,
    },
    /// An on-link route of `subnet` on `dev` with `src` as preferred source, put ahead of
    /// the kernel's own route for the subnet, which stays (`ip route prepend SUBNET dev
    /// DEV scope link src SRC`).
    PreferSource {
        dev: String,
        subnet: String,
        src: String,
    },
    AddDefaultRoute {
        gateway: String,
        dev: String,
    },
}

impl fmt::Display for NetAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetAction::SetHostname(name) => write!(f, "hostname {name}"),
            NetAction::WriteResolvConf { contents } => {
                let servers: Vec<&str> = contents
                    .lines()
                    .filter_map(|line| line.strip_prefix("nameserver "))
                    .collect();
                write!(f, "/etc/resolv.conf nameservers {}", servers.join(" "))
            }
            NetAction::SetMtu { dev, mtu } => write!(f, "mtu {mtu} on {dev}"),
            NetAction::AddAddress { dev, cidr } => write!(f, "address {cidr} on {dev}"),
            NetAction::PreferSource { dev, subnet, src } => {
                write!(f, "source {src} preferred for {subnet} on {dev}")
            }
            NetAction::AddDefaultRoute { gateway, dev } => {
                write!(f, "default route via {gateway} dev {dev}")
            }
        }
    }
}

/// The changes, in the order to make them, and one note per part of the detail that is
/// deliberately not applied (or bad), for the console.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetPlan {
    pub actions: Vec<NetAction>,
    pub notes: Vec<String>,
}

/// Plans how to apply `detail` to a host in `state`. Order: hostname, resolv.conf, MTU
/// (before addresses, so a jumbo network's routes see it), addresses, the preferred
/// source of a subnet the lease shares with a pool address (the source must be an
/// address of the host by then), then the default route (its gateway must be reachable
/// through an address added just before).
///
/// The default route's source is left to the kernel (for a route without one: the
/// outgoing interface's primary address on the gateway's subnet, i.e. the lease's),
/// whether the route was there or is added here. Off the subnet, the pool address is
/// only as good as the site's routers make it: a router filtering sources it did not
/// lease (uRPF, DHCP snooping with IP source guard) would drop every packet, heartbeats
/// included, and the node cannot tell from inside. On its own subnet the pool address is
/// on the same wire as the lease, which is what Bearman's PXE setup puts it on.
pub fn plan_network(detail: &NetworkDetail, state: &HostState) -> NetPlan {
    let mut plan = NetPlan::default();

    match hostname_problem(&detail.hostname) {
        Some(problem) => plan
            .notes
            .push(format!("hostname {:?} not set: {problem}", detail.hostname)),
        None if detail.hostname != state.hostname => plan
            .actions
            .push(NetAction::SetHostname(detail.hostname.clone())),
        None => {}
    }

    plan_resolv_conf(detail, state, &mut plan);

    let target = state
        .interfaces
        .iter()
        .find(|interface| interface.name == BOND)
        .or_else(|| state.interfaces.iter().find(|interface| interface.physical));
    let Some(target) = target else {
        if !detail.bond0_addresses.is_empty() || detail.gateway.is_some() {
            plan.notes
                .push("no bond0 and no physical NIC: addresses, MTU and route not applied".into());
        }
        return plan;
    };
    let dev = target.name.clone();

    if detail.mtu != target.mtu {
        if (MTU_MIN..=MTU_MAX).contains(&detail.mtu) {
            plan.actions.push(NetAction::SetMtu {
                dev: dev.clone(),
                mtu: detail.mtu,
            });
        } else {
            plan.notes.push(format!(
                "mtu {} is outside {MTU_MIN}..={MTU_MAX}; {dev} keeps {}",
                detail.mtu, target.mtu
            ));
        }
    }

    let mut pool_addresses = Vec::new();
    for cidr in &detail.bond0_addresses {
        match parse_cidr(cidr) {
            Err(problem) => plan
                .notes
                .push(format!("address {cidr:?} not added: {problem}")),
            Ok(normal) => {
                if !target.addresses.contains(&normal) {
                    plan.actions.push(NetAction::AddAddress {
                        dev: dev.clone(),
                        cidr: normal.clone(),
                    });
                }
                pool_addresses.push(normal);
            }
        }
    }
    plan_preferred_sources(&pool_addresses, target, state, &mut plan);

    if let Some(gateway) = &detail.gateway {
        match gateway.parse::<IpAddr>() {
            Err(_) => plan.notes.push(format!(
                "gateway {gateway:?} is not an IP address; no route added"
            )),
            Ok(_) if state.has_default_route => plan.notes.push(format!(
                "a default route exists; gateway {gateway} not added"
            )),
            Ok(address) => plan.actions.push(NetAction::AddDefaultRoute {
                gateway: address.to_string(),
                dev: dev.clone(),
            }),
        }
    }

    if let Some(vlan) = detail.vlan {
        plan.notes.push(format!(
            "vlan {vlan} is not configured by the agent (the addresses go on {dev} untagged)"
        ));
    }
    plan
}

/// For each subnet where a pool address (the first of the detail's on that subnet) meets
/// an address the interface had before stage 2, a route preferring the pool address as
/// source, unless one is there already (a second prepend would be refused: "File
/// exists"). The kernel makes the second
/// address of a subnet (same network, same prefix) a secondary one, never chosen as
/// source; an address on a subnet of its own is the source of its own prefix route
/// already, so nothing is needed there. IPv6 is left alone: its source selection (RFC
/// 6724) has no primary/secondary rule to undo.
fn plan_preferred_sources(
    pool_addresses: &[String],
    target: &Interface,
    state: &HostState,
    plan: &mut NetPlan,
) {
    let mut subnets_seen: Vec<String> = Vec::new();
    for cidr in pool_addresses {
        let Some((address, subnet)) = ipv4_subnet(cidr) else {
            continue;
        };
        if subnets_seen.contains(&subnet) {
            continue;
        }
        subnets_seen.push(subnet.clone());
        let shares_subnet = target.addresses.iter().any(|existing| {
            existing != cidr
                && !pool_addresses.contains(existing)
                && ipv4_subnet(existing).is_some_and(|(_, other)| other == subnet)
        });
        if !shares_subnet {
            continue;
        }
        let src = address.to_string();
        let already = state.subnet_routes.iter().any(|route| {
            route.dev == target.name && route.subnet == subnet && route.src.as_deref() == Some(&src)
        });
        if !already {
            plan.actions.push(NetAction::PreferSource {
                dev: target.name.clone(),
                subnet,
                src,
            });
        }
    }
}

/// An IPv4 `address/prefix`'s address and normalised subnet (`10.77.0.150/24` →
/// `10.77.0.0/24`); `None` for IPv6 and anything unparsable.
pub fn ipv4_subnet(cidr: &str) -> Option<(Ipv4Addr, String)> {
    let (address, prefix) = cidr.split_once('/')?;
    let address: Ipv4Addr = address.parse().ok()?;
    let prefix: u32 = prefix.parse().ok().filter(|prefix| *prefix <= 32)?;
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    let network = Ipv4Addr::from(u32::from(address) & mask);
    Some((address, format!("{network}/{prefix}")))
}

fn plan_resolv_conf(detail: &NetworkDetail, state: &HostState, plan: &mut NetPlan) {
    if detail.dns.is_empty() {
        return;
    }
    let mut servers = Vec::new();
    for server in &detail.dns {
        match server.parse::<IpAddr>() {
            Ok(address) => servers.push(address.to_string()),
            Err(_) => plan.notes.push(format!(
                "dns server {server:?} is not an IP address; skipped"
            )),
        }
    }
    if servers.len() > NAMESERVERS_MAX {
        plan.notes.push(format!(
            "{} dns servers; the resolver reads the first {NAMESERVERS_MAX}, so only those are written",
            servers.len()
        ));
        servers.truncate(NAMESERVERS_MAX);
    }
    if servers.is_empty() {
        return;
    }
    let mut contents =
        String::from("# written by bearman-agent stage 2 from Bearman's network detail\n");
    for server in &servers {
        contents.push_str(&format!("nameserver {server}\n"));
    }
    match &state.resolv_conf {
        ResolvConf::Symlink(target) => plan.notes.push(format!(
            "/etc/resolv.conf links to {target} (managed elsewhere); dns servers not written"
        )),
        ResolvConf::File(current) if *current == contents => {}
        _ => plan.actions.push(NetAction::WriteResolvConf { contents }),
    }
}

/// Why `name` cannot be a hostname (RFC 1123 labels), or `None` when it can.
fn hostname_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("empty".into());
    }
    if name.len() > HOSTNAME_BYTES_MAX {
        return Some(format!("longer than {HOSTNAME_BYTES_MAX} bytes"));
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-');
        if !valid {
            return Some(format!(
                "label {label:?} is not letters, digits and inner hyphens"
            ));
        }
    }
    None
}

/// `address/prefix` checked and normalised (`fd00:0::5/64` → `fd00::5/64`).
pub fn parse_cidr(cidr: &str) -> Result<String, String> {
    let (address, prefix) = cidr.split_once('/').ok_or("expected address/prefix")?;
    let address: IpAddr = address
        .parse()
        .map_err(|_| format!("{address:?} is not an IP address"))?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| format!("prefix {prefix:?} is not a number"))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(format!("prefix {prefix} is above {max}"));
    }
    Ok(format!("{address}/{prefix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail() -> NetworkDetail {
        NetworkDetail {
            hostname: "hv-001".into(),
            vlan: None,
            bond0_addresses: vec!["10.1.0.21/24".into()],
            bond0_slaves: vec![],
            gateway: Some("10.1.0.1".into()),
            dns: vec!["10.1.0.53".into(), "10.1.0.54".into()],
            mtu: 1500,
        }
    }

    fn nic(name: &str, physical: bool, mtu: u32, addresses: &[&str]) -> Interface {
        Interface {
            name: name.into(),
            mtu,
            physical,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// A QEMU guest after DHCP: eth0 with a user-networking lease and a default route.
    fn qemu_host() -> HostState {
        HostState {
            hostname: "localhost".into(),
            interfaces: vec![
                nic("eth0", true, 1500, &["10.0.2.15/24"]),
                nic("lo", false, 65536, &["127.0.0.1/8"]),
            ],
            has_default_route: true,
            subnet_routes: vec![route("10.0.2.0/24", "eth0", Some("10.0.2.15"))],
            resolv_conf: ResolvConf::File("nameserver 10.0.2.3\n".into()),
        }
    }

    fn route(subnet: &str, dev: &str, src: Option<&str>) -> SubnetRoute {
        SubnetRoute {
            subnet: subnet.into(),
            dev: dev.into(),
            src: src.map(String::from),
        }
    }

    /// A VM on the smoke's L2 after stage 1's DHCP: dnsmasq's lease on the subnet the
    /// Bearman pool allocates from, hostname and resolver already as the detail says.
    fn l2_host(addresses: &[&str], routes: Vec<SubnetRoute>) -> HostState {
        HostState {
            hostname: "hv-001".into(),
            interfaces: vec![nic("eth0", true, 1500, addresses)],
            has_default_route: true,
            subnet_routes: routes,
            resolv_conf: ResolvConf::Symlink("/run/resolv.conf".into()),
        }
    }

    fn l2_detail(addresses: &[&str]) -> NetworkDetail {
        NetworkDetail {
            bond0_addresses: addresses.iter().map(|a| a.to_string()).collect(),
            gateway: None,
            dns: vec![],
            ..detail()
        }
    }

    fn check(detail: &NetworkDetail, state: &HostState, actions: &[&str], notes: &[&str]) {
        let plan = plan_network(detail, state);
        let got: Vec<String> = plan.actions.iter().map(ToString::to_string).collect();
        assert_eq!(got, actions, "actions");
        assert_eq!(plan.notes, notes, "notes");
    }

    #[test]
    fn a_dhcp_host_gains_the_pool_address_beside_its_lease() {
        let plan = plan_network(&detail(), &qemu_host());
        assert_eq!(
            plan.actions,
            vec![
                NetAction::SetHostname("hv-001".into()),
                NetAction::WriteResolvConf {
                    contents: "# written by bearman-agent stage 2 from Bearman's network detail\n\
                               nameserver 10.1.0.53\nnameserver 10.1.0.54\n"
                        .into()
                },
                NetAction::AddAddress {
                    dev: "eth0".into(),
                    cidr: "10.1.0.21/24".into()
                },
            ]
        );
        // The lease's default route stays; nothing is removed.
        assert_eq!(
            plan.notes,
            vec!["a default route exists; gateway 10.1.0.1 not added"]
        );
    }

    #[test]
    fn bond0_is_preferred_and_a_missing_default_route_is_added() {
        let mut host = qemu_host();
        host.has_default_route = false;
        host.interfaces.insert(0, nic("bond0", false, 1500, &[]));
        check(
            &detail(),
            &host,
            &[
                "hostname hv-001",
                "/etc/resolv.conf nameservers 10.1.0.53 10.1.0.54",
                "address 10.1.0.21/24 on bond0",
                "default route via 10.1.0.1 dev bond0",
            ],
            &[],
        );
    }

    #[test]
    fn applying_twice_changes_nothing_the_second_time() {
        let first = plan_network(&detail(), &qemu_host());
        let mut host = qemu_host();
        for action in &first.actions {
            match action {
                NetAction::SetHostname(name) => host.hostname = name.clone(),
                NetAction::WriteResolvConf { contents } => {
                    host.resolv_conf = ResolvConf::File(contents.clone())
                }
                NetAction::AddAddress { cidr, .. } => {
                    host.interfaces[0].addresses.push(cidr.clone())
                }
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(plan_network(&detail(), &host).actions, vec![]);
    }

    #[test]
    fn a_pool_address_on_the_lease_subnet_becomes_its_preferred_source_once() {
        let lease_route = route("10.77.0.0/24", "eth0", Some("10.77.0.150"));
        let detail = l2_detail(&["10.77.0.10/24"]);
        let mut host = l2_host(&["10.77.0.150/24"], vec![lease_route]);
        let plan = plan_network(&detail, &host);
        assert_eq!(
            plan.actions,
            vec![
                NetAction::AddAddress {
                    dev: "eth0".into(),
                    cidr: "10.77.0.10/24".into()
                },
                NetAction::PreferSource {
                    dev: "eth0".into(),
                    subnet: "10.77.0.0/24".into(),
                    src: "10.77.0.10".into()
                },
            ]
        );
        // What the host looks like after: both addresses and the lease's route (nothing
        // is removed), our route ahead of it. Planning again changes nothing.
        host.interfaces[0].addresses.push("10.77.0.10/24".into());
        host.subnet_routes
            .insert(0, route("10.77.0.0/24", "eth0", Some("10.77.0.10")));
        assert_eq!(plan_network(&detail, &host), NetPlan::default());
    }

    #[test]
    fn the_preferred_source_changes_only_where_the_pool_address_would_be_secondary() {
        let lease = route("10.77.0.0/24", "eth0", Some("10.77.0.150"));
        /// Why, the detail's addresses, the host's, its routes, the actions.
        type Case<'a> = (
            &'a str,
            &'a [&'a str],
            &'a [&'a str],
            Vec<SubnetRoute>,
            &'a [&'a str],
        );
        let cases: &[Case] = &[
            (
                "another subnet: the kernel prefers the pool address there already",
                &["10.1.0.21/24"],
                &["10.77.0.150/24"],
                vec![lease.clone()],
                &["address 10.1.0.21/24 on eth0"],
            ),
            (
                "same network, other prefix: a primary address of its own prefix",
                &["10.77.0.10/25"],
                &["10.77.0.150/24"],
                vec![lease.clone()],
                &["address 10.77.0.10/25 on eth0"],
            ),
            (
                "present and already preferred (stage 2 run again)",
                &["10.77.0.10/24"],
                &["10.77.0.150/24", "10.77.0.10/24"],
                vec![route("10.77.0.0/24", "eth0", Some("10.77.0.10"))],
                &[],
            ),
            (
                "the subnet's route is on another device only: ours is added on eth0",
                &["10.77.0.10/24"],
                &["10.77.0.150/24"],
                vec![route("10.77.0.0/24", "eth1", Some("10.77.0.150"))],
                &[
                    "address 10.77.0.10/24 on eth0",
                    "source 10.77.0.10 preferred for 10.77.0.0/24 on eth0",
                ],
            ),
            (
                "two pool addresses on the subnet: the first is the source",
                &["10.77.0.10/24", "10.77.0.11/24"],
                &["10.77.0.150/24"],
                vec![lease.clone()],
                &[
                    "address 10.77.0.10/24 on eth0",
                    "address 10.77.0.11/24 on eth0",
                    "source 10.77.0.10 preferred for 10.77.0.0/24 on eth0",
                ],
            ),
            (
                "IPv6 on the lease's prefix: RFC 6724 selection, left alone",
                &["fd00::10/64"],
                &["fd00::150/64"],
                vec![],
                &["address fd00::10/64 on eth0"],
            ),
        ];
        for (why, detail_addresses, host_addresses, routes, actions) in cases {
            let host = l2_host(host_addresses, routes.clone());
            let plan = plan_network(&l2_detail(detail_addresses), &host);
            let got: Vec<String> = plan.actions.iter().map(ToString::to_string).collect();
            assert_eq!(got, *actions, "{why}");
        }
    }

    #[test]
    fn the_source_is_preferred_before_a_missing_default_route_is_added() {
        let mut host = l2_host(
            &["10.77.0.150/24"],
            vec![route("10.77.0.0/24", "eth0", Some("10.77.0.150"))],
        );
        host.has_default_route = false;
        let detail = NetworkDetail {
            gateway: Some("10.77.0.1".into()),
            ..l2_detail(&["10.77.0.10/24"])
        };
        check(
            &detail,
            &host,
            &[
                "address 10.77.0.10/24 on eth0",
                "source 10.77.0.10 preferred for 10.77.0.0/24 on eth0",
                "default route via 10.77.0.1 dev eth0",
            ],
            &[],
        );
    }

    #[test]
    fn ipv4_subnets_are_normalised() {
        assert_eq!(
            ipv4_subnet("10.77.0.150/24"),
            Some(("10.77.0.150".parse().unwrap(), "10.77.0.0/24".into()))
        );
        assert_eq!(ipv4_subnet("10.77.0.150/0").unwrap().1, "0.0.0.0/0");
        assert_eq!(ipv4_subnet("10.77.0.150/32").unwrap().1, "10.77.0.150/32");
        assert_eq!(ipv4_subnet("10.77.0.150/33"), None);
        assert_eq!(ipv4_subnet("fd00::1/64"), None);
    }

    #[test]
    fn mtu_changes_only_when_different_and_sane() {
        let mut jumbo = detail();
        jumbo.mtu = 9000;
        let mut host = qemu_host();
        host.hostname = "hv-001".into();
        host.resolv_conf = ResolvConf::Symlink("/run/systemd/resolve/stub-resolv.conf".into());
        check(
            &jumbo,
            &host,
            &["mtu 9000 on eth0", "address 10.1.0.21/24 on eth0"],
            &[
                "/etc/resolv.conf links to /run/systemd/resolve/stub-resolv.conf (managed elsewhere); dns servers not written",
                "a default route exists; gateway 10.1.0.1 not added",
            ],
        );
        for mtu in [0, 575, 9217] {
            let mut bad = detail();
            bad.mtu = mtu;
            let plan = plan_network(&bad, &host);
            assert!(
                !plan
                    .actions
                    .iter()
                    .any(|a| matches!(a, NetAction::SetMtu { .. })),
                "mtu {mtu}"
            );
            assert!(
                plan.notes
                    .contains(&format!("mtu {mtu} is outside 576..=9216; eth0 keeps 1500")),
                "{:?}",
                plan.notes
            );
        }
    }

    #[test]
    fn bad_detail_values_are_noted_not_applied() {
        let bad = NetworkDetail {
            hostname: "-bad_host".into(),
            vlan: Some(100),
            bond0_addresses: vec![
                "10.1.0.21".into(),
                "10.1.0.300/24".into(),
                "10.1.0.21/33".into(),
                "fd00:0::5/64".into(),
            ],
            bond0_slaves: vec![],
            gateway: Some("router".into()),
            dns: vec![
                "8.8.8.8".into(),
                "dns.example".into(),
                "1.1.1.1".into(),
                "9.9.9.9".into(),
                "8.8.4.4".into(),
            ],
            mtu: 1500,
        };
        check(
            &bad,
            &qemu_host(),
            &[
                "/etc/resolv.conf nameservers 8.8.8.8 1.1.1.1 9.9.9.9",
                "address fd00::5/64 on eth0",
            ],
            &[
                "hostname \"-bad_host\" not set: label \"-bad_host\" is not letters, digits and inner hyphens",
                "dns server \"dns.example\" is not an IP address; skipped",
                "4 dns servers; the resolver reads the first 3, so only those are written",
                "address \"10.1.0.21\" not added: expected address/prefix",
                "address \"10.1.0.300/24\" not added: \"10.1.0.300\" is not an IP address",
                "address \"10.1.0.21/33\" not added: prefix 33 is above 32",
                "gateway \"router\" is not an IP address; no route added",
                "vlan 100 is not configured by the agent (the addresses go on eth0 untagged)",
            ],
        );
    }

    #[test]
    fn no_nic_means_only_hostname_and_dns() {
        let host = HostState {
            hostname: "hv-001".into(),
            interfaces: vec![nic("lo", false, 65536, &["127.0.0.1/8"])],
            has_default_route: false,
            subnet_routes: vec![],
            resolv_conf: ResolvConf::Missing,
        };
        check(
            &detail(),
            &host,
            &["/etc/resolv.conf nameservers 10.1.0.53 10.1.0.54"],
            &["no bond0 and no physical NIC: addresses, MTU and route not applied"],
        );
    }
}
