//! Socket holders in one pass: a BPF task-file iterator (`iter/task_file`) that writes a
//! [`SocketFd`] for every socket descriptor of every thread-group leader, for `snapshot`'s process
//! names (the /proc/*/fd readlink scan is its fallback). The kernel calls the program once per open
//! file of each task with its own file table; userspace reads the records from the iterator's fd.
//!
//! Not a hook: nothing is attached to a running path, it runs only while `snapshot` reads it.

use core::ffi::c_void;

use aya_ebpf::{
    Global,
    bindings::seq_file,
    helpers::{bpf_probe_read_kernel, bpf_seq_write},
};
use socktrace_common::iter::{IterOffsets, SocketFd};

#[unsafe(no_mangle)]
static ITER_OFFSETS: Global<IterOffsets> = Global::new(IterOffsets::ZERO);

/// `struct bpf_iter__task_file`: every member is 8-byte aligned (`__bpf_md_ptr`, `fd __aligned(8)`).
#[repr(C)]
pub struct TaskFileCtx {
    meta: *const IterMeta,
    task: u64,
    fd: u32,
    _pad: u32,
    file: u64,
}

/// `struct bpf_iter_meta`: the seq_file to write to comes first.
#[repr(C)]
struct IterMeta {
    seq: *mut seq_file,
}

const S_IFMT: u16 = 0o170_000;
const S_IFSOCK: u16 = 0o140_000;

macro_rules! ioff {
    ($field:ident) => {{
        let base = core::ptr::from_ref(&ITER_OFFSETS).cast::<IterOffsets>();
        // SAFETY: Global<T> is repr(transparent) over an initialised T.
        unsafe { core::ptr::read_volatile(&raw const (*base).$field) }
    }};
}

/// How a program reads a kernel field: the two programs share one body and differ only in this.
trait Reader {
    /// `*(T *)(base + offset)`.
    fn get<T>(base: u64, offset: u32) -> Result<T, i64>;
}

/// Plain loads: `task` and `file` are BTF pointers, so the verifier checks each load against the
/// kernel's BTF (the offsets come from a frozen read-only map, which it reads as constants) and
/// turns a fault into a zero, instead of a helper call per field.
struct Load;

impl Reader for Load {
    #[inline(always)]
    fn get<T>(base: u64, offset: u32) -> Result<T, i64> {
        // SAFETY: `base` is a BTF pointer the verifier tracks and `offset` a field of its type;
        // the verifier checks the load against BTF and makes it fault-safe.
        Ok(unsafe { core::ptr::read((base as *const u8).add(offset as usize).cast::<T>()) })
    }
}

/// A `bpf_probe_read_kernel` call per field, for verifiers that refuse the plain loads.
struct Probe;

impl Reader for Probe {
    #[inline(always)]
    fn get<T>(base: u64, offset: u32) -> Result<T, i64> {
        // SAFETY: bpf_probe_read_kernel copes with any address.
        unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.map_err(i64::from)
    }
}

/// The iterator program with plain loads ([`Load`]): about a fifth of `snapshot`'s time went to
/// the helper calls of [`iter_sockets`], which userspace loads where a verifier refuses this one.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn iter_sockets_btf(ctx: *mut c_void) -> i32 {
    let _ = try_iter_sockets::<Load>(ctx.cast());
    0
}

/// The iterator program with helper reads ([`Probe`]; section `iter/task_file`: aya-ebpf 0.2 has
/// no `#[iter]` macro).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn iter_sockets(ctx: *mut c_void) -> i32 {
    let _ = try_iter_sockets::<Probe>(ctx.cast());
    0
}

#[inline(always)]
fn try_iter_sockets<R: Reader>(ctx: *const TaskFileCtx) -> Result<(), i64> {
    // SAFETY: the kernel passes a valid context; task and file are NULL on the final call.
    let (meta, task, fd, file) = unsafe { ((*ctx).meta, (*ctx).task, (*ctx).fd, (*ctx).file) };
    if task == 0 || file == 0 {
        return Ok(());
    }
    // Sockets first (two reads), the task's ids only for them.
    let inode: u64 = R::get(file, ioff!(file_inode))?;
    if inode == 0 {
        return Ok(());
    }
    let mode: u16 = R::get(inode, ioff!(inode_mode))?;
    if mode & S_IFMT != S_IFSOCK {
        return Ok(());
    }
    let pid: u32 = R::get(task, ioff!(task_pid))?;
    let tgid: u32 = R::get(task, ioff!(task_tgid))?;
    if pid != tgid {
        // A thread with a file table of its own: /proc/PID/fd shows the leader's only.
        return Ok(());
    }
    let mut rec = SocketFd { pid, fd, inode: R::get(inode, ioff!(inode_ino))?, comm: [0; 16] };
    // The name as two 8-byte words; a failed read leaves that half empty.
    let comm_at = ioff!(task_comm);
    let lo: u64 = R::get(task, comm_at).unwrap_or(0);
    let hi: u64 = R::get(task, comm_at.wrapping_add(8)).unwrap_or(0);
    rec.comm[..8].copy_from_slice(&lo.to_ne_bytes());
    rec.comm[8..].copy_from_slice(&hi.to_ne_bytes());
    // SAFETY: meta is the kernel's bpf_iter_meta (a trusted pointer), its seq the iterator's seq_file.
    let seq = unsafe { (*meta).seq };
    // SAFETY: rec lives on the stack for the call; its size is what is passed.
    unsafe { bpf_seq_write(seq, core::ptr::from_ref(&rec).cast(), size_of::<SocketFd>() as u32) };
    Ok(())
}
