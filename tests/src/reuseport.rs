//! Harness for the `SO_REUSEPORT` tests (tests/tests/reuseport.rs): the `st-reuseport` server driven
//! over its stdin, and ground truth about which LISTEN socket is which, independent of socktrace:
//! the socket inodes `ss -tlne` reports for a port, and the listening sockets a process has
//! registered in its epoll instances (`/proc/PID/fdinfo`: an nginx worker with `reuseport` polls
//! only its own socket, although it holds every worker's). Also readers for `top --json`
//! intervals and Prometheus text.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{Cgroup, NetNs};

/// A running `st-reuseport` (killed on drop); its stdout JSON lines are collected on a thread.
pub struct ReuseportServer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl ReuseportServer {
    /// Starts `bin` in `ns` and `cg` with `sockets` listeners on `addr`, each with `backlog`, and
    /// waits for its ready line.
    pub fn start(bin: &Path, ns: &NetNs, cg: &Cgroup, addr: &str, sockets: u32, backlog: u32) -> anyhow::Result<ReuseportServer> {
        let cgp = cg.path.to_string_lossy().into_owned();
        let mut child = Command::new(bin)
            .args(["--netns", &ns.name, "--cgroup", &cgp, "--addr", addr])
            .args(["--sockets", &sockets.to_string(), "--backlog", &backlog.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(v);
                }
            }
        });
        let stdin = child.stdin.take();
        let s = ReuseportServer { child, stdin, lines };
        s.wait_for(|v| v["ready"] == true)?;
        Ok(s)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn snapshot(&self) -> Vec<Value> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The first line (in order) matching `pred` printed after the first `skip` lines, waited for
    /// up to 20 s.
    fn wait_from(&self, skip: usize, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = self.snapshot().into_iter().skip(skip).find(&pred) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("st-reuseport never printed the line wanted; it printed {:?}", self.snapshot());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_for(&self, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        self.wait_from(0, pred)
    }

    /// Slot → inode of the sockets it listened on at start.
    pub fn initial_inodes(&self) -> anyhow::Result<Vec<u32>> {
        let ready = self.wait_for(|v| v["ready"] == true)?;
        ready["sockets"]
            .as_array()
            .context("no sockets in the ready line")?
            .iter()
            .map(|s| s["inode"].as_u64().and_then(|i| u32::try_from(i).ok()).context("inode"))
            .collect()
    }

    /// Sends one command and returns its answer (the next line with `event` = `answer`).
    pub fn command(&mut self, cmd: &str, answer: &str) -> anyhow::Result<Value> {
        let skip = self.snapshot().len();
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
        self.wait_from(skip, |v| v["event"] == answer)
    }

    /// Accepts per socket inode so far (every socket it opened, closed ones included).
    pub fn accepts(&mut self) -> anyhow::Result<Vec<(u32, u64)>> {
        let v = self.command("stats", "stats")?;
        v["accepts"]
            .as_object()
            .context("stats without accepts")?
            .iter()
            .map(|(k, n)| Ok((k.parse()?, n.as_u64().context("count")?)))
            .collect()
    }
}

impl Drop for ReuseportServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Inodes of the LISTEN sockets on `port` in `ns`, from `ss -tlneH` (`ino:N`).
pub fn ss_listen_inodes(ns: &NetNs, port: u16) -> anyhow::Result<BTreeSet<u32>> {
    let out = ns.exec(&["ss", "-tlneH", &format!("sport = :{port}")])?;
    out.lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("ino:")))
        .map(|n| n.parse().with_context(|| format!("ino:{n} in {out}")))
        .collect()
}

/// The socket inodes among `candidates` that process `pid` has registered in any of its epoll
/// instances: the LISTEN sockets it waits on to accept.
pub fn epoll_watched(pid: u32, candidates: &BTreeSet<u32>) -> anyhow::Result<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for e in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let text = fs::read_to_string(e?.path()).unwrap_or_default();
        // An epoll fd's fdinfo has one "tfd: N events: …" line per watched fd.
        for tfd in text.lines().filter_map(|l| l.strip_prefix("tfd:")?.split_whitespace().next()) {
            let Ok(link) = fs::read_link(format!("/proc/{pid}/fd/{tfd}")) else { continue };
            let link = link.to_string_lossy().into_owned();
            let ino = link.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).and_then(|n| n.parse::<u32>().ok());
            if let Some(ino) = ino.filter(|i| candidates.contains(i)) {
                out.insert(ino);
            }
        }
    }
    Ok(out)
}

/// `top --json` intervals: (`ts_ns`, the row of `port` in netns `netns`), for the intervals that
/// have one.
pub fn top_rows(lines: &[String], netns: u32, port: u16) -> Vec<(u64, Value)> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let ts = v["ts_ns"].as_u64()?;
            let row = v["listeners"].as_array()?.iter().find(|r| r["lport"] == port && r["netns"] == netns)?.clone();
            Some((ts, row))
        })
        .collect()
}

/// The `sockets` entry with `inode` in a `top --json` row.
pub fn socket_of(row: &Value, inode: u32) -> Option<&Value> {
    row["sockets"].as_array()?.iter().find(|s| s["inode"] == inode)
}

/// Inodes in a `top --json` row's `sockets`.
pub fn socket_inodes(row: &Value) -> BTreeSet<u32> {
    row["sockets"].as_array().into_iter().flatten().filter_map(|s| s["inode"].as_u64().and_then(|i| u32::try_from(i).ok())).collect()
}

/// Samples of metric `name` (exactly: `name{…} value`) whose labels include every `key="value"`
/// of `labels`: (the sample's full label text, value).
pub fn samples(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Vec<(String, f64)> {
    let want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let parts: Vec<&str> = labels.split(',').collect();
            want.iter().all(|w| parts.contains(&w.as_str())).then(|| Some((labels.to_owned(), value.trim().parse().ok()?)))?
        })
        .collect()
}

/// The value of label `key` in a sample's label text.
pub fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|p| p.strip_prefix(key)?.strip_prefix("=\"")?.strip_suffix('"'))
}
