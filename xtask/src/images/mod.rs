//! `cargo xtask images`: the stage-1 and stage-2 boot images (kernel + initramfs) built from
//! Debian packages, so a smoke boot needs nothing but this command and QEMU.
//!
//! The kernel and busybox come from `apt-get download` (never installed on the host), are
//! unpacked with `dpkg-deb -x`, and the initramfs is written here as a cpio (newc) archive
//! with fixed owners and mtimes, then compressed with `gzip -n`: the same inputs give the
//! same bytes. A stamp file holds the hash of every input; an unchanged stamp skips the
//! build, so a second run costs the apt look-ups and a hash of the agent binary.
//!
//! Stage 1 also carries what it needs to find and configure the BMC in-band: the IPMI
//! kernel modules and Debian's `ipmitool` with exactly the shared libraries it loads
//! (found by reading `DT_NEEDED` from the unpacked packages, checked again in the finished
//! archive). Stage 2 does not configure the BMC, so it carries neither and stays small.
//!
//! This module runs the build (inputs, stamp, assembly, manifest); the stages it goes
//! through live beside it: `debian` (apt look-ups, .debs, unpacking, the kernel),
//! `modules` (kernel modules in load order), `payload` (ipmitool and its libraries),
//! `init` (the scripts) and `cpio` (the archive writer and gzip).

mod cpio;
mod debian;
mod init;
mod modules;
mod payload;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::elf;
use crate::process::find_on_path;

use cpio::{gzip, Cpio};
use debian::{dpkg_extract, fetch_deb, find_kernel, kernel_image_package, Deb, KERNEL_METAPACKAGE};
use init::{init_script, UDHCPC_SCRIPT, UDHCPC_SCRIPT_PATH};
use modules::{add_modules, resolve_kernel_modules, stage_modules};
use payload::{
    check_loadable, ipmitool_packages, ipmitool_payload, IPMITOOL_PACKAGE, IPMITOOL_PATH,
};

const INSTALL_HINT: &str =
    "run on Debian (or a derivative) with apt-get, apt-cache, dpkg-deb and gzip on PATH";
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// busybox applets the init and udhcpc scripts run; the build fails if one is missing.
const REQUIRED_APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "ip", "udhcpc", "usleep", "cat", "uname", "echo",
];
/// Bumped whenever the image layout changes in a way the init scripts (init.rs) do not
/// show, so old outputs are rebuilt.
const LAYOUT_VERSION: &str = "bearman-images 2";
const STAMP_FILE: &str = "inputs.sha256";

#[derive(clap::Args)]
pub struct Args {
    /// Output directory (default: <target dir>/images)
    #[arg(long)]
    out: Option<PathBuf>,
    /// The bearman-agent binary to put in the images (default:
    /// <target dir>/x86_64-unknown-linux-gnu/release/bearman-agent, if it exists)
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Rebuild even when the inputs are unchanged
    #[arg(long)]
    force: bool,
}

fn progress(message: impl Display) {
    eprintln!("images: {message}");
}

impl Args {
    /// Images written to the default directory, with `agent` in them.
    pub fn with_agent(agent: PathBuf) -> Args {
        Args {
            out: None,
            agent: Some(agent),
            force: false,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    build(args).map(drop)
}

/// Builds (or finds up to date) the images and returns the directory they are in.
pub fn build(args: Args) -> anyhow::Result<PathBuf> {
    let started = Instant::now();
    for tool in ["apt-get", "apt-cache", "dpkg-deb", "gzip"] {
        ensure!(
            find_on_path(tool).is_some(),
            "{tool} is not on PATH: {INSTALL_HINT}"
        );
    }
    let (_, target_dir) = crate::process::workspace_dirs()?;
    let out = args.out.unwrap_or_else(|| target_dir.join("images"));
    let agent = match args.agent {
        Some(path) => {
            ensure!(path.is_file(), "--agent {}: no such file", path.display());
            Some(path)
        }
        None => Some(target_dir.join("x86_64-unknown-linux-gnu/release/bearman-agent"))
            .filter(|path| path.is_file()),
    };
    if agent.is_none() {
        eprintln!();
        eprintln!("images: WARNING: no bearman-agent binary (looked for {}/x86_64-unknown-linux-gnu/release/bearman-agent; pass --agent PATH)", target_dir.display());
        eprintln!("images: WARNING: building the images WITHOUT the agent: /init will say so and drop to a shell");
        eprintln!();
    }

    let debs = out.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    progress(format!("resolving {KERNEL_METAPACKAGE}"));
    let kernel_package = kernel_image_package()?;
    progress(format!(
        "fetching {kernel_package} and {BUSYBOX_PACKAGE} into {}",
        debs.display()
    ));
    let kernel_deb = fetch_deb(&kernel_package, &debs)?;
    let busybox_deb = fetch_deb(BUSYBOX_PACKAGE, &debs)?;
    let ipmitool_packages = ipmitool_packages()?;
    progress(format!(
        "fetching {IPMITOOL_PACKAGE} and the packages of its libraries: {}",
        ipmitool_packages.join(" ")
    ));
    let ipmitool_debs = ipmitool_packages
        .iter()
        .map(|package| Ok((package.clone(), fetch_deb(package, &debs)?)))
        .collect::<anyhow::Result<Vec<(String, Deb)>>>()?;
    let agent_hash = match &agent {
        Some(path) => Some(sha256_file(path)?),
        None => None,
    };

    let stage_inits: Vec<(&str, String)> = ["stage1", "stage2"]
        .into_iter()
        .map(|stage| (stage, init_script(stage)))
        .collect();
    let mut inputs = Sha256::new();
    let mut feed = |label: &str, value: &str| {
        inputs.update(format!("{label}={}\n{value}\n", value.len()).as_bytes());
    };
    feed("layout", LAYOUT_VERSION);
    feed("kernel-deb", &kernel_deb.sha256);
    feed("busybox-deb", &busybox_deb.sha256);
    feed("agent", agent_hash.as_deref().unwrap_or("absent"));
    for (stage, _) in &stage_inits {
        feed(&format!("{stage}-modules"), &stage_modules(stage).join(","));
    }
    for (package, deb) in &ipmitool_debs {
        feed(&format!("ipmitool-deb {package}"), &deb.sha256);
    }
    feed("udhcpc-script", UDHCPC_SCRIPT);
    for (stage, init) in &stage_inits {
        feed(stage, init);
    }
    let inputs_hash = hex::encode(inputs.finalize());

    let stamp = out.join(STAMP_FILE);
    let artifacts = [
        "stage1/vmlinuz",
        "stage1/initrd.img",
        "stage2/vmlinuz",
        "stage2/initrd.img",
        "manifest.json",
    ];
    let up_to_date = fs::read_to_string(&stamp).is_ok_and(|text| text.trim() == inputs_hash)
        && artifacts
            .iter()
            .all(|artifact| out.join(artifact).is_file());
    if up_to_date && !args.force {
        progress(format!(
            "up to date (inputs {}), nothing to do in {:.1}s; --force rebuilds",
            &inputs_hash[..12],
            started.elapsed().as_secs_f64()
        ));
        return Ok(out);
    }
    // Removed first: a build that fails half-way must not leave a stamp claiming success.
    if stamp.exists() {
        fs::remove_file(&stamp).with_context(|| format!("removing {}", stamp.display()))?;
    }

    let unpack = tempfile::Builder::new()
        .prefix("unpack-")
        .tempdir_in(&out)
        .context("creating a directory to unpack the packages in")?;
    progress(format!("unpacking {}", kernel_deb.path.display()));
    let kernel_root = unpack.path().join("kernel");
    dpkg_extract(&kernel_deb.path, &kernel_root)?;
    progress(format!("unpacking {}", busybox_deb.path.display()));
    let busybox_root = unpack.path().join("busybox");
    dpkg_extract(&busybox_deb.path, &busybox_root)?;

    let kernel = find_kernel(&kernel_root, &kernel_package)?;
    progress(format!(
        "kernel {} ({})",
        kernel.version,
        kernel.vmlinuz.display()
    ));
    let mut stage_modules_resolved = BTreeMap::new();
    for (stage, _) in &stage_inits {
        let modules = resolve_kernel_modules(&kernel, &stage_modules(stage))?;
        progress(format!(
            "{stage} modules, in load order: {}",
            modules
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ));
        stage_modules_resolved.insert(*stage, modules);
    }
    let mut package_roots = Vec::new();
    for (package, deb) in &ipmitool_debs {
        let root = unpack.path().join("ipmitool").join(package);
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        dpkg_extract(&deb.path, &root)?;
        package_roots.push((package.clone(), root));
    }
    let ipmitool = ipmitool_payload(&package_roots)?;
    progress(format!(
        "{IPMITOOL_PACKAGE} for stage 1, with {}",
        ipmitool.libraries.join(" ")
    ));

    let busybox = busybox_root.join("bin/busybox");
    ensure!(busybox.is_file(), "{BUSYBOX_PACKAGE} has no bin/busybox");
    let applets = busybox_applets(&busybox)?;
    if let Some(missing) = REQUIRED_APPLETS
        .iter()
        .find(|applet| !applets.contains(**applet))
    {
        bail!("{BUSYBOX_PACKAGE}'s busybox lacks the {missing} applet the init scripts need");
    }

    let mut base = Cpio::default();
    base.dir("proc")
        .dir("sys")
        .dir("dev")
        .dir("run")
        .dir("tmp")
        .dir("root")
        .char_device("dev/console", 0o600, 5, 1)
        .char_device("dev/null", 0o666, 1, 3);
    base.file("bin/busybox", 0o755, read(&busybox)?);
    for applet in &applets {
        if applet != "busybox" && !applet.contains('/') {
            base.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    base.file(
        UDHCPC_SCRIPT_PATH.trim_start_matches('/'),
        0o755,
        UDHCPC_SCRIPT.as_bytes().to_vec(),
    );
    // Debian builds busybox to look in /etc/udhcpc; init passes -s, the agent need not.
    base.symlink("etc/udhcpc/default.script", UDHCPC_SCRIPT_PATH);
    if let Some(path) = &agent {
        let binary = read(path)?;
        if elf_is_dynamic(&binary) {
            eprintln!("images: WARNING: {} is dynamically linked; the initramfs has no libc, so it will not start (build it static, e.g. with -C target-feature=+crt-static)", path.display());
        }
        base.file("bin/bearman-agent", 0o755, binary);
    }

    let vmlinuz = read(&kernel.vmlinuz)?;
    let mut manifest_artifacts = serde_json::Map::new();
    for (stage, init) in &stage_inits {
        let mut archive = base.clone();
        add_modules(&mut archive, &kernel, &stage_modules_resolved[stage])?;
        if *stage == "stage1" {
            archive.extend(&ipmitool.files);
        }
        archive.file("init", 0o755, init.as_bytes().to_vec());
        if *stage == "stage1" {
            // Checked in the archive itself, not in the packages: what boots is what counts.
            let libraries = check_loadable(&archive, IPMITOOL_PATH)
                .with_context(|| format!("{stage}: /{IPMITOOL_PATH} would not start"))?;
            ensure!(
                libraries.len() == ipmitool.libraries.len(),
                "{stage}: /{IPMITOOL_PATH} loads {} libraries, {} were put in",
                libraries.len(),
                ipmitool.libraries.len()
            );
        }
        let stage_dir = out.join(stage);
        fs::create_dir_all(&stage_dir)
            .with_context(|| format!("creating {}", stage_dir.display()))?;
        progress(format!(
            "writing {stage}/vmlinuz and {stage}/initrd.img ({} entries)",
            archive.len()
        ));
        write_atomically(&stage_dir.join("vmlinuz"), &vmlinuz)?;
        let initrd = gzip(&archive.to_bytes())?;
        write_atomically(&stage_dir.join("initrd.img"), &initrd)?;
        for (name, bytes) in [("vmlinuz", &vmlinuz), ("initrd.img", &initrd)] {
            manifest_artifacts.insert(
                format!("{stage}/{name}"),
                json!({ "sha256": hex::encode(Sha256::digest(bytes)), "size": bytes.len() }),
            );
        }
    }
    let manifest = json!({
        "kernel_version": kernel.version,
        "kernel_package": kernel_deb.file_name,
        "busybox_package": busybox_deb.file_name,
        "modules": stage_modules_resolved
            .iter()
            .map(|(stage, modules)| {
                (stage.to_string(), json!(modules.iter().map(|m| m.name.clone()).collect::<Vec<_>>()))
            })
            .collect::<serde_json::Map<_, _>>(),
        "ipmitool": {
            "stage": "stage1",
            "packages": ipmitool_debs.iter().map(|(_, deb)| deb.file_name.clone()).collect::<Vec<_>>(),
            "libraries": ipmitool.libraries,
        },
        "agent": match &agent_hash {
            Some(hash) => json!({ "included": true, "sha256": hash }),
            None => json!({ "included": false }),
        },
        "inputs_sha256": inputs_hash,
        "artifacts": Value::Object(manifest_artifacts),
    });
    let mut manifest_text = serde_json::to_string_pretty(&manifest)?;
    manifest_text.push('\n');
    write_atomically(&out.join("manifest.json"), manifest_text.as_bytes())?;
    write_atomically(&stamp, format!("{inputs_hash}\n").as_bytes())?;
    drop(unpack);
    for artifact in artifacts {
        let size = fs::metadata(out.join(artifact))?.len();
        progress(format!("{artifact}: {size} bytes"));
    }
    progress(format!(
        "done in {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        out.display()
    ));
    if agent.is_none() {
        eprintln!("images: WARNING: the images contain NO bearman-agent; rerun with the agent built or --agent PATH");
    }
    Ok(out)
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes through a temporary file and a rename, so a reader never sees half an image.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    fs::write(&partial, bytes).with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, path)
        .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("reading {}", path.display()))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Runs a command with no input and returns its stdout, or an error carrying its stderr.
fn output(command: &mut Command) -> anyhow::Result<String> {
    let what = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("{what} printed something other than UTF-8"))
}

fn busybox_applets(busybox: &Path) -> anyhow::Result<BTreeSet<String>> {
    let text = output(Command::new(busybox).arg("--list"))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect())
}

/// True for an ELF executable with a PT_INTERP header, i.e. one that needs a dynamic loader.
fn elf_is_dynamic(binary: &[u8]) -> bool {
    elf::dynamic(binary).is_ok_and(|dynamic| dynamic.interpreter.is_some())
}
