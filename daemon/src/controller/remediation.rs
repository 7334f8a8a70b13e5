//! Carrying out one step of a remediation saga: record the attempt (`app::saga`), make
//! the calls the core's `StepProgram` asks for through the `Bmc` and `Cloud` seams,
//! feeding it each result, and record the outcome (`app::saga`). Nothing here decides:
//! stand-down, the calls and what the outcome means are `core::controller`'s.
//!
//! A BMC or cloud driver that panics mid-step fails that attempt (`Outcome::Failed`
//! naming the panic), which goes through the step's retry budget like any failure: the
//! saga is retried with backoff and fails with an event when the budget is spent.

use std::sync::Arc;

use crate::bmc::{Bmc, BmcError, PowerState};
use crate::cloud::CloudError;
use crate::core::controller::{Call, CallResult, Next, StepProgram, STEP_CALLS_MAX};
use crate::core::model::Node;
use crate::core::remediation::{Outcome, Remediation, Status};

use crate::app::saga::{Begun, Recorded};

use super::{panic_message, CatchUnwind, Controller};

impl Controller {
    /// Runs the current step of remediation `id` once, if it is still active and due.
    /// Whatever goes wrong is logged here (and, when a write gave up, in the audit trail
    /// by `app::saga`); the saga stays consistent and runs again when due.
    pub async fn run_step(self: Arc<Self>, id: i64) {
        let acting = self.app.leader.acting(self.app.now_ms());
        if !acting.may_act() {
            return;
        }
        let fence = acting.fence();
        let begun = match self.app.saga_begin_step(id, fence).await {
            Ok(begun) => begun,
            Err(error) => {
                tracing::warn!(id, %error, "remediation step not started");
                return;
            }
        };
        let (attempt, node) = match begun {
            Begun::Idle => return,
            Begun::StoodDown => {
                tracing::info!(id, "automatic remediation stood down (see its event)");
                return;
            }
            Begun::Refused(write) => {
                tracing::error!(id, note = %write.note, "remediation failed before acting");
                return;
            }
            Begun::Attempt { attempt, node } => (attempt, node),
        };
        let limits = &self.config.limits;
        let now_ms = self.app.now_ms();
        let Some(program) = StepProgram::new(now_ms, &attempt, &node, self.cloud.is_some(), limits)
        else {
            return;
        };
        let step = program.step();
        let mut attempt = attempt;
        let outcome = match CatchUnwind::new(self.execute(program, &node, &mut attempt)).await {
            Ok(outcome) => outcome,
            Err(panic) => {
                let reason = panic_message(panic);
                tracing::error!(id, step = step.as_str(), %reason, "remediation step panicked");
                Outcome::Failed(format!("{} {reason}", step.as_str()))
            }
        };
        match self
            .app
            .saga_record_outcome(&attempt, &outcome, limits, fence)
            .await
        {
            Ok(Recorded::Written(write)) => {
                if write.illegal.is_some() {
                    tracing::error!(id, note = %write.note, "remediation failed: illegal lifecycle transition");
                } else if write.remediation.status != Status::Active {
                    tracing::info!(id, status = write.remediation.status.as_str(), note = %write.note, "remediation finished");
                }
            }
            Ok(Recorded::Superseded { now }) => {
                tracing::info!(id, status = ?now.map(|r| r.status), "remediation changed during the step; its outcome is moot");
            }
            Err(error) => tracing::warn!(id, %error, "remediation step outcome not recorded"),
        }
    }

    /// Runs `program` to its outcome: makes each call it asks for and feeds it the
    /// result, at most [`STEP_CALLS_MAX`] calls.
    async fn execute(
        &self,
        mut program: StepProgram,
        node: &Node,
        attempt: &mut Remediation,
    ) -> Outcome {
        // One driver per step: a BMC is found once (and serialised by its guard).
        let mut bmc: Option<Result<Arc<dyn Bmc>, Arc<BmcError>>> = None;
        let mut last = None;
        for _ in 0..STEP_CALLS_MAX {
            let call = match program.next(last.take()) {
                Next::Finish(outcome) => {
                    program.record_evacuated(attempt);
                    return outcome;
                }
                Next::Call(call) => call,
            };
            // The attempt was recorded under our epoch; a leader whose lease may be about
            // to pass to another makes no further call.
            if !self.app.leader.acting(self.app.now_ms()).may_act() {
                program.record_evacuated(attempt);
                return Outcome::NotYet("this replica stopped leading mid-step".into());
            }
            // Asked again once a BMC call has its turn (it may wait behind others).
            let (leader, clock) = (self.app.leader.clone(), self.app.clock.clone());
            let permission: crate::bmc::guard::SendPermission =
                Arc::new(move || leader.acting(clock.now_ms()).may_act());
            last = Some(
                crate::bmc::guard::with_send_permission(
                    permission,
                    self.call(call, node, &mut bmc),
                )
                .await,
            );
        }
        program.record_evacuated(attempt);
        Outcome::Failed(format!(
            "step {} asked for more than {STEP_CALLS_MAX} calls",
            program.step().as_str()
        ))
    }

    /// Makes one call through the BMC or cloud seam.
    async fn call(
        &self,
        call: Call,
        node: &Node,
        bmc: &mut Option<Result<Arc<dyn Bmc>, Arc<BmcError>>>,
    ) -> CallResult {
        let cloud_result = |result: Result<(), CloudError>| match result {
            Ok(()) => CallResult::Done,
            Err(error @ CloudError::ServiceInUse { .. }) => {
                CallResult::ServiceInUse(error.to_string())
            }
            Err(error) => CallResult::Failed(error.to_string()),
        };
        match call {
            Call::ForceDown { host } => match &self.cloud {
                Some(cloud) => cloud_result(cloud.force_down(&host).await),
                None => CallResult::Failed("no cloud configured".into()),
            },
            Call::VmsOnHost { host } => match &self.cloud {
                Some(cloud) => match cloud.vms_on_host(&host).await {
                    Ok(vms) => CallResult::Vms(vms),
                    Err(error) => CallResult::Failed(error.to_string()),
                },
                None => CallResult::Failed("no cloud configured".into()),
            },
            Call::Evacuate { vm } => match &self.cloud {
                Some(cloud) => cloud_result(cloud.evacuate(&vm).await),
                None => CallResult::Failed("no cloud configured".into()),
            },
            Call::VmStatus { vm } => match &self.cloud {
                Some(cloud) => match cloud.vm_status(&vm).await {
                    Ok(status) => CallResult::VmStatus {
                        host: status.host,
                        status: status.status,
                    },
                    Err(error) => CallResult::Failed(error.to_string()),
                },
                None => CallResult::Failed("no cloud configured".into()),
            },
            bmc_call => {
                // Found once per step; the error is kept (shared) for the step's later calls.
                let bmc = match bmc.get_or_insert_with(|| self.bmcs.bmc_for(node).map_err(Arc::new))
                {
                    Ok(bmc) => bmc.clone(),
                    Err(error) => return CallResult::Failed(error.to_string()),
                };
                // The core records what failed as text in the saga (`last_error`).
                let text = |result: Result<(), BmcError>| match result {
                    Ok(()) => CallResult::Done,
                    Err(error) => CallResult::Failed(error.to_string()),
                };
                match bmc_call {
                    Call::PowerOffSoft => text(bmc.power_off_soft().await),
                    Call::PowerOff => text(bmc.power_off().await),
                    Call::PowerOn => text(bmc.power_on().await),
                    Call::SetNextBootPxe => text(bmc.set_next_boot_pxe().await),
                    Call::PowerState => match bmc.power_state().await {
                        Ok(PowerState::On) => CallResult::Power { on: true },
                        Ok(PowerState::Off) => CallResult::Power { on: false },
                        Err(error) => CallResult::Failed(error.to_string()),
                    },
                    Call::ForceDown { .. }
                    | Call::VmsOnHost { .. }
                    | Call::Evacuate { .. }
                    | Call::VmStatus { .. } => {
                        unreachable!("cloud calls are matched above")
                    }
                }
            }
        }
    }
}
