//! The machine under the agent: everything stage 1 and stage 2 do that touches the
//! operating system (firmware updaters and the reboot after them included), behind one
//! [`Host`] trait (with [`WorkDir`] for the download directory), so [`crate::stages`] runs
//! unchanged on a real machine ([`crate::stage1::SystemHost`]) and on a simulated one (the
//! simulator's virtual nodes).
//!
//! Architecture invariant: the sequences in [`crate::stages`] reach the outside world
//! only through a `Host`, a [`crate::Connector`] and tokio's timer (which turmoil
//! virtualises). Nothing here does I/O itself.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bearman_proto::NicFacts;
use tokio::io::AsyncWrite;

use crate::facts::{Facts, FactsError};
use crate::firmware::UpdaterRun;
use crate::lldp::NicLldp;
use crate::stage1::bmc::Ipmitool;
use crate::stage1::kexec::{KexecError, KexecFiles};
use crate::stage1::netconf::HostNetwork;
use crate::stages::StepError;

/// One machine as stage 1 and stage 2 see it.
pub trait Host {
    /// Where artifacts are downloaded.
    type WorkDir: WorkDir;
    /// Stage 2's hands on the network.
    type Network: HostNetwork;

    /// Prints one console line; the host adds the `bearman-agent: ` prefix.
    fn say(&self, line: &str);

    /// Where the kernel command line comes from, as error messages name it
    /// (`/proc/cmdline`).
    fn cmdline_source(&self) -> String;
    /// The kernel command line's text.
    fn read_cmdline(&self) -> io::Result<String>;

    /// The machine's hardware facts (identity and registration body, no LLDP or BMC yet).
    fn facts(&self) -> Result<Facts, FactsError>;

    /// Makes sure the machine has an address to reach Bearman from (DHCP when none).
    fn ensure_network(&mut self, nics: &[NicFacts]) -> impl Future<Output = Result<(), StepError>>;

    /// Listens for LLDP on every NIC in `nics` at once, for at most `wait`; outcomes in
    /// `nics`' order.
    fn listen_lldp(
        &mut self,
        nics: &[String],
        wait: Duration,
    ) -> impl Future<Output = Vec<NicLldp>>;

    /// The in-band IPMI device node, named as on the machine (`/dev/ipmi0`), when there
    /// is one.
    fn bmc_device(&self) -> Option<PathBuf>;
    /// How BMC commands are run.
    fn ipmitool(&self) -> &dyn Ipmitool;

    /// The firmware version of `nic`, as `ethtool -i` shows it; `None` when its driver
    /// gives none (or `N/A`), or does not answer.
    fn nic_firmware(&self, nic: &str) -> Option<String>;

    /// Runs a firmware updater: `argv` as is (no shell), killed with whatever it started
    /// once `timeout` has passed; how it ended and the end of its output. Each output line
    /// is a console line.
    fn run_updater(
        &mut self,
        argv: &[String],
        timeout: Duration,
    ) -> impl Future<Output = UpdaterRun>;

    /// Restarts the machine so new firmware is brought into use. A real machine does not
    /// return on success; a host that returns `Ok` ends stage 1 there.
    fn reboot(&mut self) -> impl Future<Output = Result<(), KexecError>>;

    /// The download directory.
    fn work_dir(&self) -> &Self::WorkDir;

    /// Boots the verified files. A real machine does not return on success; a host that
    /// returns `Ok` ends stage 1 with the files.
    fn kexec(&mut self, files: &KexecFiles) -> impl Future<Output = Result<(), KexecError>>;

    /// Stage 2's network: current state and additive changes.
    fn network(&mut self) -> &mut Self::Network;

    /// `PRETTY_NAME` of the running OS (`/etc/os-release`).
    fn os_release(&self) -> Option<String>;
    /// Seconds since the running kernel booted (`/proc/uptime`).
    fn uptime_s(&self) -> Option<u64>;
}

/// The directory verified downloads go to: files are written as `<name>.part`, synced,
/// and renamed once their size and checksum match, or removed.
pub trait WorkDir {
    type File: AsyncWrite + Unpin;

    /// The directory itself; files are named by paths under it.
    fn path(&self) -> &Path;
    fn create_dir_all(&self) -> impl Future<Output = io::Result<()>>;
    fn create(&self, path: &Path) -> impl Future<Output = io::Result<Self::File>>;
    /// Makes what was written durable (`fsync`); called after the file was flushed.
    fn sync(&self, file: &mut Self::File) -> impl Future<Output = io::Result<()>>;
    fn rename(&self, from: &Path, to: &Path) -> impl Future<Output = io::Result<()>>;
    fn remove(&self, path: &Path) -> impl Future<Output = io::Result<()>>;
}
