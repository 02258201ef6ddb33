//! `socktrace top --json`: a burst that fills a backlog-8 queue and drains well within one
//! interval is reported with its peak (9 = backlog + 1, the kernel's limit) and its drops in the
//! interval it happened, while the sock_diag sample at the interval's end (what `ss` would show)
//! misses it.

use std::{path::Path, time::Duration};

use serde_json::Value;
use socktrace_tests::{Cgroup, NetNs, Scenario, Socktrace, privileged, probes};

const SCENARIO: &str = env!("CARGO_BIN_EXE_st-scenario");

#[test]
fn short_burst_is_seen_by_top_but_not_by_snapshots() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("topb").unwrap();
    let cg = Cgroup::new("topb").unwrap();
    let cgp = cg.path.to_string_lossy().into_owned();
    let inode = ns.inode().to_string();
    let hooks = probes(&["--cgroup", &cgp]).unwrap();
    let top = Socktrace::start(&["top", "--json", "--interval", "1s", "--iterations", "5", "--netns", &inode, "--port", "9600", "--cgroup", &cgp], "tracing started").unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let before = ns.counters().unwrap();
    let server = Scenario::start(
        Path::new(SCENARIO),
        &["server", "--netns", &ns.name, "--cgroup", &cgp, "--addr", "127.0.0.1:9600", "--backlog", "8", "--accept-after-ms", "150", "--run-ms", "3000"].map(str::to_owned),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let clients = Scenario::start(
        Path::new(SCENARIO),
        &["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9600", "--count", "20", "--hold-ms", "100", "--connect-timeout-ms", "800"].map(str::to_owned),
    )
    .unwrap();
    clients.wait(Duration::from_secs(30)).unwrap();
    let after = ns.counters().unwrap();
    let lines = top.wait(Duration::from_secs(30)).unwrap();
    let server_pid = server.pid();
    drop(server);
    let delta = after.delta(&before, "TcpExtListenOverflows");
    let rows: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v["listeners"].as_array().and_then(|a| a.iter().find(|r| r["lport"] == 9600).cloned()))
        .collect();
    for r in &rows {
        eprintln!("{r}");
    }
    assert!(delta > 0, "the burst must overflow the queue");
    // The owner comes from the socket inode (sock_diag + /proc/PID/fd), like `ss -p`.
    let owned: Vec<&Value> = rows.iter().filter(|r| r["queue_max"].is_u64()).collect();
    assert!(!owned.is_empty() && owned.iter().all(|r| r["pid"] == server_pid && r["comm"] == "st-scenario"), "owner {server_pid}: {owned:?}");
    let burst: Vec<&Value> = rows.iter().filter(|r| r["syn_drops"].as_u64().unwrap() + r["overflows"].as_u64().unwrap() > 0).collect();
    assert!(!burst.is_empty(), "no interval with drops");
    let peak = burst.iter().filter_map(|r| r["queue_peak"].as_u64()).max();
    assert_eq!(peak, Some(9), "peak of the burst interval(s)");
    for r in &burst {
        assert_eq!(r["queue_max"], 8);
        let now = r["queue_len"].as_u64().expect("sock_diag queue length");
        assert!(now < 9, "the end-of-interval snapshot must have missed the burst: {r}");
    }
    let drops: i64 = rows.iter().map(|r| r["syn_drops"].as_i64().unwrap() + r["overflows"].as_i64().unwrap()).sum();
    if hooks["syn_drop"].as_deref() == Some("cgroup_skb") {
        socktrace_tests::assert_drops_near("top's drops vs the kernel's TcpExtListenOverflows", drops, delta);
    } else {
        assert_eq!(drops, delta, "top's drops vs the kernel's TcpExtListenOverflows (syn_drop on {:?})", hooks["syn_drop"]);
    }
}

/// On a terminal `top` is a TUI: run it in tmux, read the screen.
#[test]
fn tui_shows_the_listener_on_a_terminal() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("toptui").unwrap();
    let inode = ns.inode().to_string();
    let session = format!("socktrace-tui-{}", std::process::id());
    let bin = socktrace_tests::socktrace_bin();
    let cmd = format!("{} top --netns {inode} --iterations 6", bin.display());
    let tmux = |args: &[&str]| std::process::Command::new("tmux").args(args).output().expect("tmux (Debian package tmux) is installed by xtask setup");
    assert!(tmux(&["new-session", "-d", "-s", &session, "-x", "180", "-y", "30", &cmd]).status.success());
    std::thread::sleep(Duration::from_millis(2500));
    let server = Scenario::start(
        Path::new(SCENARIO),
        &["server", "--netns", &ns.name, "--addr", "127.0.0.1:9610", "--backlog", "16", "--run-ms", "4000"].map(str::to_owned),
    )
    .unwrap();
    Scenario::start(Path::new(SCENARIO), &["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9610", "--count", "5", "--hold-ms", "100"].map(str::to_owned))
        .unwrap()
        .wait(Duration::from_secs(20))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let screen = String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned();
    let _ = tmux(&["kill-session", "-t", &session]);
    drop(server);
    eprintln!("{screen}");
    assert!(screen.contains("socktrace top"), "title missing:\n{screen}");
    assert!(screen.contains("WAIT-P99") && screen.contains("BACKLOG"), "header missing:\n{screen}");
    let row = screen.lines().find(|l| l.contains("127.0.0.1:9610")).unwrap_or_else(|| panic!("no row for the listener:\n{screen}"));
    assert!(row.contains("st-scenario") && row.contains(&inode), "{row}");
}

/// Sets the calling thread's name (`comm`).
fn set_thread_name(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME with a NUL-terminated string of at most 16 bytes.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    assert_eq!(rc, 0, "prctl(PR_SET_NAME): {}", std::io::Error::last_os_error());
}

/// A thread that renames itself while it keeps accepting: `top`'s acceptors show its old name,
/// then its new one within about a second of accepts (for muted accepts the kernel refreshes a
/// thread's name at most about once a second per socket and thread, not at every accept).
#[test]
fn acceptor_renamed_mid_run_shows_its_new_name() {
    if !privileged() {
        return;
    }
    let port = 9700 + u16::try_from(std::process::id() % 50).unwrap();
    let ns = NetNs::new("tren").unwrap();
    let inode = ns.inode().to_string();
    let listener = ns.within(move || std::net::TcpListener::bind(("127.0.0.1", port))).unwrap().unwrap();
    let p = port.to_string();
    let top = Socktrace::start(&["top", "--json", "--interval", "1s", "--iterations", "6", "--netns", &inode, "--port", &p], "tracing started").unwrap();
    // SAFETY: no preconditions.
    let tid = unsafe { libc::gettid() };
    let accept_for = |d: Duration| {
        let end = std::time::Instant::now() + d;
        let mut n = 0;
        while std::time::Instant::now() < end {
            let c = ns.within(move || std::net::TcpStream::connect(("127.0.0.1", port))).unwrap().unwrap();
            drop((listener.accept().unwrap(), c));
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    };
    set_thread_name(c"st-before");
    let before = accept_for(Duration::from_millis(1800));
    set_thread_name(c"st-renamed");
    let after = accept_for(Duration::from_millis(2800));
    let lines = top.wait(Duration::from_secs(60)).unwrap();
    // Our thread's name as each interval's acceptors list shows it.
    let names: Vec<String> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .flat_map(|v| v["listeners"].as_array().cloned().unwrap_or_default())
        .flat_map(|l| l["sockets"].as_array().cloned().unwrap_or_default())
        .flat_map(|s| s["acceptors"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["tid"] == i64::from(tid))
        .filter_map(|a| a["comm"].as_str().map(str::to_owned))
        .collect();
    eprintln!("{before} accepts as st-before, {after} as st-renamed; names per interval: {names:?}");
    assert_eq!(names.first().map(String::as_str), Some("st-before"), "{names:?}");
    assert_eq!(names.last().map(String::as_str), Some("st-renamed"), "{names:?}");
}

/// Another tracer that loads and unloads its programs between two of `top`'s samples is counted
/// in the interval it happened (JSON `other_bpf_programs_changed`): a second `top`, and
/// `socktrace probes`, which loads its programs, lists them and unloads them in well under a
/// second.
#[test]
fn another_tracer_coming_and_going_is_said_in_its_interval() {
    if !privileged() {
        return;
    }
    let json = Socktrace::start(&["top", "--json", "--interval", "1s", "--iterations", "4", "--port", "9"], "tracing started").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // A second top starts after the first one's first interval: its programs come.
    let second = Socktrace::start(&["top", "--interval", "1s", "--iterations", "3", "--port", "9"], "tracing started").unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    probes(&[]).unwrap();
    let json = json.wait(Duration::from_secs(30)).unwrap();
    second.wait(Duration::from_secs(30)).unwrap();
    let counts: Vec<u64> = json.iter().map(|l| serde_json::from_str::<Value>(l).unwrap()["other_bpf_programs_changed"].as_u64().expect("other_bpf_programs_changed")).collect();
    eprintln!("other BPF programs per interval: {counts:?}");
    assert_eq!(counts.len(), 4);
    assert_eq!(counts[0], 0, "nothing came or went in the first interval");
    // The second top's loads, probes' loads and unloads (16 programs each on this machine).
    assert!(counts[1..].iter().sum::<u64>() >= 4, "the other tracers' programs are counted: {counts:?}");
}
