//! A small pcap reader for the tests: IPv4 TCP flows over Ethernet, reassembled per
//! direction from the SYN's sequence number (retransmissions and overlaps dropped).

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use pcap_file::pcap::PcapReader;

/// One direction of a TCP connection.
#[derive(Debug, Clone)]
pub struct TcpFlow {
    /// Sender.
    pub src: SocketAddrV4,
    /// Receiver.
    pub dst: SocketAddrV4,
    /// The payload of each segment, in stream order, without repeats.
    pub segments: Vec<Vec<u8>>,
    /// The reassembled byte stream.
    pub data: Vec<u8>,
}

/// One direction's ISN + 1 (from its SYN) and its payloads by sequence number.
type PartialFlow = (Option<u32>, BTreeMap<u32, Vec<u8>>);

/// The path of a capture in the agent's test data.
pub fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/weave")
        .join(name)
}

/// Every TCP flow (one per direction) to or from `port`, in order of first appearance.
pub fn tcp_flows(path: &Path, port: u16) -> Vec<TcpFlow> {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = PcapReader::new(file).expect("pcap header");
    let mut order = Vec::new();
    let mut flows: HashMap<(SocketAddrV4, SocketAddrV4), PartialFlow> = HashMap::new();
    while let Some(pkt) = reader.next_packet() {
        let pkt = pkt.expect("pcap packet");
        let f = &pkt.data[..];
        if f.len() < 14 + 20 || f[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &f[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
        if ip[9] != 6 || frag != 0 || total < ihl + 20 {
            continue;
        }
        let tcp = &ip[ihl..total];
        let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        if sport != port && dport != port {
            continue;
        }
        let src = SocketAddrV4::new(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), sport);
        let dst = SocketAddrV4::new(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]), dport);
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let hl = usize::from(tcp[12] >> 4) * 4;
        let syn = tcp[13] & 0x02 != 0;
        let entry = flows.entry((src, dst)).or_insert_with(|| {
            order.push((src, dst));
            (None, BTreeMap::new())
        });
        if syn {
            entry.0 = Some(seq.wrapping_add(1));
        } else if tcp.len() > hl {
            entry.1.entry(seq).or_insert_with(|| tcp[hl..].to_vec());
        }
    }
    let mut out = Vec::new();
    for key in order {
        let (Some(isn), segs) = flows.remove(&key).expect("flow") else {
            continue; // no SYN seen: not a whole stream
        };
        // Order by offset from the ISN (sequence numbers wrap).
        let mut by_offset: Vec<(u32, Vec<u8>)> = segs
            .into_iter()
            .map(|(seq, d)| (seq.wrapping_sub(isn), d))
            .collect();
        by_offset.sort_by_key(|(off, _)| *off);
        let mut data = Vec::new();
        let mut segments = Vec::new();
        for (off, d) in by_offset {
            let off = off as usize;
            assert!(off <= data.len(), "gap in {key:?} at {off}");
            let fresh = &d[(data.len() - off).min(d.len())..];
            if !fresh.is_empty() {
                data.extend_from_slice(fresh);
                segments.push(fresh.to_vec());
            }
        }
        out.push(TcpFlow {
            src: key.0,
            dst: key.1,
            segments,
            data,
        });
    }
    out
}

/// The two directions of the (only) connection to `port`: (client -> server, server ->
/// client).
pub fn connection(path: &Path, port: u16) -> (TcpFlow, TcpFlow) {
    let flows: Vec<TcpFlow> = tcp_flows(path, port)
        .into_iter()
        .filter(|f| !f.data.is_empty())
        .collect();
    assert_eq!(
        flows.len(),
        2,
        "{}: expected one connection",
        path.display()
    );
    let (a, b) = (flows[0].clone(), flows[1].clone());
    if a.dst.port() == port { (a, b) } else { (b, a) }
}

/// Splits `[u32 BE len][body]` frames; panics on a partial frame at the end.
pub fn frames(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !data.is_empty() {
        assert!(data.len() >= 4, "partial length prefix");
        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        assert!(data.len() >= 4 + len, "partial frame");
        out.push(&data[4..4 + len]);
        data = &data[4 + len..];
    }
    out
}
