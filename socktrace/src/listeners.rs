//! Live LISTEN-socket sampling for the interval views (`top`, `serve`, `diagnose`): one
//! NETLINK_SOCK_DIAG socket per network namespace, kept open between samples (a netlink socket
//! stays bound to the namespace it was created in), re-discovering namespaces and socket owners
//! only every few seconds.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use crate::{
    model::{DiagListener, DiagSample, ListenerKey},
    snapshot::{
        diag::{DiagSocket, FAMILIES, Record, Request, TcpState, state_mask},
        netns,
        procs::Owners,
    },
    system,
};

const REDISCOVER: Duration = Duration::from_secs(5);
const RESCAN_OWNERS: Duration = Duration::from_secs(2);

pub struct LiveListeners {
    /// Only this netns (a `--netns` filter), else all.
    scope: Option<u32>,
    sockets: HashMap<u32, DiagSocket>,
    discovered: Option<Instant>,
    owners: Owners,
    scanned: Option<Instant>,
}

impl LiveListeners {
    pub fn new(scope: Option<u32>) -> LiveListeners {
        LiveListeners { scope, sockets: HashMap::new(), discovered: None, owners: Owners::default(), scanned: None }
    }

    fn discover(&mut self) {
        if self.discovered.is_some_and(|t| t.elapsed() < REDISCOVER) {
            return;
        }
        self.discovered = Some(Instant::now());
        let own = system::own_netns();
        for ns in netns::discover().namespaces {
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
        for (&inode, sock) in &mut self.sockets {
            let mut recs = Vec::new();
            let ok = FAMILIES.iter().all(|&family| {
                sock.dump(Request { family, states: state_mask([TcpState::Listen, TcpState::SynRecv]), info: false }, &mut recs).is_ok()
            });
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
        let unknown_owner = listen.iter().any(|(_, r)| r.inode != 0 && self.owners.of(r.inode).next().is_none());
        if self.scanned.is_none_or(|t| t.elapsed() >= RESCAN_OWNERS || (unknown_owner && t.elapsed() >= Duration::from_millis(500))) {
            self.owners = Owners::scan();
            self.scanned = Some(Instant::now());
        }
        let listeners = listen
            .into_iter()
            .map(|(netns, r)| {
                let mut owners: Vec<(u32, String)> = Vec::new();
                for (p, _) in self.owners.of(r.inode) {
                    if !owners.iter().any(|o| o.0 == p.pid) {
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
                }
            })
            .collect();
        Some(DiagSample { listeners, syn_recv })
    }
}
