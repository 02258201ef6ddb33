//! Privileged end-to-end tests: the real `socktrace` binary against the real kernel, each scenario
//! in its own network namespace, asserted against ground truth — the namespace's own TcpExt/Tcp
//! counters and what the scenario's server and clients measured. Run with `--test-threads=1`
//! (kernel state is shared); `SOCKTRACE_REQUIRE_BPF=1` turns a skip into a failure.

use std::{collections::HashMap, path::Path, process::Command, time::Duration};

use serde_json::Value;
use socktrace_tests::{
    Cgroup, NetNs, Scenario, Serve, Socktrace, Watch, assert_expected_hooks, http_get, monotonic_ns, of_kind, privileged,
    probes, recursion_misses, socktrace_bin, time_scale,
};

/// Expected hooks (`signal=hook,…`) of tests on the suite's hooks and of the fallback-hooks test;
/// the defaults are this project's CI machine (see `cargo xtask test --vm` for other kernels).
const EXPECT_HOOKS: (&str, &str) = ("SOCKTRACE_EXPECT_HOOKS", "listen_overflow=tp_btf");
const EXPECT_FALLBACK_HOOKS: (&str, &str) = ("SOCKTRACE_EXPECT_FALLBACK_HOOKS", "listen_overflow=raw_tp");

const SCENARIO: &str = env!("CARGO_BIN_EXE_st-scenario");

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

fn done(lines: &[Value]) -> &Value {
    lines.iter().find(|l| l["event"] == "done").expect("scenario printed no summary")
}

/// Every event's `hook` must be the hook `probes` reports for its signal: a silent fallback fails.
fn assert_hooks(records: &[Value], hooks: &HashMap<String, Option<String>>) {
    for r in records {
        let kind = r["kind"].as_str().unwrap_or("");
        if kind == "lost" {
            continue;
        }
        let expected = hooks.get(kind).cloned().flatten().unwrap_or_else(|| panic!("no hook for {kind}"));
        let got = r["hook"].as_str().unwrap_or("");
        // Entry + exit pairs are named after the entry hook; the exit program may emit.
        let ok = got == expected || (expected == "kprobe" && got == "kretprobe") || (expected == "fentry" && got == "fexit");
        assert!(ok, "{kind} event came from {got}, probes says {expected}: {r}");
    }
}

/// One accept event per accepted connection, and the queue wait eBPF measured (its start → accept
/// return) within 2 ms of what the scenario measured (client's connect() return → server's
/// accept() return, same clock).
#[test]
fn accept_wait_matches_server_measurement() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("lat").unwrap();
    let hooks = probes(&[]).unwrap();
    assert_expected_hooks(&hooks, EXPECT_HOOKS.0, "");
    let watch = Watch::start(&["--netns", &ns.inode().to_string(), "--port", "9101"]).unwrap();
    let server = Scenario::start(
        Path::new(SCENARIO),
        &s(&["server", "--netns", &ns.name, "--addr", "127.0.0.1:9101", "--backlog", "128", "--accept-after-ms", "300", "--accept-delay-ms", "10", "--max-accepts", "40", "--run-ms", "20000"]),
    )
    .unwrap();
    let clients = Scenario::start(
        Path::new(SCENARIO),
        &s(&["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9101", "--count", "40", "--hold-ms", "1500"]),
    )
    .unwrap();
    let server_pid = server.pid();
    let client_lines = clients.wait(Duration::from_secs(60)).unwrap();
    let server_lines = server.wait(Duration::from_secs(60)).unwrap();
    let records = watch.finish().unwrap();
    assert_hooks(&records, &hooks);

    // Per client port: when connect() was called and when it returned. The connection entered the
    // accept queue in between (on loopback the handshake completes inside connect()).
    let connected: HashMap<u64, (u64, u64)> = client_lines
        .iter()
        .filter(|l| l["event"] == "connect" && l["ok"] == true)
        .map(|l| (l["lport"].as_u64().unwrap(), (l["started_ns"].as_u64().unwrap(), l["connected_ns"].as_u64().unwrap())))
        .collect();
    let accepted: HashMap<u64, u64> = server_lines
        .iter()
        .filter(|l| l["event"] == "accept")
        .map(|l| (l["rport"].as_u64().unwrap(), l["ts_ns"].as_u64().unwrap()))
        .collect();
    assert_eq!(done(&server_lines)["accepted"], 40);
    let accepts = of_kind(&records, "accept");
    assert_eq!(accepts.len(), accepted.len(), "one accept event per accepted connection");
    let mut worst = 0i64;
    for ev in &accepts {
        let rport = ev["rport"].as_u64().unwrap();
        let server_ts = i64::try_from(accepted[&rport]).unwrap();
        let (started, connected) = connected[&rport];
        // What the scenario measured: accept() return minus connect() return. A client thread
        // preempted right after its handshake makes that an underestimate by the preemption, so
        // the bound is widened by exactly the time connect() itself took (microseconds unless the
        // machine is loaded).
        let measured = server_ts - i64::try_from(connected).unwrap();
        let slack = i64::try_from(connected - started).unwrap();
        let traced = i64::try_from(ev["accept_wait_ns"].as_u64().expect("accept_wait_ns known")).unwrap();
        // Below: the child joins the queue when the server processes the handshake's last ACK,
        // which on loopback is usually inside connect() but can come later when that softirq work
        // is deferred to a busy CPU (seen: 2.7 ms under the `--stress` hog): the traced wait then
        // starts after connect() returned, and is shorter than what the scenario can see.
        let (off, allowed) = if traced < measured { (measured - traced, 5_000_000) } else { ((traced - measured - slack).max(0), 2_000_000) };
        worst = worst.max(off);
        assert!(off < allowed * time_scale(), "port {rport}: traced wait {traced} ns vs measured {measured} ns (connect took {slack} ns)");
        assert_eq!(ev["pid"].as_u64(), Some(u64::from(server_pid)));
        assert_eq!(ev["comm"], "st-scenario");
        assert_eq!(ev["queue_max"], 128);
        assert_eq!(ev["lport"], 9101);
        assert_eq!(ev["laddr"], "127.0.0.1");
    }
    // The server waited 300 ms before its first accept: the waits must show it.
    let max_wait = accepts.iter().filter_map(|e| e["accept_wait_ns"].as_u64()).max().unwrap();
    assert!(max_wait > 300_000_000, "longest wait {max_wait} ns");
    eprintln!("accept waits: {} connections, worst |traced - measured| = {worst} ns", accepts.len());
}

/// What `overflow_scenario` returns.
type OverflowRun = (Vec<Value>, i64, Value, HashMap<String, Option<String>>, String, i64);

/// Runs the slow-listener scenario (backlog 4, 50 clients, accepts start late and slowly) and
/// returns (events, TcpExtListenOverflows delta, server summary, probes, diagnostics, runs of the drop
/// programs the kernel skipped).
fn overflow_scenario(tag: &str, hook_args: &[&str]) -> OverflowRun {
    let ns = NetNs::new(tag).unwrap();
    let cg = Cgroup::new(tag).unwrap();
    let cg_path = cg.path.to_string_lossy().into_owned();
    let mut probe_args = hook_args.to_vec();
    probe_args.extend(["--cgroup", &cg_path]);
    let hooks = probes(&probe_args).unwrap();
    let inode = ns.inode().to_string();
    let mut args = vec!["--netns", inode.as_str(), "--cgroup", &cg_path];
    args.extend_from_slice(hook_args);
    let watch = Watch::start(&args).unwrap();
    let before = ns.counters().unwrap();
    let server = Scenario::start(
        Path::new(SCENARIO),
        &s(&["server", "--netns", &ns.name, "--cgroup", &cg_path, "--addr", "127.0.0.1:9200", "--backlog", "4", "--accept-after-ms", "500", "--accept-delay-ms", "20", "--max-accepts", "50", "--run-ms", "15000"]),
    )
    .unwrap();
    let clients = Scenario::start(
        Path::new(SCENARIO),
        &s(&["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9200", "--count", "50", "--hold-ms", "12000"]),
    )
    .unwrap();
    let server_lines = server.wait(Duration::from_secs(60)).unwrap();
    let after = ns.counters().unwrap();
    // Runs of the drop programs the kernel skipped (see check_overflow), read while they are loaded.
    let missed = recursion_misses(watch.pid(), &["syn_drop_", "syn_settle_", "overflow"]).unwrap();
    let missed_all = recursion_misses(watch.pid(), &[""]).unwrap();
    let counted = socktrace_tests::kernel_counts_recursion_misses(watch.pid());
    drop(clients);
    let (records, stderr) = watch.finish_with_stderr().unwrap();
    // watch says how many runs of all its programs the kernel skipped (bpftool's count before it
    // stopped, or more: the clients' close still ran programs), or "unknown" where the kernel
    // does not count them (before 5.12).
    let said = stderr
        .iter()
        .find_map(|l| l.split(", ").find_map(|part| part.strip_suffix(" program runs missed (another BPF program was running on that CPU)")))
        .and_then(|n| n.parse::<i64>().ok());
    if counted {
        assert!(said.is_some_and(|n| n >= missed_all), "watch's exit summary must count skipped program runs (bpftool: {missed_all}): {stderr:?}");
    } else {
        assert!(
            said.is_none() && stderr.iter().any(|l| l.contains("program runs missed: unknown (the kernel does not count them)")),
            "no recursion_misses in this kernel's fdinfo: the count must read unknown, not 0: {stderr:?}"
        );
    }
    // On kprobe hooks watch's count also holds the runs the kprobe layer skipped before any
    // program ran (a kprobe hit inside another's handler, e.g. a softirq drop inside the accept
    // kretprobe; Linux 6.7+ reports them per link, bpftool 7.1 does not show them): what it says
    // beyond bpftool's recursion misses. Those are mostly the softirq-side drop hooks.
    let kprobe_layer = if hooks.values().any(|h| h.as_deref() == Some("kprobe")) { said.map_or(0, |n| (n - missed_all).max(0)) } else { 0 };
    let missed = missed + kprobe_layer;
    let delta = after.delta(&before, "TcpExtListenOverflows");
    let diag = format!(
        "kprobe-layer misses {kprobe_layer}; cookies recv {}, SYN retrans {}, ListenDrops {}; socktrace: {}",
        after.delta(&before, "TcpExtSyncookiesRecv"),
        after.delta(&before, "TcpExtTCPSynRetrans"),
        after.delta(&before, "TcpExtListenDrops"),
        stderr.last().cloned().unwrap_or_default()
    );
    (records, delta, done(&server_lines).clone(), hooks, diag, missed)
}

/// listen_overflow + syn_drop events against the netns's TcpExtListenOverflows delta, and one
/// accept event per connection the server accepted.
fn check_overflow(tag: &str, hook_args: &[&str], expect: (&str, &str)) {
    let (records, delta, summary, hooks, diag, missed) = overflow_scenario(tag, hook_args);
    assert_hooks(&records, &hooks);
    assert_expected_hooks(&hooks, expect.0, expect.1);
    let overflows = of_kind(&records, "listen_overflow").len() as i64;
    let syn_drops = of_kind(&records, "syn_drop").len() as i64;
    let accepts = of_kind(&records, "accept").len() as u64;
    eprintln!(
        "{tag}: TcpExtListenOverflows delta {delta}; events: listen_overflow {overflows} ({}), syn_drop {syn_drops} ({}); accepts {accepts}; program runs skipped by the kernel (recursion) {missed}; {diag}; lost records {}",
        hooks["listen_overflow"].as_deref().unwrap_or("-"),
        hooks["syn_drop"].as_deref().unwrap_or("-"),
        of_kind(&records, "lost").len(),
    );
    assert!(delta >= 10, "the scenario must overflow the queue (delta {delta})");
    assert!(syn_drops > 0 && overflows > 0, "both drop points must be exercised");
    let total = overflows + syn_drops;
    // The cgroup_skb fallback is exact too: each SYN is confirmed by the kernel's own counter when
    // its skb is freed (syn_drop.rs); it used to check the queue itself and was off by up to 4.8 %.
    if [&hooks["syn_drop"], &hooks["listen_overflow"]].iter().any(|h| h.as_deref() == Some("kprobe")) {
        // kprobe (like classic tracepoint) programs share one per-CPU guard, bpf_prog_active: a
        // SYN or ACK handled in a softirq that interrupts any such program running in process
        // context (accept's kretprobe) is skipped. Kernels since 6.7 count the skip in the
        // program's recursion_misses; 6.1 does not. A second guard sits before it: a kprobe hit
        // while another kprobe's handler runs on that CPU is not handled at all (the probe's
        // nmissed; 6.7+ reports it per link, and watch adds it to its count). Those are known
        // only summed over every kprobe, the drop hooks' among them, so the count may fall short
        // by at most the skips (drop programs' recursion misses + every kprobe-layer miss) plus
        // the bound for skips no kernel shows, and never exceed the kernel's. 6.12 in the qemu
        // matrix (2026-12-05): 168 counted of 173 with 0 recursion misses and 12 kprobe-layer
        // misses; 7 short of 116 with 0 recursion misses (CI, 2026-12-04) before those were
        // counted. In the qemu matrix:
        // one drop short (114 of 115) in 1 of 24 kprobe runs, on 6.1, none on fentry (12 runs) —
        // this guard is the suspected cause, not proven. Since listener-side programs also read the
        // socket's inode (longer runs, a wider window for the guard): 5 short of 116 (4.3 %) in 1 of 3
        // full matrix runs on 5.10 under TCG; 17 of 120 once on 6.1 (`kprobe_shortfall_allowed`).
        let bound = socktrace_tests::kprobe_shortfall_allowed(delta);
        assert!(total <= delta && delta - total <= missed + bound, "overflow+syn_drop {total}, {missed} runs skipped, vs kernel {delta} (bound: skipped + {bound})");
    } else if hooks["syn_drop"].as_deref() == Some("cgroup_skb") {
        socktrace_tests::assert_drops_near("overflow+syn_drop (+ skipped runs), cgroup_skb SYN hook", total + missed, delta);
    } else {
        assert_eq!(total + missed, delta, "primary hooks must match the kernel exactly");
    }
    assert_eq!(accepts, summary["accepted"].as_u64().unwrap(), "one accept event per accepted connection");
    for ev in of_kind(&records, "syn_drop").iter().chain(of_kind(&records, "listen_overflow").iter()) {
        assert_eq!(ev["lport"], 9200);
        assert_eq!(ev["laddr"], "127.0.0.1");
        if let Some(q) = ev["queue_len"].as_u64() {
            assert!(q > ev["queue_max"].as_u64().unwrap(), "a drop needs a full queue: {ev}");
        }
    }
}

#[test]
fn slow_listener_overflows_match_kernel_counter() {
    if privileged() {
        check_overflow("ovf", &[], EXPECT_HOOKS);
    }
}

/// Same scenario on the fallback hooks (raw tracepoints): they must give the same answer.
#[test]
fn slow_listener_overflows_on_raw_tracepoints() {
    if privileged() {
        // `--wait-start enqueue`: the enqueue program (raw_tp here) instead of the accepted socket's stamp.
        check_overflow("ovfraw", &["--hooks", "raw_tp,tracepoint,cgroup_skb,kprobe,fentry,fexit", "--wait-start", "enqueue"], EXPECT_FALLBACK_HOOKS);
    }
}

/// A healthy listener: everything accepted promptly, no drops seen by either side.
#[test]
fn healthy_listener_has_no_drops() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("ok").unwrap();
    let watch = Watch::start(&["--netns", &ns.inode().to_string()]).unwrap();
    let before = ns.counters().unwrap();
    let server = Scenario::start(
        Path::new(SCENARIO),
        &s(&["server", "--netns", &ns.name, "--addr", "127.0.0.1:9150", "--backlog", "128", "--max-accepts", "30", "--run-ms", "20000"]),
    )
    .unwrap();
    let clients = Scenario::start(
        Path::new(SCENARIO),
        &s(&["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9150", "--count", "30", "--hold-ms", "300"]),
    )
    .unwrap();
    clients.wait(Duration::from_secs(60)).unwrap();
    let server_lines = server.wait(Duration::from_secs(60)).unwrap();
    let after = ns.counters().unwrap();
    let records = watch.finish().unwrap();
    assert_eq!(after.delta(&before, "TcpExtListenOverflows"), 0);
    assert_eq!(of_kind(&records, "listen_overflow").len(), 0);
    assert_eq!(of_kind(&records, "syn_drop").len(), 0);
    assert_eq!(of_kind(&records, "accept").len(), 30);
    assert_eq!(done(&server_lines)["accepted"], 30);
    for ev in of_kind(&records, "accept") {
        assert!(ev["accept_wait_ns"].as_u64().unwrap() < 100_000_000, "healthy wait: {ev}");
    }
}

/// Loss injected with nftables on the netns's INPUT hook: retransmit events (segments) equal the
/// netns's TcpRetransSegs delta minus SYN-ACK retransmits (and minus the program runs the kernel
/// reports it skipped).
#[test]
fn retransmits_match_kernel_counter() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("loss").unwrap();
    let rules = "table inet socktrace_loss {\n chain input {\n  type filter hook input priority 0; policy accept;\n  tcp dport 9300 meta length > 120 numgen random mod 100 < 10 drop\n }\n}\n";
    let file = std::env::temp_dir().join(format!("socktrace-loss-{}.nft", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    ns.exec(&["nft", "-f", &file.to_string_lossy()]).unwrap();
    let _ = std::fs::remove_file(&file);
    let hooks = probes(&[]).unwrap();
    assert_expected_hooks(&hooks, EXPECT_HOOKS.0, "");
    let watch = Watch::start(&["--netns", &ns.inode().to_string()]).unwrap();
    let before = ns.counters().unwrap();
    let server = Scenario::start(
        Path::new(SCENARIO),
        &s(&["server", "--netns", &ns.name, "--addr", "127.0.0.1:9300", "--backlog", "128", "--max-accepts", "10", "--run-ms", "30000", "--drain"]),
    )
    .unwrap();
    let clients = Scenario::start(
        Path::new(SCENARIO),
        &s(&["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9300", "--count", "10", "--send-chunks", "150", "--chunk-bytes", "200", "--hold-ms", "1500"]),
    )
    .unwrap();
    clients.wait(Duration::from_secs(90)).unwrap();
    server.wait(Duration::from_secs(90)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after = ns.counters().unwrap();
    // A retransmit whose tracepoint fired while the program was already running on that CPU is
    // skipped by the kernel (counted, never run): each such miss is one segment short.
    let missed = recursion_misses(watch.pid(), &["retransmit_", "synack_"]).unwrap();
    let (records, stderr) = watch.finish_with_stderr().unwrap();
    assert_hooks(&records, &hooks);
    let retrans = of_kind(&records, "retransmit");
    let segs: i64 = retrans.iter().map(|r| r["segs"].as_i64().unwrap_or(1)).sum();
    let synack = of_kind(&records, "synack_retransmit").len() as i64;
    let delta = after.delta(&before, "TcpRetransSegs");
    eprintln!(
        "TcpRetransSegs delta {delta}; retransmit events {} ({segs} segments); synack_retransmit {synack}; program runs skipped by the kernel (recursion) {missed}; TCPRetransFail {}, TCPLossProbes {}; lost records {}; {}",
        retrans.len(),
        after.delta(&before, "TcpExtTCPRetransFail"),
        after.delta(&before, "TcpExtTCPLossProbes"),
        of_kind(&records, "lost").len(),
        stderr.last().cloned().unwrap_or_default()
    );
    assert!(delta > 20, "loss must cause retransmits (delta {delta})");
    // Retransmits that did not leave the host (tracepoint `err != 0`) are not events, but the kernel
    // may have counted them (TcpRetransSegs is incremented before the send).
    let summary = stderr.iter().rev().find(|l| l.contains("retransmits not sent")).expect("watch's exit summary");
    let head = &summary[..summary.find(" retransmits not sent").unwrap_or(0)];
    let unsent: i64 = head.rsplit(' ').next().and_then(|n| n.parse().ok()).expect("unsent count in the exit summary");
    let want = delta - synack;
    let seen = segs + missed;
    // Measured on the 6.18 host (tp_btf): in 2 of ~35 runs one segment short (98 vs 97, 85 vs 84)
    // with no ring-buffer loss, read error, recursion miss or unsent retransmit; the cause is not
    // found. Bound for that: 2 %, at least 1, never more events than the kernel counted.
    let bound = (want * 2 / 100).max(1);
    assert!(seen <= want + unsent && want - seen <= bound + unsent, "segments {segs} + skipped runs {missed} vs TcpRetransSegs - SYN-ACK {want} (unsent {unsent}, bound {bound})");
    assert_eq!(retrans.len() as i64, segs, "one event per retransmitted segment");
    for r in retrans {
        assert!(r["lport"] == 9300 || r["rport"] == 9300, "retransmit on the test connection: {r}");
    }
}

fn one_line_error(cmd: &mut Command, expect_code: i32, needle: &str) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(expect_code), "{cmd:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{cmd:?}: not one line: {stderr:?}");
    assert!(stderr.contains(needle), "{cmd:?}: {stderr:?} lacks {needle:?}");
    assert!(out.stdout.is_empty(), "{cmd:?} printed to stdout");
}

#[test]
fn bad_input_gives_one_line_error() {
    let bin = socktrace_bin();
    one_line_error(Command::new(&bin).args(["watch", "--bogus"]), 2, "--bogus");
    one_line_error(Command::new(&bin).args(["watch", "--port", "70000"]), 2, "70000");
    one_line_error(Command::new(&bin).args(["watch", "--port", "http"]), 2, "http");
    one_line_error(Command::new(&bin).args(["watch", "--duration", "soon"]), 2, "soon");
    one_line_error(Command::new(&bin).args(["watch", "--hooks", "uprobe"]), 2, "uprobe");
    one_line_error(Command::new(&bin).args(["frobnicate"]), 2, "frobnicate");
    if !privileged() {
        return;
    }
    one_line_error(Command::new(&bin).args(["watch", "--btf", "/nonexistent/vmlinux"]), 1, "/nonexistent/vmlinux");
    one_line_error(Command::new(&bin).args(["watch", "--netns", "/nonexistent/ns"]), 1, "/nonexistent/ns");
    one_line_error(Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&bin).arg("watch"), 1, "root");
}

/// `watch` ends cleanly on SIGINT and leaves no program attached.
#[test]
fn watch_detaches_on_sigint() {
    if !privileged() {
        return;
    }
    // Only this watch's own programs (the prog ids behind its fds), so that other tracers running
    // on the machine cannot disturb the count.
    let w = Watch::start(&[]).unwrap();
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{}/fdinfo", w.pid())).unwrap().flatten() {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        ids.extend(info.lines().filter_map(|l| l.strip_prefix("prog_id:")).filter_map(|v| v.trim().parse::<u32>().ok()));
    }
    ids.sort_unstable();
    ids.dedup();
    let loaded = |id: u32| Command::new("bpftool").args(["prog", "show", "id", &id.to_string()]).output().is_ok_and(|o| o.status.success());
    assert!(ids.len() >= 3 && ids.iter().all(|&id| loaded(id)), "programs loaded while tracing: {ids:?}");
    let t0 = monotonic_ns();
    w.finish().unwrap();
    assert!(monotonic_ns() - t0 < 10_000_000_000);
    let left: Vec<u32> = ids.into_iter().filter(|&id| loaded(id)).collect();
    assert!(left.is_empty(), "programs left behind after exit: {left:?}");
}

/// The same checks over IPv6 loopback: addresses, the cgroup_skb IPv6 path and the SYN-cookie
/// path's packet parsing.
#[test]
fn ipv6_listener_accepts_and_overflows() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("v6").unwrap();
    let cg = Cgroup::new("v6").unwrap();
    let cg_path = cg.path.to_string_lossy().into_owned();
    let hooks = probes(&["--cgroup", &cg_path]).unwrap();
    let inode = ns.inode().to_string();
    let watch = Watch::start(&["--netns", &inode, "--cgroup", &cg_path, "--port", "9700"]).unwrap();
    let before = ns.counters().unwrap();
    let server = Scenario::start(
        Path::new(SCENARIO),
        &s(&["server", "--netns", &ns.name, "--cgroup", &cg_path, "--addr", "[::1]:9700", "--backlog", "4", "--accept-after-ms", "400", "--accept-delay-ms", "20", "--max-accepts", "30", "--run-ms", "12000"]),
    )
    .unwrap();
    let clients = Scenario::start(
        Path::new(SCENARIO),
        &s(&["clients", "--netns", &ns.name, "--addr", "[::1]:9700", "--count", "30", "--hold-ms", "9000"]),
    )
    .unwrap();
    let summary = server.wait(Duration::from_secs(60)).unwrap();
    let after = ns.counters().unwrap();
    drop(clients);
    let records = watch.finish().unwrap();
    assert_hooks(&records, &hooks);
    let delta = after.delta(&before, "TcpExtListenOverflows");
    let drops = (of_kind(&records, "listen_overflow").len() + of_kind(&records, "syn_drop").len()) as i64;
    eprintln!("v6: TcpExtListenOverflows delta {delta}, drop events {drops}");
    assert!(delta > 0, "the scenario must overflow");
    if hooks["syn_drop"].as_deref() == Some("cgroup_skb") {
        // This kernel's hooks: see `drop_shortfall_allowed` (a few 3rd-ACK overflows unseen).
        socktrace_tests::assert_drops_near("v6 drop events vs the kernel's TcpExtListenOverflows", drops, delta);
    } else {
        assert_eq!(drops, delta, "drop events vs the kernel's TcpExtListenOverflows (syn_drop on {:?})", hooks["syn_drop"]);
    }
    let accepts = of_kind(&records, "accept");
    assert_eq!(accepts.len() as u64, done(&summary)["accepted"].as_u64().unwrap());
    for r in records.iter().filter(|r| r["kind"] != "lost") {
        assert_eq!(r["family"], "ipv6", "{r}");
        assert_eq!(r["laddr"], "::1", "{r}");
        // Client-side SYN retransmits have the listener as their remote end.
        assert!(r["lport"] == 9700 || (r["kind"] == "retransmit" && r["rport"] == 9700), "{r}");
        if r["kind"] != "listen" {
            assert_eq!(r["raddr"], "::1", "{r}");
        }
    }
    assert!(accepts.iter().all(|a| a["accept_wait_ns"].as_u64().is_some()), "waits known");
}

/// A kernel without usable BTF: tracing commands fail with one line naming what is missing and how
/// to supply `--btf`; with `--btf` naming a copy of the BTF they work; `snapshot` needs none.
/// "No BTF" is simulated three ways: a missing file, a truncated copy, and the kernel's own
/// `/sys/kernel/btf` hidden under an empty tmpfs in a private mount namespace (`unshare -m`), as on a
/// kernel built without `CONFIG_DEBUG_INFO_BTF`.
#[test]
fn missing_kernel_btf_is_one_line_with_hint() {
    if !privileged() {
        return;
    }
    let bin = socktrace_bin();
    let sys_btf = Path::new("/sys/kernel/btf/vmlinux");
    let full = std::fs::read(sys_btf).expect("this test needs the kernel's BTF to copy");
    let dir = std::env::temp_dir().join(format!("socktrace-btf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("vmlinux.btf");
    std::fs::write(&copy, &full).unwrap();
    let truncated = dir.join("truncated.btf");
    std::fs::write(&truncated, &full[..full.len() / 3]).unwrap();
    let (copy_s, trunc_s) = (copy.to_string_lossy().into_owned(), truncated.to_string_lossy().into_owned());

    one_line_error(Command::new(&bin).args(["probes", "--btf", "/nonexistent/vmlinux"]), 1, "no kernel BTF at /nonexistent/vmlinux");
    one_line_error(Command::new(&bin).args(["watch", "--btf", "/nonexistent/vmlinux"]), 1, "pass --btf FILE");
    one_line_error(Command::new(&bin).args(["watch", "--btf", &trunc_s]), 1, "truncated");
    one_line_error(Command::new(&bin).args(["top", "--once", "--btf", &trunc_s]), 1, "pass --btf FILE");

    // Hidden: the same commands in a mount namespace where /sys/kernel/btf is an empty tmpfs.
    let hidden = |args: &[&str]| {
        let mut c = Command::new("unshare");
        c.args(["-m", "sh", "-c", r#"mount -t tmpfs socktrace-nobtf /sys/kernel/btf && exec "$@""#, "sh"]).arg(&bin).args(args);
        c
    };
    one_line_error(&mut hidden(&["probes"]), 1, "no kernel BTF at /sys/kernel/btf/vmlinux");
    one_line_error(&mut hidden(&["diagnose", "--duration", "1s"]), 1, "pass --btf FILE");
    let with_copy = hidden(&["probes", "--json", "--btf", &copy_s]).output().unwrap();
    assert!(with_copy.status.success(), "probes --btf COPY with /sys/kernel/btf hidden: {}", String::from_utf8_lossy(&with_copy.stderr));
    let normal = Command::new(&bin).args(["probes", "--json"]).output().unwrap();
    let hooks = |out: &[u8]| -> Vec<(String, Option<String>)> {
        let v: Value = serde_json::from_slice(out).unwrap();
        v.as_array().unwrap().iter().map(|s| (s["signal"].as_str().unwrap().to_owned(), s["hook"].as_str().map(str::to_owned))).collect()
    };
    assert_eq!(hooks(&with_copy.stdout), hooks(&normal.stdout), "--btf COPY must pick the same hooks as the kernel's own BTF");
    let snap = hidden(&["snapshot", "-l", "--no-processes", "--json"]).output().unwrap();
    assert!(snap.status.success(), "snapshot without BTF: {}", String::from_utf8_lossy(&snap.stderr));
    assert!(serde_json::from_slice::<Value>(&snap.stdout).unwrap().is_array());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A signal with no hook (here `syn_drop`: `--hooks` without fentry, kprobe and `cgroup_skb`; on
/// kernels without the overflow drop reason `listen_overflow` too) is `null` in `top --json` and
/// absent from `/metrics`, never 0; the traced ones are numbers.
#[test]
fn untraced_signals_are_unavailable_not_zero() {
    if !privileged() {
        return;
    }
    let limited = ["--hooks", "tp_btf,raw_tp,tracepoint"];
    let hooks = probes(&limited).unwrap();
    assert_eq!(hooks["syn_drop"], None, "syn_drop needs fentry, kprobe or cgroup_skb: {hooks:?}");
    let ns = NetNs::new("untr").unwrap();
    let inode = ns.inode().to_string();
    let mut serve_args = vec!["--netns", inode.as_str()];
    serve_args.extend(limited);
    let serve = Serve::start(19470, &serve_args).unwrap();
    // top last: its intervals must cover the scenario that follows.
    let mut args = vec!["top", "--json", "--interval", "1s", "--iterations", "6", "--netns", &inode];
    args.extend(limited);
    let top = Socktrace::start(&args, "tracing started").unwrap();
    let server = Scenario::start(
        Path::new(SCENARIO),
        &s(&["server", "--netns", &ns.name, "--addr", "127.0.0.1:9250", "--backlog", "2", "--accept-after-ms", "400", "--max-accepts", "10", "--run-ms", "4000"]),
    )
    .unwrap();
    let clients = Scenario::start(Path::new(SCENARIO), &s(&["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9250", "--count", "10", "--hold-ms", "200"])).unwrap();
    clients.wait(Duration::from_mins(1)).unwrap();
    let (code, metrics) = http_get(&serve.addr, "/metrics", Duration::from_secs(10 * time_scale().unsigned_abs())).unwrap();
    let lines = top.wait(Duration::from_mins(1)).unwrap();
    drop(server);
    let traced = |signal: &str| hooks[signal].is_some();
    let fields = [
        ("accepts", "accept"),
        ("overflows", "listen_overflow"),
        ("overflows_total", "listen_overflow"),
        ("syn_drops", "syn_drop"),
        ("syn_drops_total", "syn_drop"),
        ("synack_retransmits", "synack_retransmit"),
        ("retransmits", "retransmit"),
    ];
    let mut rows = 0;
    for v in lines.iter().map(|l| serde_json::from_str::<Value>(l).unwrap()) {
        let untraced: Vec<&str> = v["untraced"].as_array().expect("untraced list").iter().filter_map(Value::as_str).collect();
        for (_, signal) in fields {
            assert_eq!(untraced.contains(&signal), !traced(signal), "untraced {untraced:?} vs probes {hooks:?}");
        }
        for r in v["listeners"].as_array().unwrap().iter().filter(|r| r["lport"] == 9250) {
            rows += 1;
            for (field, signal) in fields {
                assert_eq!(r[field].is_u64(), traced(signal), "{field} ({signal} {:?}): {r}", hooks[signal]);
                assert_eq!(r[field].is_null(), !traced(signal), "{field}: {r}");
            }
        }
    }
    assert!(rows > 0, "top showed no row for the listener");
    assert_eq!(code, 200);
    assert!(metrics.contains(r#"socktrace_probe_info{signal="syn_drop",hook="unavailable"} 0"#), "{metrics}");
    assert!(metrics.contains("socktrace_accepts_total{"), "the listener's traced counters are exported: {metrics}");
    for absent in ["socktrace_syn_drops_total{", "socktrace_listen_overflows_total{"] {
        assert!(!metrics.contains(absent), "{absent} exported although syn_drop is untraced: {metrics}");
    }
}

/// `snapshot` on this kernel: both families from one sock_diag dump (`TCPDIAG_GETSOCK`), and each
/// socket's owner from the task-file iterator (whichever of its two programs this verifier
/// loads), equal to what the /proc scan finds. Run by the qemu matrix on every kernel.
#[test]
fn snapshot_lists_both_families_with_iterator_owners() {
    use std::{
        net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
        os::fd::AsRawFd as _,
    };
    if !privileged() {
        return;
    }
    let ns = NetNs::new("snapown").unwrap();
    let held = ns
        .within(|| {
            let mut held = Vec::new();
            for addr in [SocketAddr::from((Ipv4Addr::LOCALHOST, 42001)), SocketAddr::from((Ipv6Addr::LOCALHOST, 42002))] {
                let l = TcpListener::bind(addr).unwrap();
                let c = TcpStream::connect(addr).unwrap();
                let (s, _) = l.accept().unwrap();
                held.push((l, c, s));
            }
            held
        })
        .unwrap();
    let me = u64::from(std::process::id());
    let owners = |source: &str| -> Vec<(String, u64, Vec<(u64, u64)>)> {
        let out = Command::new(socktrace_bin()).args(["snapshot", "--netns", &ns.name, "--json", "--owners", source]).output().unwrap();
        assert!(out.status.success(), "--owners {source}: {}", String::from_utf8_lossy(&out.stderr));
        let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut got: Vec<_> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let procs = r["processes"].as_array().unwrap().iter().map(|p| (p["pid"].as_u64().unwrap(), p["fd"].as_u64().unwrap())).collect();
                (format!("{} {}:{}", r["state"], r["laddr"], r["lport"]), r["rport"].as_u64().unwrap_or(0), procs)
            })
            .collect();
        got.sort();
        got
    };
    let bpf = owners("bpf");
    // Per family: the listener, the client and the accepted socket, each held by this process.
    assert_eq!(bpf.len(), 6, "{bpf:?}");
    let mut fds: Vec<(u64, u64)> = held.iter().flat_map(|(l, c, s)| [l.as_raw_fd(), c.as_raw_fd(), s.as_raw_fd()]).map(|fd| (me, fd as u64)).collect();
    fds.sort_unstable();
    let mut seen: Vec<(u64, u64)> = bpf.iter().flat_map(|(_, _, p)| p.clone()).collect();
    seen.sort_unstable();
    assert_eq!(seen, fds, "every socket with its owning descriptor: {bpf:?}");
    assert!(bpf.iter().any(|(k, _, _)| k.contains("::1")) && bpf.iter().any(|(k, _, _)| k.contains("127.0.0.1")), "{bpf:?}");
    assert_eq!(bpf, owners("proc"), "the iterator and the /proc scan agree");
    drop(held);
}
