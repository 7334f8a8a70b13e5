//! The `[pxe]` configuration section: what the operator writes (every key optional but
//! `server_address`), its defaults, and its validation with messages naming the key.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::boot::BootTargets;
use crate::tftp::{TransferLimits, BLKSIZE_MIN, BLKSIZE_RFC_MAX};

pub const DHCP_PORT: u16 = 67;
pub const PXE_PORT: u16 = 4011;
pub const TFTP_PORT: u16 = 69;
pub const BIOS_FILE_DEFAULT: &str = "undionly.kpxe";
pub const UEFI_FILE_DEFAULT: &str = "ipxe.efi";
pub const TFTP_TRANSFERS_MAX_DEFAULT: usize = 64;
pub const TFTP_FILE_BYTES_MAX_DEFAULT: u64 = 16 * 1024 * 1024;
/// 1468 = 1500 (Ethernet MTU) − 20 (IP) − 8 (UDP) − 4 (TFTP): no fragmentation.
pub const TFTP_BLKSIZE_MAX_DEFAULT: u16 = 1468;
pub const TFTP_TIMEOUT_MS_DEFAULT: u64 = 1000;
pub const TFTP_RETRIES_MAX_DEFAULT: u32 = 5;
pub const TFTP_TRANSFER_TIME_MAX_S_DEFAULT: u64 = 120;
pub const CLIENT_REQUESTS_PER_S_DEFAULT: u32 = 10;
pub const CLIENT_BURST_DEFAULT: u32 = 20;
pub const CLIENTS_TRACKED_MAX_DEFAULT: usize = 4096;

/// `[pxe]` as written. Present means on; absent (the default) means Bearman serves no
/// DHCP or TFTP at all.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PxeFileConfig {
    /// This host's address on the boot network: the next-server and server identifier in
    /// every reply. Required.
    pub server_address: Option<Ipv4Addr>,
    /// Network interface the DHCP sockets are bound to (SO_BINDTODEVICE): which L2 the
    /// proxy answers on, and where its broadcasts go. Strongly advised on a host with
    /// more than one network.
    pub interface: Option<String>,
    pub dhcp_listen: Option<SocketAddrV4>,
    pub pxe_listen: Option<SocketAddrV4>,
    pub tftp_listen: Option<SocketAddrV4>,
    pub tftp_root: Option<PathBuf>,
    pub bios_file: Option<String>,
    pub uefi_file: Option<String>,
    pub http_boot_url: Option<String>,
    pub ipxe_url: Option<String>,
    pub tftp_transfers_max: Option<usize>,
    pub tftp_file_bytes_max: Option<u64>,
    pub tftp_blksize_max: Option<u16>,
    pub tftp_timeout_ms: Option<u64>,
    pub tftp_retries_max: Option<u32>,
    pub tftp_transfer_time_max_s: Option<u64>,
    pub client_requests_per_s: Option<u32>,
    pub client_burst: Option<u32>,
    pub clients_tracked_max: Option<usize>,
}

/// `[pxe]` resolved and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PxeConfig {
    pub server_address: Ipv4Addr,
    pub interface: Option<String>,
    pub dhcp_listen: SocketAddr,
    pub pxe_listen: SocketAddr,
    pub tftp_listen: SocketAddr,
    pub tftp_root: PathBuf,
    pub targets: BootTargets,
    pub tftp_transfers_max: usize,
    pub tftp_file_bytes_max: u64,
    pub tftp: TransferLimits,
    pub client_requests_per_s: u32,
    pub client_burst: u32,
    pub clients_tracked_max: usize,
}

impl PxeFileConfig {
    /// Resolves defaults against the daemon's public URL (`http://host:port`, no trailing
    /// slash) and its default TFTP root (`<data-dir>/tftp`), and validates; errors name
    /// the key.
    pub fn resolve(
        self,
        public_url: &str,
        tftp_root_default: &std::path::Path,
    ) -> Result<PxeConfig, String> {
        let server_address = self.server_address.ok_or(
            "pxe.server_address is required: this host's IPv4 address on the boot network",
        )?;
        if server_address.is_unspecified()
            || server_address.is_broadcast()
            || server_address.is_multicast()
        {
            return Err(format!(
                "pxe.server_address {server_address} must be this host's unicast address on the boot network"
            ));
        }
        if let Some(interface) = &self.interface {
            if interface.is_empty() || interface.len() > 15 || interface.contains('/') {
                return Err(format!(
                    "pxe.interface {interface:?} is not a network interface name"
                ));
            }
        }
        let http_url =
            |key: &str, value: Option<String>, default: String| -> Result<String, String> {
                let url = value.unwrap_or(default);
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(format!(
                        "pxe.{key} {url:?} must start with http:// or https://"
                    ));
                }
                Ok(url)
            };
        let file = |key: &str, value: Option<String>, default: &str| -> Result<String, String> {
            let file = value.unwrap_or_else(|| default.to_string());
            crate::tftp::resolve_path(std::path::Path::new("/"), &file)
                .map_err(|error| format!("pxe.{key}: {error}"))?;
            Ok(file)
        };
        let targets = BootTargets {
            bios_file: file("bios_file", self.bios_file, BIOS_FILE_DEFAULT)?,
            uefi_file: file("uefi_file", self.uefi_file, UEFI_FILE_DEFAULT)?,
            http_boot_url: http_url(
                "http_boot_url",
                self.http_boot_url,
                format!("{public_url}/images/ipxe.efi"),
            )?,
            ipxe_url: http_url("ipxe_url", self.ipxe_url, format!("{public_url}/ipxe"))?,
        };
        let bounded = |key: &str, value: u64, range: std::ops::RangeInclusive<u64>| {
            if range.contains(&value) {
                Ok(value)
            } else {
                Err(format!(
                    "pxe.{key} {value} is outside {}..={}",
                    range.start(),
                    range.end()
                ))
            }
        };
        let tftp_transfers_max = bounded(
            "tftp_transfers_max",
            self.tftp_transfers_max
                .unwrap_or(TFTP_TRANSFERS_MAX_DEFAULT) as u64,
            1..=4096,
        )? as usize;
        let tftp_file_bytes_max = bounded(
            "tftp_file_bytes_max",
            self.tftp_file_bytes_max
                .unwrap_or(TFTP_FILE_BYTES_MAX_DEFAULT),
            1..=256 * 1024 * 1024,
        )?;
        let blksize_max = bounded(
            "tftp_blksize_max",
            u64::from(self.tftp_blksize_max.unwrap_or(TFTP_BLKSIZE_MAX_DEFAULT)),
            u64::from(BLKSIZE_MIN)..=u64::from(BLKSIZE_RFC_MAX),
        )? as u16;
        let timeout_ms = bounded(
            "tftp_timeout_ms",
            self.tftp_timeout_ms.unwrap_or(TFTP_TIMEOUT_MS_DEFAULT),
            100..=60_000,
        )?;
        let retries_max = bounded(
            "tftp_retries_max",
            u64::from(self.tftp_retries_max.unwrap_or(TFTP_RETRIES_MAX_DEFAULT)),
            0..=100,
        )? as u32;
        let transfer_time_max_s = bounded(
            "tftp_transfer_time_max_s",
            self.tftp_transfer_time_max_s
                .unwrap_or(TFTP_TRANSFER_TIME_MAX_S_DEFAULT),
            1..=3600,
        )?;
        let client_requests_per_s = bounded(
            "client_requests_per_s",
            u64::from(
                self.client_requests_per_s
                    .unwrap_or(CLIENT_REQUESTS_PER_S_DEFAULT),
            ),
            0..=100_000,
        )? as u32;
        let client_burst = bounded(
            "client_burst",
            u64::from(self.client_burst.unwrap_or(CLIENT_BURST_DEFAULT)),
            1..=100_000,
        )? as u32;
        let clients_tracked_max = bounded(
            "clients_tracked_max",
            self.clients_tracked_max
                .unwrap_or(CLIENTS_TRACKED_MAX_DEFAULT) as u64,
            1..=1_000_000,
        )? as usize;
        let any = Ipv4Addr::UNSPECIFIED;
        Ok(PxeConfig {
            server_address,
            interface: self.interface,
            dhcp_listen: self
                .dhcp_listen
                .unwrap_or(SocketAddrV4::new(any, DHCP_PORT))
                .into(),
            pxe_listen: self
                .pxe_listen
                .unwrap_or(SocketAddrV4::new(any, PXE_PORT))
                .into(),
            // TFTP is unicast: bound to the boot address, so replies leave from the
            // address the client sent to (PXE ROMs check).
            tftp_listen: self
                .tftp_listen
                .unwrap_or(SocketAddrV4::new(server_address, TFTP_PORT))
                .into(),
            tftp_root: self
                .tftp_root
                .unwrap_or_else(|| tftp_root_default.to_path_buf()),
            targets,
            tftp_transfers_max,
            tftp_file_bytes_max,
            tftp: TransferLimits {
                blksize_max,
                timeout: Duration::from_millis(timeout_ms),
                retries_max,
                transfer_time_max: Duration::from_secs(transfer_time_max_s),
            },
            client_requests_per_s,
            client_burst,
            clients_tracked_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PxeConfig, String> {
        toml::from_str::<PxeFileConfig>(text)
            .map_err(|error| error.to_string())?
            .resolve(
                "http://10.77.0.1:8080",
                std::path::Path::new("/var/lib/bearman/tftp"),
            )
    }

    #[test]
    fn defaults_need_only_the_server_address() {
        let config = parse("server_address = \"10.77.0.1\"").unwrap();
        assert_eq!(config.dhcp_listen.to_string(), "0.0.0.0:67");
        assert_eq!(config.pxe_listen.to_string(), "0.0.0.0:4011");
        assert_eq!(config.tftp_listen.to_string(), "10.77.0.1:69");
        assert_eq!(config.tftp_root, PathBuf::from("/var/lib/bearman/tftp"));
        assert_eq!(config.targets.bios_file, "undionly.kpxe");
        assert_eq!(config.targets.uefi_file, "ipxe.efi");
        assert_eq!(config.targets.ipxe_url, "http://10.77.0.1:8080/ipxe");
        assert_eq!(
            config.targets.http_boot_url,
            "http://10.77.0.1:8080/images/ipxe.efi"
        );
        assert_eq!(config.tftp.blksize_max, 1468);
        assert_eq!(config.tftp_transfers_max, 64);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("", "pxe.server_address is required"),
            ("server_address = \"0.0.0.0\"", "pxe.server_address"),
            (
                "server_address = \"10.0.0.1\"\nuefi_file = \"../etc/passwd\"",
                "pxe.uefi_file",
            ),
            (
                "server_address = \"10.0.0.1\"\nipxe_url = \"tftp://x\"",
                "pxe.ipxe_url",
            ),
            (
                "server_address = \"10.0.0.1\"\ntftp_blksize_max = 4",
                "pxe.tftp_blksize_max",
            ),
            (
                "server_address = \"10.0.0.1\"\ntftp_transfers_max = 0",
                "pxe.tftp_transfers_max",
            ),
            (
                "server_address = \"10.0.0.1\"\ntftp_timeout_ms = 5",
                "pxe.tftp_timeout_ms",
            ),
            (
                "server_address = \"10.0.0.1\"\ninterface = \"a/b\"",
                "pxe.interface",
            ),
            (
                "server_address = \"10.0.0.1\"\ntftp_rot = \"/x\"",
                "unknown field",
            ),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(key), "{text:?}: {error}");
        }
    }
}
