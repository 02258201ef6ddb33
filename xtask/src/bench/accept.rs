//! Accept-storm overhead: connections/s of a loopback server that accepts and closes as fast as
//! it can, untraced vs with `socktrace serve` attached (default hooks, and `--accept-hooks off`)
//! vs with `socktrace watch --json > /dev/null` attached, alternating, `--reps` times. The load saturates both cores, so connections/s measures
//! the CPU cost of a connection; the CPU time of the load generator and of the tracer per
//! connection are reported too (less sensitive to other load than the rate).
//!
//! Then one extra traced run with the kernel's BPF run-time statistics on (`BPF_ENABLE_STATS`,
//! only while the bench holds the fd; not during the timed runs, it costs two clock reads per
//! program run): nanoseconds per connection of each socktrace program.

use std::{collections::BTreeMap, fmt::Write as _, fs, os::fd::FromRawFd as _, process::Command};

use anyhow::Context as _;
use serde_json::Value;

use super::{FloorPoints, floor::Floor};

use super::{
    Ctx, NetNs, Section, Storm, StormResult, Stdout, Summary, Table, Tracer, exit_summary, foreign_bpf_programs, loadavg, metric_sum, netns_inode,
    provenance, storm,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    Untraced,
    Serve,
    /// `serve --accept-hooks off`: no syscall tracepoint, no enqueue hook; accepts derived.
    ServeOff,
    Watch,
    /// Empty programs on `serve`'s attach points (`floor`): what the hooks alone cost.
    Floor,
    /// Empty programs on `serve --accept-hooks off`'s attach points.
    FloorOff,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::Serve => "serve",
            Config::ServeOff => "serve --accept-hooks off",
            Config::Watch => "watch --json >/dev/null",
            Config::Floor => "floor: empty programs on serve's hooks",
            Config::FloorOff => "floor: empty programs on --accept-hooks off's hooks",
        }
    }
}

struct Run {
    load: StormResult,
    tracer_cpu: f64,
    /// What the tracer counted, against the connections accepted.
    check: String,
    exact: bool,
    /// Other processes' tracing programs loaded when the run started.
    foreign_bpf: usize,
}

pub fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    println!("\n== accept: loopback accept storm, {} s per run, {} repetitions, alternating ==", ctx.secs, ctx.reps);
    let ns = NetNs::new("accept")?;
    let load_before = loadavg();
    let mark = ctx.noise.mark();
    let configs = [Config::Untraced, Config::Serve, Config::ServeOff, Config::Watch, Config::Floor, Config::FloorOff];
    let floors = FloorPoints::of(ctx)?;
    let mut runs: BTreeMap<Config, Vec<Run>> = BTreeMap::new();
    for rep in 0..ctx.reps {
        for k in 0..configs.len() {
            // Rotate the order so no configuration always runs first (or after the same one).
            let c = configs[(rep + k) % configs.len()];
            let r = one(ctx, &ns, c, &floors)?;
            println!(
                "  rep {} {:<24} {:>8.0} conn/s  load gen {:>5.1} µs/conn  tracer {:>5.1} µs/conn  other load {:.2}, foreign eBPF progs {}  {}",
                rep + 1,
                c.name(),
                r.load.rate,
                r.load.cpu_secs / r.load.accepted.max(1) as f64 * 1e6,
                r.tracer_cpu / r.load.accepted.max(1) as f64 * 1e6,
                r.load.noise,
                r.foreign_bpf,
                r.check
            );
            runs.entry(c).or_default().push(r);
        }
    }
    let kernel = kernel_cost(ctx, &ns);
    let foreign_bpf = runs.values().flatten().map(|r| r.foreign_bpf).max().unwrap_or(0);

    let t = table(&configs, &runs);
    println!("\n{}", t.text());
    println!("\n{}", floor_summary(&runs, &floors));
    if let Ok(k) = &kernel {
        println!("\n{}", k.text());
    }

    let mut md = String::from("## Accept-storm overhead\n\n");
    md.push_str(&provenance(ctx, &load_before, mark));
    let s = Storm::max(ctx.secs);
    let _ = write!(
        md,
        "\nLoad: `st-bench storm` in a fresh netns: {} listeners on 127.0.0.1, {} server threads (epoll, \
         nonblocking `accept4` until EAGAIN, close), {} client threads connecting and closing (SO_LINGER 0) \
         as fast as they can for {} s, at most 512 connections waiting in accept queues (a client waits \
         rather than overflow a queue: a dropped SYN would stall it for the 1 s SYN timeout). The load aims \
         to keep both cores busy, so conn/s follows the CPU cost of a connection. Tracers: \
         `socktrace serve --listen 127.0.0.1:<port> --netns <ns>` (scraped every second), the same with \
         `--accept-hooks off` (no syscall tracepoint, no enqueue hook: accept counts derived from the children \
         queued; wait and acceptors \
         unavailable) and \
         `socktrace watch --json --netns <ns> > /dev/null`, started before the load (after their \
         \"tracing started\"/\"serving\" line), default hooks and ring buffer (4 MiB), the cgroup_skb \
         SYN-drop hook on the cgroup-v2 root. {} repetitions, order rotated each repetition.\n\n",
        s.listeners, s.servers, s.clients, ctx.secs, ctx.reps
    );
    md.push_str(&t.markdown());
    let _ = write!(md, "\n{}", floor_summary(&runs, &floors));
    if foreign_bpf > 0 {
        let _ = writeln!(
            md,
            "\n**Other processes had up to {foreign_bpf} eBPF tracing programs loaded during these runs** (`bpftool prog \
             show`, e.g. someone's socktrace test): they run on this traffic too, so \"untraced\" was not quite untraced \
             and every configuration's cost includes theirs."
        );
    }
    md.push_str(
        "\n\"× untraced (CPU/conn)\" = untraced total µs/conn ÷ this configuration's: the connections/s ratio a \
         CPU-bound server would see. It is the stable measure here: conn/s also depends on how busy the load keeps \
         both cores (\"load gen cores busy\", CPU time of the load generator ÷ run time; 2 = saturated), which \
         varies from run to run on this shared VM with the scheduling of client, server and other processes.\n",
    );
    md.push_str(
        "\n\"no event lost\": runs where the tracer accounted for every connection accepted (`serve`: \
         `socktrace_accepts_total` of the netns equal to it, with `--accept-hooks off` derived from the \
         children queued and the queue; `watch`: the exit summary shows at least as many events \
         and none lost). \
         CPU µs/conn: user+system time of the load generator (getrusage) and of the tracer \
         (/proc/PID/stat) over the run, per accepted connection; eBPF programs run in the context of \
         the load's syscalls and softirqs, so their cost is in the load generator's column.\n",
    );
    match kernel {
        Ok(k) => {
            md.push_str("\n### In-kernel cost per connection (BPF run-time statistics)\n\n");
            md.push_str(&k.markdown());
            md.push_str(
                "\nOne `serve` run (accept events muted in the kernel: waits and acceptors go to the \
                 `WAITS`/`ACCEPTORS` maps), one `serve --accept-hooks off` run (no syscall tracepoint, no \
                 enqueue hook) and one `watch --json` run (every accept sent), each at full rate with \
                 `BPF_ENABLE_STATS` held by the bench (`run_time_ns`/`run_cnt` from the program fds' fdinfo): \
                 time inside each program, without the tracepoint dispatch around it (the syscall \
                 tracepoints' slow path, paid by every syscall, is in the CPU per connection above and in \
                 the syscalls section).\n",
            );
        }
        Err(e) => {
            let _ = writeln!(md, "\nIn-kernel cost: not measured ({e:#}).");
        }
    }
    Ok(Section { name: "accept", markdown: md })
}

/// What the hooks alone cost (floor − untraced) and what socktrace's programs and agent add above
/// them (socktrace − floor), µs per connection, medians; and the best CPU ratio each mode could reach.
fn floor_summary(runs: &BTreeMap<Config, Vec<Run>>, floors: &FloorPoints) -> String {
    let total = |c: Config| Summary::of(&runs[&c].iter().map(|x| (x.load.cpu_secs + x.tracer_cpu) / x.load.accepted.max(1) as f64 * 1e6).collect::<Vec<_>>()).median;
    floors.summary("connection", total(Config::Untraced), [(total(Config::Serve), total(Config::Floor)), (total(Config::ServeOff), total(Config::FloorOff))])
}

/// The comparison table: one row per configuration, median [min–max] over the repetitions.
fn table(configs: &[Config], runs: &BTreeMap<Config, Vec<Run>>) -> Table {
    let rates = |c: Config| runs.get(&c).map(|v| v.iter().map(|r| r.load.rate).collect::<Vec<_>>()).unwrap_or_default();
    let base = rates(Config::Untraced);
    let base_med = Summary::of(&base).median;
    let total_us = |x: &Run| (x.load.cpu_secs + x.tracer_cpu) / x.load.accepted.max(1) as f64 * 1e6;
    let base_us = Summary::of(&runs[&Config::Untraced].iter().map(total_us).collect::<Vec<_>>()).median;
    let mut t = Table::new(&[
        "config",
        "conn/s",
        "× untraced (conn/s medians)",
        "× untraced (conn/s paired by rep)",
        "load gen µs/conn",
        "tracer µs/conn",
        "total µs/conn",
        "× untraced (CPU/conn)",
        "load gen cores busy",
        "other load (cores)",
        "no event lost",
    ]);
    for &c in configs {
        let v = &runs[&c];
        let r = rates(c);
        let no_tracer = matches!(c, Config::Untraced | Config::Floor | Config::FloorOff);
        let paired: Vec<f64> = r.iter().zip(&base).map(|(a, b)| a / b).collect();
        let per = |f: &dyn Fn(&Run) -> f64| Summary::of(&v.iter().map(f).collect::<Vec<_>>());
        let gen_us = per(&|x| x.load.cpu_secs / x.load.accepted.max(1) as f64 * 1e6);
        let tr_us = per(&|x| x.tracer_cpu / x.load.accepted.max(1) as f64 * 1e6);
        let tot_us = per(&total_us);
        t.row(vec![
            c.name().to_owned(),
            Summary::of(&r).show(0),
            if c == Config::Untraced { "1".into() } else { format!("{:.3}", Summary::of(&r).median / base_med) },
            if c == Config::Untraced { "1".into() } else { Summary::of(&paired).show(3) },
            gen_us.show(1),
            if no_tracer { "-".into() } else { tr_us.show(1) },
            tot_us.show(1),
            if c == Config::Untraced { "1".into() } else { format!("{:.3}", base_us / tot_us.median) },
            per(&|x| x.load.cpu_secs / x.load.secs).show(2),
            per(&|x| x.load.noise).show(2),
            if no_tracer { "-".into() } else { format!("{}/{}", v.iter().filter(|x| x.exact).count(), v.len()) },
        ]);
    }
    t
}

fn one(ctx: &Ctx, ns: &NetNs, c: Config, floors: &FloorPoints) -> anyhow::Result<Run> {
    let foreign_bpf = foreign_bpf_programs();
    one_run(ctx, ns, c, floors).map(|r| Run { foreign_bpf, ..r })
}

fn one_run(ctx: &Ctx, ns: &NetNs, c: Config, floors: &FloorPoints) -> anyhow::Result<Run> {
    let s = Storm::max(ctx.secs);
    match c {
        Config::Floor | Config::FloorOff => {
            let floor = Floor::attach(floors.get(c == Config::FloorOff), &socktrace_tests::cgroup2_root()?)?;
            let load = storm(ctx, ns, &s, || {})?;
            drop(floor);
            Ok(Run { load, tracer_cpu: 0.0, check: String::new(), exact: true, foreign_bpf: 0 })
        }
        Config::Untraced => {
            let load = storm(ctx, ns, &s, || {})?;
            Ok(Run { load, tracer_cpu: 0.0, check: String::new(), exact: true, foreign_bpf: 0 })
        }
        Config::Serve | Config::ServeOff => {
            let off = c == Config::ServeOff;
            let t = Tracer::serve(ctx, ns, if off { &["--accept-hooks", "off"] } else { &[] })?;
            let c0 = t.cpu_secs();
            let load = storm(ctx, ns, &s, || {
                let _ = t.scrape();
            })?;
            let tracer_cpu = t.cpu_secs() - c0;
            let text = t.scrape()?;
            let inode = netns_inode(ns).to_string();
            let counted = metric_sum(&text, "socktrace_accepts_total", &[("netns", &inode)]) as u64;
            let lost = metric_sum(&text, "socktrace_events_lost_total", &[]) as u64;
            t.stop()?;
            let exact = counted == load.accepted;
            Ok(Run { check: format!("accepts_total {counted} vs {} accepted, {lost} events lost", load.accepted), exact, load, tracer_cpu, foreign_bpf: 0 })
        }
        Config::Watch => {
            let t = Tracer::watch(ctx, ns, &[], &Stdout::Null)?;
            let c0 = t.cpu_secs();
            let load = storm(ctx, ns, &s, || {})?;
            // Let the reader finish the tail of the ring buffer before reading its CPU time.
            std::thread::sleep(std::time::Duration::from_millis(300));
            let tracer_cpu = t.cpu_secs() - c0;
            let (shown, lost) = exit_summary(&t.stop()?).context("no exit summary from watch")?;
            // A few retransmit events may come with the accepts: shown ≥ accepted.
            let exact = shown >= load.accepted && lost == 0;
            Ok(Run { check: format!("{shown} events shown, {lost} lost, {} accepted", load.accepted), exact, load, tracer_cpu, foreign_bpf: 0 })
        }
    }
}

/// `BPF_ENABLE_STATS` (`BPF_STATS_RUN_TIME`): enabled while the returned fd is open.
fn enable_bpf_stats() -> anyhow::Result<fs::File> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let attr = [0u32; 2]; // enable_stats.type = BPF_STATS_RUN_TIME (0)
    // SAFETY: bpf(2) with a zeroed attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        anyhow::bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { fs::File::from_raw_fd(i32::try_from(fd)?) })
}

/// (`prog_id`, `run_time_ns`, `run_cnt`) of every BPF program fd a process holds.
fn prog_stats(pid: u32) -> BTreeMap<u64, (u64, u64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return out };
    for e in dir.flatten() {
        let Ok(info) = fs::read_to_string(e.path()) else { continue };
        let field = |k: &str| info.lines().find_map(|l| l.strip_prefix(k)?.trim().parse::<u64>().ok());
        if let (Some(id), Some(ns), Some(cnt)) = (field("prog_id:"), field("run_time_ns:"), field("run_cnt:")) {
            out.insert(id, (ns, cnt));
        }
    }
    out
}

fn prog_names() -> BTreeMap<u64, String> {
    let Ok(out) = Command::new("bpftool").args(["prog", "show", "--json"]).output() else { return BTreeMap::new() };
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .map(|a| a.iter().filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_owned()))).collect())
        .unwrap_or_default()
}

/// One traced run at full rate with BPF run-time statistics: per program name (runs, run ns),
/// connections accepted and their rate.
struct StatsRun {
    progs: BTreeMap<String, (u64, u64)>,
    conns: f64,
    rate: f64,
}

fn stats_run(ctx: &Ctx, ns: &NetNs, c: Config) -> anyhow::Result<StatsRun> {
    let stats_fd = enable_bpf_stats()?;
    let t = match c {
        Config::Serve => Tracer::serve(ctx, ns, &[])?,
        Config::ServeOff => Tracer::serve(ctx, ns, &["--accept-hooks", "off"])?,
        Config::Untraced | Config::Watch | Config::Floor | Config::FloorOff => Tracer::watch(ctx, ns, &[], &Stdout::Null)?,
    };
    let before = prog_stats(t.pid);
    let load = storm(ctx, ns, &Storm::max(ctx.secs.min(3.0)), || {
        if matches!(c, Config::Serve | Config::ServeOff) {
            let _ = t.scrape();
        }
    })?;
    let after = prog_stats(t.pid);
    let names = prog_names();
    t.stop()?;
    drop(stats_fd);
    anyhow::ensure!(!after.is_empty(), "no BPF program fds found in /proc/PID/fdinfo");
    let mut progs = BTreeMap::new();
    for (id, (ns1, c1)) in &after {
        let (ns0, c0) = before.get(id).copied().unwrap_or((0, 0));
        let (dns, dc) = (ns1 - ns0, c1 - c0);
        if dc == 0 {
            continue;
        }
        let e: &mut (u64, u64) = progs.entry(names.get(id).cloned().unwrap_or_else(|| format!("id {id}"))).or_default();
        e.0 += dc;
        e.1 += dns;
    }
    Ok(StatsRun { progs, conns: load.accepted.max(1) as f64, rate: load.rate })
}

/// Per program: runs per connection and ns per run under `serve` (accept events muted in the
/// kernel), `serve --accept-hooks off` and `watch --json` (every accept sent).
fn kernel_cost(ctx: &Ctx, ns: &NetNs) -> anyhow::Result<Table> {
    println!("  kernel cost: one traced run each (serve, serve --accept-hooks off, watch) with BPF run-time statistics");
    let configs = [Config::Serve, Config::ServeOff, Config::Watch];
    let runs = configs.iter().map(|c| stats_run(ctx, ns, *c)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut head = vec!["program".to_owned()];
    for c in configs {
        head.extend([format!("{} runs/conn", c.name()), format!("{} ns/run", c.name()), format!("{} ns/conn", c.name())]);
    }
    let mut tab = Table::new(&head.iter().map(String::as_str).collect::<Vec<_>>());
    let per_conn = |r: &StatsRun, name: &str| r.progs.get(name).map_or(0.0, |(_, ns)| *ns as f64 / r.conns);
    let mut names: Vec<&String> = runs.iter().flat_map(|r| r.progs.keys()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let worst = |name: &str| runs.iter().map(|r| per_conn(r, name)).fold(0.0, f64::max);
    names.sort_by(|a, b| worst(b).total_cmp(&worst(a)));
    let cells = |r: &StatsRun, name: &str| match r.progs.get(name) {
        Some((n, ns)) => [format!("{:.2}", *n as f64 / r.conns), format!("{:.0}", *ns as f64 / *n as f64), format!("{:.0}", *ns as f64 / r.conns)],
        None => ["-".into(), "-".into(), "-".into()],
    };
    for name in names {
        let mut row = vec![name.clone()];
        for r in &runs {
            row.extend(cells(r, name));
        }
        tab.row(row);
    }
    let total = |r: &StatsRun| format!("{:.0}", r.progs.values().map(|(_, ns)| *ns).sum::<u64>() as f64 / r.conns);
    let what: Vec<String> = configs.iter().zip(&runs).map(|(c, r)| format!("{}: {:.0} connections at {:.0}/s", c.name(), r.conns, r.rate)).collect();
    let mut row = vec![format!("all ({})", what.join("; "))];
    for r in &runs {
        row.extend([String::new(), String::new(), total(r)]);
    }
    tab.row(row);
    Ok(tab)
}
