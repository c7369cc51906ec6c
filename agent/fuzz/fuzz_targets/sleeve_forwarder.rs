//! The sleeve forwarder's control state (heartbeats, frag test, path-MTU search) and
//! the fast datapath's heartbeat state, driven by an arbitrary sequence of special
//! frames, control messages, path-MTU reports and clock ticks. No panics; the MTU stays
//! within its bounds; a failed forwarder does nothing more.
#![no_main]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use weft::{
    fastdp::FastdpForwarder,
    mesh::{PeerName, SessionKey},
    sleeve::{
        forwarder::{SleeveAction, SleeveForwarder},
        frame::{ETH_HEADER_LEN, FRAG_TEST_LEN, MAX_DATAGRAM_LEN},
    },
};

const CONN_UID: u64 = 0xc350_c9d6_1fdf_9916;

#[derive(Debug, Arbitrary)]
enum Op {
    /// A special frame: `len` bytes of zeros, the tail after the Ethernet header
    /// overwritten with `tail`.
    Special {
        len: u16,
        tail: Vec<u8>,
        port: u8,
    },
    /// A heartbeat with our ConnUID from one of a few addresses.
    Heartbeat {
        port: u8,
    },
    /// An arbitrary frame (usually not special).
    Frame(Vec<u8>),
    Control {
        subtag: u8,
        body: Vec<u8>,
    },
    PathMtu(u32),
    Tick(u16),
    Fastdp {
        subtag: u8,
    },
    FastdpHeartbeat,
}

#[derive(Debug, Arbitrary)]
struct Input {
    outbound: bool,
    encrypted: bool,
    known_addr: bool,
    ops: Vec<Op>,
}

fn addr(port: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 6783 + u16::from(port % 4)))
}

fuzz_target!(|input: Input| {
    let local = PeerName([0xaa, 0, 0, 0, 0, 1]);
    let remote = PeerName([0xaa, 0, 0, 0, 0, 2]);
    let key = SessionKey([1; 32]);
    let mut now = Instant::now();
    let mut fwd = SleeveForwarder::new(
        local,
        remote,
        CONN_UID,
        input.outbound,
        input.encrypted.then_some(&key),
        input.known_addr.then(|| addr(0)),
        now,
    );
    let mut fastdp = FastdpForwarder::new(CONN_UID, 1376, input.outbound, now);
    for op in input.ops.into_iter().take(256) {
        let was_failed = fwd.is_failed();
        match op {
            Op::Special { len, tail, port } => {
                let len = usize::from(len).clamp(ETH_HEADER_LEN, FRAG_TEST_LEN);
                let mut f = vec![0u8; len];
                let n = tail.len().min(len - ETH_HEADER_LEN);
                f[ETH_HEADER_LEN..ETH_HEADER_LEN + n].copy_from_slice(&tail[..n]);
                assert!(fwd.on_special_frame(addr(port), &f, now).is_ok());
            }
            Op::Heartbeat { port } => {
                let f = weft::sleeve::frame::heartbeat(CONN_UID);
                let _ = fwd.on_special_frame(addr(port), &f, now);
                if !fwd.is_failed() {
                    assert_eq!(fwd.remote_addr(), Some(addr(port)));
                }
            }
            Op::Frame(f) => {
                let _ = fwd.on_special_frame(addr(0), &f, now);
            }
            Op::Control { subtag, body } => {
                let _ = fwd.on_control(subtag, &body, now);
            }
            Op::PathMtu(mtu) => fwd.on_path_mtu(mtu as usize, now),
            Op::Tick(ms) => now += Duration::from_millis(u64::from(ms)),
            Op::Fastdp { subtag } => {
                let _ = fastdp.on_control(subtag, now);
            }
            Op::FastdpHeartbeat => {
                let _ = fastdp.on_heartbeat(now, input.outbound);
            }
        }
        let actions = fwd.poll(now);
        if was_failed {
            assert!(actions.is_empty(), "a failed forwarder acts: {actions:?}");
            assert!(fwd.is_failed());
        }
        for a in &actions {
            match a {
                SleeveAction::SendSpecial { frame, .. } => {
                    assert!(frame.len() >= ETH_HEADER_LEN);
                    assert!(frame.len() <= MAX_DATAGRAM_LEN);
                    assert!(frame[..ETH_HEADER_LEN].iter().all(|&b| b == 0));
                }
                SleeveAction::SendControl { subtag, body } => {
                    assert!((1..=3).contains(subtag));
                    assert!(body.is_empty() || body.len() == 2);
                }
                _ => {}
            }
        }
        assert!(usize::from(fwd.mtu()) <= MAX_DATAGRAM_LEN);
        assert!(fwd.max_df_payload() <= MAX_DATAGRAM_LEN);
        if let Some(d) = fwd.next_deadline() {
            assert!(!fwd.is_failed());
            let _ = d;
        }
        let _ = fastdp.poll(now);
        assert!(fastdp.next_deadline() > now || fastdp.poll(now).is_empty());
    }
});
