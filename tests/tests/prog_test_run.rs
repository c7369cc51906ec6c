//! The eBPF programs run on synthetic packets through `BPF_PROG_TEST_RUN`: exact
//! output bytes of encapsulation, decapsulation of valid frames, and the counted
//! rejection of everything else.
//!
//! Needs root (loading programs) and the eBPF object in `WEFT_EBPF_OBJECT`
//! (`cargo xtask test` sets it). Each test runs in a fresh network namespace
//! (unshared by its own thread) holding an underlay veth `ul0`, so flood copies
//! have a real device to go to.

use std::process::Command;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use weft_common::{
    maps::{
        CONFIG_MAP, COUNTERS_MAP, Counter, DatapathConfig, FLOOD_MAP, MACS_MAP, MacEntry, MacKey,
        PEER_STATS_MAP, PEERS_MAP, PeerEntry, PeerStats, programs,
    },
    wire::{SRC_PORT_MAX, SRC_PORT_MIN, ipv4_checksum, vni},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_STOLEN: u32 = 4;
const TC_ACT_REDIRECT: u32 = 7;

const LOCAL: [u8; 4] = [192, 168, 48, 11];
const PEER2: [u8; 4] = [192, 168, 48, 12];
const PEER3: [u8; 4] = [192, 168, 48, 13];
const PEER2_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x12];
const PEER3_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x13];
const UL0_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x11];
const POD_LOCAL: [u8; 6] = [0x02, 0x11, 0, 0, 0, 1];
const POD_REMOTE: [u8; 6] = [0x02, 0x22, 0, 0, 0, 1];
const DATAPATH_IFINDEX: u32 = 77;

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loaded (not attached) datapath in a private network namespace.
struct Fixture {
    ebpf: Ebpf,
    underlay: u32,
}

impl Fixture {
    fn new() -> Self {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "needs root to load eBPF programs and create namespaces (CI runs as root)"
        );
        let object = std::env::var("WEFT_EBPF_OBJECT")
            .expect("WEFT_EBPF_OBJECT not set: run through `cargo xtask test`");
        // SAFETY: only this test's thread moves to the new namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        sh(&["ip", "link", "set", "lo", "up"]);
        // This kernel has no dummy driver: a veth pair serves (copies sent to ul0
        // come out of ul0p, where nothing listens).
        sh(&[
            "ip",
            "link",
            "add",
            "ul0",
            "address",
            "02:aa:00:00:00:11",
            "type",
            "veth",
            "peer",
            "name",
            "ul0p",
        ]);
        sh(&["ip", "addr", "add", "192.168.48.11/24", "dev", "ul0"]);
        sh(&["ip", "link", "set", "ul0p", "up"]);
        sh(&["ip", "link", "set", "ul0", "up"]);
        // SAFETY: a valid NUL-terminated name; the lookup runs in this thread's netns.
        let underlay = unsafe { libc::if_nametoindex(c"ul0".as_ptr()) };
        assert_ne!(underlay, 0, "ul0 has no ifindex");

        let mut ebpf =
            Ebpf::load_file(&object).unwrap_or_else(|e| panic!("loading {object}: {e:#}"));
        for name in [programs::EGRESS, programs::INGRESS] {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            prog.load()
                .unwrap_or_else(|e| panic!("verifier rejected {name}: {e:#?}"));
        }
        let mut f = Self { ebpf, underlay };
        f.configure(2);
        f.set_peer(2, PEER2, PEER2_MAC);
        f.set_peer(3, PEER3, PEER3_MAC);
        let mut flood: Array<&mut MapData, u32> =
            Array::try_from(f.ebpf.map_mut(FLOOD_MAP).unwrap()).unwrap();
        flood.set(0, &2, 0).unwrap();
        flood.set(1, &3, 0).unwrap();
        f
    }

    fn configure(&mut self, flood_count: u16) {
        let mut config: Array<&mut MapData, DatapathConfig> =
            Array::try_from(self.ebpf.map_mut(CONFIG_MAP).unwrap()).unwrap();
        let cfg = DatapathConfig {
            enabled: 1,
            underlay_ifindex: self.underlay,
            datapath_ifindex: DATAPATH_IFINDEX,
            local_addr: LOCAL,
            local_short_id: 1,
            vxlan_port: 6784,
            mtu: 1376,
            flood_count,
            mac_age_secs: 300,
            underlay_mac: UL0_MAC,
            pad: [0; 2],
        };
        config.set(0, &cfg, 0).unwrap();
    }

    fn set_peer(&mut self, id: u32, addr: [u8; 4], next_hop_mac: [u8; 6]) {
        let mut peers: Array<&mut MapData, PeerEntry> =
            Array::try_from(self.ebpf.map_mut(PEERS_MAP).unwrap()).unwrap();
        let entry = PeerEntry {
            addr,
            flags: 0,
            next_hop_mac,
            pad: [0; 2],
        };
        peers.set(id, &entry, 0).unwrap();
    }

    fn learn(&mut self, mac: [u8; 6], id: u32) {
        let mut macs: HashMap<&mut MapData, MacKey, MacEntry> =
            HashMap::try_from(self.ebpf.map_mut(MACS_MAP).unwrap()).unwrap();
        let entry = MacEntry {
            short_id: id,
            pad: 0,
            seen_ns: now_ns(),
        };
        macs.insert(&MacKey::new(mac), &entry, 0).unwrap();
    }

    fn learned(&mut self, mac: [u8; 6]) -> Option<MacEntry> {
        let macs: HashMap<&mut MapData, MacKey, MacEntry> =
            HashMap::try_from(self.ebpf.map_mut(MACS_MAP).unwrap()).unwrap();
        macs.get(&MacKey::new(mac), 0).ok()
    }

    fn counter(&mut self, c: Counter) -> u64 {
        let counters: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map_mut(COUNTERS_MAP).unwrap()).unwrap();
        counters.get(&(c as u32), 0).unwrap().iter().sum()
    }

    fn peer_stats(&mut self, id: u32) -> PeerStats {
        let stats: PerCpuArray<&mut MapData, PeerStats> =
            PerCpuArray::try_from(self.ebpf.map_mut(PEER_STATS_MAP).unwrap()).unwrap();
        let mut total = PeerStats::default();
        for s in stats.get(&id, 0).unwrap().iter() {
            total.add(s);
        }
        total
    }

    /// Runs program `name` on `packet`; returns (action, output bytes).
    fn run(&mut self, name: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let prog: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        let res = prog
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name}: {e:#}"));
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An Ethernet/IPv4/UDP frame from `src` to `dst` with `payload_len` bytes of payload.
fn inner_frame(dst: [u8; 6], src: [u8; 6], payload_len: usize) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload_len) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 32, 1, 1]);
    ip[16..20].copy_from_slice(&[10, 32, 2, 1]);
    let c = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&5000u16.to_be_bytes());
    f.extend_from_slice(&6000u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..payload_len).map(|i| i as u8));
    f
}

/// A broadcast ARP request frame.
fn arp_request(src: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[10, 32, 1, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 32, 2, 1]);
    f.resize(60, 0);
    f
}

/// Writes the expected outer headers for `inner` by hand (independently of
/// `weft_common::wire::EncapHeaders`), with the given outer MACs and source port.
fn expected_encap(
    inner: &[u8],
    dst_ip: [u8; 4],
    vni_value: u32,
    macs: ([u8; 6], [u8; 6]),
    src_port: u16,
) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&macs.1); // destination
    p.extend_from_slice(&macs.0); // source
    p.extend_from_slice(&[0x08, 0x00]);
    let ip_len = (20 + 8 + 8 + inner.len()) as u16;
    let mut ip = vec![0x45, 0x00];
    ip.extend_from_slice(&ip_len.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0x00, 64, 17, 0, 0]);
    ip.extend_from_slice(&LOCAL);
    ip.extend_from_slice(&dst_ip);
    let mut hdr = [0u8; 20];
    hdr.copy_from_slice(&ip);
    let csum = ipv4_checksum(&hdr);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&6784u16.to_be_bytes());
    p.extend_from_slice(&(ip_len - 20).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&[0x08, 0, 0, 0]);
    p.extend_from_slice(&[
        (vni_value >> 16) as u8,
        (vni_value >> 8) as u8,
        vni_value as u8,
        0,
    ]);
    p.extend_from_slice(inner);
    p
}

fn src_port_of(packet: &[u8]) -> u16 {
    u16::from_be_bytes([packet[34], packet[35]])
}

#[test]
fn encap_unicast_to_a_learned_mac_writes_weave_vxlan() {
    let mut f = Fixture::new();
    f.learn(POD_REMOTE, 2);
    let inner = inner_frame(POD_REMOTE, POD_LOCAL, 100);
    let (action, out) = f.run(programs::EGRESS, &inner);
    assert_eq!(
        action, TC_ACT_REDIRECT,
        "unicast IP goes out via redirect_neigh"
    );
    let sport = src_port_of(&out);
    assert!(
        (SRC_PORT_MIN..=SRC_PORT_MAX).contains(&sport),
        "source port {sport} outside the ephemeral range"
    );
    // IP frames leave through bpf_redirect_neigh, which fills the outer MACs itself.
    let expected = expected_encap(&inner, PEER2, 0x002001, ([0; 6], [0; 6]), sport);
    assert_eq!(out, expected, "encapsulated bytes differ");
    assert_eq!(f.counter(Counter::TxUnicast), 1);
    let s = f.peer_stats(2);
    assert_eq!((s.tx_packets, s.tx_bytes), (1, inner.len() as u64));

    // The same flow keeps its source port; another flow may get another.
    let (_, again) = f.run(programs::EGRESS, &inner);
    assert_eq!(src_port_of(&again), sport, "same flow, same source port");
}

#[test]
fn encap_broadcast_floods_every_peer_with_resolved_macs() {
    let mut f = Fixture::new();
    let arp = arp_request(POD_LOCAL);
    let (action, out) = f.run(programs::EGRESS, &arp);
    assert_eq!(action, TC_ACT_STOLEN, "a flood consumes the original");
    // The packet left in the buffer is the copy for the last peer (ShortID 3).
    let sport = src_port_of(&out);
    let expected = expected_encap(&arp, PEER3, vni(3, 1), (UL0_MAC, PEER3_MAC), sport);
    assert_eq!(out, expected, "flood copy for peer 3 differs");
    assert_eq!(f.peer_stats(2).tx_packets, 1, "peer 2 got a copy");
    assert_eq!(f.peer_stats(3).tx_packets, 1, "peer 3 got a copy");
    assert_eq!(f.counter(Counter::TxFlood), 1);
    assert_eq!(f.counter(Counter::FloodNoNeighbour), 0);
}

#[test]
fn encap_unknown_unicast_floods_and_unresolved_peers_are_counted() {
    let mut f = Fixture::new();
    f.set_peer(3, PEER3, [0; 6]);
    let inner = inner_frame(POD_REMOTE, POD_LOCAL, 64);
    let (action, out) = f.run(programs::EGRESS, &inner);
    assert_eq!(action, TC_ACT_STOLEN);
    let sport = src_port_of(&out);
    let expected = expected_encap(&inner, PEER2, vni(2, 1), (UL0_MAC, PEER2_MAC), sport);
    assert_eq!(out, expected, "only peer 2 was resolvable");
    assert_eq!(f.counter(Counter::FloodNoNeighbour), 1);
    assert_eq!(f.peer_stats(2).tx_packets, 1);
    assert_eq!(f.peer_stats(3).tx_packets, 0);
}

#[test]
fn encap_unicast_arp_reply_goes_to_the_next_hop_mac() {
    let mut f = Fixture::new();
    f.learn(POD_REMOTE, 3);
    let mut reply = arp_request(POD_LOCAL);
    reply[..6].copy_from_slice(&POD_REMOTE);
    let (action, out) = f.run(programs::EGRESS, &reply);
    assert_eq!(action, TC_ACT_REDIRECT);
    let sport = src_port_of(&out);
    let expected = expected_encap(&reply, PEER3, vni(3, 1), (UL0_MAC, PEER3_MAC), sport);
    assert_eq!(out, expected);
}

#[test]
fn encap_drops_oversized_and_unconfigured() {
    let mut f = Fixture::new();
    let big = inner_frame(POD_REMOTE, POD_LOCAL, 1376 - 28 + 1);
    let (action, _) = f.run(programs::EGRESS, &big);
    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(f.counter(Counter::DropTooBig), 1);
    let fits = inner_frame(POD_REMOTE, POD_LOCAL, 1376 - 28);
    f.learn(POD_REMOTE, 2);
    assert_eq!(
        f.run(programs::EGRESS, &fits).0,
        TC_ACT_REDIRECT,
        "MTU-sized frame passes"
    );

    let mut config: Array<&mut MapData, DatapathConfig> =
        Array::try_from(f.ebpf.map_mut(CONFIG_MAP).unwrap()).unwrap();
    config.set(0, &DatapathConfig::default(), 0).unwrap();
    assert_eq!(f.run(programs::EGRESS, &fits).0, TC_ACT_SHOT);
    assert_eq!(f.counter(Counter::DropNotConfigured), 1);
    // Unconfigured decap passes everything: the host keeps its network.
    let (action, _) = f.run(programs::INGRESS, &fits);
    assert_eq!(action, TC_ACT_OK);
}

/// A VXLAN frame as peer `src_id` at `src_ip` would send it to this host.
fn vxlan_from(src_ip: [u8; 4], vni_value: u32, inner: &[u8]) -> Vec<u8> {
    let mut p = expected_encap(inner, LOCAL, vni_value, (PEER2_MAC, UL0_MAC), 40000);
    // expected_encap writes LOCAL as the source: swap the addresses.
    p[26..30].copy_from_slice(&src_ip);
    p[30..34].copy_from_slice(&LOCAL);
    fix_ip_checksum(&mut p);
    p
}

/// Recomputes the outer IPv4 header checksum (20-byte header at offset 14).
fn fix_ip_checksum(p: &mut [u8]) {
    p[24] = 0;
    p[25] = 0;
    let mut hdr = [0u8; 20];
    hdr.copy_from_slice(&p[14..34]);
    let csum = ipv4_checksum(&hdr);
    p[24..26].copy_from_slice(&csum.to_be_bytes());
}

#[test]
fn decap_delivers_valid_frames_and_learns_the_source_mac() {
    let mut f = Fixture::new();
    let inner = inner_frame(POD_LOCAL, POD_REMOTE, 200);
    let packet = vxlan_from(PEER2, vni(1, 2), &inner);
    let (action, out) = f.run(programs::INGRESS, &packet);
    assert_eq!(action, TC_ACT_REDIRECT, "delivered into the bridge");
    assert_eq!(
        out, inner,
        "decapsulated frame differs from the inner frame"
    );
    assert_eq!(f.counter(Counter::RxDelivered), 1);
    let s = f.peer_stats(2);
    assert_eq!((s.rx_packets, s.rx_bytes), (1, inner.len() as u64));
    let learned = f.learned(POD_REMOTE).expect("inner source MAC learned");
    assert_eq!(learned.short_id, 2);

    // A frame from the Linux kernel's VXLAN device (UDP checksum set) is accepted too.
    let mut with_csum = packet.clone();
    with_csum[40] = 0x12;
    with_csum[41] = 0x34;
    assert_eq!(f.run(programs::INGRESS, &with_csum).0, TC_ACT_REDIRECT);
}

#[test]
fn decap_passes_traffic_that_is_not_weft() {
    let mut f = Fixture::new();
    // UDP to another port.
    let mut other = vxlan_from(PEER2, vni(1, 2), &inner_frame(POD_LOCAL, POD_REMOTE, 20));
    other[36..38].copy_from_slice(&53u16.to_be_bytes());
    assert_eq!(f.run(programs::INGRESS, &other).0, TC_ACT_OK);
    // ARP on the underlay.
    assert_eq!(
        f.run(programs::INGRESS, &arp_request(PEER2_MAC)).0,
        TC_ACT_OK
    );
    // A short non-IP frame.
    let mut tiny = vec![0u8; 14];
    tiny[12] = 0x88;
    tiny[13] = 0xcc;
    assert_eq!(f.run(programs::INGRESS, &tiny).0, TC_ACT_OK);
    assert_eq!(f.counter(Counter::PassNotOverlay), 3);
    assert_eq!(f.counter(Counter::RxDelivered), 0);
}

#[test]
fn decap_rejects_bad_vxlan_and_counts_each_reason() {
    let mut f = Fixture::new();
    let inner = inner_frame(POD_LOCAL, POD_REMOTE, 40);
    let good = vxlan_from(PEER2, vni(1, 2), &inner);

    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        (
            "truncated inside the VXLAN header",
            good[..46].to_vec(),
            Counter::DropTruncated,
        ),
        (
            "VNI for another host",
            vxlan_from(PEER2, vni(9, 2), &inner),
            Counter::DropWrongDestination,
        ),
        (
            "unknown source ShortID",
            vxlan_from(PEER2, vni(1, 7), &inner),
            Counter::DropUnknownSource,
        ),
        (
            "source address of another peer",
            vxlan_from(PEER3, vni(1, 2), &inner),
            Counter::DropSourceMismatch,
        ),
        (
            "VXLAN I flag missing",
            {
                let mut p = good.clone();
                p[42] = 0;
                p
            },
            Counter::DropBadVxlan,
        ),
        (
            "a fragment",
            {
                let mut p = good.clone();
                p[20] = 0x20; // MF
                fix_ip_checksum(&mut p);
                p
            },
            Counter::DropFragment,
        ),
        (
            "a bad outer IPv4 checksum",
            {
                let mut p = good.clone();
                p[25] ^= 0xff;
                p
            },
            Counter::DropBadChecksum,
        ),
        (
            "IPv4 options",
            {
                // Insert 4 bytes of options (NOPs) and fix IHL and lengths.
                let mut p = good[..34].to_vec();
                p.extend_from_slice(&[1, 1, 1, 1]);
                p.extend_from_slice(&good[34..]);
                p[14] = 0x46;
                let len = u16::from_be_bytes([p[16], p[17]]) + 4;
                p[16..18].copy_from_slice(&len.to_be_bytes());
                p
            },
            Counter::DropIpOptions,
        ),
    ];
    for (what, packet, counter) in cases {
        let before = f.counter(counter);
        let (action, _) = f.run(programs::INGRESS, &packet);
        assert_eq!(action, TC_ACT_SHOT, "{what}: expected a drop");
        assert_eq!(
            f.counter(counter),
            before + 1,
            "{what}: {counter:?} not counted"
        );
    }
    assert_eq!(
        f.counter(Counter::RxDelivered),
        0,
        "nothing bad was delivered"
    );
    assert!(
        f.learned(POD_REMOTE).is_none(),
        "no MAC learned from rejected frames"
    );
}
