//! Empty library target: it only exists so `socktrace` can name this crate as a build-dependency
//! and be rebuilt when the kernel programs change. The programs live in `main.rs`.
#![no_std]
