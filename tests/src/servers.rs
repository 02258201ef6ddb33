//! Real servers and load generators from Debian for the field-trial suite: nginx-light, haproxy and
//! redis-server, each started by the test with a temporary config inside the test's network
//! namespace (`ip netns exec`) and, when given, its cgroup (the pid joins `cgroup.procs` before the
//! server forks workers); wrk and redis-benchmark as clients on that namespace's loopback, bounded
//! in time and count. Every process runs in its own process group, which is continued (a stopped
//! worker cannot die otherwise) and killed on drop, even when the test fails; temp dirs are
//! removed. Nothing here starts a system service.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{Cgroup, NetNs};

/// A temp directory for one server's config, logs and runtime files, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("socktrace-field-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn s(&self, name: &str) -> String {
        self.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A program run as `ip netns exec NS argv…` in a new process group (its pid is the group id),
/// optionally inside a cgroup; stdout and stderr go to `out.log` and `err.log` in `dir`.
pub struct Group {
    child: Child,
    dir: TempDir,
    name: String,
}

impl Group {
    pub fn spawn(name: &str, ns: &NetNs, cg: Option<&Cgroup>, dir: TempDir, argv: &[&str]) -> anyhow::Result<Group> {
        // `$$` is the shell's pid, which `exec` hands on to `ip` and then to the program, so the
        // program and everything it forks start inside the cgroup.
        let join = cg.map(|c| format!("echo $$ > '{}/cgroup.procs' && ", c.path.display())).unwrap_or_default();
        let script = format!("{join}exec ip netns exec \"$0\" \"$@\"");
        let out = fs::File::create(dir.join("out.log"))?;
        let err = fs::File::create(dir.join("err.log"))?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(&ns.name)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {name}: {argv:?}"))?;
        Ok(Group { child, dir, name: name.to_owned() })
    }

    /// The pid of the program (the group leader: `sh` exec'd into `ip`, which exec'd into it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn pgid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(self.dir.join("out.log")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("err.log")).unwrap_or_default()
    }

    /// Fails when the program has exited.
    pub fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.child.try_wait()? {
            bail!("{} exited with {s}: {}{}", self.name, self.stdout(), self.stderr());
        }
        Ok(())
    }

    /// Sends `sig` to the whole group.
    pub fn signal_group(&self, sig: i32) {
        // SAFETY: signalling a process group this guard created.
        unsafe { libc::kill(-self.pgid(), sig) };
    }

    fn kill(&mut self) {
        self.signal_group(libc::SIGCONT);
        self.signal_group(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Children of `pid` (from /proc/*/stat's ppid field).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // The comm field may contain spaces: the fields after the last ')' are "state ppid …".
        let parent = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if parent == Some(pid) {
            out.push(p);
        }
    }
    out.sort_unstable();
    out
}

/// Waits until `ready()` holds or `limit` passes.
fn until(limit: Duration, what: &str, mut ready: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ready()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} not ready within {limit:?}")
}

/// Whether something in `ns` listens on `port` (by `ss -ltnH`).
pub fn listening(ns: &NetNs, port: u16) -> anyhow::Result<bool> {
    let out = ns.exec(&["ss", "-ltnH", &format!("sport = :{port}")])?;
    Ok(out.lines().any(|l| l.starts_with("LISTEN")))
}

/// Whether something in the test process's own (the host's) namespace listens on `port`.
pub fn host_listens(port: u16) -> anyhow::Result<bool> {
    let out = Command::new("ss").args(["-ltnH", &format!("sport = :{port}")]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("LISTEN")))
}

/// The `ss -ltnH` line(s) for `port` in `ns`: "LISTEN Recv-Q Send-Q …" (queue now / backlog).
pub fn listen_queue(ns: &NetNs, port: u16) -> anyhow::Result<Vec<(u32, u32)>> {
    let out = ns.exec(&["ss", "-ltnH", &format!("sport = :{port}")])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().skip(1);
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect())
}

/// nginx-light's settings for one test.
pub struct NginxConfig<'a> {
    pub addr: &'a str,
    pub port: u16,
    pub backlog: u32,
    pub workers: u32,
    pub reuseport: bool,
    /// Size of the body served at `/big` (bytes); `/` answers "ok".
    pub big_bytes: usize,
}

/// A running nginx (master in the foreground, `daemon off`), with its own prefix, pid file, logs
/// and temp paths under a temp dir.
pub struct Nginx {
    group: Group,
    pub port: u16,
}

impl Nginx {
    pub fn start(ns: &NetNs, cg: Option<&Cgroup>, c: &NginxConfig) -> anyhow::Result<Nginx> {
        let dir = TempDir::new(&format!("nginx{}", c.port))?;
        fs::create_dir_all(dir.join("www"))?;
        fs::write(dir.join("www/big"), vec![b'x'; c.big_bytes])?;
        let reuseport = if c.reuseport { " reuseport" } else { "" };
        let conf = format!(
            "worker_processes {workers};
daemon off;
master_process on;
pid {pid};
error_log {err} warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  server {{
    listen {addr}:{port} backlog={backlog}{reuseport};
    root {d}/www;
    location = / {{ return 200 \"ok\\n\"; }}
    location = /status {{ stub_status; }}
  }}
}}
",
            workers = c.workers,
            pid = dir.s("nginx.pid"),
            err = dir.s("error.log"),
            d = dir.0.display(),
            addr = c.addr,
            port = c.port,
            backlog = c.backlog,
        );
        fs::write(dir.join("nginx.conf"), conf)?;
        let (prefix, err, conf) = (dir.s(""), dir.s("error.log"), dir.s("nginx.conf"));
        let group = Group::spawn("nginx", ns, cg, dir, &["nginx", "-p", &prefix, "-e", &err, "-c", &conf])?;
        let mut n = Nginx { group, port: c.port };
        let want = c.workers as usize;
        let port = c.port;
        until(Duration::from_secs(15), "nginx", || {
            n.group.alive()?;
            Ok(listening(ns, port)? && n.workers().len() == want)
        })
        .with_context(|| format!("nginx: {}", n.group.stderr()))?;
        Ok(n)
    }

    /// Connections nginx has accepted so far (`stub_status` "accepts"; the status request itself
    /// is one of them), read over loopback inside `ns`.
    pub fn accepts(&self, ns: &NetNs, addr: &str) -> anyhow::Result<u64> {
        let addr = format!("{addr}:{}", self.port);
        let (status, body) = ns.within(move || crate::http_get(&addr, "/status", Duration::from_secs(5)))??;
        anyhow::ensure!(status == 200, "stub_status answered {status}: {body}");
        // "Active connections: N \nserver accepts handled requests\n A H R \n…"
        let counts = body.lines().nth(2).context("stub_status: no counts line")?;
        Ok(counts.split_whitespace().next().context("stub_status: empty counts")?.parse()?)
    }

    pub fn master(&self) -> u32 {
        self.group.pid()
    }

    pub fn workers(&self) -> Vec<u32> {
        children(self.master())
    }

    /// Sends `sig` to one process of this nginx (e.g. SIGSTOP to a worker).
    ///
    /// # Panics
    ///
    /// When `pid` is not this nginx's master or one of its workers.
    pub fn signal(&self, pid: u32, sig: i32) {
        assert!(pid == self.master() || self.workers().contains(&pid), "{pid} is not part of this nginx");
        // SAFETY: signalling a process of the group this guard owns.
        unsafe { libc::kill(i32::try_from(pid).unwrap_or(0), sig) };
    }
}

/// A running haproxy (`-db`: foreground) with one HTTP frontend and one backend server.
pub struct Haproxy {
    group: Group,
    pub port: u16,
}

impl Haproxy {
    pub fn start(ns: &NetNs, cg: Option<&Cgroup>, bind: &str, port: u16, backend: &str) -> anyhow::Result<Haproxy> {
        let dir = TempDir::new(&format!("haproxy{port}"))?;
        // A global maxconn of a few thousand: higher needs more fds than the hard limit here.
        let conf = format!(
            "global
  maxconn 3000
defaults
  mode http
  timeout connect 2s
  timeout client 10s
  timeout server 10s
frontend fe
  bind {bind}:{port}
  default_backend be
backend be
  server s1 {backend}
"
        );
        fs::write(dir.join("haproxy.cfg"), conf)?;
        let cfg = dir.s("haproxy.cfg");
        let group = Group::spawn("haproxy", ns, cg, dir, &["haproxy", "-db", "-f", &cfg])?;
        let mut h = Haproxy { group, port };
        until(Duration::from_secs(15), "haproxy", || {
            h.group.alive()?;
            listening(ns, port)
        })
        .with_context(|| format!("haproxy: {}", h.group.stderr()))?;
        Ok(h)
    }

    pub fn pid(&self) -> u32 {
        self.group.pid()
    }
}

/// A running redis-server: no persistence, not daemonized, its own dir.
pub struct Redis {
    group: Group,
    pub port: u16,
}

impl Redis {
    pub fn start(ns: &NetNs, cg: Option<&Cgroup>, port: u16, tcp_backlog: u32) -> anyhow::Result<Redis> {
        let dir = TempDir::new(&format!("redis{port}"))?;
        let d = dir.s("");
        let (p, b) = (port.to_string(), tcp_backlog.to_string());
        let argv = [
            "redis-server", "--port", &p, "--bind", "127.0.0.1", "--tcp-backlog", &b, "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", &d, "--logfile", "", "--protected-mode", "no", "--maxclients", "4000",
        ];
        let group = Group::spawn("redis-server", ns, cg, dir, &argv)?;
        let mut r = Redis { group, port };
        until(Duration::from_secs(15), "redis-server", || {
            r.group.alive()?;
            listening(ns, port)
        })
        .with_context(|| format!("redis-server: {}", r.group.stdout()))?;
        Ok(r)
    }

    /// What redis-server logged (its log goes to stdout).
    pub fn log(&self) -> String {
        self.group.stdout()
    }
}

/// wrk against `url` in `ns`: `threads`, `conns` connections, `secs` long; `close` sends
/// `Connection: close` (a connection per request), else keep-alive.
pub fn wrk(ns: &NetNs, url: &str, threads: u32, conns: u32, secs: u32, close: bool) -> anyhow::Result<Group> {
    let dir = TempDir::new(&format!("wrk{}", monotonic_tag()))?;
    let (t, c, d) = (threads.to_string(), conns.to_string(), format!("{secs}s"));
    let mut argv = vec!["wrk", "-t", &t, "-c", &c, "-d", &d, "--timeout", "2s"];
    if close {
        argv.extend(["-H", "Connection: close"]);
    }
    argv.push(url);
    Group::spawn("wrk", ns, None, dir, &argv)
}

/// redis-benchmark against `port` in `ns`: `clients` connections, `requests` PINGs in all;
/// `reconnect` (`-k 0`) opens a connection per request.
pub fn redis_benchmark(ns: &NetNs, port: u16, clients: u32, requests: u32, reconnect: bool) -> anyhow::Result<Group> {
    let dir = TempDir::new(&format!("rb{}", monotonic_tag()))?;
    let (p, c, n) = (port.to_string(), clients.to_string(), requests.to_string());
    let k = if reconnect { "0" } else { "1" };
    let argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", &p, "-c", &c, "-n", &n, "-k", k, "-t", "ping", "-q"];
    Group::spawn("redis-benchmark", ns, None, dir, &argv)
}

/// A distinct tag for temp dirs of clients started more than once per test process.
fn monotonic_tag() -> u64 {
    crate::monotonic_ns() / 1000
}
