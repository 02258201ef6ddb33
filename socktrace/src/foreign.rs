//! Other BPF programs loaded or unloaded while socktrace traces: another tracer starting or
//! stopping beside it, reported by `diagnose` (JSON), `serve` (a counter), `top` (JSON, per
//! interval) and `watch` (its closing line) as context for what else ran on the machine. It was
//! built on the belief that another tracer attaching made this kernel skip socktrace's runs;
//! that came from a flawed repro and does not hold (docs/BENCHMARKS.md, "What the skip was").
//! The count comes from the kernel's own record of every program load and unload
//! (`bpf_events`), which misses none, however short-lived. Where that stream cannot be opened
//! the views compare the set of loaded program ids between samples
//! (`BPF_PROG_GET_NEXT_ID`), which misses a program loaded and unloaded between two samples.

use std::collections::BTreeSet;

use crate::bpf_events::{BpfEvents, Record};

/// Ids of every loaded BPF program (empty when bpf(2) refuses the walk).
pub fn program_ids() -> BTreeSet<u32> {
    crate::bpf_sys::ids(crate::bpf_sys::BPF_PROG_GET_NEXT_ID)
}

/// Counts the other programs that came or went between samples.
pub struct Census {
    own: BTreeSet<u32>,
    pid: u32,
    source: Source,
    /// Programs not ours that were loaded or unloaded since the census started.
    pub changes: u64,
}

enum Source {
    /// Every load and unload, from the kernel.
    Events(BpfEvents),
    /// The loaded ids at the last sample.
    Ids(BTreeSet<u32>),
}

impl Census {
    /// Starts now; `own`: this tracer's program ids (programs this process loads later are
    /// its own too).
    pub fn new(own: BTreeSet<u32>) -> Census {
        let source = match BpfEvents::open() {
            Ok(events) => Source::Events(events),
            Err(e) => {
                eprintln!("socktrace: {e}; other BPF programs are counted from samples of the loaded ids, which miss one that comes and goes between two");
                Source::Ids(program_ids())
            }
        };
        Census { own, pid: std::process::id(), source, changes: 0 }
    }

    /// Whether every load and unload is seen (false: only those that outlive a sample).
    pub fn exact(&self) -> bool {
        matches!(self.source, Source::Events(_))
    }

    /// Takes a sample: adds the programs loaded or unloaded since the last one (ours excepted).
    pub fn sample(&mut self) {
        match &mut self.source {
            Source::Events(events) => self.changes += count(&events.drain(), self.pid, &mut self.own),
            Source::Ids(last) => {
                let now = program_ids();
                self.changes += changed(last, &now, &self.own);
                *last = now;
            }
        }
    }
}

/// Loads and unloads in `records` not by process `pid` nor of its programs `own` (which its
/// loads join); a record loss counts as that many changes.
fn count(records: &[Record], pid: u32, own: &mut BTreeSet<u32>) -> u64 {
    // Loads first: the CPUs' rings are read one after the other, so a program's unload can be
    // read before its load.
    for r in records {
        if let Record::Prog { load: true, id, pid: p } = *r
            && p == pid
        {
            own.insert(id);
        }
    }
    records
        .iter()
        .map(|r| match *r {
            Record::Prog { id, .. } => u64::from(!own.contains(&id)),
            Record::Lost(n) => n,
        })
        .sum()
}

/// Ids in one set and not the other, ours excepted.
fn changed(before: &BTreeSet<u32>, after: &BTreeSet<u32>, own: &BTreeSet<u32>) -> u64 {
    before.symmetric_difference(after).filter(|id| !own.contains(id)).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u32]) -> BTreeSet<u32> {
        v.iter().copied().collect()
    }

    #[test]
    fn counts_what_came_and_went_but_not_ours() {
        assert_eq!(changed(&set(&[1, 2, 3]), &set(&[1, 2, 3]), &set(&[])), 0);
        // 3 unloaded, 7 and 8 loaded; 8 is ours.
        assert_eq!(changed(&set(&[1, 2, 3]), &set(&[1, 2, 7, 8]), &set(&[8])), 2);
    }

    #[test]
    fn counts_every_load_and_unload_of_others() {
        let prog = |load, id, pid| Record::Prog { load, id, pid };
        let mut own = set(&[5]);
        // Another process's program 9 came and went (2); ours (5) went; we loaded 10 and its
        // unload was read first; 3 records were lost.
        let records = [prog(true, 9, 200), prog(false, 5, 100), prog(false, 10, 100), prog(true, 10, 100), prog(false, 9, 0), Record::Lost(3)];
        assert_eq!(count(&records, 100, &mut own), 2 + 3);
        assert_eq!(own, set(&[5, 10]));
        assert_eq!(count(&[], 100, &mut own), 0);
    }
}
