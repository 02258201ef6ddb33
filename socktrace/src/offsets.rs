//! Kernel layout from the running kernel's BTF, resolved at load time.
//!
//! Rust eBPF gets no CO-RE relocations, so every struct offset and enum value the programs need is
//! looked up here (btf-rs over /sys/kernel/btf/vmlinux, or `--btf FILE`) and handed to the programs
//! as the load-time global `OFFSETS`. Nothing about kernel layout is fixed at build time. Tracepoint
//! record offsets for the classic syscall tracepoints come from their tracefs `format` files.

use std::path::{Path, PathBuf};

use crate::snapshot::btf_scan::{RawBtf, ScanError};
use socktrace_common::KernelOffsets;

/// How to supply kernel BTF, appended to every error about a missing or unusable BTF file.
pub const BTF_HINT: &str = "pass --btf FILE with this kernel's raw BTF (BTFHub's <release>.btf, or `objcopy -O binary --only-section=.BTF vmlinux FILE`)";

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error("no kernel BTF at {path} (kernel built without CONFIG_DEBUG_INFO_BTF?); {hint}", hint = BTF_HINT)]
    Missing { path: PathBuf },
    #[error("cannot read kernel BTF {path}: {source}; {hint}", hint = BTF_HINT)]
    Read { path: PathBuf, source: std::io::Error },
    #[error("kernel BTF {path} is not usable ({message}: truncated, or not raw BTF); {hint}", hint = BTF_HINT)]
    Parse { path: PathBuf, message: String },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("kernel BTF: {0}")]
    Other(String),
}

/// Offsets plus facts about optional kernel features, for `socktrace probes`.
#[derive(Clone, Debug)]
pub struct KernelLayout {
    pub offsets: KernelOffsets,
    /// `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW` exists (and kfree_skb passes the receiving socket).
    pub has_listen_overflow_reason: bool,
    /// Overflows on the SYN-cookie path can be recognised (kfree_skb NO_SOCKET in cookie_v*_check).
    pub cookie_overflows: bool,
    /// The fentry/kprobe drop hooks can confirm drops with the kernel's per-CPU counter.
    pub counted_drops: bool,
    /// Parameter count of `inet_csk_accept` in BTF (`None`: no such function); the fexit accept
    /// hook reads the return value after the parameters and supports [`ACCEPT_PARAMS`].
    pub accept_params: Option<usize>,
}

/// Parameter counts of `inet_csk_accept` the fexit program has a context load for: 2 since 6.10
/// `(sk, arg)`, 4 before `(sk, flags, err, kern)`, 3 before 4.11 `(sk, flags, err)`.
pub const ACCEPT_PARAMS: std::ops::RangeInclusive<usize> = 2..=4;

impl KernelLayout {
    /// Drop reasons the packet-drop program can use, for `socktrace probes` and diagnose: kfree_skb
    /// passes a reason and the kernel's `skb_drop_reason` names it.
    pub fn netfilter_drops(&self) -> bool {
        self.offsets.reason_netfilter_drop != KernelOffsets::ABSENT
    }

    pub fn no_socket_drops(&self) -> bool {
        self.offsets.reason_no_socket_any != KernelOffsets::ABSENT
    }
}

/// Structs, enums, functions and tracepoint typedefs [`resolve_with`] asks about: the raw scan
/// notes only these.
const WANTED: &[&str] = &[
    "sock",
    "net",
    "task_struct",
    "files_struct",
    "fdtable",
    "file",
    "socket",
    "sk_buff",
    "net_device",
    "dst_entry",
    "tcp_skb_cb",
    "socket_alloc",
    "bpf_array",
    "tcp_sock",
    "pt_regs",
    "inode",
    "skb_drop_reason",
    "inet_csk_accept",
    "btf_trace_kfree_skb",
    "btf_trace_tcp_retransmit_skb",
];

/// The kernel BTF file's bytes, read once at start-up for the offsets and the loader.
pub fn read_btf(btf_path: &Path) -> Result<Vec<u8>, OffsetError> {
    let bytes = std::fs::read(btf_path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => OffsetError::Missing { path: btf_path.to_owned() },
        _ => OffsetError::Read { path: btf_path.to_owned(), source },
    })?;
    check_btf_size(&bytes).map_err(|message| OffsetError::Parse { path: btf_path.to_owned(), message })?;
    Ok(bytes)
}

/// Resolves every offset the programs use. `tracefs` is where the syscall `format` files live.
#[cfg(test)]
pub fn resolve(btf_path: &Path, tracefs: &Path) -> Result<KernelLayout, OffsetError> {
    resolve_bytes(&read_btf(btf_path)?, btf_path, tracefs)
}

/// [`resolve`] from the bytes of `btf_path` already read ([`read_btf`]): one pass over the raw
/// type section (no full parse).
pub fn resolve_bytes(bytes: &[u8], btf_path: &Path, tracefs: &Path) -> Result<KernelLayout, OffsetError> {
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    let mut layout = resolve_btf(bytes, btf_path, &kallsyms)?;
    tracepoint_records(&mut layout.offsets, tracefs);
    Ok(layout)
}

/// [`resolve_bytes`] without the file system: the offsets from BTF `bytes` (named `btf_path` in
/// errors) and `/proc/kallsyms` text; the classic tracepoints' record offsets are left as
/// [`KernelOffsets::ZERO`] has them. Malformed BTF is an error, never a panic (fuzzed: `fuzz/`).
pub fn resolve_btf(bytes: &[u8], btf_path: &Path, kallsyms: &str) -> Result<KernelLayout, OffsetError> {
    check_btf_size(bytes).map_err(|message| OffsetError::Parse { path: btf_path.to_owned(), message })?;
    let raw = RawBtf::parse(bytes, WANTED).map_err(|e| OffsetError::Parse { path: btf_path.to_owned(), message: e.to_string() })?;
    resolve_with(&raw, kallsyms)
}

/// The record offsets of the classic syscall tracepoints, from their tracefs `format` files.
fn tracepoint_records(o: &mut KernelOffsets, tracefs: &Path) {
    let syscalls = tracefs.join("events/syscalls");
    o.tp_accept_fd = tracepoint_field(&syscalls.join("sys_enter_accept4/format"), "fd").unwrap_or(16);
    o.tp_accept_ret = tracepoint_field(&syscalls.join("sys_exit_accept4/format"), "ret").unwrap_or(16);
    o.tp_listen_fd = tracepoint_field(&syscalls.join("sys_enter_listen/format"), "fd").unwrap_or(16);
    o.tp_listen_backlog = tracepoint_field(&syscalls.join("sys_enter_listen/format"), "backlog").unwrap_or(24);
}

/// What [`resolve_with`] asks of the kernel BTF.
trait Query {
    /// Byte offset of `path` (member names, each possibly inside anonymous structs/unions) in
    /// `struct name`.
    fn offset(&self, name: &str, path: &[&str]) -> Result<u32, OffsetError>;
    fn enum_value(&self, enum_name: &str, member: &str) -> Option<u32>;
    /// Value of an enumerator of an anonymous enum (such as `LINUX_MIB_*`).
    fn anonymous_enum_value(&self, member: &str) -> Option<u32>;
    /// Number of parameters of kernel function `name` (`None` when BTF has no such function).
    fn func_arity(&self, name: &str) -> Option<usize>;
    /// Number of tracepoint arguments (excluding the leading `void *ctx`) of `btf_trace_<tp>`.
    fn tracepoint_arity(&self, tp: &str) -> Result<usize, OffsetError>;
}

impl Query for RawBtf<'_> {
    fn offset(&self, name: &str, path: &[&str]) -> Result<u32, OffsetError> {
        self.offset_path(name, path).map_err(|e| match e {
            ScanError::NoStruct(s) => OffsetError::NoStruct(s),
            ScanError::NoMember(s, m) => OffsetError::NoMember(s, m),
            other => OffsetError::Other(other.to_string()),
        })
    }

    fn enum_value(&self, enum_name: &str, member: &str) -> Option<u32> {
        RawBtf::enum_value(self, enum_name, member)
    }

    fn anonymous_enum_value(&self, member: &str) -> Option<u32> {
        RawBtf::anonymous_enum_value(self, member)
    }

    fn func_arity(&self, name: &str) -> Option<usize> {
        RawBtf::func_arity(self, name)
    }

    fn tracepoint_arity(&self, tp: &str) -> Result<usize, OffsetError> {
        RawBtf::tracepoint_arity(self, tp).map_err(|e| OffsetError::Other(e.to_string()))
    }
}

fn resolve_with(l: &impl Query, kallsyms: &str) -> Result<KernelLayout, OffsetError> {
    let sk = |path: &[&str]| l.offset("sock", &path_with("__sk_common", path));
    let mut o = KernelOffsets::ZERO;
    o.skc_daddr = sk(&["skc_daddr"])?;
    o.skc_rcv_saddr = sk(&["skc_rcv_saddr"])?;
    o.skc_dport = sk(&["skc_dport"])?;
    o.skc_num = sk(&["skc_num"])?;
    o.skc_family = sk(&["skc_family"])?;
    o.skc_state = sk(&["skc_state"])?;
    o.skc_net = sk(&["skc_net", "net"])?;
    o.skc_v6_daddr = sk(&["skc_v6_daddr"]).unwrap_or(KernelOffsets::ABSENT);
    o.skc_v6_rcv_saddr = sk(&["skc_v6_rcv_saddr"]).unwrap_or(KernelOffsets::ABSENT);
    o.sk_protocol = l.offset("sock", &["sk_protocol"])?;
    o.sk_ack_backlog = l.offset("sock", &["sk_ack_backlog"])?;
    o.sk_max_ack_backlog = l.offset("sock", &["sk_max_ack_backlog"])?;
    o.net_ns_inum = l.offset("net", &["ns", "inum"])?;
    o.task_files = l.offset("task_struct", &["files"])?;
    o.files_fdt = l.offset("files_struct", &["fdt"])?;
    o.fdt_max_fds = l.offset("fdtable", &["max_fds"])?;
    o.fdt_fd = l.offset("fdtable", &["fd"])?;
    o.file_private_data = l.offset("file", &["private_data"])?;
    o.socket_sk = l.offset("socket", &["sk"])?;
    o.skb_head = l.offset("sk_buff", &["head"])?;
    o.skb_network_header = l.offset("sk_buff", &["network_header"])?;
    o.skb_transport_header = l.offset("sk_buff", &["transport_header"])?;
    o.skb_cb = l.offset("sk_buff", &["cb"])?;
    o.skb_dev = l.offset("sk_buff", &["dev"])?;
    o.netdev_nd_net = l.offset("net_device", &["nd_net", "net"])?;
    o.skb_refdst = l.offset("sk_buff", &["_skb_refdst"])?;
    o.dst_dev = l.offset("dst_entry", &["dev"])?;
    o.tcb_gso_segs = l.offset("tcp_skb_cb", &["tcp_gso_segs"])?;
    // Per-socket rows need the listener's inode; without it they stay empty (port rows still work).
    if let (Ok(sock), Ok(inode), Ok(ino)) =
        (l.offset("sock", &["sk_socket"]), l.offset("socket_alloc", &["vfs_inode"]), l.offset("inode", &["i_ino"]))
    {
        o.sk_socket = sock;
        o.socket_alloc_inode = inode;
        o.inode_ino = ino;
    }

    let reason = l.enum_value("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW");
    // btf_trace_kfree_skb(void *ctx, skb, location, reason[, rx_sk]): rx_sk is argument 3.
    let kfree_args = l.tracepoint_arity("kfree_skb")?;
    let rx_sk = kfree_args >= 4;
    if let (Some(value), true) = (reason, rx_sk) {
        o.reason_listen_overflow = value;
        o.kfree_skb_rx_sk_arg = 3;
    }
    // The drop hooks read this CPU's LINUX_MIB_LISTENOVERFLOWS (net->mib.net_statistics + this
    // CPU's per-CPU offset). The offset is __per_cpu_offset[cpu] from kallsyms, or, when kallsyms
    // lists no data symbols (CONFIG_KALLSYMS_ALL off) or hides addresses, derived in the program
    // from a per-CPU map (`struct bpf_array.pptrs`). Without either they re-check the queue.
    let pcpu = kallsyms_addr(kallsyms, "__per_cpu_offset");
    let pptrs = l.offset("bpf_array", &["pptrs"]).ok();
    if let (Ok(stats), Some(index), true) = (
        l.offset("net", &["mib", "net_statistics"]),
        l.anonymous_enum_value("LINUX_MIB_LISTENOVERFLOWS"),
        pcpu.is_some() || pptrs.is_some(),
    ) {
        o.net_mib_net_statistics = stats;
        o.mib_listen_overflows = index;
        o.per_cpu_offset = pcpu.unwrap_or(0);
        o.bpf_array_pptrs = if pcpu.is_some() { KernelOffsets::ABSENT } else { pptrs.unwrap_or(KernelOffsets::ABSENT) };
    }
    if let Some(no_socket) = l.enum_value("skb_drop_reason", "SKB_DROP_REASON_NO_SOCKET") {
        if let Some(syms) = kallsyms_ranges(kallsyms, &["cookie_v4_check", "cookie_v6_check"]) {
            o.reason_no_socket = no_socket;
            o.cookie_v4_check = syms[0];
            o.cookie_v6_check = syms[1];
        }
    }
    let accept_params = l.func_arity("inet_csk_accept");
    if let Some(n) = accept_params.filter(|n| ACCEPT_PARAMS.contains(n)) {
        o.accept_ret_arg = u32::try_from(n).unwrap_or(KernelOffsets::ABSENT);
    }
    // Segments that never reach a listener: kfree_skb(skb, location, reason) needs the reason argument.
    if kfree_args >= 3 {
        o.reason_netfilter_drop = l.enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP").unwrap_or(KernelOffsets::ABSENT);
        o.reason_no_socket_any = l.enum_value("skb_drop_reason", "SKB_DROP_REASON_NO_SOCKET").unwrap_or(KernelOffsets::ABSENT);
    }
    // The syscall's first argument in the saved registers: x86-64 passes it in `di`, which the
    // syscall leaves alone; arm64 overwrites x0 with the return value but keeps `orig_x0`.
    o.pt_regs_arg0 = l.offset("pt_regs", &["di"]).or_else(|_| l.offset("pt_regs", &["orig_x0"])).unwrap_or(KernelOffsets::ABSENT);
    // The accepted child's establishment time: the accept-queue wait without an enqueue program.
    o.tcp_rcvq_time = l.offset("tcp_sock", &["rcvq_space", "time"]).unwrap_or(KernelOffsets::ABSENT);
    // btf_trace_tcp_retransmit_skb(void *ctx, sk, skb[, err]).
    if l.tracepoint_arity("tcp_retransmit_skb")? >= 3 {
        o.retransmit_err_arg = 2;
    }
    // The SYN-drop fallback skips its counter check while the queue is far from full: 64 children,
    // plus two per possible CPU (each can add about one in the check's window). Unknown CPU count:
    // check every SYN.
    o.syn_confirm_slack = aya::util::nr_cpus().ok().and_then(|n| u32::try_from(n).ok()).map_or(KernelOffsets::ABSENT, syn_confirm_slack);
    let cookie_overflows = o.reason_no_socket != KernelOffsets::ABSENT;
    let counted_drops = o.per_cpu_offset != 0 || o.bpf_array_pptrs != KernelOffsets::ABSENT;
    Ok(KernelLayout { offsets: o, has_listen_overflow_reason: reason.is_some() && rx_sk, cookie_overflows, counted_drops, accept_params })
}

/// How far below full (in children) a listener's accept queue may be before the cgroup_skb SYN
/// program stops confirming each SYN with the kernel's counter, for `cpus` possible CPUs.
pub fn syn_confirm_slack(cpus: u32) -> u32 {
    cpus.saturating_mul(2).saturating_add(64)
}

/// Whether `bytes` is raw BTF as long as its header says (magic 0xeb9f, then `hdr_len`,
/// `type_off`, `type_len`, `str_off`, `str_len`): a cut-off file is refused before parsing.
pub fn check_btf_size(bytes: &[u8]) -> Result<(), String> {
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
    if bytes.get(..2) != Some(&[0x9f, 0xeb]) {
        return Err(format!("{} bytes without the BTF magic", bytes.len()));
    }
    let (Some(hdr), Some(type_off), Some(type_len), Some(str_off), Some(str_len)) = (u32_at(4), u32_at(8), u32_at(12), u32_at(16), u32_at(20)) else {
        return Err(format!("{} bytes, shorter than the BTF header", bytes.len()));
    };
    let want = hdr + (type_off + type_len).max(str_off + str_len);
    if (bytes.len() as u64) < want {
        return Err(format!("{} bytes where the header describes {want}", bytes.len()));
    }
    Ok(())
}

/// Address of a kernel symbol of any type, from /proc/kallsyms text; `None` when missing or hidden.
pub fn kallsyms_addr(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let addr = u64::from_str_radix(it.next()?, 16).ok()?;
        let _ty = it.next()?;
        (it.next()? == name && addr != 0).then_some(addr)
    })
}

/// `[start, end)` in kernel text of each named function, from /proc/kallsyms (end = next symbol).
/// `None` when kallsyms hides addresses (kptr_restrict) or a name is missing.
pub fn kallsyms_ranges(text: &str, names: &[&str]) -> Option<Vec<[u64; 2]>> {
    let syms: Vec<(u64, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let addr = u64::from_str_radix(it.next()?, 16).ok()?;
            let ty = it.next()?;
            let name = it.next()?;
            matches!(ty, "T" | "t").then_some((addr, name))
        })
        .collect();
    names
        .iter()
        .map(|want| {
            let start = syms.iter().find(|(_, n)| n == want)?.0;
            let end = syms.iter().map(|(a, _)| *a).filter(|a| *a > start).min()?;
            (start != 0).then_some([start, end])
        })
        .collect()
}

fn path_with<'a>(first: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![first];
    v.extend_from_slice(rest);
    v
}

/// Offset of `field` in a classic tracepoint record, from its tracefs `format` file.
pub fn tracepoint_field(format_file: &Path, field: &str) -> Option<u32> {
    format_field(&std::fs::read_to_string(format_file).ok()?, field)
}

/// Offset of `field` in the text of a tracefs `format` file.
pub fn format_field(text: &str, field: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.split_whitespace().last()?;
        if name != field {
            return None;
        }
        let off = line.split("offset:").nth(1)?.split(';').next()?;
        off.trim().parse().ok()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Inputs the fuzz target `btf` found (fuzz/regressions/btf/): each is an error or a layout,
    /// quickly. `anonymous-member-cycle`: an anonymous member of struct sock_common whose type
    /// is struct sock made the member search recurse until the fuzzer's timeout.
    #[test]
    fn fuzz_regressions_btf() {
        for (name, bytes) in fuzz_regressions("btf") {
            let t = std::time::Instant::now();
            let r = resolve_btf(&bytes, Path::new(&name), "");
            assert!(t.elapsed() < std::time::Duration::from_secs(10), "{name}: {:?}", t.elapsed());
            assert!(r.is_err(), "{name}: {r:?}");
        }
    }

    /// The files under fuzz/regressions/TARGET/ (inputs that once crashed or hung a fuzz target).
    pub(crate) fn fuzz_regressions(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions").join(target);
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| {
                let p = e.unwrap().path();
                (p.display().to_string(), std::fs::read(&p).unwrap())
            })
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no regression inputs in {}", dir.display());
        files
    }

    /// The full parse (btf-rs) the raw scan replaced, kept as the oracle it must agree with.
    mod btf_rs_oracle {
        use btf_rs::{Btf, Type};

        use super::super::{OffsetError, Query};

        pub struct Layout<'a> {
            pub btf: &'a Btf,
        }

        impl Layout<'_> {
            fn named_struct(&self, name: &str) -> Result<Type, OffsetError> {
                self.btf
                    .resolve_types_by_name(name)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
                    .ok_or_else(|| OffsetError::NoStruct(name.to_owned()))
            }

            fn find_member(&self, ty: &Type, want: &str) -> Result<Option<(u32, Type)>, OffsetError> {
                let members = match ty {
                    Type::Struct(s) | Type::Union(s) => &s.members,
                    _ => return Ok(None),
                };
                for m in members {
                    let name = self.btf.resolve_name(m).unwrap_or_default();
                    let member_ty = self.btf.resolve_chained_type(m).map_err(|e| OffsetError::Other(format!("{e:#}")))?;
                    if name == want {
                        return Ok(Some((m.bit_offset(), member_ty)));
                    }
                    if name.is_empty() {
                        let inner = self.strip(member_ty)?;
                        if let Some((off, t)) = self.find_member(&inner, want)? {
                            return Ok(Some((m.bit_offset() + off, t)));
                        }
                    }
                }
                Ok(None)
            }

            #[expect(clippy::match_same_arms, reason = "each arm binds a different btf-rs type")]
            fn strip(&self, mut ty: Type) -> Result<Type, OffsetError> {
                for _ in 0..16 {
                    let next = match &ty {
                        Type::Typedef(t) => self.btf.resolve_chained_type(t),
                        Type::Const(t) => self.btf.resolve_chained_type(t),
                        Type::Volatile(t) => self.btf.resolve_chained_type(t),
                        Type::Restrict(t) => self.btf.resolve_chained_type(t),
                        Type::TypeTag(t) => self.btf.resolve_chained_type(t),
                        _ => return Ok(ty),
                    };
                    ty = next.map_err(|e| OffsetError::Other(format!("{e:#}")))?;
                }
                Ok(ty)
            }
        }

        impl Query for Layout<'_> {
            fn offset(&self, name: &str, path: &[&str]) -> Result<u32, OffsetError> {
                let mut ty = self.named_struct(name)?;
                let mut bits = 0u32;
                for (i, member) in path.iter().enumerate() {
                    let (off, member_ty) = self
                        .find_member(&ty, member)?
                        .ok_or_else(|| OffsetError::NoMember(name.to_owned(), path[..=i].join(".")))?;
                    bits += off;
                    if i + 1 < path.len() {
                        ty = self.strip(member_ty)?;
                    }
                }
                if !bits.is_multiple_of(8) {
                    return Err(OffsetError::Other(format!("{name}.{} is a bitfield", path.join("."))));
                }
                Ok(bits / 8)
            }

            fn enum_value(&self, enum_name: &str, member: &str) -> Option<u32> {
                for ty in self.btf.resolve_types_by_name(enum_name).unwrap_or_default() {
                    match ty {
                        Type::Enum(e) => {
                            for m in &e.members {
                                if self.btf.resolve_name(m).ok().as_deref() == Some(member) {
                                    return Some(m.val());
                                }
                            }
                        }
                        Type::Enum64(e) => {
                            for m in &e.members {
                                if self.btf.resolve_name(m).ok().as_deref() == Some(member) {
                                    return u32::try_from(m.val()).ok();
                                }
                            }
                        }
                        _ => {}
                    }
                }
                None
            }

            fn anonymous_enum_value(&self, member: &str) -> Option<u32> {
                let mut id = 1;
                while let Ok(ty) = self.btf.resolve_type_by_id(id) {
                    if let Type::Enum(e) = &ty
                        && self.btf.resolve_name(e).unwrap_or_default().is_empty()
                    {
                        for m in &e.members {
                            if self.btf.resolve_name(m).ok().as_deref() == Some(member) {
                                return Some(m.val());
                            }
                        }
                    }
                    id += 1;
                }
                None
            }

            fn func_arity(&self, name: &str) -> Option<usize> {
                self.btf.resolve_types_by_name(name).ok()?.into_iter().find_map(|t| match t {
                    Type::Func(f) => match self.btf.resolve_chained_type(&f) {
                        Ok(Type::FuncProto(p)) => Some(p.parameters.len()),
                        _ => None,
                    },
                    _ => None,
                })
            }

            fn tracepoint_arity(&self, tp: &str) -> Result<usize, OffsetError> {
                let name = format!("btf_trace_{tp}");
                let ty = self
                    .btf
                    .resolve_types_by_name(&name)
                    .ok()
                    .and_then(|v| v.into_iter().next())
                    .ok_or_else(|| OffsetError::Other(format!("no {name} typedef")))?;
                let Type::Typedef(td) = ty else {
                    return Err(OffsetError::Other(format!("{name} is not a typedef")));
                };
                let ptr = self.btf.resolve_chained_type(&td).map_err(|e| OffsetError::Other(format!("{e:#}")))?;
                let Type::Ptr(p) = ptr else {
                    return Err(OffsetError::Other(format!("{name} is not a function pointer")));
                };
                let proto = self.btf.resolve_chained_type(&p).map_err(|e| OffsetError::Other(format!("{e:#}")))?;
                let Type::FuncProto(f) = proto else {
                    return Err(OffsetError::Other(format!("{name} is not a function pointer")));
                };
                Ok(f.parameters.len().saturating_sub(1))
            }
        }
    }

    /// The raw scan resolves exactly what the full btf-rs parse resolved, every offset, enum
    /// value and arity, on this machine's kernel BTF.
    #[test]
    fn raw_scan_agrees_with_the_full_parse() {
        let btf = Path::new("/sys/kernel/btf/vmlinux");
        let Ok(bytes) = std::fs::read(btf) else {
            eprintln!("skipped: no {}", btf.display());
            return;
        };
        let tracefs = Path::new("/sys/kernel/tracing");
        let raw = resolve(btf, tracefs).unwrap();
        let parsed = btf_rs::Btf::from_bytes(&bytes).unwrap();
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        let mut full = resolve_with(&btf_rs_oracle::Layout { btf: &parsed }, &kallsyms).unwrap();
        tracepoint_records(&mut full.offsets, tracefs);
        assert_eq!(raw.offsets, full.offsets);
        assert_eq!(
            (raw.has_listen_overflow_reason, raw.cookie_overflows, raw.counted_drops, raw.accept_params),
            (full.has_listen_overflow_reason, full.cookie_overflows, full.counted_drops, full.accept_params)
        );
        let scan = RawBtf::parse(&bytes, WANTED).unwrap();
        let oracle = btf_rs_oracle::Layout { btf: &parsed };
        for (e, m) in [("skb_drop_reason", "SKB_DROP_REASON_NOT_SPECIFIED"), ("skb_drop_reason", "SKB_DROP_REASON_NO_SUCH_THING"), ("no_such_enum", "X")] {
            assert_eq!(Query::enum_value(&scan, e, m), oracle.enum_value(e, m), "{e}::{m}");
        }
        for m in ["LINUX_MIB_LISTENDROPS", "LINUX_MIB_NO_SUCH_THING"] {
            assert_eq!(Query::anonymous_enum_value(&scan, m), oracle.anonymous_enum_value(m), "{m}");
        }
        assert!(Query::offset(&scan, "sock", &["__sk_common", "no_such_member"]).is_err());
        assert!(Query::offset(&scan, "no_such_struct", &["x"]).is_err());
        assert!(Query::tracepoint_arity(&scan, "no_such_tracepoint").is_err());
    }


    #[test]
    fn parses_tracepoint_format_offsets() {
        let dir = std::env::temp_dir().join(format!("socktrace-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("format");
        std::fs::write(
            &f,
            "name: sys_enter_accept4\nformat:\n\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:int fd;\toffset:16;\tsize:8;\tsigned:0;\n",
        )
        .unwrap();
        assert_eq!(tracepoint_field(&f, "fd"), Some(16));
        assert_eq!(tracepoint_field(&f, "__syscall_nr"), Some(8));
        assert_eq!(tracepoint_field(&f, "nope"), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Against the running kernel's BTF, when it has one: values must agree with what the kernel
    /// headers promise on every supported kernel.
    #[test]
    fn resolves_running_kernel() {
        let btf = Path::new("/sys/kernel/btf/vmlinux");
        if !btf.exists() {
            eprintln!("skipped: no {}", btf.display());
            return;
        }
        let l = resolve(btf, Path::new("/sys/kernel/tracing")).unwrap();
        let o = l.offsets;
        // struct sock starts with struct sock_common, whose first member is the address pair.
        assert_eq!(o.skc_daddr, 0);
        assert_eq!(o.skc_rcv_saddr, 4);
        assert!(o.sk_max_ack_backlog > o.skc_v6_rcv_saddr);
        assert!(o.sk_socket != KernelOffsets::ABSENT && o.socket_alloc_inode > 0 && o.inode_ino != KernelOffsets::ABSENT);
        assert_ne!(o.net_ns_inum, 0);
        // inet_csk_accept: 4 parameters before 6.10, 2 since; the fexit reads the slot after them.
        let n = l.accept_params.expect("inet_csk_accept in BTF");
        assert!(ACCEPT_PARAMS.contains(&n), "{n} parameters");
        assert_eq!(o.accept_ret_arg as usize, n);
        // The per-CPU ListenOverflows counter is found: __per_cpu_offset from kallsyms, or
        // bpf_array.pptrs (after the embedded struct bpf_map, 8-byte aligned) to derive it.
        assert!(l.counted_drops);
        assert!(o.per_cpu_offset != 0 || (o.bpf_array_pptrs >= 64 && o.bpf_array_pptrs % 8 == 0), "{o:?}");
    }

    /// No BTF, or a damaged file: an error (never a panic) that names the file and says how to
    /// supply `--btf`.
    #[test]
    fn missing_or_truncated_btf_says_how_to_supply_it() {
        let tracefs = Path::new("/sys/kernel/tracing");
        let missing = resolve(Path::new("/nonexistent/vmlinux"), tracefs).unwrap_err();
        assert!(matches!(missing, OffsetError::Missing { .. }), "{missing:?}");
        let text = missing.to_string();
        assert!(text.contains("/nonexistent/vmlinux") && text.contains("--btf FILE"), "{text}");
        let btf = Path::new("/sys/kernel/btf/vmlinux");
        let Ok(full) = std::fs::read(btf) else {
            eprintln!("skipped the truncation cases: no {}", btf.display());
            return;
        };
        let dir = std::env::temp_dir().join(format!("socktrace-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for len in [0, 10, 200, full.len() / 2, full.len() - 1] {
            let f = dir.join(format!("btf-{len}"));
            std::fs::write(&f, &full[..len]).unwrap();
            let err = resolve(&f, tracefs).expect_err("a truncated BTF file must be refused");
            let text = err.to_string();
            assert!(text.contains("--btf FILE") && text.contains(&*f.to_string_lossy()), "{len} bytes: {text}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
