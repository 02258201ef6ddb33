//! Harness for socktrace's privileged integration tests: network-namespace and cgroup guards that
//! clean up even when a test panics, the netns's own kernel counters (TcpExt, Tcp) as ground truth,
//! and drivers for the real `socktrace` binary and the `st-scenario` traffic generator.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, BufReader},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

pub mod diag;
pub mod reuseport;
pub mod servers;

/// Whether privileged tests may run. Without root they skip with a printed reason, unless
/// `SOCKTRACE_REQUIRE_BPF=1`, where a skip is a failure.
pub fn privileged() -> bool {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    assert!(
        std::env::var("SOCKTRACE_REQUIRE_BPF").as_deref() != Ok("1"),
        "SOCKTRACE_REQUIRE_BPF=1 but not running as root: the eBPF tests cannot run"
    );
    eprintln!("skipped: needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN) to load eBPF");
    false
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace created for one scenario, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> anyhow::Result<NetNs> {
        let name = format!("st-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Inode number: the `netns` field of socktrace events.
    pub fn inode(&self) -> u32 {
        u32::try_from(fs::metadata(self.path()).map(|m| m.ino()).unwrap_or(0)).unwrap_or(0)
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        let file = fs::File::open(self.path())?;
        std::thread::spawn(move || {
            // SAFETY: a valid netns fd; affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))
    }

    /// The namespace's own SNMP counters: `TcpExt*` from /proc/net/netstat and `Tcp*` from
    /// /proc/net/snmp, read from inside it (`/proc/thread-self/net` follows the thread's netns).
    pub fn counters(&self) -> anyhow::Result<Counters> {
        self.within(|| {
            let mut c = HashMap::new();
            for f in ["/proc/thread-self/net/netstat", "/proc/thread-self/net/snmp"] {
                let text = fs::read_to_string(f).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                for pair in lines.chunks(2) {
                    let [head, vals] = pair else { continue };
                    let mut h = head.split_whitespace();
                    let prefix = h.next().unwrap_or("").trim_end_matches(':');
                    for (k, v) in h.zip(vals.split_whitespace().skip(1)) {
                        if let Ok(v) = v.parse::<i64>() {
                            c.insert(format!("{prefix}{k}"), v);
                        }
                    }
                }
            }
            Counters(c)
        })
    }

    /// Packet loss: nftables drops `percent` % of the segments from port `sport` longer than 120
    /// bytes (data, not bare ACKs or handshakes) on this namespace's INPUT hook (drops on OUTPUT
    /// would be local send errors, which TCP does not retransmit).
    pub fn drop_segments_from(&self, sport: u16, percent: u32) -> anyhow::Result<()> {
        let rules = format!(
            "table inet socktrace_loss {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  tcp sport {sport} meta length > 120 numgen random mod 100 < {percent} drop\n }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("socktrace-loss-{}-{}.nft", self.name, monotonic_ns()));
        fs::write(&file, rules)?;
        let r = self.exec(&["nft", "-f", &file.to_string_lossy()]);
        let _ = fs::remove_file(&file);
        r.map(drop)
    }

    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("ip").args(["netns", "exec", &self.name]).args(args))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

#[derive(Clone, Debug)]
pub struct Counters(pub HashMap<String, i64>);

impl Counters {
    pub fn get(&self, key: &str) -> i64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    pub fn delta(&self, before: &Counters, key: &str) -> i64 {
        self.get(key) - before.get(key)
    }
}

/// A cgroup-v2 directory created for one scenario (the cgroup_skb hook is scoped to it), removed on
/// drop after moving any leftover processes back to the root.
pub struct Cgroup {
    pub path: PathBuf,
    root: PathBuf,
}

/// Where the cgroup-v2 hierarchy is mounted (`/sys/fs/cgroup`, or `…/unified` on a hybrid host):
/// socktrace's default cgroup for its cgroup_skb program.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo")?;
    mounts
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2").then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount")
}

impl Cgroup {
    pub fn new(tag: &str) -> anyhow::Result<Cgroup> {
        let root = cgroup2_root()?;
        let path = root.join(format!("socktrace-test-{tag}-{}", std::process::id()));
        let _ = fs::create_dir(&path);
        Ok(Cgroup { path, root })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// CLOCK_MONOTONIC in ns (the clock of socktrace's `ts_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The socktrace binary under test: `SOCKTRACE_BIN`, else the workspace's release build.
pub fn socktrace_bin() -> PathBuf {
    std::env::var_os("SOCKTRACE_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/socktrace"),
        PathBuf::from,
    )
}

/// Lines of a child's stream, collected on a thread.
type Lines = Arc<Mutex<Vec<String>>>;

fn collect(stream: impl std::io::Read + Send + 'static, notify: Option<(mpsc::Sender<()>, &'static str)>) -> Lines {
    let lines: Lines = Arc::default();
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if let Some((tx, needle)) = &notify {
                if line.contains(needle) {
                    let _ = tx.send(());
                }
            }
            sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line);
        }
    });
    lines
}

fn snapshot(lines: &Lines) -> Vec<String> {
    lines.lock().map(|l| l.clone()).unwrap_or_default()
}

/// Which stream announces readiness.
#[derive(Clone, Copy)]
pub enum ReadyOn {
    Stdout,
    Stderr,
}

/// A child process with its stdout and stderr collected line by line, started and waited for
/// until a readiness line appears; killed on drop.
pub struct Proc {
    child: Child,
    stdout: Lines,
    stderr: Lines,
}

impl Proc {
    pub fn start(cmd: &mut Command, ready: &'static str, on: ReadyOn) -> anyhow::Result<Proc> {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let (tx, rx) = mpsc::channel();
        let (out_note, err_note) = match on {
            ReadyOn::Stdout => (Some((tx, ready)), None),
            ReadyOn::Stderr => (None, Some((tx, ready))),
        };
        let stdout = collect(child.stdout.take().context("stdout")?, out_note);
        let stderr = collect(child.stderr.take().context("stderr")?, err_note);
        let proc = Proc { child, stdout, stderr };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            bail!("{cmd:?} never printed {ready:?}: {:?}", proc.stderr_lines());
        }
        Ok(proc)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(i32::try_from(self.child.id()).unwrap_or(0), sig) };
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        snapshot(&self.stdout)
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        snapshot(&self.stderr)
    }

    /// Waits (bounded) for a successful exit; the output readers get a moment to finish.
    pub fn wait(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("process did not finish within {limit:?}: {:?}", self.stderr_lines());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(100));
        if !status.success() {
            bail!("process exited with {status}: {:?}", self.stderr_lines());
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json_lines(lines: &[String]) -> anyhow::Result<Vec<Value>> {
    lines.iter().map(|l| serde_json::from_str(l).with_context(|| format!("bad JSON line {l:?}"))).collect()
}

/// A running `socktrace watch --json`, started and waited for until it says tracing began.
pub struct Watch(Proc);

impl Watch {
    pub fn start(args: &[&str]) -> anyhow::Result<Watch> {
        let mut cmd = Command::new(socktrace_bin());
        cmd.args(["watch", "--json"]).args(suite_hooks(args));
        Proc::start(&mut cmd, "tracing started", ReadyOn::Stderr).map(Watch)
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// Stops with SIGINT (as Ctrl-C) and returns every JSON record it printed.
    pub fn finish(self) -> anyhow::Result<Vec<Value>> {
        self.finish_with_stderr().map(|(r, _)| r)
    }

    /// Like [`Watch::finish`], also returning socktrace's stderr lines (its exit summary).
    pub fn finish_with_stderr(mut self) -> anyhow::Result<(Vec<Value>, Vec<String>)> {
        // Let in-flight events reach the ring buffer reader.
        std::thread::sleep(Duration::from_millis(300));
        self.0.signal(libc::SIGINT);
        self.0.wait(Duration::from_secs(20))?;
        Ok((json_lines(&self.0.stdout_lines())?, self.0.stderr_lines()))
    }
}

/// Events of one kind from a watch.
pub fn of_kind<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["kind"] == kind).collect()
}

/// `socktrace probes --json`: signal name → hook in use (None: unavailable).
pub fn probes(extra: &[&str]) -> anyhow::Result<HashMap<String, Option<String>>> {
    Ok(probes_attached(extra)?.into_iter().map(|(signal, (hook, _))| (signal, hook)).collect())
}

/// `socktrace probes --json`: per signal, the hook in use and its attach points.
pub fn probes_attached(extra: &[&str]) -> anyhow::Result<HashMap<String, (Option<String>, Vec<String>)>> {
    let out = run(Command::new(socktrace_bin()).arg("probes").arg("--json").args(suite_hooks(extra)))?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(v.as_array()
        .context("probes --json is not an array")?
        .iter()
        .map(|s| {
            let attached = s["attached"].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(str::to_owned)).collect();
            (s["signal"].as_str().unwrap_or("").to_owned(), (s["hook"].as_str().map(str::to_owned), attached))
        })
        .collect())
}

/// A running `st-scenario` process; its stdout is JSON lines.
pub struct Scenario(Proc);

impl Scenario {
    /// Starts `st-scenario ARGS` and waits for its `{"ready":…}` line.
    pub fn start(bin: &Path, args: &[String]) -> anyhow::Result<Scenario> {
        Proc::start(Command::new(bin).args(args), "\"ready\"", ReadyOn::Stdout).map(Scenario)
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// The JSON lines printed so far (the process may still run).
    pub fn lines(&self) -> Vec<Value> {
        self.0.stdout_lines().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// `ts_ns` of the `"event": "accept"` lines printed so far (a server's accepts).
    pub fn accept_times(&self) -> Vec<u64> {
        self.lines().iter().filter(|l| l["event"] == "accept").filter_map(|l| l["ts_ns"].as_u64()).collect()
    }

    /// Waits for exit (bounded) and returns its JSON lines.
    pub fn wait(mut self, limit: Duration) -> anyhow::Result<Vec<Value>> {
        self.0.wait(limit)?;
        json_lines(&self.0.stdout_lines())
    }
}

/// Minimal HTTP/1.1 GET over loopback (tests must not depend on an HTTP client crate's behaviour):
/// returns (status, body). Fails after `timeout`.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let sock: std::net::SocketAddr = addr.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// A running `socktrace serve`, stopped (SIGINT, then kill) on drop.
pub struct Serve {
    proc: Proc,
    pub addr: String,
}

impl Serve {
    /// Listens on the host's loopback at `port`, or, when another process holds it (the machine
    /// is shared: another checkout's suite may run the same test), at `port` + 100, + 200, ….
    pub fn start(port: u16, args: &[&str]) -> anyhow::Result<Serve> {
        let mut tried = Vec::new();
        for p in (0..5).filter_map(|k| port.checked_add(100 * k)) {
            let addr = format!("127.0.0.1:{p}");
            let mut cmd = Command::new(socktrace_bin());
            cmd.args(["serve", "--listen", &addr]).args(suite_hooks(args));
            match Proc::start(&mut cmd, "serving http://", ReadyOn::Stderr) {
                Ok(proc) => return Ok(Serve { proc, addr }),
                Err(e) if format!("{e:#}").contains("Address already in use") => tried.push(addr),
                Err(e) => return Err(e),
            }
        }
        bail!("socktrace serve: every port tried is in use: {tried:?}")
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.proc.signal(libc::SIGINT);
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Any socktrace command, started and waited for until `ready` appears on its stderr.
pub struct Socktrace(Proc);

impl Socktrace {
    pub fn start(args: &[&str], ready: &'static str) -> anyhow::Result<Socktrace> {
        let args = if args.first() == Some(&"snapshot") { args.iter().map(|a| (*a).to_owned()).collect() } else { suite_hooks(args) };
        Proc::start(Command::new(socktrace_bin()).args(args), ready, ReadyOn::Stderr).map(Socktrace)
    }

    /// Waits for it to exit by itself; returns stdout lines.
    pub fn wait(mut self, limit: Duration) -> anyhow::Result<Vec<String>> {
        self.0.wait(limit)?;
        Ok(self.0.stdout_lines())
    }
}

/// Two namespaces joined by a veth pair: `a` at 10.77.0.1/24, `b` at 10.77.0.2/24, with `b`'s
/// default route through `a`. Both are removed on drop.
pub fn veth_pair(tag: &str) -> anyhow::Result<(NetNs, NetNs)> {
    let a = NetNs::new(&format!("{tag}a"))?;
    let b = NetNs::new(&format!("{tag}b"))?;
    let (va, vb) = (format!("va{}", std::process::id() % 100_000), format!("vb{}", std::process::id() % 100_000));
    run(Command::new("ip").args(["-n", &b.name, "link", "add", &vb, "type", "veth", "peer", "name", &va, "netns", &a.name]))?;
    run(Command::new("ip").args(["-n", &a.name, "addr", "add", "10.77.0.1/24", "dev", &va]))?;
    run(Command::new("ip").args(["-n", &b.name, "addr", "add", "10.77.0.2/24", "dev", &vb]))?;
    run(Command::new("ip").args(["-n", &a.name, "link", "set", &va, "up"]))?;
    run(Command::new("ip").args(["-n", &b.name, "link", "set", &vb, "up"]))?;
    run(Command::new("ip").args(["-n", &b.name, "route", "add", "default", "via", "10.77.0.1"]))?;
    Ok((a, b))
}

// ---- Hook selection and expectations from the environment (the kernel matrix, `cargo xtask test --vm`).
// Unset, the suite behaves as before: every hook kind allowed, the host's expectations.

/// `args` of a tracing command with the suite's hook restriction applied: `SOCKTRACE_HOOKS` (a
/// `--hooks` list, e.g. `kprobe,tp_btf,raw_tp,tracepoint` to force fentry/fexit off) is appended,
/// or intersected with the test's own `--hooks` list (order of the test's list kept).
pub fn suite_hooks(args: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let Some(suite) = std::env::var("SOCKTRACE_HOOKS").ok().filter(|v| !v.trim().is_empty()) else {
        return out;
    };
    let allowed: Vec<&str> = suite.split(',').map(str::trim).collect();
    if let Some(i) = out.iter().position(|a| a == "--hooks") {
        if let Some(own) = out.get_mut(i + 1) {
            let both: Vec<&str> = own.split(',').map(str::trim).filter(|h| allowed.contains(h)).collect();
            *own = both.join(",");
        }
    } else {
        out.extend(["--hooks".to_owned(), suite.clone()]);
    }
    out
}

/// Asserts the hook `probes` reports for each signal named in the environment variable `var`
/// (`signal=hook,…`, e.g. `accept=fexit,listen_overflow=fentry,syn_drop=fentry`), or in `default`
/// when it is unset: a kernel that silently falls back to another hook fails the test.
///
/// # Panics
///
/// When a signal's hook differs from the expectation, or the expectation is malformed.
pub fn assert_expected_hooks<S: std::hash::BuildHasher>(hooks: &HashMap<String, Option<String>, S>, var: &str, default: &str) {
    let spec = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (signal, want) = pair.split_once('=').unwrap_or_else(|| panic!("{var}: {pair:?} is not signal=hook"));
        let got = hooks.get(signal).unwrap_or_else(|| panic!("{var}: probes reports no signal {signal:?}"));
        assert_eq!(got.as_deref(), Some(want), "{var}: hook for {signal} (probes: {hooks:?})");
    }
}

/// `SOCKTRACE_TIME_SCALE` (default 1), times the measured [`load_scale`]: the factor for the tests'
/// timing tolerances. The variable is for slow machines such as the emulated (TCG) guests of the
/// kernel matrix, where scheduling delays are ~10x longer; the load factor for other processes
/// competing for the CPUs (`cargo xtask test --stress`, a shared CI machine).
pub fn time_scale() -> i64 {
    let env = std::env::var("SOCKTRACE_TIME_SCALE").ok().and_then(|v| v.parse().ok()).filter(|&v| v >= 1).unwrap_or(1);
    env * load_scale()
}

/// How loaded the machine is, measured now (see [`Load::measure`]).
#[derive(Clone, Debug)]
pub struct Load {
    pub cpus: u32,
    /// 1-minute load average (runnable and uninterruptible tasks).
    pub loadavg1: f64,
    /// Tasks running or runnable right now (this one included).
    pub runnable: u32,
    /// 90th percentile of how late a 1 ms sleep woke up (ns), over [`WAKE_SAMPLES`] sleeps.
    pub wake_late_p90_ns: u64,
    /// Share of the last 10 s in which some task waited for a CPU (`/proc/pressure/cpu`).
    pub cpu_pressure: Option<f64>,
    /// Share of CPU time the hypervisor gave to others, over the measurement (`/proc/stat`).
    pub steal: Option<f64>,
}

/// Sleeps timed by [`Load::measure`].
pub const WAKE_SAMPLES: usize = 20;

/// Wake-up lateness of a 1 ms sleep that counts as one unit of load: an idle machine wakes
/// within ~0.1 ms, a tester competing with one busy task per CPU within a scheduler slice (~3 ms).
const WAKE_UNIT_NS: u64 = 2_000_000;

/// Upper bound of [`load_scale`]: beyond it a test's tolerances would no longer test anything;
/// such a machine fails the timing tests, with the load in the message.
pub const MAX_LOAD_SCALE: u8 = 10;

impl Load {
    /// Measures the load (about 25 ms): load average and run queue from `/proc/loadavg`, CPU
    /// pressure (for the record), steal time from `/proc/stat` around [`WAKE_SAMPLES`] sleeps of 1 ms.
    pub fn measure() -> Load {
        let cpus = std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1));
        let avg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut f = avg.split_whitespace();
        let loadavg1 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let runnable = f.nth(1).and_then(|rt| rt.split_once('/')).and_then(|(r, _)| r.parse().ok()).unwrap_or(1);
        let cpu_pressure = fs::read_to_string("/proc/pressure/cpu").ok().and_then(|t| {
            let some = t.lines().find(|l| l.starts_with("some "))?;
            some.split_whitespace().find_map(|kv| kv.strip_prefix("avg10=")).and_then(|v| v.parse::<f64>().ok()).map(|p| p / 100.0)
        });
        let before = cpu_ticks();
        let mut late: Vec<u64> = (0..WAKE_SAMPLES)
            .map(|_| {
                let t = Instant::now();
                std::thread::sleep(Duration::from_millis(1));
                u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX).saturating_sub(1_000_000)
            })
            .collect();
        late.sort_unstable();
        let wake_late_p90_ns = late[WAKE_SAMPLES * 9 / 10 - 1];
        let steal = before.zip(cpu_ticks()).and_then(|((t0, s0), (t1, s1))| {
            #[expect(clippy::cast_precision_loss, reason = "tick counts of a few ms")]
            (t1 > t0).then(|| (s1.saturating_sub(s0)) as f64 / (t1 - t0) as f64)
        });
        Load { cpus, loadavg1, runnable, wake_late_p90_ns, cpu_pressure, steal }
    }

    /// The factor (1..=[`MAX_LOAD_SCALE`]) by which work takes longer and wake-ups come later than
    /// on an idle machine: the most pessimistic of runnable tasks per CPU (now and over the last
    /// minute), wake-up lateness in units of [`WAKE_UNIT_NS`], and 1 / (share of time not
    /// stolen), rounded to the nearest integer. CPU pressure is printed but not a factor: its
    /// `some` share counts time in which any task waited, so it reads ~99 % as soon as one busy
    /// task more than there are CPUs runs (measured with the `--stress` hog), whatever the wait of
    /// the test's own tasks.
    pub fn scale(&self) -> i64 {
        let cpus = f64::from(self.cpus.max(1));
        let inverse = |share: Option<f64>| share.map_or(1.0, |s| 1.0 / (1.0 - s.clamp(0.0, 0.9)));
        #[expect(clippy::cast_precision_loss, reason = "ns lateness, far below 2^52")]
        let factors = [
            self.loadavg1 / cpus,
            f64::from(self.runnable) / cpus,
            self.wake_late_p90_ns as f64 / WAKE_UNIT_NS as f64,
            inverse(self.steal),
        ];
        let worst = factors.into_iter().fold(1.0_f64, f64::max).round();
        #[expect(clippy::cast_possible_truncation, reason = "clamped to 1..=MAX_LOAD_SCALE first")]
        let s = worst.clamp(1.0, f64::from(MAX_LOAD_SCALE)) as i64;
        s
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |v: Option<f64>| v.map_or_else(|| "unavailable".to_owned(), |v| format!("{:.0} %", v * 100.0));
        write!(
            f,
            "load scale {}: loadavg {:.2} on {} CPUs, {} runnable, 1 ms sleep woke {:.2} ms late (p90), CPU pressure {}, steal {}",
            self.scale(),
            self.loadavg1,
            self.cpus,
            self.runnable,
            Duration::from_nanos(self.wake_late_p90_ns).as_secs_f64() * 1e3,
            pct(self.cpu_pressure),
            pct(self.steal),
        )
    }
}

/// (all, steal) CPU ticks from the first line of `/proc/stat`.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    Some((ticks.iter().take(8).sum(), *ticks.get(7)?))
}

/// [`Load::scale`], printed when measured (a failing timing assertion shows the load it ran
/// under). The largest value this process measured in the last minute counts, since the scenario
/// being judged ran before the call; a measurement younger than 5 s is reused (assertions in a loop).
pub fn load_scale() -> i64 {
    // (when measured, scale): the latest measurement and the largest one of the last minute.
    static SEEN: Mutex<[Option<(Instant, i64)>; 2]> = Mutex::new([None, None]);
    let mut seen = SEEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let [latest, largest] = &mut *seen;
    if latest.is_none_or(|(at, _)| at.elapsed() >= Duration::from_secs(5)) {
        let load = Load::measure();
        eprintln!("{load}");
        let now = (Instant::now(), load.scale());
        *latest = Some(now);
        if largest.is_none_or(|(at, s)| s <= now.1 || at.elapsed() >= Duration::from_mins(1)) {
            *largest = Some(now);
        }
    }
    largest.map_or(1, |(_, s)| s)
}

/// Whether the kernel reports `recursion_misses` for process `pid`'s eBPF programs (Linux 5.12+,
/// in each program's fdinfo).
pub fn kernel_counts_recursion_misses(pid: u32) -> bool {
    fs::read_dir(format!("/proc/{pid}/fdinfo")).is_ok_and(|dir| {
        dir.flatten().any(|fd| {
            let text = fs::read_to_string(fd.path()).unwrap_or_default();
            text.contains("prog_id:") && text.contains("recursion_misses:")
        })
    })
}

/// Runs of process `pid`'s eBPF programs named `prefix…` that the kernel skipped because the same
/// program was already running on that CPU (a tracepoint hit nested in another, e.g. a softirq
/// retransmit interrupting one in process context): `bpf_prog_info.recursion_misses`, summed, via
/// `bpftool prog show`. The programs are found through the process's file descriptors.
pub fn recursion_misses(pid: u32, prefixes: &[&str]) -> anyhow::Result<i64> {
    let mut ids = std::collections::HashSet::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let text = fs::read_to_string(fd?.path()).unwrap_or_default();
        if let Some(id) = text.lines().find_map(|l| l.strip_prefix("prog_id:")) {
            ids.insert(id.trim().parse::<u64>()?);
        }
    }
    let v: Value = serde_json::from_str(&run(Command::new("bpftool").args(["prog", "show", "--json"]))?)?;
    Ok(v.as_array()
        .context("bpftool prog show --json is not an array")?
        .iter()
        .filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .filter(|p| prefixes.iter().any(|pre| p["name"].as_str().unwrap_or("").starts_with(pre)))
        .filter_map(|p| p["recursion_misses"].as_i64())
        .sum())
}

#[cfg(test)]
mod tests {
    use super::Load;

    fn idle() -> Load {
        Load { cpus: 2, loadavg1: 0.3, runnable: 1, wake_late_p90_ns: 80_000, cpu_pressure: Some(0.01), steal: Some(0.0) }
    }

    #[test]
    fn an_idle_machine_scales_by_one() {
        assert_eq!(idle().scale(), 1);
        assert_eq!(Load { cpu_pressure: None, steal: None, ..idle() }.scale(), 1);
    }

    #[test]
    fn the_worst_measure_sets_the_scale() {
        // Load average 16 on 2 CPUs (this machine with six other builds and a hog): 8.
        assert_eq!(Load { loadavg1: 16.0, ..idle() }.scale(), 8);
        assert_eq!(Load { runnable: 5, ..idle() }.scale(), 3);
        // A 1 ms sleep waking 7 ms late: 3.5 units of 2 ms, rounded.
        assert_eq!(Load { wake_late_p90_ns: 7_000_000, ..idle() }.scale(), 4);
        // Some task waiting for a CPU 99 % of the time says nothing about this one's wait.
        assert_eq!(Load { cpu_pressure: Some(0.99), ..idle() }.scale(), 1);
        assert_eq!(Load { steal: Some(0.5), ..idle() }.scale(), 2);
        assert_eq!(Load { loadavg1: 3.0, wake_late_p90_ns: 9_000_000, ..idle() }.scale(), 5);
    }

    #[test]
    fn the_scale_is_bounded() {
        assert_eq!(Load { loadavg1: 400.0, ..idle() }.scale(), i64::from(super::MAX_LOAD_SCALE));
        assert_eq!(Load { steal: Some(1.0), ..idle() }.scale(), i64::from(super::MAX_LOAD_SCALE));
    }

    #[test]
    fn a_measurement_is_plausible() {
        let l = Load::measure();
        assert!(l.cpus >= 1 && l.runnable >= 1 && l.loadavg1 >= 0.0, "{l}");
        assert!((1..=i64::from(super::MAX_LOAD_SCALE)).contains(&l.scale()), "{l}");
    }
}

/// How many drops a socktrace count may be short of the kernel's TcpExtListenOverflows delta
/// `kernel` on this kernel's hooks (cgroup_skb SYN hook, kfree_skb for 3rd-ACK and SYN-cookie ACK
/// overflows): 10 %, at least 2. Never over. Measured (2026-12-03, slow-listener test, about 1 run
/// in 10): 1 short of 170, 2 of 140/157/175, 6 of 184 in CI. In those runs the SYN side was exact
/// (the clients' SYN retransmissions, traced with bpftrace, equalled the `syn_drop` events) and
/// every kfree_skb the tracepoint showed with TCP_LISTEN_OVERFLOW or NO_SOCKET in
/// `cookie_v4_check` was an event: the kernel counted a few ACK-side overflows that no traced
/// drop shows. Not explained; README, "Hooks, chosen at run time". Under a heavy storm the
/// shortfall is larger: CI on 2026-12-03 counted 895 where the kernel counted 960 (6.8 %) in the
/// redis-benchmark somaxconn test, the SYN side matching the clients' SYN retransmits (611 vs 612)
/// and the 3rd-ACK side 284 of about 349. Hence 10 %.
pub fn drop_shortfall_allowed(kernel: i64) -> i64 {
    (kernel / 10).max(2)
}

/// `counted` drops against the kernel's `kernel`: never more, at most
/// [`drop_shortfall_allowed`] fewer.
pub fn assert_drops_near(what: &str, counted: i64, kernel: i64) {
    let allowed = drop_shortfall_allowed(kernel);
    assert!(counted <= kernel && kernel - counted <= allowed, "{what}: {counted} drops counted, kernel {kernel} (at most {allowed} fewer, never more)");
}

/// How many drops a count on kprobe hooks may be short of the kernel's: kprobe (and classic
/// tracepoint) programs share the per-CPU guard `bpf_prog_active`, and a run it skips is counted in
/// the program's `recursion_misses` only since Linux 6.7. There: 6 %, at least 3 (uncounted
/// skips, qemu matrix: up to 4.3 %). Before 6.7 the skips are invisible and their share follows the
/// timing: 17 of 120 (14 %) on 6.1 under TCG emulation in one CI run (2026-12-03) against 0–1 in the
/// others; 20 %, at least 3.
pub fn kprobe_shortfall_allowed(kernel: i64) -> i64 {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let percent = if version >= (6, 7) { 6 } else { 20 };
    (kernel * percent / 100).max(3)
}
