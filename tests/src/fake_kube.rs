//! A fake Kubernetes API server for the agent's `--kube-peers`: plain HTTP on
//! 127.0.0.1 inside a host's network namespace, answering `GET /api/v1/nodes` with
//! the node list the test sets (or garbage, or an error, or nothing: the listener
//! closed), and a kubeconfig that points the agent at it.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::json;

use crate::netns;

/// What the fake server does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Lists these nodes: (name, InternalIP).
    Nodes(Vec<(String, Ipv4Addr)>),
    /// Answers 200 with a body that is not JSON.
    Garbage,
    /// Does not listen (connections are refused).
    Down,
}

/// A running fake API server; stopped on drop.
pub struct FakeApi {
    /// Its port on 127.0.0.1 in the namespace.
    pub port: u16,
    mode: Arc<Mutex<Mode>>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

/// A NodeList as the API server sends it.
pub fn node_list(nodes: &[(String, Ipv4Addr)]) -> String {
    let items: Vec<_> = nodes
        .iter()
        .map(|(name, ip)| {
            json!({
                "metadata": {"name": name, "uid": format!("uid-{name}")},
                "status": {"addresses": [
                    {"type": "InternalIP", "address": ip.to_string()},
                    {"type": "Hostname", "address": name},
                ]},
            })
        })
        .collect();
    json!({
        "kind": "NodeList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "1"},
        "items": items,
    })
    .to_string()
}

impl FakeApi {
    /// Starts the server in network namespace `ns`.
    pub fn start(ns: &str, mode: Mode) -> Result<Self> {
        let mode = Arc::new(Mutex::new(mode));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let thread = {
            let (mode, requests, stop) = (mode.clone(), requests.clone(), stop.clone());
            netns::spawn_in(ns, move || serve(mode, requests, stop, port_tx))
        };
        let port = port_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the fake API server did not start")?;
        Ok(FakeApi {
            port,
            mode,
            requests,
            stop,
            thread: Some(thread),
        })
    }

    /// Changes what it answers.
    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner) = mode;
    }

    /// The request lines received so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Writes a kubeconfig for it into `dir`; returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: \
             http://127.0.0.1:{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    \
             user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.port
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    mode: Arc<Mutex<Mode>>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    port_tx: std::sync::mpsc::Sender<u16>,
) -> Result<()> {
    let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding")?;
    let port = first.local_addr()?.port();
    first.set_nonblocking(true)?;
    let mut listener = Some(first);
    let _ = port_tx.send(port);
    while !stop.load(Ordering::SeqCst) {
        let now = mode.lock().unwrap_or_else(PoisonError::into_inner).clone();
        match (&now, &listener) {
            (Mode::Down, Some(_)) => listener = None,
            (Mode::Down, None) => {}
            (_, None) => {
                // std sets SO_REUSEADDR: the port can be taken again at once.
                let l = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).context("rebinding")?;
                l.set_nonblocking(true)?;
                listener = Some(l);
            }
            (_, Some(l)) => match l.accept() {
                Ok((stream, _)) => {
                    if let Some(line) = answer(stream, &now) {
                        requests
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(line);
                    }
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("accept"),
            },
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Reads one request and answers it; returns its request line.
fn answer(mut stream: TcpStream, mode: &Mode) -> Option<String> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let line = head.lines().next().unwrap_or_default().to_owned();
    let path = line.split(' ').nth(1).unwrap_or_default();
    let (status, body) = match mode {
        _ if !path.starts_with("/api/v1/nodes") => ("404 Not Found", "{}".to_owned()),
        Mode::Nodes(nodes) => ("200 OK", node_list(nodes)),
        Mode::Garbage => ("200 OK", "<html>this is not JSON</html>".to_owned()),
        Mode::Down => ("503 Service Unavailable", "{}".to_owned()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes());
    Some(line)
}
