//! The long-running agent behind `top` (and every interval-based view): it owns the loaded
//! programs, feeds ring-buffer events into the [`Model`], and closes an interval on demand by
//! bumping the kernel's peak epoch, reading the `LISTENERS` aggregates, the `WAITS` histograms,
//! the `ACCEPTORS` table and a `sock_diag` listing. Accept events are muted in the kernel: nothing
//! here costs more with more connections per second (`diagnose` unmutes them for its timeline).
//!
//! Attaching to a busy system is the normal case: every listener sock_diag reports gets its
//! kernel-side row when the agent starts and whenever a new one appears, so retransmits on
//! connections accepted before tracing began (which never create a row themselves) count from
//! the first instant.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
use socktrace_common::{
    AF_INET, AF_INET6, Control, KernelOffsets, ListenerStats, PastKey, SOCKET_KEY, kind, listener_key, socket_key, stat,
    wait::{AcceptorKey, AcceptorSeen, WaitKey},
};
use tokio::io::unix::AsyncFd;

use crate::{
    batch,
    event::{self, Record},
    filter::Filter,
    foreign::Census,
    model::{DiagSample, ListenerKey, Model},
    pressure::{BoundedMap, Pressure, Walk},
    probes::{Signal, Tracer},
    ring::{Stats, ring},
    system,
};

/// Where LISTEN sockets come from (sock_diag); `None` from it means "unavailable this time".
pub type DiagSource = Box<dyn FnMut() -> Option<DiagSample>>;

pub struct Agent {
    pub tracer: Tracer,
    ring: AsyncFd<RingBuf<MapData>>,
    pub stats: Stats,
    listeners: HashMap<MapData, u64, ListenerStats>,
    /// Read whole at every interval (see [`read_map`]).
    waits: Map,
    acceptors: Map,
    control: Array<MapData, Control>,
    epoch: u32,
    mute: u32,
    pub model: Model,
    pub filter: Filter,
    diag: DiagSource,
    /// Whether the last interval had a sock_diag listing.
    pub diag_ok: bool,
    /// When freed heap was last given back to the OS.
    trimmed: Instant,
    /// Kernel rows the agent could not create for a listener (reported once on stderr).
    pub seed_errors: u64,
    /// CLOCK_MONOTONIC right before the last interval's kernel rows were read: the counts are
    /// as of (about) then, while the interval's sock_diag sample comes after.
    pub kernel_read_ns: u64,
    /// Runs of our programs the kernel skipped (`Tracer::runs_missed`), read when an interval
    /// closes (one fdinfo read per program, shared by every view); `None` where the kernel does
    /// not count them.
    pub runs_missed: Option<u64>,
    /// `LISTENERS` rows this agent created (seeds), for the eviction count.
    seeded: u64,
    /// `LISTENERS` rows this agent deleted (listeners it let go), for the eviction count.
    rows_deleted: u64,
    /// `WAITS` and `ACCEPTORS` rows this agent deleted, for the eviction counts.
    waits_deleted: u64,
    acceptors_deleted: u64,
    /// Evictions from the bounded maps, measured at every interval.
    pub pressure: Pressure,
    /// Other BPF programs loaded or unloaded since the agent started (`foreign`), read when an
    /// interval closes (and whenever a view samples it in between).
    pub census: Census,
    /// How many of those came or went in the last interval.
    pub foreign_in_interval: u64,
}

/// The `PAST` map at one instant, and which of its classes are counted on this kernel.
#[derive(Clone, Debug, Default)]
pub struct PastCounts {
    pub counts: std::collections::BTreeMap<PastKey, u64>,
    pub netfilter: bool,
    pub no_socket: bool,
    pub client_syn_retrans: bool,
}

/// `BPF_NOEXIST` flag of a map update: create only.
const BPF_NOEXIST: u64 = 1;

/// How often a long-running agent gives freed heap back ([`system::release_freed_heap`]).
const TRIM_EVERY: Duration = Duration::from_secs(1);

impl Agent {
    /// Interval views need no per-connection event: counters, wait histograms and acceptors are
    /// aggregated in the kernel, so those events are muted (`listen()` calls still come through).
    pub fn new(mut tracer: Tracer, filter: Filter, diag: DiagSource) -> anyhow::Result<Agent> {
        let stats = Stats::new(&mut tracer)?;
        let ring = ring(&mut tracer)?;
        let listeners = HashMap::try_from(tracer.ebpf.take_map("LISTENERS").context("LISTENERS map missing")?)?;
        let control = Array::try_from(tracer.ebpf.take_map("CONTROL").context("CONTROL map missing")?)?;
        let waits = tracer.ebpf.take_map("WAITS").context("WAITS map missing")?;
        let acceptors = tracer.ebpf.take_map("ACCEPTORS").context("ACCEPTORS map missing")?;
        let mute = [kind::ACCEPT, kind::LISTEN_OVERFLOW, kind::SYN_DROP, kind::RETRANSMIT, kind::SYNACK_RETRANSMIT]
            .iter()
            .fold(0u32, |m, k| m | (1 << k));
        let census = Census::new(tracer.program_ids());
        let mut agent = Agent {
            tracer,
            ring,
            stats,
            listeners,
            waits,
            acceptors,
            control,
            epoch: 1,
            mute,
            model: Model::default(),
            filter,
            diag,
            diag_ok: false,
            trimmed: Instant::now(),
            seed_errors: 0,
            kernel_read_ns: 0,
            runs_missed: None,
            seeded: 0,
            rows_deleted: 0,
            waits_deleted: 0,
            acceptors_deleted: 0,
            pressure: Pressure::default(),
            census,
            foreign_in_interval: 0,
        };
        agent.runs_missed = agent.tracer.runs_missed();
        agent.write_control()?;
        agent.model.derive_accepts = agent.tracer.traced().accept_derived;
        // Listeners that already exist get their kernel rows before anything else happens.
        if let Some(mut sample) = (agent.diag)() {
            agent.filter.select_listeners(&mut sample);
            agent.seed(&sample, &HashSet::new());
            agent.model.starting_queues(&sample);
        }
        Ok(agent)
    }

    /// Lets events of these kinds through to the ring buffer (they are aggregated in the kernel
    /// either way); `diagnose` needs accept and drop times.
    pub fn unmute(&mut self, kinds: &[u32]) -> anyhow::Result<()> {
        for k in kinds {
            self.mute &= !(1 << k);
        }
        self.write_control()
    }

    /// Creates the kernel row of every listener in `sample` (within the filter) that has none
    /// (`present`: keys seen in the map). A row that appeared meanwhile is left as it is.
    fn seed(&mut self, sample: &DiagSample, present: &HashSet<u64>) {
        for d in &sample.listeners {
            if !self.filter.matches_listener(d.netns, d.lport) {
                continue;
            }
            let mut row = ListenerStats::ZERO;
            row.netns = d.netns;
            // A row id of its own (the kernel's are random): the model tells a recreated row by it.
            row.row_id = u32::try_from(self.seeded % u64::from(u32::MAX)).unwrap_or(0) | 0x8000_0000;
            row.lport = d.lport;
            row.family = if d.laddr.is_ipv4() { AF_INET } else { AF_INET6 };
            row.queue_max = d.backlog;
            let port = listener_key(d.netns, d.lport);
            let socket = (d.inode != 0).then(|| socket_key(d.inode));
            for key in [Some(port), socket].into_iter().flatten().filter(|k| !present.contains(k)) {
                self.seed_row(key, &row, d);
            }
        }
    }

    fn seed_row(&mut self, key: u64, row: &ListenerStats, d: &crate::model::DiagListener) {
        // BPF_NOEXIST: never reset a row a kernel program created in the meantime.
        match self.listeners.insert(key, row, BPF_NOEXIST) {
            Ok(()) => {
                self.seeded += 1;
                self.model.seeded(key, row);
            }
            Err(e) => {
                let exists = matches!(&e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EEXIST));
                if !exists {
                    if self.seed_errors == 0 {
                        eprintln!("socktrace: warning: no kernel row for listener netns {} port {} (inode {}): {e}", d.netns, d.lport, d.inode);
                    }
                    self.seed_errors += 1;
                }
            }
        }
    }

    fn write_control(&mut self) -> anyhow::Result<()> {
        // A namespace or port that every match must have (`--netns`/`--port`, or a term the whole
        // expression requires) also filters in the kernel (a coarse pre-filter: the rest of the
        // filter is applied here).
        let control = Control {
            epoch: self.epoch,
            mute: self.mute,
            netns: self.filter.required_netns().unwrap_or(0),
            port: self.filter.any_end_port().map_or(0, u32::from),
            waits: 1,
        };
        self.control.set(0, control, 0).context("writing CONTROL")
    }

    /// Waits for ring-buffer data and feeds it to the model (cancel-safe: use in `select!`).
    pub async fn pump(&mut self) -> anyhow::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        feed(guard.get_inner_mut(), &mut self.filter, &mut self.model)?;
        guard.clear_ready();
        Ok(())
    }

    /// Ends the current interval. Takes in the events still in the ring buffer first (the kernel
    /// wakes the reader at most once per millisecond per CPU, so a few may be waiting).
    pub fn close_interval(&mut self) -> anyhow::Result<()> {
        // What the views built from the last interval (a /metrics text, a TUI frame) is garbage now.
        if self.trimmed.elapsed() >= TRIM_EVERY {
            system::release_freed_heap();
            self.trimmed = Instant::now();
        }
        feed(self.ring.get_mut(), &mut self.filter, &mut self.model)?;
        let ended = self.epoch;
        self.epoch = ended.wrapping_add(1).max(1);
        self.write_control()?;
        let slot = (ended & 1) as usize;
        let mut kernel = Vec::new();
        let mut sockets = Vec::new();
        let mut present = HashSet::new();
        self.kernel_read_ns = system::monotonic_ns();
        self.runs_missed = self.tracer.runs_missed();
        let foreign_before = self.census.changes;
        self.census.sample();
        self.foreign_in_interval = self.census.changes - foreign_before;
        // Inserts before the walk, deletes after it: the eviction count stays a lower bound
        // (pressure.rs).
        let inserts = self.stats.get(stat::LISTENERS_INSERTS);
        for item in self.listeners.iter() {
            let (k, s) = item.context("reading LISTENERS")?;
            present.insert(k);
            let peak = (s.peak_epoch[slot] == ended).then_some(s.peak[slot]);
            if k & SOCKET_KEY == 0 {
                kernel.push((ListenerKey { netns: s.netns, lport: s.lport }, s, peak));
            } else {
                sockets.push((u32::try_from(k & u64::from(u32::MAX)).unwrap_or(0), s, peak));
            }
        }
        // The rows seeded so far count as inserts; those seeded below (after the walk) are neither
        // live nor inserted until the next walk: counting them now would report them evicted.
        let listeners_walk = Walk { inserts: inserts + self.seeded, live: present.len() as u64, deleted: self.rows_deleted };
        // Rows read before and missing now were evicted (the agent forgets the rows it deletes).
        self.model.kernel_rows_present(&present);
        let diag = (self.diag)().map(|mut sample| {
            self.filter.select_listeners(&mut sample);
            sample
        });
        // After the sample: with a `src` term, it tells which ports and sockets match.
        kernel.retain(|(k, _, _)| self.filter.matches_listener(k.netns, k.lport));
        sockets.retain(|(inode, s, _)| self.filter.matches_listener_socket(s.netns, s.lport, *inode));
        self.diag_ok = diag.is_some();
        if let Some(sample) = &diag {
            self.seed(sample, &present);
        }
        let in_view = |f: &Filter, netns: u32, lport: u16, inode: u32| {
            if inode == 0 { f.matches_listener(netns, lport) } else { f.matches_listener_socket(netns, lport, inode) }
        };
        let waits_inserts = self.stats.get(stat::WAITS_INSERTS);
        let all_waits: Vec<(WaitKey, u64)> = read_map(&self.waits, "WAITS")?;
        let waits: Vec<_> = all_waits.iter().filter(|(k, _)| in_view(&self.filter, k.netns, k.lport, k.inode)).copied().collect();
        self.model.take_waits(&waits);
        self.model.close_interval(&kernel, &sockets, diag.as_ref());
        let acceptors_inserts = self.stats.get(stat::ACCEPTORS_INSERTS);
        let all_acceptors: Vec<(AcceptorKey, AcceptorSeen)> = read_map(&self.acceptors, "ACCEPTORS")?;
        let acceptors: Vec<_> = all_acceptors.iter().filter(|(k, _)| in_view(&self.filter, k.netns, k.lport, k.inode)).copied().collect();
        self.model.take_acceptors(&acceptors);
        self.delete_gone_rows(&kernel, &sockets);
        // Wait buckets and acceptors of ports the model no longer has (closed, past their grace
        // period, or outside the filter): deleted, or under listener churn the LRU maps fill with
        // dead sockets' entries that every interval reads again (memory and time grow with them).
        let known = |netns: u32, lport: u16| self.model.listeners.contains_key(&ListenerKey { netns, lport });
        let dead_waits: Vec<WaitKey> = all_waits.iter().filter(|(k, _)| !known(k.netns, k.lport)).map(|(k, _)| *k).collect();
        let dead_acceptors: Vec<AcceptorKey> = all_acceptors.iter().filter(|(k, _)| !known(k.netns, k.lport)).map(|(k, _)| *k).collect();
        self.waits_deleted += delete_keys::<WaitKey, u64>(&mut self.waits, &dead_waits);
        self.acceptors_deleted += delete_keys::<AcceptorKey, AcceptorSeen>(&mut self.acceptors, &dead_acceptors);
        let walked = [
            (BoundedMap::Listeners, listeners_walk),
            (BoundedMap::Waits, Walk { inserts: waits_inserts, live: all_waits.len() as u64, deleted: self.waits_deleted }),
            (BoundedMap::Acceptors, Walk { inserts: acceptors_inserts, live: all_acceptors.len() as u64, deleted: self.acceptors_deleted }),
        ];
        self.pressure.measure(&self.tracer.ebpf, &self.stats, &self.tracer.maps, &walked);
        Ok(())
    }

    /// Deletes the kernel rows of listeners and sockets the model has let go (only rows this
    /// process's filter selects: the others never reach the model). A row the map refuses to
    /// delete keeps its last-read counters, so nothing is counted twice.
    fn delete_gone_rows(&mut self, kernel: &[(ListenerKey, ListenerStats, Option<u32>)], sockets: &[(u32, ListenerStats, Option<u32>)]) {
        let (ports, socks) = self.model.gone_rows(kernel, sockets);
        // Deleted here (counted: the eviction estimate subtracts them), or already evicted (ENOENT).
        let mut deleted = 0;
        let mut gone = |key: u64| match self.listeners.remove(&key) {
            Ok(()) => {
                deleted += 1;
                true
            }
            Err(aya::maps::MapError::SyscallError(e)) => e.io_error.raw_os_error() == Some(libc::ENOENT),
            Err(_) => false,
        };
        let ports: Vec<ListenerKey> = ports.into_iter().filter(|k| gone(listener_key(k.netns, k.lport))).collect();
        let socks: Vec<u32> = socks.into_iter().filter(|ino| gone(socket_key(*ino))).collect();
        self.rows_deleted += deleted;
        self.model.forget_rows(&ports, &socks);
    }

    /// Counts in the kernel's `PAST` map now (segments that never reached a listener and local
    /// clients' SYN retransmits, per netns, port, class and address; monotonic, so callers take
    /// deltas), with which of its classes this kernel can count.
    pub fn past_counts(&self) -> anyhow::Result<PastCounts> {
        let mut counts = std::collections::BTreeMap::new();
        if let Some(map) = self.tracer.ebpf.map("PAST") {
            let map: HashMap<&MapData, PastKey, u64> = HashMap::try_from(map)?;
            for item in map.iter() {
                let (k, v) = item.context("reading PAST")?;
                counts.insert(k, v);
            }
        }
        let drops = self.tracer.has(Signal::PacketDrop);
        let o = &self.tracer.offsets;
        Ok(PastCounts {
            counts,
            netfilter: drops && o.reason_netfilter_drop != KernelOffsets::ABSENT,
            no_socket: drops && o.reason_no_socket_any != KernelOffsets::ABSENT,
            client_syn_retrans: self.tracer.has(Signal::Retransmit),
        })
    }

    /// `; MAP EVICTIONS …` for the views' header lines when a bounded map lost entries or a
    /// listener's kernel row was evicted (empty otherwise).
    pub fn pressure_note(&self) -> String {
        let evicted: Vec<String> = self.pressure.maps.iter().filter(|u| u.evicted > 0).map(|u| format!("{} {}/{} full, {} evicted", u.map, u.entries, u.capacity, u.evicted)).collect();
        if evicted.is_empty() && self.model.rows_lost == 0 {
            return String::new();
        }
        format!(
            "; MAP EVICTIONS ({}; {} listener rows lost): counts may be incomplete, see the --map-* options",
            evicted.join(", "),
            self.model.rows_lost
        )
    }

    pub fn lost(&self) -> u64 {
        self.stats.get(stat::LOST)
    }

    /// `; N PROGRAM RUNS MISSED …` for the views' header lines when the kernel skipped runs of
    /// our programs (empty otherwise, and where the kernel does not count them).
    pub fn missed_note(&self) -> String {
        match self.runs_missed {
            Some(n) if n > 0 => format!("; {n} PROGRAM RUNS MISSED (another BPF program was running on that CPU): counts may be short"),
            _ => String::new(),
        }
    }
}

/// Every entry of a kernel hash map: in batches where the kernel can (5.6+), else entry by entry.
fn read_map<K: aya::Pod, V: aya::Pod>(map: &Map, name: &str) -> anyhow::Result<Vec<(K, V)>> {
    // Checks that K and V have the map's key and value sizes.
    let typed: HashMap<&MapData, K, V> = HashMap::try_from(map).with_context(|| format!("{name} map"))?;
    if let Map::HashMap(data) | Map::LruHashMap(data) = map {
        match batch::lookup_all(data) {
            Ok(entries) => return Ok(entries),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) => {}
            Err(e) => return Err(e).with_context(|| format!("reading {name}")),
        }
    }
    typed.iter().map(|item| item.with_context(|| format!("reading {name}"))).collect()
}

/// Deletes `keys` from a hash map of this process (an entry already gone is no error) and says
/// how many it deleted.
fn delete_keys<K: aya::Pod, V: aya::Pod>(map: &mut Map, keys: &[K]) -> u64 {
    if keys.is_empty() {
        return 0;
    }
    let Ok(mut typed) = HashMap::<&mut MapData, K, V>::try_from(map) else { return 0 };
    keys.iter().filter(|k| typed.remove(k).is_ok()).count() as u64
}

fn feed(rb: &mut RingBuf<MapData>, filter: &mut Filter, model: &mut Model) -> anyhow::Result<()> {
    while let Some(item) = rb.next() {
        let rec = Record::from_event(&event::parse(&item)?);
        // Accept and listen events carry the listening socket's own address, port and inode.
        if filter.matches_listen_event(&rec) {
            model.on_event(&rec);
        }
    }
    Ok(())
}
