//! Kernel modules: which a stage loads, their dependencies (from modules.dep, or each
//! module's `.modinfo` when the package ships none) resolved into insmod order, and their
//! files and load list put into the archive.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use anyhow::{bail, ensure, Context};

use super::cpio::Cpio;
use super::debian::Kernel;
use super::read;

/// NIC drivers (with their dependencies) for the QEMU smoke boots: q35's default NIC is
/// e1000e, `-nic model=e1000` and virtio-net are the other usual choices, and virtio_pci is
/// the bus driver virtio-net needs, a module in Debian's kernel.
const WANTED_MODULES: &[&str] = &["e1000", "e1000e", "virtio_pci", "virtio_net"];
/// Stage 1's in-band IPMI stack, in load order: the message handler, the `/dev/ipmi0`
/// character device, and the system-interface driver that probes (ACPI, SMBIOS, PCI) for a
/// KCS/SMIC/BT interface. `ipmi_si` finds nothing on a machine without a BMC and its insmod
/// fails: the init script prints one line and boots on.
const IPMI_MODULES: &[&str] = &["ipmi_msghandler", "ipmi_devintf", "ipmi_si"];
/// Where the init script reads the modules to load, in load order.
pub(super) const MODULE_LIST_PATH: &str = "etc/bearman/modules";

/// The kernel modules a stage's init loads: the NIC drivers, and in stage 1 the IPMI stack.
pub(super) fn stage_modules(stage: &str) -> Vec<&'static str> {
    let mut modules = WANTED_MODULES.to_vec();
    if stage == "stage1" {
        modules.extend_from_slice(IPMI_MODULES);
    }
    modules
}

/// Puts `modules` under lib/modules/<version> and their paths, in load order, in the list
/// the init script reads.
pub(super) fn add_modules(
    archive: &mut Cpio,
    kernel: &Kernel,
    modules: &[Module],
) -> anyhow::Result<()> {
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Module {
    pub(super) name: String,
    /// Relative to `lib/modules/<version>`, e.g. `kernel/drivers/net/virtio_net.ko`.
    pub(super) relative_path: String,
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
pub(super) fn resolve_kernel_modules(
    kernel: &Kernel,
    wanted: &[&str],
) -> anyhow::Result<Vec<Module>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
