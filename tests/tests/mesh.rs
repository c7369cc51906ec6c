//! weft as a peer of a Weave mesh (`weft run [PEER...]`): weft <-> weft meshes
//! without and with a password, peers found through gossip, the overlay each
//! connection uses and status built from the mesh. Need root and `WEFT_AGENT_BIN`.

mod common;

use std::time::{Duration, Instant};

use common::{FIRST_CONTACT, Firewall, Must, agent_bin, bed, established_over, wait_connection};
use serde_json::Value;
use weft_testbed::{Testbed, ns_exec, ping, ping_stream, tcp_transfer, wait_ping};

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
    // Split horizon: neither overlay port forwards to the other.
    let host1 = tb.host(1).must("host").ns.clone();
    for port in ["weft-vxlan", "weft-sleeve"] {
        let link = ns_exec(&host1, &["bridge", "-d", "link", "show", "dev", port]).must("bridge");
        assert!(link.contains("isolated on"), "{port}: {link}");
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

/// Waits until hosts 1 and 2 each show their connection to the other on `overlay`.
fn wait_both_over(tb: &Testbed, overlay: &'static str) {
    for n in [1u8, 2] {
        wait_connection(
            tb,
            n,
            3 - n,
            Duration::from_secs(10),
            established_over(overlay),
        );
    }
}

/// Writes `password` to a file in the testbed and returns the agent arguments that
/// name it.
fn password_args(tb: &Testbed, n: u8, password: &str) -> Vec<String> {
    let file = tb.dir().join(format!("h{n}.password"));
    std::fs::write(&file, password).expect("writing the password file");
    vec!["--password-file".to_owned(), file.display().to_string()]
}

/// With a password on a kernel without ESP (this machine's), two wefts connect
/// encrypted; the fast datapath (it would need ESP) is not offered, so the connection
/// uses the encrypted sleeve: no pod traffic crosses the underlay in plaintext, and
/// the fast datapath carries nothing. (With ESP: `tests/ipsec.rs`.)
#[test]
fn password_mesh_uses_the_encrypted_sleeve() {
    let bin = agent_bin();
    if weft_testbed::kernel_has_esp() {
        eprintln!(
            "SKIPPED password_mesh_uses_the_encrypted_sleeve: this kernel has ESP, so the \
             fast datapath is encrypted and used (see tests/ipsec.rs)"
        );
        return;
    }
    let mut tb = bed(2, 1);
    for (n, peers) in [(1u8, &[][..]), (2, &[1u8][..])] {
        let args = password_args(&tb, n, "correct horse");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tb.start_mesh_agent(n, &bin, peers, &args)
            .must(&format!("agent {n}"));
    }
    for (n, peer) in [(1u8, 2u8), (2, 1)] {
        let c = wait_connection(&tb, n, peer, ESTABLISH, established_over("sleeve"));
        assert_eq!(c["encrypted"], true, "host{n}: {c}");
        assert_eq!(c["mtu"], 1414, "host{n}: Weave's encrypted sleeve MTU: {c}");
    }
    check_pods(&tb, 1, 2);
    let text = tb.status(1, &["connections"]).must("status connections");
    assert!(text.contains(" established encrypted   sleeve "), "{text}");
    let summary = tb.status(1, &[]).must("status");
    assert!(summary.contains("Encryption: enabled"), "{summary}");
    let s = tb.status_json(1).must("status");
    let c = &s["connections"][0];
    assert_eq!(c["tx_packets"], 0, "nothing on the fast datapath: {c}");
    assert!(
        c["sleeve"]["rx_packets"].as_u64().unwrap_or(0) > 0,
        "the sleeve carried it: {c}"
    );
    // Plaintext VXLAN from host2's address, well formed for host1 (the VNI names
    // both ShortIDs), is dropped and counted: the overlay is encrypted, so nothing
    // may enter host1's bridge that way.
    let id = |n: u8| {
        tb.status_json(n).must("status")["short_id"]
            .as_u64()
            .expect("short_id") as u32
    };
    let v = (id(1) << 12) | id(2);
    let inner = weft_testbed::synthetic::inner_frame([0xff; 6], [0x02, 0xee, 0, 0, 0, 0x51], 32);
    let mut datagram = vec![0x08, 0, 0, 0, (v >> 16) as u8, (v >> 8) as u8, v as u8, 0];
    datagram.extend_from_slice(&inner);
    let host2 = tb.host(2).must("host").ns.clone();
    let send = weft_testbed::netns::spawn_in(&host2, move || {
        let sock = std::net::UdpSocket::bind("192.168.48.12:0")?;
        sock.send_to(&datagram, ("192.168.48.11", 6784))?;
        Ok(())
    });
    weft_testbed::netns::join(send, "send").must("plaintext VXLAN");
    let deadline = Instant::now() + Duration::from_secs(5);
    while tb.status_json(1).must("status")["counters"]["drop_no_fastdp"] != 1 {
        assert!(
            Instant::now() < deadline,
            "plaintext VXLAN not counted: {:#}",
            tb.status_json(1).must("status")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let host1 = tb.host(1).must("host").ns.clone();
    let fdb = ns_exec(&host1, &["bridge", "fdb", "show", "br", "weave"]).must("fdb");
    assert!(
        !fdb.contains("02:ee:00:00:00:51"),
        "reached the bridge: {fdb}"
    );
    // The password never shows.
    for n in [1u8, 2] {
        assert!(!tb.agent_log(n).contains("correct horse"), "host{n}: log");
        assert!(!s.to_string().contains("correct horse"));
    }
}

/// A wrong password is refused with a clear reason in status and the log, and the
/// agents carry on (no crash, the target retried); garbage on TCP 6783 and UDP 6783
/// is refused and counted, never fatal.
#[test]
fn wrong_password_and_garbage_are_refused_not_fatal() {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    let a1 = password_args(&tb, 1, "one");
    let a2 = password_args(&tb, 2, "two");
    let a1: Vec<&str> = a1.iter().map(String::as_str).collect();
    let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
    tb.start_mesh_agent(1, &bin, &[], &a1).must("agent 1");
    tb.start_mesh_agent(2, &bin, &[1], &a2).must("agent 2");
    let deadline = Instant::now() + ESTABLISH;
    let reason = loop {
        let s = tb.status_json(2).must("status");
        if let Some(t) = s["target_states"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["last_error"].is_string()))
        {
            break t["last_error"].as_str().unwrap_or_default().to_owned();
        }
        assert!(Instant::now() < deadline, "no failure reported: {s:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(reason.contains("Unable to decrypt TCP msg"), "{reason}");
    let text = tb.status(2, &["connections"]).must("status connections");
    assert!(
        text.contains("192.168.48.11:6783") && text.contains("Unable to decrypt TCP msg"),
        "{text}"
    );
    assert!(
        tb.agent_log(1).contains("Unable to decrypt TCP msg")
            || tb.agent_log(2).contains("Unable to decrypt TCP msg"),
        "logged"
    );
    // Garbage from host 2's namespace at host 1's mesh ports.
    let host2 = tb.host(2).must("host").ns.clone();
    ns_exec(
        &host2,
        &[
            "bash",
            "-c",
            "head -c 3000 /dev/urandom > /dev/tcp/192.168.48.11/6783 2>/dev/null; \
             for i in 1 2 3 4 5; do head -c 500 /dev/urandom > /dev/udp/192.168.48.11/6783; done; true",
        ],
    )
    .must("garbage");
    // The status snapshot is refreshed twice a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(tb.agent_running(1), "agent 1 survived");
        let s = tb.status_json(1).must("status after garbage");
        let drops: u64 = s["sleeve_counters"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        if drops >= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "garbage datagrams counted: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Blocking UDP 6784 between two wefts moves their connection to the sleeve within
/// 3 s, and unblocking moves it back within 5 s, without restarting anything, while
/// a ping stream runs; pings get through on either overlay.
#[test]
fn blocked_fast_path_falls_back_to_sleeve_and_returns() {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    tb.start_mesh_agent(1, &bin, &[], &[]).must("agent 1");
    tb.start_mesh_agent(2, &bin, &[1], &[]).must("agent 2");
    wait_connection(&tb, 1, 2, ESTABLISH, established_over("fastdp"));
    wait_connection(&tb, 2, 1, ESTABLISH, established_over("fastdp"));
    let (p1, p2) = (
        tb.pod(1, 1).must("pod").clone(),
        tb.pod(2, 1).must("pod").clone(),
    );
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("first contact");
    let stream = {
        let (p1, p2) = (p1.clone(), p2.clone());
        std::thread::spawn(move || ping_stream(&p1, p2.addr, 1200, Duration::from_millis(10)))
    };
    std::thread::sleep(Duration::from_secs(1));
    let host1 = tb.host(1).must("host").ns.clone();
    let blocked = Instant::now();
    let fw = Firewall::drop(&host1, &["udp dport 6784"], &["udp dport 6784"]);
    wait_both_over(&tb, "sleeve");
    let to_sleeve = blocked.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let unblocked = Instant::now();
    fw.remove();
    wait_both_over(&tb, "fastdp");
    let to_fastdp = unblocked.elapsed();
    let r = stream.join().expect("ping thread").must("ping stream");
    eprintln!(
        "fastdp -> sleeve in {to_sleeve:?}, sleeve -> fastdp in {to_fastdp:?}; ping stream: \
         {}/{} answered",
        r.received, r.transmitted
    );
    assert!(
        to_sleeve <= Duration::from_secs(3),
        "to sleeve: {to_sleeve:?}"
    );
    assert!(to_fastdp <= Duration::from_secs(5), "back: {to_fastdp:?}");
    // Blocked one way only (host1 drops what comes in): both ends move to the
    // sleeve (host2 still hears host1, but host1's heartbeats say it hears nothing).
    let one_way = Instant::now();
    let fw = Firewall::drop(&host1, &["udp dport 6784"], &[]);
    wait_both_over(&tb, "sleeve");
    let one_way_to_sleeve = one_way.elapsed();
    check_pods(&tb, 1, 2);
    fw.remove();
    eprintln!("one-way block: both ends on the sleeve in {one_way_to_sleeve:?}");
    // One heartbeat interval more than the two-way case: host2 learns of it from
    // host1's next heartbeat after host1's own timeout.
    assert!(
        one_way_to_sleeve <= Duration::from_millis(3500),
        "one-way: {one_way_to_sleeve:?}"
    );
    // Only the detection window may lose pings: at 10 ms, 3 s is 300.
    assert!(
        r.transmitted - r.received <= 300,
        "lost more than the detection window: {r:?}; host1: {:#}\nhost2: {:#}",
        tb.status_json(1).unwrap_or_default(),
        tb.status_json(2).unwrap_or_default()
    );
    check_pods(&tb, 1, 2);
}

/// Without `--name`, the name is derived as Weave derives it and is the same after a
/// restart (it shows in status; peers know the host by it).
#[test]
fn default_name_is_stable_across_restarts() {
    let bin = agent_bin();
    let mut tb = bed(1, 1);
    let mut args = tb.mesh_agent_args(1, &[], &[]).must("args");
    let at = args.iter().position(|a| a == "--name").expect("--name");
    args.drain(at..at + 2);
    let mut names = Vec::new();
    for _ in 0..2 {
        tb.start_agent_with_args(1, &bin, &args).must("agent");
        let s = tb.status_json(1).must("status");
        names.push(s["name"].as_str().expect("name").to_owned());
        tb.stop_agent(1).must("stop");
    }
    assert_eq!(names[0], names[1], "the same name after a restart");
    let first = u8::from_str_radix(&names[0][..2], 16).expect("hex");
    assert_eq!(
        first & 0x03,
        0x02,
        "a locally administered unicast MAC: {}",
        names[0]
    );
}
