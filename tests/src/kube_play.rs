//! Running the DaemonSet's pod on a testbed host with podman: `nsenter
//! --net=/run/netns/HOST podman kube play POD.yaml`, so the pod's host network is
//! the host's namespace. (`ip netns exec` does not do: it remounts /sys, which
//! hides the bpffs the pod mounts.) Podman gets a containers.conf of the test's own
//! (`CONTAINERS_CONF`): runc as the runtime and no default rlimits (podman's exceed
//! what root may set here).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::cmd::{output, run_timeout};

/// The environment variable naming the image the DaemonSet test runs: a reference
/// in root's podman store (`localhost/weft:<version>`, as `cargo xtask image` tags
/// it) or the path of an image archive (`podman save`/OCI), loaded for the test and
/// removed after.
pub const IMAGE_ENV: &str = "WEFT_IMAGE";

/// How long a podman command may take.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);

/// Podman with the test's containers.conf.
pub struct Podman {
    conf: PathBuf,
}

impl Podman {
    /// Writes the containers.conf into `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        let conf = dir.join("containers.conf");
        std::fs::write(
            &conf,
            "[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\n",
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        Ok(Podman { conf })
    }

    /// `podman ARGS`, in the caller's namespaces.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", &self.conf);
        cmd
    }

    /// `nsenter --net=/run/netns/NS podman ARGS`.
    pub fn command_in(&self, ns: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg("podman")
            .env("CONTAINERS_CONF", &self.conf);
        cmd
    }

    /// Runs `podman ARGS` and returns stdout.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        run_timeout(self.command().args(args), PODMAN_TIMEOUT)
    }

    /// Runs `podman ARGS` in network namespace `ns` and returns stdout. Whatever
    /// (re)starts a host-network container must run here: its container joins the
    /// namespace podman runs in.
    pub fn run_in(&self, ns: &str, args: &[&str]) -> Result<String> {
        run_timeout(self.command_in(ns).args(args), PODMAN_TIMEOUT)
    }

    /// Whether the image is in the store.
    pub fn image_exists(&self, image: &str) -> bool {
        output(
            self.command().args(["image", "exists", image]),
            PODMAN_TIMEOUT,
        )
        .is_ok_and(|o| o.status.success())
    }

    /// Loads an image archive; returns the reference it was loaded as.
    pub fn load(&self, archive: &Path) -> Result<String> {
        let out = run_timeout(
            self.command().arg("load").arg("-q").arg("-i").arg(archive),
            PODMAN_TIMEOUT,
        )?;
        // "Loaded image: localhost/weft:0.1.0" (or "Loaded image(s): ...").
        out.lines()
            .find_map(|l| l.split_once(": ").map(|(_, r)| r.trim().to_owned()))
            .with_context(|| format!("podman load printed no image reference: {out:?}"))
    }

    /// `podman kube play FILE` in network namespace `ns`.
    pub fn kube_play(&self, ns: &str, file: &Path) -> Result<String> {
        run_timeout(
            self.command_in(ns).args(["kube", "play"]).arg(file),
            PODMAN_TIMEOUT,
        )
    }

    /// Removes a pod and its containers (stopping them at once); fine if absent.
    pub fn remove_pod(&self, name: &str) -> Result<()> {
        let out = output(
            self.command()
                .args(["pod", "rm", "--force", "--ignore", "--time", "10", name]),
            PODMAN_TIMEOUT,
        )?;
        if !out.status.success() {
            bail!(
                "podman pod rm {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The logs of a container.
    pub fn logs(&self, container: &str) -> String {
        output(self.command().args(["logs", container]), PODMAN_TIMEOUT)
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_else(|e| format!("(no logs: {e:#})"))
    }

    /// A container's state (`running`, `exited`, ...).
    pub fn state(&self, container: &str) -> Option<String> {
        self.run(&["inspect", "--format", "{{.State.Status}}", container])
            .ok()
            .map(|s| s.trim().to_owned())
    }
}
