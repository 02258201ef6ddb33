//! Maps shared by the hooks: the event ring buffer, the per-CPU counters, the two bounded
//! correlation tables (enqueue time per child socket, listener per accepting thread) and the
//! kernel-side aggregates (per listener, and per port for what never reaches one).

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use socktrace_common::{
    Control, Event, ListenerStats, PastKey, stat,
    wait::{AcceptorKey, AcceptorSeen, WaitKey},
};

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

/// Per-listener aggregates: a row per port (`listener_key`) and per LISTEN socket (`socket_key`),
/// so twice the listeners it can hold. LRU: listeners come and go.
#[map]
pub static LISTENERS: LruHashMap<u64, ListenerStats> = LruHashMap::with_max_entries(32768, 0);

/// Accept-queue waits per listening socket and log-linear bucket (`socktrace_common::wait`): a
/// sparse histogram, one `u64` count per bucket in use, so memory follows the buckets used (a
/// dense row of 128 buckets per power of two would be 16 KiB+ per socket). LRU: an evicted bucket
/// loses its count (the agent sees it go backwards), never invents one.
#[map]
pub static WAITS: LruHashMap<WaitKey, u64> = LruHashMap::with_max_entries(65536, 0);

/// Latest accept of each thread from each listening socket (`top`'s acceptors without
/// per-accept events). LRU: threads come and go.
#[map]
pub static ACCEPTORS: LruHashMap<AcceptorKey, AcceptorSeen> = LruHashMap::with_max_entries(16384, 0);

/// Segments to a port that never reached a listener, and local clients' SYN retransmits, per
/// (netns, port, class, address) (see `socktrace_common::past`). LRU: a scan of many ports or
/// addresses evicts old rows (their counts are then lost, never invented).
#[map]
pub static PAST: LruHashMap<PastKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// Per CPU: when this CPU last let an event wake the reader (see [`emit`]).
#[map]
pub static WAKEUP: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Least time between two reader wakeups one CPU may cause.
const WAKEUP_INTERVAL_NS: u64 = 1_000_000;

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

/// Puts `key` → `value` into a correlation map, counting in `STATS[inserts]` only an entry this
/// call created. An existing entry (a child socket address reused after its predecessor was never
/// seen accepted; a thread killed inside accept()) is overwritten and not counted: the number of
/// entries did not change. Eviction accounting (`stat`) needs exactly that.
#[inline(always)]
pub fn insert_counted(map: &LruHashMap<u64, u64>, key: u64, value: u64, inserts: u32) -> Result<(), i64> {
    // BPF_NOEXIST first: only a new entry is an insert.
    if map.insert(key, value, 1).is_ok() {
        count(inserts);
        return Ok(());
    }
    map.insert(key, value, 0).map_err(i64::from)
}

/// Removes `key`, counting in `STATS[deletes]` only an entry that was there.
#[inline(always)]
pub fn remove_counted(map: &LruHashMap<u64, u64>, key: u64, deletes: u32) {
    if map.remove(key).is_ok() {
        count(deletes);
    }
}

/// Whether events of `kind` are muted (not sent to userspace; still aggregated).
#[inline(always)]
pub fn muted(kind: u32) -> bool {
    CONTROL.get(0).is_some_and(|c| c.mute & (1 << (kind & 31)) != 0)
}

/// Aggregates an event for its listener (naming the listening socket's inode first), then sends
/// it unless its kind is muted; a full ring buffer is counted, never silent.
#[inline(always)]
pub fn emit(ev: &mut Event) {
    crate::aggregate::name_socket(ev);
    crate::aggregate::record(ev);
    let Some(c) = CONTROL.get(0) else { return };
    if c.mute & (1 << (ev.kind & 31)) != 0
        || (c.netns != 0 && ev.netns != c.netns)
        || (c.port != 0 && u32::from(ev.lport) != c.port && u32::from(ev.rport) != c.port)
    {
        return;
    }
    let flags = wakeup_flags(ev.ts_ns);
    if EVENTS.output::<Event>(&*ev, flags).is_err() {
        count(stat::LOST);
    }
}

/// Ring-buffer flags that let an event wake the reader at most once per `WAKEUP_INTERVAL_NS`
/// per CPU, or whenever the buffer is more than half full. A wakeup is an irq_work (a self-IPI:
/// a VM exit in a guest, several µs) plus a reader wakeup; with the default adaptive flags nearly
/// every event paid for both at high rates (the reader keeps catching up). The allowed event
/// forces the wakeup (adaptive would skip it when silent events precede it); the others are
/// written silently and picked up by the next wakeup or the reader's periodic drain. The
/// half-full rule matters for small buffers: a full buffer rejects events, and a rejected event
/// wakes no one, so the reader must be woken before it fills.
#[inline(always)]
fn wakeup_flags(now: u64) -> u64 {
    let Some(last) = WAKEUP.get_ptr_mut(0) else { return 0 };
    let half_full = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) > EVENTS.query(u64::from(BPF_RB_RING_SIZE)) / 2;
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    unsafe {
        if half_full || now.wrapping_sub(*last) >= WAKEUP_INTERVAL_NS {
            *last = now;
            u64::from(BPF_RB_FORCE_WAKEUP)
        } else {
            u64::from(BPF_RB_NO_WAKEUP)
        }
    }
}
