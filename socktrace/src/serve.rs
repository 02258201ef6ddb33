//! `socktrace serve`: the agent as a Prometheus exporter for fleets. `/metrics` (Prometheus text
//! format) and `/healthz` over HTTP/1, loopback by default.
//!
//! Each scrape closes an interval of the [`Model`](crate::model::Model): counters are the
//! kernel's per-listener aggregates (monotonic across scrapes and listener churn, exact — no
//! sampling), `socktrace_accept_queue_peak` is the high-water mark since the previous scrape.
//! Cardinality: one series set per listening port and netns, capped by `--max-listeners`
//! (default 1000); listeners that vanish are dropped after the model's grace period (30 scrapes).
//! A port with several LISTEN sockets (SO_REUSEPORT) also gets `socktrace_socket_*` series per
//! socket, labelled `socket` = its index within the port (0, 1, …; stable while the socket lives,
//! a freed index is reused by the next new socket), at most [`MAX_SOCKETS_PER_PORT`] per port; once
//! a port had several, its socket series stay while it lives (a survivor's counter goes on).
//! The port's queue gauges are those of its fullest socket, never a sum.
//! The HTTP side is hardened against slow or malformed clients: header read timeout, request size
//! limit, a cap on concurrent connections and on each connection's lifetime.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    signal::unix::SignalKind,
    sync::{Semaphore, mpsc, oneshot},
};

use socktrace_common::stat;

use crate::{
    agent::Agent,
    model::ListenerKey,
    probes::{Signal, Traced},
};

pub struct ServeOptions {
    pub listen: SocketAddr,
    pub max_listeners: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    netns: String,
    laddr: String,
    lport: String,
    comm: String,
}

/// One LISTEN socket of a port with several.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SocketLabels {
    netns: String,
    laddr: String,
    lport: String,
    socket: String,
}

/// Sockets of one port exported at most (more are counted in `sockets_not_exported`).
pub const MAX_SOCKETS_PER_PORT: usize = 64;

/// One bounded kernel map.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    signal: String,
    hook: String,
}

fn wait_histogram() -> Histogram {
    // 100 µs … ~105 s, ×4 per bucket.
    Histogram::new(exponential_buckets(0.000_1, 4.0, 11))
}

struct Metrics {
    registry: Registry,
    queue_len: Family<Labels, Gauge>,
    queue_max: Family<Labels, Gauge>,
    queue_peak: Family<Labels, Gauge>,
    wait: Family<Labels, Histogram, fn() -> Histogram>,
    accepts: Family<Labels, Counter>,
    overflows: Family<Labels, Counter>,
    syn_drops: Family<Labels, Counter>,
    synack: Family<Labels, Counter>,
    retrans: Family<Labels, Counter>,
    lost: Counter,
    lost_seen: u64,
    /// Program runs the kernel skipped (`None`: it does not count them: no series).
    missed: Option<Counter>,
    missed_seen: u64,
    skipped: Gauge,
    exported: BTreeMap<ListenerKey, Labels>,
    sock_queue_len: Family<SocketLabels, Gauge>,
    sock_queue_max: Family<SocketLabels, Gauge>,
    sock_queue_peak: Family<SocketLabels, Gauge>,
    sock_accepts: Family<SocketLabels, Counter>,
    sock_overflows: Family<SocketLabels, Counter>,
    sock_syn_drops: Family<SocketLabels, Counter>,
    sockets_skipped: Gauge,
    /// Per port: socket inode → its `socket` label index. A port is in it from the first scrape
    /// that saw it with several sockets (then its socket series stay, even while one is left, so
    /// a surviving socket's counter never restarts), until the port goes.
    socket_index: BTreeMap<ListenerKey, BTreeMap<u32, u32>>,
    exported_sockets: HashSet<SocketLabels>,
    /// Counters of a signal with no hook are not exported (absent, not 0).
    traced: Traced,
    /// Per listener: times its kernel row was evicted (only for listeners that had one).
    row_evictions: Family<Labels, Counter>,
    map_capacity: Family<MapLabels, Gauge>,
    map_entries: Family<MapLabels, Gauge>,
    map_evictions: Family<MapLabels, Counter>,
    rows_lost: Counter,
    /// Accepts whose queue wait is unknown (kernel count); absent without the `accept_wait` signal.
    wait_unknown: Option<Counter>,
    /// SYN-drop checks settled late (the counted cgroup_skb hook only).
    syn_late: Option<Counter>,
    /// Kernel reads that failed in a program: its event and counts were skipped.
    read_errors: Counter,
    /// Other BPF programs seen loaded or unloaded (`foreign`): counts may be short meanwhile.
    foreign: Counter,
}

impl Metrics {
    fn new(agent: &Agent) -> Metrics {
        let mut registry = Registry::with_prefix("socktrace");
        let m = Metrics {
            registry: Registry::default(),
            queue_len: Family::default(),
            queue_max: Family::default(),
            queue_peak: Family::default(),
            wait: Family::new_with_constructor(wait_histogram as fn() -> Histogram),
            accepts: Family::default(),
            overflows: Family::default(),
            syn_drops: Family::default(),
            synack: Family::default(),
            retrans: Family::default(),
            lost: Counter::default(),
            lost_seen: 0,
            missed: agent.runs_missed.map(|_| Counter::default()),
            missed_seen: 0,
            skipped: Gauge::default(),
            exported: BTreeMap::new(),
            sock_queue_len: Family::default(),
            sock_queue_max: Family::default(),
            sock_queue_peak: Family::default(),
            sock_accepts: Family::default(),
            sock_overflows: Family::default(),
            sock_syn_drops: Family::default(),
            sockets_skipped: Gauge::default(),
            socket_index: BTreeMap::new(),
            exported_sockets: HashSet::new(),
            traced: agent.tracer.traced(),
            row_evictions: Family::default(),
            map_capacity: Family::default(),
            map_entries: Family::default(),
            map_evictions: Family::default(),
            rows_lost: Counter::default(),
            wait_unknown: (agent.tracer.has(Signal::Accept) && agent.tracer.has(Signal::Enqueue)).then(Counter::default),
            syn_late: agent.tracer.syn_drops_settled().then(Counter::default),
            read_errors: Counter::default(),
            foreign: Counter::default(),
        };
        registry.register("accept_queue_length", "Connections in the accept queue now (sock_diag; the port's fullest socket)", m.queue_len.clone());
        registry.register("accept_queue_max", "Accept queue limit (listen backlog) of the port's fullest socket", m.queue_max.clone());
        registry.register("accept_queue_peak", "Accept queue high-water mark since the previous scrape (eBPF; highest of the port's sockets)", m.queue_peak.clone());
        registry.register("socket_accept_queue_length", "Per LISTEN socket of a port with several (SO_REUSEPORT): connections in its accept queue now", m.sock_queue_len.clone());
        registry.register("socket_accept_queue_max", "Per LISTEN socket of a port with several: its backlog", m.sock_queue_max.clone());
        registry.register("socket_accept_queue_peak", "Per LISTEN socket of a port with several: high-water mark since the previous scrape", m.sock_queue_peak.clone());
        registry.register("socket_accepts", "Per LISTEN socket of a port with several: connections accepted from it", m.sock_accepts.clone());
        registry.register("socket_listen_overflows", "Per LISTEN socket of a port with several: connections dropped because its queue was full", m.sock_overflows.clone());
        registry.register("socket_syn_drops", "Per LISTEN socket of a port with several: SYNs dropped because its queue was full", m.sock_syn_drops.clone());
        registry.register("sockets_not_exported", "LISTEN sockets beyond the per-port limit, not exported per socket", m.sockets_skipped.clone());
        registry.register("accept_wait_seconds", "Time connections waited in the accept queue", m.wait.clone());
        registry.register("accepts", "Connections accepted", m.accepts.clone());
        registry.register(
            "listen_overflows",
            "Connections dropped because the accept queue was full (3rd ACK and SYN), as TcpExtListenOverflows counts them",
            m.overflows.clone(),
        );
        registry.register("syn_drops", "SYNs dropped because the accept queue was full (part of listen_overflows)", m.syn_drops.clone());
        registry.register("synack_retransmits", "SYN-ACKs retransmitted by the listener", m.synack.clone());
        registry.register("retransmits", "Segments retransmitted on the listener's connections (its local port)", m.retrans.clone());
        registry.register("events_lost", "Events lost because the ring buffer was full", m.lost.clone());
        if let Some(c) = &m.missed {
            registry.register(
                "program_runs_missed",
                "Runs of socktrace's eBPF programs the kernel skipped because another BPF program was running on that CPU: their events and counts are missing",
                c.clone(),
            );
        }
        registry.register("listeners_not_exported", "Listeners beyond --max-listeners, not exported", m.skipped.clone());
        registry.register("map_capacity", "Entries a bounded kernel map holds at most (--map-* options)", m.map_capacity.clone());
        registry.register("map_entries", "Entries in a bounded kernel map at the last scrape", m.map_entries.clone());
        registry.register(
            "map_evictions",
            "Entries a bounded kernel map lost to LRU eviction (inserts - deletes - entries; a lower bound): counts may be incomplete",
            m.map_evictions.clone(),
        );
        registry.register("listener_rows_lost", "Per-listener kernel rows evicted after the agent read or created them (their counts since the read before are lost)", m.rows_lost.clone());
        registry.register(
            "kernel_row_evictions",
            "Times this listener's kernel row was evicted: its counters may be short by what it counted between the scrape before and the eviction",
            m.row_evictions.clone(),
        );
        if let Some(c) = &m.wait_unknown {
            registry.register("accepts_wait_unknown", "Accepts whose queue wait is unknown: queued before tracing started, or the ENQUEUED entry was evicted", c.clone());
        }
        registry.register(
            "other_bpf_programs_changed",
            "Other BPF programs loaded or unloaded while serve ran: another tracer starting or stopping (every one the kernel reports; where it cannot report them, those seen in samples of the loaded ids every second)",
            m.foreign.clone(),
        );
        registry.register(
            "kernel_read_errors",
            "Kernel reads in socktrace's eBPF programs that failed (a pointer chain broke): that event and its counts were skipped",
            m.read_errors.clone(),
        );
        if let Some(c) = &m.syn_late {
            registry.register(
                "syn_drop_checks_late",
                "SYNs near a full queue whose free was not seen, checked at the next SYN on that CPU instead: a drop among them is counted only when the kernel's ListenOverflows grew by more than the 3rd-ACK overflows seen on that CPU meanwhile",
                c.clone(),
            );
        }
        let probes: Family<ProbeLabels, Gauge> = Family::default();
        for r in &agent.tracer.report {
            probes
                .get_or_create(&ProbeLabels { signal: r.signal.into(), hook: r.hook.unwrap_or("unavailable").into() })
                .set(i64::from(r.hook.is_some()));
        }
        registry.register("probe_info", "Kernel hook in use per signal (1), or unavailable (0)", probes);
        Metrics { registry, ..m }
    }

    fn families(&self) -> [&Family<Labels, Counter>; 5] {
        [&self.accepts, &self.overflows, &self.syn_drops, &self.synack, &self.retrans]
    }

    /// Per family of [`Self::families`]: whether its signals are traced (`listen_overflows` needs
    /// both drop signals).
    fn traced_families(&self) -> [bool; 5] {
        let t = self.traced;
        [t.accept, t.listen_overflow && t.syn_drop, t.syn_drop, t.synack_retransmit, t.retransmit]
    }

    fn exported_families(&self) -> impl Iterator<Item = &Family<Labels, Counter>> {
        self.families().into_iter().zip(self.traced_families()).filter_map(|(f, on)| on.then_some(f))
    }

    fn remove(&self, labels: &Labels) {
        for g in [&self.queue_len, &self.queue_max, &self.queue_peak] {
            g.remove(labels);
        }
        for c in self.families() {
            c.remove(labels);
        }
        self.row_evictions.remove(labels);
        self.wait.remove(labels);
    }

    /// Closes an interval and brings every series up to date.
    fn update(&mut self, agent: &mut Agent, max_listeners: usize) -> anyhow::Result<()> {
        agent.close_interval()?;
        raise(&self.foreign, agent.census.changes);
        let lost = agent.lost();
        self.lost.inc_by(lost.saturating_sub(self.lost_seen));
        self.lost_seen = lost;
        if let (Some(c), Some(n)) = (&self.missed, agent.runs_missed) {
            c.inc_by(n.saturating_sub(self.missed_seen));
            self.missed_seen = self.missed_seen.max(n);
        }
        for u in &agent.pressure.maps {
            let labels = MapLabels { map: u.map.into() };
            self.map_capacity.get_or_create(&labels).set(i64::from(u.capacity));
            self.map_entries.get_or_create(&labels).set(i64::try_from(u.entries).unwrap_or(i64::MAX));
            raise(&self.map_evictions.get_or_create(&labels), u.evicted);
        }
        raise(&self.rows_lost, agent.model.rows_lost);
        if let Some(c) = &self.wait_unknown {
            raise(c, agent.stats.get(stat::ACCEPT_NO_WAIT));
        }
        if let Some(c) = &self.syn_late {
            raise(c, agent.stats.get(stat::SYN_SETTLED_LATE));
        }
        raise(&self.read_errors, agent.stats.get(stat::READ_ERRORS));
        let mut current = BTreeMap::new();
        let mut current_sockets = HashSet::new();
        let mut skipped = 0i64;
        let mut sockets_skipped = 0i64;
        for (key, l) in &agent.model.listeners {
            if current.len() >= max_listeners {
                skipped += 1;
                continue;
            }
            let comm = l.owners.first().map(|o| o.1.clone()).or_else(|| l.last_acceptor.as_ref().map(|a| a.comm.clone()));
            let labels = Labels {
                netns: key.netns.to_string(),
                laddr: match l.laddrs.len() {
                    0 => "*".into(),
                    1 => l.laddrs.iter().next().map(ToString::to_string).unwrap_or_default(),
                    _ => l.laddrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                },
                lport: key.lport.to_string(),
                comm: comm.unwrap_or_else(|| "unknown".into()),
            };
            if let Some(old) = self.exported.get(key).filter(|old| **old != labels) {
                // Same listener, new owner or address: carry the counters over to the new series.
                for c in self.exported_families() {
                    let v = c.get_or_create(old).get();
                    c.get_or_create(&labels).inc_by(v);
                }
                self.remove(old);
            }
            let set = |g: &Family<Labels, Gauge>, v: Option<u32>| match v {
                Some(v) => {
                    g.get_or_create(&labels).set(i64::from(v));
                }
                None => {
                    // Unavailable is not zero: no sample this time.
                    g.remove(&labels);
                }
            };
            set(&self.queue_len, l.queue_len);
            set(&self.queue_max, l.backlog);
            set(&self.queue_peak, l.queue_peak);
            let i = &l.interval;
            let by = [i.accepts, i.overflows + i.syn_drops, i.syn_drops, i.synack_retransmits, i.retransmits];
            for ((c, n), on) in self.families().into_iter().zip(by).zip(self.traced_families()) {
                if on {
                    c.get_or_create(&labels).inc_by(n);
                }
            }
            // No accept hook (`--accept-hooks off`): the histogram is absent, not empty.
            if self.traced.accept_wait {
                let h = self.wait.get_or_create(&labels);
                for v in l.waits.iter().flat_map(|w| w.iter_recorded()) {
                    let secs = v.value_iterated_to() as f64 / 1e9;
                    for _ in 0..v.count_at_value() {
                        h.observe(secs);
                    }
                }
            }
            if l.kernel_resets > 0 {
                raise(&self.row_evictions.get_or_create(&labels), l.kernel_resets);
            }
            current.insert(*key, labels);
            sockets_skipped += self.update_sockets(*key, l, &mut current_sockets);
        }
        for (key, labels) in &self.exported {
            if !current.contains_key(key) {
                self.remove(labels);
            }
        }
        self.socket_index.retain(|k, _| current.contains_key(k));
        for labels in self.exported_sockets.difference(&current_sockets) {
            for g in [&self.sock_queue_len, &self.sock_queue_max, &self.sock_queue_peak] {
                g.remove(labels);
            }
            for c in [&self.sock_accepts, &self.sock_overflows, &self.sock_syn_drops] {
                c.remove(labels);
            }
        }
        self.exported_sockets = current_sockets;
        self.exported = current;
        self.skipped.set(skipped);
        self.sockets_skipped.set(sockets_skipped);
        Ok(())
    }

    /// The `socktrace_socket_*` series of one port with several LISTEN sockets; returns how many
    /// sockets were over the limit.
    fn update_sockets(&mut self, key: ListenerKey, l: &crate::model::Listener, exported: &mut HashSet<SocketLabels>) -> i64 {
        if l.sockets.len() < 2 && !self.socket_index.contains_key(&key) {
            return 0;
        }
        let [accepts, overflows, syn_drops, ..] = self.traced_families();
        let index = self.socket_index.entry(key).or_default();
        index.retain(|ino, _| l.sockets.contains_key(ino));
        for ino in l.sockets.keys() {
            if !index.contains_key(ino) {
                let used: BTreeSet<u32> = index.values().copied().collect();
                let free = (0..).find(|i| !used.contains(i)).unwrap_or(0);
                index.insert(*ino, free);
            }
        }
        let mut over = 0;
        for (ino, s) in &l.sockets {
            let i = index.get(ino).copied().unwrap_or(0);
            if i as usize >= MAX_SOCKETS_PER_PORT {
                over += 1;
                continue;
            }
            let labels = SocketLabels {
                netns: key.netns.to_string(),
                laddr: s.laddr.map_or_else(|| "*".into(), |a| a.to_string()),
                lport: key.lport.to_string(),
                socket: i.to_string(),
            };
            for (g, v) in [(&self.sock_queue_len, s.queue_len), (&self.sock_queue_max, s.backlog), (&self.sock_queue_peak, s.queue_peak)] {
                match v {
                    Some(v) => {
                        g.get_or_create(&labels).set(i64::from(v));
                    }
                    None => {
                        g.remove(&labels);
                    }
                }
            }
            let i = &s.interval;
            for ((c, n), on) in [&self.sock_accepts, &self.sock_overflows, &self.sock_syn_drops].into_iter().zip([i.accepts, i.overflows + i.syn_drops, i.syn_drops]).zip([accepts, overflows, syn_drops]) {
                if on {
                    c.get_or_create(&labels).inc_by(n);
                }
            }
            exported.insert(labels);
        }
        over
    }

    fn encode(&self) -> anyhow::Result<String> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).context("encoding metrics")?;
        Ok(out)
    }
}

/// Brings a counter up to `total` (a monotonic count kept elsewhere).
fn raise(c: &Counter, total: u64) {
    c.inc_by(total.saturating_sub(c.get()));
}

/// A scrape asked of the agent: the reply is the metrics text, or the error as text.
pub type Scrape = oneshot::Sender<Result<String, String>>;

/// Concurrent HTTP connections; further ones are closed at once.
const MAX_CONNECTIONS: usize = 256;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

pub async fn run(mut agent: Agent, opts: ServeOptions) -> anyhow::Result<()> {
    let listener = TcpListener::bind(opts.listen).await.with_context(|| format!("cannot listen on {}", opts.listen))?;
    let (tx, mut rx) = mpsc::channel::<Scrape>(64);
    let served = Arc::new(AtomicU64::new(0));
    tokio::spawn(http(listener, tx, Arc::clone(&served)));
    let mut metrics = Metrics::new(&agent);
    eprintln!("{}", agent.tracer.summary());
    eprintln!("socktrace: serving http://{}/metrics", opts.listen);
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    // Other BPF programs coming and going (see `foreign`): read every second and at each scrape.
    let mut census_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = agent.pump() => r?,
            _ = census_tick.tick() => agent.census.sample(),
            Some(reply) = rx.recv() => {
                let body = metrics.update(&mut agent, opts.max_listeners).and_then(|()| metrics.encode());
                let _ = reply.send(body.map_err(|e| format!("{e:#}")));
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    eprintln!("socktrace: served {} scrapes", served.load(Ordering::Relaxed));
    Ok(())
}

async fn http(listener: TcpListener, tx: mpsc::Sender<Scrape>, served: Arc<AtomicU64>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let tx = tx.clone();
        let served = Arc::clone(&served);
        tokio::spawn(async move {
            connection(stream, tx, served).await;
            drop(permit);
        });
    }
}

/// Serves one HTTP/1 connection over any byte stream (a TCP connection here, an in-memory stream
/// in the fuzz target `http`): requests are routed by [`handle`], scrapes are sent to `tx`, with
/// the header read timeout, the buffer limit and the connection lifetime of every connection.
pub async fn connection(stream: impl AsyncRead + AsyncWrite + Unpin, tx: mpsc::Sender<Scrape>, served: Arc<AtomicU64>) {
    let svc = service_fn(move |req| handle(req, tx.clone(), Arc::clone(&served)));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), svc);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(req: Request<Incoming>, tx: mpsc::Sender<Scrape>, served: Arc<AtomicU64>) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = "text/plain; charset=utf-8";
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let (otx, orx) = oneshot::channel();
            if tx.send(otx).await.is_err() {
                return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, text, "agent stopped\n".into()));
            }
            match orx.await {
                Ok(Ok(body)) => {
                    served.fetch_add(1, Ordering::Relaxed);
                    reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body)
                }
                Ok(Err(e)) => reply(StatusCode::INTERNAL_SERVER_ERROR, text, format!("{e}\n")),
                Err(_) => reply(StatusCode::SERVICE_UNAVAILABLE, text, "agent stopped\n".into()),
            }
        }
        (&Method::GET, "/healthz") => reply(StatusCode::OK, text, "ok\n".into()),
        (_, "/metrics" | "/healthz") => reply(StatusCode::METHOD_NOT_ALLOWED, text, "only GET\n".into()),
        _ => reply(StatusCode::NOT_FOUND, text, "not found: try /metrics or /healthz\n".into()),
    })
}
