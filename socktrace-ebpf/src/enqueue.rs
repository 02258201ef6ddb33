//! Start of the accept-queue wait: a passive child socket is created (LISTEN → SYN_RECV in
//! `inet_csk_clone_lock`) just before the kernel adds it to the listener's accept queue. This holds
//! for ordinary handshakes, SYN-cookie children and TFO children (which are queued while still in
//! SYN_RECV), so the clone is the one point that covers all three.
//!
//! Hook: `tp_btf/inet_sock_set_state`, fallback `raw_tp/inet_sock_set_state` (same arguments).

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};

use socktrace_common::stat;

use crate::{
    kernel::{Args, IPPROTO_TCP, TCP_LISTEN, TCP_SYN_RECV, now, off, read},
    maps::{ENQUEUED, insert_counted},
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn enqueue_btf(ctx: BtfTracePointContext) -> i32 {
    let _ = try_enqueue(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn enqueue_raw(ctx: RawTracePointContext) -> i32 {
    let _ = try_enqueue(&ctx);
    0
}

#[inline(always)]
fn try_enqueue<C: Args>(ctx: &C) -> Result<u32, i64> {
    let old = ctx.arg_u64(1) as i32;
    let new = ctx.arg_u64(2) as i32;
    if old != TCP_LISTEN || new != TCP_SYN_RECV {
        return Ok(0);
    }
    let sk = ctx.arg_u64(0);
    let protocol: u16 = read(sk, off!(sk_protocol))?;
    if protocol != IPPROTO_TCP {
        return Ok(0);
    }
    insert_counted(&ENQUEUED, sk, now(), stat::ENQUEUED_INSERTS)?;
    Ok(0)
}
