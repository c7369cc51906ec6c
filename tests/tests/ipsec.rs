//! The encrypted fast datapath (IPsec ESP through XFRM): with a password, two wefts
//! carry pod traffic over ESP where the kernel has it, and over the encrypted sleeve,
//! saying why, where it has not. Need root and `WEFT_AGENT_BIN`; the ESP tests need
//! a kernel with ESP and `rfc4106(gcm(aes))` (they run in the VM of
//! `cargo xtask vm-test`, and print a `SKIPPED` line elsewhere).

mod common;

use std::time::{Duration, Instant};

use common::{FIRST_CONTACT, Firewall, Must, agent_bin, bed, established_over, wait_connection};
use weft_testbed::{
    Testbed, attached_programs, kernel_has_esp, ns_exec, ping, ping_stream, tcp_transfer, wait_ping,
};

/// How long a mesh connection may take to be established (the VM is slow).
const ESTABLISH: Duration = Duration::from_secs(30);

fn password_args(tb: &Testbed, n: u8, extra: &[&str]) -> Vec<String> {
    let file = tb.dir().join(format!("h{n}.password"));
    std::fs::write(&file, "correct horse").expect("writing the password file");
    let mut args = vec!["--password-file".to_owned(), file.display().to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn start(tb: &mut Testbed, n: u8, peers: &[u8], extra: &[&str]) {
    let bin = agent_bin();
    let args = password_args(tb, n, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.start_mesh_agent(n, &bin, peers, &args)
        .must(&format!("agent {n}"));
}

/// Starts agents with a password on hosts 1 and 2 (host 2 told host 1's address,
/// both given `extra`) and waits until each shows its connection established over
/// `overlay`; returns the two connections as host 1 and host 2 report them.
fn start_pair(tb: &mut Testbed, extra: &[&str], overlay: &'static str) -> [serde_json::Value; 2] {
    start(tb, 1, &[], extra);
    start(tb, 2, &[1], extra);
    [(1u8, 2u8), (2, 1)]
        .map(|(n, peer)| wait_connection(tb, n, peer, ESTABLISH, established_over(overlay)))
}

/// Pods of hosts 1 and 2 ping each other and carry TCP both ways.
fn check_pods(tb: &Testbed) {
    let (p1, p2) = (
        tb.pod(1, 1).must("pod").clone(),
        tb.pod(2, 1).must("pod").clone(),
    );
    for (from, to) in [(&p1, &p2), (&p2, &p1)] {
        wait_ping(from, to.addr, FIRST_CONTACT).must("first contact");
        let r = ping(from, to.addr, 3).must("ping");
        assert_eq!(r.received, 3, "{} -> {}: {r:?}", from.label(), to.label());
        let t = tcp_transfer(from, to, 2 << 20).must("tcp");
        assert_eq!(t.bytes_received, 2 << 20);
    }
}

/// Counters, on the underlay switch, of what hosts 1 and 2 put on the wire to each
/// other: plaintext fast-datapath VXLAN (UDP 6784) and ESP.
struct WireCounters {
    ns: String,
}

impl WireCounters {
    fn install(tb: &Testbed) -> Self {
        let ns = tb.underlay_ns();
        let mut script = String::from("table netdev weft_wire {\n");
        for n in [1u8, 2] {
            let dev = Testbed::underlay_port(n);
            script.push_str(&format!(
                "  chain h{n} {{ type filter hook ingress device {dev} priority 0;\n\
                 \x20   udp dport 6784 counter name plain{n}\n\
                 \x20   ip protocol esp counter name esp{n}\n  }}\n\
                 \x20 counter plain{n} {{ }}\n  counter esp{n} {{ }}\n"
            ));
        }
        script.push_str("}\n");
        let file = tb.dir().join("wire.nft");
        std::fs::write(&file, script).expect("writing the nft script");
        ns_exec(&ns, &["nft", "-f", &file.display().to_string()]).must("nft counters");
        Self { ns }
    }

    /// Packets counted by counter `name`.
    fn packets(&self, name: &str) -> u64 {
        let out = ns_exec(
            &self.ns,
            &["nft", "list", "counter", "netdev", "weft_wire", name],
        )
        .must("nft list counter");
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in {out:?}"))
    }

    fn plaintext(&self) -> u64 {
        self.packets("plain1") + self.packets("plain2")
    }

    fn esp(&self) -> u64 {
        self.packets("esp1") + self.packets("esp2")
    }
}

/// The SPIs of host `n`'s XFRM states.
fn spis(tb: &Testbed, n: u8) -> Vec<String> {
    let ns = tb.host(n).must("host").ns.clone();
    let out = ns_exec(&ns, &["ip", "xfrm", "state"]).must("ip xfrm state");
    let mut spis: Vec<String> = out
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "spi")
        .map(|w| w[1].to_owned())
        .collect();
    spis.sort();
    spis
}

fn skip_without_esp(test: &str) -> bool {
    if kernel_has_esp() {
        return false;
    }
    eprintln!(
        "SKIPPED {test}: this kernel has no ESP with rfc4106(gcm(aes)); it runs in the VM \
         of `cargo xtask vm-test`"
    );
    true
}

/// With a password on a kernel with ESP: both ends show `established encrypted
/// fastdp`; pods carry traffic; the wire between the hosts carries ESP and not one
/// plaintext VXLAN packet, while the SAs are set up, rekeyed (a 10 ms ping stream
/// loses nothing across rekeys) and while an agent restarts.
#[test]
fn encrypted_fast_datapath_carries_pods_over_esp_only() {
    if skip_without_esp("encrypted_fast_datapath_carries_pods_over_esp_only") {
        return;
    }
    let mut tb = bed(2, 1);
    let wire = WireCounters::install(&tb);
    let rekey = ["--ipsec-rekey-interval", "6"];
    for (n, c) in (1u8..).zip(start_pair(&mut tb, &rekey, "fastdp")) {
        assert_eq!(c["encrypted"], true, "host{n}: {c}");
    }
    let text = tb.status(1, &["connections"]).must("status connections");
    assert!(text.contains(" established encrypted   fastdp "), "{text}");
    // Status shows the SAs: each side's outbound SPI is one the other accepts.
    let ipsec = |n: u8| tb.status_json(n).must("status")["connections"][0]["ipsec"].clone();
    for (a, b) in [(1u8, 2u8), (2, 1)] {
        let (ia, ib) = (ipsec(a), ipsec(b));
        let out = ia["outbound_spi"]
            .as_u64()
            .unwrap_or_else(|| panic!("host{a}: {ia}"));
        let accepted: Vec<u64> = ib["inbound_spis"]
            .as_array()
            .map(|v| v.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        assert!(accepted.contains(&out), "host{a} {ia} -> host{b} {ib}");
    }
    check_pods(&tb);
    let s = tb.status_json(1).must("status");
    assert!(
        s["connections"][0]["rx_packets"].as_u64().unwrap_or(0) > 0,
        "the fast datapath carried it: {s:#}"
    );

    // Rekeys (every 6 s here) while a 10 ms ping stream runs: no loss, new SPIs.
    let before = spis(&tb, 1);
    let (p1, p2) = (
        tb.pod(1, 1).must("pod").clone(),
        tb.pod(2, 1).must("pod").clone(),
    );
    let r = ping_stream(&p1, p2.addr, 1500, Duration::from_millis(10)).must("ping stream");
    let after = spis(&tb, 1);
    eprintln!("SPIs before {before:?}, after {after:?}; ping stream {r:?}");
    assert_eq!(r.received, r.transmitted, "lost across a rekey: {r:?}");
    assert!(
        after.iter().any(|spi| !before.contains(spi)),
        "no new SA after 15 s with a 6 s rekey interval: {before:?} -> {after:?}"
    );

    // An agent restart: the datapath and the SAs stay; nothing leaks meanwhile.
    let stream = {
        let (p1, p2) = (p1.clone(), p2.clone());
        std::thread::spawn(move || ping_stream(&p1, p2.addr, 800, Duration::from_millis(10)))
    };
    std::thread::sleep(Duration::from_secs(1));
    tb.stop_agent(2).must("stop agent 2");
    std::thread::sleep(Duration::from_secs(2));
    start(&mut tb, 2, &[1], &rekey);
    let r = stream.join().expect("ping thread").must("ping stream");
    eprintln!("across a restart of host2's agent: {r:?}");
    wait_connection(&tb, 2, 1, ESTABLISH, established_over("fastdp"));
    check_pods(&tb);

    // Every SA of host1 deleted under a ping stream (the policies stay): the marked
    // traffic meets a policy without an SA and is dropped, never sent in clear; the
    // connection uses the encrypted sleeve meanwhile, and the next rekey (every 6 s
    // here) brings the fast datapath back.
    let stream = {
        let (p1, p2) = (p1.clone(), p2.clone());
        std::thread::spawn(move || ping_stream(&p1, p2.addr, 1000, Duration::from_millis(10)))
    };
    let host1 = tb.host(1).must("host").ns.clone();
    ns_exec(&host1, &["ip", "xfrm", "state", "flush"]).must("ip xfrm state flush");
    let flushed = Instant::now();
    let r = stream.join().expect("ping thread").must("ping stream");
    eprintln!("host1's SAs deleted: {r:?}");
    for (n, peer) in [(1u8, 2u8), (2, 1)] {
        wait_connection(&tb, n, peer, ESTABLISH, established_over("fastdp"));
    }
    eprintln!(
        "back on the fast datapath {:?} after the SAs were deleted",
        flushed.elapsed()
    );
    check_pods(&tb);

    let (plain, esp) = (wire.plaintext(), wire.esp());
    eprintln!("on the wire: {esp} ESP packets, {plain} plaintext UDP 6784");
    assert!(esp > 100, "ESP carried the traffic: {esp}");
    assert_eq!(plain, 0, "plaintext VXLAN crossed the wire");
    // The connection's weft-made state is all there is, and only weft's.
    for n in [1u8, 2] {
        let ns = tb.host(n).must("host").ns.clone();
        let policies = ns_exec(&ns, &["ip", "xfrm", "policy"]).must("ip xfrm policy");
        assert!(policies.contains("action block"), "host{n}: {policies}");
    }
}

/// The hooks of host `n`'s underlay (`eth0`) that carry one of weft's guards.
fn guards(tb: &Testbed, n: u8) -> Vec<String> {
    let ns = tb.host(n).must("host").ns.clone();
    let mut found: Vec<String> = attached_programs(&ns, "eth0")
        .must("attached programs")
        .into_iter()
        // Kernel program names are cut at 15 characters.
        .filter(|p| p.name.starts_with("weft_guard"))
        .map(|p| p.direction.to_owned())
        .collect();
    found.sort();
    found
}

/// With a password on a kernel with ESP, every XFRM policy of host1 flushed under a
/// ping stream (the agent puts them back within a second): the underlay's egress
/// guard drops the marked VXLAN that now leaves untransformed, counts it
/// (`drop_leak_guard`), and not one plaintext VXLAN packet crosses the wire.
#[test]
fn xfrm_policy_flush_leaks_nothing_the_guard_drops_it() {
    if skip_without_esp("xfrm_policy_flush_leaks_nothing_the_guard_drops_it") {
        return;
    }
    let mut tb = bed(2, 1);
    let wire = WireCounters::install(&tb);
    start_pair(&mut tb, &[], "fastdp");
    for n in [1u8, 2] {
        assert_eq!(guards(&tb, n), ["egress", "ingress"], "host{n}: guards");
    }
    check_pods(&tb);
    let (p1, p2) = (
        tb.pod(1, 1).must("pod").clone(),
        tb.pod(2, 1).must("pod").clone(),
    );
    let stream =
        std::thread::spawn(move || ping_stream(&p1, p2.addr, 500, Duration::from_millis(10)));
    std::thread::sleep(Duration::from_secs(1));
    let host1 = tb.host(1).must("host").ns.clone();
    ns_exec(&host1, &["ip", "xfrm", "policy", "flush"]).must("ip xfrm policy flush");
    let r = stream.join().expect("ping thread").must("ping stream");
    eprintln!("host1's XFRM policies flushed: {r:?}");
    for (n, peer) in [(1u8, 2u8), (2, 1)] {
        wait_connection(&tb, n, peer, ESTABLISH, established_over("fastdp"));
    }
    check_pods(&tb);
    let s = tb.status_json(1).must("status");
    let dropped = s["counters"]["drop_leak_guard"].as_u64().unwrap_or(0);
    let (plain, esp) = (wire.plaintext(), wire.esp());
    eprintln!(
        "on the wire: {esp} ESP packets, {plain} plaintext UDP 6784; the guard dropped {dropped}"
    );
    assert_eq!(plain, 0, "plaintext VXLAN crossed the wire");
    assert!(dropped > 0, "the guard dropped nothing: {}", s["counters"]);
    assert!(esp > 100, "ESP carried the traffic: {esp}");
}

/// With a password on a kernel with ESP, ESP dropped by a firewall: the connection
/// moves to the encrypted sleeve within 3 s, and back to the encrypted fast datapath
/// within 5 s of the rule's removal; no plaintext VXLAN crosses the wire.
#[test]
fn esp_blocked_moves_to_the_encrypted_sleeve_and_back() {
    if skip_without_esp("esp_blocked_moves_to_the_encrypted_sleeve_and_back") {
        return;
    }
    let mut tb = bed(2, 1);
    let wire = WireCounters::install(&tb);
    start_pair(&mut tb, &[], "fastdp");
    let host1 = tb.host(1).must("host").ns.clone();
    let blocked = Instant::now();
    let fw = Firewall::drop(&host1, &["meta l4proto esp"], &["meta l4proto esp"]);
    for (n, peer) in [(1u8, 2u8), (2, 1)] {
        let c = wait_connection(&tb, n, peer, ESTABLISH, established_over("sleeve"));
        assert_eq!(c["encrypted"], true, "host{n}: {c}");
    }
    let to_sleeve = blocked.elapsed();
    check_pods(&tb);
    let unblocked = Instant::now();
    fw.remove();
    for (n, peer) in [(1u8, 2u8), (2, 1)] {
        wait_connection(&tb, n, peer, ESTABLISH, established_over("fastdp"));
    }
    let to_fastdp = unblocked.elapsed();
    eprintln!("ESP blocked: on the sleeve in {to_sleeve:?}, back on fastdp in {to_fastdp:?}");
    // The VM is slow: the status poll adds to the switching time measured here.
    assert!(
        to_sleeve <= Duration::from_secs(5),
        "to sleeve: {to_sleeve:?}"
    );
    assert!(to_fastdp <= Duration::from_secs(7), "back: {to_fastdp:?}");
    check_pods(&tb);
    assert_eq!(wire.plaintext(), 0, "plaintext VXLAN crossed the wire");
}

/// With a password on a kernel without ESP (this machine's): the fast datapath is
/// not offered, the connection uses the encrypted sleeve, and status says why.
#[test]
fn without_esp_encrypted_peers_use_the_sleeve_and_say_why() {
    if kernel_has_esp() {
        eprintln!(
            "SKIPPED without_esp_encrypted_peers_use_the_sleeve_and_say_why: this kernel has \
             ESP (the test is for kernels without it)"
        );
        return;
    }
    let mut tb = bed(2, 1);
    for (n, c) in (1u8..).zip(start_pair(&mut tb, &[], "sleeve")) {
        assert_eq!(c["encrypted"], true, "host{n}: {c}");
        let info = c["info"].as_str().unwrap_or_default();
        assert!(
            info.starts_with("fastdp: ") && info.contains("ESP"),
            "host{n}: no reason given: {c}"
        );
    }
    let text = tb.status(1, &["connections"]).must("status connections");
    assert!(
        text.contains(" established encrypted   sleeve ") && text.contains("(fastdp: "),
        "{text}"
    );
    assert!(
        tb.agent_log(1).contains("ESP"),
        "the log says why: {}",
        tb.agent_log(1)
    );
    check_pods(&tb);
}

/// weft's XFRM state is its own (reqid 0x77656674, "weft"): SIGTERM leaves it (the
/// datapath keeps forwarding, encrypted), an agent started without a password
/// removes all of it, and so does `weft reset`; a foreign policy survives both. The
/// underlay guards go the same way.
#[test]
fn xfrm_state_is_weft_s_own_and_goes_with_encryption_or_reset() {
    if skip_without_esp("xfrm_state_is_weft_s_own_and_goes_with_encryption_or_reset") {
        return;
    }
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    start_pair(&mut tb, &[], "fastdp");
    let namespaces = [
        tb.host(1).must("host").ns.clone(),
        tb.host(2).must("host").ns.clone(),
    ];
    let ns = |n: u8| namespaces[usize::from(n) - 1].clone();
    let xfrm = |n: u8, what: &str| ns_exec(&ns(n), &["ip", "xfrm", what]).must("ip xfrm");
    // A foreign policy (another reqid, same mark) on both hosts.
    for n in [1u8, 2] {
        ns_exec(
            &ns(n),
            &[
                "ip",
                "xfrm",
                "policy",
                "add",
                "src",
                "198.51.100.1/32",
                "dst",
                "198.51.100.2/32",
                "dir",
                "out",
                "mark",
                "0x20000",
                "mask",
                "0x20000",
                "tmpl",
                "proto",
                "esp",
                "reqid",
                "7",
                "mode",
                "transport",
            ],
        )
        .must("foreign policy");
    }
    for n in [1u8, 2] {
        assert_eq!(
            guards(&tb, n),
            ["egress", "ingress"],
            "host{n}: the underlay guards"
        );
    }
    let weft_reqid = "reqid 2003134068";
    for n in [1u8, 2] {
        assert!(
            xfrm(n, "state").contains(weft_reqid),
            "host{n}: {}",
            xfrm(n, "state")
        );
    }
    // SIGTERM leaves it; reset removes weft's state only.
    tb.stop_agent(1).must("stop agent 1");
    assert!(
        xfrm(1, "state").contains(weft_reqid),
        "SIGTERM left the SAs"
    );
    tb.reset_agent(1, &bin).must("weft reset");
    let (states, policies) = (xfrm(1, "state"), xfrm(1, "policy"));
    assert!(!states.contains(weft_reqid), "reset left SAs: {states}");
    assert!(
        !policies.contains(weft_reqid),
        "reset left policies: {policies}"
    );
    assert!(
        !policies.contains("action block"),
        "reset left the block policy: {policies}"
    );
    assert!(
        policies.contains("reqid 7"),
        "reset removed a foreign policy: {policies}"
    );
    assert!(guards(&tb, 1).is_empty(), "reset left {:?}", guards(&tb, 1));
    // An agent started without a password removes an earlier run's state.
    tb.stop_agent(2).must("stop agent 2");
    assert!(
        xfrm(2, "state").contains(weft_reqid),
        "SIGTERM left the SAs"
    );
    tb.start_mesh_agent(2, &bin, &[1], &[])
        .must("agent 2, no password");
    // The agent removes it right after its datapath is ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    while xfrm(2, "policy").contains("action block") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (states, policies) = (xfrm(2, "state"), xfrm(2, "policy"));
    assert!(
        !states.contains(weft_reqid),
        "encryption off left SAs: {states}"
    );
    assert!(
        !policies.contains(weft_reqid),
        "encryption off left policies: {policies}"
    );
    assert!(
        !policies.contains("action block"),
        "encryption off left the block policy"
    );
    assert!(
        policies.contains("reqid 7"),
        "a foreign policy was removed: {policies}"
    );
    assert!(
        guards(&tb, 2).is_empty(),
        "encryption off left {:?}",
        guards(&tb, 2)
    );
}
