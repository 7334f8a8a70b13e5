#!/usr/bin/env bash
# Installs everything Bearman's tests, benchmarks and smoke boots need on a fresh Debian
# machine: Debian packages and cargo tools. Idempotent; safe to run again.
set -euo pipefail

# Debian packages, with the reason each is here.
packages=(
  postgresql-client   # psql, to check the PostgreSQL server the conformance suite uses
  nginx-light         # the static-file baseline in `cargo xtask bench-ipxe`
  wrk                 # HTTP load generator for the benchmarks
  openipmi            # ipmi_sim: a real IPMI LAN (RMCP+) peer for daemon/tests/ipmi.rs
  ipmitool            # the IPMI driver (daemon/src/bmc/ipmi.rs) runs it; production needs it too
  qemu-system-x86     # qemu-system-x86_64: a real QMP peer (a VM driven like a server) for daemon/tests/qmp.rs
  ipxe-qemu           # iPXE option ROMs (pxe-e1000.rom) the `cargo xtask qemu-smoke` VMs network-boot with
  seabios             # the VMs' BIOS (qemu-system-x86 depends on it; named so the smoke's needs are listed)
  dnsmasq-base        # dnsmasq, the site's plain DHCP server (addresses only) on the `cargo xtask qemu-smoke` L2 bridge; -base: the binary without a system service
  ipxe                # undionly.kpxe, ipxe.efi, snponly.efi: what Bearman's TFTP server hands BIOS and UEFI PXE ROMs in the smoke
  ovmf                # UEFI firmware (OVMF_CODE.fd/OVMF_VARS.fd) for the smoke's UEFI VM
  curl                # an independent TFTP client: pxe/tests/services.rs downloads a boot file with it
  iputils-ping        # ping: the L2 smoke checks each Ready node answers at its Bearman pool address
  cpio                # cpio -t checks the initramfs archives `cargo xtask images` writes (xtask tests)
  podman              # builds and runs the container image once in daemon/tests/container_image.rs
  runc                # podman's runtime there: crun refuses this machine kind's hybrid cgroup v1/v2 layout
  debootstrap         # the image's Debian rootfs (deploy/container/build-image.sh)
  prometheus          # promtool checks and unit-tests deploy/prometheus/bearman-alerts.yml; a real Prometheus scrapes a daemon in tests/tests/prometheus.rs
  systemd             # systemd-analyze: daemon/tests/deploy_systemd.rs verifies deploy/systemd/bearman.service with it
  chromium            # the real browser daemon/tests/dashboard_browser.rs drives headless (Playwright cannot download one here)
  fonts-dejavu-core   # a font for that browser's screenshots of the dashboard (docs/screenshots/)
)

missing=()
for package in "${packages[@]}"; do
  package="${package%%#*}"
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
echo "install-deps: ok"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Installs Python package $2 at version $3 into the virtualenv $1 (in the repo,
# git-ignored), touching no system Python; nothing when it is already there.
venv_tool() {
  local venv="$1" package="$2" version="$3"
  installed() {
    "$venv/bin/python" - "$package" "$version" 2>/dev/null <<'PY'
import importlib.metadata, sys
sys.exit(importlib.metadata.version(sys.argv[1]) != sys.argv[2])
PY
  }
  if ! installed; then
    echo "install-deps: installing $package $version into $venv"
    # `python3 -m venv` needs ensurepip, which Debian's python3 ships separately.
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
      if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv
    fi
    # --clear: a venv left by another Python (or half-made) is rebuilt, not patched.
    "$venv/bin/python" -c '' 2>/dev/null || python3 -m venv --clear "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$package==$version"
    installed || { echo "install-deps: $package $version did not install" >&2; exit 1; }
  fi
  echo "install-deps: $package ok"
}

# sushy-tools: its Redfish emulator (fake, in-memory systems) is the BMC that
# daemon/tests/redfish.rs drives the Redfish driver against (.venv-sushy/; the tests find
# it there or through BEARMAN_SUSHY_VENV). Pinned: the version the tests were written and
# checked against.
venv_tool "$repo/.venv-sushy" sushy-tools 2.2.0

# kubernetes-validate: the Kubernetes API's JSON schemas, bundled (no cluster, no
# download at check time), which tests/tests/deploy_kubernetes.rs checks
# deploy/kubernetes/ against (.venv-k8s/).
venv_tool "$repo/.venv-k8s" kubernetes-validate 1.37.0

# playwright: drives the Debian chromium above (executable_path=/usr/bin/chromium, never
# a downloaded browser) in daemon/tests/dashboard_browser.rs through
# tests/browser/dashboard.py (.venv-browser/).
venv_tool "$repo/.venv-browser" playwright 1.63.0
