//! weft between weft hosts: reachability, ARP, and the bytes on the underlay.
//! Need root and `WEFT_AGENT_BIN`.

mod common;

use std::time::Duration;

use common::{FIRST_CONTACT, Must, agent_bin, bed, running_pair, start_agents};
use weft_common::wire::{SRC_PORT_MAX, SRC_PORT_MIN, VXLAN_PORT, Vxlan, vni};
use weft_testbed::{capture_vxlan, ping, pod_exec, pod_mac, tcp_transfer, wait_ping};

/// Every pod reaches a pod on every other host (ping), TCP works both ways between
/// every pair of hosts, and each agent then reports both peers established.
#[test]
fn ping_and_tcp_between_every_pair_of_hosts() {
    let bin = agent_bin();
    let mut tb = bed(3, 2);
    start_agents(&mut tb, &bin, &[1, 2, 3]);
    for a in 1..=3u8 {
        for b in 1..=3u8 {
            if a == b {
                continue;
            }
            let from = tb.pod(a, 1).must("pod").clone();
            let to = tb.pod(b, 2).must("pod").clone();
            wait_ping(&from, to.addr, FIRST_CONTACT).must(&format!(
                "first contact {} -> {}",
                from.label(),
                to.label()
            ));
            let r = ping(&from, to.addr, 5).must(&format!("{} -> {}", from.label(), to.label()));
            assert_eq!(
                r.received,
                5,
                "{} -> {}: every echo answered: {r:?}",
                from.label(),
                to.label()
            );
            let t = tcp_transfer(&from, &to, 4 << 20).must(&format!(
                "TCP {} -> {}",
                from.label(),
                to.label()
            ));
            assert_eq!(t.bytes_received, 4 << 20);
        }
    }
    for n in 1..=3u8 {
        let s = tb.status_json(n).must("status --json");
        let conns = s["connections"]
            .as_array()
            .unwrap_or_else(|| panic!("host{n}: no connections array in {s}"));
        assert_eq!(conns.len(), 2, "host{n}: one connection per peer: {s}");
        for c in conns {
            assert_eq!(
                c["state"], "established",
                "host{n}: after traffic both ways: {c}"
            );
            assert_eq!(c["overlay"], "fastdp", "host{n}: {c}");
            assert!(
                c["rx_packets"].as_u64().unwrap_or(0) > 0,
                "host{n}: rx counted: {c}"
            );
            assert!(
                c["tx_packets"].as_u64().unwrap_or(0) > 0,
                "host{n}: tx counted: {c}"
            );
        }
    }
}

/// ARP crosses hosts: after one ping each pod's neighbour table holds the other's
/// real MAC address.
#[test]
fn arp_resolves_across_hosts() {
    let bin = agent_bin();
    let (_tb, p1, p2) = running_pair(&bin);
    let (mac1, mac2) = (pod_mac(&p1).must("mac"), pod_mac(&p2).must("mac"));
    for p in [&p1, &p2] {
        let n = pod_exec(p, &["ip", "neigh", "show", "dev", "eth0"]).must("neigh");
        assert!(
            n.trim().is_empty(),
            "fresh pod {} already has neighbours: {n}",
            p.label()
        );
    }
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("h1p1 -> h2p1");
    let n1 = pod_exec(
        &p1,
        &["ip", "neigh", "show", &p2.addr.to_string(), "dev", "eth0"],
    )
    .must("neigh");
    assert!(
        n1.contains(&format!("lladdr {mac2}")),
        "h1p1 should map {} to {mac2}, has: {n1}",
        p2.addr
    );
    let n2 = pod_exec(
        &p2,
        &["ip", "neigh", "show", &p1.addr.to_string(), "dev", "eth0"],
    )
    .must("neigh");
    assert!(
        n2.contains(&format!("lladdr {mac1}")),
        "h2p1 should map {} to {mac1}, has: {n2}",
        p1.addr
    );
}

/// The underlay carries Weave's fast-datapath VXLAN: UDP 6784, VNI (dst<<12)|src, DF,
/// TTL 64, UDP checksum 0, source port from the kernel's ephemeral range, and the
/// pod's own Ethernet frame inside.
#[test]
fn underlay_carries_weave_vxlan() {
    let bin = agent_bin();
    let (tb, p1, p2) = running_pair(&bin);
    let (mac1, mac2) = (pod_mac(&p1).must("mac"), pod_mac(&p2).must("mac"));
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("first contact");
    let host1 = tb.host(1).must("host").clone();
    // Heartbeats may share the wire; capture generously and pick the ICMP frames.
    let packets = capture_vxlan(&host1, tb.dir(), 40, Duration::from_secs(2), || {
        ping(&p1, p2.addr, 5).map(drop)
    })
    .must("capture on host1 eth0");
    let (mut requests, mut replies) = (0, 0);
    for p in &packets {
        let v = Vxlan::new_checked(&p.data)
            .unwrap_or_else(|e| panic!("not a VXLAN frame ({e:?}): {:02x?}", p.data));
        assert_eq!(v.dst_port(), VXLAN_PORT, "outer UDP destination port");
        assert_eq!(v.ttl(), 64, "outer TTL");
        assert!(v.dont_fragment(), "outer DF flag");
        assert_eq!(v.udp_checksum(), 0, "outer UDP checksum");
        assert!(
            (SRC_PORT_MIN..=SRC_PORT_MAX).contains(&v.src_port()),
            "outer source port {}",
            v.src_port()
        );
        let ip_total = usize::from(u16::from_be_bytes([p.data[16], p.data[17]]));
        assert_eq!(
            ip_total + 14,
            p.data.len(),
            "outer IPv4 length matches the frame"
        );
        let udp_len = usize::from(u16::from_be_bytes([p.data[38], p.data[39]]));
        assert_eq!(udp_len, ip_total - 20, "outer UDP length");
        let inner = v.inner();
        let is_icmp = inner.len() >= 42 && inner[12..14] == [0x08, 0x00] && inner[23] == 1;
        if !is_icmp {
            continue;
        }
        let icmp_type = inner[34];
        let (src_mac, dst_mac) = (fmt_mac(&inner[6..12]), fmt_mac(&inner[0..6]));
        match icmp_type {
            8 => {
                requests += 1;
                assert_eq!(
                    v.vni(),
                    vni(2, 1),
                    "echo request host1 -> host2: VNI (2<<12)|1"
                );
                assert_eq!(
                    (v.src_ip(), v.dst_ip()),
                    ([192, 168, 48, 11], [192, 168, 48, 12])
                );
                assert_eq!(
                    (src_mac.as_str(), dst_mac.as_str()),
                    (mac1.as_str(), mac2.as_str()),
                    "inner MACs"
                );
                assert_eq!(inner[26..30], [10, 32, 1, 1], "inner source IP");
                assert_eq!(inner[30..34], [10, 32, 2, 1], "inner destination IP");
                assert_eq!(
                    inner.len(),
                    14 + 84,
                    "inner frame = Ethernet + 84-byte ICMP echo"
                );
            }
            0 => {
                replies += 1;
                assert_eq!(
                    v.vni(),
                    vni(1, 2),
                    "echo reply host2 -> host1: VNI (1<<12)|2"
                );
                assert_eq!(
                    (v.src_ip(), v.dst_ip()),
                    ([192, 168, 48, 12], [192, 168, 48, 11])
                );
                assert_eq!(
                    (src_mac.as_str(), dst_mac.as_str()),
                    (mac2.as_str(), mac1.as_str()),
                    "inner MACs"
                );
                assert_eq!(
                    inner.len(),
                    14 + 84,
                    "inner frame = Ethernet + 84-byte ICMP echo"
                );
            }
            t => panic!("unexpected ICMP type {t} inside VXLAN"),
        }
    }
    assert_eq!(
        (requests, replies),
        (5, 5),
        "expected 5 encapsulated echo requests and 5 replies on host1's eth0 among {} VXLAN packets",
        packets.len()
    );
}

fn fmt_mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Drop counters of host1: (wrong destination, unknown source, source mismatch).
type Drops = (u64, u64, u64);

/// The decapsulation program is the security boundary: VXLAN that reaches a host
/// (from a peer's address, to weft's port) is delivered only if its VNI names this
/// host and a known peer, and that peer is the sender. Forged datagrams, sent from
/// host2 with an ordinary UDP socket, are each dropped and counted by reason, and
/// never reach host1's bridge (which would learn their inner source MAC); a
/// well-formed one does.
#[test]
fn forged_vxlan_is_dropped_and_counted_by_reason() {
    let bin = agent_bin();
    let mut tb = bed(3, 1);
    start_agents(&mut tb, &bin, &[1, 2, 3]);
    let (p1, p2) = (
        tb.pod(1, 1).must("pod").clone(),
        tb.pod(2, 1).must("pod").clone(),
    );
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("first contact");
    let drops = |tb: &weft_testbed::Testbed| -> Drops {
        let s = tb.status_json(1).must("status");
        let c = |name: &str| s["counters"][name].as_u64().unwrap_or(0);
        (
            c("drop_wrong_destination"),
            c("drop_unknown_source"),
            c("drop_source_mismatch"),
        )
    };
    let host1 = tb.host(1).must("host").ns.clone();
    let bridge_knows =
        |mac: &str| ns_output(&host1, &["bridge", "fdb", "show", "br", "weave"]).contains(mac);
    // host2 (ShortID 2, 192.168.48.12) sends to host1 (ShortID 1) as ...
    let cases: [(&str, u32, Drops, u8); 4] = [
        ("to another host (VNI 9 <- 2)", vni(9, 2), (1, 0, 0), 0x41),
        (
            "from an unknown peer (VNI 1 <- 7)",
            vni(1, 7),
            (0, 1, 0),
            0x42,
        ),
        ("as host3 (VNI 1 <- 3)", vni(1, 3), (0, 0, 1), 0x43),
        ("as itself (VNI 1 <- 2)", vni(1, 2), (0, 0, 0), 0x44),
    ];
    let host2 = tb.host(2).must("host").ns.clone();
    for (what, v, expected, tag) in cases {
        let src_mac = [0x02, 0xee, 0, 0, 0, tag];
        let mac_text = format!("02:ee:00:00:00:{tag:02x}");
        let inner = weft_testbed::synthetic::inner_frame([0xff; 6], src_mac, 32);
        let before = drops(&tb);
        let mut datagram = vec![0x08, 0, 0, 0, (v >> 16) as u8, (v >> 8) as u8, v as u8, 0];
        datagram.extend_from_slice(&inner);
        let send = weft_testbed::netns::spawn_in(&host2, move || {
            let sock = std::net::UdpSocket::bind("192.168.48.12:0")?;
            sock.send_to(&datagram, ("192.168.48.11", VXLAN_PORT))?;
            Ok(())
        });
        weft_testbed::netns::join(send, "send").must("forged datagram");
        let forged = expected != (0, 0, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let delta = loop {
            let now = drops(&tb);
            let delta = (now.0 - before.0, now.1 - before.1, now.2 - before.2);
            let seen = if forged {
                delta != (0, 0, 0)
            } else {
                bridge_knows(&mac_text)
            };
            if seen || std::time::Instant::now() > deadline {
                break delta;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            delta, expected,
            "{what}: (wrong destination, unknown source, source mismatch)"
        );
        assert_eq!(
            bridge_knows(&mac_text),
            !forged,
            "{what}: the frame reached host1's bridge"
        );
    }
}

/// Runs a command in namespace `ns` and returns its output (empty on failure).
fn ns_output(ns: &str, args: &[&str]) -> String {
    weft_testbed::ns_exec(ns, args).unwrap_or_default()
}
