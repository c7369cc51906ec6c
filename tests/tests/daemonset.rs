//! The DaemonSet's own pod spec, run for real: the pod template of
//! `deploy/weft.yaml` as a `kind: Pod` on three testbed hosts with `nsenter
//! --net=/run/netns/HOST podman kube play`, as a kubelet would run it on three
//! nodes. Each agent finds the others (through `KUBE_PEERS`: no API server here),
//! `weft status` through the control socket in the pod's `/run/weft` shows the
//! mesh established and encrypted (the manifest's default, with a password as the
//! Secret would give it), the readiness endpoint answers, and the init container
//! installed the CNI plugin. Then podman on each node, its CNI backend on the plugin
//! and configuration that node's init container installed, starts two containers:
//! their addresses come from the node's block, each reaches every container on the
//! other nodes (ping and TCP), a ping stream across nodes survives a restart of one
//! node's agent pod, and deleting a container frees its address and its veth. A pod
//! without the Secret stops with a message naming it. Pods and containers are
//! removed on every path.
//!
//! Needs root, podman, buildah, runc and busybox, and the image in `WEFT_IMAGE` (see
//! [`weft_testbed::kube_play::IMAGE_ENV`]); without it the test prints `SKIPPED`.
//! What the test changes in the template, and why: host paths go to directories of
//! the test's own (each node its own `/run/weft`, `/var/lib/weft`, CNI folders and
//! machine-id, the testbed's bpffs directory, and the plugin's allocations through
//! `install-cni --data-dir`); `spec.nodeName` and the Secret,
//! which only a kubelet fills in, become literal values; `WEFT_KUBE_PEERS` is
//! replaced by `KUBE_PEERS`; the probes are checked by the test itself (podman turns
//! HTTP probes into `curl` inside the container, and the image has no shell); the
//! declared ports go (podman would map them, which it refuses with host networking).

mod common;

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{Must, agent_bin, bed};
use serde_json::{Value, json};
use weft_testbed::{
    Testbed,
    kube_play::{IMAGE_ENV, Podman},
    manifest::{self, containers_mut, document, documents, pod_from_daemonset},
    netns, ns_exec,
    podman::{HELLO, Podman as CniPodman},
};

/// The password the test gives in place of the Secret.
const PASSWORD: &str = "daemonset-test-password";

/// The image to run, or `None` after printing why the test is skipped.
fn image_or_skip() -> Option<String> {
    match std::env::var(IMAGE_ENV) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            println!(
                "SKIPPED: {IMAGE_ENV} not set (an image reference in root's podman store, \
                 like localhost/weft:{}, or an image archive; `cargo xtask test` builds \
                 and sets it)",
                env!("CARGO_PKG_VERSION")
            );
            None
        }
    }
}

/// Pods (and an image loaded for the test) removed on drop, whatever happened.
struct Cleanup<'a> {
    podman: &'a Podman,
    pods: Vec<String>,
    loaded_image: Option<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for pod in &self.pods {
            if let Err(e) = self.podman.remove_pod(pod) {
                eprintln!("cleanup: {e:#}");
            }
        }
        if let Some(image) = &self.loaded_image {
            let _ = self.podman.run(&["rmi", "--force", image]);
        }
    }
}

/// The image reference for `WEFT_IMAGE`: itself, or what loading the archive it
/// names gave (then removed by `cleanup` unless the store had it before).
fn resolve_image(podman: &Podman, cleanup: &mut Cleanup, image: String) -> String {
    if Path::new(&image).is_file() {
        let before = podman
            .run(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
            .must("podman images");
        let r = podman.load(Path::new(&image)).must("podman load");
        // Removed after the test only if the load brought it.
        if !before.lines().any(|l| l.trim() == r) {
            cleanup.loaded_image = Some(r.clone());
        }
        r
    } else {
        assert!(
            podman.image_exists(&image),
            "{IMAGE_ENV}={image}: no such image in root's podman store"
        );
        image
    }
}

/// A node's own directories in place of the host paths.
struct NodeDirs {
    run: PathBuf,
    lib: PathBuf,
    cni_bin: PathBuf,
    cni_conf: PathBuf,
    machine_id: PathBuf,
    /// The CNI plugin's IPAM `dataDir` (`install-cni --data-dir`).
    ipam: PathBuf,
}

impl NodeDirs {
    fn new(base: &Path, n: u8) -> Self {
        let root = base.join(format!("node{n}"));
        let dirs = NodeDirs {
            run: root.join("run-weft"),
            lib: root.join("var-lib-weft"),
            cni_bin: root.join("opt-cni-bin"),
            cni_conf: root.join("etc-cni-net.d"),
            machine_id: root.join("machine-id"),
            ipam: root.join("ipam"),
        };
        for d in [&dirs.run, &dirs.lib, &dirs.cni_bin, &dirs.cni_conf] {
            std::fs::create_dir_all(d).must_io("creating a node directory");
        }
        // A machine id of the node's own: the default peer names differ.
        std::fs::write(
            &dirs.machine_id,
            format!("{:032x}\n", 0x5eed_0000 + u32::from(n)),
        )
        .must_io("writing machine-id");
        dirs
    }
}

trait MustIo<T> {
    fn must_io(self, what: &str) -> T;
}

impl<T> MustIo<T> for std::io::Result<T> {
    fn must_io(self, what: &str) -> T {
        self.unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

/// Sets (or adds) env `name` of a container to a literal value.
fn set_env(container: &mut Value, name: &str, value: &str) {
    let env = container["env"].as_array_mut().expect("env");
    env.retain(|e| e["name"] != name);
    env.push(json!({"name": name, "value": value}));
}

/// What a node's pod gets besides its directories.
struct PodSettings<'a> {
    image: &'a str,
    /// `KUBE_PEERS`.
    peers: &'a str,
    /// `WEAVE_PASSWORD`, as the Secret would give it.
    password: Option<&'a str>,
    /// Keep the init container (`weft install-cni`).
    with_init: bool,
}

/// The pod of node `n`, from the DaemonSet's template.
fn node_pod(
    daemonset: &Value,
    tb: &Testbed,
    n: u8,
    dirs: &NodeDirs,
    settings: &PodSettings,
) -> Value {
    let PodSettings {
        image,
        peers,
        password,
        with_init,
    } = *settings;
    let mut pod = pod_from_daemonset(daemonset, &format!("weft-{}-n{n}", tb.prefix())).must("pod");
    // podman removes a "once" init container right after it exits, and under load
    // tries while runc still reports it running ("cannot remove container ... as it
    // is running"); an "always" one is kept with the pod. Kubernetes has no such step.
    pod["metadata"]["annotations"]["io.podman.annotations.init.container.type"] = json!("always");
    let spec = &mut pod["spec"];
    if !with_init {
        spec.as_object_mut().unwrap().remove("initContainers");
    }
    for volume in spec["volumes"].as_array_mut().expect("volumes") {
        let path = volume["hostPath"]["path"]
            .as_str()
            .expect("hostPath")
            .to_owned();
        let new: PathBuf = match path.as_str() {
            "/sys/fs/bpf" => tb.bpffs_dir().to_path_buf(),
            "/run/weft" => dirs.run.clone(),
            "/var/lib/weft" => dirs.lib.clone(),
            "/opt/cni/bin" => dirs.cni_bin.clone(),
            "/etc/cni/net.d" => dirs.cni_conf.clone(),
            "/etc/machine-id" => dirs.machine_id.clone(),
            "/dev/net/tun" => continue,
            other => panic!("a host path the test does not know: {other}"),
        };
        volume["hostPath"]["path"] = json!(new.display().to_string());
    }
    // The plugin's allocations (`dataDir` in the conflist, a path on the node): the
    // node's own directory in place of /var/lib/weft/ipam.
    if let Some(inits) = spec["initContainers"].as_array_mut() {
        let install = inits
            .iter_mut()
            .find(|c| c["name"] == "install-cni")
            .expect("the install-cni init container");
        install["args"]
            .as_array_mut()
            .expect("install-cni args")
            .extend([json!("--data-dir"), json!(dirs.ipam.display().to_string())]);
    }
    for container in containers_mut(spec) {
        container["image"] = json!(image);
        container["imagePullPolicy"] = json!("Never");
        let obj = container.as_object_mut().unwrap();
        obj.remove("startupProbe");
        obj.remove("readinessProbe");
        obj.remove("livenessProbe");
        // Podman maps declared ports, which it refuses with host networking; for
        // Kubernetes they only document the port then.
        obj.remove("ports");
        if container["name"] != "weft" {
            continue;
        }
        set_env(container, "HOSTNAME", &format!("node{n}"));
        set_env(container, "WEFT_KUBE_PEERS", "false");
        set_env(container, "KUBE_PEERS", peers);
        let env = container["env"].as_array_mut().unwrap();
        env.retain(|e| e["name"] != "WEAVE_PASSWORD");
        if let Some(p) = password {
            env.push(json!({"name": "WEAVE_PASSWORD", "value": p}));
        }
    }
    pod
}

/// `GET path` on 127.0.0.1:`port` in namespace `ns`: (status code, body).
fn http_get(ns: &str, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    let h = netns::spawn_in(ns, move || {
        let mut s = TcpStream::connect_timeout(
            &(Ipv4Addr::LOCALHOST, port).into(),
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        let code = answer
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((code, body))
    });
    netns::join(h, "http get")
}

/// `weft status --json` through node `n`'s control socket.
fn status(bin: &Path, dirs: &NodeDirs) -> anyhow::Result<Value> {
    let socket = dirs.run.join("weft.sock");
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["status", "--json", "--socket"]).arg(&socket);
    let out = weft_testbed::cmd::run_timeout(&mut cmd, Duration::from_secs(10))?;
    Ok(serde_json::from_str(&out)?)
}

/// The DaemonSet document of `deploy/weft.yaml`.
fn daemonset_of_the_manifest() -> Value {
    let text = std::fs::read_to_string(manifest::manifest_path()).must_io("reading the manifest");
    let docs = documents(&text).must("manifest");
    document(&docs, "DaemonSet").must("DaemonSet").clone()
}

#[test]
fn daemonset_pods_form_a_mesh() {
    let bin = agent_bin();
    let Some(image) = image_or_skip() else {
        return;
    };
    let tb = bed(3, 0);
    let podman = Podman::new(tb.dir()).must("podman");
    let mut cleanup = Cleanup {
        podman: &podman,
        pods: Vec::new(),
        loaded_image: None,
    };
    let image = resolve_image(&podman, &mut cleanup, image);

    let daemonset = daemonset_of_the_manifest();
    std::fs::create_dir_all(tb.bpffs_dir()).must_io("creating the bpffs directory");
    let addrs: Vec<Ipv4Addr> = (1..=3).map(|n| tb.host(n).must("host").addr).collect();
    let mut nodes: Vec<Node> = Vec::new();
    for n in 1..=3u8 {
        tb.add_default_route(n).must("default route");
        let dirs = NodeDirs::new(tb.dir(), n);
        let peers: Vec<String> = (1..=3u8)
            .filter(|&p| p != n)
            .map(|p| addrs[usize::from(p) - 1].to_string())
            .collect();
        let peers = peers.join(" ");
        let settings = PodSettings {
            image: &image,
            peers: &peers,
            password: Some(PASSWORD),
            with_init: true,
        };
        let pod = node_pod(&daemonset, &tb, n, &dirs, &settings);
        let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
        let file = tb.dir().join(format!("pod{n}.json"));
        std::fs::write(&file, serde_json::to_string_pretty(&pod).unwrap()).must_io("pod file");
        cleanup.pods.push(name.clone());
        let ns = tb.host(n).must("host").ns.clone();
        podman
            .kube_play(&ns, &file)
            .unwrap_or_else(|e| panic!("node {n}: podman kube play: {e:#}"));
        nodes.push((n, ns, name, dirs));
    }

    // Each node: ready (the probe's endpoint answers), connected to both others,
    // encrypted.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (n, ns, name, dirs) in &nodes {
        let container = format!("{name}-weft");
        loop {
            let ready = http_get(ns, 6784, "/status").is_ok_and(|(code, _)| code == 200);
            let established = status(&bin, dirs).ok().filter(|s| {
                s["connections"].as_array().is_some_and(|cs| {
                    cs.iter().filter(|c| c["state"] == "established").count() == 2
                })
            });
            if let (true, Some(s)) = (ready, established) {
                assert_eq!(s["encryption"], true, "node {n}: {s:#}");
                // (The nickname is not checked: podman sets HOSTNAME to the pod's
                // host name over the spec's value, where a kubelet keeps the spec's.)
                for c in s["connections"].as_array().unwrap() {
                    println!(
                        "node {n}: {} {} {} encrypted={}",
                        c["address"], c["state"], c["overlay"], c["encrypted"]
                    );
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {n}: not ready with two established connections in time \
                 (container {}); status: {:#}\nlogs:\n{}",
                podman.state(&container).unwrap_or_default(),
                status(&bin, dirs).unwrap_or(Value::Null),
                podman.logs(&container)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let (_, text) = http_get(ns, 6784, "/status").must("GET /status");
        assert!(
            text.contains("Encryption: enabled"),
            "node {n}: /status:\n{text}"
        );
        let (code, metrics) = http_get(ns, 6782, "/metrics").must("GET /metrics");
        assert_eq!(code, 200, "node {n}: metrics:\n{metrics}");
        assert!(
            metrics.contains("weave_connections"),
            "node {n}:\n{metrics}"
        );
        let logs = podman.logs(&container);
        assert!(
            !logs.contains(PASSWORD),
            "node {n}: the password in the logs:\n{logs}"
        );
        assert!(
            dirs.cni_bin.join("weft-cni").is_file(),
            "node {n}: no weft-cni"
        );
        let conf: Value = serde_json::from_str(
            &std::fs::read_to_string(dirs.cni_conf.join("10-weft.conflist"))
                .must_io("reading 10-weft.conflist"),
        )
        .expect("10-weft.conflist is JSON");
        assert_eq!(conf["plugins"][0]["type"], "weft-cni", "node {n}: {conf:#}");
        assert_eq!(
            conf["plugins"][0]["dataDir"],
            dirs.ipam.display().to_string(),
            "node {n}: {conf:#}"
        );
    }

    containers_on_the_plugin(&tb, &podman, &nodes);

    for pod in std::mem::take(&mut cleanup.pods) {
        podman.remove_pod(&pod).must("removing a pod");
    }
}

/// The `IPALLOC_RANGE` of the manifest: 10.32.0.0/12.
const RANGE_START: u32 = 0x0a20_0000;
/// Addresses per block of that range (2^20 / 4096 blocks).
const BLOCK: u32 = 256;

/// The address on node `ns`'s bridge (the gateway: the start of its block).
fn bridge_address(ns: &str) -> Ipv4Addr {
    let out = ns_exec(ns, &["ip", "-4", "-o", "addr", "show", "dev", "weave"]).must("ip addr");
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split_once('/')?.0.parse().ok())
        .unwrap_or_else(|| panic!("{ns}: no address on the bridge: {out}"))
}

/// The allocation files (addresses) of network `weave` in a node's IPAM directory.
fn allocations(dirs: &NodeDirs) -> BTreeSet<Ipv4Addr> {
    match std::fs::read_dir(dirs.ipam.join("weave")) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// The node's veths made by the plugin (`wft*`).
fn cni_veths(ns: &str) -> Vec<String> {
    weft_testbed::links_with_prefix(ns, "wft").must("links")
}

/// `(transmitted, received)` from a busybox ping summary.
fn ping_counts(out: &str) -> Option<(u32, u32)> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut words = line.split_whitespace();
    let sent = words.next()?.parse().ok()?;
    let received = words.nth(2)?.parse().ok()?;
    Some((sent, received))
}

/// Pings (at 10 a second) the most a node's agent pod restart may lose: 16 of 300
/// observed, about 1.6 s of the restart; the bound leaves margin for a loaded machine.
/// Loss is expected here: the mesh has a password and this kernel no ESP, so the
/// connections use the encrypted sleeve, which runs in the agent (the fast datapath
/// outlives the agent and loses nothing: see the lifecycle tests).
const RESTART_LOSS: u32 = 30;

/// Two containers per node started by podman through the CNI plugin each node's
/// init container installed: addresses from the node's block, ping and TCP to every
/// container on the other nodes, traffic across a restart of an agent pod, and
/// deleting a container releasing its address and veth.
fn containers_on_the_plugin(tb: &Testbed, kube: &Podman, nodes: &[Node]) {
    // Each node's podman, on its own plugin and configuration. Declared after the
    // pods' cleanup in the caller: dropped (containers removed) first.
    let runtimes: Vec<CniPodman> = nodes
        .iter()
        .map(|(n, _, _, dirs)| {
            CniPodman::with_plugin(
                &tb.dir().join(format!("node{n}")).join("podman"),
                &dirs.cni_bin,
                &dirs.cni_conf,
            )
            .unwrap_or_else(|e| panic!("node {n}: podman set-up: {e:#}"))
        })
        .collect();
    // (node index, container name, address)
    let mut containers: Vec<(usize, String, Ipv4Addr)> = Vec::new();
    for (i, (n, ns, _, dirs)) in nodes.iter().enumerate() {
        let gateway = bridge_address(ns);
        let block = u32::from(gateway);
        assert!(
            block >= RANGE_START && (block - RANGE_START).is_multiple_of(BLOCK),
            "node {n}: bridge address {gateway} is not the start of a block"
        );
        let mut addrs = BTreeSet::new();
        for c in ["a", "b"] {
            let name = format!("c{n}{c}");
            let addr = runtimes[i]
                .run(ns, &name, &["httpd", "-f", "-p", "8080", "-h", "/srv"])
                .unwrap_or_else(|e| panic!("node {n}: podman run {name}: {e:#}"));
            assert!(
                u32::from(addr) > block && u32::from(addr) < block + BLOCK,
                "node {n}: {name}'s {addr} is not in the block of {gateway}"
            );
            println!("node {n}: {name} {addr}");
            addrs.insert(addr);
            containers.push((i, name, addr));
        }
        assert_eq!(allocations(dirs), addrs, "node {n}: allocation files");
        assert_eq!(cni_veths(ns).len(), 2, "node {n}: {:?}", cni_veths(ns));
    }
    assert_ne!(
        bridge_address(&nodes[0].1),
        bridge_address(&nodes[1].1),
        "two nodes on one block"
    );
    // Every container reaches every container on the other nodes: ping and TCP.
    for (i, from, _) in &containers {
        let ns = &nodes[*i].1;
        for (j, to, addr) in &containers {
            if i == j {
                continue;
            }
            let target = addr.to_string();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let out = runtimes[*i].exec(ns, from, &["ping", "-c", "1", "-W", "2", &target]);
                if out.as_ref().is_ok_and(|o| o.contains("1 packets received")) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{from} does not reach {to} ({target}): {out:?}"
                );
            }
            let url = format!("http://{addr}:8080/hello.txt");
            let got = runtimes[*i]
                .exec(ns, from, &["wget", "-q", "-O", "-", &url])
                .unwrap_or_else(|e| panic!("{from}: wget {url}: {e:#}"));
            assert_eq!(got, HELLO, "{from} -> {to}");
        }
    }
    println!("all containers reach each other across nodes (ping, TCP)");

    // Node 2's agent pod restarts while c1a pings c2a (10 a second).
    let (_, to_name, to_addr) = &containers[2];
    assert_eq!(to_name, "c2a");
    let target = to_addr.to_string();
    let (n2, ns2, pod2, _) = &nodes[1];
    let mut restart_secs = 0.0;
    let out = std::thread::scope(|s| {
        let stream = s.spawn(|| {
            runtimes[0].exec(
                &nodes[0].1,
                "c1a",
                &["ping", "-c", "300", "-i", "0.1", "-W", "5", &target],
            )
        });
        std::thread::sleep(Duration::from_secs(3));
        let restarted = Instant::now();
        // In the node's namespace, as a kubelet runs on its node: a host-network
        // container restarted from another namespace would join that one.
        kube.run_in(ns2, &["pod", "restart", pod2])
            .unwrap_or_else(|e| {
                panic!(
                    "node {n2}: podman pod restart: {e:#}\n{}",
                    mesh_diagnostics(kube, nodes)
                )
            });
        restart_secs = restarted.elapsed().as_secs_f64();
        println!("node {n2}: pod restarted in {restart_secs:.1}s");
        stream.join().expect("ping thread")
    })
    .unwrap_or_else(|e| panic!("c1a: ping {target} during the restart: {e:#}"));
    let (sent, received) = ping_counts(&out).unwrap_or_else(|| {
        panic!(
            "no ping summary in:
{out}"
        )
    });
    println!(
        "ping across node {n2}'s agent pod restart: {sent} sent, {received} received, {} lost",
        sent - received
    );
    assert_eq!(sent, 300, "{out}");
    // The restarted agent runs in its node's namespace (a host-network container
    // joins the namespace of whoever starts it).
    assert_eq!(
        agent_netns(kube, pod2),
        netns_id(&format!("/run/netns/{ns2}")),
        "node {n2}: the restarted agent is not in the node's network namespace\n{}",
        mesh_diagnostics(kube, nodes)
    );
    // A slow `podman pod restart` on a loaded machine is the runtime's time, not
    // weft's: the bound grows with it (10 pings a second, plus 3 s for the agent to
    // start and its connections to come back).
    let bound = RESTART_LOSS.max(((restart_secs + 3.0) * 10.0).ceil() as u32);
    assert!(
        sent - received <= bound,
        "the restart lost {} pings (at most {bound}; the pod restart took {restart_secs:.1} s):\n{out}\n{}",
        sent - received,
        mesh_diagnostics(kube, nodes)
    );
    let after = runtimes[0]
        .exec(&nodes[0].1, "c1a", &["ping", "-c", "3", "-W", "5", &target])
        .unwrap_or_else(|e| {
            panic!(
                "ping after the restart: {e:#}\n{}",
                mesh_diagnostics(kube, nodes)
            )
        });
    assert!(
        after.contains("3 packets received"),
        "{after}\n{}",
        mesh_diagnostics(kube, nodes)
    );
    let got = runtimes[1]
        .exec(
            ns2,
            "c2b",
            &[
                "wget",
                "-q",
                "-O",
                "-",
                &format!("http://{}:8080/hello.txt", containers[0].2),
            ],
        )
        .unwrap_or_else(|e| {
            panic!(
                "wget after the restart: {e:#}\n{}",
                mesh_diagnostics(kube, nodes)
            )
        });
    assert_eq!(got, HELLO);

    // Deleting a container releases its address and its veth.
    for (i, (n, ns, _, dirs)) in nodes.iter().enumerate() {
        let (_, name, addr) = &containers[2 * i + 1];
        runtimes[i]
            .rm(ns, name)
            .unwrap_or_else(|e| panic!("node {n}: podman rm {name}: {e:#}"));
        assert!(
            !allocations(dirs).contains(addr),
            "node {n}: {name}'s {addr} still allocated"
        );
        assert_eq!(
            allocations(dirs),
            BTreeSet::from([containers[2 * i].2]),
            "node {n}"
        );
        assert_eq!(cni_veths(ns).len(), 1, "node {n}: {:?}", cni_veths(ns));
    }
    for (i, (n, ns, _, dirs)) in nodes.iter().enumerate() {
        runtimes[i]
            .cleanup()
            .unwrap_or_else(|e| panic!("node {n}: podman cleanup: {e:#}"));
        assert!(
            allocations(dirs).is_empty(),
            "node {n}: {:?}",
            allocations(dirs)
        );
        assert!(cni_veths(ns).is_empty(), "node {n}: {:?}", cni_veths(ns));
    }
}

/// Each node's agent container (state, whether it runs in the node's network
/// namespace), `weft status` and the end of its log, for a failure message (the
/// password, should it appear, replaced).
fn mesh_diagnostics(kube: &Podman, nodes: &[Node]) -> String {
    const LOG_LINES: usize = 100;
    let bin = agent_bin();
    let mut text = String::new();
    for (n, ns, pod, dirs) in nodes {
        let container = format!("{pod}-weft");
        let state = kube.state(&container).unwrap_or_default();
        let in_node_ns = agent_netns(kube, pod) == netns_id(&format!("/run/netns/{ns}"));
        let status = status(&bin, dirs).unwrap_or(Value::Null);
        let logs = kube.logs(&container);
        let lines: Vec<&str> = logs.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_LINES)..].join("\n");
        text += &format!(
            "node {n}: agent {state}, in the node's namespace: {in_node_ns}\n\
             node {n} status: {status:#}\nnode {n} log (last {LOG_LINES} lines):\n{tail}\n"
        );
    }
    text.replace(PASSWORD, "<password>")
}

/// The network namespace (device, inode) of a pod's agent container's process, if
/// it runs.
fn agent_netns(kube: &Podman, pod: &str) -> Option<(u64, u64)> {
    let pid = kube
        .run(&[
            "inspect",
            "--format",
            "{{.State.Pid}}",
            &format!("{pod}-weft"),
        ])
        .ok()?;
    let pid: u32 = pid.trim().parse().ok().filter(|&p| p != 0)?;
    netns_id(&format!("/proc/{pid}/ns/net"))
}

/// The (device, inode) naming the network namespace at `path`.
fn netns_id(path: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// A node: number, namespace, pod name, directories.
type Node = (u8, String, String, NodeDirs);

#[test]
fn without_the_secret_the_pod_says_how_to_create_it() {
    let _bin = agent_bin();
    let Some(image) = image_or_skip() else {
        return;
    };
    let tb = bed(1, 0);
    let podman = Podman::new(tb.dir()).must("podman");
    let mut cleanup = Cleanup {
        podman: &podman,
        pods: Vec::new(),
        loaded_image: None,
    };
    let image = resolve_image(&podman, &mut cleanup, image);
    let daemonset = daemonset_of_the_manifest();
    std::fs::create_dir_all(tb.bpffs_dir()).must_io("creating the bpffs directory");
    tb.add_default_route(1).must("default route");
    let dirs = NodeDirs::new(tb.dir(), 1);
    let settings = PodSettings {
        image: &image,
        peers: "",
        password: None,
        with_init: false,
    };
    let mut pod = node_pod(&daemonset, &tb, 1, &dirs, &settings);
    // Kubernetes restarts it; here it stays down so its log can be read.
    pod["spec"]["restartPolicy"] = json!("Never");
    let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
    let file = tb.dir().join("pod.json");
    std::fs::write(&file, serde_json::to_string_pretty(&pod).unwrap()).must_io("pod file");
    cleanup.pods.push(name.clone());
    let ns = tb.host(1).must("host").ns.clone();
    podman.kube_play(&ns, &file).must("podman kube play");
    let container = format!("{name}-weft");
    let deadline = Instant::now() + Duration::from_secs(30);
    while podman.state(&container).as_deref() == Some("running") {
        assert!(Instant::now() < deadline, "the agent did not stop");
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs = podman.logs(&container);
    assert!(
        logs.contains("no password") && logs.contains("weave-passwd"),
        "the log does not say to create the Secret:\n{logs}"
    );
    assert!(
        !dirs.run.join("weft.sock").exists(),
        "the agent got as far as its socket"
    );
}
