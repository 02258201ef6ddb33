//! Event pipeline: how many events/s the agent consumes without loss, and what a loss costs.
//!
//! 1. Drain rate: `watch --json` is stopped (SIGSTOP) while an accept storm fills a 64 MiB ring
//!    buffer, then resumed; the bench reads its stdout and times how long printing every event
//!    takes. That is the consumer's ceiling with a core of its own — the load generator of this
//!    2-core machine cannot produce that many events/s while the consumer also runs. The same with
//!    the default 4 MiB ring checks the loss accounting (shown + lost = accepted).
//! 2. Sustained: storms at fixed rates with `watch --json > /dev/null` attached and small to
//!    default ring buffers (`--ring-buffer-kib`): where loss starts.
//! 3. `serve` when events are lost: in-kernel aggregation (LISTENERS map, and the WAITS wait
//!    histograms) keeps its counters and its accept-wait histogram exact.

use std::{
    fmt::Write as _,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{Ctx, NetNs, Section, Storm, Stdout, Summary, Table, Tracer, exit_summary, loadavg, metric_sum, netns_inode, provenance, storm};

const RINGS_KIB: [u32; 5] = [4, 16, 64, 256, 4096];
const RATES: [u64; 4] = [5_000, 10_000, 20_000, 0];
/// Bytes of one event in the ring buffer (120-byte `Event` + 8-byte record header).
const RECORD_BYTES: u32 = 128;

pub fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    println!("\n== pipeline: drain rate, loss vs ring buffer size and rate, serve counters under loss ==");
    let ns = NetNs::new("pipe")?;
    let load_before = loadavg();
    let mark = ctx.noise.mark();
    let storm_secs = 3.0;

    // 1. Drain rate.
    let mut drain = Table::new(&["ring", "accept events queued while stopped", "drain time (s)", "events/s", "watch CPU during drain (s)", "accepts printed + lost"]);
    let mut rates = Vec::new();
    for rep in 0..3 {
        let d = drain_once(ctx, &ns, 65536, storm_secs)?;
        println!("  drain rep {}: {} events in {:.3} s = {:.0}/s, cpu {:.2} s, {}", rep + 1, d.accepted, d.secs, d.rate, d.cpu, d.check);
        rates.push(d.rate);
        drain.row(vec!["64 MiB".into(), d.accepted.to_string(), format!("{:.3}", d.secs), format!("{:.0}", d.rate), format!("{:.2}", d.cpu), d.check]);
    }
    let d = drain_once(ctx, &ns, 4096, storm_secs)?;
    println!("  drain with the default 4 MiB ring: {} accepted, {}", d.accepted, d.check);
    drain.row(vec!["4 MiB (default)".into(), d.accepted.to_string(), format!("{:.3}", d.secs), format!("{:.0}", d.rate), format!("{:.2}", d.cpu), d.check]);
    let drain_rate = Summary::of(&rates);

    // 2. Sustained rate × ring size.
    let mut head = vec!["ring (events)".to_owned()];
    head.extend(RATES.iter().map(|&r| if r == 0 { "max rate".to_owned() } else { format!("{r}/s") }));
    let mut sweep = Table { head, rows: Vec::new() };
    let mut loss_starts = Vec::new();
    for kib in RINGS_KIB {
        let mut row = vec![format!("{kib} KiB ({})", kib * 1024 / RECORD_BYTES)];
        let mut first_loss = None;
        for rate in RATES {
            let ring = kib.to_string();
            let t = Tracer::watch(ctx, &ns, &["--ring-buffer-kib", &ring], &Stdout::Count)?;
            let count = t.count.clone().context("no stream counter")?;
            let load = storm(ctx, &ns, &Storm::rate(storm_secs, rate), || {})?;
            std::thread::sleep(Duration::from_millis(200));
            let (_, lost) = exit_summary(&t.stop()?).context("no exit summary from watch")?;
            let printed = count.accepts.load(Ordering::Relaxed);
            // `lost` counts every kind (a few retransmits happen too): printed + lost ≥ accepted.
            let ok = if printed <= load.accepted && printed + lost >= load.accepted { "" } else { " (accounting mismatch!)" };
            let cell = if lost == 0 && printed == load.accepted {
                format!("{:.0}/s: 0 lost", load.rate)
            } else {
                format!("{:.0}/s: {lost} lost ({:.1} %){ok}", load.rate, lost as f64 / load.accepted.max(1) as f64 * 100.0)
            };
            println!("  ring {kib:>4} KiB, rate {:>6}: {cell}", if rate == 0 { "max".into() } else { rate.to_string() });
            if lost > 0 && first_loss.is_none() {
                first_loss = Some(load.rate);
            }
            row.push(cell);
        }
        loss_starts.push((kib, first_loss));
        sweep.rows.push(row);
    }

    // 3. serve under loss.
    let mut exact = Table::new(&["serve", "conn/s", "accepted", "socktrace_accepts_total", "events lost", "accept-wait samples"]);
    for (label, ring, stopped) in [("ring 4 KiB", 4u32, false), ("ring 4 KiB, SIGSTOPped during the storm", 4, true), ("default ring (4 MiB)", 4096, false)] {
        let r = serve_once(ctx, &ns, ring, stopped, storm_secs)?;
        println!("  serve {label}: {:.0}/s, accepted {}, accepts_total {}, lost {}, wait samples {}", r.rate, r.accepted, r.counted, r.lost, r.waits);
        let tag = if r.counted == r.accepted { " (exact)" } else { " (≠ accepted!)" };
        exact.row(vec![label.into(), format!("{:.0}", r.rate), r.accepted.to_string(), format!("{}{tag}", r.counted), r.lost.to_string(), r.waits.to_string()]);
    }

    println!("\n{}\n\n{}\n\n{}", drain.text(), sweep.text(), exact.text());
    let mut md = String::from("## Event pipeline\n\n");
    md.push_str(&provenance(ctx, &load_before, mark));
    let _ = write!(
        md,
        "\n### Drain rate of `watch --json`\n\n`watch --json --netns <ns> --ring-buffer-kib 65536` is stopped with SIGSTOP, an accept storm \
         ({storm_secs} s, as fast as possible) queues its events in the ring buffer, then SIGCONT; the bench reads \
         watch's stdout (a pipe) and times until every accept event is printed. Events/s is the consumer's \
         ceiling (decode + filter + JSON + write) with a core to itself: **median {:.0} events/s [{:.0}–{:.0}]**. \
         The last row does the same with the default 4 MiB ring, which holds {} events: the rest are lost \
         and counted.\n\n",
        drain_rate.median, drain_rate.min, drain_rate.max, 4096 * 1024 / RECORD_BYTES
    );
    md.push_str(&drain.markdown());
    md.push_str(
        "\n### Sustained rate vs ring buffer size (`watch --json`)\n\nEach cell: achieved accept rate (events/s), \
         events lost (watch's exit summary, `N events shown, M lost`) and their share of the connections accepted; the \
         bench reads watch's stdout and checks that every accept was printed or counted lost. One run per cell, 3 s. \
         \"max rate\" is whatever the load generator reaches next to the tracer on this machine.\n\n",
    );
    md.push_str(&sweep.markdown());
    md.push_str("\nLoss starts at: ");
    md.push_str(
        &loss_starts
            .iter()
            .map(|(kib, r)| match r {
                Some(r) => format!("{kib} KiB: {r:.0}/s"),
                None => format!("{kib} KiB: no loss up to the max rate"),
            })
            .collect::<Vec<_>>()
            .join("; "),
    );
    md.push_str(
        ".\n\n### `serve` counters when events are lost\n\n`serve` mutes every event kind but listen in the kernel, and \
         its counters and wait histograms come from the in-kernel per-listener aggregates (LISTENERS and WAITS maps), \
         not from events: they do not depend on the event rate. Storm as fast as possible, `serve --netns <ns> --ring-buffer-kib N` scraped every \
         second; `socktrace_accepts_total` of the netns vs the connections the server accepted, \
         `socktrace_events_lost_total`, and the accept-wait histogram's sample count (from the kernel's wait \
         histograms; it was built from accept events before 2026-12-03).\n\n",
    );
    md.push_str(&exact.markdown());
    Ok(Section { name: "pipeline", markdown: md })
}

struct Drain {
    accepted: u64,
    secs: f64,
    rate: f64,
    cpu: f64,
    check: String,
}

fn drain_once(ctx: &Ctx, ns: &NetNs, ring_kib: u32, storm_secs: f64) -> anyhow::Result<Drain> {
    let ring = ring_kib.to_string();
    let t = Tracer::watch(ctx, ns, &["--ring-buffer-kib", &ring], &Stdout::Count)?;
    let count = t.count.clone().context("no stream counter")?;
    t.signal(libc::SIGSTOP);
    let load = storm(ctx, ns, &Storm::max(storm_secs), || {})?;
    let c0 = t.cpu_secs();
    let start = Instant::now();
    t.signal(libc::SIGCONT);
    // Until every accept is printed, or nothing moved for 2 s (events were lost).
    let (mut last, mut last_change) = (0, Instant::now());
    let done = loop {
        let n = count.accepts.load(Ordering::Relaxed);
        if n >= load.accepted {
            break Instant::now();
        }
        if n != last {
            (last, last_change) = (n, Instant::now());
        } else if last_change.elapsed() > Duration::from_secs(2) {
            break last_change;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let secs = done.duration_since(start).as_secs_f64();
    let cpu = t.cpu_secs() - c0;
    let (_, dropped) = exit_summary(&t.stop()?).context("no exit summary from watch")?;
    let printed = count.accepts.load(Ordering::Relaxed);
    // `lost` counts every kind (the storm's listen events too): accepts printed + lost ≥ accepted.
    let ok = printed <= load.accepted && printed + dropped >= load.accepted;
    let check = format!("{printed} printed + {dropped} lost{}", if ok { "" } else { " (accounting mismatch!)" });
    Ok(Drain { accepted: load.accepted, secs, rate: printed as f64 / secs, cpu, check })
}

struct ServeRun {
    rate: f64,
    accepted: u64,
    counted: u64,
    lost: u64,
    waits: u64,
}

fn serve_once(ctx: &Ctx, ns: &NetNs, ring_kib: u32, stopped: bool, storm_secs: f64) -> anyhow::Result<ServeRun> {
    let ring = ring_kib.to_string();
    let t = Tracer::serve(ctx, ns, &["--ring-buffer-kib", &ring])?;
    if stopped {
        t.signal(libc::SIGSTOP);
    }
    let load = storm(ctx, ns, &Storm::max(storm_secs), || {
        if !stopped {
            let _ = t.scrape();
        }
    })?;
    if stopped {
        t.signal(libc::SIGCONT);
    }
    std::thread::sleep(Duration::from_millis(300));
    let text = t.scrape()?;
    t.stop()?;
    let inode = netns_inode(ns).to_string();
    Ok(ServeRun {
        rate: load.rate,
        accepted: load.accepted,
        counted: metric_sum(&text, "socktrace_accepts_total", &[("netns", &inode)]) as u64,
        lost: metric_sum(&text, "socktrace_events_lost_total", &[]) as u64,
        waits: metric_sum(&text, "socktrace_accept_wait_seconds_count", &[("netns", &inode)]) as u64,
    })
}
