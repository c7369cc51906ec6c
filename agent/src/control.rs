//! The agent's local control socket (a root-only Unix stream socket,
//! [`DEFAULT_SOCKET`] by default), used by `weft status`.
//!
//! Protocol: the client sends one request line, the agent answers one JSON line and
//! closes. Requests: `status`, answered with the [`Status`] object; `connect PEER...`
//! and `forget PEER...` (the mesh's targets, as `weave connect`/`weave forget`),
//! answered with `{"ok": true}`. Anything else, or a refused request, is answered
//! with `{"error": "..."}`.

use std::{
    io::ErrorKind,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
    time::timeout,
};

use crate::status::Status;

/// Where `weft run` listens and `weft status` connects by default.
pub const DEFAULT_SOCKET: &str = "/run/weft/weft.sock";

/// Longest request line the agent reads.
pub const MAX_REQUEST: usize = 1024;
/// How long the agent waits for a client's request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the agent waits for a client to take its answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `weft status` waits for the whole exchange.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer `weft status` accepts.
pub const MAX_REPLY: u64 = 64 << 20;
/// Clients served at once; more wait to be accepted.
const MAX_CLIENTS: usize = 16;

/// The request asking for a [`Status`] snapshot.
const STATUS_REQUEST: &str = "status";
/// The request adding mesh targets.
const CONNECT_REQUEST: &str = "connect";
/// The request removing mesh targets.
const FORGET_REQUEST: &str = "forget";

/// What the agent does for control requests. Calls run on the runtime thread: keep
/// them quick.
pub trait Handler: Send + Sync + 'static {
    /// The answer to `status`.
    fn status(&self) -> Status;
    /// `connect PEER...`: adds targets; `Err` is the refusal shown to the user.
    fn connect(&self, peers: Vec<String>) -> Result<(), String>;
    /// `forget PEER...`: removes targets.
    fn forget(&self, peers: Vec<String>) -> Result<(), String>;
}

/// The success answer to `connect` and `forget`.
#[derive(Debug, Serialize, Deserialize)]
struct OkReply {
    ok: bool,
}

/// What went wrong on the control socket. Every message is complete on its own (the OS
/// error is part of it), so print errors with `{}`.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The socket's directory could not be created.
    #[error("cannot create directory {} for the control socket: {error}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// Another agent answers on the socket.
    #[error("another weft agent is running on {}", path.display())]
    AlreadyRunning {
        /// The socket.
        path: PathBuf,
    },
    /// Something other than a socket sits at the socket's path.
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// An existing socket could not be probed or removed.
    #[error("cannot replace the stale control socket {}: {error}", path.display())]
    Stale {
        /// The socket.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// Binding, restricting or listening on the socket failed.
    #[error("cannot listen on control socket {}: {error}", path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// `weft status` could not connect to the agent.
    #[error("cannot reach the weft agent at {}: {error} ({hint})", path.display(), hint = unreachable_hint(error))]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The connection broke during the exchange.
    #[error("lost the connection to the weft agent at {}: {error}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The agent did not answer in time.
    #[error("the weft agent at {} did not answer within {} s", path.display(), QUERY_TIMEOUT.as_secs())]
    Timeout {
        /// The socket.
        path: PathBuf,
    },
    /// The answer was not a status object.
    #[error("unexpected answer from the weft agent at {}: {reason}", path.display())]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The agent answered with an error.
    #[error("the weft agent at {} answered: {message}", path.display())]
    Agent {
        /// The socket.
        path: PathBuf,
        /// The agent's message.
        message: String,
    },
}

fn unreachable_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        ErrorKind::PermissionDenied => "the control socket is root-only: run as root",
        _ => "is `weft run` running?",
    }
}

/// The agent's error answer.
#[derive(Debug, Serialize, Deserialize)]
struct ErrorReply {
    error: String,
}

/// A bound control socket. Its file is removed when it is dropped (also when the
/// [`ControlSocket::serve`] future holding it is dropped).
#[derive(Debug)]
pub struct ControlSocket {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file, so that drop removes only our own file.
    id: (u64, u64),
}

/// Binds the control socket at `path`: creates its directory (mode 0700) if missing,
/// replaces a stale socket left by a dead agent, refuses if a live agent answers, and
/// makes the socket root-only (0600). Needs no async runtime.
pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|error| ControlError::CreateDir {
                path: dir.to_owned(),
                error,
            })?;
    }
    remove_if_stale(path)?;
    let bind_err = |error| ControlError::Bind {
        path: path.to_owned(),
        error,
    };
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
    // From here on the file is ours: build the guard first so errors remove it.
    let mut socket = ControlSocket {
        listener,
        path: path.to_owned(),
        id: (0, 0),
    };
    let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
    socket.id = (meta.dev(), meta.ino());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    socket.listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(socket)
}

/// Removes `path` if it is a socket nobody listens on; fails if an agent answers.
fn remove_if_stale(path: &Path) -> Result<(), ControlError> {
    let stale_err = |error| ControlError::Stale {
        path: path.to_owned(),
        error,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(stale_err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ControlError::AlreadyRunning {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale control socket");
            std::fs::remove_file(path).map_err(stale_err)
        }
        Err(e) => Err(stale_err(e)),
    }
}

impl ControlSocket {
    /// Answers clients until the future is dropped; `snapshot` builds the answer to
    /// `status` (it runs on the runtime thread, so keep it quick). Each client gets its
    /// own task, [`REQUEST_TIMEOUT`] to send a request of at most [`MAX_REQUEST`] bytes
    /// and [`WRITE_TIMEOUT`] to read the answer. Returns only if the socket cannot be
    /// registered with the runtime.
    pub async fn serve<H: Handler>(self, handler: H) -> Result<(), ControlError> {
        let bind_err = |error| ControlError::Bind {
            path: self.path.clone(),
            error,
        };
        let std_listener = self.listener.try_clone().map_err(bind_err)?;
        let listener = UnixListener::from_std(std_listener).map_err(bind_err)?;
        let handler = Arc::new(handler);
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                // The semaphore is never closed.
                continue;
            };
            match listener.accept().await {
                Ok((stream, _)) => {
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        handle_client(stream, handler.as_ref()).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.id)
            .unwrap_or(false);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove control socket");
        }
    }
}

/// Reads one request from a client and answers it. Never fails: problems are
/// answered (when possible) and logged at debug level.
async fn handle_client<H: Handler>(stream: UnixStream, handler: &H) {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let answer = match timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => error_line("no request received in time"),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "control socket: read failed");
            return;
        }
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            error_line(&format!("request longer than {MAX_REQUEST} bytes"))
        }
        Ok(Ok(_)) => answer(&line, handler),
    };
    match timeout(WRITE_TIMEOUT, write.write_all(answer.as_bytes())).await {
        Ok(Ok(())) => {
            let _ = write.shutdown().await;
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "control socket: write failed"),
        Err(_) => tracing::debug!("control socket: client did not read the answer in time"),
    }
}

/// The answer line (newline included) to one request line.
fn answer<H: Handler>(line: &[u8], handler: &H) -> String {
    let request = String::from_utf8_lossy(line);
    let mut words = request.split_whitespace();
    let verb = words.next().unwrap_or("");
    let args: Vec<String> = words.map(str::to_owned).collect();
    let done = match verb {
        STATUS_REQUEST if args.is_empty() => None,
        CONNECT_REQUEST if !args.is_empty() => Some(handler.connect(args)),
        FORGET_REQUEST if !args.is_empty() => Some(handler.forget(args)),
        _ => {
            let shown: String = request.trim().chars().take(64).collect();
            return error_line(&format!(
                "unknown request {shown:?} (expected {STATUS_REQUEST:?}, \
                 \"{CONNECT_REQUEST} PEER...\" or \"{FORGET_REQUEST} PEER...\")"
            ));
        }
    };
    match done {
        Some(Ok(())) => {
            return serde_json::to_string(&OkReply { ok: true }).unwrap_or_default() + "\n";
        }
        Some(Err(refused)) => return error_line(&refused),
        None => {}
    }
    match serde_json::to_string(&handler.status()) {
        Ok(mut json) => {
            json.push('\n');
            json
        }
        Err(e) => error_line(&format!("cannot encode the status: {e}")),
    }
}

fn error_line(message: &str) -> String {
    let reply = ErrorReply {
        error: message.to_owned(),
    };
    // Serializing a struct holding one string cannot fail; keep a fallback anyway.
    let mut json = serde_json::to_string(&reply)
        .unwrap_or_else(|_| String::from(r#"{"error":"internal error"}"#));
    json.push('\n');
    json
}

/// Asks the agent listening at `path` for its status (what `weft status` does).
pub async fn query(path: &Path) -> Result<Status, ControlError> {
    let reply = request(path, STATUS_REQUEST).await?;
    serde_json::from_slice(&reply).map_err(|e| ControlError::BadReply {
        path: path.to_owned(),
        reason: format!("not a status object: {e}"),
    })
}

/// Asks the agent at `path` to add (`connect = true`) or remove mesh targets.
pub async fn targets(path: &Path, connect: bool, peers: &[String]) -> Result<(), ControlError> {
    let verb = if connect {
        CONNECT_REQUEST
    } else {
        FORGET_REQUEST
    };
    let reply = request(path, &format!("{verb} {}", peers.join(" "))).await?;
    match serde_json::from_slice::<OkReply>(&reply) {
        Ok(OkReply { ok: true }) => Ok(()),
        _ => Err(ControlError::BadReply {
            path: path.to_owned(),
            reason: String::from_utf8_lossy(&reply)
                .trim()
                .chars()
                .take(200)
                .collect(),
        }),
    }
}

/// One exchange with a deadline; returns the answer line unless it is an error.
async fn request(path: &Path, request: &str) -> Result<Vec<u8>, ControlError> {
    match timeout(QUERY_TIMEOUT, exchange(path, request)).await {
        Ok(result) => result,
        Err(_) => Err(ControlError::Timeout {
            path: path.to_owned(),
        }),
    }
}

async fn exchange(path: &Path, request: &str) -> Result<Vec<u8>, ControlError> {
    let io_err = |error| ControlError::Io {
        path: path.to_owned(),
        error,
    };
    let mut stream =
        UnixStream::connect(path)
            .await
            .map_err(|error| ControlError::Unreachable {
                path: path.to_owned(),
                error,
            })?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .await
        .map_err(io_err)?;
    let mut reply = Vec::new();
    match (&mut stream)
        .take(MAX_REPLY + 1)
        .read_to_end(&mut reply)
        .await
    {
        Ok(_) => {}
        // The agent may close before reading everything we sent; its answer counts.
        Err(e) if e.kind() == ErrorKind::ConnectionReset && !reply.is_empty() => {}
        Err(e) => return Err(io_err(e)),
    }
    let bad = |reason: String| ControlError::BadReply {
        path: path.to_owned(),
        reason,
    };
    if reply.len() as u64 > MAX_REPLY {
        return Err(bad(format!("longer than {MAX_REPLY} bytes")));
    }
    if reply.is_empty() {
        return Err(bad(
            "the agent closed the connection without answering".to_owned()
        ));
    }
    let value: serde_json::Value =
        serde_json::from_slice(&reply).map_err(|e| bad(format!("not JSON: {e}")))?;
    if let Some(message) = value.get("error").and_then(serde_json::Value::as_str) {
        return Err(ControlError::Agent {
            path: path.to_owned(),
            message: message.to_owned(),
        });
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Serves [`sample`] and records the targets asked for.
    #[derive(Default)]
    struct Sample {
        targets: std::sync::Mutex<Vec<String>>,
    }

    impl Handler for Sample {
        fn status(&self) -> Status {
            sample()
        }

        fn connect(&self, peers: Vec<String>) -> Result<(), String> {
            if peers.iter().any(|p| p == "refused") {
                return Err("refused: no such host".to_owned());
            }
            self.targets.lock().unwrap().extend(peers);
            Ok(())
        }

        fn forget(&self, peers: Vec<String>) -> Result<(), String> {
            self.targets.lock().unwrap().retain(|t| !peers.contains(t));
            Ok(())
        }
    }
    use crate::status::tests::sample;

    fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-control-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Sends raw bytes, returns the raw answer. The agent may close without reading all
    /// of an oversized request, which resets the connection after its answer.
    async fn raw(path: &Path, request: &[u8]) -> String {
        let mut stream = UnixStream::connect(path).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("reading the answer: {e}"),
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn round_trip_and_permissions() {
        let dir = temp_dir("rt");
        // The parent directory is created, root-only.
        let path = dir.join("sub/weft.sock");
        let socket = bind(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.join("sub")), 0o700);

        runtime().block_on(async {
            let server = tokio::spawn(socket.serve(Sample::default()));
            let status = query(&path).await.unwrap();
            assert_eq!(status, sample());
            // Several clients, one after another, each get the whole answer.
            for _ in 0..3 {
                let text = raw(&path, b"status\n").await;
                assert!(text.ends_with('\n'));
                assert_eq!(text.matches('\n').count(), 1);
                let status: Status = serde_json::from_str(&text).unwrap();
                assert_eq!(status.nickname, "host1");
            }
            // A request without a newline, ended by shutting down the write side.
            let mut stream = UnixStream::connect(&path).await.unwrap();
            stream.write_all(b"status").await.unwrap();
            stream.shutdown().await.unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).await.unwrap();
            assert!(serde_json::from_str::<Status>(&text).is_ok(), "{text}");
            server.abort();
            assert!(server.await.unwrap_err().is_cancelled());
        });
        // The aborted server dropped the socket, which removed its file.
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_requests_get_an_error_line() {
        let dir = temp_dir("bad");
        let path = dir.join("weft.sock");
        let socket = bind(&path).unwrap();
        runtime().block_on(async {
            let server = tokio::spawn(socket.serve(Sample::default()));
            let text = raw(&path, b"reboot\n").await;
            assert!(
                text.starts_with(
                    "{\"error\":\"unknown request \\\"reboot\\\" (expected \\\"status\\\""
                ),
                "{text}"
            );
            let text = raw(&path, b"connect\n").await;
            assert!(text.starts_with("{\"error\":\"unknown request"), "{text}");
            let text = raw(&path, b"status now\n").await;
            assert!(text.starts_with("{\"error\":\"unknown request"), "{text}");
            let text = raw(&path, &[b'x'; 5000]).await;
            assert_eq!(text, "{\"error\":\"request longer than 1024 bytes\"}\n");
            let text = raw(&path, b"\xff\xfe\n").await;
            assert!(text.starts_with("{\"error\":\"unknown request"), "{text}");

            // A client that sends nothing is answered after the timeout, not hung on.
            let started = tokio::time::Instant::now();
            let mut stream = UnixStream::connect(&path).await.unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).await.unwrap();
            assert_eq!(text, "{\"error\":\"no request received in time\"}\n");
            let waited = started.elapsed();
            assert!(
                waited >= REQUEST_TIMEOUT && waited < REQUEST_TIMEOUT * 2,
                "{waited:?}"
            );

            server.abort();
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn connect_and_forget_reach_the_handler() {
        let dir = temp_dir("targets");
        let path = dir.join("weft.sock");
        let socket = bind(&path).unwrap();
        runtime().block_on(async {
            let server = tokio::spawn(socket.serve(Sample::default()));
            let peers = ["10.0.0.2".to_owned(), "h3:6783".to_owned()];
            targets(&path, true, &peers).await.unwrap();
            targets(&path, false, &peers[..1]).await.unwrap();
            let e = targets(&path, true, &["refused".to_owned()])
                .await
                .unwrap_err();
            assert!(
                e.to_string().ends_with("answered: refused: no such host"),
                "{e}"
            );
            server.abort();
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn agent_error_reaches_the_client() {
        let dir = temp_dir("agent-err");
        let path = dir.join("weft.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&stream)
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line, "status\n");
            (&stream).write_all(b"{\"error\":\"busy\"}\n").unwrap();
        });
        let e = runtime().block_on(query(&path)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("the weft agent at {} answered: busy", path.display())
        );
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn second_bind_is_refused() {
        let dir = temp_dir("twice");
        let path = dir.join("weft.sock");
        let first = bind(&path).unwrap();
        let e = bind(&path).unwrap_err();
        assert!(matches!(e, ControlError::AlreadyRunning { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("another weft agent is running on {}", path.display())
        );
        // The refused bind did not remove the live socket.
        assert!(path.exists());
        drop(first);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = temp_dir("stale");
        let path = dir.join("weft.sock");
        // A socket file nobody listens on, as a killed agent leaves behind.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let socket = bind(&path).unwrap();
        runtime().block_on(async {
            let server = tokio::spawn(socket.serve(Sample::default()));
            assert_eq!(query(&path).await.unwrap(), sample());
            server.abort();
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn non_socket_is_not_replaced() {
        let dir = temp_dir("file");
        let path = dir.join("weft.sock");
        std::fs::write(&path, "precious").unwrap();
        let e = bind(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn drop_leaves_a_replaced_file_alone() {
        let dir = temp_dir("replaced");
        let path = dir.join("weft.sock");
        let socket = bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "someone else's").unwrap();
        drop(socket);
        assert!(path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn query_without_agent() {
        let dir = temp_dir("none");
        let path = dir.join("weft.sock");
        let e = runtime().block_on(query(&path)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot reach the weft agent at {}: No such file or directory (os error 2) \
                 (is `weft run` running?)",
                path.display()
            )
        );
        // A stale socket: connection refused.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let e = runtime().block_on(query(&path)).unwrap_err();
        assert!(e.to_string().contains("Connection refused"), "{e}");
        assert!(e.to_string().ends_with("(is `weft run` running?)"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn query_rejects_garbage_answers() {
        let dir = temp_dir("garbage");
        let path = dir.join("weft.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            for reply in [&b"hello\n"[..], b"{\"version\": 1}\n", b""] {
                let (stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                std::io::BufReader::new(&stream)
                    .read_line(&mut line)
                    .unwrap();
                (&stream).write_all(reply).unwrap();
            }
        });
        let rt = runtime();
        let e = rt.block_on(query(&path)).unwrap_err().to_string();
        assert!(e.contains(": not JSON: "), "{e}");
        let e = rt.block_on(query(&path)).unwrap_err().to_string();
        assert!(e.contains(": not a status object: "), "{e}");
        let e = rt.block_on(query(&path)).unwrap_err().to_string();
        assert!(
            e.ends_with("the agent closed the connection without answering"),
            "{e}"
        );
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
