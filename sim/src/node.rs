//! A virtual node: what one physical server does from power-on to heartbeats, running the
//! real agent boot-protocol client over turmoil. Many run as tasks inside their rack's
//! turmoil host; each lives for one power epoch and stops the moment its power or OS
//! goes away.

use std::time::Duration;

use bearman_agent::BootClient;
use bearman_proto::{BmcFacts, Heartbeat, InstalledReport, LldpNeighbor, RegisterRequest};

use crate::fleet::{lock, Os, Power, SharedWorld};
use crate::net::TurmoilConnector;
use crate::rng::SimRng;
use crate::scenario::Timing;

/// Where nodes reach the daemon inside the simulation.
pub const DAEMON_URL: &str = "http://daemon:8080";

/// Plausible hardware for node `index` in `rack`, from the canned fixture, with unique
/// serial, MACs and the rack's top-of-rack switch as LLDP neighbour.
pub fn hardware(fixture: &RegisterRequest, index: u32, rack: u32) -> RegisterRequest {
    let mut request = fixture.clone();
    request.serial = format!("SIM{index:06}");
    for (nic_index, nic) in request.nics.iter_mut().enumerate() {
        nic.mac = format!(
            "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            (index >> 24) & 0xff,
            (index >> 16) & 0xff,
            (index >> 8) & 0xff,
            index & 0xff,
            nic_index
        );
        nic.lldp = Some(LldpNeighbor {
            chassis_id: format!("02:00:00:00:{:02x}:{:02x}", (rack >> 8) & 0xff, rack & 0xff),
            port_id: format!("Ethernet{}/{}", nic_index + 1, index % 64 + 1),
            vlan: Some(100),
            system_name: Some(format!("tor-r{rack}-{}", nic_index + 1)),
        });
    }
    request.bmc = Some(BmcFacts {
        mac: format!(
            "06:00:{:02x}:{:02x}:{:02x}:01",
            (index >> 16) & 0xff,
            (index >> 8) & 0xff,
            index & 0xff
        ),
        address: None,
    });
    request
}

fn sleep_ms(ms: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_millis(ms))
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// Runs node `index` forever: waits for power, lives one boot per epoch.
pub async fn supervise(
    world: SharedWorld,
    index: u32,
    timing: Timing,
    fixture: RegisterRequest,
    seed: u64,
) {
    let (mut epochs, rack) = {
        let world = lock(&world);
        let node = &world.nodes[index as usize];
        (node.epoch_tx.subscribe(), node.rack)
    };
    let request = hardware(&fixture, index, rack);
    let mut rng = SimRng::derive(seed, 0x6e6f_6465_0000_0000 | index as u64);
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
                _ = life(&world, index, epoch, &timing, &request, &mut rng) => {}
            }
        }
        if epochs.changed().await.is_err() {
            return;
        }
    }
}

/// Retries `attempt` with exponential backoff until it succeeds. The node's epoch
/// supervisor cancels this future when the machine loses power.
async fn with_retries<T, E: std::fmt::Display, F, Fut>(
    world: &SharedWorld,
    timing: &Timing,
    rng: &mut SimRng,
    mut attempt: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = timing.retry_initial_ms;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(_) => {
                lock(world).requests_failed += 1;
                let jitter = rng.range(0, backoff / 2);
                sleep_ms(backoff + jitter).await;
                backoff = (backoff * 2).min(timing.retry_max_ms);
            }
        }
    }
}

async fn life(
    world: &SharedWorld,
    index: u32,
    epoch: u64,
    timing: &Timing,
    request: &RegisterRequest,
    rng: &mut SimRng,
) {
    let uuid = lock(world).nodes[index as usize].uuid.clone();
    let client = BootClient::new(TurmoilConnector, DAEMON_URL, uuid)
        .expect("static daemon url parses")
        .with_timeout(Duration::from_secs(timing.request_timeout_s));

    // Firmware POST, then iPXE fetches the stage-1 script DHCP pointed it at.
    sleep_ms(rng.range(timing.firmware_s[0], timing.firmware_s[1]) * 1000).await;
    with_retries(world, timing, rng, || client.stage1_script()).await;
    // Stage 1 kernel and initramfs come up.
    sleep_ms(rng.range(timing.stage1_s[0], timing.stage1_s[1]) * 1000).await;
    with_retries(world, timing, rng, || client.prepare_boot(request)).await;
    // kexec into stage 2.
    sleep_ms(rng.range(timing.kexec_s[0], timing.kexec_s[1]) * 1000).await;
    if !lock(world).os_running(index, epoch, now()) {
        return;
    }
    let report = InstalledReport {
        os_release: Some("bearman-sim stage 2".into()),
    };
    with_retries(world, timing, rng, || client.installed(&report)).await;
    let started = now();
    loop {
        let jitter = rng.range(0, timing.heartbeat_jitter_ms);
        sleep_ms(timing.heartbeat_interval_s * 1000 + jitter).await;
        let beat = Heartbeat {
            uptime_s: Some(now().saturating_sub(started).as_secs()),
        };
        let result = client.heartbeat(&beat).await;
        let mut world = lock(world);
        world.heartbeats_sent += 1;
        if result.is_err() {
            world.heartbeats_failed += 1;
        }
    }
}
