//! Builds the kernel programs (`socktrace-ebpf`) for the bpf target with the nightly toolchain and
//! bpf-linker, and leaves the object in `OUT_DIR` for `include_bytes_aligned!`. `AYA_BUILD_SKIP=1`
//! skips it (docs, clippy of userspace only); the agent then refuses to trace with a clear error.
//! Also sets `SOCKTRACE_VERSION` (package version and git commit) for `--version`.
#[path = "build/git_version.rs"]
mod git_version;

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let git = git_version::describe(std::path::Path::new("git"), &manifest_dir);
    // A commit or checkout changes HEAD/refs/index; an edit of our sources changes the dirty flag.
    let sources = [manifest_dir.clone(), manifest_dir.join("../socktrace-common")];
    for path in git.watch.iter().chain(&sources).filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rustc-env=SOCKTRACE_VERSION={} (commit {})", std::env::var("CARGO_PKG_VERSION")?, git.commit);
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "socktrace-ebpf")
        .ok_or_else(|| anyhow!("socktrace-ebpf package not found"))?;
    let cargo_metadata::Package { name, manifest_path, .. } = ebpf_package;
    let root_dir = manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
        .as_str();
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // Leave empty objects so include_bytes! still compiles.
        for object in ["socktrace", "socktrace-iter"] {
            let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join(object);
            if !out.exists() {
                std::fs::write(out, [])?;
            }
        }
    }
    aya_build::build_ebpf(
        [aya_build::Package { name: name.as_str(), root_dir, ..Default::default() }],
        Toolchain::default(),
    )
}
