//! A simulated operator at a console on the out-of-band network ("ops" host): power-cycles
//! nodes through their BMCs with the production `Bmc` trait, the way a careful human
//! would — power off, read back until off is verified (bounded, with backoff), power on,
//! read back until on. Scenarios use it to put real BMC calls through BMC faults.

use std::time::Duration;

use bearman::bmc::{Bmc, PowerState};

use crate::bmc::SimBmc;
use crate::fleet::{lock, SharedWorld};

pub const OPS_HOST: &str = "ops";
/// Readbacks before the operator gives up on a power change.
const READBACKS_MAX: u32 = 40;
const BMC_CALL_TIMEOUT: Duration = Duration::from_secs(15);

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

pub async fn serve(world: SharedWorld) -> turmoil::Result {
    loop {
        let queued: Vec<u32> = std::mem::take(&mut lock(&world).ops_power_cycles);
        for index in queued {
            let world = world.clone();
            tokio::task::spawn_local(async move { power_cycle(world, index).await });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Asks for `want` and reads back until the BMC reports it, bounded.
async fn set_and_verify(bmc: &SimBmc, want: PowerState) -> Result<u32, String> {
    let mut backoff = Duration::from_secs(2);
    let mut accepted = false;
    for readback in 1..=READBACKS_MAX {
        if !accepted {
            let result = match want {
                PowerState::Off => bmc.power_off().await,
                PowerState::On => bmc.power_on().await,
            };
            accepted = result.is_ok();
        }
        if accepted {
            if let Ok(state) = bmc.power_state().await {
                if state == want {
                    return Ok(readback);
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(20));
    }
    Err(format!(
        "not verified {want:?} after {READBACKS_MAX} readbacks"
    ))
}

async fn power_cycle(world: SharedWorld, index: u32) {
    let bmc = SimBmc {
        node_index: index,
        timeout: BMC_CALL_TIMEOUT,
    };
    let name = lock(&world).node_name(index);
    let off = set_and_verify(&bmc, PowerState::Off).await;
    let line = match &off {
        Ok(readbacks) => format!("ops {name}: power off verified after {readbacks} readback(s)"),
        Err(error) => format!("ops {name}: power off {error}; leaving it alone"),
    };
    lock(&world).trace.record(now(), line);
    if off.is_err() {
        return;
    }
    let on = set_and_verify(&bmc, PowerState::On).await;
    let line = match on {
        Ok(readbacks) => format!("ops {name}: power on verified after {readbacks} readback(s)"),
        Err(error) => format!("ops {name}: power on {error}"),
    };
    lock(&world).trace.record(now(), line);
}
