//! Which processes hold each socket: socket inodes mapped to (pid, comm, fd), from a BPF task-file
//! iterator when root ([`super::bpf_owners`], one pass in the kernel) or one pass over /proc/*/fd
//! as `ss -p` does. The /proc scan skips processes this user may not inspect, and both skip
//! processes that exit meanwhile. Not a process table: only socket holders.

use std::{
    collections::HashMap,
    ffi::{CStr, CString},
    hash::{BuildHasherDefault, Hasher},
    os::unix::ffi::OsStrExt as _,
    sync::atomic::{AtomicUsize, Ordering},
};

use socktrace_common::iter::SocketFd;

pub use crate::cli::OwnerSource;
use super::bpf_owners::IterError;

/// The kernel BTF the iterator's offsets come from.
const BTF: &str = "/sys/kernel/btf/vmlinux";

/// A process that holds at least one socket.
#[derive(Clone, Debug)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
}

/// Socket inode → holders, from one scan.
#[derive(Debug, Default)]
pub struct Owners {
    procs: Vec<Process>,
    /// (inode, index into `procs`, fd), sorted.
    entries: Vec<(u32, u32, u32)>,
    /// inode → its first entry (a hash probe instead of a binary search over every entry per lookup).
    first: HashMap<u32, u32, BuildHasherDefault<InodeHasher>>,
}

/// Multiplicative hashing for inode numbers (already well spread; `SipHash` would be the slow part).
#[derive(Default)]
struct InodeHasher(u64);

impl Hasher for InodeHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = u64::from(v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl Owners {
    /// Scans every /proc/PID/fd once, processes shared out over a few threads (the kernel's
    /// per-descriptor work dominates, so this scales with cores).
    pub fn scan() -> Owners {
        Owners::scan_matching(&|_| true)
    }

    /// Like [`Owners::scan`], keeping only the socket inodes `keep` accepts (the interval views
    /// need the owners of a few listeners, not of every socket on the host).
    pub fn scan_matching(keep: &(dyn Fn(u32) -> bool + Sync)) -> Owners {
        let Ok(dir) = std::fs::read_dir("/proc") else { return Owners::default() };
        let pids: Vec<u32> = dir.flatten().filter_map(|e| std::str::from_utf8(e.file_name().as_bytes()).ok()?.parse().ok()).collect();
        let workers = std::thread::available_parallelism().map_or(1, usize::from).clamp(1, 4);
        let next = AtomicUsize::new(0);
        let parts: Vec<Owners> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| {
                        let mut part = Owners::default();
                        let mut link = [0u8; 64];
                        while let Some(&pid) = pids.get(next.fetch_add(1, Ordering::Relaxed)) {
                            part.add_process(pid, &mut link, keep);
                        }
                        part
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        let mut owners = Owners::default();
        for part in parts {
            let base = u32::try_from(owners.procs.len()).unwrap_or(u32::MAX);
            owners.procs.extend(part.procs);
            owners.entries.extend(part.entries.into_iter().map(|(inode, idx, fd)| (inode, idx.saturating_add(base), fd)));
        }
        owners.index();
        owners
    }

    /// Holders from the task-file iterator's records ([`super::bpf_owners`]), which come grouped
    /// by process.
    pub fn from_socket_fds(records: &[SocketFd]) -> Owners {
        let mut owners = Owners::default();
        for r in records {
            if owners.procs.last().is_none_or(|p| p.pid != r.pid) {
                let len = r.comm.iter().position(|&b| b == 0).unwrap_or(r.comm.len());
                owners.procs.push(Process { pid: r.pid, comm: String::from_utf8_lossy(&r.comm[..len]).into_owned() });
            }
            let idx = u32::try_from(owners.procs.len() - 1).unwrap_or(u32::MAX);
            // Inodes are 32-bit in /proc's `socket:[N]` too (sockfs numbers them with get_next_ino).
            owners.entries.push((u32::try_from(r.inode).unwrap_or(u32::MAX), idx, r.fd));
        }
        owners.index();
        owners
    }

    /// Owners for `snapshot`: the iterator when `source` allows and it loads, else the /proc scan.
    pub fn collect(source: OwnerSource) -> Result<Owners, IterError> {
        if source == OwnerSource::Proc {
            return Ok(Owners::scan());
        }
        match super::bpf_owners::socket_fds(std::path::Path::new(BTF)) {
            Ok(records) => Ok(Owners::from_socket_fds(&records)),
            Err(e) if source == OwnerSource::Bpf => Err(e),
            Err(_) => Ok(Owners::scan()),
        }
    }

    fn index(&mut self) {
        self.entries.sort_unstable();
        self.first.reserve(self.entries.len());
        for (i, e) in self.entries.iter().enumerate().rev() {
            self.first.insert(e.0, u32::try_from(i).unwrap_or(u32::MAX));
        }
    }

    fn add_process(&mut self, pid: u32, link: &mut [u8; 64], keep: &(dyn Fn(u32) -> bool + Sync)) {
        let before = self.entries.len();
        let idx = u32::try_from(self.procs.len()).unwrap_or(u32::MAX);
        scan_fds(pid, link, |inode, fd| {
            if keep(inode) {
                self.entries.push((inode, idx, fd));
            }
        });
        if self.entries.len() > before {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            self.procs.push(Process { pid, comm: comm.trim_end_matches('\n').to_owned() });
        }
    }

    /// Holders of a socket inode: (process, fd), by pid then fd. Empty for inode 0.
    pub fn of(&self, inode: u32) -> impl Iterator<Item = (&Process, u32)> {
        let start = self.first.get(&inode).map_or(self.entries.len(), |&i| i as usize);
        let hits = if inode == 0 { &[][..] } else { &self.entries[start..] };
        hits.iter().take_while(move |e| e.0 == inode).filter_map(|&(_, idx, fd)| Some((self.procs.get(idx as usize)?, fd)))
    }
}

/// Calls `found(inode, fd)` for each socket fd of `pid`. Uses `readlinkat` relative to the open
/// fd directory: one syscall per descriptor, no path walk.
fn scan_fds(pid: u32, link: &mut [u8; 64], mut found: impl FnMut(u32, u32)) {
    let Ok(path) = CString::new(format!("/proc/{pid}/fd")) else { return };
    // SAFETY: valid NUL-terminated path.
    let dfd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if dfd < 0 {
        return;
    }
    // SAFETY: dfd is an open directory fd; on success the DIR owns it (closedir closes it).
    let dir = unsafe { libc::fdopendir(dfd) };
    if dir.is_null() {
        // SAFETY: fdopendir failed, so dfd is still ours to close.
        unsafe { libc::close(dfd) };
        return;
    }
    loop {
        // SAFETY: dir is a valid DIR*; the entry stays valid until the next readdir on it.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        let Some(fd) = std::str::from_utf8(name.to_bytes()).ok().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // SAFETY: dirfd of a valid DIR*, NUL-terminated name, buffer of the given length.
        let n = unsafe { libc::readlinkat(libc::dirfd(dir), name.as_ptr(), link.as_mut_ptr().cast(), link.len()) };
        let Ok(n) = usize::try_from(n) else { continue };
        if let Some(inode) = socket_inode(&link[..n.min(link.len())]) {
            found(inode, fd);
        }
    }
    // SAFETY: dir is valid and not used afterwards.
    unsafe { libc::closedir(dir) };
}

/// `socket:[12345]` → 12345.
pub fn socket_inode(link: &[u8]) -> Option<u32> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn link_text() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"pipe:[12345]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
        assert_eq!(socket_inode(b"socket:[]"), None);
    }

    #[test]
    fn finds_our_own_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let inode = u32::try_from(std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino()).unwrap();
        let owners = Owners::scan();
        let me: Vec<_> = owners.of(inode).map(|(p, fd)| (p.pid, fd)).collect();
        assert_eq!(me, vec![(std::process::id(), u32::try_from(fd).unwrap())]);
        assert_eq!(owners.of(0).count(), 0);
    }
}
