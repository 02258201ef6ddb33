//! Live LISTEN-socket sampling for the interval views (`top`, `serve`, `diagnose`): one
//! NETLINK_SOCK_DIAG socket per network namespace, kept open between samples (a netlink socket
//! stays bound to the namespace it was created in), re-discovering namespaces every few seconds
//! and closing the sockets of namespaces that were deleted (an open socket keeps its namespace
//! alive).
//!
//! Socket owners come from a scan of every process's fds (/proc/*/fd), which costs one syscall
//! per descriptor on the host (100k sockets: ~100 ms). It is redone only when a listener appears
//! that the last scan did not see, when an owner found before no longer holds its socket (checked
//! per listener, one `readlink` each), or every [`RESCAN_OWNERS`] to pick up new holders.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::{
    model::{DiagListener, DiagSample, ListenerKey},
    snapshot::{
        diag::{BOTH_FAMILIES, DiagSocket, Record, Request, TcpState, state_mask},
        netns,
        procs::Owners,
    },
    system,
};

const REDISCOVER: Duration = Duration::from_secs(5);
const RESCAN_OWNERS: Duration = Duration::from_secs(30);
/// At most this often when a scan is due to a new or moved listener.
const RESCAN_MIN: Duration = Duration::from_millis(500);

pub struct LiveListeners {
    /// Only this netns (a `--netns` filter), else all.
    scope: Option<u32>,
    sockets: HashMap<u32, DiagSocket>,
    discovered: Option<Instant>,
    owners: Owners,
    scanned: Option<Instant>,
    /// LISTEN socket inodes present at the last owner scan.
    scanned_inodes: HashSet<u32>,
    /// Also count SYN_RECV sockets per port (a walk of the established hash per sample).
    half_open: bool,
}

impl LiveListeners {
    pub fn new(scope: Option<u32>, half_open: bool) -> LiveListeners {
        LiveListeners {
            scope,
            sockets: HashMap::new(),
            discovered: None,
            owners: Owners::default(),
            scanned: None,
            scanned_inodes: HashSet::new(),
            half_open,
        }
    }

    fn discover(&mut self) {
        if self.discovered.is_some_and(|t| t.elapsed() < REDISCOVER) {
            return;
        }
        self.discovered = Some(Instant::now());
        let own = system::own_netns();
        let found = netns::discover().namespaces;
        // A namespace no process is in and no /run/netns name holds (deleted with `ip netns del`,
        // its last process gone) lives on only through our socket, which pins it: close it, or
        // every deleted namespace stays allocated in the kernel and costs an fd here (found by
        // `cargo xtask soak`). If it is found again, it is reopened.
        self.sockets.retain(|inode, _| found.iter().any(|ns| ns.inode == *inode));
        for ns in found {
            if self.scope.is_some_and(|s| s != ns.inode) || self.sockets.contains_key(&ns.inode) {
                continue;
            }
            if let Ok(Ok(sock)) = netns::within(&ns, own, DiagSocket::open) {
                self.sockets.insert(ns.inode, sock);
            }
        }
    }

    /// One sample; `None` when no namespace could be listed at all.
    pub fn sample(&mut self) -> Option<DiagSample> {
        self.discover();
        // Listeners first (its sockets decide whether the owner scan is worth refreshing).
        let mut listen: Vec<(u32, Record)> = Vec::new();
        let mut syn_recv: BTreeMap<ListenerKey, u32> = BTreeMap::new();
        let mut dead = Vec::new();
        let states = if self.half_open { state_mask([TcpState::Listen, TcpState::SynRecv]) } else { state_mask([TcpState::Listen]) };
        for (&inode, sock) in &mut self.sockets {
            let mut recs = Vec::new();
            // Both families in one dump: SYN-RECV sockets live in the established hash, which a
            // dump walks whole (every namespace's sockets), so a dump per family walked it twice.
            let ok = sock.dump(Request { family: BOTH_FAMILIES, states, info: false }, &mut recs).is_ok();
            if !ok {
                dead.push(inode);
                continue;
            }
            for r in recs {
                if r.state == TcpState::Listen {
                    listen.push((inode, r));
                } else {
                    *syn_recv.entry(ListenerKey { netns: inode, lport: r.local.port() }).or_default() += 1;
                }
            }
        }
        for inode in dead {
            self.sockets.remove(&inode);
        }
        if self.sockets.is_empty() {
            return None;
        }
        let moved = || {
            listen.iter().any(|(_, r)| {
                r.inode != 0 && (!self.scanned_inodes.contains(&r.inode) || self.owners.of(r.inode).any(|(p, fd)| !holds(p.pid, fd, r.inode)))
            })
        };
        // Whether every owner below is known to still hold its socket: just scanned, or checked by
        // `moved` (then each is not checked again).
        let mut verified = false;
        let due = match self.scanned {
            None => true,
            Some(t) if t.elapsed() >= RESCAN_OWNERS => true,
            Some(t) if t.elapsed() >= RESCAN_MIN => {
                let m = moved();
                verified = !m;
                m
            }
            Some(_) => false,
        };
        if due {
            self.scanned_inodes = listen.iter().map(|(_, r)| r.inode).collect();
            let wanted = &self.scanned_inodes;
            self.owners = Owners::scan_matching(&|inode| wanted.contains(&inode));
            self.scanned = Some(Instant::now());
            verified = true;
        }
        let listeners = listen
            .into_iter()
            .map(|(netns, r)| {
                let mut owners: Vec<(u32, String)> = Vec::new();
                for (p, fd) in self.owners.of(r.inode) {
                    if !owners.iter().any(|o| o.0 == p.pid) && (verified || holds(p.pid, fd, r.inode)) {
                        owners.push((p.pid, p.comm.clone()));
                    }
                }
                DiagListener {
                    netns,
                    laddr: r.local.ip(),
                    lport: r.local.port(),
                    queue_len: r.recv_q,
                    backlog: r.send_q,
                    owners,
                    drops: r.drops.map(u64::from),
                    inode: r.inode,
                    cookie: r.cookie,
                }
            })
            .collect();
        Some(DiagSample { listeners, syn_recv })
    }
}

/// Whether `pid`'s descriptor `fd` is still the socket `inode` (one `readlink`).
fn holds(pid: u32, fd: u32, inode: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).is_ok_and(|l| l.as_os_str().as_encoded_bytes() == format!("socket:[{inode}]").as_bytes())
}
