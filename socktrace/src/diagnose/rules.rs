//! The diagnosis itself: evidence about one listener over a window in, findings out. Pure and
//! deterministic; every threshold lives in [`Thresholds`] (documented in the README).

use serde::Serialize;

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
    /// Listen overflows at the 3rd ACK, and SYNs dropped, in the window.
    pub overflows: u64,
    pub syn_drops: u64,
    /// Sample intervals that had drops, and the largest number of arrivals (accepts + drops) in
    /// one sample interval.
    pub intervals_with_drops: u32,
    pub max_burst: u64,
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
            "accept queue at its backlog {}/{b} for {share:.0} % of the window ({} of {} samples)",
            e.queue_peak.map_or_else(|| "?".into(), |p| p.to_string()),
            e.samples_full,
            e.samples
        ));
    }
    v
}

fn rate_line(e: &Evidence) -> String {
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
        let mut evidence = vec![format!("no socket is listening on port {} in netns {}", target.lport, target.netns)];
        if let Some(r) = e.out_rsts.filter(|r| *r > 0) {
            evidence.push(format!("{r} TCP resets sent in that netns during the window (refused connections)"));
        }
        out.push(Finding {
            verdict: "no_listener",
            severity: Severity::Critical,
            evidence,
            fix: vec![
                "start the service, or check it binds this port and address in this network namespace (container/pod)".into(),
                "check the process did not exit or fail to bind: its logs, `ss -tlnp` inside the namespace".into(),
            ],
            verify: vec![format!("socktrace snapshot -l --netns {} sport = :{}", target.netns, target.lport)],
        });
        return out;
    }
    let arrivals = e.accepts + e.overflows + e.syn_drops;
    let drops = e.overflows + e.syn_drops;
    let full_share = if e.samples > 0 { f64::from(e.samples_full) / f64::from(e.samples) } else { 0.0 };
    let accept_share = if arrivals > 0 { e.accepts as f64 / arrivals as f64 } else { 1.0 };
    let long_wait = e.wait_p99_ns.is_some_and(|w| w >= t.stall_wait_ns);
    let stalled = full_share >= t.stall_full_share && (accept_share <= t.stall_accept_share || long_wait);
    let mut base = queue_lines(e);
    base.push(rate_line(e));
    if let Some(w) = wait_line(e) {
        base.push(w);
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

    if stalled {
        let mut evidence = base.clone();
        if drops > 0 {
            evidence.push(drop_line(e));
        }
        match (&e.acceptor, e.last_accept_ago_secs) {
            (Some((pid, comm)), Some(ago)) => evidence.push(format!("accepting thread {pid} ({comm}) last accepted {ago:.1} s ago")),
            _ => evidence.push("no accept() seen during the window".into()),
        }
        out.push(Finding {
            verdict: "accept_stall",
            severity: Severity::Critical,
            evidence,
            fix: vec![
                "find why the application stopped calling accept(): thread dump / `perf top -p PID` of the owning process; look for a blocked or saturated accept loop (lock, full worker pool, GC pause, blocking I/O on the accept thread)".into(),
                "raising the backlog or net.core.somaxconn alone only delays the drops: a queue that is not drained fills up whatever its size".into(),
            ],
            verify: vec![
                format!("{top}   # ACC/s back up, PEAK below BACKLOG, OVF/SYNDROP 0"),
                format!("socktrace diagnose {} --duration 30s   # verdict healthy", target.args()),
            ],
        });
    } else if drops > 0 {
        let bursty = full_share <= t.burst_full_share && e.wait_p99_ns.is_none_or(|w| w < t.burst_wait_ns);
        let mut evidence = base.clone();
        evidence.push(drop_line(e));
        evidence.push(format!("largest arrival burst: {} connections in one sample interval", e.max_burst));
        let backlog = e.backlog.unwrap_or(0);
        let suggested = (e.max_burst.max(u64::from(backlog) * 2)).next_power_of_two().max(128);
        let capped = e.somaxconn.is_some_and(|s| Some(s) == e.backlog);
        let severity = if bursty { Severity::High } else { Severity::Medium };
        if !bursty {
            evidence.push("ambiguous: the queue was full often but accepts kept up — a slow consumer and bursts both fit".into());
        }
        out.push(Finding {
            verdict: "backlog_too_small",
            severity,
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
        });
        if capped {
            out.push(somaxconn_finding(e, &top, target));
        }
    } else if e.somaxconn.is_some_and(|s| Some(s) == e.backlog)
        && e.requested_backlog.is_some_and(|r| Some(r) > e.backlog)
        && full_share > 0.0
    {
        out.push(somaxconn_finding(e, &top, target));
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
    out.sort_by(|a, b| b.severity.cmp(&a.severity));
    out
}

fn somaxconn_finding(e: &Evidence, top: &str, target: &Target) -> Finding {
    let somax = e.somaxconn.unwrap_or(0);
    Finding {
        verdict: "somaxconn_cap",
        severity: Severity::High,
        evidence: vec![
            format!(
                "backlog {} = net.core.somaxconn {somax}; the application asked for {}",
                e.backlog.unwrap_or(0),
                e.requested_backlog.map_or_else(|| "an unknown value (listen() was called before tracing started)".into(), |r| r.to_string())
            ),
            format!("the queue reached its backlog in {} of {} samples", e.samples_full, e.samples),
        ],
        fix: vec![
            format!(
                "raise net.core.somaxconn in netns {} to at least {} (sysctl -w net.core.somaxconn=N, per network namespace)",
                target.netns,
                e.requested_backlog.unwrap_or(somax.saturating_mul(2)).max(somax.saturating_mul(2))
            ),
            "then restart the listener: the cap is applied at listen()".into(),
        ],
        verify: vec![format!("{top}   # BACKLOG shows the requested value")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let capped = Evidence { somaxconn: Some(8), ..e };
        assert_eq!(verdicts(&capped), ["backlog_too_small", "somaxconn_cap"]);
        let f = diagnose(&capped, &THRESHOLDS, &target());
        assert!(f[0].fix[0].contains("from 8 to at least 128"), "{:?}", f[0].fix);
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
