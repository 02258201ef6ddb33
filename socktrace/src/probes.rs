//! Loading and attaching the kernel programs, one signal at a time, best hook first.
//!
//! Every signal has an ordered list of candidate hooks (a hook may need several programs, e.g. a
//! kprobe/kretprobe pair). The first candidate that loads *and* attaches wins; each failure is kept
//! with its reason so `socktrace probes` can show what was tried, and a signal with no working hook
//! is reported as unavailable — never silently read as zero.

use std::{
    collections::BTreeSet,
    fmt,
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, FEntry, FExit, KProbe,
        ProgramError, RawTracePoint, TracePoint,
    },
};

use crate::{
    offsets::{ACCEPT_PARAMS, KernelLayout},
    pressure::{BoundedMap, MapSizes},
};

/// The kinds of kernel hook, in the order the user can name them in `--hooks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookKind {
    Fentry,
    Fexit,
    Kprobe,
    TpBtf,
    RawTp,
    Tracepoint,
    CgroupSkb,
}

impl HookKind {
    pub const ALL: [HookKind; 7] = [
        HookKind::Fentry,
        HookKind::Fexit,
        HookKind::Kprobe,
        HookKind::TpBtf,
        HookKind::RawTp,
        HookKind::Tracepoint,
        HookKind::CgroupSkb,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HookKind::Fentry => "fentry",
            HookKind::Fexit => "fexit",
            HookKind::Kprobe => "kprobe",
            HookKind::TpBtf => "tp_btf",
            HookKind::RawTp => "raw_tp",
            HookKind::Tracepoint => "tracepoint",
            HookKind::CgroupSkb => "cgroup_skb",
        }
    }

    pub fn parse(s: &str) -> Option<HookKind> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Name used in events (`socktrace_common::hook::*`).
    pub fn from_event(id: u32) -> &'static str {
        use socktrace_common::hook as h;
        match id {
            h::TP_BTF => "tp_btf",
            h::RAW_TP => "raw_tp",
            h::TRACEPOINT => "tracepoint",
            h::FENTRY => "fentry",
            h::FEXIT => "fexit",
            h::KPROBE => "kprobe",
            h::KRETPROBE => "kretprobe",
            h::CGROUP_SKB => "cgroup_skb",
            _ => "unknown",
        }
    }
}

/// `--accept-hooks`: which hooks may trace accept(2) and listen(2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptHooks {
    /// Best per-call hook: fexit, kprobe, else the syscall tracepoints.
    Auto,
    /// The syscall tracepoints only (what `auto` ends on where fexit and kprobes are missing).
    Syscalls,
    /// No accept, listen or enqueue hook: no syscall tracepoint at all. Accepts are derived from
    /// the children queued (`accept_count`) and the queue length; no accept wait, no acceptors.
    Off,
}

impl AcceptHooks {
    pub fn name(self) -> &'static str {
        match self {
            AcceptHooks::Auto => "auto",
            AcceptHooks::Syscalls => "syscalls",
            AcceptHooks::Off => "off",
        }
    }

    /// Why `--accept-hooks` rules out candidate `kind` of `signal` (`None`: allowed).
    fn excludes(self, signal: Signal, kind: HookKind) -> Option<String> {
        let per_accept = matches!(signal, Signal::Accept | Signal::Listen | Signal::Enqueue);
        match self {
            AcceptHooks::Auto => None,
            AcceptHooks::Syscalls => (signal == Signal::Accept && kind != HookKind::Tracepoint)
                .then(|| "disabled by --accept-hooks syscalls".to_owned()),
            AcceptHooks::Off if per_accept && signal == Signal::Enqueue => {
                Some("disabled by --accept-hooks off (only accept wait needs the enqueue time)".to_owned())
            }
            AcceptHooks::Off => per_accept.then(|| "disabled by --accept-hooks off".to_owned()),
        }
    }
}

/// What each `--accept-hooks` mode costs, measured by `cargo xtask bench syscalls` and `cargo
/// xtask bench accept` (docs/BENCHMARKS.md) on the reference machine named in [`COST_SOURCE`]:
/// (mode, ns added to every syscall of every process, ns of BPF programs per connection).
/// Syscall costs: the quiet 2026-12-03 11:55 run (no other tracer held syscall tracepoints); per
/// connection: both modes side by side in `cargo xtask bench accept` on a quiet machine
/// (2026-12-04 17:15 UTC: accept wait from the accepted socket's stamp, no enqueue program, the
/// accept program's reads cut).
pub const MODE_COSTS: [(AcceptHooks, &str, &str); 2] = [
    (AcceptHooks::Auto, "+39 ns per getppid, +45 ns per 64-byte read", "1.7 µs"),
    (AcceptHooks::Off, "+0 ns (no syscall tracepoint)", "1.4 µs"),
];

/// Where and when [`MODE_COSTS`] were measured.
pub const COST_SOURCE: &str = "2-vCPU Firecracker VM, Linux 6.18, fexit refused, no kprobes; 2026-12-03/04; docs/BENCHMARKS.md";

/// Where one program attaches.
#[derive(Clone, Copy, Debug)]
enum Attach {
    TpBtf(&'static str),
    RawTp(&'static str),
    Tracepoint(&'static str, &'static str),
    FEntry(&'static str),
    FExit(&'static str),
    KProbe(&'static str),
    KRetProbe(&'static str),
    CgroupSkbIngress,
}

impl fmt::Display for Attach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attach::TpBtf(t) => write!(f, "tp_btf/{t}"),
            Attach::RawTp(t) => write!(f, "raw_tp/{t}"),
            Attach::Tracepoint(c, n) => write!(f, "tracepoint/{c}/{n}"),
            Attach::FEntry(t) => write!(f, "fentry/{t}"),
            Attach::FExit(t) => write!(f, "fexit/{t}"),
            Attach::KProbe(t) => write!(f, "kprobe/{t}"),
            Attach::KRetProbe(t) => write!(f, "kretprobe/{t}"),
            Attach::CgroupSkbIngress => write!(f, "cgroup_skb/ingress"),
        }
    }
}

struct Prog {
    name: &'static str,
    attach: Attach,
}

struct Candidate {
    kind: HookKind,
    progs: &'static [Prog],
    /// A kernel fact this hook needs, checked before trying to load it.
    needs: Need,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    ListenOverflowReason,
    /// `inet_csk_accept`'s parameter count from BTF, one the fexit program can read past.
    AcceptParams,
    /// kfree_skb passes a reason and the kernel has NETFILTER_DROP or NO_SOCKET.
    PacketDropReason,
    /// The kernel's per-CPU ListenOverflows counter is readable (`KernelLayout::counted_drops`).
    CountedDrops,
    /// The saved registers' first syscall argument has an offset in BTF (`pt_regs_arg0`).
    SyscallArgRegs,
}

/// The signals socktrace traces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Signal {
    /// Start of the accept-queue wait (needed for accept latency).
    Enqueue,
    Accept,
    ListenOverflow,
    SynDrop,
    Retransmit,
    SynackRetransmit,
    /// listen(2) calls (the backlog asked for).
    Listen,
    /// Segments to a port dropped before any listener: by netfilter, or for want of a socket.
    PacketDrop,
    /// Children added to an accept queue, counted per listener: where no accept hook runs, the
    /// agent derives accepts from them and the queue length (no syscall tracepoint needed).
    Queued,
}

impl Signal {
    /// Accept before Queued: Queued is attached only when Accept has no hook.
    pub const ALL: [Signal; 9] = [
        Signal::Accept,
        Signal::Queued,
        Signal::Enqueue,
        Signal::ListenOverflow,
        Signal::SynDrop,
        Signal::Retransmit,
        Signal::SynackRetransmit,
        Signal::Listen,
        Signal::PacketDrop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Signal::Enqueue => "accept_wait",
            Signal::Accept => "accept",
            Signal::ListenOverflow => "listen_overflow",
            Signal::SynDrop => "syn_drop",
            Signal::Retransmit => "retransmit",
            Signal::SynackRetransmit => "synack_retransmit",
            Signal::Listen => "listen",
            Signal::PacketDrop => "packet_drop",
            Signal::Queued => "accept_count",
        }
    }

    fn candidates(self) -> &'static [Candidate] {
        match self {
            Signal::Enqueue => &[
                Candidate { kind: HookKind::TpBtf, progs: &[Prog { name: "enqueue_btf", attach: Attach::TpBtf("inet_sock_set_state") }], needs: Need::Nothing },
                Candidate { kind: HookKind::RawTp, progs: &[Prog { name: "enqueue_raw", attach: Attach::RawTp("inet_sock_set_state") }], needs: Need::Nothing },
            ],
            Signal::Queued => &[
                Candidate {
                    kind: HookKind::TpBtf,
                    progs: &[
                        Prog { name: "queued_btf", attach: Attach::TpBtf("sk_data_ready") },
                        Prog { name: "listen_close_btf", attach: Attach::TpBtf("inet_sock_set_state") },
                    ],
                    needs: Need::Nothing,
                },
                Candidate {
                    kind: HookKind::RawTp,
                    progs: &[
                        Prog { name: "queued_raw", attach: Attach::RawTp("sk_data_ready") },
                        Prog { name: "listen_close_raw", attach: Attach::RawTp("inet_sock_set_state") },
                    ],
                    needs: Need::Nothing,
                },
            ],
            Signal::Accept => &[
                Candidate { kind: HookKind::Fexit, progs: &[Prog { name: "accept_fexit", attach: Attach::FExit("inet_csk_accept") }], needs: Need::AcceptParams },
                Candidate {
                    kind: HookKind::Kprobe,
                    progs: &[
                        Prog { name: "accept_kprobe", attach: Attach::KProbe("inet_csk_accept") },
                        Prog { name: "accept_kretprobe", attach: Attach::KRetProbe("inet_csk_accept") },
                    ],
                    needs: Need::Nothing,
                },
                // The exit tracepoints alone: the listening fd is read from the syscall's saved
                // registers (bpf_task_pt_regs, 5.15+), no entry program and no ACCEPTING map.
                Candidate {
                    kind: HookKind::Tracepoint,
                    progs: &[
                        Prog { name: "accept4_exit_regs", attach: Attach::Tracepoint("syscalls", "sys_exit_accept4") },
                        Prog { name: "accept_exit_regs", attach: Attach::Tracepoint("syscalls", "sys_exit_accept") },
                    ],
                    needs: Need::SyscallArgRegs,
                },
                Candidate {
                    kind: HookKind::Tracepoint,
                    progs: &[
                        Prog { name: "accept4_enter", attach: Attach::Tracepoint("syscalls", "sys_enter_accept4") },
                        Prog { name: "accept4_exit", attach: Attach::Tracepoint("syscalls", "sys_exit_accept4") },
                        Prog { name: "accept_enter_tp", attach: Attach::Tracepoint("syscalls", "sys_enter_accept") },
                        Prog { name: "accept_exit_tp", attach: Attach::Tracepoint("syscalls", "sys_exit_accept") },
                    ],
                    needs: Need::Nothing,
                },
            ],
            Signal::ListenOverflow => &[
                Candidate { kind: HookKind::TpBtf, progs: &[Prog { name: "overflow_btf", attach: Attach::TpBtf("kfree_skb") }], needs: Need::ListenOverflowReason },
                Candidate { kind: HookKind::RawTp, progs: &[Prog { name: "overflow_raw", attach: Attach::RawTp("kfree_skb") }], needs: Need::ListenOverflowReason },
                // Entry + exit pairs (kind named after the entry, like kprobe + kretprobe): the
                // exit program reports the drop the kernel counted during the call.
                Candidate {
                    kind: HookKind::Fentry,
                    progs: &[
                        Prog { name: "overflow4_fentry", attach: Attach::FEntry("tcp_v4_syn_recv_sock") },
                        Prog { name: "overflow4_fexit", attach: Attach::FExit("tcp_v4_syn_recv_sock") },
                        Prog { name: "overflow6_fentry", attach: Attach::FEntry("tcp_v6_syn_recv_sock") },
                        Prog { name: "overflow6_fexit", attach: Attach::FExit("tcp_v6_syn_recv_sock") },
                    ],
                    needs: Need::Nothing,
                },
                Candidate {
                    kind: HookKind::Kprobe,
                    progs: &[
                        Prog { name: "overflow4_kprobe", attach: Attach::KProbe("tcp_v4_syn_recv_sock") },
                        Prog { name: "overflow4_kretprobe", attach: Attach::KRetProbe("tcp_v4_syn_recv_sock") },
                        Prog { name: "overflow6_kprobe", attach: Attach::KProbe("tcp_v6_syn_recv_sock") },
                        Prog { name: "overflow6_kretprobe", attach: Attach::KRetProbe("tcp_v6_syn_recv_sock") },
                    ],
                    needs: Need::Nothing,
                },
            ],
            Signal::SynDrop => &[
                Candidate {
                    kind: HookKind::Fentry,
                    progs: &[
                        Prog { name: "syn_drop_fentry", attach: Attach::FEntry("tcp_conn_request") },
                        Prog { name: "syn_drop_fexit", attach: Attach::FExit("tcp_conn_request") },
                    ],
                    needs: Need::Nothing,
                },
                Candidate {
                    kind: HookKind::Kprobe,
                    progs: &[
                        Prog { name: "syn_drop_kprobe", attach: Attach::KProbe("tcp_conn_request") },
                        Prog { name: "syn_drop_kretprobe", attach: Attach::KRetProbe("tcp_conn_request") },
                    ],
                    needs: Need::Nothing,
                },
                // Counted: the SYN's record is settled when its skb is freed (see syn_drop.rs);
                // the settling programs go first so no record waits for them.
                Candidate {
                    kind: HookKind::CgroupSkb,
                    progs: &[
                        Prog { name: "syn_settle_consume", attach: Attach::RawTp("consume_skb") },
                        Prog { name: "syn_settle_kfree", attach: Attach::RawTp("kfree_skb") },
                        Prog { name: "syn_drop_cgroup_counted", attach: Attach::CgroupSkbIngress },
                    ],
                    needs: Need::CountedDrops,
                },
                Candidate { kind: HookKind::CgroupSkb, progs: &[Prog { name: "syn_drop_cgroup", attach: Attach::CgroupSkbIngress }], needs: Need::Nothing },
            ],
            Signal::Retransmit => &[
                Candidate { kind: HookKind::TpBtf, progs: &[Prog { name: "retransmit_btf", attach: Attach::TpBtf("tcp_retransmit_skb") }], needs: Need::Nothing },
                Candidate { kind: HookKind::RawTp, progs: &[Prog { name: "retransmit_raw", attach: Attach::RawTp("tcp_retransmit_skb") }], needs: Need::Nothing },
            ],
            Signal::Listen => &[Candidate {
                kind: HookKind::Tracepoint,
                progs: &[Prog { name: "listen_enter", attach: Attach::Tracepoint("syscalls", "sys_enter_listen") }],
                needs: Need::Nothing,
            }],
            Signal::PacketDrop => &[
                Candidate { kind: HookKind::TpBtf, progs: &[Prog { name: "past_btf", attach: Attach::TpBtf("kfree_skb") }], needs: Need::PacketDropReason },
                Candidate { kind: HookKind::RawTp, progs: &[Prog { name: "past_raw", attach: Attach::RawTp("kfree_skb") }], needs: Need::PacketDropReason },
            ],
            Signal::SynackRetransmit => &[
                Candidate { kind: HookKind::TpBtf, progs: &[Prog { name: "synack_btf", attach: Attach::TpBtf("tcp_retransmit_synack") }], needs: Need::Nothing },
                Candidate { kind: HookKind::RawTp, progs: &[Prog { name: "synack_raw", attach: Attach::RawTp("tcp_retransmit_synack") }], needs: Need::Nothing },
            ],
        }
    }
}

/// What happened for one signal.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SignalReport {
    pub signal: &'static str,
    /// The hook in use (`None`: the signal is unavailable).
    pub hook: Option<&'static str>,
    /// Attach points of the hook in use.
    pub attached: Vec<String>,
    /// Hooks tried before (or instead of) it, with the reason each failed or was skipped.
    pub failed: Vec<HookFailure>,
    /// Caveats of the hook in use.
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct HookFailure {
    pub hook: &'static str,
    pub at: String,
    pub reason: String,
}

/// Options that decide how the programs are loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub btf: PathBuf,
    pub allowed: BTreeSet<HookKind>,
    /// cgroup-v2 directory the cgroup_skb hook attaches to.
    pub cgroup: PathBuf,
    pub ring_buffer_bytes: u32,
    pub accept_hooks: AcceptHooks,
    /// Where an accept's queue wait starts.
    pub wait_start: WaitStart,
    /// Capacities of the bounded maps.
    pub maps: MapSizes,
}

/// Where the accept-queue wait starts (`--wait-start`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WaitStart {
    /// The accepted socket's own establishment time (`tcp_sock.rcvq_space.time`, no program),
    /// where the kernel's BTF has the field; else the enqueue hook.
    Auto,
    /// The enqueue hook (`inet_sock_set_state` from LISTEN to SYN_RECV) and its `ENQUEUED` map.
    Enqueue,
}

/// What `accept_wait` reports when the accepted socket's stamp stands in for the enqueue hook.
const SOCKET_STAMP_HOOK: &str = "socket";
const SOCKET_STAMP_AT: &str = "tcp_sock.rcvq_space.time, read at accept";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this binary was built without its eBPF object (AYA_BUILD_SKIP was set); rebuild normally")]
    NoObject,
    #[error("kernel BTF {path} is not usable ({message}); {hint}", hint = crate::offsets::BTF_HINT)]
    Btf { path: PathBuf, message: String },
    #[error("loading the eBPF object failed: {0}")]
    Object(String),
}

/// The loaded programs and what each signal ended up using.
pub struct Tracer {
    pub ebpf: Ebpf,
    pub report: Vec<SignalReport>,
    /// What the programs were loaded with (which drop reasons this kernel has).
    pub offsets: socktrace_common::KernelOffsets,
    /// The `--accept-hooks` mode it was loaded in.
    pub accept_hooks: AcceptHooks,
    /// Capacities the bounded maps were created with.
    pub maps: MapSizes,
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/socktrace"));

/// Loads the object with `layout` as its globals and attaches every signal's best hook.
///
/// `btf` is the kernel BTF file's bytes (`opts.btf`), read once for the offsets and for this.
/// aya parses them here for the programs that attach by BTF id; `EbpfLoader::new()` parses the
/// running kernel's BTF once more by itself (aya 0.14 has no way to hand it ours).
pub fn load(layout: &KernelLayout, btf: &[u8], opts: &LoadOptions) -> Result<Tracer, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let btf = aya::Btf::parse(btf, aya::Endianness::default()).map_err(|e| LoadError::Btf { path: opts.btf.clone(), message: e.to_string() })?;
    let mut offsets = layout.offsets;
    if opts.wait_start == WaitStart::Enqueue {
        offsets.tcp_rcvq_time = socktrace_common::KernelOffsets::ABSENT;
    }
    let socket_stamp = offsets.tcp_rcvq_time != socktrace_common::KernelOffsets::ABSENT;
    let mut maps = opts.maps;
    if socket_stamp {
        // Nothing reads or writes ENQUEUED then: one entry instead of megabytes of locked memory.
        maps.pending = 0;
    }
    let mut loader = EbpfLoader::new();
    loader.btf(Some(&btf)).override_global("OFFSETS", &offsets, true).map_max_entries("EVENTS", opts.ring_buffer_bytes);
    for m in BoundedMap::ALL {
        loader.map_max_entries(m.name(), m.capacity(&maps).max(1));
    }
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|e| LoadError::Object(format!("{e:#}")))?;
    let cgroup = File::open(&opts.cgroup);
    let mut report = Vec::new();
    for signal in Signal::ALL {
        let mut rep = SignalReport {
            signal: signal.name(),
            hook: None,
            attached: Vec::new(),
            failed: Vec::new(),
            notes: Vec::new(),
        };
        let accept_traced = report.iter().any(|r: &SignalReport| r.signal == Signal::Accept.name() && r.hook.is_some());
        // With the socket stamp no program writes ENQUEUED (it has one entry): the accept
        // program, when there is one, reads the child's establishment time.
        if signal == Signal::Enqueue && socket_stamp && !accept_traced && opts.accept_hooks != AcceptHooks::Off {
            rep.failed.push(HookFailure { hook: SOCKET_STAMP_HOOK, at: SOCKET_STAMP_AT.to_owned(), reason: "not needed without an accept hook: the wait is measured at accept".to_owned() });
            report.push(rep);
            continue;
        }
        if signal == Signal::Enqueue && accept_traced && socket_stamp {
            rep.hook = Some(SOCKET_STAMP_HOOK);
            rep.attached = vec![SOCKET_STAMP_AT.to_owned()];
            rep.notes = vec![
                "no program: the wait starts at the accepted socket's establishment time, which the kernel sets (µs) right after queueing it".to_owned(),
                "a child accepted before its handshake completed (TFO) has no known wait (counted); --wait-start enqueue uses the enqueue hook instead".to_owned(),
            ];
            report.push(rep);
            continue;
        }
        for cand in signal.candidates() {
            let at = cand.progs.iter().map(|p| p.attach.to_string()).collect::<Vec<_>>().join(" + ");
            let skip = if signal == Signal::Queued && accept_traced {
                Some("not needed: accept is traced per call".to_owned())
            } else if !opts.allowed.contains(&cand.kind) {
                Some("disabled by --hooks".to_owned())
            } else if let Some(reason) = opts.accept_hooks.excludes(signal, cand.kind) {
                Some(reason)
            } else {
                unmet(cand.needs, layout)
            };
            let result = match skip {
                Some(reason) => Err(reason),
                None => attach_all(&mut ebpf, cand.progs, &btf, cgroup.as_ref(), opts),
            };
            match result {
                Ok(()) => {
                    rep.hook = Some(cand.kind.name());
                    rep.attached = cand.progs.iter().map(|p| p.attach.to_string()).collect();
                    rep.notes = notes(signal, cand.kind, cand.needs, layout);
                    break;
                }
                Err(reason) => rep.failed.push(HookFailure { hook: cand.kind.name(), at, reason }),
            }
        }
        report.push(rep);
    }
    Ok(Tracer { ebpf, report, offsets, accept_hooks: opts.accept_hooks, maps })
}

/// Why a kernel lacks what a candidate needs (`None`: it has it).
fn unmet(need: Need, layout: &KernelLayout) -> Option<String> {
    match need {
        Need::Nothing => None,
        Need::ListenOverflowReason => (!layout.has_listen_overflow_reason)
            .then(|| "kernel has no SKB_DROP_REASON_TCP_LISTEN_OVERFLOW with rx_sk in kfree_skb".to_owned()),
        Need::AcceptParams => match layout.accept_params {
            Some(n) if ACCEPT_PARAMS.contains(&n) => None,
            Some(n) => Some(format!(
                "inet_csk_accept has {n} parameters in BTF; the fexit program reads the return value after {}-{} only",
                ACCEPT_PARAMS.start(),
                ACCEPT_PARAMS.end()
            )),
            None => Some("kernel BTF has no function inet_csk_accept".to_owned()),
        },
        Need::SyscallArgRegs => (layout.offsets.pt_regs_arg0 == socktrace_common::KernelOffsets::ABSENT)
            .then(|| "kernel BTF's struct pt_regs has no di (x86-64) or orig_x0 (arm64)".to_owned()),
        Need::PacketDropReason => (!layout.netfilter_drops() && !layout.no_socket_drops())
            .then(|| "kernel's kfree_skb has no SKB_DROP_REASON_NETFILTER_DROP or NO_SOCKET".to_owned()),
        Need::CountedDrops => (!layout.counted_drops).then(|| {
            "the per-CPU ListenOverflows counter cannot be located (no net.mib.net_statistics or LINUX_MIB_LISTENOVERFLOWS in BTF, or neither __per_cpu_offset in kallsyms nor bpf_array.pptrs in BTF)".to_owned()
        }),
    }
}

fn notes(signal: Signal, kind: HookKind, needs: Need, layout: &KernelLayout) -> Vec<String> {
    match (signal, kind) {
        (Signal::ListenOverflow, HookKind::TpBtf | HookKind::RawTp) if layout.cookie_overflows => vec![
            "SYN-cookie ACK overflows: kfree_skb NO_SOCKET inside cookie_v4_check/cookie_v6_check (kallsyms)".into(),
        ],
        (Signal::ListenOverflow, HookKind::TpBtf | HookKind::RawTp) => vec![
            "SYN-cookie ACK overflows UNAVAILABLE: kallsyms hides addresses (kptr_restrict)".into(),
        ],
        (Signal::ListenOverflow | Signal::SynDrop, HookKind::Fentry | HookKind::Kprobe) if layout.counted_drops => vec![
            "exact: a drop is reported when the kernel's ListenOverflows counter (this CPU's) grew during the call".into(),
        ],
        (Signal::ListenOverflow | Signal::SynDrop, HookKind::Fentry | HookKind::Kprobe) => vec![
            "approximate: kallsyms hides __per_cpu_offset, so the queue is re-checked at function entry (races with accept())".into(),
        ],
        (Signal::SynDrop, HookKind::CgroupSkb) if needs == Need::CountedDrops => vec![
            "sees SYNs only for listeners owned by processes in the attached cgroup".into(),
            "exact: a SYN is reported dropped when the kernel's ListenOverflows counter (this CPU's) grew between the cgroup program and the free of that SYN (raw_tp consume_skb + kfree_skb); checked only while the queue is within 64 + 2 per CPU of full".into(),
        ],
        (Signal::SynDrop, HookKind::CgroupSkb) => vec![
            "sees SYNs only for listeners owned by processes in the attached cgroup".into(),
            "approximate: checks the queue just before the kernel does (races with accept() and other CPUs)".into(),
        ],
        (Signal::PacketDrop, _) => {
            let mut v = Vec::new();
            for (have, what) in [(layout.netfilter_drops(), "netfilter drops (SKB_DROP_REASON_NETFILTER_DROP)"), (layout.no_socket_drops(), "SYNs to an unbound address (SKB_DROP_REASON_NO_SOCKET)")] {
                v.push(if have { what.to_owned() } else { format!("{what} UNAVAILABLE: the kernel has no such drop reason") });
            }
            v
        }
        (Signal::Queued, _) => vec![
            "accepts derived per interval: children queued − growth of the queue (sock_diag) − children left queued when a listener closed; no accept wait, no acceptor thread, no per-accept event".into(),
            "runs at every sk_data_ready (every data arrival on every socket): one state read and out for all but listeners".into(),
        ],
        (Signal::Accept, HookKind::Tracepoint) => {
            vec![
                "accept(2)/accept4(2) syscalls only (io_uring accepts are not seen)".into(),
                "syscall tracepoints: while attached, every syscall of every process takes the kernel's tracing slow path (see `modes` below; --accept-hooks off avoids it)".into(),
            ]
        }
        _ => Vec::new(),
    }
}

/// Loads and attaches every program of a candidate; on any failure unloads the ones done.
fn attach_all(
    ebpf: &mut Ebpf,
    progs: &[Prog],
    btf: &aya::Btf,
    cgroup: Result<&File, &std::io::Error>,
    opts: &LoadOptions,
) -> Result<(), String> {
    for (i, p) in progs.iter().enumerate() {
        if let Err(e) = attach_one(ebpf, p, btf, cgroup, opts) {
            for done in &progs[..=i] {
                unload(ebpf, done);
            }
            return Err(e);
        }
    }
    Ok(())
}

fn attach_one(
    ebpf: &mut Ebpf,
    p: &Prog,
    btf: &aya::Btf,
    cgroup: Result<&File, &std::io::Error>,
    opts: &LoadOptions,
) -> Result<(), String> {
    let prog = ebpf.program_mut(p.name).ok_or_else(|| format!("program {} missing from object", p.name))?;
    match p.attach {
        Attach::TpBtf(tp) => {
            let prog: &mut BtfTracePoint = prog.try_into().map_err(short)?;
            prog.load(tp, btf).map_err(short)?;
            prog.attach().map_err(short)?;
        }
        Attach::RawTp(tp) => {
            let prog: &mut RawTracePoint = prog.try_into().map_err(short)?;
            prog.load().map_err(short)?;
            prog.attach(tp).map_err(short)?;
        }
        Attach::Tracepoint(cat, name) => {
            let prog: &mut TracePoint = prog.try_into().map_err(short)?;
            prog.load().map_err(short)?;
            prog.attach(cat, name).map_err(short)?;
        }
        Attach::FEntry(f) => {
            let prog: &mut FEntry = prog.try_into().map_err(short)?;
            prog.load(f, btf).map_err(short)?;
            prog.attach().map_err(short)?;
        }
        Attach::FExit(f) => {
            let prog: &mut FExit = prog.try_into().map_err(short)?;
            prog.load(f, btf).map_err(short)?;
            prog.attach().map_err(short)?;
        }
        Attach::KProbe(f) | Attach::KRetProbe(f) => {
            let prog: &mut KProbe = prog.try_into().map_err(short)?;
            prog.load().map_err(short)?;
            prog.attach(f, 0).map_err(short)?;
        }
        Attach::CgroupSkbIngress => {
            let cg = cgroup.map_err(|e| format!("cannot open cgroup {}: {e}", opts.cgroup.display()))?;
            let prog: &mut CgroupSkb = prog.try_into().map_err(short)?;
            prog.load().map_err(short)?;
            // bpf_link_create takes no ALLOW_MULTI flag: links coexist with other programs anyway.
            prog.attach(cg, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
                .map_err(short)?;
        }
    }
    Ok(())
}

fn unload(ebpf: &mut Ebpf, p: &Prog) {
    let Some(prog) = ebpf.program_mut(p.name) else { return };
    // Unloading also detaches; errors (not loaded) are irrelevant here.
    let _ = match p.attach {
        Attach::TpBtf(_) => <&mut BtfTracePoint>::try_from(prog).map(BtfTracePoint::unload),
        Attach::RawTp(_) => <&mut RawTracePoint>::try_from(prog).map(RawTracePoint::unload),
        Attach::Tracepoint(..) => <&mut TracePoint>::try_from(prog).map(TracePoint::unload),
        Attach::FEntry(_) => <&mut FEntry>::try_from(prog).map(FEntry::unload),
        Attach::FExit(_) => <&mut FExit>::try_from(prog).map(FExit::unload),
        Attach::KProbe(_) | Attach::KRetProbe(_) => <&mut KProbe>::try_from(prog).map(KProbe::unload),
        Attach::CgroupSkbIngress => <&mut CgroupSkb>::try_from(prog).map(CgroupSkb::unload),
    };
}

/// One line for a program error: the syscall error plus the verifier's last words, if any.
fn short(e: ProgramError) -> String {
    match e {
        ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            if std::env::var_os("SOCKTRACE_VERIFIER_LOG").is_some() {
                eprintln!("{log}");
            }
            // The verifier ends with statistics; the reason is the line before them.
            let last = log
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with("processed ") && !l.starts_with("verification time") && !l.starts_with("stack depth"))
                .unwrap_or("")
                .to_owned();
            if last.is_empty() {
                format!("BPF_PROG_LOAD refused: {io_error} (empty verifier log)")
            } else {
                format!("BPF_PROG_LOAD refused: {io_error}: verifier: {last}")
            }
        }
        other => {
            let mut s = other.to_string();
            let mut src = std::error::Error::source(&other);
            while let Some(e) = src {
                s.push_str(": ");
                s.push_str(&e.to_string());
                src = e.source();
            }
            s
        }
    }
}

/// Which counted signals have a hook: the views show an untraced signal's counts as unavailable
/// (`-`, `null`, absent series), never as 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(clippy::struct_excessive_bools, reason = "one flag per counted signal, read by name in the views")]
pub struct Traced {
    /// Accept counts: per call (an accept hook) or derived from queued children.
    pub accept: bool,
    /// Accepts are derived (`accept_count` hook, no accept hook): no acceptor threads, no events.
    pub accept_derived: bool,
    /// Accept-queue wait: needs both the enqueue and the accept hook.
    pub accept_wait: bool,
    pub listen_overflow: bool,
    pub syn_drop: bool,
    pub retransmit: bool,
    pub synack_retransmit: bool,
    /// listen(2) calls (the backlog asked for).
    pub listen: bool,
}

impl Traced {
    /// Names of the counted signals without a hook, for notes in the views.
    pub fn missing(self) -> Vec<&'static str> {
        [
            (self.accept, Signal::Accept),
            (self.accept_wait, Signal::Enqueue),
            (self.listen_overflow, Signal::ListenOverflow),
            (self.syn_drop, Signal::SynDrop),
            (self.retransmit, Signal::Retransmit),
            (self.synack_retransmit, Signal::SynackRetransmit),
            (self.listen, Signal::Listen),
        ]
        .into_iter()
        .filter(|(on, _)| !on)
        .map(|(_, s)| s.name())
        .collect()
    }
}

impl Tracer {
    /// Runs of this tracer's programs the kernel skipped because another BPF program was already
    /// running on that CPU (e.g. a softirq interrupting one): `recursion_misses` in each loaded
    /// program's fdinfo (Linux 5.12+; kprobe and tracepoint programs count theirs since 6.7).
    /// Their events and counts are missing. `None` where the kernel does not report it. Kprobe
    /// hooks add the runs the kprobe layer skipped before any program was called (a kprobe hit
    /// inside another's handler; [`crate::kprobe_missed`], Linux 6.7+).
    pub fn runs_missed(&self) -> Option<u64> {
        let mut total = None;
        if self.report.iter().any(|r| r.hook == Some("kprobe")) {
            let ids: Vec<u32> = self.program_ids().into_iter().collect();
            total = crate::kprobe_missed::kprobe_missed(&ids);
        }
        for (_, prog) in self.ebpf.programs() {
            let Ok(fd) = prog.fd() else { continue };
            let Ok(text) = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd())) else { continue };
            if let Some(n) = text.lines().find_map(|l| l.strip_prefix("recursion_misses:")).and_then(|v| v.trim().parse::<u64>().ok()) {
                total = Some(total.unwrap_or(0) + n);
            }
        }
        total
    }

    /// The kernel's ids of this tracer's loaded programs.
    pub fn program_ids(&self) -> BTreeSet<u32> {
        self.ebpf.programs().filter_map(|(_, p)| p.info().ok()).map(|i| i.id()).collect()
    }

    /// Whether SYN drops are confirmed at the SYN's free (the counted cgroup_skb hook), the one
    /// hook with checks that can be settled late (`stat::SYN_SETTLED_LATE`).
    pub fn syn_drops_settled(&self) -> bool {
        self.report.iter().any(|r| r.signal == Signal::SynDrop.name() && r.attached.iter().any(|a| a.ends_with("/consume_skb")))
    }

    /// Whether `signal` (its `name()`) has a hook in use.
    pub fn has(&self, signal: Signal) -> bool {
        self.report.iter().any(|r| r.signal == signal.name() && r.hook.is_some())
    }

    pub fn traced(&self) -> Traced {
        Traced {
            accept: self.has(Signal::Accept) || self.has(Signal::Queued),
            accept_derived: !self.has(Signal::Accept) && self.has(Signal::Queued),
            accept_wait: self.has(Signal::Accept) && self.has(Signal::Enqueue),
            listen_overflow: self.has(Signal::ListenOverflow),
            syn_drop: self.has(Signal::SynDrop),
            retransmit: self.has(Signal::Retransmit),
            synack_retransmit: self.has(Signal::SynackRetransmit),
            listen: self.has(Signal::Listen),
        }
    }

    /// Why the views show some signals as unavailable: the mode chosen, or the kernel.
    pub fn why_untraced(&self) -> &'static str {
        if self.accept_hooks == AcceptHooks::Off { "on this kernel or by --accept-hooks off" } else { "on this kernel" }
    }

    /// Syscall tracepoints attached now (each costs every syscall of every process).
    pub fn syscall_tracepoints(&self) -> Vec<&str> {
        self.report.iter().flat_map(|r| &r.attached).filter(|a| a.starts_with("tracepoint/syscalls/")).map(String::as_str).collect()
    }

    /// Lines for `socktrace probes`: the mode in use, what it attached, and what each mode costs.
    pub fn mode_lines(&self) -> Vec<String> {
        let tps = self.syscall_tracepoints();
        let accept = self.report.iter().find(|r| r.signal == Signal::Accept.name()).and_then(|r| r.hook);
        let mut v = vec![format!(
            "accept hooks: {} (--accept-hooks {}): {}",
            self.accept_hooks.name(),
            self.accept_hooks.name(),
            if tps.is_empty() {
                "no syscall tracepoint attached".to_owned()
            } else {
                format!("{} syscall tracepoints attached, every syscall of every process pays for them", tps.len())
            }
        )];
        v.push(format!("modes, cost measured by `cargo xtask bench syscalls` and `accept` ({COST_SOURCE}; rerun them to measure this machine):"));
        let auto_here = match (self.accept_hooks, accept) {
            (AcceptHooks::Auto, Some("tracepoint")) => " (here: the syscall tracepoints)",
            (AcceptHooks::Auto, Some(_)) => " (here: no syscall tracepoint, so no cost to other syscalls)",
            _ => "",
        };
        for (mode, per_syscall, per_conn) in MODE_COSTS {
            let what = match mode {
                AcceptHooks::Auto => format!(
                    "fexit, kprobe, else syscall tracepoints{auto_here}; with syscall tracepoints: {per_syscall} of every process, {per_conn} of BPF per connection; everything traced"
                ),
                _ => format!(
                    "no accept, listen or enqueue hook: {per_syscall} per syscall, {per_conn} of BPF per connection; accept counts derived per interval from the children queued (sk_data_ready, Linux 6.6+) and the queue; accept wait, acceptors and listen's backlog UNAVAILABLE; drops, queues and retransmits as in auto"
                ),
            };
            v.push(format!("  {:<9} {what}", mode.name()));
            if mode == AcceptHooks::Auto {
                v.push(format!("  {:<9} the syscall tracepoints only: the cost of auto with them", AcceptHooks::Syscalls.name()));
            }
        }
        v
    }

    /// One line for stderr once everything is attached.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .report
            .iter()
            .map(|r| format!("{}={}", r.signal, r.hook.unwrap_or("UNAVAILABLE")))
            .collect();
        let mode = if self.accept_hooks == AcceptHooks::Auto { String::new() } else { format!("; accept_hooks={}", self.accept_hooks.name()) };
        format!("socktrace: tracing started ({}{mode})", parts.join(", "))
    }
}

/// Parses `--hooks fentry,tp_btf,...` (or `all`).
pub fn parse_hooks(s: &str) -> Result<BTreeSet<HookKind>, String> {
    if s == "all" {
        return Ok(HookKind::ALL.into_iter().collect());
    }
    s.split(',')
        .map(|h| {
            HookKind::parse(h.trim()).ok_or_else(|| {
                let names: Vec<_> = HookKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown hook kind {h:?} (expected {} or all)", names.join(", "))
            })
        })
        .collect()
}
