//! The simulated machine under the real agent: [`SimHost`] is a virtual node's
//! [`bearman_agent::host::Host`], so the agent's own `run_stage1` and `run_stage2` run on
//! it unchanged.
//!
//! What it models, and how cheaply:
//! - kernel command line: what iPXE booted stage 1 with (the daemon's stage-1 script with
//!   `${uuid}` expanded), then what stage 1 kexec'd stage 2 with (the flavor's);
//! - hardware facts: the node's canned hardware ([`Hardware`]), no LLDP or BMC in them;
//! - DHCP: instant (the simulated network has no addresses to lease);
//! - LLDP: each NIC's top-of-rack switch sends a frame every [`LLDP_INTERVAL`]; listening
//!   starts at a random phase, so each NIC hears its neighbour after a uniform 0–30 s (or
//!   is silent, if the agent waits less than that);
//! - BMC: an in-band ipmitool whose `lan print` shows the node's BMC MAC and which accepts
//!   every `lan set` at once (in-band KCS answers in milliseconds);
//! - downloads: the agent's own verified download, over turmoil from the daemon's
//!   `/images/…`, into a work directory that discards the bytes (they were hashed);
//! - kexec: `timing.kexec_s`, after which the caller decides whether stage 2 comes up;
//! - stage 2: an in-memory network the detail is applied to, a fixed os-release, uptime
//!   from the virtual clock;
//! - console: discarded (the world's counters come from the connection tap in
//!   [`crate::net`]).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use bearman_agent::facts::{Facts, FactsError};
use bearman_agent::firmware::{UpdaterEnd, UpdaterRun};
use bearman_agent::host::{Host, WorkDir};
use bearman_agent::lldp::{NicLldp, Outcome};
use bearman_agent::network::{HostState, Interface, NetAction, ResolvConf, SubnetRoute};
use bearman_agent::stage1::bmc::Ipmitool;
use bearman_agent::stage1::kexec::{KexecError, KexecFiles};
use bearman_agent::stage1::netconf::HostNetwork;
use bearman_agent::stages::StepError;
use bearman_proto::uuid::NodeUuid;
use bearman_proto::{BmcFacts, LldpNeighbor, NicFacts, RegisterRequest};

use crate::rng::SimRng;

/// How often a top-of-rack switch sends LLDP (the common default).
pub const LLDP_INTERVAL: Duration = Duration::from_secs(30);
/// Where stage 1 downloads to, as the agent names the files.
const WORK_DIR: &str = "/run/bearman";
/// Stage 2's `PRETTY_NAME`.
const OS_RELEASE: &str = "bearman-sim stage 2";

/// One node's hardware: what the agent reads from `/sys` and `/proc`, what its switch
/// ports say over LLDP, and its BMC.
#[derive(Clone, Debug)]
pub struct Hardware {
    pub uuid: NodeUuid,
    /// The registration body as the facts give it: no LLDP neighbours, no BMC.
    pub register: RegisterRequest,
    /// (NIC, the neighbour its switch port announces).
    pub neighbours: Vec<(String, LldpNeighbor)>,
    pub bmc: BmcFacts,
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// A virtual node as the agent sees it. One per node, kept across boots; [`SimHost::power_on`]
/// resets what a boot changes.
pub struct SimHost {
    hardware: Hardware,
    cmdline: String,
    rng: SimRng,
    kexec_s: [u64; 2],
    ipmitool: SimIpmitool,
    work_dir: SimWorkDir,
    network: SimNetwork,
    /// What stage 2's network looks like before the agent changes it.
    network_at_boot: HostState,
    booted_at: Duration,
    /// The board's BIOS as a firmware rollout sees and rewrites it, in runs that have one.
    firmware: Option<SimFirmware>,
}

/// A board's BIOS flash, simulated: the updater runs for a drawn time; on a board the
/// bundle fails on it exits 1, elsewhere it writes the version its command names. The
/// version the board reads is the world's ([`crate::fleet::FirmwareTruth`]).
pub struct SimFirmware {
    pub world: crate::fleet::SharedWorld,
    pub index: u32,
    pub flash_s: [u64; 2],
}

/// The simulated updater's argument vector: `sim-flash {file} <version it writes>`.
pub const SIM_UPDATER: &str = "sim-flash";

impl SimHost {
    pub fn new(hardware: Hardware, rng: SimRng, kexec_s: [u64; 2]) -> SimHost {
        let ipmitool = SimIpmitool {
            lan_print: format!(
                "IP Address Source       : DHCP Address\nIP Address              : 0.0.0.0\nMAC Address             : {}\n",
                hardware.bmc.mac
            ),
        };
        let mut interfaces: Vec<Interface> = hardware
            .register
            .nics
            .iter()
            .map(|nic| Interface {
                name: nic.name.clone(),
                mtu: 1500,
                physical: true,
                addresses: Vec::new(),
            })
            .chain(std::iter::once(Interface {
                name: "lo".into(),
                mtu: 65536,
                physical: false,
                addresses: vec!["127.0.0.1/8".into()],
            }))
            .collect();
        interfaces.sort_by(|a, b| a.name.cmp(&b.name));
        let network_at_boot = HostState {
            hostname: "localhost".into(),
            interfaces,
            has_default_route: true,
            subnet_routes: Vec::new(),
            resolv_conf: ResolvConf::Missing,
        };
        SimHost {
            hardware,
            cmdline: String::new(),
            rng,
            kexec_s,
            ipmitool,
            work_dir: SimWorkDir {
                path: PathBuf::from(WORK_DIR),
            },
            network: SimNetwork {
                state: network_at_boot.clone(),
            },
            network_at_boot,
            booted_at: Duration::ZERO,
            firmware: None,
        }
    }

    /// Gives the board a BIOS a firmware rollout flashes.
    pub fn with_firmware(mut self, firmware: SimFirmware) -> SimHost {
        self.firmware = Some(firmware);
        self
    }

    /// The node's random draws (boot phase durations, LLDP phases).
    pub fn rng(&mut self) -> &mut SimRng {
        &mut self.rng
    }

    /// Power came on: forget what the last boot changed; stage 1 will boot with `cmdline`
    /// (set once iPXE has it).
    pub fn power_on(&mut self) {
        self.cmdline.clear();
        self.network.state.clone_from(&self.network_at_boot);
    }

    /// iPXE boots stage 1 with this command line.
    pub fn boot_stage1(&mut self, cmdline: String) {
        self.cmdline = cmdline;
    }

    /// The kexec'd kernel is up with `files`' command line: stage 2 starts now.
    pub fn boot_stage2(&mut self, files: &KexecFiles) {
        self.cmdline.clone_from(&files.cmdline);
        self.booted_at = now();
    }
}

impl Host for SimHost {
    type WorkDir = SimWorkDir;
    type Network = SimNetwork;

    fn say(&self, _line: &str) {}

    fn cmdline_source(&self) -> String {
        "/proc/cmdline".into()
    }

    fn read_cmdline(&self) -> io::Result<String> {
        Ok(self.cmdline.clone())
    }

    fn facts(&self) -> Result<Facts, FactsError> {
        let mut register = self.hardware.register.clone();
        if let Some(firmware) = &self.firmware {
            register.firmware.bios = crate::fleet::lock(&firmware.world)
                .firmware
                .as_ref()
                .map(|truth| truth.bios[firmware.index as usize].clone());
        }
        Ok(Facts {
            uuid: self.hardware.uuid.clone(),
            register,
        })
    }

    async fn ensure_network(&mut self, _nics: &[NicFacts]) -> Result<(), StepError> {
        Ok(())
    }

    async fn listen_lldp(&mut self, nics: &[String], wait: Duration) -> Vec<NicLldp> {
        let interval_ms = LLDP_INTERVAL.as_millis() as u64;
        let mut longest = Duration::ZERO;
        let mut heard = Vec::with_capacity(nics.len());
        for nic in nics {
            let neighbour = self
                .hardware
                .neighbours
                .iter()
                .find(|(name, _)| name == nic)
                .map(|(_, neighbour)| neighbour);
            let arrives = Duration::from_millis(self.rng.range(0, interval_ms));
            let outcome = match neighbour {
                Some(neighbour) if arrives <= wait => {
                    longest = longest.max(arrives);
                    Outcome::Heard(neighbour.clone())
                }
                _ => {
                    longest = wait;
                    Outcome::Silent {
                        wait,
                        refused: None,
                    }
                }
            };
            heard.push(NicLldp {
                nic: nic.clone(),
                outcome,
            });
        }
        tokio::time::sleep(longest).await;
        heard
    }

    fn bmc_device(&self) -> Option<PathBuf> {
        Some(PathBuf::from("/dev/ipmi0"))
    }

    fn ipmitool(&self) -> &dyn Ipmitool {
        &self.ipmitool
    }

    fn nic_firmware(&self, _nic: &str) -> Option<String> {
        None
    }

    async fn run_updater(&mut self, argv: &[String], timeout: Duration) -> UpdaterRun {
        let not_run = |why: String| UpdaterRun {
            ended: UpdaterEnd::NotRun(why),
            output_tail: String::new(),
        };
        let Some(firmware) = &self.firmware else {
            return not_run("this simulated board has no flashable firmware".into());
        };
        let (Some(SIM_UPDATER), Some(version)) = (argv.first().map(String::as_str), argv.get(2))
        else {
            return not_run(format!("{argv:?}: not `{SIM_UPDATER} FILE VERSION`"));
        };
        let (world, index) = (firmware.world.clone(), firmware.index);
        let fails = crate::fleet::lock(&world)
            .firmware
            .as_ref()
            .is_some_and(|truth| truth.fails[index as usize]);
        let seconds = self.rng.range(firmware.flash_s[0], firmware.flash_s[1]);
        crate::fleet::lock(&world).flash_start(index, now());
        if Duration::from_secs(seconds) > timeout {
            tokio::time::sleep(timeout).await;
            crate::fleet::lock(&world).flash_end(index, now(), None);
            return UpdaterRun {
                ended: UpdaterEnd::TimedOut(timeout),
                output_tail: "sim-flash: writing the BIOS region\n".into(),
            };
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        if fails {
            crate::fleet::lock(&world).flash_end(index, now(), None);
            UpdaterRun {
                ended: UpdaterEnd::Exited(1),
                output_tail: "sim-flash: image rejected by this board's flash controller\n".into(),
            }
        } else {
            crate::fleet::lock(&world).flash_end(index, now(), Some(version));
            UpdaterRun {
                ended: UpdaterEnd::Exited(0),
                output_tail: format!("sim-flash: BIOS {version} written\n"),
            }
        }
    }

    async fn reboot(&mut self) -> Result<(), KexecError> {
        let Some(firmware) = &self.firmware else {
            return Err(KexecError::Restart(io::Error::other(
                "this simulated board has no flashable firmware to restart for",
            )));
        };
        crate::fleet::lock(&firmware.world).reboot(firmware.index, now(), "firmware update");
        Ok(())
    }

    fn work_dir(&self) -> &SimWorkDir {
        &self.work_dir
    }

    async fn kexec(&mut self, _files: &KexecFiles) -> Result<(), KexecError> {
        let seconds = self.rng.range(self.kexec_s[0], self.kexec_s[1]);
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        Ok(())
    }

    fn network(&mut self) -> &mut SimNetwork {
        &mut self.network
    }

    fn os_release(&self) -> Option<String> {
        Some(OS_RELEASE.into())
    }

    fn uptime_s(&self) -> Option<u64> {
        Some(now().saturating_sub(self.booted_at).as_secs())
    }
}

/// In-band ipmitool on a simulated node.
pub struct SimIpmitool {
    lan_print: String,
}

impl Ipmitool for SimIpmitool {
    fn available(&self) -> bool {
        true
    }

    fn run<'a>(
        &'a self,
        args: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        let print = args.get(1).is_some_and(|word| word == "print");
        Box::pin(async move {
            Ok(if print {
                self.lan_print.clone()
            } else {
                String::new()
            })
        })
    }
}

/// A download directory that keeps nothing: the agent hashes what it receives, and the
/// simulation needs no bytes after that.
pub struct SimWorkDir {
    path: PathBuf,
}

impl WorkDir for SimWorkDir {
    type File = tokio::io::Sink;

    fn path(&self) -> &Path {
        &self.path
    }

    async fn create_dir_all(&self) -> io::Result<()> {
        Ok(())
    }

    async fn create(&self, _path: &Path) -> io::Result<tokio::io::Sink> {
        Ok(tokio::io::sink())
    }

    async fn sync(&self, _file: &mut tokio::io::Sink) -> io::Result<()> {
        Ok(())
    }

    async fn rename(&self, _from: &Path, _to: &Path) -> io::Result<()> {
        Ok(())
    }

    async fn remove(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }
}

/// Stage 2's network as a value the agent's actions change.
pub struct SimNetwork {
    pub state: HostState,
}

impl HostNetwork for SimNetwork {
    async fn state(&self) -> Result<HostState, String> {
        Ok(self.state.clone())
    }

    async fn apply(&mut self, action: &NetAction) -> Result<(), String> {
        match action {
            NetAction::SetHostname(name) => self.state.hostname.clone_from(name),
            NetAction::WriteResolvConf { contents } => {
                self.state.resolv_conf = ResolvConf::File(contents.clone())
            }
            NetAction::SetMtu { dev, mtu } => self.device(dev)?.mtu = *mtu,
            NetAction::AddAddress { dev, cidr } => self.device(dev)?.addresses.push(cidr.clone()),
            NetAction::PreferSource { dev, subnet, src } => {
                self.device(dev)?;
                // `ip route prepend`: ahead of the routes already there.
                self.state.subnet_routes.insert(
                    0,
                    SubnetRoute {
                        subnet: subnet.clone(),
                        dev: dev.clone(),
                        src: Some(src.clone()),
                    },
                );
            }
            NetAction::AddDefaultRoute { .. } => self.state.has_default_route = true,
        }
        Ok(())
    }
}

impl SimNetwork {
    fn device(&mut self, dev: &str) -> Result<&mut Interface, String> {
        self.state
            .interfaces
            .iter_mut()
            .find(|interface| interface.name == dev)
            .ok_or_else(|| format!("Cannot find device \"{dev}\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(seed: u64) -> SimHost {
        let fixture: RegisterRequest =
            serde_json::from_str(include_str!("../../fixtures/hardware/r640.json")).unwrap();
        let uuid = NodeUuid::from_index(crate::fleet::UUID_NAMESPACE, 7);
        SimHost::new(
            crate::node::hardware(&fixture, uuid, 7, 1),
            SimRng::new(seed),
            [5, 15],
        )
    }

    /// Runs `body` on turmoil's virtual clock; returns how much virtual time it took.
    fn on_virtual_clock<F>(body: F) -> Duration
    where
        F: Future<Output = ()> + 'static,
    {
        let mut sim = turmoil::Builder::new()
            .simulation_duration(Duration::from_secs(600))
            .build();
        let took = std::rc::Rc::new(std::cell::Cell::new(Duration::ZERO));
        let out = took.clone();
        sim.client("node", async move {
            let start = tokio::time::Instant::now();
            body.await;
            out.set(start.elapsed());
            Ok(())
        });
        sim.run().unwrap();
        took.get()
    }

    #[test]
    fn every_nic_hears_its_switch_within_one_lldp_interval() {
        for seed in 0..20 {
            let took = on_virtual_clock(async move {
                let mut host = host(seed);
                let nics = vec!["ens1f0".to_string(), "ens1f1".to_string()];
                let heard = host.listen_lldp(&nics, Duration::from_secs(31)).await;
                let names: Vec<Option<String>> = heard
                    .iter()
                    .map(|nic| nic.neighbor().and_then(|n| n.system_name.clone()))
                    .collect();
                assert_eq!(
                    names,
                    [Some("tor-r1-1".into()), Some("tor-r1-2".into())],
                    "seed {seed}: {heard:?}"
                );
            });
            assert!(took <= LLDP_INTERVAL, "seed {seed}: listened {took:?}");
        }
    }

    #[test]
    fn a_short_wait_can_miss_the_frame_and_then_waits_it_out() {
        let mut silent = 0;
        for seed in 0..20 {
            let took = on_virtual_clock(async move {
                let mut host = host(seed);
                let heard = host
                    .listen_lldp(&["ens1f0".to_string()], Duration::from_secs(3))
                    .await;
                if heard[0].neighbor().is_none() {
                    assert_eq!(
                        heard[0].console_line(),
                        "lldp: no LLDP frame on ens1f0 within 3 s"
                    );
                }
            });
            assert!(took <= Duration::from_secs(3), "seed {seed}: {took:?}");
            if took == Duration::from_secs(3) {
                silent += 1;
            }
        }
        assert!(
            silent > 10,
            "a 3 s wait should usually miss a 30 s interval: {silent}/20"
        );
    }

    #[test]
    fn the_bmc_shows_the_nodes_mac_and_takes_settings() {
        let host = host(1);
        let print = block_on(
            host.ipmitool()
                .run(&["lan".into(), "print".into(), "1".into()]),
        );
        let facts = bearman_agent::bmc::parse_lan_print(&print.unwrap()).unwrap();
        assert_eq!(facts, host.hardware.bmc);
        let set = block_on(
            host.ipmitool()
                .run(&["lan".into(), "set".into(), "1".into()]),
        );
        assert_eq!(set, Ok(String::new()));
    }

    #[test]
    fn stage_2_changes_the_in_memory_network_and_a_new_boot_forgets_them() {
        let mut host = host(1);
        let add = NetAction::AddAddress {
            dev: "ens1f0".into(),
            cidr: "10.64.0.11/12".into(),
        };
        block_on(host.network().apply(&add)).unwrap();
        block_on(host.network().apply(&NetAction::SetHostname("hv-1".into()))).unwrap();
        let state = block_on(host.network().state()).unwrap();
        assert_eq!(state.hostname, "hv-1");
        assert_eq!(state.interfaces[0].addresses, ["10.64.0.11/12"]);
        let missing = NetAction::SetMtu {
            dev: "bond0".into(),
            mtu: 9000,
        };
        assert!(block_on(host.network().apply(&missing)).is_err());
        host.power_on();
        assert_eq!(
            block_on(host.network().state()).unwrap().hostname,
            "localhost"
        );
    }

    /// Runs a future that never waits on a timer or socket to completion.
    fn block_on<T>(future: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }
}
