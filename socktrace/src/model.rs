//! The per-listener model every view reads (`top`, and the views built on it): a table keyed by
//! (netns, port) merging the kernel's aggregates (`LISTENERS` map: counters, queue high-water
//! mark per interval; `WAITS`: accept-wait histograms per socket; `ACCEPTORS`: who accepted),
//! events where a view needs their times (`diagnose`'s timeline) and `sock_diag` listings (queue
//! now, backlog, owners, addresses).
//!
//! Counters are monotonic across intervals and across listener churn: a new listener on the same
//! port continues the same row. A kernel row evicted from the full `LISTENERS` map (it vanishes,
//! or comes back with another `row_id`) is counted per listener and in [`Model::rows_lost`]; the
//! totals keep their base and add what the new row counts: short by what the old row counted
//! after the last read, never reset. Rows for ports that no longer listen and saw no events are
//! dropped after a grace period.
//!
//! A listener row is a group: every LISTEN socket on the port (SO_REUSEPORT members, v4 and v6
//! sockets) is a [`SocketRow`] of its own, keyed by inode, with its own queue, backlog, counters
//! and the threads that accept from it. The group's queue and backlog are those of its fullest
//! member, never a sum (each socket drops on its own queue).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
};

use hdrhistogram::Histogram;
use socktrace_common::{
    ListenerStats, SOCKET_KEY, listener_key, socket_key,
    wait::{self, AcceptorKey, AcceptorSeen, WaitKey},
};

use crate::event::Record;

/// Identity of a listener: a TCP port in a network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenerKey {
    pub netns: u32,
    pub lport: u16,
}

/// A LISTEN socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct DiagListener {
    pub netns: u32,
    pub laddr: IpAddr,
    pub lport: u16,
    /// Accept queue now (Recv-Q of a listener).
    pub queue_len: u32,
    /// Backlog (Send-Q of a listener).
    pub backlog: u32,
    pub owners: Vec<(u32, String)>,
    /// `sk_drops` (SK_MEMINFO_DROPS), when the kernel reported it.
    pub drops: Option<u64>,
    /// The socket's inode and cookie (its identity; 0 when not reported).
    pub inode: u32,
    pub cookie: u64,
}

/// One sock_diag sample: LISTEN sockets, and per port the request sockets (SYN_RECV) waiting for
/// the handshake's final ACK.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DiagSample {
    pub listeners: Vec<DiagListener>,
    pub syn_recv: BTreeMap<ListenerKey, u32>,
}

/// Kernel counters of one listener, monotonic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub accepts: u64,
    pub overflows: u64,
    pub syn_drops: u64,
    pub synack_retransmits: u64,
    pub retransmits: u64,
    /// Accepts whose queue wait is known (the enqueue was seen).
    pub waited: u64,
    /// Children added to the accept queue (counted only without an accept hook).
    pub queued: u64,
    /// Listener closes, and the children they left in the queue (with `queued`).
    pub closes: u64,
    pub unaccepted: u64,
}

impl Counts {
    fn of(s: &ListenerStats) -> Counts {
        Counts {
            accepts: s.accepts,
            overflows: s.overflows,
            syn_drops: s.syn_drops,
            synack_retransmits: s.synack_retransmits,
            retransmits: s.retransmits,
            waited: s.wait_count,
            queued: s.queued,
            closes: s.closes,
            unaccepted: s.unaccepted,
        }
    }

    /// `self - earlier`; a counter that went backwards (the kernel entry was evicted and
    /// recreated) counts from zero again.
    fn since(&self, earlier: &Counts) -> Counts {
        let d = |now: u64, then: u64| if now >= then { now - then } else { now };
        Counts {
            accepts: d(self.accepts, earlier.accepts),
            overflows: d(self.overflows, earlier.overflows),
            syn_drops: d(self.syn_drops, earlier.syn_drops),
            synack_retransmits: d(self.synack_retransmits, earlier.synack_retransmits),
            retransmits: d(self.retransmits, earlier.retransmits),
            waited: d(self.waited, earlier.waited),
            queued: d(self.queued, earlier.queued),
            closes: d(self.closes, earlier.closes),
            unaccepted: d(self.unaccepted, earlier.unaccepted),
        }
    }

    fn add(&mut self, o: &Counts) {
        self.accepts += o.accepts;
        self.overflows += o.overflows;
        self.syn_drops += o.syn_drops;
        self.synack_retransmits += o.synack_retransmits;
        self.retransmits += o.retransmits;
        self.waited += o.waited;
        self.queued += o.queued;
        self.closes += o.closes;
        self.unaccepted += o.unaccepted;
    }
}

/// Accepts derived from the children queued, where no accept hook runs (`--accept-hooks off`):
/// accepted = queued since the first read − (queue length now − queue length then) − children
/// left in the queue by a close (after which the queue is 0 until a listener is back). The kernel
/// row is read before the sock_diag sample, so a child queued in between makes the queue longer
/// than the count explains: the estimate is low for one interval, never high, and the next
/// sample makes up for it (what is reported is never taken back).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Derived {
    /// Queue length when the counting began.
    start: Option<u32>,
    queued: u64,
    unaccepted: u64,
    closed: bool,
    reported: u64,
}

impl Derived {
    /// Adds `queued` children; with the queue length `queue` (None: not sampled, or no longer
    /// listening) returns the accepts not reported before. `start`: the queue length when
    /// the count began, if this is the first sample.
    fn step(&mut self, c: &Counts, queue: Option<u32>, start: u32) -> u64 {
        self.queued += c.queued;
        self.unaccepted += c.unaccepted;
        self.closed |= c.closes > 0;
        // Not listed (closed): the queue is empty once a close was seen; else unknown (yet).
        let Some(q) = queue.or(self.closed.then_some(0)) else { return 0 };
        let start = *self.start.get_or_insert(start);
        let accepted = (self.queued + u64::from(start)).saturating_sub(u64::from(q) + self.unaccepted);
        let n = accepted.saturating_sub(self.reported);
        self.reported += n;
        n
    }
}

/// When a listener accepted and dropped, over a `diagnose` window: the time series the episode
/// rules read ([`Model::keep_timeline`]). Only long gaps between accepts are kept, with the drop
/// times (bounded) that fall anywhere in the window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timeline {
    pub first_accept_ns: Option<u64>,
    pub last_accept_ns: Option<u64>,
    /// Gaps between consecutive accepts (start, end) of at least [`Timeline::KEEP_GAP_NS`], with
    /// the queue wait of the accept that ended it (how long its connection had waited), if known.
    pub gaps: Vec<(u64, u64, Option<u64>)>,
    /// Gaps shorter than that (only counted: the rules need the median gap).
    pub short_gaps: u64,
    /// Times of listen overflows and SYN drops, at most [`Timeline::MAX_DROPS`] of them.
    pub drops: Vec<u64>,
    /// Drop events past that bound (counted, not timed).
    pub drops_untimed: u64,
}

impl Timeline {
    /// Gaps shorter than this are never part of a stall episode (the rules' floor is higher).
    pub const KEEP_GAP_NS: u64 = 20_000_000;
    pub const MAX_DROPS: usize = 1 << 20;

    pub(crate) fn accept(&mut self, ts: u64, wait: Option<u64>) {
        if let Some(last) = self.last_accept_ns {
            // Events of different CPUs can arrive slightly out of order.
            if ts < last {
                return;
            }
            if ts - last >= Self::KEEP_GAP_NS {
                self.gaps.push((last, ts, wait));
            } else {
                self.short_gaps += 1;
            }
        }
        self.first_accept_ns.get_or_insert(ts);
        self.last_accept_ns = Some(ts);
    }

    pub(crate) fn drop_at(&mut self, ts: u64) {
        if self.drops.len() < Self::MAX_DROPS {
            self.drops.push(ts);
        } else {
            self.drops_untimed += 1;
        }
    }

    /// Median gap between consecutive accepts (ns), when there were at least two accepts: exact
    /// when it is a kept gap, else "shorter than [`Timeline::KEEP_GAP_NS`]" (reported as that).
    pub fn median_gap_ns(&self) -> Option<u64> {
        let n = self.short_gaps + self.gaps.len() as u64;
        if n == 0 {
            return None;
        }
        let mid = n / 2;
        if mid < self.short_gaps {
            return Some(Self::KEEP_GAP_NS);
        }
        let mut long: Vec<u64> = self.gaps.iter().map(|(a, b, _)| b - a).collect();
        long.sort_unstable();
        long.get(usize::try_from(mid - self.short_gaps).unwrap_or(usize::MAX)).copied()
    }
}

/// Who last accepted from a listener.
#[derive(Clone, Debug, PartialEq)]
pub struct Acceptor {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub ts_ns: u64,
}

/// Threads remembered per socket (the most recent accepters).
pub const MAX_ACCEPTORS: usize = 16;

/// One LISTEN socket of a listener group.
#[derive(Clone, Debug, PartialEq)]
pub struct SocketRow {
    pub inode: u32,
    /// Socket cookie from sock_diag (0: not listed yet).
    pub cookie: u64,
    pub laddr: Option<IpAddr>,
    /// Listed by the last sock_diag sample.
    pub listening: bool,
    pub queue_len: Option<u32>,
    pub backlog: Option<u32>,
    /// Accept-queue high-water mark in the last closed interval.
    pub queue_peak: Option<u32>,
    pub drops: Option<u64>,
    /// Processes holding its file descriptor (they need not accept from it).
    pub owners: Vec<(u32, String)>,
    pub total: Counts,
    pub interval: Counts,
    /// Threads that accepted from it since the agent started, latest accept each, newest first.
    pub acceptors: Vec<Acceptor>,
    /// Accept gaps and drop times ([`Model::keep_timeline`]).
    pub timeline: Option<Timeline>,
    /// Times its kernel row was evicted: counts between the read before and the eviction are lost.
    pub kernel_resets: u64,
    seen: u64,
    derived: Derived,
}

impl SocketRow {
    fn new(inode: u32, now: u64) -> SocketRow {
        SocketRow {
            inode,
            cookie: 0,
            laddr: None,
            listening: false,
            queue_len: None,
            backlog: None,
            queue_peak: None,
            drops: None,
            owners: Vec::new(),
            total: Counts::default(),
            interval: Counts::default(),
            acceptors: Vec::new(),
            timeline: None,
            kernel_resets: 0,
            seen: now,
            derived: Derived::default(),
        }
    }

    /// The queue passed its backlog (the kernel drops at `len > backlog`) in the last interval.
    pub fn saturated(&self) -> bool {
        match (self.queue_peak, self.backlog) {
            (Some(p), Some(b)) => p > b,
            _ => self.interval.overflows + self.interval.syn_drops > 0,
        }
    }
}

/// Socket rows not listed and idle for this many intervals are dropped.
const SOCKET_GRACE_INTERVALS: u64 = 2;

/// One listener's state.
pub struct Listener {
    pub key: ListenerKey,
    pub laddrs: BTreeSet<IpAddr>,
    pub owners: Vec<(u32, String)>,
    /// Listening now according to the last sock_diag listing.
    pub listening: bool,
    pub queue_len: Option<u32>,
    pub backlog: Option<u32>,
    pub drops: Option<u64>,
    /// Half-open connections (SYN_RECV request sockets) in the last sample.
    pub syn_recv: Option<u32>,
    /// Counters since the agent started (monotonic).
    pub total: Counts,
    /// Counters in the last closed interval.
    pub interval: Counts,
    /// Accept-queue high-water mark in the last closed interval (kernel peak and diag sample).
    pub queue_peak: Option<u32>,
    /// Accept-queue waits in the current (open) interval, ns; allocated at the interval's first
    /// accept (most listeners are idle in most intervals).
    waits_open: Option<Histogram<u64>>,
    /// Accept-queue waits of the last closed interval, ns; None without accepts.
    pub waits: Option<Histogram<u64>>,
    /// Every accept-queue wait since start, ns, when the model keeps them
    /// ([`Model::keep_total_waits`]).
    pub waits_total: Option<Histogram<u64>>,
    pub last_acceptor: Option<Acceptor>,
    /// Accepts whose queue wait cannot be known: the connection was queued before tracing started.
    pub accepts_unknown_wait: u64,
    /// Accept gaps and drop times ([`Model::keep_timeline`]).
    pub timeline: Option<Timeline>,
    /// Backlog passed to listen(2), when that call was traced.
    pub requested_backlog: Option<u32>,
    /// Queue high-water per interval, newest last (for sparklines).
    pub history: Vec<u32>,
    /// The LISTEN sockets of this port, by inode.
    pub sockets: BTreeMap<u32, SocketRow>,
    /// Times its kernel row was evicted (LRU, the map was full): the counts between the read
    /// before and the eviction are lost, so its totals may be short by that much (never reset).
    pub kernel_resets: u64,
    /// Interval number in which this row last had activity or was listening.
    seen: u64,
    derived: Derived,
}

/// p50, p99 and max (ns) of recorded waits; None when empty.
pub fn quantiles(h: &Histogram<u64>) -> Option<(u64, u64, u64)> {
    (!h.is_empty()).then(|| (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max()))
}

/// Longest accept wait recorded (longer ones count as this): 1 h.
const MAX_WAIT_NS: u64 = 3_600_000_000_000;

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 2 significant digits (1 % resolution), grown on demand up to the longest
    // wait seen: accept waits span microseconds to minutes. The whole range allocated up front at
    // 3 digits took 196 KiB per histogram, 590 KiB per listener (3 histograms): 580 MiB of RSS
    // for 1000 listeners. Now 2 KiB per histogram while waits stay under 131 µs, plus 1 KiB
    // per doubling of the longest wait (15 KiB for 1 s).
    let mut h = Histogram::new_with_bounds(1_000, 2_000, 2).unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!()));
    h.auto(true);
    h
}

impl Listener {
    fn new(key: ListenerKey) -> Listener {
        Listener {
            key,
            laddrs: BTreeSet::new(),
            owners: Vec::new(),
            listening: false,
            queue_len: None,
            backlog: None,
            drops: None,
            syn_recv: None,
            total: Counts::default(),
            interval: Counts::default(),
            queue_peak: None,
            waits_open: None,
            waits: None,
            waits_total: None,
            last_acceptor: None,
            accepts_unknown_wait: 0,
            timeline: None,
            requested_backlog: None,
            history: Vec::new(),
            sockets: BTreeMap::new(),
            kernel_resets: 0,
            seen: 0,
            derived: Derived::default(),
        }
    }

    /// p50, p99 and max of the last interval's accept waits (ns); None without accepts.
    pub fn wait_quantiles(&self) -> Option<(u64, u64, u64)> {
        self.waits.as_ref().and_then(quantiles)
    }

    /// The queue hit its backlog (the kernel drops at `len > backlog`).
    pub fn saturated(&self) -> bool {
        match (self.queue_peak, self.backlog) {
            (Some(p), Some(b)) => p > b,
            _ => self.interval.overflows + self.interval.syn_drops > 0,
        }
    }
}

/// A row's kernel-side fields: totals, last interval, its high-water mark, backlog, last activity.
type KernelFields<'a> = (&'a mut Counts, &'a mut Counts, &'a mut Option<u32>, &'a mut Option<u32>, &'a mut u64);

/// One interval's kernel counters (`delta`), high-water mark and backlog into a port or socket row.
fn absorb(row: KernelFields<'_>, delta: Counts, peak: Option<u32>, queue_max: u32, now: u64) {
    let (total, interval, queue_peak, backlog, seen) = row;
    total.add(&delta);
    *interval = delta;
    *queue_peak = peak;
    if queue_max != 0 && backlog.is_none() {
        *backlog = Some(queue_max);
    }
    if delta != Counts::default() {
        *seen = now;
    }
}

/// How long (in intervals) a row with no listener and no activity is kept.
pub const GRACE_INTERVALS: u64 = 30;

#[derive(Default)]
pub struct Model {
    pub listeners: BTreeMap<ListenerKey, Listener>,
    /// Kernel row id and counters at the last read (or seed), per key (kept for listeners dropped
    /// from the model until the agent deletes their kernel row: [`Model::gone_rows`]).
    kernel_last: BTreeMap<ListenerKey, (u32, Counts)>,
    /// The same per socket inode.
    kernel_last_socket: BTreeMap<u32, (u32, Counts)>,
    /// Kernel rows read (or seeded) before and evicted since: vanished from the map, or back
    /// with another `row_id`. Their counts since the read before are lost.
    pub rows_lost: u64,
    interval: u64,
    /// Also keep every wait since start per listener (`diagnose`; `top` and `serve` need only the
    /// last interval's).
    pub keep_total_waits: bool,
    /// Also keep each listener's [`Timeline`] (`diagnose`, which then also needs drop events).
    pub keep_timeline: bool,
    /// `WAITS` counts at the last read.
    waits_last: std::collections::HashMap<WaitKey, u64>,
    /// Derive accepts from the children queued (no accept hook: `--accept-hooks off`).
    pub derive_accepts: bool,
    /// Queue lengths when the agent started (the sample its kernel rows were seeded from), per
    /// port (all its sockets) and per socket inode: where counting queued children began.
    start_queues: (BTreeMap<ListenerKey, u32>, BTreeMap<u32, u32>),
}

/// `now - last` for a row read before with `last_id`; `reset` when the row is another one (it
/// was evicted and created again: everything it holds is new).
fn kernel_delta(last: Option<(u32, Counts)>, row_id: u32, now: &Counts) -> (Counts, bool) {
    match last {
        Some((id, c)) if id == row_id => (now.since(&c), false),
        Some(_) => (*now, true),
        None => (*now, false),
    }
}

impl Model {
    /// Remembers the queue lengths of the listeners that existed when the agent started (the
    /// kernel rows seeded from this sample count children queued from then on).
    pub fn starting_queues(&mut self, sample: &DiagSample) {
        for d in &sample.listeners {
            *self.start_queues.0.entry(ListenerKey { netns: d.netns, lport: d.lport }).or_default() += d.queue_len;
            if d.inode != 0 {
                self.start_queues.1.insert(d.inode, d.queue_len);
            }
        }
    }

    /// Accepts derived for the interval just closed (see [`Derived`]): per socket from its own
    /// queue, per port from the sum of its sockets' queues.
    fn derive_accepts(&mut self, port_queues: Option<&BTreeMap<ListenerKey, u32>>) {
        let starts = &mut self.start_queues;
        for (key, l) in &mut self.listeners {
            let queue = port_queues.and_then(|q| q.get(key).copied()).filter(|_| l.listening);
            let start = if queue.is_some() { starts.0.remove(key).unwrap_or(0) } else { 0 };
            let n = l.derived.step(&l.interval, queue, start);
            l.interval.accepts = n;
            l.total.accepts += n;
            for (ino, sock) in &mut l.sockets {
                let queue = sock.queue_len.filter(|_| port_queues.is_some() && sock.listening);
                let start = if queue.is_some() { starts.1.remove(ino).unwrap_or(0) } else { 0 };
                let n = sock.derived.step(&sock.interval, queue, start);
                sock.interval.accepts = n;
                sock.total.accepts += n;
            }
        }
    }

    /// The agent created this kernel row (`LISTENERS` key): an eviction before the next read is
    /// then noticed too.
    pub fn seeded(&mut self, key: u64, row: &ListenerStats) {
        if key & SOCKET_KEY != 0 {
            let inode = u32::try_from(key & u64::from(u32::MAX)).unwrap_or(0);
            self.kernel_last_socket.insert(inode, (row.row_id, Counts::default()));
        } else {
            self.kernel_last.insert(ListenerKey { netns: row.netns, lport: row.lport }, (row.row_id, Counts::default()));
        }
    }

    /// Every `LISTENERS` key the map holds now (before [`Model::close_interval`]): a row read or
    /// seeded before and missing now was evicted (neither the kernel nor the agent deletes rows).
    pub fn kernel_rows_present(&mut self, present: &HashSet<u64>) {
        let gone: Vec<ListenerKey> = self.kernel_last.keys().filter(|k| !present.contains(&listener_key(k.netns, k.lport))).copied().collect();
        for k in gone {
            self.kernel_last.remove(&k);
            self.rows_lost += 1;
            // Also a listener seeded but not yet in the model: the loss stays with its row.
            self.row(k).kernel_resets += 1;
        }
        let gone: Vec<u32> = self.kernel_last_socket.keys().filter(|i| !present.contains(&socket_key(**i))).copied().collect();
        for inode in gone {
            self.kernel_last_socket.remove(&inode);
            self.rows_lost += 1;
            if let Some(s) = self.listeners.values_mut().find_map(|l| l.sockets.get_mut(&inode)) {
                s.kernel_resets += 1;
            }
        }
    }

    fn row(&mut self, key: ListenerKey) -> &mut Listener {
        let n = self.interval;
        self.listeners.entry(key).or_insert_with(|| {
            let mut l = Listener::new(key);
            l.seen = n;
            l
        })
    }

    /// An event from the ring buffer: `listen()` calls (the backlog asked for), and the times of
    /// accepts and drops for [`Model::keep_timeline`]. Waits and acceptors come from the kernel's
    /// maps ([`Model::take_waits`], [`Model::take_acceptors`]), whether or not accepts are sent.
    pub fn on_event(&mut self, r: &Record) {
        if r.kind == "listen" {
            let row = self.row(ListenerKey { netns: r.netns, lport: r.lport });
            row.requested_backlog = r.queue_max;
            return;
        }
        let keep_timeline = self.keep_timeline;
        let now = self.interval;
        if r.kind == "listen_overflow" || r.kind == "syn_drop" {
            if keep_timeline {
                let row = self.row(ListenerKey { netns: r.netns, lport: r.lport });
                row.timeline.get_or_insert_default().drop_at(r.ts_ns);
                if let Some(ino) = r.inode {
                    row.sockets.entry(ino).or_insert_with(|| SocketRow::new(ino, now)).timeline.get_or_insert_default().drop_at(r.ts_ns);
                }
            }
            return;
        }
        if r.kind != "accept" {
            return;
        }
        let row = self.row(ListenerKey { netns: r.netns, lport: r.lport });
        if keep_timeline {
            row.timeline.get_or_insert_default().accept(r.ts_ns, r.accept_wait_ns);
            if let Some(ino) = r.inode {
                row.sockets.entry(ino).or_insert_with(|| SocketRow::new(ino, now)).timeline.get_or_insert_default().accept(r.ts_ns, r.accept_wait_ns);
            }
        }
        if let Some(a) = r.laddr {
            row.laddrs.insert(a);
        }
    }

    /// The kernel's wait buckets now (`WAITS`: monotonic counts per socket and bucket, within the
    /// view's filter) into the open interval of each port: what grew since the last read. A count
    /// that went backwards (its entry was evicted and recreated) counts from zero again. Each
    /// bucket is recorded at its lower bound, which lands in the HDR bucket its waits would have.
    pub fn take_waits(&mut self, now: &[(WaitKey, u64)]) {
        let keep_total = self.keep_total_waits;
        let mut last = std::mem::take(&mut self.waits_last);
        for (k, count) in now {
            let before = last.remove(k).unwrap_or(0);
            let delta = if *count >= before { count - before } else { *count };
            self.waits_last.insert(*k, *count);
            if delta == 0 {
                continue;
            }
            let w = wait::lower(k.bucket).clamp(1_000, MAX_WAIT_NS);
            let row = self.row(ListenerKey { netns: k.netns, lport: k.lport });
            // Auto-resizing: only fails if the counts array cannot be allocated.
            let _ = row.waits_open.get_or_insert_with(histogram).record_n(w, delta);
            if keep_total {
                let _ = row.waits_total.get_or_insert_with(histogram).record_n(w, delta);
            }
        }
    }

    /// The kernel's acceptors now (`ACCEPTORS`: each thread's latest accept per socket, within the
    /// view's filter): each socket row's threads, newest first, and each port's latest acceptor.
    pub fn take_acceptors(&mut self, now: &[(AcceptorKey, AcceptorSeen)]) {
        let mut by_port: BTreeMap<ListenerKey, Vec<(u32, Acceptor)>> = BTreeMap::new();
        for (k, seen) in now {
            let len = seen.comm.iter().position(|&b| b == 0).unwrap_or(seen.comm.len());
            let a = Acceptor { pid: seen.pid, tid: k.tid, comm: String::from_utf8_lossy(&seen.comm[..len]).into_owned(), ts_ns: seen.ts_ns };
            by_port.entry(ListenerKey { netns: k.netns, lport: k.lport }).or_default().push((k.inode, a));
        }
        for (key, mut seen) in by_port {
            let Some(row) = self.listeners.get_mut(&key) else { continue };
            seen.sort_by(|a, b| b.1.ts_ns.cmp(&a.1.ts_ns).then(a.1.tid.cmp(&b.1.tid)));
            if let Some((_, newest)) = seen.first() {
                row.last_acceptor = Some(newest.clone());
            }
            for sock in row.sockets.values_mut() {
                sock.acceptors = seen.iter().filter(|(ino, _)| *ino == sock.inode).take(MAX_ACCEPTORS).map(|(_, a)| a.clone()).collect();
            }
        }
    }

    /// Closes an interval: `kernel` is every `LISTENERS` entry with the high-water mark of the
    /// epoch that just ended, `diag` the current LISTEN sockets (None: sock_diag unavailable).
    /// `sockets` is every socket row (inode, counters, high-water mark) the same way.
    pub fn close_interval(
        &mut self,
        kernel: &[(ListenerKey, ListenerStats, Option<u32>)],
        sockets: &[(u32, ListenerStats, Option<u32>)],
        diag: Option<&DiagSample>,
    ) {
        self.interval += 1;
        let now = self.interval;
        for l in self.listeners.values_mut() {
            l.interval = Counts::default();
            l.queue_peak = None;
            for s in l.sockets.values_mut() {
                s.interval = Counts::default();
                s.queue_peak = None;
            }
        }
        for (inode, stats, peak) in sockets {
            let counts = Counts::of(stats);
            let (delta, reset) = kernel_delta(self.kernel_last_socket.insert(*inode, (stats.row_id, counts)), stats.row_id, &counts);
            let key = ListenerKey { netns: stats.netns, lport: stats.lport };
            let known = self.listeners.get(&key).is_some_and(|l| l.sockets.contains_key(inode));
            self.rows_lost += u64::from(reset);
            if delta == Counts::default() && peak.is_none() && !known && !reset {
                continue;
            }
            let row = self.row(key);
            let sock = row.sockets.entry(*inode).or_insert_with(|| SocketRow::new(*inode, now));
            sock.kernel_resets += u64::from(reset);
            absorb((&mut sock.total, &mut sock.interval, &mut sock.queue_peak, &mut sock.backlog, &mut sock.seen), delta, *peak, stats.queue_max, now);
        }
        for (key, stats, peak) in kernel {
            let counts = Counts::of(stats);
            let (delta, reset) = kernel_delta(self.kernel_last.insert(*key, (stats.row_id, counts)), stats.row_id, &counts);
            self.rows_lost += u64::from(reset);
            if delta == Counts::default() && peak.is_none() && !self.listeners.contains_key(key) && !reset {
                continue;
            }
            let row = self.row(*key);
            row.kernel_resets += u64::from(reset);
            row.accepts_unknown_wait += delta.accepts.saturating_sub(delta.waited);
            absorb((&mut row.total, &mut row.interval, &mut row.queue_peak, &mut row.backlog, &mut row.seen), delta, *peak, stats.queue_max, now);
        }
        let mut port_queues: BTreeMap<ListenerKey, u32> = BTreeMap::new();
        if let Some(sample) = diag {
            let diag = &sample.listeners;
            for l in self.listeners.values_mut() {
                l.listening = false;
                l.syn_recv = Some(sample.syn_recv.get(&l.key).copied().unwrap_or(0));
            }
            for l in self.listeners.values_mut() {
                for sock in l.sockets.values_mut() {
                    sock.listening = false;
                }
            }
            // Several sockets can share a port (v4 + v6, SO_REUSEPORT): each is a socket row; the
            // group shows its fullest member's queue and backlog, every owner, the sum of sk_drops.
            let mut fresh: BTreeMap<ListenerKey, Vec<&DiagListener>> = BTreeMap::new();
            for d in diag {
                fresh.entry(ListenerKey { netns: d.netns, lport: d.lport }).or_default().push(d);
            }
            for (key, members) in fresh {
                let row = self.row(key);
                row.listening = true;
                row.seen = now;
                let fullest = members
                    .iter()
                    .max_by(|a, b| {
                        let fill = |d: &DiagListener| f64::from(d.queue_len) / f64::from(d.backlog.max(1));
                        fill(a).total_cmp(&fill(b)).then(a.queue_len.cmp(&b.queue_len))
                    })
                    .copied();
                row.queue_len = fullest.map(|d| d.queue_len);
                row.backlog = fullest.map(|d| d.backlog);
                row.owners.clear();
                row.laddrs.clear();
                row.drops = None;
                for d in &members {
                    for o in &d.owners {
                        if !row.owners.contains(o) {
                            row.owners.push(o.clone());
                        }
                    }
                    row.laddrs.insert(d.laddr);
                    if let Some(x) = d.drops {
                        row.drops = Some(row.drops.unwrap_or(0) + x);
                    }
                    if d.inode != 0 {
                        let sock = row.sockets.entry(d.inode).or_insert_with(|| SocketRow::new(d.inode, now));
                        sock.listening = true;
                        sock.seen = now;
                        sock.cookie = d.cookie;
                        sock.laddr = Some(d.laddr);
                        sock.queue_len = Some(d.queue_len);
                        sock.backlog = Some(d.backlog);
                        sock.drops = d.drops;
                        sock.owners.clone_from(&d.owners);
                        sock.queue_peak = Some(sock.queue_peak.map_or(d.queue_len, |p| p.max(d.queue_len)));
                    }
                }
                port_queues.insert(key, members.iter().map(|d| d.queue_len).sum());
                let q = row.queue_len.unwrap_or(0);
                row.queue_peak = Some(row.queue_peak.map_or(q, |p| p.max(q)));
                row.syn_recv = Some(sample.syn_recv.get(&key).copied().unwrap_or(0));
            }
        }
        if self.derive_accepts {
            self.derive_accepts(diag.map(|_| &port_queues));
        }
        for l in self.listeners.values_mut() {
            l.waits = l.waits_open.take();
            if l.wait_quantiles().is_some() {
                l.seen = now;
            }
            l.history.push(l.queue_peak.unwrap_or(0));
            if l.history.len() > 120 {
                l.history.remove(0);
            }
        }
        for l in self.listeners.values_mut() {
            l.sockets.retain(|_, s| s.listening || now - s.seen <= SOCKET_GRACE_INTERVALS);
        }
        self.listeners.retain(|_, l| l.listening || now - l.seen <= GRACE_INTERVALS);
    }

    /// Kernel rows of the interval just closed whose listener (port rows) or socket (socket rows)
    /// the model has let go (closed, then idle for the grace period): the agent deletes them from
    /// the kernel map, then calls [`Model::forget_rows`]. Without this every listener ever seen
    /// keeps its row until the LRU map evicts it, and each interval reads them all.
    pub fn gone_rows(&self, kernel: &[(ListenerKey, ListenerStats, Option<u32>)], sockets: &[(u32, ListenerStats, Option<u32>)]) -> (Vec<ListenerKey>, Vec<u32>) {
        let ports = kernel.iter().map(|(k, _, _)| *k).filter(|k| !self.listeners.contains_key(k)).collect();
        let socks = sockets
            .iter()
            .filter(|(ino, s, _)| !self.listeners.get(&ListenerKey { netns: s.netns, lport: s.lport }).is_some_and(|l| l.sockets.contains_key(ino)))
            .map(|(ino, _, _)| *ino)
            .collect();
        (ports, socks)
    }

    /// Forgets the last-read counters of rows deleted from the kernel map (a new row under the
    /// same key then counts from zero, as the kernel's does).
    pub fn forget_rows(&mut self, ports: &[ListenerKey], sockets: &[u32]) {
        for k in ports {
            self.kernel_last.remove(k);
        }
        for ino in sockets {
            self.kernel_last_socket.remove(ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(queued: u64, closes: u64, unaccepted: u64) -> Counts {
        Counts { queued, closes, unaccepted, ..Counts::default() }
    }

    #[test]
    fn derived_accepts_follow_the_queue_and_never_go_back() {
        let mut d = Derived::default();
        // 5 already queued when counting began; 10 more queued, queue now 3: 12 accepted.
        assert_eq!(d.step(&queued(10, 0, 0), Some(3), 5), 12);
        // A child queued after the row was read shows in the queue first: low for now, never high.
        assert_eq!(d.step(&queued(0, 0, 0), Some(4), 99), 0);
        assert_eq!(d.step(&queued(1, 0, 0), Some(0), 99), 4);
        // No sample: the count waits, nothing is made up.
        assert_eq!(d.step(&queued(7, 0, 0), None, 0), 0);
        // Closed with 2 left in the queue: those were never accepted.
        assert_eq!(d.step(&queued(0, 1, 2), None, 0), 5);
        assert_eq!(d.step(&queued(0, 0, 0), None, 0), 0);
    }

    fn stats(accepts: u64, overflows: u64) -> ListenerStats {
        let mut s = ListenerStats::ZERO;
        s.accepts = accepts;
        s.overflows = overflows;
        s.queue_max = 8;
        s
    }

    #[test]
    fn wait_histograms_start_small_and_grow_to_an_hour() {
        let mut h = histogram();
        assert!(h.distinct_values() <= 256, "{} counts", h.distinct_values());
        h.record(MAX_WAIT_NS).unwrap();
        h.record(1_000).unwrap();
        assert!(h.max() >= MAX_WAIT_NS / 100 * 99 && h.min() <= 1_010);
    }

    #[test]
    fn interval_deltas_and_monotonic_totals() {
        let key = ListenerKey { netns: 1, lport: 80 };
        let mut m = Model::default();
        m.close_interval(&[(key, stats(5, 1), Some(9))], &[], None);
        assert_eq!(m.listeners[&key].interval.accepts, 5);
        assert_eq!(m.listeners[&key].queue_peak, Some(9));
        m.close_interval(&[(key, stats(7, 1), None)], &[], None);
        let l = &m.listeners[&key];
        assert_eq!((l.interval.accepts, l.interval.overflows, l.total.accepts), (2, 0, 7));
        assert_eq!(l.queue_peak, None, "no event in the interval: no kernel peak");
        // The kernel entry was evicted and recreated: counting restarts, totals stay monotonic.
        m.close_interval(&[(key, stats(3, 0), None)], &[], None);
        assert_eq!(m.listeners[&key].total.accepts, 10);
    }

    #[test]
    fn evicted_rows_are_counted_and_totals_carry_their_base() {
        let key = ListenerKey { netns: 1, lport: 80 };
        let with_id = |accepts, id| ListenerStats { row_id: id, netns: 1, lport: 80, ..stats(accepts, 0) };
        let mut m = Model::default();
        // Seeded by the agent, then read with counts.
        m.seeded(listener_key(1, 80), &with_id(0, 7));
        m.kernel_rows_present(&HashSet::from([listener_key(1, 80)]));
        m.close_interval(&[(key, with_id(40, 7), None)], &[], None);
        assert_eq!((m.listeners[&key].total.accepts, m.rows_lost), (40, 0));
        // Evicted and created again by the kernel: more counts than before, yet another row.
        m.kernel_rows_present(&HashSet::from([listener_key(1, 80)]));
        m.close_interval(&[(key, with_id(55, 9), None)], &[], None);
        let l = &m.listeners[&key];
        assert_eq!((l.total.accepts, l.interval.accepts, l.kernel_resets, m.rows_lost), (95, 55, 1, 1), "the new row's counts all count");
        // Gone from the map: counted once, and its return is a new row.
        m.kernel_rows_present(&HashSet::new());
        m.close_interval(&[], &[], None);
        assert_eq!((m.listeners[&key].kernel_resets, m.rows_lost), (2, 2));
        m.kernel_rows_present(&HashSet::from([listener_key(1, 80)]));
        m.close_interval(&[(key, with_id(3, 11), None)], &[], None);
        assert_eq!((m.listeners[&key].total.accepts, m.rows_lost), (98, 2));
        // A socket row seeded and evicted before the first read is noticed too.
        m.seeded(socket_key(5), &with_id(0, 12));
        m.kernel_rows_present(&HashSet::from([listener_key(1, 80)]));
        assert_eq!(m.rows_lost, 3);
    }

    fn diag(addr: &str, inode: u32, q: u32, backlog: u32, owner: (u32, &str)) -> DiagListener {
        DiagListener {
            netns: 1,
            laddr: addr.parse().unwrap(),
            lport: 80,
            queue_len: q,
            backlog,
            owners: vec![(owner.0, owner.1.into())],
            drops: Some(1),
            inode,
            cookie: u64::from(inode) << 8,
        }
    }

    #[test]
    fn sockets_sharing_a_port_are_members_and_the_group_is_never_a_sum() {
        let key = ListenerKey { netns: 1, lport: 80 };
        let mut m = Model::default();
        let sample = DiagSample {
            listeners: vec![diag("0.0.0.0", 11, 2, 128, (10, "nginx")), diag("::", 12, 4, 128, (10, "nginx"))],
            syn_recv: BTreeMap::from([(key, 5)]),
        };
        m.close_interval(&[(key, stats(0, 0), Some(3))], &[], Some(&sample));
        let l = &m.listeners[&key];
        assert_eq!((l.queue_len, l.backlog, l.drops), (Some(4), Some(128), Some(2)));
        assert_eq!(l.queue_peak, Some(4));
        assert_eq!(l.owners.len(), 1);
        assert_eq!(l.laddrs.len(), 2);
        assert_eq!(l.syn_recv, Some(5));
        assert_eq!(l.sockets.len(), 2);
        assert_eq!((l.sockets[&12].queue_len, l.sockets[&12].cookie), (Some(4), 12 << 8));
    }

    #[test]
    fn reuseport_members_keep_their_own_counters_and_acceptors() {
        let key = ListenerKey { netns: 1, lport: 80 };
        let mut m = Model::default();
        // Three workers' sockets, backlog 16 each; the third is stuck with a full queue.
        let sample = DiagSample {
            listeners: vec![
                diag("0.0.0.0", 21, 0, 16, (100, "nginx")),
                diag("0.0.0.0", 22, 1, 16, (100, "nginx")),
                diag("0.0.0.0", 23, 17, 16, (100, "nginx")),
            ],
            syn_recv: BTreeMap::new(),
        };
        let member = |accepts, overflows| ListenerStats { netns: 1, lport: 80, ..stats(accepts, overflows) };
        let socks = [(21, member(40, 0), Some(2)), (22, member(38, 0), Some(3)), (23, member(0, 9), Some(17))];
        m.close_interval(&[(key, stats(78, 9), Some(17))], &socks, Some(&sample));
        // Thread 101 accepted from socket 21 (latest at 9), 102 from 22, 103 from 21 earlier.
        m.take_acceptors(&[acceptor(21, 101, 9), acceptor(22, 102, 7), acceptor(21, 103, 3)]);
        let l = &m.listeners[&key];
        assert_eq!(l.sockets[&21].acceptors.iter().map(|a| (a.tid, a.ts_ns)).collect::<Vec<_>>(), [(101, 9), (103, 3)]);
        assert_eq!(l.last_acceptor.as_ref().map(|a| (a.pid, a.tid, a.comm.as_str())), Some((101, 101, "nginx")));
        assert_eq!((l.queue_len, l.backlog), (Some(17), Some(16)));
        assert!(l.saturated());
        assert_eq!(l.sockets[&23].interval.overflows, 9);
        assert!(l.sockets[&23].acceptors.is_empty() && l.sockets[&23].saturated());
        assert_eq!(l.sockets[&22].acceptors.iter().map(|a| a.tid).collect::<Vec<_>>(), [102]);
        assert!(!l.sockets[&21].saturated());
        let sum: u64 = l.sockets.values().map(|s| s.interval.accepts).sum();
        assert_eq!(sum, l.interval.accepts);
        // The stuck socket is closed and reopened: a new inode, the old row goes after its grace.
        let reopened = DiagSample { listeners: vec![diag("0.0.0.0", 21, 0, 16, (100, "nginx")), diag("0.0.0.0", 22, 0, 16, (100, "nginx")), diag("0.0.0.0", 24, 0, 16, (100, "nginx"))], syn_recv: BTreeMap::new() };
        for _ in 0..=SOCKET_GRACE_INTERVALS {
            m.close_interval(&[(key, stats(78, 9), None)], &socks, Some(&reopened));
        }
        let inodes: Vec<u32> = m.listeners[&key].sockets.keys().copied().collect();
        assert_eq!(inodes, [21, 22, 24]);
    }

    fn acceptor(inode: u32, tid: u32, ts_ns: u64) -> (AcceptorKey, AcceptorSeen) {
        let mut comm = [0u8; 16];
        comm[..5].copy_from_slice(b"nginx");
        (AcceptorKey { netns: 1, inode, tid, lport: 80, _pad: 0 }, AcceptorSeen { ts_ns, pid: tid, comm_at: 0, comm })
    }

    /// Deterministic waits from 1 µs to ~20 s, log-uniform, with repeats (a tiny LCG: no new
    /// dependency for a test).
    fn waits(n: usize, seed: u64) -> Vec<u64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let exp = (x >> 33) % 24;
                let mant = (x >> 11) & 0x3f_ffff;
                (1u64 << (exp + 10)) + (mant % (1u64 << (exp + 10)))
            })
            .collect()
    }

    /// The same waits as per-accept events recorded them and as kernel buckets read back.
    fn both(samples: &[u64]) -> (Histogram<u64>, Histogram<u64>) {
        let mut direct = histogram();
        let mut counts: BTreeMap<u16, u64> = BTreeMap::new();
        for w in samples {
            direct.record((*w).clamp(1_000, MAX_WAIT_NS)).unwrap();
            *counts.entry(wait::bucket(*w)).or_default() += 1;
        }
        let mut m = Model::default();
        let key = |bucket| WaitKey { netns: 1, inode: 5, lport: 80, bucket, _pad: 0 };
        m.take_waits(&counts.iter().map(|(b, n)| (key(*b), *n)).collect::<Vec<_>>());
        m.close_interval(&[], &[], None);
        let via_kernel = m.listeners[&ListenerKey { netns: 1, lport: 80 }].waits.clone().unwrap();
        (direct, via_kernel)
    }

    #[test]
    fn kernel_buckets_give_the_percentiles_events_gave() {
        for (n, seed) in [(1, 1), (7, 2), (1000, 3), (50_000, 4)] {
            let (direct, via_kernel) = both(&waits(n, seed));
            assert_eq!(quantiles(&direct), quantiles(&via_kernel), "{n} waits");
            for q in [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0] {
                assert_eq!(direct.value_at_quantile(q), via_kernel.value_at_quantile(q), "q {q} of {n}");
            }
            assert_eq!(direct.len(), via_kernel.len());
        }
        // Edges: below the 1 µs floor, at it, at and past the 1 h ceiling.
        let (direct, via_kernel) = both(&[0, 5, 999, 1000, 1001, 131_071, 131_072, MAX_WAIT_NS, MAX_WAIT_NS * 3]);
        assert_eq!(direct.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect::<Vec<_>>(), via_kernel.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect::<Vec<_>>());
    }

    #[test]
    fn kernel_wait_counts_are_taken_as_deltas() {
        let key = ListenerKey { netns: 1, lport: 80 };
        let k = |inode, w| WaitKey { netns: 1, inode, lport: 80, bucket: wait::bucket(w), _pad: 0 };
        let mut m = Model { keep_total_waits: true, ..Model::default() };
        m.take_waits(&[(k(5, 2_000_000), 3), (k(6, 40_000_000), 1)]);
        m.close_interval(&[], &[], None);
        assert_eq!(m.listeners[&key].waits.as_ref().map(Histogram::len), Some(4), "both sockets make the port's histogram");
        // Nothing new: no waits this interval.
        m.take_waits(&[(k(5, 2_000_000), 3), (k(6, 40_000_000), 1)]);
        m.close_interval(&[], &[], None);
        assert_eq!(m.listeners[&key].wait_quantiles(), None);
        // Socket 5 +2; socket 6's bucket was evicted and recreated with 1: counted from zero.
        m.take_waits(&[(k(5, 2_000_000), 5), (k(6, 40_000_000), 1), (k(6, 40_000_000 * 2), 0)]);
        m.close_interval(&[], &[], None);
        assert_eq!(m.listeners[&key].waits.as_ref().map(Histogram::len), Some(2));
        m.take_waits(&[(k(5, 2_000_000), 5)]);
        m.take_waits(&[(k(5, 2_000_000), 5), (k(6, 40_000_000), 1)]);
        m.close_interval(&[], &[], None);
        let l = &m.listeners[&key];
        assert_eq!(l.waits.as_ref().map(Histogram::len), Some(1), "an entry that vanished and came back");
        assert_eq!(l.waits_total.as_ref().map(Histogram::len), Some(7), "since start: monotonic");
    }

    #[test]
    fn timeline_keeps_long_gaps_and_drops() {
        let mut t = Timeline::default();
        for ts in [0, 1_000_000, 2_000_000, 502_000_000, 503_000_000] {
            t.accept(ts, None);
        }
        t.drop_at(300_000_000);
        assert_eq!(t.gaps, [(2_000_000, 502_000_000, None)]);
        assert_eq!(t.short_gaps, 3);
        assert_eq!(t.median_gap_ns(), Some(Timeline::KEEP_GAP_NS), "most gaps are short");
        assert_eq!((t.first_accept_ns, t.last_accept_ns), (Some(0), Some(503_000_000)));
        let mut slow = Timeline::default();
        for ts in [0, 100_000_000, 200_000_000, 900_000_000] {
            slow.accept(ts, Some(1000));
        }
        assert_eq!(slow.median_gap_ns(), Some(100_000_000));
        assert_eq!(slow.drops, Vec::<u64>::new());
    }

    #[test]
    fn vanished_listener_dropped_after_grace() {
        let key = ListenerKey { netns: 1, lport: 80 };
        let mut m = Model::default();
        let none = DiagSample::default();
        m.close_interval(&[(key, stats(1, 0), None)], &[], Some(&none));
        for _ in 0..GRACE_INTERVALS {
            m.close_interval(&[(key, stats(1, 0), None)], &[], Some(&none));
        }
        assert!(m.listeners.contains_key(&key));
        m.close_interval(&[(key, stats(1, 0), None)], &[], Some(&none));
        assert!(!m.listeners.contains_key(&key));
    }

    #[test]
    fn rows_of_dropped_listeners_are_given_back() {
        let (key, other) = (ListenerKey { netns: 1, lport: 80 }, ListenerKey { netns: 1, lport: 81 });
        let mut m = Model::default();
        let none = DiagSample::default();
        let rows = |a: u64, b: u64| [(key, stats(a, 0), None), (other, stats(b, 0), None)];
        m.close_interval(&rows(1, 1), &[], Some(&none));
        assert_eq!(m.gone_rows(&rows(1, 1), &[]).0, Vec::<ListenerKey>::new(), "both are still in their grace period");
        for i in 0..=GRACE_INTERVALS {
            m.close_interval(&rows(1, 2 + i), &[], Some(&none));
        }
        assert_eq!(m.gone_rows(&rows(1, 2 + GRACE_INTERVALS), &[]).0, [key], "the idle, closed one goes; the busy one stays");
        m.forget_rows(&[key], &[]);
        // The kernel's new row under that key counts from zero, and so does the model.
        m.close_interval(&[(key, stats(3, 0), None)], &[], Some(&none));
        assert_eq!(m.listeners[&key].total.accepts, 3);
    }
}
