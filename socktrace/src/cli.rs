//! Command-line surface: raw arguments as clap parses them, and their validation into the config
//! the commands use. Usage errors are one line and exit with status 2.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{probes::HookKind, system};

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
        sort: crate::top::SortKey,
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
        format: crate::diagnose::Format,
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
    Snapshot(crate::snapshot::SnapshotArgs),
    /// Print shell completions (bash, zsh, fish) or a man page (roff) on stdout.
    #[command(subcommand)]
    Generate(crate::generate::Target),
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
    /// cgroup-v2 directory for the cgroup_skb SYN-drop fallback (default: the cgroup-v2 root, i.e.
    /// every process). It only sees listeners owned by processes inside it.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Ring buffer size in KiB (power of two, at least 4).
    #[arg(long, value_name = "KIB", default_value_t = 4096, value_parser = parse_ring_kib)]
    pub ring_buffer_kib: u32,
}

/// Event filters.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Filters")]
pub struct FilterArgs {
    /// Only events whose local or remote port is PORT.
    #[arg(long, value_name = "PORT", value_parser = parse_port)]
    pub port: Option<u16>,
    /// Only events caused by this process (events with no process context are left out).
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Only this network namespace: inode number, path (/run/netns/NAME, /proc/PID/ns/net) or name.
    #[arg(long, value_name = "NETNS")]
    pub netns: Option<String>,
}

/// Validated filter.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub port: Option<u16>,
    pub pid: Option<u32>,
    pub netns: Option<u32>,
}

impl FilterArgs {
    pub fn validate(&self) -> Result<Filter, system::SystemError> {
        Ok(Filter {
            port: self.port,
            pid: self.pid,
            netns: self.netns.as_deref().map(system::netns_inode).transpose()?,
        })
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(u16::try_from(p).unwrap_or_default()),
        _ => Err(format!("{s:?} is not a TCP port (1-65535)")),
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
