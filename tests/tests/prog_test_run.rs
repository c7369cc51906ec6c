//! The eBPF programs run on synthetic packets through `BPF_PROG_TEST_RUN`: exact
//! output bytes of encapsulation, decapsulation of valid frames, and the counted
//! rejection of everything else.
//!
//! Needs root (loading programs) and the eBPF object in `WEFT_EBPF_OBJECT`
//! (`cargo xtask test` sets it). Each test runs in a fresh network namespace
//! (unshared by its own thread) holding an underlay veth `ul0`, so flood copies
//! have a real device to go to.

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use weft_common::{
    maps::{
        CONFIG_MAP, COUNTERS_MAP, Counter, DatapathConfig, FLOOD_MAP, FLOOD_PEERS_PER_RUN,
        MACS_MAP, MacEntry, MacKey, PEER_STATS_MAP, PeerStats, programs,
    },
    wire::{SRC_PORT_MAX, SRC_PORT_MIN, vni},
};
use weft_testbed::synthetic::{
    self, LOCAL, PEER2, PEER2_MAC, PEER3, PEER3_MAC, POD_LOCAL, POD_REMOTE, UL0_MAC, arp_request,
    encapsulated, fill_scene, fix_ip_checksum, inner_frame, learn, load_datapath, private_underlay,
    set_peer, src_port_of,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_STOLEN: u32 = 4;
const TC_ACT_REDIRECT: u32 = 7;

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
        let underlay = private_underlay().unwrap_or_else(|e| panic!("private netns: {e:#}"));
        let mut ebpf = load_datapath(object.as_ref()).unwrap_or_else(|e| panic!("{e:#}"));
        fill_scene(&mut ebpf, underlay).unwrap_or_else(|e| panic!("filling maps: {e:#}"));
        Self { ebpf, underlay }
    }

    fn set_peer(&mut self, id: u32, addr: [u8; 4], next_hop_mac: [u8; 6]) {
        set_peer(&mut self.ebpf, id, addr, next_hop_mac).unwrap();
    }

    fn learn(&mut self, mac: [u8; 6], id: u32) {
        learn(&mut self.ebpf, mac, id).unwrap();
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
        let res = prog.test_run(opts).unwrap_or_else(|e| {
            panic!(
                "BPF_PROG_TEST_RUN of {name} on {} bytes: {e:?}",
                packet.len()
            )
        });
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }
}

/// The expected encapsulation of `inner` from this host to `dst_ip`.
fn expected_encap(
    inner: &[u8],
    dst_ip: [u8; 4],
    vni_value: u32,
    macs: ([u8; 6], [u8; 6]),
    src_port: u16,
) -> Vec<u8> {
    encapsulated(inner, (LOCAL, dst_ip), vni_value, macs, src_port)
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

/// A flood list longer than one program run copies to ([`FLOOD_PEERS_PER_RUN`])
/// continues in tail calls: every peer gets exactly one copy.
#[test]
fn encap_floods_every_peer_beyond_one_run_through_tail_calls() {
    let mut f = Fixture::new();
    let peers = 2 * FLOOD_PEERS_PER_RUN + 44; // three runs
    let mut flood: Array<&mut MapData, u32> =
        Array::try_from(f.ebpf.map_mut(FLOOD_MAP).unwrap()).unwrap();
    for i in 0..peers {
        flood.set(i, &(i + 2), 0).unwrap();
    }
    for i in 0..peers {
        let id = i + 2;
        let addr = [10, 200, (id >> 8) as u8, id as u8];
        f.set_peer(id, addr, [0x02, 0xbb, 0, 0, (id >> 8) as u8, id as u8]);
    }
    let mut config: Array<&mut MapData, DatapathConfig> =
        Array::try_from(f.ebpf.map_mut(CONFIG_MAP).unwrap()).unwrap();
    config
        .set(0, &synthetic::config(f.underlay, peers as u16), 0)
        .unwrap();
    let (action, out) = f.run(programs::EGRESS, &arp_request(POD_LOCAL));
    assert_eq!(action, TC_ACT_STOLEN);
    for i in 0..peers {
        assert_eq!(
            f.peer_stats(i + 2).tx_packets,
            1,
            "peer {} got one copy",
            i + 2
        );
    }
    assert_eq!(f.counter(Counter::FloodTruncated), 0, "no run gave up");
    assert_eq!(f.counter(Counter::TxFlood), 1, "one flooded frame");
    // The last copy went to the last peer of the list.
    let last = peers + 1;
    assert_eq!(&out[30..34], &[10, 200, (last >> 8) as u8, last as u8]);
    assert_eq!(
        &out[0..6],
        &[0x02, 0xbb, 0, 0, (last >> 8) as u8, last as u8]
    );
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

/// A VXLAN frame as the peer at `src_ip` would send it to this host.
fn vxlan_from(src_ip: [u8; 4], vni_value: u32, inner: &[u8]) -> Vec<u8> {
    encapsulated(
        inner,
        (src_ip, LOCAL),
        vni_value,
        (PEER2_MAC, UL0_MAC),
        40000,
    )
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
            "IPv4 length beyond the packet",
            {
                let mut p = good.clone();
                let len = u16::from_be_bytes([p[16], p[17]]) + 1;
                p[16..18].copy_from_slice(&len.to_be_bytes());
                fix_ip_checksum(&mut p);
                p
            },
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

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Whether this host must deliver `p`, decided in user space from the wire format:
/// the reference the decapsulation program is checked against.
fn reference_delivers(p: &[u8]) -> bool {
    use weft_common::wire::{Vxlan, ipv4_checksum, vni_dst, vni_src};
    let Ok(v) = Vxlan::new_checked(p) else {
        return false;
    };
    let mut ip = [0u8; 20];
    ip.copy_from_slice(&p[14..34]);
    let frag = u16::from_be_bytes([p[20], p[21]]) & 0x3fff;
    let peer_addr = match vni_src(v.vni()) {
        2 => Some(PEER2),
        3 => Some(PEER3),
        _ => None,
    };
    let ip_len = usize::from(u16::from_be_bytes([p[16], p[17]]));
    v.dst_port() == 6784
        && ipv4_checksum(&ip) == 0
        && ip_len + 14 <= p.len()
        && ip_len >= 50
        && p.len() >= 64 + 20
        && frag == 0
        && vni_dst(v.vni()) == 1
        && peer_addr == Some(v.src_ip())
}

/// Mutated and truncated VXLAN frames: the program delivers exactly those the
/// reference accepts (and then exactly the inner frame), and every run lands in
/// exactly one counter (passed, delivered, or dropped for a reason).
#[test]
fn decap_agrees_with_the_reference_on_mutated_packets() {
    const RUNS: usize = 3000;
    let mut f = Fixture::new();
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let bases = [
        vxlan_from(PEER2, vni(1, 2), &inner_frame(POD_LOCAL, POD_REMOTE, 40)),
        vxlan_from(PEER3, vni(1, 3), &arp_request(POD_REMOTE)),
    ];
    let mut delivered = 0;
    for i in 0..RUNS {
        let mut p = bases[i % bases.len()].clone();
        // Flip one to three bytes in the headers (where decisions are made), and
        // sometimes fix the checksum so deeper checks are reached.
        for _ in 0..=rng.below(3) {
            let at = rng.below(64);
            p[at] ^= 1 << rng.below(8);
        }
        if rng.below(2) == 0 {
            fix_ip_checksum(&mut p);
        }
        if rng.below(8) == 0 {
            // BPF_PROG_TEST_RUN refuses an IPv4 frame shorter than its IP header,
            // so truncations keep at least Ethernet + IPv4.
            p.truncate(34 + rng.below(p.len() - 34));
        }
        let expect = reference_delivers(&p);
        let (action, out) = f.run(programs::INGRESS, &p);
        if expect {
            assert_eq!(
                action, TC_ACT_REDIRECT,
                "run {i}: {p:02x?} should be delivered"
            );
            assert_eq!(
                out,
                p[50..],
                "run {i}: delivered frame is not the inner frame"
            );
            delivered += 1;
        } else {
            assert_ne!(
                action, TC_ACT_REDIRECT,
                "run {i}: {p:02x?} must not be delivered"
            );
        }
    }
    let total: u64 = Counter::ALL.iter().map(|&c| f.counter(c)).sum();
    assert_eq!(total, RUNS as u64, "every run is counted exactly once");
    assert_eq!(f.counter(Counter::RxDelivered), delivered);
    assert!(
        delivered > 0 && delivered < RUNS as u64,
        "mutations hit both outcomes"
    );
}
