//! Maps shared by the hooks: the event ring buffer, the per-CPU counters and the two bounded
//! correlation tables (enqueue time per child socket, listener per accepting thread).

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use socktrace_common::{Control, Event, ListenerStats, stat};

/// Events for userspace. Its size is set at load time (`--ring-buffer-kib`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Per-CPU counters indexed by `socktrace_common::stat::*`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Child socket address → time it entered its listener's accept queue. LRU: a connection that is
/// never accepted (client reset, listener closed) must not leak an entry.
#[map]
pub static ENQUEUED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

/// pid_tgid → listener (fd for the syscall hooks, socket address for kprobes) of an accept in
/// progress. LRU: a thread killed inside accept() never reaches the exit hook.
#[map]
pub static ACCEPTING: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

/// Per-listener aggregates, keyed by `listener_key(netns, lport)`. LRU: listeners come and go.
#[map]
pub static LISTENERS: LruHashMap<u64, ListenerStats> = LruHashMap::with_max_entries(16384, 0);

/// Accepted connection (socket address) → its listener's key, so retransmits on it are counted
/// for the listener. LRU: closed connections are never removed explicitly.
#[map]
pub static CHILD_OWNER: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

/// Settings the agent changes at run time.
#[map]
pub static CONTROL: Array<Control> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Aggregates an event for its listener, then sends it unless its kind is muted; a full ring
/// buffer is counted, never silent.
#[inline(always)]
pub fn emit(ev: &Event) {
    crate::aggregate::record(ev);
    let mute = CONTROL.get(0).map_or(0, |c| c.mute);
    if mute & (1 << (ev.kind & 31)) != 0 {
        return;
    }
    if EVENTS.output::<Event>(ev, 0).is_err() {
        count(stat::LOST);
    }
}
