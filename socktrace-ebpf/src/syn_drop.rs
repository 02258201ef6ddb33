//! SYN dropped because the accept queue is full (`tcp_conn_request`: sk_acceptq_is_full). The kernel
//! consumes that skb without a drop reason, so kfree_skb never sees it. Emits `syn_drop`.
//!
//! Hooks, best first: fentry+fexit / kprobe+kretprobe on `tcp_conn_request(rsk_ops, af_ops, sk,
//! skb)`, reporting a drop when the kernel's own ListenOverflows counter grew during the call (see
//! `counted`), then a pass-through `cgroup_skb/ingress` program that sees the SYN with its listener
//! just before `tcp_conn_request` runs. The cgroup programs ALWAYS return 1 (pass): returning 0
//! would drop the packet for every process in the cgroup.
//!
//! The cgroup hook counted (`syn_drop_cgroup_counted` + `syn_settle_consume` + `syn_settle_kfree`):
//! `tcp_v{4,6}_rcv` runs the cgroup program (`tcp_filter` → `sk_filter`) and then, synchronously in
//! the same softirq on the same CPU (listeners are processed without the socket lock),
//! `tcp_v{4,6}_do_rcv` → `tcp_rcv_state_process` → `conn_request` → `tcp_conn_request`, after which
//! the SYN's skb is freed: `consume_skb` (queued, or dropped for a full accept queue) or
//! `kfree_skb` (refused before or in `tcp_conn_request`). So at a bare SYN to a LISTEN socket the
//! cgroup program saves this CPU's ListenOverflows count of the listener's netns in a per-CPU
//! record, and the `consume_skb`/`kfree_skb` programs, on that same skb, report a drop when the
//! count grew. Between the two nothing else runs on this CPU that could count an overflow (the
//! SYN-ACK sent on loopback or veth is only queued for a later softirq round). A record still
//! pending at the next SYN on that CPU (its free was not traced: an skb with another reference) is
//! settled then and counted in `stat::SYN_SETTLED_LATE`; 3rd-ACK overflows reported on that CPU
//! in the listener's netns meanwhile raised the same counter and are subtracted
//! (`note_ack_overflow`). A SYN to a listener whose queue is more
//! than `syn_confirm_slack` children below full (64 + 2 per CPU) gets no record: nothing run on
//! this CPU in between adds to the queue, other CPUs add about one child each in that time, so it
//! cannot be dropped for a full queue (a vCPU stalled by its hypervisor right there for long enough
//! to let others fill the slack is the one way around it). A healthy listener's SYN costs one read
//! (the queue's length and limit, side by side). The old check (`syn_drop_cgroup`: the queue is full
//! just before the kernel looks) remains for kernels where the counter cannot be read.

use aya_ebpf::{
    helpers::generated::bpf_skc_to_tcp_sock,
    macros::{cgroup_skb, fentry, fexit, kprobe, kretprobe, map, raw_tracepoint},
    maps::PerCpuArray,
    programs::{FEntryContext, FExitContext, ProbeContext, RawTracePointContext, RetProbeContext, SkBuffContext},
};
use socktrace_common::{AF_INET6, Event, hook, kind, stat};

use crate::{
    counted,
    kernel::{Args, TCP_LISTEN, accept_queue, accept_queue_full, fill_local, fill_queue, fill_remote_from_skb, netns_of, now, off, read},
    maps::{count, emit},
};

#[fentry(function = "tcp_conn_request")]
pub fn syn_drop_fentry(ctx: FEntryContext) -> i32 {
    let _ = conn_request_entry(&ctx, hook::FENTRY);
    0
}

#[fexit(function = "tcp_conn_request")]
pub fn syn_drop_fexit(_ctx: FExitContext) -> i32 {
    let _ = conn_request_exit(hook::FEXIT);
    0
}

#[kprobe(function = "tcp_conn_request")]
pub fn syn_drop_kprobe(ctx: ProbeContext) -> u32 {
    let _ = conn_request_entry(&ctx, hook::KPROBE);
    0
}

#[kretprobe(function = "tcp_conn_request")]
pub fn syn_drop_kretprobe(_ctx: RetProbeContext) -> u32 {
    let _ = conn_request_exit(hook::KRETPROBE);
    0
}

/// `tcp_conn_request(rsk_ops, af_ops, sk, skb)`: the drop is confirmed at exit (see `counted`);
/// without the counter, the queue is checked here, just before the kernel does.
#[inline(always)]
fn conn_request_entry<C: Args>(ctx: &C, via: u32) -> Result<u32, i64> {
    let listener = ctx.arg_u64(2);
    let skb = ctx.arg_u64(3);
    if counted::enabled() {
        counted::enter(counted::CONN_REQUEST, listener, skb)?;
        return Ok(0);
    }
    if !accept_queue_full(listener)? {
        return Ok(0);
    }
    let mut ev = new_syn_drop(listener, via);
    let _ = fill_queue(&mut ev, listener);
    let _ = fill_remote_from_skb(&mut ev, skb);
    emit(&mut ev);
    Ok(0)
}

#[inline(always)]
fn conn_request_exit(via: u32) -> Result<u32, i64> {
    if !counted::enabled() {
        return Ok(0);
    }
    let Some(p) = counted::exit(counted::CONN_REQUEST)? else {
        return Ok(0);
    };
    let mut ev = new_syn_drop(p.listener, via);
    counted::fill_full_queue(&mut ev, &p);
    let _ = fill_remote_from_skb(&mut ev, p.skb);
    emit(&mut ev);
    Ok(0)
}

#[inline(always)]
fn new_syn_drop(listener: u64, via: u32) -> Event {
    let mut ev = Event::ZERO;
    ev.ts_ns = now();
    ev.kind = kind::SYN_DROP;
    ev.hook = via;
    ev.sock_id = listener;
    let _ = fill_local(&mut ev, listener);
    ev
}

#[cgroup_skb(ingress)]
pub fn syn_drop_cgroup(ctx: SkBuffContext) -> i32 {
    let _ = try_cgroup_skb(&ctx);
    1
}

#[cgroup_skb(ingress)]
pub fn syn_drop_cgroup_counted(ctx: SkBuffContext) -> i32 {
    let _ = try_cgroup_skb_counted(&ctx);
    1
}

#[raw_tracepoint(tracepoint = "consume_skb")]
pub fn syn_settle_consume(ctx: RawTracePointContext) -> i32 {
    settle_skb(ctx.arg_u64(0));
    0
}

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn syn_settle_kfree(ctx: RawTracePointContext) -> i32 {
    settle_skb(ctx.arg_u64(0));
    0
}

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// A SYN to a listener whose fate the kernel has not decided yet (one per CPU, see the module doc).
#[repr(C)]
#[derive(Clone, Copy)]
struct SynPending {
    /// The SYN's `struct sk_buff`; 0: no record.
    skb: u64,
    /// Address of this CPU's ListenOverflows counter of the listener's netns, and its value.
    counter: u64,
    count: u64,
    listener: u64,
    ts_ns: u64,
    rport: u16,
    /// 1: the SYN is IPv6 (else IPv4, its address in `raddr[..4]`).
    v6: u8,
    _pad: [u8; 5],
    raddr: [u8; 16],
    /// The listener's netns, and the 3rd-ACK overflows reported on this CPU in it since the
    /// record was made ([`note_ack_overflow`]): they raise the same counter.
    netns: u32,
    others: u32,
}

#[map]
static SYN_PENDING: PerCpuArray<SynPending> = PerCpuArray::with_max_entries(1, 0);

/// The listener (`struct tcp_sock`) of a bare SYN (no ACK) received by a LISTEN socket, with the
/// TCP header's offset and whether the packet is IPv6.
#[inline(always)]
fn syn_to_listener(ctx: &SkBuffContext) -> Result<Option<(u64, usize, bool)>, i64> {
    // SAFETY: ctx.skb is the program's context pointer.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null sock_common from the context; only state is needed there (the protocol
    // is checked in the packet and by bpf_skc_to_tcp_sock below).
    let state = unsafe { (*sk).state };
    if state != TCP_LISTEN as u32 {
        return Ok(None);
    }
    // The packet starts at the IP header, whose version says how to parse it (not the socket's
    // family: a dual-stack IPv6 listener receives IPv4 SYNs); only a bare SYN (no ACK) is a
    // connection request. One load covers an IPv4 header and the TCP header up to its flags (one
    // helper call, not three: a LISTEN socket's packets are SYNs and handshake ACKs, half of
    // every connection's packets); any TCP segment is at least that long.
    let h: [u8; 20 + 14] = ctx.load(0).map_err(i64::from)?;
    let (tcp_off, v6) = if h[0] >> 4 == 6 {
        let h6: [u8; 40 + 14] = ctx.load(0).map_err(i64::from)?;
        if h6[6] != 6 || h6[40 + 13] & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
            return Ok(None);
        }
        (40usize, true)
    } else {
        if h[0] >> 4 != 4 || h[9] != 6 {
            return Ok(None);
        }
        let tcp_off = usize::from(h[0] & 0x0f) * 4;
        // IP options move the TCP header: read its flags on their own then.
        let tcp_flags = if tcp_off == 20 { h[20 + 13] } else { ctx.load(tcp_off + 13).map_err(i64::from)? };
        if tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
            return Ok(None);
        }
        (tcp_off, false)
    };
    // SAFETY: helper takes any sock_common pointer and returns NULL when it is not a TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) } as u64;
    Ok((tp != 0).then_some((tp, tcp_off, v6)))
}

/// Source port and address of the packet (the remote side of a SYN; IPv4 in the first 4 bytes).
#[inline(always)]
fn packet_source(ctx: &SkBuffContext, tcp_off: usize, v6: bool) -> Result<(u16, [u8; 16]), i64> {
    let sport: u16 = ctx.load(tcp_off).map_err(i64::from)?;
    let mut raddr = [0u8; 16];
    // Fixed-size loads: the verifier rejects a length it cannot bound.
    if v6 {
        raddr = ctx.load::<[u8; 16]>(8).map_err(i64::from)?;
    } else {
        let a: [u8; 4] = ctx.load(12).map_err(i64::from)?;
        raddr[..4].copy_from_slice(&a);
    }
    Ok((u16::from_be(sport), raddr))
}

/// The event's remote side from the packet's: an IPv4 source of an IPv6 listener (dual-stack) is
/// written v4-mapped (`::ffff:a.b.c.d`), as the kernel names that peer.
#[inline(always)]
fn set_remote(ev: &mut Event, rport: u16, raddr: [u8; 16], v6: bool) {
    ev.rport = rport;
    if !v6 && ev.family == AF_INET6 {
        ev.raddr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, raddr[0], raddr[1], raddr[2], raddr[3]];
    } else {
        ev.raddr = raddr;
    }
}

#[inline(always)]
fn try_cgroup_skb(ctx: &SkBuffContext) -> Result<u32, i64> {
    let Some((tp, tcp_off, v6)) = syn_to_listener(ctx)? else {
        return Ok(0);
    };
    if !accept_queue_full(tp)? {
        return Ok(0);
    }
    let mut ev = new_syn_drop(tp, hook::CGROUP_SKB);
    let _ = fill_queue(&mut ev, tp);
    let (rport, raddr) = packet_source(ctx, tcp_off, v6)?;
    set_remote(&mut ev, rport, raddr, v6);
    emit(&mut ev);
    Ok(0)
}

#[inline(always)]
fn try_cgroup_skb_counted(ctx: &SkBuffContext) -> Result<u32, i64> {
    let Some((tp, tcp_off, v6)) = syn_to_listener(ctx)? else {
        return Ok(0);
    };
    let p = SYN_PENDING.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: this CPU's record; only this CPU's programs touch it, one at a time (softirq).
    if unsafe { (*p).skb } != 0 {
        count(stat::SYN_SETTLED_LATE);
        settle(p);
    }
    // A queue far from full cannot be full when the kernel looks, a few hundred ns later on this
    // CPU: only other CPUs can add children meanwhile, about one each in that time (a child is a
    // whole handshake's work), and the slack allows many times that. Such a SYN needs no record,
    // which is what a healthy listener's SYNs cost.
    let (len, max) = accept_queue(tp)?;
    if len.saturating_add(off!(syn_confirm_slack)) < max {
        return Ok(0);
    }
    // Only what the drop decision can change or the packet alone says is saved here: the rest
    // (local side, queue) is read when a drop is confirmed, which is rare.
    let counter = counted::counter_here(tp)?;
    let (rport, raddr) = packet_source(ctx, tcp_off, v6)?;
    let rec = SynPending {
        skb: ctx.skb.skb as u64,
        counter,
        count: read(counter, 0)?,
        listener: tp,
        ts_ns: now(),
        rport,
        v6: u8::from(v6),
        _pad: [0; 5],
        raddr,
        netns: netns_of(tp)?,
        others: 0,
    };
    // SAFETY: as above.
    unsafe { *p = rec };
    Ok(0)
}

/// consume_skb / kfree_skb: settles this CPU's record when `skb` is its SYN.
#[inline(always)]
fn settle_skb(skb: u64) {
    let Some(p) = SYN_PENDING.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's record.
    if skb != 0 && unsafe { (*p).skb } == skb {
        settle(p);
    }
}

/// A 3rd-ACK overflow (or a SYN-cookie ACK's) was reported on this CPU in `netns`: it raised
/// the counter a pending record watches. Between a SYN's cgroup program and its free nothing else
/// runs on this CPU, so this matters for a record settled late, at the next SYN: without it, an
/// ACK's overflow in between would be taken for the SYN's drop.
#[inline(always)]
pub fn note_ack_overflow(netns: u32) {
    let Some(p) = SYN_PENDING.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's record; only this CPU's programs touch it, one at a time (softirq).
    unsafe {
        if (*p).skb != 0 && (*p).netns == netns {
            (*p).others = (*p).others.wrapping_add(1);
        }
    }
}

/// Reports the record's SYN as dropped when this CPU's counter grew since it was saved by more
/// than the 3rd-ACK overflows reported meanwhile, and clears it.
#[inline(always)]
fn settle(p: *mut SynPending) {
    // SAFETY: a live value of this CPU's map.
    let rec = unsafe { *p };
    // SAFETY: as above.
    unsafe { (*p).skb = 0 };
    let Ok(now_count) = read::<u64>(rec.counter, 0) else { return };
    if now_count.wrapping_sub(rec.count) <= u64::from(rec.others) {
        return;
    }
    let mut ev = new_syn_drop(rec.listener, hook::CGROUP_SKB);
    ev.ts_ns = rec.ts_ns;
    // The queue as it is right after the kernel's decision (still full unless accept() ran since).
    let pending = counted::Pending { listener: rec.listener, skb: rec.skb, count: rec.count, queue_len: 0, queue_max: 0 };
    counted::fill_full_queue(&mut ev, &pending);
    set_remote(&mut ev, rec.rport, rec.raddr, rec.v6 != 0);
    emit(&mut ev);
}
