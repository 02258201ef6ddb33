//! Command-line surface: raw arguments as clap parses them (every option type the commands
//! take is defined here, views import them), and their validation into the config the commands
//! use. Usage errors are one line and exit with status 2.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    filter::{self, Filter, FilterError, Scope},
    pressure::MapSizes,
    probes::HookKind,
    system,
};

#[derive(Debug, Parser)]
#[command(name = "socktrace", version = env!("SOCKTRACE_VERSION"), about = "eBPF TCP listener tracer: why won't the service accept connections?")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show, for each signal, the kernel hook in use, the ones that failed and why.
    Probes {
        #[command(flatten)]
        trace: TraceArgs,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stream events (accept, listen_overflow, syn_drop, retransmit, synack_retransmit).
    Watch {
        #[command(flatten)]
        trace: TraceArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Stop after this long (e.g. 10s, 500ms, 2m); default: until Ctrl-C.
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
    },
    /// Live per-listener view: queue now/peak/backlog, accepts, accept waits, drops, retransmits.
    Top {
        #[command(flatten)]
        trace: TraceArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// Interval between rows (e.g. 1s, 500ms).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
        /// Print one interval as plain text and exit.
        #[arg(long)]
        once: bool,
        /// One JSON object per interval.
        #[arg(long)]
        json: bool,
        /// Stop after N intervals.
        #[arg(long, value_name = "N")]
        iterations: Option<u64>,
        /// Sort order.
        #[arg(long, value_enum, default_value = "drops")]
        sort: SortKey,
    },
    /// Observe listeners for a while, then give a verdict per listener with evidence, fix, check.
    Diagnose {
        #[command(flatten)]
        trace: TraceArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// How long to observe.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Same as --format json.
        #[arg(long)]
        json: bool,
    },
    /// Run continuously as a Prometheus exporter (/metrics, /healthz).
    Serve {
        #[command(flatten)]
        trace: TraceArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// Address to serve on. Loopback by default; another address needs --allow-remote.
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: std::net::SocketAddr,
        /// Allow a non-loopback --listen address (the metrics reveal ports and process names).
        #[arg(long)]
        allow_remote: bool,
        /// Most listeners exported (series per listener are bounded by this).
        #[arg(long, default_value_t = 1000)]
        max_listeners: usize,
    },
    /// List TCP sockets in every network namespace (like `ss -tanpe` in each), from
    /// NETLINK_SOCK_DIAG: queues, backlog, drops, owning processes. Needs no eBPF and no root.
    Snapshot(SnapshotArgs),
    /// Print shell completions (bash, zsh, fish) or a man page (roff) on stdout.
    #[command(subcommand)]
    Generate(crate::generate::Target),
}

/// `top --sort`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    /// Drops (overflows + SYN drops) in the interval.
    Drops,
    /// Queue peak relative to backlog.
    Queue,
    /// Accept-queue wait p99.
    Wait,
    /// Accepts in the interval.
    Accepts,
    /// Port.
    Port,
}

/// `diagnose --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Markdown,
    Json,
}

/// How the tracer is loaded (shared by every tracing command).
#[derive(Debug, Args, Clone)]
#[command(next_help_heading = "Tracing")]
pub struct TraceArgs {
    /// Kernel BTF to read struct layout from.
    #[arg(long, value_name = "FILE", default_value = "/sys/kernel/btf/vmlinux")]
    pub btf: PathBuf,
    /// Hook kinds allowed, comma-separated (fentry,fexit,kprobe,tp_btf,raw_tp,tracepoint,cgroup_skb) or `all`.
    #[arg(long, value_name = "LIST", default_value = "all", value_parser = crate::probes::parse_hooks)]
    pub hooks: BTreeSet<HookKind>,
    /// How accept(2) and listen(2) are traced: `auto` (fexit, kprobe, else the syscall
    /// tracepoints, which slow every syscall of every process while attached), `syscalls` (the
    /// syscall tracepoints only), `off` (no syscall tracepoint: accepts counted per interval from
    /// the children queued and the queue length; accept wait, acceptors and listen's backlog
    /// request unavailable; drops, queues, retransmits as before). `socktrace probes` shows what
    /// each costs.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub accept_hooks: crate::probes::AcceptHooks,
    /// Where an accept's queue wait starts: `auto` (the accepted socket's own establishment time,
    /// read at accept where the kernel's BTF has it: no extra program, and children queued before
    /// tracing started get their wait too), `enqueue` (an `inet_sock_set_state` program records
    /// each child as it is created, in the ENQUEUED map).
    #[arg(long, value_name = "FROM", default_value = "auto")]
    pub wait_start: crate::probes::WaitStart,
    /// cgroup-v2 directory for the cgroup_skb SYN-drop fallback (default: the cgroup-v2 root, i.e.
    /// every process). It only sees listeners owned by processes inside it.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Ring buffer size in KiB (power of two, at least 4).
    #[arg(long, value_name = "KIB", default_value_t = 4096, value_parser = parse_ring_kib)]
    pub ring_buffer_kib: u32,
    /// Listening sockets the kernel keeps counters for (LISTENERS map: a row per port and one per
    /// LISTEN socket, so 2 x N rows). Beyond it the least recently used rows are evicted (counted).
    #[arg(long, value_name = "N", default_value_t = MapSizes::DEFAULT.listeners, value_parser = parse_map_size)]
    pub map_listeners: u32,
    /// Child sockets waiting in accept queues whose enqueue time is kept (ENQUEUED map; an evicted
    /// one is an accept with an unknown wait, counted).
    #[arg(long, value_name = "N", default_value_t = MapSizes::DEFAULT.pending, value_parser = parse_map_size)]
    pub map_pending: u32,
    /// Threads inside `accept()` at once (ACCEPTING map, syscall and kprobe hooks; an evicted one is
    /// an accept not seen, counted as an eviction).
    #[arg(long, value_name = "N", default_value_t = MapSizes::DEFAULT.accepting, value_parser = parse_map_size)]
    pub map_accepting: u32,
    /// Rows of segments that never reached a listener (PAST map: per netns, port, class, address).
    #[arg(long, value_name = "N", default_value_t = MapSizes::DEFAULT.past, value_parser = parse_map_size)]
    pub map_past: u32,
    /// Rows of the in-kernel accept-wait histograms (WAITS map: one per listening socket and wait
    /// bucket in use, a few hundred for a busy socket; an evicted row loses that bucket's waits since the last
    /// interval, counted).
    #[arg(long, value_name = "N", default_value_t = MapSizes::DEFAULT.waits, value_parser = parse_map_size)]
    pub map_waits: u32,
    /// Rows of who accepted (ACCEPTORS map: one per listening socket and accepting thread; an
    /// evicted row hides that thread until its next accept, counted).
    #[arg(long, value_name = "N", default_value_t = MapSizes::DEFAULT.acceptors, value_parser = parse_map_size)]
    pub map_acceptors: u32,
}

/// What a tracing command shows: the shorthands and the filter expression (all must match).
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Filters")]
pub struct FilterArgs {
    /// Only this port: the listener's (top, serve, diagnose) or either end's (watch).
    #[arg(long, value_name = "PORT", value_parser = parse_port)]
    pub port: Option<u16>,
    /// watch only: events caused by this process (events with no process context are left out).
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Only this network namespace: inode number, path (/run/netns/NAME, /proc/PID/ns/net) or name.
    #[arg(long, value_name = "NETNS")]
    pub netns: Option<String>,
    /// ss's filter expression, e.g. `sport = :8080 and not src 10.0.0.0/8`: `sport`/`dport`
    /// (`= != < > <= >=`), `src`/`dst` (address[/prefix][:port]), `netns NS`, `and`/`or`/`not`,
    /// parentheses, and ss's leading `state NAME`/`exclude NAME`. Listener views (top, serve,
    /// diagnose) take sport, src, netns and states that include listening; watch takes no state.
    #[arg(value_name = "FILTER")]
    pub filter: Vec<String>,
}

/// A usage error found after clap (a bad filter, an option the command cannot apply): one line,
/// exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("{0}")]
    Other(String),
}

/// The filter arguments parsed and checked for `scope`, `netns` terms looked up.
pub fn parse_filter(args: &[String], scope: Scope, command: &str) -> anyhow::Result<filter::Parsed> {
    let mut parsed = filter::parse(args).map_err(UsageError::from)?;
    parsed.check(scope, command).map_err(UsageError::from)?;
    parsed.resolve_netns(system::netns_inode)?;
    Ok(parsed)
}

impl FilterArgs {
    /// `command` is the subcommand's name (for messages); `watch` filters events, the others
    /// listeners.
    pub fn validate(&self, command: &str) -> anyhow::Result<Filter> {
        let scope = if command == "watch" { Scope::Events } else { Scope::Listeners };
        if scope == Scope::Listeners && self.pid.is_some() {
            return Err(UsageError::Other(format!("--pid: {command} shows listeners, not events (--pid applies to watch)")).into());
        }
        let parsed = parse_filter(&self.filter, scope, command)?;
        let netns = self.netns.as_deref().map(system::netns_inode).transpose()?;
        Ok(Filter::new(self.port, self.pid, netns, parsed.expr))
    }
}

/// `snapshot --owners`: how socket inodes are mapped to processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OwnerSource {
    Auto,
    Bpf,
    Proc,
}

/// `snapshot`'s raw arguments: socktrace's own and ss's (so ss command lines paste).
#[derive(Debug, Args)]
#[expect(clippy::struct_excessive_bools, reason = "independent command-line flags")]
pub struct SnapshotArgs {
    /// Only listening sockets (same as `--state listening`).
    #[arg(short = 'l', long, conflicts_with = "state")]
    pub listening: bool,
    /// Every state (ss -a). Without -a, -l, --state or `state`, an ss command line (one with
    /// -t, -a, -n, -p, -e, -H or -A) lists what ss lists: all but listening, time-wait and syn-recv;
    /// otherwise every state is listed.
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Only sockets in these states (comma-separated or repeated; default: all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "STATE")]
    pub state: Vec<StateArg>,
    /// Only this network namespace: inode number, path (/run/netns/NAME, /proc/PID/ns/net) or name.
    #[arg(short = 'N', long, value_name = "NETNS")]
    pub netns: Option<String>,
    /// Show TCP internals from `tcp_info`: rtt, cwnd, retransmits (and more in --json).
    #[arg(short = 'i', long)]
    pub info: bool,
    /// Only IPv4 sockets.
    #[arg(short = '4', long)]
    pub ipv4: bool,
    /// Only IPv6 sockets.
    #[arg(short = '6', long)]
    pub ipv6: bool,
    /// Per network namespace: TCP sockets by state and in total, and the namespace's
    /// listen overflows, listen drops and SYN cookies sent since it was created (ss -s).
    #[arg(short = 's', long)]
    pub summary: bool,
    /// No header line (ss -H).
    #[arg(short = 'H', long)]
    pub no_header: bool,
    /// Print a JSON array of objects instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Do not look up owning processes (skips the /proc/*/fd scan, the slowest part on hosts
    /// with many open files; JSON `processes` is then null).
    #[arg(long)]
    pub no_processes: bool,
    /// Where owning processes come from: `bpf` (a BPF task-file iterator, one pass in the
    /// kernel; needs root and kernel BTF), `proc` (the /proc/*/fd scan), `auto` (bpf, else proc).
    #[arg(long, value_enum, default_value_t = OwnerSource::Auto, value_name = "SOURCE")]
    pub owners: OwnerSource,
    /// TCP (ss -t): the only protocol socktrace lists.
    #[arg(short = 't', long)]
    pub tcp: bool,
    /// Numeric (ss -n): the only output socktrace has.
    #[arg(short = 'n', long)]
    pub numeric: bool,
    /// Processes (ss -p): shown by default.
    #[arg(short = 'p', long)]
    pub processes: bool,
    /// Extended (ss -e): uid and inode are in --json.
    #[arg(short = 'e', long)]
    pub extended: bool,
    /// Socket tables (ss -A): only `tcp` is listed by socktrace.
    #[arg(short = 'A', long = "query", visible_alias = "socket", value_name = "QUERY")]
    pub query: Option<String>,
    /// Address family (ss -f): inet or inet6.
    #[arg(short = 'f', long, value_name = "FAMILY")]
    pub family: Option<String>,
    /// ss's flags for other protocols: refused with a one-line error.
    #[command(flatten)]
    pub other: OtherProtocols,
    /// -l given after -a (the last of the two wins, as in ss); set from clap's argument indices.
    #[arg(skip)]
    pub listening_after_all: bool,
    /// ss's filter: leading `state NAME`/`exclude NAME` clauses, then an expression over
    /// `sport`/`dport` (`= == != eq neq < > <= >=`, a port like `:8080`), `src`/`dst` (an address
    /// like `10.0.0.0/8`, `[::1]:80`, `:8080`) and `netns NS`, combined with `and`, `or`,
    /// `not`/`!` and parentheses. Example: `state established '( dport = :443 or sport = :443 )'`.
    #[arg(value_name = "FILTER")]
    pub filter: Vec<String>,
}

/// ss's flags for protocols socktrace does not list.
#[derive(Debug, Args)]
#[expect(clippy::struct_excessive_bools, reason = "independent command-line flags")]
pub struct OtherProtocols {
    #[arg(short = 'u', long, hide = true)]
    pub udp: bool,
    #[arg(short = 'x', long, hide = true)]
    pub unix: bool,
    #[arg(short = 'w', long, hide = true)]
    pub raw: bool,
    #[arg(short = 'd', long, hide = true)]
    pub dccp: bool,
    #[arg(short = 'S', long, hide = true)]
    pub sctp: bool,
    #[arg(short = '0', long, hide = true)]
    pub packet: bool,
    #[arg(short = 'M', long, hide = true)]
    pub mptcp: bool,
    #[arg(long, hide = true)]
    pub vsock: bool,
    #[arg(long, hide = true)]
    pub tipc: bool,
    #[arg(long, hide = true)]
    pub xdp: bool,
}

impl OtherProtocols {
    /// The first flag given, as `-u (UDP)`.
    pub fn first(&self) -> Option<&'static str> {
        [
            (self.udp, "-u (UDP)"),
            (self.unix, "-x (Unix sockets)"),
            (self.raw, "-w (raw sockets)"),
            (self.dccp, "-d (DCCP)"),
            (self.sctp, "-S (SCTP)"),
            (self.packet, "-0 (packet sockets)"),
            (self.mptcp, "-M (MPTCP)"),
            (self.vsock, "--vsock"),
            (self.tipc, "--tipc"),
            (self.xdp, "--xdp"),
        ]
        .into_iter()
        .find_map(|(on, name)| on.then_some(name))
    }
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
    Connected,
    Synchronized,
    Bucket,
    Big,
}

impl StateArg {
    /// The states (bits by kernel state number), as ss's `state NAME` selects them.
    pub fn mask(self) -> u32 {
        self.to_possible_value().and_then(|v| filter::state_by_name(v.get_name())).unwrap_or(0)
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(u16::try_from(p).unwrap_or_default()),
        _ => Err(format!("{s:?} is not a TCP port (1-65535)")),
    }
}

fn parse_map_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=MapSizes::MAX).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number of entries between 1 and {}", MapSizes::MAX)),
    }
}

fn parse_ring_kib(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(k) if k >= 4 && k.is_power_of_two() && k <= 1 << 20 => Ok(k),
        _ => Err(format!("{s:?} is not a power of two between 4 and 1048576")),
    }
}

/// `10s`, `500ms`, `2m`, `1h`, or bare seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration (e.g. 10s, 500ms, 2m)");
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| err())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(err()),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("8080").unwrap(), 8080);
        assert!(parse_port("0").is_err());
        assert!(parse_port("70000").is_err());
        assert!(parse_port("http").is_err());
    }
}
