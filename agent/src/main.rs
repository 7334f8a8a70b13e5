//! `bearman-agent`: the binary in the stage-1 RAM disk (`stage1`: LLDP, register, BMC,
//! firmware updates, fetch, verify, kexec) and in the stage-2 OS (`stage2`: apply the network detail, report
//! installed, heartbeat).
//!
//! Exit codes: 0 never in practice (stage 1 kexecs, stage 2 runs forever); 1 when stage 1
//! gave up (`--once`) or stage 2 cannot read its command line; 2 for usage errors.

use std::path::PathBuf;
use std::process::ExitCode;

use bearman_agent::net::TcpConnector;
use bearman_agent::stage1::SystemHost;
use bearman_agent::stages::{self, Options, Stage2Options};
use clap::{Parser, Subcommand};

/// Stage 1's download directory (a tmpfs).
const WORK_DIR: &str = "/run/bearman";

#[derive(Parser)]
#[command(
    name = "bearman-agent",
    about = "Bearman node agent: boots a diskless hypervisor from what Bearman says",
    long_about = "Bearman node agent.\n\nRun `stage1` from the network-booted RAM disk: it reads bearman.url= and \
bearman.uuid= from the kernel command line, brings the network up with busybox udhcpc if needed, \
listens for an LLDP frame on every NIC at once (bearman.lldp_wait_s=N seconds, default 31, 0 \
disables, at most 120), reads the BMC with ipmitool when /dev/ipmi0 exists, registers the \
machine's hardware facts and LLDP neighbours, sets the BMC's LAN address with ipmitool lan set \
(channel bearman.bmc_channel=N, default 1) when Bearman sends BMC settings, fetches its boot \
plan, downloads and sha256-verifies the kernel and initrds, and kexecs into them. When Bearman \
orders a firmware update instead, it downloads and sha256-verifies the bundle, runs the ordered \
updater on it, reports the outcome, and reboots, waits for Bearman's power cycle or registers \
again as Bearman answers; when Bearman says to wait, it registers again after its backoff. LLDP \
and BMC problems are console lines, never a stopped boot. Run `stage2` from the booted OS: it fetches \
the network detail and applies it additively (hostname, /etc/resolv.conf, the pool addresses \
beside the current ones, MTU, a default route only when there is none), reports the \
installation finished and then heartbeats every 10 s."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Listen for LLDP, register, configure the BMC, apply a firmware update Bearman
    /// orders, fetch the boot plan, download and verify stage 2, kexec into it. Retries every failure with a capped backoff (1 s to
    /// 60 s) unless --once.
    Stage1 {
        /// Kernel command line to read bearman.url=, bearman.uuid=, bearman.lldp_wait_s=
        /// and bearman.bmc_channel= from.
        #[arg(long, default_value = "/proc/cmdline")]
        cmdline: PathBuf,
        /// Root of the /sys, /proc and /dev trees hardware facts and the BMC device are
        /// read from.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Directory (a tmpfs) the kernel, initrds and firmware bundles are downloaded to.
        #[arg(long, default_value = WORK_DIR)]
        work_dir: PathBuf,
        /// Stop after one failed attempt (exit 1) instead of retrying.
        #[arg(long)]
        once: bool,
        /// Do not run udhcpc even when the network looks down.
        #[arg(long)]
        no_dhcp: bool,
    },
    /// Apply the network detail (only adding), report the installation finished, then
    /// heartbeat every 10 s (± 1 s) forever.
    Stage2 {
        /// Kernel command line to read bearman.url= and bearman.uuid= from.
        #[arg(long, default_value = "/proc/cmdline")]
        cmdline: PathBuf,
        /// Root of /etc (os-release, resolv.conf), /proc (uptime, hostname, routes) and
        /// /sys/class/net.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bearman-agent: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let stage1_run = matches!(cli.command, Command::Stage1 { .. });
    let result = runtime.block_on(async {
        match cli.command {
            Command::Stage1 {
                cmdline,
                root,
                work_dir,
                once,
                no_dhcp,
            } => {
                let options = Options {
                    once,
                    dhcp: !no_dhcp,
                    ..Options::default()
                };
                let mut host = SystemHost::new(cmdline, root, work_dir);
                stages::run_stage1(&options, &TcpConnector, &mut host)
                    .await
                    .map(|_| ())
            }
            Command::Stage2 { cmdline, root } => {
                let mut host = SystemHost::new(cmdline, root, PathBuf::from(WORK_DIR));
                stages::run_stage2(&Stage2Options::default(), &TcpConnector, &mut host).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Stage 1 has already printed why it gave up.
        Err(_) if stage1_run => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("bearman-agent: exiting: {error}");
            ExitCode::FAILURE
        }
    }
}
