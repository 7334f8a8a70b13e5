#!/usr/bin/env bash
# Builds the Bearman container image from Debian packages, without a registry:
# a minimal Debian rootfs made by debootstrap (with ipmitool, the IPMI driver's tool, and
# the CA certificates Redfish/Nova over HTTPS trust by default), the `bearman` binary,
# a `bearman` user (uid/gid 10001), imported into podman as one layer.
#
# Why debootstrap and not `FROM debian`: no image registry is reachable from the
# machines this is built on; Debian's package mirror is. Why not FROM scratch: ipmitool
# and bearman are dynamically linked against glibc, and the Kubernetes init container
# uses coreutils' `install`.
#
# Usage: deploy/container/build-image.sh [--binary PATH] [--tag NAME:TAG]
#                                        [--suite bookworm] [--mirror URL] [--keep-rootfs DIR]
#   --binary   the bearman binary to put in (default: target/release/bearman, built if missing)
#   --tag      image name (default: bearman:<version of the binary>)
#   --suite    Debian suite (default: bookworm)
#   --mirror   Debian mirror (default: http://deb.debian.org/debian)
# Needs root (debootstrap, chroot), debootstrap and podman. Prints each step.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
binary=""
tag=""
suite="bookworm"
mirror="http://deb.debian.org/debian"
keep=""
while (($#)); do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --suite) suite="$2"; shift 2 ;;
    --mirror) mirror="$2"; shift 2 ;;
    --keep-rootfs) keep="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

step() { echo "build-image: $*" >&2; }
for tool in debootstrap podman chroot; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool is not installed (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "build-image: debootstrap needs root" >&2; exit 1; }

if [ -z "$binary" ]; then
  binary="$repo/target/release/bearman"
  if [ ! -x "$binary" ]; then
    step "building bearman (release)"
    cargo build --release -p bearman --manifest-path "$repo/Cargo.toml"
  fi
fi
[ -x "$binary" ] || { echo "build-image: $binary is not an executable" >&2; exit 1; }
version="$("$binary" --version | awk '{print $2}')"
tag="${tag:-bearman:$version}"

work="$(mktemp -d /var/tmp/bearman-image.XXXXXX)"
cleanup() { [ -n "$keep" ] || rm -rf "$work"; }
trap cleanup EXIT
rootfs="$work/rootfs"
if [ -n "$keep" ]; then rootfs="$keep"; fi

step "debootstrap $suite (minbase + ipmitool, ca-certificates) from $mirror into $rootfs"
debootstrap --variant=minbase --include=ipmitool,ca-certificates "$suite" "$rootfs" "$mirror" \
  > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

step "adding the bearman user and binary"
chroot "$rootfs" /bin/sh -euc '
  groupadd --gid 10001 bearman
  useradd --uid 10001 --gid 10001 --home-dir /var/lib/bearman --no-create-home --shell /usr/sbin/nologin bearman
  install -d -o bearman -g bearman -m 0750 /var/lib/bearman
  install -d -m 0755 /etc/bearman
'
install -m 0755 "$binary" "$rootfs/usr/local/bin/bearman"
# What a container never uses: package caches and lists, documentation.
rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*

step "importing into podman as $tag"
tar --numeric-owner -C "$rootfs" -c . | podman import \
  --change 'USER 10001:10001' \
  --change 'WORKDIR /var/lib/bearman' \
  --change 'ENV BEARMAN_DATA_DIR=/var/lib/bearman' \
  --change 'EXPOSE 8080' \
  --change 'ENTRYPOINT ["/usr/local/bin/bearman"]' \
  --change 'CMD ["serve", "--config", "/etc/bearman/bearman.toml"]' \
  --message "bearman $version on Debian $suite" \
  - "$tag" >/dev/null
step "built $tag ($(podman image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
echo "$tag"
