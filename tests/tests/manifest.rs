//! The Kubernetes manifest `deploy/weft.yaml`: what it grants and mounts, and that
//! `kubernetes-validate --strict` (the API's own schemas) accepts every document and
//! rejects a copy with a misspelt field. Needs no privileges; without
//! `kubernetes-validate` (from PyPI, installed by `cargo xtask setup`) the schema
//! checks print `SKIPPED`.

use std::path::PathBuf;

use serde_json::Value;
use weft_testbed::manifest::{self, VALIDATOR_ENV, document, documents};

/// The Kubernetes version the manifest is validated against.
const KUBE_VERSION: &str = "1.32";

fn load() -> (String, Vec<Value>) {
    let path = manifest::manifest_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let docs = documents(&text).expect("the manifest parses");
    (text, docs)
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// A directory of this test's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("weft-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn rbac_reads_nodes_only() {
    let (_, docs) = load();
    let sa = document(&docs, "ServiceAccount").unwrap();
    assert_eq!(sa["metadata"]["namespace"], "kube-system");
    let role = document(&docs, "ClusterRole").unwrap();
    let rules = role["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 1, "one rule: {rules:?}");
    assert_eq!(strings(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strings(&rules[0]["resources"]), ["nodes"]);
    assert_eq!(strings(&rules[0]["verbs"]), ["get", "list", "watch"]);
    let binding = document(&docs, "ClusterRoleBinding").unwrap();
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let subject = &binding["subjects"][0];
    assert_eq!(subject["kind"], "ServiceAccount");
    assert_eq!(subject["name"], sa["metadata"]["name"]);
    assert_eq!(subject["namespace"], "kube-system");
    let ds = document(&docs, "DaemonSet").unwrap();
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        sa["metadata"]["name"]
    );
}

#[test]
fn daemonset_runs_the_agent_as_weave_net_ran() {
    let (_, docs) = load();
    let ds = document(&docs, "DaemonSet").unwrap();
    assert_eq!(ds["metadata"]["namespace"], "kube-system");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    let template = &ds["spec"]["template"];
    let spec = &template["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    // Unconfined by seccomp and AppArmor (whose default profiles deny writes below
    // /sys/fs: bpffs pins), in the field and in the annotation older kubelets read.
    for (profile, annotation) in [
        ("seccompProfile", "seccomp.security.alpha.kubernetes.io/pod"),
        (
            "appArmorProfile",
            "container.apparmor.security.beta.kubernetes.io/weft",
        ),
    ] {
        assert_eq!(spec["securityContext"][profile]["type"], "Unconfined");
        assert_eq!(
            template["metadata"]["annotations"][annotation],
            "unconfined"
        );
    }
    // Cluster DNS runs on the network this agent provides.
    assert!(spec["dnsPolicy"].is_null(), "{}", spec["dnsPolicy"]);
    // Every taint tolerated, for both effects.
    let tolerations = spec["tolerations"].as_array().expect("tolerations");
    for effect in ["NoSchedule", "NoExecute"] {
        assert!(
            tolerations
                .iter()
                .any(|t| t["operator"] == "Exists" && t["effect"] == effect && t["key"].is_null()),
            "no toleration of every {effect} taint: {tolerations:?}"
        );
    }

    let version = env!("CARGO_PKG_VERSION");
    let agent = &spec["containers"][0];
    assert_eq!(spec["containers"].as_array().map(Vec::len), Some(1));
    assert_eq!(agent["image"], format!("localhost/weft:{version}"));
    assert_eq!(strings(&agent["args"]), ["run"]);
    let sc = &agent["securityContext"];
    assert!(sc["privileged"].is_null() || sc["privileged"] == false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        ["BPF", "NET_ADMIN", "PERFMON"]
    );
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["seLinuxOptions"]["type"], "spc_t");
    let env: Vec<&str> = agent["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for var in [
        "HOSTNAME",
        "WEFT_KUBE_PEERS",
        "WEFT_ENCRYPT_NETWORK",
        "WEAVE_PASSWORD",
        "IPALLOC_RANGE",
        "WEAVE_MTU",
        "CONN_LIMIT",
    ] {
        assert!(env.contains(&var), "{var} not set: {env:?}");
    }
    let var = |name: &str| {
        agent["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        var("HOSTNAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(var("WEFT_ENCRYPT_NETWORK")["value"], "true");
    assert_eq!(var("IPALLOC_RANGE")["value"], "10.32.0.0/12");
    let secret = &var("WEAVE_PASSWORD")["valueFrom"]["secretKeyRef"];
    assert_eq!(secret["name"], "weave-passwd");
    assert_eq!(secret["optional"], true);
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["host"], "127.0.0.1", "{probe}");
        assert_eq!(get["path"], "/status", "{probe}");
        assert_eq!(get["port"], 6784, "{probe}");
    }
    assert_eq!(agent["ports"][0]["containerPort"], 6782);
    assert!(agent["resources"]["requests"]["cpu"].is_string());

    // Volumes: host paths and where the agent sees them.
    let volume_path = |name: &str| {
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["hostPath"]["path"].as_str())
            .unwrap_or_else(|| panic!("no hostPath volume {name}"))
            .to_owned()
    };
    let mounts = |c: &Value| -> Vec<(String, String)> {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    volume_path(m["name"].as_str().unwrap()),
                    m["mountPath"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let agent_mounts = mounts(agent);
    for path in ["/sys/fs/bpf", "/run/weft", "/dev/net/tun"] {
        assert!(
            agent_mounts.contains(&(path.to_owned(), path.to_owned())),
            "{path} not mounted at the same path: {agent_mounts:?}"
        );
    }
    let bpffs = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/sys/fs/bpf")
        .unwrap();
    assert_eq!(bpffs["mountPropagation"], "HostToContainer");

    // The init container installs the CNI plugin into the host's CNI folders.
    let init = &spec["initContainers"][0];
    assert_eq!(init["image"], agent["image"]);
    assert_eq!(
        strings(&init["args"]),
        [
            "install-cni",
            "--bin-dir",
            "/host/opt/cni/bin",
            "--conf-dir",
            "/host/etc/cni/net.d"
        ]
    );
    assert_eq!(
        strings(&init["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );
    // The plugin's blocks must be the agents': one range for both.
    let init_range = init["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == "IPALLOC_RANGE"))
        .map(|v| v["value"].clone());
    assert_eq!(init_range, Some(var("IPALLOC_RANGE")["value"].clone()));
    let init_mounts = mounts(init);
    for (host, inside) in [
        ("/opt/cni/bin", "/host/opt/cni/bin"),
        ("/etc/cni/net.d", "/host/etc/cni/net.d"),
    ] {
        assert!(
            init_mounts.contains(&(host.to_owned(), inside.to_owned())),
            "{host} not at {inside}: {init_mounts:?}"
        );
    }
}

/// The validator, or `None` after printing why the schema checks are skipped.
fn validator_or_skip(test: &str) -> Option<PathBuf> {
    let found = manifest::validator();
    if found.is_none() {
        println!(
            "SKIPPED: {test}: kubernetes-validate not found (set {VALIDATOR_ENV}, or run \
             `cargo xtask setup`, which installs it from PyPI)"
        );
    }
    found
}

#[test]
fn kubernetes_validate_accepts_every_document() {
    let Some(validator) = validator_or_skip("kubernetes_validate_accepts_every_document") else {
        return;
    };
    let (_, docs) = load();
    let path = manifest::manifest_path();
    let v = manifest::validate(&validator, KUBE_VERSION, &path).expect("running the validator");
    assert!(v.ok, "the manifest does not validate:\n{}", v.output);
    // Every document was checked (and none skipped for an unknown kind).
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap().to_lowercase();
        let name = doc["metadata"]["name"].as_str().unwrap();
        assert!(
            v.output
                .contains(&format!("passed for resource {kind}/{name}")),
            "no pass for {kind}/{name}:\n{}",
            v.output
        );
    }
}

#[test]
fn kubernetes_validate_rejects_misspelt_fields() {
    let Some(validator) = validator_or_skip("kubernetes_validate_rejects_misspelt_fields") else {
        return;
    };
    let (text, _) = load();
    let dir = TempDir::new("manifest");
    for (right, wrong) in [
        ("hostNetwork: true", "hostNetwrok: true"),
        ("mountPropagation:", "mountPropagaton:"),
        ("    verbs:", "    verb:"),
        ("readinessProbe:", "readynessProbe:"),
    ] {
        assert_eq!(text.matches(right).count(), 1, "{right:?} must occur once");
        let file = dir.0.join("weft.yaml");
        std::fs::write(&file, text.replacen(right, wrong, 1)).unwrap();
        let v = manifest::validate(&validator, KUBE_VERSION, &file).expect("running");
        let field = wrong
            .trim()
            .trim_end_matches(": true")
            .trim_end_matches(':');
        assert!(!v.ok, "{wrong:?} was accepted:\n{}", v.output);
        assert!(
            v.output.contains(field),
            "the error does not name {field:?}:\n{}",
            v.output
        );
    }
}
