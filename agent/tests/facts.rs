//! Hardware facts read from fixture `/sys` and `/proc` trees (fixtures/sysfs/): a 2-socket
//! server and a QEMU VM, every field checked; missing and malformed files give errors
//! naming the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bearman_agent::facts::{self, collect, FactsError};
use bearman_proto::uuid::NodeUuid;
use bearman_proto::{CpuFacts, DiskFacts, FirmwareVersions, NicFacts, RegisterRequest};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/sysfs")
        .join(name)
}

/// A scratch tree for error cases, fresh per test.
fn scratch(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("facts")
        .join(name);
    let _ = std::fs::remove_dir_all(&root);
    for (path, text) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    std::fs::create_dir_all(&root).unwrap();
    root
}

const UUID_FILE: &str = "sys/class/dmi/id/product_uuid";

#[test]
fn a_two_socket_server_is_described_in_full() {
    let facts = collect(&fixture("r640-2s")).unwrap();
    assert_eq!(
        facts.uuid,
        NodeUuid::parse("4c4c4544-0042-3510-8051-b4c04f4e3332").unwrap(),
        "uppercase DMI uuid normalised"
    );
    assert_eq!(
        facts.register,
        RegisterRequest {
            serial: "B4QN32".into(),
            vendor: "Dell Inc.".into(),
            model: "PowerEdge R640".into(),
            cpu: CpuFacts {
                model: "Intel(R) Xeon(R) Silver 4112 CPU @ 2.60GHz".into(),
                sockets: 2,
                cores: 8,
                threads: 16,
            },
            memory_bytes: 197_568_852 * 1024,
            disks: vec![DiskFacts {
                name: "nvme0n1".into(),
                size_bytes: 3_750_748_848 * 512,
                model: "Dell Ent NVMe v2 AGN RI U.2 1.92TB".into(),
            }],
            nics: vec![
                NicFacts {
                    name: "eno1".into(),
                    mac: "b4:96:91:2a:00:10".into(),
                    speed_mbps: Some(25_000),
                    lldp: None,
                },
                NicFacts {
                    name: "eno2".into(),
                    mac: "b4:96:91:2a:00:11".into(),
                    speed_mbps: None,
                    lldp: None,
                },
            ],
            firmware: FirmwareVersions {
                bios: Some("2.19.1".into()),
                bmc: None,
                nics: BTreeMap::new(),
            },
            bmc: None,
        }
    );
}

#[test]
fn a_qemu_vm_is_described_in_full() {
    let facts = collect(&fixture("qemu-vm")).unwrap();
    assert_eq!(facts.uuid.as_str(), "8e1b44a2-6c7d-4f3e-9a0b-5d2c3e4f5a6b");
    assert_eq!(
        facts.register,
        RegisterRequest {
            serial: String::new(),
            vendor: "QEMU".into(),
            model: "Standard PC (Q35 + ICH9, 2009)".into(),
            cpu: CpuFacts {
                model: "QEMU Virtual CPU version 2.5+".into(),
                sockets: 1,
                cores: 2,
                threads: 2,
            },
            memory_bytes: 2_014_464 * 1024,
            disks: vec![DiskFacts {
                name: "vda".into(),
                size_bytes: 41_943_040 * 512,
                model: String::new(),
            }],
            nics: vec![NicFacts {
                name: "enp0s2".into(),
                mac: "52:54:00:12:34:56".into(),
                speed_mbps: None,
                lldp: None,
            }],
            firmware: FirmwareVersions {
                bios: Some("1.16.2-debian-1.16.2-1".into()),
                bmc: None,
                nics: BTreeMap::new(),
            },
            bmc: None,
        }
    );
}

#[test]
fn the_same_tree_gives_the_same_facts() {
    let root = fixture("r640-2s");
    assert_eq!(collect(&root).unwrap(), collect(&root).unwrap());
}

#[test]
fn a_missing_uuid_is_an_error_naming_the_file() {
    let root = scratch("no-uuid", &[("sys/class/dmi/id/sys_vendor", "QEMU\n")]);
    let error = collect(&root).unwrap_err();
    assert!(matches!(error, FactsError::Missing { .. }), "{error}");
    assert!(error.to_string().contains(UUID_FILE), "{error}");
}

#[test]
fn a_malformed_uuid_is_an_error_naming_the_file() {
    let root = scratch("bad-uuid", &[(UUID_FILE, "Not Settable\n")]);
    let error = collect(&root).unwrap_err().to_string();
    assert!(error.contains(UUID_FILE), "{error}");
    assert!(error.contains("Not Settable"), "{error}");
}

#[test]
fn only_the_uuid_is_required() {
    let root = scratch(
        "uuid-only",
        &[(UUID_FILE, "8E1B44A2-6C7D-4F3E-9A0B-5D2C3E4F5A6B\n")],
    );
    let facts = collect(&root).unwrap();
    assert_eq!(facts.uuid.as_str(), "8e1b44a2-6c7d-4f3e-9a0b-5d2c3e4f5a6b");
    assert_eq!(facts.register, RegisterRequest::default());
}

#[test]
fn malformed_numbers_are_errors_naming_the_file() {
    let uuid = (UUID_FILE, "8e1b44a2-6c7d-4f3e-9a0b-5d2c3e4f5a6b\n");
    let root = scratch(
        "bad-meminfo",
        &[uuid, ("proc/meminfo", "MemTotal: lots kB\n")],
    );
    let error = collect(&root).unwrap_err().to_string();
    assert!(
        error.contains("proc/meminfo") && error.contains("lots"),
        "{error}"
    );

    let root = scratch("bad-size", &[uuid, ("sys/block/sda/size", "big\n")]);
    let error = collect(&root).unwrap_err().to_string();
    assert!(
        error.contains("sys/block/sda/size") && error.contains("big"),
        "{error}"
    );
}

#[test]
fn cpuinfo_without_topology_counts_processors_as_cores() {
    let cpu = facts::parse_cpuinfo(
        "processor\t: 0\nmodel name\t: ARMv8 Processor\n\nprocessor\t: 1\nmodel name\t: ARMv8 Processor\n",
    );
    assert_eq!(
        cpu,
        CpuFacts {
            model: "ARMv8 Processor".into(),
            sockets: 1,
            cores: 2,
            threads: 2
        }
    );
    assert_eq!(facts::parse_cpuinfo(""), CpuFacts::default());
}

#[test]
fn meminfo_units_are_checked() {
    assert_eq!(facts::parse_meminfo("MemTotal:  4 kB\n"), Ok(4096));
    assert!(facts::parse_meminfo("MemFree: 4 kB\n")
        .unwrap_err()
        .contains("no MemTotal"));
    assert!(facts::parse_meminfo("MemTotal: 4 MB\n")
        .unwrap_err()
        .contains("expected kB"));
    assert!(facts::parse_meminfo("MemTotal: 18446744073709551615 kB\n")
        .unwrap_err()
        .contains("overflows"));
}
