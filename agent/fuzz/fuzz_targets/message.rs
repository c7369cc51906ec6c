//! Messages after the features (`[tag][payload]`), peer names and `host[:port]`
//! targets: no panics, and every decoded message re-encodes to bytes that decode to
//! the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::mesh::{
    router::parse_host_port,
    wire::{Message, parse_peer_name},
};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(m)) = Message::decode(data) {
        let encoded = m.encode();
        assert_eq!(Message::decode(&encoded), Ok(Some(m.clone())), "{m:?}");
        // Sleeve and overlay control carry their payload verbatim (a heartbeat's
        // payload is ignored, gossip is re-encoded).
        if matches!(
            m,
            Message::CompatSleeve { .. } | Message::OverlayControl { .. }
        ) {
            assert_eq!(encoded, data);
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(name) = parse_peer_name(s) {
            // The canonical form parses back to the same name.
            assert_eq!(parse_peer_name(&name.to_string()), Ok(name), "{s:?}");
            assert_eq!(name.to_string().parse(), Ok(name));
        }
        if let Ok((host, port)) = parse_host_port(s) {
            assert!(!host.is_empty(), "{s:?}");
            assert!(s.contains(&host));
            // A port was split off after the host's last `:` (or its `]`).
            assert_eq!(
                port.is_some(),
                s.len() > host.len() + 2 * usize::from(s.starts_with('['))
            );
        }
    }
});
