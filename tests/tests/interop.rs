//! Interop: weft hosts and a host using the Linux kernel's own VXLAN devices with
//! Weave's fast-datapath layout share one overlay. Need root and `WEFT_AGENT_BIN`.

mod common;

use common::{FIRST_CONTACT, Must, agent_bin, bed, start_agents};
use weft_testbed::{ping, tcp_transfer, wait_ping};

#[test]
fn kernel_vxlan_host_talks_to_weft_hosts() {
    let bin = agent_bin();
    let mut tb = bed(3, 1);
    tb.make_kernel_vxlan_host(3, &[1, 2])
        .must("kernel VXLAN host3");
    start_agents(&mut tb, &bin, &[1, 2]);
    let pods: Vec<_> = tb.pods().cloned().collect();
    let (w1, w2, k3) = (&pods[0], &pods[1], &pods[2]);
    for (a, b) in [(k3, w1), (k3, w2), (w1, k3), (w2, k3), (w1, w2)] {
        wait_ping(a, b.addr, FIRST_CONTACT).must(&format!(
            "first contact {} -> {}",
            a.label(),
            b.label()
        ));
        let r = ping(a, b.addr, 5).must(&format!("{} -> {}", a.label(), b.label()));
        assert_eq!(
            r.received,
            5,
            "{} -> {}: every echo answered: {r:?}",
            a.label(),
            b.label()
        );
    }
    for (a, b) in [(k3, w1), (w2, k3)] {
        let t = tcp_transfer(a, b, 8 << 20).must(&format!("TCP {} -> {}", a.label(), b.label()));
        assert_eq!(t.bytes_received, 8 << 20);
    }
    for n in [1u8, 2] {
        let s = tb.status_json(n).must("status --json");
        let conns = s["connections"]
            .as_array()
            .unwrap_or_else(|| panic!("host{n}: no connections in {s}"));
        let k = conns
            .iter()
            .find(|c| c["short_id"] == 3)
            .unwrap_or_else(|| {
                panic!("host{n}: no connection to the kernel host (short_id 3): {s}")
            });
        assert_eq!(
            k["state"], "established",
            "host{n}: frames from the kernel host were decapsulated: {k}"
        );
    }
}
