//! In-kernel per-listener aggregation (`LISTENERS`): counters and the accept-queue high-water mark
//! per epoch, updated on every event whether or not the event itself is sent to userspace, in the
//! port's row and in the listening socket's own row (SO_REUSEPORT members each have one); for
//! accepts also the wait histogram (`WAITS`) and the accepting thread (`ACCEPTORS`).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::bpf_get_prandom_u32;
use socktrace_common::{
    Event, KernelOffsets, ListenerStats, flags, kind, listener_key, socket_key, stat,
    wait::{self, AcceptorKey, AcceptorSeen, WaitKey},
};

use crate::{
    kernel::{OpenSocket, current_comm, off, read},
    maps::{ACCEPTORS, CONTROL, LISTENERS, WAITS, count},
};

#[inline(always)]
fn add(field: *mut u64, n: u64) {
    // SAFETY: `field` points into a map value that stays valid during the program. A BPF atomic
    // add (core's AtomicU64 has no fetch_add on the bpf target) keeps CPUs from losing increments.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, n) };
}

#[inline(always)]
fn entry(key: u64, ev: &Event) -> Option<*mut ListenerStats> {
    if let Some(p) = LISTENERS.get_ptr_mut(key) {
        return Some(p);
    }
    let mut init = ListenerStats::ZERO;
    init.netns = ev.netns;
    init.lport = ev.lport;
    init.family = ev.family;
    // SAFETY: a helper without arguments.
    init.row_id = unsafe { bpf_get_prandom_u32() };
    // BPF_NOEXIST: another CPU may have created it meanwhile; either way it exists now. Only a
    // row this call created is counted (evictions = inserts - live rows, see `stat`).
    if LISTENERS.insert(key, init, 1).is_ok() {
        count(stat::LISTENERS_INSERTS);
    }
    LISTENERS.get_ptr_mut(key)
}

/// Raises this epoch's high-water mark to `len`.
#[inline(always)]
fn peak(s: *mut ListenerStats, len: u32, max: u32) {
    let epoch = CONTROL.get(0).map_or(0, |c| c.epoch);
    let slot = (epoch & 1) as usize;
    // SAFETY: map value pointer; a lost race only loses one peak update.
    unsafe {
        (*s).queue_max = max;
        if (*s).peak_epoch[slot] != epoch {
            (*s).peak_epoch[slot] = epoch;
            (*s).peak[slot] = len;
        } else if len > (*s).peak[slot] {
            (*s).peak[slot] = len;
        }
    }
}

/// Sets `sock_ino` of a listener-side event (`sock_id` is then the listening socket):
/// `sk->sk_socket`, the inode around that `struct socket`, its `i_ino`. Left 0 when unknown.
#[inline(always)]
pub fn name_socket(ev: &mut Event) {
    if ev.sock_ino != 0 || ev.sock_id == 0 || ev.kind == kind::RETRANSMIT || off!(inode_ino) == KernelOffsets::ABSENT {
        return;
    }
    let Ok(socket) = read::<u64>(ev.sock_id, off!(sk_socket)) else { return };
    if socket != 0 {
        ev.sock_ino = OpenSocket { sk: ev.sock_id, socket }.ino();
    }
}

#[inline(always)]
pub fn record(ev: &Event) {
    if ev.kind == kind::LISTEN {
        return;
    }
    let key = listener_key(ev.netns, ev.lport);
    // A passive connection keeps its listener's local port (connect() never picks a port a listener
    // has bound), so a retransmit is the listener's when a listener row exists for that port; it
    // never creates one (every outgoing connection's port would get a row).
    if ev.kind == kind::RETRANSMIT {
        if let Some(s) = LISTENERS.get_ptr_mut(key) {
            // SAFETY: `s` is a live map value.
            unsafe { add(&raw mut (*s).retransmits, u64::from(ev.segs)) };
        }
        return;
    }
    if let Some(s) = entry(key, ev) {
        apply(s, ev);
    }
    // Only within the view's `--netns`/`--port` scope: the maps stay as small as what is read.
    if ev.kind == kind::ACCEPT
        && CONTROL.get(0).is_some_and(|c| c.waits != 0 && (c.netns == 0 || c.netns == ev.netns) && (c.port == 0 || c.port == u32::from(ev.lport)))
    {
        accepted(ev);
    }
    if ev.sock_ino != 0 {
        if let Some(s) = entry(socket_key(ev.sock_ino), ev) {
            apply(s, ev);
        }
    }
}

/// One listener-side event into one row.
#[inline(always)]
fn apply(s: *mut ListenerStats, ev: &Event) {
    let has_queue = ev.flags & flags::HAS_QUEUE != 0;
    // SAFETY: `s` is a live map value; fields are addressed without creating references.
    unsafe {
        match ev.kind {
            kind::ACCEPT => {
                add(&raw mut (*s).accepts, 1);
                if ev.flags & flags::HAS_WAIT != 0 {
                    add(&raw mut (*s).wait_sum_ns, ev.accept_wait_ns);
                    add(&raw mut (*s).wait_count, 1);
                }
                // The queue was read after this connection left it. Another child may have
                // been queued in between, but the queue never holds more than backlog + 1
                // (`sk_acceptq_is_full` is `len > max`), so the estimate stops there.
                if has_queue {
                    peak(s, (ev.queue_len + 1).min(ev.queue_max.saturating_add(1)), ev.queue_max);
                }
            }
            kind::LISTEN_OVERFLOW | kind::SYN_DROP => {
                if ev.kind == kind::SYN_DROP {
                    add(&raw mut (*s).syn_drops, 1);
                } else {
                    add(&raw mut (*s).overflows, 1);
                }
                if has_queue {
                    peak(s, ev.queue_len, ev.queue_max);
                }
            }
            // Read just after the child was added: the queue's exact length at that moment.
            kind::QUEUED => {
                add(&raw mut (*s).queued, 1);
                if has_queue {
                    peak(s, ev.queue_len, ev.queue_max);
                }
            }
            kind::LISTEN_CLOSE => {
                add(&raw mut (*s).closes, 1);
                if has_queue {
                    add(&raw mut (*s).unaccepted, u64::from(ev.queue_len));
                }
            }
            kind::SYNACK_RETRANSMIT => {
                add(&raw mut (*s).synack_retransmits, 1);
                if has_queue {
                    peak(s, ev.queue_len, ev.queue_max);
                }
            }
            _ => {}
        }
    }
}

/// An accept's wait into its socket's histogram, and its thread into the socket's acceptors.
#[inline(always)]
fn accepted(ev: &Event) {
    if ev.flags & flags::HAS_WAIT != 0 {
        let key = WaitKey { netns: ev.netns, inode: ev.sock_ino, lport: ev.lport, bucket: wait::bucket(ev.accept_wait_ns), _pad: 0 };
        match WAITS.get_ptr_mut(&key) {
            Some(n) => add(n, 1),
            // BPF_NOEXIST: when another CPU created it meanwhile, add to that one.
            None => {
                if WAITS.insert(&key, &1, 1).is_ok() {
                    count(stat::WAITS_INSERTS);
                } else if let Some(n) = WAITS.get_ptr_mut(&key) {
                    add(n, 1);
                }
            }
        }
    }
    if ev.flags & flags::HAS_TASK != 0 {
        let key = AcceptorKey { netns: ev.netns, inode: ev.sock_ino, tid: ev.tid, lport: ev.lport, _pad: 0 };
        // An event that is sent carries the name already; a muted one has none, and the name is
        // read (a helper call) only for a new row or about once a second (thread names rarely
        // change; `comm_at` says when it was read).
        let epoch = wait::comm_epoch(ev.ts_ns);
        if let Some(a) = ACCEPTORS.get_ptr_mut(&key) {
            // SAFETY: live map value; only this thread updates its own entry (a racing reader sees
            // an older or newer accept, both true).
            unsafe {
                (*a).ts_ns = ev.ts_ns;
                if ev.comm[0] != 0 {
                    (*a).comm = ev.comm;
                    (*a).comm_at = epoch;
                } else if (*a).comm_at != epoch {
                    (*a).comm = current_comm();
                    (*a).comm_at = epoch;
                }
            }
        } else {
            let comm = if ev.comm[0] != 0 { ev.comm } else { current_comm() };
            // BPF_NOEXIST, so that only a created row is counted (a thread runs on one CPU at a
            // time: nobody else creates its row meanwhile).
            if ACCEPTORS.insert(&key, &AcceptorSeen { ts_ns: ev.ts_ns, pid: ev.pid, comm_at: epoch, comm }, 1).is_ok() {
                count(stat::ACCEPTORS_INSERTS);
            }
        }
    }
}
