//! An arbitrary UDP datagram on port 6783, as plain sleeve and as sealed sleeve with a
//! fixed key, and every frame it holds through the special-frame, fast-datapath
//! heartbeat and ICMP frag-needed parsers. No panics; the frame walk accounts for
//! every byte; a sealed datagram the fuzzer did not seal never opens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::{
    fastdp,
    mesh::SessionKey,
    sleeve::{
        SleeveRx,
        frame::{
            self, ENTRY_HEADER_LEN, ETH_HEADER_LEN, HEARTBEAT_LEN, NAME_LEN, SEALED_HEADER_LEN,
            SpecialKind,
        },
        icmp,
    },
};

fn check_frame(f: &[u8]) {
    if frame::is_special(f) {
        match frame::special_kind(f) {
            SpecialKind::Heartbeat(uid) => {
                assert_eq!(f.len(), HEARTBEAT_LEN);
                assert_eq!(frame::heartbeat(uid).as_slice(), f);
            }
            SpecialKind::FragTest => assert_eq!(f.len(), frame::FRAG_TEST_LEN),
            SpecialKind::MtuProbe(n) => assert_eq!(n + ETH_HEADER_LEN, f.len()),
        }
    }
    if let Some(uid) = fastdp::parse_heartbeat(f) {
        assert!(f.len() >= fastdp::MIN_HEARTBEAT_LEN);
        assert_eq!(f[..ETH_HEADER_LEN], [0; ETH_HEADER_LEN]);
        let _ = uid;
    }
    for mtu in [0u16, 552, 1376, u16::MAX] {
        let _ = icmp::frame_needs_frag_needed(f, usize::from(mtu));
        let mut out = Vec::new();
        if icmp::build_frag_needed(f, mtu, &mut out).is_ok() {
            // Ethernet + IPv4 (20) + ICMP (8) + quoted header and 8 bytes.
            assert!(out.len() >= ETH_HEADER_LEN + 20 + 8 + 20);
            assert!(out.len() <= ETH_HEADER_LEN + 20 + 8 + 60 + 8);
            let ip = &out[ETH_HEADER_LEN..];
            assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
            assert_eq!(
                icmp::internet_checksum(&ip[..20]),
                0,
                "IPv4 header checksum"
            );
            assert_eq!(icmp::internet_checksum(&ip[20..]), 0, "ICMP checksum");
            assert_eq!(&ip[20..22], &[3, 4]);
            assert_eq!(u16::from_be_bytes([ip[26], ip[27]]), mtu);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Plain: sender, then entries.
    let mut buf = data.to_vec();
    match SleeveRx::new(None, false).open(&mut buf) {
        Ok(frames) => {
            assert!(data.len() >= NAME_LEN);
            let mut used = NAME_LEN;
            let mut failed = false;
            for f in frames {
                assert!(!failed, "the frame walk goes on after an error");
                match f {
                    Ok(f) => {
                        used += ENTRY_HEADER_LEN + f.frame.len();
                        check_frame(f.frame);
                    }
                    Err(_) => failed = true,
                }
            }
            assert!(failed || used == data.len(), "every byte is accounted for");
            assert!(used <= data.len());
        }
        Err(_) => assert!(data.len() < NAME_LEN),
    }
    assert_eq!(frame::datagram_sender(data).is_ok(), data.len() >= NAME_LEN);
    match frame::parse_sealed_header(data) {
        Ok((_, _, boxed)) => assert_eq!(boxed.len() + NAME_LEN + 8, data.len()),
        Err(_) => assert!(data.len() < SEALED_HEADER_LEN),
    }
    // Sealed with a key the fuzzer does not know: never opens.
    let key = SessionKey([0x5a; 32]);
    for outbound in [false, true] {
        let mut buf = data.to_vec();
        assert!(SleeveRx::new(Some(&key), outbound).open(&mut buf).is_err());
    }
    // Every frame walk, whatever the bytes: the frame parsers on the raw input too.
    check_frame(data);
    for f in frame::frames(data).flatten() {
        check_frame(f.frame);
    }
});
