//! The initramfs writer: a reproducible cpio (newc) archive built in memory (fixed owners,
//! modes and mtimes, entries in path order), symlinks resolved inside it as the booted
//! system would, and the `gzip -n` that compresses it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context};

/// Bound on symlinks followed to reach a file.
pub(super) const SYMLINK_HOPS_MAX: usize = 16;

/// Where a symlink at `link` (a root-relative path) pointing at `target` leads, as a
/// root-relative path with `.` and `..` resolved.
pub(super) fn join_link(link: &str, target: &str) -> String {
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

pub(super) fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
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

/// An initramfs being assembled: entries by path, written in path order (a parent's path
/// sorts before its children's) with uid, gid and mtime 0, so equal inputs give equal bytes.
#[derive(Clone, Default)]
pub(super) struct Cpio {
    pub(super) entries: BTreeMap<String, CpioEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum CpioEntry {
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
    pub(super) fn len(&self) -> usize {
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
    pub(super) fn extend(&mut self, other: &Cpio) -> &mut Cpio {
        for (path, entry) in &other.entries {
            self.insert(path, entry.clone());
        }
        self
    }

    /// The data of the file at `path`, following symlinks as the booted system would (an
    /// absolute target from the root, a relative one from the link's directory); `None`
    /// when it leads nowhere or to something that is not a file.
    pub(super) fn resolve(&self, path: &str) -> Option<&[u8]> {
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

    pub(super) fn dir(&mut self, path: &str) -> &mut Cpio {
        self.insert(path, CpioEntry::Dir)
    }

    pub(super) fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> &mut Cpio {
        self.insert(path, CpioEntry::File { mode, data })
    }

    pub(super) fn symlink(&mut self, path: &str, target: &str) -> &mut Cpio {
        self.insert(
            path,
            CpioEntry::Symlink {
                target: target.to_string(),
            },
        )
    }

    pub(super) fn char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> &mut Cpio {
        self.insert(path, CpioEntry::CharDevice { mode, major, minor })
    }

    /// The archive in the "newc" format the kernel unpacks: per entry a 110-byte ASCII
    /// header, the NUL-terminated name and the data, each padded to 4 bytes.
    pub(super) fn to_bytes(&self) -> Vec<u8> {
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
    use crate::process::find_on_path;

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
}
