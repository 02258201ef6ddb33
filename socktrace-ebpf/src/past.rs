//! What goes wrong before the accept queue: segments to a TCP port that netfilter dropped
//! (kfree_skb reason NETFILTER_DROP), SYNs that found no socket (reason NO_SOCKET: the kernel
//! answers with a RST, e.g. the listener is bound to another address), and — from the retransmit
//! hook — local clients re-sending their SYN. Counted per (netns, port, class, address) in `PAST`;
//! no events. The reasons' values come from the running kernel's BTF; a kernel without them has
//! `ABSENT` there and nothing is counted (userspace reports the signal as unavailable).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use socktrace_common::{PastKey, past, stat};

use crate::{
    kernel::{Args, off, packet_netns, tcp_packet},
    maps::{PAST, count},
};

/// TCP header flag bits.
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

#[btf_tracepoint(function = "kfree_skb")]
pub fn past_btf(ctx: BtfTracePointContext) -> i32 {
    let _ = try_kfree_skb(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn past_raw(ctx: RawTracePointContext) -> i32 {
    let _ = try_kfree_skb(&ctx);
    0
}

#[inline(always)]
fn try_kfree_skb<C: Args>(ctx: &C) -> Result<u32, i64> {
    let reason = ctx.arg_u64(2) as u32;
    let class = if reason == off!(reason_netfilter_drop) {
        past::NETFILTER
    } else if reason == off!(reason_no_socket_any) {
        past::NO_SOCKET
    } else {
        return Ok(0);
    };
    if class == past::NETFILTER {
        count(stat::NETFILTER_SEEN);
    }
    let skb = ctx.arg_u64(0);
    let Some(p) = tcp_packet(skb)? else { return Ok(0) };
    let syn = p.flags & (SYN | ACK) == SYN;
    // NO_SOCKET: only connection attempts (an ACK without a socket is a different story).
    if class == past::NO_SOCKET && !syn {
        return Ok(0);
    }
    let mut key = PastKey::ZERO;
    key.netns = packet_netns(skb)?;
    key.port = p.dport;
    key.class = class;
    key.syn = u8::from(syn);
    key.family = p.family;
    // The peer for netfilter drops (who is blocked), the address used for NO_SOCKET (which one).
    key.addr = if class == past::NETFILTER { p.saddr } else { p.daddr };
    bump(&key);
    Ok(0)
}

/// Adds one to `key`'s count (created at 1 when new).
#[inline(always)]
pub fn bump(key: &PastKey) {
    if let Some(v) = PAST.get_ptr_mut(key) {
        // SAFETY: a map value pointer, valid during the program; BPF atomic add across CPUs.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(v, 1) };
        return;
    }
    // BPF_NOEXIST: another CPU may have created it meanwhile; then add to that one.
    if PAST.insert(key, &1, 1).is_ok() {
        count(stat::PAST_INSERTS);
    } else if let Some(v) = PAST.get_ptr_mut(key) {
        // SAFETY: as above.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(v, 1) };
    } else {
        count(stat::PAST_LOST);
    }
}
