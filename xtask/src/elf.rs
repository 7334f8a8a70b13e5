//! Just enough ELF (64-bit little-endian, i.e. amd64) to put a dynamically linked program
//! into an initramfs: its program interpreter (`PT_INTERP`) and the shared libraries it
//! names (`DT_NEEDED`), and the transitive closure of those libraries.
//!
//! Read straight from the bytes, so the image build needs no binutils and a unit test can
//! feed it a hand-made ELF. Malformed input is an error, never a panic or a hang: every
//! offset is checked and every loop is bounded.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_SONAME: u64 = 14;
/// Size of one program header and one dynamic entry in ELF64.
const PHDR_SIZE: usize = 56;
const DYN_SIZE: usize = 16;
/// Bounds on untrusted counts: real binaries have a dozen program headers and a few dozen
/// dynamic entries.
const DYN_ENTRIES_MAX: usize = 4096;
const NAME_CHARS_MAX: usize = 4096;
/// Bound on a program's library closure (ipmitool needs nine).
pub const LIBRARIES_MAX: usize = 64;

/// What the dynamic loader needs to start a program or load a library.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    /// `PT_INTERP`: the loader's path, e.g. `/lib64/ld-linux-x86-64.so.2`; `None` for a
    /// static program or a library.
    pub interpreter: Option<String>,
    /// `DT_NEEDED`, in file order.
    pub needed: Vec<String>,
    /// `DT_SONAME`, for a library.
    pub soname: Option<String>,
}

fn bytes_at(binary: &[u8], at: usize, len: usize) -> anyhow::Result<&[u8]> {
    at.checked_add(len)
        .and_then(|end| binary.get(at..end))
        .with_context(|| format!("ELF truncated: {len} bytes at offset {at:#x} are past its end"))
}

fn u16_at(binary: &[u8], at: usize) -> anyhow::Result<u16> {
    let bytes = bytes_at(binary, at, 2)?;
    Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn u32_at(binary: &[u8], at: usize) -> anyhow::Result<u32> {
    let bytes = bytes_at(binary, at, 4)?;
    Ok(u32::from_le_bytes(bytes.try_into()?))
}

fn u64_at(binary: &[u8], at: usize) -> anyhow::Result<u64> {
    let bytes = bytes_at(binary, at, 8)?;
    Ok(u64::from_le_bytes(bytes.try_into()?))
}

/// `base + offset`, an error instead of an overflow for a hostile header.
fn add(base: usize, offset: usize) -> anyhow::Result<usize> {
    base.checked_add(offset)
        .with_context(|| format!("ELF offset {base:#x} + {offset:#x} overflows"))
}

fn usize_at(binary: &[u8], at: usize) -> anyhow::Result<usize> {
    let value = u64_at(binary, at)?;
    usize::try_from(value).with_context(|| format!("ELF value {value:#x} does not fit in usize"))
}

/// The NUL-terminated string at `at`.
fn c_string(binary: &[u8], at: usize) -> anyhow::Result<String> {
    let rest = binary
        .get(at..)
        .with_context(|| format!("ELF string at {at:#x} is past the end"))?;
    let len = rest
        .iter()
        .take(NAME_CHARS_MAX)
        .position(|&byte| byte == 0)
        .with_context(|| format!("ELF string at {at:#x} is not NUL-terminated"))?;
    String::from_utf8(rest[..len].to_vec()).with_context(|| format!("ELF string at {at:#x}"))
}

struct Segment {
    kind: u32,
    offset: usize,
    vaddr: usize,
    filesz: usize,
}

/// Reads the interpreter, `DT_NEEDED` and `DT_SONAME` of a 64-bit little-endian ELF file.
/// A static executable gives an empty [`Dynamic`]; anything that is not ELF64 LE is an
/// error.
pub fn dynamic(binary: &[u8]) -> anyhow::Result<Dynamic> {
    ensure!(
        binary.get(..6) == Some(b"\x7fELF\x02\x01"),
        "not a 64-bit little-endian ELF file"
    );
    let phoff = usize_at(binary, 0x20)?;
    let phentsize = usize::from(u16_at(binary, 0x36)?);
    let phnum = usize::from(u16_at(binary, 0x38)?);
    ensure!(
        phnum == 0 || phentsize >= PHDR_SIZE,
        "ELF program header size {phentsize} is below {PHDR_SIZE}"
    );
    let mut segments = Vec::with_capacity(phnum);
    for index in 0..phnum {
        let base = index
            .checked_mul(phentsize)
            .and_then(|offset| offset.checked_add(phoff))
            .context("ELF program header offset overflows")?;
        segments.push(Segment {
            kind: u32_at(binary, base)?,
            offset: usize_at(binary, add(base, 8)?)?,
            vaddr: usize_at(binary, add(base, 16)?)?,
            filesz: usize_at(binary, add(base, 32)?)?,
        });
    }
    let mut result = Dynamic::default();
    if let Some(interp) = segments.iter().find(|segment| segment.kind == PT_INTERP) {
        let bytes = bytes_at(binary, interp.offset, interp.filesz)?;
        let text = bytes.split(|&byte| byte == 0).next().unwrap_or_default();
        result.interpreter =
            Some(String::from_utf8(text.to_vec()).context("ELF interpreter path is not UTF-8")?);
    }
    let Some(dynamic) = segments.iter().find(|segment| segment.kind == PT_DYNAMIC) else {
        return Ok(result);
    };
    let entries = (dynamic.filesz / DYN_SIZE).min(DYN_ENTRIES_MAX);
    let (mut strtab, mut needed, mut soname) = (None, Vec::new(), None);
    for index in 0..entries {
        let at = add(dynamic.offset, index * DYN_SIZE)?;
        let (tag, value) = (u64_at(binary, at)?, usize_at(binary, add(at, 8)?)?);
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed.push(value),
            DT_SONAME => soname = Some(value),
            DT_STRTAB => strtab = Some(value),
            _ => {}
        }
    }
    if needed.is_empty() && soname.is_none() {
        return Ok(result);
    }
    let strtab = strtab.context("ELF has DT_NEEDED or DT_SONAME but no DT_STRTAB")?;
    // DT_STRTAB is an address: find the loaded segment holding it to get a file offset.
    let strtab_offset = segments
        .iter()
        .filter(|segment| segment.kind == PT_LOAD)
        .find(|segment| strtab >= segment.vaddr && strtab - segment.vaddr < segment.filesz.max(1))
        .with_context(|| format!("ELF DT_STRTAB {strtab:#x} is in no PT_LOAD segment"))
        .and_then(|segment| add(strtab - segment.vaddr, segment.offset))?;
    let string = |offset: usize| add(strtab_offset, offset).and_then(|at| c_string(binary, at));
    result.needed = needed
        .into_iter()
        .map(string)
        .collect::<anyhow::Result<_>>()?;
    result.soname = soname.map(string).transpose()?;
    Ok(result)
}

/// Every library `program` needs, directly or through another library, by soname, with
/// its bytes. `find` looks a soname up (`None`: not there); the first library missing is
/// an error naming what needed it.
pub fn needed_closure(
    program_name: &str,
    program: &Dynamic,
    mut find: impl FnMut(&str) -> anyhow::Result<Option<Vec<u8>>>,
) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut found: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut queue: Vec<(String, String)> = program
        .needed
        .iter()
        .rev()
        .map(|soname| (soname.clone(), program_name.to_string()))
        .collect();
    while let Some((soname, needed_by)) = queue.pop() {
        if found.contains_key(&soname) {
            continue;
        }
        ensure!(
            found.len() < LIBRARIES_MAX,
            "{program_name} needs more than {LIBRARIES_MAX} libraries"
        );
        let Some(bytes) = find(&soname)? else {
            bail!("{soname} (needed by {needed_by}) is missing");
        };
        let library = dynamic(&bytes).with_context(|| format!("reading {soname}"))?;
        for next in library.needed.iter().rev() {
            if !found.contains_key(next) {
                queue.push((next.clone(), soname.clone()));
            }
        }
        found.insert(soname, bytes);
    }
    Ok(found)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A minimal ELF64 LE with one PT_LOAD covering the file, an optional PT_INTERP and a
    /// PT_DYNAMIC holding DT_NEEDED/DT_SONAME entries and a DT_STRTAB. Loaded at 0x400000,
    /// as a real executable would be, so the strtab lookup has to translate the address.
    pub fn tiny_elf(interpreter: Option<&str>, needed: &[&str], soname: Option<&str>) -> Vec<u8> {
        const BASE: u64 = 0x40_0000;
        let phnum = 2 + u16::from(interpreter.is_some());
        let mut strtab = vec![0u8];
        let mut add = |name: &str| {
            let at = strtab.len() as u64;
            strtab.extend_from_slice(name.as_bytes());
            strtab.push(0);
            at
        };
        let mut dyn_entries: Vec<(u64, u64)> = needed.iter().map(|n| (DT_NEEDED, add(n))).collect();
        if let Some(soname) = soname {
            dyn_entries.push((DT_SONAME, add(soname)));
        }
        let interp_bytes: Vec<u8> = interpreter
            .map(|path| [path.as_bytes(), b"\0"].concat())
            .unwrap_or_default();
        let interp_off = 64 + usize::from(phnum) * PHDR_SIZE;
        let strtab_off = interp_off + interp_bytes.len();
        let dyn_off = (strtab_off + strtab.len()).div_ceil(8) * 8;
        dyn_entries.push((DT_STRTAB, BASE + strtab_off as u64));
        dyn_entries.push((DT_NULL, 0));
        let total = dyn_off + dyn_entries.len() * DYN_SIZE;

        let mut out = vec![0u8; total];
        out[..6].copy_from_slice(b"\x7fELF\x02\x01");
        out[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        out[0x36..0x38].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
        let mut phdr = |index: usize, kind: u32, offset: usize, size: usize| {
            let at = 64 + index * PHDR_SIZE;
            out[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            out[at + 8..at + 16].copy_from_slice(&(offset as u64).to_le_bytes());
            out[at + 16..at + 24].copy_from_slice(&(BASE + offset as u64).to_le_bytes());
            out[at + 32..at + 40].copy_from_slice(&(size as u64).to_le_bytes());
        };
        phdr(0, PT_LOAD, 0, total);
        phdr(1, PT_DYNAMIC, dyn_off, dyn_entries.len() * DYN_SIZE);
        if interpreter.is_some() {
            phdr(2, PT_INTERP, interp_off, interp_bytes.len());
        }
        out[interp_off..strtab_off].copy_from_slice(&interp_bytes);
        out[strtab_off..strtab_off + strtab.len()].copy_from_slice(&strtab);
        for (index, (tag, value)) in dyn_entries.iter().enumerate() {
            let at = dyn_off + index * DYN_SIZE;
            out[at..at + 8].copy_from_slice(&tag.to_le_bytes());
            out[at + 8..at + 16].copy_from_slice(&value.to_le_bytes());
        }
        out
    }

    #[test]
    fn interpreter_needed_and_soname_are_read() {
        let program = tiny_elf(
            Some("/lib64/ld-linux-x86-64.so.2"),
            &["libfreeipmi.so.17", "libc.so.6"],
            None,
        );
        assert_eq!(
            dynamic(&program).unwrap(),
            Dynamic {
                interpreter: Some("/lib64/ld-linux-x86-64.so.2".into()),
                needed: vec!["libfreeipmi.so.17".into(), "libc.so.6".into()],
                soname: None,
            }
        );
        let library = tiny_elf(None, &["libc.so.6"], Some("libm.so.6"));
        let parsed = dynamic(&library).unwrap();
        assert_eq!(parsed.interpreter, None);
        assert_eq!(parsed.soname.as_deref(), Some("libm.so.6"));
    }

    #[test]
    fn static_and_foreign_files_are_told_apart() {
        let mut static_program = tiny_elf(None, &[], None);
        // No PT_DYNAMIC: turn it into a PT_NULL header, as in a static executable.
        static_program[64 + PHDR_SIZE..64 + PHDR_SIZE + 4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(dynamic(&static_program).unwrap(), Dynamic::default());
        let error = dynamic(b"#!/bin/sh\n").unwrap_err();
        assert!(error.to_string().contains("not a 64-bit"), "{error}");
    }

    #[test]
    fn truncated_elf_is_an_error_not_a_panic() {
        let program = tiny_elf(Some("/lib64/ld.so"), &["libc.so.6"], None);
        for len in [7, 0x30, 64 + PHDR_SIZE, program.len() - 20] {
            assert!(dynamic(&program[..len]).is_err(), "cut at {len}");
        }
    }

    #[test]
    fn closure_follows_libraries_once_and_names_what_is_missing() {
        let libraries: BTreeMap<&str, Vec<u8>> = [
            (
                "liba.so.1",
                tiny_elf(None, &["libb.so.2", "libc.so.6"], None),
            ),
            (
                "libb.so.2",
                tiny_elf(None, &["liba.so.1", "libc.so.6"], None),
            ),
            ("libc.so.6", tiny_elf(None, &["ld-linux-x86-64.so.2"], None)),
            ("ld-linux-x86-64.so.2", tiny_elf(None, &[], None)),
        ]
        .into_iter()
        .collect();
        let program = dynamic(&tiny_elf(Some("/lib64/ld"), &["liba.so.1"], None)).unwrap();
        let find = |soname: &str| Ok(libraries.get(soname).cloned());
        let closure = needed_closure("prog", &program, find).unwrap();
        assert_eq!(
            closure.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "ld-linux-x86-64.so.2",
                "liba.so.1",
                "libb.so.2",
                "libc.so.6"
            ],
            "a cycle (liba ↔ libb) is followed once"
        );
        let without_libc = |soname: &str| {
            Ok((soname != "libc.so.6")
                .then(|| libraries.get(soname).cloned())
                .flatten())
        };
        let error = needed_closure("prog", &program, without_libc).unwrap_err();
        assert_eq!(
            error.to_string(),
            "libc.so.6 (needed by libb.so.2) is missing"
        );
    }

    #[test]
    fn agrees_with_readelf_on_this_test_binary_when_installed() {
        let Some(readelf) = crate::process::find_on_path("readelf") else {
            return;
        };
        let exe = std::env::current_exe().unwrap();
        let parsed = dynamic(&std::fs::read(&exe).unwrap()).unwrap();
        let text = std::process::Command::new(readelf)
            .args(["-d", "-l", "-W"])
            .arg(&exe)
            .output()
            .unwrap();
        let text = String::from_utf8(text.stdout).unwrap();
        let needed: Vec<String> = text
            .lines()
            .filter(|line| line.contains("(NEEDED)"))
            .filter_map(|line| Some(line.split_once('[')?.1.split_once(']')?.0.to_string()))
            .collect();
        assert!(!needed.is_empty(), "the test binary links libc dynamically");
        assert_eq!(parsed.needed, needed);
        let interpreter = text
            .lines()
            .find_map(|line| {
                line.split_once("program interpreter: ")?
                    .1
                    .strip_suffix(']')
            })
            .map(str::to_string);
        assert_eq!(parsed.interpreter, interpreter);
    }
}
