//! `socktrace snapshot`: a one-shot listing of TCP sockets (IPv4 and IPv6) from
//! `NETLINK_SOCK_DIAG`, in every network namespace on the host by default — what `ss -tanpe` shows
//! in one namespace, for all of them. Listeners show their accept queue, backlog and `sk_drops`;
//! every socket its holders (pid, comm) and namespace; `-i` adds `tcp_info` (rtt, cwnd, retrans).
//!
//! Needs neither eBPF nor root: without privileges it lists the namespaces it can enter (its
//! own) and says once on stderr what it skipped. It reads the kernel's socket tables directly and
//! does not use the tracer's model: nothing here is an event.
//!
//! Layout: [`netns`] finds and enters namespaces, [`diag`] speaks `inet_diag`, [`procs`] maps socket
//! inodes to processes, [`filter`] is the ss-style expression language, [`render`] prints.

pub(crate) mod diag;
mod filter;
pub(crate) mod netns;
pub(crate) mod procs;
mod render;

use std::io::Write as _;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use crate::system;
use diag::{DiagSocket, Record, Request, TcpState};

/// `snapshot`'s raw arguments.
#[derive(Debug, Args)]
#[expect(clippy::struct_excessive_bools, reason = "independent command-line flags")]
pub struct SnapshotArgs {
    /// Only listening sockets (same as `--state listening`).
    #[arg(short = 'l', long, conflicts_with = "state")]
    pub listening: bool,
    /// Only sockets in these states (comma-separated or repeated; default: all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "STATE")]
    pub state: Vec<StateArg>,
    /// Only this network namespace: inode number, path (/run/netns/NAME, /proc/PID/ns/net) or name.
    #[arg(long, value_name = "NETNS")]
    pub netns: Option<String>,
    /// Show TCP internals from `tcp_info`: rtt, cwnd, retransmits (and more in --json).
    #[arg(short = 'i', long)]
    pub info: bool,
    /// Only IPv4 sockets.
    #[arg(short = '4', long, conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6 sockets.
    #[arg(short = '6', long)]
    pub ipv6: bool,
    /// Print a JSON array of objects instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Do not look up owning processes (skips the /proc/*/fd scan, the slowest part on hosts
    /// with many open files; JSON `processes` is then null).
    #[arg(long)]
    pub no_processes: bool,
    /// Filter expression, a subset of ss's: `sport`/`dport` with `= == != eq neq < > <= >=` and a
    /// port (`:8080`), `src`/`dst` with an address (`10.0.0.0/8`, `[::1]:80`, `:8080`), combined
    /// with `and`, `or`, `not`/`!` and parentheses. Example: `sport = :8080 and not dst 10.0.0.0/8`.
    #[arg(value_name = "FILTER", trailing_var_arg = true, allow_hyphen_values = true)]
    pub filter: Vec<String>,
}

/// `--state` values, named as ss names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    Established,
    Listening,
    #[value(name = "syn-recv")]
    SynRecv,
    #[value(name = "syn-sent")]
    SynSent,
    #[value(name = "time-wait")]
    TimeWait,
    #[value(name = "close-wait")]
    CloseWait,
    #[value(name = "fin-wait-1")]
    FinWait1,
    #[value(name = "fin-wait-2")]
    FinWait2,
    #[value(name = "last-ack")]
    LastAck,
    Closing,
    All,
}

impl StateArg {
    fn states(self) -> Vec<TcpState> {
        match self {
            StateArg::Established => vec![TcpState::Established],
            StateArg::Listening => vec![TcpState::Listen],
            StateArg::SynRecv => vec![TcpState::SynRecv],
            StateArg::SynSent => vec![TcpState::SynSent],
            StateArg::TimeWait => vec![TcpState::TimeWait],
            StateArg::CloseWait => vec![TcpState::CloseWait],
            StateArg::FinWait1 => vec![TcpState::FinWait1],
            StateArg::FinWait2 => vec![TcpState::FinWait2],
            StateArg::LastAck => vec![TcpState::LastAck],
            StateArg::Closing => vec![TcpState::Closing],
            StateArg::All => TcpState::ALL.to_vec(),
        }
    }
}

/// A usage error found after clap (a bad filter expression): one line, exit status 2.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct UsageError(#[from] filter::FilterError);

/// Validated `snapshot` configuration.
#[derive(Debug)]
pub struct Config {
    /// `inet_diag` state mask.
    states: u32,
    netns: Option<String>,
    info: bool,
    json: bool,
    processes: bool,
    families: Vec<u8>,
    filter: Option<filter::Expr>,
}

impl SnapshotArgs {
    pub fn validate(&self) -> Result<Config, UsageError> {
        let states: Vec<TcpState> = if self.listening {
            vec![TcpState::Listen]
        } else if self.state.is_empty() {
            TcpState::ALL.to_vec()
        } else {
            self.state.iter().flat_map(|s| s.states()).collect()
        };
        let families = match (self.ipv4, self.ipv6) {
            (true, false) => vec![diag::FAMILIES[0]],
            (false, true) => vec![diag::FAMILIES[1]],
            _ => diag::FAMILIES.to_vec(),
        };
        Ok(Config {
            states: diag::state_mask(states),
            netns: self.netns.clone(),
            info: self.info,
            json: self.json,
            processes: !self.no_processes,
            families,
            filter: filter::parse(&self.filter)?,
        })
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
        if cfg.json { Rows::Records(Vec::new()) } else { Rows::Table(Box::new(render::Table::new(cfg.info))) }
    }

    fn push(&mut self, ns: &netns::Netns, r: Record) {
        match self {
            Rows::Table(t) => t.push(ns, &r),
            Rows::Records(v) => v.push(r),
        }
    }
}

/// One thread of a namespace's dump, with its own diag socket: an address family, or half of
/// one when the namespace holds many sockets ([`diag::Split`]). The first lane of a family also
/// dumps its listeners.
#[derive(Clone, Copy, Debug)]
struct Lane {
    family: u8,
    split: Option<diag::Split>,
}

/// Below this many sockets of a family in a namespace, one dump is fast enough; above, a second
/// core halves the kernel's share (each extra dump costs one more walk of the socket hash).
const SPLIT_MIN: u64 = 5_000;

/// Lanes for the namespace the calling thread is in (reads its own /proc/thread-self/net and
/// /proc/sys/net views).
fn lanes(cfg: &Config) -> Vec<Lane> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let counts = netns::tcp_socket_counts();
    let port = netns::ephemeral_middle();
    let others = cfg.states & !TcpState::Listen.bit() != 0;
    let mut lanes = Vec::new();
    for &family in &cfg.families {
        let n = if family == diag::FAMILIES[0] { counts.0 } else { counts.1 };
        if cores > 1 && others && n >= SPLIT_MIN {
            lanes.push(Lane { family, split: Some(diag::Split { port, same: true }) });
            lanes.push(Lane { family, split: Some(diag::Split { port, same: false }) });
        } else {
            lanes.push(Lane { family, split: None });
        }
    }
    lanes
}

/// Dumps one namespace, every lane on its own thread at once (each dump walks the kernel's whole
/// socket hash, so they overlap rather than add up). Results in lane order.
fn dump_netns(ns: &netns::Netns, socks: Vec<(Lane, DiagSocket)>, cfg: &Config) -> anyhow::Result<Vec<Rows>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = socks
            .into_iter()
            .map(|(lane, mut sock)| {
                s.spawn(move || {
                    let mut rows = Rows::new(cfg);
                    let keep = |r: &Record| cfg.filter.as_ref().is_none_or(|f| f.matches(r.local, r.peer));
                    // Listeners (with their drop counters) from the listening hash, once per family;
                    // then the rest from the established hash without counters: cheaper for the kernel.
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
            .collect()
    })
}

pub fn run(args: &SnapshotArgs) -> anyhow::Result<()> {
    let cfg = args.validate()?;
    let own = system::own_netns();
    let (targets, unreadable) = targets(cfg.netns.as_deref())?;
    let explicit = cfg.netns.is_some();

    let (table, found, skipped, owners) = std::thread::scope(|s| -> anyhow::Result<_> {
        // The /proc scan runs beside the dumps (it is the other half of the work).
        let scan = cfg.processes.then(|| s.spawn(procs::Owners::scan));
        let mut table = render::Table::new(cfg.info);
        let mut found = Vec::new();
        let mut skipped = Vec::new();
        for ns in targets {
            let open = || lanes(&cfg).into_iter().map(|lane| Ok((lane, DiagSocket::open()?))).collect::<Result<Vec<_>, diag::DiagError>>();
            let socks = match netns::within(&ns, own, open) {
                Ok(socks) => socks.with_context(|| format!("network namespace {}", ns.path.display()))?,
                Err(e) if explicit => {
                    let hint = if e.is_permission() { " (entering another network namespace needs root)" } else { "" };
                    bail!("{e}{hint}");
                }
                Err(e) => {
                    skipped.push(e);
                    continue;
                }
            };
            let mut records = Vec::new();
            for rows in dump_netns(&ns, socks, &cfg)? {
                match rows {
                    Rows::Table(t) => table.append(*t),
                    Rows::Records(r) => records.extend(r),
                }
            }
            found.push(NsSockets { ns, records });
        }
        let owners = scan.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
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
