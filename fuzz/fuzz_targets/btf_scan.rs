//! `snapshot`'s own linear BTF scan (`socktrace/src/snapshot/btf_scan.rs`): arbitrary bytes
//! indexed, then the member offsets and function ids the task-file iterator needs looked up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use socktrace::snapshot::btf_scan::RawBtf;

fuzz_target!(|data: &[u8]| {
    let wanted = ["task_struct", "file", "inode", "bpf_iter_task_file", "sock"];
    let Ok(btf) = RawBtf::parse(data, &wanted) else { return };
    let _ = btf.func_id("bpf_iter_task_file");
    for (s, m) in [("task_struct", "tgid"), ("task_struct", "comm"), ("file", "f_inode"), ("inode", "i_ino"), ("sock", "skc_family")] {
        let _ = btf.offset(s, m);
    }
});
