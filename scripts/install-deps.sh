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
  systemd             # systemd-analyze: daemon/tests/deploy_systemd.rs verifies deploy/systemd/bearman.service with it
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

# sushy-tools: its Redfish emulator (fake, in-memory systems) is the BMC that
# daemon/tests/redfish.rs drives the Redfish driver against. It is a Python program, so it
# lives in a virtualenv in the repo (.venv-sushy/, git-ignored; the tests find it there or
# through BEARMAN_SUSHY_VENV) and touches no system Python. Pinned: the version the tests
# were written and checked against.
SUSHY_TOOLS_VERSION=2.2.0
sushy_venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv-sushy"
sushy_installed() {
  "$sushy_venv/bin/python" - "$SUSHY_TOOLS_VERSION" 2>/dev/null <<'PY'
import importlib.metadata, sys
sys.exit(importlib.metadata.version("sushy-tools") != sys.argv[1])
PY
}
if ! sushy_installed; then
  echo "install-deps: installing sushy-tools $SUSHY_TOOLS_VERSION into $sushy_venv"
  # `python3 -m venv` needs ensurepip, which Debian's python3 ships separately.
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv
  fi
  # --clear: a venv left by another Python (or half-made) is rebuilt, not patched.
  "$sushy_venv/bin/python" -c '' 2>/dev/null || python3 -m venv --clear "$sushy_venv"
  "$sushy_venv/bin/python" -m pip install --quiet --disable-pip-version-check "sushy-tools==$SUSHY_TOOLS_VERSION"
  sushy_installed || { echo "install-deps: sushy-tools $SUSHY_TOOLS_VERSION did not install" >&2; exit 1; }
fi
echo "install-deps: sushy-tools ok"
