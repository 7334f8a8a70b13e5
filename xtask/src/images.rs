//! `cargo xtask images`: the stage-1 and stage-2 boot images (kernel + initramfs) built from
//! Debian packages, so a smoke boot needs nothing but this command and QEMU.
//!
//! The kernel and busybox come from `apt-get download` (never installed on the host), are
//! unpacked with `dpkg-deb -x`, and the initramfs is written here as a cpio (newc) archive
//! with fixed owners and mtimes, then compressed with `gzip -n`: the same inputs give the
//! same bytes. A stamp file holds the hash of every input; an unchanged stamp skips the
//! build, so a second run costs two apt look-ups and a hash of the agent binary.

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

use crate::process::find_on_path;

const INSTALL_HINT: &str =
    "run on Debian (or a derivative) with apt-get, apt-cache, dpkg-deb and gzip on PATH";
/// The metapackage that names the current kernel image package of the release.
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// NIC drivers (with their dependencies) for the QEMU smoke boots: q35's default NIC is
/// e1000e, `-nic model=e1000` and virtio-net are the other usual choices, and virtio_pci is
/// the bus driver virtio-net needs, a module in Debian's kernel.
const WANTED_MODULES: &[&str] = &["e1000", "e1000e", "virtio_pci", "virtio_net"];
/// busybox applets the init and udhcpc scripts run; the build fails if one is missing.
const REQUIRED_APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "ip", "udhcpc", "usleep", "cat", "uname", "echo",
];
/// Bumped whenever the image layout changes in a way the scripts below do not show, so old
/// outputs are rebuilt.
const LAYOUT_VERSION: &str = "bearman-images 1";
const STAMP_FILE: &str = "inputs.sha256";
/// Where the init script reads the modules to load, in load order.
const MODULE_LIST_PATH: &str = "etc/bearman/modules";
/// Polls of /sys/class/net for a NIC, 200 ms apart: the driver probes asynchronously.
const NIC_WAIT_POLLS: u32 = 50;

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
    feed("modules", &WANTED_MODULES.join(","));
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
    let modules = resolve_kernel_modules(&kernel)?;
    progress(format!(
        "modules, in load order: {}",
        modules
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
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
    let modules_dir = format!("lib/modules/{}", kernel.version);
    let mut module_list = String::new();
    for module in &modules {
        base.file(
            &format!("{modules_dir}/{}", module.relative_path),
            0o644,
            read(&kernel.modules_dir.join(&module.relative_path))?,
        );
        module_list.push_str(&module.relative_path);
        module_list.push('\n');
    }
    base.file(MODULE_LIST_PATH, 0o644, module_list.into_bytes());
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
        archive.file("init", 0o755, init.as_bytes().to_vec());
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
        "modules": modules.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
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

/// `linux-image-amd64` is a metapackage; the kernel is in the package it depends on.
fn kernel_image_package() -> anyhow::Result<String> {
    let text = output(Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]))
        .context("is the package list current? try apt-get update")?;
    parse_kernel_dependency(&text).with_context(|| {
        format!("apt-cache depends {KERNEL_METAPACKAGE} names no linux-image-* package:\n{text}")
    })
}

fn parse_kernel_dependency(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && !name.starts_with('<'))
        .map(str::to_string)
}

struct Deb {
    path: PathBuf,
    file_name: String,
    sha256: String,
}

/// Downloads the candidate version of `package` into `dir`, unless a file with the hash the
/// archive lists is already there: the second run needs no network.
fn fetch_deb(package: &str, dir: &Path) -> anyhow::Result<Deb> {
    let text = output(Command::new("apt-get").args(["download", "--print-uris", package]))
        .with_context(|| format!("asking apt-get where {package} is (try apt-get update)"))?;
    // 'URL' FILE SIZE HASHTYPE:HASH
    let line = text
        .lines()
        .find(|line| line.starts_with('\''))
        .with_context(|| {
            format!("apt-get download --print-uris {package} printed no URI: {text}")
        })?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    ensure!(
        fields.len() >= 4,
        "unexpected apt-get --print-uris line: {line}"
    );
    let file_name = fields[1].to_string();
    ensure!(
        !file_name.contains('/') && file_name.ends_with(".deb"),
        "unexpected file name from apt-get: {file_name}"
    );
    let expected = fields[3]
        .strip_prefix("SHA256:")
        .map(str::to_ascii_lowercase)
        .with_context(|| format!("apt lists no SHA256 for {package}: {line}"))?;
    let path = dir.join(&file_name);
    if path.is_file() {
        if sha256_file(&path)? == expected {
            return Ok(Deb {
                path,
                file_name,
                sha256: expected,
            });
        }
        progress(format!(
            "{} does not match the archive's hash; downloading again",
            path.display()
        ));
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    progress(format!("downloading {file_name}"));
    output(
        Command::new("apt-get")
            .args(["download", package])
            .current_dir(dir),
    )
    .with_context(|| format!("downloading {package}"))?;
    ensure!(
        path.is_file(),
        "apt-get download {package} did not create {}",
        path.display()
    );
    let actual = sha256_file(&path)?;
    if actual != expected {
        let _ = fs::remove_file(&path);
        bail!("{file_name}: sha256 {actual}, but the archive lists {expected}");
    }
    Ok(Deb {
        path,
        file_name,
        sha256: expected,
    })
}

fn dpkg_extract(deb: &Path, into: &Path) -> anyhow::Result<()> {
    output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into))?;
    Ok(())
}

struct Kernel {
    version: String,
    vmlinuz: PathBuf,
    /// `lib/modules/<version>` in the unpacked package.
    modules_dir: PathBuf,
}

fn find_kernel(root: &Path, package: &str) -> anyhow::Result<Kernel> {
    let boot = root.join("boot");
    let mut found = Vec::new();
    for entry in fs::read_dir(&boot).with_context(|| format!("{package} has no boot/ directory"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("vmlinuz-") {
            found.push(version.to_string());
        }
    }
    found.sort();
    let version = match found.as_slice() {
        [version] => version.clone(),
        [] => bail!("{package} has no boot/vmlinuz-*"),
        many => bail!("{package} has several kernels: {}", many.join(", ")),
    };
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| root.join(dir).join(&version))
        .find(|dir| dir.is_dir())
        .with_context(|| format!("{package} has no lib/modules/{version}"))?;
    Ok(Kernel {
        vmlinuz: boot.join(format!("vmlinuz-{version}")),
        version,
        modules_dir,
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Module {
    name: String,
    /// Relative to `lib/modules/<version>`, e.g. `kernel/drivers/net/virtio_net.ko`.
    relative_path: String,
}

/// Module names use `_` where file names may use `-` (`virtio-gpu.ko` is `virtio_gpu`).
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    Some(file.strip_suffix(".ko")?.replace('-', "_"))
}

/// Parses modules.dep (`kernel/a.ko: kernel/b.ko kernel/c.ko`) into name → (path, deps).
fn parse_modules_dep(text: &str) -> anyhow::Result<BTreeMap<String, (String, Vec<String>)>> {
    let mut index = BTreeMap::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let (module, deps) = line
            .split_once(':')
            .with_context(|| format!("modules.dep line without ':': {line}"))?;
        let name = module_name(module.trim())
            .with_context(|| format!("modules.dep names an unexpected file: {module}"))?;
        let deps = deps
            .split_whitespace()
            .map(|dep| {
                module_name(dep)
                    .with_context(|| format!("modules.dep names an unexpected file: {dep}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        index.insert(name, (module.trim().to_string(), deps));
    }
    Ok(index)
}

/// Orders `wanted` and everything they depend on so every module comes after its
/// dependencies, the order insmod needs. `path_of` returns `None` for a module that is not
/// available as a file (the caller decides whether it is built in).
fn resolve_modules(
    wanted: &[&str],
    mut path_of: impl FnMut(&str) -> anyhow::Result<Option<String>>,
    mut deps_of: impl FnMut(&str) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<Vec<Module>> {
    // Iterative depth-first post-order, bounded: a dependency cycle is an error, not a hang.
    let mut ordered: Vec<Module> = Vec::new();
    let mut done = BTreeSet::new();
    for root in wanted {
        let mut stack: Vec<(String, Option<Vec<String>>)> = vec![(root.replace('-', "_"), None)];
        let mut on_path = BTreeSet::new();
        while let Some((name, pending)) = stack.pop() {
            if done.contains(&name) {
                continue;
            }
            let mut pending = match pending {
                Some(pending) => pending,
                None => {
                    ensure!(
                        on_path.insert(name.clone()),
                        "module dependency cycle through {name}"
                    );
                    let mut deps = deps_of(&name)?;
                    deps.reverse();
                    deps
                }
            };
            match pending.pop() {
                Some(dep) if !done.contains(&dep) => {
                    ensure!(
                        !on_path.contains(&dep),
                        "module dependency cycle: {name} needs {dep}"
                    );
                    stack.push((name, Some(pending)));
                    stack.push((dep, None));
                }
                Some(_) => stack.push((name, Some(pending))),
                None => {
                    on_path.remove(&name);
                    done.insert(name.clone());
                    if let Some(relative_path) = path_of(&name)? {
                        ordered.push(Module {
                            name,
                            relative_path,
                        });
                    }
                }
            }
        }
    }
    Ok(ordered)
}

/// Resolves [`WANTED_MODULES`] against the unpacked kernel: through modules.dep when the
/// package ships one, otherwise (Debian's does not: depmod writes it on install) through the
/// `depends=` field of each module's .modinfo section.
fn resolve_kernel_modules(kernel: &Kernel) -> anyhow::Result<Vec<Module>> {
    let builtin: BTreeSet<String> = fs::read_to_string(kernel.modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(module_name)
        .collect();
    let dep_file = kernel.modules_dir.join("modules.dep");
    let index: BTreeMap<String, (String, Vec<String>)> = if dep_file.is_file() {
        parse_modules_dep(
            &fs::read_to_string(&dep_file)
                .with_context(|| format!("reading {}", dep_file.display()))?,
        )?
    } else {
        let mut paths = BTreeMap::new();
        walk_modules(
            &kernel.modules_dir,
            &kernel.modules_dir.join("kernel"),
            &mut paths,
        )?;
        paths
            .into_iter()
            .map(|(name, path)| (name, (path, Vec::new())))
            .collect()
    };
    let from_dep_file = dep_file.is_file();
    let check_available = |name: &str| -> anyhow::Result<bool> {
        if index.contains_key(name) {
            Ok(true)
        } else if builtin.contains(name) {
            Ok(false)
        } else {
            bail!(
                "kernel {} has no module {name}, as a file or built in",
                kernel.version
            )
        }
    };
    resolve_modules(
        WANTED_MODULES,
        |name| {
            Ok(if check_available(name)? {
                Some(index[name].0.clone())
            } else {
                None
            })
        },
        |name| {
            if !check_available(name)? {
                return Ok(Vec::new());
            }
            let (path, deps) = &index[name];
            if from_dep_file {
                return Ok(deps.clone());
            }
            ensure!(
                path.ends_with(".ko"),
                "{path} is compressed; reading its dependencies needs modules.dep"
            );
            modinfo_depends(&read(&kernel.modules_dir.join(path))?)
                .with_context(|| format!("{path} has no depends= field in .modinfo"))
        },
    )
}

fn walk_modules(
    root: &Path,
    dir: &Path,
    into: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk_modules(root, &path, into)?;
            continue;
        }
        let relative = path.strip_prefix(root)?.to_string_lossy().into_owned();
        let name = relative.rsplit('/').next().unwrap_or_default();
        let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix));
        if let Some(stem) = stem {
            into.insert(stem.replace('-', "_"), relative);
        }
    }
    Ok(())
}

/// The `depends=` entry of a module's .modinfo section: NUL-separated `key=value` strings,
/// the same text `modinfo -F depends` prints. Found by scanning for the NUL-preceded key,
/// which is all .modinfo needs and spares an ELF parser.
fn modinfo_depends(ko: &[u8]) -> Option<Vec<String>> {
    const KEY: &[u8] = b"\0depends=";
    let start = ko.windows(KEY.len()).position(|window| window == KEY)? + KEY.len();
    let end = ko[start..].iter().position(|&byte| byte == 0)? + start;
    let value = std::str::from_utf8(&ko[start..end]).ok()?;
    Some(
        value
            .split(',')
            .filter(|dep| !dep.is_empty())
            .map(|dep| dep.replace('-', "_"))
            .collect(),
    )
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
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        binary
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |at: usize| {
        binary
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        binary
            .get(at..at + 8)
            .and_then(|b| usize::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok())
    };
    // 64-bit little-endian ELF only: anything else is not an amd64 agent and is left alone.
    if binary.get(..6) != Some(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(entry_size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..count).any(|index| u32_at(phoff + index * entry_size) == Some(PT_INTERP))
}

fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    // Through a file, not a pipe, so no second thread has to feed gzip's stdin.
    let input = tempfile::NamedTempFile::new().context("creating a temporary file for gzip")?;
    fs::write(input.path(), bytes).context("writing the cpio archive")?;
    let result = Command::new("gzip")
        .args(["-n", "-9", "-c"])
        .stdin(File::open(input.path())?)
        .stderr(Stdio::inherit())
        .output()
        .context("running gzip")?;
    ensure!(
        result.status.success(),
        "gzip -n -9 failed ({})",
        result.status
    );
    Ok(result.stdout)
}

const UDHCPC_SCRIPT_PATH: &str = "/usr/share/udhcpc/default.script";

/// The udhcpc hook: busybox udhcpc only negotiates the lease and leaves configuring the
/// interface to this script, called with the event in $1 and the lease in the environment.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
# Installed by cargo xtask images: applies udhcpc's lease with ip(8).
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then
      ip route replace default via "${router%% *}" dev "$interface"
    fi
    if [ -n "$dns" ]; then
      : > /etc/resolv.conf
      for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
    fi
    echo "udhcpc: $interface $ip/${mask:-24} router ${router:-none} dns ${dns:-none}"
    ;;
esac
exit 0
"#;

fn init_script(stage: &str) -> String {
    format!(
        r#"#!/bin/sh
# Bearman {stage} /init, generated by cargo xtask images.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mkdir -p /etc /tmp
exec </dev/console >/dev/console 2>&1
echo "bearman-init: {stage} on kernel $(uname -r)"

while read -r module; do
  insmod "/lib/modules/$(uname -r)/$module" || echo "bearman-init: insmod $module failed"
done < /{MODULE_LIST_PATH}
ip link set lo up

# The NIC drivers probe asynchronously: wait (bounded) for the first ethernet interface.
nic=
polls=0
while [ -z "$nic" ] && [ "$polls" -lt {NIC_WAIT_POLLS} ]; do
  for path in /sys/class/net/*; do
    name="${{path##*/}}"
    if [ "$name" != lo ] && [ -e "$path/device" ]; then nic="$name"; break; fi
  done
  [ -n "$nic" ] || usleep 200000
  polls=$((polls + 1))
done
if [ -n "$nic" ]; then
  echo "bearman-init: configuring $nic with DHCP"
  ip link set "$nic" up
  udhcpc -i "$nic" -s {UDHCPC_SCRIPT_PATH} -n -q -t 5 -T 2 || echo "bearman-init: no DHCP lease on $nic"
else
  echo "bearman-init: no ethernet interface appeared"
fi
ip -4 addr show

if [ -x /bin/bearman-agent ]; then
  echo "bearman-init: exec /bin/bearman-agent {stage}"
  exec /bin/bearman-agent {stage}
fi
echo "bearman-init: /bin/bearman-agent is not in this image (built without --agent); dropping to a shell"
exec /bin/sh
"#
    )
}

/// An initramfs being assembled: entries by path, written in path order (a parent's path
/// sorts before its children's) with uid, gid and mtime 0, so equal inputs give equal bytes.
#[derive(Clone, Default)]
struct Cpio {
    entries: BTreeMap<String, CpioEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum CpioEntry {
    Dir,
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl Cpio {
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds `path`'s missing parent directories, then the entry (replacing an earlier one).
    fn insert(&mut self, path: &str, entry: CpioEntry) -> &mut Cpio {
        let path = path.trim_start_matches('/');
        assert!(
            !path.is_empty() && !path.split('/').any(|part| part.is_empty() || part == ".."),
            "bad cpio path {path:?}"
        );
        let mut parent = String::new();
        for part in path
            .split('/')
            .rev()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries.entry(parent.clone()).or_insert(CpioEntry::Dir);
        }
        self.entries.insert(path.to_string(), entry);
        self
    }

    fn dir(&mut self, path: &str) -> &mut Cpio {
        self.insert(path, CpioEntry::Dir)
    }

    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> &mut Cpio {
        self.insert(path, CpioEntry::File { mode, data })
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Cpio {
        self.insert(
            path,
            CpioEntry::Symlink {
                target: target.to_string(),
            },
        )
    }

    fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Cpio {
        self.insert(path, CpioEntry::CharDevice { mode, major, minor })
    }

    /// The archive in the "newc" format the kernel unpacks: per entry a 110-byte ASCII
    /// header, the NUL-terminated name and the data, each padded to 4 bytes.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (inode, (path, entry)) in (1u32..).zip(&self.entries) {
            let (mode, nlink, data, (rmajor, rminor)) = match entry {
                CpioEntry::Dir => (S_IFDIR | 0o755, 2, &[][..], (0, 0)),
                CpioEntry::File { mode, data } => (S_IFREG | mode, 1, &data[..], (0, 0)),
                CpioEntry::Symlink { target } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
                CpioEntry::CharDevice { mode, major, minor } => {
                    (S_IFCHR | mode, 1, &[][..], (*major, *minor))
                }
            };
            write_cpio_entry(&mut out, inode, mode, nlink, (rmajor, rminor), path, data);
        }
        write_cpio_entry(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        out
    }
}

fn write_cpio_entry(
    out: &mut Vec<u8>,
    inode: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) {
    let size = u32::try_from(data.len()).expect("cpio newc entries are smaller than 4 GiB");
    let name_size = u32::try_from(name.len() + 1).expect("cpio names are short");
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize, check
    let header = format!(
        "070701{inode:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{size:08X}{:08X}{:08X}{:08X}{:08X}{name_size:08X}{:08X}",
        0, 0, 0, 0, 0, rdev.0, rdev.1, 0
    );
    debug_assert_eq!(header.len(), 110);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().div_ceil(4) * 4, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// name, mode, (rdevmajor, rdevminor), data
    type Parsed = (String, u32, (u32, u32), Vec<u8>);

    /// A tiny newc reader: every entry up to and without the trailer.
    fn parse_cpio(bytes: &[u8]) -> Vec<Parsed> {
        let mut entries = Vec::new();
        let mut at = 0;
        let field = |header: &[u8], index: usize| {
            let text = std::str::from_utf8(&header[6 + index * 8..14 + index * 8]).unwrap();
            u32::from_str_radix(text, 16).unwrap()
        };
        let align = |at: usize| at.div_ceil(4) * 4;
        loop {
            let header = &bytes[at..at + 110];
            assert_eq!(&header[..6], b"070701");
            assert_eq!(field(header, 2), 0, "uid");
            assert_eq!(field(header, 5), 0, "mtime");
            let (mode, size, name_size) = (
                field(header, 1),
                field(header, 6) as usize,
                field(header, 11) as usize,
            );
            let name_start = at + 110;
            let name = std::str::from_utf8(&bytes[name_start..name_start + name_size - 1])
                .unwrap()
                .to_string();
            assert_eq!(
                bytes[name_start + name_size - 1],
                0,
                "name is NUL-terminated"
            );
            let data_start = align(name_start + name_size);
            let data = bytes[data_start..data_start + size].to_vec();
            at = align(data_start + size);
            if name == "TRAILER!!!" {
                assert_eq!(at, bytes.len(), "nothing after the trailer");
                return entries;
            }
            entries.push((name, mode, (field(header, 9), field(header, 10)), data));
        }
    }

    #[test]
    fn cpio_archive_round_trips_with_parents_first_and_deterministic_bytes() {
        let mut archive = Cpio::default();
        archive
            .file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .file("lib/modules/6.1.0/kernel/e1000.ko", 0o644, vec![1, 2, 3])
            .symlink("bin/sh", "busybox")
            .char_device("dev/console", 0o600, 5, 1);
        let bytes = archive.to_bytes();
        assert_eq!(
            bytes,
            archive.clone().to_bytes(),
            "same entries, same bytes"
        );
        let entries = parse_cpio(&bytes);
        let names: Vec<&str> = entries.iter().map(|entry| entry.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1.0",
                "lib/modules/6.1.0/kernel",
                "lib/modules/6.1.0/kernel/e1000.ko"
            ]
        );
        let find = |name: &str| entries.iter().find(|entry| entry.0 == name).unwrap();
        assert_eq!(find("init").1, S_IFREG | 0o755);
        assert_eq!(find("init").3, b"#!/bin/sh\necho hi\n");
        assert_eq!(find("bin").1, S_IFDIR | 0o755);
        assert_eq!(
            (find("bin/sh").1, find("bin/sh").3.as_slice()),
            (S_IFLNK | 0o777, &b"busybox"[..])
        );
        assert_eq!(
            (find("dev/console").1, find("dev/console").2),
            (S_IFCHR | 0o600, (5, 1))
        );
        assert_eq!(find("lib/modules/6.1.0/kernel/e1000.ko").3, [1, 2, 3]);
    }

    #[test]
    fn cpio_archive_is_listed_by_the_cpio_tool_when_installed() {
        let Some(cpio) = find_on_path("cpio") else {
            return;
        };
        let mut archive = Cpio::default();
        archive
            .file("etc/bearman/modules", 0o644, b"a\n".to_vec())
            .symlink("bin/sh", "busybox");
        let listing = Command::new(cpio)
            .args(["-t", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(&archive.to_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(listing.status.success());
        assert_eq!(
            String::from_utf8(listing.stdout).unwrap(),
            "bin\nbin/sh\netc\netc/bearman\netc/bearman/modules\n"
        );
    }

    const MODULES_DEP: &str = "\
kernel/drivers/net/ethernet/intel/e1000/e1000.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci-modern-dev.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
";

    fn resolve_from_dep(wanted: &[&str], text: &str) -> anyhow::Result<Vec<String>> {
        let index = parse_modules_dep(text)?;
        let modules = resolve_modules(
            wanted,
            |name| Ok(index.get(name).map(|entry| entry.0.clone())),
            |name| {
                Ok(index
                    .get(name)
                    .map(|entry| entry.1.clone())
                    .unwrap_or_default())
            },
        )?;
        Ok(modules.into_iter().map(|module| module.name).collect())
    }

    #[test]
    fn modules_come_after_their_dependencies_and_only_once() {
        let order =
            resolve_from_dep(&["e1000", "virtio_net", "net_failover"], MODULES_DEP).unwrap();
        assert_eq!(
            order,
            [
                "e1000",
                "failover",
                "net_failover",
                "virtio_ring",
                "virtio",
                "virtio_net"
            ]
        );
        let index = parse_modules_dep(MODULES_DEP).unwrap();
        assert_eq!(index["virtio_net"].0, "kernel/drivers/net/virtio_net.ko");
    }

    #[test]
    fn module_names_use_underscores_for_dashes() {
        let order = resolve_from_dep(&["virtio-pci-modern-dev"], MODULES_DEP).unwrap();
        assert_eq!(order, ["virtio_ring", "virtio", "virtio_pci_modern_dev"]);
    }

    #[test]
    fn module_dependency_cycle_is_an_error_not_a_hang() {
        let error = resolve_from_dep(&["a"], "a.ko: b.ko\nb.ko: a.ko\n").unwrap_err();
        assert!(error.to_string().contains("cycle"), "{error}");
    }

    #[test]
    fn modinfo_depends_reads_the_modinfo_field() {
        let ko =
            b"\x7fELF junk\0license=GPL\0depends=virtio_ring,virtio,net_failover\0retpoline=Y\0";
        assert_eq!(
            modinfo_depends(ko).unwrap(),
            ["virtio_ring", "virtio", "net_failover"]
        );
        assert_eq!(
            modinfo_depends(b"\0depends=\0").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(modinfo_depends(b"no field here"), None);
    }

    #[test]
    fn kernel_package_is_read_from_apt_cache_depends() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_kernel_dependency(text).unwrap(),
            "linux-image-6.1.0-56-amd64"
        );
        assert_eq!(parse_kernel_dependency("linux-image-amd64\n"), None);
    }
}
