//! socktrace's iterator object (`socktrace-iter`), apart from the tracing programs so that
//! `snapshot` loads one small program and no maps: see [`iter_sockets`].
#![no_std]
#![no_main]

mod iter_sockets;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: bpf_probe_read_kernel and bpf_seq_write require it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
