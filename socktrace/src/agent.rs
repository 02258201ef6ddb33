//! The long-running agent behind `top` (and every interval-based view): it owns the loaded
//! programs, feeds ring-buffer events into the [`Model`], and closes an interval on demand by
//! bumping the kernel's peak epoch, reading the `LISTENERS` aggregates and a sock_diag listing.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, MapData, RingBuf};
use socktrace_common::{Control, ListenerStats, kind, stat};
use tokio::io::unix::AsyncFd;

use crate::{
    event::{self, Record},
    filter::Filter,
    model::{DiagSample, ListenerKey, Model},
    probes::Tracer,
    system,
    watch::{Stats, ring},
};

/// Where LISTEN sockets come from (sock_diag); `None` from it means "unavailable this time".
pub type DiagSource = Box<dyn FnMut() -> Option<DiagSample>>;

pub struct Agent {
    pub tracer: Tracer,
    ring: AsyncFd<RingBuf<MapData>>,
    pub stats: Stats,
    listeners: HashMap<MapData, u64, ListenerStats>,
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
}

/// How often a long-running agent gives freed heap back ([`system::release_freed_heap`]).
const TRIM_EVERY: Duration = Duration::from_secs(1);

impl Agent {
    /// Interval views only need accept events (wait histograms, who accepted); everything else is
    /// aggregated in the kernel, so those events are muted.
    pub fn new(mut tracer: Tracer, filter: Filter, diag: DiagSource) -> anyhow::Result<Agent> {
        let stats = Stats::new(&mut tracer)?;
        let ring = ring(&mut tracer)?;
        let listeners = HashMap::try_from(tracer.ebpf.take_map("LISTENERS").context("LISTENERS map missing")?)?;
        let control = Array::try_from(tracer.ebpf.take_map("CONTROL").context("CONTROL map missing")?)?;
        let mute = [kind::LISTEN_OVERFLOW, kind::SYN_DROP, kind::RETRANSMIT, kind::SYNACK_RETRANSMIT]
            .iter()
            .fold(0u32, |m, k| m | (1 << k));
        let mut agent = Agent {
            tracer,
            ring,
            stats,
            listeners,
            control,
            epoch: 1,
            mute,
            model: Model::default(),
            filter,
            diag,
            diag_ok: false,
            trimmed: Instant::now(),
        };
        agent.write_control()?;
        Ok(agent)
    }

    fn write_control(&mut self) -> anyhow::Result<()> {
        self.control.set(0, Control { epoch: self.epoch, mute: self.mute }, 0).context("writing CONTROL")
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
        for item in self.listeners.iter() {
            let (_, s) = item.context("reading LISTENERS")?;
            let peak = (s.peak_epoch[slot] == ended).then_some(s.peak[slot]);
            kernel.push((ListenerKey { netns: s.netns, lport: s.lport }, s, peak));
        }
        let diag = (self.diag)().map(|mut sample| {
            self.filter.select_listeners(&mut sample);
            sample
        });
        kernel.retain(|(k, _, _)| self.filter.matches_listener(k.netns, k.lport));
        self.diag_ok = diag.is_some();
        self.model.close_interval(&kernel, diag.as_ref());
        Ok(())
    }

    pub fn lost(&self) -> u64 {
        self.stats.get(stat::LOST)
    }
}

fn feed(rb: &mut RingBuf<MapData>, filter: &mut Filter, model: &mut Model) -> anyhow::Result<()> {
    while let Some(item) = rb.next() {
        let rec = Record::from_event(&event::parse(&item)?);
        // Accept and listen events carry the listener's own address and port.
        if filter.matches_listen_socket(rec.netns, rec.laddr, rec.lport) {
            model.on_event(&rec);
        }
    }
    Ok(())
}
