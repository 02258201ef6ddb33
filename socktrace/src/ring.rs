//! What the kernel programs hand to userspace, read by every tracing command: the `EVENTS` ring
//! buffer (registered with tokio for readiness) and the per-CPU `STATS` counters (events lost,
//! read errors, unsent retransmits). `watch` and the [`crate::agent`] both build on these; neither
//! owns them.

use anyhow::Context as _;
use aya::maps::{MapData, PerCpuArray, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::probes::Tracer;

/// Kernel-side counters (summed over CPUs).
pub struct Stats {
    map: PerCpuArray<MapData, u64>,
}

impl Stats {
    pub fn new(tracer: &mut Tracer) -> anyhow::Result<Stats> {
        let map = tracer.ebpf.take_map("STATS").context("STATS map missing")?;
        Ok(Stats { map: PerCpuArray::try_from(map)? })
    }

    pub fn get(&self, index: u32) -> u64 {
        self.map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}

/// The event ring buffer, ready to be awaited.
pub fn ring(tracer: &mut Tracer) -> anyhow::Result<AsyncFd<RingBuf<MapData>>> {
    let map = tracer.ebpf.take_map("EVENTS").context("EVENTS map missing")?;
    let ring = RingBuf::try_from(map)?;
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds it; nothing else closes it.
    Ok(unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?)
}
