//! The firmware step of stage 1: apply the update Bearman ordered (download the bundle
//! with the verified download, run the updater through the host, report the outcome with
//! `POST /ipxe/{uuid}/firmware`) and do what Bearman answers: reboot, wait for its power
//! cycle, or register again. Which orders run, and what a run reports, is
//! [`crate::firmware`]'s.
//!
//! Every way this step ends but a reboot fails the attempt, so stage 1 registers again
//! after its backoff. The report is retried in place first (registering again before
//! reporting tells Bearman the update failed); an updater runs at most once per order in
//! a run ([`firmware::order_step`]), so a report that still did not arrive is sent again
//! when the order comes again, never re-earned by flashing twice.

use bearman_proto::{FirmwareNext, FirmwareOrder, FirmwareReport, FirmwareReportAnswer};

use super::fetch::{self, Limits};
use super::{seed_for, step, Options, StepError};
use crate::client::{BootClient, Connector};
use crate::firmware::{self, LastUpdate, OrderError, OrderStep, REPORT_ATTEMPTS_MAX};
use crate::host::{Host, WorkDir};
use crate::plan::Backoff;

/// The host restarted (a host whose reboot returns, not a real machine).
pub(super) struct Restarted;

/// Applies `order` (or resends the report of its earlier run) and obeys the answer.
/// `last` is the run's memory of the last update it ran.
pub(super) async fn update<C: Connector + Clone, H: Host>(
    options: &Options,
    connector: &C,
    client: &BootClient<C>,
    host: &mut H,
    order: &FirmwareOrder,
    last: &mut Option<LastUpdate>,
) -> Result<Restarted, StepError> {
    host.say(&firmware::update_line(order));
    let report = match firmware::order_step(last.as_ref(), order) {
        OrderStep::Resend(report) => {
            host.say(&format!(
                "firmware: bundle {} already ran in this boot; sending its report again",
                order.bundle
            ));
            report
        }
        OrderStep::Run => {
            let report = apply(options, connector, host, order).await;
            host.say(&firmware::outcome_line(&report));
            *last = Some(LastUpdate {
                report: report.clone(),
                answer: None,
            });
            report
        }
    };
    let answer = match deliver(options, client, host, &report).await {
        Ok(answer) => answer,
        Err(Undelivered::Stale(error)) => {
            // Bearman has no update of this bundle in flight: the report is stale, and
            // an order for the bundle that comes after this is a new one.
            *last = None;
            return Err(error);
        }
        Err(Undelivered::Failed(error)) => return Err(error),
    };
    if let Some(last) = last.as_mut() {
        last.answer = Some(answer.next);
    }
    match answer.next {
        FirmwareNext::Reboot => {
            host.say(&format!(
                "firmware: bearman says reboot to bring bundle {} into use; rebooting",
                order.bundle
            ));
            host.reboot()
                .await
                .map_err(step("rebooting after the firmware update"))?;
            Ok(Restarted)
        }
        FirmwareNext::AwaitPowerCycle => {
            let wait = options.power_cycle_wait;
            host.say(&format!(
                "firmware: bearman power-cycles this machine through its BMC; waiting up to {} s",
                wait.as_secs()
            ));
            tokio::time::sleep(wait).await;
            Err(StepError {
                what: "firmware".into(),
                why: format!(
                    "no power cycle within {} s of bundle {}; registering again",
                    wait.as_secs(),
                    order.bundle
                ),
            })
        }
        FirmwareNext::RegisterAgain => Err(StepError {
            what: "firmware".into(),
            why: format!(
                "bearman says register again after bundle {} ({})",
                order.bundle,
                outcome_word(&report)
            ),
        }),
    }
}

enum Undelivered {
    /// Bearman answered 409: no update of this bundle in flight.
    Stale(StepError),
    /// No answer after [`REPORT_ATTEMPTS_MAX`] tries.
    Failed(StepError),
}

/// Sends the report, retrying with the backoff up to [`REPORT_ATTEMPTS_MAX`] times.
async fn deliver<C: Connector, H: Host>(
    options: &Options,
    client: &BootClient<C>,
    host: &H,
    report: &FirmwareReport,
) -> Result<FirmwareReportAnswer, Undelivered> {
    let what = format!("reporting firmware bundle {}", report.bundle);
    // Its own jitter stream, apart from the attempts' backoff.
    let seed = seed_for(client.uuid().as_str(), options.seed_salt) ^ 0xf1_4a5e;
    let mut backoff = Backoff::new(options.backoff_start, options.backoff_cap, seed);
    let mut tries: u32 = 0;
    loop {
        tries += 1;
        let error = match client.report_firmware(report).await {
            Ok(answer) => return Ok(answer),
            Err(error) => error,
        };
        if error.status() == Some(409) {
            return Err(Undelivered::Stale(StepError {
                what,
                why: format!("{error}; registering again"),
            }));
        }
        if tries >= REPORT_ATTEMPTS_MAX {
            return Err(Undelivered::Failed(StepError {
                what,
                why: format!("{error} (after {tries} tries)"),
            }));
        }
        let delay = backoff.next().unwrap_or(options.backoff_cap);
        host.say(&format!(
            "{what}: {error}; retrying in {:.1} s",
            delay.as_secs_f64()
        ));
        tokio::time::sleep(delay).await;
    }
}

fn outcome_word(report: &FirmwareReport) -> &'static str {
    match report.outcome {
        bearman_proto::FirmwareOutcome::Applied => "applied",
        bearman_proto::FirmwareOutcome::Failed => "failed",
    }
}

/// Checks the order, downloads and verifies the bundle, runs the updater on it and
/// removes it again; the report says how that went. Nothing here fails the attempt: a
/// failure is a `Failed` report, which Bearman needs to hear.
async fn apply<C: Connector, H: Host>(
    options: &Options,
    connector: &C,
    host: &mut H,
    order: &FirmwareOrder,
) -> FirmwareReport {
    let timeout = match firmware::check_order(order, options.limits.bytes_max) {
        Ok(timeout) => timeout,
        Err(error) => return firmware::report_not_run(order, &format!("order refused: {error}")),
    };
    let work_dir = host.work_dir();
    if let Err(error) = work_dir.create_dir_all().await {
        return firmware::report_not_run(
            order,
            &format!("creating {}: {error}", work_dir.path().display()),
        );
    }
    host.say(&format!(
        "firmware: downloading bundle {} ({} bytes)",
        order.bundle, order.size_bytes
    ));
    // The order's size is the limit: a bundle that grows past it is cut off, not kept.
    let limits = Limits {
        bytes_max: order.size_bytes,
        ..options.limits
    };
    let name = firmware::bundle_file_name(&order.artifact.url);
    let downloaded = fetch::download(
        connector,
        &order.artifact.url,
        &order.artifact.sha256,
        host.work_dir(),
        &name,
        limits,
    )
    .await;
    let path = match downloaded {
        Ok(path) => path,
        Err(error) => {
            return firmware::report_not_run(order, &format!("bundle download failed: {error}"))
        }
    };
    let argv = path
        .to_str()
        .ok_or_else(|| OrderError::PathNotUtf8(path.display().to_string()))
        .and_then(|file| firmware::updater_argv(&order.command, file));
    let report = match argv {
        Err(error) => firmware::report_not_run(order, &format!("updater not run: {error}")),
        Ok(argv) => {
            host.say(&firmware::running_line(&argv, timeout));
            let run = host.run_updater(&argv, timeout).await;
            firmware::report_for_run(order, &run)
        }
    };
    // The work directory is RAM (a tmpfs): stage 2's kernel and initrds need the room.
    if let Err(error) = host.work_dir().remove(&path).await {
        host.say(&format!(
            "firmware: removing {}: {error}; going on",
            path.display()
        ));
    }
    report
}
