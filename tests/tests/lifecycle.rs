//! Agent lifecycle: a clean stop leaves nothing behind; restarts after SIGTERM and
//! after SIGKILL restore traffic. Need root and `WEFT_AGENT_BIN`.

mod common;

use std::time::{Duration, Instant};

use common::{Bed, FIRST_CONTACT, Must, agent_bin, bed, start_agents};
use weft_testbed::{
    links_with_prefix, ns_exec, ping, ping_unanswered, prog_exists, tcx_programs, wait_ping,
};

/// Names of the programs TCX-attached to `dev` on host `n`, like `ingress:weft_decap`.
fn tcx(tb: &Bed, n: u8, dev: &str) -> Vec<String> {
    tcx_programs(&tb.host(n).must("host").ns, dev)
        .must("TCX query")
        .into_iter()
        .map(|p| format!("{}:{}", p.direction, p.name))
        .collect()
}

/// Ids of every program TCX-attached on host `n` (eth0 and the veth pair).
fn attached_ids(tb: &Bed, n: u8) -> Vec<u32> {
    let ns = tb.host(n).must("host").ns.clone();
    let mut ids = Vec::new();
    for dev in ["eth0", "vethwe-bridge", "vethwe-datapath"] {
        ids.extend(
            tcx_programs(&ns, dev)
                .must("TCX query")
                .into_iter()
                .map(|p| p.id),
        );
    }
    ids
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

/// Asserts that host `n` carries nothing of weft's: no vethwe-* devices, no programs
/// on eth0 (TCX or XDP), no clsact/ingress qdisc, no socket file.
fn assert_nothing_left(tb: &Bed, n: u8) {
    let ns = tb.host(n).must("host").ns.clone();
    let left = links_with_prefix(&ns, "vethwe-").must("ip link");
    assert!(
        left.is_empty(),
        "host{n}: devices left after stop: {left:?}"
    );
    let attached = tcx(tb, n, "eth0");
    assert!(
        attached.is_empty(),
        "host{n}: programs still attached to eth0: {attached:?}"
    );
    let link = ns_exec(&ns, &["ip", "-d", "link", "show", "eth0"]).must("ip link");
    assert!(
        !link.contains("xdp"),
        "host{n}: XDP program on eth0:\n{link}"
    );
    let qdiscs = ns_exec(&ns, &["tc", "qdisc", "show", "dev", "eth0"]).must("tc qdisc");
    assert!(
        !qdiscs.contains("clsact") && !qdiscs.contains("ingress"),
        "host{n}: a clsact/ingress qdisc remains on eth0 (TCX needs none):\n{qdiscs}"
    );
    assert!(
        !tb.socket_path(n).exists(),
        "host{n}: socket {} not removed",
        tb.socket_path(n).display()
    );
}

#[test]
fn sigterm_leaves_nothing_attached() {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    start_agents(&mut tb, &bin, &[1, 2]);
    // While running, everything is in place (so the checks below can fail).
    let ns1 = tb.host(1).must("host").ns.clone();
    let mut devs = links_with_prefix(&ns1, "vethwe-").must("ip link");
    devs.sort();
    assert_eq!(
        devs,
        ["vethwe-bridge", "vethwe-datapath"],
        "host1 while running"
    );
    assert_eq!(
        tcx(&tb, 1, "eth0"),
        ["ingress:weft_decap"],
        "host1 eth0 while running"
    );
    assert_eq!(
        tcx(&tb, 1, "vethwe-bridge"),
        ["egress:weft_encap"],
        "host1 vethwe-bridge while running"
    );
    assert!(
        tcx(&tb, 1, "vethwe-datapath").is_empty(),
        "nothing on host1 vethwe-datapath"
    );
    assert!(tb.socket_path(1).exists(), "socket while running");
    let ids = [attached_ids(&tb, 1), attached_ids(&tb, 2)].concat();
    let p1 = tb.pod(1, 1).must("pod").clone();
    let p2 = tb.pod(2, 1).must("pod").clone();
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("traffic before stop");

    tb.stop_agent(1).must("SIGTERM host1 agent");
    assert_nothing_left(&tb, 1);
    tb.stop_agent(2).must("SIGTERM host2 agent");
    assert_nothing_left(&tb, 2);
    let left = wait_unloaded(&ids);
    assert!(
        left.is_empty(),
        "programs {left:?} of the stopped agents are still loaded (pinned or leaked?)"
    );
}

#[test]
fn restart_after_sigterm_restores_traffic() {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    start_agents(&mut tb, &bin, &[1, 2]);
    let p1 = tb.pod(1, 1).must("pod").clone();
    let p2 = tb.pod(2, 1).must("pod").clone();
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("traffic before stop");
    tb.stop_agent(2).must("stop host2");
    ping_unanswered(&p1, p2.addr, 3).must("traffic to host2 must stop with its agent");
    tb.start_agent(2, &bin, &[]).must("restart host2");
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("traffic after restart");
    let r = ping(&p1, p2.addr, 5).must("ping after restart");
    assert_eq!(r.received, 5, "{r:?}");
}

#[test]
fn restart_after_kill9_reconciles() {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    start_agents(&mut tb, &bin, &[1, 2]);
    let p1 = tb.pod(1, 1).must("pod").clone();
    let p2 = tb.pod(2, 1).must("pod").clone();
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("traffic before kill");
    tb.kill9_agent(2).must("kill -9 host2");
    tb.start_agent(2, &bin, &[])
        .must("start host2 over the leftovers of a killed agent");
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("traffic after reconcile");
    let r = ping(&p2, p1.addr, 5).must("ping after reconcile");
    assert_eq!(r.received, 5, "{r:?}");
    let ns2 = tb.host(2).must("host").ns.clone();
    let mut devs = links_with_prefix(&ns2, "vethwe-").must("ip link");
    devs.sort();
    assert_eq!(
        devs,
        ["vethwe-bridge", "vethwe-datapath"],
        "exactly one veth pair after reconcile"
    );
    assert_eq!(
        tcx(&tb, 2, "eth0"),
        ["ingress:weft_decap"],
        "one decap program on eth0 after reconcile"
    );
    assert_eq!(
        tcx(&tb, 2, "vethwe-bridge"),
        ["egress:weft_encap"],
        "one encap program on vethwe-bridge after reconcile"
    );
    tb.stop_agent(2).must("clean stop after reconcile");
    assert_nothing_left(&tb, 2);
}

/// Without `--iface` the agent takes the interface of the IPv4 default route.
#[test]
fn underlay_defaults_to_the_default_route_interface() {
    let bin = agent_bin();
    let mut tb = bed(2, 1);
    let ns1 = tb.host(1).must("host").ns.clone();
    tb.add_default_route(1).must("default route on host1");
    start_agents(&mut tb, &bin, &[2]);
    tb.write_peers(1, &[1, 2]).must("peers");
    let mut args = tb.agent_args(1).must("args");
    let i = args.iter().position(|a| a == "--iface").expect("--iface");
    args.drain(i..i + 2);
    let log = tb.dir().join("default-iface.log");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns1])
        .arg(&bin)
        .args(&args)
        .stdout(std::fs::File::create(&log).expect("log file"))
        .stderr(std::fs::File::create(log.with_extension("err")).expect("log file"))
        .spawn()
        .expect("start the agent");
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
        if text.contains("datapath ready") || Instant::now() > deadline {
            break text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("agent exited ({status}) without --iface:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        text.contains("datapath ready") && text.contains("underlay=eth0"),
        "expected the agent to pick eth0 from the default route:\n{text}"
    );
    let (p1, p2) = (
        tb.pod(1, 1).must("pod").clone(),
        tb.pod(2, 1).must("pod").clone(),
    );
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("traffic with the default interface");
    // SAFETY: kill with a valid pid and signal number.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM the agent");
    let status = child.wait().expect("wait for the agent");
    assert!(status.success(), "agent exit status {status}");
    assert!(
        links_with_prefix(&ns1, "vethwe-")
            .must("ip link")
            .is_empty(),
        "veth pair removed"
    );
}
