//! `socktrace diagnose`: observe listeners for a window, then say what is wrong with each —
//! a verdict with the evidence and its numbers, the fix in order, and how to verify the fix.
//!
//! Evidence comes from the eBPF aggregates and accept events (through the [`Agent`]), sock_diag
//! samples every [`SAMPLE`], and the network namespace's own TcpExt/Tcp counters and sysctls,
//! read from inside it. The judgement is in [`rules`], pure and unit-tested.

pub mod past;
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
    cli::Format,
    model::{self, ListenerKey},
    snapshot::netns,
    system,
};
use rules::{Episode, Evidence, Finding, Point, SocketFacts, THRESHOLDS, Target};
use socktrace_common::{kind, stat};

/// sock_diag / interval sampling period.
pub const SAMPLE: Duration = Duration::from_millis(200);

/// Per-netns counters and sysctls.
#[derive(Clone, Debug, Default)]
struct NetnsFacts {
    counters: BTreeMap<String, i64>,
    somaxconn: Option<u32>,
    syncookies: Option<u32>,
    /// Conntrack entries now in this netns and the (global) table limit; absent without conntrack.
    conntrack_count: Option<u64>,
    conntrack_max: Option<u64>,
    /// The namespace's interface addresses (`None`: could not be listed).
    addrs: Option<Vec<std::net::IpAddr>>,
}

/// Interface addresses of the calling thread's network namespace (getifaddrs).
fn interface_addrs() -> Option<Vec<std::net::IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return None;
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned; ifa_addr, when set, points to a
        // sockaddr of the family it names.
        unsafe {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let a = std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in>());
                        out.push(std::net::IpAddr::from(a.sin_addr.s_addr.to_ne_bytes()));
                    }
                    libc::AF_INET6 => {
                        let a = std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in6>());
                        out.push(std::net::IpAddr::from(a.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(head) };
    Some(out)
}

/// Per-netns conntrack statistics (`/proc/net/stat/nf_conntrack`: a header, then one line of hex
/// numbers per CPU), summed over CPUs into `counters` as `Conntrack<column>`.
fn read_conntrack_stats(counters: &mut BTreeMap<String, i64>) {
    let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack") else { return };
    parse_conntrack_stats(&text, counters);
}

/// The text of `/proc/net/stat/nf_conntrack` into `counters` ([`read_conntrack_stats`]).
pub fn parse_conntrack_stats(text: &str, counters: &mut BTreeMap<String, i64>) {
    let mut lines = text.lines();
    let Some(head) = lines.next() else { return };
    let names: Vec<&str> = head.split_whitespace().collect();
    for line in lines {
        for (name, v) in names.iter().zip(line.split_whitespace()) {
            if let (Ok(v), true) = (i64::from_str_radix(v, 16), matches!(*name, "drop" | "early_drop" | "insert_failed")) {
                // Saturating: the per-CPU values are the kernel's, but their sum is ours to bound.
                let sum = counters.entry(format!("Conntrack{name}")).or_insert(0);
                *sum = sum.saturating_add(v);
            }
        }
    }
}

fn read_facts() -> NetnsFacts {
    let mut counters = BTreeMap::new();
    for f in ["/proc/thread-self/net/netstat", "/proc/thread-self/net/snmp"] {
        parse_counters(&std::fs::read_to_string(f).unwrap_or_default(), &mut counters);
    }
    read_conntrack_stats(&mut counters);
    let sysctl = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse().ok());
    let sysctl64 = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse().ok());
    NetnsFacts {
        counters,
        somaxconn: sysctl("/proc/sys/net/core/somaxconn"),
        syncookies: sysctl("/proc/sys/net/ipv4/tcp_syncookies"),
        conntrack_count: sysctl64("/proc/sys/net/netfilter/nf_conntrack_count"),
        conntrack_max: sysctl64("/proc/sys/net/netfilter/nf_conntrack_max"),
        addrs: interface_addrs(),
    }
}

/// The text of `/proc/net/netstat` or `/proc/net/snmp` (pairs of lines: `Prefix: names…`, then
/// `Prefix: values…`) into `counters` as `PrefixName`.
pub fn parse_counters(text: &str, counters: &mut BTreeMap<String, i64>) {
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
    max_drops: u64,
    syn_recv_max: Option<u32>,
    accepts: u64,
    overflows: u64,
    syn_drops: u64,
    synack: u64,
    retrans: u64,
    /// One point per sample: the time series the episode rules read.
    points: Vec<Point>,
    /// The same per LISTEN socket (inode), with its accepts and drops in the window.
    sockets: BTreeMap<u32, SocketAcc>,
}

#[derive(Default)]
struct SocketAcc {
    points: Vec<Point>,
    accepts: u64,
    drops: u64,
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
    // When the counters began to be read, and when the sample was complete (the sock_diag sample
    // and the owner scan that follow can take a while on a busy host: the kernel counts must line
    // up with the events' times, and the queue lengths lie between the two).
    let t_ns = agent.kernel_read_ns;
    let end_ns = system::monotonic_ns();
    let diag_ok = agent.diag_ok;
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
        a.max_drops = a.max_drops.max(i.overflows + i.syn_drops);
        a.accepts += i.accepts;
        a.overflows += i.overflows;
        a.syn_drops += i.syn_drops;
        a.synack += i.synack_retransmits;
        a.retrans += i.retransmits;
        if let Some(n) = l.syn_recv {
            a.syn_recv_max = Some(a.syn_recv_max.map_or(n, |x| x.max(n)));
        }
        let listed = diag_ok && l.listening;
        a.points.push(Point { t_ns, end_ns, queue_len: l.queue_len.filter(|_| listed), backlog: l.backlog.filter(|_| listed), accepts: i.accepts });
        for (ino, sock) in &l.sockets {
            let sa = a.sockets.entry(*ino).or_default();
            let listed = diag_ok && sock.listening;
            sa.points.push(Point { t_ns, end_ns, queue_len: sock.queue_len.filter(|_| listed), backlog: sock.backlog.filter(|_| listed), accepts: sock.interval.accepts });
            sa.accepts += sock.interval.accepts;
            sa.drops += sock.interval.overflows + sock.interval.syn_drops;
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
    /// Stall episodes found in the window's time series.
    episodes: Vec<Episode>,
    /// Drop events with a time (since tracing started; the window's counts are in `window_counts`).
    drop_events: u64,
    /// What the kernel aggregates counted for this listener during the window.
    window_counts: WindowCounts,
    /// Times its kernel row was evicted during the window (the map was full): its window counts
    /// may be short by what it counted between a sample and the eviction.
    kernel_row_evictions: u64,
}

#[derive(Default, Serialize)]
struct WindowCounts {
    /// Null without an accept hook (`--accept-hooks off`).
    accepts: Option<u64>,
    overflows: u64,
    syn_drops: u64,
    retransmits: u64,
    synack_retransmits: u64,
    /// Before the listener (null: this kernel cannot count it): segments to the port dropped by
    /// netfilter, SYNs to it that found no socket, local clients' SYN retransmits to it.
    netfilter_drops: Option<u64>,
    no_socket_syns: Option<u64>,
    client_syn_retransmits: Option<u64>,
    /// Accept-queue waits in the window (the kernel's histograms; null without a known wait).
    accept_wait_p50_ns: Option<u64>,
    accept_wait_p99_ns: Option<u64>,
    accept_wait_max_ns: Option<u64>,
}

pub async fn run(mut agent: Agent, duration: Duration, format: Format) -> anyhow::Result<()> {
    eprintln!("{}", agent.tracer.summary());
    agent.model.keep_total_waits = true;
    // Episodes need when accepts and drops happened, not only how many.
    agent.model.keep_timeline = true;
    agent.unmute(&[kind::ACCEPT, kind::LISTEN_OVERFLOW, kind::SYN_DROP])?;
    let mut paths = BTreeMap::new();
    let mut before: BTreeMap<u32, NetnsFacts> = BTreeMap::new();
    let scope_netns = agent.filter.required_netns().or_else(system::own_netns);
    // Baseline counters of every namespace in scope (all of them without --netns), so that what
    // happens right at the start of the window counts in the deltas.
    let scope: Vec<netns::Netns> = match agent.filter.required_netns() {
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
    // The kernel aggregates' baseline: an interval closed now, and not counted, so that the
    // window's counts start here (rows created at start-up already hold what came before).
    agent.close_interval()?;
    let past_before = agent.past_counts()?;
    // Evictions before the window, to tell those that touched it.
    let evicted_before: BTreeMap<&'static str, u64> = agent.pressure.maps.iter().map(|u| (u.map, u.evicted)).collect();
    let resets_before: BTreeMap<ListenerKey, u64> = agent.model.listeners.iter().map(|(k, l)| (*k, l.kernel_resets)).collect();
    let rows_lost_before = agent.model.rows_lost;
    let missed_before = agent.tracer.runs_missed();
    let read_errors_before = agent.stats.get(stat::READ_ERRORS);
    let past_lost_before = agent.stats.get(stat::PAST_LOST);
    let syn_seen_before = agent.stats.get(stat::CLIENT_SYN_SEEN);
    let nf_seen_before = agent.stats.get(stat::NETFILTER_SEEN);
    let past_inserts_before = agent.stats.get(stat::PAST_INSERTS);
    // Other BPF programs coming and going during the window (see `foreign`).
    let foreign_before = agent.census.changes;
    let t0 = system::monotonic_ns();
    let t0_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok().and_then(|d| u64::try_from(d.as_millis()).ok());
    // Only once the baseline counters are read: scripts start traffic on this line.
    eprintln!("socktrace: observing for {:.1} s", duration.as_secs_f64());
    let mut accs: BTreeMap<ListenerKey, Acc> = BTreeMap::new();
    let mut ticker = tokio::time::interval(SAMPLE);
    ticker.tick().await;
    let deadline = tokio::time::sleep(duration);
    tokio::pin!(deadline);
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            r = agent.pump() => r?,
            _ = ticker.tick() => {
                take_interval(&mut agent, &mut accs, &mut before, &mut paths)?;
            }
            () = &mut deadline => break,
            _ = sigint.recv() => break,
        }
    }
    // The part of the window since the last sample counts too (the counters' "after" includes it).
    take_interval(&mut agent, &mut accs, &mut before, &mut paths)?;
    let foreign = agent.census.changes - foreign_before;
    let past_after = agent.past_counts()?;
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
    let no_timeline = model::Timeline::default();
    let accepts_untraced = !agent.tracer.traced().accept;
    // Derived accepts are counts per interval, with no time of their own: no gaps to find.
    let accept_times = !accepts_untraced && !agent.tracer.traced().accept_derived;
    for (key, a) in &accs {
        let Some(l) = agent.model.listeners.get(key) else { continue };
        let facts = after.get(&key.netns);
        let waits = l.waits_total.as_ref().and_then(model::quantiles);
        let timeline = l.timeline.as_ref().unwrap_or(&no_timeline);
        // A port with several LISTEN sockets is judged socket by socket: one stuck SO_REUSEPORT
        // worker leaves no gap in the port's accepts (the others keep accepting).
        // Episodes are gaps between accepts: without an accept hook every window is one gap.
        let (episodes, sockets) = if !accept_times {
            (Vec::new(), Vec::new())
        } else if a.sockets.len() > 1 {
            socket_episodes(l, a, t0, now)
        } else {
            (rules::find_episodes(timeline, &a.points, t0, now, &THRESHOLDS), Vec::new())
        };
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
            accepts_untraced,
            overflows: a.overflows,
            syn_drops: a.syn_drops,
            intervals_with_drops: a.drops_intervals,
            max_burst: a.max_burst,
            max_interval_drops: a.max_drops,
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
            episodes,
            drop_events: timeline.drops.iter().filter(|d| **d >= t0).count() as u64,
            accepts_unknown_wait: l.accepts_unknown_wait,
            window_start_unix_ms: t0_unix_ms,
            all_namespaces: false,
            listening_elsewhere: Vec::new(),
            sockets,
            past: past::of_port(
                &past_before,
                &past_after,
                key.netns,
                key.lport,
                &l.laddrs.iter().copied().collect::<Vec<_>>(),
                facts.and_then(|f| f.addrs.as_deref()),
            ),
            listen_addrs: l.laddrs.iter().map(ToString::to_string).collect(),
            netns_syn_retrans: delta(key.netns, "TcpExtTCPSynRetrans"),
            conntrack: delta(key.netns, "Conntrackdrop").map(|drop| rules::Conntrack {
                drop,
                early_drop: delta(key.netns, "Conntrackearly_drop").unwrap_or(0),
                insert_failed: delta(key.netns, "Conntrackinsert_failed").unwrap_or(0),
                count: facts.and_then(|f| f.conntrack_count),
                max: facts.and_then(|f| f.conntrack_max),
            }),
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
            episodes: e.episodes,
            drop_events: e.drop_events,
            kernel_row_evictions: l.kernel_resets - resets_before.get(key).copied().unwrap_or(0).min(l.kernel_resets),
            window_counts: WindowCounts {
                accepts: (!accepts_untraced).then_some(a.accepts),
                overflows: a.overflows,
                syn_drops: a.syn_drops,
                retransmits: a.retrans,
                synack_retransmits: a.synack,
                netfilter_drops: e.past.netfilter.as_ref().map(|n| n.syns + n.segments),
                no_socket_syns: e.past.unbound_syns.as_ref().map(|u| u.iter().map(|(_, n)| n).sum()),
                client_syn_retransmits: e.past.client_syn_retrans,
                accept_wait_p50_ns: e.wait_p50_ns,
                accept_wait_p99_ns: e.wait_p99_ns,
                accept_wait_max_ns: e.wait_max_ns,
            },
        });
    }
    // A port asked for (--port, or a `sport`/`src` port the filter requires) with no listener in
    // scope: connections to it are refused. Without a namespace in the filter the scope is every
    // namespace: only when none listens; with one, the other namespaces where the port does
    // listen are named.
    if let (Some(port), Some(netns), true) = (agent.filter.local_port(), scope_netns, agent.diag_ok) {
        let listening = |ns: Option<u32>| accs.iter().any(|(k, a)| k.lport == port && ns.is_none_or(|n| k.netns == n) && a.listening);
        let reported = |ns: Option<u32>| reports.iter().any(|r| r.lport == port && ns.is_none_or(|n| r.netns == n));
        let scope = agent.filter.required_netns();
        if !listening(scope) && !reported(scope) {
            let elsewhere = match scope {
                Some(n) => listening_elsewhere(port, n),
                None => Vec::new(),
            };
            let e = Evidence {
                listening: false,
                out_rsts: delta(netns, "TcpOutRsts"),
                window_secs: window,
                all_namespaces: scope.is_none(),
                listening_elsewhere: elsewhere,
                ..Evidence::default()
            };
            let findings = rules::diagnose(&e, &THRESHOLDS, &Target { netns, lport: port });
            reports.push(Report {
                netns,
                laddr: None,
                lport: port,
                pid: None,
                comm: None,
                verdict: "no_listener",
                findings,
                episodes: Vec::new(),
                drop_events: 0,
                kernel_row_evictions: 0,
                // No listener: nothing was accepted, whether or not accept is traced.
                window_counts: WindowCounts { accepts: Some(0), ..WindowCounts::default() },
            });
        }
    }
    let mut out = std::io::stdout().lock();
    // Signals no hook traces on this kernel: their counts are unknown, not 0.
    let untraced = agent.tracer.traced().missing();
    // Entries the bounded kernel maps lost during the window (absent when none).
    let evicted: BTreeMap<&'static str, u64> = agent
        .pressure
        .maps
        .iter()
        .map(|u| (u.map, u.evicted.saturating_sub(evicted_before.get(u.map).copied().unwrap_or(0))))
        .filter(|(_, n)| *n > 0)
        .collect();
    let rows_lost = agent.model.rows_lost - rows_lost_before.min(agent.model.rows_lost);
    // Program runs the kernel skipped during the window (None: it does not count them).
    let missed = agent.tracer.runs_missed().map(|n| n.saturating_sub(missed_before.unwrap_or(0)));
    // Kernel reads that failed in our programs during the window (each skipped its event or count).
    let read_errors = agent.stats.get(stat::READ_ERRORS).saturating_sub(read_errors_before);
    // PAST updates that failed (a netfilter drop, unbound SYN or client SYN retransmit uncounted),
    // and the client SYN retransmits the program saw in every namespace (a cross-check of the
    // per-port counts against the kernel's TcpExtTCPSynRetrans, which also counts SYN-ACKs).
    let past_lost = agent.stats.get(stat::PAST_LOST).saturating_sub(past_lost_before);
    let syn_seen = agent.stats.get(stat::CLIENT_SYN_SEEN).saturating_sub(syn_seen_before);
    let nf_seen = agent.stats.get(stat::NETFILTER_SEEN).saturating_sub(nf_seen_before);
    // PAST rows created in the window against the rows that are new at its end: more created
    // than there are new rows means rows were evicted (LRU) and created again, their counts lost.
    let past_created = agent.stats.get(stat::PAST_INSERTS).saturating_sub(past_inserts_before);
    let past_new = past_after.counts.keys().filter(|k| !past_before.counts.contains_key(k)).count() as u64;
    let pressure = (!evicted.is_empty() || rows_lost > 0).then(|| {
        let maps: Vec<String> = evicted.iter().map(|(m, n)| format!("{m} {n}")).collect();
        format!(
            "the kernel maps evicted entries during the window ({}; {rows_lost} listener rows lost): counts may be incomplete — raise the --map-* options (`socktrace probes` lists the capacities)",
            if maps.is_empty() { "no map-level count yet".to_owned() } else { maps.join(", ") }
        )
    });
    match format {
        Format::Json => {
            serde_json::to_writer(
                &mut out,
                &serde_json::json!({ "window_s": window, "sock_diag": agent.diag_ok, "events_lost": agent.lost(), "program_runs_missed": missed, "kernel_read_errors": read_errors, "past_counts_lost": past_lost, "past_rows_created": past_created, "past_rows_new": past_new, "other_bpf_programs_changed": foreign, "other_bpf_programs_exact": agent.census.exact(), "client_syn_retransmits_seen": syn_seen, "netfilter_drops_seen": nf_seen, "untraced": untraced,
                    "accept_hooks": agent.tracer.accept_hooks, "map_evictions": evicted, "listener_rows_lost": rows_lost, "listeners": reports }),
            )?;
            writeln!(out)?;
        }
        Format::Text | Format::Markdown => {
            let missed_note = missed.filter(|n| *n > 0).map(|n| {
                format!("the kernel skipped {n} runs of socktrace's programs during the window (another BPF program was running on that CPU): counts may be short by as many")
            });
            let read_note = (read_errors > 0 || past_lost > 0).then(|| {
                format!("{read_errors} kernel reads and {past_lost} map updates failed in socktrace's programs during the window (each skipped its event or count): counts may be short by as many")
            });
            let notes: Vec<String> = [missed_note, read_note].into_iter().flatten().collect();
            let missed_note = (!notes.is_empty()).then(|| notes.join("; "));
            let notes = HeaderNotes { why_untraced: agent.tracer.why_untraced(), pressure: pressure.as_deref(), missed: missed_note.as_deref() };
            print_reports(&mut out, &reports, format == Format::Markdown, window, agent.diag_ok, agent.lost(), &untraced, &notes)?;
        }
    }
    Ok(())
}

/// Episodes of each LISTEN socket of a port (tagged with its inode) and the sockets' facts.
fn socket_episodes(l: &model::Listener, a: &Acc, t0: u64, end: u64) -> (Vec<Episode>, Vec<SocketFacts>) {
    let none = model::Timeline::default();
    let mut episodes = Vec::new();
    let mut facts = Vec::new();
    for (ino, sa) in &a.sockets {
        let sock = l.sockets.get(ino);
        let tl = sock.and_then(|s| s.timeline.as_ref()).unwrap_or(&none);
        for mut x in rules::find_episodes(tl, &sa.points, t0, end, &THRESHOLDS) {
            x.socket = Some(*ino);
            episodes.push(x);
        }
        facts.push(SocketFacts {
            inode: *ino,
            addr: sock.and_then(|s| s.laddr).map_or_else(|| format!("*:{}", l.key.lport), |ip| std::net::SocketAddr::new(ip, l.key.lport).to_string()),
            backlog: sock.and_then(|s| s.backlog),
            accepts: sa.accepts,
            drops: sa.drops,
            last_acceptor: sock
                .and_then(|s| s.acceptors.first())
                .map(|x| (x.pid, x.tid, x.comm.clone(), end.saturating_sub(x.ts_ns) as f64 / 1e9)),
            holders: sock.map(|s| s.owners.clone()).unwrap_or_default(),
            holder_states: sock.map(|s| s.owners.iter().filter_map(|(pid, _)| Some((*pid, process_state(*pid)?))).collect()).unwrap_or_default(),
            acceptor_pids: sock.map(|s| s.acceptors.iter().map(|a| a.pid).collect()).unwrap_or_default(),
        });
    }
    episodes.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    (episodes, facts)
}

/// Scheduler state of a process (`/proc/PID/stat`, the field after the parenthesised comm).
fn process_state(pid: u32) -> Option<char> {
    stat_state(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The state letter in the text of `/proc/PID/stat` (after the last `)`: comm may hold any).
pub fn stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// LISTEN sockets on `port` in namespaces other than `netns`, as "netns N: ADDR (comm pid P)"
/// (one sock_diag listing of every namespace).
fn listening_elsewhere(port: u16, netns: u32) -> Vec<String> {
    let Some(sample) = crate::listeners::LiveListeners::new(None, false).sample() else { return Vec::new() };
    sample
        .listeners
        .iter()
        .filter(|d| d.lport == port && d.netns != netns)
        .map(|d| {
            let owner = d.owners.first().map_or_else(|| "owner unknown".to_owned(), |(pid, comm)| format!("{comm} pid {pid}"));
            format!("netns {}: {} ({owner})", d.netns, d.laddr)
        })
        .collect()
}

/// Window-wide notes printed above the reports.
struct HeaderNotes<'a> {
    /// Why the untraced signals are untraced (this kernel, or `--accept-hooks off`).
    why_untraced: &'a str,
    /// Map evictions during the window, if any.
    pressure: Option<&'a str>,
    /// Program runs the kernel skipped during the window, when any.
    missed: Option<&'a str>,
}

#[expect(clippy::too_many_arguments, reason = "the header facts of one report, each printed once")]
fn print_reports(out: &mut impl Write, reports: &[Report], md: bool, window: f64, diag_ok: bool, lost: u64, untraced: &[&str], notes: &HeaderNotes) -> anyhow::Result<()> {
    let (why, pressure) = (notes.why_untraced, notes.pressure);
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
    if lost > 0 {
        writeln!(
            out,
            "{}{lost} events were lost in the ring buffer: counts are exact (kernel aggregates), but episode timing misses those events",
            if md { "> " } else { "note: " }
        )?;
    }
    for p in [pressure, notes.missed].into_iter().flatten() {
        writeln!(out, "{}{p}", if md { "> " } else { "note: " })?;
    }
    if !untraced.is_empty() {
        writeln!(
            out,
            "{}UNAVAILABLE {} (`socktrace probes` says why): {} — their counts are unknown, not 0, and verdicts resting on them cannot be reached",
            if md { "> " } else { "note: " },
            why,
            untraced.join(", ")
        )?;
    }
    // What a mode without syscall hooks (`--accept-hooks off`) cannot judge.
    let lead = if md { "> " } else { "note: " };
    if untraced.contains(&"accept") {
        writeln!(out, "{lead}without accept events this run cannot judge: accept_stall (gaps between accepts), accept wait, who accepts from which socket, reuseport_imbalance, nor whether drops come from a stalled application or from bursts (reported as an ambiguous backlog_too_small); a listener without drops, floods or losses is `healthy` only in what was seen — rerun with `--accept-hooks auto` to judge the rest")?;
    }
    if untraced.contains(&"listen") {
        writeln!(out, "{lead}listen(2) not traced: the backlog an application asked for is unknown, so somaxconn_cap is judged from the backlog alone")?;
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
        if r.kernel_row_evictions > 0 {
            let n = r.kernel_row_evictions;
            writeln!(out, "{}its kernel row was evicted {n} time(s) in the window (map full): its counts may be short", if md { "> " } else { "  note: " })?;
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
