//! The floor of a hook set: a program that does nothing (`r0 = N; exit`) on every attach point a
//! socktrace mode uses here (`socktrace probes --json`), loaded and attached by the bench itself
//! with bpf(2). What such a set costs a connection is what any tracer using those hooks pays
//! before doing any work: the dispatch into each program, and for the syscall tracepoints the slow
//! path every syscall of every task takes while one is attached. socktrace's own cost minus the
//! floor is what its programs' work adds.
//!
//! `tp_btf/X` points are attached as `raw_tp/X` (the same dispatch, `bpf_trace_run`, without a
//! BTF id to look up); the cgroup_skb program returns 1 (pass) and is attached with a BPF link on
//! the cgroup-v2 root (`socktrace_tests::cgroup2_root`), as socktrace's is. Everything is detached when [`Floor`] is dropped
//! (closing the link, raw-tracepoint and perf-event fds).

use std::{
    ffi::CString,
    fs::{self, File},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Empty programs attached to a mode's hooks; detached on drop.
pub struct Floor {
    /// Link, raw-tracepoint and perf-event fds, then the program fds.
    _fds: Vec<OwnedFd>,
}

const BPF_PROG_LOAD: i64 = 5;
const BPF_RAW_TRACEPOINT_OPEN: i64 = 17;
const BPF_LINK_CREATE: i64 = 28;
const PROG_TRACEPOINT: u32 = 5;
const PROG_CGROUP_SKB: u32 = 8;
const PROG_RAW_TRACEPOINT: u32 = 17;
const CGROUP_INET_INGRESS: u32 = 0;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// The attach points `socktrace probes --json [extra]` reports in use (each occurrence: a point
/// used by two signals has two programs there, as in socktrace).
pub fn points(socktrace: &Path, extra: &[&str]) -> anyhow::Result<Vec<String>> {
    let out = Command::new(socktrace).args(["probes", "--json"]).args(extra).output().context("running socktrace probes")?;
    let v: Value = serde_json::from_slice(&out.stdout).context("parsing socktrace probes --json")?;
    let points: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["attached"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_owned))
        .filter(|a| ["tracepoint/", "raw_tp/", "tp_btf/", "cgroup_skb/"].iter().any(|p| a.starts_with(p)))
        .collect();
    if points.is_empty() {
        bail!("socktrace probes --json {} reported no attach point", extra.join(" "));
    }
    Ok(points)
}

/// The attach points of `serve` and of `serve --accept-hooks off` here, for the floor configurations.
pub struct FloorPoints {
    pub serve: Vec<String>,
    pub off: Vec<String>,
}

impl FloorPoints {
    pub fn of(ctx: &super::Ctx) -> anyhow::Result<FloorPoints> {
        Ok(FloorPoints { serve: points(&ctx.socktrace, &[])?, off: points(&ctx.socktrace, &["--accept-hooks", "off"])? })
    }

    pub fn get(&self, off: bool) -> &[String] {
        if off { &self.off } else { &self.serve }
    }

    /// The report's floor lines, from median CPU µs per `unit` (connection, request): untraced,
    /// then (socktrace, its floor) for `serve` and for `serve --accept-hooks off`.
    pub fn summary(&self, unit: &str, untraced: f64, modes: [(f64, f64); 2]) -> String {
        let line = |name: &str, (tracer, floor): (f64, f64)| {
            format!(
                "- {name}: the hooks alone (empty programs) add {:+.2} µs per {unit}, **{:.3}× untraced** at best; socktrace adds {:+.2} µs above them ({:.3}×)\n",
                floor - untraced,
                untraced / floor,
                tracer - floor,
                untraced / tracer,
            )
        };
        format!(
            "Floors (empty programs attached by the bench with bpf(2) where the mode attaches socktrace's, `tp_btf` as `raw_tp`; `serve`: {}; `--accept-hooks off`: {}):\n\n{}{}",
            self.serve.join(", "),
            self.off.join(", "),
            line("`serve`", modes[0]),
            line("`serve --accept-hooks off`", modes[1])
        )
    }
}

impl Floor {
    /// Loads an empty program for each of `points` and attaches it; `cgroup` is the cgroup-v2
    /// directory for `cgroup_skb/ingress`.
    pub fn attach(points: &[String], cgroup: &Path) -> anyhow::Result<Floor> {
        let mut fds = Vec::new();
        for p in points {
            if let Some(tp) = p.strip_prefix("tracepoint/") {
                let prog = load(PROG_TRACEPOINT, 0, 0)?;
                fds.push(perf_tracepoint(tp, &prog).with_context(|| format!("attaching to {p}"))?);
                fds.push(prog);
            } else if let Some(tp) = p.strip_prefix("raw_tp/").or_else(|| p.strip_prefix("tp_btf/")) {
                let prog = load(PROG_RAW_TRACEPOINT, 0, 0)?;
                fds.push(raw_tracepoint(tp, &prog).with_context(|| format!("attaching to {p}"))?);
                fds.push(prog);
            } else if p == "cgroup_skb/ingress" {
                let prog = load(PROG_CGROUP_SKB, CGROUP_INET_INGRESS, 1)?;
                let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
                let mut attr = [0u32; 16];
                attr[0] = fd_u32(&prog);
                attr[1] = u32::try_from(dir.as_raw_fd())?;
                attr[2] = CGROUP_INET_INGRESS;
                fds.push(bpf(BPF_LINK_CREATE, &attr).with_context(|| format!("attaching to {p} of {}", cgroup.display()))?);
                fds.push(prog);
            } else {
                bail!("no empty program for attach point {p}");
            }
        }
        Ok(Floor { _fds: fds })
    }
}

fn fd_u32(fd: &OwnedFd) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// bpf(2) with `attr`; the fd it returns.
fn bpf(cmd: i64, attr: &[u32]) -> anyhow::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed; the kernel reads only that.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), std::mem::size_of_val(attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a new fd this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) })
}

/// `r0 = ret; exit` as a program of `prog_type`.
fn load(prog_type: u32, expected_attach: u32, ret: i32) -> anyhow::Result<OwnedFd> {
    // BPF_ALU64 | BPF_MOV | BPF_K (0xb7) into r0, then BPF_JMP | BPF_EXIT (0x95).
    let insns: [u64; 2] = [0xb7 | (u64::from(ret.cast_unsigned()) << 32), 0x95];
    let license = c"GPL";
    let mut attr = [0u32; 32];
    attr[0] = prog_type;
    attr[1] = 2; // insn_cnt
    let (ip, lp) = (insns.as_ptr() as u64, license.as_ptr() as u64);
    (attr[2], attr[3]) = (ip as u32, (ip >> 32) as u32);
    (attr[4], attr[5]) = (lp as u32, (lp >> 32) as u32);
    attr[17] = expected_attach; // expected_attach_type at byte 68
    bpf(BPF_PROG_LOAD, &attr).context("loading an empty program")
}

fn raw_tracepoint(name: &str, prog: &OwnedFd) -> anyhow::Result<OwnedFd> {
    let name = CString::new(name)?;
    let p = name.as_ptr() as u64;
    let mut attr = [0u32; 4];
    (attr[0], attr[1]) = (p as u32, (p >> 32) as u32);
    attr[2] = fd_u32(prog);
    bpf(BPF_RAW_TRACEPOINT_OPEN, &attr)
}

/// A perf event on tracepoint `category/name` with `prog` attached (closing it detaches).
fn perf_tracepoint(tp: &str, prog: &OwnedFd) -> anyhow::Result<OwnedFd> {
    let id_file = ["/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events"]
        .iter()
        .map(|d| Path::new(d).join(tp).join("id"))
        .find(|p| p.exists())
        .with_context(|| format!("no tracefs id for {tp}"))?;
    let id: u64 = fs::read_to_string(&id_file)?.trim().parse().with_context(|| format!("parsing {}", id_file.display()))?;
    // struct perf_event_attr (PERF_ATTR_SIZE_VER5, 112 bytes): type, size, config, sample_period.
    let mut attr = [0u64; 14];
    attr[0] = 2 | (112 << 32); // PERF_TYPE_TRACEPOINT, size
    attr[1] = id;
    attr[2] = 1; // sample_period
    // SAFETY: perf_event_open with an attr of the size it declares; pid -1, cpu 0 (a tracepoint's
    // BPF program runs on every CPU), no group, close-on-exec.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), -1, 0, -1, PERF_FLAG_FD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a new fd this process owns.
    let ev = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) };
    const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
    const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
    // SAFETY: ioctls on the perf event fd with an int argument.
    if unsafe { libc::ioctl(ev.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()) } < 0 {
        return Err(std::io::Error::last_os_error()).context("PERF_EVENT_IOC_SET_BPF");
    }
    // SAFETY: as above.
    if unsafe { libc::ioctl(ev.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) } < 0 {
        return Err(std::io::Error::last_os_error()).context("PERF_EVENT_IOC_ENABLE");
    }
    Ok(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root only: each kind of attach point takes an empty program, and the cgroup_skb one passes
    /// traffic (a loopback connection still connects while it is attached).
    #[test]
    fn empty_programs_attach_and_pass_traffic() {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let points: Vec<String> =
            ["tracepoint/syscalls/sys_exit_getppid", "raw_tp/consume_skb", "tp_btf/kfree_skb", "cgroup_skb/ingress"].iter().map(|s| (*s).to_owned()).collect();
        let floor = Floor::attach(&points, &socktrace_tests::cgroup2_root().unwrap()).unwrap();
        assert_eq!(floor._fds.len(), 8);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        l.accept().unwrap();
        assert!(Floor::attach(&["kprobe/x".to_owned()], Path::new("/")).is_err());
    }
}
