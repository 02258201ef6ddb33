//! socktrace as a library: every module of the agent, for the `socktrace` binary (`main.rs`, the
//! command line and exit codes) and for the fuzz targets (`fuzz/`), which drive the parsers of
//! outside input directly.
//!
//! Flow: kernel hooks (`socktrace-ebpf`) → ring buffer → [`event`] decode → views ([`watch`],
//! `probes`). Kernel layout comes from BTF at load time ([`offsets`]); each signal's hook is chosen
//! at run time ([`probes`]).

pub mod agent;
pub mod batch;
pub mod bpf_events;
pub mod bpf_sys;
pub mod cli;
pub mod diagnose;
pub mod event;
pub mod filter;
pub mod foreign;
pub mod generate;
pub mod kprobe_missed;
pub mod listeners;
pub mod model;
pub mod offsets;
pub mod pressure;
pub mod probes;
pub mod ring;
pub mod serve;
pub mod snapshot;
pub mod system;
pub mod top;
pub mod tui;
pub mod watch;
