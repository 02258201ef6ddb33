//! `--accept-hooks`: the mode without syscall tracepoints. Attaching any program to a syscall
//! tracepoint puts every syscall of every task on the kernel's tracing slow path, so `off` must
//! attach none (checked in the kernel's view of the tracer's BPF links, /proc/PID/fdinfo), count
//! listen overflows and SYN drops exactly as the default mode does (ground truth: the namespace's
//! TcpExtListenOverflows), count accepts by deriving them from the children queued
//! (`sk_data_ready` on the listener) and the queue length (ground truth: what the server accepted,
//! including connections queued before tracing started), and show what it cannot know — accept
//! wait, acceptors, the listen(2) backlog request — as unavailable in every view, never as 0. Run
//! as root with `--test-threads=1`; each scenario in its own network namespace and cgroup.

use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;
use socktrace_tests::{Cgroup, NetNs, Scenario, Serve, Socktrace, Watch, http_get, of_kind, privileged, probes, recursion_misses, time_scale};

const SCENARIO: &str = env!("CARGO_BIN_EXE_st-scenario");

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

/// Tracepoints process `pid` has BPF programs attached to, by name, from the kernel's own view
/// of its file descriptors: a BPF link to a tracepoint shows `tp_name:` in /proc/PID/fdinfo (a
/// raw_tracepoint link for tp_btf/raw_tp; a perf-event link for classic tracepoints on recent
/// kernels). `bpftool perf show` adds programs attached to a perf event fd the process still
/// holds (older kernels, where aya attaches with an ioctl instead of a link); it misses links
/// whose perf event fd was closed, hence both.
fn tracepoints_of(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo").flatten() {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        if let Some(tp) = info.lines().find_map(|l| l.strip_prefix("tp_name:")) {
            out.push(tp.trim().to_owned());
        }
    }
    let perf = Command::new("bpftool").args(["perf", "show", "--json"]).output().expect("bpftool perf show");
    let v: Value = serde_json::from_slice(&perf.stdout).unwrap_or(Value::Null);
    for p in v.as_array().into_iter().flatten().filter(|p| p["pid"].as_u64() == Some(u64::from(pid))) {
        if let Some(tp) = p["tracepoint"].as_str().filter(|tp| !out.iter().any(|o| o == tp)) {
            out.push(tp.to_owned());
        }
    }
    out
}

/// Whether the running kernel has the `sock:sk_data_ready` tracepoint (Linux 6.6+) that derived
/// accepts need: its BTF has the tracepoint's `btf_trace_sk_data_ready` type.
fn kernel_has_sk_data_ready() -> bool {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").unwrap_or_default();
    btf.windows(b"btf_trace_sk_data_ready".len()).any(|w| w == b"btf_trace_sk_data_ready")
}

fn syscall_tracepoints_of(pid: u32) -> Vec<String> {
    tracepoints_of(pid).into_iter().filter(|t| t.starts_with("sys_enter_") || t.starts_with("sys_exit_")).collect()
}

/// The default mode attaches listen's syscall tracepoint (and accept's where the kernel has neither
/// fexit nor kprobes); `--accept-hooks off` attaches no syscall tracepoint at all, while its other
/// tracepoint programs are attached and visible in the same list.
#[test]
fn accept_hooks_off_attaches_no_syscall_tracepoint() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("mode0").unwrap();
    let inode = ns.inode().to_string();
    let hooks = probes(&[]).unwrap();
    let default = Watch::start(&["--netns", &inode]).unwrap();
    let with = syscall_tracepoints_of(default.pid());
    drop(default.finish().unwrap());
    assert!(with.iter().any(|t| t == "sys_enter_listen"), "default mode traces listen(2) on its syscall tracepoint: {with:?}");
    if hooks["accept"].as_deref() == Some("tracepoint") {
        // The exit tracepoints always; the entry ones where the listening fd cannot be read from
        // the saved registers (probes says which).
        let out = Command::new(socktrace_tests::socktrace_bin()).args(["probes", "--json"]).args(socktrace_tests::suite_hooks(&[])).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let accept = v.as_array().unwrap().iter().find(|s| s["signal"] == "accept").unwrap().clone();
        let attached: Vec<String> = accept["attached"].as_array().unwrap().iter().filter_map(|a| a.as_str()?.rsplit('/').next().map(str::to_owned)).collect();
        for tp in ["sys_exit_accept4", "sys_exit_accept"] {
            assert!(attached.iter().any(|a| a == tp), "probes: accept is not on {tp}: {attached:?}");
        }
        for tp in &attached {
            assert!(with.iter().any(|t| t == tp), "{tp} missing from the default mode's attachments {with:?}");
        }
    }

    let off = Watch::start(&["--netns", &inode, "--accept-hooks", "off"]).unwrap();
    let without = syscall_tracepoints_of(off.pid());
    let others = tracepoints_of(off.pid());
    let (_, stderr) = off.finish_with_stderr().unwrap();
    assert!(without.is_empty(), "--accept-hooks off attached syscall tracepoints: {without:?}");
    assert!(others.iter().any(|t| t == "inet_sock_set_state" || t == "kfree_skb"), "fdinfo shows none of the off mode's tracepoint programs ({others:?}): the check would pass blindly");
    let started = stderr.iter().find(|l| l.contains("tracing started")).cloned().unwrap_or_default();
    assert!(started.contains("accept=UNAVAILABLE") && started.contains("accept_hooks=off"), "{started}");

    let off_hooks = probes(&["--accept-hooks", "off"]).unwrap();
    for signal in ["accept", "accept_wait", "listen"] {
        assert_eq!(off_hooks[signal], None, "{signal} must have no hook with --accept-hooks off: {off_hooks:?}");
    }
    assert_eq!(off_hooks["accept_count"].is_some(), kernel_has_sk_data_ready(), "--accept-hooks off counts queued children where the kernel has sk_data_ready: {off_hooks:?}");
    assert_eq!(hooks["accept_count"], None, "the default mode traces accepts per call: {hooks:?}");
    for signal in ["listen_overflow", "syn_drop", "retransmit", "synack_retransmit"] {
        assert_eq!(off_hooks[signal], hooks[signal], "{signal}: --accept-hooks off must not change its hook");
    }
    let text = Command::new(socktrace_tests::socktrace_bin()).args(["probes", "--accept-hooks", "off"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("accept hooks: off (--accept-hooks off): no syscall tracepoint attached"), "{text}");
    assert!(text.contains("accept             UNAVAILABLE disabled by --accept-hooks off"), "{text}");
}

/// Values of `name{…}` series of `/metrics` text whose labels include `netns="NS"`.
fn series(metrics: &str, name: &str, netns: &str) -> Vec<f64> {
    let label = format!("netns=\"{netns}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// The slow-listener scenario (backlog 4, 50 clients, accepts start late and slowly) traced by
/// `watch`, `top`, `serve` and `diagnose`, all with `--accept-hooks off`: the drop counts match the
/// kernel's counter with the same tolerance as the default mode's test
/// (`slow_listener_overflows_match_kernel_counter`); accepts (derived) equal what the server
/// accepted in `top`, `serve` and `diagnose`; accept wait and acceptors are null / absent
/// everywhere, and `watch` has no accept event.
#[test]
fn accept_hooks_off_counts_drops_and_shows_accepts_unavailable() {
    if !privileged() {
        return;
    }
    let tag = "modeoff";
    let ns = NetNs::new(tag).unwrap();
    let cg = Cgroup::new(tag).unwrap();
    let cg_path = cg.path.to_string_lossy().into_owned();
    let inode = ns.inode().to_string();
    let trace = ["--netns", inode.as_str(), "--cgroup", cg_path.as_str(), "--accept-hooks", "off"];
    let hooks = probes(&trace[2..]).unwrap();
    // Derived accepts need sk_data_ready (6.6+); before, accepts are unavailable like the wait.
    let derived = hooks["accept_count"].is_some();
    assert_eq!(derived, kernel_has_sk_data_ready(), "{hooks:?}");
    let watch = Watch::start(&trace).unwrap();
    let serve = Serve::start(19481, &trace).unwrap();
    // Starting four tracers takes long on an emulated kernel (the qemu matrix): windows scale.
    let scale = time_scale().unsigned_abs();
    let window = format!("{}s", 12 * scale);
    let iterations = (7 * scale).to_string();
    let mut args = vec!["diagnose", "--json", "--duration", &window, "--port", "9210"];
    args.extend(trace);
    let diagnose = Socktrace::start(&args, "observing for").unwrap();
    let mut args = vec!["top", "--json", "--interval", "2s", "--iterations", &iterations];
    args.extend(trace);
    let top = Socktrace::start(&args, "tracing started").unwrap();
    let before = ns.counters().unwrap();
    let server = Scenario::start(
        Path::new(SCENARIO),
        &s(&["server", "--netns", &ns.name, "--cgroup", &cg_path, "--addr", "127.0.0.1:9210", "--backlog", "4", "--accept-after-ms", "500", "--accept-delay-ms", "20", "--max-accepts", "50", "--run-ms", "9000"]),
    )
    .unwrap();
    let clients = Scenario::start(
        Path::new(SCENARIO),
        &s(&["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9210", "--count", "50", "--hold-ms", "7000"]),
    )
    .unwrap();
    let server_lines = server.wait(Duration::from_secs(60)).unwrap();
    let after = ns.counters().unwrap();
    let missed = recursion_misses(watch.pid(), &["syn_drop_", "overflow"]).unwrap();
    drop(clients);
    let scrape = Duration::from_secs(10 * time_scale().unsigned_abs());
    let (code, metrics) = http_get(&serve.addr, "/metrics", scrape).unwrap();
    let records = watch.finish().unwrap();
    let top_lines = top.wait(Duration::from_mins(1)).unwrap();
    let diag_lines = diagnose.wait(Duration::from_mins(1)).unwrap();
    let delta = after.delta(&before, "TcpExtListenOverflows");
    let accepted = server_lines.iter().find(|l| l["event"] == "done").and_then(|l| l["accepted"].as_u64()).unwrap_or(0);
    let overflows = of_kind(&records, "listen_overflow").len() as i64;
    let syn_drops = of_kind(&records, "syn_drop").len() as i64;
    eprintln!("{tag}: TcpExtListenOverflows delta {delta}; watch: listen_overflow {overflows}, syn_drop {syn_drops}, skipped {missed}; server accepted {accepted}");
    assert!(delta >= 10, "the scenario must overflow the queue (delta {delta})");
    assert!(accepted > 0, "the server must accept connections (that nobody may count here)");

    // Drops exactly as the default mode counts them (bound: see check_overflow in privileged.rs).
    // `missed`: runs the kernel skipped (recursion) of watch's programs; the other tracers' own
    // programs may skip others, so for them only the kprobe bound applies.
    let within = |total: i64, what: &str, missed: i64| {
        if hooks["syn_drop"].as_deref() == Some("cgroup_skb") && what == "watch" {
            socktrace_tests::assert_drops_near(what, total + missed, delta);
        } else if [&hooks["syn_drop"], &hooks["listen_overflow"]].iter().any(|h| h.as_deref() == Some("kprobe")) {
            let bound = socktrace_tests::kprobe_shortfall_allowed(delta);
            assert!(total + missed <= delta && delta - total - missed <= bound, "{what}: {total} + {missed} skipped vs kernel {delta} (bound {bound})");
        } else if what == "watch" {
            assert_eq!(total + missed, delta, "{what}: primary hooks must match the kernel exactly");
        } else {
            assert!(total <= delta && delta - total <= (delta * 6 / 100).max(3), "{what}: primary hooks, {total} vs kernel {delta}");
        }
    };
    assert!(overflows > 0 && syn_drops > 0, "both drop points must be exercised");
    within(overflows + syn_drops, "watch", missed);
    assert!(of_kind(&records, "accept").is_empty(), "no accept event without an accept hook");
    assert!(of_kind(&records, "listen").is_empty(), "no listen event without a listen hook");

    // top: accepts, wait and acceptors null; drops counted; the mode and the missing signals named.
    let tops: Vec<Value> = top_lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut drop_total = 0;
    let (mut top_accepts, mut sock_accepts) = (0, 0);
    for v in &tops {
        assert_eq!(v["accept_hooks"], "off", "{v}");
        let untraced: Vec<&str> = v["untraced"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        for signal in ["accept_wait", "listen"] {
            assert!(untraced.contains(&signal), "{signal} not listed as untraced: {untraced:?}");
        }
        assert_eq!(untraced.contains(&"accept"), !derived, "accept listed as untraced exactly when not derived: {untraced:?}");
        for r in v["listeners"].as_array().unwrap().iter().filter(|r| r["lport"] == 9210) {
            for field in ["accept_wait_p50_ns", "accept_wait_p99_ns", "accept_wait_max_ns", "last_acceptor"] {
                assert!(r[field].is_null(), "{field} must be null: {r}");
            }
            assert_eq!(r["accepts"].is_null(), !derived, "accepts null exactly when not derived: {r}");
            top_accepts += r["accepts"].as_u64().unwrap_or(0);
            for sock in r["sockets"].as_array().unwrap() {
                assert!(sock["acceptors"].is_null(), "socket acceptors must be null: {sock}");
                assert_eq!(sock["accepts_total"].is_null(), !derived, "{sock}");
                sock_accepts = sock_accepts.max(sock["accepts_total"].as_u64().unwrap_or(0));
            }
            let total = r["overflows_total"].as_i64().unwrap() + r["syn_drops_total"].as_i64().unwrap();
            drop_total = drop_total.max(total);
        }
    }
    within(drop_total, "top", 0);
    if derived {
        assert_eq!(top_accepts, accepted, "top's derived accepts over its intervals vs the server's");
        assert_eq!(sock_accepts, accepted, "top's per-socket derived accepts vs the server's");
    }

    // serve: derived accepts, no wait series, drops as counted by the kernel.
    assert_eq!(code, 200);
    for absent in ["socktrace_accept_wait_seconds_count", "socktrace_accept_wait_seconds_bucket"] {
        assert!(series(&metrics, absent, &inode).is_empty(), "{absent} exported although accept wait is untraced: {metrics}");
    }
    assert!(metrics.contains(r#"socktrace_probe_info{signal="accept",hook="unavailable"} 0"#), "{metrics}");
    let served_accepts = series(&metrics, "socktrace_accepts_total", &inode);
    if derived {
        assert_eq!(served_accepts.iter().sum::<f64>() as u64, accepted, "serve's derived accepts vs the server's: {metrics}");
    } else {
        assert!(served_accepts.is_empty(), "accepts exported although untraced: {metrics}");
    }
    let served: f64 = series(&metrics, "socktrace_listen_overflows_total", &inode).iter().sum();
    within(served as i64, "serve", 0);

    // diagnose: derived accepts in the window, and a verdict on the overflowing queue.
    let d: Value = serde_json::from_str(diag_lines.last().expect("diagnose printed nothing")).unwrap();
    assert_eq!(d["accept_hooks"], "off");
    let l = d["listeners"].as_array().unwrap().iter().find(|l| l["lport"] == 9210).unwrap_or_else(|| panic!("no report for 9210: {d}"));
    assert_eq!(l["window_counts"]["accepts"].as_u64(), derived.then_some(accepted), "{l}");
    assert_ne!(l["verdict"], "healthy", "the queue overflowed: {l}");
    if !derived {
        assert_ne!(l["verdict"], "accept_stall", "a stall cannot be judged without accepts: {l}");
        assert!(l.to_string().contains("accept is not traced (--accept-hooks off)"), "{l}");
        assert!(!l.to_string().contains(" accepts/s"), "an accept rate is claimed: {l}");
    }
    assert_eq!(l["episodes"].as_array().map(Vec::len), Some(0), "derived accepts have no times: no episodes: {l}");
    let counted: i64 = ["overflows", "syn_drops"].iter().map(|k| l["window_counts"][*k].as_i64().unwrap_or(0)).sum();
    assert!(counted > 0, "diagnose counted no drop: {l}");
}

/// Attached mid-flight: `--accept-hooks off` started while connections already wait in the queue
/// of a server that has not begun to accept, then more clients come. Derived accepts must count
/// the ones queued before tracing began (from the queue length at start) and the later ones:
/// exactly what the server accepted. Numbers vary per run.
#[test]
fn accept_hooks_off_derives_accepts_queued_before_tracing() {
    if !privileged() || !kernel_has_sk_data_ready() {
        return;
    }
    let tag = "modemid";
    let ns = NetNs::new(tag).unwrap();
    let cg = Cgroup::new(tag).unwrap();
    let cg_path = cg.path.to_string_lossy().into_owned();
    let inode = ns.inode().to_string();
    let pid = std::process::id();
    let (early, late) = (8 + pid % 13, 5 + (pid / 13) % 11);
    let port = 9300 + u16::try_from(pid % 200).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let backlog = (early + late + 8).to_string();
    let total = (early + late).to_string();
    let scale = time_scale().unsigned_abs();
    let after_ms = (3000 * scale).to_string();
    let server = Scenario::start(
        Path::new(SCENARIO),
        &s(&["server", "--netns", &ns.name, "--cgroup", &cg_path, "--addr", &addr, "--backlog", &backlog, "--accept-after-ms", &after_ms, "--accept-delay-ms", "15", "--max-accepts", &total, "--run-ms", &(9000 * scale).to_string()]),
    )
    .unwrap();
    let clients = Scenario::start(Path::new(SCENARIO), &s(&["clients", "--netns", &ns.name, "--addr", &addr, "--count", &early.to_string(), "--hold-ms", "8000"])).unwrap();
    // Every early client waits in the queue before tracing starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while socktrace_tests::servers::listen_queue(&ns, port).unwrap().first().map(|q| q.0) != Some(early) {
        assert!(std::time::Instant::now() < deadline, "the early clients never filled the queue: {:?}", socktrace_tests::servers::listen_queue(&ns, port));
        std::thread::sleep(Duration::from_millis(50));
    }
    let iterations = (8 * scale).to_string();
    let args = ["top", "--json", "--interval", "1s", "--iterations", &iterations, "--netns", &inode, "--cgroup", &cg_path, "--accept-hooks", "off"];
    let top = Socktrace::start(&args, "tracing started").unwrap();
    let more = Scenario::start(Path::new(SCENARIO), &s(&["clients", "--netns", &ns.name, "--addr", &addr, "--count", &late.to_string(), "--hold-ms", "6000"])).unwrap();
    let server_lines = server.wait(Duration::from_secs(60)).unwrap();
    let top_lines = top.wait(Duration::from_mins(1)).unwrap();
    drop((clients, more));
    let accepted = server_lines.iter().find(|l| l["event"] == "done").and_then(|l| l["accepted"].as_u64()).unwrap_or(0);
    assert_eq!(accepted, u64::from(early + late), "the server must accept every client");
    let mut derived = 0;
    for line in &top_lines {
        let v: Value = serde_json::from_str(line).unwrap();
        for r in v["listeners"].as_array().unwrap().iter().filter(|r| r["lport"] == port) {
            derived += r["accepts"].as_u64().unwrap_or_else(|| panic!("derived accepts missing: {r}"));
            assert!(r["last_acceptor"].is_null() && r["accept_wait_p99_ns"].is_null(), "{r}");
        }
    }
    eprintln!("{tag}: {early} queued before tracing + {late} after; server accepted {accepted}; top derived {derived}");
    assert_eq!(derived, accepted, "derived accepts ({early} queued before top started, {late} after) vs the server's");
}
