//! Runs of kprobe-attached programs that the kprobe layer itself skipped. A kprobe that fires
//! while another kprobe handler runs on the same CPU (a softirq taken inside one: the accept
//! kretprobe runs in process context with interrupts on) is not handled at all: the kernel counts
//! it in the probe's `nmissed`, and the BPF program is never called, so its `recursion_misses`
//! does not see it. Since Linux 6.7 the perf-event link of a kprobe reports that count
//! (`bpf_link_info.perf_event.kprobe.missed`); before, it is invisible.
//!
//! Read with raw bpf(2) (`bpf_sys`): aya's link info hides the per-type union.

use crate::bpf_sys::{self, BPF_LINK_GET_NEXT_ID};

/// `enum bpf_link_type` and `enum bpf_perf_event_type`.
const BPF_LINK_TYPE_PERF_EVENT: u32 = 7;
const BPF_PERF_EVENT_KPROBE: u32 = 3;
const BPF_PERF_EVENT_KRETPROBE: u32 = 4;

/// `struct bpf_link_info` up to the perf-event kprobe member (uapi layout, stable): `type`, `id`,
/// `prog_id`, then the union at offset 16: `perf_event.type`, a pad, then `kprobe` (`func_name`,
/// `name_len`, `offset`, `addr`, `missed`, `cookie`). Room to spare for kernels that copy more.
#[repr(C)]
#[derive(Default)]
struct PerfKprobeInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    perf_event_type: u32,
    _pad2: u32,
    func_name: u64,
    name_len: u32,
    offset: u32,
    addr: u64,
    missed: u64,
    cookie: u64,
    _rest: [u64; 8],
}

/// Runs the kprobe layer skipped, summed over the perf-event links of `prog_ids` that are
/// kprobes. `None` when no such link reports the count (no kprobe attached, or a kernel before
/// 6.7).
pub fn kprobe_missed(prog_ids: &[u32]) -> Option<u64> {
    let mut total = None;
    for id in bpf_sys::ids(BPF_LINK_GET_NEXT_ID) {
        let mut info = PerfKprobeInfo::default();
        // Before 6.7 the perf-event member stays empty (type 0): not reported.
        if bpf_sys::link_info(id, &mut info)
            && info.link_type == BPF_LINK_TYPE_PERF_EVENT
            && prog_ids.contains(&info.prog_id)
            && matches!(info.perf_event_type, BPF_PERF_EVENT_KPROBE | BPF_PERF_EVENT_KRETPROBE)
        {
            total = Some(total.unwrap_or(0) + info.missed);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_uapi() {
        assert_eq!(std::mem::offset_of!(PerfKprobeInfo, perf_event_type), 16);
        assert_eq!(std::mem::offset_of!(PerfKprobeInfo, func_name), 24);
        assert_eq!(std::mem::offset_of!(PerfKprobeInfo, addr), 40);
        assert_eq!(std::mem::offset_of!(PerfKprobeInfo, missed), 48);
    }

    #[test]
    fn nothing_to_report_without_kprobe_links() {
        // No program id matches (ids start at 1): no link counted, so unknown rather than 0.
        assert_eq!(kprobe_missed(&[0]), None);
    }
}
