//! Per-process /proc texts and links: `/proc/PID/stat` (the holder states `diagnose` shows), fd
//! link targets (`socket:[N]`), `/proc/self/mountinfo` (the cgroup-v2 mount) and namespace
//! discovery (each input line: a link's inode or error, and an optional /run/netns name).
#![no_main]

use std::{collections::HashSet, io, path::PathBuf};

use libfuzzer_sys::fuzz_target;
use socktrace::{diagnose::stat_state, snapshot::netns::Discovery, snapshot::procs::socket_inode, system::cgroup2_in_mountinfo};

fuzz_target!(|data: &[u8]| {
    let _ = socket_inode(data);
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = stat_state(text);
    let _ = cgroup2_in_mountinfo(text);
    let mut d = Discovery::default();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        let inode = match words.next() {
            Some("EACCES") => Err(io::Error::from(io::ErrorKind::PermissionDenied)),
            Some(w) => w.parse::<u32>().map_err(io::Error::other),
            None => continue,
        };
        d.add(&mut seen, PathBuf::from(format!("/proc/{i}/ns/net")), words.next().map(str::to_owned), inode);
    }
    assert_eq!(d.namespaces.len(), seen.len(), "each namespace once");
});
