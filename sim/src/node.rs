//! A virtual node: what one physical server does from power-on to heartbeats. The
//! firmware part (POST, iPXE fetching the stage-1 script) is simulated here; from the
//! stage-1 kernel on, the node runs the real agent (`run_stage1`, then `run_stage2`) on a
//! [`SimHost`] over turmoil. Many run as tasks inside their rack's turmoil host; each
//! lives for one power epoch and stops the moment its power or OS goes away.

use std::time::Duration;

use bearman_agent::plan::Backoff;
use bearman_agent::stages::{self, Options, Stage2Options};
use bearman_agent::BootClient;
use bearman_proto::uuid::NodeUuid;
use bearman_proto::{BmcFacts, LldpNeighbor, RegisterRequest};

use crate::fleet::{lock, Os, Power, SharedWorld};
use crate::host::{Hardware, SimHost};
use crate::net::TapConnector;
use crate::rng::SimRng;
use crate::scenario::Timing;

/// Where nodes reach the daemon inside the simulation.
/// The name the nodes reach the daemon by (every replica, in a clustered run).
pub const DAEMON_HOST: &str = "daemon";
pub const DAEMON_URL: &str = "http://daemon:8080";

/// Plausible hardware for node `index` in `rack`, from the canned fixture, with unique
/// serial, MACs, the rack's top-of-rack switches as LLDP neighbours and a BMC MAC.
pub fn hardware(fixture: &RegisterRequest, uuid: NodeUuid, index: u32, rack: u32) -> Hardware {
    let mut register = fixture.clone();
    register.serial = format!("SIM{index:06}");
    register.bmc = None;
    let mut neighbours = Vec::with_capacity(register.nics.len());
    for (nic_index, nic) in register.nics.iter_mut().enumerate() {
        nic.mac = format!(
            "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            (index >> 24) & 0xff,
            (index >> 16) & 0xff,
            (index >> 8) & 0xff,
            index & 0xff,
            nic_index
        );
        nic.lldp = None;
        neighbours.push((
            nic.name.clone(),
            LldpNeighbor {
                chassis_id: format!("02:00:00:00:{:02x}:{:02x}", (rack >> 8) & 0xff, rack & 0xff),
                port_id: format!("Ethernet{}/{}", nic_index + 1, index % 64 + 1),
                vlan: Some(100),
                system_name: Some(format!("tor-r{rack}-{}", nic_index + 1)),
            },
        ));
    }
    let bmc = BmcFacts {
        mac: format!(
            "06:00:{:02x}:{:02x}:{:02x}:01",
            (index >> 16) & 0xff,
            (index >> 8) & 0xff,
            index & 0xff
        ),
        address: None,
    };
    Hardware {
        uuid,
        register,
        neighbours,
        bmc,
    }
}

fn sleep_s(seconds: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_secs(seconds))
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// Seed streams (see [`SimRng::derive`]).
const NODE_STREAM: u64 = 0x6e6f_6465_0000_0000;
const AGENT_SALT_STREAM: u64 = 0x6167_656e_7400_0000;
const FIRMWARE_STREAM: u64 = 0x6970_7865_0000_0000;

/// Runs node `index` forever: waits for power, lives one boot per epoch.
pub async fn supervise(
    world: SharedWorld,
    index: u32,
    timing: Timing,
    fixture: RegisterRequest,
    seed: u64,
    flash_s: Option<[u64; 2]>,
) {
    let (mut epochs, rack, uuid) = {
        let world = lock(&world);
        let node = &world.nodes[index as usize];
        (node.epoch_tx.subscribe(), node.rack, node.uuid.clone())
    };
    let mut host = SimHost::new(
        hardware(&fixture, uuid, index, rack),
        SimRng::derive(seed, NODE_STREAM | index as u64),
        timing.kexec_s,
    );
    if let Some(flash_s) = flash_s {
        host = host.with_firmware(crate::host::SimFirmware {
            world: world.clone(),
            index,
            flash_s,
        });
    }
    let boot = Boot::new(&timing, seed, index);
    loop {
        let epoch = *epochs.borrow_and_update();
        let should_boot = {
            let world = lock(&world);
            let node = &world.nodes[index as usize];
            node.power == Power::On && node.os == Os::Booting && node.epoch == epoch
        };
        if should_boot {
            tokio::select! {
                biased;
                _ = epochs.changed() => continue,
                _ = life(&world, index, epoch, &timing, &boot, &mut host) => {}
            }
        }
        if epochs.changed().await.is_err() {
            return;
        }
    }
}

/// What every boot of one node is run with: the agent's options, derived from the
/// scenario's timing, and the firmware's retry seed.
struct Boot {
    stage1: Options,
    stage2: Stage2Options,
    firmware_seed: u64,
}

impl Boot {
    fn new(timing: &Timing, seed: u64, index: u32) -> Boot {
        let backoff_start = Duration::from_millis(timing.retry_initial_ms);
        let backoff_cap = Duration::from_millis(timing.retry_max_ms);
        let request_timeout = Duration::from_secs(timing.request_timeout_s);
        // The agent seeds its jitter from the node's uuid; the run's seed is mixed in so
        // that different seeds give different runs.
        let seed_salt = SimRng::derive(seed, AGENT_SALT_STREAM).next_u64();
        Boot {
            stage1: Options {
                backoff_start,
                backoff_cap,
                seed_salt,
                request_timeout,
                ..Options::default()
            },
            stage2: Stage2Options {
                heartbeat_period: Duration::from_secs(timing.heartbeat_interval_s),
                backoff_start,
                backoff_cap,
                seed_salt,
                request_timeout,
                ..Stage2Options::default()
            },
            firmware_seed: SimRng::derive(seed, FIRMWARE_STREAM | index as u64).next_u64(),
        }
    }
}

/// iPXE: `GET /ipxe` until it answers with a script that boots a kernel, retried with
/// the agent's backoff; returns the stage-1 kernel command line with `${uuid}` expanded,
/// as iPXE passes it.
async fn firmware(client: &BootClient<TapConnector>, boot: &Boot, timing: &Timing) -> String {
    let mut backoff = Backoff::new(
        boot.stage1.backoff_start,
        boot.stage1.backoff_cap,
        boot.firmware_seed,
    );
    loop {
        if let Ok(script) = client.stage1_script().await {
            if let Some(kernel) = script.kernel {
                return kernel.args.replace("${uuid}", client.uuid().as_str());
            }
        }
        let delay = backoff
            .next()
            .unwrap_or(Duration::from_millis(timing.retry_max_ms));
        tokio::time::sleep(delay).await;
    }
}

async fn life(
    world: &SharedWorld,
    index: u32,
    epoch: u64,
    timing: &Timing,
    boot: &Boot,
    host: &mut SimHost,
) {
    host.power_on();
    let connector = TapConnector::new(world.clone(), index);
    // Firmware POST, then iPXE fetches the stage-1 script DHCP pointed it at.
    let post_s = host.rng().range(timing.firmware_s[0], timing.firmware_s[1]);
    sleep_s(post_s).await;
    let uuid = lock(world).nodes[index as usize].uuid.clone();
    let client = BootClient::new(connector.clone(), DAEMON_URL, uuid)
        .expect("static daemon url parses")
        .with_timeout(boot.stage1.request_timeout);
    let cmdline = firmware(&client, boot, timing).await;
    host.boot_stage1(cmdline);
    // The stage-1 kernel and initramfs come up; then the real agent runs, up to and
    // including kexec (the host's kexec takes timing.kexec_s).
    let kernel_s = host.rng().range(timing.stage1_s[0], timing.stage1_s[1]);
    sleep_s(kernel_s).await;
    let Ok(files) = stages::run_stage1(&boot.stage1, &connector, host).await else {
        // Only a bounded run gives up; the simulator's retries forever.
        return;
    };
    if !lock(world).os_running(index, epoch, now()) {
        return;
    }
    host.boot_stage2(&files);
    // Stage 2 runs until the epoch ends (it returns only if its command line is unusable).
    let _ = stages::run_stage2(&boot.stage2, &TapConnector::new(world.clone(), index), host).await;
}
