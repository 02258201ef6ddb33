//! Benchmark of `socktrace snapshot` against `ss -tan` and `netstat -tan` on 10k, 20k and 100k
//! loopback TCP sockets (established pairs plus a few listeners) in a network namespace that it
//! creates and deletes. Every command runs inside that namespace with stdout to /dev/null, all of
//! them in the same run, interleaved (the starting command rotates each round) and repeated; the
//! result is a Markdown table of median, min and max wall times and the command lines used.
//!
//! Needs root (`ip netns add`). Sockets are held by `sleep` processes that inherit them in batches,
//! so `RLIMIT_NOFILE` only has to cover one batch (its hard limit may be low where
//! `CAP_SYS_RESOURCE` is missing); both owner sources (iterator, /proc scan) see them as ordinary socket holders.
//! Entry point: [`run`] (xtask's CLI decides how it is invoked).

use std::{
    fmt::Write as _,
    fs::File,
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// Socket counts to measure (each is pairs × 2, plus the listeners).
const SIZES: [usize; 3] = [10_000, 20_000, 100_000];
/// Timed runs per command at each size (after one untimed warm-up run).
const REPS: [usize; 3] = [11, 9, 7];
const LISTENERS: u16 = 8;
const BASE_PORT: u16 = 31_000;

/// Builds socktrace, measures every size, returns the Markdown report.
pub fn run(workspace: &Path) -> anyhow::Result<String> {
    // SAFETY: no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "bench-snapshot needs root (it creates a network namespace)");
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "-p", "socktrace"])
        .current_dir(workspace)
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "cargo build --release -p socktrace failed");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let socktrace = target.join("release/socktrace");
    let nofile = raise_nofile();

    let mut report = String::new();
    let _ = writeln!(report, "### `socktrace snapshot` vs `ss` vs `netstat`\n");
    let _ = writeln!(
        report,
        "Loopback TCP sockets (established pairs + {LISTENERS} listeners) in one network namespace; each command run \
         inside it with stdout to /dev/null (as `ip netns exec NS CMD >/dev/null`, without ip's own start-up), \
         interleaved, after one warm-up run. {} CPUs, kernel {}. `socktrace snapshot` resolves owning processes \
         unless `--no-processes`, like `ss -tanp`: with `--owners bpf` from a BPF task-file iterator (what it does by \
         default as root), with `--owners proc` from a /proc/*/fd scan (the fallback); `ss -tan` and \
         `netstat -tan` do not.\n",
        std::thread::available_parallelism().map_or(0, usize::from),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    );
    let _ = writeln!(report, "| sockets | command | median | min | max | median / `ss -tan` | median / `ss -tanp` |");
    let _ = writeln!(report, "|---:|---|---:|---:|---:|---:|---:|");
    for (size, reps) in SIZES.into_iter().zip(REPS) {
        let ns = Netns::create()?;
        let population = populate(&ns, size, nofile)?;
        let rows = measure(&ns, &socktrace, reps)?;
        let median_of = |label: &str| rows.iter().find(|r| r.label == label).map(|r| r.median);
        let (ss, ssp) = (median_of("ss -tan"), median_of("ss -tanp"));
        for r in &rows {
            let ratio =
                |base: Option<Duration>| base.map_or_else(|| "-".to_owned(), |m| format!("{:.2}", r.median.as_secs_f64() / m.as_secs_f64()));
            let _ = writeln!(
                report,
                "| {} | `{}` | {} | {} | {} | {} | {} |",
                population.sockets,
                r.label.replace("NS", &ns.name),
                ms(r.median),
                ms(r.min),
                ms(r.max),
                ratio(ss),
                ratio(ssp)
            );
        }
        drop(population);
        drop(ns);
    }
    let _ = writeln!(report, "\n{} timed runs per command at 10k sockets, {} at 20k, {} at 100k.", REPS[0], REPS[1], REPS[2]);
    Ok(report)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Soft `RLIMIT_NOFILE` raised as far as allowed (the hard limit too, if permitted); returns it.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) };
    let want = libc::rlimit { rlim_cur: 1 << 20, rlim_max: lim.rlim_max.max(1 << 20) };
    // SAFETY: valid pointer; failure (no CAP_SYS_RESOURCE) is handled below.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const want) } != 0 {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above; the soft limit may always rise to the hard limit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
    }
    // SAFETY: valid pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) };
    lim.rlim_cur
}

/// A network namespace for one size, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> anyhow::Result<Netns> {
        let name = format!("st-bench-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        let ok = Command::new("ip").args(["netns", "add", &name]).status()?.success();
        ensure!(ok, "ip netns add {name} failed");
        let ns = Netns { name };
        let ok = Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]).status()?.success();
        ensure!(ok, "bringing lo up in {} failed", ns.name);
        Ok(ns)
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens and processes it spawns live there).
    fn within<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        let file = File::open(Path::new("/run/netns").join(&self.name))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: a valid netns fd; only this thread moves.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The sockets of one size: listeners held here, connections held by `sleep` processes.
struct Population {
    _listeners: Vec<TcpListener>,
    holders: Vec<Child>,
    sockets: usize,
}

impl Drop for Population {
    fn drop(&mut self) {
        for h in &mut self.holders {
            let _ = h.kill();
            let _ = h.wait();
        }
    }
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// `size` sockets: `size / 2` connected pairs spread over the listeners.
fn populate(ns: &Netns, size: usize, nofile: u64) -> anyhow::Result<Population> {
    let pairs = size / 2;
    ns.within(|| {
        let listeners = (0..LISTENERS)
            .map(|i| TcpListener::bind((Ipv4Addr::LOCALHOST, BASE_PORT + i)))
            .collect::<Result<Vec<_>, _>>()
            .context("binding listeners")?;
        let batch_fds = usize::try_from(nofile.saturating_sub(open_fds() + 64)).unwrap_or(usize::MAX);
        ensure!(batch_fds >= 1000, "RLIMIT_NOFILE is {nofile}: too low to build sockets in batches");
        let mut holders = Vec::new();
        let mut made = 0;
        while made < pairs {
            let n = (pairs - made).min(batch_fds / 2);
            let mut batch: Vec<OwnedFd> = Vec::with_capacity(2 * n);
            for i in 0..n {
                let l = &listeners[(made + i) % listeners.len()];
                let c = TcpStream::connect(l.local_addr()?).context("connect")?;
                let (s, _) = l.accept().context("accept")?;
                batch.extend([OwnedFd::from(c), OwnedFd::from(s)]);
            }
            for fd in &batch {
                // SAFETY: clearing FD_CLOEXEC on an fd we own, so the holder inherits it.
                unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
            }
            let holder = Command::new("sleep").arg("86400").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
            // Our copies close here; the holder keeps the sockets open.
            drop(batch);
            holders.push(holder.context("spawning a sleep process to hold sockets")?);
            made += n;
        }
        Ok(Population { _listeners: listeners, holders, sockets: 2 * pairs + usize::from(LISTENERS) })
    })
}

struct Row {
    label: &'static str,
    median: Duration,
    min: Duration,
    max: Duration,
}

/// Times every command `reps` times, interleaved, inside the namespace.
fn measure(ns: &Netns, socktrace: &Path, reps: usize) -> anyhow::Result<Vec<Row>> {
    let bin = socktrace.to_string_lossy().into_owned();
    let cmds: Vec<(&'static str, Vec<String>)> = [
        ("socktrace snapshot --netns NS --owners bpf", vec![bin.clone(), "snapshot".into(), "--netns".into(), ns.name.clone(), "--owners".into(), "bpf".into()]),
        ("socktrace snapshot --netns NS --owners proc", vec![bin.clone(), "snapshot".into(), "--netns".into(), ns.name.clone(), "--owners".into(), "proc".into()]),
        ("socktrace snapshot --netns NS --json", vec![bin.clone(), "snapshot".into(), "--netns".into(), ns.name.clone(), "--json".into()]),
        ("socktrace snapshot --netns NS --no-processes", vec![bin, "snapshot".into(), "--netns".into(), ns.name.clone(), "--no-processes".into()]),
        ("ss -tan", vec!["ss".into(), "-tan".into()]),
        ("ss -tanp", vec!["ss".into(), "-tanp".into()]),
        ("netstat -tan", vec!["netstat".into(), "-tan".into()]),
    ]
    .into_iter()
    .filter(|(_, argv)| Command::new(&argv[0]).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok())
    .collect();
    ns.within(|| {
        sanity(&cmds)?;
        let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(reps); cmds.len()];
        for round in 0..=reps {
            for k in 0..cmds.len() {
                let i = (round + k) % cmds.len();
                let t = time_once(&cmds[i].1)?;
                if round > 0 {
                    times[i].push(t);
                }
            }
        }
        Ok(cmds
            .iter()
            .zip(times)
            .map(|((label, _), mut t)| {
                t.sort();
                Row { label, median: t[t.len() / 2], min: t[0], max: t[t.len() - 1] }
            })
            .collect())
    })
}

fn time_once(argv: &[String]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(File::create("/dev/null")?)
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {argv:?}"))?;
    let took = start.elapsed();
    ensure!(status.success(), "{argv:?} failed: {status}");
    Ok(took)
}

/// The compared commands must list the same number of sockets (table lines minus headers).
fn sanity(cmds: &[(&'static str, Vec<String>)]) -> anyhow::Result<()> {
    let count = |argv: &[String]| -> anyhow::Result<usize> {
        let out = Command::new(&argv[0]).args(&argv[1..]).stderr(Stdio::null()).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).count())
    };
    let find = |label: &str| cmds.iter().find(|(l, _)| *l == label).map(|(_, a)| a);
    if let (Some(ours), Some(ss)) = (find("socktrace snapshot --netns NS --owners bpf"), find("ss -tan")) {
        // ss: one header line; snapshot: a header per section (listeners, others).
        let (a, b) = (count(ours)?.saturating_sub(2), count(ss)?.saturating_sub(1));
        ensure!(a == b, "socktrace snapshot lists {a} sockets, ss -tan {b}");
    }
    Ok(())
}
