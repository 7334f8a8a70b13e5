//! The BMC on a real machine: its device node (`/dev/ipmi0`) and `ipmitool` on PATH. The
//! steps that read and configure it are [`crate::stages::bmc`]'s; commands go through the
//! [`Ipmitool`] trait so tests check the exact argument vectors; only [`SystemIpmitool`]
//! runs a process.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use crate::bmc::{ipmitool_error_line, BMC_DEVICES};

/// Bound on one ipmitool command (in-band KCS answers in well under a second; a wedged BMC
/// never does).
pub const IPMITOOL_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest stderr quoted on the console (one line: see [`ipmitool_error_line`]).
const STDERR_CHARS_MAX: usize = 400;

/// Runs ipmitool with an argument vector (the program name not included).
pub trait Ipmitool: Send + Sync {
    /// True when the program can be run at all.
    fn available(&self) -> bool;
    /// Runs `ipmitool <args>`: its stdout, or what went wrong (exit status and stderr,
    /// or the timeout).
    fn run<'a>(
        &'a self,
        args: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;
}

/// The real ipmitool, found on PATH, each run bounded by `timeout` and killed past it.
#[derive(Clone, Debug)]
pub struct SystemIpmitool {
    pub timeout: Duration,
}

impl Default for SystemIpmitool {
    fn default() -> Self {
        SystemIpmitool {
            timeout: IPMITOOL_TIMEOUT,
        }
    }
}

impl Ipmitool for SystemIpmitool {
    fn available(&self) -> bool {
        find_on_path("ipmitool").is_some()
    }

    fn run<'a>(
        &'a self,
        args: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        Box::pin(async move {
            let mut command = tokio::process::Command::new("ipmitool");
            command
                .args(args)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            let output = match tokio::time::timeout(self.timeout, command.output()).await {
                Err(_) => return Err(format!("no answer within {} s", self.timeout.as_secs())),
                Ok(Err(error)) => return Err(error.to_string()),
                Ok(Ok(output)) => output,
            };
            if output.status.success() {
                Ok(String::from_utf8_lossy(&output.stdout).into_owned())
            } else {
                let stderr =
                    ipmitool_error_line(&String::from_utf8_lossy(&output.stderr), STDERR_CHARS_MAX);
                Err(format!("{}: {stderr}", output.status))
            }
        })
    }
}

/// The first executable file called `program` in `$PATH`'s directories.
fn find_on_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// The first IPMI device node present under `root`.
pub fn find_device(root: &Path) -> Option<PathBuf> {
    BMC_DEVICES
        .iter()
        .map(|device| root.join(device))
        .find(|path| path.exists())
}

/// The first IPMI device node present under `root`, named as the machine sees it (under
/// `/`).
pub fn device_on_machine(root: &Path) -> Option<PathBuf> {
    let device = find_device(root)?;
    Some(Path::new("/").join(device.strip_prefix(root).unwrap_or(&device)))
}
