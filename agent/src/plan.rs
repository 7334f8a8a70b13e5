//! Pure stage-1/stage-2 decisions: reading `bearman.url=` / `bearman.uuid=` (and the tuning
//! keys `bearman.lldp_wait_s=`, `bearman.bmc_channel=`) from the kernel command line, turning a [`BootPlan`] into a [`KexecPlan`], the retry backoff schedule and
//! the firmware comparison.
//!
//! Architecture invariant: no I/O, no clock, no OS randomness. The backoff's jitter comes
//! from a generator seeded by the caller (stage 1 seeds it from the node's uuid, so a rack
//! that lost power together does not retry in lockstep, yet every run is reproducible).

use std::time::Duration;

use bearman_proto::uuid::{InvalidUuid, NodeUuid};
use bearman_proto::Artifact;

use crate::client::BootPlan;

/// Kernel command-line key carrying the daemon's base URL.
pub const URL_KEY: &str = "bearman.url";
/// Kernel command-line key carrying the node's uuid, as iPXE expanded `${uuid}`.
pub const UUID_KEY: &str = "bearman.uuid";
/// Kernel command-line key: seconds stage 1 listens for LLDP on each NIC (0 disables).
pub const LLDP_WAIT_KEY: &str = "bearman.lldp_wait_s";
/// Kernel command-line key: the IPMI LAN channel stage 1 configures.
pub const BMC_CHANNEL_KEY: &str = "bearman.bmc_channel";
/// Switches send LLDP every 30 s by default: a second more hears at least one frame.
pub const LLDP_WAIT_DEFAULT: Duration = Duration::from_secs(31);
/// Longer waits are clamped: stage 1 must not sit for minutes on a typo.
pub const LLDP_WAIT_MAX: Duration = Duration::from_secs(120);
/// The LAN channel of most BMCs.
pub const BMC_CHANNEL_DEFAULT: u8 = 1;
/// IPMI channel numbers are 4 bits.
pub const BMC_CHANNEL_MAX: u8 = 15;
/// Longest command line read; the kernel's own limit is a few KiB.
const CMDLINE_BYTES_MAX: usize = 64 * 1024;

/// What stage 1 and stage 2 learn from the kernel command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootArgs {
    pub url: String,
    pub uuid: NodeUuid,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    #[error("kernel command line has no {key}= (iPXE must append it)")]
    Missing { key: &'static str },
    #[error("kernel command line has {key}= but no value")]
    Empty { key: &'static str },
    #[error("{key}={value}: iPXE did not expand the variable (is the script run by iPXE?)")]
    Unexpanded { key: &'static str, value: String },
    #[error("{key}: {source}")]
    Uuid {
        key: &'static str,
        source: InvalidUuid,
    },
    #[error("{key}={value}: expected http://host[:port]/path")]
    Url { key: &'static str, value: String },
    #[error("kernel command line has an unterminated double quote")]
    UnterminatedQuote,
    #[error("kernel command line exceeds {CMDLINE_BYTES_MAX} bytes")]
    TooLong,
}

/// Splits a command line the way the kernel does: whitespace separates parameters, double
/// quotes group (`key="a b"`) and are removed.
pub fn split_cmdline(text: &str) -> Result<Vec<String>, CmdlineError> {
    if text.len() > CMDLINE_BYTES_MAX {
        return Err(CmdlineError::TooLong);
    }
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for ch in text.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err(CmdlineError::UnterminatedQuote);
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The value of the last `key=` parameter (later parameters override earlier ones, as for
/// the kernel's own).
pub fn cmdline_value(words: &[String], key: &str) -> Option<String> {
    words.iter().rev().find_map(|word| {
        word.strip_prefix(key)?
            .strip_prefix('=')
            .map(str::to_string)
    })
}

/// Reads `bearman.url=` and `bearman.uuid=` from `/proc/cmdline` text.
pub fn parse_cmdline(text: &str) -> Result<BootArgs, CmdlineError> {
    let words = split_cmdline(text)?;
    let value = |key: &'static str| -> Result<String, CmdlineError> {
        let value = cmdline_value(&words, key).ok_or(CmdlineError::Missing { key })?;
        if value.is_empty() {
            return Err(CmdlineError::Empty { key });
        }
        if value.contains("${") {
            return Err(CmdlineError::Unexpanded { key, value });
        }
        Ok(value)
    };
    let url = value(URL_KEY)?;
    if bearman_proto::http::HttpUrl::parse(&url).is_err() {
        return Err(CmdlineError::Url {
            key: URL_KEY,
            value: url,
        });
    }
    let uuid = NodeUuid::parse(&value(UUID_KEY)?).map_err(|source| CmdlineError::Uuid {
        key: UUID_KEY,
        source,
    })?;
    Ok(BootArgs { url, uuid })
}

/// Stage 1's tuning from the kernel command line. A bad value never stops stage 1: it
/// falls back to the default (or the limit) and says so in `warnings`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// How long to listen for LLDP on each NIC; zero disables listening.
    pub lldp_wait: Duration,
    /// IPMI LAN channel for `ipmitool lan set`.
    pub bmc_channel: u8,
    /// One console line per value that was not taken as written.
    pub warnings: Vec<String>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            lldp_wait: LLDP_WAIT_DEFAULT,
            bmc_channel: BMC_CHANNEL_DEFAULT,
            warnings: Vec::new(),
        }
    }
}

/// Reads `bearman.lldp_wait_s=` and `bearman.bmc_channel=` from `/proc/cmdline` text.
/// A command line that does not split (unterminated quote) gives the defaults; reading the
/// url and uuid reports that error.
pub fn parse_tuning(text: &str) -> Tuning {
    let mut tuning = Tuning::default();
    let Ok(words) = split_cmdline(text) else {
        return tuning;
    };
    if let Some(value) = cmdline_value(&words, LLDP_WAIT_KEY) {
        let default_s = LLDP_WAIT_DEFAULT.as_secs();
        let max_s = LLDP_WAIT_MAX.as_secs();
        match value.parse::<u64>() {
            Ok(seconds) if seconds > max_s => {
                tuning.lldp_wait = LLDP_WAIT_MAX;
                tuning.warnings.push(format!(
                    "{LLDP_WAIT_KEY}={seconds} is above the {max_s} s limit; waiting {max_s} s"
                ));
            }
            Ok(seconds) => tuning.lldp_wait = Duration::from_secs(seconds),
            Err(_) => tuning.warnings.push(format!(
                "{LLDP_WAIT_KEY}={value:?} is not a whole number of seconds; waiting {default_s} s"
            )),
        }
    }
    if let Some(value) = cmdline_value(&words, BMC_CHANNEL_KEY) {
        match value.parse::<u8>() {
            Ok(channel) if channel <= BMC_CHANNEL_MAX => tuning.bmc_channel = channel,
            _ => tuning.warnings.push(format!(
                "{BMC_CHANNEL_KEY}={value:?} is not a channel number 0..={BMC_CHANNEL_MAX}; using channel {BMC_CHANNEL_DEFAULT}"
            )),
        }
    }
    tuning
}

/// Everything the kexec step needs: what to download, what to verify, what to pass on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KexecPlan {
    pub kernel: Artifact,
    pub initrds: Vec<Artifact>,
    /// The profile's command line, handed to the stage-2 kernel unchanged.
    pub cmdline: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("bearman says this node must not boot: {0}")]
    Exit(String),
    #[error("the target script does not boot a kernel")]
    NoKernel,
    #[error("script kernel {script} but profile kernel {profile}")]
    KernelMismatch { script: String, profile: String },
    #[error("script initrds {script:?} but profile initrds {profile:?}")]
    InitrdMismatch {
        script: Vec<String>,
        profile: Vec<String>,
    },
    #[error("{url}: sha256 {sha256:?} is not 64 lowercase hex digits")]
    BadChecksum { url: String, sha256: String },
}

impl KexecPlan {
    /// Builds the plan from what the daemon said. The script and the profile must name the
    /// same kernel and initrds; checksums come from the profile, the only place they exist.
    pub fn from_boot_plan(plan: &BootPlan) -> Result<KexecPlan, PlanError> {
        if plan.script.exit {
            return Err(PlanError::Exit(plan.script.messages.join(" ")));
        }
        let kernel = plan.script.kernel.as_ref().ok_or(PlanError::NoKernel)?;
        if kernel.url != plan.profile.kernel.url {
            return Err(PlanError::KernelMismatch {
                script: kernel.url.clone(),
                profile: plan.profile.kernel.url.clone(),
            });
        }
        let profile_initrds: Vec<String> = plan
            .profile
            .initrds
            .iter()
            .map(|artifact| artifact.url.clone())
            .collect();
        if plan.script.initrds != profile_initrds {
            return Err(PlanError::InitrdMismatch {
                script: plan.script.initrds.clone(),
                profile: profile_initrds,
            });
        }
        for artifact in std::iter::once(&plan.profile.kernel).chain(&plan.profile.initrds) {
            if !is_sha256_hex(&artifact.sha256) {
                return Err(PlanError::BadChecksum {
                    url: artifact.url.clone(),
                    sha256: artifact.sha256.clone(),
                });
            }
        }
        Ok(KexecPlan {
            kernel: plan.profile.kernel.clone(),
            initrds: plan.profile.initrds.clone(),
            cmdline: plan.profile.cmdline.clone(),
        })
    }
}

/// True for 64 lowercase hex digits, the form every sha256 in the protocol takes.
pub(crate) fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

/// A small deterministic generator (splitmix64): enough to spread retries, never seeded
/// from the OS.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A seed derived from text (FNV-1a), e.g. the node's uuid.
    pub fn seed_from(text: &str) -> u64 {
        text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, bound)`; `bound` 0 gives 0.
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }
}

/// Stage 1's retry schedule: start 1 s, cap 60 s.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Capped exponential backoff with jitter: the base doubles from `start` up to `cap`; each
/// delay is the base minus up to a quarter of it, so delays never exceed `cap` and a fleet
/// rebooting together spreads out. Infinite: the caller bounds the attempts.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    rng: SplitMix64,
}

impl Backoff {
    pub fn new(start: Duration, cap: Duration, seed: u64) -> Self {
        assert!(start <= cap, "backoff start {start:?} above cap {cap:?}");
        Backoff {
            base: start,
            cap,
            rng: SplitMix64::new(seed),
        }
    }

    /// The stage-1 schedule (1 s … 60 s).
    pub fn stage1(seed: u64) -> Self {
        Backoff::new(BACKOFF_START, BACKOFF_CAP, seed)
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.base;
        self.base = (self.base * 2).min(self.cap);
        let quarter_ms = u64::try_from(base.as_millis() / 4).unwrap_or(u64::MAX);
        let jitter = Duration::from_millis(self.rng.below(quarter_ms + 1));
        Some(base - jitter)
    }
}

/// `period` ± up to a tenth, for stage 2's heartbeat.
pub fn jittered(period: Duration, rng: &mut SplitMix64) -> Duration {
    let tenth_ms = u64::try_from(period.as_millis() / 10).unwrap_or(u64::MAX);
    let offset = rng.below(2 * tenth_ms + 1);
    period - Duration::from_millis(tenth_ms) + Duration::from_millis(offset)
}

// The comparison is the protocol's, so daemon and agent judge firmware alike.
pub use bearman_proto::firmware::{differences as firmware_differences, FirmwareDifference};

#[cfg(test)]
mod tests {
    use super::*;
    use bearman_proto::ipxe::{BootScript, KernelLine};
    use bearman_proto::{BootProfile, FirmwareVersions, NetworkDetail, RegisterResponse};

    const UUID: &str = "4c4c4544-0042-3510-8052-b4c04f333232";

    fn check_cmdline(text: &str, expect: Result<(&str, &str), &str>) {
        let got = parse_cmdline(text)
            .map(|args| (args.url, args.uuid.as_str().to_string()))
            .map_err(|error| error.to_string());
        let expect = expect
            .map(|(url, uuid)| (url.to_string(), uuid.to_string()))
            .map_err(str::to_string);
        assert_eq!(got, expect, "cmdline {text:?}");
    }

    #[test]
    fn cmdline_gives_url_and_uuid() {
        check_cmdline(
            &format!("console=ttyS0 bearman.url=http://10.0.0.1:8080 bearman.uuid={UUID} quiet\n"),
            Ok(("http://10.0.0.1:8080", UUID)),
        );
        // Quotes group and are removed; uppercase uuids (dmidecode) are normalised.
        check_cmdline(
            &format!(
                "a=\"x y\" bearman.url=\"http://h/base\" bearman.uuid={}",
                UUID.to_uppercase()
            ),
            Ok(("http://h/base", UUID)),
        );
        // The last occurrence wins, as for kernel parameters.
        check_cmdline(
            &format!("bearman.url=http://old bearman.url=http://new bearman.uuid={UUID}"),
            Ok(("http://new", UUID)),
        );
    }

    #[test]
    fn cmdline_errors_name_the_key() {
        check_cmdline(
            &format!("bearman.uuid={UUID}"),
            Err("kernel command line has no bearman.url= (iPXE must append it)"),
        );
        check_cmdline(
            "bearman.url=http://h",
            Err("kernel command line has no bearman.uuid= (iPXE must append it)"),
        );
        check_cmdline(
            "bearman.url=http://h bearman.uuid=${uuid}",
            Err("bearman.uuid=${uuid}: iPXE did not expand the variable (is the script run by iPXE?)"),
        );
        check_cmdline(
            "bearman.url= bearman.uuid=x",
            Err("kernel command line has bearman.url= but no value"),
        );
        check_cmdline(
            &format!("bearman.url=https://h bearman.uuid={UUID}"),
            Err("bearman.url=https://h: expected http://host[:port]/path"),
        );
        check_cmdline(
            "bearman.url=http://h bearman.uuid=nope",
            Err("bearman.uuid: invalid uuid \"nope\": expected 32 hex digits as 8-4-4-4-12"),
        );
        check_cmdline(
            "bearman.url=\"http://h",
            Err("kernel command line has an unterminated double quote"),
        );
        // A key that merely starts like ours is not ours.
        assert_eq!(
            cmdline_value(&split_cmdline("bearman.urlx=1").unwrap(), URL_KEY),
            None
        );
    }

    #[test]
    fn tuning_defaults_and_overrides() {
        let check = |text: &str, wait_s: u64, channel: u8, warnings: &[&str]| {
            let tuning = parse_tuning(text);
            assert_eq!(
                (
                    tuning.lldp_wait,
                    tuning.bmc_channel,
                    tuning.warnings.clone()
                ),
                (
                    Duration::from_secs(wait_s),
                    channel,
                    warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>()
                ),
                "cmdline {text:?}"
            );
        };
        check("bearman.url=http://h quiet", 31, 1, &[]);
        check("bearman.lldp_wait_s=0 bearman.bmc_channel=8", 0, 8, &[]);
        check("bearman.lldp_wait_s=5 bearman.lldp_wait_s=7", 7, 1, &[]);
        check(
            "bearman.lldp_wait_s=600",
            120,
            1,
            &["bearman.lldp_wait_s=600 is above the 120 s limit; waiting 120 s"],
        );
        check(
            "bearman.lldp_wait_s=-1 bearman.bmc_channel=16",
            31,
            1,
            &[
                "bearman.lldp_wait_s=\"-1\" is not a whole number of seconds; waiting 31 s",
                "bearman.bmc_channel=\"16\" is not a channel number 0..=15; using channel 1",
            ],
        );
        check(
            "bearman.bmc_channel=x",
            31,
            1,
            &["bearman.bmc_channel=\"x\" is not a channel number 0..=15; using channel 1"],
        );
        // A broken command line gives the defaults; parse_cmdline reports it.
        check("bearman.lldp_wait_s=\"5", 31, 1, &[]);
    }

    fn artifact(url: &str, fill: char) -> Artifact {
        Artifact {
            url: url.into(),
            sha256: fill.to_string().repeat(64),
        }
    }

    fn boot_plan() -> BootPlan {
        BootPlan {
            registration: RegisterResponse {
                uuid: UUID.into(),
                hostname: "n1".into(),
                state: "ready".into(),
                bmc: None,
                firmware_expected: FirmwareVersions::default(),
                awaiting_acceptance: false,
                firmware_update: None,
                firmware_hold: None,
            },
            script: BootScript {
                kernel: Some(KernelLine {
                    url: "http://h/k".into(),
                    args: "script args".into(),
                }),
                initrds: vec!["http://h/i1".into(), "http://h/i2".into()],
                exit: false,
                messages: vec![],
            },
            profile: BootProfile {
                flavor: "hv".into(),
                kernel: artifact("http://h/k", 'a'),
                initrds: vec![artifact("http://h/i1", 'b'), artifact("http://h/i2", 'c')],
                cmdline: "console=ttyS0 bearman.url=http://h".into(),
            },
            detail: NetworkDetail {
                hostname: "n1".into(),
                vlan: None,
                bond0_addresses: vec![],
                bond0_slaves: vec![],
                gateway: None,
                dns: vec![],
                mtu: 1500,
            },
        }
    }

    #[test]
    fn kexec_plan_takes_artifacts_and_cmdline_from_the_profile() {
        let plan = KexecPlan::from_boot_plan(&boot_plan()).unwrap();
        assert_eq!(plan.kernel, artifact("http://h/k", 'a'));
        assert_eq!(
            plan.initrds,
            vec![artifact("http://h/i1", 'b'), artifact("http://h/i2", 'c')]
        );
        assert_eq!(plan.cmdline, "console=ttyS0 bearman.url=http://h");
    }

    #[test]
    fn kexec_plan_refuses_disagreement_and_bad_checksums() {
        let mut exit = boot_plan();
        exit.script.exit = true;
        exit.script.messages = vec!["retired".into()];
        assert_eq!(
            KexecPlan::from_boot_plan(&exit),
            Err(PlanError::Exit("retired".into()))
        );

        let mut kernel = boot_plan();
        kernel.profile.kernel.url = "http://h/other".into();
        assert!(matches!(
            KexecPlan::from_boot_plan(&kernel),
            Err(PlanError::KernelMismatch { .. })
        ));

        let mut initrds = boot_plan();
        initrds.script.initrds.pop();
        assert!(matches!(
            KexecPlan::from_boot_plan(&initrds),
            Err(PlanError::InitrdMismatch { .. })
        ));

        let mut checksum = boot_plan();
        checksum.profile.initrds[1].sha256 = "ABC".into();
        assert_eq!(
            KexecPlan::from_boot_plan(&checksum)
                .unwrap_err()
                .to_string(),
            "http://h/i2: sha256 \"ABC\" is not 64 lowercase hex digits"
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let delays: Vec<Duration> = Backoff::stage1(7).take(10).collect();
        let bases = [1, 2, 4, 8, 16, 32, 60, 60, 60, 60];
        for (delay, base) in delays.iter().zip(bases) {
            let base = Duration::from_secs(base);
            assert!(
                *delay <= base && *delay >= base * 3 / 4,
                "{delay:?} vs {base:?}"
            );
        }
        // Same seed, same schedule; another seed, another schedule.
        assert_eq!(delays, Backoff::stage1(7).take(10).collect::<Vec<_>>());
        assert_ne!(delays, Backoff::stage1(8).take(10).collect::<Vec<_>>());
    }

    #[test]
    fn heartbeat_jitter_stays_within_a_tenth() {
        let mut rng = SplitMix64::new(SplitMix64::seed_from(UUID));
        for _ in 0..1000 {
            let delay = jittered(Duration::from_secs(10), &mut rng);
            assert!(delay >= Duration::from_secs(9) && delay <= Duration::from_secs(11));
        }
    }

    #[test]
    fn firmware_differences_list_what_is_behind() {
        let expected = FirmwareVersions {
            bios: Some("2.1".into()),
            bmc: None,
            nics: [("eno1".to_string(), "22.31".to_string())].into(),
        };
        let reported = FirmwareVersions {
            bios: Some("2.0".into()),
            bmc: Some("anything".into()),
            nics: Default::default(),
        };
        let differences: Vec<String> = firmware_differences(&expected, &reported)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            differences,
            vec![
                "bios firmware 2.0, expected 2.1",
                "nic:eno1 firmware unknown, expected 22.31"
            ]
        );
        assert!(firmware_differences(&expected, &expected).is_empty());
    }
}
