//! The eBPF programs run on synthetic frames through `BPF_PROG_TEST_RUN`: the
//! forwarding decision (unicast, flood, drop, each counted), the flood copies as they
//! leave the underlay (every copy's bytes, encapsulated by the kernel's VXLAN driver
//! with the tunnel key the program set), a flood to all 4,094 possible peers,
//! decapsulation refusing frames without tunnel metadata, and the underlay guards
//! of the encrypted fast datapath judging marked, plaintext and ESP packets.
//!
//! What the kernel's VXLAN socket hands the decapsulation program (tunnel keys of
//! real packets) cannot be made in a test run: the integration tests send real
//! VXLAN packets for that (`tests/bad_input.rs`, `tests/datapath.rs`).
//!
//! Needs root (loading programs) and the eBPF object in `WEFT_EBPF_OBJECT`
//! (`cargo xtask test` sets it). Each test runs in a fresh network namespace
//! (unshared by its own thread) holding an underlay veth `ul0` and a metadata-mode
//! VXLAN device `vx0` (see `weft_testbed::synthetic`), with `weft_encap` attached to
//! vx0's egress as on a host, so flood copies re-enter it.

use std::time::Duration;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, TestRun, TestRunOptions},
};
use weft_common::{
    maps::{
        CONFIG_MAP, COUNTERS_MAP, Counter, DatapathConfig, FLOOD_MAP, IPSEC_MARK, MACS_MAP,
        MAX_PEERS, MacEntry, MacKey, PEER_ENCRYPTED, PEER_SLEEVE, PEER_STATS_MAP, PeerStats,
        programs,
    },
    wire::{ETH_LEN, EncapHeaders, SRC_PORT_MAX, SRC_PORT_MIN, VXLAN_PORT, Vxlan, vni},
};
use weft_testbed::synthetic::{
    self, GATEWAY_MAC, LOCAL, PEER2, PEER2_MAC, PEER3, POD_LOCAL, POD_REMOTE, PacketTap, TempPins,
    UL0_MAC, arp_request, fill_scene, inner_frame, learn, load_datapath, private_underlay,
    set_peer, set_peer_flags,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// `TCX_NEXT` / `TC_ACT_UNSPEC` (-1): the guards' "not mine, next program" verdict.
const TCX_NEXT: u32 = u32::MAX;

/// How long flood copies may take to reach the tap (they leave synchronously; the
/// veth hands them over in a softirq).
const COPY_TIMEOUT: Duration = Duration::from_secs(3);

/// A loaded (not attached) datapath in a private network namespace.
struct Fixture {
    ebpf: Ebpf,
    vxlan: u32,
    _pins: TempPins,
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
        let vxlan = private_underlay().unwrap_or_else(|e| panic!("private netns: {e:#}"));
        let pins = TempPins::new().unwrap_or_else(|e| panic!("{e:#}"));
        let mut ebpf =
            load_datapath(object.as_ref(), pins.path()).unwrap_or_else(|e| panic!("{e:#}"));
        fill_scene(&mut ebpf, vxlan).unwrap_or_else(|e| panic!("filling maps: {e:#}"));
        // As on a host: the encapsulation program also runs on vx0's egress, so the
        // flood copies it sends into vx0 re-enter it (and must pass unchanged).
        let encap: &mut SchedClassifier = ebpf
            .program_mut(programs::EGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        encap
            .attach(vxlan, TcAttachType::Egress)
            .unwrap_or_else(|e| panic!("attaching {} to vx0: {e}", programs::EGRESS));
        Self {
            ebpf,
            vxlan,
            _pins: pins,
        }
    }

    fn set_config(&mut self, cfg: &DatapathConfig) {
        let mut config: Array<&mut MapData, DatapathConfig> =
            Array::try_from(self.ebpf.map_mut(CONFIG_MAP).unwrap()).unwrap();
        config.set(0, cfg, 0).unwrap();
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
        self.run_marked(name, packet, 0)
    }

    /// Runs program `name` on `packet` carrying packet mark `mark`; returns
    /// (action, output bytes).
    fn run_marked(&mut self, name: &str, packet: &[u8], mark: u32) -> (u32, Vec<u8>) {
        let prog: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 256];
        // The start of a `struct __sk_buff` (len, pkt_type, mark): the test run
        // takes the mark from it and wants the fields before it zero.
        let mut ctx = [0u8; 12];
        ctx[8..].copy_from_slice(&mark.to_ne_bytes());
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.ctx_in = Some(&ctx);
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

/// Whether `frame` is VXLAN to weft's port (what a flood copy looks like outside).
fn is_vxlan(frame: &[u8]) -> bool {
    Vxlan::new_checked(frame).is_ok_and(|v| v.dst_port() == VXLAN_PORT)
}

/// Checks one flood copy as it left the underlay: Weave's VXLAN from this host to
/// `dst` with the VNI naming both ends, the exact inner frame, to `next_hop`'s MAC.
fn assert_copy(frame: &[u8], dst: [u8; 4], dst_id: u16, inner: &[u8], next_hop: [u8; 6]) {
    let v = Vxlan::new_checked(frame).expect("a VXLAN frame");
    assert_eq!(v.dst_ip(), dst, "outer destination");
    assert_eq!(v.src_ip(), LOCAL, "outer source");
    assert_eq!(v.vni(), vni(dst_id, 1), "VNI = dst << 12 | src");
    assert_eq!(v.ttl(), 64, "TTL");
    assert!(v.dont_fragment(), "DF");
    assert_eq!(v.udp_checksum(), 0, "UDP checksum");
    assert!(
        (SRC_PORT_MIN..=SRC_PORT_MAX).contains(&v.src_port()),
        "source port {} outside the ephemeral range",
        v.src_port()
    );
    assert_eq!(v.inner(), inner, "inner frame of the copy to {dst:?}");
    assert_eq!(&frame[0..6], &next_hop, "outer destination MAC");
    assert_eq!(&frame[6..12], &UL0_MAC, "outer source MAC");
}

#[test]
fn encap_unicast_to_a_learned_mac_sets_the_key_and_lets_the_driver_send() {
    let mut f = Fixture::new();
    f.learn(POD_REMOTE, 2);
    let inner = inner_frame(POD_REMOTE, POD_LOCAL, 100);
    let (action, out) = f.run(programs::EGRESS, &inner);
    assert_eq!(
        action, TC_ACT_OK,
        "unicast goes on to the VXLAN driver with its tunnel key"
    );
    assert_eq!(out, inner, "the program leaves the frame itself unchanged");
    assert_eq!(f.counter(Counter::TxUnicast), 1);
    assert_eq!(f.counter(Counter::TxFlood), 0);
    let s = f.peer_stats(2);
    assert_eq!((s.tx_packets, s.tx_bytes), (1, inner.len() as u64));
    assert_eq!(f.peer_stats(3).tx_packets, 0);
}

#[test]
fn encap_unicast_to_a_sleeve_peer_goes_to_the_sleeve_device() {
    let mut f = Fixture::new();
    set_peer_flags(&mut f.ebpf, 2, PEER2, PEER_SLEEVE).unwrap();
    f.learn(POD_REMOTE, 2);
    let inner = inner_frame(POD_REMOTE, POD_LOCAL, 100);
    // No sleeve device configured: dropped and counted, never sent in the clear
    // over the fast path.
    assert_eq!(f.run(programs::EGRESS, &inner).0, TC_ACT_SHOT);
    assert_eq!(f.counter(Counter::DropNoSleeve), 1);
    assert_eq!(f.counter(Counter::TxUnicast), 0);
    // With one (any device stands in for the TAP here): redirected to it.
    let mut cfg = synthetic::config(f.vxlan, 2);
    cfg.sleeve_ifindex = f.vxlan;
    f.set_config(&cfg);
    let (action, out) = f.run(programs::EGRESS, &inner);
    assert_eq!(action, TC_ACT_REDIRECT, "handed to the sleeve device");
    assert_eq!(out, inner);
    assert_eq!(f.counter(Counter::TxSleeve), 1);
    assert_eq!(f.counter(Counter::TxUnicast), 0);
    assert_eq!(f.peer_stats(2).tx_packets, 0, "the sleeve counts its own");
    // A fast-datapath peer is unaffected.
    f.learn(POD_REMOTE, 3);
    assert_eq!(f.run(programs::EGRESS, &inner).0, TC_ACT_OK);
    assert_eq!(f.counter(Counter::TxUnicast), 1);
}

#[test]
fn encap_broadcast_copies_to_every_peer_but_the_last_which_gets_the_frame() {
    let mut f = Fixture::new();
    let tap = PacketTap::open(c"ul0p").unwrap();
    let arp = arp_request(POD_LOCAL);
    let (action, out) = f.run(programs::EGRESS, &arp);
    assert_eq!(action, TC_ACT_OK, "the last peer gets the original frame");
    assert_eq!(out, arp);
    // Peer 2's copy went through vx0 and left ul0, encapsulated by the kernel.
    let copies = tap.collect(2, COPY_TIMEOUT, is_vxlan);
    assert_eq!(copies.len(), 1, "exactly one copy (for peer 2) on the wire");
    assert_copy(&copies[0], PEER2, 2, &arp, PEER2_MAC);
    assert_eq!(
        f.counter(Counter::TxFlood),
        1,
        "the copy re-entering the program (on vx0) passed, not flooded again"
    );
    assert_eq!(f.counter(Counter::FloodCopyFailed), 0);
    assert_eq!(f.peer_stats(2).tx_packets, 1);
    assert_eq!(f.peer_stats(3).tx_packets, 1);
}

#[test]
fn encap_unknown_or_stale_unicast_floods() {
    let mut f = Fixture::new();
    let inner = inner_frame(POD_REMOTE, POD_LOCAL, 64);
    assert_eq!(f.run(programs::EGRESS, &inner).0, TC_ACT_OK);
    assert_eq!(f.counter(Counter::TxFlood), 1, "unknown MAC floods");
    // A MAC learned longer ago than the MAC age floods too.
    let mut stale = synthetic::config(f.vxlan, 2);
    stale.mac_age_secs = 0;
    f.set_config(&stale);
    f.learn(POD_REMOTE, 2);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(f.run(programs::EGRESS, &inner).0, TC_ACT_OK);
    assert_eq!(f.counter(Counter::TxFlood), 2, "an aged MAC floods");
    assert_eq!(f.counter(Counter::TxUnicast), 0);
}

/// A flood to every possible peer (every ShortID but this host's and 0), in one
/// program run (`bpf_loop`): each peer gets exactly one copy, and every copy on the
/// wire carries the whole frame.
#[test]
fn encap_floods_every_possible_peer() {
    let mut f = Fixture::new();
    let peers = MAX_PEERS - 2; // ShortIDs 2..=4095
    let addr = |id: u32| [10, 99, (id >> 8) as u8, id as u8];
    {
        let mut flood: Array<&mut MapData, u32> =
            Array::try_from(f.ebpf.map_mut(FLOOD_MAP).unwrap()).unwrap();
        for i in 0..peers {
            flood.set(i, &(i + 2), 0).unwrap();
        }
    }
    for i in 0..peers {
        set_peer(&mut f.ebpf, i + 2, addr(i + 2)).unwrap();
    }
    f.set_config(&synthetic::config(f.vxlan, peers as u16));
    let tap = PacketTap::open(c"ul0p").unwrap();
    let arp = arp_request(POD_LOCAL);
    let (action, _) = f.run(programs::EGRESS, &arp);
    assert_eq!(action, TC_ACT_OK);
    // Every copy is counted for its peer (below). On the wire, the veth pair queues
    // at most `netdev_max_backlog` (1000 here) frames per burst, so a few hundred
    // fewer may arrive; each that does is checked.
    let copies = tap.collect(peers as usize - 1, COPY_TIMEOUT, is_vxlan);
    assert!(
        copies.len() >= 900,
        "copies on the wire: {} of {}",
        copies.len(),
        peers - 1
    );
    let mut seen = std::collections::BTreeSet::new();
    for frame in &copies {
        let dst = Vxlan::new_checked(frame).unwrap().dst_ip();
        let id = u32::from(dst[2]) << 8 | u32::from(dst[3]);
        assert!((2..peers + 1).contains(&id), "copy to unexpected {dst:?}");
        assert_copy(frame, addr(id), id as u16, &arp, GATEWAY_MAC);
        assert!(seen.insert(id), "two copies to peer {id}");
    }
    for i in 0..peers {
        assert_eq!(
            f.peer_stats(i + 2).tx_packets,
            1,
            "peer {} counted once",
            i + 2
        );
    }
    assert_eq!(f.counter(Counter::FloodCopyFailed), 0);
    assert_eq!(
        f.counter(Counter::TxFlood),
        1,
        "one flooded frame: no copy re-entering the program flooded again"
    );
}

#[test]
fn encap_drops_oversized_unconfigured_and_peerless() {
    let mut f = Fixture::new();
    let big = inner_frame(POD_REMOTE, POD_LOCAL, 1376 - 28 + 1);
    let (action, _) = f.run(programs::EGRESS, &big);
    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(f.counter(Counter::DropTooBig), 1);
    let fits = inner_frame(POD_REMOTE, POD_LOCAL, 1376 - 28);
    f.learn(POD_REMOTE, 2);
    assert_eq!(
        f.run(programs::EGRESS, &fits).0,
        TC_ACT_OK,
        "MTU-sized frame passes"
    );

    f.set_config(&synthetic::config(f.vxlan, 0));
    let arp = arp_request(POD_LOCAL);
    assert_eq!(f.run(programs::EGRESS, &arp).0, TC_ACT_SHOT);
    assert_eq!(f.counter(Counter::DropNoPeers), 1);

    f.set_config(&DatapathConfig::default());
    assert_eq!(f.run(programs::EGRESS, &fits).0, TC_ACT_SHOT);
    assert_eq!(f.run(programs::INGRESS, &fits).0, TC_ACT_SHOT);
    assert_eq!(
        f.counter(Counter::DropNotConfigured),
        2,
        "both programs drop (and count) until configured"
    );
}

#[test]
fn decap_refuses_frames_without_tunnel_metadata() {
    let mut f = Fixture::new();
    // A frame that did not come through the VXLAN socket (a test run has no tunnel
    // key): it is not weft's to deliver, whatever it looks like.
    let inner = inner_frame(POD_LOCAL, POD_REMOTE, 64);
    let (action, _) = f.run(programs::INGRESS, &inner);
    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(f.counter(Counter::DropNoTunnelKey), 1);
    assert_eq!(f.counter(Counter::RxDelivered), 0);
    assert!(
        f.learned(POD_REMOTE).is_none(),
        "nothing learned from a refused frame"
    );
}

/// An outer fast-datapath packet as it crosses the underlay: Ethernet, IPv4, UDP to
/// `dst_port` and VXLAN with `vni`, from `src` to `dst`, around a small inner frame.
fn underlay_packet(src: [u8; 4], dst: [u8; 4], dst_port: u16, vni: u32) -> Vec<u8> {
    let inner = inner_frame(POD_LOCAL, POD_REMOTE, 64);
    let eth: [u8; ETH_LEN] = inner[..ETH_LEN].try_into().unwrap();
    let mut headers = EncapHeaders::new(&eth, inner.len() as u32, src, dst, 40000, dst_port, vni);
    headers.set_outer_macs(&UL0_MAC, &PEER2_MAC);
    let mut packet = headers.bytes[..ETH_LEN + 36].to_vec();
    packet.extend_from_slice(&inner);
    packet
}

/// The same packet as IP protocol `proto` (ESP: 50), the bytes after the IPv4
/// header unchanged (a guard reads no further than the protocol for it).
fn with_protocol(mut packet: Vec<u8>, proto: u8) -> Vec<u8> {
    packet[ETH_LEN + 9] = proto;
    packet
}

/// The same packet with 4 bytes of IPv4 options (NOPs) after its 20-byte header.
fn with_ip_options(mut packet: Vec<u8>) -> Vec<u8> {
    packet[ETH_LEN] = 0x46;
    let total = u16::from_be_bytes([packet[ETH_LEN + 2], packet[ETH_LEN + 3]]) + 4;
    packet[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&total.to_be_bytes());
    packet.splice(ETH_LEN + 20..ETH_LEN + 20, [1u8; 4]);
    packet
}

#[test]
fn guard_egress_drops_marked_plaintext_vxlan_and_passes_esp_and_unmarked() {
    let mut f = Fixture::new();
    let vxlan = underlay_packet(LOCAL, PEER2, VXLAN_PORT, vni(2, 1));
    let guard = programs::GUARD_EGRESS;
    // Marked VXLAN that XFRM did not turn into ESP: a leak, dropped and counted.
    assert_eq!(f.run_marked(guard, &vxlan, IPSEC_MARK).0, TC_ACT_SHOT);
    assert_eq!(
        f.run_marked(guard, &with_ip_options(vxlan.clone()), IPSEC_MARK | 0x1)
            .0,
        TC_ACT_SHOT,
        "IPv4 options (IHL 6) and other mark bits change nothing"
    );
    assert_eq!(f.counter(Counter::DropLeakGuard), 2);
    // What XFRM made of it (ESP), unmarked traffic, and marked UDP to another port
    // are not the guard's: the next program (or the stack) decides.
    let esp = with_protocol(vxlan.clone(), 50);
    assert_eq!(f.run_marked(guard, &esp, IPSEC_MARK).0, TCX_NEXT, "ESP");
    assert_eq!(f.run(guard, &vxlan).0, TCX_NEXT, "unmarked VXLAN");
    let other = underlay_packet(LOCAL, PEER2, 4789, vni(2, 1));
    assert_eq!(
        f.run_marked(guard, &other, IPSEC_MARK).0,
        TCX_NEXT,
        "UDP 4789"
    );
    assert_eq!(
        f.run_marked(guard, &arp_request(POD_LOCAL), IPSEC_MARK).0,
        TCX_NEXT,
        "ARP"
    );
    // The port the agent configured (`--port`) is the one judged.
    let mut cfg = synthetic::config(f.vxlan, 2);
    cfg.vxlan_port = 4789;
    f.set_config(&cfg);
    assert_eq!(f.run_marked(guard, &other, IPSEC_MARK).0, TC_ACT_SHOT);
    assert_eq!(f.run_marked(guard, &vxlan, IPSEC_MARK).0, TCX_NEXT);
    assert_eq!(f.counter(Counter::DropLeakGuard), 3);
}

#[test]
fn guard_ingress_drops_plaintext_vxlan_from_an_encrypted_peer_only() {
    let mut f = Fixture::new();
    set_peer_flags(&mut f.ebpf, 2, PEER2, PEER_ENCRYPTED).unwrap();
    let guard = programs::GUARD_INGRESS;
    // Peer 2 is encrypted: plaintext VXLAN from its address naming it never enters.
    let from2 = underlay_packet(PEER2, LOCAL, VXLAN_PORT, vni(1, 2));
    assert_eq!(f.run(guard, &from2).0, TC_ACT_SHOT);
    assert_eq!(
        f.run(guard, &with_ip_options(from2.clone())).0,
        TC_ACT_SHOT,
        "IPv4 options (IHL 6)"
    );
    assert_eq!(f.counter(Counter::DropNotEncrypted), 2);
    // Its ESP passes (XFRM decrypts it), as does what an SA of the agent decrypted
    // and marked, should it pass this hook again.
    assert_eq!(
        f.run(guard, &with_protocol(from2.clone(), 50)).0,
        TCX_NEXT,
        "ESP"
    );
    assert_eq!(
        f.run_marked(guard, &from2, IPSEC_MARK).0,
        TCX_NEXT,
        "decrypted"
    );
    // Peer 3 is not encrypted: its plaintext VXLAN is the decapsulation's to judge.
    let from3 = underlay_packet(PEER3, LOCAL, VXLAN_PORT, vni(1, 3));
    assert_eq!(f.run(guard, &from3).0, TCX_NEXT, "plain peer");
    // Peer 2's ShortID from another address: not peer 2's traffic (the
    // decapsulation drops the mismatch).
    let spoofed = underlay_packet(PEER3, LOCAL, VXLAN_PORT, vni(1, 2));
    assert_eq!(f.run(guard, &spoofed).0, TCX_NEXT, "source mismatch");
    assert_eq!(f.counter(Counter::DropNotEncrypted), 2);
    assert_eq!(f.counter(Counter::DropLeakGuard), 0);
}
