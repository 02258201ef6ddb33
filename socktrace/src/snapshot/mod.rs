//! `socktrace snapshot`: a one-shot listing of TCP sockets (IPv4 and IPv6) from
//! `NETLINK_SOCK_DIAG`, in every network namespace on the host by default — what `ss -tanpe` shows
//! in one namespace, for all of them. Listeners show their accept queue, backlog and `sk_drops`;
//! every socket its holders (pid, comm) and namespace; `-i` adds `tcp_info` (rtt, cwnd, retrans).
//!
//! Needs neither eBPF nor root: without privileges it lists the namespaces it can enter (its
//! own) and says once on stderr what it skipped. As root it finds socket holders with a BPF
//! task-file iterator, the /proc scan being the fallback. It reads the kernel's socket tables directly and
//! does not use the tracer's model: nothing here is an event.
//!
//! Layout: [`netns`] finds and enters namespaces, [`diag`] speaks `inet_diag`, [`procs`] maps socket
//! inodes to processes ([`bpf_owners`] loads the iterator, [`btf_scan`] finds its offsets),
//! [`render`] prints; the ss-style expression is [`crate::filter`]'s.

pub mod bpf_owners;
pub mod btf_scan;
pub mod diag;
pub mod netns;
pub mod procs;
mod render;

use std::{collections::BTreeMap, io::Write as _};

use anyhow::{Context as _, bail};

use crate::{
    cli::{SnapshotArgs, UsageError, parse_filter},
    filter::{self, Expr, Scope, States, Subject},
    system,
};
use diag::{DiagSocket, Record, Request, TcpState};

/// Validated `snapshot` configuration.
#[derive(Debug)]
#[expect(clippy::struct_excessive_bools, reason = "independent output switches")]
pub struct Config {
    /// `inet_diag` state mask.
    states: u32,
    netns: Option<String>,
    info: bool,
    json: bool,
    header: bool,
    summary: bool,
    processes: bool,
    owners: procs::OwnerSource,
    families: Vec<u8>,
    filter: Option<Expr>,
}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError::Other(msg.into()).into()
}

impl Config {
    /// Validates `snapshot`'s arguments, ss's state rules included (see [`SnapshotArgs::all`]).
    pub fn from_args(args: &SnapshotArgs) -> anyhow::Result<Config> {
        if let Some(flag) = args.other.first() {
            return Err(usage(format!("{flag}: socktrace lists TCP sockets only (ss -t)")));
        }
        if let Some(q) = &args.query
            && q.split(',').any(|t| t != "tcp")
        {
            return Err(usage(format!("-A {q}: socktrace lists TCP sockets only (-A tcp)")));
        }
        let (mut v4, mut v6) = (args.ipv4, args.ipv6);
        match args.family.as_deref() {
            None => {}
            Some("inet") => v4 = true,
            Some("inet6") => v6 = true,
            Some(f) => return Err(usage(format!("-f {f}: socktrace lists TCP sockets only (-f inet or -f inet6)"))),
        }
        let parsed = parse_filter(&args.filter, Scope::Sockets, "snapshot")?;
        let ss_line = args.tcp || args.all || args.numeric || args.processes || args.extended || args.no_header || args.query.is_some();
        let mask = if let Some(st) = parsed.states {
            if !args.state.is_empty() {
                return Err(usage("--state and ss's state/exclude clauses select states: give one of them"));
            }
            st.mask
        } else if !args.state.is_empty() {
            args.state.iter().fold(0, |m, s| m | s.mask())
        } else if args.listening && (!args.all || args.listening_after_all) {
            1 << TcpState::Listen as u32
        } else if args.all || args.summary || !ss_line {
            filter::ALL_STATES
        } else {
            filter::SS_CONNECTED
        };
        let families = match (v4, v6) {
            (true, false) => vec![diag::FAMILIES[0]],
            (false, true) => vec![diag::FAMILIES[1]],
            _ => diag::FAMILIES.to_vec(),
        };
        Ok(Config {
            states: diag::state_mask(States::list(mask)),
            netns: args.netns.clone(),
            info: args.info,
            json: args.json,
            header: !args.no_header,
            summary: args.summary,
            processes: !args.no_processes,
            owners: args.owners,
            families,
            filter: parsed.expr,
        })
    }

    /// What each dump of a namespace asks for: both families in one dump when both are listed
    /// (one walk of the kernel's socket hash, not two).
    fn dump_families(&self) -> Vec<u8> {
        if self.families.len() > 1 { vec![diag::BOTH_FAMILIES] } else { self.families.clone() }
    }

    /// Whether a socket of `ns` passes the expression.
    fn keep(&self, ns: &netns::Netns, r: &Record) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(&Subject { netns: ns.inode, local: r.local.into(), peer: Some(r.peer.into()) }))
    }
}

/// The sockets of one namespace (JSON output).
pub struct NsSockets {
    pub ns: netns::Netns,
    pub records: Vec<Record>,
}

/// Where dumped sockets go: straight into table rows as they arrive (so formatting overlaps the
/// kernel's dump), or kept as records for JSON.
enum Rows {
    Table(Box<render::Table>),
    Records(Vec<Record>),
}

impl Rows {
    fn new(cfg: &Config) -> Rows {
        if cfg.json { Rows::Records(Vec::new()) } else { Rows::Table(Box::new(render::Table::new(cfg.info, cfg.header))) }
    }

    fn push(&mut self, ns: &netns::Netns, r: Record) {
        match self {
            Rows::Table(t) => t.push(ns, &r),
            Rows::Records(v) => v.push(r),
        }
    }
}

/// One thread of a namespace's dump, with its own diag socket: one address family or both
/// ([`diag::BOTH_FAMILIES`]), or half of that when the namespace holds many sockets
/// ([`diag::Split`]). The first lane of a family set also dumps its listeners.
#[derive(Clone, Copy, Debug)]
struct Lane {
    family: u8,
    split: Option<diag::Split>,
}

/// Below this many sockets (of the families dumped) in a namespace, one dump is fast enough;
/// above, a second core halves the kernel's share (each extra dump costs one more walk of the
/// socket hash).
const SPLIT_MIN: u64 = 5_000;

/// Lanes for the namespace the calling thread is in (reads its own /proc/thread-self/net and
/// /proc/sys/net views).
fn lanes(cfg: &Config) -> Vec<Lane> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // Cores left for dumps: the process-name pass runs beside them (on 2 cores, splitting then
    // only added a walk: 35 vs 34 ms at 20k sockets with names, 24–27 vs 28–29 ms without).
    let spare = cores.saturating_sub(usize::from(cfg.processes));
    let counts = netns::tcp_socket_counts();
    let port = netns::ephemeral_middle();
    let others = cfg.states & !TcpState::Listen.bit() != 0;
    let mut lanes = Vec::new();
    for family in cfg.dump_families() {
        let n = match family {
            diag::BOTH_FAMILIES => counts.0.saturating_add(counts.1),
            f if f == diag::FAMILIES[0] => counts.0,
            _ => counts.1,
        };
        if spare > 1 && others && n >= SPLIT_MIN {
            lanes.push(Lane { family, split: Some(diag::Split { port, same: true }) });
            lanes.push(Lane { family, split: Some(diag::Split { port, same: false }) });
        } else {
            lanes.push(Lane { family, split: None });
        }
    }
    lanes
}

/// Dumps one namespace, every lane on its own thread at once (each dump walks the kernel's whole
/// socket hash, so they overlap rather than add up). Results in lane order, IPv4 sockets first (as
/// ss lists them), then IPv6: a lane's rows by family.
fn dump_netns(ns: &netns::Netns, socks: Vec<(Lane, DiagSocket)>, cfg: &Config) -> anyhow::Result<Vec<Rows>> {
    let lanes = std::thread::scope(|s| {
        let handles: Vec<_> = socks
            .into_iter()
            .map(|(lane, mut sock)| {
                s.spawn(move || {
                    let mut rows = ByFamily { v4: Rows::new(cfg), v6: Rows::new(cfg) };
                    let keep = |r: &Record| cfg.keep(ns, r);
                    // Listeners (with their drop counters) from the listening hash, once per
                    // family set (the first lane of a split one); then the rest from the
                    // established hash without counters: cheaper for the kernel.
                    let listen = TcpState::Listen.bit();
                    if cfg.states & listen != 0 && lane.split.is_none_or(|sp| sp.same) {
                        let mut listeners = Vec::new();
                        sock.dump(Request { family: lane.family, states: listen, info: cfg.info }, &mut listeners)?;
                        for r in listeners.into_iter().filter(|r| keep(r)) {
                            rows.push(ns, r);
                        }
                    }
                    if cfg.states & !listen != 0 {
                        let req = Request { family: lane.family, states: cfg.states & !listen, info: cfg.info };
                        sock.dump_with(req, diag::DumpOptions { meminfo: false, split: lane.split }, |r| {
                            if keep(&r) {
                                rows.push(ns, r);
                            }
                        })?;
                    }
                    Ok::<_, diag::DiagError>(rows)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
                    .with_context(|| format!("network namespace {}", ns.path.display()))
            })
            .collect::<anyhow::Result<Vec<ByFamily>>>()
    })?;
    let (v4, v6): (Vec<Rows>, Vec<Rows>) = lanes.into_iter().map(|l| (l.v4, l.v6)).unzip();
    Ok(v4.into_iter().chain(v6).collect())
}

/// A lane's rows, IPv4 and IPv6 apart (a lane dumping both families gets them interleaved).
struct ByFamily {
    v4: Rows,
    v6: Rows,
}

impl ByFamily {
    fn push(&mut self, ns: &netns::Netns, r: Record) {
        if r.local.is_ipv4() { self.v4.push(ns, r) } else { self.v6.push(ns, r) }
    }
}

pub fn run(args: &SnapshotArgs) -> anyhow::Result<()> {
    let cfg = Config::from_args(args)?;
    if cfg.summary {
        return summary(&cfg);
    }
    let own = system::own_netns();
    let (targets, unreadable) = targets(cfg.netns.as_deref())?;
    let explicit = cfg.netns.is_some();

    let (table, found, skipped, owners) = std::thread::scope(|s| -> anyhow::Result<_> {
        // The /proc scan runs beside the dumps (it is the other half of the work).
        let scan = cfg.processes.then(|| s.spawn(|| procs::Owners::collect(cfg.owners)));
        let mut table = render::Table::new(cfg.info, cfg.header);
        let mut found = Vec::new();
        let mut skipped = Vec::new();
        // Namespaces are dumped a few at a time, their diag sockets opened inside each (cheap)
        // just before: every dump walks the kernel's whole socket hash, so a host with many small
        // namespaces (containers) spends its time in those walks, one core each.
        let at_once = std::thread::available_parallelism().map_or(1, usize::from);
        let cfg = &cfg;
        let mut targets = targets.into_iter().peekable();
        while targets.peek().is_some() {
            let mut batch = Vec::new();
            for ns in targets.by_ref().take(at_once) {
                let open = || lanes(cfg).into_iter().map(|lane| Ok((lane, DiagSocket::open()?))).collect::<Result<Vec<_>, diag::DiagError>>();
                match netns::within(&ns, own, open) {
                    Ok(socks) => {
                        let socks = socks.with_context(|| format!("network namespace {}", ns.path.display()))?;
                        batch.push((ns, socks));
                    }
                    Err(e) if explicit => {
                        let hint = if e.is_permission() { " (entering another network namespace needs root)" } else { "" };
                        bail!("{e}{hint}");
                    }
                    Err(e) => skipped.push(e),
                }
            }
            let dumped = std::thread::scope(|b| {
                let handles: Vec<_> = batch.into_iter().map(|(ns, socks)| b.spawn(move || dump_netns(&ns, socks, cfg).map(|rows| (ns, rows)))).collect();
                handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect::<anyhow::Result<Vec<_>>>()
            })?;
            for (ns, rows) in dumped {
                let mut records = Vec::new();
                for r in rows {
                    match r {
                        Rows::Table(t) => table.append(*t),
                        Rows::Records(r) => records.extend(r),
                    }
                }
                found.push(NsSockets { ns, records });
            }
        }
        let owners = scan.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).transpose().context("--owners bpf")?;
        Ok((table, found, skipped, owners))
    })?;

    if !explicit && (!skipped.is_empty() || unreadable > 0) {
        note(&skipped, unreadable, found.len());
    }
    let mut out = std::io::stdout().lock();
    if cfg.json {
        render::json(&mut out, &found, owners.as_ref(), cfg.info)?;
    } else {
        table.write(&mut out, owners.as_ref())?;
    }
    out.flush()?;
    Ok(())
}

/// The namespaces to list: all of them, or the one `--netns` names.
fn targets(arg: Option<&str>) -> anyhow::Result<(Vec<netns::Netns>, usize)> {
    let found = netns::discover();
    let Some(arg) = arg else { return Ok((found.namespaces, found.unreadable)) };
    let inode = system::netns_inode(arg)?;
    if let Some(ns) = found.namespaces.into_iter().find(|n| n.inode == inode) {
        return Ok((vec![ns], 0));
    }
    // A path or name that no process is in and that is not under /run/netns (a bind mount elsewhere).
    if arg.parse::<u32>().is_err() {
        let path = if arg.contains('/') { arg.into() } else { std::path::Path::new("/run/netns").join(arg) };
        return Ok((vec![netns::Netns { inode, path, name: None }], 0));
    }
    bail!("network namespace {arg}: no process is in it and no /run/netns entry refers to it (pass its path instead)")
}

/// The one stderr line about namespaces left out.
fn note(skipped: &[netns::EnterError], unreadable: usize, listed: usize) {
    let mut parts = Vec::new();
    if let Some(first) = skipped.first() {
        let n = skipped.len();
        parts.push(format!("could not enter {n} network namespace{} ({first})", if n == 1 { "" } else { "s" }));
    }
    if unreadable > 0 {
        parts.push(format!("could not read the network namespace of {unreadable} process{}", if unreadable == 1 { "" } else { "es" }));
    }
    let root = system::require_root().is_ok();
    let hint = if !root && (skipped.iter().any(netns::EnterError::is_permission) || unreadable > 0) { "; run as root to list every namespace" } else { "" };
    eprintln!("socktrace: note: listed {listed} network namespace{}; {}{hint}", if listed == 1 { "" } else { "s" }, parts.join(" and "));
}

/// `snapshot -s`: one namespace's TCP sockets by state, and its listen-queue counters.
#[derive(serde::Serialize)]
struct Summary {
    netns: u32,
    netns_name: Option<String>,
    total: u64,
    /// Every state asked for (all by default), zeros included.
    states: BTreeMap<&'static str, u64>,
    /// `TcpExt` counters since the namespace was created; `null` when unreadable.
    counters: BTreeMap<&'static str, Option<u64>>,
}

/// The namespace counters `-s` adds to ss's.
const SUMMARY_COUNTERS: [&str; 3] = ["ListenOverflows", "ListenDrops", "SyncookiesSent"];

fn summary(cfg: &Config) -> anyhow::Result<()> {
    let own = system::own_netns();
    let (targets, unreadable) = targets(cfg.netns.as_deref())?;
    let explicit = cfg.netns.is_some();
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for ns in &targets {
        let count = || -> Result<_, diag::DiagError> {
            let mut states: BTreeMap<TcpState, u64> = BTreeMap::new();
            let mut sock = DiagSocket::open()?;
            for family in cfg.dump_families() {
                let req = Request { family, states: cfg.states, info: false };
                sock.dump_with(req, diag::DumpOptions { meminfo: false, split: None }, |r| {
                    if cfg.keep(ns, &r) {
                        *states.entry(r.state).or_default() += 1;
                    }
                })?;
            }
            Ok((states, netns::tcp_ext_counters(&SUMMARY_COUNTERS)))
        };
        match netns::within(ns, own, count) {
            Ok(r) => {
                let (counts, counters) = r.with_context(|| format!("network namespace {}", ns.path.display()))?;
                let states: BTreeMap<&'static str, u64> = TcpState::ALL
                    .into_iter()
                    .filter(|s| *s != TcpState::Close && cfg.states & s.bit() != 0)
                    .map(|s| (s.name(), counts.get(&s).copied().unwrap_or(0)))
                    .collect();
                found.push(Summary {
                    netns: ns.inode,
                    netns_name: ns.name.clone(),
                    total: counts.values().sum(),
                    states,
                    counters: SUMMARY_COUNTERS.into_iter().zip(counters).collect(),
                });
            }
            Err(e) if explicit => {
                let hint = if e.is_permission() { " (entering another network namespace needs root)" } else { "" };
                bail!("{e}{hint}");
            }
            Err(e) => skipped.push(e),
        }
    }
    if !explicit && (!skipped.is_empty() || unreadable > 0) {
        note(&skipped, unreadable, found.len());
    }
    let mut out = std::io::stdout().lock();
    if cfg.json {
        // Serialized first, so a closed stdout is an io::Error (a quiet exit), not a serde one.
        let text = serde_json::to_string_pretty(&found)?;
        writeln!(out, "{text}")?;
    } else {
        for (i, s) in found.iter().enumerate() {
            if i > 0 {
                writeln!(out)?;
            }
            let name = s.netns_name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
            writeln!(out, "netns {}{name}", s.netns)?;
            let states: Vec<String> = s.states.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect();
            writeln!(out, "TCP: {} ({})", s.total, states.join(", "))?;
            let counters: Vec<String> = s
                .counters
                .iter()
                .map(|(k, v)| format!("{k} {}", v.map_or_else(|| "unavailable".to_owned(), |v| v.to_string())))
                .collect();
            writeln!(out, "since the namespace was created: {}", counters.join(", "))?;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn config(line: &str) -> anyhow::Result<Config> {
        let cli = Cli::try_parse_from(["socktrace", "snapshot"].into_iter().chain(line.split_whitespace()))?;
        let Command::Snapshot(args) = cli.command else { unreachable!() };
        Config::from_args(&args)
    }

    fn states(line: &str) -> Vec<TcpState> {
        let cfg = config(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        TcpState::ALL.into_iter().filter(|s| cfg.states & s.bit() != 0).collect()
    }

    #[test]
    fn states_follow_ss_for_ss_command_lines() {
        use TcpState::*;
        let all: Vec<TcpState> = TcpState::ALL.to_vec();
        let connected = vec![Established, SynSent, FinWait1, FinWait2, CloseWait, LastAck, Closing];
        // socktrace's own default: everything; ss's (any of its flags): connected only.
        assert_eq!(states(""), all);
        assert_eq!(states("-i"), all);
        for line in ["-t", "-tn", "-tnp", "-e", "-H", "-A tcp"] {
            assert_eq!(states(line), connected, "{line}");
        }
        assert_eq!(states("-tan"), all);
        assert_eq!(states("-tln"), vec![Listen]);
        assert_eq!(states("-tl state established"), vec![Established], "a state clause replaces -l, as in ss");
        assert_eq!(states("-t exclude listening"), all.iter().copied().filter(|s| *s != Listen).collect::<Vec<_>>());
        assert_eq!(states("--state time-wait,bucket"), vec![SynRecv, TimeWait]);
        assert_eq!(states("-s"), all, "-s counts every state by default");
        assert_eq!(states("-ts state established"), vec![Established]);
        // v4 / v6 / both.
        assert_eq!(config("-4").unwrap().families, vec![diag::FAMILIES[0]]);
        assert_eq!(config("-f inet6").unwrap().families, vec![diag::FAMILIES[1]]);
        assert_eq!(config("-46").unwrap().families, diag::FAMILIES.to_vec());
        assert!(!config("-tH").unwrap().header);
    }

    #[test]
    fn other_protocols_and_conflicts_are_usage_errors() {
        for (line, want) in [
            ("-u", "-u (UDP): socktrace lists TCP sockets only (ss -t)"),
            ("-tux", "-u (UDP)"),
            ("-x", "-x (Unix sockets)"),
            ("--sctp", "-S (SCTP)"),
            ("-A tcp,udp", "-A tcp,udp: socktrace lists TCP sockets only"),
            ("-f link", "-f link: socktrace lists TCP sockets only"),
            ("--state established state listening", "--state and ss's state/exclude clauses"),
            ("state nonsense", "bad filter at 7: unknown state"),
        ] {
            let e = config(line).expect_err(line);
            assert!(e.downcast_ref::<UsageError>().is_some(), "{line}: a usage error (exit 2): {e}");
            assert!(e.to_string().starts_with(want), "{line}: {e}");
        }
    }
}
