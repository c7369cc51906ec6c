//! Agent lifecycle: the datapath outlives the agent (SIGTERM, SIGKILL), a restarted
//! agent adopts it without losing a packet, and `weft reset` removes everything weft
//! created. Need root and `WEFT_AGENT_BIN`.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{Bed, FIRST_CONTACT, Must, agent_bin, bed, start_agents};
use weft_testbed::{
    Pod, attached_programs, links_with_prefix, ns_exec, ping_stream, prog_exists, tcx_supported,
    wait_ping,
};

/// weft's device.
const DEVICE: &str = "weft-vxlan";

/// Names of the programs attached to weft's device on host `n` (by TCX, or as netlink
/// filters on kernels without it), like `ingress:weft_decap`, sorted.
fn programs(tb: &Bed, n: u8) -> Vec<String> {
    let mut names: Vec<String> = attached_programs(&tb.host(n).must("host").ns, DEVICE)
        .must("attached programs")
        .into_iter()
        .map(|p| format!("{}:{}", p.direction, p.name))
        .collect();
    names.sort();
    names
}

/// Ids of the programs attached to weft's device on host `n`.
fn attached_ids(tb: &Bed, n: u8) -> Vec<u32> {
    attached_programs(&tb.host(n).must("host").ns, DEVICE)
        .must("attached programs")
        .into_iter()
        .map(|p| p.id)
        .collect()
}

/// Waits (up to 3 s: programs are freed asynchronously) until none of `ids` is loaded;
/// returns those still loaded.
fn wait_unloaded(ids: &[u32]) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| prog_exists(id).must("program lookup"))
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Everything pinned under the testbed's bpffs directory (relative paths).
fn pins(tb: &Bed) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if let Ok(rel) = path.strip_prefix(base) {
                out.push(rel.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(tb.bpffs_dir(), tb.bpffs_dir(), &mut out);
    out.sort();
    out
}

/// Asserts that host `n` runs weft's complete datapath: the device (marked as
/// weft's) with both programs, and nothing of weft's on the underlay.
fn assert_datapath_in_place(tb: &Bed, n: u8, when: &str) {
    let ns = tb.host(n).must("host").ns.clone();
    assert_eq!(
        links_with_prefix(&ns, "weft-").must("ip link"),
        [DEVICE],
        "host{n} {when}: devices"
    );
    let link = ns_exec(&ns, &["ip", "-d", "link", "show", DEVICE]).must("ip link");
    assert!(
        link.contains("alias weft") && link.contains("external"),
        "host{n} {when}: {DEVICE} is weft's metadata-mode device:\n{link}"
    );
    assert_eq!(
        programs(tb, n),
        ["egress:weft_encap", "ingress:weft_decap"],
        "host{n} {when}: programs on {DEVICE}"
    );
    assert!(
        attached_programs(&ns, "eth0")
            .must("attached programs")
            .is_empty(),
        "host{n} {when}: weft attaches nothing to the underlay"
    );
}

/// Asserts that host `n` carries nothing of weft's: no weft device, no programs, no
/// socket file; and that the testbed's pins of host `n` are gone.
fn assert_nothing_left(tb: &Bed, n: u8) {
    let ns = tb.host(n).must("host").ns.clone();
    let left = links_with_prefix(&ns, "weft-").must("ip link");
    assert!(
        left.is_empty(),
        "host{n}: devices left after reset: {left:?}"
    );
    let eth0 = attached_programs(&ns, "eth0").must("attached programs");
    assert!(eth0.is_empty(), "host{n}: programs on eth0: {eth0:?}");
    let qdiscs = ns_exec(&ns, &["tc", "qdisc", "show", "dev", "eth0"]).must("tc qdisc");
    assert!(
        !qdiscs.contains("clsact") && !qdiscs.contains("ingress"),
        "host{n}: a clsact/ingress qdisc on eth0:\n{qdiscs}"
    );
    assert!(
        !tb.socket_path(n).exists(),
        "host{n}: socket {} not removed",
        tb.socket_path(n).display()
    );
}

/// Pings `to` from `from` every 10 ms for `secs` seconds on a thread; join for the
/// report.
fn ping_in_background(
    from: &Pod,
    to: &Pod,
    secs: u32,
) -> std::thread::JoinHandle<anyhow::Result<weft_testbed::PingReport>> {
    let (from, to) = (from.clone(), to.addr);
    std::thread::spawn(move || ping_stream(&from, to, secs * 100, Duration::from_millis(10)))
}

#[test]
fn sigterm_leaves_the_datapath_forwarding_and_reset_removes_it() {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    start_agents(&mut tb, &bin, &[1, 2]);
    for n in [1, 2] {
        assert_datapath_in_place(&tb, n, "while running");
    }
    assert!(tb.socket_path(1).exists(), "socket while running");
    let ids = [attached_ids(&tb, 1), attached_ids(&tb, 2)].concat();
    assert_eq!(ids.len(), 4);
    let pinned = pins(&tb);
    // Netlink filters (kernels without TCX) outlive the agent without a pinned link.
    let links: &[&str] = if tcx_supported() {
        &["links/weft_encap", "links/weft_decap"]
    } else {
        &[]
    };
    for name in links.iter().chain(&["WEFT_MACS", "WEFT_FLOOD_STATE"]) {
        assert_eq!(
            pinned.iter().filter(|p| p.ends_with(name)).count(),
            2,
            "{name} pinned once per host: {pinned:?}"
        );
    }
    let p1 = tb.pod(1, 1).must("pod").clone();
    let p2 = tb.pod(2, 1).must("pod").clone();
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("traffic before stop");

    tb.stop_agent(1).must("SIGTERM host1 agent");
    tb.stop_agent(2).must("SIGTERM host2 agent");
    assert!(!tb.socket_path(1).exists(), "socket removed on stop");
    for n in [1, 2] {
        assert_datapath_in_place(&tb, n, "after SIGTERM");
    }
    let r = ping_stream(&p1, p2.addr, 20, Duration::from_millis(50)).must("ping");
    assert_eq!(
        (r.transmitted, r.received),
        (20, 20),
        "pods keep talking with no agent running"
    );

    for n in [1, 2] {
        tb.reset_agent(n, &bin).must("weft reset");
        assert_nothing_left(&tb, n);
    }
    let left = pins(&tb);
    assert!(left.is_empty(), "pins left after reset: {left:?}");
    let left = wait_unloaded(&ids);
    assert!(
        left.is_empty(),
        "programs {left:?} are still loaded after reset"
    );
    let r = ping_stream(&p1, p2.addr, 5, Duration::from_millis(50)).must("ping");
    assert_eq!(
        (r.transmitted, r.received),
        (5, 0),
        "no overlay after reset: every probe sent, none answered"
    );
}

#[test]
fn reset_refuses_while_an_agent_runs() {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    start_agents(&mut tb, &bin, &[1]);
    let err = tb.reset_agent(1, &bin).expect_err("reset must refuse");
    assert!(
        format!("{err:#}").contains("an agent is running"),
        "reset names the running agent: {err:#}"
    );
    assert_datapath_in_place(&tb, 1, "after a refused reset");
}

/// How the agent on host 2 goes away before a new one starts.
#[derive(Clone, Copy, PartialEq)]
enum Restart {
    /// `kill -9`.
    Kill,
    /// SIGTERM.
    Stop,
    /// SIGTERM, then an agent loading another eBPF object (the variant build).
    Upgrade,
}

/// The tag (hash of the instructions) of BPF program `id`.
fn prog_tag(id: u32) -> String {
    let out =
        weft_testbed::cmd::run_args("bpftool", &["-j", "prog", "show", "id", &id.to_string()])
            .must("bpftool prog show");
    let v: serde_json::Value = serde_json::from_str(&out).must_json(&out);
    v["tag"].as_str().unwrap_or_default().to_owned()
}

trait MustJson<T> {
    fn must_json(self, text: &str) -> T;
}

impl<T> MustJson<T> for Result<T, serde_json::Error> {
    fn must_json(self, text: &str) -> T {
        self.unwrap_or_else(|e| panic!("invalid JSON ({e}): {text}"))
    }
}

/// The agent dies (SIGKILL) or stops (SIGTERM) under a 10 ms ping stream, stays away
/// 2 s, and a new agent starts (of the same or another eBPF object): not one ping is
/// lost, and the new agent replaced the programs in place (same links, new programs).
fn restart_loses_nothing(how: Restart) {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    start_agents(&mut tb, &bin, &[1, 2]);
    let p1 = tb.pod(1, 1).must("pod").clone();
    let p2 = tb.pod(2, 1).must("pod").clone();
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("traffic before the restart");
    let before = attached_ids(&tb, 2);
    let tags_before: Vec<String> = before.iter().map(|&id| prog_tag(id)).collect();
    let variant = std::env::var("WEFT_EBPF_VARIANT_OBJECT");
    let extra: Vec<&str> = match (&variant, how) {
        (Ok(object), Restart::Upgrade) => vec!["--ebpf-object", object.as_str()],
        (Err(_), Restart::Upgrade) => {
            panic!("WEFT_EBPF_VARIANT_OBJECT not set: run through `cargo xtask test`")
        }
        _ => Vec::new(),
    };

    // 600 probes 10 ms apart take 6 s or more; the restart happens within them.
    let stream = ping_in_background(&p1, &p2, 6);
    std::thread::sleep(Duration::from_millis(500));
    if how == Restart::Kill {
        tb.kill9_agent(2).must("kill -9 host2");
    } else {
        tb.stop_agent(2).must("SIGTERM host2");
    }
    std::thread::sleep(Duration::from_secs(2));
    tb.start_agent(2, &bin, &extra).must("restart host2");
    let r = stream.join().expect("ping thread").must("ping stream");
    assert_eq!(r.transmitted, 600, "the whole stream ran: {r:?}");
    assert_eq!(
        r.received, r.transmitted,
        "pings lost across the restart: {r:?}"
    );

    assert_datapath_in_place(&tb, 2, "after the restart");
    let after = attached_ids(&tb, 2);
    assert!(
        after.iter().all(|id| !before.contains(id)),
        "the new agent's programs replaced the old ones: before {before:?}, after {after:?}"
    );
    let log = tb.agent_log(2);
    assert!(
        log.contains("adopted_peers=1")
            && log.contains("replaced_programs=[\"weft_encap\", \"weft_decap\"]"),
        "the restarted agent adopted the datapath:\n{log}"
    );
    let stats = tb.status_json(2).must("status");
    assert!(
        stats["connections"][0]["rx_packets"].as_u64().unwrap_or(0) > 0,
        "counters survive the restart: {stats}"
    );
    let tags_after: Vec<String> = after.iter().map(|&id| prog_tag(id)).collect();
    if how == Restart::Upgrade {
        assert_ne!(
            tags_before, tags_after,
            "the upgrade runs other programs (instruction tags differ)"
        );
    } else {
        assert_eq!(tags_before, tags_after, "a restart runs the same programs");
    }
}

#[test]
fn restart_after_kill9_loses_no_packet() {
    restart_loses_nothing(Restart::Kill);
}

#[test]
fn restart_after_sigterm_loses_no_packet() {
    restart_loses_nothing(Restart::Stop);
}

#[test]
fn upgrade_to_other_programs_loses_no_packet() {
    restart_loses_nothing(Restart::Upgrade);
}

/// Without `--iface` the agent takes the interface of the IPv4 default route.
#[test]
fn underlay_defaults_to_the_default_route_interface() {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    tb.add_default_route(1).must("default route on host1");
    start_agents(&mut tb, &bin, &[2]);
    tb.write_peers(1, &[1, 2]).must("peers");
    let mut args = tb.agent_args(1).must("args");
    let i = args.iter().position(|a| a == "--iface").expect("--iface");
    args.drain(i..i + 2);
    // `start_agent` passes `--iface eth0`; run the same command without it.
    tb.start_agent_with_args(1, &bin, &args)
        .must("agent without --iface");
    let log = tb.agent_log(1);
    assert!(
        log.contains("datapath ready") && log.contains("underlay=eth0"),
        "expected the agent to pick eth0 from the default route:\n{log}"
    );
    let (p1, p2) = (
        tb.pod(1, 1).must("pod").clone(),
        tb.pod(2, 1).must("pod").clone(),
    );
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("traffic with the default interface");
}
