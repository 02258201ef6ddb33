//! Drops confirmed by the kernel's own counter, for the fentry/fexit and kprobe/kretprobe hooks on
//! `tcp_conn_request` (SYN drops) and `tcp_v{4,6}_syn_recv_sock` (3rd-ACK overflows).
//!
//! Those hooks cannot see the kernel's `sk_acceptq_is_full` decision. Re-checking the queue at
//! function entry races with accept() draining it and other CPUs filling it before the kernel's own
//! check: in the qemu kernel matrix that was off by one (either way) in about one run in four.
//! Instead the entry hook saves this CPU's `LINUX_MIB_LISTENOVERFLOWS` count of the listener's
//! netns and the exit hook reports a drop when it grew. These functions run in softirq context (no
//! migration, no other softirq on this CPU), so only this call can have incremented this CPU's
//! count. Nested calls — a TFO child created inside `tcp_conn_request`, `tcp_v6_syn_recv_sock`
//! calling the v4 one for a v4-mapped peer — consume their increment so it is reported once.
//!
//! This CPU's per-CPU offset is `__per_cpu_offset[cpu]` when kallsyms lists it; kernels without
//! CONFIG_KALLSYMS_ALL (this project's 6.18 machines) list no data symbols, and then the offset is
//! derived from a per-CPU map of our own ([`cpu_offset`]). Without either, the entry hooks fall back
//! to the entry-time queue check and the exit hooks do nothing. The cgroup_skb SYN-drop hook uses
//! the same counter (see `syn_drop`).

use core::ptr::{addr_of, read_volatile, write_volatile};

use aya_ebpf::{helpers::bpf_get_smp_processor_id, macros::map, maps::PerCpuArray};
use socktrace_common::{Event, KernelOffsets, flags};

use crate::kernel::{accept_queue, off, read};

/// Slots of [`PENDING`], one per hooked function (they can nest, so they must not share one).
pub const CONN_REQUEST: u32 = 0;
pub const SYN_RECV_V4: u32 = 1;
pub const SYN_RECV_V6: u32 = 2;

/// What an entry hook saw, for the exit hook on the same CPU.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pending {
    /// 0: no call in progress.
    pub listener: u64,
    pub skb: u64,
    /// This CPU's LINUX_MIB_LISTENOVERFLOWS of the listener's netns at entry.
    pub count: u64,
    pub queue_len: u32,
    pub queue_max: u32,
}

#[map]
static PENDING: PerCpuArray<Pending> = PerCpuArray::with_max_entries(3, 0);

/// This CPU's per-CPU offset, derived once per CPU when kallsyms has no `__per_cpu_offset` (0: not
/// yet derived).
#[map]
static CPU_OFFSET: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Whether drops are confirmed by the counter (else: entry-time queue check).
#[inline(always)]
pub fn enabled() -> bool {
    off!(per_cpu_offset) != 0 || off!(bpf_array_pptrs) != KernelOffsets::ABSENT
}

/// This CPU's per-CPU offset (`per_cpu_ptr(p, cpu) == p + offset`): `__per_cpu_offset[cpu]`, or
/// derived from [`CPU_OFFSET`] itself: a per-CPU array lookup returns this CPU's copy of the
/// value, `array->pptrs[0] + offset`, and `pptrs[0]` is read from the map's `struct bpf_array`.
/// Both addresses pass through the map slot to become plain numbers for the verifier (storing a
/// pointer there is allowed with CAP_PERFMON / CAP_SYS_ADMIN, which loading these programs needs).
#[inline(always)]
fn cpu_offset() -> Result<u64, i64> {
    if off!(per_cpu_offset) != 0 {
        // SAFETY: no preconditions.
        let cpu = unsafe { bpf_get_smp_processor_id() };
        return read(off!(per_cpu_offset), cpu.wrapping_mul(8));
    }
    let pptrs = off!(bpf_array_pptrs);
    let slot = CPU_OFFSET.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: this CPU's slot of our own map; volatile so the stores and loads stay as written.
    let (value_here, array) = unsafe {
        let known = read_volatile(slot);
        if known != 0 {
            return Ok(known);
        }
        write_volatile(slot, slot as u64);
        let value_here = read_volatile(slot);
        write_volatile(slot, addr_of!(CPU_OFFSET) as u64);
        let array = read_volatile(slot);
        write_volatile(slot, 0);
        (value_here, array)
    };
    let pptr: u64 = read(array, pptrs)?;
    let offset = value_here.wrapping_sub(pptr);
    // SAFETY: as above.
    unsafe { write_volatile(slot, offset) };
    Ok(offset)
}

/// Address of this CPU's `LINUX_MIB_LISTENOVERFLOWS` of `sk`'s netns: `net->mib.net_statistics`
/// is per-CPU, this CPU's copy is at `+` this CPU's per-CPU offset.
#[inline(always)]
pub fn counter_here(sk: u64) -> Result<u64, i64> {
    let net: u64 = read(sk, off!(skc_net))?;
    let mib: u64 = read(net, off!(net_mib_net_statistics))?;
    let cpu_off = cpu_offset()?;
    Ok(mib.wrapping_add(cpu_off).wrapping_add(u64::from(off!(mib_listen_overflows)).wrapping_mul(8)))
}

/// This CPU's `LINUX_MIB_LISTENOVERFLOWS` of `sk`'s netns.
#[inline(always)]
fn overflows_here(sk: u64) -> Result<u64, i64> {
    read(counter_here(sk)?, 0)
}

/// Entry hook: remembers the listener, the packet, the queue and the counter.
#[inline(always)]
pub fn enter(slot: u32, listener: u64, skb: u64) -> Result<(), i64> {
    let count = overflows_here(listener)?;
    let (queue_len, queue_max) = accept_queue(listener)?;
    let p = PENDING.get_ptr_mut(slot).ok_or(-1i64)?;
    // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
    unsafe { *p = Pending { listener, skb, count, queue_len, queue_max } };
    Ok(())
}

/// Exit hook: the entry's record when the kernel counted a drop during this call.
#[inline(always)]
pub fn exit(slot: u32) -> Result<Option<Pending>, i64> {
    let p = PENDING.get_ptr_mut(slot).ok_or(-1i64)?;
    // SAFETY: as in `enter`.
    let saved = unsafe { *p };
    // SAFETY: as in `enter`.
    unsafe { (*p).listener = 0 };
    if saved.listener == 0 {
        return Ok(None);
    }
    let now = overflows_here(saved.listener)?;
    if now == saved.count {
        return Ok(None);
    }
    let grew = now.wrapping_sub(saved.count);
    // The calls this one is nested in must not report it again.
    consume(CONN_REQUEST, slot, grew);
    consume(SYN_RECV_V4, slot, grew);
    consume(SYN_RECV_V6, slot, grew);
    Ok(Some(saved))
}

#[inline(always)]
fn consume(other: u32, slot: u32, grew: u64) {
    if other == slot {
        return;
    }
    if let Some(o) = PENDING.get_ptr_mut(other) {
        // SAFETY: as in `enter`.
        unsafe {
            if (*o).listener != 0 {
                (*o).count = (*o).count.wrapping_add(grew);
            }
        }
    }
}

/// The queue as seen when it was full: at entry, else now, else unknown (the drop proves it was
/// full at the kernel's check, but neither read saw that).
#[inline(always)]
pub fn fill_full_queue(ev: &mut Event, p: &Pending) {
    let (mut len, mut max) = (p.queue_len, p.queue_max);
    if len <= max {
        (len, max) = accept_queue(p.listener).unwrap_or((0, u32::MAX));
    }
    if len > max {
        ev.queue_len = len;
        ev.queue_max = max;
        ev.flags |= flags::HAS_QUEUE;
    }
}
