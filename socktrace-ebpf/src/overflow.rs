//! Listen overflow at the 3rd ACK: the handshake completed but the accept queue was full, so the
//! kernel dropped the ACK (`tcp_v4_syn_recv_sock` → exit_overflow). Emits `listen_overflow`.
//!
//! Hooks, best first: `skb:kfree_skb` with reason `TCP_LISTEN_OVERFLOW` (value from BTF; the listener
//! is the tracepoint's `rx_sk`) as tp_btf or raw_tp; then fentry+fexit / kprobe+kretprobe on
//! `tcp_v{4,6}_syn_recv_sock`, reporting an overflow when the kernel's own ListenOverflows counter
//! grew during the call (see `counted`).

use aya_ebpf::{
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, raw_tracepoint},
    programs::{BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RawTracePointContext, RetProbeContext},
};
use socktrace_common::{Event, hook, kind};

use crate::{
    counted,
    syn_drop,
    kernel::{
        Args, accept_queue_full, fill_from_packet, fill_local, fill_queue, fill_remote_from_skb,
        now, off, skb_ip_version,
    },
    maps::emit,
};

#[btf_tracepoint(function = "kfree_skb")]
pub fn overflow_btf(ctx: BtfTracePointContext) -> i32 {
    let _ = try_kfree_skb(&ctx, hook::TP_BTF);
    0
}

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn overflow_raw(ctx: RawTracePointContext) -> i32 {
    let _ = try_kfree_skb(&ctx, hook::RAW_TP);
    0
}

#[inline(always)]
fn try_kfree_skb<C: Args>(ctx: &C, via: u32) -> Result<u32, i64> {
    let reason = ctx.arg_u64(2) as u32;
    if reason == off!(reason_no_socket) {
        return try_cookie_overflow(ctx.arg_u64(0), ctx.arg_u64(1), via);
    }
    if reason != off!(reason_listen_overflow) {
        return Ok(0);
    }
    // The verifier only allows constant context offsets: rx_sk, when present, is argument 3.
    let listener = if off!(kfree_skb_rx_sk_arg) == 3 { ctx.arg_u64(3) } else { 0 };
    emit_overflow(listener, ctx.arg_u64(0), via)
}

/// SYN-cookie path: `cookie_v{4,6}_check` drops the ACK with NO_SOCKET (and no rx_sk) when
/// `tcp_get_cookie_sock` could not create the child — the accept queue was full. The listener is
/// not passed, so the local side and netns come from the packet.
#[inline(always)]
fn try_cookie_overflow(skb: u64, location: u64, via: u32) -> Result<u32, i64> {
    let v4 = off!(cookie_v4_check);
    let v6 = off!(cookie_v6_check);
    let in_v4 = v4[0] != 0 && location >= v4[0] && location < v4[1];
    let in_v6 = v6[0] != 0 && location >= v6[0] && location < v6[1];
    if !in_v4 && !in_v6 {
        return Ok(0);
    }
    let mut ev = Event::ZERO;
    ev.ts_ns = now();
    ev.kind = kind::LISTEN_OVERFLOW;
    ev.hook = via;
    let _ = fill_from_packet(&mut ev, skb);
    syn_drop::note_ack_overflow(ev.netns);
    emit(&mut ev);
    Ok(0)
}

#[fentry(function = "tcp_v4_syn_recv_sock")]
pub fn overflow4_fentry(ctx: FEntryContext) -> i32 {
    let _ = syn_recv_sock_entry(&ctx, counted::SYN_RECV_V4, hook::FENTRY);
    0
}

#[fexit(function = "tcp_v4_syn_recv_sock")]
pub fn overflow4_fexit(_ctx: FExitContext) -> i32 {
    let _ = syn_recv_sock_exit(counted::SYN_RECV_V4, hook::FEXIT);
    0
}

#[fentry(function = "tcp_v6_syn_recv_sock")]
pub fn overflow6_fentry(ctx: FEntryContext) -> i32 {
    let _ = syn_recv_sock_entry(&ctx, counted::SYN_RECV_V6, hook::FENTRY);
    0
}

#[fexit(function = "tcp_v6_syn_recv_sock")]
pub fn overflow6_fexit(_ctx: FExitContext) -> i32 {
    let _ = syn_recv_sock_exit(counted::SYN_RECV_V6, hook::FEXIT);
    0
}

#[kprobe(function = "tcp_v4_syn_recv_sock")]
pub fn overflow4_kprobe(ctx: ProbeContext) -> u32 {
    let _ = syn_recv_sock_entry(&ctx, counted::SYN_RECV_V4, hook::KPROBE);
    0
}

#[kretprobe(function = "tcp_v4_syn_recv_sock")]
pub fn overflow4_kretprobe(_ctx: RetProbeContext) -> u32 {
    let _ = syn_recv_sock_exit(counted::SYN_RECV_V4, hook::KRETPROBE);
    0
}

#[kprobe(function = "tcp_v6_syn_recv_sock")]
pub fn overflow6_kprobe(ctx: ProbeContext) -> u32 {
    let _ = syn_recv_sock_entry(&ctx, counted::SYN_RECV_V6, hook::KPROBE);
    0
}

#[kretprobe(function = "tcp_v6_syn_recv_sock")]
pub fn overflow6_kretprobe(_ctx: RetProbeContext) -> u32 {
    let _ = syn_recv_sock_exit(counted::SYN_RECV_V6, hook::KRETPROBE);
    0
}

/// `tcp_v{4,6}_syn_recv_sock(sk, skb, …)`: the overflow is confirmed at exit (see `counted`; a v4
/// call nested in the v6 one for a v4-mapped peer is reported by the v4 exit only). Without the
/// counter, the kernel's first check, `sk_acceptq_is_full(sk)`, is evaluated here; then a v4
/// segment on a dual-stack v6 listener passes through both functions and only the v4 one counts it.
#[inline(always)]
fn syn_recv_sock_entry<C: Args>(ctx: &C, slot: u32, via: u32) -> Result<u32, i64> {
    let listener = ctx.arg_u64(0);
    let skb = ctx.arg_u64(1);
    if counted::enabled() {
        counted::enter(slot, listener, skb)?;
        return Ok(0);
    }
    if !accept_queue_full(listener)? {
        return Ok(0);
    }
    if slot == counted::SYN_RECV_V6 && skb_ip_version(skb)? != 6 {
        return Ok(0);
    }
    let mut ev = new_overflow(listener, skb, via);
    let _ = fill_queue(&mut ev, listener);
    syn_drop::note_ack_overflow(ev.netns);
    emit(&mut ev);
    Ok(0)
}

#[inline(always)]
fn syn_recv_sock_exit(slot: u32, via: u32) -> Result<u32, i64> {
    if !counted::enabled() {
        return Ok(0);
    }
    let Some(p) = counted::exit(slot)? else {
        return Ok(0);
    };
    let mut ev = new_overflow(p.listener, p.skb, via);
    counted::fill_full_queue(&mut ev, &p);
    syn_drop::note_ack_overflow(ev.netns);
    emit(&mut ev);
    Ok(0)
}

#[inline(always)]
fn new_overflow(listener: u64, skb: u64, via: u32) -> Event {
    let mut ev = Event::ZERO;
    ev.ts_ns = now();
    ev.kind = kind::LISTEN_OVERFLOW;
    ev.hook = via;
    ev.sock_id = listener;
    // A SYN-cookie ACK carries no listener (0): the packet alone names both sides then.
    if listener != 0 {
        let _ = fill_local(&mut ev, listener);
    }
    let _ = fill_remote_from_skb(&mut ev, skb);
    ev
}

#[inline(always)]
fn emit_overflow(listener: u64, skb: u64, via: u32) -> Result<u32, i64> {
    let mut ev = new_overflow(listener, skb, via);
    if listener != 0 {
        let _ = fill_queue(&mut ev, listener);
    }
    syn_drop::note_ack_overflow(ev.netns);
    emit(&mut ev);
    Ok(0)
}
