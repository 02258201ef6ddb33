//! Kernel-provided texts the tracer reads at load time (`socktrace/src/offsets.rs`):
//! `/proc/kallsyms` (symbol addresses and function ranges) and tracefs `format` files (record
//! offsets of the classic syscall tracepoints).
#![no_main]

use libfuzzer_sys::fuzz_target;
use socktrace::offsets::{format_field, kallsyms_addr, kallsyms_ranges};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = kallsyms_addr(text, "__per_cpu_offset");
    let _ = kallsyms_ranges(text, &["cookie_v4_check", "cookie_v6_check"]);
    for field in ["fd", "ret", "backlog", "__syscall_nr"] {
        let _ = format_field(text, field);
    }
});
