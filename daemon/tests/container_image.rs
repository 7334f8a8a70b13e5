//! The container image (deploy/container/build-image.sh) built here from Debian packages
//! and run once with podman: `bearman serve` answers `/healthz`, runs as the unprivileged
//! `bearman` user, and ipmitool (the IPMI driver's tool) is in the image. Without
//! podman, debootstrap or root the test fails, saying so; it is never skipped.
//!
//! Two settings are this machine kind's, not the image's: podman runs with runc (crun
//! refuses the hybrid cgroup v1/v2 layout here), and with ulimits no higher than this
//! process's hard limits (podman's defaults exceed them, and raising them is refused;
//! RLIMIT_NPROC is capped at 4096, as setting it to the hard limit is refused too).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_bearman");
const RUNTIME: &str = "runc";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .arg("--runtime")
        .arg(RUNTIME)
        .args(args)
        .output()
        .expect("podman is installed (scripts/install-deps.sh)")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    assert_eq!(unsafe { libc::getrlimit(resource, &mut limit) }, 0);
    limit.rlim_max.min(1 << 20)
}

/// Removes the container and the image, whatever the test's outcome.
struct Cleanup {
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", &self.container]);
        let _ = podman(&["rmi", "--force", &self.image]);
    }
}

#[test]
fn the_image_builds_from_debian_packages_and_serves_healthz() {
    let id = std::process::id();
    let image = format!("localhost/bearman:test-{id}");
    let container = format!("bearman-test-{id}");
    let _cleanup = Cleanup {
        container: container.clone(),
        image: image.clone(),
    };
    let built = Command::new(repo().join("deploy/container/build-image.sh"))
        .args(["--binary", BIN, "--tag", &image])
        .output()
        .expect("run build-image.sh");
    assert!(built.status.success(), "build-image.sh:\n{}", text(&built));
    assert_eq!(
        String::from_utf8_lossy(&built.stdout).trim(),
        image,
        "prints the tag it built"
    );

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let nofile = hard_limit(libc::RLIMIT_NOFILE);
    // Raising RLIMIT_NPROC to this process's own hard limit is refused here; a
    // daemon needs a few dozen threads.
    let nproc = hard_limit(libc::RLIMIT_NPROC).min(4096);
    let run = podman(&[
        "run",
        "--detach",
        "--name",
        &container,
        "--network",
        "host",
        "--ulimit",
        &format!("nofile={nofile}:{nofile}"),
        "--ulimit",
        &format!("nproc={nproc}:{nproc}"),
        &image,
        "serve",
        "--listen",
        &listen,
    ]);
    assert!(run.status.success(), "podman run:\n{}", text(&run));

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answer = Command::new("curl")
            .args(["--silent", "--max-time", "2"])
            .arg(format!("http://{listen}/healthz"))
            .output()
            .expect("curl");
        if answer.status.success() && String::from_utf8_lossy(&answer.stdout).starts_with("ok") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no /healthz from the container within 60 s; its log:\n{}",
            text(&podman(&["logs", &container]))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs = text(&podman(&["logs", &container]));
    assert!(logs.contains("bearman serving"), "{logs}");

    let uid = podman(&["exec", &container, "id", "-u"]);
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "10001",
        "{}",
        text(&uid)
    );
    let ipmitool = podman(&["exec", &container, "ipmitool", "-V"]);
    assert!(
        text(&ipmitool).contains("ipmitool version"),
        "{}",
        text(&ipmitool)
    );
    let version = podman(&["exec", &container, "bearman", "--version"]);
    assert!(text(&version).starts_with("bearman "), "{}", text(&version));
}
