//! The kernel's own stream of BPF program loads and unloads: one perf side-band event per CPU
//! (a software dummy event with `bpf_event` set, Linux 5.1+), into whose ring the kernel writes a
//! `PERF_RECORD_BPF_EVENT` for every program loaded or unloaded on that CPU — what `perf record`
//! uses to follow BPF programs. Unlike a walk of the loaded program ids, it sees a program that
//! came and went between two reads. `foreign` counts other tracers' programs with it.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
};

use memmap2::{MmapOptions, MmapRaw};
use perf_event_open_sys::bindings as sys;
use thiserror::Error;

/// Data pages of each CPU's ring (a power of two): 32 KiB hold about 1000 records between reads.
const DATA_PAGES: usize = 8;

#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot list the online CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("perf_event_open (bpf_event) on CPU {cpu}: {source}")]
    Open { cpu: u32, source: std::io::Error },
    #[error("cannot map the perf ring of CPU {cpu}: {source}")]
    Map { cpu: u32, source: std::io::Error },
}

/// What one record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Program `id` loaded (`load`) or unloaded by process `pid`.
    Prog { load: bool, id: u32, pid: u32 },
    /// The kernel dropped this many records (the ring was full).
    Lost(u64),
}

/// Every online CPU's ring.
pub struct BpfEvents {
    rings: Vec<Ring>,
}

impl BpfEvents {
    /// Opens a ring on every online CPU (root or `CAP_PERFMON`).
    ///
    /// # Errors
    /// When a CPU's event cannot be opened (kernels before 5.1, no privilege) or mapped.
    pub fn open() -> Result<BpfEvents, Error> {
        let cpus = aya::util::online_cpus().map_err(|(_, e)| Error::Cpus(e))?;
        let rings = cpus.into_iter().map(Ring::open).collect::<Result<_, _>>()?;
        Ok(BpfEvents { rings })
    }

    /// The records written since the last call, every CPU's.
    pub fn drain(&mut self) -> Vec<Record> {
        let mut out = Vec::new();
        for ring in &mut self.rings {
            ring.drain(&mut out);
        }
        out
    }
}

struct Ring {
    map: MmapRaw,
    // Declared after `map`: unmapped first, then closed.
    _fd: OwnedFd,
}

impl Ring {
    fn open(cpu: u32) -> Result<Ring, Error> {
        let mut attr = sys::perf_event_attr {
            type_: sys::PERF_TYPE_SOFTWARE,
            size: u32::try_from(size_of::<sys::perf_event_attr>()).unwrap_or(sys::PERF_ATTR_SIZE_VER5),
            config: u64::from(sys::PERF_COUNT_SW_DUMMY),
            // The loading process's pid after each record (`sample_id`).
            sample_type: u64::from(sys::PERF_SAMPLE_TID),
            ..sys::perf_event_attr::default()
        };
        attr.set_bpf_event(1);
        attr.set_sample_id_all(1);
        let on_cpu = i32::try_from(cpu).unwrap_or(i32::MAX);
        // SAFETY: `attr` is initialised; a system-wide counting-only dummy event on one CPU.
        let fd = unsafe { perf_event_open_sys::perf_event_open(&raw mut attr, -1, on_cpu, -1, libc::c_ulong::from(sys::PERF_FLAG_FD_CLOEXEC)) };
        if fd < 0 {
            return Err(Error::Open { cpu, source: std::io::Error::last_os_error() });
        }
        // SAFETY: a new fd the kernel just returned; owned (closed) here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = page_size() * (1 + DATA_PAGES);
        let map = MmapOptions::new().len(len).map_raw(fd.as_raw_fd()).map_err(|source| Error::Map { cpu, source })?;
        Ok(Ring { map, _fd: fd })
    }

    /// Appends the records written since the last drain, then hands their space back.
    fn drain(&mut self, out: &mut Vec<Record>) {
        let base = self.map.as_mut_ptr();
        #[expect(clippy::cast_ptr_alignment, reason = "the mapping starts on a page boundary")]
        let page = base.cast::<sys::perf_event_mmap_page>();
        // SAFETY: the first page of the mapping is the kernel's `perf_event_mmap_page`;
        // `data_head` and `data_tail` are 8-aligned u64s shared with the kernel, so they are
        // accessed atomically (acquire the head before reading data, release the tail after).
        let (head, tail, offset, size) = unsafe {
            let head = (*(&raw const (*page).data_head).cast::<AtomicU64>()).load(Ordering::Acquire);
            let tail = (*(&raw const (*page).data_tail).cast::<AtomicU64>()).load(Ordering::Relaxed);
            (head, tail, (*page).data_offset, (*page).data_size)
        };
        let page_size = page_size();
        // Kernels before 4.1 leave offset and size 0: the data follows the first page.
        let (offset, size) = if size == 0 { (page_size, self.map.len() - page_size) } else { (usize::try_from(offset).unwrap_or(page_size), usize::try_from(size).unwrap_or(0)) };
        if size == 0 || offset + size > self.map.len() {
            return;
        }
        // SAFETY: `offset..offset + size` lies within the mapping (checked above); the kernel
        // does not write the part between tail and head until the tail moves past it.
        let data = unsafe { std::slice::from_raw_parts(base.add(offset).cast_const(), size) };
        let new_tail = read_records(data, tail, head, out);
        // SAFETY: as above; this hands the read space back to the kernel.
        unsafe { (*(&raw mut (*page).data_tail).cast::<AtomicU64>()).store(new_tail, Ordering::Release) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// Reads the records between `tail` and `head` of the ring `data` (positions count bytes from
/// the ring's start and wrap at its length) into `out`; returns the position read up to.
fn read_records(data: &[u8], mut tail: u64, head: u64, out: &mut Vec<Record>) -> u64 {
    if data.is_empty() {
        return head;
    }
    let size = data.len() as u64;
    let at = |pos: u64, len: usize| -> Vec<u8> {
        let start = usize::try_from(pos % size).unwrap_or(0);
        (0..len).map(|i| data[(start + i) % data.len()]).collect()
    };
    while head.saturating_sub(tail) >= 8 {
        let header = at(tail, 8);
        let len = u16::from_ne_bytes([header[6], header[7]]);
        if len < 8 || u64::from(len) > head - tail {
            // A torn or bogus header: skip to the head rather than loop.
            return head;
        }
        out.extend(parse(&at(tail, usize::from(len))));
        tail += u64::from(len);
    }
    tail
}

/// One record (its `perf_event_header` included), when it is a BPF program event or a loss.
fn parse(record: &[u8]) -> Option<Record> {
    let u16_at = |o: usize| record.get(o..o + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let u32_at = |o: usize| record.get(o..o + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| record.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_ne_bytes);
    match u32_at(0)? {
        // header, u16 type, u16 flags, u32 id, u8 tag[8], then sample_id { u32 pid, u32 tid }.
        sys::PERF_RECORD_BPF_EVENT => {
            let kind = u32::from(u16_at(8)?);
            let load = match kind {
                sys::PERF_BPF_EVENT_PROG_LOAD => true,
                sys::PERF_BPF_EVENT_PROG_UNLOAD => false,
                _ => return None,
            };
            Some(Record::Prog { load, id: u32_at(12)?, pid: u32_at(24)? })
        }
        // header, u64 id, u64 lost.
        sys::PERF_RECORD_LOST => Some(Record::Lost(u64_at(16)?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bpf_record(kind: u16, id: u32, pid: u32) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend(sys::PERF_RECORD_BPF_EVENT.to_ne_bytes());
        r.extend(0u16.to_ne_bytes());
        r.extend(32u16.to_ne_bytes());
        r.extend(kind.to_ne_bytes());
        r.extend(0u16.to_ne_bytes());
        r.extend(id.to_ne_bytes());
        r.extend([0xab; 8]);
        r.extend(pid.to_ne_bytes());
        r.extend(pid.to_ne_bytes());
        r
    }

    #[test]
    fn parses_loads_unloads_and_losses() {
        assert_eq!(parse(&bpf_record(1, 77, 1234)), Some(Record::Prog { load: true, id: 77, pid: 1234 }));
        assert_eq!(parse(&bpf_record(2, 78, 99)), Some(Record::Prog { load: false, id: 78, pid: 99 }));
        assert_eq!(parse(&bpf_record(0, 78, 99)), None, "unknown BPF event type");
        assert_eq!(parse(&bpf_record(1, 78, 99)[..20]), None, "truncated");
        let mut lost = Vec::new();
        lost.extend(sys::PERF_RECORD_LOST.to_ne_bytes());
        lost.extend(0u16.to_ne_bytes());
        lost.extend(24u16.to_ne_bytes());
        lost.extend(5u64.to_ne_bytes());
        lost.extend(17u64.to_ne_bytes());
        assert_eq!(parse(&lost), Some(Record::Lost(17)));
    }

    #[test]
    fn reads_records_across_the_ring_wrap() {
        // A 64-byte ring read from position 48: the first record wraps at 64, the second
        // follows at 16.
        let (a, b) = (bpf_record(1, 1, 10), bpf_record(2, 2, 20));
        let mut ring = vec![0u8; 64];
        for (i, byte) in a.iter().chain(&b).enumerate() {
            ring[(48 + i) % 64] = *byte;
        }
        let mut out = Vec::new();
        assert_eq!(read_records(&ring, 48, 112, &mut out), 112);
        assert_eq!(out, [Record::Prog { load: true, id: 1, pid: 10 }, Record::Prog { load: false, id: 2, pid: 20 }]);
        out.clear();
        assert_eq!(read_records(&ring, 80, 112, &mut out), 112);
        assert_eq!(out, [Record::Prog { load: false, id: 2, pid: 20 }]);
        // Nothing new, or only part of a header: nothing read.
        assert_eq!(read_records(&ring, 112, 112, &mut out), 112);
        assert_eq!(read_records(&ring, 112, 116, &mut out), 112);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_bogus_length_does_not_loop() {
        let mut ring = bpf_record(1, 1, 10);
        ring[6..8].copy_from_slice(&0u16.to_ne_bytes());
        let mut out = Vec::new();
        assert_eq!(read_records(&ring, 0, 32, &mut out), 32);
        assert!(out.is_empty());
    }
}
