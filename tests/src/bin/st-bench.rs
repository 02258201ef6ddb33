//! Load generator for `cargo xtask bench`: connection storms and idle socket populations, run in
//! a network namespace the caller created (it joins it before opening any socket, so traffic only
//! ever uses that namespace's loopback). Prints one JSON object on stdout per milestone.
//!
//! `st-bench storm --netns NAME [--port P] [--listeners L] [--servers S] [--clients C] [--secs T]
//!                  [--rate R] [--window W]`
//!   L listeners on 127.0.0.1:P.., S server threads (epoll + nonblocking accept4 until EAGAIN,
//!   closing each connection), C client threads connecting and closing as fast as they can, or at
//!   R connections/s in total (0: unlimited). `SO_LINGER` 0 on the clients: no `TIME_WAIT`. At most
//!   W (`--window`, default 512) connections may wait in accept queues: a client waits for the
//!   server rather than overflowing a queue (a dropped SYN stalls its client for the 1 s SYN
//!   retransmit timeout, which would measure the scheduler rather than the cost). Prints
//!   `{"connects":…,"errors":…,"accepted":…,"secs":…,"rate":…,"cpu_secs":…}`; accepted == connects when every
//!   connection was taken off its accept queue.
//! `st-bench hold --netns NAME [--port P] [--listeners L] [--conns N]`
//!   L listeners and N established connections (2N sockets, all accepted), then
//!   `{"ready":true,…}`, and holds them until stdin is closed. L + 2N must fit the fd limit (the
//!   hard limit is raised only with `CAP_SYS_RESOURCE`): run several for large populations.
//!
//! Not a test and not part of socktrace: it measures nothing about socktrace itself.

#![expect(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "socket struct sizes and rates, far from the limits"
)]

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::json;

fn main() {
    if let Err(e) = real_main() {
        eprintln!("st-bench: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let mut opts: HashMap<String, String> = HashMap::new();
    for pair in rest.chunks(2) {
        let [k, v] = pair else { bail!("{:?} needs a value", pair[0]) };
        let key = k.strip_prefix("--").with_context(|| format!("expected --option, got {k:?}"))?;
        opts.insert(key.to_owned(), v.clone());
    }
    let num = |k: &str, d: u64| opts.get(k).map_or(Ok(d), |v| v.parse::<u64>()).with_context(|| format!("--{k}"));
    let ns = opts.get("netns").context("--netns is required")?;
    join_netns(ns)?;
    let nofile = raise_nofile()?;
    // Short sleeps of the rate limiter must not be stretched by the default 50 µs timer slack.
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    let port = u16::try_from(num("port", 20000)?)?;
    let listeners = usize::try_from(num("listeners", 4)?)?;
    ensure!(listeners >= 1 && usize::from(port) + listeners <= 65536, "bad --port/--listeners");
    match mode.as_str() {
        "storm" => storm(&Storm {
            port,
            listeners,
            servers: usize::try_from(num("servers", 1)?)?.clamp(1, listeners),
            clients: usize::try_from(num("clients", 3)?)?.max(1),
            secs: Duration::from_secs_f64(opts.get("secs").map_or(Ok(5.0), |s| s.parse::<f64>()).context("--secs")?),
            rate: num("rate", 0)?,
            window: num("window", 512)?.max(1),
        }),
        "hold" => {
            let conns = usize::try_from(num("conns", 8000)?)?;
            ensure!((listeners + 2 * conns + 16) as u64 <= nofile, "{listeners} listeners + 2×{conns} sockets exceed the fd limit {nofile}");
            hold(port, listeners, conns)
        }
        other => bail!("unknown mode {other:?} (storm|hold)"),
    }
}

fn join_netns(name: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{name}")).with_context(|| format!("netns {name}"))?;
    // SAFETY: valid fd; called while the process is still single-threaded.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft fd limit to the hard one (raising the hard limit needs `CAP_SYS_RESOURCE`, which
/// the bench machines lack: callers split large socket populations over several processes).
fn raise_nofile() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointers.
    unsafe {
        ensure!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0, last_err("getrlimit"));
        lim.rlim_cur = lim.rlim_max;
        ensure!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) == 0, last_err("setrlimit"));
    }
    Ok(lim.rlim_max)
}

fn emit(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn sockaddr(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(Ipv4Addr::LOCALHOST.octets()) },
        sin_zero: [0; 8],
    }
}

const SOCKLEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

fn last_err(what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", std::io::Error::last_os_error())
}

fn set_int(fd: RawFd, level: i32, opt: i32, v: i32) {
    // SAFETY: valid fd and option buffer.
    unsafe { libc::setsockopt(fd, level, opt, (&raw const v).cast(), 4) };
}

/// Close sends RST and leaves no `TIME_WAIT` behind.
fn linger0(fd: RawFd) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, (&raw const l).cast(), std::mem::size_of::<libc::linger>() as u32)
    };
}

fn listen_on(port: u16) -> anyhow::Result<RawFd> {
    // SAFETY: socket syscalls on a fresh fd.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0);
        ensure!(fd >= 0, last_err("socket"));
        set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        let sa = sockaddr(port);
        ensure!(libc::bind(fd, (&raw const sa).cast(), SOCKLEN) == 0, last_err(&format!("bind 127.0.0.1:{port}")));
        ensure!(libc::listen(fd, 4096) == 0, last_err("listen"));
        Ok(fd)
    }
}

/// One blocking connect; returns the connected fd.
fn connect(port: u16) -> std::io::Result<RawFd> {
    // SAFETY: socket syscalls on a fresh fd.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sa = sockaddr(port);
        if libc::connect(fd, (&raw const sa).cast(), SOCKLEN) != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(fd)
    }
}

/// Accepts from `fds` until `stop` is set and nothing arrived for 50 ms. `keep` receives the
/// accepted fds instead of them being closed.
fn serve(fds: &[RawFd], stop: &AtomicBool, accepted: &AtomicU64, mut keep: Option<&mut Vec<RawFd>>) -> anyhow::Result<()> {
    // SAFETY: epoll on valid fds; events buffer sized as passed.
    unsafe {
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        ensure!(ep >= 0, last_err("epoll_create1"));
        for &fd in fds {
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: u64::try_from(fd)? };
            ensure!(libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &raw mut ev) == 0, last_err("epoll_ctl"));
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let mut idle_since: Option<Instant> = None;
        loop {
            let n = libc::epoll_wait(ep, events.as_mut_ptr(), 64, 20);
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                bail!(last_err("epoll_wait"));
            }
            let mut got = 0u64;
            for ev in events.iter().take(usize::try_from(n.max(0))?) {
                let lfd = i32::try_from(ev.u64)?;
                loop {
                    let c = libc::accept4(lfd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC);
                    if c < 0 {
                        break;
                    }
                    got += 1;
                    accepted.fetch_add(1, Ordering::Relaxed);
                    match keep.as_deref_mut() {
                        Some(v) => v.push(c),
                        None => {
                            // A plain close (FIN): the client's RST then removes the socket.
                            // (RST from here could fail the client's connect() before it returns.)
                            libc::close(c);
                        }
                    }
                }
            }
            if stop.load(Ordering::Relaxed) {
                if got > 0 {
                    idle_since = None;
                } else if idle_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_millis(50) {
                    break;
                }
            }
        }
        libc::close(ep);
    }
    Ok(())
}

struct Storm {
    port: u16,
    listeners: usize,
    servers: usize,
    clients: usize,
    secs: Duration,
    rate: u64,
    window: u64,
}

fn storm(s: &Storm) -> anyhow::Result<()> {
    let ports: Vec<u16> = (0..s.listeners).map(|i| s.port + u16::try_from(i).unwrap_or(0)).collect();
    let fds = ports.iter().map(|&p| listen_on(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let servers: Vec<_> = (0..s.servers)
        .map(|t| {
            let mine: Vec<RawFd> = fds.iter().enumerate().filter(|(i, _)| i % s.servers == t).map(|(_, &fd)| fd).collect();
            let (stop, accepted) = (Arc::clone(&stop), Arc::clone(&accepted));
            std::thread::spawn(move || serve(&mine, &stop, &accepted, None))
        })
        .collect();
    let start = Instant::now();
    let end = start + s.secs;
    // Per-thread pacing: connection k of a thread is due at start + k / (rate / clients).
    let interval = (s.rate > 0).then(|| Duration::from_secs_f64(s.clients as f64 / s.rate as f64));
    let connected = Arc::new(AtomicU64::new(0));
    let window = s.window;
    let clients: Vec<_> = (0..s.clients)
        .map(|c| {
            let ports = ports.clone();
            let (connected, accepted) = (Arc::clone(&connected), Arc::clone(&accepted));
            std::thread::spawn(move || {
                let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None::<String>);
                let mut k = c;
                let mut due = start;
                loop {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    if let Some(iv) = interval {
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        due += iv;
                    }
                    while connected.load(Ordering::Relaxed).saturating_sub(accepted.load(Ordering::Relaxed)) >= window {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    match connect(ports[k % ports.len()]) {
                        Ok(fd) => {
                            connected.fetch_add(1, Ordering::Relaxed);
                            linger0(fd);
                            // SAFETY: our fd.
                            unsafe { libc::close(fd) };
                            ok += 1;
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                    k += 1;
                }
                (ok, errors, first_error)
            })
        })
        .collect();
    let (mut connects, mut errors, mut first_error) = (0u64, 0u64, None);
    for h in clients {
        let (ok, err, fe) = h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        connects += ok;
        errors += err;
        first_error = first_error.or(fe);
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for h in servers {
        h.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    }
    emit(&json!({
        "connects": connects,
        "errors": errors,
        "first_error": first_error,
        "accepted": accepted.load(Ordering::Relaxed),
        "secs": secs,
        "rate": connects as f64 / secs,
        "cpu_secs": own_cpu_secs(),
    }));
    Ok(())
}

/// user + system CPU time of this process so far (every thread).
fn own_cpu_secs() -> f64 {
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn hold(port: u16, listeners: usize, conns: usize) -> anyhow::Result<()> {
    let ports: Vec<u16> = (0..listeners).map(|i| port + u16::try_from(i).unwrap_or(0)).collect();
    let fds = ports.iter().map(|&p| listen_on(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let server = {
        let (stop, accepted, fds) = (Arc::clone(&stop), Arc::clone(&accepted), fds.clone());
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            serve(&fds, &stop, &accepted, Some(&mut kept)).map(|()| kept)
        })
    };
    let start = Instant::now();
    let threads = 2;
    let clients: Vec<_> = (0..threads)
        .map(|t| {
            let ports = ports.clone();
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                for k in (t..conns).step_by(threads) {
                    kept.push(connect(ports[k % ports.len()]).with_context(|| format!("connection {k}"))?);
                }
                anyhow::Ok(kept)
            })
        })
        .collect();
    let mut client_fds = Vec::new();
    for h in clients {
        client_fds.extend(h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??);
    }
    stop.store(true, Ordering::Relaxed);
    let server_fds = server.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    emit(&json!({
        "ready": true,
        "listeners": fds.len(),
        "conns": client_fds.len(),
        "accepted": server_fds.len(),
        "sockets": fds.len() + client_fds.len() + server_fds.len(),
        "setup_secs": start.elapsed().as_secs_f64(),
    }));
    // Hold everything until the caller closes our stdin.
    let mut sink = [0u8; 64];
    while std::io::stdin().read(&mut sink).is_ok_and(|n| n > 0) {}
    Ok(())
}
