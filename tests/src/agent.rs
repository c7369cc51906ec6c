//! Running the weft agent on testbed hosts.
//!
//! Each host's agent runs as `nsenter --net=/run/netns/<host ns> <agent> run --iface
//! eth0 --name <PeerName> --peers-file <dir>/h<N>.peers.toml --socket <dir>/h<N>.sock
//! --bpffs <testbed's bpffs dir>`, in its own process group, with stdout and stderr
//! appended to `<dir>/h<N>.log`.
//!
//! Not `ip netns exec`: that runs the program in a fresh mount namespace where bpffs
//! is not mounted, so nothing pinned would outlive the agent.

use std::{
    fs::{File, OpenOptions},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::{
    cmd::{POLL, command_line, describe_status, host_command, output, run_timeout, tail},
    signal::interrupted,
    testbed::Testbed,
};

/// How long an agent may take to log "datapath ready".
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an agent may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The log line that says an agent is ready.
pub const READY_MARKER: &str = "datapath ready";

/// A started agent (or the record of one that was stopped).
#[derive(Debug)]
pub(crate) struct AgentProc {
    child: Option<Child>,
    bin: PathBuf,
    line: String,
}

impl AgentProc {
    pub(crate) fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGTERM, bounded wait, SIGKILL. Errors if it had to kill or the exit was unclean.
    pub(crate) fn terminate(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent is not running");
        };
        if let Some(status) = child.try_wait()? {
            bail!("agent had already exited ({})", describe_status(&status));
        }
        crate::cmd::signal_pid(child.id(), libc::SIGTERM)?;
        // Waits are cut short by an interrupt; teardown must still reap the agent.
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(POLL);
        }
        crate::cmd::kill_group(&mut child);
        bail!("agent did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed with SIGKILL")
    }
}

/// How a run of the agent that was expected to end ended.
#[derive(Debug)]
pub struct AgentExit {
    /// Its exit status.
    pub status: ExitStatus,
    /// What it printed on stdout and stderr.
    pub output: String,
}

impl Testbed {
    /// Path of host `n`'s agent control socket.
    pub fn socket_path(&self, n: u8) -> PathBuf {
        self.dir().join(format!("h{n}.sock"))
    }

    /// Path of host `n`'s peers file.
    pub fn peers_path(&self, n: u8) -> PathBuf {
        self.dir().join(format!("h{n}.peers.toml"))
    }

    /// Path of host `n`'s agent log (all runs appended).
    pub fn log_path(&self, n: u8) -> PathBuf {
        self.dir().join(format!("h{n}.log"))
    }

    /// Writes host `n`'s peers file listing `peers` (host numbers; include `n` itself).
    pub fn write_peers(&self, n: u8, peers: &[u8]) -> Result<()> {
        let hosts = peers
            .iter()
            .map(|&p| self.host(p))
            .collect::<Result<Vec<_>>>()?;
        crate::peers::write_peers_file(&self.peers_path(n), hosts)
    }

    /// The arguments `start_agent` gives the agent on host `n` (after the binary):
    /// `run --iface eth0 --name <PeerName> --peers-file <file> --socket <socket>`.
    pub fn agent_args(&self, n: u8) -> Result<Vec<String>> {
        let h = self.host(n)?;
        Ok(vec![
            "run".into(),
            "--iface".into(),
            "eth0".into(),
            "--name".into(),
            h.peer_name(),
            "--peers-file".into(),
            self.peers_path(n).display().to_string(),
            "--socket".into(),
            self.socket_path(n).display().to_string(),
            "--bpffs".into(),
            self.bpffs_dir().display().to_string(),
        ])
    }

    /// The arguments of a mesh-mode agent on host `n` (after the binary): `run --iface
    /// eth0 --name <PeerName> --nickname host<n> --socket <socket> --bpffs <dir>`,
    /// then `extra`, then the underlay addresses of `peers` (Weave's `PEER...`).
    pub fn mesh_agent_args(&self, n: u8, peers: &[u8], extra: &[&str]) -> Result<Vec<String>> {
        let h = self.host(n)?;
        let mut args: Vec<String> = vec![
            "run".into(),
            "--iface".into(),
            "eth0".into(),
            "--name".into(),
            h.peer_name(),
            "--nickname".into(),
            h.nickname(),
            "--socket".into(),
            self.socket_path(n).display().to_string(),
            "--bpffs".into(),
            self.bpffs_dir().display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        for &p in peers {
            args.push(self.host(p)?.addr.to_string());
        }
        Ok(args)
    }

    /// Starts a mesh-mode agent on host `n` told about `peers` (see
    /// [`Testbed::mesh_agent_args`]) and waits until its datapath is ready.
    pub fn start_mesh_agent(
        &mut self,
        n: u8,
        agent_bin: &Path,
        peers: &[u8],
        extra: &[&str],
    ) -> Result<()> {
        let args = self.mesh_agent_args(n, peers, extra)?;
        self.start_agent_with_args(n, agent_bin, &args)
    }

    /// Runs `<agent> reset` on host `n` (the agent must be stopped) and returns what
    /// it printed; fails if it exits nonzero.
    pub fn reset_agent(&self, n: u8, agent_bin: &Path) -> Result<String> {
        let host = self.host(n)?;
        let mut cmd = host_command(&host.ns, agent_bin);
        cmd.arg("reset")
            .arg("--socket")
            .arg(self.socket_path(n))
            .arg("--bpffs")
            .arg(self.bpffs_dir());
        run_timeout(&mut cmd, Duration::from_secs(20))
    }

    /// Starts the agent on host `n` with [`Testbed::agent_args`] plus `extra_args`,
    /// and waits up to [`READY_TIMEOUT`] for its log to say "datapath ready". If host
    /// `n` has no peers file yet, one listing every host of the testbed is written.
    /// Fails, with the log's tail, if the agent exits or is not ready in time (it is
    /// then killed).
    pub fn start_agent(&mut self, n: u8, agent_bin: &Path, extra_args: &[&str]) -> Result<()> {
        let mut args = self.agent_args(n)?;
        args.extend(extra_args.iter().map(|a| a.to_string()));
        self.start_agent_with_args(n, agent_bin, &args)
    }

    /// As [`Testbed::start_agent`], with exactly `args` after the binary.
    pub fn start_agent_with_args(
        &mut self,
        n: u8,
        agent_bin: &Path,
        args: &[String],
    ) -> Result<()> {
        self.start_agent_with_env(n, agent_bin, args, &[])
    }

    /// As [`Testbed::start_agent_with_args`], with `env` added to the agent's
    /// environment.
    pub fn start_agent_with_env(
        &mut self,
        n: u8,
        agent_bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let host = self.host(n)?.clone();
        if host.is_kernel_vxlan() {
            bail!("host {n} is a kernel-VXLAN host; it must not run an agent");
        }
        if self.agents.get(&n).is_some_and(AgentProc::is_running) {
            bail!("an agent already runs on host {n}");
        }
        if self.weaver_running(n) {
            bail!("host {n} runs weaver; it must not run a weft agent too");
        }
        if !self.peers_path(n).exists() && args.iter().any(|a| a == "--peers-file") {
            let all: Vec<u8> = self.hosts().iter().map(|h| h.n).collect();
            self.write_peers(n, &all)?;
        }
        let log_path = self.log_path(n);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let offset = log.metadata()?.len();
        let mut cmd = host_command(&host.ns, agent_bin);
        cmd.args(args).envs(env.iter().copied());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let line = command_line(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        self.agents.insert(
            n,
            AgentProc {
                child: Some(child),
                bin: agent_bin.to_path_buf(),
                line: line.clone(),
            },
        );
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let new_log = read_from(&log_path, offset);
            if new_log.contains(READY_MARKER) {
                return Ok(());
            }
            let agent = self
                .agents
                .get_mut(&n)
                .ok_or_else(|| anyhow!("agent record lost"))?;
            let child = agent
                .child
                .as_mut()
                .ok_or_else(|| anyhow!("agent record lost"))?;
            if let Some(status) = child.try_wait()? {
                agent.child = None;
                bail!(
                    "agent on host {n} exited ({}) before logging {READY_MARKER:?}; \
                     command: `{line}`; log tail:\n{}",
                    describe_status(&status),
                    tail(&read_from(&log_path, offset), 3000)
                );
            }
            if Instant::now() >= deadline || interrupted() {
                crate::cmd::kill_group(child);
                agent.child = None;
                let why = if interrupted() {
                    "interrupted".to_string()
                } else {
                    format!("not ready within {READY_TIMEOUT:?} (killed)")
                };
                bail!(
                    "agent on host {n}: {why}; expected {READY_MARKER:?} in its log; \
                     command: `{line}`; log tail:\n{}",
                    tail(&read_from(&log_path, offset), 3000)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops host `n`'s agent with SIGTERM and waits up to [`STOP_TIMEOUT`]. Fails if it
    /// had to be killed, or exited other than with status 0 (the error includes the
    /// log's tail).
    pub fn stop_agent(&mut self, n: u8) -> Result<()> {
        let agent = self
            .agents
            .get_mut(&n)
            .ok_or_else(|| anyhow!("no agent was started on host {n}"))?;
        let line = agent.line.clone();
        let result = agent.terminate();
        match result {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => bail!(
                "agent on host {n} exited with {} after SIGTERM (expected 0); command: `{line}`; \
                 log tail:\n{}",
                describe_status(&status),
                tail(&self.agent_log(n), 3000)
            ),
            Err(e) => Err(e.context(format!(
                "stopping agent on host {n}; log tail:\n{}",
                tail(&self.agent_log(n), 3000)
            ))),
        }
    }

    /// Kills host `n`'s agent with SIGKILL (no cleanup on its side) and reaps it.
    pub fn kill9_agent(&mut self, n: u8) -> Result<()> {
        let agent = self
            .agents
            .get_mut(&n)
            .ok_or_else(|| anyhow!("no agent was started on host {n}"))?;
        let mut child = agent
            .child
            .take()
            .ok_or_else(|| anyhow!("agent on host {n} is not running"))?;
        crate::cmd::signal_pid(child.id(), libc::SIGKILL)?;
        match crate::cmd::wait_uninterruptible(&mut child, Duration::from_secs(5))? {
            Some(_) => Ok(()),
            None => bail!("agent on host {n} still running 5 s after SIGKILL"),
        }
    }

    /// Sends SIGHUP (reload the peers file) to host `n`'s agent.
    pub fn sighup_agent(&mut self, n: u8) -> Result<()> {
        let pid = self.agent_pid(n)?;
        crate::cmd::signal_pid(pid, libc::SIGHUP)
    }

    /// Pid of host `n`'s running agent.
    pub fn agent_pid(&mut self, n: u8) -> Result<u32> {
        let agent = self
            .agents
            .get_mut(&n)
            .ok_or_else(|| anyhow!("no agent was started on host {n}"))?;
        let child = agent
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("agent on host {n} is not running"))?;
        if let Some(status) = child.try_wait()? {
            agent.child = None;
            bail!(
                "agent on host {n} has exited ({})",
                describe_status(&status)
            );
        }
        Ok(child.id())
    }

    /// Whether host `n`'s agent is running (reaps it if it exited).
    pub fn agent_running(&mut self, n: u8) -> bool {
        self.agent_pid(n).is_ok()
    }

    /// Everything host `n`'s agents logged so far (empty if none ran).
    pub fn agent_log(&self, n: u8) -> String {
        read_from(&self.log_path(n), 0)
    }

    /// Runs `<agent> status <args...> --socket <host n's socket>` and returns stdout.
    pub fn status(&self, n: u8, args: &[&str]) -> Result<String> {
        let bin = self.agent_bin(n)?;
        let mut cmd = Command::new(bin);
        cmd.arg("status")
            .args(args)
            .arg("--socket")
            .arg(self.socket_path(n));
        run_timeout(&mut cmd, Duration::from_secs(10))
    }

    /// Runs `<agent> status --json` for host `n` and parses the object it prints.
    pub fn status_json(&self, n: u8) -> Result<serde_json::Value> {
        let text = self.status(n, &["--json"])?;
        serde_json::from_str(&text).with_context(|| {
            format!("`weft status --json` on host {n} printed invalid JSON: {text}")
        })
    }

    /// Runs the agent on host `n` with exactly `args` (after the binary) and waits up to
    /// `timeout` for it to exit; for runs expected to fail. Fails if it is still
    /// running after `timeout` (it is then killed).
    pub fn run_agent_to_exit(
        &self,
        n: u8,
        agent_bin: &Path,
        args: &[String],
        timeout: Duration,
    ) -> Result<AgentExit> {
        let host = self.host(n)?;
        let mut cmd = host_command(&host.ns, agent_bin);
        cmd.args(args);
        let line = command_line(&cmd);
        let out = output(&mut cmd, timeout)
            .with_context(|| format!("expected `{line}` to exit by itself"))?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok(AgentExit {
            status: out.status,
            output: text,
        })
    }

    fn agent_bin(&self, n: u8) -> Result<&Path> {
        self.agents
            .get(&n)
            .map(|a| a.bin.as_path())
            .ok_or_else(|| anyhow!("no agent was ever started on host {n}"))
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut s = Vec::new();
    if let Ok(mut f) = File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_end(&mut s);
    }
    String::from_utf8_lossy(&s).into_owned()
}
