//! SYN dropped because the accept queue is full (`tcp_conn_request`: sk_acceptq_is_full). The kernel
//! consumes that skb without a drop reason, so kfree_skb never sees it. Emits `syn_drop`.
//!
//! Hooks, best first: fentry+fexit / kprobe+kretprobe on `tcp_conn_request(rsk_ops, af_ops, sk,
//! skb)`, reporting a drop when the kernel's own ListenOverflows counter grew during the call (see
//! `counted`), then a pass-through `cgroup_skb/ingress` program that sees the SYN with its listener
//! just before `tcp_conn_request` runs. The cgroup program ALWAYS returns 1 (pass): returning 0 would drop the
//! packet for every process in the cgroup.

use aya_ebpf::{
    helpers::generated::bpf_skc_to_tcp_sock,
    macros::{cgroup_skb, fentry, fexit, kprobe, kretprobe},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext, SkBuffContext},
};
use socktrace_common::{AF_INET6, Event, hook, kind};

use crate::{
    counted,
    kernel::{Args, TCP_LISTEN, accept_queue_full, fill_local, fill_queue, fill_remote_from_skb, now},
    maps::emit,
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

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

#[inline(always)]
fn try_cgroup_skb(ctx: &SkBuffContext) -> Result<u32, i64> {
    // SAFETY: ctx.skb is the program's context pointer.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Ok(0);
    }
    // SAFETY: non-null sock_common from the context; only state and family are readable there
    // (the protocol is checked in the packet and by bpf_skc_to_tcp_sock below).
    let (state, family) = unsafe { ((*sk).state, (*sk).family) };
    if state != TCP_LISTEN as u32 {
        return Ok(0);
    }
    // The packet starts at the IP header; only a bare SYN (no ACK) is a connection request. One
    // load covers the IP header and the TCP header up to its flags (one helper call, not three:
    // a LISTEN socket's packets are SYNs and handshake ACKs, half of every connection's packets).
    let (tcp_off, v6) = if family == u32::from(AF_INET6) {
        let h: [u8; 40 + 14] = ctx.load(0).map_err(i64::from)?;
        if h[6] != 6 || h[40 + 13] & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
            return Ok(0);
        }
        (40usize, true)
    } else {
        let h: [u8; 20 + 14] = ctx.load(0).map_err(i64::from)?;
        if h[0] >> 4 != 4 || h[9] != 6 {
            return Ok(0);
        }
        let tcp_off = usize::from(h[0] & 0x0f) * 4;
        // IP options move the TCP header: read its flags on their own then.
        let tcp_flags = if tcp_off == 20 { h[20 + 13] } else { ctx.load(tcp_off + 13).map_err(i64::from)? };
        if tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
            return Ok(0);
        }
        (tcp_off, false)
    };
    // SAFETY: helper takes any sock_common pointer and returns NULL when it is not a TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) } as u64;
    if tp == 0 || !accept_queue_full(tp)? {
        return Ok(0);
    }
    let mut ev = new_syn_drop(tp, hook::CGROUP_SKB);
    let _ = fill_queue(&mut ev, tp);
    let sport: u16 = ctx.load(tcp_off).map_err(i64::from)?;
    ev.rport = u16::from_be(sport);
    // Fixed-size loads: the verifier rejects a length it cannot bound.
    if v6 {
        ev.raddr = ctx.load::<[u8; 16]>(8).map_err(i64::from)?;
    } else {
        let a: [u8; 4] = ctx.load(12).map_err(i64::from)?;
        ev.raddr[..4].copy_from_slice(&a);
    }
    emit(&mut ev);
    Ok(0)
}
