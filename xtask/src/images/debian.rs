//! Debian packages: which kernel package the metapackage names, downloading a package's
//! candidate `.deb` (hash-checked against the archive, kept for the next run), unpacking
//! it with `dpkg-deb -x`, and finding the kernel and its modules in the unpacked tree.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};

use super::{output, progress, sha256_file};

/// The metapackage that names the current kernel image package of the release.
pub(super) const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// `linux-image-amd64` is a metapackage; the kernel is in the package it depends on.
pub(super) fn kernel_image_package() -> anyhow::Result<String> {
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

pub(super) struct Deb {
    pub(super) path: PathBuf,
    pub(super) file_name: String,
    pub(super) sha256: String,
}

/// Downloads the candidate version of `package` into `dir`, unless a file with the hash the
/// archive lists is already there: the second run needs no network.
pub(super) fn fetch_deb(package: &str, dir: &Path) -> anyhow::Result<Deb> {
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

pub(super) fn dpkg_extract(deb: &Path, into: &Path) -> anyhow::Result<()> {
    output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into))?;
    Ok(())
}

pub(super) struct Kernel {
    pub(super) version: String,
    pub(super) vmlinuz: PathBuf,
    /// `lib/modules/<version>` in the unpacked package.
    pub(super) modules_dir: PathBuf,
}

pub(super) fn find_kernel(root: &Path, package: &str) -> anyhow::Result<Kernel> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
