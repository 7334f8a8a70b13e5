//! Pure firmware decisions for stage 1: what a registration asks of the machine (boot,
//! wait, or update first), whether an ordered update is one the agent will run, the
//! updater's argument vector, what its run makes of the report to the daemon, whether an
//! order seen again in the same run is run again, and the console lines about it all; also
//! the line splitter and tail buffer the production host uses on the updater's output.
//!
//! Architecture invariant: no I/O, no clock. The sequence that downloads, runs and
//! reports is [`crate::stages::firmware`]'s; running the updater is the host's.

use std::collections::BTreeMap;
use std::time::Duration;

use bearman_proto::firmware::FirmwareDifference;
use bearman_proto::{
    FirmwareNext, FirmwareOrder, FirmwareOutcome, FirmwareReport, NicFacts, RegisterResponse,
    FIRMWARE_REPORT_DETAIL_MAX,
};

/// What `{file}` in an order's command stands for: the downloaded bundle's path.
pub const FILE_PLACEHOLDER: &str = "{file}";
/// Longest updater run an order may ask for (the daemon's own limit on a bundle's
/// `timeout_s`): the slowest BIOS and BMC flashers take tens of minutes; an order asking
/// for more is a mistake, not a slower flasher.
pub const UPDATER_TIMEOUT_MAX: Duration = Duration::from_secs(4 * 60 * 60);
/// Most arguments an updater command may have.
pub const COMMAND_ARGS_MAX: usize = 64;
/// Longest single argument of an updater command, before `{file}` is replaced.
pub const COMMAND_ARG_BYTES_MAX: usize = 4096;
/// How much of the updater's output is kept for the report (the end of it).
pub const UPDATER_OUTPUT_TAIL_BYTES: usize = 4096;
/// Longest updater output line echoed to the console; the rest of the line is cut.
pub const UPDATER_LINE_BYTES_MAX: usize = 240;
/// Output lines echoed to the console per run; later ones go only to the tail (a flasher
/// printing a progress line per block must not flood the serial console).
pub const UPDATER_LINES_ECHOED_MAX: usize = 2000;
/// How long stage 1 waits for the daemon to power-cycle the machine through its BMC
/// before it registers again.
pub const POWER_CYCLE_WAIT: Duration = Duration::from_secs(10 * 60);
/// Tries at delivering one firmware report, with the backoff between them, before the
/// attempt fails. The report is retried in place: registering again before reporting
/// tells the daemon the update failed.
pub const REPORT_ATTEMPTS_MAX: u32 = 6;
/// Longest hold reason quoted on the console.
pub const HOLD_REASON_CHARS_MAX: usize = 200;
/// Longest bundle file name kept from the artifact url (the extension some flashers need
/// survives; the rest of the name is cosmetic).
const FILE_NAME_CHARS_MAX: usize = 64;

/// What a registration tells stage 1 to do about firmware before anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instruction<'a> {
    /// Nothing: go on and boot.
    Boot,
    /// Wait: register again after the backoff, download nothing.
    Hold(&'a str),
    /// Apply this update first.
    Update(&'a FirmwareOrder),
}

/// Reads the registration's firmware fields. A hold wins over an order: a daemon that
/// sends both is confused, and waiting is the step that writes nothing.
pub fn instruction(registration: &RegisterResponse) -> Instruction<'_> {
    match (&registration.firmware_hold, &registration.firmware_update) {
        (Some(reason), _) => Instruction::Hold(reason),
        (None, Some(order)) => Instruction::Update(order),
        (None, None) => Instruction::Boot,
    }
}

/// Why an ordered update is not run. The daemon is told (a `Failed` report), so it stops
/// ordering what this agent cannot apply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("the updater command is empty")]
    EmptyCommand,
    #[error("the updater command names no program (its first argument is empty)")]
    EmptyProgram,
    #[error("the updater command has {count} arguments, more than {COMMAND_ARGS_MAX}")]
    TooManyArguments { count: usize },
    #[error("updater argument {index} is {len} bytes, more than {COMMAND_ARG_BYTES_MAX}")]
    ArgumentTooLong { index: usize, len: usize },
    #[error("updater argument {index} contains a NUL byte")]
    ArgumentNul { index: usize },
    #[error("the bundle is {size} bytes, more than this agent's {max}-byte download limit")]
    TooLarge { size: u64, max: u64 },
    #[error("timeout_s is 0")]
    NoTimeout,
    #[error("timeout_s {timeout_s} is above the {} s limit", UPDATER_TIMEOUT_MAX.as_secs())]
    TimeoutTooLong { timeout_s: u64 },
    #[error("success_exit_codes is empty: no run could succeed")]
    NoSuccessCodes,
    #[error("sha256 {0:?} is not 64 lowercase hex digits")]
    BadChecksum(String),
    #[error("the bundle's path {0:?} is not utf-8")]
    PathNotUtf8(String),
}

/// Checks an order before anything is downloaded; gives the updater's time limit.
pub fn check_order(order: &FirmwareOrder, download_bytes_max: u64) -> Result<Duration, OrderError> {
    check_command(&order.command)?;
    if order.size_bytes > download_bytes_max {
        return Err(OrderError::TooLarge {
            size: order.size_bytes,
            max: download_bytes_max,
        });
    }
    if !crate::plan::is_sha256_hex(&order.artifact.sha256) {
        return Err(OrderError::BadChecksum(order.artifact.sha256.clone()));
    }
    if order.success_exit_codes.is_empty() {
        return Err(OrderError::NoSuccessCodes);
    }
    let timeout = Duration::from_secs(order.timeout_s);
    if timeout.is_zero() {
        return Err(OrderError::NoTimeout);
    }
    if timeout > UPDATER_TIMEOUT_MAX {
        return Err(OrderError::TimeoutTooLong {
            timeout_s: order.timeout_s,
        });
    }
    Ok(timeout)
}

fn check_command(command: &[String]) -> Result<(), OrderError> {
    let program = command.first().ok_or(OrderError::EmptyCommand)?;
    if program.is_empty() {
        return Err(OrderError::EmptyProgram);
    }
    if command.len() > COMMAND_ARGS_MAX {
        return Err(OrderError::TooManyArguments {
            count: command.len(),
        });
    }
    for (index, argument) in command.iter().enumerate() {
        if argument.len() > COMMAND_ARG_BYTES_MAX {
            return Err(OrderError::ArgumentTooLong {
                index,
                len: argument.len(),
            });
        }
        if argument.contains('\0') {
            return Err(OrderError::ArgumentNul { index });
        }
    }
    Ok(())
}

/// The updater's argument vector: `command` with every `{file}` in every argument
/// replaced by `file`. Run as is, without a shell.
pub fn updater_argv(command: &[String], file: &str) -> Result<Vec<String>, OrderError> {
    check_command(command)?;
    Ok(command
        .iter()
        .map(|argument| argument.replace(FILE_PLACEHOLDER, file))
        .collect())
}

/// The name the bundle is saved under in the work directory: `firmware-` and the url's
/// last path segment reduced to `[A-Za-z0-9._-]` (so a vendor flasher that looks at the
/// extension sees it), or `firmware-bundle`. Never a path: the daemon's url cannot name
/// a file outside the work directory.
pub fn bundle_file_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let last = path.rsplit('/').next().unwrap_or_default();
    let kept: String = last
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect();
    // The end of a long name: that is where the extension is. Kept characters are ASCII,
    // so any byte offset is a char boundary.
    let kept = &kept[kept.len().saturating_sub(FILE_NAME_CHARS_MAX)..];
    // No hidden files, and never `.` or `..`.
    let kept = kept.trim_start_matches('.');
    if kept.is_empty() {
        "firmware-bundle".to_string()
    } else {
        format!("firmware-{kept}")
    }
}

/// `firmware: updating bios 1.0 -> 2.0 with bundle X` (one line, whatever the daemon's
/// strings hold).
pub fn update_line(order: &FirmwareOrder) -> String {
    one_line(&format!(
        "firmware: updating {} {} -> {} with bundle {}",
        order.component,
        order.from_version.as_deref().unwrap_or("(unknown)"),
        order.to_version,
        order.bundle
    ))
}

/// Longest updater command quoted on the console.
const RUNNING_LINE_CHARS_MAX: usize = 400;

/// `firmware: running <argv> (up to N s)`, the command cut to a console line.
pub fn running_line(argv: &[String], timeout: Duration) -> String {
    let command = one_line(&argv.join(" "));
    let mut shown: String = command.chars().take(RUNNING_LINE_CHARS_MAX).collect();
    if command.chars().count() > RUNNING_LINE_CHARS_MAX {
        shown.push('…');
    }
    format!("firmware: running {shown} (up to {} s)", timeout.as_secs())
}

/// The console lines about components not at their expected version, saying what
/// happens to each: the ordered component gets no warning (the update line says it),
/// the others say whether an update waits or no bundle applies.
pub fn difference_lines(
    differences: &[FirmwareDifference],
    instruction: Instruction<'_>,
) -> Vec<String> {
    differences
        .iter()
        .filter_map(|difference| match instruction {
            Instruction::Update(order) if order.component == difference.component => None,
            Instruction::Update(order) => Some(format!(
                "warning: {difference} (not in this update; bundle {} comes first)",
                order.bundle
            )),
            Instruction::Hold(_) => Some(format!(
                "warning: {difference} (its update waits; see below)"
            )),
            Instruction::Boot => Some(format!(
                "warning: {difference} (no firmware bundle applies)"
            )),
        })
        .collect()
}

/// A hold reason as the console shows it: one line, at most [`HOLD_REASON_CHARS_MAX`]
/// characters (it comes from the daemon, and the console is a serial line).
pub fn hold_reason_line(reason: &str) -> String {
    let mut line: String = one_line(reason)
        .chars()
        .take(HOLD_REASON_CHARS_MAX)
        .collect();
    if reason.chars().count() > HOLD_REASON_CHARS_MAX {
        line.push('…');
    }
    line
}

fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Firmware versions per NIC for the registration: the NICs (not `lo`) whose driver gave
/// one, by name.
pub fn nic_versions(
    nics: &[NicFacts],
    mut version_of: impl FnMut(&str) -> Option<String>,
) -> BTreeMap<String, String> {
    nics.iter()
        .filter(|nic| nic.name != "lo")
        .filter_map(|nic| version_of(&nic.name).map(|version| (nic.name.clone(), version)))
        .collect()
}

/// What came of running the updater.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdaterRun {
    pub ended: UpdaterEnd,
    /// The end of what it printed, stdout and stderr interleaved as lines arrived, at
    /// most [`UPDATER_OUTPUT_TAIL_BYTES`].
    pub output_tail: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpdaterEnd {
    /// It exited with this code.
    Exited(i32),
    /// A signal ended it (not ours: a timeout is [`UpdaterEnd::TimedOut`]).
    Signalled(i32),
    /// It ran past its time limit and was killed.
    TimedOut(Duration),
    /// It could not be started, or waiting for it failed.
    NotRun(String),
}

/// The report for a run of `order`'s updater: `Applied` for an exit code in
/// `success_exit_codes`, `Failed` with a one-line reason otherwise; the output's tail in
/// `detail` either way.
pub fn report_for_run(order: &FirmwareOrder, run: &UpdaterRun) -> FirmwareReport {
    let (outcome, exit_code, reason) = match &run.ended {
        UpdaterEnd::Exited(code) if order.success_exit_codes.contains(code) => {
            (FirmwareOutcome::Applied, Some(*code), None)
        }
        UpdaterEnd::Exited(code) => (
            FirmwareOutcome::Failed,
            Some(*code),
            Some(format!(
                "updater exited with code {code}, not a success code {:?}",
                order.success_exit_codes
            )),
        ),
        UpdaterEnd::Signalled(signal) => (
            FirmwareOutcome::Failed,
            None,
            Some(format!("updater was killed by signal {signal}")),
        ),
        UpdaterEnd::TimedOut(limit) => (
            FirmwareOutcome::Failed,
            None,
            Some(format!(
                "updater timed out after {} s and was killed",
                limit.as_secs()
            )),
        ),
        UpdaterEnd::NotRun(why) => (
            FirmwareOutcome::Failed,
            None,
            Some(format!("updater could not be run: {why}")),
        ),
    };
    FirmwareReport {
        bundle: order.bundle.clone(),
        outcome,
        exit_code,
        detail: detail(reason.as_deref(), &run.output_tail),
    }
}

/// A `Failed` report for an update whose updater never ran (refused order, download or
/// verification failure).
pub fn report_not_run(order: &FirmwareOrder, reason: &str) -> FirmwareReport {
    FirmwareReport {
        bundle: order.bundle.clone(),
        outcome: FirmwareOutcome::Failed,
        exit_code: None,
        detail: detail(Some(reason), ""),
    }
}

/// `reason` on the first line, then the output's tail, within
/// [`FIRMWARE_REPORT_DETAIL_MAX`] bytes: the reason is kept (cut if it alone is too long)
/// and the tail loses its beginning, since its last lines say the most.
pub fn detail(reason: Option<&str>, tail: &str) -> String {
    let max = FIRMWARE_REPORT_DETAIL_MAX;
    let mut text = reason
        .map(|reason| cut_end(&one_line(reason), max).to_string())
        .unwrap_or_default();
    let tail = tail.trim_end_matches('\n');
    let separator = usize::from(!text.is_empty());
    let room = max.saturating_sub(text.len() + separator);
    if tail.is_empty() || room == 0 {
        return text;
    }
    if separator == 1 {
        text.push('\n');
    }
    text.push_str(keep_end(tail, room));
    text
}

/// The longest prefix of `text` of at most `max` bytes that ends on a char boundary.
fn cut_end(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The longest suffix of `text` of at most `max` bytes that starts on a char boundary.
fn keep_end(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// What an order seen in this run makes stage 1 do, given the last bundle it ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderStep {
    /// Download, verify and run the updater.
    Run,
    /// This bundle already ran in this run: send its report again, run nothing.
    Resend(FirmwareReport),
}

/// The last update this stage-1 run applied (or tried to), and the daemon's answer to its
/// report once one came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastUpdate {
    pub report: FirmwareReport,
    pub answer: Option<FirmwareNext>,
}

/// An updater runs at most once per order in one stage-1 run: an order for the bundle
/// that last ran is answered with its report again (the report may not have arrived, or
/// the reboot or power cycle it led to did not happen), unless the daemon answered that
/// report with `RegisterAgain`, which is how it retries a failed update.
pub fn order_step(last: Option<&LastUpdate>, order: &FirmwareOrder) -> OrderStep {
    match last {
        Some(last)
            if last.report.bundle == order.bundle
                && last.answer != Some(FirmwareNext::RegisterAgain) =>
        {
            OrderStep::Resend(last.report.clone())
        }
        _ => OrderStep::Run,
    }
}

/// One line about a report's outcome: `bundle X applied (exit code 0)` or
/// `bundle X failed: <first line of the detail>`.
pub fn outcome_line(report: &FirmwareReport) -> String {
    match report.outcome {
        FirmwareOutcome::Applied => format!(
            "firmware: bundle {} applied (exit code {})",
            report.bundle,
            report
                .exit_code
                .map_or_else(|| "unknown".to_string(), |code| code.to_string())
        ),
        FirmwareOutcome::Failed => format!(
            "firmware: bundle {} failed: {}",
            report.bundle,
            report.detail.lines().next().unwrap_or("no detail")
        ),
    }
}

/// Splits an output stream into console lines: `\n` ends a line (a `\r` before it is
/// dropped), a lone `\r` starts the line over as a terminal would (progress bars), lines
/// are cut at [`UPDATER_LINE_BYTES_MAX`] bytes and control characters become spaces.
#[derive(Debug, Default)]
pub struct OutputLines {
    line: Vec<u8>,
    cut: bool,
    carriage: bool,
}

impl OutputLines {
    /// Feeds bytes; returns the lines they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &byte in bytes {
            if self.carriage && byte != b'\n' {
                self.line.clear();
                self.cut = false;
            }
            self.carriage = false;
            match byte {
                b'\n' => lines.push(self.take()),
                b'\r' => self.carriage = true,
                _ if self.line.len() < UPDATER_LINE_BYTES_MAX => self.line.push(byte),
                _ => self.cut = true,
            }
        }
        lines
    }

    /// The unterminated last line, if any.
    pub fn finish(mut self) -> Option<String> {
        (!self.line.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let bytes = std::mem::take(&mut self.line);
        let mut line = one_line(&String::from_utf8_lossy(&bytes));
        if std::mem::take(&mut self.cut) {
            line.push('…');
        }
        line
    }
}

/// The last [`UPDATER_OUTPUT_TAIL_BYTES`] of the output lines, whole lines where they fit.
#[derive(Debug, Default)]
pub struct OutputTail {
    text: String,
}

impl OutputTail {
    pub fn push_line(&mut self, line: &str) {
        self.text.push_str(line);
        self.text.push('\n');
        if self.text.len() > UPDATER_OUTPUT_TAIL_BYTES {
            let kept = keep_end(&self.text, UPDATER_OUTPUT_TAIL_BYTES);
            // Start at a line when one starts within what is kept.
            let kept = match kept.find('\n') {
                Some(newline) if newline + 1 < kept.len() => &kept[newline + 1..],
                _ => kept,
            };
            self.text = kept.to_string();
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bearman_proto::{Artifact, FirmwareRestart, FirmwareVersions};

    const SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn order() -> FirmwareOrder {
        FirmwareOrder {
            bundle: "x11-bios-2.0".into(),
            component: "bios".into(),
            from_version: Some("1.0".into()),
            to_version: "2.0".into(),
            artifact: Artifact {
                url: "http://h/firmware/X11_2.0.bin".into(),
                sha256: SHA.into(),
            },
            size_bytes: 1000,
            command: vec!["/usr/sbin/flash".into(), "-f".into(), "{file}".into()],
            timeout_s: 600,
            success_exit_codes: vec![0, 2],
            restart: FirmwareRestart::Reboot,
        }
    }

    fn registration() -> RegisterResponse {
        RegisterResponse {
            uuid: "u".into(),
            hostname: "h".into(),
            state: "registered".into(),
            bmc: None,
            firmware_expected: FirmwareVersions::default(),
            awaiting_acceptance: false,
            firmware_update: None,
            firmware_hold: None,
        }
    }

    #[test]
    fn a_hold_wins_over_an_order_and_nothing_means_boot() {
        let mut both = registration();
        both.firmware_update = Some(order());
        both.firmware_hold = Some("rollout paused".into());
        assert_eq!(instruction(&both), Instruction::Hold("rollout paused"));
        let mut update = registration();
        update.firmware_update = Some(order());
        assert_eq!(instruction(&update), Instruction::Update(&order()));
        assert_eq!(instruction(&registration()), Instruction::Boot);
    }

    fn check_order_case(change: impl FnOnce(&mut FirmwareOrder), expect: Result<u64, &str>) {
        let mut order = order();
        change(&mut order);
        let got = check_order(&order, 4096)
            .map(|timeout| timeout.as_secs())
            .map_err(|error| error.to_string());
        assert_eq!(got, expect.map_err(str::to_string), "{order:?}");
    }

    #[test]
    fn orders_the_agent_cannot_apply_are_refused_with_the_reason() {
        check_order_case(|_| {}, Ok(600));
        check_order_case(|o| o.size_bytes = 4096, Ok(600));
        check_order_case(
            |o| o.size_bytes = 4097,
            Err("the bundle is 4097 bytes, more than this agent's 4096-byte download limit"),
        );
        check_order_case(|o| o.command.clear(), Err("the updater command is empty"));
        check_order_case(
            |o| o.command[0].clear(),
            Err("the updater command names no program (its first argument is empty)"),
        );
        check_order_case(
            |o| o.command = vec!["x".into(); 65],
            Err("the updater command has 65 arguments, more than 64"),
        );
        check_order_case(
            |o| o.command[1] = "a".repeat(4097),
            Err("updater argument 1 is 4097 bytes, more than 4096"),
        );
        check_order_case(
            |o| o.command[2] = "a\0b".into(),
            Err("updater argument 2 contains a NUL byte"),
        );
        check_order_case(|o| o.timeout_s = 0, Err("timeout_s is 0"));
        check_order_case(|o| o.timeout_s = 14400, Ok(14400));
        check_order_case(
            |o| o.timeout_s = 14401,
            Err("timeout_s 14401 is above the 14400 s limit"),
        );
        check_order_case(
            |o| o.success_exit_codes.clear(),
            Err("success_exit_codes is empty: no run could succeed"),
        );
        check_order_case(
            |o| o.artifact.sha256 = "ABC".into(),
            Err("sha256 \"ABC\" is not 64 lowercase hex digits"),
        );
    }

    #[test]
    fn every_file_placeholder_is_replaced_and_nothing_else_changes() {
        let command: Vec<String> = [
            "/bin/flash",
            "--image={file}",
            "{file}",
            "{file}.log{file}",
            "{FILE}",
        ]
        .iter()
        .map(|word| word.to_string())
        .collect();
        assert_eq!(
            updater_argv(&command, "/run/bearman/firmware-x.bin").unwrap(),
            vec![
                "/bin/flash",
                "--image=/run/bearman/firmware-x.bin",
                "/run/bearman/firmware-x.bin",
                "/run/bearman/firmware-x.bin.log/run/bearman/firmware-x.bin",
                "{FILE}"
            ]
        );
        assert_eq!(updater_argv(&[], "/f"), Err(OrderError::EmptyCommand));
    }

    #[test]
    fn bundle_files_keep_the_urls_name_but_never_leave_the_work_dir() {
        for (url, expect) in [
            ("http://h/fw/X11_2.0.bin", "firmware-X11_2.0.bin"),
            ("http://h/fw/bios.zip?token=1#x", "firmware-bios.zip"),
            ("http://h/fw/../../etc/passwd", "firmware-passwd"),
            ("http://h/fw/..", "firmware-bundle"),
            ("http://h/fw/", "firmware-bundle"),
            ("http://h", "firmware-h"),
            ("http://h/a b$c", "firmware-abc"),
            ("http://h/.hidden", "firmware-hidden"),
        ] {
            assert_eq!(bundle_file_name(url), expect, "{url}");
        }
        let long = format!("http://h/{}.bin", "a".repeat(100));
        let name = bundle_file_name(&long);
        assert!(
            name.ends_with("aaa.bin") && name.len() == "firmware-".len() + 64,
            "{name}"
        );
    }

    #[test]
    fn the_update_line_names_component_versions_and_bundle() {
        assert_eq!(
            update_line(&order()),
            "firmware: updating bios 1.0 -> 2.0 with bundle x11-bios-2.0"
        );
        let mut unknown = order();
        unknown.from_version = None;
        assert_eq!(
            update_line(&unknown),
            "firmware: updating bios (unknown) -> 2.0 with bundle x11-bios-2.0"
        );
    }

    #[test]
    fn the_running_line_quotes_a_bounded_command() {
        let argv = vec![
            "/bin/flash".to_string(),
            "-f".into(),
            "/run/bearman/x".into(),
        ];
        assert_eq!(
            running_line(&argv, Duration::from_secs(600)),
            "firmware: running /bin/flash -f /run/bearman/x (up to 600 s)"
        );
        let long = vec!["y".repeat(1000)];
        assert_eq!(
            running_line(&long, Duration::from_secs(1)),
            format!("firmware: running {}… (up to 1 s)", "y".repeat(400))
        );
    }

    #[test]
    fn differences_say_what_happens_to_each_component() {
        let differences = vec![
            FirmwareDifference {
                component: "bios".into(),
                expected: "2.0".into(),
                reported: Some("1.0".into()),
            },
            FirmwareDifference {
                component: "nic:eno1".into(),
                expected: "22.31".into(),
                reported: None,
            },
        ];
        let order = order();
        let check = |instruction, expect: &[&str]| {
            assert_eq!(difference_lines(&differences, instruction), expect);
        };
        check(
            Instruction::Boot,
            &[
                "warning: bios firmware 1.0, expected 2.0 (no firmware bundle applies)",
                "warning: nic:eno1 firmware unknown, expected 22.31 (no firmware bundle applies)",
            ],
        );
        check(
            Instruction::Update(&order),
            &["warning: nic:eno1 firmware unknown, expected 22.31 (not in this update; bundle x11-bios-2.0 comes first)"],
        );
        check(
            Instruction::Hold("paused"),
            &[
                "warning: bios firmware 1.0, expected 2.0 (its update waits; see below)",
                "warning: nic:eno1 firmware unknown, expected 22.31 (its update waits; see below)",
            ],
        );
    }

    #[test]
    fn hold_reasons_are_one_bounded_line() {
        assert_eq!(hold_reason_line("rollout\npaused"), "rollout paused");
        let long = "x".repeat(300);
        assert_eq!(hold_reason_line(&long).chars().count(), 201);
    }

    #[test]
    fn nic_versions_skip_loopback_and_nics_without_one() {
        let nic = |name: &str| NicFacts {
            name: name.into(),
            mac: String::new(),
            speed_mbps: None,
            lldp: None,
        };
        let nics = [nic("eno1"), nic("eno2"), nic("lo")];
        let versions = nic_versions(&nics, |name| match name {
            "eno1" | "lo" => Some("22.31".into()),
            _ => None,
        });
        assert_eq!(versions, [("eno1".to_string(), "22.31".to_string())].into());
    }

    fn check_report(ended: UpdaterEnd, tail: &str, expect: (FirmwareOutcome, Option<i32>, &str)) {
        let report = report_for_run(
            &order(),
            &UpdaterRun {
                ended: ended.clone(),
                output_tail: tail.into(),
            },
        );
        assert_eq!(report.bundle, "x11-bios-2.0");
        assert_eq!(
            (report.outcome, report.exit_code, report.detail.as_str()),
            expect,
            "{ended:?}"
        );
    }

    #[test]
    fn runs_become_reports_with_a_reason_and_the_output_tail() {
        use FirmwareOutcome::{Applied, Failed};
        check_report(UpdaterEnd::Exited(0), "ok\n", (Applied, Some(0), "ok"));
        check_report(UpdaterEnd::Exited(2), "", (Applied, Some(2), ""));
        check_report(
            UpdaterEnd::Exited(3),
            "erasing\nflash write error\n",
            (
                Failed,
                Some(3),
                "updater exited with code 3, not a success code [0, 2]\nerasing\nflash write error",
            ),
        );
        check_report(
            UpdaterEnd::Signalled(11),
            "",
            (Failed, None, "updater was killed by signal 11"),
        );
        check_report(
            UpdaterEnd::TimedOut(Duration::from_secs(600)),
            "50%\n",
            (
                Failed,
                None,
                "updater timed out after 600 s and was killed\n50%",
            ),
        );
        check_report(
            UpdaterEnd::NotRun("No such file or directory (os error 2)".into()),
            "",
            (
                Failed,
                None,
                "updater could not be run: No such file or directory (os error 2)",
            ),
        );
        let refused = report_not_run(&order(), "order refused: timeout_s is 0");
        assert_eq!(
            (refused.outcome, refused.exit_code, refused.detail.as_str()),
            (Failed, None, "order refused: timeout_s is 0")
        );
    }

    #[test]
    fn details_are_capped_on_a_char_boundary_keeping_the_reason_and_the_last_output() {
        // 3-byte characters, so a cut at the byte limit would split one.
        let tail = format!("first line\n{}\nlast line", "€".repeat(2000));
        let text = detail(Some("updater exited with code 1"), &tail);
        assert!(text.len() <= FIRMWARE_REPORT_DETAIL_MAX, "{}", text.len());
        assert!(text.len() > FIRMWARE_REPORT_DETAIL_MAX - 3);
        assert!(text.starts_with("updater exited with code 1\n€"));
        assert!(text.ends_with("\nlast line"));
        assert!(!text.contains("first line"));

        let reason = "é".repeat(3000);
        let text = detail(Some(&reason), "tail");
        assert!(text.len() <= FIRMWARE_REPORT_DETAIL_MAX);
        assert!(text.starts_with("éé") && !text.contains("tail"));
        assert_eq!(detail(Some("a\nb"), ""), "a b");
        assert_eq!(detail(None, "x\n"), "x");
    }

    #[test]
    fn an_order_runs_once_per_run_unless_the_daemon_said_register_again() {
        let report = report_not_run(&order(), "download failed");
        let last = |answer| LastUpdate {
            report: report.clone(),
            answer,
        };
        let other = FirmwareOrder {
            bundle: "other".into(),
            ..order()
        };
        let table: [(Option<LastUpdate>, &FirmwareOrder, OrderStep); 6] = [
            (None, &order(), OrderStep::Run),
            (
                Some(last(None)),
                &order(),
                OrderStep::Resend(report.clone()),
            ),
            (
                Some(last(Some(FirmwareNext::Reboot))),
                &order(),
                OrderStep::Resend(report.clone()),
            ),
            (
                Some(last(Some(FirmwareNext::AwaitPowerCycle))),
                &order(),
                OrderStep::Resend(report.clone()),
            ),
            (
                Some(last(Some(FirmwareNext::RegisterAgain))),
                &order(),
                OrderStep::Run,
            ),
            (Some(last(None)), &other, OrderStep::Run),
        ];
        for (last, order, expect) in table {
            assert_eq!(order_step(last.as_ref(), order), expect, "{last:?}");
        }
    }

    #[test]
    fn outcome_lines_name_the_bundle_and_the_first_line_of_the_reason() {
        let run = |ended| UpdaterRun {
            ended,
            output_tail: "out\n".into(),
        };
        assert_eq!(
            outcome_line(&report_for_run(&order(), &run(UpdaterEnd::Exited(0)))),
            "firmware: bundle x11-bios-2.0 applied (exit code 0)"
        );
        assert_eq!(
            outcome_line(&report_for_run(&order(), &run(UpdaterEnd::Exited(1)))),
            "firmware: bundle x11-bios-2.0 failed: updater exited with code 1, not a success code [0, 2]"
        );
    }

    #[test]
    fn output_is_split_into_bounded_console_lines() {
        let mut lines = OutputLines::default();
        assert_eq!(lines.push(b"one\r\ntw"), vec!["one"]);
        assert_eq!(lines.push(b"o\n10%\r20%\r30%\n"), vec!["two", "30%"]);
        assert_eq!(lines.push(b"bell\x07tab\tend\n"), vec!["bell tab end"]);
        assert_eq!(lines.push(b"caf\xc3"), Vec::<String>::new());
        assert_eq!(lines.push(b"\xa9\n"), vec!["café"]);
        let long = vec![b'x'; 1000];
        let cut = lines.push(&[long.as_slice(), b"\n"].concat());
        assert_eq!(cut.len(), 1);
        assert_eq!(cut[0].len(), UPDATER_LINE_BYTES_MAX + '…'.len_utf8());
        assert_eq!(lines.push(b"unterminated"), Vec::<String>::new());
        assert_eq!(lines.finish(), Some("unterminated".to_string()));
        assert_eq!(OutputLines::default().finish(), None);
    }

    #[test]
    fn the_output_tail_keeps_the_last_whole_lines_within_its_limit() {
        let mut tail = OutputTail::default();
        for index in 0..1000 {
            tail.push_line(&format!("line {index}"));
        }
        let text = tail.into_text();
        assert!(text.len() <= UPDATER_OUTPUT_TAIL_BYTES);
        assert!(text.starts_with("line "), "{}", &text[..20]);
        assert!(text.ends_with("line 999\n"));
        let mut short = OutputTail::default();
        short.push_line("a");
        short.push_line("b");
        assert_eq!(short.text(), "a\nb\n");
    }
}
