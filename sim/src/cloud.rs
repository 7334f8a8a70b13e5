//! The simulated cloud: one turmoil host ("cloud") serving a Nova-like API over the fleet's
//! ground truth, and a client implementing the daemon's `Cloud` trait against it.
//!
//! Like Nova, evacuation is refused (`ComputeServiceInUse`) while the source host's
//! compute service still looks alive (for `service_down_time` after it stopped
//! reporting) unless the service was forced down; and evacuating from a host that is in
//! fact still running leaves the VM running twice, which the invariant checker sees.

use std::time::Duration;

use async_trait::async_trait;
use bearman::cloud::{Cloud, CloudError, VmStatus};
use bearman::core::registration::default_hostname;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::fleet::{lock, SharedWorld, World};

pub const CLOUD_HOST: &str = "cloud";
pub const CLOUD_PORT: u16 = 8774;
const LINE_BYTES_MAX: usize = 256;

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

fn host_index(world: &World, hostname: &str) -> Option<u32> {
    world
        .nodes
        .iter()
        .find(|node| default_hostname(&node.uuid) == hostname)
        .map(|node| node.index)
}

/// Serves the cloud API. Runs as the "cloud" turmoil host's software.
pub async fn serve(world: SharedWorld) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", CLOUD_PORT)).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let world = world.clone();
        let sender = turmoil::reverse_lookup(peer.ip());
        tokio::task::spawn_local(async move {
            let _ = handle(stream, sender, world).await;
        });
    }
}

fn answer(world: &mut World, op: &str, argument: &str) -> String {
    let at = now();
    match op {
        "VMS" | "FORCE_DOWN" | "SERVICE" => {
            let Some(index) = host_index(world, argument) else {
                return format!("ERR 404 no compute host {argument}");
            };
            match op {
                "VMS" => {
                    let ids: Vec<String> = world
                        .vms_assigned_to(index)
                        .map(|id| id.to_string())
                        .collect();
                    format!("OK {}", ids.join(","))
                }
                "FORCE_DOWN" => {
                    world.forced_down.insert(index);
                    let name = world.node_name(index);
                    world.trace.record(at, format!("force_down {name}"));
                    "OK".into()
                }
                _ => format!(
                    "OK {}",
                    if world.service_alive(index, at) {
                        "up"
                    } else {
                        "down"
                    }
                ),
            }
        }
        "EVACUATE" => match argument.parse::<u32>() {
            Ok(vm) => match world.evacuate(vm, at) {
                Ok(target) => format!(
                    "OK {}",
                    default_hostname(&world.nodes[target as usize].uuid)
                ),
                Err(error) => format!("ERR 409 {error}"),
            },
            Err(_) => "ERR 400 bad vm id".into(),
        },
        // Like Nova's `GET /servers/{id}`: the host the cloud has it on, and ACTIVE only
        // when an instance really runs there (BUILD while that host boots, ERROR else).
        "STATUS" => match argument
            .parse::<u32>()
            .ok()
            .and_then(|id| world.vms.get(&id))
        {
            Some(vm) => {
                let host = &world.nodes[vm.assigned as usize];
                let status = if vm.instances.contains(&vm.assigned) {
                    "ACTIVE"
                } else if host.os == crate::fleet::Os::Booting {
                    "BUILD"
                } else {
                    "ERROR"
                };
                format!("OK {} {status}", default_hostname(&host.uuid))
            }
            None => "ERR 404 no such vm".into(),
        },
        _ => "ERR 400 unknown operation".into(),
    }
}

async fn handle(
    stream: turmoil::net::TcpStream,
    sender: Option<String>,
    world: SharedWorld,
) -> std::io::Result<()> {
    let (read, mut write) = tokio::io::split(stream);
    let mut line = String::new();
    BufReader::new(read)
        .take(LINE_BYTES_MAX as u64)
        .read_line(&mut line)
        .await?;
    let mut words = line.split_whitespace();
    let (op, argument) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let reply = {
        let mut world = lock(&world);
        if matches!(op, "EVACUATE" | "FORCE_DOWN") {
            world.judge_action(sender, &format!("cloud {op} {argument}"), now());
        }
        answer(&mut world, op, argument)
    };
    write.write_all(format!("{reply}\n").as_bytes()).await
}

/// The daemon-side driver for the simulated cloud, implementing the production trait.
pub struct SimCloud {
    pub timeout: Duration,
}

impl SimCloud {
    async fn call(&self, op: &str, argument: &str) -> Result<String, CloudError> {
        let request = format!("{op} {argument}");
        let exchange = crate::net::line_exchange(CLOUD_HOST, CLOUD_PORT, &request);
        let line = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| CloudError::Api(format!("{op} {argument}: timed out")))?
            .map_err(|error| CloudError::Api(format!("{op} {argument}: {error}")))?;
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("OK") {
            return Ok(rest.trim().to_string());
        }
        if line.contains("ComputeServiceInUse") {
            return Err(CloudError::ServiceInUse {
                host: argument.to_string(),
            });
        }
        Err(CloudError::Api(format!("{op} {argument}: {line}")))
    }
}

#[async_trait]
impl Cloud for SimCloud {
    async fn vms_on_host(&self, host: &str) -> Result<Vec<String>, CloudError> {
        let list = self.call("VMS", host).await?;
        Ok(list
            .split(',')
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .collect())
    }

    async fn force_down(&self, host: &str) -> Result<(), CloudError> {
        self.call("FORCE_DOWN", host).await.map(|_| ())
    }

    async fn evacuate(&self, vm: &str) -> Result<(), CloudError> {
        self.call("EVACUATE", vm).await.map(|_| ())
    }

    async fn vm_status(&self, vm: &str) -> Result<VmStatus, CloudError> {
        let reply = self.call("STATUS", vm).await?;
        let mut words = reply.split_whitespace();
        Ok(VmStatus {
            host: words.next().map(str::to_string),
            status: words.next().unwrap_or_default().to_string(),
        })
    }
}
