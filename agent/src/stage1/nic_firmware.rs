//! NIC firmware versions on a real machine, as `ethtool -i` shows them
//! (`firmware-version`): the `SIOCETHTOOL` ioctl's `ETHTOOL_GDRVINFO` command on an
//! `AF_INET` datagram socket fills a `struct ethtool_drvinfo`. No ethtool binary in the
//! stage-1 image, and no privileges needed.
//!
//! Never fatal: a NIC whose driver does not answer (`lo`, most virtual NICs) or answers
//! with no version is registered without one.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `ETHTOOL_GDRVINFO` from `linux/ethtool.h`: get driver info.
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
/// Interface names are at most this long (`IFNAMSIZ` less the NUL).
const IFNAME_BYTES_MAX: usize = libc::IFNAMSIZ - 1;

/// `struct ethtool_drvinfo` from `linux/ethtool.h` (196 bytes); the string fields are
/// NUL-terminated unless full.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// What a NIC's driver says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// The driver's name (`ixgbe`, `mlx5_core`, `virtio_net`).
    pub driver: Option<String>,
    /// The firmware version, `None` when the driver gives none or `N/A`.
    pub firmware: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NicFirmwareError {
    #[error("{nic:?} is not an interface name")]
    BadName { nic: String },
    #[error("no such interface {nic}")]
    NoSuchInterface { nic: String },
    #[error("the driver of {nic} does not answer ETHTOOL_GDRVINFO")]
    Unsupported { nic: String },
    #[error("opening a socket for ethtool: {0}")]
    Socket(io::Error),
    #[error("ETHTOOL_GDRVINFO on {nic}: {source}")]
    Ioctl { nic: String, source: io::Error },
}

/// The firmware version of `nic`'s driver, as `ethtool -i` prints it; `None` when there
/// is none to register, whatever the reason.
pub fn firmware_version(nic: &str) -> Option<String> {
    driver_info(nic).ok().and_then(|info| info.firmware)
}

/// Asks `nic`'s driver for its driver info (`ethtool -i`).
pub fn driver_info(nic: &str) -> Result<DriverInfo, NicFirmwareError> {
    if nic.is_empty() || nic.len() > IFNAME_BYTES_MAX || nic.contains('\0') {
        return Err(NicFirmwareError::BadName {
            nic: nic.to_string(),
        });
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(NicFirmwareError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };

    // SAFETY: both are plain data; all-zero is a valid value of each.
    let mut info: EthtoolDrvinfo = unsafe { mem::zeroed() };
    let mut request: libc::ifreq = unsafe { mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    for (slot, byte) in request.ifr_name.iter_mut().zip(nic.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: SIOCETHTOOL reads the name and the data pointer of `request` and writes at
    // most `size_of::<EthtoolDrvinfo>()` bytes through the pointer, to `info`, which
    // outlives the call.
    let result = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) };
    if result < 0 {
        let source = io::Error::last_os_error();
        let nic = nic.to_string();
        return Err(match source.raw_os_error() {
            Some(libc::ENODEV) => NicFirmwareError::NoSuchInterface { nic },
            Some(libc::EOPNOTSUPP) => NicFirmwareError::Unsupported { nic },
            _ => NicFirmwareError::Ioctl { nic, source },
        });
    }
    Ok(DriverInfo {
        driver: c_string_field(&info.driver),
        firmware: version_field(&info.fw_version),
    })
}

/// A fixed-size C string field: the bytes before the first NUL (all of them when the
/// field is full), lossily decoded, trimmed; `None` when that leaves nothing.
pub fn c_string_field(field: &[u8]) -> Option<String> {
    let end = field
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(field.len());
    let text = String::from_utf8_lossy(&field[..end]);
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// A version field: as [`c_string_field`], and `N/A` (what several drivers write when
/// they have no version) is no version either.
pub fn version_field(field: &[u8]) -> Option<String> {
    c_string_field(field).filter(|text| !text.eq_ignore_ascii_case("n/a"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(text: &[u8]) -> [u8; 32] {
        let mut field = [0u8; 32];
        field[..text.len()].copy_from_slice(text);
        field
    }

    #[test]
    fn the_struct_is_the_kernels_size() {
        assert_eq!(mem::size_of::<EthtoolDrvinfo>(), 196);
    }

    #[test]
    fn c_string_fields_end_at_the_first_nul_or_the_field() {
        for (bytes, expect) in [
            (field(b"22.31.6"), Some("22.31.6")),
            (
                field(b"14.32.1010 (MT_0000000080)"),
                Some("14.32.1010 (MT_0000000080)"),
            ),
            (field(b"1.2\0garbage after the nul"), Some("1.2")),
            (field(b"  0x8000d6f4  "), Some("0x8000d6f4")),
            (field(b""), None),
            (field(b"   "), None),
            ([b'7'; 32], Some("77777777777777777777777777777777")),
        ] {
            assert_eq!(c_string_field(&bytes).as_deref(), expect, "{bytes:?}");
        }
        assert_eq!(
            c_string_field(&field(b"caf\xe9")).as_deref(),
            Some("caf\u{fffd}")
        );
    }

    #[test]
    fn missing_versions_are_none() {
        assert_eq!(version_field(&field(b"N/A")), None);
        assert_eq!(version_field(&field(b"n/a")), None);
        assert_eq!(version_field(&field(b"")), None);
        assert_eq!(version_field(&field(b"5.10")).as_deref(), Some("5.10"));
    }

    #[test]
    fn the_kernel_answers_for_real_interfaces_and_refuses_loopback_or_unknown_names() {
        // `lo` has no driver to ask: EOPNOTSUPP on the kernels we run on; should a kernel
        // answer, it still gives no firmware.
        match driver_info("lo") {
            Err(NicFirmwareError::Unsupported { .. }) => {}
            Ok(info) => assert_eq!(info.firmware, None, "{info:?}"),
            Err(error) => panic!("lo: {error}"),
        }
        assert_eq!(firmware_version("lo"), None);
        assert!(matches!(
            driver_info("bmnosuch0"),
            Err(NicFirmwareError::NoSuchInterface { .. })
        ));
        assert!(matches!(
            driver_info("a-name-longer-than-ifnamsiz"),
            Err(NicFirmwareError::BadName { .. })
        ));
        // Whatever else this machine has: an interface that answers names its driver,
        // which checks the field offsets against the kernel's struct.
        let interfaces = std::fs::read_dir("/sys/class/net").into_iter().flatten();
        for entry in interfaces.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(info) = driver_info(&name) {
                assert!(info.driver.is_some(), "{name}: {info:?}");
            }
        }
    }
}
