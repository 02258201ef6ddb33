//! Which processes hold each socket: one pass over /proc/*/fd mapping socket inodes to
//! (pid, comm, fd), as `ss -p` does. Processes this user may not inspect are skipped silently,
//! and so are processes that exit during the scan. Not a process table: only socket holders.

use std::{
    ffi::{CStr, CString},
    os::unix::ffi::OsStrExt as _,
};

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
}

impl Owners {
    /// Scans every /proc/PID/fd once.
    pub fn scan() -> Owners {
        let mut owners = Owners::default();
        let Ok(dir) = std::fs::read_dir("/proc") else { return owners };
        let mut link = [0u8; 64];
        for entry in dir.flatten() {
            let Some(pid) = std::str::from_utf8(entry.file_name().as_bytes()).ok().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let before = owners.entries.len();
            let idx = u32::try_from(owners.procs.len()).unwrap_or(u32::MAX);
            scan_fds(pid, &mut link, |inode, fd| owners.entries.push((inode, idx, fd)));
            if owners.entries.len() > before {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                owners.procs.push(Process { pid, comm: comm.trim_end_matches('\n').to_owned() });
            }
        }
        owners.entries.sort_unstable();
        owners
    }

    /// Holders of a socket inode: (process, fd), by pid then fd. Empty for inode 0.
    pub fn of(&self, inode: u32) -> impl Iterator<Item = (&Process, u32)> {
        let start = self.entries.partition_point(|e| e.0 < inode);
        let end = start + self.entries[start..].partition_point(|e| e.0 == inode);
        let hits = if inode == 0 { &[][..] } else { &self.entries[start..end] };
        hits.iter().filter_map(|&(_, idx, fd)| Some((self.procs.get(idx as usize)?, fd)))
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
fn socket_inode(link: &[u8]) -> Option<u32> {
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
