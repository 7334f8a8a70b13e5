//! The production [`Host`]: everything in the agent that touches the operating system
//! (kernel command line, `/sys` and `/proc` facts, DHCP via busybox `udhcpc`, LLDP raw
//! sockets, ipmitool, NIC firmware versions (`SIOCETHTOOL`), firmware updaters, the
//! download directory, kexec and reboot; in stage 2 the hostname,
//! resolv.conf, addresses and routes, os-release, uptime; the console on stderr).
//!
//! The stage-1 and stage-2 sequences themselves are [`crate::stages`]'s; this module and
//! its children are only their hands on a real machine.

pub mod bmc;
pub mod download;
pub mod kexec;
pub mod lldp_listen;
pub mod netconf;
pub mod nic_firmware;
pub mod updater;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::facts::{Facts, FactsError};
use crate::firmware::UpdaterRun;
use crate::host::Host;
use crate::lldp::NicLldp;
use crate::stages::StepError;
use bmc::Ipmitool;
use download::FsWorkDir;
use kexec::{Kexec, KexecError, KexecFiles, SystemKexec};
use netconf::{HostNetwork, SystemNetwork};

/// Where console lines go: stderr (the console) in production, a buffer in tests.
pub type Console = Arc<dyn Fn(&str) + Send + Sync>;

/// Prints to stderr, which the stage-1 service connects to the console.
pub fn stderr_console() -> Console {
    Arc::new(|line: &str| eprintln!("{line}"))
}

/// Bound on one `udhcpc` run.
pub const DHCP_TIMEOUT: Duration = Duration::from_secs(30);

/// A real machine: files under `root` (`/` in production), the command line at
/// `cmdline_path`, downloads in `work_dir`. The kexec step (and the restart after a
/// firmware update) and stage 2's network are parameters so tests can run everything else
/// for real and record what those would do.
pub struct SystemHost<K = SystemKexec, N = SystemNetwork> {
    /// `/proc/cmdline`, or a file standing in for it.
    pub cmdline_path: PathBuf,
    /// Root of the `/sys`, `/proc`, `/dev` and `/etc` trees facts, routes, the BMC device,
    /// os-release and uptime are read from.
    pub root: PathBuf,
    /// Where artifacts are downloaded (a tmpfs: `/run/bearman`); stage 2 writes nothing.
    pub work_dir: FsWorkDir,
    /// How BMC commands are run: the real ipmitool, or a fake in tests.
    pub ipmitool: Arc<dyn Ipmitool>,
    pub kexec: K,
    pub network: N,
    pub console: Console,
}

impl SystemHost {
    pub fn new(cmdline_path: PathBuf, root: PathBuf, work_dir: PathBuf) -> Self {
        SystemHost {
            cmdline_path,
            network: SystemNetwork::new(root.clone()),
            root,
            kexec: SystemKexec {
                work_dir: work_dir.clone(),
            },
            work_dir: FsWorkDir { dir: work_dir },
            ipmitool: Arc::new(bmc::SystemIpmitool::default()),
            console: stderr_console(),
        }
    }
}

impl<K, N> SystemHost<K, N> {
    /// The same host with another kexec step.
    pub fn with_kexec<K2: Kexec>(self, kexec: K2) -> SystemHost<K2, N> {
        SystemHost {
            cmdline_path: self.cmdline_path,
            root: self.root,
            work_dir: self.work_dir,
            ipmitool: self.ipmitool,
            kexec,
            network: self.network,
            console: self.console,
        }
    }

    /// The same host with another network for stage 2.
    pub fn with_network<N2: HostNetwork>(self, network: N2) -> SystemHost<K, N2> {
        SystemHost {
            cmdline_path: self.cmdline_path,
            root: self.root,
            work_dir: self.work_dir,
            ipmitool: self.ipmitool,
            kexec: self.kexec,
            network,
            console: self.console,
        }
    }

    fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.root.join(relative)).unwrap_or_default()
    }
}

impl<K: Kexec, N: HostNetwork> Host for SystemHost<K, N> {
    type WorkDir = FsWorkDir;
    type Network = N;

    fn say(&self, line: &str) {
        (self.console)(&format!("bearman-agent: {line}"));
    }

    fn cmdline_source(&self) -> String {
        self.cmdline_path.display().to_string()
    }

    fn read_cmdline(&self) -> std::io::Result<String> {
        std::fs::read_to_string(&self.cmdline_path)
    }

    fn facts(&self) -> Result<Facts, FactsError> {
        crate::facts::collect(&self.root)
    }

    /// Brings the network up with busybox `udhcpc` unless a default route or an address
    /// already exists (iPXE does not hand its lease to the kernel).
    async fn ensure_network(&mut self, nics: &[bearman_proto::NicFacts]) -> Result<(), StepError> {
        if has_default_route(&self.read("proc/net/route"))
            || has_address(&self.read("proc/net/fib_trie"))
        {
            return Ok(());
        }
        let mut last_error = String::from("no network interface found");
        for nic in nics.iter().filter(|nic| nic.name != "lo") {
            let mut command = tokio::process::Command::new("udhcpc");
            command
                .args(["-i", &nic.name, "-n", "-q", "-t", "5"])
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            match tokio::time::timeout(DHCP_TIMEOUT, command.status()).await {
                Ok(Ok(status)) if status.success() => return Ok(()),
                Ok(Ok(status)) => last_error = format!("udhcpc -i {}: {status}", nic.name),
                Ok(Err(error)) => last_error = format!("udhcpc -i {}: {error}", nic.name),
                Err(_) => {
                    last_error = format!("udhcpc -i {}: no lease within {DHCP_TIMEOUT:?}", nic.name)
                }
            }
        }
        Err(StepError {
            what: "bringing the network up".into(),
            why: last_error,
        })
    }

    async fn listen_lldp(&mut self, nics: &[String], wait: Duration) -> Vec<NicLldp> {
        lldp_listen::listen_all(nics, wait).await
    }

    fn bmc_device(&self) -> Option<PathBuf> {
        bmc::device_on_machine(&self.root)
    }

    fn ipmitool(&self) -> &dyn Ipmitool {
        self.ipmitool.as_ref()
    }

    fn nic_firmware(&self, nic: &str) -> Option<String> {
        nic_firmware::firmware_version(nic)
    }

    async fn run_updater(&mut self, argv: &[String], timeout: Duration) -> UpdaterRun {
        let say = |line: &str| self.say(line);
        updater::run(argv, timeout, &say).await
    }

    async fn reboot(&mut self) -> Result<(), KexecError> {
        self.kexec.restart()
    }

    fn work_dir(&self) -> &FsWorkDir {
        &self.work_dir
    }

    async fn kexec(&mut self, files: &KexecFiles) -> Result<(), KexecError> {
        self.kexec.kexec(files)
    }

    fn network(&mut self) -> &mut N {
        &mut self.network
    }

    fn os_release(&self) -> Option<String> {
        os_release(&self.root)
    }

    fn uptime_s(&self) -> Option<u64> {
        uptime_s(&self.root)
    }
}

/// True when `/proc/net/route` text has a default route (destination and mask 0).
pub fn has_default_route(route: &str) -> bool {
    route.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000"
    })
}

/// True when `/proc/net/fib_trie` text lists a local IPv4 address outside 127/8.
pub fn has_address(fib_trie: &str) -> bool {
    let mut last_address = "";
    for line in fib_trie.lines() {
        let line = line.trim_start_matches(|c: char| c.is_whitespace() || "|+-".contains(c));
        if let Some(address) = line.strip_prefix("/32 host LOCAL").map(|_| last_address) {
            if !address.starts_with("127.") {
                return true;
            }
        } else if let Some(first) = line.split_whitespace().next() {
            last_address = first;
        }
    }
    false
}

/// `PRETTY_NAME` from `etc/os-release` under `root`.
fn os_release(root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(root.join("etc/os-release")).ok()?;
    text.lines().find_map(|line| {
        line.strip_prefix("PRETTY_NAME=")
            .map(|value| value.trim_matches('"').to_string())
    })
}

fn uptime_s(root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(root.join("proc/uptime")).ok()?;
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(seconds as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_is_found_in_proc_net_route() {
        let header =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";
        let default = "eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        let subnet = "eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";
        assert!(has_default_route(&format!("{header}{subnet}{default}")));
        assert!(!has_default_route(&format!("{header}{subnet}")));
        assert!(!has_default_route(""));
    }

    #[test]
    fn addresses_are_found_in_fib_trie_except_loopback() {
        let loopback_only =
            "Local:\n  +-- 127.0.0.0/8 2 0 2\n     |-- 127.0.0.1\n        /32 host LOCAL\n";
        assert!(!has_address(loopback_only));
        let with_lease = format!(
            "{loopback_only}  +-- 192.168.2.0/24 2 0 2\n     |-- 192.168.2.15\n        /32 host LOCAL\n"
        );
        assert!(has_address(&with_lease));
    }
}
