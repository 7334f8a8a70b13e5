//! The BMC in stage 1: find it (`/dev/ipmi0` and `ipmitool` on PATH), read its MAC for
//! registration (`ipmitool lan print`), and give it the LAN settings Bearman answered with
//! (`ipmitool lan set`, planned by [`crate::bmc::plan_lan`]).
//!
//! Never fatal: registration has already happened when the BMC is configured, and a BMC
//! that refuses a setting must not stop the machine from booting. Every problem is one
//! console line; the run goes on. Commands go through the [`Ipmitool`] trait so tests
//! check the exact argument vectors; only [`SystemIpmitool`] runs a process.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use bearman_proto::{BmcFacts, BmcSettings};

use crate::bmc::{ipmitool_error_line, lan_print_args, parse_lan_print, plan_lan, BMC_DEVICES};

/// Bound on one ipmitool command (in-band KCS answers in well under a second; a wedged BMC
/// never does).
pub const IPMITOOL_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest stderr quoted on the console (one line: see [`ipmitool_error_line`]).
const STDERR_CHARS_MAX: usize = 400;

/// Runs ipmitool with an argument vector (the program name not included).
pub trait Ipmitool: Send + Sync {
    /// True when the program can be run at all.
    fn available(&self) -> bool;
    /// Runs `ipmitool <args>`: its stdout, or what went wrong (exit status and stderr,
    /// or the timeout).
    fn run<'a>(
        &'a self,
        args: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;
}

/// The real ipmitool, found on PATH, each run bounded by `timeout` and killed past it.
#[derive(Clone, Debug)]
pub struct SystemIpmitool {
    pub timeout: Duration,
}

impl Default for SystemIpmitool {
    fn default() -> Self {
        SystemIpmitool {
            timeout: IPMITOOL_TIMEOUT,
        }
    }
}

impl Ipmitool for SystemIpmitool {
    fn available(&self) -> bool {
        find_on_path("ipmitool").is_some()
    }

    fn run<'a>(
        &'a self,
        args: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        Box::pin(async move {
            let mut command = tokio::process::Command::new("ipmitool");
            command
                .args(args)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            let output = match tokio::time::timeout(self.timeout, command.output()).await {
                Err(_) => return Err(format!("no answer within {} s", self.timeout.as_secs())),
                Ok(Err(error)) => return Err(error.to_string()),
                Ok(Ok(output)) => output,
            };
            if output.status.success() {
                Ok(String::from_utf8_lossy(&output.stdout).into_owned())
            } else {
                let stderr =
                    ipmitool_error_line(&String::from_utf8_lossy(&output.stderr), STDERR_CHARS_MAX);
                Err(format!("{}: {stderr}", output.status))
            }
        })
    }
}

/// The first executable file called `program` in `$PATH`'s directories.
fn find_on_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// The first IPMI device node present under `root`.
pub fn find_device(root: &Path) -> Option<PathBuf> {
    BMC_DEVICES
        .iter()
        .map(|device| root.join(device))
        .find(|path| path.exists())
}

/// What stage 1 found out about the BMC before registering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presence {
    /// No BMC to configure; the line has been printed.
    Absent,
    /// A BMC reachable in-band; `facts` when `lan print` gave its MAC.
    Present { facts: Option<BmcFacts> },
}

impl Presence {
    pub fn facts(&self) -> Option<&BmcFacts> {
        match self {
            Presence::Present { facts } => facts.as_ref(),
            Presence::Absent => None,
        }
    }
}

/// Looks for the BMC and reads its MAC and address, printing one line with the result.
pub async fn discover(
    root: &Path,
    ipmitool: &dyn Ipmitool,
    channel: u8,
    say: &dyn Fn(&str),
) -> Presence {
    let Some(device) = find_device(root) else {
        say("no BMC found (no /dev/ipmi0); skipping BMC configuration");
        return Presence::Absent;
    };
    let device = Path::new("/").join(device.strip_prefix(root).unwrap_or(&device));
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
    Presence::Present { facts }
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
