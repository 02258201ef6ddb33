//! Agent cost: CPU (% of one core, from utime+stime in /proc/PID/stat over the run) and memory
//! (`VmRSS` at the end, `VmHWM`: peak) of `socktrace serve` (scraped every second by the bench) and of
//! `socktrace top --json` (one interval per second) and of `socktrace watch --json > /dev/null`, idle
//! and at about 1k, 5k and 20k accepts/s (rate-limited storm) and as fast as the storm goes,
//! alternating; then `serve` with 1k listeners and 100k sockets in the netns.
//!
//! CPU here is the agent process only. The eBPF programs run in the context of the traced
//! syscalls and softirqs and are charged to the load (see the accept benchmark).

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use super::{Ctx, Hold, NetNs, Section, Storm, Stdout, Summary, Table, Tracer, loadavg, metric_sum, netns_inode, provenance, storm};

/// Accepts per second; 0 idle, `u64::MAX` as fast as possible.
const RATES: [u64; 5] = [0, 1_000, 5_000, 20_000, u64::MAX];
const REPS: usize = 2;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Agent {
    Serve,
    Top,
    Watch,
}

const AGENTS: [Agent; 3] = [Agent::Serve, Agent::Top, Agent::Watch];

impl Agent {
    fn name(self) -> &'static str {
        match self {
            Agent::Serve => "serve (scraped every 1 s)",
            Agent::Top => "top --json (1 s interval)",
            Agent::Watch => "watch --json >/dev/null",
        }
    }
}

struct Run {
    events_per_s: f64,
    cpu_pct: f64,
    rss_kib: u64,
    hwm_kib: u64,
}

pub fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    let secs = (ctx.secs * 1.6).max(2.0);
    println!("\n== agent: CPU and memory of serve and watch, {secs} s per run, {REPS} repetitions, alternating ==");
    let ns = NetNs::new("agent")?;
    let load_before = loadavg();
    let mark = ctx.noise.mark();
    let mut t = Table::new(&["agent", "target events/s", "achieved events/s", "CPU % of a core", "VmRSS MiB (end)", "VmHWM MiB (peak)"]);
    for rate in RATES {
        let mut runs: Vec<(Agent, Run)> = Vec::new();
        for rep in 0..REPS {
            let mut order = AGENTS;
            order.rotate_left(rep % AGENTS.len());
            for a in order {
                let r = one(ctx, &ns, a, rate, secs)?;
                println!(
                    "  {:<26} target {:>6}/s: {:>7.0} events/s, CPU {:>5.2} %, RSS {:.1} MiB, HWM {:.1} MiB",
                    a.name(),
                    rate,
                    r.events_per_s,
                    r.cpu_pct,
                    r.rss_kib as f64 / 1024.0,
                    r.hwm_kib as f64 / 1024.0
                );
                runs.push((a, r));
            }
        }
        for a in AGENTS {
            let v: Vec<&Run> = runs.iter().filter(|(x, _)| *x == a).map(|(_, r)| r).collect();
            let s = |f: &dyn Fn(&Run) -> f64| Summary::of(&v.iter().map(|r| f(r)).collect::<Vec<_>>());
            t.row(vec![
                a.name().into(),
                match rate {
                    0 => "idle".into(),
                    u64::MAX => "max".into(),
                    r => r.to_string(),
                },
                s(&|r| r.events_per_s).show(0),
                s(&|r| r.cpu_pct).show(2),
                s(&|r| r.rss_kib as f64 / 1024.0).show(1),
                s(&|r| r.hwm_kib as f64 / 1024.0).show(1),
            ]);
        }
    }
    let big = many_sockets(ctx, &ns, secs);
    println!("\n{}", t.text());
    let mut md = String::from("## Agent cost\n\n");
    let bin = ctx.socktrace.display();
    let commit = std::process::Command::new(&ctx.socktrace)
        .arg("--version")
        .output()
        .map_or_else(|_| "unknown".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    md.push_str(&provenance(ctx, &load_before, mark));
    let _ = write!(
        md,
        "\nEach run: start the agent (`--netns <ns>`, default hooks and ring), then {secs} s of a rate-limited accept \
         storm (`st-bench storm --rate R`: one accept per connection; idle: no traffic; max: as fast as the \
         storm goes next to the agent); CPU % = \
         Δ(utime+stime) of the agent over the run / wall time (1 tick = 10 ms: ±0.1 % at this length), memory from \
         /proc/PID/status at the end of the run. `serve` is scraped (GET /metrics) every second by the bench; \
         `top --json --interval 1s` writes to /dev/null. {REPS} repetitions per cell, the agents alternating \
         (order rotated each repetition). Binary: `{bin}` (commit: `{commit}`). Targets: ≤ 2 % CPU at 10k events/s, RSS ≤ 30 MiB.\n\n"
    );
    md.push_str(&t.markdown());
    md.push_str("\n### `serve` with 1k listeners and 100k sockets\n\n");
    match big {
        Ok(b) => {
            println!("\n{}", b.text());
            md.push_str(
                "`serve --netns <ns>` is started first, then six `st-bench hold` processes (the fd limit here is 20000 per \
                 process and cannot be raised without CAP_SYS_RESOURCE) open 1000 listeners and ~50k connections, all \
                 accepted (one accept event each); then the same measurement with nothing happening but the scrape every \
                 second. Each scrape closes an interval: the LISTENERS map is read and the netns's LISTEN sockets are \
                 sampled over sock_diag (socktrace/src/listeners.rs; socket owners from a /proc/*/fd scan, which walks \
                 the ~100k fds of the holders, redone only for new or moved listeners or every 30 s).\n\n",
            );
            md.push_str(&b.markdown());
        }
        Err(e) => {
            println!("  1k listeners / 100k sockets: failed: {e:#}");
            let _ = writeln!(md, "Not measured: {e:#}");
        }
    }
    Ok(Section { name: "agent", markdown: md })
}

fn start(ctx: &Ctx, ns: &NetNs, a: Agent) -> anyhow::Result<Tracer> {
    match a {
        Agent::Serve => Tracer::serve(ctx, ns, &[]),
        Agent::Top => Tracer::top(ctx, ns),
        Agent::Watch => Tracer::watch(ctx, ns, &[], &Stdout::Null),
    }
}

fn one(ctx: &Ctx, ns: &NetNs, a: Agent, rate: u64, secs: f64) -> anyhow::Result<Run> {
    let t = start(ctx, ns, a)?;
    let scrape = || {
        if a == Agent::Serve {
            let _ = t.scrape();
        }
    };
    let c0 = t.cpu_secs();
    let began = Instant::now();
    // Connections (= accept events) per second while the clients ran.
    let events_per_s = if rate == 0 {
        idle(secs, scrape);
        0.0
    } else if rate == u64::MAX {
        storm(ctx, ns, &Storm::max(secs), scrape)?.rate
    } else {
        storm(ctx, ns, &Storm::rate(secs, rate), scrape)?.rate
    };
    let wall = began.elapsed().as_secs_f64();
    let cpu = t.cpu_secs() - c0;
    let (rss, hwm) = t.mem_kib();
    t.stop()?;
    Ok(Run { events_per_s, cpu_pct: cpu / wall * 100.0, rss_kib: rss, hwm_kib: hwm })
}

fn idle(secs: f64, mut tick: impl FnMut()) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(1).min(end.saturating_duration_since(Instant::now())));
        if Instant::now() < end {
            tick();
        }
    }
}

const HOLDERS: usize = 6;
const LISTENERS: usize = 1000;
const CONNS: usize = 50_000;

fn many_sockets(ctx: &Ctx, ns: &NetNs, secs: f64) -> anyhow::Result<Table> {
    println!("  serve with {LISTENERS} listeners and {} sockets", LISTENERS + 2 * CONNS);
    let t = Tracer::serve(ctx, ns, &[])?;
    let setup = Instant::now();
    let mut holds = Vec::new();
    let mut sockets = 0;
    for i in 0..HOLDERS {
        let (l0, l1) = (i * LISTENERS / HOLDERS, (i + 1) * LISTENERS / HOLDERS);
        let conns = CONNS / HOLDERS;
        let h = Hold::start(ctx, ns, 30000 + u16::try_from(l0)?, l1 - l0, conns)?;
        sockets += h.sockets;
        holds.push(h);
    }
    let setup_secs = setup.elapsed().as_secs_f64();
    // Two scrapes so the model has taken in every listener, then the measured quiet period.
    t.scrape()?;
    std::thread::sleep(Duration::from_secs(1));
    t.scrape()?;
    let c0 = t.cpu_secs();
    let began = Instant::now();
    let mut scrape_ms = Vec::new();
    let mut size = 0;
    let mut text = String::new();
    idle(secs, || {
        let s = Instant::now();
        if let Ok(body) = t.scrape() {
            scrape_ms.push(s.elapsed().as_secs_f64() * 1e3);
            size = body.len();
            text = body;
        }
    });
    let wall = began.elapsed().as_secs_f64();
    let cpu = t.cpu_secs() - c0;
    let (rss, hwm) = t.mem_kib();
    drop(holds);
    t.stop()?;
    let inode = netns_inode(ns).to_string();
    let series = text.lines().filter(|l| l.starts_with("socktrace_accepts_total{") && l.contains(&format!("netns=\"{inode}\""))).count();
    let accepts = metric_sum(&text, "socktrace_accepts_total", &[("netns", &inode)]);
    let mut tab = Table::new(&["sockets in netns", "listeners exported", "accepts_total", "setup (s)", "CPU % of a core", "scrape ms", "/metrics bytes", "VmRSS MiB", "VmHWM MiB"]);
    tab.row(vec![
        sockets.to_string(),
        series.to_string(),
        format!("{accepts:.0}"),
        format!("{setup_secs:.1}"),
        format!("{:.2}", cpu / wall * 100.0),
        Summary::of(&scrape_ms).show(1),
        size.to_string(),
        format!("{:.1}", rss as f64 / 1024.0),
        format!("{:.1}", hwm as f64 / 1024.0),
    ]);
    Ok(tab)
}
