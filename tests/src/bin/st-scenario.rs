//! Traffic for socktrace's integration tests, run as its own process so it can join a test's
//! network namespace and cgroup before opening sockets. Prints JSON lines: `{"ready":…}` once
//! listening (server) or started (clients), then one line per connection, then a summary.
//!
//! `st-scenario server --netns NAME [--cgroup DIR] --addr IP:PORT --backlog N [--accept-after-ms A]
//!                     [--accept-delay-ms D] [--run-ms T] [--max-accepts N] [--drain]`
//!                     [--reply-chunks K --chunk-bytes B] [--pause-ms P --pause-every-ms E]`
//!   `--pause-ms P --pause-every-ms E`: a pausing acceptor (a GC pause, a blocked event loop): no
//!   accept() during the last P ms of every E ms; each pause is printed as `{"event":"pause"}`
//!   with its CLOCK_MONOTONIC start and end.
//! `st-scenario clients --netns NAME --addr IP:PORT --count N [--hold-ms H] [--send-chunks K]
//!                      [--chunk-bytes B] [--connect-timeout-ms T] [--bursts K --burst-gap-ms G]`
//!                      [--rate R --duration-ms D]`
//!   `--rate R --duration-ms D`: steady arrivals instead of bursts, one connection every 1/R s for
//!   D ms (`--count` is then ignored).
//! `st-scenario storm --netns NAME --addr IP:PORT --threads T --duration-ms D [--connect-timeout-ms C]`:
//!   a connect storm from every CPU: T threads, thread i pinned to CPU i mod (CPUs), each
//!   connecting and closing at once in a loop for D ms (a dropped SYN waits up to C ms, default
//!   300); prints the connections made and failed.
//! `st-scenario synflood --netns NAME --addr IP:PORT --src-net A.B --rate PPS --duration-ms D`:
//!   raw SYNs from spoofed sources A.B.x.y (routed nowhere, so nobody answers the SYN-ACKs).

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _},
    time::{Duration, Instant},
};

use serde_json::json;
use socktrace_tests::monotonic_ns;

fn main() {
    if let Err(e) = real_main() {
        eprintln!("st-scenario: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let mut opts: HashMap<String, String> = HashMap::new();
    let mut flags = Vec::new();
    let rest: Vec<String> = args.collect();
    let mut i = 0;
    while i < rest.len() {
        let key = rest[i].trim_start_matches("--").to_owned();
        if key == "drain" {
            flags.push(key);
            i += 1;
        } else {
            let val = rest.get(i + 1).cloned().ok_or_else(|| anyhow::anyhow!("--{key} needs a value"))?;
            opts.insert(key, val);
            i += 2;
        }
    }
    let num = |k: &str, d: u64| opts.get(k).map_or(Ok(d), |v| v.parse::<u64>()).map_err(|e| anyhow::anyhow!("--{k}: {e}"));
    if let Some(cg) = opts.get("cgroup") {
        std::fs::write(format!("{cg}/cgroup.procs"), std::process::id().to_string())?;
    }
    let ns = opts.get("netns").ok_or_else(|| anyhow::anyhow!("--netns is required"))?;
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: valid fd; the process is still single-threaded.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!("setns: {}", std::io::Error::last_os_error());
    }
    let addr: SocketAddr = opts.get("addr").ok_or_else(|| anyhow::anyhow!("--addr is required"))?.parse()?;
    match mode.as_str() {
        "server" => server(
            addr,
            i32::try_from(num("backlog", 128)?)?,
            Duration::from_millis(num("accept-after-ms", 0)?),
            Duration::from_millis(num("accept-delay-ms", 0)?),
            Duration::from_millis(num("run-ms", 5000)?),
            num("max-accepts", u64::MAX)?,
            flags.iter().any(|f| f == "drain"),
            (num("reply-chunks", 0)?, usize::try_from(num("chunk-bytes", 200)?)?),
            (Duration::from_millis(num("pause-ms", 0)?), Duration::from_millis(num("pause-every-ms", 0)?)),
        ),
        "synflood" => synflood(
            addr,
            opts.get("src-net").map_or("10.78", String::as_str),
            num("rate", 1000)?,
            Duration::from_millis(num("duration-ms", 3000)?),
        ),
        "clients" => clients(
            addr,
            num("count", 10)?,
            Duration::from_millis(num("hold-ms", 500)?),
            num("send-chunks", 0)?,
            usize::try_from(num("chunk-bytes", 100)?)?,
            Duration::from_millis(num("connect-timeout-ms", 15000)?),
            (num("bursts", 1)?, Duration::from_millis(num("burst-gap-ms", 1000)?)),
            (num("rate", 0)?, Duration::from_millis(num("duration-ms", 0)?)),
        ),
        "storm" => storm(
            addr,
            num("threads", 8)?,
            Duration::from_millis(num("duration-ms", 2000)?),
            Duration::from_millis(num("connect-timeout-ms", 300)?),
        ),
        other => anyhow::bail!("unknown mode {other:?} (server|clients|storm|synflood)"),
    }
}

fn listen(addr: SocketAddr, backlog: i32) -> anyhow::Result<TcpListener> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket syscalls on a fresh fd; sockaddr built for the right family.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&raw const one).cast(), 4);
        let rc = match addr {
            SocketAddr::V4(a) => {
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                    sin_zero: [0; 8],
                };
                libc::bind(fd, (&raw const sa).cast(), std::mem::size_of_val(&sa) as u32)
            }
            SocketAddr::V6(a) => {
                let sa = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                    sin6_scope_id: 0,
                };
                libc::bind(fd, (&raw const sa).cast(), std::mem::size_of_val(&sa) as u32)
            }
        };
        anyhow::ensure!(rc == 0, "bind {addr}: {}", std::io::Error::last_os_error());
        anyhow::ensure!(libc::listen(fd, backlog) == 0, "listen: {}", std::io::Error::last_os_error());
        Ok(TcpListener::from_raw_fd(fd))
    }
}

fn emit(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

#[expect(clippy::too_many_arguments, reason = "one argument per command-line option")]
fn server(
    addr: SocketAddr,
    backlog: i32,
    accept_after: Duration,
    accept_delay: Duration,
    run: Duration,
    max_accepts: u64,
    drain: bool,
    (reply_chunks, reply_bytes): (u64, usize),
    (pause, every): (Duration, Duration),
) -> anyhow::Result<()> {
    anyhow::ensure!(pause < every || every.is_zero(), "--pause-ms must be shorter than --pause-every-ms");
    let listener = listen(addr, backlog)?;
    let start = Instant::now();
    emit(&json!({"ready": true, "pid": std::process::id()}));
    std::thread::sleep(accept_after);
    listener.set_nonblocking(true)?;
    let mut accepted = 0u64;
    let mut drains = Vec::new();
    while start.elapsed() < run && accepted < max_accepts {
        if !every.is_zero() && !pause.is_zero() {
            let phase = Duration::from_nanos(u64::try_from(start.elapsed().as_nanos() % every.as_nanos()).unwrap_or(0));
            if phase + pause >= every {
                let from = monotonic_ns();
                std::thread::sleep(every.saturating_sub(phase));
                emit(&json!({"event": "pause", "start_ns": from, "end_ns": monotonic_ns()}));
                continue;
            }
        }
        let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&raw mut pfd, 1, 20) };
        match listener.accept() {
            Ok((stream, peer)) => {
                let ts = monotonic_ns();
                accepted += 1;
                emit(&json!({"event": "accept", "rport": peer.port(), "ts_ns": ts}));
                if drain {
                    stream.set_nonblocking(false)?;
                    drains.push(std::thread::spawn(move || {
                        let mut s = stream;
                        let _ = s.set_nodelay(true);
                        let chunk = vec![0xa5u8; reply_bytes];
                        for _ in 0..reply_chunks {
                            if s.write_all(&chunk).is_err() {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        let mut buf = [0u8; 65536];
                        let mut total = 0u64;
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            total += n as u64;
                        }
                        total
                    }));
                } else {
                    drop(stream);
                }
                std::thread::sleep(accept_delay);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    let received: u64 = drains.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    emit(&json!({"event": "done", "accepted": accepted, "received_bytes": received}));
    Ok(())
}

#[expect(clippy::too_many_arguments, reason = "one argument per command-line option")]
fn clients(
    addr: SocketAddr,
    count: u64,
    hold: Duration,
    chunks: u64,
    chunk_bytes: usize,
    timeout: Duration,
    (bursts, gap): (u64, Duration),
    (rate, duration): (u64, Duration),
) -> anyhow::Result<()> {
    emit(&json!({"ready": true, "pid": std::process::id()}));
    let mut handles = Vec::new();
    // Arrival times: `bursts` bursts of `count`, or a steady `rate` per second for `duration`.
    let schedule: Vec<(Duration, u64)> = if rate > 0 {
        let n = u64::try_from(duration.as_millis()).unwrap_or(0) * rate / 1000;
        (0..n).map(|i| (Duration::from_micros(i * 1_000_000 / rate), 1)).collect()
    } else {
        (0..bursts).map(|b| (gap * u32::try_from(b).unwrap_or(u32::MAX), count)).collect()
    };
    let t0 = Instant::now();
    for (at, count) in schedule {
        std::thread::sleep(at.saturating_sub(t0.elapsed()));
        handles.extend((0..count).map(|_| {
            std::thread::spawn(move || {
                let started = monotonic_ns();
                let line = match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(mut s) => {
                        let connected = monotonic_ns();
                        let lport = s.local_addr().map(|a| a.port()).unwrap_or(0);
                        let _ = s.set_nodelay(true);
                        let buf = vec![0x5a; chunk_bytes];
                        let mut sent = 0u64;
                        for _ in 0..chunks {
                            if s.write_all(&buf).is_err() {
                                break;
                            }
                            sent += buf.len() as u64;
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        // Read whatever the server sends while holding the connection.
                        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
                        let until = Instant::now() + hold;
                        let mut received = 0u64;
                        let mut rbuf = [0u8; 65536];
                        while Instant::now() < until {
                            match s.read(&mut rbuf) {
                                Ok(0) => std::thread::sleep(Duration::from_millis(10)),
                                Ok(n) => received += n as u64,
                                Err(_) => {}
                            }
                        }
                        json!({"event": "connect", "ok": true, "lport": lport, "started_ns": started, "connected_ns": connected, "sent_bytes": sent, "received_bytes": received})
                    }
                    Err(e) => json!({"event": "connect", "ok": false, "error": e.to_string()}),
                };
                // Printed as each connection ends, so a test reading a run still in progress sees it.
                emit(&line);
                line["ok"] == true
            })
        }));
    }
    let mut ok = 0u64;
    for h in handles {
        if h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))? {
            ok += 1;
        }
    }
    emit(&json!({"event": "done", "connected": ok}));
    Ok(())
}

fn storm(addr: SocketAddr, threads: u64, duration: Duration, timeout: Duration) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    emit(&json!({"ready": true, "pid": std::process::id(), "cpus": cpus}));
    let until = Instant::now() + duration;
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let cpu = usize::try_from(i).unwrap_or(0) % cpus;
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it (cpu < CPUs).
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set);
                }
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < until {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            ok += 1;
                            drop(s);
                        }
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0u64, 0u64);
    for h in handles {
        let (o, f) = h.join().map_err(|_| anyhow::anyhow!("storm thread panicked"))?;
        ok += o;
        failed += f;
    }
    emit(&json!({"event": "done", "connected": ok, "failed": failed}));
    Ok(())
}

/// Internet checksum over `data` (ones' complement of the ones' complement sum).
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends bare SYNs with spoofed sources `src_net.x.y` to `dst` at `rate` per second.
fn synflood(dst: SocketAddr, src_net: &str, rate: u64, duration: Duration) -> anyhow::Result<()> {
    let SocketAddr::V4(dst) = dst else { anyhow::bail!("synflood is IPv4 only") };
    let prefix: Vec<u8> = src_net.split('.').map(str::parse).collect::<Result<_, _>>()?;
    anyhow::ensure!(prefix.len() == 2, "--src-net takes two octets, e.g. 10.78");
    // SAFETY: raw socket creation; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    anyhow::ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh socket we own; closing it at the end.
    let _guard = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    emit(&json!({"ready": true, "pid": std::process::id()}));
    let start = Instant::now();
    let mut sent = 0u64;
    let mut seed: u32 = 0x9e37_79b9 ^ std::process::id();
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    while start.elapsed() < duration {
        let due = start.elapsed().as_secs_f64() * rate as f64;
        if (sent as f64) >= due {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let r = rnd();
        let src = [prefix[0], prefix[1], (r >> 8) as u8, (r as u8).max(1)];
        let sport = 1024 + (rnd() % 60000) as u16;
        let mut pkt = [0u8; 40];
        pkt[0] = 0x45;
        pkt[2..4].copy_from_slice(&40u16.to_be_bytes());
        pkt[4..6].copy_from_slice(&(rnd() as u16).to_be_bytes());
        pkt[8] = 64;
        pkt[9] = 6;
        pkt[12..16].copy_from_slice(&src);
        pkt[16..20].copy_from_slice(&dst.ip().octets());
        let ipsum = checksum(&pkt[..20], 0);
        pkt[10..12].copy_from_slice(&ipsum.to_be_bytes());
        let tcp = &mut pkt[20..];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&rnd().to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        let mut pseudo = 0u32;
        for w in [&src[..], &dst.ip().octets()[..]] {
            pseudo += u32::from(u16::from_be_bytes([w[0], w[1]])) + u32::from(u16::from_be_bytes([w[2], w[3]]));
        }
        pseudo += 6 + 20;
        let tsum = checksum(tcp, pseudo);
        tcp[16..18].copy_from_slice(&tsum.to_be_bytes());
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst.ip().octets()) },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffer and sockaddr.
        let n = unsafe { libc::sendto(fd, pkt.as_ptr().cast(), pkt.len(), 0, (&raw const sa).cast(), std::mem::size_of_val(&sa) as u32) };
        anyhow::ensure!(n == 40, "sendto: {}", std::io::Error::last_os_error());
        sent += 1;
    }
    emit(&json!({"event": "done", "sent": sent}));
    Ok(())
}
