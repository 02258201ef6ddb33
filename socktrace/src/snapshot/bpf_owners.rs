//! Socket holders from the kernel in one pass: loads `socktrace-iter` (a BPF task-file iterator,
//! socktrace-ebpf/src/iter_sockets.rs), reads its (pid, comm, fd, inode) records and hands them to
//! [`super::procs::Owners`]. Needs root and kernel BTF; [`super::procs`]'s /proc scan is the
//! fallback when this fails, and gives the same answer (tests/tests/snapshot.rs compares them).
//!
//! Start-up is most of the cost (the iteration itself takes a few ms for 20k sockets), so the
//! kernel BTF is mapped and scanned only for the names needed ([`super::btf_scan`]), and the
//! program is loaded without aya's `EbpfLoader` (see [`load_iterator`]).

use std::{
    fs::File,
    io::Read as _,
    os::fd::AsRawFd as _,
    path::Path,
};

use socktrace_common::iter::{IterOffsets, SocketFd};

use super::btf_scan::RawBtf;

#[derive(Debug, thiserror::Error)]
pub enum IterError {
    #[error("this binary was built without its eBPF objects (AYA_BUILD_SKIP was set)")]
    NoObject,
    #[error("not in the initial PID namespace (the iterator reports host pids)")]
    PidNamespace,
    #[error("cannot read kernel BTF {0}: {1}")]
    Btf(String, String),
    #[error(transparent)]
    Layout(#[from] super::btf_scan::ScanError),
    #[error("loading the task-file iterator: {0}")]
    Load(String),
    #[error("reading the task-file iterator: {0}")]
    Read(std::io::Error),
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/socktrace-iter"));

/// The init PID namespace's inode (`PROC_PID_INIT_INO`, fixed by the kernel ABI).
const INIT_PID_NS: &str = "pid:[4026531836]";
/// The iterator's attach target in the kernel BTF.
const TARGET: &str = "bpf_iter_task_file";

/// The iterator's two programs, in the order they are tried: plain BTF loads, then helper reads
/// (for a verifier that refuses the first).
const PROGRAMS: [&str; 2] = ["iter_sockets_btf", "iter_sockets"];

/// Every socket descriptor of every process (thread-group leader), from the iterator.
pub fn socket_fds(btf_path: &Path) -> Result<Vec<SocketFd>, IterError> {
    socket_fds_with(btf_path, &PROGRAMS)
}

/// [`socket_fds`] from the first of `programs` the kernel loads.
fn socket_fds_with(btf_path: &Path, programs: &[&str]) -> Result<Vec<SocketFd>, IterError> {
    if OBJECT.is_empty() {
        return Err(IterError::NoObject);
    }
    // The kernel writes task->pid, a pid in the initial namespace; /proc here may show others.
    if std::fs::read_link("/proc/self/ns/pid").ok().as_deref() != Some(Path::new(INIT_PID_NS)) {
        return Err(IterError::PidNamespace);
    }
    let (offsets, attach_id) = layout(btf_path)?;
    let mut file = load_iterator(&offsets, attach_id, programs)?;
    let mut buf = Vec::with_capacity(1 << 20);
    file.read_to_end(&mut buf).map_err(IterError::Read)?;
    records(&buf)
}

/// The iterator's output: whole [`SocketFd`] records, nothing else.
pub fn records(buf: &[u8]) -> Result<Vec<SocketFd>, IterError> {
    let size = size_of::<SocketFd>();
    if !buf.len().is_multiple_of(size) {
        return Err(IterError::Read(std::io::Error::other(format!("{} bytes is not a whole number of records", buf.len()))));
    }
    Ok(buf
        .chunks_exact(size)
        // SAFETY: each chunk is size_of::<SocketFd>() bytes; SocketFd is plain integers (any bit
        // pattern is valid) and read_unaligned needs no alignment.
        .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<SocketFd>()) })
        .collect())
}

/// The iterator's offsets and its attach target's BTF type id, from the kernel BTF: mapped
/// (this 6.18 kernel allows a private read-only mapping of /sys/kernel/btf/vmlinux; where the
/// kernel refuses it, read).
fn layout(btf_path: &Path) -> Result<(IterOffsets, u32), IterError> {
    let err = |e: std::io::Error| IterError::Btf(btf_path.display().to_string(), e.to_string());
    let file = File::open(btf_path).map_err(err)?;
    // SAFETY: a private read-only mapping; kernel BTF does not change while the system runs.
    let mapped = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) };
    let read;
    let bytes: &[u8] = if let Ok(m) = &mapped {
        m
    } else {
        read = std::fs::read(btf_path).map_err(err)?;
        &read
    };
    let raw = RawBtf::parse(bytes, &["task_struct", "file", "inode", TARGET])?;
    let offsets = IterOffsets {
        task_pid: raw.offset("task_struct", "pid")?,
        task_tgid: raw.offset("task_struct", "tgid")?,
        task_comm: raw.offset("task_struct", "comm")?,
        file_inode: raw.offset("file", "f_inode")?,
        inode_mode: raw.offset("inode", "i_mode")?,
        inode_ino: raw.offset("inode", "i_ino")?,
    };
    let id = raw.func_id(TARGET).ok_or_else(|| IterError::Load(format!("kernel BTF has no {TARGET}")))?;
    Ok((offsets, id))
}

/// Loads `iter_sockets` and opens an iterator on it: the object's maps (its `.rodata`, holding
/// `ITER_OFFSETS`) created, relocated and linked by aya-obj, the program loaded with raw bpf(2)
/// calls. Not aya's `EbpfLoader`: it parses the whole kernel BTF whatever it is told (~20 ms
/// here), more than all the rest.
fn load_iterator(offsets: &IterOffsets, attach_id: u32, programs: &[&str]) -> Result<File, IterError> {
    let load = |e: &dyn std::fmt::Display| IterError::Load(e.to_string());
    let mut obj = aya_obj::Object::parse(OBJECT).map_err(|e| load(&e))?;
    // SAFETY: IterOffsets is repr(C) plain u32s: its bytes are initialised.
    let bytes = unsafe { std::slice::from_raw_parts(std::ptr::from_ref(offsets).cast::<u8>(), size_of::<IterOffsets>()) };
    obj.patch_map_data(std::collections::HashMap::from([("ITER_OFFSETS", (bytes, true))])).map_err(|e| load(&e))?;
    let maps: Vec<(String, aya_obj::Map)> = obj.maps.drain().collect();
    let fds = maps.iter().map(|(name, m)| sys::create_map(m).map_err(|e| IterError::Load(format!("map {name}: {e}")))).collect::<Result<Vec<_>, _>>()?;
    let text_sections = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_maps(maps.iter().zip(&fds).map(|((name, m), fd)| (name.as_str(), fd.as_raw_fd(), m)), &text_sections).map_err(|e| load(&e))?;
    obj.relocate_calls(&text_sections).map_err(|e| load(&e))?;
    let mut refused = None;
    let mut prog_fd = None;
    for &name in programs {
        let prog = obj.programs.get(name).ok_or_else(|| IterError::Load(format!("program {name} missing from the object")))?;
        let func = obj.functions.get(&prog.function_key()).ok_or_else(|| IterError::Load(format!("{name} has no code")))?;
        match sys::load_iter_program(&func.instructions, &prog.license, attach_id) {
            Ok(fd) => {
                prog_fd = Some(fd);
                break;
            }
            Err(e) => refused = Some(e),
        }
    }
    let prog_fd = prog_fd.ok_or_else(|| IterError::Load(format!("BPF_PROG_LOAD: {}", refused.map_or_else(String::new, |e| e.to_string()))))?;
    let link = sys::link_iter(&prog_fd).map_err(|e| IterError::Load(format!("BPF_LINK_CREATE: {e}")))?;
    let iter = sys::create_iter(&link).map_err(|e| IterError::Load(format!("BPF_ITER_CREATE: {e}")))?;
    Ok(File::from(iter))
}

/// The few bpf(2) commands the iterator needs, with `union bpf_attr` laid out by hand (offsets
/// from include/uapi/linux/bpf.h; the kernel accepts a shorter attr and zero-fills the rest).
mod sys {
    use std::{
        ffi::CStr,
        io,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    };

    use aya_obj::{EbpfSectionKind, generated::bpf_insn};

    const BPF_MAP_CREATE: i64 = 0;
    const BPF_MAP_UPDATE_ELEM: i64 = 2;
    const BPF_PROG_LOAD: i64 = 5;
    const BPF_MAP_FREEZE: i64 = 22;
    const BPF_LINK_CREATE: i64 = 28;
    const BPF_ITER_CREATE: i64 = 33;
    const BPF_PROG_TYPE_TRACING: u32 = 26;
    const BPF_TRACE_ITER: u32 = 28;

    /// A zeroed, 8-byte aligned `bpf_attr` with little helpers to fill it.
    #[repr(C, align(8))]
    struct Attr([u8; 128]);

    impl Attr {
        fn new() -> Attr {
            Attr([0; 128])
        }
        fn u32(&mut self, at: usize, v: u32) -> &mut Attr {
            self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn u64(&mut self, at: usize, v: u64) -> &mut Attr {
            self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn call(&self, cmd: i64) -> io::Result<i64> {
            // SAFETY: bpf(2) with a valid attr buffer of the size passed; pointers inside it are
            // set by the callers to memory that outlives the call.
            let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, self.0.as_ptr(), self.0.len()) };
            if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
        }
        fn fd(&self, cmd: i64) -> io::Result<OwnedFd> {
            let fd = i32::try_from(self.call(cmd)?).map_err(io::Error::other)?;
            // SAFETY: the kernel returned a new fd that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    }

    fn fd_u32(fd: &OwnedFd) -> u32 {
        u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
    }

    /// An array map like `m` (the object's global data), filled with its data; `.rodata` frozen.
    pub fn create_map(m: &aya_obj::Map) -> io::Result<OwnedFd> {
        let fd = Attr::new()
            .u32(0, m.map_type())
            .u32(4, m.key_size())
            .u32(8, m.value_size())
            .u32(12, m.max_entries())
            .u32(16, m.map_flags())
            .fd(BPF_MAP_CREATE)?;
        let data = m.data();
        if !data.is_empty() {
            let key = 0u32;
            Attr::new()
                .u32(0, fd_u32(&fd))
                .u64(8, std::ptr::from_ref(&key) as u64)
                .u64(16, data.as_ptr() as u64)
                .call(BPF_MAP_UPDATE_ELEM)?;
        }
        if matches!(m.section_kind(), EbpfSectionKind::Rodata) {
            Attr::new().u32(0, fd_u32(&fd)).call(BPF_MAP_FREEZE)?;
        }
        Ok(fd)
    }

    /// `BPF_PROG_LOAD` of a tracing program attached to the iterator target `attach_btf_id`.
    pub fn load_iter_program(insns: &[bpf_insn], license: &CStr, attach_btf_id: u32) -> io::Result<OwnedFd> {
        Attr::new()
            .u32(0, BPF_PROG_TYPE_TRACING)
            .u32(4, u32::try_from(insns.len()).map_err(io::Error::other)?)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(68, BPF_TRACE_ITER) // expected_attach_type
            .u32(108, attach_btf_id)
            .fd(BPF_PROG_LOAD)
    }

    /// `BPF_LINK_CREATE` of an iterator link (no `iter_info`: every task).
    pub fn link_iter(prog: &OwnedFd) -> io::Result<OwnedFd> {
        Attr::new().u32(0, fd_u32(prog)).u32(8, BPF_TRACE_ITER).fd(BPF_LINK_CREATE)
    }

    /// `BPF_ITER_CREATE`: a readable fd that runs the iterator.
    pub fn create_iter(link: &OwnedFd) -> io::Result<OwnedFd> {
        Attr::new().u32(0, fd_u32(link)).fd(BPF_ITER_CREATE)
    }
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};

    use super::*;

    /// Each program on its own finds this process's socket descriptors, with their inodes and
    /// this process's name: the plain-load program, and the helper-read fallback that a kernel
    /// refusing the first would use. Needs root (loading BPF); skipped otherwise.
    #[test]
    fn both_programs_find_this_process_sockets() {
        if OBJECT.is_empty() || !is_root() {
            assert!(std::env::var_os("SOCKTRACE_REQUIRE_BPF").is_none(), "SOCKTRACE_REQUIRE_BPF is set: needs root and the eBPF object");
            eprintln!("skipped: needs root and the eBPF object");
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let pid = std::process::id();
        let inode = |fd: i32| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        let want = [(listener.as_raw_fd(), inode(listener.as_raw_fd())), (client.as_raw_fd(), inode(client.as_raw_fd()))];
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        for program in PROGRAMS {
            let records = socket_fds_with(Path::new("/sys/kernel/btf/vmlinux"), &[program]).unwrap();
            for (fd, ino) in want {
                let r = records.iter().find(|r| r.pid == pid && r.fd == fd as u32).unwrap_or_else(|| panic!("{program}: fd {fd} missing"));
                assert_eq!(r.inode, ino, "{program}: fd {fd}");
                let name = String::from_utf8_lossy(&r.comm);
                assert_eq!(name.trim_end_matches('\0'), comm.trim_end(), "{program}");
            }
            assert!(records.iter().all(|r| r.inode != 0), "{program}: a record without an inode");
        }
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
