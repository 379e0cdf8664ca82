//! The port header a client sidecar sends first on a dedicated connection, and the status byte
//! it gets back, on arbitrary bytes.
//!
//! Never panics; a header it accepts names a port other than 0 and is exactly what
//! `encode_header` writes for that port; a status byte it accepts is that status's own byte.

#![no_main]

use std::future::Future;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use sidewall_proxy::transport::{Status, encode_header, read_header};

fuzz_target!(|input: &[u8]| {
    let mut reader = input;
    let mut future = std::pin::pin!(read_header(&mut reader));
    // Reading a byte slice never waits: one poll decides.
    let Poll::Ready(result) = future.as_mut().poll(&mut Context::from_waker(Waker::noop())) else {
        panic!("reading a byte slice waited");
    };
    if let Ok(port) = result {
        assert_ne!(port, 0);
        assert_eq!(encode_header(port)[..], input[..5]);
    }
    for &byte in input.iter().take(16) {
        if let Some(status) = Status::from_byte(byte) {
            assert_eq!(status as u8, byte);
        }
    }
});
