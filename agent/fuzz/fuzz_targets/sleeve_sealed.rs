//! Sealed sleeve behind the encryption: arbitrary frame lists sealed with the session
//! key open to the same bytes and the same frames, once only (the replay window), and
//! never after a bit flip. The replay window itself is fed an arbitrary sequence of
//! sequence numbers and never accepts one twice.
#![no_main]

use std::collections::HashSet;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use weft::{
    mesh::{PeerName, SessionKey},
    sleeve::{
        SleeveRx,
        crypto::{DF_FLAG, OpenError, SleeveOpener, SleeveSealer},
        frame::{self, SEALED_HEADER_LEN},
        replay::ReplayWindow,
    },
};

#[derive(Debug, Arbitrary)]
struct Input {
    outbound: bool,
    datagrams: Vec<(bool, Vec<u8>)>,
    flip: u16,
    seqs: Vec<u64>,
}

fuzz_target!(|input: Input| {
    let key = SessionKey([0x33; 32]);
    let sealer = SleeveSealer::new(&key, input.outbound);
    let mut opener = SleeveOpener::new(&key, !input.outbound);
    let mut rx = SleeveRx::new(Some(&key), !input.outbound);
    for (df, plain) in input.datagrams.iter().take(16) {
        let mut d = vec![0u8; SEALED_HEADER_LEN];
        d[..6].copy_from_slice(&PeerName([0xaa, 0, 0, 0, 0, 2]).0);
        d.extend_from_slice(plain);
        let Ok(seq) = sealer.seal_datagram(&mut d, *df) else {
            continue;
        };
        let (sender, seq_and_df, _) = frame::parse_sealed_header(&d).expect("sealed header");
        assert_eq!(sender, PeerName([0xaa, 0, 0, 0, 0, 2]));
        assert_eq!(seq_and_df & !DF_FLAG, seq & !DF_FLAG);
        assert_eq!(seq_and_df & DF_FLAG != 0, *df);

        // A flipped bit anywhere after the sender never opens.
        let mut bad = d.clone();
        let i = 6 + usize::from(input.flip) % (bad.len() - 6);
        bad[i] ^= 1 << (input.flip >> 13);
        assert_eq!(opener.open_datagram(&mut bad), Err(OpenError::Decrypt));

        let mut copy = d.clone();
        let (opened, got_df) = opener.open_datagram(&mut copy).expect("opens once");
        assert_eq!(opened, plain.as_slice());
        assert_eq!(got_df, *df);
        assert!(matches!(
            opener.open_datagram(&mut d.clone()),
            Err(OpenError::Replay { .. })
        ));
        let mut copy = d.clone();
        let walked: Vec<_> = rx.open(&mut copy).expect("opens once").collect();
        assert_eq!(walked, frame::frames(plain).collect::<Vec<_>>());
        assert!(rx.open(&mut d).is_err(), "replayed");
    }

    let mut window = ReplayWindow::new();
    let mut accepted = HashSet::new();
    let mut highest: Option<u64> = None;
    for &seq in input.seqs.iter().take(4096) {
        let s = seq & !DF_FLAG;
        let new_high = highest.is_none_or(|h| s > h);
        let ok = window.check_and_record(seq);
        if ok {
            assert!(accepted.insert(s), "sequence {s} accepted twice");
        }
        if new_high {
            assert!(ok, "a new highest sequence number {s} is accepted");
            highest = Some(s);
        }
    }
});
