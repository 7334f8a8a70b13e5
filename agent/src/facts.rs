//! Hardware facts for registration, read from a `/sys` and `/proc` tree under a root
//! directory: `/` on a real machine, a fixture tree in tests.
//!
//! Architecture invariant: plain file reads and text parsing, nothing else: no commands,
//! no sockets, no clock. Directory listings are sorted, so the same tree always gives the
//! same facts in the same order.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use bearman_proto::uuid::{InvalidUuid, NodeUuid};
use bearman_proto::{CpuFacts, DiskFacts, FirmwareVersions, NicFacts, RegisterRequest};

/// Longest sysfs/procfs file read; `/proc/cpuinfo` of a 512-thread machine is well under it.
const FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Entries read from one directory (`sys/block`, `sys/class/net`).
const DIR_ENTRIES_MAX: usize = 4096;
/// Block devices that are not disks.
const DISK_PREFIXES_SKIPPED: [&str; 4] = ["loop", "ram", "zram", "dm-"];

/// What the agent learnt about the machine: its identity and its registration body.
#[derive(Clone, Debug, PartialEq)]
pub struct Facts {
    pub uuid: NodeUuid,
    pub register: RegisterRequest,
}

#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error("{path}: missing (the machine's identity is read from it)")]
    Missing { path: PathBuf },
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: larger than {FILE_BYTES_MAX} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: {source}")]
    Uuid { path: PathBuf, source: InvalidUuid },
    #[error("{path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("{path}: more than {DIR_ENTRIES_MAX} entries")]
    TooManyEntries { path: PathBuf },
}

/// Reads every fact under `root` (`/` in production). Only `product_uuid` is required;
/// other missing files leave their fact empty.
pub fn collect(root: &Path) -> Result<Facts, FactsError> {
    let dmi = root.join("sys/class/dmi/id");
    let uuid_path = dmi.join("product_uuid");
    let uuid_text = read_optional(&uuid_path)?.ok_or_else(|| FactsError::Missing {
        path: uuid_path.clone(),
    })?;
    let uuid = NodeUuid::parse(uuid_text.trim()).map_err(|source| FactsError::Uuid {
        path: uuid_path,
        source,
    })?;
    let dmi_field = |name: &str| -> Result<Option<String>, FactsError> {
        Ok(read_optional(&dmi.join(name))?
            .map(|text| text.trim().to_string())
            .filter(|text| !text.is_empty()))
    };

    let cpuinfo = root.join("proc/cpuinfo");
    let cpu = read_optional(&cpuinfo)?
        .map(|text| parse_cpuinfo(&text))
        .unwrap_or_default();
    let meminfo = root.join("proc/meminfo");
    let memory_bytes = match read_optional(&meminfo)? {
        Some(text) => parse_meminfo(&text).map_err(|detail| FactsError::Parse {
            path: meminfo,
            detail,
        })?,
        None => 0,
    };

    let register = RegisterRequest {
        serial: dmi_field("product_serial")?.unwrap_or_default(),
        vendor: dmi_field("sys_vendor")?.unwrap_or_default(),
        model: dmi_field("product_name")?.unwrap_or_default(),
        cpu,
        memory_bytes,
        disks: disks(&root.join("sys/block"))?,
        nics: nics(&root.join("sys/class/net"))?,
        firmware: FirmwareVersions {
            bios: dmi_field("bios_version")?,
            ..FirmwareVersions::default()
        },
        bmc: None,
    };
    Ok(Facts { uuid, register })
}

/// CPU facts from `/proc/cpuinfo` text: the first `model name`; sockets are the distinct
/// `physical id`s, cores the distinct (`physical id`, `core id`) pairs, threads the
/// `processor` entries. Without topology lines (some VMs) each processor counts as a core
/// on one socket.
pub fn parse_cpuinfo(text: &str) -> CpuFacts {
    let mut model = String::new();
    let mut threads: u32 = 0;
    let mut sockets = BTreeSet::new();
    let mut cores = BTreeSet::new();
    // Topology of the processor block being read.
    let mut physical: Option<&str> = None;
    let mut core: Option<&str> = None;
    let mut finish = |physical: &mut Option<&str>, core: &mut Option<&str>| {
        if let Some(socket) = physical.take() {
            sockets.insert(socket.to_string());
            if let Some(core) = core.take() {
                cores.insert((socket.to_string(), core.to_string()));
            }
        }
        *core = None;
    };
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => {
                finish(&mut physical, &mut core);
                threads = threads.saturating_add(1);
            }
            "model name" if model.is_empty() => model = value.to_string(),
            "physical id" => physical = Some(value),
            "core id" => core = Some(value),
            _ => {}
        }
    }
    finish(&mut physical, &mut core);
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let (sockets, cores) = if sockets.is_empty() {
        (u32::from(threads > 0), threads)
    } else if cores.is_empty() {
        (count(sockets.len()), threads)
    } else {
        (count(sockets.len()), count(cores.len()))
    };
    CpuFacts {
        model,
        sockets,
        cores,
        threads,
    }
}

/// `MemTotal` from `/proc/meminfo` text, in bytes (the file says kB, meaning KiB).
pub fn parse_meminfo(text: &str) -> Result<u64, String> {
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .ok_or("no MemTotal line")?;
    let mut words = line.split_whitespace();
    let value = words.next().ok_or("MemTotal has no value")?;
    let unit = words.next();
    if unit != Some("kB") {
        return Err(format!("MemTotal unit {unit:?}, expected kB"));
    }
    let kib: u64 = value
        .parse()
        .map_err(|_| format!("MemTotal {value:?} is not a number"))?;
    kib.checked_mul(1024)
        .ok_or_else(|| format!("MemTotal {kib} kB overflows"))
}

/// Disks under `sys/block`: size from `size` (512-byte sectors whatever the device's own
/// sector size), model from `device/model`.
fn disks(block: &Path) -> Result<Vec<DiskFacts>, FactsError> {
    let mut disks = Vec::new();
    for (name, dir) in entries(block)? {
        if DISK_PREFIXES_SKIPPED
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            continue;
        }
        let size_path = dir.join("size");
        let size_bytes = match read_optional(&size_path)? {
            Some(text) => {
                let sectors: u64 = text.trim().parse().map_err(|_| FactsError::Parse {
                    path: size_path.clone(),
                    detail: format!("size {:?} is not a number", text.trim()),
                })?;
                sectors.checked_mul(512).ok_or_else(|| FactsError::Parse {
                    path: size_path,
                    detail: format!("size {sectors} sectors overflows"),
                })?
            }
            None => 0,
        };
        let model = read_optional(&dir.join("device/model"))?
            .map(|text| text.trim().to_string())
            .unwrap_or_default();
        disks.push(DiskFacts {
            name,
            size_bytes,
            model,
        });
    }
    Ok(disks)
}

/// Physical NICs under `sys/class/net`: `lo` and virtual interfaces (no `device`) are
/// skipped; speed only when the link reports a positive one (a down link reads -1 or
/// fails to read).
fn nics(net: &Path) -> Result<Vec<NicFacts>, FactsError> {
    let mut nics = Vec::new();
    for (name, dir) in entries(net)? {
        if name == "lo" || !dir.join("device").exists() {
            continue;
        }
        let address_path = dir.join("address");
        let Some(mac) = read_optional(&address_path)? else {
            continue;
        };
        let speed_mbps = match std::fs::read_to_string(dir.join("speed")) {
            Ok(text) => text
                .trim()
                .parse::<i64>()
                .ok()
                .and_then(|speed| u32::try_from(speed).ok().filter(|speed| *speed > 0)),
            // The kernel answers EINVAL when the link is down: no speed, not an error.
            Err(_) => None,
        };
        nics.push(NicFacts {
            name,
            mac: mac.trim().to_ascii_lowercase(),
            speed_mbps,
            lldp: None,
        });
    }
    Ok(nics)
}

/// A directory's entries, sorted by name; a missing directory has none.
fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, FactsError> {
    let read_error = |source| FactsError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let listing = match std::fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(read_error(error)),
    };
    let mut entries = Vec::new();
    for entry in listing {
        let entry = entry.map_err(read_error)?;
        if entries.len() == DIR_ENTRIES_MAX {
            return Err(FactsError::TooManyEntries {
                path: dir.to_path_buf(),
            });
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        entries.push((name, entry.path()));
    }
    entries.sort();
    Ok(entries)
}

/// A file's text, or `None` when it does not exist; bounded in size.
fn read_optional(path: &Path) -> Result<Option<String>, FactsError> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FactsError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| FactsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > FILE_BYTES_MAX {
        return Err(FactsError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}
