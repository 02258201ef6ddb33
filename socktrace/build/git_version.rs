//! The git commit a build comes from, for `socktrace --version`: `git rev-parse --short HEAD`, with
//! `-dirty` when tracked files differ from it, or `unknown` when git or the repository is missing
//! (a source tarball, a build without git). Never an error: a version string must not stop a build.
//! Used by build.rs; xtask includes it too, to test the `unknown` paths.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// What `--version` shows after the package version.
pub struct GitVersion {
    /// `abc1234`, `abc1234-dirty` or `unknown`.
    pub commit: String,
    /// Files whose change can change `commit` (for `cargo:rerun-if-changed`); empty when unknown.
    pub watch: Vec<PathBuf>,
}

/// Describes the checkout `dir` is in with the `git` program given (normally `"git"`).
pub fn describe(git: &Path, dir: &Path) -> GitVersion {
    let run = |args: &[&str]| -> Option<String> {
        let out = Command::new(git).args(args).current_dir(dir).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let Some(short) = run(&["rev-parse", "--short", "HEAD"]).filter(|s| !s.is_empty()) else {
        return GitVersion { commit: "unknown".into(), watch: Vec::new() };
    };
    // Tracked files only: build outputs and editor files are not a different source.
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"]).is_none_or(|s| !s.is_empty());
    let mut watch = Vec::new();
    let mut git_path = |p: &str| {
        if let Some(path) = run(&["rev-parse", "--path-format=absolute", "--git-path", p]) {
            watch.push(PathBuf::from(path));
        }
    };
    git_path("HEAD");
    git_path("index");
    git_path("packed-refs");
    if let Some(branch) = run(&["symbolic-ref", "-q", "HEAD"]) {
        git_path(&branch);
    }
    GitVersion { commit: if dirty { format!("{short}-dirty") } else { short }, watch }
}
