//! Reading a whole kernel hash map in a few system calls (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6+)
//! instead of two per entry (aya 0.14's iterator: get-next-key, then lookup). The `WAITS` map can
//! hold tens of thousands of (socket, bucket) entries and is read at every interval: one call per
//! 4096 entries keeps that read in the milliseconds.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{Pod, maps::MapData};

/// `BPF_MAP_LOOKUP_BATCH` from `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call.
const CHUNK_U32: u32 = 4096;
const CHUNK: usize = CHUNK_U32 as usize;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of a hash map with plain (not per-CPU) values of type `V`; the caller has
/// checked that `K` and `V` have the map's key and value sizes. `Err` with `EINVAL` (or
/// `ENOTSUPP`) on kernels without batch operations: read it entry by entry then.
pub fn lookup_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let fd = u32::try_from(map.fd().as_fd().as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: Pod types are plain data: all-zero bytes are a valid value.
    let mut keys: Vec<K> = (0..CHUNK).map(|_| unsafe { std::mem::zeroed() }).collect();
    // SAFETY: as above.
    let mut values: Vec<V> = (0..CHUNK).map(|_| unsafe { std::mem::zeroed() }).collect();
    // The kernel's position token (a u32 bucket index for hash maps), passed back in.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    let mut out = Vec::new();
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const token_in) as u64 },
            out_batch: (&raw mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK_U32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `count` keys and values of the map's sizes (checked
        // by the caller's types: aya checked them when the map was typed), alive for the call.
        let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &raw mut attr, size_of::<BatchAttr>()) };
        let n = (attr.count as usize).min(CHUNK);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENOENT: the last entries came with this call.
            return if e.raw_os_error() == Some(libc::ENOENT) { Ok(out) } else { Err(e) };
        }
        token_in = token_out;
        first = false;
    }
}
