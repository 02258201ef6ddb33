//! Decoding raw ring-buffer records into [`Record`], the one form every view uses (table and NDJSON
//! output of `watch`). Optional fields that the hook could not know are `None` (JSON `null`), never 0.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;
use socktrace_common::{AF_INET, AF_INET6, Event, flags, kind};

use crate::probes::HookKind;

#[derive(Debug, thiserror::Error)]
#[error("ring buffer record of {0} bytes, expected {size}", size = std::mem::size_of::<Event>())]
pub struct DecodeError(usize);

/// A decoded event. Field names are the stable keys of `watch --json`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Record {
    pub kind: &'static str,
    pub ts_ns: u64,
    pub netns: u32,
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    pub comm: Option<String>,
    pub family: Option<&'static str>,
    pub laddr: Option<IpAddr>,
    pub lport: u16,
    pub raddr: Option<IpAddr>,
    pub rport: u16,
    pub queue_len: Option<u32>,
    pub queue_max: Option<u32>,
    pub accept_wait_ns: Option<u64>,
    pub segs: u32,
    pub hook: &'static str,
    /// Inode of the listening socket (listener-side events), as sock_diag and `ss -e` report it.
    pub inode: Option<u32>,
}

pub fn kind_name(k: u32) -> &'static str {
    match k {
        kind::ACCEPT => "accept",
        kind::LISTEN_OVERFLOW => "listen_overflow",
        kind::SYN_DROP => "syn_drop",
        kind::RETRANSMIT => "retransmit",
        kind::SYNACK_RETRANSMIT => "synack_retransmit",
        kind::LISTEN => "listen",
        _ => "unknown",
    }
}

/// Reads an [`Event`] from record bytes (the ring buffer gives no alignment guarantee we rely on).
pub fn parse(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return Err(DecodeError(bytes.len()));
    }
    // SAFETY: Event is plain old data and the slice is long enough; read_unaligned copes with alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

fn addr(family: u16, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        AF_INET6 => {
            let v6 = Ipv6Addr::from(*raw);
            // Show v4-mapped peers of dual-stack listeners as plain IPv4, like ss does.
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

impl Record {
    pub fn from_event(ev: &Event) -> Record {
        let has = |f: u32| ev.flags & f != 0;
        let comm_len = ev.comm.iter().position(|&b| b == 0).unwrap_or(ev.comm.len());
        Record {
            kind: kind_name(ev.kind),
            ts_ns: ev.ts_ns,
            netns: ev.netns,
            pid: has(flags::HAS_TASK).then_some(ev.pid),
            tid: has(flags::HAS_TASK).then_some(ev.tid),
            comm: has(flags::HAS_TASK).then(|| String::from_utf8_lossy(&ev.comm[..comm_len]).into_owned()),
            family: match ev.family {
                AF_INET => Some("ipv4"),
                AF_INET6 => Some("ipv6"),
                _ => None,
            },
            laddr: addr(ev.family, &ev.laddr),
            lport: ev.lport,
            raddr: addr(ev.family, &ev.raddr),
            rport: ev.rport,
            queue_len: has(flags::HAS_QUEUE).then_some(ev.queue_len),
            queue_max: has(flags::HAS_QUEUE).then_some(ev.queue_max),
            accept_wait_ns: has(flags::HAS_WAIT).then_some(ev.accept_wait_ns),
            segs: ev.segs,
            hook: HookKind::from_event(ev.hook),
            inode: (ev.sock_ino != 0).then_some(ev.sock_ino),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(ev: &Event) -> Vec<u8> {
        // SAFETY: Event is POD.
        unsafe { std::slice::from_raw_parts(std::ptr::from_ref(ev).cast::<u8>(), std::mem::size_of::<Event>()) }
            .to_vec()
    }

    #[test]
    fn decodes_accept_with_optional_fields() {
        let mut ev = Event::ZERO;
        ev.kind = kind::ACCEPT;
        ev.flags = flags::HAS_TASK | flags::HAS_WAIT;
        ev.family = AF_INET;
        ev.laddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ev.raddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        ev.lport = 8080;
        ev.rport = 40000;
        ev.pid = 42;
        ev.comm[..4].copy_from_slice(b"java");
        ev.accept_wait_ns = 1234;
        ev.hook = socktrace_common::hook::TRACEPOINT;
        let r = Record::from_event(&parse(&bytes(&ev)).unwrap());
        assert_eq!(r.kind, "accept");
        assert_eq!(r.laddr, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(r.raddr, Some("10.1.2.3".parse().unwrap()));
        assert_eq!(r.comm.as_deref(), Some("java"));
        assert_eq!(r.accept_wait_ns, Some(1234));
        assert_eq!(r.queue_len, None, "queue not read: must be null, not 0");
        assert_eq!(r.hook, "tracepoint");
    }

    #[test]
    fn v4_mapped_peer_is_shown_as_ipv4() {
        let mut ev = Event::ZERO;
        ev.family = AF_INET6;
        ev.raddr = Ipv6Addr::from(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped()).octets();
        let r = Record::from_event(&ev);
        assert_eq!(r.raddr, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(r.laddr, Some("::".parse().unwrap()));
    }

    #[test]
    fn short_record_is_an_error() {
        assert!(parse(&[0u8; 10]).is_err());
    }
}
