//! The shared BMC behaviour over in-process fake BMCs: calls to one BMC take turns, the
//! fleet-wide limit holds, a hung call is cut at its bound, a power-off counts only when
//! read back as off; and the production provider refuses what it cannot drive, naming why,
//! and keeps passwords out of every message.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bearman::bmc::credentials::{CredentialError, CredentialSource};
use bearman::bmc::guard::{power_off_verified, GuardLimits, Guards};
use bearman::bmc::provider::{BmcSettings, DriverBmcs};
use bearman::bmc::BmcProvider;
use bearman::bmc::{Bmc, BmcError, PowerState};
use bearman::core::model::{BmcConfig, BmcDriver, Node, NodeRole};
use bearman_proto::uuid::NodeUuid;

/// A BMC that takes `work` per call and records how many calls overlap; it powers off
/// only after `reads_until_off` power-state reads (never, if `u32::MAX`).
struct FakeBmc {
    work: Duration,
    in_flight: Arc<AtomicUsize>,
    overlap_max: Arc<AtomicUsize>,
    reads: AtomicU32,
    reads_until_off: u32,
    offs: AtomicU32,
    hang: bool,
}

impl FakeBmc {
    fn new(work: Duration, in_flight: Arc<AtomicUsize>, overlap_max: Arc<AtomicUsize>) -> FakeBmc {
        FakeBmc {
            work,
            in_flight,
            overlap_max,
            reads: AtomicU32::new(0),
            reads_until_off: 0,
            offs: AtomicU32::new(0),
            hang: false,
        }
    }

    fn simple() -> FakeBmc {
        FakeBmc::new(Duration::ZERO, Arc::default(), Arc::default())
    }

    async fn call(&self) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.overlap_max.fetch_max(now, Ordering::SeqCst);
        if self.hang {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(self.work).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Bmc for FakeBmc {
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        self.call().await;
        let reads = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(if reads >= self.reads_until_off {
            PowerState::Off
        } else {
            PowerState::On
        })
    }
    async fn power_on(&self) -> Result<(), BmcError> {
        self.call().await;
        Ok(())
    }
    async fn power_off(&self) -> Result<(), BmcError> {
        self.call().await;
        self.offs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn set_next_boot_pxe(&self) -> Result<(), BmcError> {
        self.call().await;
        Ok(())
    }
}

fn limits(call_timeout: Duration) -> GuardLimits {
    GuardLimits {
        queue_timeout: Duration::from_secs(30),
        call_timeout,
    }
}

#[tokio::test]
async fn calls_to_one_bmc_take_turns() {
    let guards = Guards::new(16, limits(Duration::from_secs(10)));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let overlap_max = Arc::new(AtomicUsize::new(0));
    // Two drivers for the same BMC (say, two remediations) share its lock.
    let fake = || {
        Arc::new(FakeBmc::new(
            Duration::from_millis(10),
            in_flight.clone(),
            overlap_max.clone(),
        ))
    };
    let first = Arc::new(guards.guard("10.0.0.5:623", "cn0001", "fake", fake()));
    let second = Arc::new(guards.guard("10.0.0.5:623", "cn0001", "fake", fake()));
    let mut calls = tokio::task::JoinSet::new();
    for index in 0..10 {
        let bmc = if index % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        calls.spawn(async move { bmc.power_state().await });
    }
    while let Some(result) = calls.join_next().await {
        result.unwrap().unwrap();
    }
    assert_eq!(overlap_max.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn different_bmcs_run_at_once_within_the_fleet_limit() {
    let guards = Guards::new(3, limits(Duration::from_secs(10)));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let overlap_max = Arc::new(AtomicUsize::new(0));
    let mut calls = tokio::task::JoinSet::new();
    for index in 0..9 {
        let bmc = guards.guard(
            &format!("10.0.0.{index}:623"),
            &format!("cn{index:04}"),
            "fake",
            Arc::new(FakeBmc::new(
                Duration::from_millis(30),
                in_flight.clone(),
                overlap_max.clone(),
            )),
        );
        calls.spawn(async move { bmc.power_off().await });
    }
    while let Some(result) = calls.join_next().await {
        result.unwrap().unwrap();
    }
    // Several ran together (they are different BMCs), never more than the limit.
    let overlap = overlap_max.load(Ordering::SeqCst);
    assert!((2..=3).contains(&overlap), "overlap {overlap}");
}

#[tokio::test]
async fn a_hung_call_is_cut_at_its_bound_and_names_bmc_and_operation() {
    let guards = Guards::new(1, limits(Duration::from_millis(200)));
    let hung = guards.guard(
        "10.0.0.9:623",
        "cn0009",
        "fake",
        Arc::new(FakeBmc {
            hang: true,
            ..FakeBmc::simple()
        }),
    );
    let healthy = guards.guard(
        "10.0.0.10:623",
        "cn0010",
        "fake",
        Arc::new(FakeBmc::simple()),
    );
    let error = hung.power_off().await.unwrap_err();
    assert!(matches!(error, BmcError::Timeout { .. }), "{error}");
    assert_eq!(error.to_string(), "bmc cn0009: power_off timed out");
    // The hung call's permit (the only one) came back when it was cut.
    assert_eq!(healthy.power_state().await.unwrap(), PowerState::Off);
}

#[tokio::test]
async fn every_guarded_call_is_counted_by_driver_operation_and_outcome() {
    let metrics = Arc::new(bearman::telemetry::Metrics::new());
    let guards = Guards::new(1, limits(Duration::from_millis(200))).with_metrics(metrics.clone());
    let hung = guards.guard(
        "10.0.0.11:623",
        "cn0011",
        "ipmi",
        Arc::new(FakeBmc {
            hang: true,
            ..FakeBmc::simple()
        }),
    );
    let healthy = guards.guard(
        "10.0.0.12:623",
        "cn0012",
        "redfish",
        Arc::new(FakeBmc::simple()),
    );
    hung.power_off().await.unwrap_err();
    healthy.power_state().await.unwrap();
    healthy.power_state().await.unwrap();
    let text = metrics
        .render(&bearman::telemetry::FleetSnapshot::default())
        .await;
    for line in [
        "bearman_bmc_calls_total{driver=\"ipmi\",operation=\"power_off\",outcome=\"timeout\"} 1",
        "bearman_bmc_calls_total{driver=\"redfish\",operation=\"power_state\",outcome=\"ok\"} 2",
        "bearman_bmc_call_duration_seconds_count{driver=\"redfish\",operation=\"power_state\"} 2",
        "bearman_bmc_call_duration_seconds_count{driver=\"ipmi\",operation=\"power_off\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[tokio::test]
async fn a_call_queued_too_long_gives_up_without_running() {
    let guards = Guards::new(
        4,
        GuardLimits {
            queue_timeout: Duration::from_millis(100),
            call_timeout: Duration::from_secs(10),
        },
    );
    let fake = Arc::new(FakeBmc::new(
        Duration::from_millis(500),
        Arc::default(),
        Arc::default(),
    ));
    let busy = Arc::new(guards.guard("10.0.0.7:623", "cn0007", "fake", fake.clone()));
    let waiting = guards.guard("10.0.0.7:623", "cn0007", "fake", fake.clone());
    let running = tokio::spawn({
        let busy = busy.clone();
        async move { busy.power_off().await }
    });
    // Let the first call take the BMC's turn (bounded wait for that condition).
    for _ in 0..100 {
        if fake.in_flight.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let error = waiting.power_on().await.unwrap_err().to_string();
    assert!(
        error.contains("cn0007: power_on failed: not started"),
        "{error}"
    );
    running.await.unwrap().unwrap();
    assert_eq!(fake.offs.load(Ordering::SeqCst), 1);
}

/// A clustered leader may lose its lease while its call waits behind another call to the
/// same BMC: once the call has its turn the guard asks again, and a call no longer
/// permitted never reaches the driver. A permitted one does.
#[tokio::test]
async fn a_call_that_waited_its_turn_is_sent_only_if_still_permitted() {
    use bearman::bmc::guard::{with_send_permission, SendPermission};
    use std::sync::atomic::AtomicBool;
    let guards = Guards::new(4, limits(Duration::from_secs(10)));
    let fake = Arc::new(FakeBmc::new(
        Duration::from_millis(200),
        Arc::default(),
        Arc::default(),
    ));
    let busy = Arc::new(guards.guard("10.0.0.8:623", "cn0008", "fake", fake.clone()));
    let waiting = guards.guard("10.0.0.8:623", "cn0008", "fake", fake.clone());
    let leading = Arc::new(AtomicBool::new(true));
    let permission: SendPermission = {
        let leading = leading.clone();
        Arc::new(move || leading.load(Ordering::SeqCst))
    };
    let running = tokio::spawn({
        let busy = busy.clone();
        async move { busy.power_state().await }
    });
    for _ in 0..100 {
        if fake.in_flight.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(leading.load(Ordering::SeqCst), "permitted when it queued");
    let queued = tokio::spawn({
        let permission = permission.clone();
        async move { with_send_permission(permission, waiting.power_off()).await }
    });
    // The lease passes on while the call waits behind the first one.
    tokio::time::sleep(Duration::from_millis(50)).await;
    leading.store(false, Ordering::SeqCst);
    let error = queued.await.unwrap().unwrap_err().to_string();
    assert!(
        error.contains("cn0008: power_off failed: not sent: this replica stopped leading"),
        "{error}"
    );
    running.await.unwrap().unwrap();
    assert_eq!(
        fake.offs.load(Ordering::SeqCst),
        0,
        "the power-off never reached the BMC"
    );
    // Still permitted: sent.
    leading.store(true, Ordering::SeqCst);
    with_send_permission(permission, busy.power_off())
        .await
        .unwrap();
    assert_eq!(fake.offs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn power_off_is_verified_by_readback() {
    let fake = FakeBmc {
        reads_until_off: 3,
        ..FakeBmc::simple()
    };
    let readbacks = power_off_verified(&fake, "cn0001", 6, Duration::from_millis(1))
        .await
        .unwrap();
    assert_eq!(readbacks, 3);
    assert_eq!(fake.offs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn power_off_that_never_reads_back_off_fails_clearly() {
    let guards = Guards::new(4, limits(Duration::from_secs(10)));
    let fake = Arc::new(FakeBmc {
        reads_until_off: u32::MAX,
        ..FakeBmc::simple()
    });
    let bmc = guards.guard(
        "10.0.0.3:623",
        "cn0003 at 10.0.0.3:623",
        "fake",
        fake.clone(),
    );
    let error = bmc
        .power_off_verified(4, Duration::from_millis(1))
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, BmcError::Failed { .. }), "{text}");
    assert!(
        text.starts_with("bmc cn0003 at 10.0.0.3:623: power_off_verified failed"),
        "{text}"
    );
    assert!(text.contains("not verified"), "{text}");
    assert!(text.contains("in 4 readbacks"), "{text}");
    assert!(text.contains("still reported power on"), "{text}");
    // Bounded: 4 readbacks, and the power-off sent once more halfway.
    assert_eq!(fake.reads.load(Ordering::SeqCst), 4);
    assert_eq!(fake.offs.load(Ordering::SeqCst), 2);
}

fn node(driver: Option<BmcDriver>, address: Option<&str>, credentials_ref: Option<&str>) -> Node {
    let mut node = Node::new(
        NodeUuid::from_index(7, 1),
        "cn0001".into(),
        NodeRole::Compute,
        0,
    );
    node.bmc = BmcConfig {
        address: address.map(str::to_string),
        mac: None,
        driver,
        credentials_ref: credentials_ref.map(str::to_string),
    };
    node
}

fn bmc_error(bmcs: &DriverBmcs, node: &Node) -> String {
    match bmcs.bmc_for(node) {
        Ok(_) => panic!("driver built for {:?}", node.bmc),
        Err(error) => error.to_string(),
    }
}

#[test]
fn provider_refuses_what_it_cannot_drive_and_says_why() {
    let bmcs = DriverBmcs::new(BmcSettings::default()).unwrap();
    let env = Some("env:BEARMAN_TEST_UNSET_BMC_CREDENTIALS");
    let error = bmc_error(&bmcs, &node(Some(BmcDriver::Qmp), Some("10.0.0.1"), env));
    assert!(
        error.contains("qmp BMC driver is not available in production")
            && error.contains("bmc.qmp_socket_dir"),
        "{error}"
    );
    let error = bmc_error(&bmcs, &node(Some(BmcDriver::Sim), Some("10.0.0.1"), env));
    assert!(
        error.contains("sim BMC driver is not available in production"),
        "{error}"
    );
    let error = bmc_error(&bmcs, &node(None, Some("10.0.0.1"), env));
    assert!(error.contains("no BMC driver"), "{error}");
    let error = bmc_error(&bmcs, &node(Some(BmcDriver::Ipmi), None, env));
    assert!(error.contains("no BMC address"), "{error}");
    let error = bmc_error(&bmcs, &node(Some(BmcDriver::Ipmi), Some("10.0.0.1"), env));
    assert!(
        error.contains("BEARMAN_TEST_UNSET_BMC_CREDENTIALS") && error.contains("not set"),
        "{error}"
    );
    let error = bmc_error(&bmcs, &node(Some(BmcDriver::Ipmi), Some("10.0.0.1"), None));
    assert!(error.contains("no credentials reference"), "{error}");
}

#[test]
fn provider_builds_guarded_drivers_from_secrets_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.toml");
    std::fs::write(
        &secrets,
        "[rack1]\nusername = \"admin\"\npassword = \"Pa55-rack1\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bmcs = DriverBmcs::new(BmcSettings {
        secrets_file: Some(secrets.clone()),
        ..BmcSettings::default()
    })
    .unwrap();
    for address in ["10.0.0.1", "10.0.0.1:6230", "[fd00::1]:623"] {
        bmcs.bmc_for(&node(
            Some(BmcDriver::Ipmi),
            Some(address),
            Some("file:rack1"),
        ))
        .unwrap();
    }
    // Redfish is built in: a node configured for it gets a driver too.
    bmcs.bmc_for(&node(
        Some(BmcDriver::Redfish),
        Some("https://10.0.0.1"),
        Some("file:rack1"),
    ))
    .unwrap();
    let error = bmc_error(
        &bmcs,
        &node(
            Some(BmcDriver::Ipmi),
            Some("10.0.0.1:99999"),
            Some("file:rack1"),
        ),
    );
    assert!(error.contains("invalid port"), "{error}");
    let error = bmc_error(
        &bmcs,
        &node(Some(BmcDriver::Ipmi), Some("10.0.0.1"), Some("file:rack2")),
    );
    assert!(error.contains("has no [rack2] table"), "{error}");
    assert!(!error.contains("Pa55-rack1"), "{error}");
}

#[test]
fn secrets_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.toml");
    std::fs::write(
        &secrets,
        "[rack1]\nusername = \"admin\"\npassword = \"Pa55-open\"\n",
    )
    .unwrap();
    for mode in [0o644, 0o640, 0o604, 0o660] {
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(mode)).unwrap();
        let error = CredentialSource::new(Some(secrets.clone()))
            .resolve(Some("file:rack1"))
            .unwrap_err();
        assert!(
            matches!(error, CredentialError::TooOpen { .. }),
            "{mode:o}: {error}"
        );
        let text = error.to_string();
        assert!(
            text.contains("readable or writable by group or others"),
            "{text}"
        );
        assert!(text.contains("chmod 600"), "{text}");
    }
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o400)).unwrap();
    let credentials = CredentialSource::new(Some(secrets))
        .resolve(Some("file:rack1"))
        .unwrap();
    assert_eq!(credentials.password.expose(), "Pa55-open");
    assert!(!format!("{credentials:?}").contains("Pa55-open"));
}

#[test]
fn a_broken_secrets_file_is_reported_without_quoting_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.toml");
    for text in [
        // Unquoted password: the TOML parser would quote this line in its message.
        "[rack1]\nusername = \"admin\"\npassword = Pa55-unquoted\n",
        // A number where a string belongs: the parser would quote the value.
        "[rack1]\nusername = \"admin\"\npassword = 123456789\n",
        // An unknown field holding a secret.
        "[rack1]\nusername = \"admin\"\npassword = \"x\"\ntoken = \"Pa55-token\"\n",
    ] {
        std::fs::write(&secrets, text).unwrap();
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
        let error = CredentialSource::new(Some(secrets.clone()))
            .resolve(Some("file:rack1"))
            .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("is not valid"), "{message}");
        for secret in ["Pa55-unquoted", "123456789", "Pa55-token"] {
            assert!(!message.contains(secret), "{message}");
            assert!(!format!("{error:?}").contains(secret), "{error:?}");
        }
    }
}
