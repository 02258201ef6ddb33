//! Ring-buffer records (`socktrace/src/event.rs`) and the task-file iterator's records
//! (`snapshot/bpf_owners.rs`): arbitrary bytes are cut into records, decoded, shown as `watch`
//! shows them (table and NDJSON) and fed to the per-listener model the interval views read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use socktrace::{
    event::{Record, parse},
    model::Model,
    snapshot::{bpf_owners, procs::Owners},
    watch::write_record,
};
use socktrace_common::Event;

fuzz_target!(|data: &[u8]| {
    let mut model = Model::default();
    model.keep_total_waits = true;
    model.keep_timeline = true;
    let mut out = Vec::new();
    // A short record is an error; whole records are decoded one after the other.
    let _ = parse(data);
    for chunk in data.chunks(size_of::<Event>()) {
        let Ok(ev) = parse(chunk) else { continue };
        let r = Record::from_event(&ev);
        let _ = write_record(&mut out, &r, false, 0);
        let _ = write_record(&mut out, &r, true, ev.ts_ns.wrapping_mul(3));
        model.on_event(&r);
    }
    for l in model.listeners.values() {
        let _ = l.wait_quantiles();
        let _ = l.saturated();
        if let Some(t) = &l.timeline {
            let _ = t.median_gap_ns();
        }
    }
    if let Ok(records) = bpf_owners::records(data) {
        let owners = Owners::from_socket_fds(&records);
        for r in &records {
            let _ = owners.of(u32::try_from(r.inode).unwrap_or(0)).count();
        }
    }
});
