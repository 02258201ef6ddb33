//! Fresh-machine setup: detects what is missing and installs it, saying what and why.
//! Everything a developer or CI needs is installed from here, never by hand.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::status;

/// Debian packages the tests use: `ip netns` (iproute2), loss injection (nftables), program
/// listings (bpftool), `ss`/`nstat` ground truth (iproute2), `netstat` (net-tools), `setpriv`
/// (util-linux, for the not-root test), a real Prometheus server scraping `socktrace serve`, tmux to
/// drive the `top` TUI on a real terminal.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "/usr/sbin/ip"),
    ("nftables", "/usr/sbin/nft"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("net-tools", "/usr/bin/netstat"),
    ("util-linux", "/usr/bin/setpriv"),
    ("prometheus", "/usr/bin/prometheus"),
    ("tmux", "/usr/bin/tmux"),
    // `cargo xtask soak --flood`: the SYN flood over veth (`hping3 --flood --rand-source`).
    ("hping3", "/usr/sbin/hping3"),
    // `socktrace generate` tests: the man pages render, the completion scripts parse.
    ("groff-base", "/usr/bin/groff"),
    ("zsh", "/usr/bin/zsh"),
    ("fish", "/usr/bin/fish"),
];

/// Real servers and load generators of the field-trial suite (tests/tests/field.rs), which starts
/// each with its own config inside a test namespace. They must not run as system services: the
/// install goes through a temporary `policy-rc.d` that forbids starting them.
const SERVER_PACKAGES: &[(&str, &str)] = &[
    ("nginx-light", "/usr/sbin/nginx"),
    ("haproxy", "/usr/sbin/haproxy"),
    ("redis-server", "/usr/bin/redis-server"),
    ("redis-tools", "/usr/bin/redis-benchmark"),
    ("wrk", "/usr/bin/wrk"),
];

pub fn all() -> anyhow::Result<()> {
    build_deps()?;
    let missing = not_installed(TEST_PACKAGES);
    if !missing.is_empty() {
        apt_install(&missing, "test tools")?;
    }
    let servers = not_installed(SERVER_PACKAGES);
    if !servers.is_empty() {
        without_service_start(|| apt_install(&servers, "field trials: real servers and load generators, not started as services"))?;
    }
    Ok(())
}

/// The packages of `list` whose program is missing.
fn not_installed<'a>(list: &[(&'a str, &str)]) -> Vec<&'a str> {
    list.iter().filter(|(_, bin)| !std::path::Path::new(bin).exists()).map(|(pkg, _)| *pkg).collect()
}

/// Runs `f` with `/usr/sbin/policy-rc.d` answering 101 ("action forbidden"), which invoke-rc.d
/// and deb-systemd-invoke honour: packages installed meanwhile do not start their services. An
/// existing policy-rc.d is left as it is (it already decides) and ours is removed afterwards.
fn without_service_start(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    const POLICY: &str = "/usr/sbin/policy-rc.d";
    if std::path::Path::new(POLICY).exists() {
        return f();
    }
    let write = format!("printf '#!/bin/sh\\n# cargo xtask: start no services during this install\\nexit 101\\n' > {POLICY} && chmod 755 {POLICY}");
    status(&mut as_root(&["sh", "-c", &write])).context("writing a temporary policy-rc.d")?;
    let r = f();
    let removed = status(&mut as_root(&["rm", "-f", POLICY]));
    r.and(removed)
}

/// Debian packages `cargo xtask test --vm` uses on the host: qemu (TCG), a static busybox for the
/// guest's userland, cpio to pack the initramfs, xz to unpack compressed kernel modules.
const VM_PACKAGES: &[(&str, &[&str])] = &[
    ("qemu-system-x86", &["/usr/bin/qemu-system-x86_64"]),
    ("busybox-static", &["/bin/busybox", "/usr/bin/busybox"]),
    ("cpio", &["/usr/bin/cpio", "/bin/cpio"]),
    ("xz-utils", &["/usr/bin/xz", "/bin/xz"]),
];

/// Everything `all` installs, plus the VM packages.
pub fn vm() -> anyhow::Result<()> {
    all()?;
    let missing: Vec<&str> = VM_PACKAGES
        .iter()
        .filter(|(_, bins)| !bins.iter().any(|b| std::path::Path::new(b).exists()))
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing, "qemu kernel matrix: emulator, guest userland, initramfs packing")?;
    }
    Ok(())
}

/// `apt-get download PKG` into `dir` (no root needed); after a failure, refreshes the package
/// lists (root or sudo) and tries once more.
pub fn apt_download(pkg: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    eprintln!("xtask: downloading Debian package {pkg} into {}", dir.display());
    let download = || status(Command::new("apt-get").args(["download", "-q", pkg]).current_dir(dir));
    if download().is_ok() {
        return Ok(());
    }
    status(&mut apt(&["update", "-q"]))?;
    download().with_context(|| {
        format!("could not download {pkg}: Debian may have replaced this kernel ABI; see `apt-cache search linux-image-` and update KERNELS in xtask/src/vm.rs")
    })
}

/// Nightly rust-src (eBPF is built with -Z build-std=core) and bpf-linker on LLVM 22.
pub fn build_deps() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("rustup is needed (the eBPF crate builds on the nightly toolchain)")?;
    if !String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for the nightly toolchain (eBPF builds core from source)");
        status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    if bpf_linker().is_none() {
        if !std::path::Path::new("/usr/lib/llvm-22/lib").exists() {
            apt_install(&["llvm-22-dev"], "bpf-linker links against LLVM 22, the nightly's LLVM")?;
        }
        eprintln!("xtask: installing bpf-linker 0.13 built against LLVM 22 (about a minute)");
        status(
            Command::new("cargo")
                .args(["install", "bpf-linker", "--version", "^0.13", "--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }
    Ok(())
}

/// cargo-fuzz, pinned (it drives libFuzzer on the nightly toolchain), for `cargo xtask fuzz`.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// What `cargo xtask fuzz` needs: the nightly toolchain (already there for the eBPF build) and
/// cargo-fuzz at [`CARGO_FUZZ_VERSION`]. The targets build without `-Z build-std`, so rust-src is
/// not needed for them (`build_deps` installs it for the eBPF crate anyway).
pub fn fuzz_deps() -> anyhow::Result<()> {
    let version = Command::new("cargo").args(["+nightly", "fuzz", "--version"]).env_remove("RUSTUP_TOOLCHAIN").env_remove("CARGO").output();
    let have = version.as_ref().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if have.as_deref() == Some(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}")) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} from crates.io (found: {}; about a minute)",
        have.as_deref().unwrap_or("none")
    );
    status(Command::new("cargo").args(["install", "cargo-fuzz", "--version", &format!("={CARGO_FUZZ_VERSION}"), "--locked"]))
}

fn bpf_linker() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let p = home.join("bin/bpf-linker");
    if p.exists() {
        return Some(p);
    }
    let out = Command::new("which").arg("bpf-linker").output().ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// `apt-get ARGS`, through sudo for non-root users.
fn apt(args: &[&str]) -> Command {
    let mut c = as_root(&[&["apt-get"], args].concat());
    c.env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// `ARGV` as root: directly when root, else through `sudo -E`.
fn as_root(argv: &[&str]) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        let mut s = Command::new("sudo");
        s.arg("-E").args(argv);
        return s;
    }
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..]);
    c
}

pub fn apt_install(pkgs: &[&str], why: &str) -> anyhow::Result<()> {
    eprintln!("xtask: installing Debian packages {} ({why})", pkgs.join(" "));
    status(&mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q"]);
    install.args(pkgs);
    if let Err(e) = status(&mut install) {
        bail!("could not install {}: {e:#}", pkgs.join(" "));
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
