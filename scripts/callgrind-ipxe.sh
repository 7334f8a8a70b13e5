#!/usr/bin/env bash
# Instructions per request for GET /ipxe/{uuid}, GET /healthz and nginx's static copy,
# counted by valgrind's callgrind: unlike requests/s, the count does not depend on what
# else the machine is doing, so it shows whether a change made the daemon cheaper.
#
# Usage:
#   cargo xtask bench-ipxe --work-dir /tmp/bench --setup-only   # 10k nodes, wrk scripts
#   scripts/callgrind-ipxe.sh /tmp/bench [bearman|nginx|all]
#
# The daemon ($DAEMON or target/release/bearman, built by the xtask) runs under callgrind on the
# populated data directory. Every node is fetched once (warming the caches, as a long
# benchmark run would), the counters are zeroed, wrk (1 thread, 32 connections) loads the
# endpoint, and the counters are dumped: instructions / wrk's request count is the figure.
# Only user-space instructions are counted (the kernel's socket work is not), and wrk's
# last in-flight requests (at most 32) make it a little high. The daemon's figure also
# holds what its controller did meanwhile (a boot watchdog scan of the 10,000 booting
# nodes lands in some windows and not others): printed apart, with the request path
# alone beside it (scripts/callgrind-background.py).
set -euo pipefail

work=$(realpath "${1:?usage: $0 WORK_DIR [bearman|nginx|all]}")
which=${2:-all}
seconds=${SECONDS_PER_RUN:-20}
root=$(cd "$(dirname "$0")/.." && pwd)
daemon=${DAEMON:-$root/target/release/bearman}
out=$work/callgrind
mkdir -p "$out"
port=$((20000 + RANDOM % 20000))

wait_for() { # url
    for _ in $(seq 600); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.2
    done
    echo "nothing answers at $1" >&2
    return 1
}

# Zeroes the counters of callgrind process $1, runs wrk with lua script $2 (or path $2
# when it starts with /) against port $3, dumps and prints "label instructions requests".
measure() { # pid script port label
    local pid=$1 script=$2 port=$3 label=$4 wrk_out
    callgrind_control -z "$pid" >/dev/null
    if [[ $script == *.lua ]]; then
        wrk_out=$(wrk -t1 -c32 -d"${seconds}s" --script "$script" "http://127.0.0.1:$port/")
    else
        wrk_out=$(wrk -t1 -c32 -d"${seconds}s" "http://127.0.0.1:$port$script")
    fi
    callgrind_control -d "$label" "$pid" >/dev/null
    local requests dump instructions
    requests=$(awk '/requests in/ {print $1}' <<<"$wrk_out")
    if grep -q "Non-2xx" <<<"$wrk_out"; then
        echo "$label: wrk saw errors:" >&2
        echo "$wrk_out" >&2
        return 1
    fi
    sleep 1
    dump=$(grep -l "^desc: Trigger:.*$label" "$out"/*.out.* | tail -1)
    instructions=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
    printf '%-10s %14d instructions / %7d requests = %6d per request  (%s)\n' \
        "$label" "$instructions" "$requests" $((instructions / requests)) "$dump"
    if [[ $label != nginx ]]; then
        local background
        background=$(python3 "$root/scripts/callgrind-background.py" "$dump")
        printf '%-10s of which the controller meanwhile (its ticks and their SQL): %d per request\n' \
            "" $((background / requests))
        printf '%-10s the request path alone: %d per request\n' "" $(((instructions - background) / requests))
    fi
}

if [[ $which == all || $which == bearman ]]; then
    # A copy, so that every measurement starts from the same database. bench.toml (the
    # xtask's) lifts the per-source rate limit out of wrk's way, as in the wrk runs.
    rm -rf "$out/data"
    cp -r "$work/data" "$out/data"
    env -u RUST_LOG valgrind --tool=callgrind --compress-strings=no --compress-pos=no --callgrind-out-file="$out/bearman.out" \
        "$daemon" serve --listen "127.0.0.1:$port" --default-flavor hv \
        --data-dir "$out/data" --config "${CONFIG:-$out/data/bench.toml}" >"$out/bearman.log" 2>&1 &
    vg=$!
    trap 'kill $vg 2>/dev/null || true' EXIT
    wait_for "http://127.0.0.1:$port/healthz"
    # Every node once, so the measured run is the steady state (cached scripts).
    python3 - "$port" "$work/bearman.lua" <<'EOF'
import http.client, re, sys
port, lua = int(sys.argv[1]), sys.argv[2]
uuids = re.findall(r'"([0-9a-f-]{36})"', open(lua).read())
conn = http.client.HTTPConnection("127.0.0.1", port)
for uuid in uuids:
    conn.request("GET", "/ipxe/" + uuid)
    response = conn.getresponse()
    response.read()
    assert response.status == 200, (uuid, response.status)
print(f"warmed {len(uuids)} nodes", file=sys.stderr)
EOF
    measure "$vg" "$work/bearman.lua" "$port" ipxe
    measure "$vg" /healthz "$port" healthz
    kill "$vg"
    wait "$vg" 2>/dev/null || true
    trap - EXIT
fi

if [[ $which == all || $which == nginx ]]; then
    conf=$out/nginx.conf
    # The benchmark's configuration, in one process so callgrind sees all the work.
    sed -e 's/^master_process on;/master_process off;/' \
        -e 's/^worker_processes auto;/worker_processes 1;/' \
        -e "s/listen [0-9.:]*;/listen 127.0.0.1:$port;/" \
        -e "s#pid .*;#pid $out/nginx.pid;#" \
        "$work/nginx/nginx.conf" >"$conf"
    valgrind --tool=callgrind --compress-strings=no --compress-pos=no --callgrind-out-file="$out/nginx.out" \
        /usr/sbin/nginx -c "$conf" -p "$work/nginx" >"$out/nginx.log" 2>&1 &
    vg=$!
    trap 'kill $vg 2>/dev/null || true' EXIT
    path=$(grep -o '"/ipxe/[^"]*"' "$work/nginx.lua" | tr -d '"')
    wait_for "http://127.0.0.1:$port$path"
    measure "$vg" "$work/nginx.lua" "$port" nginx
    kill "$vg"
    wait "$vg" 2>/dev/null || true
    trap - EXIT
fi
