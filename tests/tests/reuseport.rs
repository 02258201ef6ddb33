//! `SO_REUSEPORT` groups (issue 11): a port with several LISTEN sockets, each with its own accept
//! queue, backlog and worker. Real nginx (`listen … reuseport`, one socket per worker) with one
//! worker stopped, the same group healthy, and `st-reuseport` (tests/src/bin) closing and reopening
//! one socket. As in the field trials, the server and its load start first and socktrace attaches
//! after; each scenario has its own network namespace and cgroup.
//!
//! Ground truth that does not come from socktrace: the inodes `ss -tlne` reports for the port,
//! which socket each nginx worker polls (its epoll fdinfo), the namespace's `TcpExt` counters,
//! nginx's `stub_status` accept count and st-reuseport's own accept count per socket.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    time::Duration,
};

use serde_json::Value;
use socktrace_tests::{
    Cgroup, NetNs, Proc, ReadyOn, Serve,
    diag::{Diagnose, all_evidence, assert_drops_match, drops_in, evidence, fix, number_before, summary, verdicts},
    http_get, monotonic_ns, privileged,
    reuseport::{ReuseportServer, epoll_watched, label, samples, socket_inodes, socket_of, ss_listen_inodes, top_rows},
    servers::{Nginx, NginxConfig, wrk},
    socktrace_bin, suite_hooks, time_scale,
};

const SCENARIO: &str = env!("CARGO_BIN_EXE_st-scenario");
const REUSEPORT: &str = env!("CARGO_BIN_EXE_st-reuseport");

/// Time the traffic stops before a diagnose window ends (see field.rs).
const QUIET: Duration = Duration::from_millis(600);

fn scen(args: &[&str]) -> socktrace_tests::Scenario {
    socktrace_tests::Scenario::start(Path::new(SCENARIO), &args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
}

/// `top --json --interval 1s` on one port of `ns`, scoped to `cg`, stopped by SIGINT.
fn start_top(ns: &NetNs, cg: &Cgroup, port: u16) -> Proc {
    let (inode, port, cgp) = (ns.inode().to_string(), port.to_string(), cg.path.to_string_lossy().into_owned());
    let args = suite_hooks(&["top", "--json", "--interval", "1s", "--netns", &inode, "--port", &port, "--cgroup", &cgp]);
    Proc::start(Command::new(socktrace_bin()).args(args), "tracing started", ReadyOn::Stderr).unwrap()
}

fn stop_top(mut top: Proc) -> Vec<String> {
    top.signal(libc::SIGINT);
    top.wait(Duration::from_secs(20)).unwrap();
    top.stdout_lines()
}

/// nginx with `workers` workers and `listen 127.0.0.1:PORT backlog=B reuseport` in a new
/// namespace and cgroup, and the inodes of its LISTEN sockets (`ss`): one per worker.
fn nginx_group(tag: &str, port: u16, backlog: u32, workers: u32) -> (NetNs, Cgroup, Nginx, BTreeSet<u32>) {
    let ns = NetNs::new(tag).unwrap();
    let cg = Cgroup::new(tag).unwrap();
    let nginx = Nginx::start(&ns, Some(&cg), &NginxConfig { addr: "127.0.0.1", port, backlog, workers, reuseport: true, big_bytes: 0 }).unwrap();
    let inodes = ss_listen_inodes(&ns, port).unwrap();
    assert_eq!(inodes.len(), workers as usize, "one LISTEN socket per worker: {inodes:?}");
    (ns, cg, nginx, inodes)
}

/// Which worker polls which socket: inode → worker pid, from each worker's epoll registrations.
fn worker_sockets(nginx: &Nginx, inodes: &BTreeSet<u32>) -> BTreeMap<u32, u32> {
    let mut owner = BTreeMap::new();
    for w in nginx.workers() {
        let watched = epoll_watched(w, inodes).unwrap();
        assert_eq!(watched.len(), 1, "nginx worker {w} with reuseport polls one socket of {inodes:?}, it polls {watched:?}");
        let ino = *watched.first().unwrap();
        assert!(owner.insert(ino, w).is_none(), "two workers poll socket {ino}");
    }
    owner
}

fn u32_of(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|x| u32::try_from(x).ok())
}

/// nginx, 3 workers, `reuseport backlog=12`, wrk (a connection per request) plus steady arrivals;
/// `top` and `diagnose` attach; 2 s into the window one worker is stopped. The verdict is an accept
/// stall on that worker's socket (the inode `ss` reports and the worker's epoll polls), the other
/// two drain, the drops are the kernel's, and `top` shows the stalled socket full at its own
/// backlog of 12 (not 36).
#[test]
fn nginx_reuseport_stopped_worker_is_accept_stall_on_its_socket() {
    if !privileged() {
        return;
    }
    let (port, backlog) = (8461u16, 12u32);
    let (ns, cg, nginx, inodes) = nginx_group("rstall", port, backlog, 3);
    let owner = worker_sockets(&nginx, &inodes);
    // wrk keeps 6 connections busy (fewer than one backlog even if they all hashed to one socket,
    // so a slow but running worker never overflows); the arrivals keep every socket supplied.
    let load = wrk(&ns, &format!("http://127.0.0.1:{port}/"), 1, 6, 30, true).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let arrivals = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--rate", "60", "--duration-ms", "30000", "--hold-ms", "20", "--connect-timeout-ms", "3000"]);
    std::thread::sleep(Duration::from_millis(1200));
    let top = start_top(&ns, &cg, port);
    let d = Diagnose::start(&ns, &cg, port, 7, true).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (&victim_ino, &victim) = owner.iter().nth(1).unwrap();
    nginx.signal(victim, libc::SIGSTOP);
    let stopped_ns = monotonic_ns();
    d.sleep_until_end_minus(QUIET);
    drop((arrivals, load));
    let quiet_ns = monotonic_ns();
    let o = d.finish().unwrap();
    let top_lines = stop_top(top);
    nginx.signal(victim, libc::SIGCONT);
    drop(nginx);

    let l = o.listener(ns.inode(), port);
    let ev_all = all_evidence(&l);
    let (inner, outer) = o.delta("TcpExtListenOverflows");
    let top_lost = top_lines.iter().filter_map(|x| serde_json::from_str::<Value>(x).ok()?["lost"].as_u64()).max();
    summary(
        "nginx_reuseport_stopped_worker",
        &l,
        &format!(
            "sockets (inode → worker) {owner:?}, stopped {victim} (inode {victim_ino}); evidence drops {:?} vs kernel ListenOverflows (ready, spawn) ({inner}, {outer}); window accepts {}; events lost by the concurrent top {top_lost:?}",
            ev_all.contains("SYN drops").then(|| drops_in(&ev_all)),
            l["window_counts"]["accepts"],
        ),
    );
    assert!(inner > 0, "the stopped worker's queue must overflow");
    assert_eq!(l["verdict"], "accept_stall", "{l}");
    let ev = evidence(&l, "accept_stall");
    assert_drops_match(&ev, &o);
    // The stalled socket is the stopped worker's, with its own backlog, and only that one.
    let stalled = ev.lines().find(|x| x.starts_with("stalled socket inode")).unwrap_or_else(|| panic!("no stalled socket named: {ev}"));
    assert!(stalled.starts_with(&format!("stalled socket inode {victim_ino} (127.0.0.1:{port}, backlog {backlog} of its own)")), "{stalled}");
    assert!(stalled.contains(&format!("last accepted by nginx pid {victim} thread {victim}")), "{stalled}");
    assert_eq!(ev.lines().filter(|x| x.starts_with("stalled socket inode")).count(), 1, "{ev}");
    // "…, N s before the window ended": the worker's last accept was when it was stopped.
    let ago: f64 = stalled.rsplit_once(", ").and_then(|(_, t)| t.strip_suffix(" s before the window ended")?.parse().ok()).unwrap_or_else(|| panic!("{stalled}"));
    let expected = Duration::from_nanos(o.end_ns.saturating_sub(stopped_ns)).as_secs_f64();
    let tol = 0.6 * f64::from(u32::try_from(time_scale()).unwrap_or(1));
    assert!(ago >= expected - tol && ago <= expected + tol, "last accept {ago} s before the end; the worker was stopped {expected:.2} s before the nominal end: {stalled}");
    let own_drops = number_before(stalled, "drops,");
    assert!(own_drops > 0 && own_drops <= drops_in(&ev), "the stalled socket's drops ({own_drops}) are the port's ({}) or fewer (SYN-cookie overflows count on the port only): {ev}", drops_in(&ev));
    // The other two sockets drained, each of them.
    let draining = ev.lines().find(|x| x.starts_with("the other 2 of the 3 sockets on this port kept draining")).unwrap_or_else(|| panic!("{ev}"));
    for ino in inodes.iter().filter(|&&i| i != victim_ino) {
        let accepts = number_after(draining, &format!("inode {ino}:"));
        assert!(accepts > 0, "socket {ino} (worker {}) must keep accepting: {draining}", owner[ino]);
    }
    for x in socktrace_tests::diag::finding(&l, "accept_stall")["evidence"].as_array().into_iter().flatten() {
        assert!(!x.as_str().unwrap_or("").starts_with("stall ") || x.as_str().unwrap_or("").contains(&format!("on socket inode {victim_ino}")), "episode on another socket: {x}");
    }
    for e in l["episodes"].as_array().into_iter().flatten() {
        assert_eq!(u32_of(&e["socket"]), Some(victim_ino), "episode {e}");
    }
    let first_fix = fix(&l, "accept_stall").lines().next().unwrap_or("").to_owned();
    assert!(first_fix.starts_with(&format!("worker nginx pid {victim} (thread {victim}) stopped accepting from socket inode {victim_ino}")), "{first_fix}");
    assert!(!verdicts(&l).iter().any(|v| v == "backlog_too_small") || finding_severity(&l, "backlog_too_small") == "low", "{l}");

    // top: before the stop each socket is accepted from by the worker polling it (and only it);
    // once the queue filled, the stopped worker's socket is full at its own backlog.
    let rows = top_rows(&top_lines, ns.inode(), port);
    assert!(!rows.is_empty(), "top printed no row for the port: {top_lines:?}");
    let mut seen_acceptors = BTreeSet::new();
    for (_, row) in &rows {
        assert_eq!(socket_inodes(row), inodes, "top's sockets are those ss lists: {row}");
        for s in row["sockets"].as_array().into_iter().flatten() {
            let ino = u32_of(&s["inode"]).unwrap();
            for a in s["acceptors"].as_array().into_iter().flatten() {
                assert_eq!(u32_of(&a["pid"]), Some(owner[&ino]), "socket {ino} is polled by worker {}, top names {a}", owner[&ino]);
                seen_acceptors.insert(ino);
            }
        }
    }
    assert!(seen_acceptors.contains(&victim_ino), "top never named the stopped worker as its socket's acceptor: {rows:?}");
    let full: Vec<&Value> = rows.iter().filter(|(ts, _)| *ts >= stopped_ns + 2_500_000_000 && *ts <= quiet_ns).map(|(_, r)| r).collect();
    assert!(!full.is_empty(), "no top interval between 1.5 s after the stop and the end of the traffic: {:?}", rows.iter().map(|r| r.0).collect::<Vec<_>>());
    for row in full {
        eprintln!("top row after the stop: {row}");
        assert_eq!(u32_of(&row["queue_max"]), Some(backlog), "the port's backlog is its fullest socket's, never the sum: {row}");
        let s = socket_of(row, victim_ino).unwrap();
        assert_eq!(s["saturated"], true, "{s}");
        assert_eq!(u32_of(&s["queue_max"]), Some(backlog), "{s}");
        assert!(u32_of(&s["queue_len"]).is_some_and(|q| q >= backlog), "{s}");
        assert_eq!(s["accepts"], 0, "{s}");
        // Its worker's last accept was before the stop (the signal may land while one accept
        // completes: 50 ms of slack); the other workers accepted after it.
        let last_ns = |s: &Value| s["acceptors"].as_array().and_then(|a| a.iter().filter_map(|x| x["last_accept_ns"].as_u64()).max());
        assert!(last_ns(s).is_some_and(|t| t <= stopped_ns + 50_000_000), "the stopped worker accepted after the stop: {s}");
        for ino in inodes.iter().filter(|&&i| i != victim_ino) {
            let s = socket_of(row, *ino).unwrap();
            assert!(s["accepts"].as_u64().unwrap_or(0) > 0 && s["saturated"] == false, "socket {ino} keeps draining: {s}");
            assert!(last_ns(s).is_some_and(|t| t > stopped_ns), "{s}");
            assert_eq!(u32_of(&s["queue_max"]), Some(backlog), "{s}");
        }
    }
}

fn finding_severity(l: &Value, verdict: &str) -> String {
    socktrace_tests::diag::finding(l, verdict)["severity"].as_str().unwrap_or("").to_owned()
}

/// The first integer after `label` in `text`.
fn number_after(text: &str, label: &str) -> i64 {
    let at = text.find(label).unwrap_or_else(|| panic!("{label:?} not in {text}")) + label.len();
    let digits: String = text[at..].trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("no number after {label:?} in {text}"))
}

/// `/metrics` of a serve, with nginx's accept count read just before and just after it.
fn scrape_bracketed(serve: &Serve, nginx: &Nginx, ns: &NetNs) -> (u64, String, u64) {
    let before = nginx.accepts(ns, "127.0.0.1").unwrap();
    let (status, body) = http_get(&serve.addr, "/metrics", Duration::from_secs(5)).unwrap();
    assert_eq!(status, 200);
    let after = nginx.accepts(ns, "127.0.0.1").unwrap();
    (before, body, after)
}

fn sum(s: &[(String, f64)]) -> f64 {
    s.iter().map(|x| x.1).sum()
}

/// nginx, 4 workers, `reuseport backlog=20`, under wrk (a connection per request): diagnose says
/// healthy; in every `top` interval the sockets' accepts add up to the port's and every backlog is
/// 20; serve exports one series per socket (labels 0..3) whose accepts add up to the port's, which
/// match nginx's own count.
#[test]
fn nginx_reuseport_healthy_group_adds_up() {
    if !privileged() {
        return;
    }
    let (port, backlog) = (8462u16, 20u32);
    let (ns, cg, nginx, inodes) = nginx_group("rok", port, backlog, 4);
    let load = wrk(&ns, &format!("http://127.0.0.1:{port}/"), 1, 8, 30, true).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let top = start_top(&ns, &cg, port);
    let (nsi, cgp) = (ns.inode().to_string(), cg.path.to_string_lossy().into_owned());
    let serve = Serve::start(19481, &["--netns", &nsi, "--cgroup", &cgp]).unwrap();
    let d = Diagnose::start(&ns, &cg, port, 5, true).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let first = scrape_bracketed(&serve, &nginx, &ns);
    d.sleep_until_end_minus(QUIET);
    drop(load);
    std::thread::sleep(Duration::from_millis(300));
    let last = scrape_bracketed(&serve, &nginx, &ns);
    let o = d.finish().unwrap();
    let top_lines = stop_top(top);
    drop((serve, nginx));

    let l = o.listener(ns.inode(), port);
    let labels = [("netns", nsi.as_str()), ("lport", &port.to_string())];
    let sock = |m: &str| samples(m, "socktrace_socket_accepts_total", &labels);
    let port_acc = |m: &str| sum(&samples(m, "socktrace_accepts_total", &labels));
    let (s0, s1) = (sum(&sock(&first.1)), sum(&sock(&last.1)));
    let (p0, p1) = (port_acc(&first.1), port_acc(&last.1));
    summary(
        "nginx_reuseport_healthy",
        &l,
        &format!("serve: sockets' accepts {s0} → {s1}, port's {p0} → {p1}, nginx stub_status {first_b}..{first_a} → {last_b}..{last_a}", first_b = first.0, first_a = first.2, last_b = last.0, last_a = last.2),
    );
    assert_eq!(o.delta("TcpExtListenOverflows").1, 0, "healthy: the kernel dropped nothing");
    assert_eq!(l["verdict"], "healthy", "{l}");
    assert!(verdicts(&l).is_empty(), "{l}");

    let rows = top_rows(&top_lines, ns.inode(), port);
    assert!(rows.len() >= 3, "top rows: {top_lines:?}");
    for (_, row) in &rows {
        assert_eq!(socket_inodes(row), inodes, "{row}");
        let by_socket: u64 = row["sockets"].as_array().into_iter().flatten().filter_map(|s| s["accepts"].as_u64()).sum();
        // The port row and the socket rows are read one after the other while accepts go on: an
        // accept between the two reads lands in one interval's port count and the next one's socket
        // count (seen: 1 in 16536). The longer top is preempted between the reads, the more: 20 of
        // 2743 under the `--stress` hog at load scale 7; 7 of 16371 at ~16k accepts per interval
        // (a cheaper accept program, more accepts between the reads). So the bound grows with the
        // accepts: 3, or what arrives in about a millisecond of a one-second interval (1/1000).
        let port_accepts = row["accepts"].as_u64().unwrap_or(0);
        let bound = (3 + port_accepts / 1000) * time_scale().unsigned_abs();
        assert!(by_socket.abs_diff(port_accepts) <= bound, "the sockets' accepts add up to the port's (within {bound}): {by_socket} vs {port_accepts}: {row}");
        assert_eq!(u32_of(&row["queue_max"]), Some(backlog), "{row}");
        for s in row["sockets"].as_array().into_iter().flatten() {
            assert_eq!(u32_of(&s["queue_max"]), Some(backlog), "{s}");
            assert_eq!(s["overflows"], 0, "{s}");
        }
    }
    assert!(rows.iter().any(|(_, r)| r["accepts"].as_u64() > Some(100)), "the load must be real: {rows:?}");

    // serve: one series per socket, labels 0..3; their accepts add up to the port's.
    for m in [&first.1, &last.1] {
        let idx: BTreeSet<String> = sock(m).iter().filter_map(|(ls, _)| label(ls, "socket").map(str::to_owned)).collect();
        assert_eq!(idx, ["0", "1", "2", "3"].map(str::to_owned).into(), "socket labels: {:?}", sock(m));
        for (ls, v) in samples(m, "socktrace_socket_accept_queue_max", &labels) {
            assert!((v - f64::from(backlog)).abs() < 0.5, "{ls} {v}");
        }
        assert_eq!(samples(m, "socktrace_accept_queue_max", &labels).first().map(|x| x.1), Some(f64::from(backlog)), "the port's backlog is one socket's");
    }
    // Traffic had stopped before the last scrape: every accept since serve attached is in both.
    assert!((s1 - p1).abs() < 0.5, "sockets' accepts {s1}, port's {p1}");
    // While traffic ran, the two maps are read one after the other: an accept may fall between.
    assert!(((s1 - s0) - (p1 - p0)).abs() <= 2.0, "deltas: sockets {}, port {}", s1 - s0, p1 - p0);
    // nginx counted its accepts between the scrapes too (each stub_status request is one).
    let (lo, hi) = (last.0 - first.2, last.2 - first.0);
    let dp = p1 - p0;
    #[expect(clippy::cast_precision_loss, reason = "accept counts far below 2^52")]
    let (lo, hi) = (lo as f64, hi as f64);
    assert!(dp >= lo && dp <= hi, "serve counted {dp} accepts between the scrapes, nginx {lo}..{hi}");
}

/// `snapshot --json` LISTEN rows on `port` in `ns`: inode → `group_size`.
fn snapshot_groups(ns: &NetNs, port: u16) -> BTreeMap<u32, u64> {
    let out = Command::new(socktrace_bin()).args(["snapshot", "--json", "--netns", &ns.name]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["lport"] == port && r["state"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("listen")))
        .map(|r| (u32_of(&r["inode"]).unwrap(), r["group_size"].as_u64().unwrap_or(0)))
        .collect()
}

/// Per-socket accept series of one port: `socket` label → value.
fn socket_series(metrics: &str, ns: &NetNs, port: u16) -> BTreeMap<String, f64> {
    let (nsi, p) = (ns.inode().to_string(), port.to_string());
    samples(metrics, "socktrace_socket_accepts_total", &[("netns", &nsi), ("lport", &p)])
        .into_iter()
        .filter_map(|(ls, v)| Some((label(&ls, "socket")?.to_owned(), v)))
        .collect()
}

fn scrape(serve: &Serve) -> String {
    let (status, body) = http_get(&serve.addr, "/metrics", Duration::from_secs(5)).unwrap();
    assert_eq!(status, 200);
    body
}

/// st-reuseport with two `SO_REUSEPORT` sockets under steady arrivals; `top` and `serve` attach;
/// one socket is closed, and once socktrace has let it go a new one is opened in its place. The
/// identity follows the socket: the old inode leaves `top`'s sockets, the new one arrives counting
/// from its own zero (exactly the server's count for it), and serve's `socket` label of the old
/// one is given to the new one while the other keeps its label. `snapshot` marks the group.
#[test]
fn reuseport_socket_closed_and_reopened_keeps_its_own_identity() {
    if !privileged() {
        return;
    }
    let port = 8463u16;
    let ns = NetNs::new("rreopen").unwrap();
    let cg = Cgroup::new("rreopen").unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut server = ReuseportServer::start(Path::new(REUSEPORT), &ns, &cg, &addr, 2, 30).unwrap();
    let initial = server.initial_inodes().unwrap();
    let (old_ino, kept_ino) = (initial[0], initial[1]);
    assert_eq!(ss_listen_inodes(&ns, port).unwrap(), initial.iter().copied().collect(), "st-reuseport's inodes are those ss lists");
    let groups = snapshot_groups(&ns, port);
    assert_eq!(groups, initial.iter().map(|&i| (i, 2)).collect(), "snapshot: both sockets, each in a group of 2");
    let clients = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--rate", "80", "--duration-ms", "30000", "--hold-ms", "5", "--connect-timeout-ms", "3000"]);
    std::thread::sleep(Duration::from_millis(800));
    let top = start_top(&ns, &cg, port);
    let (nsi, cgp) = (ns.inode().to_string(), cg.path.to_string_lossy().into_owned());
    let serve = Serve::start(19482, &["--netns", &nsi, "--cgroup", &cgp]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let m0 = socket_series(&scrape(&serve), &ns, port);
    assert_eq!(m0.keys().map(String::as_str).collect::<Vec<_>>(), ["0", "1"], "{m0:?}");

    let closed = server.command("close 0", "closed").unwrap();
    let closed_ns = monotonic_ns();
    assert_eq!(u32_of(&closed["inode"]), Some(old_ino));
    // Right after the close socktrace still shows the closed socket for a moment (two scrapes):
    // its series stops counting while the kept one goes on, which tells the labels apart.
    let m_a = socket_series(&scrape(&serve), &ns, port);
    std::thread::sleep(Duration::from_millis(600));
    let m_b = socket_series(&scrape(&serve), &ns, port);
    assert_eq!(m_b.keys().map(String::as_str).collect::<Vec<_>>(), ["0", "1"], "the closed socket's series stay for two scrapes: {m_a:?} → {m_b:?}");
    let still: Vec<&String> = m_b.iter().filter(|(k, v)| m_a.get(*k) == Some(*v)).map(|(k, _)| k).collect();
    let moving: Vec<&String> = m_b.iter().filter(|(k, v)| m_a.get(*k).is_some_and(|a| *v > a)).map(|(k, _)| k).collect();
    assert!(still.len() == 1 && moving.len() == 1, "one series stops (the closed socket), one goes on: {m_a:?} → {m_b:?}");
    let (old_label, kept_label) = (still[0].clone(), moving[0].clone());
    // With one socket left the port keeps its per-socket series (it had several): the closed
    // socket's goes, the kept one's stays and goes on counting.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let m_one = loop {
        let m = socket_series(&scrape(&serve), &ns, port);
        if !m.contains_key(&old_label) {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "serve still exports the closed socket's series 15 s after the close: {m:?}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(m_one.keys().collect::<Vec<_>>(), [&kept_label], "only the kept socket's series while it is alone: {m_one:?}");
    assert!(m_one[&kept_label] >= m_b[&kept_label], "the kept socket's counter goes on: {m_b:?} → {m_one:?}");
    assert_eq!(snapshot_groups(&ns, port), [(kept_ino, 1)].into(), "snapshot: one socket left, a group of 1");
    let opened = server.command("open 0", "opened").unwrap();
    let opened_ns = monotonic_ns();
    let new_ino = u32_of(&opened["inode"]).unwrap();
    assert!(new_ino != old_ino, "a new socket, a new inode");
    assert_eq!(snapshot_groups(&ns, port), [(kept_ino, 2), (new_ino, 2)].into());
    std::thread::sleep(Duration::from_millis(2500));
    let b1 = server.accepts().unwrap();
    let m1 = socket_series(&scrape(&serve), &ns, port);
    let a1 = server.accepts().unwrap();
    drop(clients);
    std::thread::sleep(Duration::from_millis(2500));
    let fin = server.accepts().unwrap();
    let top_lines = stop_top(top);
    drop((serve, server));

    let count = |s: &[(u32, u64)], ino: u32| s.iter().find(|x| x.0 == ino).map_or(0, |x| x.1);
    eprintln!(
        "SUMMARY reuseport_reopen: old {old_ino} label {old_label} ({} accepts at close), kept {kept_ino} label {kept_label}, new {new_ino}: serve {m0:?} → {m_a:?} → {m_b:?} → {m1:?}; server's counts for the new socket around the last scrape {}..{}, final {fin:?}",
        closed["accepts"],
        count(&b1, new_ino),
        count(&a1, new_ino),
    );
    assert_eq!(m1.keys().map(String::as_str).collect::<Vec<_>>(), ["0", "1"], "labels stay bounded: {m1:?}");
    // The new socket came after serve attached: its series is exactly the server's count for it.
    #[expect(clippy::cast_precision_loss, reason = "accept counts far below 2^52")]
    let (lo, hi) = (count(&b1, new_ino) as f64, count(&a1, new_ino) as f64);
    let new_value = m1[&old_label];
    assert!(new_value >= lo && new_value <= hi, "the new socket takes the freed label {old_label} and counts from its own zero: {new_value}, server {lo}..{hi}; {m1:?}");
    // The kept socket keeps its label and its counter never restarted.
    assert!(m1[&kept_label] >= m_one[&kept_label], "the kept socket keeps its label {kept_label} and counts on: {m_one:?} → {m1:?}");

    // top: the old inode leaves, the new one arrives counting from its own zero.
    let rows = top_rows(&top_lines, ns.inode(), port);
    let before: Vec<&Value> = rows.iter().filter(|(ts, _)| *ts < closed_ns).map(|(_, r)| r).collect();
    assert!(!before.is_empty(), "no top interval before the close: {top_lines:?}");
    for r in &before {
        assert_eq!(socket_inodes(r), initial.iter().copied().collect(), "{r}");
    }
    let last = &rows.last().unwrap().1;
    assert_eq!(socket_inodes(last), [kept_ino, new_ino].into(), "the old socket is gone from top's last interval: {last}");
    let with_new: Vec<&Value> = rows.iter().filter(|(ts, _)| *ts > opened_ns).map(|(_, r)| r).filter_map(|r| socket_of(r, new_ino)).collect();
    assert!(!with_new.is_empty(), "top never showed the new socket");
    let mut running = 0;
    for s in &with_new {
        running += s["accepts"].as_u64().unwrap_or(0);
        assert_eq!(s["accepts_total"].as_u64(), Some(running), "the new socket's total is its own intervals' sum: {s}");
    }
    assert_eq!(running, count(&fin, new_ino), "top counted every accept from the new socket, no more: {with_new:?}");
    assert!(running > 0, "the new socket must get arrivals");
}

/// 66 `SO_REUSEPORT` sockets on one port (more than serve's per-port limit of 64), a few
/// connections: serve exports per-socket series for 64 of them, labelled `0`…`63`, and counts the
/// other 2 in `socktrace_sockets_not_exported`; the port's series are still there.
#[test]
fn serve_bounds_per_socket_series() {
    if !privileged() {
        return;
    }
    let (port, n) = (8464u16, 66u32);
    let ns = NetNs::new("rmany").unwrap();
    let cg = Cgroup::new("rmany").unwrap();
    let addr = format!("127.0.0.1:{port}");
    let server = ReuseportServer::start(Path::new(REUSEPORT), &ns, &cg, &addr, n, 8).unwrap();
    assert_eq!(ss_listen_inodes(&ns, port).unwrap().len(), n as usize);
    let (nsi, cgp) = (ns.inode().to_string(), cg.path.to_string_lossy().into_owned());
    let serve = Serve::start(19483, &["--netns", &nsi, "--cgroup", &cgp]).unwrap();
    let clients = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--count", "40", "--hold-ms", "5"]);
    let _ = clients.wait(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = scrape(&serve);
    let m = scrape(&serve);
    drop((serve, server));
    let labels = [("netns", nsi.as_str()), ("lport", &port.to_string())];
    let idx: BTreeSet<u32> =
        samples(&m, "socktrace_socket_accept_queue_max", &labels).iter().filter_map(|(ls, _)| label(ls, "socket")?.parse().ok()).collect();
    let not_exported: Option<f64> = m.lines().find_map(|l| l.strip_prefix("socktrace_sockets_not_exported ")?.trim().parse().ok());
    let port_acc = sum(&samples(&m, "socktrace_accepts_total", &labels));
    let sock_acc = sum(&samples(&m, "socktrace_socket_accepts_total", &labels));
    eprintln!("SUMMARY serve_bounds: {} socket labels (max {:?}), not exported {not_exported:?}, accepts port {port_acc} sockets {sock_acc}", idx.len(), idx.last());
    assert_eq!(idx, (0..64).collect(), "labels 0..63");
    assert_eq!(not_exported, Some(2.0), "the 2 sockets over the limit are counted");
    assert!((port_acc - 40.0).abs() < 0.5, "the port counts all 40 accepts: {port_acc}");
    assert!(sock_acc <= port_acc, "sockets {sock_acc}, port {port_acc}");
}
