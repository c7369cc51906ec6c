//! Tests of the testbed itself (no agent needed): underlay, bridge, kernel-VXLAN hosts
//! laid out like Weave's fast datapath, teardown and stale cleanup. Need root.

mod common;

use std::time::Duration;

use common::{Must, bed, require_root};
use weft_common::wire::{VXLAN_PORT, Vxlan, vni};
use weft_testbed::{Testbed, capture_vxlan, cleanup_stale, ns_exec, ping, serial, tcp_transfer};

#[test]
fn hosts_reach_each_other_on_the_underlay() {
    let tb = bed(3, 0);
    for a in tb.hosts() {
        for b in tb.hosts() {
            if a.n != b.n {
                ns_exec(
                    &a.ns,
                    &["ping", "-n", "-c", "1", "-W", "2", &b.addr.to_string()],
                )
                .must(&format!("host{} -> host{} underlay ping", a.n, b.n));
            }
        }
    }
    let mtu = ns_exec(
        &tb.host(1).must("host").ns,
        &["cat", "/sys/class/net/eth0/mtu"],
    )
    .must("mtu");
    assert_eq!(mtu.trim(), "1500", "host eth0 MTU");
}

#[test]
fn pods_on_one_host_talk_through_the_weave_bridge() {
    let tb = bed(1, 2);
    let (p1, p2) = (
        tb.pod(1, 1).must("pod").clone(),
        tb.pod(1, 2).must("pod").clone(),
    );
    let r = ping(&p1, p2.addr, 3).must("same-host pod ping");
    assert_eq!(r.received, 3, "all pings answered: {r:?}");
    let mtu = weft_testbed::pod_exec(&p1, &["cat", "/sys/class/net/eth0/mtu"]).must("pod mtu");
    assert_eq!(mtu.trim(), "1376", "pod eth0 MTU");
    let master = ns_exec(
        &tb.host(1).must("host").ns,
        &["ip", "-o", "link", "show", "master", "weave"],
    )
    .must("bridge ports");
    assert!(
        master.contains("vethwepl1") && master.contains("vethwepl2"),
        "ports of weave: {master}"
    );
}

#[test]
fn kernel_vxlan_hosts_use_weave_vnis() {
    let mut tb = bed(2, 1);
    tb.make_kernel_vxlan_host(1, &[2])
        .must("kernel vxlan host1");
    tb.make_kernel_vxlan_host(2, &[1])
        .must("kernel vxlan host2");
    let (p1, p2) = (
        tb.pod(1, 1).must("pod").clone(),
        tb.pod(2, 1).must("pod").clone(),
    );
    let host1 = tb.host(1).must("host").clone();
    let packets = capture_vxlan(&host1, tb.dir(), 6, Duration::from_secs(3), || {
        ping(&p1, p2.addr, 3).map(drop)
    })
    .must("capture");
    let mut requests = 0;
    let mut replies = 0;
    for p in &packets {
        let v = Vxlan::new_checked(&p.data).expect("captured frame is VXLAN");
        assert_eq!(v.dst_port(), VXLAN_PORT);
        assert_eq!(v.ttl(), 64, "outer TTL");
        assert!(v.dont_fragment(), "outer DF");
        assert_eq!(v.udp_checksum(), 0, "outer UDP checksum");
        let inner = v.inner();
        if inner.len() >= 34 && inner[12..14] == [0x08, 0x00] && inner[23] == 1 {
            match inner[34] {
                8 => {
                    requests += 1;
                    assert_eq!(v.vni(), vni(2, 1), "VNI of host1 -> host2");
                    assert_eq!(v.src_ip(), [192, 168, 48, 11]);
                }
                0 => {
                    replies += 1;
                    assert_eq!(v.vni(), vni(1, 2), "VNI of host2 -> host1");
                    assert_eq!(v.src_ip(), [192, 168, 48, 12]);
                }
                t => panic!("unexpected ICMP type {t}"),
            }
        }
    }
    assert!(
        requests >= 1 && replies >= 1,
        "expected echo requests and replies on the wire, got {requests}/{replies} in {} packets",
        packets.len()
    );
    let t = tcp_transfer(&p1, &p2, 8 << 20).must("tcp over kernel vxlan");
    assert!(t.bytes_received >= 8 << 20);
}

#[test]
fn kernel_vxlan_mesh_of_three_floods_without_loops() {
    let mut tb = bed(3, 1);
    tb.make_kernel_vxlan_host(1, &[2, 3]).must("host1");
    tb.make_kernel_vxlan_host(2, &[1, 3]).must("host2");
    tb.make_kernel_vxlan_host(3, &[1, 2]).must("host3");
    let pods: Vec<_> = tb.pods().cloned().collect();
    for a in &pods {
        for b in &pods {
            if a.host != b.host {
                let r = ping(a, b.addr, 2).must(&format!("{} -> {}", a.label(), b.label()));
                assert_eq!(r.received, 2, "{} -> {}: {r:?}", a.label(), b.label());
            }
        }
    }
    // A broadcast from one pod reaches each other host exactly once: the ARP cache of
    // a fresh pod learns one MAC per address (no duplicates would show otherwise, so
    // count frames instead on host3's underlay).
    let host3 = tb.host(3).must("host").clone();
    let (p1, p3) = (pods[0].clone(), pods[2].clone());
    weft_testbed::pod_exec(&p1, &["ip", "neigh", "flush", "all"]).must("flush");
    let packets = capture_vxlan(&host3, tb.dir(), 20, Duration::from_secs(2), || {
        ping(&p1, p3.addr, 1).map(drop)
    })
    .must("capture");
    let arp_requests = packets
        .iter()
        .filter_map(|p| Vxlan::new_checked(&p.data).ok())
        .filter(|v| {
            v.inner().len() >= 22
                && v.inner()[12..14] == [0x08, 0x06]
                && v.inner()[20..22] == [0, 1]
        })
        .filter(|v| v.dst_ip() == [192, 168, 48, 13])
        .count();
    assert_eq!(
        arp_requests, 1,
        "ARP broadcast from host1 must reach host3 once (split horizon)"
    );
}

#[test]
fn drop_removes_every_namespace() {
    require_root();
    let _g = serial();
    let tb = Testbed::with_hosts(2, 2).must("testbed");
    let prefix = tb.prefix().to_string();
    let dir = tb.dir().to_path_buf();
    assert!(
        netns_with_prefix(&prefix).len() == 7,
        "ul + 2 hosts + 4 pods: {:?}",
        netns_with_prefix(&prefix)
    );
    drop(tb);
    assert_eq!(
        netns_with_prefix(&prefix),
        Vec::<String>::new(),
        "namespaces left after drop"
    );
    assert!(!dir.exists(), "{} left after drop", dir.display());
}

#[test]
fn cleanup_stale_removes_dead_runs_only() {
    require_root();
    let _g = serial();
    // A pid above any pid_max: certainly dead.
    let stale = "wt999999999-0-h1";
    let live = format!("wt{}-999-h1", std::process::id());
    for ns in [stale, live.as_str()] {
        weft_testbed::cmd::run_args("ip", &["netns", "add", ns]).must("add ns");
    }
    let removed = cleanup_stale("wt").must("cleanup");
    let left = netns_with_prefix("wt");
    let _ = weft_testbed::cmd::run_args("ip", &["netns", "delete", &live]);
    assert!(
        removed.iter().any(|r| r.contains(stale)),
        "removed: {removed:?}"
    );
    assert!(
        !left.contains(&stale.to_string()),
        "stale namespace still there"
    );
    assert!(
        left.contains(&live),
        "a live process's namespace was removed"
    );
}

fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.retain(|n| n.starts_with(prefix));
    v.sort();
    v
}
