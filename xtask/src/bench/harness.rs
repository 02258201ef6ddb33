//! The benchmarks' harness: the noise monitor and /proc readings, network namespaces, the
//! `st-bench` load generator, and `socktrace watch`/`serve` processes (start, wait for their
//! ready line, CPU and memory, scrape, stop). Nothing here measures by itself.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::Ctx;

// ---------------------------------------------------------------------------------------------
// Machine facts and the noise monitor

/// Processes that belong to the benchmark itself; everything else (except kernel threads) is
/// someone else's load.
const OURS: &[&str] = &["socktrace", "st-bench", "st-syscalls", "xtask", "ip", "sysctl", "bpftool", "cargo", "ss", "netstat", "sleep"];

/// Processes at this nice level or above count as background: against nice-0 work they get
/// about 1.5 % of a CPU (weight 15 vs 1024), they only fill idle time.
const BACKGROUND_NICE: i64 = 10;

/// Adds up, in the background, the CPU time of every other process (kernel threads excluded),
/// competing (nice < 10) and background (niced) separately.
pub struct Noise {
    foreign_ticks: Arc<AtomicU64>,
    niced_ticks: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Processes of the benchmark that are not ours by name (nginx, wrk, bpftrace), and their children.
    ignored: Arc<Mutex<HashSet<u32>>>,
}

/// A point in time for [`Noise::since`].
#[derive(Clone, Copy)]
pub struct NoiseMark {
    ticks: u64,
    niced: u64,
    at: Instant,
}

impl Noise {
    pub fn start() -> Noise {
        let foreign_ticks = Arc::new(AtomicU64::new(0));
        let niced_ticks = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let ignored: Arc<Mutex<HashSet<u32>>> = Arc::default();
        let (ticks, niced, halt, skip) = (Arc::clone(&foreign_ticks), Arc::clone(&niced_ticks), Arc::clone(&stop), Arc::clone(&ignored));
        std::thread::spawn(move || {
            let boot_ticks = uptime_ticks();
            let mut prev: HashMap<u32, u64> = HashMap::new();
            while !halt.load(Ordering::Relaxed) {
                let mut now = HashMap::new();
                let (mut add, mut add_niced) = (0, 0);
                let skip = skip.lock().map(|s| s.clone()).unwrap_or_default();
                for (pid, st) in all_proc_stats() {
                    if st.ppid == 2 || pid == 2 || OURS.contains(&st.comm.as_str()) || skip.contains(&pid) || skip.contains(&st.ppid) {
                        continue;
                    }
                    let t = st.utime + st.stime;
                    let d = match prev.get(&pid) {
                        Some(&p) => t.saturating_sub(p),
                        // Started since the monitor did: all of its time is new.
                        None if st.start_ticks > boot_ticks => t,
                        None => 0,
                    };
                    if st.nice >= BACKGROUND_NICE {
                        add_niced += d;
                    } else {
                        add += d;
                    }
                    now.insert(pid, t);
                }
                ticks.fetch_add(add, Ordering::Relaxed);
                niced.fetch_add(add_niced, Ordering::Relaxed);
                prev = now;
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Noise { foreign_ticks, niced_ticks, stop, ignored }
    }

    /// Counts `pid` and its children as part of the benchmark from now on.
    pub fn ignore(&self, pid: u32) {
        if let Ok(mut s) = self.ignored.lock() {
            s.insert(pid);
        }
    }

    pub fn mark(&self) -> NoiseMark {
        NoiseMark {
            ticks: self.foreign_ticks.load(Ordering::Relaxed),
            niced: self.niced_ticks.load(Ordering::Relaxed),
            at: Instant::now(),
        }
    }

    /// Competing (nice < 10) CPU use of other processes since `m`, in cores (1.0 = one core busy
    /// all the time). Sampled every 0.5 s, so it lags by up to that.
    pub fn since(&self, m: NoiseMark) -> f64 {
        let secs = m.at.elapsed().as_secs_f64().max(1e-3);
        self.foreign_ticks.load(Ordering::Relaxed).saturating_sub(m.ticks) as f64 / clk_tck() / secs
    }

    /// Background (nice ≥ 10) CPU use of other processes since `m`, in cores.
    pub fn niced_since(&self, m: NoiseMark) -> f64 {
        let secs = m.at.elapsed().as_secs_f64().max(1e-3);
        self.niced_ticks.load(Ordering::Relaxed).saturating_sub(m.niced) as f64 / clk_tck() / secs
    }
}

impl Drop for Noise {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub fn clk_tck() -> f64 {
    // SAFETY: no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn uptime_ticks() -> u64 {
    let up: f64 = fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0);
    (up * clk_tck()) as u64
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

#[derive(Debug, Default, PartialEq)]
pub struct ProcStat {
    pub comm: String,
    pub ppid: u32,
    pub nice: i64,
    pub utime: u64,
    pub stime: u64,
    pub start_ticks: u64,
}

/// Parses `/proc/PID/stat` (the comm may contain spaces and parentheses).
pub fn parse_stat(s: &str) -> Option<ProcStat> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_owned();
    // Fields after the comm, starting with field 3 (state).
    let f: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    let num = |i: usize| f.get(i - 3).and_then(|x| x.parse::<u64>().ok());
    let nice = f.get(19 - 3).and_then(|x| x.parse::<i64>().ok())?;
    Some(ProcStat { comm, ppid: u32::try_from(num(4)?).ok()?, nice, utime: num(14)?, stime: num(15)?, start_ticks: num(22)? })
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn all_proc_stats() -> Vec<(u32, ProcStat)> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        Some((pid, proc_stat(pid)?))
    })
    .collect()
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
pub fn proc_mem(pid: u32) -> Option<(u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines().find_map(|l| l.strip_prefix(name)?.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// eBPF programs of kinds that tracers attach (tracepoints, BTF tracing, raw tracepoints,
/// kprobes, cgroup skb filters) loaded right now. Called while none of the bench's own tracers
/// runs, these belong to someone else — and they run on the benchmark's traffic too, invisible
/// to the CPU noise monitor (their cost is charged to the load).
///
/// The programs of a tracer (or floor) that just stopped stay listed until the kernel frees them
/// (deferred work after the last fd closes), so a non-zero count is read again for up to a second.
pub fn foreign_bpf_programs() -> usize {
    const KINDS: &[&str] = &["tracepoint", "tracing", "raw_tracepoint", "kprobe", "cgroup_skb", "perf_event"];
    let count = || {
        let Ok(out) = Command::new("bpftool").args(["prog", "show", "--json"]).output() else { return 0 };
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_array().map_or(0, |a| a.iter().filter(|p| p["type"].as_str().is_some_and(|t| KINDS.contains(&t))).count())
    };
    let mut n = count();
    for _ in 0..10 {
        if n == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        n = count();
    }
    n
}

/// Machine facts for the report header.
pub fn machine(ctx: &Ctx) -> String {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let cpu = read("/proc/cpuinfo").lines().find_map(|l| l.strip_prefix("model name")?.split(':').nth(1).map(|s| s.trim().to_owned())).unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    let mut out = String::new();
    let _ = writeln!(out, "- CPU: {nproc} × {cpu} (`nproc` = {nproc}); memory {:.1} GiB; kernel `{kernel}` (`uname -r`)", mem_kib as f64 / 1_048_576.0);
    match hooks(ctx) {
        Ok(h) => {
            let _ = writeln!(out, "- hooks in use (`socktrace probes --json`): {h}");
        }
        Err(e) => {
            let _ = writeln!(out, "- hooks: `socktrace probes --json` failed: {e:#}");
        }
    }
    out
}

fn hooks(ctx: &Ctx) -> anyhow::Result<String> {
    let out = Command::new(&ctx.socktrace).args(["probes", "--json"]).output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .context("not an array")?
        .iter()
        .map(|s| {
            let hook = s["hook"].as_str().unwrap_or("UNAVAILABLE");
            let at = s["attached"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" + ")).unwrap_or_default();
            format!("{}={hook} (`{at}`)", s["signal"].as_str().unwrap_or("?"))
        })
        .collect::<Vec<_>>()
        .join(", "))
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

const NETNS_PREFIX: &str = "stb-";

/// A network namespace for one benchmark's traffic, deleted on drop. Loopback only; no `TIME_WAIT`
/// reuse limits (`tcp_tw_reuse=1`) and the whole ephemeral port range except the listeners' ports
/// (20000–20999 for storms, 30000–31999 for held listeners).
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> anyhow::Result<NetNs> {
        let name = format!("{NETNS_PREFIX}{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        crate::status(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        crate::status(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        crate::status(Command::new("ip").args(["netns", "exec", &ns.name, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.ip_local_reserved_ports=20000-20999,30000-31999"]))?;
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Namespaces left by a benchmark that was killed (its pid is gone).
pub fn remove_stale_netns() {
    let Ok(dir) = fs::read_dir("/run/netns") else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else { continue };
        let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load generator

/// Options of `st-bench storm`.
#[derive(Clone, Debug)]
pub struct Storm {
    pub secs: f64,
    /// Connections per second in total; 0: as fast as possible.
    pub rate: u64,
    pub clients: usize,
    /// Server threads (each with its share of the listeners): two, so that server work can use
    /// both cores while clients wait for the accept-queue window.
    pub servers: usize,
    pub port: u16,
    pub listeners: usize,
}

impl Storm {
    pub fn max(secs: f64) -> Storm {
        Storm { secs, rate: 0, clients: 4, servers: 2, port: 20000, listeners: 4 }
    }

    pub fn rate(secs: f64, rate: u64) -> Storm {
        Storm { rate, clients: if rate > 20_000 { 3 } else { 1 }, ..Storm::max(secs) }
    }
}

/// What `st-bench storm` reported.
#[derive(Clone, Debug, Default)]
pub struct StormResult {
    pub connects: u64,
    pub accepted: u64,
    pub errors: u64,
    /// How long the clients ran.
    pub secs: f64,
    pub rate: f64,
    /// CPU time (user + system) of the load generator.
    pub cpu_secs: f64,
    /// Other processes' CPU use during the run, in cores.
    pub noise: f64,
}

/// Runs a storm in `ns`, calling `tick` about every second while it runs.
pub fn storm(ctx: &Ctx, ns: &NetNs, s: &Storm, mut tick: impl FnMut()) -> anyhow::Result<StormResult> {
    let mark = ctx.noise.mark();
    let mut child = Command::new(&ctx.st_bench)
        .args(["storm", "--netns", &ns.name, "--secs", &s.secs.to_string(), "--rate", &s.rate.to_string()])
        .args(["--clients", &s.clients.to_string(), "--servers", &s.servers.to_string()])
        .args(["--port", &s.port.to_string(), "--listeners", &s.listeners.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning st-bench")?;
    let mut next = Instant::now() + Duration::from_secs(1);
    let deadline = Instant::now() + Duration::from_secs_f64(s.secs + 30.0);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= next {
            tick();
            next += Duration::from_secs(1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("st-bench storm did not finish");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().context("stdout")?.read_to_string(&mut out)?;
    child.stderr.take().context("stderr")?.read_to_string(&mut err)?;
    if !status.success() {
        bail!("st-bench storm failed ({status}): {}", err.trim());
    }
    let v: Value = serde_json::from_str(out.trim()).with_context(|| format!("st-bench output {out:?}"))?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let r = StormResult {
        connects: n("connects"),
        accepted: n("accepted"),
        errors: n("errors"),
        secs: v["secs"].as_f64().unwrap_or(f64::NAN),
        rate: v["rate"].as_f64().unwrap_or(0.0),
        cpu_secs: v["cpu_secs"].as_f64().unwrap_or(f64::NAN),
        noise: ctx.noise.since(mark),
    };
    if r.errors > 0 || r.connects != r.accepted {
        println!("  (st-bench: {} connected, {} accepted, {} connect errors, first: {})", r.connects, r.accepted, r.errors, v["first_error"]);
    }
    Ok(r)
}

/// A `st-bench hold` process (listeners and established connections), released on drop.
pub struct Hold {
    child: Child,
    pub sockets: u64,
}

impl Hold {
    pub fn start(ctx: &Ctx, ns: &NetNs, port: u16, listeners: usize, conns: usize) -> anyhow::Result<Hold> {
        let mut child = Command::new(&ctx.st_bench)
            .args(["hold", "--netns", &ns.name, "--port", &port.to_string()])
            .args(["--listeners", &listeners.to_string(), "--conns", &conns.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning st-bench hold")?;
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
        let v: Value = serde_json::from_str(line.trim()).with_context(|| format!("st-bench hold said {line:?}"))?;
        if v["ready"] != true {
            let _ = child.kill();
            bail!("st-bench hold failed: {line:?}");
        }
        Ok(Hold { child, sockets: v["sockets"].as_u64().unwrap_or(0) })
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && self.child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// socktrace processes

/// Where `watch` writes its events.
pub enum Stdout {
    /// `> /dev/null`.
    Null,
    /// A pipe read by the bench, counting accept records and the `lost` total.
    Count,
}

/// Counts of a `watch --json` stream.
#[derive(Default)]
pub struct StreamCount {
    pub accepts: AtomicU64,
    pub lines: AtomicU64,
    pub lost_total: AtomicU64,
}

/// A running `socktrace watch` or `serve`.
pub struct Tracer {
    child: Child,
    pub pid: u32,
    stderr: Arc<Mutex<Vec<String>>>,
    pub count: Option<Arc<StreamCount>>,
    /// `serve`: the /metrics address.
    pub metrics: Option<String>,
}

impl Tracer {
    pub fn watch(ctx: &Ctx, ns: &NetNs, extra: &[&str], out: &Stdout) -> anyhow::Result<Tracer> {
        let mut cmd = Command::new(&ctx.socktrace);
        cmd.args(["watch", "--json", "--netns", &ns.name]).args(extra);
        cmd.stdout(match out {
            Stdout::Null => Stdio::null(),
            Stdout::Count => Stdio::piped(),
        });
        let mut t = Tracer::spawn(cmd, "tracing started", None)?;
        if let Some(stdout) = t.child.stdout.take() {
            let count = Arc::new(StreamCount::default());
            let c = Arc::clone(&count);
            std::thread::spawn(move || count_stream(stdout, &c));
            t.count = Some(count);
        }
        Ok(t)
    }

    pub fn serve(ctx: &Ctx, ns: &NetNs, extra: &[&str]) -> anyhow::Result<Tracer> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(&ctx.socktrace);
        cmd.args(["serve", "--listen", &addr, "--netns", &ns.name]).args(extra).stdout(Stdio::null());
        Tracer::spawn(cmd, "serving http://", Some(addr))
    }

    /// `top --json` (its lines to /dev/null), one interval per second.
    pub fn top(ctx: &Ctx, ns: &NetNs) -> anyhow::Result<Tracer> {
        let mut cmd = Command::new(&ctx.socktrace);
        cmd.args(["top", "--json", "--interval", "1s", "--netns", &ns.name]).stdout(Stdio::null());
        Tracer::spawn(cmd, "tracing started", None)
    }

    fn spawn(mut cmd: Command, ready: &'static str, metrics: Option<String>) -> anyhow::Result<Tracer> {
        let mut child = cmd.stderr(Stdio::piped()).spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let stderr: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = mpsc::channel();
        {
            let sink = Arc::clone(&stderr);
            let err = child.stderr.take().context("stderr")?;
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    if line.contains(ready) {
                        let _ = tx.send(());
                    }
                    sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line);
                }
            });
        }
        let pid = child.id();
        let mut t = Tracer { child, pid, stderr, count: None, metrics };
        if rx.recv_timeout(Duration::from_mins(1)).is_err() {
            let _ = t.child.kill();
            bail!("{cmd:?} did not start: {:?}", t.stderr_lines());
        }
        // Let the first scheduling hiccups of a fresh process pass.
        std::thread::sleep(Duration::from_millis(300));
        Ok(t)
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// utime + stime so far, in seconds.
    pub fn cpu_secs(&self) -> f64 {
        proc_stat(self.pid).map_or(f64::NAN, |s| (s.utime + s.stime) as f64 / clk_tck())
    }

    /// (`VmRSS`, `VmHWM`) in KiB.
    pub fn mem_kib(&self) -> (u64, u64) {
        proc_mem(self.pid).unwrap_or((0, 0))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(i32::try_from(self.pid).unwrap_or(0), sig) };
    }

    /// GET /metrics of a `serve`.
    pub fn scrape(&self) -> anyhow::Result<String> {
        http_get(self.metrics.as_deref().context("not a serve process")?, "/metrics")
    }

    /// SIGINT (as Ctrl-C), then its stderr lines (the exit summary).
    pub fn stop(mut self) -> anyhow::Result<Vec<String>> {
        self.signal(libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(20);
        let st = loop {
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("socktrace did not exit after SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader threads finish with the pipes.
        std::thread::sleep(Duration::from_millis(100));
        if !st.success() {
            bail!("socktrace exited with {st}: {:?}", self.stderr_lines());
        }
        Ok(self.stderr_lines())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGCONT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn count_stream(stdout: impl std::io::Read, c: &StreamCount) {
    let mut r = BufReader::with_capacity(1 << 20, stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        c.lines.fetch_add(1, Ordering::Relaxed);
        if line.starts_with(b"{\"kind\":\"accept\"") {
            c.accepts.fetch_add(1, Ordering::Relaxed);
        } else if let Some(total) = lost_total(&line) {
            c.lost_total.fetch_max(total, Ordering::Relaxed);
        }
    }
}

/// `total` of a `{"kind":"lost",…}` record.
fn lost_total(line: &[u8]) -> Option<u64> {
    if !line.windows(13).any(|w| w == b"\"kind\":\"lost\"") {
        return None;
    }
    let v: Value = serde_json::from_slice(line).ok()?;
    v["total"].as_u64()
}

/// `N events shown, M lost` from watch's exit summary.
pub fn exit_summary(stderr: &[String]) -> Option<(u64, u64)> {
    stderr.iter().rev().find_map(|l| {
        let rest = l.strip_prefix("socktrace: ")?;
        let (shown, rest) = rest.split_once(" events shown, ")?;
        let lost = rest.split_whitespace().next()?;
        Some((shown.parse().ok()?, lost.parse().ok()?))
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Minimal HTTP/1.1 GET on loopback: the body of a 200 reply.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let sock: std::net::SocketAddr = addr.parse()?;
    let timeout = Duration::from_secs(5);
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    if head.split_whitespace().nth(1) != Some("200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

/// Sum of a Prometheus metric's samples whose labels contain every `label="value"` in `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, lab) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|(k, v)| lab.contains(&format!("{k}=\"{v}\"")))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Inode of a named netns: the `netns` label of serve's metrics.
pub fn netns_inode(ns: &NetNs) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(format!("/run/netns/{}", ns.name)).map_or(0, |m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm() {
        let line = "42 (a b) c) S 7 42 42 0 -1 4194560 100 0 0 0 250 30 0 0 39 19 1 0 9000 1000 10";
        let s = parse_stat(line).unwrap();
        assert_eq!(s, ProcStat { comm: "a b) c".into(), ppid: 7, nice: 19, utime: 250, stime: 30, start_ticks: 9000 });
    }

    #[test]
    fn metrics_and_summaries() {
        let text = "# HELP x\nsocktrace_accepts_total{netns=\"5\",lport=\"1\"} 3\nsocktrace_accepts_total{netns=\"5\",lport=\"2\"} 4\nsocktrace_accepts_total{netns=\"6\",lport=\"1\"} 100\nsocktrace_events_lost_total 7\n";
        assert_eq!(metric_sum(text, "socktrace_accepts_total", &[("netns", "5")]), 7.0);
        assert_eq!(metric_sum(text, "socktrace_events_lost_total", &[]), 7.0);
        let err = vec!["socktrace: tracing started (x)".to_owned(), "socktrace: 12 events shown, 3 lost in the ring buffer, 0 kernel read errors".to_owned()];
        assert_eq!(exit_summary(&err), Some((12, 3)));
        assert_eq!(lost_total(br#"{"count":2,"kind":"lost","total":9,"ts_ns":1}"#), Some(9));
        assert_eq!(lost_total(br#"{"kind":"accept"}"#), None);
    }
}
