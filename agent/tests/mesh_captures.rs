//! The mesh codecs and the connection state machine against captures of real Weave
//! Net 2.8.1 routers (`testdata/weave/`).

mod common;

use std::time::Instant;

use common::tcp_capture::{TcpFlow, frames, tcp_flows, testdata};
use weft::mesh::{
    ConnectionSummary, PeerName, PeerSummary, PeerUpdate, SessionKey,
    connection::{Connection, ConnectionConfig, ConnectionError, Event, LocalIdentity},
    crypto::{Password, TAG_LEN, TcpOpener, TcpSealer},
    gossip::{decode_topology, encode_topology},
    wire::{Features, Message},
};

const PORT: u16 = 6783;
const H1: PeerName = PeerName([0xaa, 0, 0, 0, 0, 1]);
const H2: PeerName = PeerName([0xaa, 0, 0, 0, 0, 2]);
const FOREIGN: PeerName = PeerName([0xaa, 0, 0, 0, 0, 0xf2]);

/// Each connection to port 6783 in the capture: (client -> server, server -> client).
fn connections(file: &str) -> Vec<(TcpFlow, TcpFlow)> {
    let flows = tcp_flows(&testdata(file), PORT);
    let mut out = Vec::new();
    // Connections that carried no data (refused before the listener was up) are left
    // out.
    for c2s in flows
        .iter()
        .filter(|f| f.dst.port() == PORT && !f.data.is_empty())
    {
        let s2c = flows
            .iter()
            .find(|f| f.src == c2s.dst && f.dst == c2s.src)
            .expect("both directions");
        out.push((c2s.clone(), s2c.clone()));
    }
    out
}

fn only_connection(file: &str) -> (TcpFlow, TcpFlow) {
    let mut c = connections(file);
    assert_eq!(c.len(), 1, "{file}");
    c.remove(0)
}

fn local(features: &Features, outbound: bool, password: Option<&str>) -> ConnectionConfig {
    ConnectionConfig {
        identity: LocalIdentity {
            name: features.name,
            nickname: features.nickname.clone(),
            uid: features.uid,
            short_id: features.short_id,
        },
        password: password.map(Password::new),
        overlays: features.overlays.as_ref().map(|o| o.join(" ")),
        trusted: features.trusted,
        fast_heartbeat: false,
        outbound,
        conn_id: features.conn_id,
        key_random: [7; 32],
    }
}

/// Feeds `flow` segment by segment to a connection playing the other side, and returns
/// the remote's intro and the messages.
fn replay(
    config: ConnectionConfig,
    flow: &TcpFlow,
) -> (
    Connection,
    weft::mesh::connection::RemoteIntro,
    Vec<Message>,
) {
    let now = Instant::now();
    let mut c = Connection::new(config, now);
    for seg in &flow.segments {
        c.receive(seg, now).expect("capture decodes");
    }
    let Some(Event::Ready(intro)) = c.poll_event() else {
        panic!("no Ready event")
    };
    let mut msgs = Vec::new();
    while let Some(e) = c.poll_event() {
        match e {
            Event::Message(m) => msgs.push(m),
            Event::Ready(_) => panic!("second Ready"),
        }
    }
    (c, intro, msgs)
}

fn topology(m: &Message, from: PeerName) -> Vec<PeerUpdate> {
    let Message::Gossip {
        channel,
        source,
        payload,
    } = m
    else {
        panic!("not gossip: {m:?}")
    };
    assert_eq!(channel, "topology");
    assert_eq!(*source, from);
    decode_topology(payload).expect("topology decodes")
}

fn ctl(index: u8, subtag: u8, body: &[u8]) -> Message {
    Message::OverlayControl {
        index,
        subtag,
        body: body.to_vec(),
    }
}

fn summary(name: PeerName, nick: &str, uid: u64, version: u64, short: u16) -> PeerSummary {
    PeerSummary {
        name,
        nickname: nick.into(),
        uid,
        version,
        short_id: Some(short),
    }
}

fn conn(name: PeerName, addr: &str, outbound: bool, established: bool) -> ConnectionSummary {
    ConnectionSummary {
        name,
        remote_tcp_addr: addr.into(),
        outbound,
        established,
    }
}

const H1_UID: u64 = 16197672966706867023;
const H2_UID: u64 = 10387789380157814811;

fn h1_features() -> Features {
    Features {
        name: H1,
        nickname: "h1".into(),
        uid: H1_UID,
        conn_id: 13784400271047743565,
        short_id: Some(3170),
        trusted: false,
        overlays: Some(vec!["sleeve".into()]),
        fast_heartbeat: false,
    }
}

fn h2_features() -> Features {
    Features {
        name: H2,
        nickname: "h2".into(),
        uid: H2_UID,
        conn_id: 8943250375923122523,
        short_id: Some(2157),
        trusted: false,
        overlays: Some(vec!["sleeve".into()]),
        fast_heartbeat: false,
    }
}

#[test]
fn sleeve_plain_from_the_dialling_side() {
    let (c2s, s2c) = only_connection("sleeve-plain.pcap");
    assert_eq!(c2s.dst.to_string(), "192.168.77.1:6783");
    // We play h2 (the dialler) and are fed h1's bytes.
    let (mut c, intro, msgs) = replay(local(&h2_features(), true, None), &s2c);
    assert_eq!(intro.features, h1_features());
    assert_eq!(intro.conn_uid, 0xc350_c9d6_1fdf_9916);
    assert_eq!(intro.session_key, None);
    assert_eq!(intro.protocol_version, 2);

    assert_eq!(msgs.len(), 5, "{msgs:?}");
    let h2_addr = c2s.src.to_string();
    assert_eq!(
        topology(&msgs[0], H1),
        vec![
            PeerUpdate {
                summary: summary(H2, "h2", H2_UID, 0, 2157),
                connections: vec![],
            },
            PeerUpdate {
                summary: summary(H1, "h1", H1_UID, 1, 3170),
                connections: vec![conn(H2, &h2_addr, false, false)],
            },
        ]
    );
    assert_eq!(
        msgs[1..4],
        [ctl(0, 1, &[]), ctl(0, 2, &[]), ctl(0, 3, &[0x05, 0x9e])]
    );
    assert_eq!(
        topology(&msgs[4], H1),
        vec![
            PeerUpdate {
                summary: summary(H2, "h2", H2_UID, 1, 2157),
                connections: vec![conn(H1, "192.168.77.1:6783", true, false)],
            },
            PeerUpdate {
                summary: summary(H1, "h1", H1_UID, 2, 3170),
                connections: vec![conn(H2, &h2_addr, false, true)],
            },
        ]
    );

    // What we sent as h2: the same header, encryption byte and features h2 sent.
    let out = c.take_output();
    assert_eq!(out[..8], c2s.data[..8]);
    let ours = frames(&out[8..]);
    let theirs = frames(&c2s.data[8..]);
    assert_eq!(ours.len(), 1);
    assert_eq!(Features::decode(ours[0]).unwrap(), h2_features());
    assert_eq!(Features::decode(theirs[0]).unwrap(), h2_features());
}

#[test]
fn sleeve_plain_from_the_accepting_side_byte_exact() {
    let (c2s, s2c) = only_connection("sleeve-plain.pcap");
    // We play h1 (the acceptor) and are fed h2's bytes.
    let (mut c, intro, msgs) = replay(local(&h1_features(), false, None), &c2s);
    assert_eq!(intro.features, h2_features());
    assert_eq!(intro.conn_uid, 0xc350_c9d6_1fdf_9916);

    // Our header, encryption byte and features are h1's, byte for byte (the features
    // encoder writes the keys in the order h1's map happened to have).
    let out = c.take_output();
    let h1_features_len = 8 + 4 + 172;
    assert_eq!(out, s2c.data[..h1_features_len]);

    // Every message h2 sent re-encodes to the captured bytes, the topology payload
    // included.
    let captured = frames(&c2s.data[8..]);
    assert_eq!(captured.len(), 1 + msgs.len());
    for (m, raw) in msgs.iter().zip(&captured[1..]) {
        let re = match m {
            Message::Gossip {
                channel,
                source,
                payload,
            } => Message::Gossip {
                channel: channel.clone(),
                source: *source,
                payload: encode_topology(&decode_topology(payload).unwrap()),
            },
            other => other.clone(),
        };
        assert_eq!(re.encode(), *raw, "{m:?}");
    }
    // h2's first topology message is the one the protocol notes give in full (342 bytes).
    assert_eq!(captured[1].len(), 342);
    let first = topology(&msgs[0], H2);
    assert_eq!(
        first[0].summary,
        summary(H2, "h2", 0x9028_d767_85e1_b81b, 1, 2157)
    );
    assert_eq!(
        first[1].summary,
        summary(H1, "h1", 0xe0c9_b1be_8882_ab4f, 0, 3170)
    );
    assert_eq!(
        msgs[1..4],
        [ctl(0, 1, &[]), ctl(0, 2, &[]), ctl(0, 3, &[0x05, 0x9e])]
    );
}

#[test]
fn live_plain_compat_mode() {
    let (c2s, s2c) = only_connection("live-plain-compat.pcap");
    let weaver = Features {
        name: H1,
        nickname: "h1".into(),
        uid: 10560846122287656136,
        conn_id: 1058885754041773730,
        short_id: Some(2881),
        trusted: false,
        overlays: Some(vec!["sleeve".into()]),
        fast_heartbeat: false,
    };
    let foreign = Features {
        name: FOREIGN,
        nickname: "foreign".into(),
        uid: 1234605616436508552,
        conn_id: 12797867924301318414,
        short_id: Some(291),
        trusted: false,
        overlays: None,
        fast_heartbeat: false,
    };
    // The foreign peer's side: weaver's bytes.
    let (_, intro, msgs) = replay(local(&foreign, true, None), &s2c);
    assert_eq!(intro.features, weaver);
    assert_eq!(intro.conn_uid, 0xbf2a_c3e9_9d39_27ac);
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    let t = topology(&msgs[0], H1);
    assert_eq!(t[1].summary, summary(H1, "h1", weaver.uid, 1, 2881));
    assert_eq!(
        t[1].connections,
        [conn(FOREIGN, &c2s.src.to_string(), false, false)]
    );
    // Compat mode: weaver's own ack is the bare tag 1.
    assert_eq!(
        msgs[1],
        Message::CompatSleeve {
            tag: 1,
            body: vec![]
        }
    );
    let t = topology(&msgs[2], H1);
    assert_eq!(t[1].summary.version, 2);
    assert!(t[1].connections[0].established);

    // Weaver's side: the foreign peer's bytes (no Overlays feature).
    let (_, intro, msgs) = replay(local(&weaver, false, None), &c2s);
    assert_eq!(intro.features, foreign);
    assert_eq!(intro.conn_uid, 0xbf2a_c3e9_9d39_27ac);
    let pmtu = Message::CompatSleeve {
        tag: 3,
        body: vec![0x05, 0x9e],
    };
    assert_eq!(msgs.len(), 8, "{msgs:?}");
    assert_eq!(
        msgs[1],
        Message::CompatSleeve {
            tag: 1,
            body: vec![]
        }
    );
    assert_eq!(
        msgs[3],
        Message::CompatSleeve {
            tag: 2,
            body: vec![]
        }
    );
    assert_eq!(msgs[4..], [pmtu.clone(), pmtu.clone(), pmtu.clone(), pmtu]);
    let t = topology(&msgs[0], FOREIGN);
    assert_eq!(
        t[0].summary,
        summary(FOREIGN, "foreign", foreign.uid, 1, 291)
    );
    assert_eq!(
        t[0].connections,
        [conn(H1, "192.168.77.1:6783", true, false)]
    );
    let t = topology(&msgs[2], FOREIGN);
    assert_eq!(t[0].summary.version, 2);
    assert_eq!(
        t[0].connections,
        [conn(H1, "192.168.77.1:6783", true, true)]
    );
}

/// The session key `peer-enc.log` recorded for the first connection of `live-enc.pcap`.
fn logged_session_key() -> SessionKey {
    let log = std::fs::read_to_string(testdata("peer-enc.log")).unwrap();
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

/// Opens every frame of one direction (after header, flag and key) with Weave's nonces.
fn open_all(flow: &TcpFlow, key: &SessionKey, sender_outbound: bool) -> Vec<Vec<u8>> {
    assert_eq!(flow.data[..8], *b"weave\x01\x02\x01");
    let mut opener = TcpOpener::new(key, sender_outbound);
    frames(&flow.data[40..])
        .into_iter()
        .map(|f| {
            let plain = opener.open(f).expect("opens with the logged key");
            assert_eq!(plain.len() + TAG_LEN, f.len());
            plain
        })
        .collect()
}

#[test]
fn live_enc_decrypts_with_the_logged_session_key() {
    let conns = connections("live-enc.pcap");
    assert_eq!(conns.len(), 3);
    let (c2s, s2c) = &conns[0];
    let key = logged_session_key();

    // Weaver accepted: its nonces are 0x40..., the dialler's 0xc0...
    let from_weaver = open_all(s2c, &key, false);
    let from_peer = open_all(c2s, &key, true);
    // Sealing the plaintexts again with Weave's nonces gives the captured bytes.
    for (flow, plains, outbound) in [(s2c, &from_weaver, false), (c2s, &from_peer, true)] {
        let mut sealer = TcpSealer::new(&key, outbound);
        for (plain, captured) in plains.iter().zip(frames(&flow.data[40..])) {
            assert_eq!(sealer.seal(plain), captured);
        }
    }
    // The opposite polarity does not open.
    assert!(
        TcpOpener::new(&key, true)
            .open(frames(&s2c.data[40..])[0])
            .is_err()
    );

    let weaver = Features::decode(&from_weaver[0]).unwrap();
    assert_eq!(
        weaver,
        Features {
            name: H1,
            nickname: "h1".into(),
            uid: 17953250041178404114,
            conn_id: 7620931978950180073,
            short_id: Some(1453),
            trusted: false,
            overlays: Some(vec!["sleeve".into()]),
            fast_heartbeat: false,
        }
    );
    let peer = Features::decode(&from_peer[0]).unwrap();
    assert_eq!(peer.name, FOREIGN);
    assert_eq!(peer.overlays, Some(vec!["sleeve".into()]));
    assert_eq!(weaver.conn_id ^ peer.conn_id, 0xedda_edc0_07e5_09bc);

    let w: Vec<Message> = from_weaver[1..]
        .iter()
        .map(|p| Message::decode(p).unwrap().unwrap())
        .collect();
    let p: Vec<Message> = from_peer[1..]
        .iter()
        .map(|p| Message::decode(p).unwrap().unwrap())
        .collect();
    // Weaver: topology, its ack, topology again.
    assert_eq!(w.len(), 3, "{w:?}");
    let t = topology(&w[0], H1);
    assert_eq!(
        t[0].summary,
        summary(FOREIGN, "foreign", 1234605616436508552, 0, 291)
    );
    assert_eq!(t[1].summary, summary(H1, "h1", weaver.uid, 1, 1453));
    assert_eq!(
        t[1].connections,
        [conn(FOREIGN, "192.168.77.2:42439", false, false)]
    );
    assert_eq!(w[1], ctl(0, 1, &[]));
    let t = topology(&w[2], H1);
    assert_eq!(t[0].summary.version, 2);
    assert_eq!(
        t[0].connections,
        [conn(H1, "192.168.77.1:6783", true, true)]
    );
    assert_eq!(
        t[1].connections,
        [conn(FOREIGN, "192.168.77.2:42439", false, true)]
    );
    // The peer: topology, ack, topology, frag-test reply, four PMTU replies (1414).
    assert_eq!(p.len(), 8, "{p:?}");
    assert_eq!(topology(&p[0], FOREIGN)[0].summary.version, 1);
    assert_eq!(p[1], ctl(0, 1, &[]));
    assert_eq!(topology(&p[2], FOREIGN)[0].summary.version, 2);
    assert_eq!(p[3], ctl(0, 2, &[]));
    for m in &p[4..] {
        assert_eq!(*m, ctl(0, 3, &1414u16.to_be_bytes()));
    }

    // The other connections of the run do not open with this key (fresh key pairs).
    let (c2s, s2c) = &conns[1];
    let k = SessionKey(key.0);
    assert!(
        TcpOpener::new(&k, true)
            .open(frames(&c2s.data[40..])[0])
            .is_err()
    );
    assert!(
        TcpOpener::new(&k, false)
            .open(frames(&s2c.data[40..])[0])
            .is_err()
    );
    // The last one: a client without a password against weaver with one; a
    // password-mode connection fed the client's bytes refuses as weaver did.
    let (c2s, s2c) = &conns[2];
    assert_eq!(c2s.data, b"weave\x01\x02\x00");
    assert_eq!(s2c.data.len(), 40);
    assert_eq!(s2c.data[7], 1);
    let mut cfg = local(&weaver, false, Some("secret"));
    cfg.key_random = [1; 32];
    let mut c = Connection::new(cfg, Instant::now());
    let e = c.receive(&c2s.data, Instant::now()).unwrap_err();
    assert_eq!(e, ConnectionError::PeerUnencrypted);
    assert_eq!(
        e.to_string(),
        "password specified, but peer requested an unencrypted connection"
    );
}

#[test]
fn sleeve_encrypted_framing() {
    let (c2s, s2c) = only_connection("sleeve-encrypted.pcap");
    for flow in [&c2s, &s2c] {
        assert_eq!(flow.data[..8], *b"weave\x01\x02\x01");
        // The header and the flag + public key went in segments of their own.
        assert_eq!(flow.segments[0].len(), 7);
        assert_eq!(flow.segments[1].len(), 33);
        assert_eq!(flow.segments[1][0], 1);
        let lens: Vec<usize> = frames(&flow.data[40..]).iter().map(|f| f.len()).collect();
        assert_eq!(lens.len(), 6, "{lens:?}");
        // Features (170 + 16), topology, then ack, frag-test reply (3 + 16) and PMTU
        // reply (5 + 16), then topology again: the plain run's plaintexts + 16.
        assert_eq!(lens[0], 170 + TAG_LEN);
        assert_eq!(lens[2..5], [3 + TAG_LEN, 3 + TAG_LEN, 5 + TAG_LEN]);
        assert!(lens[1] > 300 && lens[5] > 300);
    }
    // Without the private keys nothing opens; a wrong key fails cleanly.
    let f = frames(&c2s.data[40..])[0];
    assert!(TcpOpener::new(&SessionKey([0; 32]), true).open(f).is_err());
}
