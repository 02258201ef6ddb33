//! The verdict scenarios of `socktrace diagnose`, one per verdict code, each in its own network
//! namespace with real traffic, written once and run in two orders: tracer first (diagnose is
//! ready before the server starts: `diagnose.rs`) and traffic first (the server runs and its
//! clients are connecting when diagnose attaches, as on a server already in trouble:
//! `field.rs`). The verdict must be the same, and the evidence numbers must lie between the
//! namespace's counter deltas from diagnose's ready line and from its spawn (equal when nothing
//! happened before the ready line) and match what the scenario measured (its accept count).

use std::{path::Path, time::Duration};


use serde_json::Value;
use socktrace_tests::{
    Cgroup, NetNs, Scenario,
    diag::{Diagnose, Outcome, QUIET, all_evidence, assert_drops_match, assert_within, drops_in, evidence, number_before, retransmit_shortfall, summary, verdicts},
    veth_pair,
};

const SCENARIO: &str = env!("CARGO_BIN_EXE_st-scenario");

/// Time between the start of the traffic and the fault's main phase (traffic first: diagnose
/// attaches at its end).
const LEAD: Duration = Duration::from_millis(700);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Order {
    TracerFirst,
    TrafficFirst,
}

pub fn scen(args: &[&str]) -> Scenario {
    Scenario::start(Path::new(SCENARIO), &args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
}

/// `diagnose` for one scenario, started where the order says: before the traffic, or once it runs.
pub struct Attach<'a> {
    ns: &'a NetNs,
    cg: &'a Cgroup,
    /// `--port P --netns N`, or a filter expression.
    scope: Vec<String>,
    secs: u32,
    diag: Option<Diagnose<'a>>,
}

impl<'a> Attach<'a> {
    pub fn new(order: Order, ns: &'a NetNs, cg: &'a Cgroup, port: u16, secs: u32) -> Attach<'a> {
        let scope = vec!["--port".to_owned(), port.to_string(), "--netns".to_owned(), ns.inode().to_string()];
        Self::scoped(order, ns, cg, scope, secs)
    }

    /// Scoped by a filter expression instead of `--port`/`--netns`.
    pub fn with_expression(order: Order, ns: &'a NetNs, cg: &'a Cgroup, expr: &str, secs: u32) -> Attach<'a> {
        Self::scoped(order, ns, cg, vec![expr.to_owned()], secs)
    }

    fn scoped(order: Order, ns: &'a NetNs, cg: &'a Cgroup, scope: Vec<String>, secs: u32) -> Attach<'a> {
        let mut a = Attach { ns, cg, scope, secs, diag: None };
        if order == Order::TracerFirst {
            a.start();
        }
        a
    }

    fn start(&mut self) {
        let scope: Vec<&str> = self.scope.iter().map(String::as_str).collect();
        self.diag = Some(Diagnose::start_scoped(self.ns, self.cg, self.secs, &scope).unwrap());
    }

    /// The traffic runs: after [`LEAD`], diagnose attaches (traffic first).
    pub fn traffic_running(&mut self) {
        std::thread::sleep(LEAD);
        if self.diag.is_none() {
            self.start();
        }
    }

    /// Sleeps until [`QUIET`] before the window's end: then the caller stops the traffic.
    pub fn until_quiet(&self) {
        self.diag.as_ref().expect("traffic_running() attaches diagnose").sleep_until_end_minus(QUIET);
    }

    /// Stops `traffic` (drops it) [`QUIET`] before the window's end, then waits for the report.
    pub fn stop_and_finish<T>(self, traffic: T) -> Outcome {
        let o = self.diag.expect("traffic_running() attaches diagnose").stop_and_finish(traffic).unwrap();
        o.assert_no_map_pressure();
        o
    }

    pub fn finish(self) -> Outcome {
        let o = self.diag.expect("traffic_running() attaches diagnose").finish().unwrap();
        o.assert_no_map_pressure();
        o
    }
}

pub fn healthy(order: Order, port: u16) {
    let tag = format!("vok{}", order as u8);
    let ns = NetNs::new(&tag).unwrap();
    let cg = Cgroup::new(&tag).unwrap();
    let cgp = cg.path.to_string_lossy().into_owned();
    let addr = format!("127.0.0.1:{port}");
    let mut a = Attach::new(order, &ns, &cg, port, 4);
    let server = scen(&["server", "--netns", &ns.name, "--cgroup", &cgp, "--addr", &addr, "--backlog", "100", "--run-ms", "15000"]);
    let clients = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--count", "4", "--bursts", "40", "--burst-gap-ms", "450", "--hold-ms", "150"]);
    a.traffic_running();
    let o = a.stop_and_finish(clients);
    let (inner, outer) = o.count_in_window(&server.accept_times());
    drop(server);
    let l = o.listener(ns.inode(), port);
    let counts = &l["window_counts"];
    summary(&format!("healthy {order:?}"), &l, &format!("window_counts {counts}; server accepted (ready, spawn) ({inner}, {outer})"));
    assert_eq!(l["verdict"], "healthy", "{l}");
    assert!(verdicts(&l).is_empty(), "{l}");
    assert_eq!(o.delta("TcpExtListenOverflows").1, 0, "the scenario: nothing dropped");
    let accepts = counts["accepts"].as_i64().unwrap_or_else(|| panic!("window_counts.accepts: {l}"));
    assert!(inner > 0 && accepts >= inner && accepts <= outer, "window_counts.accepts {accepts}; the server accepted {inner} after the ready line, {outer} after the spawn");
    assert_eq!((counts["overflows"].as_i64(), counts["syn_drops"].as_i64()), (Some(0), Some(0)), "{l}");
}

/// Drops in the report's evidence (if any finding counts them) against the kernel's.
fn drops_line(l: &Value, o: &Outcome) -> String {
    let ev = all_evidence(l);
    format!("evidence drops {:?} vs kernel ListenOverflows (ready, spawn) {:?}", ev.contains("SYN drops").then(|| drops_in(&ev)), o.delta("TcpExtListenOverflows"))
}

/// Episodes of a report (`[{start_s, duration_s, drops, accepts}]`).
pub fn episodes(l: &Value) -> Vec<Value> {
    l["episodes"].as_array().cloned().unwrap_or_default()
}

pub fn accept_stall(order: Order, port: u16) {
    let tag = format!("vstall{}", order as u8);
    let ns = NetNs::new(&tag).unwrap();
    let cg = Cgroup::new(&tag).unwrap();
    let cgp = cg.path.to_string_lossy().into_owned();
    let addr = format!("127.0.0.1:{port}");
    let mut a = Attach::new(order, &ns, &cg, port, 6);
    let server = scen(&["server", "--netns", &ns.name, "--cgroup", &cgp, "--addr", &addr, "--backlog", "8", "--accept-after-ms", "100000", "--run-ms", "20000"]);
    let clients = scen(&[
        "clients", "--netns", &ns.name, "--addr", &addr, "--count", "8", "--bursts", "40", "--burst-gap-ms", "500", "--hold-ms", "30000",
        "--connect-timeout-ms", "2500",
    ]);
    a.traffic_running();
    let o = a.stop_and_finish(clients);
    drop(server);
    let l = o.listener(ns.inode(), port);
    summary(&format!("accept_stall {order:?}"), &l, &drops_line(&l, &o));
    assert_eq!(l["verdict"], "accept_stall", "{l}");
    let ev = evidence(&l, "accept_stall");
    assert!(ev.contains("0 accepted"), "{ev}");
    // Full: at least backlog + 1 (two CPUs completing handshakes at once can both pass the
    // kernel's fullness check, so the queue may hold one more).
    let peak = ev.split("at its backlog ").nth(1).and_then(|r| r.split('/').next()).and_then(|n| n.parse::<u32>().ok());
    assert!(peak.is_some_and(|p| (9..=10).contains(&p)) && ev.contains("/8 (peak)"), "{ev}");
    assert_drops_match(&ev, &o);
    assert_eq!(l["comm"], "st-scenario");
    if order == Order::TrafficFirst {
        assert!(!episodes(&l).is_empty(), "a stall is an episode: {l}");
    }
}

/// Fast accepts (2 ms each), but bursts of 40 simultaneous connections against backlog
/// `backlog`: one burst before the main phase, three in it. Returns the report, the outcome, and
/// the server's accepts in the window (inner, outer).
/// The clients still connecting when the window nears its end are stopped.
fn bursty(order: Order, tag: &str, port: u16, backlog: &str, somaxconn: Option<&str>) -> (Value, Outcome, (i64, i64), Cgroup) {
    let ns = NetNs::new(tag).unwrap();
    if let Some(s) = somaxconn {
        ns.exec(&["sysctl", "-qw", &format!("net.core.somaxconn={s}")]).unwrap();
    }
    let cg = Cgroup::new(tag).unwrap();
    let cgp = cg.path.to_string_lossy().into_owned();
    let addr = format!("127.0.0.1:{port}");
    let mut a = Attach::new(order, &ns, &cg, port, 8);
    let server = scen(&["server", "--netns", &ns.name, "--cgroup", &cgp, "--addr", &addr, "--backlog", backlog, "--accept-delay-ms", "2", "--run-ms", "30000"]);
    let first = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--count", "40", "--hold-ms", "100"]);
    a.traffic_running();
    let clients = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--count", "40", "--bursts", "3", "--burst-gap-ms", "1200", "--hold-ms", "100"]);
    let o = a.stop_and_finish((first, clients));
    let accepted = o.count_in_window(&server.accept_times());
    drop(server);
    let l = o.listener(ns.inode(), port);
    summary(&format!("{tag} {order:?}"), &l, &format!("{}; server accepted (ready, spawn) {accepted:?}", drops_line(&l, &o)));
    (l, o, accepted, cg)
}

pub fn backlog_too_small(order: Order, port: u16) {
    let (l, o, (inner, outer), _cg) = bursty(order, &format!("vburst{}", order as u8), port, "4", None);
    assert!(o.delta("TcpExtListenOverflows").0 > 0, "the bursts must overflow");
    assert_eq!(l["verdict"], "backlog_too_small", "{l}");
    assert!(!verdicts(&l).contains(&"somaxconn_cap".to_owned()), "somaxconn is 4096 here");
    let ev = evidence(&l, "backlog_too_small");
    let seen = number_before(&ev, "accepted,");
    assert!(seen >= inner && seen <= outer, "evidence says {seen} accepted; the server accepted {inner} after the ready line, {outer} after the spawn: {ev}");
    assert_drops_match(&ev, &o);
}

pub fn somaxconn_cap(order: Order, port: u16) {
    let (l, o, _, _cg) = bursty(order, &format!("vcap{}", order as u8), port, "128", Some("8"));
    assert!(o.delta("TcpExtListenOverflows").0 > 0, "the bursts must overflow the capped queue");
    let v = verdicts(&l);
    assert!(v.contains(&"somaxconn_cap".to_owned()), "{v:?}");
    let ev = evidence(&l, "somaxconn_cap");
    assert!(ev.contains("backlog 8 = net.core.somaxconn 8; the application asked for "), "{ev}");
    // listen() was called before a late tracer started: what the application asked for is then
    // unknown, and the evidence must say so rather than guess.
    match order {
        Order::TracerFirst => assert!(ev.contains("asked for 128"), "{ev}"),
        Order::TrafficFirst => assert!(ev.contains("asked for 128") || ev.contains("unknown"), "{ev}"),
    }
}

pub fn syn_flood(order: Order, port: u16) {
    let (attacker, victim) = veth_pair(&format!("vfl{}", order as u8)).unwrap();
    let cg = Cgroup::new(&format!("vfl{}", order as u8)).unwrap();
    let addr = format!("10.77.0.2:{port}");
    let mut a = Attach::new(order, &victim, &cg, port, 6);
    let server = scen(&["server", "--netns", &victim.name, "--addr", &addr, "--backlog", "128", "--run-ms", "20000"]);
    let flood = scen(&["synflood", "--netns", &attacker.name, "--addr", &addr, "--src-net", "10.78", "--rate", "2000", "--duration-ms", "15000"]);
    a.traffic_running();
    let o = a.stop_and_finish(flood);
    drop(server);
    let l = o.listener(victim.inode(), port);
    summary(&format!("syn_flood {order:?}"), &l, &format!("kernel SyncookiesSent (ready, spawn) {:?}", o.delta("TcpExtSyncookiesSent")));
    assert_eq!(l["verdict"], "syn_flood", "{l}");
    let ev = evidence(&l, "syn_flood");
    assert_within("SYN cookies", number_before(&ev, "SYN cookies sent"), &o, "TcpExtSyncookiesSent", (0, 0));
    assert!(number_before(&ev, "half-open") >= 64, "{ev}");
}

pub fn packet_loss(order: Order, port: u16) {
    let tag = format!("vloss{}", order as u8);
    let ns = NetNs::new(&tag).unwrap();
    let cg = Cgroup::new(&tag).unwrap();
    let addr = format!("127.0.0.1:{port}");
    ns.drop_segments_from(port, 10).unwrap();
    let mut a = Attach::new(order, &ns, &cg, port, 7);
    let server = scen(&[
        "server", "--netns", &ns.name, "--addr", &addr, "--backlog", "128", "--drain", "--reply-chunks", "6000", "--chunk-bytes", "200", "--max-accepts", "10",
        "--run-ms", "30000",
    ]);
    let clients = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--count", "10", "--hold-ms", "30000"]);
    a.traffic_running();
    let o = a.stop_and_finish(clients);
    drop(server);
    let l = o.listener(ns.inode(), port);
    summary(&format!("packet_loss {order:?}"), &l, &format!("kernel TcpRetransSegs (ready, spawn) {:?}", o.delta("TcpRetransSegs")));
    assert_eq!(l["verdict"], "packet_loss", "{l}");
    let ev = evidence(&l, "packet_loss");
    let retrans = number_before(&ev, "segments retransmitted");
    let synack = number_before(&ev, "SYN-ACK retransmits");
    let shortfall = retransmit_shortfall(o.delta("TcpRetransSegs").0);
    assert_within("retransmits + SYN-ACK retransmits", retrans + synack, &o, "TcpRetransSegs", (shortfall, 0));
}

pub fn no_listener(order: Order, port: u16) {
    no_listener_scoped(order, port, false);
}

/// `no_listener` with the port and namespace given as a filter expression (`netns N and sport =
/// :P`) instead of `--port`/`--netns` when `by_expression`.
pub fn no_listener_scoped(order: Order, port: u16, by_expression: bool) {
    let tag = format!("vnone{}{}", order as u8, u8::from(by_expression));
    let ns = NetNs::new(&tag).unwrap();
    let cg = Cgroup::new(&tag).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut a = if by_expression {
        Attach::with_expression(order, &ns, &cg, &format!("netns {} and sport = :{port}", ns.inode()), 3)
    } else {
        Attach::new(order, &ns, &cg, port, 3)
    };
    let c = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--count", "3", "--bursts", "40", "--burst-gap-ms", "300", "--hold-ms", "10"]);
    a.traffic_running();
    a.until_quiet();
    let lines = c.lines();
    drop(c);
    let o = a.finish();
    assert!(lines.iter().filter(|l| l["event"] == "connect").all(|l| l["ok"] == false), "nothing listens");
    let l = o.listener(ns.inode(), port);
    summary(&format!("no_listener {order:?}"), &l, &format!("kernel TcpOutRsts (ready, spawn) {:?}", o.delta("TcpOutRsts")));
    assert_eq!(l["verdict"], "no_listener", "{l}");
    let ev = evidence(&l, "no_listener");
    assert_within("resets", number_before(&ev, "TCP resets sent"), &o, "TcpOutRsts", (0, 0));
}
