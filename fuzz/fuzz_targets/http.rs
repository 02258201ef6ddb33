//! The HTTP request path of `serve` (`socktrace/src/serve.rs`): arbitrary bytes are what a client
//! sends on one connection (hyper's HTTP/1 parser, then socktrace's routing: `/metrics`,
//! `/healthz`, 404, 405), served over an in-memory stream with a stand-in agent answering scrapes.
//! Every input must end with the connection closed (no hang) and no panic.
#![no_main]

use std::sync::{
    Arc, LazyLock,
    atomic::{AtomicU64, Ordering},
};

use libfuzzer_sys::fuzz_target;
use socktrace::serve::{Scrape, connection};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    runtime::Runtime,
    sync::mpsc,
};

static RT: LazyLock<Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_time().build().expect("tokio runtime"));

fuzz_target!(|data: &[u8]| {
    RT.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (tx, mut rx) = mpsc::channel::<Scrape>(4);
        let served = Arc::new(AtomicU64::new(0));
        // The agent's side: every other scrape fails, to take the error path too.
        let agent = async move {
            let mut n = 0u32;
            while let Some(reply) = rx.recv().await {
                n += 1;
                let body = if n.is_multiple_of(2) { Err("agent error".to_owned()) } else { Ok("# TYPE socktrace_accepts counter\nsocktrace_accepts_total 1\n".to_owned()) };
                let _ = reply.send(body);
            }
            n
        };
        let (mut rd, mut wr) = tokio::io::split(client);
        let send = async move {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let receive = async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        };
        let ((), (), out, scrapes) = tokio::join!(connection(server, tx, Arc::clone(&served)), send, receive, agent);
        // Only answered scrapes count as served, and every response is HTTP/1.
        assert!(served.load(Ordering::Relaxed) <= u64::from(scrapes));
        assert!(out.is_empty() || out.starts_with(b"HTTP/1."), "{:?}", String::from_utf8_lossy(&out[..out.len().min(64)]));
    });
});
