//! Accept completion: a child socket leaves the accept queue. Emits `accept` with the queue wait.
//!
//! Hooks, best first: `fexit/inet_csk_accept` (the return value is the context slot after the
//! parameters; their count comes from BTF: 4 before 6.10, 2 since), `kprobe`+`kretprobe` on the same function,
//! and the `syscalls:sys_exit_accept{,4}` tracepoints, which resolve the listening and the returned
//! file descriptors to their sockets: the listening fd read from the syscall's saved registers
//! (`bpf_task_pt_regs`, 5.15+), else remembered from `sys_enter_accept{,4}` in `ACCEPTING`.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_task_pt_regs},
    macros::{fexit, kprobe, kretprobe, tracepoint},
    programs::{FExitContext, ProbeContext, RetProbeContext, TracePointContext},
};
use socktrace_common::{Event, KernelOffsets, flags, hook, kind, stat};

use crate::{
    kernel::{FdTable, OpenSocket, SockHead, TCP_SYN_RECV, fill_comm, fill_queue, fill_remote, fill_task, fill_task_ids, now, off, read, sock_in, sock_of_fd, socket_in},
    maps::{ACCEPTING, ENQUEUED, count, emit, insert_counted, muted, remove_counted},
};

/// `*(u64 *)(ctx + OFF)` as one instruction with the constant offset.
macro_rules! ctx_slot {
    ($ctx:expr, $off:literal) => {{
        let v: u64;
        // SAFETY: a read of the tracing context at an offset userspace checked against the
        // function's BTF; the verifier checks it again.
        unsafe {
            core::arch::asm!(concat!("{v} = *(u64 *)({c} + ", $off, ")"), c = in(reg) $ctx, v = lateout(reg) v, options(readonly, nostack, preserves_flags));
        }
        v
    }};
}

#[fexit(function = "inet_csk_accept")]
pub fn accept_fexit(ctx: FExitContext) -> i32 {
    let listener: u64 = ctx.arg(0);
    // An fexit context is the parameters followed by the return value. bpf_get_func_ret would
    // find it without the count but needs 5.17. The verifier allows only a constant offset in the
    // load instruction itself (a computed ctx pointer is refused), which LLVM would produce from
    // `ctx.arg(n)` arms, so each count has its own load in asm; userspace skips this hook for
    // any other count.
    let ctx = ctx.as_ptr();
    let child = match off!(accept_ret_arg) {
        2 => ctx_slot!(ctx, 16),
        3 => ctx_slot!(ctx, 24),
        4 => ctx_slot!(ctx, 32),
        _ => return 0,
    };
    let _ = emit_accept(listener, child, 0, hook::FEXIT);
    0
}

#[kprobe(function = "inet_csk_accept")]
pub fn accept_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(listener) = ctx.arg::<u64>(0) {
        let _ = insert_counted(&ACCEPTING, bpf_get_current_pid_tgid(), listener, stat::ACCEPTING_INSERTS);
    }
    0
}

#[kretprobe(function = "inet_csk_accept")]
pub fn accept_kretprobe(ctx: RetProbeContext) -> u32 {
    let _ = try_accept_kretprobe(&ctx);
    0
}

fn try_accept_kretprobe(ctx: &RetProbeContext) -> Result<u32, i64> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let listener = unsafe { ACCEPTING.get(id) }.copied().ok_or(-1i64)?;
    remove_counted(&ACCEPTING, id, stat::ACCEPTING_DELETES);
    let child: u64 = ctx.ret();
    emit_accept(listener, child, 0, hook::KRETPROBE)
}

#[tracepoint(category = "syscalls", name = "sys_enter_accept4")]
pub fn accept4_enter(ctx: TracePointContext) -> u32 {
    accept_enter(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_enter_accept")]
pub fn accept_enter_tp(ctx: TracePointContext) -> u32 {
    accept_enter(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn accept4_exit(ctx: TracePointContext) -> u32 {
    let _ = accept_exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn accept_exit_tp(ctx: TracePointContext) -> u32 {
    let _ = accept_exit(&ctx);
    0
}

#[inline(always)]
fn accept_enter(ctx: &TracePointContext) -> u32 {
    let at = off!(tp_accept_fd) as usize;
    // SAFETY: offset validated against the tracepoint's format file by userspace.
    if let Ok(fd) = unsafe { ctx.read_at::<i64>(at) } {
        let _ = insert_counted(&ACCEPTING, bpf_get_current_pid_tgid(), fd as u64, stat::ACCEPTING_INSERTS);
    }
    0
}

#[inline(always)]
fn accept_exit(ctx: &TracePointContext) -> Result<u32, i64> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let listener_fd = unsafe { ACCEPTING.get(id) }.copied().ok_or(-1i64)?;
    remove_counted(&ACCEPTING, id, stat::ACCEPTING_DELETES);
    let ret = syscall_ret(ctx)?;
    if ret < 0 {
        return Ok(0);
    }
    let fds = FdTable::current()?;
    emit_accept_fds(&fds, listener_fd as i64, ret)
}

/// An accept seen at the syscall's exit, from the listening fd and the returned one: the
/// listening socket's inode comes from its `struct socket`, one read fewer than from the sock.
#[inline(always)]
fn emit_accept_fds(fds: &FdTable, listener_fd: i64, child_fd: i64) -> Result<u32, i64> {
    let listener: OpenSocket = socket_in(fds, listener_fd)?;
    emit_accept(listener.sk, sock_in(fds, child_fd)?, listener.ino(), hook::TRACEPOINT)
}

/// `ret` of `sys_exit_accept{,4}`: a direct context load at 16, where every kernel puts it (after
/// the 8-byte common header and the syscall number), else a helper read at the format file's
/// offset.
#[inline(always)]
fn syscall_ret(ctx: &TracePointContext) -> Result<i64, i64> {
    let at = off!(tp_accept_ret);
    if at == 16 {
        return Ok(ctx_slot!(ctx.as_ptr(), 16) as i64);
    }
    // SAFETY: offset validated against the tracepoint's format file by userspace.
    unsafe { ctx.read_at::<i64>(at as usize) }.map_err(i64::from)
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn accept4_exit_regs(ctx: TracePointContext) -> u32 {
    let _ = try_accept_exit_regs(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn accept_exit_regs(ctx: TracePointContext) -> u32 {
    let _ = try_accept_exit_regs(&ctx);
    0
}

/// accept(2) returned: the listening fd is the syscall's first argument, still in the registers
/// the syscall entry saved (the syscall does not write them; offset from BTF). The registers and
/// the task's fd table are reached through BTF pointers with plain loads (no helper call per
/// field); a kernel whose verifier refuses that refuses this program, and the entry + exit pair
/// below is used instead.
#[inline(always)]
fn try_accept_exit_regs(ctx: &TracePointContext) -> Result<u32, i64> {
    let ret = syscall_ret(ctx)?;
    let arg0 = off!(pt_regs_arg0);
    if ret < 0 || arg0 == KernelOffsets::ABSENT {
        return Ok(0);
    }
    // SAFETY: helpers without preconditions; both return BTF pointers (the current task, its
    // saved user registers), whose loads the verifier checks against the kernel's BTF.
    let task = unsafe { bpf_get_current_task_btf() };
    // SAFETY: as above.
    let regs = unsafe { bpf_task_pt_regs(task) } as *const u8;
    // SAFETY: a load of `pt_regs` at the BTF offset of the first argument's register.
    let listener_fd: i64 = unsafe { core::ptr::read(regs.add(arg0 as usize).cast::<i64>()) };
    let fds = FdTable::of_task_btf(task.cast())?;
    emit_accept_fds(&fds, listener_fd, ret)
}

/// listen(2): the backlog the application asked for, before the kernel caps it at somaxconn.
#[tracepoint(category = "syscalls", name = "sys_enter_listen")]
pub fn listen_enter(ctx: TracePointContext) -> u32 {
    let _ = try_listen(&ctx);
    0
}

#[inline(always)]
fn try_listen(ctx: &TracePointContext) -> Result<u32, i64> {
    let fd_at = off!(tp_listen_fd) as usize;
    let backlog_at = off!(tp_listen_backlog) as usize;
    // SAFETY: offsets validated against the tracepoint's format file by userspace.
    let fd = unsafe { ctx.read_at::<i64>(fd_at) }.map_err(i64::from)?;
    // SAFETY: as above.
    let backlog = unsafe { ctx.read_at::<i64>(backlog_at) }.map_err(i64::from)?;
    let sk = sock_of_fd(fd)?;
    let head = SockHead::read(sk)?;
    if !head.is_inet_tcp()? {
        return Ok(0);
    }
    let mut ev = Event::ZERO;
    ev.ts_ns = now();
    ev.kind = kind::LISTEN;
    ev.hook = hook::TRACEPOINT;
    ev.sock_id = sk;
    head.fill_local(&mut ev)?;
    ev.queue_max = backlog.clamp(0, i64::from(u32::MAX)) as u32;
    ev.flags |= flags::HAS_QUEUE;
    fill_task(&mut ev);
    emit(&mut ev);
    Ok(0)
}

/// One `accept` event: listener's address and queue, child's peer, wait since enqueue.
/// `listener_ino`: the listening socket's inode when the caller knows it (0: read from the sock).
#[inline(always)]
fn emit_accept(listener: u64, child: u64, listener_ino: u32, via: u32) -> Result<u32, i64> {
    if child == 0 {
        return Ok(0);
    }
    // The child is what the listener accepted: checking the listener's family and protocol
    // checks the child's (accept(2) on a unix socket ends here).
    let head = SockHead::read(listener)?;
    if !head.is_inet_tcp()? {
        return Ok(0);
    }
    let mut ev = Event::ZERO;
    ev.ts_ns = now();
    ev.kind = kind::ACCEPT;
    ev.hook = via;
    ev.sock_id = listener;
    ev.sock_ino = listener_ino;
    head.fill_local(&mut ev)?;
    fill_task_ids(&mut ev);
    // The peer and the thread's name are only in the event: views that aggregate in the kernel
    // mute accepts (the acceptors map reads the name itself, about once a second per thread).
    if !muted(kind::ACCEPT) {
        fill_remote(&mut ev, child)?;
        fill_comm(&mut ev);
    }
    let state: u8 = read(child, off!(skc_state))?;
    let _ = fill_queue(&mut ev, listener);
    if off!(tcp_rcvq_time) != KernelOffsets::ABSENT {
        match established_at(child, state) {
            Some(start) => {
                ev.accept_wait_ns = ev.ts_ns.saturating_sub(start);
                ev.flags |= flags::HAS_WAIT;
            }
            None => count(stat::ACCEPT_NO_WAIT),
        }
    // SAFETY: the value is copied out before the entry is removed.
    } else if let Some(start) = unsafe { ENQUEUED.get(child) }.copied() {
        remove_counted(&ENQUEUED, child, stat::ENQUEUED_DELETES);
        ev.accept_wait_ns = ev.ts_ns.saturating_sub(start);
        ev.flags |= flags::HAS_WAIT;
    } else {
        // Queued before the programs were loaded, or its entry was evicted: counted, so a lost
        // wait is never silent (the agent bounds the evicted share with the map's evictions).
        count(stat::ACCEPT_NO_WAIT);
    }
    emit(&mut ev);
    Ok(0)
}

/// When `child`'s handshake completed, in ns of the monotonic clock (`tcp_sock.rcvq_space.time`,
/// µs, set by `tcp_init_buffer_space` right after the child joined the accept queue and changed
/// only by reads from the socket, which cannot precede its accept). `None` while the child is
/// still in SYN_RECV (a TFO child, or one accepted in the instant between its queueing and its
/// establishment: the field then holds the listener's value) or when the stamp is not usable.
#[inline(always)]
fn established_at(child: u64, state: u8) -> Option<u64> {
    if state == TCP_SYN_RECV as u8 {
        return None;
    }
    let us: u64 = read(child, off!(tcp_rcvq_time)).ok()?;
    // A bound instead of saturating_mul, which needs a 128-bit multiply BPF does not have.
    (us != 0 && us < u64::MAX / 1000).then(|| us.wrapping_mul(1000))
}
