//! `NETLINK_SOCK_DIAG` dump datagrams (`socktrace/src/snapshot/diag.rs`): arbitrary bytes as a
//! datagram of the dump, framed and decoded into socket records (`inet_diag` header, the
//! attributes socktrace reads: meminfo, `tcp_info`, congestion), then printed as `snapshot` does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use socktrace::snapshot::diag::{decode, ends_dump, push_addr};

fuzz_target!(|data: &[u8]| {
    // The dump's sequence number: the first message's, so its messages count as ours.
    let seq = data.get(8..12).map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let _ = ends_dump(data, seq);
    let mut line = String::new();
    let _ = decode(data, seq, &mut |r| {
        push_addr(&mut line, r.local.ip(), r.ifindex);
        push_addr(&mut line, r.peer.ip(), 0);
        let _ = (r.state.name(), r.drops, r.tcp, r.congestion);
    });
});
