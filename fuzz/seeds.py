#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ from this machine (run as root, once;
the results are committed). Real inputs where the machine has them: /proc texts, tracefs
format files, a sock_diag dump of a netns this script creates (a listener, an established
connection, a queued one), the .BTF of socktrace's own eBPF object. Ring-buffer events are
packed in socktrace-common's `Event` layout from the README's real `watch` output; the minimal
BTF files hold the structs the offset lookups start with (sock, sock_common, task_struct…)."""
import os, socket, struct, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
C = os.path.join(HERE, "corpus")

def put(target, name, data):
    d = os.path.join(C, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None

# --- filter: expressions from the tests and the README
for i, e in enumerate([
    "sport = :8080", "sport = :443 or sport = :8443", "state established ( dport = :443 or sport = :443 )",
    "not (src [::1] or dport > :1024)", "dst 10.0.0.0/8", "src [2001:db8::/32]:80 and ! netns blue",
    "exclude time-wait state listening sport >= 1024 && sport le :2048", "src *:8080 || dst 127.0.0.1:80",
    "state connected exclude syn-sent dport neq 22", "netns 4026531840 sport = :80 dport = :0",
]):
    put("filter", f"expr-{i}", e)

# --- event: socktrace-common's Event (repr C), values from the README's `watch` sample
def event(kind, flags, family, laddr, lport, raddr, rport, pid=0, comm=b"", ql=0, qm=0, wait=0, hook=3, ino=0, ts=1453418000, netns=4026532177, segs=1):
    pack_addr = lambda a: socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a).ljust(16, b"\0")
    return struct.pack("<QQQIIIIIIIIIHHHHI16s16s16s", ts, wait, 0, kind, flags, netns, pid, pid, hook, ql, qm, segs,
                       family, lport, rport, 0, ino, pack_addr(laddr), pack_addr(raddr), comm.ljust(16, b"\0"))
acc = event(1, 1 | 2 | 4, 2, "127.0.0.1", 8080, "127.0.0.1", 39932, pid=10990, comm=b"st-scenario", ql=2, qm=2, wait=217482000, ino=51234)
drop = event(3, 2, 2, "127.0.0.1", 8080, "127.0.0.1", 39958, ql=3, qm=2, hook=8, ino=51234)
ovf = event(2, 2, 10, "::1", 8080, "::ffff:127.0.0.1", 40000, ql=3, qm=2, hook=1)
lis = event(6, 1 | 2, 2, "0.0.0.0", 8080, "0.0.0.0", 0, pid=10990, comm=b"st-scenario", qm=2, hook=3)
rtx = event(4, 0, 2, "127.0.0.1", 8080, "127.0.0.1", 39944, hook=1, segs=2)
put("event", "accept", acc); put("event", "syn_drop", drop); put("event", "listen_overflow_v6", ovf)
put("event", "stream", acc + drop + ovf + lis + rtx)
# iterator records (SocketFd: pid, fd, inode u64, comm[16])
put("event", "iter_records", b"".join(struct.pack("<IIQ16s", p, fd, ino, c) for p, fd, ino, c in
                                       [(1, 3, 51234, b"nginx"), (1, 4, 51235, b"nginx"), (7, 3, 51234, b"nginx: worker")]))

# --- proc_net / proc_pid / kernel_text: this machine's texts
for p, name in [("/proc/net/netstat", "netstat"), ("/proc/net/snmp", "snmp"), ("/proc/net/sockstat", "sockstat"),
                ("/proc/net/sockstat6", "sockstat6"), ("/proc/net/stat/nf_conntrack", "nf_conntrack"),
                ("/proc/sys/net/ipv4/ip_local_port_range", "ip_local_port_range")]:
    t = read(p)
    if t:
        put("proc_net", name, t)
put("proc_pid", "stat-self", read("/proc/self/stat"))
put("proc_pid", "stat-paren-comm", b"4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 93 0 0 0 0 0 0 0 20 0 1 0 12345 1234567 89\n")
put("proc_pid", "mountinfo", read("/proc/self/mountinfo"))
put("proc_pid", "fd-link", b"socket:[51234]")
put("proc_pid", "netns-lines", b"4026531840\n4026532177 blue\nEACCES\n4026531840 own\n4026532177\n")
syms = read("/proc/kallsyms").decode().splitlines()
keep = [i for i, l in enumerate(syms) if l.split()[2:3] and l.split()[2] in ("cookie_v4_check", "cookie_v6_check", "__per_cpu_offset")]
lines = sorted({j for i in keep for j in range(max(0, i - 2), min(len(syms), i + 3))})
put("kernel_text", "kallsyms", "\n".join(syms[j] for j in lines) + "\n")
for tp in ["sys_enter_accept4", "sys_exit_accept4", "sys_enter_listen"]:
    t = read(f"/sys/kernel/tracing/events/syscalls/{tp}/format")
    if t:
        put("kernel_text", tp, t)

# --- btf, btf_scan: .BTF of socktrace's eBPF objects, and minimal BTF with the wanted structs
def btf(types, strings):
    """types: list of (name, kind, vlen_or_members, size_or_type)."""
    strtab = b"\0"
    def s(name):
        nonlocal strtab
        if not name:
            return 0
        off = len(strtab); strtab += name.encode() + b"\0"; return off
    out = b""
    for t in types:
        kind = t[1]
        if kind == 1:  # INT name, 1, size, bits
            out += struct.pack("<III", s(t[0]), 1 << 24, t[2]) + struct.pack("<I", t[3])
        elif kind in (4, 5):  # STRUCT/UNION name, kind, [(member, type_id, bit_off)], size
            out += struct.pack("<III", s(t[0]), (kind << 24) | len(t[2]), t[3])
            for m, ty, off in t[2]:
                out += struct.pack("<III", s(m), ty, off)
        elif kind in (8, 2):  # TYPEDEF/PTR name, kind, type
            out += struct.pack("<III", s(t[0]), kind << 24, t[2])
        elif kind == 12:  # FUNC name, 12, proto
            out += struct.pack("<III", s(t[0]), 12 << 24, t[2])
        elif kind == 13:  # FUNC_PROTO ret, [param types]
            out += struct.pack("<III", 0, (13 << 24) | len(t[2]), t[3])
            for p in t[2]:
                out += struct.pack("<II", 0, p)
        elif kind == 6:  # ENUM name, [(name, val)]
            out += struct.pack("<III", s(t[0]), (6 << 24) | len(t[2]), 4)
            for n, v in t[2]:
                out += struct.pack("<Ii", s(n), v)
    hdr = struct.pack("<HBBIIIII", 0xeb9f, 1, 0, 24, 0, len(out), len(out), len(strtab))
    return hdr + out + strtab
u32, u16, ptr = 1, 2, 3
common = [("unsigned int", 1, 4, 32), ("short unsigned int", 1, 2, 16), ("", 2, 1)]
sk_common = ("sock_common", 4, [("skc_daddr", u32, 0), ("skc_rcv_saddr", u32, 32), ("", 6, 64), ("skc_family", u16, 128),
                                 ("skc_state", u16, 144), ("skc_net", 7, 192), ("skc_v6_daddr", u32, 448), ("skc_v6_rcv_saddr", u32, 576)], 136)
anon = ("", 4, [("skc_dport", u16, 0), ("skc_num", u16, 16)], 4)
net = ("possible_net_t", 4, [("net", ptr, 0)], 8)
sock = ("sock", 4, [("__sk_common", 4, 0), ("sk_protocol", u16, 1200), ("sk_ack_backlog", u32, 1216), ("sk_max_ack_backlog", u32, 1248)], 800)
task = ("task_struct", 4, [("pid", u32, 0), ("tgid", u32, 32), ("files", ptr, 64), ("comm", u32, 128)], 64)
file = ("file", 4, [("f_inode", ptr, 0), ("private_data", ptr, 64)], 16)
inode = ("inode", 4, [("i_mode", u16, 0), ("i_ino", u32, 64)], 16)
proto = ("", 13, [ptr, ptr], u32)
func = ("bpf_iter_task_file", 12, 12)
reason = ("skb_drop_reason", 6, [("SKB_DROP_REASON_NOT_SPECIFIED", 2), ("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW", 40)])
put("btf", "min-sock", btf(common + [sk_common, sock, anon, net], ""))
put("btf_scan", "min-task", btf(common + [sk_common, sock, anon, net, task, file, inode, proto, func, reason], ""))
put("btf", "min-task", btf(common + [sk_common, sock, anon, net, task, file, inode, proto, func, reason], ""))
put("btf_scan", "min-sock", btf(common + [sk_common, sock, anon, net], ""))
def elf_section(path, want):
    """The bytes of section `want` of a little-endian ELF64 file (objcopy here does not know BPF)."""
    d = read(path)
    if not d or d[:4] != b"\x7fELF":
        return None
    shoff, = struct.unpack_from("<Q", d, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 0x3a)
    sec = lambda i: struct.unpack_from("<IIQQQQ", d, shoff + i * shentsize)
    names_off = sec(shstrndx)[4]
    for i in range(shnum):
        name, _, _, _, off, size = sec(i)
        if d[names_off + name:].split(b"\0", 1)[0] == want.encode():
            return d[off:off + size]
    return None

root = os.path.dirname(HERE)
found = subprocess.run(["find", os.path.join(root, "target"), "-path", "*/out/*", "-type", "f", "-size", "+1k", "(", "-name", "socktrace", "-o", "-name", "socktrace-iter", ")"],
                       capture_output=True, text=True).stdout.split()
for name in ("socktrace", "socktrace-iter"):
    for obj in (f for f in found if os.path.basename(f) == name):
        data = elf_section(obj, ".BTF")
        if data:
            put("btf", f"ebpf-{name}", data); put("btf_scan", f"ebpf-{name}", data)
            break

# --- sock_diag: a real dump of a netns with a listener, a queued and an established connection
def sock_diag_dump():
    NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    s.bind((0, 0))
    # inet_diag_req_v2: family, protocol, ext (MEMINFO|INFO|CONG|SKMEMINFO), pad, states, sockid(48)
    ext = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 6)
    req = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, ext, 0, 0xffffffff) + b"\0" * 48
    hdr = struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, 0x301, 77, 0)
    s.send(hdr + req)
    datagrams = []
    while True:
        d = s.recv(65536)
        datagrams.append(d)
        if struct.unpack_from("=H", d, 4)[0] in (2, 3):  # NLMSG_ERROR, NLMSG_DONE
            break
        # done message may be inside the same datagram
        off, done = 0, False
        while off + 16 <= len(d):
            ln, ty = struct.unpack_from("=IH", d, off)
            if ty in (2, 3):
                done = True
            if ln < 16:
                break
            off += (ln + 3) & ~3
        if done:
            break
    return datagrams

if os.geteuid() == 0 and len(sys.argv) > 1 and sys.argv[1] == "--in-netns":
    lst = socket.socket(); lst.bind(("127.0.0.1", 8080)); lst.listen(1)
    a = socket.create_connection(("127.0.0.1", 8080)); conn, _ = lst.accept(); conn.send(b"x" * 100)
    b = socket.create_connection(("127.0.0.1", 8080))  # queued, not accepted
    for i, d in enumerate(sock_diag_dump()):
        put("sock_diag", f"dump-{i}", d)
    put("sock_diag", "whole-dump", b"".join(sock_diag_dump()))
elif os.geteuid() == 0:
    subprocess.run(["unshare", "-n", "sh", "-c", f"ip link set lo up && python3 {__file__} --in-netns"], check=True)
