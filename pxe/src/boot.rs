//! Pure: which boot file or URL a network-boot client is sent, from what its DHCP request
//! says about itself (vendor class, architecture, user class). No I/O, no clock.
//!
//! The rules, in order:
//! 1. A client that is not a PXE or HTTP-boot client (option 60 does not start with
//!    `PXEClient` or `HTTPClient`) is not ours: the site's DHCP server serves it alone.
//! 2. A client whose user class (option 77) is `iPXE` is iPXE already, chainloaded or in
//!    the NIC's ROM: it gets the daemon's `/ipxe` URL. Sending it the iPXE binary again
//!    would loop forever (load iPXE, DHCP, load iPXE, …).
//! 3. A UEFI HTTP-boot client (`HTTPClient`, architecture 16) gets an http URL of an EFI
//!    binary, which the firmware downloads without TFTP.
//! 4. A PXE client gets a TFTP file by architecture (option 93, RFC 4578): 0 (legacy BIOS,
//!    also assumed when the option is missing, as old ROMs omit it) → the BIOS file
//!    (`undionly.kpxe`), 7 and 9 (x86-64 UEFI) → the UEFI file (`ipxe.efi` or
//!    `snponly.efi`).
//! 5. Anything else (32-bit UEFI, ARM, an HTTP client of another architecture) gets no
//!    answer, with a reason the caller logs: better no offer than a binary it cannot run.

/// RFC 4578 / IANA processor architecture types this module distinguishes.
pub const ARCH_BIOS: u16 = 0;
pub const ARCH_UEFI_BC: u16 = 7;
pub const ARCH_UEFI_X64: u16 = 9;
pub const ARCH_UEFI_X64_HTTP: u16 = 16;

/// What a DHCP request says about the client, as far as booting goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientFacts {
    /// Option 60, raw.
    pub vendor_class: Option<Vec<u8>>,
    /// Option 93: the first architecture listed.
    pub arch: Option<u16>,
    /// Option 77, raw (iPXE sends the bare string; RFC 3004 clients length-prefix each).
    pub user_class: Option<Vec<u8>>,
}

/// Where each kind of client is sent; resolved from the `[pxe]` configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootTargets {
    /// TFTP path for legacy BIOS PXE ROMs.
    pub bios_file: String,
    /// TFTP path for x86-64 UEFI PXE.
    pub uefi_file: String,
    /// http(s) URL of an EFI binary for UEFI HTTP Boot.
    pub http_boot_url: String,
    /// The daemon's iPXE entry point (`<public_url>/ipxe`).
    pub ipxe_url: String,
}

/// How the client is told to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootAnswer {
    /// A file on our TFTP server (PXE, `PXEClient` vendor class in the reply).
    Tftp(String),
    /// An http URL handed to iPXE (`PXEClient` in the reply; iPXE fetches it itself).
    IpxeScript(String),
    /// An http URL for UEFI HTTP Boot (`HTTPClient` in the reply, as the firmware requires).
    HttpBoot(String),
}

/// Why a request gets no answer. Logged (rate-limited), never an error to anybody.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoAnswer {
    /// Not a network-boot client: the site's DHCP server handles it.
    NotNetboot,
    /// A network-boot client of an architecture we have no binary for.
    UnsupportedArch { http: bool, arch: u16 },
}

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAnswer::NotNetboot => write!(f, "not a PXE or HTTP-boot client"),
            NoAnswer::UnsupportedArch { http: false, arch } => {
                write!(f, "PXE client architecture {arch} has no boot file")
            }
            NoAnswer::UnsupportedArch { http: true, arch } => {
                write!(
                    f,
                    "HTTP-boot client architecture {arch} has no boot URL (only {ARCH_UEFI_X64_HTTP}, x86-64 UEFI HTTP)"
                )
            }
        }
    }
}

/// The client's kind of netboot, from option 60.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Netboot {
    Pxe,
    Http,
}

pub fn netboot_kind(vendor_class: Option<&[u8]>) -> Option<Netboot> {
    let class = vendor_class?;
    if class.starts_with(b"PXEClient") {
        Some(Netboot::Pxe)
    } else if class.starts_with(b"HTTPClient") {
        Some(Netboot::Http)
    } else {
        None
    }
}

/// Whether option 77 names iPXE, in either encoding iPXE clients use.
pub fn is_ipxe(user_class: Option<&[u8]>) -> bool {
    let Some(class) = user_class else {
        return false;
    };
    if class == b"iPXE" {
        return true;
    }
    // RFC 3004: a list of (length, data) items.
    let mut rest = class;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        if len == 0 || len > tail.len() {
            return false;
        }
        if &tail[..len] == b"iPXE" {
            return true;
        }
        rest = &tail[len..];
    }
    false
}

/// The decision. See the module documentation for the rules.
pub fn decide(facts: &ClientFacts, targets: &BootTargets) -> Result<BootAnswer, NoAnswer> {
    let kind = netboot_kind(facts.vendor_class.as_deref()).ok_or(NoAnswer::NotNetboot)?;
    if is_ipxe(facts.user_class.as_deref()) {
        return Ok(BootAnswer::IpxeScript(targets.ipxe_url.clone()));
    }
    let arch = facts.arch.unwrap_or(ARCH_BIOS);
    match (kind, arch) {
        (Netboot::Http, ARCH_UEFI_X64_HTTP) => {
            Ok(BootAnswer::HttpBoot(targets.http_boot_url.clone()))
        }
        (Netboot::Http, arch) => Err(NoAnswer::UnsupportedArch { http: true, arch }),
        (Netboot::Pxe, ARCH_BIOS) => Ok(BootAnswer::Tftp(targets.bios_file.clone())),
        (Netboot::Pxe, ARCH_UEFI_BC | ARCH_UEFI_X64) => {
            Ok(BootAnswer::Tftp(targets.uefi_file.clone()))
        }
        (Netboot::Pxe, arch) => Err(NoAnswer::UnsupportedArch { http: false, arch }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> BootTargets {
        BootTargets {
            bios_file: "undionly.kpxe".into(),
            uefi_file: "snponly.efi".into(),
            http_boot_url: "http://10.0.0.1:8080/images/ipxe.efi".into(),
            ipxe_url: "http://10.0.0.1:8080/ipxe".into(),
        }
    }

    fn facts(vendor: Option<&str>, arch: Option<u16>, user: Option<&[u8]>) -> ClientFacts {
        ClientFacts {
            vendor_class: vendor.map(|text| text.as_bytes().to_vec()),
            arch,
            user_class: user.map(<[u8]>::to_vec),
        }
    }

    /// (vendor class, arch, user class, expected).
    type Row<'a> = (
        Option<&'a str>,
        Option<u16>,
        Option<&'a [u8]>,
        Result<BootAnswer, NoAnswer>,
    );

    /// One row per rule and edge.
    #[test]
    fn each_client_kind_gets_its_file_or_url() {
        use BootAnswer::*;
        let tftp = |file: &str| Ok(Tftp(file.into()));
        let ipxe = Ok(IpxeScript("http://10.0.0.1:8080/ipxe".into()));
        let rfc3004_ipxe: &[u8] = b"\x04iPXE";
        let rows: &[Row] = &[
            (
                Some("PXEClient:Arch:00000:UNDI:002001"),
                Some(0),
                None,
                tftp("undionly.kpxe"),
            ),
            (Some("PXEClient"), None, None, tftp("undionly.kpxe")),
            (
                Some("PXEClient:Arch:00007:UNDI:003000"),
                Some(7),
                None,
                tftp("snponly.efi"),
            ),
            (
                Some("PXEClient:Arch:00009:UNDI:003000"),
                Some(9),
                None,
                tftp("snponly.efi"),
            ),
            // The chainload loop breaker, whatever the architecture.
            (
                Some("PXEClient:Arch:00000:UNDI:002001"),
                Some(0),
                Some(b"iPXE"),
                ipxe.clone(),
            ),
            (
                Some("PXEClient:Arch:00007:UNDI:003000"),
                Some(7),
                Some(b"iPXE"),
                ipxe.clone(),
            ),
            (Some("PXEClient"), Some(9), Some(rfc3004_ipxe), ipxe.clone()),
            (
                Some("PXEClient"),
                Some(7),
                Some(b"\x03abc\x04iPXE"),
                ipxe.clone(),
            ),
            // Near misses of the user class are not iPXE.
            (
                Some("PXEClient"),
                Some(7),
                Some(b"ipxe"),
                tftp("snponly.efi"),
            ),
            (
                Some("PXEClient"),
                Some(7),
                Some(b"\x09iPXE"),
                tftp("snponly.efi"),
            ),
            (Some("PXEClient"), Some(0), Some(b""), tftp("undionly.kpxe")),
            (
                Some("HTTPClient:Arch:00016:UNDI:003001"),
                Some(16),
                None,
                Ok(HttpBoot("http://10.0.0.1:8080/images/ipxe.efi".into())),
            ),
            (
                Some("HTTPClient"),
                Some(15),
                None,
                Err(NoAnswer::UnsupportedArch {
                    http: true,
                    arch: 15,
                }),
            ),
            (
                Some("PXEClient:Arch:00006"),
                Some(6),
                None,
                Err(NoAnswer::UnsupportedArch {
                    http: false,
                    arch: 6,
                }),
            ),
            (
                Some("PXEClient:Arch:00011"),
                Some(11),
                None,
                Err(NoAnswer::UnsupportedArch {
                    http: false,
                    arch: 11,
                }),
            ),
            // Not ours: plain DHCP clients, even iPXE-looking ones without option 60.
            (None, Some(0), None, Err(NoAnswer::NotNetboot)),
            (None, None, Some(b"iPXE"), Err(NoAnswer::NotNetboot)),
            (Some("MSFT 5.0"), None, None, Err(NoAnswer::NotNetboot)),
            (Some("pxeclient"), Some(0), None, Err(NoAnswer::NotNetboot)),
            (Some("udhcp 1.36.1"), None, None, Err(NoAnswer::NotNetboot)),
        ];
        for (vendor, arch, user, expected) in rows {
            let got = decide(&facts(*vendor, *arch, *user), &targets());
            assert_eq!(
                &got, expected,
                "vendor {vendor:?} arch {arch:?} user {user:?}"
            );
        }
    }

    #[test]
    fn no_answer_reasons_name_the_architecture() {
        let text = NoAnswer::UnsupportedArch {
            http: false,
            arch: 11,
        }
        .to_string();
        assert!(text.contains("11"), "{text}");
    }
}
