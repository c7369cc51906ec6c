//! Golden tests: every sleeve datagram (UDP 6783) of the captures of real Weave 2.8.1
//! routers parses (plain) or decrypts (the live run whose session key is known), and
//! weft's forwarder answers the captured special frames as Weave did.
//!
//! The 60001-byte frag tests travel IP-fragmented, and the captures hold only their
//! first fragment (the files were kept small). The reader returns such a datagram as
//! incomplete (`complete == false`, the claimed UDP length, the first fragment's bytes);
//! the tests check those apart: the claimed length, the header, a frame list that
//! parses as truncated (not a panic), and zero bytes so far.

#[path = "common/udp_capture.rs"]
mod udp_capture;

use std::{net::SocketAddr, path::PathBuf, time::Instant};

use udp_capture::{UdpDatagram, read_udp};
use weft::{
    mesh::{PeerName, SessionKey},
    sleeve::{
        SleeveAction, SleeveForwarder,
        crypto::{DF_FLAG, OpenError, SleeveOpener, SleeveSealer},
        forwarder::SpecialOutcome,
        frame::{
            DatagramBuilder, FrameError, SleeveFrame, SpecialKind, frames, parse_plain,
            parse_sealed_header, special_kind,
        },
    },
};

const H1: PeerName = PeerName([0xaa, 0, 0, 0, 0, 1]);
const H2: PeerName = PeerName([0xaa, 0, 0, 0, 0, 2]);
const FOREIGN: PeerName = PeerName([0xaa, 0, 0, 0, 0, 0xf2]);

fn capture(name: &str) -> Vec<UdpDatagram> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/weave")
        .join(name);
    let cap = read_udp(&path, 6783);
    assert_eq!(
        cap.lost, 0,
        "{name}: fragment sets without their first fragment"
    );
    assert!(!cap.datagrams.is_empty());
    cap.datagrams
}

/// What a capture's frames add up to.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    heartbeats: Vec<(PeerName, u64)>,
    frag_tests: usize,
    mtu_probes: Vec<usize>,
    echo_requests: usize,
    echo_replies: usize,
    other: usize,
}

impl Tally {
    fn add(&mut self, f: &SleeveFrame<'_>) {
        if f.is_special() {
            match special_kind(f.frame) {
                SpecialKind::Heartbeat(uid) => self.heartbeats.push((f.src, uid)),
                SpecialKind::FragTest => {
                    assert!(f.frame.iter().all(|&b| b == 0));
                    self.frag_tests += 1
                }
                SpecialKind::MtuProbe(n) => self.mtu_probes.push(n),
            }
            return;
        }
        let eth = f.frame;
        let is_icmp = eth.len() >= 34 && eth[12..14] == [0x08, 0x00] && eth[14 + 9] == 1;
        if is_icmp {
            let ihl = usize::from(eth[14] & 0x0f) * 4;
            match eth[14 + ihl] {
                8 => self.echo_requests += 1,
                0 => self.echo_replies += 1,
                _ => self.other += 1,
            }
        } else {
            self.other += 1;
        }
    }
}

fn sender_of(d: &UdpDatagram, map: &[(&str, PeerName)]) -> PeerName {
    let ip = d.src.ip().to_string();
    map.iter()
        .find(|(a, _)| *a == ip)
        .map(|(_, n)| *n)
        .expect("known address")
}

/// A frag test of which only the first fragment was captured.
fn check_partial_frag_test(d: &UdpDatagram, sender: PeerName, sealed: bool) {
    assert!(!d.df, "frag tests go without DF");
    assert!(d.payload.len() < d.claimed_len);
    if sealed {
        assert_eq!(d.claimed_len, 60045);
        let (s, seq_and_df, _) = parse_sealed_header(&d.payload).unwrap();
        assert_eq!(
            (s, seq_and_df),
            (sender, 0),
            "non-DF stream, first datagram"
        );
        return;
    }
    assert_eq!(d.claimed_len, 60021);
    let (s, mut it) = parse_plain(&d.payload).unwrap();
    assert_eq!(s, sender);
    assert_eq!(
        it.next(),
        Some(Err(FrameError::Truncated {
            expected: 60001,
            available: d.payload.len() - 20
        }))
    );
    assert_eq!(it.next(), None);
    assert!(d.payload[20..].iter().all(|&b| b == 0));
}

fn plain_tally(name: &str, peers: &[(&str, PeerName)]) -> (Tally, Vec<UdpDatagram>) {
    let dgrams = capture(name);
    let mut t = Tally::default();
    for d in &dgrams {
        if !d.complete {
            check_partial_frag_test(d, sender_of(d, peers), false);
            t.frag_tests += 1;
            continue;
        }
        let (sender, it) = parse_plain(&d.payload).expect("sender");
        assert_eq!(
            sender,
            sender_of(d, peers),
            "{name}: sender name vs address"
        );
        let receiver = peers.iter().find(|(_, n)| *n != sender).unwrap().1;
        let mut count = 0;
        for f in it {
            let f = f.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((f.src, f.dst), (sender, receiver));
            t.add(&f);
            count += 1;
        }
        assert!(count >= 1);
        // DF datagrams are Weave's raw-socket ones: UDP checksum 0 when a weaver sent them.
        if d.df && sender != FOREIGN {
            assert_eq!(d.checksum, 0);
        }
    }
    (t, dgrams)
}

#[test]
fn sleeve_plain_capture() {
    let (t, dgrams) = plain_tally(
        "sleeve-plain.pcap",
        &[("192.168.77.1", H1), ("192.168.77.2", H2)],
    );
    let uid = 0xc350_c9d6_1fdf_9916;
    assert_eq!(t.heartbeats, vec![(H2, uid), (H1, uid)]);
    assert_eq!(t.frag_tests, 2);
    assert_eq!(t.mtu_probes, vec![1438, 1438]);
    assert!(t.echo_requests >= 3 && t.echo_replies >= 3, "{t:?}");
    assert_eq!(t.echo_requests, t.echo_replies);
    assert_eq!(dgrams.iter().filter(|d| !d.complete).count(), 2);
    // Heartbeats 42 bytes, MTU probes 1472 bytes, both DF.
    assert!(
        dgrams
            .iter()
            .filter(|d| d.complete && (d.payload.len() == 42 || d.payload.len() == 1472))
            .all(|d| d.df)
    );
}

#[test]
fn live_plain_compat_capture() {
    let (t, _) = plain_tally(
        "live-plain-compat.pcap",
        &[("192.168.77.1", H1), ("192.168.77.2", FOREIGN)],
    );
    let uid = 0xbf2a_c3e9_9d39_27ac;
    assert!(t.heartbeats.iter().all(|&(_, u)| u == uid));
    assert_eq!(t.heartbeats.iter().filter(|h| h.0 == FOREIGN).count(), 3);
    assert_eq!(t.heartbeats.iter().filter(|h| h.0 == H1).count(), 2);
    assert_eq!(t.frag_tests, 1);
    assert_eq!(t.mtu_probes, vec![1438; 4]);
    assert_eq!((t.echo_requests, t.echo_replies), (2, 2));
}

/// h1 accepted h2's connection in sleeve-plain: an inbound forwarder fed h2's captured
/// special frames answers as h1 did (ack once, frag received, PMTU verified 1438).
#[test]
fn forwarder_answers_captured_special_frames() {
    let dgrams = capture("sleeve-plain.pcap");
    let now = Instant::now();
    let uid = 0xc350_c9d6_1fdf_9916;
    let mut fwd = SleeveForwarder::new(H1, H2, uid, false, None, None, now);
    assert!(fwd.poll(now).is_empty());
    let mut controls = Vec::new();
    for d in dgrams
        .iter()
        .filter(|d| d.src.ip().octets() == [192, 168, 77, 2])
    {
        if !d.complete {
            // The frag test's first fragment (checked all zero by plain_tally's
            // check): its frame is the all-zero 60001 bytes.
            check_partial_frag_test(d, H2, false);
            fwd.on_special_frame(
                SocketAddr::V4(d.src),
                &weft::sleeve::frame::frag_test(),
                now,
            )
            .unwrap();
            controls.extend(fwd.poll(now).into_iter().filter_map(|a| match a {
                SleeveAction::SendControl { subtag, body } => Some((subtag, body)),
                _ => None,
            }));
            continue;
        }
        let (_, it) = parse_plain(&d.payload).unwrap();
        for f in it {
            let f = f.unwrap();
            if f.is_special() && fwd.accepts_special(f.src, f.dst) {
                fwd.on_special_frame(SocketAddr::V4(d.src), f.frame, now)
                    .unwrap();
            }
        }
        for a in fwd.poll(now) {
            if let SleeveAction::SendControl { subtag, body } = a {
                controls.push((subtag, body));
            }
        }
    }
    assert_eq!(
        controls,
        vec![(1, vec![]), (2, vec![]), (3, vec![0x05, 0x9e])]
    );
    assert_eq!(
        fwd.remote_addr(),
        Some("192.168.77.2:6783".parse().unwrap())
    );
}

fn live_enc_key() -> SessionKey {
    let log = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/weave/peer-enc.log"),
    )
    .unwrap();
    let hex = log
        .lines()
        .find_map(|l| l.split_once(" session key ").map(|(_, k)| k.trim()))
        .expect("session key line");
    assert_eq!(hex.len(), 64);
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    SessionKey(key)
}

/// live-enc: the foreign peer (192.168.77.2) dialled weaver h1 (192.168.77.1), so h1's
/// datagrams carry nonce byte 0 = 0x00 and the peer's 0x80.
#[test]
fn live_enc_capture_decrypts() {
    let key = live_enc_key();
    let dgrams = capture("live-enc.pcap");
    // The foreign peer's opener (it is outbound) reads h1's datagrams; h1's opener
    // (inbound) reads the peer's.
    let mut from_h1 = SleeveOpener::new(&key, true);
    let mut from_peer = SleeveOpener::new(&key, false);
    let mut t_h1 = Tally::default();
    let mut t_peer = Tally::default();
    let mut h1_seqs = (Vec::new(), Vec::new());
    for d in &dgrams {
        let (sender, seq_and_df, boxed) = parse_sealed_header(&d.payload).unwrap();
        assert_eq!(boxed.len() + 14, d.payload.len());
        let is_h1 = d.src.ip().octets() == [192, 168, 77, 1];
        if !d.complete {
            // Only the first fragment: cannot be authenticated; the header is checked.
            assert!(is_h1);
            check_partial_frag_test(d, H1, true);
            h1_seqs.0.push(0);
            t_h1.frag_tests += 1;
            continue;
        }
        assert_eq!(sender, if is_h1 { H1 } else { FOREIGN });
        let (opener, wrong, tally) = if is_h1 {
            (&mut from_h1, SleeveOpener::new(&key, false), &mut t_h1)
        } else {
            (&mut from_peer, SleeveOpener::new(&key, true), &mut t_peer)
        };
        let mut wrong = wrong;
        assert_eq!(
            wrong.open_datagram(&mut d.payload.clone()),
            Err(OpenError::Decrypt),
            "wrong polarity must fail"
        );
        let mut buf = d.payload.clone();
        let (plain, df) = opener.open_datagram(&mut buf).expect("decrypts");
        assert_eq!(df, seq_and_df & DF_FLAG != 0);
        if is_h1 {
            // Weaver sends DF-stream datagrams with DF set and the others without.
            assert_eq!(df, d.df);
            let s = seq_and_df & !DF_FLAG;
            if df {
                h1_seqs.1.push(s)
            } else {
                h1_seqs.0.push(s)
            }
        }
        let receiver = if is_h1 { FOREIGN } else { H1 };
        for f in frames(plain) {
            let f = f.unwrap();
            assert_eq!((f.src, f.dst), (sender, receiver));
            tally.add(&f);
        }
        // Replaying the same datagram is dropped as a replay.
        let mut again = d.payload.clone();
        assert!(matches!(
            opener.open_datagram(&mut again),
            Err(OpenError::Replay { .. })
        ));
    }
    let uid = 0xedda_edc0_07e5_09bc;
    assert!(
        t_h1.heartbeats
            .iter()
            .chain(&t_peer.heartbeats)
            .all(|h| h.1 == uid)
    );
    assert_eq!(t_h1.heartbeats.len(), 3);
    assert!(t_peer.heartbeats.len() >= 2);
    assert_eq!(t_h1.frag_tests, 1);
    assert_eq!(t_h1.mtu_probes, vec![1414; 4]);
    assert_eq!((t_h1.echo_requests, t_peer.echo_replies), (3, 3));
    // DF stream: 0 (heartbeat), 1 never left the host (the EMSGSIZE probe), 2..5 probes,
    // then pings and heartbeats. Non-DF stream: 0 (frag test), 1, 2, 3.
    assert_eq!(h1_seqs.1, vec![0, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert_eq!(h1_seqs.0, vec![0, 1, 2, 3]);
}

/// weft's sealer reproduces the captured bytes of the first heartbeat of each side.
#[test]
fn live_enc_first_heartbeats_reseal_byte_for_byte() {
    let key = live_enc_key();
    let dgrams = capture("live-enc.pcap");
    for (ip, sender, receiver, outbound) in [
        ([192, 168, 77, 1], H1, FOREIGN, false),
        ([192, 168, 77, 2], FOREIGN, H1, true),
    ] {
        let first = dgrams
            .iter()
            .find(|d| d.src.ip().octets() == ip)
            .expect("a datagram");
        let sealer = SleeveSealer::new(&key, outbound);
        let mut b = DatagramBuilder::new(sender, true);
        b.try_push(
            sender,
            receiver,
            &weft::sleeve::frame::heartbeat(0xedda_edc0_07e5_09bc),
        )
        .unwrap();
        sealer.seal_datagram(b.datagram_mut(), true).unwrap();
        assert_eq!(b.datagram_mut(), &first.payload[..]);
    }
}

/// sleeve-encrypted (password `secret`, keys not known): lengths and sequence numbers.
#[test]
fn sleeve_encrypted_capture_lengths() {
    let dgrams = capture("sleeve-encrypted.pcap");
    let mut seen = std::collections::HashMap::<(PeerName, bool), Vec<u64>>::new();
    for d in &dgrams {
        let (sender, seq_and_df, boxed) = parse_sealed_header(&d.payload).unwrap();
        let expect = if d.src.ip().octets() == [192, 168, 77, 1] {
            H1
        } else {
            H2
        };
        if !d.complete {
            check_partial_frag_test(d, expect, true);
        }
        assert_eq!(sender, expect);
        let df = seq_and_df & DF_FLAG != 0;
        assert_eq!(df, d.df, "DF stream goes DF on the wire between weavers");
        // Plaintext = one or more entries of 14 + frame bytes.
        assert!(boxed.len() >= 16 + 14);
        seen.entry((sender, df))
            .or_default()
            .push(seq_and_df & !DF_FLAG);
    }
    let lens: Vec<usize> = dgrams.iter().map(|d| d.claimed_len).collect();
    assert_eq!(&lens[..2], &[66, 66], "heartbeats: 6 + 8 + 16 + 14 + 22");
    assert_eq!(
        lens.iter().filter(|&&l| l == 60045).count(),
        2,
        "frag tests"
    );
    assert!(
        lens.iter().filter(|&&l| l == 1472).count() >= 2,
        "MTU probes of 1428"
    );
    for (k, seqs) in &seen {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{k:?} {seqs:?}");
        assert_eq!(seqs[0], 0, "{k:?}");
    }
    // A forwarder answering such a probe gives 1414.
    let now = Instant::now();
    let mut fwd = SleeveForwarder::new(H1, H2, 1, false, Some(&SessionKey([0; 32])), None, now);
    assert_eq!(
        fwd.on_special_frame(
            "192.168.77.2:6783".parse().unwrap(),
            &weft::sleeve::frame::mtu_probe(1414),
            now
        ),
        Ok(SpecialOutcome::MtuProbe(1414))
    );
}
