//! socktrace kernel programs: one hook per file, each a thin `#[program]` around a `try_x()` body.
//!
//! Flow: hooks read sockets through [`kernel`] (offsets from the running kernel's BTF, passed in as
//! the load-time global `OFFSETS`), build a [`socktrace_common::Event`] and emit it through
//! [`maps::EVENTS`]. Userspace picks, per signal, the best hook that loads on this kernel.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![feature(asm_experimental_arch)]
#![expect(internal_features, reason = "atomic_xadd: the bpf target has no AtomicU64::fetch_add")]

mod accept;
mod aggregate;
mod counted;
mod enqueue;
mod kernel;
mod maps;
mod overflow;
mod past;
mod queued;
mod retransmit;
mod syn_drop;
mod object;
