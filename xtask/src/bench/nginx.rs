//! Real-server overhead: Debian's nginx-light (one worker, `return 200`) under wrk with
//! `Connection: close` (one connection per request) in a fresh network namespace; requests/s and
//! CPU per request of wrk + nginx + tracer, untraced vs `socktrace serve` vs
//! `socktrace watch --json > /dev/null` vs the bpftrace peer `bench/accept-wait.bt` (accept-queue
//! wait the way a user measures it without socktrace). Configurations alternate (A B C D A B C D
//! …), `--reps` times, `--secs` of load each. nginx-light, wrk and bpftrace are installed with
//! apt-get when missing.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use super::floor::Floor;

use super::{Ctx, FloorPoints, NetNs, Section, Stdout, Summary, Table, Tracer, clk_tck, exit_summary, loadavg, metric_sum, netns_inode, proc_stat, provenance};

const PORT: u16 = 20080;
const WRK_CONNECTIONS: u32 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    Untraced,
    Serve,
    /// `serve --accept-hooks off`: no syscall tracepoint; accepts derived, no accept wait.
    ServeOff,
    Watch,
    Bpftrace,
    /// Empty programs on `serve`'s attach points (see `floor`).
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
            Config::Bpftrace => "bpftrace bench/accept-wait.bt",
            Config::Floor => "floor: empty programs on serve's hooks",
            Config::FloorOff => "floor: empty programs on --accept-hooks off's hooks",
        }
    }
}

struct Run {
    requests: u64,
    rate: f64,
    /// Connect/read/write/timeout errors wrk reported, and non-2xx responses.
    errors: u64,
    wrk_cpu: f64,
    nginx_cpu: f64,
    tracer_cpu: f64,
    noise: f64,
    check: String,
}

impl Run {
    fn us_per_req(&self, cpu: f64) -> f64 {
        cpu / self.requests.max(1) as f64 * 1e6
    }
    fn total_us(&self) -> f64 {
        self.us_per_req(self.wrk_cpu + self.nginx_cpu + self.tracer_cpu)
    }
}

pub fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    println!("\n== nginx: nginx-light under wrk -H 'Connection: close', {} s per run, {} repetitions, alternating ==", ctx.secs, ctx.reps);
    install(&[("nginx", "nginx-light"), ("wrk", "wrk"), ("bpftrace", "bpftrace")])?;
    let script = crate::workspace().join("bench/accept-wait.bt");
    ensure!(script.exists(), "{} is missing", script.display());
    let ns = NetNs::new("nginx")?;
    let nginx = Nginx::start(ctx, &ns)?;
    let load_before = loadavg();
    let mark = ctx.noise.mark();
    // Warm-up (page cache, nginx's first allocations), not counted.
    wrk(ctx, &ns, 1.0, || {})?;
    let configs = [Config::Untraced, Config::Serve, Config::ServeOff, Config::Watch, Config::Bpftrace, Config::Floor, Config::FloorOff];
    let floors = FloorPoints::of(ctx)?;
    let mut runs: BTreeMap<Config, Vec<Run>> = BTreeMap::new();
    for rep in 0..ctx.reps {
        for k in 0..configs.len() {
            // Rotate the order so no configuration always runs first (or after the same one).
            let c = configs[(rep + k) % configs.len()];
            let r = one(ctx, &ns, &nginx, &script, c, &floors)?;
            println!(
                "  rep {} {:<30} {:>7.0} req/s  wrk {:>5.1} nginx {:>5.1} tracer {:>5.1} µs/req  other load {:.2}  {}",
                rep + 1,
                c.name(),
                r.rate,
                r.us_per_req(r.wrk_cpu),
                r.us_per_req(r.nginx_cpu),
                r.us_per_req(r.tracer_cpu),
                r.noise,
                r.check
            );
            runs.entry(c).or_default().push(r);
        }
    }
    drop(nginx);
    let t = table(&configs, &runs);
    println!("\n{}", t.text());
    let added = |c: Config| {
        let tot = |c: Config| Summary::of(&runs[&c].iter().map(Run::total_us).collect::<Vec<_>>()).median;
        tot(c) - tot(Config::Untraced)
    };
    let (serve, peer) = (added(Config::Serve), added(Config::Bpftrace));
    let ratio = if peer > 0.0 { format!("{:.2}", serve / peer) } else { "- (the peer added nothing measurable)".into() };
    println!("serve adds {serve:.2} µs/request, the bpftrace peer {peer:.2}: ratio {ratio}");
    let (serve_p, peer_p) = (paired_added(&runs, Config::Serve).median, paired_added(&runs, Config::Bpftrace).median);
    let ratio_p = if peer_p > 0.0 { format!("{:.2}", serve_p / peer_p) } else { "-".into() };
    println!("paired by repetition: serve adds {serve_p:.2} µs/request, the peer {peer_p:.2}: ratio {ratio_p}");
    let off = added(Config::ServeOff);
    let ratio_off = if peer > 0.0 { format!("{:.2}", off / peer) } else { "-".into() };
    println!("serve --accept-hooks off adds {off:.2} µs/request: ratio {ratio_off}");
    let total = |c: Config| Summary::of(&runs[&c].iter().map(Run::total_us).collect::<Vec<_>>()).median;
    let floors_md = floors.summary("request", total(Config::Untraced), [(total(Config::Serve), total(Config::Floor)), (total(Config::ServeOff), total(Config::FloorOff))]);
    println!("{floors_md}");

    let mut md = String::from("## Real server: nginx under wrk\n\n");
    md.push_str(&provenance(ctx, &load_before, mark));
    let _ = write!(
        md,
        "\nLoad: Debian nginx-light, `worker_processes 1`, `return 200 \"ok\"`, access log off, listening on \
         127.0.0.1:{PORT} (backlog 4096) in a fresh netns; `wrk -t1 -c{WRK_CONNECTIONS} -d{}s -H 'Connection: close'` \
         in the same netns: one TCP connection per request, so every request is an accept. Tracers started before \
         the load (after their ready line): `socktrace serve --netns <ns>` (scraped every second), the same with \
         `--accept-hooks off` (no syscall tracepoint: accepts derived from the children queued, no accept wait), `socktrace watch \
         --json --netns <ns> > /dev/null`, and `bpftrace bench/accept-wait.bt` (tracepoints `sock:inet_sock_set_state` \
         and `syscalls:sys_exit_accept{{,4}}`, the accepted socket found through curtask's fd table, an in-kernel \
         log2 histogram; machine-wide, as a user would run it). {} repetitions, configurations alternating \
         the order rotated by one each repetition (A B C … G, B C … G A, …), after a 1 s untimed warm-up.\n\n",
        ctx.secs, ctx.reps
    );
    md.push_str(&t.markdown());
    let _ = write!(md, "\n{floors_md}");
    let _ = writeln!(
        md,
        "\nCPU µs/req: user+system time of wrk (wait4 rusage), of nginx (master and worker, /proc/PID/stat) and of \
         the tracer process, per completed request; the eBPF programs run in the context of nginx's and wrk's \
         syscalls and softirqs, so their cost is in those columns. \"× untraced (CPU/req)\" = untraced total ÷ this \
         configuration's total. \"Added µs/req (paired by rep)\": median over the repetitions of this configuration's \
         total minus the untraced run's of the same repetition. Added µs/req of `serve` ÷ that of the bpftrace peer: \
         **{ratio}** (target ≤ 0.5; paired by repetition: **{ratio_p}**); of `serve --accept-hooks off`: **{ratio_off}**."
    );
    Ok(Section { name: "nginx", markdown: md })
}

fn table(configs: &[Config], runs: &BTreeMap<Config, Vec<Run>>) -> Table {
    let base = Summary::of(&runs[&Config::Untraced].iter().map(Run::total_us).collect::<Vec<_>>()).median;
    let base_rate = Summary::of(&runs[&Config::Untraced].iter().map(|r| r.rate).collect::<Vec<_>>()).median;
    let mut t = Table::new(&[
        "config",
        "req/s",
        "× untraced (req/s)",
        "wrk µs/req",
        "nginx µs/req",
        "tracer µs/req",
        "total µs/req",
        "added µs/req",
        "added µs/req (paired by rep)",
        "× untraced (CPU/req)",
        "errors",
        "other load (cores)",
    ]);
    for &c in configs {
        let v = &runs[&c];
        let per = |f: &dyn Fn(&Run) -> f64| Summary::of(&v.iter().map(f).collect::<Vec<_>>());
        let tot = per(&Run::total_us);
        let rate = per(&|r| r.rate);
        let untraced = c == Config::Untraced;
        let no_tracer = matches!(c, Config::Untraced | Config::Floor | Config::FloorOff);
        t.row(vec![
            c.name().to_owned(),
            rate.show(0),
            if untraced { "1".into() } else { format!("{:.3}", rate.median / base_rate) },
            per(&|r| r.us_per_req(r.wrk_cpu)).show(1),
            per(&|r| r.us_per_req(r.nginx_cpu)).show(1),
            if no_tracer { "-".into() } else { per(&|r| r.us_per_req(r.tracer_cpu)).show(2) },
            tot.show(1),
            if untraced { "-".into() } else { format!("{:+.2}", tot.median - base) },
            if untraced { "-".into() } else { paired_added(runs, c).show(2) },
            if untraced { "1".into() } else { format!("{:.3}", base / tot.median) },
            v.iter().map(|r| r.errors).sum::<u64>().to_string(),
            per(&|r| r.noise).show(2),
        ]);
    }
    t
}

/// CPU µs/request `c` added over the untraced run of the same repetition (they ran back to
/// back): drift of the machine between repetitions cancels out, which the difference of the
/// medians does not.
fn paired_added(runs: &BTreeMap<Config, Vec<Run>>, c: Config) -> Summary {
    let diffs: Vec<f64> = runs[&c].iter().zip(&runs[&Config::Untraced]).map(|(r, u)| r.total_us() - u.total_us()).collect();
    Summary::of(&diffs)
}

fn one(ctx: &Ctx, ns: &NetNs, nginx: &Nginx, script: &Path, c: Config, floors: &FloorPoints) -> anyhow::Result<Run> {
    let n0 = nginx.cpu_secs();
    let mark = ctx.noise.mark();
    let (w, tracer_cpu, check) = match c {
        Config::Floor | Config::FloorOff => {
            let floor = Floor::attach(floors.get(c == Config::FloorOff), &socktrace_tests::cgroup2_root()?)?;
            let w = wrk(ctx, ns, ctx.secs, || {})?;
            drop(floor);
            (w, 0.0, String::new())
        }
        Config::Untraced => (wrk(ctx, ns, ctx.secs, || {})?, 0.0, String::new()),
        Config::Serve | Config::ServeOff => {
            let t = Tracer::serve(ctx, ns, if c == Config::ServeOff { &["--accept-hooks", "off"] } else { &[] })?;
            let c0 = t.cpu_secs();
            let w = wrk(ctx, ns, ctx.secs, || {
                let _ = t.scrape();
            })?;
            let cpu = t.cpu_secs() - c0;
            let text = t.scrape()?;
            let counted = metric_sum(&text, "socktrace_accepts_total", &[("netns", &netns_inode(ns).to_string())]);
            t.stop()?;
            (w, cpu, format!("accepts_total {counted:.0}"))
        }
        Config::Watch => {
            let t = Tracer::watch(ctx, ns, &[], &Stdout::Null)?;
            let c0 = t.cpu_secs();
            let w = wrk(ctx, ns, ctx.secs, || {})?;
            std::thread::sleep(Duration::from_millis(300));
            let cpu = t.cpu_secs() - c0;
            let (shown, lost) = exit_summary(&t.stop()?).context("no exit summary from watch")?;
            (w, cpu, format!("{shown} events, {lost} lost"))
        }
        Config::Bpftrace => {
            let bt = Bpftrace::start(script)?;
            ctx.noise.ignore(bt.child.id());
            let c0 = bt.cpu_secs();
            let w = wrk(ctx, ns, ctx.secs, || {})?;
            let cpu = bt.cpu_secs() - c0;
            let accepted = bt.stop()?;
            (w, cpu, format!("@accepted {accepted} (machine-wide)"))
        }
    };
    Ok(Run {
        requests: w.requests,
        rate: w.rate,
        errors: w.errors,
        wrk_cpu: w.cpu,
        nginx_cpu: nginx.cpu_secs() - n0,
        tracer_cpu,
        noise: ctx.noise.since(mark),
        check: format!("{} requests; {check}", w.requests),
    })
}

/// apt-get installs the packages whose command is missing.
fn install(needs: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = needs.iter().filter(|(cmd, _)| which(cmd).is_none()).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("  installing {}", missing.join(" "));
    let st = Command::new("apt-get").args(["install", "-y", "-q"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive").status().context("apt-get")?;
    ensure!(st.success(), "apt-get install {} failed", missing.join(" "));
    Ok(())
}

fn which(cmd: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().map(|d| Path::new(d).join(cmd)).find(|p| p.exists())
}

/// nginx master + one worker in the namespace, with its own prefix directory; stopped on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    fn start(ctx: &Ctx, ns: &NetNs) -> anyhow::Result<Nginx> {
        let dir = std::env::temp_dir().join(format!("stb-nginx-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               server {{\n    listen 127.0.0.1:{PORT} backlog=4096;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
        );
        fs::write(dir.join("nginx.conf"), conf)?;
        let nginx = which("nginx").context("nginx not found")?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(nginx)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        ctx.noise.ignore(child.id());
        let n = Nginx { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while n.pids().len() < 2 {
            if Instant::now() > deadline {
                bail!("nginx did not start: {}", fs::read_to_string(n.dir.join("error.log")).unwrap_or_default().trim());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(n)
    }

    /// The master (our child: `ip netns exec` execs it) and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut pids = vec![master];
        if let Ok(dir) = fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
                if proc_stat(pid).is_some_and(|s| s.ppid == master) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    fn cpu_secs(&self) -> f64 {
        self.pids().into_iter().filter_map(proc_stat).map(|s| (s.utime + s.stime) as f64).sum::<f64>() / clk_tck()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: graceful stop of master and workers.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(i32::try_from(self.child.id()).unwrap_or(0), libc::SIGQUIT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

struct Wrk {
    requests: u64,
    rate: f64,
    errors: u64,
    cpu: f64,
}

/// One wrk run in the namespace; `tick` about every second while it runs.
fn wrk(ctx: &Ctx, ns: &NetNs, secs: f64, mut tick: impl FnMut()) -> anyhow::Result<Wrk> {
    let wrk = which("wrk").context("wrk not found")?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(wrk)
        .args(["-t1", &format!("-c{WRK_CONNECTIONS}"), &format!("-d{}s", secs.ceil()), "-H", "Connection: close"])
        .arg(format!("http://127.0.0.1:{PORT}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting wrk")?;
    ctx.noise.ignore(child.id());
    let pid = i32::try_from(child.id())?;
    let mut out = child.stdout.take().context("wrk stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let deadline = Instant::now() + Duration::from_secs_f64(secs + 30.0);
    let text = loop {
        if let Ok(s) = rx.recv_timeout(Duration::from_secs(1)) {
            break s;
        }
        tick();
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("wrk did not finish");
        }
    };
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: reaping our own child (std's Child is not waited on afterwards), valid out pointers.
    let r = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
    ensure!(r == pid, "wait4(wrk): {}", std::io::Error::last_os_error());
    ensure!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "wrk failed: {text}");
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
    parse_wrk(&text, cpu).with_context(|| format!("wrk output: {text}"))
}

/// `N requests in Xs`, `Requests/sec: R`, `Socket errors: connect a, read b, write c, timeout d`,
/// `Non-2xx or 3xx responses: e`.
fn parse_wrk(text: &str, cpu: f64) -> Option<Wrk> {
    let requests = text.lines().find_map(|l| l.trim().split_once(" requests in ")?.0.parse().ok())?;
    let rate = text.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:")?.trim().parse().ok())?;
    let mut errors = 0u64;
    for l in text.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            errors += rest.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
        }
        if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Some(Wrk { requests, rate, errors, cpu })
}

/// The bpftrace peer, running until [`Bpftrace::stop`].
struct Bpftrace {
    child: Child,
    out: mpsc::Receiver<String>,
}

impl Bpftrace {
    fn start(script: &Path) -> anyhow::Result<Bpftrace> {
        let bt = which("bpftrace").context("bpftrace not found")?;
        let mut child = Command::new(bt).arg(script).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().context("starting bpftrace")?;
        let stdout = child.stdout.take().context("bpftrace stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(l) if l.starts_with("Attaching") => break,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("bpftrace exited before attaching"),
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("bpftrace did not attach within a minute");
            }
        }
        // As for socktrace: let the probes settle.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Bpftrace { child, out: rx })
    }

    fn cpu_secs(&self) -> f64 {
        proc_stat(self.child.id()).map_or(f64::NAN, |s| (s.utime + s.stime) as f64 / clk_tck())
    }

    /// SIGINT; returns `@accepted` from the maps bpftrace prints on exit.
    fn stop(mut self) -> anyhow::Result<u64> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(i32::try_from(self.child.id())?, libc::SIGINT) };
        let st = self.child.wait()?;
        ensure!(st.success(), "bpftrace exited with {st}");
        let lines: Vec<String> = self.out.try_iter().collect();
        Ok(lines.iter().find_map(|l| l.strip_prefix("@accepted:")?.trim().parse().ok()).unwrap_or(0))
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output() {
        let text = "Running 5s test @ http://127.0.0.1:20080/\n  1 threads and 32 connections\n\
                    31000 requests in 5.00s, 4.5MB read\n  Socket errors: connect 0, read 3, write 0, timeout 2\n\
                    Non-2xx or 3xx responses: 1\nRequests/sec:   6199.52\nTransfer/sec:    0.9MB\n";
        let w = parse_wrk(text, 1.5).unwrap();
        assert_eq!((w.requests, w.errors), (31000, 6));
        assert!((w.rate - 6199.52).abs() < 1e-9);
        assert!(parse_wrk("garbage", 0.0).is_none());
    }
}
