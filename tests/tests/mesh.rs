//! weft as a peer of a Weave mesh (`weft run [PEER...]`): weft <-> weft meshes
//! without and with a password, peers found through gossip, the overlay each
//! connection uses and status built from the mesh. Need root and `WEFT_AGENT_BIN`.

mod common;

use std::time::Duration;

use common::{FIRST_CONTACT, Must, agent_bin, bed, established_over, wait_connection};
use weft_testbed::{Testbed, ping, tcp_transfer, wait_ping};

/// How long a mesh connection may take to be established.
const ESTABLISH: Duration = Duration::from_secs(20);

/// Pods of hosts `a` and `b` ping each other and carry TCP both ways.
fn check_pods(tb: &Testbed, a: u8, b: u8) {
    let (pa, pb) = (
        tb.pod(a, 1).must("pod").clone(),
        tb.pod(b, 1).must("pod").clone(),
    );
    for (from, to) in [(&pa, &pb), (&pb, &pa)] {
        wait_ping(from, to.addr, FIRST_CONTACT).must(&format!(
            "first contact {} -> {}",
            from.label(),
            to.label()
        ));
        let r = ping(from, to.addr, 5).must("ping");
        assert_eq!(r.received, 5, "{} -> {}: {r:?}", from.label(), to.label());
        let t = tcp_transfer(from, to, 4 << 20).must("tcp");
        assert_eq!(t.bytes_received, 4 << 20);
    }
}

/// Two wefts, the second told only the first's address: both show the connection
/// established over the fast datapath (`->` on the dialler, `<-` on the other), both
/// list each other as peers, and pods talk both ways.
#[test]
fn two_wefts_mesh_over_the_fast_datapath() {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    tb.start_mesh_agent(1, &bin, &[], &[]).must("agent 1");
    tb.start_mesh_agent(2, &bin, &[1], &[]).must("agent 2");
    let c2 = wait_connection(&tb, 2, 1, ESTABLISH, established_over("fastdp"));
    let c1 = wait_connection(&tb, 1, 2, ESTABLISH, established_over("fastdp"));
    assert_eq!(c2["direction"], "outbound", "{c2}");
    assert_eq!(c1["direction"], "inbound", "{c1}");
    assert_eq!(c2["encrypted"], false);
    check_pods(&tb, 1, 2);
    let text = tb.status(2, &["connections"]).must("status connections");
    assert!(
        text.starts_with("-> 192.168.48.11:6783") && text.contains(" established fastdp "),
        "{text}"
    );
    let peers = tb.status(1, &["peers"]).must("status peers");
    for n in [1u8, 2] {
        let h = tb.host(n).must("host");
        assert!(
            peers.contains(&format!("{}({})", h.peer_name(), h.nickname())),
            "{peers}"
        );
    }
    let summary = tb.status(1, &[]).must("status");
    assert!(
        summary.contains("Peers: 2 (with 2 established connections)"),
        "{summary}"
    );
    // The traffic went through the kernel: the fast datapath counted it.
    let c1 = wait_connection(&tb, 1, 2, ESTABLISH, |c| {
        c["rx_packets"].as_u64().unwrap_or(0) > 0
    });
    assert!(c1["tx_packets"].as_u64().unwrap_or(0) > 0, "{c1}");
}

/// A weft told only one address finds the rest of the mesh through gossip: hosts 2
/// and 3 each know only host 1 and end up connected to each other.
#[test]
fn peers_are_discovered_through_gossip() {
    let bin = agent_bin();
    let mut tb = bed(3, 1);
    tb.start_mesh_agent(1, &bin, &[], &[]).must("agent 1");
    tb.start_mesh_agent(2, &bin, &[1], &[]).must("agent 2");
    tb.start_mesh_agent(3, &bin, &[1], &[]).must("agent 3");
    wait_connection(&tb, 2, 3, ESTABLISH, established_over("fastdp"));
    wait_connection(&tb, 3, 2, ESTABLISH, established_over("fastdp"));
    check_pods(&tb, 2, 3);
    let s = tb.status_json(2).must("status");
    assert_eq!(
        s["peers"].as_array().map(Vec::len),
        Some(3),
        "host2 knows all three peers: {s:#}"
    );
}
