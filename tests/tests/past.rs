//! `socktrace diagnose` past the accept queue: connections that never reach the listener. One
//! scenario per verdict, each in its own network namespace with real traffic; the evidence must
//! equal the kernel's own counters (the nftables rule's counter, TcpOutRsts, TcpExtTCPSynRetrans).

use std::{path::Path, time::Duration};

use serde_json::Value;
use socktrace_tests::{
    Cgroup, NetNs, Scenario,
    diag::{Diagnose, evidence, number_before},
    privileged, probes, veth_pair,
};

const SCENARIO: &str = env!("CARGO_BIN_EXE_st-scenario");

fn scen(args: &[&str]) -> Scenario {
    Scenario::start(Path::new(SCENARIO), &args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
}

/// Starts `diagnose --json --netns NS --port PORT` for `secs`.
fn diagnose<'a>(ns: &'a NetNs, cg: &Cgroup, port: u16, secs: u32) -> Diagnose<'a> {
    Diagnose::start(ns, cg, port, secs, true).unwrap()
}

/// Its report for `port` in `ns` (printed, with what diagnose lost or the kernel skipped, and the
/// programs' own tallies: a count short of the kernel's then says whether runs of our programs
/// were missed or never happened).
fn report(d: Diagnose, ns: &NetNs, port: u16) -> Value {
    let o = d.finish().unwrap();
    eprintln!(
        "diagnose: {} events lost, {} program runs missed, {} kernel reads failed, {} PAST updates failed, map evictions {}; {} client SYN retransmits and {} netfilter drops seen (every namespace); {} other BPF programs loaded or unloaded",
        o.json["events_lost"],
        o.json["program_runs_missed"],
        o.json["kernel_read_errors"],
        o.json["past_counts_lost"],
        o.json["map_evictions"],
        o.json["client_syn_retransmits_seen"],
        o.json["netfilter_drops_seen"],
        o.json["other_bpf_programs_changed"]
    );
    o.assert_no_map_pressure();
    assert_eq!(o.json["past_counts_lost"], 0, "every PAST update found or created its row");
    // Every kernel here (5.10+) reports each program load and unload.
    assert_eq!(o.json["other_bpf_programs_exact"], true, "other programs counted from the kernel's BPF events");
    o.listener(ns.inode(), port)
}

/// Loads an nftables ruleset into `ns`.
fn nft(ns: &NetNs, tag: &str, rules: &str) {
    let file = std::env::temp_dir().join(format!("socktrace-{tag}-{}.nft", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let r = ns.exec(&["nft", "-f", &file.to_string_lossy()]);
    let _ = std::fs::remove_file(&file);
    r.unwrap();
}

/// Packets counted by the (single) counter of `table inet NAME` (`nft -j list ruleset`).
fn nft_counter(ns: &NetNs, table: &str) -> i64 {
    let out = ns.exec(&["nft", "-j", "list", "table", "inet", table]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    let counters: Vec<i64> = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["rule"]["expr"].as_array())
        .flatten()
        .filter_map(|e| e["counter"]["packets"].as_i64())
        .collect();
    assert_eq!(counters.len(), 1, "one counter in {out}");
    counters[0]
}

/// Whether the kernel can count netfilter drops (kfree_skb with reason NETFILTER_DROP).
fn packet_drop_hook(cg: &Cgroup) -> bool {
    let cgp = cg.path.to_string_lossy().into_owned();
    probes(&["--cgroup", &cgp]).unwrap()["packet_drop"].is_some()
}

#[test]
fn firewall_drop() {
    if privileged() {
        firewall_scenario("pfw", "127.0.0.1", 9510);
    }
}

/// The same over IPv6 loopback (the program parses the IPv6 header for the port and peer).
#[test]
fn firewall_drop_ipv6() {
    if privileged() {
        firewall_scenario("pfw6", "::1", 9514);
    }
}

/// 70 % of the SYNs to `port` dropped on input; the clients on `ip` retransmit theirs: the
/// verdict, and every count equal to the kernel's (nft's rule counter, TCPSynRetrans).
fn firewall_scenario(tag: &str, ip: &str, port: u16) {
    let ns = NetNs::new(tag).unwrap();
    let cg = Cgroup::new(tag).unwrap();
    nft(&ns, tag, &format!("table inet socktrace_fw {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  tcp dport {port} tcp flags & (syn | ack) == syn numgen random mod 100 < 70 counter drop\n }}\n}}\n"));
    let addr = std::net::SocketAddr::new(ip.parse().unwrap(), port).to_string();
    // The clients give up after 4 s (SYNs at 0, 1 and 3 s): the window leaves 6 s for starting
    // the server and the clients, and the test checks that their traffic ended inside it.
    let d = diagnose(&ns, &cg, port, 10);
    let before = ns.counters().unwrap();
    let server = scen(&["server", "--netns", &ns.name, "--addr", &addr, "--backlog", "128", "--run-ms", "11000"]);
    let clients = scen(&["clients", "--netns", &ns.name, "--addr", &addr, "--count", "20", "--hold-ms", "100", "--connect-timeout-ms", "4000"]);
    let lines = clients.wait(Duration::from_secs(60)).unwrap();
    let margin = d.window_end().saturating_duration_since(std::time::Instant::now());
    assert!(margin > Duration::from_millis(300), "the clients ended {margin:?} before the diagnose window's end: the window did not cover their traffic");
    let connected = lines.iter().find(|l| l["event"] == "done").unwrap()["connected"].as_i64().unwrap();
    let l = report(d, &ns, port);
    let after = ns.counters().unwrap();
    drop(server);
    let dropped = nft_counter(&ns, "socktrace_fw");
    let syn_retrans = after.delta(&before, "TcpExtTCPSynRetrans");
    eprintln!("nft dropped {dropped} SYNs, {connected} of 20 clients connected, TcpExtTCPSynRetrans +{syn_retrans}; clients done {margin:?} before the window end");
    assert!(dropped > 0 && syn_retrans > 0, "the rule must drop SYNs and the clients retransmit");
    if !packet_drop_hook(&cg) {
        // Without the drop reason, diagnose must not say healthy: it says it cannot see why.
        assert_eq!(l["verdict"], "connect_failures", "{l}");
        assert!(evidence(&l, "connect_failures").contains("UNAVAILABLE"));
        return;
    }
    assert_eq!(l["verdict"], "firewall_drop", "{l}");
    let ev = evidence(&l, "firewall_drop");
    assert_eq!(number_before(&ev, "SYNs (connection attempts)"), dropped, "{ev}");
    assert_eq!(number_before(&ev, "other segments"), 0, "{ev}");
    assert_eq!(number_before(&ev, "connections accepted"), connected, "{ev}");
    assert!(ev.contains(&format!("from 1 distinct peers: {ip}")), "{ev}");
    assert_eq!(number_before(&ev, "SYN retransmits by local clients"), syn_retrans, "{ev}");
    assert_eq!(l["window_counts"]["netfilter_drops"], dropped, "{l}");
    assert_eq!(l["window_counts"]["client_syn_retransmits"], syn_retrans, "{l}");
}

#[test]
fn wrong_address() {
    if !privileged() {
        return;
    }
    let (clients_ns, server_ns) = veth_pair("pwa").unwrap();
    let cg = Cgroup::new("pwa").unwrap();
    let d = diagnose(&server_ns, &cg, 9511, 5);
    let before = server_ns.counters().unwrap();
    // Listening on loopback only; the clients come to the veth address.
    let server = scen(&["server", "--netns", &server_ns.name, "--addr", "127.0.0.1:9511", "--backlog", "128", "--run-ms", "6000"]);
    let lines = scen(&["clients", "--netns", &clients_ns.name, "--addr", "10.77.0.2:9511", "--count", "9", "--hold-ms", "10", "--connect-timeout-ms", "3000"])
        .wait(Duration::from_secs(30))
        .unwrap();
    assert!(lines.iter().filter(|l| l["event"] == "connect").all(|l| l["ok"] == false), "nothing listens on 10.77.0.2");
    let l = report(d, &server_ns, 9511);
    let after = server_ns.counters().unwrap();
    drop(server);
    let rsts = after.delta(&before, "TcpOutRsts");
    assert!(rsts >= 9, "every attempt is refused with a RST: {rsts}");
    if !packet_drop_hook(&cg) {
        eprintln!("skipped the verdict: this kernel's kfree_skb has no NO_SOCKET reason");
        return;
    }
    assert_eq!(l["verdict"], "wrong_address", "{l}");
    let ev = evidence(&l, "wrong_address");
    assert_eq!(number_before(&ev, "SYNs to 10.77.0.2 port 9511 answered with a RST"), rsts, "{ev}");
    assert!(ev.contains("the listener is bound to 127.0.0.1 only"), "{ev}");
    assert_eq!(number_before(&ev, "TCP resets sent"), rsts, "{ev}");
    assert_eq!(l["window_counts"]["no_socket_syns"], rsts, "{l}");
}

#[test]
fn connect_failures_cause_not_visible() {
    if !privileged() {
        return;
    }
    // Asymmetric routing: the clients send from 10.88.0.1, which the server's namespace routes
    // nowhere (blackhole) and checks strictly (rp_filter = 1), so the kernel drops every SYN
    // before any listener or netfilter sees it (reason IP_RPFILTER). No client connects.
    let (clients_ns, server_ns) = veth_pair("pcf").unwrap();
    let cg = Cgroup::new("pcf").unwrap();
    let (va, vb) = (format!("va{}", std::process::id() % 100_000), format!("vb{}", std::process::id() % 100_000));
    let link: Value = serde_json::from_str(&server_ns.exec(&["ip", "-j", "link", "show", "dev", &vb]).unwrap()).unwrap();
    let mac = link[0]["address"].as_str().unwrap().to_owned();
    for cmd in [
        vec!["ip", "addr", "add", "10.88.0.1/32", "dev", &va],
        vec!["ip", "route", "add", "10.77.0.2/32", "dev", &va, "src", "10.88.0.1"],
        // The server's side would not answer ARP for that source either.
        vec!["ip", "neigh", "replace", "10.77.0.2", "lladdr", &mac, "dev", &va, "nud", "permanent"],
    ] {
        clients_ns.exec(&cmd).unwrap();
    }
    for cmd in [
        vec!["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"],
        vec!["sysctl", "-qw", &format!("net.ipv4.conf.{vb}.rp_filter=1")],
        vec!["ip", "route", "add", "blackhole", "10.88.0.0/16"],
    ] {
        server_ns.exec(&cmd).unwrap();
    }
    let d = diagnose(&server_ns, &cg, 9512, 6);
    let before = clients_ns.counters().unwrap();
    // Bound to every address: the clients' SYNs count for it because 10.77.0.2 is one of its
    // namespace's addresses (a client of another host's port 9512 would not).
    let server = scen(&["server", "--netns", &server_ns.name, "--addr", "0.0.0.0:9512", "--backlog", "128", "--run-ms", "7000"]);
    let lines = scen(&["clients", "--netns", &clients_ns.name, "--addr", "10.77.0.2:9512", "--count", "3", "--hold-ms", "10", "--connect-timeout-ms", "3500"])
        .wait(Duration::from_secs(30))
        .unwrap();
    assert!(lines.iter().filter(|l| l["event"] == "connect").all(|l| l["ok"] == false), "no SYN gets through");
    let l = report(d, &server_ns, 9512);
    let after = clients_ns.counters().unwrap();
    drop(server);
    let syn_retrans = after.delta(&before, "TcpExtTCPSynRetrans");
    assert!(syn_retrans > 0, "the clients retransmit their SYNs");
    assert_eq!(l["verdict"], "connect_failures", "{l}");
    let ev = evidence(&l, "connect_failures");
    assert!(ev.contains("cause not visible"), "{ev}");
    assert_eq!(number_before(&ev, "SYN retransmits from local clients"), syn_retrans, "{ev}");
}

const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// Lowers the global `net.netfilter.nf_conntrack_max` (read-only inside a non-initial netns)
/// and puts the old value back on drop, also when the test fails.
struct ConntrackMax(String);

impl ConntrackMax {
    fn lower(to: u64) -> ConntrackMax {
        let old = std::fs::read_to_string(CONNTRACK_MAX).unwrap().trim().to_owned();
        let guard = ConntrackMax(old);
        std::fs::write(CONNTRACK_MAX, to.to_string()).unwrap();
        guard
    }
}

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(CONNTRACK_MAX, &self.0) {
            eprintln!("could not restore {CONNTRACK_MAX} to {}: {e}", self.0);
        }
    }
}

/// `drop` of the netns's conntrack statistics, summed over CPUs (hex columns).
fn conntrack_drops(ns: &NetNs) -> i64 {
    ns.within(|| {
        let text = std::fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack").unwrap();
        let mut lines = text.lines();
        let col = lines.next().unwrap().split_whitespace().position(|c| c == "drop").unwrap();
        lines.map(|l| i64::from_str_radix(l.split_whitespace().nth(col).unwrap(), 16).unwrap()).sum()
    })
    .unwrap()
}

#[test]
fn conntrack_full() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("pct").unwrap();
    let cg = Cgroup::new("pct").unwrap();
    // A `ct` expression turns connection tracking on in this namespace.
    nft(&ns, "pct", "table inet socktrace_ct {\n chain input {\n  type filter hook input priority 0; policy accept;\n  ct state new counter\n }\n}\n");
    let used = ns.exec(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).unwrap();
    assert_eq!(used.trim(), "0", "a fresh namespace tracks nothing yet");
    let d = diagnose(&ns, &cg, 9513, 7);
    let before = conntrack_drops(&ns);
    let server = scen(&["server", "--netns", &ns.name, "--addr", "127.0.0.1:9513", "--backlog", "128", "--drain", "--run-ms", "8000"]);
    // The table holds 10 entries until the window ends (the limit applies to each namespace's
    // count against this global maximum; the initial namespace tracks nothing here). Restored on
    // drop, also when an assertion below fails.
    let max = ConntrackMax::lower(10);
    let lines = scen(&["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9513", "--count", "16", "--hold-ms", "4500", "--connect-timeout-ms", "3000"])
        .wait(Duration::from_secs(30))
        .unwrap();
    let connected = lines.iter().find(|l| l["event"] == "done").unwrap()["connected"].as_i64().unwrap();
    let l = report(d, &ns, 9513);
    drop(max);
    drop(server);
    let drops = conntrack_drops(&ns) - before;
    eprintln!("{connected} of 16 clients connected; conntrack dropped {drops}");
    assert!(drops > 0 && connected < 16, "the full table must drop new connections");
    assert_eq!(l["verdict"], "conntrack_full", "{l}");
    let ev = evidence(&l, "conntrack_full");
    assert_eq!(number_before(&ev, "new connections dropped"), drops, "{ev}");
    assert!(ev.contains("limit net.netfilter.nf_conntrack_max 10"), "{ev}");
}
