//! The DaemonSet's own pod spec, run for real: the pod template of
//! `deploy/weft.yaml` as a `kind: Pod` on three testbed hosts with `nsenter
//! --net=/run/netns/HOST podman kube play`, as a kubelet would run it on three
//! nodes. Each agent finds the others (through `KUBE_PEERS`: no API server here),
//! `weft status` through the control socket in the pod's `/run/weft` shows the
//! mesh established and encrypted (the manifest's default, with a password as the
//! Secret would give it), the readiness endpoint answers, and the init container
//! installed the CNI plugin. A pod without the Secret stops with a message naming
//! it. Pods are removed on every path.
//!
//! Needs root, podman and runc, and the image in `WEFT_IMAGE` (see
//! [`weft_testbed::kube_play::IMAGE_ENV`]); without it the test prints `SKIPPED`.
//! What the test changes in the template, and why: host paths go to directories of
//! the test's own (each node its own `/run/weft`, `/var/lib/weft`, CNI folders and
//! machine-id, the testbed's bpffs directory); `spec.nodeName` and the Secret,
//! which only a kubelet fills in, become literal values; `WEFT_KUBE_PEERS` is
//! replaced by `KUBE_PEERS`; the probes are checked by the test itself (podman turns
//! HTTP probes into `curl` inside the container, and the image has no shell); the
//! declared ports go (podman would map them, which it refuses with host networking).

mod common;

use std::{
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
    netns,
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
    /// Keep the init container (the image's weft has `install-cni`).
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
    for container in containers_mut(spec) {
        container["image"] = json!(image);
        container["imagePullPolicy"] = json!("Never");
        let obj = container.as_object_mut().unwrap();
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
    // Whether the image's weft has `install-cni` (the init container's command).
    let probe = weft_testbed::cmd::output(
        podman.command().args([
            "run",
            "--rm",
            "--network",
            "none",
            &image,
            "install-cni",
            "--help",
        ]),
        Duration::from_secs(60),
    )
    .must("podman run");
    let has_install_cni = probe.status.success();
    if !has_install_cni {
        let text = String::from_utf8_lossy(&probe.stderr);
        assert!(
            text.contains("unrecognized subcommand"),
            "the image does not run: {text}"
        );
    }

    let text = std::fs::read_to_string(manifest::manifest_path()).must_io("reading the manifest");
    let docs = documents(&text).must("manifest");
    let daemonset = document(&docs, "DaemonSet").must("DaemonSet").clone();
    std::fs::create_dir_all(tb.bpffs_dir()).must_io("creating the bpffs directory");
    let addrs: Vec<Ipv4Addr> = (1..=3).map(|n| tb.host(n).must("host").addr).collect();
    let mut nodes = Vec::new();
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
            with_init: has_install_cni,
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
        if has_install_cni {
            assert!(
                dirs.cni_bin.join("weft-cni").is_file(),
                "node {n}: no weft-cni"
            );
            assert!(
                dirs.cni_conf.join("10-weft.conflist").is_file(),
                "node {n}: no 10-weft.conflist"
            );
        }
    }
    if !has_install_cni {
        println!("NOTE: the image's weft has no install-cni: the init container was left out");
    }
    for pod in std::mem::take(&mut cleanup.pods) {
        podman.remove_pod(&pod).must("removing a pod");
    }
}

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
    let text = std::fs::read_to_string(manifest::manifest_path()).must_io("reading the manifest");
    let docs = documents(&text).must("manifest");
    let daemonset = document(&docs, "DaemonSet").must("DaemonSet").clone();
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
