//! Shipping socktrace. Always run: `--version` names the commit the binary was built from, the
//! `generate` output is valid (bash/zsh/fish parse the completions and bash/fish complete with them,
//! groff renders every man page without a warning), and the `DaemonSet` and systemd unit grant exactly
//! the capabilities the README's Install section justifies.
//!
//! `#[ignore]`d, run by `cargo xtask test-packages`, which builds what they check and passes its
//! paths: the Debian package (`SOCKTRACE_DEB`: contents and control fields, the binary runs after
//! `dpkg-deb -x`, `dpkg -i`/`dpkg -r` install and remove it and leave the machine as it was), the
//! static binary (`SOCKTRACE_STATIC_BIN`) and the OCI image (`SOCKTRACE_IMAGE`).

use std::{
    collections::BTreeSet,
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use serde_json::Value;
use socktrace_tests::{privileged, socktrace_bin};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
}

/// stdout of a command that must succeed.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn version_of(bin: &Path) -> String {
    ok(Command::new(bin).arg("--version")).trim().to_owned()
}

fn env_path(var: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(var).unwrap_or_else(|| panic!("{var} is not set: run `cargo xtask test-packages`")))
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("st-pkg-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The commands `socktrace --help` lists (without `help`).
fn subcommands() -> Vec<String> {
    let help = ok(Command::new(socktrace_bin()).arg("--help"));
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 6 && names.iter().any(|n| n == "generate"), "commands in --help: {names:?}");
    names
}

#[test]
fn version_names_the_commit() {
    let line = version_of(&socktrace_bin());
    let prefix = format!("socktrace {VERSION} (commit ");
    assert!(line.starts_with(&prefix) && line.ends_with(')'), "{line:?}");
    let commit = &line[prefix.len()..line.len() - 1];
    let head = Command::new("git").args(["rev-parse", "HEAD"]).current_dir(workspace()).output();
    match head {
        Ok(o) if o.status.success() => {
            let head = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            let short = commit.strip_suffix("-dirty").unwrap_or(commit);
            assert!(short.len() >= 7 && head.starts_with(short), "--version says {commit}, HEAD is {head}");
        }
        // Built from a tree without git or without .git: the build says so instead of failing.
        _ => assert_eq!(commit, "unknown"),
    }
}

fn generate(args: &[&str]) -> String {
    let text = ok(Command::new(socktrace_bin()).arg("generate").args(args));
    assert!(!text.trim().is_empty(), "generate {args:?} printed nothing");
    text
}

#[test]
fn completions_parse_and_complete() {
    let dir = TempDir::new("completions");
    let names = subcommands();
    for (shell, file, check) in [
        ("bash", "socktrace.bash", &["bash", "-n"][..]),
        ("zsh", "_socktrace", &["zsh", "-n"][..]),
        ("fish", "socktrace.fish", &["fish", "--no-execute"][..]),
    ] {
        let text = generate(&[shell]);
        for n in &names {
            assert!(text.contains(n.as_str()), "{shell} completion does not mention {n}");
        }
        let path = dir.0.join(file);
        fs::write(&path, &text).unwrap();
        let out = run(Command::new(check[0]).args(&check[1..]).arg(&path));
        assert!(out.status.success() && out.stderr.is_empty(), "{check:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // bash: what the completion function offers for `socktrace wa<TAB>` and `socktrace watch --js<TAB>`.
    let bash = dir.0.join("socktrace.bash");
    let complete = |words: &str| {
        let script = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; _socktrace socktrace \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            bash.display()
        );
        ok(Command::new("bash").arg("-c").arg(script))
    };
    assert_eq!(complete("socktrace wa").split_whitespace().collect::<Vec<_>>(), ["watch"]);
    assert_eq!(complete("socktrace watch --js").split_whitespace().collect::<Vec<_>>(), ["--json"]);
    let all: BTreeSet<String> = complete("socktrace ''").split_whitespace().map(str::to_owned).collect();
    for n in &names {
        assert!(all.contains(n), "bash offers {all:?}, not {n}");
    }
    // fish: the same question through fish's own completion engine.
    let fish = ok(Command::new("fish").arg("-c").arg(format!("source {}; complete -C 'socktrace wa'", dir.0.join("socktrace.fish").display())));
    assert!(fish.lines().any(|l| l.split('\t').next() == Some("watch")), "fish completes `socktrace wa` to {fish:?}");
}

/// groff with every warning on: no output on stderr, and the text has the expected sections.
fn render_man(roff: &str) -> String {
    let dir = TempDir::new("man");
    let page = dir.0.join("page.1");
    fs::write(&page, roff).unwrap();
    let out = run(Command::new("groff").args(["-man", "-Tutf8", "-ww", "-P-cbou"]).arg(&page));
    assert!(out.status.success() && out.stderr.is_empty(), "groff: {}", String::from_utf8_lossy(&out.stderr));
    // Bold and underline are off (-P-cbou): what remains is the text a reader sees.
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Rendered text with runs of white space (justification, line breaks) as one space.
fn flat(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn man_pages_render() {
    let names = subcommands();
    let top = render_man(&generate(&["man"]));
    for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "SUBCOMMANDS", "VERSION"] {
        assert!(top.lines().any(|l| l.trim() == section), "socktrace(1) has no {section}:\n{top}");
    }
    let top = flat(&top);
    assert!(top.contains(&format!("socktrace {VERSION} (commit ")), "socktrace(1) does not name the version:\n{top}");
    for n in &names {
        assert!(top.contains(&format!("socktrace-{n}(1)")), "socktrace(1) does not list socktrace-{n}(1)");
        let page = flat(&render_man(&generate(&["man", n])));
        assert!(page.contains(&format!("NAME socktrace-{n} - ")), "socktrace-{n}(1) NAME:\n{page}");
        assert!(page.contains(&format!("SYNOPSIS socktrace {n}")), "socktrace-{n}(1) SYNOPSIS:\n{page}");
    }
    // `watch`'s page documents its options (flattened groups included).
    let watch = render_man(&generate(&["man", "watch"]));
    for opt in ["--json", "--duration", "--btf", "--hooks", "--port"] {
        assert!(watch.contains(opt), "socktrace-watch(1) lacks {opt}");
    }
    // Not a command: a one-line usage error.
    let out = run(Command::new(socktrace_bin()).args(["generate", "man", "nosuch"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("nosuch"), "{err}");
}

/// The capabilities the README's Install section justifies, one table row each (`| CAP_X | why |`).
fn readme_capabilities() -> BTreeSet<String> {
    let readme = fs::read_to_string(workspace().join("README.md")).unwrap();
    let install = readme.split("\n## Install").nth(1).expect("README has an Install section");
    let install = install.split("\n## ").next().unwrap_or(install);
    let caps: BTreeSet<String> = install
        .lines()
        .filter_map(|l| l.strip_prefix("| `CAP_"))
        .filter_map(|l| {
            let (name, why) = l.split_once("` |")?;
            assert!(why.trim().trim_end_matches('|').trim().len() > 20, "CAP_{name} is not justified: {l}");
            Some(format!("CAP_{name}"))
        })
        .collect();
    assert!(caps.len() >= 3, "no capability table in the README's Install section: {caps:?}");
    caps
}

fn yaml_strings(v: &yaml_rust2::Yaml) -> Vec<String> {
    v.as_vec().map(|l| l.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

#[test]
fn deploy_grants_what_the_readme_justifies() {
    let caps = readme_capabilities();

    let text = fs::read_to_string(workspace().join("deploy/daemonset.yaml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).expect("deploy/daemonset.yaml is YAML");
    assert_eq!(docs.len(), 1);
    let ds = &docs[0];
    assert_eq!(ds["kind"].as_str(), Some("DaemonSet"));
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"].as_bool(), Some(true));
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    let containers = pod["containers"].as_vec().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    // The image `cargo xtask image` builds.
    assert_eq!(c["image"].as_str(), Some(format!("localhost/socktrace:{VERSION}").as_str()));
    let sec = &c["securityContext"];
    assert_eq!(sec["privileged"].as_bool(), Some(false));
    assert_eq!(sec["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(yaml_strings(&sec["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<String> = yaml_strings(&sec["capabilities"]["add"]).into_iter().map(|c| format!("CAP_{c}")).collect();
    assert_eq!(added, caps, "DaemonSet capabilities vs README");
    let args = yaml_strings(&c["args"]);
    assert_eq!(args.first().map(String::as_str), Some("serve"));

    let unit = fs::read_to_string(workspace().join("deploy/socktrace.service")).unwrap();
    let setting = |key: &str| -> Vec<String> {
        let lines: Vec<&str> = unit.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).collect();
        assert_eq!(lines.len(), 1, "{key} in the unit: {lines:?}");
        lines[0].split('#').next().unwrap_or("").split_whitespace().map(str::to_owned).collect()
    };
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        assert_eq!(setting(key).into_iter().collect::<BTreeSet<_>>(), caps, "{key} vs README");
    }
    // The path the Debian package installs the binary to.
    assert_eq!(setting("ExecStart").first().map(String::as_str), Some("/usr/bin/socktrace"));
}

/// `dpkg-deb -I`'s control fields.
fn control(deb: &Path) -> Vec<(String, String)> {
    ok(Command::new("dpkg-deb").args(["-f"]).arg(deb))
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Paths a package installs (from `dpkg-deb -c`), without the leading `.`, files only.
fn deb_files(deb: &Path) -> BTreeSet<String> {
    ok(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_owned())
        .collect()
}

#[test]
#[ignore = "needs SOCKTRACE_DEB: run by `cargo xtask test-packages`"]
fn deb_contents_and_control() {
    let deb = env_path("SOCKTRACE_DEB");
    assert_eq!(deb.file_name().and_then(|n| n.to_str()), Some(format!("socktrace_{VERSION}_amd64.deb").as_str()));
    let fields = control(&deb);
    let field = |k: &str| fields.iter().find(|(f, _)| f == k).map_or_else(|| panic!("no {k} in {fields:?}"), |(_, v)| v.as_str());
    assert_eq!(field("Package"), "socktrace");
    assert_eq!(field("Version"), VERSION);
    assert_eq!(field("Architecture"), "amd64");
    // Declared dependencies: the C library (and the compiler runtime it may pull in), nothing else.
    let depends: Vec<&str> = field("Depends").split(',').map(|d| d.split_whitespace().next().unwrap_or("")).collect();
    assert!(depends.contains(&"libc6"), "Depends: {depends:?}");
    assert!(depends.iter().all(|d| ["libc6", "libgcc-s1"].contains(d)), "Depends: {depends:?}");

    let files = deb_files(&deb);
    let mut want: Vec<String> = vec![
        "/usr/bin/socktrace".into(),
        "/usr/share/bash-completion/completions/socktrace".into(),
        "/usr/share/zsh/vendor-completions/_socktrace".into(),
        "/usr/share/fish/vendor_completions.d/socktrace.fish".into(),
        "/usr/share/man/man1/socktrace.1.gz".into(),
    ];
    want.extend(subcommands().iter().map(|n| format!("/usr/share/man/man1/socktrace-{n}.1.gz")));
    for w in &want {
        assert!(files.contains(w), "{w} not in the package: {files:#?}");
    }
    let units: Vec<&String> = files.iter().filter(|f| f.ends_with("systemd/system/socktrace.service")).collect();
    assert_eq!(units.len(), 1, "{files:#?}");
    // Nothing enabled by the package itself (no .wants/ links shipped).
    assert!(!files.iter().any(|f| f.contains(".wants/")), "{files:#?}");
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let bin_line = listing.lines().find(|l| l.ends_with("./usr/bin/socktrace")).unwrap();
    assert!(bin_line.starts_with("-rwxr-xr-x root/root") || bin_line.starts_with("-rwxr-xr-x 0/0"), "{bin_line}");

    // What is packaged is what the repository has and the binary generates.
    let x = TempDir::new("deb-contents");
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x.0));
    let unit_path = x.0.join(units[0].trim_start_matches('/'));
    assert_eq!(fs::read_to_string(unit_path).unwrap(), fs::read_to_string(workspace().join("deploy/socktrace.service")).unwrap());
    let bash = fs::read_to_string(x.0.join("usr/share/bash-completion/completions/socktrace")).unwrap();
    assert_eq!(bash, generate(&["bash"]));
    let man = ok(Command::new("gzip").arg("-dc").arg(x.0.join("usr/share/man/man1/socktrace-watch.1.gz")));
    assert_eq!(man, generate(&["man", "watch"]));
    // The maintainer scripts never enable or start the unit.
    let ctl = TempDir::new("deb-control");
    ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl.0));
    for script in ["postinst", "preinst"] {
        if let Ok(s) = fs::read_to_string(ctl.0.join(script)) {
            assert!(!s.contains("systemctl enable") && !s.contains("systemctl start") && !s.contains("deb-systemd-invoke start"), "{script}:\n{s}");
        }
    }
}

/// `snapshot -l --json` from `bin` lists a listener this test opened, with this process as owner.
fn snapshot_sees_our_listener(bin: &Path) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = u64::from(listener.local_addr().unwrap().port());
    let rows: Value = serde_json::from_str(&ok(Command::new(bin).args(["snapshot", "-l", "--json"]))).unwrap();
    let mine = rows.as_array().unwrap().iter().find(|r| r["lport"].as_u64() == Some(port) && r["laddr"] == "127.0.0.1");
    let mine = mine.unwrap_or_else(|| panic!("{} snapshot does not list 127.0.0.1:{port}", bin.display()));
    assert_eq!(mine["state"], "listen");
    let pid = u64::from(std::process::id());
    assert!(mine["processes"].as_array().unwrap().iter().any(|p| p["pid"].as_u64() == Some(pid)), "{mine}");
}

#[test]
#[ignore = "needs SOCKTRACE_DEB: run by `cargo xtask test-packages`"]
fn deb_binary_runs_after_extraction() {
    let deb = env_path("SOCKTRACE_DEB");
    let x = TempDir::new("deb-x");
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x.0));
    let bin = x.0.join("usr/bin/socktrace");
    assert_eq!(version_of(&bin), version_of(&socktrace_bin()));
    snapshot_sees_our_listener(&bin);
}

fn dpkg_status() -> Option<String> {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "socktrace"]));
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()).filter(|s| !s.ends_with("not-installed"))
}

/// dpkg, waiting (up to 5 min) while another apt/dpkg holds the lock.
fn dpkg(args: &[&str]) -> Output {
    let start = Instant::now();
    loop {
        let out = run(Command::new("dpkg").args(args).env("DEBIAN_FRONTEND", "noninteractive"));
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains("lock") || start.elapsed() > Duration::from_mins(5) {
            return out;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// Directories this machine's dpkg leaves out (`path-exclude=/usr/share/man/*` in slim images):
/// their files may be missing after `dpkg -i`.
fn dpkg_path_excludes() -> Vec<String> {
    let mut confs = vec![PathBuf::from("/etc/dpkg/dpkg.cfg")];
    confs.extend(fs::read_dir("/etc/dpkg/dpkg.cfg.d").into_iter().flatten().flatten().map(|e| e.path()));
    confs
        .iter()
        .filter_map(|c| fs::read_to_string(c).ok())
        .flat_map(|text| text.lines().filter_map(|l| l.trim().strip_prefix("path-exclude")).map(|v| v.trim_start_matches([' ', '=']).to_owned()).collect::<Vec<_>>())
        .map(|glob| glob.split('*').next().unwrap_or("").to_owned())
        .filter(|prefix| !prefix.is_empty())
        .collect()
}

/// Purges the package on drop, so a failed test leaves the machine as it found it.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if dpkg_status().is_some() {
            let out = dpkg(&["--purge", "socktrace"]);
            eprintln!("cleanup: dpkg --purge socktrace: {}", out.status);
        }
    }
}

/// Files under the systemd and deb-systemd-helper state directories that mention socktrace.
fn systemd_state() -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut stack: Vec<PathBuf> = ["/etc/systemd/system", "/var/lib/systemd/deb-systemd-helper-enabled", "/var/lib/systemd/deb-systemd-helper-masked"]
        .iter()
        .map(PathBuf::from)
        .collect();
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if p.to_string_lossy().contains("socktrace") {
                found.insert(p);
            }
        }
    }
    found
}

#[test]
#[ignore = "needs SOCKTRACE_DEB and root: run by `cargo xtask test-packages`"]
fn deb_installs_and_removes_cleanly() {
    let deb = env_path("SOCKTRACE_DEB");
    if !privileged() {
        return;
    }
    assert!(dpkg_status().is_none(), "a socktrace package is installed on this machine ({:?}): not touching it", dpkg_status());
    let files = deb_files(&deb);
    let present: Vec<&String> = files.iter().filter(|f| Path::new(f).exists()).collect();
    assert!(present.is_empty(), "files of the package exist before installing it: {present:?}");
    let state_before = systemd_state();

    let guard = Installed;
    let out = dpkg(&["-i", deb.to_str().unwrap()]);
    assert!(out.status.success(), "dpkg -i: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dpkg_status().as_deref(), Some("install ok installed"));
    let excluded = dpkg_path_excludes();
    for f in files.iter().filter(|f| !excluded.iter().any(|e| f.starts_with(e.as_str()))) {
        assert!(Path::new(f).exists(), "{f} missing after dpkg -i");
    }
    assert_eq!(version_of(Path::new("/usr/bin/socktrace")), version_of(&socktrace_bin()));
    snapshot_sees_our_listener(Path::new("/usr/bin/socktrace"));
    // Installed, not enabled: no symlink in any .wants directory.
    let wants: Vec<PathBuf> = systemd_state().into_iter().filter(|p| p.to_string_lossy().contains(".wants/")).collect();
    assert!(wants.is_empty(), "the package enabled the unit: {wants:?}");
    let unit = files.iter().find(|f| f.ends_with("/socktrace.service")).unwrap();
    // systemd's own check of the installed unit (ExecStart exists now).
    let verify = run(Command::new("systemd-analyze").args(["verify", unit]));
    let verr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && !verr.contains("socktrace.service"), "systemd-analyze verify {unit}: {verr}");

    let out = dpkg(&["-r", "socktrace"]);
    assert!(out.status.success(), "dpkg -r: {}", String::from_utf8_lossy(&out.stderr));
    let left: Vec<&String> = files.iter().filter(|f| Path::new(f).exists()).collect();
    assert!(left.is_empty(), "left after dpkg -r: {left:?}");
    let out = dpkg(&["--purge", "socktrace"]);
    assert!(out.status.success(), "dpkg --purge: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dpkg_status(), None);
    assert_eq!(systemd_state(), state_before, "systemd state not restored");
    drop(guard);
}

#[test]
#[ignore = "needs SOCKTRACE_STATIC_BIN: run by `cargo xtask test-packages`"]
fn static_binary_is_static_and_traces() {
    let bin = env_path("SOCKTRACE_STATIC_BIN");
    let file = ok(Command::new("file").arg("-L").arg(&bin));
    assert!(file.contains("statically linked") || file.contains("static-pie linked"), "{file}");
    let ldd = run(Command::new("ldd").arg(&bin));
    let ldd_text = format!("{}{}", String::from_utf8_lossy(&ldd.stdout), String::from_utf8_lossy(&ldd.stderr));
    assert!(ldd_text.contains("not a dynamic executable") || ldd_text.contains("statically linked"), "ldd: {ldd_text}");
    // Same version and commit as the host build. The dirty flag is taken when each build's script
    // runs (it watches socktrace/ and socktrace-common/), so two builds may disagree on it alone.
    let clean = |v: String| v.replace("-dirty)", ")");
    assert_eq!(clean(version_of(&bin)), clean(version_of(&socktrace_bin())));
    snapshot_sees_our_listener(&bin);
    // The eBPF object is embedded and loads: `probes` attaches every signal as the host build does.
    if privileged() {
        let probes = |b: &Path| -> Vec<(String, Value)> {
            let v: Value = serde_json::from_str(&ok(Command::new(b).args(["probes", "--json"]))).unwrap();
            v.as_array().unwrap().iter().map(|r| (r["signal"].as_str().unwrap().to_owned(), r["hook"].clone())).collect()
        };
        let ours = probes(&bin);
        // `accept_count` is attached only where accept has no per-call hook (it derives accepts).
        let accept_traced = ours.iter().any(|(s, h)| s == "accept" && h.is_string());
        assert!(ours.iter().filter(|(s, _)| !(accept_traced && s == "accept_count")).all(|(_, h)| h.is_string()), "static binary: {ours:?}");
        assert_eq!(ours, probes(&socktrace_bin()));
    }
}

/// Removes a podman container on drop.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "--force", &self.0]).output();
    }
}

#[test]
#[ignore = "needs SOCKTRACE_IMAGE and SOCKTRACE_STATIC_BIN: run by `cargo xtask test-packages`"]
fn image_runs_the_static_binary() {
    let image = std::env::var("SOCKTRACE_IMAGE").expect("SOCKTRACE_IMAGE is not set: run `cargo xtask test-packages`");
    let static_bin = env_path("SOCKTRACE_STATIC_BIN");
    assert_eq!(image, format!("localhost/socktrace:{VERSION}"));
    let inspect: Value = serde_json::from_str(&ok(Command::new("podman").args(["image", "inspect", &image]))).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(config["Entrypoint"], serde_json::json!(["/usr/bin/socktrace"]), "{config}");
    let labels = &config["Labels"];
    let version_line = version_of(&static_bin);
    let commit = version_line.split("(commit ").nth(1).and_then(|r| r.strip_suffix(')')).unwrap();
    assert_eq!(labels["org.opencontainers.image.version"], VERSION, "{labels}");
    assert_eq!(labels["org.opencontainers.image.revision"], commit, "{labels}");
    assert!(labels["org.opencontainers.image.source"].as_str().is_some_and(|s| !s.is_empty()), "{labels}");
    // FROM scratch: one layer, the binary.
    assert_eq!(inspect[0]["RootFS"]["Layers"].as_array().map(Vec::len), Some(1), "{}", inspect[0]["RootFS"]);

    // `podman run` does not work in this sandbox (crun and hybrid cgroups): copy the binary out.
    let name = format!("st-image-{}", std::process::id());
    ok(Command::new("podman").args(["create", "--name", &name, &image]));
    let container = Container(name);
    let dir = TempDir::new("image");
    let out = dir.0.join("socktrace");
    ok(Command::new("podman").args(["cp", &format!("{}:/usr/bin/socktrace", container.0)]).arg(&out));
    assert_eq!(fs::read(&out).unwrap(), fs::read(&static_bin).unwrap(), "the image's binary is not the static build");
    assert_eq!(version_of(&out), version_line);
    snapshot_sees_our_listener(&out);
}
