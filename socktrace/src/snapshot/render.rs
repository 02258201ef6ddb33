//! `snapshot` output: an ss-style aligned table (listeners first, with their columns named for
//! what they hold: accept queue, backlog, drops; then every other socket), or a JSON array with
//! one object per socket where anything the kernel did not report is `null`, never 0.

use std::{
    fmt::Write as _,
    io::{self, Write},
    collections::HashMap,
    net::{IpAddr, SocketAddr},
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
    /// `null` with `--no-processes`.
    processes: Option<Vec<JsonProcess<'a>>>,
    /// Listeners only: `sk_drops` (SYNs and completed connections dropped, e.g. on overflow).
    drops: Option<u32>,
    /// Listeners only: how many LISTEN sockets share this namespace, address and port (an
    /// SO_REUSEPORT group when more than 1, each with its own accept queue).
    group_size: Option<usize>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    info: Option<JsonInfo<'a>>,
}

/// LISTEN sockets per (netns, address:port) — SO_REUSEPORT groups have several.
fn listen_groups(keys: impl Iterator<Item = (u32, SocketAddr)>) -> HashMap<(u32, SocketAddr), usize> {
    let mut n = HashMap::new();
    for k in keys {
        *n.entry(k).or_insert(0) += 1;
    }
    n
}

fn json_row<'a>(ns: &'a Netns, r: &'a Record, owners: Option<&'a Owners>, info: bool, group_size: Option<usize>) -> JsonRow<'a> {
    let listener = r.state == TcpState::Listen;
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
        uid: r.full.then_some(r.uid),
        processes: owners.map(|o| o.of(r.inode).map(|(p, fd)| JsonProcess { pid: p.pid, comm: &p.comm, fd }).collect()),
        drops: r.drops,
        group_size,
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
pub fn json(out: &mut impl Write, found: &[NsSockets], owners: Option<&Owners>, info: bool) -> io::Result<()> {
    let mut w = io::BufWriter::with_capacity(1 << 16, out);
    w.write_all(b"[")?;
    let mut first = true;
    for ns in found {
        let listening = || ns.records.iter().filter(|r| r.state == TcpState::Listen);
        let groups = listen_groups(listening().map(|r| (ns.ns.inode, r.local)));
        for r in listening().chain(ns.records.iter().filter(|r| r.state != TcpState::Listen)) {
            w.write_all(if first { b"\n" } else { b",\n" })?;
            first = false;
            let group = (r.state == TcpState::Listen).then(|| groups.get(&(ns.ns.inode, r.local)).copied().unwrap_or(1));
            serde_json::to_writer(&mut w, &json_row(&ns.ns, r, owners, info, group))?;
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

/// Rows of cells stored in one string (no allocation per cell), with column widths. Formatting
/// avoids `core::fmt` on the per-row path: with 100k sockets it is a visible share of the time.
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

fn width(s: &str) -> usize {
    if s.is_ascii() { s.len() } else { s.chars().count() }
}

/// Appends a decimal number.
fn push_num(s: &mut String, v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut v = v;
    loop {
        i -= 1;
        buf[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
        v /= 10;
        if v == 0 {
            break;
        }
    }
    s.push_str(std::str::from_utf8(&buf[i..]).unwrap_or_default());
}

fn pad(line: &mut String, n: usize) {
    line.extend(std::iter::repeat_n(' ', n));
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

    /// Appends another grid's rows (same columns).
    fn append(&mut self, other: Grid) {
        let base = self.text.len();
        self.text.push_str(&other.text);
        self.ends.extend(other.ends.into_iter().map(|e| e + base));
        for (w, o) in self.widths.iter_mut().zip(other.widths) {
            *w = (w.0.max(o.0), w.1.max(o.1));
        }
    }

    /// Appends one part of a cell, written by `f` straight into the shared buffer; returns its width.
    fn part(&mut self, f: impl FnOnce(&mut String)) -> usize {
        let start = self.text.len();
        f(&mut self.text);
        self.ends.push(self.text.len());
        width(&self.text[start..])
    }

    fn cell(&mut self, col: usize, f: impl FnOnce(&mut String)) {
        let n = self.part(f);
        self.widths[col].0 = self.widths[col].0.max(n);
    }

    fn num(&mut self, col: usize, v: Option<u32>) {
        self.cell(col, |s| match v {
            Some(v) => push_num(s, u64::from(v)),
            None => s.push('-'),
        });
    }

    fn addr(&mut self, col: usize, ip: IpAddr, ifindex: u32, port: Option<u16>) {
        let a = self.part(|s| push_addr(s, ip, ifindex));
        let p = self.part(|s| match port {
            Some(p) => push_num(s, u64::from(p)),
            None => s.push('*'),
        });
        self.widths[col].0 = self.widths[col].0.max(a);
        self.widths[col].1 = self.widths[col].1.max(p);
    }

    /// One line without its end: `cells` yields each column's text (address and port as two
    /// items); every column is padded (a trailing column may follow).
    fn line<'t>(&self, line: &mut String, mut cells: impl FnMut() -> &'t str) {
        for (c, (_, align)) in self.headers.iter().enumerate() {
            let (w, pw) = self.widths[c];
            if c > 0 {
                line.push_str("  ");
            }
            match align {
                Align::Addr => {
                    let (a, p) = (cells(), cells());
                    pad(line, w.saturating_sub(width(a)));
                    line.push_str(a);
                    line.push(':');
                    line.push_str(p);
                    pad(line, pw.saturating_sub(width(p)));
                }
                Align::Right => {
                    let v = cells();
                    pad(line, w.saturating_sub(width(v)));
                    line.push_str(v);
                }
                Align::Left => {
                    let v = cells();
                    line.push_str(v);
                    pad(line, w.saturating_sub(width(v)));
                }
            }
        }
    }

    /// Writes the header and the rows. `trailing` names an unaligned last column whose text
    /// `tail(row, line)` appends (the process list: long, and known only after the /proc scan).
    fn write(&self, out: &mut impl Write, header: bool, trailing: Option<&str>, mut tail: impl FnMut(usize, &mut String)) -> io::Result<()> {
        // Trailing spaces go, whether or not the last column printed anything.
        let end_line = |line: &mut String| {
            let end = line.trim_end().len();
            line.truncate(end);
            line.push('\n');
        };
        let mut line = String::new();
        let mut heads = self.headers.iter().flat_map(|(h, a)| match a {
            Align::Addr => {
                let (x, y) = h.split_once(':').unwrap_or((h, ""));
                [Some(x), Some(y)]
            }
            _ => [Some(*h), None],
        });
        self.line(&mut line, || heads.by_ref().flatten().next().unwrap_or_default());
        if let Some(t) = trailing {
            line.push_str("  ");
            line.push_str(t);
        }
        end_line(&mut line);
        if header {
            out.write_all(line.as_bytes())?;
        }
        let mut start = 0;
        let mut i = 0;
        for row in 0..self.rows() {
            line.clear();
            self.line(&mut line, || {
                let s = &self.text[start..self.ends[i]];
                start = self.ends[i];
                i += 1;
                s
            });
            line.push_str("  ");
            tail(row, &mut line);
            end_line(&mut line);
            out.write_all(line.as_bytes())?;
        }
        Ok(())
    }
}

fn netns_label(ns: &Netns, s: &mut String) {
    match &ns.name {
        Some(n) => s.push_str(n),
        None => push_num(s, u64::from(ns.inode)),
    }
}

/// ss's process list: `users:(("comm",pid=N,fd=M),...)`.
fn users(owners: &Owners, inode: u32, s: &mut String) {
    let mut any = false;
    for (p, fd) in owners.of(inode) {
        s.push_str(if any { ",(\"" } else { "users:((\"" });
        any = true;
        s.push_str(&p.comm);
        s.push_str("\",pid=");
        push_num(s, u64::from(p.pid));
        s.push_str(",fd=");
        push_num(s, u64::from(fd));
        s.push(')');
    }
    if any {
        s.push(')');
    }
}

/// The table: two sections (listeners, then the rest), each printed only if it has rows. Rows
/// are formatted as they are pushed; only the padding waits for [`Table::write`].
pub struct Table {
    info: bool,
    /// Print the header line (not with ss's -H).
    header: bool,
    listen: Grid,
    other: Grid,
    /// Socket inode per row of each section, for the process column.
    listen_inodes: Vec<u32>,
    other_inodes: Vec<u32>,
    /// Namespace and address of each listener row, to mark SO_REUSEPORT groups.
    listen_keys: Vec<(u32, SocketAddr)>,
}

impl Table {
    pub fn new(info: bool, header: bool) -> Table {
        use Align::{Addr, Left, Right};
        let listen = Grid::new(vec![
            ("State", Left),
            ("Accept-Q", Right),
            ("Backlog", Right),
            ("Drops", Right),
            ("Local Address:Port", Addr),
            ("Netns", Left),
        ]);
        let mut headers = vec![("State", Left), ("Recv-Q", Right), ("Send-Q", Right), ("Local Address:Port", Addr), ("Peer Address:Port", Addr)];
        if info {
            headers.extend([("RTT(ms)", Right), ("Cwnd", Right), ("Retrans", Right)]);
        }
        headers.push(("Netns", Left));
        Table { info, header, listen, other: Grid::new(headers), listen_inodes: Vec::new(), other_inodes: Vec::new(), listen_keys: Vec::new() }
    }

    pub fn push(&mut self, ns: &Netns, r: &Record) {
        if r.state == TcpState::Listen {
            let g = &mut self.listen;
            g.cell(0, |s| s.push_str(r.state.name()));
            g.num(1, Some(r.recv_q));
            g.num(2, Some(r.send_q));
            g.num(3, r.drops);
            g.addr(4, r.local.ip(), r.ifindex, Some(r.local.port()));
            g.cell(5, |s| netns_label(ns, s));
            self.listen_inodes.push(r.inode);
            self.listen_keys.push((ns.inode, r.local));
            return;
        }
        let g = &mut self.other;
        g.cell(0, |s| s.push_str(r.state.name()));
        g.num(1, Some(r.recv_q));
        g.num(2, Some(r.send_q));
        g.addr(3, r.local.ip(), r.ifindex, Some(r.local.port()));
        g.addr(4, r.peer.ip(), 0, (r.peer.port() != 0).then_some(r.peer.port()));
        let mut c = 5;
        if self.info {
            let t = r.tcp.as_deref();
            g.cell(c, |s| match t.and_then(|t| t.rtt_us.zip(t.rttvar_us)) {
                Some((rtt, var)) => {
                    let _ = write!(s, "{:.3}/{:.3}", f64::from(rtt) / 1000.0, f64::from(var) / 1000.0);
                }
                None => s.push('-'),
            });
            g.num(c + 1, t.and_then(|t| t.cwnd));
            g.cell(c + 2, |s| match t.and_then(|t| t.retrans.zip(t.retrans_now)) {
                Some((total, now)) => {
                    push_num(s, u64::from(now));
                    s.push('/');
                    push_num(s, u64::from(total));
                }
                None => s.push('-'),
            });
            c += 3;
        }
        g.cell(c, |s| netns_label(ns, s));
        self.other_inodes.push(r.inode);
    }

    /// Appends another table's rows after this one's.
    pub fn append(&mut self, other: Table) {
        self.listen.append(other.listen);
        self.other.append(other.other);
        self.listen_inodes.extend(other.listen_inodes);
        self.other_inodes.extend(other.other_inodes);
        self.listen_keys.extend(other.listen_keys);
    }

    pub fn write(&self, out: &mut impl Write, owners: Option<&Owners>) -> io::Result<()> {
        let trailing = owners.map(|_| "Process");
        let mut w = io::BufWriter::with_capacity(1 << 16, out);
        let groups = listen_groups(self.listen_keys.iter().copied());
        let sections = [(&self.listen, &self.listen_inodes, true), (&self.other, &self.other_inodes, false)];
        for (i, (grid, inodes, listen)) in sections.into_iter().filter(|(g, _, _)| g.rows() > 0).enumerate() {
            if i > 0 && self.header {
                w.write_all(b"\n")?;
            }
            grid.write(&mut w, self.header, trailing, |row, line| {
                // SO_REUSEPORT: several sockets, each with its own queue, on one address and port.
                let n = if listen { self.listen_keys.get(row).and_then(|k| groups.get(k)).copied().unwrap_or(1) } else { 1 };
                if n > 1 {
                    let _ = write!(line, "[group of {n}] ");
                }
                if let Some(o) = owners {
                    users(o, inodes[row], line);
                }
            })?;
        }
        w.flush()
    }
}
