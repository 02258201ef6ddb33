//! A child joined a listener's accept queue: `sk_data_ready` on a LISTEN socket (the kernel wakes
//! the listener once per child it queues: `tcp_child_process`, SYN-cookie and TFO children alike).
//! Counted in the listener's kernel rows (`ListenerStats::queued`) with the queue length just after
//! the add, never sent. Used only without an accept hook (`--accept-hooks off`): the agent derives
//! accepts from it and the queue length, with no syscall tracepoint attached.
//!
//! A listener that closes drops the children still queued: `inet_sock_set_state` LISTEN → CLOSE
//! (set just before `inet_csk_listen_stop` empties the queue) records how many, so the accepts
//! made between the agent's last sample and the close still come out exact.
//!
//! Hooks: `tp_btf/sk_data_ready` + `tp_btf/inet_sock_set_state`, fallback the same as `raw_tp`
//! (sk_data_ready: Linux 6.6+).

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use socktrace_common::{Event, kind};

use crate::{
    aggregate,
    kernel::{Args, SockHead, TCP_LISTEN, fill_queue, off, read},
};

const TCP_CLOSE: i32 = 7;

#[btf_tracepoint(function = "sk_data_ready")]
pub fn queued_btf(ctx: BtfTracePointContext) -> i32 {
    let _ = try_queued(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "sk_data_ready")]
pub fn queued_raw(ctx: RawTracePointContext) -> i32 {
    let _ = try_queued(&ctx);
    0
}

#[inline(always)]
fn try_queued<C: Args>(ctx: &C) -> Result<u32, i64> {
    let sk = ctx.arg_u64(0);
    // Every data arrival on every socket passes here: the state is the first, cheapest test.
    let state: u8 = read(sk, off!(skc_state))?;
    if i32::from(state) != TCP_LISTEN {
        return Ok(0);
    }
    into_rows(sk, kind::QUEUED)
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn listen_close_btf(ctx: BtfTracePointContext) -> i32 {
    let _ = try_listen_close(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn listen_close_raw(ctx: RawTracePointContext) -> i32 {
    let _ = try_listen_close(&ctx);
    0
}

#[inline(always)]
fn try_listen_close<C: Args>(ctx: &C) -> Result<u32, i64> {
    if ctx.arg_u64(1) as i32 != TCP_LISTEN || ctx.arg_u64(2) as i32 != TCP_CLOSE {
        return Ok(0);
    }
    into_rows(ctx.arg_u64(0), kind::LISTEN_CLOSE)
}

/// Adds `kind` with the listener's queue to its port and socket rows (no event is sent), when
/// `sk` is an IPv4/IPv6 TCP socket.
#[inline(always)]
fn into_rows(sk: u64, kind: u32) -> Result<u32, i64> {
    let head = SockHead::read(sk)?;
    if !head.is_inet_tcp()? {
        return Ok(0);
    }
    let mut ev = Event::ZERO;
    ev.kind = kind;
    ev.sock_id = sk;
    head.fill_row_key(&mut ev)?;
    let _ = fill_queue(&mut ev, sk);
    aggregate::name_socket(&mut ev);
    aggregate::record(&ev);
    Ok(0)
}
