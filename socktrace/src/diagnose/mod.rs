//! `socktrace diagnose`: observe listeners for a window, then say what is wrong with each —
//! a verdict with the evidence and its numbers, the fix in order, and how to verify the fix.
//!
//! Evidence comes from the eBPF aggregates and accept events (through the [`Agent`]), sock_diag
//! samples every [`SAMPLE`], and the network namespace's own TcpExt/Tcp counters and sysctls,
//! read from inside it. The judgement is in [`rules`], pure and unit-tested.

pub mod rules;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    time::Duration,
};

use serde::Serialize;
use tokio::signal::unix::SignalKind;

use crate::{
    agent::Agent,
    model::{self, ListenerKey},
    snapshot::netns,
    system,
};
use rules::{Evidence, Finding, THRESHOLDS, Target};

/// sock_diag / interval sampling period.
pub const SAMPLE: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Markdown,
    Json,
}

/// Per-netns counters and sysctls.
#[derive(Clone, Debug, Default)]
struct NetnsFacts {
    counters: BTreeMap<String, i64>,
    somaxconn: Option<u32>,
    syncookies: Option<u32>,
}

fn read_facts() -> NetnsFacts {
    let mut counters = BTreeMap::new();
    for f in ["/proc/thread-self/net/netstat", "/proc/thread-self/net/snmp"] {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [head, vals] = pair else { continue };
            let mut h = head.split_whitespace();
            let prefix = h.next().unwrap_or("").trim_end_matches(':').to_owned();
            for (k, v) in h.zip(vals.split_whitespace().skip(1)) {
                if let Ok(v) = v.parse::<i64>() {
                    counters.insert(format!("{prefix}{k}"), v);
                }
            }
        }
    }
    let sysctl = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse().ok());
    NetnsFacts {
        counters,
        somaxconn: sysctl("/proc/sys/net/core/somaxconn"),
        syncookies: sysctl("/proc/sys/net/ipv4/tcp_syncookies"),
    }
}

fn facts_of(netns: u32, known: &mut BTreeMap<u32, Option<netns::Netns>>) -> Option<NetnsFacts> {
    let ns = known
        .entry(netns)
        .or_insert_with(|| netns::discover().namespaces.into_iter().find(|n| n.inode == netns))
        .clone()?;
    netns::within(&ns, None, read_facts).ok()
}

/// Accumulated over the window for one listener.
#[derive(Default)]
struct Acc {
    samples: u32,
    full: u32,
    peak: Option<u32>,
    listening: bool,
    backlog: Option<u32>,
    drops_intervals: u32,
    max_burst: u64,
    syn_recv_max: Option<u32>,
    accepts: u64,
    overflows: u64,
    syn_drops: u64,
    synack: u64,
    retrans: u64,
}

/// Closes an interval of the agent and adds it to each listener's accumulator (netns facts are
/// read the first time a namespace shows up).
fn take_interval(
    agent: &mut Agent,
    accs: &mut BTreeMap<ListenerKey, Acc>,
    before: &mut BTreeMap<u32, NetnsFacts>,
    paths: &mut BTreeMap<u32, Option<netns::Netns>>,
) -> anyhow::Result<()> {
    agent.close_interval()?;
    for (key, l) in &agent.model.listeners {
        if !before.contains_key(&key.netns) {
            if let Some(f) = facts_of(key.netns, paths) {
                before.insert(key.netns, f);
            }
        }
        let a = accs.entry(*key).or_default();
        a.samples += 1;
        a.listening |= l.listening;
        if l.backlog.is_some() {
            a.backlog = l.backlog;
        }
        let peak = l.queue_peak.or(l.queue_len);
        if let Some(p) = peak {
            a.peak = Some(a.peak.map_or(p, |x| x.max(p)));
        }
        let at_backlog = |q: Option<u32>| matches!((q, l.backlog), (Some(q), Some(b)) if q >= b && b > 0);
        if at_backlog(l.queue_len) || at_backlog(l.queue_peak) {
            a.full += 1;
        }
        let i = &l.interval;
        if i.overflows + i.syn_drops > 0 {
            a.drops_intervals += 1;
        }
        a.max_burst = a.max_burst.max(i.accepts + i.overflows + i.syn_drops);
        a.accepts += i.accepts;
        a.overflows += i.overflows;
        a.syn_drops += i.syn_drops;
        a.synack += i.synack_retransmits;
        a.retrans += i.retransmits;
        if let Some(n) = l.syn_recv {
            a.syn_recv_max = Some(a.syn_recv_max.map_or(n, |x| x.max(n)));
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct Report {
    netns: u32,
    laddr: Option<String>,
    lport: u16,
    pid: Option<u32>,
    comm: Option<String>,
    verdict: &'static str,
    findings: Vec<Finding>,
}

pub async fn run(mut agent: Agent, duration: Duration, format: Format) -> anyhow::Result<()> {
    eprintln!("{}", agent.tracer.summary());
    agent.model.keep_total_waits = true;
    let mut paths = BTreeMap::new();
    let mut before: BTreeMap<u32, NetnsFacts> = BTreeMap::new();
    let scope_netns = agent.filter.netns.or_else(system::own_netns);
    // Baseline counters of every namespace in scope (all of them without --netns), so that what
    // happens right at the start of the window counts in the deltas.
    let scope: Vec<netns::Netns> = match agent.filter.netns {
        Some(n) => netns::discover().namespaces.into_iter().filter(|ns| ns.inode == n).collect(),
        None => netns::discover().namespaces,
    };
    for ns in scope {
        let inode = ns.inode;
        paths.insert(inode, Some(ns));
        if let Some(f) = facts_of(inode, &mut paths) {
            before.insert(inode, f);
        }
    }
    // Only once the baseline counters are read: scripts start traffic on this line.
    eprintln!("socktrace: observing for {:.1} s", duration.as_secs_f64());
    let mut accs: BTreeMap<ListenerKey, Acc> = BTreeMap::new();
    let mut ticker = tokio::time::interval(SAMPLE);
    ticker.tick().await;
    let deadline = tokio::time::sleep(duration);
    tokio::pin!(deadline);
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let t0 = system::monotonic_ns();
    loop {
        tokio::select! {
            r = agent.pump() => r?,
            _ = ticker.tick() => take_interval(&mut agent, &mut accs, &mut before, &mut paths)?,
            () = &mut deadline => break,
            _ = sigint.recv() => break,
        }
    }
    // The part of the window since the last sample counts too (the counters' "after" includes it).
    take_interval(&mut agent, &mut accs, &mut before, &mut paths)?;
    let window = (system::monotonic_ns() - t0) as f64 / 1e9;
    let now = system::monotonic_ns();
    let mut after: BTreeMap<u32, NetnsFacts> = BTreeMap::new();
    for n in before.keys() {
        if let Some(f) = facts_of(*n, &mut paths) {
            after.insert(*n, f);
        }
    }
    let delta = |n: u32, k: &str| -> Option<i64> {
        Some(after.get(&n)?.counters.get(k)? - before.get(&n)?.counters.get(k)?)
    };
    let mut reports = Vec::new();
    for (key, a) in &accs {
        let Some(l) = agent.model.listeners.get(key) else { continue };
        let facts = after.get(&key.netns);
        let waits = l.waits_total.as_ref().and_then(model::quantiles);
        let e = Evidence {
            window_secs: window,
            // Seen in a sock_diag sample, or it accepted during the window (a short-lived listener can
            // fall between samples).
            listening: a.listening || a.accepts > 0 || !agent.diag_ok,
            backlog: a.backlog,
            requested_backlog: l.requested_backlog,
            somaxconn: facts.and_then(|f| f.somaxconn),
            syncookies_sysctl: facts.and_then(|f| f.syncookies),
            samples: a.samples,
            samples_full: a.full,
            queue_peak: a.peak,
            accepts: a.accepts,
            overflows: a.overflows,
            syn_drops: a.syn_drops,
            intervals_with_drops: a.drops_intervals,
            max_burst: a.max_burst,
            wait_p50_ns: waits.map(|w| w.0),
            wait_p99_ns: waits.map(|w| w.1),
            wait_max_ns: waits.map(|w| w.2),
            synack_retransmits: a.synack,
            retransmits: a.retrans,
            syn_recv_max: a.syn_recv_max,
            cookies_sent: delta(key.netns, "TcpExtSyncookiesSent"),
            cookies_recv: delta(key.netns, "TcpExtSyncookiesRecv"),
            out_rsts: delta(key.netns, "TcpOutRsts"),
            last_accept_ago_secs: l.last_acceptor.as_ref().map(|x| now.saturating_sub(x.ts_ns) as f64 / 1e9),
            acceptor: l.last_acceptor.as_ref().map(|x| (x.tid, x.comm.clone())),
        };
        let findings = rules::diagnose(&e, &THRESHOLDS, &Target { netns: key.netns, lport: key.lport });
        let owner = l.owners.first().cloned().or_else(|| l.last_acceptor.as_ref().map(|x| (x.pid, x.comm.clone())));
        reports.push(Report {
            netns: key.netns,
            laddr: l.laddrs.iter().next().map(ToString::to_string),
            lport: key.lport,
            pid: owner.as_ref().map(|o| o.0),
            comm: owner.map(|o| o.1),
            verdict: findings.first().map_or("healthy", |f| f.verdict),
            findings,
        });
    }
    // A port asked for by --port with no listener in scope: connections to it are refused.
    if let (Some(port), Some(netns)) = (agent.filter.port, scope_netns) {
        let listening = accs.iter().any(|(k, a)| k.lport == port && k.netns == netns && a.listening);
        if !listening && agent.diag_ok && !reports.iter().any(|r| r.lport == port && r.netns == netns) {
            let e = Evidence { listening: false, out_rsts: delta(netns, "TcpOutRsts"), window_secs: window, ..Evidence::default() };
            let findings = rules::diagnose(&e, &THRESHOLDS, &Target { netns, lport: port });
            reports.push(Report { netns, laddr: None, lport: port, pid: None, comm: None, verdict: "no_listener", findings });
        }
    }
    let mut out = std::io::stdout().lock();
    // Signals no hook traces on this kernel: their counts are unknown, not 0.
    let untraced = agent.tracer.traced().missing();
    match format {
        Format::Json => {
            serde_json::to_writer(&mut out, &serde_json::json!({ "window_s": window, "sock_diag": agent.diag_ok, "untraced": untraced, "listeners": reports }))?;
            writeln!(out)?;
        }
        Format::Text | Format::Markdown => print_reports(&mut out, &reports, format == Format::Markdown, window, agent.diag_ok, &untraced)?,
    }
    Ok(())
}

fn print_reports(out: &mut impl Write, reports: &[Report], md: bool, window: f64, diag_ok: bool, untraced: &[&str]) -> anyhow::Result<()> {
    let healthy: BTreeSet<String> =
        reports.iter().filter(|r| r.findings.is_empty()).map(|r| format!("{}:{}", r.netns, r.lport)).collect();
    if md {
        writeln!(out, "# socktrace diagnose ({window:.1} s window)\n")?;
    } else {
        writeln!(out, "socktrace diagnose: {} listeners observed for {window:.1} s", reports.len())?;
    }
    if !diag_ok {
        writeln!(out, "{}sock_diag was unavailable: queue-now, backlog and owner evidence is missing", if md { "> " } else { "note: " })?;
    }
    if !untraced.is_empty() {
        writeln!(
            out,
            "{}UNAVAILABLE on this kernel (`socktrace probes` says why): {} — their counts are unknown, not 0, and verdicts resting on them cannot be reached",
            if md { "> " } else { "note: " },
            untraced.join(", ")
        )?;
    }
    for r in reports.iter().filter(|r| !r.findings.is_empty()) {
        let who = match (&r.comm, r.pid) {
            (Some(c), Some(p)) => format!("{c} (pid {p})"),
            _ => "owner unknown".into(),
        };
        let addr = r.laddr.clone().unwrap_or_else(|| "*".into());
        if md {
            writeln!(out, "\n## `{addr}:{}` in netns {} — {who}: **{}**\n", r.lport, r.netns, r.verdict)?;
        } else {
            writeln!(out, "\n{addr}:{} netns {} — {who}: {}", r.lport, r.netns, r.verdict.to_uppercase())?;
        }
        for f in &r.findings {
            if md {
                writeln!(out, "### {} ({:?})\n", f.verdict, f.severity)?;
            } else {
                writeln!(out, "  [{:?}] {}", f.severity, f.verdict)?;
            }
            for (title, items) in [("Evidence", &f.evidence), ("Fix, in order", &f.fix), ("Verify", &f.verify)] {
                if md {
                    writeln!(out, "**{title}**\n")?;
                    for (i, it) in items.iter().enumerate() {
                        if title == "Fix, in order" {
                            writeln!(out, "{}. {it}", i + 1)?;
                        } else if title == "Verify" {
                            writeln!(out, "- `{it}`")?;
                        } else {
                            writeln!(out, "- {it}")?;
                        }
                    }
                    writeln!(out)?;
                } else {
                    writeln!(out, "    {title}:")?;
                    for (i, it) in items.iter().enumerate() {
                        if title == "Fix, in order" {
                            writeln!(out, "      {}. {it}", i + 1)?;
                        } else {
                            writeln!(out, "      - {it}")?;
                        }
                    }
                }
            }
        }
    }
    if !healthy.is_empty() {
        writeln!(out, "\n{}healthy: {}", if md { "**" } else { "" }, healthy.into_iter().collect::<Vec<_>>().join(", "))?;
    }
    Ok(())
}
