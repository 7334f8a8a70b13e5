//! Shared BMC behaviour every driver gets: one call at a time per BMC, a fleet-wide limit
//! on concurrent BMC calls, a bound on every call, and power-off verified by readback.
//!
//! Why: BMCs are flaky under load (metal3 ironic-image #688, omni #785: bursts of IPMI
//! calls crash or wedge them), so calls to one BMC are serialised; a hung BMC must never
//! delay the others, so every call is bounded; and an accepted power-off is not a fence
//! (metal3 baremetal-operator #290), so fencing reads the power state back.
//!
//! Architecture invariant: this module knows no driver. It wraps any `Arc<dyn Bmc>` —
//! IPMI, Redfish, QMP or the simulator's.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use super::{Bmc, BmcError, PowerState};

/// Whether the caller may still send, asked at the last moment the guard controls: after
/// a call got its turn, before the driver is called. `false`: not sent.
pub type SendPermission = Arc<dyn Fn() -> bool + Send + Sync>;

tokio::task_local! {
    static MAY_SEND: SendPermission;
}

/// Runs `call` (BMC calls through [`GuardedBmc`]) under `permission`: a call that waited
/// its turn behind others is sent only if `permission` still says yes once it has it.
/// Why: a clustered leader checks its lease before each call, but a call may then wait
/// up to the queue timeout behind earlier calls to the same BMC — long enough for the
/// lease to pass to another replica. Calls made outside such a scope are not checked.
pub async fn with_send_permission<F: Future>(permission: SendPermission, call: F) -> F::Output {
    MAY_SEND.scope(permission, call).await
}

/// Time bounds a [`GuardedBmc`] puts on each call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardLimits {
    /// Longest wait for this BMC's earlier calls and for a fleet-wide permit.
    pub queue_timeout: Duration,
    /// Longest a call may run once it has its turn; then it is cancelled (for IPMI, the
    /// `ipmitool` child is killed).
    pub call_timeout: Duration,
}

impl Default for GuardLimits {
    fn default() -> Self {
        GuardLimits {
            queue_timeout: Duration::from_secs(120),
            call_timeout: Duration::from_secs(60),
        }
    }
}

/// One lock per BMC, shared by every [`GuardedBmc`] made for it: drivers are cheap and
/// made per use, but two nodes (or two remediations) naming the same BMC must still
/// take turns.
#[derive(Default)]
pub struct BmcLocks {
    locks: Mutex<BTreeMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl BmcLocks {
    /// The lock for the BMC known as `key` (its normalised `host:port`).
    pub fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = locks.get(key).and_then(Weak::upgrade) {
            return lock;
        }
        // Forget BMCs nobody holds a driver for, so the map stays as large as the set of
        // BMCs in use rather than every BMC ever seen.
        if locks.len() >= 64 {
            locks.retain(|_, lock| lock.strong_count() > 0);
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(key.to_string(), Arc::downgrade(&lock));
        lock
    }
}

/// Everything guarded BMCs share: per-BMC locks, the fleet-wide permits, the limits.
pub struct Guards {
    locks: BmcLocks,
    permits: Arc<Semaphore>,
    limits: GuardLimits,
    metrics: Option<Arc<crate::telemetry::Metrics>>,
}

impl Guards {
    /// `concurrent_max` BMC calls at once across the fleet (at least one).
    pub fn new(concurrent_max: usize, limits: GuardLimits) -> Guards {
        Guards::with_permits(Arc::new(Semaphore::new(concurrent_max.max(1))), limits)
    }

    /// Shares `permits` with other users of the same fleet-wide limit.
    pub fn with_permits(permits: Arc<Semaphore>, limits: GuardLimits) -> Guards {
        Guards {
            locks: BmcLocks::default(),
            permits,
            limits,
            metrics: None,
        }
    }

    /// Counts and times every call of the guarded BMCs in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::Metrics>) -> Guards {
        self.metrics = Some(metrics);
        self
    }

    pub fn limits(&self) -> GuardLimits {
        self.limits
    }

    /// Wraps `inner`, the driver (`ipmi`, `redfish`, … as metrics name it) for the BMC
    /// `key` (normalised `host:port`), named `name` in errors and logs.
    pub fn guard(
        &self,
        key: &str,
        name: &str,
        driver: &'static str,
        inner: Arc<dyn Bmc>,
    ) -> GuardedBmc {
        let mut guarded = GuardedBmc::new(
            name,
            inner,
            self.locks.lock_for(key),
            self.permits.clone(),
            self.limits,
        );
        guarded.driver = driver;
        guarded.metrics = self.metrics.clone();
        guarded
    }
}

/// A BMC driver behind the guards: calls to the same BMC take turns, at most as many
/// calls as the shared semaphore allows run at once, and every call is bounded.
pub struct GuardedBmc {
    name: String,
    inner: Arc<dyn Bmc>,
    lock: Arc<tokio::sync::Mutex<()>>,
    permits: Arc<Semaphore>,
    limits: GuardLimits,
    /// The driver's name in metrics.
    driver: &'static str,
    metrics: Option<Arc<crate::telemetry::Metrics>>,
}

impl GuardedBmc {
    pub fn new(
        name: &str,
        inner: Arc<dyn Bmc>,
        lock: Arc<tokio::sync::Mutex<()>>,
        permits: Arc<Semaphore>,
        limits: GuardLimits,
    ) -> GuardedBmc {
        GuardedBmc {
            name: name.to_string(),
            inner,
            lock,
            permits,
            limits,
            driver: "unnamed",
            metrics: None,
        }
    }

    fn count(&self, operation: &'static str, outcome: &'static str, took: Option<Duration>) {
        if let Some(metrics) = &self.metrics {
            metrics.bmc_call(self.driver, operation, outcome, took);
        }
    }

    /// How errors and logs name this BMC.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Powers off and reads back until the BMC reports Off; see [`power_off_verified`].
    pub async fn power_off_verified(
        &self,
        readbacks_max: u32,
        backoff: Duration,
    ) -> Result<u32, BmcError> {
        power_off_verified(self, &self.name, readbacks_max, backoff).await
    }

    async fn guarded<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, BmcError>>,
    ) -> Result<T, BmcError> {
        // Take this BMC's turn before a fleet-wide permit: a caller queued behind a slow
        // BMC must not hold a permit healthy BMCs could use.
        let turn = async {
            let turn = self.lock.lock().await;
            let permit = self.permits.acquire().await;
            (turn, permit)
        };
        let (_turn, permit) = tokio::time::timeout(self.limits.queue_timeout, turn)
            .await
            .inspect_err(|_| self.count(operation, "not_started", None))
            .map_err(|_| BmcError::Failed {
                bmc: self.name.clone(),
                operation,
                detail: format!(
                    "not started: waited {} s behind earlier calls to this BMC or the fleet-wide limit on concurrent BMC calls",
                    self.limits.queue_timeout.as_secs_f64()
                ),
            })?;
        let _permit = permit
            .inspect_err(|_| self.count(operation, "not_started", None))
            .map_err(|_| BmcError::Failed {
                bmc: self.name.clone(),
                operation,
                detail: "not started: BMC calls are shutting down".into(),
            })?;
        if !MAY_SEND.try_with(|may_send| may_send()).unwrap_or(true) {
            self.count(operation, "not_sent", None);
            return Err(BmcError::Failed {
                bmc: self.name.clone(),
                operation,
                detail: "not sent: this replica stopped leading while the call waited its turn"
                    .into(),
            });
        }
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(self.limits.call_timeout, call).await {
            Ok(result) => {
                let outcome = match &result {
                    Ok(_) => "ok",
                    Err(error) => {
                        tracing::warn!(bmc = %self.name, operation, %error, "bmc call failed");
                        "error"
                    }
                };
                self.count(operation, outcome, Some(started.elapsed()));
                result
            }
            Err(_) => {
                self.count(operation, "timeout", Some(started.elapsed()));
                tracing::warn!(
                    bmc = %self.name,
                    operation,
                    timeout_s = self.limits.call_timeout.as_secs_f64(),
                    "bmc call timed out and was cancelled"
                );
                Err(BmcError::Timeout {
                    bmc: self.name.clone(),
                    operation,
                })
            }
        }
    }
}

#[async_trait]
impl Bmc for GuardedBmc {
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        self.guarded("power_state", self.inner.power_state()).await
    }

    async fn power_on(&self) -> Result<(), BmcError> {
        self.guarded("power_on", self.inner.power_on()).await
    }
    async fn power_off(&self) -> Result<(), BmcError> {
        self.guarded("power_off", self.inner.power_off()).await
    }

    async fn power_off_soft(&self) -> Result<(), BmcError> {
        self.guarded("power_off_soft", self.inner.power_off_soft())
            .await
    }

    async fn set_next_boot_pxe(&self) -> Result<(), BmcError> {
        self.guarded("set_next_boot_pxe", self.inner.set_next_boot_pxe())
            .await
    }

    fn supports_nmi(&self) -> bool {
        self.inner.supports_nmi()
    }

    async fn inject_nmi(&self) -> Result<(), BmcError> {
        if !self.inner.supports_nmi() {
            return Err(BmcError::Unsupported {
                bmc: self.name.clone(),
                driver: self.driver,
                operation: "inject_nmi",
            });
        }
        self.guarded("inject_nmi", self.inner.inject_nmi()).await
    }
}

/// Reads the power state until it is `want`: up to `readbacks` reads, the first after
/// `backoff`, each wait doubling up to eight times `backoff`. Ok: how many reads it took;
/// Err: what the last read said.
async fn read_until(
    bmc: &dyn Bmc,
    want: PowerState,
    readbacks: u32,
    backoff: Duration,
) -> Result<u32, LastReadback> {
    let mut delay = backoff;
    let mut last = LastReadback::NoneMade;
    for readback in 1..=readbacks {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(backoff * 8);
        match bmc.power_state().await {
            Ok(state) if state == want => return Ok(readback),
            Ok(state) => last = LastReadback::StillReported(state),
            Err(error) => last = LastReadback::Failed(error),
        }
    }
    Err(last)
}

/// What the last readback of a power command said, when it was not what was wanted.
#[derive(Debug, thiserror::Error)]
enum LastReadback {
    #[error("no readback was made")]
    NoneMade,
    #[error("the BMC still reported power {}", power_word(*.0))]
    StillReported(PowerState),
    #[error("the last readback failed: {0}")]
    Failed(BmcError),
}

fn not_verified(
    bmc_name: &str,
    operation: &'static str,
    want: PowerState,
    readbacks: u32,
    note: &str,
    last: &LastReadback,
) -> BmcError {
    BmcError::Failed {
        bmc: bmc_name.to_string(),
        operation,
        detail: format!(
            "command accepted but not verified: power did not read back {} in {readbacks} readbacks{note}; {last}",
            power_word(want)
        ),
    }
}

/// Reads the power state back until it is `want`, within `readbacks_max` reads (at least
/// one) spaced by `backoff` (doubling, capped at 8×). Returns how many reads it took;
/// fails, naming the last answer, when the bound runs out.
pub async fn await_power(
    bmc: &dyn Bmc,
    bmc_name: &str,
    want: PowerState,
    operation: &'static str,
    readbacks_max: u32,
    backoff: Duration,
) -> Result<u32, BmcError> {
    let readbacks_max = readbacks_max.max(1);
    read_until(bmc, want, readbacks_max, backoff)
        .await
        .map_err(|last| not_verified(bmc_name, operation, want, readbacks_max, "", &last))
}

/// Powers off (hard) and then reads the power state back until the BMC reports Off,
/// within `readbacks_max` reads (at least one) spaced by `backoff` (doubling, capped at
/// 8×). Success means the BMC *said* Off after our command — an accepted command alone is
/// never success. The power-off is sent once more halfway, in case the first was lost
/// (metal3 #290). Returns how many readbacks it took.
pub async fn power_off_verified(
    bmc: &dyn Bmc,
    bmc_name: &str,
    readbacks_max: u32,
    backoff: Duration,
) -> Result<u32, BmcError> {
    const OPERATION: &str = "power_off_verified";
    if let Err(error) = bmc.power_off().await {
        // Some BMCs refuse to power off what is already off: the readback decides.
        return match bmc.power_state().await {
            Ok(PowerState::Off) => Ok(1),
            _ => Err(error),
        };
    }
    let readbacks_max = readbacks_max.max(1);
    let first = readbacks_max.div_ceil(2);
    let last = match read_until(bmc, PowerState::Off, first, backoff).await {
        Ok(readbacks) => return Ok(readbacks),
        Err(last) => last,
    };
    let second = readbacks_max - first;
    if second == 0 {
        return Err(not_verified(
            bmc_name,
            OPERATION,
            PowerState::Off,
            readbacks_max,
            "",
            &last,
        ));
    }
    tracing::warn!(bmc = %bmc_name, "power still on after power-off; sending it again");
    let resent = bmc.power_off().await;
    match read_until(bmc, PowerState::Off, second, backoff).await {
        Ok(readbacks) => Ok(first + readbacks),
        Err(last) => {
            let note = match resent {
                Ok(()) => " (power-off sent twice)".to_string(),
                Err(error) => format!(" (sending power-off again failed: {error})"),
            };
            Err(not_verified(
                bmc_name,
                OPERATION,
                PowerState::Off,
                readbacks_max,
                &note,
                &last,
            ))
        }
    }
}

pub(crate) fn power_word(state: PowerState) -> &'static str {
    match state {
        PowerState::On => "on",
        PowerState::Off => "off",
    }
}
