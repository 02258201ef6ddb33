//! The /proc/net texts socktrace reads (each parser gets the same input): netstat and snmp
//! counters (`diagnose`, `TcpExt:` lookups), sockstat and sockstat6, `nf_conntrack` statistics,
//! `ip_local_port_range`.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use socktrace::{
    diagnose::{parse_conntrack_stats, parse_counters},
    snapshot::netns::{port_range_middle, sockstat_sum, tcp_ext_in},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut counters = BTreeMap::new();
    parse_counters(text, &mut counters);
    parse_conntrack_stats(text, &mut counters);
    let _ = tcp_ext_in(text, &["ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "SyncookiesSent"]);
    let _ = sockstat_sum(text, "TCP:", &["inuse", "tw"]);
    let _ = sockstat_sum(text, "TCP6:", &["inuse"]);
    let _ = port_range_middle(text);
});
