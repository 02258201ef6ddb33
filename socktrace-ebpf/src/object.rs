//! What every eBPF object of socktrace carries (`socktrace` and `socktrace-iter`): the panic
//! handler a `no_std` binary needs and the license section.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: bpf_probe_read_kernel, bpf_seq_write and the tracing program types require it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
