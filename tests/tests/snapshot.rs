//! `socktrace snapshot` against ground truth: in a fresh network namespace this test opens
//! listeners (IPv4, IPv6, dual-stack; different backlogs; one with connections queued and not
//! accepted; one overflowed) and connections in several states, then compares what
//! `socktrace snapshot --json` reports with `ss -tanpe` run in the same namespace (same sockets,
//! states, queues, inodes, owning pids), filter results with ss's own filter results, listener
//! drops with the namespace's `TcpExtListenDrops`, and `tcp_info` with `ss -tni`; and the socket
//! holders found by the BPF task-file iterator with those of the /proc scan.
//! Needs root (netns creation); run with `--test-threads=1`.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde_json::Value;
use socktrace_tests::{NetNs, privileged, socktrace_bin};

const P_V4: u16 = 40001; // 127.0.0.1, backlog 16, two accepted connections (one with unread data)
const P_V6: u16 = 40002; // [::1], backlog 8, three connections queued, never accepted
const P_ANY: u16 = 40003; // 0.0.0.0, backlog 64, half-closed and closed connections
const P_DUAL: u16 = 40004; // [::] dual-stack, backlog 4, one IPv4 client (v4-mapped)
const P_OVF: u16 = 40005; // 127.0.0.1, backlog 1, overflowed: SYNs dropped

/// A listener with an explicit backlog (std always uses its own).
fn listen(addr: SocketAddr, backlog: i32) -> TcpListener {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket syscalls on a fresh fd with sockaddrs of the right family and size.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let owned = OwnedFd::from_raw_fd(fd);
        let rc = match addr {
            SocketAddr::V4(a) => {
                let sa = libc::sockaddr_in {
                    sin_family: u16::try_from(libc::AF_INET).unwrap(),
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                    sin_zero: [0; 8],
                };
                libc::bind(fd, (&raw const sa).cast(), u32::try_from(size_of_val(&sa)).unwrap())
            }
            SocketAddr::V6(a) => {
                let sa = libc::sockaddr_in6 {
                    sin6_family: u16::try_from(libc::AF_INET6).unwrap(),
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                    sin6_scope_id: 0,
                };
                libc::bind(fd, (&raw const sa).cast(), u32::try_from(size_of_val(&sa)).unwrap())
            }
        };
        assert_eq!(rc, 0, "bind {addr}: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd, backlog), 0, "listen: {}", std::io::Error::last_os_error());
        TcpListener::from(owned)
    }
}

/// Sockets kept open for the whole test (the test process is their owner).
#[derive(Default)]
struct Held {
    listeners: Vec<TcpListener>,
    streams: Vec<TcpStream>,
}

/// Builds the scenario inside the namespace (sockets belong to the namespace they were created in,
/// whichever thread holds them later).
fn build(ns: &NetNs) -> Held {
    ns.within(|| {
        let mut h = Held::default();
        let v4 = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, P_V4)), 16);
        let v6 = listen(SocketAddr::from((Ipv6Addr::LOCALHOST, P_V6)), 8);
        let any = listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, P_ANY)), 64);
        let dual = listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, P_DUAL)), 4);
        let ovf = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, P_OVF)), 1);

        // Two accepted connections; the server side of the second has 1000 unread bytes.
        for i in 0..2 {
            let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, P_V4)).unwrap();
            let (s, _) = v4.accept().unwrap();
            if i == 1 {
                c.write_all(&[7u8; 1000]).unwrap();
            }
            h.streams.extend([c, s]);
        }
        // Three connections completed by the kernel, left in the accept queue.
        for _ in 0..3 {
            h.streams.push(TcpStream::connect((Ipv6Addr::LOCALHOST, P_V6)).unwrap());
        }
        // Half-closed: the client shuts down writing (FIN-WAIT-2), the server does not (CLOSE-WAIT).
        let c = TcpStream::connect((Ipv4Addr::LOCALHOST, P_ANY)).unwrap();
        let (s, _) = any.accept().unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        h.streams.extend([c, s]);
        // Closed by the client first, then by the server: the client end lingers in TIME-WAIT.
        let c = TcpStream::connect((Ipv4Addr::LOCALHOST, P_ANY)).unwrap();
        let (s, _) = any.accept().unwrap();
        drop(c);
        std::thread::sleep(Duration::from_millis(50));
        drop(s);
        // An IPv4 client of the dual-stack listener.
        let c = TcpStream::connect((Ipv4Addr::LOCALHOST, P_DUAL)).unwrap();
        let (s, _) = dual.accept().unwrap();
        h.streams.extend([c, s]);
        // Overflow: backlog 1 holds two connections; the other SYNs are dropped. The pending
        // clients are closed before measuring so no SYN retransmit changes the drop count.
        let mut pending = Vec::new();
        for _ in 0..5 {
            pending.push(nonblocking_connect(SocketAddr::from((Ipv4Addr::LOCALHOST, P_OVF))));
            std::thread::sleep(Duration::from_millis(30));
        }
        std::thread::sleep(Duration::from_millis(100));
        for fd in pending {
            if connected(&fd) {
                h.streams.push(TcpStream::from(fd));
            }
        }
        h.listeners.extend([v4, v6, any, dual, ovf]);
        std::thread::sleep(Duration::from_millis(100));
        h
    })
    .unwrap()
}

fn nonblocking_connect(addr: SocketAddr) -> OwnedFd {
    let SocketAddr::V4(a) = addr else { unreachable!("IPv4 only") };
    // SAFETY: fresh fd, sockaddr_in of the right size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let sa = libc::sockaddr_in {
            sin_family: u16::try_from(libc::AF_INET).unwrap(),
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
            sin_zero: [0; 8],
        };
        libc::connect(fd, (&raw const sa).cast(), u32::try_from(size_of_val(&sa)).unwrap());
        OwnedFd::from_raw_fd(fd)
    }
}

fn connected(fd: &OwnedFd) -> bool {
    let mut info: libc::tcp_info = unsafe_zeroed();
    let mut len = u32::try_from(size_of::<libc::tcp_info>()).unwrap();
    // SAFETY: valid fd, buffer and length.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &raw mut len) };
    rc == 0 && info.tcpi_state == 1
}

fn unsafe_zeroed<T>() -> T {
    // SAFETY: only used for plain C structs of integers.
    unsafe { std::mem::zeroed() }
}

/// What identifies a socket in both tools' output.
type Key = (String, IpAddr, u16, IpAddr, u16);

#[derive(Debug, Default, PartialEq, Eq)]
struct Row {
    recv_q: u64,
    send_q: u64,
    inode: Option<u64>,
    /// (pid, fd)
    owners: BTreeSet<(u64, u64)>,
}

fn ss_state(s: &str) -> String {
    match s {
        "ESTAB" => "established".into(),
        other => other.to_lowercase(),
    }
}

/// `127.0.0.1:80`, `[::1]:80`, `*:80`, `0.0.0.0:*`, with an optional `%dev`.
fn ss_addr(s: &str) -> (IpAddr, u16) {
    let (host, port) = s.rsplit_once(':').unwrap_or_else(|| panic!("bad ss address {s}"));
    let host = host.split('%').next().unwrap();
    let ip = match host {
        "*" => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        h => h.trim_start_matches('[').trim_end_matches(']').parse().unwrap_or_else(|_| panic!("bad ss host {h}")),
    };
    (ip, if port == "*" { 0 } else { port.parse().unwrap() })
}

/// Parses `ss -tanpe` (or any `ss -tan…`) output. With a single-state filter ss leaves the
/// State column out: `only` is that state then.
fn parse_ss(text: &str, only: Option<&str>) -> BTreeMap<Key, Row> {
    let mut rows = BTreeMap::new();
    for line in text.lines().skip(1) {
        let mut t: Vec<&str> = line.split_whitespace().collect();
        if let Some(state) = only {
            t.insert(0, state);
        }
        if t.len() < 5 {
            continue;
        }
        let (lip, lport) = ss_addr(t[3]);
        let (rip, rport) = ss_addr(t[4]);
        let mut row = Row { recv_q: t[1].parse().unwrap(), send_q: t[2].parse().unwrap(), ..Row::default() };
        let rest = t[5..].join(" ");
        for tok in &t[5..] {
            if let Some(i) = tok.strip_prefix("ino:") {
                row.inode = Some(i.parse::<u64>().unwrap()).filter(|i| *i != 0);
            }
        }
        if let Some(users) = rest.split("users:(").nth(1) {
            for part in users.split("pid=").skip(1) {
                let pid: u64 = part.split(',').next().unwrap().parse().unwrap();
                let fd: u64 = part.split("fd=").nth(1).unwrap().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
                row.owners.insert((pid, fd));
            }
        }
        let key = (ss_state(t[0]), lip, lport, rip, rport);
        assert!(rows.insert(key.clone(), row).is_none(), "duplicate ss row {key:?}");
    }
    rows
}

fn json_key(v: &Value) -> Key {
    let lip: IpAddr = v["laddr"].as_str().unwrap().parse().unwrap();
    let lport = u16::try_from(v["lport"].as_u64().unwrap()).unwrap();
    let (rip, rport) = if let Some(r) = v["raddr"].as_str() {
        (r.parse().unwrap(), u16::try_from(v["rport"].as_u64().unwrap()).unwrap())
    } else {
        assert_eq!(v["state"], "listen", "only listeners have no peer: {v}");
        (if lip.is_ipv4() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) }, 0)
    };
    (v["state"].as_str().unwrap().to_owned(), lip, lport, rip, rport)
}

fn parse_json(v: &[Value]) -> BTreeMap<Key, Row> {
    let mut rows = BTreeMap::new();
    for s in v {
        let row = Row {
            recv_q: s["recv_q"].as_u64().unwrap(),
            send_q: s["send_q"].as_u64().unwrap(),
            inode: s["inode"].as_u64(),
            // Absent with --no-processes.
            owners: s["processes"].as_array().map_or_else(BTreeSet::new, |a| a.iter().map(|p| (p["pid"].as_u64().unwrap(), p["fd"].as_u64().unwrap())).collect()),
        };
        let key = json_key(s);
        assert!(rows.insert(key.clone(), row).is_none(), "duplicate socktrace row {key:?}");
    }
    rows
}

fn snapshot(args: &[&str]) -> Output {
    Command::new(socktrace_bin()).arg("snapshot").args(args).output().expect("running socktrace")
}

fn snapshot_json(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = snapshot(&all);
    assert!(out.status.success(), "socktrace snapshot {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("snapshot --json is JSON");
    v.as_array().expect("a JSON array").clone()
}

/// Key sets of `ss ARGS` and `socktrace snapshot --json --netns NS OURS` in the namespace must
/// be equal; returns how many sockets were selected.
fn compare(ns: &NetNs, ss_args: &[&str], ours: &[&str]) -> usize {
    let mut args = vec!["ss"];
    args.extend_from_slice(ss_args);
    // With a single-state filter ss leaves the State column out.
    let only = match ss_args {
        [_, "state", s] => Some(if *s == "established" { "ESTAB" } else { *s }),
        _ => None,
    };
    let want: BTreeSet<Key> = parse_ss(&ns.exec(&args).unwrap(), only).into_keys().collect();
    let mut ours_args = vec!["--netns", ns.name.as_str()];
    ours_args.extend_from_slice(ours);
    let got: BTreeSet<Key> = parse_json(&snapshot_json(&ours_args)).into_keys().collect();
    assert_eq!(got, want, "socktrace snapshot {ours:?} vs ss {ss_args:?}");
    got.len()
}

/// The same filter expression given to both.
fn compare_filter(ns: &NetNs, expr: &str) -> usize {
    compare(ns, &["-tan", expr], &[expr])
}

fn listener(rows: &[Value], port: u16) -> &Value {
    rows.iter().find(|r| r["state"] == "listen" && r["lport"] == port).unwrap_or_else(|| panic!("no listener on {port}"))
}

#[test]
fn snapshot_matches_ss_and_kernel_counters() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("snap").unwrap();
    let held = build(&ns);
    let me = u64::from(std::process::id());

    let ss = parse_ss(&ns.exec(&["ss", "-tanpe"]).unwrap(), None);
    let rows = snapshot_json(&["--netns", &ns.name]);
    let ours = parse_json(&rows);
    assert_eq!(ours.keys().collect::<Vec<_>>(), ss.keys().collect::<Vec<_>>(), "same sockets in the same states");
    let owned = ss.values().filter(|r| !r.owners.is_empty()).count();
    eprintln!("{} sockets compared with ss -tanpe ({owned} with owners)", ss.len());
    assert!(ss.len() >= 20 && owned >= 14, "the scenario built fewer sockets than planned");
    for (k, want) in &ss {
        assert_eq!(&ours[k], want, "{k:?}: queues, inode and owners must match ss");
    }

    // The scenario is what we think it is (so the comparison above covered every case).
    let states: BTreeSet<&str> = rows.iter().map(|r| r["state"].as_str().unwrap()).collect();
    for s in ["listen", "established", "close-wait", "fin-wait-2", "time-wait"] {
        assert!(states.contains(s), "scenario lacks {s}: {states:?}");
    }
    let v6 = listener(&rows, P_V6);
    assert_eq!((v6["recv_q"].as_u64(), v6["send_q"].as_u64()), (Some(3), Some(8)), "accept queue and backlog: {v6}");
    assert_eq!(v6["laddr"], "::1");
    assert_eq!(listener(&rows, P_V4)["send_q"], 16);
    assert_eq!(listener(&rows, P_ANY)["send_q"], 64);
    assert_eq!(listener(&rows, P_DUAL)["laddr"], "::");
    assert_eq!(listener(&rows, P_OVF)["recv_q"], 2, "backlog 1 holds two connections");
    for r in rows.iter().filter(|r| r["state"] == "listen") {
        assert_eq!(r["processes"][0]["pid"].as_u64(), Some(me), "listeners belong to the test: {r}");
        assert!(r["raddr"].is_null() && r["rport"].is_null());
        assert_eq!(r["netns"].as_u64(), Some(u64::from(ns.inode())));
        assert_eq!(r["netns_name"], ns.name.as_str());
    }
    let unread = rows.iter().filter(|r| r["state"] == "established" && r["recv_q"] == 1000).count();
    assert_eq!(unread, 1, "one server socket holds 1000 unread bytes");
    let mapped = rows.iter().filter(|r| r["lport"] == P_DUAL && r["laddr"] == "::ffff:127.0.0.1").count();
    assert_eq!(mapped, 1, "the dual-stack listener's child shows a v4-mapped address");
    for r in rows.iter().filter(|r| r["state"] == "time-wait") {
        assert!(r["inode"].is_null() && r["uid"].is_null() && r["drops"].is_null(), "TIME-WAIT has no file, owner or counters: {r}");
        assert_eq!(r["processes"].as_array().map(Vec::len), Some(0));
    }

    // Listener drops are the kernel's per-listener sk_drops; their sum is the namespace's counter.
    let listen_drops = ns.counters().unwrap().get("TcpExtListenDrops");
    let ovf = listener(&rows, P_OVF)["drops"].as_i64().unwrap();
    let sum: i64 = rows.iter().filter(|r| r["state"] == "listen").map(|r| r["drops"].as_i64().unwrap()).sum();
    assert!(ovf >= 1, "the overflowed listener dropped SYNs");
    assert_eq!(sum, listen_drops, "sum of listener drops vs TcpExtListenDrops");
    assert_eq!(sum, ovf, "only the overflowed listener dropped anything");
    eprintln!("listener drops: {ovf} (TcpExtListenDrops {listen_drops})");

    // Filters select what ss's own filters select.
    let sport = format!(":{P_V4}");
    assert_eq!(compare(&ns, &["-tan", "sport", "=", &sport], &["sport", "=", &sport]), 3);
    assert_eq!(compare_filter(&ns, "dport = :40001 or sport = :40002"), 2 + 4);
    compare_filter(&ns, "( sport = :40003 or dport = :40003 ) and not src 127.0.0.1");
    compare_filter(&ns, "src 127.0.0.1 and ! dport = :0");
    compare_filter(&ns, "dst [::1]");
    compare_filter(&ns, "sport >= :40003 and sport < :40005");
    compare_filter(&ns, "dport > :40003 or sport <= :40001");
    assert_eq!(compare(&ns, &["-tln"], &["-l"]), 5);
    compare(&ns, &["-tan", "state", "established"], &["--state", "established"]);
    compare(&ns, &["-tan", "state", "time-wait", "state", "close-wait"], &["--state", "time-wait,close-wait"]);
    compare(&ns, &["-tan6"], &["-6"]);

    // Every namespace by default: this one's sockets appear exactly as with --netns.
    let all = snapshot_json(&[]);
    let here: Vec<Value> = all.into_iter().filter(|r| r["netns"].as_u64() == Some(u64::from(ns.inode()))).collect();
    assert_eq!(parse_json(&here), ours);

    drop(held);
}

#[test]
fn tcp_info_matches_ss() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("snapi").unwrap();
    let held = build(&ns);
    // `ss -tni`: a line per socket, then an indented line of tcp_info.
    let text = ns.exec(&["ss", "-tni", "state", "established"]).unwrap();
    let mut want: BTreeMap<Key, (u64, f64)> = BTreeMap::new();
    let ss_lines: Vec<&str> = text.lines().skip(1).collect();
    for pair in ss_lines.chunks(2) {
        let [sock_line, details] = pair else { continue };
        // With a state filter ss leaves out the State column.
        let t: Vec<&str> = sock_line.split_whitespace().collect();
        let (lip, lport) = ss_addr(t[2]);
        let (rip, rport) = ss_addr(t[3]);
        let field = |name: &str| details.split_whitespace().find_map(|f| f.strip_prefix(name)).map(str::to_owned);
        let cwnd = field("cwnd:").unwrap().parse().unwrap();
        let rtt = field("rtt:").unwrap().split('/').next().unwrap().parse().unwrap();
        want.insert(("established".to_owned(), lip, lport, rip, rport), (cwnd, rtt));
    }
    let rows = snapshot_json(&["--netns", &ns.name, "-i", "--state", "established"]);
    assert_eq!(rows.len(), want.len(), "same established sockets as ss -tni");
    for r in &rows {
        let (cwnd, rtt_ms) = want[&json_key(r)];
        assert_eq!(r["cwnd"].as_u64(), Some(cwnd), "cwnd: {r}");
        let ours = r["rtt_us"].as_f64().unwrap() / 1000.0;
        assert!((ours - rtt_ms).abs() < 0.0015, "rtt {ours} ms vs ss {rtt_ms} ms: {r}");
        assert_eq!(r["retrans"], 0, "{r}");
        assert!(r["congestion"].is_string(), "{r}");
    }
    let listeners = snapshot_json(&["--netns", &ns.name, "-i", "-l"]);
    assert_eq!(listeners.len(), 5);
    for r in &listeners {
        assert!(r["rtt_us"].is_null() && r["cwnd"].is_null(), "a listener has no RTT or cwnd: {r}");
    }
    drop(held);
}

#[test]
fn table_is_aligned_and_names_listener_columns() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("snapt").unwrap();
    let held = build(&ns);
    let out = snapshot(&["--netns", &ns.name]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut sections = text.split("\n\n");
    let listen = sections.next().unwrap();
    let other = sections.next().expect("a second section for non-listening sockets");
    assert!(listen.starts_with("State") && listen.contains("Accept-Q") && listen.contains("Backlog") && listen.contains("Drops"));
    assert!(other.starts_with("State") && other.contains("Recv-Q") && other.contains("Send-Q") && other.contains("Peer Address:Port"));
    assert_eq!(listen.lines().count(), 1 + 5);
    for section in [listen, other] {
        // ss-style: addresses right-aligned, ports left-aligned around one column of colons.
        let header = section.lines().next().unwrap();
        let col = header.find("Address:Port").unwrap() + "Address".len();
        for line in section.lines().skip(1) {
            assert_eq!(line.as_bytes().get(col), Some(&b':'), "misaligned line {line:?} (colon at {col})\n{section}");
        }
    }
    let v6 = listen.lines().find(|l| l.contains(&format!("[::1]:{P_V6}"))).unwrap();
    let cols: Vec<&str> = v6.split_whitespace().collect();
    assert_eq!(&cols[..3], &["listen", "3", "8"], "{v6}");
    drop(held);
}

#[test]
fn bad_filters_are_one_line_usage_errors() {
    if !privileged() {
        return;
    }
    for bad in [&["sport", "=", ":80", ")"][..], &["sport", "=", "http"], &["src", "10.0.0.0/33"], &["(", "dport", "=", ":1"], &["bogus"]] {
        let out = snapshot(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line for {bad:?}: {err}");
        assert!(err.starts_with("socktrace: bad filter at "), "{err}");
        assert!(out.stdout.is_empty());
    }
    let out = snapshot(&["--state", "nonsense"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

/// Without root: only the caller's own namespace, one note on stderr, exit 0.
#[test]
fn unprivileged_lists_its_own_namespace_and_says_what_it_skipped() {
    if !privileged() {
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: setpriv (util-linux) is not installed");
        return;
    }
    let ns = NetNs::new("snapu").unwrap();
    let held = build(&ns);
    let bin = std::env::temp_dir().join(format!("socktrace-snapshot-test-{}", std::process::id()));
    std::fs::copy(socktrace_bin(), &bin).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["snapshot", "--json"])
        .output()
        .unwrap();
    // Asking for the iterator without the privileges to load it is an error, not a silent fallback.
    let forced = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["snapshot", "--owners", "bpf"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&bin);
    let forced_err = String::from_utf8_lossy(&forced.stderr);
    assert!(!forced.status.success() && forced.stdout.is_empty(), "--owners bpf without root: {forced_err}");
    assert!(forced_err.contains("--owners bpf") && forced_err.contains("iterator"), "{forced_err}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "one note: {err}");
    assert!(err.contains("could not enter") && err.contains("run as root"), "{err}");
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    for r in rows.as_array().unwrap() {
        assert_eq!(r["netns"].as_u64(), Some(own), "only its own namespace: {r}");
    }
    drop(held);
}

/// Enough sockets (5000 or more) that the dump of both families is split in two concurrent halves
/// (on 2 cores only without process names, whose pass takes the second core): with and without
/// names, still exactly what ss lists, each socket once, IPv4 and IPv6 alike, with its owner.
#[test]
fn large_namespace_split_dump_matches_ss() {
    if !privileged() {
        return;
    }
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointers; raising the soft limit up to the hard limit is always allowed.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
    }
    assert!(lim.rlim_cur >= 8000, "RLIMIT_NOFILE hard limit {} is too low for this test", lim.rlim_max);
    let ns = NetNs::new("snapbig").unwrap();
    let held = ns
        .within(|| {
            let mut h = Held::default();
            let mut ls: Vec<TcpListener> = (0..4).map(|i| listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 41000 + i)), 1024)).collect();
            for i in 0..3000 {
                let l = &ls[i % ls.len()];
                let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let (s, _) = l.accept().unwrap();
                h.streams.extend([c, s]);
            }
            let l6 = listen(SocketAddr::from((Ipv6Addr::LOCALHOST, 41010)), 1024);
            for _ in 0..200 {
                let c = TcpStream::connect(l6.local_addr().unwrap()).unwrap();
                let (s, _) = l6.accept().unwrap();
                h.streams.extend([c, s]);
            }
            ls.push(l6);
            h.listeners = ls;
            h
        })
        .unwrap();
    let ss = parse_ss(&ns.exec(&["ss", "-tanp"]).unwrap(), None);
    assert_eq!(ss.len(), 6405);
    let me = u64::from(std::process::id());
    for names in [true, false] {
        let mut args = vec!["--netns", ns.name.as_str()];
        if !names {
            args.push("--no-processes");
        }
        let rows = snapshot_json(&args);
        let ours = parse_json(&rows);
        assert_eq!(rows.len(), ours.len(), "no socket listed twice (names: {names})");
        assert_eq!(ours.keys().collect::<Vec<_>>(), ss.keys().collect::<Vec<_>>(), "names: {names}");
        for (k, want) in &ss {
            let got = &ours[k];
            assert_eq!((got.recv_q, got.send_q), (want.recv_q, want.send_q), "{k:?}");
            if names {
                assert_eq!(&got.owners, &want.owners, "{k:?}");
                assert!(got.owners.iter().all(|(pid, _)| *pid == me));
            }
        }
    }
    drop(held);
}

// ---- ss command lines pasted after `socktrace snapshot` (issue 12) ----

const P_HALF: u16 = 40006; // 127.0.0.1 and [::1]: the handshake's final ACK is dropped, so SYN-RECV
const P_V6B: u16 = 40007; // [::1]: one established pair and one in TIME-WAIT

/// The scenario of [`build`] plus SYN-RECV sockets (v4 and v6: nftables in the namespace drops the
/// clients' pure ACKs to [`P_HALF`], so the server keeps request sockets while the clients think
/// they are connected) and IPv6 established and TIME-WAIT sockets.
fn build_all_states(ns: &NetNs) -> Held {
    let mut held = build(ns);
    let rules = format!(
        "table inet st {{\n chain in {{\n  type filter hook input priority 0;\n  tcp dport {P_HALF} tcp flags & (syn | ack | fin | rst) == ack drop\n }}\n}}\n"
    );
    let nft = Command::new("ip").args(["netns", "exec", &ns.name, "nft", "-f", "-"]).stdin(std::process::Stdio::piped()).spawn();
    let mut nft = nft.expect("nft (nftables) is needed");
    nft.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
    assert!(nft.wait().unwrap().success(), "nft rules");
    let more = ns
        .within(|| {
            let mut h = Held::default();
            let half4 = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, P_HALF)), 16);
            let half6 = listen(SocketAddr::from((Ipv6Addr::LOCALHOST, P_HALF)), 16);
            for _ in 0..2 {
                h.streams.push(TcpStream::connect((Ipv4Addr::LOCALHOST, P_HALF)).unwrap());
                h.streams.push(TcpStream::connect((Ipv6Addr::LOCALHOST, P_HALF)).unwrap());
            }
            let v6 = listen(SocketAddr::from((Ipv6Addr::LOCALHOST, P_V6B)), 16);
            let c = TcpStream::connect((Ipv6Addr::LOCALHOST, P_V6B)).unwrap();
            let (s, _) = v6.accept().unwrap();
            h.streams.extend([c, s]);
            let c = TcpStream::connect((Ipv6Addr::LOCALHOST, P_V6B)).unwrap();
            let (s, _) = v6.accept().unwrap();
            drop(c);
            std::thread::sleep(Duration::from_millis(50));
            drop(s);
            h.listeners.extend([half4, half6, v6]);
            std::thread::sleep(Duration::from_millis(100));
            h
        })
        .unwrap();
    held.listeners.extend(more.listeners);
    held.streams.extend(more.streams);
    held
}

/// `ss -H …` output: one line per socket (`tcp_info` continuation lines start with white space);
/// the State column is left out when the filter selects one state. Keys of the sockets, with
/// their state when ss printed it.
fn parse_ss_h(text: &str) -> BTreeSet<(Option<String>, IpAddr, u16, IpAddr, u16)> {
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with(char::is_whitespace)) {
        let t: Vec<&str> = line.split_whitespace().collect();
        let (state, rest) = if t[0].parse::<u64>().is_ok() { (None, &t[..]) } else { (Some(ss_state(t[0])), &t[1..]) };
        let (lip, lport) = ss_addr(rest[2]);
        let (rip, rport) = ss_addr(rest[3]);
        assert!(out.insert((state, lip, lport, rip, rport)), "duplicate ss line {line}");
    }
    out
}

/// Runs the same ss command line through `ss -H` and `socktrace snapshot --json` in the
/// namespace; the socket sets must be equal. Returns (sockets, states seen).
fn same_as_ss(ns: &NetNs, line: &[&str]) -> (usize, BTreeSet<String>) {
    let mut ss = vec!["ss", "-H"];
    ss.extend_from_slice(line);
    let want = parse_ss_h(&ns.exec(&ss).unwrap());
    let with_state = want.iter().all(|k| k.0.is_some());
    let mut ours = vec!["-N", ns.name.as_str()];
    ours.extend_from_slice(line);
    let rows = snapshot_json(&ours);
    let states: BTreeSet<String> = rows.iter().map(|r| r["state"].as_str().unwrap().to_owned()).collect();
    let got: BTreeSet<_> = rows
        .iter()
        .map(|r| {
            let (state, lip, lport, rip, rport) = json_key(r);
            (with_state.then_some(state), lip, lport, rip, rport)
        })
        .collect();
    assert_eq!(got.len(), rows.len(), "a socket listed twice for {line:?}");
    assert_eq!(got, want, "socktrace snapshot {line:?} vs ss -H {line:?}");
    if !with_state {
        assert!(states.len() <= 1, "ss printed no State column (one state), socktrace listed {states:?} for {line:?}");
    }
    (got.len(), states)
}

#[test]
fn ss_command_lines_select_what_ss_selects() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("sscl").unwrap();
    let held = build_all_states(&ns);
    // The scenario has every state the table relies on, in both families.
    let rows = snapshot_json(&["-N", &ns.name]);
    for (state, v6) in [("listen", false), ("listen", true), ("established", false), ("established", true), ("time-wait", false), ("time-wait", true), ("syn-recv", false), ("syn-recv", true)] {
        let n = rows.iter().filter(|r| r["state"] == state && r["laddr"].as_str().unwrap().contains(':') == v6).count();
        assert!(n > 0, "scenario lacks {state} ({})", if v6 { "IPv6" } else { "IPv4" });
    }
    let lines: &[&[&str]] = &[
        &["-tan"],
        &["-tn"],
        &["-tnp"],
        &["-tln"],
        &["-tlnp"],
        &["-tanp"],
        &["-tnpe"],
        &["-tani"],
        &["-tal"],
        &["-tla"],
        &["-4tan"],
        &["-tan6"],
        &["-A", "tcp", "-an"],
        &["-tan", "-f", "inet6"],
        &["-tan", "state", "established"],
        &["-tn", "state", "time-wait"],
        &["-tn", "state", "syn-recv"],
        &["-tn", "state", "syn-rcv", "state", "listening"],
        &["-tan", "state", "connected"],
        &["-tan", "state", "synchronized"],
        &["-tan", "state", "bucket"],
        &["-tan", "state", "big"],
        &["-tan", "state", "all"],
        &["-tn", "state", "all", "exclude", "listening"],
        &["-tan", "exclude", "established"],
        &["-tan", "exclude", "bucket", "exclude", "listening"],
        &["-tan", "state", "established", "( dport = :40001 or sport = :40001 )"],
        &["-tan", "state", "established", "(", "dport", "=", ":40007", "or", "sport", "=", ":40007", ")"],
        &["-tn", "sport = :40006 or dport = :40006"],
        &["-tan", "dst [::1]"],
        &["-tan", "src 127.0.0.1 and ! dport = :0"],
        &["-tn", "state", "established", "dst 127.0.0.0/8 and sport > :40000"],
        &["-tan", "sport >= :40003 and sport < :40006"],
        &["-tan", "exclude", "time-wait", "( src [::1] or src 127.0.0.1:40006 )"],
        &["-tlnH", "src *:40004"],
    ];
    let mut covered = BTreeSet::new();
    for line in lines {
        let (n, states) = same_as_ss(&ns, line);
        eprintln!("{n:>3} sockets, {states:?}: ss {}", line.join(" "));
        covered.extend(states);
    }
    for s in ["listen", "established", "time-wait", "syn-recv", "close-wait", "fin-wait-2"] {
        assert!(covered.contains(s), "no command line selected a {s} socket");
    }
    drop(held);
}

#[test]
fn summary_counts_match_ss_s_and_the_namespace_counters() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("sssum").unwrap();
    let held = build_all_states(&ns);
    let out = snapshot(&["-s", "--json", "-N", &ns.name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ss = ns.exec(&["ss", "-s"]).unwrap();
    let counters = ns.counters().unwrap();
    let listing = snapshot_json(&["-N", &ns.name]);
    eprintln!("{}\n{ss}", serde_json::to_string_pretty(&v).unwrap());
    let all = v.as_array().unwrap();
    assert_eq!(all.len(), 1);
    let s = &all[0];
    assert_eq!(s["netns"].as_u64(), Some(u64::from(ns.inode())));
    assert_eq!(s["netns_name"], ns.name.as_str());
    let state = |k: &str| s["states"][k].as_u64().unwrap_or_else(|| panic!("no {k} in {s}"));
    // ss -s: "TCP:   N (estab E, closed C, orphaned O, timewait T)" (estab is the namespace's
    // CurrEstab: established and close-wait sockets; timewait its sockstat tw) and the transport
    // table's "TCP  TOTAL IP IPv6" (hashed full sockets: everything but TIME-WAIT and request
    // sockets). The first number, closed and orphaned mix in host-wide counters.
    let tcp_line = ss.lines().find(|l| l.starts_with("TCP:")).unwrap();
    let field = |name: &str| -> u64 {
        let at = tcp_line.find(name).unwrap() + name.len();
        tcp_line[at..].trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    assert_eq!(state("established") + state("close-wait"), field("estab"), "estab");
    assert_eq!(state("time-wait"), field("timewait"), "timewait");
    let transport: u64 = ss.lines().find(|l| l.starts_with("TCP\t") || l.starts_with("TCP ")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let total = s["total"].as_u64().unwrap();
    assert_eq!(total - state("time-wait") - state("syn-recv"), transport, "hashed sockets");
    // Total and per state: what the listing shows.
    assert_eq!(total, u64::try_from(listing.len()).unwrap());
    let states = s["states"].as_object().unwrap();
    assert_eq!(states.values().map(|n| n.as_u64().unwrap()).sum::<u64>(), total);
    for (k, n) in states {
        assert_eq!(n.as_u64().unwrap(), u64::try_from(listing.iter().filter(|r| r["state"] == k.as_str()).count()).unwrap(), "{k}");
    }
    assert!(state("syn-recv") >= 4 && state("time-wait") >= 2 && state("listen") == 8, "{s}");
    for k in ["ListenOverflows", "ListenDrops", "SyncookiesSent"] {
        assert_eq!(s["counters"][k].as_i64(), Some(counters.get(&format!("TcpExt{k}"))), "{k}");
    }
    assert!(s["counters"]["ListenDrops"].as_i64().unwrap() >= 1, "the overflowed listener dropped SYNs");
    // The text form says the same.
    let text = String::from_utf8(snapshot(&["-s", "-N", &ns.name]).stdout).unwrap();
    assert!(text.contains(&format!("TCP: {total} (")) && text.contains(&format!("time-wait {}", state("time-wait"))), "{text}");
    drop(held);
}

#[test]
fn ss_flags_for_other_protocols_and_bad_lines_are_one_line_errors() {
    for (args, needle) in [
        (&["-u"][..], "-u (UDP): socktrace lists TCP sockets only"),
        (&["-tuln"], "-u (UDP)"),
        (&["-x"], "-x (Unix sockets)"),
        (&["-w"], "-w (raw sockets)"),
        (&["-A", "udp"], "TCP sockets only"),
        (&["-f", "unix"], "TCP sockets only"),
        (&["-tan", "state", "bogus"], "bad filter at 7: unknown state \"bogus\""),
        (&["-tan", "sport = :1", "state", "listening"], "bad filter at 12: \"state\" comes before the expression"),
        (&["--state", "established", "state", "listening"], "give one of them"),
        (&["-tan", "netns"], "bad filter at 6: expected a network namespace"),
    ] {
        let out = snapshot(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line for {args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(out.stdout.is_empty());
    }
}

/// (pid, comm, fd) holders per socket inode of `snapshot --json --netns NS --owners SOURCE`.
fn holders(ns: &NetNs, source: &str) -> BTreeMap<u64, BTreeSet<(u64, String, u64)>> {
    snapshot_json(&["--netns", &ns.name, "--owners", source])
        .iter()
        .filter_map(|s| {
            let set = s["processes"]
                .as_array()
                .expect("processes listed")
                .iter()
                .map(|p| (p["pid"].as_u64().unwrap(), p["comm"].as_str().unwrap().to_owned(), p["fd"].as_u64().unwrap()))
                .collect();
            Some((s["inode"].as_u64()?, set))
        })
        .collect()
}

/// The BPF task-file iterator and the /proc/*/fd scan find the same holders: a few hundred
/// sockets held by the (multi-threaded) test process and by four `sleep` children that inherit
/// different, partly overlapping batches of them.
#[test]
fn iterator_owners_equal_the_proc_scan() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("snapown").unwrap();
    let (listeners, mut batches) = ns
        .within(|| {
            let listeners: Vec<TcpListener> = (0..4).map(|i| listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 33_100 + i)), 64)).collect();
            // 4 batches of 35 to 50 pairs (varied so no two children hold the same count).
            let batches: Vec<Vec<TcpStream>> = (0..4)
                .map(|b| {
                    (0..35 + 5 * b)
                        .flat_map(|i| {
                            let l = &listeners[i % listeners.len()];
                            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                            let (s, _) = l.accept().unwrap();
                            [c, s]
                        })
                        .collect()
                })
                .collect();
            (listeners, batches)
        })
        .unwrap();
    let mut children = Vec::new();
    let mut expected: Vec<(u32, usize)> = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        // Each child inherits its batch and the next one (so sockets have two holders), listeners
        // go to the first child only.
        let mut inherit: Vec<i32> = batch.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        if let Some(next) = batches.get(b + 1) {
            inherit.extend(next.iter().map(std::os::fd::AsRawFd::as_raw_fd));
        }
        if b == 0 {
            inherit.extend(listeners.iter().map(std::os::fd::AsRawFd::as_raw_fd));
        }
        for &fd in &inherit {
            // SAFETY: clearing FD_CLOEXEC on fds this process owns, so the child inherits them.
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        }
        let child = Command::new("sleep").arg("600").stdin(Stdio::null()).stdout(Stdio::null()).spawn().unwrap();
        for &fd in &inherit {
            // SAFETY: as above, restoring FD_CLOEXEC.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        expected.push((child.id(), inherit.len()));
        children.push(child);
    }
    // The test process keeps the first two batches and the listeners; the rest only the children hold.
    batches.truncate(2);
    std::thread::sleep(Duration::from_millis(100));

    let bpf = holders(&ns, "bpf");
    let proc = holders(&ns, "proc");
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert!(bpf.len() >= 4 + 2 * (35 + 40 + 45 + 50), "{} sockets listed", bpf.len());
    assert_eq!(bpf, proc, "iterator vs /proc scan");
    for (pid, n) in expected {
        let held = bpf.values().flatten().filter(|h| h.0 == u64::from(pid)).count();
        assert_eq!(held, n, "sockets of child {pid}");
        assert!(bpf.values().flatten().any(|h| h.0 == u64::from(pid) && h.1 == "sleep"), "child {pid} named sleep");
    }
    let me = u64::from(std::process::id());
    let mine = bpf.values().flatten().filter(|h| h.0 == me).count();
    assert_eq!(mine, 4 + 2 * (35 + 40), "sockets of the test process (threads not listed again)");
    drop((listeners, batches));
}

/// Every namespace at once (no `--netns`), dumped a few namespaces at a time: with more
/// namespaces than cores, each namespace's listener is listed exactly once, under its namespace,
/// each namespace's rows together, and the text table has the same rows in the same order.
#[test]
fn all_namespaces_each_listed_once_and_together() {
    if !privileged() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let count = cores * 2 + 1;
    let spaces: Vec<NetNs> = (0..count).map(|i| NetNs::new(&format!("snapall{i}")).unwrap()).collect();
    let held: Vec<TcpListener> = spaces
        .iter()
        .enumerate()
        .map(|(i, ns)| ns.within(move || listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 43000 + i as u16)), 8)).unwrap())
        .collect();
    let rows = snapshot_json(&["-l", "--no-processes"]);
    let mut order: Vec<u64> = Vec::new();
    for r in &rows {
        let ns = r["netns"].as_u64().unwrap();
        if order.last() != Some(&ns) {
            assert!(!order.contains(&ns), "rows of namespace {ns} are not together: {rows:?}");
            order.push(ns);
        }
    }
    for (i, ns) in spaces.iter().enumerate() {
        let port = 43000 + i as u64;
        let mine: Vec<&Value> = rows.iter().filter(|r| r["netns"].as_u64() == Some(u64::from(ns.inode()))).collect();
        assert_eq!(mine.len(), 1, "namespace {} has one listener: {mine:?}", ns.name);
        assert_eq!(mine[0]["lport"].as_u64(), Some(port), "{:?}", mine[0]);
    }
    // This test's namespaces only: others may come and go between the two runs.
    let text = snapshot(&["-l", "--no-processes", "--no-header"]);
    assert!(text.status.success());
    let names: Vec<&str> = spaces.iter().map(|ns| ns.name.as_str()).collect();
    let ports: Vec<u64> = String::from_utf8_lossy(&text.stdout)
        .lines()
        .filter(|l| l.split_whitespace().last().is_some_and(|n| names.contains(&n)))
        .map(|l| l.split_whitespace().nth(4).and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {l:?}")))
        .collect();
    let inodes: Vec<u64> = spaces.iter().map(|ns| u64::from(ns.inode())).collect();
    let json_ports: Vec<u64> = rows.iter().filter(|r| r["netns"].as_u64().is_some_and(|n| inodes.contains(&n))).map(|r| r["lport"].as_u64().unwrap()).collect();
    assert_eq!(ports.len(), count, "{ports:?}");
    assert_eq!(ports, json_ports, "the table lists what the JSON lists, in the same order");
    drop(held);
}
