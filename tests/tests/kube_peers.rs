//! `weft run --kube-peers`: peers from the Kubernetes API's node list, against a
//! fake API server in the agent's network namespace (plain HTTP through a
//! KUBECONFIG). Nodes that appear become targets and connections; a node removed is
//! forgotten; the API server down or answering garbage is logged and retried, never
//! fatal. Needs root and `WEFT_AGENT_BIN` (built with the `kubernetes` feature, the
//! default).

mod common;

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use common::{Must, agent_bin, bed, established_over, wait_connection};
use weft_testbed::{
    Testbed,
    fake_kube::{FakeApi, Mode},
};

/// The direct targets host `n`'s agent reports.
fn targets(tb: &Testbed, n: u8) -> BTreeSet<String> {
    tb.status_json(n)
        .map(|s| {
            s["targets"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

/// Waits until host `n`'s targets are `want`.
fn wait_targets(tb: &Testbed, n: u8, want: &[Ipv4Addr], what: &str) {
    let want: BTreeSet<String> = want.iter().map(ToString::to_string).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = targets(tb, n);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: host{n}'s targets are {got:?}, expected {want:?}; log:\n{}",
            tb.agent_log(n)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until host `n`'s log (from byte `from`) contains `text`; returns the new log.
fn wait_log(tb: &Testbed, n: u8, from: usize, text: &str, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = tb.agent_log(n);
        let new = log.get(from..).unwrap_or_default().to_owned();
        if new.contains(text) {
            return new;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {text:?} not in host{n}'s log:\n{new}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn peers_follow_the_node_list() {
    let bin = agent_bin();
    let mut tb = bed(3, 0);
    let addrs: Vec<Ipv4Addr> = (1..=3).map(|n| tb.host(n).must("host").addr).collect();
    let node = |n: u8| (format!("host{n}"), addrs[usize::from(n) - 1]);
    let (a2, a3) = (addrs[1], addrs[2]);
    let api = FakeApi::start(
        &tb.host(1).must("host").ns,
        Mode::Nodes(vec![node(1), node(2), node(3)]),
    )
    .must("fake API server");
    let kubeconfig = api.write_kubeconfig(tb.dir()).must("kubeconfig");
    let kubeconfig = kubeconfig.display().to_string();
    for n in [2, 3] {
        tb.start_mesh_agent(n, &bin, &[], &[])
            .unwrap_or_else(|e| panic!("agent {n}: {e:#}"));
    }
    // host1's nickname is its node's name (HOSTNAME, as the DaemonSet sets it), so it
    // leaves itself out.
    let args = tb
        .mesh_agent_args(1, &[], &["--kube-peers-interval", "1"])
        .must("args");
    let args: Vec<String> = args
        .into_iter()
        .filter(|a| a != "--nickname" && a != "host1")
        .collect();
    tb.start_agent_with_env(
        1,
        &bin,
        &args,
        &[
            ("KUBECONFIG", &kubeconfig),
            ("WEFT_KUBE_PEERS", "1"),
            ("HOSTNAME", "host1"),
        ],
    )
    .must("agent 1");

    // Nodes listed: targets, and connections established.
    wait_targets(&tb, 1, &[a2, a3], "initial list");
    for peer in [2, 3] {
        wait_connection(
            &tb,
            1,
            peer,
            Duration::from_secs(15),
            established_over("fastdp"),
        );
    }
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/nodes?resourceVersion=0 ")),
        "requests: {:?}",
        api.requests()
    );

    // A node removed: forgotten.
    api.set(Mode::Nodes(vec![node(1), node(2)]));
    wait_targets(&tb, 1, &[a2], "host3 removed");

    // The API server down: logged, retried, the agent keeps running and its targets.
    let mark = tb.agent_log(1).len();
    api.set(Mode::Down);
    let log = wait_log(&tb, 1, mark, "Kubernetes API:", "API down");
    println!("API down, the agent logs:\n{log}");
    assert!(
        tb.agent_running(1),
        "the agent stopped:\n{}",
        tb.agent_log(1)
    );
    assert_eq!(targets(&tb, 1), BTreeSet::from([a2.to_string()]));

    // Garbage: a clear error, not fatal.
    let mark = tb.agent_log(1).len();
    api.set(Mode::Garbage);
    let log = wait_log(&tb, 1, mark, "listing the nodes", "garbage");
    println!("garbage, the agent logs:\n{log}");
    assert!(
        log.contains("the answer is not a NodeList: expected value"),
        "the error does not say the answer was not a node list:\n{log}"
    );
    assert!(
        tb.agent_running(1),
        "the agent stopped:\n{}",
        tb.agent_log(1)
    );

    // Back, with host3 again.
    api.set(Mode::Nodes(vec![node(1), node(2), node(3)]));
    wait_targets(&tb, 1, &[a2, a3], "API back");
    tb.stop_agent(1).must("stopping agent 1");
    drop(api);
}

#[test]
fn no_configuration_is_a_clear_startup_error() {
    let bin = agent_bin();
    let tb = bed(1, 0);
    let args = tb.mesh_agent_args(1, &[], &["--kube-peers"]).must("args");
    let missing = tb.dir().join("no-such-kubeconfig").display().to_string();
    let mut cmd = weft_testbed::cmd::host_command(&tb.host(1).must("host").ns, &bin);
    cmd.args(&args)
        .env("KUBECONFIG", &missing)
        .env_remove("KUBERNETES_SERVICE_HOST");
    let out = weft_testbed::cmd::output(&mut cmd, Duration::from_secs(20)).must("running");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure:\n{text}");
    assert!(
        text.contains("--kube-peers") && text.contains("KUBECONFIG"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    println!("without configuration:\n{text}");
}
