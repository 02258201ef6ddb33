//! Pressure on the kernel's bounded maps: their capacities (load-time options) and how many
//! entries each has lost to LRU eviction. Read by every tracing command (`probes` shows the
//! capacities, `watch` its exit summary, the agent's views the counts).
//!
//! The kernel has no eviction callback and counts no LRU eviction, so evictions are derived:
//! every program that creates an entry counts it (`STATS[*_INSERTS]`, only when `BPF_NOEXIST`
//! succeeded, so overwriting an existing entry is not an insert), every program that removes one
//! counts it (`STATS[*_DELETES]`, only when the delete found it), the agent counts the
//! `LISTENERS` rows it seeds itself, and nothing else removes entries. Every entry ever created is
//! therefore live, deleted or evicted: `evicted = inserts - deletes - live`, with `live` counted
//! here by walking the map's keys.
//!
//! The walk is not a snapshot. Inserts are read before it and deletes after it, so an entry
//! created during the walk is not in `inserts` (and counting it in `live` only lowers the result)
//! and an entry deleted during the walk is in `deletes`; a key walk that restarts (its cursor
//! entry was deleted) counts some entries twice, lowering it again. The result is thus a lower
//! bound of the evictions so far, exact when the map is quiet during the walk, and the reported
//! counter is its running maximum: it never decreases and never counts an eviction that did not
//! happen (the one exception is a delete in flight between its map update and its count at
//! the instant the walk ends: nanoseconds).
//!
//! What an eviction costs: a `LISTENERS` row lost takes with it the counts since the agent's
//! last read (the agent sees the row vanish or come back with another `row_id`, counts it per
//! listener, and keeps its totals monotonic); an `ENQUEUED` entry lost is an accept whose queue
//! wait is unknown (`STATS[ACCEPT_NO_WAIT]` counts those); an `ACCEPTING` entry lost is an accept
//! (syscall or kprobe hook) that is not seen at all; a `PAST` row lost, its counts; a `WAITS` row
//! lost, the waits of its socket and bucket since the agent's last read; an `ACCEPTORS` row lost,
//! that a thread accepted from that socket (until it accepts again).
//!
//! `WAITS` and `ACCEPTORS` rows are deleted only by the agent (rows of listeners it let go), which
//! counts its deletes and walks both maps every interval anyway.

use std::time::Instant;

use aya::{
    Ebpf, Pod,
    maps::{HashMap, MapData},
};
use socktrace_common::{
    ListenerStats, PastKey, stat,
    wait::{AcceptorKey, AcceptorSeen, WaitKey},
};

use crate::ring::Stats;

/// Capacities of the bounded maps, set at load time (`--map-*` options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Listening sockets `LISTENERS` can hold: it has a row per port and one per LISTEN socket,
    /// so twice this many rows.
    pub listeners: u32,
    /// Child sockets in accept queues (`ENQUEUED`); 0 in a loaded tracer: unused (the accept wait
    /// comes from the accepted socket's own stamp), created with one entry.
    pub pending: u32,
    /// Threads inside `accept()` at once (`ACCEPTING`).
    pub accepting: u32,
    /// (netns, port, class, address) rows of segments that never reached a listener (`PAST`).
    pub past: u32,
    /// (socket, wait bucket) rows of the in-kernel accept-wait histograms (`WAITS`).
    pub waits: u32,
    /// (socket, thread) rows of who accepted (`ACCEPTORS`).
    pub acceptors: u32,
}

impl MapSizes {
    pub const DEFAULT: MapSizes = MapSizes { listeners: 16384, pending: 65536, accepting: 16384, past: 16384, waits: 65536, acceptors: 16384 };
    /// Largest value of a `--map-*` option.
    pub const MAX: u32 = 1 << 22;
}

impl Default for MapSizes {
    fn default() -> MapSizes {
        MapSizes::DEFAULT
    }
}

/// One bounded map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoundedMap {
    Listeners,
    Enqueued,
    Accepting,
    Past,
    Waits,
    Acceptors,
}

impl BoundedMap {
    pub const ALL: [BoundedMap; 6] =
        [BoundedMap::Listeners, BoundedMap::Enqueued, BoundedMap::Accepting, BoundedMap::Past, BoundedMap::Waits, BoundedMap::Acceptors];

    /// The map's name in the eBPF object (and the `map` label of the metrics).
    pub fn name(self) -> &'static str {
        match self {
            BoundedMap::Listeners => "LISTENERS",
            BoundedMap::Enqueued => "ENQUEUED",
            BoundedMap::Accepting => "ACCEPTING",
            BoundedMap::Past => "PAST",
            BoundedMap::Waits => "WAITS",
            BoundedMap::Acceptors => "ACCEPTORS",
        }
    }

    /// The option that sets its capacity.
    pub fn option(self) -> &'static str {
        match self {
            BoundedMap::Listeners => "--map-listeners",
            BoundedMap::Enqueued => "--map-pending",
            BoundedMap::Accepting => "--map-accepting",
            BoundedMap::Past => "--map-past",
            BoundedMap::Waits => "--map-waits",
            BoundedMap::Acceptors => "--map-acceptors",
        }
    }

    /// Entries (`max_entries`) with these sizes.
    pub fn capacity(self, s: &MapSizes) -> u32 {
        match self {
            BoundedMap::Listeners => s.listeners.saturating_mul(2),
            BoundedMap::Enqueued => s.pending,
            BoundedMap::Accepting => s.accepting,
            BoundedMap::Past => s.past,
            BoundedMap::Waits => s.waits,
            BoundedMap::Acceptors => s.acceptors,
        }
    }

    /// What one entry is, for people.
    pub fn holds(self) -> &'static str {
        match self {
            BoundedMap::Listeners => "rows (a row per port and per LISTEN socket)",
            BoundedMap::Enqueued => "child sockets in accept queues (accept wait)",
            BoundedMap::Accepting => "threads inside accept()",
            BoundedMap::Past => "rows of segments that never reached a listener",
            BoundedMap::Waits => "(socket, accept-wait bucket) rows",
            BoundedMap::Acceptors => "(socket, accepting thread) rows",
        }
    }

    /// Why a map the loader made unused (capacity 0 in the tracer's sizes) is not needed.
    pub fn unused_because(self) -> &'static str {
        match self {
            BoundedMap::Enqueued => "the accept wait starts at the accepted socket's own stamp (--wait-start enqueue uses this map)",
            _ => "not used by the hooks attached",
        }
    }

    fn counters(self) -> (u32, Option<u32>) {
        match self {
            BoundedMap::Listeners => (stat::LISTENERS_INSERTS, None),
            BoundedMap::Enqueued => (stat::ENQUEUED_INSERTS, Some(stat::ENQUEUED_DELETES)),
            BoundedMap::Accepting => (stat::ACCEPTING_INSERTS, Some(stat::ACCEPTING_DELETES)),
            BoundedMap::Past => (stat::PAST_INSERTS, None),
            BoundedMap::Waits => (stat::WAITS_INSERTS, None),
            BoundedMap::Acceptors => (stat::ACCEPTORS_INSERTS, None),
        }
    }
}

/// A map the caller walked itself: its inserts (`STATS`) read before the walk, the rows the walk
/// found, and the rows the caller deleted so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Walk {
    pub inserts: u64,
    pub live: u64,
    pub deleted: u64,
}

/// One map's use at the last measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapUse {
    pub map: &'static str,
    pub capacity: u32,
    /// Entries counted by the last walk.
    pub entries: u64,
    pub inserts: u64,
    pub deletes: u64,
    /// Entries evicted since the programs were loaded (a lower bound, monotonic; see the module
    /// documentation).
    pub evicted: u64,
}

/// Every bounded map's use, kept across measurements (the eviction counts only grow).
#[derive(Clone, Debug, Default)]
pub struct Pressure {
    pub maps: Vec<MapUse>,
    /// Per map: no walk before this instant (see [`WALK_SHARE`]).
    next_walk: std::collections::BTreeMap<&'static str, Instant>,
}

/// A map walk takes at most this share of the time: after a walk of `d`, the next is `d /
/// WALK_SHARE` later (a full 65536-entry `ENQUEUED`, tens of ms, is then walked every few
/// seconds; a small map every interval). Until then the map's last numbers stand.
const WALK_SHARE: u32 = 50;

impl Pressure {
    /// Measures every map. `walked`: maps the caller just walked itself (the agent does, reading
    /// them), each with its inserts read before that walk, the rows found and the rows the caller
    /// deleted; the others are walked here. A walked `LISTENERS` counts among its inserts the rows
    /// the agent created itself before that walk (rows seeded after it are in neither number).
    pub fn measure(&mut self, ebpf: &Ebpf, stats: &Stats, sizes: &MapSizes, walked: &[(BoundedMap, Walk)]) {
        let mut maps = Vec::with_capacity(BoundedMap::ALL.len());
        for m in BoundedMap::ALL {
            let capacity = m.capacity(sizes);
            // An unused map (see `MapSizes`) is not measured, so not reported.
            if capacity == 0 {
                continue;
            }
            let (ins, del) = m.counters();
            let last = self.maps.iter().find(|u| u.map == m.name()).copied();
            let (inserts, entries, agent_deletes) = if let Some((_, w)) = walked.iter().find(|(w, _)| *w == m) {
                (w.inserts, w.live, Some(w.deleted))
            } else {
                let inserts = stats.get(ins);
                let deleted = del.map_or(0, |d| stats.get(d));
                // Everything inserted is deleted or already counted evicted: empty, no walk.
                if inserts == deleted + last.map_or(0, |u| u.evicted) {
                    maps.push(MapUse { map: m.name(), capacity, entries: 0, inserts, deletes: deleted, evicted: last.map_or(0, |u| u.evicted) });
                    continue;
                }
                if let (Some(u), Some(t)) = (last, self.next_walk.get(m.name()))
                    && Instant::now() < *t
                {
                    maps.push(u);
                    continue;
                }
                let started = Instant::now();
                let live = match m {
                    BoundedMap::Listeners => count_keys::<u64, ListenerStats>(ebpf, m.name(), capacity),
                    BoundedMap::Past => count_keys::<PastKey, u64>(ebpf, m.name(), capacity),
                    BoundedMap::Enqueued | BoundedMap::Accepting => count_keys::<u64, u64>(ebpf, m.name(), capacity),
                    BoundedMap::Waits => count_keys::<WaitKey, u64>(ebpf, m.name(), capacity),
                    BoundedMap::Acceptors => count_keys::<AcceptorKey, AcceptorSeen>(ebpf, m.name(), capacity),
                };
                self.next_walk.insert(m.name(), Instant::now() + started.elapsed() * WALK_SHARE);
                (inserts, live, None)
            };
            // LISTENERS, WAITS and ACCEPTORS rows are deleted only by the agent, which counts them.
            let deletes = agent_deletes.unwrap_or_else(|| del.map_or(0, |d| stats.get(d)));
            let before = last.map_or(0, |u| u.evicted);
            let evicted = evictions(before, inserts, deletes, entries);
            maps.push(MapUse { map: m.name(), capacity, entries, inserts, deletes, evicted });
        }
        self.maps = maps;
    }

    pub fn total_evicted(&self) -> u64 {
        self.maps.iter().map(|u| u.evicted).sum()
    }

    /// `LISTENERS 12/32768 rows, ENQUEUED 0/65536, …` with the evictions of each map that had any.
    pub fn summary(&self) -> String {
        self.maps
            .iter()
            .map(|u| {
                let ev = if u.evicted > 0 { format!(" ({} EVICTED)", u.evicted) } else { String::new() };
                format!("{} {}/{}{ev}", u.map, u.entries, u.capacity)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Evictions so far: `inserts - deletes - entries`, never below the count before (see the module
/// documentation for why it is a lower bound).
fn evictions(before: u64, inserts: u64, deletes: u64, entries: u64) -> u64 {
    before.max(inserts.saturating_sub(entries.saturating_add(deletes)))
}

/// Keys in a map, walked with `BPF_MAP_GET_NEXT_KEY` (one syscall each). A walk whose cursor was
/// deleted restarts from the first key; it stops at twice the capacity and then says the map is
/// full (an upper bound of what it holds, which only lowers the eviction count).
fn count_keys<K: Pod, V: Pod>(ebpf: &Ebpf, name: &str, capacity: u32) -> u64 {
    let Some(map) = ebpf.map(name) else { return 0 };
    let Ok(map) = HashMap::<&MapData, K, V>::try_from(map) else { return 0 };
    let limit = u64::from(capacity) * 2;
    let mut n = 0u64;
    for k in map.keys() {
        if k.is_err() {
            break;
        }
        n += 1;
        if n >= limit {
            return u64::from(capacity);
        }
    }
    n.min(u64::from(capacity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_follow_the_options() {
        let s = MapSizes { listeners: 10, pending: 20, accepting: 30, past: 40, waits: 50, acceptors: 60 };
        let caps: Vec<u32> = BoundedMap::ALL.iter().map(|m| m.capacity(&s)).collect();
        assert_eq!(caps, [20, 20, 30, 40, 50, 60]);
        assert_eq!(BoundedMap::Listeners.capacity(&MapSizes::DEFAULT), 32768, "the size before the options");
    }

    #[test]
    fn summary_names_evictions() {
        let p = Pressure {
            next_walk: std::collections::BTreeMap::new(),
            maps: vec![
                MapUse { map: "LISTENERS", capacity: 8, entries: 8, inserts: 20, deletes: 0, evicted: 12 },
                MapUse { map: "ENQUEUED", capacity: 4, entries: 1, inserts: 3, deletes: 2, evicted: 0 },
            ],
        };
        assert_eq!(p.summary(), "LISTENERS 8/8 (12 EVICTED), ENQUEUED 1/4");
        assert_eq!(p.total_evicted(), 12);
    }

    #[test]
    fn evictions_are_what_is_neither_live_nor_deleted_and_never_decrease() {
        // 100 children queued into 32 slots, then 20 accepted with their entry: 68 evicted.
        assert_eq!(evictions(0, 100, 20, 12), 68);
        // A walk that saw more (entries created during it, or counted twice) lowers the result;
        // the count stays where it was.
        assert_eq!(evictions(68, 110, 20, 40), 68);
        assert_eq!(evictions(0, 5, 5, 3), 0);
    }
}
