//! Socket holders from the kernel in one pass: loads `socktrace-iter` (a BPF task-file iterator,
//! socktrace-ebpf/src/iter_sockets.rs), reads its (pid, comm, fd, inode) records and hands them to
//! [`super::procs::Owners`]. Needs root and kernel BTF; [`super::procs`]'s /proc scan is the
//! fallback when this fails, and gives the same answer (tests/tests/snapshot.rs compares them).
//!
//! Start-up is most of the cost (the iteration itself takes a few ms for 20k sockets): aya's
//! `EbpfLoader::new` parses the kernel BTF whatever it is told (~20 ms), so it runs on its own
//! thread while this one maps the BTF and finds the offsets with [`super::btf_scan`].

use std::{fs::File, io::Read as _, path::Path};

use aya::{EbpfLoader, programs::Iter};
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

/// Every socket descriptor of every process (thread-group leader), from the iterator.
pub fn socket_fds(btf_path: &Path) -> Result<Vec<SocketFd>, IterError> {
    if OBJECT.is_empty() {
        return Err(IterError::NoObject);
    }
    // The kernel writes task->pid, a pid in the initial namespace; /proc here may show others.
    if std::fs::read_link("/proc/self/ns/pid").ok().as_deref() != Some(Path::new(INIT_PID_NS)) {
        return Err(IterError::PidNamespace);
    }
    let (layout, loader) = std::thread::scope(|s| {
        let loader = s.spawn(EbpfLoader::new);
        // The stand-in BTF is built here too, beside the loader's parse.
        let layout = layout(btf_path).map(|(offsets, id)| (offsets, attach_target_btf(id)));
        (layout, loader.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    });
    let (offsets, btf) = layout?;
    let load = |e: &dyn std::fmt::Display| IterError::Load(e.to_string());
    // No BTF for the object: it has no CO-RE relocations (offsets come as a global).
    let mut loader = loader;
    let mut ebpf = loader.btf(None).override_global("ITER_OFFSETS", &offsets, true).load(OBJECT).map_err(|e| load(&e))?;
    let prog: &mut Iter = ebpf
        .program_mut("iter_sockets")
        .ok_or_else(|| IterError::Load("program iter_sockets missing from the object".into()))?
        .try_into()
        .map_err(|e| load(&e))?;
    prog.load("task_file", &btf).map_err(|e| load(&e))?;
    let link = prog.attach().map_err(|e| load(&e))?;
    let link = prog.take_link(link).map_err(|e| load(&e))?;
    let mut file = link.into_file().map_err(|e| load(&e))?;
    let mut buf = Vec::with_capacity(1 << 20);
    file.read_to_end(&mut buf).map_err(IterError::Read)?;
    let size = size_of::<SocketFd>();
    if buf.len() % size != 0 {
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
/// (Linux ≥ 6.16 allows a private read-only mapping of /sys/kernel/btf/vmlinux), else read.
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

/// An aya `Btf` holding only [`TARGET`] at its kernel type id `id`: `Iter::load` looks its attach
/// target up by name in an aya `Btf`, and another full parse of the kernel's would cost more than
/// the rest of the iterator (~15 ms); the raw scan already found the id.
fn attach_target_btf(id: u32) -> aya::Btf {
    use aya_obj::btf::{BtfType, Func, FuncLinkage};
    let mut btf = aya::Btf::new();
    let name = btf.add_string(TARGET);
    // Type 0 is void; unnamed fillers up to id - 1 keep the target at its kernel id.
    for _ in 1..id {
        btf.add_type(BtfType::Func(Func::new(0, 0, FuncLinkage::Static)));
    }
    btf.add_type(BtfType::Func(Func::new(name, 0, FuncLinkage::Static)));
    btf
}
