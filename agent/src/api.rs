//! Weave's local HTTP endpoints: the status text and JSON report weaver serves on
//! `--http-addr` (default 127.0.0.1:6784), and the same plus Prometheus metrics on
//! `--status-addr` (default 0.0.0.0:6782).
//!
//! | path                  | body                                                    |
//! |-----------------------|---------------------------------------------------------|
//! | `/status`             | the summary ([`status::render_summary`])               |
//! | `/status/connections` | connection lines, weaver's exact bytes ([`Style::Weave`]) |
//! | `/status/peers`       | every peer and its connections ([`status::render_peers`]) |
//! | `/status/targets`     | the targets the user gave, one a line                   |
//! | `/report`             | JSON shaped like weaver's report (`Router.Peers`, ...)  |
//! | `/metrics`            | OpenMetrics text ([`crate::metrics`]), `--status-addr` only |
//!
//! Every answer is built from one [`Status`] snapshot taken for the request.
//! weaver answers `/report` with JSON only when asked with `Accept:
//! application/json` and otherwise runs a Go template from `?format=`; weft always
//! answers JSON and refuses `format` (400). Requests are read-only: other methods
//! than GET and HEAD get 405, unknown paths 404, malformed requests and oversized
//! headers hyper's 400 and 431. At most [`MAX_CLIENTS`] connections are served at
//! once (more wait to be accepted), one request each, with time limits, so a slow
//! or hostile client cannot hold the agent. The status holds no secrets.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use thiserror::Error;
use tokio::{net::TcpListener, sync::Semaphore, time::timeout};

use crate::{
    metrics,
    status::{self, Attrs, ConnectionLine, Status, Style},
};

/// Connections served at once; more wait to be accepted.
pub const MAX_CLIENTS: usize = 32;
/// How long a client has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may last, answer included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request head read (hyper's minimum buffer); larger heads get 431.
pub const MAX_HEAD_BYTES: usize = 8192;

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// Where the agent's status comes from: called once per request, on the runtime
/// thread (keep it quick).
pub trait StatusSource: Send + Sync + 'static {
    /// The current snapshot.
    fn status(&self) -> Status;
}

impl<F: Fn() -> Status + Send + Sync + 'static> StatusSource for F {
    fn status(&self) -> Status {
        self()
    }
}

/// Which of Weave's two endpoints a server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `--http-addr`: status and report.
    Http,
    /// `--status-addr`: status, report and `/metrics`.
    Status,
}

impl Endpoint {
    /// The command-line flag that sets its address.
    pub fn flag(self) -> &'static str {
        match self {
            Endpoint::Http => "--http-addr",
            Endpoint::Status => "--status-addr",
        }
    }
}

/// An endpoint that could not be set up.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The address could not be bound.
    #[error(
        "cannot listen for HTTP on {addr} ({flag}): {error} (choose another address, or \
         turn it off with {flag}='')",
        flag = endpoint.flag()
    )]
    Bind {
        /// The endpoint.
        endpoint: Endpoint,
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        error: std::io::Error,
    },
}

/// A bound HTTP endpoint, ready to [`serve`](Server::serve).
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    endpoint: Endpoint,
}

impl Server {
    /// Binds `addr` for `endpoint` (port 0 picks a free port).
    pub async fn bind(endpoint: Endpoint, addr: SocketAddr) -> Result<Self, ApiError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| ApiError::Bind {
                endpoint,
                addr,
                error,
            })?;
        Ok(Server { listener, endpoint })
    }

    /// The address bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves requests until the task is dropped or aborted.
    pub async fn serve(self, source: Arc<dyn StatusSource>) {
        let limit = Arc::new(Semaphore::new(MAX_CLIENTS));
        let endpoint = self.endpoint;
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return; // The semaphore is never closed.
            };
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, endpoint = endpoint.flag(), "HTTP accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let source = source.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = service_fn(move |req: Request<Incoming>| {
                    let response = respond(&req, source.as_ref(), endpoint);
                    async move { Ok::<_, Infallible>(response) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_HEAD_BYTES)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                match timeout(CONNECTION_TIMEOUT, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection"),
                    Err(_) => tracing::debug!("HTTP connection timed out"),
                }
            });
        }
    }
}

/// The answer to one request.
fn respond<B>(
    req: &Request<B>,
    source: &dyn StatusSource,
    endpoint: Endpoint,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "method not allowed: these endpoints are read-only (GET)\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let path = req.uri().path();
    let text =
        |render: fn(&Status) -> String| reply(StatusCode::OK, TEXT, render(&source.status()));
    match path {
        "/status" => text(status::render_summary),
        "/status/connections" => text(|s| status::render_connections(s, Style::Weave)),
        "/status/peers" => text(status::render_peers),
        "/status/targets" => text(status::render_targets),
        "/report" => {
            let asks_template = req.uri().query().is_some_and(|q| {
                q.split('&')
                    .any(|kv| kv.split('=').next() == Some("format"))
            });
            if asks_template {
                return reply(
                    StatusCode::BAD_REQUEST,
                    TEXT,
                    "error: weft does not run Go templates (format=); ask for JSON \
                     (Accept: application/json)\n"
                        .into(),
                );
            }
            reply(StatusCode::OK, JSON, report_json(&source.status()))
        }
        "/metrics" if endpoint == Endpoint::Status => reply(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            metrics::render(&source.status()),
        ),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "404 page not found\n".into()),
    }
}

fn reply(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// weaver's `/report`, the router part (`WeaveStatus.Router`, mesh's `Status`
/// with the network router's additions).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Report<'a> {
    ready: bool,
    version: &'a str,
    router: RouterReport<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RouterReport<'a> {
    protocol: &'static str,
    protocol_min_version: u8,
    protocol_max_version: u8,
    encryption: bool,
    peer_discovery: bool,
    name: String,
    nick_name: &'a str,
    port: u16,
    peers: Vec<PeerReport<'a>>,
    /// Not tracked by the status: `null`, as weaver's empty lists.
    unicast_routes: Option<()>,
    broadcast_routes: Option<()>,
    connections: Vec<ConnectionReport>,
    termination_count: u64,
    targets: &'a [String],
    overlay_diagnostics: serde_json::Value,
    trusted_subnets: &'a [String],
    interface: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PeerReport<'a> {
    name: String,
    nick_name: &'a str,
    #[serde(rename = "UID")]
    uid: u64,
    #[serde(rename = "ShortID")]
    short_id: u16,
    version: u64,
    /// `null` for none, as weaver's.
    connections: Option<Vec<PeerConnectionReport<'a>>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PeerConnectionReport<'a> {
    name: String,
    nick_name: &'a str,
    address: &'a str,
    outbound: bool,
    established: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ConnectionReport {
    address: String,
    outbound: bool,
    state: &'static str,
    info: String,
    attrs: Option<AttrsReport>,
}

/// weaver's overlay attributes; keys in the order Go writes map keys (sorted).
#[derive(Serialize)]
struct AttrsReport {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    encrypted: bool,
    mtu: u16,
    name: &'static str,
}

impl From<Attrs> for AttrsReport {
    fn from(a: Attrs) -> Self {
        AttrsReport {
            encrypted: a.encrypted,
            mtu: a.mtu,
            name: a.overlay.as_str(),
        }
    }
}

impl From<ConnectionLine> for ConnectionReport {
    fn from(l: ConnectionLine) -> Self {
        ConnectionReport {
            address: l.address,
            outbound: l.outbound,
            state: l.state.as_str(),
            info: l.info,
            attrs: l.attrs.map(Into::into),
        }
    }
}

/// The `/report` JSON, indented by four spaces as weaver's.
pub fn report_json(s: &Status) -> String {
    let peers = s
        .peers
        .iter()
        .map(|p| PeerReport {
            name: p.name.to_string(),
            nick_name: &p.nickname,
            uid: p.uid,
            short_id: p.short_id.unwrap_or(0),
            version: p.version,
            connections: (!p.connections.is_empty()).then(|| {
                p.connections
                    .iter()
                    .map(|c| PeerConnectionReport {
                        name: c.name.to_string(),
                        nick_name: &c.nickname,
                        address: &c.address,
                        outbound: c.outbound,
                        established: c.established,
                    })
                    .collect()
            }),
        })
        .collect();
    let sleeve_runs = !s.sleeve_counters.is_empty()
        || s.connections
            .iter()
            .any(|c| c.sleeve.is_some() || c.overlay == Some(status::Overlay::Sleeve));
    let mut diagnostics = serde_json::Map::new();
    diagnostics.insert(
        "fastdp".to_owned(),
        serde_json::json!({ "Counters": s.counters }),
    );
    if sleeve_runs {
        diagnostics.insert(
            "sleeve".to_owned(),
            serde_json::json!({ "Counters": s.sleeve_counters }),
        );
    }
    let report = Report {
        ready: true,
        version: &s.version,
        router: RouterReport {
            protocol: "weave",
            protocol_min_version: 1,
            protocol_max_version: 2,
            encryption: s.encryption,
            peer_discovery: s.peer_discovery,
            name: s.name.to_string(),
            nick_name: &s.nickname,
            port: s.port,
            peers,
            unicast_routes: None,
            broadcast_routes: None,
            connections: s.connection_lines().into_iter().map(Into::into).collect(),
            termination_count: s.termination_count,
            targets: &s.targets,
            overlay_diagnostics: serde_json::Value::Object(diagnostics),
            trusted_subnets: &s.trusted_subnets,
            interface: "weft (eBPF datapath)",
        },
    };
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    // Serializing plain structs into a Vec cannot fail.
    let _ = report.serialize(&mut ser);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::status::{
        Target, TargetState,
        tests::{live_password_run, sample},
    };

    #[test]
    fn report_is_shaped_like_weavers() {
        let mut status = live_password_run();
        status.targets = vec!["192.168.48.99".to_owned()];
        status.target_states.push(Target {
            address: "192.168.48.99:6783".to_owned(),
            direct: true,
            state: TargetState::Retrying,
            last_error: Some("connection refused".to_owned()),
            retry_at_ms: None,
        });
        status.termination_count = 2;
        let text = report_json(&status);
        assert!(text.starts_with("{\n    \"Ready\": true,\n    \"Version\": \"0.1.0\",\n    \"Router\": {\n        \"Protocol\": \"weave\",\n"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let r = &v["Router"];
        assert_eq!(r["Name"], "aa:00:00:00:00:01");
        assert_eq!(r["NickName"], "h1");
        assert_eq!(r["Encryption"], true);
        assert_eq!(r["PeerDiscovery"], true);
        assert_eq!(
            (
                r["ProtocolMinVersion"].as_u64(),
                r["ProtocolMaxVersion"].as_u64()
            ),
            (Some(1), Some(2))
        );
        assert_eq!(r["Port"], 6783);
        assert_eq!(r["TerminationCount"], 2);
        assert_eq!(r["Targets"], serde_json::json!(["192.168.48.99"]));
        assert_eq!(r["TrustedSubnets"], serde_json::json!([]));
        assert_eq!(r["UnicastRoutes"], serde_json::Value::Null);
        assert_eq!(
            r["Peers"][0],
            serde_json::json!({
                "Name": "aa:00:00:00:00:01", "NickName": "h1",
                "UID": 0x1234_5678_9abc_def0u64, "ShortID": 1, "Version": 3,
                "Connections": [{"Name": "aa:00:00:00:00:f2", "NickName": "foreign",
                    "Address": "192.168.77.2:42439", "Outbound": false, "Established": true}]
            })
        );
        assert_eq!(
            r["Peers"][1]["Connections"][0]["Address"],
            "192.168.77.1:6783"
        );
        assert_eq!(
            r["Connections"][0],
            serde_json::json!({
                "Address": "192.168.77.2:42439", "Outbound": false, "State": "established",
                "Info": "encrypted   sleeve aa:00:00:00:00:f2(foreign)",
                "Attrs": {"encrypted": true, "mtu": 1414, "name": "sleeve"}
            })
        );
        assert_eq!(
            r["Connections"][1],
            serde_json::json!({
                "Address": "192.168.48.99:6783", "Outbound": true, "State": "retrying",
                "Info": "connection refused", "Attrs": null
            })
        );
        assert!(r["OverlayDiagnostics"]["sleeve"].is_object());

        // A peer with no connections has `null` ones, as weaver's; no sleeve, no
        // sleeve diagnostics; the unencrypted attributes have no `encrypted`.
        let v: serde_json::Value = serde_json::from_str(&report_json(&sample())).unwrap();
        assert_eq!(
            v["Router"]["Peers"][1]["Connections"],
            serde_json::Value::Null
        );
        assert!(v["Router"]["OverlayDiagnostics"].get("sleeve").is_none());
        assert_eq!(
            v["Router"]["Connections"][0]["Attrs"],
            serde_json::json!({"mtu": 1376, "name": "fastdp"})
        );
    }

    /// Sends raw bytes, returns the whole answer.
    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The server may answer (and close) before a huge request is all sent.
        let _ = s.write_all(request).await;
        let mut out = Vec::new();
        let _ = timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let text = raw(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n")
                .as_bytes(),
        )
        .await;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, head.to_owned(), body.to_owned())
    }

    async fn start(endpoint: Endpoint) -> SocketAddr {
        let server = Server::bind(endpoint, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(server.serve(Arc::new(live_password_run)));
        addr
    }

    #[tokio::test]
    async fn serves_weaves_endpoints() {
        let addr = start(Endpoint::Status).await;
        let status = live_password_run();
        let (code, head, body) = get(addr, "/status").await;
        assert_eq!(code, 200, "{head}");
        assert!(
            head.contains("content-type: text/plain; charset=utf-8"),
            "{head}"
        );
        assert_eq!(body, status::render_summary(&status));
        let (code, _, body) = get(addr, "/status/connections").await;
        assert_eq!(code, 200);
        assert_eq!(
            body,
            "<- 192.168.77.2:42439    established encrypted   sleeve aa:00:00:00:00:f2(foreign) encrypted=truemtu=1414\n"
        );
        let (_, _, body) = get(addr, "/status/peers").await;
        assert_eq!(body, status::render_peers(&status));
        let (code, _, body) = get(addr, "/status/targets").await;
        assert_eq!((code, body.as_str()), (200, ""));
        let (code, head, body) = get(addr, "/report").await;
        assert_eq!(code, 200);
        assert!(head.contains("content-type: application/json"), "{head}");
        assert_eq!(body, report_json(&status));
        let (code, _, _) = get(addr, "/report?format=%7B%7B.Router.Name%7D%7D").await;
        assert_eq!(code, 400);
        let (code, head, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(head.contains("application/openmetrics-text"), "{head}");
        assert!(body.contains("weave_connections{"), "{body}");
    }

    #[tokio::test]
    async fn refuses_bad_requests_and_keeps_serving() {
        let addr = start(Endpoint::Http).await;
        // /metrics lives on the status endpoint only.
        assert_eq!(get(addr, "/metrics").await.0, 404);
        assert_eq!(get(addr, "/nope").await.0, 404);
        assert_eq!(get(addr, "/status/").await.0, 404);
        let answer = raw(
            addr,
            b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("allow: get, head"),
            "{answer}"
        );
        let answer = raw(addr, b"DELETE /report HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
        let answer = raw(addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400 "),
            "{answer}"
        );
        let answer = raw(
            addr,
            b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        let mut huge = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
        huge.extend(b"\r\n\r\n");
        let answer = raw(addr, &huge).await;
        assert!(
            answer.starts_with("HTTP/1.1 431 "),
            "{}",
            &answer[..answer.len().min(200)]
        );
        // A HEAD gets the headers only.
        let answer = raw(addr, b"HEAD /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            answer.starts_with("HTTP/1.1 200 ") && answer.ends_with("\r\n\r\n"),
            "{answer}"
        );
        // Still serving.
        assert_eq!(get(addr, "/status").await.0, 200);
    }

    #[tokio::test]
    async fn idle_clients_do_not_block_others() {
        let addr = start(Endpoint::Http).await;
        // Connections that never send a request: they hold permits until the head
        // timeout, but fewer than the limit leaves room for real clients.
        let mut idle = Vec::new();
        for _ in 0..MAX_CLIENTS - 1 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let (code, _, _) = timeout(Duration::from_secs(3), get(addr, "/status"))
            .await
            .expect("answered while others idle");
        assert_eq!(code, 200);
    }

    #[tokio::test]
    async fn bind_failure_names_the_flag() {
        let first = Server::bind(Endpoint::Status, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = first.local_addr().unwrap();
        let e = Server::bind(Endpoint::Status, addr)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "cannot listen for HTTP on {addr} (--status-addr): "
            )),
            "{e}"
        );
        assert!(e.contains("--status-addr=''"), "{e}");
    }
}
