//! `socktrace watch`: the event stream, as a table or NDJSON, until Ctrl-C/SIGTERM or `--duration`.
//!
//! Events lost in the ring buffer are counted in the kernel (`STATS[LOST]`); `watch` reports new
//! losses as `{"kind":"lost",…}` records (JSON) or a stderr line (table), and always on exit,
//! with what each bounded kernel map held and lost to eviction.

use std::{
    io::{BufWriter, Write},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use socktrace_common::stat;
use tokio::signal::unix::SignalKind;

use crate::{
    event::{self, Record},
    filter::Filter,
    foreign::Census,
    pressure::Pressure,
    probes::Tracer,
    ring::{Stats, ring},
    system,
};

pub async fn run(mut tracer: Tracer, filter: Filter, json: bool, duration: Option<Duration>) -> anyhow::Result<()> {
    let stats = Stats::new(&mut tracer)?;
    let mut ring = ring(&mut tracer)?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let stop = async move {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The kernel side wakes this reader at most once per millisecond per CPU (maps.rs, `emit`):
    // events written after a wakeup wait for the next one, or for this periodic drain.
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start_ns = system::monotonic_ns();
    let mut out = BufWriter::new(std::io::stdout().lock());
    if !json {
        writeln!(out, "{:>12} {:<17} {:>10} {:>7} {:<15} {:<24} {:<24} {:>9} {:>12}", "TIME(s)", "KIND", "NETNS", "PID", "COMM", "LOCAL", "REMOTE", "QUEUE", "WAIT")?;
        out.flush()?;
    }
    eprintln!("{}", tracer.summary());
    let mut seen: u64 = 0;
    let mut reported_lost: u64 = 0;
    // Other tracers coming and going (see `foreign`): said at the end.
    let mut census = Census::new(tracer.program_ids());
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                seen += write_all(guard.get_inner_mut(), &mut out, &filter, json, start_ns)?;
                guard.clear_ready();
                out.flush()?;
            }
            _ = drain.tick() => {
                let n = write_all(ring.get_mut(), &mut out, &filter, json, start_ns)?;
                if n > 0 {
                    seen += n;
                    out.flush()?;
                }
            }
            _ = tick.tick() => {
                reported_lost = report_lost(&mut out, &stats, reported_lost, json, false)?;
                census.sample();
            }
            () = &mut stop => break,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    // Drain what is already in the buffer, then the final loss report.
    seen += write_all(ring.get_mut(), &mut out, &filter, json, start_ns)?;
    report_lost(&mut out, &stats, reported_lost, json, true)?;
    out.flush()?;
    // Only when it happened: a SYN whose free was not traced was checked at the next SYN instead.
    let late = stats.get(stat::SYN_SETTLED_LATE);
    let late = if late > 0 { format!(", {late} SYN-drop checks settled late (may include other drops)") } else { String::new() };
    // Runs the kernel skipped never produced an event: said, never silent.
    let missed = match tracer.runs_missed() {
        Some(n) => format!(", {n} program runs missed (another BPF program was running on that CPU)"),
        None => ", program runs missed: unknown (the kernel does not count them)".to_owned(),
    };
    census.sample();
    let missed = match census.changes {
        0 => missed,
        n => format!("{missed}, {n} other BPF programs loaded or unloaded meanwhile"),
    };
    eprintln!(
        "socktrace: {seen} events shown, {} lost in the ring buffer, {} kernel read errors, {} retransmits not sent (err, skipped){late}{missed}",
        stats.get(stat::LOST),
        stats.get(stat::READ_ERRORS),
        stats.get(stat::RETRANSMIT_UNSENT)
    );
    // Bounded maps: what each held at the end and what it lost to eviction (pressure.rs).
    let mut pressure = Pressure::default();
    pressure.measure(&tracer.ebpf, &stats, &tracer.maps, &[]);
    eprintln!(
        "socktrace: maps (entries/capacity): {}; {} accepts without a known queue wait (queued before tracing started, or evicted){}",
        pressure.summary(),
        stats.get(stat::ACCEPT_NO_WAIT),
        if pressure.total_evicted() > 0 { "; MAP EVICTIONS: counts may be incomplete, see the --map-* options" } else { "" }
    );
    Ok(())
}

/// Longest time an event can wait in the ring buffer for lack of a wakeup.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// Writes every event the ring buffer holds; returns how many passed the filter.
fn write_all(rb: &mut RingBuf<MapData>, out: &mut impl Write, filter: &Filter, json: bool, start_ns: u64) -> anyhow::Result<u64> {
    let mut n = 0;
    while let Some(item) = rb.next() {
        let rec = Record::from_event(&event::parse(&item)?);
        if filter.matches_event(&rec) {
            n += 1;
            write_record(out, &rec, json, start_ns)?;
        }
    }
    Ok(n)
}

fn report_lost(out: &mut impl Write, stats: &Stats, reported: u64, json: bool, last: bool) -> anyhow::Result<u64> {
    let lost = stats.get(stat::LOST);
    if lost > reported || (last && json) {
        if json {
            let rec = serde_json::json!({
                "kind": "lost",
                "ts_ns": system::monotonic_ns(),
                "count": lost - reported,
                "total": lost,
            });
            writeln!(out, "{rec}")?;
        } else if lost > reported {
            eprintln!("socktrace: {} events lost (ring buffer full; total {lost})", lost - reported);
        }
    }
    Ok(lost)
}

pub fn write_record(out: &mut impl Write, r: &Record, json: bool, start_ns: u64) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, r)?;
        writeln!(out)?;
        return Ok(());
    }
    let t = r.ts_ns.saturating_sub(start_ns) as f64 / 1e9;
    let ep = |a: Option<std::net::IpAddr>, p: u16| match a {
        Some(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{p}"),
        Some(v4) => format!("{v4}:{p}"),
        None => format!("?:{p}"),
    };
    let queue = match (r.queue_len, r.queue_max) {
        (Some(l), Some(m)) => format!("{l}/{m}"),
        _ => "-".into(),
    };
    let wait = r.accept_wait_ns.map_or_else(|| "-".into(), |w| format!("{:.3}ms", w as f64 / 1e6));
    writeln!(
        out,
        "{t:>12.6} {:<17} {:>10} {:>7} {:<15} {:<24} {:<24} {queue:>9} {wait:>12}",
        r.kind,
        r.netns,
        r.pid.map_or_else(|| "-".into(), |p| p.to_string()),
        r.comm.as_deref().unwrap_or("-"),
        ep(r.laddr, r.lport),
        ep(r.raddr, r.rport),
    )?;
    Ok(())
}
