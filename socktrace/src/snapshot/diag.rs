//! `NETLINK_SOCK_DIAG` (`inet_diag`) dumps of TCP sockets: one request per address family, or
//! one for both ([`BOTH_FAMILIES`]), the kernel's answer decoded with netlink-packet-sock-diag
//! into [`Record`]s. A diag socket answers for the network namespace it was created in; choosing
//! and entering namespaces is [`super::netns`]'s job, not this module's.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::mpsc,
};

use netlink_packet_core::{
    DefaultNla, Emitable as _, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator,
    Parseable as _,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    SOCK_DIAG_BY_FAMILY,
    constants::{AF_INET, AF_INET6, INET_DIAG_CONG, INET_DIAG_INFO, INET_DIAG_SHUTDOWN, INET_DIAG_SKMEMINFO, IPPROTO_TCP},
    inet::{
        ExtensionFlags, InetRequest, InetResponseBuffer, InetResponseHeader, SocketId, StateFlags,
        nlas::{Nla, TcpInfo},
    },
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("opening a NETLINK_SOCK_DIAG socket: {0}")]
    Open(io::Error),
    #[error("sending the sock_diag dump request: {0}")]
    Send(io::Error),
    #[error("reading the sock_diag dump: {0}")]
    Recv(io::Error),
    #[error("the kernel refused the sock_diag dump: {0}")]
    Kernel(io::Error),
    #[error("decoding the sock_diag dump: {0}")]
    Decode(String),
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
}

/// `TCP_NEW_SYN_RECV`: request sockets, which the kernel reports as `SYN_RECV`.
const TCP_NEW_SYN_RECV: u32 = 12;

impl TcpState {
    pub const ALL: [TcpState; 11] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
    ];

    pub fn from_kernel(v: u8) -> Option<TcpState> {
        TcpState::ALL.into_iter().find(|s| *s as u8 == v)
    }

    /// ss's name for the state, lower case with dashes (`established` where ss abbreviates).
    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "established",
            TcpState::SynSent => "syn-sent",
            TcpState::SynRecv => "syn-recv",
            TcpState::FinWait1 => "fin-wait-1",
            TcpState::FinWait2 => "fin-wait-2",
            TcpState::TimeWait => "time-wait",
            TcpState::Close => "unconn",
            TcpState::CloseWait => "close-wait",
            TcpState::LastAck => "last-ack",
            TcpState::Listen => "listen",
            TcpState::Closing => "closing",
        }
    }

    /// The state's bit in an `inet_diag` `idiag_states` mask.
    pub fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// The `inet_diag` state mask for a set of states (SYN-RECV also asks for request sockets).
pub fn state_mask(states: impl IntoIterator<Item = TcpState>) -> u32 {
    let mut mask = 0;
    for s in states {
        mask |= s.bit();
        if s == TcpState::SynRecv {
            mask |= 1 << TCP_NEW_SYN_RECV;
        }
    }
    mask
}

/// The `tcp_info` fields `ss -i` shows. `None` when the kernel reports nothing meaningful
/// (listeners, no RTT sample yet, infinite ssthresh).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    pub rtt_us: Option<u32>,
    pub rttvar_us: Option<u32>,
    pub min_rtt_us: Option<u32>,
    pub rto_us: Option<u32>,
    pub cwnd: Option<u32>,
    pub ssthresh: Option<u32>,
    pub mss: Option<u32>,
    /// Retransmitted segments over the connection's life (`tcpi_total_retrans`).
    pub retrans: Option<u32>,
    /// Unrecovered retransmit timeouts right now (`tcpi_retransmits`).
    pub retrans_now: Option<u8>,
    pub unacked: Option<u32>,
    pub lost: Option<u32>,
    pub bytes_sent: Option<u64>,
    pub bytes_acked: Option<u64>,
    pub bytes_received: Option<u64>,
    pub bytes_retrans: Option<u64>,
}

/// One socket as the kernel reported it.
#[derive(Clone, Debug)]
pub struct Record {
    pub state: TcpState,
    /// LISTEN: accept queue length; others: bytes not yet read.
    pub recv_q: u32,
    /// LISTEN: backlog (max accept queue); others: bytes not yet acknowledged.
    pub send_q: u32,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Bound interface (`SO_BINDTODEVICE`), 0 if none.
    pub ifindex: u32,
    pub uid: u32,
    /// 0 for sockets without a file (TIME-WAIT, SYN-RECV request sockets).
    pub inode: u32,
    /// The kernel's socket cookie (`sock_gen_cookie`, what `bpf_get_socket_cookie` returns).
    pub cookie: u64,
    /// `sk_drops` (`SK_MEMINFO_DROPS`), when asked for ([`DumpOptions::meminfo`]).
    pub drops: Option<u32>,
    /// A full socket (the kernel attached `INET_DIAG_SHUTDOWN`). TIME-WAIT and request (SYN-RECV)
    /// sockets are minisocks without an owner uid or counters.
    pub full: bool,
    pub tcp: Option<Box<TcpStats>>,
    pub congestion: Option<String>,
}

/// What to ask the kernel for.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// `AF_INET`, `AF_INET6` or [`BOTH_FAMILIES`].
    pub family: u8,
    /// `inet_diag` state mask ([`state_mask`]).
    pub states: u32,
    /// Also `tcp_info` and the congestion-control name (`-i`).
    pub info: bool,
}

/// How a dump is made beyond what it selects ([`DiagSocket::dump_with`]).
#[derive(Clone, Copy, Debug)]
pub struct DumpOptions {
    /// Also socket memory counters (`INET_DIAG_SKMEMINFO`), for `sk_drops`. They cost the kernel
    /// an attribute per socket, so `snapshot` asks for them in the listener dump only.
    pub meminfo: bool,
    /// Only one half of the sockets (see [`Split`]).
    pub split: Option<Split>,
}

/// One half of a socket table cut by ports, so two dumps can fill it on two cores at once (the
/// kernel fills one dump on one core; with 100k sockets that is most of the run time).
///
/// With `a = sport < port` and `b = dport < port`, one half is `a == b`, the other `a != b`.
/// With `port` in the middle of the ephemeral range, every connection has one end whose port is
/// spread across that range: a server's accepted sockets split on their peer's port, a client's
/// on their own, a loopback pair falls wholly in one half chosen by its ephemeral port. Listeners
/// are dumped separately and never split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    pub port: u16,
    pub same: bool,
}

impl Split {
    /// The filter as `inet_diag` bytecode (`INET_DIAG_REQ_BYTECODE`; netlink-packet-sock-diag does
    /// not model it). Ops are `struct inet_diag_bc_op { u8 code; u8 yes; u16 no; }`; a port test
    /// is followed by an op whose `no` holds the port. Falling off the end accepts, landing 4 bytes
    /// past it rejects; the kernel's audit follows the `yes` chain, which must end exactly at the end.
    fn bytecode(self) -> Vec<u8> {
        const JMP: u8 = 1;
        const D_GE: u8 = 4;
        const D_LE: u8 = 5;
        const S_LE: u8 = 3;
        const LEN: u16 = 28;
        const REJECT: u16 = LEN + 4;
        let below = self.port.saturating_sub(1);
        // a true: accept iff (dport < port) == same; a false: accept iff (dport < port) != same.
        let (a_true, a_false) = if self.same { ((D_LE, below), (D_GE, self.port)) } else { ((D_GE, self.port), (D_LE, below)) };
        let mut bc = Vec::with_capacity(usize::from(LEN));
        let mut op = |at: u16, code: u8, yes: u16, no: u16, port: Option<u16>| {
            debug_assert_eq!(usize::from(at), bc.len());
            bc.extend([code, u8::try_from(yes).unwrap_or(0)]);
            bc.extend(no.saturating_sub(at).to_ne_bytes());
            if let Some(p) = port {
                bc.extend([0, 0]);
                bc.extend(p.to_ne_bytes());
            }
        };
        // @0: sport <= port-1 ? @8 : @20
        op(0, S_LE, 8, 20, Some(below));
        // @8 (a): the dport test; pass → @16, fail → reject
        op(8, a_true.0, 8, REJECT, Some(a_true.1));
        // @16: unconditional jump (taken through `no`) to the end: accept. `yes` only feeds the audit.
        op(16, JMP, 4, LEN, None);
        // @20 (not a): the dport test; pass → end (accept), fail → reject
        op(20, a_false.0, 8, REJECT, Some(a_false.1));
        bc
    }
}

pub const FAMILIES: [u8; 2] = [AF_INET, AF_INET6];

/// [`Request::family`] for both families in one dump: one walk of the kernel's socket tables
/// instead of one per family. A dump by family (`SOCK_DIAG_BY_FAMILY`) cannot say "any family";
/// inet_diag's original request (`TCPDIAG_GETSOCK`, `struct inet_diag_req`, what every kernel
/// still answers) dumps `AF_UNSPEC`, with the same extensions, states and bytecode filter.
pub const BOTH_FAMILIES: u8 = 0;

/// `TCPDIAG_GETSOCK` (`linux/inet_diag.h`): the request type of [`BOTH_FAMILIES`], and the type of
/// its answer's socket messages.
const TCPDIAG_GETSOCK: u16 = 18;

/// A `NETLINK_SOCK_DIAG` socket, bound to the network namespace of the thread that opened it.
pub struct DiagSocket {
    socket: Socket,
    seq: u32,
}

/// The kernel sends at most ~32 KiB per dump datagram; twice that leaves room for any future change.
const RECV_BUF: usize = 64 * 1024;

impl DiagSocket {
    pub fn open() -> Result<DiagSocket, DiagError> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(DiagError::Open)?;
        socket.bind_auto().map_err(DiagError::Open)?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0)).map_err(DiagError::Open)?;
        Ok(DiagSocket { socket, seq: 0 })
    }

    /// Dumps every TCP socket of `req.family` in `req.states`, with memory counters (`drops`),
    /// appending to `out`.
    pub fn dump(&mut self, req: Request, out: &mut Vec<Record>) -> Result<(), DiagError> {
        self.dump_with(req, DumpOptions { meminfo: true, split: None }, |r| out.push(r))
    }

    /// Dumps every TCP socket of `req.family` in `req.states`, calling `each` for each one.
    ///
    /// The kernel does its share of the work (walking the socket tables, filling the next
    /// datagram) inside `recv`, so a reader thread receives while the calling thread decodes:
    /// on a large dump the two overlap instead of adding up.
    pub fn dump_with(&mut self, req: Request, opts: DumpOptions, mut each: impl FnMut(Record)) -> Result<(), DiagError> {
        self.send(req, opts)?;
        let seq = self.seq;
        let socket = &self.socket;
        let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(64);
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        std::thread::scope(|s| {
            let reader = s.spawn(move || -> Result<(), DiagError> {
                loop {
                    let mut buf = free_rx.try_recv().unwrap_or_else(|_| Vec::with_capacity(RECV_BUF));
                    buf.clear();
                    let n = socket.recv(&mut buf, 0).map_err(DiagError::Recv)?;
                    if n > buf.len() {
                        return Err(DiagError::Decode(format!("datagram of {n} bytes truncated to {}", buf.len())));
                    }
                    let last = ends_dump(&buf, seq);
                    if full_tx.send(buf).is_err() || last {
                        return Ok(());
                    }
                }
            });
            // Keep draining after an error so the reader never blocks on a full channel.
            let mut decoded: Result<bool, DiagError> = Ok(false);
            for buf in &full_rx {
                if matches!(decoded, Ok(false)) {
                    decoded = decode(&buf, seq, &mut each);
                }
                let _ = free_tx.send(buf);
            }
            let read = reader.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            match (decoded, read) {
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                (Ok(true), Ok(())) => Ok(()),
                (Ok(false), Ok(())) => Err(DiagError::Decode("dump ended without NLMSG_DONE".into())),
            }
        })
    }

    fn send(&mut self, req: Request, opts: DumpOptions) -> Result<(), DiagError> {
        self.seq = self.seq.wrapping_add(1);
        let mut extensions = ExtensionFlags::empty();
        if opts.meminfo {
            extensions |= ExtensionFlags::SKMEMINFO;
        }
        if req.info {
            extensions |= ExtensionFlags::INFO | ExtensionFlags::CONG;
        }
        let mut wire = if req.family == BOTH_FAMILIES {
            compat_request(self.seq, extensions.bits(), req.states)
        } else {
            let socket_id = if req.family == AF_INET6 { SocketId::new_v6() } else { SocketId::new_v4() };
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_DUMP;
            header.sequence_number = self.seq;
            let mut msg = NetlinkMessage::new(
                header,
                SockDiagMessage::InetRequest(InetRequest {
                    family: req.family,
                    protocol: IPPROTO_TCP,
                    extensions,
                    states: StateFlags::from_bits_retain(req.states),
                    socket_id,
                })
                .into(),
            );
            msg.finalize();
            let mut wire = vec![0; msg.buffer_len()];
            msg.serialize(&mut wire);
            wire
        };
        if let Some(split) = opts.split {
            // The request message's attribute: appended after the serialized request, with the
            // header's length field grown to match.
            const INET_DIAG_REQ_BYTECODE: u16 = 1;
            let nla = DefaultNla::new(INET_DIAG_REQ_BYTECODE, split.bytecode());
            let at = wire.len();
            wire.resize(at + nla.buffer_len(), 0);
            nla.emit(&mut wire[at..]);
            let len = u32::try_from(wire.len()).unwrap_or(u32::MAX);
            NetlinkBuffer::new(&mut wire[..]).set_length(len);
        }
        self.socket.send(&wire, 0).map_err(DiagError::Send)?;
        Ok(())
    }
}

/// A `TCPDIAG_GETSOCK` dump request for every family (netlink-packet-sock-diag models only
/// `SOCK_DIAG_BY_FAMILY`): `struct nlmsghdr`, then `struct inet_diag_req { u8 family, src_len,
/// dst_len, ext; struct inet_diag_sockid id (48 bytes); u32 states, dbs; }`, in host order. The
/// kernel ignores the family and the socket id of a dump.
fn compat_request(seq: u32, extensions: u8, states: u32) -> Vec<u8> {
    const HEADER: usize = 16;
    const REQ: usize = 4 + 48 + 4 + 4;
    let mut wire = Vec::with_capacity(HEADER + REQ);
    wire.extend(((HEADER + REQ) as u32).to_ne_bytes());
    wire.extend(TCPDIAG_GETSOCK.to_ne_bytes());
    wire.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    wire.extend(seq.to_ne_bytes());
    wire.extend(0u32.to_ne_bytes());
    wire.extend([BOTH_FAMILIES, 0, 0, extensions]);
    wire.extend([0u8; 48]);
    wire.extend(states.to_ne_bytes());
    wire.extend(0u32.to_ne_bytes());
    wire
}

/// Whether a datagram carries the end of dump `seq` (`NLMSG_DONE` or `NLMSG_ERROR`), or cannot be
/// framed at all (the decoder then reports why).
pub fn ends_dump(buf: &[u8], seq: u32) -> bool {
    let mut off = 0;
    while off < buf.len() {
        let Ok(msg) = NetlinkBuffer::new_checked(&buf[off..]) else { return true };
        if msg.sequence_number() == seq && matches!(msg.message_type(), NLMSG_DONE | NLMSG_ERROR) {
            return true;
        }
        off += (msg.length() as usize + 3) & !3;
    }
    false
}

/// Decodes one datagram; `Ok(true)` once the dump's `NLMSG_DONE` is seen.
///
/// Socket messages are decoded with the crate's header and per-attribute parsers rather than as a
/// whole `InetResponse`: that type carries its attributes inline (about 2 KiB with `rich_nlas`)
/// and boxes it, which with 100k sockets costs more than the kernel's dump. Attributes this
/// command does not use are skipped unparsed. Control messages go through `NetlinkMessage`.
pub fn decode(buf: &[u8], seq: u32, each: &mut impl FnMut(Record)) -> Result<bool, DiagError> {
    let bad = |e: netlink_packet_core::DecodeError| DiagError::Decode(e.to_string());
    let mut off = 0;
    while off < buf.len() {
        let msg = NetlinkBuffer::new_checked(&buf[off..]).map_err(bad)?;
        let len = msg.length() as usize;
        if len == 0 {
            break;
        }
        // NLMSG_ALIGN
        off += (len + 3) & !3;
        if msg.sequence_number() != seq {
            continue;
        }
        if matches!(msg.message_type(), SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK) {
            if let Some(rec) = record(msg.payload()).map_err(bad)? {
                each(rec);
            }
            continue;
        }
        match NetlinkMessage::<SockDiagMessage>::deserialize(msg.into_inner()).map_err(bad)?.payload {
            NetlinkPayload::Done(done) => {
                // The kernel's code is a negated errno; i32::MIN has no positive counterpart.
                return if done.code < 0 { Err(DiagError::Kernel(io::Error::from_raw_os_error(done.code.saturating_neg()))) } else { Ok(true) };
            }
            // Not `to_io()`: its `abs()` overflows on i32::MIN.
            NetlinkPayload::Error(e) => return Err(DiagError::Kernel(io::Error::from_raw_os_error(e.raw_code().saturating_abs()))),
            NetlinkPayload::Overrun(_) => return Err(DiagError::Decode("netlink overrun".into())),
            _ => {}
        }
    }
    Ok(false)
}

/// One `inet_diag_msg` and the attributes this command uses.
fn record(payload: &[u8]) -> Result<Option<Record>, netlink_packet_core::DecodeError> {
    const HEADER_LEN: usize = std::mem::size_of::<InetResponseBuffer>();
    let h = InetResponseHeader::parse(payload)?;
    let Some(state) = TcpState::from_kernel(h.state) else { return Ok(None) };
    let id = &h.socket_id;
    let mut rec = Record {
        state,
        recv_q: h.recv_queue,
        send_q: h.send_queue,
        local: SocketAddr::new(id.source_address, id.source_port),
        peer: SocketAddr::new(id.destination_address, id.destination_port),
        ifindex: id.interface_id,
        uid: h.uid,
        inode: h.inode,
        // idiag_cookie[2]: low 32 bits first, each in host order.
        cookie: u64::from_le_bytes(id.cookie),
        drops: None,
        full: false,
        tcp: None,
        congestion: None,
    };
    for nla in NlasIterator::new(payload.get(HEADER_LEN..).unwrap_or_default()) {
        let nla = nla?;
        // Full sockets always carry INET_DIAG_SHUTDOWN; minisocks at most INET_DIAG_MARK.
        rec.full |= nla.kind() == INET_DIAG_SHUTDOWN;
        if !matches!(nla.kind(), INET_DIAG_SKMEMINFO | INET_DIAG_INFO | INET_DIAG_CONG) {
            continue;
        }
        match Nla::parse(&nla)? {
            Nla::MemInfo(m) => rec.drops = Some(m.drops),
            Nla::TcpInfo(t) if state != TcpState::Listen => rec.tcp = Some(Box::new(stats(&t))),
            Nla::Congestion(c) => rec.congestion = Some(c),
            _ => {}
        }
    }
    Ok(Some(rec))
}

fn nonzero<T: Default + PartialEq>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

fn stats(t: &TcpInfo) -> TcpStats {
    TcpStats {
        rtt_us: nonzero(t.rtt),
        rttvar_us: (t.rtt != 0).then_some(t.rttvar),
        min_rtt_us: (t.min_rtt != u32::MAX).then_some(t.min_rtt).and_then(nonzero),
        rto_us: nonzero(t.rto),
        cwnd: nonzero(t.snd_cwnd),
        // TCP_INFINITE_SSTHRESH until the first loss.
        ssthresh: (t.snd_ssthresh < 0x7fff_ffff).then_some(t.snd_ssthresh),
        mss: nonzero(t.snd_mss),
        retrans: Some(t.total_retrans),
        retrans_now: Some(t.retransmits),
        unacked: Some(t.unacked),
        lost: Some(t.lost),
        bytes_sent: Some(t.bytes_sent),
        bytes_acked: Some(t.bytes_acked),
        bytes_received: Some(t.bytes_received),
        bytes_retrans: Some(t.bytes_retrans),
    }
}

/// Appends an address as ss prints it: `a.b.c.d` or `[v6]`, with `%ifindex` when bound to a device.
/// IPv4 is written by hand: `Ipv4Addr`'s `Display` was a tenth of the run time at 100k sockets.
pub fn push_addr(s: &mut String, ip: IpAddr, ifindex: u32) {
    use std::fmt::Write as _;
    match ip {
        IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if o >= 100 {
                    s.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    s.push(char::from(b'0' + o / 10 % 10));
                }
                s.push(char::from(b'0' + o % 10));
            }
        }
        IpAddr::V6(a) => {
            let _ = write!(s, "[{a}]");
        }
    }
    if ifindex != 0 {
        let _ = write!(s, "%{ifindex}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs the fuzz target `sock_diag` found: `done-code-i32-min` and `error-code-i32-min`, an
    /// `NLMSG_DONE` / `NLMSG_ERROR` whose error code is `i32::MIN` (negating it, or netlink-packet-core's
    /// `ErrorMessage::to_io`, overflowed). Each must decode to an error or records.
    #[test]
    fn fuzz_regressions_sock_diag() {
        for (name, bytes) in crate::offsets::tests::fuzz_regressions("sock_diag") {
            let seq = u32::from_ne_bytes(bytes[8..12].try_into().unwrap());
            let _ = ends_dump(&bytes, seq);
            let r = decode(&bytes, seq, &mut |_| {});
            if name.ends_with("-code-i32-min") {
                // Reported as the largest positive errno, not a wrapped negative one.
                assert!(matches!(&r, Err(DiagError::Kernel(e)) if e.raw_os_error() == Some(i32::MAX)), "{name}: {r:?}");
            }
        }
    }

    /// The both-families request is `struct nlmsghdr` + `struct inet_diag_req` (76 bytes) as the
    /// kernel's `inet_diag_rcv_msg_compat` reads it: family AF_UNSPEC, extensions, state mask.
    #[test]
    fn both_families_request_layout() {
        let wire = compat_request(7, 0b1001, 0x0fff);
        assert_eq!(wire.len(), 76);
        assert_eq!(u32::from_ne_bytes(wire[0..4].try_into().unwrap()), 76);
        assert_eq!(u16::from_ne_bytes(wire[4..6].try_into().unwrap()), 18);
        assert_eq!(u16::from_ne_bytes(wire[6..8].try_into().unwrap()), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(u32::from_ne_bytes(wire[8..12].try_into().unwrap()), 7);
        assert_eq!(&wire[16..20], &[0, 0, 0, 0b1001]);
        assert!(wire[20..68].iter().all(|b| *b == 0));
        assert_eq!(u32::from_ne_bytes(wire[68..72].try_into().unwrap()), 0x0fff);
        // Its answers carry the request's type: decoded like SOCK_DIAG_BY_FAMILY's.
        let mut answer = sample_answer(7);
        answer[4..6].copy_from_slice(&TCPDIAG_GETSOCK.to_ne_bytes());
        let mut n = 0;
        decode(&answer, 7, &mut |_| n += 1).unwrap();
        assert_eq!(n, 1);
    }

    /// One established IPv4 socket as `SOCK_DIAG_BY_FAMILY` answers it: `struct nlmsghdr` +
    /// `struct inet_diag_msg` (72 bytes), no attributes.
    fn sample_answer(seq: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(88u32.to_ne_bytes());
        m.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend(2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend(seq.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend([AF_INET, TcpState::Established as u8, 0, 0]);
        m.extend(8080u16.to_be_bytes());
        m.extend(40000u16.to_be_bytes());
        m.extend([127, 0, 0, 1]);
        m.extend([0; 12]);
        m.extend([127, 0, 0, 2]);
        m.extend([0; 12]);
        m.extend([0; 4 + 8]); // interface, cookie
        m.extend([0; 4 * 5]); // expires, rqueue, wqueue, uid, inode
        m
    }

    #[test]
    fn addresses_print_like_ss() {
        let mut s = String::new();
        for (ip, ifindex, want) in [
            ("0.0.0.0", 0, "0.0.0.0"),
            ("10.20.255.1", 0, "10.20.255.1"),
            ("127.0.0.1", 3, "127.0.0.1%3"),
            ("::1", 0, "[::1]"),
            ("::ffff:127.0.0.1", 0, "[::ffff:127.0.0.1]"),
        ] {
            s.clear();
            push_addr(&mut s, ip.parse().unwrap(), ifindex);
            assert_eq!(s, want);
        }
    }

    /// Runs bytecode the way the kernel's `inet_diag_bc_run` does (port ops and JMP only).
    fn run(bc: &[u8], sport: u16, dport: u16) -> bool {
        let mut at = 0usize;
        let mut len = isize::try_from(bc.len()).unwrap();
        while len > 0 {
            let (code, yes, no) = (bc[at], bc[at + 1], u16::from_ne_bytes([bc[at + 2], bc[at + 3]]));
            let port = || u16::from_ne_bytes([bc[at + 6], bc[at + 7]]);
            let hit = match code {
                1 => false,
                3 => sport <= port(),
                4 => dport >= port(),
                5 => dport <= port(),
                other => panic!("op {other}"),
            };
            let step = if hit { usize::from(yes) } else { usize::from(no) };
            at += step;
            len -= isize::try_from(step).unwrap();
        }
        len == 0
    }

    /// The kernel's audit: the `yes` chain must end exactly at the end; jumps stay in bounds.
    fn audit(bc: &[u8]) -> bool {
        let mut at = 0usize;
        let mut chain = vec![];
        while at < bc.len() {
            chain.push(at);
            let (code, yes, no) = (bc[at], usize::from(bc[at + 1]), usize::from(u16::from_ne_bytes([bc[at + 2], bc[at + 3]])));
            let min = if code == 1 { 4 } else { 8 };
            let len = bc.len() - at;
            if yes < min || yes > len + 4 || no < min || no > len + 4 || yes % 4 != 0 || no % 4 != 0 {
                return false;
            }
            at += yes;
        }
        at == bc.len()
    }

    #[test]
    fn split_halves_partition_every_port_pair() {
        let port = 46884;
        let same = Split { port, same: true }.bytecode();
        let differ = Split { port, same: false }.bytecode();
        assert!(audit(&same) && audit(&differ));
        for sport in [0, 1, 443, port - 1, port, port + 1, 60999, 65535] {
            for dport in [0, 22, 8080, port - 1, port, 50000, 65535] {
                let (a, b) = (run(&same, sport, dport), run(&differ, sport, dport));
                assert!(a != b, "{sport}->{dport} must be in exactly one half");
                assert_eq!(a, (sport < port) == (dport < port), "{sport}->{dport}");
            }
        }
    }

    #[test]
    fn state_masks() {
        assert_eq!(state_mask([TcpState::Listen]), 1 << 10);
        assert_eq!(state_mask([TcpState::SynRecv]), (1 << 3) | (1 << 12), "SYN-RECV includes request sockets");
        assert_eq!(TcpState::from_kernel(1), Some(TcpState::Established));
        assert_eq!(TcpState::from_kernel(12), None);
        assert_eq!(TcpState::FinWait1.name(), "fin-wait-1");
    }
}
