#!/usr/bin/env bash
# Runs every Bearman test on this machine: installs what the tests need, makes sure the
# PostgreSQL server the conformance suite uses is up, then runs the whole workspace's
# tests (unit, store conformance on memory/SQLite/PostgreSQL, HTTP end-to-end, CLI, tidy,
# and every simulator scenario on a few seeds), then the QEMU smoke boot: real iPXE →
# stage 1 → kexec → stage 2 → Ready for SMOKE_NODES VMs, one power-killed and rebuilt,
# then two chaos drills (a rehearsed kernel panic; a power loss whose abort trips).
#
# Environment:
#   DATABASE_URL  PostgreSQL for the conformance suite
#                 (default postgres://postgres@127.0.0.1:5432/test)
#   SIM_SEEDS     seed range for the scenario tests, A..B with B exclusive (default 1..4)
#   SMOKE_NODES   VMs in the QEMU smoke boot (default 2; 0 skips it)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export SIM_SEEDS="${SIM_SEEDS:-1..4}"
SMOKE_NODES="${SMOKE_NODES:-2}"

# PostgreSQL runs as a machine service here; start it if it is down.
if ! pg_isready -d "$DATABASE_URL" -q 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql >/dev/null 2>&1; then
    echo "test: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
  for _ in $(seq 1 30); do
    pg_isready -d "$DATABASE_URL" -q 2>/dev/null && break
    sleep 1
  done
fi
pg_isready -d "$DATABASE_URL" || { echo "test: PostgreSQL at $DATABASE_URL is not reachable" >&2; exit 1; }

echo "test: building"
cargo build --workspace --all-targets --locked
echo "test: running tests (DATABASE_URL=$DATABASE_URL SIM_SEEDS=$SIM_SEEDS)"
failed=()
cargo nextest run --workspace --locked --no-fail-fast || failed+=("cargo nextest")
# The smoke runs even when a test failed: its own verdict is worth having.
if [ "$SMOKE_NODES" != 0 ]; then
  echo "test: QEMU smoke boot with $SMOKE_NODES nodes (cargo xtask qemu-smoke)"
  # The binaries the workspace build above made: `cargo xtask` and `cargo build -p bearman`
  # alone would build them again with other feature sets.
  target_dir="${CARGO_TARGET_DIR:-target}"
  "$target_dir/debug/xtask" qemu-smoke --nodes "$SMOKE_NODES" --daemon "$target_dir/debug/bearman" \
    --sim "$target_dir/debug/bearman-sim" || failed+=("cargo xtask qemu-smoke")
else
  echo "test: SMOKE_NODES=0: QEMU smoke boot SKIPPED"
fi
if ((${#failed[@]})); then
  echo "test: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "test: all passed"
