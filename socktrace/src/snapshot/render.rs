//! `snapshot` output: an ss-style aligned table (listeners first, with their columns named for
//! what they hold: accept queue, backlog, drops; then every other socket), or a JSON array with
//! one object per socket where anything the kernel did not report is `null`, never 0.

use std::{
    fmt::Write as _,
    io::{self, Write},
    net::IpAddr,
};

use serde::Serialize;

use super::{
    NsSockets,
    diag::{Record, TcpState, push_addr},
    netns::Netns,
    procs::Owners,
};

#[derive(Serialize)]
struct JsonProcess<'a> {
    pid: u32,
    comm: &'a str,
    fd: u32,
}

#[derive(Serialize)]
struct JsonInfo<'a> {
    rtt_us: Option<u32>,
    rttvar_us: Option<u32>,
    min_rtt_us: Option<u32>,
    rto_us: Option<u32>,
    cwnd: Option<u32>,
    ssthresh: Option<u32>,
    mss: Option<u32>,
    retrans: Option<u32>,
    retrans_now: Option<u8>,
    unacked: Option<u32>,
    lost: Option<u32>,
    bytes_sent: Option<u64>,
    bytes_acked: Option<u64>,
    bytes_received: Option<u64>,
    bytes_retrans: Option<u64>,
    congestion: Option<&'a str>,
}

#[derive(Serialize)]
struct JsonRow<'a> {
    state: &'static str,
    /// LISTEN: accept queue; others: bytes received not yet read.
    recv_q: u32,
    /// LISTEN: backlog; others: bytes sent not yet acknowledged.
    send_q: u32,
    laddr: IpAddr,
    lport: u16,
    /// `null` for listeners (no peer).
    raddr: Option<IpAddr>,
    rport: Option<u16>,
    ifindex: Option<u32>,
    netns: u32,
    netns_name: Option<&'a str>,
    inode: Option<u32>,
    uid: Option<u32>,
    processes: Vec<JsonProcess<'a>>,
    drops: Option<u32>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    info: Option<JsonInfo<'a>>,
}

fn json_row<'a>(ns: &'a Netns, r: &'a Record, owners: &'a Owners, info: bool) -> JsonRow<'a> {
    let listener = r.state == TcpState::Listen;
    // TIME-WAIT and request sockets are not full sockets: no owner uid, no attributes.
    let full = r.drops.is_some();
    let t = r.tcp.as_ref();
    JsonRow {
        state: r.state.name(),
        recv_q: r.recv_q,
        send_q: r.send_q,
        laddr: r.local.ip(),
        lport: r.local.port(),
        raddr: (!listener).then_some(r.peer.ip()),
        rport: (!listener).then_some(r.peer.port()),
        ifindex: (r.ifindex != 0).then_some(r.ifindex),
        netns: ns.inode,
        netns_name: ns.name.as_deref(),
        inode: (r.inode != 0).then_some(r.inode),
        uid: full.then_some(r.uid),
        processes: owners.of(r.inode).map(|(p, fd)| JsonProcess { pid: p.pid, comm: &p.comm, fd }).collect(),
        drops: r.drops,
        info: info.then(|| JsonInfo {
            rtt_us: t.and_then(|t| t.rtt_us),
            rttvar_us: t.and_then(|t| t.rttvar_us),
            min_rtt_us: t.and_then(|t| t.min_rtt_us),
            rto_us: t.and_then(|t| t.rto_us),
            cwnd: t.and_then(|t| t.cwnd),
            ssthresh: t.and_then(|t| t.ssthresh),
            mss: t.and_then(|t| t.mss),
            retrans: t.and_then(|t| t.retrans),
            retrans_now: t.and_then(|t| t.retrans_now),
            unacked: t.and_then(|t| t.unacked),
            lost: t.and_then(|t| t.lost),
            bytes_sent: t.and_then(|t| t.bytes_sent),
            bytes_acked: t.and_then(|t| t.bytes_acked),
            bytes_received: t.and_then(|t| t.bytes_received),
            bytes_retrans: t.and_then(|t| t.bytes_retrans),
            congestion: r.congestion.as_deref(),
        }),
    }
}

/// A JSON array, one object per line.
pub fn json(out: &mut impl Write, found: &[NsSockets], owners: &Owners, info: bool) -> io::Result<()> {
    let mut w = io::BufWriter::with_capacity(1 << 16, out);
    w.write_all(b"[")?;
    let mut first = true;
    for ns in found {
        for r in ns.records.iter().filter(|r| r.state == TcpState::Listen).chain(ns.records.iter().filter(|r| r.state != TcpState::Listen)) {
            w.write_all(if first { b"\n" } else { b",\n" })?;
            first = false;
            serde_json::to_writer(&mut w, &json_row(&ns.ns, r, owners, info))?;
        }
    }
    w.write_all(b"\n]\n")?;
    w.flush()
}

/// How a column is aligned; `Addr` cells are `address:port`, printed ss-style with the address
/// right-aligned and the port left-aligned around the colon.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
    Addr,
}

/// Rows of cells stored in one string (no allocation per cell), with column widths.
struct Grid {
    headers: Vec<(&'static str, Align)>,
    text: String,
    /// Per row, per column: end offset in `text` (the start is the previous cell's end); for `Addr`
    /// columns two entries, address then port.
    ends: Vec<usize>,
    /// Per column: width (for `Addr`, address part and port part).
    widths: Vec<(usize, usize)>,
    stride: usize,
}

impl Grid {
    fn new(headers: Vec<(&'static str, Align)>) -> Grid {
        let stride = headers.iter().map(|(_, a)| if *a == Align::Addr { 2 } else { 1 }).sum();
        let widths = headers
            .iter()
            .map(|(h, a)| if *a == Align::Addr { h.split_once(':').map_or((h.len(), 0), |(x, y)| (x.len(), y.len())) } else { (h.len(), 0) })
            .collect();
        Grid { headers, text: String::new(), ends: Vec::new(), widths, stride }
    }

    fn rows(&self) -> usize {
        self.ends.len() / self.stride.max(1)
    }

    /// Appends one part of a cell, written by `f` straight into the shared buffer.
    fn part(&mut self, f: impl FnOnce(&mut String)) -> usize {
        let start = self.text.len();
        f(&mut self.text);
        self.ends.push(self.text.len());
        self.text[start..].chars().count()
    }

    fn cell(&mut self, col: usize, f: impl FnOnce(&mut String)) {
        let n = self.part(f);
        self.widths[col].0 = self.widths[col].0.max(n);
    }

    fn addr(&mut self, col: usize, ip: IpAddr, ifindex: u32, port: Option<u16>) {
        let a = self.part(|s| push_addr(s, ip, ifindex));
        let p = self.part(|s| match port {
            Some(p) => {
                let _ = write!(s, "{p}");
            }
            None => s.push('*'),
        });
        self.widths[col].0 = self.widths[col].0.max(a);
        self.widths[col].1 = self.widths[col].1.max(p);
    }

    fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let last = self.headers.len().saturating_sub(1);
        let mut line = String::new();
        for (c, (h, align)) in self.headers.iter().enumerate() {
            let (w, pw) = self.widths[c];
            match align {
                Align::Addr => {
                    let (a, p) = h.split_once(':').unwrap_or((h, ""));
                    let _ = write!(line, "{a:>w$}:{p:<pw$}");
                }
                Align::Right => {
                    let _ = write!(line, "{h:>w$}");
                }
                Align::Left if c == last => line.push_str(h),
                Align::Left => {
                    let _ = write!(line, "{h:<w$}");
                }
            }
            if c != last {
                line.push_str("  ");
            }
        }
        writeln!(out, "{}", line.trim_end())?;
        let mut start = 0;
        for row in 0..self.rows() {
            line.clear();
            let mut i = row * self.stride;
            for (c, (_, align)) in self.headers.iter().enumerate() {
                let (w, pw) = self.widths[c];
                let take = |i: usize, start: &mut usize| {
                    let s = &self.text[*start..self.ends[i]];
                    *start = self.ends[i];
                    s
                };
                match align {
                    Align::Addr => {
                        let a = take(i, &mut start);
                        let p = take(i + 1, &mut start);
                        i += 2;
                        let _ = write!(line, "{a:>w$}:{p:<pw$}");
                    }
                    Align::Right => {
                        let v = take(i, &mut start);
                        i += 1;
                        let _ = write!(line, "{v:>w$}");
                    }
                    Align::Left => {
                        let v = take(i, &mut start);
                        i += 1;
                        if c == last {
                            line.push_str(v);
                        } else {
                            let _ = write!(line, "{v:<w$}");
                        }
                    }
                }
                if c != last {
                    line.push_str("  ");
                }
            }
            out.write_all(line.trim_end().as_bytes())?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }
}

fn netns_label(ns: &Netns, s: &mut String) {
    match &ns.name {
        Some(n) => s.push_str(n),
        None => {
            let _ = write!(s, "{}", ns.inode);
        }
    }
}

fn users(owners: &Owners, inode: u32, s: &mut String) {
    let mut any = false;
    for (p, fd) in owners.of(inode) {
        s.push_str(if any { "," } else { "users:(" });
        any = true;
        let _ = write!(s, "({:?},pid={},fd={fd})", p.comm, p.pid);
    }
    if any {
        s.push(')');
    }
}

fn opt(s: &mut String, v: Option<u32>) {
    match v {
        Some(v) => {
            let _ = write!(s, "{v}");
        }
        None => s.push('-'),
    }
}

/// The two sections (listeners, then the rest), each only if it has rows.
pub fn table(out: &mut impl Write, found: &[NsSockets], owners: &Owners, info: bool) -> io::Result<()> {
    use Align::{Addr, Left, Right};
    let mut listen = Grid::new(vec![
        ("State", Left),
        ("Accept-Q", Right),
        ("Backlog", Right),
        ("Drops", Right),
        ("Local Address:Port", Addr),
        ("Netns", Left),
        ("Process", Left),
    ]);
    let mut headers = vec![("State", Left), ("Recv-Q", Right), ("Send-Q", Right), ("Local Address:Port", Addr), ("Peer Address:Port", Addr)];
    if info {
        headers.extend([("RTT(ms)", Right), ("Cwnd", Right), ("Retrans", Right)]);
    }
    headers.extend([("Netns", Left), ("Process", Left)]);
    let mut other = Grid::new(headers);

    for ns in found {
        for r in &ns.records {
            if r.state == TcpState::Listen {
                let g = &mut listen;
                g.cell(0, |s| s.push_str(r.state.name()));
                g.cell(1, |s| opt(s, Some(r.recv_q)));
                g.cell(2, |s| opt(s, Some(r.send_q)));
                g.cell(3, |s| opt(s, r.drops));
                g.addr(4, r.local.ip(), r.ifindex, Some(r.local.port()));
                g.cell(5, |s| netns_label(&ns.ns, s));
                g.cell(6, |s| users(owners, r.inode, s));
            } else {
                let g = &mut other;
                g.cell(0, |s| s.push_str(r.state.name()));
                g.cell(1, |s| opt(s, Some(r.recv_q)));
                g.cell(2, |s| opt(s, Some(r.send_q)));
                g.addr(3, r.local.ip(), r.ifindex, Some(r.local.port()));
                g.addr(4, r.peer.ip(), 0, (r.peer.port() != 0).then_some(r.peer.port()));
                let mut c = 5;
                if info {
                    let t = r.tcp.as_ref();
                    g.cell(c, |s| match t.and_then(|t| t.rtt_us.zip(t.rttvar_us)) {
                        Some((rtt, var)) => {
                            let _ = write!(s, "{:.3}/{:.3}", f64::from(rtt) / 1000.0, f64::from(var) / 1000.0);
                        }
                        None => s.push('-'),
                    });
                    g.cell(c + 1, |s| opt(s, t.and_then(|t| t.cwnd)));
                    g.cell(c + 2, |s| match t.and_then(|t| t.retrans.zip(t.retrans_now)) {
                        Some((total, now)) => {
                            let _ = write!(s, "{now}/{total}");
                        }
                        None => s.push('-'),
                    });
                    c += 3;
                }
                g.cell(c, |s| netns_label(&ns.ns, s));
                g.cell(c + 1, |s| users(owners, r.inode, s));
            }
        }
    }
    let mut w = io::BufWriter::with_capacity(1 << 16, out);
    if listen.rows() > 0 {
        listen.write(&mut w)?;
    }
    if other.rows() > 0 {
        if listen.rows() > 0 {
            w.write_all(b"\n")?;
        }
        other.write(&mut w)?;
    }
    w.flush()
}
