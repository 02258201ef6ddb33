//! socktrace's iterator object (`socktrace-iter`), apart from the tracing programs so that
//! `snapshot` loads one small program and one small map (its offsets): see [`iter_sockets`].
#![no_std]
#![no_main]

mod iter_sockets;
mod object;
