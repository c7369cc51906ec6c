//! A real container runtime calling the CNI plugin: podman with its CNI backend, all
//! its state (storage, run and temp dirs, configuration) in a temp dir of its own, so
//! tests never touch the machine's podman state. Containers are started with
//! `nsenter --net` into a host's namespace, so the plugin sees that host's bridge;
//! their image is a `FROM scratch` one holding a static busybox, built offline by
//! buildah.
//!
//! podman needs a `containers.conf` (given by `CONTAINERS_CONF`) with no default
//! ulimits (its defaults exceed the hard limit where root lacks
//! `CAP_SYS_RESOURCE`) and runc as the runtime.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};

use crate::cmd::{host_command, run_timeout};

/// The test image's name.
pub const IMAGE: &str = "localhost/weft-test-busybox";
/// What the image serves at `/srv/hello.txt` (busybox httpd).
pub const HELLO: &str = "hello from weft";
/// The tools [`Podman`] needs.
pub const TOOLS: [&str; 4] = ["podman", "buildah", "runc", "busybox"];
const TIMEOUT: Duration = Duration::from_secs(120);

/// A private podman: its temp dir, and the containers started (name, host namespace),
/// which `Drop` removes (their network with them), then the image and the dir.
pub struct Podman {
    dir: PathBuf,
    containers: Mutex<Vec<(String, String)>>,
}

/// Where a program is on `PATH`, if anywhere.
pub fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

impl Podman {
    /// The [`TOOLS`] not installed.
    pub fn missing_tools() -> Vec<&'static str> {
        TOOLS
            .into_iter()
            .filter(|t| find_program(t).is_none())
            .collect()
    }

    /// Sets podman up in a new temp dir: the plugin and its network configuration
    /// (`weft install-cni` of `agent_bin`, plus `dataDir`), `containers.conf`, and
    /// the busybox image.
    pub fn new(agent_bin: &Path, range: &str, data_dir: &Path) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("weft-podman-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let podman = Self {
            dir,
            containers: Mutex::new(Vec::new()),
        };
        podman.prepare(agent_bin, range, data_dir)?;
        Ok(podman)
    }

    /// Sets podman up in `dir` (created, and removed with the rest) for a plugin
    /// already installed: `plugin_dir` holds `weft-cni`, `conf_dir` its network
    /// configuration (as `weft install-cni` writes them on a node). Writes
    /// `containers.conf` and builds the busybox image.
    pub fn with_plugin(dir: &Path, plugin_dir: &Path, conf_dir: &Path) -> Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let podman = Self {
            dir: dir.to_path_buf(),
            containers: Mutex::new(Vec::new()),
        };
        podman.configure(plugin_dir, conf_dir)?;
        Ok(podman)
    }

    fn prepare(&self, agent_bin: &Path, range: &str, data_dir: &Path) -> Result<()> {
        let (bin, net_d) = (self.dir.join("bin"), self.dir.join("net.d"));
        let mut install = Command::new(agent_bin);
        install
            .arg("install-cni")
            .arg("--bin-dir")
            .arg(&bin)
            .arg("--conf-dir")
            .arg(&net_d)
            .args(["--ipalloc-range", range]);
        run_timeout(&mut install, TIMEOUT)?;
        let conflist = net_d.join("10-weft.conflist");
        let mut conf: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&conflist)?)?;
        conf["plugins"][0]["dataDir"] = serde_json::json!(data_dir);
        std::fs::write(&conflist, conf.to_string())?;
        self.configure(&bin, &net_d)
    }

    /// `containers.conf` (the CNI backend on `bin` and `net_d`) and the busybox image.
    fn configure(&self, bin: &Path, net_d: &Path) -> Result<()> {
        std::fs::write(
            self.dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\n\
                 cgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\n[network]\n\
                 network_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\n\
                 network_config_dir = \"{}\"\n",
                bin.display(),
                net_d.display()
            ),
        )?;
        let ctx = self.dir.join("image");
        std::fs::create_dir_all(ctx.join("srv"))?;
        let busybox = find_program("busybox").ok_or_else(|| anyhow!("no busybox"))?;
        std::fs::copy(&busybox, ctx.join("busybox")).context("copying busybox")?;
        std::fs::write(ctx.join("srv").join("hello.txt"), HELLO)?;
        std::fs::write(
            ctx.join("Containerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nCOPY srv /srv\n",
        )?;
        let mut build = self.command("buildah", None);
        build
            .args(["bud", "--isolation", "chroot", "-t", IMAGE])
            .arg(&ctx);
        run_timeout(&mut build, TIMEOUT).context("building the busybox image")?;
        Ok(())
    }

    /// `program` (podman or buildah) with this podman's storage, in host namespace
    /// `ns` if given.
    fn command(&self, program: &str, ns: Option<&str>) -> Command {
        let mut cmd = match ns {
            Some(ns) => host_command(ns, program),
            None => Command::new(program),
        };
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs"]);
        if program == "podman" {
            cmd.arg("--tmpdir").arg(self.dir.join("tmp"));
        }
        cmd
    }

    /// `podman <args>` in host namespace `ns`; its stdout.
    pub fn podman(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut cmd = self.command("podman", Some(ns));
        cmd.args(args);
        run_timeout(&mut cmd, TIMEOUT)
    }

    /// Starts container `name` on network `weave` from host namespace `ns`, running
    /// busybox with `args`; returns its address.
    pub fn run(&self, ns: &str, name: &str, args: &[&str]) -> Result<Ipv4Addr> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_owned(), ns.to_owned()));
        let mut all = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "weave",
            IMAGE,
            "/bin/busybox",
        ];
        all.extend(args);
        self.podman(ns, &all)?;
        let ip = self.podman(
            ns,
            &[
                "inspect",
                "-f",
                "{{.NetworkSettings.Networks.weave.IPAddress}}",
                name,
            ],
        )?;
        ip.trim()
            .parse()
            .with_context(|| format!("container {name}'s address {ip:?}"))
    }

    /// busybox `args` in container `name`.
    pub fn exec(&self, ns: &str, name: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["exec", name, "/bin/busybox"];
        all.extend(args);
        self.podman(ns, &all)
    }

    /// Removes container `name` (from host namespace `ns`: the plugin's DEL runs there).
    pub fn rm(&self, ns: &str, name: &str) -> Result<()> {
        self.podman(ns, &["rm", "-f", "-t", "0", name])?;
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(n, _)| n != name);
        Ok(())
    }

    /// Removes every container, the image and the temp dir; reports what failed.
    pub fn cleanup(&self) -> Result<()> {
        let mut errors = Vec::new();
        let containers =
            std::mem::take(&mut *self.containers.lock().unwrap_or_else(|e| e.into_inner()));
        for (name, ns) in containers {
            let ns_alive = Path::new("/run/netns").join(&ns).exists();
            let mut cmd = self.command("podman", ns_alive.then_some(ns.as_str()));
            cmd.args(["rm", "-f", "-t", "0", "--ignore", &name]);
            if let Err(e) = run_timeout(&mut cmd, TIMEOUT) {
                errors.push(format!("{e:#}"));
            }
        }
        if self.dir.exists() {
            let mut rmi = self.command("podman", None);
            rmi.args(["rmi", "-af"]);
            if let Err(e) = run_timeout(&mut rmi, TIMEOUT) {
                errors.push(format!("{e:#}"));
            }
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                errors.push(format!("removing {}: {e}", self.dir.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("podman cleanup: {}", errors.join("; "))
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("{e:#}");
        }
    }
}
