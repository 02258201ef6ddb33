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

use super::{
    Ctx, NetNs, Section, Storm, StormResult, Stdout, Summary, Table, Tracer, exit_summary, foreign_bpf_programs, loadavg, metric_sum, netns_inode,
    provenance, storm,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    Untraced,
    Serve,
    /// `serve --accept-hooks off`: no syscall tracepoint, no enqueue hook, accepts unavailable.
    ServeOff,
    Watch,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::Serve => "serve",
            Config::ServeOff => "serve --accept-hooks off",
            Config::Watch => "watch --json >/dev/null",
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
    let configs = [Config::Untraced, Config::Serve, Config::ServeOff, Config::Watch];
    let mut runs: BTreeMap<Config, Vec<Run>> = BTreeMap::new();
    for rep in 0..ctx.reps {
        for k in 0..configs.len() {
            // Rotate the order so no configuration always runs first (or after the same one).
            let c = configs[(rep + k) % configs.len()];
            let r = one(ctx, &ns, c)?;
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
    let kernel = kernel_cost(ctx, &ns, &[]);
    let kernel_off = kernel_cost(ctx, &ns, &["--accept-hooks", "off"]);
    let foreign_bpf = runs.values().flatten().map(|r| r.foreign_bpf).max().unwrap_or(0);

    let t = table(&configs, &runs);
    println!("\n{}", t.text());
    for k in [&kernel, &kernel_off].into_iter().flatten() {
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
         `--accept-hooks off` (no syscall tracepoint, no enqueue hook: accept counts, wait and acceptors \
         unavailable) and \
         `socktrace watch --json --netns <ns> > /dev/null`, started before the load (after their \
         \"tracing started\"/\"serving\" line), default hooks and ring buffer (4 MiB), the cgroup_skb \
         SYN-drop hook on the cgroup-v2 root. {} repetitions, order rotated each repetition.\n\n",
        s.listeners, s.servers, s.clients, ctx.secs, ctx.reps
    );
    md.push_str(&t.markdown());
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
         `socktrace_accepts_total` of the netns equal to it; with `--accept-hooks off`: the series absent, as \
         unavailable must be; `watch`: the exit summary shows at least as many events \
         and none lost). \
         CPU µs/conn: user+system time of the load generator (getrusage) and of the tracer \
         (/proc/PID/stat) over the run, per accepted connection; eBPF programs run in the context of \
         the load's syscalls and softirqs, so their cost is in the load generator's column.\n",
    );
    for (kernel, mode) in [(kernel, "default hooks"), (kernel_off, "`--accept-hooks off`")] {
        match kernel {
            Ok(k) => {
                let _ = write!(md, "\n### In-kernel cost per connection (BPF run-time statistics), {mode}\n\n");
                md.push_str(&k.markdown());
            }
            Err(e) => {
                let _ = writeln!(md, "\nIn-kernel cost, {mode}: not measured ({e:#}).");
            }
        }
    }
    md.push_str(
        "\nOne `watch --json` run per mode at full rate with `BPF_ENABLE_STATS` held by the bench \
         (`run_time_ns`/`run_cnt` from the program fds' fdinfo): time inside each program, \
         without the tracepoint dispatch around it (the syscall tracepoints' slow path, paid by every \
         syscall, is in the CPU per connection above and in the syscalls section).\n",
    );
    Ok(Section { name: "accept", markdown: md })
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
            if c == Config::Untraced { "-".into() } else { tr_us.show(1) },
            tot_us.show(1),
            if c == Config::Untraced { "1".into() } else { format!("{:.3}", base_us / tot_us.median) },
            per(&|x| x.load.cpu_secs / x.load.secs).show(2),
            per(&|x| x.load.noise).show(2),
            if c == Config::Untraced { "-".into() } else { format!("{}/{}", v.iter().filter(|x| x.exact).count(), v.len()) },
        ]);
    }
    t
}

fn one(ctx: &Ctx, ns: &NetNs, c: Config) -> anyhow::Result<Run> {
    let foreign_bpf = foreign_bpf_programs();
    one_run(ctx, ns, c).map(|r| Run { foreign_bpf, ..r })
}

fn one_run(ctx: &Ctx, ns: &NetNs, c: Config) -> anyhow::Result<Run> {
    let s = Storm::max(ctx.secs);
    match c {
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
            if off {
                let absent = !text.contains("socktrace_accepts_total{");
                let check = format!("accepts_total {} ({} accepted), {lost} events lost", if absent { "absent" } else { "PRESENT" }, load.accepted);
                return Ok(Run { check, exact: absent, load, tracer_cpu, foreign_bpf: 0 });
            }
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

fn kernel_cost(ctx: &Ctx, ns: &NetNs, extra: &[&str]) -> anyhow::Result<Table> {
    println!("  kernel cost: one traced run with BPF run-time statistics {}", extra.join(" "));
    let stats_fd = enable_bpf_stats()?;
    let t = Tracer::watch(ctx, ns, extra, &Stdout::Null)?;
    let before = prog_stats(t.pid);
    let load = storm(ctx, ns, &Storm::max(ctx.secs.min(3.0)), || {})?;
    let after = prog_stats(t.pid);
    let names = prog_names();
    t.stop()?;
    drop(stats_fd);
    anyhow::ensure!(!after.is_empty(), "no BPF program fds found in /proc/PID/fdinfo");
    let conns = load.accepted.max(1) as f64;
    let mut tab = Table::new(&["program", "runs/conn", "ns/run", "ns/conn"]);
    let (mut total_ns, mut rows) = (0u64, Vec::new());
    for (id, (ns1, c1)) in &after {
        let (ns0, c0) = before.get(id).copied().unwrap_or((0, 0));
        let (dns, dc) = (ns1 - ns0, c1 - c0);
        if dc == 0 {
            continue;
        }
        total_ns += dns;
        rows.push((dns, names.get(id).cloned().unwrap_or_else(|| format!("id {id}")), dc));
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    for (dns, name, dc) in rows {
        tab.row(vec![name, format!("{:.2}", dc as f64 / conns), format!("{:.0}", dns as f64 / dc as f64), format!("{:.0}", dns as f64 / conns)]);
    }
    tab.row(vec![format!("all ({} connections at {:.0}/s)", load.accepted, load.rate), String::new(), String::new(), format!("{:.0}", total_ns as f64 / conns)]);
    Ok(tab)
}
