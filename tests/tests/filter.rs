//! The one filter expression on every tracing command (issue 12): in a network namespace with
//! three listeners (127.0.0.1:9711, 127.0.0.2:9712, `[::1]:9713`) and a different number of
//! connections to each, `ss`'s expression `( sport = :9711 or src 127.0.0.2 )` selects the first
//! two on `watch` (accept events), `top`, `diagnose` and `serve` (listeners), with each one's
//! accept count;
//! terms a command cannot apply and bad expressions are one-line usage errors (exit 2) with the
//! position, for every command. Needs root; run with `--test-threads=1`.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use serde_json::Value;
use socktrace_tests::{Cgroup, NetNs, Scenario, Serve, Socktrace, Watch, http_get, of_kind, privileged, socktrace_bin};

const SCENARIO: &str = env!("CARGO_BIN_EXE_st-scenario");

/// (address, connections): distinct counts so a row cannot borrow another's.
const LISTENERS: [(&str, u64); 3] = [("127.0.0.1:9711", 3), ("127.0.0.2:9712", 5), ("[::1]:9713", 4)];
const EXPR: &str = "( sport = :9711 or src 127.0.0.2 )";
/// What [`EXPR`] selects: port → connections.
fn expected() -> BTreeMap<u64, u64> {
    BTreeMap::from([(9711, 3), (9712, 5)])
}

fn scen(args: &[&str]) -> Scenario {
    Scenario::start(Path::new(SCENARIO), &args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
}

/// Starts the three servers (in the cgroup), then the clients of each, and waits for the clients.
fn traffic(ns: &NetNs, cg: &Cgroup, run_ms: u64) -> Vec<Scenario> {
    let cgp = cg.path.to_string_lossy().into_owned();
    let run = run_ms.to_string();
    let servers: Vec<Scenario> =
        LISTENERS.iter().map(|(addr, _)| scen(&["server", "--netns", &ns.name, "--cgroup", &cgp, "--addr", addr, "--backlog", "64", "--run-ms", &run])).collect();
    std::thread::sleep(Duration::from_millis(200));
    for (addr, n) in LISTENERS {
        scen(&["clients", "--netns", &ns.name, "--addr", addr, "--count", &n.to_string(), "--hold-ms", "50"]).wait(Duration::from_secs(30)).unwrap();
    }
    servers
}

#[test]
fn watch_selects_events_by_both_ends() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("fw").unwrap();
    let cg = Cgroup::new("fw").unwrap();
    let cgp = cg.path.to_string_lossy().into_owned();
    let inode = ns.inode().to_string();
    let w = Watch::start(&["--netns", &inode, "--cgroup", &cgp, EXPR]).unwrap();
    // A second watch with remote-side terms: the clients' ports are ephemeral (> 1024), the peer
    // is the same loopback address as the listener.
    let w2 = Watch::start(&["--netns", &inode, "--cgroup", &cgp, "dport > :1024 and dst [::1]"]).unwrap();
    let servers = traffic(&ns, &cg, 1500);
    for s in servers {
        s.wait(Duration::from_secs(30)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let records = w.finish().unwrap();
    let mut got: BTreeMap<u64, u64> = BTreeMap::new();
    for r in of_kind(&records, "accept") {
        *got.entry(r["lport"].as_u64().unwrap()).or_default() += 1;
    }
    assert_eq!(got, expected(), "accept events per port under {EXPR:?}");
    for r in records.iter().filter(|r| r["kind"] != "lost") {
        assert!(r["lport"] == 9711 || r["laddr"] == "127.0.0.2", "event outside {EXPR:?}: {r}");
    }
    let v6: Vec<Value> = of_kind(&w2.finish().unwrap(), "accept").into_iter().cloned().collect();
    assert_eq!(v6.len(), 4, "accepts from [::1] clients: {v6:?}");
    assert!(v6.iter().all(|r| r["lport"] == 9713 && r["raddr"] == "::1" && r["rport"].as_u64().unwrap() > 1024));
}

#[test]
fn top_diagnose_and_serve_select_listeners() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("ftd").unwrap();
    let cg = Cgroup::new("ftd").unwrap();
    let cgp = cg.path.to_string_lossy().into_owned();
    let inode = ns.inode().to_string();
    let top = Socktrace::start(&["top", "--json", "--interval", "1s", "--iterations", "5", "--netns", &inode, "--cgroup", &cgp, EXPR], "tracing started").unwrap();
    let diag = Socktrace::start(&["diagnose", "--json", "--duration", "5s", "--netns", &inode, "--cgroup", &cgp, EXPR], "observing for").unwrap();
    let serve = Serve::start(19471, &["--netns", &inode, "--cgroup", &cgp, EXPR]).unwrap();
    let servers = traffic(&ns, &cg, 7000);
    std::thread::sleep(Duration::from_millis(500));
    // serve: accept counters only for the selected listeners (the scrape closes the interval).
    let (status, metrics) = http_get(&serve.addr, "/metrics", Duration::from_secs(5)).unwrap();
    assert_eq!(status, 200);
    let mut exported: BTreeMap<u64, u64> = BTreeMap::new();
    for line in metrics.lines().filter(|l| l.starts_with("socktrace_accepts_total{")) {
        let port = line.split("lport=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().parse().unwrap();
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap_or_else(|_| panic!("an integer counter: {line}"));
        *exported.entry(port).or_default() += n;
    }
    assert_eq!(exported, expected(), "socktrace_accepts_total per port:\n{metrics}");
    drop(serve);
    let lines = top.wait(Duration::from_mins(1)).unwrap();
    let report = diag.wait(Duration::from_mins(1)).unwrap();
    drop(servers);

    // top: every interval shows only selected listeners; the accepts add up per port.
    let mut totals: BTreeMap<u64, u64> = BTreeMap::new();
    let mut listening: BTreeMap<u64, String> = BTreeMap::new();
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap();
        for r in v["listeners"].as_array().unwrap() {
            let port = r["lport"].as_u64().unwrap();
            assert!(expected().contains_key(&port), "top showed port {port}: {r}");
            *totals.entry(port).or_default() += r["accepts"].as_u64().unwrap();
            if let Some(a) = r["laddr"].as_str() {
                listening.insert(port, a.to_owned());
            }
        }
    }
    assert_eq!(totals, expected(), "accepts per listener shown by top");
    assert_eq!(listening, BTreeMap::from([(9711, "127.0.0.1".to_owned()), (9712, "127.0.0.2".to_owned())]));

    // diagnose: a report for the selected listeners only, with their accepts.
    let v: Value = serde_json::from_str(report.last().expect("diagnose printed nothing")).unwrap();
    let ports: BTreeMap<u64, &Value> = v["listeners"].as_array().unwrap().iter().map(|l| (l["lport"].as_u64().unwrap(), l)).collect();
    assert_eq!(ports.keys().copied().collect::<Vec<_>>(), vec![9711, 9712], "{v}");
    for l in ports.values() {
        assert_eq!(l["verdict"], "healthy", "{l}");
    }
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(socktrace_bin()).args(args).output().unwrap()
}

#[test]
fn every_command_gives_one_line_usage_errors_with_the_position() {
    if !privileged() {
        return;
    }
    for cmd in ["watch", "top", "diagnose", "serve", "snapshot"] {
        for (expr, needle) in [
            ("sport = :80 )", "bad filter at 13: unbalanced \")\""),
            ("sport = http", "bad filter at 9: \"http\" is not a port"),
            ("src 10.0.0.0/33", "bad filter at 5: \"10.0.0.0/33\": prefix length"),
            ("( dport = :1", "bad filter at 13: missing \")\" to close \"(\" at 1"),
            ("bogus", "bad filter at 1: unknown term \"bogus\""),
        ] {
            let out = run(&[cmd, expr]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {expr:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{cmd} {expr:?}: {err}");
            assert!(err.starts_with("socktrace: ") && err.contains(needle), "{cmd} {expr:?}: {err}");
            assert!(out.stdout.is_empty());
        }
    }
    // Terms a command cannot apply: said, with the position, not ignored.
    for (args, needle) in [
        (&["top", "sport = :80 and dport = :443"][..], "bad filter at 17: dport: top shows listeners, which have no peer"),
        (&["serve", "dst 10.0.0.1"], "bad filter at 1: dst: serve shows listeners"),
        (&["diagnose", "state", "established"], "bad filter at 1: diagnose shows listening sockets"),
        (&["watch", "state", "listening", "sport = :80"], "bad filter at 1: watch filters events, which have no socket state"),
        (&["top", "--pid", "1"], "--pid: top shows listeners"),
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A namespace the expression names must exist (a runtime error, like --netns).
    let out = run(&["top", "netns", "st-no-such-namespace"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}
