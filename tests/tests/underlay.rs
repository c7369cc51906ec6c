//! weft on underlays as real hosts have them: a NIC that puts MTU-sized packets on
//! the wire (receivers must coalesce them again), a host with two interfaces, a pod
//! that routes overlay traffic onward, and a large MAC table while status is read.
//! Need root, `WEFT_AGENT_BIN` and ethtool.

mod common;

use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use common::{Bed, FIRST_CONTACT, Must, agent_bin, bed, running_pair, start_agents};
use weft_common::maps::{MACS_MAP, MAP_LAYOUT_VERSION, MacEntry, MacKey};
use weft_testbed::{Pod, ns_exec, ping_stream, tcp_transfer, wait_ping};

/// A counter of `dev` in namespace `ns` (`/sys/class/net/<dev>/statistics/<what>`).
fn stat(ns: &str, dev: &str, what: &str) -> u64 {
    let path = format!("/sys/class/net/{dev}/statistics/{what}");
    ns_exec(ns, &["cat", &path])
        .must(&format!("reading {path} in {ns}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path} in {ns}: {e}"))
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A NIC-like underlay: the sender's underlay interface segments on the wire (TSO
/// and GSO off), the receiver's coalesces (GRO on). The pod behind weft still gets
/// TCP in GRO super-packets: the kernel's VXLAN socket coalesces encapsulated TCP
/// before the datapath decapsulates it.
#[test]
fn pods_receive_coalesced_tcp_over_a_nic_like_underlay() {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    start_agents(&mut tb, &bin, &[1, 2]);
    let (h1, h2) = (
        tb.host(1).must("host").ns.clone(),
        tb.host(2).must("host").ns.clone(),
    );
    ns_exec(&h1, &["ethtool", "-K", "eth0", "tso", "off", "gso", "off"]).must("ethtool host1");
    ns_exec(&h2, &["ethtool", "-K", "eth0", "gro", "on"]).must("ethtool host2");
    let features = ns_exec(&h1, &["ethtool", "-k", "eth0"]).must("ethtool -k");
    assert!(
        features.contains("tcp-segmentation-offload: off")
            && features.contains("generic-segmentation-offload: off"),
        "host1 eth0 segments on the wire:\n{features}"
    );
    let (p1, p2) = (
        tb.pod(1, 1).must("pod").clone(),
        tb.pod(2, 1).must("pod").clone(),
    );
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("first contact");
    let (wire_before, pod_before) = (
        (
            stat(&h2, "eth0", "rx_packets"),
            stat(&h2, "eth0", "rx_bytes"),
        ),
        (
            stat(&p2.ns, "eth0", "rx_packets"),
            stat(&p2.ns, "eth0", "rx_bytes"),
        ),
    );
    let t = tcp_transfer(&p1, &p2, 256 << 20).must("TCP over the NIC-like underlay");
    let wire_packets = stat(&h2, "eth0", "rx_packets") - wire_before.0;
    let pod_packets = stat(&p2.ns, "eth0", "rx_packets") - pod_before.0;
    let pod_bytes = stat(&p2.ns, "eth0", "rx_bytes") - pod_before.1;
    let wire_bytes = stat(&h2, "eth0", "rx_bytes") - wire_before.1;
    let pod_avg = pod_bytes / pod_packets.max(1);
    eprintln!(
        "NIC-like underlay: {:.2} Gbit/s; host2 eth0 got {wire_packets} packets \
         ({} B average after GRO), the pod {pod_packets} ({pod_avg} B average)",
        t.bits_per_second / 1e9,
        wire_bytes / wire_packets.max(1),
    );
    assert!(
        pod_avg > 10_000,
        "the pod gets coalesced packets (average {pod_avg} B, expected > 10 KB)"
    );
}

/// A host with a second interface through which one peer is reachable (a more
/// specific route): the outer packets follow the kernel's route to each peer, from
/// this host's own address, and traffic to every peer flows.
#[test]
fn each_peer_is_reached_through_the_kernels_route_to_it() {
    let bin = agent_bin();
    let mut tb = bed(3, 1);
    let (h1, h3) = (
        tb.host(1).must("host").ns.clone(),
        tb.host(3).must("host").ns.clone(),
    );
    // A direct link host1 <-> host3, and /32 routes between their underlay addresses
    // over it (more specific than the shared /24).
    run(&[
        "ip", "link", "add", "eth1", "netns", &h1, "type", "veth", "peer", "name", "eth1", "netns",
        &h3,
    ]);
    for (ns, me, other) in [
        (&h1, "10.77.0.1/30", "192.168.48.13"),
        (&h3, "10.77.0.2/30", "192.168.48.11"),
    ] {
        ns_exec(ns, &["ip", "addr", "add", me, "dev", "eth1"]).must("addr");
        ns_exec(ns, &["ip", "link", "set", "eth1", "up"]).must("up");
        let via = if ns == &h1 { "10.77.0.2" } else { "10.77.0.1" };
        ns_exec(
            ns,
            &["ip", "route", "add", other, "via", via, "dev", "eth1"],
        )
        .must("route");
    }
    start_agents(&mut tb, &bin, &[1, 2, 3]);
    let pods: Vec<Pod> = tb.pods().cloned().collect();
    for a in &pods {
        for b in &pods {
            if a.host != b.host {
                wait_ping(a, b.addr, FIRST_CONTACT).must(&format!(
                    "{} -> {}",
                    a.label(),
                    b.label()
                ));
            }
        }
    }
    let before = stat(&h1, "eth1", "tx_packets");
    let eth0_before = stat(&h3, "eth0", "rx_packets");
    let r = ping_stream(&pods[0], pods[2].addr, 50, Duration::from_millis(20)).must("ping");
    assert_eq!(r.received, 50, "host1 -> host3 over eth1: {r:?}");
    let over_eth1 = stat(&h1, "eth1", "tx_packets") - before;
    assert!(
        over_eth1 >= 50,
        "the outer packets to host3 left host1 through eth1 ({over_eth1} packets)"
    );
    let over_eth0 = stat(&h3, "eth0", "rx_packets") - eth0_before;
    assert!(
        over_eth0 < 50,
        "host3 got host1's pings through eth1, not eth0 ({over_eth0} on eth0)"
    );
    let t = tcp_transfer(&pods[0], &pods[1], 8 << 20).must("TCP host1 -> host2 over eth0");
    assert_eq!(t.bytes_received, 8 << 20);
}

/// A pod that routes: traffic from pod A to an address behind pod R (on another
/// host) is forwarded by R back into the overlay to pod B on a third host. R receives
/// what weft decapsulated (GRO super-packets included) and sends it on.
#[test]
fn a_router_pod_forwards_overlay_tcp_onward() {
    let bin = agent_bin();
    let mut tb = bed(3, 1);
    start_agents(&mut tb, &bin, &[1, 2, 3]);
    let (a, r, b) = (
        tb.pod(1, 1).must("pod").clone(),
        tb.pod(2, 1).must("pod").clone(),
        tb.pod(3, 1).must("pod").clone(),
    );
    let behind = Ipv4Addr::new(10, 99, 0, 1);
    ns_exec(&b.ns, &["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"]).must("B's address");
    for key in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.eth0.send_redirects=0",
    ] {
        ns_exec(&r.ns, &["sysctl", "-q", "-w", key]).must("router sysctl");
    }
    let (via_r, via_b) = (r.addr.to_string(), b.addr.to_string());
    ns_exec(
        &a.ns,
        &["ip", "route", "add", "10.99.0.1/32", "via", &via_r],
    )
    .must("A's route");
    ns_exec(
        &r.ns,
        &["ip", "route", "add", "10.99.0.1/32", "via", &via_b],
    )
    .must("R's route");
    wait_ping(&a, r.addr, FIRST_CONTACT).must("A -> R");
    wait_ping(&r, b.addr, FIRST_CONTACT).must("R -> B");
    wait_ping(&a, behind, FIRST_CONTACT).must("A -> B through R");
    let forwarded_before = stat(&r.ns, "eth0", "tx_packets");
    let target = Pod {
        addr: behind,
        ..b.clone()
    };
    let t = tcp_transfer(&a, &target, 64 << 20).must("TCP A -> B through the router pod");
    assert_eq!(t.bytes_received, 64 << 20);
    let forwarded = stat(&r.ns, "eth0", "tx_packets") - forwarded_before;
    assert!(
        forwarded > 100,
        "the router pod forwarded the stream ({forwarded} packets out)"
    );
}

/// Opens every agent's pinned MAC table in the testbed (one per host).
fn pinned_macs(tb: &Bed) -> Vec<HashMap<MapData, MacKey, MacEntry>> {
    let root = tb.bpffs_dir().join("weft");
    let dirs = std::fs::read_dir(&root).unwrap_or_else(|e| panic!("{}: {e}", root.display()));
    dirs.flatten()
        .map(|dir| {
            let path = dir
                .path()
                .join(format!("maps-v{MAP_LAYOUT_VERSION}"))
                .join(MACS_MAP);
            let data =
                MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            HashMap::try_from(Map::LruHashMap(data)).unwrap_or_else(|e| panic!("MAC table: {e}"))
        })
        .collect()
}

/// With 100,000 learned MACs the agent's status still answers at once (it never
/// walks the MAC table) and the datapath forwards meanwhile.
#[test]
fn status_stays_quick_with_100k_learned_macs() {
    let bin = agent_bin();
    let (tb, p1, p2) = running_pair(&bin);
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("first contact");
    let tables = pinned_macs(&tb);
    assert_eq!(tables.len(), 2, "one pinned MAC table per host");
    for mut macs in tables {
        let seen = MacEntry {
            short_id: 2,
            pad: 0,
            seen_ns: 0,
        };
        for i in 0..100_000u32 {
            let b = i.to_be_bytes();
            let key = MacKey::new([0x02, 0xee, b[0], b[1], b[2], b[3]]);
            macs.insert(&key, &seen, 0).must_map("insert");
        }
    }
    let (from, to) = (p1.clone(), p2.addr);
    let stream = std::thread::spawn(move || ping_stream(&from, to, 200, Duration::from_millis(10)));
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let start = Instant::now();
        let s = tb.status_json(1).must("status --json");
        slowest = slowest.max(start.elapsed());
        assert!(s["connections"].is_array(), "{s}");
    }
    let r = stream.join().expect("ping thread").must("ping stream");
    assert_eq!(r.received, r.transmitted, "forwarding meanwhile: {r:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "status took {slowest:?} with 100,000 MACs learned"
    );
}

trait MustMap<T> {
    fn must_map(self, what: &str) -> T;
}

impl<T> MustMap<T> for Result<T, aya::maps::MapError> {
    fn must_map(self, what: &str) -> T {
        self.unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

/// A path MTU below what the overlay MTU needs (a route with MTU 1400 from host1 to
/// host2: 1376 + 50 does not fit): the kernel answers the pod with ICMP
/// "fragmentation needed" through weft's device, weft delivers it, and TCP adapts
/// instead of stalling in a black hole.
#[test]
fn a_smaller_path_mtu_is_reported_to_the_pod() {
    let bin = agent_bin();
    let (tb, p1, p2) = running_pair(&bin);
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("first contact");
    let h1 = tb.host(1).must("host").ns.clone();
    ns_exec(
        &h1,
        &[
            "ip",
            "route",
            "add",
            "192.168.48.12/32",
            "dev",
            "eth0",
            "mtu",
            "1400",
        ],
    )
    .must("route with a smaller MTU");
    let t = tcp_transfer(&p1, &p2, 16 << 20).must("TCP over the smaller path MTU");
    assert_eq!(t.bytes_received, 16 << 20);
    let s = tb.status_json(1).must("status");
    assert!(
        s["counters"]["rx_pmtu_reply"].as_u64().unwrap_or(0) > 0,
        "the pod got the kernel's ICMP through weft: {}",
        s["counters"]
    );
    let route = ns_exec(&p1.ns, &["ip", "route", "get", &p2.addr.to_string()]).must("route");
    assert!(
        route.contains("mtu 1350"),
        "the pod learnt the path MTU (1400 - 50):\n{route}"
    );
}
