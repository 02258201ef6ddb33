//! The socket-holder iterator's record and load-time offsets (`socktrace-ebpf`'s `iter_sockets`,
//! read by `snapshot`): one record per socket descriptor of every thread-group leader.

/// One socket descriptor: the holder's pid (a thread-group leader, as in /proc/PID), its comm,
/// the descriptor number and the socket's inode (what /proc/PID/fd/N shows as `socket:[N]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketFd {
    pub pid: u32,
    pub fd: u32,
    pub inode: u64,
    pub comm: [u8; crate::TASK_COMM_LEN],
}

/// Struct offsets the iterator reads, from the running kernel's BTF (no CO-RE in Rust eBPF).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IterOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
    pub inode_ino: u32,
}

impl IterOffsets {
    pub const ZERO: IterOffsets =
        IterOffsets { task_pid: 0, task_tgid: 0, task_comm: 0, file_inode: 0, inode_mode: 0, inode_ino: 0 };
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), plain integers, no padding (4+4+8+16 and 6×4 bytes).
    unsafe impl aya::Pod for super::SocketFd {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IterOffsets {}
}
