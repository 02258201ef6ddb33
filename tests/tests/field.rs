//! Field trials: socktrace attached to servers that are already running and loaded, as a person
//! would use it on a server in trouble. Debian's real nginx-light, haproxy and redis-server with
//! wrk and redis-benchmark as clients (tests/src/servers.rs), and st-scenario for what they cannot
//! do (a pausing acceptor, streams of known size). In every scenario the server starts and its
//! load runs first, socktrace attaches after, then the fault; each scenario has its own network
//! namespace and cgroup. Verdicts are checked, and the evidence numbers against the namespace's
//! own counters (see `socktrace_tests::diag` for how a window that opens on running traffic is
//! bracketed).

mod verdicts;

use std::{path::Path, time::Duration};

use serde_json::Value;
use socktrace_tests::{
    Cgroup, NetNs, Scenario, Serve, Socktrace, Watch,
    diag::{Diagnose, all_evidence, assert_drops_match, drops_in, evidence, finding, number_before, summary, verdicts},
    http_get, monotonic_ns, of_kind, privileged,
    servers::{Haproxy, Nginx, NginxConfig, Redis, host_listens, listen_queue, redis_benchmark, wrk},
    time_scale,
};
use verdicts::{Order::TrafficFirst, episodes, scen};

const SCENARIO: &str = env!("CARGO_BIN_EXE_st-scenario");

/// One nginx worker, a steady load, diagnose attached; ~1.7 s later the worker is stopped
/// (SIGSTOP) for the rest of the window. The healthy start must not hide the stall.
#[test]
fn nginx_worker_stopped_mid_window_is_accept_stall() {
    if !privileged() {
        return;
    }
    let port = 8142;
    let ns = NetNs::new("fngx").unwrap();
    let cg = Cgroup::new("fngx").unwrap();
    let nginx = Nginx::start(&ns, Some(&cg), &NginxConfig { addr: "127.0.0.1", port, backlog: 36, workers: 1, reuseport: false, big_bytes: 0 }).unwrap();
    let worker = nginx.workers()[0];
    let url = format!("http://127.0.0.1:{port}/");
    // wrk keeps 10 connections busy, a connection per request; new clients keep arriving (40/s).
    // Together they stay below the backlog while nginx accepts: no drops before the fault.
    let load = wrk(&ns, &url, 1, 10, 30, true).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let arrivals = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--rate", "40", "--duration-ms", "30000", "--hold-ms", "20", "--connect-timeout-ms", "3000"]);
    std::thread::sleep(Duration::from_millis(1200));
    let a0 = nginx.accepts(&ns, "127.0.0.1").unwrap();
    let d = Diagnose::start(&ns, &cg, port, 7, true).unwrap();
    let a1 = nginx.accepts(&ns, "127.0.0.1").unwrap();
    std::thread::sleep(Duration::from_millis(1700));
    let a2 = nginx.accepts(&ns, "127.0.0.1").unwrap();
    let healthy_phase = ns.counters().unwrap();
    nginx.signal(worker, libc::SIGSTOP);
    let stopped_ns = monotonic_ns();
    let o = d.stop_and_finish((arrivals, load)).unwrap();
    nginx.signal(worker, libc::SIGCONT);
    drop(nginx);
    let l = o.listener(ns.inode(), port);
    let (inner, _) = o.delta("TcpExtListenOverflows");
    let ev_all = all_evidence(&l);
    summary(
        "nginx_worker_stopped",
        &l,
        &format!(
            "evidence drops {:?} vs kernel ListenOverflows (ready, spawn) {:?}; evidence accepted {:?} vs nginx stub_status (ready, spawn) ({}, {}); worker stopped {:.2} s into the window",
            ev_all.contains("SYN drops").then(|| drops_in(&ev_all)),
            o.delta("TcpExtListenOverflows"),
            ev_all.contains("accepted,").then(|| number_before(&ev_all, "accepted,")),
            a2 - a1,
            a2 - a0,
            secs_between(o.ready_ns, stopped_ns)
        ),
    );
    assert_eq!(healthy_phase.delta(&o.spawned, "TcpExtListenOverflows"), 0, "the scenario: no drops before the worker stops");
    assert!(inner > 0, "the stopped worker must make the queue overflow");
    assert_eq!(l["verdict"], "accept_stall", "{l}");
    let ev = evidence(&l, "accept_stall");
    assert_drops_match(&ev, &o);
    // nginx's own count (stub_status) of what it accepted before it was stopped, from the ready
    // line (inner) or from the spawn (outer).
    let accepted = number_before(&ev, "accepted,");
    let (inner, outer) = (i64::try_from(a2 - a1).unwrap(), i64::try_from(a2 - a0).unwrap());
    assert!(accepted >= inner && accepted <= outer, "evidence says {accepted} accepted; nginx accepted {inner} after the ready line, {outer} after the spawn: {ev}");
    let ep = episodes(&l);
    assert!(!ep.is_empty(), "the stall is an episode: {l}");
    // The episode starts when the worker stopped (give or take the queue filling and a sample).
    let stop_s = secs_between(o.ready_ns, stopped_ns);
    let start_s = ep.iter().filter_map(|e| e["start_s"].as_f64()).fold(f64::MAX, f64::min);
    let tol = 0.8 * f64::from(u32::try_from(time_scale()).unwrap_or(1));
    assert!(start_s >= stop_s - 0.5 && start_s <= stop_s + tol, "episode starts at {start_s:.2} s, worker stopped at {stop_s:.2} s: {l}");
}

/// Seconds from `from_ns` to `to_ns` (`CLOCK_MONOTONIC`), negative when `to_ns` is earlier.
fn secs_between(from_ns: u64, to_ns: u64) -> f64 {
    let ahead = Duration::from_nanos(to_ns.saturating_sub(from_ns)).as_secs_f64();
    ahead - Duration::from_nanos(from_ns.saturating_sub(to_ns)).as_secs_f64()
}

/// A server that stops accepting for 450 ms every 1.4 s under 100 arrivals/s with backlog 20:
/// every pause overflows the queue, the accepts in between are fine.
#[test]
fn pausing_acceptor_is_intermittent_accept_stall() {
    if !privileged() {
        return;
    }
    let (port, rate, pause_ms) = (8277u16, 100u64, 450u64);
    let ns = NetNs::new("fpause").unwrap();
    let cg = Cgroup::new("fpause").unwrap();
    let cgp = cg.path.to_string_lossy().into_owned();
    let addr = format!("127.0.0.1:{port}");
    let (rate_arg, pause_arg) = (rate.to_string(), pause_ms.to_string());
    let server = scen(&["server", "--netns", &ns.name, "--cgroup", &cgp, "--addr", &addr, "--backlog", "20", "--pause-ms", &pause_arg, "--pause-every-ms", "1400", "--run-ms", "30000"]);
    let clients = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--rate", &rate_arg, "--duration-ms", "30000", "--hold-ms", "30", "--connect-timeout-ms", "3000"]);
    std::thread::sleep(Duration::from_secs(1));
    let d = Diagnose::start(&ns, &cg, port, 7, true).unwrap();
    let o = d.stop_and_finish(clients).unwrap();
    // Pauses overlapping the window (a pause is printed when it ends: wait for one in progress).
    std::thread::sleep(Duration::from_millis(pause_ms + 100));
    let overlaps = |l: &Value| l["end_ns"].as_u64().is_some_and(|e| e >= o.ready_ns) && l["start_ns"].as_u64().is_some_and(|b| b <= o.end_ns);
    let pause_starts: Vec<f64> = server
        .lines()
        .iter()
        .filter(|l| l["event"] == "pause" && overlaps(l))
        .filter_map(|l| Some(secs_between(o.ready_ns, l["start_ns"].as_u64()?)))
        .collect();
    let pauses = pause_starts.len();
    drop(server);
    let l = o.listener(ns.inode(), port);
    let ev_all = all_evidence(&l);
    summary(
        "pausing_acceptor",
        &l,
        &format!(
            "pauses at {pause_starts:.2?} s; evidence drops {:?} vs kernel (ready, spawn) {:?}",
            ev_all.contains("SYN drops").then(|| drops_in(&ev_all)),
            o.delta("TcpExtListenOverflows")
        ),
    );
    assert!(o.delta("TcpExtListenOverflows").0 > 0, "the pauses must overflow the queue");
    assert_eq!(l["verdict"], "accept_stall", "{l}");
    let ev = evidence(&l, "accept_stall");
    assert!(ev.contains("intermittent"), "{ev}");
    assert_drops_match(&ev, &o);
    let ep = episodes(&l);
    assert!(ep.len() >= 2 && ep.len() <= pauses, "{} episodes for {pauses} pauses in the window: {l}", ep.len());
    // Each episode lines up with one of the server's own pauses (start within 0.3 s, relative to
    // the window start; the pauses are 450 ms long).
    let tol = 0.3 * f64::from(u32::try_from(time_scale()).unwrap_or(1));
    for e in &ep {
        let start = e["start_s"].as_f64().unwrap_or(f64::NAN);
        assert!(pause_starts.iter().any(|p| (p - start).abs() <= tol), "episode at {start:.2} s, pauses at {pause_starts:.2?} s: {e}");
    }
    // The backlog that absorbs one pause is arrival rate × pause, offered as a mitigation.
    let line = ev.lines().find(|l| l.contains("absorb"));
    let absorb = number_after(line.unwrap_or_else(|| panic!("no backlog suggested to absorb a pause: {ev}")), "at least");
    // Clients whose SYN fell in a pause retry 1 s later; some retries land after the window or
    // in the next pause, and the longest gap is a little longer than a pause.
    let expected = i64::try_from(rate * pause_ms / 1000).unwrap();
    assert!(absorb * 10 >= expected * 7 && absorb * 10 <= expected * 16, "suggested backlog {absorb}, arrival rate × pause = {expected}: {ev}");
    let fix = socktrace_tests::diag::fix(&l, "accept_stall");
    assert!(fix.contains("mitigation") && fix.contains("backlog"), "{fix}");
}

/// The first integer after `label` in `text`.
fn number_after(text: &str, label: &str) -> i64 {
    let at = text.find(label).unwrap_or_else(|| panic!("{label:?} not in {text}")) + label.len();
    let digits: String = text[at..].trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("no number after {label:?} in {text}"))
}

/// redis-server asks for `tcp-backlog 400` in a namespace whose net.core.somaxconn is 20, under a
/// redis-benchmark that reconnects for every request.
#[test]
fn redis_above_somaxconn_is_somaxconn_cap() {
    if !privileged() {
        return;
    }
    let port = 7391;
    let ns = NetNs::new("fredis").unwrap();
    ns.exec(&["sysctl", "-qw", "net.core.somaxconn=20"]).unwrap();
    let cg = Cgroup::new("fredis").unwrap();
    let redis = Redis::start(&ns, Some(&cg), port, 400).unwrap();
    assert_eq!(listen_queue(&ns, port).unwrap().first().map(|q| q.1), Some(20), "the kernel caps the backlog at somaxconn");
    let bench = redis_benchmark(&ns, port, 160, 2_000_000, true).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let d = Diagnose::start(&ns, &cg, port, 6, true).unwrap();
    let o = d.stop_and_finish(bench).unwrap();
    let log = redis.log();
    drop(redis);
    assert!(log.contains("cannot be enforced"), "redis warns about the cap: {log}");
    let l = o.listener(ns.inode(), port);
    let ev_all = all_evidence(&l);
    let drops = ev_all.contains("SYN drops").then(|| drops_in(&ev_all));
    summary(
        "redis_somaxconn",
        &l,
        &format!(
            "evidence drops {drops:?} vs kernel (ready, spawn) {:?}, after the stop {}; program runs missed {}, events lost {}",
            o.delta("TcpExtListenOverflows"),
            o.late("TcpExtListenOverflows"),
            o.json["program_runs_missed"],
            o.json["events_lost"]
        ),
    );
    assert!(o.delta("TcpExtListenOverflows").0 > 0, "the reconnecting clients must overflow the capped queue");
    assert_eq!(verdicts(&l).first().map(String::as_str), Some("somaxconn_cap"), "{l}");
    assert_eq!(l["comm"], "redis-server", "{l}");
    let ev = evidence(&l, "somaxconn_cap");
    assert!(ev.contains("backlog 20 = net.core.somaxconn 20"), "{ev}");
    let f = finding(&l, "somaxconn_cap");
    assert!(f["fix"].to_string().contains("somaxconn"), "{f}");
    // Where a finding counts the drops, they are the kernel's.
    if drops.is_some() {
        assert_drops_match(&ev_all, &o);
    }
}

/// nginx (2 workers) under keep-alive wrk load, 5 % of its data segments dropped before socktrace
/// attaches: the connections were all accepted before tracing; their retransmits must count.
#[test]
fn nginx_keepalive_loss_attached_mid_flight_is_packet_loss() {
    if !privileged() {
        return;
    }
    let port = 8743;
    let ns = NetNs::new("floss").unwrap();
    // Segments of at most 1500 bytes, so a response is several segments and a dropped one does
    // not leave the client's request unacknowledged (the client's own retransmits stay rare).
    ns.exec(&["ip", "link", "set", "lo", "mtu", "1500"]).unwrap();
    let cg = Cgroup::new("floss").unwrap();
    let nginx = Nginx::start(&ns, Some(&cg), &NginxConfig { addr: "127.0.0.1", port, backlog: 90, workers: 2, reuseport: false, big_bytes: 9000 }).unwrap();
    let load = wrk(&ns, &format!("http://127.0.0.1:{port}/big"), 1, 6, 30, false).unwrap();
    ns.drop_segments_from(port, 5).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let d = Diagnose::start(&ns, &cg, port, 6, true).unwrap();
    let o = d.stop_and_finish(load).unwrap();
    drop(nginx);
    let l = o.listener(ns.inode(), port);
    let (inner, outer) = o.delta("TcpRetransSegs");
    let ev_all = all_evidence(&l);
    let rtx = ev_all.contains("segments retransmitted").then(|| number_before(&ev_all, "segments retransmitted"));
    summary("nginx_keepalive_loss", &l, &format!("evidence retransmits {rtx:?} vs kernel TcpRetransSegs (ready, spawn) ({inner}, {outer})"));
    assert!(inner >= 100, "the loss must cause retransmits: {inner}");
    assert_eq!(l["verdict"], "packet_loss", "{l}");
    let ev = evidence(&l, "packet_loss");
    let seen = number_before(&ev, "segments retransmitted") + number_before(&ev, "SYN-ACK retransmits");
    assert!(
        seen * 100 >= inner * 95 && seen <= outer,
        "socktrace counted {seen} retransmits; the kernel {inner} from the ready line, {outer} from the spawn"
    );
}

/// haproxy in front of nginx, healthy, in a namespace that is not the host's; diagnose is asked
/// about the port only (no --netns), as on a Kubernetes node.
#[test]
fn haproxy_in_netns_by_port_only_is_healthy_and_no_listener_nowhere() {
    if !privileged() {
        return;
    }
    let (front, back) = (8620u16, 8621u16);
    let ns = NetNs::new("fhap").unwrap();
    let cg = Cgroup::new("fhap").unwrap();
    let nginx = Nginx::start(&ns, Some(&cg), &NginxConfig { addr: "127.0.0.1", port: back, backlog: 300, workers: 2, reuseport: false, big_bytes: 0 }).unwrap();
    let haproxy = Haproxy::start(&ns, Some(&cg), "127.0.0.1", front, &format!("127.0.0.1:{back}")).unwrap();
    assert!(!host_listens(front).unwrap(), "port {front} must be free in the host's namespace for this test");
    let load = wrk(&ns, &format!("http://127.0.0.1:{front}/"), 1, 8, 30, true).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let d = Diagnose::start(&ns, &cg, front, 5, false).unwrap();
    let o = d.stop_and_finish(load).unwrap();
    let hp = haproxy.pid();
    drop((haproxy, nginx));
    assert_eq!(o.delta("TcpExtListenOverflows").1, 0, "healthy: the kernel dropped nothing");
    let l = o.listener(ns.inode(), front);
    let others: Vec<String> = o.listeners().iter().map(|r| format!("netns {} port {}: {}", r["netns"], r["lport"], r["verdict"])).collect();
    summary("haproxy_by_port", &l, &format!("all reports: {others:?}"));
    assert_eq!(l["verdict"], "healthy", "{l}");
    assert!(verdicts(&l).is_empty(), "{l}");
    assert_eq!(l["comm"], "haproxy", "{l}");
    assert_eq!(l["pid"], hp, "{l}");
    for r in o.listeners() {
        assert!(r["verdict"] != "no_listener" && !verdicts(&r).contains(&"no_listener".to_owned()), "no_listener while haproxy listens in netns {}: {r}", ns.inode());
    }
}

#[test]
fn verdicts_attached_after_traffic_healthy() {
    if privileged() {
        verdicts::healthy(TrafficFirst, 9700);
    }
}

#[test]
fn verdicts_attached_after_traffic_accept_stall() {
    if privileged() {
        verdicts::accept_stall(TrafficFirst, 9701);
    }
}

#[test]
fn verdicts_attached_after_traffic_backlog_too_small() {
    if privileged() {
        verdicts::backlog_too_small(TrafficFirst, 9702);
    }
}

#[test]
fn verdicts_attached_after_traffic_somaxconn_cap() {
    if privileged() {
        verdicts::somaxconn_cap(TrafficFirst, 9703);
    }
}

#[test]
fn verdicts_attached_after_traffic_syn_flood() {
    if privileged() {
        verdicts::syn_flood(TrafficFirst, 9704);
    }
}

#[test]
fn verdicts_attached_after_traffic_packet_loss() {
    if privileged() {
        verdicts::packet_loss(TrafficFirst, 9705);
    }
}

#[test]
fn verdicts_attached_after_traffic_no_listener() {
    if privileged() {
        verdicts::no_listener(TrafficFirst, 9706);
    }
}

/// Sum of `socktrace_retransmits_total` for (netns, port) in a /metrics text.
fn scraped_retransmits(metrics: &str, netns: u32, port: u16) -> Option<i64> {
    let (n, p) = (format!("netns=\"{netns}\""), format!("lport=\"{port}\""));
    let vals: Vec<i64> = metrics
        .lines()
        .filter(|l| l.starts_with("socktrace_retransmits_total{") && l.contains(&n) && l.contains(&p))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!vals.is_empty()).then(|| vals.iter().sum())
}

/// Streams on connections all accepted before `top`, `serve` and `watch` start; loss injected
/// after they are up: each must count the retransmits of those old connections.
#[test]
fn top_serve_and_watch_count_retransmits_of_connections_accepted_before_tracing() {
    if !privileged() {
        return;
    }
    let port = 8855;
    let ns = NetNs::new("fmid").unwrap();
    let cg = Cgroup::new("fmid").unwrap();
    let cgp = cg.path.to_string_lossy().into_owned();
    let inode = ns.inode().to_string();
    let addr = format!("127.0.0.1:{port}");
    let server = Scenario::start(
        Path::new(SCENARIO),
        &[
            "server", "--netns", &ns.name, "--cgroup", &cgp, "--addr", &addr, "--backlog", "50", "--drain", "--reply-chunks", "20000", "--chunk-bytes", "300",
            "--run-ms", "40000",
        ]
        .map(str::to_owned),
    )
    .unwrap();
    let clients = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--count", "8", "--hold-ms", "40000"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.accept_times().len() < 8 {
        assert!(std::time::Instant::now() < deadline, "the server never accepted its 8 clients");
        std::thread::sleep(Duration::from_millis(50));
    }
    let top = Socktrace::start(&["top", "--json", "--interval", "1s", "--iterations", "7", "--netns", &inode, "--port", &port.to_string(), "--cgroup", &cgp], "tracing started").unwrap();
    let serve = Serve::start(19474, &["--netns", &inode, "--cgroup", &cgp]).unwrap();
    let watch = Watch::start(&["--netns", &inode, "--port", &port.to_string(), "--cgroup", &cgp]).unwrap();
    let before = ns.counters().unwrap();
    ns.drop_segments_from(port, 8).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    // The loss ends, lost segments are recovered; then the clients end, which resets the
    // connections: no retransmit after this.
    ns.exec(&["nft", "delete", "table", "inet", "socktrace_loss"]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    drop(clients);
    std::thread::sleep(Duration::from_millis(300));
    let after = ns.counters().unwrap();
    let delta = after.delta(&before, "TcpRetransSegs");
    let (status, metrics) = http_get(&serve.addr, "/metrics", Duration::from_secs(5)).unwrap();
    let lines = top.wait(Duration::from_secs(30)).unwrap();
    let records = watch.finish().unwrap();
    drop((serve, server));
    let watched: i64 = of_kind(&records, "retransmit").iter().filter(|r| r["lport"] == port).map(|r| r["segs"].as_i64().unwrap_or(1)).sum();
    assert_eq!(status, 200);
    let rows: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["listeners"].as_array().and_then(|a| a.iter().find(|r| r["lport"] == port).cloned()))
        .collect();
    let top_rtx: i64 = rows.iter().filter_map(|r| r["retransmits"].as_i64()).sum();
    let scraped = scraped_retransmits(&metrics, ns.inode(), port);
    eprintln!("SUMMARY top_serve_watch_mid_flight: TcpRetransSegs delta {delta}; top --json {top_rtx}; serve {scraped:?}; watch {watched}");
    assert!(delta >= 50, "the loss must cause retransmits: {delta}");
    assert!(top_rtx * 100 >= delta * 95 && top_rtx <= delta, "top counted {top_rtx} retransmits, the kernel {delta}: {rows:?}");
    let scraped = scraped.unwrap_or_else(|| panic!("no socktrace_retransmits_total for port {port}:\n{metrics}"));
    assert!(scraped * 100 >= delta * 95 && scraped <= delta, "serve exported {scraped} retransmits, the kernel {delta}");
    assert!(watched * 100 >= delta * 95 && watched <= delta, "watch showed {watched} retransmitted segments, the kernel {delta}");
}

/// nginx's only worker is stopped; clients queue behind it, each with a request already sent;
/// `watch` attaches while they wait; then the worker resumes. The connections queued before the
/// attach get their real accept wait (from the accepted socket's own stamp, which data arriving
/// while queued does not move): every wait at least the time from the attach to the resume, at
/// most from the stop to the end. Port, backlog and client count vary per run.
#[test]
fn nginx_stopped_worker_waits_of_connections_queued_before_attach() {
    if !privileged() {
        return;
    }
    let pid = std::process::id();
    let port = 8150 + u16::try_from(pid % 40).unwrap();
    let backlog = 64 + pid % 64;
    let queued = 10 + pid % 21;
    let ns = NetNs::new("fnwait").unwrap();
    let cg = Cgroup::new("fnwait").unwrap();
    let nginx = Nginx::start(&ns, Some(&cg), &NginxConfig { addr: "127.0.0.1", port, backlog, workers: 1, reuseport: false, big_bytes: 0 }).unwrap();
    let worker = nginx.workers()[0];
    nginx.signal(worker, libc::SIGSTOP);
    let stopped_ns = monotonic_ns();
    let addr = format!("127.0.0.1:{port}");
    let clients = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--count", &queued.to_string(), "--send-chunks", "1", "--chunk-bytes", "64", "--hold-ms", "500", "--connect-timeout-ms", "3000"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while listen_queue(&ns, port).unwrap().first().map(|q| q.0) != Some(queued) {
        assert!(std::time::Instant::now() < deadline, "the clients never filled the queue: {:?}", listen_queue(&ns, port));
        std::thread::sleep(Duration::from_millis(20));
    }
    let watch = Watch::start(&["--netns", &ns.inode().to_string(), "--port", &port.to_string()]).unwrap();
    let attached_ns = monotonic_ns();
    std::thread::sleep(Duration::from_millis(400));
    let resumed_ns = monotonic_ns();
    nginx.signal(worker, libc::SIGCONT);
    clients.wait(Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (records, stderr) = watch.finish_with_stderr().unwrap();
    let end_ns = monotonic_ns();
    drop(nginx);
    let waits: Vec<Option<u64>> = of_kind(&records, "accept").iter().filter(|r| r["lport"] == port).map(|r| r["accept_wait_ns"].as_u64()).collect();
    eprintln!("{queued} connections queued behind the stopped worker (backlog {backlog}, port {port}) before the attach; waits {waits:?}; attach→resume {} ms", (resumed_ns - attached_ns) / 1_000_000);
    assert_eq!(waits.len(), queued as usize, "one accept per queued connection: {stderr:?}");
    for w in &waits {
        let w = w.unwrap_or_else(|| panic!("every wait known (queued before the attach): {waits:?}"));
        assert!(w >= resumed_ns - attached_ns && w <= end_ns - stopped_ns, "wait {w} ns outside [{}, {}]", resumed_ns - attached_ns, end_ns - stopped_ns);
    }
}
