//! `cargo xtask test --vm`: the privileged integration tests on Debian kernels in qemu, so the hooks
//! this machine's kernel refuses (fentry/fexit, kprobes) are proven on real distribution kernels.
//!
//! Per kernel: the Debian package is fetched once into `<workspace>/.vm-cache` (`apt-get download`,
//! from another Debian release through private apt sources; `dpkg -x`); the host's release binaries
//! (`socktrace`, `st-scenario`, the `privileged` test binary) and the tools the tests call (ip, nft,
//! setpriv, bpftool, unshare) are copied with the shared
//! libraries `ldd` names, at their host paths, into a busybox initramfs together with the kernel
//! modules the tests need (decompressed, loaded in dependency order by `/init`). The guest runs
//! `socktrace probes` and the tests once per hook mode and prints one result marker per mode on the
//! serial console; the host streams the console, parses the markers and fails on a failed, missing
//! or timed-out run.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{setup, status, workspace};

/// A Debian kernel of the matrix.
pub struct Kernel {
    /// Name on the command line (`--kernel 6.1`).
    pub name: &'static str,
    /// Debian binary package (pinned: the cache key, and what `apt-get download` fetches).
    pub package: &'static str,
    /// Debian suite to fetch it from through a private apt sources list under `.vm-cache/apt/`
    /// (the host's own apt configuration is never touched); `None`: the host's apt sources.
    pub suite: Option<&'static str>,
    /// What `probes` must report in the guest, per hook mode (see [`Expect`]).
    pub fentry: Expect,
    pub kprobe: Expect,
}

/// `signal=hook,…` lists `probes` must report: a silent fallback to another hook fails the tests.
#[derive(Clone, Copy)]
pub struct Expect {
    /// `SOCKTRACE_EXPECT_HOOKS`: the tests on the suite's hooks.
    pub suite: &'static str,
    /// `SOCKTRACE_EXPECT_FALLBACK_HOOKS`: the fallback-hooks test (`--hooks raw_tp,tracepoint,
    /// cgroup_skb,kprobe,fentry,fexit`, intersected with the suite's hooks).
    pub fallback: &'static str,
}

/// Every hook kind allowed. None of the matrix kernels has `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW`
/// (5.10's `kfree_skb` tracepoint has no reason at all), so `listen_overflow` is on
/// `tcp_v{4,6}_syn_recv_sock`, never on `kfree_skb`.
const FENTRY: Expect = Expect {
    suite: "accept=fexit,accept_wait=socket,listen_overflow=fentry,syn_drop=fentry,retransmit=tp_btf,synack_retransmit=tp_btf,listen=tracepoint",
    fallback: "accept=fexit,accept_wait=raw_tp,listen_overflow=fentry,syn_drop=fentry,retransmit=raw_tp,synack_retransmit=raw_tp,listen=tracepoint",
};

/// fentry/fexit forced off: the kprobe + kretprobe pairs.
const KPROBE: Expect = Expect {
    suite: "accept=kprobe,accept_wait=socket,listen_overflow=kprobe,syn_drop=kprobe,retransmit=tp_btf,synack_retransmit=tp_btf,listen=tracepoint",
    fallback: "accept=kprobe,accept_wait=raw_tp,listen_overflow=kprobe,syn_drop=kprobe,retransmit=raw_tp,synack_retransmit=raw_tp,listen=tracepoint",
};

pub const KERNELS: &[Kernel] = &[
    // Debian 11's kernel: inet_csk_accept(sk, flags, err, kern); no bpf_get_func_ret (5.17), no
    // drop reasons, no BPF atomics with fetch (5.12), no recursion_misses counts (5.12).
    Kernel { name: "5.10", package: "linux-image-5.10.0-32-amd64", suite: Some("bullseye"), fentry: FENTRY, kprobe: KPROBE },
    // inet_csk_accept(sk, flags, err, kern): the 4-argument accept signature.
    Kernel { name: "6.1", package: "linux-image-6.1.0-50-amd64", suite: None, fentry: FENTRY, kprobe: KPROBE },
    // inet_csk_accept(sk, arg): the 2-argument signature (6.10+); kfree_skb has rx_sk.
    Kernel { name: "6.12", package: "linux-image-6.12.100+deb12-amd64", suite: None, fentry: FENTRY, kprobe: KPROBE },
];

impl Kernel {
    fn expect(&self, mode: HookMode) -> Expect {
        match mode {
            HookMode::Fentry => self.fentry,
            HookMode::Kprobe => self.kprobe,
        }
    }
}

/// Which hooks the suite may use in one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookMode {
    /// Every hook kind allowed: fentry/fexit must win where they are the best candidate.
    Fentry,
    /// fentry/fexit forced off: the kprobe/kretprobe candidates must win instead.
    Kprobe,
}

impl HookMode {
    pub fn name(self) -> &'static str {
        match self {
            HookMode::Fentry => "fentry",
            HookMode::Kprobe => "kprobe",
        }
    }

    /// `SOCKTRACE_HOOKS` for the whole suite (empty: every kind).
    fn suite_hooks(self) -> &'static str {
        match self {
            HookMode::Fentry => "",
            HookMode::Kprobe => "kprobe,tp_btf,raw_tp,tracepoint",
        }
    }
}

/// The subset of `tests/tests/privileged.rs` run in each VM (TCG is ~10x slower than the host):
/// accept latency, both overflow tests, retransmits, tracing without the kernel's BTF (hidden in a
/// private mount namespace, as on a kernel built without it), and the views of a signal left
/// without a hook (`--hooks tp_btf,raw_tp,tracepoint`: on these kernels both drop signals), and
/// `snapshot`'s one-dump listing of both families with owners from the task-file iterator.
const VM_TESTS: &[&str] = &[
    "accept_wait_matches_server_measurement",
    "slow_listener_overflows_match_kernel_counter",
    "slow_listener_overflows_on_raw_tracepoints",
    "retransmits_match_kernel_counter",
    "missing_kernel_btf_is_one_line_with_hint",
    "untraced_signals_are_unavailable_not_zero",
    "snapshot_lists_both_families_with_iterator_owners",
];

/// Kernel modules the tests need when the kernel builds them as modules: nftables loss injection
/// (`nf_tables`, `nft_numgen`), veth pairs, `sock_diag` for TCP.
const MODULES: &[&str] = &["nf_tables", "nft_numgen", "veth", "inet_diag", "tcp_diag"];

/// Host tools the tests run, copied with their libraries.
const TOOLS: &[&str] = &["ip", "nft", "setpriv", "bpftool", "unshare"];

/// Prints `inet_csk_accept`'s parameters from the guest kernel's BTF (4 before 6.10, 2 after: the
/// fexit program must work with both).
const ACCEPT_PROTO: &str = r#"echo "socktrace-vm: BTF $(bpftool btf dump file /sys/kernel/btf/vmlinux format raw | awk '/^\[/ { cur=""; if ($2=="FUNC_PROTO") { cur=substr($1,2,length($1)-2); p[cur]="" } } /^\t/ && cur!="" { split($1,a,"\047"); p[cur]=p[cur] " " a[2] } $2=="FUNC" && $3=="\047inet_csk_accept\047" { split($4,t,"="); print "inet_csk_accept(" p[t[2]] " )"; exit }')""#;

/// Hook kinds of a kernel that refuses fentry/fexit and has no kprobes (like this machine's).
const NO_FENTRY_KPROBE: &str = "tp_btf,raw_tp,tracepoint,cgroup_skb";

/// `SOCKTRACE_TIME_SCALE` in the guests: timing tolerances x10 under TCG emulation.
const TIME_SCALE: u32 = 10;

const MARK_BOOTED: &str = "SOCKTRACE-VM-BOOTED";
const MARK_MODE: &str = "SOCKTRACE-VM-MODE";
const MARK_RESULT: &str = "SOCKTRACE-VM-RESULT";
const MARK_DONE: &str = "SOCKTRACE-VM-DONE";

pub struct Options<'a> {
    pub kernels: Vec<&'static Kernel>,
    pub modes: Vec<HookMode>,
    /// Test-binary arguments instead of the default subset (e.g. other test names).
    pub test_args: &'a [String],
    /// Limit for one VM (boot, every mode, power-off).
    pub timeout: Duration,
}

/// Builds, then boots every requested kernel in turn; fails if any mode of any kernel failed.
pub fn test(opts: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::vm()?;
    crate::build()?;
    let bins = Binaries::find()?;
    let cache = workspace().join(".vm-cache");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let mut outcomes = Vec::new();
    for k in &opts.kernels {
        let tree = fetch_kernel(&cache, k)?;
        let initrd = initramfs(&cache, k, &tree, &bins, opts)?;
        outcomes.push(boot(&cache, k, &tree, &initrd, opts));
    }
    eprintln!("\nxtask: kernel matrix ({:.0} s in all)", started.elapsed().as_secs_f64());
    let mut failed = Vec::new();
    for (k, outcome) in opts.kernels.iter().zip(&outcomes) {
        match outcome {
            Ok(vm) => {
                eprintln!("  kernel {:<5} {:<24} booted in {:>4.0} s, {:>4.0} s in all", k.name, vm.release, vm.boot.as_secs_f64(), vm.total.as_secs_f64());
                for mode in &opts.modes {
                    match vm.results.get(mode.name()) {
                        Some((0, t)) => eprintln!("    hooks {:<7} PASS  {:>5.0} s", mode.name(), t.as_secs_f64()),
                        Some((rc, t)) => {
                            eprintln!("    hooks {:<7} FAIL  {:>5.0} s (test exit status {rc})", mode.name(), t.as_secs_f64());
                            failed.push(format!("{} {}: exit status {rc}", k.name, mode.name()));
                        }
                        None => {
                            eprintln!("    hooks {:<7} FAIL  no result marker", mode.name());
                            failed.push(format!("{} {}: no result", k.name, mode.name()));
                        }
                    }
                }
            }
            Err(e) => {
                eprintln!("  kernel {:<5} ERROR {e:#}", k.name);
                failed.push(format!("{}: {e:#}", k.name));
            }
        }
    }
    if !failed.is_empty() {
        bail!("kernel matrix failed: {}", failed.join("; "));
    }
    Ok(())
}

/// Host binaries that go into every guest, at their host paths.
struct Binaries {
    socktrace: PathBuf,
    scenario: PathBuf,
    privileged: PathBuf,
    tools: Vec<PathBuf>,
    busybox: PathBuf,
}

impl Binaries {
    fn find() -> anyhow::Result<Binaries> {
        let release = workspace().join("target/release");
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace())
            .args(["test", "--no-run", "--release", "-p", "socktrace-tests", "--test", "privileged", "--message-format=json"])
            .stderr(Stdio::inherit())
            .output()
            .context("building the privileged test binary")?;
        if !out.status.success() {
            bail!("cargo test --no-run failed with {}", out.status);
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let executable = |target: &str| {
            stdout
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == target)
                .find_map(|v| v["executable"].as_str().map(PathBuf::from))
                .with_context(|| format!("cargo test --no-run named no executable for {target}"))
        };
        // The test binary runs st-scenario by the absolute path cargo gave it at build time.
        let (privileged, scenario) = (executable("privileged")?, executable("st-scenario")?);
        let tools = TOOLS.iter().map(|t| which(t)).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Binaries {
            socktrace: release.join("socktrace"),
            scenario,
            privileged,
            tools,
            busybox: which("busybox")?,
        })
    }
}

fn which(name: &str) -> anyhow::Result<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} not found (cargo xtask setup installs it)"))
}

/// An unpacked kernel package.
struct KernelTree {
    release: String,
    vmlinuz: PathBuf,
    /// `lib/modules/<release>`.
    modules: PathBuf,
}

/// The unpacked package under `.vm-cache/<package>/`, downloading the .deb first if it is not cached.
fn fetch_kernel(cache: &Path, k: &Kernel) -> anyhow::Result<KernelTree> {
    let tree = cache.join(k.package);
    if !tree.join(".unpacked").exists() {
        let deb = if let Some(deb) = cached_deb(cache, k.package) {
            deb
        } else {
            match k.suite {
                Some(suite) => private_apt_download(cache, suite, k.package)?,
                None => setup::apt_download(k.package, cache)?,
            }
            cached_deb(cache, k.package).with_context(|| format!("apt-get download {} left no .deb in {}", k.package, cache.display()))?
        };
        eprintln!("xtask: unpacking {}", deb.display());
        let tmp = cache.join(format!("{}.partial", k.package));
        let _ = fs::remove_dir_all(&tmp);
        status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        fs::write(tmp.join(".unpacked"), "")?;
        let _ = fs::remove_dir_all(&tree);
        fs::rename(&tmp, &tree)?;
    }
    let modroot = tree.join("lib/modules");
    let release = fs::read_dir(&modroot)
        .with_context(|| format!("reading {}", modroot.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("no kernel release under {}", modroot.display()))?;
    let vmlinuz = tree.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{} is missing", vmlinuz.display());
    }
    Ok(KernelTree { modules: modroot.join(&release), release, vmlinuz })
}

/// `apt-get download PKG` from Debian suite `suite` (e.g. bullseye, not the host's) into `cache`,
/// through a sources list, package lists and apt cache of its own under `cache/apt/<suite>/`: the
/// host's apt configuration and state are neither read for sources nor changed.
fn private_apt_download(cache: &Path, suite: &str, package: &str) -> anyhow::Result<()> {
    let dir = cache.join("apt").join(suite);
    let lists = dir.join("lists");
    fs::create_dir_all(lists.join("partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let sources = dir.join("sources.list");
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    fs::write(
        &sources,
        format!(
            "deb [signed-by={keyring}] http://deb.debian.org/debian {suite} main\n\
             deb [signed-by={keyring}] http://deb.debian.org/debian-security {suite}-security main\n"
        ),
    )?;
    let opts = [
        format!("Dir::Etc::sourcelist={}", sources.display()),
        "Dir::Etc::sourceparts=-".to_owned(),
        format!("Dir::State::Lists={}", lists.display()),
        format!("Dir::Cache={}", dir.join("cache").display()),
        // The .deb lands in a root-owned directory the `_apt` user cannot write.
        "APT::Sandbox::User=root".to_owned(),
    ];
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(opts.iter().flat_map(|o| ["-o", o.as_str()])).args(args).current_dir(cache);
        c
    };
    eprintln!("xtask: downloading Debian {suite} package {package} into {} (private apt lists in {})", cache.display(), dir.display());
    let fresh = fs::read_dir(&lists)?.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().ends_with("_Packages"));
    if !fresh || status(&mut apt(&["download", "-q", package])).is_err() {
        status(&mut apt(&["update", "-q"])).with_context(|| format!("apt-get update for Debian {suite} (sources {})", sources.display()))?;
        status(&mut apt(&["download", "-q", package])).with_context(|| {
            format!("could not download {package} from Debian {suite}: see `apt-cache search linux-image-` with the same -o options and update KERNELS in xtask/src/vm.rs")
        })?;
    }
    Ok(())
}

/// `<package>_<version>_amd64.deb` in the cache (apt may write `+` as `%2b`).
fn cached_deb(cache: &Path, package: &str) -> Option<PathBuf> {
    let prefixes = [format!("{package}_"), format!("{}_", package.replace('+', "%2b"))];
    fs::read_dir(cache)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            p.extension().is_some_and(|e| e == "deb") && prefixes.iter().any(|pre| name.starts_with(pre.as_str()))
        })
}

/// Packs `.vm-cache/initramfs-<kernel>.gz` from scratch (a few seconds; the inputs change with
/// every build).
fn initramfs(cache: &Path, k: &Kernel, tree: &KernelTree, bins: &Binaries, opts: &Options) -> anyhow::Result<PathBuf> {
    let root = cache.join(format!("initramfs-{}", k.name));
    let _ = fs::remove_dir_all(&root);
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc", "root"] {
        fs::create_dir_all(root.join(d))?;
    }
    let mut elves: Vec<&Path> = vec![&bins.socktrace, &bins.scenario, &bins.privileged, &bins.busybox];
    elves.extend(bins.tools.iter().map(PathBuf::as_path));
    let mut libs = BTreeSet::new();
    for e in &elves {
        libs.extend(shared_libs(e)?);
    }
    for f in elves.iter().copied().chain(libs.iter().map(PathBuf::as_path)) {
        copy_into(&root, f, f)?;
    }
    // busybox is also the shell and the applets (linked at boot), and the kernel's modprobe helper.
    copy_into(&root, &bins.busybox, Path::new("/bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", root.join("bin/sh"))?;
    std::os::unix::fs::symlink("/bin/busybox", root.join("sbin/modprobe"))?;

    let order = modules(&root, tree)?;
    let init = init_script(k, bins, opts, &order);
    let init_path = root.join("init");
    fs::write(&init_path, init)?;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))?;

    let out = cache.join(format!("initramfs-{}.gz", k.name));
    let script = format!(
        "set -o pipefail; find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 > {}",
        sh_quote(&out.to_string_lossy())
    );
    status(Command::new("bash").arg("-c").arg(script).current_dir(&root)).context("packing the initramfs")?;
    let _ = fs::remove_dir_all(&root);
    let size = fs::metadata(&out).map_or(0, |m| m.len());
    eprintln!("xtask: {} ({} MiB, kernel {}, modules: {})", out.display(), size >> 20, tree.release, if order.is_empty() { "none".to_owned() } else { order.join(" ") });
    Ok(out)
}

/// Copies `src` to `root/<dest>`, following symlinks (libraries are usually symlinks).
fn copy_into(root: &Path, src: &Path, dest: &Path) -> anyhow::Result<()> {
    let to = root.join(dest.strip_prefix("/").unwrap_or(dest));
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(src, &to).with_context(|| format!("copying {} into the initramfs", src.display()))?;
    Ok(())
}

/// Shared libraries (and the ELF interpreter) of a binary, from `ldd`; none for a static binary.
fn shared_libs(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", bin.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        } else if line.contains("not found") {
            bail!("{}: {}", bin.display(), line.trim());
        }
    }
    Ok(libs)
}

/// Copies `MODULES` (those the kernel builds as modules) and their dependencies, decompressed, into
/// the initramfs with a `modules.dep` for busybox modprobe; returns them in load order.
fn modules(root: &Path, tree: &KernelTree) -> anyhow::Result<Vec<String>> {
    let builtin: BTreeSet<String> = fs::read_to_string(tree.modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let mut files = BTreeMap::new();
    index_modules(&tree.modules.join("kernel"), &mut files)?;
    let mut order: Vec<Module> = Vec::new();
    for name in MODULES {
        add_module(&module_name(name), &builtin, &files, &mut order, &mut Vec::new())?;
    }
    let dest = root.join("lib/modules").join(&tree.release);
    let mut dep = String::new();
    for (i, m) in order.iter().enumerate() {
        let to = dest.join(&m.rel);
        fs::create_dir_all(to.parent().context("module path")?)?;
        fs::write(&to, &m.image)?;
        // modules.dep lists every dependency, transitively; load order is this list's order.
        let deps: Vec<&str> = order[..i].iter().rev().filter(|d| m.needs.contains(&d.name)).map(|d| d.rel.as_str()).collect();
        let _ = writeln!(dep, "{}: {}", m.rel, deps.join(" "));
    }
    fs::create_dir_all(&dest)?;
    fs::write(dest.join("modules.dep"), dep)?;
    let load_order: String = order.iter().fold(String::new(), |mut acc, m| {
        let _ = writeln!(acc, "{}", m.rel);
        acc
    });
    fs::write(dest.join("load.order"), load_order)?;
    Ok(order.into_iter().map(|m| m.name).collect())
}

struct Module {
    name: String,
    /// Path under lib/modules/<release>, uncompressed (`kernel/net/netfilter/nf_tables.ko`).
    rel: String,
    image: Vec<u8>,
    /// Every module it needs, transitively.
    needs: BTreeSet<String>,
}

/// `nf-tables`, `kernel/net/netfilter/nf_tables.ko.xz` → `nf_tables`.
fn module_name(s: &str) -> String {
    let base = s.rsplit('/').next().unwrap_or(s);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

fn index_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            index_modules(&p, files)?;
        } else if p.to_string_lossy().contains(".ko") {
            files.insert(module_name(&p.to_string_lossy()), p);
        }
    }
    Ok(())
}

/// Depth-first: dependencies before the module itself. `stack` catches dependency cycles.
fn add_module(
    name: &str,
    builtin: &BTreeSet<String>,
    files: &BTreeMap<String, PathBuf>,
    order: &mut Vec<Module>,
    stack: &mut Vec<String>,
) -> anyhow::Result<BTreeSet<String>> {
    if builtin.contains(name) {
        return Ok(BTreeSet::new());
    }
    if let Some(m) = order.iter().find(|m| m.name == name) {
        let mut all = m.needs.clone();
        all.insert(m.name.clone());
        return Ok(all);
    }
    if stack.iter().any(|s| s == name) {
        bail!("module dependency cycle: {} -> {name}", stack.join(" -> "));
    }
    let path = files.get(name).with_context(|| format!("kernel module {name} is neither built in nor in the package"))?;
    let image = module_image(path)?;
    stack.push(name.to_owned());
    let mut needs = BTreeSet::new();
    for dep in modinfo_list(&image, "depends=", ',') {
        needs.extend(add_module(&dep, builtin, files, order, stack)?);
    }
    // `softdep=pre: crc32c`: usually a crypto algorithm, provided by `<name>_generic` (libcrc32c's
    // init fails without it). Soft: a name that resolves to nothing is skipped.
    for dep in modinfo_list(&image, "softdep=", ' ').into_iter().skip_while(|w| w != "pre:").skip(1).take_while(|w| !w.ends_with(':')) {
        if let Some(found) = [dep.clone(), format!("{dep}_generic")].into_iter().find(|n| builtin.contains(n) || files.contains_key(n)) {
            needs.extend(add_module(&found, builtin, files, order, stack)?);
        }
    }
    stack.pop();
    let modules_dir = path.ancestors().find(|a| a.file_name().is_some_and(|n| n == "kernel")).and_then(Path::parent).context("module outside kernel/")?;
    let rel = path.strip_prefix(modules_dir)?.to_string_lossy().into_owned();
    let rel = rel.strip_suffix(".xz").or_else(|| rel.strip_suffix(".zst")).unwrap_or(&rel).to_owned();
    let mut all = needs.clone();
    all.insert(name.to_owned());
    order.push(Module { name: name.to_owned(), rel, image, needs });
    Ok(all)
}

/// The module's ELF image, decompressed (busybox insmod and the kernel both take a plain .ko).
fn module_image(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return fs::read(path).with_context(|| format!("reading {name}"));
    };
    let out = Command::new(tool).arg("-dc").arg(path).output().with_context(|| format!("running {tool} -dc {name}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {name} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

/// The value of `key` (e.g. `depends=`) in the module's `.modinfo` section (NUL-separated
/// `key=value` strings), split at `sep`; module names normalised.
fn modinfo_list(image: &[u8], key: &str, sep: char) -> Vec<String> {
    let needle = [b"\0", key.as_bytes()].concat();
    image
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|at| {
            let rest = &image[at + needle.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).split(sep).filter(|s| !s.is_empty()).map(module_name).collect()
        })
        .unwrap_or_default()
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `/init`: mounts, modules, then per hook mode `socktrace probes` and the tests, each ending in a
/// result marker; powers off (an exit would panic the kernel, which with `panic=-1` and
/// `-no-reboot` also ends qemu).
fn init_script(k: &Kernel, bins: &Binaries, opts: &Options, modules: &[String]) -> String {
    let default_args: Vec<String> = VM_TESTS.iter().map(|t| (*t).to_owned()).chain(["--exact".to_owned(), "--nocapture".to_owned()]).collect();
    let test_args = if opts.test_args.is_empty() { &default_args } else { opts.test_args };
    let test_args: Vec<String> = test_args.iter().map(|a| sh_quote(a)).collect();
    let mut s = format!(
        r#"#!/bin/sh
# Generated by `cargo xtask test --vm` for kernel {kernel} (xtask/src/vm.rs).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec 0<>/dev/console 1>&0 2>&0
/bin/busybox --install -s /bin
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /run
mkdir -p /run/netns
# /tmp stays on the (writable) initramfs root: the binaries are at their host paths, which may be under /tmp.
chmod 1777 /tmp
ip link set lo up
kver=$(uname -r)
while read -r m; do
    insmod "/lib/modules/$kver/$m" || {{ echo "socktrace-vm: insmod $m failed"; dmesg | tail -5; }}
done < "/lib/modules/$kver/load.order"
echo "{booted} kernel=$kver modules={modules}"
{accept_proto}
export SOCKTRACE_BIN={socktrace} SOCKTRACE_REQUIRE_BPF=1 SOCKTRACE_TIME_SCALE={scale} RUST_BACKTRACE=1
cd /tmp
run_mode() {{
    echo "{mode} $1"
    export SOCKTRACE_HOOKS="$2" SOCKTRACE_EXPECT_HOOKS="$3" SOCKTRACE_EXPECT_FALLBACK_HOOKS="$4"
    echo "--- socktrace probes${{2:+ --hooks $2}} (kernel $kver)"
    "$SOCKTRACE_BIN" probes ${{2:+--hooks "$2"}}
    echo "--- privileged tests (SOCKTRACE_HOOKS=$2)"
    {privileged} --test-threads=1 {args}
    echo "{result} mode=$1 rc=$?"
}}
"#,
        kernel = k.name,
        accept_proto = ACCEPT_PROTO,
        scale = TIME_SCALE,
        booted = MARK_BOOTED,
        mode = MARK_MODE,
        result = MARK_RESULT,
        modules = if modules.is_empty() { "none".to_owned() } else { modules.join(",") },
        socktrace = sh_quote(&bins.socktrace.to_string_lossy()),
        privileged = sh_quote(&bins.privileged.to_string_lossy()),
        args = test_args.join(" "),
    );
    for m in &opts.modes {
        let e = k.expect(*m);
        let _ = writeln!(s, "run_mode {} {} {} {}", m.name(), sh_quote(m.suite_hooks()), sh_quote(e.suite), sh_quote(e.fallback));
    }
    // For the record (not asserted): what this kernel offers without fentry/fexit and kprobes, as on
    // a machine that refuses them; `untraced_signals_are_unavailable_not_zero` covers the views.
    let _ = writeln!(s, "echo '--- socktrace probes --hooks {NO_FENTRY_KPROBE} (kernel '\"$kver\"')'\n\"$SOCKTRACE_BIN\" probes --hooks {NO_FENTRY_KPROBE}");
    let _ = write!(s, "echo {MARK_DONE}\nsync\npoweroff -f\n");
    s
}

/// What one VM reported.
struct VmOutcome {
    release: String,
    boot: Duration,
    total: Duration,
    /// mode → (test exit status, time from its start marker to its result).
    results: BTreeMap<String, (i32, Duration)>,
}

/// Boots the kernel under TCG, streams its console (prefixed) and parses the markers. qemu is killed
/// if it outlives `opts.timeout`, or lingers after the guest said it is done.
fn boot(cache: &Path, k: &Kernel, tree: &KernelTree, initrd: &Path, opts: &Options) -> anyhow::Result<VmOutcome> {
    let log_path = cache.join(format!("console-{}.log", k.name));
    eprintln!("xtask: booting kernel {} ({}) in qemu (TCG), limit {} s; console log {}", k.name, tree.release, opts.timeout.as_secs(), log_path.display());
    let mut child = Command::new("nice")
        .args(["-n", "19", "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&tree.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>), child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>)].into_iter().flatten() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let line = printable(&String::from_utf8_lossy(&buf));
                buf.clear();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let mut log = String::new();
    let mut out = VmOutcome { release: tree.release.clone(), boot: Duration::ZERO, total: Duration::ZERO, results: BTreeMap::new() };
    let mut mode_start: Option<(String, Instant)> = None;
    let mut done_at: Option<Instant> = None;
    let mut timed_out = false;
    loop {
        let now = Instant::now();
        // After the done marker the guest only has to power off.
        let limit = done_at.map_or(deadline, |d| (d + Duration::from_mins(1)).min(deadline));
        if now >= limit {
            timed_out = done_at.is_none();
            break;
        }
        match rx.recv_timeout(limit - now) {
            Ok(line) => {
                eprintln!("[{}] {line}", k.name);
                log.push_str(&line);
                log.push('\n');
                let t = Instant::now();
                if line.contains(MARK_BOOTED) {
                    out.boot = t - start;
                } else if let Some(mode) = marker_value(&line, MARK_MODE) {
                    mode_start = Some((mode, t));
                } else if line.contains(MARK_RESULT) {
                    if let (Some(mode), Some(rc)) = (field(&line, "mode="), field(&line, "rc=").and_then(|r| r.parse().ok())) {
                        let took = mode_start.as_ref().filter(|(m, _)| *m == mode).map_or(Duration::ZERO, |(_, s)| t - *s);
                        out.results.insert(mode, (rc, took));
                    }
                } else if line.contains(MARK_DONE) {
                    done_at = Some(t);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if timed_out || done_at.is_some() {
        // Killing `nice` kills qemu: nice execs it.
        let _ = child.kill();
    }
    let st = child.wait()?;
    out.total = start.elapsed();
    let _ = fs::write(&log_path, &log);
    if timed_out {
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        bail!(
            "qemu for kernel {} did not finish within {} s and was killed (last console lines: {:?}; full log {})",
            k.name,
            opts.timeout.as_secs(),
            tail.into_iter().rev().collect::<Vec<_>>(),
            log_path.display()
        );
    }
    if done_at.is_none() && out.results.len() < opts.modes.len() {
        bail!("the guest stopped before reporting every hook mode (qemu {st}; log {})", log_path.display());
    }
    Ok(out)
}

/// A console line without its line end, terminal escape sequences (the firmware clears the screen)
/// and other control characters.
fn printable(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ params final-byte, or ESC + one character.
            if chars.next_if_eq(&'[').is_some() {
                while chars.next().is_some_and(|p| !p.is_ascii_alphabetic()) {}
            } else {
                chars.next();
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

/// `MARKER value` → value.
fn marker_value(line: &str, marker: &str) -> Option<String> {
    let at = line.find(marker)?;
    line[at + marker.len()..].split_whitespace().next().map(str::to_owned)
}

/// `… key=value …` → value.
fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_normalise() {
        assert_eq!(module_name("kernel/net/netfilter/nf_tables.ko.xz"), "nf_tables");
        assert_eq!(module_name("nf-tables"), "nf_tables");
        assert_eq!(module_name("kernel/drivers/net/veth.ko"), "veth");
    }

    #[test]
    fn modinfo_depends_parses() {
        let image = b"\x7fELF junk\0license=GPL\0depends=nfnetlink,libcrc32c\0intree=Y\0";
        assert_eq!(modinfo_list(image, "depends=", ','), vec!["nfnetlink", "libcrc32c"]);
        assert!(modinfo_list(b"\0depends=\0", "depends=", ',').is_empty());
        let soft = modinfo_list(b"\0softdep=pre: crc32c post: x\0", "softdep=", ' ');
        assert_eq!(soft, vec!["pre:", "crc32c", "post:", "x"]);
    }

    #[test]
    fn markers_parse() {
        let l = "[   12.3] SOCKTRACE-VM-RESULT mode=kprobe rc=101";
        assert_eq!(field(l, "mode=").as_deref(), Some("kprobe"));
        assert_eq!(field(l, "rc=").as_deref(), Some("101"));
        assert_eq!(marker_value("SOCKTRACE-VM-MODE fentry", MARK_MODE).as_deref(), Some("fentry"));
    }

    #[test]
    fn console_lines_lose_escapes() {
        assert_eq!(printable("\x1bc\x1b[?7l\x1b[2JSeaBIOS\r\n"), "SeaBIOS");
        assert_eq!(printable("a\tb\r\n"), "a\tb");
    }

    /// Every kernel names a hook for every signal in both modes (a signal left out would not be
    /// checked), and names are unique (`--kernel`).
    #[test]
    fn every_kernel_expects_every_signal() {
        let signals = ["accept", "accept_wait", "listen_overflow", "syn_drop", "retransmit", "synack_retransmit", "listen"];
        for k in KERNELS {
            assert_eq!(KERNELS.iter().filter(|o| o.name == k.name).count(), 1, "{}", k.name);
            for mode in [HookMode::Fentry, HookMode::Kprobe] {
                let e = k.expect(mode);
                for list in [e.suite, e.fallback] {
                    let named: Vec<&str> = list.split(',').filter_map(|p| p.split_once('=')).map(|(s, _)| s).collect();
                    assert_eq!(named, signals, "{} {}: {list}", k.name, mode.name());
                }
            }
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
