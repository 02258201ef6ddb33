//! The ss filter expression every command takes (`socktrace/src/filter.rs`): arbitrary text is
//! parsed, checked for every scope, its `netns` terms resolved, then evaluated against sockets,
//! listeners and events. A bad expression must be a `FilterError`, never a panic.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use socktrace::{
    event::Record,
    filter::{End, Filter, Scope, Subject, parse},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // As the command line hands it over: whitespace-separated arguments (joined again by the parser).
    let args: Vec<String> = text.split(' ').map(str::to_owned).collect();
    let Ok(mut parsed) = parse(&args) else { return };
    for (scope, command) in [(Scope::Sockets, "snapshot"), (Scope::Listeners, "top"), (Scope::Events, "watch")] {
        let _ = parsed.check(scope, command);
    }
    let _ = parsed.resolve_netns(|spec| if spec.len() % 3 == 0 { Err(()) } else { Ok(u32::try_from(spec.len()).unwrap_or(0)) });
    if let Some(states) = parsed.states {
        for s in socktrace::snapshot::diag::TcpState::ALL {
            let _ = states.contains(s);
        }
    }
    let addrs = [
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))),
        Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        Some(IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped())),
        None,
    ];
    if let Some(expr) = &parsed.expr {
        for (i, ip) in addrs.iter().enumerate() {
            let port = [0u16, 80, 443, 8080, 65535][i];
            let s = Subject { netns: u32::try_from(i).unwrap_or(0), local: End { ip: *ip, port }, peer: Some(End { ip: addrs[4 - i], port: port ^ 0x5a5a }) };
            let _ = expr.matches(&s);
            let _ = expr.matches(&Subject { peer: None, ..s });
        }
    }
    let mut filter = Filter::new(Some(80), None, None, parsed.expr);
    let _ = filter.matches_listener(1, 80);
    let _ = filter.matches_listener_socket(1, 80, 7);
    let r = Record {
        kind: "accept",
        ts_ns: 1,
        netns: 1,
        pid: Some(2),
        tid: Some(2),
        comm: Some("x".into()),
        family: Some("ipv4"),
        laddr: addrs[0],
        lport: 80,
        raddr: addrs[1],
        rport: 40000,
        queue_len: None,
        queue_max: None,
        accept_wait_ns: None,
        segs: 0,
        hook: "tracepoint",
        inode: Some(7),
    };
    let _ = filter.matches_event(&r);
    let _ = filter.matches_listen_event(&r);
});
