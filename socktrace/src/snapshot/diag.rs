//! `NETLINK_SOCK_DIAG` (`inet_diag`) dumps of TCP sockets: one request per address family, the
//! kernel's answer decoded with netlink-packet-sock-diag into [`Record`]s. A diag socket answers
//! for the network namespace it was created in; choosing and entering namespaces is
//! [`super::netns`]'s job, not this module's.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{
        ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags,
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
    /// `sk_drops` (`SK_MEMINFO_DROPS`); `None` for sockets without a full `struct sock`.
    pub drops: Option<u32>,
    pub tcp: Option<TcpStats>,
    pub congestion: Option<String>,
}

/// What to ask the kernel for.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// `inet_diag` state mask ([`state_mask`]).
    pub states: u32,
    /// Also `tcp_info` and the congestion-control name (`-i`).
    pub info: bool,
}

pub const FAMILIES: [u8; 2] = [AF_INET, AF_INET6];

/// A `NETLINK_SOCK_DIAG` socket, bound to the network namespace of the thread that opened it.
pub struct DiagSocket {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// The kernel sends at most ~32 KiB per dump datagram; twice that leaves room for any future change.
const RECV_BUF: usize = 64 * 1024;

impl DiagSocket {
    pub fn open() -> Result<DiagSocket, DiagError> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(DiagError::Open)?;
        socket.bind_auto().map_err(DiagError::Open)?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0)).map_err(DiagError::Open)?;
        Ok(DiagSocket { socket, seq: 0, buf: Vec::with_capacity(RECV_BUF) })
    }

    /// Dumps every TCP socket of `req.family` in `req.states`, appending to `out`.
    pub fn dump(&mut self, req: Request, out: &mut Vec<Record>) -> Result<(), DiagError> {
        self.seq = self.seq.wrapping_add(1);
        let mut extensions = ExtensionFlags::SKMEMINFO;
        if req.info {
            extensions |= ExtensionFlags::INFO | ExtensionFlags::CONG;
        }
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
        self.socket.send(&wire, 0).map_err(DiagError::Send)?;

        loop {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0).map_err(DiagError::Recv)?;
            if n > self.buf.len() {
                return Err(DiagError::Decode(format!("datagram of {n} bytes truncated to {}", self.buf.len())));
            }
            let mut off = 0;
            while off < self.buf.len() {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buf[off..])
                    .map_err(|e| DiagError::Decode(e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                // NLMSG_ALIGN
                off += (len + 3) & !3;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        if let Some(rec) = record(&r) {
                            out.push(rec);
                        }
                    }
                    NetlinkPayload::Done(done) => {
                        return if done.code < 0 {
                            Err(DiagError::Kernel(io::Error::from_raw_os_error(-done.code)))
                        } else {
                            Ok(())
                        };
                    }
                    NetlinkPayload::Error(e) => return Err(DiagError::Kernel(e.to_io())),
                    NetlinkPayload::Overrun(_) => return Err(DiagError::Decode("netlink overrun".into())),
                    _ => {}
                }
            }
        }
    }
}

fn record(r: &InetResponse) -> Option<Record> {
    let h = &r.header;
    let state = TcpState::from_kernel(h.state)?;
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
        drops: None,
        tcp: None,
        congestion: None,
    };
    for nla in &r.nlas {
        match nla {
            Nla::MemInfo(m) => rec.drops = Some(m.drops),
            Nla::TcpInfo(t) if state != TcpState::Listen => rec.tcp = Some(stats(t)),
            Nla::Congestion(c) => rec.congestion = Some(c.clone()),
            _ => {}
        }
    }
    Some(rec)
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
pub fn push_addr(s: &mut String, ip: IpAddr, ifindex: u32) {
    use std::fmt::Write as _;
    let _ = match ip {
        IpAddr::V4(a) => write!(s, "{a}"),
        IpAddr::V6(a) => write!(s, "[{a}]"),
    };
    if ifindex != 0 {
        let _ = write!(s, "%{ifindex}");
    }
}
