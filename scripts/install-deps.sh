#!/usr/bin/env bash
# Installs everything Bearman's tests, benchmarks and smoke boots need on a fresh Debian
# machine: Debian packages and cargo tools. Idempotent; safe to run again.
set -euo pipefail

# Debian packages, with the reason each is here.
packages=(
  postgresql-client   # psql, to check the PostgreSQL server the conformance suite uses
  nginx-light         # the static-file baseline in `cargo xtask bench-ipxe`
  wrk                 # HTTP load generator for the benchmarks
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
