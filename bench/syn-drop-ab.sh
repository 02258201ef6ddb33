#!/bin/bash
# bench/syn-drop-ab.sh (root, from the repository root; OLD=path of the socktrace binary to compare):
# A/B of the cgroup_skb SYN-drop programs, old binary vs this build, under the same `st-bench storm`,
# alternating 3 times. Turns kernel.bpf_stats_enabled on for the run (machine-wide) and restores it.
# Prints per program of the watch process: runs per connection, ns per run, ns per connection.
set -u
NEW=${NEW:-target/release/socktrace}
OLD=${OLD:?set OLD to the socktrace binary to compare with}
BENCH=${BENCH:-target/release/st-bench}
NS=st-ab-$$
ip netns add $NS; ip -n $NS link set lo up
prev=$(cat /proc/sys/kernel/bpf_stats_enabled); echo 1 > /proc/sys/kernel/bpf_stats_enabled
INO=$(stat -L -c %i /run/netns/$NS)
for rep in 1 2 3; do for which in OLD NEW; do
  bin=${!which}
  $bin watch --json --netns $INO > /dev/null 2>/tmp/ab-$$.err & pid=$!
  for i in $(seq 50); do grep -q "tracing started" /tmp/ab-$$.err && break; sleep 0.2; done
  out=$($BENCH storm --netns $NS --secs 4 --clients 4 --servers 2 --listeners 4)
  conns=$(echo "$out" | sed 's/.*"accepted":\([0-9]*\).*/\1/')
  for fd in /proc/$pid/fdinfo/*; do
    id=$(awk '/^prog_id:/{print $2}' $fd); [ -z "$id" ] && continue
    name=$(bpftool prog show id $id --json 2>/dev/null | sed 's/.*"name":"\([^"]*\)".*/\1/')
    case $name in syn_*) awk -v n=$name -v w=$which -v r=$rep -v c=$conns '/run_time_ns/{t=$2}/run_cnt/{k=$2} END{printf "%s rep%d %-24s runs/conn %.2f ns/run %d ns/conn %d (conns %d)\n", w, r, n, k/c, (k?t/k:0), t/c, c}' $fd;; esac
  done
  kill -INT $pid; wait $pid 2>/dev/null
done; done
echo $prev > /proc/sys/kernel/bpf_stats_enabled
ip netns del $NS
rm -f /tmp/ab-$$.err
