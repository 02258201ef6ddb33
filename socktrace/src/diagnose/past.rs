//! Evidence from before the accept queue: the kernel's `PAST` counts (segments to a port that
//! netfilter dropped, SYNs that found no socket, local clients' SYN retransmits) turned into one
//! listener's window deltas. Pure: two snapshots of the map in, [`rules::Past`] out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use socktrace_common::{AF_INET6, PastKey, past};

use super::rules::{NetfilterDrops, Past};
use crate::agent::PastCounts;

/// The address in a `PAST` key.
pub fn key_addr(k: &PastKey) -> IpAddr {
    if k.family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(k.addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]))
    }
}

/// Whether a SYN from a client in `client_ns` to `addr` was meant for this listener (in `netns`,
/// bound to `laddrs`): an address it is bound to, or — bound to every address — one of its
/// namespace's addresses (`local`: interface addresses, `None` when unknown). A loopback address
/// only reaches it from its own namespace. A client connecting to the same port on another host
/// is not this listener's business.
fn reaches(addr: IpAddr, client_ns: u32, netns: u32, laddrs: &[IpAddr], local: Option<&[IpAddr]>) -> bool {
    if addr.is_loopback() && client_ns != netns {
        return false;
    }
    if laddrs.is_empty() || laddrs.iter().any(IpAddr::is_unspecified) {
        return addr.is_loopback() || local.map_or(client_ns == netns, |l| l.contains(&addr));
    }
    laddrs.contains(&addr)
}

/// What happened to `port` in `netns` between two snapshots. Local clients' SYN retransmits
/// count when sent to an address that reaches this listener ([`reaches`]). A class this kernel
/// cannot count is `None`.
pub fn of_port(before: &PastCounts, after: &PastCounts, netns: u32, port: u16, laddrs: &[IpAddr], local: Option<&[IpAddr]>) -> Past {
    let mut nf = NetfilterDrops::default();
    let mut unbound: Vec<(String, u64)> = Vec::new();
    let mut retrans = 0u64;
    for (k, v) in &after.counts {
        // A row evicted (LRU) and created again counts from 0: never more than the kernel saw.
        let d = v.saturating_sub(before.counts.get(k).copied().filter(|b| b <= v).unwrap_or(0));
        if d == 0 || k.port != port {
            continue;
        }
        let addr = key_addr(k);
        match k.class {
            past::NETFILTER if k.netns == netns => {
                if k.syn == 1 {
                    nf.syns += d;
                } else {
                    nf.segments += d;
                }
                let peer = addr.to_string();
                if !nf.peers.contains(&peer) {
                    nf.peers.push(peer);
                }
            }
            past::NO_SOCKET if k.netns == netns => match unbound.iter_mut().find(|(a, _)| *a == addr.to_string()) {
                Some((_, n)) => *n += d,
                None => unbound.push((addr.to_string(), d)),
            },
            past::CLIENT_SYN_RETRANS if reaches(addr, k.netns, netns, laddrs, local) => retrans += d,
            _ => {}
        }
    }
    unbound.sort_by_key(|u| std::cmp::Reverse(u.1));
    nf.peers.sort();
    Past {
        netfilter: after.netfilter.then_some(nf),
        unbound_syns: after.no_socket.then_some(unbound),
        client_syn_retrans: after.client_syn_retrans.then_some(retrans),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(netns: u32, port: u16, class: u8, syn: u8, a: [u8; 4]) -> PastKey {
        let mut k = PastKey { netns, port, class, syn, family: socktrace_common::AF_INET, ..PastKey::ZERO };
        k.addr[..4].copy_from_slice(&a);
        k
    }

    #[test]
    fn window_deltas_per_port() {
        let nf1 = key(7, 80, past::NETFILTER, 1, [10, 0, 0, 1]);
        let nf2 = key(7, 80, past::NETFILTER, 0, [10, 0, 0, 2]);
        let other_ns = key(8, 80, past::NETFILTER, 1, [10, 0, 0, 3]);
        let unbound = key(7, 80, past::NO_SOCKET, 1, [10, 77, 0, 2]);
        let rt_here = key(7, 80, past::CLIENT_SYN_RETRANS, 1, [127, 0, 0, 1]);
        let rt_far = key(9, 80, past::CLIENT_SYN_RETRANS, 1, [10, 77, 0, 2]);
        let rt_else = key(9, 80, past::CLIENT_SYN_RETRANS, 1, [192, 0, 2, 1]);
        // A local client of a remote server on the same port number, and another netns's loopback.
        let rt_remote = key(7, 80, past::CLIENT_SYN_RETRANS, 1, [198, 51, 100, 7]);
        let rt_their_lo = key(9, 80, past::CLIENT_SYN_RETRANS, 1, [127, 0, 0, 1]);
        let before = PastCounts { counts: [(nf1, 5), (unbound, 1)].into_iter().collect(), netfilter: true, no_socket: true, client_syn_retrans: true };
        let after = PastCounts {
            counts: [(nf1, 12), (nf2, 3), (other_ns, 50), (unbound, 4), (rt_here, 2), (rt_far, 3), (rt_else, 9), (rt_remote, 40), (rt_their_lo, 6)].into_iter().collect(),
            ..before.clone()
        };
        let wildcard = ["0.0.0.0".parse().unwrap()];
        let local: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "10.77.0.2".parse().unwrap()];
        let p = of_port(&before, &after, 7, 80, &wildcard, Some(&local));
        assert_eq!(p.netfilter, Some(NetfilterDrops { syns: 7, segments: 3, peers: vec!["10.0.0.1".into(), "10.0.0.2".into()] }));
        assert_eq!(p.unbound_syns, Some(vec![("10.77.0.2".into(), 3)]));
        assert_eq!(p.client_syn_retrans, Some(5));
        // Unavailable classes are None, never 0.
        let blind = PastCounts { netfilter: false, no_socket: false, ..after.clone() };
        let p = of_port(&before, &blind, 7, 80, &wildcard, None);
        assert!(p.netfilter.is_none() && p.unbound_syns.is_none(), "{p:?}");
        // Addresses unknown: only the namespace's own clients (the remote server's too: cannot tell).
        assert_eq!(p.client_syn_retrans, Some(42));
        // Bound to one address: only SYNs to it.
        let bound = ["10.77.0.2".parse().unwrap()];
        assert_eq!(of_port(&before, &after, 7, 80, &bound, Some(&local)).client_syn_retrans, Some(3));
    }
}
