//! The simulated BMC fabric and cloud behave like the real things they stand for: BMC calls
//! through turmoil with stale readback and hangs, and Nova's evacuation rules.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bearman::bmc::{Bmc, BmcError, PowerState};
use bearman_sim::bmc::{self, SimBmc};
use bearman_sim::fleet::{lock, Os, Power, SharedWorld, World, SERVICE_DOWN_TIME};
use bearman_sim::scenario::BmcBehaviour;

fn world(nodes: u32) -> SharedWorld {
    let mut world = World::new(1, nodes, 0, 8);
    world.place_vms(2);
    Arc::new(Mutex::new(world))
}

/// Runs `client` against a BMC fabric host in a fresh turmoil simulation.
fn with_bmc_fabric<F>(world: SharedWorld, client: impl FnOnce(SharedWorld) -> F + 'static)
where
    F: std::future::Future<Output = turmoil::Result> + 'static,
{
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(600))
        .rng_seed(1)
        .build();
    let behaviour = BmcBehaviour {
        latency_ms: [10, 20],
        transition_ms: 2000,
        ..Default::default()
    };
    {
        let world = world.clone();
        sim.host(bmc::BMC_HOST, move || {
            bmc::serve(world.clone(), behaviour.clone(), 1)
        });
    }
    sim.client("daemon", client(world));
    sim.run().expect("simulation");
}

#[test]
fn power_off_is_accepted_before_it_happens_and_readback_shows_it() {
    let world = world(2);
    lock(&world).power_on(0, Duration::ZERO, "test");
    with_bmc_fabric(world.clone(), |world| async move {
        let bmc = SimBmc {
            node_index: 0,
            timeout: Duration::from_secs(5),
        };
        bmc.power_off().await?;
        // Accepted is not done: the transition takes time.
        assert_eq!(bmc.power_state().await?, PowerState::On);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(bmc.power_state().await?, PowerState::Off);
        assert_eq!(lock(&world).nodes[0].os, Os::Off);
        Ok(())
    });
}

#[test]
fn stale_readback_reports_the_old_power_state_until_healed() {
    let world = world(1);
    lock(&world).power_on(0, Duration::ZERO, "test");
    lock(&world).bmc_faults.stale_readback = true;
    with_bmc_fabric(world.clone(), |world| async move {
        let bmc = SimBmc {
            node_index: 0,
            timeout: Duration::from_secs(5),
        };
        bmc.power_off().await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            lock(&world).nodes[0].power,
            Power::Off,
            "the machine is off"
        );
        assert_eq!(
            bmc.power_state().await?,
            PowerState::On,
            "but the BMC still says on"
        );
        {
            let mut world = lock(&world);
            world.bmc_faults.stale_readback = false;
            world.bmcs[0].stale_power = None;
        }
        assert_eq!(bmc.power_state().await?, PowerState::Off);
        Ok(())
    });
}

#[test]
fn a_hung_bmc_times_out_within_its_bound_and_others_still_answer() {
    let world = world(2);
    lock(&world).bmcs[0].locked_until = Some(Duration::from_secs(3600));
    with_bmc_fabric(world, |_| async move {
        let hung = SimBmc {
            node_index: 0,
            timeout: Duration::from_secs(5),
        };
        let healthy = SimBmc {
            node_index: 1,
            timeout: Duration::from_secs(5),
        };
        let started = tokio::time::Instant::now();
        let (hung_result, healthy_result) = tokio::join!(hung.power_state(), healthy.power_state());
        assert!(
            matches!(hung_result, Err(BmcError::Timeout { .. })),
            "{hung_result:?}"
        );
        assert!(started.elapsed() <= Duration::from_secs(6));
        assert_eq!(healthy_result?, PowerState::Off);
        Ok(())
    });
}

#[test]
fn a_burst_of_calls_locks_a_bmc_up() {
    let world = world(1);
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(600))
        .build();
    let behaviour = BmcBehaviour {
        latency_ms: [1, 2],
        burst_limit: 3,
        burst_window_s: 10,
        lockup_s: 60,
        ..Default::default()
    };
    {
        let world = world.clone();
        sim.host(bmc::BMC_HOST, move || {
            bmc::serve(world.clone(), behaviour.clone(), 1)
        });
    }
    sim.client("daemon", async move {
        let bmc = SimBmc {
            node_index: 0,
            timeout: Duration::from_secs(2),
        };
        for _ in 0..3 {
            bmc.power_state().await?;
        }
        assert!(
            matches!(bmc.power_state().await, Err(BmcError::Timeout { .. })),
            "fourth call in the window hangs"
        );
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(
            bmc.power_state().await.is_ok(),
            "answers again after the lock-up"
        );
        Ok(())
    });
    sim.run().unwrap();
}

#[test]
fn an_nmi_crashes_the_running_node_it_is_sent_to_and_nothing_else() {
    let world = world(4);
    {
        let mut world = lock(&world);
        for index in 0..3 {
            world.power_on(index, Duration::ZERO, "test");
        }
        // Nodes 0 and 1 reach stage 2 (their VMs start); node 2 stays booting; 3 is off.
        for index in 0..2 {
            let epoch = world.nodes[index as usize].epoch;
            assert!(world.os_running(index, epoch, Duration::ZERO));
        }
    }
    fn running_on(world: &SharedWorld, index: u32) -> usize {
        lock(world)
            .vms
            .values()
            .filter(|vm| vm.instances.contains(&index))
            .count()
    }
    assert_eq!(running_on(&world, 0), 2);
    with_bmc_fabric(world.clone(), |world| async move {
        let bmc = |node_index| SimBmc {
            node_index,
            timeout: Duration::from_secs(5),
        };
        assert!(bmc(0).supports_nmi());
        let epoch_before = lock(&world).nodes[0].epoch;
        bmc(0).inject_nmi().await?;
        {
            let world = lock(&world);
            let node = &world.nodes[0];
            assert_eq!((node.power, node.os), (Power::On, Os::Crashed));
            assert!(node.epoch > epoch_before, "the node's tasks stop");
            assert_eq!(world.crashes[&0].len(), 1, "recorded like a crash fault");
            assert_eq!(world.crashes[&0][0].1, vec![0, 1], "with the VMs it ran");
        }
        assert_eq!(running_on(&world, 0), 0, "its VMs died with it");
        // The BMC still reads power on: a panicked host is not a powered-off one.
        assert_eq!(bmc(0).power_state().await?, PowerState::On);

        // A second NMI to the dead kernel changes nothing.
        bmc(0).inject_nmi().await?;
        assert_eq!(lock(&world).crashes[&0].len(), 1);

        // A booting node (firmware, stage 1: no unknown_nmi_panic) carries on; a
        // powered-off one is refused and stays off.
        bmc(2).inject_nmi().await?;
        assert_eq!(lock(&world).nodes[2].os, Os::Booting);
        let error = bmc(3).inject_nmi().await.unwrap_err();
        assert!(
            matches!(&error, BmcError::Failed { detail, .. } if detail.contains("power is off")),
            "{error:?}"
        );
        {
            let world = lock(&world);
            assert_eq!(
                (world.nodes[3].power, world.nodes[3].os),
                (Power::Off, Os::Off)
            );
            assert!(!world.crashes.contains_key(&3));
            // The neighbour nobody interrupted runs on, VMs and all.
            assert_eq!(
                (world.nodes[1].power, world.nodes[1].os),
                (Power::On, Os::Running)
            );
            assert_eq!(world.crashes.keys().copied().collect::<Vec<_>>(), [0]);
        }
        assert_eq!(running_on(&world, 1), 2);
        Ok(())
    });
}

#[test]
fn evacuation_waits_for_service_down_or_force_down() {
    let mut world = World::new(1, 3, 0, 8);
    world.place_vms(1);
    for index in 0..3 {
        world.power_on(index, Duration::ZERO, "test");
        world.os_running(index, world.nodes[index as usize].epoch, Duration::ZERO);
    }
    let at = Duration::from_secs(100);
    world.power_off(0, at, "test");
    let refused = world.evacuate(0, at + Duration::from_secs(1));
    assert!(refused.unwrap_err().contains("ComputeServiceInUse"));
    // After service_down_time the service is considered down.
    let target = world
        .evacuate(0, at + SERVICE_DOWN_TIME)
        .expect("evacuates after service_down_time");
    assert_ne!(target, 0);
    assert!(
        world.violations.is_empty(),
        "source was powered off: no violation"
    );
    // Forcing the service down allows it at once.
    world.power_off(1, at, "test");
    world.forced_down.insert(1);
    let on_node1: Vec<u32> = world
        .vms
        .values()
        .filter(|vm| vm.assigned == 1)
        .map(|vm| vm.id)
        .collect();
    assert!(!on_node1.is_empty());
    for vm in on_node1 {
        assert_eq!(world.evacuate(vm, at + Duration::from_secs(1)), Ok(2));
    }
    assert_eq!(world.vm_census(), (0, 0));
}

#[test]
fn evacuating_an_unfenced_host_runs_the_vm_twice_and_is_recorded() {
    let mut world = World::new(1, 2, 0, 8);
    world.place_vms(1);
    for index in 0..2 {
        world.power_on(index, Duration::ZERO, "test");
        world.os_running(index, world.nodes[index as usize].epoch, Duration::ZERO);
    }
    world.forced_down.insert(0);
    world
        .evacuate(0, Duration::from_secs(5))
        .expect("forced down: allowed");
    assert_eq!(world.vm_census().0, 1, "vm0 now runs on both hosts");
    assert_eq!(world.violations.len(), 1, "{:?}", world.violations);
    let mut checker = bearman_sim::check::Checker::default();
    let store = bearman::store::memory::MemoryStore::new();
    checker.check_step(&world, &store, Duration::from_secs(6));
    assert!(!checker.no_vm_twice.passed());
    assert!(!checker.fence_before_evacuate.passed());
}
