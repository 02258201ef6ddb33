//! `socktrace top`: one row per listening port every interval — queue now / peak / backlog,
//! accepts, accept-queue wait p50/p99/max, overflows and SYN drops (interval and total), SYN-ACK
//! retransmits, retransmits on its connections, and who owns / accepts.
//!
//! On a terminal it is a TUI (sortable, rows highlighted where the queue hit its backlog, a
//! sparkline of the selected listener's queue peaks); with `--once` or when stdout is not a
//! terminal, plain text; with `--json`, one JSON object per interval.
//!
//! A port with several LISTEN sockets (SO_REUSEPORT workers, v4 + v6) is a group row followed by
//! one indented row per socket: its own queue, backlog, accepts, drops and who accepts from it.

use std::{
    io::{IsTerminal as _, Write},
    time::Duration,
};

use serde::Serialize;
use tokio::signal::unix::SignalKind;

use crate::cli::SortKey;
use crate::{
    agent::Agent,
    model::{Listener, SocketRow},
    probes::Traced,
    system,
};

pub struct TopOptions {
    pub interval: Duration,
    pub iterations: Option<u64>,
    pub json: bool,
    pub once: bool,
    pub sort: SortKey,
}

/// One listener in one interval: the `--json` schema.
#[derive(Serialize, Debug)]
pub struct Row {
    pub netns: u32,
    pub laddr: Option<String>,
    pub laddrs: Vec<String>,
    pub lport: u16,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub listening: bool,
    pub queue_len: Option<u32>,
    pub queue_peak: Option<u32>,
    pub queue_max: Option<u32>,
    /// Counts of a signal no hook traces on this kernel are `None` (null), never 0.
    pub accepts: Option<u64>,
    pub accept_wait_p50_ns: Option<u64>,
    pub accept_wait_p99_ns: Option<u64>,
    pub accept_wait_max_ns: Option<u64>,
    pub overflows: Option<u64>,
    pub syn_drops: Option<u64>,
    pub synack_retransmits: Option<u64>,
    pub retransmits: Option<u64>,
    pub overflows_total: Option<u64>,
    pub syn_drops_total: Option<u64>,
    pub sk_drops: Option<u64>,
    pub last_acceptor: Option<(u32, u32, String)>,
    /// Every LISTEN socket on the port (one for a plain listener).
    pub sockets: Vec<SocketJson>,
    /// Times its kernel row was evicted since the agent started: its totals may be short.
    pub kernel_row_evictions: u64,
}

/// A process (or thread) in `--json`.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct Task {
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tid: Option<u32>,
    pub comm: String,
    /// Acceptors: CLOCK_MONOTONIC of its latest accept from this socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_accept_ns: Option<u64>,
}

/// One LISTEN socket of a port in one interval: the `sockets` entries of `--json`.
#[derive(Serialize, Debug)]
pub struct SocketJson {
    pub inode: u32,
    /// Socket cookie (null until sock_diag listed it).
    pub cookie: Option<u64>,
    pub laddr: Option<String>,
    pub listening: bool,
    pub queue_len: Option<u32>,
    pub queue_peak: Option<u32>,
    pub queue_max: Option<u32>,
    /// As in [`Row`]: `None` for a signal no hook traces.
    pub accepts: Option<u64>,
    pub overflows: Option<u64>,
    pub syn_drops: Option<u64>,
    pub synack_retransmits: Option<u64>,
    pub accepts_total: Option<u64>,
    pub overflows_total: Option<u64>,
    pub syn_drops_total: Option<u64>,
    pub sk_drops: Option<u64>,
    /// The queue passed its backlog in the interval.
    pub saturated: bool,
    /// Threads that accepted from it (latest first; null when accept is not traced, e.g.
    /// `--accept-hooks off`) and, apart, the processes holding its fd.
    pub acceptors: Option<Vec<Task>>,
    pub holders: Vec<Task>,
}

impl SocketJson {
    pub fn of(s: &SocketRow, traced: Traced) -> SocketJson {
        SocketJson {
            inode: s.inode,
            cookie: (s.cookie != 0).then_some(s.cookie),
            laddr: s.laddr.map(|a| a.to_string()),
            listening: s.listening,
            queue_len: s.queue_len,
            queue_peak: s.queue_peak,
            queue_max: s.backlog,
            accepts: traced.accept.then_some(s.interval.accepts),
            overflows: traced.listen_overflow.then_some(s.interval.overflows),
            syn_drops: traced.syn_drop.then_some(s.interval.syn_drops),
            synack_retransmits: traced.synack_retransmit.then_some(s.interval.synack_retransmits),
            accepts_total: traced.accept.then_some(s.total.accepts),
            overflows_total: traced.listen_overflow.then_some(s.total.overflows),
            syn_drops_total: traced.syn_drop.then_some(s.total.syn_drops),
            sk_drops: s.drops,
            saturated: s.saturated(),
            acceptors: (traced.accept && !traced.accept_derived).then(|| {
                s.acceptors.iter().map(|a| Task { pid: a.pid, tid: Some(a.tid), comm: a.comm.clone(), last_accept_ns: Some(a.ts_ns) }).collect()
            }),
            holders: s.owners.iter().map(|(pid, comm)| Task { pid: *pid, tid: None, comm: comm.clone(), last_accept_ns: None }).collect(),
        }
    }
}

impl Row {
    pub fn of(l: &Listener, traced: Traced) -> Row {
        let q = l.wait_quantiles();
        let owner = l.owners.first().cloned().or_else(|| l.last_acceptor.as_ref().map(|a| (a.pid, a.comm.clone())));
        let laddrs: Vec<String> = l.laddrs.iter().map(ToString::to_string).collect();
        Row {
            netns: l.key.netns,
            laddr: laddrs.first().cloned(),
            laddrs,
            lport: l.key.lport,
            pid: owner.as_ref().map(|o| o.0),
            comm: owner.map(|o| o.1),
            listening: l.listening,
            queue_len: l.queue_len,
            queue_peak: l.queue_peak,
            queue_max: l.backlog,
            accepts: traced.accept.then_some(l.interval.accepts),
            accept_wait_p50_ns: q.map(|q| q.0),
            accept_wait_p99_ns: q.map(|q| q.1),
            accept_wait_max_ns: q.map(|q| q.2),
            overflows: traced.listen_overflow.then_some(l.interval.overflows),
            syn_drops: traced.syn_drop.then_some(l.interval.syn_drops),
            synack_retransmits: traced.synack_retransmit.then_some(l.interval.synack_retransmits),
            retransmits: traced.retransmit.then_some(l.interval.retransmits),
            overflows_total: traced.listen_overflow.then_some(l.total.overflows),
            syn_drops_total: traced.syn_drop.then_some(l.total.syn_drops),
            sk_drops: l.drops,
            last_acceptor: l.last_acceptor.as_ref().map(|a| (a.pid, a.tid, a.comm.clone())),
            sockets: l.sockets.values().map(|s| SocketJson::of(s, traced)).collect(),
            kernel_row_evictions: l.kernel_resets,
        }
    }
}

pub fn sorted_rows(agent: &Agent, sort: SortKey) -> Vec<(Row, bool, Vec<u32>)> {
    let traced = agent.tracer.traced();
    let mut rows: Vec<_> = agent.model.listeners.values().map(|l| (Row::of(l, traced), l.saturated(), l.history.clone())).collect();
    let fill = |r: &Row| match (r.queue_peak, r.queue_max) {
        (Some(p), Some(m)) if m > 0 => f64::from(p) / f64::from(m),
        _ => 0.0,
    };
    match sort {
        SortKey::Drops => rows.sort_by_key(|(r, _, _)| {
            let n = |v: Option<u64>| v.unwrap_or(0);
            std::cmp::Reverse((n(r.overflows) + n(r.syn_drops), n(r.overflows_total) + n(r.syn_drops_total)))
        }),
        SortKey::Queue => rows.sort_by(|a, b| fill(&b.0).total_cmp(&fill(&a.0))),
        SortKey::Wait => rows.sort_by_key(|(r, _, _)| std::cmp::Reverse(r.accept_wait_p99_ns.unwrap_or(0))),
        SortKey::Accepts => rows.sort_by_key(|(r, _, _)| std::cmp::Reverse(r.accepts.unwrap_or(0))),
        SortKey::Port => rows.sort_by_key(|(r, _, _)| (r.lport, r.netns)),
    }
    rows
}

pub fn ms(ns: Option<u64>) -> String {
    ns.map_or_else(|| "-".into(), |v| {
        let ms = v as f64 / 1e6;
        if ms >= 1000.0 { format!("{:.2}s", ms / 1000.0) } else { format!("{ms:.2}ms") }
    })
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |x| x.to_string())
}

pub const HEADER: [&str; 13] =
    ["NETNS", "LISTEN", "PROCESS", "Q-NOW", "PEAK", "BACKLOG", "ACC/s", "WAIT-P50", "WAIT-P99", "WAIT-MAX", "OVF (TOT)", "SYNDROP (TOT)", "SYNACK/RTX"];

/// The table lines of one port: its group row, then (with several sockets) one row per socket.
pub fn lines(r: &Row, secs: f64) -> Vec<([String; 13], bool)> {
    let mut out = vec![(cells(r, secs), false)];
    if r.sockets.len() > 1 {
        let n = r.sockets.len();
        out.extend(r.sockets.iter().enumerate().map(|(i, s)| (member_cells(s, i + 1 == n, secs), s.saturated)));
    }
    out
}

/// A socket's row under its port: who accepts from it (else who holds it, marked), its queue.
fn member_cells(s: &SocketJson, last: bool, secs: f64) -> [String; 13] {
    // Without an accept hook nobody is known to accept: name the holder, claim nothing.
    let untraced = s.acceptors.is_none();
    let who = match (s.acceptors.as_ref().and_then(|a| a.first()), s.holders.first()) {
        (Some(a), _) => format!("{}/{}", a.comm, a.tid.unwrap_or(a.pid)),
        (None, Some(h)) if untraced => format!("held: {}/{}", h.comm, h.pid),
        (None, Some(h)) => format!("held: {}/{} (no accept)", h.comm, h.pid),
        (None, None) if untraced => "-".into(),
        (None, None) => "no accept".into(),
    };
    [
        String::new(),
        format!("{} ino {}", if last { "└" } else { "├" }, s.inode),
        who,
        opt(s.queue_len),
        opt(s.queue_peak),
        opt(s.queue_max),
        s.accepts.map_or_else(|| "-".into(), |a| format!("{:.0}", a as f64 / secs)),
        "-".into(),
        "-".into(),
        "-".into(),
        format!("{} ({})", opt(s.overflows), opt(s.overflows_total)),
        format!("{} ({})", opt(s.syn_drops), opt(s.syn_drops_total)),
        format!("{}/-", opt(s.synack_retransmits)),
    ]
}

pub fn cells(r: &Row, secs: f64) -> [String; 13] {
    let listen = match &r.laddr {
        Some(a) if r.laddrs.len() > 1 => format!("*:{} ({} addrs)", r.lport, r.laddrs.len()),
        Some(a) if a.contains(':') => format!("[{a}]:{}", r.lport),
        Some(a) => format!("{a}:{}", r.lport),
        None => format!("*:{}", r.lport),
    };
    [
        r.netns.to_string(),
        listen,
        match (&r.comm, r.pid) {
            (Some(c), Some(p)) => format!("{c}/{p}"),
            _ => "-".into(),
        },
        opt(r.queue_len),
        opt(r.queue_peak),
        opt(r.queue_max),
        r.accepts.map_or_else(|| "-".into(), |a| format!("{:.0}", a as f64 / secs)),
        ms(r.accept_wait_p50_ns),
        ms(r.accept_wait_p99_ns),
        ms(r.accept_wait_max_ns),
        format!("{} ({})", opt(r.overflows), opt(r.overflows_total)),
        format!("{} ({})", opt(r.syn_drops), opt(r.syn_drops_total)),
        format!("{}/{}", opt(r.synack_retransmits), opt(r.retransmits)),
    ]
}

pub async fn run(mut agent: Agent, opts: TopOptions) -> anyhow::Result<()> {
    let tui = !opts.json && !opts.once && std::io::stdout().is_terminal();
    eprintln!("{}", agent.tracer.summary());
    if tui {
        return crate::tui::run(agent, opts).await;
    }
    let iterations = if opts.once { Some(1) } else { opts.iterations };
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(opts.interval);
    ticker.tick().await;
    let mut out = std::io::stdout().lock();
    let mut done = 0u64;
    loop {
        tokio::select! {
            r = agent.pump() => r?,
            _ = ticker.tick() => {
                agent.close_interval()?;
                done += 1;
                print_interval(&mut out, &agent, &opts)?;
                if iterations.is_some_and(|n| done >= n) {
                    break;
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    Ok(())
}

fn print_interval(out: &mut impl Write, agent: &Agent, opts: &TopOptions) -> anyhow::Result<()> {
    let rows = sorted_rows(agent, opts.sort);
    let secs = opts.interval.as_secs_f64();
    if opts.json {
        let listeners: Vec<&Row> = rows.iter().map(|(r, _, _)| r).collect();
        let v = serde_json::json!({
            "ts_ns": system::monotonic_ns(),
            "interval_ns": u64::try_from(opts.interval.as_nanos()).unwrap_or(u64::MAX),
            "lost": agent.lost(),
            "program_runs_missed": agent.runs_missed,
            "other_bpf_programs_changed": agent.foreign_in_interval,
            "sock_diag": agent.diag_ok,
            "untraced": agent.tracer.traced().missing(),
            "accept_hooks": agent.tracer.accept_hooks,
            "maps": agent.pressure.maps,
            "listener_rows_lost": agent.model.rows_lost,
            "listeners": listeners,
        });
        writeln!(out, "{v}")?;
        out.flush()?;
        return Ok(());
    }
    let mut table: Vec<[String; 13]> = vec![HEADER.map(str::to_owned)];
    let mut hot = vec![false];
    for (r, saturated, _) in &rows {
        for (i, (line, member_hot)) in lines(r, secs).into_iter().enumerate() {
            table.push(line);
            hot.push(if i == 0 { *saturated } else { member_hot });
        }
    }
    let mut widths = [0usize; 13];
    for row in &table {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let untraced = agent.tracer.traced().missing();
    writeln!(
        out,
        "socktrace top: {} listeners, interval {:.1}s, events lost {}{}{}{}{}",
        rows.len(),
        secs,
        agent.lost(),
        if agent.diag_ok { "" } else { " (sock_diag unavailable: queue now/backlog/owner unknown)" },
        if untraced.is_empty() { String::new() } else { format!(" (UNAVAILABLE {}, shown as -: {})", agent.tracer.why_untraced(), untraced.join(", ")) },
        agent.pressure_note(),
        agent.missed_note()
    )?;
    for (i, row) in table.iter().enumerate() {
        let mark = if hot[i] { "!" } else { " " };
        let line: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        writeln!(out, "{mark}{}", line.join("  ").trim_end())?;
    }
    writeln!(out)?;
    out.flush()?;
    Ok(())
}
