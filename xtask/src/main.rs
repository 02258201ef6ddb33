//! Project tasks, run as `cargo xtask <task>`:
//!
//! - `setup`: installs what is missing for building and testing (nightly rust-src, LLVM 22 +
//!   bpf-linker, iproute2/nftables/bpftool/… for tests) and says what it installs;
//! - `build`: setup + release build of the agent (the eBPF object is built by socktrace/build.rs);
//! - `run -- ARGS`: build, then run `socktrace ARGS`;
//! - `test`: setup + every test: unit tests, then the privileged integration tests (one netns per
//!   scenario, `--test-threads=1`); with `SOCKTRACE_REQUIRE_BPF=1` an eBPF test that would skip fails;
//! - `bench [accept|pipeline|agent|snapshot|nginx|syscalls|all]`: build, then the overhead benchmarks (see
//!   `bench/`), which print tables and rewrite docs/BENCHMARKS.md.
//! - `test --stress [--hog-cpu N] [--files A,B:NAME]`: instead, the timing-sensitive integration tests with a
//!   CPU hog busy on one core (see `stress.rs`).
//! - `test --vm [--kernel 5.10|6.1|6.12|all] [--hooks fentry|kprobe|both]`: instead, the privileged tests
//!   inside qemu on Debian kernels, once per hook mode (see `vm.rs`).
//! - `fuzz [--seconds N] [--dev] [TARGET]`: installs cargo-fuzz if missing, then runs each fuzz
//!   target of `fuzz/` for N seconds and fails on a crash (see `fuzz.rs`);
//! - `deb`, `static`, `image`, `test-packages`: the Debian package, the static binary, the OCI
//!   image, and the tests of all three (see `package.rs`).
//! - `soak [--minutes N]` / `soak --flood [--seconds N]`: build, then the churn soak or the SYN flood
//!   with pass/fail checks (see `soak.rs`).

mod bench;
mod bench_snapshot;
mod fuzz;
mod package;
mod setup;
mod soak;
mod stress;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "socktrace project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing toolchain pieces and test packages.
    Setup,
    /// Build the agent (and its eBPF object) in release mode.
    Build,
    /// Build, then run socktrace with the given arguments (e.g. `cargo xtask run -- watch`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests and the privileged eBPF integration tests.
    Test {
        /// Run the privileged tests in qemu on Debian kernels (the kernel matrix) instead.
        #[arg(long, conflicts_with = "stress")]
        vm: bool,
        /// Run the timing-sensitive integration tests with a CPU hog busy on one core instead.
        #[arg(long)]
        stress: bool,
        /// CPU the hog is pinned to (with --stress; default: the last CPU).
        #[arg(long, requires = "stress")]
        hog_cpu: Option<usize>,
        /// Integration test files to run under the hog (with --stress); `FILE:NAME` runs FILE's tests
        /// whose name contains NAME.
        #[arg(long, value_delimiter = ',', requires = "stress", default_values_t = stress::TIMING_TESTS.iter().map(|s| (*s).to_owned()))]
        files: Vec<String>,
        /// Kernel(s) of the matrix (with --vm).
        #[arg(long, value_enum, default_value = "all", requires = "vm")]
        kernel: KernelArg,
        /// Hook mode(s): fentry = every hook allowed; kprobe = fentry/fexit forced off (with --vm).
        #[arg(long, value_enum, default_value = "both", requires = "vm")]
        hooks: HooksArg,
        /// Seconds one VM may run (boot, every hook mode, power-off) before it is killed (with --vm).
        #[arg(long, default_value_t = 1800, requires = "vm")]
        vm_timeout: u64,
        /// Extra arguments for the integration test binary (e.g. a test name filter); with --vm they
        /// replace the default subset of `privileged` tests.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The CPU hog of `test --stress` (spawned by xtask itself).
    #[command(hide = true)]
    Hog {
        #[arg(long)]
        cpu: usize,
        /// Pid of the xtask that must be alive (the hog dies with it).
        #[arg(long)]
        parent: u32,
    },
    /// Overhead benchmarks (root): tables on stdout and docs/BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Churn soak of serve and top, or (--flood) a SYN flood against serve (root): checks, docs/BENCHMARKS.md.
    Soak(soak::SoakArgs),
    /// Run the cargo-fuzz targets (fuzz/) for a while each; fails on a crash, panic or hang.
    Fuzz(fuzz::FuzzArgs),
    /// Debian package target/debian/socktrace_<version>_amd64.deb (cargo-deb).
    Deb,
    /// Static binary (x86_64-unknown-linux-musl, eBPF object embedded).
    Static,
    /// OCI image localhost/socktrace:<version> from Containerfile (podman).
    Image,
    /// Build the package, static binary and image, then test them (installs, removes, inspects).
    TestPackages {
        /// Extra arguments for the test binary (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KernelArg {
    #[value(name = "5.10")]
    V5_10,
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum HooksArg {
    Fentry,
    Kprobe,
    Both,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::all(),
        Task::Build => setup::build_deps().and_then(|()| build()),
        Task::Run { args } => setup::build_deps().and_then(|()| build()).and_then(|()| run(&args)),
        Task::Test { vm: false, stress: false, args, .. } => setup::all().and_then(|()| test(&args)),
        Task::Test { vm: false, stress: true, hog_cpu, files, args, .. } => setup::all().and_then(|()| {
            let last = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) - 1;
            stress::run(hog_cpu.unwrap_or(last), &files, &args)
        }),
        Task::Hog { cpu, parent } => stress::hog(cpu, parent),
        Task::Bench(args) => setup::all().and_then(|()| build()).and_then(|()| bench::run(&args)),
        Task::Soak(args) => setup::all().and_then(|()| build()).and_then(|()| soak::run(&args)),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Deb => package::deb().map(drop),
        Task::Static => package::static_binary().map(drop),
        Task::Image => package::image().map(drop),
        Task::TestPackages { args } => package::test_packages(&args),
        Task::Test { vm: true, kernel, hooks, vm_timeout, args, .. } => vm::test(&vm::Options {
            kernels: vm::KERNELS
                .iter()
                .filter(|k| match kernel {
                    KernelArg::V5_10 => k.name == "5.10",
                    KernelArg::V6_1 => k.name == "6.1",
                    KernelArg::V6_12 => k.name == "6.12",
                    KernelArg::All => true,
                })
                .collect(),
            modes: match hooks {
                HooksArg::Fentry => vec![vm::HookMode::Fentry],
                HooksArg::Kprobe => vec![vm::HookMode::Kprobe],
                HooksArg::Both => vec![vm::HookMode::Fentry, vm::HookMode::Kprobe],
            },
            test_args: &args,
            timeout: std::time::Duration::from_secs(vm_timeout),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace());
    c
}

pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    status(cargo().args(["build", "--release", "-p", "socktrace", "-p", "socktrace-tests", "--bins"]))
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let bin = workspace().join("target/release/socktrace");
    let st = Command::new(&bin).args(args).status().with_context(|| format!("running {}", bin.display()))?;
    if !st.success() {
        bail!("socktrace exited with {st}");
    }
    Ok(())
}

fn test(args: &[String]) -> anyhow::Result<()> {
    build()?;
    // Unit tests of every host crate (release profile: shares the build above). Not --workspace:
    // socktrace-ebpf only builds for the bpf target.
    status(cargo().args([
        "test", "--release", "-p", "socktrace-common", "-p", "socktrace", "-p", "xtask", "-p", "socktrace-tests", "--lib", "--bins",
    ]))?;
    // Every fuzz target briefly (the corpora and the inputs that once failed): a parser that
    // panics or hangs on outside input fails here. Unoptimised: the build is most of the time.
    if args.is_empty() {
        fuzz::run(&fuzz::FuzzArgs { seconds: fuzz::CI_SECONDS, runs: None, dev: true, target: None })?;
    }
    // Privileged integration tests, one at a time (kernel state is shared).
    let bin = workspace().join("target/release/socktrace");
    let mut cmd = cargo();
    cmd.args(["test", "--release", "-p", "socktrace-tests", "--tests", "--", "--test-threads=1"]).args(args);
    cmd.env("SOCKTRACE_BIN", &bin);
    status(&mut cmd)?;
    // The Debian package, the static binary and the OCI image: built, then checked (the README's
    // one test command runs every test; a test-name filter runs just the matching ones above).
    if args.is_empty() {
        package::test_packages(&[])?;
    }
    Ok(())
}
