//! The Kubernetes manifest (`deploy/weft.yaml`): its documents, the DaemonSet's pod
//! template turned into a `kind: Pod` (what `podman kube play` takes), and the
//! schema validator the manifest test runs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The environment variable naming the `kubernetes-validate` binary (`cargo xtask
/// setup` installs one and `cargo xtask test` sets it); else it is looked up on PATH.
pub const VALIDATOR_ENV: &str = "WEFT_KUBERNETES_VALIDATE";

/// Where the manifest is in the repository.
pub fn manifest_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/weft.yaml")
}

/// The manifest's documents, in order.
pub fn documents(text: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).context("parsing the manifest as YAML")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The one document of `kind`.
pub fn document<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    let mut found = docs.iter().filter(|d| d["kind"] == kind);
    let doc = found
        .next()
        .with_context(|| format!("the manifest has no {kind}"))?;
    if found.next().is_some() {
        bail!("the manifest has more than one {kind}");
    }
    Ok(doc)
}

/// The DaemonSet's pod template as a Pod named `name`, in the DaemonSet's namespace.
pub fn pod_from_daemonset(daemonset: &Value, name: &str) -> Result<Value> {
    let template = &daemonset["spec"]["template"];
    if !template.is_object() {
        bail!("the DaemonSet has no spec.template");
    }
    let mut metadata = template["metadata"].clone();
    metadata["name"] = json!(name);
    metadata["namespace"] = daemonset["metadata"]["namespace"].clone();
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": template["spec"].clone(),
    }))
}

/// The containers (init containers first) of a pod spec, mutably.
pub fn containers_mut(spec: &mut Value) -> Vec<&mut Value> {
    let mut all = Vec::new();
    let Some(obj) = spec.as_object_mut() else {
        return all;
    };
    for (key, list) in obj.iter_mut() {
        if (key == "initContainers" || key == "containers")
            && let Some(list) = list.as_array_mut()
        {
            all.extend(list.iter_mut());
        }
    }
    all
}

/// The `kubernetes-validate` binary: [`VALIDATOR_ENV`], else the one on PATH.
pub fn validator() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(VALIDATOR_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("kubernetes-validate"))
        .find(|p| p.is_file())
}

/// What `kubernetes-validate -k VERSION --strict FILE` said.
#[derive(Debug)]
pub struct Validation {
    /// It accepted every document.
    pub ok: bool,
    /// Its stdout and stderr.
    pub output: String,
}

/// Runs `validator -k version --strict file`.
pub fn validate(validator: &Path, version: &str, file: &Path) -> Result<Validation> {
    let mut cmd = Command::new(validator);
    cmd.args(["-k", version, "--strict"]).arg(file);
    let out = crate::cmd::output(&mut cmd, std::time::Duration::from_secs(120))?;
    Ok(Validation {
        ok: out.status.success(),
        output: String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_from_the_daemonset_template() {
        let ds = json!({
            "kind": "DaemonSet",
            "metadata": {"name": "weft", "namespace": "kube-system"},
            "spec": {"template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"hostNetwork": true, "containers": [{"name": "c"}],
                         "initContainers": [{"name": "i"}]}
            }}
        });
        let mut pod = pod_from_daemonset(&ds, "weft-n1").unwrap();
        assert_eq!(pod["kind"], "Pod");
        assert_eq!(pod["metadata"]["name"], "weft-n1");
        assert_eq!(pod["metadata"]["namespace"], "kube-system");
        assert_eq!(pod["metadata"]["labels"]["a"], "b");
        assert_eq!(pod["spec"]["hostNetwork"], true);
        let names: Vec<String> = containers_mut(&mut pod["spec"])
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"c".to_owned()) && names.contains(&"i".to_owned()));
        assert!(pod_from_daemonset(&json!({"spec": {}}), "x").is_err());
    }

    #[test]
    fn documents_skip_empty_ones() {
        let docs = documents("---\na: 1\n---\n---\nkind: X\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert!(document(&docs, "X").is_ok());
        assert!(document(&docs, "Y").is_err());
    }
}
