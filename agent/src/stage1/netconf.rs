//! Stage 2's hands on the host network: reads the current state (hostname, interfaces and
//! their addresses, default route, the subnets' on-link routes and their preferred
//! sources, `/etc/resolv.conf`) and performs the actions
//! [`crate::network::plan_network`] decided, with `sethostname(2)`, a file write and
//! `ip` (busybox or iproute2), each command bounded in time.
//!
//! Behind the [`HostNetwork`] trait so stage 2 can be tested without changing the test
//! machine's network; only [`SystemNetwork`] touches the OS.

use std::ffi::CStr;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::network::{HostState, Interface, NetAction, ResolvConf, SubnetRoute};

/// Bound on one `ip` command.
pub const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// Interfaces read at most from `/sys/class/net`.
const INTERFACES_MAX: usize = 1024;
const STDERR_CHARS_MAX: usize = 400;
/// Routes read at most from `ip -4 route show` (more are ignored: a stage-2 host has a
/// handful, and the planner only looks for its own interface's subnets).
const ROUTES_MAX: usize = 4096;

/// Reads the host's network state and changes it, one action at a time.
pub trait HostNetwork {
    fn state(&self) -> impl Future<Output = Result<HostState, String>>;
    fn apply(&mut self, action: &NetAction) -> impl Future<Output = Result<(), String>>;
}

/// The real host: `/sys`, `/proc` and `/etc` under `root` (`/` in production), addresses
/// from `getifaddrs(3)`, changes through `sethostname(2)` and `ip`.
#[derive(Clone, Debug)]
pub struct SystemNetwork {
    pub root: PathBuf,
    pub timeout: Duration,
}

impl SystemNetwork {
    pub fn new(root: PathBuf) -> Self {
        SystemNetwork {
            root,
            timeout: IP_TIMEOUT,
        }
    }

    async fn ip(&self, args: &[String]) -> Result<(), String> {
        self.ip_output(args).await.map(drop)
    }

    /// Runs `ip` with `args`, bounded by `timeout`; its standard output on success.
    async fn ip_output(&self, args: &[String]) -> Result<String, String> {
        let shown = format!("ip {}", args.join(" "));
        let mut command = tokio::process::Command::new("ip");
        command
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(self.timeout, command.output()).await {
            Err(_) => Err(format!(
                "{shown}: no answer within {} s",
                self.timeout.as_secs()
            )),
            Ok(Err(error)) => Err(format!("{shown}: {error}")),
            Ok(Ok(output)) if output.status.success() => {
                Ok(String::from_utf8_lossy(&output.stdout).into_owned())
            }
            Ok(Ok(output)) => {
                let stderr: String = String::from_utf8_lossy(&output.stderr)
                    .trim()
                    .chars()
                    .take(STDERR_CHARS_MAX)
                    .collect();
                Err(format!("{shown}: {}: {stderr}", output.status))
            }
        }
    }
}

/// `ip` arguments for the actions that are `ip` commands.
pub fn ip_args(action: &NetAction) -> Option<Vec<String>> {
    let words: Vec<&str> = match action {
        NetAction::SetMtu { dev, mtu } => {
            return Some(
                ["link", "set", "dev", dev, "mtu", &mtu.to_string()]
                    .map(String::from)
                    .to_vec(),
            )
        }
        NetAction::AddAddress { dev, cidr } => vec!["addr", "add", cidr, "dev", dev],
        // Same key as the kernel's own prefix route (table main, metric 0, no TOS):
        // `prepend` puts it first among routes of that key, so lookups find it, and
        // leaves the kernel's route (and any other device's) in place. `replace` would
        // overwrite the first route of the key, on whichever device that is.
        NetAction::PreferSource { dev, subnet, src } => {
            vec![
                "route", "prepend", subnet, "dev", dev, "scope", "link", "src", src,
            ]
        }
        NetAction::AddDefaultRoute { gateway, dev } => {
            vec!["route", "add", "default", "via", gateway, "dev", dev]
        }
        NetAction::SetHostname(_) | NetAction::WriteResolvConf { .. } => return None,
    };
    Some(words.into_iter().map(String::from).collect())
}

/// The on-link IPv4 routes in `ip -4 route show`'s output (iproute2's or busybox's: one
/// route a line, `SUBNET dev DEV … [src SRC]`); routes with a gateway (`via`), the
/// default route and host routes without a prefix are not subnets and are skipped.
pub fn parse_subnet_routes(text: &str) -> Vec<SubnetRoute> {
    let mut routes = Vec::new();
    for line in text.lines().take(ROUTES_MAX) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&first, rest)) = words.split_first() else {
            continue;
        };
        if rest.contains(&"via") {
            continue;
        }
        let Some((_, subnet)) = crate::network::ipv4_subnet(first) else {
            continue;
        };
        let after = |key: &str| {
            rest.windows(2)
                .find(|pair| pair[0] == key)
                .map(|pair| pair[1].to_string())
        };
        let Some(dev) = after("dev") else {
            continue;
        };
        routes.push(SubnetRoute {
            subnet,
            dev,
            src: after("src"),
        });
    }
    routes
}

impl HostNetwork for SystemNetwork {
    async fn state(&self) -> Result<HostState, String> {
        let read = |relative: &str| std::fs::read_to_string(self.root.join(relative));
        let hostname = read("proc/sys/kernel/hostname")
            .map(|text| text.trim().to_string())
            .unwrap_or_default();
        let has_default_route =
            super::has_default_route(&read("proc/net/route").unwrap_or_default());
        let resolv_path = self.root.join("etc/resolv.conf");
        let resolv_conf = match std::fs::symlink_metadata(&resolv_path) {
            Err(_) => ResolvConf::Missing,
            Ok(meta) if meta.file_type().is_symlink() => ResolvConf::Symlink(
                std::fs::read_link(&resolv_path)
                    .map(|target| target.display().to_string())
                    .unwrap_or_default(),
            ),
            Ok(_) => ResolvConf::File(std::fs::read_to_string(&resolv_path).unwrap_or_default()),
        };
        let addresses = interface_addresses().map_err(|error| format!("getifaddrs: {error}"))?;
        let interfaces = interfaces(&self.root.join("sys/class/net"), &addresses)?;
        // The preferred source is not in /proc/net/route; `ip` is the tool that applies
        // the plan anyway, so a host where it cannot run could not apply much of it.
        let routes = self
            .ip_output(&["-4", "route", "show"].map(String::from))
            .await?;
        Ok(HostState {
            hostname,
            interfaces,
            has_default_route,
            subnet_routes: parse_subnet_routes(&routes),
            resolv_conf,
        })
    }

    async fn apply(&mut self, action: &NetAction) -> Result<(), String> {
        match action {
            NetAction::SetHostname(name) => set_hostname(name),
            NetAction::WriteResolvConf { contents } => {
                write_resolv_conf(&self.root.join("etc"), contents)
            }
            other => {
                let args = ip_args(other).unwrap_or_default();
                self.ip(&args).await
            }
        }
    }
}

fn set_hostname(name: &str) -> Result<(), String> {
    // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
    let result = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if result < 0 {
        return Err(format!("sethostname: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes `etc/resolv.conf` through a temporary file and a rename, so a reader never sees
/// half a file.
fn write_resolv_conf(etc: &Path, contents: &str) -> Result<(), String> {
    let path = etc.join("resolv.conf");
    let temporary = etc.join(".resolv.conf.bearman");
    std::fs::create_dir_all(etc)
        .and_then(|()| std::fs::write(&temporary, contents))
        .and_then(|()| std::fs::rename(&temporary, &path))
        .map_err(|error| format!("writing {}: {error}", path.display()))
}

/// Interfaces under `sys/class/net`, sorted, with the addresses `getifaddrs` gave.
fn interfaces(net: &Path, addresses: &[(String, String)]) -> Result<Vec<Interface>, String> {
    let listing = std::fs::read_dir(net).map_err(|error| format!("{}: {error}", net.display()))?;
    let mut interfaces = Vec::new();
    for entry in listing.take(INTERFACES_MAX) {
        let entry = entry.map_err(|error| format!("{}: {error}", net.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        let mtu = std::fs::read_to_string(dir.join("mtu"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        interfaces.push(Interface {
            addresses: addresses
                .iter()
                .filter(|(interface, _)| *interface == name)
                .map(|(_, cidr)| cidr.clone())
                .collect(),
            name,
            mtu,
            physical: dir.join("device").exists(),
        });
    }
    interfaces.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(interfaces)
}

/// (interface, `address/prefix`) for every IPv4 and IPv6 address on the host.
fn interface_addresses() -> io::Result<Vec<(String, String)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut current = head;
    while !current.is_null() {
        // SAFETY: `current` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*current };
        current = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and points to a sockaddr of its family.
        let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
        let cidr = match family {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in; so is its netmask.
                let address = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in>() };
                let prefix = if entry.ifa_netmask.is_null() {
                    32
                } else {
                    let mask = unsafe { &*entry.ifa_netmask.cast::<libc::sockaddr_in>() };
                    mask.sin_addr.s_addr.count_ones()
                };
                let address = Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr));
                format!("{address}/{prefix}")
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6; so is its netmask.
                let address = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in6>() };
                let prefix: u32 = if entry.ifa_netmask.is_null() {
                    128
                } else {
                    let mask = unsafe { &*entry.ifa_netmask.cast::<libc::sockaddr_in6>() };
                    mask.sin6_addr
                        .s6_addr
                        .iter()
                        .map(|byte| byte.count_ones())
                        .sum()
                };
                format!("{}/{prefix}", Ipv6Addr::from(address.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        out.push((name, cidr));
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_commands_add_and_never_remove() {
        let args = |action: NetAction| ip_args(&action).map(|args| args.join(" "));
        assert_eq!(
            args(NetAction::AddAddress {
                dev: "eth0".into(),
                cidr: "10.1.0.21/24".into()
            }),
            Some("addr add 10.1.0.21/24 dev eth0".into())
        );
        assert_eq!(
            args(NetAction::SetMtu {
                dev: "bond0".into(),
                mtu: 9000
            }),
            Some("link set dev bond0 mtu 9000".into())
        );
        assert_eq!(
            args(NetAction::AddDefaultRoute {
                gateway: "10.1.0.1".into(),
                dev: "eth0".into()
            }),
            Some("route add default via 10.1.0.1 dev eth0".into())
        );
        assert_eq!(
            args(NetAction::PreferSource {
                dev: "eth0".into(),
                subnet: "10.77.0.0/24".into(),
                src: "10.77.0.10".into()
            }),
            Some("route prepend 10.77.0.0/24 dev eth0 scope link src 10.77.0.10".into())
        );
        assert_eq!(args(NetAction::SetHostname("h".into())), None);
    }

    #[test]
    fn subnet_routes_are_read_from_iproute2_and_busybox_output() {
        // iproute2 (Debian 12), then busybox 1.35 on the stage-2 image, same table.
        let iproute2 = "default via 10.77.0.1 dev eth0\n\
                        10.77.0.0/24 dev eth0 proto kernel scope link src 10.77.0.150 \n\
                        10.78.0.0/16 dev eth1 proto kernel scope link src 10.78.3.4 linkdown\n\
                        10.79.0.0/24 via 10.77.0.254 dev eth0\n\
                        192.0.2.7 dev eth0 scope link\n\
                        198.51.100.0/24 dev eth0 scope link\n";
        let busybox = "default via 10.77.0.1 dev eth0 \n\
                       10.77.0.0/24 dev eth0 scope link  src 10.77.0.150 \n\
                       10.78.0.0/16 dev eth1 scope link  src 10.78.3.4 \n\
                       10.79.0.0/24 via 10.77.0.254 dev eth0 \n\
                       192.0.2.7 dev eth0 scope link \n\
                       198.51.100.0/24 dev eth0 scope link \n";
        let expected = vec![
            SubnetRoute {
                subnet: "10.77.0.0/24".into(),
                dev: "eth0".into(),
                src: Some("10.77.0.150".into()),
            },
            SubnetRoute {
                subnet: "10.78.0.0/16".into(),
                dev: "eth1".into(),
                src: Some("10.78.3.4".into()),
            },
            SubnetRoute {
                subnet: "198.51.100.0/24".into(),
                dev: "eth0".into(),
                src: None,
            },
        ];
        assert_eq!(parse_subnet_routes(iproute2), expected);
        assert_eq!(parse_subnet_routes(busybox), expected);
        assert_eq!(parse_subnet_routes(""), vec![]);
        assert_eq!(parse_subnet_routes("garbage\n10.0.0.0/8\n"), vec![]);
    }

    #[tokio::test]
    async fn the_real_host_state_has_loopback() {
        // Reads, never writes: the test machine's state with its loopback address.
        let state = SystemNetwork::new("/".into()).state().await.unwrap();
        let lo = state
            .interfaces
            .iter()
            .find(|interface| interface.name == "lo")
            .expect("lo in /sys/class/net");
        assert!(!lo.physical);
        assert!(lo.addresses.contains(&"127.0.0.1/8".to_string()), "{lo:?}");
    }

    #[test]
    fn resolv_conf_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        write_resolv_conf(&etc, "nameserver 10.1.0.53\n").unwrap();
        write_resolv_conf(&etc, "nameserver 10.1.0.54\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(etc.join("resolv.conf")).unwrap(),
            "nameserver 10.1.0.54\n"
        );
        assert_eq!(std::fs::read_dir(&etc).unwrap().count(), 1);
    }
}
