//! Types shared by the kernel programs (`socktrace-ebpf`) and the userspace agent (`socktrace`).
//!
//! Everything here is `#[repr(C)]` with explicit padding so both sides agree byte for byte. There is
//! exactly one definition of an event; the agent decodes it, the eBPF side fills it. Kernel struct
//! layout is *not* here: offsets arrive at load time in [`KernelOffsets`], read from the running
//! kernel's BTF.
#![no_std]

pub mod iter;
pub mod wait;

/// Kinds of [`Event`].
pub mod kind {
    /// A connection left the accept queue (the application accepted it).
    pub const ACCEPT: u32 = 1;
    /// The 3rd ACK of a handshake was dropped because the accept queue was full.
    pub const LISTEN_OVERFLOW: u32 = 2;
    /// A SYN was dropped because the accept queue was full.
    pub const SYN_DROP: u32 = 3;
    /// A data/control segment was retransmitted.
    pub const RETRANSMIT: u32 = 4;
    /// A SYN-ACK was retransmitted by a listener.
    pub const SYNACK_RETRANSMIT: u32 = 5;
    /// A process called listen(2): `queue_max` is the backlog it asked for (the kernel caps it at
    /// net.core.somaxconn).
    pub const LISTEN: u32 = 6;
    /// A child joined a listener's accept queue (`sk_data_ready` on the listener). Aggregated in
    /// the kernel only (`ListenerStats::queued`), never sent: with no accept hook the agent derives
    /// accepts from it and the queue length.
    pub const QUEUED: u32 = 7;
    /// A listener closed (LISTEN → CLOSE): `queue_len` children were still queued, never accepted.
    /// Aggregated in the kernel only, for the derived accepts like [`QUEUED`].
    pub const LISTEN_CLOSE: u32 = 8;
}

/// Bits of [`Event::flags`]: which optional fields are meaningful.
pub mod flags {
    /// `pid`, `tid` and `comm` describe the task that caused the event (syscall context).
    pub const HAS_TASK: u32 = 1;
    /// `queue_len` and `queue_max` were read from the listener.
    pub const HAS_QUEUE: u32 = 2;
    /// `accept_wait_ns` is known (the enqueue was seen).
    pub const HAS_WAIT: u32 = 4;
}

/// Which kernel hook produced an event (also used by `socktrace probes`).
pub mod hook {
    pub const TP_BTF: u32 = 1;
    pub const RAW_TP: u32 = 2;
    pub const TRACEPOINT: u32 = 3;
    pub const FENTRY: u32 = 4;
    pub const FEXIT: u32 = 5;
    pub const KPROBE: u32 = 6;
    pub const KRETPROBE: u32 = 7;
    pub const CGROUP_SKB: u32 = 8;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const TASK_COMM_LEN: usize = 16;

/// One traced event, written to the `EVENTS` ring buffer.
///
/// Addresses are in network byte order (IPv4 in the first 4 bytes); ports in host order. For
/// `accept`, `listen_overflow`, `syn_drop` and `synack_retransmit` the local side is the listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
    pub ts_ns: u64,
    /// Time the connection spent in the accept queue (ACCEPT with `HAS_WAIT`).
    pub accept_wait_ns: u64,
    /// Kernel address of the socket (listener for listener-side events); only an identity.
    pub sock_id: u64,
    pub kind: u32,
    pub flags: u32,
    /// Inode number of the socket's network namespace.
    pub netns: u32,
    /// Thread group id and thread id (with `HAS_TASK`).
    pub pid: u32,
    pub tid: u32,
    /// One of `hook::*`.
    pub hook: u32,
    pub queue_len: u32,
    pub queue_max: u32,
    /// Segments covered by a retransmit (`tcp_skb_pcount`), 1 otherwise.
    pub segs: u32,
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    pub _pad: u16,
    /// Inode number of the listening socket (what sock_diag reports) for listener-side events
    /// (accept, listen_overflow, syn_drop, synack_retransmit, listen); 0 when unknown.
    pub sock_ino: u32,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    pub comm: [u8; TASK_COMM_LEN],
}

impl Event {
    pub const ZERO: Event = Event {
        ts_ns: 0,
        accept_wait_ns: 0,
        sock_id: 0,
        kind: 0,
        flags: 0,
        netns: 0,
        pid: 0,
        tid: 0,
        hook: 0,
        queue_len: 0,
        queue_max: 0,
        segs: 1,
        family: 0,
        lport: 0,
        rport: 0,
        _pad: 0,
        sock_ino: 0,
        laddr: [0; 16],
        raddr: [0; 16],
        comm: [0; TASK_COMM_LEN],
    };
}

/// Byte offsets into kernel structures and kernel constants, resolved from the running kernel's BTF
/// by the agent and handed to the programs as the load-time global `OFFSETS`.
///
/// A field that the kernel does not have is [`KernelOffsets::ABSENT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    // struct sock_common (reached from struct sock and struct request_sock)
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_net: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    // struct sock
    pub sk_protocol: u32,
    pub sk_ack_backlog: u32,
    pub sk_max_ack_backlog: u32,
    // struct net → ns.inum
    pub net_ns_inum: u32,
    // fd → socket: task_struct.files → files_struct.fdt → fdtable.{max_fds,fd} → file.private_data → socket.sk
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    // struct sk_buff: packet headers (head + offsets) and cb → struct tcp_skb_cb.tcp_gso_segs (u16)
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_cb: u32,
    pub tcb_gso_segs: u32,
    // struct sk_buff.dev → struct net_device.nd_net.net (netns of a packet without a socket)
    pub skb_dev: u32,
    pub netdev_nd_net: u32,
    // struct sk_buff._skb_refdst → struct dst_entry.dev (skb->dev is NULL by the time TCP drops)
    pub skb_refdst: u32,
    pub dst_dev: u32,
    /// Value of `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW`.
    pub reason_listen_overflow: u32,
    /// Value of `SKB_DROP_REASON_NO_SOCKET` (a SYN-cookie ACK whose child could not be created).
    pub reason_no_socket: u32,
    /// Argument index of `rx_sk` in the `kfree_skb` tracepoint.
    pub kfree_skb_rx_sk_arg: u32,
    /// Argument index of `err` in the `tcp_retransmit_skb` tracepoint.
    pub retransmit_err_arg: u32,
    /// Index of `inet_csk_accept`'s return value in an fexit context: its parameter count (from
    /// BTF; 4 before 6.10, 2 since). Reading it there needs no `bpf_get_func_ret` (5.17+).
    pub accept_ret_arg: u32,
    /// The cgroup_skb SYN-drop program confirms a SYN's fate with the kernel's counter only when the
    /// listener's accept queue is within this many children of full (`len + slack >= max`): the
    /// kernel decides a few hundred ns later on the same CPU, and only other CPUs can add to the
    /// queue meanwhile. [`KernelOffsets::ABSENT`]: confirm every SYN.
    pub syn_confirm_slack: u32,
    /// Offsets of the fd / return value in the classic `syscalls:sys_{enter,exit}_accept*` records.
    pub tp_accept_fd: u32,
    pub tp_accept_ret: u32,
    /// Offsets of `fd` and `backlog` in the `syscalls:sys_enter_listen` record.
    pub tp_listen_fd: u32,
    pub tp_listen_backlog: u32,
    /// `struct sock` → `sk_socket`, then the inode of that socket: `struct socket_alloc` →
    /// `vfs_inode`, `struct inode` → `i_ino` (the inode sock_diag reports).
    pub sk_socket: u32,
    pub socket_alloc_inode: u32,
    pub inode_ino: u32,
    pub _pad_offsets: u32,
    /// `struct net` → `mib.net_statistics` (a per-CPU `struct linux_mib *`) and the index of
    /// `LINUX_MIB_LISTENOVERFLOWS` in its `mibs[]` (unsigned long each).
    pub net_mib_net_statistics: u32,
    pub mib_listen_overflows: u32,
    /// Address of `__per_cpu_offset[]` (from kallsyms; 0 when unknown): with it the fentry/kprobe
    /// drop hooks confirm each drop with the kernel's own per-CPU ListenOverflows counter.
    pub per_cpu_offset: u64,
    /// `[start, end)` of `cookie_v4_check` and `cookie_v6_check` in kernel text (from kallsyms; 0 when
    /// unknown): kfree_skb's `location` inside them with reason NO_SOCKET is a listen overflow on
    /// the SYN-cookie path, which the kernel drops without TCP_LISTEN_OVERFLOW or rx_sk.
    pub cookie_v4_check: [u64; 2],
    pub cookie_v6_check: [u64; 2],
    /// Values of `SKB_DROP_REASON_NETFILTER_DROP` and `SKB_DROP_REASON_NO_SOCKET` for the
    /// packet-drop program (segments that never reach a listener); [`KernelOffsets::ABSENT`] when
    /// the kernel lacks the reason or kfree_skb passes none.
    pub reason_netfilter_drop: u32,
    pub reason_no_socket_any: u32,
    /// `struct bpf_array` → `pptrs` (the per-CPU pointers of a per-CPU array map's values): with
    /// it a program finds this CPU's per-CPU offset without kallsyms (a per-CPU array value's
    /// address minus its `pptrs[0]`), when `per_cpu_offset` is unknown. [`KernelOffsets::ABSENT`]:
    /// not used.
    pub bpf_array_pptrs: u32,
    /// `struct pt_regs` → the syscall's first argument as it is still saved at syscall exit (`di`
    /// on x86-64, `orig_x0` on arm64, from BTF): the accept exit programs read the listening fd
    /// there instead of remembering it from the syscall's entry. [`KernelOffsets::ABSENT`]: unknown.
    pub pt_regs_arg0: u32,
    /// `struct tcp_sock` → `rcvq_space.time`: set by the kernel (`tcp_init_buffer_space`, µs of
    /// the monotonic clock) when a passive child's handshake completes, just after it was queued,
    /// and changed only by reads from the socket. At accept it gives the queue wait without an
    /// enqueue program. [`KernelOffsets::ABSENT`]: not used (the `ENQUEUED` map is).
    pub tcp_rcvq_time: u32,
    pub _pad_tail: u32,
}

impl KernelOffsets {
    pub const ABSENT: u32 = u32::MAX;
    pub const ZERO: KernelOffsets = KernelOffsets {
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_family: 0,
        skc_state: 0,
        skc_net: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        sk_protocol: 0,
        sk_ack_backlog: 0,
        sk_max_ack_backlog: 0,
        net_ns_inum: 0,
        task_files: 0,
        files_fdt: 0,
        fdt_max_fds: 0,
        fdt_fd: 0,
        file_private_data: 0,
        socket_sk: 0,
        skb_head: 0,
        skb_network_header: 0,
        skb_transport_header: 0,
        skb_cb: 0,
        tcb_gso_segs: 0,
        skb_dev: 0,
        netdev_nd_net: 0,
        skb_refdst: 0,
        dst_dev: 0,
        reason_listen_overflow: Self::ABSENT,
        reason_no_socket: Self::ABSENT,
        kfree_skb_rx_sk_arg: Self::ABSENT,
        retransmit_err_arg: Self::ABSENT,
        accept_ret_arg: Self::ABSENT,
        syn_confirm_slack: Self::ABSENT,
        tp_accept_fd: 16,
        tp_accept_ret: 16,
        tp_listen_fd: 16,
        tp_listen_backlog: 24,
        sk_socket: Self::ABSENT,
        socket_alloc_inode: Self::ABSENT,
        inode_ino: Self::ABSENT,
        _pad_offsets: 0,
        net_mib_net_statistics: Self::ABSENT,
        mib_listen_overflows: Self::ABSENT,
        per_cpu_offset: 0,
        cookie_v4_check: [0; 2],
        cookie_v6_check: [0; 2],
        reason_netfilter_drop: Self::ABSENT,
        reason_no_socket_any: Self::ABSENT,
        bpf_array_pptrs: Self::ABSENT,
        pt_regs_arg0: Self::ABSENT,
        tcp_rcvq_time: Self::ABSENT,
        _pad_tail: 0,
    };
}

/// Per-listener aggregates kept in the kernel (`LISTENERS` map), so `top`/`serve` do not depend on
/// the event rate. Two kinds of rows: per port ([`listener_key`]: a TCP port in a network
/// namespace, every socket on it together, plus the retransmits of its connections) and per
/// listening socket ([`socket_key`]: its inode; SO_REUSEPORT groups have one per member, each with
/// its own queue). Retransmits are only in the port row (a connection's listener socket is not
/// known at retransmit time).
/// Counters are monotonic since the programs were loaded; the agent computes deltas.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerStats {
    pub accepts: u64,
    pub overflows: u64,
    pub syn_drops: u64,
    pub synack_retransmits: u64,
    /// Retransmitted segments on connections accepted from this listener.
    pub retransmits: u64,
    pub wait_sum_ns: u64,
    pub wait_count: u64,
    /// Children added to the accept queue (counted only where no accept hook runs:
    /// `--accept-hooks off`).
    pub queued: u64,
    /// Listener closes seen (with `queued`), and the children they left unaccepted.
    pub closes: u64,
    pub unaccepted: u64,
    /// Accept-queue high-water mark per epoch slot: slot `e & 1` holds the peak seen while
    /// `CONTROL.epoch == e` (`peak_epoch[e & 1] == e`). The agent bumps the epoch, then reads the
    /// previous slot: a burst shorter than the read interval is still seen.
    pub peak_epoch: [u32; 2],
    pub peak: [u32; 2],
    /// Backlog (`sk_max_ack_backlog`) last seen.
    pub queue_max: u32,
    pub netns: u32,
    pub lport: u16,
    pub family: u16,
    /// Random identity given to the row when it is created (kernel: bpf_get_prandom_u32; agent
    /// seeds: its own counter). A different id under the same key between two reads means the
    /// row was evicted and created again: its counters restarted from zero.
    pub row_id: u32,
}

impl ListenerStats {
    pub const ZERO: ListenerStats = ListenerStats {
        accepts: 0,
        overflows: 0,
        syn_drops: 0,
        synack_retransmits: 0,
        retransmits: 0,
        wait_sum_ns: 0,
        wait_count: 0,
        queued: 0,
        closes: 0,
        unaccepted: 0,
        peak_epoch: [0; 2],
        peak: [0; 2],
        queue_max: 0,
        netns: 0,
        lport: 0,
        family: 0,
        row_id: 0,
    };
}

/// Key of a port row of the `LISTENERS` map: netns inode and local port.
pub const fn listener_key(netns: u32, lport: u16) -> u64 {
    ((netns as u64) << 16) | lport as u64
}

/// Marks a socket row's key (port keys stay below 2^48).
pub const SOCKET_KEY: u64 = 1 << 63;

/// Key of a socket row of the `LISTENERS` map: the listening socket's inode.
pub const fn socket_key(inode: u32) -> u64 {
    SOCKET_KEY | inode as u64
}

/// Segments to a TCP port that never reached a listener, and local clients' SYN retransmits to
/// it, counted in the kernel (`PAST` map): what goes wrong before the accept queue.
pub mod past {
    /// Dropped by netfilter (kfree_skb reason NETFILTER_DROP); `addr` is the peer (source).
    pub const NETFILTER: u8 = 1;
    /// No socket for it (kfree_skb reason NO_SOCKET: the kernel answers a SYN with a RST); `addr`
    /// is the local address the client used (destination). Only SYNs are counted.
    pub const NO_SOCKET: u8 = 2;
    /// A local client (a socket in SYN_SENT) retransmitted its SYN; `addr` is the destination.
    pub const CLIENT_SYN_RETRANS: u8 = 3;
}

/// Key of the `PAST` map (value: a `u64` count since the programs were loaded).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PastKey {
    /// Netns inode: the packet's device's (drops) or the client socket's (retransmits).
    pub netns: u32,
    /// Destination TCP port (the listener's port), host order.
    pub port: u16,
    /// One of `past::*`.
    pub class: u8,
    /// 1: a SYN without ACK (a connection attempt); 0: any other segment.
    pub syn: u8,
    pub family: u16,
    pub _pad: [u8; 6],
    /// Network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
}

impl PastKey {
    pub const ZERO: PastKey = PastKey { netns: 0, port: 0, class: 0, syn: 0, family: 0, _pad: [0; 6], addr: [0; 16] };
}

/// Settings the agent changes while running (single-entry `CONTROL` array).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Control {
    /// Peak epoch, see [`ListenerStats::peak`].
    pub epoch: u32,
    /// Bit `1 << kind` set: do not emit events of that kind (aggregates are still kept).
    pub mute: u32,
    /// Non-zero: only events of this netns reach the ring buffer (a `--netns` view need not
    /// read, nor lose to a full buffer, the whole machine's events; aggregates are still kept).
    pub netns: u32,
    /// Non-zero: only events whose local or remote port is this one reach the ring buffer.
    pub port: u32,
    /// Non-zero: keep accept waits and acceptors in the `WAITS`/`ACCEPTORS` maps (the interval
    /// views read them), for listeners within `netns`/`port` when set; `watch` leaves it 0, its
    /// events carry both.
    pub waits: u32,
}

/// Index of the counters in the per-CPU `STATS` array.
pub mod stat {
    /// Events that could not be written because the ring buffer was full.
    pub const LOST: u32 = 0;
    /// Kernel reads that failed (a pointer chain broke); the event was skipped.
    pub const READ_ERRORS: u32 = 1;
    /// `tcp_retransmit_skb` tracepoint runs with `err != 0` (the segment did not leave the host);
    /// not events. The kernel's TcpRetransSegs may include some of them (it counts before sending).
    pub const RETRANSMIT_UNSENT: u32 = 2;
    /// cgroup_skb SYN-drop records settled late: the SYN's own free (consume_skb/kfree_skb) was
    /// not seen before the next SYN on that CPU, so the counter check may include other drops.
    pub const SYN_SETTLED_LATE: u32 = 3;
    // Map pressure (issue 15). The kernel reports no LRU eviction, so every program that adds or
    // removes an entry of a bounded map counts it here: for a map, evicted = inserts - deletes -
    // live entries (live entries counted by the agent; `socktrace/src/pressure.rs`). An insert is
    // counted only when it created an entry (BPF_NOEXIST succeeded), a delete only when it removed one.
    /// `LISTENERS` rows created by the kernel programs (the agent counts the rows it seeds itself).
    pub const LISTENERS_INSERTS: u32 = 4;
    /// `ENQUEUED` entries created (a child socket entered an accept queue).
    pub const ENQUEUED_INSERTS: u32 = 5;
    /// `ENQUEUED` entries removed by an accept.
    pub const ENQUEUED_DELETES: u32 = 6;
    /// `ACCEPTING` entries created (a thread entered accept()).
    pub const ACCEPTING_INSERTS: u32 = 7;
    /// `ACCEPTING` entries removed when the accept returned.
    pub const ACCEPTING_DELETES: u32 = 8;
    /// `PAST` rows created.
    pub const PAST_INSERTS: u32 = 9;
    /// Accepts whose child socket had no `ENQUEUED` entry (its wait is unknown): queued before the
    /// programs were loaded, or its entry was evicted.
    pub const ACCEPT_NO_WAIT: u32 = 10;
    /// `WAITS` rows created (the first accept of a socket in a wait bucket); the agent deletes
    /// rows and counts those deletes itself.
    pub const WAITS_INSERTS: u32 = 11;
    /// `ACCEPTORS` rows created (a thread's first accept from a socket); deleted only by the agent.
    pub const ACCEPTORS_INSERTS: u32 = 12;
    /// `PAST` counts lost: the row was neither found nor created (its update failed), so one
    /// segment or retransmit went uncounted. Shown as a loss, never a silent shortfall.
    pub const PAST_LOST: u32 = 13;
    /// Retransmits of a local client's SYN (socket in SYN_SENT) seen by the retransmit program,
    /// before its `PAST` update: the program's own tally, to tell a count the map lost from a
    /// retransmit the program never saw.
    pub const CLIENT_SYN_SEEN: u32 = 14;
    /// kfree_skb runs with reason NETFILTER_DROP (any packet, every namespace), counted before the
    /// program reads the packet: the program's own tally, to tell a drop it skipped or a count the
    /// map lost from a drop it was never called for.
    pub const NETFILTER_SEEN: u32 = 15;
    pub const COUNT: u32 = 16;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both are #[repr(C)], contain only integers and byte arrays, and have no implicit padding.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Control {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PastKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::wait::WaitKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::wait::AcceptorKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::wait::AcceptorSeen {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Event>(), 8 * 3 + 4 * 9 + 2 * 4 + 4 + 16 * 2 + 16);
        assert_eq!(core::mem::offset_of!(Event, sock_ino) % 4, 0);
        assert_eq!(core::mem::size_of::<Event>() % 8, 0);
        assert_eq!(core::mem::size_of::<KernelOffsets>(), 4 * 50 + 8 * 5);
        assert_eq!(core::mem::size_of::<PastKey>(), 4 + 2 + 1 + 1 + 2 + 6 + 16);
        assert_eq!(core::mem::offset_of!(PastKey, addr), 16);
        assert_eq!(core::mem::size_of::<ListenerStats>(), 8 * 10 + 4 * 6 + 2 * 2 + 4);
        assert_eq!(listener_key(1, 80), (1 << 16) | 80);
        assert!(listener_key(u32::MAX, u16::MAX) & SOCKET_KEY == 0);
        assert_eq!(socket_key(7), SOCKET_KEY | 7);
        assert_eq!(core::mem::size_of::<Control>(), 4 * 5);
    }
}
