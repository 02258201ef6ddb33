//! An `SO_REUSEPORT` test server for socktrace's integration tests: several LISTEN sockets on one
//! address and port, each in a numbered slot, accepted from by one poll loop that counts accepts
//! per socket (the ground truth for per-socket rows). Commands on stdin, one per line, let a test
//! close a slot's socket and open a new one in its place while the others keep serving.
//!
//! `st-reuseport --netns NAME [--cgroup DIR] --addr IP:PORT --sockets N --backlog B`
//!
//! stdout is JSON lines:
//! - `{"ready":true,"pid":P,"sockets":[{"slot":0,"inode":I},…]}` once every socket listens;
//! - `close K` → `{"event":"closed","slot":K,"inode":I,"accepts":A}` (A: accepted from it in all);
//! - `open K` → `{"event":"opened","slot":K,"inode":I}` (a new socket, its own count from 0);
//! - `stats` → `{"event":"stats","accepts":{"INODE":A,…}}` for every socket opened so far;
//! - `quit` or end of input → the same stats line, then exit.
//!
//! Accepted connections are closed at once.

use std::{
    collections::BTreeMap,
    io::BufRead as _,
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use serde_json::json;

fn main() {
    if let Err(e) = real_main() {
        eprintln!("st-reuseport: {e:#}");
        std::process::exit(1);
    }
}

struct Opts {
    addr: SocketAddr,
    sockets: usize,
    backlog: i32,
}

fn parse() -> anyhow::Result<(Opts, Option<String>, String)> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut get = BTreeMap::new();
    for pair in args.chunks(2) {
        let [k, v] = pair else { bail!("{:?} needs a value", pair[0]) };
        let k = k.strip_prefix("--").with_context(|| format!("unexpected argument {k:?}"))?;
        get.insert(k.to_owned(), v.clone());
    }
    let need = |k: &str| get.get(k).cloned().with_context(|| format!("--{k} is required"));
    let opts = Opts {
        addr: need("addr")?.parse().context("--addr")?,
        sockets: need("sockets")?.parse().context("--sockets")?,
        backlog: need("backlog")?.parse().context("--backlog")?,
    };
    ensure!(opts.sockets >= 1, "--sockets must be at least 1");
    Ok((opts, get.get("cgroup").cloned(), need("netns")?))
}

fn real_main() -> anyhow::Result<()> {
    let (opts, cgroup, netns) = parse()?;
    if let Some(cg) = cgroup {
        std::fs::write(format!("{cg}/cgroup.procs"), std::process::id().to_string()).context("joining the cgroup")?;
    }
    let f = std::fs::File::open(format!("/run/netns/{netns}")).with_context(|| format!("netns {netns}"))?;
    // SAFETY: valid fd; the process is still single-threaded.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    let mut slots: Vec<Option<(OwnedFd, u64)>> = Vec::new();
    for _ in 0..opts.sockets {
        slots.push(Some(listen(opts.addr, opts.backlog)?));
    }
    let mut accepts: BTreeMap<u64, u64> = slots.iter().flatten().map(|(_, ino)| (*ino, 0)).collect();
    let list: Vec<_> = slots.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|(_, ino)| json!({"slot": i, "inode": ino}))).collect();
    emit(&json!({"ready": true, "pid": std::process::id(), "sockets": list}));
    // stdin on a thread: the poll loop only looks at a channel between polls.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    loop {
        match rx.try_recv() {
            Ok(cmd) => {
                if !command(cmd.trim(), &mut slots, &mut accepts, &opts)? {
                    break;
                }
                continue;
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {}
        }
        serve_once(&slots, &mut accepts)?;
    }
    emit(&json!({"event": "stats", "accepts": stats(&accepts)}));
    Ok(())
}

/// Runs one command; false to stop.
fn command(cmd: &str, slots: &mut [Option<(OwnedFd, u64)>], accepts: &mut BTreeMap<u64, u64>, opts: &Opts) -> anyhow::Result<bool> {
    let (verb, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
    let slot = |arg: &str| -> anyhow::Result<usize> {
        let k: usize = arg.trim().parse().with_context(|| format!("slot in {cmd:?}"))?;
        ensure!(k < slots.len(), "no slot {k}");
        Ok(k)
    };
    match verb {
        "close" => {
            let k = slot(arg)?;
            let (fd, ino) = slots[k].take().with_context(|| format!("slot {k} is already closed"))?;
            drop(fd);
            emit(&json!({"event": "closed", "slot": k, "inode": ino, "accepts": accepts.get(&ino).copied().unwrap_or(0)}));
        }
        "open" => {
            let k = slot(arg)?;
            ensure!(slots[k].is_none(), "slot {k} is open");
            let (fd, ino) = listen(opts.addr, opts.backlog)?;
            accepts.insert(ino, 0);
            slots[k] = Some((fd, ino));
            emit(&json!({"event": "opened", "slot": k, "inode": ino}));
        }
        "stats" => emit(&json!({"event": "stats", "accepts": stats(accepts)})),
        "quit" => return Ok(false),
        other => bail!("unknown command {other:?} (close K | open K | stats | quit)"),
    }
    Ok(true)
}

fn stats(accepts: &BTreeMap<u64, u64>) -> serde_json::Map<String, serde_json::Value> {
    accepts.iter().map(|(ino, n)| (ino.to_string(), json!(n))).collect()
}

/// Waits up to 20 ms for pending connections and accepts every one (closing it at once).
fn serve_once(slots: &[Option<(OwnedFd, u64)>], accepts: &mut BTreeMap<u64, u64>) -> anyhow::Result<()> {
    let open: Vec<&(OwnedFd, u64)> = slots.iter().flatten().collect();
    let mut fds: Vec<libc::pollfd> = open.iter().map(|(fd, _)| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    if fds.is_empty() {
        std::thread::sleep(Duration::from_millis(20));
        return Ok(());
    }
    // SAFETY: a valid array of pollfd of the given length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), libc::nfds_t::try_from(fds.len())?, 20) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(());
        }
        bail!("poll: {e}");
    }
    for (p, (fd, ino)) in fds.iter().zip(open) {
        if p.revents & libc::POLLIN == 0 {
            continue;
        }
        loop {
            // SAFETY: accept4 on a listening fd; no address wanted.
            let c = unsafe { libc::accept4(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
            if c < 0 {
                break;
            }
            // SAFETY: a fresh fd from accept4, owned here; closed on drop.
            drop(unsafe { OwnedFd::from_raw_fd(c) });
            *accepts.entry(*ino).or_insert(0) += 1;
        }
    }
    Ok(())
}

/// A non-blocking `SO_REUSEPORT` listener on `addr` and its socket inode.
fn listen(addr: SocketAddr, backlog: i32) -> anyhow::Result<(OwnedFd, u64)> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket syscalls on a fresh fd, owned by `fd` from here on; each sockaddr is
    // built for its family and passed with its own size.
    unsafe {
        let raw = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0);
        ensure!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(raw);
        let one: libc::c_int = 1;
        let len = libc::socklen_t::try_from(size_of::<libc::c_int>())?;
        ensure!(libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, (&raw const one).cast(), len) == 0, "SO_REUSEPORT: {}", std::io::Error::last_os_error());
        let rc = match addr {
            SocketAddr::V4(a) => {
                let sa = libc::sockaddr_in {
                    sin_family: libc::sa_family_t::try_from(libc::AF_INET)?,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                    sin_zero: [0; 8],
                };
                libc::bind(raw, (&raw const sa).cast(), libc::socklen_t::try_from(size_of_val(&sa))?)
            }
            SocketAddr::V6(a) => {
                let sa = libc::sockaddr_in6 {
                    sin6_family: libc::sa_family_t::try_from(libc::AF_INET6)?,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                    sin6_scope_id: 0,
                };
                libc::bind(raw, (&raw const sa).cast(), libc::socklen_t::try_from(size_of_val(&sa))?)
            }
        };
        ensure!(rc == 0, "bind {addr}: {}", std::io::Error::last_os_error());
        ensure!(libc::listen(raw, backlog) == 0, "listen: {}", std::io::Error::last_os_error());
        let mut st: libc::stat = std::mem::zeroed();
        ensure!(libc::fstat(raw, &raw mut st) == 0, "fstat: {}", std::io::Error::last_os_error());
        Ok((fd, st.st_ino))
    }
}

fn emit(v: &serde_json::Value) {
    println!("{v}");
}
