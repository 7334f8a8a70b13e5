//! Stage 1's `ipmitool`: the packages that may hold its libraries, the binary with exactly
//! the libraries its `DT_NEEDED` entries name (transitively) and its program interpreter,
//! and the check, run on the finished archive, that the loader would find them all.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};

use super::cpio::{join_link, Cpio, SYMLINK_HOPS_MAX};
use super::{output, read};
use crate::elf;

pub(super) const IPMITOOL_PACKAGE: &str = "ipmitool";
const IPMITOOL_IN_PACKAGE: &str = "usr/bin/ipmitool";
/// On init's PATH (/bin), where the agent looks for it.
pub(super) const IPMITOOL_PATH: &str = "bin/ipmitool";
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

/// `ipmitool` and the packages that may hold the libraries it loads: the `lib*` packages
/// among its `Depends:`, transitively (libc6, libfreeipmi17, libssl3, libreadline8 and
/// theirs). Not the others (freeipmi-common, readline-common: data files ipmitool's
/// `lan print`/`lan set` do not read). Whether they really provide every library is
/// checked against the binaries afterwards.
pub(super) fn ipmitool_packages() -> anyhow::Result<Vec<String>> {
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
pub(super) struct IpmitoolPayload {
    pub(super) files: Cpio,
    /// Sonames, sorted.
    pub(super) libraries: Vec<String>,
}

/// Reads `usr/bin/ipmitool` from the unpacked packages, follows its `DT_NEEDED` entries
/// (transitively) to the library files in those packages, and lays out the binary, each
/// library under /lib/x86_64-linux-gnu by its soname, and the program interpreter at the
/// path ipmitool names (`/lib64/ld-linux-x86-64.so.2`). A library no package provides is
/// an error naming it and what needs it.
pub(super) fn ipmitool_payload(roots: &[(String, PathBuf)]) -> anyhow::Result<IpmitoolPayload> {
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

/// Checks that `program` in the archive can be started by the kernel and the dynamic
/// loader: its interpreter is a file there, and every library it needs, transitively, is a
/// file in a directory the loader searches. Returns the sonames, sorted.
pub(super) fn check_loadable(archive: &Cpio, program: &str) -> anyhow::Result<Vec<String>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::cpio::CpioEntry;

    #[test]
    fn library_packages_come_from_depends_lines_only() {
        let text = "ipmitool\n  PreDepends: init-system-helpers\n  Depends: libc6\n  Depends: libfreeipmi17\n |Depends: libreadline8\n  Depends: libssl3:any\n  Depends: <libvirtual>\n  Depends: freeipmi-common\n  Recommends: libsomething\n  Suggests: libother\n";
        assert_eq!(
            library_dependencies(text),
            ["libc6", "libfreeipmi17", "libreadline8", "libssl3"]
        );
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
}
