//! Runs of kprobe-attached programs that the kprobe layer itself skipped. A kprobe that fires
//! while another kprobe handler runs on the same CPU (a softirq taken inside one: the accept
//! kretprobe runs in process context with interrupts on) is not handled at all: the kernel counts
//! it in the probe's `nmissed`, and the BPF program is never called, so its `recursion_misses`
//! does not see it. Since Linux 6.7 the perf-event link of a kprobe reports that count
//! (`bpf_link_info.perf_event.kprobe.missed`); before, it is invisible.
//!
//! Read with the raw bpf(2) commands aya does not wrap for this union member: the links of the
//! given programs (aya's `loaded_links`), each opened by id and asked for its info.

use std::os::fd::{FromRawFd as _, OwnedFd};

use aya::programs::{links::LinkType, loaded_links};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
/// `enum bpf_perf_event_type`.
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

/// The first 12 bytes of the `bpf_attr` of `BPF_LINK_GET_FD_BY_ID`, zero-padded.
#[repr(C)]
#[derive(Default)]
struct GetFdById {
    link_id: u32,
    next_id: u32,
    open_flags: u32,
    _pad: [u32; 13],
}

/// The `bpf_attr` of `BPF_OBJ_GET_INFO_BY_FD`, zero-padded.
#[repr(C)]
#[derive(Default)]
struct GetInfo {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
    _pad: [u32; 12],
}

/// bpf(2) with `attr`: a zero-padded `bpf_attr` prefix of the command's layout, valid for the call.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
    let size = libc::c_uint::try_from(size_of::<T>()).unwrap_or(0);
    // SAFETY: `attr` is valid for the call and `size` bytes long; the kernel reads and writes it.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr).cast::<libc::c_void>(), size) }
}

/// The kprobe-layer misses of one link, `None` when the kernel does not report them (before 6.7
/// the perf-event member is left empty).
fn link_missed(link_id: u32) -> Option<u64> {
    let mut get = GetFdById { link_id, ..GetFdById::default() };
    let fd = bpf(BPF_LINK_GET_FD_BY_ID, &mut get);
    if fd < 0 {
        return None;
    }
    // SAFETY: a new fd the kernel just returned; owned (closed) here.
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).ok()?) };
    let mut info = PerfKprobeInfo::default();
    let mut attr = GetInfo {
        bpf_fd: u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).ok()?,
        info_len: u32::try_from(size_of::<PerfKprobeInfo>()).ok()?,
        info: std::ptr::from_mut(&mut info) as u64,
        ..GetInfo::default()
    };
    if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) < 0 {
        return None;
    }
    matches!(info.perf_event_type, BPF_PERF_EVENT_KPROBE | BPF_PERF_EVENT_KRETPROBE).then_some(info.missed)
}

/// Runs the kprobe layer skipped, summed over the perf-event links of `prog_ids` that are
/// kprobes. `None` when no such link reports the count (no kprobe attached, or a kernel before
/// 6.7).
pub fn kprobe_missed(prog_ids: &[u32]) -> Option<u64> {
    let mut total = None;
    for info in loaded_links().flatten() {
        if !prog_ids.contains(&info.program_id()) || !matches!(info.link_type(), Ok(LinkType::PerfEvent)) {
            continue;
        }
        if let Some(n) = link_missed(info.id()) {
            total = Some(total.unwrap_or(0) + n);
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
        assert_eq!(std::mem::offset_of!(GetInfo, info), 8);
    }

    #[test]
    fn nothing_to_report_without_kprobe_links() {
        // No program id matches (ids start at 1): no link counted, so unknown rather than 0.
        assert_eq!(kprobe_missed(&[0]), None);
    }
}
