//! Reading kernel structures without CO-RE: every offset comes from `OFFSETS`, which userspace fills
//! from the running kernel's BTF at load time (rustc emits no field relocations for eBPF).

use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
    },
};
use socktrace_common::{AF_INET, AF_INET6, Event, KernelOffsets, TASK_COMM_LEN, flags, stat};

use crate::maps::count;

#[unsafe(no_mangle)]
pub(crate) static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::ZERO);

/// Reads one field of `OFFSETS` (a volatile load, so the verifier sees the frozen constant).
macro_rules! off {
    ($field:ident) => {{
        let base = core::ptr::from_ref(&crate::kernel::OFFSETS).cast::<socktrace_common::KernelOffsets>();
        // SAFETY: Global<T> is repr(transparent) over an initialised T.
        unsafe { core::ptr::read_volatile(&raw const (*base).$field) }
    }};
}
pub(crate) use off;

pub const TCP_SYN_SENT: u8 = 2;
pub const TCP_SYN_RECV: i32 = 3;
pub const TCP_LISTEN: i32 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Reads a `T` at `base + offset`; a failed read is counted.
#[inline(always)]
pub fn read<T>(base: u64, offset: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel copes with any address.
    match unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) } {
        Ok(v) => Ok(v),
        Err(e) => {
            count(stat::READ_ERRORS);
            Err(i64::from(e))
        }
    }
}

#[inline(always)]
pub fn read_buf(base: u64, offset: u32, dst: &mut [u8]) -> Result<(), i64> {
    // SAFETY: as in `read`.
    match unsafe { bpf_probe_read_kernel_buf((base + u64::from(offset)) as *const u8, dst) } {
        Ok(()) => Ok(()),
        Err(e) => {
            count(stat::READ_ERRORS);
            Err(i64::from(e))
        }
    }
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Netns inode of a socket (or request socket: both start with `struct sock_common`).
#[inline(always)]
pub fn netns_of(sk: u64) -> Result<u32, i64> {
    let net: u64 = read(sk, off!(skc_net))?;
    read(net, off!(net_ns_inum))
}

/// Bytes of a socket read at once by [`SockHead`]: `struct sock_common` up to and including its
/// IPv6 addresses (88 bytes on every kernel this project knows).
const HEAD_LEN: usize = 96;

/// The start of a socket (`struct sock_common`: addresses, ports, family, state, netns), read
/// with one helper call instead of one per field. A helper call costs about 30 ns here, the bytes
/// almost nothing; a field whose BTF offset lies beyond the copy is read on its own.
pub struct SockHead {
    sk: u64,
    bytes: [u8; HEAD_LEN],
}

impl SockHead {
    #[inline(always)]
    pub fn read(sk: u64) -> Result<SockHead, i64> {
        let mut h = SockHead { sk, bytes: [0; HEAD_LEN] };
        read_buf(sk, 0, &mut h.bytes)?;
        Ok(h)
    }

    /// The `T` at `offset` of the socket.
    #[inline(always)]
    pub fn get<T: Copy>(&self, offset: u32) -> Result<T, i64> {
        let at = offset as usize;
        if at + size_of::<T>() <= HEAD_LEN {
            // SAFETY: within the copy (checked above); an unaligned read of plain bytes.
            Ok(unsafe { core::ptr::read_unaligned(self.bytes.as_ptr().add(at).cast::<T>()) })
        } else {
            read(self.sk, offset)
        }
    }

    #[inline(always)]
    pub fn family(&self) -> Result<u16, i64> {
        self.get(off!(skc_family))
    }

    /// Whether it is an IPv4/IPv6 TCP socket (the protocol is outside `sock_common`: one read).
    #[inline(always)]
    pub fn is_inet_tcp(&self) -> Result<bool, i64> {
        let family = self.family()?;
        if family != AF_INET && family != AF_INET6 {
            return Ok(false);
        }
        let protocol: u16 = read(self.sk, off!(sk_protocol))?;
        Ok(protocol == IPPROTO_TCP)
    }

    /// Family, netns and local port: all a listener's kernel rows are keyed and labelled by.
    #[inline(always)]
    pub fn fill_row_key(&self, ev: &mut Event) -> Result<(), i64> {
        ev.family = self.family()?;
        ev.lport = self.get(off!(skc_num))?;
        let net: u64 = self.get(off!(skc_net))?;
        ev.netns = read(net, off!(net_ns_inum))?;
        Ok(())
    }

    /// Family, netns and the local side (address, port).
    #[inline(always)]
    pub fn fill_local(&self, ev: &mut Event) -> Result<(), i64> {
        self.fill_row_key(ev)?;
        if ev.family == AF_INET6 {
            ev.laddr = self.get(off!(skc_v6_rcv_saddr))?;
        } else {
            let a: [u8; 4] = self.get(off!(skc_rcv_saddr))?;
            ev.laddr[..4].copy_from_slice(&a);
        }
        Ok(())
    }
}

/// Fills family, netns and the local side (address, port) from `sk`'s `sock_common`.
#[inline(always)]
pub fn fill_local(ev: &mut Event, sk: u64) -> Result<(), i64> {
    SockHead::read(sk)?.fill_local(ev)
}

/// Fills the remote side (address, port) from `sk`'s `sock_common` (two reads: no second
/// [`SockHead`] on the stack beside the listener's).
#[inline(always)]
pub fn fill_remote(ev: &mut Event, sk: u64) -> Result<(), i64> {
    let dport: u16 = read(sk, off!(skc_dport))?;
    ev.rport = u16::from_be(dport);
    if ev.family == AF_INET6 {
        read_buf(sk, off!(skc_v6_daddr), &mut ev.raddr)?;
    } else {
        read_buf(sk, off!(skc_daddr), &mut ev.raddr[..4])?;
    }
    Ok(())
}

/// Where a received segment's IP and TCP headers are, and its IP version (4 or 6).
#[inline(always)]
fn packet_headers(skb: u64) -> Result<(u64, u64, u8), i64> {
    let head: u64 = read(skb, off!(skb_head))?;
    let nh: u16 = read(skb, off!(skb_network_header))?;
    let th: u16 = read(skb, off!(skb_transport_header))?;
    let ip = head + u64::from(nh);
    let version: u8 = read(ip, 0)?;
    Ok((ip, head + u64::from(th), version >> 4))
}

/// Fills the remote side from a received segment (source address and port of the packet).
#[inline(always)]
pub fn fill_remote_from_skb(ev: &mut Event, skb: u64) -> Result<(), i64> {
    let (ip, tcp, version) = packet_headers(skb)?;
    if version == 6 {
        read_buf(ip, 8, &mut ev.raddr)?;
    } else {
        read_buf(ip, 12, &mut ev.raddr[..4])?;
    }
    let sport: u16 = read(tcp, 0)?;
    ev.rport = u16::from_be(sport);
    Ok(())
}

/// Netns inode of a packet without a socket, from its device (0 when it has none).
#[inline(always)]
pub fn packet_netns(skb: u64) -> Result<u32, i64> {
    let mut dev: u64 = read(skb, off!(skb_dev))?;
    if dev == 0 {
        // TCP has cleared skb->dev by now (and locally sent packets get it only at ip_output);
        // the route still names the device.
        let refdst: u64 = read(skb, off!(skb_refdst))?;
        let dst = refdst & !1;
        if dst != 0 {
            dev = read(dst, off!(dst_dev))?;
        }
    }
    if dev == 0 {
        return Ok(0);
    }
    let net: u64 = read(dev, off!(netdev_nd_net))?;
    read(net, off!(net_ns_inum))
}

/// A TCP segment's addresses (network order, IPv4 in the first 4 bytes), ports and flags byte.
pub struct TcpPacket {
    pub family: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
}

/// The TCP header of `skb`, or `None` when it is not TCP over IPv4/IPv6 (IPv6 extension headers
/// are not followed: such packets are skipped).
#[inline(always)]
pub fn tcp_packet(skb: u64) -> Result<Option<TcpPacket>, i64> {
    let (ip, tcp, version) = packet_headers(skb)?;
    let mut p = TcpPacket { family: AF_INET, saddr: [0; 16], daddr: [0; 16], sport: 0, dport: 0, flags: 0 };
    if version == 6 {
        let next: u8 = read(ip, 6)?;
        if u16::from(next) != IPPROTO_TCP {
            return Ok(None);
        }
        p.family = AF_INET6;
        read_buf(ip, 8, &mut p.saddr)?;
        read_buf(ip, 24, &mut p.daddr)?;
    } else if version == 4 {
        let proto: u8 = read(ip, 9)?;
        if u16::from(proto) != IPPROTO_TCP {
            return Ok(None);
        }
        read_buf(ip, 12, &mut p.saddr[..4])?;
        read_buf(ip, 16, &mut p.daddr[..4])?;
    } else {
        return Ok(None);
    }
    let head: [u8; 14] = read(tcp, 0)?;
    p.sport = u16::from_be_bytes([head[0], head[1]]);
    p.dport = u16::from_be_bytes([head[2], head[3]]);
    p.flags = head[13];
    Ok(Some(p))
}

/// Both sides and the netns from a received segment alone (no socket): local = destination.
#[inline(always)]
pub fn fill_from_packet(ev: &mut Event, skb: u64) -> Result<(), i64> {
    let netns = packet_netns(skb)?;
    if netns != 0 {
        ev.netns = netns;
    }
    let (ip, tcp, version) = packet_headers(skb)?;
    if version == 6 {
        ev.family = AF_INET6;
        read_buf(ip, 8, &mut ev.raddr)?;
        read_buf(ip, 24, &mut ev.laddr)?;
    } else {
        ev.family = AF_INET;
        read_buf(ip, 12, &mut ev.raddr[..4])?;
        read_buf(ip, 16, &mut ev.laddr[..4])?;
    }
    let ports: [u8; 4] = read(tcp, 0)?;
    ev.rport = u16::from_be_bytes([ports[0], ports[1]]);
    ev.lport = u16::from_be_bytes([ports[2], ports[3]]);
    Ok(())
}

/// IP version (4 or 6) of a received segment.
#[inline(always)]
pub fn skb_ip_version(skb: u64) -> Result<u8, i64> {
    packet_headers(skb).map(|(_, _, version)| version)
}

/// Accept-queue length and limit of a listener.
#[inline(always)]
pub fn fill_queue(ev: &mut Event, listener: u64) -> Result<(), i64> {
    (ev.queue_len, ev.queue_max) = accept_queue(listener)?;
    ev.flags |= flags::HAS_QUEUE;
    Ok(())
}

/// `(sk_ack_backlog, sk_max_ack_backlog)`: one read where they are adjacent (every kernel since
/// 5.0), else two.
#[inline(always)]
pub fn accept_queue(listener: u64) -> Result<(u32, u32), i64> {
    let len_at = off!(sk_ack_backlog);
    if off!(sk_max_ack_backlog) == len_at.wrapping_add(4) {
        let both: [u32; 2] = read(listener, len_at)?;
        return Ok((both[0], both[1]));
    }
    Ok((read(listener, len_at)?, read(listener, off!(sk_max_ack_backlog))?))
}

/// `sk_acceptq_is_full`: the kernel drops when `sk_ack_backlog > sk_max_ack_backlog`.
#[inline(always)]
pub fn accept_queue_full(listener: u64) -> Result<bool, i64> {
    let (len, max) = accept_queue(listener)?;
    Ok(len > max)
}

/// pid, tid and comm of the current task (only meaningful in syscall context).
#[inline(always)]
pub fn fill_task(ev: &mut Event) {
    fill_task_ids(ev);
    fill_comm(ev);
}

/// pid and tid of the current task, without its name (see [`fill_comm`]).
#[inline(always)]
pub fn fill_task_ids(ev: &mut Event) {
    let id = bpf_get_current_pid_tgid();
    ev.pid = (id >> 32) as u32;
    ev.tid = id as u32;
    ev.flags |= flags::HAS_TASK;
}

/// The current task's name (`comm`); left empty when the helper fails.
#[inline(always)]
pub fn fill_comm(ev: &mut Event) {
    ev.comm = current_comm();
}

/// The current task's name (`comm`), all zero when the helper fails.
#[inline(always)]
pub fn current_comm() -> [u8; TASK_COMM_LEN] {
    bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN])
}

/// Socket behind file descriptor `fd` of the current task:
/// task → files → fdt → fd[fd] → file → private_data (struct socket) → sk.
#[inline(always)]
pub fn sock_of_fd(fd: i64) -> Result<u64, i64> {
    sock_in(&FdTable::current()?, fd)
}

/// The current task's file-descriptor table: read once for several fds.
pub struct FdTable {
    fd_array: u64,
    max_fds: u32,
}

impl FdTable {
    #[inline(always)]
    pub fn current() -> Result<FdTable, i64> {
        // SAFETY: no preconditions.
        let task = unsafe { bpf_get_current_task() };
        let files: u64 = read(task, off!(task_files))?;
        let fdt: u64 = read(files, off!(files_fdt))?;
        let max_at = off!(fdt_max_fds);
        // `struct fdtable` starts `unsigned int max_fds; struct file **fd;`: one read for both.
        if off!(fdt_fd) == max_at.wrapping_add(8) {
            let both: FdtHead = read(fdt, max_at)?;
            return Ok(FdTable { max_fds: both.max_fds, fd_array: both.fd });
        }
        Ok(FdTable { max_fds: read(fdt, max_at)?, fd_array: read(fdt, off!(fdt_fd))? })
    }
}

impl FdTable {
    /// The table of `task`, a BTF pointer (`bpf_get_current_task_btf`): task → files → fdt walked
    /// with plain loads, which the verifier checks against the kernel's BTF and turns into
    /// fault-tolerant loads, instead of one helper call each.
    #[inline(always)]
    pub fn of_task_btf(task: *const u8) -> Result<FdTable, i64> {
        let (files_at, fdt_at) = (off!(task_files) as usize, off!(files_fdt) as usize);
        let (max_at, fd_at) = (off!(fdt_max_fds) as usize, off!(fdt_fd) as usize);
        // SAFETY (each load): the verifier checks it against the kernel's BTF, whose offsets
        // these are, and makes it a fault-tolerant load.
        let files = unsafe { core::ptr::read(task.add(files_at).cast::<*const u8>()) };
        if files.is_null() {
            return Err(-1);
        }
        // SAFETY: as above.
        let fdt = unsafe { core::ptr::read(files.add(fdt_at).cast::<*const u8>()) };
        if fdt.is_null() {
            return Err(-1);
        }
        // SAFETY: as above.
        let (max_fds, fd_array) = unsafe { (core::ptr::read(fdt.add(max_at).cast::<u32>()), core::ptr::read(fdt.add(fd_at).cast::<u64>())) };
        Ok(FdTable { max_fds, fd_array })
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct FdtHead {
    max_fds: u32,
    _pad: u32,
    fd: u64,
}

/// An open socket: its `struct sock` and the `struct socket` around it.
pub struct OpenSocket {
    pub sk: u64,
    pub socket: u64,
}

impl OpenSocket {
    /// Inode number of the socket (what sock_diag and /proc/PID/fd report): `struct socket` sits
    /// in `struct socket_alloc` beside its inode. 0 when the kernel's BTF has no such layout.
    #[inline(always)]
    pub fn ino(&self) -> u32 {
        if off!(inode_ino) == KernelOffsets::ABSENT {
            return 0;
        }
        read::<u64>(self.socket, off!(socket_alloc_inode) + off!(inode_ino)).map_or(0, |ino| ino as u32)
    }
}

/// The `struct sock` behind `fd` in `table`.
#[inline(always)]
pub fn sock_in(table: &FdTable, fd: i64) -> Result<u64, i64> {
    socket_in(table, fd).map(|s| s.sk)
}

/// The socket behind `fd` in `table`: fd → file → private_data (`struct socket`) → sk.
#[inline(always)]
pub fn socket_in(table: &FdTable, fd: i64) -> Result<OpenSocket, i64> {
    if fd < 0 || fd as u64 >= u64::from(table.max_fds) {
        return Err(-1);
    }
    let file: u64 = read(table.fd_array, (fd as u32) * 8)?;
    let socket: u64 = read(file, off!(file_private_data))?;
    let sk: u64 = read(socket, off!(socket_sk))?;
    if sk == 0 { Err(-1) } else { Ok(OpenSocket { sk, socket }) }
}

/// Arguments of a tracing context (tp_btf, raw_tp, fentry), so one body serves every variant.
pub trait Args {
    fn arg_u64(&self, n: usize) -> u64;
}

impl Args for aya_ebpf::programs::BtfTracePointContext {
    #[inline(always)]
    fn arg_u64(&self, n: usize) -> u64 {
        self.arg(n)
    }
}

impl Args for aya_ebpf::programs::RawTracePointContext {
    #[inline(always)]
    fn arg_u64(&self, n: usize) -> u64 {
        self.arg(n)
    }
}

impl Args for aya_ebpf::programs::FEntryContext {
    #[inline(always)]
    fn arg_u64(&self, n: usize) -> u64 {
        self.arg(n)
    }
}

impl Args for aya_ebpf::programs::ProbeContext {
    #[inline(always)]
    fn arg_u64(&self, n: usize) -> u64 {
        self.arg(n).unwrap_or(0)
    }
}
