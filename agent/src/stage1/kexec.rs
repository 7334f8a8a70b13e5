//! The last step of stage 1: load the verified stage-2 kernel with `kexec_file_load(2)` and
//! reboot into it with `reboot(LINUX_REBOOT_CMD_KEXEC)`; or, after a firmware update, a
//! plain restart (`reboot(LINUX_REBOOT_CMD_RESTART)`) through the firmware.
//!
//! The step sits behind the [`Kexec`] trait so tests can run all of stage 1 and assert the
//! plan it would have executed; only [`SystemKexec`] makes syscalls. `kexec_file_load` takes
//! a single initrd, so several initrds are concatenated first (the kernel unpacks
//! concatenated cpio archives in order, exactly as when a bootloader loads several).

use std::ffi::c_int;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// x86's `COMMAND_LINE_SIZE`, NUL included; the kernel refuses longer command lines.
pub const CMDLINE_BYTES_MAX: usize = 2048;

/// Verified files on disk, ready for the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KexecFiles {
    pub kernel: PathBuf,
    /// Initrds in boot order.
    pub initrds: Vec<PathBuf>,
    pub cmdline: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KexecError {
    #[error("command line is {len} bytes; the kernel accepts at most {max} including NUL")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error("{path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("kexec_file_load not permitted: not running as root, or kernel lockdown / secure boot forbids kexec")]
    NotPermitted,
    #[error("kexec_file_load: {path} is not a kernel this machine can load (wrong architecture or not a bzImage)")]
    NotLoadable { path: PathBuf },
    #[error("kexec_file_load: signature of {path} rejected (secure boot needs a kernel signed with a trusted key)")]
    SignatureRejected { path: PathBuf },
    #[error("kexec_file_load: {0}")]
    Load(io::Error),
    #[error("reboot(LINUX_REBOOT_CMD_KEXEC): {0}")]
    Reboot(io::Error),
    #[error("reboot(LINUX_REBOOT_CMD_RESTART): {0}")]
    Restart(io::Error),
}

/// The steps that leave the stage-1 kernel: into stage 2, or through the firmware again
/// (a firmware update). The real ones do not return on success.
pub trait Kexec {
    fn kexec(&mut self, files: &KexecFiles) -> Result<(), KexecError>;
    /// Restarts the machine through its firmware.
    fn restart(&mut self) -> Result<(), KexecError>;
}

/// The command line as `kexec_file_load` wants it: NUL-terminated, length including NUL.
pub fn cmdline_bytes(cmdline: &str) -> Result<Vec<u8>, KexecError> {
    if cmdline.contains('\0') {
        return Err(KexecError::CmdlineNul);
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    if bytes.len() > CMDLINE_BYTES_MAX {
        return Err(KexecError::CmdlineTooLong {
            len: bytes.len(),
            max: CMDLINE_BYTES_MAX,
        });
    }
    Ok(bytes)
}

/// `kexec_file_load` flags: none, except "no initramfs" when there is none to pass.
pub fn load_flags(has_initrd: bool) -> u64 {
    if has_initrd {
        0
    } else {
        libc::KEXEC_FILE_NO_INITRAMFS as u64
    }
}

/// Maps a failed `kexec_file_load` to an error that says what to fix.
pub fn load_error(error: io::Error, kernel: &Path) -> KexecError {
    match error.raw_os_error() {
        Some(libc::EPERM) => KexecError::NotPermitted,
        Some(libc::ENOEXEC) => KexecError::NotLoadable {
            path: kernel.to_path_buf(),
        },
        Some(libc::EKEYREJECTED) | Some(libc::EBADMSG) => KexecError::SignatureRejected {
            path: kernel.to_path_buf(),
        },
        _ => KexecError::Load(error),
    }
}

/// Concatenates `initrds` into `dest` (one initrd for the syscall); a single initrd is used
/// as it is.
pub fn combine_initrds(initrds: &[PathBuf], dest: &Path) -> Result<Option<PathBuf>, KexecError> {
    match initrds {
        [] => Ok(None),
        [single] => Ok(Some(single.clone())),
        many => {
            let file_error = |path: &Path| {
                let path = path.to_path_buf();
                move |source| KexecError::File { path, source }
            };
            let mut out = File::create(dest).map_err(file_error(dest))?;
            for path in many {
                let mut input = File::open(path).map_err(file_error(path))?;
                io::copy(&mut input, &mut out).map_err(file_error(dest))?;
            }
            out.sync_all().map_err(file_error(dest))?;
            Ok(Some(dest.to_path_buf()))
        }
    }
}

/// The production step: syscalls, root only.
#[derive(Debug)]
pub struct SystemKexec {
    /// Where a combined initrd is written (the download directory).
    pub work_dir: PathBuf,
}

impl Kexec for SystemKexec {
    fn kexec(&mut self, files: &KexecFiles) -> Result<(), KexecError> {
        let cmdline = cmdline_bytes(&files.cmdline)?;
        let initrd = combine_initrds(&files.initrds, &self.work_dir.join("initrd.combined"))?;
        let open = |path: &Path| {
            File::open(path).map_err(|source| KexecError::File {
                path: path.to_path_buf(),
                source,
            })
        };
        let kernel = open(&files.kernel)?;
        let initrd_file = initrd.as_deref().map(open).transpose()?;
        let initrd_fd: c_int = initrd_file.as_ref().map_or(-1, |file| file.as_raw_fd());
        // SAFETY: the fds are open for the call's duration, `cmdline` outlives it and its
        // length includes the terminating NUL, as the syscall requires.
        let result = unsafe {
            libc::syscall(
                libc::SYS_kexec_file_load,
                kernel.as_raw_fd() as libc::c_long,
                initrd_fd as libc::c_long,
                cmdline.len() as libc::c_ulong,
                cmdline.as_ptr(),
                load_flags(initrd.is_some()) as libc::c_ulong,
            )
        };
        if result != 0 {
            return Err(load_error(io::Error::last_os_error(), &files.kernel));
        }
        // SAFETY: plain syscalls without pointers. `sync` first: the RAM disk holds
        // nothing worth keeping, but a mounted scratch disk might.
        let result = unsafe {
            libc::sync();
            libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC)
        };
        Err(KexecError::Reboot(if result != 0 {
            io::Error::last_os_error()
        } else {
            io::Error::other("returned without rebooting")
        }))
    }

    fn restart(&mut self) -> Result<(), KexecError> {
        // SAFETY: plain syscalls without pointers. `sync` first, as for kexec: a flasher
        // may have written logs to a mounted disk.
        let result = unsafe {
            libc::sync();
            libc::reboot(libc::LINUX_REBOOT_CMD_RESTART)
        };
        Err(KexecError::Restart(if result != 0 {
            io::Error::last_os_error()
        } else {
            io::Error::other("returned without rebooting")
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_nul_terminated_and_bounded() {
        assert_eq!(cmdline_bytes("console=ttyS0").unwrap(), b"console=ttyS0\0");
        assert_eq!(cmdline_bytes("").unwrap(), b"\0");
        assert!(matches!(cmdline_bytes("a\0b"), Err(KexecError::CmdlineNul)));
        assert_eq!(cmdline_bytes(&"x".repeat(2047)).unwrap().len(), 2048);
        assert!(matches!(
            cmdline_bytes(&"x".repeat(2048)),
            Err(KexecError::CmdlineTooLong { len: 2049, .. })
        ));
    }

    #[test]
    fn flags_say_no_initramfs_only_without_one() {
        assert_eq!(load_flags(true), 0);
        assert_eq!(load_flags(false), 4);
    }

    #[test]
    fn load_errors_say_what_to_fix() {
        let kernel = Path::new("/run/bearman/kernel");
        let error = |errno| load_error(io::Error::from_raw_os_error(errno), kernel).to_string();
        assert!(error(libc::EPERM).contains("not running as root"));
        assert!(error(libc::ENOEXEC).contains("/run/bearman/kernel is not a kernel"));
        assert!(error(libc::EKEYREJECTED).contains("signature"));
        assert!(error(libc::ENOMEM).starts_with("kexec_file_load: "));
    }

    #[test]
    fn several_initrds_are_concatenated_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"first").unwrap();
        std::fs::write(&b, b"second").unwrap();
        let dest = dir.path().join("combined");
        assert_eq!(combine_initrds(&[], &dest).unwrap(), None);
        assert_eq!(
            combine_initrds(std::slice::from_ref(&a), &dest).unwrap(),
            Some(a.clone())
        );
        assert_eq!(combine_initrds(&[a, b], &dest).unwrap(), Some(dest.clone()));
        assert_eq!(std::fs::read(&dest).unwrap(), b"firstsecond");
    }
}
