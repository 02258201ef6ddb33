//! Kernel offsets from BTF (`socktrace/src/offsets.rs`, `--btf FILE` or /sys/kernel/btf/vmlinux):
//! arbitrary bytes through the size check, btf-rs's parser and every lookup the tracer makes.
//! Malformed BTF must be an error, never a panic or a hang.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use socktrace::offsets::resolve_btf;

fuzz_target!(|data: &[u8]| {
    let kallsyms = "ffffffff81000000 T cookie_v4_check\nffffffff81000100 T cookie_v6_check\nffffffff81000200 T next\nffffffff82000000 D __per_cpu_offset\n";
    let _ = resolve_btf(data, Path::new("fuzz.btf"), kallsyms);
});
