//! Other BPF programs loaded or unloaded while socktrace traces. On this project's reference
//! kernel (6.18) another process attaching and detaching programs on the tracepoints socktrace
//! uses (a second `socktrace probes` or `serve` starting and stopping) made socktrace's own
//! tracepoint programs miss runs for a moment, with no recursion miss counted: 3 of 12 diagnose
//! windows lost 17–74 netfilter drops or SYN retransmits that way, none of about 100 windows
//! without that churn (docs/BENCHMARKS.md, "Runs lost while other tracers attach"). The kernel
//! reports no such loss, so `diagnose` (every 200 ms sample) and `serve` (every second and at
//! each scrape) watch for its cause instead: the set of loaded program ids
//! (`BPF_PROG_GET_NEXT_ID`, one syscall per program, no fd opened). A program loaded and
//! unloaded between two samples is not seen.

use std::collections::BTreeSet;

/// Ids of every loaded BPF program (empty when bpf(2) refuses the walk).
pub fn program_ids() -> BTreeSet<u32> {
    crate::bpf_sys::ids(crate::bpf_sys::BPF_PROG_GET_NEXT_ID)
}

/// Counts the other programs that came or went between samples.
#[derive(Debug, Default)]
pub struct Census {
    own: BTreeSet<u32>,
    last: BTreeSet<u32>,
    /// Programs not ours that were loaded or unloaded since the first sample.
    pub changes: u64,
}

impl Census {
    /// Starts from the programs loaded now; `own`: this tracer's program ids.
    pub fn new(own: BTreeSet<u32>) -> Census {
        Census { own, last: program_ids(), changes: 0 }
    }

    /// Takes a sample: adds the programs loaded or unloaded since the last one (ours excepted).
    pub fn sample(&mut self) {
        let now = program_ids();
        self.changes += changed(&self.last, &now, &self.own);
        self.last = now;
    }
}

/// Ids in one set and not the other, ours excepted.
fn changed(before: &BTreeSet<u32>, after: &BTreeSet<u32>, own: &BTreeSet<u32>) -> u64 {
    before.symmetric_difference(after).filter(|id| !own.contains(id)).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_came_and_went_but_not_ours() {
        let set = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
        assert_eq!(changed(&set(&[1, 2, 3]), &set(&[1, 2, 3]), &set(&[])), 0);
        // 3 unloaded, 7 and 8 loaded; 8 is ours.
        assert_eq!(changed(&set(&[1, 2, 3]), &set(&[1, 2, 7, 8]), &set(&[8])), 2);
    }
}
