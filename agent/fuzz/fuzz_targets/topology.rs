//! A topology gossip payload: decoding arbitrary bytes never panics, stays within the
//! peer and connection limits, and what decodes re-encodes to a payload that decodes
//! to the same updates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::mesh::gossip::{MAX_CONNECTIONS, MAX_PEERS, decode_topology, encode_topology};

fuzz_target!(|data: &[u8]| {
    if let Ok(updates) = decode_topology(data) {
        assert!(updates.len() <= MAX_PEERS);
        assert!(updates.iter().map(|u| u.connections.len()).sum::<usize>() <= MAX_CONNECTIONS);
        let again =
            decode_topology(&encode_topology(&updates)).expect("re-encoded topology decodes");
        assert_eq!(again, updates);
    }
});
