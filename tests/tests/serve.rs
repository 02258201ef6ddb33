//! `socktrace serve` against a real Prometheus server (Debian's `prometheus`, started here with a
//! temporary config on loopback): the scraped overflow counter must equal the test netns's
//! TcpExtListenOverflows delta. And the exporter must keep serving under slow and bad clients.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use socktrace_tests::{Cgroup, NetNs, Scenario, Serve, http_get, privileged, probes, recursion_misses};

const SCENARIO: &str = env!("CARGO_BIN_EXE_st-scenario");

struct Prometheus {
    child: Child,
    dir: std::path::PathBuf,
    addr: String,
}

impl Prometheus {
    fn start(target: &str, port: u16) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("socktrace-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: socktrace\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package `prometheus`) must be installed");
        Prometheus { child, dir, addr }
    }

    /// The raw API answer of an instant query.
    fn api(&self, q: &str) -> Option<serde_json::Value> {
        let enc: String = q
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b"_.-".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let (_, body) = http_get(&self.addr, &format!("/api/v1/query?query={enc}"), Duration::from_secs(5)).ok()?;
        serde_json::from_str(&body[body.find('{')?..=body.rfind('}')?]).ok()
    }

    /// Value of an instant query returning one series (None: no result yet).
    fn query(&self, q: &str) -> Option<f64> {
        let enc: String = q
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b"_.-".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let (status, body) = http_get(&self.addr, &format!("/api/v1/query?query={enc}"), Duration::from_secs(5)).ok()?;
        if status != 200 {
            return None;
        }
        // Chunked or not, the JSON object is the part between the first '{' and the last '}'.
        let json = &body[body.find('{')?..=body.rfind('}')?];
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        v["data"]["result"].get(0)?["value"][1].as_str()?.parse().ok()
    }

    fn wait_for(&self, q: &str, pred: impl Fn(f64) -> bool, limit: Duration) -> Option<f64> {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(q);
            if last.is_some_and(&pred) {
                return last;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        last
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_scrape_matches_kernel_overflow_counter() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("prom").unwrap();
    let cg = Cgroup::new("prom").unwrap();
    let cg_path = cg.path.to_string_lossy().into_owned();
    let inode = ns.inode().to_string();
    let hooks = probes(&["--cgroup", &cg_path]).unwrap();
    let serve = Serve::start(19464, &["--netns", &inode, "--cgroup", &cg_path]).unwrap();
    let prom = Prometheus::start(&serve.addr, 19090);
    assert_eq!(prom.wait_for("up{job=\"socktrace\"}", |v| v == 1.0, Duration::from_secs(60)), Some(1.0), "Prometheus never scraped socktrace");
    let before = ns.counters().unwrap();
    let server = Scenario::start(
        Path::new(SCENARIO),
        &["server", "--netns", &ns.name, "--cgroup", &cg_path, "--addr", "127.0.0.1:9200", "--backlog", "4", "--accept-after-ms", "500", "--accept-delay-ms", "20", "--max-accepts", "40", "--run-ms", "12000"]
            .map(str::to_owned),
    )
    .unwrap();
    let clients = Scenario::start(
        Path::new(SCENARIO),
        &["clients", "--netns", &ns.name, "--addr", "127.0.0.1:9200", "--count", "40", "--hold-ms", "9000"].map(str::to_owned),
    )
    .unwrap();
    server.wait(Duration::from_secs(60)).unwrap();
    let after = ns.counters().unwrap();
    drop(clients);
    let delta = after.delta(&before, "TcpExtListenOverflows");
    assert!(delta > 0, "the scenario must overflow");
    let q = format!("sum(socktrace_listen_overflows_total{{lport=\"9200\",netns=\"{inode}\"}})");
    // Exact on every hook, the cgroup_skb SYN-drop fallback included (there: the allowed shortfall).
    let got = prom.wait_for(&q, |v| (v - delta as f64).abs() < 0.5, Duration::from_secs(20));
    eprintln!("TcpExtListenOverflows delta {delta}; Prometheus {q} = {got:?} (syn_drop on {:?})", hooks["syn_drop"]);
    let got = got.expect("no socktrace_listen_overflows_total series in Prometheus");
    if hooks["syn_drop"].as_deref() == Some("cgroup_skb") {
        socktrace_tests::assert_drops_near("Prometheus listen overflows", got.round() as i64, delta);
    } else {
        assert!((got - delta as f64).abs() < 0.5, "Prometheus says {got}, kernel says {delta}");
    }
    let accepts = prom.query(&format!("sum(socktrace_accepts_total{{lport=\"9200\",netns=\"{inode}\"}})"));
    assert!(accepts.is_some_and(|a| a > 0.0), "accepts exported: {accepts:?}");
    // Program runs the kernel skipped are exported where it counts them (bpftool shows the field),
    // at most what it counted by now (the series lags by up to a scrape).
    let metrics = http_get(&serve.addr, "/metrics", Duration::from_secs(20)).unwrap().1;
    let exported = metrics.lines().find_map(|l| l.strip_prefix("socktrace_program_runs_missed_total ")).and_then(|v| v.trim().parse::<f64>().ok());
    let counted = recursion_misses(serve.pid(), &[""]).unwrap();
    eprintln!("program runs missed: exported {exported:?}, bpftool {counted}");
    if socktrace_tests::kernel_counts_recursion_misses(serve.pid()) {
        assert!(exported.is_some_and(|e| e >= 0.0 && e <= counted as f64), "socktrace_program_runs_missed_total {exported:?} vs bpftool {counted}");
    } else {
        assert_eq!(exported, None, "a kernel without recursion_misses: no series, never 0");
    }
    // SYN-drop checks settled late: a series only where SYN drops are confirmed at the SYN's free
    // (the counted cgroup_skb hook); with an exact hook there is no such check, so no series.
    let late = metrics.lines().find_map(|l| l.strip_prefix("socktrace_syn_drop_checks_late_total ")).and_then(|v| v.trim().parse::<f64>().ok());
    // Other BPF programs coming and going are counted: none so far, then `socktrace probes`
    // below loads and unloads its own.
    let foreign = |m: &str| m.lines().find_map(|l| l.strip_prefix("socktrace_other_bpf_programs_changed_total ")).and_then(|v| v.trim().parse::<f64>().ok());
    assert_eq!(foreign(&metrics), Some(0.0), "no other BPF program came or went yet");
    let settled = socktrace_tests::probes_attached(&["--cgroup", &cg_path]).unwrap()["syn_drop"].1.iter().any(|a| a == "raw_tp/consume_skb");
    let after_probes = http_get(&serve.addr, "/metrics", Duration::from_secs(20)).unwrap().1;
    eprintln!("other BPF programs changed: {:?} before `socktrace probes`, {:?} after", foreign(&metrics), foreign(&after_probes));
    assert!(foreign(&after_probes).is_some_and(|n| n > 0.0), "socktrace probes loaded and unloaded programs beside serve");
    eprintln!("SYN-drop checks settled late: {late:?} (settled at the free: {settled})");
    assert_eq!(late.is_some(), settled, "socktrace_syn_drop_checks_late_total {late:?}");
    // Failed kernel reads skip events: always exported, so a short count can say why.
    let read_errors = metrics.lines().find_map(|l| l.strip_prefix("socktrace_kernel_read_errors_total ")).and_then(|v| v.trim().parse::<f64>().ok());
    eprintln!("kernel read errors: {read_errors:?}");
    assert!(read_errors.is_some(), "socktrace_kernel_read_errors_total missing");
    // A listener that appeared after serve started is no eviction: the maps hold a few rows here.
    let evictions: Vec<&str> = metrics.lines().filter(|l| l.starts_with("socktrace_map_evictions_total{")).collect();
    assert!(!evictions.is_empty(), "socktrace_map_evictions_total missing");
    assert!(evictions.iter().all(|l| l.ends_with(" 0")), "no map evicted anything: {evictions:?}");

    // Every query of the shipped Grafana dashboard is valid PromQL against these series.
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json")).unwrap()).unwrap();
    let mut checked = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap().replace("$netns", ".*").replace("$lport", ".*").replace("$__rate_interval", "1m");
            let answer = prom.api(&expr).unwrap_or_default();
            assert_eq!(answer["status"], "success", "dashboard query {expr}: {answer}");
            checked += 1;
        }
    }
    assert!(checked >= 8, "dashboard queries checked: {checked}");
}

#[test]
fn exporter_survives_slow_and_bad_clients() {
    if !privileged() {
        return;
    }
    let serve = Serve::start(19465, &["--netns", "1"]).unwrap();
    let addr: std::net::SocketAddr = serve.addr.parse().unwrap();
    // Slowloris: many connections that never finish their headers.
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
        slow.push(s);
    }
    for path in ["/healthz", "/metrics"] {
        let t = Instant::now();
        let (status, body) = http_get(&serve.addr, path, Duration::from_secs(5)).unwrap();
        assert_eq!(status, 200, "{path} under slowloris");
        assert!(t.elapsed() < Duration::from_secs(3), "{path} took {:?}", t.elapsed());
        if path == "/metrics" {
            assert!(body.contains("socktrace_probe_info"), "{body}");
        }
    }
    // Malformed and oversized requests get an error status or a closed connection, never a hang.
    for bad in [b"BLAH\r\n\r\n".to_vec(), b"GET / HTTP/9.9\r\n\r\n".to_vec(), [b"GET /metrics HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 40_000], b"\r\n\r\n"].concat()] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&bad);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.0 4"), "bad request answered {text:?}");
    }
    assert_eq!(http_get(&serve.addr, "/nope", Duration::from_secs(5)).unwrap().0, 404);
    // The slow connections are cut by the header timeout.
    std::thread::sleep(Duration::from_secs(6));
    let mut cut = 0;
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 256];
        if matches!(s.read(&mut b), Ok(_)) {
            cut += 1;
        }
    }
    assert_eq!(cut, slow.len(), "slow clients must be disconnected by the header timeout");
    assert_eq!(http_get(&serve.addr, "/healthz", Duration::from_secs(5)).unwrap().0, 200);
}
