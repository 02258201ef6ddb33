//! In-kernel accept-queue wait histograms (`WAITS` map) and recent acceptors (`ACCEPTORS` map):
//! what `top`, `serve` and `diagnose` read instead of one ring-buffer event per accept.
//!
//! Buckets are log-linear over nanoseconds: exact below 2^[`SUB_BITS`], then 2^[`SUB_BITS`]
//! buckets per power of two, each `2^(e - SUB_BITS)` wide for values in `[2^e, 2^(e+1))`. That is
//! the layout of the agent's HDR histogram at 2 significant digits (128 sub-buckets per power of
//! two, power-of-two aligned, and never finer than its 512 ns floor), so every bucket here lies
//! inside one of its buckets: a bucket's lower bound recorded there lands where each of its
//! samples would have, and the percentiles are those the per-accept events gave.
//!
//! The map is sparse: one entry per (listening socket, bucket) that saw a wait, a `u64` count since
//! the programs were loaded (the agent takes deltas; a count that went backwards was evicted and
//! counts from zero again).

/// Sub-buckets per power of two: `1 << SUB_BITS`.
pub const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;

/// Bucket of a wait of `ns` nanoseconds (below 2^16 for any `u64`).
#[inline(always)]
pub const fn bucket(ns: u64) -> u16 {
    if ns < SUB {
        return ns as u16;
    }
    let e = 63 - ns.leading_zeros();
    let shift = e - SUB_BITS;
    let sub = (ns >> shift) & (SUB - 1);
    ((shift as u64 + 1) * SUB + sub) as u16
}

/// Smallest wait in bucket `b` (ns).
pub const fn lower(b: u16) -> u64 {
    let b = b as u64;
    if b < SUB {
        return b;
    }
    let shift = b / SUB - 1;
    (SUB + b % SUB) << shift
}

/// Largest wait in bucket `b` (ns).
pub const fn upper(b: u16) -> u64 {
    let b = b as u64;
    if b < SUB {
        return b;
    }
    let shift = b / SUB - 1;
    lower(b as u16) + ((1u64 << shift) - 1)
}

/// Key of the `WAITS` map: the listening socket (inode 0: not known, then only its port) and one
/// bucket of its accept-queue waits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WaitKey {
    pub netns: u32,
    pub inode: u32,
    pub lport: u16,
    pub bucket: u16,
    pub _pad: u32,
}

/// Key of the `ACCEPTORS` map: a thread that accepted from a listening socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AcceptorKey {
    pub netns: u32,
    pub inode: u32,
    pub tid: u32,
    pub lport: u16,
    pub _pad: u16,
}

/// Value of the `ACCEPTORS` map: that thread's latest accept from that socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptorSeen {
    /// CLOCK_MONOTONIC of the latest accept.
    pub ts_ns: u64,
    pub pid: u32,
    /// When `comm` was last read, in units of 2^30 ns of CLOCK_MONOTONIC (low 32 bits): the
    /// kernel refreshes the name at most about once a second per row, not on every accept.
    pub comm_at: u32,
    pub comm: [u8; crate::TASK_COMM_LEN],
}

/// The `comm_at` of an accept at `ts_ns`.
#[must_use]
pub const fn comm_epoch(ts_ns: u64) -> u32 {
    (ts_ns >> 30) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_monotonic_and_tight() {
        // Every bucket starts right after the previous one ends.
        for b in 0..bucket(u64::MAX) {
            assert_eq!(upper(b) + 1, lower(b + 1), "bucket {b}");
        }
        assert_eq!(upper(bucket(u64::MAX)), u64::MAX);
        for v in [0u64, 1, 127, 128, 129, 255, 256, 999, 1000, 1023, 1024, 131_071, 131_072, 12_345_678, 3_600_000_000_000, u64::MAX] {
            let b = bucket(v);
            assert!(lower(b) <= v && v <= upper(b), "{v} in [{}, {}]", lower(b), upper(b));
            // Relative width at most 1/128 (the agent's HDR precision at 2 significant digits).
            assert!((upper(b) - lower(b)) as f64 <= v as f64 / 128.0, "{v}");
        }
        assert!(bucket(u64::MAX) < u16::MAX);
    }

    #[test]
    fn powers_of_two_start_buckets() {
        for e in SUB_BITS..64 {
            let v = 1u64 << e;
            assert_eq!(lower(bucket(v)), v);
            assert_eq!(upper(bucket(v - 1)), v - 1);
        }
    }

    #[test]
    fn layout_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<WaitKey>(), 16);
        assert_eq!(core::mem::size_of::<AcceptorKey>(), 16);
        assert_eq!(core::mem::size_of::<AcceptorSeen>(), 8 + 4 + 4 + 16);
    }
}
