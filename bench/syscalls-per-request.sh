#!/bin/bash
# bench/syscalls-per-request.sh (root; nginx-light, wrk and bpftrace installed, e.g. by
# `cargo xtask bench nginx`): syscalls per request of nginx + wrk under the load of
# `cargo xtask bench nginx` (one worker, `return 200`, `wrk -t1 -c32 -H 'Connection: close'`), in a
# namespace of its own, removed on exit. Times the slow path per syscall measured by
# `cargo xtask bench syscalls` gives what the syscall tracepoints alone cost a request.
set -eu
NS=stb-scnt-$$
D=$(mktemp -d)
NG=
BT=
cleanup() {
    [ -n "$BT" ] && kill -INT "$BT" 2>/dev/null || true
    [ -n "$NG" ] && kill "$NG" 2>/dev/null || true
    sleep 0.5
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
cat > "$D/nginx.conf" <<CONF
worker_processes 1;
daemon off;
master_process on;
pid $D/nginx.pid;
error_log $D/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $D/body; proxy_temp_path $D/proxy; fastcgi_temp_path $D/fastcgi;
  server { listen 127.0.0.1:20080 backlog=4096; location / { return 200 "ok\n"; } }
}
CONF
ip netns exec "$NS" nginx -p "$D" -c "$D/nginx.conf" &
NG=$!
sleep 1
# Warm-up, not counted.
ip netns exec "$NS" wrk -t1 -c32 -d1s -H 'Connection: close' http://127.0.0.1:20080/ >/dev/null
bpftrace -e 'tracepoint:raw_syscalls:sys_enter /comm == "nginx" || comm == "wrk"/ { @[comm] = count(); }' > "$D/bt.txt" 2>&1 &
BT=$!
sleep 3
ip netns exec "$NS" wrk -t1 -c32 -d5s -H 'Connection: close' http://127.0.0.1:20080/ > "$D/wrk.txt"
kill -INT "$BT"
wait "$BT" || true
BT=
requests=$(awk '/requests in/ {print $1}' "$D/wrk.txt")
awk -v r="$requests" '/^@\[/ { gsub(/[@\[\]:]/, "", $1); n[$1] = $2; t += $2 }
    END { printf "%d requests; per request: nginx %.1f, wrk %.1f, together %.1f syscalls\n", r, n["nginx"] / r, n["wrk"] / r, t / r }' "$D/bt.txt"
