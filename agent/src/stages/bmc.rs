//! The BMC steps of stage 1: find it, read its MAC (`ipmitool lan print`) and firmware
//! revision (`ipmitool mc info`) for registration, and give it the LAN settings Bearman
//! answered with (`ipmitool lan set`, planned by [`crate::bmc::plan_lan`]), through the
//! host's [`Ipmitool`].
//!
//! Never fatal: registration has already happened when the BMC is configured, and a BMC
//! that refuses a setting must not stop the machine from booting. Every problem is one
//! console line; the run goes on.

use std::path::PathBuf;

use bearman_proto::{BmcFacts, BmcSettings};

use crate::bmc::{lan_print_args, mc_info_args, parse_lan_print, parse_mc_info, plan_lan};
use crate::stage1::bmc::Ipmitool;

/// What stage 1 found out about the BMC before registering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presence {
    /// No BMC to configure; the line has been printed.
    Absent,
    /// A BMC reachable in-band; `facts` when `lan print` gave its MAC, `firmware` when
    /// `mc info` gave its firmware revision.
    Present {
        facts: Option<BmcFacts>,
        firmware: Option<String>,
    },
}

impl Presence {
    pub fn facts(&self) -> Option<&BmcFacts> {
        match self {
            Presence::Present { facts, .. } => facts.as_ref(),
            Presence::Absent => None,
        }
    }

    /// The BMC's firmware revision, for the registration's `firmware.bmc`.
    pub fn firmware(&self) -> Option<&String> {
        match self {
            Presence::Present { firmware, .. } => firmware.as_ref(),
            Presence::Absent => None,
        }
    }
}

/// Looks for the BMC and reads its MAC and address, then its firmware revision, printing
/// one line for each. `device` is the IPMI device node the host found, if any.
pub async fn discover(
    device: Option<PathBuf>,
    ipmitool: &dyn Ipmitool,
    channel: u8,
    say: &dyn Fn(&str),
) -> Presence {
    let Some(device) = device else {
        say("no BMC found (no /dev/ipmi0); skipping BMC configuration");
        return Presence::Absent;
    };
    if !ipmitool.available() {
        say(&format!(
            "BMC device {} found but ipmitool is not on PATH; skipping BMC configuration",
            device.display()
        ));
        return Presence::Absent;
    }
    let args = lan_print_args(channel);
    let facts = match ipmitool.run(&args).await {
        Err(error) => {
            say(&format!(
                "reading the BMC: ipmitool {}: {error}; registering without BMC facts",
                args.join(" ")
            ));
            None
        }
        Ok(text) => match parse_lan_print(&text) {
            None => {
                say(&format!(
                    "reading the BMC: ipmitool {} shows no MAC address; registering without BMC facts",
                    args.join(" ")
                ));
                None
            }
            Some(facts) => {
                say(&format!(
                    "BMC on channel {channel}: mac {}, address {}",
                    facts.mac,
                    facts.address.as_deref().unwrap_or("none")
                ));
                Some(facts)
            }
        },
    };
    let firmware = read_firmware(ipmitool, say).await;
    Presence::Present { facts, firmware }
}

/// The BMC's firmware revision from `ipmitool mc info`; a failure is a line, and the
/// machine registers without it (the daemon then sees the BMC's version as unknown).
async fn read_firmware(ipmitool: &dyn Ipmitool, say: &dyn Fn(&str)) -> Option<String> {
    let args = mc_info_args();
    match ipmitool.run(&args).await {
        Err(error) => {
            say(&format!(
                "reading the BMC firmware revision: ipmitool {}: {error}; registering without it",
                args.join(" ")
            ));
            None
        }
        Ok(text) => match parse_mc_info(&text) {
            None => {
                say(&format!(
                    "reading the BMC firmware revision: ipmitool {} shows none; registering without it",
                    args.join(" ")
                ));
                None
            }
            Some(revision) => {
                say(&format!("BMC firmware revision {revision}"));
                Some(revision)
            }
        },
    }
}

/// How configuring ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Configured {
    /// Nothing was run (no BMC, no settings, or settings refused).
    Skipped,
    /// Every command succeeded.
    Done,
    /// A command failed; the ones after it were not run.
    Failed,
}

/// Gives the BMC the settings Bearman sent, one `ipmitool lan set` at a time, stopping at
/// the first failure (the later settings build on the earlier ones: a VLAN on a BMC
/// whose address did not take would only make it harder to reach).
pub async fn configure(
    presence: &Presence,
    settings: Option<&BmcSettings>,
    channel: u8,
    ipmitool: &dyn Ipmitool,
    say: &dyn Fn(&str),
) -> Configured {
    if *presence == Presence::Absent {
        return Configured::Skipped;
    }
    let Some(settings) = settings else {
        say("bearman sent no BMC settings (no bmc pool, or no BMC MAC was registered); BMC left as it is");
        return Configured::Skipped;
    };
    let commands = match plan_lan(settings, channel) {
        Ok(commands) => commands,
        Err(error) => {
            say(&format!(
                "BMC settings from bearman refused: {error}; BMC left as it is"
            ));
            return Configured::Skipped;
        }
    };
    for (index, args) in commands.iter().enumerate() {
        if let Err(error) = ipmitool.run(args).await {
            say(&format!(
                "BMC configuration failed: ipmitool {}: {error}; {} later command(s) not run; booting on",
                args.join(" "),
                commands.len() - index - 1
            ));
            return Configured::Failed;
        }
    }
    say(&format!(
        "BMC configured on channel {channel}: {}/{}, gateway {}, vlan {}",
        settings.address,
        settings.prefix_len,
        settings.gateway.as_deref().unwrap_or("none"),
        settings
            .vlan
            .map_or_else(|| "off".to_string(), |vlan| vlan.to_string())
    ));
    Configured::Done
}
