//! The QEMU smoke's real layer-2 network, built from network namespaces so it touches
//! nothing on the host: a "boot network" namespace with a bridge (`br0`, 10.77.0.1/24,
//! where Bearman listens and answers proxyDHCP/TFTP) and one tap per VM, and a second
//! namespace standing in for the site's DHCP server — dnsmasq on a veth into the bridge
//! (10.77.0.2), handing out addresses only, no boot options, as a network team's server
//! would. The xtask process itself enters the boot namespace (`setns`), so the daemon,
//! QEMU and every admin-API request it makes live there; it goes back on drop, and both
//! namespaces (with the bridge, taps and veth) are deleted.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context};

use crate::process::ChildGuard;

pub const BRIDGE: &str = "br0";
/// Bearman's address on the boot network: HTTP, proxyDHCP, TFTP.
pub const SERVER_ADDRESS: &str = "10.77.0.1";
/// The site DHCP server's address.
pub const DHCP_SERVER_ADDRESS: &str = "10.77.0.2";
/// What dnsmasq hands out; Bearman's node pool (10.77.0.10-99) lies outside it.
pub const DHCP_RANGE: (&str, &str) = ("10.77.0.100", "10.77.0.199");
pub const PREFIX_LEN: u8 = 24;

/// The namespaces, entered; dnsmasq running. Dropping it stops dnsmasq, returns this
/// thread to the namespace it came from and deletes both namespaces.
pub struct L2 {
    boot_ns: String,
    dhcp_ns: String,
    original: File,
    dnsmasq: Option<ChildGuard>,
}

pub fn tap_name(index: u32) -> String {
    format!("tap{index}")
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    ensure!(
        output.status.success(),
        "ip {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

fn set_netns(file: &File, what: &str) -> anyhow::Result<()> {
    // SAFETY: setns(2) on a namespace file we hold open; it changes only this thread's
    // network namespace and touches no memory of ours.
    let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if result != 0 {
        bail!("setns into {what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The pid in a namespace name this module made (`bearman-smoke-PID[-dhcp]`).
fn smoke_namespace_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("bearman-smoke-")?;
    rest.strip_suffix("-dhcp").unwrap_or(rest).parse().ok()
}

/// Deletes namespaces an earlier smoke left behind when it was killed outright (SIGKILL
/// runs no destructor): those whose process is gone. A live smoke's are left alone.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = smoke_namespace_pid(&name) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!(
                    "qemu-smoke: removing namespace {name}, left by a smoke that no longer runs"
                );
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
}

impl L2 {
    /// Creates the namespaces and links for `taps` VMs and moves this thread into the
    /// boot namespace. Call it on the main thread before the async runtime starts, so
    /// every thread and child process made afterwards lives there.
    pub fn enter(taps: u32) -> anyhow::Result<L2> {
        // SAFETY: getuid(2) has no preconditions.
        ensure!(
            unsafe { libc::getuid() } == 0,
            "the L2 smoke needs root (network namespaces, a bridge and taps); run as root or pass --network user"
        );
        remove_stale_namespaces();
        let original = File::open("/proc/thread-self/ns/net")
            .context("opening this thread's network namespace")?;
        let id = std::process::id();
        let boot_ns = format!("bearman-smoke-{id}");
        let dhcp_ns = format!("bearman-smoke-{id}-dhcp");
        let l2 = L2 {
            boot_ns: boot_ns.clone(),
            dhcp_ns: dhcp_ns.clone(),
            original,
            dnsmasq: None,
        };
        // Each step's failure drops `l2`, which deletes whatever was made.
        ip(&["netns", "add", &boot_ns])?;
        ip(&["netns", "add", &dhcp_ns])?;
        let boot = File::open(format!("/run/netns/{boot_ns}"))
            .with_context(|| format!("opening /run/netns/{boot_ns}"))?;
        set_netns(&boot, &boot_ns)?;
        let cidr = format!("{SERVER_ADDRESS}/{PREFIX_LEN}");
        ip(&["link", "set", "lo", "up"])?;
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        // No STP or forwarding delay: a bridge port must forward the moment a VM's ROM
        // sends its first DHCPDISCOVER.
        ip(&[
            "link",
            "set",
            BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        ])?;
        ip(&["addr", "add", &cidr, "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        for index in 0..taps {
            let tap = tap_name(index);
            ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
            ip(&["link", "set", &tap, "master", BRIDGE])?;
            ip(&["link", "set", &tap, "up"])?;
        }
        ip(&[
            "link", "add", "vdhcp", "type", "veth", "peer", "name", "eth0", "netns", &dhcp_ns,
        ])?;
        ip(&["link", "set", "vdhcp", "master", BRIDGE])?;
        ip(&["link", "set", "vdhcp", "up"])?;
        let in_dhcp = |args: &[&str]| {
            let mut full = vec!["-n", dhcp_ns.as_str()];
            full.extend_from_slice(args);
            ip(&full)
        };
        in_dhcp(&["link", "set", "lo", "up"])?;
        in_dhcp(&[
            "addr",
            "add",
            &format!("{DHCP_SERVER_ADDRESS}/{PREFIX_LEN}"),
            "dev",
            "eth0",
        ])?;
        in_dhcp(&["link", "set", "eth0", "up"])?;
        Ok(l2)
    }

    /// Starts dnsmasq in the DHCP namespace: addresses only. Its log (every DHCP
    /// exchange) goes to `log`.
    pub fn start_dhcp_server(&mut self, work: &Path, log: &Path) -> anyhow::Result<()> {
        let output = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let (start, end) = DHCP_RANGE;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.dhcp_ns, "dnsmasq"])
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                // DHCP only: no DNS (port 0), no TFTP, no PXE, no boot file.
                "--port=0",
                "--interface=eth0",
                "--bind-interfaces",
                "--user=root",
                "--log-dhcp",
                "--log-facility=-",
            ])
            .arg(format!("--dhcp-range={start},{end},255.255.255.0,1h"))
            .arg(format!("--dhcp-option=option:router,{SERVER_ADDRESS}"))
            .arg(format!(
                "--dhcp-leasefile={}",
                work.join("dnsmasq.leases").display()
            ))
            .arg("--pid-file=")
            .stdout(output.try_clone()?)
            .stderr(output);
        self.dnsmasq = Some(ChildGuard::spawn("dnsmasq", &mut command)?);
        Ok(())
    }

    pub fn dnsmasq(&mut self) -> Option<&mut ChildGuard> {
        self.dnsmasq.as_mut()
    }
}

impl Drop for L2 {
    fn drop(&mut self) {
        // dnsmasq first (its guard waits for it), then leave and delete the namespaces.
        self.dnsmasq = None;
        if let Err(error) = set_netns(&self.original, "the original network namespace") {
            eprintln!("qemu-smoke: {error:#}");
        }
        for ns in [&self.dhcp_ns, &self.boot_ns] {
            if let Err(error) = ip(&["netns", "del", ns]) {
                eprintln!("qemu-smoke: removing namespace {ns}: {error:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_modules_namespace_names_yield_a_pid() {
        assert_eq!(smoke_namespace_pid("bearman-smoke-1234"), Some(1234));
        assert_eq!(smoke_namespace_pid("bearman-smoke-1234-dhcp"), Some(1234));
        for other in [
            "bearman-smoke-",
            "bearman-smoke-x",
            "prod-ns",
            "bearman-smoke-12-other",
        ] {
            assert_eq!(smoke_namespace_pid(other), None, "{other}");
        }
    }
}
