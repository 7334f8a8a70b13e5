//! `cargo xtask qemu-smoke`: real network boots of QEMU VMs through a real `bearman serve`.
//!
//! Each VM is a diskless "server" on a real layer-2 network (`l2.rs`: a bridge in a
//! network namespace, one tap per VM, dnsmasq as the site's DHCP server handing out
//! addresses only, and Bearman's own proxyDHCP + TFTP from its `[pxe]` section). Legacy
//! BIOS VMs boot SeaBIOS and the NIC's ROM — ipxe-qemu's `pxe-e1000.rom`, which is iPXE
//! itself, so Bearman's proxyDHCP sends it straight to `/ipxe` by its user class; UEFI VMs
//! boot OVMF, whose own PXE client gets `ipxe.efi` over Bearman's TFTP, which then asks
//! again as iPXE and is sent to `/ipxe`. Then the stage-1 image from `cargo xtask images`,
//! the agent registering and kexecing into stage 2, and stage 2 applying its pool address
//! (checked with ping across the bridge), reporting itself installed and heartbeating
//! from that address (the source the daemon records for the node's heartbeats).
//! `--network user` keeps the older variant: QEMU's user network, whose built-in DHCP
//! hands iPXE the `/ipxe` URL (BIOS only, no root needed). The daemon runs on a fresh SQLite data
//! directory with the QMP BMC driver allowed for this run's sockets, so it powers the VMs
//! as it would servers. After every node is Ready, one VM's power is cut (QMP `stop`, which
//! the driver reads as Off) and the smoke waits for Bearman to notice, fence it (verified
//! off), rebuild it and see it Ready again — with every other node left alone.
//!
//! Before those boots, a firmware phase: vm1's flavor expects BIOS [`BIOS_NEW`] and its
//! first boot reads [`BIOS_OLD`] (QEMU's `-smbios type=0,version=…`, which SeaBIOS and
//! OVMF both hand the guest's DMI), so Bearman orders a bundle whose updater is a fixture
//! script; stage 1 downloads and runs it, reports it applied and restarts the machine,
//! which ends that QEMU (`-no-reboot`). The smoke then starts vm1 again reading the new
//! version, as a real flash and reboot would leave it, and after Ready checks its firmware
//! record (`last_flashed`, `first_seen`) and events.
//!
//! Each VM has QEMU's simulated BMC on an ISA KCS interface and the daemon a bmc pool; on
//! every stage-1 boot the smoke checks what the IPMI modules, ipmitool and the agent did
//! with it (QEMU 7.2's BMC refuses the LAN commands: see [`BMC_LAN_PRINT_REFUSED`]).
//!
//! Each stage is checked by the witness that sees it: the serial console (kernel and agent
//! lines), the admin API (lifecycle events, remediations) and the daemon's state. Progress
//! is printed as it happens; on failure the tails of every serial log and of the daemon
//! log are printed. Everything is kept in `<target>/qemu-smoke/` for reading afterwards.

use std::fmt::Display;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

mod drill;

use crate::images;
use crate::l2::{self, L2};
use crate::process::{
    cargo_build, create_token, daemon_command, find_on_path, free_local_addr, log_tail, request_ok,
    wait_until_serving, ChildGuard,
};

const INSTALL_HINT: &str = "run scripts/install-deps.sh";
const QEMU: &str = "qemu-system-x86_64";
/// iPXE for QEMU's e1000, legacy BIOS build, from Debian's ipxe-qemu.
const PXE_ROM: &str = "/usr/lib/ipxe/qemu/pxe-e1000.rom";
/// UEFI firmware for QEMU, Debian's ovmf (code and variables in one image, variables
/// kept in memory: every boot starts from the firmware defaults, as a smoke should).
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// Debian's ipxe: undionly.kpxe, ipxe.efi, snponly.efi (the last two are links into
/// /boot), copied into the daemon's default TFTP root, `<data-dir>/tftp`.
const IPXE_DIR: &str = "/usr/lib/ipxe";
const IPXE_FILES: [&str; 3] = ["undionly.kpxe", "ipxe.efi", "snponly.efi"];
/// QEMU user networking makes the host's loopback reachable at this address.
const HOST_FROM_GUEST: &str = "10.0.2.2";
/// Where the daemon listens on the L2 bridge.
const L2_PORT: u16 = 8080;
const FLAVOR: &str = "smoke";
/// The flavor of the VM that is flashed first: `smoke`'s images, and a BIOS expectation
/// its first boot does not meet.
const FW_FLAVOR: &str = "smoke-fw";
/// The VM (index) whose BIOS is behind: vm1, the legacy-BIOS VM of a mixed run.
const FLASHED_VM: u32 = 0;
/// The SMBIOS type 0 BIOS versions QEMU gives the VMs (`-smbios type=0,version=…`): the
/// flashed VM's first boot reads the old one, every other boot the new one, as a machine
/// reads its new firmware after a real flash and reboot.
const BIOS_OLD: &str = "BEARMAN-1.0";
const BIOS_NEW: &str = "BEARMAN-2.0";
/// The bundle that brings the BIOS from [`BIOS_OLD`] to [`BIOS_NEW`].
const FW_BUNDLE: &str = "smoke-bios-2.0";
/// The fixture updater, under the daemon's image directory (`/images/…`).
const FW_UPDATER_PATH: &str = "fw/bios-update.sh";
/// The updater's time limit in the bundle: the fixture takes well under a second.
const FW_UPDATER_TIMEOUT_S: u64 = 60;
/// The line the fixture updater prints (stage 1 echoes it to the console), up to the
/// versions and the file.
const FW_UPDATER_SAYS: &str = "bearman-fixture-updater: flashing bios";
/// The stand-in for a vendor's BIOS flasher, run by stage 1's busybox `sh` (every busybox
/// applet is linked into the initramfs' /bin, `sh` among the required ones): it reads the
/// version the machine runs from DMI as a flasher would, checks it was given its own
/// downloaded file, says what it would flash and exits 0. It writes nothing: the smoke
/// restarts the VM with the new SMBIOS version, which is what a real flash and reboot
/// change. Arguments: the target version, the bundle file.
const FW_UPDATER_SCRIPT: &str = r#"#!/bin/sh
# Written by cargo xtask qemu-smoke: the QEMU smoke's stand-in for a vendor's BIOS flasher.
target="$1"
file="$2"
from="$(cat /sys/class/dmi/id/bios_version 2>/dev/null)"
if [ ! -f "$file" ]; then
  echo "bearman-fixture-updater: no bundle file at $file" >&2
  exit 3
fi
echo "bearman-fixture-updater: flashing bios ${from:-unknown} -> $target from $file"
exit 0
"#;
/// The kernel's line when the guest asks for a restart (`reboot(2)`): the flashed VM's
/// QEMU runs with `-no-reboot`, so the process exits there.
const GUEST_RESTART: &str = "reboot: Restarting system";
const BMC_POOL: &str = "smoke-bmc";
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";
/// How often the daemon and the serial logs are looked at.
const POLL: Duration = Duration::from_secs(1);
const SERIAL_TAIL_LINES: usize = 40;
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a Ready node has to send a heartbeat after `installed`: the agent sends one
/// at once, then one every 10 s (± jitter); three periods leave room for a slow TCG guest.
const HEARTBEAT_WAIT: Duration = Duration::from_secs(45);

#[derive(clap::Args)]
pub struct Args {
    /// VMs to boot at once (each gets 1 vCPU and --memory-mib)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    nodes: u32,
    /// Guest memory per VM, MiB
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(256..=8192))]
    memory_mib: u32,
    /// QEMU accelerator. tcg (software) is the default because KVM guests have been seen
    /// to reset in the iPXE ROM on these machines; kvm is used only when asked for.
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    accel: Accel,
    /// Bound on each phase (vm1's flash boot; all nodes Ready; the killed node Ready
    /// again), seconds
    #[arg(long, default_value_t = 900, value_parser = clap::value_parser!(u64).range(30..=7200))]
    phase_timeout_s: u64,
    /// Stop after the first boots: skip the power-kill → fence → rebuild step (and the
    /// drills)
    #[arg(long)]
    no_power_kill: bool,
    /// Skip the chaos drills after the rebuild (a rehearsed kernel_panic drill on vm1, and
    /// a power_loss drill that aborts when vm2 is cut off)
    #[arg(long)]
    no_drill: bool,
    /// The bearman-sim binary the drill's rehearsal runs (default: built here with cargo
    /// build -p bearman-sim)
    #[arg(long)]
    sim: Option<PathBuf>,
    /// The bearman binary to run (default: built here with cargo build -p bearman). CI
    /// passes the one its workspace build made, saving a second build with other features.
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// The network the VMs boot on: l2 (a bridge, dnsmasq, Bearman's proxyDHCP and TFTP;
    /// needs root) or user (QEMU's user network; BIOS only)
    #[arg(long, value_enum, default_value_t = Network::L2)]
    network: Network,
    /// VM firmware: mixed (odd VMs legacy BIOS, even VMs UEFI PXE), bios, uefi (PXE),
    /// uefi-http (UEFI HTTP Boot, OVMF's PXE switched off), or all (BIOS, UEFI PXE, UEFI
    /// HTTP in turn); every UEFI kind needs --network l2
    #[arg(long, value_enum, default_value_t = FirmwareChoice::Mixed)]
    firmware: FirmwareChoice,
    /// The UEFI iPXE binary Bearman's TFTP hands OVMF: ipxe.efi (iPXE's own NIC drivers)
    /// or snponly.efi (the firmware's network interface)
    #[arg(long, default_value = "ipxe.efi", value_parser = ["ipxe.efi", "snponly.efi"])]
    uefi_file: String,
    /// Directory for logs and the daemon's data (default: <target dir>/qemu-smoke). Emptied first, but a directory given here only if it is empty or an earlier run made it
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Network {
    L2,
    User,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum FirmwareChoice {
    Mixed,
    Bios,
    Uefi,
    UefiHttp,
    All,
}

/// One VM's firmware.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Firmware {
    Bios,
    /// OVMF's PXE: TFTP.
    Uefi,
    /// OVMF's HTTP Boot: the EFI binary over HTTP, no TFTP.
    UefiHttp,
}

impl Firmware {
    fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "BIOS",
            Firmware::Uefi => "UEFI",
            Firmware::UefiHttp => "UEFI HTTP Boot",
        }
    }
}

/// VM `index`'s firmware: in a mixed run vm1 is BIOS, vm2 UEFI, and so on, so two VMs
/// (what CI runs) are one of each and the power-cut victim (the last VM) is UEFI.
fn firmware_of(choice: FirmwareChoice, index: u32) -> Firmware {
    match choice {
        FirmwareChoice::Bios => Firmware::Bios,
        FirmwareChoice::Uefi => Firmware::Uefi,
        FirmwareChoice::UefiHttp => Firmware::UefiHttp,
        FirmwareChoice::Mixed if index.is_multiple_of(2) => Firmware::Bios,
        FirmwareChoice::Mixed => Firmware::Uefi,
        FirmwareChoice::All => {
            [Firmware::Bios, Firmware::Uefi, Firmware::UefiHttp][index as usize % 3]
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

fn progress(message: impl Display) {
    eprintln!("qemu-smoke: {message}");
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let qemu =
        find_on_path(QEMU).with_context(|| format!("{QEMU} is not on PATH: {INSTALL_HINT}"))?;
    ensure!(
        Path::new(PXE_ROM).is_file(),
        "{PXE_ROM} is missing (Debian package ipxe-qemu): {INSTALL_HINT}"
    );
    let uefi_vms = (0..args.nodes)
        .filter(|index| firmware_of(args.firmware, *index) != Firmware::Bios)
        .count();
    match args.network {
        Network::User => ensure!(
            uefi_vms == 0,
            "--network user boots BIOS VMs only (QEMU's DHCP has no proxy for OVMF's PXE): pass --firmware bios"
        ),
        Network::L2 => {
            for (path, package) in [
                (OVMF, "ovmf"),
                ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
                ("/usr/lib/ipxe/ipxe.efi", "ipxe"),
                ("/usr/lib/ipxe/snponly.efi", "ipxe"),
            ] {
                ensure!(
                    Path::new(path).is_file(),
                    "{path} is missing (Debian package {package}): {INSTALL_HINT}"
                );
            }
            for tool in ["dnsmasq", "ip", "ping"] {
                ensure!(
                    find_on_path(tool).is_some(),
                    "{tool} is not on PATH: {INSTALL_HINT}"
                );
            }
        }
    }
    if args.accel == Accel::Kvm {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .context("--accel kvm: cannot open /dev/kvm read-write")?;
    }
    let (workspace, target_dir) = crate::process::workspace_dirs()?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| target_dir.join("qemu-smoke"));

    progress(format!(
        "building the static agent: cargo build --release -p bearman-agent --target {AGENT_TARGET} (crt-static)"
    ));
    // Static glibc: the initramfs has no libc. --target keeps these flags off host builds.
    let agent = cargo_build(
        &workspace,
        &["--release", "-p", "bearman-agent", "--target", AGENT_TARGET],
        &[
            (
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            ),
            ("CARGO_PROFILE_RELEASE_STRIP", "symbols"),
        ],
        "bearman-agent",
    )?;
    let daemon = match &args.daemon {
        Some(path) => {
            ensure!(path.is_file(), "--daemon {}: no such file", path.display());
            fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?
        }
        None => {
            progress("building the daemon: cargo build -p bearman");
            cargo_build(
                &workspace,
                &["-p", "bearman", "--bin", "bearman"],
                &[],
                "bearman",
            )?
        }
    };
    progress("building the boot images: cargo xtask images");
    let images = images::build(images::Args::with_agent(agent))?;

    // The default lives in cargo's target directory, which is ours to empty.
    prepare_work_dir(&work, args.work_dir.is_none())?;
    // Unix socket paths are limited to 108 bytes: keep them short, outside the work dir.
    let sockets = tempfile::Builder::new()
        .prefix("bearman-qmp-")
        .tempdir()
        .context("creating the QMP socket directory")?;
    // Before the runtime: its threads, and every child, are made inside the namespace.
    let mut network = match args.network {
        Network::L2 => {
            progress(format!(
                "L2: namespace with bridge {} ({}/{}), {} tap(s), dnsmasq at {} (addresses {}-{}, no boot options)",
                l2::BRIDGE,
                l2::SERVER_ADDRESS,
                l2::PREFIX_LEN,
                args.nodes,
                l2::DHCP_SERVER_ADDRESS,
                l2::DHCP_RANGE.0,
                l2::DHCP_RANGE.1
            ));
            let mut network = L2::enter(args.nodes)?;
            network.start_dhcp_server(&work, &work.join("dnsmasq.log"))?;
            Some(network)
        }
        Network::User => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let setup = Setup {
        qemu,
        daemon,
        images,
        work,
        sockets: sockets.path().to_path_buf(),
    };
    let started = Instant::now();
    let result = runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("listening for SIGTERM")?;
        tokio::select! {
            result = smoke(&args, &setup, network.as_mut()) => result,
            // Returning drops the VMs and the daemon (their guards stop them).
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
            _ = terminate.recv() => Err(anyhow!("terminated")),
        }
    });
    match &result {
        Ok(()) => progress(format!(
            "PASSED in {:.0} s; logs in {}",
            started.elapsed().as_secs_f64(),
            setup.work.display()
        )),
        Err(_) => progress(format!(
            "FAILED after {:.0} s; logs in {}",
            started.elapsed().as_secs_f64(),
            setup.work.display()
        )),
    }
    result
}

/// Marks a directory this command made, so a later run may empty it.
const WORK_MARKER: &str = ".bearman-qemu-smoke";

/// Empties `work` for a new run — but unless `ours` only a directory an earlier run made
/// (or an empty one): a mistyped `--work-dir` must not delete somebody's files.
fn prepare_work_dir(work: &Path, ours: bool) -> anyhow::Result<()> {
    if work.exists() {
        let empty = fs::read_dir(work)
            .with_context(|| format!("reading {}", work.display()))?
            .next()
            .is_none();
        ensure!(
            ours || empty || work.join(WORK_MARKER).is_file(),
            "refusing to empty {}: it is not empty and no earlier qemu-smoke made it (no {WORK_MARKER} in it); pass another --work-dir",
            work.display()
        );
        fs::remove_dir_all(work).with_context(|| format!("emptying {}", work.display()))?;
    }
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    fs::write(
        work.join(WORK_MARKER),
        "made by cargo xtask qemu-smoke; emptied by its next run\n",
    )
    .with_context(|| format!("marking {}", work.display()))
}

struct Setup {
    qemu: PathBuf,
    daemon: PathBuf,
    images: PathBuf,
    work: PathBuf,
    sockets: PathBuf,
}

/// One VM standing in for a server.
struct Vm {
    name: String,
    uuid: String,
    firmware: Firmware,
    mac: String,
    serial_log: PathBuf,
    qmp: PathBuf,
    guard: ChildGuard,
}

fn node_uuid(index: u32) -> String {
    format!("5eed0000-0000-4000-8000-{:012x}", index + 1)
}

/// The VM's serial log tail, for failure reports.
fn serial_tail(vm: &Vm) -> String {
    let text = fs::read_to_string(&vm.serial_log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(SERIAL_TAIL_LINES)..].join("\n");
    format!(
        "--- {} serial console, last lines ({}):\n{tail}",
        vm.name,
        vm.serial_log.display()
    )
}

async fn smoke(args: &Args, setup: &Setup, mut network: Option<&mut L2>) -> anyhow::Result<()> {
    let data_dir = setup.work.join("data");
    let manifest = stage_images(&setup.images, &data_dir)?;
    let (addr, public_url) = match args.network {
        Network::User => {
            let addr = free_local_addr()?;
            (addr, format!("http://{HOST_FROM_GUEST}:{}", addr.port()))
        }
        Network::L2 => {
            let addr = SocketAddr::new(l2::SERVER_ADDRESS.parse()?, L2_PORT);
            (addr, format!("http://{addr}"))
        }
    };
    let config = setup.work.join("bearman.toml");
    let pxe = (args.network == Network::L2).then_some(args.uefi_file.as_str());
    if pxe.is_some() {
        stage_boot_loaders(&data_dir)?;
    }
    write_config(&config, addr, &public_url, &setup.sockets, pxe)?;
    let token = create_token(&setup.daemon, &data_dir, "smoke")?;
    let daemon_log = setup.work.join("bearman.log");
    progress(format!(
        "starting bearman serve on {addr} (nodes reach it as {public_url}{}; log {})",
        if pxe.is_some() {
            ", proxyDHCP on 67/4011 and TFTP on 69 of br0"
        } else {
            ""
        },
        daemon_log.display()
    ));
    let log = File::create(&daemon_log).context("creating the daemon log")?;
    let mut bearman = ChildGuard::spawn(
        "bearman",
        daemon_command(&setup.daemon)
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone()?)
            .stderr(log),
    )?;
    wait_until_serving(&mut bearman, addr, "/healthz", &daemon_log).await?;
    let api = Api { addr, token };
    configure(&api, &manifest, args.nodes, &data_dir).await?;

    // The flash boot's VM (its QEMU ended by then) and the normal flow's, kept here so a
    // failure in either phase prints every serial log's tail.
    let mut flash_vm = None;
    let mut vms = Vec::new();
    let outcome = async {
        let flash = flash_phase(
            args,
            setup,
            &api,
            &mut bearman,
            addr,
            &mut flash_vm,
            &daemon_log,
        )
        .await?;
        // The witnesses of the first boots are read from here on: the flash boot's DHCP
        // and proxyDHCP lines are not the normal boot's.
        let first_boot_logs = LogOffsets {
            daemon: file_len(&daemon_log),
            dnsmasq: file_len(&setup.work.join("dnsmasq.log")),
            serial: 0,
        };
        for index in 0..args.nodes {
            vms.push(start_vm(args, setup, addr, index, Boot::Normal)?);
        }
        boots_and_rebuild(
            args,
            setup,
            &api,
            &mut bearman,
            network.as_deref_mut(),
            &mut vms,
            &daemon_log,
            first_boot_logs,
            &flash,
        )
        .await?;
        if args.no_drill || args.no_power_kill {
            progress("skipping the chaos drills");
            return Ok(());
        }
        drill::drill_phase(args, setup, &api, &mut bearman, &mut vms, &daemon_log).await
    }
    .await;
    if outcome.is_err() {
        for vm in flash_vm.iter().chain(&vms) {
            eprintln!("{}", serial_tail(vm));
        }
        eprintln!("--- bearman: {}", log_tail(&daemon_log));
        if network.is_some() {
            eprintln!("--- dnsmasq: {}", log_tail(&setup.work.join("dnsmasq.log")));
        }
    }
    outcome
}

/// Copies the stage-1 and stage-2 images into the daemon's image directory and returns
/// the manifest (artifact hashes).
fn stage_images(images: &Path, data_dir: &Path) -> anyhow::Result<Value> {
    let manifest: Value = serde_json::from_str(
        &fs::read_to_string(images.join("manifest.json")).context("reading manifest.json")?,
    )
    .context("parsing manifest.json")?;
    ensure!(
        manifest["agent"]["included"] == json!(true),
        "the images were built without bearman-agent"
    );
    for stage in ["stage1", "stage2"] {
        let dir = data_dir.join("images").join(stage);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for file in ["vmlinuz", "initrd.img"] {
            let from = images.join(stage).join(file);
            fs::copy(&from, dir.join(file))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    Ok(manifest)
}

/// Copies Debian's iPXE binaries (following its links) into the daemon's default TFTP
/// root, and ipxe.efi into its images for UEFI HTTP Boot (`/images/ipxe.efi`, the
/// default `pxe.http_boot_url`).
fn stage_boot_loaders(data_dir: &Path) -> anyhow::Result<()> {
    let tftp = data_dir.join("tftp");
    fs::create_dir_all(&tftp).with_context(|| format!("creating {}", tftp.display()))?;
    for file in IPXE_FILES {
        let from = Path::new(IPXE_DIR).join(file);
        fs::copy(&from, tftp.join(file)).with_context(|| format!("copying {}", from.display()))?;
    }
    let from = Path::new(IPXE_DIR).join("ipxe.efi");
    fs::copy(&from, data_dir.join("images/ipxe.efi"))
        .with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

/// The daemon's configuration: defaults everywhere except where a smoke boot differs
/// from a data centre (the address nodes reach it at, the QMP sockets it may drive).
fn write_config(
    path: &Path,
    addr: SocketAddr,
    public_url: &str,
    sockets: &Path,
    pxe_uefi_file: Option<&str>,
) -> anyhow::Result<()> {
    let pxe = match pxe_uefi_file {
        // Defaults but for where this host is on the boot network and which UEFI binary.
        Some(uefi_file) => format!(
            r#"
[pxe]
server_address = "{server}"
interface = "{bridge}"
uefi_file = "{uefi_file}"
"#,
            server = l2::SERVER_ADDRESS,
            bridge = l2::BRIDGE
        ),
        None => String::new(),
    };
    let text = format!(
        r#"# Written by cargo xtask qemu-smoke.
listen = "{addr}"
public_url = "{public_url}"

[stage1]
kernel = "/images/stage1/vmlinuz"
initrds = ["/images/stage1/initrd.img"]
# No switch sends LLDP on QEMU's user network or the smoke's bridge: do not wait for one.
# initrd=initrd.img: Debian 12's iPXE (2019) gives an EFI-stub kernel its initrd only as
# a file the stub loads by this name; BIOS kernels ignore it.
cmdline = "console=ttyS0 bearman.lldp_wait_s=0 initrd=initrd.img"

[bmc]
qmp_socket_dir = "{sockets}"
{pxe}"#,
        sockets = sockets.display()
    );
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

struct Api {
    addr: SocketAddr,
    token: String,
}

impl Api {
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let response = request_ok(self.addr, "GET", path, Some(&self.token), None).await?;
        serde_json::from_slice(&response.body).with_context(|| format!("GET {path}: not JSON"))
    }

    async fn send(&self, method: &str, path: &str, body: &Value) -> anyhow::Result<()> {
        request_ok(self.addr, method, path, Some(&self.token), Some(body))
            .await
            .map(drop)
    }
}

/// Flavors (stage 2; [`FW_FLAVOR`] with a BIOS expectation), the firmware bundle and its
/// fixture updater, node address pool, and every node enrolled with its QMP "BMC".
async fn configure(api: &Api, manifest: &Value, nodes: u32, data_dir: &Path) -> anyhow::Result<()> {
    let sha = |artifact: &str| -> anyhow::Result<String> {
        manifest["artifacts"][artifact]["sha256"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("manifest.json has no sha256 for {artifact}"))
    };
    progress(format!(
        "creating flavors {FLAVOR} and {FW_FLAVOR} (firmware_expected bios {BIOS_NEW}), bundle {FW_BUNDLE}, pools smoke and {BMC_POOL} and {nodes} node(s)"
    ));
    for (name, firmware_expected) in [
        (FLAVOR, json!({})),
        (FW_FLAVOR, json!({ "bios": BIOS_NEW })),
    ] {
        api.send(
            "POST",
            "/api/v1/flavors",
            &json!({
                "name": name,
                "kernel": {"url": "/images/stage2/vmlinuz", "sha256": sha("stage2/vmlinuz")?},
                "initrds": [{"url": "/images/stage2/initrd.img", "sha256": sha("stage2/initrd.img")?}],
                // unknown_nmi_panic=1: an NMI through the BMC (a drill's kernel_panic)
                // panics the kernel, as it would a production hypervisor's.
                "cmdline_template": "console=ttyS0 hostname={hostname} unknown_nmi_panic=1",
                "firmware_expected": firmware_expected,
            }),
        )
        .await?;
    }
    api.send(
        "POST",
        "/api/v1/firmware/bundles",
        &stage_fw_updater(data_dir)?,
    )
    .await?;
    api.send(
        "POST",
        "/api/v1/pools",
        &json!({
            "name": "smoke",
            "purpose": "node",
            "cidr": "10.77.0.0/24",
            "range_start": "10.77.0.10",
            // Below dnsmasq's range (l2::DHCP_RANGE): the site's leases and Bearman's
            // pool addresses must never collide on the L2 smoke's one subnet.
            "range_end": "10.77.0.99",
            "gateway": "10.77.0.1",
            "dns": ["10.77.0.1"],
            "mtu": 1500,
        }),
    )
    .await?;
    // The out-of-band network: the daemon hands a BMC address from it to each node that
    // reports a BMC at registration.
    api.send(
        "POST",
        "/api/v1/pools",
        &json!({
            "name": BMC_POOL,
            "purpose": "bmc",
            "cidr": "10.78.0.0/24",
            "range_start": "10.78.0.10",
            "range_end": "10.78.0.250",
            "gateway": "10.78.0.1",
        }),
    )
    .await?;
    for index in 0..nodes {
        api.send(
            "POST",
            "/api/v1/nodes",
            &json!({
                "uuid": node_uuid(index),
                "hostname": format!("vm{}", index + 1),
                // One rack each: two VMs are too few for the rack guard anyway (it needs
                // rack_nodes_min), and this is how a small lab is usually described.
                "rack": format!("smoke-{}", index + 1),
                "flavor": if index == FLASHED_VM { FW_FLAVOR } else { FLAVOR },
                "bmc": {"driver": "qmp", "address": format!("vm{}.qmp", index + 1)},
            }),
        )
        .await?;
    }
    Ok(())
}

/// Writes the fixture updater into the daemon's images and returns the bundle that
/// runs it: [`BIOS_OLD`] → [`BIOS_NEW`], restart by reboot.
fn stage_fw_updater(data_dir: &Path) -> anyhow::Result<Value> {
    let path = data_dir.join("images").join(FW_UPDATER_PATH);
    let dir = path
        .parent()
        .context("the updater's path has a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(&path, FW_UPDATER_SCRIPT).with_context(|| format!("writing {}", path.display()))?;
    Ok(fw_bundle(FW_UPDATER_SCRIPT.as_bytes()))
}

/// The bundle for the fixture updater whose bytes are `updater`.
fn fw_bundle(updater: &[u8]) -> Value {
    json!({
        "name": FW_BUNDLE,
        "component": "bios",
        "version": BIOS_NEW,
        "artifact": {
            "url": format!("/images/{FW_UPDATER_PATH}"),
            "sha256": hex::encode(Sha256::digest(updater)),
        },
        "size_bytes": updater.len(),
        "applies_to": {"from_version_min": BIOS_OLD, "from_version_max": BIOS_OLD},
        // No shell in the command itself: busybox sh runs the downloaded script.
        "command": ["/bin/sh", "{file}", BIOS_NEW, "{file}"],
        "timeout_s": FW_UPDATER_TIMEOUT_S,
        "success_exit_codes": [0],
        "restart": "reboot",
    })
}

/// How one QEMU process of a VM boots.
#[derive(Clone, Copy)]
enum Boot {
    /// A boot of the normal flow: the new BIOS version, and QEMU stays up whatever the
    /// guest does (Bearman powers it through QMP).
    Normal,
    /// The flashed VM's first boot: the old BIOS version, its own serial log, and
    /// `-no-reboot` so the guest's restart after the update ends the process instead of
    /// resetting it with the old SMBIOS tables.
    Flash,
}

fn start_vm(
    args: &Args,
    setup: &Setup,
    addr: SocketAddr,
    index: u32,
    boot: Boot,
) -> anyhow::Result<Vm> {
    let name = format!("vm{}", index + 1);
    let uuid = node_uuid(index);
    let firmware = firmware_of(args.firmware, index);
    let mac = format!("52:54:00:be:a0:{:02x}", index + 1);
    let netdev = match args.network {
        Network::User => format!(
            "user,id=net0,bootfile=http://{HOST_FROM_GUEST}:{}/ipxe",
            addr.port()
        ),
        // The tap exists in the namespace this process (and so QEMU) runs in.
        Network::L2 => format!(
            "tap,id=net0,ifname={},script=no,downscript=no",
            l2::tap_name(index)
        ),
    };
    let nic = match firmware {
        Firmware::Bios => format!("e1000,netdev=net0,mac={mac},romfile={PXE_ROM},bootindex=1"),
        // No option ROM: QEMU's default EFI ROMs are iPXE, which would boot itself and
        // hide the firmware's PXE. OVMF drives virtio-net itself (VirtioNetDxe), so its
        // own PXE client (EDK2's PxeBcDxe, "PXEClient:Arch:00007", no iPXE user class)
        // does the DHCP and TFTP, as a server's UEFI firmware would.
        Firmware::Uefi | Firmware::UefiHttp => {
            format!("virtio-net-pci,netdev=net0,mac={mac},romfile=,bootindex=1")
        }
    };
    let (bios_version, logs, exits) = match boot {
        Boot::Normal => (BIOS_NEW, name.clone(), ["-no-shutdown"]),
        // Without -no-shutdown: with it, -no-reboot's shutdown would pause QEMU, not end it.
        Boot::Flash => (BIOS_OLD, format!("{name}.flash"), ["-no-reboot"]),
    };
    let serial_log = setup.work.join(format!("{logs}.serial.log"));
    let qmp = setup.sockets.join(format!("{name}.qmp"));
    let qemu_log = setup.work.join(format!("{logs}.qemu.log"));
    let qemu_output =
        File::create(&qemu_log).with_context(|| format!("creating {}", qemu_log.display()))?;
    let mut command = Command::new(&setup.qemu);
    command
        .args(["-machine", &format!("pc,accel={}", args.accel.name())])
        .args(["-m", &args.memory_mib.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-display", "none"])
        .args(exits)
        .arg("-serial")
        .arg(format!("file:{}", serial_log.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args([
            "-smbios",
            &format!(
                "type=1,uuid={uuid},serial=SMOKE-{:04},manufacturer=Bearman,product=qemu-smoke",
                index + 1
            ),
        ])
        // SeaBIOS and OVMF both pass QEMU's type 0 on to the guest's DMI.
        .args(["-smbios", &format!("type=0,version={bios_version}")])
        .args(["-netdev", &netdev])
        .args(["-device", &nic])
        // An emulated BMC on the in-band KCS interface, found by ipmi_si through ACPI/SMBIOS:
        // stage 1 reads and configures it as it would a server's.
        .args(["-device", "ipmi-bmc-sim,id=bmc0"])
        .args(["-device", "isa-ipmi-kcs,bmc=bmc0"])
        .args(match firmware {
            Firmware::Bios => ["-boot", "order=n"],
            Firmware::Uefi | Firmware::UefiHttp => ["-bios", OVMF],
        })
        // OVMF reads these fw_cfg knobs at boot: with PXE off on both IP versions, its
        // boot manager goes straight to the NIC's HTTP Boot entry.
        .args(if firmware == Firmware::UefiHttp {
            vec![
                "-fw_cfg",
                "name=opt/org.tianocore/IPv4PXESupport,string=n",
                "-fw_cfg",
                "name=opt/org.tianocore/IPv6PXESupport,string=n",
            ]
        } else {
            vec![]
        })
        .stdout(qemu_output.try_clone()?)
        .stderr(qemu_output);
    progress(format!(
        "powering on {name} ({}, SMBIOS BIOS version {bios_version}{}, mac {mac}, uuid {uuid}, {} MiB, {}; serial log {})",
        firmware.name(),
        match boot {
            Boot::Normal => "",
            Boot::Flash => ", -no-reboot",
        },
        args.memory_mib,
        args.accel.name(),
        serial_log.display()
    ));
    let guard = ChildGuard::spawn("qemu", &mut command)?;
    Ok(Vm {
        name,
        uuid,
        firmware,
        mac,
        serial_log,
        qmp,
        guard,
    })
}

/// Serial console lines that mark the stages of one boot cycle, in order; each is looked
/// for after the previous one (the kernel banner appears once per kernel).
const MARKERS: &[(&str, &str)] = &[
    ("stage-1 kernel", "Linux version "),
    ("stage-1 init", "bearman-init: stage1"),
    ("registered+plan", "bearman-agent: booting "),
    ("stage-2 kernel", "Linux version "),
    ("stage-2 init", "bearman-init: stage2"),
    ("installed", "bearman-agent: reported installed"),
];

/// The kernel's line when `ipmi_si` has found the VM's emulated KCS interface.
const BMC_KERNEL_FOUND: &str = "IPMI kcs interface initialized";
/// What the agent prints when `ipmitool lan print 1` is refused the way QEMU 7.2's
/// `ipmi-bmc-sim` refuses it: that BMC implements neither Get Channel Info (App netfn
/// 0x06, command 0x42) nor any LAN configuration command (Transport netfn 0x0C), and
/// answers them with completion code 0xC1, which ipmitool prints as "Invalid command".
/// Found by booting; every `lan set` fails the same way ("Channel 1 is not a LAN channel").
const BMC_LAN_PRINT_REFUSED: &str = "bearman-agent: reading the BMC: ipmitool lan print 1: exit status: 1: Get Channel Info command failed: Invalid command; Invalid channel: 1; registering without BMC facts";
/// The agent's line when the registration answer carried no BMC settings (the daemon
/// allocates a BMC address only to a node that reported its BMC's MAC).
const BMC_NO_SETTINGS: &str = "bearman-agent: bearman sent no BMC settings (no bmc pool, or no BMC MAC was registered); BMC left as it is";

/// Checks what the kernel and the agent did with the VM's emulated BMC in one stage-1
/// boot, from its console text (from the cycle's start): the IPMI modules loaded and found
/// the KCS interface, the agent found /dev/ipmi0 and ran ipmitool, QEMU's BMC refused
/// `lan print` exactly as 7.2's does, no `lan set` was run, and the boot went on to the
/// plan line.
fn check_stage1_bmc(console: &str) -> Result<(), String> {
    let stage1 = match console.find("bearman-agent: booting ") {
        Some(end) => &console[..end],
        None => return Err("stage 1 never reached its plan line".into()),
    };
    let relevant = || {
        let lines: Vec<&str> = stage1
            .lines()
            .map(|line| line.trim_end_matches('\r'))
            .filter(|line| {
                let lower = line.to_ascii_lowercase();
                lower.contains("ipmi") || lower.contains("bmc")
            })
            .collect();
        format!("its BMC lines:\n  {}", lines.join("\n  "))
    };
    let fail = |what: &str| Err(format!("{what}; {}", relevant()));
    if stage1.contains("bearman-init: insmod ipmi") {
        return fail("an IPMI module did not load");
    }
    if !stage1.contains(BMC_KERNEL_FOUND) {
        return fail(&format!(
            "the kernel found no IPMI interface (no {BMC_KERNEL_FOUND:?} line)"
        ));
    }
    if stage1.contains("no BMC found") || stage1.contains("ipmitool is not on PATH") {
        return fail("the agent did not get as far as running ipmitool");
    }
    if stage1.contains("bearman-agent: BMC on channel") {
        return fail(
            "QEMU's BMC answered `ipmitool lan print` (7.2's refuses it): this QEMU implements \
             LAN configuration, so extend the smoke to check the node's bmc.mac, its bmc-pool \
             address and the lan set commands",
        );
    }
    if !stage1.contains(BMC_LAN_PRINT_REFUSED) {
        return fail(&format!("no line {BMC_LAN_PRINT_REFUSED:?}"));
    }
    if !stage1.contains(BMC_NO_SETTINGS) {
        return fail(&format!("no line {BMC_NO_SETTINGS:?}"));
    }
    if stage1.contains("BMC configured on channel") || stage1.contains("BMC configuration failed") {
        return fail("the agent ran lan set although it had no BMC settings");
    }
    Ok(())
}

/// Checks the daemon's side of a VM's BMC: with no BMC MAC registered it keeps the node's
/// BMC record as enrolled (no MAC, the QMP socket as its address, which fencing needs) and
/// allocates nothing from the bmc pool.
async fn check_bmc_record(api: &Api, vm: &Vm) -> anyhow::Result<()> {
    let node = api.get(&format!("/api/v1/nodes/{}", vm.uuid)).await?;
    ensure!(
        node["bmc"]["mac"].is_null(),
        "{}: the node has a BMC MAC although QEMU's BMC refused lan print: {}",
        vm.name,
        node["bmc"]
    );
    let enrolled = format!("{}.qmp", vm.name);
    ensure!(
        node["bmc"]["address"] == json!(enrolled),
        "{}: the node's BMC address is {}, not the QMP socket {enrolled} it was enrolled with",
        vm.name,
        node["bmc"]["address"]
    );
    let pool = api.get(&format!("/api/v1/pools/{BMC_POOL}")).await?;
    let allocations = pool["allocations"]
        .as_array()
        .with_context(|| format!("pool {BMC_POOL} has no allocations list: {pool}"))?;
    ensure!(
        !allocations
            .iter()
            .any(|allocation| allocation.to_string().contains(&vm.uuid)),
        "{}: got an address from {BMC_POOL} without reporting a BMC MAC: {pool}",
        vm.name
    );
    Ok(())
}

/// Both BMC checks for one stage-1 boot of `vm`, its console read from `offset`.
async fn check_bmc(api: &Api, vm: &Vm, offset: usize) -> anyhow::Result<()> {
    let log = fs::read(&vm.serial_log).unwrap_or_default();
    let console = String::from_utf8_lossy(log.get(offset..).unwrap_or_default());
    check_stage1_bmc(&console).map_err(|error| anyhow!("{} BMC: {error}", vm.name))?;
    check_bmc_record(api, vm).await?;
    progress(format!(
        "{}: BMC: ipmi_si found QEMU's KCS BMC; the agent ran ipmitool on /dev/ipmi0; lan print refused (Invalid command), so no MAC registered, no BMC settings, no {BMC_POOL} address, no lan set; boot went on",
        vm.name
    ));
    Ok(())
}

/// One boot cycle of one VM, watched from power-on to Ready (or, for the flash boot,
/// to the guest's restart).
struct Cycle {
    /// The serial console lines that mark its stages, in order: (name, text).
    markers: Vec<(&'static str, String)>,
    started: Instant,
    /// Seconds after `started` at which each marker was first seen.
    seen: Vec<f64>,
    /// Where in the log to look for the next marker: at first the log's length before the
    /// cycle began (earlier cycles' lines are not its own), then just past the last marker.
    cursor: usize,
    ready_s: Option<f64>,
}

impl Cycle {
    /// A cycle from power-on to Ready ([`MARKERS`]).
    fn new(offset: usize, started: Instant) -> Cycle {
        let markers = MARKERS
            .iter()
            .map(|(name, needle)| (*name, needle.to_string()))
            .collect();
        Cycle::with_markers(markers, offset, started)
    }

    fn with_markers(
        markers: Vec<(&'static str, String)>,
        offset: usize,
        started: Instant,
    ) -> Cycle {
        Cycle {
            markers,
            started,
            seen: Vec::new(),
            cursor: offset,
            ready_s: None,
        }
    }

    /// Looks for the next markers in the log; returns the names of those newly seen.
    fn scan(&mut self, log: &[u8]) -> Vec<&'static str> {
        let mut new = Vec::new();
        while let Some((name, needle)) = self.markers.get(self.seen.len()) {
            let haystack = log.get(self.cursor..).unwrap_or_default();
            let Some(at) = find(haystack, needle.as_bytes()) else {
                break;
            };
            self.cursor += at + needle.len();
            self.seen.push(self.started.elapsed().as_secs_f64());
            new.push(*name);
        }
        new
    }

    fn done(&self) -> bool {
        self.seen.len() == self.markers.len()
    }

    /// The name of the next marker not seen yet.
    fn next(&self) -> Option<&'static str> {
        self.markers.get(self.seen.len()).map(|(name, _)| *name)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

async fn node_state(api: &Api, uuid: &str) -> anyhow::Result<String> {
    let node = api.get(&format!("/api/v1/nodes/{uuid}")).await?;
    state_of(&node)
}

fn state_of(node: &Value) -> anyhow::Result<String> {
    node["state"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("node {} has no state: {node}", node["uuid"]))
}

/// A failed firmware attempt in the node's record (`firmware_update.failures`): Bearman
/// retries it, but no smoke boot should fail one, so the smoke stops at once instead of
/// waiting out the phase.
fn firmware_failure(node: &Value) -> Option<String> {
    let update = &node["firmware_update"];
    let failures = update["failures"].as_u64().unwrap_or(0);
    (failures > 0).then(|| {
        let text = |key: &str| update[key].as_str().unwrap_or("?").to_string();
        format!(
            "firmware update by bundle {} ({} → {}) failed {failures} time(s), the last: {}",
            text("bundle"),
            text("from_version"),
            text("to_version"),
            update["last_failure"]
                .as_str()
                .unwrap_or("(no reason recorded)")
        )
    })
}

/// Watches every VM's cycle until each node is Ready (and its serial log shows every
/// stage), printing stages as they pass.
async fn watch_until_ready(
    args: &Args,
    api: &Api,
    bearman: &mut ChildGuard,
    vms: &mut [Vm],
    cycles: &mut [Option<Cycle>],
    daemon_log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.phase_timeout_s);
    loop {
        if let Some(status) = bearman.exit_status()? {
            bail!("bearman exited ({status}); {}", log_tail(daemon_log));
        }
        let mut waiting = Vec::new();
        for (vm, cycle) in vms.iter_mut().zip(cycles.iter_mut()) {
            let Some(cycle) = cycle else { continue };
            if let Some(status) = vm.guard.exit_status()? {
                bail!("{}'s QEMU exited ({status})", vm.name);
            }
            let log = fs::read(&vm.serial_log).unwrap_or_default();
            for stage in cycle.scan(&log) {
                progress(format!(
                    "{} {:>6.1} s  {stage}",
                    vm.name,
                    cycle.started.elapsed().as_secs_f64()
                ));
            }
            let node = api.get(&format!("/api/v1/nodes/{}", vm.uuid)).await?;
            if let Some(failure) = firmware_failure(&node) {
                bail!("{}: {failure}", vm.name);
            }
            if cycle.ready_s.is_none() && state_of(&node)? == "ready" {
                // Ready counts once the serial log shows the cycle that made it so.
                if cycle.done() {
                    let seconds = cycle.started.elapsed().as_secs_f64();
                    cycle.ready_s = Some(seconds);
                    progress(format!("{} {seconds:>6.1} s  Ready (admin API)", vm.name));
                }
            }
            if cycle.ready_s.is_none() {
                let next = cycle.next().unwrap_or("Ready");
                waiting.push(format!("{} (next: {next})", vm.name));
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "not Ready within {} s: {}",
                args.phase_timeout_s,
                waiting.join(", ")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The node's lifecycle events, oldest first.
async fn events(api: &Api, uuid: &str) -> anyhow::Result<Vec<Value>> {
    let value = api
        .get(&format!("/api/v1/nodes/{uuid}/events?limit=1000"))
        .await?;
    let mut events = value
        .as_array()
        .cloned()
        .context("node events: not a list")?;
    events.sort_by_key(|event| event["id"].as_i64().unwrap_or(0));
    Ok(events)
}

/// Checks that `states` occur in this order among the events' target states (others may
/// come between), and returns each one's `at_ms`.
fn states_in_order(events: &[Value], states: &[&str]) -> Result<Vec<i64>, String> {
    let mut times = Vec::new();
    let mut rest = events.iter();
    for wanted in states {
        match rest.find(|event| event["to_state"] == json!(wanted)) {
            Some(event) => times.push(event["at_ms"].as_i64().unwrap_or(0)),
            None => {
                let seen: Vec<String> = events
                    .iter()
                    .filter_map(|event| event["to_state"].as_str().map(str::to_string))
                    .collect();
                return Err(format!(
                    "expected the states {states:?} in order; the events went through {seen:?}"
                ));
            }
        }
    }
    Ok(times)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// Byte offsets into the daemon's and dnsmasq's logs where a boot cycle began.
#[derive(Clone, Copy, Default)]
struct LogOffsets {
    daemon: usize,
    dnsmasq: usize,
    /// Into the VM's own serial log.
    serial: usize,
}

fn file_len(path: &Path) -> usize {
    fs::metadata(path).map_or(0, |metadata| metadata.len() as usize)
}

fn read_from(path: &Path, offset: usize) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    strip_ansi(&String::from_utf8_lossy(
        bytes.get(offset..).unwrap_or_default(),
    ))
}

/// Log text without terminal colour sequences (ESC [ … letter).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What the witnesses of one L2 network boot must show, from the logs since the cycle
/// began: dnsmasq leased the VM an address (DHCPACK to its MAC) — the site's server, not
/// Bearman, owns addresses; Bearman's proxyDHCP answered it — a UEFI VM first with the
/// UEFI binary over TFTP (then served by the TFTP server to that leased address) and then,
/// as iPXE, with the `/ipxe` URL; a BIOS VM's ROM, being iPXE, with the URL only. Returns
/// the leased address.
fn check_netboot_logs(
    firmware: Firmware,
    mac: &str,
    uefi_file: &str,
    daemon_log: &str,
    dnsmasq_log: &str,
) -> Result<String, String> {
    let leased = dnsmasq_log
        .lines()
        .filter(|line| line.contains("DHCPACK(") && line.contains(mac))
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|word| *word == mac)?;
            at.checked_sub(1).map(|before| words[before].to_string())
        })
        .ok_or_else(|| format!("dnsmasq never acknowledged a lease for {mac}"))?;
    let client = format!("client={mac}");
    let answers: Vec<&str> = daemon_log
        .lines()
        .filter(|line| line.contains("proxyDHCP") && line.contains(&client))
        .collect();
    let tftp_answer = format!("Tftp(\"{uefi_file}\")");
    let first_tftp = answers.iter().position(|line| line.contains(&tftp_answer));
    let first_http = answers.iter().position(|line| line.contains("HttpBoot("));
    let first_ipxe = answers.iter().position(|line| line.contains("IpxeScript("));
    let served = daemon_log.lines().any(|line| {
        line.contains("tftp: sent")
            && line.contains(&format!("from={leased}:"))
            && line.contains(uefi_file)
    });
    if firmware == Firmware::UefiHttp {
        return match (first_http, first_tftp, first_ipxe) {
            (_, _, None) => Err(format!(
                "Bearman's proxyDHCP never sent {mac} the /ipxe URL; its answers to it: {answers:?}"
            )),
            (None, _, _) => Err(format!(
                "proxyDHCP never sent the HTTP-boot VM {mac} an HttpBoot URL: {answers:?}"
            )),
            (_, Some(_), _) => Err(format!(
                "the HTTP-boot VM {mac} was sent a TFTP file (its PXE should be off): {answers:?}"
            )),
            (Some(http), None, Some(ipxe)) if http > ipxe => Err(format!(
                "{mac} got the /ipxe URL before its HTTP Boot URL: {answers:?}"
            )),
            (Some(_), None, Some(_)) => Ok(leased),
        };
    }
    match (firmware, first_tftp, first_ipxe) {
        (Firmware::UefiHttp, _, _) => unreachable!("handled above"),
        (_, _, None) => Err(format!(
            "Bearman's proxyDHCP never sent {mac} the /ipxe URL; its answers to it: {answers:?}"
        )),
        (Firmware::Bios, Some(_), _) => Err(format!(
            "the BIOS VM's ROM is iPXE, yet proxyDHCP sent {mac} a TFTP file: {answers:?}"
        )),
        (Firmware::Bios, None, Some(_)) => Ok(leased),
        (Firmware::Uefi, None, _) => Err(format!(
            "proxyDHCP never sent the UEFI VM {mac} {tftp_answer}; its answers: {answers:?}"
        )),
        (Firmware::Uefi, Some(tftp), Some(ipxe)) if tftp > ipxe => Err(format!(
            "{mac} got the /ipxe URL before {uefi_file}: {answers:?}"
        )),
        (Firmware::Uefi, Some(_), Some(_)) if !served => Err(format!(
            "no \"tftp: sent\" line for {uefi_file} to {leased}, the address dnsmasq leased {mac}"
        )),
        (Firmware::Uefi, Some(_), Some(_)) => Ok(leased),
    }
}

/// On a UEFI VM, the stage-2 kernel (after stage 1's plan line) must have found the EFI
/// system table and the ACPI RSDP: `kexec_file_load` passes them (a kernel without the
/// RSDP cannot power off, and the BMC-less power-off path is ACPI). Stage 1 adds no
/// `acpi_rsdp=`: this check is what shows it needs none.
fn check_stage2_firmware_tables(console: &str) -> Result<(), String> {
    let after_plan = console
        .find("bearman-agent: booting ")
        .map(|at| &console[at..])
        .ok_or("stage 1 never reached its plan line")?;
    let stage2 = after_plan
        .find("Linux version ")
        .map(|at| &after_plan[at..])
        .ok_or("no stage-2 kernel banner after the plan line")?;
    for (needle, what) in [
        ("efi: EFI v", "the EFI system table"),
        ("ACPI: RSDP", "the ACPI RSDP"),
    ] {
        if !stage2.contains(needle) {
            return Err(format!(
                "the kexec'd stage-2 kernel did not find {what} (no {needle:?} line)"
            ));
        }
    }
    Ok(())
}

/// After a Ready in the L2 smoke: the network boot's witnesses (see
/// [`check_netboot_logs`]) and the node's Bearman pool address answering ping across the
/// bridge — the address stage 2 applied is routable on the boot network.
async fn check_l2_boot(
    api: &Api,
    setup: &Setup,
    network: &mut L2,
    vm: &Vm,
    uefi_file: &str,
    since: LogOffsets,
) -> anyhow::Result<()> {
    if let Some(dnsmasq) = network.dnsmasq() {
        if let Some(status) = dnsmasq.exit_status()? {
            bail!("dnsmasq exited ({status})");
        }
    }
    let daemon_log = read_from(&setup.work.join("bearman.log"), since.daemon);
    let dnsmasq_log = read_from(&setup.work.join("dnsmasq.log"), since.dnsmasq);
    let leased = check_netboot_logs(vm.firmware, &vm.mac, uefi_file, &daemon_log, &dnsmasq_log)
        .map_err(|error| anyhow!("{} ({}): {error}", vm.name, vm.firmware.name()))?;
    if vm.firmware != Firmware::Bios {
        let console = read_from(&vm.serial_log, since.serial);
        check_stage2_firmware_tables(&console).map_err(|error| anyhow!("{}: {error}", vm.name))?;
    }
    let node = api.get(&format!("/api/v1/nodes/{}", vm.uuid)).await?;
    let cidr = node["network"]["bond0_addresses"][0]
        .as_str()
        .with_context(|| {
            format!(
                "{}: no pool address in its record: {}",
                vm.name, node["network"]
            )
        })?
        .to_string();
    let address = cidr.split('/').next().unwrap_or_default().to_string();
    let output = Command::new("ping")
        .args(["-c", "3", "-W", "2", "-I", l2::BRIDGE, &address])
        .output()
        .context("running ping")?;
    ensure!(
        output.status.success(),
        "{}: its pool address {address} does not answer ping on {}: {}",
        vm.name,
        l2::BRIDGE,
        String::from_utf8_lossy(&output.stdout).trim()
    );
    let heard = wait_heartbeat_source(api, vm, &address, &leased).await?;
    progress(format!("{}: {heard}", vm.name));
    progress(format!(
        "{}: {} network boot on the L2: dnsmasq leased {leased}; proxyDHCP sent {}; stage 2's pool address {cidr} answers ping{}",
        vm.name,
        vm.firmware.name(),
        match vm.firmware {
            Firmware::Bios => "its iPXE ROM the /ipxe URL".to_string(),
            Firmware::Uefi => format!("OVMF's PXE {uefi_file} (TFTP, served), then iPXE the /ipxe URL"),
            Firmware::UefiHttp => "OVMF's HTTP Boot the ipxe.efi URL, then iPXE the /ipxe URL".to_string(),
        },
        match vm.firmware {
            Firmware::Bios => "",
            Firmware::Uefi | Firmware::UefiHttp => {
                "; the kexec'd stage 2 found the EFI system table and the ACPI RSDP"
            }
        }
    ));
    Ok(())
}

/// Waits (at most [`HEARTBEAT_WAIT`]) for a heartbeat after this boot's `installed` and
/// checks the daemon saw it come from the node's pool address `pool`, not from the
/// address dnsmasq `leased` it (which stage 2 keeps beside the pool address).
async fn wait_heartbeat_source(
    api: &Api,
    vm: &Vm,
    pool: &str,
    leased: &str,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + HEARTBEAT_WAIT;
    loop {
        let node = api.get(&format!("/api/v1/nodes/{}", vm.uuid)).await?;
        if let Some(verdict) = heartbeat_source_verdict(&node, pool, leased) {
            return verdict.map_err(|error| anyhow!("{}: {error}", vm.name));
        }
        ensure!(
            Instant::now() < deadline,
            "{}: no heartbeat within {} s of its installed report: {node}",
            vm.name,
            HEARTBEAT_WAIT.as_secs()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// `None` while the node record shows no heartbeat after its `installed` report (which
/// sets the heartbeat time itself); then whether the recorded heartbeat source is the
/// pool address.
fn heartbeat_source_verdict(
    node: &Value,
    pool: &str,
    leased: &str,
) -> Option<Result<String, String>> {
    let installed = node["installed_at_ms"].as_i64()?;
    let heard = node["last_heartbeat_at_ms"].as_i64()?;
    if heard <= installed {
        return None;
    }
    let source = &node["heartbeat_source"];
    let address = source["address"].as_str().unwrap_or("none");
    Some(if address == pool {
        Ok(format!(
            "heartbeats arrive from its pool address {address} (heartbeat_source since_ms {}; dnsmasq's lease {leased} kept beside it)",
            source["since_ms"]
        ))
    } else {
        Err(format!(
            "heartbeats arrive from {address}{}, not from its pool address {pool}",
            if address == leased {
                " (dnsmasq's lease)"
            } else {
                ""
            }
        ))
    })
}

/// What the boot network carried during the whole run, counted from the witnesses' logs:
/// dnsmasq's leases, Bearman's proxyDHCP answers and TFTP transfers. HTTP is not logged
/// per request at the daemon's default level, so its bytes are computed (artifact sizes
/// from the image manifest × the boots that reached each download), and said to be.
#[derive(Debug, Default, PartialEq, Eq)]
struct Traffic {
    dhcp_acks: usize,
    proxy_offers: usize,
    proxy_acks: usize,
    tftp_sent: usize,
    tftp_bytes: u64,
    tftp_ended_early: usize,
    /// The PXE services' bounded warnings: bad packets, rate limits, busy TFTP.
    pxe_warnings: usize,
}

fn count_traffic(daemon_log: &str, dnsmasq_log: &str) -> Traffic {
    let mut traffic = Traffic {
        dhcp_acks: dnsmasq_log
            .lines()
            .filter(|line| line.contains("DHCPACK("))
            .count(),
        ..Traffic::default()
    };
    for line in daemon_log.lines() {
        if line.contains("proxyDHCP") && line.contains("Offer sent") {
            traffic.proxy_offers += 1;
        } else if line.contains("proxyDHCP") && line.contains("Ack sent") {
            traffic.proxy_acks += 1;
        } else if line.contains("tftp: sent") {
            traffic.tftp_sent += 1;
            traffic.tftp_bytes += line
                .split_whitespace()
                .find_map(|word| word.strip_prefix("bytes="))
                .and_then(|bytes| bytes.parse::<u64>().ok())
                .unwrap_or(0);
        } else if line.contains("tftp: transfer ended") {
            traffic.tftp_ended_early += 1;
        }
        if line.contains("bearman_pxe") && line.contains("WARN") {
            traffic.pxe_warnings += 1;
        }
    }
    traffic
}

fn print_traffic(setup: &Setup, vms: &[Vm], boots: usize) {
    let traffic = count_traffic(
        &read_from(&setup.work.join("bearman.log"), 0),
        &read_from(&setup.work.join("dnsmasq.log"), 0),
    );
    let manifest: Value = fs::read_to_string(setup.images.join("manifest.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let size = |artifact: &str| {
        manifest["artifacts"][artifact]["size"]
            .as_u64()
            .unwrap_or(0)
    };
    let per_boot = size("stage1/vmlinuz")
        + size("stage1/initrd.img")
        + size("stage2/vmlinuz")
        + size("stage2/initrd.img");
    let http_boot_vms = vms
        .iter()
        .filter(|vm| vm.firmware == Firmware::UefiHttp)
        .count();
    let ipxe_efi = fs::metadata(Path::new(IPXE_DIR).join("ipxe.efi")).map_or(0, |m| m.len());
    println!(
        "boot network, whole run ({boots} boot(s) to Ready, and vm{}'s flash boot: stage 1 and the {}-byte bundle): dnsmasq DHCPACKs {}; proxyDHCP offers {} + 4011 acks {}; TFTP transfers {} ({} bytes), {} ended early (EDK2's tsize probe aborts one per PXE boot); PXE-service warnings (dropped packets, rate limits) {}; HTTP computed from the manifest: {} bytes per boot{}",
        FLASHED_VM + 1,
        FW_UPDATER_SCRIPT.len(),
        traffic.dhcp_acks,
        traffic.proxy_offers,
        traffic.proxy_acks,
        traffic.tftp_sent,
        traffic.tftp_bytes,
        traffic.tftp_ended_early,
        traffic.pxe_warnings,
        per_boot,
        if http_boot_vms > 0 {
            format!(" + ipxe.efi {ipxe_efi} bytes per UEFI HTTP boot")
        } else {
            String::new()
        }
    );
}

#[allow(clippy::too_many_arguments)]
async fn boots_and_rebuild(
    args: &Args,
    setup: &Setup,
    api: &Api,
    bearman: &mut ChildGuard,
    mut network: Option<&mut L2>,
    vms: &mut [Vm],
    daemon_log: &Path,
    first_boot_logs: LogOffsets,
    flash: &FlashPhase,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut cycles: Vec<Option<Cycle>> = vms.iter().map(|_| Some(Cycle::new(0, started))).collect();
    watch_until_ready(args, api, bearman, vms, &mut cycles, daemon_log).await?;
    for vm in vms.iter() {
        let events = events(api, &vm.uuid).await?;
        states_in_order(&events, &["registered", "provisioning", "ready"])
            .map_err(|error| anyhow!("{}: {error}", vm.name))?;
        check_bmc(api, vm, 0).await?;
        if let Some(network) = network.as_deref_mut() {
            check_l2_boot(api, setup, network, vm, &args.uefi_file, first_boot_logs).await?;
        }
    }
    let first: Vec<Cycle> = cycles.into_iter().flatten().collect();
    check_firmware(api, vms).await?;
    print_cycles("first boot", "power-on", vms, &first);
    print_flash(
        flash,
        &vms[FLASHED_VM as usize],
        &first[FLASHED_VM as usize],
    );
    if args.no_power_kill {
        if network.is_some() {
            print_traffic(setup, vms, vms.len());
        }
        progress("--no-power-kill: skipping the power-kill → fence → rebuild step");
        return Ok(());
    }

    let victim = vms.len() - 1;
    let offset = fs::read(&vms[victim].serial_log).map_or(0, |log| log.len());
    let logs_at_kill = LogOffsets {
        daemon: file_len(daemon_log),
        dnsmasq: file_len(&setup.work.join("dnsmasq.log")),
        serial: offset,
    };
    let killed_at_ms = now_ms();
    let killed = Instant::now();
    progress(format!(
        "cutting {}'s power (QMP stop: the VM halts, its BMC reads Off); waiting for Bearman to fence and rebuild it",
        vms[victim].name
    ));
    qmp_command(&vms[victim].qmp, "stop")?;
    let mut cycles: Vec<Option<Cycle>> = (0..vms.len())
        .map(|index| (index == victim).then(|| Cycle::new(offset, killed)))
        .collect();
    watch_until_ready(args, api, bearman, vms, &mut cycles, daemon_log).await?;

    let vm = &vms[victim];
    check_bmc(api, vm, offset).await?;
    if let Some(network) = network.as_deref_mut() {
        check_l2_boot(api, setup, network, vm, &args.uefi_file, logs_at_kill).await?;
    }
    let events = events(api, &vm.uuid).await?;
    let after: Vec<Value> = events
        .into_iter()
        .filter(|event| event["at_ms"].as_i64().unwrap_or(0) >= killed_at_ms)
        .collect();
    let times = states_in_order(
        &after,
        &["suspect", "fencing", "fenced", "rebuilding", "ready"],
    )
    .map_err(|error| anyhow!("{} after the power cut: {error}", vm.name))?;
    // Ready is the saga's last step to notice (it re-checks with backoff): wait for it.
    let deadline = Instant::now() + Duration::from_secs(args.phase_timeout_s);
    loop {
        let remediations = api
            .get(&format!("/api/v1/remediations?node={}", vm.uuid))
            .await?;
        let list = remediations.as_array().cloned().unwrap_or_default();
        if list
            .iter()
            .any(|remediation| remediation["status"] == json!("done"))
        {
            progress(format!(
                "{} {:>6.1} s  remediation done (admin API)",
                vm.name,
                killed.elapsed().as_secs_f64()
            ));
            break;
        }
        let ended: Vec<&Value> = list
            .iter()
            .filter(|remediation| remediation["status"] != json!("active"))
            .collect();
        ensure!(
            ended.is_empty(),
            "{}: the remediation ended without success: {remediations}",
            vm.name
        );
        ensure!(
            Instant::now() < deadline,
            "{}: Ready again, but its remediation is not done within {} s: {remediations}",
            vm.name,
            args.phase_timeout_s
        );
        tokio::time::sleep(POLL).await;
    }
    for other in vms.iter().filter(|other| other.uuid != vm.uuid) {
        let state = node_state(api, &other.uuid).await?;
        ensure!(
            state == "ready",
            "{} was not the one cut off, yet it is {state}",
            other.name
        );
        let touched = api
            .get(&format!("/api/v1/remediations?node={}", other.uuid))
            .await?;
        ensure!(
            touched.as_array().is_some_and(Vec::is_empty),
            "{} was remediated though its power was never cut: {touched}",
            other.name
        );
    }
    let rebuild: Vec<Cycle> = cycles.into_iter().flatten().collect();
    print_cycles(
        &format!("rebuild of {}", vm.name),
        "the power cut",
        &vms[victim..],
        &rebuild,
    );
    if network.is_some() {
        print_traffic(setup, vms, vms.len() + 1);
    }
    let since_kill = |at_ms: i64| (at_ms - killed_at_ms) as f64 / 1000.0;
    println!(
        "power cut → suspect {:.1} s, → fencing {:.1} s, → fenced (verified off) {:.1} s, → rebuilding {:.1} s, → Ready {:.1} s (daemon event times)",
        since_kill(times[0]),
        since_kill(times[1]),
        since_kill(times[2]),
        since_kill(times[3]),
        since_kill(times[4]),
    );
    Ok(())
}

/// The serial console lines of the flash boot, in order: the kernel reads the old BIOS
/// version from DMI, stage 1 is ordered the bundle, the fixture updater runs and succeeds,
/// and the guest restarts.
fn flash_markers() -> Vec<(&'static str, String)> {
    vec![
        ("stage-1 kernel", "Linux version ".into()),
        // The kernel's "DMI: <vendor> <product>, BIOS <version> <date>" line.
        ("DMI: old BIOS", format!(", BIOS {BIOS_OLD}")),
        ("stage-1 init", "bearman-init: stage1".into()),
        (
            "update ordered",
            format!(
                "bearman-agent: firmware: updating bios {BIOS_OLD} -> {BIOS_NEW} with bundle {FW_BUNDLE}"
            ),
        ),
        (
            "updater ran",
            format!("{FW_UPDATER_SAYS} {BIOS_OLD} -> {BIOS_NEW} from "),
        ),
        (
            "applied",
            format!("bearman-agent: firmware: bundle {FW_BUNDLE} applied (exit code 0)"),
        ),
        ("guest restart", GUEST_RESTART.into()),
    ]
}

/// What the flash boot showed, for the summary.
struct FlashPhase {
    cycle: Cycle,
    /// Seconds after power-on at which the admin API first showed `firmware_applied`.
    applied_api_s: f64,
    /// Seconds after power-on at which QEMU exited (the guest's restart, `-no-reboot`).
    exited_s: f64,
}

/// The kernel's DMI line in a console text, for messages.
fn dmi_line(console: &str) -> String {
    console
        .lines()
        .find(|line| line.contains("DMI: "))
        .map_or_else(
            || "no DMI line on the console".into(),
            |line| format!("its kernel says {:?}", line.trim()),
        )
}

/// Why the flash boot cannot succeed, from its console so far, if it cannot.
fn flash_boot_failure(console: &str) -> Option<String> {
    let failed = format!("firmware: bundle {FW_BUNDLE} failed");
    if let Some(line) = console.lines().find(|line| line.contains(&failed)) {
        return Some(format!("stage 1 says the update failed: {:?}", line.trim()));
    }
    if console.contains("bearman-agent: booting ") {
        return Some(format!(
            "Bearman sent it to boot instead of ordering bundle {FW_BUNDLE} ({})",
            dmi_line(console)
        ));
    }
    None
}

/// The firmware phase, before the normal boots: the flashed VM powers on alone reading
/// [`BIOS_OLD`]; Bearman must order [`FW_BUNDLE`], stage 1 must download it, run the
/// fixture updater, report it applied and restart the machine, which ends that QEMU
/// (`-no-reboot`). The normal flow then starts it again reading [`BIOS_NEW`], as the
/// machine would after a real flash.
async fn flash_phase(
    args: &Args,
    setup: &Setup,
    api: &Api,
    bearman: &mut ChildGuard,
    addr: SocketAddr,
    slot: &mut Option<Vm>,
    daemon_log: &Path,
) -> anyhow::Result<FlashPhase> {
    let name = format!("vm{}", FLASHED_VM + 1);
    progress(format!(
        "firmware: {name} first boots alone on BIOS {BIOS_OLD}; its flavor {FW_FLAVOR} expects {BIOS_NEW}, so Bearman must order bundle {FW_BUNDLE} (fixture updater /images/{FW_UPDATER_PATH})"
    ));
    let vm = slot.insert(start_vm(args, setup, addr, FLASHED_VM, Boot::Flash)?);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.phase_timeout_s);
    let mut cycle = Cycle::with_markers(flash_markers(), 0, started);
    let mut applied_api_s = None;
    loop {
        if let Some(status) = bearman.exit_status()? {
            bail!("bearman exited ({status}); {}", log_tail(daemon_log));
        }
        // Exit status before the log: whatever QEMU wrote before it ended is then read.
        let exited = vm.guard.exit_status()?;
        let log = fs::read(&vm.serial_log).unwrap_or_default();
        let seconds = || started.elapsed().as_secs_f64();
        for stage in cycle.scan(&log) {
            progress(format!(
                "{} {:>6.1} s  {stage} (flash boot)",
                vm.name,
                seconds()
            ));
        }
        let console = strip_ansi(&String::from_utf8_lossy(&log));
        if let Some(failure) = flash_boot_failure(&console) {
            bail!("{} on BIOS {BIOS_OLD}: {failure}", vm.name);
        }
        let node = api.get(&format!("/api/v1/nodes/{}", vm.uuid)).await?;
        if let Some(failure) = firmware_failure(&node) {
            bail!("{}: {failure}", vm.name);
        }
        if applied_api_s.is_none()
            && events(api, &vm.uuid)
                .await?
                .iter()
                .any(|event| event["action"] == json!("firmware_applied"))
        {
            applied_api_s = Some(seconds());
            progress(format!(
                "{} {:>6.1} s  firmware_applied (admin API)",
                vm.name,
                seconds()
            ));
        }
        if let Some(status) = exited {
            ensure!(
                status.success(),
                "{}'s QEMU failed in the flash boot ({status}); see {}",
                vm.name,
                setup
                    .work
                    .join(format!("{}.flash.qemu.log", vm.name))
                    .display()
            );
            ensure!(
                cycle.done(),
                "{}'s QEMU ended before the flash boot's {:?} line ({}): the guest restarted or powered off before the update was applied",
                vm.name,
                cycle.next().unwrap_or_default(),
                dmi_line(&console)
            );
            let exited_s = seconds();
            progress(format!(
                "{} {exited_s:>6.1} s  QEMU exited: the guest restarted (-no-reboot)",
                vm.name
            ));
            let applied_api_s = applied_api_s.with_context(|| {
                format!(
                    "{}: stage 1 said bundle {FW_BUNDLE} applied and restarted, but the admin API shows no firmware_applied event",
                    vm.name
                )
            })?;
            let view = api
                .get(&format!("/api/v1/nodes/{}/firmware", vm.uuid))
                .await?;
            applied_in_flight(&view).map_err(|error| anyhow!("{}: {error}", vm.name))?;
            progress(format!(
                "{}: flashed by the fixture in {exited_s:.1} s; Bearman holds the update in flight (applied) until it registers on {BIOS_NEW}",
                vm.name
            ));
            return Ok(FlashPhase {
                cycle,
                applied_api_s,
                exited_s,
            });
        }
        if Instant::now() >= deadline {
            bail!(
                "{}'s flash boot did not end within {} s (next: {}{})",
                vm.name,
                args.phase_timeout_s,
                cycle.next().unwrap_or("the guest's restart"),
                if applied_api_s.is_none() {
                    "; no firmware_applied in the admin API"
                } else {
                    ""
                }
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The bios component of `GET /nodes/{uuid}/firmware`.
fn bios_component(view: &Value) -> Result<&Value, String> {
    view["components"]
        .as_array()
        .and_then(|components| {
            components
                .iter()
                .find(|component| component["component"] == json!("bios"))
        })
        .ok_or_else(|| format!("no bios component in its firmware view: {view}"))
}

/// After the flash boot: the node still reads [`BIOS_OLD`], and its update of
/// [`FW_BUNDLE`] is in flight, applied, with no failure.
fn applied_in_flight(view: &Value) -> Result<(), String> {
    let bios = bios_component(view)?;
    let update = &view["update"];
    if bios["current"] != json!(BIOS_OLD)
        || update["bundle"] != json!(FW_BUNDLE)
        || update["in_flight"]["applied_at_ms"].as_i64().is_none()
        || update["failures"].as_u64().unwrap_or(0) != 0
    {
        return Err(format!(
            "after the flash boot Bearman should hold bundle {FW_BUNDLE} in flight and applied on BIOS {BIOS_OLD}; its firmware view: {view}"
        ));
    }
    Ok(())
}

/// Checks that `actions` occur in this order among the events (others may come between)
/// and returns each one's index in `events`.
fn actions_in_order(events: &[Value], actions: &[&str]) -> Result<Vec<usize>, String> {
    let mut found = Vec::new();
    let mut from = 0;
    for wanted in actions {
        match events[from..]
            .iter()
            .position(|event| event["action"] == json!(wanted))
        {
            Some(at) => {
                found.push(from + at);
                from += at + 1;
            }
            None => {
                let seen: Vec<&str> = events
                    .iter()
                    .filter_map(|event| event["action"].as_str())
                    .filter(|action| action.starts_with("firmware"))
                    .collect();
                return Err(format!(
                    "expected the events {actions:?} in order; its firmware events were {seen:?}"
                ));
            }
        }
    }
    Ok(found)
}

/// The flashed node after its normal boot: its bios reads [`BIOS_NEW`], which a bundle
/// flashed (`last_flashed`), first seen at [`BIOS_OLD`], compliant with nothing in
/// flight; its events went update started → applied → flashed, then provisioning → ready.
fn flashed_verdict(view: &Value, events: &[Value]) -> Result<String, String> {
    let bios = bios_component(view)?;
    let wanted = [
        ("current", json!(BIOS_NEW)),
        ("last_flashed", json!(BIOS_NEW)),
        ("first_seen", json!(BIOS_OLD)),
        ("expected", json!(BIOS_NEW)),
        ("compliant", json!(true)),
    ];
    for (key, value) in wanted {
        if bios[key] != value {
            return Err(format!("bios {key} is {}, not {value}: {bios}", bios[key]));
        }
    }
    if bios["last_flashed_at_ms"].as_i64().is_none() {
        return Err(format!("bios has no last_flashed_at_ms: {bios}"));
    }
    if !view["update"].is_null() {
        return Err(format!(
            "an update is still recorded after it came back flashed: {}",
            view["update"]
        ));
    }
    if let Some(failed) = events
        .iter()
        .find(|event| event["action"] == json!("firmware_update_failed"))
    {
        return Err(format!("a firmware attempt failed: {failed}"));
    }
    let found = actions_in_order(
        events,
        &[
            "firmware_update_started",
            "firmware_applied",
            "firmware_flashed",
        ],
    )?;
    let flashed = found[2];
    states_in_order(&events[flashed + 1..], &["provisioning", "ready"])
        .map_err(|error| format!("after firmware_flashed: {error}"))?;
    Ok(format!(
        "bios {BIOS_OLD} → {BIOS_NEW} by bundle {FW_BUNDLE}: current = last_flashed = {BIOS_NEW} (at_ms {}), first_seen {BIOS_OLD}, compliant; events firmware_update_started → firmware_applied → firmware_flashed → provisioning → ready",
        bios["last_flashed_at_ms"]
    ))
}

/// A node of the plain flavor: its bios reads what its SMBIOS says ([`BIOS_NEW`]), and
/// it was never ordered an update (its flavor expects nothing).
fn unflashed_verdict(view: &Value, events: &[Value]) -> Result<String, String> {
    let bios = bios_component(view)?;
    if bios["current"] != json!(BIOS_NEW) {
        return Err(format!(
            "its DMI bios version is {}, not the SMBIOS type 0 version {BIOS_NEW} QEMU was given: {bios}",
            bios["current"]
        ));
    }
    if !bios["last_flashed"].is_null() {
        return Err(format!("flashed although nothing was expected: {bios}"));
    }
    if let Some(event) = events.iter().find(|event| {
        event["action"].as_str().is_some_and(|action| {
            action.starts_with("firmware_update") || action == "firmware_applied"
        })
    }) {
        return Err(format!("its flavor expects no firmware, yet: {event}"));
    }
    Ok(format!(
        "bios reads {BIOS_NEW} from its SMBIOS; no update ordered"
    ))
}

/// After the first boots: the flashed VM's firmware record and events, and every other
/// VM's (see [`flashed_verdict`], [`unflashed_verdict`]).
async fn check_firmware(api: &Api, vms: &[Vm]) -> anyhow::Result<()> {
    for vm in vms {
        let view = api
            .get(&format!("/api/v1/nodes/{}/firmware", vm.uuid))
            .await?;
        let events = events(api, &vm.uuid).await?;
        let verdict = if vm.uuid == node_uuid(FLASHED_VM) {
            flashed_verdict(&view, &events)
        } else {
            unflashed_verdict(&view, &events)
        };
        let verdict = verdict.map_err(|error| anyhow!("{} firmware: {error}", vm.name))?;
        progress(format!(
            "{}: firmware ({}): {verdict}",
            vm.name,
            vm.firmware.name()
        ));
    }
    Ok(())
}

/// The firmware phase's summary line: the flash boot's stages, and the normal boot that
/// brought the node back on the new version.
fn print_flash(flash: &FlashPhase, vm: &Vm, back: &Cycle) {
    let mut stages: Vec<String> = flash
        .cycle
        .markers
        .iter()
        .zip(&flash.cycle.seen)
        .map(|((name, _), at)| format!("{name} {at:.1} s"))
        .collect();
    stages.push(format!(
        "firmware_applied (API) {:.1} s",
        flash.applied_api_s
    ));
    stages.push(format!("QEMU exited {:.1} s", flash.exited_s));
    println!(
        "firmware: {} ({}) flashed {BIOS_OLD} → {BIOS_NEW} by bundle {FW_BUNDLE}: flash boot {:.1} s ({}); restarted on {BIOS_NEW}, Ready {} s later; flash-and-reboot to Ready {} s",
        vm.name,
        vm.firmware.name(),
        flash.exited_s,
        stages.join(", "),
        back.ready_s.map_or("?".into(), |at| format!("{at:.1}")),
        back.ready_s
            .map_or("?".into(), |at| format!("{:.1}", flash.exited_s + at)),
    );
}

/// Prints each VM's stage times: seconds since `origin`, and each stage's own length.
fn print_cycles(title: &str, origin: &str, vms: &[Vm], cycles: &[Cycle]) {
    println!();
    println!(
        "{title}: seconds since {origin} (stage length in brackets; serial log polled every {} s)",
        POLL.as_secs()
    );
    let mut header = format!("{:<6}", "node");
    for (name, _) in MARKERS {
        header.push_str(&format!(" {name:>17}"));
    }
    header.push_str(&format!(" {:>17}", "Ready (API)"));
    println!("{header}");
    for (vm, cycle) in vms.iter().zip(cycles) {
        let mut line = format!("{:<6}", vm.name);
        let mut previous = 0.0;
        let times = cycle.seen.iter().copied().chain(cycle.ready_s);
        for at in times {
            line.push_str(&format!(" {:>8.1} ({:>5.1})", at, at - previous));
            previous = at;
        }
        println!("{line}");
    }
    println!();
}

/// Sends one QMP command to a VM (the "power cable" the smoke pulls), outside Bearman.
fn qmp_command(socket: &Path, command: &str) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to QMP at {}", socket.display()))?;
    stream.set_read_timeout(Some(QMP_TIMEOUT))?;
    stream.set_write_timeout(Some(QMP_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("reading the QMP greeting")?;
    for execute in ["qmp_capabilities", command] {
        writeln!(writer, "{}", json!({ "execute": execute }))?;
        loop {
            line.clear();
            ensure!(
                reader
                    .read_line(&mut line)
                    .with_context(|| format!("QMP {execute}"))?
                    > 0,
                "QMP {execute}: QEMU closed the connection"
            );
            let reply: Value = serde_json::from_str(&line)
                .with_context(|| format!("QMP {execute}: not JSON: {line}"))?;
            if let Some(error) = reply.get("error") {
                bail!("QMP {execute} failed: {error}");
            }
            if reply.get("return").is_some() {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_check_waits_for_a_heartbeat_then_wants_the_pool_address() {
        let node = |heard: i64, source: Option<&str>| {
            json!({
                "installed_at_ms": 1_000,
                "last_heartbeat_at_ms": heard,
                "heartbeat_source": source.map(|address| json!({"address": address, "since_ms": 1_001})),
            })
        };
        let verdict = |node: Value| heartbeat_source_verdict(&node, "10.77.0.10", "10.77.0.150");
        assert_eq!(verdict(node(1_000, None)), None, "installed only");
        assert_eq!(verdict(json!({"state": "ready"})), None, "never installed");
        assert!(matches!(
            verdict(node(1_001, Some("10.77.0.10"))),
            Some(Ok(line)) if line.starts_with("heartbeats arrive from its pool address 10.77.0.10")
        ));
        assert_eq!(
            verdict(node(1_001, Some("10.77.0.150"))),
            Some(Err(
                "heartbeats arrive from 10.77.0.150 (dnsmasq's lease), not from its pool address 10.77.0.10".into()
            ))
        );
        assert_eq!(
            verdict(node(1_001, None)),
            Some(Err(
                "heartbeats arrive from none, not from its pool address 10.77.0.10".into()
            ))
        );
    }

    #[test]
    fn markers_are_found_in_order_across_reads() {
        let mut cycle = Cycle::new(0, Instant::now());
        let mut log = b"SeaBIOS\nLinux version 6.1\n".to_vec();
        assert_eq!(cycle.scan(&log), vec!["stage-1 kernel"]);
        log.extend_from_slice(b"bearman-init: stage1 on kernel\nbearman-agent: booting http://x\n");
        assert_eq!(cycle.scan(&log), vec!["stage-1 init", "registered+plan"]);
        // The second kernel banner counts only after the plan line.
        log.extend_from_slice(b"Linux version 6.1\nbearman-init: stage2 on kernel\n");
        assert_eq!(cycle.scan(&log), vec!["stage-2 kernel", "stage-2 init"]);
        assert!(cycle.scan(&log).is_empty(), "nothing is seen twice");
    }

    #[test]
    fn a_cycle_ignores_what_came_before_it() {
        let old = b"Linux version 6.1\nbearman-init: stage1\n".to_vec();
        let mut cycle = Cycle::new(old.len(), Instant::now());
        assert!(cycle.scan(&old).is_empty());
    }

    /// The stage-1 console lines of a smoke boot (from a real run), with `agent` as the
    /// agent's BMC lines.
    fn stage1_console(kernel: &str, agent: &[&str]) -> String {
        let mut text = String::from("[    4.39] IPMI message handler: version 39.2\r\n");
        text.push_str(kernel);
        text.push_str("bearman-init: exec /bin/bearman-agent stage1\r\n");
        for line in agent {
            text.push_str(line);
            text.push_str("\r\n");
        }
        text.push_str(
            "bearman-agent: booting http://10.0.2.2:1/images/stage2/vmlinuz (smoke) as vm1\r\n",
        );
        text
    }

    const KCS: &str = "[    4.45] ipmi_si IPI0001:00: IPMI kcs interface initialized\r\n";

    #[test]
    fn qemus_refused_lan_print_passes_and_anything_else_fails() {
        assert_eq!(
            check_stage1_bmc(&stage1_console(
                KCS,
                &[BMC_LAN_PRINT_REFUSED, BMC_NO_SETTINGS]
            )),
            Ok(())
        );
        let fails = |console: String, expect: &str| {
            let error = check_stage1_bmc(&console).unwrap_err();
            assert!(error.contains(expect), "{expect:?} not in {error:?}");
        };
        fails(
            stage1_console("", &[BMC_LAN_PRINT_REFUSED, BMC_NO_SETTINGS]),
            "the kernel found no IPMI interface",
        );
        fails(
            stage1_console(
                KCS,
                &[
                    "bearman-init: insmod ipmi_si.ko failed (No such device); booting on",
                    BMC_LAN_PRINT_REFUSED,
                    BMC_NO_SETTINGS,
                ],
            ),
            "an IPMI module did not load",
        );
        fails(
            stage1_console(
                KCS,
                &["bearman-agent: BMC device /dev/ipmi0 found but ipmitool is not on PATH; skipping BMC configuration"],
            ),
            "did not get as far as running ipmitool",
        );
        fails(
            stage1_console(
                KCS,
                &["bearman-agent: BMC on channel 1: mac 52:54:00:00:00:01, address none"],
            ),
            "this QEMU implements LAN configuration",
        );
        fails(
            stage1_console(KCS, &[BMC_NO_SETTINGS]),
            "no line \"bearman-agent: reading the BMC",
        );
        fails(
            stage1_console(KCS, &[BMC_LAN_PRINT_REFUSED]),
            "no BMC settings",
        );
        fails(
            stage1_console(KCS, &[BMC_LAN_PRINT_REFUSED, BMC_NO_SETTINGS])
                .replace("bearman-agent: booting", "bearman-agent: stuck"),
            "never reached its plan line",
        );
        // A refusal after the plan line (a later boot) is not this boot's.
        let late = format!(
            "{KCS}bearman-agent: booting x\r\n{BMC_LAN_PRINT_REFUSED}\r\n{BMC_NO_SETTINGS}\r\n"
        );
        fails(late, "no line");
    }

    #[test]
    fn only_a_directory_an_earlier_run_made_is_emptied() {
        let root = tempfile::tempdir().unwrap();
        let precious = root.path().join("home");
        fs::create_dir(&precious).unwrap();
        fs::write(precious.join("notes.txt"), "keep me").unwrap();
        let error = prepare_work_dir(&precious, false).unwrap_err().to_string();
        assert!(error.contains("refusing to empty"), "{error}");
        assert!(precious.join("notes.txt").is_file(), "nothing was deleted");

        let work = root.path().join("smoke");
        prepare_work_dir(&work, false).unwrap();
        fs::write(work.join("vm1.serial.log"), "old run").unwrap();
        prepare_work_dir(&work, false).unwrap();
        assert!(
            !work.join("vm1.serial.log").exists(),
            "an earlier run's files go"
        );
        assert!(work.join(WORK_MARKER).is_file());
    }

    /// Log lines as the daemon (colours on, as on a terminal) and dnsmasq write them.
    const MAC: &str = "52:54:00:be:a0:02";
    const DNSMASQ: &str = "dnsmasq-dhcp[9]: 1 DHCPOFFER(eth0) 10.77.0.150 52:54:00:be:a0:02\ndnsmasq-dhcp[9]: 1 DHCPACK(eth0) 10.77.0.150 52:54:00:be:a0:02\n";
    const UEFI_TFTP: &str = "INFO bearman_pxe::serve: proxyDHCP: Offer sent \u{1b}[3mclient\u{1b}[0m\u{1b}[2m=\u{1b}[0m52:54:00:be:a0:02 to=255.255.255.255:68 answer=Tftp(\"ipxe.efi\")\n";
    const SENT: &str =
        "INFO bearman_pxe::serve: tftp: sent from=10.77.0.150:1234 file=\"ipxe.efi\" bytes=1000\n";
    const IPXE: &str = "INFO bearman_pxe::serve: proxyDHCP (4011): Ack sent client=52:54:00:be:a0:02 to=10.77.0.150:68 answer=IpxeScript(\"http://10.77.0.1:8080/ipxe\")\n";

    #[test]
    fn an_l2_boot_needs_every_witness_in_order() {
        let check = |firmware, daemon: &str, dnsmasq: &str| {
            check_netboot_logs(firmware, MAC, "ipxe.efi", &strip_ansi(daemon), dnsmasq)
        };
        let uefi = format!("{UEFI_TFTP}{SENT}{IPXE}");
        assert_eq!(
            check(Firmware::Uefi, &uefi, DNSMASQ),
            Ok("10.77.0.150".into())
        );
        assert_eq!(
            check(Firmware::Bios, IPXE, DNSMASQ),
            Ok("10.77.0.150".into())
        );
        let fails = |result: Result<String, String>, expect: &str| {
            let error = result.unwrap_err();
            assert!(error.contains(expect), "{expect:?} not in {error:?}");
        };
        fails(
            check(Firmware::Uefi, &uefi, ""),
            "dnsmasq never acknowledged",
        );
        fails(
            check(
                Firmware::Uefi,
                &uefi,
                &DNSMASQ.replace("DHCPACK", "DHCPNAK"),
            ),
            "dnsmasq never acknowledged",
        );
        fails(
            check(Firmware::Uefi, &format!("{UEFI_TFTP}{SENT}"), DNSMASQ),
            "never sent",
        );
        fails(
            check(Firmware::Uefi, &format!("{SENT}{IPXE}"), DNSMASQ),
            "never sent the UEFI VM",
        );
        fails(
            check(Firmware::Uefi, &format!("{IPXE}{UEFI_TFTP}{SENT}"), DNSMASQ),
            "before ipxe.efi",
        );
        fails(
            check(Firmware::Uefi, &format!("{UEFI_TFTP}{IPXE}"), DNSMASQ),
            "no \"tftp: sent\"",
        );
        fails(
            check(
                Firmware::Uefi,
                &uefi.replace("10.77.0.150:1234", "10.77.0.151:1234"),
                DNSMASQ,
            ),
            "no \"tftp: sent\"",
        );
        fails(check(Firmware::Bios, &uefi, DNSMASQ), "ROM is iPXE");
        let http = IPXE.replace(
            "IpxeScript(\"http://10.77.0.1:8080/ipxe\")",
            "HttpBoot(\"http://10.77.0.1:8080/images/ipxe.efi\")",
        );
        let http_boot = format!("{http}{IPXE}");
        assert_eq!(
            check(Firmware::UefiHttp, &http_boot, DNSMASQ),
            Ok("10.77.0.150".into())
        );
        fails(
            check(Firmware::UefiHttp, IPXE, DNSMASQ),
            "never sent the HTTP-boot VM",
        );
        fails(check(Firmware::UefiHttp, &http, DNSMASQ), "never sent");
        fails(
            check(Firmware::UefiHttp, &format!("{IPXE}{http}"), DNSMASQ),
            "before its HTTP Boot URL",
        );
        fails(
            check(
                Firmware::UefiHttp,
                &format!("{UEFI_TFTP}{http_boot}"),
                DNSMASQ,
            ),
            "was sent a TFTP file",
        );
        fails(
            check(
                Firmware::Bios,
                &IPXE.replace(MAC, "52:54:00:be:a0:09"),
                DNSMASQ,
            ),
            "never sent",
        );
    }

    #[test]
    fn a_uefi_stage2_must_see_efi_and_acpi_after_kexec() {
        let stage1 = "Linux version 6.1\nefi: EFI v2.70 by EDK II\nACPI: RSDP 0x1F77E014\nbearman-agent: booting http://x\n";
        let good =
            format!("{stage1}Linux version 6.1\nefi: EFI v2.70 by EDK II\nACPI: RSDP 0x1F77E014\n");
        assert_eq!(check_stage2_firmware_tables(&good), Ok(()));
        let no_acpi = format!("{stage1}Linux version 6.1\nefi: EFI v2.70 by EDK II\n");
        assert!(check_stage2_firmware_tables(&no_acpi)
            .unwrap_err()
            .contains("ACPI RSDP"));
        let no_efi = format!("{stage1}Linux version 6.1\nACPI: RSDP 0x1\n");
        assert!(check_stage2_firmware_tables(&no_efi)
            .unwrap_err()
            .contains("EFI system table"));
        assert!(check_stage2_firmware_tables(stage1)
            .unwrap_err()
            .contains("no stage-2 kernel"));
    }

    #[test]
    fn traffic_is_counted_from_the_logs() {
        let daemon = format!("{UEFI_TFTP}{SENT}{SENT}{IPXE}INFO bearman_pxe::serve: tftp: transfer ended: the client ended the transfer\n WARN bearman_pxe::serve: proxyDHCP: dropped a packet: over pxe.client_requests_per_s / client_burst\n");
        assert_eq!(
            count_traffic(&strip_ansi(&daemon), DNSMASQ),
            Traffic {
                dhcp_acks: 1,
                proxy_offers: 1,
                proxy_acks: 1,
                tftp_sent: 2,
                tftp_bytes: 2000,
                tftp_ended_early: 1,
                pxe_warnings: 1,
            }
        );
    }

    #[test]
    fn mixed_runs_alternate_bios_and_uefi() {
        let firmwares: Vec<Firmware> = (0..3)
            .map(|i| firmware_of(FirmwareChoice::Mixed, i))
            .collect();
        assert_eq!(firmwares, [Firmware::Bios, Firmware::Uefi, Firmware::Bios]);
        assert_eq!(firmware_of(FirmwareChoice::Uefi, 0), Firmware::Uefi);
        let all: Vec<Firmware> = (0..4)
            .map(|i| firmware_of(FirmwareChoice::All, i))
            .collect();
        assert_eq!(
            all,
            [
                Firmware::Bios,
                Firmware::Uefi,
                Firmware::UefiHttp,
                Firmware::Bios
            ]
        );
    }

    #[test]
    fn the_fixture_updater_says_what_it_flashes_and_needs_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("firmware-bios-update.sh");
        fs::write(&script, FW_UPDATER_SCRIPT).unwrap();
        let file = script.to_str().unwrap();
        // As stage 1 runs it: the bundle's command with {file} replaced.
        let run = |args: &[&str]| Command::new("/bin/sh").args(args).output().unwrap();
        let output = run(&[file, BIOS_NEW, file]);
        assert!(output.status.success(), "{output:?}");
        let said = String::from_utf8(output.stdout).unwrap();
        assert!(
            said.starts_with(&format!("{FW_UPDATER_SAYS} "))
                && said
                    .trim_end()
                    .ends_with(&format!("-> {BIOS_NEW} from {file}")),
            "{said}"
        );
        let missing = dir.path().join("gone");
        let output = run(&[file, BIOS_NEW, missing.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(3), "{output:?}");
    }

    #[test]
    fn the_bundle_is_the_updater_it_names() {
        let bundle = fw_bundle(FW_UPDATER_SCRIPT.as_bytes());
        assert_eq!(
            bundle["artifact"]["sha256"],
            json!(hex::encode(Sha256::digest(FW_UPDATER_SCRIPT.as_bytes())))
        );
        assert_eq!(bundle["size_bytes"], json!(FW_UPDATER_SCRIPT.len()));
        assert_eq!(
            bundle["artifact"]["url"],
            json!(format!("/images/{FW_UPDATER_PATH}"))
        );
        assert_eq!(
            bundle["command"],
            json!(["/bin/sh", "{file}", BIOS_NEW, "{file}"])
        );
        assert_eq!(
            (
                &bundle["version"],
                &bundle["applies_to"]["from_version_min"],
                &bundle["applies_to"]["from_version_max"]
            ),
            (&json!(BIOS_NEW), &json!(BIOS_OLD), &json!(BIOS_OLD))
        );
    }

    /// A flash boot's console, from a real run (kernel lines shortened).
    const FLASH_CONSOLE: &str = "[    0.000000] Linux version 6.1.0-57-amd64\r
[    0.000000] DMI: Bearman qemu-smoke, BIOS BEARMAN-1.0 \r
bearman-init: stage1 on 6.1.0-57-amd64\r
bearman-agent: firmware: updating bios BEARMAN-1.0 -> BEARMAN-2.0 with bundle smoke-bios-2.0\r
bearman-agent: firmware: downloading bundle smoke-bios-2.0 (373 bytes)\r
bearman-agent: firmware: running /bin/sh /run/bearman/firmware-bios-update.sh BEARMAN-2.0 /run/bearman/firmware-bios-update.sh (up to 60 s)\r
bearman-agent: firmware updater: bearman-fixture-updater: flashing bios BEARMAN-1.0 -> BEARMAN-2.0 from /run/bearman/firmware-bios-update.sh\r
bearman-agent: firmware: bundle smoke-bios-2.0 applied (exit code 0)\r
bearman-agent: firmware: bearman says reboot to bring bundle smoke-bios-2.0 into use; rebooting\r
[    6.751256] reboot: Restarting system\r
";

    #[test]
    fn the_flash_boot_is_read_from_its_console() {
        let mut cycle = Cycle::with_markers(flash_markers(), 0, Instant::now());
        let restart = FLASH_CONSOLE.find(GUEST_RESTART).unwrap();
        cycle.scan(&FLASH_CONSOLE.as_bytes()[..restart]);
        assert_eq!(cycle.next(), Some("guest restart"));
        cycle.scan(FLASH_CONSOLE.as_bytes());
        assert!(cycle.done());
        assert_eq!(flash_boot_failure(FLASH_CONSOLE), None);

        // Another BIOS version: the DMI marker is never seen, so the phase waits (and
        // the daemon, ordering nothing, sends it to boot: the failure below).
        let newer = FLASH_CONSOLE.replace(", BIOS BEARMAN-1.0", ", BIOS BEARMAN-2.0");
        let mut cycle = Cycle::with_markers(flash_markers(), 0, Instant::now());
        cycle.scan(newer.as_bytes());
        assert_eq!(cycle.next(), Some("DMI: old BIOS"));

        let failed = FLASH_CONSOLE.replace(
            "applied (exit code 0)",
            "failed: updater exited with code 1, not a success code [0]",
        );
        let error = flash_boot_failure(&failed).unwrap();
        assert!(
            error.starts_with("stage 1 says the update failed: "),
            "{error}"
        );
        let booted = "[    0.0] DMI: Bearman qemu-smoke, BIOS BEARMAN-2.0 \r\nbearman-agent: booting http://x/images/stage2/vmlinuz (smoke-fw) as vm1\r\n";
        let error = flash_boot_failure(booted).unwrap();
        assert!(
            error.contains("instead of ordering bundle smoke-bios-2.0")
                && error.contains("BIOS BEARMAN-2.0"),
            "{error}"
        );
    }

    fn firmware_view(bios: Value, update: Value) -> Value {
        json!({"uuid": "u", "flavor": FW_FLAVOR, "components": [bios], "update": update})
    }

    fn flashed_bios() -> Value {
        json!({
            "component": "bios", "expected": BIOS_NEW, "current": BIOS_NEW, "compliant": true,
            "first_seen": BIOS_OLD, "first_seen_at_ms": 1, "changed_at_ms": 5,
            "last_flashed": BIOS_NEW, "last_flashed_at_ms": 5,
        })
    }

    /// Events as the node's trail lists them: `(action, to_state)`, ids in order.
    fn trail(entries: &[(&str, Option<&str>)]) -> Vec<Value> {
        entries
            .iter()
            .enumerate()
            .map(|(id, (action, to_state))| {
                json!({"id": id, "at_ms": id, "action": action, "to_state": to_state})
            })
            .collect()
    }

    const FLASHED_TRAIL: &[(&str, Option<&str>)] = &[
        ("register", Some("registered")),
        ("firmware_changed", None),
        ("firmware_update_started", None),
        ("firmware_applied", None),
        ("register", Some("registered")),
        ("firmware_changed", None),
        ("firmware_flashed", None),
        ("provision", Some("provisioning")),
        ("installed", Some("ready")),
    ];

    #[test]
    fn a_flashed_node_needs_its_record_and_its_events_in_order() {
        let good = firmware_view(flashed_bios(), Value::Null);
        let verdict = flashed_verdict(&good, &trail(FLASHED_TRAIL)).unwrap();
        assert!(
            verdict.starts_with("bios BEARMAN-1.0 → BEARMAN-2.0"),
            "{verdict}"
        );

        let fails = |view: &Value, events: &[(&str, Option<&str>)], expect: &str| {
            let error = flashed_verdict(view, &trail(events)).unwrap_err();
            assert!(error.contains(expect), "{expect:?} not in {error:?}");
        };
        let with = |key: &str, value: Value| {
            let mut bios = flashed_bios();
            bios[key] = value;
            firmware_view(bios, Value::Null)
        };
        fails(
            &with("current", json!(BIOS_OLD)),
            FLASHED_TRAIL,
            "bios current",
        );
        fails(
            &with("last_flashed", Value::Null),
            FLASHED_TRAIL,
            "bios last_flashed",
        );
        fails(
            &with("first_seen", json!(BIOS_NEW)),
            FLASHED_TRAIL,
            "bios first_seen",
        );
        fails(
            &with("compliant", json!(false)),
            FLASHED_TRAIL,
            "bios compliant",
        );
        fails(
            &with("last_flashed_at_ms", Value::Null),
            FLASHED_TRAIL,
            "last_flashed_at_ms",
        );
        fails(
            &firmware_view(json!({"component": "bmc"}), Value::Null),
            FLASHED_TRAIL,
            "no bios component",
        );
        fails(
            &firmware_view(flashed_bios(), json!({"bundle": FW_BUNDLE})),
            FLASHED_TRAIL,
            "still recorded",
        );
        let mut failed = FLASHED_TRAIL.to_vec();
        failed.insert(5, ("firmware_update_failed", None));
        fails(&good, &failed, "a firmware attempt failed");
        let mut swapped = FLASHED_TRAIL.to_vec();
        swapped.swap(2, 3);
        fails(&good, &swapped, "in order");
        let unflashed: Vec<_> = FLASHED_TRAIL
            .iter()
            .copied()
            .filter(|(action, _)| *action != "firmware_flashed")
            .collect();
        fails(&good, &unflashed, "in order");
        // Provisioned on the old firmware, then flashed: not what happened here.
        let mut early = FLASHED_TRAIL.to_vec();
        let provision = early.remove(7);
        early.insert(1, provision);
        fails(&good, &early, "after firmware_flashed");
    }

    #[test]
    fn a_node_of_the_plain_flavor_reads_its_smbios_and_is_never_ordered_an_update() {
        let bios = json!({"component": "bios", "expected": null, "current": BIOS_NEW, "compliant": true, "last_flashed": null});
        let plain: &[(&str, Option<&str>)] = &[
            ("register", Some("registered")),
            ("firmware_changed", None),
            ("provision", Some("provisioning")),
        ];
        assert!(
            unflashed_verdict(&firmware_view(bios.clone(), Value::Null), &trail(plain)).is_ok()
        );
        let mut uefi_default = bios.clone();
        uefi_default["current"] = json!("0.0.0");
        let error = unflashed_verdict(&firmware_view(uefi_default, Value::Null), &trail(plain))
            .unwrap_err();
        assert!(error.contains("not the SMBIOS type 0 version"), "{error}");
        let error = unflashed_verdict(
            &firmware_view(bios, Value::Null),
            &trail(&[("firmware_update_started", None)]),
        )
        .unwrap_err();
        assert!(error.contains("expects no firmware"), "{error}");
    }

    #[test]
    fn after_the_flash_boot_the_update_is_in_flight_and_applied() {
        let bios = json!({"component": "bios", "current": BIOS_OLD});
        let update = |applied: Value, failures: u32| {
            json!({"bundle": FW_BUNDLE, "component": "bios", "from_version": BIOS_OLD,
                   "to_version": BIOS_NEW, "failures": failures,
                   "in_flight": {"started_at_ms": 1, "applied_at_ms": applied, "deadline_ms": 9}})
        };
        assert_eq!(
            applied_in_flight(&firmware_view(bios.clone(), update(json!(2), 0))),
            Ok(())
        );
        for view in [
            firmware_view(bios.clone(), update(Value::Null, 0)),
            firmware_view(bios.clone(), update(json!(2), 1)),
            firmware_view(bios, Value::Null),
            firmware_view(
                json!({"component": "bios", "current": BIOS_NEW}),
                update(json!(2), 0),
            ),
        ] {
            assert!(applied_in_flight(&view).is_err(), "{view}");
        }
    }

    #[test]
    fn a_failed_firmware_attempt_stops_the_smoke_with_its_reason() {
        assert_eq!(firmware_failure(&json!({"firmware_update": null})), None);
        assert_eq!(
            firmware_failure(&json!({"firmware_update": {"bundle": FW_BUNDLE, "failures": 0}})),
            None
        );
        let node = json!({"firmware_update": {
            "bundle": FW_BUNDLE, "from_version": BIOS_OLD, "to_version": BIOS_NEW, "failures": 1,
            "last_failure": "the updater reported success but bios reads BEARMAN-1.0 after the restart, not BEARMAN-2.0",
        }});
        assert_eq!(
            firmware_failure(&node).unwrap(),
            "firmware update by bundle smoke-bios-2.0 (BEARMAN-1.0 → BEARMAN-2.0) failed 1 time(s), the last: the updater reported success but bios reads BEARMAN-1.0 after the restart, not BEARMAN-2.0"
        );
    }

    #[test]
    fn actions_are_found_in_order() {
        let events = trail(FLASHED_TRAIL);
        assert_eq!(
            actions_in_order(&events, &["register", "firmware_applied", "register"]).unwrap(),
            vec![0, 3, 4]
        );
        let error =
            actions_in_order(&events, &["firmware_flashed", "firmware_applied"]).unwrap_err();
        assert!(error.contains("firmware_applied"), "{error}");
    }

    #[test]
    fn states_must_come_in_order() {
        let events: Vec<Value> = ["registered", "provisioning", "ready", "suspect"]
            .iter()
            .enumerate()
            .map(|(i, state)| json!({"id": i, "at_ms": i * 10, "to_state": state}))
            .collect();
        assert_eq!(
            states_in_order(&events, &["registered", "ready"]).unwrap(),
            vec![0, 20]
        );
        let error = states_in_order(&events, &["ready", "provisioning"]).unwrap_err();
        assert!(error.contains("provisioning"), "{error}");
    }
}
