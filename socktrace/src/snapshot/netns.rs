//! The host's network namespaces, found from /proc/*/ns/net and /run/netns and deduplicated by
//! inode, and running a closure inside one on a dedicated thread (`setns` there, then the thread
//! exits), so the calling thread never leaves its own namespace. Namespaces that no process is
//! in and that are not mounted under /run/netns cannot be found this way.

use std::{
    collections::HashSet,
    fs, io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// One network namespace and a path that refers to it.
#[derive(Clone, Debug)]
pub struct Netns {
    pub inode: u32,
    pub path: PathBuf,
    /// Its name under /run/netns, if it has one.
    pub name: Option<String>,
}

/// Every namespace found, the caller's first, then named ones (by name), then by pid.
#[derive(Debug, Default)]
pub struct Discovery {
    pub namespaces: Vec<Netns>,
    /// /proc/PID/ns/net links this user may not read (their namespace is unknown).
    pub unreadable: usize,
}

fn inode_of(path: &Path) -> io::Result<u32> {
    let ino = fs::metadata(path)?.ino();
    u32::try_from(ino).map_err(|_| io::Error::other("namespace inode out of range"))
}

pub fn discover() -> Discovery {
    let mut d = Discovery::default();
    let mut seen = HashSet::new();
    let mut add = |d: &mut Discovery, path: PathBuf, name: Option<String>| {
        let inode = inode_of(&path);
        d.add(&mut seen, path, name, inode);
    };
    add(&mut d, PathBuf::from("/proc/self/ns/net"), None);
    let mut named: Vec<(String, PathBuf)> = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    named.sort();
    for (name, path) in named {
        add(&mut d, path, Some(name));
    }
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        add(&mut d, PathBuf::from(format!("/proc/{pid}/ns/net")), None);
    }
    d
}

impl Discovery {
    /// Adds what one path's `stat` said: a namespace not `seen` yet, a name for one found before
    /// under another path, or an unreadable link.
    pub fn add(&mut self, seen: &mut HashSet<u32>, path: PathBuf, name: Option<String>, inode: io::Result<u32>) {
        match inode {
            Ok(inode) if seen.insert(inode) => self.namespaces.push(Netns { inode, path, name }),
            Ok(inode) => {
                // Already found (e.g. the caller's own namespace): keep its /run/netns name.
                if let (Some(n), Some(name)) = (self.namespaces.iter_mut().find(|n| n.inode == inode), name) {
                    n.name.get_or_insert(name);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => self.unreadable += 1,
            Err(_) => {}
        }
    }
}

/// Why a namespace could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    #[error("opening {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("setns into {path}: {source}")]
    Setns { path: PathBuf, source: io::Error },
}

impl EnterError {
    /// Lack of privilege (as opposed to the namespace disappearing meanwhile).
    pub fn is_permission(&self) -> bool {
        let (EnterError::Open { source, .. } | EnterError::Setns { source, .. }) = self;
        matches!(source.kind(), io::ErrorKind::PermissionDenied) || source.raw_os_error() == Some(libc::EPERM)
    }
}

/// Runs `f` with the calling thread's network namespace being `ns`: directly when it already is
/// (`own` is the caller's namespace inode), otherwise on a new thread that enters it and then exits.
pub fn within<T: Send>(ns: &Netns, own: Option<u32>, f: impl FnOnce() -> T + Send) -> Result<T, EnterError> {
    if own == Some(ns.inode) {
        return Ok(f());
    }
    let file = fs::File::open(&ns.path).map_err(|source| EnterError::Open { path: ns.path.clone(), source })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a valid namespace fd; setns only changes this (short-lived) thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(EnterError::Setns { path: ns.path.clone(), source: io::Error::last_os_error() });
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// TCP sockets (IPv4 including TIME-WAIT, IPv6) in the calling thread's namespace, from
/// /proc/thread-self/net/sockstat{,6}; zeros if unreadable.
pub fn tcp_socket_counts() -> (u64, u64) {
    let field = |file: &str, proto: &str, names: &[&str]| sockstat_sum(&fs::read_to_string(file).unwrap_or_default(), proto, names);
    (
        field("/proc/thread-self/net/sockstat", "TCP:", &["inuse", "tw"]),
        field("/proc/thread-self/net/sockstat6", "TCP6:", &["inuse"]),
    )
}

/// In the text of /proc/net/sockstat{,6}: the sum of the values named `names` on the line of
/// `proto` (`TCP: inuse 5 orphan 0 tw 2 …`); 0 when absent.
pub fn sockstat_sum(text: &str, proto: &str, names: &[&str]) -> u64 {
    let Some(line) = text.lines().find(|l| l.starts_with(proto)) else { return 0 };
    let words: Vec<&str> = line.split_whitespace().collect();
    words.windows(2).filter(|w| names.contains(&w[0])).filter_map(|w| w[1].parse::<u64>().ok()).fold(0, u64::saturating_add)
}

/// `TcpExt` counters of the calling thread's namespace (/proc/thread-self/net/netstat: a header
/// line of names, then a line of values), in the order of `names`; `None` for one not found.
pub fn tcp_ext_counters(names: &[&str]) -> Vec<Option<u64>> {
    tcp_ext_in(&fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default(), names)
}

/// [`tcp_ext_counters`] from the text of /proc/net/netstat.
pub fn tcp_ext_in(text: &str, names: &[&str]) -> Vec<Option<u64>> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(head), Some(vals)) = (lines.next(), lines.next()) else { return vec![None; names.len()] };
    let pairs: Vec<(&str, &str)> = head.split_whitespace().zip(vals.split_whitespace()).skip(1).collect();
    names.iter().map(|n| pairs.iter().find(|(k, _)| k == n).and_then(|(_, v)| v.parse().ok())).collect()
}

/// The middle of the calling thread's namespace's ephemeral port range (`ip_local_port_range`,
/// per namespace; /proc/sys/net answers for the opener's namespace), or of Linux's default.
pub fn ephemeral_middle() -> u16 {
    port_range_middle(&fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default())
}

/// [`ephemeral_middle`] from the text of `ip_local_port_range`.
pub fn port_range_middle(text: &str) -> u16 {
    let mut it = text.split_whitespace().filter_map(|w| w.parse::<u32>().ok());
    let (lo, hi) = match (it.next(), it.next()) {
        (Some(lo), Some(hi)) if lo < hi && hi <= 65535 => (lo, hi),
        _ => (32768, 60999),
    };
    u16::try_from(lo.midpoint(hi)).unwrap_or(46884)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs the fuzz target `proc_net` found: `sockstat-sum-overflow`, a `TCP:` line whose
    /// `inuse`/`tw` values add up beyond u64 (`sum()` panicked with overflow checks, wrapped
    /// without): the sum saturates.
    #[test]
    fn fuzz_regressions_proc_net() {
        for (name, bytes) in crate::offsets::tests::fuzz_regressions("proc_net") {
            let text = String::from_utf8_lossy(&bytes);
            let tcp = sockstat_sum(&text, "TCP:", &["inuse", "tw"]);
            let _ = (sockstat_sum(&text, "TCP6:", &["inuse"]), tcp_ext_in(&text, &["ListenOverflows"]), port_range_middle(&text));
            if name.ends_with("sockstat-sum-overflow") {
                assert_eq!(tcp, u64::MAX, "{name}");
            }
            let mut counters = std::collections::BTreeMap::new();
            crate::diagnose::parse_counters(&text, &mut counters);
            crate::diagnose::parse_conntrack_stats(&text, &mut counters);
            if name.ends_with("conntrack-sum-overflow") {
                assert!(counters.iter().any(|(k, v)| k.starts_with("Conntrack") && *v == i64::MAX), "{name}: {counters:?}");
            }
        }
        assert_eq!(sockstat_sum("TCP: inuse 5 orphan 0 tw 2 alloc 9 mem 1\n", "TCP:", &["inuse", "tw"]), 7);
    }

    #[test]
    fn own_namespace_comes_first_and_once() {
        let d = discover();
        let own = crate::system::own_netns().unwrap();
        assert_eq!(d.namespaces[0].inode, own);
        let mut inodes: Vec<u32> = d.namespaces.iter().map(|n| n.inode).collect();
        inodes.sort_unstable();
        inodes.dedup();
        assert_eq!(inodes.len(), d.namespaces.len());
        assert_eq!(within(&d.namespaces[0], Some(own), || 7).unwrap(), 7);
    }
}
