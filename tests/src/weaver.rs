//! A real Weave Net 2.8.1 router (`weaver`) on a testbed host, for interop tests and
//! the benchmark.
//!
//! The binary is not part of this repository: its path comes from the environment
//! variable [`WEAVER_ENV`] (`WEFT_WEAVER`). Tests call [`skip_without_weaver`] first,
//! which prints a `SKIPPED: ...` line and returns `true` when it is not set.
//!
//! [`Testbed::start_weaver`] runs `nsenter --net=/run/netns/<host ns> <weaver> --port 6783
//! --name <PeerName> --nickname <nickname> --docker-api '' --no-dns --db-prefix
//! <dir>/weave --http-addr 127.0.0.1:6784 --status-addr 127.0.0.1:6782 [--no-fastdp]
//! <peers...>` with `CHECKPOINT_DISABLE=1` (and the password, if any, in
//! `WEAVE_PASSWORD`, so it never shows on a command line), in a fresh working
//! directory `<testbed dir>/weaver-h<N>` (a leftover `restart.sentinel` would make it
//! ignore its peer arguments), with stdout and stderr in `weaver.log` there.
//!
//! The host keeps the testbed's bridge `weave`: weaver adopts an existing Linux bridge
//! of that name (its MAC becomes the PeerName) and adds `vethwe-bridge`/`vethwe-pcap`
//! to it. The host's pods get TX checksum offload turned off, as Weave's CNI plugin
//! does: the sleeve captures frames with pcap and would forward partial checksums.
//! Pods added later need [`tx_checksum_off`].
//!
//! weaver does not clean up on exit (bridge, veths, `WEAVE*` iptables chains, neighbour
//! sysctls): all of that lives in the host's namespace and goes with it. The testbed
//! kills its weavers at teardown, before it deletes the namespaces.
//!
//! Status is read over HTTP inside the host's namespace (`/status`,
//! `/status/connections`, `/report`) by a thread that enters the namespace, so no HTTP
//! client is needed.

use std::{
    fmt,
    fs::{File, OpenOptions},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::{
    agent::AgentProc,
    cmd::{command_line, describe_status, host_command, run_in, tail},
    signal::interrupted,
    testbed::{Pod, Testbed},
};

/// The environment variable that names the weaver binary.
pub const WEAVER_ENV: &str = "WEFT_WEAVER";
/// Port of weaver's HTTP API (status, report) on 127.0.0.1 of its namespace.
pub const HTTP_PORT: u16 = 6784;
/// Port of weaver's metrics endpoint on 127.0.0.1 of its namespace.
pub const METRICS_PORT: u16 = 6782;
/// Weave's control (TCP) and sleeve (UDP) port.
pub const MESH_PORT: u16 = 6783;
/// How long weaver may take to answer on its HTTP port after start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one HTTP request to weaver may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest HTTP response read from weaver.
const HTTP_MAX_BYTES: u64 = 8 << 20;
/// The MTU weaver shows for a sleeve connection before its path-MTU search ends.
const UNDISCOVERED_MTU: u32 = 65535;

/// The weaver binary named by [`WEAVER_ENV`], if it is set and not empty.
pub fn weaver_path() -> Option<PathBuf> {
    std::env::var_os(WEAVER_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The line [`skip_without_weaver`] prints for `test`.
pub fn skip_message(test: &str) -> String {
    format!(
        "SKIPPED: {test} needs a Weave Net 2.8.1 router binary: set {WEAVER_ENV}=/path/to/weaver"
    )
}

/// Whether `test` must be skipped because [`WEAVER_ENV`] is not set; if so, prints
/// [`skip_message`] straight to stderr (not through `eprintln!`, which the test
/// harness captures), so it shows with or without `--nocapture`. The test then
/// returns early and passes, visibly.
pub fn skip_without_weaver(test: &str) -> bool {
    if weaver_path().is_some() {
        return false;
    }
    let _ = writeln!(std::io::stderr(), "{}", skip_message(test));
    true
}

/// How to start a weaver. Unset name and nickname default to the testbed host's
/// (`aa:00:00:00:00:<N>`, `host<N>`). The password is never shown by `Debug`.
#[derive(Clone, Default)]
pub struct WeaverOptions {
    /// `--name`: its PeerName (a MAC address).
    pub name: Option<String>,
    /// `--nickname`.
    pub nickname: Option<String>,
    /// `--password` (passed as `WEAVE_PASSWORD`): encrypts the mesh.
    pub password: Option<String>,
    /// Lets it use its fast datapath (`--datapath datapath` instead of
    /// `--no-fastdp`); it needs openvswitch in the kernel.
    pub fastdp: bool,
    /// Peers to connect to (their underlay addresses; port 6783).
    pub peers: Vec<Ipv4Addr>,
    /// More arguments, before the peers.
    pub extra_args: Vec<String>,
}

impl fmt::Debug for WeaverOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeaverOptions")
            .field("name", &self.name)
            .field("nickname", &self.nickname)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("fastdp", &self.fastdp)
            .field("peers", &self.peers)
            .field("extra_args", &self.extra_args)
            .finish()
    }
}

impl WeaverOptions {
    /// Sleeve only, no password, no peers, the host's identity.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the PeerName.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Sets the nickname.
    pub fn nickname(mut self, nickname: &str) -> Self {
        self.nickname = Some(nickname.to_string());
        self
    }

    /// Sets the mesh password.
    pub fn password(mut self, password: &str) -> Self {
        self.password = Some(password.to_string());
        self
    }

    /// Lets weaver try its fast datapath.
    pub fn fastdp(mut self, on: bool) -> Self {
        self.fastdp = on;
        self
    }

    /// Adds a peer address.
    pub fn peer(mut self, addr: Ipv4Addr) -> Self {
        self.peers.push(addr);
        self
    }

    /// Adds an extra argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_string());
        self
    }

    /// The command-line arguments (after the binary) for a weaver named `name`
    /// (`nickname`) with its database under `db_prefix`. The password is not among
    /// them (it goes in the environment).
    pub fn args(&self, name: &str, nickname: &str, db_prefix: &Path) -> Vec<String> {
        let mut a: Vec<String> = [
            "--port",
            &MESH_PORT.to_string(),
            "--name",
            name,
            "--nickname",
            nickname,
            "--docker-api",
            "",
            "--no-dns",
            "--db-prefix",
            &db_prefix.display().to_string(),
            "--http-addr",
            &format!("127.0.0.1:{HTTP_PORT}"),
            "--status-addr",
            &format!("127.0.0.1:{METRICS_PORT}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.fastdp {
            // weaver's own fast datapath: an openvswitch datapath of this name.
            a.extend(["--datapath".into(), "datapath".into()]);
        } else {
            a.push("--no-fastdp".into());
        }
        a.extend(self.extra_args.iter().cloned());
        a.extend(self.peers.iter().map(|p| p.to_string()));
        a
    }
}

/// One line of weaver's `/status/connections`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeaveConnection {
    /// Whether this router dialled it (`->`) rather than accepted it (`<-`).
    pub outbound: bool,
    /// The remote TCP address (`ip:port`).
    pub address: String,
    /// `established`, `pending`, `connecting`, `retrying`, `failed`, `waiting`...
    pub state: String,
    /// Whether the connection is encrypted (`encrypted` in the info).
    pub encrypted: bool,
    /// The overlay in use (`sleeve`, `fastdp`, `none`), if the line names one.
    pub overlay: Option<String>,
    /// The remote peer's name, if known (`name(nickname)` in the info).
    pub peer_name: Option<String>,
    /// The remote peer's nickname, if known.
    pub peer_nickname: Option<String>,
    /// The overlay's MTU (`mtu=` attribute), if shown.
    pub mtu: Option<u32>,
    /// The whole line.
    pub line: String,
}

impl WeaveConnection {
    /// Parses one line of `/status/connections`:
    /// `-> 192.168.48.12:6783  established encrypted   sleeve aa:..:02(host2) encrypted=truemtu=1414`
    /// (the attributes are printed without separators). `None` for lines of another
    /// shape.
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let outbound = match words.next()? {
            "->" => true,
            "<-" => false,
            _ => return None,
        };
        let address = words.next()?.to_string();
        let state = words.next()?.to_string();
        let rest: Vec<&str> = words.collect();
        let mut i = 0;
        let mut encrypted = false;
        if let Some(&w) = rest.first()
            && (w == "encrypted" || w == "unencrypted")
        {
            encrypted = w == "encrypted";
            i = 1;
        }
        let mut overlay = None;
        let mut peer_name = None;
        let mut peer_nickname = None;
        if state == "established" || state == "pending" {
            overlay = rest.get(i).map(|s| s.to_string());
            if let Some(remote) = rest.get(i + 1)
                && let Some((name, nick)) = remote.split_once('(')
                && let Some(nick) = nick.strip_suffix(')')
            {
                peer_name = Some(name.to_string());
                peer_nickname = Some(nick.to_string());
            }
        }
        let mtu = line.rfind("mtu=").and_then(|p| {
            let digits: String = line[p + 4..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        });
        Some(WeaveConnection {
            outbound,
            address,
            state,
            encrypted,
            overlay,
            peer_name,
            peer_nickname,
            mtu,
            line: line.trim_end().to_string(),
        })
    }

    /// Parses every connection line of a `/status/connections` text.
    pub fn parse_all(text: &str) -> Vec<Self> {
        text.lines().filter_map(Self::parse).collect()
    }
}

/// A weaver process in a network namespace. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Weaver {
    child: Option<Child>,
    ns: String,
    dir: PathBuf,
    name: String,
    nickname: String,
    line: String,
}

impl Weaver {
    /// Starts `bin` in network namespace `ns` with `opts`, in working directory `dir`
    /// (emptied first), named `name` (`nickname`), and waits up to [`READY_TIMEOUT`]
    /// until its HTTP API answers `/status`. Fails with its log's tail if it exits or
    /// does not answer in time (it is then killed).
    pub fn start(
        bin: &Path,
        ns: &str,
        dir: &Path,
        name: &str,
        nickname: &str,
        opts: &WeaverOptions,
    ) -> Result<Weaver> {
        ensure!(
            bin.is_file(),
            "{WEAVER_ENV}={} is not a file (a Weave Net 2.8.1 `weaver` binary)",
            bin.display()
        );
        ensure!(
            find_in_path("iptables").is_some(),
            "weaver needs the `iptables` program (Debian: apt-get install iptables)"
        );
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot empty {}", dir.display()));
            }
            _ => {}
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let log_path = dir.join("weaver.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut cmd = host_command(ns, bin);
        cmd.args(opts.args(name, nickname, &dir.join("weave")))
            .current_dir(dir)
            .env("CHECKPOINT_DISABLE", "1")
            .env_remove("WEAVE_PASSWORD");
        if let Some(pw) = &opts.password {
            cmd.env("WEAVE_PASSWORD", pw);
        }
        let line = command_line(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        let mut w = Weaver {
            child: Some(child),
            ns: ns.to_string(),
            dir: dir.to_path_buf(),
            name: name.to_string(),
            nickname: nickname.to_string(),
            line,
        };
        w.wait_ready()?;
        Ok(w)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait()? {
                bail!(
                    "weaver in {} exited ({}) before its HTTP API answered; command: `{}`; \
                     log tail:\n{}",
                    self.ns,
                    describe_status(&status),
                    self.line,
                    tail(&self.log(), 3000)
                );
            }
            let last_err = match self.http_get("/status", false) {
                Ok(_) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline || interrupted() {
                self.kill();
                bail!(
                    "weaver in {}: HTTP API not answering within {READY_TIMEOUT:?} (killed); \
                     last error: {last_err}; command: `{}`; log tail:\n{}",
                    self.ns,
                    self.line,
                    tail(&self.log(), 3000)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its PeerName.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its nickname.
    pub fn nickname(&self) -> &str {
        &self.nickname
    }

    /// The network namespace it runs in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Its working directory (database, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of its log (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("weaver.log")
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        let mut s = Vec::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let _ = f.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    }

    /// The command line it was started with (no password in it).
    pub fn command_line(&self) -> &str {
        &self.line
    }

    /// Its pid, while it runs.
    pub fn pid(&mut self) -> Result<u32> {
        if let Some(status) = self.try_wait()? {
            bail!(
                "weaver in {} has exited ({})",
                self.ns,
                describe_status(&status)
            );
        }
        self.child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| anyhow!("weaver in {} was stopped", self.ns))
    }

    /// Whether it still runs (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        self.pid().is_ok()
    }

    fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait().context("waitpid failed")?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// Kills it (SIGKILL to its process group) and reaps it; nothing if it is not
    /// running. weaver leaves its bridge, veths and iptables rules behind: they go with
    /// the namespace.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::cmd::kill_group(&mut child);
        }
    }

    /// GET `path` on its HTTP API (inside its namespace), `Accept: application/json`
    /// if `json`; returns the body. Fails unless the status is 200.
    pub fn http_get(&self, path: &str, json: bool) -> Result<String> {
        let path_owned = path.to_string();
        let h = crate::netns::spawn_in(&self.ns, move || {
            http_get_here(
                SocketAddr::from(([127, 0, 0, 1], HTTP_PORT)),
                &path_owned,
                json,
            )
        });
        let (status, body) = crate::netns::join(h, "weaver HTTP GET")
            .with_context(|| format!("GET {path} from weaver in {}", self.ns))?;
        ensure!(
            status == 200,
            "GET {path} from weaver in {}: HTTP status {status}: {}",
            self.ns,
            tail(&body, 500)
        );
        Ok(body)
    }

    /// The text weaver serves at `path` (`/status`, `/status/connections`,
    /// `/status/peers`...).
    pub fn status_text(&self, path: &str) -> Result<String> {
        self.http_get(path, false)
    }

    /// weaver's JSON report (`/report`).
    pub fn report_json(&self) -> Result<serde_json::Value> {
        let body = self.http_get("/report", true)?;
        serde_json::from_str(&body).with_context(|| {
            format!(
                "weaver in {}: /report is not JSON: {}",
                self.ns,
                tail(&body, 500)
            )
        })
    }

    /// Its connections, from `/status/connections`.
    pub fn connections(&self) -> Result<Vec<WeaveConnection>> {
        Ok(WeaveConnection::parse_all(
            &self.status_text("/status/connections")?,
        ))
    }

    /// Waits up to `timeout` until a connection to the peer named `peer_name` is
    /// `established` with its MTU known, and returns it. (A sleeve connection shows
    /// `established` with `mtu=65535`, Weave's "not yet discovered", until its path-MTU
    /// search ends a moment later.) Fails with the last `/status/connections` and the
    /// log's tail otherwise, or at once if weaver exited.
    pub fn wait_connection_established(
        &mut self,
        peer_name: &str,
        timeout: Duration,
    ) -> Result<WeaveConnection> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                bail!(
                    "weaver in {} is not running (waiting for a connection to {peer_name}); \
                     log tail:\n{}",
                    self.ns,
                    tail(&self.log(), 3000)
                );
            }
            let last = match self.status_text("/status/connections") {
                Ok(text) => {
                    if let Some(c) = WeaveConnection::parse_all(&text).into_iter().find(|c| {
                        c.state == "established"
                            && c.peer_name.as_deref() == Some(peer_name)
                            && c.mtu != Some(UNDISCOVERED_MTU)
                    }) {
                        return Ok(c);
                    }
                    text
                }
                Err(e) => format!("({e:#})"),
            };
            if Instant::now() >= deadline || interrupted() {
                bail!(
                    "weaver {} ({}) in {}: no established connection to {peer_name} within \
                     {timeout:?}; /status/connections:\n{}\nlog tail:\n{}",
                    self.name,
                    self.nickname,
                    self.ns,
                    last.trim_end(),
                    tail(&self.log(), 3000)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Weaver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.0 GET to `addr` from the calling thread's namespace: (status, body).
fn http_get_here(addr: SocketAddr, path: &str, json: bool) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let accept = if json { "application/json" } else { "*/*" };
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .context("sending the request")?;
    let mut raw = Vec::new();
    s.take(HTTP_MAX_BYTES)
        .read_to_end(&mut raw)
        .context("reading the response")?;
    parse_http_response(&raw)
}

/// Splits an HTTP/1.x response (no chunked encoding: weaver answers HTTP/1.0 requests
/// with a plain body) into status code and body.
fn parse_http_response(raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {} bytes", raw.len()))?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    ensure!(
        version.starts_with("HTTP/1."),
        "not an HTTP response: {status_line:?}"
    );
    let code = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status code in {status_line:?}"))?;
    Ok((code, body.to_string()))
}

/// Whether `program` is an executable file in a directory of `PATH`.
fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Turns TX checksum offload off on `pod`'s `eth0` (`ethtool -K eth0 tx off`), as
/// Weave's CNI plugin does for pods on a weaver's bridge.
pub fn tx_checksum_off(pod: &Pod) -> Result<()> {
    crate::traffic::pod_exec(pod, &["ethtool", "-K", "eth0", "tx", "off"])
        .map(drop)
        .with_context(|| format!("pod {}: TX checksum offload off", pod.label()))
}

impl Testbed {
    /// Working directory of host `n`'s weaver.
    pub fn weaver_dir(&self, n: u8) -> PathBuf {
        self.dir().join(format!("weaver-h{n}"))
    }

    /// Starts the weaver `bin` on host `n` with `opts` (unset name and nickname: the
    /// host's), after turning TX checksum offload off in the host's pods, and waits
    /// until its HTTP API answers. The host must run no weft agent and must not be a
    /// kernel-VXLAN host. Killed by [`Testbed::kill_weaver`] or at teardown.
    pub fn start_weaver(&mut self, n: u8, bin: &Path, opts: &WeaverOptions) -> Result<&mut Weaver> {
        let host = self.host(n)?.clone();
        ensure!(
            !host.is_kernel_vxlan(),
            "host {n} is a kernel-VXLAN host; it must not run weaver"
        );
        ensure!(
            !self.agents.get(&n).is_some_and(AgentProc::is_running),
            "host {n} runs a weft agent; it must not run weaver too"
        );
        ensure!(
            !self.weavers.get_mut(&n).is_some_and(Weaver::is_running),
            "a weaver already runs on host {n}"
        );
        for pod in &host.pods {
            tx_checksum_off(pod)?;
        }
        let name = opts.name.clone().unwrap_or_else(|| host.peer_name());
        let nickname = opts.nickname.clone().unwrap_or_else(|| host.nickname());
        if opts.fastdp {
            // weaver's fast datapath makes its own bridge (type "bridged_fastdp") and
            // refuses a plain one: the testbed's goes, its pods are attached again
            // to weaver's below.
            run_in(&host.ns, "ip", &["link", "del", "weave"])?;
        }
        let dir = self.weaver_dir(n);
        let w = Weaver::start(bin, &host.ns, &dir, &name, &nickname, opts)
            .with_context(|| format!("starting weaver on host {n}"))?;
        self.weavers.insert(n, w);
        if opts.fastdp {
            let deadline = Instant::now() + Duration::from_secs(30);
            while run_in(&host.ns, "ip", &["link", "show", "weave"]).is_err() {
                ensure!(
                    Instant::now() < deadline,
                    "weaver on host {n}: no bridge `weave` within 30 s"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            for pod in &host.pods {
                let port = format!("vethwepl{}", pod.index);
                run_in(
                    &host.ns,
                    "ip",
                    &["link", "set", &port, "master", "weave", "up"],
                )?;
            }
        }
        self.weaver_mut(n)
    }

    /// Host `n`'s weaver (running or not).
    pub fn weaver(&self, n: u8) -> Result<&Weaver> {
        self.weavers
            .get(&n)
            .ok_or_else(|| anyhow!("no weaver was started on host {n}"))
    }

    /// Host `n`'s weaver, mutably (for waits and [`Weaver::kill`]).
    pub fn weaver_mut(&mut self, n: u8) -> Result<&mut Weaver> {
        self.weavers
            .get_mut(&n)
            .ok_or_else(|| anyhow!("no weaver was started on host {n}"))
    }

    /// Whether host `n` runs a weaver.
    pub fn weaver_running(&mut self, n: u8) -> bool {
        self.weavers.get_mut(&n).is_some_and(Weaver::is_running)
    }

    /// Kills host `n`'s weaver (its record, log included, stays).
    pub fn kill_weaver(&mut self, n: u8) -> Result<()> {
        self.weaver_mut(n)?.kill();
        Ok(())
    }

    /// Kills every weaver, printing each one's log tail first if `with_logs`.
    pub(crate) fn kill_weavers(&mut self, with_logs: bool) {
        let prefix = self.prefix().to_string();
        for (n, w) in &mut self.weavers {
            if with_logs {
                eprintln!(
                    "---- testbed {prefix}: weaver log of host {n} (tail) ----\n{}",
                    tail(&w.log(), 4000)
                );
            }
            w.kill();
        }
    }
}

/// Starts weavers on hosts `a` and `b` of `tb`, `b` given `a` as its peer, both with
/// `password` (if any), sleeve only; waits up to `timeout` until each shows the other
/// `established`, and returns (a's connection, b's connection).
pub fn start_weaver_pair(
    tb: &mut Testbed,
    bin: &Path,
    (a, b): (u8, u8),
    password: Option<&str>,
    timeout: Duration,
) -> Result<(WeaveConnection, WeaveConnection)> {
    let mut opts = WeaverOptions::new();
    if let Some(pw) = password {
        opts = opts.password(pw);
    }
    let a_addr = tb.host(a)?.addr;
    tb.start_weaver(a, bin, &opts)?;
    tb.start_weaver(b, bin, &opts.clone().peer(a_addr))?;
    let (a_name, b_name) = (
        tb.weaver(a)?.name().to_string(),
        tb.weaver(b)?.name().to_string(),
    );
    let ca = tb
        .weaver_mut(a)?
        .wait_connection_established(&b_name, timeout)?;
    let cb = tb
        .weaver_mut(b)?
        .wait_connection_established(&a_name, timeout)?;
    Ok((ca, cb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connection_lines() {
        let text = "-> 192.168.48.12:6783     established sleeve aa:00:00:00:00:02(host2) mtu=1438\n\
            <- 192.168.48.11:43210    established encrypted   sleeve aa:00:00:00:00:01(host1) encrypted=truemtu=1414\n\
            -> 192.168.48.13:6783     failed      dial tcp4 :0->192.168.48.13:6783: connect: connection refused, retry: 2026-11-27 05:00:00\n\
            garbage\n";
        let c = WeaveConnection::parse_all(text);
        assert_eq!(c.len(), 3);
        assert!(c[0].outbound);
        assert_eq!(c[0].address, "192.168.48.12:6783");
        assert_eq!(c[0].state, "established");
        assert!(!c[0].encrypted);
        assert_eq!(c[0].overlay.as_deref(), Some("sleeve"));
        assert_eq!(c[0].peer_name.as_deref(), Some("aa:00:00:00:00:02"));
        assert_eq!(c[0].peer_nickname.as_deref(), Some("host2"));
        assert_eq!(c[0].mtu, Some(1438));
        assert!(!c[1].outbound);
        assert!(c[1].encrypted);
        assert_eq!(c[1].overlay.as_deref(), Some("sleeve"));
        assert_eq!(c[1].peer_name.as_deref(), Some("aa:00:00:00:00:01"));
        assert_eq!(c[1].mtu, Some(1414));
        assert_eq!(c[2].state, "failed");
        assert_eq!(c[2].peer_name, None);
        assert_eq!(c[2].overlay, None);
    }

    #[test]
    fn parses_http_responses() {
        let (code, body) =
            parse_http_response(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello\n")
                .unwrap();
        assert_eq!((code, body.as_str()), (200, "hello\n"));
        let (code, _) = parse_http_response(b"HTTP/1.1 404 Not Found\r\n\r\n").unwrap();
        assert_eq!(code, 404);
        assert!(parse_http_response(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse_http_response(b"HTTP/1.0 200 OK\r\n").is_err());
    }

    #[test]
    fn options_keep_the_password_off_the_command_line_and_out_of_debug() {
        let o = WeaverOptions::new()
            .password("s3cret")
            .peer(Ipv4Addr::new(192, 168, 48, 11));
        let args = o.args("aa:00:00:00:00:02", "host2", Path::new("/tmp/x/weave"));
        assert!(!args.iter().any(|a| a.contains("s3cret")));
        assert!(args.contains(&"--no-fastdp".to_string()));
        assert_eq!(args.last().map(String::as_str), Some("192.168.48.11"));
        assert!(!format!("{o:?}").contains("s3cret"));
    }

    #[test]
    fn skip_message_names_test_and_variable() {
        let m = skip_message("t1");
        assert!(m.starts_with("SKIPPED: t1 needs a Weave Net 2.8.1 router binary"));
        assert!(m.ends_with("set WEFT_WEAVER=/path/to/weaver"));
    }
}
