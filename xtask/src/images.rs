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

const INSTALL_HINT: &str =
    "run on Debian (or a derivative) with apt-get, apt-cache, dpkg-deb and gzip on PATH";
/// The metapackage that names the current kernel image package of the release.
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// NIC drivers (with their dependencies) for the QEMU smoke boots: q35's default NIC is
/// e1000e, `-nic model=e1000` and virtio-net are the other usual choices, and virtio_pci is
/// the bus driver virtio-net needs, a module in Debian's kernel.
const WANTED_MODULES: &[&str] = &["e1000", "e1000e", "virtio_pci", "virtio_net"];
/// Stage 1's in-band IPMI stack, in load order: the message handler, the `/dev/ipmi0`
/// character device, and the system-interface driver that probes (ACPI, SMBIOS, PCI) for a
/// KCS/SMIC/BT interface. `ipmi_si` finds nothing on a machine without a BMC and its insmod
/// fails: the init script prints one line and boots on.
const IPMI_MODULES: &[&str] = &["ipmi_msghandler", "ipmi_devintf", "ipmi_si"];
const IPMITOOL_PACKAGE: &str = "ipmitool";
const IPMITOOL_IN_PACKAGE: &str = "usr/bin/ipmitool";
/// On init's PATH (/bin), where the agent looks for it.
const IPMITOOL_PATH: &str = "bin/ipmitool";
/// Where ipmitool's libraries are put: the first directory Debian's dynamic loader searches
/// when there is no /etc/ld.so.cache (there is none in the image).
const LIBRARY_DIR: &str = "lib/x86_64-linux-gnu";
/// The loader's built-in search path (`ld.so --help` on Debian amd64), used to check the
/// finished image.
const LOADER_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib",
    "usr/lib",
];
/// Where libraries are looked for in the unpacked packages (bookworm's libc6 still ships
/// under /lib, libssl3 under /usr/lib).
const PACKAGE_LIBRARY_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "lib",
    "usr/lib",
];
/// Bound on the packages fetched for ipmitool (bookworm: nine).
const IPMITOOL_PACKAGES_MAX: usize = 24;
/// Bound on symlinks followed to reach a file.
const SYMLINK_HOPS_MAX: usize = 16;
/// busybox applets the init and udhcpc scripts run; the build fails if one is missing.
const REQUIRED_APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "ip", "udhcpc", "usleep", "cat", "uname", "echo",
];
/// Bumped whenever the image layout changes in a way the scripts below do not show, so old
/// outputs are rebuilt.
const LAYOUT_VERSION: &str = "bearman-images 2";
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

/// The kernel modules a stage's init loads: the NIC drivers, and in stage 1 the IPMI stack.
fn stage_modules(stage: &str) -> Vec<&'static str> {
    let mut modules = WANTED_MODULES.to_vec();
    if stage == "stage1" {
        modules.extend_from_slice(IPMI_MODULES);
    }
    modules
}

/// Puts `modules` under lib/modules/<version> and their paths, in load order, in the list
/// the init script reads.
fn add_modules(archive: &mut Cpio, kernel: &Kernel, modules: &[Module]) -> anyhow::Result<()> {
    let modules_dir = format!("lib/modules/{}", kernel.version);
    let mut module_list = String::new();
    for module in modules {
        archive.file(
            &format!("{modules_dir}/{}", module.relative_path),
            0o644,
            read(&kernel.modules_dir.join(&module.relative_path))?,
        );
        module_list.push_str(&module.relative_path);
        module_list.push('\n');
    }
    archive.file(MODULE_LIST_PATH, 0o644, module_list.into_bytes());
    Ok(())
}

/// `ipmitool` and the packages that may hold the libraries it loads: the `lib*` packages
/// among its `Depends:`, transitively (libc6, libfreeipmi17, libssl3, libreadline8 and
/// theirs). Not the others (freeipmi-common, readline-common: data files ipmitool's
/// `lan print`/`lan set` do not read). Whether they really provide every library is
/// checked against the binaries afterwards.
fn ipmitool_packages() -> anyhow::Result<Vec<String>> {
    let mut found = BTreeSet::from([IPMITOOL_PACKAGE.to_string()]);
    let mut queue = vec![IPMITOOL_PACKAGE.to_string()];
    while let Some(package) = queue.pop() {
        let text = output(Command::new("apt-cache").args(["depends", &package]))
            .with_context(|| format!("apt-cache depends {package} (try apt-get update)"))?;
        for dependency in library_dependencies(&text) {
            if found.insert(dependency.clone()) {
                ensure!(
                    found.len() <= IPMITOOL_PACKAGES_MAX,
                    "{IPMITOOL_PACKAGE} pulls in more than {IPMITOOL_PACKAGES_MAX} library packages: {}",
                    found.iter().cloned().collect::<Vec<_>>().join(" ")
                );
                queue.push(dependency);
            }
        }
    }
    Ok(found.into_iter().collect())
}

/// The `lib*` packages in `apt-cache depends` output: `Depends:` lines and the first of
/// `|Depends:` alternatives, not `PreDepends:`, `Recommends:` or virtual `<names>`.
fn library_dependencies(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(|name| name.trim().trim_end_matches(":any"))
        .filter(|name| name.starts_with("lib") && !name.starts_with('<'))
        .map(str::to_string)
        .collect()
}

/// ipmitool and its libraries, laid out as they go into stage 1.
struct IpmitoolPayload {
    files: Cpio,
    /// Sonames, sorted.
    libraries: Vec<String>,
}

/// Reads `usr/bin/ipmitool` from the unpacked packages, follows its `DT_NEEDED` entries
/// (transitively) to the library files in those packages, and lays out the binary, each
/// library under /lib/x86_64-linux-gnu by its soname, and the program interpreter at the
/// path ipmitool names (`/lib64/ld-linux-x86-64.so.2`). A library no package provides is
/// an error naming it and what needs it.
fn ipmitool_payload(roots: &[(String, PathBuf)]) -> anyhow::Result<IpmitoolPayload> {
    let binary = find_in_packages(roots, &[IPMITOOL_IN_PACKAGE])?
        .with_context(|| format!("no package has {IPMITOOL_IN_PACKAGE}"))?;
    let dynamic = elf::dynamic(&binary).context(IPMITOOL_IN_PACKAGE)?;
    let packages = roots
        .iter()
        .map(|(package, _)| package.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let libraries = elf::needed_closure(IPMITOOL_PACKAGE, &dynamic, |soname| {
        let candidates: Vec<String> = PACKAGE_LIBRARY_DIRS
            .iter()
            .map(|dir| format!("{dir}/{soname}"))
            .collect();
        find_in_packages(roots, &candidates)
    })
    .with_context(|| {
        format!("resolving {IPMITOOL_PACKAGE}'s shared libraries in the packages {packages}")
    })?;
    let mut files = Cpio::default();
    files.file(IPMITOOL_PATH, 0o755, binary);
    for (soname, bytes) in &libraries {
        files.file(&format!("{LIBRARY_DIR}/{soname}"), 0o755, bytes.clone());
    }
    if let Some(interpreter) = &dynamic.interpreter {
        let in_image = interpreter.trim_start_matches('/');
        let file_name = in_image.rsplit('/').next().unwrap_or_default();
        if libraries.contains_key(file_name) {
            // libc.so.6 needs the loader too, so it is already there: link, do not copy.
            if in_image != format!("{LIBRARY_DIR}/{file_name}") {
                files.symlink(in_image, &format!("/{LIBRARY_DIR}/{file_name}"));
            }
        } else {
            let bytes = find_in_packages(roots, &[in_image])?.with_context(|| {
                format!("{IPMITOOL_PACKAGE}'s interpreter {interpreter} is in none of the packages {packages}")
            })?;
            files.file(in_image, 0o755, bytes);
        }
    }
    Ok(IpmitoolPayload {
        files,
        libraries: libraries.into_keys().collect(),
    })
}

/// The contents of the first of `candidates` (paths relative to a package root) that exists
/// in one of the unpacked packages, following symlinks inside that package.
fn find_in_packages(
    roots: &[(String, PathBuf)],
    candidates: &[impl AsRef<str>],
) -> anyhow::Result<Option<Vec<u8>>> {
    for candidate in candidates {
        for (_, root) in roots {
            if let Some(path) = resolve_in_root(root, candidate.as_ref())? {
                return read(&path).map(Some);
            }
        }
    }
    Ok(None)
}

/// `relative` under `root` with symlinks followed as if `root` were `/` (an unpacked
/// package's absolute links point into the package, not the host); `None` if it is not
/// there.
fn resolve_in_root(root: &Path, relative: &str) -> anyhow::Result<Option<PathBuf>> {
    let mut current = relative.trim_start_matches('/').to_string();
    for _ in 0..SYMLINK_HOPS_MAX {
        let path = root.join(&current);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return Ok(None);
        };
        if !meta.file_type().is_symlink() {
            return Ok(meta.is_file().then_some(path));
        }
        let target =
            fs::read_link(&path).with_context(|| format!("reading the link {}", path.display()))?;
        current = join_link(&current, &target.to_string_lossy());
    }
    bail!(
        "{relative} in {}: more than {SYMLINK_HOPS_MAX} symlinks",
        root.display()
    )
}

/// Where a symlink at `link` (a root-relative path) pointing at `target` leads, as a
/// root-relative path with `.` and `..` resolved.
fn join_link(link: &str, target: &str) -> String {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        let mut parts: Vec<&str> = link.split('/').collect();
        parts.pop();
        parts
    };
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    parts.join("/")
}

/// Checks that `program` in the archive can be started by the kernel and the dynamic
/// loader: its interpreter is a file there, and every library it needs, transitively, is a
/// file in a directory the loader searches. Returns the sonames, sorted.
fn check_loadable(archive: &Cpio, program: &str) -> anyhow::Result<Vec<String>> {
    let binary = archive
        .resolve(program)
        .with_context(|| format!("/{program} is not in the image"))?;
    let dynamic = elf::dynamic(binary).with_context(|| format!("/{program}"))?;
    if let Some(interpreter) = &dynamic.interpreter {
        ensure!(
            archive.resolve(interpreter).is_some(),
            "/{program}'s interpreter {interpreter} is not in the image"
        );
    }
    let libraries = elf::needed_closure(&format!("/{program}"), &dynamic, |soname| {
        Ok(LOADER_DIRS
            .iter()
            .find_map(|dir| archive.resolve(&format!("{dir}/{soname}")))
            .map(<[u8]>::to_vec))
    })
    .with_context(|| {
        format!(
            "a library of /{program} is not in the image's loader path (/{})",
            LOADER_DIRS.join(", /")
        )
    })?;
    Ok(libraries.into_keys().collect())
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

/// Resolves `wanted` against the unpacked kernel: through modules.dep when the
/// package ships one, otherwise (Debian's does not: depmod writes it on install) through the
/// `depends=` field of each module's .modinfo section.
fn resolve_kernel_modules(kernel: &Kernel, wanted: &[&str]) -> anyhow::Result<Vec<Module>> {
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
        wanted,
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
    elf::dynamic(binary).is_ok_and(|dynamic| dynamic.interpreter.is_some())
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

/// Loads each module of "$module_list" from "$module_dir", in order. A module that does not
/// load (ipmi_si on a machine without a BMC: "No such device") is one console line, and the
/// next module and the boot go on.
const INSMOD_LOOP: &str = r#"while read -r module; do
  if ! error=$(insmod "$module_dir/$module" 2>&1); then
    echo "bearman-init: insmod ${module##*/} failed (${error:-no message}); booting on"
  fi
done < "$module_list"
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

module_dir="/lib/modules/$(uname -r)"
module_list=/{MODULE_LIST_PATH}
{INSMOD_LOOP}ip link set lo up

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

    /// Adds every entry of `other` (replacing entries at the same paths).
    fn extend(&mut self, other: &Cpio) -> &mut Cpio {
        for (path, entry) in &other.entries {
            self.insert(path, entry.clone());
        }
        self
    }

    /// The data of the file at `path`, following symlinks as the booted system would (an
    /// absolute target from the root, a relative one from the link's directory); `None`
    /// when it leads nowhere or to something that is not a file.
    fn resolve(&self, path: &str) -> Option<&[u8]> {
        let mut current = path.trim_start_matches('/').to_string();
        for _ in 0..SYMLINK_HOPS_MAX {
            match self.entries.get(&current)? {
                CpioEntry::File { data, .. } => return Some(data),
                CpioEntry::Symlink { target } => current = join_link(&current, target),
                CpioEntry::Dir | CpioEntry::CharDevice { .. } => return None,
            }
        }
        None
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
    fn stage_one_alone_loads_the_ipmi_modules_after_the_nics() {
        assert_eq!(
            stage_modules("stage1"),
            [
                "e1000",
                "e1000e",
                "virtio_pci",
                "virtio_net",
                "ipmi_msghandler",
                "ipmi_devintf",
                "ipmi_si"
            ]
        );
        assert_eq!(stage_modules("stage2"), WANTED_MODULES);
    }

    #[test]
    fn a_module_that_does_not_load_is_one_line_and_the_rest_still_load() {
        let Some(sh) = find_on_path("sh") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        // A stand-in insmod: records what it loads, refuses ipmi_si as the kernel does
        // when no BMC answers.
        let insmod = bin.join("insmod");
        fs::write(
            &insmod,
            format!(
                "#!{}\ncase \"$1\" in\n  */ipmi_si.ko) echo \"insmod: can't insert '$1': No such device\" >&2; exit 1;;\nesac\necho \"$1\" >> {}/loaded\n",
                sh.display(),
                dir.path().display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&insmod, fs::Permissions::from_mode(0o755)).unwrap();
        let list = dir.path().join("modules");
        fs::write(
            &list,
            "kernel/ipmi_msghandler.ko\nkernel/char/ipmi/ipmi_si.ko\nkernel/ipmi_devintf.ko\n",
        )
        .unwrap();
        let output = Command::new(&sh)
            .arg("-c")
            .arg(format!(
                "module_dir=/mods\nmodule_list={}\n{INSMOD_LOOP}echo end",
                list.display()
            ))
            .env("PATH", &bin)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        assert_eq!(
            String::from_utf8(output.stdout).unwrap(),
            "bearman-init: insmod ipmi_si.ko failed (insmod: can't insert '/mods/kernel/char/ipmi/ipmi_si.ko': No such device); booting on\nend\n"
        );
        assert!(
            output.stderr.is_empty(),
            "insmod's own error is not printed twice"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("loaded")).unwrap(),
            "/mods/kernel/ipmi_msghandler.ko\n/mods/kernel/ipmi_devintf.ko\n"
        );
        assert!(init_script("stage1").contains(INSMOD_LOOP));
    }

    #[test]
    fn library_packages_come_from_depends_lines_only() {
        let text = "ipmitool\n  PreDepends: init-system-helpers\n  Depends: libc6\n  Depends: libfreeipmi17\n |Depends: libreadline8\n  Depends: libssl3:any\n  Depends: <libvirtual>\n  Depends: freeipmi-common\n  Recommends: libsomething\n  Suggests: libother\n";
        assert_eq!(
            library_dependencies(text),
            ["libc6", "libfreeipmi17", "libreadline8", "libssl3"]
        );
    }

    #[test]
    fn symlink_targets_resolve_like_the_kernel_does() {
        assert_eq!(
            join_link(
                "lib64/ld-linux-x86-64.so.2",
                "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
            ),
            "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
        );
        assert_eq!(
            join_link("usr/lib/x86_64-linux-gnu/libfoo.so.1", "libfoo.so.1.2.3"),
            "usr/lib/x86_64-linux-gnu/libfoo.so.1.2.3"
        );
        assert_eq!(join_link("lib/a/b", "../c/./d"), "lib/c/d");
    }

    use crate::elf::tests::tiny_elf;

    const LOADER: &str = "/lib64/ld-linux-x86-64.so.2";

    /// Unpacked stand-ins for ipmitool's packages: the layout Debian bookworm uses (libc6
    /// under /lib with an absolute /lib64 link, libssl3 under /usr/lib, sonames as links
    /// to versioned files).
    fn fake_packages(dir: &Path, with_libgcrypt: bool) -> Vec<(String, PathBuf)> {
        let put = |package: &str, path: &str, bytes: Vec<u8>| {
            let file = dir.join(package).join(path);
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            fs::write(file, bytes).unwrap();
        };
        let link = |package: &str, path: &str, target: &str| {
            let file = dir.join(package).join(path);
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, file).unwrap();
        };
        put(
            "ipmitool",
            "usr/bin/ipmitool",
            tiny_elf(
                Some(LOADER),
                &["libfreeipmi.so.17", "libcrypto.so.3", "libc.so.6"],
                None,
            ),
        );
        put("ipmitool", "usr/sbin/ipmievd", b"not copied".to_vec());
        put(
            "libc6",
            "lib/x86_64-linux-gnu/libc.so.6",
            tiny_elf(None, &["ld-linux-x86-64.so.2"], Some("libc.so.6")),
        );
        put(
            "libc6",
            "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            tiny_elf(None, &[], Some("ld-linux-x86-64.so.2")),
        );
        put(
            "libc6",
            "lib/x86_64-linux-gnu/libm.so.6",
            tiny_elf(None, &["libc.so.6"], None),
        );
        link(
            "libc6",
            "lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        );
        put(
            "libfreeipmi17",
            "usr/lib/x86_64-linux-gnu/libfreeipmi.so.17.2.6",
            tiny_elf(
                None,
                &["libgcrypt.so.20", "libc.so.6"],
                Some("libfreeipmi.so.17"),
            ),
        );
        link(
            "libfreeipmi17",
            "usr/lib/x86_64-linux-gnu/libfreeipmi.so.17",
            "libfreeipmi.so.17.2.6",
        );
        if with_libgcrypt {
            put(
                "libgcrypt20",
                "usr/lib/x86_64-linux-gnu/libgcrypt.so.20",
                tiny_elf(None, &["libc.so.6"], None),
            );
        }
        put(
            "libssl3",
            "usr/lib/x86_64-linux-gnu/libcrypto.so.3",
            tiny_elf(None, &["libc.so.6"], None),
        );
        [
            "ipmitool",
            "libc6",
            "libfreeipmi17",
            "libgcrypt20",
            "libssl3",
        ]
        .iter()
        .map(|package| (package.to_string(), dir.join(package)))
        .collect()
    }

    #[test]
    fn ipmitool_goes_in_with_exactly_the_libraries_it_loads() {
        let dir = tempfile::tempdir().unwrap();
        let payload = ipmitool_payload(&fake_packages(dir.path(), true)).unwrap();
        assert_eq!(
            payload.libraries,
            [
                "ld-linux-x86-64.so.2",
                "libc.so.6",
                "libcrypto.so.3",
                "libfreeipmi.so.17",
                "libgcrypt.so.20"
            ],
            "libm.so.6 is in a package but nothing loads it"
        );
        let entries: Vec<(&str, &CpioEntry)> = payload
            .files
            .entries
            .iter()
            .map(|(path, entry)| (path.as_str(), entry))
            .filter(|(_, entry)| **entry != CpioEntry::Dir)
            .collect();
        let paths: Vec<&str> = entries.iter().map(|(path, _)| *path).collect();
        assert_eq!(
            paths,
            [
                "bin/ipmitool",
                "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "lib/x86_64-linux-gnu/libc.so.6",
                "lib/x86_64-linux-gnu/libcrypto.so.3",
                "lib/x86_64-linux-gnu/libfreeipmi.so.17",
                "lib/x86_64-linux-gnu/libgcrypt.so.20",
                "lib64/ld-linux-x86-64.so.2",
            ]
        );
        assert_eq!(
            payload.files.entries["lib64/ld-linux-x86-64.so.2"],
            CpioEntry::Symlink {
                target: "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".into()
            }
        );
        // The versioned file's bytes, under the soname.
        assert_eq!(
            payload
                .files
                .resolve("lib/x86_64-linux-gnu/libfreeipmi.so.17"),
            Some(
                &fs::read(
                    dir.path()
                        .join("libfreeipmi17/usr/lib/x86_64-linux-gnu/libfreeipmi.so.17.2.6")
                )
                .unwrap()[..]
            )
        );
        let mut archive = Cpio::default();
        archive.extend(&payload.files);
        assert_eq!(
            check_loadable(&archive, IPMITOOL_PATH).unwrap(),
            payload.libraries
        );
    }

    #[test]
    fn a_library_no_package_provides_fails_the_build_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let Err(error) = ipmitool_payload(&fake_packages(dir.path(), false)) else {
            panic!("built without libgcrypt20");
        };
        let text = format!("{error:#}");
        assert!(
            text.contains("libgcrypt.so.20 (needed by libfreeipmi.so.17) is missing"),
            "{text}"
        );
        assert!(
            text.contains("libfreeipmi17"),
            "names the packages looked in: {text}"
        );
    }

    #[test]
    fn the_image_check_finds_a_missing_library_or_loader() {
        let dir = tempfile::tempdir().unwrap();
        let payload = ipmitool_payload(&fake_packages(dir.path(), true)).unwrap();
        let check = |remove: &str| {
            let mut archive = payload.files.clone();
            archive.entries.remove(remove);
            check_loadable(&archive, IPMITOOL_PATH).map_err(|error| format!("{error:#}"))
        };
        let error = check("lib/x86_64-linux-gnu/libgcrypt.so.20").unwrap_err();
        assert!(
            error.contains("libgcrypt.so.20 (needed by libfreeipmi.so.17) is missing"),
            "{error}"
        );
        // The loader's file gone: the /lib64 link dangles, and libc's DT_NEEDED fails too.
        let error = check("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").unwrap_err();
        assert!(
            error.contains("interpreter /lib64/ld-linux-x86-64.so.2 is not in the image"),
            "{error}"
        );
        let error = check("bin/ipmitool").unwrap_err();
        assert!(
            error.contains("/bin/ipmitool is not in the image"),
            "{error}"
        );
        // A library outside the loader's search path does not count.
        let mut archive = payload.files.clone();
        let CpioEntry::File { data, .. } = archive
            .entries
            .remove("lib/x86_64-linux-gnu/libcrypto.so.3")
            .unwrap()
        else {
            panic!("libcrypto is a file");
        };
        archive.file("opt/lib/libcrypto.so.3", 0o755, data);
        let error = check_loadable(&archive, IPMITOOL_PATH).unwrap_err();
        assert!(format!("{error:#}").contains("libcrypto.so.3"), "{error:#}");
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
