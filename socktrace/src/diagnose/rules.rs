//! The diagnosis itself: evidence about one listener over a window in, findings out. Pure and
//! deterministic; every threshold lives in [`Thresholds`] (documented in the README).
//!
//! Verdicts come from the window's time series, not its averages: [`find_episodes`] finds the
//! stretches where the application accepted nothing while its queue was full, so a stall that
//! begins after a healthy start, or one that comes back every few seconds, is an `accept_stall`,
//! and `backlog_too_small` is kept for drops while the application keeps accepting.

use std::fmt::Write as _;

use serde::Serialize;

use crate::model::Timeline;

/// One diagnose sample of a listener (every [`super::SAMPLE`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Point {
    /// `CLOCK_MONOTONIC` when the sample began (right before the kernel counters were read), ns.
    pub t_ns: u64,
    /// `CLOCK_MONOTONIC` when it was complete (counters and `sock_diag` read), ns; 0: same as
    /// `t_ns`. What the sample holds happened before this: on a loaded machine the reader can be
    /// preempted between the two for longer than a stall episode's minimum.
    pub end_ns: u64,
    /// Accept queue now and backlog (sock_diag), when listed.
    pub queue_len: Option<u32>,
    pub backlog: Option<u32>,
    /// Accepts the kernel counted in the sample interval ending here (exact even when events
    /// are lost).
    pub accepts: u64,
}

impl Point {
    /// When the sample was complete (see `end_ns`).
    fn end(&self) -> u64 {
        self.end_ns.max(self.t_ns)
    }
}

/// A stall episode: the application accepted nothing while its accept queue was full.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Episode {
    /// Seconds from the window's start to the last accept before the stall (negative when that
    /// accept came before the window; 0 with `from_window_start`).
    pub start_s: f64,
    pub duration_s: f64,
    /// Seconds from the window's start at which the queue was first seen full in it (none: it
    /// held connections but never overflowed).
    pub full_from_s: Option<f64>,
    /// Seconds from the window's start since which connections waited unaccepted.
    pub waiting_from_s: f64,
    /// Drops (listen overflows + SYN drops) inside it, from the drop events.
    pub drops: u64,
    /// Accepts inside it: none, by definition (kept for readers lining it up with their logs).
    pub accepts: u64,
    /// No accept seen before it since tracing started: it may have begun before tracing.
    pub from_window_start: bool,
    /// Still going when the window ended.
    pub ongoing: bool,
    /// The listening socket (inode) that stalled, for a port with several sockets.
    pub socket: Option<u32>,
}

/// One LISTEN socket of a port with several (SO_REUSEPORT members, v4 + v6), over the window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SocketFacts {
    pub inode: u32,
    /// "ADDR:PORT".
    pub addr: String,
    pub backlog: Option<u32>,
    pub accepts: u64,
    pub drops: u64,
    /// The thread that last accepted from it: (pid, tid, comm, seconds before the window's end).
    pub last_acceptor: Option<(u32, u32, String, f64)>,
    /// Processes holding its fd, with their scheduler state (`/proc/PID/stat`: R, S, D, T, …).
    pub holders: Vec<(u32, String)>,
    pub holder_states: Vec<(u32, char)>,
    /// Processes seen accepting from it.
    pub acceptor_pids: Vec<u32>,
}

/// A holder of a stalled socket that is probably its worker: it accepts from no other socket of
/// the group, and preferably it is stopped (T) or blocked in the kernel (D).
fn likely_worker<'a>(s: &'a SocketFacts, all: &[SocketFacts]) -> Option<(&'a (u32, String), Option<char>)> {
    let others: Vec<u32> = all.iter().filter(|o| o.inode != s.inode).flat_map(|o| o.acceptor_pids.iter().copied()).collect();
    let state = |pid: u32| s.holder_states.iter().find(|(p, _)| *p == pid).map(|(_, c)| *c);
    let candidates: Vec<&(u32, String)> = s.holders.iter().filter(|(pid, _)| !others.contains(pid)).collect();
    let blocked: Vec<&&(u32, String)> = candidates.iter().filter(|(pid, _)| matches!(state(*pid), Some('T' | 't' | 'D'))).collect();
    match (blocked.as_slice(), candidates.as_slice()) {
        ([one], _) => Some((one, state(one.0))),
        ([], [one]) => Some((one, state(one.0))),
        _ => None,
    }
}

fn state_name(c: char) -> &'static str {
    match c {
        'T' | 't' => "stopped",
        'D' => "blocked in the kernel (uninterruptible)",
        'R' => "running",
        'S' => "sleeping",
        'Z' => "zombie",
        _ => "unknown",
    }
}

/// How far an event's time and the kernel count it lands in may be apart (a tracing program can be
/// preempted between reading the clock and updating its map).
const COUNT_MARGIN_NS: u64 = 25_000_000;

/// Stall episodes of one listener over the window `[t0, t1]` (monotonic ns): gaps between accepts
/// of at least `max(stall_min_ns, stall_gap_factor × median gap)` during which connections waited
/// in the queue for at least that long, and the queue was full at some point (a drop, or a sample
/// at the backlog) or seen holding connections in every sample of the gap (≥ 2). Connections
/// waited from the earliest of: the first drop or full sample, the first of the non-empty samples,
/// the enqueue of the connection accepted right after the gap (its accept wait). A queue seen
/// shrinking during the gap is drained by accepts this tracer cannot see (e.g. io_uring): no
/// episode. A burst into an idle queue is none either: the queue was empty until the burst, and
/// the burst's first connection waited only as long as the application took to wake up.
///
/// A sample counts as seen inside a gap only when it began and completed inside it, and it dates
/// a full or non-empty queue at its completion; an accept count contradicts a gap only when its
/// whole interval (from the previous sample's beginning to this one's completion) lies inside.
/// So a sampler preempted while reading (a loaded machine) makes neither a false episode (a burst's
/// full queue read late, dated at the sample's start) nor hides a true one (the accepts that
/// ended it, counted late).
pub fn find_episodes(tl: &Timeline, points: &[Point], t0: u64, t1: u64, t: &Thresholds) -> Vec<Episode> {
    let min = tl.median_gap_ns().map_or(t.stall_min_ns, |g| g.saturating_mul(t.stall_gap_factor).max(t.stall_min_ns));
    // Candidate gaps (start, end, wait of the accept ending it, from_window_start, ongoing) that
    // reach into the window. The timeline begins when tracing did, a little before the window: a
    // gap may start before it.
    let mut gaps: Vec<(u64, u64, Option<u64>, bool, bool)> = Vec::new();
    match (tl.first_accept_ns, tl.last_accept_ns) {
        (Some(first), Some(last)) => {
            if first > t0 {
                gaps.push((t0, first, None, true, false));
            }
            gaps.extend(tl.gaps.iter().filter(|(_, e, _)| *e > t0).map(|&(s, e, w)| (s, e, w, false, false)));
            if t1 > last {
                gaps.push((last, t1, None, false, true));
            }
        }
        _ => gaps.push((t0, t1, None, true, true)),
    }
    let secs = |ns: u64| (ns as f64 - t0 as f64) / 1e9;
    let mut out = Vec::new();
    for (s, e, wait, from_start, ongoing) in gaps {
        if e.saturating_sub(s) < min {
            continue;
        }
        let inside: Vec<&Point> = points.iter().filter(|p| p.t_ns > s && p.end() < e).collect();
        if inside.windows(2).any(|w| matches!((w[0].queue_len, w[1].queue_len), (Some(a), Some(b)) if b < a)) {
            continue;
        }
        // The kernel's own counter accepted during the gap (a sample interval wholly inside it,
        // with a margin for a program preempted between its event's time and its count): accept
        // events went missing (ring buffer loss), this is no stall.
        if points.windows(2).any(|w| w[0].t_ns >= s + COUNT_MARGIN_NS && w[1].end() + COUNT_MARGIN_NS <= e && w[1].accepts > 0) {
            continue;
        }
        // Drops in the window only (they are what the window's counts hold).
        let drops_in: Vec<u64> = tl.drops.iter().copied().filter(|d| *d >= s.max(t0) && *d <= e).collect();
        let full_sample = inside.iter().find(|p| matches!((p.queue_len, p.backlog), (Some(q), Some(b)) if b > 0 && q >= b)).map(|p| p.end());
        let full_from = drops_in.iter().copied().min().into_iter().chain(full_sample).min();
        let held = inside.len() >= 2 && inside.iter().all(|p| p.queue_len.is_some_and(|q| q > 0));
        if full_from.is_none() && !held {
            continue;
        }
        let waiting_from = [full_from, held.then(|| inside[0].end()), wait.map(|w| e.saturating_sub(w))].into_iter().flatten().min().unwrap_or(e).max(s);
        if e.saturating_sub(waiting_from.max(t0)) < min {
            continue;
        }
        out.push(Episode {
            start_s: secs(s),
            duration_s: (e - s) as f64 / 1e9,
            full_from_s: full_from.map(secs),
            waiting_from_s: secs(waiting_from),
            drops: drops_in.len() as u64,
            accepts: 0,
            from_window_start: from_start,
            ongoing,
            socket: None,
        });
    }
    out
}

/// Everything observed about one listener during the window.
#[derive(Clone, Debug, Default)]
pub struct Evidence {
    pub window_secs: f64,
    /// A LISTEN socket existed on the port in this netns at some sample.
    pub listening: bool,
    pub backlog: Option<u32>,
    /// listen(2) backlog the application asked for, when that call was traced.
    pub requested_backlog: Option<u32>,
    pub somaxconn: Option<u32>,
    pub syncookies_sysctl: Option<u32>,
    /// Samples taken, and how many found the queue at its backlog (len ≥ backlog).
    pub samples: u32,
    pub samples_full: u32,
    /// Highest queue length seen (eBPF high-water mark and sock_diag samples).
    pub queue_peak: Option<u32>,
    pub accepts: u64,
    /// No accept hook (`--accept-hooks off`): `accepts` is unknown, not 0, and so are the wait,
    /// the acceptors and the stall episodes (gaps between accepts).
    pub accepts_untraced: bool,
    /// Listen overflows at the 3rd ACK, and SYNs dropped, in the window.
    pub overflows: u64,
    pub syn_drops: u64,
    /// Sample intervals that had drops, and the largest number of arrivals (accepts + drops) in
    /// one sample interval.
    pub intervals_with_drops: u32,
    pub max_burst: u64,
    /// Most drops in one sample interval.
    pub max_interval_drops: u64,
    pub wait_p50_ns: Option<u64>,
    pub wait_p99_ns: Option<u64>,
    pub wait_max_ns: Option<u64>,
    pub synack_retransmits: u64,
    pub retransmits: u64,
    /// Most half-open (SYN_RECV) request sockets seen in one sample.
    pub syn_recv_max: Option<u32>,
    /// Netns TcpExt deltas over the window.
    pub cookies_sent: Option<i64>,
    pub cookies_recv: Option<i64>,
    pub out_rsts: Option<i64>,
    /// Seconds since the last accept, and who did it.
    pub last_accept_ago_secs: Option<f64>,
    pub acceptor: Option<(u32, String)>,
    /// Stall episodes ([`find_episodes`]).
    pub episodes: Vec<Episode>,
    /// Drop events seen with a time (the episodes' drops are among them).
    pub drop_events: u64,
    /// Accepts of connections queued before tracing started (their wait is unknowable).
    pub accepts_unknown_wait: u64,
    /// Wall-clock time (Unix ms) of the window's start, for episode timestamps.
    pub window_start_unix_ms: Option<u64>,
    /// `no_listener` only: the scope was every network namespace on the host.
    pub all_namespaces: bool,
    /// `no_listener` only: where else the port listens ("netns N: ADDR (owner)").
    pub listening_elsewhere: Vec<String>,
    /// The port's LISTEN sockets when it has several (their episodes carry `socket`).
    pub sockets: Vec<SocketFacts>,
    /// What happened to the port's segments before any listener saw them.
    pub past: Past,
    /// Addresses the port's LISTEN sockets are bound to.
    pub listen_addrs: Vec<String>,
    /// Netns TcpExtTCPSynRetrans delta (every local client's SYN retransmits, any destination).
    pub netns_syn_retrans: Option<i64>,
    /// The netns's conntrack statistics over the window (`None`: no conntrack in it).
    pub conntrack: Option<Conntrack>,
}

/// Conntrack table of the netns: window deltas of its per-CPU statistics (summed), entries at
/// the window's end and the table limit (`net.netfilter.nf_conntrack_max`, global).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Conntrack {
    /// New connections dropped because the table was full (no entry could be evicted).
    pub drop: i64,
    /// Entries evicted to make room (the table was full; the new connection got in).
    pub early_drop: i64,
    pub insert_failed: i64,
    pub count: Option<u64>,
    pub max: Option<u64>,
}

/// Segments to a port that netfilter dropped in the window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetfilterDrops {
    /// SYNs without ACK (connection attempts, retransmits included), and every other segment.
    pub syns: u64,
    pub segments: u64,
    /// Distinct peers (source addresses) of the dropped segments.
    pub peers: Vec<String>,
}

/// Before the accept queue, over the window. `None`: this kernel cannot count it (unavailable, not 0).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Past {
    pub netfilter: Option<NetfilterDrops>,
    /// SYNs to the port that found no socket (answered with a RST), per local address used.
    pub unbound_syns: Option<Vec<(String, u64)>>,
    /// SYNs re-sent by local clients to the port (their earlier SYN got no answer).
    pub client_syn_retrans: Option<u64>,
}

/// Every threshold of the diagnosis, in one place.
#[derive(Clone, Debug, Serialize)]
pub struct Thresholds {
    /// Queue at its backlog for at least this share of samples: the app is not keeping up.
    pub stall_full_share: f64,
    /// … and accepts are below this share of arrivals (accepts + drops).
    pub stall_accept_share: f64,
    /// Waits at least this long (p99) also mark a stall.
    pub stall_wait_ns: u64,
    /// Bursts: drops while the queue was full in at most this share of samples, and p99 wait
    /// below `burst_wait_ns`.
    pub burst_full_share: f64,
    pub burst_wait_ns: u64,
    /// Half-open connections at least this many, or SYN cookies sent with fewer than
    /// `flood_cookie_completion` of them completed: a SYN flood.
    pub flood_syn_recv: u32,
    pub flood_min_cookies: i64,
    pub flood_cookie_completion: f64,
    /// Retransmits (segments on accepted connections + SYN-ACKs) at least this many, with no
    /// queue trouble: packet loss.
    pub loss_retransmits: u64,
    /// A stall episode lasts at least this long (ns) and at least `stall_gap_factor` times the
    /// listener's median gap between accepts (a slow but steady consumer is not stalling).
    pub stall_min_ns: u64,
    pub stall_gap_factor: u64,
    /// Drops outside stall episodes at least this many and this share of all drops: the queue
    /// also overflows while the application accepts (a backlog problem besides the stalls).
    pub outside_drops_min: u64,
    pub outside_drops_share: f64,
    /// SO_REUSEPORT spread: with at least `imbalance_min_arrivals` per socket on average, the
    /// busiest socket receiving at least `imbalance_ratio` times the quietest one's arrivals.
    pub imbalance_min_arrivals: u64,
    pub imbalance_ratio: f64,
    /// Stall episodes that all ended, each shorter than this (ns), holding fewer drops than fell
    /// while accepting: a low-severity hiccup beside the backlog finding, not the verdict.
    pub minor_stall_ns: u64,
    /// `firewall_drop` on any netfilter drop to the port; High when the dropped SYNs are at least
    /// this share of the port's SYNs (dropped + accepted connections), Low below it (a policy
    /// blocking a few scanners is often intended).
    pub firewall_share: f64,
    /// Local clients' SYN retransmits to the port at least this many, with no finding of Medium
    /// or higher explaining them: `connect_failures` (healthy is not said while attempts fail).
    pub unexplained_syn_retrans: u64,
}

pub const THRESHOLDS: Thresholds = Thresholds {
    stall_full_share: 0.5,
    stall_accept_share: 0.25,
    stall_wait_ns: 1_000_000_000,
    burst_full_share: 0.5,
    burst_wait_ns: 200_000_000,
    flood_syn_recv: 64,
    flood_min_cookies: 50,
    flood_cookie_completion: 0.1,
    loss_retransmits: 10,
    stall_min_ns: 100_000_000,
    stall_gap_factor: 10,
    outside_drops_min: 3,
    outside_drops_share: 0.1,
    imbalance_min_arrivals: 50,
    imbalance_ratio: 2.0,
    minor_stall_ns: 1_000_000_000,
    firewall_share: 0.05,
    unexplained_syn_retrans: 1,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Finding {
    pub verdict: &'static str,
    pub severity: Severity,
    pub evidence: Vec<String>,
    pub fix: Vec<String>,
    pub verify: Vec<String>,
}

fn ms(ns: u64) -> String {
    if ns >= 1_000_000_000 { format!("{:.1} s", ns as f64 / 1e9) } else { format!("{:.1} ms", ns as f64 / 1e6) }
}

/// How to point socktrace at this listener again.
pub struct Target {
    pub netns: u32,
    pub lport: u16,
}

impl Target {
    fn args(&self) -> String {
        format!("--netns {} --port {}", self.netns, self.lport)
    }
}

fn queue_lines(e: &Evidence) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(b) = e.backlog {
        let share = if e.samples > 0 { 100.0 * f64::from(e.samples_full) / f64::from(e.samples) } else { 0.0 };
        v.push(format!(
            "accept queue at its backlog {}/{b} (peak) in {} of {} sample intervals ({share:.0} %)",
            e.queue_peak.map_or_else(|| "?".into(), |p| p.to_string()),
            e.samples_full,
            e.samples
        ));
    }
    v
}

fn rate_line(e: &Evidence) -> String {
    if e.accepts_untraced {
        return format!(
            "accepts unknown (accept not traced: --accept-hooks off); {} dropped in {:.1} s",
            e.overflows + e.syn_drops,
            e.window_secs
        );
    }
    let arrivals = e.accepts + e.overflows + e.syn_drops;
    format!(
        "{:.1} accepts/s ({} accepted, {} dropped of {arrivals} arrivals in {:.1} s)",
        e.accepts as f64 / e.window_secs.max(0.001),
        e.accepts,
        e.overflows + e.syn_drops,
        e.window_secs
    )
}

fn wait_line(e: &Evidence) -> Option<String> {
    e.wait_p99_ns.map(|p99| {
        format!(
            "accept wait p50 {} / p99 {} / max {}",
            ms(e.wait_p50_ns.unwrap_or(0)),
            ms(p99),
            ms(e.wait_max_ns.unwrap_or(p99))
        )
    })
}

fn drop_line(e: &Evidence) -> String {
    format!(
        "{} SYN drops and {} listen overflows (3rd ACK), in {} sample intervals",
        e.syn_drops, e.overflows, e.intervals_with_drops
    )
}

/// Findings for one listener, most severe first. Empty: healthy.
pub fn diagnose(e: &Evidence, t: &Thresholds, target: &Target) -> Vec<Finding> {
    let mut out = Vec::new();
    let top = format!("socktrace top {}", target.args());
    if !e.listening {
        let mut evidence = vec![if e.all_namespaces {
            format!("no socket is listening on port {} in any network namespace of this host", target.lport)
        } else {
            format!("no socket is listening on port {} in netns {}", target.lport, target.netns)
        }];
        if let Some(r) = e.out_rsts.filter(|r| *r > 0) {
            evidence.push(format!("{r} TCP resets sent in netns {} during the window (refused connections)", target.netns));
        }
        let mut fix = Vec::new();
        if !e.listening_elsewhere.is_empty() {
            evidence.push(format!("port {} listens in other network namespaces: {}", target.lport, e.listening_elsewhere.join("; ")));
            fix.push("the clients reach the wrong network namespace: check the container/pod networking, port mapping or service that should lead them to the one above".into());
        }
        fix.push("start the service, or check it binds this port and address in this network namespace (container/pod)".into());
        fix.push("check the process did not exit or fail to bind: its logs, `ss -tlnp` inside the namespace".into());
        out.push(Finding {
            verdict: "no_listener",
            severity: Severity::Critical,
            evidence,
            fix,
            verify: vec![format!("socktrace snapshot -l --netns {} sport = :{}", target.netns, target.lport)],
        });
        return out;
    }
    let arrivals = e.accepts + e.overflows + e.syn_drops;
    let drops = e.overflows + e.syn_drops;
    let full_share = if e.samples > 0 { f64::from(e.samples_full) / f64::from(e.samples) } else { 0.0 };
    let accept_share = if arrivals > 0 { e.accepts as f64 / arrivals as f64 } else { 1.0 };
    let long_wait = e.wait_p99_ns.is_some_and(|w| w >= t.stall_wait_ns);
    let mut base = queue_lines(e);
    base.push(rate_line(e));
    if let Some(w) = wait_line(e) {
        base.push(w);
    }
    if e.accepts_unknown_wait > 0 {
        base.push(format!(
            "{} accepted connections were queued before tracing started: their accept-queue wait is unknown (not in the wait figures)",
            e.accepts_unknown_wait
        ));
    }

    // SYN flood: half-open connections pile up and handshakes do not complete.
    let cookies_sent = e.cookies_sent.unwrap_or(0);
    let cookies_recv = e.cookies_recv.unwrap_or(0);
    let cookie_flood = cookies_sent >= t.flood_min_cookies && (cookies_recv as f64) < t.flood_cookie_completion * cookies_sent as f64;
    let syn_recv_flood = e.syn_recv_max.is_some_and(|n| n >= t.flood_syn_recv) && e.synack_retransmits > 0;
    if cookie_flood || syn_recv_flood {
        let mut evidence = vec![format!(
            "{} half-open connections (SYN_RECV) at most; {} SYN-ACK retransmits",
            e.syn_recv_max.map_or_else(|| "?".into(), |n| n.to_string()),
            e.synack_retransmits
        )];
        evidence.push(format!("{cookies_sent} SYN cookies sent, {cookies_recv} returned (handshakes completed)"));
        evidence.push(rate_line(e));
        out.push(Finding {
            verdict: "syn_flood",
            severity: Severity::High,
            evidence,
            fix: vec![
                format!(
                    "keep net.ipv4.tcp_syncookies=1 (now {}) so legitimate clients still connect while the SYN queue is full",
                    e.syncookies_sysctl.map_or_else(|| "unknown".into(), |v| v.to_string())
                ),
                "find the sources (socktrace watch shows SYN-ACK retransmits per peer) and filter them upstream (firewall, DDoS protection)".into(),
                "raising the listen backlog and net.ipv4.tcp_max_syn_backlog only buys time against a real flood".into(),
            ],
            verify: vec![
                format!("socktrace watch --json {} | grep synack_retransmit   # should stop", target.args()),
                format!("{top}   # SYNACK retransmits back to 0"),
            ],
        });
    }

    // Stalls: episodes in the time series first; a queue that stays full under a consumer far
    // slower than the arrivals (the window-wide rule) second.
    let episode_drops: u64 = e.episodes.iter().map(|x| x.drops).sum();
    let outside = e.drop_events.saturating_sub(episode_drops);
    let drops_while_accepting = if e.episodes.is_empty() {
        drops > 0
    } else {
        outside >= t.outside_drops_min && outside as f64 >= t.outside_drops_share * e.drop_events as f64
    };
    // Without accepts a stall and a burst look alike: neither stall rule can be judged.
    let saturated = !e.accepts_untraced && e.episodes.is_empty() && full_share >= t.stall_full_share && (accept_share <= t.stall_accept_share || long_wait);
    let stalled = !e.episodes.is_empty() || saturated;
    // Brief hiccups: every episode ended and was shorter than `minor_stall_ns`, and together they
    // hold fewer drops than happened while the application accepted. On a busy single-threaded
    // server a 0.2 s pause is worth naming, but the drops, and the fix, are the queue's.
    let minor = !saturated
        && !e.episodes.is_empty()
        && e.episodes.iter().all(|x| !x.ongoing && x.duration_s * 1e9 < t.minor_stall_ns as f64)
        && episode_drops < outside;
    if stalled {
        let mut f = stall_finding(e, &base, saturated, &top, target);
        if minor {
            f.severity = Severity::Low;
            f.evidence.insert(0, format!("brief: {episode_drops} of {} timed drops fell in the stall episodes, the rest while the application was accepting", e.drop_events));
        }
        out.push(f);
    }
    let capped = e.somaxconn.is_some_and(|s| Some(s) == e.backlog) && e.requested_backlog.is_none_or(|r| Some(r) > e.backlog);
    if drops > 0 && drops_while_accepting && !saturated {
        let mut f = if capped { somaxconn_finding(e, &top, target) } else { backlog_finding(e, &base, t, &top, target, full_share) };
        if e.accepts_untraced {
            f.severity = f.severity.min(Severity::Medium);
            f.evidence.push(
                "ambiguous: accept is not traced (--accept-hooks off), so an application that stopped accepting and bursts larger than the queue look the same; `socktrace diagnose --accept-hooks auto` tells them apart"
                    .into(),
            );
        }
        if stalled && !minor {
            // Secondary to the stall: worth knowing, not the reason connections fail.
            f.severity = Severity::Low;
        }
        out.push(f);
    } else if !stalled
        && e.somaxconn.is_some_and(|s| Some(s) == e.backlog)
        && e.requested_backlog.is_some_and(|r| Some(r) > e.backlog)
        && full_share > 0.0
    {
        out.push(somaxconn_finding(e, &top, target));
    }

    if !stalled && drops == 0 {
        out.extend(imbalance_finding(e, t, &top));
    }

    // Packet loss: retransmits while the queue itself is fine.
    let loss = e.retransmits + e.synack_retransmits;
    if loss >= t.loss_retransmits && drops == 0 && !stalled && !cookie_flood && !syn_recv_flood {
        out.push(Finding {
            verdict: "packet_loss",
            severity: Severity::Medium,
            evidence: vec![
                format!("{} segments retransmitted on this listener's connections", e.retransmits),
                format!("{} SYN-ACK retransmits", e.synack_retransmits),
                format!(
                    "accept queue fine: peak {}/{}, no drops",
                    e.queue_peak.map_or_else(|| "?".into(), |p| p.to_string()),
                    e.backlog.map_or_else(|| "?".into(), |b| b.to_string())
                ),
            ],
            fix: vec![
                "the listener is healthy; look at the path: interface errors and drops (`ip -s link`), NIC ring/queue drops, firewall or conntrack drops (`nft list ruleset`, `conntrack -S`), congestion on the link".into(),
                "compare retransmits per peer (`socktrace watch --json ... | jq 'select(.kind==\"retransmit\")'`) to locate the lossy hop".into(),
            ],
            verify: vec![format!("{top}   # RTX column back near 0")],
        });
    } else if loss > 0 && loss < t.loss_retransmits && drops == 0 && !stalled {
        out.push(Finding {
            verdict: "packet_loss",
            severity: Severity::Low,
            evidence: vec![format!(
                "{} retransmitted segments and {} SYN-ACK retransmits: a little loss, below the {} threshold",
                e.retransmits, e.synack_retransmits, t.loss_retransmits
            )],
            fix: vec!["nothing urgent; keep watching".into()],
            verify: vec![format!("{top}   # RTX column")],
        });
    }
    let ct = conntrack_finding(e, target);
    // Conntrack's own drops are netfilter drops too: only what they do not explain is a rule's.
    let ct_drops = e.conntrack.as_ref().map_or(0, |c| u64::try_from(c.drop).unwrap_or(0));
    let firewall = firewall_finding(e, t, target).filter(|_| e.past.netfilter.as_ref().is_none_or(|n| n.syns + n.segments > ct_drops));
    let before_queue: Vec<Finding> = ct.into_iter().chain(firewall).chain(wrong_address_finding(e, target)).collect();
    // A visible cause, or a queue problem, explains the clients' retransmits.
    if before_queue.is_empty() && !out.iter().any(|f| f.severity >= Severity::Medium) {
        out.extend(unexplained_finding(e, t, target));
    }
    out.extend(before_queue);
    out.sort_by(|a, b| b.severity.cmp(&a.severity));
    out
}

/// The local clients' side of failing attempts, when known.
fn client_lines(e: &Evidence, target: &Target) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(n) = e.past.client_syn_retrans.filter(|n| *n > 0) {
        v.push(format!("{n} SYN retransmits by local clients to port {} (each one a client that waited 1 s, 3 s, 7 s … for an answer)", target.lport));
    }
    if let Some(n) = e.netns_syn_retrans.filter(|n| *n > 0) {
        v.push(format!("TcpExtTCPSynRetrans in netns {}: +{n} (every destination)", target.netns));
    }
    v
}

/// Up to 8 items, then how many more.
fn some(items: &[String]) -> String {
    let mut s = items.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > 8 {
        s.push_str(&format!(" and {} more", items.len() - 8));
    }
    s
}

/// Segments to the port dropped by netfilter before they reached the listener.
fn firewall_finding(e: &Evidence, t: &Thresholds, target: &Target) -> Option<Finding> {
    let nf = e.past.netfilter.as_ref().filter(|n| n.syns + n.segments > 0)?;
    let seen = nf.syns + e.accepts;
    let share = if seen > 0 { nf.syns as f64 / seen as f64 } else { 0.0 };
    let mut evidence = vec![
        format!(
            "{} SYNs (connection attempts) and {} other segments to port {} dropped by netfilter in netns {} during the {:.1} s window",
            nf.syns, nf.segments, target.lport, target.netns, e.window_secs
        ),
        if e.accepts_untraced {
            "share of the port's SYNs dropped unknown: accept is not traced (--accept-hooks off)".into()
        } else {
            format!("{:.0} % of the SYNs for this port were dropped ({} dropped, {} connections accepted)", 100.0 * share, nf.syns, e.accepts)
        },
        format!("from {} distinct peers: {}", nf.peers.len(), some(&nf.peers)),
        "which hook and rule dropped them is not recorded by the kernel's drop reason: the rule's own counter names it".into(),
    ];
    evidence.extend(client_lines(e, target));
    Some(Finding {
        verdict: "firewall_drop",
        severity: if e.accepts_untraced || share >= t.firewall_share || e.accepts == 0 { Severity::High } else { Severity::Low },
        evidence,
        fix: vec![
            format!(
                "list the firewall rules of netns {} (`nsenter --net=/proc/PID/ns/net nft list ruleset`, or `iptables-save`, PID = the listener's) and find the drop rule matching tcp dport {}: its counter grows with the drops above",
                target.netns, target.lport
            ),
            "allow the clients (an accept rule before it for their addresses), or remove the rule if the drop is not intended; a `limit rate` or `numgen` rule that drops part of the SYNs also shows up here".into(),
            "if these peers are blocked on purpose, the listener is fine: nothing to change on it".into(),
        ],
        verify: vec![
            "nft list ruleset   # the drop rule's counter stops growing".into(),
            format!("socktrace diagnose {} --duration 30s   # no firewall_drop", target.args()),
        ],
    })
}

/// The netns's conntrack table was full: new connections dropped (or old entries evicted).
fn conntrack_finding(e: &Evidence, target: &Target) -> Option<Finding> {
    let c = e.conntrack.as_ref().filter(|c| c.drop > 0 || c.early_drop > 0)?;
    let fmt = |v: Option<u64>| v.map_or_else(|| "?".into(), |v| v.to_string());
    let mut evidence = vec![
        format!(
            "conntrack table of netns {} full: {} new connections dropped, {} entries evicted early, {} insert failures during the window (every port of the namespace)",
            target.netns, c.drop, c.early_drop, c.insert_failed
        ),
        format!("{} conntrack entries now, limit net.netfilter.nf_conntrack_max {}", fmt(c.count), fmt(c.max)),
    ];
    if let Some(nf) = &e.past.netfilter {
        evidence.push(format!("{} SYNs to port {} dropped by netfilter in the window (conntrack's drops are among them)", nf.syns, target.lport));
    }
    evidence.extend(client_lines(e, target));
    Some(Finding {
        verdict: "conntrack_full",
        severity: match (c.drop > 0, !e.accepts_untraced && e.accepts == 0) {
            (true, true) => Severity::Critical,
            (true, false) => Severity::High,
            _ => Severity::Low,
        },
        evidence,
        fix: vec![
            format!("raise net.netfilter.nf_conntrack_max (global: set it in the initial network namespace; now {}), and net.netfilter.nf_conntrack_buckets with it", fmt(c.max)),
            "find what fills the table: `conntrack -L | awk '{print $3}' | sort | uniq -c` (states), many TIME_WAIT/CLOSE entries point at short connections; lower nf_conntrack_tcp_timeout_time_wait / _established if they linger".into(),
            "exempt traffic that needs no state from tracking (`notrack` in a raw/prerouting chain) for busy listeners".into(),
        ],
        verify: vec![
            "conntrack -S   # drop and early_drop stop growing".into(),
            format!("socktrace diagnose {} --duration 30s   # no conntrack_full", target.args()),
        ],
    })
}

/// SYNs to the port on an address no socket listens on: the kernel answered each with a RST.
fn wrong_address_finding(e: &Evidence, target: &Target) -> Option<Finding> {
    let unbound: Vec<&(String, u64)> = e.past.unbound_syns.iter().flatten().filter(|(_, n)| *n > 0).collect();
    if unbound.is_empty() {
        return None;
    }
    let bound = if e.listen_addrs.is_empty() { "an unknown address".to_owned() } else { e.listen_addrs.join(", ") };
    let mut evidence: Vec<String> = unbound
        .iter()
        .map(|(addr, n)| format!("{n} SYNs to {addr} port {} answered with a RST: no socket listens there — the listener is bound to {bound} only", target.lport))
        .collect();
    if let Some(r) = e.out_rsts {
        evidence.push(format!("{r} TCP resets sent in netns {} during the window (TcpOutRsts)", target.netns));
    }
    evidence.push(if e.accepts_untraced {
        format!("connections accepted on {bound}: unknown (accept not traced: --accept-hooks off)")
    } else {
        format!("{} connections accepted on {bound} in the window", e.accepts)
    });
    let used = unbound.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>().join(", ");
    let mut fix = vec![
        format!("bind the listener to the address the clients use ({used}) or to every address (0.0.0.0 / [::]) in its configuration (its listen/bind setting), then restart it"),
        format!("or point the clients (DNS name, configuration, port mapping) at {bound}"),
    ];
    if e.listen_addrs.iter().any(|a| a.starts_with("127.") || a == "::1") {
        fix.insert(0, "a listener on a loopback address is reachable only from inside its own network namespace: containers and other hosts cannot reach it".into());
    }
    Some(Finding {
        verdict: "wrong_address",
        severity: if !e.accepts_untraced && e.accepts == 0 { Severity::Critical } else { Severity::High },
        evidence,
        fix,
        verify: vec![
            format!("socktrace snapshot -l --netns {} sport = :{}   # bound to the address the clients use", target.netns, target.lport),
            format!("socktrace diagnose {} --duration 30s   # no wrong_address", target.args()),
        ],
    })
}

/// Local clients keep re-sending SYNs to the port, and nothing seen here explains it.
fn unexplained_finding(e: &Evidence, t: &Thresholds, target: &Target) -> Option<Finding> {
    let n = e.past.client_syn_retrans.filter(|n| *n >= t.unexplained_syn_retrans)?;
    let accepted = if e.accepts_untraced { "accepts not traced".to_owned() } else { format!("{} accepted", e.accepts) };
    let mut evidence = vec![format!(
        "{n} SYN retransmits from local clients to port {}, cause not visible: the listener dropped nothing ({accepted}, {} dropped at its queue)",
        target.lport,
        e.overflows + e.syn_drops
    )];
    evidence.push(match &e.past.netfilter {
        Some(_) => "no netfilter drop of a segment to this port seen".into(),
        None => "netfilter drops UNAVAILABLE on this kernel (kfree_skb has no NETFILTER_DROP reason): a firewall is not ruled out".into(),
    });
    if let Some(r) = e.netns_syn_retrans.filter(|r| *r > 0) {
        evidence.push(format!("TcpExtTCPSynRetrans in netns {}: +{r} (every destination)", target.netns));
    }
    Some(Finding {
        verdict: "connect_failures",
        severity: Severity::High,
        evidence,
        fix: vec![
            "the SYNs or the SYN-ACKs are lost on the way: check firewall rules on both ends and in between (`nft list ruleset`, `iptables-save`), conntrack (`conntrack -S`: drop, insert_failed), the route to the listener and back (`ip route get ADDR`; reverse-path filtering, rp_filter, drops SYNs that arrive on another interface than the route back to their source), interface drops (`ip -s link`)".into(),
            "check the clients connect to this host and port at all (a DNS name or a port mapping that leads elsewhere)".into(),
        ],
        verify: vec![format!("socktrace diagnose {} --duration 30s   # no connect_failures", target.args())],
    })
}

/// `HH:MM:SS.mmm UTC` of a Unix time in ms.
fn clock(unix_ms: u64) -> String {
    let day_ms = unix_ms % 86_400_000;
    format!("{:02}:{:02}:{:02}.{:03} UTC", day_ms / 3_600_000, day_ms / 60_000 % 60, day_ms / 1000 % 60, day_ms % 1000)
}

/// When an episode began: wall clock (when known) and offset into the window.
fn episode_when(e: &Evidence, x: &Episode) -> String {
    let offset = if x.start_s < 0.0 { format!("{:.1} s before the window", -x.start_s) } else { format!("+{:.1} s", x.start_s) };
    match e.window_start_unix_ms {
        Some(ms) => format!("{} ({offset})", clock(u64::try_from(ms as i64 + (x.start_s * 1000.0) as i64).unwrap_or(0))),
        None => offset,
    }
}

fn opt_num(v: Option<u32>) -> String {
    v.map_or_else(|| "?".into(), |x| x.to_string())
}

fn holders(s: &SocketFacts) -> String {
    if s.holders.is_empty() {
        return "no process found".into();
    }
    s.holders.iter().map(|(pid, comm)| format!("{comm} pid {pid}")).collect::<Vec<_>>().join(", ")
}

/// Who accepted from a socket last, or who holds it when nobody did.
fn accepted_from(s: &SocketFacts) -> String {
    match &s.last_acceptor {
        Some((pid, tid, comm, ago)) => format!("last accepted by {comm} pid {pid} thread {tid}, {ago:.1} s before the window ended"),
        None => format!("nobody accepted from it during the window (held by {})", holders(s)),
    }
}

/// SO_REUSEPORT members receiving very different shares of the arrivals while all of them drain.
fn imbalance_finding(e: &Evidence, t: &Thresholds, top: &str) -> Option<Finding> {
    if e.accepts_untraced {
        // Arrivals per socket are accepts + drops: unknown without accepts.
        return None;
    }
    let n = e.sockets.len() as u64;
    let arrivals: Vec<u64> = e.sockets.iter().map(|s| s.accepts + s.drops).collect();
    let total: u64 = arrivals.iter().sum();
    let (min, max) = (arrivals.iter().copied().min()?, arrivals.iter().copied().max()?);
    if n < 2 || total < t.imbalance_min_arrivals * n || (max as f64) < t.imbalance_ratio * (min.max(1) as f64) {
        return None;
    }
    let shares = e
        .sockets
        .iter()
        .zip(&arrivals)
        .map(|(s, a)| format!("inode {}: {a} ({:.0} %)", s.inode, 100.0 * *a as f64 / total as f64))
        .collect::<Vec<_>>()
        .join(", ");
    Some(Finding {
        verdict: "reuseport_imbalance",
        severity: Severity::Low,
        evidence: vec![
            format!("{n} SO_REUSEPORT sockets on this port, every one draining; arrivals per socket in the window: {shares}"),
            format!("the busiest socket got {:.1}× the arrivals of the quietest", max as f64 / min.max(1) as f64),
        ],
        fix: vec![
            "the kernel spreads connections by a hash of the 4-tuple: few distinct clients (one load balancer, a fixed source port range) hash unevenly; more client addresses/ports even it out".into(),
            "for an even spread across workers consider a BPF reuseport selector (SO_ATTACH_REUSEPORT_EBPF) or a single shared accept queue; this is not a backlog problem".into(),
        ],
        verify: vec![format!("{top}   # the sockets' ACC/s rows come closer")],
    })
}

/// Episodes listed in the evidence at most; the rest are summed up in one line.
const EPISODES_SHOWN: usize = 8;

fn stall_finding(e: &Evidence, base: &[String], saturated: bool, top: &str, target: &Target) -> Finding {
    let n = e.episodes.len();
    // The socket with the most episodes (all of them for a single-socket port) sets the pattern.
    let mut by_socket: std::collections::BTreeMap<Option<u32>, Vec<&Episode>> = std::collections::BTreeMap::new();
    for x in &e.episodes {
        by_socket.entry(x.socket).or_default().push(x);
    }
    let worst: Vec<&Episode> = by_socket.into_values().max_by_key(Vec::len).unwrap_or_default();
    // Only the part inside the window (an episode may have begun before it).
    let stalled_s: f64 = worst.iter().map(|x| x.duration_s + x.start_s.min(0.0)).sum();
    let ongoing = e.episodes.iter().any(|x| x.ongoing);
    let intermittent = worst.len() >= 2;
    let drops = e.overflows + e.syn_drops;
    let mut evidence = Vec::new();
    if saturated {
        evidence.push("the queue stayed at its backlog while the application accepted far fewer connections than arrived (a consumer much slower than the arrivals)".into());
    } else {
        let pattern = if intermittent {
            "intermittent"
        } else if ongoing {
            "ongoing"
        } else {
            "one stall"
        };
        evidence.push(format!(
            "{pattern}: {n} stall episode{} (no accept while connections waited in the accept queue), {stalled_s:.1} s of the {:.1} s window{}",
            if n == 1 { "" } else { "s" },
            e.window_secs,
            if e.sockets.len() > 1 { " on the worst socket" } else { "" }
        ));
        for (i, x) in e.episodes.iter().enumerate().take(EPISODES_SHOWN) {
            let mut line = format!("stall {}: {} for {:.1} s", i + 1, episode_when(e, x), x.duration_s);
            if let Some(ino) = x.socket {
                let _ = write!(line, " on socket inode {ino}");
            }
            if x.from_window_start {
                line.push_str(" (already stalled when tracing began: no accept seen since)");
            }
            if x.ongoing {
                line.push_str(" (still stalled when the window ended)");
            }
            let _ = write!(line, ", {} drops, {} accepts, ", x.drops, x.accepts);
            match x.full_from_s {
                Some(f) => {
                    let _ = write!(line, "queue full from {f:+.1} s");
                }
                None => {
                    let _ = write!(line, "connections waiting from {:+.1} s (the queue never filled: nothing dropped, clients wait)", x.waiting_from_s);
                }
            }
            evidence.push(line);
        }
        if n > EPISODES_SHOWN {
            evidence.push(format!("… and {} more episodes", n - EPISODES_SHOWN));
        }
    }
    evidence.extend(base.iter().cloned());
    if drops > 0 {
        evidence.push(drop_line(e));
        if !saturated {
            let inside: u64 = e.episodes.iter().map(|x| x.drops).sum();
            evidence.push(format!("{inside} of {} timed drop events fell inside the stall episodes", e.drop_events));
        }
    }
    let stalled_sockets: Vec<&SocketFacts> = e.sockets.iter().filter(|s| e.episodes.iter().any(|x| x.socket == Some(s.inode))).collect();
    if stalled_sockets.is_empty() {
        match (&e.acceptor, e.last_accept_ago_secs) {
            (Some((tid, comm)), Some(ago)) => evidence.push(format!("accepting thread {tid} ({comm}) last accepted {ago:.1} s before the window ended")),
            _ => evidence.push("no accept() seen during the window".into()),
        }
    } else {
        for s in &stalled_sockets {
            evidence.push(format!("stalled socket inode {} ({}, backlog {} of its own): {} drops, {} accepts in the window; {}", s.inode, s.addr, opt_num(s.backlog), s.drops, s.accepts, accepted_from(s)));
            if let (None, Some(((pid, comm), st))) = (&s.last_acceptor, likely_worker(s, &e.sockets)) {
                evidence.push(format!(
                    "likely its worker: {comm} pid {pid} ({}): it holds the socket and accepts from no other socket of this port",
                    st.map_or("state unknown", state_name)
                ));
            }
        }
        let draining: Vec<&SocketFacts> = e.sockets.iter().filter(|s| !stalled_sockets.iter().any(|x| x.inode == s.inode)).collect();
        if !draining.is_empty() {
            evidence.push(format!(
                "the other {} of the {} sockets on this port kept draining: {} accepts in the window ({})",
                draining.len(),
                e.sockets.len(),
                draining.iter().map(|s| s.accepts).sum::<u64>(),
                draining.iter().map(|s| format!("inode {}: {}", s.inode, s.accepts)).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let mut fix = Vec::new();
    for s in &stalled_sockets {
        fix.push(match &s.last_acceptor {
            Some((pid, tid, comm, _)) => format!(
                "worker {comm} pid {pid} (thread {tid}) stopped accepting from socket inode {}: check its state (`ps -o pid,stat,wchan:30 -T -p {pid}`: T = stopped, D = blocked in the kernel), its logs and a stack dump; restart or replace that worker — the other workers are healthy",
                s.inode
            ),
            None => match likely_worker(s, &e.sockets) {
                Some(((pid, comm), st)) => format!(
                    "worker {comm} pid {pid} ({}) is the likely owner of socket inode {}, which nobody drains: check it (`ps -o pid,stat,wchan:30 -T -p {pid}`), its logs and a stack dump; restart or replace that worker",
                    st.map_or("state unknown", state_name),
                    s.inode
                ),
                None => format!(
                    "nobody accepted from socket inode {} during the window; it is held by {}: find which of these should accept from it (each SO_REUSEPORT worker owns one socket) and why it does not",
                    s.inode,
                    holders(s)
                ),
            },
        });
    }
    let mut severity = Severity::Critical;
    if intermittent {
        // The arrival rate and the longest pause give the queue that absorbs one. The rate is
        // accepted connections over the whole window: a client whose SYN was dropped in a pause
        // retries and is accepted later, so it counts once (drops would count its every retry),
        // and the catch-up after a pause is not mistaken for the steady rate (accepts over the
        // healthy time alone over-estimated it by window / healthy time, 1.3–1.5× in the field).
        let rate = e.accepts as f64 / e.window_secs.max(0.001);
        let longest = worst.iter().map(|x| x.duration_s).fold(0.0, f64::max);
        let period = (worst[worst.len() - 1].start_s - worst[0].start_s) / (worst.len() - 1) as f64;
        let absorb = (rate * longest).ceil() as u64;
        evidence.push(format!(
            "pauses every {period:.1} s on average, the longest {longest:.1} s; arrivals {rate:.0}/s: a backlog of at least {absorb} (arrival rate × longest pause) would absorb one pause"
        ));
        if !ongoing && stalled_s < e.window_secs / 2.0 {
            severity = Severity::High;
        }
        fix.push(format!("find what pauses the accept loop every ~{period:.1} s for up to {longest:.1} s: GC pauses (GC logs), a blocking call on the event loop or accept thread, a periodic job (flush, log rotation, cache rebuild) — correlate the stall timestamps above with the application's logs"));
        fix.push(format!(
            "mitigation, not the cause: raise the listen() backlog (and net.core.somaxconn, now {}) to at least {} so a pause is absorbed instead of dropping connections",
            e.somaxconn.map_or_else(|| "unknown".into(), |v| v.to_string()),
            absorb.max(u64::from(e.backlog.unwrap_or(0)) + 1)
        ));
    } else {
        if !ongoing && !saturated {
            severity = Severity::High;
        }
        if stalled_sockets.is_empty() {
            fix.push("find why the application stopped calling accept(): thread dump / `perf top -p PID` of the owning process; look for a blocked or saturated accept loop (lock, full worker pool, GC pause, blocking I/O on the accept thread), or a stopped process (state T in `ps`)".into());
        }
        fix.push("raising the backlog or net.core.somaxconn alone only delays the drops: a queue that is not drained fills up whatever its size".into());
    }
    Finding {
        verdict: "accept_stall",
        severity,
        evidence,
        fix,
        verify: vec![
            format!("{top}   # ACC/s steady, PEAK below BACKLOG, OVF/SYNDROP 0"),
            format!("socktrace diagnose {} --duration 30s   # verdict healthy, no stall episodes", target.args()),
        ],
    }
}

fn backlog_finding(e: &Evidence, base: &[String], t: &Thresholds, top: &str, target: &Target, full_share: f64) -> Finding {
    let bursty = full_share <= t.burst_full_share && e.wait_p99_ns.is_none_or(|w| w < t.burst_wait_ns);
    let mut evidence = base.to_vec();
    evidence.push(drop_line(e));
    evidence.push(format!("largest arrival burst: {} connections in one sample interval", e.max_burst));
    if !e.episodes.is_empty() {
        let inside: u64 = e.episodes.iter().map(|x| x.drops).sum();
        evidence.push(format!("{} of {} timed drop events happened while the application was accepting (outside stall episodes)", e.drop_events - inside, e.drop_events));
    }
    let backlog = e.backlog.unwrap_or(0);
    // The queue had to hold its backlog plus what was dropped in the worst sample interval.
    let suggested = (u64::from(backlog) + e.max_interval_drops).max(u64::from(backlog) * 2).next_power_of_two().max(128);
    evidence.push(format!("most drops in one sample interval: {} (a queue of about backlog + that would have held them)", e.max_interval_drops));
    if !bursty {
        evidence.push("ambiguous: the queue was full often but accepts kept up — a slow consumer and bursts both fit".into());
    }
    Finding {
        verdict: "backlog_too_small",
        severity: if bursty { Severity::High } else { Severity::Medium },
        evidence,
        fix: vec![
            format!("raise the application's listen() backlog from {backlog} to at least {suggested}"),
            format!(
                "raise net.core.somaxconn to at least {suggested} in this netns (now {}): the kernel caps the backlog at it",
                e.somaxconn.map_or_else(|| "unknown".into(), |v| v.to_string())
            ),
            "do both together, then restart the listener (the backlog is read at listen())".into(),
        ],
        verify: vec![
            format!("{top}   # BACKLOG shows the new value; OVF/SYNDROP stay 0 through bursts"),
            format!("socktrace watch {} | grep -E 'syn_drop|listen_overflow'   # nothing", target.args()),
        ],
    }
}

fn somaxconn_finding(e: &Evidence, top: &str, target: &Target) -> Finding {
    let somax = e.somaxconn.unwrap_or(0);
    let drops = e.overflows + e.syn_drops;
    let wanted = e
        .requested_backlog
        .unwrap_or(0)
        .max(somax.saturating_mul(2))
        .max(u32::try_from(u64::from(somax) + e.max_interval_drops).unwrap_or(u32::MAX).checked_next_power_of_two().unwrap_or(u32::MAX));
    let mut evidence = vec![format!(
        "backlog {} = net.core.somaxconn {somax}; the application asked for {}",
        e.backlog.unwrap_or(0),
        e.requested_backlog.map_or_else(
            || "an unknown value (listen() was called before tracing started; a backlog exactly at somaxconn means it asked for at least that and was capped)".into(),
            |r| r.to_string()
        )
    )];
    evidence.push(format!("the queue reached its backlog in {} of {} samples", e.samples_full, e.samples));
    if drops > 0 {
        evidence.push(rate_line(e));
        evidence.push(drop_line(e));
        evidence.push(format!("largest arrival burst: {} connections in one sample interval", e.max_burst));
    }
    Finding {
        verdict: "somaxconn_cap",
        severity: Severity::High,
        evidence,
        fix: vec![
            format!(
                "raise net.core.somaxconn in netns {} to at least {wanted} (sysctl -w net.core.somaxconn=N, per network namespace): the application's own backlog setting cannot take effect above it",
                target.netns
            ),
            format!("check the application asks for at least {wanted} in listen() (its backlog setting), then restart the listener: the cap is applied at listen()"),
        ],
        verify: vec![
            format!("{top}   # BACKLOG shows the requested value"),
            format!("socktrace diagnose {} --duration 30s   # no drops", target.args()),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Timeline;

    fn target() -> Target {
        Target { netns: 1, lport: 80 }
    }

    fn base() -> Evidence {
        Evidence {
            window_secs: 10.0,
            listening: true,
            backlog: Some(8),
            somaxconn: Some(4096),
            samples: 50,
            queue_peak: Some(2),
            accepts: 100,
            wait_p50_ns: Some(1_000_000),
            wait_p99_ns: Some(5_000_000),
            wait_max_ns: Some(6_000_000),
            ..Evidence::default()
        }
    }

    fn verdicts(e: &Evidence) -> Vec<&'static str> {
        diagnose(e, &THRESHOLDS, &target()).iter().map(|f| f.verdict).collect()
    }

    /// `--accept-hooks off`: a full queue with drops and no accept seen is a stall when accepts are
    /// traced, but without an accept hook it cannot be told from bursts: an ambiguous, medium
    /// backlog finding that says so, and no accept rate or accept count claimed anywhere.
    #[test]
    fn without_accept_hook_no_stall_is_claimed() {
        let traced = Evidence { samples_full: 48, queue_peak: Some(9), accepts: 0, syn_drops: 40, intervals_with_drops: 20, wait_p99_ns: None, ..base() };
        assert_eq!(verdicts(&traced)[0], "accept_stall");
        let off = Evidence { accepts_untraced: true, wait_p50_ns: None, wait_max_ns: None, ..traced };
        let findings = diagnose(&off, &THRESHOLDS, &target());
        assert_eq!(findings.iter().map(|f| f.verdict).collect::<Vec<_>>(), ["backlog_too_small"]);
        assert!(findings[0].severity <= Severity::Medium);
        let text = findings[0].evidence.join("\n");
        assert!(text.contains("accept is not traced (--accept-hooks off)"), "{text}");
        assert!(text.contains("accepts unknown") && !text.contains("accepts/s") && !text.contains("0 accepted"), "{text}");
        // A queue that is never full and drops nothing: nothing to report in either mode.
        assert!(verdicts(&Evidence { accepts_untraced: true, accepts: 0, ..base() }).is_empty());
    }

    #[test]
    fn healthy_when_nothing_abnormal() {
        assert!(verdicts(&base()).is_empty());
    }

    #[test]
    fn stall_beats_backlog() {
        let e = Evidence { samples_full: 48, queue_peak: Some(9), accepts: 0, syn_drops: 40, intervals_with_drops: 20, wait_p99_ns: None, ..base() };
        assert_eq!(verdicts(&e), ["accept_stall"]);
    }

    #[test]
    fn bursts_are_backlog_too_small_and_cap_is_named() {
        let e = Evidence { samples_full: 3, queue_peak: Some(9), syn_drops: 30, intervals_with_drops: 3, max_burst: 40, ..base() };
        assert_eq!(verdicts(&e), ["backlog_too_small"]);
        let f = diagnose(&e, &THRESHOLDS, &target());
        assert!(f[0].fix[0].contains("from 8 to at least 128"), "{:?}", f[0].fix);
        // At the cap, raising the application's backlog alone cannot help: the cap is the verdict.
        let capped = Evidence { somaxconn: Some(8), ..e.clone() };
        assert_eq!(verdicts(&capped), ["somaxconn_cap"]);
        let f = diagnose(&capped, &THRESHOLDS, &target());
        assert!(f[0].evidence.iter().any(|l| l.contains("30 SYN drops")), "{:?}", f[0].evidence);
        // The application asked for exactly the cap: its own backlog is the problem too.
        let asked = Evidence { somaxconn: Some(8), requested_backlog: Some(8), ..e };
        assert_eq!(verdicts(&asked), ["backlog_too_small"]);
    }

    const MS: u64 = 1_000_000;

    /// A timeline of accepts every `every` ms over `[from, to)` ms, skipping `[pause_from, pause_to)`.
    fn accepts(tl: &mut Timeline, from: u64, to: u64, every: u64, pauses: &[(u64, u64)]) {
        let mut t = from;
        while t < to {
            if !pauses.iter().any(|&(a, b)| t >= a && t < b) {
                tl.accept(t * MS, Some(MS));
            }
            t += every;
        }
    }

    fn points(to_ms: u64, queue: impl Fn(u64) -> u32, backlog: u32) -> Vec<Point> {
        (1..=to_ms / 200).map(|i| Point { t_ns: i * 200 * MS, end_ns: 0, queue_len: Some(queue(i * 200)), backlog: Some(backlog), accepts: 0 }).collect()
    }

    #[test]
    fn a_stall_after_a_healthy_start_is_one_ongoing_episode() {
        // Busy for 1.5 s (an accept per ms), then nothing; the queue is full from 1.52 s on and SYNs drop.
        let mut tl = Timeline::default();
        accepts(&mut tl, 0, 1500, 1, &[]);
        for d in (1520..6000).step_by(7) {
            tl.drop_at(d * MS);
        }
        let pts = points(6000, |t| if t > 1500 { 25 } else { 3 }, 24);
        let ep = find_episodes(&tl, &pts, 0, 6000 * MS, &THRESHOLDS);
        assert_eq!(ep.len(), 1, "{ep:?}");
        assert!(ep[0].ongoing && !ep[0].from_window_start);
        assert!((ep[0].start_s - 1.499).abs() < 0.01 && (ep[0].duration_s - 4.501).abs() < 0.01, "{ep:?}");
        assert_eq!(ep[0].drops, tl.drops.len() as u64);
        // The window averages look healthy (most arrivals accepted, short waits): the episode decides.
        let e = Evidence {
            accepts: 1500,
            syn_drops: ep[0].drops,
            samples: 30,
            samples_full: 22,
            backlog: Some(24),
            drop_events: tl.drops.len() as u64,
            episodes: ep,
            window_start_unix_ms: Some(3_600_000 + 61_000 + 5),
            ..base()
        };
        let f = diagnose(&e, &THRESHOLDS, &target());
        assert_eq!(f.iter().map(|f| f.verdict).collect::<Vec<_>>(), ["accept_stall"]);
        assert_eq!(f[0].severity, Severity::Critical);
        assert!(f[0].evidence.iter().any(|l| l.starts_with("stall 1: 01:01:02.504 UTC (+1.5 s) for 4.5 s (still stalled")), "{:?}", f[0].evidence);
    }

    #[test]
    fn pauses_every_period_are_intermittent_with_a_mitigating_backlog() {
        // Accept every 5 ms, but nothing in [1000,1500), [2500,3000), [4000,4500): the queue fills and drops.
        let pauses = [(1000, 1500), (2500, 3000), (4000, 4500)];
        let mut tl = Timeline::default();
        accepts(&mut tl, 0, 5000, 5, &pauses);
        for &(a, b) in &pauses {
            for d in (a + 200..b).step_by(10) {
                tl.drop_at(d * MS);
            }
        }
        let pts = points(5000, |t| if pauses.iter().any(|&(a, b)| t > a + 200 && t < b) { 17 } else { 0 }, 16);
        let ep = find_episodes(&tl, &pts, 0, 5000 * MS, &THRESHOLDS);
        assert_eq!(ep.len(), 3, "{ep:?}");
        assert!(ep.iter().all(|x| !x.ongoing && (x.duration_s - 0.5).abs() < 0.01 && x.drops == 30));
        let e = Evidence { window_secs: 5.0, accepts: 700, syn_drops: 90, drop_events: 90, samples: 25, samples_full: 6, backlog: Some(16), episodes: ep, ..base() };
        let f = diagnose(&e, &THRESHOLDS, &target());
        assert_eq!(f.iter().map(|f| f.verdict).collect::<Vec<_>>(), ["accept_stall"], "no backlog_too_small: every drop was in a pause");
        let text = f[0].evidence.join("\n");
        assert!(text.contains("intermittent: 3 stall episodes"), "{text}");
        // Each gap is 505 ms (last accept 5 ms before the pause): 700 accepts in 5 s = 140/s;
        // × 0.505 s = 70.7 → 71.
        assert!(text.contains("pauses every 1.5 s on average, the longest 0.5 s; arrivals 140/s: a backlog of at least 71"), "{text}");
        assert!(f[0].fix[1].contains("mitigation"), "{:?}", f[0].fix);
    }

    #[test]
    fn bursts_into_a_draining_queue_are_no_episode() {
        // 40 connections every 1.5 s, accepted every 2 ms; the drops come right before the burst's first accept.
        let mut tl = Timeline::default();
        for burst in 0..3u64 {
            let at = 100 + burst * 1500;
            for d in 0..10 {
                tl.drop_at(at * MS - 1000 + d);
            }
            accepts(&mut tl, at, at + 80, 2, &[]);
        }
        let pts = points(4500, |_| 0, 4);
        assert!(find_episodes(&tl, &pts, 0, 4500 * MS, &THRESHOLDS).is_empty());
    }

    #[test]
    fn a_short_pause_that_fills_the_queue_late_is_an_episode() {
        // Accepts every 10 ms; 220 ms pauses every second; the queue (backlog 16) overflows only in
        // the pause's last 60 ms, but the first accept after it took a connection that had waited
        // 215 ms: connections waited the whole pause.
        let pauses = [(1000, 1220), (2000, 2220), (3000, 3220)];
        let mut tl = Timeline::default();
        let mut t = 0;
        while t < 4000 {
            let after_pause = pauses.iter().any(|&(_, b)| t == b);
            if !pauses.iter().any(|&(a, b)| t >= a && t < b) {
                tl.accept(t * MS, Some(if after_pause { 215 * MS } else { MS }));
            }
            t += 10;
        }
        for &(_, b) in &pauses {
            for d in (b - 60..b).step_by(15) {
                tl.drop_at(d * MS);
            }
        }
        let pts = points(4000, |_| 0, 16);
        let ep = find_episodes(&tl, &pts, 0, 4000 * MS, &THRESHOLDS);
        assert_eq!(ep.len(), 3, "{ep:?}");
        assert!(ep.iter().all(|x| x.full_from_s.is_some() && (x.full_from_s.unwrap_or(0.0) - x.waiting_from_s) > 0.1), "{ep:?}");
    }

    #[test]
    fn a_stuck_app_whose_queue_never_fills_is_an_episode() {
        // 10 keep-alive clients stuck in a queue of backlog 36 after the app stopped at 1.5 s:
        // no drop ever, the queue holds 10 in every sample.
        let mut tl = Timeline::default();
        accepts(&mut tl, 0, 1500, 2, &[]);
        let pts = points(5000, |t| if t > 1500 { 10 } else { 0 }, 36);
        let ep = find_episodes(&tl, &pts, 0, 5000 * MS, &THRESHOLDS);
        assert_eq!(ep.len(), 1, "{ep:?}");
        assert!(ep[0].ongoing && ep[0].full_from_s.is_none() && ep[0].drops == 0, "{ep:?}");
        let e = Evidence { accepts: 750, backlog: Some(36), episodes: ep, ..base() };
        let f = diagnose(&e, &THRESHOLDS, &target());
        assert_eq!(f[0].verdict, "accept_stall");
        assert!(f[0].evidence[1].contains("connections waiting from +1.6 s (the queue never filled"), "{:?}", f[0].evidence);
        // An idle listener (queue empty) with the same accept history is healthy.
        let idle = points(5000, |_| 0, 36);
        assert!(find_episodes(&tl, &idle, 0, 5000 * MS, &THRESHOLDS).is_empty());
    }

    #[test]
    fn a_queue_drained_by_unseen_accepts_is_no_episode() {
        // No accept events at all (e.g. io_uring), drops, but the queue shrinks between samples.
        let mut tl = Timeline::default();
        tl.drop_at(300 * MS);
        let pts = points(3000, |t| if t % 400 == 0 { 9 } else { 4 }, 8);
        assert!(find_episodes(&tl, &pts, 0, 3000 * MS, &THRESHOLDS).is_empty());
        // The same with the queue only growing is a stall since the window began.
        let full = points(3000, |t| u32::try_from(t / 200).unwrap_or(0).min(9), 8);
        let ep = find_episodes(&tl, &full, 0, 3000 * MS, &THRESHOLDS);
        assert_eq!(ep.len(), 1);
        assert!(ep[0].from_window_start && ep[0].ongoing);
    }

    #[test]
    fn accepts_the_kernel_counted_inside_a_gap_contradict_it() {
        // The events of 2 s of accepts were lost: the timeline shows a gap, the queue was full,
        // but the kernel's counter went on: no stall.
        let mut tl = Timeline::default();
        accepts(&mut tl, 0, 1000, 5, &[(1000, 1000)]);
        accepts(&mut tl, 3000, 4000, 5, &[]);
        for d in (1000..3000).step_by(50) {
            tl.drop_at(d * MS);
        }
        let full = |t: u64| if t > 1000 && t < 3000 { 9 } else { 2 };
        let mut pts = points(4000, full, 8);
        assert_eq!(find_episodes(&tl, &pts, 0, 4000 * MS, &THRESHOLDS).len(), 1, "events alone: a stall");
        for p in &mut pts {
            p.accepts = 40;
        }
        assert!(find_episodes(&tl, &pts, 0, 4000 * MS, &THRESHOLDS).is_empty());
    }

    #[test]
    fn a_sampler_preempted_while_reading_makes_no_false_episode() {
        // Bursts of 40 connections every 1.2 s into backlog 4, accepted every 2 ms (no stall).
        // The sample that began reading at 1.19 s was preempted and read the queue only when the
        // burst at 1.4 s had filled it (done at 1.403 s; the next sample is due at 1.6 s): the
        // full queue is not dated 211 ms before the burst's first accept (the episode minimum
        // is 200 ms here: 10 × the median gap, which is under 20 ms).
        let mut tl = Timeline::default();
        for at in [200, 1400, 2600] {
            for d in 0..10 {
                tl.drop_at(at * MS + 500 + d);
            }
            accepts(&mut tl, at + 1, at + 80, 2, &[]);
        }
        let mut pts: Vec<Point> = (1..=15).map(|i| Point { t_ns: i * 200 * MS, end_ns: i * 200 * MS + MS, queue_len: Some(0), backlog: Some(4), accepts: 0 }).collect();
        pts[5] = Point { t_ns: 1190 * MS, end_ns: 1403 * MS, queue_len: Some(5), backlog: Some(4), accepts: 0 };
        pts.remove(6);
        assert!(find_episodes(&tl, &pts, 0, 3000 * MS, &THRESHOLDS).is_empty(), "{:?}", find_episodes(&tl, &pts, 0, 3000 * MS, &THRESHOLDS));
        // Dated at its start (the reading before this fix), the same sample made an episode.
        let at_start: Vec<Point> = pts.iter().map(|p| Point { end_ns: 0, ..*p }).collect();
        assert_eq!(find_episodes(&tl, &at_start, 0, 3000 * MS, &THRESHOLDS).len(), 1);
    }

    #[test]
    fn a_sampler_preempted_while_reading_does_not_hide_a_stall() {
        // Accepts every 5 ms, nothing in [1000, 3000) while the queue is full and SYNs drop. The
        // sample that began at 2.95 s was preempted and read the counters and the queue at about
        // 3.06 s, after the application accepted again: neither its interval's accepts nor its
        // drained queue are inside the stall.
        let mut tl = Timeline::default();
        accepts(&mut tl, 0, 4000, 5, &[(1000, 3000)]);
        for d in (1050..3000).step_by(50) {
            tl.drop_at(d * MS);
        }
        let mut pts = points(4000, |t| if t > 1000 && t < 3000 { 9 } else { 2 }, 8);
        for p in &mut pts {
            p.accepts = if p.t_ns <= 1000 * MS || p.t_ns > 3000 * MS { 40 } else { 0 };
            p.end_ns = p.t_ns + MS;
        }
        let late = pts.iter_mut().find(|p| p.t_ns == 3000 * MS).expect("sample at 3 s");
        (late.t_ns, late.end_ns, late.accepts) = (2950 * MS, 3060 * MS, 12);
        let ep = find_episodes(&tl, &pts, 0, 4000 * MS, &THRESHOLDS);
        assert_eq!(ep.len(), 1, "{ep:?}");
        assert!((ep[0].duration_s - 2.005).abs() < 0.01, "{ep:?}");
        // Dated at its start (the reading before this fix), the late count contradicted the stall.
        let at_start: Vec<Point> = pts.iter().map(|p| Point { end_ns: 0, ..*p }).collect();
        assert!(find_episodes(&tl, &at_start, 0, 4000 * MS, &THRESHOLDS).is_empty());
    }

    #[test]
    fn a_slow_steady_consumer_has_no_episodes() {
        // One accept every 150 ms with the queue always full: the gaps are its normal pace.
        let mut tl = Timeline::default();
        accepts(&mut tl, 0, 3000, 150, &[]);
        for d in (0..3000).step_by(20) {
            tl.drop_at(d * MS);
        }
        let pts = points(3000, |_| 9, 8);
        assert!(find_episodes(&tl, &pts, 0, 3000 * MS, &THRESHOLDS).is_empty());
    }

    #[test]
    fn a_stuck_reuseport_socket_names_its_likely_worker() {
        let sock = |inode, accepts, drops, acceptors: Vec<u32>| SocketFacts {
            inode,
            addr: "0.0.0.0:80".into(),
            backlog: Some(16),
            accepts,
            drops,
            last_acceptor: None,
            holders: vec![(10, "nginx".into()), (11, "nginx".into()), (12, "nginx".into()), (13, "nginx".into())],
            holder_states: vec![(10, 'S'), (11, 'S'), (12, 'T'), (13, 'S')],
            acceptor_pids: acceptors,
        };
        // Master 10 never accepts; 11 and 13 accept from the healthy sockets; 12 is stopped.
        let sockets = vec![sock(1, 500, 0, vec![11]), sock(2, 0, 40, vec![]), sock(3, 480, 0, vec![13])];
        let ep = Episode { start_s: 0.0, duration_s: 5.0, full_from_s: Some(0.1), waiting_from_s: 0.0, drops: 40, from_window_start: true, ongoing: true, socket: Some(2), ..Episode::default() };
        let e = Evidence { accepts: 980, syn_drops: 40, drop_events: 40, episodes: vec![ep], sockets, window_secs: 5.0, ..base() };
        let f = diagnose(&e, &THRESHOLDS, &target());
        assert_eq!(f[0].verdict, "accept_stall");
        let text = f[0].evidence.join("\n");
        assert!(text.contains("stalled socket inode 2"), "{text}");
        assert!(text.contains("likely its worker: nginx pid 12 (stopped)"), "{text}");
        assert!(text.contains("the other 2 of the 3 sockets on this port kept draining: 980 accepts"), "{text}");
        assert!(f[0].fix[0].contains("worker nginx pid 12 (stopped)"), "{:?}", f[0].fix);
    }

    #[test]
    fn a_brief_hiccup_does_not_outrank_the_somaxconn_cap() {
        // Redis at somaxconn 20: 850 drops while accepting, one 0.21 s hiccup with 35.
        let ep = Episode { start_s: 5.4, duration_s: 0.21, full_from_s: Some(5.45), waiting_from_s: 5.4, drops: 35, ..Episode::default() };
        let e = Evidence {
            backlog: Some(20),
            somaxconn: Some(20),
            accepts: 46_847,
            syn_drops: 885,
            drop_events: 885,
            max_interval_drops: 60,
            episodes: vec![ep.clone()],
            ..base()
        };
        let f = diagnose(&e, &THRESHOLDS, &target());
        assert_eq!(f.iter().map(|f| (f.verdict, f.severity)).collect::<Vec<_>>(), [("somaxconn_cap", Severity::High), ("accept_stall", Severity::Low)]);
        // The same hiccup holding most of the drops is the verdict.
        let e2 = Evidence { syn_drops: 40, drop_events: 40, episodes: vec![Episode { drops: 35, ..ep }], ..e };
        assert_eq!(diagnose(&e2, &THRESHOLDS, &target())[0].verdict, "accept_stall");
    }

    #[test]
    fn no_listener_names_other_namespaces() {
        let gone = Evidence { listening: false, listening_elsewhere: vec!["netns 7: 0.0.0.0 (haproxy pid 9)".into()], ..Evidence::default() };
        let f = diagnose(&gone, &THRESHOLDS, &target());
        assert!(f[0].evidence[1].contains("netns 7: 0.0.0.0 (haproxy pid 9)"), "{:?}", f[0].evidence);
        assert!(f[0].fix[0].contains("wrong network namespace"));
        let all = Evidence { listening: false, all_namespaces: true, ..Evidence::default() };
        assert!(diagnose(&all, &THRESHOLDS, &target())[0].evidence[0].contains("in any network namespace"));
    }

    #[test]
    fn failing_attempts_are_never_healthy() {
        let nf = |syns, segments| Past { netfilter: Some(NetfilterDrops { syns, segments, peers: vec!["10.0.0.1".into()] }), unbound_syns: Some(Vec::new()), client_syn_retrans: Some(syns) };
        // 70 of 170 SYNs dropped: High, with the clients' retransmits.
        let fw = Evidence { past: nf(70, 0), netns_syn_retrans: Some(70), ..base() };
        let f = diagnose(&fw, &THRESHOLDS, &target());
        assert_eq!(f.iter().map(|f| (f.verdict, f.severity)).collect::<Vec<_>>(), [("firewall_drop", Severity::High)]);
        assert!(f[0].evidence[0].starts_with("70 SYNs (connection attempts) and 0 other segments"), "{:?}", f[0].evidence);
        assert!(f[0].evidence.iter().any(|l| l.starts_with("70 SYN retransmits by local clients")), "{:?}", f[0].evidence);
        // A scanner blocked now and then: Low.
        let few = Evidence { past: nf(2, 0), accepts: 1000, ..base() };
        assert_eq!(diagnose(&few, &THRESHOLDS, &target())[0].severity, Severity::Low);
        // Clients retransmitting with nothing seen: connect_failures, and it says why it cannot tell.
        let blind = Evidence { past: Past { client_syn_retrans: Some(9), ..Past::default() }, ..base() };
        let f = diagnose(&blind, &THRESHOLDS, &target());
        assert_eq!(f[0].verdict, "connect_failures");
        assert!(f[0].evidence[0].contains("cause not visible") && f[0].evidence[1].contains("UNAVAILABLE"), "{:?}", f[0].evidence);
        // No retransmits: healthy.
        let quiet = Evidence { past: nf(0, 0), ..base() };
        assert!(verdicts(&quiet).is_empty());
    }

    #[test]
    fn a_full_conntrack_table_explains_its_netfilter_drops() {
        let e = Evidence {
            accepts: 10,
            conntrack: Some(Conntrack { drop: 30, early_drop: 0, insert_failed: 0, count: Some(12), max: Some(12) }),
            past: Past { netfilter: Some(NetfilterDrops { syns: 30, segments: 0, peers: vec!["127.0.0.1".into()] }), ..Past::default() },
            ..base()
        };
        let f = diagnose(&e, &THRESHOLDS, &target());
        assert_eq!(f.iter().map(|f| (f.verdict, f.severity)).collect::<Vec<_>>(), [("conntrack_full", Severity::High)]);
        assert!(f[0].evidence[0].contains("30 new connections dropped"), "{:?}", f[0].evidence);
        // More netfilter drops than conntrack's: a rule drops too.
        let both = Evidence { past: Past { netfilter: Some(NetfilterDrops { syns: 50, ..NetfilterDrops::default() }), ..Past::default() }, ..e };
        assert_eq!(verdicts(&both), ["conntrack_full", "firewall_drop"]);
    }

    #[test]
    fn wrong_address_names_both_addresses() {
        let e = Evidence {
            accepts: 0,
            out_rsts: Some(12),
            listen_addrs: vec!["127.0.0.1".into()],
            past: Past { unbound_syns: Some(vec![("10.77.0.2".into(), 12)]), ..Past::default() },
            ..base()
        };
        let f = diagnose(&e, &THRESHOLDS, &target());
        assert_eq!((f[0].verdict, f[0].severity), ("wrong_address", Severity::Critical));
        assert!(f[0].evidence[0].starts_with("12 SYNs to 10.77.0.2 port 80 answered with a RST") && f[0].evidence[0].ends_with("bound to 127.0.0.1 only"), "{:?}", f[0].evidence);
        assert!(f[0].fix[0].contains("loopback"), "{:?}", f[0].fix);
    }

    #[test]
    fn flood_and_loss_and_no_listener() {
        let flood = Evidence { syn_recv_max: Some(128), synack_retransmits: 300, cookies_sent: Some(500), cookies_recv: Some(0), ..base() };
        assert_eq!(verdicts(&flood), ["syn_flood"]);
        let loss = Evidence { retransmits: 40, ..base() };
        assert_eq!(verdicts(&loss), ["packet_loss"]);
        let little = Evidence { retransmits: 2, ..base() };
        let f = diagnose(&little, &THRESHOLDS, &target());
        assert_eq!((f[0].verdict, f[0].severity), ("packet_loss", Severity::Low));
        let gone = Evidence { listening: false, out_rsts: Some(12), ..Evidence::default() };
        let f = diagnose(&gone, &THRESHOLDS, &target());
        assert_eq!(f[0].verdict, "no_listener");
        assert!(f[0].evidence[1].contains("12 TCP resets"));
    }
}
