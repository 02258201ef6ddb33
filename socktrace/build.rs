//! Builds the kernel programs (`socktrace-ebpf`) for the bpf target with the nightly toolchain and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`. `AYA_BUILD_SKIP=1`
//! skips it (docs, clippy of userspace only); the agent then refuses to trace with a clear error.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
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
