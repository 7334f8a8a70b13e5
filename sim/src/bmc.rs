//! The simulated out-of-band network: one turmoil host ("bmc") standing for every BMC in
//! the fleet, and a client implementing the daemon's `Bmc` trait against it.
//!
//! Each BMC is a small state machine over the fleet's ground truth: power changes take a
//! transition time (readback shows the old state meanwhile), calls have latency, and a
//! scenario can make BMCs time out, lock up after a burst of calls, or report stale power.
//! An NMI crashes a running stage 2 at once, as the crash fault does.

use std::time::Duration;

use async_trait::async_trait;
use bearman::bmc::{Bmc, BmcError, PowerState};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::fleet::{lock, Os, Power, SharedWorld};
use crate::rng::SimRng;
use crate::scenario::BmcBehaviour;

pub const BMC_HOST: &str = "bmc";
pub const BMC_PORT: u16 = 623;
/// Longest request line the fabric reads; anything longer is garbage.
const LINE_BYTES_MAX: usize = 256;

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// Serves every BMC. Runs as the "bmc" turmoil host's software.
pub async fn serve(world: SharedWorld, behaviour: BmcBehaviour, seed: u64) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", BMC_PORT)).await?;
    let mut connection_index: u64 = 0;
    loop {
        let (stream, peer) = listener.accept().await?;
        connection_index += 1;
        let world = world.clone();
        let behaviour = behaviour.clone();
        let rng = SimRng::derive(seed, 0x626d_6300_0000_0000 ^ connection_index);
        let sender = turmoil::reverse_lookup(peer.ip());
        tokio::task::spawn_local(async move {
            let _ = handle(stream, sender, world, behaviour, rng).await;
        });
    }
}

async fn handle(
    stream: turmoil::net::TcpStream,
    sender: Option<String>,
    world: SharedWorld,
    behaviour: BmcBehaviour,
    mut rng: SimRng,
) -> std::io::Result<()> {
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::new(read).take(LINE_BYTES_MAX as u64);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut words = line.split_whitespace();
    let (op, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let Ok(index) = target.parse::<u32>() else {
        write.write_all(b"ERR bad request\n").await?;
        return Ok(());
    };
    let answer = {
        let mut world = lock(&world);
        if matches!(op, "ON" | "OFF" | "SOFT" | "PXE" | "NMI") {
            // A power command is an action the moment it reaches the BMC, answered or not.
            world.judge_action(sender, &format!("bmc {op} {target}"), now());
        }
        if index as usize >= world.nodes.len() {
            Some("ERR no such bmc".to_string())
        } else {
            let at = now();
            let state = &mut world.bmcs[index as usize];
            let locked = state.locked_until.is_some_and(|until| at < until);
            if !locked && behaviour.burst_limit > 0 {
                let window = Duration::from_secs(behaviour.burst_window_s);
                state
                    .recent_calls
                    .retain(|call| at.saturating_sub(*call) < window);
                state.recent_calls.push(at);
                if state.recent_calls.len() as u32 > behaviour.burst_limit {
                    state.locked_until = Some(at + Duration::from_secs(behaviour.lockup_s));
                    state.recent_calls.clear();
                    let name = world.node_name(index);
                    world.trace.record(at, format!("bmc_lockup {name} (burst)"));
                }
            }
            let locked = world.bmcs[index as usize]
                .locked_until
                .is_some_and(|until| at < until);
            if locked || world.bmc_faults.timeouts {
                None
            } else {
                Some(String::new())
            }
        }
    };
    match answer {
        // A hung BMC: hold the connection open and never answer; the caller's timeout
        // is what saves it.
        None => std::future::pending::<()>().await,
        Some(error) if !error.is_empty() => {
            write.write_all(format!("{error}\n").as_bytes()).await?;
            return Ok(());
        }
        Some(_) => {}
    }
    tokio::time::sleep(Duration::from_millis(
        rng.range(behaviour.latency_ms[0], behaviour.latency_ms[1]),
    ))
    .await;
    let transition = Duration::from_millis(behaviour.transition_ms);
    let reply = match op {
        "STATUS" => {
            let world = lock(&world);
            let truth = world.nodes[index as usize].power;
            let reported = match world.bmcs[index as usize].stale_power {
                Some(stale) if world.bmc_faults.stale_readback => stale,
                _ => truth,
            };
            format!("OK {}", if reported == Power::On { "on" } else { "off" })
        }
        "SOFT" => {
            // The ACPI power button: only a running operating system obeys, after a while.
            let obeys = lock(&world).nodes[index as usize].os == Os::Running;
            if obeys {
                let world = world.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(transition * 2).await;
                    lock(&world).power_off(index, now(), "bmc clean shutdown");
                });
            }
            "OK accepted".to_string()
        }
        "ON" | "OFF" => {
            let turn_on = op == "ON";
            {
                let mut world = lock(&world);
                if world.bmc_faults.stale_readback {
                    let before = world.nodes[index as usize].power;
                    world.bmcs[index as usize].stale_power = Some(before);
                }
            }
            let world = world.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(transition).await;
                let mut world = lock(&world);
                if turn_on {
                    world.power_on(index, now(), "bmc");
                } else {
                    world.power_off(index, now(), "bmc");
                }
            });
            "OK accepted".to_string()
        }
        "PXE" => {
            lock(&world).nodes[index as usize].next_boot_pxe = true;
            "OK".to_string()
        }
        // A diagnostic interrupt (a chaos drill's `kernel_panic`): the stage-2 kernel runs
        // with `unknown_nmi_panic=1`, so it panics at once, exactly as a crash fault.
        // Firmware and stage 1 do not (stage 1's command line has no such flag: Linux logs
        // the unknown NMI and carries on), nor does a kernel that already panicked; a host
        // without power has no CPU to interrupt, and the BMC says so.
        "NMI" => {
            let mut world = lock(&world);
            let node = &world.nodes[index as usize];
            match (node.power, node.os) {
                (Power::Off, _) => "ERR power is off".to_string(),
                (Power::On, Os::Running) => {
                    let at = now();
                    let name = world.node_name(index);
                    world.trace.record(at, format!("bmc_nmi {name}"));
                    world.crash(index, at);
                    "OK accepted".to_string()
                }
                (Power::On, Os::Booting | Os::Crashed | Os::Off) => "OK accepted".to_string(),
            }
        }
        _ => "ERR unknown operation".to_string(),
    };
    write.write_all(format!("{reply}\n").as_bytes()).await?;
    Ok(())
}

/// The daemon-side driver for a simulated BMC, implementing the production `Bmc` trait.
pub struct SimBmc {
    pub node_index: u32,
    pub timeout: Duration,
}

impl SimBmc {
    async fn call(&self, op: &'static str) -> Result<String, BmcError> {
        let bmc = format!("sim-bmc-{}", self.node_index);
        let request = format!("{op} {}", self.node_index);
        let exchange = crate::net::line_exchange(BMC_HOST, BMC_PORT, &request);
        let line = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| BmcError::Timeout {
                bmc: bmc.clone(),
                operation: op,
            })?
            .map_err(|error| BmcError::Failed {
                bmc: bmc.clone(),
                operation: op,
                detail: error.to_string(),
            })?;
        let line = line.trim();
        match line.strip_prefix("OK") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => Err(BmcError::Failed {
                bmc,
                operation: op,
                detail: if line.is_empty() {
                    "connection closed without an answer".into()
                } else {
                    line.to_string()
                },
            }),
        }
    }
}

#[async_trait]
impl Bmc for SimBmc {
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        match self.call("STATUS").await?.as_str() {
            "on" => Ok(PowerState::On),
            "off" => Ok(PowerState::Off),
            other => Err(BmcError::Failed {
                bmc: format!("sim-bmc-{}", self.node_index),
                operation: "STATUS",
                detail: format!("unparseable power state {other:?}"),
            }),
        }
    }

    async fn power_on(&self) -> Result<(), BmcError> {
        self.call("ON").await.map(|_| ())
    }
    async fn power_off(&self) -> Result<(), BmcError> {
        self.call("OFF").await.map(|_| ())
    }

    async fn power_off_soft(&self) -> Result<(), BmcError> {
        self.call("SOFT").await.map(|_| ())
    }

    async fn set_next_boot_pxe(&self) -> Result<(), BmcError> {
        self.call("PXE").await.map(|_| ())
    }

    fn supports_nmi(&self) -> bool {
        true
    }

    async fn inject_nmi(&self) -> Result<(), BmcError> {
        self.call("NMI").await.map(|_| ())
    }
}

/// The daemon's `BmcProvider` inside the simulation: every simulated node's BMC is on the
/// fabric host, addressed by node index, behind the same guards as production drivers
/// (one call at a time per BMC, a fleet-wide limit, bounded calls).
pub struct SimBmcs {
    pub timeout: Duration,
    guards: bearman::bmc::guard::Guards,
}

impl SimBmcs {
    pub fn new(timeout: Duration) -> Self {
        SimBmcs {
            timeout,
            guards: bearman::bmc::guard::Guards::new(
                32,
                bearman::bmc::guard::GuardLimits {
                    queue_timeout: Duration::from_secs(60),
                    call_timeout: timeout + Duration::from_secs(1),
                },
            ),
        }
    }

    /// Counts and times the daemon's BMC calls in its `metrics`, as production does.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<bearman::telemetry::Metrics>) -> Self {
        self.guards = self.guards.with_metrics(metrics);
        self
    }
}

impl bearman::bmc::BmcProvider for SimBmcs {
    fn bmc_for(
        &self,
        node: &bearman::core::model::Node,
    ) -> Result<std::sync::Arc<dyn Bmc>, bearman::bmc::BmcError> {
        let index =
            crate::fleet::index_of(&node.uuid).ok_or_else(|| bearman::bmc::BmcError::NoDriver {
                node: node.uuid.to_string(),
                detail: "not a simulated node".into(),
            })?;
        let name = format!("sim-bmc-{index}");
        let driver = std::sync::Arc::new(SimBmc {
            node_index: index,
            timeout: self.timeout,
        });
        Ok(std::sync::Arc::new(
            self.guards.guard(&name, &name, "sim", driver),
        ))
    }
}
