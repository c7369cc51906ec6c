//! Calling the CNI plugin (`weft-cni`) the way a container runtime does: `CNI_*`
//! environment, the network configuration on stdin, the result or a CNI error as JSON
//! on stdout, in a host's network namespace.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::{Pod, Testbed, cmd::command_line};

/// How long one plugin call may take.
pub const CNI_TIMEOUT: Duration = Duration::from_secs(20);

/// What one plugin call returned.
#[derive(Debug, Clone)]
pub struct CniOutcome {
    /// Exit status 0.
    pub success: bool,
    /// stdout as JSON (`Null` when empty).
    pub json: Value,
    /// stdout as text.
    pub stdout: String,
    /// stderr as text.
    pub stderr: String,
}

impl CniOutcome {
    /// The CNI error code, if the call failed with one.
    pub fn error_code(&self) -> Option<u64> {
        self.json.get("code").and_then(Value::as_u64)
    }
}

/// A plugin call: `command` for container `id`'s interface `ifname` in `netns` (a
/// path), with `conf` on stdin, run by `bin` in host namespace `host_ns`. Extra
/// `env` pairs are added (or, with an empty value, removed).
pub struct CniCall<'a> {
    /// The plugin binary.
    pub bin: &'a Path,
    /// The host's network namespace.
    pub host_ns: &'a str,
    /// `CNI_COMMAND`.
    pub command: &'a str,
    /// `CNI_CONTAINERID`.
    pub id: &'a str,
    /// `CNI_NETNS`.
    pub netns: Option<&'a str>,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
    /// stdin.
    pub conf: &'a str,
    /// More environment; an empty value removes the variable.
    pub env: &'a [(&'a str, &'a str)],
}

impl CniCall<'_> {
    /// Runs the plugin; fails only if it cannot be run or outlives [`CNI_TIMEOUT`].
    pub fn run(&self) -> Result<CniOutcome> {
        let mut cmd = crate::cmd::host_command(self.host_ns, self.bin);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", self.id)
            .env("CNI_IFNAME", self.ifname)
            .env("CNI_PATH", "/opt/cni/bin");
        if let Some(netns) = self.netns {
            cmd.env("CNI_NETNS", netns);
        }
        for (k, v) in self.env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        run_with_stdin(&mut cmd, self.conf.as_bytes())
    }
}

/// Runs `cmd` with `stdin`, within [`CNI_TIMEOUT`].
fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Result<CniOutcome> {
    let line = command_line(cmd);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    if let Some(mut input) = child.stdin.take() {
        // A plugin that exits before reading is a finding for the caller, not an
        // error here.
        let _ = input.write_all(stdin);
    }
    let deadline = Instant::now() + CNI_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{line}` did not finish within {CNI_TIMEOUT:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout)
            .with_context(|| format!("`{line}` printed something that is not JSON: {stdout:?}"))?
    };
    Ok(CniOutcome {
        success: out.status.success(),
        json,
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The network configuration of one plugin (as a runtime passes it from a conflist).
pub fn net_conf(data_dir: &Path, range: &str) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "weave",
        "type": "weft-cni",
        "ipallocRange": range,
        "dataDir": data_dir,
    })
    .to_string()
}

/// A container made by the plugin: its netns, host and address.
#[derive(Debug, Clone)]
pub struct CniContainer {
    /// As a [`Pod`] (ping, TCP), with the address ADD gave.
    pub pod: Pod,
    /// The container id given to the plugin.
    pub id: String,
    /// The netns path.
    pub netns: String,
    /// The ADD result.
    pub result: Value,
}

impl Testbed {
    /// An empty network namespace `<prefix>-<suffix>` (loopback up), removed at
    /// teardown: a container's before its runtime plugs it in.
    pub fn add_container_netns(&mut self, suffix: &str) -> Result<String> {
        let name = format!("{}-{suffix}", self.prefix());
        self.add_namespace(&name)?;
        Ok(name)
    }

    /// Creates a container netns on host `n` and calls the plugin's ADD for it with
    /// `conf`; fails unless ADD succeeds with an IPv4 address.
    pub fn cni_add(&mut self, bin: &Path, n: u8, suffix: &str, conf: &str) -> Result<CniContainer> {
        let ns = self.add_container_netns(suffix)?;
        let netns = format!("/run/netns/{ns}");
        let host_ns = self.host(n)?.ns.clone();
        let id = format!("{}-{suffix}", self.prefix());
        let out = CniCall {
            bin,
            host_ns: &host_ns,
            command: "ADD",
            id: &id,
            netns: Some(&netns),
            ifname: "eth0",
            conf,
            env: &[],
        }
        .run()?;
        if !out.success {
            bail!(
                "ADD for {id} on host {n} failed: {} {}",
                out.stdout,
                out.stderr
            );
        }
        let addr = out.json["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split_once('/'))
            .and_then(|(a, _)| a.parse().ok())
            .ok_or_else(|| anyhow!("ADD result without an IPv4 address: {}", out.json))?;
        Ok(CniContainer {
            pod: Pod {
                host: n,
                index: 0,
                ns,
                addr,
            },
            id,
            netns,
            result: out.json,
        })
    }
}
