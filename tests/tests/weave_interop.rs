//! Interop with a real Weave Net 2.8.1 router (`weaver`, path in `WEFT_WEAVER`). Without
//! that variable every test prints a `SKIPPED: ...` line and passes. Needs root.

mod common;

use std::time::Duration;

use common::{FIRST_CONTACT, Must, agent_bin, bed, established_over, wait_connection};
use weft_testbed::{
    Testbed, WeaveConnection, WeaverOptions, kernel_has_esp, kernel_has_openvswitch, ping,
    skip_without_weaver, start_weaver_pair, tcp_transfer, wait_ping, weaver_path,
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

/// Waits until weaver on host `n` shows its connection to host `peer` established
/// and returns it.
fn weaver_established(tb: &mut Testbed, n: u8, peer: u8) -> WeaveConnection {
    let name = tb.host(peer).must("host").peer_name();
    tb.weaver_mut(n)
        .must("weaver")
        .wait_connection_established(&name, ESTABLISH)
        .must(&format!("weaver on host {n}: connection to host {peer}"))
}

/// Starts weft on host `n` in mesh mode with `peers`, and the password in a file
/// if there is one.
fn start_weft(tb: &mut Testbed, n: u8, peers: &[u8], password: Option<&str>) {
    let bin = agent_bin();
    let file = tb.dir().join(format!("h{n}.password"));
    let mut extra = Vec::new();
    if let Some(pw) = password {
        std::fs::write(&file, format!("{pw}\n")).expect("writing the password file");
        extra = vec!["--password-file".to_owned(), file.display().to_string()];
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    tb.start_mesh_agent(n, &bin, peers, &extra)
        .must(&format!("weft on host {n}"));
}

/// weaver <-> weft, without and with a password, dialled both ways: both ends show
/// the connection established over sleeve (encrypted with the password, MTUs as
/// Weave's: 1438 plain, 1414 encrypted), weaver lists the weft peer with its
/// connection (from weft's gossip), pods ping and carry TCP both ways.
#[test]
fn weaver_and_weft_over_sleeve() {
    if skip_without_weaver("weaver_and_weft_over_sleeve") {
        return;
    }
    let weaver = weaver_path().expect("checked by skip_without_weaver");
    let mut tb = bed(4, 1);
    // Hosts 1 (weaver) and 2 (weft dials it), no password; hosts 3 (weft) and
    // 4 (weaver dials it), password.
    for (weaver_host, weft_host, password) in [(1u8, 2u8, None), (4, 3, Some("secret"))] {
        let what = format!(
            "weaver on {weaver_host}, weft on {weft_host}, password {}",
            password.is_some()
        );
        let mut opts = WeaverOptions::new();
        if let Some(pw) = password {
            opts = opts.password(pw);
        }
        if weaver_host == 1 {
            tb.start_weaver(weaver_host, &weaver, &opts).must(&what);
            start_weft(&mut tb, weft_host, &[weaver_host], password);
        } else {
            start_weft(&mut tb, weft_host, &[], password);
            let addr = tb.host(weft_host).must("host").addr;
            tb.start_weaver(weaver_host, &weaver, &opts.peer(addr))
                .must(&what);
        }
        let at_weaver = weaver_established(&mut tb, weaver_host, weft_host);
        eprintln!("{what}: weaver says {}", at_weaver.line);
        assert_eq!(at_weaver.overlay.as_deref(), Some("sleeve"), "{what}");
        assert_eq!(at_weaver.encrypted, password.is_some(), "{what}");
        let mtu = if password.is_some() { 1414 } else { 1438 };
        assert_eq!(at_weaver.mtu, Some(mtu), "{what}: {}", at_weaver.line);
        let at_weft = wait_connection(
            &tb,
            weft_host,
            weaver_host,
            ESTABLISH,
            established_over("sleeve"),
        );
        eprintln!("{what}: weft says {at_weft}");
        assert_eq!(
            at_weft["encrypted"],
            password.is_some(),
            "{what}: {at_weft}"
        );
        assert_eq!(at_weft["mtu"], mtu, "{what}: {at_weft}");
        assert_eq!(
            at_weft["direction"],
            if weaver_host == 1 {
                "outbound"
            } else {
                "inbound"
            },
            "{what}"
        );
        check_pods(&tb, (weaver_host, weft_host), &what);
        // weaver lists the weft peer and the connection weft reports.
        let peers = tb
            .weaver(weaver_host)
            .must("weaver")
            .status_text("/status/peers")
            .must("peers");
        let weft_peer = tb.host(weft_host).must("host");
        let label = format!("{}({})", weft_peer.peer_name(), weft_peer.nickname());
        assert!(peers.contains(&label), "{what}: weaver lists weft: {peers}");
        let weft_block = peers.split(&label).nth(1).unwrap_or_default();
        assert!(
            weft_block.contains("established"),
            "{what}: weft's own connection, as gossiped: {peers}"
        );
    }
}

/// A mixed mesh of three: weaver on host 1, wefts on hosts 2 and 3 told only the
/// weaver's address. weft 3 finds weft 2 through the weaver's gossip; wefts talk
/// over the fast datapath, weft and weaver over sleeve; pods reach each other.
#[test]
fn mixed_mesh_of_weaver_and_wefts() {
    if skip_without_weaver("mixed_mesh_of_weaver_and_wefts") {
        return;
    }
    let weaver = weaver_path().expect("checked by skip_without_weaver");
    let mut tb = bed(3, 1);
    tb.start_weaver(1, &weaver, &WeaverOptions::new())
        .must("weaver");
    start_weft(&mut tb, 2, &[1], None);
    start_weft(&mut tb, 3, &[1], None);
    for n in [2u8, 3] {
        wait_connection(&tb, n, 1, ESTABLISH, established_over("sleeve"));
        weaver_established(&mut tb, 1, n);
    }
    wait_connection(&tb, 2, 3, ESTABLISH, established_over("fastdp"));
    wait_connection(&tb, 3, 2, ESTABLISH, established_over("fastdp"));
    check_pods(&tb, (2, 3), "weft <-> weft");
    check_pods(&tb, (1, 3), "weaver <-> weft");
    let summary = tb.status(2, &[]).must("status");
    assert!(summary.contains("Peers: 3"), "{summary}");
}

/// weaver with its own fast datapath (openvswitch) and weft, without and then with a
/// password: both ends show the connection established over fastdp (encrypted with
/// IPsec ESP with the password: weaver's SAs one way, weft's the other), MTU 1376,
/// pods ping and carry TCP both ways. Needs openvswitch (and ESP for the password
/// half) in the kernel: the VM of `cargo xtask vm-test` has both.
#[test]
fn weaver_and_weft_over_fastdp() {
    if skip_without_weaver("weaver_and_weft_over_fastdp") {
        return;
    }
    if !kernel_has_openvswitch() {
        eprintln!(
            "SKIPPED weaver_and_weft_over_fastdp: this kernel has no openvswitch (weaver's \
             fast datapath); it runs in the VM of `cargo xtask vm-test`"
        );
        return;
    }
    let weaver = weaver_path().expect("checked by skip_without_weaver");
    let esp = kernel_has_esp();
    let mut tb = bed(4, 1);
    for (weaver_host, weft_host, password) in [(1u8, 2u8, None), (4, 3, Some("secret"))] {
        if password.is_some() && !esp {
            eprintln!("SKIPPED the encrypted half of weaver_and_weft_over_fastdp: no ESP");
            continue;
        }
        let what = format!(
            "fastdp: weaver on {weaver_host}, weft on {weft_host}, password {}",
            password.is_some()
        );
        let mut opts = WeaverOptions::new().fastdp(true);
        if let Some(pw) = password {
            opts = opts.password(pw);
        }
        tb.start_weaver(weaver_host, &weaver, &opts).must(&what);
        start_weft(&mut tb, weft_host, &[weaver_host], password);
        let at_weft = wait_connection(
            &tb,
            weft_host,
            weaver_host,
            ESTABLISH,
            established_over("fastdp"),
        );
        eprintln!("{what}: weft says {at_weft}");
        assert_eq!(at_weft["encrypted"], password.is_some(), "{what}");
        let deadline = std::time::Instant::now() + ESTABLISH;
        let at_weaver = loop {
            let c = weaver_established(&mut tb, weaver_host, weft_host);
            if c.overlay.as_deref() == Some("fastdp") || std::time::Instant::now() > deadline {
                break c;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        eprintln!("{what}: weaver says {}", at_weaver.line);
        assert_eq!(at_weaver.overlay.as_deref(), Some("fastdp"), "{what}");
        assert_eq!(at_weaver.encrypted, password.is_some(), "{what}");
        assert_eq!(at_weaver.mtu, Some(1376), "{what}: {}", at_weaver.line);
        check_pods(&tb, (weaver_host, weft_host), &what);
        let s = tb.status_json(weft_host).must("status");
        assert!(
            s["connections"][0]["rx_packets"].as_u64().unwrap_or(0) > 0,
            "{what}: weft's fast datapath carried it: {s:#}"
        );
    }
}
