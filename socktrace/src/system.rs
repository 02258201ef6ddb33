//! Host facts and preconditions the tracer needs: root, tracefs mounted, the cgroup-v2 mount, and
//! network-namespace identity (inode numbers) for filters.

use std::{
    ffi::CString,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("socktrace must run as root to load eBPF programs (euid is {0}); try sudo")]
    NotRoot(u32),
    #[error("tracefs is not mounted at {path} and mounting it failed: {source}")]
    Tracefs { path: PathBuf, source: std::io::Error },
    #[error("no cgroup v2 mount found in /proc/self/mountinfo (needed for the cgroup_skb SYN-drop hook)")]
    NoCgroup2,
    #[error("network namespace {arg:?}: {message}")]
    Netns { arg: String, message: String },
}

pub const TRACEFS: &str = "/sys/kernel/tracing";

pub fn require_root() -> Result<(), SystemError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 { Ok(()) } else { Err(SystemError::NotRoot(euid)) }
}

/// Mounts tracefs at /sys/kernel/tracing if it is not there (classic tracepoints need it).
pub fn ensure_tracefs() -> Result<PathBuf, SystemError> {
    let path = PathBuf::from(TRACEFS);
    if path.join("events").is_dir() {
        return Ok(path);
    }
    let target = CString::new(TRACEFS).unwrap_or_default();
    let fstype = CString::new("tracefs").unwrap_or_default();
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(SystemError::Tracefs { path, source: std::io::Error::last_os_error() });
    }
    Ok(path)
}

/// The cgroup-v2 mount point (e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified on hybrid hosts).
pub fn cgroup2_root() -> Result<PathBuf, SystemError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|_| SystemError::NoCgroup2)?;
    cgroup2_in_mountinfo(&text)
}

/// The first cgroup-v2 mount point in the text of `/proc/PID/mountinfo`.
pub fn cgroup2_in_mountinfo(text: &str) -> Result<PathBuf, SystemError> {
    text.lines()
        .find_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            pre.split_whitespace().nth(4).map(PathBuf::from)
        })
        .ok_or(SystemError::NoCgroup2)
}

/// Resolves a `--netns` argument: an inode number, or a path (`/run/netns/NAME`,
/// `/proc/PID/ns/net`) whose inode is used, or a bare name under /run/netns.
pub fn netns_inode(arg: &str) -> Result<u32, SystemError> {
    if let Ok(n) = arg.parse::<u32>() {
        return Ok(n);
    }
    let path = if arg.contains('/') { PathBuf::from(arg) } else { Path::new("/run/netns").join(arg) };
    let meta = std::fs::metadata(&path)
        .map_err(|e| SystemError::Netns { arg: arg.to_owned(), message: format!("{}: {e}", path.display()) })?;
    u32::try_from(meta.ino())
        .map_err(|_| SystemError::Netns { arg: arg.to_owned(), message: "inode out of range".into() })
}

/// Monotonic clock (the clock of `bpf_ktime_get_ns`), in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Inode of the caller's network namespace.
pub fn own_netns() -> Option<u32> {
    std::fs::metadata("/proc/self/ns/net").ok().and_then(|m| u32::try_from(m.ino()).ok())
}

/// Allocations from this size up get their own mapping, returned to the OS when freed.
const MMAP_THRESHOLD: i32 = 64 * 1024;

/// Sets glibc malloc up for a long-running agent, before anything sizeable is allocated: buffers of
/// [`MMAP_THRESHOLD`] and more (sock_diag dumps, map reads, the /metrics text, the BTF parse) each
/// get their own mapping. glibc's default threshold rises to the largest such buffer freed so far
/// (up to 32 MiB), after which they come from the heap, where small long-lived allocations made
/// meanwhile pin them: a 3-minute churn soak grew the heap by 2.7 MiB that way (+3.7 MiB RSS), with
/// the fixed threshold 0.7 MiB (docs/BENCHMARKS.md, "Where the soak's RSS growth comes from").
/// `MALLOC_MMAP_THRESHOLD_` in the environment still wins.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only changes a malloc parameter; no allocation is in flight.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// Gives heap memory that was freed back to the OS. glibc keeps freed chunks mapped: parsing the
/// kernel BTF at start-up (twice: offsets, then the loader) peaks at ~56 MB of heap, all freed once
/// the programs are loaded (RSS ~24 → ~15 MiB after this); later, each interval's transient
/// buffers (the socket-owner scan in its worker threads, sock_diag dumps, the /metrics text)
/// leave ~17 MiB behind with 1k listeners and 100k sockets.
pub fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: no preconditions; only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
