//! `cargo xtask test --stress`: the timing-sensitive integration tests with a CPU hog on one core,
//! as on a loaded node. The hog is this xtask binary itself (`xtask hog --cpu N`, hidden): a busy
//! loop pinned with `sched_setaffinity`, killed by a guard when the run ends or fails, and by the
//! kernel (`PR_SET_PDEATHSIG`) when xtask dies without running the guard (Ctrl-C, kill).

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The integration test files whose assertions involve time (waits measured against the kernel,
/// observation windows, episode and stall detection, scrape deadlines). `filter`, `snapshot` and
/// `packages` compare listings and files, where load only makes them slower.
pub const TIMING_TESTS: &[&str] = &["privileged", "diagnose", "field", "past", "reuseport", "top", "serve"];

/// A running hog, killed on drop.
pub struct Hog {
    child: Child,
    cpu: usize,
}

impl Hog {
    /// Starts a busy loop pinned to `cpu` and checks that the kernel pinned it there.
    pub fn start(cpu: usize) -> anyhow::Result<Hog> {
        let ncpu = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        if cpu >= ncpu {
            bail!("--hog-cpu {cpu}: this machine has CPUs 0..{}", ncpu - 1);
        }
        let exe = std::env::current_exe().context("xtask's own path")?;
        let child = Command::new(exe)
            .args(["hog", "--cpu", &cpu.to_string(), "--parent", &std::process::id().to_string()])
            .stdin(Stdio::null())
            .spawn()
            .context("spawning the CPU hog")?;
        let hog = Hog { child, cpu };
        // The child pins itself first thing; wait until its affinity shows (bounded).
        let status = format!("/proc/{}/status", hog.child.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&status).unwrap_or_default();
            let allowed = text.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(str::trim);
            if allowed == Some(cpu.to_string().as_str()) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the CPU hog was not pinned to CPU {cpu} (Cpus_allowed_list {allowed:?})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("xtask: CPU hog pid {} busy on CPU {cpu}", hog.child.id());
        Ok(hog)
    }

    /// Busy-loop CPU time the hog got so far (user + system), from /proc/PID/stat.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        #[expect(clippy::cast_precision_loss, reason = "CPU ticks of one run, far below 2^52")]
        Some(ticks as f64 / hz.max(1) as f64)
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let cpu = self.cpu_seconds();
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("xtask: CPU hog on CPU {} stopped ({} s of CPU)", self.cpu, cpu.map_or_else(|| "?".into(), |s| format!("{s:.0}")));
    }
}

/// The hog process: dies with its parent, pins itself to `cpu`, then spins until killed.
pub fn hog(cpu: usize, parent: u32) -> anyhow::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number has no memory effects.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        bail!("prctl(PR_SET_PDEATHSIG): {}", std::io::Error::last_os_error());
    }
    // The parent may have died before the prctl: then nobody would kill us.
    // SAFETY: no preconditions.
    if u32::try_from(unsafe { libc::getppid() }).ok() != Some(parent) {
        return Ok(());
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below the number of CPUs (checked by the parent), within cpu_set_t's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: valid set of the size passed; pid 0 is this thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) } != 0 {
        bail!("sched_setaffinity(CPU {cpu}): {}", std::io::Error::last_os_error());
    }
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
    }
}

/// Runs `tests` (integration test files of socktrace-tests, `FILE` or `FILE:NAME` for the tests of
/// FILE whose name contains NAME) one at a time with a hog on `cpu`; `args` go to each test binary. Every file runs even after a failure; the
/// failures are listed at the end.
pub fn run(cpu: usize, tests: &[String], args: &[String]) -> anyhow::Result<()> {
    crate::build()?;
    // Build the test binaries before the hog starts: the hog is for the tests, not the compiler.
    // `FILE:NAME` runs only the tests of FILE whose name contains NAME.
    let tests: Vec<(&str, Option<&str>)> = tests.iter().map(|t| t.split_once(':').map_or((t.as_str(), None), |(f, n)| (f, Some(n)))).collect();
    let mut build = crate::cargo();
    build.args(["test", "--release", "-p", "socktrace-tests", "--no-run"]);
    for (t, _) in &tests {
        build.args(["--test", t]);
    }
    crate::status(&mut build)?;
    let bin = crate::workspace().join("target/release/socktrace");
    let hog = Hog::start(cpu)?;
    let started = Instant::now();
    let mut failed = Vec::new();
    for &(t, name) in &tests {
        let t0 = Instant::now();
        let mut cmd = crate::cargo();
        cmd.args(["test", "--release", "-p", "socktrace-tests", "--test", t, "--", "--test-threads=1"]).args(name).args(args);
        cmd.env("SOCKTRACE_BIN", &bin);
        let ok = cmd.status().with_context(|| format!("spawning {cmd:?}"))?.success();
        eprintln!("xtask: stress {t}: {} in {:.0} s", if ok { "ok" } else { "FAILED" }, t0.elapsed().as_secs_f64());
        if !ok {
            failed.push(t);
        }
    }
    eprintln!("xtask: stress pass took {:.0} s", started.elapsed().as_secs_f64());
    drop(hog);
    if !failed.is_empty() {
        bail!("with a CPU hog on CPU {cpu}, these test files failed: {}", failed.join(", "));
    }
    Ok(())
}
