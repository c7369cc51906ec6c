//! Interop with a real Weave Net 2.8.1 router (`weaver`, path in `WEFT_WEAVER`). Without
//! that variable every test prints a `SKIPPED: ...` line and passes. Needs root.

mod common;

use std::time::Duration;

use common::{FIRST_CONTACT, Must, bed};
use weft_testbed::{
    Testbed, ping, skip_without_weaver, start_weaver_pair, tcp_transfer, wait_ping, weaver_path,
};

/// How long two weavers may take to show each other `established`.
const ESTABLISH: Duration = Duration::from_secs(30);

/// Two weavers, no password on hosts 1 and 2, password `secret` on hosts 3 and 4,
/// in one testbed with one pod per host. Each pair shows its connection established
/// over sleeve (encrypted with the password); pods ping each other both ways and a
/// TCP transfer goes through each pair. Proves the weaver harness itself.
#[test]
fn weaver_to_weaver_sleeve() {
    if skip_without_weaver("weaver_to_weaver_sleeve") {
        return;
    }
    let bin = weaver_path().expect("checked by skip_without_weaver");
    let mut tb = bed(4, 1);
    for (pair, password) in [((1u8, 2u8), None), ((3, 4), Some("secret"))] {
        let what = format!("weavers on hosts {pair:?}, password {}", password.is_some());
        let (ca, cb) = start_weaver_pair(&mut tb, &bin, pair, password, ESTABLISH).must(&what);
        for c in [&ca, &cb] {
            eprintln!("{what}: {}", c.line);
            assert_eq!(c.overlay.as_deref(), Some("sleeve"), "{what}: {}", c.line);
            assert_eq!(c.encrypted, password.is_some(), "{what}: {}", c.line);
            // Sleeve MTU: 1438 plain, 1414 encrypted (the underlay's 1500 less headers).
            let mtu = if password.is_some() { 1414 } else { 1438 };
            assert_eq!(c.mtu, Some(mtu), "{what}: {}", c.line);
        }
        assert!(
            ca.outbound != cb.outbound,
            "{what}: one side dialled, the other accepted: {ca:?} {cb:?}"
        );
        check_pods(&tb, pair, &what);
    }
    // Encrypted and plain routers do not mesh: host 2 lists no connection to host 3.
    let conns = tb
        .weaver(2)
        .must("weaver 2")
        .connections()
        .must("connections");
    assert!(
        conns
            .iter()
            .all(|c| c.peer_name.as_deref() != Some(&tb.host(3).must("host").peer_name())),
        "plain and encrypted weavers stay apart: {conns:?}"
    );
    let report = tb.weaver(3).must("weaver 3").report_json().must("report");
    assert_eq!(
        report["Router"]["Name"],
        tb.host(3).must("host").peer_name(),
        "/report names the router: {report}"
    );
    let status = tb
        .weaver(1)
        .must("weaver 1")
        .status_text("/status")
        .must("status");
    assert!(
        status.contains("Version: 2.8.1"),
        "a 2.8.1 router: {status}"
    );
}

/// Pods of hosts `a` and `b` ping each other both ways, and 8 MiB go each way by TCP.
fn check_pods(tb: &Testbed, (a, b): (u8, u8), what: &str) {
    let pa = tb.pod(a, 1).must("pod").clone();
    let pb = tb.pod(b, 1).must("pod").clone();
    for (x, y) in [(&pa, &pb), (&pb, &pa)] {
        let dir = format!("{what}: {} -> {}", x.label(), y.label());
        wait_ping(x, y.addr, FIRST_CONTACT).must(&format!("first contact {dir}"));
        let r = ping(x, y.addr, 5).must(&dir);
        assert_eq!(r.received, 5, "{dir}: every echo answered: {r:?}");
        let t = tcp_transfer(x, y, 8 << 20).must(&format!("TCP {dir}"));
        assert_eq!(t.bytes_received, 8 << 20, "{dir}");
        eprintln!(
            "{dir}: {:.3} ms mean ping, TCP {:.0} Mbit/s",
            r.mean_rtt_ms().unwrap_or(f64::NAN),
            t.bits_per_second / 1e6
        );
    }
}
