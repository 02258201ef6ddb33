//! `cargo xtask fuzz [--seconds N] [--runs N] [--dev] [TARGET]`: the cargo-fuzz targets under `fuzz/` (one
//! per parser of outside input), built once with `cargo +nightly fuzz build` and each run for N
//! seconds; prints the executions each reached and fails on a crash, a panic or a hang, naming
//! the input libFuzzer saved. `cargo xtask test` runs every target briefly ([`CI_SECONDS`]).
//!
//! Corpora: libFuzzer reads `fuzz/target/corpus/TARGET` (its working corpus, grown by every run
//! on this machine, not committed), the committed seeds `fuzz/corpus/TARGET` and the inputs that
//! once failed, `fuzz/regressions/TARGET`; it writes new inputs only into the first.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{setup, workspace};

/// Every fuzz target, in the order they run (the `[[bin]]`s of fuzz/Cargo.toml).
pub const TARGETS: &[&str] = &["filter", "event", "sock_diag", "proc_net", "proc_pid", "kernel_text", "btf", "btf_scan", "http"];

/// Seconds per target in `cargo xtask test`.
pub const CI_SECONDS: u64 = 3;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Stop each target after this many executions instead (`--seconds` still caps the time).
    #[arg(long)]
    pub runs: Option<u64>,
    /// Unoptimised build (compiles faster, runs slower): what `cargo xtask test` uses.
    #[arg(long)]
    pub dev: bool,
    /// One target (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
}

/// What one target's run reached.
struct Outcome {
    target: &'static str,
    executions: Option<u64>,
    elapsed: Duration,
    /// The input libFuzzer saved when the target crashed, panicked or hung.
    failure: Option<String>,
    log: PathBuf,
}

pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    setup::fuzz_deps()?;
    let fuzz = workspace().join("fuzz");
    let targets: Vec<&'static str> = TARGETS.iter().copied().filter(|t| args.target.as_deref().is_none_or(|w| w == *t)).collect();
    let started = Instant::now();
    let mut build = cargo_fuzz_build(&fuzz, args.dev);
    if let [one] = targets[..] {
        build.arg(one);
    }
    crate::status(&mut build).context("building the fuzz targets")?;
    eprintln!("xtask: fuzz targets built in {:.0} s", started.elapsed().as_secs_f64());
    let logs = fuzz.join("target/logs");
    std::fs::create_dir_all(&logs)?;
    let mut outcomes = Vec::new();
    for target in targets {
        let o = run_one(&fuzz, &logs, target, args)?;
        eprintln!(
            "xtask: fuzz {target}: {} executions in {:.1} s{}",
            o.executions.map_or_else(|| "unknown".into(), |n| n.to_string()),
            o.elapsed.as_secs_f64(),
            o.failure.as_deref().map_or(String::new(), |f| format!(" — FAILED, input saved at {f}")),
        );
        outcomes.push(o);
    }
    println!("{:<12} {:>14} {:>9} {:>12}  result", "target", "executions", "seconds", "exec/s");
    for o in &outcomes {
        let secs = o.elapsed.as_secs_f64();
        #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
        let rate = o.executions.map_or_else(|| "-".into(), |n| format!("{:.0}", n as f64 / secs.max(0.001)));
        let n = o.executions.map_or_else(|| "unknown".into(), |n| n.to_string());
        let result = o.failure.as_deref().map_or_else(|| "ok".to_owned(), |f| format!("FAILED: {f} (log {})", o.log.display()));
        println!("{:<12} {n:>14} {secs:>9.1} {rate:>12}  {result}", o.target);
    }
    println!("total {:.0} s including the build", started.elapsed().as_secs_f64());
    let failed: Vec<&str> = outcomes.iter().filter(|o| o.failure.is_some()).map(|o| o.target).collect();
    if !failed.is_empty() {
        bail!("fuzz targets failed: {} (reproduce in fuzz/: cargo +nightly fuzz run -s none TARGET INPUT)", failed.join(", "));
    }
    Ok(())
}

/// `cargo +nightly fuzz build` in `fuzz/`, without the sanitizer (the targets are safe Rust apart
/// from two length-checked `read_unaligned`s; overflow checks and debug assertions stay on) and
/// without the nested eBPF build (the parsers need no kernel object).
fn cargo_fuzz_build(fuzz: &Path, dev: bool) -> Command {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz", "build", "--sanitizer", "none"]);
    if dev {
        c.arg("--dev");
    }
    c.current_dir(fuzz).env("AYA_BUILD_SKIP", "1");
    // `cargo xtask` runs under the stable toolchain; cargo-fuzz must find nightly's cargo and rustc.
    for var in ["CARGO", "RUSTC", "RUSTUP_TOOLCHAIN", "RUSTFLAGS", "CARGO_TARGET_DIR"] {
        c.env_remove(var);
    }
    c
}

/// Runs one target's binary (built by `cargo fuzz build`; running it directly spares a cargo
/// invocation per target, seconds on a loaded machine) with the arguments `cargo fuzz run` gives.
fn run_one(fuzz: &Path, logs: &Path, target: &'static str, args: &FuzzArgs) -> anyhow::Result<Outcome> {
    let work = fuzz.join("target/corpus").join(target);
    let artifacts = fuzz.join("artifacts").join(target);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&artifacts)?;
    let profile = if args.dev { "debug" } else { "release" };
    let mut cmd = Command::new(fuzz.join("target/x86_64-unknown-linux-gnu").join(profile).join(target));
    // RUST_LIB_BACKTRACE=0: no backtrace captured for every anyhow error btf-rs returns (most of
    // the `btf` target's time otherwise); panics still print theirs.
    cmd.current_dir(fuzz).env("RUST_LIB_BACKTRACE", "0").env("RUST_BACKTRACE", "1");
    cmd.arg(format!("-artifact_prefix={}/", artifacts.display()));
    // A hang is an input that takes more than 10 s.
    cmd.args([format!("-max_total_time={}", args.seconds), "-timeout=10".into(), "-print_final_stats=1".into()]);
    if let Some(n) = args.runs {
        cmd.arg(format!("-runs={n}"));
    }
    cmd.arg(&work);
    for dir in [fuzz.join("corpus").join(target), fuzz.join("regressions").join(target)] {
        if dir.is_dir() {
            cmd.arg(dir);
        }
    }
    let log = logs.join(format!("{target}.log"));
    let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdout(Stdio::from(file.try_clone()?)).stderr(Stdio::from(file));
    let t = Instant::now();
    let status = cmd.status().with_context(|| format!("running fuzz target {target}"))?;
    let elapsed = t.elapsed();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let executions = stat(&text, "stat::number_of_executed_units");
    let saved = text.lines().find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim().to_owned()));
    let failure = match (status.success(), saved) {
        (true, _) => None,
        (false, Some(p)) => Some(p),
        (false, None) => {
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            Some(format!("exit {status}, no input saved"))
        }
    };
    Ok(Outcome { target, executions, elapsed, failure, log })
}

/// A `-print_final_stats=1` line's value (`stat::number_of_executed_units: 123`).
fn stat(text: &str, name: &str) -> Option<u64> {
    text.lines().rev().find_map(|l| l.strip_prefix(name)?.trim_start_matches(':').trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TARGETS names exactly the fuzz package's binaries, each with its source, seeds and a
    /// regressions directory.
    #[test]
    fn targets_match_the_fuzz_package() {
        let fuzz = workspace().join("fuzz");
        let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
        let bins: Vec<&str> = manifest
            .split("[[bin]]")
            .skip(1)
            .filter_map(|b| b.lines().find_map(|l| l.trim().strip_prefix("name = ")).map(|n| n.trim_matches('"')))
            .collect();
        assert_eq!(bins, TARGETS);
        for t in TARGETS {
            assert!(fuzz.join(format!("fuzz_targets/{t}.rs")).is_file(), "{t}: no source");
            let seeds = std::fs::read_dir(fuzz.join("corpus").join(t)).map_or(0, Iterator::count);
            assert!(seeds >= 3, "{t}: {seeds} seed inputs");
        }
    }

    #[test]
    fn reads_libfuzzer_final_stats() {
        let text = "Done 2478830 runs in 361 second(s)\nstat::number_of_executed_units: 2478830\nstat::average_exec_per_sec:     6866\nstat::peak_rss_mb:              71\n";
        assert_eq!(stat(text, "stat::number_of_executed_units"), Some(2_478_830));
        assert_eq!(stat(text, "stat::peak_rss_mb"), Some(71));
        assert_eq!(stat("INFO: -max_total_time\n", "stat::number_of_executed_units"), None);
    }
}
