//! Retransmits: `tcp:tcp_retransmit_skb` (data/control segments, counted by `tcp_skb_pcount`) and
//! `tcp:tcp_retransmit_synack` (a listener re-sending a SYN-ACK for a request socket).
//!
//! Hooks: tp_btf, fallback raw_tp (same arguments). Newer kernels pass `err` to
//! tcp_retransmit_skb; a failed retransmit is not counted by the kernel's TcpRetransSegs, nor here.
//! A retransmitted SYN of a local client (socket in SYN_SENT) is also counted per destination port
//! in `PAST` (see `past`).

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use socktrace_common::{AF_INET6, Event, PastKey, hook, kind, past, stat};

use crate::{
    kernel::{Args, TCP_SYN_SENT, fill_local, fill_queue, fill_remote, netns_of, now, off, read, read_buf},
    maps::{count, emit},
    past::bump,
};

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn retransmit_btf(ctx: BtfTracePointContext) -> i32 {
    let _ = try_retransmit(&ctx, hook::TP_BTF);
    0
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn retransmit_raw(ctx: RawTracePointContext) -> i32 {
    let _ = try_retransmit(&ctx, hook::RAW_TP);
    0
}

#[inline(always)]
fn try_retransmit<C: Args>(ctx: &C, via: u32) -> Result<u32, i64> {
    let sk = ctx.arg_u64(0);
    let skb = ctx.arg_u64(1);
    // A local client re-sending its SYN: a connection attempt to that port is failing. Counted
    // whether or not it left the host (like TcpExtTCPSynRetrans): the client tried again.
    let _ = count_client_syn(sk);
    // Constant context offsets only: `err`, when the kernel passes it, is argument 2.
    if off!(retransmit_err_arg) == 2 && ctx.arg_u64(2) as i32 != 0 {
        count(stat::RETRANSMIT_UNSENT);
        return Ok(0);
    }
    let mut ev = Event::ZERO;
    ev.ts_ns = now();
    ev.kind = kind::RETRANSMIT;
    ev.hook = via;
    ev.sock_id = sk;
    fill_local(&mut ev, sk)?;
    fill_remote(&mut ev, sk)?;
    let segs: u16 = read(skb, off!(skb_cb) + off!(tcb_gso_segs))?;
    ev.segs = u32::from(segs).max(1);
    emit(&mut ev);
    Ok(0)
}

/// Counts a retransmit of a socket in SYN_SENT in `PAST` (destination port and address).
#[inline(always)]
fn count_client_syn(sk: u64) -> Result<(), i64> {
    let state: u8 = read(sk, off!(skc_state))?;
    if state != TCP_SYN_SENT {
        return Ok(());
    }
    count(stat::CLIENT_SYN_SEEN);
    let mut key = PastKey::ZERO;
    key.netns = netns_of(sk)?;
    let dport: u16 = read(sk, off!(skc_dport))?;
    key.port = u16::from_be(dport);
    key.class = past::CLIENT_SYN_RETRANS;
    key.syn = 1;
    key.family = read(sk, off!(skc_family))?;
    if key.family == AF_INET6 {
        read_buf(sk, off!(skc_v6_daddr), &mut key.addr)?;
    } else {
        read_buf(sk, off!(skc_daddr), &mut key.addr[..4])?;
    }
    bump(&key);
    Ok(())
}

#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn synack_btf(ctx: BtfTracePointContext) -> i32 {
    let _ = try_synack(&ctx, hook::TP_BTF);
    0
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_synack")]
pub fn synack_raw(ctx: RawTracePointContext) -> i32 {
    let _ = try_synack(&ctx, hook::RAW_TP);
    0
}

#[inline(always)]
fn try_synack<C: Args>(ctx: &C, via: u32) -> Result<u32, i64> {
    let listener = ctx.arg_u64(0);
    let req = ctx.arg_u64(1);
    let mut ev = Event::ZERO;
    ev.ts_ns = now();
    ev.kind = kind::SYNACK_RETRANSMIT;
    ev.hook = via;
    ev.sock_id = listener;
    fill_local(&mut ev, listener)?;
    // request_sock starts with struct sock_common: the same offsets name the peer.
    fill_remote(&mut ev, req)?;
    let _ = fill_queue(&mut ev, listener);
    emit(&mut ev);
    Ok(0)
}
