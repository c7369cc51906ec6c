//! A plain-mode connection fed an arbitrary byte stream from the remote: the whole
//! handshake state machine and message framing. No panics; the outcome does not
//! depend on how the stream is chunked; a failed connection yields nothing more.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    common::check_chunking(false, flags & 1 == 1, stream);
});
