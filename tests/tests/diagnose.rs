//! `socktrace diagnose`: one scenario per verdict code, each in its own network namespace, driven
//! by real traffic; the verdict must be right and the evidence numbers must match what the
//! scenario did (the namespace's own counters, the server's accept count).

use std::{path::Path, time::Duration};

use serde_json::Value;
use socktrace_tests::{Cgroup, NetNs, Scenario, diagnose, diagnose_report as report, finding_evidence as evidence, number_before, privileged, probes, veth_pair};

const SCENARIO: &str = env!("CARGO_BIN_EXE_st-scenario");

fn scen(args: &[&str]) -> Scenario {
    Scenario::start(Path::new(SCENARIO), &args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
}

fn verdicts(l: &Value) -> Vec<String> {
    l["findings"].as_array().unwrap().iter().map(|f| f["verdict"].as_str().unwrap().to_owned()).collect()
}

/// Drops in the evidence vs the namespace's TcpExtListenOverflows (bounded when the SYN-drop
/// signal runs on its cgroup_skb fallback, as measured in the privileged suite).
fn assert_drops_match(ev: &str, delta: i64, cg: &Cgroup) {
    let cgp = cg.path.to_string_lossy().into_owned();
    let hooks = probes(&["--cgroup", &cgp]).unwrap();
    let seen = number_before(ev, "SYN drops") + number_before(ev, "listen overflows");
    let bound = if hooks["syn_drop"].as_deref() == Some("cgroup_skb") { (delta * 8 / 100).max(3) } else { 0 };
    assert!((seen - delta).abs() <= bound, "evidence says {seen} drops, kernel {delta} (bound {bound})");
}

#[test]
fn healthy() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("dgok").unwrap();
    let cg = Cgroup::new("dgok").unwrap();
    let d = diagnose(&ns, &cg, 9500, 4);
    let server = scen(&["server", "--netns", &ns.name, "--addr", "127.0.0.1:9500", "--backlog", "128", "--run-ms", "4500"]);
    scen(&["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9500", "--count", "20", "--hold-ms", "200"]).wait(Duration::from_secs(30)).unwrap();
    server.wait(Duration::from_secs(30)).unwrap();
    let l = report(d, 9500);
    assert_eq!(l["verdict"], "healthy");
    assert!(verdicts(&l).is_empty());
}

#[test]
fn accept_stall() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("dgstall").unwrap();
    let cg = Cgroup::new("dgstall").unwrap();
    let cgp = cg.path.to_string_lossy().into_owned();
    let d = diagnose(&ns, &cg, 9501, 6);
    let before = ns.counters().unwrap();
    let server = scen(&["server", "--netns", &ns.name, "--cgroup", &cgp, "--addr", "127.0.0.1:9501", "--backlog", "8", "--accept-after-ms", "100000", "--run-ms", "7000"]);
    let clients = scen(&["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9501", "--count", "30", "--hold-ms", "4000", "--connect-timeout-ms", "3000"]);
    let l = report(d, 9501);
    let after = ns.counters().unwrap();
    drop((clients, server));
    assert_eq!(l["verdict"], "accept_stall", "{l}");
    let ev = evidence(&l, "accept_stall");
    assert!(ev.contains("0 accepted"), "{ev}");
    assert!(ev.contains("at its backlog 9/8"), "{ev}");
    assert_drops_match(&ev, after.delta(&before, "TcpExtListenOverflows"), &cg);
    assert_eq!(l["comm"], "st-scenario");
}

/// Fast accepts, but bursts of 40 simultaneous connections against backlog `backlog`.
fn bursty(tag: &str, port: u16, backlog: &str, somaxconn: Option<&str>) -> (Value, i64, u64, Cgroup) {
    let ns = NetNs::new(tag).unwrap();
    if let Some(s) = somaxconn {
        ns.exec(&["sysctl", "-qw", &format!("net.core.somaxconn={s}")]).unwrap();
    }
    let cg = Cgroup::new(tag).unwrap();
    let cgp = cg.path.to_string_lossy().into_owned();
    let addr = format!("127.0.0.1:{port}");
    let d = diagnose(&ns, &cg, port, 7);
    let before = ns.counters().unwrap();
    let server = scen(&["server", "--netns", &ns.name, "--cgroup", &cgp, "--addr", &addr, "--backlog", backlog, "--accept-delay-ms", "2", "--run-ms", "6500"]);
    let clients = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--count", "40", "--bursts", "3", "--burst-gap-ms", "1500", "--hold-ms", "100"]);
    clients.wait(Duration::from_secs(60)).unwrap();
    let lines = server.wait(Duration::from_secs(60)).unwrap();
    let accepted = lines.iter().find(|l| l["event"] == "done").unwrap()["accepted"].as_u64().unwrap();
    let l = report(d, port);
    let after = ns.counters().unwrap();
    (l, after.delta(&before, "TcpExtListenOverflows"), accepted, cg)
}

#[test]
fn backlog_too_small() {
    if !privileged() {
        return;
    }
    let (l, delta, accepted, cg) = bursty("dgburst", 9502, "4", None);
    assert!(delta > 0, "the bursts must overflow");
    assert_eq!(l["verdict"], "backlog_too_small", "{l}");
    assert!(!verdicts(&l).contains(&"somaxconn_cap".to_owned()), "somaxconn is 4096 here");
    let ev = evidence(&l, "backlog_too_small");
    assert_eq!(number_before(&ev, "accepted,") as u64, accepted, "{ev}");
    assert_drops_match(&ev, delta, &cg);
}

#[test]
fn somaxconn_cap() {
    if !privileged() {
        return;
    }
    let (l, delta, _, _cg) = bursty("dgcap", 9503, "128", Some("8"));
    assert!(delta > 0, "the bursts must overflow the capped queue");
    let v = verdicts(&l);
    assert!(v.contains(&"somaxconn_cap".to_owned()), "{v:?}");
    let ev = evidence(&l, "somaxconn_cap");
    assert!(ev.contains("backlog 8 = net.core.somaxconn 8; the application asked for 128"), "{ev}");
}

#[test]
fn syn_flood() {
    if !privileged() {
        return;
    }
    let (attacker, victim) = veth_pair("dgfl").unwrap();
    let cg = Cgroup::new("dgfl").unwrap();
    let d = diagnose(&victim, &cg, 9504, 6);
    let before = victim.counters().unwrap();
    let server = scen(&["server", "--netns", &victim.name, "--addr", "10.77.0.2:9504", "--backlog", "128", "--run-ms", "7000"]);
    let flood = scen(&["synflood", "--netns", &attacker.name, "--addr", "10.77.0.2:9504", "--src-net", "10.78", "--rate", "2000", "--duration-ms", "3000"]);
    let sent = flood.wait(Duration::from_secs(30)).unwrap();
    let l = report(d, 9504);
    let after = victim.counters().unwrap();
    drop(server);
    eprintln!("flood: {:?}", sent.last());
    assert_eq!(l["verdict"], "syn_flood", "{l}");
    let ev = evidence(&l, "syn_flood");
    assert_eq!(number_before(&ev, "SYN cookies sent"), after.delta(&before, "TcpExtSyncookiesSent"), "{ev}");
    assert!(number_before(&ev, "half-open") >= 64, "{ev}");
}

#[test]
fn packet_loss() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("dgloss").unwrap();
    let cg = Cgroup::new("dgloss").unwrap();
    let rules = "table inet socktrace_loss {\n chain input {\n  type filter hook input priority 0; policy accept;\n  tcp sport 9505 meta length > 120 numgen random mod 100 < 10 drop\n }\n}\n";
    let file = std::env::temp_dir().join(format!("socktrace-dgloss-{}.nft", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    ns.exec(&["nft", "-f", &file.to_string_lossy()]).unwrap();
    let _ = std::fs::remove_file(&file);
    let d = diagnose(&ns, &cg, 9505, 6);
    let before = ns.counters().unwrap();
    let server = scen(&["server", "--netns", &ns.name, "--addr", "127.0.0.1:9505", "--backlog", "128", "--drain", "--reply-chunks", "150", "--chunk-bytes", "200", "--max-accepts", "10", "--run-ms", "5000"]);
    scen(&["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9505", "--count", "10", "--hold-ms", "3000"]).wait(Duration::from_secs(60)).unwrap();
    server.wait(Duration::from_secs(60)).unwrap();
    let l = report(d, 9505);
    let after = ns.counters().unwrap();
    assert_eq!(l["verdict"], "packet_loss", "{l}");
    let ev = evidence(&l, "packet_loss");
    let retrans = number_before(&ev, "segments retransmitted");
    let synack = number_before(&ev, "SYN-ACK retransmits");
    assert_eq!(retrans + synack, after.delta(&before, "TcpRetransSegs"), "{ev}");
}

#[test]
fn no_listener() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("dgnone").unwrap();
    let cg = Cgroup::new("dgnone").unwrap();
    let d = diagnose(&ns, &cg, 9506, 3);
    let before = ns.counters().unwrap();
    let c = scen(&["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9506", "--count", "7", "--hold-ms", "10"]);
    let lines = c.wait(Duration::from_secs(30)).unwrap();
    assert!(lines.iter().filter(|l| l["event"] == "connect").all(|l| l["ok"] == false), "nothing listens");
    let l = report(d, 9506);
    let after = ns.counters().unwrap();
    assert_eq!(l["verdict"], "no_listener", "{l}");
    let ev = evidence(&l, "no_listener");
    assert_eq!(number_before(&ev, "TCP resets sent"), after.delta(&before, "TcpOutRsts"), "{ev}");
}
