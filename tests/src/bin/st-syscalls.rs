//! Syscall-heavy, network-free load for `cargo xtask bench syscalls`: how much enabling syscall
//! tracepoints (socktrace's accept hooks on kernels without fexit/kprobes) costs every other
//! syscall on the machine.
//!
//! `st-syscalls --secs T --call getppid|read`
//!   one thread calls `getppid(2)` (the cheapest syscall: almost only entry and exit) or
//!   `read(2)` of 64 bytes from /dev/zero in a tight loop for T seconds, then prints
//!   `{"call":…,"calls":N,"secs":…,"cpu_secs":…,"ns_per_call":…}` (CPU time per call).
//!
//! Not a test and not part of socktrace.

#![expect(clippy::cast_precision_loss, reason = "counts and times, far from the limits")]

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

fn main() {
    if let Err(e) = real_main() {
        eprintln!("st-syscalls: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut secs, mut call) = (3.0f64, "getppid".to_owned());
    for pair in args.chunks(2) {
        match pair {
            [k, v] if k == "--secs" => secs = v.parse().context("--secs")?,
            [k, v] if k == "--call" => call.clone_from(v),
            _ => bail!("usage: st-syscalls --secs T --call getppid|read"),
        }
    }
    let zero = std::fs::File::open("/dev/zero").context("/dev/zero")?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&zero);
    let mut buf = [0u8; 64];
    let one: Box<dyn FnMut()> = match call.as_str() {
        // SAFETY: no arguments, no memory touched.
        "getppid" => Box::new(|| unsafe {
            libc::syscall(libc::SYS_getppid);
        }),
        // SAFETY: fd is open for the whole loop, buf is ours and of the length given.
        "read" => Box::new(move || unsafe {
            libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        }),
        other => bail!("--call {other}: getppid or read"),
    };
    let mut one = one;
    let cpu0 = cpu_secs();
    let start = Instant::now();
    let until = Duration::from_secs_f64(secs);
    let mut calls = 0u64;
    while start.elapsed() < until {
        // Batches, so the clock read (a vDSO call, no syscall) costs little per call.
        for _ in 0..1000 {
            one();
        }
        calls += 1000;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    println!(
        "{}",
        serde_json::json!({"call": call, "calls": calls, "secs": wall, "cpu_secs": cpu, "ns_per_call": cpu / calls as f64 * 1e9})
    );
    Ok(())
}

/// This thread's user + system time.
fn cpu_secs() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
