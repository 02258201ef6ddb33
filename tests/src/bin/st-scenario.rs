//! Traffic for socktrace's integration tests, run as its own process so it can join a test's
//! network namespace and cgroup before opening sockets. Prints JSON lines: `{"ready":…}` once
//! listening (server) or started (clients), then one line per connection, then a summary.
//!
//! `st-scenario server --netns NAME [--cgroup DIR] --addr IP:PORT --backlog N [--accept-after-ms A]
//!                     [--accept-delay-ms D] [--run-ms T] [--max-accepts N] [--drain]`
//! `st-scenario clients --netns NAME --addr IP:PORT --count N [--hold-ms H] [--send-chunks K]
//!                      [--chunk-bytes B] [--connect-timeout-ms T]`

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
        ),
        "clients" => clients(
            addr,
            num("count", 10)?,
            Duration::from_millis(num("hold-ms", 500)?),
            num("send-chunks", 0)?,
            usize::try_from(num("chunk-bytes", 100)?)?,
            Duration::from_millis(num("connect-timeout-ms", 15000)?),
        ),
        other => anyhow::bail!("unknown mode {other:?} (server|clients)"),
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

fn server(
    addr: SocketAddr,
    backlog: i32,
    accept_after: Duration,
    accept_delay: Duration,
    run: Duration,
    max_accepts: u64,
    drain: bool,
) -> anyhow::Result<()> {
    let listener = listen(addr, backlog)?;
    let start = Instant::now();
    emit(&json!({"ready": true, "pid": std::process::id()}));
    std::thread::sleep(accept_after);
    listener.set_nonblocking(true)?;
    let mut accepted = 0u64;
    let mut drains = Vec::new();
    while start.elapsed() < run && accepted < max_accepts {
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

fn clients(
    addr: SocketAddr,
    count: u64,
    hold: Duration,
    chunks: u64,
    chunk_bytes: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    emit(&json!({"ready": true, "pid": std::process::id()}));
    let handles: Vec<_> = (0..count)
        .map(|_| {
            std::thread::spawn(move || {
                let started = monotonic_ns();
                match TcpStream::connect_timeout(&addr, timeout) {
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
                        std::thread::sleep(hold);
                        json!({"event": "connect", "ok": true, "lport": lport, "started_ns": started, "connected_ns": connected, "sent_bytes": sent})
                    }
                    Err(e) => json!({"event": "connect", "ok": false, "error": e.to_string()}),
                }
            })
        })
        .collect();
    let mut ok = 0u64;
    for h in handles {
        let v = h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        if v["ok"] == true {
            ok += 1;
        }
        emit(&v);
    }
    emit(&json!({"event": "done", "connected": ok}));
    Ok(())
}
