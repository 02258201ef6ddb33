//! socktrace: eBPF TCP listener tracer, the binary: command line, dispatch to the library's
//! modules (`socktrace::…`, see `lib.rs` for the flow), errors and exit codes.
//!
//! Exit status: 0 success (also when stdout is closed early), 1 runtime error, 2 usage error.

use std::{io::Write as _, process::ExitCode};

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _};

use socktrace::{
    agent, cli,
    cli::{Cli, Command, TraceArgs},
    diagnose, generate, listeners, offsets, pressure, probes, serve, snapshot, system, top, watch,
};

/// Parses the command line; ss's `-a` and `-l` on `snapshot`: the later one wins.
fn parse_cli<I: IntoIterator<Item = T>, T: Into<std::ffi::OsString> + Clone>(args: I) -> Result<Cli, clap::Error> {
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let (Command::Snapshot(args), Some(("snapshot", m))) = (&mut cli.command, matches.subcommand()) {
        let at = |id: &str| if m.value_source(id) == Some(clap::parser::ValueSource::CommandLine) { m.index_of(id) } else { None };
        args.listening_after_all = at("listening") > at("all");
    }
    Ok(cli)
}

fn main() -> ExitCode {
    system::tune_allocator();
    let cli = match parse_cli(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand { ExitCode::from(2) } else { ExitCode::SUCCESS };
            }
            // One line: clap's first line ("error: ...") without the usage block.
            let rendered = e.to_string();
            let line = rendered.lines().find(|l| !l.trim().is_empty()).unwrap_or("error: bad arguments");
            eprintln!("socktrace: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            if let Some(usage) = e.downcast_ref::<cli::UsageError>() {
                eprintln!("socktrace: {usage}");
                return ExitCode::from(2);
            }
            eprintln!("socktrace: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Probes { trace, json } => {
            let tracer = start(&trace)?;
            print_probes(&tracer, json)
        }
        Command::Watch { trace, filter, json, duration } => {
            let filter = filter.validate("watch")?;
            let tracer = start(&trace)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
            rt.block_on(watch::run(tracer, filter, json, duration))
        }
        Command::Serve { trace, filter, listen, allow_remote, max_listeners } => {
            if !listen.ip().is_loopback() && !allow_remote {
                return Err(RemoteRefused(listen).into());
            }
            let filter = filter.validate("serve")?;
            let tracer = start(&trace)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
            rt.block_on(async move {
                let agent = agent::Agent::new(tracer, filter.clone(), diag_source(filter.netns, false))?;
                serve::run(agent, serve::ServeOptions { listen, max_listeners }).await
            })
        }
        Command::Diagnose { trace, filter, duration, format, json } => {
            let filter = filter.validate("diagnose")?;
            let tracer = start(&trace)?;
            let format = if json { cli::Format::Json } else { format };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
            rt.block_on(async move {
                let agent = agent::Agent::new(tracer, filter.clone(), diag_source(filter.netns, true))?;
                diagnose::run(agent, duration, format).await
            })
        }
        Command::Top { trace, filter, interval, once, json, iterations, sort } => {
            let filter = filter.validate("top")?;
            let tracer = start(&trace)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
            rt.block_on(async move {
                let agent = agent::Agent::new(tracer, filter.clone(), diag_source(filter.netns, false))?;
                top::run(agent, top::TopOptions { interval, iterations, json, once, sort }).await
            })
        }
        Command::Snapshot(args) => snapshot::run(&args),
        Command::Generate(what) => generate::run(&what, &mut std::io::stdout().lock()),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("refusing to serve on non-loopback address {0} without --allow-remote")]
struct RemoteRefused(std::net::SocketAddr);

/// LISTEN sockets of the netns in scope from sock_diag, and with `half_open` (only `diagnose` uses
/// them) the SYN_RECV counts per port, which cost a walk of every established socket per sample.
fn diag_source(scope: Option<u32>, half_open: bool) -> agent::DiagSource {
    let mut live = listeners::LiveListeners::new(scope, half_open);
    Box::new(move || live.sample())
}

/// Preconditions, BTF layout, load and attach: everything a tracing command needs.
fn start(args: &TraceArgs) -> anyhow::Result<probes::Tracer> {
    system::require_root()?;
    let tracefs = system::ensure_tracefs()?;
    // Read once: the raw scan takes the offsets from it, aya parses it for the loader.
    let btf = offsets::read_btf(&args.btf)?;
    let layout = offsets::resolve_bytes(&btf, &args.btf, &tracefs)?;
    let cgroup = match &args.cgroup {
        Some(p) => p.clone(),
        None => system::cgroup2_root()?,
    };
    let opts = probes::LoadOptions {
        btf: args.btf.clone(),
        allowed: args.hooks.clone(),
        cgroup,
        ring_buffer_bytes: args.ring_buffer_kib * 1024,
        accept_hooks: args.accept_hooks,
        wait_start: args.wait_start,
        maps: pressure::MapSizes { listeners: args.map_listeners, pending: args.map_pending, accepting: args.map_accepting, past: args.map_past, waits: args.map_waits, acceptors: args.map_acceptors },
    };
    let tracer = probes::load(&layout, &btf, &opts)?;
    drop(btf);
    system::release_freed_heap();
    Ok(tracer)
}

fn print_probes(tracer: &probes::Tracer, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &tracer.report)?;
        writeln!(out)?;
        return Ok(());
    }
    for r in &tracer.report {
        match r.hook {
            Some(h) => writeln!(out, "{:<18} {:<11} {}", r.signal, h, r.attached.join(" + "))?,
            None => match r.failed.first().map(|f| f.reason.as_str()) {
                Some(why) if r.failed.iter().all(|f| f.reason.starts_with("disabled by") || f.reason.starts_with("not needed")) => {
                    writeln!(out, "{:<18} {:<11} {}", r.signal, "UNAVAILABLE", why.split(" (").next().unwrap_or(why))?;
                }
                _ => writeln!(out, "{:<18} {:<11} no hook works on this kernel", r.signal, "UNAVAILABLE")?,
            },
        }
        for n in &r.notes {
            writeln!(out, "{:<18}   note: {n}", "")?;
        }
        for f in &r.failed {
            writeln!(out, "{:<18}   tried {:<10} {}: {}", "", f.hook, f.at, f.reason)?;
        }
    }
    // The bounded maps: what each holds at most, and that an eviction is counted, not silent.
    for m in pressure::BoundedMap::ALL {
        match m.capacity(&tracer.maps) {
            0 => writeln!(out, "{:<18} {:<11} unused ({} ignored): {}", "map", m.name(), m.option(), m.unused_because())?,
            n => writeln!(out, "{:<18} {:<11} {n} {} ({}); evictions counted", "map", m.name(), m.holds(), m.option())?,
        }
    }
    writeln!(out)?;
    for line in tracer.mode_lines() {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_args(line: &str) -> cli::SnapshotArgs {
        let args = ["socktrace", "snapshot"].into_iter().chain(line.split_whitespace());
        match parse_cli(args).unwrap_or_else(|e| panic!("{line}: {e}")).command {
            Command::Snapshot(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ss_flag_clusters_parse() {
        let a = snapshot_args("-tlnp");
        assert!(a.tcp && a.listening && a.numeric && a.processes && !a.all);
        let a = snapshot_args("-tan state established ( dport = :443 or sport = :443 )");
        assert!(a.tcp && a.all && a.numeric);
        assert_eq!(a.filter.join(" "), "state established ( dport = :443 or sport = :443 )");
        let a = snapshot_args("-4tanieH -N blue");
        assert!(a.ipv4 && a.info && a.extended && a.no_header);
        assert_eq!(a.netns.as_deref(), Some("blue"));
        // The later of -a and -l wins, as in ss.
        assert!(snapshot_args("-tal").listening_after_all);
        assert!(!snapshot_args("-tla").listening_after_all);
        assert!(snapshot_args("-a -l").listening_after_all);
        // Options after the expression still count (clap, like ss's getopt, permutes).
        let a = snapshot_args("sport = :80 -H");
        assert!(a.no_header);
        assert_eq!(a.filter.join(" "), "sport = :80");
        assert!(snapshot_args("-u").other.udp);
    }

    #[test]
    fn filter_is_a_trailing_argument_of_every_tracing_command() {
        for cmd in ["watch", "top", "diagnose", "serve"] {
            let cli = parse_cli(["socktrace", cmd, "--port", "80", "sport", "=", ":80", "or", "src 10.0.0.0/8"]).unwrap();
            let f = match cli.command {
                Command::Watch { filter, .. } | Command::Top { filter, .. } | Command::Diagnose { filter, .. } | Command::Serve { filter, .. } => filter,
                other => panic!("{other:?}"),
            };
            assert_eq!(f.port, Some(80));
            assert_eq!(f.filter.join(" "), "sport = :80 or src 10.0.0.0/8");
        }
    }
}
